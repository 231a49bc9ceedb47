//! Tensor-core convolutions (kernels/conv_tc.cu; CPU reference `crate::ops::conv`): the dense
//! layers' 1×1/1 pad 0 and 3×3/1 pad 1 (forward, data gradient, weight gradient), and any other
//! window's forward and weight gradient (the stem's 7×7/2 pad 3), bf16 activations and weights,
//! f32 accumulation, NHWC, with the BN + ReLU in front of each convolution fused into its loads.
//! Inputs may be channel prefixes, outputs channel slices of wider buffers. Every launch is a
//! programmatic dependent one ([`crate::gpu::Launch::pdl`]): the kernels wait for the previous
//! kernel before their first load.

use super::bn::{CoefPtrs, CoefStep};
use super::{dims_are, pre_ptrs, BnRelu, ConvIn, DataOut};
use crate::consts::*;
use crate::gpu::error::bail_shape;
use crate::gpu::kernels::launch as k;
use crate::gpu::{blocks_for, Driver, Launch, Nhwc, Ptr, Slice};
use crate::ops::conv::Conv;
use crate::ops::Write;
use anyhow::Result;
use half::bf16;

/// A block tile: `bm × bn` outputs, `threads` threads (kernels/consts.cuh).
#[derive(Clone, Copy, Debug)]
struct Tile {
    bm: usize,
    bn: usize,
    threads: u32,
    /// Dynamic shared bytes of this tile's forward and weight gradient (kernels/consts.cuh).
    fwd_shared: u32,
    wt_shared: u32,
}

impl Tile {
    const fn new(bm: usize, bn: usize, wm: usize, wn: usize, shared: [usize; 2]) -> Tile {
        Tile {
            bm,
            bn,
            threads: (wm * wn * 32) as u32,
            fwd_shared: shared[0] as u32,
            wt_shared: shared[1] as u32,
        }
    }
}

/// The 1×1 forward, both data gradients, the 1×1 weight gradient.
const WIDE: Tile = Tile::new(
    TC_WIDE_BM,
    TC_WIDE_BN,
    TC_WIDE_WM,
    TC_WIDE_WN,
    [TC_SHARED_FWD_WIDE, TC_SHARED_BWD_WEIGHT_WIDE],
);
/// The 3×3 forward and weight gradient (N = growth 32).
const NARROW: Tile = Tile::new(
    TC_NARROW_BM,
    TC_NARROW_BN,
    TC_NARROW_WM,
    TC_NARROW_WN,
    [TC_SHARED_FWD_NARROW, TC_SHARED_BWD_WEIGHT_NARROW],
);
/// The any-window kernels (the stem's 64 outputs).
const ANY: Tile = Tile::new(
    TC_ANY_BM,
    TC_ANY_BN,
    TC_ANY_WM,
    TC_ANY_WN,
    [TC_SHARED_FWD_ANY, TC_SHARED_BWD_WEIGHT_ANY],
);

/// Which kernels a window goes to: the dense layers' 1×1/1 pad 0 and 3×3/1 pad 1 (tiled loads,
/// split-K forwards, data gradients), or the any-window ones (element-by-element loads; forward and
/// weight gradient only), which the stem (7×7/2 pad 3 on 3 channels) needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernels {
    Conv1x1,
    Conv3x3,
    AnyWindow,
}

fn kernels_for(g: Conv) -> Kernels {
    match g {
        Conv::POINTWISE => Kernels::Conv1x1,
        Conv::CONV3 => Kernels::Conv3x3,
        _ => Kernels::AnyWindow,
    }
}

/// The dense-layer kernels, or an error naming what `what` cannot take.
fn dense_kernels(g: Conv, what: &str) -> Result<Kernels> {
    match kernels_for(g) {
        Kernels::AnyWindow => bail_shape!(
            "{what} takes 1x1/1 pad 0 or 3x3/1 pad 1, not {}x{}/{} pad {}",
            g.k,
            g.k,
            g.stride,
            g.pad
        ),
        kernels => Ok(kernels),
    }
}

/// The tile of geometry `g`'s forward and weight gradient.
fn tile_of(g: Conv) -> Tile {
    match kernels_for(g) {
        Kernels::Conv1x1 => WIDE,
        Kernels::Conv3x3 => NARROW,
        Kernels::AnyWindow => ANY,
    }
}

impl Tile {
    /// Blocks of this tile an SM holds at once (`__launch_bounds__` in kernels/conv_tc.cu: the
    /// 256-thread tiles 2, the 128-thread ones 4).
    fn per_sm(self) -> usize {
        match self.threads {
            256 => 2,
            _ => 4,
        }
    }
}

/// Elements (a multiple of `TC_BK`) per chunk of a split-K reduction of `k_len` elements over a
/// grid of `tiles` output tiles whose kernel keeps `per_sm` blocks on an SM, on a device of `sms`
/// SMs: the whole reduction when the tiles fill a wave (`per_sm · sms` blocks) already; else the
/// longest chunks that do, at least `min` K-slices long; shorter only where `min`-slice chunks
/// would leave fewer blocks than SMs, then the longest chunks that give a block per SM (down to
/// one K-slice).
pub fn split_len(k_len: usize, tiles: usize, per_sm: usize, sms: usize, min: usize) -> usize {
    let slices = k_len.div_ceil(TC_BK).max(1);
    let tiles = tiles.max(1);
    let blocks = |len: usize| tiles * slices.div_ceil(len);
    // The longest chunk (in K-slices) whose grid has at least `want` blocks.
    let longest = |want: usize| match want.div_ceil(tiles) {
        0 | 1 => Some(slices),
        s if s > slices => None,
        s => Some((slices - 1) / (s - 1)),
    };
    let min = min.clamp(1, slices);
    let len = match longest(per_sm * sms) {
        Some(len) if len >= min => len,
        _ if blocks(min) >= sms => min,
        _ => longest(sms).unwrap_or(1),
    };
    len * TC_BK
}

/// The shortest split-K chunks of the forwards and data gradients, in K-slices, unless the grid
/// would not reach one block per SM otherwise.
const MIN_SLICES: usize = 4;
/// ... of the weight gradients: 512 pixels.
const MIN_WEIGHT_SLICES: usize = 16;

/// Output tiles of a forward of geometry `g` over `[rows, co]`.
pub fn fwd_tiles(rows: usize, co: usize, g: Conv) -> usize {
    let t = tile_of(g);
    rows.div_ceil(t.bm) * co.div_ceil(t.bn)
}

/// Output tiles of a data gradient over `[rows, ci]`.
pub fn data_tiles(rows: usize, ci: usize) -> usize {
    rows.div_ceil(WIDE.bm) * ci.div_ceil(WIDE.bn)
}

/// The K-chunk of a dense-layer forward of `rows` pixels × `co` channels (`c` inputs, geometry
/// `g`) on a device of `sms` SMs ([`split_len`]): the whole reduction when its grid fills it.
pub fn fwd_split_len(rows: usize, c: usize, co: usize, g: Conv, sms: usize) -> usize {
    let tiles = fwd_tiles(rows, co, g);
    split_len(g.k * g.k * c, tiles, tile_of(g).per_sm(), sms, MIN_SLICES)
}

/// The K-chunk of a data gradient of `rows` pixels × `ci` channels from `co` output channels.
pub fn data_split_len(rows: usize, ci: usize, co: usize, g: Conv, sms: usize) -> usize {
    let tiles = data_tiles(rows, ci);
    split_len(g.k * g.k * co, tiles, WIDE.per_sm(), sms, MIN_SLICES)
}

/// Pixels per split-K chunk of a weight gradient over `pixels` pixels with `tiles` output tiles
/// of `g`'s tile ([`split_len`]: chunks of at least 512 pixels where the grid allows).
pub fn weight_split_len(pixels: usize, tiles: usize, g: Conv, sms: usize) -> usize {
    split_len(pixels, tiles, tile_of(g).per_sm(), sms, MIN_WEIGHT_SLICES)
}

/// The split-K workspace of the forwards and data gradients: `ws` f32 partial sums (at least the
/// launch's `[rows, n]` output) and `tiles`, one arrival count per output tile; both zero, and
/// left zero by every launch that uses them.
#[derive(Clone, Copy, Debug)]
pub struct SplitK {
    pub ws: Slice<f32>,
    pub tiles: Slice<u32>,
}

/// A split-K chunk of `len` elements, checked, with the workspace's pointers for a `[rows, n]`
/// output of `tiles` tiles; or none (`len` covers `k_len`, or no split): the whole reduction.
fn chunking(
    split: Option<(SplitK, usize)>,
    k_len: usize,
    (rows, n, tiles): (usize, usize, usize),
) -> Result<(Ptr<f32>, Ptr<u32>, usize)> {
    match split {
        Some((_, len)) if len == 0 || !len.is_multiple_of(TC_BK) => {
            bail_shape!("split-K chunk of {len} is not a positive multiple of {TC_BK}")
        }
        Some((w, len)) if len < k_len => Ok((
            w.ws.expect(rows * n, "the split-K workspace")?.ptr(),
            w.tiles.expect(tiles, "the split-K tile counts")?.ptr(),
            len,
        )),
        _ => Ok((Ptr::NULL, Ptr::NULL, k_len.max(1))),
    }
}

/// Where a forward puts its output: `y`, and (optionally) the statistics of what it stored and the
/// coefficients of the BN that reads it next ([`fwd`]).
#[derive(Clone, Copy, Debug)]
pub struct FwdOut {
    pub y: Nhwc<bf16>,
    pub stats: Option<Slice<f32>>,
    pub next: Option<CoefStep>,
}

impl FwdOut {
    /// `y` alone.
    pub fn plain(y: Nhwc<bf16>) -> FwdOut {
        FwdOut {
            y,
            stats: None,
            next: None,
        }
    }
}

/// `out.y: [n, ho, wo, co] = conv(pre(x), w)`, `w: [k, k, x.c, co]` bf16. `out.stats: [2, co]` f32,
/// when given, has the per-channel Σy and Σy² of the stored `y` added to it (batch statistics of the BN
/// that reads these channels next, without a pass over them; f32 sums, fine for conv outputs, whose
/// mean is small next to their spread). `split`, when given, lets a dense-layer grid too small to
/// fill the device split its reduction ([`fwd_split_len`]), finished in the same launch. Other
/// windows (the stem) never split. `out.next` (with `stats`): the coefficients of the BN that reads `y`
/// next, finished in the same launch ([`CoefStep`]).
pub fn fwd(d: &dyn Driver, conv: ConvIn<bf16>, out: FwdOut, split: Option<SplitK>) -> Result<()> {
    if kernels_for(conv.g) == Kernels::AnyWindow {
        return fwd_any(d, conv, out);
    }
    let len = fwd_split_len(conv.x.rows(), conv.x.c(), out.y.c(), conv.g, d.sms());
    fwd_split(d, conv, out, split.map(|s| (s, len)))
}

/// The checked operands every forward shares: `(scale, shift, stats)` pointers.
fn fwd_operands(conv: ConvIn<bf16>, out: FwdOut) -> Result<[Ptr<f32>; 3]> {
    let ConvIn { x, pre, w: wt, g } = conv;
    let (n, h, w, c) = x.dims();
    let (y, co) = (out.y, out.y.c());
    g.check(h, w)?;
    let (ho, wo) = g.out_hw(h, w);
    dims_are("the convolution's output", y, (n, ho, wo, co))?;
    wt.expect(g.k * g.k * c * co, "the convolution's weights")?;
    let (scale, shift) = pre_ptrs(pre, c)?;
    let stats = match out.stats {
        Some(s) => s.expect(2 * co, "the output statistics")?.ptr(),
        None => Ptr::NULL,
    };
    Ok([scale, shift, stats])
}

/// [`fwd`] of any window (`convkxk_tc_fwd_bf16`), never split.
fn fwd_any(d: &dyn Driver, conv: ConvIn<bf16>, out: FwdOut) -> Result<()> {
    let [scale, shift, stats] = fwd_operands(conv, out)?;
    let ConvIn { x, w: wt, g, .. } = conv;
    let (n, h, w, c) = x.dims();
    let y = out.y;
    let p = CoefPtrs::of(out.next, (y.rows(), y.c()), stats.addr() != 0)?;
    let at = Launch {
        grid: [
            blocks_for(y.rows(), ANY.bm as u32),
            blocks_for(y.c(), ANY.bn as u32),
            1,
        ],
        block: [ANY.threads, 1, 1],
        shared: ANY.fwd_shared,
        pdl: true,
    };
    let (ys, xs, co) = (y.rs(), x.rs(), y.c());
    // SAFETY: x, y are checked views of the shapes the kernel reads and writes; wt, the BN's
    // coefficients and stats are checked to cover them.
    unsafe {
        k::convkxk_tc_fwd_bf16(
            d,
            at,
            y.ptr(),
            ys,
            x.ptr(),
            xs,
            wt.ptr(),
            scale,
            shift,
            n,
            h,
            w,
            c,
            co,
            g.k,
            g.stride,
            g.pad,
            stats,
            p.gamma,
            p.beta,
            p.mean,
            p.var,
            p.run_mean,
            p.run_var,
            p.unbias,
            p.c,
            p.scale,
            p.shift,
            p.done,
        )
    }
}

/// A dense-layer [`fwd`] with the reduction split into chunks of `split = Some((workspace, len))`
/// (`len` a positive multiple of `TC_BK`; whole when `len` covers it), or whole.
pub fn fwd_split(
    d: &dyn Driver,
    conv: ConvIn<bf16>,
    out: FwdOut,
    split: Option<(SplitK, usize)>,
) -> Result<()> {
    let kernels = dense_kernels(conv.g, "a split tensor-core forward")?;
    let [scale, shift, stats_ptr] = fwd_operands(conv, out)?;
    let ConvIn { x, w: wt, g, .. } = conv;
    let (n, h, w, c) = x.dims();
    let (y, rows, co) = (out.y, x.rows(), out.y.c());
    let p = CoefPtrs::of(out.next, (rows, co), stats_ptr.addr() != 0)?;
    let k_len = g.k * g.k * c;
    let t = tile_of(g);
    let grid = [blocks_for(rows, t.bm as u32), blocks_for(co, t.bn as u32)];
    let tiles = grid[0] as usize * grid[1] as usize;
    let (ws, counts, split_len) = chunking(split, k_len, (rows, co, tiles))?;
    let at = Launch {
        grid: [grid[0], grid[1], blocks_for(k_len, split_len as u32)],
        block: [t.threads, 1, 1],
        shared: t.fwd_shared,
        pdl: true,
    };
    let (ys, xs, wt) = (y.rs(), x.rs(), wt.ptr());
    let args = (y.ptr(), ys, x.ptr(), xs, wt, scale, shift);
    // SAFETY: x, y are checked views of the shapes the kernel reads and writes; wt, the BN's
    // coefficients, stats and the workspace are checked to cover them.
    unsafe {
        let (yp, ys, xp, xs, wt, s, t) = args;
        let (st, sl) = (stats_ptr, split_len);
        match kernels {
            Kernels::Conv1x1 => k::conv1x1_tc_fwd_bf16(
                d, at, yp, ys, xp, xs, wt, s, t, n, h, w, c, co, st, p.gamma, p.beta, p.mean,
                p.var, p.run_mean, p.run_var, p.unbias, p.c, p.scale, p.shift, p.done, ws, counts,
                sl,
            ),
            _ => k::conv3x3_tc_fwd_bf16(
                d, at, yp, ys, xp, xs, wt, s, t, n, h, w, c, co, st, p.gamma, p.beta, p.mean,
                p.var, p.run_mean, p.run_var, p.unbias, p.c, p.scale, p.shift, p.done, ws, counts,
                sl,
            ),
        }
    }
}

/// The ReLU mask of the BN + ReLU in front of a convolution, for its data gradient: the BN's
/// pre-BN input `x` and its coefficients.
#[derive(Clone, Copy, Debug)]
pub struct Mask {
    pub x: Nhwc<bf16>,
    pub bn: BnRelu,
}

/// The per-channel step of the BN backward whose reductions a masked data gradient sums, finished
/// by the launch's last block (no launch of its own): from `red` (Σg, Σg·x over the batch) and the
/// BN's batch `stats`, `dparams` += (Σg·(x − mean) · invstd, Σg), then `out`. `done`: one `u32`,
/// zero, left zero (the launch's count of finished blocks). `red` is left zero.
#[derive(Clone, Copy, Debug)]
pub struct BnStep {
    pub stats: super::bn::Stats,
    pub dparams: super::bn::Affine,
    pub out: StepOut,
    pub done: Slice<u32>,
}

/// Where a [`BnStep`] puts the rest of the BN backward.
#[derive(Clone, Copy, Debug)]
pub enum StepOut {
    /// `coef: [2, ci]` f32 = (a, b) with a = Σg / rows, b = Σg·(x − mean) / (var + eps) / rows,
    /// for `bn::backward_from_coef`.
    Coef(Slice<f32>),
    /// The per-channel terms of the input gradient, `alpha += −post · (a − mean · b)`, `beta +=
    /// −post · b` (`post`: the BN's scale, which `dx` was multiplied by), for `bn::grad_fix`.
    Deferred(super::bn::Deferred),
}

/// The kernel's pointers for `step` over `ci` channels (all null: none).
type StepPtrs = (
    Ptr<f32>,
    Ptr<f32>,
    Ptr<f32>,
    Ptr<f32>,
    Ptr<f32>,
    Ptr<f32>,
    Ptr<f32>,
    Ptr<u32>,
);

/// The pointers of `step` over `ci` channels; a deferred step needs the factors `post`.
fn step_ptrs(step: Option<BnStep>, ci: usize, post: Option<Slice<f32>>) -> Result<StepPtrs> {
    let Some(s) = step else {
        let z = Ptr::NULL;
        return Ok((z, z, z, z, z, z, z, Ptr::NULL));
    };
    let (coef, (alpha, beta)) = match s.out {
        StepOut::Coef(c) => (
            c.expect(2 * ci, "the BN coefficients")?.ptr(),
            (Ptr::NULL, Ptr::NULL),
        ),
        StepOut::Deferred(_) if post.is_none() => {
            bail_shape!("a deferred BN step needs the BN's scale as the factors (post)")
        }
        StepOut::Deferred(def) => (Ptr::NULL, def.ptrs(ci)?),
    };
    let (dgamma, dbeta) = s.dparams.ptrs(ci)?;
    let (mean, var) = s.stats.ptrs(ci)?;
    let done = s.done.expect(1, "the BN step's block count")?.ptr();
    Ok((coef, alpha, beta, dgamma, dbeta, mean, var, done))
}

/// What a data gradient folds in of the BN + ReLU in front of its convolution (all none: nothing,
/// the plain data gradient). See [`bwd_data`].
#[derive(Clone, Copy, Debug, Default)]
pub struct BnBackward {
    /// The ReLU mask `[x · scale + shift > 0]` the gradient is multiplied by.
    pub mask: Option<Mask>,
    /// `[2, ci]` f32 (with a mask): the per-channel Σg and Σg·x are added to it.
    pub red: Option<Slice<f32>>,
    /// `[ci]` f32 per-channel factors the result is multiplied by (none: 1).
    pub post: Option<Slice<f32>>,
    /// (With `red`) the BN backward's per-channel step, finished in the same launch.
    pub step: Option<BnStep>,
}

/// `out.dx: [n, h, w, ci]` (overwritten or added to) = `post · g`, where `g` is d(loss)/d(conv
/// input) from `dy: [n, h, w, co]` and `wt: [k, k, ci, co]` bf16, rounded to bf16, times the ReLU
/// mask `[x · scale + shift > 0]` when `bn.mask` is given: `g` is then the gradient of the BN's
/// output. `bn.post: [ci]` f32 per-channel factors (None: 1). `bn.red: [2, ci]` f32, when given
/// (with a mask), has the per-channel Σg and Σg·x added to it: that BN's backward reductions,
/// dbeta = Σg and dgamma = (Σg·x − mean·Σg) · invstd. With `post` = the BN's scale and
/// accumulating, `dx` receives the BN backward's per-element term. `bn.step` (with `red`): the BN
/// backward's per-channel step, finished in the same launch ([`BnStep`]). 1×1/1 and 3×3/1 pad 1
/// only. `split`, when given, lets a grid too small to fill the device split its reduction
/// ([`data_split_len`]), finished in the same launch.
pub fn bwd_data(
    d: &dyn Driver,
    dy: Nhwc<bf16>,
    wt: Slice<bf16>,
    g: Conv,
    out: DataOut<bf16>,
    bn: BnBackward,
    split: Option<SplitK>,
) -> Result<()> {
    let (rows, ci, co) = (out.dx.rows(), out.dx.c(), dy.c());
    let len = data_split_len(rows, ci, co, g, d.sms());
    bwd_data_split(d, dy, wt, g, out, bn, split.map(|s| (s, len)))
}

/// [`bwd_data`] with the reduction split into chunks of `split = Some((workspace, len))` (`len`
/// a positive multiple of `TC_BK`; whole when `len` covers it), or whole.
pub fn bwd_data_split(
    d: &dyn Driver,
    dy: Nhwc<bf16>,
    wt: Slice<bf16>,
    g: Conv,
    out: DataOut<bf16>,
    bn: BnBackward,
    split: Option<(SplitK, usize)>,
) -> Result<()> {
    let (dx, accumulate) = (out.dx, out.write == Write::Accumulate);
    let BnBackward {
        mask,
        red,
        post,
        step,
    } = bn;
    let kernels = dense_kernels(g, "the tensor-core data gradient")?;
    let (n, h, w, ci) = dx.dims();
    let co = dy.c();
    dims_are("the convolution's output gradient", dy, (n, h, w, co))?;
    let wt = wt
        .expect(g.k * g.k * ci * co, "the convolution's weights")?
        .ptr();
    if red.is_some() && mask.is_none() {
        bail_shape!("the BN-backward reductions of a data gradient need the BN's input (mask)");
    }
    if step.is_some() && red.is_none() {
        bail_shape!("a BN backward's step in a data gradient needs its reductions (red)");
    }
    let (coef, alpha, beta, dgamma, dbeta, mean, var, done) = step_ptrs(step, ci, post)?;
    let (x, x_rs, (scale, shift)) = match mask {
        Some(m) => {
            dims_are("the ReLU mask's input", m.x, (n, h, w, ci))?;
            (m.x.ptr(), m.x.rs(), m.bn.ptrs(ci)?)
        }
        None => (Ptr::NULL, 0, (Ptr::NULL, Ptr::NULL)),
    };
    let red = match red {
        Some(r) => r.expect(2 * ci, "the BN backward sums")?.ptr(),
        None => Ptr::NULL,
    };
    let post = match post {
        Some(p) => p.expect(ci, "the per-channel factors")?.ptr(),
        None => Ptr::NULL,
    };
    let grid = [
        blocks_for(n * h * w, WIDE.bm as u32),
        blocks_for(ci, WIDE.bn as u32),
    ];
    let tiles = grid[0] as usize * grid[1] as usize;
    let k_len = g.k * g.k * co;
    let (ws, counts, split_len) = chunking(split, k_len, (n * h * w, ci, tiles))?;
    let at = Launch {
        grid: [grid[0], grid[1], blocks_for(k_len, split_len as u32)],
        block: [WIDE.threads, 1, 1],
        shared: TC_SHARED_BWD_DATA as u32,
        pdl: true,
    };
    let (dxp, dxs, dyp, dys) = (dx.ptr(), dx.rs(), dy.ptr(), dy.rs());
    // SAFETY: dx, dy and the mask's x are checked views of the shapes the kernel reads and writes;
    // wt, the BN's coefficients, red, post and the workspace are checked to cover them.
    unsafe {
        let acc = accumulate;
        match kernels {
            Kernels::Conv1x1 => k::conv1x1_tc_bwd_data_bf16(
                d, at, dxp, dxs, acc, dyp, dys, wt, x, x_rs, scale, shift, n, h, w, ci, co, red,
                post, coef, alpha, beta, dgamma, dbeta, mean, var, done, ws, counts, split_len,
            ),
            _ => k::conv3x3_tc_bwd_data_bf16(
                d, at, dxp, dxs, acc, dyp, dys, wt, x, x_rs, scale, shift, n, h, w, ci, co, red,
                post, coef, alpha, beta, dgamma, dbeta, mean, var, done, ws, counts, split_len,
            ),
        }
    }
}

/// `dw: [k, k, x.c, co]` f32 += d(loss)/d(wt) from `dy: [n, ho, wo, co]`, `x` and `pre` as in the
/// forward; split-K by [`weight_split_len`].
pub fn bwd_weight(
    d: &dyn Driver,
    x: Nhwc<bf16>,
    pre: Option<BnRelu>,
    g: Conv,
    dy: Nhwc<bf16>,
    dw: Slice<f32>,
) -> Result<()> {
    let t = tile_of(g);
    let tiles = (g.k * g.k * x.c()).div_ceil(t.bm) * dy.c().div_ceil(t.bn);
    let split_len = weight_split_len(dy.rows(), tiles, g, d.sms());
    bwd_weight_split(d, x, pre, g, dy, dw, split_len)
}

/// [`bwd_weight`] with the pixels split into chunks of `split_len` (a positive multiple of `TC_BK`).
pub fn bwd_weight_split(
    d: &dyn Driver,
    x: Nhwc<bf16>,
    pre: Option<BnRelu>,
    g: Conv,
    dy: Nhwc<bf16>,
    dw: Slice<f32>,
    split_len: usize,
) -> Result<()> {
    g.check(x.h(), x.w())?;
    if split_len == 0 || !split_len.is_multiple_of(TC_BK) {
        bail_shape!("split-K chunk of {split_len} pixels is not a positive multiple of {TC_BK}");
    }
    let (n, h, w, c) = x.dims();
    let co = dy.c();
    let (ho, wo) = g.out_hw(h, w);
    dims_are("the convolution's output gradient", dy, (n, ho, wo, co))?;
    let dw = dw.expect(g.k * g.k * c * co, "the weight gradient")?.ptr();
    let (scale, shift) = pre_ptrs(pre, c)?;
    let t = tile_of(g);
    let at = Launch {
        grid: [
            blocks_for(g.k * g.k * c, t.bm as u32),
            blocks_for(co, t.bn as u32),
            blocks_for(n * ho * wo, split_len as u32),
        ],
        block: [t.threads, 1, 1],
        shared: t.wt_shared,
        pdl: true,
    };
    let (xp, xs, dyp, dys) = (x.ptr(), x.rs(), dy.ptr(), dy.rs());
    // SAFETY: x, dy are checked views of the shapes the kernel reads; dw and the BN's coefficients
    // are checked to cover them.
    unsafe {
        match kernels_for(g) {
            Kernels::Conv1x1 => k::conv1x1_tc_bwd_weight_bf16(
                d, at, dw, xp, xs, scale, shift, dyp, dys, n, h, w, c, co, split_len,
            ),
            Kernels::Conv3x3 => k::conv3x3_tc_bwd_weight_bf16(
                d, at, dw, xp, xs, scale, shift, dyp, dys, n, h, w, c, co, split_len,
            ),
            Kernels::AnyWindow => k::convkxk_tc_bwd_weight_bf16(
                d, at, dw, xp, xs, scale, shift, dyp, dys, n, h, w, c, co, g.k, g.stride, g.pad,
                split_len,
            ),
        }
    }
}
