//! One Adam step over the flat f32 parameter buffer (kernels/adam.cu; CPU reference
//! `crate::ops::adam`).

use super::elementwise;
use crate::gpu::error::bail_shape;
use crate::gpu::kernels::launch as k;
use crate::gpu::{Driver, Slice};
use crate::ops::adam::Step;
use anyhow::Result;

/// `params, grads, m, v: [n]` f32: the moments and then the parameters updated by step `s`.
pub fn update(
    d: &dyn Driver,
    s: Step,
    params: Slice<f32>,
    grads: Slice<f32>,
    (m, v): (Slice<f32>, Slice<f32>),
) -> Result<()> {
    let n = params.len();
    if [grads.len(), m.len(), v.len()] != [n; 3] {
        bail_shape!(
            "Adam over {n} parameters with {} gradients and {}/{} moments",
            grads.len(),
            m.len(),
            v.len()
        );
    }
    let (bc1, bc2) = s.bias_corrections();
    let f = |x: f64| x as f32;
    // SAFETY: the four buffers hold n elements each.
    unsafe {
        k::adam_fwd_f32(
            d,
            elementwise(n)?,
            params.ptr(),
            grads.ptr(),
            m.ptr(),
            v.ptr(),
            n,
            f(s.lr),
            f(s.beta1),
            f(1.0 - s.beta1),
            f(s.beta2),
            f(1.0 - s.beta2),
            f(s.eps),
            f(s.weight_decay),
            f(bc1),
            f(bc2),
        )
    }
}
