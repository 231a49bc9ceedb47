//! Helpers shared by the integration tests that drive the `mura` binary.
#![allow(dead_code)] // each test file uses its own subset

pub mod dicom;
pub mod gpu;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Run the built binary.
pub fn mura(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mura"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run mura")
}

/// Run the built binary in the folder `dir`.
pub fn mura_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mura"))
        .args(args)
        .current_dir(dir)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run mura")
}

/// Run a command that must succeed; its (stdout, stderr).
pub fn run_ok(args: &[&str]) -> (String, String) {
    ok(args, mura(args))
}

/// [`run_ok`] in the folder `dir`.
pub fn run_ok_in(dir: &Path, args: &[&str]) -> (String, String) {
    ok(args, mura_in(dir, args))
}

fn ok(args: &[&str], out: Output) -> (String, String) {
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "mura {args:?} failed:\n{so}\n{se}");
    (so, se)
}

/// The folder of the test fixtures: `MURA_FIXTURES` (set by scripts/gpu-check.sh, which runs
/// the test binaries far from this source tree), else this tree's tests/fixtures.
pub fn fixtures() -> PathBuf {
    match std::env::var_os("MURA_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
    }
}

/// A fresh empty folder for one test: `mura-<file>-<pid>-<name>` in the temp folder, where
/// `<file>` is the stem of the test file that calls it, so that two files' tests of one name
/// never share a folder.
#[track_caller]
pub fn tmp(name: &str) -> PathBuf {
    let file = Path::new(std::panic::Location::caller().file());
    let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("test");
    let d = std::env::temp_dir().join(format!("mura-{stem}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A path as the `&str` an argument list takes (the tests' paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A small synthetic set prepped at 32x32 under `dir`: (source, store).
pub fn prepped(dir: &std::path::Path, studies: usize, seed: u64) -> (PathBuf, PathBuf) {
    let (src, store) = (dir.join("src"), dir.join("store"));
    let (n, sd) = (studies.to_string(), seed.to_string());
    run_ok(&[
        "synth",
        "--out",
        src.to_str().unwrap(),
        "--studies",
        &n,
        "--seed",
        &sd,
    ]);
    run_ok(&[
        "prep",
        "--mura-root",
        src.to_str().unwrap(),
        "--out",
        store.to_str().unwrap(),
        "--size",
        "32",
    ]);
    (src, store)
}

/// The tiny custom DenseNet the tests train.
pub const TINY: &[&str] = &[
    "--arch",
    "custom",
    "--growth-rate",
    "4",
    "--block-config",
    "2,2",
    "--num-init-features",
    "8",
    "--bn-size",
    "2",
];

/// How a bounded run of mura ended.
pub struct Bounded {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub seconds: f64,
}

/// Runs mura with `env` set, at most `mem` bytes of address space (an allocation beyond it
/// fails, so an unbounded one aborts), on two threads; panics if it runs longer than `secs`.
pub fn mura_bounded(args: &[&str], env: &[(&str, &str)], mem: u64, secs: u64) -> Bounded {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mura"));
    cmd.args(args)
        .envs(env.iter().copied())
        .env("RAYON_NUM_THREADS", "2")
        .env("MALLOC_ARENA_MAX", "2")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: mem,
                rlim_max: mem,
            };
            match libc::setrlimit(libc::RLIMIT_AS, &lim) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        });
    }
    let t0 = std::time::Instant::now();
    let mut child = cmd.spawn().expect("run mura");
    let pipe = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = r.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = pipe(Box::new(child.stdout.take().unwrap()));
    let err = pipe(Box::new(child.stderr.take().unwrap()));
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for mura") {
            break s;
        }
        if t0.elapsed().as_secs() >= secs {
            let _ = child.kill();
            let _ = child.wait();
            panic!("mura {args:?} did not finish within {secs} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    Bounded {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
        seconds: t0.elapsed().as_secs_f64(),
    }
}

/// The one `error: ...` line of a run that must fail cleanly (exit code 1, nothing else on
/// stderr, no panic).
pub fn one_error_line(run: &Bounded, what: &str) -> String {
    let lines: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(
        run.status.code(),
        Some(1),
        "{what}: exit {:?}, stderr:\n{}",
        run.status,
        run.stderr
    );
    assert!(
        lines.len() == 1 && lines[0].starts_with("error: "),
        "{what} should print one error line, got:\n{}",
        run.stderr
    );
    lines[0].to_string()
}

/// A Python client a test checks mura against: the modules it imports, the variable that makes
/// the check mandatory, and what goes unchecked without it.
pub struct Client {
    pub imports: &'static str,
    pub required_by: &'static str,
    pub unchecked: &'static str,
}

impl Client {
    /// The Python that `MURA_TEST_PYTHON` names (else `python3`) if it imports the client's
    /// modules; else the reason it does not: a failure where the client's variable is `1`.
    pub fn probe(&self) -> Result<String, String> {
        let python = std::env::var("MURA_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let probe = Command::new(&python)
            .args(["-c", &format!("import {}", self.imports)])
            .output();
        match probe.is_ok_and(|o| o.status.success()) {
            true => Ok(python),
            false => Err(format!("{python} cannot import {}", self.imports)),
        }
    }

    /// `probed` as an Option, a missing client said loudly on stderr (or, where the client's
    /// variable is `1`, a failure) for `test`.
    pub fn or_unchecked(&self, test: &str, probed: &Result<String, String>) -> Option<String> {
        let why = match probed {
            Ok(python) => return Some(python.clone()),
            Err(why) => why,
        };
        let required = std::env::var(self.required_by).is_ok_and(|v| v == "1");
        assert!(!required, "{}=1 but {why}", self.required_by);
        // Written to the stream itself, not through eprintln!, which a passing test's capture hides.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "{test}: {why}: {} was NOT checked ({}=1 requires it)",
            self.unchecked,
            self.required_by
        );
        None
    }
}
