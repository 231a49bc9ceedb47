//! The kernel lab: tooling for kernel engineers that the `mura` binary does not ship.
//!
//! - [`roofline`]: the analytic roofline of one DenseNet training step, every kernel's FLOPs,
//!   minimum bytes and floor time.
//! - [`harness`]: each roofline row's kernels launched as mura's GPU model launches them, timed
//!   on a device.
//!
//! `cargo bench --bench kernels` prints the table (benches/kernels.rs).

pub mod harness;
pub mod roofline;
