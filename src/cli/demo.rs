//! `mura demo`: the whole pipeline on a built-in synthetic MURA-like set — synthesise, prep, train
//! a small DenseNet, evaluate (per-type kappa table), CAMs for a normal and an abnormal study, plots.

use crate::checkpoint::{ArchRequest, Input};
use crate::data::prep::{prep, PrepConfig};
use crate::data::store::Store;
use crate::data::synth::{synth, SynthConfig};
use crate::data::{Split, StudyType};
use crate::device::Device;
use crate::disk::owned::{self, Made};
use crate::eval::{self, EvalConfig};
use crate::loss::LossLevel;
use crate::out::Progress;
use crate::precision::Precision;
use crate::predict;
use crate::spec::DenseNetSpec;
use crate::train::{self, Init, TrainConfig};
use anyhow::Result;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Work folder (created; a previous demo there is replaced)
    #[arg(long, default_value = "mura-demo")]
    pub dir: PathBuf,
    /// cpu | cuda[:N] | emu | auto (cuda if present, else cpu)
    #[arg(long, default_value = "auto")]
    pub device: Device,
    /// Synthetic studies (train + valid)
    #[arg(long, default_value_t = 1200, value_parser = super::count(crate::bounds::STUDIES))]
    pub studies: usize,
    #[arg(long, default_value_t = 16, value_parser = super::count(crate::bounds::EPOCHS))]
    pub epochs: usize,
    /// Side of the stored and model images
    #[arg(long, default_value_t = 64, value_parser = super::count(crate::bounds::SIDE))]
    pub image_size: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Makes `dir` an empty demo folder, refusing to clear anything that a demo did not make: an
/// earlier demo's folder (marked as one, see `disk::owned`) is replaced by an empty marked one in
/// one rename, so that an interrupted demo leaves a folder the next one may clear.
fn fresh_dir(dir: &Path) -> Result<()> {
    owned::replace_folder(dir, Made::Demo, None, |_| Ok(()))
}

/// The small DenseNet the demo trains: same structure as DenseNet-169, fewer and narrower layers.
pub fn demo_spec() -> DenseNetSpec {
    DenseNetSpec::custom(12, vec![3, 6, 4], 24, 4).expect("valid spec")
}

/// The demo's folders, under its work folder.
struct Paths {
    data: PathBuf,
    store: PathBuf,
    run: PathBuf,
    eval: PathBuf,
    cam: PathBuf,
}

impl Paths {
    fn under(dir: &Path) -> Paths {
        Paths {
            data: dir.join("data"),
            store: dir.join("store"),
            run: dir.join("run"),
            eval: dir.join("eval"),
            cam: dir.join("cam"),
        }
    }
    fn best(&self) -> PathBuf {
        self.run.join("best.safetensors")
    }
}

/// The training the demo runs (checked before anything is written).
fn train_config(args: &Args, device: Device, paths: &Paths) -> Result<TrainConfig> {
    let cfg = TrainConfig {
        store: paths.store.clone(),
        out: paths.run.clone(),
        spec: demo_spec(),
        init: Init::Random,
        epochs: args.epochs,
        batch: 8,
        lr: 1e-3,
        weight_decay: 0.0,
        patience: 1,
        loss: LossLevel::Study,
        study_types: StudyType::ALL.to_vec(),
        image_size: args.image_size,
        max_rotation_deg: 10.0,
        max_views: None,
        seed: args.seed,
        device,
        precision: Precision::F32,
        workers: 2,
        max_batches: None,
    };
    cfg.validate()?;
    crate::model::DenseNet::<f32>::new(cfg.spec.clone(), 0)
        .feature_hw(args.image_size, args.image_size)?;
    crate::bounds::STUDIES.check("--studies", args.studies)?;
    Ok(cfg)
}

pub fn run(args: Args) -> Result<()> {
    let t0 = Instant::now();
    // Every setting is checked before anything is written or the first minute is spent.
    let device = crate::gpu::resolve(args.device)?;
    let paths = Paths::under(&args.dir);
    let cfg = train_config(&args, device, &paths)?;
    fresh_dir(&args.dir)?;
    synthesise(&args, &paths)?;
    prep_store(&args, &paths)?;
    train_model(cfg, device)?;
    evaluate(&args, device, &paths)?;
    class_maps(&args, device, &paths)?;
    crate::out!("6/6 plotting the run");
    crate::report::write(&paths.run)?;
    summary(t0, &paths);
    Ok(())
}

/// 1/6: the synthetic MURA-like set.
fn synthesise(args: &Args, paths: &Paths) -> Result<()> {
    crate::out!(
        "1/6 synthesising {} MURA-like studies in {}",
        args.studies,
        paths.data.display()
    );
    let cfg = SynthConfig {
        studies: args.studies,
        seed: args.seed,
        valid_fraction: 0.2,
    };
    let s = synth(&paths.data, &cfg, Progress::Bars)?;
    crate::out!(
        "    {} studies ({} abnormal), {} images",
        s.studies,
        s.abnormal_studies,
        s.images
    );
    Ok(())
}

/// 2/6: its store.
fn prep_store(args: &Args, paths: &Paths) -> Result<()> {
    crate::out!(
        "2/6 prepping a {0}x{0} store in {1}",
        args.image_size,
        paths.store.display()
    );
    prep(&PrepConfig {
        mura_root: paths.data.clone(),
        out: paths.store.clone(),
        size: args.image_size,
        study_types: StudyType::ALL.to_vec(),
        strict: false,
        progress: Progress::Bars,
    })?;
    Ok(())
}

/// 3/6: the training run.
fn train_model(cfg: TrainConfig, device: Device) -> Result<()> {
    let spec = &cfg.spec;
    crate::out!(
        "3/6 training a DenseNet (growth {}, blocks {:?}, {} parameters) on {device} for {} epochs",
        spec.growth_rate,
        spec.block_config,
        spec.num_params(),
        cfg.epochs
    );
    train::train(cfg, Progress::Bars)?;
    Ok(())
}

/// 4/6: the best checkpoint's table on the validation split, and its predictions and metrics.
fn evaluate(args: &Args, device: Device, paths: &Paths) -> Result<()> {
    crate::out!("4/6 evaluating the best checkpoint on the validation split");
    owned::check_replace(&paths.eval, Made::Eval, None)?;
    let cfg = EvalConfig {
        split: Split::Valid,
        study_types: StudyType::ALL.to_vec(),
        image_size: Some(args.image_size),
        device,
        precision: Precision::F32,
        batch: 8,
    };
    let store = Arc::new(Store::open(&paths.store)?);
    let arch = ArchRequest::Default(DenseNetSpec::preset("densenet169")?);
    let preds = eval::ensemble(&store, &[paths.best()], &arch, &cfg)?;
    eval::report(&preds, Some(&paths.eval))
}

/// 5/6: CAMs of the first abnormal and the first normal validation study.
fn class_maps(args: &Args, device: Device, paths: &Paths) -> Result<()> {
    crate::out!("5/6 class activation maps for one abnormal and one normal validation study");
    std::fs::create_dir_all(&paths.cam)?;
    let store = Store::open(&paths.store)?;
    let best = paths.best();
    let loaded = crate::checkpoint::load_model(&best, None)?;
    let input = Input {
        preprocess: loaded.preprocess_for(&best, args.image_size).0,
        image_size: args.image_size,
    };
    let spec = loaded.spec.clone();
    let mut model = crate::backend::build(device, Precision::F32, spec, Some(&loaded.weights), 0)?;
    for (label, verdict) in [(1u8, "abnormal"), (0, "normal")] {
        let first = store
            .studies
            .iter()
            .find(|s| s.split == Split::Valid && s.label == Some(label));
        let Some(st) = first else {
            continue;
        };
        let folder = paths.data.join(&st.path);
        let views = predict::study_views(&folder)?;
        let p = predict::predict_study(model.as_mut(), &folder, &views, input)?;
        predict::write_cams(&paths.cam, &p)?;
        crate::out!(
            "    {} ({verdict}): p(abnormal) = {:.3}",
            st.path,
            p.probability
        );
    }
    Ok(())
}

/// Where everything went.
fn summary(t0: Instant, paths: &Paths) {
    crate::out!();
    crate::out!("done in {:.0} s", t0.elapsed().as_secs_f64());
    crate::out!("  checkpoint   {}", paths.best().display());
    crate::out!(
        "  metrics      {}",
        paths.eval.join("metrics.json").display()
    );
    crate::out!(
        "  predictions  {}",
        paths.eval.join("predictions.csv").display()
    );
    crate::out!("  CAM images   {}", paths.cam.display());
    crate::out!("  plots        {}", paths.run.join("report").display());
}
