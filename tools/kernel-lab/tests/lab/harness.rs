//! The kernel harness's measurements (`mura_kernel_lab::harness::measure`) on the executor named
//! by MURA_TEST_DEVICE (the emulator by default): every row of a small DenseNet's training step
//! gets a time, in bf16 (tensor-core convolutions) and f32, and rows that do not belong to the
//! step measured are errors.

use crate::gpu_common::{seed, test_driver};
use mura::model::{Layout, Schedule};
use mura::precision::Precision;
use mura::spec::DenseNetSpec;
use mura_kernel_lab::harness::{measure, Timing};
use mura_kernel_lab::roofline::{markdown, table, KernelRow, Machine, Op, Pass, Site};

/// Two blocks, so a transition; channel counts that are not multiples of 8 (12 + 2·6 = 24,
/// then 12 + 2·6; bottlenecks of 36), so the tensor-core kernels' element-by-element loads run
/// too; and 3×3s whose reductions (9·36 = 324) over so few pixels split over the workspace.
fn tiny() -> DenseNetSpec {
    DenseNetSpec::custom(6, vec![2, 2], 12, 6).unwrap()
}

fn schedule(spec: &DenseNetSpec, size: usize) -> Schedule {
    Schedule::new(&Layout::new(spec), &spec.arch, size, size).unwrap()
}

fn every_row_is_timed(precision: Precision) {
    let d = test_driver();
    let (spec, batch, size) = (tiny(), 2, 32);
    let rows = table(&spec, batch, size, precision).unwrap();
    let timing = Timing {
        reps: 2,
        seed: seed(&format!("every_row_is_timed_{precision}")).value,
    };
    let times = measure(&d, &schedule(&spec, size), batch, precision, &rows, timing).unwrap();
    assert_eq!(times.len(), rows.len());
    for (r, t) in rows.iter().zip(&times) {
        let what = format!("{} {} {} {}", r.op, r.pass, r.site, r.shape);
        let t = t.unwrap_or_else(|| panic!("{what}: not measured"));
        assert!(t > 0.0 && t.is_finite(), "{what}: {t}");
    }
    let md = markdown(&rows, batch, &Machine::h100(precision), &times);
    assert!(!md.contains("not measured"), "{md}");
    assert!(md.contains("measured (sum of kernels)"), "{md}");
}

#[test]
fn every_row_of_a_bf16_step_is_timed() {
    every_row_is_timed(Precision::Bf16);
}

#[test]
fn every_row_of_an_f32_step_is_timed() {
    every_row_is_timed(Precision::F32);
}

#[test]
fn rows_that_do_not_belong_to_the_step_are_errors() {
    let d = test_driver();
    let spec = tiny();
    let step = schedule(&spec, 32);
    let rows = table(&spec, 1, 32, Precision::Bf16).unwrap();
    let err = |rows: &[KernelRow], batch, p, reps| {
        let timing = Timing { reps, seed: 1 };
        format!(
            "{:#}",
            measure(&d, &step, batch, p, rows, timing).unwrap_err()
        )
    };
    let bf16 = Precision::Bf16;

    let e = err(&rows, 1, Precision::F32, 1);
    assert!(e.contains("built for bf16") && e.contains("not f32"), "{e}");
    assert!(err(&rows, 1, bf16, 0).contains("at least 1"));
    let e = err(&rows, 2, bf16, 1);
    assert!(e.contains("batch of 1, not 2"), "{e}");

    // Rows of another image size or network: their shapes are not the step's.
    let other_size = table(&spec, 1, 64, bf16).unwrap();
    let e = err(&other_size, 1, bf16, 1);
    assert!(
        e.contains("stem of this step has no stem7x7s2 of shape 64x64->32x32"),
        "{e}"
    );
    let wider = DenseNetSpec::custom(8, vec![2, 2], 12, 2).unwrap();
    let e = err(&table(&wider, 1, 32, bf16).unwrap(), 1, bf16, 1);
    assert!(e.contains("another network or image size"), "{e}");

    // Typed rows edited into ones the step cannot have: a site it lacks, a pass the op lacks,
    // an op at another site.
    let edit = |f: &dyn Fn(&mut KernelRow)| {
        let mut bad = rows.clone();
        bad.iter_mut().for_each(f);
        err(&bad, 1, bf16, 1)
    };
    let e = edit(&|r| {
        if r.site == Site::Block(1) {
            r.site = Site::Block(5)
        }
    });
    assert!(e.contains("this step has no block6"), "{e}");
    let e = edit(&|r| {
        if r.op == Op::BnStats {
            r.pass = Pass::Bwd
        }
    });
    assert!(e.contains("bn_stats has no bwd kernel"), "{e}");
    let e = edit(&|r| {
        if r.op == Op::Head {
            r.site = Site::Stem
        }
    });
    assert!(e.contains("stem of this step has no head"), "{e}");
}
