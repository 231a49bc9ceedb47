//! Reads a MURA-v1.1 tree: the four CSVs when present, else the folders alone; test-style
//! unlabeled folders (`studyK`, no suffix) too. Every problem is collected, not fatal. A CSV row
//! that repeats an earlier one is ignored (a note says so); a labelled-studies row giving a
//! study another label than an earlier row is skipped (listed as such, so `--strict` fails on
//! it), and the first row's label is kept.

use super::{Split, StudyType};
use crate::disk::{read_regular_string, MAX_TEXT_BYTES};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// The folder name every MURA path starts with.
pub const PREFIX: &str = "MURA-v1.1";

/// One study as found in the source tree.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceStudy {
    pub split: Split,
    pub study_type: StudyType,
    /// e.g. `patient00001`
    pub patient: String,
    /// As in the CSVs: `MURA-v1.1/train/XR_WRIST/patient00001/study1_positive/`
    pub path: String,
    /// 1 = abnormal, 0 = normal, None = unlabeled (test-style)
    pub label: Option<u8>,
    /// Image paths as in the CSVs (`MURA-v1.1/.../image1.png`), in view order.
    pub images: Vec<String>,
}

/// Something that was left out, and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

#[derive(Debug)]
pub struct Dataset {
    /// The `MURA-v1.1` folder (or the folder given in its place).
    pub mura_dir: PathBuf,
    pub studies: Vec<SourceStudy>,
    pub skipped: Vec<Skipped>,
    /// Things worth saying that did not drop anything (e.g. a CSV label disagreeing with a folder).
    pub notes: Vec<String>,
}

impl Dataset {
    /// The file a CSV-style path (`MURA-v1.1/...`) names.
    pub fn file(&self, rel: &str) -> PathBuf {
        self.mura_dir.join(
            rel.strip_prefix(PREFIX)
                .unwrap_or(rel)
                .trim_start_matches('/'),
        )
    }
}

/// The parts of a CSV-style path `MURA-v1.1/<split>/<XR_TYPE>/<patient>/<study>[/<file>]`.
struct Parsed<'a> {
    split: Split,
    study_type: StudyType,
    patient: &'a str,
    study: &'a str,
}

/// What a CSV path names: an image file, or a study folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Names {
    Image,
    Study,
}

fn parse_path(p: &str, names: Names) -> Result<Parsed<'_>> {
    let rest = p
        .strip_prefix(PREFIX)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or_else(|| anyhow::anyhow!("path does not start with '{PREFIX}/'"))?;
    let parts: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
    if parts
        .iter()
        .any(|c| c.is_empty() || *c == "." || *c == ".." || c.contains('\\'))
    {
        bail!("path escapes or is malformed (empty, '.' or '..' component)");
    }
    let (want, tail) = match names {
        Names::Image => (5, "/<image>.png or .dcm"),
        Names::Study => (4, "/"),
    };
    if parts.len() != want {
        bail!("expected {PREFIX}/<split>/<XR_TYPE>/<patient>/<study>{tail}");
    }
    Ok(Parsed {
        split: Split::parse(parts[0])?,
        study_type: StudyType::parse(parts[1])?,
        patient: parts[2],
        study: parts[3],
    })
}

/// The label a study folder's name implies: `_positive` 1, `_negative` 0, else unlabeled.
pub fn folder_label(study: &str) -> Option<u8> {
    if study.ends_with("_positive") {
        Some(1)
    } else if study.ends_with("_negative") {
        Some(0)
    } else {
        None
    }
}

/// The `MURA-v1.1` folder for a root given as its parent or as the folder itself.
fn resolve_root(root: &Path) -> Result<PathBuf> {
    std::fs::read_dir(root).with_context(|| format!("cannot read MURA root {}", root.display()))?;
    let inner = root.join(PREFIX);
    if inner.is_dir() {
        return Ok(inner);
    }
    let looks = Split::ALL.iter().any(|s| {
        root.join(s.name()).is_dir() || root.join(format!("{}_image_paths.csv", s.name())).is_file()
    });
    if !looks {
        bail!(
            "{} is not a MURA root: it holds neither {PREFIX}/ nor train/ or valid/ folders",
            root.display()
        );
    }
    Ok(root.to_path_buf())
}

fn find_csv(mura_dir: &Path, name: &str) -> Option<PathBuf> {
    let here = mura_dir.join(name);
    if here.is_file() {
        return Some(here);
    }
    let up = mura_dir.parent()?.join(name);
    up.is_file().then_some(up)
}

fn csv_lines(path: &Path) -> Result<Vec<String>> {
    let text = read_regular_string(path, MAX_TEXT_BYTES)?;
    Ok(text
        .lines()
        .map(|l| l.trim().trim_matches('"').to_string())
        .filter(|l| !l.is_empty())
        .collect())
}

/// `image12.png` sorts after `image2.png`.
fn natural_key(name: &str) -> (String, u64) {
    let digits: String = name.chars().filter(|c| c.is_ascii_digit()).collect();
    let rest: String = name.chars().filter(|c| !c.is_ascii_digit()).collect();
    (rest, digits.parse().unwrap_or(0))
}

/// The entries of `dir` in natural order, by name. An entry whose name is not UTF-8 (a store
/// records paths as text) is skipped, and listed in `ds` with the reason, never read as another.
fn sorted_entries(ds: &mut Dataset, dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let e = e.with_context(|| format!("cannot read {}", dir.display()))?;
        match e.file_name().into_string() {
            Ok(name) => v.push((name, e.path())),
            Err(_) => ds.skipped.push(Skipped {
                path: e.path().display().to_string(),
                reason: "its name is not UTF-8 text, which a store cannot record: rename it".into(),
            }),
        }
    }
    v.sort_by(|a, b| {
        natural_key(&a.0)
            .cmp(&natural_key(&b.0))
            .then(a.0.cmp(&b.0))
    });
    Ok(v)
}

/// Reads the dataset under `root` (the folder holding `MURA-v1.1/`, or that folder itself),
/// keeping only `types`. Fails only when the root itself cannot be used.
pub fn read(root: &Path, types: &[StudyType]) -> Result<Dataset> {
    let mura_dir = resolve_root(root)?;
    let mut ds = Dataset {
        mura_dir,
        studies: Vec::new(),
        skipped: Vec::new(),
        notes: Vec::new(),
    };
    for split in Split::ALL {
        read_split(&mut ds, split, types)?;
    }
    Ok(ds)
}

/// The studies of one split and their images, in first-appearance order.
struct Found {
    order: Vec<String>,
    /// Study path -> image paths.
    images: HashMap<String, Vec<String>>,
    /// Why a study the labels list has no entry here, as the skip reason ends.
    none_why: &'static str,
}

impl Found {
    fn new(none_why: &'static str) -> Found {
        Found {
            order: Vec::new(),
            images: HashMap::new(),
            none_why,
        }
    }
}

impl Dataset {
    fn skip(&mut self, path: &str, reason: String) {
        self.skipped.push(Skipped {
            path: path.to_string(),
            reason,
        })
    }
}

/// Adds one split's studies to `ds`: its images from the image CSV, else from its folders (a
/// split with neither is absent, and its labels CSV is not read), labelled from its labels CSV
/// and folder names.
fn read_split(ds: &mut Dataset, split: Split, types: &[StudyType]) -> Result<()> {
    let image_csv = find_csv(&ds.mura_dir, &format!("{}_image_paths.csv", split.name()));
    let found = match &image_csv {
        Some(csv) => images_from_csv(ds, split, types, csv)?,
        None => match images_from_folders(ds, split, types)? {
            Some(found) => found,
            None => return Ok(()),
        },
    };
    let label_csv = find_csv(
        &ds.mura_dir,
        &format!("{}_labeled_studies.csv", split.name()),
    );
    let labels = match &label_csv {
        Some(csv) => Some(read_labels(ds, types, csv, &found)?),
        None => None,
    };
    assemble(ds, split, found, labels.as_ref());
    Ok(())
}

/// The images `csv` (a split's `_image_paths.csv`) lists, of `types`, grouped by study. Rows
/// that are malformed, of another split or of a missing file are skipped; repeats noted.
fn images_from_csv(
    ds: &mut Dataset,
    split: Split,
    types: &[StudyType],
    csv: &Path,
) -> Result<Found> {
    let mut found = Found::new("it has no usable images");
    let mut seen = HashSet::new();
    for line in csv_lines(csv)? {
        let p = match parse_path(&line, Names::Image) {
            Ok(p) => p,
            Err(e) => {
                ds.skip(&line, format!("bad row in {}: {e}", csv.display()));
                continue;
            }
        };
        if p.split != split {
            ds.skip(
                &line,
                format!("row of split '{}' in {}", p.split, csv.display()),
            );
            continue;
        }
        if !types.contains(&p.study_type) {
            continue;
        }
        if !seen.insert(line.clone()) {
            ds.notes.push(format!(
                "{line}: listed twice in {}; the repeat is ignored",
                csv.display()
            ));
            continue;
        }
        if !ds.file(&line).is_file() {
            ds.skip(&line, "listed in the CSV but the file is missing".into());
            continue;
        }
        let study = format!("{}/", &line[..line.rfind('/').unwrap_or(0)]);
        if !found.images.contains_key(&study) {
            found.order.push(study.clone());
        }
        found.images.entry(study).or_default().push(line);
    }
    Ok(found)
}

/// The study folders of `split` (of `types`) and their PNGs, when the split has no image CSV;
/// None when it has no folder either.
fn images_from_folders(
    ds: &mut Dataset,
    split: Split,
    types: &[StudyType],
) -> Result<Option<Found>> {
    let split_dir = ds.mura_dir.join(split.name());
    if !split_dir.is_dir() {
        return Ok(None);
    }
    let mut found = Found::new("its folder has no images");
    for (tname, tdir) in sorted_entries(ds, &split_dir)? {
        if !tdir.is_dir() {
            continue;
        }
        let rel_t = format!("{PREFIX}/{}/{tname}", split.name());
        let Ok(t) = StudyType::parse(&tname) else {
            ds.skip(&rel_t, "unknown study type folder".into());
            continue;
        };
        if types.contains(&t) {
            type_folder(ds, &tdir, &rel_t, &mut found)?;
        }
    }
    Ok(Some(found))
}

/// Adds the studies under one study-type folder `tdir` (`rel_t` as a CSV-style path) to
/// `found`: every `<patient>/<study>/` holding PNGs; an empty study folder is skipped.
fn type_folder(ds: &mut Dataset, tdir: &Path, rel_t: &str, found: &mut Found) -> Result<()> {
    for (pname, pdir) in sorted_entries(ds, tdir)? {
        if !pdir.is_dir() {
            continue;
        }
        for (sname, sdir) in sorted_entries(ds, &pdir)? {
            if !sdir.is_dir() {
                continue;
            }
            let study = format!("{rel_t}/{pname}/{sname}/");
            let pngs: Vec<String> = sorted_entries(ds, &sdir)?
                .into_iter()
                .filter(|(n, p)| {
                    let n = n.to_ascii_lowercase();
                    (n.ends_with(".png") || n.ends_with(".dcm")) && p.is_file()
                })
                .map(|(n, _)| format!("{study}{n}"))
                .collect();
            if pngs.is_empty() {
                ds.skip(&study, "empty study folder (no PNG or DICOM files)".into());
                continue;
            }
            found.order.push(study.clone());
            found.images.insert(study, pngs);
        }
    }
    Ok(())
}

/// The labels `csv` (a split's `_labeled_studies.csv`) gives studies of `types`: the first
/// row's for a study listed twice (a repeat noted, a conflicting one skipped). A listed study
/// with no images in `found` is skipped too.
fn read_labels(
    ds: &mut Dataset,
    types: &[StudyType],
    csv: &Path,
    found: &Found,
) -> Result<HashMap<String, u8>> {
    let mut labels: HashMap<String, u8> = HashMap::new();
    for line in csv_lines(csv)? {
        let Some((path, study, label)) = label_row(ds, types, csv, &line) else {
            continue;
        };
        match labels.get(&study) {
            Some(&first) if first == label => {
                ds.notes.push(format!(
                    "{study}: labelled {label} twice in {}; the repeat is ignored",
                    csv.display()
                ));
                continue;
            }
            Some(&first) => {
                ds.skip(
                    &path,
                    format!(
                        "row of {} labels the study {label}, an earlier row {first}: the \
                         first row's label is kept",
                        csv.display()
                    ),
                );
                continue;
            }
            None => {
                labels.insert(study.clone(), label);
            }
        }
        if !found.images.contains_key(&study) {
            ds.skip(
                &study,
                format!("study listed in {} but {}", csv.display(), found.none_why),
            );
        }
    }
    Ok(labels)
}

/// One row of a labeled-studies CSV: (its path, the study path with its `/`, the label), or
/// None when it is skipped (a bad label or path) or of a type not read.
fn label_row(
    ds: &mut Dataset,
    types: &[StudyType],
    csv: &Path,
    line: &str,
) -> Option<(String, String, u8)> {
    let (path, label) = match line.rsplit_once(',') {
        Some((p, l)) => (p.trim().trim_matches('"').to_string(), l.trim()),
        None => (line.to_string(), ""),
    };
    let label = match label {
        "0" => 0u8,
        "1" => 1u8,
        other => {
            ds.skip(
                &path,
                format!(
                    "bad row in {}: label '{other}' is not 0 or 1",
                    csv.display()
                ),
            );
            return None;
        }
    };
    let study = if path.ends_with('/') {
        path.clone()
    } else {
        format!("{path}/")
    };
    match parse_path(&study, Names::Study) {
        Ok(p) if !types.contains(&p.study_type) => None,
        Ok(_) => Some((path, study, label)),
        Err(e) => {
            ds.skip(&path, format!("bad row in {}: {e}", csv.display()));
            None
        }
    }
}

/// Adds the studies `found` to `ds`, in order, each labelled by `labels` (the split's
/// labeled-studies CSV, when it has one: it wins over the folder name, and a note says when they
/// disagree) or else by its folder name (noted when there is a CSV that leaves the study out).
fn assemble(
    ds: &mut Dataset,
    split: Split,
    mut found: Found,
    labels: Option<&HashMap<String, u8>>,
) {
    for study in found.order {
        let p = parse_path(&study, Names::Study).expect("study paths were validated above");
        let from_folder = folder_label(p.study);
        let label = match (labels.and_then(|l| l.get(&study)), from_folder) {
            (Some(&l), Some(f)) if l != f => {
                ds.notes.push(format!(
                    "{study}: labeled {l} in the CSV but the folder says {} (the CSV wins)",
                    if f == 1 { "positive" } else { "negative" }
                ));
                Some(l)
            }
            (Some(&l), _) => Some(l),
            (None, f) => {
                if labels.is_some() {
                    ds.notes.push(format!(
                        "{study}: not in the labeled-studies CSV; label taken from the folder name"
                    ));
                }
                f
            }
        };
        let (study_type, patient) = (p.study_type, p.patient.to_string());
        let imgs = found.images.remove(&study).unwrap_or_default();
        ds.studies.push(SourceStudy {
            split,
            study_type,
            patient,
            path: study,
            label,
            images: imgs,
        });
    }
}
