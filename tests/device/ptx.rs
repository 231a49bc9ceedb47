//! No kernel divides by 64 bits: each kernel file compiled to PTX by the pinned nvcc (`NVCC`, as
//! `.ci/run` exports it) holds no `div.s64`, `div.u64`, `rem.s64` or `rem.u64`. The GPU has no
//! divider, and a 64-bit division is a software routine several times a 32-bit one's, paid per
//! element where an index is divided (kernels/common.cuh's GRID_STRIDE32 and the launchers' bound
//! on element counts make 32 bits enough). Mandatory with MURA_TEST_NVRTC=1 (CI, which installs
//! the pinned toolchain); without an nvcc it says it did not run.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The kernels of `ptx` (their `.entry` names) that hold a 64-bit division or remainder.
fn dividing_kernels(ptx: &str) -> Vec<String> {
    let mut current = String::from("(outside any kernel)");
    let mut found = Vec::new();
    for line in ptx.lines() {
        if let Some(rest) = line.split(".entry ").nth(1) {
            current = rest.split('(').next().unwrap_or(rest).trim().to_string();
        }
        let divides = ["div.s64", "div.u64", "rem.s64", "rem.u64"]
            .iter()
            .any(|op| line.split_whitespace().next() == Some(op));
        if divides && !found.contains(&current) {
            found.push(current.clone());
        }
    }
    found
}

#[test]
fn the_checker_sees_a_64_bit_division() {
    let ptx =
        ".visible .entry k_f32(\n\t.param .u64 k_param_0\n)\n{\n\tdiv.s64 \t%rd3, %rd1, %rd2;\n}\n\
               .visible .entry ok_f32(\n)\n{\n\tdiv.u32 \t%r3, %r1, %r2;\n}\n";
    assert_eq!(dividing_kernels(ptx), ["k_f32"]);
}

#[test]
fn no_kernel_divides_by_64_bits() {
    let required = std::env::var("MURA_TEST_NVRTC").is_ok_and(|v| v == "1");
    let Some(nvcc) = std::env::var_os("NVCC").map(PathBuf::from) else {
        assert!(!required, "MURA_TEST_NVRTC=1 but NVCC is not set");
        eprintln!("no NVCC: the kernels' PTX was NOT checked for 64-bit division");
        return;
    };
    let kernels = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let out = crate::common::tmp("ptx");
    let mut offenders = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&kernels)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 8,
        "kernel files in {}: {files:?}",
        kernels.display()
    );
    for cu in files {
        let ptx = out.join(cu.file_name().unwrap()).with_extension("ptx");
        let run = Command::new(&nvcc)
            .args(["-ptx", "-O3", "-std=c++17", "-arch=compute_90", "-I"])
            .arg(&kernels)
            .arg(&cu)
            .arg("-o")
            .arg(&ptx)
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "{}: {}",
            cu.display(),
            String::from_utf8_lossy(&run.stderr)
        );
        let text = std::fs::read_to_string(&ptx).unwrap();
        assert!(
            text.contains(".entry "),
            "{}: no kernel in its PTX",
            cu.display()
        );
        offenders.extend(dividing_kernels(&text));
    }
    let _ = std::fs::remove_dir_all(&out);
    assert!(
        offenders.is_empty(),
        "kernels dividing by 64 bits: {offenders:?}"
    );
}
