//! Tensor-core convolutions (kernels/conv_tc.cu): the dense layers' 1×1/1 pad 0 and 3×3/1 pad 1
//! (forward, backward-data, backward-weight), and any other window's forward and weight gradient
//! (the stem's 7×7/2 pad 3), bf16 activations and weights, f32 accumulation, NHWC, with the BN +
//! ReLU in front of each convolution fused into its loads. Same conventions as [`super::ops`]: device addresses, a channel
//! prefix is a [`View`] with row stride `rs`, a channel slice its first channel's address plus the
//! row stride; the caller guarantees the addresses are valid for the shapes in the comments.

use super::ops::{i, launch, View, A};
use super::{blocks_for, DevPtr, Driver};
use crate::ops::conv::Conv;
use anyhow::{bail, Result};

/// K-slice of every tile (kernels/conv_tc.cu `BK`).
const BK: usize = 32;

/// A block tile: `bm × bn` outputs, `threads` threads.
#[derive(Clone, Copy)]
struct Tile {
    bm: usize,
    bn: usize,
    threads: u32,
}

const T128: Tile = Tile {
    bm: 128,
    bn: 128,
    threads: 256,
};
const T32: Tile = Tile {
    bm: 128,
    bn: 32,
    threads: 128,
};
/// The any-window kernels' tile (the stem's 64 outputs).
const T64: Tile = Tile {
    bm: 128,
    bn: 64,
    threads: 128,
};

/// Shared-memory stages of the data gradients (kernels/conv_tc.cu `BWD_DATA_STAGES`); the other
/// kernels have 2.
const BWD_DATA_STAGES: usize = 3;

/// Dynamic shared bytes of a tile whose A (B) operand is stored k-contiguous when `a_kc` (`b_kc`):
/// `stages` stages of `[outer][inner + 8]` bf16 per operand (kernels/conv_tc.cu `Smem`).
fn smem(t: Tile, a_kc: bool, b_kc: bool, stages: usize) -> u32 {
    let a = if a_kc {
        t.bm * (BK + 8)
    } else {
        BK * (t.bm + 8)
    };
    let b = if b_kc {
        t.bn * (BK + 8)
    } else {
        BK * (t.bn + 8)
    };
    (stages * (a + b) * 2) as u32
}

/// `"conv1x1"` or `"conv3x3"`, the two geometries the dense-layer kernels cover.
fn geometry(g: Conv) -> Result<&'static str> {
    match (g.k, g.stride, g.pad) {
        (1, 1, 0) => Ok("conv1x1"),
        (3, 1, 1) => Ok("conv3x3"),
        _ => bail!(
            "tensor-core conv supports 1x1/1 pad 0 and 3x3/1 pad 1, not {}x{}/{} pad {}",
            g.k,
            g.k,
            g.stride,
            g.pad
        ),
    }
}

/// Whether `g` goes to the any-window kernels (`convkxk_*`: element-by-element loads, no split-K
/// forward, no data gradient), which the stem (7×7/2 pad 3 on 3 channels) needs.
fn any_window(g: Conv) -> bool {
    geometry(g).is_err()
}

/// Checks a window the any-window kernels can take: a non-empty output.
fn check_window(x: View, g: Conv) -> Result<()> {
    if g.k == 0 || g.stride == 0 || x.h + 2 * g.pad < g.k || x.w + 2 * g.pad < g.k {
        bail!(
            "a {}x{}/{} pad {} convolution has no output on a {}x{} input",
            g.k,
            g.k,
            g.stride,
            g.pad,
            x.h,
            x.w
        );
    }
    Ok(())
}

/// Streaming multiprocessors the split-K heuristics aim to fill (an H100 SXM has 132).
const SMS: usize = 132;

/// The K-slice length (a multiple of [`BK`]) of a split-K forward of `rows` pixels × `co`
/// channels (`x.c` inputs, geometry `g`): the reduction split so that the grid has about 2
/// (T128) or 4 (T32) blocks per SM of a 132-SM GPU, each at least 4 K-slices long; the whole
/// reduction (no split) when the grid is large enough already.
pub fn fwd_split_len(rows: usize, c: usize, co: usize, g: Conv) -> usize {
    let t = if g.k == 1 { T128 } else { T32 };
    let tiles = rows.div_ceil(t.bm) * co.div_ceil(t.bn);
    let per_sm = if t.threads == 256 { 2 } else { 4 };
    let slices = (g.k * g.k * c).div_ceil(BK);
    let splits = (per_sm * SMS).div_ceil(tiles).min(slices / 4).max(1);
    slices.div_ceil(splits) * BK
}

/// `y: [n, ho, wo, co]` bf16 (row stride `y_rs`) = conv(pre(x), wt); `x`: bf16; `wt: [k, k, x.c, co]`
/// bf16; `pre`: a fused BN + ReLU's (scale, shift) `[x.c]` f32. `stats: [2, co]` f32, when given,
/// has the per-channel sum and sum of squares of the stored `y` added to it (batch statistics of
/// the BN that reads these channels next, without a pass over them): mean = Σy / rows,
/// var = Σy² / rows − mean² (f32 sums; fine for conv outputs, whose mean is small next to their
/// spread). `ws: [x.rows(), co]` f32, all zero (and left so), when given lets a grid too small
/// to fill the GPU split its reduction ([`fwd_split_len`]): partial sums added there, then
/// stored by a finishing kernel. Windows other than 1×1 and 3×3/1 (the stem) take the
/// any-window kernel, which never splits (`ws` unused).
#[allow(clippy::too_many_arguments)]
pub fn conv_fwd(
    d: &dyn Driver,
    x: View,
    pre: Option<(DevPtr, DevPtr)>,
    wt: DevPtr,
    co: usize,
    g: Conv,
    y: DevPtr,
    y_rs: usize,
    stats: Option<DevPtr>,
    ws: Option<DevPtr>,
) -> Result<()> {
    if any_window(g) {
        return conv_fwd_any(d, x, pre, wt, co, g, (y, y_rs), stats);
    }
    let k_len = g.k * g.k * x.c;
    let split = ws
        .map(|ws| (ws, fwd_split_len(x.rows(), x.c, co, g)))
        .filter(|&(_, len)| len < k_len);
    conv_fwd_split(d, x, pre, wt, co, g, (y, y_rs), stats, split)
}

/// The parameters every forward kernel begins with: y, y_rs, x, x_rs, wt, scale, shift, n, h, w,
/// c, co.
fn fwd_args(
    x: View,
    pre: Option<(DevPtr, DevPtr)>,
    wt: DevPtr,
    co: usize,
    (y, y_rs): (DevPtr, usize),
) -> Vec<A> {
    let (s, sh) = pre.unwrap_or((0, 0));
    vec![
        A::P(y),
        i(y_rs),
        A::P(x.ptr),
        i(x.rs),
        A::P(wt),
        A::P(s),
        A::P(sh),
        i(x.n),
        i(x.h),
        i(x.w),
        i(x.c),
        i(co),
    ]
}

/// [`conv_fwd`] of any window (`convkxk_tc_fwd_bf16`): `y: [n, ho, wo, co]`, never split.
#[allow(clippy::too_many_arguments)]
fn conv_fwd_any(
    d: &dyn Driver,
    x: View,
    pre: Option<(DevPtr, DevPtr)>,
    wt: DevPtr,
    co: usize,
    g: Conv,
    (y, y_rs): (DevPtr, usize),
    stats: Option<DevPtr>,
) -> Result<()> {
    check_window(x, g)?;
    let (ho, wo) = g.out_hw(x.h, x.w);
    let grid = [
        blocks_for(x.n * ho * wo, T64.bm as u32),
        blocks_for(co, T64.bn as u32),
        1,
    ];
    let mut args = fwd_args(x, pre, wt, co, (y, y_rs));
    args.extend([i(g.k), i(g.stride), i(g.pad), A::P(stats.unwrap_or(0))]);
    let smem = smem(T64, true, false, 2);
    launch(
        d,
        "convkxk_tc_fwd_bf16",
        grid,
        [T64.threads, 1, 1],
        smem,
        args,
    )
}

/// [`conv_fwd`] with the reduction split into chunks of `split = Some((ws, len))` (`len` a
/// positive multiple of 32; `ws: [x.rows(), co]` f32, zero), or whole.
#[allow(clippy::too_many_arguments)]
pub fn conv_fwd_split(
    d: &dyn Driver,
    x: View,
    pre: Option<(DevPtr, DevPtr)>,
    wt: DevPtr,
    co: usize,
    g: Conv,
    (y, y_rs): (DevPtr, usize),
    stats: Option<DevPtr>,
    split: Option<(DevPtr, usize)>,
) -> Result<()> {
    let geo = geometry(g)?;
    let t = if g.k == 1 { T128 } else { T32 };
    let k_len = g.k * g.k * x.c;
    let (ws, split_len) = split.unwrap_or((0, k_len.max(1)));
    if split.is_some() && (split_len == 0 || !split_len.is_multiple_of(BK)) {
        bail!("split-K chunk of {split_len} is not a positive multiple of {BK}");
    }
    let grid = [
        blocks_for(x.rows(), t.bm as u32),
        blocks_for(co, t.bn as u32),
        blocks_for(k_len, split_len as u32),
    ];
    let mut args = fwd_args(x, pre, wt, co, (y, y_rs));
    args.extend([A::P(stats.unwrap_or(0)), A::P(ws), i(split_len)]);
    let name = format!("{geo}_tc_fwd_bf16");
    launch(
        d,
        &name,
        grid,
        [t.threads, 1, 1],
        smem(t, true, false, 2),
        args,
    )?;
    if split.is_none() {
        return Ok(());
    }
    let chunks = x.rows().div_ceil(1024).clamp(1, 64);
    let args = vec![
        A::P(y),
        i(y_rs),
        A::P(ws),
        i(x.rows()),
        i(co),
        A::P(stats.unwrap_or(0)),
    ];
    let grid = [blocks_for(co, 32), chunks as u32, 1];
    launch(d, "conv_tc_fwd_finish_bf16", grid, [32, 8, 1], 0, args)
}

/// `dx: [n, h, w, ci]` bf16 (row stride `dx_rs`; overwritten, or added to if `accumulate`) =
/// `post · g`, where `g` is d(loss)/d(conv input) from `dy: [n, h, w, co]` bf16 (row stride
/// `dy_rs`) and `wt: [k, k, ci, co]` bf16, rounded to bf16, times the ReLU mask
/// `[x * scale + shift > 0]` of the BN + ReLU in front of the convolution when
/// `mask = Some((x, (scale, shift)))` (`x`: its pre-BN input `[n, h, w, ci]` bf16, `scale, shift:
/// [ci]` f32): `g` is the gradient of the BN output. `post: [ci]` f32 per-channel factors (None: 1).
/// `red: [2, ci]` f32, when given (with a mask), has the per-channel sums of `g` and of `g * x`
/// added to it: the reductions of that BN's backward, dbeta = Σg and
/// dgamma = (Σg·x − mean·Σg) · invstd. With `post` = the BN's scale and `accumulate`, `dx`
/// receives the BN backward's per-element term (`ops::bn_bwd_defer` has the rest).
#[allow(clippy::too_many_arguments)]
pub fn conv_bwd_data(
    d: &dyn Driver,
    dy: DevPtr,
    dy_rs: usize,
    co: usize,
    wt: DevPtr,
    g: Conv,
    (n, h, w, ci): (usize, usize, usize, usize),
    dx: DevPtr,
    dx_rs: usize,
    accumulate: bool,
    mask: Option<(View, (DevPtr, DevPtr))>,
    red: Option<DevPtr>,
    post: Option<DevPtr>,
) -> Result<()> {
    if red.is_some() && mask.is_none() {
        bail!("the BN-backward reductions of a data gradient need the BN's input (mask)");
    }
    let geo = geometry(g)?;
    let grid = [
        blocks_for(n * h * w, T128.bm as u32),
        blocks_for(ci, T128.bn as u32),
        1,
    ];
    if let Some((x, _)) = mask {
        if (x.n, x.h, x.w, x.c) != (n, h, w, ci) {
            bail!(
                "ReLU mask input {}x{}x{}x{} does not match the gradient {n}x{h}x{w}x{ci}",
                x.n,
                x.h,
                x.w,
                x.c
            );
        }
    }
    let (x, x_rs, s, sh) = match mask {
        Some((x, (s, sh))) => (x.ptr, x.rs, s, sh),
        None => (0, 0, 0, 0),
    };
    let args = vec![
        A::P(dx),
        i(dx_rs),
        A::I(accumulate as i32),
        A::P(dy),
        i(dy_rs),
        A::P(wt),
        A::P(x),
        i(x_rs),
        A::P(s),
        A::P(sh),
        i(n),
        i(h),
        i(w),
        i(ci),
        i(co),
        A::P(red.unwrap_or(0)),
        A::P(post.unwrap_or(0)),
    ];
    let name = format!("{geo}_tc_bwd_data_bf16");
    launch(
        d,
        &name,
        grid,
        [T128.threads, 1, 1],
        smem(T128, true, true, BWD_DATA_STAGES),
        args,
    )
}

/// Pixels per split-K chunk of a weight gradient over `pixels` pixels with `tiles` output tiles:
/// enough chunks for about 4 blocks per SM of a 132-SM GPU, each at least 512 pixels, a
/// multiple of the K-slice.
pub fn weight_split_len(pixels: usize, tiles: usize) -> usize {
    let splits = (528 / tiles.max(1)).clamp(1, pixels.div_ceil(512).max(1));
    pixels.div_ceil(splits).div_ceil(BK).max(1) * BK
}

/// `dw: [k, k, x.c, co]` f32 += d(loss)/d(wt) from `dy: [n, h, w, co]` bf16 (row stride `dy_rs`),
/// `x` bf16 and `pre` as in the forward; split-K by [`weight_split_len`].
#[allow(clippy::too_many_arguments)]
pub fn conv_bwd_weight(
    d: &dyn Driver,
    x: View,
    pre: Option<(DevPtr, DevPtr)>,
    g: Conv,
    dy: DevPtr,
    dy_rs: usize,
    co: usize,
    dw: DevPtr,
) -> Result<()> {
    if any_window(g) {
        check_window(x, g)?;
    }
    let t = tile_of(g);
    let tiles = (g.k * g.k * x.c).div_ceil(t.bm) * co.div_ceil(t.bn);
    let (ho, wo) = g.out_hw(x.h, x.w);
    let split_len = weight_split_len(x.n * ho * wo, tiles);
    conv_bwd_weight_split(d, x, pre, g, dy, dy_rs, co, dw, split_len)
}

/// The weight gradient's tile of geometry `g`.
fn tile_of(g: Conv) -> Tile {
    match g.k {
        _ if any_window(g) => T64,
        1 => T128,
        _ => T32,
    }
}

/// [`conv_bwd_weight`] with the pixels split into chunks of `split_len` (a positive multiple of 32).
#[allow(clippy::too_many_arguments)]
pub fn conv_bwd_weight_split(
    d: &dyn Driver,
    x: View,
    pre: Option<(DevPtr, DevPtr)>,
    g: Conv,
    dy: DevPtr,
    dy_rs: usize,
    co: usize,
    dw: DevPtr,
    split_len: usize,
) -> Result<()> {
    let any = any_window(g);
    let name = match any {
        true => check_window(x, g).map(|()| "convkxk_tc_bwd_weight_bf16".to_string())?,
        false => format!("{}_tc_bwd_weight_bf16", geometry(g)?),
    };
    if split_len == 0 || !split_len.is_multiple_of(BK) {
        bail!("split-K chunk of {split_len} pixels is not a positive multiple of {BK}");
    }
    let t = tile_of(g);
    let (ho, wo) = g.out_hw(x.h, x.w);
    let grid = [
        blocks_for(g.k * g.k * x.c, t.bm as u32),
        blocks_for(co, t.bn as u32),
        blocks_for(x.n * ho * wo, split_len as u32),
    ];
    let (s, sh) = pre.unwrap_or((0, 0));
    let mut args = vec![
        A::P(dw),
        A::P(x.ptr),
        i(x.rs),
        A::P(s),
        A::P(sh),
        A::P(dy),
        i(dy_rs),
        i(x.n),
        i(x.h),
        i(x.w),
        i(x.c),
        i(co),
    ];
    if any {
        args.extend([i(g.k), i(g.stride), i(g.pad)]);
    }
    args.push(i(split_len));
    launch(
        d,
        &name,
        grid,
        [t.threads, 1, 1],
        smem(t, false, false, 2),
        args,
    )
}
