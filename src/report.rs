//! A training run's report: plots of `RUN_DIR/metrics.jsonl` (one JSON object per epoch with
//! `epoch`, `train_loss`, `val_loss`, `lr`, `kappa`, `kappa_by_type`, ...) and of
//! `RUN_DIR/val_predictions.csv` (header `study,type,label,probability`: the best checkpoint's
//! validation predictions) into `RUN_DIR/report/`.

use crate::disk::owned::{self, Made};
use crate::disk::{read_regular_string, MAX_TEXT_BYTES};
use crate::metrics::{auroc, roc_curve};
use crate::plot::{plot_kappa, plot_loss, plot_roc, EpochRecord, RocCurve};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// The epochs of a `metrics.jsonl`, in file order.
pub fn read_metrics_jsonl(path: &Path) -> Result<Vec<EpochRecord>> {
    let text = read_regular_string(path, MAX_TEXT_BYTES)?;
    let mut epochs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let rec: EpochRecord = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not an epoch record", path.display(), i + 1))?;
        epochs.push(rec);
    }
    if epochs.is_empty() {
        bail!("{} has no epochs yet", path.display());
    }
    Ok(epochs)
}

/// ROC curves per study type, then overall, from a `val_predictions.csv`.
pub fn read_roc_curves(path: &Path) -> Result<Vec<RocCurve>> {
    let text = read_regular_string(path, MAX_TEXT_BYTES)?;
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, h)) if h.trim() == "study,type,label,probability" => {}
        _ => bail!(
            "{}: expected the header 'study,type,label,probability'",
            path.display()
        ),
    }
    let mut groups: BTreeMap<String, (Vec<bool>, Vec<f64>)> = BTreeMap::new();
    let mut all = (Vec::new(), Vec::new());
    for (i, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let bad = || {
            format!(
                "{} line {}: expected 'study,type,label(0|1),probability', got '{line}'",
                path.display(),
                i + 1
            )
        };
        let f: Vec<&str> = line.trim().rsplitn(4, ',').collect();
        let [p, label, ty, _study] = f[..] else {
            bail!(bad())
        };
        let y = match label {
            "0" => false,
            "1" => true,
            _ => bail!(bad()),
        };
        let p: f64 = p
            .parse()
            .ok()
            .filter(|p: &f64| p.is_finite())
            .with_context(bad)?;
        let g = groups.entry(ty.to_string()).or_default();
        g.0.push(y);
        g.1.push(p);
        all.0.push(y);
        all.1.push(p);
    }
    let groups = groups.into_iter().chain([("overall".to_string(), all)]);
    Ok(groups
        .map(|(name, (y, p))| RocCurve {
            name,
            points: roc_curve(&y, &p),
            auroc: auroc(&y, &p),
        })
        .collect())
}

/// The plots a report folder holds.
const PLOTS: [&str; 3] = ["loss.png", "kappa.png", "roc.png"];

/// Whether `dir` is a report folder of an earlier mura (no marker): nothing but its plots.
fn is_earlier_report(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().all(|e| {
            let name = e.file_name();
            name.to_str().is_some_and(|n| PLOTS.contains(&n))
        })
    })
}

/// Plots the run in `run_dir` into `run_dir/report/`: its loss and kappa curves, and the ROC curves
/// of its best checkpoint's validation predictions when it has them.
pub fn write(run_dir: &Path) -> Result<()> {
    let epochs = read_metrics_jsonl(&run_dir.join("metrics.jsonl"))?;
    let preds = run_dir.join("val_predictions.csv");
    let curves = match preds.exists() {
        true => Some(read_roc_curves(&preds)?),
        false => None,
    };
    let out = run_dir.join("report");
    // The plots are replaced together, as one folder (see `disk::owned`).
    let written = owned::replace_folder(&out, Made::Report, Some(&is_earlier_report), |dir| {
        plot_loss(&dir.join(PLOTS[0]), &epochs)?;
        plot_kappa(&dir.join(PLOTS[1]), &epochs)?;
        if let Some(curves) = &curves {
            plot_roc(&dir.join(PLOTS[2]), curves)?;
        }
        Ok(&PLOTS[..2 + usize::from(curves.is_some())])
    })?;
    if curves.is_none() {
        crate::note!("note: no {}, so no roc.png", preds.display());
    }
    crate::out!("wrote {} in {}", written.join(", "), out.display());
    Ok(())
}
