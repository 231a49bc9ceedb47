//! Builds the GPU kernels in `kernels/*.cu` (shipped) and `kernels/testing/*.cu` (used by tests
//! only) three ways:
//! - for the CPU emulator, always: each file compiled as C++20 against src/gpu/emu/cuda_emu.h,
//!   with generated trampolines that turn a `void**` parameter array into a typed call;
//! - with nvcc when one is found (`NVCC`, `CUDA_HOME`/`CUDA_PATH`, `PATH`): a fatbin per file
//!   (SASS sm_80/86/89/90 + PTX compute_90) embedded in the binary, plus ptxas's `-v` report;
//! - without nvcc: the sources (local includes inlined) are embedded for NVRTC at run time.
//!
//! From the kernels' own `extern "C" __global__` signatures it generates one typed Rust launcher
//! per kernel (and one generic over the activation type for each `<base>_f32` / `<base>_bf16`
//! pair), so a caller that disagrees with a kernel's signature fails to compile; and from
//! `kernels/consts.cuh` the constants that the kernels and the launchers share.
//!
//! It also builds a small AddressSanitizer harness of the emulator for the emulator self-tests.
//! Writes `$OUT_DIR/kernels.rs` (included by src/gpu/kernels.rs) and `$OUT_DIR/consts.rs`
//! (included by src/consts.rs).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::{env, fs};

const SASS: [&str; 4] = ["80", "86", "89", "90"];
const PTX: &str = "90";

/// The element type behind a kernel's pointer parameter.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Elem {
    F32,
    F32x4,
    Bf16,
    F16,
    U8,
    I32,
    U32,
}

/// A kernel parameter's C type.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum CType {
    Ptr(Elem),
    Int,
    Float,
}

struct Param {
    name: String,
    ty: CType,
}

struct Kernel {
    name: String,
    params: Vec<Param>,
    /// The parameter list as written, whitespace folded (for the launcher's documentation).
    signature: String,
}

struct KernelFile {
    /// Unique identifier: `bn`, `testing_selftest`.
    stem: String,
    /// Relative to kernels/: `bn.cu`, `testing/selftest.cu`.
    rel: String,
    path: PathBuf,
    testing: bool,
    kernels: Vec<Kernel>,
}

impl KernelFile {
    /// Its kernels' names.
    fn names(&self) -> Vec<String> {
        self.kernels.iter().map(|k| k.name.clone()).collect()
    }
}

fn main() {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kdir = root.join("kernels");
    let emu_dir = root.join("src/gpu/emu");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=kernels/testing");
    println!("cargo:rerun-if-changed=src/gpu/emu");
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let mut files = kernel_files(&kdir, "", false);
    files.extend(kernel_files(&kdir.join("testing"), "testing/", true));
    let mut seen = BTreeSet::new();
    for k in files.iter().flat_map(|f| &f.kernels) {
        assert!(
            seen.insert(&k.name),
            "kernel {} is defined twice in kernels/",
            k.name
        );
    }
    fs::write(out.join("consts.rs"), consts_rs(&kdir.join("consts.cuh"))).unwrap();

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
            fs::write(out.join("ptxas.txt"), "").unwrap();
            "NVRTC at run time (no nvcc found at build time: set NVCC or CUDA_HOME)".to_string()
        }
    };
    let rs = kernels_rs(&files, nvcc.is_some(), &built_with, &asan);
    fs::write(out.join("kernels.rs"), rs).unwrap();
}

/// The `.cu` files of `dir` (not its subfolders), with their kernels, sorted by name.
fn kernel_files(dir: &Path, prefix: &str, testing: bool) -> Vec<KernelFile> {
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            println!("cargo:rerun-if-changed={}", path.display());
            let src = fs::read_to_string(&path).unwrap();
            let name = path.file_stem().unwrap().to_str().unwrap().to_string();
            KernelFile {
                stem: format!("{}{name}", prefix.replace('/', "_")),
                rel: format!("{prefix}{name}.cu"),
                kernels: kernels_of(&src, &path),
                path,
                testing,
            }
        })
        .collect()
}

/// The `extern "C" __global__` entry points of a .cu source, with their parameters.
fn kernels_of(src: &str, path: &Path) -> Vec<Kernel> {
    const MARK: &str = "extern \"C\" __global__";
    let mut kernels = Vec::new();
    for (at, _) in src.match_indices(MARK) {
        let mut rest = &src[at + MARK.len()..];
        let name = loop {
            let open = rest.find('(').expect("kernel signature without '('");
            let ident = last_ident(&rest[..open]);
            if ident == "__launch_bounds__" {
                rest = &rest[open + rest[open..].find(')').unwrap() + 1..];
                continue;
            }
            rest = &rest[open + 1..];
            break ident;
        };
        let close = rest.find(')').expect("kernel parameter list without ')'");
        let list = &rest[..close];
        let params: Vec<Param> = list
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty() && *p != "void")
            .map(|p| {
                param(p).unwrap_or_else(|| {
                    panic!(
                        "{}: kernel {name}: unsupported parameter `{p}` (the launcher generator \
                         knows float, float4, bf16, half, unsigned char, int and unsigned pointers, and int \
                         and float values)",
                        path.display()
                    )
                })
            })
            .collect();
        let names: BTreeSet<&str> = params.iter().map(|p: &Param| p.name.as_str()).collect();
        assert!(
            names.len() == params.len(),
            "{}: kernel {name}: two parameters differ only in case",
            path.display()
        );
        let signature = list.split_whitespace().collect::<Vec<_>>().join(" ");
        kernels.push(Kernel {
            name,
            params,
            signature,
        });
    }
    kernels
}

/// The identifier that ends `s` (after trailing spaces).
fn last_ident(s: &str) -> String {
    let s = s.trim_end();
    let start = s
        .rfind(|c: char| !(c.is_alphanumeric() || c == '_'))
        .map_or(0, |i| i + 1);
    s[start..].to_string()
}

/// Rust keywords a C parameter may be named (strict and reserved ones a kernel might use).
const RUST_KEYWORDS: [&str; 24] = [
    "as", "box", "crate", "dyn", "enum", "final", "fn", "impl", "in", "let", "loop", "match",
    "mod", "move", "mut", "priv", "pub", "ref", "self", "trait", "type", "use", "where", "yield",
];

/// One parameter declaration: `const float* __restrict__ x`, `int n`.
fn param(decl: &str) -> Option<Param> {
    let pointer = decl.matches('*').count();
    let words: Vec<&str> = decl
        .split(|c: char| c.is_whitespace() || c == '*')
        .filter(|w| !w.is_empty() && !matches!(*w, "const" | "__restrict__" | "__restrict"))
        .collect();
    let (name, ty) = words.split_last()?;
    // Rust's snake case for the launcher (`R` → `r`), a keyword as a raw identifier (`r#in`).
    let name = name.to_lowercase();
    let name = match RUST_KEYWORDS.contains(&name.as_str()) {
        true => format!("r#{name}"),
        false => name,
    };
    let ty = ty.join(" ");
    let elem = match ty.as_str() {
        "float" => Elem::F32,
        "float4" => Elem::F32x4,
        "bf16" | "__nv_bfloat16" | "nv_bfloat16" => Elem::Bf16,
        "__half" | "half" => Elem::F16,
        "unsigned char" => Elem::U8,
        "int" => Elem::I32,
        "unsigned" | "unsigned int" => Elem::U32,
        _ => return None,
    };
    let ty = match (pointer, elem) {
        (1, e) => CType::Ptr(e),
        (0, Elem::I32) => CType::Int,
        (0, Elem::F32) => CType::Float,
        _ => return None,
    };
    Some(Param { name, ty })
}

/// `pub const NAME: T = V;` for every `constexpr T NAME = V;` line of consts.cuh.
fn consts_rs(path: &Path) -> String {
    let mut rs = String::from("// Generated by build.rs from kernels/consts.cuh.\n");
    for line in fs::read_to_string(path).unwrap().lines() {
        let Some(decl) = line.trim().strip_prefix("constexpr ") else {
            continue;
        };
        let decl = decl.split("//").next().unwrap().trim();
        let parsed = decl.strip_suffix(';').and_then(|d| {
            let (lhs, value) = d.split_once('=')?;
            let (ty, name) = lhs.trim().split_once(' ')?;
            let ty = match ty {
                "int" => "usize",
                "double" => "f64",
                _ => return None,
            };
            Some((name.trim(), ty, value.trim()))
        });
        let (name, ty, value) = parsed.unwrap_or_else(|| {
            panic!(
                "kernels/consts.cuh: expected `constexpr int|double NAME = LITERAL;`, got `{line}`"
            )
        });
        writeln!(rs, "pub const {name}: {ty} = {value};").unwrap();
    }
    rs
}

/// Rust type of a pointer's element.
fn rust_elem(e: Elem) -> &'static str {
    match e {
        Elem::F32 => "f32",
        Elem::F32x4 => "[f32; 4]",
        Elem::Bf16 => "bf16",
        Elem::F16 => "f16",
        Elem::U8 => "u8",
        Elem::I32 => "i32",
        Elem::U32 => "u32",
    }
}

/// The Rust parameter type of a C parameter; `generic` marks an activation pointer of type `T`.
fn rust_param(ty: CType, generic: bool) -> String {
    match ty {
        CType::Ptr(_) if generic => "Ptr<T>".into(),
        CType::Ptr(e) => format!("Ptr<{}>", rust_elem(e)),
        CType::Int => "impl CInt".into(),
        CType::Float => "f32".into(),
    }
}

/// For a pair `<base>_f32` / `<base>_bf16` whose signatures differ only in f32 ↔ bf16 pointers,
/// which parameters take the activation type.
fn activation_params(f32k: &Kernel, bf16k: &Kernel) -> Option<Vec<bool>> {
    if f32k.params.len() != bf16k.params.len() {
        return None;
    }
    let mut any = false;
    let mut marks = Vec::new();
    for (a, b) in f32k.params.iter().zip(&bf16k.params) {
        let generic = match (a.ty, b.ty) {
            (CType::Ptr(Elem::F32), CType::Ptr(Elem::Bf16)) => true,
            (x, y) if x == y => false,
            _ => return None,
        };
        any |= generic;
        marks.push(generic);
    }
    any.then_some(marks)
}

/// One launcher: `pub unsafe fn name[<T: Act>](d, at, params...) -> Result<()>`.
fn launcher(rs: &mut String, k: &Kernel, file: &str, generic: Option<(&str, &[bool])>) {
    let doc_name = match generic {
        Some((base, _)) => format!("`{base}_f32` or `{base}_bf16` (by `T`)"),
        None => format!("`{}`", k.name),
    };
    writeln!(rs, "/// Launches {doc_name} of `kernels/{file}`:").unwrap();
    writeln!(rs, "/// `{}({})`.", k.name, k.signature).unwrap();
    writeln!(rs, "///\n/// # Safety").unwrap();
    writeln!(
        rs,
        "/// Every pointer must address device memory valid for all that the kernel reads and writes\n\
         /// at these sizes and this launch shape (see the kernel's comment), as with cuLaunchKernel."
    )
    .unwrap();
    let fn_name = generic.map_or(k.name.clone(), |(base, _)| format!("{base}<T: Act>"));
    let marks = generic.map_or(vec![false; k.params.len()], |(_, m)| m.to_vec());
    writeln!(rs, "#[allow(clippy::too_many_arguments)]").unwrap();
    write!(rs, "pub unsafe fn {fn_name}(d: &dyn Driver, at: Launch").unwrap();
    for (p, &g) in k.params.iter().zip(&marks) {
        write!(rs, ", {}: {}", p.name, rust_param(p.ty, g)).unwrap();
    }
    writeln!(rs, ") -> Result<()> {{").unwrap();
    match generic {
        Some((base, _)) => writeln!(
            rs,
            "    let name = match T::PRECISION {{\n        Precision::F32 => \"{base}_f32\",\n        \
             Precision::Bf16 => \"{base}_bf16\",\n    }};"
        ),
        None => writeln!(rs, "    let name = \"{}\";", k.name),
    }
    .unwrap();
    for p in &k.params {
        match p.ty {
            CType::Int => writeln!(rs, "    let mut {0} = {0}.c_int(name, \"{0}\")?;", p.name),
            _ => writeln!(rs, "    let mut {0} = {0};", p.name),
        }
        .unwrap();
    }
    let args: Vec<String> = k
        .params
        .iter()
        .map(|p| format!("arg(&mut {})", p.name))
        .collect();
    writeln!(rs, "    let mut params = [{}];", args.join(", ")).unwrap();
    writeln!(
        rs,
        "    // SAFETY: `params` follows the kernel's signature (generated from it); the memory is the\n    \
         // caller's promise.\n    unsafe {{ launch_params(d, name, at, &mut params) }}\n}}\n"
    )
    .unwrap();
}

/// The launchers of some kernel files: one per kernel, one generic per f32/bf16 pair.
fn launchers(files: &[&KernelFile]) -> String {
    let mut rs = String::new();
    let all: Vec<(&Kernel, &str)> = files
        .iter()
        .flat_map(|f| f.kernels.iter().map(move |k| (k, f.rel.as_str())))
        .collect();
    for &(k, file) in &all {
        launcher(&mut rs, k, file, None);
        let Some(base) = k.name.strip_suffix("_f32") else {
            continue;
        };
        let pair = all.iter().find(|(b, _)| b.name == format!("{base}_bf16"));
        if let Some(marks) = pair.and_then(|(b, _)| activation_params(k, b)) {
            launcher(&mut rs, k, file, Some((base, &marks)));
        }
    }
    rs
}

/// `$OUT_DIR/kernels.rs`: the build report, the module tables, the emulator tables and the
/// typed launchers.
fn kernels_rs(files: &[KernelFile], fatbins: bool, built_with: &str, asan: &str) -> String {
    let mut rs = String::from("// Generated by build.rs from kernels/**/*.cu.\n");
    writeln!(rs, "pub static BUILT_WITH: &str = {built_with:?};").unwrap();
    writeln!(
        rs,
        "pub static PTXAS_REPORT: &str = include_str!(concat!(env!(\"OUT_DIR\"), \"/ptxas.txt\"));"
    )
    .unwrap();
    writeln!(rs, "pub static ASAN_HARNESS: &str = {asan:?};").unwrap();
    for f in files.iter().filter(|_| fatbins) {
        // cuModuleLoadData reads the image in words: keep it 8-byte aligned.
        writeln!(
            rs,
            "static FATBIN_{}: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!(\"OUT_DIR\"), \
             \"/{}.fatbin\")));",
            f.stem.to_uppercase(),
            f.stem
        )
        .unwrap();
    }
    for (name, testing) in [("MODULES", false), ("TEST_MODULES", true)] {
        writeln!(rs, "pub static {name}: &[KernelModule] = &[").unwrap();
        for f in files.iter().filter(|f| f.testing == testing) {
            let names: Vec<&str> = f.kernels.iter().map(|k| k.name.as_str()).collect();
            let fatbin = match fatbins {
                true => format!("Some(&FATBIN_{}.0)", f.stem.to_uppercase()),
                false => "None".into(),
            };
            writeln!(
                rs,
                "    KernelModule {{ file: \"{}\", kernels: &{names:?}, fatbin: {fatbin}, \
                 source: include_str!(concat!(env!(\"OUT_DIR\"), \"/{}.nvrtc.cu\")) }},",
                f.rel, f.stem
            )
            .unwrap();
        }
        writeln!(rs, "];").unwrap();
    }
    writeln!(rs, "extern \"C\" {{").unwrap();
    for f in files {
        let n = f.kernels.len();
        writeln!(rs, "    static mura_table_{}: [EmuKernel; {n}];", f.stem).unwrap();
    }
    writeln!(rs, "}}").unwrap();
    writeln!(
        rs,
        "/// The emulator's compiled kernels, one slice per kernels/**/*.cu file."
    )
    .unwrap();
    let tables: Vec<String> = files
        .iter()
        .map(|f| format!("&mura_table_{}", f.stem))
        .collect();
    writeln!(
        rs,
        "pub fn emu_tables() -> [&'static [EmuKernel]; {}] {{\n    unsafe {{ [{}] }}\n}}",
        files.len(),
        tables.join(", ")
    )
    .unwrap();
    let shipped: Vec<&KernelFile> = files.iter().filter(|f| !f.testing).collect();
    let testing: Vec<&KernelFile> = files.iter().filter(|f| f.testing).collect();
    writeln!(
        rs,
        "/// Typed launchers of the shipped kernels (kernels/*.cu), generated from their signatures.\n\
         pub mod launch {{\n    use super::prelude::*;\n{}}}",
        indent(&launchers(&shipped))
    )
    .unwrap();
    writeln!(
        rs,
        "/// Typed launchers of the test-only kernels (kernels/testing/*.cu).\n\
         pub mod testing {{\n    use super::prelude::*;\n{}}}",
        indent(&launchers(&testing))
    )
    .unwrap();
    rs
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| match l.is_empty() {
            true => "\n".to_string(),
            false => format!("    {l}\n"),
        })
        .collect()
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
        let (stem, ks) = (&f.stem, &f.names());
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
            out,
            &tu,
            &mutated,
            &f.names(),
            &suffix,
            &suffix,
            &table,
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

/// The emulator with kernels/testing/selftest.cu under AddressSanitizer, as a standalone program
/// for the out-of-bounds test. Returns its path, or "" (with a warning) when the compiler cannot.
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
            panic!("nvcc failed on kernels/{}:\n{text}", f.rel);
        }
        writeln!(report, "== {}\n{text}", f.rel).unwrap();
    }
    fs::write(out.join("ptxas.txt"), report).unwrap();
    let archs: Vec<String> = SASS.iter().map(|s| format!("sm_{s}")).collect();
    format!(
        "nvcc ({release}) at build time: SASS {} + PTX compute_{PTX}",
        archs.join(" ")
    )
}

/// The source with its local `#include "x.cuh"` lines replaced by the headers (each once), so
/// NVRTC needs no include path for them. Headers are found beside the including file, then in
/// kernels/.
fn inline_includes(path: &Path, kdir: &Path, once: &mut BTreeSet<PathBuf>) -> String {
    let mut out = String::new();
    for line in fs::read_to_string(path).unwrap().lines() {
        let t = line.trim();
        if let Some(name) = t
            .strip_prefix("#include \"")
            .and_then(|r| r.strip_suffix('"'))
        {
            let beside = path.parent().unwrap().join(name);
            let header = if beside.is_file() {
                beside
            } else {
                kdir.join(name)
            };
            if once.insert(header.clone()) {
                out += &inline_includes(&header, kdir, once);
            }
        } else if t != "#pragma once" {
            out += line;
            out.push('\n');
        }
    }
    out
}
