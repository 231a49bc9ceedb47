//! The fuzz targets' bodies, shared by the cargo-fuzz targets (`fuzz/fuzz_targets/<name>.rs`)
//! and the replay test (`tests/data/fuzz_replay.rs`), which runs every file of
//! `fuzz/corpus/<name>/` and `fuzz/regressions/<name>/` through them. A body may meet any
//! error; it must never panic, abort, hang or exhaust memory.
#![allow(dead_code)] // each fuzz target uses one body

use mura::data::loader::{Augment, Loader, LoaderConfig};
use mura::data::store::{self, Store};
use mura::data::{Split, StudyType};
use mura::spec::DenseNetSpec;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A fuzz target's body.
pub type Body = fn(&[u8]);

/// Every target: its name (folder and binary) and its body.
pub const TARGETS: &[(&str, Body)] = &[
    ("pth", pth),
    ("safetensors", safetensors),
    ("store", store),
    ("mura_tree", mura_tree),
    ("score_csv", score_csv),
    ("png", png),
    ("dicom", dicom),
];

/// The smallest DenseNet: what weights load into.
fn micro() -> DenseNetSpec {
    DenseNetSpec::custom(1, vec![1], 1, 1).expect("a valid spec")
}

/// A `.pth` file (zip or legacy), imported as torchvision's DenseNet.
pub fn pth(data: &[u8]) {
    if let Ok(sd) = mura::weights::pth::load_pth_bytes(data) {
        let _ = mura::weights::import_torchvision(sd, &micro(), 0);
    }
}

/// A safetensors file: parsed from memory, checked and loaded into a DenseNet; and as a file,
/// loaded as a model checkpoint is (its header checked against the model before its data is
/// read, tensor by tensor).
pub fn safetensors(data: &[u8]) {
    if let Ok(ck) = mura::weights::safetensors::from_safetensors_bytes(data) {
        if mura::weights::check_state_dict(&ck.state_dict, &micro()).is_ok() {
            let _ = mura::model::DenseNet::<f32>::from_state_dict(micro(), &ck.state_dict);
        }
    }
    let file = scratch("weights").join("model.safetensors");
    std::fs::write(&file, data).expect("write");
    let _ = mura::checkpoint::load_model(&file, Some(&micro()));
}

/// Bodies that write files write them under scratch folders of this process.
const SCRATCH: [&str; 3] = ["store", "tree", "weights"];

fn scratch_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("mura-fuzz-{name}-{}", std::process::id()))
}

/// The scratch folder `name` of this process, emptied.
fn scratch(name: &str) -> PathBuf {
    let d = scratch_path(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("a scratch folder");
    d
}

/// Removes this process's scratch folders.
pub fn remove_scratch() {
    for name in SCRATCH {
        let _ = std::fs::remove_dir_all(scratch_path(name));
    }
}

/// Written in a store's JSON where its checksum goes (a fuzzer cannot guess a crc32).
pub const CRC_MARK: &str = "@CRC@";

/// A store: `index.json NUL manifest.json NUL flags side pixels…`. The pixels' crc32 replaces
/// [`CRC_MARK`] in the JSON and goes into a well-formed header, unless flags bit 1 asks for
/// the first 64 pixel bytes as the header instead; flags bit 0 writes the layout before
/// generations (files in the store folder) instead of `CURRENT` + `gen-1/`. The store is opened
/// and, if it opens, one batch of every split is read.
pub fn store(data: &[u8]) {
    let mut parts = data.splitn(3, |&b| b == 0);
    let index = parts.next().unwrap_or_default();
    let manifest = parts.next().unwrap_or_default();
    let (flags, side, mut pixels) = match parts.next().unwrap_or_default() {
        [f, s, px @ ..] => (*f, 8 + *s as usize % 9, px),
        _ => (0, 8, &[][..]),
    };
    let header = if flags & 2 != 0 && pixels.len() >= store::HEADER_LEN {
        let (h, px) = pixels.split_at(store::HEADER_LEN);
        pixels = px;
        h.to_vec()
    } else {
        let n = pixels.len() / (side * side);
        pixels = &pixels[..n * side * side];
        store::header_bytes(n, side, store::checksum(pixels)).to_vec()
    };
    let crc = format!("{:08x}", store::checksum(pixels));
    let dir = scratch("store");
    let files = if flags & 1 != 0 {
        dir.clone()
    } else {
        std::fs::write(dir.join(store::CURRENT_FILE), "gen-1\n").expect("write");
        dir.join("gen-1")
    };
    std::fs::create_dir_all(&files).expect("a store folder");
    let json = |b: &[u8]| String::from_utf8_lossy(b).replace(CRC_MARK, &crc);
    std::fs::write(files.join(store::INDEX_FILE), json(index)).expect("write");
    std::fs::write(files.join(store::MANIFEST_FILE), json(manifest)).expect("write");
    std::fs::write(files.join(store::IMAGES_FILE), [&header, pixels].concat()).expect("write");
    if let Ok(s) = Store::open(&dir) {
        read_batches(Arc::new(s));
    }
}

/// One batch of every split of `store`, as training and evaluation read them.
fn read_batches(store: Arc<Store>) {
    for t in StudyType::ALL {
        let _ = store.loss_weights(t);
    }
    let cfg = LoaderConfig {
        batch_studies: 4,
        max_views: None,
        image_size: 8,
        augment: Some(Augment {
            flip: true,
            max_rotation_deg: 30.0,
        }),
        seed: 0,
        shuffle: true,
        workers: 0,
        prefetch: 1,
    };
    for split in Split::ALL {
        if let Ok(loader) = Loader::new(store.clone(), split, &StudyType::ALL, cfg.clone()) {
            let _ = loader.epoch(0).next();
            let _ = loader.epoch_raw(1).next();
        }
    }
}

/// Whether `rel` is a path this body may create: at most 6 plain components.
fn safe_relative(rel: &str) -> bool {
    let parts: Vec<&str> = rel.trim_end_matches('/').split('/').collect();
    parts.len() <= 6
        && parts.iter().all(|p| {
            !p.is_empty()
                && *p != "."
                && *p != ".."
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
        })
}

/// A MURA tree: up to five NUL-separated parts, the train image-path CSV, train labeled-study
/// CSV, valid image-path CSV and valid labeled-study CSV (an empty part: no such file), then
/// lines naming what to create under `MURA-v1.1/` (a folder when it ends in '/', else an empty
/// file; at most 64, plain names only). The tree is read as `prep` reads it.
pub fn mura_tree(data: &[u8]) {
    let root = scratch("tree");
    let mura_dir = root.join(mura::data::mura::PREFIX);
    std::fs::create_dir_all(&mura_dir).expect("a scratch folder");
    let parts: Vec<&[u8]> = data.splitn(5, |&b| b == 0).collect();
    let csvs = [
        "train_image_paths.csv",
        "train_labeled_studies.csv",
        "valid_image_paths.csv",
        "valid_labeled_studies.csv",
    ];
    for (name, text) in csvs.iter().zip(&parts) {
        if !text.is_empty() {
            std::fs::write(mura_dir.join(name), text).expect("write");
        }
    }
    let listing = String::from_utf8_lossy(parts.get(4).copied().unwrap_or_default()).into_owned();
    for line in listing.lines().filter(|l| safe_relative(l)).take(64) {
        let p = mura_dir.join(line.trim_end_matches('/'));
        let _ = if line.ends_with('/') {
            std::fs::create_dir_all(&p)
        } else {
            p.parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|_| std::fs::write(&p, b""))
        };
    }
    let _ = mura::data::mura::read(&root, &StudyType::ALL);
    let _ = mura::data::mura::read(&mura_dir, &[StudyType::Wrist]);
}

/// `mura score`'s input: labels CSV NUL predictions CSV, parsed and scored.
pub fn score_csv(data: &[u8]) {
    let mut parts = data.splitn(2, |&b| b == 0);
    let labels = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let predictions = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let parse = mura::cli::score::parse_study_csv;
    if let (Ok(l), Ok(p)) = (parse(&labels, "labels"), parse(&predictions, "predictions")) {
        let _ = mura::cli::score::score(&l, &p);
    }
}

/// A PNG, decoded to gray and preprocessed as `prep` and `predict` do.
pub fn png(data: &[u8]) {
    use mura::data::image::{decode_gray_bytes, Preprocess};
    if let Ok(img) = decode_gray_bytes(data) {
        let _ = Preprocess::prep(8).model_input(img, 12);
    }
}

/// A DICOM file, decoded to gray and preprocessed as `prep` and `predict` do.
pub fn dicom(data: &[u8]) {
    use mura::data::dicom::decode_gray_bytes;
    use mura::data::image::Preprocess;
    if let Ok(img) = decode_gray_bytes(data) {
        let _ = Preprocess::prep(8).model_input(img, 12);
    }
}

/// Runs `body` on every file under `dir` (none if it does not exist): how many files ran, and
/// the ones that panicked.
pub fn replay(dir: &Path, body: Body) -> (usize, Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (0, Vec::new());
    };
    let (mut n, mut panicked) = (0, Vec::new());
    for e in entries {
        let path = e.expect("a folder entry").path();
        if path.is_file() {
            let data = std::fs::read(&path).expect("a readable file");
            if std::panic::catch_unwind(|| body(&data)).is_err() {
                panicked.push(path);
            }
            n += 1;
        }
    }
    (n, panicked)
}
