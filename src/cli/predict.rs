//! `mura predict`: study probabilities for folders of PNG views (or single PNGs), one JSON line per
//! study, optionally with class activation maps (`crate::predict`).

use super::arch::{self, ArchArgs};
use crate::checkpoint::Input;
use crate::device::Device;
use crate::precision::Precision;
use crate::predict::{cam_name, predict_study, study_views, write_cams, Prediction};
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub arch: ArchArgs,
    /// Model weights (safetensors with torchvision names, e.g. a run's best.safetensors)
    #[arg(long)]
    pub weights: PathBuf,
    /// Model input side (default: the one a mura checkpoint was trained at, else 224)
    #[arg(long, value_parser = super::count(crate::bounds::SIDE))]
    pub image_size: Option<usize>,
    /// Write a CAM overlay PNG per view into this folder
    #[arg(long)]
    pub cam: Option<PathBuf>,
    /// cpu | cuda[:N] | emu | auto
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// f32 | bf16 (GPU backends)
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
    /// Study folders (all their PNG views) or single PNG files (one-view studies)
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let loaded = arch::load_model(&args.weights, &args.arch)?;
    let size = args.image_size.or(loaded.image_size).unwrap_or(224);
    let (preprocess, note) = loaded.preprocess_for(&args.weights, size);
    let spec = loaded.spec.clone();
    let mut model =
        crate::backend::build(args.device, args.precision, spec, Some(&loaded.weights), 0)?;
    // Check every path, and every CAM file name, before any work, so a typo fails fast.
    let studies: Vec<(PathBuf, Vec<PathBuf>)> = args
        .paths
        .iter()
        .map(|p| study_views(p).map(|v| (p.clone(), v)))
        .collect::<Result<_>>()?;
    if let Some(dir) = &args.cam {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        check_cam_names(dir, &studies)?;
    }
    if let Some(note) = note {
        crate::note!("{note}");
    }
    let input = Input {
        preprocess,
        image_size: size,
    };
    for (study, views) in studies {
        let p = predict_study(model.as_mut(), &study, &views, input)?;
        if let Some(dir) = &args.cam {
            write_cams(dir, &p)?;
        }
        crate::out!("{}", json_line(&p));
    }
    Ok(())
}

/// Refuses CAM files that would not be new and unique: two views given the same name (a study
/// given twice), or a name that exists in `dir` (from an earlier run, or not mura's at all).
fn check_cam_names(dir: &Path, studies: &[(PathBuf, Vec<PathBuf>)]) -> Result<()> {
    let mut seen: HashMap<String, &Path> = HashMap::new();
    for (study, views) in studies {
        for v in 0..views.len() {
            let name = cam_name(study, v);
            if let Some(first) = seen.insert(name.clone(), study) {
                bail!(
                    "{} and {} would write the same CAM file {name} (a study given twice?)",
                    first.display(),
                    study.display()
                );
            }
            let path = dir.join(&name);
            if path.symlink_metadata().is_ok() {
                bail!(
                    "{} already exists; refusing to replace it: pass an empty or new --cam folder",
                    path.display()
                );
            }
        }
    }
    Ok(())
}

/// A study's JSON line: its probability and verdict, and each view's logit and probability.
fn json_line(p: &Prediction) -> serde_json::Value {
    let views: Vec<serde_json::Value> = p
        .views
        .iter()
        .map(|v| {
            serde_json::json!({
                "path": v.path.to_string_lossy(),
                "logit": v.logit,
                "probability": v.probability,
            })
        })
        .collect();
    serde_json::json!({
        "study": p.study.to_string_lossy(),
        "probability": p.probability,
        "abnormal": p.abnormal(),
        "views": views,
    })
}
