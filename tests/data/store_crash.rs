//! Hard stops while `prep` replaces a store: killed (SIGKILL, through the `store` failpoints) at
//! every step, or out of disk space (ENOSPC injected at a step), the store folder always holds
//! the old store or the new one, complete, never nothing; the next prep cleans up. A second prep
//! into a store being written is refused.

use crate::common::{mura_bounded, one_error_line, run_ok, s, tmp, Bounded};
use mura::data::store::{self, Damage, Store};
use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};

const MEM: u64 = 4 << 30;
const SECS: u64 = 60;

/// A small MURA-like tree: (its folder, a store of it at 16² and that store's id).
struct Setup {
    dir: PathBuf,
    src: PathBuf,
    old: PathBuf,
    old_id: String,
}

fn setup(name: &str) -> Setup {
    let dir = tmp(name);
    let src = dir.join("src");
    run_ok(&["synth", "--out", s(&src), "--studies", "4", "--seed", "9"]);
    let old = dir.join("old");
    run_ok(&[
        "prep",
        "--mura-root",
        s(&src),
        "--out",
        s(&old),
        "--size",
        "16",
    ]);
    let old_id = Store::open(&old).unwrap().id();
    Setup {
        dir,
        src,
        old,
        old_id,
    }
}

/// `prep` of the tree at 20² into `out`, with `MURA_FAILPOINT` set to `failpoint` if given.
fn prep_with(setup: &Setup, out: &Path, failpoint: Option<&str>) -> Bounded {
    let args = [
        "prep",
        "--mura-root",
        s(&setup.src),
        "--out",
        s(out),
        "--size",
        "20",
    ];
    let env: Vec<(&str, &str)> = failpoint
        .map(|f| ("MURA_FAILPOINT", f))
        .into_iter()
        .collect();
    mura_bounded(&args, &env, MEM, SECS)
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn entries(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// The old store in the layout before generations (its files in the store folder).
fn flatten(store: &Path) {
    let gen = std::fs::read_to_string(store.join("CURRENT")).unwrap();
    let files = store.join(gen.trim());
    for f in ["images.bin", "index.json", "manifest.json"] {
        std::fs::rename(files.join(f), store.join(f)).unwrap();
    }
    std::fs::remove_dir(files).unwrap();
    std::fs::remove_file(store.join("CURRENT")).unwrap();
}

/// Kills a replacement of `start` (copied afresh each time) at step 1, 2, … until a prep
/// finishes: each time the store opens as the old one up to the commit and as the new one from
/// it on, and a prep over what the kill left succeeds and leaves only CURRENT and one
/// generation. Returns the steps killed at.
fn kill_at_every_step(setup: &Setup, start: &Path, name: &str) -> Vec<String> {
    let out = setup.dir.join(name);
    let mut steps = Vec::new();
    let mut new_id = None;
    for n in 1.. {
        copy_dir(start, &out);
        let run = prep_with(setup, &out, Some(&format!("store:{n}")));
        if run.status.success() {
            let id = Store::open(&out).unwrap().id();
            assert_eq!(new_id.get_or_insert(id.clone()), &id);
            break;
        }
        assert_eq!(run.status.signal(), Some(9), "step {n}: {}", run.stderr);
        let step = run
            .stderr
            .lines()
            .find_map(|l| l.strip_prefix("failpoint ")?.strip_suffix(": killed"))
            .unwrap_or_else(|| panic!("step {n}: {}", run.stderr))
            .to_string();
        let id = Store::open(&out)
            .unwrap_or_else(|e| panic!("nothing usable after a kill at {step}: {e:#}"))
            .id();
        let committed = steps.iter().any(|s| s == "store.switched") || step == "store.switched";
        match committed {
            false => assert_eq!(id, setup.old_id, "killed at {step}: not the old store"),
            true => assert_ne!(id, setup.old_id, "killed at {step}: not the new store"),
        }
        let after = prep_with(setup, &out, None);
        assert!(
            after.status.success(),
            "prep after {step}: {}",
            after.stderr
        );
        let left = entries(&out);
        assert_eq!(left.len(), 3, "after {step} and a prep: {left:?}");
        assert!(left.contains(".mura"), "{left:?}");
        assert!(left.contains("CURRENT"), "{left:?}");
        new_id.get_or_insert(Store::open(&out).unwrap().id());
        steps.push(step);
    }
    assert_ne!(new_id.as_deref(), Some(setup.old_id.as_str()));
    steps
}

#[test]
fn a_kill_at_any_step_of_a_replacement_leaves_the_old_or_the_new_store() {
    let setup = setup("kill");
    let steps = kill_at_every_step(&setup, &setup.old, "store");
    // Every step of the commit was visited, in order, around the pixels of every image.
    let distinct: Vec<&str> = steps
        .iter()
        .map(String::as_str)
        .fold(Vec::new(), |mut v, s| {
            if v.last() != Some(&s) {
                v.push(s);
            }
            v
        });
    let want = [
        "store.locked",
        "store.image-written",
        "store.images-synced",
        "store.index-written",
        "store.manifest-written",
        "store.generation-synced",
        "store.opened",
        "store.current-staged",
        "store.switched",
        "store.previous-removed",
    ];
    assert_eq!(distinct, want);
    let images = Store::open(&setup.old).unwrap().images.len();
    assert_eq!(steps.len(), want.len() - 1 + images);

    // A store written before generations is replaced the same way.
    let flat = setup.dir.join("flat");
    copy_dir(&setup.old, &flat);
    flatten(&flat);
    assert_eq!(Store::open(&flat).unwrap().id(), setup.old_id);
    assert_eq!(kill_at_every_step(&setup, &flat, "flat-store"), steps);
}

#[test]
fn a_kill_during_the_first_prep_leaves_no_store_and_the_next_prep_works() {
    let setup = setup("first");
    let out = setup.dir.join("fresh");
    for n in [1, 3, 12] {
        let _ = std::fs::remove_dir_all(&out);
        let run = prep_with(&setup, &out, Some(&format!("store:{n}")));
        assert_eq!(run.status.signal(), Some(9), "{}", run.stderr);
        let e = Store::open(&out).unwrap_err();
        assert!(
            matches!(
                e,
                store::Error::Damaged {
                    damage: Damage::Unfinished,
                    ..
                }
            ),
            "{e}"
        );
        let after = prep_with(&setup, &out, None);
        assert!(after.status.success(), "{}", after.stderr);
        assert_eq!(entries(&out).len(), 3, "{:?}", entries(&out));
    }
}

#[test]
fn a_full_disk_is_one_error_line_and_loses_nothing() {
    let setup = setup("enospc");
    for (step, file) in [
        ("store.image-written:3", "images.bin"),
        ("store.index-written:1", "index.json"),
        ("store.current-staged:1", "CURRENT.tmp-"),
    ] {
        let out = setup.dir.join("store");
        copy_dir(&setup.old, &out);
        let before = entries(&out);
        let run = prep_with(&setup, &out, Some(&format!("{step}:enospc")));
        let e = one_error_line(&run, step);
        assert!(
            e.contains(&format!("gen-2/{file}"))
                || e.contains(&format!("{}/{file}", out.display())),
            "{e}"
        );
        assert!(
            e.contains("No space left on device (os error 28)")
                && e.ends_with(&format!("(the store at {} is unchanged)", out.display())),
            "{e}"
        );
        assert_eq!(Store::open(&out).unwrap().id(), setup.old_id, "{step}");
        assert_eq!(entries(&out), before, "{step}: something was left behind");
    }
    // A first prep that runs out of space leaves nothing.
    let fresh = setup.dir.join("fresh");
    let run = prep_with(&setup, &fresh, Some("store.image-written:2:enospc"));
    let e = one_error_line(&run, "first prep");
    assert!(e.contains("No space left on device"), "{e}");
    assert!(!fresh.exists(), "{:?}", entries(&fresh));
}

/// While a `prep` writes a store folder it holds a lock on it: a second one is refused, so it
/// cannot take the first one's generation in progress for a leftover and remove it.
#[test]
fn a_second_prep_into_a_store_in_use_is_refused() {
    let setup = setup("locked");
    let out = setup.dir.join("store");
    copy_dir(&setup.old, &out);
    let before = entries(&out);
    let lock = std::fs::File::open(&out).unwrap();
    lock.try_lock().unwrap();
    let e = one_error_line(&prep_with(&setup, &out, None), "second prep");
    let want = format!(
        "another 'mura prep' is writing {}; wait for it to finish",
        s(&out)
    );
    assert!(e.ends_with(&want), "{e}");
    assert_eq!(entries(&out), before);
    assert_eq!(Store::open(&out).unwrap().id(), setup.old_id);
    drop(lock);
    let after = prep_with(&setup, &out, None);
    assert!(after.status.success(), "{}", after.stderr);
    assert_ne!(Store::open(&out).unwrap().id(), setup.old_id);
}
