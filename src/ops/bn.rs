//! Batch normalisation with PyTorch semantics over a `[rows, c]` view (rows = N*H*W pixels,
//! row stride `rs`). Training normalises with the batch's biased variance and updates the
//! running stats with momentum 0.1 and the unbiased variance; eval uses the running stats.
//! The forward is split into statistics and a per-channel affine `x * scale + shift`
//! (optionally followed by ReLU) so callers can fuse the affine into GEMM packing.

use super::{par_rows, row_sums, Float};

pub const EPS: f64 = 1e-5;
pub const MOMENTUM: f64 = 0.1;

/// Per-channel batch mean and biased variance (two passes, f64 accumulation).
pub fn batch_stats<T: Float>(x: &[T], rows: usize, c: usize, rs: usize) -> (Vec<T>, Vec<T>) {
    let inv = 1.0 / rows as f64;
    let mean: Vec<T> = row_sums(rows, c, |r, acc: &mut [T]| {
        acc.iter_mut()
            .zip(&x[r * rs..][..c])
            .for_each(|(a, &v)| *a += v)
    })
    .into_iter()
    .map(|s| T::from_f64(s * inv))
    .collect();
    let var = row_sums(rows, c, |r, acc: &mut [T]| {
        for ((a, &v), &m) in acc.iter_mut().zip(&x[r * rs..][..c]).zip(&mean) {
            *a += (v - m) * (v - m);
        }
    })
    .into_iter()
    .map(|s| T::from_f64(s * inv))
    .collect();
    (mean, var)
}

/// `scale = gamma / sqrt(var + eps)`, `shift = beta - mean * scale`.
pub fn scale_shift<T: Float>(gamma: &[T], beta: &[T], mean: &[T], var: &[T]) -> (Vec<T>, Vec<T>) {
    let scale: Vec<T> = gamma
        .iter()
        .zip(var)
        .map(|(&g, &v)| g / (v + T::from_f64(EPS)).sqrt())
        .collect();
    let shift = beta
        .iter()
        .zip(mean)
        .zip(&scale)
        .map(|((&b, &m), &s)| b - m * s)
        .collect();
    (scale, shift)
}

/// PyTorch's running-stat update from a batch of `count` values per channel.
pub fn update_running<T: Float>(
    run_mean: &mut [T],
    run_var: &mut [T],
    mean: &[T],
    var: &[T],
    count: usize,
) {
    let m = T::from_f64(MOMENTUM);
    let keep = T::ONE - m;
    let unbias = T::from_f64(count as f64 / (count.max(2) - 1) as f64);
    for j in 0..run_mean.len() {
        run_mean[j] = keep * run_mean[j] + m * mean[j];
        run_var[j] = keep * run_var[j] + m * var[j] * unbias;
    }
}

/// `y = x * scale + shift` (then ReLU if `relu`); `y: [rows, c]` with row stride `y_rs`.
#[allow(clippy::too_many_arguments)]
pub fn apply<T: Float>(
    x: &[T],
    rows: usize,
    c: usize,
    rs: usize,
    scale: &[T],
    shift: &[T],
    relu: bool,
    y: &mut [T],
    y_rs: usize,
) {
    par_rows(y, rows, y_rs, |r, out| {
        let src = &x[r * rs..][..c];
        for j in 0..c {
            let v = src[j] * scale[j] + shift[j];
            out[j] = if relu && v <= T::ZERO { T::ZERO } else { v };
        }
    });
}

/// Backward of `bn` (train: batch statistics `mean`, `var`; eval: running ones) optionally
/// followed by ReLU. `dy: [rows, c]` (row stride `dy_rs`) is the gradient of the output;
/// accumulates into `dgamma`, `dbeta` `[c]` and `dx: [rows, c]` (row stride `dx_rs`).
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Float>(
    x: &[T],
    rows: usize,
    c: usize,
    rs: usize,
    gamma: &[T],
    beta: &[T],
    mean: &[T],
    var: &[T],
    relu: bool,
    train: bool,
    dy: &[T],
    dy_rs: usize,
    dgamma: &mut [T],
    dbeta: &mut [T],
    dx: &mut [T],
    dx_rs: usize,
) {
    let (scale, shift) = scale_shift(gamma, beta, mean, var);
    let invstd: Vec<T> = var
        .iter()
        .map(|&v| T::ONE / (v + T::from_f64(EPS)).sqrt())
        .collect();
    // dz = d(loss)/d(affine output), masked by ReLU.
    let dz = |x: T, d: T, s: T, t: T| {
        if relu && x * s + t <= T::ZERO {
            T::ZERO
        } else {
            d
        }
    };
    // One pass for both sums: acc[..c] += dz, acc[c..] += dz * (x - mean).
    let sums = row_sums(rows, 2 * c, |r, acc: &mut [T]| {
        let (a0, a1) = acc.split_at_mut(c);
        let (xr, dr) = (&x[r * rs..][..c], &dy[r * dy_rs..][..c]);
        for j in 0..c {
            let d = dz(xr[j], dr[j], scale[j], shift[j]);
            a0[j] += d;
            a1[j] += d * (xr[j] - mean[j]);
        }
    });
    let (sum_dz, sum_dz_xc) = sums.split_at(c);
    let inv_n = 1.0 / rows as f64;
    let mut a = vec![T::ZERO; c]; // mean of dz
    let mut b = vec![T::ZERO; c]; // mean of dz * xhat, times invstd
    for j in 0..c {
        let is = invstd[j].to_f64();
        dgamma[j] += T::from_f64(sum_dz_xc[j] * is);
        dbeta[j] += T::from_f64(sum_dz[j]);
        a[j] = T::from_f64(sum_dz[j] * inv_n);
        b[j] = T::from_f64(sum_dz_xc[j] * is * is * inv_n);
    }
    // dx = scale * (dz - a - (x - mean) * b) in training, scale * dz in eval.
    par_rows(dx, rows, dx_rs, |r, out| {
        let (xr, dr) = (&x[r * rs..][..c], &dy[r * dy_rs..][..c]);
        let out = &mut out[..c];
        for j in 0..c {
            let d = dz(xr[j], dr[j], scale[j], shift[j]);
            out[j] += if train {
                scale[j] * (d - a[j] - (xr[j] - mean[j]) * b[j])
            } else {
                scale[j] * d
            };
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{dot, fd_check, randn, TOL};
    use crate::rng::Rng;

    fn check(train: bool, relu: bool, seed: u64) {
        let mut rng = Rng::new(seed);
        let (rows, c, rs) = (13, 4, 6);
        let mut x = randn(&mut rng, rows * rs);
        let mut gb = randn(&mut rng, 2 * c); // gamma ++ beta
        let run_mean = randn(&mut rng, c);
        let run_var: Vec<f64> = (0..c).map(|_| 0.5 + rng.uniform()).collect();
        let r = randn(&mut rng, rows * c);
        let fwd = |x: &[f64], gb: &[f64]| {
            let (mean, var) = if train {
                batch_stats(x, rows, c, rs)
            } else {
                (run_mean.clone(), run_var.clone())
            };
            let (s, t) = scale_shift(&gb[..c], &gb[c..], &mean, &var);
            let mut y = vec![0.0; rows * c];
            apply(x, rows, c, rs, &s, &t, relu, &mut y, c);
            dot(&y, &r)
        };
        let (mean, var) = if train {
            batch_stats(&x, rows, c, rs)
        } else {
            (run_mean.clone(), run_var.clone())
        };
        let mut dgb = vec![0.0; 2 * c];
        let mut dx = vec![0.0; rows * rs];
        let (dg, db) = dgb.split_at_mut(c);
        backward(
            &x,
            rows,
            c,
            rs,
            &gb[..c],
            &gb[c..],
            &mean,
            &var,
            relu,
            train,
            &r,
            c,
            dg,
            db,
            &mut dx,
            rs,
        );
        let xs = x.clone();
        let err = fd_check(&mut gb, &dgb, |gb| fwd(&xs, gb));
        assert!(
            err < TOL,
            "bn train={train} relu={relu}: dgamma/dbeta rel err {err}"
        );
        let gbs = gb.clone();
        let err = fd_check(&mut x, &dx, |x| fwd(x, &gbs));
        assert!(err < TOL, "bn train={train} relu={relu}: dx rel err {err}");
    }

    #[test]
    fn bn_gradients() {
        check(true, false, 1);
        check(true, true, 2);
        check(false, false, 3);
        check(false, true, 4);
    }

    #[test]
    fn running_stats_follow_pytorch() {
        // One channel, values 1..=4: mean 2.5, biased var 1.25, unbiased 5/3.
        let x = [1.0f64, 2.0, 3.0, 4.0];
        let (m, v) = batch_stats(&x, 4, 1, 1);
        assert!((m[0] - 2.5).abs() < 1e-15 && (v[0] - 1.25).abs() < 1e-15);
        let (mut rm, mut rv) = (vec![0.0], vec![1.0]);
        update_running(&mut rm, &mut rv, &m, &v, 4);
        assert!((rm[0] - 0.25).abs() < 1e-15);
        assert!((rv[0] - (0.9 + 0.1 * 5.0 / 3.0)).abs() < 1e-15);
    }
}
