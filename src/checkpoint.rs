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

use crate::data::image::Preprocess;
use crate::disk::{self, failpoint};
use crate::net::Net;
use crate::optim::Adam;
use crate::optim::ReduceLrOnPlateau;
use crate::spec::DenseNetSpec;
use crate::weights::safetensors::MAX_SAFETENSORS_BYTES;
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

/// How a checkpoint's model was fed in training, which it records beside the weights: the
/// preprocessing of its images and its input side.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Input {
    pub preprocess: Preprocess,
    pub image_size: usize,
}

/// The metadata entry recording a checkpoint's [`Preprocess`].
const PREPROCESS_KEY: &str = "preprocess";

/// What a mura checkpoint records beside the weights.
fn model_metadata(
    model: &dyn Net,
    store_id: &str,
    input: Input,
) -> Result<HashMap<String, String>> {
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "mura".to_string());
    meta.insert("spec".to_string(), serde_json::to_string(model.spec())?);
    meta.insert("store".to_string(), store_id.to_string());
    meta.insert("image_size".to_string(), input.image_size.to_string());
    let preprocess = serde_json::to_string(&input.preprocess)?;
    meta.insert(PREPROCESS_KEY.to_string(), preprocess);
    Ok(meta)
}

/// Save a model with its architecture, store identity and input in the metadata.
pub fn save_model(path: &Path, model: &dyn Net, store_id: &str, input: Input) -> Result<()> {
    let meta = model_metadata(model, store_id, input)?;
    weights::save_safetensors(path, &model.to_state_dict()?, &meta)
}

/// A model checkpoint as read: its architecture, its weights (checked against it, layout and
/// values), and what a mura checkpoint records of its training.
pub struct ModelFile {
    pub spec: DenseNetSpec,
    pub weights: StateDict,
    /// The input side it was trained at.
    pub image_size: Option<usize>,
    /// The preprocessing it was trained with: recorded, or, for a checkpoint of an earlier mura
    /// (which recorded only its store's identity), that store's side with prep's one resize.
    pub preprocess: Option<Preprocess>,
    /// The header's string metadata.
    pub metadata: HashMap<String, String>,
}

impl ModelFile {
    /// The preprocessing to feed the model at input side `side`: the one it was trained with,
    /// else (a checkpoint that records none: not mura's) a store of that very side, with a note
    /// saying so.
    pub fn preprocess_for(&self, path: &Path, side: usize) -> (Preprocess, Option<String>) {
        match self.preprocess {
            Some(p) => (p, None),
            None => (
                Preprocess::prep(side),
                Some(format!(
                    "note: {} records no preprocessing (not a mura checkpoint): its PNGs are \
                     preprocessed as `mura prep --size {side}` would store them",
                    path.display()
                )),
            ),
        }
    }
}

/// The input side `meta` of the file `path` records, if any.
fn recorded_image_size(path: &Path, meta: &HashMap<String, String>) -> Result<Option<usize>> {
    let Some(s) = meta.get("image_size") else {
        return Ok(None);
    };
    let what = || format!("{}: the image size in its metadata", path.display());
    let size = s.parse().with_context(|| format!("{} is {s:?}", what()))?;
    crate::bounds::SIDE.check(&what(), size)?;
    Ok(Some(size))
}

/// The preprocessing `meta` of the file `path` records: the entry [`PREPROCESS_KEY`], or the side
/// ending the store identity (`<checksum>-<images>x<side>`) that earlier versions recorded, whose
/// prep resized one way only.
fn recorded_preprocess(path: &Path, meta: &HashMap<String, String>) -> Result<Option<Preprocess>> {
    let what = || format!("{}: the preprocessing in its metadata", path.display());
    let p = match (meta.get(PREPROCESS_KEY), meta.get("store")) {
        (Some(p), _) => serde_json::from_str(p).with_context(|| format!("{} is {p:?}", what()))?,
        (None, Some(id)) => {
            let side = id.rsplit_once('x').and_then(|(_, s)| s.parse().ok());
            Preprocess::prep(side.with_context(|| {
                format!(
                    "{}: its store identity {id:?} names no image side",
                    path.display()
                )
            })?)
        }
        (None, None) => return Ok(None),
    };
    crate::bounds::SIDE.check(&what(), p.store_size)?;
    Ok(Some(p))
}

/// A checkpoint's architecture, if it was written by mura.
fn recorded_spec(path: &Path, meta: &HashMap<String, String>) -> Result<Option<DenseNetSpec>> {
    match meta.get("spec") {
        Some(s) => Ok(Some(serde_json::from_str(s).with_context(|| {
            format!("{}: malformed architecture metadata", path.display())
        })?)),
        None => Ok(None),
    }
}

/// Load a model checkpoint: its architecture (from the file's metadata when mura wrote it, else
/// `spec`; a checkpoint that disagrees with an explicit `spec` is refused), then its tensors'
/// names, shapes and dtypes from the header, checked against that architecture before any data
/// is read, then the data, tensor by tensor, checked too (`weights::check_state_dict`).
pub fn load_model(path: &Path, spec: Option<&DenseNetSpec>) -> Result<ModelFile> {
    let file = weights::safetensors::SafetensorsFile::open(path, MAX_SAFETENSORS_BYTES)?;
    read_model(path, file, spec)
}

/// [`load_model`] of the file already opened from `path`.
fn read_model(
    path: &Path,
    file: weights::safetensors::SafetensorsFile,
    spec: Option<&DenseNetSpec>,
) -> Result<ModelFile> {
    let metadata = file.metadata();
    let spec = match (recorded_spec(path, &metadata)?, spec) {
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
    let loading = || format!("loading {}", path.display());
    weights::check_heads(&file.heads(), &spec).with_context(loading)?;
    let weights = file.state_dict()?;
    weights::check_state_dict(&weights, &spec).with_context(loading)?;
    Ok(ModelFile {
        image_size: recorded_image_size(path, &metadata)?,
        preprocess: recorded_preprocess(path, &metadata)?,
        spec,
        weights,
        metadata,
    })
}

/// The architecture a command asks for: named by the user, or the command's default.
#[derive(Clone, Debug)]
pub enum ArchRequest {
    /// Asked for by name: a checkpoint recording another architecture is refused.
    Named(DenseNetSpec),
    /// Taken by default: a checkpoint's recorded architecture wins.
    Default(DenseNetSpec),
}

impl ArchRequest {
    /// The architecture asked for.
    pub fn spec(&self) -> &DenseNetSpec {
        match self {
            ArchRequest::Named(s) | ArchRequest::Default(s) => s,
        }
    }
}

/// [`load_model`] for the architecture a command asks for: a mura checkpoint records its
/// architecture, which a named request must match; any other safetensors file with torchvision's
/// names loads as the request.
pub fn load_model_for(path: &Path, request: &ArchRequest) -> Result<ModelFile> {
    let file = weights::safetensors::SafetensorsFile::open(path, MAX_SAFETENSORS_BYTES)?;
    let recorded = recorded_spec(path, &file.metadata())?.is_some();
    let requested = request.spec();
    let named = matches!(request, ArchRequest::Named(_));
    let want = (!recorded || named).then_some(requested);
    let loaded = read_model(path, file, want);
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
    input: Input,
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
        write_model(dir, model, state, &optim, input)
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
    let bytes = weights::safetensors::to_safetensors_bytes(&sd, &meta)?;
    disk::write_synced(path, &bytes, "checkpoint.optim-written")
}

/// Steps 2 and 3 of [`save_last`]: the model, naming `optim`, replaces `last.safetensors`.
fn write_model(
    dir: &Path,
    model: &dyn Net,
    state: &RunState,
    optim: &str,
    input: Input,
) -> Result<()> {
    let mut meta = model_metadata(model, &state.store_id, input)?;
    meta.insert("adam_step".to_string(), state.adam_step.to_string());
    meta.insert(OPTIM_KEY.to_string(), optim.to_string());
    let bytes = weights::safetensors::to_safetensors_bytes(&model.to_state_dict()?, &meta)?;
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
    let ModelFile {
        weights,
        metadata: meta,
        ..
    } = load_model(&model_path, Some(spec))?;
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
    } = weights::safetensors::load_safetensors_capped(path, cap)?;
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
    // Finite moments, and second moments (running means of squares) not negative.
    for (name, moment, signed) in [("adam.m", &m, true), ("adam.v", &v, false)] {
        if let Some(i) = moment
            .iter()
            .position(|&x| !x.is_finite() || (!signed && x < 0.0))
        {
            bail!(
                "{}: {name} holds {} (element {i}), a value no run writes",
                path.display(),
                moment[i]
            );
        }
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
