//! The emulator's profiler on small kernels whose counts are known by hand (kernels/testing/selftest.cu,
//! kernels/gemm.cu): a coalesced copy, strided copies, a 32-way bank conflict against a broadcast,
//! the unpadded and padded shared-memory transposes, and a tensor-core GEMM (ldmatrix, mma.sync,
//! cp.async). Counts are defined as Nsight Compute's (src/gpu/emu/profile.rs).

use crate::common::gpu::seed;
use half::bf16;
use mura::gpu::emu::profile::{self, Counters, KernelProfile};
use mura::gpu::emu::Emu;
use mura::gpu::kernels::testing;
use mura::gpu::{DeviceBuffer, Driver, Launch};
use mura::rng::Rng;
use std::sync::Arc;

/// A profiling emulator, as the concrete type (for its profile) and as a driver.
fn profiling() -> (Arc<Emu>, Arc<dyn Driver>) {
    let e = Arc::new(Emu::new().with_profile(true));
    (e.clone(), e)
}

fn profile_of(e: &Emu, kernel: &str) -> KernelProfile {
    let p = e.profile();
    p.iter()
        .find(|(k, _)| k == kernel)
        .unwrap_or_else(|| panic!("{kernel} not in the profile {p:?}"))
        .1
}

/// selftest_ldmatrix_fwd_i32 on one warp.
fn ldmatrix(d: &Arc<dyn Driver>, out: &DeviceBuffer<u32>) {
    // SAFETY: out holds the warp's results (its caller allocates them).
    unsafe { testing::selftest_ldmatrix_fwd_i32(&**d, Launch::linear(1, 32), out.ptr()) }.unwrap();
}

fn random(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

#[test]
fn a_coalesced_copy_touches_each_sector_once() {
    let (e, d) = profiling();
    let seed = seed("a_coalesced_copy_touches_each_sector_once");
    let mut rng = Rng::new(seed.value);
    // 4100 floats: 128 full warps (4 sectors each) and one warp of 4 lanes (16 bytes, 1 sector).
    let n = 4100;
    let x = DeviceBuffer::from_slice(&d, &random(&mut rng, n)).unwrap();
    let y = DeviceBuffer::<f32>::alloc(&d, n).unwrap();
    let copy = |d: &Arc<dyn Driver>, y: &DeviceBuffer<f32>, x: &DeviceBuffer<f32>| {
        let at = Launch::linear(33, 128);
        // SAFETY: x and y hold n f32 each; the grid covers n.
        unsafe { testing::selftest_copy_fwd_f32(&**d, at, y.ptr(), x.ptr(), n) }.unwrap();
    };
    copy(&d, &y, &x);
    assert_eq!(y.to_vec().unwrap(), x.to_vec().unwrap());
    let p = profile_of(&e, "selftest_copy_fwd_f32");
    let want = Counters {
        gld_requests: 129,
        gld_sectors: 513,
        gld_bytes: 16400,
        gst_requests: 129,
        gst_sectors: 513,
        gst_bytes: 16400,
        ..Counters::default()
    };
    assert_eq!(
        p,
        KernelProfile {
            launches: 1,
            counters: want
        }
    );
    assert!((p.gld_efficiency().unwrap() - 16400.0 / (513.0 * 32.0)).abs() < 1e-12);
    // A second launch adds the same counts; another emulator counts the same (deterministic).
    copy(&d, &y, &x);
    let twice = profile_of(&e, "selftest_copy_fwd_f32");
    assert_eq!((twice.launches, twice.counters.gld_sectors), (2, 2 * 513));
    let (e2, d2) = profiling();
    let x2 = DeviceBuffer::from_slice(&d2, &random(&mut rng, n)).unwrap();
    let y2 = DeviceBuffer::<f32>::alloc(&d2, n).unwrap();
    copy(&d2, &y2, &x2);
    assert_eq!(profile_of(&e2, "selftest_copy_fwd_f32"), p);
}

#[test]
fn strided_loads_touch_a_sector_per_lane() {
    let (e, d) = profiling();
    let seed = seed("strided_loads_touch_a_sector_per_lane");
    let mut rng = Rng::new(seed.value);
    let n = 1024; // 32 warps
    for (stride, sectors_per_load) in [(8, 32), (2, 8)] {
        let x = DeviceBuffer::from_slice(&d, &random(&mut rng, n * stride)).unwrap();
        let y = DeviceBuffer::<f32>::alloc(&d, n).unwrap();
        let before = e.profile();
        let at = Launch::linear(8, 128);
        // SAFETY: x holds n * stride f32, y n; the kernel reads x[i * stride] for i < n.
        unsafe { testing::selftest_strided_fwd_f32(&*d, at, y.ptr(), x.ptr(), stride, n) }.unwrap();
        let xs = x.to_vec().unwrap();
        assert_eq!(
            y.to_vec().unwrap(),
            (0..n).map(|i| xs[i * stride]).collect::<Vec<_>>()
        );
        let p = profile_of(&e, "selftest_strided_fwd_f32");
        let old = before
            .first()
            .map_or(Counters::default(), |(_, p)| p.counters);
        let c = &p.counters;
        assert_eq!(
            (
                c.gld_requests - old.gld_requests,
                c.gld_sectors - old.gld_sectors,
                c.gld_bytes - old.gld_bytes
            ),
            (32, 32 * sectors_per_load, 4096),
            "stride {stride}"
        );
        assert_eq!(
            (
                c.gst_requests - old.gst_requests,
                c.gst_sectors - old.gst_sectors
            ),
            (32, 128)
        );
    }
    let p = profile_of(&e, "selftest_strided_fwd_f32");
    // Both launches: 8192 bytes requested in (1024 + 256) sectors.
    assert!((p.gld_efficiency().unwrap() - 8192.0 / (1280.0 * 32.0)).abs() < 1e-12);
}

/// Shared memory: one warp's stores and loads of one bank (32-way) against a conflict-free
/// store and a broadcast load; then 8-byte (two phases) and 16-byte (four phases) accesses.
#[test]
fn bank_conflicts_are_counted_per_phase() {
    let seed = seed("bank_conflicts_are_counted_per_phase");
    let mut rng = Rng::new(seed.value);
    for (st, ld, ways) in [(32, 32, 32), (33, 0, 1), (1, 33, 1)] {
        let (e, d) = profiling();
        let input = random(&mut rng, 32 * 4);
        // float4s, as the kernel reads and writes them.
        let inp = DeviceBuffer::<[f32; 4]>::from_slice(&d, bytemuck::cast_slice(&input)).unwrap();
        let out = DeviceBuffer::<[f32; 4]>::alloc(&d, 32).unwrap();
        let vw = DeviceBuffer::<f32>::alloc(&d, 32).unwrap();
        let at = Launch::linear(1, 32);
        // SAFETY: inp and out hold 32 f32x4 each, vw 32 f32: one per lane.
        unsafe { testing::selftest_banks_fwd_f32(&*d, at, out.ptr(), vw.ptr(), inp.ptr(), st, ld) }
            .unwrap();
        assert_eq!(out.to_vec().unwrap().concat(), input);
        let c = profile_of(&e, "selftest_banks_fwd_f32").counters;
        let want = |w: u64| (3, w + 2 + 4, 1 + 2 + 4);
        assert_eq!(
            (c.sst_requests, c.sst_wavefronts, c.sst_ideal),
            want(if st == 32 { 32 } else { 1 }),
            "st {st}"
        );
        assert_eq!(
            (c.sld_requests, c.sld_wavefronts, c.sld_ideal),
            want(if ld == 32 { 32 } else { 1 }),
            "ld {ld}"
        );
        // Global: the 16-byte copy in (16 sectors) and out, and the 4-byte vw (4 sectors).
        assert_eq!((c.gld_requests, c.gld_sectors, c.gld_bytes), (1, 16, 512));
        assert_eq!((c.gst_requests, c.gst_sectors, c.gst_bytes), (2, 20, 640));
        if ways == 32 {
            let p = profile_of(&e, "selftest_banks_fwd_f32");
            assert!((p.sld_ways().unwrap() - 38.0 / 7.0).abs() < 1e-12);
        }
    }
}

#[test]
fn a_padded_transpose_is_conflict_free() {
    let seed = seed("a_padded_transpose_is_conflict_free");
    let mut rng = Rng::new(seed.value);
    let n = 64; // 4 blocks of 32 warps
    for (pad, load_wavefronts) in [(0, 32), (1, 1)] {
        let (e, d) = profiling();
        let xv = random(&mut rng, n * n);
        let x = DeviceBuffer::from_slice(&d, &xv).unwrap();
        let y = DeviceBuffer::<f32>::alloc(&d, n * n).unwrap();
        let at = Launch {
            grid: [2, 2, 1],
            block: [32, 32, 1],
            shared: 0,
            pdl: false,
        };
        // SAFETY: x and y hold n * n f32; the 2x2 grid of 32x32 blocks covers them.
        unsafe { testing::selftest_transpose_fwd_f32(&*d, at, y.ptr(), x.ptr(), n, pad) }.unwrap();
        let yv = y.to_vec().unwrap();
        for r in 0..n {
            for c in 0..n {
                assert_eq!(yv[c * n + r], xv[r * n + c]);
            }
        }
        let p = profile_of(&e, "selftest_transpose_fwd_f32");
        let c = &p.counters;
        assert_eq!(
            (c.gld_requests, c.gld_sectors, c.gst_requests, c.gst_sectors),
            (128, 512, 128, 512)
        );
        assert_eq!(
            (c.sst_requests, c.sst_wavefronts, c.sst_ideal),
            (128, 128, 128)
        );
        assert_eq!(
            (c.sld_requests, c.sld_wavefronts, c.sld_ideal),
            (128, 128 * load_wavefronts, 128),
            "pad {pad}"
        );
        assert_eq!(p.sld_ways(), Some(load_wavefronts as f64));
    }
}

/// gemm_fwd_bf16 on one 32×16 tile with K = 32: 4 warps, 2 K-steps. Per warp and step an
/// ldmatrix.x4 and .x2 of conflict-free 48-byte-strided rows and one mma.sync; 96 cp.async of 16
/// bytes per step (warps 0-2: 16 rows of 64 bytes, 32 bytes each: 16 sectors, all used); the
/// epilogue's 4 stores per lane: 8 rows of 4 floats (every other column) in 8 sectors.
#[test]
fn tensor_core_instructions_are_counted() {
    let (e, d) = profiling();
    let seed = seed("tensor_core_instructions_are_counted");
    let mut rng = Rng::new(seed.value);
    let (m, n, k) = (32usize, 16usize, 32usize);
    let a: Vec<bf16> = random(&mut rng, m * k)
        .iter()
        .map(|&v| bf16::from_f32(v))
        .collect();
    let bt: Vec<bf16> = random(&mut rng, n * k)
        .iter()
        .map(|&v| bf16::from_f32(v))
        .collect();
    let (ab, bb) = (
        DeviceBuffer::from_slice(&d, &a).unwrap(),
        DeviceBuffer::from_slice(&d, &bt).unwrap(),
    );
    let cb = DeviceBuffer::<f32>::alloc(&d, m * n).unwrap();
    let at = Launch::linear(1, 128);
    // SAFETY: ab holds [m, k], bb [n, k], cb [m, n]; the kernel's one block covers C.
    unsafe { testing::gemm_fwd_bf16(&*d, at, cb.ptr(), ab.ptr(), bb.ptr(), m, n, k) }.unwrap();
    let got = cb.to_vec().unwrap();
    for i in 0..m {
        for j in 0..n {
            let want: f32 = (0..k)
                .map(|q| a[i * k + q].to_f32() * bt[j * k + q].to_f32())
                .sum();
            assert!(
                (got[i * n + j] - want).abs() <= 1e-3 * (1.0 + want.abs()),
                "c[{i}][{j}]"
            );
        }
    }
    let c = profile_of(&e, "gemm_fwd_bf16").counters;
    let want = Counters {
        hmma: 8,
        ldsm_requests: 16,
        ldsm_wavefronts: 48,
        ldsm_ideal: 48,
        ldgsts_requests: 6,
        ldgsts_sectors: 96,
        ldgsts_bytes: 3072,
        gst_requests: 16,
        gst_sectors: 128,
        gst_bytes: 2048,
        ..Counters::default()
    };
    assert_eq!(c, want);
}

/// selftest_ldmatrix_fwd_i32 (one warp): each lane stores its 16-byte row of a 32×8 u16 tile one
/// u16 at a time: 8 stores whose 32 lanes fall 4 to a bank (rows 16 bytes apart: 4-way); then the
/// five ldmatrix forms (1 + 2 + 4 + 2 + 4 matrices of 8 contiguous rows, conflict-free) and 13
/// stores per lane 52 bytes apart (a sector each).
#[test]
fn ldmatrix_and_narrow_stores_are_counted() {
    let (e, d) = profiling();
    let out = DeviceBuffer::<u32>::alloc(&d, 32 * 13).unwrap();
    ldmatrix(&d, &out);
    let c = profile_of(&e, "selftest_ldmatrix_fwd_i32").counters;
    let want = Counters {
        sst_requests: 8,
        sst_wavefronts: 32,
        sst_ideal: 8,
        ldsm_requests: 5,
        ldsm_wavefronts: 13,
        ldsm_ideal: 13,
        gst_requests: 13,
        gst_sectors: 13 * 32,
        gst_bytes: 13 * 128,
        ..Counters::default()
    };
    assert_eq!(c, want);
}

#[test]
fn the_profile_is_off_unless_asked_for_and_prints_as_a_table() {
    let e = Arc::new(Emu::new().with_profile(false));
    let d: Arc<dyn Driver> = e.clone();
    let out = DeviceBuffer::<u32>::alloc(&d, 32 * 13).unwrap();
    ldmatrix(&d, &out);
    assert!(e.profile().is_empty());
    let (e, d) = profiling();
    ldmatrix(&d, &out);
    let t = profile::table(&e.profile(), &|k| {
        (k == "selftest_ldmatrix_fwd_i32").then_some(1.5)
    });
    let row = t
        .lines()
        .find(|l| l.starts_with("| selftest_ldmatrix_fwd_i32 |"))
        .unwrap();
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    // kernel, launches, global ld (req, sect/req, eff), global st (13 req, 32 sectors each, 12.5%)
    assert_eq!(
        &cells[1..9],
        [
            "selftest_ldmatrix_fwd_i32",
            "1",
            "0",
            "-",
            "-",
            "13",
            "32.0",
            "12%"
        ]
    );
    assert_eq!(cells[cells.len() - 2], "1.5");
    assert!(profile::all()
        .iter()
        .any(|(k, _)| k == "selftest_ldmatrix_fwd_i32"));
}
