//! Builds the GPU kernels in `kernels/*.cu` three ways:
//! - for the CPU emulator, always: each file compiled as C++20 against src/gpu/emu/cuda_emu.h,
//!   with generated trampolines that turn a `void**` parameter array into a typed call;
//! - with nvcc when one is found (`NVCC`, `CUDA_HOME`/`CUDA_PATH`, `PATH`): a fatbin per file
//!   (SASS sm_80/86/89/90 + PTX compute_90) embedded in the binary, plus ptxas's `-v` report;
//! - without nvcc: the sources (local includes inlined) are embedded for NVRTC at run time.
//!
//! It also builds a small AddressSanitizer harness of the emulator for the emulator self-tests.
//! Writes `$OUT_DIR/kernels.rs`, included by src/gpu/kernels.rs.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::{env, fs};

const SASS: [&str; 4] = ["80", "86", "89", "90"];
const PTX: &str = "90";

struct KernelFile {
    stem: String,
    path: PathBuf,
    kernels: Vec<String>,
}

fn main() {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kdir = root.join("kernels");
    let emu_dir = root.join("src/gpu/emu");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=src/gpu/emu");
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let mut files = Vec::new();
    let mut entries: Vec<_> = fs::read_dir(&kdir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        println!("cargo:rerun-if-changed={}", path.display());
        if path.extension().is_some_and(|e| e == "cu") {
            let src = fs::read_to_string(&path).unwrap();
            let stem = path.file_stem().unwrap().to_str().unwrap().to_string();
            let kernels = kernel_names(&src);
            files.push(KernelFile {
                stem,
                path,
                kernels,
            });
        }
    }
    let mut seen = BTreeSet::new();
    for k in files.iter().flat_map(|f| &f.kernels) {
        assert!(seen.insert(k), "kernel {k} is defined twice in kernels/");
    }

    // The sources NVRTC gets at run time; nvcc compiles these same files, so CI proves them.
    for f in &files {
        let mut once = BTreeSet::new();
        fs::write(
            out.join(format!("{}.nvrtc.cu", f.stem)),
            inline_includes(&f.path, &kdir, &mut once),
        )
        .unwrap();
    }
    build_emulator(&files, &kdir, &emu_dir, &out);
    let asan = build_asan_harness(&kdir, &emu_dir, &out);
    let nvcc = find_nvcc();
    let built_with = match &nvcc {
        Some(nvcc) => compile_fatbins(nvcc, &files, &kdir, &out),
        None => {
            "NVRTC at run time (no nvcc found at build time: set NVCC or CUDA_HOME)".to_string()
        }
    };
    if nvcc.is_none() {
        fs::write(out.join("ptxas.txt"), "").unwrap();
    }

    let mut rs = String::new();
    writeln!(rs, "pub static BUILT_WITH: &str = {built_with:?};").unwrap();
    writeln!(
        rs,
        "pub static PTXAS_REPORT: &str = include_str!(concat!(env!(\"OUT_DIR\"), \"/ptxas.txt\"));"
    )
    .unwrap();
    writeln!(rs, "pub static ASAN_HARNESS: &str = {asan:?};").unwrap();
    writeln!(rs, "pub static MODULES: &[KernelModule] = &[").unwrap();
    for f in &files {
        let fatbin = match nvcc {
            Some(_) => format!(
                "Some(include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{}.fatbin\")))",
                f.stem
            ),
            None => "None".into(),
        };
        writeln!(
            rs,
            "    KernelModule {{ file: \"{}.cu\", kernels: &{:?}, fatbin: {fatbin}, \
             source: include_str!(concat!(env!(\"OUT_DIR\"), \"/{}.nvrtc.cu\")) }},",
            f.stem, f.kernels, f.stem
        )
        .unwrap();
    }
    writeln!(rs, "];").unwrap();
    writeln!(rs, "extern \"C\" {{").unwrap();
    for f in &files {
        writeln!(
            rs,
            "    static mura_table_{}: [EmuKernel; {}];",
            f.stem,
            f.kernels.len()
        )
        .unwrap();
    }
    writeln!(rs, "}}").unwrap();
    writeln!(
        rs,
        "/// The emulator's compiled kernels, one slice per kernels/*.cu file."
    )
    .unwrap();
    writeln!(
        rs,
        "pub fn emu_tables() -> [&'static [EmuKernel]; {}] {{",
        files.len()
    )
    .unwrap();
    let tables: Vec<String> = files
        .iter()
        .map(|f| format!("&mura_table_{}", f.stem))
        .collect();
    writeln!(rs, "    unsafe {{ [{}] }}", tables.join(", ")).unwrap();
    writeln!(rs, "}}").unwrap();
    fs::write(out.join("kernels.rs"), rs).unwrap();
}

/// Names of the `extern "C" __global__` entry points in a .cu source.
fn kernel_names(src: &str) -> Vec<String> {
    const MARK: &str = "extern \"C\" __global__";
    let mut names = Vec::new();
    for (at, _) in src.match_indices(MARK) {
        let mut rest = &src[at + MARK.len()..];
        loop {
            let open = rest.find('(').expect("kernel signature without '('");
            let ident: String = rest[..open]
                .trim_end()
                .chars()
                .rev()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            if ident == "__launch_bounds__" {
                rest = &rest[open + rest[open..].find(')').unwrap() + 1..];
                continue;
            }
            names.push(ident);
            break;
        }
    }
    names
}

/// The emulator: the kernels compiled with the host compiler's thread-sanitizer instrumentation
/// (every load and store calls a hook of src/gpu/emu/checks.cpp; no sanitizer runtime is
/// linked), and again without it (`<kernel>__plain`, listed under the kernel's own name in
/// `mura_plain_<file>`, declared in `$OUT_DIR/emu_plain.rs`) for launches with every check and
/// the profiler off; the runtime, checkers and profiler without it; and the mutants of
/// src/gpu/emu/mutants.txt (see [`build_mutants`]).
fn build_emulator(files: &[KernelFile], kdir: &Path, emu_dir: &Path, out: &Path) {
    let base = || {
        let mut build = cc::Build::new();
        build
            .cpp(true)
            .std("c++20")
            .opt_level(2)
            .define("MURA_EMU", None)
            .include(kdir)
            .include(emu_dir)
            .flag("-fstack-clash-protection")
            .flag("-Wno-unused-parameter")
            .flag("-include")
            .flag(emu_dir.join("cuda_emu.h").to_str().unwrap());
        build
    };
    let mut kernels = base();
    kernels.flag("-fsanitize=thread");
    if kernels.get_compiler().is_like_clang() {
        kernels
            .flag("-mllvm")
            .flag("-tsan-instrument-func-entry-exit=0");
    } else {
        kernels.flag("--param=tsan-instrument-func-entry-exit=0");
    }
    let mut plain = base();
    let mut rs = String::from("extern \"C\" {\n");
    for f in files {
        let (stem, ks) = (&f.stem, &f.kernels);
        let table = format!("mura_table_{stem}");
        kernels.file(emu_tu(
            out,
            &format!("emu_{stem}"),
            &f.path,
            ks,
            "",
            "",
            &table,
        ));
        let table = format!("mura_plain_{stem}");
        plain.file(emu_tu(
            out,
            &format!("emu_plain_{stem}"),
            &f.path,
            ks,
            "__plain",
            "",
            &table,
        ));
        writeln!(rs, "    static {table}: [EmuKernel; {}];", ks.len()).unwrap();
    }
    let tables: Vec<String> = files
        .iter()
        .map(|f| format!("&mura_plain_{}", f.stem))
        .collect();
    writeln!(
        rs,
        "}}\n/// The kernels compiled without instrumentation, one slice per kernels/*.cu file.\n\
         pub fn plain_tables() -> [&'static [EmuKernel]; {}] {{\n    \
         // SAFETY: build.rs defines each table with these lengths.\n    unsafe {{ [{}] }}\n}}",
        files.len(),
        tables.join(", ")
    )
    .unwrap();
    fs::write(out.join("emu_plain.rs"), rs).unwrap();
    kernels.files(build_mutants(files, &emu_dir.join("mutants.txt"), out));
    let objects = kernels.compile_intermediates();
    plain
        .files(["runtime.cpp", "checks.cpp", "profile.cpp"].map(|f| emu_dir.join(f)))
        .objects(objects)
        .compile("mura_emu");
}

/// Writes `$OUT_DIR/<tu>.cpp`, an emulator translation unit: `source` with each of `kernels`
/// renamed `<kernel><rename>` and listed in the launch table `table` as `<kernel><listed>`.
fn emu_tu(
    out: &Path,
    tu: &str,
    source: &Path,
    kernels: &[String],
    rename: &str,
    listed: &str,
    table: &str,
) -> PathBuf {
    let mut cpp = String::new();
    if !rename.is_empty() {
        for k in kernels {
            writeln!(cpp, "#define {k} {k}{rename}").unwrap();
        }
    }
    writeln!(cpp, "#include \"{}\"", source.display()).unwrap();
    writeln!(cpp, "extern \"C\" const mura_emu::Kernel {table}[] = {{").unwrap();
    for k in kernels {
        writeln!(
            cpp,
            "    {{\"{k}{listed}\", &mura_emu::trampoline<{k}>, mura_emu::arity({k}), \
             mura_emu::param_sizes({k})}},"
        )
        .unwrap();
    }
    writeln!(cpp, "}};").unwrap();
    let path = out.join(format!("{tu}.cpp"));
    fs::write(&path, cpp).unwrap();
    path
}

/// One mutant of src/gpu/emu/mutants.txt: kernels/`file` with `original` (exact text, found
/// exactly once) replaced by `replacement`; its kernels are named `<kernel>__<name>`.
struct Mutant {
    name: String,
    file: String,
    checker: String,
    original: String,
    replacement: String,
}

/// Parses the mutant spec: `== name file checker`, then the original's lines each prefixed by
/// `-- ` and the replacement's by `++ ` (`--`/`++` alone: an empty line); `#` lines are comments.
fn parse_mutants(spec: &str) -> Vec<Mutant> {
    let mut out: Vec<Mutant> = Vec::new();
    for line in spec.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        if let Some(head) = line.strip_prefix("== ") {
            let f: Vec<&str> = head.split_whitespace().collect();
            assert!(
                f.len() == 3,
                "mutants.txt: want '== name file checker', got '{line}'"
            );
            out.push(Mutant {
                name: f[0].into(),
                file: f[1].into(),
                checker: f[2].into(),
                original: String::new(),
                replacement: String::new(),
            });
            continue;
        }
        let m = out
            .last_mut()
            .expect("mutants.txt: a snippet line before any '== ' header");
        let (text, to) = match (line.strip_prefix("--"), line.strip_prefix("++")) {
            (Some(t), _) => (t, &mut m.original),
            (_, Some(t)) => (t, &mut m.replacement),
            _ => panic!("mutants.txt: a line must start with '--', '++', '==' or '#': '{line}'"),
        };
        *to += text.strip_prefix(' ').unwrap_or(text);
        to.push('\n');
    }
    out
}

/// The mutation suite's kernels: for each mutant of `spec`, a copy of its kernel file with the
/// snippet replaced (the build fails when the snippet is not found exactly once, so the suite
/// cannot silently rot), compiled for the emulator only, each kernel renamed `<kernel>__<name>`
/// and listed in `mura_mutants_<name>`; `$OUT_DIR/emu_mutants.rs` declares those tables.
/// Returns the C++ files to compile.
fn build_mutants(files: &[KernelFile], spec: &Path, out: &Path) -> Vec<PathBuf> {
    let mutants = parse_mutants(&fs::read_to_string(spec).unwrap());
    let mut cpps = Vec::new();
    let mut rs = String::from("extern \"C\" {\n");
    let mut list = String::new();
    for m in &mutants {
        let f = files
            .iter()
            .find(|f| f.path.file_name().unwrap() == m.file.as_str())
            .unwrap_or_else(|| panic!("mutant {}: no kernels/{}", m.name, m.file));
        let src = fs::read_to_string(&f.path).unwrap();
        let found = src.matches(m.original.as_str()).count();
        assert!(
            found == 1,
            "mutant {}: its snippet occurs {found} times in kernels/{} (must be exactly once):\n{}",
            m.name,
            m.file,
            m.original
        );
        let mutated = out.join(format!("mutant_{}_{}", m.name, m.file));
        fs::write(&mutated, src.replace(&m.original, &m.replacement)).unwrap();
        let suffix = format!("__{}", m.name);
        let (tu, table) = (
            format!("emu_mutant_{}", m.name),
            format!("mura_mutants_{}", m.name),
        );
        cpps.push(emu_tu(
            out, &tu, &mutated, &f.kernels, &suffix, &suffix, &table,
        ));
        writeln!(
            rs,
            "    static mura_mutants_{}: [EmuKernel; {}];",
            m.name,
            f.kernels.len()
        )
        .unwrap();
        writeln!(
            list,
            "        Mutant {{ name: {:?}, file: {:?}, checker: {:?}, kernels: &mura_mutants_{} }},",
            m.name, m.file, m.checker, m.name
        )
        .unwrap();
    }
    rs += "}\n/// The mutants of src/gpu/emu/mutants.txt, as build.rs compiled them.\n";
    rs += &format!(
        "pub fn mutants() -> [Mutant; {}] {{\n    // SAFETY: build.rs defines each table with these lengths.\n    unsafe {{ [\n{list}    ] }}\n}}\n",
        mutants.len()
    );
    fs::write(out.join("emu_mutants.rs"), rs).unwrap();
    cpps
}

/// The emulator with kernels/selftest.cu under AddressSanitizer, as a standalone program for the
/// out-of-bounds test. Returns its path, or "" (with a warning) when the compiler cannot do it.
fn build_asan_harness(kdir: &Path, emu_dir: &Path, out: &Path) -> String {
    let compiler = cc::Build::new().cpp(true).get_compiler();
    let exe = out.join("emu-asan");
    // Static libasan where the compiler has it (gcc), so the harness runs on machines without it.
    let compile = |extra: &[&str]| {
        Command::new(compiler.path())
            .args([
                "-std=c++20",
                "-O1",
                "-g",
                "-fsanitize=address",
                "-fno-omit-frame-pointer",
                "-DMURA_EMU",
            ])
            .args(extra)
            .arg("-include")
            .arg(emu_dir.join("cuda_emu.h"))
            .arg("-I")
            .arg(kdir)
            .arg(emu_dir.join("runtime.cpp"))
            .arg(emu_dir.join("checks.cpp"))
            .arg(emu_dir.join("profile.cpp"))
            .arg(emu_dir.join("asan_main.cpp"))
            .arg("-o")
            .arg(&exe)
            .output()
    };
    let result = match compile(&["-static-libasan"]) {
        Ok(o) if o.status.success() => Ok(o),
        _ => compile(&[]),
    };
    match result {
        Ok(o) if o.status.success() => exe.display().to_string(),
        Ok(o) => {
            println!(
                "cargo:warning=ASan emulator harness not built: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            String::new()
        }
        Err(e) => {
            println!("cargo:warning=ASan emulator harness not built: {e}");
            String::new()
        }
    }
}

fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var) {
            let p = Path::new(&home).join("bin/nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    env::split_paths(&env::var_os("PATH")?)
        .map(|d| d.join("nvcc"))
        .find(|p| p.is_file())
}

/// One fatbin per kernel file, compiled in parallel; ptxas's report goes to ptxas.txt.
fn compile_fatbins(nvcc: &Path, files: &[KernelFile], kdir: &Path, out: &Path) -> String {
    let version = Command::new(nvcc)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run nvcc at {}: {e}", nvcc.display());
        });
    let version = String::from_utf8_lossy(&version.stdout);
    let release = version
        .lines()
        .find(|l| l.contains("release"))
        .unwrap_or("unknown version")
        .trim()
        .to_string();
    let mut gencode = Vec::new();
    for sm in SASS {
        gencode.push(format!("-gencode=arch=compute_{sm},code=sm_{sm}"));
    }
    gencode.push(format!("-gencode=arch=compute_{PTX},code=compute_{PTX}"));
    let children: Vec<_> = files
        .iter()
        .map(|f| {
            let child = Command::new(nvcc)
                .args(["-fatbin", "-O3", "-std=c++17", "-Xptxas", "-v", "-I"])
                .arg(kdir)
                .args(&gencode)
                .arg("-o")
                .arg(out.join(format!("{}.fatbin", f.stem)))
                .arg(out.join(format!("{}.nvrtc.cu", f.stem)))
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run nvcc at {}: {e}", nvcc.display()));
            (f, child)
        })
        .collect();
    let mut report = String::new();
    for (f, child) in children {
        let o = child.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        if !o.status.success() {
            panic!("nvcc failed on kernels/{}.cu:\n{text}", f.stem);
        }
        writeln!(report, "== {}.cu\n{text}", f.stem).unwrap();
    }
    fs::write(out.join("ptxas.txt"), report).unwrap();
    let archs: Vec<String> = SASS.iter().map(|s| format!("sm_{s}")).collect();
    format!(
        "nvcc ({release}) at build time: SASS {} + PTX compute_{PTX}",
        archs.join(" ")
    )
}

/// The source with its local `#include "x.cuh"` lines replaced by the headers (each once), so
/// NVRTC needs no include path for them.
fn inline_includes(path: &Path, kdir: &Path, once: &mut BTreeSet<String>) -> String {
    let mut out = String::new();
    for line in fs::read_to_string(path).unwrap().lines() {
        let t = line.trim();
        if let Some(name) = t
            .strip_prefix("#include \"")
            .and_then(|r| r.strip_suffix('"'))
        {
            if once.insert(name.to_string()) {
                out += &inline_includes(&kdir.join(name), kdir, once);
            }
        } else if t != "#pragma once" {
            out += line;
            out.push('\n');
        }
    }
    out
}
