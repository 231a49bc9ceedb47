//! The prepped store: a folder holding
//! - `images.bin`: a 64-byte header, then uint8 pixels `[N, size, size]`, memory-mapped;
//! - `index.json`: per study and per image records;
//! - `manifest.json`: counts, loss weights and what was skipped.
//!
//! Header (little endian): magic `MURASTOR`, u32 format version, u32 dtype (1 = u8),
//! u64 N, u32 height, u32 width, u32 crc32 of the pixels, zero padding to 64 bytes.
//! `index.json` and `manifest.json` repeat the checksum, so files from different preps
//! (a stale store) are refused, as are truncated and foreign files.

use super::mura::Skipped;
use super::{Split, StudyType};
use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"MURASTOR";
pub const FORMAT_VERSION: u32 = 1;
pub const HEADER_LEN: usize = 64;
const DTYPE_U8: u32 = 1;
pub const IMAGES_FILE: &str = "images.bin";
pub const INDEX_FILE: &str = "index.json";
pub const MANIFEST_FILE: &str = "manifest.json";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StudyRecord {
    pub split: Split,
    pub study_type: StudyType,
    pub patient: String,
    /// 1 = abnormal, 0 = normal, None = unlabeled
    pub label: Option<u8>,
    /// As in the CSVs, ending with '/'.
    pub path: String,
    /// Index of the study's first image; its views are `first_image..first_image + n_views`.
    pub first_image: usize,
    pub n_views: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub path: String,
    /// Original size of the PNG.
    pub width: u32,
    pub height: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Index {
    pub format_version: u32,
    pub checksum: String,
    pub size: usize,
    pub studies: Vec<StudyRecord>,
    pub images: Vec<ImageRecord>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TypeCounts {
    pub studies: usize,
    pub images: usize,
    pub abnormal_studies: usize,
    pub abnormal_images: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitCounts {
    pub studies: usize,
    pub images: usize,
    pub by_type: BTreeMap<String, TypeCounts>,
}

/// The paper's per-type loss weights: w1 weighs abnormal (label 1) images, w0 normal ones.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Weights {
    pub w0: f64,
    pub w1: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// crc32 of the pixels, hex; the same as in the header and the index.
    pub checksum: String,
    pub size: usize,
    pub images: usize,
    pub studies: usize,
    pub source: String,
    pub study_types: Vec<StudyType>,
    pub splits: BTreeMap<String, SplitCounts>,
    /// Per study type, from the training split's image counts:
    /// w1 = N/(A+N), w0 = A/(A+N) (A, N = abnormal, normal images).
    pub weights: BTreeMap<String, Weights>,
    pub skipped: Vec<Skipped>,
    pub notes: Vec<String>,
}

impl Manifest {
    /// Counts per split and type, and the loss weights, from the index.
    pub fn counts(
        studies: &[StudyRecord],
    ) -> (BTreeMap<String, SplitCounts>, BTreeMap<String, Weights>) {
        let mut splits: BTreeMap<String, SplitCounts> = BTreeMap::new();
        for s in studies {
            let sc = splits.entry(s.split.name().to_string()).or_default();
            sc.studies += 1;
            sc.images += s.n_views;
            let tc = sc
                .by_type
                .entry(s.study_type.name().to_string())
                .or_default();
            tc.studies += 1;
            tc.images += s.n_views;
            if s.label == Some(1) {
                tc.abnormal_studies += 1;
                tc.abnormal_images += s.n_views;
            }
        }
        let mut weights = BTreeMap::new();
        if let Some(train) = splits.get("train") {
            for (t, c) in &train.by_type {
                let a = c.abnormal_images as f64;
                let n = (c.images - c.abnormal_images) as f64;
                if a + n > 0.0 {
                    weights.insert(
                        t.clone(),
                        Weights {
                            w0: a / (a + n),
                            w1: n / (a + n),
                        },
                    );
                }
            }
        }
        (splits, weights)
    }
}

/// An opened, verified store. Pixels stay memory-mapped; `image(i)` borrows them.
pub struct Store {
    pub dir: PathBuf,
    /// Side of every stored image.
    pub size: usize,
    pub studies: Vec<StudyRecord>,
    pub images: Vec<ImageRecord>,
    pub manifest: Manifest,
    checksum: u32,
    mmap: Mmap,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Store({}, {} images of {}², {})",
            self.dir.display(),
            self.images.len(),
            self.size,
            self.id()
        )
    }
}

/// The 64-byte header for `n` images of `size`² with pixel checksum `crc`.
pub fn header_bytes(n: usize, size: usize, crc: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&DTYPE_U8.to_le_bytes());
    h[16..24].copy_from_slice(&(n as u64).to_le_bytes());
    h[24..28].copy_from_slice(&(size as u32).to_le_bytes());
    h[28..32].copy_from_slice(&(size as u32).to_le_bytes());
    h[32..36].copy_from_slice(&crc.to_le_bytes());
    h
}

/// crc32 of `data`, computed in parallel chunks and combined.
pub fn checksum(data: &[u8]) -> u32 {
    data.par_chunks(1 << 22)
        .map(|c| {
            let mut h = crc32fast::Hasher::new();
            h.update(c);
            h
        })
        .reduce(crc32fast::Hasher::new, |mut a, b| {
            a.combine(&b);
            a
        })
        .finalize()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

impl Store {
    /// Opens and verifies a store: header, format version, shape, checksum, and that the index
    /// and manifest belong to these pixels.
    pub fn open(dir: &Path) -> Result<Store> {
        let again = "re-run 'mura prep' to rebuild it";
        if !dir.is_dir() {
            bail!(
                "no store at {} (run 'mura prep' to make one)",
                dir.display()
            );
        }
        let bin = dir.join(IMAGES_FILE);
        let file = std::fs::File::open(&bin).with_context(|| {
            format!(
                "{} is not a mura store: cannot open {IMAGES_FILE}",
                dir.display()
            )
        })?;
        // SAFETY: the file is opened read-only; mura never writes a store in place (prep writes
        // a new folder and renames it), so the mapping is not changed under us by mura.
        let mmap =
            unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", bin.display()))?;
        let len = mmap.len();
        if len < HEADER_LEN || &mmap[0..8] != MAGIC {
            if len < HEADER_LEN || mmap[0..8].iter().all(|&b| b == 0) {
                bail!(
                    "{} is truncated or unfinished (no header): {again}",
                    bin.display()
                );
            }
            bail!("{} is not a mura store file (bad magic)", bin.display());
        }
        let h = &mmap[..HEADER_LEN];
        let version = u32_at(h, 8);
        if version != FORMAT_VERSION {
            bail!("{} has store format version {version}, this mura reads version {FORMAT_VERSION}: {again}", bin.display());
        }
        if u32_at(h, 12) != DTYPE_U8 {
            bail!(
                "{} has unsupported dtype code {}",
                bin.display(),
                u32_at(h, 12)
            );
        }
        let n = u64::from_le_bytes(h[16..24].try_into().expect("8 bytes")) as usize;
        let (hh, ww) = (u32_at(h, 24) as usize, u32_at(h, 28) as usize);
        if hh != ww || hh == 0 {
            bail!("{} has an unsupported image shape {hh}x{ww}", bin.display());
        }
        let want = n
            .checked_mul(hh * ww)
            .and_then(|p| p.checked_add(HEADER_LEN))
            .ok_or_else(|| anyhow::anyhow!("{} has a corrupt header", bin.display()))?;
        if len != want {
            bail!(
                "{} is truncated or damaged: {len} bytes, its header says {want}: {again}",
                bin.display()
            );
        }
        let crc = u32_at(h, 32);
        let actual = checksum(&mmap[HEADER_LEN..]);
        if actual != crc {
            bail!(
                "{} is damaged: checksum {actual:08x}, header says {crc:08x}: {again}",
                bin.display()
            );
        }
        let hex = format!("{crc:08x}");
        let index: Index = read_json(&dir.join(INDEX_FILE))?;
        let manifest: Manifest = read_json(&dir.join(MANIFEST_FILE))?;
        if index.checksum != hex || manifest.checksum != hex {
            bail!("stale store at {}: {INDEX_FILE} or {MANIFEST_FILE} is from another prep than {IMAGES_FILE}: {again}", dir.display());
        }
        if index.size != hh || index.images.len() != n {
            bail!(
                "stale store at {}: {INDEX_FILE} does not match {IMAGES_FILE}'s shape: {again}",
                dir.display()
            );
        }
        if let Some(s) = index
            .studies
            .iter()
            .find(|s| s.n_views == 0 || s.first_image + s.n_views > n)
        {
            bail!(
                "damaged {INDEX_FILE} in {}: study {} points outside the images",
                dir.display(),
                s.path
            );
        }
        Ok(Store {
            dir: dir.to_path_buf(),
            size: hh,
            studies: index.studies,
            images: index.images,
            manifest,
            checksum: crc,
            mmap,
        })
    }

    /// Pixels of image `i`: [size, size] u8, borrowed from the mapping (no copy).
    pub fn image(&self, i: usize) -> &[u8] {
        let px = self.size * self.size;
        &self.mmap[HEADER_LEN + i * px..HEADER_LEN + (i + 1) * px]
    }

    /// (w0, w1) for a study type (see [`Manifest::weights`]); (0.5, 0.5) for a type with no
    /// training images.
    pub fn loss_weights(&self, t: StudyType) -> (f32, f32) {
        self.manifest
            .weights
            .get(t.name())
            .map_or((0.5, 0.5), |w| (w.w0 as f32, w.w1 as f32))
    }

    /// A short identity for checkpoints to record: pixel checksum, image count and size.
    pub fn id(&self) -> String {
        format!("{:08x}-{}x{}", self.checksum, self.images.len(), self.size)
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("incomplete store: cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("damaged store file {}", path.display()))
}
