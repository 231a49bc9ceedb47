//! The GPU-visit kit (scripts/gpu-bundle.sh, scripts/gpu-check.sh, scripts/gpu_kit.py), so that
//! it cannot rot between visits: the bundle script fails in one line from a fresh HOME; the
//! cheapest stages run on the emulator from a bundle-shaped folder with no cargo on PATH and
//! write their records; the stages whose tool is not on this machine (compute-sanitizer, ncu,
//! torch) fail in one line each, and their shell logic runs against stand-in tools that behave
//! as the real ones do at their interface (arguments, exit status, output format).

use crate::common::tmp;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// An executable shell script.
fn script(path: &Path, body: &str) {
    std::fs::write(path, format!("#!/bin/bash\n{body}")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A folder holding links to just the programs the kit's scripts use (cargo is not among
/// them), and `extra` scripts: the PATH of a GPU machine, as far as the kit can tell.
fn bare_path(dir: &Path, extra: &[(&str, &str)]) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let tools = [
        "bash", "awk", "cat", "cut", "date", "dirname", "gzip", "head", "mkdir", "mktemp", "nproc",
        "rm", "sed", "tail", "tar", "tee", "timeout", "uniq", "env", "sleep",
    ];
    for t in tools {
        let out = Command::new("bash")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .unwrap();
        let path = String::from_utf8(out.stdout).unwrap();
        assert!(out.status.success(), "{t} is needed by the kit's tests");
        symlink(path.trim(), bin.join(t)).unwrap();
    }
    symlink(python(), bin.join("python3")).unwrap();
    for (name, body) in extra {
        script(&bin.join(name), body);
    }
    bin
}

/// The real python3 (not a version manager's shim, which needs its own PATH).
fn python() -> String {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 (the kit's records are written by it)");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A folder laid out as scripts/gpu-bundle.sh lays out the bundle, with this build's `mura`, this
/// test binary as `tests/device` (and, where a test needs one, as `tests/ops`, standing in for the
/// kernel tests), and a gpu-tests.txt of the device binary's GPU tests under those names.
fn bundle(dir: &Path, as_ops: bool) -> PathBuf {
    let b = dir.join("gpu-bundle");
    std::fs::create_dir_all(b.join("tests")).unwrap();
    symlink(env!("CARGO_BIN_EXE_mura"), b.join("mura")).unwrap();
    let me = std::env::current_exe().unwrap();
    symlink(&me, b.join("tests/device")).unwrap();
    for f in ["gpu-check.sh", "gpu_kit.py", "pytorch_bench.py"] {
        std::fs::copy(repo().join("scripts").join(f), b.join(f)).unwrap();
    }
    symlink(repo().join("tests/fixtures"), b.join("fixtures")).unwrap();
    let listed = std::fs::read_to_string(repo().join("tests/gpu-tests.txt")).unwrap();
    let mut mine: Vec<&str> = listed
        .lines()
        .filter(|l| l.starts_with("device "))
        .collect();
    let as_ops_lines: Vec<String> = mine
        .iter()
        .map(|l| l.replacen("device", "ops", 1))
        .collect();
    if as_ops {
        symlink(&me, b.join("tests/ops")).unwrap();
        mine.extend(as_ops_lines.iter().map(String::as_str));
    }
    std::fs::write(b.join("gpu-tests.txt"), mine.join("\n") + "\n").unwrap();
    std::fs::write(b.join("COMMIT"), "kit-test\n").unwrap();
    b
}

/// gpu-check.sh in `bundle` with `args`, on the emulator, PATH = `bin` only; its output and the
/// records it wrote.
fn check(
    bundle: &Path,
    bin: &Path,
    env: &[(&str, &str)],
    args: &[&str],
) -> (Output, Vec<serde_json::Value>) {
    let out_dir = bundle.parent().unwrap().join("out");
    let _ = std::fs::remove_dir_all(&out_dir);
    let out = Command::new(bin.join("bash"))
        .arg(bundle.join("gpu-check.sh"))
        .args(args)
        .env_clear()
        .env("PATH", bin)
        .env("HOME", bundle.parent().unwrap())
        .env("MURA_TEST_DEVICE", "emu")
        .env("OUT", &out_dir)
        .env("KIT_TOOL_PATH", "")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let records = std::fs::read_to_string(out_dir.join("results.jsonl")).unwrap_or_default();
    let records = records
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    (out, records)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The non-empty lines of `out` that start with `prefix`.
fn lines<'a>(out: &'a str, prefix: &str) -> Vec<&'a str> {
    out.lines()
        .filter(|l| !l.trim().is_empty() && l.starts_with(prefix))
        .collect()
}

/// Every record names its kind, the card, driver, date, commit and call.
fn common_fields(r: &serde_json::Value, call: &str) {
    for k in ["kind", "card", "driver", "date", "commit", "call"] {
        assert!(r[k].is_string(), "{k} missing from {r}");
    }
    assert_eq!(
        (r["card"].as_str(), r["driver"].as_str()),
        (Some("emu"), Some("none"))
    );
    assert_eq!(
        (r["commit"].as_str(), r["call"].as_str()),
        (Some("kit-test"), Some(call))
    );
}

#[test]
fn the_bundle_script_fails_in_one_line_from_a_fresh_home() {
    let d = tmp("bundle");
    let home = d.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // pip (and venv's) as on a machine without the network: they fail, saying so.
    let offline = format!(
        "case \"$*\" in *'-m pip'*|*'-m venv'*) echo 'ERROR: No matching distribution found \
         (network unreachable)' >&2; exit 1;; esac\nexec {} \"$@\"",
        python()
    );
    let bin = bare_path(&d, &[("strip", "exit 0")]);
    std::fs::remove_file(bin.join("python3")).unwrap();
    script(&bin.join("python3"), &offline);
    let run = |path: String| {
        Command::new(bin.join("bash"))
            .arg(repo().join("scripts/gpu-bundle.sh"))
            .env_clear()
            .env("HOME", &home)
            .env("PATH", path)
            .output()
            .unwrap()
    };
    // No cargo: said, in one line.
    let o = run(bin.display().to_string());
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert_eq!(lines(&err, ""), ["gpu-bundle: cargo not found on PATH (the bundle needs cargo, python3, tar, gzip and strip)"]);
    // Cargo, and no nvcc: it installs the pinned one into the fresh HOME's cache, and pip's
    // failure is the one error line.
    symlink(&cargo, bin.join("cargo")).unwrap_or_else(|_| {
        script(&bin.join("cargo"), &format!("exec {cargo} \"$@\""));
    });
    let o = run(bin.display().to_string());
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let errs = lines(&err, "");
    assert!(
        errs.len() == 1
            && errs[0].starts_with("gpu-bundle: pip could not install nvidia-cuda-nvcc==13.0.88"),
        "{err}"
    );
    assert!(errs[0].contains("network unreachable"), "{err}");
    assert!(
        home.join(".cache/mura-ci").is_dir(),
        "the cache goes into the fresh HOME"
    );
}

/// The cheapest stages, as on the device, on the emulator: `info` and `tests` (this binary's GPU
/// tests), with no cargo on PATH, from a folder far from the source tree.
#[test]
fn the_cheapest_stages_run_from_a_bundle_without_cargo() {
    let d = tmp("cheap");
    let b = bundle(&d, false);
    let bin = bare_path(&d, &[]);
    let (o, recs) = check(
        &b,
        &bin,
        &[],
        &["--call", "ci", "--budget", "300", "info", "tests"],
    );
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    let verdicts = lines(&out, "PASS ");
    assert_eq!(verdicts.len(), 2, "{out}");
    assert!(verdicts[0].starts_with("PASS mura-info ("), "{out}");
    assert!(verdicts[1].starts_with("PASS tests-device ("), "{out}");
    assert!(
        out.trim_end().ends_with("s)") && out.contains("gpu-check: PASS (2 steps"),
        "{out}"
    );
    assert_eq!(recs.len(), 2, "{recs:?}");
    for r in &recs {
        common_fields(r, "ci");
    }
    assert_eq!(recs[0]["kind"], "info");
    assert!(recs[0]["mura_info"]
        .to_string()
        .contains("emu    CPU emulator"));
    let listed = std::fs::read_to_string(b.join("gpu-tests.txt"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(recs[1]["kind"], "gpu-tests");
    assert_eq!(
        (
            recs[1]["binary"].as_str(),
            recs[1]["passed"].as_u64(),
            recs[1]["failed"].as_u64()
        ),
        (Some("device"), Some(listed as u64), Some(0))
    );
    // What comes back from the device: three files, none deeper than the folder.
    let mut files: Vec<String> = std::fs::read_dir(d.join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(files, ["gpu-check.log", "logs.tar.gz", "results.jsonl"]);
}

/// compute-sanitizer, ncu and torch absent: one FAIL line each (no log tail), a record each, and
/// the script goes on to its summary.
#[test]
fn stages_whose_tool_is_missing_fail_in_one_line() {
    let d = tmp("missing");
    let b = bundle(&d, true);
    let no_torch = format!("exec {} -S \"$@\"", python()); // no site-packages: no torch
    let bin = bare_path(&d, &[("python-without-torch", &no_torch)]);
    let py = bin.join("python-without-torch").display().to_string();
    let (o, recs) = check(
        &b,
        &bin,
        &[("KIT_PYTHON", &py)],
        &["--call", "m", "memcheck", "ncu", "torch64"],
    );
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    let fails = lines(&out, "FAIL ");
    assert_eq!(fails.len(), 3, "{out}");
    for (f, name) in fails.iter().zip(["memcheck", "ncu", "torch-b64"]) {
        assert!(f.starts_with(&format!("FAIL {name} (0 s): ")), "{out}");
        assert!(
            f.contains("not found on PATH") || f.contains("cannot import torch"),
            "{f}"
        );
    }
    assert!(
        lines(&out, "   |").is_empty(),
        "no log tail for a missing tool:\n{out}"
    );
    assert!(
        out.contains("gpu-check: FAIL (3 of 3 steps: memcheck ncu torch-b64"),
        "{out}"
    );
    let kinds: Vec<&str> = recs.iter().map(|r| r["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["sanitizer", "ncu", "pytorch-bench"]);
    assert!(recs.iter().all(|r| r["error"].is_string()), "{recs:?}");
}

/// A compute-sanitizer that runs the program it is given, then reports `STUB_ERRORS` errors.
const SANITIZER: &str = r#"
while [ $# -gt 0 ]; do case "$1" in --tool|--print-limit|--error-exitcode) shift 2;; --*) shift;; *) break;; esac; done
"$@"; rc=$?
echo "========= ERROR SUMMARY: ${STUB_ERRORS:-0} errors"
[ "${STUB_ERRORS:-0}" = 0 ] || exit 86
exit $rc
"#;

/// An ncu that runs the program, then writes the raw page of `--csv` for the kernels of
/// `--kernel-name regex:^(a|b)$` into `--log-file`: each metric of `--metrics` at 1,024 (with
/// ncu's thousands separator), but the copy's global load sectors at 513.
const NCU: &str = r#"
while [ $# -gt 0 ]; do case "$1" in --log-file) log="$2"; shift 2;; --metrics) metrics="$2"; shift 2;; --kernel-name) names="${2#regex:^(}"; names="${names%)\$}"; shift 2;; --clock-control|--page) shift 2;; --*) shift;; *) break;; esac; done
"$@" >/dev/null || exit 1
{ echo "==PROF== Connected to process 1"
  printf '"ID","Kernel Name"'; for m in ${metrics//,/ }; do printf ',"%s"' "$m"; done; echo
  printf '"",""'; for m in ${metrics//,/ }; do printf ',"sector"'; done; echo
  for k in ${names//|/ }; do
    printf '"0","%s"' "$k"
    for m in ${metrics//,/ }; do
      case "$k/$m" in
        selftest_copy_fwd_f32/l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum) printf ',"513"';;
        selftest_copy_fwd_f32/*) printf ',"0"';;
        *) printf ',"1,024"';;
      esac
    done; echo
  done; } > "$log"
"#;

/// The probe as bench-kernels prints it (two kernels) for --device emu; nothing for cuda.
const PROBE: &str = r#"
[ "$1" = --probe ] || exit 2
[ "$3" = emu ] || exit 0
echo '{"kernel":"selftest_copy_fwd_f32","what":"a coalesced copy","device":"emu","emu":{"l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum":513,"l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum":129,"l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum":513,"l1tex__t_requests_pipe_lsu_mem_global_op_st.sum":129,"l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum":0,"l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum":0,"smsp__inst_executed_pipe_tensor_op_hmma.sum":0}}'
echo '{"kernel":"conv1x1_tc_fwd_bf16","what":"a 1x1","device":"emu","emu":{"l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum":62720,"l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum":13328,"l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum":100352,"l1tex__t_requests_pipe_lsu_mem_global_op_st.sum":12544,"l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum":0,"l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum":6400,"smsp__inst_executed_pipe_tensor_op_hmma.sum":12800}}'
"#;

/// pytorch_bench.py's output for each of --modes (the raw fields the kit records).
const TORCH: &str = r#"
[ "$1" = -c ] && exit 0
batch=$(echo "$@" | sed -n 's/.*--batch \([0-9]*\).*/\1/p'); modes=$(echo "$@" | sed -n 's/.*--modes \([^ ]*\).*/\1/p')
for m in ${modes//,/ }; do echo "{\"mode\": \"$m\", \"batch\": $batch, \"images_per_s\": 2.5, \"step_ms\": 800.0, \"step_times_ms\": [800.0, 801.0], \"peak_mem_bytes\": 1048576, \"oom\": false}"; done
"#;

/// The sanitizer, ncu and torch stages against stand-ins: what they run, what they record, and
/// that a sanitizer's errors fail the step.
#[test]
fn stages_with_stand_in_tools_record_what_the_tools_report() {
    let d = tmp("stand-in");
    let b = bundle(&d, true);
    script(&b.join("bench-kernels"), PROBE);
    let bin = bare_path(
        &d,
        &[
            ("compute-sanitizer", SANITIZER),
            ("ncu", NCU),
            ("torch-python", TORCH),
        ],
    );
    let py = bin.join("torch-python").display().to_string();
    let args = ["--call", "s", "memcheck", "ncu", "torch64"];
    let (o, recs) = check(&b, &bin, &[("KIT_PYTHON", &py)], &args);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    for step in ["memcheck", "ncu", "torch-b64"] {
        assert_eq!(lines(&out, &format!("PASS {step} (")).len(), 1, "{out}");
    }
    let listed = std::fs::read_to_string(b.join("gpu-tests.txt")).unwrap();
    let ops = listed.lines().filter(|l| l.starts_with("ops ")).count() as u64;
    let san = &recs[0];
    common_fields(san, "s");
    assert_eq!(
        (
            san["kind"].as_str(),
            san["tool"].as_str(),
            san["errors"].as_u64(),
            san["passed"].as_u64()
        ),
        (Some("sanitizer"), Some("memcheck"), Some(0), Some(ops))
    );
    let ncu: Vec<_> = recs.iter().filter(|r| r["kind"] == "ncu").collect();
    assert_eq!(ncu.len(), 14, "every metric of both kernels: {ncu:?}");
    let at = |k: &str, m: &str| {
        let r = ncu
            .iter()
            .find(|r| r["kernel"] == k && r["metric"] == m)
            .unwrap();
        (r["ncu"].as_f64(), r["emu"].as_u64())
    };
    let ld = "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum";
    assert_eq!(at("selftest_copy_fwd_f32", ld), (Some(513.0), Some(513)));
    assert_eq!(at("conv1x1_tc_fwd_bf16", ld), (Some(1024.0), Some(62720)));
    let hmma = "smsp__inst_executed_pipe_tensor_op_hmma.sum";
    assert_eq!(
        at("conv1x1_tc_fwd_bf16", hmma),
        (Some(1024.0), Some(12800)),
        "the second pass"
    );
    let torch: Vec<_> = recs
        .iter()
        .filter(|r| r["kind"] == "pytorch-bench")
        .collect();
    let modes: Vec<_> = torch.iter().map(|r| r["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["eager-fp32", "amp-bf16-channels-last"]);
    for r in &torch {
        common_fields(r, "s");
        assert_eq!(
            (r["batch"].as_u64(), r["step_ms"].as_f64()),
            (Some(2), Some(800.0))
        );
    }

    // Sanitizer errors fail the step, and are recorded.
    let (o, recs) = check(
        &b,
        &bin,
        &[("STUB_ERRORS", "3")],
        &["--call", "s", "memcheck"],
    );
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert_eq!(lines(&out, "FAIL memcheck (").len(), 1, "{out}");
    assert!(out.contains("memcheck over ops: 3 errors"), "{out}");
    assert_eq!(recs[0]["errors"].as_u64(), Some(3));
}

/// A step that would outlast the budget is skipped, and the script still ends with its verdict.
#[test]
fn a_stage_past_the_budget_is_skipped_not_killed() {
    let d = tmp("budget");
    let b = bundle(&d, false);
    let bin = bare_path(&d, &[]);
    let (o, _) = check(&b, &bin, &[], &["--call", "b", "--budget", "15", "info"]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        lines(&out, "SKIP mura-info (0 s): only ").len() == 1,
        "{out}"
    );
    assert!(
        out.contains("gpu-check: FAIL (1 of 1 steps: mura-info"),
        "{out}"
    );
}
