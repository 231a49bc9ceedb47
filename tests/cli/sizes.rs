//! Sizes checked alike by every command (issue 21, class 5): every count a user gives has its
//! stated bounds, refused when parsed (exit 2, one line) before anything is written, and the
//! same bounds hold for a run's config.json on resume.

use crate::common::{mura_bounded, one_error_line, run_ok, TINY};
use std::path::{Path, PathBuf};

fn tmp(name: &str) -> PathBuf {
    crate::common::tmp("sizes", name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs mura (within 4 GiB and 30 s) on arguments that must not parse: its one error line.
fn refused(args: &[&str]) -> String {
    let run = mura_bounded(args, &[], 4 << 30, 30);
    assert_eq!(run.status.code(), Some(2), "mura {args:?}: {}", run.stderr);
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert!(
        lines.len() == 1 && lines[0].starts_with("error: "),
        "mura {args:?}: {}",
        run.stderr
    );
    lines[0].to_string()
}

const HUGE: &str = "18446744073709551615";

/// The arguments `parts`, concatenated.
fn cat(parts: &[&[&str]]) -> Vec<String> {
    parts
        .iter()
        .flat_map(|p| p.iter().map(|a| a.to_string()))
        .collect()
}

#[test]
fn every_count_is_bounded_when_parsed_and_nothing_is_written() {
    let d = tmp("parse");
    let out = d.join("out");
    let o = s(&out);
    let train: &[&str] = &["train", "--store", "no-store", "--out", o];
    let eval: &[&str] = &[
        "eval",
        "--store",
        "no-store",
        "--checkpoint",
        "no.safetensors",
    ];
    let cases: Vec<(Vec<String>, &str, &str, &str)> = vec![
        (
            cat(&[&["bench"], TINY, &["--batch", HUGE]]),
            "--batch",
            HUGE,
            "1..=4096",
        ),
        (
            cat(&[&["bench"], TINY, &["--batch", "100000000"]]),
            "--batch",
            "100000000",
            "1..=4096",
        ),
        (
            cat(&[&["bench"], TINY, &["--batch", "0"]]),
            "--batch",
            "0",
            "1..=4096",
        ),
        (
            cat(&[&["bench"], TINY, &["--steps", HUGE]]),
            "--steps",
            HUGE,
            "1..=1000000",
        ),
        (
            cat(&[&["bench"], TINY, &["--warmup", HUGE]]),
            "--warmup",
            HUGE,
            "0..=1000000",
        ),
        (
            cat(&[&["bench"], TINY, &["--image-size", "4097"]]),
            "--image-size",
            "4097",
            "8..=4096",
        ),
        (
            cat(&[eval, &["--batch", HUGE]]),
            "--batch",
            HUGE,
            "1..=4096",
        ),
        (
            cat(&[eval, &["--image-size", "7"]]),
            "--image-size",
            "7",
            "8..=4096",
        ),
        (
            cat(&[train, TINY, &["--patience", "4294967296"]]),
            "--patience",
            "4294967296",
            "0..=10000",
        ),
        (
            cat(&[train, TINY, &["--epochs", "0"]]),
            "--epochs",
            "0",
            "1..=100000",
        ),
        (
            cat(&[train, TINY, &["--epochs", HUGE]]),
            "--epochs",
            HUGE,
            "1..=100000",
        ),
        (
            cat(&[train, TINY, &["--batch", "4097"]]),
            "--batch",
            "4097",
            "1..=4096",
        ),
        (
            cat(&[train, TINY, &["--workers", "0"]]),
            "--workers",
            "0",
            "1..=256",
        ),
        (
            cat(&[train, TINY, &["--max-views", "0"]]),
            "--max-views",
            "0",
            "1..=4096",
        ),
        (
            cat(&[train, TINY, &["--max-batches", HUGE]]),
            "--max-batches",
            HUGE,
            "1..=1000000000",
        ),
        (
            cat(&[train, TINY, &["--image-size", HUGE]]),
            "--image-size",
            HUGE,
            "8..=4096",
        ),
        (
            cat(&[&["prep", "--mura-root", "x", "--out", o, "--size", "65536"]]),
            "--size",
            "65536",
            "8..=4096",
        ),
        (
            cat(&[&["synth", "--out", o, "--studies", HUGE]]),
            "--studies",
            HUGE,
            "1..=1000000",
        ),
        (
            cat(&[&["demo", "--dir", o, "--studies", HUGE]]),
            "--studies",
            HUGE,
            "1..=1000000",
        ),
        (
            cat(&[&["demo", "--dir", o, "--epochs", "0"]]),
            "--epochs",
            "0",
            "1..=100000",
        ),
        (
            cat(&[&[
                "predict",
                "--weights",
                "no.safetensors",
                "--image-size",
                "0",
                "x.png",
            ]]),
            "--image-size",
            "0",
            "8..=4096",
        ),
    ];
    for (args, option, value, bounds) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let e = refused(&args);
        assert!(
            e.starts_with(&format!("error: invalid value '{value}' for '{option} <"))
                && e.contains(&format!("{value} is not in {bounds}")),
            "mura {args:?}: {e}"
        );
        assert!(!out.exists(), "mura {args:?} wrote {o}");
    }
}

#[test]
fn a_config_json_out_of_bounds_is_refused_on_resume() {
    let d = tmp("config");
    let (_, store) = crate::common::prepped(&d, 8, 2);
    let run = d.join("run");
    let mut args = vec!["train", "--store", s(&store), "--out", s(&run), "--quiet"];
    args.extend_from_slice(TINY);
    args.extend(["--image-size", "32", "--epochs", "1", "--max-batches", "1"]);
    run_ok(&args);
    let config = run.join("config.json");
    let good = std::fs::read_to_string(&config).unwrap();
    for (field, value, want) in [
        (
            "patience",
            "4294967296",
            "--patience 4294967296 is out of range (0..=10000)",
        ),
        ("batch", "0", "--batch 0 is out of range (1..=4096)"),
        (
            "workers",
            "100000",
            "--workers 100000 is out of range (1..=256)",
        ),
        ("max_views", "0", "--max-views 0 is out of range (1..=4096)"),
    ] {
        let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
        v[field] = serde_json::from_str(value).unwrap();
        std::fs::write(&config, v.to_string()).unwrap();
        let r = mura_bounded(
            &["train", "--resume", s(&run), "--epochs", "2"],
            &[],
            4 << 30,
            30,
        );
        let e = one_error_line(&r, field);
        assert!(
            e.contains("config.json") && e.contains(want),
            "{field}: {e}"
        );
    }
    std::fs::write(&config, good).unwrap();
}
