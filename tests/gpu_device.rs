//! Device selection and `mura info`, with or without a CUDA driver on the machine.

use mura::device::Device;
use mura::gpu::{self, cuda};
use std::process::Command;

fn driver_present() -> bool {
    cuda::device_count().is_ok()
}

#[test]
fn cuda_without_a_driver_is_an_error_not_a_panic() {
    if driver_present() {
        assert!(gpu::open(Device::Cuda(0)).is_ok() || cuda::device_count().unwrap() == 0);
        let e = gpu::open(Device::Cuda(999))
            .err()
            .expect("device 999 does not exist");
        assert!(format!("{e:#}").contains("no CUDA device 999"), "{e:#}");
    } else {
        let e = gpu::open(Device::Cuda(0)).err().expect("no driver here");
        assert!(format!("{e:#}").contains("no CUDA driver found"), "{e:#}");
        assert_eq!(gpu::resolve(Device::Auto).unwrap(), Device::Cpu);
    }
}

#[test]
fn emu_and_cpu_resolve_to_themselves() {
    assert_eq!(gpu::resolve(Device::Emu).unwrap(), Device::Emu);
    assert_eq!(gpu::resolve(Device::Cpu).unwrap(), Device::Cpu);
    assert!(gpu::open(Device::Cpu).is_err());
    assert_eq!(gpu::open(Device::Emu).unwrap().name(), "emu");
}

#[test]
fn info_lists_devices_and_kernels() {
    // MURA_BIN: where scripts/gpu-check.sh put the binary, away from this build's target folder.
    let bin = std::env::var("MURA_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_mura").to_string());
    let out = Command::new(bin)
        .args(["info", "--kernels"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "cpu",
        "emu",
        "cuda",
        "built with",
        "gemm_fwd_bf16",
        "relu_fwd_f32",
    ] {
        assert!(stdout.contains(want), "'{want}' missing from:\n{stdout}");
    }
    if !gpu::kernels::PTXAS_REPORT.is_empty() {
        // Built with nvcc: every kernel has its ptxas line for sm_80 and sm_90.
        for m in gpu::kernels::MODULES {
            for k in m.kernels {
                for arch in ["sm_80", "sm_90"] {
                    let row = stdout
                        .lines()
                        .find(|l| l.starts_with(&format!("{k} ")) && l.contains(arch));
                    assert!(row.is_some(), "no ptxas row for {k} on {arch}:\n{stdout}");
                }
            }
        }
    }
}

#[test]
fn ptxas_report_parses() {
    let report = "ptxas info    : Compiling entry function 'gemm_fwd_bf16' for 'sm_80'\n\
                  ptxas info    : Function properties for gemm_fwd_bf16\n    \
                  8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
                  ptxas info    : Used 31 registers, used 1 barriers, 2304 bytes smem, 388 bytes cmem[0]\n";
    let e = &gpu::kernels::parse_ptxas(report)[0];
    assert_eq!(
        (e.kernel.as_str(), e.arch.as_str()),
        ("gemm_fwd_bf16", "sm_80")
    );
    assert_eq!(
        (
            e.registers,
            e.spill_stores,
            e.spill_loads,
            e.stack_bytes,
            e.smem_bytes
        ),
        (31, 4, 12, 8, 2304)
    );
}

/// The sources embedded for NVRTC compile, wherever libnvrtc can be loaded (a GPU machine, or
/// with LD_LIBRARY_PATH pointing at the nvidia-cuda-nvrtc wheel). Elsewhere nvcc in CI compiles
/// these same files.
#[test]
fn nvrtc_compiles_embedded_sources() {
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        eprintln!("libnvrtc not loadable here: NVRTC path not exercised");
        return;
    }
    for m in gpu::kernels::MODULES {
        for cc in [(8, 0), (9, 0)] {
            let ptx = match cuda::nvrtc_compile(m, cc) {
                Err(e) if format!("{e}").contains("needs the CUDA headers") => {
                    eprintln!("{e}: NVRTC path not exercised");
                    return;
                }
                r => r.unwrap(),
            };
            for k in m.kernels {
                assert!(
                    ptx.contains(&format!(".entry {k}(")),
                    "{k} missing from NVRTC's PTX for {}",
                    m.file
                );
            }
        }
    }
}
