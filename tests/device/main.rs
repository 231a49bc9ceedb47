//! The executors themselves: device selection, `mura info`, the drivers (copies, graphs), and the
//! emulator's self-tests (barriers, warp collectives, atomics, shared memory, its diagnostics).

#[path = "../common/mod.rs"]
mod common;

mod drivers;
mod emu;
