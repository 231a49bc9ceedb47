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
//!
//! Every function takes what it launches on explicitly (the operands, and a [`Ctx`] of the
//! driver and the reduction scratch), so the GPU model and the kernel lab's harness
//! (`tools/kernel-lab`) run the very same launches.

use crate::gpu::ops::bn::{self, Affine, CoefStep, Deferred, Grad, Saved, Stats};
use crate::gpu::ops::conv_tc::{self, BnBackward, BnStep, FwdOut, Mask, SplitK, StepOut};
use crate::gpu::ops::{cast, conv, Act, BnRelu, ConvIn, DataOut};
use crate::gpu::{Driver, Nhwc, Slice};
use crate::ops::bn::BnOpts;
use crate::ops::conv::Conv;
use crate::ops::Mode;
use anyhow::{Context, Result};
use half::bf16;

/// What the engine's launches share besides their operands: the driver and the reduction scratch.
#[derive(Clone, Copy)]
pub struct Ctx<'a> {
    pub d: &'a dyn Driver,
    /// `[2, c]` f32 or more, zero: per-channel sums a tensor-core epilogue accumulates (bf16),
    /// zeroed again by their consumer.
    pub sums: Slice<f32>,
    /// The BN reductions' scratch (`bn::scratch_len(c)` and `2c` f32 for `c` channels).
    pub bn: bn::Scratch,
    /// bf16: the split-K workspace of the forwards and data gradients (none: nothing splits).
    pub split: Option<SplitK>,
    /// bf16: one `u32`, zero: the count of finished blocks of a data gradient that finishes its
    /// BN backward's per-channel step (`conv_tc::BnStep`), left zero.
    pub done: Slice<u32>,
}

impl Ctx<'_> {
    /// The epilogue sums of `c` channels: `[2, c]`.
    fn sums(&self, c: usize) -> Result<Slice<f32>> {
        self.sums.range(0, 2 * c)
    }
}

/// The BN that reads a forward's output next, in training: its parameters, its batch statistics
/// over all its channels (the forward's output the last of them), its running statistics (updated
/// from the batch of `running.count` rows) and its coefficients. A tensor-core forward finishes
/// them in its own launch (`bn::CoefStep`).
#[derive(Clone, Copy, Debug)]
pub struct NextBn {
    pub params: Affine,
    pub stats: Stats,
    pub running: bn::Running,
    pub out: BnRelu,
}

/// What a forward leaves for the coefficients of the BN that reads its output next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Left {
    /// They are still to compute, the statistics of the BN's last `pending` channels (the
    /// forward's output, bf16) still sums in `Ctx::sums`.
    Coefficients { pending: usize },
    /// Nothing: the forward finished them ([`NextBn`]).
    Nothing,
}

/// Where a convolution's data gradient goes.
#[derive(Clone, Copy, Debug)]
#[allow(clippy::large_enum_variant)] // views, copied once per launch
pub enum DxOut<T> {
    /// Overwrites `[n, h, w, ci]` (no BN in front: a transition's pooled input).
    Plain(Nhwc<T>),
    /// Through the BN + ReLU in front ([`BnDx`]).
    Bn(BnDx<T>),
}

/// A data gradient through the BN + ReLU in front of a convolution: the gradient of the BN's
/// input into `dx` (overwritten or added to, as `dx.write` says), `dparams` += its parameters' gradients.
/// `scratch`: `[rows, ci]` the engine may overwrite (the gradient of the BN's output, f32).
/// With `deferred` only the per-element term goes into `dx` and the rest, affine in x per
/// channel, into the deferred terms (`bn::grad_fix` applies them).
#[derive(Clone, Copy, Debug)]
pub struct BnDx<T> {
    pub saved: Saved<T>,
    pub dparams: Affine,
    pub dx: Grad<T>,
    pub scratch: Nhwc<T>,
    pub deferred: Option<Deferred>,
}

/// The storage type of the GPU model's activations, with the convolutions that go with it.
pub trait Engine: Act {
    /// Whether the convolutions run on the tensor cores (with a bf16 copy of the weights).
    const TENSOR_CORES: bool;

    /// The host's f32 batch `x` into the model's input `input` (`staging`: an f32 buffer of the
    /// same length, for a type other than f32).
    fn load_input(
        d: &dyn Driver,
        x: &[f32],
        staging: Option<Slice<f32>>,
        input: Slice<Self>,
    ) -> Result<()>;

    /// The convolutions' weights as they read them: the f32 parameters themselves, or `copy`, the
    /// parameters rounded to bf16.
    fn weights(params: Slice<f32>, copy: Option<Slice<bf16>>) -> Result<Slice<Self>>;

    /// `y = conv(pre(x), w)` (`conv`, `w: [k, k, x.c, y.c]`); with `stats`, also the batch
    /// statistics of `y`'s channels, into `stats` (f32: a pass over `y`; returns 0) or summed in
    /// the epilogue into `c.sums` (bf16; returns `y.c()`: the channels whose statistics are
    /// pending for the next BN's coefficients).
    fn conv_fwd(
        c: &Ctx,
        conv: ConvIn<Self>,
        y: Nhwc<Self>,
        stats: Option<Stats>,
        next: Option<NextBn>,
    ) -> Result<Left>;

    /// `dw: [k, k, x.c, dy.c]` f32 += the weight gradient of `conv(pre(x))` from `dy`.
    fn conv_bwd_weight(
        c: &Ctx,
        x: Nhwc<Self>,
        pre: Option<BnRelu>,
        g: Conv,
        dy: Nhwc<Self>,
        dw: Slice<f32>,
    ) -> Result<()>;

    /// The data gradient of a 1×1/1 or 3×3/1 pad 1 convolution of weights `w` from `dy`, into
    /// `out`.
    fn conv_bwd_data(
        c: &Ctx,
        dy: Nhwc<Self>,
        w: Slice<Self>,
        g: Conv,
        out: DxOut<Self>,
    ) -> Result<()>;
}

impl Engine for f32 {
    const TENSOR_CORES: bool = false;

    fn load_input(
        d: &dyn Driver,
        x: &[f32],
        _: Option<Slice<f32>>,
        input: Slice<f32>,
    ) -> Result<()> {
        input.upload(d, x)
    }

    fn weights(params: Slice<f32>, _: Option<Slice<bf16>>) -> Result<Slice<f32>> {
        Ok(params)
    }

    fn conv_fwd(
        c: &Ctx,
        conv: ConvIn<f32>,
        y: Nhwc<f32>,
        stats: Option<Stats>,
        _next: Option<NextBn>,
    ) -> Result<Left> {
        conv::fwd(c.d, conv.x, conv.pre, conv.w, conv.g, y)?;
        if let Some(stats) = stats {
            bn::batch_stats(c.d, y.mat(), bn::Finish::Stats(stats), c.bn)?;
        }
        Ok(Left::Coefficients { pending: 0 })
    }

    fn conv_bwd_weight(
        c: &Ctx,
        x: Nhwc<f32>,
        pre: Option<BnRelu>,
        g: Conv,
        dy: Nhwc<f32>,
        dw: Slice<f32>,
    ) -> Result<()> {
        conv::bwd_weight(c.d, x, pre, g, dy, dw)
    }

    fn conv_bwd_data(
        c: &Ctx,
        dy: Nhwc<f32>,
        w: Slice<f32>,
        g: Conv,
        out: DxOut<f32>,
    ) -> Result<()> {
        let b = match out {
            DxOut::Plain(dx) => return conv::bwd_data(c.d, dy, w, g, DataOut::overwrite(dx)),
            DxOut::Bn(b) => b,
        };
        conv::bwd_data(c.d, dy, w, g, DataOut::overwrite(b.scratch))?;
        let (s, da) = (b.saved, b.scratch.mat());
        match b.deferred {
            Some(def) => bn::backward_deferred(c.d, s, da, b.dparams, b.dx, c.bn, def),
            None => bn::backward(c.d, s, BnOpts::relu(Mode::Train), da, b.dparams, b.dx, c.bn),
        }
    }
}

impl Engine for bf16 {
    const TENSOR_CORES: bool = true;

    fn load_input(
        d: &dyn Driver,
        x: &[f32],
        staging: Option<Slice<f32>>,
        input: Slice<bf16>,
    ) -> Result<()> {
        let staging = staging
            .context("a bf16 plan has an f32 staging buffer")?
            .range(0, x.len())?;
        staging.upload(d, x)?;
        cast::to_bf16(d, staging, input.range(0, x.len())?)
    }

    fn weights(_: Slice<f32>, copy: Option<Slice<bf16>>) -> Result<Slice<bf16>> {
        copy.context("the bf16 weights of a tensor-core model")
    }

    fn conv_fwd(
        c: &Ctx,
        conv: ConvIn<bf16>,
        y: Nhwc<bf16>,
        stats: Option<Stats>,
        next: Option<NextBn>,
    ) -> Result<Left> {
        // (The sums are zero: zeroed at the start of the pass and by each consumer.)
        let sums = match stats {
            Some(_) => Some(c.sums(y.c())?),
            None => None,
        };
        let step = next.filter(|_| stats.is_some()).map(|n| CoefStep {
            params: n.params,
            stats: n.stats,
            running: n.running,
            out: n.out,
            done: c.done,
        });
        let out = FwdOut {
            y,
            stats: sums,
            next: step,
        };
        conv_tc::fwd(c.d, conv, out, c.split)?;
        Ok(match (stats, step) {
            (_, Some(_)) => Left::Nothing,
            (Some(_), None) => Left::Coefficients { pending: y.c() },
            (None, None) => Left::Coefficients { pending: 0 },
        })
    }

    fn conv_bwd_weight(
        c: &Ctx,
        x: Nhwc<bf16>,
        pre: Option<BnRelu>,
        g: Conv,
        dy: Nhwc<bf16>,
        dw: Slice<f32>,
    ) -> Result<()> {
        conv_tc::bwd_weight(c.d, x, pre, g, dy, dw)
    }

    fn conv_bwd_data(
        c: &Ctx,
        dy: Nhwc<bf16>,
        w: Slice<bf16>,
        g: Conv,
        out: DxOut<bf16>,
    ) -> Result<()> {
        let b = match out {
            DxOut::Plain(dx) => {
                let (out, bn) = (DataOut::overwrite(dx), BnBackward::default());
                return conv_tc::bwd_data(c.d, dy, w, g, out, bn, c.split);
            }
            DxOut::Bn(b) => b,
        };
        let (s, x) = (b.saved, b.scratch);
        let x = Nhwc::new(s.x.slice(), x.dims(), s.x.rs())?;
        let (red, mask) = (Some(c.sums(x.c())?), Some(Mask { x, bn: s.coef }));
        // The BN backward's per-channel step, finished by the convolution's last block.
        let step = |out| BnStep {
            stats: s.stats,
            dparams: b.dparams,
            out,
            done: c.done,
        };
        if let Some(def) = b.deferred {
            // BN1: scale × the masked gradient straight into dx, the per-channel rest deferred.
            let out = DataOut {
                dx: Nhwc::new(b.dx.mat.slice(), x.dims(), b.dx.mat.rs())?,
                write: b.dx.write,
            };
            let bn = BnBackward {
                mask,
                red,
                post: Some(s.coef.scale),
                step: Some(step(StepOut::Deferred(def))),
            };
            return conv_tc::bwd_data(c.d, dy, w, g, out, bn, c.split);
        }
        // BN2: the masked gradient of its output into the scratch, its coefficients alongside.
        let bn = BnBackward {
            mask,
            red,
            post: None,
            step: Some(step(StepOut::Coef(c.bn.coef))),
        };
        conv_tc::bwd_data(c.d, dy, w, g, DataOut::overwrite(b.scratch), bn, c.split)?;
        bn::backward_from_coef(c.d, s, b.scratch.mat(), b.dx, c.bn.coef)
    }
}
