//! The DenseNet ops on the GPU: one file per op, under the name the op has in every layer (its
//! contract and CPU reference in `crate::ops::<op>`, its kernels in `kernels/<op>.cu`, its tests in
//! `tests/ops/<op>.rs`). `conv_tc` is the tensor-core variant of `conv` (same CPU reference).
//!
//! Every function here is safe: it takes typed views ([`super::buffer`]), checks that what its
//! kernels touch at the launch's shapes lies inside them, then launches through the typed
//! launchers generated from the kernels' signatures ([`super::kernels::launch`]). Activations are
//! NHWC in the storage type `T` ([`Act`]: f32, or bf16 with f32 accumulation); weight gradients,
//! BN parameters and statistics are f32.

pub mod adam;
pub mod augment;
pub mod bn;
pub mod cast;
pub mod conv;
pub mod conv_tc;
pub mod linear;
pub mod pool;

use super::{blocks_for, Launch, Mat, Nhwc, Ptr, Slice};
use crate::gpu::error::bail_shape;
use crate::ops::conv::Conv;
use crate::ops::Write;
use anyhow::Result;

pub use super::Act;

/// A BN + ReLU fused in front of an op, `max(x · scale + shift, 0)` per channel: the `[c]` f32
/// coefficients that [`bn::scale_shift`] computes (the CPU's `ops::BnRelu`).
#[derive(Clone, Copy, Debug)]
pub struct BnRelu {
    pub scale: Slice<f32>,
    pub shift: Slice<f32>,
}

impl BnRelu {
    /// The coefficients' pointers, after checking that they cover `c` channels.
    pub(crate) fn ptrs(self, c: usize) -> Result<(Ptr<f32>, Ptr<f32>)> {
        Ok((
            self.scale.expect(c, "a BN's scale")?.ptr(),
            self.shift.expect(c, "a BN's shift")?.ptr(),
        ))
    }
}

/// A convolution's operands: `conv(pre(x), w)` of geometry `g`, `w: [k, k, x.c, co]` in the
/// activations' type.
#[derive(Clone, Copy, Debug)]
pub struct ConvIn<T> {
    pub x: Nhwc<T>,
    pub pre: Option<BnRelu>,
    pub w: Slice<T>,
    pub g: Conv,
}

/// Where a convolution's data gradient goes: `dx`, overwritten or added to.
#[derive(Clone, Copy, Debug)]
pub struct DataOut<T> {
    pub dx: Nhwc<T>,
    pub write: Write,
}

impl<T> DataOut<T> {
    /// `dx`, overwritten.
    pub fn overwrite(dx: Nhwc<T>) -> Self {
        DataOut {
            dx,
            write: Write::Overwrite,
        }
    }
}

/// A fused BN + ReLU's pointers for `c` channels, or two nulls (no BN + ReLU).
fn pre_ptrs(pre: Option<BnRelu>, c: usize) -> Result<(Ptr<f32>, Ptr<f32>)> {
    pre.map_or(Ok((Ptr::NULL, Ptr::NULL)), |p| p.ptrs(c))
}

/// Elementwise launches over `n` items: 256 threads, at most 4096 blocks (the kernels loop).
fn elementwise(n: usize) -> Result<Launch> {
    if n > MAX_ELEMENTS {
        bail_shape!("{n} elements in one launch, more than the {MAX_ELEMENTS} its kernels index");
    }
    Ok(Launch::linear(blocks_for(n, 256).min(4096), 256))
}

/// The most elements an elementwise launch covers: its kernels count them in 32 bits, so that
/// no per-element division is a 64-bit one (`GRID_STRIDE32` in kernels/common.cuh).
pub const MAX_ELEMENTS: usize = i32::MAX as usize;

/// One thread a channel, blocks of 128.
fn per_channel(c: usize) -> Launch {
    Launch::linear(blocks_for(c, 128), 128)
}

/// Refuses two views of different shapes.
fn same_shape<T, U>(what: &str, a: Mat<T>, b: Mat<U>) -> Result<()> {
    if (a.rows(), a.cols()) != (b.rows(), b.cols()) {
        bail_shape!(
            "{what}: [{}, {}] and [{}, {}] differ",
            a.rows(),
            a.cols(),
            b.rows(),
            b.cols()
        );
    }
    Ok(())
}

/// Refuses an NHWC view whose `(n, h, w, c)` is not `want`.
fn dims_are<T>(what: &str, x: Nhwc<T>, want: (usize, usize, usize, usize)) -> Result<()> {
    if x.dims() != want {
        bail_shape!("{what} is {:?}, expected {want:?} (n, h, w, c)", x.dims());
    }
    Ok(())
}
