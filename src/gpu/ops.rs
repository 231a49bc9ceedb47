//! The DenseNet ops on the GPU: typed launches of the kernels in kernels/{conv,batchnorm,pool}.cu.
//!
//! Activations are NHWC in the storage type [`Dt`] (f32, or bf16 with f32 accumulation); weights,
//! gradients of weights and BN statistics are always f32. Buffers are passed as device addresses
//! (a channel slice of a wider buffer is its first channel's address plus the row stride); each
//! function's comment gives the shapes, and the caller guarantees that the addresses are valid for
//! them, as with the kernels themselves.

use super::{arg, blocks_for, DevPtr, Driver};
use crate::ops::conv::Conv;
use anyhow::{bail, Context, Result};
use std::ffi::c_void;

/// The storage type of activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dt {
    F32,
    Bf16,
}

impl Dt {
    pub fn size(self) -> usize {
        match self {
            Dt::F32 => 4,
            Dt::Bf16 => 2,
        }
    }
    fn suffix(self) -> &'static str {
        match self {
            Dt::F32 => "f32",
            Dt::Bf16 => "bf16",
        }
    }
    /// The address of element `i` of a buffer of this type at `p`.
    pub fn at(self, p: DevPtr, i: usize) -> DevPtr {
        p + (i * self.size()) as u64
    }
}

/// An f32 buffer's element `i`.
pub fn f32_at(p: DevPtr, i: usize) -> DevPtr {
    p + (i * 4) as u64
}

/// One kernel parameter (shared with `ops_tc`).
pub(super) enum A {
    P(DevPtr),
    I(i32),
    F(f32),
}

pub(super) fn i(v: usize) -> A {
    A::I(v as i32)
}

/// A null pointer or a fused BN + ReLU's (scale, shift).
fn pre_args(pre: Option<(DevPtr, DevPtr)>) -> [A; 2] {
    let (s, t) = pre.unwrap_or((0, 0));
    [A::P(s), A::P(t)]
}

pub(super) fn launch(
    d: &dyn Driver,
    name: &str,
    grid: [u32; 3],
    block: [u32; 3],
    shared: u32,
    mut args: Vec<A>,
) -> Result<()> {
    let mut ptrs: Vec<*mut c_void> = args
        .iter_mut()
        .map(|a| match a {
            A::P(v) => arg(v),
            A::I(v) => arg(v),
            A::F(v) => arg(v),
        })
        .collect();
    // SAFETY: the argument lists below follow the kernels' signatures; the addresses are the
    // caller's contract (module documentation).
    unsafe { d.launch(name, grid, block, shared, &mut ptrs) }
        .with_context(|| format!("kernel {name}"))
}

/// `name_<dtype>`.
fn kname(base: &str, dt: Dt) -> String {
    format!("{base}_{}", dt.suffix())
}

/// Elementwise launches: 256 threads, at most 4096 blocks (the kernels loop).
fn ew_grid(n: usize) -> [u32; 3] {
    [blocks_for(n, 256).min(4096), 1, 1]
}

const CONV_TILE: usize = 64;
const CONV_SMEM: u32 = 2 * 16 * 68 * 4;

/// An NHWC activation view: `[n, h, w, c]` at `ptr` with row (pixel) stride `rs >= c`.
#[derive(Clone, Copy, Debug)]
pub struct View {
    pub ptr: DevPtr,
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub rs: usize,
}

impl View {
    pub fn rows(&self) -> usize {
        self.n * self.h * self.w
    }
}

/// `y: [n, ho, wo, co]` (row stride `y_rs`) = conv(pre(x), wt); `wt: [k, k, x.c, co]` f32;
/// `pre`: a fused BN + ReLU's (scale, shift) `[x.c]` f32.
#[allow(clippy::too_many_arguments)]
pub fn conv_fwd(
    d: &dyn Driver,
    dt: Dt,
    x: View,
    pre: Option<(DevPtr, DevPtr)>,
    wt: DevPtr,
    co: usize,
    g: Conv,
    y: DevPtr,
    y_rs: usize,
) -> Result<()> {
    let (ho, wo) = g.out_hw(x.h, x.w);
    let grid = [
        blocks_for(x.n * ho * wo, CONV_TILE as u32),
        blocks_for(co, CONV_TILE as u32),
        1,
    ];
    let [s, t] = pre_args(pre);
    let args = vec![
        A::P(y),
        i(y_rs),
        A::P(x.ptr),
        i(x.rs),
        A::P(wt),
        s,
        t,
        i(x.n),
        i(x.h),
        i(x.w),
        i(x.c),
        i(co),
        i(g.k),
        i(g.stride),
        i(g.pad),
    ];
    launch(
        d,
        &kname("conv_fwd", dt),
        grid,
        [256, 1, 1],
        CONV_SMEM,
        args,
    )
}

/// `dx: [n, h, w, ci]` (row stride `dx_rs`; overwritten, or added to if `accumulate`) =
/// d(loss)/d(conv input) from `dy: [n, ho, wo, co]` (row stride `dy_rs`) and `wt: [k, k, ci, co]`.
#[allow(clippy::too_many_arguments)]
pub fn conv_bwd_data(
    d: &dyn Driver,
    dt: Dt,
    dy: DevPtr,
    dy_rs: usize,
    co: usize,
    wt: DevPtr,
    g: Conv,
    (n, h, w, ci): (usize, usize, usize, usize),
    dx: DevPtr,
    dx_rs: usize,
    accumulate: bool,
) -> Result<()> {
    let grid = [
        blocks_for(n * h * w, CONV_TILE as u32),
        blocks_for(ci, CONV_TILE as u32),
        1,
    ];
    let args = vec![
        A::P(dx),
        i(dx_rs),
        A::I(accumulate as i32),
        A::P(dy),
        i(dy_rs),
        A::P(wt),
        i(n),
        i(h),
        i(w),
        i(ci),
        i(co),
        i(g.k),
        i(g.stride),
        i(g.pad),
    ];
    launch(
        d,
        &kname("conv_bwd_data", dt),
        grid,
        [256, 1, 1],
        CONV_SMEM,
        args,
    )
}

/// `dw: [k, k, x.c, co]` f32 += d(loss)/d(wt) from `dy: [n, ho, wo, co]` (row stride `dy_rs`).
#[allow(clippy::too_many_arguments)]
pub fn conv_bwd_weight(
    d: &dyn Driver,
    dt: Dt,
    x: View,
    pre: Option<(DevPtr, DevPtr)>,
    g: Conv,
    dy: DevPtr,
    dy_rs: usize,
    co: usize,
    dw: DevPtr,
) -> Result<()> {
    let (ho, wo) = g.out_hw(x.h, x.w);
    let pixels = x.n * ho * wo;
    let tiles = blocks_for(g.k * g.k * x.c, CONV_TILE as u32) * blocks_for(co, CONV_TILE as u32);
    // Split the pixel reduction so that the grid has a few hundred blocks, each at least 256 pixels.
    let splits = (512 / tiles as usize).clamp(1, pixels.div_ceil(256).max(1));
    let split_len = pixels.div_ceil(splits).div_ceil(16) * 16;
    let grid = [
        blocks_for(g.k * g.k * x.c, CONV_TILE as u32),
        blocks_for(co, CONV_TILE as u32),
        blocks_for(pixels, split_len as u32),
    ];
    let [s, t] = pre_args(pre);
    let args = vec![
        A::P(dw),
        A::P(x.ptr),
        i(x.rs),
        s,
        t,
        A::P(dy),
        i(dy_rs),
        i(x.n),
        i(x.h),
        i(x.w),
        i(x.c),
        i(co),
        i(g.k),
        i(g.stride),
        i(g.pad),
        i(split_len),
    ];
    launch(
        d,
        &kname("conv_bwd_weight", dt),
        grid,
        [256, 1, 1],
        CONV_SMEM,
        args,
    )
}

/// Row chunks of a BN reduction over `rows` rows: enough blocks to fill a GPU, at most 64.
fn bn_chunks(rows: usize) -> usize {
    rows.div_ceil(1024).clamp(1, 64)
}

/// Floats of scratch the BN reductions need for `c` channels: `[2, 64, c]`.
pub fn bn_scratch_len(c: usize) -> usize {
    2 * 64 * c
}

/// Per-channel batch mean and biased variance `[c]` f32 of `x: [rows, c]` (row stride `rs`).
/// `part`: scratch of [`bn_scratch_len`]`(c)` f32.
#[allow(clippy::too_many_arguments)]
pub fn bn_stats(
    d: &dyn Driver,
    dt: Dt,
    x: DevPtr,
    rows: usize,
    c: usize,
    rs: usize,
    mean: DevPtr,
    var: DevPtr,
    part: DevPtr,
) -> Result<()> {
    let p = bn_chunks(rows);
    launch(
        d,
        &kname("bn_stats_part_fwd", dt),
        [blocks_for(c, 32), p as u32, 1],
        [32, 8, 1],
        (9 * 33 * 4) as u32,
        vec![A::P(part), A::P(x), i(rows), i(c), i(rs)],
    )?;
    launch(
        d,
        "bn_stats_merge_fwd_f32",
        [blocks_for(c, 128), 1, 1],
        [128, 1, 1],
        0,
        vec![A::P(mean), A::P(var), A::P(part), i(rows), i(c), i(p)],
    )
}

/// A training-mode BN backward whose data-gradient convolution already added `scale · dz` to the
/// input gradient (`ops_tc::conv_bwd_data` with `post = scale`) and summed `red: [2, c]` f32 =
/// Σdz, Σdz·x (left zeroed): `dgamma, dbeta: [c]` f32 += ...; the rest of the input gradient,
/// affine in x per channel, is added to `alpha, beta: [c]` f32 for [`bn_grad_fix`] to apply once
/// every BN reading those channels has added its share. `s`: the BN's statistics, scale, rows.
pub fn bn_bwd_defer(
    d: &dyn Driver,
    s: BnSaved,
    red: DevPtr,
    (dgamma, dbeta): (DevPtr, DevPtr),
    (alpha, beta): (DevPtr, DevPtr),
) -> Result<()> {
    launch(
        d,
        "bn_bwd_defer_f32",
        [blocks_for(s.c, 128), 1, 1],
        [128, 1, 1],
        0,
        vec![
            A::P(alpha),
            A::P(beta),
            A::P(dgamma),
            A::P(dbeta),
            A::P(red),
            A::P(s.mean),
            A::P(s.var),
            A::P(s.scale),
            i(s.rows),
            i(s.c),
        ],
    )
}

/// `dx: [rows, c]` (row stride `dx_rs`) += `alpha + beta · x` per channel, `x: [rows, c]` (row
/// stride `x_rs`) the channels' stored values, `alpha, beta: [c]` f32 from [`bn_bwd_defer`].
#[allow(clippy::too_many_arguments)]
pub fn bn_grad_fix(
    d: &dyn Driver,
    dt: Dt,
    (dx, dx_rs): (DevPtr, usize),
    (x, x_rs): (DevPtr, usize),
    rows: usize,
    c: usize,
    (alpha, beta): (DevPtr, DevPtr),
) -> Result<()> {
    launch(
        d,
        &kname("bn_grad_fix_bwd", dt),
        ew_grid(rows * c),
        [256, 1, 1],
        0,
        vec![
            A::P(dx),
            i(dx_rs),
            A::P(x),
            i(x_rs),
            i(rows),
            i(c),
            A::P(alpha),
            A::P(beta),
        ],
    )
}

/// `scale, shift: [c]` f32 of a BN from `gamma, beta` (params) and `mean, var`; in training
/// (`running = Some((run_mean, run_var, count))`) also updates the running statistics with this
/// batch of `count` values per channel (PyTorch: momentum 0.1, unbiased variance). With
/// `pending = Some((sums, p))` (training only) the statistics of the last `p` channels are first
/// computed from `sums: [2, p]` f32, the per-channel sum and sum of squares over `count` rows that
/// a tensor-core convolution's epilogue accumulated (mean = Σx / count, var = Σx² / count −
/// mean²), stored into `mean, var`, and the sums zeroed for the next epilogue.
#[allow(clippy::too_many_arguments)]
pub fn bn_coeffs(
    d: &dyn Driver,
    gamma: DevPtr,
    beta: DevPtr,
    mean: DevPtr,
    var: DevPtr,
    running: Option<(DevPtr, DevPtr, usize)>,
    pending: Option<(DevPtr, usize)>,
    c: usize,
    scale: DevPtr,
    shift: DevPtr,
) -> Result<()> {
    let (rm, rv, count) = running.unwrap_or((0, 0, 2));
    let unbias = count as f64 / (count.max(2) - 1) as f64;
    let (sums, p) = pending.unwrap_or((0, 0));
    if pending.is_some() && (running.is_none() || p > c) {
        bail!(
            "BN statistics from sums need the batch's row count and at most {c} channels, not {p}"
        );
    }
    launch(
        d,
        "bn_coeffs_fwd_f32",
        [blocks_for(c, 128), 1, 1],
        [128, 1, 1],
        0,
        vec![
            A::P(scale),
            A::P(shift),
            A::P(gamma),
            A::P(beta),
            A::P(mean),
            A::P(var),
            A::P(rm),
            A::P(rv),
            A::F(unbias as f32),
            i(c),
            A::P(sums),
            i(count),
            i(p),
        ],
    )
}

/// `y: [rows, c]` (row stride `y_rs`) = `x * scale + shift` (then ReLU if `relu`);
/// `x: [rows, c]` (row stride `x_rs`).
#[allow(clippy::too_many_arguments)]
pub fn bn_act(
    d: &dyn Driver,
    dt: Dt,
    x: DevPtr,
    x_rs: usize,
    rows: usize,
    c: usize,
    (scale, shift): (DevPtr, DevPtr),
    relu: bool,
    y: DevPtr,
    y_rs: usize,
) -> Result<()> {
    launch(
        d,
        &kname("bn_act_fwd", dt),
        ew_grid(rows * c),
        [256, 1, 1],
        0,
        vec![
            A::P(y),
            i(y_rs),
            A::P(x),
            i(x_rs),
            i(rows),
            i(c),
            A::P(scale),
            A::P(shift),
            A::I(relu as i32),
        ],
    )
}

/// What a BN backward reads: the forward input `x: [rows, c]` (row stride `rs`), the
/// statistics it normalised with (`mean, var: [c]`) and its `(scale, shift): [c]`.
#[derive(Clone, Copy, Debug)]
pub struct BnSaved {
    pub x: DevPtr,
    pub rs: usize,
    pub rows: usize,
    pub c: usize,
    pub mean: DevPtr,
    pub var: DevPtr,
    pub scale: DevPtr,
    pub shift: DevPtr,
}

/// Backward of BN (batch statistics if `train`, else running) followed by ReLU if `relu`:
/// `dgamma, dbeta: [c]` f32 += ...; `dx: [rows, c]` (row stride `dx_rs`) overwritten, or added
/// to if `accumulate`, from `dy: [rows, c]` (row stride `dy_rs`). `part`: scratch of
/// [`bn_scratch_len`]`(c)` f32; `coef`: scratch of `2c` f32.
#[allow(clippy::too_many_arguments)]
pub fn bn_bwd(
    d: &dyn Driver,
    dt: Dt,
    s: BnSaved,
    relu: bool,
    train: bool,
    dy: DevPtr,
    dy_rs: usize,
    dbn: (DevPtr, DevPtr),
    dx: DevPtr,
    dx_rs: usize,
    accumulate: bool,
    (part, coef): (DevPtr, DevPtr),
) -> Result<()> {
    bn_bwd_reduce(d, dt, s, relu, (dy, dy_rs), dbn, (part, coef), None)?;
    bn_bwd_dx(
        d, dt, s, relu, train, dy, dy_rs, dx, dx_rs, accumulate, coef,
    )
}

/// [`bn_bwd`] in training with ReLU, its input gradient's per-channel terms deferred as
/// [`bn_bwd_defer`] does (added to `alpha, beta: [c]` f32 for [`bn_grad_fix`]): `dx` (row stride
/// `dx_rs`) overwritten, or added to if `accumulate`, with `scale · mask · dy` only.
#[allow(clippy::too_many_arguments)]
pub fn bn_bwd_deferred(
    d: &dyn Driver,
    dt: Dt,
    s: BnSaved,
    (dy, dy_rs): (DevPtr, usize),
    dbn: (DevPtr, DevPtr),
    (dx, dx_rs, accumulate): (DevPtr, usize, bool),
    part: DevPtr,
    corr: (DevPtr, DevPtr),
) -> Result<()> {
    bn_bwd_reduce(d, dt, s, true, (dy, dy_rs), dbn, (part, 0), Some(corr))?;
    // The eval-mode formula is exactly the per-element term: scale · mask · dy.
    bn_bwd_dx(d, dt, s, true, false, dy, dy_rs, dx, dx_rs, accumulate, 0)
}

/// The reductions of a BN backward: `dgamma, dbeta` +=, and `coef` (or, deferred, `alpha, beta`
/// +=) from `dy`.
#[allow(clippy::too_many_arguments)]
fn bn_bwd_reduce(
    d: &dyn Driver,
    dt: Dt,
    s: BnSaved,
    relu: bool,
    (dy, dy_rs): (DevPtr, usize),
    (dgamma, dbeta): (DevPtr, DevPtr),
    (part, coef): (DevPtr, DevPtr),
    defer: Option<(DevPtr, DevPtr)>,
) -> Result<()> {
    let p = bn_chunks(s.rows);
    launch(
        d,
        &kname("bn_bwd_part", dt),
        [blocks_for(s.c, 32), p as u32, 1],
        [32, 8, 1],
        (8 * 33 * 4) as u32,
        vec![
            A::P(part),
            A::P(s.x),
            i(s.rs),
            A::P(dy),
            i(dy_rs),
            i(s.rows),
            i(s.c),
            A::P(s.scale),
            A::P(s.shift),
            A::P(s.mean),
            A::I(relu as i32),
        ],
    )?;
    let (alpha, beta) = defer.unwrap_or((0, 0));
    launch(
        d,
        "bn_bwd_merge_f32",
        [blocks_for(s.c, 128), 1, 1],
        [128, 1, 1],
        0,
        vec![
            A::P(coef),
            A::P(dgamma),
            A::P(dbeta),
            A::P(part),
            A::P(s.var),
            i(s.rows),
            i(s.c),
            i(p),
            A::P(alpha),
            A::P(beta),
            A::P(s.scale),
            A::P(s.mean),
        ],
    )
}

/// The elementwise part of [`bn_bwd`]: `dx` (+)= from `dy` and `coef: [2, c]` f32 (the merged
/// per-channel reductions).
#[allow(clippy::too_many_arguments)]
fn bn_bwd_dx(
    d: &dyn Driver,
    dt: Dt,
    s: BnSaved,
    relu: bool,
    train: bool,
    dy: DevPtr,
    dy_rs: usize,
    dx: DevPtr,
    dx_rs: usize,
    accumulate: bool,
    coef: DevPtr,
) -> Result<()> {
    launch(
        d,
        &kname("bn_bwd_dx", dt),
        ew_grid(s.rows * s.c),
        [256, 1, 1],
        0,
        vec![
            A::P(dx),
            i(dx_rs),
            A::I(accumulate as i32),
            A::P(s.x),
            i(s.rs),
            A::P(dy),
            i(dy_rs),
            i(s.rows),
            i(s.c),
            A::P(s.scale),
            A::P(s.shift),
            A::P(s.mean),
            A::P(coef),
            A::I(relu as i32),
            A::I(train as i32),
        ],
    )
}

/// Training-mode BN backward whose per-channel reductions a data-gradient convolution already
/// summed (`red: [2, c]` f32 = Σdz, Σdz·x; `ops_tc::conv_bwd_data`; left zeroed), as was its ReLU
/// mask: `dz` (`[rows, c]`, row stride `dz_rs`) is the masked gradient of the BN output.
/// `dgamma, dbeta: [c]` f32 += ...; `dx` (row stride `dx_rs`) overwritten, or added to if
/// `accumulate`. `coef`: scratch of `2c` f32.
#[allow(clippy::too_many_arguments)]
pub fn bn_bwd_from_sums(
    d: &dyn Driver,
    dt: Dt,
    s: BnSaved,
    red: DevPtr,
    dz: DevPtr,
    dz_rs: usize,
    (dgamma, dbeta): (DevPtr, DevPtr),
    dx: DevPtr,
    dx_rs: usize,
    accumulate: bool,
    coef: DevPtr,
) -> Result<()> {
    launch(
        d,
        "bn_bwd_merge_sums_f32",
        [blocks_for(s.c, 128), 1, 1],
        [128, 1, 1],
        0,
        vec![
            A::P(coef),
            A::P(dgamma),
            A::P(dbeta),
            A::P(red),
            A::P(s.mean),
            A::P(s.var),
            i(s.rows),
            i(s.c),
        ],
    )?;
    bn_bwd_dx(
        d, dt, s, false, true, dz, dz_rs, dx, dx_rs, accumulate, coef,
    )
}

/// `y: [n, ho, wo, x.c]` (row stride `y_rs`) = max pool 3×3/2 pad 1 of pre(x) (`x` contiguous:
/// rs = c); `pre`: a BN + ReLU's (scale, shift) `[x.c]` f32 applied as `x` is read (the stem's
/// norm0 + relu0, never stored), or None.
pub fn maxpool_fwd(
    d: &dyn Driver,
    dt: Dt,
    x: View,
    pre: Option<(DevPtr, DevPtr)>,
    y: DevPtr,
    y_rs: usize,
) -> Result<()> {
    let (ho, wo) = crate::ops::pool::maxpool_out(x.h, x.w);
    let [s, t] = pre_args(pre);
    launch(
        d,
        &kname("maxpool_fwd", dt),
        ew_grid(x.n * ho * wo * x.c),
        [256, 1, 1],
        0,
        vec![
            A::P(y),
            i(y_rs),
            A::P(x.ptr),
            i(x.n),
            i(x.h),
            i(x.w),
            i(x.c),
            s,
            t,
        ],
    )
}

/// `dx: [n, h, w, c]` (contiguous, overwritten): the gradient of pre(x) (not through the BN +
/// ReLU) from `dy: [n, ho, wo, c]` (row stride `dy_rs`); `x` and `pre` as in the forward.
pub fn maxpool_bwd(
    d: &dyn Driver,
    dt: Dt,
    x: View,
    pre: Option<(DevPtr, DevPtr)>,
    dy: DevPtr,
    dy_rs: usize,
    dx: DevPtr,
) -> Result<()> {
    let [s, t] = pre_args(pre);
    launch(
        d,
        &kname("maxpool_bwd", dt),
        ew_grid(x.rows() * x.c),
        [256, 1, 1],
        0,
        vec![
            A::P(dx),
            A::P(x.ptr),
            A::P(dy),
            i(dy_rs),
            i(x.n),
            i(x.h),
            i(x.w),
            i(x.c),
            s,
            t,
        ],
    )
}

/// `y: [n, h/2, w/2, x.c]` (row stride `y_rs`) = avg pool 2×2/2 of pre(x).
pub fn avgpool_fwd(
    d: &dyn Driver,
    dt: Dt,
    x: View,
    pre: Option<(DevPtr, DevPtr)>,
    y: DevPtr,
    y_rs: usize,
) -> Result<()> {
    let [s, t] = pre_args(pre);
    launch(
        d,
        &kname("avgpool_fwd", dt),
        ew_grid(x.n * (x.h / 2) * (x.w / 2) * x.c),
        [256, 1, 1],
        0,
        vec![
            A::P(y),
            i(y_rs),
            A::P(x.ptr),
            i(x.rs),
            i(x.n),
            i(x.h),
            i(x.w),
            i(x.c),
            s,
            t,
        ],
    )
}

/// `dx: [n, h, w, c]` (contiguous, overwritten) from `dy: [n, h/2, w/2, c]` (row stride `dy_rs`).
#[allow(clippy::too_many_arguments)]
pub fn avgpool_bwd(
    d: &dyn Driver,
    dt: Dt,
    (n, h, w, c): (usize, usize, usize, usize),
    dy: DevPtr,
    dy_rs: usize,
    dx: DevPtr,
) -> Result<()> {
    launch(
        d,
        &kname("avgpool_bwd", dt),
        ew_grid(n * h * w * c),
        [256, 1, 1],
        0,
        vec![A::P(dx), A::P(dy), i(dy_rs), i(n), i(h), i(w), i(c)],
    )
}

/// `feat: [n, c]` f32 = mean over the `hw` pixels of `x: [n, hw, c]` (contiguous).
pub fn gap_fwd(
    d: &dyn Driver,
    dt: Dt,
    x: DevPtr,
    n: usize,
    hw: usize,
    c: usize,
    feat: DevPtr,
) -> Result<()> {
    launch(
        d,
        &kname("gap_fwd", dt),
        ew_grid(n * c),
        [256, 1, 1],
        0,
        vec![A::P(feat), A::P(x), i(n), i(hw), i(c)],
    )
}

/// `dx: [n, hw, c]` (contiguous, overwritten) from `dfeat: [n, c]` f32.
pub fn gap_bwd(
    d: &dyn Driver,
    dt: Dt,
    dfeat: DevPtr,
    n: usize,
    hw: usize,
    c: usize,
    dx: DevPtr,
) -> Result<()> {
    launch(
        d,
        &kname("gap_bwd", dt),
        ew_grid(n * hw * c),
        [256, 1, 1],
        0,
        vec![A::P(dx), A::P(dfeat), i(n), i(hw), i(c)],
    )
}

/// `logits: [n]` f32 = `feat: [n, c]` · `wt: [c]` + `bias: [1]`.
pub fn linear_fwd(
    d: &dyn Driver,
    feat: DevPtr,
    n: usize,
    c: usize,
    wt: DevPtr,
    bias: DevPtr,
    logits: DevPtr,
) -> Result<()> {
    launch(
        d,
        "linear_fwd_f32",
        [n as u32, 1, 1],
        [256, 1, 1],
        0,
        vec![A::P(logits), A::P(feat), A::P(wt), A::P(bias), i(c)],
    )
}

/// `dfeat: [n, c]` f32 (overwritten); `dw: [c]`, `db: [1]` f32 added to; from `dlogits: [n]`.
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd(
    d: &dyn Driver,
    feat: DevPtr,
    n: usize,
    c: usize,
    wt: DevPtr,
    dlogits: DevPtr,
    (dw, db): (DevPtr, DevPtr),
    dfeat: DevPtr,
) -> Result<()> {
    launch(
        d,
        "linear_bwd_f32",
        [blocks_for(c, 128), 1, 1],
        [128, 1, 1],
        0,
        vec![
            A::P(dfeat),
            A::P(dw),
            A::P(db),
            A::P(feat),
            A::P(wt),
            A::P(dlogits),
            i(n),
            i(c),
        ],
    )
}

/// `y: [len]` bf16 = `x: [len]` f32, rounded to nearest even.
pub fn cast_bf16(d: &dyn Driver, x: DevPtr, len: usize, y: DevPtr) -> Result<()> {
    launch(
        d,
        "cast_fwd_bf16",
        ew_grid(len),
        [256, 1, 1],
        0,
        vec![A::P(y), A::P(x), i(len)],
    )
}

/// One torch.optim.Adam step over flat f32 buffers `params, grads, m, v: [n]` with the
/// hyper-parameters and step count of `adam` (already incremented for this step).
pub fn adam(
    d: &dyn Driver,
    adam: &crate::optim::Adam,
    n: usize,
    (params, grads, m, v): (DevPtr, DevPtr, DevPtr, DevPtr),
) -> Result<()> {
    let t = adam.step as i32;
    let (bc1, bc2) = (1.0 - adam.beta1.powi(t), 1.0 - adam.beta2.powi(t));
    let f = |x: f64| A::F(x as f32);
    launch(
        d,
        "adam_fwd_f32",
        ew_grid(n),
        [256, 1, 1],
        0,
        vec![
            A::P(params),
            A::P(grads),
            A::P(m),
            A::P(v),
            i(n),
            f(adam.lr),
            f(adam.beta1),
            f(1.0 - adam.beta1),
            f(adam.beta2),
            f(1.0 - adam.beta2),
            f(adam.eps),
            f(adam.weight_decay),
            f(bc1),
            f(bc2),
        ],
    )
}

/// Device-side augmentation, identical to `data::loader::augment_image` on each image:
/// `out: [n, out_size, out_size, 3]` (dt, normalised NHWC) from the store's
/// `src: [n, src_size, src_size]` u8 images, image `i` flipped and rotated by `params[i]`.
/// `steps`: scratch of `[n, 4]` f32 for the per-image source steps.
#[allow(clippy::too_many_arguments)]
pub fn augment(
    d: &dyn Driver,
    dt: Dt,
    src: DevPtr,
    src_size: usize,
    params: &[crate::data::loader::AugParams],
    out_size: usize,
    steps: DevPtr,
    out: DevPtr,
) -> Result<()> {
    use crate::data::image::{MEAN, STD};
    // The same f32 arithmetic as augment_image.
    let scale = src_size as f32 / out_size as f32;
    let host: Vec<f32> = params
        .iter()
        .flat_map(|p| {
            let (sin, cos) = (p.angle_deg.to_radians()).sin_cos();
            let sign = if p.flip { -1.0f32 } else { 1.0 };
            [
                sign * scale * cos,
                -scale * sin,
                sign * scale * sin,
                scale * cos,
            ]
        })
        .collect();
    d.htod(steps, bytemuck::cast_slice(&host))?;
    let a: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * STD[c]));
    let b: [f32; 3] = std::array::from_fn(|c| -MEAN[c] / STD[c]);
    let mut args = vec![
        A::P(out),
        A::P(src),
        A::P(steps),
        i(params.len()),
        i(src_size),
        i(out_size),
    ];
    args.extend(a.iter().chain(&b).map(|&v| A::F(v)));
    launch(
        d,
        &kname("augment_fwd", dt),
        [blocks_for(params.len() * out_size, 64), 1, 1],
        [64, 1, 1],
        0,
        args,
    )
}
