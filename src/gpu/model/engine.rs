//! What differs between the two storage precisions of the GPU model: how a convolution runs, and
//! how the BN statistics of its output and the BN backward's reductions are computed.
//!
//! - f32 ([`f32`]): the CUDA-core kernels of `ops::conv` with the parameters as weights, then a
//!   separate statistics pass over each output and a separate reduction pass in each BN backward.
//! - bf16 ([`bf16`]): every convolution (stem, dense layers, transitions) on the tensor cores
//!   (`ops::conv_tc`) with a bf16 copy of the weights; each BN + ReLU applied while the consuming
//!   convolution loads its input; the batch statistics of the channels a convolution writes summed
//!   in its epilogue; a dense layer's data gradients apply the ReLU mask and sum their BN
//!   backward's reductions in their epilogues.

use super::GpuDenseNet;
use crate::gpu::ops::bn::{self, Grad, Saved, Stats};
use crate::gpu::ops::conv_tc::{self, Mask};
use crate::gpu::ops::{cast, conv, Act, BnRelu};
use crate::gpu::{Nhwc, Slice};
use crate::model::schedule::{BnIdx, ConvIdx};
use anyhow::{Context, Result};
use half::bf16;

/// A dense layer's BN + ReLU → convolution, as its backward sees it.
#[derive(Clone, Copy, Debug)]
pub struct BnConv<T> {
    pub bn: BnIdx,
    /// What the BN normalised: its input, statistics and coefficients.
    pub saved: Saved<T>,
    pub conv: ConvIdx,
}

/// The storage type of the GPU model's activations, with the convolutions that go with it.
pub trait Engine: Act {
    /// Whether the convolutions run on the tensor cores (with a bf16 copy of the weights).
    const TENSOR_CORES: bool;

    /// The host's f32 batch `x` into the model's input `input` (`staging`: an f32 buffer of the
    /// same length, for a type other than f32).
    #[doc(hidden)]
    fn load_input(
        m: &GpuDenseNet<Self>,
        x: &[f32],
        staging: Option<Slice<f32>>,
        input: Slice<Self>,
    ) -> Result<()>;

    /// `y = conv(pre(x))`; with `stats`, also the batch statistics of `y`'s channels, into
    /// `stats` (f32: a pass over `y`; returns 0) or summed in the epilogue into the model's sums
    /// (bf16; returns `y.c()`: the channels whose statistics are pending for the next BN's
    /// coefficients). `ws`: the split-K workspace (bf16 dense layers).
    #[doc(hidden)]
    #[allow(clippy::too_many_arguments)]
    fn conv_fwd(
        m: &GpuDenseNet<Self>,
        x: Nhwc<Self>,
        pre: Option<BnRelu>,
        cv: ConvIdx,
        y: Nhwc<Self>,
        stats: Option<Stats>,
        ws: Option<Slice<f32>>,
    ) -> Result<usize>;

    /// Backward of a dense layer's BN + ReLU → convolution from `dy`: the weight gradient, then
    /// into `dx` the gradient of the BN's input, through `scratch` (`[rows, c]` of the BN's
    /// input). With `deferred` only the per-element term goes into `dx` and the rest, affine in x
    /// per channel, into the deferred terms (`bn::grad_fix` applies them).
    #[doc(hidden)]
    fn layer_bwd(
        m: &GpuDenseNet<Self>,
        layer: BnConv<Self>,
        dy: Nhwc<Self>,
        dx: Grad<Self>,
        scratch: Nhwc<Self>,
        deferred: Option<bn::Deferred>,
    ) -> Result<()>;

    /// The weight gradient of a convolution with no BN in front (the stem, a transition).
    #[doc(hidden)]
    fn conv_bwd_weight(
        m: &GpuDenseNet<Self>,
        x: Nhwc<Self>,
        cv: ConvIdx,
        dy: Nhwc<Self>,
    ) -> Result<()>;

    /// The data gradient of a 1×1 convolution with no BN in front (a transition), overwriting `dx`.
    #[doc(hidden)]
    fn conv_bwd_data(
        m: &GpuDenseNet<Self>,
        dy: Nhwc<Self>,
        cv: ConvIdx,
        dx: Nhwc<Self>,
    ) -> Result<()>;
}

impl Engine for f32 {
    const TENSOR_CORES: bool = false;

    fn load_input(
        m: &GpuDenseNet<f32>,
        x: &[f32],
        _: Option<Slice<f32>>,
        input: Slice<f32>,
    ) -> Result<()> {
        input.upload(&*m.d, x)
    }

    fn conv_fwd(
        m: &GpuDenseNet<f32>,
        x: Nhwc<f32>,
        pre: Option<BnRelu>,
        cv: ConvIdx,
        y: Nhwc<f32>,
        stats: Option<Stats>,
        _ws: Option<Slice<f32>>,
    ) -> Result<usize> {
        let d = &*m.d;
        conv::fwd(d, x, pre, m.conv_weights(cv)?, cv.g, y)?;
        if let Some(stats) = stats {
            bn::batch_stats(d, y.mat(), stats, m.bn_part.slice())?;
        }
        Ok(0)
    }

    fn layer_bwd(
        m: &GpuDenseNet<f32>,
        layer: BnConv<f32>,
        dy: Nhwc<f32>,
        dx: Grad<f32>,
        scratch: Nhwc<f32>,
        deferred: Option<bn::Deferred>,
    ) -> Result<()> {
        let (d, cv, s) = (&*m.d, layer.conv, layer.saved);
        let (pre, dparams) = (m.coefs(layer.bn)?, m.bn_grads(layer.bn)?);
        let x = Nhwc::new(s.x.slice(), scratch.dims(), s.x.rs())?;
        let dw = m.grad(cv.p, cv.len())?;
        conv::bwd_weight(d, x, Some(pre), cv.g, dy, dw)?;
        conv::bwd_data(d, dy, m.conv_weights(cv)?, cv.g, scratch, false)?;
        let da = scratch.mat();
        match deferred {
            Some(def) => bn::backward_deferred(d, s, da, dparams, dx, m.bn_part.slice(), def),
            None => bn::backward(d, s, true, true, da, dparams, dx, m.bn_scratch()),
        }
    }

    fn conv_bwd_weight(
        m: &GpuDenseNet<f32>,
        x: Nhwc<f32>,
        cv: ConvIdx,
        dy: Nhwc<f32>,
    ) -> Result<()> {
        let dw = m.grad(cv.p, cv.len())?;
        conv::bwd_weight(&*m.d, x, None, cv.g, dy, dw)
    }

    fn conv_bwd_data(
        m: &GpuDenseNet<f32>,
        dy: Nhwc<f32>,
        cv: ConvIdx,
        dx: Nhwc<f32>,
    ) -> Result<()> {
        conv::bwd_data(&*m.d, dy, m.conv_weights(cv)?, cv.g, dx, false)
    }
}

impl Engine for bf16 {
    const TENSOR_CORES: bool = true;

    fn load_input(
        m: &GpuDenseNet<bf16>,
        x: &[f32],
        staging: Option<Slice<f32>>,
        input: Slice<bf16>,
    ) -> Result<()> {
        let staging = staging
            .context("a bf16 plan has an f32 staging buffer")?
            .range(0, x.len())?;
        staging.upload(&*m.d, x)?;
        cast::to_bf16(&*m.d, staging, input.range(0, x.len())?)
    }

    fn conv_fwd(
        m: &GpuDenseNet<bf16>,
        x: Nhwc<bf16>,
        pre: Option<BnRelu>,
        cv: ConvIdx,
        y: Nhwc<bf16>,
        stats: Option<Stats>,
        ws: Option<Slice<f32>>,
    ) -> Result<usize> {
        // (The sums are zero: zeroed at the start of the pass and by each consumer.)
        let sums = match stats {
            Some(_) => Some(m.sums(y.c())?),
            None => None,
        };
        let wt = m.conv_weights_bf16(cv)?;
        conv_tc::fwd(&*m.d, x, pre, wt, cv.g, y, sums, ws)?;
        Ok(if stats.is_some() { y.c() } else { 0 })
    }

    fn layer_bwd(
        m: &GpuDenseNet<bf16>,
        layer: BnConv<bf16>,
        dy: Nhwc<bf16>,
        dx: Grad<bf16>,
        scratch: Nhwc<bf16>,
        deferred: Option<bn::Deferred>,
    ) -> Result<()> {
        let (d, cv, s) = (&*m.d, layer.conv, layer.saved);
        let (pre, dparams) = (m.coefs(layer.bn)?, m.bn_grads(layer.bn)?);
        let x = Nhwc::new(s.x.slice(), scratch.dims(), s.x.rs())?;
        let dw = m.grad(cv.p, cv.len())?;
        conv_tc::bwd_weight(d, x, Some(pre), cv.g, dy, dw)?;
        let (wt, sums) = (m.conv_weights_bf16(cv)?, m.sums(x.c())?);
        let mask = Some(Mask { x, bn: pre });
        if let Some(def) = deferred {
            let out = Nhwc::new(dx.mat.slice(), x.dims(), dx.mat.rs())?;
            let post = Some(pre.scale);
            conv_tc::bwd_data(d, dy, wt, cv.g, out, dx.accumulate, mask, Some(sums), post)?;
            return bn::defer_from_sums(d, s, sums, dparams, def);
        }
        conv_tc::bwd_data(d, dy, wt, cv.g, scratch, false, mask, Some(sums), None)?;
        let coef = m.bn_coef.slice();
        bn::backward_from_sums(d, s, sums, scratch.mat(), dparams, dx, coef)
    }

    fn conv_bwd_weight(
        m: &GpuDenseNet<bf16>,
        x: Nhwc<bf16>,
        cv: ConvIdx,
        dy: Nhwc<bf16>,
    ) -> Result<()> {
        let dw = m.grad(cv.p, cv.len())?;
        conv_tc::bwd_weight(&*m.d, x, None, cv.g, dy, dw)
    }

    fn conv_bwd_data(
        m: &GpuDenseNet<bf16>,
        dy: Nhwc<bf16>,
        cv: ConvIdx,
        dx: Nhwc<bf16>,
    ) -> Result<()> {
        let wt = m.conv_weights_bf16(cv)?;
        conv_tc::bwd_data(&*m.d, dy, wt, cv.g, dx, false, None, None, None)
    }
}
