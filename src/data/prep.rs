//! `prep`: decode every image once (all cores), gray, resize to size², and write the store
//! atomically: everything goes into a hidden temporary folder next to the output, the pixel
//! header is written last, files are fsynced, and the folder is renamed into place.

use super::image::{decode_gray, resize_for_store};
use super::mura::{self, Skipped};
use super::store::{self, ImageRecord, Index, Manifest, StudyRecord};
use super::{sync_dir, StudyType};
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
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
    pub progress: bool,
}

#[derive(Debug)]
pub struct PrepSummary {
    pub manifest: Manifest,
    pub seconds: f64,
}

/// Removes the temporary folder unless the store was committed.
struct TmpDir(PathBuf);
impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn sibling(out: &Path, tag: &str) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "store".into());
    out.with_file_name(format!(".{name}.{tag}-{}", std::process::id()))
}

/// Refuses to replace anything but a missing path, an empty folder or an earlier store.
pub fn check_replaceable(out: &Path) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        bail!(
            "{} exists and is not a folder; refusing to replace it",
            out.display()
        );
    }
    let empty = std::fs::read_dir(out)
        .with_context(|| format!("cannot read {}", out.display()))?
        .next()
        .is_none();
    if !empty && !out.join(store::IMAGES_FILE).exists() {
        bail!(
            "{} exists and is not a mura store; refusing to replace it",
            out.display()
        );
    }
    Ok(())
}

/// Renames the finished folder `tmp` to `out`, replacing an earlier store at `out`.
pub fn commit_dir(tmp: &Path, out: &Path) -> Result<()> {
    if out.exists() {
        let old = sibling(out, "old");
        std::fs::rename(out, &old)
            .with_context(|| format!("cannot move the old {} aside", out.display()))?;
        std::fs::rename(tmp, out)
            .with_context(|| format!("cannot rename into {}", out.display()))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(tmp, out)
            .with_context(|| format!("cannot rename into {}", out.display()))?;
    }
    sync_dir(out.parent());
    Ok(())
}

pub fn prep(cfg: &PrepConfig) -> Result<PrepSummary> {
    let t0 = std::time::Instant::now();
    super::image::check_side("--size", cfg.size)?;
    check_replaceable(&cfg.out)?;
    let ds = mura::read(&cfg.mura_root, &cfg.study_types)?;
    let mut skipped = ds.skipped.clone();
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
            skipped.len(),
            skipped
                .first()
                .map(|s| format!("; first: {}: {}", s.path, s.reason))
                .unwrap_or_default()
        );
    }

    if let Some(parent) = cfg.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let tmp = TmpDir(sibling(&cfg.out, "tmp"));
    let _ = std::fs::remove_dir_all(&tmp.0);
    std::fs::create_dir(&tmp.0).with_context(|| format!("cannot create {}", tmp.0.display()))?;
    let bin_path = tmp.0.join(store::IMAGES_FILE);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&bin_path)
        .with_context(|| format!("cannot create {}", bin_path.display()))?;
    let px = cfg.size * cfg.size;
    file.set_len((store::HEADER_LEN + all.len() * px) as u64)
        .with_context(|| format!("cannot size {}", bin_path.display()))?;
    // SAFETY: the file was just created by us in a private temporary folder.
    let mut map =
        unsafe { memmap2::MmapMut::map_mut(&file) }.context("cannot map the new store")?;

    let bar = if cfg.progress {
        indicatif::ProgressBar::new(all.len() as u64).with_style(
            indicatif::ProgressStyle::with_template(
                "prep {bar:40} {pos}/{len} images {per_sec} eta {eta}",
            )
            .expect("valid template"),
        )
    } else {
        indicatif::ProgressBar::hidden()
    };
    // Decode into each image's slot; Err(reason) for an unreadable one.
    let results: Vec<Result<(u32, u32), String>> = map[store::HEADER_LEN..]
        .par_chunks_mut(px)
        .zip(all.par_iter())
        .map(|(slot, &(_, rel))| {
            let r = decode_gray(&ds.file(rel))
                .map_err(|e| format!("{e:#}"))
                .map(|g| {
                    let (w, h) = (g.width as u32, g.height as u32);
                    let small = resize_for_store(g, cfg.size);
                    for (o, &v) in slot.iter_mut().zip(&small.data) {
                        *o = (v * 255.0).round().clamp(0.0, 255.0) as u8;
                    }
                    (w, h)
                });
            bar.inc(1);
            r
        })
        .collect();
    bar.finish_and_clear();

    // Compact: move readable images down over the holes, and rebuild the study records.
    let mut images = Vec::with_capacity(all.len());
    let mut studies: Vec<StudyRecord> = Vec::new();
    let mut i = 0;
    for (s, st) in ds.studies.iter().enumerate() {
        let first = images.len();
        while i < all.len() && all[i].0 == s {
            match &results[i] {
                Ok((w, h)) => {
                    let k = images.len();
                    if k != i {
                        let src = store::HEADER_LEN + i * px;
                        map.copy_within(src..src + px, store::HEADER_LEN + k * px);
                    }
                    images.push(ImageRecord {
                        path: all[i].1.to_string(),
                        width: *w,
                        height: *h,
                    });
                }
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

    let n = images.len();
    map.flush().context("cannot flush the store")?;
    drop(map);
    file.set_len((store::HEADER_LEN + n * px) as u64)
        .context("cannot truncate the store")?;
    // SAFETY: as above; read-only view of our own private file.
    let crc = store::checksum(
        &unsafe { memmap2::Mmap::map(&file) }.context("cannot map the store")?[store::HEADER_LEN..],
    );
    file.write_all_at(&store::header_bytes(n, cfg.size, crc), 0)
        .context("cannot write the header")?;
    file.sync_all().context("cannot sync the store")?;
    drop(file);

    let hex = format!("{crc:08x}");
    let (splits, weights) = Manifest::counts(&studies);
    let manifest = Manifest {
        format_version: store::FORMAT_VERSION,
        checksum: hex.clone(),
        size: cfg.size,
        images: n,
        studies: studies.len(),
        source: cfg.mura_root.display().to_string(),
        study_types: cfg.study_types.clone(),
        splits,
        weights,
        skipped,
        notes: ds.notes,
    };
    let index = Index {
        format_version: store::FORMAT_VERSION,
        checksum: hex,
        size: cfg.size,
        studies,
        images,
    };
    super::write_atomic(&tmp.0.join(store::INDEX_FILE), &serde_json::to_vec(&index)?)?;
    super::write_atomic(
        &tmp.0.join(store::MANIFEST_FILE),
        &serde_json::to_vec_pretty(&manifest)?,
    )?;
    commit_dir(&tmp.0, &cfg.out)?;
    Ok(PrepSummary {
        manifest,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
