//! Measured times of the kernels of one DenseNet training step, one per row of the roofline
//! table ([`crate::roofline::table`]; issue 7): each row's work is launched as mura's GPU model
//! launches it, on device buffers of the row's shape filled with fresh random values (a dense
//! block's layers read a channel prefix of one block-wide buffer and write a slice of it, as in
//! the model), once to warm up and then `reps` times inside [`Driver::time`].
//!
//! What a row launches (bf16: tensor-core convolutions from [`ops_tc`]; f32: [`ops`] throughout):
//!
//! | row | launches |
//! |---|---|
//! | `stem7x7s2` fwd, bwd-weight | bf16: `ops_tc::conv_fwd` (the any-window kernel, statistics summed in its epilogue), `ops_tc::conv_bwd_weight`; f32: `ops::conv_fwd`, `ops::conv_bwd_weight` |
//! | `conv1x1`, `conv3x3` fwd | bf16: `ops_tc::conv_fwd` with the BN + ReLU in front and the output's statistics summed in its epilogue (split-K over a workspace, then its finishing kernel, when the grid is small); f32: `ops::conv_fwd` with the BN + ReLU |
//! | … bwd-weight | `ops_tc::conv_bwd_weight` (split-K) / `ops::conv_bwd_weight`, with the BN + ReLU |
//! | `conv1x1` bwd-data (a dense layer's BN1) | bf16: `ops_tc::conv_bwd_data` with the ReLU mask, the BN's reductions and its scale, accumulating into the block's gradient buffer, then `ops::bn_bwd_defer`; f32: `ops::conv_bwd_data`, then `ops::bn_bwd_deferred`; both then `ops::bn_grad_fix` of the layer's k output channels (the deferred BN terms, once per layer) |
//! | `conv3x3` bwd-data (BN2) | bf16: `ops_tc::conv_bwd_data` with the ReLU mask and the BN's reductions into a scratch, then `ops::bn_bwd_from_sums`; f32: `ops::conv_bwd_data`, then `ops::bn_bwd` |
//! | `trans1x1` | the same kernels without a BN in front (the pool applied it) |
//! | `bn_stats` | `ops::bn_stats`; bf16 rows of conv outputs (all but the max pool's): `ops::bn_coeffs` turning the sums the epilogue accumulated into mean and variance (with the coefficients of the BN that reads them) |
//! | `maxpool` fwd / bwd | `ops::maxpool_fwd` with norm0 + ReLU / `ops::maxpool_bwd` (the same), `ops::bn_bwd` (norm0) |
//! | `avgpool` fwd / bwd | `ops::avgpool_fwd` with the transition's BN + ReLU / `ops::avgpool_bwd`, `ops::bn_bwd` |
//! | `head` fwd / bwd | `ops::bn_act` (norm5 + ReLU), `ops::gap_fwd` / `ops::gap_bwd`, `ops::bn_bwd` |
//! | `adam` | `ops::adam` over every parameter; bf16: then `ops::cast_bf16` of them (the bf16 weight copy the tensor-core convolutions read, whose bytes the row counts) |
//!
//! Every row of the table is mapped (no `None`). Where the model differs from the table:
//! - Transitions: the table counts torchvision's order, the 1×1 conv at the block's resolution
//!   and then the pool; mura applies BN + ReLU + pool first and convolves a quarter of the
//!   pixels. `trans1x1` rows are timed as mura runs them, at half the side the row names, so
//!   their achieved FLOP/s (the row's FLOPs over the time) is 4× the real rate.
//! - `bn_stats` rows of conv outputs in bf16: the tensor-core forward sums these statistics in
//!   its epilogue, and the coefficients of the BN that reads them turn the sums into mean and
//!   variance, so the row times that coefficient kernel.
//! - Not timed, as the table does not list them: the other BN coefficient kernels, the classifier and
//!   the loss, the augmentation, and the `ops::bn_grad_fix` of each block's input channels
//!   (before the max pool's or the transition's backward; a layer's own are in its 1×1 row).

use super::ops::{self, BnSaved, Dt, View};
use super::{ops_tc, DevPtr, DeviceBuffer, Driver};
use crate::ops::conv::Conv;
use crate::optim::Adam;
use crate::rng::Rng;
use crate::roofline::{KernelRow, Pass, Precision};
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Seconds per launch of each row's kernels (module docs), timed on `d` after one warm-up over
/// `reps` launches. `rows` come from [`crate::roofline::table`] built for `precision` (an error
/// otherwise), with the convolutions of every block whose buffers a row uses.
pub fn measure(
    d: &Arc<dyn Driver>,
    rows: &[KernelRow],
    precision: Precision,
    reps: usize,
) -> Result<Vec<Option<f64>>> {
    if reps == 0 {
        bail!("the number of timed launches per kernel (reps) must be at least 1");
    }
    let geo = Geo::of(rows, precision)?;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let mut bench = Bench {
        d: d.clone(),
        dt: match precision {
            Precision::Bf16 => Dt::Bf16,
            Precision::F32 => Dt::F32,
        },
        seed,
        made: 0,
        bufs: HashMap::new(),
        scratch: HashMap::new(),
        row: 0,
    };
    rows.iter()
        .map(|r| {
            let what = || format!("timing {} {} {} {}", r.op, r.pass, r.site, r.shape);
            let mut work = bench.work(r, &geo).with_context(what)?;
            Ok(Some(time(d, &mut work, reps).with_context(what)?))
        })
        .collect()
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

/// A row's shape: `"56x56 128->32"`, `"112x112->56x56 64"`, `"7x7 1664"`: input and output
/// side, channels.
struct Dims {
    hi: usize,
    ho: usize,
    c: Vec<usize>,
}

impl Dims {
    fn parse(shape: &str) -> Result<Dims> {
        let num = |s: &str| -> Result<usize> {
            s.parse()
                .with_context(|| format!("bad number '{s}' in shape '{shape}'"))
        };
        let side = |s: &str| -> Result<usize> {
            match s.split_once('x') {
                Some((a, b)) if a == b => num(a),
                _ => bail!("shape '{shape}': '{s}' is not a square side like 56x56"),
            }
        };
        let (space, chans) = shape
            .split_once(' ')
            .with_context(|| format!("shape '{shape}' is not 'HxH C' or 'HxH C->C'"))?;
        let (hi, ho) = match space.split_once("->") {
            Some((a, b)) => (side(a)?, side(b)?),
            None => (side(space)?, side(space)?),
        };
        let c = chans.split("->").map(num).collect::<Result<_>>()?;
        Ok(Dims { hi, ho, c })
    }

    /// Input and output channels of a convolution.
    fn conv(&self) -> Result<(usize, usize)> {
        match self.c[..] {
            [ci, co] => Ok((ci, co)),
            _ => bail!("a convolution's shape names input and output channels"),
        }
    }

    /// The one channel count of a memory-bound op.
    fn one(&self) -> Result<usize> {
        match self.c[..] {
            [c] => Ok(c),
            _ => bail!("expected one channel count"),
        }
    }
}

/// The convolution geometry of a conv row's op.
fn geometry(op: &str) -> Option<Conv> {
    match op {
        "stem7x7s2" => Some(Conv::STEM),
        "conv1x1" | "trans1x1" => Some(Conv::POINTWISE),
        "conv3x3" => Some(Conv::CONV3),
        _ => None,
    }
}

/// An error unless a row's size `got` is the `want` its neighbours imply (a mismatch would
/// launch kernels outside the buffers).
fn same(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        bail!("{what} is {got}, but the other rows imply {want}");
    }
    Ok(())
}

/// `blockN` / `transN` → N − 1.
fn site_index(site: &str, prefix: &str) -> Result<usize> {
    site.strip_prefix(prefix)
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|&b| b >= 1)
        .map(|b| b - 1)
        .with_context(|| format!("site '{site}' is not {prefix}N"))
}

/// One dense block: side, channels of its buffer, growth rate.
#[derive(Clone, Copy)]
struct Block {
    h: usize,
    ct: usize,
    k: usize,
}

impl Block {
    /// An error unless `[n, h, h, c]` fits in the block's buffer.
    fn holds(&self, h: usize, c: usize) -> Result<()> {
        same("the side", h, self.h)?;
        if c > self.ct {
            bail!("{c} channels do not fit the block's {}", self.ct);
        }
        Ok(())
    }
}

/// What the rows say about the network: batch and dense blocks (by 0-based index).
struct Geo {
    n: usize,
    blocks: BTreeMap<usize, Block>,
}

impl Geo {
    fn of(rows: &[KernelRow], precision: Precision) -> Result<Geo> {
        let mut n = None;
        // Per block: side, widest 1×1 input, growth.
        let mut seen: BTreeMap<usize, (usize, usize, usize)> = BTreeMap::new();
        for r in rows {
            let (Some(g), Some(conv)) = (r.gemm, geometry(r.op)) else {
                continue;
            };
            let what = || format!("row {} {} {} {}", r.op, r.pass, r.site, r.shape);
            let dm = Dims::parse(&r.shape).with_context(what)?;
            let (ci, co) = dm.conv().with_context(what)?;
            let (pixels, side) = match r.pass {
                Pass::BwdData => (g.m as usize, dm.hi),
                Pass::BwdWeight => (g.k as usize, dm.ho),
                _ => (g.m as usize, dm.ho),
            };
            if side == 0 || pixels % (side * side) != 0 {
                bail!("{}: its GEMM does not match its shape", what());
            }
            let images = pixels / (side * side);
            if *n.get_or_insert(images) != images {
                bail!("{}: batch {images}, other rows {}", what(), n.unwrap_or(0));
            }
            if r.pass == Pass::Fwd {
                let kk = conv.k * conv.k;
                let elems = images * (dm.hi * dm.hi * ci + dm.ho * dm.ho * co) + kk * ci * co;
                let other = match precision {
                    Precision::Bf16 => Precision::F32,
                    Precision::F32 => Precision::Bf16,
                };
                if r.bytes == elems as u64 * other.bytes() {
                    bail!(
                        "the rows were built for {other} storage, not {precision}: build the \
                         table with the precision to measure"
                    );
                }
                if r.bytes != elems as u64 * precision.bytes() {
                    bail!("{}: its bytes do not match its shape", what());
                }
            }
            if r.op == "conv1x1" || r.op == "conv3x3" {
                let b = site_index(&r.site, "block").with_context(what)?;
                let e = seen.entry(b).or_insert((dm.hi, 0, 0));
                if r.op == "conv1x1" {
                    e.1 = e.1.max(ci);
                } else {
                    e.2 = co;
                }
            }
        }
        let n = n.context("the rows have no convolution to take the batch size from")?;
        let blocks = seen
            .into_iter()
            .filter(|&(_, (_, c, k))| c > 0 && k > 0)
            .map(|(b, (h, c, k))| (b, Block { h, ct: c + k, k }))
            .collect();
        Ok(Geo { n, blocks })
    }

    /// Dense block `b` (0-based), whose buffer width needs its 1×1 and 3×3 rows.
    fn block(&self, b: usize) -> Result<Block> {
        self.blocks.get(&b).copied().with_context(|| {
            format!(
                "the rows lack the 1x1 and 3x3 convolutions of block{} (its buffer width)",
                b + 1
            )
        })
    }
}

/// How a buffer is filled.
#[derive(Clone, Copy)]
enum Fill {
    /// Normal with this standard deviation and mean.
    Normal(f64, f64),
    /// Uniform in [0.5, 1.5): variances, Adam's second moments.
    Positive,
    /// Accumulated statistics.
    Zero,
}

const ACT: Fill = Fill::Normal(1.0, 0.0);

/// `len` values of `fill` stored as `dt`, drawn in parallel chunks from streams of `seed`.
fn random_bytes(seed: u64, len: usize, dt: Dt, fill: Fill) -> Vec<u8> {
    const CHUNK: usize = 1 << 16;
    let size = dt.size();
    let mut out = vec![0u8; len * size];
    if let Fill::Zero = fill {
        return out;
    }
    out.par_chunks_mut(CHUNK * size)
        .enumerate()
        .for_each(|(i, bytes)| {
            let mut rng = Rng::derive(seed, i as u64);
            for e in bytes.chunks_exact_mut(size) {
                let v = match fill {
                    Fill::Normal(scale, mean) => rng.normal() * scale + mean,
                    Fill::Positive => 0.5 + rng.uniform(),
                    Fill::Zero => 0.0,
                } as f32;
                match dt {
                    Dt::F32 => e.copy_from_slice(&v.to_le_bytes()),
                    Dt::Bf16 => e.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
                }
            }
        });
    out
}

/// A BN over `c` channels: its (scale, shift), statistics, parameter gradients and scratch.
#[derive(Clone, Copy)]
struct Bn {
    scale: DevPtr,
    shift: DevPtr,
    mean: DevPtr,
    var: DevPtr,
    dgamma: DevPtr,
    dbeta: DevPtr,
    part: DevPtr,
    coef: DevPtr,
}

impl Bn {
    fn pre(&self) -> Option<(DevPtr, DevPtr)> {
        Some((self.scale, self.shift))
    }

    /// What its backward reads, for input `x`.
    fn saved(&self, x: DevPtr, rs: usize, rows: usize, c: usize) -> BnSaved {
        BnSaved {
            x,
            rs,
            rows,
            c,
            mean: self.mean,
            var: self.var,
            scale: self.scale,
            shift: self.shift,
        }
    }
}

/// One convolution as the model runs it: the places it reads and writes.
struct ConvSite {
    /// The input (pre-BN when `bn` is given).
    x: View,
    /// The BN + ReLU in front of the convolution, fused into its loads.
    bn: Option<Bn>,
    g: Conv,
    co: usize,
    /// The output and its row stride.
    y: (DevPtr, usize),
    /// The output's gradient and its row stride.
    dy: (DevPtr, usize),
    /// Where the gradient of the BN's input (or of `x` without a BN) goes: address, row
    /// stride, accumulate.
    dx: (DevPtr, usize, bool),
}

/// Random device buffers, made on first use and shared by the rows that name them (a block's
/// buffer by all its layers), so a large network is filled once.
struct Bench {
    d: Arc<dyn Driver>,
    dt: Dt,
    seed: u64,
    /// Buffers made so far (each draws from its own stream).
    made: u64,
    /// By (name, elements, element size).
    bufs: HashMap<(String, usize, usize), DeviceBuffer<u8>>,
    /// The model's two backward scratch buffers, by name: grown (replaced) when a row needs
    /// more, with the row that last took their address.
    scratch: HashMap<&'static str, (DeviceBuffer<u8>, usize)>,
    /// The row being set up.
    row: usize,
}

impl Bench {
    fn buf(&mut self, name: &str, len: usize, dt: Dt, fill: Fill) -> Result<DevPtr> {
        let key = (name.to_string(), len, dt.size());
        if let Some(b) = self.bufs.get(&key) {
            return Ok(b.ptr());
        }
        let b = self.random(name, len, dt, fill)?;
        let ptr = b.ptr();
        self.bufs.insert(key, b);
        Ok(ptr)
    }

    fn random(&mut self, name: &str, len: usize, dt: Dt, fill: Fill) -> Result<DeviceBuffer<u8>> {
        self.made += 1;
        let seed = Rng::derive(self.seed, self.made).next_u64();
        DeviceBuffer::from_slice(&self.d, &random_bytes(seed, len.max(1), dt, fill))
            .with_context(|| format!("allocating {name} ({len} values)"))
    }

    /// Scratch `name` with room for `len` activations (one buffer per name, as in the model,
    /// rather than one per size).
    fn scratch(&mut self, name: &'static str, len: usize) -> Result<DevPtr> {
        let bytes = len * self.dt.size();
        match self.scratch.get_mut(name) {
            Some((b, row)) if b.len() >= bytes => {
                *row = self.row;
                return Ok(b.ptr());
            }
            Some((_, row)) if *row == self.row => {
                bail!("internal: scratch {name} grown after this row took its address")
            }
            _ => {}
        }
        self.scratch.remove(name); // free the smaller one first
        let b = self.random(name, len, self.dt, ACT)?;
        let ptr = b.ptr();
        self.scratch.insert(name, (b, self.row));
        Ok(ptr)
    }

    /// An activation (or activation gradient) buffer of the step's storage type.
    fn act(&mut self, name: &str, len: usize) -> Result<DevPtr> {
        self.buf(name, len, self.dt, ACT)
    }

    fn f32(&mut self, name: &str, len: usize, fill: Fill) -> Result<DevPtr> {
        self.buf(name, len, Dt::F32, fill)
    }

    /// Conv weights `[fan_in, co]` as the kernels read them: bf16 for the tensor-core
    /// kernels, else f32.
    fn weight(&mut self, fan_in: usize, co: usize, tc: bool) -> Result<DevPtr> {
        let dt = if tc { Dt::Bf16 } else { Dt::F32 };
        let fill = Fill::Normal((1.0 / fan_in as f64).sqrt(), 0.0);
        self.buf("w", fan_in * co, dt, fill)
    }

    fn bn(&mut self, c: usize) -> Result<Bn> {
        Ok(Bn {
            scale: self.f32("scale", c, Fill::Normal(0.5, 1.0))?,
            shift: self.f32("shift", c, Fill::Normal(0.5, 0.0))?,
            mean: self.f32("mean", c, Fill::Normal(0.1, 0.0))?,
            var: self.f32("var", c, Fill::Positive)?,
            dgamma: self.f32("dgamma", c, ACT)?,
            dbeta: self.f32("dbeta", c, ACT)?,
            part: self.f32("part", ops::bn_scratch_len(c), ACT)?,
            coef: self.f32("coef", 2 * c, ACT)?,
        })
    }

    /// Dense block `b`'s buffer and gradient buffer, `[n, h, h, ct]`.
    fn block_bufs(&mut self, b: usize, n: usize, blk: Block) -> Result<(DevPtr, DevPtr)> {
        let len = n * blk.h * blk.h * blk.ct;
        Ok((
            self.act(&format!("buf{b}"), len)?,
            self.act(&format!("dbuf{b}"), len)?,
        ))
    }

    /// The launches of row `r`.
    fn work(&mut self, r: &KernelRow, geo: &Geo) -> Result<Work> {
        self.row += 1;
        let (d, dt, n) = (self.d.clone(), self.dt, geo.n);
        if r.op == "adam" {
            let count = r
                .shape
                .strip_suffix(" params")
                .and_then(|s| s.parse::<usize>().ok())
                .with_context(|| format!("adam shape '{}' is not 'N params'", r.shape))?;
            let params = self.f32("params", count, Fill::Normal(0.05, 0.0))?;
            let grads = self.f32("grads", count, Fill::Normal(0.01, 0.0))?;
            let m = self.f32("adam_m", count, Fill::Normal(0.01, 0.0))?;
            let v = self.f32("adam_v", count, Fill::Positive)?;
            let copy = match dt {
                Dt::Bf16 => Some(self.buf("params16", count, Dt::Bf16, ACT)?),
                Dt::F32 => None,
            };
            let mut adam = Adam::new(0, 1e-4, 0.0);
            adam.step = 1;
            return Ok(Box::new(move || {
                ops::adam(&*d, &adam, count, (params, grads, m, v))?;
                match copy {
                    Some(p16) => ops::cast_bf16(&*d, params, count, p16),
                    None => Ok(()),
                }
            }));
        }
        let dm = Dims::parse(&r.shape)?;
        let pass = r.pass;
        match r.op {
            "stem7x7s2" => {
                let (ci, co) = dm.conv()?;
                let (s, h0) = (dm.hi, dm.ho);
                same("the stem's output side", h0, Conv::STEM.out_hw(s, s).0)?;
                let x = self.act("x", n * s * s * ci)?;
                let xv = View {
                    ptr: x,
                    n,
                    h: s,
                    w: s,
                    c: ci,
                    rs: ci,
                };
                let y0 = n * h0 * h0 * co;
                let tc = dt == Dt::Bf16;
                let g = Conv::STEM;
                match pass {
                    Pass::Fwd => {
                        let w = self.weight(49 * ci, co, tc)?;
                        let y = self.act("y0", y0)?;
                        if tc {
                            // Statistics summed in the epilogue, as for every conv output.
                            let sums = self.f32("sums", 2 * co, Fill::Zero)?;
                            return Ok(Box::new(move || {
                                ops_tc::conv_fwd(&*d, xv, None, w, co, g, y, co, Some(sums), None)
                            }));
                        }
                        Ok(Box::new(move || {
                            ops::conv_fwd(&*d, dt, xv, None, w, co, g, y, co)
                        }))
                    }
                    Pass::BwdWeight => {
                        let dy = self.scratch("sb", y0)?;
                        let dw = self.f32("dw", 49 * ci * co, ACT)?;
                        Ok(Box::new(move || match tc {
                            true => ops_tc::conv_bwd_weight(&*d, xv, None, g, dy, co, co, dw),
                            false => ops::conv_bwd_weight(&*d, dt, xv, None, g, dy, co, co, dw),
                        }))
                    }
                    _ => bail!("the stem has no {pass} kernel"),
                }
            }
            "conv1x1" => {
                let b = site_index(&r.site, "block")?;
                let blk = geo.block(b)?;
                same("the side", dm.hi, blk.h)?;
                let (ci, mid) = dm.conv()?;
                let (buf, dbuf) = self.block_bufs(b, n, blk)?;
                let px = n * blk.h * blk.h;
                let site = ConvSite {
                    x: View {
                        ptr: buf,
                        n,
                        h: blk.h,
                        w: blk.h,
                        c: ci,
                        rs: blk.ct,
                    },
                    bn: Some(self.bn(ci)?),
                    g: Conv::POINTWISE,
                    co: mid,
                    y: (self.act(&format!("y1_{b}"), px * mid)?, mid),
                    dy: (self.scratch("sb", px * mid)?, mid),
                    dx: (dbuf, blk.ct, true),
                };
                let work = self.conv(site, pass)?;
                if pass == Pass::BwdData {
                    // The model adds the deferred BN-backward terms to a layer's k output
                    // channels once per layer: counted with its 1×1 data gradient.
                    let corr = self.f32("corr", 2 * blk.ct, ACT)?;
                    let at = blk.ct - blk.k;
                    let fix = (ops::f32_at(corr, at), ops::f32_at(corr, blk.ct + at));
                    let (dx, x) = ((dt.at(dbuf, at), blk.ct), (dt.at(buf, at), blk.ct));
                    let mut work = work;
                    return Ok(Box::new(move || {
                        work()?;
                        ops::bn_grad_fix(&*d, dt, dx, x, px, blk.k, fix)
                    }));
                }
                Ok(work)
            }
            "conv3x3" => {
                let b = site_index(&r.site, "block")?;
                let blk = geo.block(b)?;
                same("the side", dm.hi, blk.h)?;
                let (mid, k) = dm.conv()?;
                let (buf, dbuf) = self.block_bufs(b, n, blk)?;
                let px = n * blk.h * blk.h;
                // The last layer's slice of the block.
                let slice = blk.ct - k;
                let site = ConvSite {
                    x: View {
                        ptr: self.act(&format!("y1_{b}"), px * mid)?,
                        n,
                        h: blk.h,
                        w: blk.h,
                        c: mid,
                        rs: mid,
                    },
                    bn: Some(self.bn(mid)?),
                    g: Conv::CONV3,
                    co: k,
                    y: (dt.at(buf, slice), blk.ct),
                    dy: (dt.at(dbuf, slice), blk.ct),
                    dx: (self.scratch("sb", px * mid)?, mid, false),
                };
                self.conv(site, pass)
            }
            "trans1x1" => {
                // mura pools first: the conv runs at the next block's resolution.
                let b = site_index(&r.site, "trans")?;
                let next = geo.block(b + 1)?;
                let (ci, co) = dm.conv()?;
                let h = dm.hi / 2;
                next.holds(h, co)?;
                let px = n * h * h;
                let (nbuf, ndbuf) = self.block_bufs(b + 1, n, next)?;
                let site = ConvSite {
                    x: View {
                        ptr: self.act(&format!("pooled{b}"), px * ci)?,
                        n,
                        h,
                        w: h,
                        c: ci,
                        rs: ci,
                    },
                    bn: None,
                    g: Conv::POINTWISE,
                    co,
                    y: (nbuf, next.ct),
                    dy: (ndbuf, next.ct),
                    dx: (self.scratch("sa", px * ci)?, ci, false),
                };
                self.conv(site, pass)
            }
            "bn_stats" => {
                let (h, c) = (dm.hi, dm.one()?);
                let px = n * h * h;
                // Whether a convolution wrote these channels (else the max pool did).
                let mut conv_out = true;
                let (x, rs) = match r.site.as_str() {
                    "stem" => {
                        let b0 = geo.block(0)?;
                        if h == b0.h {
                            b0.holds(h, c)?;
                            conv_out = false;
                            (self.block_bufs(0, n, b0)?.0, b0.ct)
                        } else {
                            (self.act("y0", px * c)?, c)
                        }
                    }
                    s if s.starts_with("trans") => {
                        let b = site_index(s, "trans")?;
                        let next = geo.block(b + 1)?;
                        next.holds(h, c)?;
                        (self.block_bufs(b + 1, n, next)?.0, next.ct)
                    }
                    s => {
                        let b = site_index(s, "block")?;
                        let blk = geo.block(b)?;
                        if c == blk.k {
                            blk.holds(h, c)?;
                            let buf = self.block_bufs(b, n, blk)?.0;
                            (dt.at(buf, blk.ct - c), blk.ct)
                        } else {
                            (self.act(&format!("y1_{b}"), px * c)?, c)
                        }
                    }
                };
                let out = self.f32("stats_out", 2 * c, Fill::Zero)?;
                let part = self.f32("part", ops::bn_scratch_len(c), ACT)?;
                let var = ops::f32_at(out, c);
                if dt == Dt::Bf16 && conv_out {
                    // A convolution's epilogue summed these statistics; what is left is turning
                    // the sums into mean and variance, which the coefficients of the BN that
                    // reads them do (timed here with that BN's coefficient work: the model
                    // launches nothing else for it).
                    let sums = self.f32("sums", 2 * c, Fill::Positive)?;
                    let (gamma, beta) = (
                        self.f32("gamma", c, Fill::Normal(0.5, 1.0))?,
                        self.f32("beta", c, Fill::Normal(0.5, 0.0))?,
                    );
                    let bn = self.bn(c)?;
                    let running = Some((bn.mean, bn.var, px));
                    let coefs = (bn.scale, bn.shift);
                    return Ok(Box::new(move || {
                        let pending = Some((sums, c));
                        let (s, t) = coefs;
                        ops::bn_coeffs(&*d, gamma, beta, out, var, running, pending, c, s, t)
                    }));
                }
                Ok(Box::new(move || {
                    ops::bn_stats(&*d, dt, x, px, c, rs, out, var, part)
                }))
            }
            "maxpool" => {
                let (h0, f0) = (dm.hi, dm.one()?);
                let b0 = geo.block(0)?;
                b0.holds(crate::ops::pool::maxpool_out(h0, h0).0, f0)?;
                let (buf0, dbuf0) = self.block_bufs(0, n, b0)?;
                let m0 = n * h0 * h0;
                let y0 = self.act("y0", m0 * f0)?;
                let y0v = View {
                    ptr: y0,
                    n,
                    h: h0,
                    w: h0,
                    c: f0,
                    rs: f0,
                };
                let bn = self.bn(f0)?;
                let pre = Some((bn.scale, bn.shift));
                let ct0 = b0.ct;
                match pass {
                    Pass::Fwd => Ok(Box::new(move || {
                        ops::maxpool_fwd(&*d, dt, y0v, pre, buf0, ct0)
                    })),
                    Pass::Bwd => {
                        let sa = self.scratch("sa", m0 * f0)?;
                        let sb = self.scratch("sb", m0 * f0)?;
                        let saved = bn.saved(y0, f0, m0, f0);
                        Ok(Box::new(move || {
                            ops::maxpool_bwd(&*d, dt, y0v, pre, dbuf0, ct0, sa)?;
                            let grads = (bn.dgamma, bn.dbeta);
                            let scratch = (bn.part, bn.coef);
                            ops::bn_bwd(
                                &*d, dt, saved, true, true, sa, f0, grads, sb, f0, false, scratch,
                            )
                        }))
                    }
                    _ => bail!("max pool has no {pass} kernel"),
                }
            }
            "avgpool" => {
                // The pool reads the whole block (ct channels; the row names the conv's output).
                let b = site_index(&r.site, "trans")?;
                let blk = geo.block(b)?;
                let (h, h2, ct) = (dm.hi, dm.ho, blk.ct);
                blk.holds(h, ct)?;
                same("the pooled side", h2, h / 2)?;
                let (buf, dbuf) = self.block_bufs(b, n, blk)?;
                let bv = View {
                    ptr: buf,
                    n,
                    h,
                    w: h,
                    c: ct,
                    rs: ct,
                };
                let bn = self.bn(ct)?;
                let pooled_len = n * h2 * h2 * ct;
                match pass {
                    Pass::Fwd => {
                        let pooled = self.act(&format!("pooled{b}"), pooled_len)?;
                        Ok(Box::new(move || {
                            ops::avgpool_fwd(&*d, dt, bv, bn.pre(), pooled, ct)
                        }))
                    }
                    Pass::Bwd => {
                        let sa = self.scratch("sa", pooled_len)?;
                        let sb = self.scratch("sb", n * h * h * ct)?;
                        let saved = bn.saved(buf, ct, n * h * h, ct);
                        Ok(Box::new(move || {
                            ops::avgpool_bwd(&*d, dt, (n, h, h, ct), sa, ct, sb)?;
                            let grads = (bn.dgamma, bn.dbeta);
                            let scratch = (bn.part, bn.coef);
                            ops::bn_bwd(
                                &*d, dt, saved, true, true, sb, ct, grads, dbuf, ct, false, scratch,
                            )
                        }))
                    }
                    _ => bail!("avg pool has no {pass} kernel"),
                }
            }
            "head" => {
                let (hf, c) = (dm.hi, dm.one()?);
                let (hw, px) = (hf * hf, n * hf * hf);
                let x = self.act("head_x", px * c)?;
                let a5 = self.act("a5", px * c)?;
                let bn = self.bn(c)?;
                match pass {
                    Pass::Fwd => {
                        let feat = self.f32("feat", n * c, ACT)?;
                        Ok(Box::new(move || {
                            ops::bn_act(&*d, dt, x, c, px, c, (bn.scale, bn.shift), true, a5, c)?;
                            ops::gap_fwd(&*d, dt, a5, n, hw, c, feat)
                        }))
                    }
                    Pass::Bwd => {
                        let dfeat = self.f32("dfeat", n * c, ACT)?;
                        let sa = self.scratch("sa", px * c)?;
                        let dx = self.act("head_dx", px * c)?;
                        let saved = bn.saved(x, c, px, c);
                        Ok(Box::new(move || {
                            ops::gap_bwd(&*d, dt, dfeat, n, hw, c, sa)?;
                            let grads = (bn.dgamma, bn.dbeta);
                            let scratch = (bn.part, bn.coef);
                            ops::bn_bwd(
                                &*d, dt, saved, true, true, sa, c, grads, dx, c, false, scratch,
                            )
                        }))
                    }
                    _ => bail!("the head has no {pass} kernel"),
                }
            }
            op => bail!("no kernel for op '{op}' (not a row of roofline::table)"),
        }
    }

    /// One pass of a dense-layer or transition convolution.
    fn conv(&mut self, s: ConvSite, pass: Pass) -> Result<Work> {
        let (d, dt) = (self.d.clone(), self.dt);
        let tc = dt == Dt::Bf16;
        let ConvSite {
            x,
            bn,
            g,
            co,
            y,
            dy,
            dx,
        } = s;
        let pre = bn.and_then(|b| b.pre());
        let fan_in = g.k * g.k * x.c;
        Ok(match pass {
            Pass::Fwd => {
                let w = self.weight(fan_in, co, tc)?;
                if tc {
                    // The convolution adds its output's statistics to the sums (the model's
                    // consumer, timed in the bn_stats row, zeroes them again); a small grid
                    // splits its reduction over a workspace, as in the model.
                    let sums = self.f32("sums", 2 * co, Fill::Zero)?;
                    let split = ops_tc::fwd_split_len(x.rows(), x.c, co, g) < fan_in;
                    let ws = match split {
                        true => Some(self.f32("fws", x.rows() * co, Fill::Zero)?),
                        false => None,
                    };
                    Box::new(move || {
                        ops_tc::conv_fwd(&*d, x, pre, w, co, g, y.0, y.1, Some(sums), ws)
                    })
                } else {
                    Box::new(move || ops::conv_fwd(&*d, dt, x, pre, w, co, g, y.0, y.1))
                }
            }
            Pass::BwdWeight => {
                let dw = self.f32("dw", fan_in * co, ACT)?;
                if tc {
                    Box::new(move || ops_tc::conv_bwd_weight(&*d, x, pre, g, dy.0, dy.1, co, dw))
                } else {
                    Box::new(move || ops::conv_bwd_weight(&*d, dt, x, pre, g, dy.0, dy.1, co, dw))
                }
            }
            Pass::BwdData => {
                let w = self.weight(fan_in, co, tc)?;
                let dims = (x.n, x.h, x.w, x.c);
                match bn {
                    Some(bn) if tc && g.k == 1 => {
                        // As the model (a dense layer's BN1): the epilogue adds scale × the masked
                        // gradient of the BN output straight into dx and sums the BN's reductions;
                        // the per-channel rest is deferred (bn_bwd_defer), applied by the fix.
                        let red = self.f32("sums", 2 * x.c, Fill::Zero)?;
                        let corr = self.f32("corr", 2 * x.rs, ACT)?;
                        let fix = (corr, ops::f32_at(corr, x.rs));
                        let mask = Some((x, (bn.scale, bn.shift)));
                        let saved = bn.saved(x.ptr, x.rs, x.rows(), x.c);
                        Box::new(move || {
                            ops_tc::conv_bwd_data(
                                &*d,
                                dy.0,
                                dy.1,
                                co,
                                w,
                                g,
                                dims,
                                dx.0,
                                dx.1,
                                dx.2,
                                mask,
                                Some(red),
                                Some(bn.scale),
                            )?;
                            ops::bn_bwd_defer(&*d, saved, red, (bn.dgamma, bn.dbeta), fix)
                        })
                    }
                    Some(bn) if tc => {
                        // As the model (a dense layer's BN2): the masked gradient of the BN output
                        // into a scratch with the BN's reductions summed alongside, then the BN
                        // backward from them.
                        let red = self.f32("sums", 2 * x.c, Fill::Zero)?;
                        let sa = self.scratch("sa", x.rows() * x.c)?;
                        let mask = Some((x, (bn.scale, bn.shift)));
                        let saved = bn.saved(x.ptr, x.rs, x.rows(), x.c);
                        Box::new(move || {
                            ops_tc::conv_bwd_data(
                                &*d,
                                dy.0,
                                dy.1,
                                co,
                                w,
                                g,
                                dims,
                                sa,
                                x.c,
                                false,
                                mask,
                                Some(red),
                                None,
                            )?;
                            let grads = (bn.dgamma, bn.dbeta);
                            ops::bn_bwd_from_sums(
                                &*d, dt, saved, red, sa, x.c, grads, dx.0, dx.1, dx.2, bn.coef,
                            )
                        })
                    }
                    None if tc => Box::new(move || {
                        ops_tc::conv_bwd_data(
                            &*d, dy.0, dy.1, co, w, g, dims, dx.0, dx.1, dx.2, None, None, None,
                        )
                    }),
                    None => Box::new(move || {
                        ops::conv_bwd_data(&*d, dt, dy.0, dy.1, co, w, g, dims, dx.0, dx.1, dx.2)
                    }),
                    Some(bn) => {
                        // The gradient of the BN's output, then the BN backward into dx (a dense
                        // layer's BN1, g.k == 1: its per-channel terms deferred, as in the model).
                        let sa = self.scratch("sa", x.rows() * x.c)?;
                        let saved = bn.saved(x.ptr, x.rs, x.rows(), x.c);
                        let corr = self.f32("corr", 2 * x.rs, ACT)?;
                        let defer = (g.k == 1).then_some((corr, ops::f32_at(corr, x.rs)));
                        Box::new(move || {
                            ops::conv_bwd_data(
                                &*d, dt, dy.0, dy.1, co, w, g, dims, sa, x.c, false,
                            )?;
                            let grads = (bn.dgamma, bn.dbeta);
                            match defer {
                                Some(corr) => ops::bn_bwd_deferred(
                                    &*d,
                                    dt,
                                    saved,
                                    (sa, x.c),
                                    grads,
                                    dx,
                                    bn.part,
                                    corr,
                                ),
                                None => ops::bn_bwd(
                                    &*d,
                                    dt,
                                    saved,
                                    true,
                                    true,
                                    sa,
                                    x.c,
                                    grads,
                                    dx.0,
                                    dx.1,
                                    dx.2,
                                    (bn.part, bn.coef),
                                ),
                            }
                        })
                    }
                }
            }
            _ => bail!("a convolution has no {pass} kernel"),
        })
    }
}
