//! NaN and ±Inf through every fused BN + ReLU path, on the executor under test, against the CPU
//! reference: the convolutions on the CUDA cores (f32 and bf16 storage) and on the tensor cores,
//! the max pool (forward and its argmax in the backward), the average pool, and the head's BN +
//! ReLU and global average pool. A NaN in is a NaN out wherever the reference's is (the fused
//! `bn_relu` of kernels/common.cuh passes it through, as `ops::BnRelu::at` does, where `fmaxf`
//! would have made it 0), an infinity is the same infinity, and the finite values agree as usual.

use super::conv::{Inputs, Shape};
use crate::common::gpu::{cols, nhwc, read, rel_err, Exec, Pre};
use crate::test_device;
use half::bf16;
use mura::gpu::ops::conv_tc::{self, FwdOut};
use mura::gpu::ops::{bn, conv, pool, ConvIn};
use mura::gpu::{Act, Mat};
use mura::ops::conv::Conv;
use mura::ops::pool as cpu_pool;
use mura::ops::{Activation, Image, Rows};

/// `v: [rows, rs]` with a NaN, a +Inf and a −Inf in its first three channels, at three pixels
/// (and NaN again at the last pixel, so that a max pool window meets it after a finite value).
fn poison(v: &mut [f64], rs: usize) {
    let rows = v.len() / rs;
    for (pixel, j, value) in [
        (0, 1, f64::NAN),
        (3.min(rows - 1), 0, f64::INFINITY),
        (4.min(rows - 1), 2, f64::NEG_INFINITY),
        (rows - 1, 0, f64::NAN),
    ] {
        v[pixel * rs + j] = value;
    }
}

/// Asserts that `got` has a NaN exactly where `want` has one, the same infinities, and finite
/// values within `tol` (relative, over them all) elsewhere; `want` must hold NaNs and finite
/// values both, so that neither a path that drops every NaN nor one that poisons everything passes.
fn check_special(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    assert!(
        want.iter().any(|v| v.is_nan()) && want.iter().any(|v| v.is_finite()),
        "{what}: the reference has no NaN or no finite value: the test would prove nothing"
    );
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if w.is_nan() || g.is_nan() {
            assert!(
                w.is_nan() && g.is_nan(),
                "{what}: element {i} is {g}, the reference {w}"
            );
        } else if w.is_infinite() || g.is_infinite() {
            assert_eq!(g, w, "{what}: element {i}");
        }
    }
    let finite: (Vec<f64>, Vec<f64>) = got
        .iter()
        .zip(want)
        .filter(|(_, w)| w.is_finite())
        .map(|(g, w)| (*g, *w))
        .unzip();
    let e = rel_err(&finite.0, &finite.1);
    assert!(e <= tol, "{what}: finite values' rel err {e} > {tol}");
}

/// Convolution inputs with NaN and infinities poisoned into `x`, and a BN + ReLU in front.
fn poisoned_inputs<T: Act, W: Act>(x: &mut Exec, s: Shape) -> Inputs<T, W> {
    let mut inp = Inputs::<T, W>::draw(x, s);
    let mut v = inp.x.1.clone();
    poison(&mut v, s.x_rs);
    inp.x = x.upload(&v);
    inp
}

const POINTWISE: Shape = Shape::new((2, 5, 7, 9, 11), (13, 0, 13), Conv::POINTWISE, true);
const CONV3X3: Shape = Shape::new((1, 9, 6, 17, 17), (12, 0, 12), Conv::CONV3, true);

test_device!(conv_cuda_cores, conv_body);
fn conv_body<T: Act>(x: &mut Exec) {
    for s in [POINTWISE, CONV3X3] {
        let inp = poisoned_inputs::<T, f32>(x, s);
        let yb = x.poisoned::<T>(s.px_out() * s.y_rs);
        let (xv, pre, wt) = (inp.view(), inp.pre(), inp.wt.0.slice());
        conv::fwd(&*x.d, xv, pre, wt, s.g, inp.out_view(&yb)).unwrap();
        let what = format!("{:?} {} with NaN and Inf", T::PRECISION, s.name());
        check_special(&what, &read(&yb), &inp.y_ref(), x.tol);
    }
}

#[test]
fn conv_tensor_cores() {
    let x = &mut Exec::new::<bf16>("nan_conv_tc");
    for s in [POINTWISE, CONV3X3] {
        let inp = poisoned_inputs::<bf16, bf16>(x, s);
        let yb = x.poisoned::<bf16>(s.px_out() * s.y_rs);
        let (xv, pre, wt) = (inp.view(), inp.pre(), inp.wt.0.slice());
        let y = inp.out_view(&yb);
        conv_tc::fwd(
            &*x.d,
            ConvIn {
                x: xv,
                pre,
                w: wt,
                g: s.g,
            },
            FwdOut::plain(y),
            None,
        )
        .unwrap();
        let what = format!("tensor cores {} with NaN and Inf", s.name());
        check_special(&what, &read(&yb), &inp.y_ref(), x.tol);
    }
}

test_device!(pools_and_head, pools_body);
fn pools_body<T: Act>(x: &mut Exec) {
    let (n, h, w, c) = (2, 7, 6, 5);
    let what = format!("{:?} with NaN and Inf", T::PRECISION);
    let mut v = x.randn(n * h * w * c, 1.0, 0.0);
    poison(&mut v, c);
    let (xb, xv) = x.upload::<T>(&v);
    let pre = Pre::draw(x, c);
    let xn = nhwc(&xb, (n, h, w), c, (0, c));
    // What the pools see: the BN + ReLU of x, by the reference's rule.
    let seen: Vec<f64> = (0..xv.len()).map(|i| pre.at(i % c, xv[i])).collect();
    maxpool(x, &xb, &seen, (n, h, w, c), &pre, &what);
    let (hp, wp) = (h / 2, w / 2);
    let yb = x.poisoned::<T>(n * hp * wp * c);
    pool::avgpool_fwd(&*x.d, xn, pre.dev(true), nhwc(&yb, (n, hp, wp), c, (0, c))).unwrap();
    let mut y_ref = vec![0.0; n * hp * wp * c];
    cpu_pool::avgpool_fwd(
        Image::dense(&xv, (n, h, w, c)),
        pre.host(true),
        &mut y_ref,
        c,
    );
    check_special(&format!("{what} avgpool"), &read(&yb), &y_ref, x.tol);
    // The head: norm5 + ReLU, then the global average pool.
    let rows = n * h * w;
    let fb = x.poisoned::<T>(rows * c);
    let (xm, fm) = (
        Mat::dense(xb.slice(), rows, c).unwrap(),
        Mat::dense(fb.slice(), rows, c).unwrap(),
    );
    bn::apply(&*x.d, xm, pre.dev(true).unwrap(), Activation::Relu, fm).unwrap();
    let mut f_ref = vec![0.0; rows * c];
    let (s, t) = (&pre.scale.1, &pre.shift.1);
    let xr = Rows::new(&xv[..], rows, c, c);
    mura::ops::bn::apply(xr, s, t, Activation::Relu, &mut f_ref, c);
    check_special(&format!("{what} head BN + ReLU"), &read(&fb), &f_ref, x.tol);
    let pooled = x.poisoned::<f32>(n * c);
    let pm = Mat::dense(pooled.slice(), n, c).unwrap();
    pool::gap_fwd(&*x.d, nhwc(&fb, (n, h, w), c, (0, c)), pm).unwrap();
    let g_ref = cpu_pool::gap_fwd(&read(&fb), n, h * w, c);
    check_special(&format!("{what} head pool"), &read(&pooled), &g_ref, x.tol);
}

/// The max pool of BN + ReLU of `x` (`seen`, as the reference sees it): a NaN anywhere in a
/// window is its maximum, forward, and the backward sends the gradient to that NaN.
fn maxpool<T: Act>(
    x: &mut Exec,
    xb: &mura::gpu::DeviceBuffer<T>,
    seen: &[f64],
    (n, h, w, c): (usize, usize, usize, usize),
    pre: &Pre,
    what: &str,
) {
    let (ho, wo) = cpu_pool::maxpool_out(h, w);
    let xn = nhwc(xb, (n, h, w), c, (0, c));
    let yb = x.poisoned::<T>(n * ho * wo * c);
    pool::maxpool_fwd(&*x.d, xn, pre.dev(true), nhwc(&yb, (n, ho, wo), c, (0, c))).unwrap();
    let mut y_ref = vec![0.0; n * ho * wo * c];
    cpu_pool::maxpool_fwd(Image::dense(seen, (n, h, w, c)), &mut y_ref, c);
    check_special(&format!("{what} maxpool"), &read(&yb), &y_ref, x.tol);
    let (dyb, dy) = x.random::<T>(n * ho * wo * c, 1.0, 0.0);
    let dxb = x.poisoned::<T>(n * h * w * c);
    let (dyn_, dxn) = (
        nhwc(&dyb, (n, ho, wo), c, (0, c)),
        nhwc(&dxb, (n, h, w), c, (0, c)),
    );
    pool::maxpool_bwd(&*x.d, xn, pre.dev(true), dyn_, dxn).unwrap();
    let mut dx_ref = vec![0.0; n * h * w * c];
    let dy = cols(&dy, c, 0, c);
    let dy = Rows::new(&dy[..], n * ho * wo, c, c);
    cpu_pool::maxpool_bwd(Image::dense(seen, (n, h, w, c)), dy, &mut dx_ref);
    let got = read(&dxb);
    let e = rel_err(&got, &dx_ref);
    assert!(
        e <= x.tol,
        "{what} maxpool bwd: rel err {e} (a NaN's window sent elsewhere?)"
    );
}
