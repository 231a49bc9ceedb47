//! `mura info`: the devices (for a GPU: its SMs, clocks, memory and driver; for the emulator:
//! what it models), and how the GPU kernels were built.

use crate::gpu::{cuda, emu, kernels};
use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Also print ptxas's per-kernel report (registers, spills, shared memory) for each architecture
    #[arg(long)]
    pub kernels: bool,
}

pub fn run(args: Args) -> Result<()> {
    crate::out!("devices:");
    crate::out!(
        "  cpu    the CPU reference backend ({} threads)",
        rayon::current_num_threads()
    );
    print_emu()?;
    match cuda::device_count() {
        Err(e) => crate::out!("  cuda   none: {e:#}"),
        Ok(0) => crate::out!("  cuda   none: the driver reports no device"),
        Ok(n) => {
            let release = cuda::driver_release().unwrap_or_else(|| "of unknown release".into());
            match cuda::driver_version() {
                Ok((major, minor)) => {
                    crate::out!("  cuda   driver {release}, supports CUDA {major}.{minor}")
                }
                Err(e) => crate::out!("  cuda   driver {release}: {e:#}"),
            }
            for i in 0..n {
                match cuda::device_info(i) {
                    Ok(d) => print_device(&d)?,
                    Err(e) => crate::out!("  cuda:{i} error: {e:#}"),
                }
            }
        }
    }
    let files: Vec<_> = kernels::MODULES.iter().map(|m| m.file).collect();
    crate::out!(
        "kernels: {} in {}",
        kernels::MODULES
            .iter()
            .map(|m| m.kernels.len())
            .sum::<usize>(),
        files.join(" ")
    );
    crate::out!("  built with {}", kernels::BUILT_WITH);
    if args.kernels {
        print_ptxas()?;
    }
    Ok(())
}

/// The emulator's line: its kernels and what it models of a device.
fn print_emu() -> Result<()> {
    let shipped: usize = kernels::MODULES.iter().map(|m| m.kernels.len()).sum();
    let model = emu::model();
    let checks = match emu::Checks::from_env() {
        Ok(c) => {
            let on = [
                (c.memcheck, "memcheck"),
                (c.initcheck, "initcheck"),
                (c.racecheck, "racecheck"),
            ];
            let on: Vec<&str> = on.iter().filter(|(on, _)| *on).map(|(_, n)| *n).collect();
            match on.is_empty() {
                true => "no checkers".to_string(),
                false => on.join(", "),
            }
        }
        Err(e) => format!("{e:#}"),
    };
    crate::out!(
        "  emu    CPU emulator of the CUDA kernels ({shipped} kernels, {} with the test-only ones): \
         warps of 32 lanes, blocks of up to {} threads and {} KiB of dynamic shared memory, run \
         one at a time in an adversarial order; every launch under {checks}",
        emu::kernel_names().len(),
        model.max_threads,
        model.max_dynamic_shared / 1024
    );
    Ok(())
}

/// One CUDA device: its name, architecture, SMs and clock, memory and its clock, L2, shared
/// memory per block.
fn print_device(d: &cuda::DeviceInfo) -> Result<()> {
    let mib = |b: f64| b / (1u64 << 20) as f64;
    crate::out!(
        "  cuda:{} {}, compute capability {}.{}, {} SMs at {} MHz, {:.1} GiB at {} MHz \
         ({}-bit bus), {:.0} MiB L2, {} KiB shared per block",
        d.ordinal,
        d.name,
        d.compute_capability.0,
        d.compute_capability.1,
        d.multiprocessors,
        d.sm_clock_khz / 1000,
        mib(d.memory_bytes as f64) / 1024.0,
        d.memory_clock_khz / 1000,
        d.memory_bus_bits,
        mib(d.l2_bytes as f64),
        d.shared_per_block_optin / 1024
    );
    Ok(())
}

fn print_ptxas() -> anyhow::Result<()> {
    let mut entries = kernels::parse_ptxas(kernels::PTXAS_REPORT);
    entries.sort_by(|a, b| (&a.kernel, &a.arch).cmp(&(&b.kernel, &b.arch)));
    if entries.is_empty() {
        crate::out!(
            "no ptxas report: the build had no nvcc, so kernels are compiled by NVRTC at run time"
        );
        for m in kernels::MODULES {
            crate::out!("  {}: {}", m.file, m.kernels.join(" "));
        }
        return Ok(());
    }
    crate::out!(
        "{:<28} {:<6} {:>5} {:>12} {:>11} {:>6}",
        "kernel",
        "arch",
        "regs",
        "spill st/ld",
        "stack B",
        "smem B"
    );
    for e in entries {
        crate::out!(
            "{:<28} {:<6} {:>5} {:>12} {:>11} {:>6}",
            e.kernel,
            e.arch,
            e.registers,
            format!("{}/{}", e.spill_stores, e.spill_loads),
            e.stack_bytes,
            e.smem_bytes
        );
    }
    Ok(())
}
