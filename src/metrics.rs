//! Binary classification metrics for study-level predictions: Cohen's kappa with its 95% CI,
//! accuracy, sensitivity, specificity, AUROC and ROC points, per study type and overall.
//!
//! Undefined values are NaN (written as `null` in JSON, `n/a` in tables): kappa when the
//! chance agreement is 1 (labels and predictions all one same class), sensitivity without
//! positives, specificity without negatives, AUROC without both classes, everything when n = 0.

use crate::data::StudyType;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// A 2×2 confusion matrix (positive = abnormal).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Confusion {
    pub tp: usize,
    pub fp: usize,
    pub tn: usize,
    pub fn_: usize,
}

impl Confusion {
    /// labels, predicted: [n]
    pub fn new(labels: &[bool], predicted: &[bool]) -> Self {
        assert_eq!(labels.len(), predicted.len());
        let mut c = Confusion::default();
        for (&y, &p) in labels.iter().zip(predicted) {
            match (y, p) {
                (true, true) => c.tp += 1,
                (false, true) => c.fp += 1,
                (false, false) => c.tn += 1,
                (true, false) => c.fn_ += 1,
            }
        }
        c
    }

    pub fn n(&self) -> usize {
        self.tp + self.fp + self.tn + self.fn_
    }

    pub fn accuracy(&self) -> f64 {
        (self.tp + self.tn) as f64 / self.n() as f64
    }

    pub fn sensitivity(&self) -> f64 {
        self.tp as f64 / (self.tp + self.fn_) as f64
    }

    pub fn specificity(&self) -> f64 {
        self.tn as f64 / (self.tn + self.fp) as f64
    }

    /// Cohen's kappa and its 95% confidence interval.
    ///
    /// κ = (po − pe) / (1 − pe), po the observed agreement, pe the agreement expected by chance
    /// from the marginals. The CI is κ ± 1.96·SE with Cohen's large-sample standard error
    /// SE = sqrt(po (1 − po) / (n (1 − pe)²)) (J. Cohen, "A coefficient of agreement for
    /// nominal scales", Educational and Psychological Measurement 20(1), 1960, eq. 9), clamped
    /// to [−1, 1]. When pe = 1 kappa is undefined: NaN, and so is its CI.
    pub fn kappa(&self) -> (f64, [f64; 2]) {
        let n = self.n() as f64;
        let po = (self.tp + self.tn) as f64 / n;
        let pred_pos = (self.tp + self.fp) as f64;
        let true_pos = (self.tp + self.fn_) as f64;
        let pe = (pred_pos * true_pos + (n - pred_pos) * (n - true_pos)) / (n * n);
        if pe >= 1.0 || n == 0.0 {
            return (f64::NAN, [f64::NAN; 2]);
        }
        let k = (po - pe) / (1.0 - pe);
        let se = (po * (1.0 - po) / (n * (1.0 - pe).powi(2))).sqrt();
        (k, [(k - 1.96 * se).max(-1.0), (k + 1.96 * se).min(1.0)])
    }
}

/// Area under the ROC curve by the Mann–Whitney statistic: the probability that a random
/// positive scores above a random negative, ties counting one half (equal to the trapezoid
/// area under [`roc_curve`]). labels, scores: [n]. NaN without both classes.
pub fn auroc(labels: &[bool], scores: &[f64]) -> f64 {
    assert_eq!(labels.len(), scores.len());
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Sum of the positives' mid-ranks (1-based), ties sharing their average rank.
    let (mut rank_sum, mut i) = (0.0, 0);
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let mid = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += mid * order[i..=j].iter().filter(|&&k| labels[k]).count() as f64;
        i = j + 1;
    }
    let pos = labels.iter().filter(|&&y| y).count() as f64;
    let neg = labels.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return f64::NAN;
    }
    (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg)
}

/// ROC curve points (false positive rate, true positive rate), from (0, 0) to (1, 1), one point
/// per distinct score threshold (tied scores move together, so the curve has diagonal steps).
/// labels, scores: [n]. Empty without both classes.
pub fn roc_curve(labels: &[bool], scores: &[f64]) -> Vec<(f64, f64)> {
    assert_eq!(labels.len(), scores.len());
    let pos = labels.iter().filter(|&&y| y).count() as f64;
    let neg = labels.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return Vec::new();
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut points = vec![(0.0, 0.0)];
    let (mut tp, mut fp) = (0.0, 0.0);
    for (k, &i) in order.iter().enumerate() {
        if labels[i] {
            tp += 1.0;
        } else {
            fp += 1.0;
        }
        if k + 1 == order.len() || scores[order[k + 1]] != scores[i] {
            points.push((fp / neg, tp / pos));
        }
    }
    points
}

/// All metrics of one group of studies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BinaryMetrics {
    pub kappa: f64,
    pub kappa_ci: [f64; 2],
    pub accuracy: f64,
    pub sensitivity: f64,
    pub specificity: f64,
    pub auroc: f64,
    pub n: usize,
}

impl BinaryMetrics {
    /// labels: [n] (true = abnormal); probs: [n] study probabilities, abnormal if > 0.5.
    pub fn new(labels: &[bool], probs: &[f64]) -> Self {
        let predicted: Vec<bool> = probs.iter().map(|&p| p > 0.5).collect();
        let c = Confusion::new(labels, &predicted);
        let (kappa, kappa_ci) = c.kappa();
        BinaryMetrics {
            kappa,
            kappa_ci,
            accuracy: c.accuracy(),
            sensitivity: c.sensitivity(),
            specificity: c.specificity(),
            auroc: auroc(labels, probs),
            n: c.n(),
        }
    }
}

/// Metrics per study type and overall: the shape of `metrics.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricsTable {
    pub overall: BinaryMetrics,
    pub by_type: BTreeMap<StudyType, BinaryMetrics>,
}

impl MetricsTable {
    /// types, labels, probs: [n_studies], one entry per study.
    pub fn new(types: &[StudyType], labels: &[bool], probs: &[f64]) -> Self {
        assert!(types.len() == labels.len() && labels.len() == probs.len());
        let mut groups: BTreeMap<StudyType, (Vec<bool>, Vec<f64>)> = BTreeMap::new();
        for ((&t, &y), &p) in types.iter().zip(labels).zip(probs) {
            let g = groups.entry(t).or_default();
            g.0.push(y);
            g.1.push(p);
        }
        MetricsTable {
            overall: BinaryMetrics::new(labels, probs),
            by_type: groups
                .into_iter()
                .map(|(t, (y, p))| (t, BinaryMetrics::new(&y, &p)))
                .collect(),
        }
    }
}

fn num(x: f64, width: usize) -> String {
    if x.is_finite() {
        format!("{x:>width$.3}")
    } else {
        format!("{:>width$}", "n/a")
    }
}

/// A table like the MURA paper's Table 2: one row per study type, then overall.
impl fmt::Display for MetricsTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<12} {:>6} {:>7} {:>17} {:>8} {:>8} {:>8} {:>7}",
            "type", "n", "kappa", "95% CI", "acc", "sens", "spec", "auroc"
        )?;
        let rows = self.by_type.iter().map(|(t, m)| (t.name(), m));
        for (name, m) in rows.chain([("overall", &self.overall)]) {
            let ci = format!("[{}, {}]", num(m.kappa_ci[0], 6), num(m.kappa_ci[1], 6));
            writeln!(
                f,
                "{:<12} {:>6} {} {:>17} {} {} {} {}",
                name,
                m.n,
                num(m.kappa, 7),
                ci,
                num(m.accuracy, 8),
                num(m.sensitivity, 8),
                num(m.specificity, 8),
                num(m.auroc, 7)
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn kappa_and_ci_by_hand() {
        // tp 20, fn 5, fp 10, tn 15 (n 50): po = 35/50 = 0.7;
        // pe = (30·25 + 20·25) / 2500 = 0.5; κ = (0.7 − 0.5) / 0.5 = 0.4;
        // SE = sqrt(0.7·0.3 / (50·0.25)) = sqrt(0.0168) = 0.129615; CI = 0.4 ± 0.254045.
        let c = Confusion {
            tp: 20,
            fp: 10,
            tn: 15,
            fn_: 5,
        };
        let (k, ci) = c.kappa();
        assert!(close(k, 0.4), "{k}");
        let half = 1.96 * 0.0168f64.sqrt();
        assert!(
            close(ci[0], 0.4 - half) && close(ci[1], 0.4 + half),
            "{ci:?}"
        );
        assert!((half - 0.254045).abs() < 1e-6);
        assert!(
            close(c.accuracy(), 0.7) && close(c.sensitivity(), 0.8) && close(c.specificity(), 0.6)
        );
        // Perfect agreement with both classes present: κ = 1, CI [1, 1].
        let (k, ci) = Confusion {
            tp: 3,
            fp: 0,
            tn: 4,
            fn_: 0,
        }
        .kappa();
        assert!(close(k, 1.0) && close(ci[0], 1.0) && close(ci[1], 1.0));
        // Total disagreement: κ = −1 (po = 0, pe = 0.5); SE = 0, CI [−1, −1].
        let (k, ci) = Confusion {
            tp: 0,
            fp: 5,
            tn: 0,
            fn_: 5,
        }
        .kappa();
        assert!(
            close(k, -1.0) && close(ci[0], -1.0) && close(ci[1], -1.0),
            "{k} {ci:?}"
        );
        // A predictor that always says "abnormal": κ = 0 whatever the labels.
        let (k, _) = Confusion {
            tp: 7,
            fp: 3,
            tn: 0,
            fn_: 0,
        }
        .kappa();
        assert!(close(k, 0.0), "{k}");
    }

    #[test]
    fn degenerate_cases_are_nan_not_panics() {
        // Labels and predictions all one class: pe = 1, kappa undefined.
        let m = BinaryMetrics::new(&[true, true, true], &[0.9, 0.8, 0.7]);
        assert!(
            m.kappa.is_nan()
                && m.kappa_ci[0].is_nan()
                && m.auroc.is_nan()
                && m.specificity.is_nan()
        );
        assert!(close(m.accuracy, 1.0) && close(m.sensitivity, 1.0) && m.n == 3);
        // No studies at all.
        let m = BinaryMetrics::new(&[], &[]);
        assert!(m.kappa.is_nan() && m.accuracy.is_nan() && m.n == 0);
        assert!(roc_curve(&[false, false], &[0.1, 0.2]).is_empty());
        // NaN is written as null in metrics.json.
        let json = serde_json::to_value(&m).unwrap();
        assert!(json["kappa"].is_null() && json["n"] == 0);
    }

    #[test]
    fn auroc_with_ties_by_hand() {
        // Positives {0.8, 0.5, 0.5}, negatives {0.5, 0.2}: pairs (6): 0.8 beats both (2),
        // each 0.5 positive ties the 0.5 negative (2 × ½) and beats 0.2 (2): (2 + 1 + 2) / 6.
        let y = [true, true, true, false, false];
        let s = [0.8, 0.5, 0.5, 0.5, 0.2];
        assert!(close(auroc(&y, &s), 5.0 / 6.0));
        // The ROC points with the tied group as one diagonal step.
        let roc = roc_curve(&y, &s);
        let want = [(0.0, 0.0), (0.0, 1.0 / 3.0), (0.5, 1.0), (1.0, 1.0)];
        assert_eq!(roc.len(), want.len());
        for (p, w) in roc.iter().zip(want) {
            assert!(close(p.0, w.0) && close(p.1, w.1), "{roc:?}");
        }
        // All scores equal: 0.5. Perfectly separated: 1; reversed: 0.
        assert!(close(auroc(&y, &[0.3; 5]), 0.5));
        assert!(close(auroc(&y, &[0.9, 0.8, 0.7, 0.2, 0.1]), 1.0));
        assert!(close(auroc(&y, &[0.1, 0.2, 0.3, 0.8, 0.9]), 0.0));
    }

    #[test]
    fn auroc_equals_pair_count_and_trapezoid_on_random_data() {
        let mut rng = Rng::new(7 ^ std::process::id() as u64);
        for _ in 0..20 {
            let n = 2 + rng.below(60) as usize;
            let y: Vec<bool> = (0..n)
                .map(|i| i == 0 || (i > 1 && rng.bernoulli(0.4)))
                .collect();
            // Coarse scores so that ties happen.
            let s: Vec<f64> = (0..n).map(|_| rng.below(8) as f64 / 8.0).collect();
            let (mut wins, mut pairs) = (0.0, 0.0);
            for i in (0..n).filter(|&i| y[i]) {
                for j in (0..n).filter(|&j| !y[j]) {
                    pairs += 1.0;
                    wins += if s[i] > s[j] {
                        1.0
                    } else if s[i] == s[j] {
                        0.5
                    } else {
                        0.0
                    };
                }
            }
            let a = auroc(&y, &s);
            assert!(close(a, wins / pairs), "{a} vs {}", wins / pairs);
            let roc = roc_curve(&y, &s);
            let trap: f64 = roc
                .windows(2)
                .map(|w| (w[1].0 - w[0].0) * (w[1].1 + w[0].1) / 2.0)
                .sum();
            assert!(close(a, trap), "{a} vs trapezoid {trap}");
            assert_eq!((roc[0], *roc.last().unwrap()), ((0.0, 0.0), (1.0, 1.0)));
        }
    }

    #[test]
    fn table_groups_by_type_and_serialises_to_metrics_json_shape() {
        use StudyType::{Hand, Wrist};
        let types = [Wrist, Hand, Wrist, Hand, Wrist];
        let y = [true, false, false, true, true];
        let p = [0.9, 0.2, 0.6, 0.4, 0.7];
        let t = MetricsTable::new(&types, &y, &p);
        assert_eq!(t.overall.n, 5);
        assert_eq!(t.by_type[&Wrist].n, 3);
        assert!(close(t.by_type[&Hand].accuracy, 0.5));
        assert!(close(t.overall.accuracy, 0.6));
        let json = serde_json::to_value(&t).unwrap();
        for key in [
            "kappa",
            "kappa_ci",
            "accuracy",
            "sensitivity",
            "specificity",
            "auroc",
            "n",
        ] {
            assert!(
                json["overall"].get(key).is_some()
                    && json["by_type"]["XR_WRIST"].get(key).is_some(),
                "{key}"
            );
        }
        let text = t.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(
            lines[1].starts_with("XR_HAND") && lines[3].starts_with("overall"),
            "{text}"
        );
    }
}
