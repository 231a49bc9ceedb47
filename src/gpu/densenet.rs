//! DenseNet on the GPU op layer: the CPU model's structure and flat-buffer layout, with
//! parameters, gradients, BN running statistics and Adam moments in device buffers, and
//! forward / backward as kernel launches with no host round trip between ops (the host uploads
//! the batch and the logits' gradient, and downloads the logits). The batch is either f32 inputs
//! or (`forward_raw`) the store's u8 images, augmented into the input buffer by one kernel.
//!
//! Activations live in a plan allocated for the largest batch seen at an input size and reused
//! by every batch of that size that fits (studies have varying view counts), so steady-state
//! steps allocate nothing. As on the CPU, a dense block owns one buffer with room for all its channels
//! (layers read a prefix and write a slice) and one gradient buffer that layers accumulate into;
//! per-channel batch statistics are computed once, when a channel is written.
//!
//! bf16 storage runs every convolution (stem, dense layers, transitions) on the tensor cores
//! (`ops_tc`, with a bf16 copy of the weights): each BN + ReLU is applied while the consuming
//! convolution loads its input (never stored), the batch statistics of the channels a
//! convolution writes are summed in its epilogue, and a dense layer's data gradients apply the
//! ReLU mask and sum their BN backward's reductions in their epilogues. f32 storage runs the
//! CUDA-core kernels of `ops` with separate statistics and reduction passes.
//!
//! Both precisions defer the per-channel part of each dense layer's BN1 backward: the 1×1's
//! data gradient adds only `scale · dz` into the block's gradient buffer (bf16: from the
//! epilogue), the rest, affine in x per channel, is summed over every layer that reads the
//! channel (`BlockPlan::corr`) and added once the channel's gradient is complete, before its
//! producer's backward (`fix_grads`).

use super::ops::{self, f32_at, BnSaved, Dt, View};
use super::ops_tc;
use super::tracking::Tracking;
use super::{DevPtr, DeviceBuffer, Driver, Graph};
use crate::data::loader::AugParams;
use crate::model::{BnIdx, DenseNet, Layout, Mode};
use crate::net::{Net, Precision};
use crate::ops::conv::Conv;
use crate::optim::Adam;
use crate::spec::DenseNetSpec;
use crate::weights::StateDict;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::sync::Arc;

/// An activation buffer of `dt` elements.
struct Act {
    buf: DeviceBuffer<u8>,
    dt: Dt,
}

impl Act {
    fn new(d: &Arc<dyn Driver>, dt: Dt, len: usize) -> Result<Act> {
        Ok(Act {
            buf: DeviceBuffer::alloc(d, len * dt.size())?,
            dt,
        })
    }
    fn ptr(&self) -> DevPtr {
        self.buf.ptr()
    }
    /// Address of element `i`.
    fn at(&self, i: usize) -> DevPtr {
        self.dt.at(self.buf.ptr(), i)
    }
    /// The first `len` elements as f32.
    fn download(&self, len: usize) -> Result<Vec<f32>> {
        let bytes = self.buf.to_vec()?;
        Ok(match self.dt {
            Dt::F32 => bytemuck::cast_slice::<u8, f32>(&bytes[..len * 4]).to_vec(),
            Dt::Bf16 => bytes[..len * 2]
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        })
    }
}

/// One dense block's buffers for a batch shape.
struct BlockPlan {
    h: usize,
    w: usize,
    /// [rows, c_total]: every layer's output channels, side by side.
    buf: Act,
    /// [rows, c_total]: d(loss)/d(buf).
    dbuf: Act,
    /// [2, c_total] f32: batch mean, then biased variance, of each channel (train).
    stats: DeviceBuffer<f32>,
    /// [2, c_total] f32 (backward): per channel, the deferred BN-backward terms
    /// (alpha, beta) of the layers that read it, applied once its gradient is complete.
    corr: DeviceBuffer<f32>,
    /// Per layer: [rows, bn_size * growth] bottleneck output (before norm2), and its
    /// [2, bn_size * growth] f32 batch statistics.
    y1: Vec<Act>,
    st2: Vec<DeviceBuffer<f32>>,
    /// [rows / 4, c_total]: the transition's pooled input (blocks with a transition).
    pooled: Option<Act>,
}

/// Every activation buffer for batches of up to `cap` images of `h`×`w`; the current batch has
/// `n` images and uses the first `n` images' worth of each buffer (shapes below are in `n`).
struct Plan {
    cap: usize,
    n: usize,
    h: usize,
    w: usize,
    /// [n, h, w, 3] f32 input, and its bf16 copy in bf16 mode (a raw batch is augmented straight
    /// into the one the model reads: `x16` in bf16 mode, else `x`).
    x: DeviceBuffer<f32>,
    x16: Option<Act>,
    /// [n, h0, w0, f0]: conv0 output (norm0 + ReLU are applied as the max pool reads it).
    y0: Act,
    /// [2, f0] f32 batch statistics of y0.
    st0: DeviceBuffer<f32>,
    blocks: Vec<BlockPlan>,
    /// [rows, c] after norm5 + ReLU; [n, c] f32 pooled features and their gradient.
    a5: Act,
    feat: DeviceBuffer<f32>,
    dfeat: DeviceBuffer<f32>,
    /// [n] f32.
    logits: DeviceBuffer<f32>,
    dlogits: DeviceBuffer<f32>,
    /// Two backward scratch buffers, each as large as the largest intermediate gradient.
    sa: Act,
    sb: Act,
    /// bf16: f32 partial sums of the split-K forwards ([`ops_tc::fwd_split_len`]), as large as
    /// the largest `[rows, co]` of a convolution that splits; None when none does.
    fws: Option<DeviceBuffer<f32>>,
}

/// Device buffers of the raw-input path (`forward_raw`).
struct RawIn {
    /// [≥ n, src_size, src_size] u8: the store images as uploaded.
    src: DeviceBuffer<u8>,
    /// [≥ n, 4] f32: each image's source steps (the augment kernel's scratch).
    steps: DeviceBuffer<f32>,
}

/// What a forward reads: host-built f32 inputs, or store images that the device augments.
enum Input<'a> {
    /// [n, h, w, 3] f32 NHWC, normalised.
    F32(&'a [f32]),
    /// raw: [n, src_size, src_size] u8; params: [n].
    Raw {
        raw: &'a [u8],
        src_size: usize,
        params: &'a [AugParams],
    },
}

/// DenseNet with one logit on any [`Driver`] (CUDA or the emulator).
pub struct GpuDenseNet {
    /// The driver, through `mem`, which counts what this model allocates.
    d: Arc<dyn Driver>,
    mem: Arc<Tracking>,
    dt: Dt,
    /// The CPU model this one was built from: structure, layout and the state-dict conversions.
    host: DenseNet<f32>,
    params: DeviceBuffer<f32>,
    grads: DeviceBuffer<f32>,
    /// BN running means and variances, as `host.stats`.
    stats: DeviceBuffer<f32>,
    adam_m: DeviceBuffer<f32>,
    adam_v: DeviceBuffer<f32>,
    counters: Vec<i64>,
    /// Per BN: [2, c] f32 scale and shift of its last forward, at `coef_at[bn.p]`.
    coef: DeviceBuffer<f32>,
    coef_at: HashMap<usize, usize>,
    /// BN reduction scratch: [bn_scratch_len(max c)] then [2, max c] f32.
    part: DeviceBuffer<f32>,
    bcoef: DeviceBuffer<f32>,
    /// bf16 mode: [num params] bf16, the parameters rounded for the tensor-core convolutions,
    /// refreshed from `params` by the first forward after they change (`w16_stale`).
    w16: Option<DeviceBuffer<u8>>,
    w16_stale: bool,
    /// [2, max c] f32: per-channel sums accumulated in a tensor-core convolution's epilogue (the
    /// batch statistics of its output, or the BN-backward reductions of a data gradient).
    sums: DeviceBuffer<f32>,
    plan: Option<Plan>,
    /// The raw-input path's buffers, grown to the largest batch seen.
    raw_in: Option<RawIn>,
    /// A train-mode forward left what backward needs in the plan.
    recorded: bool,
    /// The plan's captured graphs, by pass and batch size; dropped with the plan.
    graphs: HashMap<(Pass, usize), Graph>,
    use_graphs: bool,
}

/// What a captured graph runs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Pass {
    Eval,
    Train,
    Backward,
}

impl GpuDenseNet {
    /// Uploads `model` (its parameters, running statistics and counters) to the driver's device.
    pub fn new(d: Arc<dyn Driver>, model: DenseNet<f32>, precision: Precision) -> Result<Self> {
        let mem = Arc::new(Tracking::new(d));
        let d: Arc<dyn Driver> = mem.clone();
        let dt = match precision {
            Precision::F32 => Dt::F32,
            Precision::Bf16 => Dt::Bf16,
        };
        let np = model.params.len();
        let bns = all_bns(&model.layout);
        let mut coef_at = HashMap::new();
        let mut at = 0;
        for bn in &bns {
            coef_at.insert(bn.p, at);
            at += 2 * bn.c;
        }
        let max_c = bns.iter().map(|b| b.c).max().unwrap_or(1);
        let zeros = |len: usize| -> Result<DeviceBuffer<f32>> {
            let b = DeviceBuffer::alloc(&d, len)?;
            b.fill_bytes(0)?;
            Ok(b)
        };
        let upload = || -> Result<GpuDenseNet> {
            Ok(GpuDenseNet {
                params: DeviceBuffer::from_slice(&d, &model.params)?,
                grads: zeros(np)?,
                stats: DeviceBuffer::from_slice(&d, &model.stats)?,
                adam_m: zeros(np)?,
                adam_v: zeros(np)?,
                counters: model.counters.clone(),
                coef: DeviceBuffer::alloc(&d, at.max(1))?,
                coef_at,
                part: DeviceBuffer::alloc(&d, ops::bn_scratch_len(max_c))?,
                bcoef: DeviceBuffer::alloc(&d, 2 * max_c)?,
                w16: match dt {
                    Dt::Bf16 => Some(DeviceBuffer::alloc(&d, 2 * np)?),
                    Dt::F32 => None,
                },
                w16_stale: true,
                sums: DeviceBuffer::alloc(&d, 2 * max_c)?,
                plan: None,
                raw_in: None,
                recorded: false,
                graphs: HashMap::new(),
                // (A wait after every launch, for debugging, means no graphs.)
                use_graphs: !super::cuda::sync_each_launch(),
                host: model.cast::<f32>(),
                dt,
                d: d.clone(),
                mem: mem.clone(),
            })
        };
        upload().context("uploading the model to the device")
    }

    pub fn driver(&self) -> &Arc<dyn Driver> {
        &self.d
    }

    /// What this model has allocated on the device: bytes now, the peak, allocation calls.
    pub fn memory(&self) -> &Tracking {
        &self.mem
    }

    fn p(&self, i: usize) -> DevPtr {
        f32_at(self.params.ptr(), i)
    }
    fn g(&self, i: usize) -> DevPtr {
        f32_at(self.grads.ptr(), i)
    }
    /// (scale, shift) of a BN's last forward.
    fn coefs(&self, bn: BnIdx) -> (DevPtr, DevPtr) {
        let at = self.coef_at[&bn.p];
        (
            f32_at(self.coef.ptr(), at),
            f32_at(self.coef.ptr(), at + bn.c),
        )
    }

    /// Makes the plan ready for a batch of `n` images of `h`×`w`: the current one when it has
    /// room (batches of fewer views reuse the buffers), else a new one for `n`. When that does not
    /// fit, the error names the largest batch that would.
    fn ensure_plan(&mut self, n: usize, h: usize, w: usize) -> Result<()> {
        if let Some(p) = self
            .plan
            .as_mut()
            .filter(|p| (p.h, p.w) == (h, w) && p.cap >= n)
        {
            p.n = n;
            return Ok(());
        }
        self.graphs.clear(); // they launch on the old plan's buffers
        self.plan = None; // free the old shape's buffers first
        self.recorded = false;
        match self.build_plan(n, h, w) {
            Ok(p) => {
                self.plan = Some(p);
                Ok(())
            }
            Err(e) => {
                // Binary search: `lo` images fit, `hi` do not (each probe allocated, then freed).
                let (mut lo, mut hi) = (0, n);
                while hi - lo > 1 {
                    let mid = (lo + hi) / 2;
                    match self.build_plan(mid, h, w) {
                        Ok(_) => lo = mid,
                        Err(_) => hi = mid,
                    }
                }
                let fits = match lo {
                    0 => "not even one image fits".to_string(),
                    _ => format!("the largest batch that fits is {lo}"),
                };
                bail!(
                    "a batch of {n} images at {h}x{w} does not fit in the memory of {}: {fits} \
                     (use a smaller batch or input size) [{e:#}]",
                    self.d.name()
                )
            }
        }
    }

    /// The activation buffers of one batch shape.
    fn build_plan(&self, n: usize, h: usize, w: usize) -> Result<Plan> {
        let (d, dt) = (&self.d, self.dt);
        let lay = &self.host.layout;
        let spec = &self.host.spec;
        let f0 = lay.conv0.co;
        let (h0, w0) = Conv::STEM.out_hw(h, w);
        let (mut hb, mut wb) = crate::ops::pool::maxpool_out(h0, w0);
        let mid = spec.bn_size * spec.growth_rate;
        let mut scratch = n * h0 * w0 * f0;
        let mut blocks = Vec::new();
        let split_ws = match dt {
            Dt::Bf16 => split_workspace_len(lay, n, (hb, wb)),
            Dt::F32 => 0,
        };
        for blk in &lay.blocks {
            let (rows, ct) = (n * hb * wb, blk.c_total);
            scratch = scratch.max(rows * ct).max(rows * mid);
            let f32s = |len| DeviceBuffer::<f32>::alloc(d, len);
            blocks.push(BlockPlan {
                h: hb,
                w: wb,
                buf: Act::new(d, dt, rows * ct)?,
                dbuf: Act::new(d, dt, rows * ct)?,
                stats: f32s(2 * ct)?,
                corr: f32s(2 * ct)?,
                y1: (0..blk.layers.len())
                    .map(|_| Act::new(d, dt, rows * mid))
                    .collect::<Result<_>>()?,
                st2: (0..blk.layers.len())
                    .map(|_| f32s(2 * mid))
                    .collect::<Result<_>>()?,
                pooled: match blk.transition {
                    Some(_) => Some(Act::new(d, dt, n * (hb / 2) * (wb / 2) * ct)?),
                    None => None,
                },
            });
            (hb, wb) = (hb / 2, wb / 2);
        }
        let last = blocks.last().context("a DenseNet has at least one block")?;
        let c5 = lay.norm5.c;
        let rows5 = n * last.h * last.w;
        Ok(Plan {
            cap: n,
            n,
            h,
            w,
            x: DeviceBuffer::alloc(d, n * h * w * 3)?,
            x16: match dt {
                Dt::Bf16 => Some(Act::new(d, dt, n * h * w * 3)?),
                Dt::F32 => None,
            },
            y0: Act::new(d, dt, n * h0 * w0 * f0)?,
            st0: DeviceBuffer::alloc(d, 2 * f0)?,
            blocks,
            a5: Act::new(d, dt, rows5 * c5)?,
            feat: DeviceBuffer::alloc(d, n * c5)?,
            dfeat: DeviceBuffer::alloc(d, n * c5)?,
            logits: DeviceBuffer::alloc(d, n)?,
            dlogits: DeviceBuffer::alloc(d, n)?,
            sa: Act::new(d, dt, scratch)?,
            sb: Act::new(d, dt, scratch)?,
            fws: match split_ws {
                0 => None,
                len => Some(DeviceBuffer::alloc(d, len)?),
            },
        })
    }

    /// A BN's (scale, shift), into `coef`: from the batch statistics `(mean, var, count)` in
    /// training (also updating its running statistics and counter), else from the running ones.
    /// (The BN's batch counter is the caller's: [`Self::forward_planned`] counts every BN.)
    /// `pending`: how many of the BN's last channels have their statistics still as sums in
    /// `self.sums` (what [`Self::conv_stats`] returned), turned into mean and variance here.
    fn bn_coeffs(
        &self,
        bn: BnIdx,
        batch: Option<(DevPtr, DevPtr, usize)>,
        pending: usize,
    ) -> Result<()> {
        let (scale, shift) = self.coefs(bn);
        let (gamma, beta) = (self.p(bn.p), self.p(bn.p + bn.c));
        let (rm, rv) = (
            f32_at(self.stats.ptr(), bn.s),
            f32_at(self.stats.ptr(), bn.s + bn.c),
        );
        let d = &*self.d;
        match batch {
            Some((mean, var, count)) => ops::bn_coeffs(
                d,
                gamma,
                beta,
                mean,
                var,
                Some((rm, rv, count)),
                (pending > 0).then(|| (self.sums.ptr(), pending)),
                bn.c,
                scale,
                shift,
            ),
            None if pending > 0 => bail!("BN statistics pending outside training"),
            None => ops::bn_coeffs(d, gamma, beta, rm, rv, None, None, bn.c, scale, shift),
        }
    }

    /// Batch statistics of `x: [rows, c]` (row stride `rs`) into the f32 buffer `st` at `at`
    /// (mean) and `stride + at` (variance).
    fn stats_into(
        &self,
        x: DevPtr,
        (rows, c, rs): (usize, usize, usize),
        (st, stride, at): (DevPtr, usize, usize),
    ) -> Result<()> {
        ops::bn_stats(
            &*self.d,
            self.dt,
            x,
            rows,
            c,
            rs,
            f32_at(st, at),
            f32_at(st, stride + at),
            self.part.ptr(),
        )
    }

    /// bf16 copy of parameter `i` (bf16 mode).
    fn w16(&self, i: usize) -> DevPtr {
        self.w16.as_ref().map_or(0, |w| w.ptr() + 2 * i as u64)
    }

    /// `y` (row stride `y_rs`) = a convolution (stem, dense layer, transition) of `pre(x)` with the
    /// weights at parameter `p`; with `stats = Some((st, stride, at))`, also the batch statistics
    /// of the `co` channels written, as [`Self::stats_into`]. bf16: the tensor-core kernel, its
    /// reduction split over `ws` (the plan's `fws`) when the grid is small, the statistics summed
    /// in its epilogue into `self.sums` and left there: returns `co`, the channels pending, which
    /// the next BN coefficients (those of the BN that reads these channels) turn into mean and
    /// variance into `st` ([`Self::bn_coeffs`]); f32: the CUDA-core kernel, then a statistics
    /// pass into `st` (returns 0).
    #[allow(clippy::too_many_arguments)]
    fn conv_stats(
        &self,
        x: View,
        pre: Option<(DevPtr, DevPtr)>,
        p: usize,
        co: usize,
        g: Conv,
        (y, y_rs): (DevPtr, usize),
        stats: Option<(DevPtr, usize, usize)>,
        ws: Option<(DevPtr, usize)>,
    ) -> Result<usize> {
        let d = &*self.d;
        let rows = {
            let (ho, wo) = g.out_hw(x.h, x.w);
            x.n * ho * wo
        };
        // (Sized for every convolution that splits at any batch the plan serves; a split that
        // would not fit must not happen.)
        let ws = match ws {
            Some((p, len)) if rows * co <= len => Some(p),
            _ => None,
        };
        if self.w16.is_none() {
            ops::conv_fwd(d, self.dt, x, pre, self.p(p), co, g, y, y_rs)?;
            if let Some(st) = stats {
                self.stats_into(y, (rows, co, y_rs), st)?;
            }
            return Ok(0);
        }
        // (The sums are zero: zeroed at the start of the pass and by each consumer.)
        let sums = stats.map(|_| self.sums.ptr());
        ops_tc::conv_fwd(d, x, pre, self.w16(p), co, g, y, y_rs, sums, ws)?;
        Ok(if stats.is_some() { co } else { 0 })
    }

    /// Backward of a dense layer's BN + ReLU → convolution (weights at parameter `p`, `co`
    /// outputs) from `dy` (row stride `dy_rs`): the weight gradient, then into `dx` (row stride
    /// `dx_rs`; overwritten, or added to if `accumulate`) the gradient of the BN's input `s.x`,
    /// through the scratch `sa` (`[rows, s.c]`). bf16: tensor-core kernels, the ReLU mask and the
    /// BN's per-channel reductions in the data gradient's epilogue; f32: CUDA-core kernels, then
    /// the BN backward's own reduction pass. With `defer = Some((alpha, beta))` (`[s.c]` f32
    /// each) only the per-element term goes into `dx` (bf16: straight from the epilogue, with no
    /// pass over `dx`), and the rest, affine in x per channel, to alpha, beta, which
    /// [`Self::fix_grads`] applies once every reader of those channels has added its share.
    #[allow(clippy::too_many_arguments)]
    fn layer_conv_bwd(
        &self,
        x: View,
        bn: BnIdx,
        s: BnSaved,
        (p, co, g): (usize, usize, Conv),
        (dy, dy_rs): (DevPtr, usize),
        (dx, dx_rs, accumulate): (DevPtr, usize, bool),
        sa: DevPtr,
        defer: Option<(DevPtr, DevPtr)>,
    ) -> Result<()> {
        let (d, dt) = (&*self.d, self.dt);
        let pre = self.coefs(bn);
        let dbn = (self.g(bn.p), self.g(bn.p + bn.c));
        let dims = (x.n, x.h, x.w, x.c);
        if self.w16.is_none() {
            let scratch = (self.part.ptr(), self.bcoef.ptr());
            ops::conv_bwd_weight(d, dt, x, Some(pre), g, dy, dy_rs, co, self.g(p))?;
            ops::conv_bwd_data(d, dt, dy, dy_rs, co, self.p(p), g, dims, sa, x.c, false)?;
            let out = (dx, dx_rs, accumulate);
            return match defer {
                Some(corr) => ops::bn_bwd_deferred(d, dt, s, (sa, x.c), dbn, out, scratch.0, corr),
                None => ops::bn_bwd(
                    d, dt, s, true, true, sa, x.c, dbn, dx, dx_rs, accumulate, scratch,
                ),
            };
        }
        ops_tc::conv_bwd_weight(d, x, Some(pre), g, dy, dy_rs, co, self.g(p))?;
        let (w, sums) = (self.w16(p), self.sums.ptr());
        let mask = Some((x, pre));
        if let Some(corr) = defer {
            let (out, post) = ((dx, dx_rs, accumulate), Some(pre.0));
            ops_tc::conv_bwd_data(
                d,
                dy,
                dy_rs,
                co,
                w,
                g,
                dims,
                out.0,
                out.1,
                out.2,
                mask,
                Some(sums),
                post,
            )?;
            return ops::bn_bwd_defer(d, s, sums, dbn, corr);
        }
        ops_tc::conv_bwd_data(
            d,
            dy,
            dy_rs,
            co,
            w,
            g,
            dims,
            sa,
            x.c,
            false,
            mask,
            Some(sums),
            None,
        )?;
        let coef = self.bcoef.ptr();
        ops::bn_bwd_from_sums(d, dt, s, sums, sa, x.c, dbn, dx, dx_rs, accumulate, coef)
    }

    /// Adds the deferred BN-backward terms of block `bp`'s channels `[c0, c0 + c)` (every
    /// reader's share is in `bp.corr` by now) to their gradient.
    fn fix_grads(
        &self,
        bp: &BlockPlan,
        ct: usize,
        n: usize,
        (c0, c): (usize, usize),
    ) -> Result<()> {
        let corr = bp.corr.ptr();
        ops::bn_grad_fix(
            &*self.d,
            self.dt,
            (bp.dbuf.at(c0), ct),
            (bp.buf.at(c0), ct),
            n * bp.h * bp.w,
            c,
            (f32_at(corr, c0), f32_at(corr, ct + c0)),
        )
    }

    /// The forward pass; leaves logits in the plan (and the final feature map in `a5`).
    fn run(&mut self, x: Input, n: usize, h: usize, w: usize, train: bool) -> Result<Vec<f32>> {
        match x {
            Input::F32(x) if x.len() != n * h * w * 3 => bail!(
                "forward: input has {} values, expected [{n}, {h}, {w}, 3]",
                x.len()
            ),
            Input::Raw {
                raw,
                src_size,
                params,
            } => crate::net::check_raw(raw, src_size, params, h)?,
            _ => {}
        }
        self.host.feature_hw(h, w)?;
        self.ensure_plan(n, h, w)?;
        self.recorded = false;
        if let Some(w16) = self.w16.as_ref().filter(|_| self.w16_stale) {
            ops::cast_bf16(&*self.d, self.params.ptr(), self.params.len(), w16.ptr())?;
            self.w16_stale = false;
        }
        let plan = self.plan.take().expect("planned above");
        let out = self
            .load_input(&plan, x)
            .and_then(|()| self.forward_planned(&plan, train));
        self.plan = Some(plan);
        self.recorded = train && out.is_ok();
        out
    }

    /// The batch into the plan's input buffer (`x16` in bf16 mode, else `x`): uploaded as f32
    /// (and cast), or uploaded as u8 and augmented by the device.
    fn load_input(&mut self, pl: &Plan, x: Input) -> Result<()> {
        let d = self.d.clone();
        let xin = pl.x16.as_ref().map_or(pl.x.ptr(), |x| x.ptr());
        match x {
            Input::F32(x) => {
                d.htod(pl.x.ptr(), bytemuck::cast_slice(x))?;
                if pl.x16.is_some() {
                    ops::cast_bf16(&*d, pl.x.ptr(), x.len(), xin)?;
                }
                Ok(())
            }
            Input::Raw {
                raw,
                src_size,
                params,
            } => {
                let n = params.len();
                let fits = |r: &RawIn| r.src.len() >= raw.len() && r.steps.len() >= 4 * n;
                if !self.raw_in.as_ref().is_some_and(fits) {
                    self.raw_in = None; // free the smaller buffers first
                    self.raw_in = Some(RawIn {
                        src: DeviceBuffer::alloc(&d, raw.len())?,
                        steps: DeviceBuffer::alloc(&d, 4 * n)?,
                    });
                }
                let r = self.raw_in.as_ref().expect("allocated above");
                d.htod(r.src.ptr(), raw)?;
                ops::augment(
                    &*d,
                    self.dt,
                    r.src.ptr(),
                    src_size,
                    params,
                    pl.h,
                    r.steps.ptr(),
                    xin,
                )
            }
        }
    }

    /// The forward's kernels (one graph per batch size and mode), then the logits to the host.
    fn forward_planned(&mut self, pl: &Plan, train: bool) -> Result<Vec<f32>> {
        if train {
            for bn in all_bns(&self.host.layout) {
                self.counters[bn.cnt] += 1;
            }
        }
        let key = (if train { Pass::Train } else { Pass::Eval }, pl.n);
        self.run_graph(key, &|m: &Self| m.forward_kernels(pl, train))?;
        let mut logits = vec![0f32; pl.n];
        self.d
            .dtoh(bytemuck::cast_slice_mut(&mut logits), pl.logits.ptr())?;
        Ok(logits)
    }

    /// Runs `work` (launches and memsets only): through its graph for `key`, captured on first
    /// use, or directly when graphs are off.
    fn run_graph(&mut self, key: (Pass, usize), work: &dyn Fn(&Self) -> Result<()>) -> Result<()> {
        if !self.use_graphs {
            return work(self);
        }
        if !self.graphs.contains_key(&key) {
            let d = self.d.clone();
            let g = Graph::capture(&d, || work(self)).context("capturing a CUDA graph")?;
            self.graphs.insert(key, g);
        }
        self.graphs[&key].replay()
    }

    /// Launch the whole forward from the input in the plan to the logits in the plan.
    fn forward_kernels(&self, pl: &Plan, train: bool) -> Result<()> {
        let (dt, n, h, w) = (self.dt, pl.n, pl.h, pl.w);
        let lay = self.host.layout.clone();
        let xin = pl.x16.as_ref().map_or(pl.x.ptr(), |x| x.ptr());
        // The epilogue sums and the split-K workspace start from zero (their consumers zero
        // them again after reading).
        self.sums.fill_bytes(0)?;
        let fws = pl.fws.as_ref().map(|w| (w.ptr(), w.len()));
        if let Some(w) = &pl.fws {
            w.fill_bytes(0)?;
        }

        // Stem: conv0 → norm0 → ReLU → max pool into block 0's first channels (the max pool applies
        // norm0 + ReLU as it reads conv0's output).
        let f0 = lay.conv0.co;
        let (h0, w0) = Conv::STEM.out_hw(h, w);
        let m0 = n * h0 * w0;
        let xv = View {
            ptr: xin,
            n,
            h,
            w,
            c: 3,
            rs: 3,
        };
        let stats = train.then_some((pl.st0.ptr(), f0, 0));
        let y0 = (pl.y0.ptr(), f0);
        let pending = self.conv_stats(xv, None, lay.conv0.p, f0, Conv::STEM, y0, stats, None)?;
        let batch = train.then_some((pl.st0.ptr(), f32_at(pl.st0.ptr(), f0), m0));
        self.bn_coeffs(lay.norm0, batch, pending)?;
        let c0 = self.coefs(lay.norm0);
        let b0 = &pl.blocks[0];
        let ct0 = lay.blocks[0].c_total;
        let y0v = View {
            ptr: pl.y0.ptr(),
            n,
            h: h0,
            w: w0,
            c: f0,
            rs: f0,
        };
        ops::maxpool_fwd(&*self.d, dt, y0v, Some(c0), b0.buf.ptr(), ct0)?;
        if train {
            self.stats_into(
                b0.buf.ptr(),
                (n * b0.h * b0.w, f0, ct0),
                (b0.stats.ptr(), ct0, 0),
            )?;
        }

        // Channels of the current block buffer whose statistics are still sums (bf16): the last
        // convolution's output, consumed by the next BN coefficients (all later BNs that read those
        // channels then find them in the block's statistics).
        let mut pending = 0;
        for (b, blk) in lay.blocks.iter().enumerate() {
            let bp = &pl.blocks[b];
            let (ct, rows) = (blk.c_total, n * bp.h * bp.w);
            let (bh, bw) = (bp.h, bp.w);
            let (mean, var) = (bp.stats.ptr(), f32_at(bp.stats.ptr(), ct));
            for (l, li) in blk.layers.iter().enumerate() {
                let (c, mid, k) = (li.norm1.c, li.conv1.co, li.conv2.co);
                self.bn_coeffs(li.norm1, train.then_some((mean, var, rows)), pending)?;
                let prefix = View {
                    ptr: bp.buf.ptr(),
                    n,
                    h: bh,
                    w: bw,
                    c,
                    rs: ct,
                };
                let (y1, st2) = (bp.y1[l].ptr(), bp.st2[l].ptr());
                let pre1 = Some(self.coefs(li.norm1));
                let stats = train.then_some((st2, mid, 0));
                let out = (y1, mid);
                let pending2 = self.conv_stats(
                    prefix,
                    pre1,
                    li.conv1.p,
                    mid,
                    Conv::POINTWISE,
                    out,
                    stats,
                    fws,
                )?;
                let batch = train.then_some((st2, f32_at(st2, mid), rows));
                self.bn_coeffs(li.norm2, batch, pending2)?;
                let yv = View {
                    ptr: y1,
                    n,
                    h: bh,
                    w: bw,
                    c: mid,
                    rs: mid,
                };
                let pre2 = Some(self.coefs(li.norm2));
                let stats = train.then_some((bp.stats.ptr(), ct, c));
                let out = (bp.buf.at(c), ct);
                pending = self.conv_stats(yv, pre2, li.conv2.p, k, Conv::CONV3, out, stats, fws)?;
            }
            let Some((tn, tc)) = blk.transition else {
                break;
            };
            // Transition: norm → ReLU → 2×2 avg pool (fused) → 1×1 conv into the next block.
            self.bn_coeffs(tn, train.then_some((mean, var, rows)), pending)?;
            let pooled = bp.pooled.as_ref().context("transition buffer")?;
            let bv = View {
                ptr: bp.buf.ptr(),
                n,
                h: bh,
                w: bw,
                c: ct,
                rs: ct,
            };
            ops::avgpool_fwd(&*self.d, dt, bv, Some(self.coefs(tn)), pooled.ptr(), ct)?;
            let nx = &pl.blocks[b + 1];
            let nct = lay.blocks[b + 1].c_total;
            let pv = View {
                ptr: pooled.ptr(),
                n,
                h: nx.h,
                w: nx.w,
                c: ct,
                rs: ct,
            };
            let stats = train.then_some((nx.stats.ptr(), nct, 0));
            let out = (nx.buf.ptr(), nct);
            pending = self.conv_stats(pv, None, tc.p, tc.co, Conv::POINTWISE, out, stats, fws)?;
        }

        // Head: norm5 → ReLU → global average pool → linear.
        let last = pl.blocks.last().context("blocks")?;
        let (c, rows) = (lay.norm5.c, n * last.h * last.w);
        let (mean, var) = (last.stats.ptr(), f32_at(last.stats.ptr(), c));
        self.bn_coeffs(lay.norm5, train.then_some((mean, var, rows)), pending)?;
        let c5 = self.coefs(lay.norm5);
        ops::bn_act(
            &*self.d,
            dt,
            last.buf.ptr(),
            c,
            rows,
            c,
            c5,
            true,
            pl.a5.ptr(),
            c,
        )?;
        ops::gap_fwd(
            &*self.d,
            dt,
            pl.a5.ptr(),
            n,
            last.h * last.w,
            c,
            pl.feat.ptr(),
        )?;
        let (fw, fb) = (self.p(lay.fc), self.p(lay.fc + c));
        ops::linear_fwd(&*self.d, pl.feat.ptr(), n, c, fw, fb, pl.logits.ptr())
    }

    /// The logits' gradient to the device, then the backward's kernels (one graph per batch size).
    fn backward_planned(&mut self, pl: &Plan, dlogits: &[f32]) -> Result<()> {
        self.d
            .htod(pl.dlogits.ptr(), bytemuck::cast_slice(dlogits))?;
        self.run_graph((Pass::Backward, pl.n), &|m: &Self| m.backward_kernels(pl))?;
        self.d.synchronize()
    }

    /// Launch the whole backward from the logits' gradient in the plan to every parameter's.
    fn backward_kernels(&self, pl: &Plan) -> Result<()> {
        let (d, dt, n) = (&*self.d, self.dt, pl.n);
        let lay = &self.host.layout;
        let scratch = (self.part.ptr(), self.bcoef.ptr());
        let (sa, sb) = (pl.sa.ptr(), pl.sb.ptr());
        if self.w16.is_some() {
            self.sums.fill_bytes(0)?;
        }
        for bp in &pl.blocks {
            bp.corr.fill_bytes(0)?;
        }
        let bn_grads = |bn: BnIdx| (self.g(bn.p), self.g(bn.p + bn.c));
        let saved = |bn: BnIdx, x: DevPtr, rs: usize, rows: usize, st: DevPtr, stride: usize| {
            let (scale, shift) = self.coefs(bn);
            BnSaved {
                x,
                rs,
                rows,
                c: bn.c,
                mean: st,
                var: f32_at(st, stride),
                scale,
                shift,
            }
        };

        // Head. Every block's gradient buffer is first written whole (by the head or the
        // transition after it), then accumulated into by its layers.
        let nb = lay.blocks.len();
        let last = &pl.blocks[nb - 1];
        let (c, rows) = (lay.norm5.c, n * last.h * last.w);
        let (fw, fc) = (self.p(lay.fc), lay.fc);
        let dwb = (self.g(fc), self.g(fc + c));
        ops::linear_bwd(
            d,
            pl.feat.ptr(),
            n,
            c,
            fw,
            pl.dlogits.ptr(),
            dwb,
            pl.dfeat.ptr(),
        )?;
        ops::gap_bwd(d, dt, pl.dfeat.ptr(), n, last.h * last.w, c, sa)?;
        let s5 = saved(lay.norm5, last.buf.ptr(), c, rows, last.stats.ptr(), c);
        let g5 = bn_grads(lay.norm5);
        ops::bn_bwd(
            d,
            dt,
            s5,
            true,
            true,
            sa,
            c,
            g5,
            last.dbuf.ptr(),
            c,
            false,
            scratch,
        )?;

        for b in (0..nb).rev() {
            let (blk, bp) = (&lay.blocks[b], &pl.blocks[b]);
            let (ct, rows, bh, bw) = (blk.c_total, n * bp.h * bp.w, bp.h, bp.w);
            if let Some((tn, tc)) = blk.transition {
                // Transition b → b + 1.
                let nx = &pl.blocks[b + 1];
                let nct = lay.blocks[b + 1].c_total;
                let pooled = bp.pooled.as_ref().context("transition buffer")?;
                let pv = View {
                    ptr: pooled.ptr(),
                    n,
                    h: nx.h,
                    w: nx.w,
                    c: ct,
                    rs: ct,
                };
                let dnext = nx.dbuf.ptr();
                let dims = (n, nx.h, nx.w, ct);
                self.fix_grads(nx, nct, n, (0, tc.co))?;
                if self.w16.is_some() {
                    let (w, dw) = (self.w16(tc.p), self.g(tc.p));
                    ops_tc::conv_bwd_weight(d, pv, None, Conv::POINTWISE, dnext, nct, tc.co, dw)?;
                    ops_tc::conv_bwd_data(
                        d,
                        dnext,
                        nct,
                        tc.co,
                        w,
                        Conv::POINTWISE,
                        dims,
                        sa,
                        ct,
                        false,
                        None,
                        None,
                        None,
                    )?;
                } else {
                    let (w, dw) = (self.p(tc.p), self.g(tc.p));
                    ops::conv_bwd_weight(d, dt, pv, None, Conv::POINTWISE, dnext, nct, tc.co, dw)?;
                    ops::conv_bwd_data(
                        d,
                        dt,
                        dnext,
                        nct,
                        tc.co,
                        w,
                        Conv::POINTWISE,
                        dims,
                        sa,
                        ct,
                        false,
                    )?;
                }
                ops::avgpool_bwd(d, dt, (n, bh, bw, ct), sa, ct, sb)?;
                let st = saved(tn, bp.buf.ptr(), ct, rows, bp.stats.ptr(), ct);
                ops::bn_bwd(
                    d,
                    dt,
                    st,
                    true,
                    true,
                    sb,
                    ct,
                    bn_grads(tn),
                    bp.dbuf.ptr(),
                    ct,
                    false,
                    scratch,
                )?;
            }
            for (l, li) in blk.layers.iter().enumerate().rev() {
                let (c, mid, k) = (li.norm1.c, li.conv1.co, li.conv2.co);
                let (y1, st2) = (bp.y1[l].ptr(), bp.st2[l].ptr());
                let dout = bp.dbuf.at(c);
                // This layer's k output channels have every later reader's gradient now.
                self.fix_grads(bp, ct, n, (c, k))?;
                // conv2 (3×3) on relu(norm2(y1)), into sb; then conv1 (1×1) on
                // relu(norm1(prefix)), added into the block's gradient buffer (the BN
                // backward's per-channel terms deferred to `fix_grads`).
                let yv = View {
                    ptr: y1,
                    n,
                    h: bh,
                    w: bw,
                    c: mid,
                    rs: mid,
                };
                let s2 = saved(li.norm2, y1, mid, rows, st2, mid);
                let conv2 = (li.conv2.p, k, Conv::CONV3);
                let out2 = (sb, mid, false);
                self.layer_conv_bwd(yv, li.norm2, s2, conv2, (dout, ct), out2, sa, None)?;
                let prefix = View {
                    ptr: bp.buf.ptr(),
                    n,
                    h: bh,
                    w: bw,
                    c,
                    rs: ct,
                };
                let s1 = saved(li.norm1, bp.buf.ptr(), ct, rows, bp.stats.ptr(), ct);
                let conv1 = (li.conv1.p, mid, Conv::POINTWISE);
                let dx = (bp.dbuf.ptr(), ct, true);
                let corr = (bp.corr.ptr(), f32_at(bp.corr.ptr(), ct));
                self.layer_conv_bwd(prefix, li.norm1, s1, conv1, (sb, mid), dx, sa, Some(corr))?;
            }
        }

        // Stem.
        let f0 = lay.conv0.co;
        let (h0, w0) = Conv::STEM.out_hw(pl.h, pl.w);
        let m0 = n * h0 * w0;
        let ct0 = lay.blocks[0].c_total;
        let y0v = View {
            ptr: pl.y0.ptr(),
            n,
            h: h0,
            w: w0,
            c: f0,
            rs: f0,
        };
        self.fix_grads(&pl.blocks[0], ct0, n, (0, f0))?;
        let c0 = Some(self.coefs(lay.norm0));
        ops::maxpool_bwd(d, dt, y0v, c0, pl.blocks[0].dbuf.ptr(), ct0, sa)?;
        let s0 = saved(lay.norm0, pl.y0.ptr(), f0, m0, pl.st0.ptr(), f0);
        ops::bn_bwd(
            d,
            dt,
            s0,
            true,
            true,
            sa,
            f0,
            bn_grads(lay.norm0),
            sb,
            f0,
            false,
            scratch,
        )?;
        let xin = pl.x16.as_ref().map_or(pl.x.ptr(), |x| x.ptr());
        let xv = View {
            ptr: xin,
            n,
            h: pl.h,
            w: pl.w,
            c: 3,
            rs: 3,
        };
        let dw = self.g(lay.conv0.p);
        match self.w16 {
            Some(_) => ops_tc::conv_bwd_weight(d, xv, None, Conv::STEM, sb, f0, f0, dw),
            None => ops::conv_bwd_weight(d, dt, xv, None, Conv::STEM, sb, f0, f0, dw),
        }
    }

    /// Gradients of every parameter (after `backward`), in the CPU model's flat layout.
    pub fn grads(&self) -> Result<Vec<f32>> {
        self.grads.to_vec()
    }
}

/// f32 elements of the split-K workspace of a plan for up to `cap` images whose first block is
/// `hb`×`wb`: the largest `[rows, co]` of a dense-layer or transition forward whose reduction
/// splits ([`ops_tc::fwd_split_len`]) at any batch of `1..=cap` images (a plan serves every
/// smaller batch, and a smaller grid splits sooner); 0 when none does.
fn split_workspace_len(lay: &Layout, cap: usize, (hb, wb): (usize, usize)) -> usize {
    let mut len = 0;
    for n in 1..=cap {
        let (mut h, mut w) = (hb, wb);
        for blk in &lay.blocks {
            let mut need = |rows: usize, c: usize, co: usize, g: Conv| {
                if ops_tc::fwd_split_len(rows, c, co, g) < g.k * g.k * c {
                    len = len.max(rows * co);
                }
            };
            for li in &blk.layers {
                need(n * h * w, li.norm1.c, li.conv1.co, Conv::POINTWISE);
                need(n * h * w, li.conv1.co, li.conv2.co, Conv::CONV3);
            }
            if let Some((_, tc)) = blk.transition {
                need(n * (h / 2) * (w / 2), blk.c_total, tc.co, Conv::POINTWISE);
            }
            (h, w) = (h / 2, w / 2);
        }
    }
    len
}

/// Every BN of the model.
fn all_bns(lay: &Layout) -> Vec<BnIdx> {
    let mut v = vec![lay.norm0];
    for b in &lay.blocks {
        for l in &b.layers {
            v.extend([l.norm1, l.norm2]);
        }
        v.extend(b.transition.map(|t| t.0));
    }
    v.push(lay.norm5);
    v
}

impl Net for GpuDenseNet {
    fn spec(&self) -> &DenseNetSpec {
        &self.host.spec
    }
    fn num_params(&self) -> usize {
        self.params.len()
    }
    fn forward(&mut self, x: &[f32], n: usize, h: usize, w: usize, mode: Mode) -> Result<Vec<f32>> {
        self.run(Input::F32(x), n, h, w, mode == Mode::Train)
    }
    fn wants_raw_input(&self) -> bool {
        true
    }
    fn forward_raw(
        &mut self,
        raw: &[u8],
        src_size: usize,
        params: &[AugParams],
        out_size: usize,
        mode: Mode,
    ) -> Result<Vec<f32>> {
        let x = Input::Raw {
            raw,
            src_size,
            params,
        };
        let n = params.len();
        self.run(x, n, out_size, out_size, mode == Mode::Train)
    }
    fn forward_features(
        &mut self,
        x: &[f32],
        n: usize,
        h: usize,
        w: usize,
    ) -> Result<(Vec<f32>, Vec<f32>, usize, usize)> {
        let logits = self.run(Input::F32(x), n, h, w, false)?;
        let (hf, wf) = self.host.feature_hw(h, w)?;
        let plan = self.plan.as_ref().expect("planned by run");
        let fmap = plan.a5.download(n * hf * wf * self.host.layout.norm5.c)?;
        Ok((logits, fmap, hf, wf))
    }
    fn classifier(&self) -> Result<(Vec<f32>, f32)> {
        let (fc, c) = (self.host.layout.fc, self.host.layout.norm5.c);
        let mut v = vec![0f32; c + 1];
        self.d.dtoh(bytemuck::cast_slice_mut(&mut v), self.p(fc))?;
        let b = v.pop().expect("c + 1 values");
        Ok((v, b))
    }
    fn zero_grad(&mut self) -> Result<()> {
        self.grads.fill_bytes(0)
    }
    fn backward(&mut self, dlogits: &[f32]) -> Result<()> {
        if !self.recorded {
            bail!("backward needs a train-mode forward first");
        }
        let plan = self.plan.as_ref().expect("recorded implies planned");
        if dlogits.len() != plan.n {
            bail!(
                "backward: {} logit gradients for a batch of {}",
                dlogits.len(),
                plan.n
            );
        }
        self.recorded = false;
        let plan = self.plan.take().expect("recorded implies planned");
        let out = self.backward_planned(&plan, dlogits);
        self.plan = Some(plan);
        out
    }
    fn adam_step(&mut self, adam: &mut Adam) -> Result<()> {
        if adam.m.len() != self.params.len() {
            bail!(
                "optimiser state has {} values for {} parameters",
                adam.m.len(),
                self.params.len()
            );
        }
        adam.step += 1;
        let bufs = (
            self.params.ptr(),
            self.grads.ptr(),
            self.adam_m.ptr(),
            self.adam_v.ptr(),
        );
        self.w16_stale = true;
        ops::adam(&*self.d, adam, self.params.len(), bufs)
    }
    fn export_adam(&self, adam: &mut Adam) -> Result<()> {
        adam.m = self.adam_m.to_vec()?;
        adam.v = self.adam_v.to_vec()?;
        Ok(())
    }
    fn import_adam(&mut self, adam: &Adam) -> Result<()> {
        self.adam_m.copy_from(&adam.m)?;
        self.adam_v.copy_from(&adam.v)
    }
    fn peak_device_bytes(&self) -> Option<usize> {
        Some(self.mem.peak_bytes())
    }
    /// Forward and backward run as captured graphs (the default; one per pass and batch size,
    /// captured on first use) or kernel by kernel.
    fn finish(&self) -> Result<()> {
        self.d.synchronize()
    }
    fn use_graphs(&mut self, on: bool) {
        self.use_graphs = on && !super::cuda::sync_each_launch();
        self.graphs.clear();
    }
    fn to_state_dict(&self) -> Result<StateDict> {
        let mut m = self.host.cast::<f32>();
        m.params = self.params.to_vec()?;
        m.stats = self.stats.to_vec()?;
        m.counters = self.counters.clone();
        Ok(m.to_state_dict())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plan serves every smaller batch, whose smaller grids split sooner: DenseNet-169's
    /// transition 3 (1280 → 640 channels at 7×7) does not split at 256 images (490 tiles) but
    /// does at 125 (240 tiles), needing 125·49·640 = 3,920,000 floats, more than any split at
    /// 256 itself (1,605,632: block 4's 1×1s, 12544·128).
    #[test]
    fn split_workspace_covers_every_batch_a_plan_serves() {
        let spec = DenseNetSpec::preset("densenet169").unwrap();
        let lay = DenseNet::<f32>::new(spec, 0).layout;
        let at_cap_only = 256 * 49 * 128;
        // One image: block 1's 3×3s (3136 rows, 25 tiles, 36 K-slices) split, writing 3136·32;
        // so do block 2's 1×1s and transition 1 (784 rows, 7 tiles), writing 784·128, as much.
        assert_eq!(split_workspace_len(&lay, 1, (56, 56)), 3136 * 32);
        let len = split_workspace_len(&lay, 256, (56, 56));
        assert!(len >= 125 * 49 * 640, "{len}");
        assert!(len > at_cap_only, "{len}");
        // Never more than the largest output a tensor-core forward writes at 256 images.
        assert!(len <= 256 * 56 * 56 * 128, "{len}");
    }
}
