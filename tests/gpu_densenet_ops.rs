//! The DenseNet ops of `mura::gpu::ops` against the CPU reference ops (`mura::ops`, run in f64)
//! on the executor named by MURA_TEST_DEVICE (the emulator by default): fresh random inputs,
//! outputs poisoned with NaN, sizes that are not multiples of the tiles, channel prefixes and
//! slices of wider buffers. f32 storage within 1e-5 relative, bf16 storage within 1e-2.

use half::bf16;
use mura::gpu::ops::{self, BnSaved, Dt, View};
use mura::gpu::testing::{cols, fresh_seed, randn, rel_err, test_driver, untouched_outside};
use mura::gpu::{DevPtr, DeviceBuffer, Driver};
use mura::ops::conv::{bwd_data, bwd_weight, fwd, Conv, Image};
use mura::ops::{act, bn, pool, BnRelu};
use mura::rng::Rng;
use std::sync::Arc;

const NAN: u8 = 0xff;

/// A device buffer of activations in `dt` with the values it holds, as f64 (rounded to `dt`).
struct Buf {
    dev: DeviceBuffer<u8>,
    dt: Dt,
    len: usize,
}

impl Buf {
    fn poisoned(d: &Arc<dyn Driver>, dt: Dt, len: usize) -> Buf {
        let dev = DeviceBuffer::<u8>::alloc(d, len * dt.size()).unwrap();
        dev.fill_bytes(NAN).unwrap();
        Buf { dev, dt, len }
    }
    /// Uploads `v` (rounded to `dt`); returns the buffer and the rounded values.
    fn from(d: &Arc<dyn Driver>, dt: Dt, v: &[f64]) -> (Buf, Vec<f64>) {
        let b = Buf::poisoned(d, dt, v.len());
        b.write(v);
        let rounded = b.read();
        (b, rounded)
    }
    fn write(&self, v: &[f64]) {
        let bytes: Vec<u8> = match self.dt {
            Dt::F32 => {
                bytemuck::cast_slice(&v.iter().map(|&x| x as f32).collect::<Vec<_>>()).to_vec()
            }
            Dt::Bf16 => {
                bytemuck::cast_slice(&v.iter().map(|&x| bf16::from_f64(x)).collect::<Vec<_>>())
                    .to_vec()
            }
        };
        self.dev.copy_from(&bytes).unwrap();
    }
    fn read(&self) -> Vec<f64> {
        let bytes = self.dev.to_vec().unwrap();
        let v: Vec<f64> = match self.dt {
            Dt::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                .collect(),
            Dt::Bf16 => bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes(b.try_into().unwrap()).to_f64())
                .collect(),
        };
        assert_eq!(v.len(), self.len);
        v
    }
    fn ptr(&self) -> DevPtr {
        self.dev.ptr()
    }
    /// Address of element `i`.
    fn at(&self, i: usize) -> DevPtr {
        self.dt.at(self.ptr(), i)
    }
}

fn f32buf(d: &Arc<dyn Driver>, v: &[f64]) -> (Buf, Vec<f64>) {
    Buf::from(d, Dt::F32, v)
}

fn check(what: &str, got: &[f64], want: &[f64], tol: f64) {
    let e = rel_err(got, want);
    assert!(e <= tol, "{what}: rel err {e} > {tol}");
}

/// [`check`] of a result summed from terms whose magnitudes `terms` (`|a| + |b| + ...` per
/// element) can far exceed it: the storage type's rounding is relative to the terms, so the
/// bound is `tol` times the condition ‖terms‖ / ‖want‖ (at least 1). A BN over 2 rows is such
/// a case (x·scale and shift nearly cancel).
fn check_cond(what: &str, got: &[f64], want: &[f64], terms: &[f64], tol: f64) {
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let cond = (norm(terms) / norm(want).max(f64::MIN_POSITIVE)).max(1.0);
    check(
        &format!("{what} (condition {cond:.1})"),
        got,
        want,
        tol * cond,
    );
}

fn setup(test: &str) -> (Arc<dyn Driver>, Rng) {
    (
        test_driver().expect("test device"),
        Rng::new(fresh_seed(test)),
    )
}

/// Random BN+ReLU coefficients for `c` channels (about half the inputs clipped).
fn bn_relu(rng: &mut Rng, c: usize) -> (Vec<f64>, Vec<f64>) {
    (randn(rng, c, 0.5, 1.0), randn(rng, c, 0.5, 0.0))
}

/// Forward, backward-data and backward-weight of one convolution shape. The input is a
/// channel prefix (`c` of `x_rs`), the output a channel slice (`co` at `y_c0` of `y_rs`).
#[allow(clippy::too_many_arguments)]
fn conv_case(
    d: &Arc<dyn Driver>,
    rng: &mut Rng,
    dt: Dt,
    tol: f64,
    (n, h, w, c, x_rs): (usize, usize, usize, usize, usize),
    (co, y_c0, y_rs): (usize, usize, usize),
    g: Conv,
    with_pre: bool,
) {
    let what = format!(
        "{dt:?} conv k{} s{} p{} {n}x{h}x{w}x{c}->{co} pre={with_pre}",
        g.k, g.stride, g.pad
    );
    let (ho, wo) = g.out_hw(h, w);
    let (xb, xv) = Buf::from(d, dt, &randn(rng, n * h * w * x_rs, 1.0, 0.2));
    let (wb, wv) = f32buf(d, &randn(rng, g.k * g.k * c * co, 0.3, 0.0));
    let (s, t) = bn_relu(rng, c);
    let (sb, _) = f32buf(d, &s);
    let (tb, _) = f32buf(d, &t);
    let pre = with_pre.then(|| (sb.ptr(), tb.ptr()));
    let pre_ref = with_pre.then_some(BnRelu {
        scale: &s[..],
        shift: &t[..],
    });
    let xi = Image {
        data: &xv[..],
        n,
        h,
        w,
        c,
        rs: x_rs,
    };
    let view = View {
        ptr: xb.ptr(),
        n,
        h,
        w,
        c,
        rs: x_rs,
    };

    // Forward into a slice of a poisoned buffer.
    let yb = Buf::poisoned(d, dt, n * ho * wo * y_rs);
    ops::conv_fwd(&**d, dt, view, pre, wb.ptr(), co, g, yb.at(y_c0), y_rs).unwrap();
    let mut y_ref = vec![0.0; n * ho * wo * co];
    fwd(xi, pre_ref, &wv, co, g, &mut y_ref, co);
    let y = yb.read();
    check(
        &format!("{what} fwd"),
        &cols(&y, y_rs, y_c0, co),
        &y_ref,
        tol,
    );
    assert!(
        untouched_outside(&y, y_rs, y_c0, co),
        "{what}: fwd wrote outside its slice"
    );

    // dy: a slice of a wider buffer, as a dense layer's gradient buffer is.
    let (dyb, dyv) = Buf::from(d, dt, &randn(rng, n * ho * wo * y_rs, 1.0, 0.0));
    let dy = cols(&dyv, y_rs, y_c0, co);

    // Backward-data, accumulated into a prefix of a wider buffer holding random values.
    let dx_rs = c + 3;
    let (dxb, dx0) = Buf::from(d, dt, &randn(rng, n * h * w * dx_rs, 1.0, 0.0));
    ops::conv_bwd_data(
        &**d,
        dt,
        dyb.at(y_c0),
        y_rs,
        co,
        wb.ptr(),
        g,
        (n, h, w, c),
        dxb.ptr(),
        dx_rs,
        true,
    )
    .unwrap();
    let mut dx_ref = vec![0.0; n * h * w * c];
    bwd_data(&dy, co, co, &wv, g, (n, h, w, c), &mut dx_ref);
    let dx = dxb.read();
    let want: Vec<f64> = (0..n * h * w * dx_rs)
        .map(|i| {
            dx0[i]
                + if i % dx_rs < c {
                    dx_ref[i / dx_rs * c + i % dx_rs]
                } else {
                    0.0
                }
        })
        .collect();
    check(&format!("{what} bwd data (accumulate)"), &dx, &want, tol);
    // ... and overwriting a poisoned one.
    let dxb = Buf::poisoned(d, dt, n * h * w * c);
    ops::conv_bwd_data(
        &**d,
        dt,
        dyb.at(y_c0),
        y_rs,
        co,
        wb.ptr(),
        g,
        (n, h, w, c),
        dxb.ptr(),
        c,
        false,
    )
    .unwrap();
    check(&format!("{what} bwd data"), &dxb.read(), &dx_ref, tol);

    // Backward-weight, added to random f32 values.
    let (dwb, dw0) = f32buf(d, &randn(rng, wv.len(), 1.0, 0.0));
    ops::conv_bwd_weight(&**d, dt, view, pre, g, dyb.at(y_c0), y_rs, co, dwb.ptr()).unwrap();
    let mut dw_ref = dw0.clone();
    bwd_weight(xi, pre_ref, g, &dy, co, co, &mut dw_ref);
    check(&format!("{what} bwd weight"), &dwb.read(), &dw_ref, tol);
}

fn conv_all(test: &str, dt: Dt, tol: f64) {
    let (d, mut rng) = setup(test);
    let stem = Conv {
        k: 7,
        stride: 2,
        pad: 3,
    };
    let pointwise = Conv {
        k: 1,
        stride: 1,
        pad: 0,
    };
    let conv3 = Conv {
        k: 3,
        stride: 1,
        pad: 1,
    };
    let odd = Conv {
        k: 3,
        stride: 2,
        pad: 0,
    };
    conv_case(
        &d,
        &mut rng,
        dt,
        tol,
        (2, 13, 11, 3, 3),
        (7, 0, 7),
        stem,
        false,
    );
    conv_case(
        &d,
        &mut rng,
        dt,
        tol,
        (2, 5, 7, 19, 27),
        (13, 3, 20),
        pointwise,
        true,
    );
    conv_case(
        &d,
        &mut rng,
        dt,
        tol,
        (1, 9, 6, 17, 17),
        (70, 5, 77),
        conv3,
        true,
    );
    conv_case(
        &d,
        &mut rng,
        dt,
        tol,
        (2, 9, 8, 5, 6),
        (3, 0, 3),
        odd,
        false,
    );
}

#[test]
fn conv_f32() {
    conv_all("conv_f32", Dt::F32, 1e-5);
}

#[test]
fn conv_bf16() {
    conv_all("conv_bf16", Dt::Bf16, 1e-2);
}

/// Statistics, coefficients with the running-stat update, the fused apply and the backward of
/// one BN over a channel slice `[c0, c0 + c)` of a `[rows, rs]` buffer.
/// BN inputs `[rows, rs]` (channels `c0 .. c0 + c` used), gamma, beta and running statistics
/// `[c]` whose pre-activations x·scale + shift (batch and, after the running-stat update,
/// running statistics) all keep 1e-6 of their terms' size away from 0 (5× the f32 kernels'
/// rounding there), where they and the f64 reference could take different ReLU branches (about
/// 1 draw in 100 had one).
/// `x` as stored (rounded to `dt`); redrawn until well-posed.
#[allow(clippy::type_complexity)]
fn well_posed_bn(
    rng: &mut Rng,
    dt: Dt,
    (rows, c, c0, rs): (usize, usize, usize, usize),
) -> (Vec<f64>, [Vec<f64>; 4]) {
    let round = |v: f64| match dt {
        Dt::F32 => v as f32 as f64,
        Dt::Bf16 => bf16::from_f64(v).to_f64(),
    };
    loop {
        let xv: Vec<f64> = randn(rng, rows * rs, 2.0, 3.0)
            .into_iter()
            .map(round)
            .collect();
        let (gamma, beta) = (randn(rng, c, 0.5, 1.0), randn(rng, c, 0.5, 0.0));
        let (rm0, rv0) = (randn(rng, c, 1.0, 0.0), randn(rng, c, 0.1, 1.0));
        let x = cols(&xv, rs, c0, c);
        let (m, v) = bn::batch_stats(&x, rows, c, c);
        let (mut rm, mut rv) = (rm0.clone(), rv0.clone());
        bn::update_running(&mut rm, &mut rv, &m, &v, rows);
        let clear = |(s, t): (Vec<f64>, Vec<f64>)| {
            (0..rows * c).all(|i| {
                let (xs, t) = (x[i] * s[i % c], t[i % c]);
                (xs + t).abs() >= 1e-6 * (xs.abs() + t.abs())
            })
        };
        if clear(bn::scale_shift(&gamma, &beta, &m, &v))
            && clear(bn::scale_shift(&gamma, &beta, &rm, &rv))
        {
            return (xv, [gamma, beta, rm0, rv0]);
        }
    }
}

fn bn_all(test: &str, dt: Dt, tol: f64) {
    let (d, mut rng) = setup(test);
    for (rows, c, c0, rs) in [
        (37usize, 5usize, 2usize, 9usize),
        (3000, 40, 0, 40),
        (2, 3, 1, 4),
    ] {
        let what = format!("{dt:?} bn rows={rows} c={c}");
        let (xv, [gamma, beta, rm0, rv0]) = well_posed_bn(&mut rng, dt, (rows, c, c0, rs));
        let (xb, xv2) = Buf::from(&d, dt, &xv);
        assert_eq!(xv, xv2, "stored as drawn");
        let x = cols(&xv, rs, c0, c);
        let part = DeviceBuffer::<f32>::alloc(&d, ops::bn_scratch_len(c)).unwrap();
        let coef = DeviceBuffer::<f32>::alloc(&d, 2 * c).unwrap();
        let mean = Buf::poisoned(&d, Dt::F32, c);
        let var = Buf::poisoned(&d, Dt::F32, c);
        ops::bn_stats(
            &*d,
            dt,
            xb.at(c0),
            rows,
            c,
            rs,
            mean.ptr(),
            var.ptr(),
            part.ptr(),
        )
        .unwrap();
        let (m_ref, v_ref) = bn::batch_stats(&x, rows, c, c);
        check(&format!("{what} mean"), &mean.read(), &m_ref, tol.min(1e-5));
        check(&format!("{what} var"), &var.read(), &v_ref, tol.min(1e-5));

        // Coefficients and the running-stat update (train), then from running stats (eval).
        let (gb, _) = f32buf(&d, &gamma);
        let (bb, _) = f32buf(&d, &beta);
        let (rmb, _) = f32buf(&d, &rm0);
        let (rvb, _) = f32buf(&d, &rv0);
        let scale = Buf::poisoned(&d, Dt::F32, c);
        let shift = Buf::poisoned(&d, Dt::F32, c);
        let run = Some((rmb.ptr(), rvb.ptr(), rows));
        ops::bn_coeffs(
            &*d,
            gb.ptr(),
            bb.ptr(),
            mean.ptr(),
            var.ptr(),
            run,
            None,
            c,
            scale.ptr(),
            shift.ptr(),
        )
        .unwrap();
        let (mg, vg) = (mean.read(), var.read());
        let (s_ref, t_ref) = bn::scale_shift(&gamma, &beta, &mg, &vg);
        check(&format!("{what} scale"), &scale.read(), &s_ref, 1e-5);
        check(&format!("{what} shift"), &shift.read(), &t_ref, 1e-5);
        let (mut rm, mut rv) = (rm0.clone(), rv0.clone());
        bn::update_running(&mut rm, &mut rv, &mg, &vg, rows);
        check(&format!("{what} running mean"), &rmb.read(), &rm, 1e-5);
        check(&format!("{what} running var"), &rvb.read(), &rv, 1e-5);
        let (es, et) = (Buf::poisoned(&d, Dt::F32, c), Buf::poisoned(&d, Dt::F32, c));
        let rm_before = rmb.read();
        ops::bn_coeffs(
            &*d,
            gb.ptr(),
            bb.ptr(),
            rmb.ptr(),
            rvb.ptr(),
            None,
            None,
            c,
            es.ptr(),
            et.ptr(),
        )
        .unwrap();
        let (es_ref, et_ref) = bn::scale_shift(&gamma, &beta, &rm, &rv);
        check(&format!("{what} eval scale"), &es.read(), &es_ref, 1e-5);
        check(&format!("{what} eval shift"), &et.read(), &et_ref, 1e-5);
        check(
            &format!("{what} running stats unchanged by eval"),
            &rmb.read(),
            &rm_before,
            0.0,
        );

        // Apply (+ ReLU) into a slice.
        for relu in [false, true] {
            let yb = Buf::poisoned(&d, dt, rows * (c + 2));
            ops::bn_act(
                &*d,
                dt,
                xb.at(c0),
                rs,
                rows,
                c,
                (scale.ptr(), shift.ptr()),
                relu,
                yb.at(1),
                c + 2,
            )
            .unwrap();
            let mut y_ref = vec![0.0; rows * c];
            bn::apply(&x, rows, c, c, &s_ref, &t_ref, relu, &mut y_ref, c);
            let y = yb.read();
            let terms: Vec<f64> = (0..rows * c)
                .map(|i| (x[i] * s_ref[i % c]).abs() + t_ref[i % c].abs())
                .collect();
            check_cond(
                &format!("{what} apply relu={relu}"),
                &cols(&y, c + 2, 1, c),
                &y_ref,
                &terms,
                tol,
            );
            assert!(
                untouched_outside(&y, c + 2, 1, c),
                "{what}: apply wrote outside its slice"
            );
        }

        // Backward, train and eval, with and without ReLU, accumulated into a slice.
        for (train, relu) in [(true, true), (true, false), (false, true)] {
            let (st_m, st_v) = if train {
                (mean.ptr(), var.ptr())
            } else {
                (rmb.ptr(), rvb.ptr())
            };
            let (sc, sh) = if train {
                (scale.ptr(), shift.ptr())
            } else {
                (es.ptr(), et.ptr())
            };
            let (m_used, v_used) = if train {
                (mg.clone(), vg.clone())
            } else {
                (rm.clone(), rv.clone())
            };
            let (dyb, dy) = Buf::from(&d, dt, &randn(&mut rng, rows * c, 1.0, 0.0));
            let dx_rs = c + 1;
            let (dxb, dx0) = Buf::from(&d, dt, &randn(&mut rng, rows * dx_rs, 1.0, 0.0));
            let (dgb, dg0) = f32buf(&d, &randn(&mut rng, c, 1.0, 0.0));
            let (dbb, db0) = f32buf(&d, &randn(&mut rng, c, 1.0, 0.0));
            let saved = BnSaved {
                x: xb.at(c0),
                rs,
                rows,
                c,
                mean: st_m,
                var: st_v,
                scale: sc,
                shift: sh,
            };
            ops::bn_bwd(
                &*d,
                dt,
                saved,
                relu,
                train,
                dyb.ptr(),
                c,
                (dgb.ptr(), dbb.ptr()),
                dxb.ptr(),
                dx_rs,
                true,
                (part.ptr(), coef.ptr()),
            )
            .unwrap();
            let (mut dg, mut db) = (dg0.clone(), db0.clone());
            let mut dx_ref = cols(&dx0, dx_rs, 0, c);
            bn::backward(
                &x,
                rows,
                c,
                c,
                &gamma,
                &beta,
                &m_used,
                &v_used,
                relu,
                train,
                &dy,
                c,
                &mut dg,
                &mut db,
                &mut dx_ref,
                c,
            );
            let dx = dxb.read();
            let w = format!("{what} bwd train={train} relu={relu}");
            check(&format!("{w} dx"), &cols(&dx, dx_rs, 0, c), &dx_ref, tol);
            check(
                &format!("{w} dx beyond c"),
                &cols(&dx, dx_rs, c, 1),
                &cols(&dx0, dx_rs, c, 1),
                0.0,
            );
            check(&format!("{w} dgamma"), &dgb.read(), &dg, tol);
            check(&format!("{w} dbeta"), &dbb.read(), &db, tol);
        }

        // The same statistics and training backward (with ReLU) from per-channel sums, as the
        // tensor-core convolutions' epilogues accumulate them: Σx, Σx² for the statistics; the
        // masked gradient dz and Σdz, Σdz·x for the backward. x has mean 3, so a lost
        // mean·Σdz term would show. The backward's Σdz·(x − mean) = Σdz·x − mean·Σdz cancels
        // (f32 sums, mean 3 next to std 2, few rows): within 1e-4 in f32 (the path serves bf16
        // storage, whose rounding is 2e-3).
        let sum_cols = |a: &[f64], b: &[f64]| {
            let mut s = vec![0.0; 2 * c];
            for r in 0..rows {
                for j in 0..c {
                    s[j] += a[r * c + j];
                    s[c + j] += a[r * c + j] * b[r * c + j];
                }
            }
            s
        };
        // The coefficients of a BN over 3 more channels than the sums cover: those 3 take
        // their statistics from mean, var (left as they were), the last c from the sums (written
        // into mean, var); the running statistics of all are updated, the sums zeroed.
        let (sums, _) = f32buf(&d, &sum_cols(&x, &x));
        let cc = c + 3;
        let (m_head, v_head) = (randn(&mut rng, 3, 1.0, 0.0), randn(&mut rng, 3, 0.2, 1.0));
        let poison = vec![f64::NAN; c];
        let (m2, m_head) = f32buf(&d, &[&m_head[..], &poison].concat());
        let (v2, v_head) = f32buf(&d, &[&v_head[..], &poison].concat());
        let (gamma2, beta2) = (randn(&mut rng, cc, 0.5, 1.0), randn(&mut rng, cc, 0.5, 0.0));
        let (g2, _) = f32buf(&d, &gamma2);
        let (b2, _) = f32buf(&d, &beta2);
        let (rm2_0, rv2_0) = (randn(&mut rng, cc, 1.0, 0.0), randn(&mut rng, cc, 0.1, 1.0));
        let (rm2, _) = f32buf(&d, &rm2_0);
        let (rv2, _) = f32buf(&d, &rv2_0);
        let (s2, t2) = (
            Buf::poisoned(&d, Dt::F32, cc),
            Buf::poisoned(&d, Dt::F32, cc),
        );
        ops::bn_coeffs(
            &*d,
            g2.ptr(),
            b2.ptr(),
            m2.ptr(),
            v2.ptr(),
            Some((rm2.ptr(), rv2.ptr(), rows)),
            Some((sums.ptr(), c)),
            cc,
            s2.ptr(),
            t2.ptr(),
        )
        .unwrap();
        let (m_all, v_all) = (m2.read(), v2.read());
        check(&format!("{what} mean kept"), &m_all[..3], &m_head[..3], 0.0);
        check(&format!("{what} var kept"), &v_all[..3], &v_head[..3], 0.0);
        check(&format!("{what} mean from sums"), &m_all[3..], &m_ref, 1e-5);
        // var = Σx²/rows − mean²: f32 sums, so relative to Σx²/rows (over 2 rows var can be
        // far smaller).
        let second: Vec<f64> = (0..c).map(|j| v_ref[j] + m_ref[j] * m_ref[j]).collect();
        check_cond(
            &format!("{what} var from sums"),
            &v_all[3..],
            &v_ref,
            &second,
            1e-5,
        );
        assert!(
            sums.read().iter().all(|&v| v == 0.0),
            "{what}: sums not zeroed"
        );
        let (s_all, t_all) = bn::scale_shift(&gamma2, &beta2, &m_all, &v_all);
        check(&format!("{what} scale (sums)"), &s2.read(), &s_all, 1e-5);
        check(&format!("{what} shift (sums)"), &t2.read(), &t_all, 1e-5);
        let (mut rm, mut rv) = (rm2_0.clone(), rv2_0.clone());
        bn::update_running(&mut rm, &mut rv, &m_all, &v_all, rows);
        check(
            &format!("{what} running mean (sums)"),
            &rm2.read(),
            &rm,
            1e-5,
        );
        check(
            &format!("{what} running var (sums)"),
            &rv2.read(),
            &rv,
            1e-5,
        );
        let dy = randn(&mut rng, rows * c, 1.0, 0.0);
        let dz: Vec<f64> = (0..rows * c)
            .map(|i| {
                let j = i % c;
                let on = x[i] * s_ref[j] + t_ref[j] > 0.0;
                if on {
                    dy[i]
                } else {
                    0.0
                }
            })
            .collect();
        let (dzb, dz) = Buf::from(&d, dt, &dz);
        let (red, _) = f32buf(&d, &sum_cols(&dz, &x));
        let dx_rs = c + 1;
        let (dxb, dx0) = Buf::from(&d, dt, &randn(&mut rng, rows * dx_rs, 1.0, 0.0));
        let (dgb, dg0) = f32buf(&d, &randn(&mut rng, c, 1.0, 0.0));
        let (dbb, db0) = f32buf(&d, &randn(&mut rng, c, 1.0, 0.0));
        let saved = BnSaved {
            x: xb.at(c0),
            rs,
            rows,
            c,
            mean: mean.ptr(),
            var: var.ptr(),
            scale: scale.ptr(),
            shift: shift.ptr(),
        };
        ops::bn_bwd_from_sums(
            &*d,
            dt,
            saved,
            red.ptr(),
            dzb.ptr(),
            c,
            (dgb.ptr(), dbb.ptr()),
            dxb.ptr(),
            dx_rs,
            true,
            coef.ptr(),
        )
        .unwrap();
        let (mut dg, mut db) = (dg0.clone(), db0.clone());
        let mut dx_ref = cols(&dx0, dx_rs, 0, c);
        bn::backward(
            &x,
            rows,
            c,
            c,
            &gamma,
            &beta,
            &mg,
            &vg,
            true,
            true,
            &dz,
            c,
            &mut dg,
            &mut db,
            &mut dx_ref,
            c,
        );
        let dx = dxb.read();
        let w = format!("{what} bwd from sums");
        let tol = tol.max(1e-4);
        // dx = dx0 + scale·(dz − Σdz/N − x̂·Σdz·(x − mean)/(N·σ)), the last sum taken as
        // Σdz·x − mean·Σdz from f32 sums: relative to those terms' sizes (over 2 rows they cancel
        // to nothing).
        let n = rows as f64;
        let (mut sum_dz, mut sum_dzx) = (vec![0.0; c], vec![0.0; c]);
        for i in 0..rows * c {
            sum_dz[i % c] += dz[i].abs();
            sum_dzx[i % c] += (dz[i] * x[i]).abs();
        }
        let terms: Vec<f64> = (0..rows * c)
            .map(|i| {
                let j = i % c;
                let sd = (vg[j] + 1e-5).sqrt();
                let xhat = (x[i] - mg[j]) / sd;
                let sum_dzx = sum_dzx[j] + mg[j].abs() * sum_dz[j];
                dx0[(i / c) * dx_rs + j].abs()
                    + s_ref[j].abs()
                        * (dz[i].abs() + sum_dz[j] / n + xhat.abs() * sum_dzx / (n * sd))
            })
            .collect();
        check_cond(
            &format!("{w} dx"),
            &cols(&dx, dx_rs, 0, c),
            &dx_ref,
            &terms,
            tol,
        );
        check(
            &format!("{w} dx beyond c"),
            &cols(&dx, dx_rs, c, 1),
            &cols(&dx0, dx_rs, c, 1),
            0.0,
        );
        check(&format!("{w} dgamma"), &dgb.read(), &dg, tol);
        check(&format!("{w} dbeta"), &dbb.read(), &db, tol);
        assert!(red.read().iter().all(|&v| v == 0.0), "{w}: red not zeroed");

        // Deferred: the epilogue added scale·dz into dx; bn_bwd_defer adds the rest's per-channel
        // (alpha, beta) to ones already there (another reader's share), bn_grad_fix applies them.
        let (red, _) = f32buf(&d, &sum_cols(&dz, &x));
        let other = randn(&mut rng, 2 * c, 0.1, 0.0);
        let (corr, _) = f32buf(&d, &other);
        let after_epilogue: Vec<f64> = (0..rows * dx_rs)
            .map(|i| {
                let (r, j) = (i / dx_rs, i % dx_rs);
                dx0[i] + if j < c { s_ref[j] * dz[r * c + j] } else { 0.0 }
            })
            .collect();
        // (As stored: the epilogue's output is rounded to the storage type before the fix.)
        let (dxb, stored) = Buf::from(&d, dt, &after_epilogue);
        let (dgb, _) = f32buf(&d, &dg0);
        let (dbb, _) = f32buf(&d, &db0);
        let ab = (corr.ptr(), ops::f32_at(corr.ptr(), c));
        ops::bn_bwd_defer(&*d, saved, red.ptr(), (dgb.ptr(), dbb.ptr()), ab).unwrap();
        assert!(
            red.read().iter().all(|&v| v == 0.0),
            "{what}: red not zeroed by defer"
        );
        // The reference: what was stored, plus the exact rest of the BN backward (the direct
        // path's result less the per-element term) and the other reader's share. (Against the
        // direct result itself, bf16's rounding of the stored intermediate would count: when the
        // rest cancels most of scale·dz, as with 2 rows, that is more than 1e-2 of the result.)
        let (mut want, mut terms) = (Vec::new(), Vec::new());
        for r in 0..rows {
            for j in 0..c {
                let i = r * dx_rs + j;
                let rest = dx_ref[r * c + j] - after_epilogue[i];
                let share = other[j] + other[c + j] * x[r * c + j];
                want.push(stored[i] + rest + share);
                terms.push(stored[i].abs() + rest.abs() + share.abs());
            }
        }
        ops::bn_grad_fix(&*d, dt, (dxb.ptr(), dx_rs), (xb.at(c0), rs), rows, c, ab).unwrap();
        let dx = dxb.read();
        let w = format!("{what} bwd deferred");
        check_cond(
            &format!("{w} dx"),
            &cols(&dx, dx_rs, 0, c),
            &want,
            &terms,
            tol,
        );
        check(
            &format!("{w} dx beyond c"),
            &cols(&dx, dx_rs, c, 1),
            &cols(&dx0, dx_rs, c, 1),
            0.0,
        );
        check(&format!("{w} dgamma"), &dgb.read(), &dg, tol);
        check(&format!("{w} dbeta"), &dbb.read(), &db, tol);
    }
}

#[test]
fn batchnorm_f32() {
    bn_all("batchnorm_f32", Dt::F32, 1e-5);
}

#[test]
fn batchnorm_bf16() {
    bn_all("batchnorm_bf16", Dt::Bf16, 1e-2);
}

fn pool_all(test: &str, dt: Dt, tol: f64) {
    let (d, mut rng) = setup(test);
    for (n, h, w, c) in [(2usize, 7usize, 6usize, 3usize), (1, 9, 11, 37)] {
        let what = format!("{dt:?} pool {n}x{h}x{w}x{c}");
        // Max pool into a slice, and back (negative inputs: padding must never win); then of BN +
        // ReLU of the input (the stem's norm0 + relu0, applied as the pool reads), whose
        // gradient is that of the BN + ReLU's output.
        let (ho, wo) = pool::maxpool_out(h, w);
        let (s, t) = bn_relu(&mut rng, c);
        let (sb, _) = f32buf(&d, &s);
        let (tb, _) = f32buf(&d, &t);
        let y_rs = c + 4;
        let (dyb, dyv) = Buf::from(&d, dt, &randn(&mut rng, n * ho * wo * y_rs, 1.0, 0.0));
        for with_pre in [false, true] {
            let what = format!("{what} maxpool pre={with_pre}");
            let mean = if with_pre { 0.0 } else { -3.0 };
            let (xb, x) = Buf::from(&d, dt, &randn(&mut rng, n * h * w * c, 1.0, mean));
            let view = View {
                ptr: xb.ptr(),
                n,
                h,
                w,
                c,
                rs: c,
            };
            let pre = with_pre.then(|| (sb.ptr(), tb.ptr()));
            // What the pool sees: x, or max(x * scale + shift, 0).
            let seen: Vec<f64> = match with_pre {
                false => x.clone(),
                true => (0..x.len())
                    .map(|i| (x[i] * s[i % c] + t[i % c]).max(0.0))
                    .collect(),
            };
            let yb = Buf::poisoned(&d, dt, n * ho * wo * y_rs);
            ops::maxpool_fwd(&*d, dt, view, pre, yb.at(2), y_rs).unwrap();
            let mut y_ref = vec![0.0; n * ho * wo * c];
            pool::maxpool_fwd(&seen, n, h, w, c, &mut y_ref, c);
            let y = yb.read();
            // (Without the BN + ReLU the pool copies values: exact.)
            let fwd_tol = if with_pre { tol } else { tol.min(1e-5) };
            check(
                &format!("{what} fwd"),
                &cols(&y, y_rs, 2, c),
                &y_ref,
                fwd_tol,
            );
            assert!(
                untouched_outside(&y, y_rs, 2, c),
                "{what}: wrote outside its slice"
            );
            let dxb = Buf::poisoned(&d, dt, n * h * w * c);
            ops::maxpool_bwd(&*d, dt, view, pre, dyb.at(2), y_rs, dxb.ptr()).unwrap();
            let mut dx_ref = vec![0.0; n * h * w * c];
            pool::maxpool_bwd(&seen, n, h, w, c, &cols(&dyv, y_rs, 2, c), c, &mut dx_ref);
            check(&format!("{what} bwd"), &dxb.read(), &dx_ref, tol);
        }

        // Avg pool of BN + ReLU of a channel prefix, and back.
        let x_rs = c + 2;
        let (xb, xv) = Buf::from(&d, dt, &randn(&mut rng, n * h * w * x_rs, 1.0, 0.0));
        let x = cols(&xv, x_rs, 0, c);
        let (s, t) = bn_relu(&mut rng, c);
        let (sb, _) = f32buf(&d, &s);
        let (tb, _) = f32buf(&d, &t);
        let (hp, wp) = (h / 2, w / 2);
        for pre in [false, true] {
            let yb = Buf::poisoned(&d, dt, n * hp * wp * c);
            let view = View {
                ptr: xb.ptr(),
                n,
                h,
                w,
                c,
                rs: x_rs,
            };
            ops::avgpool_fwd(
                &*d,
                dt,
                view,
                pre.then(|| (sb.ptr(), tb.ptr())),
                yb.ptr(),
                c,
            )
            .unwrap();
            let mut y_ref = vec![0.0; n * hp * wp * c];
            let p = pre.then_some(BnRelu {
                scale: &s[..],
                shift: &t[..],
            });
            pool::avgpool_fwd(&x, n, h, w, c, p, &mut y_ref, c);
            check(
                &format!("{what} avgpool fwd pre={pre}"),
                &yb.read(),
                &y_ref,
                tol,
            );
        }
        let (dyb, dy) = Buf::from(&d, dt, &randn(&mut rng, n * hp * wp * c, 1.0, 0.0));
        let dxb = Buf::poisoned(&d, dt, n * h * w * c);
        ops::avgpool_bwd(&*d, dt, (n, h, w, c), dyb.ptr(), c, dxb.ptr()).unwrap();
        let mut dx_ref = vec![0.0; n * h * w * c];
        pool::avgpool_bwd(n, h, w, c, &dy, c, &mut dx_ref);
        check(&format!("{what} avgpool bwd"), &dxb.read(), &dx_ref, tol);

        // Global average pool and the single-logit linear layer, and back.
        let hw = h * w;
        let (xb, x) = Buf::from(&d, dt, &randn(&mut rng, n * hw * c, 1.0, 0.5));
        let feat = Buf::poisoned(&d, Dt::F32, n * c);
        ops::gap_fwd(&*d, dt, xb.ptr(), n, hw, c, feat.ptr()).unwrap();
        let feat_ref = pool::gap_fwd(&x, n, hw, c);
        check(
            &format!("{what} gap fwd"),
            &feat.read(),
            &feat_ref,
            tol.min(1e-5),
        );
        let fv = feat.read();
        let (wb, wv) = f32buf(&d, &randn(&mut rng, c + 1, 0.5, 0.0));
        let logits = Buf::poisoned(&d, Dt::F32, n);
        ops::linear_fwd(
            &*d,
            feat.ptr(),
            n,
            c,
            wb.ptr(),
            wb.dt.at(wb.ptr(), c),
            logits.ptr(),
        )
        .unwrap();
        let l_ref = act::linear_fwd(&fv, n, c, &wv[..c], &wv[c..]);
        // (A dot product of mixed signs: relative to its terms' magnitudes.)
        let terms: Vec<f64> = (0..n)
            .map(|i| {
                let row = &fv[i * c..][..c];
                row.iter().zip(&wv).map(|(f, w)| (f * w).abs()).sum::<f64>() + wv[c].abs()
            })
            .collect();
        check_cond(
            &format!("{what} linear fwd"),
            &logits.read(),
            &l_ref,
            &terms,
            1e-5,
        );
        let (dlb, dl) = f32buf(&d, &randn(&mut rng, n, 1.0, 0.0));
        let (dwb, dw0) = f32buf(&d, &randn(&mut rng, c + 1, 1.0, 0.0));
        let dfeat = Buf::poisoned(&d, Dt::F32, n * c);
        let dw_dev = (dwb.ptr(), dwb.dt.at(dwb.ptr(), c));
        ops::linear_bwd(
            &*d,
            feat.ptr(),
            n,
            c,
            wb.ptr(),
            dlb.ptr(),
            dw_dev,
            dfeat.ptr(),
        )
        .unwrap();
        let mut dw = dw0.clone();
        let (dwr, dbr) = dw.split_at_mut(c);
        let dfeat_ref = act::linear_bwd(&fv, n, c, &wv[..c], &dl, dwr, dbr);
        check(&format!("{what} linear bwd dw"), &dwb.read(), &dw, 1e-5);
        check(
            &format!("{what} linear bwd dfeat"),
            &dfeat.read(),
            &dfeat_ref,
            1e-5,
        );
        let dxb = Buf::poisoned(&d, dt, n * hw * c);
        ops::gap_bwd(&*d, dt, dfeat.ptr(), n, hw, c, dxb.ptr()).unwrap();
        let mut dx_ref = vec![0.0; n * hw * c];
        pool::gap_bwd(&dfeat.read(), n, hw, c, &mut dx_ref);
        check(&format!("{what} gap bwd"), &dxb.read(), &dx_ref, tol);
    }
}

#[test]
fn pool_and_head_f32() {
    pool_all("pool_and_head_f32", Dt::F32, 1e-5);
}

#[test]
fn pool_and_head_bf16() {
    pool_all("pool_and_head_bf16", Dt::Bf16, 1e-2);
}

/// Device augmentation against `augment_image`: bit-identical in f32 (so a GPU run sees exactly
/// the CPU's inputs), within 1e-2 in bf16; flips, rotations up to 30°, shrinking and identity.
#[test]
fn augment_matches_cpu() {
    use mura::data::loader::{aug_params, augment_image, AugParams, Augment};
    let (d, mut rng) = setup("augment_matches_cpu");
    let aug = Augment {
        flip: true,
        max_rotation_deg: 30.0,
    };
    let seed = rng.next_u64();
    for (n, src_size, out_size) in [(5usize, 40usize, 32usize), (2, 23, 23), (1, 17, 29)] {
        let src: Vec<u8> = (0..n * src_size * src_size)
            .map(|_| (rng.uniform() * 256.0) as u8)
            .collect();
        let mut params: Vec<AugParams> = (0..n).map(|i| aug_params(&aug, seed, 3, i)).collect();
        params[0] = AugParams::IDENTITY;
        let srcb = DeviceBuffer::from_slice(&d, &src).unwrap();
        let steps = DeviceBuffer::<f32>::alloc(&d, 4 * n).unwrap();
        let len = out_size * out_size * 3;
        let mut want = vec![0f32; n * len];
        for (i, p) in params.iter().enumerate() {
            let img = &src[i * src_size * src_size..][..src_size * src_size];
            augment_image(img, src_size, *p, out_size, &mut want[i * len..][..len]);
        }
        for (dt, tol) in [(Dt::F32, 0.0), (Dt::Bf16, 1e-2)] {
            let out = Buf::poisoned(&d, dt, n * len);
            ops::augment(
                &*d,
                dt,
                srcb.ptr(),
                src_size,
                &params,
                out_size,
                steps.ptr(),
                out.ptr(),
            )
            .unwrap();
            let got = out.read();
            let want: Vec<f64> = want.iter().map(|&v| v as f64).collect();
            check(
                &format!("{dt:?} augment {n}x{src_size}->{out_size}"),
                &got,
                &want,
                tol,
            );
        }
    }
}
