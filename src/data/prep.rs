//! `prep`: decode every image once (all cores), gray, resize to size², and commit the store
//! in one atomic step. The store folder `out/` holds generations `gen-<N>/` and the file
//! `CURRENT` naming the one in use (see `data::store`). Holding a lock on `out/`, prep
//! 1. removes what an interrupted prep left behind (generations not in use, `CURRENT.tmp-*`);
//! 2. writes the new generation `gen-<N+1>/`: the pixels with write(2) into space reserved up
//!    front, so a full disk is an error and never a fault, the header last, then index and
//!    manifest, everything fsynced; then opens it with the store's own reader (`Store::open`'s
//!    checks and caps), so that a store its readers would refuse is never committed;
//! 3. switches `CURRENT` to it with one rename (then fsyncs `out/`): the commit;
//! 4. removes the previous generation, or the files of a store written before generations.
//!
//! A kill before step 3 leaves the previous store in use, after it the new one; an error removes
//! the new generation and leaves the previous store as it was. Each step is a failpoint
//! `store.<step>` (see `disk::failpoint`).

use super::image::{decode_gray, Preprocess};
use super::mura::{self, Skipped};
use super::store::{
    self, generation, ImageRecord, Index, Manifest, StudyRecord, CURRENT_FILE, GEN_PREFIX,
};
use super::StudyType;
use crate::disk::owned::{self, Made};
use crate::disk::{entry_names, failpoint, sync_dir, write_synced};
use crate::out::Progress;
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct PrepConfig {
    pub mura_root: PathBuf,
    pub out: PathBuf,
    pub size: usize,
    pub study_types: Vec<StudyType>,
    /// Fail (and write nothing) when anything had to be skipped.
    pub strict: bool,
    pub progress: Progress,
}

#[derive(Debug)]
pub struct PrepSummary {
    pub manifest: Manifest,
    /// The folder holding the new store's files (its generation).
    pub files: PathBuf,
    pub seconds: f64,
}

/// Files a store written before generations holds in the store folder itself.
const FLAT_FILES: [&str; 3] = [store::IMAGES_FILE, store::INDEX_FILE, store::MANIFEST_FILE];

/// Removes an unfinished generation when dropped, unless kept.
struct Removal {
    path: PathBuf,
}

impl Removal {
    fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for Removal {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A store folder this prep created (or found empty), removed when dropped unless kept if it
/// holds nothing but its marker: what a failed first prep leaves is what was there.
struct Unmade {
    dir: PathBuf,
    /// What the claim found there.
    found: owned::Found,
}

impl Unmade {
    fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for Unmade {
    fn drop(&mut self) {
        owned::unmark(&self.dir, self.found);
    }
}

/// Whether `name` is a `CURRENT` staged by a prep (`CURRENT.tmp-<pid>`).
fn is_staged_current(name: &str) -> bool {
    name.strip_prefix(CURRENT_FILE)
        .is_some_and(|rest| rest.starts_with(".tmp-"))
}

/// Refuses to write anything but a missing path, an empty folder or a store folder mura made
/// (see `disk::owned`): marked as one, or a store of an earlier mura (no marker) that the store's
/// reader opens. Never the entries' names: a folder holding a `CURRENT` or `gen-1/` of another
/// program is not a store.
pub fn check_replaceable(out: &Path) -> Result<owned::Found> {
    owned::check(out, Made::Store, Some(&is_earlier_store))
}

/// Whether `dir` is a store an earlier mura wrote (no marker): one its reader opens.
fn is_earlier_store(dir: &Path) -> bool {
    store::Store::open(dir).is_ok()
}

/// The generation `out/CURRENT` names, if it names one that exists.
fn current_generation(out: &Path) -> Option<u64> {
    let text = crate::disk::read_regular_string(&out.join(CURRENT_FILE), 256).ok()?;
    let g = generation(text.trim_end_matches('\n'))?;
    out.join(format!("{GEN_PREFIX}{g}")).is_dir().then_some(g)
}

/// Removes what interrupted preps left in `out`: generations not in use, staged `CURRENT`s,
/// and the files of a store written before generations once a generation is in use.
fn remove_leftovers(out: &Path, current: Option<u64>) -> Result<()> {
    for name in entry_names(out)? {
        let stale = match generation(&name) {
            Some(g) => Some(g) != current,
            None => {
                is_staged_current(&name)
                    || (current.is_some() && FLAT_FILES.contains(&name.as_str()))
            }
        };
        if stale {
            let p = out.join(&name);
            let r = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            r.with_context(|| format!("cannot remove the leftover {}", p.display()))?;
        }
    }
    Ok(())
}

/// Reserves `len` bytes for `file`, so that a disk too small fails now, as an error (where the
/// file system cannot reserve, the writes still report a full disk).
fn reserve(file: &File, len: u64) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on a descriptor we own.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if !matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
            ) {
                return Err(e);
            }
        }
    }
    let _ = (file, len);
    Ok(())
}

/// A source image as the store holds it: its original (width, height) and its pixels.
struct Decoded {
    size: (u32, u32),
    pixels: Vec<u8>,
}

/// Decodes, grays and resizes the PNG `path` to `side`², or says why it cannot be used.
fn decode_for_store(path: &Path, side: usize) -> Result<Decoded, String> {
    let g = decode_gray(path).map_err(|e| format!("{e:#}"))?;
    let size = (g.width as u32, g.height as u32);
    Ok(Decoded {
        size,
        pixels: Preprocess::prep(side).store_pixels(g),
    })
}

/// Decoded, resized and written pixels: per source image its original size or why it was
/// skipped, the number written and their crc32.
struct Pixels {
    results: Vec<Result<(u32, u32), String>>,
    n: usize,
    crc: u32,
}

/// Decodes `all` (in parallel, a bounded number at a time) and writes the readable ones, in
/// order, after a blank header into `bin`; the header goes last.
fn write_pixels(
    ds: &mura::Dataset,
    all: &[(usize, &str)],
    cfg: &PrepConfig,
    bin: &Path,
) -> Result<Pixels> {
    let px = cfg.size * cfg.size;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(bin)
        .with_context(|| format!("cannot create {}", bin.display()))?;
    let cannot = || format!("cannot write {}", bin.display());
    reserve(&file, (store::HEADER_LEN + all.len() * px) as u64).with_context(|| {
        format!(
            "cannot reserve {} MB for {}",
            (store::HEADER_LEN + all.len() * px) >> 20,
            bin.display()
        )
    })?;
    file.write_all(&[0; store::HEADER_LEN])
        .with_context(cannot)?;
    let style = indicatif::ProgressStyle::with_template(
        "prep {bar:40} {pos}/{len} images {per_sec} eta {eta}",
    )
    .expect("valid template");
    let bar = cfg.progress.bar(all.len() as u64, style);
    // At most 64 MiB of decoded pixels wait to be written (but a batch for every thread).
    let batch = ((64 << 20) / px).max(rayon::current_num_threads());
    let mut results = Vec::with_capacity(all.len());
    let mut hasher = crc32fast::Hasher::new();
    let mut n = 0;
    for group in all.chunks(batch) {
        let decoded: Vec<Result<Decoded, String>> = group
            .par_iter()
            .map(|&(_, rel)| {
                let d = decode_for_store(&ds.file(rel), cfg.size);
                bar.inc(1);
                d
            })
            .collect();
        for d in decoded {
            results.push(match d {
                Ok(Decoded { size, pixels }) => {
                    file.write_all(&pixels)
                        .and_then(|_| failpoint::hit("store.image-written"))
                        .with_context(cannot)?;
                    hasher.update(&pixels);
                    n += 1;
                    Ok(size)
                }
                Err(reason) => Err(reason),
            });
        }
    }
    bar.finish_and_clear();
    let crc = hasher.finalize();
    file.set_len((store::HEADER_LEN + n * px) as u64)
        .and_then(|_| file.write_all_at(&store::header_bytes(n, cfg.size, crc), 0))
        .and_then(|_| file.sync_all())
        .and_then(|_| failpoint::hit("store.images-synced"))
        .with_context(cannot)?;
    Ok(Pixels { results, n, crc })
}

/// The study records of the images written, in order, adding to `skipped` what was left out.
fn study_records(
    ds: &mura::Dataset,
    all: &[(usize, &str)],
    results: &[Result<(u32, u32), String>],
    skipped: &mut Vec<Skipped>,
) -> (Vec<StudyRecord>, Vec<ImageRecord>) {
    let mut images = Vec::with_capacity(all.len());
    let mut studies: Vec<StudyRecord> = Vec::new();
    let mut i = 0;
    for (s, st) in ds.studies.iter().enumerate() {
        let first = images.len();
        while i < all.len() && all[i].0 == s {
            match &results[i] {
                Ok((w, h)) => images.push(ImageRecord {
                    path: all[i].1.to_string(),
                    width: *w,
                    height: *h,
                }),
                Err(reason) => skipped.push(Skipped {
                    path: all[i].1.to_string(),
                    reason: reason.clone(),
                }),
            }
            i += 1;
        }
        if images.len() == first {
            skipped.push(Skipped {
                path: st.path.clone(),
                reason: "study has no readable images".into(),
            });
            continue;
        }
        studies.push(StudyRecord {
            split: st.split,
            study_type: st.study_type,
            patient: st.patient.clone(),
            label: st.label,
            path: st.path.clone(),
            first_image: first,
            n_views: images.len() - first,
        });
    }
    (studies, images)
}

/// Writes a complete generation into the new folder `files`: pixels, index, manifest.
fn write_generation(
    cfg: &PrepConfig,
    ds: &mura::Dataset,
    all: &[(usize, &str)],
    files: &Path,
) -> Result<Manifest> {
    let px = write_pixels(ds, all, cfg, &files.join(store::IMAGES_FILE))?;
    let mut skipped = ds.skipped.clone();
    let (studies, images) = study_records(ds, all, &px.results, &mut skipped);
    if images.is_empty() {
        bail!(
            "nothing usable under {}: all {} images were unreadable",
            cfg.mura_root.display(),
            all.len()
        );
    }
    if cfg.strict && !skipped.is_empty() {
        bail!(
            "--strict: {} problem(s), first: {}: {}",
            skipped.len(),
            skipped[0].path,
            skipped[0].reason
        );
    }
    let hex = format!("{:08x}", px.crc);
    let (splits, weights) = Manifest::counts(&studies);
    let manifest = Manifest {
        format_version: store::FORMAT_VERSION,
        checksum: hex.clone(),
        size: cfg.size,
        images: px.n,
        studies: studies.len(),
        source: cfg.mura_root.display().to_string(),
        study_types: cfg.study_types.clone(),
        splits,
        weights,
        skipped,
        notes: ds.notes.clone(),
    };
    let index = Index {
        format_version: store::FORMAT_VERSION,
        checksum: hex,
        size: cfg.size,
        studies,
        images,
    };
    let index = serde_json::to_vec(&index)?;
    write_synced(
        &files.join(store::INDEX_FILE),
        &index,
        "store.index-written",
    )?;
    let manifest_json = serde_json::to_vec_pretty(&manifest)?;
    let path = files.join(store::MANIFEST_FILE);
    write_synced(&path, &manifest_json, "store.manifest-written")?;
    sync_dir(Some(files));
    failpoint::hit("store.generation-synced")
        .with_context(|| format!("cannot write {}", files.display()))?;
    Ok(manifest)
}

/// Opens the generation `files` written into `out` with the store's own reader, which checks all
/// it checks when a command opens the store (sizes against its caps included): a generation it
/// would refuse is never put in use.
fn read_back(out: &Path, files: &Path) -> Result<()> {
    store::Store::open_generation(out, files.to_path_buf())
        .map(drop)
        .context("the store written cannot be read back, so it is not put in use")
}

/// Makes `name` the generation in use: `CURRENT` staged beside, fsynced, renamed over.
fn switch_current(out: &Path, name: &str) -> Result<()> {
    let staged = out.join(format!("{CURRENT_FILE}.tmp-{}", std::process::id()));
    let r = write_synced(
        &staged,
        format!("{name}\n").as_bytes(),
        "store.current-staged",
    )
    .and_then(|_| {
        std::fs::rename(&staged, out.join(CURRENT_FILE))
            .with_context(|| format!("cannot switch {} to {name}", out.display()))
    });
    if r.is_err() {
        let _ = std::fs::remove_file(&staged);
    }
    r
}

/// Removes the store that `name`'s generation replaced: generation `previous`, or the files of
/// a store written before generations. Best effort: the next prep removes what is left.
fn remove_previous(out: &Path, previous: Option<u64>) {
    match previous {
        Some(g) => {
            let _ = std::fs::remove_dir_all(out.join(format!("{GEN_PREFIX}{g}")));
        }
        None => {
            for f in FLAT_FILES {
                let _ = std::fs::remove_file(out.join(f));
            }
        }
    }
    sync_dir(Some(out));
}

pub fn prep(cfg: &PrepConfig) -> Result<PrepSummary> {
    let t0 = std::time::Instant::now();
    crate::bounds::SIDE.check("--size", cfg.size)?;
    let out = &cfg.out;
    check_replaceable(out)?;
    let ds = mura::read(&cfg.mura_root, &cfg.study_types)?;
    let all: Vec<(usize, &str)> = ds
        .studies
        .iter()
        .enumerate()
        .flat_map(|(s, st)| st.images.iter().map(move |p| (s, p.as_str())))
        .collect();
    if all.is_empty() {
        bail!(
            "nothing usable under {} ({} problems{})",
            cfg.mura_root.display(),
            ds.skipped.len(),
            ds.skipped
                .first()
                .map(|s| format!("; first: {}: {}", s.path, s.reason))
                .unwrap_or_default()
        );
    }

    let found = owned::claim(out, Made::Store, Some(&is_earlier_store))?;
    let made = (found != owned::Found::Ours).then(|| Unmade {
        dir: out.clone(),
        found,
    });
    let _lock = crate::disk::lock_folder(out, "mura prep")?;
    let previous = current_generation(out);
    remove_leftovers(out, previous)?;
    let had_store = previous.is_some() || out.join(store::IMAGES_FILE).exists();
    failpoint::hit("store.locked").with_context(|| format!("cannot write {}", out.display()))?;
    let name = format!("{GEN_PREFIX}{}", previous.map_or(1, |g| g + 1));
    let files = out.join(&name);
    std::fs::create_dir(&files).with_context(|| format!("cannot create {}", files.display()))?;
    let unfinished = Removal {
        path: files.clone(),
    };
    let manifest = write_generation(cfg, &ds, &all, &files)
        .and_then(|m| read_back(out, &files).map(|_| m))
        .and_then(|m| switch_current(out, &name).map(|_| m))
        .map_err(|e| match had_store {
            true => anyhow::anyhow!("{e:#} (the store at {} is unchanged)", out.display()),
            false => e,
        })?;
    unfinished.keep();
    if let Some(m) = made {
        m.keep();
    }
    // Committed: what follows only tidies up (a failure there is reported, the store stays).
    let tidy = || format!("{} was replaced, then tidying up failed", out.display());
    failpoint::hit("store.switched").with_context(tidy)?;
    sync_dir(Some(out));
    remove_previous(out, previous);
    failpoint::hit("store.previous-removed").with_context(tidy)?;
    Ok(PrepSummary {
        manifest,
        files,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
