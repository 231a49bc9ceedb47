//! `mura score` on crafted files, run through the built binary.

use crate::common::tmp;
use std::process::Command;

const LABELS: &str = "\
MURA-v1.1/valid/XR_WRIST/patient1/study1_positive/,1
MURA-v1.1/valid/XR_WRIST/patient2/study1_positive/,1
MURA-v1.1/valid/XR_WRIST/patient3/study1_negative/,0
MURA-v1.1/valid/XR_WRIST/patient4/study1_negative/,0
MURA-v1.1/valid/XR_HAND/patient5/study1_positive/,1
MURA-v1.1/valid/XR_HAND/patient6/study1_negative/,0
";

/// Runs `mura score` on the given file contents; returns (exit ok, stdout, stderr).
fn score(name: &str, labels: &str, preds: &str, json: bool) -> (bool, String, String) {
    let d = tmp(name);
    std::fs::write(d.join("labels.csv"), labels).unwrap();
    std::fs::write(d.join("preds.csv"), preds).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mura"));
    cmd.arg("score")
        .arg("--labels")
        .arg(d.join("labels.csv"))
        .arg("--predictions")
        .arg(d.join("preds.csv"));
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().unwrap();
    std::fs::remove_dir_all(&d).ok();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn scores_kappa_per_type_and_overall() {
    // Another order, CRLF line ends and one path without its trailing '/'.
    let preds = "MURA-v1.1/valid/XR_HAND/patient6/study1_negative/,0\r\n\
                 MURA-v1.1/valid/XR_WRIST/patient2/study1_positive,0\r\n\
                 MURA-v1.1/valid/XR_WRIST/patient1/study1_positive/,1\r\n\
                 MURA-v1.1/valid/XR_WRIST/patient4/study1_negative/,0\r\n\
                 MURA-v1.1/valid/XR_HAND/patient5/study1_positive/,1\r\n\
                 MURA-v1.1/valid/XR_WRIST/patient3/study1_negative/,0\r\n";
    let (ok, out, err) = score("good", LABELS, preds, true);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    // Wrist: tp 1, fn 1, tn 2: po 0.75, pe 0.5, κ 0.5. Hand: perfect, κ 1.
    // Overall: tp 2, fn 1, tn 3: po 5/6, pe (2·3 + 4·3)/36 = 0.5, κ 2/3.
    let k = |x: &serde_json::Value| x["kappa"].as_f64().unwrap();
    assert!((k(&v["by_type"]["XR_WRIST"]) - 0.5).abs() < 1e-12, "{out}");
    assert!((k(&v["by_type"]["XR_HAND"]) - 1.0).abs() < 1e-12, "{out}");
    assert!((k(&v["overall"]) - 2.0 / 3.0).abs() < 1e-12, "{out}");
    assert!((v["overall"]["accuracy"].as_f64().unwrap() - 5.0 / 6.0).abs() < 1e-12);
    assert_eq!(v["overall"]["n"], 6);
    assert_eq!(v["by_type"]["XR_WRIST"]["n"], 4);

    let (ok, out, _) = score("good-table", LABELS, preds, false);
    assert!(ok);
    assert!(
        out.lines()
            .any(|l| l.starts_with("overall") && l.contains("0.667")),
        "{out}"
    );
}

/// A bad input fails with one clear `error:` line containing `want`, and no panic.
fn fails(name: &str, labels: &str, preds: &str, want: &str) {
    let (ok, _, err) = score(name, labels, preds, false);
    assert!(!ok, "{name}: should fail");
    assert_eq!(err.trim().lines().count(), 1, "{name}: {err}");
    assert!(
        err.starts_with("error: ") && err.contains(want),
        "{name}: {err}"
    );
}

#[test]
fn bad_files_are_clear_errors() {
    let preds: String = LABELS.replace(",1\n", ",0\n");
    let drop_last: String = preds.lines().take(5).map(|l| format!("{l}\n")).collect();
    fails(
        "missing",
        LABELS,
        &drop_last,
        "1 labelled studies have no prediction, e.g. 'MURA-v1.1/valid/XR_HAND/patient6",
    );
    let extra = format!("{preds}MURA-v1.1/valid/XR_ELBOW/patient9/study1_negative/,1\n");
    fails(
        "extra",
        LABELS,
        &extra,
        "1 predictions are for studies without a label, e.g. 'MURA-v1.1/valid/XR_ELBOW",
    );
    let dup = format!("{preds}MURA-v1.1/valid/XR_WRIST/patient2/study1_positive/,1\n");
    fails("duplicate", LABELS, &dup, "preds.csv line 7: study 'MURA-v1.1/valid/XR_WRIST/patient2/study1_positive/' repeats line 2");
    let bad_label = preds.replacen(",0\n", ",0.7\n", 1);
    fails(
        "bad-label",
        LABELS,
        &bad_label,
        "preds.csv line 1: label must be 0 or 1, got '0.7'",
    );
    let no_comma = preds.replacen(
        "patient3/study1_negative/,0",
        "patient3/study1_negative/ 0",
        1,
    );
    fails(
        "no-comma",
        LABELS,
        &no_comma,
        "preds.csv line 3: expected 'study_path,label'",
    );
    let no_type = LABELS.replacen("XR_HAND/patient5", "HAND/patient5", 1);
    fails(
        "no-type",
        &no_type,
        &preds,
        "labels.csv line 5: no study type",
    );
    fails("empty", "\n", &preds, "has no studies");
    let out = Command::new(env!("CARGO_BIN_EXE_mura"))
        .args([
            "score",
            "--labels",
            "/nonexistent/labels.csv",
            "--predictions",
            "/nonexistent/p.csv",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        !out.status.success() && err.contains("cannot read /nonexistent/labels.csv"),
        "{err}"
    );
}
