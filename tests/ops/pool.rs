//! `gpu::ops::pool` against `ops::pool` in f64: the stem's max pool (with and without its BN +
//! ReLU applied as it reads) into a channel slice and back, the transitions' average pool of a
//! channel prefix (with and without BN + ReLU) and back, the head's global average pool and back.
//! Outputs poisoned with NaN; odd sizes (the floors).

use crate::common::gpu::{all_nan, check, check_cols, nhwc, read, refused, Exec, Pre};
use crate::test_device;
use mura::gpu::ops::pool;
use mura::gpu::{Act, DeviceBuffer, Mat};
use mura::ops::pool as cpu;
use mura::ops::{Image, Rows};

// [2, 7, 6, 3]
test_device!(small, small_body);
fn small_body<T: Act>(x: &mut Exec) {
    case::<T>(x, (2, 7, 6, 3));
}

// [1, 9, 11, 37]
test_device!(wide, wide_body);
fn wide_body<T: Act>(x: &mut Exec) {
    case::<T>(x, (1, 9, 11, 37));
}

fn case<T: Act>(x: &mut Exec, dims: (usize, usize, usize, usize)) {
    let what = format!("{:?} pool {dims:?}", T::PRECISION);
    maxpool::<T>(x, dims, &what);
    avgpool::<T>(x, dims, &what);
    gap::<T>(x, dims, &what);
}

/// Max pool into channels `[2, 2 + c)` of `[n, ho, wo, c + 4]`, and back from a gradient there:
/// of negative inputs (padding must never win), then of BN + ReLU of the input (the stem's norm0
/// + relu0, applied as the pool reads), whose gradient is that of the BN + ReLU's output.
fn maxpool<T: Act>(x: &mut Exec, (n, h, w, c): (usize, usize, usize, usize), what: &str) {
    let (ho, wo) = cpu::maxpool_out(h, w);
    let pre = Pre::draw(x, c);
    let dy = x.random::<T>(n * ho * wo * (c + 4), 1.0, 0.0);
    for with_pre in [false, true] {
        let what = format!("{what} maxpool pre={with_pre}");
        maxpool_of(x, (n, h, w, c), with_pre.then_some(&pre), &dy, &what);
    }
}

/// [`maxpool`] of `pre(x)`, x random about 0 with a BN + ReLU, about −3 without; `dy`: the
/// gradient buffer `[n, ho, wo, c + 4]` and its values as stored.
fn maxpool_of<T: Act>(
    x: &mut Exec,
    (n, h, w, c): (usize, usize, usize, usize),
    pre: Option<&Pre>,
    (dyb, dyv): &(DeviceBuffer<T>, Vec<f64>),
    what: &str,
) {
    let ((ho, wo), y_rs) = (cpu::maxpool_out(h, w), c + 4);
    let (xb, xv) = x.random::<T>(n * h * w * c, 1.0, if pre.is_some() { 0.0 } else { -3.0 });
    let (xn, bn) = (
        nhwc(&xb, (n, h, w), c, (0, c)),
        pre.and_then(|p| p.dev(true)),
    );
    // What the pool sees: x, or max(x · scale + shift, 0).
    let seen: Vec<f64> = (0..xv.len())
        .map(|i| pre.map_or(xv[i], |p| p.at(i % c, xv[i])))
        .collect();
    let yb = x.poisoned::<T>(n * ho * wo * y_rs);
    pool::maxpool_fwd(&*x.d, xn, bn, nhwc(&yb, (n, ho, wo), y_rs, (2, c))).unwrap();
    let mut y_ref = vec![0.0; n * ho * wo * c];
    cpu::maxpool_fwd(Image::dense(&seen, (n, h, w, c)), &mut y_ref, c);
    // (Without the BN + ReLU the pool copies values: exact.)
    let tol = if pre.is_some() {
        x.tol
    } else {
        x.tol.min(1e-5)
    };
    let fwd = format!("{what} fwd");
    check_cols(&fwd, &read(&yb), (y_rs, 2, c), &y_ref, tol);

    let dxb = x.poisoned::<T>(n * h * w * c);
    let dy = nhwc(dyb, (n, ho, wo), y_rs, (2, c));
    pool::maxpool_bwd(&*x.d, xn, bn, dy, nhwc(&dxb, (n, h, w), c, (0, c))).unwrap();
    let mut dx_ref = vec![0.0; n * h * w * c];
    // dy's channel slice read in place: `[2, 2 + c)` of rows `y_rs` long.
    let dy_ref = Rows::new(&dyv[2..], n * ho * wo, c, y_rs);
    cpu::maxpool_bwd(Image::dense(&seen, (n, h, w, c)), dy_ref, &mut dx_ref);
    check(&format!("{what} bwd"), &read(&dxb), &dx_ref, x.tol);
}

/// Average pool of (BN + ReLU of) the first c channels of `[n, h, w, c + 2]`, and back.
fn avgpool<T: Act>(x: &mut Exec, (n, h, w, c): (usize, usize, usize, usize), what: &str) {
    let x_rs = c + 2;
    let (xb, xv) = x.random::<T>(n * h * w * x_rs, 1.0, 0.0);
    let pre = Pre::draw(x, c);
    let (hp, wp) = (h / 2, w / 2);
    for with_pre in [false, true] {
        let yb = x.poisoned::<T>(n * hp * wp * c);
        let (xn, y) = (
            nhwc(&xb, (n, h, w), x_rs, (0, c)),
            nhwc(&yb, (n, hp, wp), c, (0, c)),
        );
        pool::avgpool_fwd(&*x.d, xn, pre.dev(with_pre), y).unwrap();
        let mut y_ref = vec![0.0; n * hp * wp * c];
        let x_ref = Image {
            data: &xv[..],
            n,
            h,
            w,
            c,
            rs: x_rs,
        };
        cpu::avgpool_fwd(x_ref, pre.host(with_pre), &mut y_ref, c);
        let w = format!("{what} avgpool fwd pre={with_pre}");
        check(&w, &read(&yb), &y_ref, x.tol);
    }
    let (dyb, dy) = x.random::<T>(n * hp * wp * c, 1.0, 0.0);
    let dxb = x.poisoned::<T>(n * h * w * c);
    let (dyn_, dxn) = (
        nhwc(&dyb, (n, hp, wp), c, (0, c)),
        nhwc(&dxb, (n, h, w), c, (0, c)),
    );
    pool::avgpool_bwd(&*x.d, dyn_, dxn).unwrap();
    let mut dx_ref = vec![0.0; n * h * w * c];
    cpu::avgpool_bwd(n, h, w, c, &dy, c, &mut dx_ref);
    check(&format!("{what} avgpool bwd"), &read(&dxb), &dx_ref, x.tol);
}

/// The global average pool into f32 features `[n, c]`, and back from an f32 gradient.
fn gap<T: Act>(x: &mut Exec, (n, h, w, c): (usize, usize, usize, usize), what: &str) {
    let hw = h * w;
    let (xb, xv) = x.random::<T>(n * hw * c, 1.0, 0.5);
    let feat = x.poisoned::<f32>(n * c);
    let fm = Mat::dense(feat.slice(), n, c).unwrap();
    pool::gap_fwd(&*x.d, nhwc(&xb, (n, h, w), c, (0, c)), fm).unwrap();
    let f_ref = cpu::gap_fwd(&xv, n, hw, c);
    check(
        &format!("{what} gap fwd"),
        &read(&feat),
        &f_ref,
        x.tol.min(1e-5),
    );

    let (dfeat, df) = x.random::<f32>(n * c, 1.0, 0.0);
    let dxb = x.poisoned::<T>(n * hw * c);
    let dfm = Mat::dense(dfeat.slice(), n, c).unwrap();
    pool::gap_bwd(&*x.d, dfm, nhwc(&dxb, (n, h, w), c, (0, c))).unwrap();
    let mut dx_ref = vec![0.0; n * hw * c];
    cpu::gap_bwd(&df, n, hw, c, &mut dx_ref);
    check(&format!("{what} gap bwd"), &read(&dxb), &dx_ref, x.tol);
}

/// Views that do not match the pool's shapes, inputs a kernel reads whole that are channel
/// slices, and BN coefficients too short are refused before anything is launched.
#[test]
fn refuses_operands_that_do_not_fit() {
    let x = &mut Exec::new::<f32>("pool_refuses");
    // x: [1, 5, 5, 4] inside a buffer of 6 channels; max pool output [1, 3, 3, 4].
    let (xb, y) = (x.poisoned::<f32>(5 * 5 * 6), x.poisoned::<f32>(3 * 3 * 4));
    let pre = Pre::draw(x, 3);
    let d = &*x.d;
    let (xs, xn) = (
        nhwc(&xb, (1, 5, 5), 6, (0, 4)),
        nhwc(&xb, (1, 5, 5), 4, (0, 4)),
    );
    let yn = nhwc(&y, (1, 3, 3), 4, (0, 4));
    let e = pool::maxpool_fwd(d, xs, None, yn);
    refused(
        e,
        "the max pool's input must be contiguous (row stride 6 for 4 channels)",
    );
    let e = pool::maxpool_fwd(d, xn, None, nhwc(&y, (1, 2, 2), 4, (0, 4)));
    refused(
        e,
        "the max pool's output is (1, 2, 2, 4), expected (1, 3, 3, 4)",
    );
    let e = pool::maxpool_fwd(d, xn, pre.dev(true), yn);
    refused(e, "a BN's scale: 3 elements where 4 are needed");
    let e = pool::avgpool_fwd(d, xs, None, yn);
    refused(
        e,
        "the average pool's output is (1, 3, 3, 4), expected (1, 2, 2, 4)",
    );
    let feat = Mat::dense(y.slice(), 2, 4).unwrap();
    let e = pool::gap_fwd(d, xn, feat);
    refused(e, "the pooled features must be a contiguous [1, 4]");
    assert!(
        all_nan(&read(&y)) && all_nan(&read(&xb)),
        "a refused call wrote"
    );
}
