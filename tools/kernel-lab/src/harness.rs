//! Measured times of the kernels of one DenseNet training step, one per row of the roofline
//! table ([`crate::roofline::table`]; issue 7): each row's work is launched as mura's GPU model
//! (`mura::gpu::model`) launches it, on device buffers of the step's shapes (its [`Schedule`])
//! filled with fresh random values (a dense block's layers read a channel prefix of one
//! block-wide buffer and write a slice of it; the backward goes through the model's two scratch
//! buffers; the tensor-core forwards split over one workspace), once to warm up and then `reps`
//! times inside [`Driver::time`].
//!
//! What a row launches: the model's own functions, so the harness, the launch plan and the
//! model cannot disagree — the convolutions through the GPU model's engine
//! (`mura::gpu::model::Engine`: bf16 tensor-core convolutions from `ops::conv_tc`, f32
//! `ops::conv` and separate passes), the rest through the ops the model calls:
//!
//! | row | launches |
//! |---|---|
//! | `stem7x7s2` fwd, bwd-weight | `Engine::conv_fwd` (bf16: the any-window kernel, statistics summed in its epilogue), `Engine::conv_bwd_weight` |
//! | `conv1x1`, `conv3x3` fwd | `Engine::conv_fwd` with the BN + ReLU in front (bf16: the output's statistics summed in its epilogue, split-K over the workspace, then its finishing kernel, when the grid is small; f32: its statistics pass is the `bn_stats` row's) |
//! | … bwd-weight | `Engine::conv_bwd_weight` with the BN + ReLU |
//! | `conv1x1` bwd-data (a dense layer's BN1) | `Engine::conv_bwd_data` through the BN (its per-channel terms deferred), accumulating into the block's gradient buffer; then `bn::grad_fix` of the layer's k output channels (the deferred BN terms, once per layer) |
//! | `conv3x3` bwd-data (BN2) | `Engine::conv_bwd_data` through the BN into a scratch |
//! | `trans1x1` | the same without a BN in front (the pool applied it), on the pooled block |
//! | `bn_stats` | `bn::batch_stats`; bf16 rows of conv outputs (all but the max pool's): `bn::scale_shift` of the BN that reads them, turning the sums the epilogue accumulated into mean and variance (its pending channels) |
//! | `maxpool` fwd / bwd | `pool::maxpool_fwd` with norm0 + ReLU / `pool::maxpool_bwd` (the same), `bn::backward` (norm0) |
//! | `avgpool` fwd / bwd | `pool::avgpool_fwd` with the transition's BN + ReLU / `pool::avgpool_bwd`, `bn::backward` |
//! | `head` fwd / bwd | `bn::apply` (norm5 + ReLU), `pool::gap_fwd` / `pool::gap_bwd`, `bn::backward` |
//! | `adam` | `adam::update` over every parameter; bf16: then `cast::to_bf16` of them (the bf16 weight copy the tensor-core convolutions read, whose bytes the row counts) |
//!
//! Every row of the table is mapped: [`measure`] finds each row's kernel in the schedule by its
//! op, site and shape (a row of several launches — a block's identical 3×3s — is timed at the
//! first), and refuses rows built for another precision, batch, image size or network before
//! launching anything. Not timed, as the table does not list them: the other BN coefficient
//! kernels, the classifier and the loss, the augmentation, and the `bn::grad_fix` of each
//! block's input channels (before the max pool's or the transition's backward; a layer's own are
//! in its 1×1 row).

use crate::roofline::{KernelRow, Op, Pass, Shape, Site};
use anyhow::{bail, Context, Result};
use half::bf16;
use mura::gpu::model::{self, BnDx, Ctx, DxOut, Engine, NextBn, SplitBufs};
use mura::gpu::ops::bn::{self, Affine, Deferred, Grad, Pending, Running, Saved, Stats};
use mura::gpu::ops::conv_tc::SplitK;
use mura::gpu::ops::{adam, cast, pool, Act, BnRelu, ConvIn};
use mura::gpu::{DeviceBuffer, Driver, Mat, Nhwc, Slice};
use mura::model::schedule::{Head, Hw, Layer, Schedule, Stem, Transition};
use mura::ops::bn::BnOpts;
use mura::ops::conv::Conv;
use mura::ops::{Activation, Mode, Write};
use mura::optim::Adam;
use mura::precision::Precision;
use mura::rng::Rng;
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;

/// How each row is timed: one warm-up, then the mean of `reps` launches, on random inputs drawn
/// from `seed`.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub reps: usize,
    pub seed: u64,
}

impl Timing {
    /// `reps` launches on inputs from a seed taken from the clock: fresh values every run.
    pub fn fresh(reps: usize) -> Timing {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        Timing {
            reps,
            seed: now.unwrap_or_default().as_nanos() as u64,
        }
    }
}

/// Seconds per launch of each row's kernels (module docs), timed on `d`. `rows` come from
/// [`crate::roofline::table`] built for the step whose stages `schedule` has, at `batch` images
/// stored in `precision`: a row built for another precision, batch, image size or network is an
/// error, before anything is allocated or launched.
pub fn measure(
    d: &Arc<dyn Driver>,
    schedule: &Schedule,
    batch: usize,
    precision: Precision,
    rows: &[KernelRow],
    timing: Timing,
) -> Result<Vec<Option<f64>>> {
    if timing.reps == 0 {
        bail!("the number of timed launches per kernel (reps) must be at least 1");
    }
    let timed = rows
        .iter()
        .map(|r| locate(schedule, batch, precision, r).with_context(|| what(r)))
        .collect::<Result<Vec<_>>>()?;
    match precision {
        Precision::F32 => {
            Bench::<f32>::new(d, schedule, batch, timing.seed)?.time(rows, &timed, timing.reps)
        }
        Precision::Bf16 => {
            Bench::<bf16>::new(d, schedule, batch, timing.seed)?.time(rows, &timed, timing.reps)
        }
    }
}

/// A row, for error messages.
fn what(r: &KernelRow) -> String {
    format!("timing {} {} {} {}", r.op, r.pass, r.site, r.shape)
}

/// One row's launches.
type Work = Box<dyn FnMut() -> Result<()>>;

/// Seconds per run of `work`: one warm-up, then the mean of `reps` runs.
fn time(d: &Arc<dyn Driver>, work: &mut Work, reps: usize) -> Result<f64> {
    work()?;
    d.synchronize()?;
    let ms = d.time(&mut || {
        for _ in 0..reps {
            work()?;
        }
        Ok(())
    })?;
    Ok(ms * 1e-3 / reps as f64)
}

/// What a row times, found in the schedule.
#[derive(Clone, Copy, Debug)]
enum Timed<'s> {
    StemConv(&'s Stem),
    /// The statistics of conv0's output.
    StemStats(&'s Stem),
    MaxPool(&'s Stem),
    /// The statistics of the max pool's output (block 0's first channels).
    PoolStats(&'s Stem),
    Conv1(&'s Layer),
    /// The statistics of a layer's bottleneck (the 1×1's output).
    Conv1Stats(&'s Layer),
    Conv2(&'s Layer),
    /// The statistics of a layer's new channels (the 3×3's output).
    Conv2Stats(&'s Layer),
    TransConv(&'s Transition),
    AvgPool(&'s Transition),
    /// The statistics of a transition's output (the next block's first channels).
    TransStats(&'s Transition),
    Head(&'s Head),
    /// Adam over this many parameters.
    Adam(usize),
}

/// Whether the table has rows of `op` in `pass`.
fn has_pass(op: Op, pass: Pass) -> bool {
    use Pass::*;
    match op {
        Op::Stem7x7s2 => matches!(pass, Fwd | BwdWeight),
        Op::Conv1x1 | Op::Conv3x3 | Op::Trans1x1 => matches!(pass, Fwd | BwdWeight | BwdData),
        Op::BnStats => pass == Fwd,
        Op::MaxPool | Op::AvgPool | Op::Head => matches!(pass, Fwd | Bwd),
        Op::Adam => pass == Update,
    }
}

/// The kernel of `s` (at `n` images stored in `p`) that row `r` times: the first at its site with
/// its op and shape.
fn locate<'s>(s: &'s Schedule, n: usize, p: Precision, r: &KernelRow) -> Result<Timed<'s>> {
    if r.precision != p {
        bail!(
            "the rows were built for {} storage, not {p}: build the table with the precision to \
             measure",
            r.precision
        );
    }
    if let Some(b) = r.shape.batch().filter(|&b| b != n) {
        bail!("the row is for a batch of {b}, not {n}: build the table with the batch to measure");
    }
    if !has_pass(r.op, r.pass) {
        bail!("{} has no {} kernel", r.op, r.pass);
    }
    if let (Op::Adam, Site::All, Shape::Params(params)) = (r.op, r.site, r.shape) {
        return Ok(Timed::Adam(params));
    }
    kernels_at(s, n, r.site)?
        .into_iter()
        .find(|&(op, shape, _)| (op, shape) == (r.op, r.shape))
        .map(|(_, _, k)| k)
        .with_context(|| {
            format!(
                "{} of this step has no {} of shape {}: the rows were built for another network \
                 or image size",
                r.site, r.op, r.shape
            )
        })
}

/// Every kernel that runs at `site` of `s` at batch `n`, with its row's op and shape.
fn kernels_at(s: &Schedule, n: usize, site: Site) -> Result<Vec<(Op, Shape, Timed<'_>)>> {
    let conv = |hw_in: Hw, hw_out: Hw, c_in: usize, c_out: usize| Shape::Conv {
        n,
        hw_in,
        hw_out,
        c_in,
        c_out,
    };
    let map = |hw_in: Hw, hw_out: Hw, c: usize| Shape::Map {
        n,
        hw_in,
        hw_out,
        c,
    };
    let missing = || format!("this step has no {site}");
    Ok(match site {
        Site::Stem => {
            let st = &s.stem;
            let (f0, h0, h1) = (st.conv.co, st.conv_out, st.pool_out);
            vec![
                (
                    Op::Stem7x7s2,
                    conv(st.input, h0, st.conv.ci, f0),
                    Timed::StemConv(st),
                ),
                (Op::BnStats, map(h0, h0, f0), Timed::StemStats(st)),
                (Op::MaxPool, map(h0, h1, f0), Timed::MaxPool(st)),
                (Op::BnStats, map(h1, h1, f0), Timed::PoolStats(st)),
            ]
        }
        Site::Block(b) => {
            let block = s.blocks.get(b).with_context(missing)?;
            let mut v = Vec::new();
            for l in &block.layers {
                let (hw, mid, k) = (l.hw, l.conv1.co, l.conv2.co);
                v.extend([
                    (Op::Conv1x1, conv(hw, hw, l.c_in, mid), Timed::Conv1(l)),
                    (Op::BnStats, map(hw, hw, mid), Timed::Conv1Stats(l)),
                    (Op::Conv3x3, conv(hw, hw, mid, k), Timed::Conv2(l)),
                    (Op::BnStats, map(hw, hw, k), Timed::Conv2Stats(l)),
                ]);
            }
            v
        }
        Site::Transition(b) => {
            let block = s.blocks.get(b).with_context(missing)?;
            let t = block.transition.as_ref().with_context(missing)?;
            let (hw, out, c2) = (t.hw_in, t.hw_out, t.conv.co);
            vec![
                (Op::AvgPool, map(hw, out, t.c_in), Timed::AvgPool(t)),
                (
                    Op::Trans1x1,
                    conv(out, out, t.c_in, c2),
                    Timed::TransConv(t),
                ),
                (Op::BnStats, map(out, out, c2), Timed::TransStats(t)),
            ]
        }
        Site::Head => {
            let h = &s.head;
            vec![(Op::Head, map(h.hw, h.hw, h.c), Timed::Head(h))]
        }
        Site::All => Vec::new(),
    })
}

/// How a buffer is filled.
#[derive(Clone, Copy)]
enum Fill {
    Normal {
        mean: f64,
        sd: f64,
    },
    /// Uniform in [0.5, 1.5): variances, Adam's second moments.
    Positive,
    /// Accumulated sums.
    Zero,
}

const ACT: Fill = Fill::Normal { mean: 0.0, sd: 1.0 };

/// `len` values of `fill` as `U`, drawn in parallel chunks from streams of `seed`.
fn random<U: Act>(seed: u64, len: usize, fill: Fill) -> Vec<U> {
    const CHUNK: usize = 1 << 16;
    let mut out = vec![U::from_f64(0.0); len];
    if let Fill::Zero = fill {
        return out;
    }
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(i, chunk)| {
            let mut rng = Rng::derive(seed, i as u64);
            for v in chunk {
                *v = U::from_f64(match fill {
                    Fill::Normal { mean, sd } => mean + sd * rng.normal(),
                    Fill::Positive => 0.5 + rng.uniform(),
                    Fill::Zero => 0.0,
                });
            }
        });
    out
}

/// Random device buffers of one element type, made on first use and shared by every row that
/// names them at the same length (a block's buffer by all its layers), so a large network is
/// filled once.
struct Store<U: Act> {
    seed: u64,
    /// Buffers made so far (each draws from its own stream).
    made: u64,
    bufs: HashMap<(String, usize), DeviceBuffer<U>>,
}

impl<U: Act> Store<U> {
    fn new(seed: u64) -> Self {
        Store {
            seed,
            made: 0,
            bufs: HashMap::new(),
        }
    }

    /// A new buffer of `len` values of `fill`, from the next stream.
    fn random(
        &mut self,
        d: &Arc<dyn Driver>,
        name: &str,
        len: usize,
        fill: Fill,
    ) -> Result<DeviceBuffer<U>> {
        self.made += 1;
        let seed = Rng::derive(self.seed, self.made).next_u64();
        DeviceBuffer::from_slice(d, &random(seed, len.max(1), fill))
            .with_context(|| format!("allocating {name} ({len} values)"))
    }

    /// Buffer `name` of `len` values (filled with `fill` when made).
    fn get(&mut self, d: &Arc<dyn Driver>, name: &str, len: usize, fill: Fill) -> Result<Slice<U>> {
        let key = (name.to_string(), len);
        if !self.bufs.contains_key(&key) {
            let b = self.random(d, name, len, fill)?;
            self.bufs.insert(key.clone(), b);
        }
        self.bufs[&key].slice().range(0, len)
    }
}

/// A BN over `c` channels as its kernels see it: f32 `[c]` vectors and its reduction scratch.
#[derive(Clone, Copy)]
struct BnBufs {
    /// Its (scale, shift): the BN + ReLU the op after it applies.
    coef: BnRelu,
    params: Affine,
    /// The batch statistics it normalised with.
    stats: Stats,
    running: Stats,
    dparams: Affine,
    scratch: bn::Scratch,
}

/// A training BN + ReLU's backward: `dx` from `dy` and the BN's input `x` (`[rows, c]` each).
fn bn_backward<T: Act>(
    d: &dyn Driver,
    bn: &BnBufs,
    x: Mat<T>,
    dy: Mat<T>,
    dx: Grad<T>,
) -> Result<()> {
    let saved = Saved {
        x,
        stats: bn.stats,
        coef: bn.coef,
    };
    bn::backward(
        d,
        saved,
        BnOpts::relu(Mode::Train),
        dy,
        bn.dparams,
        dx,
        bn.scratch,
    )
}

/// A gradient that overwrites `mat`.
fn overwrite<T>(mat: Mat<T>) -> Grad<T> {
    Grad {
        mat,
        write: Write::Overwrite,
    }
}

/// One convolution as the model runs it: what it reads and writes.
#[derive(Clone, Copy)]
struct ConvAt<T> {
    /// `[n, h, w, ci]`, pre-BN when `bn` is given.
    x: Nhwc<T>,
    /// The BN + ReLU in front, applied as `x` is loaded.
    bn: Option<BnBufs>,
    g: Conv,
    /// `[k, k, ci, co]` in the storage type (f32 on the CUDA cores, bf16 on the tensor cores).
    w: Slice<T>,
    /// `[n, ho, wo, co]`, and its gradient.
    y: Nhwc<T>,
    dy: Nhwc<T>,
    dx: Dx<T>,
}

impl<T: Act> ConvAt<T> {
    fn pre(&self) -> Option<BnRelu> {
        self.bn.map(|b| b.coef)
    }

    /// Where its data gradient goes, as the model's backward sends it.
    fn dx_out(&self) -> Result<DxOut<T>> {
        Ok(match self.dx {
            Dx::None => bail!("this convolution has no data gradient"),
            Dx::Plain(dx) => DxOut::Plain(dx),
            Dx::Bn(b) => {
                let bn = self
                    .bn
                    .context("a data gradient through a BN without one")?;
                DxOut::Bn(BnDx {
                    saved: Saved {
                        x: self.x.mat(),
                        stats: bn.stats,
                        coef: bn.coef,
                    },
                    dparams: bn.dparams,
                    dx: Grad {
                        mat: b.dx.mat(),
                        write: b.write,
                    },
                    scratch: b.scratch,
                    deferred: b.deferred,
                })
            }
        })
    }
}

/// Where a convolution's data gradient goes.
#[derive(Clone, Copy)]
enum Dx<T> {
    /// None: the stem's input image needs no gradient.
    None,
    /// Overwrites `[n, h, w, ci]` (a transition's pooled input).
    Plain(Nhwc<T>),
    /// Through the BN + ReLU in front.
    Bn(BnAt<T>),
}

/// The data gradient through a BN + ReLU, as the model's backward sends it
/// (`mura::gpu::model::BnDx`): the gradient of the BN's input into `dx: [n, h, w, ci]`
/// (overwritten or added to) through `scratch` (`[n, h, w, ci]`); with `deferred`, the BN backward's
/// per-channel terms go there instead (`bn::grad_fix` applies them).
#[derive(Clone, Copy)]
struct BnAt<T> {
    dx: Nhwc<T>,
    write: Write,
    scratch: Nhwc<T>,
    deferred: Option<Deferred>,
}

/// A convolution output's statistics: `y: [rows, c]` and where they go; the BN that reads `y`
/// next, over channels whose last `c` are `y`'s; bf16: `sums: [2, c]`, the epilogue's.
#[derive(Clone, Copy)]
struct StatsAt<T> {
    y: Mat<T>,
    out: Stats,
    reader: BnBufs,
    sums: Slice<f32>,
}

/// The device buffers of the step being measured (`n` images of the schedule's input size).
struct Bench<'s, T: Engine> {
    d: Arc<dyn Driver>,
    s: &'s Schedule,
    n: usize,
    acts: Store<T>,
    f32s: Store<f32>,
    /// The model's two backward scratch buffers, each as large as the largest intermediate
    /// gradient.
    scratch: [DeviceBuffer<T>; 2],
    /// bf16: the split-K workspace of the tensor-core forwards and data gradients (zero), as the
    /// model's plan sizes it; None when none splits.
    split: Option<SplitBufs>,
    /// A BN step's count of finished blocks (zero), as the model's.
    done: DeviceBuffer<u32>,
}

impl<'s, T: Engine> Bench<'s, T> {
    fn new(d: &Arc<dyn Driver>, s: &'s Schedule, n: usize, seed: u64) -> Result<Self> {
        let mut acts = Store::new(Rng::derive(seed, 1).next_u64());
        let len = model::scratch_len(s, n);
        let scratch = [
            acts.random(d, "scratch 0", len, ACT)?,
            acts.random(d, "scratch 1", len, ACT)?,
        ];
        let split = match T::TENSOR_CORES {
            true => SplitBufs::zeroed(d, model::split_workspace(s, n, d.sms()))?,
            false => None,
        };
        Ok(Bench {
            d: d.clone(),
            s,
            n,
            acts,
            f32s: Store::new(Rng::derive(seed, 2).next_u64()),
            scratch,
            split,
            done: DeviceBuffer::zeroed(d, 1)?,
        })
    }

    /// Seconds per launch of each row, `timed[i]` being what `rows[i]` times.
    fn time(
        mut self,
        rows: &[KernelRow],
        timed: &[Timed<'s>],
        reps: usize,
    ) -> Result<Vec<Option<f64>>> {
        rows.iter()
            .zip(timed)
            .map(|(r, &k)| {
                let mut work = self.work(k, r.pass).with_context(|| what(r))?;
                Ok(Some(
                    time(&self.d, &mut work, reps).with_context(|| what(r))?,
                ))
            })
            .collect()
    }

    /// The launches of `pass` of `k` (a pass its op has: [`locate`] checked).
    fn work(&mut self, k: Timed<'s>, pass: Pass) -> Result<Work> {
        match k {
            Timed::StemConv(s) => {
                let c = self.stem_at(s)?;
                self.conv(c, pass)
            }
            Timed::Conv1(l) => self.conv1(l, pass),
            Timed::Conv2(l) => {
                let c = self.conv2_at(l)?;
                self.conv(c, pass)
            }
            Timed::TransConv(t) => {
                let c = self.trans_at(t)?;
                self.conv(c, pass)
            }
            Timed::StemStats(s) => {
                let y0 = self.stem_out(s)?.mat();
                self.conv_stats(y0, s.conv.co)
            }
            Timed::Conv1Stats(l) => {
                let y1 = self.bottleneck(l)?.mat();
                self.conv_stats(y1, l.conv1.co)
            }
            Timed::Conv2Stats(l) => {
                let (k, out) = (l.conv2.co, self.block(l.block)?.0);
                // Read next by a BN of the block's channels up to and including these.
                self.conv_stats(out.channels(l.c_in, k)?.mat(), l.c_in + k)
            }
            Timed::TransStats(t) => {
                let (c2, out) = (t.conv.co, self.block(t.block + 1)?.0);
                self.conv_stats(out.channels(0, c2)?.mat(), c2)
            }
            Timed::PoolStats(s) => self.pool_stats(s),
            Timed::MaxPool(s) => self.maxpool(s, pass),
            Timed::AvgPool(t) => self.avgpool(t, pass),
            Timed::Head(h) => self.head(h, pass),
            Timed::Adam(params) => self.adam(params),
        }
    }

    fn act(&mut self, name: &str, len: usize) -> Result<Slice<T>> {
        self.acts.get(&self.d, name, len, ACT)
    }

    fn f32(&mut self, name: &str, len: usize, fill: Fill) -> Result<Slice<f32>> {
        self.f32s.get(&self.d, name, len, fill)
    }

    /// Activation `name`, a contiguous `[n, h, w, c]`.
    fn nhwc(&mut self, name: &str, hw: Hw, c: usize) -> Result<Nhwc<T>> {
        let n = self.n;
        Nhwc::new(self.act(name, hw.rows(n) * c)?, (n, hw.h, hw.w, c), c)
    }

    /// Scratch buffer `i` as a contiguous `[n, h, w, c]` (the model's `plan.scratch`).
    fn scratch(&self, i: usize, hw: Hw, c: usize) -> Result<Nhwc<T>> {
        Nhwc::new(self.scratch[i].slice(), (self.n, hw.h, hw.w, c), c)
    }

    fn split(&self) -> Option<SplitK> {
        self.split.as_ref().map(SplitBufs::view)
    }

    /// Dense block `b`'s activations and their gradient, `[n, h, w, c_total]` each.
    fn block(&mut self, b: usize) -> Result<(Nhwc<T>, Nhwc<T>)> {
        let (hw, ct) = (self.s.blocks[b].hw, self.s.blocks[b].c_total);
        let acts = self.nhwc(&format!("block {b}"), hw, ct)?;
        Ok((acts, self.nhwc(&format!("block {b} gradient"), hw, ct)?))
    }

    /// conv0's output `[n, h0, w0, f0]`.
    fn stem_out(&mut self, s: &Stem) -> Result<Nhwc<T>> {
        self.nhwc("conv0 output", s.conv_out, s.conv.co)
    }

    /// The bottleneck of layer `l` (one per block: its layers' are alike), `[n, h, w, mid]`.
    fn bottleneck(&mut self, l: &Layer) -> Result<Nhwc<T>> {
        self.nhwc(&format!("bottleneck {}", l.block), l.hw, l.conv1.co)
    }

    /// A transition's pooled input, `[n, h/2, w/2, c_total]`.
    fn pooled(&mut self, t: &Transition) -> Result<Nhwc<T>> {
        self.nhwc(&format!("pooled {}", t.block), t.hw_out, t.c_in)
    }

    /// Weights `[k, k, ci, co]` of geometry `g`.
    fn weights(&mut self, g: Conv, ci: usize, co: usize) -> Result<Slice<T>> {
        let fan_in = g.k * g.k * ci;
        let fill = Fill::Normal {
            mean: 0.0,
            sd: (1.0 / fan_in as f64).sqrt(),
        };
        self.acts.get(&self.d, "weights", fan_in * co, fill)
    }

    /// Epilogue sums of `c` channels, `[2, c]` f32.
    fn sums(&mut self, c: usize) -> Result<Slice<f32>> {
        self.f32("sums", 2 * c, Fill::Zero)
    }

    /// The deferred BN-backward terms of block `b`'s channels `[c0, c0 + c)`.
    fn deferred(&mut self, b: usize, c0: usize, c: usize) -> Result<Deferred> {
        let ct = self.s.blocks[b].c_total;
        let all = self.f32(&format!("deferred {b}"), 2 * ct, ACT)?;
        Ok(Deferred {
            alpha: all.range(c0, c)?,
            beta: all.range(ct + c0, c)?,
        })
    }

    /// A BN over `c` channels (shared by every BN of `c` channels).
    /// The BN that reads a forward's output of `c` channels and `rows` rows next (its own
    /// buffers: the forward's last block writes them while the others read the BN in front).
    fn next_bn(&mut self, c: usize, rows: usize) -> Result<NextBn> {
        let normal = |mean, sd| Fill::Normal { mean, sd };
        let mut f = |name: &str, fill| self.f32(name, c, fill);
        Ok(NextBn {
            params: Affine {
                gamma: f("next gamma", normal(1.0, 0.5))?,
                beta: f("next beta", normal(0.0, 0.5))?,
            },
            stats: Stats {
                mean: f("next mean", normal(0.0, 0.1))?,
                var: f("next var", Fill::Positive)?,
            },
            running: bn::Running {
                stats: Stats {
                    mean: f("next running mean", normal(0.0, 0.1))?,
                    var: f("next running var", Fill::Positive)?,
                },
                count: rows,
            },
            out: BnRelu {
                scale: f("next scale", ACT)?,
                shift: f("next shift", ACT)?,
            },
        })
    }

    fn bn(&mut self, c: usize) -> Result<BnBufs> {
        let normal = |mean, sd| Fill::Normal { mean, sd };
        let mut f = |name: &str, fill| self.f32(name, c, fill);
        let coef = BnRelu {
            scale: f("scale", normal(1.0, 0.5))?,
            shift: f("shift", normal(0.0, 0.5))?,
        };
        let params = Affine {
            gamma: f("gamma", normal(1.0, 0.5))?,
            beta: f("beta", normal(0.0, 0.5))?,
        };
        let stats = Stats {
            mean: f("mean", normal(0.0, 0.1))?,
            var: f("var", Fill::Positive)?,
        };
        let running = Stats {
            mean: f("running mean", normal(0.0, 0.1))?,
            var: f("running var", Fill::Positive)?,
        };
        let dparams = Affine {
            gamma: f("dgamma", ACT)?,
            beta: f("dbeta", ACT)?,
        };
        let scratch = bn::Scratch {
            part: self.f32("bn part", bn::scratch_len(c), Fill::Zero)?,
            coef: self.f32("bn coef", 2 * c, ACT)?,
            done: self.done.slice(),
        };
        Ok(BnBufs {
            coef,
            params,
            stats,
            running,
            dparams,
            scratch,
        })
    }

    /// What the engine's launches share: the driver and a reduction scratch for `c` channels
    /// (epilogue sums left zero, as the model keeps them).
    fn ctx_parts(&mut self, c: usize) -> Result<(Slice<f32>, bn::Scratch)> {
        let scratch = bn::Scratch {
            part: self.f32("bn part", bn::scratch_len(c), Fill::Zero)?,
            coef: self.f32("bn coef", 2 * c, ACT)?,
            done: self.done.slice(),
        };
        Ok((self.sums(c)?, scratch))
    }

    /// One pass of a convolution, through the model's engine (`mura::gpu::model::Engine`): the
    /// forward as training runs it (with its output's statistics), the weight gradient, the
    /// data gradient.
    fn conv(&mut self, c: ConvAt<T>, pass: Pass) -> Result<Work> {
        let d = self.d.clone();
        let (sums, bn) = self.ctx_parts(c.x.c().max(c.y.c()))?;
        let (split, done) = (self.split(), self.done.slice());
        fn ctx(d: &Arc<dyn Driver>, (sums, bn, split, done): Parts) -> Ctx<'_> {
            Ctx {
                d: &**d,
                sums,
                bn,
                split,
                done,
            }
        }
        type Parts = (Slice<f32>, bn::Scratch, Option<SplitK>, Slice<u32>);
        let parts: Parts = (sums, bn, split, done);
        Ok(match pass {
            Pass::Fwd => {
                // bf16: the output's statistics summed in the epilogue and the coefficients of
                // the BN that reads it finished by its last block, as training runs it; f32: its
                // separate statistics pass is the `bn_stats` row's.
                let stats = T::TENSOR_CORES.then_some(self.bn(c.y.c())?.stats);
                let next = Some(self.next_bn(c.y.c(), c.y.rows())?);
                let conv = ConvIn {
                    x: c.x,
                    pre: c.pre(),
                    w: c.w,
                    g: c.g,
                };
                Box::new(move || T::conv_fwd(&ctx(&d, parts), conv, c.y, stats, next).map(drop))
            }
            Pass::BwdWeight => {
                let dw = self.f32("dw", c.w.len(), ACT)?;
                Box::new(move || T::conv_bwd_weight(&ctx(&d, parts), c.x, c.pre(), c.g, c.dy, dw))
            }
            Pass::BwdData => {
                let out = c.dx_out()?;
                Box::new(move || T::conv_bwd_data(&ctx(&d, parts), c.dy, c.w, c.g, out))
            }
            _ => bail!("a convolution has no {pass} kernel"),
        })
    }

    /// conv0 on the image `[n, h, w, 3]`; its output gradient in scratch 1.
    fn stem_at(&mut self, s: &Stem) -> Result<ConvAt<T>> {
        let (ci, f0) = (s.conv.ci, s.conv.co);
        Ok(ConvAt {
            x: self.nhwc("image", s.input, ci)?,
            bn: None,
            g: s.conv.g,
            w: self.weights(s.conv.g, ci, f0)?,
            y: self.stem_out(s)?,
            dy: self.scratch(1, s.conv_out, f0)?,
            dx: Dx::None,
        })
    }

    /// A dense layer's 1×1: BN1 + ReLU of the block's channel prefix `[0, c_in)` into the
    /// bottleneck; its output gradient in scratch 1; its data gradient through scratch 0 into
    /// the block's gradient (added), BN1's per-channel terms deferred.
    fn conv1_at(&mut self, l: &Layer) -> Result<ConvAt<T>> {
        let (c, mid) = (l.c_in, l.conv1.co);
        let (acts, grads) = self.block(l.block)?;
        let dx = BnAt {
            dx: grads.channels(0, c)?,
            write: Write::Accumulate,
            scratch: self.scratch(0, l.hw, c)?,
            deferred: Some(self.deferred(l.block, 0, c)?),
        };
        Ok(ConvAt {
            x: acts.channels(0, c)?,
            bn: Some(self.bn(c)?),
            g: l.conv1.g,
            w: self.weights(l.conv1.g, c, mid)?,
            y: self.bottleneck(l)?,
            dy: self.scratch(1, l.hw, mid)?,
            dx: Dx::Bn(dx),
        })
    }

    /// A dense layer's 1×1; its data gradient is followed by the deferred BN terms of the
    /// layer's own k output channels (the model adds them once per layer, before its backward).
    fn conv1(&mut self, l: &Layer, pass: Pass) -> Result<Work> {
        let c = self.conv1_at(l)?;
        let mut work = self.conv(c, pass)?;
        if pass != Pass::BwdData {
            return Ok(work);
        }
        let (c0, k) = (l.c_in, l.conv2.co);
        let (acts, grads) = self.block(l.block)?;
        let (dx, x) = (grads.channels(c0, k)?.mat(), acts.channels(c0, k)?.mat());
        let (def, d) = (self.deferred(l.block, c0, k)?, self.d.clone());
        Ok(Box::new(move || {
            work()?;
            bn::grad_fix(&*d, dx, x, def)
        }))
    }

    /// A dense layer's 3×3: BN2 + ReLU of the bottleneck into the layer's k channels of the
    /// block; its data gradient through scratch 0 into scratch 1.
    fn conv2_at(&mut self, l: &Layer) -> Result<ConvAt<T>> {
        let (mid, k) = (l.conv1.co, l.conv2.co);
        let (acts, grads) = self.block(l.block)?;
        let dx = BnAt {
            dx: self.scratch(1, l.hw, mid)?,
            write: Write::Overwrite,
            scratch: self.scratch(0, l.hw, mid)?,
            deferred: None,
        };
        Ok(ConvAt {
            x: self.bottleneck(l)?,
            bn: Some(self.bn(mid)?),
            g: l.conv2.g,
            w: self.weights(l.conv2.g, mid, k)?,
            y: acts.channels(l.c_in, k)?,
            dy: grads.channels(l.c_in, k)?,
            dx: Dx::Bn(dx),
        })
    }

    /// A transition's 1×1: on the pooled block into the next block's first channels; its data
    /// gradient into scratch 0.
    fn trans_at(&mut self, t: &Transition) -> Result<ConvAt<T>> {
        let (ci, co) = (t.c_in, t.conv.co);
        let (acts, grads) = self.block(t.block + 1)?;
        Ok(ConvAt {
            x: self.pooled(t)?,
            bn: None,
            g: t.conv.g,
            w: self.weights(t.conv.g, ci, co)?,
            y: acts.channels(0, co)?,
            dy: grads.channels(0, co)?,
            dx: Dx::Plain(self.scratch(0, t.hw_out, ci)?),
        })
    }

    /// The statistics of a convolution's output `y: [rows, c]`, read next by a BN over `reader`
    /// channels (its last `c` are `y`'s).
    fn conv_stats(&mut self, y: Mat<T>, reader: usize) -> Result<Work> {
        let (c, bn) = (y.cols(), self.bn(reader)?);
        let st = StatsAt {
            y,
            out: Stats {
                mean: bn.stats.mean.range(reader - c, c)?,
                var: bn.stats.var.range(reader - c, c)?,
            },
            reader: bn,
            sums: self.sums(c)?,
        };
        let d = self.d.clone();
        Ok(Box::new(move || match T::TENSOR_CORES {
            // bf16: summed in the producer's epilogue; the reader's coefficients turn the sums
            // into mean and variance (its pending channels).
            true => {
                let r = &st.reader;
                let running = Running {
                    stats: r.running,
                    count: st.y.rows(),
                };
                let pending = Pending {
                    sums: st.sums,
                    channels: st.y.cols(),
                };
                bn::scale_shift(&*d, r.params, r.stats, Some(running), Some(pending), r.coef)
            }
            false => bn::batch_stats(&*d, st.y, bn::Finish::Stats(st.out), st.reader.scratch),
        }))
    }

    /// The statistics of the max pool's output, block 0's first f0 channels: a pass over them
    /// in either precision.
    fn pool_stats(&mut self, s: &Stem) -> Result<Work> {
        let f0 = s.conv.co;
        let (x, bn) = (self.block(0)?.0.channels(0, f0)?.mat(), self.bn(f0)?);
        let d = self.d.clone();
        Ok(Box::new(move || {
            bn::batch_stats(&*d, x, bn::Finish::Stats(bn.stats), bn.scratch)
        }))
    }

    /// The max pool with norm0 + ReLU applied to conv0's output as it is read, into block 0's
    /// first channels; backward: the pool's into scratch 0, then norm0's into scratch 1.
    fn maxpool(&mut self, s: &Stem, pass: Pass) -> Result<Work> {
        let f0 = s.conv.co;
        let (y0, bn) = (self.stem_out(s)?, self.bn(f0)?);
        let (acts, grads) = self.block(0)?;
        let (out, dout) = (acts.channels(0, f0)?, grads.channels(0, f0)?);
        let d = self.d.clone();
        if pass == Pass::Fwd {
            return Ok(Box::new(move || {
                pool::maxpool_fwd(&*d, y0, Some(bn.coef), out)
            }));
        }
        let (da0, dy0) = (
            self.scratch(0, s.conv_out, f0)?,
            self.scratch(1, s.conv_out, f0)?,
        );
        Ok(Box::new(move || {
            pool::maxpool_bwd(&*d, y0, Some(bn.coef), dout, da0)?;
            bn_backward(&*d, &bn, y0.mat(), da0.mat(), overwrite(dy0.mat()))
        }))
    }

    /// A transition's BN + ReLU + average pool of its block into the pooled buffer; backward:
    /// the pool's from scratch 0 into scratch 1, then the BN's into the block's gradient.
    fn avgpool(&mut self, t: &Transition, pass: Pass) -> Result<Work> {
        let ct = t.c_in;
        let ((acts, grads), bn) = (self.block(t.block)?, self.bn(ct)?);
        let d = self.d.clone();
        if pass == Pass::Fwd {
            let pooled = self.pooled(t)?;
            return Ok(Box::new(move || {
                pool::avgpool_fwd(&*d, acts, Some(bn.coef), pooled)
            }));
        }
        let (dpooled, dacts) = (
            self.scratch(0, t.hw_out, ct)?,
            self.scratch(1, t.hw_in, ct)?,
        );
        Ok(Box::new(move || {
            pool::avgpool_bwd(&*d, dpooled, dacts)?;
            bn_backward(&*d, &bn, acts.mat(), dacts.mat(), overwrite(grads.mat()))
        }))
    }

    /// norm5 + ReLU of the last block into the feature map, then its global average pool into
    /// `[n, c]` f32; backward: the pool's into scratch 0, then norm5's into the block's gradient.
    fn head(&mut self, h: &Head, pass: Pass) -> Result<Work> {
        let (n, c) = (self.n, h.c);
        let ((acts, grads), bn) = (self.block(self.s.blocks.len() - 1)?, self.bn(c)?);
        let d = self.d.clone();
        if pass == Pass::Fwd {
            let features = self.nhwc("features", h.hw, c)?;
            let pooled = Mat::dense(self.f32("pooled features", n * c, ACT)?, n, c)?;
            return Ok(Box::new(move || {
                bn::apply(&*d, acts.mat(), bn.coef, Activation::Relu, features.mat())?;
                pool::gap_fwd(&*d, features, pooled)
            }));
        }
        let dpooled = Mat::dense(self.f32("pooled features' gradient", n * c, ACT)?, n, c)?;
        let dfeatures = self.scratch(0, h.hw, c)?;
        Ok(Box::new(move || {
            pool::gap_bwd(&*d, dpooled, dfeatures)?;
            bn_backward(
                &*d,
                &bn,
                acts.mat(),
                dfeatures.mat(),
                overwrite(grads.mat()),
            )
        }))
    }

    /// Adam's first step over `p` parameters; bf16: then their bf16 copy.
    fn adam(&mut self, p: usize) -> Result<Work> {
        let small = |sd| Fill::Normal { mean: 0.0, sd };
        let params = self.f32("params", p, small(0.05))?;
        let grads = self.f32("grads", p, small(0.01))?;
        let moments = (
            self.f32("adam m", p, small(0.01))?,
            self.f32("adam v", p, Fill::Positive)?,
        );
        let copy = match T::TENSOR_CORES {
            true => Some(DeviceBuffer::<bf16>::alloc(&self.d, p)?),
            false => None,
        };
        let mut opt = Adam::new(0, 1e-4, 0.0);
        opt.step = 1;
        let (step, d) = (opt.current(), self.d.clone());
        Ok(Box::new(move || {
            adam::update(&*d, step, params, grads, moments)?;
            match &copy {
                Some(copy) => cast::to_bf16(&*d, params, copy.slice()),
                None => Ok(()),
            }
        }))
    }
}
