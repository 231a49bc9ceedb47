//! The GPU model's forward: the input into the plan, then one launch sequence per stage of the
//! schedule (captured once as a graph per batch size and mode), then the logits to the host.

use super::plan::{stats_of, Plan, RawIn};
use super::{Engine, GpuDenseNet, Left, NextBn, Pass};
use crate::gpu::ops::{augment, bn, cast, linear, pool, ConvIn};
use crate::gpu::{DeviceBuffer, Graph, Nhwc};
use crate::model::schedule::{Dir, Head, Layer, Stage, Stem, Step, Transition};
use crate::ops::augment::AugParams;
use crate::ops::{Activation, Mode};
use anyhow::{Context, Result};

/// What a forward reads: host-built f32 inputs, or store images that the device augments.
pub(super) enum Input<'a> {
    /// `[n, h, w, 3]` f32 NHWC, normalised.
    F32(&'a [f32]),
    /// raw: `[n, src_size, src_size]` u8; params: `[n]`.
    Raw {
        raw: &'a [u8],
        src_size: usize,
        params: &'a [AugParams],
    },
}

impl<T: Engine> GpuDenseNet<T> {
    /// The forward pass; leaves the logits (and the final feature map) in the plan.
    pub(super) fn run(
        &mut self,
        x: Input,
        n: usize,
        h: usize,
        w: usize,
        mode: Mode,
    ) -> Result<Vec<f32>> {
        match x {
            Input::F32(x) => crate::net::check_input(x.len(), n, h, w)?,
            Input::Raw {
                raw,
                src_size,
                params,
            } => crate::net::check_raw(raw, src_size, params, h)?,
        }
        self.ensure_plan(n, h, w)?;
        self.recorded = false;
        self.d.stage(Stage::Start(Dir::Fwd));
        if let Some(w16) = self.weights_bf16.as_ref().filter(|_| self.weights_stale) {
            cast::to_bf16(&*self.d, self.params.slice(), w16.slice())?;
            self.weights_stale = false;
        }
        let plan = self.plan.take().context("planned above")?;
        let out = self
            .load_input(&plan, x)
            .and_then(|()| self.forward_planned(&plan, mode));
        self.plan = Some(plan);
        self.recorded = mode == Mode::Train && out.is_ok();
        out
    }

    /// The batch into the plan's input: uploaded as f32 (and cast in bf16), or uploaded as u8
    /// and augmented by the device.
    fn load_input(&mut self, plan: &Plan<T>, x: Input) -> Result<()> {
        let staging = plan.input_f32.as_ref().map(|b| b.slice());
        match x {
            Input::F32(x) => T::load_input(&*self.d, x, staging, plan.input.slice()),
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
                        src: DeviceBuffer::alloc(&self.d, raw.len())?,
                        steps: DeviceBuffer::alloc(&self.d, 4 * n)?,
                    });
                }
                let r = self.raw_in.as_ref().context("allocated above")?;
                r.src.slice().upload(&*self.d, raw)?;
                let (src, steps) = (r.src.slice(), r.steps.slice());
                augment::images(&*self.d, src, src_size, params, steps, plan.input()?)
            }
        }
    }

    /// The forward's kernels (one graph per batch size and mode), then the logits to the host.
    fn forward_planned(&mut self, plan: &Plan<T>, mode: Mode) -> Result<Vec<f32>> {
        if mode == Mode::Train {
            for bn in self.layout.bns() {
                self.counters[bn.cnt] += 1;
            }
        }
        let key = (
            match mode {
                Mode::Train => Pass::Train,
                Mode::Eval => Pass::Eval,
            },
            plan.n,
        );
        self.run_graph(key, &|m: &Self| m.forward_kernels(plan, mode))?;
        let mut logits = vec![0f32; plan.n];
        plan.logits.slice().download(&*self.d, &mut logits)?;
        Ok(logits)
    }

    /// Runs `work` (launches and memsets only): through its graph for `key`, captured on first
    /// use, or directly when graphs are off.
    pub(super) fn run_graph(
        &mut self,
        key: (Pass, usize),
        work: &dyn Fn(&Self) -> Result<()>,
    ) -> Result<()> {
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

    /// Launch the whole forward, stage by stage, from the input in the plan to the logits in the
    /// plan. `left` carries what the last convolution left for the coefficients of the BN that
    /// reads its output next, the next step's first: in training a tensor-core convolution
    /// finishes them (`Left::Nothing`); else the channels of the current block whose statistics
    /// are still sums (bf16), consumed by that BN's coefficients (every later BN that reads those
    /// channels then finds them in the block's statistics).
    fn forward_kernels(&self, plan: &Plan<T>, mode: Mode) -> Result<()> {
        // The epilogue sums and the split-K workspace start from zero (their consumers zero
        // them again after reading).
        self.d.stage(Stage::Start(Dir::Fwd));
        self.sums.fill_bytes(0)?;
        if let Some(split) = &plan.split {
            split.clear()?;
        }
        let steps = plan.schedule.forward();
        let mut left = Left::Coefficients { pending: 0 };
        for (i, step) in steps.iter().enumerate() {
            self.d.stage(Stage::of(*step, Dir::Fwd));
            let next = match (mode, steps.get(i + 1)) {
                (Mode::Train, Some(s)) => self.first_bn(plan, s)?,
                _ => None,
            };
            left = match *step {
                Step::Stem(s) => self.stem_fwd(plan, s, mode, next)?,
                Step::Layer(l) => self.layer_fwd(plan, l, mode, left, next)?,
                Step::Transition(t) => self.transition_fwd(plan, t, mode, left, next)?,
                Step::Head(hd) => self.head_fwd(plan, hd, mode, left)?,
            };
        }
        Ok(())
    }

    /// The BN that `step` begins with, which reads the previous step's output, with its batch
    /// (training): a dense layer's norm1, a transition's norm, the head's norm5.
    fn first_bn(&self, plan: &Plan<T>, step: &Step) -> Result<Option<NextBn>> {
        let n = plan.n;
        let (bn, stats, rows) = match *step {
            Step::Stem(_) => return Ok(None),
            Step::Layer(l) => (
                l.norm1,
                plan.blocks[l.block].stats(0, l.c_in)?,
                l.hw.rows(n),
            ),
            Step::Transition(t) => (
                t.norm,
                plan.blocks[t.block].stats(0, t.c_in)?,
                t.hw_in.rows(n),
            ),
            Step::Head(hd) => {
                let last = plan.blocks.last().context("a DenseNet has blocks")?;
                (hd.norm, last.stats(0, hd.c)?, hd.hw.rows(n))
            }
        };
        self.next_bn(bn, (stats, rows)).map(Some)
    }

    /// conv0 → norm0 → ReLU → max pool into block 0's first channels (the max pool applies
    /// norm0 and the ReLU as it reads conv0's output); then the pooled channels' statistics, in
    /// training with the coefficients of `next`, the first layer's norm1, which reads exactly them.
    fn stem_fwd(&self, plan: &Plan<T>, s: &Stem, mode: Mode, next: Option<NextBn>) -> Result<Left> {
        let (n, f0) = (plan.n, s.conv.co);
        let stats = stats_of(plan.stem_stats.slice(), f0, 0, f0)?;
        let (x, y0) = (plan.input()?, plan.stem_out()?);
        let (ctx, w) = (self.ctx(plan), self.conv_weights(s.conv)?);
        let batch = mode.when_training((stats, s.conv_out.rows(n)));
        let norm0 = batch.map(|b| self.next_bn(s.norm, b)).transpose()?;
        let conv = ConvIn {
            x,
            pre: None,
            w,
            g: s.conv.g,
        };
        let left = T::conv_fwd(&ctx, conv, y0, batch.map(|b| b.0), norm0)?;
        self.bn_scale_shift(s.norm, batch, left)?;
        let block0 = &plan.blocks[0];
        let out = block0.acts(n)?.channels(0, f0)?;
        pool::maxpool_fwd(&*self.d, y0, Some(self.coefs(s.norm)?), out)?;
        if mode == Mode::Eval {
            return Ok(Left::Coefficients { pending: 0 });
        }
        let stats = block0.stats(0, f0)?;
        let finish = match next {
            Some(n) if n.params.gamma.len() == f0 => bn::Finish::Coefficients(bn::CoefStep {
                params: n.params,
                stats,
                running: n.running,
                out: n.out,
                done: self.done.slice(),
            }),
            _ => bn::Finish::Stats(stats),
        };
        bn::batch_stats(&*self.d, out.mat(), finish, self.bn_scratch())?;
        Ok(match finish {
            bn::Finish::Coefficients(_) => Left::Nothing,
            bn::Finish::Stats(_) => Left::Coefficients { pending: 0 },
        })
    }

    /// BN1 + ReLU → 1×1 into the bottleneck, BN2 + ReLU → 3×3 into the block's next channels.
    /// `next`: the BN that reads this layer's output next (training), whose coefficients the 3×3
    /// may finish.
    fn layer_fwd(
        &self,
        plan: &Plan<T>,
        l: &Layer,
        mode: Mode,
        left: Left,
        next: Option<NextBn>,
    ) -> Result<Left> {
        let (n, c, mid, k) = (plan.n, l.c_in, l.conv1.co, l.conv2.co);
        let (block, rows) = (&plan.blocks[l.block], l.hw.rows(n));
        self.bn_scale_shift(
            l.norm1,
            mode.when_training((block.stats(0, c)?, rows)),
            left,
        )?;
        let prefix = block.acts(n)?.channels(0, c)?;
        let y1 = &block.bottleneck[l.index];
        let y1 = Nhwc::new(y1.slice(), (n, l.hw.h, l.hw.w, mid), mid)?;
        let stats2 = stats_of(block.bottleneck_stats[l.index].slice(), mid, 0, mid)?;
        let pre1 = Some(self.coefs(l.norm1)?);
        let (ctx, w1, w2) = (
            self.ctx(plan),
            self.conv_weights(l.conv1)?,
            self.conv_weights(l.conv2)?,
        );
        let batch2 = mode.when_training((stats2, rows));
        let next2 = batch2.map(|b| self.next_bn(l.norm2, b)).transpose()?;
        let conv1 = ConvIn {
            x: prefix,
            pre: pre1,
            w: w1,
            g: l.conv1.g,
        };
        let left2 = T::conv_fwd(&ctx, conv1, y1, batch2.map(|b| b.0), next2)?;
        self.bn_scale_shift(l.norm2, batch2, left2)?;
        let out = block.acts(n)?.channels(c, k)?;
        let (pre2, stats) = (Some(self.coefs(l.norm2)?), block.stats(c, k)?);
        let conv2 = ConvIn {
            x: y1,
            pre: pre2,
            w: w2,
            g: l.conv2.g,
        };
        T::conv_fwd(&ctx, conv2, out, mode.when_training(stats), next)
    }

    /// BN + ReLU → 2×2 average pool (fused) → 1×1 into the next block's first channels.
    fn transition_fwd(
        &self,
        plan: &Plan<T>,
        t: &Transition,
        mode: Mode,
        left: Left,
        next_bn: Option<NextBn>,
    ) -> Result<Left> {
        let n = plan.n;
        let (block, next) = (&plan.blocks[t.block], &plan.blocks[t.block + 1]);
        let batch = mode.when_training((block.stats(0, t.c_in)?, t.hw_in.rows(n)));
        self.bn_scale_shift(t.norm, batch, left)?;
        let pooled = block
            .pooled
            .as_ref()
            .context("a transition's pooled buffer")?;
        let (hw, ct) = (t.hw_out, t.c_in);
        let pooled = Nhwc::new(pooled.slice(), (n, hw.h, hw.w, ct), ct)?;
        pool::avgpool_fwd(&*self.d, block.acts(n)?, Some(self.coefs(t.norm)?), pooled)?;
        let out = next.acts(n)?.channels(0, t.conv.co)?;
        let stats = next.stats(0, t.conv.co)?;
        let (ctx, w) = (self.ctx(plan), self.conv_weights(t.conv)?);
        let conv = ConvIn {
            x: pooled,
            pre: None,
            w,
            g: t.conv.g,
        };
        T::conv_fwd(&ctx, conv, out, mode.when_training(stats), next_bn)
    }

    /// norm5 → ReLU → global average pool → linear.
    fn head_fwd(&self, plan: &Plan<T>, hd: &Head, mode: Mode, left: Left) -> Result<Left> {
        let (d, n, c) = (&*self.d, plan.n, hd.c);
        let last = plan.blocks.last().context("a DenseNet has blocks")?;
        let batch = mode.when_training((last.stats(0, c)?, hd.hw.rows(n)));
        self.bn_scale_shift(hd.norm, batch, left)?;
        let features = Nhwc::new(plan.features.slice(), (n, hd.hw.h, hd.hw.w, c), c)?;
        let acts = last.acts(n)?;
        let coef = self.coefs(hd.norm)?;
        bn::apply(d, acts.mat(), coef, Activation::Relu, features.mat())?;
        pool::gap_fwd(d, features, plan.pooled()?)?;
        let wb = (self.param(hd.fc, c)?, self.param(hd.fc + c, 1)?);
        linear::fwd(d, plan.pooled()?, wb, plan.logits.slice())?;
        Ok(Left::Coefficients { pending: 0 })
    }
}
