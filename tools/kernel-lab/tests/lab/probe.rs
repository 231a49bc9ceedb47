//! The probe (`mura_kernel_lab::probe`) that `ncu` reads on a GPU: it runs on the executor under
//! test, and on the emulator each of its kernels is launched exactly once, with the counts that
//! tests/device/profile.rs pins by hand for the same launches.

use crate::gpu_common::test_driver;
use mura::gpu::emu::Emu;
use mura::gpu::Driver;
use mura_kernel_lab::probe::{run, PROBES};
use std::sync::Arc;

#[test]
fn the_probe_runs_on_the_device_under_test() {
    run(&test_driver(), 7).unwrap();
}

#[test]
fn the_emulator_counts_each_probe_kernel_once() {
    let e = Arc::new(Emu::new().with_profile(true));
    let d: Arc<dyn Driver> = e.clone();
    run(&d, 7).unwrap();
    let profile = e.profile();
    let mut profiled: Vec<&str> = profile.iter().map(|(k, _)| k.as_str()).collect();
    let mut probes: Vec<&str> = PROBES.iter().map(|p| p.kernel).collect();
    profiled.sort();
    probes.sort();
    assert_eq!(
        profiled, probes,
        "the probe launches its kernels and no others"
    );
    let at = |k: &str| profile.iter().find(|(n, _)| n == k).unwrap().1;
    assert!(profile.iter().all(|(_, p)| p.launches == 1), "{profile:?}");
    let copy = at("selftest_copy_fwd_f32").counters;
    assert_eq!(
        (copy.gld_requests, copy.gld_sectors, copy.gst_sectors),
        (129, 513, 513)
    );
    let strided = at("selftest_strided_fwd_f32").counters;
    assert_eq!((strided.gld_requests, strided.gld_sectors), (32, 32 * 32));
    let banks = at("selftest_banks_fwd_f32").counters;
    assert_eq!(
        (banks.sld_wavefronts, banks.sst_wavefronts),
        (32 + 2 + 4, 32 + 2 + 4)
    );
    for tc in [
        "conv1x1_tc_fwd_bf16",
        "conv3x3_tc_fwd_bf16",
        "conv3x3_tc_bwd_weight_bf16",
    ] {
        assert!(at(tc).counters.hmma > 0, "{tc} runs on the tensor cores");
    }
}
