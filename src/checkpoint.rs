//! Checkpoints: a model is a safetensors file with torchvision names (it loads into torchvision's
//! DenseNet), its architecture in the header metadata.
//!
//! A run's last step is two files committed together by one rename (see [`save_last`]):
//! `last.optim-<N>.safetensors` (Adam's moments, the run state in its metadata), written first
//! under a name no earlier save used, then `last.safetensors` (the model), whose metadata names
//! that optimiser file and which replaces the previous model in one rename: the commit. So the
//! model file is the pointer to its generation, and the last model stays a plain model file
//! where a user finds it. [`load_last`] reads the model and the optimiser file it names, and
//! removes every other one (what an interrupted save left). Runs written before generations
//! (`last.optim.safetensors`, two renames) still resume.

use crate::disk::{self, failpoint};
use crate::net::Net;
use crate::optim::Adam;
use crate::optim::ReduceLrOnPlateau;
use crate::spec::DenseNetSpec;
use crate::weights::{self, NamedTensor, StateDict, TensorData};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

pub fn write_json_atomic<T: serde::Serialize>(path: &Path, v: &T) -> Result<()> {
    crate::disk::write_atomic(path, serde_json::to_string_pretty(v)?.as_bytes())
}

/// The largest JSON file of a run read (its `config.json`).
pub const MAX_JSON_BYTES: u64 = 1 << 20;

pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let s = disk::read_regular_string(path, MAX_JSON_BYTES)?;
    serde_json::from_str(&s).with_context(|| format!("{} is malformed", path.display()))
}

/// What a mura checkpoint records beside the weights.
fn model_metadata(
    model: &dyn Net,
    store_id: &str,
    image_size: usize,
) -> Result<HashMap<String, String>> {
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "mura".to_string());
    meta.insert("spec".to_string(), serde_json::to_string(model.spec())?);
    meta.insert("store".to_string(), store_id.to_string());
    meta.insert("image_size".to_string(), image_size.to_string());
    Ok(meta)
}

/// Save a model with its architecture, store identity and input size in the metadata.
pub fn save_model(path: &Path, model: &dyn Net, store_id: &str, image_size: usize) -> Result<()> {
    let meta = model_metadata(model, store_id, image_size)?;
    weights::save_safetensors(path, &model.to_state_dict()?, &meta)
}

fn read_metadata(path: &Path) -> Result<HashMap<String, String>> {
    Ok(weights::load_safetensors(path)?.metadata)
}

/// The input side a mura checkpoint was trained at.
pub fn read_image_size(path: &Path) -> Result<Option<usize>> {
    let Some(s) = read_metadata(path)?.get("image_size").cloned() else {
        return Ok(None);
    };
    let what = || format!("{}: the image size in its metadata", path.display());
    let size = s.parse().with_context(|| format!("{} is {s:?}", what()))?;
    crate::bounds::SIDE.check(&what(), size)?;
    Ok(Some(size))
}

/// A checkpoint's architecture, if it was written by mura.
pub fn read_spec(path: &Path) -> Result<Option<DenseNetSpec>> {
    let meta = read_metadata(path)?;
    match meta.get("spec") {
        Some(s) => Ok(Some(serde_json::from_str(s).with_context(|| {
            format!("{}: malformed architecture metadata", path.display())
        })?)),
        None => Ok(None),
    }
}

/// Load a model checkpoint's architecture and weights (checked against that architecture). The
/// architecture comes from the file's metadata when mura wrote it, else from `spec`; a checkpoint
/// that disagrees with an explicit `spec` is refused.
pub fn load_model(path: &Path, spec: Option<&DenseNetSpec>) -> Result<(DenseNetSpec, StateDict)> {
    let stored = read_spec(path)?;
    let spec = match (stored, spec) {
        (Some(s), Some(want))
            if s.block_config != want.block_config
                || s.growth_rate != want.growth_rate
                || s.num_init_features != want.num_init_features
                || s.bn_size != want.bn_size =>
        {
            bail!(
                "{} holds a {} ({:?}), not the requested {}",
                path.display(),
                s.arch,
                s.block_config,
                want.arch
            )
        }
        (Some(s), _) => s,
        (None, Some(want)) => want.clone(),
        (None, None) => bail!(
            "{} is not a mura model checkpoint (it records no architecture)",
            path.display()
        ),
    };
    let sd = weights::load_safetensors(path)?.state_dict;
    weights::check_layout(&sd, &spec).with_context(|| format!("loading {}", path.display()))?;
    Ok((spec, sd))
}

/// [`load_model`] for an architecture a command asked for (`explicit`: asked for by name rather
/// than taken by default): a mura checkpoint records its architecture, which an explicit request
/// must match; any other safetensors file with torchvision's names loads as `requested`.
pub fn load_model_for(
    path: &Path,
    requested: &DenseNetSpec,
    explicit: bool,
) -> Result<(DenseNetSpec, StateDict)> {
    let recorded = read_spec(path)?.is_some();
    let want = (!recorded || explicit).then_some(requested);
    let loaded = load_model(path, want);
    match recorded {
        true => loaded,
        false => loaded.with_context(|| {
            format!(
                "{} records no architecture, so it was read as --arch {}: pass the --arch it has",
                path.display(),
                requested.arch
            )
        }),
    }
}

/// Where a run stands: saved with every checkpoint of the last step.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunState {
    /// Epochs fully finished (validation included).
    pub epochs_done: usize,
    /// Batches finished inside epoch `epochs_done` (non-zero only after an interruption).
    pub batches_done: usize,
    pub best_val_loss: Option<f64>,
    pub adam_step: u64,
    pub lr: f64,
    pub scheduler: ReduceLrOnPlateau,
    pub store_id: String,
    /// The unfinished epoch's running totals, so a resumed epoch reports the same train loss.
    #[serde(default)]
    pub partial: PartialEpoch,
    /// Epoch `epochs_done`'s line of `metrics.jsonl`, committed with the checkpoint that
    /// finished the epoch, so that a kill before the line was appended loses nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch_metrics: Option<serde_json::Value>,
}

/// Running totals of the epoch in progress.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PartialEpoch {
    pub loss_sum: f64,
    pub batches: usize,
    pub images: usize,
    pub seconds: f64,
}

impl RunState {
    /// Refuses a state that no run writes (a damaged or hand-edited optimiser file), so that
    /// it cannot turn into a NaN learning rate or a wrapped step count later.
    fn check(&self) -> Result<()> {
        let s = &self.scheduler;
        let finite = [self.lr, s.factor, s.threshold, s.min_lr, s.eps];
        let ok = finite.iter().all(|x| x.is_finite() && *x >= 0.0)
            && self.lr > 0.0
            && s.factor < 1.0
            && [self.best_val_loss, s.best]
                .iter()
                .flatten()
                .all(|x| x.is_finite())
            && self.adam_step <= i32::MAX as u64
            && self.partial.batches <= self.batches_done
            && self.partial.loss_sum.is_finite()
            && self.partial.seconds.is_finite();
        match ok {
            true => Ok(()),
            false => {
                bail!("damaged run state (a rate, a step count or an epoch total out of range)")
            }
        }
    }
}

pub struct Checkpoint {
    pub weights: StateDict,
    pub adam: Adam,
    pub state: RunState,
}

/// The run folder's last model, the pointer to its optimiser file.
pub const LAST_MODEL: &str = "last.safetensors";
/// Optimiser files are `last.optim-<N>.safetensors`, `N` counting saves.
const OPTIM_PREFIX: &str = "last.optim-";
const OPTIM_SUFFIX: &str = ".safetensors";
/// The optimiser file of a run written before generations.
const LEGACY_OPTIM: &str = "last.optim.safetensors";
/// The model's metadata entry naming its optimiser file.
const OPTIM_KEY: &str = "optimizer";

fn optim_file(generation: u64) -> String {
    format!("{OPTIM_PREFIX}{generation}{OPTIM_SUFFIX}")
}

/// The `N` of an optimiser file's name `last.optim-<N>.safetensors`.
fn optim_generation(name: &str) -> Option<u64> {
    let n = name
        .strip_prefix(OPTIM_PREFIX)?
        .strip_suffix(OPTIM_SUFFIX)?;
    let g: u64 = n.parse().ok()?;
    (g.to_string() == n).then_some(g)
}

/// Saves the last step in one commit. Each step is a failpoint `checkpoint.<step>`:
/// 1. `optim-written`: Adam's moments and `state` into the new `last.optim-<N>.safetensors`,
///    `N` above every optimiser file present, fsynced (and the folder);
/// 2. `model-written`: the model, naming that file, into a temporary file beside
///    `last.safetensors`, fsynced;
/// 3. `committed`: renamed over `last.safetensors`, the folder fsynced: the commit;
/// 4. `previous-removed`: every other optimiser file removed.
///
/// A kill before step 3 leaves the previous checkpoint in use, from it on the new one. An error
/// before it (a full disk) removes what this save wrote and leaves the previous checkpoint.
pub fn save_last(
    dir: &Path,
    model: &dyn Net,
    adam: &Adam,
    state: &RunState,
    image_size: usize,
) -> Result<()> {
    let generation = disk::entry_names(dir)?
        .iter()
        .filter_map(|n| optim_generation(n))
        .max()
        .map_or(1, |g| g + 1);
    let optim = optim_file(generation);
    let optim_path = dir.join(&optim);
    let written = write_optim(&optim_path, adam, state).and_then(|_| {
        disk::sync_dir(Some(dir));
        write_model(dir, model, state, &optim, image_size)
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&optim_path);
        return Err(e);
    }
    let tidy = || format!("{} was saved, then tidying up failed", dir.display());
    failpoint::hit("checkpoint.committed").with_context(tidy)?;
    remove_leftovers(dir, Some(&optim));
    failpoint::hit("checkpoint.previous-removed").with_context(tidy)
}

/// Step 1 of [`save_last`].
fn write_optim(path: &Path, adam: &Adam, state: &RunState) -> Result<()> {
    let n = adam.m.len();
    let moment = |name: &str, v: &[f32]| NamedTensor {
        name: name.into(),
        shape: vec![n],
        data: TensorData::F32(v.to_vec()),
    };
    let sd = StateDict {
        tensors: vec![moment("adam.m", &adam.m), moment("adam.v", &adam.v)],
    };
    let meta = HashMap::from([("state".to_string(), serde_json::to_string(state)?)]);
    let bytes = weights::checkpoint::to_safetensors_bytes(&sd, &meta)?;
    disk::write_synced(path, &bytes, "checkpoint.optim-written")
}

/// Steps 2 and 3 of [`save_last`]: the model, naming `optim`, replaces `last.safetensors`.
fn write_model(
    dir: &Path,
    model: &dyn Net,
    state: &RunState,
    optim: &str,
    image_size: usize,
) -> Result<()> {
    let mut meta = model_metadata(model, &state.store_id, image_size)?;
    meta.insert("adam_step".to_string(), state.adam_step.to_string());
    meta.insert(OPTIM_KEY.to_string(), optim.to_string());
    let bytes = weights::checkpoint::to_safetensors_bytes(&model.to_state_dict()?, &meta)?;
    disk::write_atomic_step(&dir.join(LAST_MODEL), &bytes, "checkpoint.model-written")
}

/// Removes what interrupted saves left in `dir`: optimiser files other than `keep` and
/// temporary model files. Best effort: what cannot be removed now is removed by a later save.
fn remove_leftovers(dir: &Path, keep: Option<&str>) {
    for name in disk::entry_names(dir).unwrap_or_default() {
        let optim = optim_generation(&name).is_some() || name == LEGACY_OPTIM;
        if (optim && keep != Some(name.as_str())) || disk::is_temporary(&name, LAST_MODEL) {
            let _ = std::fs::remove_file(dir.join(&name));
        }
    }
    disk::sync_dir(Some(dir));
}

/// The run's last checkpoint in `dir`, or None if it has none yet; once it is read, removes
/// what interrupted saves left there (without one, the run's first save does). Call it with
/// the run folder locked.
pub fn load_last(dir: &Path, spec: &DenseNetSpec, weight_decay: f64) -> Result<Option<Checkpoint>> {
    let model_path = dir.join(LAST_MODEL);
    if model_path.symlink_metadata().is_err() {
        return Ok(None);
    }
    let (_, weights) = load_model(&model_path, Some(spec))?;
    let meta = read_metadata(&model_path)?;
    let optim = match meta.get(OPTIM_KEY) {
        None => LEGACY_OPTIM.to_string(),
        Some(name) => optim_generation(name).map(optim_file).with_context(|| {
            format!(
                "{}: its metadata names {name:?}, not an optimiser file",
                model_path.display()
            )
        })?,
    };
    let optim_path = dir.join(&optim);
    let (m, v, state) = read_optim(&optim_path, spec.num_params()).with_context(|| {
        format!(
            "reading the optimiser state that {} names",
            model_path.display()
        )
    })?;
    if meta.get("adam_step") != Some(&state.adam_step.to_string()) {
        bail!(
            "{}: {LAST_MODEL} and {optim} are from different steps (a save interrupted by an \
             earlier mura), so the run cannot resume; start a new one from its model with \
             `mura train --init {}`",
            dir.display(),
            model_path.display()
        );
    }
    remove_leftovers(dir, Some(&optim));
    let adam = Adam {
        m,
        v,
        step: state.adam_step,
        ..Adam::new(0, state.lr, weight_decay)
    };
    Ok(Some(Checkpoint {
        weights,
        adam,
        state,
    }))
}

/// Adam's moments (each `n_params` long) and the run state from the optimiser file `path`.
fn read_optim(path: &Path, n_params: usize) -> Result<(Vec<f32>, Vec<f32>, RunState)> {
    // Two moments of 4-byte floats, and a header (the run state) of a few kilobytes.
    let cap = 8 * n_params as u64 + (1 << 20);
    let weights::Checkpoint {
        state_dict: mut sd,
        metadata: meta,
    } = weights::checkpoint::load_safetensors_capped(path, cap)?;
    let state: RunState = serde_json::from_str(
        meta.get("state")
            .with_context(|| format!("{} has no run state", path.display()))?,
    )
    .with_context(|| format!("{}: malformed run state", path.display()))?;
    state.check().with_context(|| path.display().to_string())?;
    let mut take = |name: &str| -> Result<Vec<f32>> {
        let i = sd.tensors.iter().position(|t| t.name == name);
        match i.map(|i| sd.tensors.swap_remove(i).data) {
            Some(TensorData::F32(v)) if v.len() == n_params => Ok(v),
            _ => bail!(
                "{}: {name} is missing or not {n_params} floats (the model's parameters)",
                path.display()
            ),
        }
    };
    let (m, v) = (take("adam.m")?, take("adam.v")?);
    if !sd.tensors.is_empty() {
        bail!(
            "{}: unexpected tensor '{}'",
            path.display(),
            sd.tensors[0].name
        );
    }
    Ok((m, v, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optimiser_files_are_named_by_their_generation_only() {
        assert_eq!(optim_generation(&optim_file(7)), Some(7));
        assert_eq!(optim_generation("last.optim-12.safetensors"), Some(12));
        for other in [
            LEGACY_OPTIM,
            "last.optim-.safetensors",
            "last.optim-07.safetensors",
            "last.optim-+7.safetensors",
            "last.optim-7.safetensors.tmp1",
            "last.optim-../7.safetensors",
            LAST_MODEL,
        ] {
            assert_eq!(optim_generation(other), None, "{other}");
        }
    }
}
