//! Loaded data that is not what it claims (issue 21, class 3), met through the commands a user
//! runs: weights with values no trained model holds (NaN, ±∞, a negative running variance) and
//! scores that overflow are one error line, never a `null` probability or an AUROC of NaNs; a
//! store relabelled since a run was trained is refused on resume; a labelled-studies CSV that
//! repeats or contradicts itself is reported as it is handled; a prep never commits a store
//! its own reader refuses; an unlabelled training study is named before training starts.

use crate::common::{mura_bounded, one_error_line, run_ok, s, tmp, Bounded, TINY};
use mura::weights::{load_safetensors, save_safetensors, TensorData};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const MEM: u64 = 4 << 30;
const SECS: u64 = 60;

/// Runs mura bounded; its one error line (exit 1).
fn fails(args: &[&str]) -> String {
    let run: Bounded = mura_bounded(args, &[], MEM, SECS);
    let line = one_error_line(&run, &format!("mura {args:?}"));
    println!("mura {} ({:.2} s): {line}", args[0], run.seconds);
    line
}

/// A small synthetic set prepped at 32x32, shared: (source, store).
fn dataset() -> &'static (PathBuf, PathBuf) {
    static D: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    D.get_or_init(|| crate::common::prepped(&tmp("data"), 16, 7))
}

fn train_args<'a>(store: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["train", "--store", store, "--out", out, "--quiet"];
    a.extend_from_slice(TINY);
    a.extend_from_slice(&["--image-size", "32", "--epochs", "1", "--max-batches", "1"]);
    a.extend_from_slice(extra);
    a
}

/// A run of the tiny net on the shared store, trained once.
fn trained() -> &'static PathBuf {
    static R: OnceLock<PathBuf> = OnceLock::new();
    R.get_or_init(|| {
        let run = tmp("run").join("run");
        run_ok(&train_args(s(&dataset().1), s(&run), &[]));
        run
    })
}

/// A copy of the folder `from` at `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        match e.file_type().unwrap().is_dir() {
            true => copy_dir(&e.path(), &to.join(e.file_name())),
            false => drop(std::fs::copy(e.path(), to.join(e.file_name())).unwrap()),
        }
    }
}

/// The names in the folder `d`, sorted.
fn names(d: &Path) -> Vec<std::ffi::OsString> {
    let mut v: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    v.sort();
    v
}

/// The safetensors file `from` written to `to` with the first element of the tensor `name` set
/// to `value` (metadata kept).
fn poke(from: &Path, to: &Path, name: &str, value: f32) {
    let mut ck = load_safetensors(from).unwrap();
    let t = ck.state_dict.tensors.iter_mut().find(|t| t.name == name);
    match &mut t.unwrap_or_else(|| panic!("no tensor {name}")).data {
        TensorData::F32(v) => v[0] = value,
        TensorData::I64(_) => panic!("{name} is not f32"),
    }
    save_safetensors(to, &ck.state_dict, &ck.metadata).unwrap();
}

/// A validation study folder of the shared set.
fn a_study() -> PathBuf {
    let valid = dataset().0.join("MURA-v1.1/valid");
    let t = std::fs::read_dir(valid)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let p = std::fs::read_dir(t)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::read_dir(p)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
}

const BAD_VALUES: [(&str, f32, &str); 4] = [
    ("features.conv0.weight", f32::NAN, "holds NaN (element 0)"),
    ("classifier.weight", f32::INFINITY, "holds inf (element 0)"),
    (
        "features.norm0.running_var",
        -1.0,
        "holds a negative variance, -1 (element 0)",
    ),
    (
        "features.norm0.running_var",
        f32::NAN,
        "holds NaN (element 0)",
    ),
];

#[test]
fn weights_no_trained_model_holds_are_refused_by_every_command() {
    let (_, store) = dataset();
    let best = trained().join("best.safetensors");
    let study = a_study();
    for (i, (key, value, want)) in BAD_VALUES.into_iter().enumerate() {
        let d = tmp(&format!("bad-{i}"));
        let ck = d.join("bad.safetensors");
        poke(&best, &ck, key, value);
        let what = format!("key '{key}' {want}");
        let e = fails(&["predict", "--weights", s(&ck), s(&study)]);
        assert!(
            e.contains(&what) && e.contains("no trained model has"),
            "{e}"
        );
        let e = fails(&["eval", "--store", s(store), "--checkpoint", s(&ck)]);
        assert!(e.contains(&what), "{e}");
        // Fine-tuning from it, and resuming a run whose last model holds it.
        let run = d.join("init");
        let e = fails(&train_args(s(store), s(&run), &["--init", s(&ck)]));
        assert!(e.contains(&what), "{e}");
        assert!(!run.join("last.safetensors").exists());
        let run = d.join("resume");
        copy_dir(trained(), &run);
        poke(
            &trained().join("last.safetensors"),
            &run.join("last.safetensors"),
            key,
            value,
        );
        let before = names(&run);
        let e = fails(&["train", "--resume", s(&run), "--epochs", "2", "--quiet"]);
        assert!(e.contains(&what), "{e}");
        assert_eq!(names(&run), before);
    }
}

#[test]
fn imagenet_weights_with_bad_values_are_refused_in_both_formats() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let d = tmp("imagenet");
    let st = d.join("w.safetensors");
    poke(
        &fixtures.join("tiny_expected.safetensors"),
        &st,
        "features.norm0.running_var",
        -3.0,
    );
    // The legacy .pth of the same weights, its norm0 variances (stored raw) made negative.
    let ck = load_safetensors(&fixtures.join("tiny_expected.safetensors")).unwrap();
    let var = ck.state_dict.get("features.norm0.running_var").unwrap();
    let TensorData::F32(v) = &var.data else {
        panic!()
    };
    let raw: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut pth = std::fs::read(fixtures.join("tiny_legacy.pth")).unwrap();
    let at: Vec<usize> = (0..pth.len() - raw.len())
        .filter(|&i| pth[i..i + raw.len()] == raw[..])
        .collect();
    assert_eq!(at.len(), 1, "norm0's variances appear once in the .pth");
    pth[at[0]..at[0] + 4].copy_from_slice(&(-3f32).to_le_bytes());
    let pth_file = d.join("w.pth");
    std::fs::write(&pth_file, pth).unwrap();
    for file in [st, pth_file] {
        let init = format!("imagenet:{}", s(&file));
        let run = d.join("run");
        let e = fails(&train_args(s(&dataset().1), s(&run), &["--init", &init]));
        assert!(
            e.contains("key 'features.norm0.running_var' holds a negative variance, -3"),
            "{e}"
        );
    }
}

#[test]
fn optimiser_moments_no_run_writes_are_refused() {
    let optim = "last.optim-1.safetensors";
    for (i, (key, value)) in [
        ("adam.m", f32::NAN),
        ("adam.v", -1.0),
        ("adam.v", f32::INFINITY),
    ]
    .into_iter()
    .enumerate()
    {
        let run = tmp(&format!("moments-{i}")).join("run");
        copy_dir(trained(), &run);
        poke(&trained().join(optim), &run.join(optim), key, value);
        let before = names(&run);
        let e = fails(&["train", "--resume", s(&run), "--epochs", "2", "--quiet"]);
        assert!(
            e.contains(&format!(
                "{key} holds {value} (element 0), a value no run writes"
            )),
            "{e}"
        );
        assert_eq!(names(&run), before);
    }
}

#[test]
fn scores_that_overflow_are_an_error_not_a_probability_or_a_metric() {
    // Finite weights whose score is not: every classifier weight at f32's largest.
    let d = tmp("overflow");
    let ck = d.join("huge.safetensors");
    let mut m = load_safetensors(&trained().join("best.safetensors")).unwrap();
    let t = m
        .state_dict
        .tensors
        .iter_mut()
        .find(|t| t.name == "classifier.weight");
    if let TensorData::F32(v) = &mut t.unwrap().data {
        v.iter_mut().for_each(|x| *x = f32::MAX);
    }
    save_safetensors(&ck, &m.state_dict, &m.metadata).unwrap();
    let study = a_study();
    let e = fails(&["predict", "--weights", s(&ck), s(&study)]);
    assert!(
        e.contains("the model scores") && e.contains("as inf"),
        "{e}"
    );
    let out = d.join("eval");
    let e = fails(&[
        "eval",
        "--store",
        s(&dataset().1),
        "--checkpoint",
        s(&ck),
        "--out",
        s(&out),
    ]);
    assert!(
        e.contains("the model scores MURA-v1.1/valid/") && e.contains("as inf"),
        "{e}"
    );
    assert!(!out.join("metrics.json").exists());
}

/// The source tree of the shared set copied to `d/src`, with `edit` applied to its labelled
/// studies CSV of `split`.
fn source_with(d: &Path, split: &str, edit: impl FnOnce(&str) -> String) -> PathBuf {
    let src = d.join("src");
    copy_dir(&dataset().0, &src);
    let csv = src.join(format!("MURA-v1.1/{split}_labeled_studies.csv"));
    let text = std::fs::read_to_string(&csv).unwrap();
    std::fs::write(&csv, edit(&text)).unwrap();
    src
}

fn flip(csv: &str) -> String {
    csv.lines()
        .map(|l| match l.rsplit_once(',') {
            Some((p, "0")) => format!("{p},1\n"),
            Some((p, _)) => format!("{p},0\n"),
            None => format!("{l}\n"),
        })
        .collect()
}

fn prep(src: &Path, store: &Path) -> String {
    run_ok(&[
        "prep",
        "--mura-root",
        s(src),
        "--out",
        s(store),
        "--size",
        "32",
    ])
    .0
}

/// Rewrites the store identity in a run's optimiser state.
fn set_store_id(optim: &Path, id: &str) {
    let mut ck = load_safetensors(optim).unwrap();
    let mut state: serde_json::Value = serde_json::from_str(&ck.metadata["state"]).unwrap();
    state["store_id"] = id.into();
    ck.metadata.insert("state".into(), state.to_string());
    save_safetensors(optim, &ck.state_dict, &ck.metadata).unwrap();
}

fn store_id(optim: &Path) -> String {
    let ck = load_safetensors(optim).unwrap();
    let state: serde_json::Value = serde_json::from_str(&ck.metadata["state"]).unwrap();
    state["store_id"].as_str().unwrap().to_string()
}

#[test]
fn a_store_relabelled_since_the_run_is_refused_on_resume() {
    let d = tmp("relabel");
    let (src, store) = (dataset().0.clone(), d.join("store"));
    prep(&src, &store);
    let run = d.join("run");
    run_ok(&train_args(s(&store), s(&run), &[]));
    let optim = run.join("last.optim-1.safetensors");
    let trained_on = store_id(&optim);
    // The same pixels, every training label flipped, prepped over the store.
    let flipped = source_with(&d.join("flipped"), "train", flip);
    prep(&flipped, &store);
    let resume = ["train", "--resume", s(&run), "--epochs", "2", "--quiet"];
    let e = fails(&resume);
    assert!(
        e.contains("is not the one this run was trained on") && e.contains(&trained_on),
        "{e}"
    );
    // A run of an earlier mura recorded `<pixels>-<N>x<side>`: its pixels are checked, and
    // its labels cannot be; it resumes with a note, and records the whole identity from then on.
    let (pixels, rest) = trained_on.split_once('-').unwrap();
    let shape = rest.split_once('-').unwrap().1;
    let old = format!("{pixels}-{shape}");
    let other = format!("0badf00d-{shape}");
    set_store_id(&optim, &other);
    let e = fails(&resume);
    assert!(e.contains(&other), "{e}");
    set_store_id(&optim, &old);
    let (_, err) = run_ok(&resume);
    assert!(
        err.contains("saved by an earlier mura") && err.contains("its labels cannot be checked"),
        "{err}"
    );
    let now = store_id(&run.join("last.optim-2.safetensors"));
    assert!(
        now.starts_with(pixels) && now != old && now != trained_on,
        "{now}"
    );
}

#[test]
fn a_repeated_labelled_study_is_ignored_and_a_contradicting_one_skipped() {
    let d = tmp("dup");
    let lines = |csv: &str| -> Vec<String> { csv.lines().map(String::from).collect() };
    let first = lines(
        &std::fs::read_to_string(dataset().0.join("MURA-v1.1/train_labeled_studies.csv")).unwrap(),
    );
    let (a, b) = (first[0].clone(), first[1].clone());
    let (b_path, b_label) = b.rsplit_once(',').unwrap();
    let other = if b_label == "0" { "1" } else { "0" };
    // Row a again (the same label), and row b again without its slash, labelled otherwise.
    let b_again = format!("{},{other}", b_path.trim_end_matches('/'));
    let src = source_with(&d, "train", |t| format!("{t}{a}\n{b_again}\n"));
    let store = d.join("store");
    let out = prep(&src, &store);
    let a_path = a.rsplit_once(',').unwrap().0;
    assert!(
        out.contains(&format!("note: {a_path}: labelled"))
            && out.contains("twice")
            && out.contains("the repeat is ignored"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "skipped: {}: row of",
            b_path.trim_end_matches('/')
        )) && out.contains(&format!(
            "labels the study {other}, an earlier row {b_label}: the first row's label is kept"
        )),
        "{out}"
    );
    assert!(out.contains("1 skipped"), "{out}");
    let gen = std::fs::read_to_string(store.join("CURRENT")).unwrap();
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join(gen.trim()).join("index.json")).unwrap())
            .unwrap();
    let label = |path: &str| {
        index["studies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["path"] == path)
            .unwrap()["label"]
            .clone()
    };
    assert_eq!(
        label(b_path),
        serde_json::json!(b_label.parse::<u8>().unwrap())
    );
    // --strict fails on the contradiction, not on the repeat.
    let s2 = d.join("s2");
    let strict = [
        "prep",
        "--mura-root",
        s(&src),
        "--out",
        s(&s2),
        "--size",
        "32",
        "--strict",
    ];
    let e = fails(&strict);
    assert!(
        e.contains("--strict: 1 problem(s)") && e.contains("an earlier row"),
        "{e}"
    );
    let repeat_only = source_with(&d.join("repeat"), "train", |t| format!("{t}{a}\n"));
    run_ok(&[
        "prep",
        "--mura-root",
        s(&repeat_only),
        "--out",
        s(&d.join("s3")),
        "--size",
        "32",
        "--strict",
    ]);
}

#[test]
fn prep_never_commits_a_store_its_reader_refuses() {
    let d = tmp("readback");
    let store = d.join("store");
    prep(&dataset().0, &store);
    let before = run_ok(&["inspect", s(&store)]).0;
    // One row of 45 MB of control characters: skipped, and listed in the manifest, where JSON
    // writes each as 6 bytes: a manifest of 270 MB, past the 256 MiB a store's reader reads.
    let src = source_with(&d, "train", |t| {
        format!("{t}{}\n", "\u{1}".repeat(45_000_000))
    });
    let e = fails(&[
        "prep",
        "--mura-root",
        s(&src),
        "--out",
        s(&store),
        "--size",
        "32",
    ]);
    assert!(
        e.contains("the store written cannot be read back, so it is not put in use")
            && e.contains("manifest.json is larger than the 256 MiB")
            && e.contains(&format!("(the store at {} is unchanged)", s(&store))),
        "{e}"
    );
    assert_eq!(run_ok(&["inspect", s(&store)]).0, before);
    assert_eq!(
        names(&store),
        [".mura", "CURRENT", "gen-1"].map(std::ffi::OsString::from)
    );
}

#[test]
fn an_unlabelled_training_study_is_named_before_training() {
    let d = tmp("unlabelled");
    let src = d.join("src");
    copy_dir(&dataset().0, &src);
    // A test-style study folder (no _positive/_negative) listed in the image CSV only.
    let study = "MURA-v1.1/train/XR_WRIST/patient09999/study1/";
    let png = std::fs::read_dir(a_study())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::create_dir_all(src.join(study)).unwrap();
    std::fs::copy(png, src.join(study).join("image1.png")).unwrap();
    let csv = src.join("MURA-v1.1/train_image_paths.csv");
    let text = std::fs::read_to_string(&csv).unwrap();
    std::fs::write(&csv, format!("{text}{study}image1.png\n")).unwrap();
    let store = d.join("store");
    prep(&src, &store);
    let run = d.join("run");
    let e = fails(&train_args(s(&store), s(&run), &[]));
    assert!(
        e.contains(&format!(
            "1 of the store's train studies have no label, e.g. {study}"
        )) && e.contains("train_labeled_studies.csv")
            && e.contains("re-run `mura prep`"),
        "{e}"
    );
    assert!(!run.join("last.safetensors").exists());
}
