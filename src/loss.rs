//! Weighted binary cross-entropy from logits, per image (the MURA paper) or per study on the
//! mean of its views' probabilities (the reference blog post).
//!
//! Computed in f64 from logits with softplus forms, so it stays finite for |logit| up to 1e4
//! and beyond: log σ(z) = −softplus(−z), log(1 − σ(z)) = −softplus(z); the log of a mean of
//! sigmoids is a log-sum-exp of those. Weights per study type T (from training image counts):
//! w1 = |N_T| / (|A_T| + |N_T|) for label 1, w0 = |A_T| / (|A_T| + |N_T|) for label 0.

/// Where the loss is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum LossLevel {
    /// Every view with its study's label, averaged over views (the paper).
    Image,
    /// Once per study on p_s = mean of its views' σ(z), averaged over studies (the blog post).
    Study,
}

impl std::str::FromStr for LossLevel {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "study" => Ok(LossLevel::Study),
            "image" => Ok(LossLevel::Image),
            _ => anyhow::bail!("unknown loss level '{s}': use study or image"),
        }
    }
}

/// Loss and its gradient for one batch, with the store's per-type weights.
pub fn batch_loss(
    store: &crate::data::store::Store,
    batch: &crate::data::loader::Batch,
    logits: &[f32],
    level: LossLevel,
) -> (f64, Vec<f32>) {
    let z: Vec<f64> = logits.iter().map(|&v| v as f64).collect();
    let w: Vec<(f64, f64)> = batch
        .types
        .iter()
        .map(|&t| {
            let (w0, w1) = store.loss_weights(t);
            (w0 as f64, w1 as f64)
        })
        .collect();
    let labels: Vec<f64> = batch.labels.iter().map(|&l| l as f64).collect();
    let (loss, dz) = weighted_bce(&z, &batch.view_study, &labels, &w, level);
    (loss, dz.iter().map(|&g| g as f32).collect())
}

/// softplus(x) = log(1 + e^x), stable for any finite x.
pub fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// σ(x), stable for any finite x.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// log Σ e^{a_i} and the softmax weights e^{a_i − lse}.
fn log_sum_exp(a: &[f64]) -> (f64, Vec<f64>) {
    let m = a.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = a.iter().map(|&x| (x - m).exp()).collect();
    let s: f64 = e.iter().sum();
    (m + s.ln(), e.iter().map(|x| x / s).collect())
}

/// Weighted BCE and its gradient with respect to every logit.
///
/// - `logits`: [n_images], one logit per view
/// - `view_study`: [n_images], the study (index into `labels`) each view belongs to
/// - `labels`: [n_studies], 1 = abnormal, 0 = normal (soft labels in [0, 1] also work)
/// - `w`: [n_studies], (w0, w1) of each study's type
///
/// Every study must have at least one view. Returns (loss, dloss/dlogits [n_images]).
pub fn weighted_bce(
    logits: &[f64],
    view_study: &[usize],
    labels: &[f64],
    w: &[(f64, f64)],
    level: LossLevel,
) -> (f64, Vec<f64>) {
    assert_eq!(logits.len(), view_study.len(), "one study index per logit");
    assert_eq!(labels.len(), w.len(), "one weight pair per study");
    let mut grad = vec![0.0; logits.len()];
    match level {
        LossLevel::Image => {
            let n = logits.len() as f64;
            let mut loss = 0.0;
            for (i, (&z, &s)) in logits.iter().zip(view_study).enumerate() {
                let (y, (w0, w1)) = (labels[s], w[s]);
                loss += w1 * y * softplus(-z) + w0 * (1.0 - y) * softplus(z);
                grad[i] = (-w1 * y * sigmoid(-z) + w0 * (1.0 - y) * sigmoid(z)) / n;
            }
            (loss / n, grad)
        }
        LossLevel::Study => {
            let mut views: Vec<Vec<usize>> = vec![Vec::new(); labels.len()];
            for (i, &s) in view_study.iter().enumerate() {
                views[s].push(i);
            }
            let n = labels.len() as f64;
            let mut loss = 0.0;
            for (s, idx) in views.iter().enumerate() {
                assert!(!idx.is_empty(), "study {s} has no views");
                let (y, (w0, w1)) = (labels[s], w[s]);
                let log_n = (idx.len() as f64).ln();
                // log p_s = LSE_i(log σ(z_i)) − log n; log(1 − p_s) = LSE_i(log σ(−z_i)) − log n.
                let a: Vec<f64> = idx.iter().map(|&i| -softplus(-logits[i])).collect();
                let b: Vec<f64> = idx.iter().map(|&i| -softplus(logits[i])).collect();
                let (lse_a, soft_a) = log_sum_exp(&a);
                let (lse_b, soft_b) = log_sum_exp(&b);
                loss -= w1 * y * (lse_a - log_n) + w0 * (1.0 - y) * (lse_b - log_n);
                // d log σ(z)/dz = σ(−z); d log σ(−z)/dz = −σ(z).
                for (k, &i) in idx.iter().enumerate() {
                    let z = logits[i];
                    let d_logp = soft_a[k] * sigmoid(-z);
                    let d_log1mp = -soft_b[k] * sigmoid(z);
                    grad[i] = -(w1 * y * d_logp + w0 * (1.0 - y) * d_log1mp) / n;
                }
            }
            (loss / n, grad)
        }
    }
}

/// [`weighted_bce`] for f32 logits (computed in f64).
pub fn weighted_bce_f32(
    logits: &[f32],
    view_study: &[usize],
    labels: &[f64],
    w: &[(f64, f64)],
    level: LossLevel,
) -> (f32, Vec<f32>) {
    let z: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
    let (loss, g) = weighted_bce(&z, view_study, labels, w, level);
    (loss as f32, g.iter().map(|&x| x as f32).collect())
}

/// The paper's weights for one study type from its training image counts:
/// (w0, w1) = (|A| / (|A| + |N|), |N| / (|A| + |N|)).
pub fn type_weights(abnormal_images: usize, normal_images: usize) -> (f64, f64) {
    let t = (abnormal_images + normal_images) as f64;
    (abnormal_images as f64 / t, normal_images as f64 / t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// (logits, view_study, labels, weights)
    type Batch = (Vec<f64>, Vec<usize>, Vec<f64>, Vec<(f64, f64)>);

    /// A random batch: studies with 1–4 views, random labels and weights.
    fn batch(rng: &mut Rng, scale: f64) -> Batch {
        let n_studies = 5;
        let mut z = Vec::new();
        let mut vs = Vec::new();
        for s in 0..n_studies {
            for _ in 0..1 + rng.below(4) {
                z.push(rng.normal() * scale);
                vs.push(s);
            }
        }
        let labels = (0..n_studies).map(|_| rng.below(2) as f64).collect();
        let w = (0..n_studies)
            .map(|_| {
                let w1 = rng.range(0.2, 0.8);
                (1.0 - w1, w1)
            })
            .collect();
        (z, vs, labels, w)
    }

    /// Direct (naive) formulas, fine for moderate logits.
    fn naive(z: &[f64], vs: &[usize], y: &[f64], w: &[(f64, f64)], level: LossLevel) -> f64 {
        let p: Vec<f64> = z.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect();
        let term =
            |p: f64, s: usize| -(w[s].1 * y[s] * p.ln() + w[s].0 * (1.0 - y[s]) * (1.0 - p).ln());
        match level {
            LossLevel::Image => {
                p.iter().zip(vs).map(|(&p, &s)| term(p, s)).sum::<f64>() / z.len() as f64
            }
            LossLevel::Study => {
                let mut total = 0.0;
                for s in 0..y.len() {
                    let ps: Vec<f64> = p
                        .iter()
                        .zip(vs)
                        .filter(|(_, &t)| t == s)
                        .map(|(&p, _)| p)
                        .collect();
                    total += term(ps.iter().sum::<f64>() / ps.len() as f64, s);
                }
                total / y.len() as f64
            }
        }
    }

    #[test]
    fn matches_naive_formula_and_finite_differences() {
        let mut rng = Rng::new(0x1055_0001 ^ std::process::id() as u64);
        for level in [LossLevel::Image, LossLevel::Study] {
            for _ in 0..20 {
                let (z, vs, y, w) = batch(&mut rng, 3.0);
                let (loss, g) = weighted_bce(&z, &vs, &y, &w, level);
                let want = naive(&z, &vs, &y, &w, level);
                assert!(
                    (loss - want).abs() <= 1e-12 * want.abs().max(1.0),
                    "{level:?}: {loss} vs {want}"
                );
                let h = 1e-6;
                for i in 0..z.len() {
                    let mut zp = z.clone();
                    zp[i] += h;
                    let mut zm = z.clone();
                    zm[i] -= h;
                    let fd = (weighted_bce(&zp, &vs, &y, &w, level).0
                        - weighted_bce(&zm, &vs, &y, &w, level).0)
                        / (2.0 * h);
                    let err = (fd - g[i]).abs() / g[i].abs().max(1e-3);
                    assert!(
                        err < 1e-6,
                        "{level:?} dz[{i}]: analytic {} vs fd {fd}",
                        g[i]
                    );
                }
            }
        }
    }

    #[test]
    fn extreme_logits_give_finite_exact_values() {
        let w = [(0.4, 0.6)];
        for level in [LossLevel::Image, LossLevel::Study] {
            // Confidently right: loss ≈ 0, gradient ≈ 0.
            let (l, g) = weighted_bce(&[1e4, 1e4], &[0, 0], &[1.0], &w, level);
            assert!(
                l.is_finite()
                    && l.abs() < 1e-300
                    && g.iter().all(|x| x.is_finite() && x.abs() < 1e-300)
            );
            // Confidently wrong: loss = w1 · 1e4 (softplus(1e4) = 1e4), finite gradient.
            let (l, g) = weighted_bce(&[-1e4, -1e4], &[0, 0], &[1.0], &w, level);
            assert!((l - 0.6e4).abs() < 1e-9, "{level:?}: {l}");
            assert!(g.iter().all(|x| x.is_finite() && *x < 0.0), "{g:?}");
            let (l, g) = weighted_bce(&[1e4], &[0], &[0.0], &w, level);
            assert!(
                (l - 0.4e4).abs() < 1e-9 && (g[0] - 0.4).abs() < 1e-12,
                "{l} {g:?}"
            );
            // Mixed views: the mean probability is 1/2, whatever the extremes.
            let (l, _) = weighted_bce(&[1e4, -1e4], &[0, 0], &[1.0], &w, LossLevel::Study);
            assert!((l - 0.6 * 2f64.ln()).abs() < 1e-12, "{l}");
        }
        // Large random logits: always finite.
        let mut rng = Rng::new(42 ^ std::process::id() as u64);
        for level in [LossLevel::Image, LossLevel::Study] {
            let (z, vs, y, w) = batch(&mut rng, 5e3);
            let (l, g) = weighted_bce(&z, &vs, &y, &w, level);
            assert!(l.is_finite() && g.iter().all(|x| x.is_finite()));
        }
    }

    #[test]
    fn f32_wrapper_and_type_weights() {
        let (w0, w1) = type_weights(30, 70);
        assert!((w0 - 0.3).abs() < 1e-15 && (w1 - 0.7).abs() < 1e-15);
        let (l32, g32) = weighted_bce_f32(
            &[0.5, -2.0],
            &[0, 1],
            &[1.0, 0.0],
            &[(w0, w1); 2],
            LossLevel::Image,
        );
        let (l64, g64) = weighted_bce(
            &[0.5, -2.0],
            &[0, 1],
            &[1.0, 0.0],
            &[(w0, w1); 2],
            LossLevel::Image,
        );
        assert!((l32 as f64 - l64).abs() < 1e-7 && (g32[1] as f64 - g64[1]).abs() < 1e-7);
    }
}
