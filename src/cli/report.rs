//! `mura report RUN_DIR`: plot a training run into `RUN_DIR/report/` (`crate::report`).

use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A run folder written by `mura train`
    pub run_dir: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    crate::report::write(&args.run_dir)
}
