//! Study-level prediction over a split of a store: each study's probability is the mean of its
//! views' probabilities; abnormal if > 0.5. An ensemble's is the mean of its models'; its report
//! is the MURA paper's Table 2, `predictions.csv` and `metrics.json`.

use crate::checkpoint::ArchRequest;
use crate::data::loader::{Loader, LoaderConfig};
use crate::data::store::Store;
use crate::data::{Split, StudyType};
use crate::device::Device;
use crate::disk::owned::{self, Made};
use crate::loss::LossLevel;
use crate::metrics::MetricsTable;
use crate::net::Net;
use crate::ops::Mode;
use crate::precision::Precision;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Clone, Debug)]
pub struct StudyPrediction {
    /// Store study index.
    pub study: usize,
    /// Study path as in the MURA CSVs (ending in `/`).
    pub path: String,
    pub study_type: StudyType,
    pub label: Option<u8>,
    pub probability: f64,
}

pub struct SplitPredictions {
    pub studies: Vec<StudyPrediction>,
    /// Weighted BCE over the split (same level as training); NaN when no study is labelled.
    pub loss: f64,
}

impl SplitPredictions {
    pub fn table(&self) -> MetricsTable {
        table(&self.studies)
    }
}

/// Per-type and overall metrics over the labelled studies.
pub fn table(studies: &[StudyPrediction]) -> MetricsTable {
    let labelled: Vec<&StudyPrediction> = studies.iter().filter(|p| p.label.is_some()).collect();
    let types: Vec<StudyType> = labelled.iter().map(|p| p.study_type).collect();
    let labels: Vec<bool> = labelled.iter().map(|p| p.label == Some(1)).collect();
    let probs: Vec<f64> = labelled.iter().map(|p| p.probability).collect();
    MetricsTable::new(&types, &labels, &probs)
}

/// Eval-mode predictions (no augmentation) for every study the loader yields, in store order.
/// A study split over several batches (more views than one holds) is scored once all its parts
/// are in. A score that is not finite is an error naming the image, never a metric.
pub fn predict_split(
    model: &mut dyn Net,
    store: &Store,
    loader: &Loader,
    level: LossLevel,
) -> Result<SplitPredictions> {
    let mut studies = Vec::new();
    let (mut loss_sum, mut loss_count) = (0.0, 0usize);
    // The study whose parts are coming in, and its logits so far.
    let mut parts: Option<(usize, Vec<f32>)> = None;
    // A GPU model takes the store's u8 images and resizes them on its device.
    let batches = match model.wants_raw_input() {
        true => loader.epoch_raw(0),
        false => loader.epoch(0),
    };
    for batch in batches {
        let logits = crate::net::forward_batch(model, &batch, Mode::Eval)?;
        if let Some(i) = logits.iter().position(|z| !z.is_finite()) {
            bail!(
                "the model scores {} as {}: its weights overflow on this image",
                store.images[batch.image_ids[i]].path,
                logits[i]
            );
        }
        if !batch.whole {
            let study = batch.studies[0];
            let so_far = match parts.take() {
                Some((s, mut z)) if s == study => {
                    z.extend(&logits);
                    z
                }
                _ => logits,
            };
            if so_far.len() < loader.views(study) {
                parts = Some((study, so_far));
                continue;
            }
            let (p, loss) = study_score(store, study, &so_far, level);
            studies.push(p);
            if let Some((loss, n)) = loss {
                loss_sum += loss * n as f64;
                loss_count += n;
            }
            continue;
        }
        let mut sum = vec![0.0f64; batch.studies.len()];
        let mut cnt = vec![0usize; batch.studies.len()];
        for (i, &z) in logits.iter().enumerate() {
            sum[batch.view_study[i]] += 1.0 / (1.0 + (-(z as f64)).exp());
            cnt[batch.view_study[i]] += 1;
        }
        if batch
            .studies
            .iter()
            .all(|&i| store.studies[i].label.is_some())
        {
            let (loss, _) = crate::loss::batch_loss(store, &batch, &logits, level);
            let n = match level {
                LossLevel::Study => batch.studies.len(),
                LossLevel::Image => batch.n_images,
            };
            loss_sum += loss * n as f64;
            loss_count += n;
        }
        for (j, &si) in batch.studies.iter().enumerate() {
            studies.push(prediction(store, si, sum[j] / cnt[j].max(1) as f64));
        }
    }
    studies.sort_by_key(|p| p.study);
    Ok(SplitPredictions {
        studies,
        loss: if loss_count > 0 {
            loss_sum / loss_count as f64
        } else {
            f64::NAN
        },
    })
}

/// The store study `si`'s prediction of `probability`.
fn prediction(store: &Store, si: usize, probability: f64) -> StudyPrediction {
    let rec = &store.studies[si];
    StudyPrediction {
        study: si,
        path: rec.path.clone(),
        study_type: rec.study_type,
        label: rec.label,
        probability,
    }
}

/// A study scored from all its views' `logits`, gathered from several batches: its prediction,
/// and, if it is labelled, its loss and what that loss counts for (one study, or its views).
fn study_score(
    store: &Store,
    si: usize,
    logits: &[f32],
    level: LossLevel,
) -> (StudyPrediction, Option<(f64, usize)>) {
    let z: Vec<f64> = logits.iter().map(|&v| v as f64).collect();
    let p = z.iter().map(|&z| crate::loss::sigmoid(z)).sum::<f64>() / z.len() as f64;
    let rec = &store.studies[si];
    let loss = rec.label.map(|y| {
        let (w0, w1) = store.loss_weights(rec.study_type);
        let w = [(w0 as f64, w1 as f64)];
        let views = vec![0; z.len()];
        let (loss, _) = crate::loss::weighted_bce(&z, &views, &[f64::from(y)], &w, level);
        let n = match level {
            LossLevel::Study => 1,
            LossLevel::Image => z.len(),
        };
        (loss, n)
    });
    (prediction(store, si, p), loss)
}

/// What an evaluation scores, and where: the studies of `split` of the given types, the models at
/// `image_size` (none: the one a checkpoint records, else 224), `batch` studies at a time.
#[derive(Clone, Debug)]
pub struct EvalConfig {
    pub split: Split,
    pub study_types: Vec<StudyType>,
    pub image_size: Option<usize>,
    pub device: Device,
    pub precision: Precision,
    pub batch: usize,
}

/// Each study's mean probability over the models of `checkpoints` (one checkpoint is itself), in
/// store order. No study of the split and types is an error.
pub fn ensemble(
    store: &Arc<Store>,
    checkpoints: &[PathBuf],
    arch: &ArchRequest,
    cfg: &EvalConfig,
) -> Result<Vec<StudyPrediction>> {
    let mut sum: Option<Vec<StudyPrediction>> = None;
    for ck in checkpoints {
        let preds = predict_checkpoint(store, ck, arch, cfg)?;
        sum = Some(match sum {
            None => preds,
            Some(mut acc) => {
                for (a, p) in acc.iter_mut().zip(&preds) {
                    a.probability += p.probability;
                }
                acc
            }
        });
    }
    let mut preds = sum.context("no checkpoint given")?;
    let k = checkpoints.len() as f64;
    for p in &mut preds {
        p.probability /= k;
    }
    if preds.is_empty() {
        bail!(
            "the store has no {} studies of the selected types",
            cfg.split
        );
    }
    Ok(preds)
}

/// One checkpoint's predictions over the split (with a note when it was trained on images stored
/// at another size than the store's).
fn predict_checkpoint(
    store: &Arc<Store>,
    ck: &Path,
    arch: &ArchRequest,
    cfg: &EvalConfig,
) -> Result<Vec<StudyPrediction>> {
    let loaded = crate::checkpoint::load_model_for(ck, arch)?;
    let size = cfg.image_size.or(loaded.image_size).unwrap_or(224);
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
    let mut model =
        crate::backend::build(cfg.device, cfg.precision, spec, Some(&loaded.weights), 0)?;
    let loader = Loader::new(
        store.clone(),
        cfg.split,
        &cfg.study_types,
        LoaderConfig {
            batch_studies: cfg.batch,
            max_views: None,
            image_size: size,
            augment: None,
            seed: 0,
            shuffle: false,
            workers: 2,
            prefetch: 2,
        },
    )?;
    let preds = predict_split(model.as_mut(), store, &loader, LossLevel::Study)?;
    Ok(preds.studies)
}

/// Prints the metrics table of `preds` (or that no study is labelled) and, with `out`, writes
/// `predictions.csv` (the official scorer's format) and, for labelled studies, `metrics.json`.
pub fn report(preds: &[StudyPrediction], out: Option<&Path>) -> Result<()> {
    let labelled = preds.iter().any(|p| p.label.is_some());
    let table = labelled.then(|| table(preds));
    match &table {
        None => crate::out!("no labelled studies in this split: predictions only"),
        Some(t) => crate::out::block(&t.to_string()),
    }
    if let Some(dir) = out {
        write_outputs(dir, preds, table.as_ref())?;
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
