//! `gpu::ops::conv` (the CUDA-core convolutions: any window, f32 weights) against `ops::conv` in
//! f64: forward into a channel slice of a poisoned buffer, the data gradient accumulated into a
//! channel prefix of a wider buffer and overwriting a poisoned one, the weight gradient added to
//! random values; inputs channel prefixes, output gradients channel slices of wider buffers.
//! [`Shape`] and [`Inputs`] serve the tensor-core tests (`conv_tc`) too.

use crate::common::gpu::{
    all_nan, check, check_cols, cols, nhwc, plus_cols, read, refused, Exec, Pre,
};
use crate::test_device;
use mura::gpu::ops::{conv, DataOut};
use mura::gpu::{Act, DeviceBuffer, Nhwc};
use mura::ops::conv::{self as cpu, Conv};
use mura::ops::{Image, Write};

/// One convolution's shapes: the input is the first `c` channels of `[n, h, w, x_rs]`, the output
/// channels `[y_c0, y_c0 + co)` of `[n, ho, wo, y_rs]`; `pre`: a BN + ReLU in front.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub x_rs: usize,
    pub co: usize,
    pub y_c0: usize,
    pub y_rs: usize,
    pub g: Conv,
    pub pre: bool,
}

impl Shape {
    pub const fn new(
        (n, h, w, c, x_rs): (usize, usize, usize, usize, usize),
        (co, y_c0, y_rs): (usize, usize, usize),
        g: Conv,
        pre: bool,
    ) -> Shape {
        Shape {
            n,
            h,
            w,
            c,
            x_rs,
            co,
            y_c0,
            y_rs,
            g,
            pre,
        }
    }
    /// Input pixels `n·h·w`.
    pub fn px_in(&self) -> usize {
        self.n * self.h * self.w
    }
    /// Output pixels `n·ho·wo`.
    pub fn px_out(&self) -> usize {
        let (ho, wo) = self.g.out_hw(self.h, self.w);
        self.n * ho * wo
    }
    pub fn name(&self) -> String {
        let (g, (n, h, w, c, co)) = (self.g, (self.n, self.h, self.w, self.c, self.co));
        let win = format!("{}x{}/{} pad {}", g.k, g.k, g.stride, g.pad);
        format!("conv {win} {n}x{h}x{w}x{c}->{co} pre={}", self.pre)
    }
}

/// A convolution's random inputs, on the device and as stored: `x: [n, h, w, x_rs]` in `T`,
/// weights `[k, k, c, co]` in `W` (f32 on the CUDA cores, bf16 on the tensor cores), and the
/// coefficients of a BN + ReLU in front.
pub struct Inputs<T: Act, W: Act> {
    pub s: Shape,
    pub x: (DeviceBuffer<T>, Vec<f64>),
    pub wt: (DeviceBuffer<W>, Vec<f64>),
    pub pre: Pre,
}

impl<T: Act, W: Act> Inputs<T, W> {
    pub fn draw(x: &mut Exec, s: Shape) -> Self {
        let xv = x.randn(s.px_in() * s.x_rs, 1.0, 0.2);
        let wv = x.randn(s.g.k * s.g.k * s.c * s.co, 0.3, 0.0);
        Inputs {
            s,
            x: x.upload(&xv),
            wt: x.upload(&wv),
            pre: Pre::draw(x, s.c),
        }
    }
    /// The input: the first `c` channels of `x`.
    pub fn view(&self) -> Nhwc<T> {
        let s = self.s;
        nhwc(&self.x.0, (s.n, s.h, s.w), s.x_rs, (0, s.c))
    }
    /// The output's channels of a `[n, ho, wo, y_rs]` buffer (the output, or its gradient).
    pub fn out_view<U: Act>(&self, b: &DeviceBuffer<U>) -> Nhwc<U> {
        let s = self.s;
        let (ho, wo) = s.g.out_hw(s.h, s.w);
        nhwc(b, (s.n, ho, wo), s.y_rs, (s.y_c0, s.co))
    }
    /// The BN + ReLU in front, on the device, when the shape has one.
    pub fn pre(&self) -> Option<mura::gpu::ops::BnRelu> {
        self.pre.dev(self.s.pre)
    }
    fn image(&self) -> Image<'_, f64> {
        let s = self.s;
        let (n, h, w, c, rs) = (s.n, s.h, s.w, s.c, s.x_rs);
        Image {
            data: &self.x.1,
            n,
            h,
            w,
            c,
            rs,
        }
    }
    /// The forward's reference `[px_out, co]`.
    pub fn y_ref(&self) -> Vec<f64> {
        let s = self.s;
        let mut y = vec![0.0; s.px_out() * s.co];
        let pre = self.pre.host(s.pre);
        cpu::fwd(self.image(), pre, &self.wt.1, s.co, s.g, &mut y, s.co);
        y
    }
    /// The data gradient's reference `[px_in, c]` from `dy: [px_out, co]`.
    pub fn dx_ref(&self, dy: &[f64]) -> Vec<f64> {
        let s = self.s;
        let mut dx = vec![0.0; s.px_in() * s.c];
        let dims = (s.n, s.h, s.w, s.c);
        cpu::bwd_data(dy, s.co, s.co, &self.wt.1, s.g, dims, &mut dx);
        dx
    }
    /// `dw0` plus the weight gradient from `dy: [px_out, co]`.
    pub fn dw_ref(&self, dy: &[f64], dw0: &[f64]) -> Vec<f64> {
        let (s, mut dw) = (self.s, dw0.to_vec());
        cpu::bwd_weight(
            self.image(),
            self.pre.host(s.pre),
            s.g,
            dy,
            s.co,
            s.co,
            &mut dw,
        );
        dw
    }
    /// An output gradient: random `[n, ho, wo, y_rs]` (the output's channels are read, as from a
    /// dense layer's gradient buffer), and those channels `[px_out, co]` as stored.
    pub fn dy(&self, x: &mut Exec) -> (DeviceBuffer<T>, Vec<f64>) {
        let s = self.s;
        let (b, v) = x.random(s.px_out() * s.y_rs, 1.0, 0.0);
        (b, cols(&v, s.y_rs, s.y_c0, s.co))
    }
    /// Random f32 values the size of the weights, on the device and as stored.
    pub fn dw0(&self, x: &mut Exec) -> (DeviceBuffer<f32>, Vec<f64>) {
        x.random(self.wt.1.len(), 1.0, 0.0)
    }
}

/// A `k`×`k`/`stride` pad `pad` window.
pub const fn window(k: usize, stride: usize, pad: usize) -> Conv {
    Conv { k, stride, pad }
}

/// The stem's window on 3 channels; the output a whole buffer.
const STEM: Shape = Shape::new((2, 13, 11, 3, 3), (7, 0, 7), Conv::STEM, false);
/// A bottleneck: 19 channels of 27 -> 13 at channel 3 of 20, BN + ReLU in front.
const POINTWISE: Shape = Shape::new((2, 5, 7, 19, 27), (13, 3, 20), Conv::POINTWISE, true);
/// A growth conv: 17 -> 70 at channel 5 of 77, BN + ReLU in front.
const CONV3X3: Shape = Shape::new((1, 9, 6, 17, 17), (70, 5, 77), Conv::CONV3, true);
/// 3x3/2 without padding (the floor drops the last row and column): 5 channels of 6 -> 3.
const ODD: Shape = Shape::new((2, 9, 8, 5, 6), (3, 0, 3), window(3, 2, 0), false);

test_device!(stem, stem_body);
fn stem_body<T: Act>(x: &mut Exec) {
    case::<T>(x, STEM);
}

test_device!(pointwise, pointwise_body);
fn pointwise_body<T: Act>(x: &mut Exec) {
    case::<T>(x, POINTWISE);
}

test_device!(conv3x3, conv3x3_body);
fn conv3x3_body<T: Act>(x: &mut Exec) {
    case::<T>(x, CONV3X3);
}

test_device!(odd_window, odd_window_body);
fn odd_window_body<T: Act>(x: &mut Exec) {
    case::<T>(x, ODD);
}

/// Forward, data gradient (accumulated, then overwriting) and weight gradient of one shape.
fn case<T: Act>(x: &mut Exec, s: Shape) {
    let what = format!("{:?} {}", T::PRECISION, s.name());
    let inp = Inputs::<T, f32>::draw(x, s);
    forward(x, &inp, &what);
    let (dyb, dy) = inp.dy(x);
    data_grad(x, &inp, &dyb, &dy, &what);
    let (dwb, dw0) = inp.dw0(x);
    let dyv = inp.out_view(&dyb);
    conv::bwd_weight(&*x.d, inp.view(), inp.pre(), s.g, dyv, dwb.slice()).unwrap();
    let want = inp.dw_ref(&dy, &dw0);
    check(&format!("{what} bwd weight"), &read(&dwb), &want, x.tol);
}

/// The forward into a channel slice of a poisoned buffer.
fn forward<T: Act>(x: &mut Exec, inp: &Inputs<T, f32>, what: &str) {
    let s = inp.s;
    let yb = x.poisoned::<T>(s.px_out() * s.y_rs);
    let wt = inp.wt.0.slice();
    conv::fwd(&*x.d, inp.view(), inp.pre(), wt, s.g, inp.out_view(&yb)).unwrap();
    let at = (s.y_rs, s.y_c0, s.co);
    check_cols(&format!("{what} fwd"), &read(&yb), at, &inp.y_ref(), x.tol);
}

/// The data gradient from `dyb` (`dy`: its channels as stored), accumulated into a prefix of a
/// wider buffer of random values, then overwriting a poisoned one.
fn data_grad<T: Act>(
    x: &mut Exec,
    inp: &Inputs<T, f32>,
    dyb: &DeviceBuffer<T>,
    dy: &[f64],
    what: &str,
) {
    let s = inp.s;
    let dx_ref = inp.dx_ref(dy);
    let (dims, dx_rs) = ((s.n, s.h, s.w), s.c + 3);
    let (dxb, dx0) = x.random::<T>(s.px_in() * dx_rs, 1.0, 0.0);
    let (dyv, wt) = (inp.out_view(dyb), inp.wt.0.slice());
    let dxv = nhwc(&dxb, dims, dx_rs, (0, s.c));
    let acc = DataOut {
        dx: dxv,
        write: Write::Accumulate,
    };
    conv::bwd_data(&*x.d, dyv, wt, s.g, acc).unwrap();
    let want = plus_cols(&dx0, (dx_rs, 0, s.c), &dx_ref);
    check(
        &format!("{what} bwd data (accumulate)"),
        &read(&dxb),
        &want,
        x.tol,
    );

    let dxb = x.poisoned::<T>(s.px_in() * s.c);
    let dx = DataOut::overwrite(nhwc(&dxb, dims, s.c, (0, s.c)));
    conv::bwd_data(&*x.d, dyv, wt, s.g, dx).unwrap();
    check(&format!("{what} bwd data"), &read(&dxb), &dx_ref, x.tol);
}

/// Operands that do not cover the launch's shapes are refused before anything is launched: the
/// output stays poisoned.
#[test]
fn refuses_operands_that_do_not_fit() {
    let x = &mut Exec::new::<f32>("conv_refuses");
    let s = Shape::new((1, 6, 6, 4, 4), (8, 0, 8), Conv::CONV3, true);
    let inp = Inputs::<f32, f32>::draw(x, s);
    let yb = x.poisoned::<f32>(s.px_out() * s.co);
    let (xv, y, g) = (inp.view(), inp.out_view(&yb), s.g);
    let short = |b: &DeviceBuffer<f32>| b.slice().range(0, b.len() - 1).unwrap();
    let wt = inp.wt.0.slice();
    let e = conv::fwd(&*x.d, xv, None, short(&inp.wt.0), g, y);
    refused(
        e,
        "the convolution's weights: 287 elements where 288 are needed",
    );
    let pre = inp.pre().map(|p| mura::gpu::ops::BnRelu {
        scale: short(&inp.pre.scale.0),
        ..p
    });
    refused(
        conv::fwd(&*x.d, xv, pre, wt, g, y),
        "a BN's scale: 3 elements where 4 are needed",
    );
    // An output of the wrong size (3x3/1 pad 1 keeps 6x6).
    let small = nhwc(&yb, (1, 4, 4), 8, (0, 8));
    refused(
        conv::fwd(&*x.d, xv, None, wt, g, small),
        "the convolution's output is (1, 4, 4, 8)",
    );
    let e = conv::bwd_data(&*x.d, small, wt, g, DataOut::overwrite(xv));
    refused(e, "the convolution's output gradient is (1, 4, 4, 8)");
    let e = conv::bwd_weight(&*x.d, xv, None, g, y, short(&inp.wt.0));
    refused(e, "the weight gradient: 287 elements where 288 are needed");
    // A window larger than its (padded) input: no output, not an underflowed size.
    let wide = Conv {
        k: 11,
        stride: 1,
        pad: 0,
    };
    let e = conv::fwd(&*x.d, xv, None, wt, wide, y);
    refused(
        e,
        "a 11x11/1 pad 0 convolution has no output on a 6x6 input",
    );
    let e = conv::bwd_data(&*x.d, y, wt, wide, DataOut::overwrite(xv));
    refused(e, "has no output on a 6x6 input");
    let e = conv::bwd_weight(&*x.d, xv, None, wide, y, wt);
    refused(e, "has no output on a 6x6 input");
    assert!(all_nan(&read(&yb)), "a refused call wrote its output");
    // A view larger than its buffer cannot be made.
    let e = Nhwc::new(yb.slice(), (1, 6, 7, 8), 8).map(|_| ());
    refused(e, "does not fit in a device slice of 288");
}
