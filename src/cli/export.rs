//! `mura export --onnx`: a model checkpoint as an ONNX file for deployment (see [`crate::onnx`]).

use super::arch::{self, ArchArgs};
use crate::data::StudyType;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The ONNX file to write (its name ends in .onnx; an existing one is replaced in one step)
    #[arg(long)]
    pub onnx: PathBuf,
    /// Model weights (safetensors with torchvision names, e.g. a run's best.safetensors)
    #[arg(long)]
    pub weights: PathBuf,
    #[command(flatten)]
    pub arch: ArchArgs,
    /// Model input side (default: the one a mura checkpoint was trained at, else 224)
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Study types the model is for, recorded in the file's metadata (default: all seven)
    #[arg(long, value_delimiter = ',')]
    pub study_types: Vec<StudyType>,
}

pub fn run(args: Args) -> Result<()> {
    if let Some(s) = args.image_size {
        crate::bounds::SIDE.check("--image-size", s)?;
    }
    check_output(&args.onnx, &args.weights)?;
    let loaded = arch::load_model(&args.weights, &args.arch)?;
    let (spec, sd) = (loaded.spec, loaded.weights);
    let size = args.image_size.or(loaded.image_size).unwrap_or(224);
    let mut types = match args.study_types.is_empty() {
        true => StudyType::ALL.to_vec(),
        false => args.study_types,
    };
    types.sort();
    types.dedup();
    let bytes = crate::onnx::to_onnx(&spec, &sd, size, &types)
        .with_context(|| format!("exporting {}", args.weights.display()))?;
    crate::disk::write_atomic(&args.onnx, &bytes)?;
    crate::out!(
        "wrote {} ({}, input [batch, 3, {size}, {size}], opset {}, {:.1} MB)",
        args.onnx.display(),
        spec.arch,
        crate::onnx::OPSET,
        bytes.len() as f64 / 1e6
    );
    Ok(())
}

/// Refuses an output that could be a file of another kind (its name must end in `.onnx`) or
/// the weights themselves, before anything is read or written.
fn check_output(out: &Path, weights: &Path) -> Result<()> {
    if !out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("onnx"))
    {
        bail!(
            "--onnx {}: the file's name must end in .onnx (so that no other file is replaced)",
            out.display()
        );
    }
    let same = match (std::fs::canonicalize(out), std::fs::canonicalize(weights)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        bail!("--onnx {} is the weights file itself", out.display());
    }
    Ok(())
}
