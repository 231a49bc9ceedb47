//! `mura predict`: study probabilities for folders of PNG views (or single PNGs), one JSON line per
//! study, optionally with class activation maps.
//!
//! A view is preprocessed as its checkpoint records it was in training (`Preprocess`: the store
//! image `prep` would make, then the loader's resampling to the input side), so a study predicted
//! from its files scores what `eval` gives it on a store prepped from them.

use super::arch::{self, ArchArgs};
use crate::checkpoint::Input;
use crate::data::image::decode_gray;
use crate::device::Device;
use crate::loss::sigmoid;
use crate::net::Net;
use crate::precision::Precision;
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

/// The PNG views of a study path: a folder's `*.png` files (sorted), or the file itself.
pub fn study_views(path: &Path) -> Result<Vec<PathBuf>> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut views: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("cannot read folder {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")))
        .collect();
    views.sort();
    if views.is_empty() {
        bail!("{}: study folder has no PNG views", path.display());
    }
    Ok(views)
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
        let line = predict_study(model.as_mut(), &study, &views, input, args.cam.as_deref())?;
        crate::out!("{line}");
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

/// The CAM file of view `view` (from 0) of `study`: the study path made a file name, and a
/// checksum of the path itself, so that paths made alike (`a/b` and `a_b`) stay apart.
pub fn cam_name(study: &Path, view: usize) -> String {
    let path = study.as_os_str().as_encoded_bytes();
    format!(
        "{}-{:08x}_view{}_cam.png",
        sanitize(&study.to_string_lossy()),
        crc32fast::hash(path),
        view + 1
    )
}

/// One study's JSON line (and CAM files, new in `cam_dir`), its views fed to the model as
/// `input` says. A score that is not finite (weights
/// that overflow) is an error naming the view, never a `null` probability.
pub fn predict_study(
    model: &mut dyn Net,
    study: &Path,
    views: &[PathBuf],
    input: Input,
    cam_dir: Option<&Path>,
) -> Result<serde_json::Value> {
    let size = input.image_size;
    let mut out = Vec::new();
    let mut psum = 0.0;
    for (v, path) in views.iter().enumerate() {
        let img = decode_gray(path)?;
        let x = input.preprocess.model_input(img.clone(), size);
        let (logits, feats, fh, fw) = model.forward_features(&x, 1, size, size)?;
        let z = logits[0] as f64;
        if !z.is_finite() {
            bail!(
                "the model scores {} as {z}: its weights overflow on this image",
                path.display()
            );
        }
        if let Some(dir) = cam_dir {
            let (w, _) = model.classifier()?;
            let c = w.len();
            let cam: Vec<f32> = (0..fh * fw)
                .map(|p| (0..c).map(|k| w[k] * feats[p * c + k]).sum())
                .collect();
            let path = dir.join(cam_name(study, v));
            crate::cam::write_cam_png(&img.data, img.width, img.height, &cam, fw, fh, &path)?;
        }
        psum += sigmoid(z);
        out.push(serde_json::json!({
            "path": path.to_string_lossy(),
            "logit": z,
            "probability": sigmoid(z),
        }));
    }
    let p = psum / views.len() as f64;
    Ok(serde_json::json!({
        "study": study.to_string_lossy(),
        "probability": p,
        "abnormal": p > 0.5,
        "views": out,
    }))
}

/// `s` as a file name: ASCII letters, digits and `-`, anything else `_`; its last 120 characters
/// (the study's end of the path) when longer.
fn sanitize(s: &str) -> String {
    let t: String = s
        .trim_matches(|c| c == '/' || c == '.')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    match t.len() {
        0 => "study".into(),
        n => t[n.saturating_sub(120)..].to_string(),
    }
}
