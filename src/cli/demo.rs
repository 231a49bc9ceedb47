//! `mura demo`: the whole pipeline on a built-in synthetic MURA-like set — synthesise, prep, train
//! a small DenseNet, evaluate (per-type kappa table), CAMs for a normal and an abnormal study, plots.

use crate::data::prep::{prep, PrepConfig};
use crate::data::store::Store;
use crate::data::synth::{synth, SynthConfig};
use crate::data::{Split, StudyType};
use crate::device::Device;
use crate::disk::owned::{self, Made};
use crate::loss::LossLevel;
use crate::precision::Precision;
use crate::spec::DenseNetSpec;
use crate::train::{self, Init, TrainConfig};
use anyhow::Result;
use std::path::{Path, PathBuf};
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

pub fn run(args: Args) -> Result<()> {
    let t0 = Instant::now();
    let dir = &args.dir;
    // Every setting is checked before anything is written or the first minute is spent.
    let device = crate::gpu::resolve(args.device)?;
    let spec = demo_spec();
    let store_dir = dir.join("store");
    let run_dir = dir.join("run");
    let cfg = TrainConfig {
        store: store_dir.clone(),
        out: run_dir.clone(),
        spec: spec.clone(),
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
    crate::model::DenseNet::<f32>::new(spec.clone(), 0)
        .feature_hw(args.image_size, args.image_size)?;
    crate::bounds::STUDIES.check("--studies", args.studies)?;
    fresh_dir(dir)?;
    let data = dir.join("data");

    crate::out!(
        "1/6 synthesising {} MURA-like studies in {}",
        args.studies,
        data.display()
    );
    let s = synth(
        &data,
        &SynthConfig {
            studies: args.studies,
            seed: args.seed,
            valid_fraction: 0.2,
        },
        true,
    )?;
    crate::out!(
        "    {} studies ({} abnormal), {} images",
        s.studies,
        s.abnormal_studies,
        s.images
    );

    crate::out!(
        "2/6 prepping a {0}x{0} store in {1}",
        args.image_size,
        store_dir.display()
    );
    prep(&PrepConfig {
        mura_root: data.clone(),
        out: store_dir.clone(),
        size: args.image_size,
        study_types: StudyType::ALL.to_vec(),
        strict: false,
        progress: true,
    })?;

    crate::out!(
        "3/6 training a DenseNet (growth {}, blocks {:?}, {} parameters) on {device} for {} epochs",
        spec.growth_rate,
        spec.block_config,
        spec.num_params(),
        args.epochs
    );
    train::train(cfg, false)?;
    let best = run_dir.join("best.safetensors");

    crate::out!("4/6 evaluating the best checkpoint on the validation split");
    let eval_dir = dir.join("eval");
    super::eval::run(super::eval::Args {
        store: store_dir.clone(),
        checkpoint: vec![best.clone()],
        arch: Default::default(),
        split: Split::Valid,
        study_types: vec![],
        image_size: Some(args.image_size),
        out: Some(eval_dir.clone()),
        device,
        precision: Precision::F32,
        batch: 8,
    })?;

    crate::out!("5/6 class activation maps for one abnormal and one normal validation study");
    let cam_dir = dir.join("cam");
    std::fs::create_dir_all(&cam_dir)?;
    let store = Store::open(&store_dir)?;
    let best_model = crate::checkpoint::load_model(&best, None)?;
    let spec = best_model.spec.clone();
    let mut model =
        crate::backend::build(device, Precision::F32, spec, Some(&best_model.weights), 0)?;
    for want in [1u8, 0] {
        let Some(st) = store
            .studies
            .iter()
            .find(|s| s.split == Split::Valid && s.label == Some(want))
        else {
            continue;
        };
        let folder = data.join(&st.path);
        let views = super::predict::study_views(&folder)?;
        let input = crate::checkpoint::Input {
            preprocess: best_model.preprocess_for(&best, args.image_size).0,
            image_size: args.image_size,
        };
        let line =
            super::predict::predict_study(model.as_mut(), &folder, &views, input, Some(&cam_dir))?;
        crate::out!(
            "    {} ({}): p(abnormal) = {:.3}",
            st.path,
            if want == 1 { "abnormal" } else { "normal" },
            line["probability"].as_f64().unwrap_or(f64::NAN)
        );
    }

    crate::out!("6/6 plotting the run");
    super::report::run(super::report::Args {
        run_dir: run_dir.clone(),
    })?;

    crate::out!();
    crate::out!("done in {:.0} s", t0.elapsed().as_secs_f64());
    crate::out!("  checkpoint   {}", best.display());
    crate::out!("  metrics      {}", eval_dir.join("metrics.json").display());
    crate::out!(
        "  predictions  {}",
        eval_dir.join("predictions.csv").display()
    );
    crate::out!("  CAM images   {}", cam_dir.display());
    crate::out!("  plots        {}", run_dir.join("report").display());
    Ok(())
}
