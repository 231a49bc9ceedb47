//! The GPU model's backward: the logits' gradient to the device, then one launch sequence per
//! stage of the schedule in reverse (captured once as a graph per batch size).
//!
//! Both precisions defer the per-channel part of each dense layer's BN1 backward: the 1×1's data
//! gradient adds only `scale · dz` into the block's gradient buffer (bf16: from its epilogue); the
//! rest, affine in x per channel, is summed over every layer that reads the channel (the block's
//! `deferred` terms) and added once the channel's gradient is complete, before its producer's
//! backward ([`GpuDenseNet::apply_deferred`]).

use super::plan::{stats_of, BlockBufs, Plan};
use super::{BnDx, DxOut, Engine, GpuDenseNet, Pass};
use crate::gpu::ops::bn::{self, Grad, Saved};
use crate::gpu::ops::{linear, pool};
use crate::gpu::{Mat, Nhwc};
use crate::model::schedule::{BnIdx, Dir, Head, Layer, Stage, Stem, Step, Transition};
use crate::ops::bn::BnOpts;
use crate::ops::{Mode, Write};
use anyhow::{bail, Context, Result};

impl<T: Engine> GpuDenseNet<T> {
    /// `dlogits: [n]` after a train-mode forward: every parameter's gradient added to.
    pub(super) fn backward_from(&mut self, dlogits: &[f32]) -> Result<()> {
        if !self.recorded {
            bail!(crate::net::Misuse::NoForward);
        }
        let plan = self.plan.take().context("recorded implies planned")?;
        self.recorded = false;
        let out = self.backward_planned(&plan, dlogits);
        self.plan = Some(plan);
        out
    }

    /// The logits' gradient to the device, then the backward's kernels (one graph per batch
    /// size).
    fn backward_planned(&mut self, plan: &Plan<T>, dlogits: &[f32]) -> Result<()> {
        if dlogits.len() != plan.n {
            bail!(crate::net::Misuse::GradShape {
                len: dlogits.len(),
                n: plan.n,
            });
        }
        self.d.stage(Stage::Start(Dir::Bwd));
        plan.logits_grad.slice().upload(&*self.d, dlogits)?;
        self.run_graph((Pass::Backward, plan.n), &|m: &Self| {
            m.backward_kernels(plan)
        })?;
        self.d.synchronize()
    }

    /// Launch the whole backward, stage by stage in reverse, from the logits' gradient in the
    /// plan to every parameter's. Every block's gradient buffer is first written whole (by the
    /// head or by the transition after it), then accumulated into by its layers.
    fn backward_kernels(&self, plan: &Plan<T>) -> Result<()> {
        self.d.stage(Stage::Start(Dir::Bwd));
        if T::TENSOR_CORES {
            self.sums.fill_bytes(0)?;
        }
        for block in &plan.blocks {
            block.deferred.fill_bytes(0)?;
        }
        for step in plan.schedule.backward() {
            self.d.stage(Stage::of(step, Dir::Bwd));
            match step {
                Step::Head(hd) => self.head_bwd(plan, hd)?,
                Step::Transition(t) => self.transition_bwd(plan, t)?,
                Step::Layer(l) => self.layer_bwd(plan, l)?,
                Step::Stem(s) => self.stem_bwd(plan, s)?,
            }
        }
        Ok(())
    }

    /// What a BN of `block` read in the forward: channels `[0, c)` of its activations, with
    /// their batch statistics and the BN's coefficients.
    fn saved_in_block(&self, bn: BnIdx, block: &BlockBufs<T>, n: usize) -> Result<Saved<T>> {
        Ok(Saved {
            x: block.acts(n)?.channels(0, bn.c)?.mat(),
            stats: block.stats(0, bn.c)?,
            coef: self.coefs(bn)?,
        })
    }

    /// linear → global average pool → norm5 + ReLU, writing the last block's gradient whole.
    fn head_bwd(&self, plan: &Plan<T>, hd: &Head) -> Result<()> {
        let (d, n, c) = (&*self.d, plan.n, hd.c);
        let wb = (self.param(hd.fc, c)?, self.param(hd.fc + c, 1)?);
        let dwb = (self.grad(hd.fc, c)?, self.grad(hd.fc + c, 1)?);
        let (pooled, dpooled) = (plan.pooled()?, plan.pooled_grad()?);
        linear::bwd(d, pooled, wb, plan.logits_grad.slice(), dwb, dpooled)?;
        let dfeatures = plan.scratch(0, hd.hw, c)?;
        pool::gap_bwd(d, dpooled, dfeatures)?;
        let last = plan.blocks.last().context("a DenseNet has blocks")?;
        let saved = self.saved_in_block(hd.norm, last, n)?;
        let dx = Grad {
            mat: last.grads(n)?.mat(),
            write: Write::Overwrite,
        };
        let dparams = self.bn_grads(hd.norm)?;
        bn::backward(
            d,
            saved,
            BnOpts::relu(Mode::Train),
            dfeatures.mat(),
            dparams,
            dx,
            self.bn_scratch(),
        )
    }

    /// The transition from block `t.block` to the next: the 1×1's gradients, the pool's, and the
    /// BN's, writing block `t.block`'s gradient whole.
    fn transition_bwd(&self, plan: &Plan<T>, t: &Transition) -> Result<()> {
        let (d, n, ct) = (&*self.d, plan.n, t.c_in);
        let (block, next) = (&plan.blocks[t.block], &plan.blocks[t.block + 1]);
        self.apply_deferred(next, n, 0, t.conv.co)?;
        let pooled = block
            .pooled
            .as_ref()
            .context("a transition's pooled buffer")?;
        let pooled = Nhwc::new(pooled.slice(), (n, t.hw_out.h, t.hw_out.w, ct), ct)?;
        let dnext = next.grads(n)?.channels(0, t.conv.co)?;
        let (ctx, dw) = (self.ctx(plan), self.conv_grad(t.conv)?);
        T::conv_bwd_weight(&ctx, pooled, None, t.conv.g, dnext, dw)?;
        let dpooled = plan.scratch(0, t.hw_out, ct)?;
        let w = self.conv_weights(t.conv)?;
        T::conv_bwd_data(&ctx, dnext, w, t.conv.g, DxOut::Plain(dpooled))?;
        let dacts = plan.scratch(1, t.hw_in, ct)?;
        pool::avgpool_bwd(d, dpooled, dacts)?;
        let saved = self.saved_in_block(t.norm, block, n)?;
        let dx = Grad {
            mat: block.grads(n)?.mat(),
            write: Write::Overwrite,
        };
        let dparams = self.bn_grads(t.norm)?;
        bn::backward(
            d,
            saved,
            BnOpts::relu(Mode::Train),
            dacts.mat(),
            dparams,
            dx,
            self.bn_scratch(),
        )
    }

    /// A dense layer: its output channels' gradient completed by their deferred terms, then
    /// conv2 (3×3) on relu(norm2(bottleneck)) into a scratch, then conv1 (1×1) on
    /// relu(norm1(prefix)), added into the block's gradient buffer (the BN1 backward's
    /// per-channel terms deferred).
    fn layer_bwd(&self, plan: &Plan<T>, l: &Layer) -> Result<()> {
        let (n, c, mid, k) = (plan.n, l.c_in, l.conv1.co, l.conv2.co);
        let block = &plan.blocks[l.block];
        self.apply_deferred(block, n, c, k)?;
        let y1 = &block.bottleneck[l.index];
        let y1 = Nhwc::new(y1.slice(), (n, l.hw.h, l.hw.w, mid), mid)?;
        let saved2 = Saved {
            x: y1.mat(),
            stats: stats_of(block.bottleneck_stats[l.index].slice(), mid, 0, mid)?,
            coef: self.coefs(l.norm2)?,
        };
        let ctx = self.ctx(plan);
        let (dy1, dout) = (plan.scratch(1, l.hw, mid)?, block.grads(n)?.channels(c, k)?);
        let (pre2, g2, w2) = (Some(saved2.coef), l.conv2.g, self.conv_weights(l.conv2)?);
        T::conv_bwd_weight(&ctx, y1, pre2, g2, dout, self.conv_grad(l.conv2)?)?;
        let bn2 = BnDx {
            saved: saved2,
            dparams: self.bn_grads(l.norm2)?,
            dx: Grad {
                mat: dy1.mat(),
                write: Write::Overwrite,
            },
            scratch: plan.scratch(0, l.hw, mid)?,
            deferred: None,
        };
        T::conv_bwd_data(&ctx, dout, w2, g2, DxOut::Bn(bn2))?;
        let saved1 = self.saved_in_block(l.norm1, block, n)?;
        let prefix = block.acts(n)?.channels(0, c)?;
        let (pre1, g1, w1) = (Some(saved1.coef), l.conv1.g, self.conv_weights(l.conv1)?);
        T::conv_bwd_weight(&ctx, prefix, pre1, g1, dy1, self.conv_grad(l.conv1)?)?;
        let bn1 = BnDx {
            saved: saved1,
            dparams: self.bn_grads(l.norm1)?,
            dx: Grad {
                mat: block.grads(n)?.channels(0, c)?.mat(),
                write: Write::Accumulate,
            },
            scratch: plan.scratch(0, l.hw, c)?,
            deferred: Some(block.deferred(0, c)?),
        };
        T::conv_bwd_data(&ctx, dy1, w1, g1, DxOut::Bn(bn1))
    }

    /// The max pool's gradient (through norm0 + ReLU recomputed from conv0's output), norm0's,
    /// and conv0's weight gradient.
    fn stem_bwd(&self, plan: &Plan<T>, s: &Stem) -> Result<()> {
        let (d, n, f0) = (&*self.d, plan.n, s.conv.co);
        let block0 = &plan.blocks[0];
        self.apply_deferred(block0, n, 0, f0)?;
        let y0 = plan.stem_out()?;
        let dpool = block0.grads(n)?.channels(0, f0)?;
        let da0 = plan.scratch(0, s.conv_out, f0)?;
        pool::maxpool_bwd(d, y0, Some(self.coefs(s.norm)?), dpool, da0)?;
        let saved = Saved {
            x: y0.mat(),
            stats: stats_of(plan.stem_stats.slice(), f0, 0, f0)?,
            coef: self.coefs(s.norm)?,
        };
        let dy0 = plan.scratch(1, s.conv_out, f0)?;
        let dx = Grad {
            mat: dy0.mat(),
            write: Write::Overwrite,
        };
        let dparams = self.bn_grads(s.norm)?;
        bn::backward(
            d,
            saved,
            BnOpts::relu(Mode::Train),
            da0.mat(),
            dparams,
            dx,
            self.bn_scratch(),
        )?;
        let dw = self.conv_grad(s.conv)?;
        T::conv_bwd_weight(&self.ctx(plan), plan.input()?, None, s.conv.g, dy0, dw)
    }

    /// Adds the deferred BN-backward terms of `block`'s channels `[c0, c0 + c)` (every reader's
    /// share is in by now) to their gradient.
    fn apply_deferred(&self, block: &BlockBufs<T>, n: usize, c0: usize, c: usize) -> Result<()> {
        let dx: Mat<T> = block.grads(n)?.channels(c0, c)?.mat();
        let x = block.acts(n)?.channels(c0, c)?.mat();
        bn::grad_fix(&*self.d, dx, x, block.deferred(c0, c)?)
    }
}
