//! Checkpoints: a model is a safetensors file with torchvision names (it loads into torchvision's
//! DenseNet), its architecture in the header metadata. A run's last step adds Adam's moments
//! (`last.optim.safetensors`) and the run state in that file's metadata. Every write is atomic.

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

pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let s =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
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
    crate::data::image::check_side(&what(), size)?;
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
}

/// Running totals of the epoch in progress.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PartialEpoch {
    pub loss_sum: f64,
    pub batches: usize,
    pub images: usize,
    pub seconds: f64,
}

pub struct Checkpoint {
    pub weights: StateDict,
    pub adam: Adam,
    pub state: RunState,
}

/// Save the last step: optimiser moments (with the run state in the metadata) first, then the model.
/// Both carry the Adam step count so a torn pair is detected on resume.
pub fn save_last(
    dir: &Path,
    model: &dyn Net,
    adam: &Adam,
    state: &RunState,
    image_size: usize,
) -> Result<()> {
    let (m, v) = (&adam.m, &adam.v);
    let n = m.len();
    let sd = StateDict {
        tensors: vec![
            NamedTensor {
                name: "adam.m".into(),
                shape: vec![n],
                data: TensorData::F32(m.to_vec()),
            },
            NamedTensor {
                name: "adam.v".into(),
                shape: vec![n],
                data: TensorData::F32(v.to_vec()),
            },
        ],
    };
    let mut meta = HashMap::new();
    meta.insert("state".to_string(), serde_json::to_string(state)?);
    weights::save_safetensors(&dir.join("last.optim.safetensors"), &sd, &meta)?;
    let mut meta = model_metadata(model, &state.store_id, image_size)?;
    meta.insert("adam_step".to_string(), state.adam_step.to_string());
    weights::save_safetensors(
        &dir.join("last.safetensors"),
        &model.to_state_dict()?,
        &meta,
    )
}

pub fn load_last(dir: &Path, spec: &DenseNetSpec, weight_decay: f64) -> Result<Checkpoint> {
    let model_path = dir.join("last.safetensors");
    let optim_path = dir.join("last.optim.safetensors");
    if !model_path.exists() {
        bail!(
            "{} has no checkpoint yet (no last.safetensors): start the run again",
            dir.display()
        );
    }
    let (_, weights) = load_model(&model_path, Some(spec))?;
    let n_params = spec.num_params();
    let weights::Checkpoint {
        state_dict: sd,
        metadata: meta,
    } = weights::load_safetensors(&optim_path)?;
    let state: RunState = serde_json::from_str(
        meta.get("state")
            .with_context(|| format!("{} has no run state", optim_path.display()))?,
    )
    .with_context(|| format!("{}: malformed run state", optim_path.display()))?;
    let model_meta = read_metadata(&model_path)?;
    if model_meta.get("adam_step") != Some(&state.adam_step.to_string()) {
        bail!(
            "{}: the model and optimiser files are from different steps (an interrupted save); restore a consistent pair",
            dir.display()
        );
    }
    let get = |name: &str| -> Result<Vec<f32>> {
        match sd.get(name).map(|t| &t.data) {
            Some(TensorData::F32(v)) if v.len() == n_params => Ok(v.clone()),
            _ => bail!("{}: missing or mis-sized {name}", optim_path.display()),
        }
    };
    let mut adam = Adam::new(n_params, state.lr, weight_decay);
    adam.m = get("adam.m")?;
    adam.v = get("adam.v")?;
    adam.step = state.adam_step;
    Ok(Checkpoint {
        weights,
        adam,
        state,
    })
}
