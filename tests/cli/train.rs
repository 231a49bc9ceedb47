//! End to end through the binary: synth -> prep -> train -> resume -> eval -> predict --cam -> report.

use crate::common::{mura, run_ok, tmp, TINY};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn ok(args: &[&str]) -> String {
    run_ok(args).0
}

fn err(args: &[&str]) -> String {
    let out = mura(args);
    assert!(!out.status.success(), "mura {args:?} should fail");
    let e = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!e.contains("panicked"), "panic for {args:?}: {e}");
    e
}

/// A small synthetic dataset prepped at 32x32, shared by the tests.
fn dataset() -> &'static (PathBuf, PathBuf) {
    static D: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    D.get_or_init(|| crate::common::prepped(&tmp("data"), 60, 3))
}

fn train_args<'a>(store: &'a Path, out: &'a Path, epochs: &'a str) -> Vec<&'a str> {
    train_args_lr(store, out, epochs, "3e-3")
}

fn train_args_lr<'a>(store: &'a Path, out: &'a Path, epochs: &'a str, lr: &'a str) -> Vec<&'a str> {
    let mut a = vec![
        "train",
        "--store",
        store.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--image-size",
        "32",
        "--epochs",
        epochs,
        "--lr",
        lr,
        "--seed",
        "5",
        "--quiet",
    ];
    a.extend_from_slice(TINY);
    a
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn losses(run: &Path) -> Vec<(f64, f64)> {
    metrics(run)
        .iter()
        .map(|m| {
            (
                m["train_loss"].as_f64().unwrap(),
                m["val_loss"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn train_learns_and_resume_matches_an_uninterrupted_run() {
    let (_, store) = dataset();
    let d = tmp("resume");
    let full = d.join("full");
    ok(&train_args(store, &full, "4"));
    let m = metrics(&full);
    assert_eq!(m.len(), 4);
    for f in [
        "epoch",
        "train_loss",
        "val_loss",
        "lr",
        "kappa",
        "kappa_by_type",
        "accuracy",
        "auroc",
        "images_per_s",
        "seconds",
    ] {
        assert!(m[0].get(f).is_some(), "metrics.jsonl lacks {f}");
    }
    let l = losses(&full);
    let first_val = l[0].1;
    let best_val = l.iter().map(|x| x.1).fold(f64::INFINITY, f64::min);
    assert!(
        best_val < first_val,
        "validation loss never fell below epoch 1's: {l:?}"
    );
    for f in [
        "best.safetensors",
        "last.safetensors",
        "last.optim-4.safetensors",
        "val_predictions.csv",
    ] {
        assert!(full.join(f).exists(), "no {f}");
    }

    // Two epochs, then resume to four: the same per-epoch losses.
    let part = d.join("part");
    ok(&train_args(store, &part, "2"));
    ok(&[
        "train",
        "--resume",
        part.to_str().unwrap(),
        "--epochs",
        "4",
        "--quiet",
    ]);
    let lp = losses(&part);
    assert_eq!(lp.len(), 4);
    assert_eq!(l.len(), lp.len(), "{l:?} vs {lp:?}");
    for (a, b) in l.iter().zip(&lp) {
        assert!(
            (a.0 - b.0).abs() <= 1e-9 * a.0.abs() && (a.1 - b.1).abs() <= 1e-9 * a.1.abs(),
            "resumed run differs: {l:?} vs {lp:?}"
        );
    }

    // An existing run is never overwritten by a fresh start.
    let e = err(&train_args(store, &full, "1"));
    assert!(e.contains("--resume"), "{e}");
}

#[test]
fn eval_predict_cam_and_report() {
    let (src, store) = dataset();
    let d = tmp("eval");
    let run = d.join("run");
    ok(&train_args(store, &run, "2"));
    let best = run.join("best.safetensors");
    let out = d.join("eval");
    // An ensemble of the same checkpoint twice equals the single model, to the digit.
    let eval_of = |checkpoints: &[&Path], out: &Path| -> (String, serde_json::Value) {
        let mut args = vec!["eval", "--store", store.to_str().unwrap(), "--checkpoint"];
        args.extend(checkpoints.iter().map(|c| c.to_str().unwrap()));
        args.extend(["--out", out.to_str().unwrap()]);
        let table = ok(&args);
        let metrics = std::fs::read_to_string(out.join("metrics.json")).unwrap();
        (table, serde_json::from_str(&metrics).unwrap())
    };
    let (table, m) = eval_of(&[&best, &best], &out);
    assert!(table.contains("XR_WRIST"), "{table}");
    let (single_table, single) = eval_of(&[&best], &d.join("eval-single"));
    assert_eq!(
        m, single,
        "an ensemble of one checkpoint twice differs from it"
    );
    // The tables too, but for the lines naming where each wrote.
    let rows = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| !l.starts_with("wrote "))
            .map(String::from)
            .collect()
    };
    assert_eq!(rows(&table), rows(&single_table));
    for f in [
        "kappa",
        "kappa_ci",
        "accuracy",
        "sensitivity",
        "specificity",
        "auroc",
        "n",
    ] {
        assert!(
            m["overall"].get(f).is_some(),
            "metrics.json lacks overall.{f}"
        );
    }
    // The same weights without mura's metadata (as exported from torchvision) need --arch.
    let plain = d.join("plain.safetensors");
    let ck = mura::weights::load_safetensors(&best).unwrap();
    mura::weights::save_safetensors(&plain, &ck.state_dict, &Default::default()).unwrap();
    let mut args = vec![
        "eval",
        "--store",
        store.to_str().unwrap(),
        "--checkpoint",
        plain.to_str().unwrap(),
        "--image-size",
        "32",
    ];
    let e = err(&args);
    assert!(e.contains("pass the --arch it has"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    args.extend_from_slice(TINY);
    let single = ok(&args);
    let overall = |t: &str| t.lines().find(|l| l.contains("overall")).map(String::from);
    assert_eq!(overall(&single), overall(&table), "{single}\n{table}");
    let preds = std::fs::read_to_string(out.join("predictions.csv")).unwrap();
    assert!(preds
        .lines()
        .all(|l| l.starts_with("MURA-v1.1/valid/") && (l.ends_with("/,0") || l.ends_with("/,1"))));
    // The official-style scorer accepts what eval wrote.
    let labels = src.join("MURA-v1.1/valid_labeled_studies.csv");
    let scored = ok(&[
        "score",
        "--labels",
        labels.to_str().unwrap(),
        "--predictions",
        out.join("predictions.csv").to_str().unwrap(),
        "--json",
    ]);
    let s: serde_json::Value = serde_json::from_str(scored.trim()).unwrap();
    let (k1, k2) = (
        s["overall"]["kappa"].as_f64(),
        m["overall"]["kappa"].as_f64(),
    );
    // Both null (a kappa undefined on this split) or equal.
    let agree = match (k1, k2) {
        (None, None) => true,
        (Some(a), Some(b)) => (a - b).abs() < 1e-12,
        _ => false,
    };
    assert!(agree, "score and eval disagree: {k1:?} vs {k2:?}");

    // predict with CAMs on one abnormal and one normal study.
    let lines = std::fs::read_to_string(&labels).unwrap();
    let pick = |label: &str| -> PathBuf {
        let l = lines.lines().find(|l| l.ends_with(label)).unwrap();
        src.join(l.split(',').next().unwrap())
    };
    let (abn, nor) = (pick(",1"), pick(",0"));
    let cam = d.join("cam");
    let mut args = vec![
        "predict",
        "--weights",
        best.to_str().unwrap(),
        "--image-size",
        "32",
        "--cam",
        cam.to_str().unwrap(),
        abn.to_str().unwrap(),
        nor.to_str().unwrap(),
    ];
    args.extend_from_slice(TINY);
    let out = ok(&args);
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    for r in &rows {
        let views = r["views"].as_array().unwrap();
        let mean: f64 = views
            .iter()
            .map(|v| v["probability"].as_f64().unwrap())
            .sum::<f64>()
            / views.len() as f64;
        assert!((mean - r["probability"].as_f64().unwrap()).abs() < 1e-12);
        assert_eq!(r["abnormal"].as_bool().unwrap(), mean > 0.5);
    }
    let mut cams: Vec<PathBuf> = std::fs::read_dir(&cam)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    cams.sort();
    let n_views: usize = rows
        .iter()
        .map(|r| r["views"].as_array().unwrap().len())
        .sum();
    assert_eq!(cams.len(), n_views);
    // Each CAM has its radiograph's size; the abnormal and normal study's maps differ.
    let first_view = rows[0]["views"][0]["path"].as_str().unwrap();
    let (w, h) = image::image_dimensions(first_view).unwrap();
    let abn_cam = cams
        .iter()
        .find(|p| p.to_string_lossy().contains(&sanitized_tail(&abn)))
        .unwrap();
    assert_eq!(image::image_dimensions(abn_cam).unwrap(), (w, h));
    let nor_cam = cams
        .iter()
        .find(|p| p.to_string_lossy().contains(&sanitized_tail(&nor)))
        .unwrap();
    assert_ne!(
        std::fs::read(abn_cam).unwrap(),
        std::fs::read(nor_cam).unwrap()
    );

    ok(&["report", run.to_str().unwrap()]);
    for f in ["loss.png", "kappa.png", "roc.png"] {
        assert!(run.join("report").join(f).exists(), "no {f}");
    }
}

/// The study folder's last two components as `predict` names CAM files.
fn sanitized_tail(p: &Path) -> String {
    let comps: Vec<String> = p
        .components()
        .rev()
        .take(2)
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    format!("{}_{}", comps[1], comps[0])
}

#[test]
fn nan_loss_stops_training_with_a_clear_error() {
    let (_, store) = dataset();
    let d = tmp("nan");
    // A checkpoint of finite weights whose classifier overflows (loading refuses NaN weights):
    // the very first logits are infinite and the loss is not finite.
    let seed_run = d.join("seed");
    let mut a = train_args(store, &seed_run, "1");
    a.extend_from_slice(&["--max-batches", "1"]);
    ok(&a);
    let ck = seed_run.join("last.safetensors");
    let mut c = mura::weights::load_safetensors(&ck).unwrap();
    let t = c
        .state_dict
        .tensors
        .iter_mut()
        .find(|t| t.name == "classifier.weight")
        .unwrap();
    if let mura::weights::TensorData::F32(v) = &mut t.data {
        v.iter_mut().for_each(|w| *w = f32::MAX);
    }
    let bad = d.join("nan.safetensors");
    mura::weights::save_safetensors(&bad, &c.state_dict, &c.metadata).unwrap();
    let run = d.join("run");
    let mut a = train_args(store, &run, "2");
    a.extend_from_slice(&["--init", bad.to_str().unwrap()]);
    let e = err(&a);
    assert!(
        e.contains("training loss became") && e.contains("epoch 1 batch 1"),
        "{e}"
    );
    assert!(!run.join("last.safetensors").exists());
}

#[test]
fn bad_input_is_one_clear_line() {
    let (_, store) = dataset();
    let d = tmp("bad");
    let e = err(&[
        "train",
        "--store",
        d.join("nope").to_str().unwrap(),
        "--out",
        d.join("r").to_str().unwrap(),
    ]);
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    let e = err(&["train", "--resume", d.to_str().unwrap()]);
    assert!(e.contains("not a mura run folder"), "{e}");
    let r2 = d.join("r2");
    let mut a = train_args(store, &r2, "1");
    a.extend_from_slice(&["--loss", "median"]);
    assert!(err(&a).contains("--loss"));
    let e = err(&[
        "predict",
        "--weights",
        d.join("missing.safetensors").to_str().unwrap(),
        d.to_str().unwrap(),
    ]);
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    let empty = d.join("empty_study");
    std::fs::create_dir_all(&empty).unwrap();
    let run = d.join("r3");
    let mut a = train_args(store, &run, "1");
    a.extend_from_slice(&["--max-batches", "1"]);
    ok(&a);
    let mut p: Vec<String> = vec![
        "predict".into(),
        "--weights".into(),
        run.join("best.safetensors").to_str().unwrap().into(),
        empty.to_str().unwrap().into(),
    ];
    p.extend(TINY.iter().map(|s| s.to_string()));
    let p: Vec<&str> = p.iter().map(|s| s.as_str()).collect();
    assert!(err(&p).contains("study folder has no views (*.png or *.dcm)"));
    // A checkpoint of another architecture is refused.
    let e = err(&[
        "predict",
        "--weights",
        run.join("best.safetensors").to_str().unwrap(),
        "--arch",
        "densenet121",
        empty.to_str().unwrap(),
    ]);
    assert!(e.contains("densenet121"), "{e}");
}

#[test]
fn init_from_torchvision_pth_fine_tunes_from_its_weights() {
    let (_, store) = dataset();
    let d = tmp("init");
    let pth = crate::common::fixtures().join("tiny_legacy.pth");
    let init = format!("imagenet:{}", pth.display());
    let run = d.join("run");
    let mut a = train_args(store, &run, "1");
    a.extend_from_slice(&["--init", &init, "--max-batches", "1"]);
    ok(&a);
    // After one Adam step (each weight moves by at most about lr = 3e-3) the features are still
    // the .pth's; the head is a fresh single logit.
    let want = mura::weights::import_torchvision(
        mura::weights::load_pth(&pth).unwrap(),
        &mura::spec::DenseNetSpec::custom(4, vec![2, 2], 8, 2).unwrap(),
        5,
    )
    .unwrap();
    let got = mura::weights::load_safetensors(&run.join("last.safetensors"))
        .unwrap()
        .state_dict;
    let conv0 = |sd: &mura::weights::StateDict| match &sd.get("features.conv0.weight").unwrap().data
    {
        mura::weights::TensorData::F32(v) => v.clone(),
        _ => unreachable!(),
    };
    let (a, b) = (conv0(&want), conv0(&got));
    assert_eq!(a.len(), b.len());
    assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= 3.1e-3));
    assert!(a.iter().map(|x| x.abs()).sum::<f32>() > 0.1 * a.len() as f32 * 3.1e-3);
    assert_eq!(got.get("classifier.weight").unwrap().shape, vec![1, 16]);
    // A .pth of another architecture is refused, naming a key.
    let bad = d.join("bad");
    let e = err(&[
        "train",
        "--store",
        store.to_str().unwrap(),
        "--out",
        bad.to_str().unwrap(),
        "--image-size",
        "32",
        "--arch",
        "custom",
        "--growth-rate",
        "6",
        "--block-config",
        "2,2",
        "--num-init-features",
        "8",
        "--bn-size",
        "2",
        "--init",
        &init,
    ]);
    assert!(e.contains("features."), "{e}");
}

#[test]
fn demo_runs_end_to_end_and_only_replaces_its_own_folder() {
    let d = tmp("demo");
    let dir = d.join("demo");
    let args = [
        "demo",
        "--dir",
        dir.to_str().unwrap(),
        "--studies",
        "40",
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--device",
        "cpu",
    ];
    let out = ok(&args);
    assert!(out.contains("overall"), "{out}");
    for f in [
        "run/best.safetensors",
        "eval/metrics.json",
        "eval/predictions.csv",
        "run/report/loss.png",
    ] {
        assert!(dir.join(f).exists(), "demo wrote no {f}");
    }
    assert!(std::fs::read_dir(dir.join("cam")).unwrap().count() > 0);
    // Running again replaces the previous demo; a folder the demo did not make is refused.
    ok(&args);
    let foreign = d.join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("precious.txt"), "keep").unwrap();
    let e = err(&[
        "demo",
        "--dir",
        foreign.to_str().unwrap(),
        "--studies",
        "40",
    ]);
    assert!(e.contains("holds files that mura did not write"), "{e}");
    assert!(foreign.join("precious.txt").exists());
}

#[test]
fn training_on_the_kernel_emulator_matches_the_cpu() {
    let (_, store) = dataset();
    let d = tmp("emu");
    let cpu = d.join("cpu");
    let emu = d.join("emu");
    // At the paper's lr: Adam turns rounding-level differences in near-zero gradients into
    // lr-sized steps, so a large lr makes two f32 implementations drift apart chaotically.
    let mut a = train_args_lr(store, &cpu, "2", "1e-4");
    a.extend_from_slice(&["--max-batches", "3"]);
    ok(&a);
    let mut a = train_args_lr(store, &emu, "2", "1e-4");
    a.extend_from_slice(&["--max-batches", "3", "--device", "emu"]);
    ok(&a);
    let (lc, le) = (losses(&cpu), losses(&emu));
    assert_eq!(lc.len(), 2);
    assert_eq!(le.len(), lc.len(), "emu {le:?} vs cpu {lc:?}");
    for (c, e) in lc.iter().zip(&le) {
        assert!(
            (c.0 - e.0).abs() <= 1e-4 * c.0.abs() && (c.1 - e.1).abs() <= 1e-4 * c.1.abs(),
            "emu {le:?} vs cpu {lc:?}"
        );
    }
    // A checkpoint trained on the emulator loads and predicts on the CPU.
    let table = ok(&[
        "eval",
        "--store",
        store.to_str().unwrap(),
        "--checkpoint",
        emu.join("best.safetensors").to_str().unwrap(),
    ]);
    assert!(table.contains("overall"), "{table}");
}

/// The bf16 tensor-core step's training curve on the synthetic set tracks f32's: the same run
/// (tiny net, 4 epochs of 4 batches at lr 1e-3) on the emulator in bf16 and on the CPU in f32;
/// per-epoch train and validation losses within 2% (measured: 0.3%), and the validation loss
/// falls.
#[test]
fn bf16_training_curve_tracks_f32() {
    let (_, store) = dataset();
    let d = tmp("bf16curve");
    let (f32_run, bf16_run) = (d.join("f32"), d.join("bf16"));
    let mut a = train_args_lr(store, &f32_run, "4", "1e-3");
    a.extend_from_slice(&["--max-batches", "4"]);
    ok(&a);
    let mut a = train_args_lr(store, &bf16_run, "4", "1e-3");
    a.extend_from_slice(&[
        "--max-batches",
        "4",
        "--device",
        "emu",
        "--precision",
        "bf16",
    ]);
    ok(&a);
    let (lf, lb) = (losses(&f32_run), losses(&bf16_run));
    eprintln!("f32 {lf:?}\nbf16 {lb:?}");
    assert_eq!(lb.len(), 4);
    assert_eq!(lf.len(), lb.len(), "bf16 {lb:?} vs f32 {lf:?}");
    for (f, b) in lf.iter().zip(&lb) {
        assert!(
            (f.0 - b.0).abs() <= 0.02 * f.0 && (f.1 - b.1).abs() <= 0.02 * f.1,
            "bf16 {lb:?} vs f32 {lf:?}"
        );
    }
    assert!(
        lb[3].1 < lb[0].1,
        "bf16 validation loss does not fall: {lb:?}"
    );
}
