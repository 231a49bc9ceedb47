//! The activation buffers of one batch shape: a plan is allocated for the largest batch seen at
//! an input size and reused by every batch of that size that fits (studies have varying view
//! counts), so steady-state steps allocate nothing. As on the CPU, a dense block owns one buffer
//! with room for all its channels (layers read a prefix and write a slice) and one gradient buffer
//! that layers accumulate into; per-channel batch statistics are computed once, when a channel is
//! written.

use super::{Engine, GpuDenseNet};
use crate::gpu::ops::bn::{Deferred, Stats};
use crate::gpu::ops::conv_tc::{self, SplitK};
use crate::gpu::{DeviceBuffer, Driver, Error, Mat, Nhwc, Slice};
use crate::model::schedule::{ConvIdx, Hw, Schedule};
use anyhow::Result;
use std::sync::Arc;

/// One dense block's buffers for a batch shape (`cap` images of `hw`).
pub(super) struct BlockBufs<T: Engine> {
    pub hw: Hw,
    pub c_total: usize,
    /// `[rows, c_total]`: every layer's output channels, side by side.
    pub acts: DeviceBuffer<T>,
    /// `[rows, c_total]`: d(loss)/d(acts).
    pub grads: DeviceBuffer<T>,
    /// `[2, c_total]` f32: batch mean, then biased variance, of each channel (training).
    pub stats: DeviceBuffer<f32>,
    /// `[2, c_total]` f32 (backward): per channel, the deferred BN-backward terms (alpha, beta)
    /// of the layers that read it, applied once its gradient is complete.
    pub deferred: DeviceBuffer<f32>,
    /// Per layer: `[rows, bn_size · growth]` bottleneck output (before norm2) and its
    /// `[2, bn_size · growth]` f32 batch statistics.
    pub bottleneck: Vec<DeviceBuffer<T>>,
    pub bottleneck_stats: Vec<DeviceBuffer<f32>>,
    /// `[rows / 4, c_total]`: the transition's pooled input (blocks with a transition).
    pub pooled: Option<DeviceBuffer<T>>,
}

impl<T: Engine> BlockBufs<T> {
    /// The block's activations for `n` images: `[n, h, w, c_total]`.
    pub fn acts(&self, n: usize) -> Result<Nhwc<T>> {
        self.nhwc(&self.acts, n)
    }
    /// Their gradient.
    pub fn grads(&self, n: usize) -> Result<Nhwc<T>> {
        self.nhwc(&self.grads, n)
    }
    fn nhwc(&self, buf: &DeviceBuffer<T>, n: usize) -> Result<Nhwc<T>> {
        let ct = self.c_total;
        Nhwc::new(buf.slice(), (n, self.hw.h, self.hw.w, ct), ct)
    }
    /// The batch statistics of channels `[c0, c0 + c)`.
    pub fn stats(&self, c0: usize, c: usize) -> Result<Stats> {
        stats_of(self.stats.slice(), self.c_total, c0, c)
    }
    /// The deferred BN-backward terms of channels `[c0, c0 + c)`.
    pub fn deferred(&self, c0: usize, c: usize) -> Result<Deferred> {
        let d = self.deferred.slice();
        Ok(Deferred {
            alpha: d.range(c0, c)?,
            beta: d.range(self.c_total + c0, c)?,
        })
    }
}

/// Channels `[c0, c0 + c)` of a `[2, c_total]` statistics buffer (means, then variances).
pub(super) fn stats_of(buf: Slice<f32>, c_total: usize, c0: usize, c: usize) -> Result<Stats> {
    Ok(Stats {
        mean: buf.range(c0, c)?,
        var: buf.range(c_total + c0, c)?,
    })
}

/// Every activation buffer for batches of up to `cap` images of one input size; the current
/// batch has `n` images and uses the first `n` images' worth of each buffer.
pub(super) struct Plan<T: Engine> {
    pub cap: usize,
    pub n: usize,
    pub schedule: Schedule,
    /// `[n, h, w, 3]`: the input the model reads (a raw batch is augmented straight into it);
    /// bf16: with an f32 staging buffer that host inputs are uploaded to, then cast.
    pub input: DeviceBuffer<T>,
    pub input_f32: Option<DeviceBuffer<f32>>,
    /// `[n, h0, w0, f0]`: conv0's output (norm0 + ReLU are applied as the max pool reads it),
    /// and its `[2, f0]` f32 batch statistics.
    pub stem_out: DeviceBuffer<T>,
    pub stem_stats: DeviceBuffer<f32>,
    pub blocks: Vec<BlockBufs<T>>,
    /// `[rows, c]` after norm5 + ReLU (the final feature map); `[n, c]` f32 pooled features and
    /// their gradient.
    pub features: DeviceBuffer<T>,
    pub pooled: DeviceBuffer<f32>,
    pub pooled_grad: DeviceBuffer<f32>,
    /// `[n]` f32.
    pub logits: DeviceBuffer<f32>,
    pub logits_grad: DeviceBuffer<f32>,
    /// Two backward scratch buffers, each as large as the largest intermediate gradient.
    pub scratch: [DeviceBuffer<T>; 2],
    /// bf16: the split-K workspace of the forwards and data gradients ([`split_workspace`]),
    /// zero; None when none splits.
    pub split: Option<SplitBufs>,
}

impl<T: Engine> Plan<T> {
    /// The model's input for the current batch.
    pub fn input(&self) -> Result<Nhwc<T>> {
        let Hw { h, w } = self.schedule.input;
        Nhwc::new(self.input.slice(), (self.n, h, w, 3), 3)
    }
    /// conv0's output for the current batch.
    pub fn stem_out(&self) -> Result<Nhwc<T>> {
        let (hw, f0) = (self.schedule.stem.conv_out, self.schedule.stem.conv.co);
        Nhwc::new(self.stem_out.slice(), (self.n, hw.h, hw.w, f0), f0)
    }
    /// Scratch buffer `i` as a contiguous `[n, h, w, c]`.
    pub fn scratch(&self, i: usize, hw: Hw, c: usize) -> Result<Nhwc<T>> {
        Nhwc::new(self.scratch[i].slice(), (self.n, hw.h, hw.w, c), c)
    }
    /// The pooled features as `[n, c]`.
    pub fn pooled(&self) -> Result<Mat<f32>> {
        Mat::dense(self.pooled.slice(), self.n, self.schedule.head.c)
    }
    /// The gradient of the pooled features as `[n, c]`.
    pub fn pooled_grad(&self) -> Result<Mat<f32>> {
        Mat::dense(self.pooled_grad.slice(), self.n, self.schedule.head.c)
    }
    /// The split-K workspace.
    pub fn split(&self) -> Option<SplitK> {
        self.split.as_ref().map(SplitBufs::view)
    }
}

/// A split-K workspace's buffers: f32 partial sums and per-tile arrival counts.
pub struct SplitBufs {
    pub ws: DeviceBuffer<f32>,
    pub tiles: DeviceBuffer<u32>,
}

impl SplitBufs {
    /// Zeroed buffers of `(ws, tiles)` elements; None when nothing splits.
    pub fn zeroed(d: &Arc<dyn Driver>, (ws, tiles): (usize, usize)) -> Result<Option<Self>> {
        if ws == 0 {
            return Ok(None);
        }
        Ok(Some(SplitBufs {
            ws: DeviceBuffer::zeroed(d, ws)?,
            tiles: DeviceBuffer::zeroed(d, tiles.max(1))?,
        }))
    }
    pub fn view(&self) -> SplitK {
        SplitK {
            ws: self.ws.slice(),
            tiles: self.tiles.slice(),
        }
    }
    /// Zeroes both again.
    pub fn clear(&self) -> Result<()> {
        self.ws.fill_bytes(0)?;
        self.tiles.fill_bytes(0)
    }
}

/// Device buffers of the raw-input path (`forward_raw`).
pub(super) struct RawIn {
    /// `[≥ n, src_size, src_size]` u8: the store images as uploaded.
    pub src: DeviceBuffer<u8>,
    /// `[≥ n, 4]` f32: each image's source steps (the augment kernel's scratch).
    pub steps: DeviceBuffer<f32>,
}

impl<T: Engine> GpuDenseNet<T> {
    /// Makes the plan ready for a batch of `n` images of `h`×`w`: the current one when it has
    /// room (batches of fewer views reuse the buffers), else a new one for `n`. When the device
    /// runs out of memory for it, the error names the largest batch that would fit (found by
    /// bisection, each probe allocated and freed); any other failure (a driver fault, say) is
    /// returned as it is, without probing.
    pub(super) fn ensure_plan(&mut self, n: usize, h: usize, w: usize) -> Result<()> {
        let fits = |p: &Plan<T>| p.schedule.input == Hw { h, w } && p.cap >= n;
        if let Some(p) = self.plan.as_mut().filter(|p| fits(p)) {
            p.n = n;
            return Ok(());
        }
        self.graphs.clear(); // they launch on the old plan's buffers
        self.plan = None; // free the old shape's buffers first
        self.recorded = false;
        let schedule = Schedule::new(&self.layout, &self.spec.arch, h, w)?;
        let e = match build(&self.d, schedule.clone(), n) {
            Ok(p) => {
                self.plan = Some(p);
                return Ok(());
            }
            Err(e) if Error::is_out_of_memory(&e) => e,
            Err(e) => {
                return Err(e.context(format!(
                    "allocating the buffers of a batch of {n} images at {h}x{w}"
                )))
            }
        };
        // Binary search: `lo` images fit, `hi` do not.
        let (mut lo, mut hi) = (0, n);
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            match build::<T>(&self.d, schedule.clone(), mid) {
                Ok(_) => lo = mid,
                Err(e) if Error::is_out_of_memory(&e) => hi = mid,
                Err(e) => {
                    return Err(e.context(format!(
                        "allocating the buffers of a batch of {mid} images at {h}x{w} (to find \
                         the largest that fits)"
                    )))
                }
            }
        }
        let fits = match lo {
            0 => "not even one image fits".to_string(),
            _ => format!("the largest batch that fits is {lo}"),
        };
        Err(e.context(format!(
            "a batch of {n} images at {h}x{w} does not fit in the memory of {}: {fits} (use a \
             smaller batch or input size)",
            self.d.name()
        )))
    }
}

/// The activation buffers of batches of up to `cap` images of the schedule's input size.
fn build<T: Engine>(d: &Arc<dyn Driver>, schedule: Schedule, cap: usize) -> Result<Plan<T>> {
    let stem = schedule.stem;
    let (f0, stem_rows) = (stem.conv.co, stem.conv_out.rows(cap));
    let mut blocks = Vec::new();
    for b in &schedule.blocks {
        let (rows, ct) = (b.hw.rows(cap), b.c_total);
        let f32s = |len| DeviceBuffer::<f32>::alloc(d, len);
        let acts = |len| DeviceBuffer::<T>::alloc(d, len);
        blocks.push(BlockBufs {
            hw: b.hw,
            c_total: ct,
            acts: acts(rows * ct)?,
            grads: acts(rows * ct)?,
            stats: f32s(2 * ct)?,
            deferred: f32s(2 * ct)?,
            bottleneck: b
                .layers
                .iter()
                .map(|l| acts(rows * l.conv1.co))
                .collect::<Result<_>>()?,
            bottleneck_stats: b
                .layers
                .iter()
                .map(|l| f32s(2 * l.conv1.co))
                .collect::<Result<_>>()?,
            pooled: match &b.transition {
                Some(t) => Some(acts(t.hw_out.rows(cap) * ct)?),
                None => None,
            },
        });
    }
    let head = schedule.head;
    let (input_len, head_rows) = (schedule.input.rows(cap) * 3, head.hw.rows(cap));
    let split = match T::TENSOR_CORES {
        true => split_workspace(&schedule, cap, d.sms()),
        false => (0, 0),
    };
    Ok(Plan {
        cap,
        n: cap,
        input: DeviceBuffer::alloc(d, input_len)?,
        input_f32: match T::TENSOR_CORES {
            true => Some(DeviceBuffer::alloc(d, input_len)?),
            false => None,
        },
        stem_out: DeviceBuffer::alloc(d, stem_rows * f0)?,
        stem_stats: DeviceBuffer::alloc(d, 2 * f0)?,
        blocks,
        features: DeviceBuffer::alloc(d, head_rows * head.c)?,
        pooled: DeviceBuffer::alloc(d, cap * head.c)?,
        pooled_grad: DeviceBuffer::alloc(d, cap * head.c)?,
        logits: DeviceBuffer::alloc(d, cap)?,
        logits_grad: DeviceBuffer::alloc(d, cap)?,
        scratch: [
            DeviceBuffer::alloc(d, scratch_len(&schedule, cap))?,
            DeviceBuffer::alloc(d, scratch_len(&schedule, cap))?,
        ],
        split: SplitBufs::zeroed(d, split)?,
        schedule,
    })
}

/// Elements of each of a plan's two backward scratch buffers for up to `cap` images: the largest
/// intermediate gradient, of conv0's output, a block's `[rows, c_total]` or a bottleneck's.
pub fn scratch_len(schedule: &Schedule, cap: usize) -> usize {
    let stem = schedule.stem;
    let mut len = stem.conv_out.rows(cap) * stem.conv.co;
    for b in &schedule.blocks {
        len = len.max(b.hw.rows(cap) * b.c_total);
        for l in &b.layers {
            len = len.max(l.hw.rows(cap) * l.conv1.co);
        }
    }
    len
}

/// The split-K workspace of a plan for up to `cap` images on a device of `sms` SMs: f32 elements
/// for the largest `[rows, n]` output of a dense-layer or transition forward or data gradient whose
/// reduction splits ([`conv_tc::fwd_split_len`], [`conv_tc::data_split_len`]), and counts for its
/// most output tiles, at any batch of `1..=cap` images (a plan serves every smaller batch, and a
/// smaller grid splits sooner); (0, 0) when none splits.
pub fn split_workspace(schedule: &Schedule, cap: usize, sms: usize) -> (usize, usize) {
    let (mut ws, mut tiles) = (0, 0);
    // A launch of `tiles` output tiles over `[rows, n]` that splits a reduction of `k_len` into
    // chunks of `len`.
    let mut need = |rows: usize, n: usize, tiles_of: usize, k_len: usize, len: usize| {
        if len < k_len {
            ws = usize::max(ws, rows * n);
            tiles = usize::max(tiles, tiles_of);
        }
    };
    for (n, b) in (1..=cap).flat_map(|n| schedule.blocks.iter().map(move |b| (n, b))) {
        let mut conv = |rows: usize, c: usize, cv: ConvIdx| {
            let (kk, co, g) = (cv.g.k * cv.g.k, cv.co, cv.g);
            let fwd = conv_tc::fwd_split_len(rows, c, co, g, sms);
            need(rows, co, conv_tc::fwd_tiles(rows, co, g), kk * c, fwd);
            let data = conv_tc::data_split_len(rows, c, co, g, sms);
            need(rows, c, conv_tc::data_tiles(rows, c), kk * co, data);
        };
        for l in &b.layers {
            conv(l.hw.rows(n), l.c_in, l.conv1);
            conv(l.hw.rows(n), l.conv1.co, l.conv2);
        }
        if let Some(t) = &b.transition {
            conv(t.hw_out.rows(n), t.c_in, t.conv);
        }
    }
    (ws, tiles)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::DenseNetSpec;

    /// A plan serves every smaller batch, whose smaller grids split sooner: DenseNet-169's
    /// transition 3 (1280 → 640 channels at 7×7) does not split at 256 images (490 tiles fill
    /// 132 SMs twice over) but does at 125 (240 tiles), needing 125·49·640 = 3,920,000 floats.
    #[test]
    fn split_workspace_covers_every_batch_a_plan_serves() {
        let spec = DenseNetSpec::preset("densenet169").unwrap();
        let lay = crate::model::Layout::new(&spec);
        let schedule = Schedule::new(&lay, "densenet169", 224, 224).unwrap();
        let g = crate::ops::conv::Conv::POINTWISE;
        assert_eq!(conv_tc::fwd_split_len(256 * 49, 1280, 640, g, 132), 1280);
        assert!(conv_tc::fwd_split_len(125 * 49, 1280, 640, g, 132) < 1280);
        let (ws, tiles) = split_workspace(&schedule, 256, 132);
        assert!(ws >= 125 * 49 * 640, "{ws}");
        // Never more than the largest output a tensor-core kernel writes at 256 images.
        assert!(ws <= 256 * 56 * 56 * 256, "{ws}");
        assert!(
            (1..528).contains(&tiles),
            "{tiles}: a split grid has fewer tiles than a wave"
        );
        // More SMs split larger grids.
        assert!(split_workspace(&schedule, 8, 1000).0 > split_workspace(&schedule, 8, 132).0);
        let one = split_workspace(&schedule, 256, 1);
        assert!(
            one.0 < ws && one.1 <= 4,
            "one SM: only grids of under a wave split: {one:?}"
        );
    }
}
