//! Golden tests against torchvision (fixtures written by `scripts/golden_fixtures.py`).
//!
//! For a tiny custom DenseNet and densenet121, in both BN modes: weights and input from the
//! seeded formula, one forward, the weighted BCE of the fixture, one backward; compared with
//! PyTorch's float64 run: logits, loss, every parameter's gradient L2 norm and, in train mode,
//! every BN's running-stat norms and `num_batches_tracked`. Eval mode's logits come from the
//! plain (inference) forward, its gradients from `forward_recorded`, whose logits must be the
//! same bit for bit.
//!
//! - f64 run vs the f64 reference: relative error ≤ 1e-9 everywhere (the strong check).
//! - f32 run: logits, loss and running-stat norms ≤ max(1e-5, 4 × PyTorch's own f32 gap for
//!   that quantity); gradient norms ≤ max(1e-5, 4 × the mode's largest PyTorch f32 gradient
//!   gap). Gradients are not held per tensor in f32 because a pre-activation within ~1e-5 of
//!   zero can fall on the other side of a ReLU in f32, and through batch-statistic BN over a
//!   few values the change reaches every earlier gradient; which ReLU flips depends on
//!   summation order (PyTorch's NCHW and channels_last runs flip different ones, and each is
//!   ~1e-3 off on tensors the other gets to 1e-6). See scripts/golden_fixtures.py.

use mura::loss::{weighted_bce, LossLevel};
use mura::model::DenseNet;
use mura::ops::Float;
use mura::ops::Mode;
use mura::spec::{DenseNetSpec, Role};
use mura::weights::seeded::{seeded_input_nhwc, seeded_state_dict};
use mura::weights::{StateDict, TensorData};
use serde_json::Value;
use std::collections::BTreeMap;

const F64_TOL: f64 = 1e-9;
const F32_TOL: f64 = 1e-5;

fn fixture(name: &str) -> Value {
    let p = crate::common::fixtures()
        .join("golden")
        .join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// What one forward + loss + backward produced, in f64, keyed by torchvision names.
struct Outcome {
    logits: Vec<f64>,
    loss: f64,
    grad_norms: BTreeMap<String, f64>,
    running_stat_norms: BTreeMap<String, f64>,
    counters: Vec<i64>,
}

fn l2<T: Float>(v: &[T]) -> f64 {
    v.iter()
        .map(|x| x.to_f64() * x.to_f64())
        .sum::<f64>()
        .sqrt()
}

/// Norms of each `role` tensor of the flat buffer `flat` (laid out in `state_dict_layout()`
/// order). Conv weights are stored permuted there, which leaves their norms unchanged.
fn norms<T: Float>(spec: &DenseNetSpec, role: Role, flat: &[T]) -> BTreeMap<String, f64> {
    let mut at = 0;
    let mut out = BTreeMap::new();
    for t in spec
        .state_dict_layout()
        .into_iter()
        .filter(|t| t.role == role)
    {
        let len = t.numel();
        out.insert(t.name, l2(&flat[at..at + len]));
        at += len;
    }
    assert_eq!(at, flat.len(), "flat buffer and layout disagree");
    out
}

/// One step of the fixture's computation on a fresh model in `T` built from `sd`.
fn run<T: Float>(fx: &Value, sd: &StateDict, mode: Mode) -> Outcome {
    let spec: DenseNetSpec = serde_json::from_value(fx["spec"].clone()).unwrap();
    let shape: Vec<usize> = serde_json::from_value(fx["input"]["shape_nchw"].clone()).unwrap();
    let (n, c, h, w) = (shape[0], shape[1], shape[2], shape[3]);
    let seed = fx["seed"].as_u64().unwrap();
    let mut m = DenseNet::<T>::from_state_dict(spec.clone(), sd).unwrap();
    let x: Vec<T> = seeded_input_nhwc(n, h, w, c, seed)
        .into_iter()
        .map(|v| T::from_f64(v as f64))
        .collect();
    let z = m.forward(&x, n, h, w, mode);
    if mode == Mode::Eval {
        // The same forward again, recording the tape for the backward below.
        let again = m.forward_recorded(&x, n, h, w, mode);
        assert!(
            z.iter().zip(&again).all(|(a, b)| a.to_f64() == b.to_f64()),
            "recording eval forward changed the logits"
        );
    }
    let z: Vec<f64> = z.iter().map(|v| v.to_f64()).collect();

    // Per-image labels and weights of the fixture (w = 0.6 for label 1, 0.4 for label 0):
    // one single-view "study" per image, with (w0, w1) chosen so each image gets its weight.
    let labels: Vec<f64> = serde_json::from_value(fx["labels"].clone()).unwrap();
    let sw: Vec<f64> = serde_json::from_value(fx["sample_weights"].clone()).unwrap();
    let pairs: Vec<(f64, f64)> = sw.iter().map(|&w| (w, w)).collect();
    let views: Vec<usize> = (0..n).collect();
    let (loss, dz) = weighted_bce(&z, &views, &labels, &pairs, LossLevel::Image);

    m.zero_grad();
    let dz: Vec<T> = dz.iter().map(|&v| T::from_f64(v)).collect();
    m.backward(&dz);
    Outcome {
        logits: z,
        loss,
        grad_norms: norms(&spec, Role::Param, &m.grads),
        running_stat_norms: norms(&spec, Role::RunningStat, &m.stats),
        counters: m.counters.clone(),
    }
}

/// Compares an outcome with one mode of a fixture; returns every failing quantity (empty when
/// all pass) and prints the worst relative error per kind. `f32_rule`: the f32 tolerances
/// from PyTorch's own gaps; otherwise 1e-9.
fn compare(label: &str, got: &Outcome, want: &Value, f32_rule: bool) -> Vec<String> {
    let gap = &want["torch_f32_rel_diff"];
    let tol = |g: &Value| {
        if f32_rule {
            F32_TOL.max(4.0 * g.as_f64().unwrap())
        } else {
            F64_TOL
        }
    };
    let mut failures = Vec::new();
    if let Some(nbt) = want.get("num_batches_tracked") {
        let nbt = nbt.as_i64().unwrap();
        for (i, &c) in got.counters.iter().enumerate() {
            if c != nbt {
                failures.push(format!("BN #{i} num_batches_tracked {c}, want {nbt}"));
            }
        }
    }
    let mut worst: BTreeMap<&str, (f64, String)> = BTreeMap::new();
    let mut check = |kind: &'static str, what: String, g: f64, w: f64, tol: f64| {
        let rel = (g - w).abs() / w.abs().max(1e-300);
        // NaN never passes.
        if rel.is_nan() || rel > tol {
            failures.push(format!(
                "{what}: got {g:e}, want {w:e}, rel {rel:e} > {tol:e}"
            ));
        }
        let e = worst.entry(kind).or_insert((-1.0, String::new()));
        if rel.is_nan() || rel > e.0 {
            *e = (rel, what);
        }
    };

    let wl = want["logits"].as_array().unwrap();
    assert_eq!(got.logits.len(), wl.len(), "{label}: logits count");
    for (i, (g, w)) in got.logits.iter().zip(wl).enumerate() {
        let t = tol(&gap["logits"][i]);
        check("logits", format!("logit {i}"), *g, w.as_f64().unwrap(), t);
    }
    let t = tol(&gap["loss"]);
    check(
        "loss",
        "loss".into(),
        got.loss,
        want["loss"].as_f64().unwrap(),
        t,
    );

    let mut groups = vec![("grad_norms", &got.grad_norms)];
    if want.get("running_stat_norms").is_some() {
        groups.push(("running_stat_norms", &got.running_stat_norms));
    }
    for (kind, ours) in groups {
        let theirs = want[kind].as_object().unwrap();
        // f32 gradient norms: the mode's largest PyTorch gap (see the module docs).
        let grad_gap = gap[kind]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(0.0, f64::max);
        let names_ours: Vec<&String> = ours.keys().collect();
        let mut names_theirs: Vec<&String> = theirs.keys().collect();
        names_theirs.sort();
        assert_eq!(names_ours, names_theirs, "{label}: {kind} names differ");
        for (name, &g) in ours {
            let t = if kind == "grad_norms" {
                tol(&Value::from(grad_gap))
            } else {
                tol(&gap[kind][name])
            };
            check(kind, name.clone(), g, theirs[name].as_f64().unwrap(), t);
        }
    }
    for (kind, (rel, what)) in &worst {
        eprintln!("{label}: worst {kind} rel err {rel:.2e} ({what})");
    }
    failures
}

/// Both modes of one fixture in `T`, each from freshly loaded weights.
fn golden<T: Float>(name: &str, f32_rule: bool) {
    let fx = fixture(name);
    let spec: DenseNetSpec = serde_json::from_value(fx["spec"].clone()).unwrap();
    let sd = seeded_state_dict(&spec, fx["seed"].as_u64().unwrap());
    let mut failures = Vec::new();
    for (mode, key) in [(Mode::Train, "train"), (Mode::Eval, "eval")] {
        let t0 = std::time::Instant::now();
        let got = run::<T>(&fx, &sd, mode);
        let label = format!("{name} {key} {}", std::any::type_name::<T>());
        eprintln!("{label}: {:.2} s", t0.elapsed().as_secs_f64());
        failures.extend(compare(&label, &got, &fx["modes"][key], f32_rule));
    }
    assert!(
        failures.is_empty(),
        "{name}: {} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn tiny_densenet_f64_matches_torchvision() {
    golden::<f64>("tiny_densenet", false);
}

#[test]
fn tiny_densenet_f32_matches_torchvision() {
    golden::<f32>("tiny_densenet", true);
}

#[test]
fn densenet121_f64_matches_torchvision() {
    golden::<f64>("densenet121", false);
}

#[test]
fn densenet121_f32_matches_torchvision() {
    golden::<f32>("densenet121", true);
}

/// Adds `delta` to element 0 of tensor `name` of a state dict.
fn perturb(sd: &mut StateDict, name: &str, delta: f32) {
    let t = sd.tensors.iter_mut().find(|t| t.name == name).unwrap();
    match &mut t.data {
        TensorData::F32(v) => v[0] += delta,
        TensorData::I64(_) => panic!("{name} is not a float tensor"),
    }
}

/// The comparisons can fail: a small change to one deep weight breaks logits, loss and its
/// own gradient; a change to one running mean breaks only that BN's running-stat norm in
/// train mode (batch statistics are used there) and, in eval mode, the logits and that BN's
/// gamma gradient (the eval backward differentiates the running-stat affine map).
#[test]
fn golden_comparisons_detect_a_perturbed_weight() {
    let fx = fixture("tiny_densenet");
    let spec: DenseNetSpec = serde_json::from_value(fx["spec"].clone()).unwrap();
    let seeded = seeded_state_dict(&spec, fx["seed"].as_u64().unwrap());
    let has = |f: &[String], s: &str| f.iter().any(|l| l.starts_with(s));

    let conv = "features.denseblock2.denselayer1.conv2.weight";
    let mut sd = seeded.clone();
    perturb(&mut sd, conv, 1e-4);
    let got = run::<f64>(&fx, &sd, Mode::Train);
    let f = compare("perturbed conv", &got, &fx["modes"]["train"], false);
    assert!(
        has(&f, "logit 0") && has(&f, "loss") && has(&f, conv),
        "{f:?}"
    );
    // The f32 rule is looser: it takes a larger change to trip it.
    let mut sd = seeded.clone();
    perturb(&mut sd, conv, 0.1);
    let got = run::<f64>(&fx, &sd, Mode::Train);
    let f = compare("perturbed conv f32 rule", &got, &fx["modes"]["train"], true);
    assert!(
        has(&f, "logit 0") && has(&f, "loss") && has(&f, conv),
        "{f:?}"
    );

    let rm = "features.transition1.norm.running_mean";
    let mut sd = seeded.clone();
    perturb(&mut sd, rm, 1e-3);
    let got = run::<f64>(&fx, &sd, Mode::Train);
    let f = compare("perturbed running mean", &got, &fx["modes"]["train"], false);
    assert!(
        f.len() == 1 && has(&f, rm),
        "train mode should fail on exactly {rm}: {f:?}"
    );
    let got = run::<f64>(&fx, &sd, Mode::Eval);
    let f = compare(
        "perturbed running mean eval",
        &got,
        &fx["modes"]["eval"],
        false,
    );
    let gamma = "features.transition1.norm.weight";
    assert!(has(&f, "logit 0") && has(&f, gamma), "{f:?}");

    // A counter off by one is caught.
    let mut got = run::<f64>(&fx, &seeded, Mode::Train);
    got.counters[3] += 1;
    let f = compare("bumped counter", &got, &fx["modes"]["train"], false);
    assert!(f.len() == 1 && has(&f, "BN #3"), "{f:?}");
}
