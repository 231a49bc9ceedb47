//! `gpu::ops::linear` (the head's single-logit layer, f32) against `ops::linear` in f64: logits
//! from pooled features, and back: the weight gradient added to random values, the features'
//! gradient overwriting a poisoned buffer.

use crate::common::gpu::{all_nan, check, check_cond, read, refused, Exec};
use mura::gpu::ops::linear;
use mura::gpu::{DeviceBuffer, Mat, Slice};
use mura::ops::linear as cpu;

/// `[n, c]` features (pooled activations: about 0.5), 2 x 3 and 1 x 37 as the pool tests' head
/// saw them, and 3 x 300 (more channels than a block has threads).
#[test]
fn head() {
    let x = &mut Exec::new::<f32>("linear_head");
    for (n, c) in [(2, 3), (1, 37), (3, 300)] {
        case(x, n, c);
    }
}

/// The weights `[c]` and bias `[1]` of a `[c + 1]` buffer.
fn wb(b: &DeviceBuffer<f32>, c: usize) -> (Slice<f32>, Slice<f32>) {
    (
        b.slice().range(0, c).unwrap(),
        b.slice().range(c, 1).unwrap(),
    )
}

fn case(x: &mut Exec, n: usize, c: usize) {
    let what = format!("linear [{n}, {c}]");
    let (feat, fv) = x.random::<f32>(n * c, 0.3, 0.5);
    let fm = Mat::dense(feat.slice(), n, c).unwrap();
    let (wt, wv) = x.random::<f32>(c + 1, 0.5, 0.0);
    let logits = x.poisoned::<f32>(n);
    linear::fwd(&*x.d, fm, wb(&wt, c), logits.slice()).unwrap();
    let l_ref = cpu::fwd(&fv, n, c, &wv[..c], &wv[c..]);
    // (A dot product of mixed signs: relative to its terms' magnitudes.)
    let terms: Vec<f64> = (0..n)
        .map(|i| {
            let row = &fv[i * c..][..c];
            row.iter().zip(&wv).map(|(f, w)| (f * w).abs()).sum::<f64>() + wv[c].abs()
        })
        .collect();
    check_cond(&format!("{what} fwd"), &read(&logits), &l_ref, &terms, 1e-5);

    let (dl, dlv) = x.random::<f32>(n, 1.0, 0.0);
    let (dw, dw0) = x.random::<f32>(c + 1, 1.0, 0.0);
    let dfeat = x.poisoned::<f32>(n * c);
    let dfm = Mat::dense(dfeat.slice(), n, c).unwrap();
    linear::bwd(&*x.d, fm, wb(&wt, c), dl.slice(), wb(&dw, c), dfm).unwrap();
    let mut dw_ref = dw0.clone();
    let (dwr, dbr) = dw_ref.split_at_mut(c);
    let df_ref = cpu::bwd(&fv, n, c, &wv[..c], &dlv, dwr, dbr);
    check(&format!("{what} bwd dw"), &read(&dw), &dw_ref, 1e-5);
    check(&format!("{what} bwd dfeat"), &read(&dfeat), &df_ref, 1e-5);
}

/// Weights, biases and gradients that do not match the features are refused before anything is
/// launched.
#[test]
fn refuses_operands_that_do_not_fit() {
    let x = &mut Exec::new::<f32>("linear_refuses");
    let (n, c) = (2, 5);
    let (feat, _) = x.random::<f32>(n * (c + 1), 1.0, 0.0);
    let fm = Mat::dense(feat.slice(), n, c).unwrap();
    let (wt, out) = (x.poisoned::<f32>(c + 1), x.poisoned::<f32>(n * c));
    let d = &*x.d;
    let e = linear::fwd(d, fm, wb(&wt, c - 1), out.slice());
    refused(
        e,
        "a linear layer of [2, 5] features (row stride 5) with 4 weights and 1 biases",
    );
    let strided = Mat::new(feat.slice(), n, c, c + 1).unwrap();
    let e = linear::fwd(d, strided, wb(&wt, c), out.slice());
    refused(e, "a linear layer of [2, 5] features (row stride 6)");
    let e = linear::fwd(d, fm, wb(&wt, c), out.slice().range(0, 1).unwrap());
    refused(e, "the logits: 1 elements where 2 are needed");
    let dfm = Mat::dense(out.slice(), 1, c).unwrap();
    let e = linear::bwd(d, fm, wb(&wt, c), out.slice(), wb(&wt, c), dfm);
    refused(e, "the features' gradient has 1 rows for 2");
    assert!(
        all_nan(&read(&out)) && all_nan(&read(&wt)),
        "a refused call wrote"
    );
}
