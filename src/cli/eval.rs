//! `mura eval`: evaluate one checkpoint or an ensemble (mean of probabilities) on a split of a store,
//! print a table like the MURA paper's Table 2, write `predictions.csv` (official scorer format) and
//! `metrics.json`.

use super::arch::{self, ArchArgs};
use crate::data::loader::{Loader, LoaderConfig};
use crate::data::store::Store;
use crate::data::{Split, StudyType};
use crate::device::Device;
use crate::disk::owned::{self, Made};
use crate::eval::{predict_split, table, StudyPrediction};
use crate::loss::LossLevel;
use crate::metrics::MetricsTable;
use crate::precision::Precision;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
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
    let (device, precision, split) = (args.device, args.precision, args.split);
    let types = match args.study_types.is_empty() {
        true => StudyType::ALL.to_vec(),
        false => args.study_types.clone(),
    };
    if let Some(dir) = &args.out {
        owned::check_replace(dir, Made::Eval, None)?;
    }
    let store = Arc::new(Store::open(&args.store)?);
    let mut ensemble: Option<Vec<StudyPrediction>> = None;
    for ck in &args.checkpoint {
        let loaded = arch::load_model(ck, &args.arch)?;
        let size = args.image_size.or(loaded.image_size).unwrap_or(224);
        if let Some(p) = loaded.preprocess.filter(|p| p.store_size != store.size) {
            crate::note!(
                "note: {} was trained on images stored at {s}x{s}, this store holds {t}x{t}: \
                 its scores here are of other inputs than in training",
                ck.display(),
                s = p.store_size,
                t = store.size
            );
        }
        let spec = loaded.spec.clone();
        let mut model = crate::backend::build(device, precision, spec, Some(&loaded.weights), 0)?;
        let loader = Loader::new(
            store.clone(),
            split,
            &types,
            LoaderConfig {
                batch_studies: args.batch,
                max_views: None,
                image_size: size,
                augment: None,
                seed: 0,
                shuffle: false,
                workers: 2,
                prefetch: 2,
            },
        )?;
        let preds = predict_split(model.as_mut(), &store, &loader, LossLevel::Study)?;
        ensemble = Some(match ensemble {
            None => preds.studies,
            Some(mut acc) => {
                for (a, p) in acc.iter_mut().zip(&preds.studies) {
                    a.probability += p.probability;
                }
                acc
            }
        });
    }
    let mut preds = ensemble.context("no checkpoint given")?;
    let k = args.checkpoint.len() as f64;
    for p in &mut preds {
        p.probability /= k;
    }
    if preds.is_empty() {
        bail!(
            "the store has no {} studies of the selected types",
            args.split
        );
    }
    let labelled = preds.iter().any(|p| p.label.is_some());
    let table = labelled.then(|| table(&preds));
    match &table {
        None => crate::out!("no labelled studies in this split: predictions only"),
        Some(t) => crate::out::block(&t.to_string()),
    }
    if let Some(dir) = &args.out {
        write_outputs(dir, &preds, table.as_ref())?;
        let json = match labelled {
            true => format!(" and {}", dir.join("metrics.json").display()),
            false => String::new(),
        };
        crate::out!("wrote {}{json}", dir.join("predictions.csv").display());
    }
    Ok(())
}

/// Writes `predictions.csv` and (for labelled studies) `metrics.json` into `dir` as one commit:
/// the folder is replaced as a whole, so a kill or a full disk leaves the previous pair or the
/// new one.
fn write_outputs(
    dir: &Path,
    preds: &[StudyPrediction],
    table: Option<&MetricsTable>,
) -> Result<()> {
    let mut csv = String::new();
    for p in preds {
        csv += &format!("{},{}\n", p.path, u8::from(p.probability > 0.5));
    }
    owned::replace_folder(dir, Made::Eval, None, |new| {
        crate::disk::write_synced(
            &new.join("predictions.csv"),
            csv.as_bytes(),
            "eval.predictions",
        )?;
        if let Some(t) = table {
            crate::disk::write_synced(
                &new.join("metrics.json"),
                serde_json::to_string_pretty(t)?.as_bytes(),
                "eval.metrics",
            )?;
        }
        Ok(())
    })
}
