//! Batch norm over a channel slice of NHWC activations (kernels/bn.cu; CPU reference
//! `crate::ops::bn`): batch statistics, scale and shift (with the running-statistics update), the
//! apply, and the backward, whole or with its per-channel part deferred.
//!
//! The deferred backward: a dense layer's BN1 reads a channel prefix that every later layer of the
//! block reads too. Its input gradient is `scale · dz` per element plus a per-channel term affine
//! in x, `alpha + beta · x`; the per-element part goes straight into the block's gradient buffer
//! (bf16: from the data-gradient convolution's epilogue), the affine terms are summed over every
//! reader of the channel ([`Deferred`]) and added once, by [`grad_fix`], when the channel's
//! gradient is otherwise complete.

use super::{elementwise, per_channel, same_shape, Act, BnRelu};
use crate::gpu::error::bail_shape;
use crate::gpu::kernels::launch as k;
use crate::gpu::{blocks_for, Driver, Launch, Mat, Ptr, Slice};
use crate::ops::bn::BnOpts;
use crate::ops::{Activation, Mode, Write};
use anyhow::Result;

/// Most row chunks of a BN reduction.
const MAX_CHUNKS: usize = 64;

/// Row chunks of a BN reduction over `rows` rows: enough blocks to fill a GPU, at most 64. The
/// kernels find a chunk's rows in 32 bits (`p * rows / chunks`), so `rows` is at most
/// [`MAX_ROWS`].
fn chunks(rows: usize) -> Result<usize> {
    if rows > MAX_ROWS {
        bail_shape!("a BN over {rows} rows, more than the {MAX_ROWS} its reductions index");
    }
    Ok(rows.div_ceil(1024).clamp(1, MAX_CHUNKS))
}

/// The most rows a BN reduction covers: 64 chunks of them index in 32 bits.
pub const MAX_ROWS: usize = (u32::MAX as usize) / MAX_CHUNKS;

/// f32 elements of scratch the BN reductions need for `c` channels: `[2, 64, c]`.
pub fn scratch_len(c: usize) -> usize {
    2 * MAX_CHUNKS * c
}

/// A BN's per-channel statistics `[c]` f32: mean and biased variance (batch or running).
#[derive(Clone, Copy, Debug)]
pub struct Stats {
    pub mean: Slice<f32>,
    pub var: Slice<f32>,
}

impl Stats {
    pub(crate) fn ptrs(self, c: usize) -> Result<(Ptr<f32>, Ptr<f32>)> {
        Ok((
            self.mean.expect(c, "a BN's mean")?.ptr(),
            self.var.expect(c, "a BN's variance")?.ptr(),
        ))
    }
}

/// A BN's parameters, or their gradients: `gamma, beta: [c]` f32.
#[derive(Clone, Copy, Debug)]
pub struct Affine {
    pub gamma: Slice<f32>,
    pub beta: Slice<f32>,
}

impl Affine {
    pub(crate) fn ptrs(self, c: usize) -> Result<(Ptr<f32>, Ptr<f32>)> {
        Ok((
            self.gamma.expect(c, "a BN's gamma")?.ptr(),
            self.beta.expect(c, "a BN's beta")?.ptr(),
        ))
    }
}

/// What [`batch_stats`] finishes: the statistics alone, or with them the coefficients of the BN that
/// normalises with them (its `stats` those statistics).
#[derive(Clone, Copy, Debug)]
pub enum Finish {
    Stats(Stats),
    Coefficients(CoefStep),
}

/// Per-channel mean and biased variance of `x: [rows, c]` (and, [`Finish::Coefficients`], that
/// BN's coefficients), in one launch: its chunks' partial statistics in `scratch.part` (of
/// [`scratch_len`]`(c)` f32), merged by its last block (counted in `scratch.done`), which leaves
/// both zero.
pub fn batch_stats<T: Act>(
    d: &dyn Driver,
    x: Mat<T>,
    finish: Finish,
    scratch: Scratch,
) -> Result<()> {
    let (rows, c) = (x.rows(), x.cols());
    let p = chunks(rows)?;
    let part = scratch.part.expect(scratch_len(c), "the BN scratch")?.ptr();
    let (out, coefs) = match finish {
        Finish::Stats(stats) => (stats, None),
        Finish::Coefficients(step) if step.params.gamma.len() != c => bail_shape!(
            "the coefficients of a BN of {} channels from the statistics of {c}",
            step.params.gamma.len()
        ),
        Finish::Coefficients(step) => (step.stats, Some(step)),
    };
    let (mean, var) = out.ptrs(c)?;
    let q = CoefPtrs::of(coefs, (rows, c), true)?;
    let done = scratch
        .done
        .expect(1, "the BN reductions' block count")?
        .ptr();
    let at = Launch {
        grid: [blocks_for(c, 32), p as u32, 1],
        block: [32, 8, 1],
        shared: 9 * 33 * 4,
        pdl: false,
    };
    // SAFETY: x is a checked view of rows × c; part holds [2, p, c]; mean, var and the
    // coefficients' operands hold c.
    unsafe {
        k::bn_stats_part_fwd::<T>(
            d,
            at,
            part,
            x.ptr(),
            rows,
            c,
            x.rs(),
            q.gamma,
            q.beta,
            mean,
            var,
            q.run_mean,
            q.run_var,
            q.unbias,
            q.scale,
            q.shift,
            done,
        )
    }
}

/// PyTorch's factor from a batch of `count` rows' biased variance to the unbiased one that the
/// running variance takes: count / (count − 1) (1 row: 1).
fn unbias(count: usize) -> f32 {
    (count as f64 / (count.max(2) - 1) as f64) as f32
}

/// The running statistics a training-mode [`scale_shift`] updates, from a batch of `count` rows
/// (PyTorch: momentum 0.1, unbiased variance).
#[derive(Clone, Copy, Debug)]
pub struct Running {
    pub stats: Stats,
    pub count: usize,
}

/// Statistics of a BN's last `channels` channels that are still sums: `sums: [2, channels]` f32,
/// the per-channel Σx and Σx² over the batch that a tensor-core convolution's epilogue added up.
#[derive(Clone, Copy, Debug)]
pub struct Pending {
    pub sums: Slice<f32>,
    pub channels: usize,
}

/// A BN's (scale, shift) into `out`, from its `params` and `stats` (`[c]` each): scale =
/// gamma / sqrt(var + eps), shift = beta − mean · scale. In training (`running`) also updates the
/// running statistics; with `pending` (training only) the statistics of the last channels are first
/// computed from their sums (mean = Σx / count, var = Σx² / count − mean²), stored into `stats`,
/// and the sums zeroed for the next epilogue.
pub fn scale_shift(
    d: &dyn Driver,
    params: Affine,
    stats: Stats,
    running: Option<Running>,
    pending: Option<Pending>,
    out: BnRelu,
) -> Result<()> {
    let c = params.gamma.len();
    if params.beta.len() != c {
        bail_shape!("a BN with {c} gammas and {} betas", params.beta.len());
    }
    let (gamma, beta) = params.ptrs(c)?;
    let (mean, var) = stats.ptrs(c)?;
    let (scale, shift) = out.ptrs(c)?;
    let (run_mean, run_var, count) = match running {
        Some(r) => {
            let (m, v) = r.stats.ptrs(c)?;
            (m, v, r.count)
        }
        None => (Ptr::NULL, Ptr::NULL, 2),
    };
    let unbias = unbias(count);
    let (sums, p) = match pending {
        Some(_) if running.is_none() => {
            bail_shape!("BN statistics from sums need the batch's row count")
        }
        Some(p) if p.channels > c => bail_shape!("{} pending channels of a BN of {c}", p.channels),
        Some(p) => (
            p.sums.expect(2 * p.channels, "the pending sums")?.ptr(),
            p.channels,
        ),
        None => (Ptr::NULL, 0),
    };
    // SAFETY: every [c] operand is checked above, the sums hold [2, p].
    unsafe {
        k::bn_coeffs_fwd_f32(
            d,
            per_channel(c),
            scale,
            shift,
            gamma,
            beta,
            mean,
            var,
            run_mean,
            run_var,
            unbias,
            c,
            sums,
            count,
            p,
        )
    }
}

/// The BN whose (scale, shift) into `out` the last block of the launch that sums its input finishes
/// (no launch of its own; [`scale_shift`] with [`Pending`] does the same): a tensor-core forward
/// (`conv_tc::fwd`) from the sums of its output, the BN's last channels (their batch statistics
/// written from the sums, which are left zero), or [`batch_stats`] from its chunks. `params` and
/// `stats` over all its channels; `running` updated from the batch (`count` = the rows summed).
/// `done`: one `u32`, zero, left zero.
#[derive(Clone, Copy, Debug)]
pub struct CoefStep {
    pub params: Affine,
    pub stats: Stats,
    pub running: Running,
    pub out: BnRelu,
    pub done: Slice<u32>,
}

/// A [`CoefStep`]'s pointers after `rows × co` values summed (all null: none).
pub(crate) struct CoefPtrs {
    pub gamma: Ptr<f32>,
    pub beta: Ptr<f32>,
    pub mean: Ptr<f32>,
    pub var: Ptr<f32>,
    pub run_mean: Ptr<f32>,
    pub run_var: Ptr<f32>,
    pub unbias: f32,
    pub c: usize,
    pub scale: Ptr<f32>,
    pub shift: Ptr<f32>,
    pub done: Ptr<u32>,
}

impl CoefPtrs {
    pub(crate) fn of(
        step: Option<CoefStep>,
        (rows, co): (usize, usize),
        sums: bool,
    ) -> Result<CoefPtrs> {
        let Some(s) = step else {
            let z = Ptr::NULL;
            return Ok(CoefPtrs {
                gamma: z,
                beta: z,
                mean: z,
                var: z,
                run_mean: z,
                run_var: z,
                unbias: 1.0,
                c: 0,
                scale: z,
                shift: z,
                done: Ptr::NULL,
            });
        };
        let c = s.params.gamma.len();
        if !sums {
            bail_shape!("a BN coefficients step needs the statistics it finishes from (stats)");
        }
        if c < co || s.running.count != rows {
            bail_shape!(
                "a BN of {c} channels over {} rows finished from {rows} × {co} values",
                s.running.count
            );
        }
        let ((gamma, beta), (mean, var)) = (s.params.ptrs(c)?, s.stats.ptrs(c)?);
        let (run_mean, run_var) = s.running.stats.ptrs(c)?;
        let (scale, shift) = s.out.ptrs(c)?;
        let done = s.done.expect(1, "the BN step's block count")?.ptr();
        let unbias = unbias(rows);
        Ok(CoefPtrs {
            gamma,
            beta,
            mean,
            var,
            run_mean,
            run_var,
            unbias,
            c,
            scale,
            shift,
            done,
        })
    }
}

/// `y = x · scale + shift` (then `act`), `x, y: [rows, c]`.
pub fn apply<T: Act>(
    d: &dyn Driver,
    x: Mat<T>,
    coef: BnRelu,
    act: Activation,
    y: Mat<T>,
) -> Result<()> {
    same_shape("BN apply", x, y)?;
    let (rows, c) = (x.rows(), x.cols());
    let (scale, shift) = coef.ptrs(c)?;
    let at = elementwise(rows * c)?;
    // SAFETY: x and y are checked views of the same shape, the coefficients hold c.
    unsafe {
        k::bn_apply_fwd::<T>(
            d,
            at,
            y.ptr(),
            y.rs(),
            x.ptr(),
            x.rs(),
            rows,
            c,
            scale,
            shift,
            act == Activation::Relu,
        )
    }
}

/// What a BN backward reads: the forward input `x: [rows, c]`, the statistics it normalised with
/// and its coefficients.
#[derive(Clone, Copy, Debug)]
pub struct Saved<T> {
    pub x: Mat<T>,
    pub stats: Stats,
    pub coef: BnRelu,
}

/// The gradient a backward writes: `mat`, overwritten or added to (a dense block's shared gradient
/// buffer).
#[derive(Clone, Copy, Debug)]
pub struct Grad<T> {
    pub mat: Mat<T>,
    pub write: Write,
}

/// The scratch of the BN reductions: `part`, [`scratch_len`]`(c)` f32, zero; `coef`, `2c` f32;
/// `done`, one `u32`, zero (the reductions' count of finished blocks). The reductions leave `part`
/// and `done` zero.
#[derive(Clone, Copy, Debug)]
pub struct Scratch {
    pub part: Slice<f32>,
    pub coef: Slice<f32>,
    pub done: Slice<u32>,
}

/// The deferred per-channel terms of BN backwards, `alpha, beta: [c]` f32 (module comment).
#[derive(Clone, Copy, Debug)]
pub struct Deferred {
    pub alpha: Slice<f32>,
    pub beta: Slice<f32>,
}

impl Deferred {
    pub(crate) fn ptrs(self, c: usize) -> Result<(Ptr<f32>, Ptr<f32>)> {
        Ok((
            self.alpha.expect(c, "the deferred alpha")?.ptr(),
            self.beta.expect(c, "the deferred beta")?.ptr(),
        ))
    }
}

/// Backward of BN (batch statistics in training, running ones in eval) then `opts.act`: `dparams`
/// += the parameters' gradients; `dx` from `dy` (`[rows, c]` each).
pub fn backward<T: Act>(
    d: &dyn Driver,
    s: Saved<T>,
    opts: BnOpts,
    dy: Mat<T>,
    dparams: Affine,
    dx: Grad<T>,
    scratch: Scratch,
) -> Result<()> {
    check_grads(s, dy, dx.mat)?;
    scratch
        .coef
        .expect(2 * s.x.cols(), "the BN coefficients scratch")?;
    reduce(d, s, opts.act, dy, dparams, scratch, None)?;
    dx_pass(d, s, opts, dy, dx, scratch.coef)
}

/// Refuses a backward whose gradients do not match the saved input, before anything runs (a
/// reduction launched first would already have added to the parameters' gradients).
fn check_grads<T>(s: Saved<T>, dy: Mat<T>, dx: Mat<T>) -> Result<()> {
    same_shape("BN backward (dy)", s.x, dy)?;
    same_shape("BN backward (dx)", s.x, dx)
}

/// [`backward`] in training with ReLU, its input gradient's per-channel terms added to `deferred`
/// for [`grad_fix`]: `dx` receives `scale · mask · dy` only. `part`: the reduction scratch.
pub fn backward_deferred<T: Act>(
    d: &dyn Driver,
    s: Saved<T>,
    dy: Mat<T>,
    dparams: Affine,
    dx: Grad<T>,
    scratch: Scratch,
    deferred: Deferred,
) -> Result<()> {
    check_grads(s, dy, dx.mat)?;
    reduce(d, s, Activation::Relu, dy, dparams, scratch, Some(deferred))?;
    // The eval-mode formula is exactly the per-element term: scale · mask · dy (no coef read).
    dx_pass(d, s, BnOpts::relu(Mode::Eval), dy, dx, scratch.part)
}

/// The reductions of a BN backward, in one launch (its last block merges the chunks): `dparams`
/// +=, and the merged `coef: [2, c]` (or, deferred, `alpha, beta` +=) from `dy`.
fn reduce<T: Act>(
    d: &dyn Driver,
    s: Saved<T>,
    act: Activation,
    dy: Mat<T>,
    dparams: Affine,
    scratch: Scratch,
    deferred: Option<Deferred>,
) -> Result<()> {
    same_shape("BN backward", s.x, dy)?;
    let (rows, c) = (s.x.rows(), s.x.cols());
    let p = chunks(rows)?;
    let part = scratch.part.expect(scratch_len(c), "the BN scratch")?.ptr();
    let (scale, shift) = s.coef.ptrs(c)?;
    let (mean, var) = s.stats.ptrs(c)?;
    let (dgamma, dbeta) = dparams.ptrs(c)?;
    let at = Launch {
        grid: [blocks_for(c, 32), p as u32, 1],
        block: [32, 8, 1],
        shared: 8 * 33 * 4,
        pdl: false,
    };
    let (x, x_rs, dy_rs) = (s.x.ptr(), s.x.rs(), dy.rs());
    let (coef, (alpha, beta)) = match deferred {
        Some(def) => (Ptr::NULL, def.ptrs(c)?),
        None => (
            scratch
                .coef
                .expect(2 * c, "the BN coefficients scratch")?
                .ptr(),
            (Ptr::NULL, Ptr::NULL),
        ),
    };
    let done = scratch
        .done
        .expect(1, "the BN reductions' block count")?
        .ptr();
    // SAFETY: x and dy are checked views of rows × c; part holds [2, p, c]; [c] operands checked;
    // coef holds [2, c] when written.
    unsafe {
        k::bn_bwd_part::<T>(
            d,
            at,
            part,
            x,
            x_rs,
            dy.ptr(),
            dy_rs,
            rows,
            c,
            scale,
            shift,
            mean,
            act == Activation::Relu,
            coef,
            dgamma,
            dbeta,
            var,
            alpha,
            beta,
            done,
        )
    }
}

/// The elementwise part of a BN backward: `dx` (+)= from `dy` and `coef: [2, c]` f32 (the merged
/// reductions; unread in eval).
fn dx_pass<T: Act>(
    d: &dyn Driver,
    s: Saved<T>,
    opts: BnOpts,
    dy: Mat<T>,
    dx: Grad<T>,
    coef: Slice<f32>,
) -> Result<()> {
    same_shape("BN backward", s.x, dy)?;
    same_shape("BN backward", s.x, dx.mat)?;
    let (rows, c) = (s.x.rows(), s.x.cols());
    let (scale, shift) = s.coef.ptrs(c)?;
    let (mean, _) = s.stats.ptrs(c)?;
    let train = opts.mode == Mode::Train;
    let coef = match opts.mode {
        Mode::Train => coef.expect(2 * c, "the BN coefficients scratch")?.ptr(),
        Mode::Eval => Ptr::NULL,
    };
    let at = elementwise(rows * c)?;
    let (x, x_rs) = (s.x.ptr(), s.x.rs());
    // SAFETY: x, dy, dx are checked views of rows × c; [c] and [2, c] operands checked.
    unsafe {
        k::bn_bwd_dx::<T>(
            d,
            at,
            dx.mat.ptr(),
            dx.mat.rs(),
            dx.write == Write::Accumulate,
            x,
            x_rs,
            dy.ptr(),
            dy.rs(),
            rows,
            c,
            scale,
            shift,
            mean,
            coef,
            opts.act == Activation::Relu,
            train,
        )
    }
}

/// A training-mode BN backward whose per-channel step a data-gradient convolution already
/// finished (`conv_tc::BnStep` into `coef`, `dparams` updated there), as it did the ReLU mask:
/// `dz: [rows, c]` is the masked gradient of the BN output; `dx` (+)= its input gradient.
pub fn backward_from_coef<T: Act>(
    d: &dyn Driver,
    s: Saved<T>,
    dz: Mat<T>,
    dx: Grad<T>,
    coef: Slice<f32>,
) -> Result<()> {
    check_grads(s, dz, dx.mat)?;
    // The ReLU mask is already in dz.
    let opts = BnOpts {
        act: Activation::Identity,
        mode: Mode::Train,
    };
    dx_pass(d, s, opts, dz, dx, coef)
}

/// `dx += alpha + beta · x` per channel (`dx, x: [rows, c]`): the deferred terms of every BN that
/// read these channels, applied once their gradient is otherwise complete.
pub fn grad_fix<T: Act>(d: &dyn Driver, dx: Mat<T>, x: Mat<T>, deferred: Deferred) -> Result<()> {
    same_shape("BN gradient fix", dx, x)?;
    let (rows, c) = (x.rows(), x.cols());
    let (alpha, beta) = deferred.ptrs(c)?;
    let at = elementwise(rows * c)?;
    // SAFETY: dx and x are checked views of rows × c; alpha, beta hold c.
    unsafe {
        k::bn_grad_fix_bwd::<T>(
            d,
            at,
            dx.ptr(),
            dx.rs(),
            x.ptr(),
            x.rs(),
            rows,
            c,
            alpha,
            beta,
        )
    }
}
