//! Data pipeline speed: synth and prep images/s, and augmented 224² images/s per core from
//! the store (augment::image alone, and the loader with one worker). Run with
//! `cargo bench --bench loader`.

use mura::data::loader::{aug_params, Augment, Loader, LoaderConfig};
use mura::data::prep::{prep, PrepConfig};
use mura::data::store::Store;
use mura::data::synth::{synth, SynthConfig};
use mura::data::{Split, StudyType};
use mura::ops::augment;
use mura::out::Progress;
use std::sync::Arc;
use std::time::Instant;

/// CPU time of this process in seconds (Linux, 10 ms ticks), so that a loaded machine does
/// not skew per-core numbers; 0 where unavailable.
fn cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = after
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // Fields after the command name: state, ppid, ..., utime is the 12th number, stime the 13th.
    f.get(10)
        .zip(f.get(11))
        .map_or(0.0, |(u, s)| (u + s) / 100.0)
}

/// "N images/s wall, M images per CPU-second".
fn rate(images: usize, t: Instant, c0: f64) -> String {
    let (wall, cpu) = (t.elapsed().as_secs_f64(), cpu_s() - c0);
    format!(
        "{:.0} images/s wall, {:.0} images per CPU-second",
        images as f64 / wall,
        images as f64 / cpu
    )
}

fn main() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("mura-bench-loader-{}", std::process::id()));
    let studies = std::env::var("MURA_BENCH_STUDIES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("cores: {cores}");

    let s = synth(
        &dir.join("syn"),
        &SynthConfig {
            studies,
            seed: 1,
            valid_fraction: 0.2,
        },
        Progress::Quiet,
    )?;
    println!(
        "synth: {} images in {:.2}s = {:.0} images/s",
        s.images,
        s.seconds,
        s.images as f64 / s.seconds
    );

    let p = prep(&PrepConfig {
        mura_root: dir.join("syn"),
        out: dir.join("store"),
        size: 256,
        study_types: StudyType::ALL.to_vec(),
        strict: false,
        progress: Progress::Quiet,
    })?;
    let n = p.manifest.images;
    println!(
        "prep 256²: {n} images in {:.2}s = {:.0} images/s",
        p.seconds,
        n as f64 / p.seconds
    );

    let t = Instant::now();
    let store = Arc::new(Store::open(&dir.join("store"))?);
    println!(
        "open + verify checksum: {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );

    let aug = Augment {
        flip: true,
        max_rotation_deg: 10.0,
    };
    let mut out = vec![0f32; 224 * 224 * 3];
    let reps = 3;
    let (t, c0) = (Instant::now(), cpu_s());
    for r in 0..reps {
        for i in 0..n {
            augment::image(
                store.image(i),
                store.size,
                aug_params(&aug, 0, r, i),
                224,
                &mut out,
            );
        }
    }
    println!(
        "augment::image 256²->224², 1 thread: {}",
        rate(reps as usize * n, t, c0)
    );

    for (name, cfg) in [
        (
            "loader blog (224², aug), 1 worker",
            LoaderConfig {
                workers: 1,
                ..LoaderConfig::blog()
            },
        ),
        (
            "loader eval (224²), 1 worker",
            LoaderConfig {
                workers: 1,
                ..LoaderConfig::blog().for_eval()
            },
        ),
        (
            "loader paper (320², aug), 1 worker",
            LoaderConfig {
                workers: 1,
                ..LoaderConfig::paper()
            },
        ),
        (
            "loader blog (224², aug), all cores",
            LoaderConfig {
                workers: cores,
                ..LoaderConfig::blog()
            },
        ),
    ] {
        let l = Loader::new(store.clone(), Split::Train, &StudyType::ALL, cfg)?;
        let (t, c0) = (Instant::now(), cpu_s());
        let mut images = 0;
        for e in 0..2 {
            for b in l.epoch(e) {
                images += b.n_images;
            }
        }
        println!("{name}: {}", rate(images, t, c0));
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
