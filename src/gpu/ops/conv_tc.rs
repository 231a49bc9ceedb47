//! Tensor-core convolutions (kernels/conv_tc.cu; CPU reference `crate::ops::conv`): the dense
//! layers' 1×1/1 pad 0 and 3×3/1 pad 1 (forward, data gradient, weight gradient), and any other
//! window's forward and weight gradient (the stem's 7×7/2 pad 3), bf16 activations and weights,
//! f32 accumulation, NHWC, with the BN + ReLU in front of each convolution fused into its loads.
//! Inputs may be channel prefixes, outputs channel slices of wider buffers.

use super::{dims_are, pre_ptrs, BnRelu};
use crate::consts::*;
use crate::gpu::error::bail_shape;
use crate::gpu::kernels::launch as k;
use crate::gpu::{blocks_for, Driver, Launch, Nhwc, Ptr, Slice};
use crate::ops::conv::Conv;
use anyhow::Result;
use half::bf16;

/// A block tile: `bm × bn` outputs, `threads` threads (kernels/consts.cuh).
#[derive(Clone, Copy, Debug)]
struct Tile {
    bm: usize,
    bn: usize,
    threads: u32,
}

impl Tile {
    const fn new(bm: usize, bn: usize, wm: usize, wn: usize) -> Tile {
        Tile {
            bm,
            bn,
            threads: (wm * wn * 32) as u32,
        }
    }
}

/// The 1×1 forward, both data gradients, the 1×1 weight gradient.
const WIDE: Tile = Tile::new(TC_WIDE_BM, TC_WIDE_BN, TC_WIDE_WM, TC_WIDE_WN);
/// The 3×3 forward and weight gradient (N = growth 32).
const NARROW: Tile = Tile::new(TC_NARROW_BM, TC_NARROW_BN, TC_NARROW_WM, TC_NARROW_WN);
/// The any-window kernels (the stem's 64 outputs).
const ANY: Tile = Tile::new(TC_ANY_BM, TC_ANY_BN, TC_ANY_WM, TC_ANY_WN);

/// Dynamic shared bytes of a tile whose A (B) operand is stored k-contiguous when `a_kc` (`b_kc`):
/// `stages` stages of `[outer][inner + 8]` bf16 per operand (kernels/conv_tc.cu `Smem`).
fn smem(t: Tile, a_kc: bool, b_kc: bool, stages: usize) -> u32 {
    let operand = |outer: usize, kc: bool| match kc {
        true => outer * (TC_BK + 8),
        false => TC_BK * (outer + 8),
    };
    (stages * (operand(t.bm, a_kc) + operand(t.bn, b_kc)) * 2) as u32
}

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

/// Streaming multiprocessors the split-K heuristics aim to fill (an H100 SXM has 132).
const SMS: usize = 132;

/// The K-slice length (a multiple of `TC_BK`) of a split-K forward of `rows` pixels × `co`
/// channels (`c` inputs, geometry `g`): the reduction split so that the grid has about 2 (wide
/// tiles) or 4 (narrow) blocks per SM of a 132-SM GPU, each at least 4 K-slices long; the whole
/// reduction (no split) when the grid is large enough already.
pub fn fwd_split_len(rows: usize, c: usize, co: usize, g: Conv) -> usize {
    let t = tile_of(g);
    let tiles = rows.div_ceil(t.bm) * co.div_ceil(t.bn);
    let per_sm = if t.threads == 256 { 2 } else { 4 };
    let slices = (g.k * g.k * c).div_ceil(TC_BK);
    let splits = (per_sm * SMS).div_ceil(tiles).min(slices / 4).max(1);
    slices.div_ceil(splits) * TC_BK
}

/// `y: [n, ho, wo, co] = conv(pre(x), wt)`, `wt: [k, k, x.c, co]` bf16. `stats: [2, co]` f32, when
/// given, has the per-channel Σy and Σy² of the stored `y` added to it (batch statistics of the BN
/// that reads these channels next, without a pass over them; f32 sums, fine for conv outputs, whose
/// mean is small next to their spread). `ws: [x.rows(), co]` f32, all zero (and left so), when given
/// lets a dense-layer grid too small to fill the GPU split its reduction ([`fwd_split_len`]): partial
/// sums added there, then stored by a finishing kernel. Other windows (the stem) never split.
#[allow(clippy::too_many_arguments)]
pub fn fwd(
    d: &dyn Driver,
    x: Nhwc<bf16>,
    pre: Option<BnRelu>,
    wt: Slice<bf16>,
    g: Conv,
    y: Nhwc<bf16>,
    stats: Option<Slice<f32>>,
    ws: Option<Slice<f32>>,
) -> Result<()> {
    if kernels_for(g) == Kernels::AnyWindow {
        return fwd_any(d, x, pre, wt, g, y, stats);
    }
    let split_len = fwd_split_len(x.rows(), x.c(), y.c(), g);
    let split = ws
        .filter(|_| split_len < g.k * g.k * x.c())
        .map(|ws| (ws, split_len));
    fwd_split(d, x, pre, wt, g, y, stats, split)
}

/// The checked operands every forward shares: `(wt, scale, shift, stats)` pointers.
fn fwd_operands(
    x: Nhwc<bf16>,
    pre: Option<BnRelu>,
    wt: Slice<bf16>,
    g: Conv,
    y: Nhwc<bf16>,
    stats: Option<Slice<f32>>,
) -> Result<[Ptr<f32>; 3]> {
    let (n, h, w, c) = x.dims();
    let co = y.c();
    g.check(h, w)?;
    let (ho, wo) = g.out_hw(h, w);
    dims_are("the convolution's output", y, (n, ho, wo, co))?;
    wt.expect(g.k * g.k * c * co, "the convolution's weights")?;
    let (scale, shift) = pre_ptrs(pre, c)?;
    let stats = match stats {
        Some(s) => s.expect(2 * co, "the output statistics")?.ptr(),
        None => Ptr::NULL,
    };
    Ok([scale, shift, stats])
}

/// [`fwd`] of any window (`convkxk_tc_fwd_bf16`), never split.
fn fwd_any(
    d: &dyn Driver,
    x: Nhwc<bf16>,
    pre: Option<BnRelu>,
    wt: Slice<bf16>,
    g: Conv,
    y: Nhwc<bf16>,
    stats: Option<Slice<f32>>,
) -> Result<()> {
    let [scale, shift, stats] = fwd_operands(x, pre, wt, g, y, stats)?;
    let (n, h, w, c) = x.dims();
    let at = Launch {
        grid: [
            blocks_for(y.rows(), ANY.bm as u32),
            blocks_for(y.c(), ANY.bn as u32),
            1,
        ],
        block: [ANY.threads, 1, 1],
        shared: smem(ANY, true, false, TC_STAGES),
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
        )
    }
}

/// A dense-layer [`fwd`] with the reduction split into chunks of `split = Some((ws, len))` (`len` a
/// positive multiple of `TC_BK`; `ws: [x.rows(), co]` f32, zero), or whole.
#[allow(clippy::too_many_arguments)]
pub fn fwd_split(
    d: &dyn Driver,
    x: Nhwc<bf16>,
    pre: Option<BnRelu>,
    wt: Slice<bf16>,
    g: Conv,
    y: Nhwc<bf16>,
    stats: Option<Slice<f32>>,
    split: Option<(Slice<f32>, usize)>,
) -> Result<()> {
    let kernels = dense_kernels(g, "a split tensor-core forward")?;
    let [scale, shift, stats_ptr] = fwd_operands(x, pre, wt, g, y, stats)?;
    let (n, h, w, c) = x.dims();
    let (rows, co) = (x.rows(), y.c());
    let k_len = g.k * g.k * c;
    let (ws, split_len) = match split {
        Some((_, len)) if len == 0 || !len.is_multiple_of(TC_BK) => {
            bail_shape!("split-K chunk of {len} is not a positive multiple of {TC_BK}")
        }
        Some((ws, len)) => (ws.expect(rows * co, "the split-K workspace")?.ptr(), len),
        None => (Ptr::NULL, k_len.max(1)),
    };
    let t = tile_of(g);
    let at = Launch {
        grid: [
            blocks_for(rows, t.bm as u32),
            blocks_for(co, t.bn as u32),
            blocks_for(k_len, split_len as u32),
        ],
        block: [t.threads, 1, 1],
        shared: smem(t, true, false, TC_STAGES),
    };
    let (ys, xs, wt) = (y.rs(), x.rs(), wt.ptr());
    let args = (y.ptr(), ys, x.ptr(), xs, wt, scale, shift);
    // SAFETY: x, y are checked views of the shapes the kernel reads and writes; wt, the BN's
    // coefficients, stats and the workspace are checked to cover them.
    unsafe {
        let (yp, ys, xp, xs, wt, s, t) = args;
        match kernels {
            Kernels::Conv1x1 => k::conv1x1_tc_fwd_bf16(
                d, at, yp, ys, xp, xs, wt, s, t, n, h, w, c, co, stats_ptr, ws, split_len,
            ),
            _ => k::conv3x3_tc_fwd_bf16(
                d, at, yp, ys, xp, xs, wt, s, t, n, h, w, c, co, stats_ptr, ws, split_len,
            ),
        }?
    };
    if split.is_none() {
        return Ok(());
    }
    let chunks = rows.div_ceil(1024).clamp(1, 64);
    let at = Launch {
        grid: [blocks_for(co, 32), chunks as u32, 1],
        block: [32, 8, 1],
        shared: 0,
    };
    // SAFETY: as above.
    unsafe { k::conv_tc_fwd_finish_bf16(d, at, y.ptr(), ys, ws, rows, co, stats_ptr) }
}

/// The ReLU mask of the BN + ReLU in front of a convolution, for its data gradient: the BN's
/// pre-BN input `x` and its coefficients.
#[derive(Clone, Copy, Debug)]
pub struct Mask {
    pub x: Nhwc<bf16>,
    pub bn: BnRelu,
}

/// `dx: [n, h, w, ci]` (overwritten, or added to if `accumulate`) = `post · g`, where `g` is
/// d(loss)/d(conv input) from `dy: [n, h, w, co]` and `wt: [k, k, ci, co]` bf16, rounded to bf16,
/// times the ReLU mask `[x · scale + shift > 0]` when `mask` is given: `g` is then the gradient of
/// the BN's output. `post: [ci]` f32 per-channel factors (None: 1). `red: [2, ci]` f32, when given
/// (with a mask), has the per-channel Σg and Σg·x added to it: that BN's backward reductions,
/// dbeta = Σg and dgamma = (Σg·x − mean·Σg) · invstd. With `post` = the BN's scale and
/// `accumulate`, `dx` receives the BN backward's per-element term (`bn::defer_from_sums` has the
/// rest). 1×1/1 and 3×3/1 pad 1 only.
#[allow(clippy::too_many_arguments)]
pub fn bwd_data(
    d: &dyn Driver,
    dy: Nhwc<bf16>,
    wt: Slice<bf16>,
    g: Conv,
    dx: Nhwc<bf16>,
    accumulate: bool,
    mask: Option<Mask>,
    red: Option<Slice<f32>>,
    post: Option<Slice<f32>>,
) -> Result<()> {
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
    let at = Launch {
        grid: [
            blocks_for(n * h * w, WIDE.bm as u32),
            blocks_for(ci, WIDE.bn as u32),
            1,
        ],
        block: [WIDE.threads, 1, 1],
        shared: smem(WIDE, true, true, TC_BWD_DATA_STAGES),
    };
    let (dxp, dxs, dyp, dys) = (dx.ptr(), dx.rs(), dy.ptr(), dy.rs());
    // SAFETY: dx, dy and the mask's x are checked views of the shapes the kernel reads and writes;
    // wt, the BN's coefficients, red and post are checked to cover them.
    unsafe {
        match kernels {
            Kernels::Conv1x1 => k::conv1x1_tc_bwd_data_bf16(
                d, at, dxp, dxs, accumulate, dyp, dys, wt, x, x_rs, scale, shift, n, h, w, ci, co,
                red, post,
            ),
            _ => k::conv3x3_tc_bwd_data_bf16(
                d, at, dxp, dxs, accumulate, dyp, dys, wt, x, x_rs, scale, shift, n, h, w, ci, co,
                red, post,
            ),
        }
    }
}

/// Pixels per split-K chunk of a weight gradient over `pixels` pixels with `tiles` output tiles:
/// enough chunks for about 4 blocks per SM of a 132-SM GPU, each at least 512 pixels, a multiple
/// of the K-slice.
pub fn weight_split_len(pixels: usize, tiles: usize) -> usize {
    let splits = (528 / tiles.max(1)).clamp(1, pixels.div_ceil(512).max(1));
    pixels.div_ceil(splits).div_ceil(TC_BK).max(1) * TC_BK
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
    let split_len = weight_split_len(dy.rows(), tiles);
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
        shared: smem(t, false, false, TC_STAGES),
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
