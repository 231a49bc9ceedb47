//! Import of PyTorch `.pth` files: the zip format `torch.save` writes today
//! (`<top>/data.pkl` + `<top>/data/<key>`) and the legacy format of 2017-era files such as
//! torchvision's `densenet169-b2777c0a.pth` (magic number, protocol version, sys info, the
//! pickled object, the pickled list of storage keys, then each storage as an 8-byte
//! little-endian element count and its raw bytes).
//!
//! Tensors come out contiguous and row-major (strides and offsets honoured); float storages
//! (float, double, half, bfloat16) become f32, long storages i64.

use super::pickle::{self, StorageDtype, StorageRef, TensorRef, Value};
use super::{NamedTensor, StateDict, TensorData};
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

const LEGACY_MAGIC: i128 = 0x1950a86a20f9469cfc6c;
const LEGACY_PROTOCOL: i128 = 1001;

/// Reads a `.pth` file (either format) into a state dict, in the file's order. A state dict
/// nested under a `"state_dict"` key is found too.
pub fn load_pth(path: &Path) -> Result<StateDict> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    load_pth_bytes(&bytes).with_context(|| format!("importing {}", path.display()))
}

pub fn load_pth_bytes(bytes: &[u8]) -> Result<StateDict> {
    if bytes.starts_with(b"PK\x03\x04") {
        load_zip(bytes)
    } else if bytes.starts_with(&[0x80]) {
        load_legacy(bytes)
    } else {
        bail!("not a PyTorch checkpoint (neither a zip archive nor a pickle stream)")
    }
}

fn load_zip(bytes: &[u8]) -> Result<StateDict> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .context("not a readable PyTorch zip checkpoint")?;
    let pkl_name = zip
        .file_names()
        .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .map(str::to_string)
        .context("zip file has no '<folder>/data.pkl': not a PyTorch checkpoint")?;
    let prefix = &pkl_name[..pkl_name.len() - "data.pkl".len()];
    let mut read_entry = |name: &str| -> Result<Vec<u8>> {
        let mut f = zip
            .by_name(name)
            .with_context(|| format!("checkpoint lacks '{name}'"))?;
        let mut v = Vec::with_capacity(f.size() as usize);
        f.read_to_end(&mut v)
            .with_context(|| format!("reading '{name}' from the zip"))?;
        Ok(v)
    };
    if let Ok(order) = read_entry(&format!("{prefix}byteorder")) {
        if order != b"little" {
            bail!(
                "checkpoint was written on a {} machine; only little-endian is supported",
                String::from_utf8_lossy(&order)
            );
        }
    }
    let pkl = read_entry(&pkl_name)?;
    let (obj, _) = pickle::read(&pkl).context("reading data.pkl")?;
    let entries = state_dict_entries(obj)?;
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    for (_, t) in &entries {
        let key = &t.storage.key;
        if !storages.contains_key(key) {
            storages.insert(key.clone(), read_entry(&format!("{prefix}data/{key}"))?);
        }
    }
    build(entries, &storages)
}

fn load_legacy(bytes: &[u8]) -> Result<StateDict> {
    let mut pos = 0;
    let mut next = |what: &str| -> Result<Value> {
        let (v, n) = pickle::read(&bytes[pos..]).with_context(|| format!("reading the {what}"))?;
        pos += n;
        Ok(v)
    };
    match next("magic number") {
        Ok(Value::Int(LEGACY_MAGIC)) => {}
        _ => bail!("not a PyTorch checkpoint (wrong magic number)"),
    }
    match next("protocol version")? {
        Value::Int(LEGACY_PROTOCOL) => {}
        v => bail!("unsupported legacy PyTorch protocol version {v:?} (expected 1001)"),
    }
    if let Value::Dict(info) = next("system info")? {
        for (k, v) in info {
            if k == Value::Str("little_endian".into()) && v == Value::Bool(false) {
                bail!("checkpoint was written on a big-endian machine; only little-endian is supported");
            }
        }
    }
    let entries = state_dict_entries(next("pickled state dict")?)?;
    let Value::List(keys) = next("storage key list")? else {
        bail!("legacy checkpoint: the storage key list is not a list");
    };
    let dtypes: HashMap<&str, StorageDtype> = entries
        .iter()
        .map(|(_, t)| (t.storage.key.as_str(), t.storage.dtype))
        .collect();
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    for key in keys {
        let key = match key {
            Value::Str(s) => s,
            Value::Int(i) => i.to_string(),
            v => bail!("legacy checkpoint: storage key is {v:?}"),
        };
        let dtype = *dtypes
            .get(key.as_str())
            .with_context(|| format!("legacy checkpoint: storage '{key}' is used by no tensor"))?;
        let head = bytes
            .get(pos..pos + 8)
            .with_context(|| format!("truncated checkpoint: storage '{key}' is missing"))?;
        let numel = u64::from_le_bytes(head.try_into().unwrap()) as usize;
        pos += 8;
        let len = numel
            .checked_mul(dtype.size())
            .context("legacy checkpoint: absurd storage size")?;
        let data = bytes.get(pos..pos.saturating_add(len)).with_context(|| {
            format!(
                "truncated checkpoint: storage '{key}' needs {len} bytes, {} remain",
                bytes.len() - pos
            )
        })?;
        pos += len;
        storages.insert(key, data.to_vec());
    }
    if pos != bytes.len() {
        bail!(
            "legacy checkpoint has {} unexpected trailing bytes",
            bytes.len() - pos
        );
    }
    build(entries, &storages)
}

/// The `(name, tensor)` entries of the top-level dict, or of its `"state_dict"` entry.
fn state_dict_entries(obj: Value) -> Result<Vec<(String, TensorRef)>> {
    let Value::Dict(mut top) = obj else {
        bail!("checkpoint holds no state dict (its top-level object is not a dict)");
    };
    if let Some(i) = top
        .iter()
        .position(|(k, v)| *k == Value::Str("state_dict".into()) && matches!(v, Value::Dict(_)))
    {
        let Value::Dict(inner) = top.swap_remove(i).1 else {
            unreachable!()
        };
        top = inner;
    }
    top.into_iter()
        .map(|(k, v)| {
            let Value::Str(name) = k else {
                bail!("state dict key {k:?} is not a string");
            };
            match v {
                Value::Tensor(t) => Ok((name, t)),
                v => bail!("state dict entry '{name}' is not a tensor ({v:?})"),
            }
        })
        .collect()
}

fn build(
    entries: Vec<(String, TensorRef)>,
    storages: &HashMap<String, Vec<u8>>,
) -> Result<StateDict> {
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, t) in entries {
        let raw = &storages[&t.storage.key];
        let data = gather(&t, raw).with_context(|| format!("tensor '{name}'"))?;
        tensors.push(NamedTensor {
            name,
            shape: t.size,
            data,
        });
    }
    Ok(StateDict { tensors })
}

/// Copies the strided view `t` of the storage bytes `raw` into a contiguous row-major tensor.
fn gather(t: &TensorRef, raw: &[u8]) -> Result<TensorData> {
    let StorageRef {
        dtype,
        numel,
        view_offset,
        ..
    } = t.storage;
    if t.size.len() != t.stride.len() {
        bail!("size {:?} and stride {:?} disagree", t.size, t.stride);
    }
    let have = raw.len() / dtype.size();
    if have < numel {
        bail!(
            "storage '{}' holds {have} elements, {numel} declared",
            t.storage.key
        );
    }
    // Checked arithmetic: sizes come from the file and may be corrupt.
    let count = t
        .size
        .iter()
        .try_fold(1usize, |a, &s| a.checked_mul(s))
        .filter(|&c| c <= 1 << 31)
        .with_context(|| format!("absurd tensor size {:?}", t.size))?;
    let mut idx = Vec::new();
    if count > 0 {
        let base = view_offset.checked_add(t.offset);
        let last = t
            .size
            .iter()
            .zip(&t.stride)
            .fold(base, |a, (s, st)| a?.checked_add((s - 1).checked_mul(*st)?));
        if last.is_none_or(|l| l >= numel) {
            bail!(
                "view (offset {}, size {:?}, stride {:?}) reaches past its storage of {numel} elements",
                t.offset,
                t.size,
                t.stride
            );
        }
        let base = view_offset + t.offset;
        idx.reserve(count);
        let mut row_major = 1;
        let contiguous = t.size.iter().zip(&t.stride).rev().all(|(&s, &st)| {
            let ok = s == 1 || st == row_major;
            row_major *= s;
            ok
        });
        if contiguous {
            idx.extend(base..base + count);
            return convert(dtype, raw, &idx);
        }
        // Odometer over the multi-index, last dimension fastest.
        let mut pos = vec![0usize; t.size.len()];
        for _ in 0..count {
            idx.push(base + pos.iter().zip(&t.stride).map(|(p, s)| p * s).sum::<usize>());
            for d in (0..pos.len()).rev() {
                pos[d] += 1;
                if pos[d] < t.size[d] {
                    break;
                }
                pos[d] = 0;
            }
        }
    }
    convert(dtype, raw, &idx)
}

/// Reads the elements `idx` of a little-endian storage as f32 (float types) or i64.
fn convert(dtype: StorageDtype, raw: &[u8], idx: &[usize]) -> Result<TensorData> {
    let at = |i: usize, n: usize| &raw[i * n..(i + 1) * n];
    Ok(match dtype {
        StorageDtype::F32 => TensorData::F32(
            idx.iter()
                .map(|&i| f32::from_le_bytes(at(i, 4).try_into().unwrap()))
                .collect(),
        ),
        StorageDtype::F64 => TensorData::F32(
            idx.iter()
                .map(|&i| f64::from_le_bytes(at(i, 8).try_into().unwrap()) as f32)
                .collect(),
        ),
        StorageDtype::F16 => TensorData::F32(
            idx.iter()
                .map(|&i| half::f16::from_le_bytes(at(i, 2).try_into().unwrap()).to_f32())
                .collect(),
        ),
        StorageDtype::BF16 => TensorData::F32(
            idx.iter()
                .map(|&i| half::bf16::from_le_bytes(at(i, 2).try_into().unwrap()).to_f32())
                .collect(),
        ),
        StorageDtype::I64 => TensorData::I64(
            idx.iter()
                .map(|&i| i64::from_le_bytes(at(i, 8).try_into().unwrap()))
                .collect(),
        ),
    })
}
