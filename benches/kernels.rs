//! Kernel harness: the analytic roofline of one DenseNet training step, per kernel shape,
//! with a column for measured GPU times.
//!
//! `cargo bench --bench kernels [-- ARCH BATCH SIZE [PRECISION [PEAK_TFLOPS [TBPS]]]]`,
//! default `densenet169 64 224 bf16` against an H100 (800 TFLOP/s bf16, 3.0 TB/s).

use anyhow::{Context, Result};
use mura::roofline::{self, KernelRow, Machine, Precision};
use mura::spec::DenseNetSpec;

/// Measured time of one launch of each row's kernel, in seconds (`None`: not measured).
///
/// Hook for the GPU issue: launch each row's kernel on the device (fresh random inputs of
/// the row's shape, warm-up, CUDA events around many launches) and return the mean time
/// per launch. Until then nothing is measured and the table says so.
fn measured_kernel_times(rows: &[KernelRow]) -> Vec<Option<f64>> {
    vec![None; rows.len()]
}

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

fn run() -> Result<()> {
    // cargo bench passes `--bench`; keep only positional arguments.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let arch: String = arg(&args, 0, "architecture", "densenet169".to_string())?;
    let batch: usize = arg(&args, 1, "batch", 64)?;
    let size: usize = arg(&args, 2, "image size", 224)?;
    let precision: Precision = arg(&args, 3, "precision", Precision::Bf16)?;
    let h100 = Machine::h100(precision);
    let peak: f64 = arg(&args, 4, "peak TFLOP/s", h100.peak_flops / 1e12)?;
    let tbps: f64 = arg(&args, 5, "bandwidth TB/s", h100.bandwidth / 1e12)?;
    let machine = Machine {
        peak_flops: peak * 1e12,
        bandwidth: tbps * 1e12,
    };
    let spec = DenseNetSpec::preset(&arch)?;
    let rows = roofline::table(&spec, batch, size, precision)?;
    let measured = measured_kernel_times(&rows);
    println!(
        "## Roofline: {arch} training step, batch {batch}, {size}x{size}, {precision}, \
         {peak} TFLOP/s, {tbps} TB/s\n"
    );
    print!("{}", roofline::markdown(&rows, batch, &machine, &measured));
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
