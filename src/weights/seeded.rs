//! Weights and inputs from a closed-form seeded formula, computed identically by
//! `scripts/golden_fixtures.py`, so golden fixtures need no committed weight file.
//!
//! For tensor number `t` (its position in `DenseNetSpec::state_dict_layout()`, counting every
//! entry, `num_batches_tracked` included) and element `i` (row-major, PyTorch layout), with
//! `u = sin(0.37*i + 1.3*t + seed)` evaluated in f64 and the result rounded once to f32:
//!
//! | tensor                      | value                         |
//! |-----------------------------|-------------------------------|
//! | conv weight `[o, c, kh, kw]`| `sqrt(2 / (c*kh*kw)) * u`     |
//! | BN weight                   | `1 + 0.1*u`                   |
//! | BN bias                     | `0.1*u`                       |
//! | BN running_mean             | `0.1*u`                       |
//! | BN running_var              | `1 + 0.2*abs(u)`              |
//! | BN num_batches_tracked      | `0` (i64)                     |
//! | classifier.weight `[1, C]`  | `u / sqrt(C)`                 |
//! | classifier.bias `[1]`       | `0.1*u`                       |
//!
//! Input image element `(n, c, h, w)`:
//! `sin(0.21*h + 0.13*w + 0.011*h*w + 1.7*c + 2.9*n + 0.5*seed)`, f64 then f32.

use super::{NamedTensor, StateDict, TensorData};
use crate::spec::{DenseNetSpec, Role};

/// The formula's weights for `spec`, in layout order.
pub fn seeded_state_dict(spec: &DenseNetSpec, seed: u64) -> StateDict {
    let s = seed as f64;
    let c_final = spec.num_features() as f64;
    let tensors = spec
        .state_dict_layout()
        .into_iter()
        .enumerate()
        .map(|(t, ts)| {
            let u = |i: usize| (0.37 * i as f64 + 1.3 * t as f64 + s).sin();
            let n = ts.numel();
            let f = |g: &dyn Fn(f64) -> f64| (0..n).map(|i| g(u(i)) as f32).collect();
            let data = if ts.role == Role::Counter {
                TensorData::I64(vec![0; n])
            } else if ts.shape.len() == 4 {
                let fan_in = (ts.shape[1] * ts.shape[2] * ts.shape[3]) as f64;
                let scale = (2.0 / fan_in).sqrt();
                TensorData::F32(f(&|u| scale * u))
            } else if ts.name == "classifier.weight" {
                TensorData::F32(f(&|u| u / c_final.sqrt()))
            } else if ts.name.ends_with("running_var") {
                TensorData::F32(f(&|u| 1.0 + 0.2 * u.abs()))
            } else if ts.name.ends_with(".weight") {
                TensorData::F32(f(&|u| 1.0 + 0.1 * u))
            } else {
                // BN bias, running_mean, classifier.bias
                TensorData::F32(f(&|u| 0.1 * u))
            };
            NamedTensor {
                name: ts.name,
                shape: ts.shape,
                data,
            }
        })
        .collect();
    StateDict { tensors }
}

/// The formula's input batch, laid out NHWC as mura's model consumes it.
// returns: [n, h, w, c] f32
pub fn seeded_input_nhwc(n: usize, h: usize, w: usize, c: usize, seed: u64) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * h * w * c);
    for ni in 0..n {
        for hi in 0..h {
            for wi in 0..w {
                for ci in 0..c {
                    let (hf, wf) = (hi as f64, wi as f64);
                    let x = 0.21 * hf
                        + 0.13 * wf
                        + 0.011 * hf * wf
                        + 1.7 * ci as f64
                        + 2.9 * ni as f64
                        + 0.5 * seed as f64;
                    out.push(x.sin() as f32);
                }
            }
        }
    }
    out
}
