//! `gpu::ops::conv_tc` (the tensor-core convolutions: the dense layers' 1×1 and 3×3, and any
//! window's forward and weight gradient) against `ops::conv` in f64: outputs poisoned with NaN,
//! sizes that are not multiples of the tiles (and channel counts that are not multiples of 8,
//! which take the element-by-element load path), channel prefixes and slices of wider buffers.
//! bf16 storage, within 1e-2 relative; sums of values the kernels stored, within 1e-5.

use super::conv::{window, Inputs, Shape};
use crate::common::gpu::{
    all_nan, all_zero, check, check_cols, cols, column_sums, nhwc, plus_cols, read, refused, Exec,
};
use half::bf16;
use mura::gpu::ops::bn::{Affine, CoefStep, Deferred, Running, Stats};
use mura::gpu::ops::conv_tc::{self, BnBackward, BnStep, FwdOut, Mask, SplitK, StepOut};
use mura::gpu::ops::{BnRelu, ConvIn, DataOut};
use mura::gpu::{DeviceBuffer, Driver};
use mura::ops::conv::Conv;
use mura::ops::Write;

/// Sums of values the kernels themselves stored: only f32 accumulation error is allowed.
const EXACT: f64 = 1e-5;

type In = Inputs<bf16, bf16>;

/// The convolution of `inp`'s input through its BN + ReLU (if any) and weights.
fn conv_of(inp: &In) -> ConvIn<bf16> {
    ConvIn {
        x: inp.view(),
        pre: inp.pre(),
        w: inp.wt.0.slice(),
        g: inp.s.g,
    }
}

/// The executor of a bf16 test (tolerance 1e-2).
fn exec(test: &str) -> Exec {
    Exec::new::<bf16>(test)
}

/// A zeroed split-K workspace for outputs of up to `len` values and `tiles` tiles.
struct Workspace {
    ws: DeviceBuffer<f32>,
    tiles: DeviceBuffer<u32>,
}

impl Workspace {
    fn new(d: &std::sync::Arc<dyn Driver>, len: usize, tiles: usize) -> Workspace {
        Workspace {
            ws: DeviceBuffer::zeroed(d, len).unwrap(),
            tiles: DeviceBuffer::zeroed(d, tiles).unwrap(),
        }
    }
    fn view(&self) -> SplitK {
        SplitK {
            ws: self.ws.slice(),
            tiles: self.tiles.slice(),
        }
    }
    /// Every launch that used it left it zero.
    fn left_zero(&self, what: &str) {
        assert!(
            all_zero(&read(&self.ws)),
            "{what}: workspace not left zeroed"
        );
        let counts = self.tiles.to_vec().unwrap();
        assert!(
            counts.iter().all(|&c| c == 0),
            "{what}: tile counts not left zeroed: {counts:?}"
        );
    }
}

const P: Conv = Conv::POINTWISE;
const C3: Conv = Conv::CONV3;

/// The 1×1 shapes.
const CONV1X1: [Shape; 4] = [
    // Element-by-element loads (channels not multiples of 8), two pixel tiles.
    Shape::new((2, 9, 8, 19, 27), (13, 3, 20), P, true),
    // 16-byte and cp.async loads, two output-channel tiles, a slice at channel 8.
    Shape::new((2, 9, 8, 40, 48), (136, 8, 152), P, true),
    Shape::new((1, 5, 7, 24, 24), (16, 0, 16), P, false),
    // A dense layer's bottleneck: a 96-channel prefix of a 160-channel block buffer -> 128.
    Shape::new((1, 14, 14, 96, 160), (128, 0, 128), P, true),
];

/// The 3×3 shapes.
const CONV3X3: [Shape; 4] = [
    Shape::new((1, 9, 6, 17, 17), (7, 5, 13), C3, true),
    Shape::new((2, 9, 8, 48, 56), (40, 8, 56), C3, true),
    Shape::new((1, 6, 5, 32, 32), (32, 0, 32), C3, false),
    // A dense layer's growth conv: 128 bottleneck channels -> 32 written at channel 96 of 160.
    Shape::new((1, 14, 14, 128, 128), (32, 96, 160), C3, true),
];

/// The any-window kernels' shapes: several row tiles, K not a multiple of the K-slice.
const ANY_WINDOW: [Shape; 5] = [
    // The stem: 3 channels, 64 outputs; 2 x 12 x 12 = 288 output pixels (three row tiles), K 147.
    // Its K-slices of 32 pixels span more than two output rows: the weight gradient's loads go
    // element by element.
    Shape::new((2, 23, 24, 3, 3), (64, 0, 64), Conv::STEM, false),
    // The weight gradient's patch: 32-pixel slices in one output row of 32 (64 x 64 in) ...
    Shape::new((1, 64, 64, 3, 3), (64, 0, 64), Conv::STEM, false),
    // ... and straddling two rows of 35, both image edges clipped, two images (a slice across them).
    Shape::new((2, 21, 70, 3, 3), (64, 0, 64), Conv::STEM, false),
    // Other windows, with a BN + ReLU in front, a channel prefix and an output slice over two
    // column tiles.
    Shape::new((1, 17, 14, 5, 8), (70, 4, 80), window(5, 3, 1), true),
    Shape::new((2, 9, 10, 16, 16), (24, 0, 24), window(3, 2, 1), true),
];

#[test]
fn conv1x1() {
    let x = &mut exec("conv1x1_tc");
    CONV1X1.into_iter().for_each(|s| dense_case(x, s));
}

#[test]
fn conv3x3() {
    let x = &mut exec("conv3x3_tc");
    CONV3X3.into_iter().for_each(|s| dense_case(x, s));
}

/// The any-window kernels: forward with its output statistics, and the weight gradient.
#[test]
fn stem() {
    let x = &mut exec("stem_tc");
    ANY_WINDOW.into_iter().for_each(|s| any_window_case(x, s));
}

/// Forward (whole and split-K), data gradients (masked and accumulated; plain and overwritten)
/// and weight gradient (default and explicit split-K) of a dense-layer shape.
fn dense_case(x: &mut Exec, s: Shape) {
    let what = format!("tc {}", s.name());
    let inp = In::draw(x, s);
    forward_splits(x, &inp, &what);
    let (dyb, dy) = inp.dy(x);
    data_grads(x, &inp, &dyb, &dy, &what);
    weight_grads(x, &inp, &dyb, &dy, &what);
}

/// Forward with its output statistics and the weight gradient of an any-window shape.
fn any_window_case(x: &mut Exec, s: Shape) {
    let what = format!("tc {}", s.name());
    let inp = In::draw(x, s);
    let out = Outputs::new(x, s);
    // (The workspace is ignored: any-window forwards never split.)
    let (ws, tiles) = (
        x.poisoned::<f32>(s.px_out() * s.co),
        DeviceBuffer::<u32>::alloc(&x.d, 8).unwrap(),
    );
    tiles.fill_bytes(0xff).unwrap();
    let split = SplitK {
        ws: ws.slice(),
        tiles: tiles.slice(),
    };
    let y = inp.out_view(&out.y);
    let stats = Some(out.stats.slice());
    conv_tc::fwd(
        &*x.d,
        conv_of(&inp),
        FwdOut {
            y,
            stats,
            next: None,
        },
        Some(split),
    )
    .unwrap();
    out.check(x, &inp, &format!("{what} fwd"), true);
    let untouched = tiles.to_vec().unwrap().iter().all(|&c| c == u32::MAX);
    assert!(
        all_nan(&read(&ws)) && untouched,
        "{what}: the workspace was written"
    );
    let ws = Workspace::new(&x.d, s.px_out() * s.co, 64);
    coef_step(x, &inp, &format!("{what} fwd"), Split::Default, &ws);
    let (dyb, dy) = inp.dy(x);
    weight_grads(x, &inp, &dyb, &dy, &what);
}

/// A forward's outputs: `y: [px_out, y_rs]` poisoned, `stats: [2, co]` random (`stats0` as stored).
struct Outputs {
    y: DeviceBuffer<bf16>,
    stats: DeviceBuffer<f32>,
    stats0: Vec<f64>,
}

impl Outputs {
    fn new(x: &mut Exec, s: Shape) -> Outputs {
        let (stats, stats0) = x.random(2 * s.co, 1.0, 0.0);
        Outputs {
            y: x.poisoned(s.px_out() * s.y_rs),
            stats,
            stats0,
        }
    }
    /// `y`'s channel slice against the reference (nothing written outside it), and the stats:
    /// with Σy and Σy² of the stored `y` added when `summed`, else untouched.
    fn check(&self, x: &Exec, inp: &In, what: &str, summed: bool) {
        let s = inp.s;
        let y = read(&self.y);
        check_cols(what, &y, (s.y_rs, s.y_c0, s.co), &inp.y_ref(), x.tol);
        let y = cols(&y, s.y_rs, s.y_c0, s.co);
        let want = match summed {
            true => column_sums(&self.stats0, &y, &y, s.co),
            false => self.stats0.clone(),
        };
        check(&format!("{what} stats"), &read(&self.stats), &want, EXACT);
    }
}

/// How a dense-layer forward splits its reduction.
#[derive(Clone, Copy, Debug)]
enum Split {
    Whole,
    /// `fwd_split` in chunks of this many K elements.
    Chunks(usize),
    /// `fwd` with a workspace: its own split (whole when the grid is large).
    Default,
}

/// The forward into a slice of a poisoned buffer; with a BN + ReLU in front, the output's batch
/// statistics are added to random values. Whole, then split-K over a zeroed workspace in 32-wide
/// chunks and in the default split, which the launch (the last block of each tile) must leave
/// zeroed again.
fn forward_splits(x: &mut Exec, inp: &In, what: &str) {
    let s = inp.s;
    let ws = Workspace::new(&x.d, s.px_out() * s.co, 64);
    for split in [Split::Whole, Split::Chunks(32), Split::Default] {
        let what = format!("{what} fwd {split:?}");
        let out = Outputs::new(x, s);
        let y = inp.out_view(&out.y);
        let stats = s.pre.then(|| out.stats.slice());
        let fo = FwdOut {
            y,
            stats,
            next: None,
        };
        let (d, conv) = (&*x.d, conv_of(inp));
        match split {
            Split::Whole => conv_tc::fwd_split(d, conv, fo, None),
            Split::Chunks(len) => conv_tc::fwd_split(d, conv, fo, Some((ws.view(), len))),
            Split::Default => conv_tc::fwd(d, conv, fo, Some(ws.view())),
        }
        .unwrap();
        out.check(x, inp, &what, s.pre);
        ws.left_zero(&what);
        coef_step(x, inp, &what, split, &ws);
    }
}

/// The forward finishing the coefficients of the BN that reads its output next
/// ([`bn::CoefStep`](mura::gpu::ops::bn::CoefStep)), a BN of 5 more channels than the output, those first (their batch
/// statistics final), from zeroed sums, which with the block count must be left zero. Against
/// f64 of the stored output: the batch statistics of its channels (mean near 0, so var = Σy²/R −
/// mean² loses nothing), every channel's (scale, shift), the running statistics' update.
fn coef_step(x: &mut Exec, inp: &In, what: &str, split: Split, ws: &Workspace) {
    let (s, old) = (inp.s, 5);
    let (c, rows) = (s.co + old, s.px_out());
    let what = format!("{what} BN coefficients step");
    let y = x.poisoned::<bf16>(s.px_out() * s.y_rs);
    let sums = zeroed(x, 2 * s.co);
    let ((gamma, g0), (beta, b0)) = (x.random::<f32>(c, 0.5, 1.0), x.random::<f32>(c, 0.5, 0.0));
    let (mean, m0) = x.random::<f32>(c, 0.2, 0.0);
    let v0: Vec<f64> = x.randn(c, 0.5, 0.0).iter().map(|v| 0.5 + v * v).collect();
    let (var, v0) = x.upload::<f32>(&v0);
    let ((rm, rm0), (rv, rv0)) = (x.random::<f32>(c, 0.2, 0.0), x.random::<f32>(c, 0.2, 1.0));
    let (scale, shift) = (x.poisoned::<f32>(c), x.poisoned::<f32>(c));
    let done = DeviceBuffer::<u32>::zeroed(&x.d, 1).unwrap();
    let step = Some(CoefStep {
        params: Affine {
            gamma: gamma.slice(),
            beta: beta.slice(),
        },
        stats: Stats {
            mean: mean.slice(),
            var: var.slice(),
        },
        running: Running {
            stats: Stats {
                mean: rm.slice(),
                var: rv.slice(),
            },
            count: rows,
        },
        out: BnRelu {
            scale: scale.slice(),
            shift: shift.slice(),
        },
        done: done.slice(),
    });
    let d = &*x.d;
    let (yv, st) = (inp.out_view(&y), Some(sums.slice()));
    let fo = FwdOut {
        y: yv,
        stats: st,
        next: step,
    };
    let conv = conv_of(inp);
    match split {
        Split::Whole => conv_tc::fwd_split(d, conv, fo, None),
        Split::Chunks(len) => conv_tc::fwd_split(d, conv, fo, Some((ws.view(), len))),
        Split::Default => conv_tc::fwd(d, conv, fo, Some(ws.view())),
    }
    .unwrap();
    let yv = read(&y);
    check_cols(&what, &yv, (s.y_rs, s.y_c0, s.co), &inp.y_ref(), x.tol);
    let sy = column_sums(
        &vec![0.0; 2 * s.co],
        &cols(&yv, s.y_rs, s.y_c0, s.co),
        &cols(&yv, s.y_rs, s.y_c0, s.co),
        s.co,
    );
    let (mut mw, mut vw) = (m0.clone(), v0.clone());
    for j in 0..s.co {
        let m = sy[j] / rows as f64;
        mw[old + j] = m;
        vw[old + j] = (sy[s.co + j] / rows as f64 - m * m).max(0.0);
    }
    let sc: Vec<f64> = (0..c).map(|i| g0[i] / (vw[i] + 1e-5).sqrt()).collect();
    let sh: Vec<f64> = (0..c).map(|i| b0[i] - mw[i] * sc[i]).collect();
    let unbias = rows as f64 / (rows - 1) as f64;
    let rmw: Vec<f64> = (0..c).map(|i| 0.9 * rm0[i] + 0.1 * mw[i]).collect();
    let rvw: Vec<f64> = (0..c)
        .map(|i| 0.9 * rv0[i] + 0.1 * vw[i] * unbias)
        .collect();
    let tol = x.tol.min(1e-4);
    check(
        &format!("{what} mean, var"),
        &[read(&mean), read(&var)].concat(),
        &[mw, vw].concat(),
        tol,
    );
    check(
        &format!("{what} scale, shift"),
        &[read(&scale), read(&shift)].concat(),
        &[sc, sh].concat(),
        tol,
    );
    check(
        &format!("{what} running"),
        &[read(&rm), read(&rv)].concat(),
        &[rmw, rvw].concat(),
        tol,
    );
    assert!(all_zero(&read(&sums)), "{what}: the sums not left zero");
    assert_eq!(
        done.to_vec().unwrap(),
        [0],
        "{what}: the block count not left zero"
    );
    ws.left_zero(&what);
}

/// `conv_tc::bwd_data` of `inp` from `dyb` into the first `c` channels of `dx: [px_in, rs]`,
/// masked by the BN + ReLU in front when `mask`, with the BN reductions `red` and factors `post`;
/// with `split`, split-K in chunks of that many K elements over a zeroed workspace, which it must
/// leave zeroed.
#[allow(clippy::too_many_arguments)]
fn bwd_data(
    x: &Exec,
    inp: &In,
    dyb: &DeviceBuffer<bf16>,
    (dx, rs): (&DeviceBuffer<bf16>, usize),
    (write, mask): (Write, bool),
    (red, post): (Option<&DeviceBuffer<f32>>, Option<&DeviceBuffer<f32>>),
    split: Option<usize>,
) -> anyhow::Result<()> {
    bwd_data_step(
        x,
        inp,
        dyb,
        (dx, rs),
        (write, mask),
        (red, post),
        None,
        split,
    )
}

/// [`bwd_data`] finishing the BN backward's per-channel `step` too.
#[allow(clippy::too_many_arguments)]
fn bwd_data_step(
    x: &Exec,
    inp: &In,
    dyb: &DeviceBuffer<bf16>,
    (dx, rs): (&DeviceBuffer<bf16>, usize),
    (write, mask): (Write, bool),
    (red, post): (Option<&DeviceBuffer<f32>>, Option<&DeviceBuffer<f32>>),
    step: Option<BnStep>,
    split: Option<usize>,
) -> anyhow::Result<()> {
    let s = inp.s;
    let out = DataOut {
        dx: nhwc(dx, (s.n, s.h, s.w), rs, (0, s.c)),
        write,
    };
    let mask = inp.pre.dev(mask).map(|bn| Mask { x: inp.view(), bn });
    let (red, post) = (red.map(|b| b.slice()), post.map(|b| b.slice()));
    let (dyv, wt, d) = (inp.out_view(dyb), inp.wt.0.slice(), &*x.d);
    let ws = Workspace::new(&x.d, s.px_in() * s.c, 64);
    let split = split.map(|len| (ws.view(), len));
    conv_tc::bwd_data_split(
        d,
        dyv,
        wt,
        s.g,
        out,
        BnBackward {
            mask,
            red,
            post,
            step,
        },
        split,
    )?;
    ws.left_zero("bwd data");
    Ok(())
}

/// The data gradient from `dyb` (`dy`: its channels as stored): times the BN-ReLU mask and
/// per-channel factors, accumulated, with the BN's reductions (a dense layer's BN1 backward,
/// deferred); masked but plain, overwriting; then without the mask, overwriting.
fn data_grads(x: &mut Exec, inp: &In, dyb: &DeviceBuffer<bf16>, dy: &[f64], what: &str) {
    let s = inp.s;
    let dx_ref = inp.dx_ref(dy);
    // g: the gradient of the BN + ReLU's output (0 where the ReLU clipped).
    let on = |i: usize| !s.pre || inp.pre.at(i % s.c, inp.x.1[i / s.c * s.x_rs + i % s.c]) > 0.0;
    let g_ref: Vec<f64> = (0..dx_ref.len())
        .map(|i| if on(i) { dx_ref[i] } else { 0.0 })
        .collect();
    // Whole, and split-K in chunks of one K-slice (every split finished by its tile's last block).
    for split in [None, Some(32)] {
        let what = &format!("{what} (split {split:?})");
        masked_accumulated(x, inp, dyb, &g_ref, what, split);
        if s.pre {
            masked_plain(x, inp, dyb, &g_ref, what, split);
            bn_steps(x, inp, dyb, &g_ref, what, split);
        }
        let dxb = x.poisoned::<bf16>(s.px_in() * s.c);
        let plain = (Write::Overwrite, false);
        bwd_data(x, inp, dyb, (&dxb, s.c), plain, (None, None), split).unwrap();
        check(&format!("{what} bwd data"), &read(&dxb), &dx_ref, x.tol);
    }
}

/// `dx += post · g` into a prefix of a wider random buffer, with `red` += (Σg, Σg·x) when masked.
fn masked_accumulated(
    x: &mut Exec,
    inp: &In,
    dyb: &DeviceBuffer<bf16>,
    g_ref: &[f64],
    what: &str,
    split: Option<usize>,
) {
    let (s, c) = (inp.s, inp.s.c);
    let dx_rs = c + 3;
    let (dxb, dx0) = x.random::<bf16>(s.px_in() * dx_rs, 1.0, 0.0);
    let (red, red0) = x.random::<f32>(2 * c, 1.0, 0.0);
    let (post, pv) = x.random::<f32>(c, 0.5, 1.0);
    let sums = (s.pre.then_some(&red), Some(&post));
    bwd_data(
        x,
        inp,
        dyb,
        (&dxb, dx_rs),
        (Write::Accumulate, s.pre),
        sums,
        split,
    )
    .unwrap();
    let scaled: Vec<f64> = g_ref
        .iter()
        .enumerate()
        .map(|(i, g)| pv[i % c] * g)
        .collect();
    let want = plus_cols(&dx0, (dx_rs, 0, c), &scaled);
    let w = format!("{what} bwd data (mask, factors, accumulate)");
    check(&w, &read(&dxb), &want, x.tol);
    let want = match s.pre {
        true => column_sums(&red0, g_ref, &cols(&inp.x.1, s.x_rs, 0, c), c),
        false => red0,
    };
    check(
        &format!("{what} bwd data BN reductions"),
        &read(&red),
        &want,
        x.tol,
    );
}

/// Masked, overwriting a poisoned buffer: the stored values are g itself, so the reductions must
/// match the stored values' sums to f32 accuracy.
fn masked_plain(
    x: &mut Exec,
    inp: &In,
    dyb: &DeviceBuffer<bf16>,
    g_ref: &[f64],
    what: &str,
    split: Option<usize>,
) {
    let (s, c) = (inp.s, inp.s.c);
    let gb = x.poisoned::<bf16>(s.px_in() * c);
    let (red, red0) = x.random::<f32>(2 * c, 1.0, 0.0);
    bwd_data(
        x,
        inp,
        dyb,
        (&gb, c),
        (Write::Overwrite, true),
        (Some(&red), None),
        split,
    )
    .unwrap();
    let gv = read(&gb);
    check(&format!("{what} bwd data (mask)"), &gv, g_ref, x.tol);
    let want = column_sums(&red0, &gv, &cols(&inp.x.1, s.x_rs, 0, c), c);
    let w = format!("{what} bwd data BN reductions of stored g");
    check(&w, &read(&red), &want, EXACT);
}

/// The data gradient finishing its BN backward's per-channel step ([`BnStep`]) in the launch:
/// into coefficients (BN2: the gradient stored plain), then deferred (BN1: `post` = the scale,
/// accumulated), each from zeroed reductions, which with the block count must be left zero.
/// Against f64 of the stored gradient (BN2) or of the reference one (BN1), with a BN mean near 3,
/// so that a lost mean·Σg term would show.
fn bn_steps(
    x: &mut Exec,
    inp: &In,
    dyb: &DeviceBuffer<bf16>,
    g_ref: &[f64],
    what: &str,
    split: Option<usize>,
) {
    let (s, c) = (inp.s, inp.s.c);
    let rows = s.px_in() as f64;
    let xc = cols(&inp.x.1, s.x_rs, 0, c);
    let (mean, mv) = x.random::<f32>(c, 1.0, 3.0);
    let vv: Vec<f64> = x.randn(c, 0.5, 0.0).iter().map(|v| 1.0 + v * v).collect();
    let (var, vv) = x.upload::<f32>(&vv);
    let (dg, dg0) = x.random::<f32>(c, 1.0, 0.0);
    let (db, db0) = x.random::<f32>(c, 1.0, 0.0);
    let done = DeviceBuffer::<u32>::zeroed(&x.d, 1).unwrap();
    // (Σg, Σg·(x − mean) · invstd) and (a, b) per channel from the gradient `g`.
    let expect = |g: &[f64]| {
        let sums = column_sums(&vec![0.0; 2 * c], g, &xc, c);
        let (mut dparams, mut ab) = (vec![0.0; 2 * c], vec![0.0; 2 * c]);
        for j in 0..c {
            let (sdz, sdx) = (sums[j], sums[c + j] - mv[j] * sums[j]);
            let is = 1.0 / (vv[j] + 1e-5).sqrt();
            dparams[j] = dg0[j] + sdx * is;
            dparams[c + j] = db0[j] + sdz;
            ab[j] = sdz / rows;
            ab[c + j] = sdx * is * is / rows;
        }
        (dparams, ab)
    };
    let step = |out| BnStep {
        stats: Stats {
            mean: mean.slice(),
            var: var.slice(),
        },
        dparams: Affine {
            gamma: dg.slice(),
            beta: db.slice(),
        },
        out,
        done: done.slice(),
    };
    let left_zero = |red: &DeviceBuffer<f32>, w: &str| {
        assert!(all_zero(&read(red)), "{w}: the reductions not left zero");
        assert_eq!(
            done.to_vec().unwrap(),
            [0],
            "{w}: the block count not left zero"
        );
    };
    let params = || [read(&dg), read(&db)].concat();
    // BN2: coefficients for bn::backward_from_coef, from the stored gradient.
    let w = format!("{what} bwd data BN step (coefficients)");
    let (gb, red, coef) = (
        x.poisoned::<bf16>(s.px_in() * c),
        zeroed(x, 2 * c),
        x.poisoned::<f32>(2 * c),
    );
    let st = Some(step(StepOut::Coef(coef.slice())));
    bwd_data_step(
        x,
        inp,
        dyb,
        (&gb, c),
        (Write::Overwrite, true),
        (Some(&red), None),
        st,
        split,
    )
    .unwrap();
    let (dparams, ab) = expect(&read(&gb));
    check(&format!("{w} dgamma, dbeta"), &params(), &dparams, EXACT);
    check(&format!("{w} a, b"), &read(&coef), &ab, EXACT);
    left_zero(&red, &w);
    // BN1: deferred terms added to another reader's, from the accumulated gradient.
    let w = format!("{what} bwd data BN step (deferred)");
    let (dg, db) = (x.upload::<f32>(&dg0).0, x.upload::<f32>(&db0).0);
    let (alpha, a0) = x.random::<f32>(c, 1.0, 0.0);
    let (beta, b0) = x.random::<f32>(c, 1.0, 0.0);
    let (post, pv) = x.random::<f32>(c, 0.5, 1.0);
    let (dxb, _) = x.random::<bf16>(s.px_in() * c, 1.0, 0.0);
    let red = zeroed(x, 2 * c);
    let def = Deferred {
        alpha: alpha.slice(),
        beta: beta.slice(),
    };
    let st = Some(BnStep {
        dparams: Affine {
            gamma: dg.slice(),
            beta: db.slice(),
        },
        ..step(StepOut::Deferred(def))
    });
    let sums = (Some(&red), Some(&post));
    bwd_data_step(
        x,
        inp,
        dyb,
        (&dxb, c),
        (Write::Accumulate, true),
        sums,
        st,
        split,
    )
    .unwrap();
    let (dparams, ab) = expect(g_ref);
    let ab_want: Vec<f64> = (0..c)
        .map(|j| a0[j] - pv[j] * (ab[j] - mv[j] * ab[c + j]))
        .chain((0..c).map(|j| b0[j] - pv[j] * ab[c + j]))
        .collect();
    check(
        &format!("{w} dgamma, dbeta"),
        &[read(&dg), read(&db)].concat(),
        &dparams,
        x.tol,
    );
    check(
        &format!("{w} alpha, beta"),
        &[read(&alpha), read(&beta)].concat(),
        &ab_want,
        x.tol,
    );
    left_zero(&red, &w);
}

/// `len` f32 zeros on the device.
fn zeroed(x: &Exec, len: usize) -> DeviceBuffer<f32> {
    DeviceBuffer::zeroed(&x.d, len).unwrap()
}

/// The weight gradient from `dyb` (`dy` as stored), added to random f32 values: the default
/// split, then 32-pixel chunks.
fn weight_grads(x: &mut Exec, inp: &In, dyb: &DeviceBuffer<bf16>, dy: &[f64], what: &str) {
    let s = inp.s;
    let (dwb, dw0) = inp.dw0(x);
    let want = inp.dw_ref(dy, &dw0);
    let (xv, pre, dyv) = (inp.view(), inp.pre(), inp.out_view(dyb));
    conv_tc::bwd_weight(&*x.d, xv, pre, s.g, dyv, dwb.slice()).unwrap();
    check(&format!("{what} bwd weight"), &read(&dwb), &want, x.tol);
    let (dwb, _) = x.upload::<f32>(&dw0);
    conv_tc::bwd_weight_split(&*x.d, xv, pre, s.g, dyv, dwb.slice(), 32).unwrap();
    let w = format!("{what} bwd weight (split 32)");
    check(&w, &read(&dwb), &want, x.tol);
}

#[test]
fn rejects_what_it_does_not_cover() {
    let x = &mut exec("tc_rejects");
    let xb = x.poisoned::<bf16>(128);
    let v = nhwc(&xb, (1, 4, 4), 8, (0, 8));
    let (wt, dw) = (
        x.poisoned::<bf16>(11 * 11 * 64),
        x.poisoned::<f32>(11 * 11 * 64),
    );
    let ws = Workspace::new(&x.d, 128, 4);
    let (d, wt) = (&*x.d, wt.slice());
    // No data gradient and no explicit split-K for the any-window kernels.
    let out = DataOut {
        dx: v,
        write: Write::Overwrite,
    };
    let e = conv_tc::bwd_data(d, v, wt, Conv::STEM, out, BnBackward::default(), None);
    refused(e, "7x7/2 pad 3");
    let e = conv_tc::fwd_split(
        d,
        ConvIn {
            x: v,
            pre: None,
            w: wt,
            g: Conv::STEM,
        },
        FwdOut::plain(v),
        Some((ws.view(), 32)),
    );
    refused(e, "7x7/2 pad 3");
    // A window larger than the padded input.
    let g = window(11, 1, 2);
    refused(
        conv_tc::fwd(
            d,
            ConvIn {
                x: v,
                pre: None,
                w: wt,
                g,
            },
            FwdOut::plain(v),
            None,
        ),
        "no output on a 4x4 input",
    );
    let e = conv_tc::bwd_weight(d, v, None, g, v, dw.slice());
    refused(e, "no output on a 4x4 input");
    assert!(
        all_nan(&read(&xb)) && all_nan(&read(&dw)),
        "a refused call wrote"
    );
}

/// Operands that do not cover the launch's shapes, and split-K chunks that are not multiples of
/// the K-slice, are refused before anything is launched: the outputs stay poisoned.
#[test]
fn refuses_operands_that_do_not_fit() {
    let x = &mut exec("tc_refuses");
    // A 1x1 conv [1, 4, 4, 8] -> [1, 4, 4, 8]: 64 weights.
    let s = Shape::new((1, 4, 4, 8, 8), (8, 0, 8), Conv::POINTWISE, true);
    let inp = In::draw(x, s);
    let (yb, f) = (x.poisoned::<bf16>(128), x.poisoned::<f32>(128));
    let (d, xv, pre, g, y) = (&*x.d, inp.view(), inp.pre(), s.g, inp.out_view(&yb));
    let (wt, conv) = (inp.wt.0.slice(), conv_of(&inp));
    let short = |n: usize| f.slice().range(0, n).unwrap();
    let counts = DeviceBuffer::<u32>::zeroed(&x.d, 4).unwrap();
    let split = |ws: usize, tiles: usize| SplitK {
        ws: short(ws),
        tiles: counts.slice().range(0, tiles).unwrap(),
    };
    let e = conv_tc::fwd(
        d,
        ConvIn {
            w: wt.range(0, 63).unwrap(),
            ..conv
        },
        FwdOut::plain(y),
        None,
    );
    refused(
        e,
        "the convolution's weights: 63 elements where 64 are needed",
    );
    let e = conv_tc::fwd(
        d,
        conv,
        FwdOut {
            y,
            stats: Some(short(15)),
            next: None,
        },
        None,
    );
    refused(e, "the output statistics: 15 elements where 16 are needed");
    // (K = 8 channels: a chunk of 32 does not split; 8 rows of 16 pixels would in chunks of 0.)
    let e = conv_tc::fwd_split(d, conv, FwdOut::plain(y), Some((split(128, 1), 0)));
    refused(e, "split-K chunk of 0 is not a positive multiple of 32");
    let e = conv_tc::fwd_split(d, conv, FwdOut::plain(y), Some((split(128, 1), 48)));
    refused(e, "split-K chunk of 48 is not a positive multiple of 32");
    let dout = |dx| DataOut {
        dx,
        write: Write::Overwrite,
    };
    let e = conv_tc::bwd_weight_split(d, xv, pre, g, y, f.slice(), 0);
    refused(
        e,
        "split-K chunk of 0 pixels is not a positive multiple of 32",
    );
    let e = conv_tc::bwd_weight(d, xv, pre, g, y, short(63));
    refused(e, "the weight gradient: 63 elements where 64 are needed");
    let bn = pre.unwrap();
    let mask = |v| Some(Mask { x: v, bn });
    let e = conv_tc::bwd_data(
        d,
        y,
        wt,
        g,
        dout(y),
        BnBackward {
            red: Some(f.slice()),
            ..Default::default()
        },
        None,
    );
    refused(e, "need the BN's input (mask)");
    let e = conv_tc::bwd_data(
        d,
        y,
        wt,
        g,
        dout(y),
        BnBackward {
            mask: mask(nhwc(&yb, (1, 2, 8), 8, (0, 8))),
            ..Default::default()
        },
        None,
    );
    refused(
        e,
        "the ReLU mask's input is (1, 2, 8, 8), expected (1, 4, 4, 8)",
    );
    let e = conv_tc::bwd_data(
        d,
        y,
        wt,
        g,
        dout(y),
        BnBackward {
            mask: mask(xv),
            post: Some(short(7)),
            ..Default::default()
        },
        None,
    );
    refused(e, "the per-channel factors: 7 elements where 8 are needed");
    // A BN step needs its reductions, and a deferred one the BN's scale as the factors.
    let def = Deferred {
        alpha: f.slice(),
        beta: f.slice(),
    };
    let counts = DeviceBuffer::<u32>::zeroed(&x.d, 1).unwrap();
    let step = |out| conv_tc::BnStep {
        stats: Stats {
            mean: f.slice(),
            var: f.slice(),
        },
        dparams: Affine {
            gamma: f.slice(),
            beta: f.slice(),
        },
        out,
        done: counts.slice(),
    };
    let coef = Some(step(StepOut::Coef(f.slice())));
    let e = conv_tc::bwd_data(
        d,
        y,
        wt,
        g,
        dout(y),
        BnBackward {
            mask: mask(xv),
            step: coef,
            ..Default::default()
        },
        None,
    );
    refused(
        e,
        "a BN backward's step in a data gradient needs its reductions (red)",
    );
    let deferred = Some(step(StepOut::Deferred(def)));
    let red = Some(f.slice());
    let e = conv_tc::bwd_data(
        d,
        y,
        wt,
        g,
        dout(y),
        BnBackward {
            mask: mask(xv),
            red,
            post: None,
            step: deferred,
        },
        None,
    );
    refused(
        e,
        "a deferred BN step needs the BN's scale as the factors (post)",
    );
    assert!(
        all_nan(&read(&yb)) && all_nan(&read(&f)),
        "a refused call wrote"
    );
}

/// Short workspaces are refused before anything runs: a 3×3 data gradient of 8 channels (K = 72:
/// chunks of 32 split it in 3) over 16 pixels needs 128 partial sums and one tile count.
#[test]
fn refuses_short_split_workspaces() {
    let x = &mut exec("tc_refuses_split");
    let s = Shape::new((1, 4, 4, 8, 8), (8, 0, 8), C3, false);
    let inp = In::draw(x, s);
    let (dxb, f) = (x.poisoned::<bf16>(128), x.poisoned::<f32>(128));
    let counts = DeviceBuffer::<u32>::zeroed(&x.d, 1).unwrap();
    let (d, wt, dy) = (&*x.d, inp.wt.0.slice(), inp.out_view(&dxb));
    let out = DataOut {
        dx: inp.view(),
        write: Write::Overwrite,
    };
    let split = |ws: usize, tiles: usize| SplitK {
        ws: f.slice().range(0, ws).unwrap(),
        tiles: counts.slice().range(0, tiles).unwrap(),
    };
    let e = conv_tc::bwd_data_split(
        d,
        dy,
        wt,
        s.g,
        out,
        BnBackward::default(),
        Some((split(127, 1), 32)),
    );
    refused(
        e,
        "the split-K workspace: 127 elements where 128 are needed",
    );
    let e = conv_tc::bwd_data_split(
        d,
        dy,
        wt,
        s.g,
        out,
        BnBackward::default(),
        Some((split(128, 0), 32)),
    );
    refused(e, "the split-K tile counts: 0 elements where 1 are needed");
    let e = conv_tc::fwd_split(
        d,
        ConvIn {
            x: inp.view(),
            pre: None,
            w: wt,
            g: s.g,
        },
        FwdOut::plain(dy),
        Some((split(127, 1), 32)),
    );
    refused(
        e,
        "the split-K workspace: 127 elements where 128 are needed",
    );
    assert!(all_nan(&read(&f)), "a refused call wrote");
}

/// Split-K chunks are multiples of the K-slice; a grid that fills a wave of the device's SMs
/// does not split; one that does not is split into at least a block per SM where the reduction
/// allows, in chunks of at least `min` K-slices where that still fills the SMs.
#[test]
fn split_len_fills_the_device() {
    for (k_len, tiles, per_sm, sms) in [
        (1usize, 1usize, 2usize, 132usize),
        (100, 3, 4, 132),
        (200_704, 1, 2, 132),
        (200_704, 9, 4, 132),
        (3136, 600, 2, 132),
        (288, 25, 2, 132),
        (128, 125, 2, 132),
        (3136, 5, 2, 132),
        (3136, 9, 4, 132),
        (288, 25, 2, 1),
        (288, 25, 2, 10_000),
    ] {
        let slices = k_len.div_ceil(32);
        for min in [1, 4, 16] {
            let len = conv_tc::split_len(k_len, tiles, per_sm, sms, min);
            let what = format!("{k_len} over {tiles} tiles, {sms} SMs, min {min}: {len}");
            assert!(len.is_multiple_of(32) && len >= 32, "{what}");
            let blocks = tiles * k_len.div_ceil(len);
            if tiles >= per_sm * sms {
                assert!(len >= k_len, "{what}: a full grid does not split");
                continue;
            }
            // As many blocks as the reduction allows, up to one per SM.
            assert!(blocks >= sms.min(tiles * slices), "{what}: {blocks} blocks");
            // Chunks shorter than `min` only where `min` would not reach one block per SM.
            if len < min.min(slices) * 32 {
                assert!(tiles * slices.div_ceil(min) < sms, "{what}");
            }
            // Never more splits than a wave needs, in the longest chunks reaching it.
            if len < k_len && len >= min * 32 {
                assert!(
                    tiles * k_len.div_ceil(len + 32) < per_sm * sms,
                    "{what}: a longer chunk fills too"
                );
            }
        }
    }
}

/// The forward splits its reduction only when its grid cannot fill the device: DenseNet-169's
/// blocks 3 and 4 at batch 64 on 132 SMs (14² and 7²: 98 and 25 row tiles), never block 1 (56²);
/// on one SM nothing splits, on a thousand more does.
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
        // Only 2 K-slices, over 25 tiles: split in two, short of a block per SM.
        (64 * 7 * 7, 64, 128, Conv::POINTWISE, true),
    ] {
        let len = conv_tc::fwd_split_len(rows, c, co, g, 132);
        assert!(len.is_multiple_of(32) && len >= 32, "{rows} {c}: {len}");
        let chunks = k_len(c, g).div_ceil(len);
        assert_eq!(
            chunks > 1,
            split,
            "{rows}x{c}->{co} k{}: {chunks} chunks",
            g.k
        );
        let tiles = conv_tc::fwd_tiles(rows, co, g);
        assert!(
            len >= 4 * 32 || chunks == 1 || tiles * chunks <= 132,
            "{rows} {c}: {len}"
        );
        assert_eq!(
            conv_tc::fwd_split_len(rows, c, co, g, 1),
            k_len(c, g),
            "one SM"
        );
    }
    assert!(conv_tc::fwd_split_len(64 * 28 * 28, 480, 128, Conv::POINTWISE, 1000) < 480);
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
        // CI builds with its pinned nvcc and sets MURA_TEST_NVRTC=1: there the report must exist.
        let required = std::env::var("MURA_TEST_NVRTC").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "MURA_TEST_NVRTC=1 but the build found no nvcc: no ptxas report"
        );
        // Written to the stream itself, not through eprintln!, which a passing test's capture hides.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "no ptxas report (built without nvcc): spills NOT checked (MURA_TEST_NVRTC=1 requires it)"
        );
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
