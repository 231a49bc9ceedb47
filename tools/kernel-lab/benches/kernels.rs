//! Kernel harness: the roofline of one DenseNet training step, per kernel shape, with each
//! kernel's measured time when a device is given.
//!
//! `cargo bench --bench kernels -- [ARCH BATCH SIZE [PRECISION [PEAK_TFLOPS [TBPS]]]]
//! [--device emu|cuda[:N]] [--reps N]`, default `densenet169 64 224 bf16` against an H100
//! (800 TFLOP/s bf16, 3.0 TB/s), analytic only. With `--device`, every row's kernels run on
//! that device (`mura_kernel_lab::harness::measure`: fresh random inputs, one warm-up, then
//! `--reps` launches timed with CUDA events (wall time on the emulator), default 20) and the
//! table shows measured time, achieved TFLOP/s and GB/s, and % of the floor, per shape, per
//! (op, pass) and for the step. The emulator is slow: use tiny shapes there
//! (`densenet121 1 32 --device emu --reps 1`); `--profile` there adds each kernel's memory
//! traffic as Nsight Compute counts it (mura::gpu::emu::profile). `--jsonl FILE` also writes
//! every row as one JSON object a line (its FLOPs, bytes, floor and measured time per launch),
//! from the same run as the table.
//!
//! `-- --probe --device emu|cuda[:N]` instead launches the kernels of
//! `mura_kernel_lab::probe` once each (for `ncu` on a GPU) and prints one JSON line per kernel,
//! with the emulator's counts by Nsight Compute's metric names on `emu`.

use anyhow::{bail, Context, Result};
use mura::device::Device;
use mura::gpu::emu::profile;
use mura::model::{Layout, Schedule};
use mura::precision::Precision;
use mura::spec::DenseNetSpec;
use mura_kernel_lab::harness::{self, Timing};
use mura_kernel_lab::roofline::{self, Machine};

fn arg<T: std::str::FromStr>(args: &[String], i: usize, name: &str, default: T) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    match args.get(i) {
        None => Ok(default),
        Some(s) => s
            .parse()
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("bad {name} '{s}'")),
    }
}

/// Positional arguments, `--device`, `--reps` (cargo bench's own `--bench` is dropped).
struct Opts {
    positional: Vec<String>,
    device: Option<Device>,
    reps: usize,
    profile: bool,
    probe: bool,
    jsonl: Option<std::path::PathBuf>,
}

fn options(args: impl Iterator<Item = String>) -> Result<Opts> {
    let mut o = Opts {
        positional: Vec::new(),
        device: None,
        reps: 20,
        profile: false,
        probe: false,
        jsonl: None,
    };
    let mut args = args;
    while let Some(a) = args.next() {
        let Some(opt) = a.strip_prefix("--") else {
            o.positional.push(a);
            continue;
        };
        if matches!(opt, "bench" | "profile" | "probe") {
            o.profile |= opt == "profile";
            o.probe |= opt == "probe";
            continue;
        }
        let (name, value) = match opt.split_once('=') {
            Some((n, v)) => (n.to_string(), v.to_string()),
            None => (
                opt.to_string(),
                args.next()
                    .with_context(|| format!("--{opt} needs a value"))?,
            ),
        };
        match name.as_str() {
            "device" => o.device = Some(value.parse()?),
            "jsonl" => o.jsonl = Some(value.into()),
            "reps" => {
                o.reps = value
                    .parse()
                    .ok()
                    .filter(|&r| r > 0)
                    .with_context(|| format!("bad --reps '{value}': use a positive count"))?
            }
            _ => bail!(
                "unknown option --{name}: use --device emu|cuda[:N], --reps N, --jsonl FILE, \
                 --profile or --probe"
            ),
        }
    }
    Ok(o)
}

fn run() -> Result<()> {
    let o = options(std::env::args().skip(1))?;
    if o.probe {
        return probe(&o);
    }
    if o.profile {
        anyhow::ensure!(
            o.device == Some(Device::Emu),
            "--profile needs --device emu"
        );
        profile::enable();
    }
    let args = &o.positional;
    let arch: String = arg(args, 0, "architecture", "densenet169".to_string())?;
    let batch: usize = arg(args, 1, "batch", 64)?;
    let size: usize = arg(args, 2, "image size", 224)?;
    let precision: Precision = arg(args, 3, "precision", Precision::Bf16)?;
    let h100 = Machine::h100(precision);
    let peak: f64 = arg(args, 4, "peak TFLOP/s", h100.peak_flops / 1e12)?;
    let tbps: f64 = arg(args, 5, "bandwidth TB/s", h100.bandwidth / 1e12)?;
    if args.len() > 6 {
        bail!("too many arguments: ARCH BATCH SIZE [PRECISION [PEAK_TFLOPS [TBPS]]]");
    }
    let machine = Machine {
        peak_flops: peak * 1e12,
        bandwidth: tbps * 1e12,
    };
    let spec = DenseNetSpec::preset(&arch)?;
    let rows = roofline::table(&spec, batch, size, precision)?;
    let mut profile_table = None;
    let (measured, on) = match o.device {
        None => (vec![None; rows.len()], String::new()),
        Some(device) => {
            let d = mura::gpu::open(device)?;
            let schedule = Schedule::new(&Layout::new(&spec), &spec.arch, size, size)?;
            let timing = Timing::fresh(o.reps);
            let t = match o.profile {
                false => harness::measure(&d, &schedule, batch, precision, &rows, timing)?,
                true => {
                    let (t, table) = profiled(&d, &schedule, (batch, precision), &rows, timing)?;
                    profile_table = Some(table);
                    t
                }
            };
            let on = format!(
                "; measured on {}, mean of {} launches after a warm-up",
                d.name(),
                o.reps
            );
            (t, on)
        }
    };
    println!(
        "## Roofline: {arch} training step, batch {batch}, {size}x{size}, {precision}, \
         {peak} TFLOP/s, {tbps} TB/s{on}\n"
    );
    print!("{}", roofline::markdown(&rows, batch, &machine, &measured));
    if let Some(path) = &o.jsonl {
        let run = serde_json::json!({
            "arch": arch, "batch": batch, "image_size": size, "precision": precision.to_string(),
            "peak_tflops": peak, "tbps": tbps, "reps": o.reps,
            "device": o.device.map(|d| d.to_string()),
        });
        let lines: Vec<String> = rows
            .iter()
            .zip(&measured)
            .map(|(r, t)| row_record(r, *t, &machine, &run).to_string())
            .collect();
        std::fs::write(path, lines.join("\n") + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(rows_profile) = profile_table {
        let floor = |label: &str| {
            let r = rows.iter().find(|r| row_label(r) == label)?;
            Some(r.floor_s(&machine) * 1e6)
        };
        println!(
            "\n{} Per roofline row, per launch of the row's kernels, with its floor.\n",
            profile::LEGEND
        );
        print!("{}", profile::table(&rows_profile, &floor));
        print!("{}", profile::report());
    }
    Ok(())
}

/// One roofline row as a JSON object: `run`'s fields, the row's op, pass, site, shape, launches
/// per step, FLOPs and bytes per launch, its floor and what bounds it, and the measured seconds
/// per launch (null when not measured).
fn row_record(
    r: &roofline::KernelRow,
    measured_s: Option<f64>,
    m: &Machine,
    run: &serde_json::Value,
) -> serde_json::Value {
    let mut j = run.clone();
    let row = serde_json::json!({
        "op": r.op.to_string(), "pass": r.pass.to_string(), "site": r.site.to_string(),
        "shape": r.shape.to_string(), "count": r.count, "flops": r.flops, "bytes": r.bytes,
        "floor_s": r.floor_s(m), "bound": r.bound(m), "measured_s": measured_s,
    });
    for (k, v) in row.as_object().expect("an object") {
        j[k] = v.clone();
    }
    j
}

/// `--probe`: the probe's launches on `--device`, one JSON line per kernel (with the emulator's
/// counts, by Nsight Compute's metric names, on `emu`).
fn probe(o: &Opts) -> Result<()> {
    let device = o.device.context("--probe needs --device emu or cuda[:N]")?;
    if device == Device::Emu {
        profile::enable();
    }
    let d = mura::gpu::open(device)?;
    mura_kernel_lab::probe::run(&d, 1)?;
    let counted = profile::all();
    for p in mura_kernel_lab::probe::PROBES {
        let mut j = serde_json::json!({"kernel": p.kernel, "what": p.what, "device": d.name()});
        if device == Device::Emu {
            let (_, c) = counted
                .iter()
                .find(|(k, _)| k == p.kernel)
                .with_context(|| format!("{} was not profiled", p.kernel))?;
            anyhow::ensure!(
                c.launches == 1,
                "{} launched {} times",
                p.kernel,
                c.launches
            );
            let metrics: serde_json::Map<String, serde_json::Value> = c
                .counters
                .ncu_metrics()
                .iter()
                .map(|&(name, v)| (name.to_string(), v.into()))
                .collect();
            j["emu"] = metrics.into();
        }
        println!("{j}");
    }
    Ok(())
}

/// A roofline row's name in the profile table.
fn row_label(r: &roofline::KernelRow) -> String {
    format!("{} {} {} {}", r.op, r.pass, r.site, r.shape)
}

/// Each roofline row's profile, by its label.
type RowProfiles = Vec<(String, profile::KernelProfile)>;

/// [`harness::measure`] one row at a time, with what the emulator's profiler counted for each
/// row's launches (warm-up and timed ones), per launch of the row's kernels.
fn profiled(
    d: &std::sync::Arc<dyn mura::gpu::Driver>,
    schedule: &Schedule,
    (batch, precision): (usize, Precision),
    rows: &[roofline::KernelRow],
    timing: Timing,
) -> Result<(Vec<Option<f64>>, RowProfiles)> {
    let (mut times, mut table) = (Vec::new(), Vec::new());
    for r in rows {
        let before = profile::all();
        let one = std::slice::from_ref(r);
        times.extend(harness::measure(
            d, schedule, batch, precision, one, timing,
        )?);
        let mut p = profile::since(&before);
        // Per run of the row's work: its warm-up and the `reps` timed runs.
        let runs = timing.reps as u64 + 1;
        let c: &mut [u64; 23] = bytemuck::cast_mut(&mut p.counters);
        c.iter_mut().for_each(|v| *v /= runs);
        p.launches /= runs;
        table.push((row_label(r), p));
    }
    Ok((times, table))
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
