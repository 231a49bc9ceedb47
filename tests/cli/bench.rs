//! `mura bench --plan`: the launch plan as text and as one JSON object, on a machine without a
//! GPU; its argument checks; the emulator's profile as JSON lines.

use crate::common::{mura, run_ok};

const SMALL: &[&str] = &[
    "--arch",
    "densenet121",
    "--batch",
    "2",
    "--image-size",
    "64",
];

fn plan(extra: &[&str]) -> (String, String) {
    let mut a = vec!["bench", "--plan"];
    a.extend_from_slice(SMALL);
    a.extend_from_slice(extra);
    run_ok(&a)
}

#[test]
fn plan_json_has_the_summary_and_every_launch() {
    let (out, _) = plan(&["--precision", "bf16", "--json"]);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    let n = |k: &str| j[k].as_u64().unwrap_or_else(|| panic!("{k} in {j}"));
    let launches = j["launches"].as_array().unwrap();
    let train = launches.iter().filter(|l| l["pass"] == "train").count();
    let eval = launches.iter().filter(|l| l["pass"] == "eval").count();
    assert_eq!(
        (n("train_launches"), n("eval_launches")),
        (train as u64, eval as u64)
    );
    assert!(train > eval && eval > 0 && n("memsets") > 0);
    let under = |pred: &dyn Fn(u64) -> bool| {
        let blocks = |l: &&serde_json::Value| l["blocks"].as_u64().unwrap();
        launches
            .iter()
            .filter(|l| l["pass"] == "train")
            .filter(|l| pred(blocks(l)))
            .count()
    };
    assert_eq!(n("underfilled"), under(&|b| b < 132) as u64);
    assert_eq!(n("one_block"), under(&|b| b == 1) as u64);
    let floor: f64 = launches
        .iter()
        .filter(|l| l["pass"] == "train")
        .map(|l| l["floor_us"].as_f64().unwrap())
        .sum();
    let (f, b) = (
        j["floor_ms"].as_f64().unwrap(),
        j["launch_bound_ms"].as_f64().unwrap(),
    );
    assert!(
        (floor / 1e3 - f).abs() < 1e-9 * f && b >= f && f > 0.0,
        "{floor} {f} {b}"
    );
    for key in [
        "stage",
        "kernel",
        "threads",
        "shared_bytes",
        "resident_per_sm",
        "waves",
    ] {
        assert!(
            launches[0].get(key).is_some(),
            "{key} missing: {}",
            launches[0]
        );
    }
    assert_eq!(launches.last().unwrap()["kernel"], "linear_fwd_f32");
}

#[test]
fn plan_text_lists_launches_then_the_summary() {
    let (out, _) = plan(&["--sms", "108", "--arch-sm", "80"]);
    assert!(
        out.starts_with("launch plan of densenet121, f32, batch 2, 64x64, on 108 SMs"),
        "{out}"
    );
    for want in [
        "train stem fwd",
        "conv_fwd_f32",
        "eval  head fwd",
        "train step",
        "eval forward",
    ] {
        assert!(out.contains(want), "'{want}' missing from:\n{out}");
    }
    assert!(out.contains("largest launch groups"), "{out}");
}

#[test]
fn plan_refuses_bad_cards_in_one_line() {
    let mut a = vec!["bench", "--plan", "--sms", "0"];
    a.extend_from_slice(SMALL);
    let out = mura(&a);
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert!(
        e.trim().starts_with("error: --sms 0") && e.trim().lines().count() == 1,
        "{e}"
    );
    let out = mura(&[
        "bench",
        "--plan",
        "--arch-sm",
        "75",
        "--batch",
        "2",
        "--image-size",
        "64",
    ]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("use one of sm_80") && e.trim().lines().count() == 1,
        "{e}"
    );
    let out = mura(&["bench", "--sms", "100"]);
    assert_eq!(out.status.code(), Some(2), "--sms without --plan");
}

/// `mura bench --device emu --profile --json`: the timing object, then one JSON line per kernel
/// with its counts, whose efficiencies and ways are the table's (fractions, wavefront ratios).
#[test]
fn emulator_profile_as_json_lines() {
    let mut a = vec!["bench", "--device", "emu", "--precision", "bf16"];
    a.extend_from_slice(crate::common::TINY);
    a.extend_from_slice(&[
        "--batch",
        "1",
        "--image-size",
        "32",
        "--steps",
        "1",
        "--warmup",
        "0",
    ]);
    a.extend_from_slice(&["--profile", "--json"]);
    let (out, _) = run_ok(&a);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(lines[0]["train_step_s"].as_f64().is_some(), "{}", lines[0]);
    let kernels = &lines[1..];
    let conv = kernels
        .iter()
        .find(|k| k["kernel"] == "conv1x1_tc_fwd_bf16")
        .unwrap_or_else(|| panic!("no 1x1 forward in {out}"));
    let u = |k: &str| conv[k].as_u64().unwrap_or_else(|| panic!("{k} in {conv}"));
    assert!(u("launches") > 0 && u("mma") > 0 && u("ld_requests") > 0);
    assert!(u("ld_sectors") >= u("ld_requests") && u("st_sectors") >= u("st_requests"));
    for key in ["ld_efficiency", "st_efficiency"] {
        let e = conv[key].as_f64().unwrap();
        assert!(e > 0.0 && e <= 1.0, "{key} {e}");
    }
    for key in ["shared_st_ways", "ldmatrix_ways"] {
        assert!(conv[key].as_f64().unwrap() >= 1.0, "{key} in {conv}");
    }
    assert!(kernels
        .iter()
        .all(|k| k["kernel"].is_string() && k["launches"].as_u64() > Some(0)));
}
