//! Pooling in NHWC: max pool 3×3/2 pad 1 (padding is −∞), avg pool 2×2/2 (floor on odd
//! sizes), global average pool. Inputs are NHWC views (`Image`); outputs may be a
//! channel prefix of a wider buffer (row stride `y_rs`).

use super::{par_rows, BnRelu, Float, Image, Rows};
use rayon::prelude::*;

/// Max pool 3×3, stride 2, pad 1: output size.
pub fn maxpool_out(h: usize, w: usize) -> (usize, usize) {
    ((h - 1) / 2 + 1, (w - 1) / 2 + 1)
}

/// `y: [n, ho, wo, c]` (row stride `y_rs`) = maxpool3x3s2p1(`x: [n, h, w, c]`).
pub fn maxpool_fwd<T: Float>(x: Image<T>, y: &mut [T], y_rs: usize) {
    let Image { n, h, w, c, .. } = x;
    let (ho, wo) = maxpool_out(h, w);
    par_rows(y, n * ho * wo, y_rs, |r, out| {
        let (b, oy, ox) = (r / (ho * wo), (r / wo) % ho, r % wo);
        let out = &mut out[..c];
        out.fill(T::NEG_INFINITY);
        for iy in (2 * oy).saturating_sub(1)..(2 * oy + 2).min(h) {
            for ix in (2 * ox).saturating_sub(1)..(2 * ox + 2).min(w) {
                let src = &x.data[((b * h + iy) * w + ix) * x.rs..][..c];
                for (o, &v) in out.iter_mut().zip(src) {
                    // A NaN anywhere in the window is the maximum (as in PyTorch).
                    if v > *o || v.is_nan() {
                        *o = v;
                    }
                }
            }
        }
    });
}

/// `dx: [n, h, w, c]` (contiguous, overwritten) from `dy: [n·ho·wo, c]`: each output's gradient
/// goes to its window's max (the first one on ties).
pub fn maxpool_bwd<T: Float>(x: Image<T>, dy: Rows<T>, dx: &mut [T]) {
    let Image { n, h, w, c, .. } = x;
    let (ho, wo) = maxpool_out(h, w);
    assert_eq!(
        (dy.rows, dy.c),
        (n * ho * wo, c),
        "maxpool_bwd: dy is not y's shape"
    );
    // Scatter within one image at a time; images in parallel.
    dx[..n * h * w * c]
        .par_chunks_mut(h * w * c)
        .enumerate()
        .for_each(|(b, dxi)| {
            dxi.fill(T::ZERO);
            let mut best = vec![T::ZERO; c];
            let mut at = vec![0usize; c];
            for oy in 0..ho {
                for ox in 0..wo {
                    best.fill(T::NEG_INFINITY);
                    at.fill(usize::MAX);
                    for iy in (2 * oy).saturating_sub(1)..(2 * oy + 2).min(h) {
                        for ix in (2 * ox).saturating_sub(1)..(2 * ox + 2).min(w) {
                            let p = iy * w + ix;
                            let px = &x.data[(b * h * w + p) * x.rs..][..c];
                            for (j, &v) in px.iter().enumerate() {
                                let nan = v.is_nan() && !best[j].is_nan();
                                if at[j] == usize::MAX || v > best[j] || nan {
                                    best[j] = v;
                                    at[j] = p;
                                }
                            }
                        }
                    }
                    let d = dy.row((b * ho + oy) * wo + ox);
                    for j in 0..c {
                        dxi[at[j] * c + j] += d[j];
                    }
                }
            }
        });
}

/// `y: [n, h/2, w/2, c]` (row stride `y_rs`) = avgpool2x2s2(pre(`x: [n, h, w, c]`)).
pub fn avgpool_fwd<T: Float>(x: Image<T>, pre: Option<BnRelu<T>>, y: &mut [T], y_rs: usize) {
    let Image { n, h, w, c, .. } = x;
    let (ho, wo) = (h / 2, w / 2);
    let q = T::from_f64(0.25);
    par_rows(y, n * ho * wo, y_rs, |r, out| {
        let (b, oy, ox) = (r / (ho * wo), (r / wo) % ho, r % wo);
        let p = (b * h + 2 * oy) * w + 2 * ox;
        let px = |p: usize| &x.data[p * x.rs..][..c];
        let (a, bb, cc, d) = (px(p), px(p + 1), px(p + w), px(p + w + 1));
        match pre {
            None => (0..c).for_each(|j| out[j] = (a[j] + bb[j] + cc[j] + d[j]) * q),
            Some(p) => (0..c).for_each(|j| {
                out[j] = (p.at(j, a[j]) + p.at(j, bb[j]) + p.at(j, cc[j]) + p.at(j, d[j])) * q
            }),
        }
    });
}

/// `dx: [n, h, w, c]` (contiguous, overwritten; pixels dropped by the floor get 0).
pub fn avgpool_bwd<T: Float>(
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    dy: &[T],
    dy_rs: usize,
    dx: &mut [T],
) {
    let (ho, wo) = (h / 2, w / 2);
    let q = T::from_f64(0.25);
    par_rows(dx, n * h * w, c, |p, out| {
        let (b, iy, ix) = (p / (h * w), (p / w) % h, p % w);
        if iy / 2 >= ho || ix / 2 >= wo {
            out.fill(T::ZERO);
            return;
        }
        let src = &dy[((b * ho + iy / 2) * wo + ix / 2) * dy_rs..][..c];
        out.iter_mut().zip(src).for_each(|(o, &s)| *o = s * q);
    });
}

/// `y: [n, c]` = mean over pixels of `x: [n, hw, c]`.
pub fn gap_fwd<T: Float>(x: &[T], n: usize, hw: usize, c: usize) -> Vec<T> {
    let inv = T::from_f64(1.0 / hw as f64);
    let mut y = vec![T::ZERO; n * c];
    for b in 0..n {
        let out = &mut y[b * c..][..c];
        for p in 0..hw {
            out.iter_mut()
                .zip(&x[(b * hw + p) * c..][..c])
                .for_each(|(o, &v)| *o += v);
        }
        out.iter_mut().for_each(|o| *o *= inv);
    }
    y
}

/// `dx: [n, hw, c]` (overwritten) from `dy: [n, c]`.
pub fn gap_bwd<T: Float>(dy: &[T], n: usize, hw: usize, c: usize, dx: &mut [T]) {
    let inv = T::from_f64(1.0 / hw as f64);
    par_rows(dx, n * hw, c, |p, out| {
        let src = &dy[(p / hw) * c..][..c];
        out.iter_mut().zip(src).for_each(|(o, &s)| *o = s * inv);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{dot, fd_check, randn, TOL};
    use crate::rng::Rng;

    #[test]
    fn maxpool_gradient_and_padding() {
        let mut rng = Rng::new(1);
        for (n, h, w, c) in [(2, 7, 6, 3), (1, 4, 5, 2)] {
            let (ho, wo) = maxpool_out(h, w);
            let mut x: Vec<f64> = randn(&mut rng, n * h * w * c)
                .iter()
                .map(|v| v - 5.0)
                .collect();
            let r = randn(&mut rng, n * ho * wo * c);
            let f = |x: &[f64]| {
                let mut y = vec![0.0; n * ho * wo * c];
                maxpool_fwd(Image::dense(x, (n, h, w, c)), &mut y, c);
                dot(&y, &r)
            };
            // Negative inputs: padding must never win (it would give 0).
            let mut y = vec![0.0; n * ho * wo * c];
            maxpool_fwd(Image::dense(&x, (n, h, w, c)), &mut y, c);
            assert!(y.iter().all(|&v| v < 0.0));
            let mut dx = vec![f64::NAN; x.len()];
            let dy = Rows::new(&r[..], n * ho * wo, c, c);
            maxpool_bwd(Image::dense(&x, (n, h, w, c)), dy, &mut dx);
            let err = fd_check(&mut x, &dx, f);
            assert!(err < TOL, "maxpool rel err {err}");
        }
    }

    #[test]
    fn avgpool_gradient_odd_sizes() {
        let mut rng = Rng::new(2);
        let (n, h, w, c) = (2, 5, 7, 3);
        let (ho, wo) = (2, 3);
        let mut x = randn(&mut rng, n * h * w * c);
        let r = randn(&mut rng, n * ho * wo * c);
        let f = |x: &[f64]| {
            let mut y = vec![0.0; n * ho * wo * (c + 2)];
            avgpool_fwd(Image::dense(x, (n, h, w, c)), None, &mut y, c + 2);
            let y: Vec<f64> = y.chunks(c + 2).flat_map(|p| p[..c].to_vec()).collect();
            dot(&y, &r)
        };
        let mut dx = vec![f64::NAN; x.len()];
        avgpool_bwd(n, h, w, c, &r, c, &mut dx);
        let err = fd_check(&mut x, &dx, f);
        assert!(err < TOL, "avgpool rel err {err}");
    }

    #[test]
    fn gap_gradient() {
        let mut rng = Rng::new(3);
        let (n, hw, c) = (3, 5, 4);
        let mut x = randn(&mut rng, n * hw * c);
        let r = randn(&mut rng, n * c);
        let mut dx = vec![f64::NAN; x.len()];
        gap_bwd(&r, n, hw, c, &mut dx);
        let err = fd_check(&mut x, &dx, |x| dot(&gap_fwd(x, n, hw, c), &r));
        assert!(err < TOL, "gap rel err {err}");
    }
}
