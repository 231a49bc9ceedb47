//! The forward pass over the schedule's stages (recording the tape in Train mode, or in either
//! mode on request) and the backward over the same stages in reverse.

use super::schedule::{BnIdx, Head, Layer, Stem, Step, Transition};
use super::tape::{BlockAct, Node, Tape};
use super::DenseNet;
use crate::ops::bn::{self, BnOpts, ParamGrads};
use crate::ops::conv::{bwd_data, bwd_weight, fwd};
use crate::ops::{linear, pool, Activation, BnRelu, Float, Image, Mode, Out, Rows};

/// A forward in progress: the block buffer being filled, and what it records.
struct Pass<T> {
    n: usize,
    mode: Mode,
    keep: Keep,
    cur: Option<BlockAct<T>>,
    nodes: Vec<Node<T>>,
    blocks: Vec<BlockAct<T>>,
    logits: Vec<T>,
    fmap: Option<Vec<T>>,
}

/// What a forward keeps besides the logits: the tape (for one backward), the final feature map
/// (norm5 + ReLU, for class activation maps).
#[derive(Clone, Copy)]
struct Keep {
    tape: bool,
    features: bool,
}

/// The block gradient buffers of a backward in progress, and the dense layers' temporaries,
/// reused across layers (no allocation or page faults per layer).
struct Grads<T> {
    /// The forward's mode, which its BNs normalised in.
    mode: Mode,
    dbufs: Vec<Vec<T>>,
    da2: Vec<T>,
    dy1: Vec<T>,
    da1: Vec<T>,
}

impl<T: Float> DenseNet<T> {
    /// x: `[n, h, w, 3]` normalised NHWC. Returns logits `[n]`. Train mode records the tape (for
    /// one backward) and updates BN running stats and counters; Eval uses running stats and
    /// records nothing.
    pub fn forward(&mut self, x: &[T], n: usize, h: usize, w: usize, mode: Mode) -> Vec<T> {
        let keep = Keep {
            tape: mode == Mode::Train,
            features: false,
        };
        self.run(x, (n, h, w), mode, keep).0
    }

    /// [`forward`](Self::forward) that records the tape in either mode, for one `backward`.
    /// In Eval mode BN uses the running stats (left untouched, counters too) and the backward
    /// differentiates that affine map: the gradients of `model.eval()` in PyTorch.
    pub fn forward_recorded(
        &mut self,
        x: &[T],
        n: usize,
        h: usize,
        w: usize,
        mode: Mode,
    ) -> Vec<T> {
        let keep = Keep {
            tape: true,
            features: false,
        };
        self.run(x, (n, h, w), mode, keep).0
    }

    /// Eval-mode forward that also returns the final feature map after norm5 + ReLU,
    /// `[n, h', w', C]`, and `h'`, `w'`, for CAMs.
    pub fn forward_features(
        &mut self,
        x: &[T],
        n: usize,
        h: usize,
        w: usize,
    ) -> (Vec<T>, Vec<T>, usize, usize) {
        let keep = Keep {
            tape: false,
            features: true,
        };
        let (logits, fmap) = self.run(x, (n, h, w), Mode::Eval, keep);
        let hw = self.schedule(h, w).expect("run checked it").feature_hw();
        (logits, fmap.expect("features requested"), hw.h, hw.w)
    }

    /// A BN's `(scale, shift)`: from batch `(mean, var, count)` in training (also updating the
    /// running stats and counter), else from the running stats.
    fn bn_coeffs(&mut self, idx: BnIdx, batch: Option<(&[T], &[T], usize)>) -> (Vec<T>, Vec<T>) {
        let c = idx.c;
        let (gamma, beta) = self.params[idx.p..idx.p + 2 * c].split_at(c);
        let (rm, rv) = self.stats[idx.s..idx.s + 2 * c].split_at_mut(c);
        match batch {
            Some((mean, var, count)) => {
                bn::update_running(rm, rv, mean, var, count);
                self.counters[idx.cnt] += 1;
                bn::scale_shift(gamma, beta, mean, var)
            }
            None => bn::scale_shift(gamma, beta, rm, rv),
        }
    }

    /// Copies of a BN's running mean and variance `[c]`.
    fn running(&self, idx: BnIdx) -> (Vec<T>, Vec<T>) {
        let (rm, rv) = self.stats[idx.s..idx.s + 2 * idx.c].split_at(idx.c);
        (rm.to_vec(), rv.to_vec())
    }

    /// The statistics a BN normalised with: the block's cached batch statistics (`mean`, `var`:
    /// `[c]`) in training, its own running stats in eval (the cache is per channel, but each
    /// BN reading a channel has its own running stats).
    fn used_stats(&self, idx: BnIdx, mode: Mode, mean: &[T], var: &[T]) -> (Vec<T>, Vec<T>) {
        match mode {
            Mode::Train => (mean.to_vec(), var.to_vec()),
            Mode::Eval => self.running(idx),
        }
    }

    /// Scale and shift of a BN from the statistics it used (backward).
    fn bn_saved(&self, idx: BnIdx, mean: &[T], var: &[T]) -> (Vec<T>, Vec<T>) {
        let (gamma, beta) = self.params[idx.p..idx.p + 2 * idx.c].split_at(idx.c);
        bn::scale_shift(gamma, beta, mean, var)
    }

    /// The schedule's stages in order; logits, and the final feature map if `keep.features`.
    fn run(
        &mut self,
        x: &[T],
        (n, h, w): (usize, usize, usize),
        mode: Mode,
        keep: Keep,
    ) -> (Vec<T>, Option<Vec<T>>) {
        assert_eq!(x.len(), n * h * w * 3, "forward: x must be [n, h, w, 3]");
        let schedule = self
            .schedule(h, w)
            .expect("forward: the caller checks the input size (Net::forward does)");
        self.tape = None;
        let mut pass = Pass {
            n,
            mode,
            keep,
            cur: None,
            nodes: Vec::new(),
            blocks: Vec::new(),
            logits: Vec::new(),
            fmap: None,
        };
        for step in schedule.forward() {
            match step {
                Step::Stem(s) => self.stem_fwd(s, x, &mut pass),
                Step::Layer(l) => self.layer_fwd(l, &mut pass),
                Step::Transition(t) => self.transition_fwd(t, &mut pass),
                Step::Head(hd) => self.head_fwd(hd, &mut pass),
            }
        }
        if keep.tape {
            let tape = Tape {
                schedule,
                n,
                nodes: pass.nodes,
                blocks: pass.blocks,
            };
            self.tape = Some((tape, mode));
        }
        (pass.logits, pass.fmap)
    }

    /// conv0 → norm0 → ReLU → max pool into block 0's buffer.
    fn stem_fwd(&mut self, s: &Stem, x: &[T], p: &mut Pass<T>) {
        let (n, f0) = (p.n, s.conv.co);
        let m0 = s.conv_out.rows(n);
        let mut y0 = self.buffer(m0 * f0); // overwritten by conv0
        let xi = Image {
            data: x,
            n,
            h: s.input.h,
            w: s.input.w,
            c: 3,
            rs: 3,
        };
        fwd(xi, None, s.conv.of(&self.params), f0, s.conv.g, &mut y0, f0);
        let st0 = (p.mode == Mode::Train).then(|| bn::batch_stats(&y0, m0, f0, f0));
        let (sc, sh) = self.bn_coeffs(s.norm, st0.as_ref().map(|(m, v)| (&m[..], &v[..], m0)));
        let mut a0 = self.buffer(m0 * f0); // overwritten by the BN
        let y0v = Rows::new(&y0[..], m0, f0, f0);
        bn::apply(y0v, &sc, &sh, Activation::Relu, &mut a0, f0);
        let (hb, wb, ct0) = (s.pool_out.h, s.pool_out.w, self.layout.blocks[0].c_total);
        let mut cur = BlockAct::new(self.buffer(n * hb * wb * ct0), n, hb, wb, ct0);
        let (h0, w0) = (s.conv_out.h, s.conv_out.w);
        pool::maxpool_fwd(Image::dense(&a0, (n, h0, w0, f0)), &mut cur.buf, ct0);
        self.spare.push(a0);
        if p.mode == Mode::Train {
            cur.cache_stats(0, f0);
        }
        if p.keep.tape {
            let (mean, var) = st0.unwrap_or_else(|| self.running(s.norm));
            let x = x.to_vec();
            p.nodes.push(Node::Stem { x, y0, mean, var });
        }
        p.cur = Some(cur);
    }

    /// BN1 + ReLU → 1×1 → BN2 + ReLU → 3×3, from the block's channel prefix into its next `k`
    /// channels.
    fn layer_fwd(&mut self, l: &Layer, p: &mut Pass<T>) {
        let (c, mid, k, ct) = (l.c_in, l.conv1.co, l.conv2.co, l.c_total);
        let (n, rows) = (p.n, l.hw.rows(p.n));
        let (mode, cur) = (p.mode, p.cur.take().expect("the stem fills block 0 first"));
        let batch1 = mode.when_training((&cur.mean[..c], &cur.var[..c], rows));
        let (s1, t1) = self.bn_coeffs(l.norm1, batch1);
        let mut y1 = self.buffer(rows * mid); // overwritten by conv1
        let prefix = Image {
            data: &cur.buf,
            n,
            h: l.hw.h,
            w: l.hw.w,
            c,
            rs: ct,
        };
        let pre1 = BnRelu {
            scale: &s1,
            shift: &t1,
        };
        let w1 = l.conv1.of(&self.params);
        fwd(prefix, Some(pre1), w1, mid, l.conv1.g, &mut y1, mid);
        let st2 = (mode == Mode::Train).then(|| bn::batch_stats(&y1, rows, mid, mid));
        let batch2 = st2.as_ref().map(|(m, v)| (&m[..], &v[..], rows));
        let (s2, t2) = self.bn_coeffs(l.norm2, batch2);
        let yi = Image {
            data: &y1,
            n,
            h: l.hw.h,
            w: l.hw.w,
            c: mid,
            rs: mid,
        };
        let pre2 = BnRelu {
            scale: &s2,
            shift: &t2,
        };
        let mut cur = cur;
        let w2 = l.conv2.of(&self.params);
        fwd(yi, Some(pre2), w2, k, l.conv2.g, &mut cur.buf[c..], ct);
        if mode == Mode::Train {
            cur.cache_stats(c, k);
        }
        if p.keep.tape {
            let (mean2, var2) = st2.unwrap_or_else(|| self.running(l.norm2));
            p.nodes.push(Node::DenseLayer { y1, mean2, var2 });
        }
        p.cur = Some(cur);
    }

    /// BN + ReLU → 2×2 avg pool → 1×1 conv into the next block's first channels.
    fn transition_fwd(&mut self, t: &Transition, p: &mut Pass<T>) {
        let (n, ct, nct, rows) = (p.n, t.c_in, t.next_c_total, t.hw_in.rows(p.n));
        let cur = p.cur.take().expect("a transition follows its block");
        let batch = p.mode.when_training((&cur.mean[..], &cur.var[..], rows));
        let (s, sh) = self.bn_coeffs(t.norm, batch);
        let (hp, wp) = (t.hw_out.h, t.hw_out.w);
        let mut pooled = self.buffer(n * hp * wp * ct); // overwritten by the pool
        let pre = BnRelu {
            scale: &s,
            shift: &sh,
        };
        let x = Image::dense(&cur.buf, (n, cur.h, cur.w, ct));
        pool::avgpool_fwd(x, Some(pre), &mut pooled, ct);
        let mut next = BlockAct::new(self.buffer(n * hp * wp * nct), n, hp, wp, nct);
        let pi = Image {
            data: &pooled,
            n,
            h: hp,
            w: wp,
            c: ct,
            rs: ct,
        };
        let wt = t.conv.of(&self.params);
        fwd(pi, None, wt, t.conv.co, t.conv.g, &mut next.buf, nct);
        if p.mode == Mode::Train {
            next.cache_stats(0, t.conv.co);
        }
        if p.keep.tape {
            p.blocks.push(cur);
            p.nodes.push(Node::Transition { pooled });
        }
        p.cur = Some(next);
    }

    /// norm5 → ReLU → global average pool → linear.
    fn head_fwd(&mut self, hd: &Head, p: &mut Pass<T>) {
        let (n, c) = (p.n, hd.c);
        let cur = p.cur.take().expect("the head follows the last block");
        let rows = cur.rows();
        let batch = p.mode.when_training((&cur.mean[..], &cur.var[..], rows));
        let (s, t) = self.bn_coeffs(hd.norm, batch);
        let mut a5 = vec![T::ZERO; rows * c];
        bn::apply(
            Rows::new(&cur.buf[..], rows, c, c),
            &s,
            &t,
            Activation::Relu,
            &mut a5,
            c,
        );
        let feat = pool::gap_fwd(&a5, n, cur.h * cur.w, c);
        let (fw, fb) = self.params[hd.fc..hd.fc + c + 1].split_at(c);
        p.logits = linear::fwd(&feat, n, c, fw, fb);
        if p.keep.features {
            p.fmap = Some(a5);
        }
        if p.keep.tape {
            p.blocks.push(cur);
            p.nodes.push(Node::Head { feat });
        }
    }

    /// `dlogits: [n]`. Accumulates d(loss)/d(params) into `self.grads` (after a Train-mode
    /// `forward` or a `forward_recorded`; the BN mode is the forward's): the schedule's stages
    /// in reverse, one tape node each.
    pub fn backward(&mut self, dlogits: &[T]) {
        let (mut tape, mode) = self
            .tape
            .take()
            .expect("backward needs a Train-mode forward or a forward_recorded first");
        assert_eq!(dlogits.len(), tape.n, "backward: dlogits must be [n]");
        let mut g = Grads {
            mode,
            dbufs: (0..tape.blocks.len()).map(|_| Vec::new()).collect(),
            da2: Vec::new(),
            dy1: Vec::new(),
            da1: Vec::new(),
        };
        let schedule = tape.schedule.clone();
        for step in schedule.backward() {
            let node = tape.nodes.pop().expect("one tape node per stage");
            match (step, node) {
                (Step::Head(hd), Node::Head { feat }) => {
                    self.head_bwd(hd, &tape, &feat, dlogits, &mut g)
                }
                (Step::Layer(l), Node::DenseLayer { y1, mean2, var2 }) => {
                    self.layer_bwd(l, &tape, (y1, mean2, var2), &mut g)
                }
                (Step::Transition(t), Node::Transition { pooled }) => {
                    self.transition_bwd(t, &mut tape, pooled, &mut g)
                }
                (Step::Stem(s), Node::Stem { x, y0, mean, var }) => {
                    self.stem_bwd(s, &mut tape, (x, y0, mean, var), &mut g)
                }
                _ => unreachable!("the tape records one node per stage, in the schedule's order"),
            }
        }
    }

    fn head_bwd(&mut self, hd: &Head, tape: &Tape<T>, feat: &[T], dlogits: &[T], g: &mut Grads<T>) {
        let last = tape.blocks.len() - 1;
        let blk = &tape.blocks[last];
        let (n, rows, c) = (blk.n, blk.rows(), hd.c);
        let fw = &self.params[hd.fc..hd.fc + c];
        let (dw, db) = self.grads[hd.fc..hd.fc + c + 1].split_at_mut(c);
        let dfeat = linear::bwd(feat, n, c, fw, dlogits, dw, db);
        let mut da = self.buffer(rows * c); // overwritten by the pool
        pool::gap_bwd(&dfeat, n, blk.h * blk.w, c, &mut da);
        let mut dbuf = self.buffer(rows * c); // overwritten by the BN backward
        let (mean, var) = self.used_stats(hd.norm, g.mode, &blk.mean, &blk.var);
        let (x, dy) = (
            Rows::new(&blk.buf[..], rows, c, c),
            Rows::new(&da[..], rows, c, c),
        );
        let dx = Out::overwrite(&mut dbuf[..], c);
        self.bn_bwd(hd.norm, g.mode, x, (&mean, &var), dy, dx);
        g.dbufs[last] = dbuf;
        self.spare.push(da);
    }

    fn layer_bwd(
        &mut self,
        l: &Layer,
        tape: &Tape<T>,
        saved: (Vec<T>, Vec<T>, Vec<T>),
        g: &mut Grads<T>,
    ) {
        let (y1, mean2, var2) = saved;
        let blk = &tape.blocks[l.block];
        let dbuf = &mut g.dbufs[l.block];
        let (ct, c, mid, k, rows) = (l.c_total, l.c_in, l.conv1.co, l.conv2.co, blk.rows());
        let (n, h, w) = (blk.n, blk.h, blk.w);
        // conv2 (3×3) on relu(norm2(y1)).
        let (s2, t2) = self.bn_saved(l.norm2, &mean2, &var2);
        let yi = Image {
            data: &y1,
            n,
            h,
            w,
            c: mid,
            rs: mid,
        };
        let pre2 = BnRelu {
            scale: &s2,
            shift: &t2,
        };
        let g2 = &mut self.grads[l.conv2.p..l.conv2.p + l.conv2.len()];
        bwd_weight(yi, Some(pre2), l.conv2.g, &dbuf[c..], ct, k, g2);
        let da2 = scratch(&mut g.da2, rows * mid); // overwritten below
        let w2 = l.conv2.of(&self.params);
        bwd_data(&dbuf[c..], ct, k, w2, l.conv2.g, (n, h, w, mid), da2);
        let dy1 = scratch(&mut g.dy1, rows * mid); // overwritten below
        let (x2, d2) = (yi.rows(), Rows::new(&da2[..], rows, mid, mid));
        let stats2 = (&mean2[..], &var2[..]);
        self.bn_bwd(l.norm2, g.mode, x2, stats2, d2, Out::overwrite(dy1, mid));
        // conv1 (1×1) on relu(norm1(prefix)).
        let (mean1, var1) = self.used_stats(l.norm1, g.mode, &blk.mean[..c], &blk.var[..c]);
        let (s1, t1) = self.bn_saved(l.norm1, &mean1, &var1);
        let prefix = Image {
            data: &blk.buf,
            n,
            h,
            w,
            c,
            rs: ct,
        };
        let pre1 = BnRelu {
            scale: &s1,
            shift: &t1,
        };
        let g1 = &mut self.grads[l.conv1.p..l.conv1.p + l.conv1.len()];
        bwd_weight(prefix, Some(pre1), l.conv1.g, dy1, mid, mid, g1);
        let da1 = scratch(&mut g.da1, rows * c); // overwritten below
        let w1 = l.conv1.of(&self.params);
        bwd_data(dy1, mid, mid, w1, l.conv1.g, (n, h, w, c), da1);
        let (x1, d1) = (prefix.rows(), Rows::new(&da1[..], rows, c, c));
        let stats1 = (&mean1[..], &var1[..]);
        self.bn_bwd(l.norm1, g.mode, x1, stats1, d1, Out::accumulate(dbuf, ct));
        self.spare.push(y1);
    }

    fn transition_bwd(
        &mut self,
        t: &Transition,
        tape: &mut Tape<T>,
        pooled: Vec<T>,
        g: &mut Grads<T>,
    ) {
        let b = t.block;
        let (blk, nxt) = (&tape.blocks[b], &tape.blocks[b + 1]);
        let (ct, nct, n) = (t.c_in, t.next_c_total, blk.n);
        let dnext = std::mem::take(&mut g.dbufs[b + 1]);
        let pi = Image {
            data: &pooled,
            n,
            h: nxt.h,
            w: nxt.w,
            c: ct,
            rs: ct,
        };
        let gt = &mut self.grads[t.conv.p..t.conv.p + t.conv.len()];
        bwd_weight(pi, None, t.conv.g, &dnext, nct, t.conv.co, gt);
        let mut dp = self.buffer(nxt.rows() * ct); // overwritten below
        let wt = t.conv.of(&self.params);
        let dims = (n, nxt.h, nxt.w, ct);
        bwd_data(&dnext, nct, t.conv.co, wt, t.conv.g, dims, &mut dp);
        let mut da = self.buffer(blk.rows() * ct); // overwritten by the pool
        pool::avgpool_bwd(n, blk.h, blk.w, ct, &dp, ct, &mut da);
        let mut dbuf = self.buffer(blk.rows() * ct); // overwritten by the BN backward
        let (mean, var) = self.used_stats(t.norm, g.mode, &blk.mean, &blk.var);
        let rows = blk.rows();
        let (x, dy) = (
            Rows::new(&blk.buf[..], rows, ct, ct),
            Rows::new(&da[..], rows, ct, ct),
        );
        let dx = Out::overwrite(&mut dbuf[..], ct);
        self.bn_bwd(t.norm, g.mode, x, (&mean, &var), dy, dx);
        g.dbufs[b] = dbuf;
        let nxt_buf = std::mem::take(&mut tape.blocks[b + 1].buf);
        self.spare.extend([pooled, dnext, dp, da, nxt_buf]);
    }

    #[allow(clippy::type_complexity)]
    fn stem_bwd(
        &mut self,
        s: &Stem,
        tape: &mut Tape<T>,
        (x, y0, mean, var): (Vec<T>, Vec<T>, Vec<T>, Vec<T>),
        g: &mut Grads<T>,
    ) {
        let (n, f0) = (tape.n, s.conv.co);
        let (h0, w0) = (s.conv_out.h, s.conv_out.w);
        let m0 = s.conv_out.rows(n);
        let (sc, sh) = self.bn_saved(s.norm, &mean, &var);
        let mut a0 = self.buffer(m0 * f0); // overwritten by the BN
        let y0v = Rows::new(&y0[..], m0, f0, f0);
        bn::apply(y0v, &sc, &sh, Activation::Relu, &mut a0, f0);
        let mut da0 = self.buffer(m0 * f0); // overwritten by the pool
        let ct0 = self.layout.blocks[0].c_total;
        let (ho, wo) = (s.pool_out.h, s.pool_out.w);
        let dpooled = Rows::new(&g.dbufs[0][..], n * ho * wo, f0, ct0);
        pool::maxpool_bwd(Image::dense(&a0, (n, h0, w0, f0)), dpooled, &mut da0);
        let mut dy0 = self.buffer(m0 * f0); // overwritten by the BN backward
        let (x0, dy) = (
            Rows::new(&y0[..], m0, f0, f0),
            Rows::new(&da0[..], m0, f0, f0),
        );
        let dx = Out::overwrite(&mut dy0[..], f0);
        self.bn_bwd(s.norm, g.mode, x0, (&mean, &var), dy, dx);
        let xi = Image {
            data: &x,
            n,
            h: s.input.h,
            w: s.input.w,
            c: 3,
            rs: 3,
        };
        let g0 = &mut self.grads[s.conv.p..s.conv.p + s.conv.len()];
        bwd_weight(xi, None, s.conv.g, &dy0, f0, f0, g0);
        let (b0, d0) = (
            std::mem::take(&mut tape.blocks[0].buf),
            std::mem::take(&mut g.dbufs[0]),
        );
        self.spare.extend([y0, a0, da0, dy0, b0, d0]);
    }

    /// Backward of a BN + ReLU that normalised with `(mean, var)` (batch statistics in training,
    /// running ones in eval), `x` and `dy` of its `idx.c` channels: adds to gamma's and beta's
    /// gradients, puts the input gradient into `dx`.
    fn bn_bwd(
        &mut self,
        idx: BnIdx,
        mode: Mode,
        x: Rows<T>,
        (mean, var): (&[T], &[T]),
        dy: Rows<T>,
        dx: Out<T>,
    ) {
        let c = idx.c;
        let (gamma, beta) = self.params[idx.p..idx.p + 2 * c].split_at(c);
        let (dgamma, dbeta) = self.grads[idx.p..idx.p + 2 * c].split_at_mut(c);
        let bn = bn::Bn {
            gamma,
            beta,
            mean,
            var,
        };
        let dparams = ParamGrads { dgamma, dbeta };
        bn::backward(x, bn, BnOpts::relu(mode), dy, dparams, dx);
    }

    /// A buffer of `len` elements from the spares (stale contents) or freshly zeroed.
    fn buffer(&mut self, len: usize) -> Vec<T> {
        match self.spare.iter().position(|v| v.len() == len) {
            Some(i) => self.spare.swap_remove(i),
            None => vec![T::ZERO; len],
        }
    }
}

/// The first `len` elements of a reusable buffer, grown (zero-filled) if needed; the
/// contents are whatever the last user left.
fn scratch<T: Float>(v: &mut Vec<T>, len: usize) -> &mut [T] {
    if v.len() < len {
        v.resize(len, T::ZERO);
    }
    &mut v[..len]
}

impl<T: Float> BlockAct<T> {
    /// `buf: [n, h, w, c_total]`, possibly stale: channels are read only after being written.
    fn new(buf: Vec<T>, n: usize, h: usize, w: usize, c_total: usize) -> Self {
        BlockAct {
            buf,
            n,
            h,
            w,
            mean: vec![T::ZERO; c_total],
            var: vec![T::ZERO; c_total],
        }
    }

    /// Compute and keep the batch statistics of channels `[c0, c0 + k)`.
    fn cache_stats(&mut self, c0: usize, k: usize) {
        let ct = self.mean.len();
        let (m, v) = bn::batch_stats(&self.buf[c0..], self.rows(), k, ct);
        self.mean[c0..c0 + k].copy_from_slice(&m);
        self.var[c0..c0 + k].copy_from_slice(&v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::spec::DenseNetSpec;

    /// Train steps on a model whose buffers come from the spares (stale contents) give
    /// bit-identical logits and gradients to a freshly built model.
    #[test]
    fn reused_buffers_change_nothing() {
        let spec = DenseNetSpec::custom(4, vec![2, 2], 8, 2).unwrap();
        let (n, h, w) = (2, 32, 32);
        let mut rng = Rng::new(7);
        let x: Vec<f64> = (0..n * h * w * 3).map(|_| rng.normal()).collect();
        let other: Vec<f64> = (0..n * h * w * 3).map(|_| rng.normal()).collect();
        let dl = [0.3, -1.1];
        let step = |m: &mut DenseNet<f64>, x: &[f64]| {
            m.zero_grad();
            let logits = m.forward(x, n, h, w, Mode::Train);
            m.backward(&dl);
            (logits, m.grads.clone())
        };
        let mut fresh = DenseNet::<f64>::new(spec.clone(), 3);
        let mut reused = DenseNet::<f64>::new(spec, 3);
        step(&mut reused, &other); // fills the spares with another batch's values
        reused.stats.clone_from(&fresh.stats);
        reused.counters.clone_from(&fresh.counters);
        assert!(!reused.spare.is_empty());
        assert_eq!(step(&mut reused, &x), step(&mut fresh, &x));
    }
}
