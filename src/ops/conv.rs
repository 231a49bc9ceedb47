//! 2-D convolution without bias, NHWC, square kernels, any stride and padding.
//! Weights are `[k, k, ci, co]` (a `[k*k*ci, co]` GEMM operand). 1×1/stride-1 convs are one
//! GEMM on the input itself; the others pack an im2col buffer in row chunks, optionally
//! applying a fused BN+ReLU to the input while packing.

use super::{matmul, matmul_1t, par_rows, BnRelu, Float, Gemm, Image, Mat, Out};
use rayon::prelude::*;

/// Kernel size, stride and padding of a square convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv {
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl Conv {
    /// DenseNet's three geometries: the 7×7/2 pad 3 stem, the 1×1 bottlenecks and transitions,
    /// and the 3×3/1 pad 1 growth convolutions.
    pub const STEM: Conv = Conv {
        k: 7,
        stride: 2,
        pad: 3,
    };
    pub const POINTWISE: Conv = Conv {
        k: 1,
        stride: 1,
        pad: 0,
    };
    pub const CONV3: Conv = Conv {
        k: 3,
        stride: 1,
        pad: 1,
    };

    /// Refuses a window with no output on an `h × w` input (where [`Conv::out_hw`] would
    /// underflow).
    pub fn check(&self, h: usize, w: usize) -> anyhow::Result<()> {
        if self.k == 0 || self.stride == 0 || h + 2 * self.pad < self.k || w + 2 * self.pad < self.k
        {
            anyhow::bail!(
                "a {}x{}/{} pad {} convolution has no output on a {h}x{w} input",
                self.k,
                self.k,
                self.stride,
                self.pad
            );
        }
        Ok(())
    }

    /// The output size on an `h × w` input (see [`Conv::check`]).
    pub fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        (
            (h + 2 * self.pad - self.k) / self.stride + 1,
            (w + 2 * self.pad - self.k) / self.stride + 1,
        )
    }
    fn is_pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.pad == 0
    }
}

/// Output pixels per im2col chunk: a chunk's packing buffer (≈ 512 KB of f32) stays in
/// L2 while one thread multiplies it.
fn chunk_rows(cols: usize) -> usize {
    ((1 << 17) / cols.max(1)).clamp(32, 4096)
}

/// Pack output pixels `[r0, r0 + rows)` of `x` into `col: [rows, k*k*c]` (columns ordered ky, kx, c).
fn im2col<T: Float>(
    x: Image<T>,
    pre: Option<BnRelu<T>>,
    g: Conv,
    r0: usize,
    rows: usize,
    col: &mut [T],
) {
    let (ho, wo) = g.out_hw(x.h, x.w);
    let c = x.c;
    let kc = g.k * g.k * c;
    for (i, row) in col[..rows * kc].chunks_mut(kc).enumerate() {
        let r = r0 + i;
        let (b, oy, ox) = (r / (ho * wo), (r / wo) % ho, r % wo);
        for ky in 0..g.k {
            let iy = (oy * g.stride + ky) as isize - g.pad as isize;
            for kx in 0..g.k {
                let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                let dst = &mut row[(ky * g.k + kx) * c..][..c];
                if iy < 0 || ix < 0 || iy >= x.h as isize || ix >= x.w as isize {
                    dst.fill(T::ZERO);
                    continue;
                }
                let p = (b * x.h + iy as usize) * x.w + ix as usize;
                let src = &x.data[p * x.rs..][..c];
                match pre {
                    None => dst.copy_from_slice(src),
                    Some(p) => {
                        for (j, (d, &v)) in dst.iter_mut().zip(src).enumerate() {
                            *d = p.at(j, v);
                        }
                    }
                }
            }
        }
    }
}

/// `y: [n, ho, wo, co]` (row stride `y_rs`) = conv(pre(x), wt); `wt: [k, k, x.c, co]`.
pub fn fwd<T: Float>(
    x: Image<T>,
    pre: Option<BnRelu<T>>,
    wt: &[T],
    co: usize,
    g: Conv,
    y: &mut [T],
    y_rs: usize,
) {
    let (ho, wo) = g.out_hw(x.h, x.w);
    let m = x.n * ho * wo;
    let kc = g.k * g.k * x.c;
    if g.is_pointwise() && pre.is_none() {
        let (a, b) = (Mat::rows(x.data, x.rs), Mat::rows(wt, co));
        matmul(Gemm { m, n: co, k: kc }, Out::overwrite(y, y_rs), a, b);
        return;
    }
    // Each task packs a chunk of output pixels and multiplies it while it is hot in cache.
    let step = chunk_rows(kc);
    let y = &mut y[..(m - 1) * y_rs + co];
    y.par_chunks_mut(step * y_rs).enumerate().for_each_init(
        || vec![T::ZERO; step * kc],
        |col, (i, yc)| {
            let (r0, rows) = (i * step, step.min(m - i * step));
            im2col(x, pre, g, r0, rows, col);
            let g = Gemm {
                m: rows,
                n: co,
                k: kc,
            };
            let (a, b) = (Mat::rows(col, kc), Mat::rows(wt, co));
            matmul_1t(g, Out::overwrite(yc, y_rs), a, b);
        },
    );
}

/// `dw: [k, k, x.c, co] += d(loss)/d(wt)` given `dy: [n, ho, wo, co]` (row stride `dy_rs`).
pub fn bwd_weight<T: Float>(
    x: Image<T>,
    pre: Option<BnRelu<T>>,
    g: Conv,
    dy: &[T],
    dy_rs: usize,
    co: usize,
    dw: &mut [T],
) {
    let (ho, wo) = g.out_hw(x.h, x.w);
    let m = x.n * ho * wo;
    let kc = g.k * g.k * x.c;
    if g.is_pointwise() && pre.is_none() {
        let (a, b) = (Mat::t(x.data, x.rs), Mat::rows(dy, dy_rs));
        matmul(Gemm { m: kc, n: co, k: m }, Out::accumulate(dw, co), a, b);
        return;
    }
    // One partial dW per thread over a fixed, contiguous range of chunks, summed in order:
    // the result does not depend on scheduling.
    let step = chunk_rows(kc);
    let chunks = m.div_ceil(step);
    let parts = rayon::current_num_threads().min(chunks);
    let partial: Vec<Vec<T>> = (0..parts)
        .into_par_iter()
        .map(|p| {
            let mut col = vec![T::ZERO; step * kc];
            let mut part = vec![T::ZERO; kc * co];
            for ci in chunks * p / parts..chunks * (p + 1) / parts {
                let (r0, rows) = (ci * step, step.min(m - ci * step));
                im2col(x, pre, g, r0, rows, &mut col);
                let dyc = Mat::rows(&dy[r0 * dy_rs..], dy_rs);
                let g = Gemm {
                    m: kc,
                    n: co,
                    k: rows,
                };
                matmul_1t(g, Out::accumulate(&mut part, co), Mat::t(&col, kc), dyc);
            }
            part
        })
        .collect();
    for part in partial {
        dw.iter_mut().zip(&part).for_each(|(d, &p)| *d += p);
    }
}

/// `dx: [n, h, w, ci]` (contiguous, overwritten) = d(loss)/d(conv input) given
/// `dy: [n, ho, wo, co]` (row stride `dy_rs`) and `wt: [k, k, ci, co]`, by one of three
/// algorithms: a 1×1 is one GEMM; a stride-1 window the forward convolution of dy with the
/// flipped kernel; any other window a GEMM into im2col space and a gather.
pub fn bwd_data<T: Float>(
    dy: &[T],
    dy_rs: usize,
    co: usize,
    wt: &[T],
    g: Conv,
    dims: (usize, usize, usize, usize),
    dx: &mut [T],
) {
    let (n, h, w, ci) = dims;
    let dy = Mat::rows(dy, dy_rs);
    if g.is_pointwise() {
        let g = Gemm {
            m: n * h * w,
            n: ci,
            k: co,
        };
        matmul(g, Out::overwrite(dx, ci), dy, Mat::t(wt, co));
    } else if g.stride == 1 && g.pad < g.k {
        bwd_data_flipped(dy, co, wt, g, dims, dx);
    } else {
        bwd_data_gathered(dy, co, wt, g, dims, dx);
    }
}

/// [`bwd_data`] of a stride-1 window: the conv of dy with the flipped, transposed kernel and
/// padding k-1-pad (no scatter, and a packing buffer 9×co wide, not 9×ci).
fn bwd_data_flipped<T: Float>(
    dy: Mat<T>,
    co: usize,
    wt: &[T],
    g: Conv,
    (n, h, w, ci): (usize, usize, usize, usize),
    dx: &mut [T],
) {
    let (ho, wo) = g.out_hw(h, w);
    let k = g.k;
    let mut wf = vec![T::ZERO; k * k * co * ci]; // [k, k, co, ci]
    for ky in 0..k {
        for kx in 0..k {
            for i in 0..ci {
                for o in 0..co {
                    wf[((ky * k + kx) * co + o) * ci + i] =
                        wt[(((k - 1 - ky) * k + (k - 1 - kx)) * ci + i) * co + o];
                }
            }
        }
    }
    let gt = Conv {
        k,
        stride: 1,
        pad: k - 1 - g.pad,
    };
    let dyi = Image {
        data: dy.data,
        n,
        h: ho,
        w: wo,
        c: co,
        rs: dy.rs,
    };
    fwd(dyi, None, &wf, ci, gt, dx, ci);
}

/// [`bwd_data`] of any window: dcol = dy · wtᵀ, then each input pixel gathers the entries it fed.
fn bwd_data_gathered<T: Float>(
    dy: Mat<T>,
    co: usize,
    wt: &[T],
    g: Conv,
    (n, h, w, ci): (usize, usize, usize, usize),
    dx: &mut [T],
) {
    let (ho, wo) = g.out_hw(h, w);
    let kc = g.k * g.k * ci;
    let m = n * ho * wo;
    let mut dcol = vec![T::ZERO; m * kc];
    let gemm = Gemm { m, n: kc, k: co };
    matmul(gemm, Out::overwrite(&mut dcol, kc), dy, Mat::t(wt, co));
    // Output coordinate of input coordinate t through tap kt, if some output reads it there.
    let out_of = |t: usize, kt: usize, len: usize| {
        let t = t + g.pad;
        (t >= kt && (t - kt).is_multiple_of(g.stride) && (t - kt) / g.stride < len)
            .then(|| (t - kt) / g.stride)
    };
    par_rows(dx, n * h * w, ci, |p, out| {
        let (b, iy, ix) = (p / (h * w), (p / w) % h, p % w);
        out.fill(T::ZERO);
        for ky in 0..g.k {
            let Some(oy) = out_of(iy, ky, ho) else {
                continue;
            };
            for kx in 0..g.k {
                let Some(ox) = out_of(ix, kx, wo) else {
                    continue;
                };
                let src = &dcol[((b * ho + oy) * wo + ox) * kc + (ky * g.k + kx) * ci..][..ci];
                out.iter_mut().zip(src).for_each(|(o, &s)| *o += s);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{dot, fd_check, randn, TOL};
    use crate::rng::Rng;

    /// Direct-loop reference convolution (no pre-activation), for checking the GEMM paths.
    fn naive(
        x: &[f64],
        (n, h, w, ci): (usize, usize, usize, usize),
        wt: &[f64],
        co: usize,
        g: Conv,
    ) -> Vec<f64> {
        let (ho, wo) = g.out_hw(h, w);
        let mut y = vec![0.0; n * ho * wo * co];
        for b in 0..n {
            for oy in 0..ho {
                for ox in 0..wo {
                    for o in 0..co {
                        let mut s = 0.0;
                        for ky in 0..g.k {
                            for kx in 0..g.k {
                                let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                                let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                for i in 0..ci {
                                    s += x[((b * h + iy as usize) * w + ix as usize) * ci + i]
                                        * wt[((ky * g.k + kx) * ci + i) * co + o];
                                }
                            }
                        }
                        y[((b * ho + oy) * wo + ox) * co + o] = s;
                    }
                }
            }
        }
        y
    }

    fn check(
        g: Conv,
        (n, h, w, ci, co): (usize, usize, usize, usize, usize),
        with_pre: bool,
        seed: u64,
    ) {
        let mut rng = Rng::new(seed);
        let rs = ci + 3; // a channel-prefix view of a wider buffer
        let mut x = randn(&mut rng, n * h * w * rs);
        let wt = randn(&mut rng, g.k * g.k * ci * co);
        let scale = randn(&mut rng, ci);
        let shift = randn(&mut rng, ci);
        let (ho, wo) = g.out_hw(h, w);
        let r = randn(&mut rng, n * ho * wo * co);
        let fwd = |x: &[f64], wt: &[f64]| {
            let pre = with_pre.then_some(BnRelu {
                scale: &scale,
                shift: &shift,
            });
            let mut y = vec![0.0; n * ho * wo * co];
            fwd(
                Image {
                    data: x,
                    n,
                    h,
                    w,
                    c: ci,
                    rs,
                },
                pre,
                wt,
                co,
                g,
                &mut y,
                co,
            );
            y
        };
        if !with_pre {
            let xc: Vec<f64> = x.chunks(rs).flat_map(|p| p[..ci].to_vec()).collect();
            let want = naive(&xc, (n, h, w, ci), &wt, co, g);
            let got = fwd(&x, &wt);
            assert!(want.iter().zip(&got).all(|(a, b)| (a - b).abs() < 1e-10));
        }
        // Weight gradient.
        let mut dw = randn(&mut rng, wt.len());
        let dw0 = dw.clone();
        let pre = with_pre.then_some(BnRelu {
            scale: &scale,
            shift: &shift,
        });
        bwd_weight(
            Image {
                data: &x,
                n,
                h,
                w,
                c: ci,
                rs,
            },
            pre,
            g,
            &r,
            co,
            co,
            &mut dw,
        );
        let dw: Vec<f64> = dw.iter().zip(&dw0).map(|(a, b)| a - b).collect();
        let xs = x.clone();
        let err = fd_check(&mut wt.clone(), &dw, |wt| dot(&fwd(&xs, wt), &r));
        assert!(err < TOL, "conv {g:?} dW rel err {err}");
        if with_pre {
            return;
        }
        // Input gradient (w.r.t. the contiguous input channels).
        let mut dx = vec![f64::NAN; n * h * w * ci];
        bwd_data(&r, co, co, &wt, g, (n, h, w, ci), &mut dx);
        let mut dxs = vec![0.0; x.len()];
        for p in 0..n * h * w {
            dxs[p * rs..p * rs + ci].copy_from_slice(&dx[p * ci..][..ci]);
        }
        let wt2 = wt.clone();
        let err = fd_check(&mut x, &dxs, |x| dot(&fwd(x, &wt2), &r));
        assert!(err < TOL, "conv {g:?} dX rel err {err}");
    }

    #[test]
    fn conv_1x1_gradients() {
        check(
            Conv {
                k: 1,
                stride: 1,
                pad: 0,
            },
            (2, 3, 4, 5, 6),
            false,
            1,
        );
        check(
            Conv {
                k: 1,
                stride: 1,
                pad: 0,
            },
            (2, 3, 4, 5, 6),
            true,
            2,
        );
    }

    #[test]
    fn conv_3x3_gradients() {
        check(
            Conv {
                k: 3,
                stride: 1,
                pad: 1,
            },
            (2, 5, 4, 3, 4),
            false,
            3,
        );
        check(
            Conv {
                k: 3,
                stride: 1,
                pad: 1,
            },
            (2, 5, 4, 3, 4),
            true,
            4,
        );
    }

    #[test]
    fn conv_strided_gradients() {
        check(
            Conv {
                k: 7,
                stride: 2,
                pad: 3,
            },
            (2, 9, 8, 3, 4),
            false,
            5,
        );
        check(
            Conv {
                k: 3,
                stride: 2,
                pad: 0,
            },
            (1, 7, 6, 2, 3),
            false,
            6,
        );
    }
}
