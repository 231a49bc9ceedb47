//! `mura eval`: evaluate one checkpoint or an ensemble (mean of probabilities) on a split of a store,
//! print a table like the MURA paper's Table 2, write `predictions.csv` (official scorer format) and
//! `metrics.json`.

use super::arch::ArchArgs;
use crate::data::store::Store;
use crate::data::{Split, StudyType};
use crate::device::Device;
use crate::disk::owned::{self, Made};
use crate::eval::{ensemble, report, EvalConfig};
use crate::precision::Precision;
use anyhow::Result;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long)]
    pub store: PathBuf,
    /// One or more model checkpoints (safetensors); several are ensembled. mura's record their
    /// architecture; others (torchvision names) load as --arch
    #[arg(long, num_args = 1.., required = true)]
    pub checkpoint: Vec<PathBuf>,
    #[command(flatten)]
    pub arch: ArchArgs,
    /// train | valid
    #[arg(long, default_value = "valid")]
    pub split: Split,
    /// Study types to evaluate (default: all in the store)
    #[arg(long, value_delimiter = ',')]
    pub study_types: Vec<StudyType>,
    /// Model input side (default: the one the checkpoint was trained at, else 224)
    #[arg(long, value_parser = super::count(crate::bounds::SIDE))]
    pub image_size: Option<usize>,
    /// Folder for predictions.csv and metrics.json
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// cpu | cuda[:N] | emu | auto
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// f32 | bf16 (GPU backends)
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
    #[arg(long, default_value_t = 8, value_parser = super::count(crate::bounds::BATCH))]
    pub batch: usize,
}

pub fn run(args: Args) -> Result<()> {
    let study_types = match args.study_types.is_empty() {
        true => StudyType::ALL.to_vec(),
        false => args.study_types.clone(),
    };
    if let Some(dir) = &args.out {
        owned::check_replace(dir, Made::Eval, None)?;
    }
    let cfg = EvalConfig {
        split: args.split,
        study_types,
        image_size: args.image_size,
        device: args.device,
        precision: args.precision,
        batch: args.batch,
    };
    let store = Arc::new(Store::open(&args.store)?);
    let preds = ensemble(&store, &args.checkpoint, &args.arch.request()?, &cfg)?;
    report(&preds, args.out.as_deref())
}
