//! Hard stops while `train` saves its last checkpoint: killed (SIGKILL, through the `checkpoint`
//! failpoints) at every step of every save of a short run, or out of disk space at a step,
//! `mura train --resume` always goes on from the last committed step, never refuses, and ends
//! with the per-epoch metrics of a run never stopped; nothing committed is lost and nothing an
//! interrupted save wrote is left behind. Runs written before generations still resume.

use crate::common::{mura_bounded, one_error_line, s, tmp, Bounded, TINY};
use mura::weights::load_safetensors;
use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const MEM: u64 = 4 << 30;
const SECS: u64 = 120;
/// The short run: 3 epochs of 2 batches, so the saves come at Adam steps 2, 4 and 6.
const EPOCHS: usize = 3;
const BATCHES: u64 = 2;
/// The steps of one save, in order (see `checkpoint::save_last`).
const STEPS: [&str; 4] = [
    "checkpoint.optim-written",
    "checkpoint.model-written",
    "checkpoint.committed",
    "checkpoint.previous-removed",
];

fn store() -> &'static PathBuf {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| crate::common::prepped(&tmp("data"), 24, 4).1)
}

/// `mura train` of the short run into `run`, with `MURA_FAILPOINT` set to `failpoint` if given.
fn train(run: &Path, epochs: usize, failpoint: Option<&str>) -> Bounded {
    let (store, epochs) = (s(store()), epochs.to_string());
    let mut args = vec!["train", "--store", store, "--out", s(run), "--quiet"];
    args.extend_from_slice(TINY);
    args.extend(["--image-size", "32", "--batch", "2", "--epochs", &epochs]);
    args.extend(["--max-batches", "2"]);
    let env: Vec<(&str, &str)> = failpoint
        .map(|f| ("MURA_FAILPOINT", f))
        .into_iter()
        .collect();
    mura_bounded(&args, &env, MEM, SECS)
}

/// `mura train --resume run` (with `--epochs` if given), which must succeed.
fn resume(run: &Path, epochs: Option<usize>) -> Bounded {
    let epochs = epochs.map(|e| e.to_string());
    let mut args = vec!["train", "--resume", s(run), "--quiet"];
    args.extend(epochs.iter().flat_map(|e| ["--epochs", e.as_str()]));
    let r = mura_bounded(&args, &[], MEM, SECS);
    assert!(
        r.status.success(),
        "resume of {}: {}",
        run.display(),
        r.stderr
    );
    r
}

/// Each line of `metrics.jsonl` without its timings: what an uninterrupted run reproduces.
fn metrics(run: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
    text.lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let m = v.as_object_mut().unwrap();
            m.remove("seconds");
            m.remove("images_per_s");
            v
        })
        .collect()
}

/// The metrics of the short run trained without a stop.
fn reference() -> &'static Vec<serde_json::Value> {
    static M: OnceLock<Vec<serde_json::Value>> = OnceLock::new();
    M.get_or_init(|| {
        let run = tmp("reference");
        let r = train(&run, EPOCHS, None);
        assert!(r.status.success(), "{}", r.stderr);
        let m = metrics(&run);
        assert_eq!(m.len(), EPOCHS);
        m
    })
}

fn entries(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// The Adam step of the committed checkpoint (`last.safetensors`), if there is one.
fn committed_step(run: &Path) -> Option<u64> {
    let last = run.join("last.safetensors");
    last.exists().then(|| {
        let meta = load_safetensors(&last).unwrap().metadata;
        meta["adam_step"].parse().unwrap()
    })
}

/// A finished run holds its files and exactly one optimiser file, the one its model names.
fn assert_tidy(run: &Path, what: &str) {
    let mut names = entries(run);
    let meta = load_safetensors(&run.join("last.safetensors"))
        .unwrap()
        .metadata;
    let optim = &meta["optimizer"];
    assert!(names.remove(optim), "{what}: no {optim} in {names:?}");
    let want = [
        ".mura",
        "best.safetensors",
        "config.json",
        "last.safetensors",
        "metrics.jsonl",
        "val_predictions.csv",
    ];
    assert_eq!(names, want.map(String::from).into(), "{what}");
}

#[test]
fn a_kill_at_any_step_of_any_save_resumes_from_the_last_commit() {
    let want = reference();
    let dir = tmp("kill");
    for n in 1.. {
        let run = dir.join(format!("kill-{n}"));
        let killed = train(&run, EPOCHS, Some(&format!("checkpoint:{n}")));
        if killed.status.success() {
            assert_eq!(n, 1 + STEPS.len() * EPOCHS, "{}", killed.stderr);
            assert_eq!(&metrics(&run), want);
            break;
        }
        assert_eq!(
            killed.status.signal(),
            Some(9),
            "kill {n}: {}",
            killed.stderr
        );
        let (save, at) = ((n - 1) / STEPS.len(), (n - 1) % STEPS.len());
        let step = STEPS[at];
        let what = format!("killed at {step} of save {}", save + 1);
        assert!(
            killed.stderr.contains(&format!("failpoint {step}: killed")),
            "{what}: {}",
            killed.stderr
        );
        // Every earlier save is committed, and this one from the rename on.
        let saves = save + usize::from(at >= 2);
        let step_committed = (saves > 0).then_some(saves as u64 * BATCHES);
        assert_eq!(committed_step(&run), step_committed, "{what}");
        let resumed = resume(&run, None);
        let restarted = resumed.stderr.contains("training from the beginning");
        assert_eq!(restarted, saves == 0, "{what}: {}", resumed.stderr);
        assert_eq!(&metrics(&run), want, "{what}");
        assert_tidy(&run, &what);
        println!("{what}: resumed in {:.2} s", resumed.seconds);
    }
}

/// A kill while another file of the run is replaced (`config.json`, the best model, its
/// validation predictions): the run resumes as well, or, killed before its `config.json` was
/// in place, is no run yet and starts again.
#[test]
fn a_kill_while_any_other_file_is_replaced_loses_nothing() {
    let want = reference();
    let dir = tmp("kill-other");
    for n in 1.. {
        let run = dir.join(format!("kill-{n}"));
        let killed = train(&run, EPOCHS, Some(&format!("atomic-write:{n}")));
        if killed.status.success() {
            assert!(n > 3, "{}", killed.stderr);
            assert_eq!(&metrics(&run), want);
            break;
        }
        assert_eq!(
            killed.status.signal(),
            Some(9),
            "kill {n}: {}",
            killed.stderr
        );
        let again = match run.join("config.json").exists() {
            true => resume(&run, None),
            false => train(&run, EPOCHS, None),
        };
        assert!(again.status.success(), "kill {n}: {}", again.stderr);
        assert_eq!(&metrics(&run), want, "kill {n}");
        assert_tidy(&run, &format!("kill {n}"));
    }
}

/// A kill (or a full disk) in the middle of appending an epoch's line to `metrics.jsonl`: the
/// torn line goes, and the checkpoint's copy of it takes its place.
#[test]
fn a_torn_metrics_line_is_restored_from_the_checkpoint() {
    let run = tmp("torn-line").join("run");
    let r = train(&run, EPOCHS - 1, None);
    assert!(r.status.success(), "{}", r.stderr);
    let path = run.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, &text[..text.len() - 40]).unwrap();
    resume(&run, Some(EPOCHS));
    assert_eq!(&metrics(&run), reference());
}

#[test]
fn a_full_disk_during_a_save_stops_training_and_loses_nothing() {
    let want = reference();
    let dir = tmp("enospc");
    // (failpoint, the file it fails, the Adam step committed before it, what resume does)
    let cases = [
        (
            "checkpoint.optim-written:2",
            "last.optim-2.safetensors",
            Some(2),
            "continues from the last checkpoint",
        ),
        (
            "checkpoint.model-written:2",
            "last.safetensors",
            Some(2),
            "continues from the last checkpoint",
        ),
        (
            "atomic-write:2",
            "best.safetensors",
            None,
            "starts the run again",
        ),
    ];
    for (i, (point, file, committed, then)) in cases.into_iter().enumerate() {
        let run = dir.join(format!("run-{i}"));
        let failed = train(&run, EPOCHS, Some(&format!("{point}:enospc")));
        let e = one_error_line(&failed, point);
        let resume_line = format!("training stopped: `mura train --resume {}` {then}", s(&run));
        assert!(
            e.contains(&format!(
                "cannot write {}: No space left on device",
                s(&run.join(file))
            )) && e.ends_with(&resume_line),
            "{point}: {e}"
        );
        assert_eq!(committed_step(&run), committed, "{point}");
        let left = entries(&run);
        assert!(
            left.iter()
                .all(|n| (n == ".mura" || !n.starts_with('.')) && n != "last.optim-2.safetensors"),
            "{point} left {left:?}"
        );
        resume(&run, None);
        assert_eq!(&metrics(&run), want, "{point}");
        assert_tidy(&run, point);
    }
}

/// While a `train` writes a run folder it holds a lock on it: a second one is refused, so it
/// cannot take the first one's save in progress for a leftover and remove it.
#[test]
fn a_second_train_into_a_run_in_use_is_refused() {
    let run = tmp("locked").join("run");
    let r = train(&run, 1, None);
    assert!(r.status.success(), "{}", r.stderr);
    let lock = std::fs::File::open(&run).unwrap();
    lock.try_lock().unwrap();
    let before = entries(&run);
    let args = ["train", "--resume", s(&run), "--epochs", "2"];
    let e = one_error_line(&mura_bounded(&args, &[], MEM, SECS), "second train");
    let want = format!(
        "another 'mura train' is writing {}; wait for it to finish",
        s(&run)
    );
    assert!(e.ends_with(&want), "{e}");
    assert_eq!(entries(&run), before);
    drop(lock);
    resume(&run, Some(2));
}

/// Rewrites `path`'s metadata with `edit`.
fn edit_metadata(path: &Path, edit: impl FnOnce(&mut std::collections::HashMap<String, String>)) {
    let mut ck = load_safetensors(path).unwrap();
    edit(&mut ck.metadata);
    mura::weights::save_safetensors(path, &ck.state_dict, &ck.metadata).unwrap();
}

/// Makes `run` look as an earlier mura left it: the optimiser in `last.optim.safetensors`, the
/// model naming no optimiser file.
fn to_legacy_layout(run: &Path) {
    let last = run.join("last.safetensors");
    let mut optim = String::new();
    edit_metadata(&last, |m| optim = m.remove("optimizer").unwrap());
    std::fs::rename(run.join(optim), run.join("last.optim.safetensors")).unwrap();
}

#[test]
fn runs_written_before_generations_resume_or_say_why_not() {
    let want = reference();
    let dir = tmp("legacy");
    let run = dir.join("run");
    let r = train(&run, EPOCHS - 1, None);
    assert!(r.status.success(), "{}", r.stderr);
    to_legacy_layout(&run);
    resume(&run, Some(EPOCHS));
    assert_eq!(&metrics(&run), want);
    assert_tidy(&run, "after resuming a run of the earlier layout");

    // A pair torn by a kill between the earlier mura's two renames: refused, nothing removed.
    let torn = dir.join("torn");
    let r = train(&torn, EPOCHS - 1, None);
    assert!(r.status.success(), "{}", r.stderr);
    to_legacy_layout(&torn);
    edit_metadata(&torn.join("last.safetensors"), |m| {
        m.insert("adam_step".into(), "2".into());
    });
    let before = entries(&torn);
    let args = ["train", "--resume", s(&torn), "--epochs", "3"];
    let e = one_error_line(&mura_bounded(&args, &[], MEM, SECS), "torn pair");
    assert!(
        e.contains("are from different steps")
            && e.ends_with(&format!(
                "`mura train --init {}`",
                s(&torn.join("last.safetensors"))
            )),
        "{e}"
    );
    assert_eq!(entries(&torn), before);
}
