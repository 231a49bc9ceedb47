//! Whole-model checks: finite differences through a tiny DenseNet in both BN modes (f64), and
//! the torchvision state-dict boundary.

use super::tiny;
use mura::model::DenseNet;
use mura::ops::Mode;
use mura::rng::Rng;
use mura::spec::Role;
use mura::weights::{self, Problem, StateDict, TensorData};

/// A tiny model with random (non-trivial) BN gammas/betas and running stats.
fn randomised(seed: u64) -> DenseNet<f64> {
    let spec = tiny();
    let mut sd = DenseNet::<f32>::new(spec.clone(), seed).to_state_dict();
    let mut rng = Rng::new(seed ^ 0xABCD);
    for t in &mut sd.tensors {
        let is_bn = t.name.contains("norm");
        if let TensorData::F32(v) = &mut t.data {
            for x in v.iter_mut() {
                *x = match () {
                    _ if is_bn && t.name.ends_with(".weight") => rng.range(0.5, 1.5) as f32,
                    _ if t.name.ends_with("running_var") => rng.range(0.5, 1.5) as f32,
                    _ if is_bn || t.name == "classifier.bias" => (0.3 * rng.normal()) as f32,
                    _ => *x,
                }
            }
        }
    }
    DenseNet::from_state_dict(spec, &sd).unwrap()
}

/// Central differences of `sum(logits * r)` over every parameter against one backward after a
/// recording forward in `mode`; every parameter tensor must receive gradient. In Eval mode
/// the forward must leave the BN state alone.
#[allow(clippy::needless_range_loop)]
fn whole_densenet_fd(mode: Mode, seed: u64) {
    let mut m = randomised(seed);
    let (n, h, w) = (2, 16, 16);
    let mut rng = Rng::new(seed + 1);
    let x: Vec<f64> = (0..n * h * w * 3).map(|_| rng.normal()).collect();
    let r: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
    let (before, plain) = (m.to_state_dict(), m.forward(&x, n, h, w, Mode::Eval));
    m.zero_grad();
    let logits = if mode == Mode::Train {
        m.forward(&x, n, h, w, mode)
    } else {
        m.forward_recorded(&x, n, h, w, mode)
    };
    assert_eq!(logits.len(), n);
    if mode == Mode::Eval {
        assert_eq!(logits, plain, "recording changed the logits");
        assert_eq!(m.to_state_dict(), before, "eval forward touched BN state");
    }
    m.backward(&r);
    let analytic = m.grads.clone();
    let loss = |m: &mut DenseNet<f64>| -> f64 {
        let y = m.forward(&x, n, h, w, mode);
        y.iter().zip(&r).map(|(a, b)| a * b).sum()
    };
    let eps = 1e-6;
    let (mut num, mut den) = (0.0, 0.0);
    let mut worst = (0.0f64, 0usize);
    for i in 0..m.params.len() {
        let p0 = m.params[i];
        m.params[i] = p0 + eps;
        let fp = loss(&mut m);
        m.params[i] = p0 - eps;
        let fm = loss(&mut m);
        m.params[i] = p0;
        let g = (fp - fm) / (2.0 * eps);
        let d = (g - analytic[i]).abs();
        num += d * d;
        den += g * g;
        if d > worst.0 {
            worst = (d, i);
        }
    }
    let rel = (num / den).sqrt();
    eprintln!(
        "whole tiny DenseNet {mode:?}: {} params, gradient rel err {rel:.2e}",
        analytic.len()
    );
    assert!(
        rel <= 1e-6,
        "{mode:?} whole-model gradient rel err {rel}, worst |diff| {:e} at param {}",
        worst.0,
        worst.1
    );
    // Every parameter tensor receives gradient (nothing silently detached).
    let mut at = 0;
    for t in tiny()
        .state_dict_layout()
        .iter()
        .filter(|t| t.role == Role::Param)
    {
        let g = &analytic[at..at + t.numel()];
        assert!(
            g.iter().any(|v| *v != 0.0),
            "{mode:?}: {} has an all-zero gradient",
            t.name
        );
        at += t.numel();
    }
    assert_eq!(at, analytic.len());
}

#[test]
fn whole_densenet_gradients_match_finite_differences() {
    whole_densenet_fd(Mode::Train, 11);
}

/// Eval mode: BN is the affine map of its running stats, so the batch-statistics terms must
/// be absent from the backward (and each BN must use its own running stats, not a block's
/// per-channel cache).
#[test]
fn whole_densenet_eval_gradients_match_finite_differences() {
    whole_densenet_fd(Mode::Eval, 21);
}

#[test]
fn eval_backward_differs_from_train_backward() {
    // The same model and input: eval-mode and train-mode gradients must differ (a backward
    // that ignored the mode would pass one FD test only by accident of the fixture).
    let (n, h, w) = (2, 16, 16);
    let mut rng = Rng::new(32);
    let x: Vec<f64> = (0..n * h * w * 3).map(|_| rng.normal()).collect();
    let r: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
    let grads = |mode: Mode| {
        let mut m = randomised(31);
        m.forward_recorded(&x, n, h, w, mode);
        m.backward(&r);
        m.grads
    };
    let (gt, ge) = (grads(Mode::Train), grads(Mode::Eval));
    let diff: f64 = gt.iter().zip(&ge).map(|(a, b)| (a - b).powi(2)).sum();
    let norm: f64 = ge.iter().map(|v| v * v).sum();
    assert!(
        diff.sqrt() > 1e-3 * norm.sqrt(),
        "train and eval gradients agree"
    );
}

#[test]
#[should_panic(expected = "backward needs")]
fn plain_eval_forward_records_nothing() {
    let mut m = randomised(41);
    let (n, h, w) = (1, 16, 16);
    let mut rng = Rng::new(42);
    let x: Vec<f64> = (0..n * h * w * 3).map(|_| rng.normal()).collect();
    m.forward_recorded(&x, n, h, w, Mode::Train);
    m.forward(&x, n, h, w, Mode::Eval); // drops the earlier tape, records none
    m.backward(&[1.0]);
}

#[test]
fn train_forward_updates_running_stats_and_eval_uses_them() {
    let mut m = randomised(3);
    let (n, h, w) = (2, 16, 16);
    let mut rng = Rng::new(4);
    let x: Vec<f64> = (0..n * h * w * 3).map(|_| rng.normal()).collect();
    let before = m.to_state_dict();
    let e1 = m.forward(&x, n, h, w, Mode::Eval);
    assert_eq!(
        m.to_state_dict(),
        before,
        "eval forward must not touch BN state"
    );
    m.forward(&x, n, h, w, Mode::Train);
    let after = m.to_state_dict();
    for (a, b) in before.tensors.iter().zip(&after.tensors) {
        if a.name.ends_with("num_batches_tracked") {
            let (TensorData::I64(x), TensorData::I64(y)) = (&a.data, &b.data) else {
                panic!()
            };
            assert_eq!(y[0], x[0] + 1, "{}", a.name);
        } else if a.name.contains("running") {
            assert_ne!(a.data, b.data, "{} not updated", a.name);
        } else {
            assert_eq!(a.data, b.data, "{} changed by a forward", a.name);
        }
    }
    let e2 = m.forward(&x, n, h, w, Mode::Eval);
    assert!(
        e1.iter().zip(&e2).any(|(a, b)| a != b),
        "eval output must follow the running stats"
    );
    // Eval is deterministic and batch-independent: image 0 alone gives the same logit.
    let e3 = m.forward(&x[..h * w * 3], 1, h, w, Mode::Eval);
    assert!((e3[0] - e2[0]).abs() < 1e-12);
    let (l, fmap, hf, wf) = m.forward_features(&x, n, h, w);
    assert_eq!(l, e2);
    assert_eq!(m.feature_hw(h, w).unwrap(), (hf, wf));
    let c = m.spec.num_features();
    assert_eq!(fmap.len(), n * hf * wf * c);
    // The logit is the classifier applied to the spatial mean of the feature map (CAM identity).
    let (cw, cb) = m.classifier();
    let mean: f64 = (0..hf * wf)
        .map(|p| (0..c).map(|j| cw[j] * fmap[p * c + j]).sum::<f64>())
        .sum::<f64>()
        / (hf * wf) as f64;
    assert!((mean + cb - l[0]).abs() < 1e-12);
}

#[test]
fn state_dict_round_trip_and_strict_keys() {
    let m = randomised(5);
    let sd = m.to_state_dict();
    let layout = tiny().state_dict_layout();
    assert_eq!(sd.tensors.len(), layout.len());
    for (t, l) in sd.tensors.iter().zip(&layout) {
        assert_eq!((&t.name, &t.shape), (&l.name, &l.shape));
    }
    let back = DenseNet::<f64>::from_state_dict(tiny(), &sd).unwrap();
    assert_eq!(back.to_state_dict(), sd);
    // conv weights really are converted: PyTorch [o, i, kh, kw] element (1, 2, 3, 4) of conv0.
    let conv0 = sd.get("features.conv0.weight").unwrap();
    let TensorData::F32(v) = &conv0.data else {
        panic!()
    };
    let (i, k, o) = (3, 7, 8);
    assert_eq!(
        v[((i + 2) * k + 3) * k + 4] as f64,
        m.params[((3 * k + 4) * i + 2) * o + 1] as f32 as f64
    );

    let name = "features.denseblock2.denselayer1.conv1.weight";
    let mut bad = sd.clone();
    bad.tensors.retain(|t| t.name != name);
    // The one problem `from_state_dict` names in `sd`.
    let problem = |sd: &StateDict| {
        let e = DenseNet::<f32>::from_state_dict(tiny(), sd).err().unwrap();
        match weights::Error::find(&e).map(weights::Error::problems) {
            Some([p]) => p.clone(),
            _ => panic!("not one weights problem: {e:#}"),
        }
    };
    let p = problem(&bad);
    assert!(
        matches!(&p, Problem::MissingKey { key, .. } if key == name),
        "{p}"
    );

    let mut bad = sd.clone();
    bad.tensors
        .iter_mut()
        .find(|t| t.name == name)
        .unwrap()
        .shape = vec![8, 8, 1, 2];
    let p = problem(&bad);
    assert!(
        matches!(&p, Problem::Shape { key, .. } if key == name),
        "{p}"
    );

    let mut bad = sd.clone();
    let mut extra = bad.tensors[0].clone();
    extra.name = "features.denseblock1.denselayer1.norm.1.weight".into();
    bad.tensors.push(extra);
    let p = problem(&bad);
    assert!(
        matches!(&p, Problem::UnexpectedKey { key, .. }
            if key == "features.denseblock1.denselayer1.norm.1.weight"),
        "{p}"
    );
}

#[test]
fn f32_and_f64_agree_and_init_is_torchvision_like() {
    let spec = tiny();
    let m32 = DenseNet::<f32>::new(spec.clone(), 9);
    assert_eq!(m32.num_params(), spec.num_params());
    let mut m64: DenseNet<f64> = m32.cast();
    let mut m32 = m32;
    let (n, h, w) = (2, 20, 18);
    let mut rng = Rng::new(10);
    let x: Vec<f64> = (0..n * h * w * 3).map(|_| rng.normal()).collect();
    let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let a = m64.forward(&x, n, h, w, Mode::Train);
    let b = m32.forward(&x32, n, h, w, Mode::Train);
    for (a, b) in a.iter().zip(&b) {
        assert!((a - *b as f64).abs() < 1e-4 * (1.0 + a.abs()), "{a} vs {b}");
    }
    // kaiming normal, fan_in: conv0's std ≈ sqrt(2 / 147).
    let w0 = &m32.params[..8 * 3 * 49];
    let var = w0.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / w0.len() as f64;
    assert!((var / (2.0 / 147.0) - 1.0).abs() < 0.15, "conv0 var {var}");
    let (cw, cb) = m32.classifier();
    let bound = 1.0 / (spec.num_features() as f32).sqrt();
    assert!(cb == 0.0 && cw.iter().all(|v| v.abs() <= bound) && cw.iter().any(|v| *v != 0.0));
}
