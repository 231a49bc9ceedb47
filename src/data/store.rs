//! The prepped store: a folder `STORE/` whose file `CURRENT` names the generation in use,
//! `STORE/gen-<N>/`, which holds
//! - `images.bin`: a 64-byte header, then uint8 pixels `[N, size, size]`, memory-mapped;
//! - `index.json`: per study and per image records;
//! - `manifest.json`: counts, loss weights and what was skipped.
//!
//! `prep` writes a new generation beside the one in use and switches `CURRENT` to it by one
//! rename, so a store is replaced in one atomic step (see `data::prep`). A store written before
//! generations (the three files directly in `STORE/`) still opens.
//!
//! Header (little endian): magic `MURASTOR`, u32 format version, u32 dtype (1 = u8),
//! u64 N, u32 height, u32 width, u32 crc32 of the pixels, zero padding to 64 bytes.
//! `index.json` and `manifest.json` repeat the checksum, so files from different preps
//! (a stale store) are refused, as are truncated and foreign files. The index is checked
//! against the images (its studies tile them in order, labels are 0, 1 or none) and the
//! manifest against the index (counts, loss weights), since the checksum does not cover them.

use super::mura::Skipped;
use super::{Split, StudyType};
use crate::disk::mapped::Mapped;
use crate::disk::{open_regular, read_regular_string, MAX_TEXT_BYTES};
use anyhow::{bail, Result};
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
/// The file naming the generation in use.
pub const CURRENT_FILE: &str = "CURRENT";
/// Generation folders are `gen-<N>`.
pub const GEN_PREFIX: &str = "gen-";

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

/// What a store's damage is rebuilt with.
const AGAIN: &str = "re-run 'mura prep' to rebuild it";

/// Why a store does not open: typed, so that a caller (or a test) can tell a missing store from
/// a damaged one from one that cannot be read. The train, eval and CLI layers carry it inside
/// `anyhow::Error`; [`Error::find`] recovers it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No folder where the store was named.
    #[error("no store at {} (run 'mura prep' to make one)", dir.display())]
    NoStore { dir: PathBuf },
    /// A store whose file or folder `path` is not what a finished prep writes.
    #[error("{}: {damage}: {AGAIN}", path.display())]
    Damaged { path: PathBuf, damage: Damage },
    /// A store file that cannot be read: missing, not a regular file, too large, an I/O error
    /// (the cause says which).
    #[error("unreadable store")]
    Unreadable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// How a store is damaged: what [`Error::Damaged`] found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Damage {
    /// A store folder without `CURRENT` or a store written before generations.
    #[error("holds no finished store (no {CURRENT_FILE}; an interrupted prep?)")]
    Unfinished,
    /// `CURRENT` names no generation (`None`), or one that is missing.
    #[error("{}", match .0 {
        None => "does not name a generation".to_string(),
        Some(name) => format!("names {name}, which is missing"),
    })]
    Generation(Option<String>),
    /// An images file shorter than its header, or with a header of zeros (not yet written).
    #[error("truncated or unfinished (no header)")]
    NoHeader,
    /// An images file of another program (bad magic).
    #[error("not a mura store file (bad magic)")]
    Foreign,
    #[error("store format version {0}, this mura reads version {FORMAT_VERSION}")]
    Version(u32),
    #[error("unsupported dtype code {0}")]
    Dtype(u32),
    /// An image count that overflows the address space, or images of a side not square or out
    /// of mura's bounds (the header's height and width).
    #[error("a corrupt header: {0} images of {1}x{2}")]
    Header(u64, u32, u32),
    #[error("holds no images")]
    Empty,
    /// An images file of `len` bytes whose header says `want`.
    #[error("truncated or damaged: {len} bytes, its header says {want}")]
    Length { len: usize, want: usize },
    /// Pixels whose crc32 is not the header's.
    #[error("damaged: checksum {actual:08x}, header says {header:08x}")]
    Checksum { actual: u32, header: u32 },
    /// An index or manifest of another prep than the pixels (their checksum or shape).
    #[error("stale store: {0}")]
    Stale(String),
    /// An index or manifest that does not parse, or disagrees with the pixels or each other.
    #[error("damaged store: {0}")]
    Index(String),
}

impl Error {
    /// The outermost store error in `e`'s chain of causes, if any.
    pub fn find(e: &anyhow::Error) -> Option<&Error> {
        e.chain().find_map(|cause| cause.downcast_ref::<Error>())
    }

    /// The damage of a [`Error::Damaged`]; None for another error.
    pub fn damage(&self) -> Option<&Damage> {
        match self {
            Error::Damaged { damage, .. } => Some(damage),
            _ => None,
        }
    }

    fn damaged(path: &Path, damage: Damage) -> Error {
        Error::Damaged {
            path: path.to_path_buf(),
            damage,
        }
    }

    fn unreadable(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
        Error::Unreadable(e.into())
    }
}

/// An opened, verified store. Pixels stay memory-mapped; `image(i)` borrows them.
pub struct Store {
    /// The store folder, as given.
    pub dir: PathBuf,
    /// The folder holding its files (the generation in use).
    pub files: PathBuf,
    /// Side of every stored image.
    pub size: usize,
    pub studies: Vec<StudyRecord>,
    pub images: Vec<ImageRecord>,
    pub manifest: Manifest,
    checksum: u32,
    /// crc32 of the index as read (re-serialised, so that its layout does not count).
    index_checksum: u32,
    mmap: Mapped,
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

/// The generation `CURRENT` names, or None for a name that is not `gen-<N>`.
pub fn generation(name: &str) -> Option<u64> {
    let n = name.strip_prefix(GEN_PREFIX)?;
    // Only the canonical spelling (`gen-7`, not `gen-007` or `gen-+7`) is a generation.
    n.parse().ok().filter(|g: &u64| g.to_string() == n)
}

/// The folder holding a store's files: `dir/gen-<N>` as `dir/CURRENT` names it, or `dir`
/// itself for a store written before generations.
pub fn files_dir(dir: &Path) -> Result<PathBuf, Error> {
    if !dir.is_dir() {
        return Err(Error::NoStore {
            dir: dir.to_path_buf(),
        });
    }
    let current = dir.join(CURRENT_FILE);
    if current.symlink_metadata().is_ok() {
        let text = read_regular_string(&current, 256).map_err(Error::unreadable)?;
        let name = text.trim_end_matches('\n');
        if generation(name).is_none() {
            return Err(Error::damaged(&current, Damage::Generation(None)));
        }
        let files = dir.join(name);
        if !files.is_dir() {
            let damage = Damage::Generation(Some(name.to_string()));
            return Err(Error::damaged(&current, damage));
        }
        return Ok(files);
    }
    if dir.join(IMAGES_FILE).symlink_metadata().is_ok() {
        return Ok(dir.to_path_buf());
    }
    Err(Error::damaged(dir, Damage::Unfinished))
}

/// What an images file's header says, checked against the file.
struct Header {
    n: usize,
    side: usize,
    crc: u32,
}

/// Checks the images file `bin` (mapped as `bytes`): magic, version, dtype, shape, that its
/// length is what the header says, and the pixels' checksum.
fn check_header(bin: &Path, bytes: &[u8]) -> Result<Header, Error> {
    header(bytes).map_err(|damage| Error::damaged(bin, damage))
}

/// [`check_header`] of the bytes of an images file.
fn header(bytes: &[u8]) -> Result<Header, Damage> {
    let len = bytes.len();
    if len < HEADER_LEN || bytes[0..8].iter().all(|&b| b == 0) {
        return Err(Damage::NoHeader);
    }
    if &bytes[0..8] != MAGIC {
        return Err(Damage::Foreign);
    }
    let h = &bytes[..HEADER_LEN];
    let version = u32_at(h, 8);
    if version != FORMAT_VERSION {
        return Err(Damage::Version(version));
    }
    if u32_at(h, 12) != DTYPE_U8 {
        return Err(Damage::Dtype(u32_at(h, 12)));
    }
    let count = u64::from_le_bytes(h[16..24].try_into().expect("8 bytes"));
    let (hh, ww) = (u32_at(h, 24), u32_at(h, 28));
    let corrupt = Damage::Header(count, hh, ww);
    let side = hh as usize;
    if hh != ww || crate::bounds::SIDE.check("side", side).is_err() {
        return Err(corrupt);
    }
    let n = usize::try_from(count).map_err(|_| corrupt.clone())?;
    if n == 0 {
        return Err(Damage::Empty);
    }
    let want = n
        .checked_mul(side * side)
        .and_then(|p| p.checked_add(HEADER_LEN))
        .ok_or(corrupt)?;
    if len != want {
        return Err(Damage::Length { len, want });
    }
    let crc = u32_at(h, 32);
    let actual = checksum(&bytes[HEADER_LEN..]);
    if actual != crc {
        return Err(Damage::Checksum {
            actual,
            header: crc,
        });
    }
    Ok(Header { n, side, crc })
}

impl Store {
    /// Opens and verifies a store: header, format version, shape, checksum, that the index
    /// and manifest belong to these pixels, and that they agree with them and each other.
    pub fn open(dir: &Path) -> Result<Store, Error> {
        Store::open_generation(dir, files_dir(dir)?)
    }

    /// [`Store::open`] of the store folder `dir`'s files in `files` (its generation in use, or
    /// one that `prep` wrote and checks before it is put in use).
    pub fn open_generation(dir: &Path, files: PathBuf) -> Result<Store, Error> {
        let bin = files.join(IMAGES_FILE);
        let (file, _) = open_regular(&bin).map_err(Error::unreadable)?;
        // mura never writes a store in place (prep writes a new generation and switches to it);
        // another program cutting it short ends the command with a message (see `mapped`).
        let mmap = Mapped::map(&file, &bin).map_err(Error::unreadable)?;
        let Header { n, side, crc } = check_header(&bin, &mmap)?;
        let hex = format!("{crc:08x}");
        let index: Index = read_json(&files.join(INDEX_FILE))?;
        let manifest: Manifest = read_json(&files.join(MANIFEST_FILE))?;
        let damaged = |damage| Error::damaged(dir, damage);
        if index.checksum != hex || manifest.checksum != hex {
            return Err(damaged(Damage::Stale(format!(
                "{INDEX_FILE} or {MANIFEST_FILE} is from another prep than {IMAGES_FILE}"
            ))));
        }
        if index.size != side || index.images.len() != n {
            return Err(damaged(Damage::Stale(format!(
                "{INDEX_FILE} does not match {IMAGES_FILE}'s shape"
            ))));
        }
        check_index(&index, &manifest).map_err(|e| damaged(Damage::Index(format!("{e:#}"))))?;
        let index_bytes = serde_json::to_vec(&index).expect("an index serialises");
        let index_checksum = crc32fast::hash(&index_bytes);
        crate::disk::failpoint::hit("store.opened").map_err(Error::unreadable)?;
        Ok(Store {
            dir: dir.to_path_buf(),
            files,
            size: side,
            studies: index.studies,
            images: index.images,
            manifest,
            checksum: crc,
            index_checksum,
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

    /// A short identity for a run to record, so that a resume on another store is refused:
    /// `<pixels>-<index>-<N>x<size>`, the checksums of the pixels and of the index (its studies
    /// with their labels, and its images), the image count and side.
    pub fn id(&self) -> String {
        let (n, size) = (self.images.len(), self.size);
        format!(
            "{:08x}-{:08x}-{n}x{size}",
            self.checksum, self.index_checksum
        )
    }

    /// Whether `id` is the identity an earlier mura recorded for a store of these pixels: it
    /// covered the pixels, count and side only (`<pixels>-<N>x<size>`), not the index.
    pub fn is_earlier_id(&self, id: &str) -> bool {
        id == format!("{:08x}-{}x{}", self.checksum, self.images.len(), self.size)
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, Error> {
    let text = read_regular_string(path, MAX_TEXT_BYTES).map_err(Error::unreadable)?;
    serde_json::from_str(&text)
        .map_err(|e| Error::damaged(path, Damage::Index(format!("it does not parse ({e})"))))
}

/// What `index` must satisfy for its images (already checked to be as many as the pixels hold)
/// and what `manifest` must say about it.
fn check_index(index: &Index, manifest: &Manifest) -> Result<()> {
    if index.format_version != FORMAT_VERSION || manifest.format_version != FORMAT_VERSION {
        bail!("{INDEX_FILE} or {MANIFEST_FILE} has another format version than {FORMAT_VERSION}");
    }
    check_studies(index, &manifest.study_types)?;
    check_counts(index, manifest)
}

/// The studies tile the images in order, each with at least one view (no range wraps or
/// leaves the images); labels are 0, 1 or none; types are among `types`.
fn check_studies(index: &Index, types: &[StudyType]) -> Result<()> {
    let n = index.images.len();
    let mut next = 0usize;
    for s in &index.studies {
        let end = s.first_image.checked_add(s.n_views).filter(|&e| e <= n);
        if s.n_views == 0 || end.is_none() {
            bail!(
                "{INDEX_FILE}: study {} has views {}..+{}, outside the {n} images",
                s.path,
                s.first_image,
                s.n_views
            );
        }
        if s.first_image != next {
            bail!(
                "{INDEX_FILE}: study {} starts at image {}, not {next} after the study before it",
                s.path,
                s.first_image
            );
        }
        next = s.first_image + s.n_views;
        if let Some(l) = s.label.filter(|&l| l > 1) {
            bail!(
                "{INDEX_FILE}: study {} has label {l} (a label is 0, 1 or none)",
                s.path
            );
        }
        if !types.contains(&s.study_type) {
            bail!(
                "{INDEX_FILE}: study {} is {}, a type {MANIFEST_FILE} does not list",
                s.path,
                s.study_type
            );
        }
    }
    if next != n {
        bail!("{INDEX_FILE}: its studies cover {next} of its {n} images");
    }
    Ok(())
}

/// The manifest's counts and loss weights (each in [0, 1]) are the ones the index gives.
fn check_counts(index: &Index, manifest: &Manifest) -> Result<()> {
    let n = index.images.len();
    if manifest.images != n || manifest.studies != index.studies.len() {
        bail!(
            "{MANIFEST_FILE} counts {} images and {} studies, {INDEX_FILE} holds {n} and {}",
            manifest.images,
            manifest.studies,
            index.studies.len()
        );
    }
    let (splits, weights) = Manifest::counts(&index.studies);
    if manifest.splits != splits {
        bail!("{MANIFEST_FILE}'s counts per split and type disagree with {INDEX_FILE}");
    }
    for (t, w) in &manifest.weights {
        for (name, v) in [("w0", w.w0), ("w1", w.w1)] {
            if !(0.0..=1.0).contains(&v) {
                bail!("{MANIFEST_FILE}: loss weight {name} of {t} is {v}, outside [0, 1]");
            }
        }
    }
    let same =
        |a: &Weights, b: &Weights| (a.w0 - b.w0).abs() <= 1e-9 && (a.w1 - b.w1).abs() <= 1e-9;
    let agree = manifest.weights.len() == weights.len()
        && manifest
            .weights
            .iter()
            .all(|(t, w)| weights.get(t).is_some_and(|r| same(w, r)));
    if !agree {
        bail!(
            "{MANIFEST_FILE}'s loss weights are not the ones {INDEX_FILE}'s training images give"
        );
    }
    Ok(())
}
