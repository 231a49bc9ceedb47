//! Pooling (kernels/pool.cu; CPU reference `crate::ops::pool`): the stem's 3×3/2 pad 1 max pool
//! with norm0 + ReLU applied as it reads, the transitions' 2×2/2 average pool with their BN +
//! ReLU applied as it reads, and the head's global average pool; forward and backward.

use super::{dims_are, elementwise, pre_ptrs, Act, BnRelu};
use crate::gpu::error::bail_shape;
use crate::gpu::kernels::launch as k;
use crate::gpu::{Driver, Mat, Nhwc};
use crate::ops::pool::maxpool_out;
use anyhow::Result;

/// Refuses a view with a row stride wider than its channels (a kernel that reads it whole).
fn contiguous<T>(what: &str, x: Nhwc<T>) -> Result<()> {
    if x.rs() != x.c() {
        bail_shape!(
            "{what} must be contiguous (row stride {} for {} channels)",
            x.rs(),
            x.c()
        );
    }
    Ok(())
}

/// `y: [n, ho, wo, c]` = max pool 3×3/2 pad 1 of `pre(x)`, `x: [n, h, w, c]` contiguous; `pre`:
/// a BN + ReLU applied as `x` is read (the stem's norm0 + ReLU, never stored), or None.
pub fn maxpool_fwd<T: Act>(
    d: &dyn Driver,
    x: Nhwc<T>,
    pre: Option<BnRelu>,
    y: Nhwc<T>,
) -> Result<()> {
    let (n, h, w, c) = x.dims();
    contiguous("the max pool's input", x)?;
    let (ho, wo) = maxpool_out(h, w);
    dims_are("the max pool's output", y, (n, ho, wo, c))?;
    let (scale, shift) = pre_ptrs(pre, c)?;
    let at = elementwise(y.rows() * c)?;
    // SAFETY: x and y are checked views of the shapes the kernel reads and writes.
    unsafe { k::maxpool_fwd::<T>(d, at, y.ptr(), y.rs(), x.ptr(), n, h, w, c, scale, shift) }
}

/// `dx: [n, h, w, c]` (contiguous, overwritten): the gradient of `pre(x)` (not through the BN +
/// ReLU) from `dy: [n, ho, wo, c]`; `x` and `pre` as in the forward.
pub fn maxpool_bwd<T: Act>(
    d: &dyn Driver,
    x: Nhwc<T>,
    pre: Option<BnRelu>,
    dy: Nhwc<T>,
    dx: Nhwc<T>,
) -> Result<()> {
    let (n, h, w, c) = x.dims();
    contiguous("the max pool's input", x)?;
    contiguous("the max pool's input gradient", dx)?;
    dims_are("the max pool's input gradient", dx, x.dims())?;
    let (ho, wo) = maxpool_out(h, w);
    dims_are("the max pool's output gradient", dy, (n, ho, wo, c))?;
    let (scale, shift) = pre_ptrs(pre, c)?;
    let at = elementwise(x.rows() * c)?;
    let (dyp, dys) = (dy.ptr(), dy.rs());
    // SAFETY: x, dy and dx are checked views of the shapes the kernel reads and writes.
    unsafe { k::maxpool_bwd::<T>(d, at, dx.ptr(), x.ptr(), dyp, dys, n, h, w, c, scale, shift) }
}

/// `y: [n, h/2, w/2, c]` = average pool 2×2/2 of `pre(x)`, `x: [n, h, w, c]`.
pub fn avgpool_fwd<T: Act>(
    d: &dyn Driver,
    x: Nhwc<T>,
    pre: Option<BnRelu>,
    y: Nhwc<T>,
) -> Result<()> {
    let (n, h, w, c) = x.dims();
    dims_are("the average pool's output", y, (n, h / 2, w / 2, c))?;
    let (scale, shift) = pre_ptrs(pre, c)?;
    let at = elementwise(y.rows() * c)?;
    let (yp, ys, xp, xs) = (y.ptr(), y.rs(), x.ptr(), x.rs());
    // SAFETY: x and y are checked views of the shapes the kernel reads and writes.
    unsafe { k::avgpool_fwd::<T>(d, at, yp, ys, xp, xs, n, h, w, c, scale, shift) }
}

/// `dx: [n, h, w, c]` (contiguous, overwritten; pixels the floor drops get 0) from
/// `dy: [n, h/2, w/2, c]`. (The BN + ReLU's backward is the caller's.)
pub fn avgpool_bwd<T: Act>(d: &dyn Driver, dy: Nhwc<T>, dx: Nhwc<T>) -> Result<()> {
    let (n, h, w, c) = dx.dims();
    contiguous("the average pool's input gradient", dx)?;
    dims_are(
        "the average pool's output gradient",
        dy,
        (n, h / 2, w / 2, c),
    )?;
    let at = elementwise(dx.rows() * c)?;
    // SAFETY: dy and dx are checked views of the shapes the kernel reads and writes.
    unsafe { k::avgpool_bwd::<T>(d, at, dx.ptr(), dy.ptr(), dy.rs(), n, h, w, c) }
}

/// `feat: [n, c]` f32 = the mean over each image's pixels of `x: [n, h, w, c]` (contiguous).
pub fn gap_fwd<T: Act>(d: &dyn Driver, x: Nhwc<T>, feat: Mat<f32>) -> Result<()> {
    let (n, h, w, c) = x.dims();
    contiguous("the global average pool's input", x)?;
    if (feat.rows(), feat.cols(), feat.rs()) != (n, c, c) {
        bail_shape!("the pooled features must be a contiguous [{n}, {c}]");
    }
    // SAFETY: x and feat are checked views of the shapes the kernel reads and writes.
    unsafe { k::gap_fwd::<T>(d, elementwise(n * c)?, feat.ptr(), x.ptr(), n, h * w, c) }
}

/// `dx: [n, h, w, c]` (contiguous, overwritten) = `dfeat: [n, c]` f32 / (h·w), broadcast.
pub fn gap_bwd<T: Act>(d: &dyn Driver, dfeat: Mat<f32>, dx: Nhwc<T>) -> Result<()> {
    let (n, h, w, c) = dx.dims();
    contiguous("the global average pool's input gradient", dx)?;
    if (dfeat.rows(), dfeat.cols(), dfeat.rs()) != (n, c, c) {
        bail_shape!("the features' gradient must be a contiguous [{n}, {c}]");
    }
    let at = elementwise(dx.rows() * c)?;
    // SAFETY: dfeat and dx are checked views of the shapes the kernel reads and writes.
    unsafe { k::gap_bwd::<T>(d, at, dx.ptr(), dfeat.ptr(), n, h * w, c) }
}
