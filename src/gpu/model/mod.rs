//! DenseNet on the GPU op layer, on any [`Driver`] (CUDA or the emulator): the model's state in
//! device buffers ([`GpuDenseNet`], here), the activation buffers of a batch shape ([`plan`]), and
//! the forward and backward as kernel launches over the schedule's stages ([`forward`],
//! [`backward`]), with no host round trip between ops (the host uploads the batch and the logits'
//! gradient, and downloads the logits). What differs between the precisions is in [`engine`]:
//! bf16 runs every convolution on the tensor cores with BN statistics and BN-backward reductions
//! in their epilogues, f32 runs the CUDA-core kernels with separate statistics and reduction
//! passes.
//!
//! Parameters, gradients, BN running statistics and Adam moments live in flat f32 buffers in the
//! [`Layout`]'s order (zero-grad is one memset, Adam one kernel). Per BN, the (scale, shift) of
//! its last forward lives in one buffer of coefficients.

mod backward;
mod engine;
mod forward;
mod plan;

pub use engine::{BnDx, Ctx, DxOut, Engine, Left, NextBn};
pub use plan::{scratch_len, split_workspace, SplitBufs};

use super::ops::bn::{self, Affine, Stats};
use super::ops::BnRelu;
use super::tracking::Tracking;
use super::{DeviceBuffer, Driver, Graph, Slice};
use crate::model::schedule::{BnIdx, ConvIdx, Stage};
use crate::model::{DenseNet, Layout};
use crate::ops::augment::AugParams;
use crate::ops::Mode;
use crate::optim::Adam;
use crate::spec::DenseNetSpec;
use crate::weights::StateDict;
use anyhow::{bail, Context, Result};
use half::bf16;
use plan::{Plan, RawIn};
use std::collections::HashMap;
use std::sync::Arc;

/// What a captured graph runs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Pass {
    Eval,
    Train,
    Backward,
}

/// DenseNet with one logit whose activations are stored as `T` (f32 or bf16).
pub struct GpuDenseNet<T: Engine> {
    /// The driver, through `mem`, which counts what this model allocates.
    d: Arc<dyn Driver>,
    mem: Arc<Tracking>,
    spec: DenseNetSpec,
    layout: Layout,
    params: DeviceBuffer<f32>,
    grads: DeviceBuffer<f32>,
    /// BN running means and variances, in the layout's order.
    running: DeviceBuffer<f32>,
    adam_m: DeviceBuffer<f32>,
    adam_v: DeviceBuffer<f32>,
    counters: Vec<i64>,
    /// Per BN: `[2, c]` f32 scale and shift of its last forward, at `coef_at[bn.p]`.
    coef: DeviceBuffer<f32>,
    coef_at: HashMap<usize, usize>,
    /// BN reduction scratch: `[bn::scratch_len(max c)]`, and `[2, max c]` merged coefficients.
    bn_part: DeviceBuffer<f32>,
    bn_coef: DeviceBuffer<f32>,
    /// bf16: the parameters rounded for the tensor-core convolutions, refreshed from `params` by
    /// the first forward after they change (`weights_stale`).
    weights_bf16: Option<DeviceBuffer<bf16>>,
    weights_stale: bool,
    /// `[2, max c]` f32: per-channel sums accumulated in a tensor-core convolution's epilogue (the
    /// batch statistics of its output, or the BN-backward reductions of a data gradient).
    sums: DeviceBuffer<f32>,
    /// A BN step's count of finished blocks (`conv_tc::BnStep`): zero between launches.
    done: DeviceBuffer<u32>,
    plan: Option<Plan<T>>,
    /// The raw-input path's buffers, grown to the largest batch seen.
    raw_in: Option<RawIn>,
    /// A train-mode forward left what backward needs in the plan.
    recorded: bool,
    /// The plan's captured graphs, by pass and batch size; dropped with the plan.
    graphs: HashMap<(Pass, usize), Graph>,
    use_graphs: bool,
}

impl<T: Engine> GpuDenseNet<T> {
    /// Uploads `model` (its parameters, running statistics and counters) to the driver's device.
    pub fn new(d: Arc<dyn Driver>, model: DenseNet<f32>) -> Result<Self> {
        let mem = Arc::new(Tracking::new(d));
        let d: Arc<dyn Driver> = mem.clone();
        let layout = Layout::new(&model.spec);
        let mut coef_at = HashMap::new();
        let mut at = 0;
        for bn in layout.bns() {
            coef_at.insert(bn.p, at);
            at += 2 * bn.c;
        }
        let max_c = layout.bns().iter().map(|b| b.c).max().unwrap_or(1);
        let np = model.params.len();
        let upload = || -> Result<Self> {
            Ok(GpuDenseNet {
                params: DeviceBuffer::from_slice(&d, &model.params)?,
                grads: DeviceBuffer::zeroed(&d, np)?,
                running: DeviceBuffer::from_slice(&d, &model.stats)?,
                adam_m: DeviceBuffer::zeroed(&d, np)?,
                adam_v: DeviceBuffer::zeroed(&d, np)?,
                counters: model.counters.clone(),
                coef: DeviceBuffer::alloc(&d, at.max(1))?,
                coef_at,
                bn_part: DeviceBuffer::zeroed(&d, bn::scratch_len(max_c))?,
                bn_coef: DeviceBuffer::alloc(&d, 2 * max_c)?,
                weights_bf16: match T::TENSOR_CORES {
                    true => Some(DeviceBuffer::alloc(&d, np)?),
                    false => None,
                },
                weights_stale: true,
                sums: DeviceBuffer::alloc(&d, 2 * max_c)?,
                done: DeviceBuffer::zeroed(&d, 1)?,
                plan: None,
                raw_in: None,
                recorded: false,
                graphs: HashMap::new(),
                // (A wait after every launch, for debugging, means no graphs.)
                use_graphs: !super::cuda::sync_each_launch(),
                spec: model.spec.clone(),
                layout,
                d: d.clone(),
                mem: mem.clone(),
            })
        };
        upload().context("uploading the model to the device")
    }

    pub fn driver(&self) -> &Arc<dyn Driver> {
        &self.d
    }

    /// What this model has allocated on the device: bytes now, the peak, allocation calls.
    pub fn memory(&self) -> &Tracking {
        &self.mem
    }

    /// Gradients of every parameter (after `backward`), in the layout's flat order.
    pub fn grads(&self) -> Result<Vec<f32>> {
        self.grads.to_vec()
    }

    /// `len` parameters from flat index `at`.
    fn param(&self, at: usize, len: usize) -> Result<Slice<f32>> {
        self.params.slice().range(at, len)
    }

    /// The gradients of `len` parameters from flat index `at`.
    fn grad(&self, at: usize, len: usize) -> Result<Slice<f32>> {
        self.grads.slice().range(at, len)
    }

    /// A convolution's weights as its kernels read them ([`Engine::weights`]).
    fn conv_weights(&self, conv: ConvIdx) -> Result<Slice<T>> {
        let copy = self.weights_bf16.as_ref().map(|w| w.slice());
        T::weights(self.params.slice(), copy)?.range(conv.p, conv.len())
    }

    /// A convolution's weight gradient.
    fn conv_grad(&self, conv: ConvIdx) -> Result<Slice<f32>> {
        self.grad(conv.p, conv.len())
    }

    /// What the engine's launches share: the driver and the reduction scratch.
    fn ctx<'a>(&'a self, plan: &Plan<T>) -> Ctx<'a> {
        Ctx {
            d: &*self.d,
            sums: self.sums.slice(),
            bn: self.bn_scratch(),
            split: plan.split(),
            done: self.done.slice(),
        }
    }

    /// A BN's gamma and beta.
    fn bn_params(&self, bn: BnIdx) -> Result<Affine> {
        Ok(Affine {
            gamma: self.param(bn.p, bn.c)?,
            beta: self.param(bn.p + bn.c, bn.c)?,
        })
    }

    /// The gradients of a BN's gamma and beta.
    fn bn_grads(&self, bn: BnIdx) -> Result<Affine> {
        Ok(Affine {
            gamma: self.grad(bn.p, bn.c)?,
            beta: self.grad(bn.p + bn.c, bn.c)?,
        })
    }

    /// A BN's running mean and variance.
    fn bn_running(&self, bn: BnIdx) -> Result<Stats> {
        let r = self.running.slice();
        Ok(Stats {
            mean: r.range(bn.s, bn.c)?,
            var: r.range(bn.s + bn.c, bn.c)?,
        })
    }

    /// The (scale, shift) of a BN's last forward.
    fn coefs(&self, bn: BnIdx) -> Result<BnRelu> {
        let at = self.coef_at[&bn.p];
        let c = self.coef.slice();
        Ok(BnRelu {
            scale: c.range(at, bn.c)?,
            shift: c.range(at + bn.c, bn.c)?,
        })
    }

    /// The BN that reads a forward's output next, in training, with its batch `(stats, count)`.
    fn next_bn(&self, bn: BnIdx, (stats, count): (Stats, usize)) -> Result<NextBn> {
        Ok(NextBn {
            params: self.bn_params(bn)?,
            stats,
            running: bn::Running {
                stats: self.bn_running(bn)?,
                count,
            },
            out: self.coefs(bn)?,
        })
    }

    /// The epilogue sums of `c` channels: `[2, c]`.
    fn sums(&self, c: usize) -> Result<Slice<f32>> {
        self.sums.slice().range(0, 2 * c)
    }

    /// The BN backward's scratch.
    fn bn_scratch(&self) -> bn::Scratch {
        bn::Scratch {
            part: self.bn_part.slice(),
            coef: self.bn_coef.slice(),
            done: self.done.slice(),
        }
    }

    /// A BN's (scale, shift) into its coefficients: from the batch statistics `(stats, count)` in
    /// training (also updating its running statistics; its counter is counted by the forward),
    /// else from the running ones; unless the forward before finished them (`left`, what
    /// [`Engine::conv_fwd`] returned: [`Left::Nothing`]). [`Left::Coefficients`]`{ pending }`: how
    /// many of the BN's last channels still have their statistics as sums in `self.sums`, turned
    /// into mean and variance here.
    fn bn_scale_shift(&self, bn: BnIdx, batch: Option<(Stats, usize)>, left: Left) -> Result<()> {
        let pending = match left {
            Left::Nothing if batch.is_some() => return Ok(()),
            Left::Nothing => bail!("a BN's coefficients finished outside training"),
            Left::Coefficients { pending } => pending,
        };
        let (d, params, out) = (&*self.d, self.bn_params(bn)?, self.coefs(bn)?);
        let pending = match pending {
            0 => None,
            p => Some(bn::Pending {
                sums: self.sums(p)?,
                channels: p,
            }),
        };
        match batch {
            Some((stats, count)) => {
                let running = bn::Running {
                    stats: self.bn_running(bn)?,
                    count,
                };
                bn::scale_shift(d, params, stats, Some(running), pending, out)
            }
            None if pending.is_some() => bail!("BN statistics pending outside training"),
            None => bn::scale_shift(d, params, self.bn_running(bn)?, None, None, out),
        }
    }
}

impl<T: Engine> crate::net::Net for GpuDenseNet<T> {
    fn spec(&self) -> &DenseNetSpec {
        &self.spec
    }
    fn num_params(&self) -> usize {
        self.params.len()
    }
    fn forward(&mut self, x: &[f32], n: usize, h: usize, w: usize, mode: Mode) -> Result<Vec<f32>> {
        self.run(forward::Input::F32(x), n, h, w, mode)
    }
    fn wants_raw_input(&self) -> bool {
        true
    }
    fn forward_raw(
        &mut self,
        raw: &[u8],
        src_size: usize,
        params: &[AugParams],
        out_size: usize,
        mode: Mode,
    ) -> Result<Vec<f32>> {
        let x = forward::Input::Raw {
            raw,
            src_size,
            params,
        };
        let n = params.len();
        self.run(x, n, out_size, out_size, mode)
    }
    fn forward_features(
        &mut self,
        x: &[f32],
        n: usize,
        h: usize,
        w: usize,
    ) -> Result<(Vec<f32>, Vec<f32>, usize, usize)> {
        let logits = self.run(forward::Input::F32(x), n, h, w, Mode::Eval)?;
        let plan = self.plan.as_ref().context("planned by run")?;
        let hw = plan.schedule.feature_hw();
        let len = n * hw.h * hw.w * self.layout.features();
        let fmap: Vec<T> = plan.features.to_vec()?;
        let fmap = fmap[..len].iter().map(|&v| v.to_f64() as f32).collect();
        Ok((logits, fmap, hw.h, hw.w))
    }
    fn classifier(&self) -> Result<(Vec<f32>, f32)> {
        let c = self.layout.features();
        let mut v = vec![0f32; c + 1];
        self.param(self.layout.fc, c + 1)?
            .download(&*self.d, &mut v)?;
        let b = v.pop().context("c + 1 values")?;
        Ok((v, b))
    }
    fn zero_grad(&mut self) -> Result<()> {
        self.d.stage(Stage::ZeroGrad);
        self.grads.fill_bytes(0)
    }
    fn backward(&mut self, dlogits: &[f32]) -> Result<()> {
        self.backward_from(dlogits)
    }
    fn adam_step(&mut self, adam: &mut Adam) -> Result<()> {
        if adam.m.len() != self.params.len() {
            bail!(
                "optimiser state has {} values for {} parameters",
                adam.m.len(),
                self.params.len()
            );
        }
        adam.step += 1;
        self.weights_stale = true;
        self.d.stage(Stage::Adam);
        let moments = (self.adam_m.slice(), self.adam_v.slice());
        let (p, g) = (self.params.slice(), self.grads.slice());
        super::ops::adam::update(&*self.d, adam.current(), p, g, moments)
    }
    fn export_adam(&self, adam: &mut Adam) -> Result<()> {
        adam.m = self.adam_m.to_vec()?;
        adam.v = self.adam_v.to_vec()?;
        Ok(())
    }
    fn import_adam(&mut self, adam: &Adam) -> Result<()> {
        self.adam_m.copy_from(&adam.m)?;
        self.adam_v.copy_from(&adam.v)
    }
    fn peak_device_bytes(&self) -> Option<usize> {
        Some(self.mem.peak_bytes())
    }
    fn finish(&self) -> Result<()> {
        self.d.synchronize()
    }
    /// Forward and backward run as captured graphs (the default; one per pass and batch size,
    /// captured on first use) or kernel by kernel.
    fn use_graphs(&mut self, on: bool) {
        self.use_graphs = on && !super::cuda::sync_each_launch();
        self.graphs.clear();
    }
    fn to_state_dict(&self) -> Result<StateDict> {
        let (params, running) = (self.params.to_vec()?, self.running.to_vec()?);
        let counters = &self.counters;
        Ok(crate::model::to_state_dict(
            &self.spec, &params, &running, counters,
        ))
    }
}
