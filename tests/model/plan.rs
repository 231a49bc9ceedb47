//! The launch plan (`mura bench --plan`) is what a GPU runs: the recorder's record of a training
//! step and an eval forward equals, launch for launch and memset for memset, what the emulator
//! executes for the same step (graphs replayed included), parameters included (pointers as the
//! allocation they point into and the offset there).

use super::{tiny, wide};
use half::bf16;
use mura::gpu::emu::{self, Emu};
use mura::gpu::launch_plan::record;
use mura::gpu::model::Engine;
use mura::gpu::record::{Event, Launched, Op, Recorder};
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

fn launches(events: &[Event]) -> Vec<&Launched> {
    fn launch(e: &Event) -> Option<&Launched> {
        match &e.op {
            Op::Launch(l) => Some(l),
            Op::Memset { .. } => None,
        }
    }
    events.iter().filter_map(launch).collect()
}

/// Every planned event has a stage; the emulator's ops are the plan's, in order. The training
/// step's launches.
fn same<T: Engine>(spec: &DenseNetSpec, n: usize, s: usize, sms: usize) -> Vec<Launched> {
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
        assert!(!launches(p).is_empty(), "{pass}: nothing planned");
    }
    launches(&planned[0]).into_iter().cloned().collect()
}

/// Split-K grids (z > 1) of the kernels whose name contains `kind`.
fn splits(step: &[Launched], kind: &str) -> usize {
    let split = |l: &&Launched| l.kernel.contains(kind) && l.grid[2] > 1;
    step.iter().filter(split).count()
}

#[test]
fn recorded_plan_is_what_the_emulator_executes() {
    let f32_step = same::<f32>(&tiny(), 2, 32, emu::SMS);
    assert!(f32_step.iter().any(|l| l.kernel == "conv_fwd_f32"));
    // The bf16 step's split-K forwards and data gradients are planned as they run, and their
    // grids follow the card's SMs: fewer splits for fewer SMs.
    let bf16_step = same::<bf16>(&wide(), 2, 32, emu::SMS);
    let (fwd, data) = (
        splits(&bf16_step, "tc_fwd"),
        splits(&bf16_step, "tc_bwd_data"),
    );
    assert!(
        fwd > 0 && data > 0,
        "{fwd} split forwards, {data} split data gradients"
    );
    // Every tensor-core launch is a programmatic dependent one (its kernels wait in tc_tile),
    // and no other launch is.
    for l in &bf16_step {
        assert_eq!(l.pdl, l.kernel.contains("_tc_"), "{}", l.kernel);
    }
    let small = same::<bf16>(&wide(), 2, 32, 2);
    let blocks = |step: &[Launched]| step.iter().map(|l| l.blocks()).sum::<u64>();
    assert!(
        blocks(&small) < blocks(&bf16_step),
        "grids sized for 2 SMs are smaller"
    );
}
