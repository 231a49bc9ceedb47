//! The forward pass (recording the tape in Train mode, or in either mode on request) and the
//! backward replay.

use super::{BnIdx, ConvIdx, DenseNet, Mode};
use crate::autograd::{BlockAct, Node, Tape};
use crate::ops::conv::{conv2d_bwd_input, conv2d_bwd_weight, conv2d_fwd, Conv, Image};
use crate::ops::{act, bn, pool, BnRelu, Float};

impl ConvIdx {
    fn of<'a, T>(&self, v: &'a [T]) -> &'a [T] {
        &v[self.p..self.p + self.len()]
    }
}

impl<T: Float> DenseNet<T> {
    /// x: `[n, h, w, 3]` normalised NHWC. Returns logits `[n]`. Train mode records the tape (for
    /// one backward) and updates BN running stats and counters; Eval uses running stats and
    /// records nothing.
    pub fn forward(&mut self, x: &[T], n: usize, h: usize, w: usize, mode: Mode) -> Vec<T> {
        let train = mode == Mode::Train;
        self.run(x, n, h, w, train, train, false).0
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
        self.run(x, n, h, w, mode == Mode::Train, true, false).0
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
        let (logits, f) = self.run(x, n, h, w, false, false, true);
        let (fmap, hf, wf) = f.expect("features requested");
        (logits, fmap, hf, wf)
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
    fn used_stats(&self, idx: BnIdx, train: bool, mean: &[T], var: &[T]) -> (Vec<T>, Vec<T>) {
        if train {
            (mean.to_vec(), var.to_vec())
        } else {
            self.running(idx)
        }
    }

    /// Scale and shift of a BN from the statistics it used (backward).
    fn bn_saved(&self, idx: BnIdx, mean: &[T], var: &[T]) -> (Vec<T>, Vec<T>) {
        let (gamma, beta) = self.params[idx.p..idx.p + 2 * idx.c].split_at(idx.c);
        bn::scale_shift(gamma, beta, mean, var)
    }

    #[allow(clippy::type_complexity, clippy::too_many_arguments)]
    fn run(
        &mut self,
        x: &[T],
        n: usize,
        h: usize,
        w: usize,
        train: bool,
        record: bool,
        features: bool,
    ) -> (Vec<T>, Option<(Vec<T>, usize, usize)>) {
        assert_eq!(x.len(), n * h * w * 3, "forward: x must be [n, h, w, 3]");
        let lay = self.layout.clone();
        let mut tape = Tape::default();
        self.tape = None;

        // Stem: conv0 → norm0 → ReLU → max pool into block 0's buffer.
        let f0 = lay.conv0.co;
        let (h0, w0) = Conv::STEM.out_hw(h, w);
        let m0 = n * h0 * w0;
        let mut y0 = self.buffer(m0 * f0); // overwritten by conv0
        let xi = Image {
            data: x,
            n,
            h,
            w,
            c: 3,
            rs: 3,
        };
        conv2d_fwd(
            xi,
            None,
            lay.conv0.of(&self.params),
            f0,
            Conv::STEM,
            &mut y0,
            f0,
        );
        let st0 = train.then(|| bn::batch_stats(&y0, m0, f0, f0));
        let (s, t) = self.bn_coeffs(lay.norm0, st0.as_ref().map(|(m, v)| (&m[..], &v[..], m0)));
        let mut a0 = self.buffer(m0 * f0); // overwritten by the BN
        bn::apply(&y0, m0, f0, f0, &s, &t, true, &mut a0, f0);
        let (hb, wb) = pool::maxpool_out(h0, w0);
        let ct0 = lay.blocks[0].c_total;
        let mut cur = BlockAct::new(self.buffer(n * hb * wb * ct0), n, hb, wb, ct0);
        pool::maxpool_fwd(&a0, n, h0, w0, f0, &mut cur.buf, lay.blocks[0].c_total);
        self.spare.push(a0);
        if train {
            cur.cache_stats(0, f0);
        }
        if record {
            let (mean, var) = st0.unwrap_or_else(|| self.running(lay.norm0));
            tape.nodes.push(Node::Stem {
                x: x.to_vec(),
                y0,
                mean,
                var,
                dims: (n, h, w, f0),
            });
        }

        for (b, blk) in lay.blocks.iter().enumerate() {
            let (rows, ct) = (cur.rows(), blk.c_total);
            for (l, li) in blk.layers.iter().enumerate() {
                let (c, mid, k) = (li.norm1.c, li.conv1.co, li.conv2.co);
                let (s1, t1) = self.bn_coeffs(
                    li.norm1,
                    train.then(|| (&cur.mean[..c], &cur.var[..c], rows)),
                );
                let mut y1 = self.buffer(rows * mid); // overwritten by conv1
                let prefix = Image {
                    data: &cur.buf,
                    n,
                    h: cur.h,
                    w: cur.w,
                    c,
                    rs: ct,
                };
                let pre1 = BnRelu {
                    scale: &s1,
                    shift: &t1,
                };
                conv2d_fwd(
                    prefix,
                    Some(pre1),
                    li.conv1.of(&self.params),
                    mid,
                    Conv::POINTWISE,
                    &mut y1,
                    mid,
                );
                let st2 = train.then(|| bn::batch_stats(&y1, rows, mid, mid));
                let (s2, t2) =
                    self.bn_coeffs(li.norm2, st2.as_ref().map(|(m, v)| (&m[..], &v[..], rows)));
                let yi = Image {
                    data: &y1,
                    n,
                    h: cur.h,
                    w: cur.w,
                    c: mid,
                    rs: mid,
                };
                let pre2 = BnRelu {
                    scale: &s2,
                    shift: &t2,
                };
                conv2d_fwd(
                    yi,
                    Some(pre2),
                    li.conv2.of(&self.params),
                    k,
                    Conv::CONV3,
                    &mut cur.buf[c..],
                    ct,
                );
                if train {
                    cur.cache_stats(c, k);
                }
                if record {
                    let (mean2, var2) = st2.unwrap_or_else(|| self.running(li.norm2));
                    tape.nodes.push(Node::DenseLayer {
                        b,
                        l,
                        y1,
                        mean2,
                        var2,
                    });
                }
            }
            let Some((tn, tc)) = blk.transition else {
                break;
            };
            let (s, t) = self.bn_coeffs(tn, train.then(|| (&cur.mean[..], &cur.var[..], rows)));
            let (hp, wp) = (cur.h / 2, cur.w / 2);
            let mut pooled = self.buffer(n * hp * wp * ct); // overwritten by the pool
            let pre = BnRelu {
                scale: &s,
                shift: &t,
            };
            pool::avgpool_fwd(&cur.buf, n, cur.h, cur.w, ct, Some(pre), &mut pooled, ct);
            let nct = lay.blocks[b + 1].c_total;
            let mut next = BlockAct::new(self.buffer(n * hp * wp * nct), n, hp, wp, nct);
            let pi = Image {
                data: &pooled,
                n,
                h: hp,
                w: wp,
                c: ct,
                rs: ct,
            };
            conv2d_fwd(
                pi,
                None,
                tc.of(&self.params),
                tc.co,
                Conv::POINTWISE,
                &mut next.buf,
                nct,
            );
            let done = std::mem::replace(&mut cur, next);
            if train {
                cur.cache_stats(0, tc.co);
            }
            if record {
                tape.blocks.push(done);
                tape.nodes.push(Node::Transition { b, pooled });
            }
        }

        // Head: norm5 → ReLU → global average pool → linear.
        let (rows, c) = (cur.rows(), lay.norm5.c);
        let (s, t) = self.bn_coeffs(
            lay.norm5,
            train.then(|| (&cur.mean[..], &cur.var[..], rows)),
        );
        let mut a5 = vec![T::ZERO; rows * c];
        bn::apply(&cur.buf, rows, c, c, &s, &t, true, &mut a5, c);
        let feat = pool::gap_fwd(&a5, n, cur.h * cur.w, c);
        let (fw, fb) = self.params[lay.fc..lay.fc + c + 1].split_at(c);
        let logits = act::linear_fwd(&feat, n, c, fw, fb);
        let fmap = features.then_some((a5, cur.h, cur.w));
        if record {
            tape.blocks.push(cur);
            tape.nodes.push(Node::Head { feat });
            self.tape = Some((tape, train));
        }
        (logits, fmap)
    }

    /// `dlogits: [n]`. Accumulates d(loss)/d(params) into `self.grads` (after a Train-mode
    /// `forward` or a `forward_recorded`; the BN mode is the forward's).
    pub fn backward(&mut self, dlogits: &[T]) {
        let (mut tape, train) = self
            .tape
            .take()
            .expect("backward needs a Train-mode forward or a forward_recorded first");
        let lay = self.layout.clone();
        let nb = lay.blocks.len();
        let mut dbufs: Vec<Vec<T>> = (0..nb).map(|_| Vec::new()).collect();
        // Dense-layer temporaries, reused across layers (no allocation or page faults per layer).
        let (mut s_da2, mut s_dy1, mut s_da1) = (Vec::new(), Vec::new(), Vec::new());
        while let Some(node) = tape.nodes.pop() {
            match node {
                Node::Head { feat } => {
                    let blk = &tape.blocks[nb - 1];
                    let (n, rows, c) = (blk.n, blk.rows(), lay.norm5.c);
                    assert_eq!(dlogits.len(), n, "backward: dlogits must be [n]");
                    let (fw, fb) = (&self.params[lay.fc..lay.fc + c], lay.fc);
                    let (dw, db) = self.grads[fb..fb + c + 1].split_at_mut(c);
                    let dfeat = act::linear_bwd(&feat, n, c, fw, dlogits, dw, db);
                    let mut da = self.buffer(rows * c); // overwritten by the pool
                    pool::gap_bwd(&dfeat, n, blk.h * blk.w, c, &mut da);
                    let mut dbuf = self.buffer(rows * c); // overwritten by the BN backward
                    let (mean, var) = self.used_stats(lay.norm5, train, &blk.mean, &blk.var);
                    self.bn_bwd(
                        lay.norm5,
                        train,
                        (&blk.buf, c),
                        &mean,
                        &var,
                        (&da, c),
                        (&mut dbuf, c),
                        false,
                    );
                    dbufs[nb - 1] = dbuf;
                    self.spare.push(da);
                }
                Node::DenseLayer {
                    b,
                    l,
                    y1,
                    mean2,
                    var2,
                } => {
                    let li = &lay.blocks[b].layers[l];
                    let blk = &tape.blocks[b];
                    let dbuf = &mut dbufs[b];
                    let (ct, c, mid, k, rows) = (
                        lay.blocks[b].c_total,
                        li.norm1.c,
                        li.conv1.co,
                        li.conv2.co,
                        blk.rows(),
                    );
                    let (n, h, w) = (blk.n, blk.h, blk.w);
                    // conv2 (3×3) on relu(norm2(y1)).
                    let (s2, t2) = self.bn_saved(li.norm2, &mean2, &var2);
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
                    let g2 = &mut self.grads[li.conv2.p..li.conv2.p + li.conv2.len()];
                    conv2d_bwd_weight(yi, Some(pre2), Conv::CONV3, &dbuf[c..], ct, k, g2);
                    let da2 = scratch(&mut s_da2, rows * mid); // overwritten below
                    conv2d_bwd_input(
                        &dbuf[c..],
                        ct,
                        k,
                        li.conv2.of(&self.params),
                        Conv::CONV3,
                        (n, h, w, mid),
                        da2,
                    );
                    let dy1 = scratch(&mut s_dy1, rows * mid); // overwritten below
                    let (x2, d2) = ((&y1[..], mid), (&da2[..], mid));
                    self.bn_bwd(li.norm2, train, x2, &mean2, &var2, d2, (dy1, mid), false);
                    // conv1 (1×1) on relu(norm1(prefix)).
                    let (mean1, var1) =
                        self.used_stats(li.norm1, train, &blk.mean[..c], &blk.var[..c]);
                    let (s1, t1) = self.bn_saved(li.norm1, &mean1, &var1);
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
                    let g1 = &mut self.grads[li.conv1.p..li.conv1.p + li.conv1.len()];
                    conv2d_bwd_weight(prefix, Some(pre1), Conv::POINTWISE, dy1, mid, mid, g1);
                    let da1 = scratch(&mut s_da1, rows * c); // overwritten below
                    conv2d_bwd_input(
                        dy1,
                        mid,
                        mid,
                        li.conv1.of(&self.params),
                        Conv::POINTWISE,
                        (n, h, w, c),
                        da1,
                    );
                    let (x1, d1) = ((&blk.buf[..], ct), (&da1[..], c));
                    self.bn_bwd(li.norm1, train, x1, &mean1, &var1, d1, (dbuf, ct), true);
                    self.spare.push(y1);
                }
                Node::Transition { b, pooled } => {
                    let (tn, tc) = lay.blocks[b].transition.expect("transition");
                    let (blk, nxt) = (&tape.blocks[b], &tape.blocks[b + 1]);
                    let (ct, nct, n) = (lay.blocks[b].c_total, lay.blocks[b + 1].c_total, blk.n);
                    let dnext = std::mem::take(&mut dbufs[b + 1]);
                    let pi = Image {
                        data: &pooled,
                        n,
                        h: nxt.h,
                        w: nxt.w,
                        c: ct,
                        rs: ct,
                    };
                    let gt = &mut self.grads[tc.p..tc.p + tc.len()];
                    conv2d_bwd_weight(pi, None, Conv::POINTWISE, &dnext, nct, tc.co, gt);
                    let mut dp = self.buffer(nxt.rows() * ct); // overwritten below
                    conv2d_bwd_input(
                        &dnext,
                        nct,
                        tc.co,
                        tc.of(&self.params),
                        Conv::POINTWISE,
                        (n, nxt.h, nxt.w, ct),
                        &mut dp,
                    );
                    let mut da = self.buffer(blk.rows() * ct); // overwritten by the pool
                    pool::avgpool_bwd(n, blk.h, blk.w, ct, &dp, ct, &mut da);
                    let mut dbuf = self.buffer(blk.rows() * ct); // overwritten by the BN backward
                    let (mean, var) = self.used_stats(tn, train, &blk.mean, &blk.var);
                    self.bn_bwd(
                        tn,
                        train,
                        (&blk.buf, ct),
                        &mean,
                        &var,
                        (&da, ct),
                        (&mut dbuf, ct),
                        false,
                    );
                    dbufs[b] = dbuf;
                    let nxt_buf = std::mem::take(&mut tape.blocks[b + 1].buf);
                    self.spare.extend([pooled, dnext, dp, da, nxt_buf]);
                }
                Node::Stem {
                    x,
                    y0,
                    mean,
                    var,
                    dims: (n, h, w, f0),
                } => {
                    let (h0, w0) = Conv::STEM.out_hw(h, w);
                    let m0 = n * h0 * w0;
                    let (s, t) = self.bn_saved(lay.norm0, &mean, &var);
                    let mut a0 = self.buffer(m0 * f0); // overwritten by the BN
                    bn::apply(&y0, m0, f0, f0, &s, &t, true, &mut a0, f0);
                    let mut da0 = self.buffer(m0 * f0); // overwritten by the pool
                    pool::maxpool_bwd(
                        &a0,
                        n,
                        h0,
                        w0,
                        f0,
                        &dbufs[0],
                        lay.blocks[0].c_total,
                        &mut da0,
                    );
                    let mut dy0 = self.buffer(m0 * f0); // overwritten by the BN backward
                    self.bn_bwd(
                        lay.norm0,
                        train,
                        (&y0, f0),
                        &mean,
                        &var,
                        (&da0, f0),
                        (&mut dy0, f0),
                        false,
                    );
                    let xi = Image {
                        data: &x,
                        n,
                        h,
                        w,
                        c: 3,
                        rs: 3,
                    };
                    let g0 = &mut self.grads[lay.conv0.p..lay.conv0.p + lay.conv0.len()];
                    conv2d_bwd_weight(xi, None, Conv::STEM, &dy0, f0, f0, g0);
                    let (b0, d0) = (
                        std::mem::take(&mut tape.blocks[0].buf),
                        std::mem::take(&mut dbufs[0]),
                    );
                    self.spare.extend([y0, a0, da0, dy0, b0, d0]);
                }
            }
        }
    }

    /// Backward of a BN + ReLU that normalised with `mean`, `var` (batch statistics if `train`,
    /// else running ones): `x` and `dy` are `(buffer, row stride)` views with `idx.c` channels;
    /// accumulates into gamma/beta grads, and into `dx` if `acc` (else overwrites it).
    #[allow(clippy::too_many_arguments)]
    fn bn_bwd(
        &mut self,
        idx: BnIdx,
        train: bool,
        x: (&[T], usize),
        mean: &[T],
        var: &[T],
        dy: (&[T], usize),
        dx: (&mut [T], usize),
        acc: bool,
    ) {
        let c = idx.c;
        let rows = x.0.len().div_ceil(x.1).min(dy.0.len().div_ceil(dy.1));
        let rows = rows.min(dx.0.len().div_ceil(dx.1));
        let (gamma, beta) = self.params[idx.p..idx.p + 2 * c].split_at(c);
        let (dg, db) = self.grads[idx.p..idx.p + 2 * c].split_at_mut(c);
        bn::backward_to(
            x.0, rows, c, x.1, gamma, beta, mean, var, true, train, dy.0, dy.1, dg, db, dx.0, dx.1,
            acc,
        );
    }
}

impl<T: Float> DenseNet<T> {
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
