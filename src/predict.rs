//! Inference on image files: a study's views through a model, each view's probability and class
//! activation map, and the study's probability, the mean of its views' (the MURA paper's rule).
//!
//! A view is preprocessed as its checkpoint records it was in training (`Preprocess`: the store
//! image `prep` would make, then the loader's resampling to the input side), so a study predicted
//! from its files scores what `eval` gives it on a store prepped from them.

use crate::cam::{write_cam_png, Cam};
use crate::checkpoint::Input;
use crate::data::image::{decode_gray, GrayImage};
use crate::loss::sigmoid;
use crate::net::Net;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// One view's score and class activation map.
#[derive(Clone, Debug)]
pub struct ViewPrediction {
    pub path: PathBuf,
    pub logit: f64,
    pub probability: f64,
    /// The view as decoded (what its CAM overlays).
    pub image: GrayImage,
    pub cam: Cam,
}

/// A study's prediction: the mean of its views' probabilities.
#[derive(Clone, Debug)]
pub struct Prediction {
    pub study: PathBuf,
    pub probability: f64,
    pub views: Vec<ViewPrediction>,
}

impl Prediction {
    /// Whether the study is flagged abnormal (probability above one half).
    pub fn abnormal(&self) -> bool {
        self.probability > 0.5
    }
}

/// The views of a study path: a folder's `*.png` and `*.dcm` files (sorted), or the file itself
/// (a PNG, or DICOM by its `DICM` magic whatever its name).
pub fn study_views(path: &Path) -> Result<Vec<PathBuf>> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut views: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("cannot read folder {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(is_view_extension))
        .collect();
    views.sort();
    if views.is_empty() {
        bail!(
            "{}: study folder has no views (*.png or *.dcm)",
            path.display()
        );
    }
    Ok(views)
}

/// Whether a file name's extension is a view's: `png` or `dcm`, any case.
pub fn is_view_extension(e: &std::ffi::OsStr) -> bool {
    e.eq_ignore_ascii_case("png") || e.eq_ignore_ascii_case("dcm")
}

/// Study `study`'s prediction from its `views`, fed to the model as `input` says. A score that is
/// not finite (weights that overflow) is an error naming the view, never a NaN probability.
pub fn predict_study(
    model: &mut dyn Net,
    study: &Path,
    views: &[PathBuf],
    input: Input,
) -> Result<Prediction> {
    if views.is_empty() {
        bail!("{}: a study needs at least one view", study.display());
    }
    let size = input.image_size;
    let weights = model.classifier()?.0;
    let mut scored = Vec::with_capacity(views.len());
    for path in views {
        let image = decode_gray(path)?;
        let x = input.preprocess.model_input(image.clone(), size);
        let (logits, features, fh, fw) = model.forward_features(&x, 1, size, size)?;
        let logit = logits[0] as f64;
        if !logit.is_finite() {
            bail!(
                "the model scores {} as {logit}: its weights overflow on this image",
                path.display()
            );
        }
        scored.push(ViewPrediction {
            path: path.clone(),
            logit,
            probability: sigmoid(logit),
            image,
            cam: Cam::of(&weights, &features, (fh, fw)),
        });
    }
    let probability = scored.iter().map(|v| v.probability).sum::<f64>() / views.len() as f64;
    Ok(Prediction {
        study: study.to_path_buf(),
        probability,
        views: scored,
    })
}

/// Writes each view's CAM overlay into `dir` as the new file [`cam_name`]`(study, view)`.
pub fn write_cams(dir: &Path, p: &Prediction) -> Result<()> {
    for (v, view) in p.views.iter().enumerate() {
        write_cam_png(&view.image, &view.cam, &dir.join(cam_name(&p.study, v)))?;
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
