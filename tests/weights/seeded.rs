//! The seeded weight/input formula agrees with scripts/golden_fixtures.py (which ran it in
//! numpy and fed it to torchvision): same names in the same order, same shapes, bit-identical
//! values (first elements) and matching per-tensor sums; same input batch.

use mura::spec::DenseNetSpec;
use mura::weights::seeded::{seeded_input_nhwc, seeded_state_dict};
use mura::weights::TensorData;
use serde_json::Value;

fn golden(name: &str) -> Value {
    let p = crate::common::fixtures().join("golden").join(name);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * a.abs().max(b.abs()).max(1e-6)
}

#[test]
fn weights_match_the_python_formula() {
    let all = golden("seeded_weights.json");
    for (model, fx) in all.as_object().unwrap() {
        let spec: DenseNetSpec = serde_json::from_value(fx["spec"].clone()).unwrap();
        let sd = seeded_state_dict(&spec, fx["seed"].as_u64().unwrap());
        let want = fx["tensors"].as_array().unwrap();
        assert_eq!(sd.tensors.len(), want.len(), "{model}");
        for (t, w) in sd.tensors.iter().zip(want) {
            assert_eq!(t.name, w["name"].as_str().unwrap(), "{model}: order");
            let shape: Vec<usize> = serde_json::from_value(w["shape"].clone()).unwrap();
            assert_eq!(t.shape, shape, "{model} {}", t.name);
            let (first, sum): (Vec<f64>, f64) = match &t.data {
                TensorData::F32(v) => (
                    v.iter().take(3).map(|&x| x as f64).collect(),
                    v.iter().map(|&x| x as f64).sum(),
                ),
                TensorData::I64(v) => (
                    v.iter().take(3).map(|&x| x as f64).collect(),
                    v.iter().map(|&x| x as f64).sum(),
                ),
            };
            // The values are f32s; serde_json may misround the f64 text by an ulp (without its
            // float_roundtrip feature), which the cast to f32 absorbs.
            let want_first: Vec<f64> = serde_json::from_value(w["first"].clone()).unwrap();
            let bits = |v: &[f64]| v.iter().map(|&x| (x as f32).to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&first), bits(&want_first), "{model} {}", t.name);
            let want_sum = w["sum"].as_f64().unwrap();
            assert!(
                close(sum, want_sum, 1e-9),
                "{model} {}: {sum} vs {want_sum}",
                t.name
            );
        }
    }
}

#[test]
fn input_matches_the_python_formula() {
    for name in ["tiny_densenet.json", "densenet121.json"] {
        let fx = golden(name);
        let s: Vec<usize> = serde_json::from_value(fx["input"]["shape_nchw"].clone()).unwrap();
        let seed = fx["seed"].as_u64().unwrap();
        let x = seeded_input_nhwc(s[0], s[2], s[3], s[1], seed);
        assert_eq!(x.len(), s.iter().product::<usize>());
        let sum: f64 = x.iter().map(|&v| v as f64).sum();
        let sum_sq: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
        assert!(
            close(sum, fx["input"]["sum"].as_f64().unwrap(), 1e-9),
            "{name}"
        );
        assert!(
            close(sum_sq, fx["input"]["sum_sq"].as_f64().unwrap(), 1e-9),
            "{name}"
        );
        assert!(x.iter().all(|v| (-1.0..1.0).contains(v)));
    }
}
