//! The data pipeline: reader (good and bad trees), synth, prep/store round trip and refusal of
//! damaged stores, augmentation properties, loader determinism, loss weights.

use crate::common::tmp;
use mura::data::image::{decode_gray, resize_bilinear, GrayImage};
use mura::data::loader::{Augment, Loader, LoaderConfig};
use mura::data::prep::{prep, PrepConfig};
use mura::data::store::{self, Damage, Store};
use mura::data::synth::{synth, SynthConfig};
use mura::data::{mura as reader, Split, StudyType};
use mura::ops::augment::{self, AugParams, MEAN, STD};
use mura::out::Progress;
use mura::rng::Rng;
use std::path::Path;
use std::sync::Arc;

fn random_gray(w: u32, h: u32, seed: u64) -> Vec<u8> {
    let mut r = Rng::new(seed);
    (0..w * h).map(|_| r.below(256) as u8).collect()
}

fn write_gray(path: &Path, w: u32, h: u32, seed: u64) -> Vec<u8> {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let px = random_gray(w, h, seed);
    image::save_buffer(path, &px, w, h, image::ExtendedColorType::L8).unwrap();
    px
}

fn cfg(root: &Path, out: &Path, size: usize) -> PrepConfig {
    PrepConfig {
        mura_root: root.to_path_buf(),
        out: out.to_path_buf(),
        size,
        study_types: StudyType::ALL.to_vec(),
        strict: false,
        progress: Progress::Quiet,
    }
}

/// A hand-made tree: train XR_WRIST patient1 study1 positive (3 views), patient2 study1
/// positive (1 view), patient3 study1 negative (2 views); valid XR_HAND one negative (1 view).
fn small_tree(root: &Path, size: u32) -> Vec<Vec<u8>> {
    let m = root.join("MURA-v1.1");
    let studies = [
        ("train/XR_WRIST/patient00001/study1_positive", 3, 1),
        ("train/XR_WRIST/patient00002/study1_positive", 1, 1),
        ("train/XR_WRIST/patient00003/study1_negative", 2, 0),
        ("valid/XR_HAND/patient00004/study1_negative", 1, 0),
    ];
    let mut pixels = Vec::new();
    let (mut paths, mut labels) = (
        [String::new(), String::new()],
        [String::new(), String::new()],
    );
    for (k, (s, n, label)) in studies.iter().enumerate() {
        let split = usize::from(s.starts_with("valid"));
        for v in 1..=*n {
            pixels.push(write_gray(
                &m.join(format!("{s}/image{v}.png")),
                size,
                size,
                (k * 10 + v) as u64,
            ));
            paths[split].push_str(&format!("MURA-v1.1/{s}/image{v}.png\n"));
        }
        labels[split].push_str(&format!("MURA-v1.1/{s}/,{label}\n"));
    }
    for (i, split) in ["train", "valid"].iter().enumerate() {
        std::fs::write(m.join(format!("{split}_image_paths.csv")), &paths[i]).unwrap();
        std::fs::write(m.join(format!("{split}_labeled_studies.csv")), &labels[i]).unwrap();
    }
    pixels
}

#[test]
fn store_round_trip_counts_and_weights() {
    let root = tmp("rt");
    let pixels = small_tree(&root, 24);
    let out = root.join("store");
    prep(&cfg(&root, &out, 24)).unwrap();
    let store = Store::open(&out).unwrap();
    assert_eq!(store.size, 24);
    assert_eq!(store.images.len(), 7);
    // Same size: the stored bytes are the PNG's bytes, exactly.
    for (i, px) in pixels.iter().enumerate() {
        assert_eq!(store.image(i), &px[..], "image {i}");
    }
    let s0 = &store.studies[0];
    assert_eq!(
        (s0.split, s0.study_type, s0.label, s0.n_views),
        (Split::Train, StudyType::Wrist, Some(1), 3)
    );
    assert_eq!(
        s0.path,
        "MURA-v1.1/train/XR_WRIST/patient00001/study1_positive/"
    );
    assert_eq!(s0.patient, "patient00001");
    assert_eq!(store.studies[3].first_image, 6);
    // Hand counts: wrist train images A = 3 + 1 abnormal, N = 2 normal.
    let tc = &store.manifest.splits["train"].by_type["XR_WRIST"];
    assert_eq!(
        (
            tc.studies,
            tc.images,
            tc.abnormal_studies,
            tc.abnormal_images
        ),
        (3, 6, 2, 4)
    );
    let (w0, w1) = store.loss_weights(StudyType::Wrist);
    assert!(
        (w1 - 2.0 / 6.0).abs() < 1e-6 && (w0 - 4.0 / 6.0).abs() < 1e-6,
        "{w0} {w1}"
    );
    assert_eq!(
        store.loss_weights(StudyType::Hand),
        (0.5, 0.5),
        "no training hands"
    );
    assert_eq!(store.manifest.splits["valid"].by_type["XR_HAND"].images, 1);
    // manifest.json has the documented fields.
    let j: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.files.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(
        j["splits"]["train"]["by_type"]["XR_WRIST"]["abnormal_images"],
        4
    );
    assert!(j["weights"]["XR_WRIST"]["w0"].is_f64() && j["skipped"].is_array());
    // Selecting types.
    let only = root.join("hands");
    prep(&PrepConfig {
        study_types: vec![StudyType::Hand],
        ..cfg(&root, &only, 24)
    })
    .unwrap();
    assert_eq!(Store::open(&only).unwrap().studies.len(), 1);
    std::fs::remove_dir_all(&root).unwrap();
}

fn expect_err<T: std::fmt::Debug>(r: anyhow::Result<T>, needle: &str) {
    let e = format!("{:#}", r.expect_err("expected an error"));
    assert!(e.contains(needle), "error '{e}' lacks '{needle}'");
}

/// What is damaged in the store `d`, which must not open for its damage.
fn damage(d: &Path) -> Damage {
    match Store::open(d).unwrap_err() {
        store::Error::Damaged { damage, .. } => damage,
        e => panic!("{} is not damaged: {e}", d.display()),
    }
}

#[test]
fn damaged_stores_are_refused() {
    let root = tmp("dmg");
    small_tree(&root, 20);
    let good = root.join("good");
    prep(&cfg(&root, &good, 20)).unwrap();
    let id = Store::open(&good).unwrap().id();
    let files = Store::open(&good).unwrap().files;
    assert_eq!(files, good.join("gen-1"));
    // Copies in the layout before generations (the files in the store folder), which opens too.
    let copy = |name: &str| {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["images.bin", "index.json", "manifest.json"] {
            std::fs::copy(files.join(f), d.join(f)).unwrap();
        }
        assert_eq!(Store::open(&d).unwrap().id(), id);
        d
    };
    let bin = |d: &Path| d.join("images.bin");
    // Truncated.
    let d = copy("trunc");
    let len = std::fs::metadata(bin(&d)).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(bin(&d))
        .unwrap()
        .set_len(len - 7)
        .unwrap();
    let (len, want) = (len as usize - 7, len as usize);
    assert_eq!(damage(&d), Damage::Length { len, want });
    // One flipped pixel.
    let d = copy("flip");
    let mut b = std::fs::read(bin(&d)).unwrap();
    let at = 64 + Rng::new(5).below((b.len() - 64) as u64) as usize;
    b[at] ^= 0x10;
    std::fs::write(bin(&d), &b).unwrap();
    assert!(matches!(damage(&d), Damage::Checksum { .. }));
    // Foreign file.
    let d = copy("foreign");
    std::fs::write(bin(&d), random_gray(50, 50, 9)).unwrap();
    assert_eq!(damage(&d), Damage::Foreign);
    // Newer format version.
    let d = copy("version");
    let mut b = std::fs::read(bin(&d)).unwrap();
    b[8] = 99;
    std::fs::write(bin(&d), &b).unwrap();
    assert_eq!(damage(&d), Damage::Version(99));
    // Stale: an index from another prep (different size).
    let other = root.join("other");
    prep(&cfg(&root, &other, 16)).unwrap();
    let d = copy("stale");
    std::fs::copy(other.join("gen-1/index.json"), d.join("index.json")).unwrap();
    assert!(matches!(damage(&d), Damage::Stale(_)));
    // Missing index; missing store.
    let d = copy("noindex");
    std::fs::remove_file(d.join("index.json")).unwrap();
    let e = anyhow::Error::from(Store::open(&d).unwrap_err());
    assert!(
        matches!(store::Error::find(&e), Some(store::Error::Unreadable(_))),
        "{e:#}"
    );
    assert!(format!("{e:#}").contains("index.json"), "{e:#}");
    let nothing = root.join("nothing");
    assert!(matches!(Store::open(&nothing), Err(store::Error::NoStore { dir }) if dir == nothing));
    // An unfinished prep (header not yet written) never opens.
    let d = copy("unfinished");
    let mut b = std::fs::read(bin(&d)).unwrap();
    b[..64].fill(0);
    std::fs::write(bin(&d), &b).unwrap();
    assert_eq!(damage(&d), Damage::NoHeader);
    // A failing prep leaves an existing store alone; prep refuses to replace a non-store.
    let bad = tmp("dmg-bad");
    small_tree(&bad, 20);
    std::fs::write(
        bad.join("MURA-v1.1/train/XR_WRIST/patient00003/study1_negative/image2.png"),
        b"",
    )
    .unwrap();
    expect_err(
        prep(&PrepConfig {
            strict: true,
            ..cfg(&bad, &good, 20)
        }),
        "--strict",
    );
    assert_eq!(Store::open(&good).unwrap().id(), id);
    expect_err(
        prep(&cfg(&root, &root.join("MURA-v1.1"), 20)),
        "holds files that mura did not write",
    );
    let leftovers: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    std::fs::remove_dir_all(&root).unwrap();
    std::fs::remove_dir_all(&bad).unwrap();
}

#[test]
fn bad_inputs_are_reported_and_skipped() {
    let root = tmp("bad");
    small_tree(&root, 20);
    let m = root.join("MURA-v1.1");
    let good_png =
        std::fs::read(m.join("train/XR_WRIST/patient00001/study1_positive/image1.png")).unwrap();
    // A zero-byte file, a truncated PNG and a corrupt one (PNG signature, garbage after).
    let s1 = m.join("train/XR_WRIST/patient00001/study1_positive");
    std::fs::write(s1.join("image1.png"), b"").unwrap();
    std::fs::write(s1.join("image2.png"), &good_png[..good_png.len() / 2]).unwrap();
    let mut corrupt = good_png[..8].to_vec();
    corrupt.extend(random_gray(40, 1, 3));
    std::fs::write(s1.join("image3.png"), &corrupt).unwrap();
    // Extra CSV rows: missing file, duplicate, unknown type, escaping path, wrong label, a
    // label disagreeing with the folder.
    let mut paths = std::fs::read_to_string(m.join("train_image_paths.csv")).unwrap();
    paths.push_str("MURA-v1.1/train/XR_WRIST/patient00009/study1_positive/image1.png\n");
    paths.push_str("MURA-v1.1/train/XR_WRIST/patient00002/study1_positive/image1.png\n");
    paths.push_str("MURA-v1.1/train/XR_KNEE/patient00010/study1_positive/image1.png\n");
    paths.push_str("MURA-v1.1/train/../../../etc/passwd/x.png\n");
    std::fs::write(m.join("train_image_paths.csv"), paths).unwrap();
    let mut labels = std::fs::read_to_string(m.join("train_labeled_studies.csv")).unwrap();
    labels = labels.replace(
        "patient00003/study1_negative/,0",
        "patient00003/study1_negative/,1",
    );
    labels.push_str("MURA-v1.1/train/XR_WRIST/patient00011/study1_negative/,2\n");
    std::fs::write(m.join("train_labeled_studies.csv"), labels).unwrap();

    let out = root.join("store");
    let s = prep(&cfg(&root, &out, 20)).unwrap();
    let reasons: Vec<String> = s
        .manifest
        .skipped
        .iter()
        .map(|k| format!("{}: {}", k.path, k.reason))
        .collect();
    let has = |a: &str, b: &str| reasons.iter().any(|r| r.contains(a) && r.contains(b));
    assert!(
        has("study1_positive/image1.png", "empty file"),
        "{reasons:#?}"
    );
    assert!(has("study1_positive/image2.png", "PNG"), "{reasons:#?}");
    assert!(has("study1_positive/image3.png", "PNG"), "{reasons:#?}");
    assert!(
        has("patient00001/study1_positive/", "no readable images"),
        "{reasons:#?}"
    );
    assert!(has("patient00009", "missing"), "{reasons:#?}");
    // A repeated row is ignored, with a note (the image is stored once).
    assert!(!has("patient00002", "twice"), "{reasons:#?}");
    assert!(s.manifest.notes.iter().any(
        |n| n.contains("patient00002/study1_positive/image1.png") && n.contains("listed twice")
    ));
    assert!(has("XR_KNEE", "unknown study type"), "{reasons:#?}");
    assert!(has("etc/passwd", "escapes"), "{reasons:#?}");
    assert!(has("patient00011", "not 0 or 1"), "{reasons:#?}");
    assert!(s
        .manifest
        .notes
        .iter()
        .any(|n| n.contains("patient00003") && n.contains("CSV wins")));
    let store = Store::open(&out).unwrap();
    assert_eq!(store.studies.len(), 3);
    assert_eq!(
        store
            .studies
            .iter()
            .find(|s| s.patient == "patient00003")
            .unwrap()
            .label,
        Some(1)
    );
    // --strict fails; nothing usable fails; an unreadable root fails.
    expect_err(
        prep(&PrepConfig {
            strict: true,
            ..cfg(&root, &root.join("s2"), 20)
        }),
        "--strict",
    );
    expect_err(
        prep(&PrepConfig {
            study_types: vec![StudyType::Elbow],
            ..cfg(&root, &root.join("s3"), 20)
        }),
        "nothing usable",
    );
    expect_err(
        reader::read(&root.join("absent"), &StudyType::ALL),
        "cannot read MURA root",
    );
    expect_err(
        reader::read(&m.join("train"), &StudyType::ALL),
        "not a MURA root",
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn folder_tree_without_csvs_and_test_style_folders() {
    let root = tmp("folders");
    small_tree(&root, 20);
    let m = root.join("MURA-v1.1");
    let with_csv = reader::read(&root, &StudyType::ALL).unwrap();
    for f in [
        "train_image_paths.csv",
        "train_labeled_studies.csv",
        "valid_image_paths.csv",
        "valid_labeled_studies.csv",
    ] {
        std::fs::remove_file(m.join(f)).unwrap();
    }
    std::fs::create_dir_all(m.join("train/XR_WRIST/patient00005/study1_negative")).unwrap(); // empty
    std::fs::create_dir_all(m.join("train/XR_ANKLE/patient00006/study1_negative")).unwrap();
    write_gray(
        &m.join("test/XR_ELBOW/patient00007/study1/image1.png"),
        20,
        20,
        1,
    );
    // The root may be given as MURA-v1.1 itself.
    let ds = reader::read(&m, &StudyType::ALL).unwrap();
    let key = |d: &reader::Dataset| {
        let mut v: Vec<_> = d
            .studies
            .iter()
            .filter(|s| s.split != Split::Test)
            .map(|s| (s.path.clone(), s.label, s.images.clone()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(key(&ds), key(&with_csv));
    let reasons: Vec<String> = ds
        .skipped
        .iter()
        .map(|k| format!("{}: {}", k.path, k.reason))
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("patient00005") && r.contains("empty study folder")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("XR_ANKLE") && r.contains("unknown study type")),
        "{reasons:?}"
    );
    let t = ds.studies.iter().find(|s| s.split == Split::Test).unwrap();
    assert_eq!(
        (t.label, t.study_type, t.images.len()),
        (None, StudyType::Elbow, 1)
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn synth_is_mura_shaped_and_deterministic() {
    let root = tmp("synth");
    let c = SynthConfig {
        studies: 40,
        seed: 3,
        valid_fraction: 0.25,
    };
    let s = synth(&root.join("a"), &c, Progress::Quiet).unwrap();
    synth(&root.join("b"), &c, Progress::Quiet).unwrap();
    synth(
        &root.join("c"),
        &SynthConfig {
            seed: 4,
            ..c.clone()
        },
        Progress::Quiet,
    )
    .unwrap();
    assert_eq!(s.studies, 40);
    let ds = reader::read(&root.join("a"), &StudyType::ALL).unwrap();
    assert!(
        ds.skipped.is_empty() && ds.notes.is_empty(),
        "{:?} {:?}",
        ds.skipped,
        ds.notes
    );
    assert_eq!(ds.studies.len(), 40);
    assert_eq!(
        ds.studies
            .iter()
            .filter(|s| s.split == Split::Valid)
            .count(),
        10
    );
    for t in StudyType::ALL {
        assert!(ds.studies.iter().any(|s| s.study_type == t), "{t} missing");
    }
    assert!(ds.studies.iter().all(|s| (1..=5).contains(&s.images.len())));
    let abnormal = ds.studies.iter().filter(|s| s.label == Some(1)).count();
    assert!((10..=25).contains(&abnormal), "{abnormal} abnormal of 40");
    let mut same = true;
    let mut differs = false;
    for st in &ds.studies {
        for p in &st.images {
            let rel = p.strip_prefix("MURA-v1.1/").unwrap();
            let a = std::fs::read(root.join("a/MURA-v1.1").join(rel)).unwrap();
            same &= a == std::fs::read(root.join("b/MURA-v1.1").join(rel)).unwrap();
            differs |= std::fs::read(root.join("c/MURA-v1.1").join(rel)).map_or(true, |c| c != a);
            let g = decode_gray(&ds.file(p)).unwrap();
            assert!(
                (150..=512).contains(&g.width) && (150..=512).contains(&g.height),
                "{p}"
            );
        }
    }
    assert!(same, "same seed, different files");
    assert!(differs, "different seeds, same files");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn decode_formats_to_pil_gray() {
    let root = tmp("decode");
    let mut r = Rng::new(11);
    let (w, h) = (7u32, 5u32);
    let rgb: Vec<u8> = (0..w * h * 3).map(|_| r.below(256) as u8).collect();
    let p = root.join("rgb.png");
    image::save_buffer(&p, &rgb, w, h, image::ExtendedColorType::Rgb8).unwrap();
    let g = decode_gray(&p).unwrap();
    for (i, px) in rgb.chunks(3).enumerate() {
        let want = (0.299 * px[0] as f32 + 0.587 * px[1] as f32 + 0.114 * px[2] as f32) / 255.0;
        assert!((g.data[i] - want).abs() < 1e-6);
    }
    let rgba: Vec<u8> = (0..w * h * 4).map(|_| r.below(256) as u8).collect();
    image::save_buffer(&p, &rgba, w, h, image::ExtendedColorType::Rgba8).unwrap();
    let g = decode_gray(&p).unwrap();
    let want = (0.299 * rgba[4] as f32 + 0.587 * rgba[5] as f32 + 0.114 * rgba[6] as f32) / 255.0;
    assert!((g.data[1] - want).abs() < 1e-6, "alpha is ignored");
    let la: Vec<u8> = (0..w * h * 2).map(|_| r.below(256) as u8).collect();
    image::save_buffer(&p, &la, w, h, image::ExtendedColorType::La8).unwrap();
    assert_eq!(decode_gray(&p).unwrap().data[2], la[4] as f32 / 255.0);
    let v16: Vec<u16> = (0..w * h).map(|_| r.below(65536) as u16).collect();
    let bytes: Vec<u8> = v16.iter().flat_map(|v| v.to_ne_bytes()).collect();
    image::save_buffer(&p, &bytes, w, h, image::ExtendedColorType::L16).unwrap();
    let g = decode_gray(&p).unwrap();
    assert_eq!((g.width, g.height), (7, 5));
    for (a, &b) in g.data.iter().zip(&v16) {
        assert!((a - b as f32 / 65535.0).abs() < 1e-6);
    }
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn resize_matches_torch_bilinear() {
    // torch.nn.functional.interpolate([[0,1],[2,3]], size=4, mode="bilinear", align_corners=False)
    let img = GrayImage {
        width: 2,
        height: 2,
        data: vec![0.0, 1.0, 2.0, 3.0],
    };
    let want = [
        0.0, 0.25, 0.75, 1.0, 0.5, 0.75, 1.25, 1.5, 1.5, 1.75, 2.25, 2.5, 2.0, 2.25, 2.75, 3.0,
    ];
    let out = resize_bilinear(img, 4);
    for (a, b) in out.data.iter().zip(want) {
        assert!((a - b).abs() < 1e-6, "{:?}", out.data);
    }
    let mut r = Rng::new(2);
    let same = GrayImage {
        width: 9,
        height: 9,
        data: (0..81).map(|_| r.uniform() as f32).collect(),
    };
    assert_eq!(resize_bilinear(same.clone(), 9), same);
}

fn random_u8(n: usize, seed: u64) -> Vec<u8> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.below(256) as u8).collect()
}

#[test]
fn augmentation_properties() {
    let s = 37;
    let src = random_u8(s * s, 21);
    let mut out = vec![f32::NAN; s * s * 3];
    // Identity: rotation 0, no flip, same size reproduces the source (normalised).
    augment::image(&src, s, AugParams::IDENTITY, s, &mut out);
    let mut gray: Vec<f32> = src.iter().map(|&v| v as f32 / 255.0).collect();
    let want: Vec<f32> = gray
        .iter()
        .flat_map(|&g| (0..3).map(move |c| (g - MEAN[c]) / STD[c]))
        .collect();
    for (a, b) in out.iter().zip(&want) {
        assert!((a - b).abs() < 1e-5);
    }
    // A flip is an exact mirror.
    let mut flipped = vec![f32::NAN; s * s * 3];
    augment::image(
        &src,
        s,
        AugParams {
            flip: true,
            angle_deg: 0.0,
        },
        s,
        &mut flipped,
    );
    for y in 0..s {
        for x in 0..s {
            for c in 0..3 {
                assert_eq!(
                    flipped[(y * s + x) * 3 + c],
                    out[(y * s + s - 1 - x) * 3 + c]
                );
            }
        }
    }
    // 90 degrees turns the pixel grid (up to float rounding in sin/cos).
    let mut rot = vec![f32::NAN; s * s * 3];
    augment::image(
        &src,
        s,
        AugParams {
            flip: false,
            angle_deg: 90.0,
        },
        s,
        &mut rot,
    );
    let diffs: Vec<f32> = (0..s * s)
        .map(|i| {
            let (y, x) = (i / s, i % s);
            let a = rot[i * 3];
            let turned_cw = out[(x * s + s - 1 - y) * 3];
            let turned_ccw = out[((s - 1 - x) * s + y) * 3];
            (a - turned_cw).abs().min((a - turned_ccw).abs())
        })
        .collect();
    assert!(
        diffs.iter().all(|&d| d < 1e-2),
        "max diff {}",
        diffs.iter().cloned().fold(0.0, f32::max)
    );
    // Normalisation statistics: channel c of a constant image v is (v/255 - mean_c)/std_c.
    let v = 1 + Rng::new(8).below(254) as u8;
    let flat = vec![v; 64 * 64];
    let mut o = vec![f32::NAN; 32 * 32 * 3];
    augment::image(&flat, 64, AugParams::IDENTITY, 32, &mut o);
    for c in 0..3 {
        let mean = o.iter().skip(c).step_by(3).sum::<f32>() / (32 * 32) as f32;
        assert!((mean - (v as f32 / 255.0 - MEAN[c]) / STD[c]).abs() < 1e-4);
    }
    // Rotation keeps the centre fixed and fills corners with black.
    let mut o = vec![f32::NAN; 64 * 64 * 3];
    augment::image(
        &flat,
        64,
        AugParams {
            flip: false,
            angle_deg: 30.0,
        },
        64,
        &mut o,
    );
    assert!((o[(32 * 64 + 32) * 3] - (v as f32 / 255.0 - MEAN[0]) / STD[0]).abs() < 1e-4);
    assert!((o[0] - (0.0 - MEAN[0]) / STD[0]).abs() < 1e-5);
    assert!(o.iter().all(|x| x.is_finite()));
    gray.clear();
}

#[test]
fn loader_is_deterministic_and_covers_each_study_once() {
    let root = tmp("loader");
    synth(
        &root.join("syn"),
        &SynthConfig {
            studies: 30,
            seed: 5,
            valid_fraction: 0.3,
        },
        Progress::Quiet,
    )
    .unwrap();
    let out = root.join("store");
    prep(&cfg(&root.join("syn"), &out, 32)).unwrap();
    let store = Arc::new(Store::open(&out).unwrap());
    let base = LoaderConfig {
        batch_studies: 4,
        max_views: Some(2),
        image_size: 24,
        augment: Some(Augment {
            flip: true,
            max_rotation_deg: 30.0,
        }),
        seed: 9,
        shuffle: true,
        workers: 0,
        prefetch: 2,
    };
    let run = |workers: usize, epoch: u64| {
        let l = Loader::new(
            store.clone(),
            Split::Train,
            &StudyType::ALL,
            LoaderConfig {
                workers,
                ..base.clone()
            },
        )
        .unwrap();
        l.epoch(epoch).collect::<Vec<_>>()
    };
    let a = run(0, 1);
    assert_eq!(a, run(1, 1));
    assert_eq!(a, run(3, 1));
    let b = run(2, 2);
    assert_ne!(
        a.iter().map(|x| x.studies.clone()).collect::<Vec<_>>(),
        b.iter().map(|x| x.studies.clone()).collect::<Vec<_>>()
    );
    let l = Loader::new(store.clone(), Split::Train, &StudyType::ALL, base.clone()).unwrap();
    let mut seen: Vec<usize> = a.iter().flat_map(|x| x.studies.clone()).collect();
    seen.sort();
    assert_eq!(seen, l.studies());
    assert_eq!(a.len(), l.n_batches());
    for batch in &a {
        assert_eq!(batch.images.len(), batch.n_images * 24 * 24 * 3);
        assert!(batch.images.iter().all(|v| v.is_finite()));
        for (k, &st) in batch.studies.iter().enumerate() {
            let rec = &store.studies[st];
            assert_eq!(batch.labels[k], rec.label.unwrap() as f32);
            assert_eq!(batch.types[k], rec.study_type);
            assert_eq!(
                batch.view_study.iter().filter(|&&v| v == k).count(),
                rec.n_views.min(2)
            );
        }
    }
    assert!(a.iter().flat_map(|x| x.aug.clone()).any(|p| p.flip));
    // Eval: no augmentation, store order; stopping early does not hang.
    let e = Loader::new(
        store.clone(),
        Split::Valid,
        &StudyType::ALL,
        LoaderConfig {
            workers: 2,
            ..base.for_eval()
        },
    )
    .unwrap();
    let first = e.epoch(0).next().unwrap();
    assert!(first.aug.iter().all(|p| *p == AugParams::IDENTITY));
    assert_eq!(first.studies, e.studies()[..first.studies.len()]);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn cli_errors_are_one_line() {
    let exe = env!("CARGO_BIN_EXE_mura");
    let root = tmp("cli");
    let o = std::process::Command::new(exe)
        .args(["inspect"])
        .arg(root.join("none"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.starts_with("error: no store") && err.lines().count() == 1,
        "{err}"
    );
    let o = std::process::Command::new(exe)
        .args(["prep", "--mura-root"])
        .arg(root.join("none"))
        .arg("--out")
        .arg(root.join("s"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains("cannot read MURA root") && !err.contains("panicked"),
        "{err}"
    );
    let o = std::process::Command::new(exe)
        .args(["prep", "--study-types", "XR_KNEE", "--mura-root"])
        .arg(&root)
        .arg("--out")
        .arg(root.join("s"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown study type 'XR_KNEE'"));
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn prep_resize_area_averages_large_shrinks() {
    // Uniform noise shrunk 8x by 6x: area averaging leaves means of 48 pixels (std ~0.04);
    // plain bilinear reads only 4 neighbours per output pixel (std ~0.14).
    let (w, h) = (512, 384);
    let mut r = Rng::new(31);
    let img = GrayImage {
        width: w,
        height: h,
        data: (0..w * h).map(|_| r.uniform() as f32).collect(),
    };
    let std = |v: &[f32]| {
        let m = v.iter().sum::<f32>() / v.len() as f32;
        (v.iter().map(|x| (x - m).powi(2)).sum::<f32>() / v.len() as f32).sqrt()
    };
    let out = mura::data::image::resize_for_store(img.clone(), 64);
    assert_eq!((out.width, out.height), (64, 64));
    let aliased = resize_bilinear(img, 64);
    let (a, b) = (std(&out.data), std(&aliased.data));
    assert!(a < 0.06 && b > 0.1, "area std {a}, bilinear std {b}");
}

#[test]
fn an_evaluation_splits_a_study_of_many_views_and_scores_it_whole() {
    use mura::data::loader::EVAL_BATCH_PIXELS;
    use mura::eval::predict_split;
    use mura::loss::{weighted_bce, LossLevel};
    use mura::model::DenseNet;
    use mura::ops::Mode;
    let root = tmp("split");
    let m = root.join("MURA-v1.1");
    // Valid: a study of 11 views between two of 2 and 1; a side of 896 makes a batch 4 images.
    let studies = [
        ("valid/XR_HAND/patient00001/study1_negative", 2, 0),
        ("valid/XR_HAND/patient00002/study1_positive", 11, 1),
        ("valid/XR_WRIST/patient00003/study1_positive", 1, 1),
        ("train/XR_HAND/patient00004/study1_negative", 1, 0),
        ("train/XR_HAND/patient00005/study1_positive", 2, 1),
    ];
    for (k, (s, n, _)) in studies.iter().enumerate() {
        for v in 1..=*n {
            write_gray(
                &m.join(format!("{s}/image{v}.png")),
                20,
                20,
                (k * 20 + v) as u64,
            );
        }
    }
    let out = root.join("store");
    prep(&cfg(&root, &out, 16)).unwrap();
    let store = Arc::new(Store::open(&out).unwrap());
    let side = 896;
    let cap = EVAL_BATCH_PIXELS / (side * side);
    assert_eq!(cap, 4);
    let lc = LoaderConfig {
        batch_studies: 8,
        max_views: None,
        image_size: side,
        augment: None,
        seed: 0,
        shuffle: false,
        workers: 1,
        prefetch: 1,
    };
    let loader = Loader::new(store.clone(), Split::Valid, &StudyType::ALL, lc.clone()).unwrap();
    let batches: Vec<_> = loader.epoch(0).collect();
    let shape: Vec<(Vec<usize>, usize, bool)> = batches
        .iter()
        .map(|b| (b.studies.clone(), b.n_images, b.whole))
        .collect();
    let big = loader.studies()[1];
    assert_eq!(store.studies[big].n_views, 11);
    let (a, c) = (loader.studies()[0], loader.studies()[2]);
    assert_eq!(
        shape,
        vec![
            (vec![a], 2, true),
            (vec![big], 4, false),
            (vec![big], 4, false),
            (vec![big], 3, false),
            (vec![c], 1, true),
        ]
    );
    assert_eq!(loader.n_batches(), 5);
    let first = store.studies[big].first_image;
    let ids: Vec<usize> = batches[1..4]
        .iter()
        .flat_map(|b| b.image_ids.clone())
        .collect();
    assert_eq!(ids, (first..first + 11).collect::<Vec<_>>());

    // Scored as a whole: each study's probability is the mean over all its views, and the loss
    // is each study's own (or each view's), as if every study had its own batch.
    let spec = mura::spec::DenseNetSpec::custom(4, vec![2, 2], 8, 2).unwrap();
    let mut model = DenseNet::<f32>::new(spec, 3);
    for level in [LossLevel::Study, LossLevel::Image] {
        let got = predict_split(&mut model, &store, &loader, level).unwrap();
        let (mut loss, mut count) = (0.0, 0usize);
        for (p, &si) in got.studies.iter().zip(loader.studies()) {
            let b = mura::data::loader::build_batch(&store, &lc, 0, &[si]);
            let z = mura::net::forward_batch(&mut model, &b, Mode::Eval).unwrap();
            let z: Vec<f64> = z.iter().map(|&v| v as f64).collect();
            let want = z.iter().map(|&z| 1.0 / (1.0 + (-z).exp())).sum::<f64>() / z.len() as f64;
            assert_eq!(p.study, si);
            assert!(
                (p.probability - want).abs() < 1e-6,
                "{} vs {want}",
                p.probability
            );
            let rec = &store.studies[si];
            let (w0, w1) = store.loss_weights(rec.study_type);
            let y = f64::from(rec.label.unwrap());
            let views = vec![0; z.len()];
            let w = [(w0 as f64, w1 as f64)];
            let n = if level == LossLevel::Study {
                1
            } else {
                z.len()
            };
            loss += weighted_bce(&z, &views, &[y], &w, level).0 * n as f64;
            count += n;
        }
        let want = loss / count as f64;
        assert!(
            (got.loss - want).abs() < 1e-6,
            "{level:?}: {} vs {want}",
            got.loss
        );
    }
    std::fs::remove_dir_all(&root).unwrap();
}
