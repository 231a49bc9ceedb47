//! `mura inspect` (not built yet).

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("'mura inspect' is not built yet")
}
