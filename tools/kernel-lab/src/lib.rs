//! The kernel lab: tooling for kernel engineers that the `mura` binary does not ship.
//!
//! - [`roofline`]: the analytic roofline of one DenseNet training step (`mura::roofline`, which
//!   the launch plan also reads), as markdown: every kernel's FLOPs,
//!   minimum bytes and floor time.
//! - [`harness`]: each roofline row's kernels launched through mura's GPU model's own engine, timed
//!   on a device.
//!
//! `cargo bench --bench kernels` prints the table (benches/kernels.rs).

pub mod harness;
pub mod roofline;
