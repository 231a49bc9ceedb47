//! The kernel lab: tooling for kernel engineers that the `mura` binary does not ship.
//!
//! - [`roofline`]: the analytic roofline of one DenseNet training step (`mura::roofline`, which
//!   the launch plan also reads), as markdown: every kernel's FLOPs,
//!   minimum bytes and floor time.
//! - [`harness`]: each roofline row's kernels launched through mura's GPU model's own engine, timed
//!   on a device.
//! - [`probe`]: a few kernels launched once each, to read them with Nsight Compute on a GPU
//!   beside the emulator's profile of the same launches.
//!
//! `cargo bench --bench kernels` prints the table (benches/kernels.rs).

pub mod harness;
pub mod probe;
pub mod roofline;
