//! CPU reference ops in NHWC, generic over f32 and f64: each op family has a forward, a
//! backward and a finite-difference gradient test next to it. Each op bears the same name in
//! every layer: `ops::<op>` here, `kernels/<op>.cu`, `gpu::ops::<op>`, `tests/ops/<op>.rs`.
//!
//! Activations are `[N, H, W, C]` row-major, i.e. a `[N*H*W, C]` matrix whose rows may be
//! longer than `C` (a channel prefix of a dense block's buffer): such views carry a row
//! stride `rs >= C`.

pub mod adam;
pub mod augment;
pub mod bn;
pub mod conv;
pub mod linear;
pub mod pool;

use rayon::prelude::*;
use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

/// The element types the CPU engine runs in: f32 for work, f64 for gradient checks.
pub trait Float:
    Copy
    + Send
    + Sync
    + Debug
    + Default
    + PartialOrd
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + Sum
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn sqrt(self) -> Self;
    fn exp(self) -> Self;
    fn is_nan(self) -> bool;
}

macro_rules! impl_float {
    ($t:ty) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            #[inline(always)]
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn is_nan(self) -> bool {
                <$t>::is_nan(self)
            }
        }
    };
}
impl_float!(f32);
impl_float!(f64);

/// Whether a pass trains (batch statistics, which it also records) or evaluates (running ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Train,
    Eval,
}

impl Mode {
    /// `v` in training, none in evaluation (what only a training pass computes: batch
    /// statistics, the next stage's sums).
    pub fn when_training<V>(self, v: V) -> Option<V> {
        (self == Mode::Train).then_some(v)
    }
}

/// How an op puts a value into its output: replacing what is there, or adding to it (a dense
/// block's shared gradient buffer, a GEMM that accumulates).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    Overwrite,
    Accumulate,
}

impl Write {
    /// What the output holds after putting `v` where it held `old`.
    #[inline(always)]
    pub fn put<T: Float>(self, old: T, v: T) -> T {
        match self {
            Write::Overwrite => v,
            Write::Accumulate => old + v,
        }
    }
}

/// What follows a BN's affine `x · scale + shift`: nothing, or a ReLU (the DenseNet's every BN).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Identity,
    Relu,
}

/// A `[rows, c]` matrix in a row-major buffer whose rows are `rs >= c` long (a channel prefix of
/// a wider buffer).
#[derive(Clone, Copy)]
pub struct Rows<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub c: usize,
    pub rs: usize,
}

impl<'a, T> Rows<'a, T> {
    pub fn new(data: &'a [T], rows: usize, c: usize, rs: usize) -> Self {
        Rows { data, rows, c, rs }
    }
    /// Row `r`'s `c` values.
    #[inline(always)]
    pub fn row(&self, r: usize) -> &'a [T] {
        &self.data[r * self.rs..][..self.c]
    }
}

/// An NHWC input view: `[n, h, w, c]` with row (pixel) stride `rs >= c`.
#[derive(Clone, Copy)]
pub struct Image<'a, T> {
    pub data: &'a [T],
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub rs: usize,
}

impl<'a, T> Image<'a, T> {
    /// Contiguous `[n, h, w, c]` pixels (`rs = c`).
    pub fn dense(data: &'a [T], (n, h, w, c): (usize, usize, usize, usize)) -> Self {
        Image {
            data,
            n,
            h,
            w,
            c,
            rs: c,
        }
    }
    /// Its pixels as a `[n·h·w, c]` matrix.
    pub fn rows(&self) -> Rows<'a, T> {
        Rows::new(self.data, self.n * self.h * self.w, self.c, self.rs)
    }
}

/// Where an op writes a matrix: the first columns of rows `rs` long in `data`, overwritten or
/// added to.
pub struct Out<'a, T> {
    pub data: &'a mut [T],
    pub rs: usize,
    pub write: Write,
}

impl<'a, T> Out<'a, T> {
    /// Rows of stride `rs` in `data`, overwritten.
    pub fn overwrite(data: &'a mut [T], rs: usize) -> Self {
        Out {
            data,
            rs,
            write: Write::Overwrite,
        }
    }
    /// Rows of stride `rs` in `data`, added to.
    pub fn accumulate(data: &'a mut [T], rs: usize) -> Self {
        Out {
            data,
            rs,
            write: Write::Accumulate,
        }
    }
}

/// The sizes of a matrix product `c[m, n] = a[m, k] · b[k, n]`.
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// A per-channel pre-activation applied to an op's input as it is read:
/// `relu(x * scale[c] + shift[c])` (a fused BN + ReLU).
#[derive(Clone, Copy)]
pub struct BnRelu<'a, T> {
    pub scale: &'a [T], // [c]
    pub shift: &'a [T], // [c]
}

impl<T: Float> BnRelu<'_, T> {
    #[inline(always)]
    pub fn at(&self, j: usize, x: T) -> T {
        let v = x * self.scale[j] + self.shift[j];
        // `v <= 0`, not `v > 0`: a NaN passes through (as in PyTorch) instead of becoming 0. The
        // kernels' `bn_relu` (kernels/common.cuh) is this rule.
        if v <= T::ZERO {
            T::ZERO
        } else {
            v
        }
    }
}

/// A strided matrix operand: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a, T> {
    pub data: &'a [T],
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// Row-major with row stride `rs`.
    pub fn rows(data: &'a [T], rs: usize) -> Self {
        Mat { data, rs, cs: 1 }
    }
    /// The transpose of a row-major matrix with row stride `rs`.
    pub fn t(data: &'a [T], rs: usize) -> Self {
        Mat {
            data,
            rs: 1,
            cs: rs,
        }
    }
}

fn extent(m: usize, n: usize, rs: usize, cs: usize) -> usize {
    if m == 0 || n == 0 {
        0
    } else {
        (m - 1) * rs + (n - 1) * cs + 1
    }
}

/// `c (+)= a · b` of sizes `g` (`c` overwritten or added to, as `c.write` says). Multi-threaded
/// over rayon's pool.
pub fn matmul<T: Float>(g: Gemm, c: Out<T>, a: Mat<T>, b: Mat<T>) {
    gemm_call(g, c, a, b, gemm::Parallelism::Rayon(0))
}

/// [`matmul`] on the calling thread only (for callers that parallelise over row chunks).
pub fn matmul_1t<T: Float>(g: Gemm, c: Out<T>, a: Mat<T>, b: Mat<T>) {
    gemm_call(g, c, a, b, gemm::Parallelism::None)
}

fn gemm_call<T: Float>(g: Gemm, c: Out<T>, a: Mat<T>, b: Mat<T>, par: gemm::Parallelism) {
    let (Gemm { m, n, k }, c_rs, acc) = (g, c.rs, c.write == Write::Accumulate);
    let c = c.data;
    assert!(c.len() >= extent(m, n, c_rs, 1), "matmul: c too small");
    assert!(
        a.data.len() >= extent(m, k, a.rs, a.cs),
        "matmul: a too small"
    );
    assert!(
        b.data.len() >= extent(k, n, b.rs, b.cs),
        "matmul: b too small"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            for i in 0..m {
                c[i * c_rs..i * c_rs + n].fill(T::ZERO);
            }
        }
        return;
    }
    // SAFETY: the asserts above keep every access of the strided views inside the slices,
    // and `c` is borrowed mutably so it cannot alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            c_rs as isize,
            acc,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            par,
        )
    }
}

/// Rows per parallel task for row-wise elementwise work on `[rows, cols]`.
pub(crate) fn row_chunk(rows: usize, cols: usize) -> usize {
    let per = (16384 / cols.max(1)).max(1);
    per.min(rows.div_ceil(rayon::current_num_threads() * 4).max(1))
}

/// Column sums over `rows` rows: `f(r, acc)` adds row `r`'s `width` contributions into
/// `acc`. Rows are summed in parallel chunks in `T`, the chunks in order in f64, so the
/// result does not depend on thread scheduling.
pub(crate) fn row_sums<T: Float>(
    rows: usize,
    width: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) -> Vec<f64> {
    let chunk = row_chunk(rows, width).min(256);
    (0..rows.div_ceil(chunk))
        .into_par_iter()
        .map(|ci| {
            let mut part = vec![T::ZERO; width];
            for r in ci * chunk..((ci + 1) * chunk).min(rows) {
                f(r, &mut part);
            }
            part
        })
        .collect::<Vec<_>>()
        .into_iter()
        .fold(vec![0.0; width], |mut acc, part| {
            acc.iter_mut()
                .zip(&part)
                .for_each(|(a, &p)| *a += p.to_f64());
            acc
        })
}

/// Apply `f(row_index, row)` to each row of a `[rows, *]` buffer with row stride `rs`, in parallel.
pub(crate) fn par_rows<T: Float>(
    x: &mut [T],
    rows: usize,
    rs: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let x = &mut x[..rows * rs];
    let chunk = row_chunk(rows, rs);
    x.par_chunks_mut(chunk * rs)
        .enumerate()
        .for_each(|(ci, block)| {
            for (i, row) in block.chunks_mut(rs).enumerate() {
                f(ci * chunk + i, row);
            }
        });
}

#[cfg(test)]
pub(crate) mod testutil {
    use crate::rng::Rng;

    pub fn randn(rng: &mut Rng, n: usize) -> Vec<f64> {
        (0..n).map(|_| rng.normal()).collect()
    }

    pub fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    /// Central-difference gradient of `f` at `x`, compared with `analytic`; returns
    /// `‖fd − analytic‖ / ‖fd‖` (with a tiny floor).
    pub fn fd_check(x: &mut [f64], analytic: &[f64], mut f: impl FnMut(&[f64]) -> f64) -> f64 {
        let h = 1e-6;
        let mut num = 0.0;
        let mut den = 0.0;
        for i in 0..x.len() {
            let x0 = x[i];
            x[i] = x0 + h;
            let fp = f(x);
            x[i] = x0 - h;
            let fm = f(x);
            x[i] = x0;
            let g = (fp - fm) / (2.0 * h);
            num += (g - analytic[i]).powi(2);
            den += g * g;
        }
        assert!(den > 0.0, "fd_check: gradient is identically zero");
        (num / den).sqrt()
    }

    pub const TOL: f64 = 1e-6;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn bn_relu_propagates_nan() {
        let f = BnRelu {
            scale: &[1.0f32, 2.0],
            shift: &[0.0, -1.0],
        };
        assert!(f.at(0, f32::NAN).is_nan());
        assert_eq!((f.at(1, 0.25), f.at(1, 1.0)), (0.0, 1.0));
    }

    #[test]
    fn matmul_matches_naive_with_strides() {
        let mut rng = Rng::new(1);
        let (m, n, k) = (7, 5, 9);
        let a: Vec<f64> = testutil::randn(&mut rng, m * 12); // [m, 12], use first k columns
        let b: Vec<f64> = testutil::randn(&mut rng, n * k); // b^T stored [n, k]
        let mut c = testutil::randn(&mut rng, m * 8);
        let c0 = c.clone();
        matmul(
            Gemm { m, n, k },
            Out::accumulate(&mut c, 8),
            Mat::rows(&a, 12),
            Mat::t(&b, k),
        );
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k).map(|p| a[i * 12 + p] * b[j * k + p]).sum();
                assert!((c[i * 8 + j] - c0[i * 8 + j] - s).abs() < 1e-12);
            }
            assert_eq!(c[i * 8 + n..i * 8 + 8], c0[i * 8 + n..i * 8 + 8]);
        }
    }
}
