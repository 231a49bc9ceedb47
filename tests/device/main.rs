//! The executors themselves: device selection, `mura info`, the drivers (copies, graphs), and the
//! emulator's self-tests (barriers, warp collectives, atomics, shared memory, its diagnostics),
//! its checkers (`checks`, and on real kernels with planted bugs, `mutants`) and its profiler
//! (`profile`); the kernels' PTX free of 64-bit division (`ptx`); and the GPU-visit kit's
//! scripts, rehearsed on the emulator (`kit`).

#[path = "../common/mod.rs"]
mod common;

mod checks;
mod drivers;
mod emu;
mod kit;
mod mutants;
mod profile;
mod ptx;
