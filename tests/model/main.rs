//! The DenseNet as a whole: the CPU model's gradients against finite differences (`gradcheck`)
//! and against torchvision's golden fixtures (`golden`), and the GPU model against the CPU model
//! on the executor named by MURA_TEST_DEVICE (`gpu`, `rawpath`), and the launch plan against
//! what the emulator executes (`plan`).

#[path = "../common/mod.rs"]
mod common;

mod golden;
mod gpu;
mod gradcheck;
mod plan;
mod rawpath;

use mura::loss::{weighted_bce_f32, LossLevel};
use mura::model::DenseNet;
use mura::rng::Rng;
use mura::spec::DenseNetSpec;

/// The tiny DenseNet most model tests run: two blocks of two layers, growth 4.
fn tiny() -> DenseNetSpec {
    DenseNetSpec::custom(4, vec![2, 2], 8, 2).unwrap()
}

/// Wide enough that the bf16 path's 3×3 forwards split their reduction (64 bottleneck channels:
/// 18 K-slices over a grid of 2 row tiles) and its loads take the 16-byte paths.
fn wide() -> DenseNetSpec {
    DenseNetSpec::custom(16, vec![2, 2], 32, 4).unwrap()
}

/// A freshly initialised tiny model with every parameter perturbed (so no BN is an identity).
fn model(rng: &mut Rng) -> DenseNet<f32> {
    model_of(tiny(), rng)
}

/// [`model`] of another architecture.
fn model_of(spec: DenseNetSpec, rng: &mut Rng) -> DenseNet<f32> {
    let mut m = DenseNet::<f32>::new(spec, rng.next_u64());
    for p in &mut m.params {
        *p += 0.1 * rng.normal() as f32;
    }
    m
}

/// Loss and d(loss)/d(logits) for labels alternating 1, 0, 1, ... one view per study.
fn loss(logits: &[f32]) -> (f32, Vec<f32>) {
    let n = logits.len();
    let labels: Vec<f64> = (0..n).map(|i| ((i + 1) % 2) as f64).collect();
    let w = vec![(0.4, 0.6); n];
    let views: Vec<usize> = (0..n).collect();
    weighted_bce_f32(logits, &views, &labels, &w, LossLevel::Image)
}
