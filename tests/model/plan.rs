//! The launch plan (`mura bench --plan`) is what a GPU runs: the recorder's record of a training
//! step and an eval forward equals, launch for launch and memset for memset, what the emulator
//! executes for the same step (graphs replayed included), parameters included (pointers as the
//! allocation they point into and the offset there).

use super::{tiny, wide};
use half::bf16;
use mura::gpu::emu::{self, Emu};
use mura::gpu::launch_plan::record;
use mura::gpu::model::Engine;
use mura::gpu::record::{Event, Op, Recorder};
use mura::gpu::Driver;
use mura::spec::DenseNetSpec;
use std::sync::Arc;

/// The record and the emulator's log of `spec`'s step and eval forward at `n` images of `s`²,
/// on a card of `sms` SMs.
fn both<T: Engine>(spec: &DenseNetSpec, n: usize, s: usize, sms: usize) -> [[Vec<Event>; 2]; 2] {
    let rec = Arc::new(Recorder::new(sms));
    let d: Arc<dyn Driver> = rec.clone();
    let planned = record::<T>(d, &|| rec.take(), spec, n, s).unwrap();
    let emu = Arc::new(Emu::new().with_sms(sms).with_log());
    let d: Arc<dyn Driver> = emu.clone();
    let ran = record::<T>(d, &|| emu.executed(), spec, n, s).unwrap();
    [planned.into(), ran.into()]
}

fn kernels(events: &[Event]) -> Vec<&'static str> {
    let launch = |e: &Event| match &e.op {
        Op::Launch(l) => Some(l.kernel),
        Op::Memset { .. } => None,
    };
    events.iter().filter_map(launch).collect()
}

/// Every planned event has a stage; the emulator's ops are the plan's, in order.
fn same<T: Engine>(spec: &DenseNetSpec, n: usize, s: usize, sms: usize) -> Vec<&'static str> {
    let [planned, ran] = both::<T>(spec, n, s, sms);
    for (pass, (p, r)) in ["train", "eval"].iter().zip(planned.iter().zip(&ran)) {
        assert!(
            p.iter().all(|e| e.stage.is_some()),
            "{pass}: a launch without a stage"
        );
        for (i, (a, b)) in p.iter().zip(r).enumerate() {
            let at = a.stage.unwrap();
            assert_eq!(
                a.op, b.op,
                "{pass}: op {i} (at {at}) differs from what the emulator ran"
            );
        }
        assert_eq!(
            p.len(),
            r.len(),
            "{pass}: {} planned, {} ran",
            p.len(),
            r.len()
        );
        assert!(!kernels(p).is_empty(), "{pass}: nothing planned");
    }
    kernels(&planned[0])
}

#[test]
fn recorded_plan_is_what_the_emulator_executes() {
    let f32_step = same::<f32>(&tiny(), 2, 32, emu::SMS);
    assert!(f32_step.contains(&"conv_fwd_f32"), "{f32_step:?}");
    let bf16_step = same::<bf16>(&wide(), 2, 32, emu::SMS);
    // The bf16 step's split-K forwards are planned as they run.
    assert!(bf16_step.contains(&"conv3x3_tc_fwd_bf16"), "{bf16_step:?}");
    assert!(
        bf16_step.iter().any(|k| k.contains("finish")),
        "{bf16_step:?}"
    );
}
