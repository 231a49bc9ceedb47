//! Checkpoints: a model is a safetensors file with torchvision names (it loads into torchvision's
//! DenseNet), its architecture in the header metadata. A run's last step adds Adam's moments
//! (`last.optim.safetensors`) and the run state in that file's metadata. Every write is atomic.

use crate::model::DenseNet;
use crate::optim::Adam;
use crate::spec::DenseNetSpec;
use crate::train::RunState;
use crate::weights::{self, NamedTensor, StateDict, TensorData};
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

/// Write `bytes` to `path` atomically: a temporary file beside it, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().context("no file name")?.to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

pub fn write_json_atomic<T: serde::Serialize>(path: &Path, v: &T) -> Result<()> {
    write_atomic(path, serde_json::to_string_pretty(v)?.as_bytes())
}

pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let s = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&s).with_context(|| format!("{} is malformed", path.display()))
}

/// Save a model with its architecture in the metadata.
pub fn save_model(path: &Path, model: &DenseNet, store_id: &str) -> Result<()> {
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "mura".to_string());
    meta.insert("spec".to_string(), serde_json::to_string(&model.spec)?);
    meta.insert("store".to_string(), store_id.to_string());
    weights::save_safetensors(path, &model.to_state_dict(), Some(meta))
}

/// A checkpoint's architecture, if it was written by mura.
pub fn read_spec(path: &Path) -> Result<Option<DenseNetSpec>> {
    let meta = weights::read_safetensors_metadata(path)?;
    match meta.get("spec") {
        Some(s) => Ok(Some(serde_json::from_str(s).with_context(|| {
            format!("{}: malformed architecture metadata", path.display())
        })?)),
        None => Ok(None),
    }
}

/// Load a model checkpoint. The architecture comes from the file's metadata when mura wrote it,
/// else from `spec`; a checkpoint that disagrees with an explicit `spec` is refused.
pub fn load_model(path: &Path, spec: Option<&DenseNetSpec>) -> Result<DenseNet> {
    let stored = read_spec(path)?;
    let spec = match (stored, spec) {
        (Some(s), Some(want)) if s.block_config != want.block_config
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
            "{} does not record its architecture: pass --arch",
            path.display()
        ),
    };
    let (sd, _) = weights::load_safetensors(path)?;
    DenseNet::from_state_dict(spec, &sd).with_context(|| format!("loading {}", path.display()))
}

pub struct Checkpoint {
    pub model: DenseNet,
    pub adam: Adam,
    pub state: RunState,
}

/// Save the last step: optimiser moments (with the run state in the metadata) first, then the model.
/// Both carry the Adam step count so a torn pair is detected on resume.
pub fn save_last(dir: &Path, model: &DenseNet, adam: &Adam, state: &RunState) -> Result<()> {
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
    weights::save_safetensors(&dir.join("last.optim.safetensors"), &sd, Some(meta))?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "mura".to_string());
    meta.insert("spec".to_string(), serde_json::to_string(&model.spec)?);
    meta.insert("store".to_string(), state.store_id.clone());
    meta.insert("adam_step".to_string(), state.adam_step.to_string());
    weights::save_safetensors(&dir.join("last.safetensors"), &model.to_state_dict(), Some(meta))
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
    let model = load_model(&model_path, Some(spec))?;
    let (sd, meta) = weights::load_safetensors(&optim_path)?;
    let state: RunState = serde_json::from_str(
        meta.get("state")
            .with_context(|| format!("{} has no run state", optim_path.display()))?,
    )
    .with_context(|| format!("{}: malformed run state", optim_path.display()))?;
    let model_meta = weights::read_safetensors_metadata(&model_path)?;
    if model_meta.get("adam_step") != Some(&state.adam_step.to_string()) {
        bail!(
            "{}: the model and optimiser files are from different steps (an interrupted save); restore a consistent pair",
            dir.display()
        );
    }
    let get = |name: &str| -> Result<Vec<f32>> {
        match sd.get(name).map(|t| &t.data) {
            Some(TensorData::F32(v)) if v.len() == model.params.len() => Ok(v.clone()),
            _ => bail!("{}: missing or mis-sized {name}", optim_path.display()),
        }
    };
    let mut adam = Adam::new(model.params.len(), state.lr, weight_decay);
    adam.m = get("adam.m")?;
    adam.v = get("adam.v")?;
    adam.step = state.adam_step;
    Ok(Checkpoint { model, adam, state })
}
