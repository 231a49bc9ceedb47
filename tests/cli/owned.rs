//! Issue 21's classes 1, 2, 6, 7 and 8 through the binary, as a careless user or script meets
//! them: nothing mura did not make is deleted or overwritten (a folder is mura's only by its
//! marker), outputs that belong together change together, no stream or signal crashes a
//! command, every line is one line, and a run resumes on another machine.

use crate::common::{
    mura_bounded, mura_in, one_error_line, prepped, run_ok, run_ok_in, s, tmp, TINY,
};
use std::collections::BTreeSet;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// Runs mura (at most 4 GiB, 120 s), which must fail with one error line; returns it.
fn fails(args: &[&str]) -> String {
    fails_in(args, None)
}

fn fails_in(args: &[&str], env: Option<(&str, &str)>) -> String {
    let env: Vec<_> = env.into_iter().collect();
    let run = mura_bounded(args, &env, 4 << 30, 120);
    one_error_line(&run, &format!("mura {args:?}"))
}

/// The names in `dir`, and (recursively) every file's content, to compare before and after.
fn snapshot(dir: &Path) -> BTreeSet<(PathBuf, Vec<u8>)> {
    let mut all = BTreeSet::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            all.insert((p.clone(), vec![]));
            all.extend(snapshot(&p));
        } else {
            all.insert((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    all
}

/// A small store shared by the tests: (source tree, store).
fn data() -> &'static (PathBuf, PathBuf) {
    static D: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    D.get_or_init(|| prepped(&tmp("data"), 10, 5))
}

/// A trained tiny run shared by the tests.
fn trained() -> &'static PathBuf {
    static R: OnceLock<PathBuf> = OnceLock::new();
    R.get_or_init(|| {
        let run = tmp("trained").join("run");
        let mut args = vec!["train", "--store", s(&data().1), "--out", s(&run)];
        args.extend_from_slice(TINY);
        args.extend_from_slice(&["--epochs", "1", "--batch", "4", "--quiet"]);
        run_ok(&args);
        run
    })
}

// --- 1. deleting or overwriting what mura did not create ------------------------------------

#[test]
fn train_prep_eval_synth_refuse_folders_they_did_not_make() {
    let d = tmp("foreign");
    let theirs = d.join("theirs");
    std::fs::create_dir_all(theirs.join("gen-3")).unwrap();
    for (name, text) in [
        ("config.json", "{\"mine\": 1}"),
        ("metrics.jsonl", "{\"epoch\": 1}\n"),
        ("CURRENT", "MANIFEST-000001\n"),
        ("index.json", "{}"),
        ("gen-3/data.sst", "sst"),
    ] {
        std::fs::write(theirs.join(name), text).unwrap();
    }
    let before = snapshot(&theirs);
    let store = s(&data().1);
    let mut train = vec!["train", "--store", store, "--out", s(&theirs)];
    train.extend_from_slice(TINY);
    train.extend_from_slice(&["--epochs", "1"]);
    let src = s(&data().0);
    let best = trained().join("best.safetensors");
    for args in [
        train,
        vec![
            "prep",
            "--mura-root",
            src,
            "--out",
            s(&theirs),
            "--size",
            "32",
        ],
        vec!["synth", "--out", s(&theirs), "--studies", "3"],
        vec![
            "eval",
            "--store",
            store,
            "--checkpoint",
            s(&best),
            "--out",
            s(&theirs),
        ],
        vec![
            "demo",
            "--dir",
            s(&theirs),
            "--studies",
            "20",
            "--epochs",
            "1",
        ],
    ] {
        let e = fails(&args);
        assert!(
            e.contains("holds files that mura did not write"),
            "{args:?}: {e}"
        );
        assert_eq!(snapshot(&theirs), before, "{args:?} changed the folder");
    }
    // A folder of another kind of mura's is refused as such: a run is not a store.
    let run = trained();
    let e = fails(&["prep", "--mura-root", src, "--out", s(run), "--size", "32"]);
    assert!(e.contains("is a mura run folder, not a store one"), "{e}");
    // Report's folder: a user's file in RUN/report is not taken for a plot.
    let copy = d.join("run");
    Command::new("cp")
        .args(["-r", s(run), s(&copy)])
        .status()
        .unwrap();
    std::fs::create_dir(copy.join("report")).unwrap();
    std::fs::write(copy.join("report/notes.txt"), "mine").unwrap();
    let e = fails(&["report", s(&copy)]);
    assert!(e.contains("holds files that mura did not write"), "{e}");
    assert_eq!(
        std::fs::read(copy.join("report/notes.txt")).unwrap(),
        b"mine"
    );
}

#[test]
fn the_current_folder_and_its_parents_are_never_replaced() {
    let d = tmp("cwd");
    let here = d.join("here");
    std::fs::create_dir(&here).unwrap();
    for args in [
        vec!["synth", "--out", ".", "--studies", "3"],
        vec!["synth", "--out", "..", "--studies", "3"],
        vec!["demo", "--dir", ".", "--studies", "20"],
    ] {
        let out = mura_in(&here, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("is the current folder or holds it"),
            "{args:?}: {err}"
        );
        assert_eq!(std::fs::read_dir(&here).unwrap().count(), 0, "{args:?}");
    }
    // Writing into the current folder is fine: `cd RUN && mura train --resume .`.
    let run = d.join("run");
    Command::new("cp")
        .args(["-r", s(trained()), s(&run)])
        .status()
        .unwrap();
    run_ok_in(
        &run,
        &["train", "--resume", ".", "--epochs", "2", "--quiet"],
    );
    let epochs = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(epochs.lines().count(), 2);
}

#[test]
fn prep_removes_only_canonical_leftovers_of_its_own_store() {
    let d = tmp("leftovers");
    let store = d.join("store");
    let src = s(&data().0);
    let prep = || {
        run_ok(&[
            "prep",
            "--mura-root",
            src,
            "--out",
            s(&store),
            "--size",
            "32",
        ])
    };
    prep();
    // Names that parse as generations but are not mura's spelling are not its leftovers.
    for odd in ["gen-007", "gen-+2", "gen-2x"] {
        std::fs::create_dir(store.join(odd)).unwrap();
        std::fs::write(store.join(odd).join("keep"), "mine").unwrap();
    }
    std::fs::create_dir(store.join("gen-5")).unwrap(); // an interrupted prep's generation
    prep();
    let names: BTreeSet<String> = std::fs::read_dir(&store)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let want = [".mura", "CURRENT", "gen-007", "gen-+2", "gen-2x", "gen-2"];
    assert_eq!(names, want.map(String::from).into());
    // A failed first prep leaves no folder behind.
    let bad = d.join("bad-tree");
    run_ok(&["synth", "--out", s(&bad), "--studies", "3"]);
    let png = walk_files(&bad, "png")[0].clone();
    std::fs::write(&png, b"not a png").unwrap();
    let new = d.join("new-store");
    let e = fails(&["prep", "--mura-root", s(&bad), "--out", s(&new), "--strict"]);
    assert!(e.contains("--strict"), "{e}");
    assert!(!new.exists(), "a failed first prep left {}", new.display());
}

// --- 2. a replacement that is one step --------------------------------------------------------

#[test]
fn synth_and_eval_replace_their_folders_in_one_step() {
    let d = tmp("one-step");
    let set = d.join("set");
    run_ok(&["synth", "--out", s(&set), "--studies", "4", "--seed", "1"]);
    let before = snapshot(&set);
    for fp in ["folder.written:1", "folder.written:1:enospc"] {
        let args = ["synth", "--out", s(&set), "--studies", "5", "--seed", "2"];
        let run = mura_bounded(&args, &[("MURA_FAILPOINT", fp)], 4 << 30, 120);
        assert!(!run.status.success(), "{fp}");
        assert_eq!(snapshot(&set), before, "{fp}: the old set is not whole");
    }
    run_ok(&["synth", "--out", s(&set), "--studies", "5", "--seed", "2"]);
    assert_ne!(snapshot(&set), before);
    // Nothing is left beside it, the killed run's new folder included.
    let names: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["set"]);

    // eval --out: metrics.json and predictions.csv change together.
    let out = d.join("eval");
    let best = trained().join("best.safetensors");
    let store = s(&data().1);
    let eval = [
        "eval",
        "--store",
        store,
        "--checkpoint",
        s(&best),
        "--out",
        s(&out),
    ];
    run_ok(&eval);
    std::fs::write(out.join("metrics.json"), "{\"old\": 1}").unwrap();
    let old = snapshot(&out);
    for fp in [
        "eval.metrics:1:enospc",
        "eval.metrics:1",
        "folder.written:1",
    ] {
        let run = mura_bounded(&eval, &[("MURA_FAILPOINT", fp)], 4 << 30, 120);
        assert!(!run.status.success(), "{fp}");
        assert_eq!(snapshot(&out), old, "{fp}: the old pair is not whole");
    }
    run_ok(&eval);
    let metrics = std::fs::read_to_string(out.join("metrics.json")).unwrap();
    assert!(metrics.contains("kappa"), "{metrics}");
}

#[test]
fn an_interrupted_demo_leaves_a_folder_the_next_demo_clears() {
    let d = tmp("demo");
    let dir = d.join("demo");
    let demo = [
        "demo",
        "--dir",
        s(&dir),
        "--studies",
        "20",
        "--epochs",
        "1",
        "--image-size",
        "32",
    ];
    // Killed while synthesising (its set is written, not yet in place), then while prepping.
    for fp in ["folder.written:2", "store.index-written:1"] {
        let run = mura_bounded(&demo, &[("MURA_FAILPOINT", fp)], 4 << 30, 300);
        assert!(!run.status.success(), "{fp}");
        assert!(
            dir.join(".mura").is_file(),
            "{fp}: the demo folder lost its marker"
        );
    }
    let run = mura_bounded(&demo, &[], 4 << 30, 300);
    assert!(run.status.success(), "{}", run.stderr);
    assert!(dir.join("eval/metrics.json").is_file());
}

// --- 6. streams and signals -------------------------------------------------------------------

#[test]
fn a_closed_stdout_or_stderr_never_cuts_a_command_short() {
    let d = tmp("streams");
    let out = d.join("eval");
    let best = trained().join("best.safetensors");
    let store = s(&data().1);
    // `mura eval ... | head -c0`: the reader is gone before the first line.
    let mut child = Command::new(env!("CARGO_BIN_EXE_mura"))
        .args([
            "eval",
            "--store",
            store,
            "--checkpoint",
            s(&best),
            "--out",
            s(&out),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(out.join("metrics.json").is_file() && out.join("predictions.csv").is_file());
    // `mura train ... 2>&1 >/dev/null | grep -m1 epoch`: stderr closed, the run completes.
    let run = d.join("run");
    let mut args = vec!["train", "--store", store, "--out", s(&run)];
    args.extend_from_slice(TINY);
    args.extend_from_slice(&["--epochs", "2", "--batch", "4"]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_mura"))
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let epochs = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(epochs.lines().count(), 2);
}

/// Runs `args` with the failpoint `point:1:stop`; once mura has stopped itself there, `meanwhile`
/// runs, then mura continues. Returns its (exit code, stderr).
fn stopped_at(args: &[&str], point: &str, meanwhile: impl FnOnce(u32)) -> (Option<i32>, String) {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    let mut child = Command::new(env!("CARGO_BIN_EXE_mura"))
        .args(args)
        .env("MURA_FAILPOINT", format!("{point}:1:stop"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let stat = format!("/proc/{pid}/stat");
    let t0 = std::time::Instant::now();
    // The state field of /proc/PID/stat is T once the process has stopped.
    while !std::fs::read_to_string(&stat)
        .unwrap_or_default()
        .rsplit(')')
        .next()
        .is_some_and(|rest| rest.trim_start().starts_with('T'))
    {
        assert!(
            t0.elapsed().as_secs() < 120,
            "mura {args:?} never reached {point}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    meanwhile(pid);
    Command::new("kill")
        .args(["-CONT", &pid.to_string()])
        .status()
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        status.signal(),
        None,
        "mura {args:?} was killed by a signal: {err}"
    );
    (status.code(), err)
}

#[test]
fn ctrl_c_exits_130_so_that_a_chain_of_commands_stops() {
    let run = tmp("ctrl-c").join("run");
    let mut args = vec!["train", "--store", s(&data().1), "--out", s(&run)];
    args.extend_from_slice(TINY);
    args.extend_from_slice(&["--epochs", "3", "--batch", "4", "--quiet"]);
    let (code, err) = stopped_at(&args, "train.step-done", |pid| {
        Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status()
            .unwrap();
    });
    assert_eq!(code, Some(130), "{err}");
    assert!(err.contains("interrupted: saved epoch 1 batch 1"), "{err}");
    assert!(run.join("last.safetensors").is_file());
}

#[test]
fn a_store_cut_short_under_a_command_is_one_error_line() {
    let d = tmp("sigbus");
    let store = d.join("store");
    Command::new("cp")
        .args(["-r", s(&data().1), s(&store)])
        .status()
        .unwrap();
    let bin = store.join("gen-1/images.bin");
    let best = trained().join("best.safetensors");
    let args = ["eval", "--store", s(&store), "--checkpoint", s(&best)];
    let (code, err) = stopped_at(&args, "store.opened", |_| {
        // Another program rewrites the store in place: truncated to its header.
        let f = std::fs::OpenOptions::new().write(true).open(&bin).unwrap();
        f.set_len(64).unwrap();
    });
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("failpoint"))
        .collect();
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with("error: ")
            && lines[0].contains("images.bin was cut short while mura read it"),
        "{err}"
    );
}

// --- 7. messages ------------------------------------------------------------------------------

#[test]
fn a_newline_from_a_file_cannot_forge_a_second_line() {
    let d = tmp("forged");
    let best = trained().join("best.safetensors");
    let forged = d.join("x\nerror: forged");
    let e = fails(&["predict", "--weights", s(&best), s(&forged)]);
    assert!(e.contains("x\\nerror: forged"), "{e}");
    let png = walk_files(&data().0, "png")[0].clone();
    // A study path with a newline in a folder name prints on its line too.
    let study = d.join("two\nlines");
    std::fs::create_dir(&study).unwrap();
    std::fs::copy(&png, study.join("image1.png")).unwrap();
    let (out, _) = run_ok(&["predict", "--weights", s(&best), s(&study)]);
    assert_eq!(out.lines().count(), 1, "{out}");
}

#[test]
fn a_missing_gpu_is_said_before_anything_is_written() {
    let d = tmp("gpu");
    let dir = d.join("demo");
    let e = fails(&["demo", "--dir", s(&dir), "--device", "cuda:99"]);
    assert!(e.contains("cuda"), "{e}");
    assert!(!dir.exists(), "demo wrote {} before failing", dir.display());
    let run = d.join("run");
    let mut args = vec![
        "train",
        "--store",
        s(&data().1),
        "--out",
        s(&run),
        "--device",
        "cuda:99",
    ];
    args.extend_from_slice(TINY);
    fails(&args);
    assert!(
        !run.exists(),
        "train wrote {} before failing",
        run.display()
    );
}

// --- 8. portability of runs -------------------------------------------------------------------

#[test]
fn a_run_resumes_on_another_machine_with_its_store_elsewhere() {
    let d = tmp("moved");
    // Trained from a folder with a relative --store, on one "machine"...
    let here = d.join("a");
    std::fs::create_dir(&here).unwrap();
    Command::new("cp")
        .args(["-r", s(&data().1), s(&here.join("store"))])
        .status()
        .unwrap();
    let mut args = vec!["train", "--store", "store", "--out", "run"];
    args.extend_from_slice(TINY);
    args.extend_from_slice(&["--epochs", "1", "--batch", "4", "--quiet"]);
    run_ok_in(&here, &args);
    // ...resumed from another folder, on another device setting and with fewer threads.
    let run = here.join("run");
    run_ok(&[
        "train",
        "--resume",
        s(&run),
        "--epochs",
        "2",
        "--device",
        "cpu",
        "--workers",
        "1",
        "--quiet",
    ]);
    // The run and its store moved to another machine: --store says where the store is now.
    let there = d.join("b");
    Command::new("mv")
        .args([s(&here), s(&there)])
        .status()
        .unwrap();
    let run = there.join("run");
    let e = fails(&["train", "--resume", s(&run), "--epochs", "3"]);
    assert!(e.contains("store"), "{e}");
    run_ok(&[
        "train",
        "--resume",
        s(&run),
        "--epochs",
        "3",
        "--store",
        s(&there.join("store")),
        "--quiet",
    ]);
    let epochs = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(epochs.lines().count(), 3);
    // Another store is still refused, by its identity.
    let other = prepped(&d.join("other"), 6, 9).1;
    let e = fails(&[
        "train",
        "--resume",
        s(&run),
        "--epochs",
        "4",
        "--store",
        s(&other),
    ]);
    assert!(e.contains("is not the one this run was trained on"), "{e}");
}

#[test]
fn file_names_that_are_not_utf8_are_read_or_said_so() {
    let d = tmp("utf8");
    let png = walk_files(&data().0, "png")[0].clone();
    let odd = d.join(std::ffi::OsStr::from_bytes(b"view\xff.png"));
    std::fs::copy(&png, &odd).unwrap();
    let best = trained().join("best.safetensors");
    let (one, _) = run_ok(&["predict", "--weights", s(&best), s(&png)]);
    let run = Command::new(env!("CARGO_BIN_EXE_mura"))
        .args(["predict", "--weights", s(&best)])
        .arg(&odd)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let p = |line: &str| {
        serde_json::from_str::<serde_json::Value>(line).unwrap()["probability"].as_f64()
    };
    assert_eq!(p(&String::from_utf8_lossy(&run.stdout)), p(&one));
    // prep, walking a tree without CSVs, lists such a file as skipped, saying why.
    let tree = d.join("tree");
    run_ok(&["synth", "--out", s(&tree), "--studies", "3"]);
    for csv in walk_files(&tree, "csv") {
        std::fs::remove_file(csv).unwrap();
    }
    let view = walk_files(&tree, "png")[0].clone();
    std::fs::copy(
        &view,
        view.with_file_name(std::ffi::OsStr::from_bytes(b"image\xfe.png")),
    )
    .unwrap();
    let (out, _) = run_ok(&[
        "prep",
        "--mura-root",
        s(&tree),
        "--out",
        s(&d.join("store")),
        "--size",
        "16",
    ]);
    assert!(out.contains("its name is not UTF-8 text"), "{out}");
}

/// The files under `dir` whose names end in `.ext`, sorted.
fn walk_files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut all = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            all.extend(walk_files(&p, ext));
        } else if p.extension().is_some_and(|x| x == ext) {
            all.push(p);
        }
    }
    all.sort();
    all
}
