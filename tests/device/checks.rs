//! The emulator's checkers on planted bugs (kernels/testing/selftest.cu): memcheck, initcheck and
//! racecheck each fail the launch with one error naming the kernel, block, thread, address and
//! allocation; correct code passes; and the emulator stays usable after a failed launch.

use crate::common::gpu::seed;
use anyhow::Result;
use mura::gpu::emu::{Checks, Emu};
use mura::gpu::kernels::testing;
use mura::gpu::{arg, DeviceBuffer, Driver, Launch, Ptr};
use mura::rng::Rng;
use std::sync::Arc;

fn emu() -> Arc<dyn Driver> {
    Arc::new(Emu::with_checks(Checks::all()))
}

/// `y = x` by selftest_copy_fwd_f32 over `n` elements.
fn copy(d: &Arc<dyn Driver>, y: Ptr<f32>, x: Ptr<f32>, n: usize) -> Result<()> {
    let at = Launch::linear(n.div_ceil(128) as u32, 128);
    // SAFETY: y and x hold n f32 each (the callers' buffers); the grid covers n.
    unsafe { testing::selftest_copy_fwd_f32(&**d, at, y, x, n) }
}

/// selftest_hazard_fwd_i32's planted hazard `mode` on `blocks` blocks of 64 threads.
fn run_hazard(d: &Arc<dyn Driver>, out: &DeviceBuffer<i32>, blocks: u32, mode: i32) -> Result<()> {
    let at = Launch::linear(blocks, 64);
    // SAFETY: out holds what the kernel writes for `blocks` blocks; the planted hazards run only on
    // the checking emulator, which stops the launch at the first one.
    unsafe { testing::selftest_hazard_fwd_i32(&**d, at, out.ptr(), mode) }
}

/// selftest_oob_fwd_f32 on 4 blocks of 128 threads: `out[i] = i` for `i < n + extra`.
fn oob(d: &Arc<dyn Driver>, out: &DeviceBuffer<f32>, n: usize, extra: i32) -> Result<()> {
    // SAFETY: out holds n f32; the `extra` writes past it run only on the checking emulator, which
    // stops the launch at the first one (the bug under test).
    unsafe { testing::selftest_oob_fwd_f32(&**d, Launch::linear(4, 128), out.ptr(), n, extra) }
}

fn expect_err(r: Result<()>, want: &[&str]) -> String {
    let e = format!(
        "{:#}",
        r.expect_err(&format!("the launch should fail with {want:?}"))
    );
    for w in want {
        assert!(e.contains(w), "error '{e}' lacks '{w}'");
    }
    e
}

fn random(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

#[test]
fn memcheck_catches_out_of_bounds_global_accesses() {
    let d = emu();
    let n = 1000;
    let out = DeviceBuffer::<f32>::alloc(&d, n).unwrap();
    let run = |extra: i32| oob(&d, &out, n, extra);
    run(0).unwrap();
    let want: Vec<f32> = (0..n).map(|i| i as f32).collect();
    assert_eq!(out.to_vec().unwrap(), want);
    // Element 1000 is written by thread 1000 - 512 = 488 of the grid's 512: block 3, thread 104.
    let e = expect_err(
        run(1),
        &[
            "kernel selftest_oob_fwd_f32: memcheck: out of bounds: 4-byte write",
            "at offset 4000 of allocation #",
            "(4000 bytes at ",
            ": 0 bytes past its end, by thread (104,0,0) (block 3,0,0)",
        ],
    );
    assert!(
        e.contains(&format!("{:#x}", out.ptr().addr() + 4000)),
        "{e}"
    );
    // The emulator is still usable, and the failed launch wrote nothing past the end.
    run(0).unwrap();
}

#[test]
fn memcheck_catches_freed_foreign_and_misaligned_addresses() {
    let d = emu();
    let seed = seed("memcheck_catches_freed_foreign_and_misaligned_addresses");
    let mut rng = Rng::new(seed.value);
    let x = DeviceBuffer::from_slice(&d, &random(&mut rng, 256)).unwrap();
    let y = DeviceBuffer::<f32>::alloc(&d, 256).unwrap();
    // A Ptr outlives its buffer: kept past the drop, it addresses freed memory.
    let freed = x.ptr();
    copy(&d, y.ptr(), freed, 256).unwrap();
    drop(x);
    expect_err(
        copy(&d, y.ptr(), freed, 256),
        &[
            "memcheck: out of bounds: 4-byte read",
            "bytes at",
            ", freed)",
        ],
    );
    let host = vec![1.0f32; 256];
    // Raw: a host address, which no Ptr can carry.
    let (mut yp, mut xp, mut n32) = (y.ptr().addr(), host.as_ptr() as u64, 256i32);
    let mut params = [arg(&mut yp), arg(&mut xp), arg(&mut n32)];
    // SAFETY: the host address is the bug under test: the checking emulator refuses it before the
    // kernel touches it; y holds 256 f32.
    let r = unsafe {
        d.launch(
            "selftest_copy_fwd_f32",
            Launch {
                grid: [2, 1, 1],
                block: [128, 1, 1],
                shared: 0,
                pdl: false,
            },
            &mut params,
        )
    };
    expect_err(r, &["memcheck: 4-byte read at", "is not device memory"]);
    let out = DeviceBuffer::<i32>::alloc(&d, 64).unwrap();
    out.fill_bytes(0).unwrap();
    expect_err(
        run_hazard(&d, &out, 1, 20),
        &[
            "memcheck: misaligned: 4-byte read at",
            "at offset 2 of allocation #",
        ],
    );
    expect_err(
        run_hazard(&d, &out, 1, 21),
        &["memcheck: misaligned: 4-byte read at static shared offset"],
    );
    expect_err(
        run_hazard(&d, &out, 1, 22),
        &[
            "ldmatrix row address",
            "must be 16-byte aligned, in shared memory",
        ],
    );
    run_hazard(&d, &out, 1, 0).unwrap();
}

#[test]
fn memcheck_catches_shared_memory_overruns() {
    let d = emu();
    let out = DeviceBuffer::<f32>::alloc(&d, 64).unwrap();
    let run = |shared: u32| {
        let at = Launch {
            shared,
            ..Launch::linear(1, 64)
        };
        // SAFETY: out holds 64 f32, one per thread; the shared size is what the test varies.
        unsafe { testing::selftest_dynshared_fwd_f32(&*d, at, out.ptr()) }
    };
    run(256).unwrap();
    expect_err(
        run(252),
        &["memcheck: out of bounds: 4-byte write at dynamic shared offset 252, past the end of the block's 252 bytes"],
    );
}

#[test]
fn initcheck_catches_reads_of_unwritten_device_memory() {
    let d = emu();
    let seed = seed("initcheck_catches_reads_of_unwritten_device_memory");
    let mut rng = Rng::new(seed.value);
    let n = 1000;
    let x = DeviceBuffer::<f32>::alloc(&d, n).unwrap();
    let (y, z) = (
        DeviceBuffer::<f32>::alloc(&d, n).unwrap(),
        DeviceBuffer::<f32>::alloc(&d, n).unwrap(),
    );
    // Fresh memory is poisoned (NaN), and reading it fails the launch.
    assert!(x.to_vec().unwrap().iter().all(|v| v.to_bits() == u32::MAX));
    let head = random(&mut rng, 500);
    d.htod(x.ptr().addr(), bytemuck::cast_slice(&head)).unwrap();
    // Element 500, the first nothing wrote, is read by block 3, thread 116.
    expect_err(
        copy(&d, y.ptr(), x.ptr(), n),
        &[
            "kernel selftest_copy_fwd_f32: initcheck: read of device memory nothing wrote",
            "4-byte read at",
            "at offset 2000 of allocation #",
            "by thread (116,0,0) (block 3,0,0)",
        ],
    );
    // A memset writes the rest; then a kernel's stores count as writes for the next kernel.
    d.memset(x.ptr().addr() + 2000, 0, 2000).unwrap();
    copy(&d, y.ptr(), x.ptr(), n).unwrap();
    copy(&d, z.ptr(), y.ptr(), n).unwrap();
    let mut want = head.clone();
    want.resize(n, 0.0);
    assert_eq!(z.to_vec().unwrap(), want);
}

#[test]
fn racecheck_catches_shared_memory_hazards() {
    let d = emu();
    let out = DeviceBuffer::<i32>::alloc(&d, 2 * 64).unwrap();
    let hazard = "racecheck: shared memory hazard";
    let cases: [(i32, Option<&str>); 9] = [
        (0, None),
        (1, Some("no __syncthreads between them")),
        (
            2,
            Some("(same warp, and no __syncwarp or other collective of both either)"),
        ),
        (3, None),
        (4, None),
        (5, Some("at static shared offset")),
        (6, None),
        (7, Some("atomic")),
        (8, Some("write-after-write")),
    ];
    for (mode, want) in cases {
        out.fill_bytes(0).unwrap();
        let r = run_hazard(&d, &out, 2, mode);
        match want {
            None => r.unwrap_or_else(|e| panic!("mode {mode}: {e:#}")),
            Some(w) => {
                expect_err(r, &[hazard, w]);
            }
        }
    }
}

#[test]
fn racecheck_catches_races_between_blocks() {
    let d = emu();
    let out = DeviceBuffer::<i32>::alloc(&d, 3 * 64).unwrap();
    let race = "racecheck: global memory race";
    let cases: [(i32, Option<&str>); 5] = [
        (10, None),
        (
            11,
            Some("touches bytes stored by block (0,0,0) in this launch"),
        ),
        (12, Some("4-byte read at")),
        (13, Some("stores bytes read by block (0,0,0)")),
        (14, Some("4-byte atomic at")),
    ];
    for (mode, want) in cases {
        out.fill_bytes(0).unwrap();
        let r = run_hazard(&d, &out, 3, mode);
        match want {
            None => r.unwrap_or_else(|e| panic!("mode {mode}: {e:#}")),
            Some(w) => {
                expect_err(r, &[race, w, "(block 1,0,0)"]);
            }
        }
    }
    // Mode 10's atomics all landed.
    out.fill_bytes(0).unwrap();
    run_hazard(&d, &out, 3, 10).unwrap();
    assert_eq!(out.to_vec().unwrap()[0], 3 * 64);
}

#[test]
fn checks_are_chosen_by_name_and_can_be_off() {
    assert_eq!(Checks::parse("all").unwrap(), Checks::all());
    assert_eq!(Checks::parse("none").unwrap(), Checks::none());
    let c = Checks::parse("memcheck, racecheck").unwrap();
    assert!(c.memcheck && !c.initcheck && c.racecheck);
    let e = Checks::parse("memcheck,asan").unwrap_err();
    assert!(format!("{e}").contains("unknown checker 'asan'"), "{e}");
    // Off, the planted bugs run through (memcheck's redzone absorbs the overrun).
    let d: Arc<dyn Driver> = Arc::new(Emu::with_checks(Checks::none()));
    let out = DeviceBuffer::<f32>::alloc(&d, 1000).unwrap();
    oob(&d, &out, 1000, 1).unwrap();
    let h = DeviceBuffer::<i32>::alloc(&d, 64).unwrap();
    run_hazard(&d, &h, 1, 1).unwrap();
}
