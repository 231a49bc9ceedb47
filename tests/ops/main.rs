//! The GPU ops, one file per op under the op's name (`mura::gpu::ops::<op>` against its CPU
//! reference `mura::ops::<op>`, run in f64), on the executor named by MURA_TEST_DEVICE (the
//! emulator by default): random inputs (a fixed seed per test, see `common::gpu`), outputs
//! poisoned with NaN, sizes that are not multiples of the blocks and tiles, channel prefixes and
//! slices of wider buffers, and operands that do not fit refused before anything is launched.
//! Storage-generic tests run as `<test>::f32` (within 1e-5) and `<test>::bf16` (within 1e-2).
//! `testing_kernels`: the test-only kernels of kernels/testing/.

#[path = "../common/mod.rs"]
mod common;

mod adam;
mod augment;
mod bn;
mod cast;
mod conv;
mod conv_tc;
mod linear;
mod nan;
mod pool;
mod testing_kernels;
