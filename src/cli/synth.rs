//! `mura synth`: write a synthetic MURA-v1.1-shaped dataset.

use crate::data::synth::{synth, SynthConfig};
use crate::out::Progress;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output folder; receives MURA-v1.1/ with the tree and the four CSVs
    #[arg(long)]
    pub out: PathBuf,
    /// Number of studies (train + valid)
    #[arg(long, default_value_t = 600, value_parser = super::count(crate::bounds::STUDIES))]
    pub studies: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Share of studies in the validation split (MURA's own is 0.082)
    #[arg(long, default_value_t = 0.2)]
    pub valid_fraction: f64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let cfg = SynthConfig {
        studies: args.studies,
        seed: args.seed,
        valid_fraction: args.valid_fraction,
    };
    let s = synth(&args.out, &cfg, Progress::Bars)?;
    crate::out!(
        "wrote {} studies ({} abnormal), {} images to {} in {:.1}s ({:.0} images/s)",
        s.studies,
        s.abnormal_studies,
        s.images,
        args.out.display(),
        s.seconds,
        s.images as f64 / s.seconds
    );
    Ok(())
}
