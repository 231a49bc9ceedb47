//! Two paths that must agree (issue 21, class 4): `mura predict` on a study's PNG files scores
//! what `eval` and training's validation score on the store prepped from them, on the same
//! checkpoint, because a checkpoint records its preprocessing and predict runs it; and CAM
//! files are unique per study and view and never replace a file.

use crate::common::{mura_bounded, one_error_line, run_ok, s, tmp, TINY};
use mura::weights::{load_safetensors, save_safetensors};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn fails(args: &[&str]) -> String {
    let run = mura_bounded(args, &[], 4 << 30, 60);
    one_error_line(&run, &format!("mura {args:?}"))
}

/// A synthetic set (PNGs of 150 to 512 px, gray and RGB, 8 and 16 bit) prepped at 32x32, and a
/// run of the tiny net trained on it at 48x48 (so a PNG is area-averaged, rounded to u8, then
/// resampled): (source, store, run).
fn trained() -> &'static (PathBuf, PathBuf, PathBuf) {
    static R: OnceLock<(PathBuf, PathBuf, PathBuf)> = OnceLock::new();
    R.get_or_init(|| {
        let d = tmp("data");
        let (src, store) = crate::common::prepped(&d, 30, 11);
        let run = d.join("run");
        let mut args = vec!["train", "--store", s(&store), "--out", s(&run), "--quiet"];
        args.extend_from_slice(TINY);
        args.extend(["--image-size", "48", "--epochs", "1", "--max-batches", "2"]);
        run_ok(&args);
        (src, store, run)
    })
}

/// `mura predict` of `studies` with `weights` (and `extra` options): per study its JSON line.
fn predict(
    weights: &Path,
    studies: &[PathBuf],
    extra: &[&str],
) -> (Vec<serde_json::Value>, String) {
    let mut args = vec!["predict", "--weights", s(weights)];
    args.extend_from_slice(extra);
    args.extend(studies.iter().map(|p| s(p)));
    let (out, err) = run_ok(&args);
    let lines = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (lines, err)
}

/// The validation studies of the run's store, as `val_predictions.csv` lists them: (path,
/// probability), and their folders in the source.
fn validation() -> (Vec<(String, f64)>, Vec<PathBuf>) {
    let (src, _, run) = trained();
    let csv = std::fs::read_to_string(run.join("val_predictions.csv")).unwrap();
    let rows: Vec<(String, f64)> = csv
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0].to_string(), f[3].parse().unwrap())
        })
        .collect();
    let folders = rows.iter().map(|(p, _)| src.join(p)).collect();
    (rows, folders)
}

#[test]
fn predict_scores_a_study_as_eval_does_on_its_store() {
    let (_, store, run) = trained();
    let best = run.join("best.safetensors");
    let (rows, folders) = validation();
    assert!(rows.len() >= 5, "{rows:?}");
    let (lines, err) = predict(&best, &folders, &[]);
    assert!(err.is_empty(), "{err}");
    // Training's validation (eval's `predict_split` on the store) and predict on the PNGs.
    assert_eq!(
        lines.len(),
        rows.len(),
        "one predict line per validation study"
    );
    for ((path, want), line) in rows.iter().zip(&lines) {
        let got = line["probability"].as_f64().unwrap();
        assert!(
            (got - want).abs() < 1e-6,
            "{path}: predict {got}, eval {want}"
        );
    }
    // eval's decisions on the store are predict's.
    let out = tmp("eval");
    run_ok(&[
        "eval",
        "--store",
        s(store),
        "--checkpoint",
        s(&best),
        "--out",
        s(&out),
    ]);
    let csv = std::fs::read_to_string(out.join("predictions.csv")).unwrap();
    assert_eq!(csv.lines().count(), lines.len(), "{csv}");
    for (row, line) in csv.lines().zip(&lines) {
        let abnormal = line["abnormal"].as_bool().unwrap();
        assert_eq!(
            row.rsplit_once(',').unwrap().1,
            if abnormal { "1" } else { "0" },
            "{row}"
        );
    }
}

/// A copy of `from` at `to` with its metadata edited by `edit`.
fn with_metadata(
    from: &Path,
    to: &Path,
    edit: impl FnOnce(&mut std::collections::HashMap<String, String>),
) {
    let mut ck = load_safetensors(from).unwrap();
    edit(&mut ck.metadata);
    save_safetensors(to, &ck.state_dict, &ck.metadata).unwrap();
}

#[test]
fn checkpoints_record_their_preprocessing_and_older_ones_predict_alike() {
    let (_, _, run) = trained();
    let best = run.join("best.safetensors");
    let meta = load_safetensors(&best).unwrap().metadata;
    assert_eq!(
        meta["preprocess"],
        r#"{"store_size":32,"resize":"area-bilinear-u8"}"#
    );
    assert_eq!(meta["image_size"], "48");
    let (_, folders) = validation();
    let studies = &folders[..3];
    let (want, _) = predict(&best, studies, &[]);
    let d = tmp("older");
    // An earlier mura's checkpoint: no record, a store identity `<pixels>-<N>x<side>`.
    let older = d.join("older.safetensors");
    with_metadata(&best, &older, |m| {
        m.remove("preprocess");
        let id = m["store"].clone();
        let (pixels, rest) = id.split_once('-').unwrap();
        let old = format!("{pixels}-{}", rest.split_once('-').unwrap().1);
        m.insert("store".into(), old);
    });
    let (got, err) = predict(&older, studies, &[]);
    assert_eq!(got, want);
    assert!(err.is_empty(), "{err}");
    // A checkpoint of another tool records nothing: the note says what predict does (a store of
    // the input's side), which is what a checkpoint recording that store gives.
    let foreign = d.join("foreign.safetensors");
    with_metadata(&best, &foreign, |m| m.clear());
    let mut args = TINY.to_vec();
    args.extend(["--image-size", "48"]);
    let (got, err) = predict(&foreign, studies, &args);
    assert!(
        err.contains("records no preprocessing (not a mura checkpoint)")
            && err.contains("as `mura prep --size 48` would store them"),
        "{err}"
    );
    let at48 = d.join("at48.safetensors");
    with_metadata(&best, &at48, |m| {
        m.insert(
            "preprocess".into(),
            r#"{"store_size":48,"resize":"area-bilinear-u8"}"#.into(),
        );
    });
    assert_eq!(got, predict(&at48, studies, &[]).0);
    assert_ne!(got, want);
    // A record this mura cannot run is refused.
    let unknown = d.join("unknown.safetensors");
    with_metadata(&best, &unknown, |m| {
        m.insert(
            "preprocess".into(),
            r#"{"store_size":32,"resize":"lanczos"}"#.into(),
        );
    });
    let e = fails(&["predict", "--weights", s(&unknown), s(&studies[0])]);
    assert!(e.contains("the preprocessing in its metadata"), "{e}");
}

/// The names in the folder `d`, sorted.
fn names(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn cam_files_are_unique_per_study_and_view_and_never_replace_a_file() {
    let (_, _, run) = trained();
    let best = run.join("best.safetensors");
    let (_, folders) = validation();
    let d = tmp("cam");
    // Two studies whose paths differ only where a file name cannot: `x/a/b` and `x/a_b`.
    let (one, two) = (d.join("x/a/b"), d.join("x/a_b"));
    for (study, from) in [(&one, &folders[0]), (&two, &folders[1])] {
        std::fs::create_dir_all(study).unwrap();
        for v in std::fs::read_dir(from).unwrap() {
            let v = v.unwrap();
            std::fs::copy(v.path(), study.join(v.file_name())).unwrap();
        }
    }
    let views = |p: &Path| std::fs::read_dir(p).unwrap().count();
    let cams = d.join("cams");
    let studies = [one.clone(), two.clone()];
    predict(&best, &studies, &["--cam", s(&cams)]);
    let written = names(&cams);
    assert_eq!(written.len(), views(&one) + views(&two), "{written:?}");
    // Again into the same folder: refused before any work, the files as they were.
    let bytes: Vec<Vec<u8>> = written
        .iter()
        .map(|n| std::fs::read(cams.join(n)).unwrap())
        .collect();
    let args = [
        "predict",
        "--weights",
        s(&best),
        "--cam",
        s(&cams),
        s(&one),
        s(&two),
    ];
    let run = mura_bounded(&args, &[], 4 << 30, 60);
    let e = one_error_line(&run, "predict --cam again");
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    assert!(
        e.contains("already exists; refusing to replace it: pass an empty or new --cam folder"),
        "{e}"
    );
    assert_eq!(written.len(), bytes.len());
    for (n, b) in written.iter().zip(&bytes) {
        assert_eq!(&std::fs::read(cams.join(n)).unwrap(), b, "{n}");
    }
    // A user's file of that very name in another folder stays as it was.
    let mine = d.join("mine");
    std::fs::create_dir_all(&mine).unwrap();
    std::fs::write(mine.join(&written[0]), "my notes").unwrap();
    let e = fails(&[
        "predict",
        "--weights",
        s(&best),
        "--cam",
        s(&mine),
        s(&one),
        s(&two),
    ]);
    assert!(e.contains("refusing to replace it"), "{e}");
    assert_eq!(names(&mine), [written[0].clone()]);
    assert_eq!(
        std::fs::read_to_string(mine.join(&written[0])).unwrap(),
        "my notes"
    );
    // The same study twice would write its files twice.
    let e = fails(&[
        "predict",
        "--weights",
        s(&best),
        "--cam",
        s(&d.join("c2")),
        s(&one),
        s(&one),
    ]);
    assert!(e.contains("would write the same CAM file"), "{e}");
}
