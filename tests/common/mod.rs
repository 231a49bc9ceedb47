//! Helpers shared by the integration tests that drive the `mura` binary.
#![allow(dead_code)] // each test file uses its own subset

pub mod gpu;

use std::path::PathBuf;
use std::process::{Command, Output};

/// Run the built binary.
pub fn mura(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mura"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run mura")
}

/// Run a command that must succeed; its (stdout, stderr).
pub fn run_ok(args: &[&str]) -> (String, String) {
    let out = mura(args);
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "mura {args:?} failed:\n{so}\n{se}");
    (so, se)
}

/// A fresh empty folder for one test.
pub fn tmp(prefix: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mura-{prefix}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A small synthetic set prepped at 32x32 under `dir`: (source, store).
pub fn prepped(dir: &std::path::Path, studies: usize, seed: u64) -> (PathBuf, PathBuf) {
    let (src, store) = (dir.join("src"), dir.join("store"));
    let (n, sd) = (studies.to_string(), seed.to_string());
    run_ok(&[
        "synth",
        "--out",
        src.to_str().unwrap(),
        "--studies",
        &n,
        "--seed",
        &sd,
    ]);
    run_ok(&[
        "prep",
        "--mura-root",
        src.to_str().unwrap(),
        "--out",
        store.to_str().unwrap(),
        "--size",
        "32",
    ]);
    (src, store)
}

/// The tiny custom DenseNet the tests train.
pub const TINY: &[&str] = &[
    "--arch",
    "custom",
    "--growth-rate",
    "4",
    "--block-config",
    "2,2",
    "--num-init-features",
    "8",
    "--bn-size",
    "2",
];
