//! `mura export --onnx`, checked by the real clients: `onnx.checker.check_model` and
//! onnxruntime's CPU output against mura's own CPU forward (eval mode) on fresh random weights
//! and inputs, batch 1 and 5 (`scripts/check_onnx.py` runs them); README's deployment recipe
//! (its Python, run as written) against `mura predict`; and the command's hostile inputs.
//!
//! The clients come from `MURA_TEST_PYTHON` (CI's venv, see `.ci/run`) or `python3`. With
//! `MURA_TEST_ONNX=1` (CI) their absence fails the test; without it the test says, past the test
//! harness's capture, that it did not run.

use crate::common::gpu::seed;
use crate::common::{mura_bounded, one_error_line, run_ok, s, tmp, Client};
use mura::data::StudyType;
use mura::model::DenseNet;
use mura::ops::augment::{MEAN, STD};
use mura::ops::Mode;
use mura::rng::Rng;
use mura::spec::DenseNetSpec;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The largest |onnxruntime − mura| allowed on a logit.
const TOL: f64 = 1e-5;
/// The views of the batch checked (and its first view alone).
const BATCH: usize = 5;

/// The Python with numpy, onnx, onnxruntime and Pillow, or None (said loudly) where there is none and
/// `MURA_TEST_ONNX=1` does not require one. Probed once (importing them takes seconds).
fn onnx_python(test: &str) -> Option<String> {
    static PROBED: OnceLock<Result<String, String>> = OnceLock::new();
    let probed = PROBED.get_or_init(|| ONNX.probe());
    ONNX.or_unchecked(test, probed)
}

/// onnx and onnxruntime, which check the files `mura export --onnx` writes.
const ONNX: Client = Client {
    imports: "numpy, onnx, onnxruntime, PIL",
    required_by: "MURA_TEST_ONNX",
    unchecked: "the ONNX export by onnxruntime",
};

/// A model of `spec` with torchvision's init for the convolutions and random BN parameters and
/// running statistics (so that BN's every input matters) and classifier bias.
fn random_model(spec: DenseNetSpec, rng: &mut Rng) -> DenseNet<f32> {
    let mut m = DenseNet::<f32>::new(spec, rng.next_u64());
    for bn in m.layout.bns() {
        let (p, st, c) = (bn.p, bn.s, bn.c);
        for j in 0..c {
            m.params[p + j] = rng.range(0.5, 1.5) as f32;
            m.params[p + c + j] = (0.2 * rng.normal()) as f32;
            m.stats[st + j] = (0.2 * rng.normal()) as f32;
            m.stats[st + c + j] = rng.range(0.5, 2.0) as f32;
        }
    }
    let fc = m.layout.fc + m.layout.features();
    m.params[fc] = (0.5 * rng.normal()) as f32;
    m
}

fn f32_file(path: &Path, v: &[f32]) {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

/// How the weights file names its architecture.
enum Weights {
    /// A mura checkpoint: architecture and image size in its metadata, no options needed.
    Mura,
    /// torchvision's names only: `--arch` and `--image-size` given.
    Torchvision,
}

/// Exports a random model of `spec` at `size`² and checks the file with onnx and onnxruntime.
/// `types`: the study types to record (`--study-types` unless all seven).
fn check_export(
    test: &str,
    spec: DenseNetSpec,
    size: usize,
    weights: Weights,
    types: &[StudyType],
) {
    let Some(python) = onnx_python(test) else {
        return;
    };
    let seed = seed(test);
    let mut rng = Rng::new(seed.value);
    let d = tmp(test);
    let (w, onnx) = (d.join("model.safetensors"), d.join("model.onnx"));
    let mut model = random_model(spec.clone(), &mut rng);
    let mut args = vec!["export", "--onnx", s(&onnx), "--weights", s(&w)];
    let side = size.to_string();
    match weights {
        Weights::Mura => mura::checkpoint::save_model(&w, &model, "test", input(size)).unwrap(),
        Weights::Torchvision => {
            let meta = Default::default();
            mura::weights::save_safetensors(&w, &model.to_state_dict(), &meta).unwrap();
            args.extend(["--arch", &spec.arch, "--image-size", &side]);
        }
    }
    let names: Vec<&str> = types.iter().map(|t| t.name()).collect();
    let list = names.join(",").to_lowercase();
    if types != StudyType::ALL {
        args.extend(["--study-types", &list]);
    }
    run_ok(&args);

    // Fresh inputs [BATCH, 3, size, size], and mura's logits for them (mura computes in NHWC).
    let plane = size * size;
    let x: Vec<f32> = (0..BATCH * 3 * plane)
        .map(|_| rng.normal() as f32)
        .collect();
    let mut nhwc = vec![0f32; x.len()];
    for (i, v) in x.iter().enumerate() {
        let (b, c, p) = (i / (3 * plane), (i / plane) % 3, i % plane);
        nhwc[(b * plane + p) * 3 + c] = *v;
    }
    let logits = model.forward(&nhwc, BATCH, size, size, Mode::Eval);
    let spread = logits
        .iter()
        .fold(0f32, |m, &z| m.max((z - logits[0]).abs()));
    // The views' logits 100× the tolerance apart: an export that lost its input would fail.
    assert!(
        spread as f64 > 100.0 * TOL,
        "{test}: the views' logits hardly differ: {logits:?}"
    );
    let (xf, zf) = (d.join("inputs.f32"), d.join("logits.f32"));
    f32_file(&xf, &x);
    f32_file(&zf, &logits);

    let out = Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/check_onnx.py"
        ))
        .args([&onnx, &xf, &zf])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{test}: check_onnx.py failed:\n{stderr}"
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    println!("{test}: logits {logits:?}\n{r}");
    check_declared(&r, &spec, size, &names);
    for n in [1, BATCH] {
        let run = &r["runs"][n.to_string()];
        for shape in ["logit_shape", "probability_shape"] {
            assert_eq!(run[shape], serde_json::json!([n, 1]), "{test}: batch {n}");
        }
        for delta in ["max_abs_logit_delta", "max_abs_probability_delta"] {
            let v = run[delta].as_f64().unwrap();
            assert!(v <= TOL, "{test}: batch {n}: {delta} {v:e} > {TOL:e}");
        }
    }
    let _ = std::fs::remove_dir_all(&d); // kept when the test fails
}

/// What the file declares: IR version, opset, operators, input, outputs and metadata.
fn check_declared(r: &serde_json::Value, spec: &DenseNetSpec, size: usize, types: &[&str]) {
    use serde_json::json;
    assert_eq!(r["ir_version"], json!(8));
    assert_eq!(r["opsets"], json!({"": 17}));
    let ops = [
        "AveragePool",
        "BatchNormalization",
        "Concat",
        "Conv",
        "Flatten",
        "Gemm",
        "GlobalAveragePool",
        "MaxPool",
        "Relu",
        "Sigmoid",
    ];
    assert_eq!(r["ops"], json!(ops));
    assert_eq!(r["inputs"], json!({"image": ["batch", 3, size, size]}));
    let out = json!(["batch", 1]);
    assert_eq!(r["outputs"], json!({"logit": out, "probability": out}));
    let meta = &r["metadata"];
    let field = |k: &str| {
        meta[k]
            .as_str()
            .unwrap_or_else(|| panic!("no metadata {k}"))
    };
    let parsed = |k: &str| serde_json::from_str::<serde_json::Value>(field(k)).unwrap();
    assert_eq!(field("architecture"), spec.arch);
    let recorded: DenseNetSpec = serde_json::from_str(field("spec")).unwrap();
    assert_eq!(&recorded, spec);
    assert_eq!(field("image_size"), size.to_string());
    let floats = |k: &str| serde_json::from_str::<Vec<f32>>(field(k)).unwrap();
    assert_eq!(
        (floats("mean"), floats("std")),
        (MEAN.to_vec(), STD.to_vec())
    );
    assert_eq!(parsed("study_types"), json!(types));
    assert!(field("study_rule").contains("mean of its views' probabilities"));
    assert!(field("input").contains(&format!("[batch, 3, {size}, {size}]")));
}

#[test]
fn onnx_densenet121_agrees_with_onnxruntime() {
    // 100 px: odd sides after the stem's pooling (25) and after the first transition (12 → 6 → 3).
    let spec = DenseNetSpec::preset("densenet121").unwrap();
    check_export(
        "onnx_densenet121",
        spec,
        100,
        Weights::Torchvision,
        &StudyType::ALL,
    );
}

#[test]
fn onnx_densenet169_agrees_with_onnxruntime() {
    let spec = DenseNetSpec::preset("densenet169").unwrap();
    check_export(
        "onnx_densenet169",
        spec,
        224,
        Weights::Mura,
        &StudyType::ALL,
    );
}

#[test]
fn onnx_custom_agrees_with_onnxruntime() {
    // 69 px: the stem's convolution gives 35, its max pool 18, the transitions 9 and 4.
    let spec = DenseNetSpec::custom(12, vec![3, 5, 4], 20, 3).unwrap();
    let types = [StudyType::Elbow, StudyType::Wrist];
    check_export("onnx_custom", spec, 69, Weights::Mura, &types);
}

/// The first PNG under `dir` of each (bit depth, colour type) in its header.
fn png_kinds(dir: &Path, found: &mut std::collections::BTreeMap<(u8, u8), PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            png_kinds(&p, found);
        } else if p.extension().is_some_and(|x| x == "png") {
            let head = std::fs::read(&p).unwrap();
            found.entry((head[24], head[25])).or_insert(p);
        }
    }
}

/// README's "Deploying a trained model" Python, run as written, gives `mura predict`'s study
/// probability for a study with a view of each kind of PNG synth writes.
#[test]
fn readme_deploy_recipe_gives_mura_predicts_probability() {
    let test = "onnx_readme_deploy";
    let Some(python) = onnx_python(test) else {
        return;
    };
    let d = tmp(test);
    let src = d.join("src");
    run_ok(&["synth", "--out", s(&src), "--studies", "40", "--seed", "2"]);
    let mut kinds = Default::default();
    png_kinds(&src, &mut kinds);
    let study = d.join("study");
    std::fs::create_dir(&study).unwrap();
    // 8-bit gray, 8-bit RGB, 16-bit gray.
    for (i, kind) in [(8, 0), (8, 2), (16, 0)].iter().enumerate() {
        let from = kinds
            .get(kind)
            .unwrap_or_else(|| panic!("synth wrote no {kind:?} PNG"));
        std::fs::copy(from, study.join(format!("view{i}.png"))).unwrap();
    }
    let spec = DenseNetSpec::custom(8, vec![2, 3], 16, 2).unwrap();
    let model = random_model(spec, &mut Rng::new(seed(test).value));
    let (w, onnx) = (d.join("model.safetensors"), d.join("model.onnx"));
    mura::checkpoint::save_model(&w, &model, "test", input(64)).unwrap();
    run_ok(&["export", "--onnx", s(&onnx), "--weights", s(&w)]);
    let (line, _) = run_ok(&["predict", "--weights", s(&w), s(&study)]);
    let want: serde_json::Value = serde_json::from_str(&line).unwrap();

    let readme = include_str!("../../README.md");
    let section = &readme[readme.find("## Deploying a trained model").unwrap()..];
    let code = section.split("```python\n").nth(1).unwrap();
    let script = d.join("deploy.py");
    std::fs::write(&script, code.split("```").next().unwrap()).unwrap();
    let mut views: Vec<PathBuf> = (0..3).map(|i| study.join(format!("view{i}.png"))).collect();
    views.sort();
    let out = Command::new(&python)
        .arg(&script)
        .arg(&onnx)
        .args(&views)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "README's deploy.py failed:\n{stderr}");
    println!("{test}: mura predict {want}\nREADME's Python: {stdout}");
    let (p, call) = stdout.trim().split_once(' ').unwrap();
    let p: f64 = p.parse().unwrap();
    let delta = (p - want["probability"].as_f64().unwrap()).abs();
    assert!(delta <= TOL, "{test}: |README - mura predict| = {delta:e}");
    let abnormal = want["abnormal"].as_bool().unwrap();
    assert_eq!(call, if abnormal { "abnormal" } else { "normal" });
    let _ = std::fs::remove_dir_all(&d);
}

// --- hostile input: one error line, exit 1, nothing on disk lost ---------------------------

const MEM: u64 = 4 << 30;
const SECS: u64 = 30;

fn fails(args: &[&str], env: &[(&str, &str)]) -> String {
    let run = mura_bounded(args, env, MEM, SECS);
    one_error_line(&run, &format!("mura {args:?}"))
}

/// A tiny custom model as a mura checkpoint (32 px) and as torchvision-named weights.
fn tiny_weights(d: &Path) -> (PathBuf, PathBuf) {
    let spec = DenseNetSpec::custom(4, vec![2, 2, 2], 8, 2).unwrap();
    let model = random_model(spec, &mut Rng::new(7));
    let (ck, tv) = (d.join("tiny.safetensors"), d.join("tv.safetensors"));
    mura::checkpoint::save_model(&ck, &model, "test", input(32)).unwrap();
    mura::weights::save_safetensors(&tv, &model.to_state_dict(), &Default::default()).unwrap();
    (ck, tv)
}

#[test]
fn export_refuses_bad_weights_architectures_and_sizes() {
    let d = tmp("hostile-in");
    let (ck, tv) = tiny_weights(&d);
    let out = d.join("out.onnx");
    let garbage = d.join("garbage.safetensors");
    std::fs::write(&garbage, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot safetensors").unwrap();
    let export = |w: &Path, extra: &[&str]| {
        let mut a = vec!["export", "--onnx", s(&out), "--weights", s(w)];
        a.extend_from_slice(extra);
        fails(&a, &[])
    };
    let cases: [(&Path, &[&str], &str); 6] = [
        (&garbage, &[], "garbage.safetensors"),
        (&d.join("missing.safetensors"), &[], "missing.safetensors"),
        (
            &ck,
            &["--arch", "densenet121"],
            "not the requested densenet121",
        ),
        (&tv, &[], "--arch"),
        (&ck, &["--image-size", "8"], "too small"),
        (
            &ck,
            &["--image-size", "100000"],
            "--image-size 100000 is out of range",
        ),
    ];
    for (w, extra, want) in cases {
        let e = export(w, extra);
        assert!(e.contains(want), "{extra:?}: {e}");
        assert!(!out.exists(), "{extra:?} wrote {}", out.display());
    }
    // A folder where the weights belong.
    assert!(export(&d, &[]).contains("not a regular file"));
}

#[test]
fn export_never_replaces_another_file_and_writes_atomically() {
    let d = tmp("hostile-out");
    let (ck, _) = tiny_weights(&d);
    let weights = std::fs::read(&ck).unwrap();
    let export = |out: &Path, env: &[(&str, &str)]| {
        fails(&["export", "--onnx", s(out), "--weights", s(&ck)], env)
    };
    // Not an .onnx name (the weights themselves, say), or the weights under an .onnx name.
    assert!(export(&ck, &[]).contains("must end in .onnx"));
    let alias = d.join("tiny.onnx");
    std::os::unix::fs::symlink(&ck, &alias).unwrap();
    assert!(export(&alias, &[]).contains("is the weights file itself"));
    assert_eq!(std::fs::read(&ck).unwrap(), weights);
    // Where no file can be written: under a regular file, over a folder.
    assert!(export(&ck.join("x.onnx"), &[]).contains("cannot write"));
    let folder = d.join("folder.onnx");
    std::fs::create_dir(&folder).unwrap();
    assert!(export(&folder, &[]).contains("cannot write"));

    // A full disk or a kill while the new file is written leaves the previous one whole.
    let out = d.join("model.onnx");
    run_ok(&["export", "--onnx", s(&out), "--weights", s(&ck)]);
    let previous = std::fs::read(&out).unwrap();
    let e = export(&out, &[("MURA_FAILPOINT", "atomic-write:1:enospc")]);
    assert!(e.contains("cannot write"), "{e}");
    let killed = mura_bounded(
        &["export", "--onnx", s(&out), "--weights", s(&ck)],
        &[("MURA_FAILPOINT", "atomic-write:1")],
        MEM,
        SECS,
    );
    assert!(!killed.status.success());
    assert_eq!(std::fs::read(&out).unwrap(), previous);
}

/// What a checkpoint trained at `size`² on a store of that side records of its input.
fn input(size: usize) -> mura::checkpoint::Input {
    mura::checkpoint::Input {
        preprocess: mura::data::image::Preprocess::prep(size),
        image_size: size,
    }
}
