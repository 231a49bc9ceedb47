//! The head's single-logit linear layer (kernels/linear.cu; CPU reference `crate::ops::linear`).

use crate::gpu::error::bail_shape;
use crate::gpu::kernels::launch as k;
use crate::gpu::{blocks_for, Driver, Launch, Mat, Slice};
use anyhow::{Context, Result};

/// Refuses features that are not a contiguous `[n, c]`, and weights not `[c]`, bias not `[1]`.
fn check(feat: Mat<f32>, wt: Slice<f32>, bias: Slice<f32>) -> Result<()> {
    let c = feat.cols();
    if feat.rs() != c || wt.len() != c || bias.len() != 1 {
        bail_shape!(
            "a linear layer of [{}, {c}] features (row stride {}) with {} weights and {} biases",
            feat.rows(),
            feat.rs(),
            wt.len(),
            bias.len()
        );
    }
    Ok(())
}

/// `logits: [n]` = `feat: [n, c]` · `wt: [c]` + `bias: [1]`.
pub fn fwd(
    d: &dyn Driver,
    feat: Mat<f32>,
    (wt, bias): (Slice<f32>, Slice<f32>),
    logits: Slice<f32>,
) -> Result<()> {
    check(feat, wt, bias)?;
    let (n, c) = (feat.rows(), feat.cols());
    let logits = logits.expect(n, "the logits")?.ptr();
    let blocks = u32::try_from(n)
        .ok()
        .filter(|&b| b > 0)
        .with_context(|| format!("a linear layer over {n} rows (one block a row)"))?;
    // SAFETY: every operand is checked above.
    unsafe {
        k::linear_fwd_f32(
            d,
            Launch::linear(blocks, 256),
            logits,
            feat.ptr(),
            wt.ptr(),
            bias.ptr(),
            c,
        )
    }
}

/// `dfeat: [n, c]` (overwritten); `dw: [c]`, `db: [1]` added to; from `dlogits: [n]`.
pub fn bwd(
    d: &dyn Driver,
    feat: Mat<f32>,
    (wt, bias): (Slice<f32>, Slice<f32>),
    dlogits: Slice<f32>,
    (dw, db): (Slice<f32>, Slice<f32>),
    dfeat: Mat<f32>,
) -> Result<()> {
    check(feat, wt, bias)?;
    check(dfeat, dw, db)?;
    let (n, c) = (feat.rows(), feat.cols());
    if dfeat.rows() != n {
        bail_shape!("the features' gradient has {} rows for {n}", dfeat.rows());
    }
    let dlogits = dlogits.expect(n, "the logits' gradient")?.ptr();
    // SAFETY: every operand is checked above.
    unsafe {
        k::linear_bwd_f32(
            d,
            Launch::linear(blocks_for(c, 128), 128),
            dfeat.ptr(),
            dw.ptr(),
            db.ptr(),
            feat.ptr(),
            wt.ptr(),
            dlogits,
            n,
            c,
        )
    }
}
