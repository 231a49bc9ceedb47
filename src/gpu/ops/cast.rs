//! f32 → bf16 (kernels/cast.cu): the bf16 copy of the parameters that the tensor-core
//! convolutions read, and of an f32 input batch. Its CPU reference is `half::bf16::from_f32`
//! (round to nearest even).

use super::elementwise;
use crate::gpu::error::bail_shape;
use crate::gpu::kernels::launch as k;
use crate::gpu::{Driver, Slice};
use anyhow::Result;
use half::bf16;

/// `y = x` rounded to bf16, `x, y: [n]`.
pub fn to_bf16(d: &dyn Driver, x: Slice<f32>, y: Slice<bf16>) -> Result<()> {
    let n = x.len();
    if y.len() != n {
        bail_shape!("a cast of {n} values into {}", y.len());
    }
    let at = elementwise(n)?;
    // SAFETY: x and y hold n elements.
    unsafe { k::cast_fwd_bf16(d, at, y.ptr(), x.ptr(), n) }
}
