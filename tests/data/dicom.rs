//! The DICOM reader (`mura::data::dicom`) against pydicom, an independent implementation:
//! `scripts/dicom_cases.py` writes files with pydicom (every photometric interpretation, bit
//! depth, signedness, rescale, VOI window and transfer syntax mura reads that pydicom writes) and
//! copies the test files pydicom's wheel ships that mura reads, with pydicom's decode of each
//! after mura's documented transform; mura's decode must equal it. The shipped files mura does not
//! read must be refused in one line saying why. And hostile files made here (truncated, stated
//! sizes beyond the file or a cap, multi-frame, malformed RLE and JPEG) are refused, not a panic.
//!
//! pydicom comes from `MURA_TEST_PYTHON` (CI's venv, see `.ci/run`) or `python3`. With
//! `MURA_TEST_DICOM=1` (CI) its absence fails the test; without it the test says, past the test
//! harness's capture, that it did not run.

use crate::common::dicom::{el, encapsulated, file, text, EXPLICIT};
use crate::common::{tmp, Client};
use mura::data::dicom::decode_gray_bytes;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The largest |pydicom − mura| on a [0, 1] value: both compute in f64, mura rounds to f32.
const TOL: f32 = 1e-6;
/// For lossy JPEG colour: pydicom's decoder (libjpeg via pylibjpeg, or Pillow) and jpeg-decoder
/// convert YCbCr to RGB with different rounding.
const TOL_JPEG_COLOR: f32 = 2.5 / 255.0;

/// pydicom, which writes the files the DICOM reader is compared with and decodes them.
const PYDICOM: Client = Client {
    imports: "numpy, pydicom",
    required_by: "MURA_TEST_DICOM",
    unchecked: "the DICOM reader against pydicom",
};

/// The cases written by pydicom into a fresh folder, or None (said loudly) where there is no
/// Python with pydicom and `MURA_TEST_DICOM=1` does not require one.
fn pydicom_cases(test: &str) -> Option<PathBuf> {
    let python = PYDICOM.or_unchecked(test, &PYDICOM.probe())?;
    let dir = tmp(test);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/dicom_cases.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(&dir)
        .output()
        .expect("run scripts/dicom_cases.py");
    assert!(
        out.status.success(),
        "scripts/dicom_cases.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(dir)
}

#[test]
fn dicom_files_decode_as_pydicom_decodes_them() {
    let Some(dir) = pydicom_cases("dicom_files_decode_as_pydicom_decodes_them") else {
        return;
    };
    let cases = std::fs::read_to_string(dir.join("cases.txt")).unwrap();
    let mut failures = Vec::new();
    let mut n = 0;
    for line in cases.lines().filter(|l| !l.is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (name, rows, cols): (&str, usize, usize) =
            (f[0], f[1].parse().unwrap(), f[2].parse().unwrap());
        let bytes = std::fs::read(dir.join(format!("{name}.dcm"))).unwrap();
        let want: Vec<f32> = std::fs::read(dir.join(format!("{name}.f32")))
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        n += 1;
        let got = match decode_gray_bytes(&bytes) {
            Ok(g) => g,
            Err(e) => {
                failures.push(format!("{name}: {e:#}"));
                continue;
            }
        };
        if (got.height, got.width) != (rows, cols) || got.data.len() != want.len() {
            failures.push(format!(
                "{name}: {}x{} ({} values), pydicom {cols}x{rows} ({})",
                got.width,
                got.height,
                got.data.len(),
                want.len()
            ));
            continue;
        }
        let tol = if f[3] == "jpeg-color" {
            TOL_JPEG_COLOR
        } else {
            TOL
        };
        let (i, d) = got
            .data
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .enumerate()
            .fold((0, 0f32), |m, (i, d)| if d > m.1 { (i, d) } else { m });
        if d > tol {
            failures.push(format!(
                "{name}: pixel {i}: mura {}, pydicom {} (|diff| {d} > {tol})",
                got.data[i], want[i]
            ));
        }
    }
    assert!(n > 100, "only {n} cases in {}", dir.display());
    assert!(
        failures.is_empty(),
        "{} of {n} cases differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn dicom_files_mura_does_not_read_are_refused_in_one_line() {
    let Some(dir) = pydicom_cases("dicom_files_mura_does_not_read_are_refused_in_one_line") else {
        return;
    };
    let refused = std::fs::read_to_string(dir.join("refused.txt")).unwrap();
    let mut n = 0;
    for line in refused.lines().filter(|l| !l.is_empty()) {
        let (name, why) = line.split_once(' ').unwrap();
        let bytes = std::fs::read(dir.join(format!("{name}.dcm"))).unwrap();
        let err = format!("{:#}", decode_gray_bytes(&bytes).expect_err(name));
        assert!(err.contains(why), "{name}: {err:?} does not say {why:?}");
        assert!(!err.contains('\n'), "{name}: {err:?} is not one line");
        n += 1;
    }
    assert!(n >= 6, "only {n} refused files");
}

// Hostile files, made here.

fn refused(what: &str, bytes: &[u8], says: &str) {
    let r = std::panic::catch_unwind(|| decode_gray_bytes(bytes));
    let r = r.unwrap_or_else(|_| panic!("{what}: the reader panicked"));
    let err = format!("{:#}", r.expect_err(what));
    assert!(err.contains(says), "{what}: {err:?} does not say {says:?}");
    assert!(!err.contains('\n'), "{what}: {err:?} is not one line");
}

#[test]
fn a_well_formed_file_made_here_decodes() {
    let px: Vec<u8> = (0..12).map(|i| i * 20).collect();
    let f = file(EXPLICIT, 3, 4, &[el(0x7FE0, 0x0010, b"OB", &px)]);
    let g = decode_gray_bytes(&f).unwrap();
    assert_eq!((g.width, g.height), (4, 3));
    let want: Vec<f32> = (0..12).map(|i| i as f32 / 11.0).collect();
    for (a, b) in g.data.iter().zip(&want) {
        assert!((a - b).abs() < 1e-6, "{:?}", g.data);
    }
}

#[test]
fn hostile_dicom_files_are_refused_with_one_clear_line() {
    let px = vec![7u8; 12];
    let good = file(EXPLICIT, 3, 4, &[el(0x7FE0, 0x0010, b"OB", &px)]);
    // Truncated anywhere: an error, never a panic.
    for cut in 0..good.len() {
        let r = std::panic::catch_unwind(|| decode_gray_bytes(&good[..cut]));
        assert!(r.is_ok_and(|r| r.is_err()), "truncated at {cut}");
    }
    refused("not DICOM", b"hello", "no DICM magic");
    refused(
        "pixel data short",
        &file(EXPLICIT, 3, 4, &[el(0x7FE0, 0x0010, b"OB", &px[..6])]),
        "DICOM pixel data holds 6 bytes",
    );
    let mut huge = file(EXPLICIT, 3, 4, &[el(0x7FE0, 0x0010, b"OB", &px)]);
    let at = huge.len() - 12 - 4;
    huge[at..at + 4].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    refused(
        "stated length beyond the file",
        &huge,
        "DICOM element (7FE0,0010) states 4294967280 bytes, the file holds 12 after it",
    );
    refused(
        "a side beyond the cap",
        &file(EXPLICIT, 9000, 4, &[el(0x7FE0, 0x0010, b"OB", &px)]),
        "DICOM image is 4x9000: mura reads 1 to 8192 pixels on a side",
    );
    refused(
        "no pixels",
        &file(EXPLICIT, 0, 4, &[el(0x7FE0, 0x0010, b"OB", &px)]),
        "DICOM image is 4x0",
    );
    refused(
        "multi-frame",
        &file(
            EXPLICIT,
            3,
            2,
            &[
                el(0x0028, 0x0008, b"IS", &text("2")),
                el(0x7FE0, 0x0010, b"OB", &px),
            ],
        ),
        "multi-frame DICOM (2 frames) is refused: mura reads one 2-D image per file; split the \
         frames into single-frame files",
    );
    refused(
        "JPEG 2000",
        &file("1.2.840.10008.1.2.4.90", 3, 4, &[encapsulated(&[b"xx"])]),
        "DICOM transfer syntax 1.2.840.10008.1.2.4.90 (JPEG 2000 Lossless) is not read: mura \
         reads implicit/explicit VR little endian, deflated, RLE lossless and JPEG \
         baseline/lossless",
    );
    refused(
        "unknown syntax",
        &file("1.2.3.4", 3, 4, &[el(0x7FE0, 0x0010, b"OB", &px)]),
        "DICOM transfer syntax 1.2.3.4 (unknown) is not read",
    );
    let rle = "1.2.840.10008.1.2.5";
    refused(
        "RLE header short",
        &file(rle, 3, 4, &[encapsulated(&[b"ab"])]),
        "64-byte header",
    );
    let mut header = vec![0u8; 64];
    header[..4].copy_from_slice(&15u32.to_le_bytes());
    refused(
        "RLE 15 segments",
        &file(rle, 3, 4, &[encapsulated(&[&header])]),
        "15 segments",
    );
    header[..4].copy_from_slice(&1u32.to_le_bytes());
    header[4..8].copy_from_slice(&1000u32.to_le_bytes());
    refused(
        "RLE offset beyond",
        &file(rle, 3, 4, &[encapsulated(&[&header])]),
        "segment 0 spans",
    );
    header[4..8].copy_from_slice(&64u32.to_le_bytes());
    let mut short = header.clone();
    short.extend([2u8, 1, 2, 3]); // a literal run of 3: 3 of 12 bytes
    refused(
        "RLE short",
        &file(rle, 3, 4, &[encapsulated(&[&short])]),
        "decodes to 3 bytes",
    );
    let mut cut = header.clone();
    cut.extend([5u8, 1]); // a literal run of 6 with 1 byte
    refused(
        "RLE cut run",
        &file(rle, 3, 4, &[encapsulated(&[&cut])]),
        "inside a literal run",
    );
    let mut ok = header.clone();
    ok.extend([0xF5u8, 9]); // a repeat run of 12
    assert!(decode_gray_bytes(&file(rle, 3, 4, &[encapsulated(&[&ok])])).is_ok());
    let jpeg = "1.2.840.10008.1.2.4.50";
    refused(
        "JPEG garbage",
        &file(jpeg, 3, 4, &[encapsulated(&[b"\xFF\xD8\xFF\xC0"])]),
        "JPEG",
    );
    // A deflate bomb's worth of zeros is capped; a stream that is not deflate is one line.
    refused(
        "not deflate",
        &file("1.2.840.10008.1.2.1.99", 3, 4, &[vec![0xFF; 16]]),
        "DICOM",
    );
    // Nested sequences beyond the cap.
    let mut nest = Vec::new();
    for _ in 0..40 {
        nest.extend([0x08, 0x00, 0x15, 0x11]); // (0008,1115) SQ, undefined length
        nest.extend(b"SQ\0\0");
        nest.extend(u32::MAX.to_le_bytes());
        nest.extend([0xFE, 0xFF, 0x00, 0xE0]);
        nest.extend(u32::MAX.to_le_bytes());
    }
    let mut f = vec![0u8; 128];
    f.extend(b"DICM");
    let mut uid = EXPLICIT.as_bytes().to_vec();
    uid.push(0);
    f.extend(el(0x0002, 0x0010, b"UI", &uid));
    f.extend(nest);
    refused("deep nesting", &f, "deeper than 16 levels");
}

/// What the fuzzer found: an element whose VR dicom-rs does not know, which it reads (as UN) with
/// a 4-byte length of 1 GiB that a walk reading 2-byte lengths for unknown VRs did not check, so
/// dicom-rs allocated the gigabyte before failing; and elements out of tag order, on which
/// dicom-rs allocated 4 GiB reading a 698-byte file; and a sequence delimiter outside any
/// sequence stating a length of 4 GiB, which dicom-rs allocated.
#[test]
fn fuzz_regressions_are_refused_before_dicom_rs_allocates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/dicom");
    let f = std::fs::read(dir.join("unknown-vr-4-byte-length-1gb.dcm")).unwrap();
    refused(
        "unknown VR",
        &f,
        "DICOM element (0020,0060) states 1075838976 bytes, the file holds 1912 after it",
    );
    let f = std::fs::read(dir.join("out-of-order-rows-4gb.dcm")).unwrap();
    refused(
        "out of order",
        &f,
        "DICOM data set is out of order: element (0028,0010) after (0028,7F01)",
    );
    let f = std::fs::read(dir.join("top-level-delimiter-with-4gb-length.dcm")).unwrap();
    refused(
        "stray delimiter",
        &f,
        "DICOM data set has an unexpected delimiter (FFFE,E0DD) at byte 362",
    );
}
