//! The GPU op layer's foundation: a small driver interface with two drivers, real CUDA
//! ([`cuda::Cuda`], through cudarc) and the CPU emulator of the same kernels ([`emu::Emu`]).
//!
//! GPU ops are written once against [`Driver`]: allocate, copy, memset, launch a kernel from
//! `kernels/*.cu` by name with a cuLaunchKernel-style parameter array, synchronise, time.
//! Device pointers are plain `u64`s (`CUdeviceptr`; host addresses on the emulator), passed to
//! kernels as parameters like any other value.

pub mod cuda;
pub mod densenet;
pub mod emu;
pub mod kernel_bench;
pub mod kernels;
pub mod ops;
pub mod ops_tc;
pub mod testing;
pub mod tracking;

use crate::device::Device;
use anyhow::{bail, Result};
use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::Arc;

/// A device address (`CUdeviceptr`).
pub type DevPtr = u64;

/// What every executor of the GPU kernels provides. Work is ordered: each call sees the effects
/// of the calls before it. Errors are values; an emulated kernel bug (bad warp mask, divergent
/// barrier) comes back from `launch`, an asynchronous CUDA fault from the next synchronising call.
pub trait Driver: Send + Sync {
    /// "emu", or "cuda:0 (NVIDIA H100 80GB HBM3)".
    fn name(&self) -> String;
    fn alloc(&self, bytes: usize) -> Result<DevPtr>;
    fn free(&self, ptr: DevPtr) -> Result<()>;
    fn htod(&self, dst: DevPtr, src: &[u8]) -> Result<()>;
    fn dtoh(&self, dst: &mut [u8], src: DevPtr) -> Result<()>;
    fn memset(&self, dst: DevPtr, byte: u8, bytes: usize) -> Result<()>;
    /// Launch kernel `name` (an `extern "C" __global__` in kernels/*.cu) on a grid of `grid`
    /// blocks of `block` threads with `shared_bytes` of dynamic shared memory. `params` holds one
    /// pointer per kernel parameter, to a value of exactly that parameter's type ([`arg`]).
    ///
    /// # Safety
    /// The parameter types must match the kernel's signature and every device pointer must be
    /// valid for what the kernel reads and writes, as with cuLaunchKernel.
    unsafe fn launch(
        &self,
        name: &str,
        grid: [u32; 3],
        block: [u32; 3],
        shared_bytes: u32,
        params: &mut [*mut c_void],
    ) -> Result<()>;
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
    anyhow::anyhow!(
        "{what} is not allowed while capturing a graph (only launches and memsets are recorded)"
    )
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
        d => d,
    })
}

/// A typed device buffer of `len` elements that frees itself.
pub struct DeviceBuffer<T: bytemuck::Pod> {
    ptr: DevPtr,
    len: usize,
    driver: Arc<dyn Driver>,
    _t: PhantomData<T>,
}

impl<T: bytemuck::Pod> DeviceBuffer<T> {
    /// Uninitialised (as on a GPU: the emulator's memory is not zeroed either).
    pub fn alloc(driver: &Arc<dyn Driver>, len: usize) -> Result<Self> {
        let ptr = driver.alloc(len * size_of::<T>())?;
        Ok(Self {
            ptr,
            len,
            driver: driver.clone(),
            _t: PhantomData,
        })
    }
    pub fn from_slice(driver: &Arc<dyn Driver>, data: &[T]) -> Result<Self> {
        let buf = Self::alloc(driver, data.len())?;
        buf.copy_from(data)?;
        Ok(buf)
    }
    pub fn copy_from(&self, data: &[T]) -> Result<()> {
        if data.len() != self.len {
            bail!(
                "copy of {} elements into a device buffer of {}",
                data.len(),
                self.len
            );
        }
        self.driver.htod(self.ptr, bytemuck::cast_slice(data))
    }
    pub fn to_vec(&self) -> Result<Vec<T>> {
        let mut v = vec![T::zeroed(); self.len];
        self.driver
            .dtoh(bytemuck::cast_slice_mut(&mut v), self.ptr)?;
        Ok(v)
    }
    /// Every byte set to `byte` (0: zeros; 0xff: NaN for f32 and bf16).
    pub fn fill_bytes(&self, byte: u8) -> Result<()> {
        self.driver
            .memset(self.ptr, byte, self.len * size_of::<T>())
    }
    pub fn ptr(&self) -> DevPtr {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<T: bytemuck::Pod> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        let _ = self.driver.free(self.ptr);
    }
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
