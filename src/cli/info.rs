//! `mura info`: the devices, and how the GPU kernels were built.

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
    let shipped: usize = kernels::MODULES.iter().map(|m| m.kernels.len()).sum();
    crate::out!(
        "  emu    CPU emulator of the CUDA kernels ({shipped} kernels, {} with the test-only ones)",
        emu::kernel_names().len()
    );
    match cuda::device_count() {
        Err(e) => crate::out!("  cuda   none: {e:#}"),
        Ok(0) => crate::out!("  cuda   none: the driver reports no device"),
        Ok(n) => {
            if let Ok((major, minor)) = cuda::driver_version() {
                crate::out!("  cuda   driver supports CUDA {major}.{minor}");
            }
            for i in 0..n {
                match cuda::device_info(i) {
                    Ok(d) => crate::out!(
                        "  cuda:{i} {}, compute capability {}.{}, {:.1} GiB, {} SMs, {} KiB shared per block",
                        d.name,
                        d.compute_capability.0,
                        d.compute_capability.1,
                        d.memory_bytes as f64 / (1u64 << 30) as f64,
                        d.multiprocessors,
                        d.shared_per_block_optin / 1024
                    ),
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
