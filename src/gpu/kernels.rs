//! The kernels from `kernels/**/*.cu` as build.rs compiled them: fatbins (when nvcc was found),
//! NVRTC sources, ptxas's report, the emulator's launch tables and the typed launchers
//! ([`launch`] for the shipped kernels of `kernels/*.cu`, [`testing`] for the test-only ones of
//! `kernels/testing/*.cu`).

use std::ffi::{c_char, c_int, c_void};

/// One kernels/**/*.cu file.
pub struct KernelModule {
    /// Relative to kernels/: `bn.cu`, `testing/selftest.cu`.
    pub file: &'static str,
    pub kernels: &'static [&'static str],
    /// SASS sm_80/86/89/90 + PTX compute_90, when nvcc was found at build time (8-byte aligned).
    pub fatbin: Option<&'static [u8]>,
    /// The source with its local includes inlined, for NVRTC.
    pub source: &'static str,
}

/// An emulator kernel: `entry(params)` runs the kernel as one CUDA thread.
#[repr(C)]
pub struct EmuKernel {
    pub name: *const c_char,
    pub entry: unsafe extern "C" fn(params: *mut *mut c_void),
    pub arity: c_int,
    /// `arity` parameter sizes in bytes.
    pub param_sizes: *const c_int,
}

/// Bytes kept at an 8-byte boundary (an embedded fatbin).
#[repr(C, align(8))]
pub struct Aligned<T: ?Sized>(pub T);

/// What the generated launchers use.
mod prelude {
    pub use crate::gpu::Act;
    pub use crate::gpu::{arg, launch_params, CInt, Driver, Launch, Ptr};
    pub use crate::precision::Precision;
    pub use anyhow::Result;
    pub use half::{bf16, f16};
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// build.rs's reader of kernel signatures and writer of the launchers above, compiled here too so
/// that its unit tests run with the library's.
#[cfg(test)]
#[path = "../../build/kernel_sigs.rs"]
mod kernel_sigs;

/// Every module: the shipped ones, then the test-only ones.
pub fn all_modules() -> impl Iterator<Item = &'static KernelModule> {
    MODULES.iter().chain(TEST_MODULES)
}

/// The module that defines kernel `name` (shipped or test-only).
pub fn module_of(name: &str) -> Option<&'static KernelModule> {
    all_modules().find(|m| m.kernels.contains(&name))
}
/// One line of ptxas's `-v` report: resources of one kernel on one architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtxasEntry {
    pub kernel: String,
    pub arch: String,
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub stack_bytes: u32,
    pub smem_bytes: u32,
}

/// Parses ptxas's `-v` output ("Compiling entry function 'k' for 'sm_80'", then the stack and
/// spill line, then "Used N registers, ... M bytes smem").
pub fn parse_ptxas(report: &str) -> Vec<PtxasEntry> {
    fn num_before(line: &str, unit: &str) -> u32 {
        let Some(end) = line.find(unit) else { return 0 };
        let digits: String = line[..end]
            .trim_end()
            .chars()
            .rev()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        digits
            .chars()
            .rev()
            .collect::<String>()
            .parse()
            .unwrap_or(0)
    }
    let mut out: Vec<PtxasEntry> = Vec::new();
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let mut parts = rest.split('\'');
            let kernel = parts.next().unwrap_or("").to_string();
            let arch = parts.nth(1).unwrap_or("").to_string();
            out.push(PtxasEntry {
                kernel,
                arch,
                registers: 0,
                spill_stores: 0,
                spill_loads: 0,
                stack_bytes: 0,
                smem_bytes: 0,
            });
        } else if let Some(e) = out.last_mut() {
            if line.contains("spill stores") {
                e.stack_bytes = num_before(line, "bytes stack frame");
                e.spill_stores = num_before(line, "bytes spill stores");
                e.spill_loads = num_before(line, "bytes spill loads");
            } else if line.contains("Used") && line.contains("registers") {
                e.registers = num_before(line, "registers");
                e.smem_bytes = num_before(line, "bytes smem");
            }
        }
    }
    out
}
