//! A user's audit of the CLI: bad input gives one `error:` line and a non-zero exit, never a panic,
//! and nothing already on disk is lost. One test per problem found (tiny data, a few seconds).

use crate::common::{mura, run_ok, s, tmp, TINY};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

fn ok(args: &[&str]) -> (String, String) {
    run_ok(args)
}

/// Runs a command that must fail with exactly one `error: ...` line on stderr (exit 1; 2 for an
/// argument that does not parse); returns that line.
fn err(args: &[&str]) -> String {
    let out = mura(args);
    let e = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        matches!(out.status.code(), Some(1 | 2)),
        "mura {args:?}: {:?} {e}",
        out.status
    );
    let lines: Vec<&str> = e.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        lines.len() == 1 && lines[0].starts_with("error: "),
        "mura {args:?} should print one error line, got:\n{e}"
    );
    lines[0].to_string()
}

/// A small synthetic set prepped at 32x32, shared by the tests: (source, store).
fn dataset() -> &'static (PathBuf, PathBuf) {
    static D: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    D.get_or_init(|| crate::common::prepped(&tmp("data"), 48, 5))
}

fn train_args<'a>(store: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["train", "--store", store, "--out", out, "--quiet"];
    a.extend_from_slice(TINY);
    a.extend_from_slice(extra);
    a
}

fn train_losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["train_loss"].as_f64().unwrap()
        })
        .collect()
}

#[test]
fn synth_never_replaces_a_folder_it_did_not_write() {
    let d = tmp("synth");
    // A user's MURA download: MURA-v1.1/ with their files, no synth marker.
    let real = d.join("mydata");
    std::fs::create_dir_all(real.join("MURA-v1.1")).unwrap();
    std::fs::write(
        real.join("MURA-v1.1/train_labeled_studies.csv"),
        "precious\n",
    )
    .unwrap();
    let e = err(&["synth", "--out", s(&real), "--studies", "3"]);
    assert!(e.contains("holds files that mura did not write"), "{e}");
    let kept = std::fs::read_to_string(real.join("MURA-v1.1/train_labeled_studies.csv")).unwrap();
    assert_eq!(kept, "precious\n");
    // An earlier synthetic set is replaced, as documented.
    let syn = d.join("syn");
    ok(&["synth", "--out", s(&syn), "--studies", "3"]);
    ok(&["synth", "--out", s(&syn), "--studies", "4", "--seed", "1"]);
    // A typo'd count is refused, not an out-of-memory abort.
    let e = err(&[
        "synth",
        "--out",
        s(&d.join("huge")),
        "--studies",
        "100000000000000",
    ]);
    assert!(e.contains("--studies"), "{e}");
}

#[test]
fn absurd_sizes_and_rates_are_refused_before_anything_is_written() {
    let (_, store) = dataset();
    let d = tmp("absurd");
    let run = d.join("run");
    for extra in [
        &["--image-size", "100000"][..],
        &["--image-size", "2"],
        &["--lr=-1"],
        &["--lr", "nan"],
        &["--weight-decay=-0.1"],
        &["--max-batches", "0"],
        &["--max-views", "0"],
        &["--epochs", "0"],
        &["--batch", "0"],
    ] {
        let e = err(&train_args(s(store), s(&run), extra));
        assert!(e.contains("--"), "{extra:?}: {e}");
        assert!(!run.exists(), "{extra:?} left a run folder");
    }
    let ck = d.join("nope.safetensors");
    for cmd in [
        vec!["eval", "--store", s(store), "--checkpoint", s(&ck)],
        vec!["predict", "--weights", s(&ck), s(store)],
    ] {
        let mut a = cmd.clone();
        a.extend(["--image-size", "100000"]);
        let e = err(&a);
        assert!(
            e.contains("'100000' for '--image-size") && e.contains("not in 8..=4096"),
            "{e}"
        );
    }
}

#[test]
fn a_run_that_failed_before_its_first_step_can_be_started_again() {
    let (_, store) = dataset();
    let run = tmp("restart").join("run");
    // Three blocks need more than 8x8 pixels: the error comes from the first forward pass,
    // after the run folder was made.
    let mut a = train_args(s(store), s(&run), &["--image-size", "8", "--epochs", "1"]);
    a.extend(["--block-config", "2,2,2"]);
    let e = err(&a);
    assert!(e.contains("too small"), "{e}");
    ok(&train_args(
        s(store),
        s(&run),
        &["--image-size", "32", "--epochs", "1"],
    ));
    assert_eq!(train_losses(&run).len(), 1);
    // With a checkpoint in it, the folder is a run and is not replaced.
    let e = err(&train_args(s(store), s(&run), &["--image-size", "32"]));
    assert!(e.contains("--resume"), "{e}");

    // A loss that blows up before any checkpoint does not claim one was kept.
    let run2 = tmp("restart-nan").join("run");
    let e = err(&train_args(
        s(store),
        s(&run2),
        &["--image-size", "32", "--lr", "1e30", "--epochs", "1"],
    ));
    assert!(e.contains("no checkpoint had been saved yet"), "{e}");
}

#[test]
fn resume_keeps_the_runs_settings_and_epoch_count() {
    let (_, store) = dataset();
    let run = tmp("resume").join("run");
    ok(&train_args(
        s(store),
        s(&run),
        &["--image-size", "32", "--epochs", "1", "--max-batches", "2"],
    ));
    // Settings that resume would silently ignore are refused (a clap usage error: exit 2).
    let out = mura(&["train", "--resume", s(&run), "--lr", "1"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{e}");
    assert!(
        e.starts_with("error: ") && e.contains("cannot be used with"),
        "{e}"
    );
    // A finished run is not trained for the default 10 epochs.
    let (_, note) = ok(&["train", "--resume", s(&run), "--quiet"]);
    assert!(note.contains("finished its 1 epochs"), "{note}");
    assert_eq!(train_losses(&run).len(), 1);
    ok(&["train", "--resume", s(&run), "--epochs", "2", "--quiet"]);
    assert_eq!(train_losses(&run).len(), 2);
    let e = err(&["train", "--resume", s(&run), "--epochs", "1"]);
    assert!(e.contains("already trained 2 epochs"), "{e}");
}

#[test]
fn ctrl_c_mid_epoch_then_resume_reports_the_same_losses() {
    let (_, store) = dataset();
    let d = tmp("ctrlc");
    let (a, b) = (d.join("a"), d.join("b"));
    let extra = ["--image-size", "64", "--epochs", "3", "--batch", "1"];
    ok(&train_args(s(store), s(&a), &extra));

    let mut args = train_args(s(store), s(&b), &extra);
    args.retain(|x| *x != "--quiet"); // the epoch lines tell us when epoch 1 is done
    let mut child = Command::new(env!("CARGO_BIN_EXE_mura"))
        .args(&args)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        if line.unwrap().starts_with("epoch   1") {
            break;
        }
    }
    // Epoch 2 (or at the latest the first batch of epoch 3) is under way: stop it there.
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    // Exit status 130, as a shell reports a command stopped by Ctrl-C: `train && eval` stops.
    assert_eq!(child.wait().unwrap().code(), Some(130), "{rest:?}");
    assert!(
        rest.iter()
            .any(|l| l.starts_with("interrupted: saved epoch")),
        "{rest:?}"
    );
    ok(&["train", "--resume", s(&b), "--quiet"]);
    assert_eq!(train_losses(&a), train_losses(&b));
}

#[test]
fn eval_and_predict_use_what_the_checkpoint_records() {
    let (src, store) = dataset();
    let d = tmp("ckpt");
    let run = d.join("run");
    ok(&train_args(
        s(store),
        s(&run),
        &["--image-size", "40", "--epochs", "1", "--max-batches", "1"],
    ));
    let best = run.join("best.safetensors");
    // No --arch or --image-size needed: the checkpoint records a custom net trained at 40 px.
    let study = std::fs::read_to_string(src.join("MURA-v1.1/valid_labeled_studies.csv")).unwrap();
    let study = study.lines().next().unwrap().rsplit_once(',').unwrap().0;
    let spaced = d.join("a study with spaces");
    std::fs::create_dir_all(&spaced).unwrap();
    for e in std::fs::read_dir(src.join(study)).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, spaced.join(p.file_name().unwrap())).unwrap();
    }
    let (out, _) = ok(&["predict", "--weights", s(&best), s(&spaced)]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let p = v["probability"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&p), "{v}");
    assert_eq!(v["study"].as_str(), Some(s(&spaced)));
    // An explicit other architecture is still refused.
    let e = err(&[
        "predict",
        "--weights",
        s(&best),
        "--arch",
        "densenet121",
        s(&spaced),
    ]);
    assert!(e.contains("not the requested densenet121"), "{e}");
    // An optimiser file is not a model: read as the default --arch, its keys are all wrong.
    let e = err(&[
        "eval",
        "--store",
        s(store),
        "--checkpoint",
        s(&run.join("last.optim-1.safetensors")),
    ]);
    assert!(
        e.contains("records no architecture") && e.contains("missing key 'features.conv0.weight'"),
        "{e}"
    );
}

#[test]
fn demo_checks_its_settings_before_touching_the_folder() {
    let d = tmp("demo");
    for extra in [
        &["--epochs", "0"][..],
        &["--image-size", "8"],
        &["--device", "tpu"],
        &["--studies", "0"],
    ] {
        let dir = d.join("demo");
        let mut a = vec!["demo", "--dir", s(&dir)];
        a.extend_from_slice(extra);
        err(&a);
        assert!(!dir.exists(), "{extra:?} made {}", dir.display());
    }
}

/// A reader that stops reading (`mura inspect STORE | head -1`) ends the command quietly with
/// success: its standard output here is a pipe whose reader is already gone, so the first line
/// it writes meets a broken pipe.
#[test]
fn closed_stdout_ends_the_command_quietly() {
    let (_, store) = dataset();
    for args in [vec!["inspect", s(store)], vec!["info", "--kernels"]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(env!("CARGO_BIN_EXE_mura"))
            .args(&args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "mura {args:?}: {:?} {e}", out.status);
        assert!(e.is_empty(), "mura {args:?} wrote to stderr: {e}");
    }
}

/// A checkpoint's and a run's metadata go through the checks the command line gets: a spec with
/// a growth rate of 0, no blocks, an astronomically long block or a bn size of 0, and an image
/// size out of range are one error line in `predict`, `eval` and `train --resume`, not a panic,
/// an abort or an allocation of everything.
#[test]
fn hostile_checkpoint_and_run_metadata_are_refused() {
    use mura::weights::{load_safetensors, save_safetensors};
    let (src, store) = dataset();
    let d = tmp("hostile-meta");
    let run = d.join("run");
    ok(&train_args(
        s(store),
        s(&run),
        &["--image-size", "32", "--epochs", "1", "--max-batches", "1"],
    ));
    let best = run.join("best.safetensors");
    let good = load_safetensors(&best).unwrap();
    let png = std::fs::read_dir(src.join("MURA-v1.1/valid"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let spec = |k: &str, blocks: &str, f0: &str, bn: &str| {
        format!(
            r#"{{"arch":"custom","growth_rate":{k},"block_config":{blocks},"num_init_features":{f0},"bn_size":{bn}}}"#
        )
    };
    let huge = format!("[{}]", vec!["4"; 100_000].join(","));
    let cases = [
        ("spec", spec("0", "[2,2]", "8", "2")),
        ("spec", spec("4", "[]", "8", "2")),
        ("spec", spec("4", &huge, "8", "2")),
        ("spec", spec("4", "[1000000000000]", "8", "2")),
        ("spec", spec("4", "[2,2]", "8", "0")),
        ("spec", spec("99999999", "[2]", "8", "2")),
        ("spec", r#"{"arch":"densenet169","growth_rate":4,"block_config":[2,2],"num_init_features":8,"bn_size":2}"#.into()),
        ("image_size", "999999999".into()),
        ("image_size", "-3".into()),
    ];
    for (i, (key, value)) in cases.iter().enumerate() {
        let bad = d.join(format!("bad{i}.safetensors"));
        let mut meta = good.metadata.clone();
        meta.insert(key.to_string(), value.clone());
        save_safetensors(&bad, &good.state_dict, &meta).unwrap();
        let what = format!("{key} = {}", &value[..value.len().min(60)]);
        let e = err(&["predict", "--weights", s(&bad), s(&png)]);
        assert!(e.contains(s(&bad)), "{what}: {e}");
        let e = err(&["eval", "--store", s(store), "--checkpoint", s(&bad)]);
        assert!(e.contains(s(&bad)), "{what}: {e}");
    }
    // The run's own config.json, as resume reads it.
    let config = std::fs::read_to_string(run.join("config.json")).unwrap();
    let original: serde_json::Value = serde_json::from_str(&config).unwrap();
    for (field, value) in [
        (
            "spec",
            serde_json::from_str(&spec("0", "[2,2]", "8", "2")).unwrap(),
        ),
        ("batch", serde_json::json!(1_000_000_000_000u64)),
        ("image_size", serde_json::json!(3)),
        ("max_rotation_deg", serde_json::json!(f64::MAX)),
        ("device", serde_json::json!("tpu")),
    ] {
        let mut c = original.clone();
        c[field] = value;
        std::fs::write(run.join("config.json"), c.to_string()).unwrap();
        let e = err(&["train", "--resume", s(&run), "--epochs", "2"]);
        assert!(e.contains("config.json"), "{field}: {e}");
    }
    std::fs::write(run.join("config.json"), config).unwrap();
    ok(&["train", "--resume", s(&run), "--epochs", "2", "--quiet"]);
}
