//! `mura train`: train a DenseNet on a prepped store (or `--resume RUN_DIR`).

use super::arch::ArchArgs;
use crate::data::loader::Preset;
use crate::data::StudyType;
use crate::device::Device;
use crate::loss::LossLevel;
use crate::out::Progress;
use crate::precision::Precision;
use crate::train::{self, Init, TrainConfig};
use anyhow::{bail, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Prepped store (from `mura prep`)
    #[arg(long, required_unless_present = "resume")]
    pub store: Option<PathBuf>,
    /// Run folder for checkpoints, metrics.jsonl and predictions
    #[arg(long, required_unless_present = "resume")]
    pub out: Option<PathBuf>,
    /// Continue an interrupted or finished run in this folder with its saved settings; only what
    /// does not change what it computes may be given with it: --epochs (the new total), --store
    /// (the same store at another path), --device, --workers, --quiet
    #[arg(long, conflicts_with_all = [
        "out", "arch", "growth_rate", "block_config", "num_init_features", "bn_size",
        "init", "batch", "lr", "weight_decay", "patience", "loss", "study_types", "preset",
        "image_size", "max_views", "seed", "precision", "max_batches",
    ])]
    pub resume: Option<PathBuf>,
    #[command(flatten)]
    pub arch: ArchArgs,
    /// Initial weights: `random`, `imagenet:FILE` (torchvision .pth or .safetensors), or a mura checkpoint
    #[arg(long, default_value = "random")]
    pub init: Init,
    /// Epochs to train, 10 if not given (with --resume: the new total; default the run's own)
    #[arg(long, value_parser = super::count(crate::bounds::EPOCHS))]
    pub epochs: Option<usize>,
    /// Studies per batch
    #[arg(long, default_value_t = 8, value_parser = super::count(crate::bounds::BATCH))]
    pub batch: usize,
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Epochs without validation-loss improvement before the learning rate drops ×0.1
    #[arg(long, default_value_t = 1, value_parser = super::count(crate::bounds::PATIENCE))]
    pub patience: usize,
    /// `study`: loss on the mean of a study's view probabilities (blog); `image`: per view (paper)
    #[arg(long, default_value = "study")]
    pub loss: LossLevel,
    /// Study types to train on, e.g. XR_WRIST,XR_HAND (default: all seven)
    #[arg(long, value_delimiter = ',')]
    pub study_types: Vec<StudyType>,
    /// Augmentation preset: `blog` (224², ±10°, flips) or `paper` (320², ±30°, flips)
    #[arg(long, default_value = "blog")]
    pub preset: Preset,
    /// Model input side (default: the preset's)
    #[arg(long, value_parser = super::count(crate::bounds::SIDE))]
    pub image_size: Option<usize>,
    /// Most views taken from one study
    #[arg(long, value_parser = super::count(crate::bounds::MAX_VIEWS))]
    pub max_views: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// cpu | cuda[:N] | emu | auto (default cpu; with --resume, the run's own)
    #[arg(long)]
    pub device: Option<Device>,
    /// f32 | bf16 (GPU backends)
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
    /// Loader worker threads (default 2; with --resume, the run's own)
    #[arg(long, value_parser = super::count(crate::bounds::WORKERS))]
    pub workers: Option<usize>,
    /// Stop each epoch after this many batches (quick experiments)
    #[arg(long, value_parser = super::count(crate::bounds::MAX_BATCHES))]
    pub max_batches: Option<usize>,
    /// No progress bars
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(args: Args) -> Result<()> {
    let progress = match args.quiet {
        true => Progress::Quiet,
        false => Progress::Bars,
    };
    if let Some(dir) = &args.resume {
        let with = train::Resume {
            epochs: args.epochs,
            store: args.store.clone(),
            device: args.device,
            workers: args.workers,
        };
        return train::resume(dir, with, progress).map(|_| ());
    }
    let (Some(store), Some(out)) = (args.store.clone(), args.out.clone()) else {
        bail!("mura train needs --store and --out (or --resume RUN_DIR)");
    };
    let cfg = config(&args, store, out)?;
    train::train(cfg, progress).map(|_| ())
}

/// The run's settings from the command line (checked).
pub fn config(a: &Args, store: PathBuf, out: PathBuf) -> Result<TrainConfig> {
    let study_types = match a.study_types.is_empty() {
        true => StudyType::ALL.to_vec(),
        false => a.study_types.clone(),
    };
    let cfg = TrainConfig {
        store,
        out,
        spec: a.arch.spec()?,
        init: a.init.clone(),
        epochs: a.epochs.unwrap_or(10),
        batch: a.batch,
        lr: a.lr,
        weight_decay: a.weight_decay,
        patience: a.patience,
        loss: a.loss,
        study_types,
        image_size: a.image_size.unwrap_or(a.preset.image_size()),
        max_rotation_deg: a.preset.augment().max_rotation_deg,
        max_views: a.max_views,
        seed: a.seed,
        device: a.device.unwrap_or(Device::Cpu),
        precision: a.precision,
        workers: a.workers.unwrap_or(2),
        max_batches: a.max_batches,
    };
    cfg.validate()?;
    Ok(cfg)
}
