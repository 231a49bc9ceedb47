//! The GPU op layer's foundation: a small driver interface with two drivers, real CUDA
//! ([`cuda::Cuda`], through cudarc) and the CPU emulator of the same kernels ([`emu::Emu`]).
//!
//! GPU ops ([`ops`]) are written once against [`Driver`]: allocate, copy, memset, launch a kernel
//! from `kernels/*.cu`, synchronise, time. Kernels are launched through typed launchers generated
//! from their signatures ([`kernels::launch`]); device memory is held in typed buffers and passed
//! as typed views whose extents the ops check against the shapes they launch ([`buffer`]).

pub mod buffer;
pub mod cuda;
pub mod emu;
pub mod error;
pub mod kernels;
pub mod launch_plan;
pub mod model;
pub mod nvrtc;
pub mod ops;
pub mod record;
pub mod tracking;

pub use buffer::{Act, DeviceBuffer, Mat, Nhwc, Ptr, Slice};
pub use error::Error;

use crate::device::Device;
use crate::model::schedule::Stage;
use anyhow::{bail, Context, Result};
use std::ffi::c_void;
use std::sync::Arc;

/// A device address (`CUdeviceptr`).
pub type DevPtr = u64;

/// What every executor of the GPU kernels provides. Work is ordered: each call sees the effects
/// of the calls before it. Errors are values, each a typed [`Error`] inside the `anyhow::Error`
/// (running out of memory is [`Error::OutOfMemory`]); an emulated kernel bug (bad warp mask,
/// divergent barrier) comes back from `launch`, an asynchronous CUDA fault from the next
/// synchronising call.
pub trait Driver: Send + Sync {
    /// "emu", or "cuda:0 (NVIDIA H100 80GB HBM3)".
    fn name(&self) -> String;
    /// The streaming multiprocessors that grids are sized to fill: the device's (CUDA), or the
    /// card a driver that runs no GPU stands for (the emulator: [`emu::SMS`]; the recorder: its
    /// `--sms`).
    fn sms(&self) -> usize;
    /// Marks where in the step the launches and memsets that follow belong (a launch plan's
    /// stage column, [`record::Recorder`]); drivers that run kernels ignore it. Marks made while
    /// capturing belong to the graph's nodes.
    fn stage(&self, _stage: Stage) {}
    fn alloc(&self, bytes: usize) -> Result<DevPtr>;
    fn free(&self, ptr: DevPtr) -> Result<()>;
    fn htod(&self, dst: DevPtr, src: &[u8]) -> Result<()>;
    fn dtoh(&self, dst: &mut [u8], src: DevPtr) -> Result<()>;
    fn memset(&self, dst: DevPtr, byte: u8, bytes: usize) -> Result<()>;
    /// Launch kernel `name` (an `extern "C" __global__` in kernels/*.cu) as `at` says (grid,
    /// block, dynamic shared memory, programmatic dependence). `params` holds one pointer per
    /// kernel parameter, to a value of exactly that parameter's type ([`arg`]).
    ///
    /// # Safety
    /// The parameter types must match the kernel's signature and every device pointer must be
    /// valid for what the kernel reads and writes, as with cuLaunchKernel.
    unsafe fn launch(&self, name: &str, at: Launch, params: &mut [*mut c_void]) -> Result<()>;
    /// Wait for all queued work; report any asynchronous error.
    fn synchronize(&self) -> Result<()>;
    /// Milliseconds the device spent on the work queued by `work`, measured with events.
    fn time(&self, work: &mut dyn FnMut() -> Result<()>) -> Result<f64>;

    /// Runs `work` in capture mode and returns the id of the graph it recorded (see [`Graph`],
    /// which frees it). Launches and memsets are recorded, not executed: each launch node keeps
    /// a copy of its parameter values, so pointers and scalars are frozen at capture, while the
    /// memory they point to is read when the graph is replayed. Any other call while capturing
    /// (copies, alloc, free, synchronize, time, replay, free_graph, a nested capture) is an
    /// error that does nothing (so a [`DeviceBuffer`] dropped inside `work` leaks: keep buffers
    /// alive across the capture). If `work` fails, nothing is kept, the driver is back in normal mode and `work`'s
    /// error is returned. One thread at a time: work queued by another thread meanwhile would be
    /// captured too.
    fn capture(&self, work: &mut dyn FnMut() -> Result<()>) -> Result<u64>;
    /// Queues the recorded work of graph `graph`, in order after the work before it.
    fn replay(&self, graph: u64) -> Result<()>;
    fn free_graph(&self, graph: u64) -> Result<()>;
    /// Graphs captured and not yet freed.
    fn graph_count(&self) -> usize;
}

/// The error for a call that a graph capture cannot record.
fn not_while_capturing(what: &str) -> anyhow::Error {
    Error::Driver {
        call: what.to_string(),
        message: "not allowed while capturing a graph (only launches and memsets are recorded)"
            .into(),
    }
    .into()
}

/// One entry of a launch's parameter array: a pointer to `v`, which must outlive the launch.
pub fn arg<T>(v: &mut T) -> *mut c_void {
    v as *mut T as *mut c_void
}

/// Opens the driver for `device` (`auto` resolved first; `cpu` has none).
pub fn open(device: Device) -> Result<Arc<dyn Driver>> {
    match resolve(device)? {
        Device::Emu => Ok(Arc::new(emu::Emu::new())),
        Device::Cuda(n) => Ok(Arc::new(cuda::Cuda::new(n)?)),
        Device::Cpu => bail!("device 'cpu' runs the CPU backend, not GPU kernels"),
        Device::Auto => unreachable!("resolved above"),
    }
}

/// `auto` becomes `cuda:0` when a CUDA device is present, else `cpu`; others stay as they are.
pub fn resolve(device: Device) -> Result<Device> {
    Ok(match device {
        Device::Auto if cuda::device_count().unwrap_or(0) > 0 => Device::Cuda(0),
        Device::Auto => Device::Cpu,
        // A GPU named is one that is there, before a command writes or spends anything.
        Device::Cuda(n) => {
            let count = cuda::device_count()?;
            if n >= count {
                bail!("cuda:{n}: no such device ({count} CUDA device(s) here)");
            }
            Device::Cuda(n)
        }
        d => d,
    })
}

/// A captured graph (CUDA graph; a node list on the emulator) that frees itself.
pub struct Graph {
    id: u64,
    driver: Arc<dyn Driver>,
}

impl Graph {
    /// Records the launches and memsets of `work` without running them ([`Driver::capture`]).
    pub fn capture(driver: &Arc<dyn Driver>, mut work: impl FnMut() -> Result<()>) -> Result<Self> {
        let id = driver.capture(&mut work)?;
        Ok(Graph {
            id,
            driver: driver.clone(),
        })
    }
    /// Queues the recorded work again, with the parameters it was captured with.
    pub fn replay(&self) -> Result<()> {
        self.driver.replay(self.id)
    }
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        let _ = self.driver.free_graph(self.id);
    }
}

/// Blocks of `block` threads to cover `n` items, one per thread.
pub fn blocks_for(n: usize, block: u32) -> u32 {
    n.div_ceil(block as usize).max(1) as u32
}

/// The shape of a kernel launch: blocks in the grid, threads in a block, dynamic shared bytes, and
/// whether it is a programmatic dependent launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared: u32,
    /// Programmatic dependent launch (on sm_90 and newer; elsewhere an ordinary launch): the
    /// kernel may start while the kernel before it in the stream still runs, in and out of
    /// graphs. Only for kernels that call `pdl_wait()` (kernels/common.cuh) before they touch
    /// memory that kernel reads or writes; the emulator's racecheck fails a launch that does
    /// not, naming both kernels.
    pub pdl: bool,
}

impl Launch {
    /// A one-dimensional launch of `blocks` blocks of `threads` threads, no dynamic shared memory.
    pub fn linear(blocks: u32, threads: u32) -> Launch {
        Launch {
            grid: [blocks, 1, 1],
            block: [threads, 1, 1],
            shared: 0,
            pdl: false,
        }
    }
}

/// A kernel's C `int` argument from a Rust size, count or flag, converted with a check (a size
/// that does not fit is an error naming the kernel and the parameter, never a silent truncation).
pub trait CInt {
    fn c_int(self, kernel: &str, param: &str) -> Result<i32>;
}

impl CInt for usize {
    fn c_int(self, kernel: &str, param: &str) -> Result<i32> {
        i32::try_from(self).map_err(|_| {
            Error::Shape(format!(
                "kernel {kernel}: {param} = {self} does not fit a C int"
            ))
            .into()
        })
    }
}

impl CInt for i32 {
    fn c_int(self, _kernel: &str, _param: &str) -> Result<i32> {
        Ok(self)
    }
}

impl CInt for bool {
    fn c_int(self, _kernel: &str, _param: &str) -> Result<i32> {
        Ok(self as i32)
    }
}

/// Launches kernel `name` (an `extern "C" __global__` of kernels/**/*.cu) with a cuLaunchKernel-
/// style parameter array; an error names the kernel. The typed launchers of [`kernels::launch`]
/// are the callers.
///
/// # Safety
/// As [`Driver::launch`].
pub unsafe fn launch_params(
    d: &dyn Driver,
    name: &str,
    at: Launch,
    params: &mut [*mut c_void],
) -> Result<()> {
    // SAFETY: the caller's promise.
    unsafe { d.launch(name, at, params) }.with_context(|| format!("kernel {name}"))
}
