//! `mura score`: score a predictions CSV against labelled studies as MURA's official
//! evaluation does (study type from the path, Cohen's kappa per type and overall).

use crate::data::StudyType;
use crate::disk::{read_regular_string, MAX_TEXT_BYTES};
use crate::metrics::MetricsTable;
use anyhow::{bail, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Labelled studies, e.g. MURA-v1.1/valid_labeled_studies.csv (`study_path,label`, no header)
    #[arg(long)]
    pub labels: PathBuf,
    /// Predictions in the same format (`study_path,0|1`, no header)
    #[arg(long)]
    pub predictions: PathBuf,
    /// Print one JSON object instead of a table
    #[arg(long)]
    pub json: bool,
}

/// Rows of a `study_path,label` file, in file order: (study path, label).
/// Blank lines are skipped; anything else that is not `path,0` or `path,1` is an error naming
/// the line, as is a path without an `XR_...` study type or a repeated study.
pub fn read_study_csv(path: &Path) -> Result<Vec<(String, bool)>> {
    let text = read_regular_string(path, MAX_TEXT_BYTES)?;
    parse_study_csv(&text, &path.display().to_string())
}

/// [`read_study_csv`] of the text of the file `name`.
pub fn parse_study_csv(text: &str, name: &str) -> Result<Vec<(String, bool)>> {
    let mut rows = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let (no, line) = (i + 1, line.trim());
        if line.is_empty() {
            continue;
        }
        let where_ = || format!("{name} line {no}");
        let (study, label) = match line.rsplit_once(',') {
            Some((s, l)) if !s.trim().is_empty() => (s.trim(), l.trim()),
            _ => bail!("{}: expected 'study_path,label', got '{line}'", where_()),
        };
        let label = match label {
            "0" => false,
            "1" => true,
            _ => bail!("{}: label must be 0 or 1, got '{label}'", where_()),
        };
        if StudyType::of_path(study).is_none() {
            bail!(
                "{}: no study type (an XR_... folder) in path '{study}'",
                where_()
            );
        }
        if let Some(first) = seen.insert(study_key(study).to_string(), no) {
            bail!("{}: study '{study}' repeats line {first}", where_());
        }
        rows.push((study.to_string(), label));
    }
    Ok(rows)
}

/// Paths match with or without their trailing '/'.
fn study_key(study: &str) -> &str {
    study.trim_end_matches('/')
}

/// Per-type and overall metrics of `predictions` against `labels`; every labelled study must
/// have exactly one prediction and every prediction a label.
pub fn score(labels: &[(String, bool)], predictions: &[(String, bool)]) -> Result<MetricsTable> {
    let predicted: HashMap<&str, bool> = predictions
        .iter()
        .map(|(s, p)| (study_key(s), *p))
        .collect();
    let missing: Vec<&str> = labels
        .iter()
        .map(|(s, _)| s.as_str())
        .filter(|s| !predicted.contains_key(study_key(s)))
        .collect();
    if let Some(first) = missing.first() {
        bail!(
            "{} labelled studies have no prediction, e.g. '{first}'",
            missing.len()
        );
    }
    let labelled: HashMap<&str, bool> = labels.iter().map(|(s, y)| (study_key(s), *y)).collect();
    let extra: Vec<&str> = predictions
        .iter()
        .map(|(s, _)| s.as_str())
        .filter(|s| !labelled.contains_key(study_key(s)))
        .collect();
    if let Some(first) = extra.first() {
        bail!(
            "{} predictions are for studies without a label, e.g. '{first}'",
            extra.len()
        );
    }
    let types: Vec<StudyType> = labels
        .iter()
        .map(|(s, _)| StudyType::of_path(s).expect("checked when read"))
        .collect();
    let y: Vec<bool> = labels.iter().map(|(_, y)| *y).collect();
    let p: Vec<f64> = labels
        .iter()
        .map(|(s, _)| if predicted[study_key(s)] { 1.0 } else { 0.0 })
        .collect();
    Ok(MetricsTable::new(&types, &y, &p))
}

pub fn run(args: Args) -> Result<()> {
    let labels = read_study_csv(&args.labels)?;
    let predictions = read_study_csv(&args.predictions)?;
    if labels.is_empty() {
        bail!("{} has no studies", args.labels.display());
    }
    let table = score(&labels, &predictions)?;
    let row = |m: &crate::metrics::BinaryMetrics| serde_json::json!({"kappa": m.kappa, "accuracy": m.accuracy, "n": m.n});
    if args.json {
        let by_type: serde_json::Map<String, serde_json::Value> = table
            .by_type
            .iter()
            .map(|(t, m)| (t.name().to_string(), row(m)))
            .collect();
        crate::out!(
            "{}",
            serde_json::json!({"overall": row(&table.overall), "by_type": by_type})
        );
    } else {
        crate::out!("{:<12} {:>6} {:>7} {:>9}", "type", "n", "kappa", "accuracy");
        let rows = table.by_type.iter().map(|(t, m)| (t.name(), m));
        for (name, m) in rows.chain([("overall", &table.overall)]) {
            let kappa = if m.kappa.is_finite() {
                format!("{:.3}", m.kappa)
            } else {
                "n/a".into()
            };
            crate::out!("{:<12} {:>6} {:>7} {:>9.3}", name, m.n, kappa, m.accuracy);
        }
    }
    Ok(())
}
