//! `mura report` on a synthetic run folder, through the built binary.

use crate::common::gpu::seed;
use crate::common::tmp;
use mura::rng::Rng;
use std::fmt::Write;
use std::path::Path;
use std::process::Command;

const TYPES: [&str; 7] = [
    "XR_ELBOW",
    "XR_FINGER",
    "XR_FOREARM",
    "XR_HAND",
    "XR_HUMERUS",
    "XR_SHOULDER",
    "XR_WRIST",
];

/// A run folder with `epochs` epochs of plausible, random metrics and validation predictions.
fn fake_run(dir: &Path, rng: &mut Rng, epochs: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut jsonl = String::new();
    let mut lr = 1e-4;
    for e in 1..=epochs {
        if e % 4 == 0 {
            lr /= 10.0;
        }
        let by_type: serde_json::Map<String, serde_json::Value> = TYPES
            .iter()
            .map(|t| {
                (
                    t.to_string(),
                    serde_json::json!(0.3 + 0.05 * e as f64 + rng.range(-0.1, 0.1)),
                )
            })
            .collect();
        let rec = serde_json::json!({
            "epoch": e, "train_loss": 0.7 / (e as f64).sqrt() + rng.range(0.0, 0.05),
            "val_loss": 0.75 / (e as f64).powf(0.3) + rng.range(0.0, 0.05), "lr": lr,
            "kappa": 0.35 + 0.04 * e as f64, "kappa_by_type": by_type, "accuracy": 0.8, "auroc": 0.85,
            "images_per_s": 12.5, "seconds": 30.0,
        });
        writeln!(jsonl, "{rec}").unwrap();
    }
    std::fs::write(dir.join("metrics.jsonl"), jsonl).unwrap();
    let mut csv = String::from("study,type,label,probability\n");
    for (k, t) in TYPES.iter().enumerate() {
        for i in 0..40 {
            let y = rng.bernoulli(0.45);
            let p = (if y { 0.65 } else { 0.35 } + rng.normal() * (0.1 + 0.03 * k as f64))
                .clamp(0.0, 1.0);
            writeln!(
                csv,
                "MURA-v1.1/valid/{t}/patient{k}{i}/study1/,{t},{},{p}",
                y as u8
            )
            .unwrap();
        }
    }
    std::fs::write(dir.join("val_predictions.csv"), csv).unwrap();
}

fn report(dir: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mura"))
        .arg("report")
        .arg(dir)
        .output()
        .unwrap()
}

#[test]
fn writes_three_readable_plots() {
    let dir = tmp("ok");
    let mut rng = Rng::new(seed("writes_three_readable_plots").value);
    fake_run(&dir, &mut rng, 9);
    let out = report(&dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in ["loss.png", "kappa.png", "roc.png"] {
        let img = image::open(dir.join("report").join(name))
            .unwrap()
            .to_rgb8();
        assert_eq!(img.dimensions(), (900, 640), "{name}");
        // The caption (text from the embedded font) puts dark pixels in the top strip.
        let dark = (200..700)
            .flat_map(|x| (0..36).map(move |y| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y)[0] < 100)
            .count();
        assert!(dark > 100, "{name}: no caption text ({dark} dark pixels)");
        // Coloured curves are drawn.
        let coloured = img.pixels().filter(|p| p[0].abs_diff(p[2]) > 80).count();
        assert!(coloured > 500, "{name}: {coloured} coloured pixels");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_run_folders_are_clear_errors() {
    let dir = tmp("bad");
    std::fs::create_dir_all(&dir).unwrap();
    let err = |out: std::process::Output| {
        assert!(!out.status.success());
        let e = String::from_utf8(out.stderr).unwrap();
        assert_eq!(e.trim().lines().count(), 1, "{e}");
        e
    };
    assert!(err(report(&dir)).contains("metrics.jsonl"));
    std::fs::write(
        dir.join("metrics.jsonl"),
        "{\"epoch\": 1, \"train_loss\": 0.5}\nnot json\n",
    )
    .unwrap();
    assert!(err(report(&dir)).contains("metrics.jsonl line 2"));
    std::fs::write(
        dir.join("metrics.jsonl"),
        "{\"epoch\": 1, \"train_loss\": 0.5, \"val_loss\": null}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("val_predictions.csv"),
        "study,type,label,probability\na/XR_HAND/s/,XR_HAND,1,high\n",
    )
    .unwrap();
    assert!(err(report(&dir)).contains("val_predictions.csv line 2"));
    std::fs::remove_dir_all(&dir).ok();
}
