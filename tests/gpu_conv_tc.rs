//! The tensor-core convolutions of `mura::gpu::ops_tc` (dense-layer and any-window) against the CPU reference (`mura::ops::conv`
//! with `BnRelu`, in f64) on the executor named by MURA_TEST_DEVICE (the emulator by default):
//! fresh random inputs, outputs poisoned with NaN, sizes that are not multiples of the tiles (and
//! channel counts that are not multiples of 8, which take the element-by-element load path),
//! channel prefixes and slices of wider buffers. bf16 storage, within 1e-2 relative.

use half::bf16;
use mura::gpu::ops::View;
use mura::gpu::ops_tc;
use mura::gpu::testing::{cols, fresh_seed, randn, rel_err, test_driver, untouched_outside};
use mura::gpu::{DevPtr, DeviceBuffer, Driver};
use mura::ops::conv::{bwd_data, bwd_weight, fwd, Conv, Image};
use mura::ops::BnRelu;
use mura::rng::Rng;
use std::sync::Arc;

const TOL: f64 = 1e-2;

/// A device buffer of bf16 (`f32 = false`) or f32 values.
struct Buf {
    dev: DeviceBuffer<u8>,
    f32: bool,
}

impl Buf {
    fn poisoned(d: &Arc<dyn Driver>, f32: bool, len: usize) -> Buf {
        let dev = DeviceBuffer::<u8>::alloc(d, len * if f32 { 4 } else { 2 }).unwrap();
        dev.fill_bytes(0xff).unwrap();
        Buf { dev, f32 }
    }
    /// Uploads `v` rounded to the buffer's type; returns the buffer and the rounded values.
    fn from(d: &Arc<dyn Driver>, f32: bool, v: &[f64]) -> (Buf, Vec<f64>) {
        let b = Buf::poisoned(d, f32, v.len());
        let bytes: Vec<u8> = if f32 {
            let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
            bytemuck::cast_slice(&v).to_vec()
        } else {
            let v: Vec<bf16> = v.iter().map(|&x| bf16::from_f64(x)).collect();
            bytemuck::cast_slice(&v).to_vec()
        };
        b.dev.copy_from(&bytes).unwrap();
        let rounded = b.read();
        (b, rounded)
    }
    fn read(&self) -> Vec<f64> {
        let bytes = self.dev.to_vec().unwrap();
        if self.f32 {
            let v: &[f32] = bytemuck::cast_slice(&bytes);
            v.iter().map(|&x| x as f64).collect()
        } else {
            let v: &[bf16] = bytemuck::cast_slice(&bytes);
            v.iter().map(|x| x.to_f64()).collect()
        }
    }
    /// Address of element `i`.
    fn at(&self, i: usize) -> DevPtr {
        self.dev.ptr() + (i * if self.f32 { 4 } else { 2 }) as u64
    }
}

/// `base: [2, c]` plus the per-column sums of `a` and of `a * b` (both `[rows, c]`).
fn added_column_sums(base: &[f64], a: &[f64], b: &[f64], c: usize) -> Vec<f64> {
    let mut out = base.to_vec();
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        out[i % c] += x;
        out[c + i % c] += x * y;
    }
    out
}

/// Sums of values the kernel itself stored: only f32 accumulation error is allowed.
fn check_exact(what: &str, got: &[f64], want: &[f64]) {
    let e = rel_err(got, want);
    eprintln!("{what}: rel err {e:.2e}");
    assert!(e <= 1e-5, "{what}: rel err {e} > 1e-5");
}

fn check(what: &str, got: &[f64], want: &[f64]) {
    let e = rel_err(got, want);
    eprintln!("{what}: rel err {e:.2e}");
    assert!(e <= TOL, "{what}: rel err {e} > {TOL}");
}

/// A convolution's random inputs, on the device and as stored (rounded): x `[n, h, w, x_rs]`
/// (its first `c` channels the input), weights `[k, k, c, co]` bf16, and the scale and shift
/// `[c]` f32 of a BN + ReLU in front.
struct Inputs {
    x: (Buf, Vec<f64>),
    w: (Buf, Vec<f64>),
    s: (Buf, Vec<f64>),
    t: (Buf, Vec<f64>),
    dims: (usize, usize, usize, usize, usize),
}

impl Inputs {
    fn new(
        d: &Arc<dyn Driver>,
        rng: &mut Rng,
        dims: (usize, usize, usize, usize, usize),
        g: Conv,
        co: usize,
    ) -> Inputs {
        let (n, h, w, c, x_rs) = dims;
        Inputs {
            x: Buf::from(d, false, &randn(rng, n * h * w * x_rs, 1.0, 0.2)),
            w: Buf::from(d, false, &randn(rng, g.k * g.k * c * co, 0.3, 0.0)),
            s: Buf::from(d, true, &randn(rng, c, 0.5, 1.0)),
            t: Buf::from(d, true, &randn(rng, c, 0.5, 0.0)),
            dims,
        }
    }
    /// The BN + ReLU's (scale, shift) on the device, when there is one.
    fn pre(&self, on: bool) -> Option<(DevPtr, DevPtr)> {
        on.then(|| (self.s.0.at(0), self.t.0.at(0)))
    }
    fn pre_ref(&self, on: bool) -> Option<BnRelu<'_, f64>> {
        on.then_some(BnRelu {
            scale: &self.s.1,
            shift: &self.t.1,
        })
    }
    fn image(&self) -> Image<'_, f64> {
        let (n, h, w, c, rs) = self.dims;
        Image {
            data: &self.x.1,
            n,
            h,
            w,
            c,
            rs,
        }
    }
    fn view(&self) -> View {
        let (n, h, w, c, rs) = self.dims;
        View {
            ptr: self.x.0.at(0),
            n,
            h,
            w,
            c,
            rs,
        }
    }
}

/// Backward-weight from `dy` (`dy_at`: its first channel's address and row stride on the device;
/// `dy`: `[pixels, co]` as stored), added to random f32 values: the default split, then 32-pixel
/// chunks.
#[allow(clippy::too_many_arguments)]
fn weight_grads(
    d: &Arc<dyn Driver>,
    rng: &mut Rng,
    what: &str,
    inp: &Inputs,
    with_pre: bool,
    g: Conv,
    (dy_ptr, dy_rs): (DevPtr, usize),
    dy: &[f64],
    co: usize,
) {
    let (view, pre) = (inp.view(), inp.pre(with_pre));
    let mut dw_ref = randn(rng, inp.w.1.len(), 1.0, 0.0);
    let (dwb, dw0) = Buf::from(d, true, &dw_ref);
    ops_tc::conv_bwd_weight(&**d, view, pre, g, dy_ptr, dy_rs, co, dwb.at(0)).unwrap();
    bwd_weight(
        inp.image(),
        inp.pre_ref(with_pre),
        g,
        dy,
        co,
        co,
        &mut dw_ref,
    );
    check(&format!("{what} bwd weight"), &dwb.read(), &dw_ref);
    let (dwb, _) = Buf::from(d, true, &dw0);
    ops_tc::conv_bwd_weight_split(&**d, view, pre, g, dy_ptr, dy_rs, co, dwb.at(0), 32).unwrap();
    check(
        &format!("{what} bwd weight (split 32)"),
        &dwb.read(),
        &dw_ref,
    );
}

/// Forward, backward-data (masked and accumulated; plain and overwritten) and backward-weight
/// (default and explicit split-K) of one shape. The input is a channel prefix (`c` of `x_rs`),
/// the output a channel slice (`co` at `y_c0` of `y_rs`).
fn conv_case(
    d: &Arc<dyn Driver>,
    rng: &mut Rng,
    (n, h, w, c, x_rs): (usize, usize, usize, usize, usize),
    (co, y_c0, y_rs): (usize, usize, usize),
    g: Conv,
    with_pre: bool,
) {
    let what = format!(
        "tc conv{}x{} {n}x{h}x{w}x{c}->{co} pre={with_pre}",
        g.k, g.k
    );
    let px = n * h * w;
    let inp = Inputs::new(d, rng, (n, h, w, c, x_rs), g, co);
    let (xv, wv, s, t) = (&inp.x.1, &inp.w.1, &inp.s.1, &inp.t.1);
    let (wb, pre, view) = (&inp.w.0, inp.pre(with_pre), inp.view());
    let (xi, pre_ref) = (inp.image(), inp.pre_ref(with_pre));

    // Forward into a slice of a poisoned buffer; with a BN + ReLU in front, the output's batch
    // statistics are added to random values. Whole, then split-K over a zeroed workspace in
    // 32-wide chunks and in the default split (with a workspace; whole when the grid is large),
    // which the finishing kernel must leave zeroed again.
    let mut y_ref = vec![0.0; px * co];
    fwd(xi, pre_ref, wv, co, g, &mut y_ref, co);
    let ws = Buf::from(d, true, &vec![0.0; px * co]).0;
    for split in [None, Some(32), Some(0)] {
        let what = format!("{what} fwd split {split:?}");
        let yb = Buf::poisoned(d, false, px * y_rs);
        let (stats, stats0) = Buf::from(d, true, &randn(rng, 2 * co, 1.0, 0.0));
        let stats_ptr = with_pre.then(|| stats.at(0));
        let y_at = (yb.at(y_c0), y_rs);
        match split {
            Some(0) => ops_tc::conv_fwd(
                &**d,
                view,
                pre,
                wb.at(0),
                co,
                g,
                y_at.0,
                y_at.1,
                stats_ptr,
                Some(ws.at(0)),
            ),
            split => ops_tc::conv_fwd_split(
                &**d,
                view,
                pre,
                wb.at(0),
                co,
                g,
                y_at,
                stats_ptr,
                split.map(|len| (ws.at(0), len)),
            ),
        }
        .unwrap();
        let y = yb.read();
        check(&what, &cols(&y, y_rs, y_c0, co), &y_ref);
        assert!(
            untouched_outside(&y, y_rs, y_c0, co),
            "{what}: wrote outside its slice"
        );
        assert!(
            ws.read().iter().all(|&v| v == 0.0),
            "{what}: workspace not left zeroed"
        );
        let y = cols(&y, y_rs, y_c0, co);
        let want = if with_pre {
            added_column_sums(&stats0, &y, &y, co)
        } else {
            stats0
        };
        check_exact(&format!("{what} stats"), &stats.read(), &want);
    }

    // dy: a slice of a wider buffer, as a dense layer's gradient buffer is.
    let (dyb, dyv) = Buf::from(d, false, &randn(rng, px * y_rs, 1.0, 0.0));
    let dy = cols(&dyv, y_rs, y_c0, co);
    let mut dx_ref = vec![0.0; px * c];
    bwd_data(&dy, co, co, wv, g, (n, h, w, c), &mut dx_ref);

    // Backward-data times the BN-ReLU mask and per-channel factors, accumulated into a prefix of
    // a wider random buffer, with the BN's reductions of the masked gradient g (a dense layer's
    // BN1 backward, deferred); then masked but plain, overwriting, where the stored values are g
    // itself, so its reductions must match the stored values' sums to f32 accuracy.
    let dx_rs = c + 3;
    let (dxb, dx0) = Buf::from(d, false, &randn(rng, px * dx_rs, 1.0, 0.0));
    let mask = pre.map(|p| (view, p));
    let (red, red0) = Buf::from(d, true, &randn(rng, 2 * c, 1.0, 0.0));
    let post = randn(rng, c, 0.5, 1.0);
    let (pb, post) = Buf::from(d, true, &post);
    ops_tc::conv_bwd_data(
        &**d,
        dyb.at(y_c0),
        y_rs,
        co,
        wb.at(0),
        g,
        (n, h, w, c),
        dxb.at(0),
        dx_rs,
        true,
        mask,
        with_pre.then(|| red.at(0)),
        Some(pb.at(0)),
    )
    .unwrap();
    let on = |p: usize, j: usize| !with_pre || xv[p * x_rs + j] * s[j] + t[j] > 0.0;
    let g_ref: Vec<f64> = (0..px * c)
        .map(|i| if on(i / c, i % c) { dx_ref[i] } else { 0.0 })
        .collect();
    let want: Vec<f64> = (0..px * dx_rs)
        .map(|i| {
            let (p, j) = (i / dx_rs, i % dx_rs);
            match j < c {
                true => dx0[i] + post[j] * g_ref[p * c + j],
                false => dx0[i],
            }
        })
        .collect();
    let dx = dxb.read();
    check(
        &format!("{what} bwd data (mask, factors, accumulate)"),
        &dx,
        &want,
    );
    let want = if with_pre {
        added_column_sums(&red0, &g_ref, &cols(xv, x_rs, 0, c), c)
    } else {
        red0.clone()
    };
    check(
        &format!("{what} bwd data BN reductions"),
        &red.read(),
        &want,
    );
    if with_pre {
        let gb = Buf::poisoned(d, false, px * c);
        let (red, red0) = Buf::from(d, true, &randn(rng, 2 * c, 1.0, 0.0));
        ops_tc::conv_bwd_data(
            &**d,
            dyb.at(y_c0),
            y_rs,
            co,
            wb.at(0),
            g,
            (n, h, w, c),
            gb.at(0),
            c,
            false,
            mask,
            Some(red.at(0)),
            None,
        )
        .unwrap();
        let gv = gb.read();
        check(&format!("{what} bwd data (mask)"), &gv, &g_ref);
        let want = added_column_sums(&red0, &gv, &cols(xv, x_rs, 0, c), c);
        check_exact(
            &format!("{what} bwd data BN reductions of stored g"),
            &red.read(),
            &want,
        );
    }
    // ... and without the mask, overwriting a poisoned buffer.
    let dxb = Buf::poisoned(d, false, px * c);
    ops_tc::conv_bwd_data(
        &**d,
        dyb.at(y_c0),
        y_rs,
        co,
        wb.at(0),
        g,
        (n, h, w, c),
        dxb.at(0),
        c,
        false,
        None,
        None,
        None,
    )
    .unwrap();
    check(&format!("{what} bwd data"), &dxb.read(), &dx_ref);

    weight_grads(
        d,
        rng,
        &what,
        &inp,
        with_pre,
        g,
        (dyb.at(y_c0), y_rs),
        &dy,
        co,
    );
}

fn setup(test: &str) -> (Arc<dyn Driver>, Rng) {
    (
        test_driver().expect("test device"),
        Rng::new(fresh_seed(test)),
    )
}

#[test]
fn conv1x1_tc() {
    let (d, mut rng) = setup("conv1x1_tc");
    // Element-by-element loads (channels not multiples of 8), two pixel tiles.
    conv_case(
        &d,
        &mut rng,
        (2, 9, 8, 19, 27),
        (13, 3, 20),
        Conv::POINTWISE,
        true,
    );
    // 16-byte and cp.async loads, two output-channel tiles, a slice at channel 8.
    conv_case(
        &d,
        &mut rng,
        (2, 9, 8, 40, 48),
        (136, 8, 152),
        Conv::POINTWISE,
        true,
    );
    conv_case(
        &d,
        &mut rng,
        (1, 5, 7, 24, 24),
        (16, 0, 16),
        Conv::POINTWISE,
        false,
    );
    // A dense layer's bottleneck: a 96-channel prefix of a 160-channel block buffer -> 128.
    conv_case(
        &d,
        &mut rng,
        (1, 14, 14, 96, 160),
        (128, 0, 128),
        Conv::POINTWISE,
        true,
    );
}

#[test]
fn conv3x3_tc() {
    let (d, mut rng) = setup("conv3x3_tc");
    conv_case(
        &d,
        &mut rng,
        (1, 9, 6, 17, 17),
        (7, 5, 13),
        Conv::CONV3,
        true,
    );
    conv_case(
        &d,
        &mut rng,
        (2, 9, 8, 48, 56),
        (40, 8, 56),
        Conv::CONV3,
        true,
    );
    conv_case(
        &d,
        &mut rng,
        (1, 6, 5, 32, 32),
        (32, 0, 32),
        Conv::CONV3,
        false,
    );
    // A dense layer's growth conv: 128 bottleneck channels -> 32 written at channel 96 of 160.
    conv_case(
        &d,
        &mut rng,
        (1, 14, 14, 128, 128),
        (32, 96, 160),
        Conv::CONV3,
        true,
    );
}

/// The any-window kernels (the stem's 7×7/2 pad 3 on 3 channels): forward with its output
/// statistics, and the weight gradient (default split and 32-pixel chunks), against the CPU
/// reference; several row tiles, K (147) not a multiple of the K-slice, outputs a slice.
fn any_window_case(
    d: &Arc<dyn Driver>,
    rng: &mut Rng,
    (n, h, w, c, x_rs): (usize, usize, usize, usize, usize),
    (co, y_c0, y_rs): (usize, usize, usize),
    g: Conv,
    with_pre: bool,
) {
    let what = format!(
        "tc conv{}x{}/{} pad {} {n}x{h}x{w}x{c}->{co} pre={with_pre}",
        g.k, g.k, g.stride, g.pad
    );
    let (ho, wo) = g.out_hw(h, w);
    let px = n * ho * wo;
    let inp = Inputs::new(d, rng, (n, h, w, c, x_rs), g, co);
    let (wb, pre, view) = (&inp.w.0, inp.pre(with_pre), inp.view());
    let (xi, pre_ref) = (inp.image(), inp.pre_ref(with_pre));
    let mut y_ref = vec![0.0; px * co];
    fwd(xi, pre_ref, &inp.w.1, co, g, &mut y_ref, co);
    let yb = Buf::poisoned(d, false, px * y_rs);
    let (stats, stats0) = Buf::from(d, true, &randn(rng, 2 * co, 1.0, 0.0));
    // (The workspace is ignored: any-window forwards never split.)
    let ws = Buf::poisoned(d, true, px * co);
    ops_tc::conv_fwd(
        &**d,
        view,
        pre,
        wb.at(0),
        co,
        g,
        yb.at(y_c0),
        y_rs,
        Some(stats.at(0)),
        Some(ws.at(0)),
    )
    .unwrap();
    let y = yb.read();
    check(&format!("{what} fwd"), &cols(&y, y_rs, y_c0, co), &y_ref);
    assert!(
        untouched_outside(&y, y_rs, y_c0, co),
        "{what}: wrote outside its slice"
    );
    let y = cols(&y, y_rs, y_c0, co);
    let want = added_column_sums(&stats0, &y, &y, co);
    check_exact(&format!("{what} fwd stats"), &stats.read(), &want);

    let (dyb, dyv) = Buf::from(d, false, &randn(rng, px * y_rs, 1.0, 0.0));
    let dy = cols(&dyv, y_rs, y_c0, co);
    weight_grads(
        d,
        rng,
        &what,
        &inp,
        with_pre,
        g,
        (dyb.at(y_c0), y_rs),
        &dy,
        co,
    );
}

#[test]
fn stem_tc() {
    let (d, mut rng) = setup("stem_tc");
    // The stem: 3 channels, 64 outputs; 2 x 12 x 12 = 288 output pixels (three row tiles).
    any_window_case(
        &d,
        &mut rng,
        (2, 23, 24, 3, 3),
        (64, 0, 64),
        Conv::STEM,
        false,
    );
    // Other windows, with a BN + ReLU in front, a channel prefix and an output slice over two
    // column tiles.
    let g = Conv {
        k: 5,
        stride: 3,
        pad: 1,
    };
    any_window_case(&d, &mut rng, (1, 17, 14, 5, 8), (70, 4, 80), g, true);
    let g = Conv {
        k: 3,
        stride: 2,
        pad: 1,
    };
    any_window_case(&d, &mut rng, (2, 9, 10, 16, 16), (24, 0, 24), g, true);
}

#[test]
fn tc_rejects_what_it_does_not_cover() {
    let d = test_driver().expect("test device");
    let x = View {
        ptr: 0,
        n: 1,
        h: 4,
        w: 4,
        c: 8,
        rs: 8,
    };
    let err = |r: anyhow::Result<()>| format!("{:#}", r.unwrap_err());
    // No data gradient and no explicit split-K for the any-window kernels.
    let e = err(ops_tc::conv_bwd_data(
        &*d,
        0,
        8,
        8,
        0,
        Conv::STEM,
        (1, 4, 4, 8),
        0,
        8,
        false,
        None,
        None,
        None,
    ));
    assert!(e.contains("7x7/2 pad 3"), "{e}");
    let e = err(ops_tc::conv_fwd_split(
        &*d,
        x,
        None,
        0,
        8,
        Conv::STEM,
        (0, 8),
        None,
        Some((0, 32)),
    ));
    assert!(e.contains("7x7/2 pad 3"), "{e}");
    // A window larger than the padded input.
    let g = Conv {
        k: 11,
        stride: 1,
        pad: 2,
    };
    let e = err(ops_tc::conv_fwd(&*d, x, None, 0, 8, g, 0, 8, None, None));
    assert!(e.contains("no output on a 4x4 input"), "{e}");
}

#[test]
fn split_len_is_a_multiple_of_the_k_slice() {
    for (pixels, tiles) in [(1, 1), (100, 3), (200_704, 1), (200_704, 9), (3136, 600)] {
        let s = ops_tc::weight_split_len(pixels, tiles);
        assert!(s.is_multiple_of(32) && s >= 32, "{pixels} {tiles}: {s}");
        let splits = pixels.div_ceil(s);
        assert!(
            splits * tiles <= 528 + tiles,
            "{pixels} {tiles}: {splits} splits"
        );
    }
}

/// The forward splits its reduction only when its grid cannot fill the GPU: DenseNet-169's
/// blocks 3 and 4 at batch 64 (14² and 7²: 98 and 25 row tiles), never block 1 (56²).
#[test]
fn forward_splits_only_small_grids() {
    let k_len = |c: usize, g: Conv| g.k * g.k * c;
    for (rows, c, co, g, split) in [
        (64 * 56 * 56, 224, 128, Conv::POINTWISE, false),
        (64 * 56 * 56, 128, 32, Conv::CONV3, false),
        (64 * 28 * 28, 480, 128, Conv::POINTWISE, false),
        (64 * 14 * 14, 1248, 128, Conv::POINTWISE, true),
        (64 * 14 * 14, 128, 32, Conv::CONV3, true),
        (64 * 7 * 7, 1632, 128, Conv::POINTWISE, true),
        (64 * 7 * 7, 128, 32, Conv::CONV3, true),
        (64 * 7 * 7, 64, 128, Conv::POINTWISE, false), // only 2 K-slices
    ] {
        let len = ops_tc::fwd_split_len(rows, c, co, g);
        assert!(len.is_multiple_of(32) && len >= 32, "{rows} {c}: {len}");
        let chunks = k_len(c, g).div_ceil(len);
        assert_eq!(
            chunks > 1,
            split,
            "{rows}x{c}->{co} k{}: {chunks} chunks",
            g.k
        );
        assert!(
            len >= 4 * 32 || chunks == 1,
            "chunks of at least 4 K-slices"
        );
    }
}

/// The hot kernels keep everything in registers: no spills and no stack frame on any architecture
/// ptxas compiled them for (checked when the build found nvcc; NVRTC builds have no report).
#[test]
fn tc_kernels_do_not_spill() {
    use mura::gpu::kernels::{parse_ptxas, PTXAS_REPORT};
    let entries: Vec<_> = parse_ptxas(PTXAS_REPORT)
        .into_iter()
        .filter(|e| e.kernel.contains("_tc_"))
        .collect();
    if PTXAS_REPORT.is_empty() {
        eprintln!("no ptxas report (built without nvcc): nothing to check");
        return;
    }
    for geo in ["conv1x1", "conv3x3"] {
        for op in ["fwd", "bwd_data", "bwd_weight"] {
            for arch in ["sm_80", "sm_90"] {
                let k = format!("{geo}_tc_{op}_bf16");
                assert!(
                    entries.iter().any(|e| e.kernel == k && e.arch == arch),
                    "no ptxas entry for {k} on {arch}"
                );
            }
        }
    }
    for e in entries {
        assert!(
            e.spill_stores == 0 && e.spill_loads == 0 && e.stack_bytes == 0,
            "{e:?}"
        );
    }
}
