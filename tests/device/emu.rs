//! Self-tests of the executors: barriers, warp collectives with masks, atomics, shared memory.
//! Those with defined CUDA semantics run on every executor (MURA_TEST_DEVICE); those that plant
//! a bug (poisoned shared memory, bad masks, divergent barriers, out-of-bounds writes) check the
//! emulator's diagnostics and run on the emulator only.

use crate::common::gpu::{seed, test_driver};
use anyhow::Result;
use mura::gpu::kernels::{self, testing};
use mura::gpu::{arg, emu::Emu, DeviceBuffer, Driver, Launch};
use mura::rng::Rng;
use std::sync::Arc;

fn driver() -> Arc<dyn Driver> {
    test_driver()
}

/// A launch's result once the device has run it (a real GPU reports a kernel's fault late).
fn synced(d: &Arc<dyn Driver>, launched: Result<()>) -> Result<()> {
    launched?;
    d.synchronize()
}

/// `blocks` blocks of `threads` threads with `shared` bytes of dynamic shared memory.
fn with_shared(blocks: u32, threads: u32, shared: u32) -> Launch {
    Launch {
        shared,
        ..Launch::linear(blocks, threads)
    }
}

#[test]
fn barriers_order_shared_memory() {
    let d = driver();
    let (grid, n) = (3usize, 96usize);
    let out = DeviceBuffer::<i32>::alloc(&d, grid * n).unwrap();
    out.fill_bytes(0xff).unwrap();
    let at = Launch::linear(grid as u32, n as u32);
    // SAFETY: out holds grid * n i32, one per thread.
    unsafe { testing::selftest_barrier_fwd_i32(&*d, at, out.ptr()) }.unwrap();
    d.synchronize().unwrap();
    let got = out.to_vec().unwrap();
    for b in 0..grid {
        let s1: Vec<i32> = (0..n).map(|u| (u * 7 + b) as i32).collect();
        let s2: Vec<i32> = (0..n).map(|u| 2 * s1[(u + 1) % n]).collect();
        for t in 0..n {
            assert_eq!(got[b * n + t], s2[n - 1 - t], "block {b} thread {t}");
        }
    }
}

#[test]
fn warp_shuffles_and_votes() {
    let d = driver();
    let (grid, block) = (2usize, 64usize);
    let out = DeviceBuffer::<i32>::alloc(&d, grid * block * 8).unwrap();
    out.fill_bytes(0xff).unwrap();
    let at = Launch::linear(grid as u32, block as u32);
    // SAFETY: out holds the kernel's 8 results per thread.
    unsafe { testing::selftest_shfl_fwd_i32(&*d, at, out.ptr()) }.unwrap();
    d.synchronize().unwrap();
    let got = out.to_vec().unwrap();
    let v = |i: usize| (i * 3 + 1) as i32;
    for i in 0..grid * block {
        let lane = i % 32;
        let base = i - lane;
        let seg = lane / 16 * 16;
        let ballot = (0..32)
            .filter(|&j| v(base + j) % 7 < 3 && j % 5 != 4)
            .fold(0u32, |m, j| m | 1 << j);
        let any = (v(base + 31) % 4 == 0) as i32;
        let expect = [
            v(base + 5),
            if lane >= 3 { v(i - 3) } else { v(i) },
            if lane + 2 < seg + 16 { v(i + 2) } else { v(i) },
            v(base + (lane ^ 9)),
            ballot as i32,
            1 + 2 * any,
            if lane < 16 { v(base + (lane ^ 1)) } else { -1 },
            (0..32).map(|j| v(base + j)).sum(),
        ];
        assert_eq!(&got[i * 8..i * 8 + 8], &expect, "thread {i}");
    }
}

#[test]
fn atomics() {
    let d = driver();
    let seed = seed("atomics");
    let mut rng = Rng::new(seed.value);
    let n: usize = 10_007;
    let x: Vec<i32> = (0..n).map(|_| rng.below(1_000_000) as i32).collect();
    let xb = DeviceBuffer::from_slice(&d, &x).unwrap();
    let hist = DeviceBuffer::<i32>::alloc(&d, 16).unwrap();
    let fsum = DeviceBuffer::<f32>::alloc(&d, 1).unwrap();
    let imax = DeviceBuffer::<i32>::alloc(&d, 1).unwrap();
    let count = DeviceBuffer::<u32>::alloc(&d, 1).unwrap();
    for b in [
        hist.ptr().addr(),
        fsum.ptr().addr(),
        imax.ptr().addr(),
        count.ptr().addr(),
    ] {
        d.memset(b, 0, 4).unwrap();
    }
    hist.fill_bytes(0).unwrap();
    // SAFETY: every buffer holds what the kernel updates (sized above).
    unsafe {
        testing::selftest_atomic_fwd_i32(
            &*d,
            Launch::linear(5, 128),
            hist.ptr(),
            fsum.ptr(),
            imax.ptr(),
            count.ptr(),
            xb.ptr(),
            n,
        )
    }
    .unwrap();
    let mut h_ref = vec![0i32; 16];
    for &v in &x {
        h_ref[(v & 15) as usize] += 1;
    }
    assert_eq!(hist.to_vec().unwrap(), h_ref);
    // Integers below 2^24: the float sum is exact in any order.
    assert_eq!(
        fsum.to_vec().unwrap()[0] as i64,
        x.iter().map(|&v| (v & 255) as i64).sum::<i64>()
    );
    assert_eq!(imax.to_vec().unwrap()[0], *x.iter().max().unwrap());
    assert_eq!(count.to_vec().unwrap()[0], n as u32);
}

#[test]
fn dynamic_shared_memory() {
    let d = driver();
    let (grid, n) = (3usize, 64usize);
    let out = DeviceBuffer::<f32>::alloc(&d, grid * n).unwrap();
    out.fill_bytes(0xff).unwrap();
    let at = with_shared(grid as u32, n as u32, 4 * n as u32);
    // SAFETY: out holds grid * n f32; the dynamic shared memory is n f32 per block, as the kernel uses.
    unsafe { testing::selftest_dynshared_fwd_f32(&*d, at, out.ptr()) }.unwrap();
    d.synchronize().unwrap();
    let got = out.to_vec().unwrap();
    for b in 0..grid {
        for t in 0..n {
            assert_eq!(got[b * n + t], (b * 1000 + n - 1 - t) as f32);
        }
    }
}

/// cp.async copies land when their group is waited for: then on every executor; on the
/// emulator not before in even blocks (so a kernel reading shared memory before its wait fails
/// its tests there), and at once in odd blocks (so one overwriting a stage other warps still
/// read does).
#[test]
fn cp_async_lands_at_the_wait() {
    let d = driver();
    let (grid, block) = (2usize, 64usize);
    let seed = seed("cp_async_lands_at_the_wait");
    let mut rng = Rng::new(seed.value);
    let rows: Vec<f32> = (0..grid * block * 16)
        .map(|_| rng.normal() as f32)
        .collect();
    let out = DeviceBuffer::<f32>::alloc(&d, rows.len()).unwrap();
    out.copy_from(&rows).unwrap();
    let at = Launch::linear(grid as u32, block as u32);
    // SAFETY: out holds the grid's rows of 16 f32 per thread, which the kernel copies through
    // shared memory in place.
    unsafe { testing::selftest_cpasync_fwd_f32(&*d, at, out.ptr()) }.unwrap();
    d.synchronize().unwrap();
    let got = out.to_vec().unwrap();
    for r in 0..grid * block {
        let (want, row) = (&rows[r * 16..][..16], &got[r * 16..][..16]);
        assert_eq!(row[9], want[3], "row {r}: group 1 after wait_group 1");
        assert_eq!(row[11], want[7], "row {r}: group 2 after wait_group 0");
        if d.name() == "emu" {
            let odd = r / block % 2 == 1;
            let (w8, w10) = if odd {
                (want[0], want[4])
            } else {
                (-1.0, -1.0)
            };
            assert_eq!(
                row[8], w8,
                "row {r}: right after issuing (odd block: {odd})"
            );
            assert_eq!(
                row[10], w10,
                "row {r}: newest group at wait_group 1 (odd: {odd})"
            );
        }
    }
}

/// Static shared memory persists across blocks in the emulator's process; it must be poisoned
/// before every block, as must dynamic shared memory, so reads of unwritten shared memory show.
#[test]
fn emu_poisons_shared_memory_per_block() {
    let d: Arc<dyn Driver> = Arc::new(Emu::new());
    let (grid, n) = (4usize, 64usize);
    let out = DeviceBuffer::<f32>::alloc(&d, grid * n * 2).unwrap();
    out.fill_bytes(0).unwrap();
    let at = with_shared(grid as u32, n as u32, 4 * n as u32);
    // SAFETY: out holds 2 f32 per thread; the uninitialised shared read is the emulator's to catch.
    unsafe { testing::selftest_uninit_fwd_f32(&*d, at, out.ptr()) }.unwrap();
    d.synchronize().unwrap();
    for (i, v) in out.to_vec().unwrap().into_iter().enumerate() {
        assert_eq!(
            v.to_bits(),
            0xffff_ffff,
            "element {i} (block {}) was not poisoned",
            i / (2 * n)
        );
    }
}

/// Each planted bug must come back as an error naming it, not as garbage, a hang or an abort.
#[test]
fn emu_reports_planted_bugs() {
    let d: Arc<dyn Driver> = Arc::new(Emu::new());
    let cases: [(i32, u32, Option<&str>); 7] = [
        (0, 64, None),
        (1, 64, Some("calling lane 0 is not in mask 0x00000002")),
        (2, 64, Some("divergent warp collective")),
        (3, 64, Some("divergent __syncthreads at selftest.cu:")),
        (
            4,
            64,
            Some("divergent __syncthreads: threads wait at selftest.cu:"),
        ),
        (
            5,
            64,
            Some("reads lane 20, which is not in mask 0x0000ffff"),
        ),
        (
            6,
            48,
            Some("names lanes that do not exist (warp has 16 threads)"),
        ),
    ];
    for (mode, block, expect) in cases {
        let out = DeviceBuffer::<i32>::alloc(&d, 2 * block as usize).unwrap();
        let at = Launch::linear(2, block);
        // SAFETY: out holds 2 blocks' i32; each planted bug runs on the emulator, which fails the
        // launch at it.
        let launched = unsafe { testing::selftest_bug_fwd_i32(&*d, at, out.ptr(), mode) };
        let r = synced(&d, launched);
        match (expect, r) {
            (None, Ok(())) => {}
            (Some(want), Err(e)) => assert!(
                format!("{e:#}").contains(want),
                "mode {mode}: got '{e:#}', want '{want}'"
            ),
            (want, r) => panic!("mode {mode}: expected {want:?}, got {r:?}"),
        }
    }
    // The emulator is still usable after failed launches.
    let out = DeviceBuffer::<i32>::alloc(&d, 128).unwrap();
    let at = Launch::linear(2, 64);
    // SAFETY: out holds 128 i32, one per thread.
    unsafe { testing::selftest_barrier_fwd_i32(&*d, at, out.ptr()) }.unwrap();
    d.synchronize().unwrap();
}

#[test]
fn emu_rejects_bad_launches() {
    let d: Arc<dyn Driver> = Arc::new(Emu::new());
    let out = DeviceBuffer::<i32>::alloc(&d, 64).unwrap();
    let (mut o, mut extra) = (out.ptr().addr(), 1i32);
    // Raw: no typed launcher can name a kernel that does not exist.
    // SAFETY: no kernel of that name exists: the launch is refused before anything runs.
    let e = unsafe {
        d.launch(
            "no_such_kernel",
            Launch {
                grid: [1, 1, 1],
                block: [32, 1, 1],
                shared: 0,
                pdl: false,
            },
            &mut [arg(&mut o)],
        )
    }
    .unwrap_err();
    assert!(format!("{e}").contains("no kernel named 'no_such_kernel'"));
    // Raw: a typed launcher cannot pass more parameters than its kernel's signature has.
    let mut params = [arg(&mut o), arg(&mut extra)];
    // SAFETY: refused before anything runs (one parameter too many).
    let e = unsafe {
        d.launch(
            "selftest_barrier_fwd_i32",
            Launch {
                grid: [1, 1, 1],
                block: [32, 1, 1],
                shared: 0,
                pdl: false,
            },
            &mut params,
        )
    }
    .unwrap_err();
    assert!(format!("{e}").contains("takes 1 parameters, 2 given"));
    let at = Launch::linear(1, 2048);
    // SAFETY: refused before anything runs (more threads than a block may have).
    let launched = unsafe { testing::selftest_barrier_fwd_i32(&*d, at, out.ptr()) };
    let e = synced(&d, launched).unwrap_err();
    assert!(format!("{e:#}").contains("invalid launch"));
    // The most dynamic shared memory a block may have on every target GPU (sm_86/89, with the
    // opt-in): 99 KiB pass, a byte more does not.
    let f = DeviceBuffer::<f32>::alloc(&d, 64).unwrap();
    let dynshared = |shared: u32| {
        let at = with_shared(1, 64, shared);
        // SAFETY: f holds 64 f32, one per thread; an oversized shared request is refused.
        let launched = unsafe { testing::selftest_dynshared_fwd_f32(&*d, at, f.ptr()) };
        synced(&d, launched)
    };
    dynshared(99 << 10).unwrap();
    let e = dynshared((99 << 10) + 1).unwrap_err();
    assert!(format!("{e:#}").contains("over 99 KiB"), "{e:#}");
    let e = d.htod(out.ptr().addr() + 200, &[0u8; 100]).unwrap_err();
    assert!(format!("{e}").contains("outside every allocation"));
}

/// The emulator built with AddressSanitizer (a separate program, see build.rs) catches a kernel's
/// write one element past its buffer, and runs the same kernel in bounds cleanly.
#[test]
fn emu_asan_catches_out_of_bounds_write() {
    // MURA_EMU_ASAN: where scripts/gpu-check.sh put it, away from this build's target folder.
    let exe = std::env::var("MURA_EMU_ASAN").unwrap_or_else(|_| kernels::ASAN_HARNESS.to_string());
    assert!(
        !exe.is_empty(),
        "the ASan harness was not built (see the cargo warning from build.rs)"
    );
    let run = |mode: &str| run_harness(&exe, mode);
    let ok = run("ok");
    assert!(
        ok.status.success(),
        "in-bounds run failed: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let oob = run("oob");
    let stderr = String::from_utf8_lossy(&oob.stderr);
    assert!(!oob.status.success(), "out-of-bounds write was not caught");
    assert!(
        stderr.contains("AddressSanitizer: heap-buffer-overflow"),
        "{stderr}"
    );
    assert!(stderr.contains("selftest_oob_fwd_f32"), "{stderr}");
}

fn run_harness(exe: &str, mode: &str) -> std::process::Output {
    std::process::Command::new(exe)
        .arg(mode)
        .env("ASAN_OPTIONS", "detect_leaks=0")
        .output()
        .expect("run the ASan harness")
}

/// bf16 and f16 conversions agree bit for bit with the `half` crate (both round to nearest even),
/// on random values and the edge cases: halfway points, subnormals, overflow, infinities, NaN.
#[test]
fn float_conversions() {
    use half::{bf16, f16};
    let d = driver();
    let seed = seed("float_conversions");
    let mut rng = Rng::new(seed.value);
    let mut x: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        -1.5,
        65504.0,
        65519.0,
        65520.0,
        1e6,
        -1e6,
        6.0e-8,
        2.9e-8,
        3.0e-8,
        6.1e-5,
        1e-40,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::MIN_POSITIVE,
        f32::from_bits(0x3f80_8000), // 1 + 2^-8: bf16 halfway, ties to even (down)
        f32::from_bits(0x3f81_8000), // ties to even (up)
        f32::from_bits(0x3f80_1000), // f16 halfway
        f32::from_bits(0x3f80_3000),
    ];
    for _ in 0..2000 {
        let e = rng.range(-30.0, 20.0);
        x.push((rng.normal() * 2f64.powf(e)) as f32);
        x.push(f32::from_bits(
            rng.next_u64() as u32 & 0x7f7f_ffff | 0x3000_0000,
        ));
    }
    let n = x.len();
    let xb = DeviceBuffer::from_slice(&d, &x).unwrap();
    let bb = DeviceBuffer::<bf16>::alloc(&d, n).unwrap();
    let hb = DeviceBuffer::<f16>::alloc(&d, n).unwrap();
    let back = DeviceBuffer::<f32>::alloc(&d, 2 * n).unwrap();
    for buf in [bb.ptr().addr(), hb.ptr().addr()] {
        d.memset(buf, 0xff, 2 * n).unwrap();
    }
    back.fill_bytes(0xff).unwrap();
    // SAFETY: x holds n f32 and the conversion buffers 2 * n bytes each, as the kernel touches.
    let convert = |at: Launch, x: &DeviceBuffer<f32>, n: usize| unsafe {
        testing::selftest_convert_fwd_f32(&*d, at, bb.ptr(), hb.ptr(), back.ptr(), x.ptr(), n)
    };
    convert(Launch::linear(4, 128), &xb, n).unwrap();
    let (bs, hs, backs) = (
        bb.to_vec().unwrap(),
        hb.to_vec().unwrap(),
        back.to_vec().unwrap(),
    );
    for i in 0..n {
        let (wb, wh) = (bf16::from_f32(x[i]), f16::from_f32(x[i]));
        assert_eq!(
            bs[i].to_bits(),
            wb.to_bits(),
            "bf16 of {:e} ({:#x})",
            x[i],
            x[i].to_bits()
        );
        assert_eq!(
            hs[i].to_bits(),
            wh.to_bits(),
            "f16 of {:e} ({:#x})",
            x[i],
            x[i].to_bits()
        );
        assert_eq!(
            backs[2 * i].to_bits(),
            wb.to_f32().to_bits(),
            "bf16 -> f32 of {:#x}",
            wb.to_bits()
        );
        assert_eq!(
            backs[2 * i + 1].to_bits(),
            wh.to_f32().to_bits(),
            "f16 -> f32 of {:#x}",
            wh.to_bits()
        );
    }
    let nan = DeviceBuffer::from_slice(&d, &[f32::NAN]).unwrap();
    convert(Launch::linear(1, 32), &nan, 1).unwrap();
    let got = back.to_vec().unwrap();
    assert!(got[0].is_nan() && got[1].is_nan(), "NaN must stay NaN");
}

/// Every ldmatrix form against the PTX ISA's definition of which lane receives which elements.
#[test]
fn ldmatrix_forms() {
    let d = driver();
    let out = DeviceBuffer::<u32>::alloc(&d, 32 * 13).unwrap();
    out.fill_bytes(0xff).unwrap();
    let at = Launch::linear(1, 32);
    // SAFETY: out holds the warp's 13 words per lane.
    unsafe { testing::selftest_ldmatrix_fwd_i32(&*d, at, out.ptr()) }.unwrap();
    d.synchronize().unwrap();
    let got = out.to_vec().unwrap();
    let tile = |r: usize, c: usize| (8 * r + c) as u32;
    let pair = |a: u32, b: u32| a | (b << 16);
    for lane in 0..32 {
        let (row, col) = (lane / 4, 2 * (lane % 4));
        let plain = |m: usize| pair(tile(8 * m + row, col), tile(8 * m + row, col + 1));
        let trans = |m: usize| pair(tile(8 * m + col, row), tile(8 * m + col + 1, row));
        let expect = [
            plain(0),
            plain(0),
            plain(1),
            plain(0),
            plain(1),
            plain(2),
            plain(3),
            trans(0),
            trans(1),
            trans(0),
            trans(1),
            trans(2),
            trans(3),
        ];
        assert_eq!(&got[lane * 13..lane * 13 + 13], &expect, "lane {lane}");
    }
}

/// A fiber that overflows its stack dies on the guard page below it (SIGSEGV) instead of silently
/// corrupting its neighbour. The overflow runs in a child process: this test binary itself.
#[test]
fn emu_fiber_stack_overflow_hits_guard_page() {
    let d: Arc<dyn Driver> = Arc::new(Emu::new());
    let out = DeviceBuffer::<f32>::alloc(&d, 1).unwrap();
    let run = |depth: i32| {
        let at = Launch::linear(1, 32);
        // SAFETY: out holds one f32; the deep recursion is the emulator's stack check under test.
        let launched = unsafe { testing::selftest_overflow_fwd_f32(&*d, at, out.ptr(), depth) };
        synced(&d, launched)
    };
    if std::env::var_os("MURA_EMU_OVERFLOW_CHILD").is_some() {
        let _ = run(10_000); // 10 MB of frames on a 256 KiB stack
        std::process::exit(0); // only reached if the overflow went unnoticed
    }
    run(20).unwrap();
    let expect: f32 = (1..=20).map(|k| k as f32).sum();
    assert_eq!(out.to_vec().unwrap()[0], expect);

    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "emu::emu_fiber_stack_overflow_hits_guard_page",
            "--test-threads=1",
        ])
        .env("MURA_EMU_OVERFLOW_CHILD", "1")
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        child.status.signal(),
        Some(11),
        "expected SIGSEGV, got {:?}",
        child.status
    );
}
