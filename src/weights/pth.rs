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
use crate::disk::read_regular;
use anyhow::{bail, Context, Result};
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::Path;

const LEGACY_MAGIC: i128 = 0x1950a86a20f9469cfc6c;
const LEGACY_PROTOCOL: i128 = 1001;

/// The most storage bytes a `.pth` may hold (torchvision's largest DenseNet holds 115 MB);
/// compressed zip entries are refused by their declared sizes and never inflate beyond them.
pub const MAX_STORAGE_BYTES: u64 = 512 << 20;
/// The most a `data.pkl` may hold (a DenseNet's is about 60 KB).
pub const MAX_PICKLE_BYTES: u64 = 64 << 20;
/// The largest `.pth` file read.
pub const MAX_FILE_BYTES: u64 = MAX_STORAGE_BYTES + MAX_PICKLE_BYTES;
/// The most elements the tensors of a `.pth` may hold together (512 MiB as f32; DenseNet-161
/// has 29 M), however many of them view the same storage.
pub const MAX_ELEMENTS: usize = 1 << 27;

/// Reads a `.pth` file (either format) into a state dict, in the file's order. A state dict
/// nested under a `"state_dict"` key is found too.
pub fn load_pth(path: &Path) -> Result<StateDict> {
    let bytes = read_regular(path, MAX_FILE_BYTES)?;
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

/// A `.pth` zip archive and its length.
struct Archive<'a> {
    zip: zip::ZipArchive<std::io::Cursor<&'a [u8]>>,
    len: u64,
}

/// The zip member `name`, refused if it declares or inflates to more than `cap` bytes.
fn read_entry(archive: &mut Archive, name: &str, cap: u64) -> Result<Vec<u8>> {
    let f = archive
        .zip
        .by_name(name)
        .with_context(|| format!("checkpoint lacks '{name}'"))?;
    let too_big = || format!("'{name}' in the zip holds more than the {cap} bytes expected");
    if f.size() > cap {
        bail!(too_big());
    }
    // Room for what a stored member can hold; a compressed one grows as it inflates.
    let mut v = Vec::with_capacity(usize::try_from(f.size().min(archive.len))?);
    f.take(cap + 1)
        .read_to_end(&mut v)
        .with_context(|| format!("reading '{name}' from the zip"))?;
    if v.len() as u64 > cap {
        bail!(too_big());
    }
    Ok(v)
}

fn load_zip(bytes: &[u8]) -> Result<StateDict> {
    let zip = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .context("not a readable PyTorch zip checkpoint")?;
    let mut archive = Archive {
        zip,
        len: bytes.len() as u64,
    };
    let pkl_name = archive
        .zip
        .file_names()
        .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .map(str::to_string)
        .context("zip file has no '<folder>/data.pkl': not a PyTorch checkpoint")?;
    let prefix = &pkl_name[..pkl_name.len() - "data.pkl".len()];
    let order_name = format!("{prefix}byteorder");
    if archive.zip.index_for_name(&order_name).is_some() {
        let order = read_entry(&mut archive, &order_name, 16)?;
        if order != b"little" {
            bail!(
                "checkpoint was written on a {} machine; only little-endian is supported",
                String::from_utf8_lossy(&order)
            );
        }
    }
    let pkl = read_entry(&mut archive, &pkl_name, MAX_PICKLE_BYTES)?;
    let (obj, _) = pickle::read(&pkl).context("reading data.pkl")?;
    let entries = state_dict_entries(obj)?;
    // Each storage's size, as its first tensor declares it; all of them checked before any is read.
    let mut sizes: Vec<(&str, u64)> = Vec::new();
    for (_, t) in &entries {
        let key = &*t.storage.key;
        if sizes.iter().all(|(k, _)| *k != key) {
            let n = (t.storage.numel as u64)
                .checked_mul(t.storage.dtype.size() as u64)
                .context("absurd storage size")?;
            sizes.push((key, n));
        }
    }
    let total = sizes.iter().fold(0u64, |a, (_, n)| a.saturating_add(*n));
    if total > MAX_STORAGE_BYTES {
        bail!(
            "checkpoint declares {total} bytes of tensor data, more than the {MAX_STORAGE_BYTES} mura imports"
        );
    }
    let mut storages: HashMap<&str, Vec<u8>> = HashMap::new();
    for (key, n) in sizes {
        let data = read_entry(&mut archive, &format!("{prefix}data/{key}"), n)?;
        storages.insert(key, data);
    }
    build(&entries, &storages)
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
        v => bail!(
            "unsupported legacy PyTorch protocol version {} (expected 1001)",
            v.describe()
        ),
    }
    if let Value::Dict(info) = next("system info")? {
        for (k, v) in &info.items {
            if k.is_str("little_endian") && *v == Value::Bool(false) {
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
        .map(|(_, t)| (&*t.storage.key, t.storage.dtype))
        .collect();
    let mut storages: HashMap<String, &[u8]> = HashMap::new();
    for key in &keys.items {
        let key = match key {
            Value::Str(s) => s.to_string(),
            Value::Int(i) => i.to_string(),
            v => bail!("legacy checkpoint: storage key is {}", v.describe()),
        };
        let dtype = *dtypes
            .get(key.as_str())
            .with_context(|| format!("legacy checkpoint: storage '{key}' is used by no tensor"))?;
        let head = bytes
            .get(pos..pos + 8)
            .with_context(|| format!("truncated checkpoint: storage '{key}' is missing"))?;
        let numel = u64::from_le_bytes(head.try_into().expect("8 bytes"));
        pos += 8;
        let len = usize::try_from(numel)
            .ok()
            .and_then(|n| n.checked_mul(dtype.size()))
            .context("legacy checkpoint: absurd storage size")?;
        let data = bytes.get(pos..pos.saturating_add(len)).with_context(|| {
            format!(
                "truncated checkpoint: storage '{key}' needs {len} bytes, {} remain",
                bytes.len() - pos
            )
        })?;
        pos += len;
        storages.insert(key, data);
    }
    if pos != bytes.len() {
        bail!(
            "legacy checkpoint has {} unexpected trailing bytes",
            bytes.len() - pos
        );
    }
    build(&entries, &storages)
}

/// The `(name, tensor)` entries of the top-level dict, or of its `"state_dict"` entry.
fn state_dict_entries(obj: Value) -> Result<Vec<(String, TensorRef)>> {
    let Value::Dict(mut top) = obj else {
        bail!("checkpoint holds no state dict (its top-level object is not a dict)");
    };
    let inner = top.items.iter().find_map(|(k, v)| match v {
        Value::Dict(d) if k.is_str("state_dict") => Some(d.clone()),
        _ => None,
    });
    if let Some(inner) = inner {
        top = inner;
    }
    let mut names = HashSet::new();
    top.items
        .iter()
        .map(|(k, v)| {
            let Value::Str(name) = k else {
                bail!("state dict key {} is not a string", k.describe());
            };
            if !names.insert(name.clone()) {
                bail!("state dict has the key '{name}' twice");
            }
            match v {
                Value::Tensor(t) => Ok((name.to_string(), (**t).clone())),
                v => bail!(
                    "state dict entry '{name}' is not a tensor ({})",
                    v.describe()
                ),
            }
        })
        .collect()
}

fn build<S: AsRef<[u8]>, K: std::borrow::Borrow<str> + std::hash::Hash + Eq>(
    entries: &[(String, TensorRef)],
    storages: &HashMap<K, S>,
) -> Result<StateDict> {
    let mut total = 0usize;
    for (name, t) in entries {
        total = total.saturating_add(checked_numel(t).with_context(|| format!("tensor '{name}'"))?);
    }
    if total > MAX_ELEMENTS {
        bail!("the checkpoint's tensors hold {total} elements, more than the {MAX_ELEMENTS} mura imports");
    }
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, t) in entries {
        let raw = storages.get(&*t.storage.key).with_context(|| {
            format!(
                "tensor '{name}': its storage '{}' is missing",
                t.storage.key
            )
        })?;
        let data = gather(t, raw.as_ref()).with_context(|| format!("tensor '{name}'"))?;
        tensors.push(NamedTensor {
            name: name.clone(),
            shape: t.size.clone(),
            data,
        });
    }
    Ok(StateDict { tensors })
}

/// The tensor's element count, refused if it exceeds its storage's: a view repeating elements
/// (stride 0) is not a weight, and would let a few bytes declare gigabytes.
fn checked_numel(t: &TensorRef) -> Result<usize> {
    let count = t
        .size
        .iter()
        .try_fold(1usize, |a, &s| a.checked_mul(s))
        .with_context(|| format!("absurd tensor size {:?}", t.size))?;
    if count > t.storage.numel {
        bail!(
            "size {:?} has {count} elements but its storage holds {}",
            t.size,
            t.storage.numel
        );
    }
    Ok(count)
}

/// Element offsets of a strided view, in row-major order (last dimension fastest).
struct Offsets<'a> {
    size: &'a [usize],
    stride: &'a [usize],
    pos: Vec<usize>,
    next: usize,
    left: usize,
}

impl Iterator for Offsets<'_> {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        self.left = self.left.checked_sub(1)?;
        let here = self.next;
        // Odometer step; wrapping because a dimension's last step may overshoot usize before
        // it is taken back (the offsets returned were all checked to lie in the storage).
        for d in (0..self.pos.len()).rev() {
            self.pos[d] += 1;
            self.next = self.next.wrapping_add(self.stride[d]);
            if self.pos[d] < self.size[d] {
                break;
            }
            self.next = self
                .next
                .wrapping_sub(self.stride[d].wrapping_mul(self.size[d]));
            self.pos[d] = 0;
        }
        Some(here)
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
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
    let count = checked_numel(t)?;
    let base = view_offset.checked_add(t.offset);
    if count > 0 {
        // Checked arithmetic: offsets and strides come from the file and may be corrupt.
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
    }
    let offsets = Offsets {
        size: &t.size,
        stride: &t.stride,
        pos: vec![0; t.size.len()],
        next: base.unwrap_or(0),
        left: count,
    };
    Ok(convert(dtype, raw, offsets))
}

/// Element `i` of a little-endian storage of `N`-byte elements.
fn elem<const N: usize>(raw: &[u8], i: usize) -> [u8; N] {
    raw[i * N..(i + 1) * N].try_into().expect("N bytes")
}

/// Reads the elements at `offsets` as f32 (float types) or i64.
fn convert(dtype: StorageDtype, raw: &[u8], offsets: Offsets) -> TensorData {
    match dtype {
        StorageDtype::F32 => {
            TensorData::F32(offsets.map(|i| f32::from_le_bytes(elem(raw, i))).collect())
        }
        StorageDtype::F64 => TensorData::F32(
            offsets
                .map(|i| f64::from_le_bytes(elem(raw, i)) as f32)
                .collect(),
        ),
        StorageDtype::F16 => TensorData::F32(
            offsets
                .map(|i| half::f16::from_le_bytes(elem(raw, i)).to_f32())
                .collect(),
        ),
        StorageDtype::BF16 => TensorData::F32(
            offsets
                .map(|i| half::bf16::from_le_bytes(elem(raw, i)).to_f32())
                .collect(),
        ),
        StorageDtype::I64 => {
            TensorData::I64(offsets.map(|i| i64::from_le_bytes(elem(raw, i))).collect())
        }
    }
}
