//! `mura predict`: study probabilities for folders of PNG views (or single PNGs), one JSON line per
//! study, optionally with class activation maps.

use super::arch::{self, ArchArgs};
use crate::data::image::{decode_gray, normalize_to_input, resize_bilinear, GrayImage};
use crate::device::Device;
use crate::loss::sigmoid;
use crate::net::Net;
use crate::precision::Precision;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub arch: ArchArgs,
    /// Model weights (safetensors with torchvision names, e.g. a run's best.safetensors)
    #[arg(long)]
    pub weights: PathBuf,
    /// Model input side (default: the one a mura checkpoint was trained at, else 224)
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Write a CAM overlay PNG per view into this folder
    #[arg(long, value_parser = super::count(crate::bounds::SIDE))]
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

/// Decode, resize and normalise one view into the model's input `[s, s, 3]`.
pub fn prepare_view(img: &GrayImage, size: usize) -> Vec<f32> {
    let resized = resize_bilinear(img.clone(), size);
    let mut x = vec![0.0f32; size * size * 3];
    normalize_to_input(&resized.data, &mut x);
    x
}

pub fn run(args: Args) -> Result<()> {
    if let Some(s) = args.image_size {
        crate::data::image::check_side("--image-size", s)?;
    }
    let (spec, sd) = arch::load_model(&args.weights, &args.arch)?;
    let size = match args.image_size {
        Some(s) => s,
        None => crate::checkpoint::read_image_size(&args.weights)?.unwrap_or(224),
    };
    let mut model = crate::backend::build(args.device, args.precision, spec, Some(&sd), 0)?;
    if let Some(dir) = &args.cam {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // Check every path before any work, so a typo fails fast.
    let studies: Vec<(PathBuf, Vec<PathBuf>)> = args
        .paths
        .iter()
        .map(|p| study_views(p).map(|v| (p.clone(), v)))
        .collect::<Result<_>>()?;
    for (study, views) in studies {
        let line = predict_study(model.as_mut(), &study, &views, size, args.cam.as_deref())?;
        crate::out!("{line}");
    }
    Ok(())
}

/// One study's JSON line (and CAM files).
pub fn predict_study(
    model: &mut dyn Net,
    study: &Path,
    views: &[PathBuf],
    size: usize,
    cam_dir: Option<&Path>,
) -> Result<serde_json::Value> {
    let mut out = Vec::new();
    let mut psum = 0.0;
    for (v, path) in views.iter().enumerate() {
        let img = decode_gray(path)?;
        let x = prepare_view(&img, size);
        let (logits, feats, fh, fw) = model.forward_features(&x, 1, size, size)?;
        let z = logits[0] as f64;
        if let Some(dir) = cam_dir {
            let (w, _) = model.classifier()?;
            let c = w.len();
            let cam: Vec<f32> = (0..fh * fw)
                .map(|p| (0..c).map(|k| w[k] * feats[p * c + k]).sum())
                .collect();
            let name = format!(
                "{}_view{}_cam.png",
                sanitize(&study.to_string_lossy()),
                v + 1
            );
            crate::cam::write_cam_png(
                &img.data,
                img.width,
                img.height,
                &cam,
                fw,
                fh,
                &dir.join(name),
            )?;
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
    if t.is_empty() {
        "study".into()
    } else {
        t
    }
}
