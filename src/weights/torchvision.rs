//! From torchvision's ImageNet checkpoints to mura's single-logit DenseNet, and the exact
//! check every weight load goes through: a missing, unexpected, mis-shaped or mis-typed key is
//! an error naming the key, never a silent partial load, and so is a value no trained model
//! holds (NaN, ±∞, a negative running variance).

use super::safetensors::TensorHead;
use super::{Error, NamedTensor, Problem, StateDict, TensorData};
use crate::rng::Rng;
use crate::spec::{DenseNetSpec, Role};
use anyhow::Result;
use std::collections::{HashMap, HashSet};

/// torchvision's remap of 2017 dense-layer keys:
/// `^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$`
/// → `\1\2`, e.g. `…denselayer3.norm.1.weight` → `…denselayer3.norm1.weight`.
pub fn remap_legacy_key(name: &str) -> Option<String> {
    let mut parts = name.rsplitn(4, '.');
    let (param, digit, kind, rest) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let layer_ok = {
        let stem = rest.trim_end_matches(|c: char| c.is_ascii_digit());
        stem.len() < rest.len() && stem.ends_with("denselayer")
    };
    let ok = layer_ok
        && matches!(kind, "norm" | "relu" | "conv")
        && matches!(digit, "1" | "2")
        && matches!(param, "weight" | "bias" | "running_mean" | "running_var");
    ok.then(|| format!("{rest}.{kind}{digit}.{param}"))
}

/// Turns a torchvision DenseNet `state_dict` (any era: legacy `norm.1` keys, a `module.`
/// prefix from `DataParallel`, no `num_batches_tracked`) into mura's single-logit model:
/// keys remapped, absent `num_batches_tracked` added as 0 (as PyTorch treats them), the
/// 1000-way classifier replaced by a fresh head (weight U(-1/√C, 1/√C) from `seed`, bias 0).
/// The result is checked against `spec` exactly and returned in the layout's order.
pub fn import_torchvision(sd: StateDict, spec: &DenseNetSpec, seed: u64) -> Result<StateDict> {
    let mut tensors: Vec<NamedTensor> = Vec::with_capacity(sd.tensors.len() + 2);
    for mut t in sd.tensors {
        if let Some(s) = t.name.strip_prefix("module.") {
            t.name = s.to_string();
        }
        if let Some(n) = remap_legacy_key(&t.name) {
            t.name = n;
        }
        if !t.name.starts_with("classifier.") {
            tensors.push(t);
        }
    }
    let present: HashSet<String> = tensors.iter().map(|t| t.name.clone()).collect();
    for s in spec.state_dict_layout() {
        if s.role != Role::Counter || present.contains(&s.name) {
            continue;
        }
        let bn = s.name.trim_end_matches("num_batches_tracked");
        if present.contains(&format!("{bn}running_mean")) {
            tensors.push(NamedTensor {
                name: s.name,
                shape: vec![],
                data: TensorData::I64(vec![0]),
            });
        }
    }
    let c = spec.num_features();
    let bound = 1.0 / (c as f64).sqrt();
    let mut rng = Rng::new(seed);
    tensors.push(NamedTensor {
        name: "classifier.weight".into(),
        shape: vec![1, c],
        data: TensorData::F32((0..c).map(|_| rng.range(-bound, bound) as f32).collect()),
    });
    tensors.push(NamedTensor {
        name: "classifier.bias".into(),
        shape: vec![1],
        data: TensorData::F32(vec![0.0]),
    });
    let sd = StateDict { tensors };
    check_state_dict(&sd, spec)?;
    Ok(in_layout_order(sd, spec))
}

/// Reorders a state dict that passed [`check_state_dict`] into the layout's order.
pub fn in_layout_order(sd: StateDict, spec: &DenseNetSpec) -> StateDict {
    let mut by_name: HashMap<String, NamedTensor> = sd
        .tensors
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect();
    StateDict {
        tensors: spec
            .state_dict_layout()
            .iter()
            .filter_map(|s| by_name.remove(&s.name))
            .collect(),
    }
}

/// Checks that the tensors `heads` describe are exactly those of `spec`'s single-logit model:
/// every name, shape and dtype (F32, I64 for `num_batches_tracked`), nothing missing, nothing
/// extra. A file's header is checked so before its data is read.
pub fn check_heads(heads: &[TensorHead], spec: &DenseNetSpec) -> Result<(), Error> {
    let layout = spec.state_dict_layout();
    let mut problems = Vec::new();
    let mut have: HashMap<&str, &TensorHead> = HashMap::new();
    for t in heads {
        if have.insert(t.name.as_str(), t).is_some() {
            problems.push(Problem::DuplicateKey {
                key: t.name.clone(),
            });
        }
    }
    let expected: HashSet<&str> = layout.iter().map(|s| s.name.as_str()).collect();
    for s in &layout {
        let Some(t) = have.get(s.name.as_str()) else {
            problems.push(Problem::MissingKey {
                key: s.name.clone(),
                shape: s.shape.clone(),
            });
            continue;
        };
        if t.shape != s.shape {
            problems.push(Problem::Shape {
                key: s.name.clone(),
                have: t.shape.clone(),
                want: s.shape.clone(),
            });
        }
        let want = if s.role == Role::Counter {
            "i64"
        } else {
            "f32"
        };
        if t.dtype != want {
            problems.push(Problem::Dtype {
                key: s.name.clone(),
                have: t.dtype.clone(),
                want,
            });
        }
    }
    for t in heads {
        if !expected.contains(t.name.as_str()) {
            problems.push(Problem::UnexpectedKey {
                key: t.name.clone(),
                shape: t.shape.clone(),
            });
        }
    }
    Error::refuse(
        problems,
        format!(
            "weights do not match the {} model ({} features)",
            spec.arch,
            spec.num_features()
        ),
    )
}

/// The one check of weights against a model, which every load goes through (mura's checkpoints
/// and torchvision's `.safetensors` and `.pth` alike): the layout ([`check_heads`], and every
/// tensor holding as many values as its shape), then the values ([`check_values`]).
pub fn check_state_dict(sd: &StateDict, spec: &DenseNetSpec) -> Result<(), Error> {
    let heads: Vec<TensorHead> = sd
        .tensors
        .iter()
        .map(|t| TensorHead {
            name: t.name.clone(),
            shape: t.shape.clone(),
            dtype: t.data.dtype_name().to_string(),
        })
        .collect();
    check_heads(&heads, spec)?;
    let problems = sd.tensors.iter().filter_map(length_problem).collect();
    Error::refuse(
        problems,
        format!("weights do not match the {} model", spec.arch),
    )?;
    check_values(sd)
}

/// A [`Problem::Length`] if `t` holds another number of values than its shape has elements.
pub(super) fn length_problem(t: &NamedTensor) -> Option<Problem> {
    (t.data.len() != t.shape.iter().product::<usize>()).then(|| Problem::Length {
        key: t.name.clone(),
        values: t.data.len(),
        shape: t.shape.clone(),
    })
}

/// Refuses values that no trained model holds: a weight, bias or running statistic that is NaN
/// or infinite, a negative running variance, a negative `num_batches_tracked`. (Such weights
/// would give NaN scores, or, through a max-pool that drops NaN, finite and wrong ones.)
pub fn check_values(sd: &StateDict) -> Result<(), Error> {
    let problems = sd.tensors.iter().filter_map(value_problem).collect();
    Error::refuse(problems, "weights hold values no trained model has")
}

/// The first value of `t` that no trained model holds, if any.
fn value_problem(t: &NamedTensor) -> Option<Problem> {
    let key = t.name.clone();
    let variance = t.name.ends_with("running_var");
    match &t.data {
        TensorData::F32(v) => v.iter().enumerate().find_map(|(element, &x)| match x {
            x if !x.is_finite() => Some(Problem::NotFinite {
                key: key.clone(),
                value: x,
                element,
            }),
            x if variance && x < 0.0 => Some(Problem::Negative {
                key: key.clone(),
                what: "variance",
                value: x.to_string(),
                element,
            }),
            _ => None,
        }),
        TensorData::I64(v) => v
            .iter()
            .enumerate()
            .find(|(_, &c)| c < 0)
            .map(|(element, c)| Problem::Negative {
                key,
                what: "batch count",
                value: c.to_string(),
                element,
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::remap_legacy_key as r;

    #[test]
    fn remap_matches_torchvision_regex() {
        let m = |s: &str| r(s).unwrap();
        assert_eq!(
            m("features.denseblock1.denselayer1.norm.1.weight"),
            "features.denseblock1.denselayer1.norm1.weight"
        );
        assert_eq!(
            m("module.features.denseblock4.denselayer32.conv.2.weight"),
            "module.features.denseblock4.denselayer32.conv2.weight"
        );
        assert_eq!(
            m("features.denseblock2.denselayer12.norm.2.running_var"),
            "features.denseblock2.denselayer12.norm2.running_var"
        );
        assert_eq!(m("denselayer7.relu.1.bias"), "denselayer7.relu1.bias");
        for keep in [
            "features.denseblock1.denselayer1.norm1.weight",
            "features.denseblock1.denselayer1.norm.3.weight",
            "features.denseblock1.denselayer.norm.1.weight",
            "features.denseblock1.denselayer1.norm.1.num_batches_tracked",
            "features.denseblock1.denselayer1.pool.1.weight",
            "features.transition1.norm.weight",
            "features.norm0.running_mean",
            "classifier.weight",
            "norm.1.weight",
        ] {
            assert_eq!(r(keep), None, "{keep}");
        }
    }
}
