//! Sizes checked alike by every command (issue 21, class 5): every count a user gives has its
//! stated bounds, refused when parsed (exit 2, one line) before anything is written, and the
//! same bounds hold for a run's config.json on resume; evaluation splits a study of many views
//! over batches, so its memory stays bounded.

use crate::common::{mura_bounded, one_error_line, run_ok, s, tmp, TINY};

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

#[test]
fn a_study_of_1000_views_is_evaluated_in_bounded_memory() {
    let d = tmp("views");
    let (src, _) = crate::common::prepped(&d, 16, 9);
    // One validation study with 1000 views (copies of its own), listed in the image CSV.
    let m = src.join("MURA-v1.1");
    let csv = m.join("valid_image_paths.csv");
    let paths = std::fs::read_to_string(&csv).unwrap();
    let first = paths.lines().next().unwrap().to_string();
    let (study, _) = first.rsplit_once('/').unwrap();
    let folder = src.join(study);
    let png = std::fs::read(src.join(&first)).unwrap();
    let mut more = String::new();
    for v in 0..1000 - std::fs::read_dir(&folder).unwrap().count() {
        std::fs::write(folder.join(format!("copy{v}.png")), &png).unwrap();
        more.push_str(&format!("{study}/copy{v}.png\n"));
    }
    std::fs::write(&csv, format!("{paths}{more}")).unwrap();
    let store = d.join("store");
    run_ok(&[
        "prep",
        "--mura-root",
        s(&src),
        "--out",
        s(&store),
        "--size",
        "32",
    ]);
    let run = d.join("run");
    let mut args = vec!["train", "--store", s(&store), "--out", s(&run), "--quiet"];
    args.extend_from_slice(TINY);
    args.extend(["--image-size", "32", "--epochs", "1", "--max-batches", "1"]);
    run_ok(&args);
    // eval at 224x224: 1000 inputs of 224² are 600 MB of f32 alone, and more in the model's
    // activations; here within 1 GiB of address space. (That the parts of a split study are
    // scored as one is checked against a batch per study in `tests/data`.)
    let best = run.join("best.safetensors");
    let out = d.join("eval");
    let eval = [
        "eval",
        "--store",
        s(&store),
        "--checkpoint",
        s(&best),
        "--image-size",
        "224",
        "--out",
        s(&out),
    ];
    let r = mura_bounded(&eval, &[], 1 << 30, 120);
    assert!(r.status.success(), "{}", r.stderr);
    let csv = std::fs::read_to_string(out.join("predictions.csv")).unwrap();
    let rows: Vec<&str> = csv
        .lines()
        .filter(|l| l.starts_with(&format!("{study}/,")))
        .collect();
    assert_eq!(rows.len(), 1, "{csv}");
}
