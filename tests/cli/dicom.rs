//! DICOM views as a user hands them to `mura predict` and `mura prep`: a study folder of `.dcm`
//! files scores as the same views saved as PNG; a file with the `DICM` magic is read whatever its
//! name; a MURA tree of `.dcm` studies preps into the store its PNG twin preps into; and hostile
//! DICOM files (truncated, stated sizes beyond the file, a transfer syntax not read,
//! multi-frame) each end the command with one error line.

use crate::common::dicom::{el, file, text, EXPLICIT};
use crate::common::{mura_bounded, one_error_line, run_ok, s, tmp};
use mura::model::DenseNet;
use mura::spec::DenseNetSpec;
use std::path::{Path, PathBuf};

const MEM: u64 = 4 << 30;
const SECS: u64 = 60;

/// A `rows` x `cols` 8-bit view of a smooth pattern and noise.
fn pixels(rows: usize, cols: usize, seed: u32) -> Vec<u8> {
    (0..rows * cols)
        .map(|i| {
            let (y, x) = ((i / cols) as u32, (i % cols) as u32);
            ((x * 3 + y * 5 + seed * 17 + (x * y * (seed + 1)) % 23) % 256) as u8
        })
        .collect()
}

/// The view as DICOM whose gray is its PNG's: 8-bit MONOCHROME2 with the LINEAR_EXACT window
/// 127.5 / 255, which maps a stored value v to v / 255, as a PNG's 8-bit gray is read.
fn dicom_view(px: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    file(
        EXPLICIT,
        rows as u16,
        cols as u16,
        &[
            el(0x0028, 0x1050, b"DS", &text("127.5")),
            el(0x0028, 0x1051, b"DS", &text("255")),
            el(0x0028, 0x1056, b"CS", &text("LINEAR_EXACT")),
            el(0x7FE0, 0x0010, b"OB", px),
        ],
    )
}

fn png_view(px: &[u8], rows: usize, cols: usize, path: &Path) {
    image::GrayImage::from_raw(cols as u32, rows as u32, px.to_vec())
        .unwrap()
        .save(path)
        .unwrap();
}

/// A tiny random model's checkpoint at 32 px.
fn checkpoint(d: &Path) -> PathBuf {
    let spec = DenseNetSpec::custom(4, vec![2, 2], 8, 2).unwrap();
    let model = DenseNet::<f32>::new(spec, 25);
    let ck = d.join("tiny.safetensors");
    let input = mura::checkpoint::Input {
        preprocess: mura::data::image::Preprocess::prep(32),
        image_size: 32,
    };
    mura::checkpoint::save_model(&ck, &model, "test", input).unwrap();
    ck
}

fn probability(line: &str) -> f64 {
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    v["probability"].as_f64().unwrap()
}

#[test]
fn predict_scores_dicom_views_as_the_same_views_in_png() {
    let d = tmp("predict");
    let ck = checkpoint(&d);
    let (dcm, png) = (d.join("study_dcm"), d.join("study_png"));
    std::fs::create_dir_all(&dcm).unwrap();
    std::fs::create_dir_all(&png).unwrap();
    for (i, (rows, cols)) in [(40, 52), (64, 48), (33, 33)].into_iter().enumerate() {
        let px = pixels(rows, cols, i as u32);
        std::fs::write(
            dcm.join(format!("view{i}.dcm")),
            dicom_view(&px, rows, cols),
        )
        .unwrap();
        png_view(&px, rows, cols, &png.join(format!("view{i}.png")));
    }
    let (from_dcm, _) = run_ok(&["predict", "--weights", s(&ck), s(&dcm)]);
    let (from_png, _) = run_ok(&["predict", "--weights", s(&ck), s(&png)]);
    let (a, b) = (probability(&from_dcm), probability(&from_png));
    assert!((a - b).abs() < 1e-6, "DICOM {from_dcm} vs PNG {from_png}");
    let v: serde_json::Value = serde_json::from_str(&from_dcm).unwrap();
    assert_eq!(
        v["views"].as_array().map(|v| v.len()),
        Some(3),
        "{from_dcm}"
    );

    // One file with the DICM magic, whatever its name, is a one-view study.
    let odd = d.join("view-without-extension");
    std::fs::copy(dcm.join("view0.dcm"), &odd).unwrap();
    let (one, _) = run_ok(&["predict", "--weights", s(&ck), s(&odd)]);
    let (one_png, _) = run_ok(&["predict", "--weights", s(&ck), s(&png.join("view0.png"))]);
    assert!((probability(&one) - probability(&one_png)).abs() < 1e-6);
}

#[test]
fn predict_refuses_hostile_dicom_views_in_one_line() {
    let d = tmp("hostile");
    let ck = checkpoint(&d);
    let px = pixels(8, 8, 1);
    let good = dicom_view(&px, 8, 8);
    let mut huge = good.clone();
    let at = huge.len() - px.len() - 4;
    huge[at..at + 4].copy_from_slice(&0xFFFF_FF00u32.to_le_bytes());
    let multi = file(
        EXPLICIT,
        4,
        8,
        &[
            el(0x0028, 0x0008, b"IS", &text("2")),
            el(0x7FE0, 0x0010, b"OB", &px),
        ],
    );
    let j2k = file(
        "1.2.840.10008.1.2.4.91",
        8,
        8,
        &[el(0x7FE0, 0x0010, b"OB", &px)],
    );
    let big = file(EXPLICIT, 60000, 60000, &[el(0x7FE0, 0x0010, b"OB", &px)]);
    let cases: [(&str, Vec<u8>, &str); 5] = [
        (
            "truncated",
            good[..good.len() - 20].to_vec(),
            "DICOM element (7FE0,0010) states 64 bytes, the file holds 44 after it",
        ),
        ("huge-length", huge, "states 4294967040 bytes"),
        (
            "multi-frame",
            multi,
            "multi-frame DICOM (2 frames) is refused",
        ),
        (
            "jpeg2000",
            j2k,
            "DICOM transfer syntax 1.2.840.10008.1.2.4.91 (JPEG 2000) is not read",
        ),
        (
            "too-big",
            big,
            "DICOM image is 60000x60000: mura reads 1 to 8192 pixels on a side",
        ),
    ];
    for (name, bytes, says) in cases {
        let study = d.join(name);
        std::fs::create_dir_all(&study).unwrap();
        std::fs::write(study.join("view1.dcm"), &bytes).unwrap();
        let run = mura_bounded(&["predict", "--weights", s(&ck), s(&study)], &[], MEM, SECS);
        let line = one_error_line(&run, name);
        assert!(
            line.contains(says) && line.contains("view1.dcm"),
            "{name}: {line}"
        );
    }
}

#[test]
fn prep_reads_a_mura_tree_of_dicom_studies_as_its_png_twin() {
    let d = tmp("prep");
    let mut stores = Vec::new();
    for ext in ["dcm", "png"] {
        let root = d.join(ext);
        for (split, studies) in [("train", 3), ("valid", 2)] {
            for k in 0..studies {
                let label = if k % 2 == 0 { "positive" } else { "negative" };
                let study = root.join(format!(
                    "MURA-v1.1/{split}/XR_WRIST/patient{k:05}/study1_{label}"
                ));
                std::fs::create_dir_all(&study).unwrap();
                for v in 0..2 {
                    let (rows, cols) = (30 + 7 * v, 40 - 3 * k);
                    let px = pixels(rows, cols, (k * 2 + v) as u32);
                    let path = study.join(format!("image{}.{ext}", v + 1));
                    match ext {
                        "dcm" => std::fs::write(&path, dicom_view(&px, rows, cols)).unwrap(),
                        _ => png_view(&px, rows, cols, &path),
                    }
                }
            }
        }
        let store = d.join(format!("store-{ext}"));
        run_ok(&[
            "prep",
            "--mura-root",
            s(&root),
            "--out",
            s(&store),
            "--size",
            "16",
            "--strict",
        ]);
        stores.push(store);
    }
    let gen = |i: usize, f: &str| std::fs::read(stores[i].join("gen-1").join(f)).unwrap();
    assert!(
        gen(0, "images.bin") == gen(1, "images.bin"),
        "the stores' images differ"
    );
    for f in ["index.json", "manifest.json"] {
        // They name the source files (.dcm or .png) and the source folder.
        let text = |i: usize| String::from_utf8(gen(i, f)).unwrap();
        let dcm = text(0)
            .replace(".dcm", ".png")
            .replace(s(&d.join("dcm")), s(&d.join("png")));
        assert_eq!(dcm, text(1), "{f}");
    }
}
