//! DenseNet (torchvision's structure, one output logit) on the CPU ops, with tape autograd.
//!
//! Parameters live in one flat buffer in `state_dict_layout()` order; conv weights are stored
//! as `[kh, kw, in, out]` (the NHWC GEMM operand) and converted to PyTorch's `[out, in, kh, kw]`
//! at the state-dict boundary. BN running stats live in a second flat buffer.

mod forward;
pub mod schedule;
mod tape;

pub use schedule::{Layout, Schedule};

use crate::ops::{Float, Mode};
use crate::rng::Rng;
use crate::spec::{DenseNetSpec, Role};
use crate::weights::{self, NamedTensor, Problem, StateDict, TensorData};
use anyhow::{bail, Result};
use std::collections::HashMap;
use tape::Tape;

/// A DenseNet with one output logit, its parameters, gradients, BN state and tape.
pub struct DenseNet<T: Float = f32> {
    pub spec: DenseNetSpec,
    /// All trainable parameters, flat.
    pub params: Vec<T>,
    /// d(loss)/d(params), same layout.
    pub grads: Vec<T>,
    /// BN running means and variances, flat.
    pub stats: Vec<T>,
    /// BN `num_batches_tracked`, one per BN.
    pub counters: Vec<i64>,
    pub layout: Layout,
    /// The last recording forward's tape, and the mode it ran in.
    pub(crate) tape: Option<(Tape<T>, Mode)>,
    /// Activation buffers freed by the last backward, reused by the next forward/backward so
    /// a training step does not page-fault fresh memory in (contents are stale).
    pub(crate) spare: Vec<Vec<T>>,
}

impl<T: Float> DenseNet<T> {
    fn zeroed(spec: DenseNetSpec) -> Self {
        let layout = Layout::new(&spec);
        DenseNet {
            spec,
            params: vec![T::ZERO; layout.n_params],
            grads: vec![T::ZERO; layout.n_params],
            stats: vec![T::ZERO; layout.n_stats],
            counters: vec![0; layout.n_counters],
            layout,
            tape: None,
            spare: Vec::new(),
        }
    }

    /// torchvision init from the seed: kaiming_normal_ (fan_in, relu gain) for convs, BN weight 1
    /// bias 0, classifier weight U(-1/sqrt(C), 1/sqrt(C)) and bias 0; running mean 0, var 1.
    pub fn new(spec: DenseNetSpec, seed: u64) -> Self {
        let mut m = Self::zeroed(spec);
        let mut rng = Rng::new(seed);
        for cv in m.layout.convs() {
            let std = (2.0 / (cv.ci * cv.g.k * cv.g.k) as f64).sqrt();
            for v in &mut m.params[cv.p..cv.p + cv.len()] {
                *v = T::from_f64(std * rng.normal());
            }
        }
        for bn in m.layout.bns() {
            m.params[bn.p..bn.p + bn.c].fill(T::ONE);
            m.stats[bn.s + bn.c..bn.s + 2 * bn.c].fill(T::ONE);
        }
        let c = m.layout.norm5.c;
        let bound = 1.0 / (c as f64).sqrt();
        for v in &mut m.params[m.layout.fc..m.layout.fc + c] {
            *v = T::from_f64(rng.range(-bound, bound));
        }
        m
    }

    /// The step's stages for `h × w` inputs, or an error if the input is too small to survive
    /// the stem and every transition's pooling.
    pub fn schedule(&self, h: usize, w: usize) -> Result<Schedule> {
        Schedule::new(&self.layout, &self.spec.arch, h, w)
    }

    /// Size of the final feature map for an `h × w` input (an error if it is too small).
    pub fn feature_hw(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let hw = self.schedule(h, w)?.feature_hw();
        Ok((hw.h, hw.w))
    }

    pub fn num_params(&self) -> usize {
        self.params.len()
    }

    pub fn zero_grad(&mut self) {
        self.grads.fill(T::ZERO);
    }

    /// Classifier weights `[C]` and bias, for CAMs (`sum_c w_c F_c`).
    pub fn classifier(&self) -> (&[T], T) {
        let c = self.layout.norm5.c;
        (
            &self.params[self.layout.fc..self.layout.fc + c],
            self.params[self.layout.fc + c],
        )
    }

    /// The same model in another float type (gradients zeroed, tape dropped).
    pub fn cast<U: Float>(&self) -> DenseNet<U> {
        let conv = |v: &[T]| {
            v.iter()
                .map(|x| U::from_f64(x.to_f64()))
                .collect::<Vec<U>>()
        };
        DenseNet {
            spec: self.spec.clone(),
            params: conv(&self.params),
            grads: vec![U::ZERO; self.params.len()],
            stats: conv(&self.stats),
            counters: self.counters.clone(),
            layout: self.layout.clone(),
            tape: None,
            spare: Vec::new(),
        }
    }

    /// f32 tensors in torchvision layout and order, `num_batches_tracked` as an I64 scalar.
    pub fn to_state_dict(&self) -> StateDict {
        to_state_dict(&self.spec, &self.params, &self.stats, &self.counters)
    }

    /// Exact match of names and shapes required: a missing, unexpected or mis-shaped key
    /// is an error naming it.
    pub fn from_state_dict(spec: DenseNetSpec, sd: &StateDict) -> Result<Self> {
        let mut m = Self::zeroed(spec);
        let (params, stats, counters) = from_state_dict(&m.spec, sd)?;
        m.params = params;
        m.stats = stats;
        m.counters = counters;
        Ok(m)
    }
}

/// For each state-dict tensor of `spec`: its spec and where it lives in its flat buffer.
fn slots(spec: &DenseNetSpec) -> Vec<(crate::spec::TensorSpec, usize)> {
    let (mut np, mut ns, mut nc) = (0, 0, 0);
    spec.state_dict_layout()
        .into_iter()
        .map(|t| {
            let slot = match t.role {
                Role::Param => &mut np,
                Role::RunningStat => &mut ns,
                Role::Counter => &mut nc,
            };
            let at = *slot;
            *slot += t.numel().max(1);
            (t, at)
        })
        .collect()
}

/// The flat buffers of a model of `spec` (parameters, BN running statistics, BN counters) as a
/// state dict: f32 tensors in torchvision layout and order, `num_batches_tracked` as I64 scalars.
pub fn to_state_dict<T: Float>(
    spec: &DenseNetSpec,
    params: &[T],
    stats: &[T],
    counters: &[i64],
) -> StateDict {
    let f32s = |v: &[T]| v.iter().map(|v| v.to_f64() as f32).collect();
    let tensors = slots(spec)
        .into_iter()
        .map(|(t, at)| {
            let data = match t.role {
                Role::Counter => TensorData::I64(vec![counters[at]]),
                Role::RunningStat => TensorData::F32(f32s(&stats[at..at + t.numel()])),
                Role::Param => {
                    let src = &params[at..at + t.numel()];
                    match t.shape.len() {
                        4 => TensorData::F32(f32s(&oihw_from_hwio(src, &t.shape))),
                        _ => TensorData::F32(f32s(src)),
                    }
                }
            };
            NamedTensor {
                name: t.name,
                shape: t.shape,
                data,
            }
        })
        .collect();
    StateDict { tensors }
}

/// A state dict as the flat buffers of a model of `spec`: `(params, stats, counters)`. Names and
/// shapes must match exactly: a missing, unexpected, duplicate or mis-shaped key is an error
/// naming it.
#[allow(clippy::type_complexity)]
pub fn from_state_dict<T: Float>(
    spec: &DenseNetSpec,
    sd: &StateDict,
) -> Result<(Vec<T>, Vec<T>, Vec<i64>)> {
    let layout = Layout::new(spec);
    let mut params = vec![T::ZERO; layout.n_params];
    let mut stats = vec![T::ZERO; layout.n_stats];
    let mut counters = vec![0; layout.n_counters];
    let slots = slots(spec);
    let known: HashMap<&str, usize> = slots
        .iter()
        .enumerate()
        .map(|(i, (t, _))| (t.name.as_str(), i))
        .collect();
    let mut seen = vec![false; slots.len()];
    let refused = |problem| weights::Error::Refused {
        what: format!("weights do not match the {} model", spec.arch),
        problems: vec![problem],
    };
    for nt in &sd.tensors {
        let key = nt.name.clone();
        let Some(&i) = known.get(nt.name.as_str()) else {
            let shape = nt.shape.clone();
            bail!(refused(Problem::UnexpectedKey { key, shape }));
        };
        if seen[i] {
            bail!(refused(Problem::DuplicateKey { key }));
        }
        seen[i] = true;
        let (t, at) = &slots[i];
        if nt.shape != t.shape {
            let (have, want) = (nt.shape.clone(), t.shape.clone());
            bail!(refused(Problem::Shape { key, have, want }));
        }
        let ts = |v: &[f32]| v.iter().map(|&s| T::from_f64(s as f64)).collect::<Vec<T>>();
        match (&nt.data, t.role) {
            (TensorData::I64(v), Role::Counter) if v.len() == 1 => counters[*at] = v[0],
            (TensorData::F32(v), Role::RunningStat) if v.len() == t.numel() => {
                stats[*at..*at + t.numel()].copy_from_slice(&ts(v));
            }
            (TensorData::F32(v), Role::Param) if v.len() == t.numel() => {
                let v = match t.shape.len() {
                    4 => hwio_from_oihw(&ts(v), &t.shape),
                    _ => ts(v),
                };
                params[*at..*at + t.numel()].copy_from_slice(&v);
            }
            (data, role) => {
                let want = if role == Role::Counter { "i64" } else { "f32" };
                let have = data.dtype_name().to_string();
                bail!(refused(match have == want {
                    true => Problem::Length {
                        key,
                        values: data.len(),
                        shape: t.shape.clone(),
                    },
                    false => Problem::Dtype { key, have, want },
                }))
            }
        }
    }
    if let Some(i) = seen.iter().position(|s| !s) {
        let (key, shape) = (slots[i].0.name.clone(), slots[i].0.shape.clone());
        bail!(refused(Problem::MissingKey { key, shape }));
    }
    Ok((params, stats, counters))
}

/// `[k, k, i, o]` → PyTorch's `[o, i, k, k]` (`shape` is the PyTorch shape).
fn oihw_from_hwio<T: Float>(src: &[T], shape: &[usize]) -> Vec<T> {
    let (o, i, k) = (shape[0], shape[1], shape[2]);
    let mut dst = vec![T::ZERO; src.len()];
    for oo in 0..o {
        for ii in 0..i {
            for y in 0..k {
                for x in 0..k {
                    dst[((oo * i + ii) * k + y) * k + x] = src[((y * k + x) * i + ii) * o + oo];
                }
            }
        }
    }
    dst
}

/// PyTorch's `[o, i, k, k]` → `[k, k, i, o]`.
fn hwio_from_oihw<T: Float>(src: &[T], shape: &[usize]) -> Vec<T> {
    let (o, i, k) = (shape[0], shape[1], shape[2]);
    let mut dst = vec![T::ZERO; src.len()];
    for oo in 0..o {
        for ii in 0..i {
            for y in 0..k {
                for x in 0..k {
                    dst[((y * k + x) * i + ii) * o + oo] = src[((oo * i + ii) * k + y) * k + x];
                }
            }
        }
    }
    dst
}
