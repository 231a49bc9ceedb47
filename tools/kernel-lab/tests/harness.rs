//! The kernel harness's measurements (`mura::gpu::kernel_bench::measure`) on the executor named
//! by MURA_TEST_DEVICE (the emulator by default): every row of a small DenseNet's training step
//! gets a time, in bf16 (tensor-core convolutions) and f32, and requests that do not fit the
//! rows are errors.

use mura::gpu::kernel_bench::measure;
use mura::gpu::testing::test_driver;
use mura::roofline::{markdown, table, Machine, Precision};
use mura::spec::DenseNetSpec;

/// Two blocks, so a transition; channel counts that are not multiples of 8 (12 + 2·6 = 24,
/// then 12 + 2·6), so the tensor-core kernels' element-by-element loads run too.
fn tiny() -> DenseNetSpec {
    DenseNetSpec::custom(6, vec![2, 2], 12, 2).unwrap()
}

fn every_row_is_timed(precision: Precision) {
    let d = test_driver().unwrap();
    let (batch, size) = (2, 32);
    let rows = table(&tiny(), batch, size, precision).unwrap();
    let times = measure(&d, &rows, precision, 2).unwrap();
    assert_eq!(times.len(), rows.len());
    for (r, t) in rows.iter().zip(&times) {
        let t = t.unwrap_or_else(|| panic!("{} {} {} not measured", r.op, r.pass, r.shape));
        assert!(
            t > 0.0 && t.is_finite(),
            "{} {} {}: {t}",
            r.op,
            r.pass,
            r.shape
        );
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
fn requests_that_do_not_fit_the_rows_are_errors() {
    let d = test_driver().unwrap();
    let rows = table(&tiny(), 1, 32, Precision::Bf16).unwrap();
    let err = |rows: &[_], p, reps| format!("{:#}", measure(&d, rows, p, reps).unwrap_err());

    let e = err(&rows, Precision::F32, 1);
    assert!(e.contains("built for bf16") && e.contains("not f32"), "{e}");
    assert!(err(&rows, Precision::Bf16, 0).contains("at least 1"));

    // Rows that use a block's buffers without the convolutions that give its width.
    let pools: Vec<_> = rows.iter().filter(|r| r.gemm.is_none()).cloned().collect();
    assert!(err(&pools, Precision::Bf16, 1).contains("no convolution"));
    let no_block2: Vec<_> = rows
        .iter()
        .filter(|r| r.site != "block2")
        .cloned()
        .collect();
    let e = err(&no_block2, Precision::Bf16, 1);
    assert!(e.contains("block2"), "{e}");

    // A row whose shape does not parse, or names an op with no kernel.
    let mut bad = rows.clone();
    bad[0].shape = "sixteen".into();
    assert!(err(&bad, Precision::Bf16, 1).contains("sixteen"));
    let mut bad = rows.clone();
    let last = bad.len() - 1;
    bad[last].op = "softmax";
    assert!(err(&bad, Precision::Bf16, 1).contains("softmax"));
}
