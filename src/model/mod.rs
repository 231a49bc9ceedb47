//! DenseNet (torchvision's structure, one output logit) on the CPU ops, with tape autograd.
//!
//! Parameters live in one flat buffer in `state_dict_layout()` order; conv weights are stored
//! as `[kh, kw, in, out]` (the NHWC GEMM operand) and converted to PyTorch's `[out, in, kh, kw]`
//! at the state-dict boundary. BN running stats live in a second flat buffer.

mod forward;

use crate::autograd::Tape;
use crate::ops::Float;
use crate::rng::Rng;
use crate::spec::{DenseNetSpec, Role};
use crate::weights::{NamedTensor, StateDict, TensorData};
use anyhow::{bail, Result};
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Train,
    Eval,
}

/// Where one BN's tensors live: gamma at `p`, beta at `p + c` (params); running mean at `s`,
/// running var at `s + c` (stats); its counter at `counters[cnt]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BnIdx {
    pub p: usize,
    pub s: usize,
    pub cnt: usize,
    pub c: usize,
}

/// A conv weight `[k, k, ci, co]` at `params[p..]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConvIdx {
    pub p: usize,
    pub k: usize,
    pub ci: usize,
    pub co: usize,
}

impl ConvIdx {
    fn len(&self) -> usize {
        self.k * self.k * self.ci * self.co
    }
}

#[derive(Clone, Debug)]
pub(crate) struct LayerIdx {
    pub norm1: BnIdx,
    pub conv1: ConvIdx,
    pub norm2: BnIdx,
    pub conv2: ConvIdx,
}

#[derive(Clone, Debug)]
pub(crate) struct BlockIdx {
    pub c_total: usize,
    pub layers: Vec<LayerIdx>,
    pub transition: Option<(BnIdx, ConvIdx)>,
}

/// Offsets of every tensor in the flat buffers, and the structure they describe.
#[derive(Clone, Debug)]
pub(crate) struct Layout {
    pub conv0: ConvIdx,
    pub norm0: BnIdx,
    pub blocks: Vec<BlockIdx>,
    pub norm5: BnIdx,
    /// classifier weight `[c]` at `fc`, bias at `fc + c`.
    pub fc: usize,
    pub n_params: usize,
    pub n_stats: usize,
    pub n_counters: usize,
}

impl Layout {
    fn new(spec: &DenseNetSpec) -> Layout {
        let mut at: HashMap<String, usize> = HashMap::new();
        let (mut np, mut ns, mut nc) = (0, 0, 0);
        for t in spec.state_dict_layout() {
            let slot = match t.role {
                Role::Param => &mut np,
                Role::RunningStat => &mut ns,
                Role::Counter => &mut nc,
            };
            let len = t.numel().max(1);
            at.insert(t.name, *slot);
            *slot += len;
        }
        let bn = |name: &str, c: usize| BnIdx {
            p: at[&format!("{name}.weight")],
            s: at[&format!("{name}.running_mean")],
            cnt: at[&format!("{name}.num_batches_tracked")],
            c,
        };
        let conv = |name: &str, k: usize, ci: usize, co: usize| ConvIdx {
            p: at[&format!("{name}.weight")],
            k,
            ci,
            co,
        };
        let (ins, c_final) = spec.block_input_channels();
        let (k, mid) = (spec.growth_rate, spec.bn_size * spec.growth_rate);
        let nb = spec.block_config.len();
        let blocks = (0..nb)
            .map(|b| {
                let c_total = ins[b] + spec.block_config[b] * k;
                let layers = (0..spec.block_config[b])
                    .map(|l| {
                        let p = format!("features.denseblock{}.denselayer{}", b + 1, l + 1);
                        let c = ins[b] + l * k;
                        LayerIdx {
                            norm1: bn(&format!("{p}.norm1"), c),
                            conv1: conv(&format!("{p}.conv1"), 1, c, mid),
                            norm2: bn(&format!("{p}.norm2"), mid),
                            conv2: conv(&format!("{p}.conv2"), 3, mid, k),
                        }
                    })
                    .collect();
                let transition = (b + 1 < nb).then(|| {
                    let p = format!("features.transition{}", b + 1);
                    (
                        bn(&format!("{p}.norm"), c_total),
                        conv(&format!("{p}.conv"), 1, c_total, c_total / 2),
                    )
                });
                BlockIdx {
                    c_total,
                    layers,
                    transition,
                }
            })
            .collect();
        let f0 = spec.num_init_features;
        Layout {
            conv0: conv("features.conv0", 7, 3, f0),
            norm0: bn("features.norm0", f0),
            blocks,
            norm5: bn("features.norm5", c_final),
            fc: at["classifier.weight"],
            n_params: np,
            n_stats: ns,
            n_counters: nc,
        }
    }

    fn convs(&self) -> Vec<ConvIdx> {
        let mut v = vec![self.conv0];
        for b in &self.blocks {
            for l in &b.layers {
                v.extend([l.conv1, l.conv2]);
            }
            v.extend(b.transition.map(|t| t.1));
        }
        v
    }

    fn bns(&self) -> Vec<BnIdx> {
        let mut v = vec![self.norm0];
        for b in &self.blocks {
            for l in &b.layers {
                v.extend([l.norm1, l.norm2]);
            }
            v.extend(b.transition.map(|t| t.0));
        }
        v.push(self.norm5);
        v
    }
}

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
    pub(crate) layout: Layout,
    /// The last recording forward's tape, and whether it ran in Train mode.
    pub(crate) tape: Option<(Tape<T>, bool)>,
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
            let std = (2.0 / (cv.ci * cv.k * cv.k) as f64).sqrt();
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

    /// Size of the final feature map for an `h × w` input, or an error if the input is too
    /// small to survive the stem and every transition's pooling.
    pub fn feature_hw(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let too_small = || anyhow::anyhow!("input {h}x{w} is too small for {}", self.spec.arch);
        if h < 4 || w < 4 {
            return Err(too_small());
        }
        let pool = |x: usize| ((x - 1) / 2 + 1 - 1) / 2 + 1; // stem conv, then max pool
        let (mut fh, mut fw) = (pool(h), pool(w));
        for _ in 1..self.layout.blocks.len() {
            (fh, fw) = (fh / 2, fw / 2);
        }
        if fh == 0 || fw == 0 {
            return Err(too_small());
        }
        Ok((fh, fw))
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

    /// For each state-dict tensor: its spec, where it lives, and (for convs) its kernel geometry.
    fn slots(&self) -> Vec<(crate::spec::TensorSpec, usize)> {
        let (mut np, mut ns, mut nc) = (0, 0, 0);
        self.spec
            .state_dict_layout()
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

    /// f32 tensors in torchvision layout and order, `num_batches_tracked` as an I64 scalar.
    pub fn to_state_dict(&self) -> StateDict {
        let tensors = self
            .slots()
            .into_iter()
            .map(|(t, at)| {
                let data = match t.role {
                    Role::Counter => TensorData::I64(vec![self.counters[at]]),
                    Role::RunningStat => TensorData::F32(
                        self.stats[at..at + t.numel()]
                            .iter()
                            .map(|v| v.to_f64() as f32)
                            .collect(),
                    ),
                    Role::Param => {
                        let src = &self.params[at..at + t.numel()];
                        let v = if t.shape.len() == 4 {
                            oihw_from_hwio(src, &t.shape)
                        } else {
                            src.to_vec()
                        };
                        TensorData::F32(v.iter().map(|v| v.to_f64() as f32).collect())
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

    /// Exact match of names and shapes required: a missing, unexpected or mis-shaped key
    /// is an error naming it.
    pub fn from_state_dict(spec: DenseNetSpec, sd: &StateDict) -> Result<Self> {
        let mut m = Self::zeroed(spec);
        let slots = m.slots();
        let known: HashMap<&str, usize> = slots
            .iter()
            .enumerate()
            .map(|(i, (t, _))| (t.name.as_str(), i))
            .collect();
        let mut seen = vec![false; slots.len()];
        for nt in &sd.tensors {
            let Some(&i) = known.get(nt.name.as_str()) else {
                bail!(
                    "unexpected key '{}' in state dict for {}",
                    nt.name,
                    m.spec.arch
                );
            };
            if seen[i] {
                bail!("duplicate key '{}' in state dict", nt.name);
            }
            seen[i] = true;
            let (t, at) = &slots[i];
            if nt.shape != t.shape {
                bail!(
                    "key '{}' has shape {:?}, expected {:?} for {}",
                    nt.name,
                    nt.shape,
                    t.shape,
                    m.spec.arch
                );
            }
            match (&nt.data, t.role) {
                (TensorData::I64(v), Role::Counter) if v.len() == 1 => m.counters[*at] = v[0],
                (TensorData::F32(v), Role::RunningStat) if v.len() == t.numel() => {
                    for (d, &s) in m.stats[*at..*at + t.numel()].iter_mut().zip(v) {
                        *d = T::from_f64(s as f64);
                    }
                }
                (TensorData::F32(v), Role::Param) if v.len() == t.numel() => {
                    let v: Vec<T> = v.iter().map(|&s| T::from_f64(s as f64)).collect();
                    let v = if t.shape.len() == 4 {
                        hwio_from_oihw(&v, &t.shape)
                    } else {
                        v
                    };
                    m.params[*at..*at + t.numel()].copy_from_slice(&v);
                }
                _ => bail!("key '{}' has the wrong dtype or element count", nt.name),
            }
        }
        if let Some(i) = seen.iter().position(|s| !s) {
            bail!(
                "missing key '{}' in state dict for {}",
                slots[i].0.name,
                m.spec.arch
            );
        }
        Ok(m)
    }
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
