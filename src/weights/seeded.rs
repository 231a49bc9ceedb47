//! Weights and inputs from a closed-form seeded formula, computed bit-identically by
//! `scripts/golden_fixtures.py`, so golden fixtures need no committed weight file.
//!
//! `u(seed, t, i)`: the SplitMix64 finaliser of `x = seed*0x9E3779B97F4A7C15 +
//! t*0xD1B54A32D192ED03 + i` (wrapping u64 arithmetic), mapped to `[-1, 1)` as
//! `(z >> 11) * 2^-52 - 1` in f64. Integer arithmetic and exact scalings: every language gets
//! the same bits. For tensor number `t` (its position in `DenseNetSpec::state_dict_layout()`,
//! counting every entry, `num_batches_tracked` included) and element `i` (row-major, PyTorch
//! layout), with the result rounded once to f32:
//!
//! | tensor                      | value                         |
//! |-----------------------------|-------------------------------|
//! | conv weight `[o, c, kh, kw]`| `sqrt(6 / (c*kh*kw)) * u`     |
//! | BN weight                   | `1 + 0.1*u`                   |
//! | BN bias                     | `0.1*u`                       |
//! | BN running_mean             | `0.1*u`                       |
//! | BN running_var              | `1 + 0.2*abs(u)`              |
//! | BN num_batches_tracked      | `0` (i64)                     |
//! | classifier.weight `[1, C]`  | `u * (1 / sqrt(C))`           |
//! | classifier.bias `[1]`       | `0.1*u`                       |
//!
//! Input image element `(n, c, h, w)` is `u(seed, INPUT_STREAM, j)` with `j` its NCHW
//! row-major index (`((n*C + c)*H + h)*W + w`), rounded to f32.

use super::{NamedTensor, StateDict, TensorData};
use crate::spec::{DenseNetSpec, Role};

/// The stream number of the input image (far from any tensor number).
pub const INPUT_STREAM: u64 = 1 << 32;

/// The formula's uniform value in [-1, 1) for stream `t`, element `i`.
pub fn formula_u(seed: u64, t: u64, i: u64) -> f64 {
    let mut z = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(t.wrapping_mul(0xD1B5_4A32_D192_ED03))
        .wrapping_add(i);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 * (1.0 / (1u64 << 52) as f64) - 1.0
}

/// The formula's weights for `spec`, in layout order.
pub fn seeded_state_dict(spec: &DenseNetSpec, seed: u64) -> StateDict {
    let c_final = spec.num_features() as f64;
    let tensors = spec
        .state_dict_layout()
        .into_iter()
        .enumerate()
        .map(|(t, ts)| {
            let n = ts.numel();
            let f = |g: &dyn Fn(f64) -> f64| {
                (0..n)
                    .map(|i| g(formula_u(seed, t as u64, i as u64)) as f32)
                    .collect()
            };
            let data = if ts.role == Role::Counter {
                TensorData::I64(vec![0; n])
            } else if ts.shape.len() == 4 {
                let fan_in = (ts.shape[1] * ts.shape[2] * ts.shape[3]) as f64;
                let scale = (6.0 / fan_in).sqrt();
                TensorData::F32(f(&|u| scale * u))
            } else if ts.name == "classifier.weight" {
                let scale = 1.0 / c_final.sqrt();
                TensorData::F32(f(&|u| u * scale))
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
                    let j = ((ni * c + ci) * h + hi) * w + wi; // NCHW index
                    out.push(formula_u(seed, INPUT_STREAM, j as u64) as f32);
                }
            }
        }
    }
    out
}
