//! Convolutions on the CUDA cores (kernels/conv.cu; CPU reference `crate::ops::conv`): any square
//! window, stride and padding, NHWC activations in `T`, f32 weights `[k, k, c, co]` and
//! accumulation, an optional BN + ReLU applied to the input as it is loaded. The f32 step's
//! convolutions; the bf16 step runs [`super::conv_tc`].

use super::{dims_are, pre_ptrs, Act, BnRelu, DataOut};
use crate::consts::{CONV_SROW, CONV_THREADS, CONV_TILE, CONV_TK};
use crate::gpu::kernels::launch as k;
use crate::gpu::{blocks_for, Driver, Launch, Nhwc, Slice};
use crate::ops::conv::Conv;
use crate::ops::Write;
use anyhow::Result;

/// Every launch's dynamic shared memory: two `[TK][SROW]` f32 tiles.
const SMEM: u32 = (2 * CONV_TK * CONV_SROW * 4) as u32;

/// A grid of output tiles over a `[m, n]` GEMM, `z` deep.
fn tiles(m: usize, n: usize, z: u32) -> Launch {
    let t = CONV_TILE as u32;
    Launch {
        grid: [blocks_for(m, t), blocks_for(n, t), z],
        block: [CONV_THREADS as u32, 1, 1],
        shared: SMEM,
        pdl: false,
    }
}

/// `y: [n, ho, wo, co] = conv(pre(x), wt)`, `wt: [k, k, x.c, co]` f32; `y` may be a channel slice
/// of a wider buffer, `x` a channel prefix.
pub fn fwd<T: Act>(
    d: &dyn Driver,
    x: Nhwc<T>,
    pre: Option<BnRelu>,
    wt: Slice<f32>,
    g: Conv,
    y: Nhwc<T>,
) -> Result<()> {
    let (n, h, w, c) = x.dims();
    let co = y.c();
    g.check(h, w)?;
    let (ho, wo) = g.out_hw(h, w);
    dims_are("the convolution's output", y, (n, ho, wo, co))?;
    let wt = wt
        .expect(g.k * g.k * c * co, "the convolution's weights")?
        .ptr();
    let (scale, shift) = pre_ptrs(pre, c)?;
    let at = tiles(n * ho * wo, co, 1);
    let (ys, xs) = (y.rs(), x.rs());
    // SAFETY: x, y are checked views of the shapes the kernel reads and writes; wt and the BN's
    // coefficients are checked to cover them.
    unsafe {
        k::conv_fwd::<T>(
            d,
            at,
            y.ptr(),
            ys,
            x.ptr(),
            xs,
            wt,
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
        )
    }
}

/// `out.dx: [n, h, w, ci]` (overwritten or added to) = d(loss)/d(conv input) from
/// `dy: [n, ho, wo, co]` and `wt: [k, k, ci, co]` f32.
pub fn bwd_data<T: Act>(
    d: &dyn Driver,
    dy: Nhwc<T>,
    wt: Slice<f32>,
    g: Conv,
    out: DataOut<T>,
) -> Result<()> {
    let dx = out.dx;
    let (n, h, w, ci) = dx.dims();
    let co = dy.c();
    g.check(h, w)?;
    let (ho, wo) = g.out_hw(h, w);
    dims_are("the convolution's output gradient", dy, (n, ho, wo, co))?;
    let wt = wt
        .expect(g.k * g.k * ci * co, "the convolution's weights")?
        .ptr();
    let at = tiles(n * h * w, ci, 1);
    let (dxs, dys) = (dx.rs(), dy.rs());
    // SAFETY: dx, dy are checked views of the shapes the kernel reads and writes; wt covers them.
    unsafe {
        k::conv_bwd_data::<T>(
            d,
            at,
            dx.ptr(),
            dxs,
            out.write == Write::Accumulate,
            dy.ptr(),
            dys,
            wt,
            n,
            h,
            w,
            ci,
            co,
            g.k,
            g.stride,
            g.pad,
        )
    }
}

/// `dw: [k, k, x.c, co]` f32 += d(loss)/d(wt) from `dy: [n, ho, wo, co]`; `x`, `pre` as in the
/// forward. The pixel reduction is split so that the grid has a few hundred blocks.
pub fn bwd_weight<T: Act>(
    d: &dyn Driver,
    x: Nhwc<T>,
    pre: Option<BnRelu>,
    g: Conv,
    dy: Nhwc<T>,
    dw: Slice<f32>,
) -> Result<()> {
    let (n, h, w, c) = x.dims();
    let co = dy.c();
    g.check(h, w)?;
    let (ho, wo) = g.out_hw(h, w);
    dims_are("the convolution's output gradient", dy, (n, ho, wo, co))?;
    let dw = dw.expect(g.k * g.k * c * co, "the weight gradient")?.ptr();
    let (scale, shift) = pre_ptrs(pre, c)?;
    let pixels = n * ho * wo;
    let t = CONV_TILE as u32;
    let out_tiles = blocks_for(g.k * g.k * c, t) * blocks_for(co, t);
    // Split the pixel reduction so that the grid has a few hundred blocks, each at least 256 pixels.
    let splits = (512 / out_tiles as usize).clamp(1, pixels.div_ceil(256).max(1));
    let split_len = pixels.div_ceil(splits).div_ceil(16) * 16;
    let at = tiles(g.k * g.k * c, co, blocks_for(pixels, split_len as u32));
    let (xs, dys) = (x.rs(), dy.rs());
    // SAFETY: x, dy are checked views of the shapes the kernel reads; dw and the BN's
    // coefficients are checked to cover them.
    unsafe {
        k::conv_bwd_weight::<T>(
            d,
            at,
            dw,
            x.ptr(),
            xs,
            scale,
            shift,
            dy.ptr(),
            dys,
            n,
            h,
            w,
            c,
            co,
            g.k,
            g.stride,
            g.pad,
            split_len,
        )
    }
}
