//! safetensors checkpoints: mura's own weight format. Names and layouts are torchvision's,
//! so a checkpoint written here loads into `torchvision.models.DenseNet` (via
//! `safetensors.torch.load_file`) and back. Tensors are F32, except `num_batches_tracked`
//! (I64, shape `[]`). Free-form string metadata (architecture, training spec as JSON) rides
//! in the header's `__metadata__`.

use super::{NamedTensor, StateDict, TensorData};
use anyhow::{bail, Context, Result};
use safetensors::{Dtype, SafeTensors, View};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

/// A loaded checkpoint: tensors plus the header's string metadata.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Checkpoint {
    /// Tensors in file order (safetensors sorts them: I64 first, then F32, each by name).
    pub state_dict: StateDict,
    pub metadata: HashMap<String, String>,
}

/// One tensor's little-endian bytes, as the safetensors serializer wants them.
struct Bytes {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Bytes {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn to_bytes(t: &NamedTensor) -> Result<Bytes> {
    let numel: usize = t.shape.iter().product();
    if numel != t.data.len() {
        bail!(
            "tensor '{}' has shape {:?} ({numel} elements) but holds {} values",
            t.name,
            t.shape,
            t.data.len()
        );
    }
    let (dtype, data) = match &t.data {
        TensorData::F32(v) => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        TensorData::I64(v) => (Dtype::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
    };
    Ok(Bytes {
        dtype,
        shape: t.shape.clone(),
        data,
    })
}

/// Serialises a state dict (and optional metadata) to safetensors bytes.
pub fn to_safetensors_bytes(sd: &StateDict, metadata: &HashMap<String, String>) -> Result<Vec<u8>> {
    let mut seen = std::collections::HashSet::new();
    let mut tensors = Vec::with_capacity(sd.tensors.len());
    for t in &sd.tensors {
        if !seen.insert(t.name.as_str()) {
            bail!("duplicate tensor name '{}'", t.name);
        }
        tensors.push((t.name.clone(), to_bytes(t)?));
    }
    let meta = (!metadata.is_empty()).then(|| metadata.clone());
    safetensors::serialize(tensors.iter().map(|(n, b)| (n.as_str(), b)), meta)
        .context("serialising safetensors")
}

/// Writes `sd` to `path` atomically (see `disk::write_atomic`).
pub fn save_safetensors(
    path: &Path,
    sd: &StateDict,
    metadata: &HashMap<String, String>,
) -> Result<()> {
    crate::disk::write_atomic(path, &to_safetensors_bytes(sd, metadata)?)
}

/// Parses safetensors bytes into a checkpoint. F32 and I64 only; other dtypes are an error
/// naming the tensor.
pub fn from_safetensors_bytes(bytes: &[u8]) -> Result<Checkpoint> {
    let (_, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| anyhow::anyhow!("not a valid safetensors file ({e})"))?;
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow::anyhow!("not a valid safetensors file ({e})"))?;
    let mut tensors = Vec::with_capacity(st.len());
    for name in meta.offset_keys() {
        let v = st
            .tensor(&name)
            .map_err(|e| anyhow::anyhow!("safetensors tensor '{name}': {e}"))?;
        let raw = v.data();
        let data = match v.dtype() {
            Dtype::F32 => TensorData::F32(
                raw.chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            Dtype::I64 => TensorData::I64(
                raw.chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            other => bail!(
                "tensor '{name}' has dtype {other:?}; mura checkpoints hold F32 and I64 tensors only"
            ),
        };
        tensors.push(NamedTensor {
            name,
            shape: v.shape().to_vec(),
            data,
        });
    }
    Ok(Checkpoint {
        state_dict: StateDict { tensors },
        metadata: meta.metadata().clone().unwrap_or_default(),
    })
}

/// The largest safetensors file read (DenseNet-161's optimiser state is 230 MB).
pub const MAX_SAFETENSORS_BYTES: u64 = 2 << 30;

/// Loads a safetensors checkpoint.
pub fn load_safetensors(path: &Path) -> Result<Checkpoint> {
    load_safetensors_capped(path, MAX_SAFETENSORS_BYTES)
}

/// Loads a safetensors file that may hold at most `cap` bytes.
pub fn load_safetensors_capped(path: &Path, cap: u64) -> Result<Checkpoint> {
    let bytes = crate::disk::read_regular(path, cap)?;
    from_safetensors_bytes(&bytes).with_context(|| format!("loading {}", path.display()))
}
