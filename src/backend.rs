//! The backend: the model a command runs, built for a device and a precision. The CPU reference
//! model (`model::DenseNet`) or the GPU model (`gpu::model::GpuDenseNet`, on CUDA or the
//! emulator), seen through [`Net`].

use crate::device::Device;
use crate::gpu::model::GpuDenseNet;
use crate::model::DenseNet;
use crate::net::Net;
use crate::precision::Precision;
use crate::spec::DenseNetSpec;
use crate::weights::StateDict;
use anyhow::{bail, Result};

/// Build a model on a device: from a state dict, or freshly initialised from `seed`
/// (torchvision's init, identical on every device).
pub fn build(
    device: Device,
    precision: Precision,
    spec: DenseNetSpec,
    weights: Option<&StateDict>,
    seed: u64,
) -> Result<Box<dyn Net>> {
    let cpu = match weights {
        Some(sd) => DenseNet::<f32>::from_state_dict(spec, sd)?,
        None => DenseNet::<f32>::new(spec, seed),
    };
    let gpu = crate::gpu::open;
    Ok(match (crate::gpu::resolve(device)?, precision) {
        (Device::Cpu, Precision::F32) => Box::new(cpu),
        (Device::Cpu, Precision::Bf16) => {
            bail!("the cpu backend computes in f32 only: drop --precision or use --device cuda|emu")
        }
        (d, Precision::F32) => Box::new(GpuDenseNet::<f32>::new(gpu(d)?, cpu)?),
        (d, Precision::Bf16) => Box::new(GpuDenseNet::<half::bf16>::new(gpu(d)?, cpu)?),
    })
}
