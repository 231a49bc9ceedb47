//! What GPU tests share: the executor under test and the error measure.
//!
//! One test body runs on every executor: the emulator by default, a real GPU when
//! `MURA_TEST_DEVICE=cuda` (or `cuda:N`) is set, in which case having no GPU is a failure.

use super::Driver;
use crate::device::Device;
use crate::rng::Rng;
use anyhow::{Context, Result};
use std::sync::Arc;

/// The driver named by `MURA_TEST_DEVICE` (`emu` when unset).
pub fn test_driver() -> Result<Arc<dyn Driver>> {
    let name = std::env::var("MURA_TEST_DEVICE").unwrap_or_else(|_| "emu".into());
    let device: Device = name.parse()?;
    super::open(device).with_context(|| format!("MURA_TEST_DEVICE={name}"))
}

/// ‖out − ref‖ / ‖ref‖ (or ‖out − ref‖ when ref is 0); infinite when out holds a NaN or a length
/// differs, so a poisoned output never passes.
pub fn rel_err(out: &[f64], reference: &[f64]) -> f64 {
    if out.len() != reference.len() || out.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let diff: f64 = out
        .iter()
        .zip(reference)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = reference.iter().map(|b| b * b).sum::<f64>().sqrt();
    if norm > 0.0 {
        diff / norm
    } else {
        diff
    }
}

/// A seed that differs from run to run (fresh random inputs), printed so a failure can be replayed
/// with `MURA_TEST_SEED`.
pub fn fresh_seed(test: &str) -> u64 {
    let seed = std::env::var("MURA_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            t.as_nanos() as u64 ^ ((std::process::id() as u64) << 32)
        });
    eprintln!("{test}: seed {seed} (MURA_TEST_SEED={seed} to replay)");
    seed
}

/// `n` normal samples times `scale` plus `offset`.
pub fn randn(rng: &mut Rng, n: usize, scale: f64, offset: f64) -> Vec<f64> {
    (0..n).map(|_| rng.normal() * scale + offset).collect()
}

/// Columns `[c0, c0 + c)` of a `[rows, rs]` matrix.
pub fn cols(v: &[f64], rs: usize, c0: usize, c: usize) -> Vec<f64> {
    v.chunks(rs).flat_map(|r| r[c0..c0 + c].to_vec()).collect()
}

/// Every element outside columns `[c0, c0 + c)` of a `[rows, rs]` matrix is still NaN.
pub fn untouched_outside(v: &[f64], rs: usize, c0: usize, c: usize) -> bool {
    v.chunks(rs).all(|r| {
        r.iter()
            .enumerate()
            .all(|(j, x)| (c0..c0 + c).contains(&j) || x.is_nan())
    })
}
