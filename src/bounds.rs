//! The one bounded-size policy: every count a user gives — on the command line, or in a run's
//! `config.json` that `--resume` reads back — has its stated bounds here. The command line's
//! parsers are built from them (`cli::count`, so `--batch 0` or `--patience 4294967296` is an
//! argument that does not parse), and the library checks the same bounds with [`Count::check`]
//! where a count arrives by another way (a config file, a struct built by a caller), so no count
//! becomes an overflowing allocation, a wrapped sum or a narrowed integer.

use anyhow::{bail, Result};

/// The inclusive range a count may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Count {
    pub min: u64,
    pub max: u64,
}

impl Count {
    /// Refuses `value` of the count called `name` (e.g. `--batch`) outside the bounds.
    pub fn check(&self, name: &str, value: usize) -> Result<()> {
        if !u64::try_from(value).is_ok_and(|v| (self.min..=self.max).contains(&v)) {
            bail!(
                "{name} {value} is out of range ({}..={})",
                self.min,
                self.max
            );
        }
        Ok(())
    }
}

/// Studies per training or evaluation batch; images per `bench` batch.
pub const BATCH: Count = Count { min: 1, max: 4096 };
/// Epochs of a run.
pub const EPOCHS: Count = Count {
    min: 1,
    max: 100_000,
};
/// Epochs without improvement before the learning rate drops.
pub const PATIENCE: Count = Count {
    min: 0,
    max: 10_000,
};
/// Loader threads.
pub const WORKERS: Count = Count { min: 1, max: 256 };
/// Views taken from one study.
pub const MAX_VIEWS: Count = Count { min: 1, max: 4096 };
/// Batches per epoch.
pub const MAX_BATCHES: Count = Count {
    min: 1,
    max: 1_000_000_000,
};
/// Synthetic studies (`synth`, `demo`).
pub const STUDIES: Count = Count {
    min: 1,
    max: 1_000_000,
};
/// Timed `bench` steps.
pub const STEPS: Count = Count {
    min: 1,
    max: 1_000_000,
};
/// Untimed `bench` steps.
pub const WARMUP: Count = Count {
    min: 0,
    max: 1_000_000,
};
/// An image side: the store's (`prep --size`) or the model input's (`--image-size`).
pub const SIDE: Count = Count { min: 8, max: 4096 };
