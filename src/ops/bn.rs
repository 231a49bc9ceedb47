//! Batch normalisation with PyTorch semantics over a `[rows, c]` view (rows = N*H*W pixels,
//! row stride `rs`). Training normalises with the batch's biased variance and updates the
//! running stats with momentum 0.1 and the unbiased variance; eval uses the running stats.
//! The forward is split into statistics and a per-channel affine `x * scale + shift`
//! (optionally followed by ReLU) so callers can fuse the affine into GEMM packing.

use super::{par_rows, row_sums, Activation, Float, Mode, Out, Rows};
use crate::consts::{BN_EPS, BN_MOMENTUM};

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
        .map(|(&g, &v)| g / (v + T::from_f64(BN_EPS)).sqrt())
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
    let m = T::from_f64(BN_MOMENTUM);
    let keep = T::ONE - m;
    let unbias = T::from_f64(count as f64 / (count.max(2) - 1) as f64);
    for j in 0..run_mean.len() {
        run_mean[j] = keep * run_mean[j] + m * mean[j];
        run_var[j] = keep * run_var[j] + m * var[j] * unbias;
    }
}

/// How a BN runs: what follows its affine, and which statistics it normalised with (the batch's
/// in training, the running ones in evaluation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BnOpts {
    pub act: Activation,
    pub mode: Mode,
}

impl BnOpts {
    /// The DenseNet's BN: followed by a ReLU, normalising as `mode` does.
    pub fn relu(mode: Mode) -> BnOpts {
        BnOpts {
            act: Activation::Relu,
            mode,
        }
    }
}

/// A BN as its backward sees it: its parameters `gamma`, `beta` and the statistics `mean`, `var`
/// it normalised with, `[c]` each.
#[derive(Clone, Copy)]
pub struct Bn<'a, T> {
    pub gamma: &'a [T],
    pub beta: &'a [T],
    pub mean: &'a [T],
    pub var: &'a [T],
}

/// The gradients of a BN's parameters, `[c]` each, added to.
pub struct ParamGrads<'a, T> {
    pub dgamma: &'a mut [T],
    pub dbeta: &'a mut [T],
}

/// `y = x * scale + shift` (then `act`); `y: [rows, c]` of `x`'s shape, row stride `y_rs`.
pub fn apply<T: Float>(
    x: Rows<T>,
    scale: &[T],
    shift: &[T],
    act: Activation,
    y: &mut [T],
    y_rs: usize,
) {
    let relu = act == Activation::Relu;
    par_rows(y, x.rows, y_rs, |r, out| {
        let src = x.row(r);
        for j in 0..x.c {
            let v = src[j] * scale[j] + shift[j];
            out[j] = if relu && v <= T::ZERO { T::ZERO } else { v };
        }
    });
}

/// Backward of `bn` (then `opts.act`): `dy` (the gradient of the output) of `x`'s shape; adds to
/// `dparams`, and puts the input gradient into `dx: [rows, c]` as `dx.write` says (when it
/// overwrites, no zero-fill is needed).
pub fn backward<T: Float>(
    x: Rows<T>,
    bn: Bn<T>,
    opts: BnOpts,
    dy: Rows<T>,
    dparams: ParamGrads<T>,
    dx: Out<T>,
) {
    let (rows, c) = (x.rows, x.c);
    assert_eq!(
        (dy.rows, dy.c),
        (rows, c),
        "bn::backward: dy is not x's shape"
    );
    let act = opts.act;
    let (scale, shift) = scale_shift(bn.gamma, bn.beta, bn.mean, bn.var);
    let (scale, shift, mean) = (&scale[..c], &shift[..c], &bn.mean[..c]);
    // dz = d(loss)/d(affine output), masked by ReLU.
    #[inline(always)]
    fn dz<T: Float>(act: Activation, x: T, d: T, s: T, t: T) -> T {
        if act == Activation::Relu && x * s + t <= T::ZERO {
            T::ZERO
        } else {
            d
        }
    }
    // One pass for both sums: acc[..c] += dz, acc[c..] += dz * (x - mean).
    let sums = row_sums(rows, 2 * c, |r, acc: &mut [T]| {
        let (a0, a1) = acc.split_at_mut(c);
        let (xr, dr) = (x.row(r), dy.row(r));
        let it = a0.iter_mut().zip(&mut a1[..c]).zip(xr.iter().zip(dr));
        let coef = scale.iter().zip(shift).zip(mean);
        for (((s0, s1), (&xv, &dv)), ((&s, &t), &m)) in it.zip(coef) {
            let d = dz(act, xv, dv, s, t);
            *s0 += d;
            *s1 += d * (xv - m);
        }
    });
    let (sum_dz, sum_dz_xc) = sums.split_at(c);
    let inv_n = 1.0 / rows as f64;
    // dx = scale * dz - ka - (x - mean) * kb: ka = scale * mean(dz) and
    // kb = scale * mean(dz * xhat) * invstd in training, both 0 in eval.
    let mut ka = vec![T::ZERO; c];
    let mut kb = vec![T::ZERO; c];
    for j in 0..c {
        let is = (T::ONE / (bn.var[j] + T::from_f64(BN_EPS)).sqrt()).to_f64();
        dparams.dgamma[j] += T::from_f64(sum_dz_xc[j] * is);
        dparams.dbeta[j] += T::from_f64(sum_dz[j]);
        if opts.mode == Mode::Train {
            let s = scale[j].to_f64();
            ka[j] = T::from_f64(s * sum_dz[j] * inv_n);
            kb[j] = T::from_f64(s * sum_dz_xc[j] * is * is * inv_n);
        }
    }
    let (ka, kb, write) = (&ka[..c], &kb[..c], dx.write);
    par_rows(dx.data, rows, dx.rs, |r, out| {
        let (xr, dr) = (x.row(r), dy.row(r));
        let it = out[..c].iter_mut().zip(xr.iter().zip(dr));
        let coef = scale
            .iter()
            .zip(shift)
            .zip(mean.iter().zip(ka.iter().zip(kb)));
        for ((o, (&xv, &dv)), ((&s, &t), (&m, (&a, &b)))) in it.zip(coef) {
            let v = s * dz(act, xv, dv, s, t) - a - (xv - m) * b;
            *o = write.put(*o, v);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{dot, fd_check, randn, TOL};
    use crate::rng::Rng;

    fn check(opts: BnOpts, seed: u64) {
        let train = opts.mode == Mode::Train;
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
            let act = opts.act;
            apply(Rows::new(x, rows, c, rs), &s, &t, act, &mut y, c);
            dot(&y, &r)
        };
        let (mean, var) = if train {
            batch_stats(&x, rows, c, rs)
        } else {
            (run_mean.clone(), run_var.clone())
        };
        let mut dgb = vec![0.0; 2 * c];
        let mut dx = vec![0.0; rows * rs];
        let (dgamma, dbeta) = dgb.split_at_mut(c);
        let bn = Bn {
            gamma: &gb[..c],
            beta: &gb[c..],
            mean: &mean,
            var: &var,
        };
        let (xr, dy) = (Rows::new(&x, rows, c, rs), Rows::new(&r, rows, c, c));
        let dparams = ParamGrads { dgamma, dbeta };
        backward(xr, bn, opts, dy, dparams, Out::accumulate(&mut dx, rs));
        let xs = x.clone();
        let err = fd_check(&mut gb, &dgb, |gb| fwd(&xs, gb));
        assert!(err < TOL, "bn {opts:?}: dgamma/dbeta rel err {err}");
        let gbs = gb.clone();
        let err = fd_check(&mut x, &dx, |x| fwd(x, &gbs));
        assert!(err < TOL, "bn {opts:?}: dx rel err {err}");
    }

    #[test]
    fn bn_gradients() {
        let opts = |act, mode| BnOpts { act, mode };
        check(opts(Activation::Identity, Mode::Train), 1);
        check(opts(Activation::Relu, Mode::Train), 2);
        check(opts(Activation::Identity, Mode::Eval), 3);
        check(opts(Activation::Relu, Mode::Eval), 4);
    }

    #[test]
    fn overwrite_equals_accumulate_into_zeros() {
        let mut rng = Rng::new(5);
        let (rows, c, rs) = (11, 3, 5);
        let x = randn(&mut rng, rows * rs);
        let dy = randn(&mut rng, rows * c);
        let (gamma, beta) = (randn(&mut rng, c), randn(&mut rng, c));
        let (mean, var) = batch_stats(&x, rows, c, rs);
        let run = |dx: Out<f64>| {
            let (mut dgamma, mut dbeta) = (vec![0.0; c], vec![0.0; c]);
            let bn = Bn {
                gamma: &gamma,
                beta: &beta,
                mean: &mean,
                var: &var,
            };
            let (xr, dyr) = (Rows::new(&x, rows, c, rs), Rows::new(&dy, rows, c, c));
            let dparams = ParamGrads {
                dgamma: &mut dgamma,
                dbeta: &mut dbeta,
            };
            backward(xr, bn, BnOpts::relu(Mode::Train), dyr, dparams, dx);
        };
        let mut want = vec![0.0; rows * rs];
        run(Out::accumulate(&mut want, rs));
        let stale = randn(&mut rng, rows * rs);
        let mut got = stale.clone();
        run(Out::overwrite(&mut got, rs));
        for r in 0..rows {
            assert_eq!(got[r * rs..][..c], want[r * rs..][..c]);
            assert_eq!(got[r * rs + c..][..rs - c], stale[r * rs + c..][..rs - c]);
        }
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
