//! What GPU tests share: the executor under test, seeds, device buffers of test values, and the
//! error measure.
//!
//! One test body runs on every executor: the emulator by default, a real GPU when
//! `MURA_TEST_DEVICE=cuda` (or `cuda:N`) is set, in which case having no GPU is a failure.
//! Seeds are fixed by default (a test's seed is derived from its name, so every run sees the same
//! inputs); `MURA_TEST_SEED=random` draws fresh ones, `MURA_TEST_SEED=N` replays one; a failing
//! test prints its seed.
#![allow(dead_code)] // each test binary uses its own subset

use half::bf16;
use mura::device::Device;
use mura::gpu::ops::BnRelu;
use mura::gpu::{Act, DeviceBuffer, Driver, Mat, Nhwc};
use mura::rng::Rng;
use std::sync::{Arc, Mutex};

/// The driver named by `MURA_TEST_DEVICE` (`emu` when unset); a test fails loudly when it cannot
/// be opened (a GPU asked for and absent is not skipped), and when it is not listed in
/// tests/gpu-tests.txt, the tests a GPU visit runs (so none is left out).
///
/// On CUDA each test gets a driver of its own (its stream, modules and graphs) in the one CUDA
/// context of the process: the first driver opened is kept, so the context is not created again
/// for every test; a kept driver whose context a fault has poisoned is replaced, so one faulting
/// test does not fail the tests after it.
pub fn test_driver() -> Arc<dyn Driver> {
    require_listed();
    let name = std::env::var("MURA_TEST_DEVICE").unwrap_or_else(|_| "emu".into());
    let device: Device = name
        .parse()
        .unwrap_or_else(|e| panic!("MURA_TEST_DEVICE={name}: {e}"));
    let open =
        || mura::gpu::open(device).unwrap_or_else(|e| panic!("MURA_TEST_DEVICE={name}: {e:#}"));
    if let Device::Cuda(_) = device {
        static KEPT: Mutex<Option<Arc<dyn Driver>>> = Mutex::new(None);
        let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
        if kept.as_ref().is_some_and(|d| d.synchronize().is_err()) {
            *kept = None;
        }
        kept.get_or_insert_with(open);
    }
    open()
}

/// The tests that open the driver under test, as `<binary> <test>` lines.
const GPU_TESTS: &str = include_str!("../gpu-tests.txt");

/// Panics unless the running test is listed in tests/gpu-tests.txt.
fn require_listed() {
    let exe = std::env::current_exe().expect("the test binary's path");
    let stem = exe.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
    // cargo names a test binary `<name>-<16 hex digits>`; the GPU bundle, `<name>`.
    let binary = match stem.rsplit_once('-') {
        Some((name, hash)) if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            name
        }
        _ => stem,
    };
    let thread = std::thread::current();
    let test = thread
        .name()
        .filter(|t| *t != "main")
        .expect("test_driver() is called from a test's own thread (named after the test)");
    let line = format!("{binary} {test}");
    assert!(
        GPU_TESTS.lines().any(|l| l.trim() == line),
        "{test} opens the driver under test but tests/gpu-tests.txt does not list it, so a GPU \
         visit would not run it: add the line `{line}`"
    );
}

/// A test's seed; prints it if the test fails (panics) while this is alive.
pub struct Seed {
    pub value: u64,
    test: String,
}

impl Drop for Seed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let v = self.value;
            eprintln!("{}: seed {v} (MURA_TEST_SEED={v} replays it)", self.test);
        }
    }
}

/// The seed of `test`: derived from its name, `MURA_TEST_SEED=N`, or fresh with
/// `MURA_TEST_SEED=random`.
pub fn seed(test: &str) -> Seed {
    let value = match std::env::var("MURA_TEST_SEED").ok().as_deref() {
        None | Some("") => test.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        }),
        Some("random") => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            t.as_nanos() as u64 ^ ((std::process::id() as u64) << 32)
        }
        Some(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("MURA_TEST_SEED={s}: a number, or `random`")),
    };
    Seed {
        value,
        test: test.to_string(),
    }
}

/// An op test's executor: the driver under test, the test's random source and seed, and the
/// tolerance of the storage type under test.
pub struct Exec {
    pub d: Arc<dyn Driver>,
    pub rng: Rng,
    /// ‖out − ref‖ / ‖ref‖ allowed for activations stored as the type under test: 1e-5 for f32,
    /// 1e-2 for bf16.
    pub tol: f64,
    pub seed: Seed,
}

impl Exec {
    pub fn new<T: Act>(test: &str) -> Exec {
        let seed = seed(&format!("{test}_{}", T::PRECISION));
        Exec {
            d: test_driver(),
            rng: Rng::new(seed.value),
            tol: tol::<T>(),
            seed,
        }
    }
    /// `n` normal samples times `scale` plus `offset`.
    pub fn randn(&mut self, n: usize, scale: f64, offset: f64) -> Vec<f64> {
        randn(&mut self.rng, n, scale, offset)
    }
    /// `v` rounded to `T` on the device, and the values as stored.
    pub fn upload<T: Act>(&self, v: &[f64]) -> (DeviceBuffer<T>, Vec<f64>) {
        upload(&self.d, v)
    }
    /// [`Exec::randn`] rounded to `T` on the device, and the values as stored.
    pub fn random<T: Act>(
        &mut self,
        n: usize,
        scale: f64,
        offset: f64,
    ) -> (DeviceBuffer<T>, Vec<f64>) {
        let v = self.randn(n, scale, offset);
        self.upload(&v)
    }
    /// `len` NaNs of `T` on the device.
    pub fn poisoned<T: Act>(&self, len: usize) -> DeviceBuffer<T> {
        poisoned(&self.d, len)
    }
}

/// One op test body, generic over the activation type, as two tests: `<name>::f32` and
/// `<name>::bf16`, each on the executor under test with its type's tolerance.
#[macro_export]
macro_rules! test_device {
    ($name:ident, $body:ident) => {
        mod $name {
            #[test]
            fn f32() {
                super::$body::<f32>(&mut $crate::common::gpu::Exec::new::<f32>(stringify!(
                    $name
                )));
            }
            #[test]
            fn bf16() {
                super::$body::<half::bf16>(&mut $crate::common::gpu::Exec::new::<half::bf16>(
                    stringify!($name),
                ));
            }
        }
    };
}

/// The relative error allowed for activations stored as `T`.
pub fn tol<T: Act>() -> f64 {
    match T::PRECISION {
        mura::precision::Precision::F32 => 1e-5,
        mura::precision::Precision::Bf16 => 1e-2,
    }
}

/// `v` rounded to `T` on the device, and the values as stored.
pub fn upload<T: Act>(d: &Arc<dyn Driver>, v: &[f64]) -> (DeviceBuffer<T>, Vec<f64>) {
    let host: Vec<T> = v.iter().map(|&x| T::from_f64(x)).collect();
    let b = DeviceBuffer::from_slice(d, &host).unwrap();
    let stored = host.iter().map(|x| x.to_f64()).collect();
    (b, stored)
}

/// `len` NaNs of `T` on the device (every byte 0xff: NaN as f32 and as bf16).
pub fn poisoned<T: Act>(d: &Arc<dyn Driver>, len: usize) -> DeviceBuffer<T> {
    let b = DeviceBuffer::alloc(d, len).unwrap();
    b.fill_bytes(0xff).unwrap();
    b
}

/// A device buffer's values as f64.
pub fn read<T: Act>(b: &DeviceBuffer<T>) -> Vec<f64> {
    b.to_vec().unwrap().iter().map(|x| x.to_f64()).collect()
}

/// f32 values as f64.
pub fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// bf16 values as f64.
pub fn bf16s(v: &[bf16]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

/// ‖out − ref‖ / ‖ref‖ (or ‖out − ref‖ when ref is 0); infinite when out holds a NaN or a length
/// differs, so a poisoned output never passes.
pub fn rel_err(out: &[f64], reference: &[f64]) -> f64 {
    if out.len() != reference.len() || out.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let diff: f64 = out
        .iter()
        .zip(reference)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = reference.iter().map(|b| b * b).sum::<f64>().sqrt();
    if norm > 0.0 {
        diff / norm
    } else {
        diff
    }
}

/// Asserts `rel_err(got, want) <= tol`, naming `what`.
pub fn check(what: &str, got: &[f64], want: &[f64], tol: f64) {
    let e = rel_err(got, want);
    assert!(e <= tol, "{what}: rel err {e} > {tol}");
}

/// [`check`] of a result summed from terms whose magnitudes `terms` (`|a| + |b| + ...` per
/// element) can far exceed it: the storage type's rounding is relative to the terms, so the
/// bound is `tol` times the condition ‖terms‖ / ‖want‖ (at least 1). A BN over 2 rows is such
/// a case (x·scale and shift nearly cancel).
pub fn check_cond(what: &str, got: &[f64], want: &[f64], terms: &[f64], tol: f64) {
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let cond = (norm(terms) / norm(want).max(f64::MIN_POSITIVE)).max(1.0);
    check(
        &format!("{what} (condition {cond:.1})"),
        got,
        want,
        tol * cond,
    );
}

/// `n` normal samples times `scale` plus `offset`.
pub fn randn(rng: &mut Rng, n: usize, scale: f64, offset: f64) -> Vec<f64> {
    (0..n).map(|_| rng.normal() * scale + offset).collect()
}

/// Columns `[c0, c0 + c)` of a `[rows, rs]` matrix.
pub fn cols(v: &[f64], rs: usize, c0: usize, c: usize) -> Vec<f64> {
    v.chunks(rs).flat_map(|r| r[c0..c0 + c].to_vec()).collect()
}

/// Every element outside columns `[c0, c0 + c)` of a `[rows, rs]` matrix is still NaN.
pub fn untouched_outside(v: &[f64], rs: usize, c0: usize, c: usize) -> bool {
    v.chunks(rs).all(|r| {
        r.iter()
            .enumerate()
            .all(|(j, x)| (c0..c0 + c).contains(&j) || x.is_nan())
    })
}

/// Channels `[c0, c0 + c)` of a `[n, h, w, rs]` buffer, as an NHWC view.
pub fn nhwc<T: Act>(
    b: &DeviceBuffer<T>,
    (n, h, w): (usize, usize, usize),
    rs: usize,
    (c0, c): (usize, usize),
) -> Nhwc<T> {
    Nhwc::new(b.slice(), (n, h, w, rs), rs)
        .and_then(|v| v.channels(c0, c))
        .unwrap()
}

/// Columns `[c0, c0 + c)` of a `[rows, rs]` buffer.
pub fn mat<T: Act>(b: &DeviceBuffer<T>, rows: usize, rs: usize, (c0, c): (usize, usize)) -> Mat<T> {
    Mat::new(b.slice(), rows, rs, rs)
        .and_then(|m| m.cols_range(c0, c))
        .unwrap()
}

/// `base: [rows, rs]` with `add: [rows, c]` added into its columns `[c0, c0 + c)`.
pub fn plus_cols(base: &[f64], (rs, c0, c): (usize, usize, usize), add: &[f64]) -> Vec<f64> {
    let mut out = base.to_vec();
    for (i, v) in add.iter().enumerate() {
        out[(i / c) * rs + c0 + i % c] += v;
    }
    out
}

/// `base: [2, c]` plus the per-column sums of `a` and of `a · b` (both `[rows, c]`): the
/// (Σa, Σa·b) that BN statistics and BN-backward reductions add up.
pub fn column_sums(base: &[f64], a: &[f64], b: &[f64], c: usize) -> Vec<f64> {
    let mut out = base.to_vec();
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        out[i % c] += x;
        out[c + i % c] += x * y;
    }
    out
}

/// [`check`] of columns `[c0, c0 + c)` of a `[rows, rs]` output written into a poisoned buffer,
/// and that nothing outside them was written.
pub fn check_cols(
    what: &str,
    got: &[f64],
    (rs, c0, c): (usize, usize, usize),
    want: &[f64],
    tol: f64,
) {
    check(what, &cols(got, rs, c0, c), want, tol);
    assert!(
        untouched_outside(got, rs, c0, c),
        "{what}: wrote outside its slice"
    );
}

/// Asserts that `r` is an error whose message (causes included) contains `needle`.
pub fn refused(r: anyhow::Result<()>, needle: &str) {
    match r {
        Ok(()) => panic!("accepted; expected an error naming {needle:?}"),
        Err(e) => {
            let e = format!("{e:#}");
            assert!(e.contains(needle), "{e:?} does not name {needle:?}");
        }
    }
}

/// Every value 0 (a workspace or sums a kernel must leave zeroed).
pub fn all_zero(v: &[f64]) -> bool {
    v.iter().all(|&x| x == 0.0)
}

/// Every value NaN: a poisoned buffer no kernel wrote.
pub fn all_nan(v: &[f64]) -> bool {
    v.iter().all(|x| x.is_nan())
}

/// A BN + ReLU in front of an op, `max(x · scale + shift, 0)`: random `[c]` coefficients (scale
/// about 1 ± 0.5, shift 0 ± 0.5: about half the inputs clipped) on the device (f32) and as stored.
pub struct Pre {
    pub scale: (DeviceBuffer<f32>, Vec<f64>),
    pub shift: (DeviceBuffer<f32>, Vec<f64>),
}

impl Pre {
    pub fn draw(x: &mut Exec, c: usize) -> Pre {
        let (s, t) = (x.randn(c, 0.5, 1.0), x.randn(c, 0.5, 0.0));
        Pre {
            scale: x.upload(&s),
            shift: x.upload(&t),
        }
    }
    /// The device's coefficients when `on`.
    pub fn dev(&self, on: bool) -> Option<BnRelu> {
        on.then(|| BnRelu {
            scale: self.scale.0.slice(),
            shift: self.shift.0.slice(),
        })
    }
    /// The CPU reference's coefficients when `on`.
    pub fn host(&self, on: bool) -> Option<mura::ops::BnRelu<'_, f64>> {
        on.then_some(mura::ops::BnRelu {
            scale: &self.scale.1,
            shift: &self.shift.1,
        })
    }
    /// `pre(v)` for a value `v` of channel `j`, by the reference's rule (`ops::BnRelu::at`: a NaN
    /// passes through).
    pub fn at(&self, j: usize, v: f64) -> f64 {
        let y = v * self.scale.1[j] + self.shift.1[j];
        if y <= 0.0 {
            0.0
        } else {
            y
        }
    }
}
