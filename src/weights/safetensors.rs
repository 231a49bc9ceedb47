//! safetensors checkpoints: mura's own weight format. Names and layouts are torchvision's,
//! so a checkpoint written here loads into `torchvision.models.DenseNet` (via
//! `safetensors.torch.load_file`) and back. Tensors are F32, except `num_batches_tracked`
//! (I64, shape `[]`). Free-form string metadata (architecture, training spec as JSON) rides
//! in the header's `__metadata__`.

use super::torchvision::length_problem;
use super::{Error, NamedTensor, Problem, StateDict, TensorData};
use anyhow::{bail, Context, Result};
use safetensors::tensor::Metadata;
use safetensors::{Dtype, View};
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

/// One tensor's bytes; its shape is checked to hold its values (see [`to_safetensors_bytes`]).
fn to_bytes(t: &NamedTensor) -> Bytes {
    let (dtype, data) = match &t.data {
        TensorData::F32(v) => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        TensorData::I64(v) => (Dtype::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
    };
    Bytes {
        dtype,
        shape: t.shape.clone(),
        data,
    }
}

/// Serialises a state dict (and optional metadata) to safetensors bytes. A name given twice or
/// a tensor holding another number of values than its shape is refused ([`Error::Refused`]).
pub fn to_safetensors_bytes(sd: &StateDict, metadata: &HashMap<String, String>) -> Result<Vec<u8>> {
    let mut seen = std::collections::HashSet::new();
    let mut problems = Vec::new();
    for t in &sd.tensors {
        if !seen.insert(t.name.as_str()) {
            problems.push(Problem::DuplicateKey {
                key: t.name.clone(),
            });
        }
        problems.extend(length_problem(t));
    }
    Error::refuse(problems, "weights cannot be saved")?;
    let tensors: Vec<(&str, Bytes)> = sd
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), to_bytes(t)))
        .collect();
    let meta = (!metadata.is_empty()).then(|| metadata.clone());
    safetensors::serialize(tensors.iter().map(|(n, b)| (*n, b)), meta)
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

/// The largest header read (safetensors' own limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Where a safetensors file's bytes are read from: an open file, piece by piece, or bytes in
/// memory (what the fuzz target hands over).
enum Source<'a> {
    File(&'a std::fs::File),
    Bytes(&'a [u8]),
}

impl Source<'_> {
    /// The `len` bytes at offset `at` (the caller has checked that the file holds them).
    fn read(&self, at: u64, len: usize) -> std::io::Result<Vec<u8>> {
        match self {
            Source::File(f) => {
                let mut b = vec![0; len];
                std::os::unix::fs::FileExt::read_exact_at(*f, &mut b, at)?;
                Ok(b)
            }
            Source::Bytes(b) => usize::try_from(at)
                .ok()
                .and_then(|at| b.get(at..at.checked_add(len)?))
                .map(<[u8]>::to_vec)
                .ok_or_else(|| std::io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

/// A tensor as a safetensors header describes it, before its data is read: what the layout
/// check (`weights::check_heads`) needs.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorHead {
    pub name: String,
    pub shape: Vec<usize>,
    /// `f32` or `i64` (mura's dtypes, as `TensorData::dtype_name` says them), else safetensors'
    /// own name (`F16`, `BF16`, …).
    pub dtype: String,
}

/// A safetensors file's header, read and checked before any tensor's data: it parses, its
/// tensors tile the data exactly, and the data is as long as the file holds after the header.
struct Header {
    meta: Metadata,
    /// Where the data begins: after the 8-byte length and the header.
    start: u64,
}

fn invalid(e: impl std::fmt::Display) -> Error {
    Error::NotSafetensors(e.to_string())
}

impl Header {
    /// The header of the `len` bytes of `src`.
    fn read(src: &Source, len: u64) -> Result<Header> {
        if len < 8 {
            bail!(invalid("shorter than its 8-byte header length"));
        }
        let n = u64::from_le_bytes(src.read(0, 8)?.try_into().expect("8 bytes"));
        if n > MAX_HEADER_BYTES.min(len - 8) {
            bail!(invalid(format!(
                "a header of {n} bytes in a file of {len} (at most {MAX_HEADER_BYTES})"
            )));
        }
        let bytes = src.read(8, usize::try_from(n)?)?;
        let meta: Metadata = serde_json::from_slice(&bytes).map_err(invalid)?;
        let start = 8 + n;
        let data = u64::try_from(meta.data_len())?;
        if start.checked_add(data) != Some(len) {
            bail!(invalid(format!(
                "its header describes {data} bytes of tensors, the file holds {} after it",
                len - start
            )));
        }
        Ok(Header { meta, start })
    }

    fn metadata(&self) -> HashMap<String, String> {
        self.meta.metadata().clone().unwrap_or_default()
    }

    /// The tensors' names, shapes and dtypes, in file order.
    fn heads(&self) -> Vec<TensorHead> {
        self.meta
            .offset_keys()
            .into_iter()
            .map(|name| {
                let info = self.meta.info(&name).expect("a name of this header");
                let dtype = match info.dtype {
                    Dtype::F32 => "f32".to_string(),
                    Dtype::I64 => "i64".to_string(),
                    other => format!("{other:?}"),
                };
                TensorHead {
                    shape: info.shape.clone(),
                    name,
                    dtype,
                }
            })
            .collect()
    }

    /// The tensors, read and converted one by one (never the whole file at once). F32 and I64
    /// only; another dtype is an error naming the tensor.
    fn state_dict(&self, src: &Source) -> Result<StateDict> {
        let mut tensors = Vec::new();
        for name in self.meta.offset_keys() {
            let info = self.meta.info(&name).expect("a name of this header");
            let (from, to) = info.data_offsets;
            let raw = src.read(self.start + u64::try_from(from)?, to - from)?;
            let data = match info.dtype {
                Dtype::F32 => TensorData::F32(
                    raw.chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                        .collect(),
                ),
                Dtype::I64 => TensorData::I64(
                    raw.chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                        .collect(),
                ),
                other => bail!(Error::UnsupportedDtype {
                    key: name,
                    dtype: format!("{other:?}"),
                }),
            };
            tensors.push(NamedTensor {
                shape: info.shape.clone(),
                name,
                data,
            });
        }
        Ok(StateDict { tensors })
    }
}

/// Parses safetensors bytes into a checkpoint. F32 and I64 only; other dtypes are an error
/// naming the tensor.
pub fn from_safetensors_bytes(bytes: &[u8]) -> Result<Checkpoint> {
    let src = Source::Bytes(bytes);
    let header = Header::read(&src, u64::try_from(bytes.len())?)?;
    Ok(Checkpoint {
        state_dict: header.state_dict(&src)?,
        metadata: header.metadata(),
    })
}

/// The largest safetensors file read (DenseNet-161's optimiser state is 230 MB).
pub const MAX_SAFETENSORS_BYTES: u64 = 2 << 30;

/// An open safetensors file whose header is read and checked: its metadata and its tensors'
/// names, shapes and dtypes can be checked before their data is read ([`Self::state_dict`]).
pub struct SafetensorsFile {
    path: std::path::PathBuf,
    file: std::fs::File,
    header: Header,
}

impl SafetensorsFile {
    /// Opens `path` (a regular file of at most `cap` bytes) and reads its header.
    pub fn open(path: &Path, cap: u64) -> Result<SafetensorsFile> {
        let (file, len) = crate::disk::open_regular(path)?;
        if len > cap {
            bail!(
                "{} is larger than the {} this file may have; refusing to read it",
                path.display(),
                crate::disk::show_size(cap)
            );
        }
        let header = Header::read(&Source::File(&file), len)
            .with_context(|| format!("loading {}", path.display()))?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            file,
            header,
        })
    }

    /// The header's string metadata.
    pub fn metadata(&self) -> HashMap<String, String> {
        self.header.metadata()
    }

    /// The tensors' names, shapes and dtypes, in file order.
    pub fn heads(&self) -> Vec<TensorHead> {
        self.header.heads()
    }

    /// The tensors, read tensor by tensor.
    pub fn state_dict(&self) -> Result<StateDict> {
        self.header
            .state_dict(&Source::File(&self.file))
            .with_context(|| format!("loading {}", self.path.display()))
    }
}

/// Loads a safetensors checkpoint.
pub fn load_safetensors(path: &Path) -> Result<Checkpoint> {
    load_safetensors_capped(path, MAX_SAFETENSORS_BYTES)
}

/// Loads a safetensors file that may hold at most `cap` bytes.
pub fn load_safetensors_capped(path: &Path, cap: u64) -> Result<Checkpoint> {
    let file = SafetensorsFile::open(path, cap)?;
    Ok(Checkpoint {
        state_dict: file.state_dict()?,
        metadata: file.metadata(),
    })
}
