//! The model as the commands see it, whatever runs it: the CPU reference (`DenseNet<f32>`) or the
//! GPU op layer (on CUDA or the emulator). `train`, `eval`, `predict` and `bench` use only this.

use crate::data::loader::Batch;
use crate::model::DenseNet;
use crate::ops::augment::{self, AugParams};
use crate::ops::Mode;
use crate::optim::Adam;
use crate::spec::DenseNetSpec;
use crate::weights::StateDict;
use anyhow::{bail, Result};
use rayon::prelude::*;

/// A call a model refuses before it runs anything: every [`Net`] (the CPU model, the GPU model
/// on CUDA or the emulator) answers the same misuse with the same variant, carried in
/// `anyhow::Error` ([`Misuse::find`] recovers it).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Misuse {
    /// `len` input values for a batch of `[n, h, w, 3]`.
    #[error("forward: input has {len} values, expected [{n}, {h}, {w}, 3]")]
    InputShape {
        len: usize,
        n: usize,
        h: usize,
        w: usize,
    },
    /// An input that does not survive the stem and every transition's pooling.
    #[error("input {h}x{w} is too small for {arch}")]
    TooSmall { h: usize, w: usize, arch: String },
    /// A raw batch with no images or a zero image side.
    #[error("forward_raw: empty batch or zero image side")]
    EmptyRaw,
    /// `bytes` raw bytes for `n` images of `side`².
    #[error("forward_raw: {bytes} bytes for {n} images of {side}x{side}")]
    RawShape { bytes: usize, n: usize, side: usize },
    /// A backward with no train-mode forward before it (or its tape already used).
    #[error("backward needs a train-mode forward first")]
    NoForward,
    /// `len` logit gradients for the forward's batch of `n`.
    #[error("backward: {len} logit gradients for a batch of {n}")]
    GradShape { len: usize, n: usize },
}

impl Misuse {
    /// The outermost misuse in `e`'s chain of causes, if any.
    pub fn find(e: &anyhow::Error) -> Option<&Misuse> {
        e.chain().find_map(|cause| cause.downcast_ref::<Misuse>())
    }
}

pub trait Net {
    fn spec(&self) -> &DenseNetSpec;
    /// Trainable parameters (the length of the flat parameter buffer).
    fn num_params(&self) -> usize;
    /// x: [n, h, w, 3] normalised NHWC on the host. Returns logits [n]. Train mode records what
    /// backward needs and updates BN running statistics.
    fn forward(&mut self, x: &[f32], n: usize, h: usize, w: usize, mode: Mode) -> Result<Vec<f32>>;
    /// Whether this model takes its batches as the store's u8 images, augmented on its own
    /// device by [`Net::forward_raw`] (the GPU backends), rather than as f32 inputs built on the host.
    fn wants_raw_input(&self) -> bool {
        false
    }
    /// `forward` of the store images `raw: [n, src_size, src_size]` u8, view `i` augmented by
    /// `params[i]` into an `out_size`² input exactly as `ops::augment::image` does.
    /// Here: augmented on the host (in parallel), then `forward`; GPU backends augment on the device.
    fn forward_raw(
        &mut self,
        raw: &[u8],
        src_size: usize,
        params: &[AugParams],
        out_size: usize,
        mode: Mode,
    ) -> Result<Vec<f32>> {
        check_raw(raw, src_size, params, out_size)?;
        let len = out_size * out_size * 3;
        let mut x = vec![0f32; params.len() * len];
        x.par_chunks_mut(len)
            .zip(raw.par_chunks(src_size * src_size))
            .zip(params)
            .for_each(|((out, src), &p)| augment::image(src, src_size, p, out_size, out));
        self.forward(&x, params.len(), out_size, out_size, mode)
    }
    /// Eval-mode forward that also returns the final feature map after norm5 + ReLU
    /// ([n, h', w', C]) and its h', w', for class activation maps.
    fn forward_features(
        &mut self,
        x: &[f32],
        n: usize,
        h: usize,
        w: usize,
    ) -> Result<(Vec<f32>, Vec<f32>, usize, usize)>;
    /// The single-logit classifier's weights [C] and bias.
    fn classifier(&self) -> Result<(Vec<f32>, f32)>;
    fn zero_grad(&mut self) -> Result<()>;
    /// dlogits: [n]. Accumulates parameter gradients (after a Train forward).
    fn backward(&mut self, dlogits: &[f32]) -> Result<()>;
    /// One Adam step. `adam` holds the hyper-parameters and step count; its moments live with the
    /// parameters (host or device), see `export_adam` / `import_adam`.
    fn adam_step(&mut self, adam: &mut Adam) -> Result<()>;
    /// Copy the optimiser moments into `adam.m` / `adam.v` (for a checkpoint).
    fn export_adam(&self, adam: &mut Adam) -> Result<()>;
    /// Load the optimiser moments from `adam.m` / `adam.v` (on resume).
    fn import_adam(&mut self, adam: &Adam) -> Result<()>;
    /// Weights, BN running statistics and counters with torchvision names and layouts.
    fn to_state_dict(&self) -> Result<StateDict>;
    /// The most device memory the model has held at once (GPU backends; None on the CPU).
    fn peak_device_bytes(&self) -> Option<usize> {
        None
    }
    /// GPU backends: run forward and backward as captured CUDA graphs (the default) or kernel by
    /// kernel. Nothing to switch on the CPU.
    fn use_graphs(&mut self, _on: bool) {}
    /// Waits until the work queued on the device (Adam's update, say) is done (GPU backends;
    /// the CPU model works synchronously). For timing a whole step.
    fn finish(&self) -> Result<()> {
        Ok(())
    }
}

/// Refuses a raw batch whose shapes disagree: `raw: [params.len(), src_size, src_size]`.
pub fn check_raw(raw: &[u8], src_size: usize, params: &[AugParams], out_size: usize) -> Result<()> {
    if params.is_empty() || src_size == 0 || out_size == 0 {
        bail!(Misuse::EmptyRaw);
    }
    if raw.len() != params.len() * src_size * src_size {
        bail!(Misuse::RawShape {
            bytes: raw.len(),
            n: params.len(),
            side: src_size,
        });
    }
    Ok(())
}

/// Refuses `len` input values for a batch of `[n, h, w, 3]`.
pub fn check_input(len: usize, n: usize, h: usize, w: usize) -> Result<(), Misuse> {
    match len == n * h * w * 3 {
        true => Ok(()),
        false => Err(Misuse::InputShape { len, n, h, w }),
    }
}

/// A loader batch through the model: its raw store images (augmented by the model) when it
/// carries them, else its host-built f32 inputs.
pub fn forward_batch(model: &mut dyn Net, batch: &Batch, mode: Mode) -> Result<Vec<f32>> {
    let s = batch.size;
    match &batch.raw {
        Some(raw) => model.forward_raw(raw, batch.src_size, &batch.aug, s, mode),
        None => model.forward(&batch.images, batch.n_images, s, s, mode),
    }
}

impl Net for DenseNet<f32> {
    fn spec(&self) -> &DenseNetSpec {
        &self.spec
    }
    fn num_params(&self) -> usize {
        DenseNet::num_params(self)
    }
    fn forward(&mut self, x: &[f32], n: usize, h: usize, w: usize, mode: Mode) -> Result<Vec<f32>> {
        check_input(x.len(), n, h, w)?;
        self.feature_hw(h, w)?;
        Ok(DenseNet::forward(self, x, n, h, w, mode))
    }
    fn forward_features(
        &mut self,
        x: &[f32],
        n: usize,
        h: usize,
        w: usize,
    ) -> Result<(Vec<f32>, Vec<f32>, usize, usize)> {
        check_input(x.len(), n, h, w)?;
        self.feature_hw(h, w)?;
        Ok(DenseNet::forward_features(self, x, n, h, w))
    }
    fn classifier(&self) -> Result<(Vec<f32>, f32)> {
        let (w, b) = DenseNet::classifier(self);
        Ok((w.to_vec(), b))
    }
    fn zero_grad(&mut self) -> Result<()> {
        DenseNet::zero_grad(self);
        Ok(())
    }
    fn backward(&mut self, dlogits: &[f32]) -> Result<()> {
        // The tape of a Train-mode forward (the only recording forward a Net runs); refused
        // gradients spend it, as on the GPU model.
        match self.tape.as_ref().map(|(tape, _)| tape.n) {
            Some(n) if n == dlogits.len() => {}
            Some(n) => {
                self.tape = None;
                bail!(Misuse::GradShape {
                    len: dlogits.len(),
                    n,
                })
            }
            None => bail!(Misuse::NoForward),
        }
        DenseNet::backward(self, dlogits);
        Ok(())
    }
    fn adam_step(&mut self, adam: &mut Adam) -> Result<()> {
        adam.update(&mut self.params, &self.grads);
        Ok(())
    }
    fn export_adam(&self, _adam: &mut Adam) -> Result<()> {
        Ok(()) // the moments already live in `adam`
    }
    fn import_adam(&mut self, _adam: &Adam) -> Result<()> {
        Ok(())
    }
    fn to_state_dict(&self) -> Result<StateDict> {
        Ok(DenseNet::to_state_dict(self))
    }
}
