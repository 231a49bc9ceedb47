//! Analytic roofline of one DenseNet training step: every kernel's FLOPs, minimum bytes
//! and floor time `max(FLOPs / peak, bytes / bandwidth)`.
//!
//! A training step is stem → max pool → dense blocks (transitions between them) → BN+ReLU
//! and global average pool → one logit, then its backward and one Adam update. Each
//! convolution is an implicit GEMM in NHWC, `C[M, N] = A[M, K] · B[K, N]`:
//!
//! | pass       | M              | N              | K              |
//! |------------|----------------|----------------|----------------|
//! | forward    | N·Ho·Wo        | C_out          | C_in·kh·kw     |
//! | bwd-data   | N·Hi·Wi        | C_in           | C_out·kh·kw    |
//! | bwd-weight | C_out          | C_in·kh·kw     | N·Ho·Wo        |
//!
//! with FLOPs = 2·M·N·K (the stride-1 convolutions here have equal FLOPs in all three).
//! The stem has no backward-data kernel: the input image needs no gradient. The kernels and
//! their shapes are read off the step's [`Schedule`], stage by stage (stem, each dense layer,
//! each transition, head).
//!
//! Minimum bytes: each kernel reads each operand once and writes each result once, in the
//! fused design (issue 7: BN + ReLU in the convolutions' loads, concatenation by writing into slices). The assumptions, precisely:
//! - Activations, activation gradients and the conv weights the GEMMs read are stored at
//!   the step's precision `p` (2 bytes bf16, 4 bytes f32). Weight gradients, master weights,
//!   Adam moments, BN statistics and BN parameters are f32.
//! - BN+ReLU is applied while a convolution loads its input, so the **pre-BN** activation
//!   is what is read; the normalised tensor is never stored. Per-channel scale/shift and
//!   the statistics vectors (a few KB) are not counted.
//! - Dense blocks concatenate without copies: a layer reads a channel prefix of its
//!   block's buffer and writes its `k` new channels into it.
//! - Backward-data of a conv whose input went through BN+ReLU reads that pre-BN input
//!   (ReLU mask, BN-backward reductions in the epilogue). In a dense layer's 1×1 it
//!   accumulates into the block's shared gradient buffer (read + write); the transition,
//!   which runs first in the block's backward, writes it.
//! - BN backward's per-channel correction (`-γ/σ·(mean(g) + x̂·mean(g·x̂))`, affine in x̂)
//!   is summed per channel over all of the channel's consumers and applied when the
//!   channel's producer loads its output gradient; so a backward kernel whose output `y`
//!   feeds a BN reads `y` (pre-BN) next to `dy`.
//! - BN forward statistics are listed as their own passes (`bn_stats`: read the produced
//!   tensor once); computed in the producer's epilogue they cost no bytes, and
//!   [`Totals::floor_stats_fused_s`] is the floor without them.
//! - Max pool and avg pool are their own kernels (BN+ReLU fused into their loads; mura pools
//!   before the transition's 1×1, as its schedule says);
//!   the head (BN+ReLU+global average pool) is one kernel each way; the classifier, loss
//!   and BN parameter gradients (O(N·C) work) and the augmentation kernel are not counted.
//! - Memory-bound kernels' arithmetic is not counted (it is ≪ bytes × the ridge point).
//! - Adam reads param, grad, m, v and writes param, m, v (f32), plus the low-precision
//!   weight copy when bf16; weight gradients are written, not accumulated, so no zeroing.
//!
//! The floor of the step is the sum of its kernels' floors (they run one after another).

use crate::model::schedule::{
    ConvIdx, Dir, Head, Hw, Layer, Schedule, Stage, Stem, Step, Transition,
};
use crate::model::Layout;
use crate::precision::Precision;
use crate::spec::DenseNetSpec;
use anyhow::{bail, Result};
use std::fmt;

/// The peak rates floors are computed against.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Machine {
    /// FLOP/s of dense matrix math at the step's precision.
    pub peak_flops: f64,
    /// Bytes/s of device memory.
    pub bandwidth: f64,
}

impl Machine {
    /// H100 SXM: 800 TFLOP/s bf16 dense (≈ 790 TFLOP/s measured through PyTorch on the lent card), 67 TFLOP/s f32 without
    /// tensor cores (datasheet), 3.0 TB/s HBM3 (measured).
    pub fn h100(precision: Precision) -> Machine {
        Machine {
            peak_flops: match precision {
                Precision::Bf16 => 800e12,
                Precision::F32 => 67e12,
            },
            bandwidth: 3.0e12,
        }
    }
}

/// Which part of the step a kernel belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Pass {
    Fwd,
    BwdData,
    BwdWeight,
    /// Backward of a memory-bound op.
    Bwd,
    Update,
}

impl fmt::Display for Pass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pass::Fwd => "fwd",
            Pass::BwdData => "bwd-data",
            Pass::BwdWeight => "bwd-weight",
            Pass::Bwd => "bwd",
            Pass::Update => "update",
        })
    }
}

/// What a row's kernels do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    /// conv0, 7×7/2 pad 3.
    Stem7x7s2,
    /// A dense layer's bottleneck convolution.
    Conv1x1,
    /// A dense layer's growth convolution.
    Conv3x3,
    /// A transition's convolution.
    Trans1x1,
    /// A BN's batch statistics over the tensor a kernel produced.
    BnStats,
    /// The stem's max pool (norm0 + ReLU fused into its load).
    MaxPool,
    /// A transition's average pool.
    AvgPool,
    /// BN + ReLU + global average pool.
    Head,
    /// The optimiser's update of every parameter.
    Adam,
}

impl Op {
    /// The name the table shows: `stem7x7s2`, `conv1x1`, `bn_stats`, `maxpool`, …
    pub fn name(self) -> &'static str {
        match self {
            Op::Stem7x7s2 => "stem7x7s2",
            Op::Conv1x1 => "conv1x1",
            Op::Conv3x3 => "conv3x3",
            Op::Trans1x1 => "trans1x1",
            Op::BnStats => "bn_stats",
            Op::MaxPool => "maxpool",
            Op::AvgPool => "avgpool",
            Op::Head => "head",
            Op::Adam => "adam",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where in the network a kernel runs. Blocks and transitions are numbered from 0, as in the
/// [`Schedule`], and shown from 1, as torchvision names them (`Block(1)` is `block2`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Site {
    Stem,
    Block(usize),
    /// The transition after block `b`.
    Transition(usize),
    Head,
    /// Every parameter (the optimiser).
    All,
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Site::Stem => f.write_str("stem"),
            Site::Block(b) => write!(f, "block{}", b + 1),
            Site::Transition(b) => write!(f, "trans{}", b + 1),
            Site::Head => f.write_str("head"),
            Site::All => f.write_str("all"),
        }
    }
}

/// The sizes of a row's tensors; shown without the batch (the table's), e.g. `56x56 128->32`,
/// `112x112->56x56 64`, `7x7 1664`, `14149825 params`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// A convolution, `[n, hw_in, c_in]` → `[n, hw_out, c_out]`.
    Conv {
        n: usize,
        hw_in: Hw,
        hw_out: Hw,
        c_in: usize,
        c_out: usize,
    },
    /// A memory-bound op over `c` channels, `[n, hw_in, c]` → `[n, hw_out, c]`.
    Map {
        n: usize,
        hw_in: Hw,
        hw_out: Hw,
        c: usize,
    },
    /// The optimiser over this many parameters.
    Params(usize),
}

impl Shape {
    /// Images per launch (None for the optimiser).
    pub fn batch(self) -> Option<usize> {
        match self {
            Shape::Conv { n, .. } | Shape::Map { n, .. } => Some(n),
            Shape::Params(_) => None,
        }
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let side = |hw: Hw| format!("{}x{}", hw.h, hw.w);
        let space = |a: Hw, b: Hw| match a == b {
            true => side(a),
            false => format!("{}->{}", side(a), side(b)),
        };
        match *self {
            Shape::Conv {
                hw_in,
                hw_out,
                c_in,
                c_out,
                ..
            } => write!(f, "{} {c_in}->{c_out}", space(hw_in, hw_out)),
            Shape::Map {
                hw_in, hw_out, c, ..
            } => write!(f, "{} {c}", space(hw_in, hw_out)),
            Shape::Params(p) => write!(f, "{p} params"),
        }
    }
}

/// GEMM dimensions of a convolution pass: `C[M, N] = A[M, K] · B[K, N]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gemm {
    pub m: u64,
    pub n: u64,
    pub k: u64,
}

/// One distinct kernel shape of the step and how many times it runs.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelRow {
    pub op: Op,
    pub pass: Pass,
    pub site: Site,
    pub shape: Shape,
    /// The storage precision its bytes count activations at.
    pub precision: Precision,
    /// `None` for memory-bound ops.
    pub gemm: Option<Gemm>,
    /// Launches of this shape per step.
    pub count: u64,
    /// Per launch.
    pub flops: u64,
    /// Per launch (minimum; see the module docs).
    pub bytes: u64,
}

impl KernelRow {
    /// Floor of one launch, seconds.
    pub fn floor_s(&self, m: &Machine) -> f64 {
        (self.flops as f64 / m.peak_flops).max(self.bytes as f64 / m.bandwidth)
    }

    /// `"compute"` or `"memory"`: which term sets the floor.
    pub fn bound(&self, m: &Machine) -> &'static str {
        if self.flops as f64 / m.peak_flops >= self.bytes as f64 / m.bandwidth {
            "compute"
        } else {
            "memory"
        }
    }
}

/// Sums over a whole step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Totals {
    pub flops: u64,
    pub bytes: u64,
    /// Sum of every launch's floor.
    pub floor_s: f64,
    /// The same without the separate `bn_stats` passes (statistics in producer epilogues).
    pub floor_stats_fused_s: f64,
    /// `flops / peak`: the step if it were all at peak compute.
    pub compute_s: f64,
    /// `bytes / bandwidth`.
    pub memory_s: f64,
}

pub fn totals(rows: &[KernelRow], m: &Machine) -> Totals {
    let flops: u64 = rows.iter().map(|r| r.count * r.flops).sum();
    let bytes: u64 = rows.iter().map(|r| r.count * r.bytes).sum();
    let floor = |keep: &dyn Fn(&KernelRow) -> bool| -> f64 {
        rows.iter()
            .filter(|r| keep(r))
            .map(|r| r.count as f64 * r.floor_s(m))
            .sum()
    };
    Totals {
        flops,
        bytes,
        floor_s: floor(&|_| true),
        floor_stats_fused_s: floor(&|r| r.op != Op::BnStats),
        compute_s: flops as f64 / m.peak_flops,
        memory_s: bytes as f64 / m.bandwidth,
    }
}

/// Collects rows, merging launches of identical shape.
#[derive(Default)]
struct Rows {
    rows: Vec<KernelRow>,
}

impl Rows {
    fn push(&mut self, row: KernelRow) {
        let same = |r: &&mut KernelRow| {
            (r.op, r.pass, r.site, r.shape) == (row.op, row.pass, row.site, row.shape)
        };
        match self.rows.iter_mut().find(same) {
            Some(r) => r.count += row.count,
            None => self.rows.push(row),
        }
    }
}

/// How a conv's backward-data kernel writes its input gradient.
#[derive(Clone, Copy, PartialEq)]
enum Dx {
    /// No backward-data kernel (the stem: the image needs no gradient).
    None,
    Write,
    /// Add into the dense block's shared gradient buffer (read + write).
    Accumulate,
}

/// One convolution of the schedule: weights `[k, k, ci, co]`, input `[n, hw_in, ci]`, output
/// `[n, hw_out, co]`.
struct ConvSite {
    op: Op,
    site: Site,
    conv: ConvIdx,
    hw_in: Hw,
    hw_out: Hw,
    dx: Dx,
    /// The output feeds a BN whose backward correction is applied when `dy` is loaded,
    /// so backward kernels also read the output `y`.
    y_feeds_bn: bool,
}

/// One launch of the step's minimal design: a [`KernelRow`] of count 1 and the stage it runs in.
#[derive(Clone, Debug, PartialEq)]
pub struct Work {
    pub stage: Stage,
    pub row: KernelRow,
}

/// The step's kernels: forward launches in order, and backward groups (one per forward op,
/// in that op's backward order) in forward order, replayed reversed.
struct Walk {
    fwd: Vec<Work>,
    bwd: Vec<Vec<Work>>,
    n: usize,
    precision: Precision,
    /// The forward stage being walked.
    at: Stage,
}

impl Walk {
    /// Bytes of an activation `[n, hw, c]` at the step's precision.
    fn act(&self, hw: Hw, c: usize) -> u64 {
        (hw.rows(self.n) * c * self.precision.bytes()) as u64
    }

    /// A memory-bound op's shape.
    fn map(&self, hw_in: Hw, hw_out: Hw, c: usize) -> Shape {
        Shape::Map {
            n: self.n,
            hw_in,
            hw_out,
            c,
        }
    }

    /// A row launched once, of `flops` (from `gemm`) and `bytes`, at the stage being walked
    /// (in the backward's direction unless `pass` is the forward).
    fn row(
        &self,
        op: Op,
        pass: Pass,
        site: Site,
        shape: Shape,
        gemm: Option<Gemm>,
        bytes: u64,
    ) -> Work {
        let row = KernelRow {
            op,
            pass,
            site,
            shape,
            precision: self.precision,
            gemm,
            count: 1,
            flops: gemm.map_or(0, |g| 2 * g.m * g.n * g.k),
            bytes,
        };
        let stage = match pass {
            Pass::Fwd => self.at,
            _ => backward_of(self.at),
        };
        Work { stage, row }
    }

    /// A convolution: its forward row, and its backward group (the weight gradient, then the
    /// data gradient unless `c.dx` is `None`), GEMMs as in the module docs.
    fn conv(&mut self, c: ConvSite) {
        let (pi, po) = (c.hw_in.rows(self.n) as u64, c.hw_out.rows(self.n) as u64);
        let (cin, cout) = (c.conv.ci as u64, c.conv.co as u64);
        let kk = (c.conv.g.k * c.conv.g.k) as u64;
        let x = self.act(c.hw_in, c.conv.ci); // [n, hi, wi, cin], pre-BN
        let y = self.act(c.hw_out, c.conv.co); // [n, ho, wo, cout], pre-BN
        let w = cout * cin * kk * self.precision.bytes() as u64; // [cout, kh, kw, cin]
        let dw = cout * cin * kk * 4; // the same, f32
        let shape = Shape::Conv {
            n: self.n,
            hw_in: c.hw_in,
            hw_out: c.hw_out,
            c_in: c.conv.ci,
            c_out: c.conv.co,
        };
        let row = |pass, m, n, k, bytes| {
            self.row(c.op, pass, c.site, shape, Some(Gemm { m, n, k }), bytes)
        };
        let dy_read = if c.y_feeds_bn { 2 * y } else { y };
        let fwd = row(Pass::Fwd, po, cout, cin * kk, x + w + y);
        let mut bwd = vec![row(Pass::BwdWeight, cout, cin * kk, po, x + dy_read + dw)];
        let dx = match c.dx {
            Dx::None => 0,
            Dx::Write => x,
            Dx::Accumulate => 2 * x,
        };
        if c.dx != Dx::None {
            // The ReLU mask and the BN reductions need the pre-BN input: + x.
            bwd.push(row(Pass::BwdData, pi, cin, cout * kk, dy_read + w + x + dx));
        }
        self.fwd.push(fwd);
        self.bwd.push(bwd);
    }

    /// A memory-bound op: forward bytes and backward bytes (`None`: no backward kernel).
    fn mem(&mut self, op: Op, site: Site, shape: Shape, fwd: u64, bwd: Option<u64>) {
        self.fwd
            .push(self.row(op, Pass::Fwd, site, shape, None, fwd));
        if let Some(b) = bwd {
            self.bwd
                .push(vec![self.row(op, Pass::Bwd, site, shape, None, b)]);
        }
    }

    /// A BN statistics pass over `[n, hw, c]` (sum and sum of squares per channel).
    fn bn_stats(&mut self, site: Site, hw: Hw, c: usize) {
        let bytes = self.act(hw, c) + 2 * c as u64 * 4;
        self.mem(Op::BnStats, site, self.map(hw, hw, c), bytes, None);
    }

    /// Stem: conv 7x7/2 (image -> x0), BN0 statistics, BN0+ReLU+max pool into block 1.
    fn stem(&mut self, s: &Stem) {
        let (site, f0) = (Site::Stem, s.conv.co);
        self.conv(ConvSite {
            op: Op::Stem7x7s2,
            site,
            conv: s.conv,
            hw_in: s.input,
            hw_out: s.conv_out,
            dx: Dx::None,
            y_feeds_bn: true,
        });
        self.bn_stats(site, s.conv_out, f0);
        let (x0, pooled) = (self.act(s.conv_out, f0), self.act(s.pool_out, f0));
        // Backward: dy and the pooled output (BN correction), x0 (argmax, mask) -> dx0.
        let shape = self.map(s.conv_out, s.pool_out, f0);
        self.mem(
            Op::MaxPool,
            site,
            shape,
            x0 + pooled,
            Some(2 * pooled + 2 * x0),
        );
        self.bn_stats(site, s.pool_out, f0);
    }

    /// A dense layer: BN1+ReLU+1x1 (accumulating its data gradient into the block's), BN2
    /// statistics, BN2+ReLU+3x3 into the block's next channels, their statistics.
    fn layer(&mut self, l: &Layer) {
        let site = Site::Block(l.block);
        let conv = |op, conv, dx| ConvSite {
            op,
            site,
            conv,
            hw_in: l.hw,
            hw_out: l.hw,
            dx,
            y_feeds_bn: true,
        };
        self.conv(conv(Op::Conv1x1, l.conv1, Dx::Accumulate));
        self.bn_stats(site, l.hw, l.conv1.co);
        self.conv(conv(Op::Conv3x3, l.conv2, Dx::Write));
        self.bn_stats(site, l.hw, l.conv2.co);
    }

    /// A transition as mura runs it (the schedule's order): BN + ReLU + 2×2 average pool over
    /// the block's channels, then the 1×1 at the pooled size into the next block's first
    /// channels (exact for a linear map, and a quarter of torchvision's conv-then-pool work),
    /// then their statistics.
    fn transition(&mut self, t: &Transition) {
        let (site, ct, c2) = (Site::Transition(t.block), t.c_in, t.conv.co);
        let (full, pooled) = (self.act(t.hw_in, ct), self.act(t.hw_out, ct));
        // Forward: the block read (pre-BN), the pooled block written. Backward: the pooled
        // block's gradient and the block (ReLU mask, BN reductions) read, the block's gradient
        // written (the transition's backward is the first to write it).
        let shape = self.map(t.hw_in, t.hw_out, ct);
        self.mem(
            Op::AvgPool,
            site,
            shape,
            full + pooled,
            Some(pooled + 2 * full),
        );
        self.conv(ConvSite {
            op: Op::Trans1x1,
            site,
            conv: t.conv,
            hw_in: t.hw_out,
            hw_out: t.hw_out,
            dx: Dx::Write,
            // Its output is the next block's first channels, which BNs read.
            y_feeds_bn: true,
        });
        self.bn_stats(site, t.hw_out, c2);
    }

    /// Head: BN5 + ReLU + global average pool -> features [n, c] f32.
    fn head(&mut self, h: &Head) {
        let x = self.act(h.hw, h.c);
        let features = (self.n * h.c * 4) as u64;
        let shape = self.map(h.hw, h.hw, h.c);
        self.mem(
            Op::Head,
            Site::Head,
            shape,
            x + features,
            Some(2 * x + features),
        );
    }

    /// The forward launches, the backward groups reversed, then Adam over `params` parameters.
    fn finish(mut self, params: usize) -> Vec<Work> {
        let p = self.precision.bytes() as u64;
        let copy = if self.precision == Precision::F32 {
            0
        } else {
            p
        };
        self.at = Stage::Adam;
        let mut adam = self.row(
            Op::Adam,
            Pass::Update,
            Site::All,
            Shape::Params(params),
            None,
            params as u64 * (7 * 4 + copy),
        );
        adam.stage = Stage::Adam;
        let mut works = self.fwd;
        works.extend(self.bwd.into_iter().rev().flatten());
        works.push(adam);
        works
    }
}

/// The backward direction of a forward stage.
fn backward_of(stage: Stage) -> Stage {
    match stage {
        Stage::Stem(_) => Stage::Stem(Dir::Bwd),
        Stage::Layer { block, index, .. } => Stage::Layer {
            block,
            index,
            dir: Dir::Bwd,
        },
        Stage::Transition { block, .. } => Stage::Transition {
            block,
            dir: Dir::Bwd,
        },
        Stage::Head(_) => Stage::Head(Dir::Bwd),
        other => other,
    }
}

/// Every launch of one training step of `spec` at batch `n`, square images of side `s`,
/// storing activations in `precision`, in execution order (forward, then backward, then the
/// optimiser), each with its stage. The launches follow the step's [`Schedule`].
pub fn works(spec: &DenseNetSpec, n: usize, s: usize, precision: Precision) -> Result<Vec<Work>> {
    if n == 0 {
        bail!("batch size must be positive");
    }
    let layout = Layout::new(spec);
    let schedule = Schedule::new(&layout, &spec.arch, s, s)?;
    let mut walk = Walk {
        fwd: Vec::new(),
        bwd: Vec::new(),
        n,
        precision,
        at: Stage::Stem(Dir::Fwd),
    };
    for step in schedule.forward() {
        walk.at = Stage::of(step, Dir::Fwd);
        match step {
            Step::Stem(s) => walk.stem(s),
            Step::Layer(l) => walk.layer(l),
            Step::Transition(t) => walk.transition(t),
            Step::Head(h) => walk.head(h),
        }
    }
    Ok(walk.finish(layout.n_params))
}

/// Every kernel of one training step of `spec` at batch `n`, square images of side `s`,
/// storing activations in `precision`; identical shapes grouped, in execution order
/// (forward, then backward, then the optimiser). The rows follow the step's [`Schedule`].
pub fn table(
    spec: &DenseNetSpec,
    n: usize,
    s: usize,
    precision: Precision,
) -> Result<Vec<KernelRow>> {
    let mut rows = Rows::default();
    for w in works(spec, n, s, precision)? {
        rows.push(w.row);
    }
    Ok(rows.rows)
}
