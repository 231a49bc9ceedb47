//! Driver 1: a real CUDA device through cudarc's driver API (loaded at run time, so nothing of
//! CUDA is needed to build). Kernels come from the embedded fatbins, or, when the build had no
//! nvcc, from NVRTC on first use (cached on disk: [`super::nvrtc`]). Driver errors are typed
//! ([`Error`]): out of memory apart from every other code.
//!
//! With `MURA_CUDA_SYNC=1` every launch outside a capture is waited for, so that a fault (an
//! illegal address) is reported by the launch that caused it, with the kernel's name and shape,
//! not by a later copy (the GPU model then runs without graphs): for debugging, slow.
//!
//! All work goes, in order, to one non-blocking stream of our own: memsets and launches are
//! asynchronous; copies are queued on it and then waited for, so the host slice is free (htod)
//! or filled (dtoh) when the call returns. Nothing of ours uses the legacy NULL stream, and a
//! non-blocking stream does not synchronise with it. Graphs are captured from that stream.

use super::kernels::{all_modules, module_of, KernelModule};
use super::{not_while_capturing, DevPtr, Driver, Error, Launch};
use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{result, sys};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Whether `MURA_CUDA_SYNC` asks for a wait after every launch (set, not empty, not "0").
pub fn sync_each_launch() -> bool {
    std::env::var("MURA_CUDA_SYNC").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Fails with "no CUDA driver found" unless libcuda can be loaded (cudarc panics without it).
fn require_driver() -> Result<()> {
    // SAFETY: only tries to dlopen the library.
    if !unsafe { sys::is_culib_present() } {
        bail!(Error::Driver {
            call: "cuda".into(),
            message: "no CUDA driver found (libcuda could not be loaded)".into(),
        });
    }
    cu(result::init(), "cuInit")
}

/// Number of CUDA devices; an error when there is no driver.
pub fn device_count() -> Result<usize> {
    require_driver()?;
    Ok(cu(result::device::get_count(), "cuDeviceGetCount")? as usize)
}

/// The CUDA version the driver supports, e.g. (13, 0).
pub fn driver_version() -> Result<(i32, i32)> {
    require_driver()?;
    let mut v = 0;
    // SAFETY: writes one int.
    cu(
        unsafe { sys::cuDriverGetVersion(&mut v) }.result(),
        "cuDriverGetVersion",
    )?;
    Ok((v / 1000, (v % 1000) / 10))
}

/// The kernel driver's release (`580.159.04`), from `/proc/driver/nvidia/version` (Linux; None
/// where that file is absent or says no version).
pub fn driver_release() -> Option<String> {
    let text = crate::disk::read_regular_string(Path::new("/proc/driver/nvidia/version"), 1 << 16);
    let text = text.ok()?;
    let line = text.lines().find(|l| l.starts_with("NVRM version:"))?;
    // "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.159.04  Thu ..."
    line.split_whitespace()
        .find(|w| w.split('.').count() >= 2 && w.split('.').all(|p| p.parse::<u32>().is_ok()))
        .map(str::to_string)
}

/// What `mura info` shows about a device.
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub memory_bytes: usize,
    pub multiprocessors: i32,
    /// The most shared memory a block may have, with the opt-in (sm_90: 227 KiB).
    pub shared_per_block_optin: i32,
    /// The SMs' and the memory's peak clocks, in kHz, and the memory bus width in bits.
    pub sm_clock_khz: i32,
    pub memory_clock_khz: i32,
    pub memory_bus_bits: i32,
    pub l2_bytes: i32,
}

pub fn device_info(ordinal: usize) -> Result<DeviceInfo> {
    require_driver()?;
    let what = format!("cuda:{ordinal}");
    let dev = cu(result::device::get(ordinal as i32), &what)?;
    // SAFETY: dev came from device::get.
    let attr = |a| cu(unsafe { result::device::get_attribute(dev, a) }, &what);
    use sys::CUdevice_attribute::*;
    Ok(DeviceInfo {
        ordinal,
        name: cu(result::device::get_name(dev), &what)?,
        compute_capability: (
            attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        ),
        // SAFETY: dev came from device::get.
        memory_bytes: cu(unsafe { result::device::total_mem(dev) }, &what)?,
        multiprocessors: attr(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
        shared_per_block_optin: attr(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?,
        sm_clock_khz: attr(CU_DEVICE_ATTRIBUTE_CLOCK_RATE)?,
        memory_clock_khz: attr(CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)?,
        memory_bus_bits: attr(CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)?,
        l2_bytes: attr(CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?,
    })
}

pub struct Cuda {
    info: DeviceInfo,
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
    /// Where all work goes (null only while `new` has not created it yet).
    stream: sys::CUstream,
    /// Loaded modules by file, and functions by kernel name.
    modules: Mutex<HashMap<&'static str, sys::CUmodule>>,
    functions: Mutex<HashMap<String, sys::CUfunction>>,
    /// True while `capture` runs: the stream records work instead of running it.
    capturing: AtomicBool,
    /// Instantiated graphs by id.
    graphs: Mutex<HashMap<u64, sys::CUgraphExec>>,
    next_graph: AtomicU64,
    /// [`sync_each_launch`], read once.
    sync_each: bool,
}

// SAFETY: CUDA contexts, streams, modules, functions and graph execs may be used from any
// thread; every call makes the context current first.
unsafe impl Send for Cuda {}
unsafe impl Sync for Cuda {}

/// A driver call's result, its error typed: `CUDA_ERROR_OUT_OF_MEMORY` (from any call) is
/// [`Error::OutOfMemory`], every other code [`Error::Driver`] naming the call.
fn cu<T>(r: Result<T, result::DriverError>, what: &str) -> Result<T> {
    r.map_err(|e| driver_error(e, what).into())
}

fn driver_error(e: result::DriverError, call: &str) -> Error {
    let message = match (e.error_name(), e.error_string()) {
        (Ok(name), Ok(text)) => format!("{} ({})", name.to_string_lossy(), text.to_string_lossy()),
        _ => format!("{:?}", e.0),
    };
    match e.0 {
        sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => Error::OutOfMemory {
            what: format!("{call}: {message}"),
        },
        _ => Error::Driver {
            call: call.to_string(),
            message,
        },
    }
}

impl Cuda {
    pub fn new(ordinal: usize) -> Result<Self> {
        let count = device_count()?;
        if ordinal >= count {
            bail!(Error::Driver {
                call: format!("cuda:{ordinal}"),
                message: format!("no CUDA device {ordinal}: found {count}"),
            });
        }
        let info = device_info(ordinal)?;
        let dev = cu(result::device::get(ordinal as i32), "cuDeviceGet")?;
        // SAFETY: dev is a valid device.
        let ctx = cu(
            unsafe { result::primary_ctx::retain(dev) },
            "cuDevicePrimaryCtxRetain",
        )?;
        let mut cuda = Self {
            info,
            dev,
            ctx,
            stream: std::ptr::null_mut(),
            modules: Mutex::default(),
            functions: Mutex::default(),
            capturing: AtomicBool::new(false),
            graphs: Mutex::default(),
            next_graph: AtomicU64::new(0),
            sync_each: sync_each_launch(),
        };
        // On failure from here, Drop releases the context.
        cuda.bind()?;
        cuda.stream = cu(
            result::stream::create(result::stream::StreamKind::NonBlocking),
            "cuStreamCreate",
        )?;
        Ok(cuda)
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn bind(&self) -> Result<()> {
        // SAFETY: ctx is the retained primary context.
        cu(
            unsafe { result::ctx::set_current(self.ctx) },
            "cuCtxSetCurrent",
        )
    }

    fn not_capturing(&self, what: &str) -> Result<()> {
        match self.capturing.load(Ordering::Acquire) {
            true => Err(not_while_capturing(&format!("cuda: {what}"))),
            false => Ok(()),
        }
    }

    /// Waits for the work queued so far; reports any asynchronous error.
    fn sync_stream(&self) -> Result<()> {
        // SAFETY: the stream lives until Drop.
        cu(
            unsafe { result::stream::synchronize(self.stream) },
            "cuStreamSynchronize",
        )
    }

    /// `work` between cuStreamBeginCapture and cuStreamEndCapture; the captured CUgraph.
    fn record(&self, work: &mut dyn FnMut() -> Result<()>) -> Result<sys::CUgraph> {
        // Every kernel, the test-only ones too, is loaded first (cached after the first
        // capture): a module load, or the load of a function that lazy loading defers to
        // cuModuleGetFunction, is not something a capture may contain. Best effort: a module
        // this device cannot load (NVRTC for an architecture below the tensor-core kernels'
        // sm_80) is skipped, and a capture that launches one of its kernels fails on that
        // launch, as a direct launch would.
        for m in all_modules() {
            for k in m.kernels {
                if self.function(k).is_err() {
                    break;
                }
            }
        }
        // Thread-local mode: CUDA refuses any potentially unsafe call (a synchronous copy, an
        // allocation, a sync) made by this thread while it captures, on top of this driver's
        // own refusals (`not_capturing`), so nothing slips silently past the capture; other
        // threads, which do not feed this stream, are left alone (the global mode would fail
        // their calls too). Relaxed mode would only be needed for unsafe calls during the
        // capture, and none are left once the kernels are loaded.
        // SAFETY: the stream lives until Drop.
        cu(
            unsafe {
                result::stream::begin_capture(
                    self.stream,
                    sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
                )
            },
            "cuStreamBeginCapture",
        )?;
        let worked = work();
        // Always end the capture, so the stream is back in normal mode whatever `work` did.
        // SAFETY: as above; the stream is capturing.
        let ended = unsafe { result::stream::end_capture(self.stream) };
        match (worked, ended) {
            (Ok(()), Ok(graph)) => Ok(graph),
            (Ok(()), Err(e)) => Err(anyhow!("cuStreamEndCapture: {e}"))
                .context("a call during the capture invalidated it"),
            (Err(e), Ok(graph)) => {
                // SAFETY: a graph we own and drop here.
                let _ = unsafe { result::graph::destroy(graph) };
                Err(e)
            }
            (Err(e), Err(_)) => Err(e),
        }
    }

    fn load(&self, m: &'static KernelModule) -> Result<sys::CUmodule> {
        let mut modules = self.modules.lock().unwrap();
        if let Some(&module) = modules.get(m.file) {
            return Ok(module);
        }
        let module = match m.fatbin {
            // SAFETY: a fatbin image produced by nvcc.
            Some(fatbin) => cu(
                unsafe { result::module::load_data(fatbin.as_ptr() as *const c_void) },
                "cuModuleLoadData",
            )
            .with_context(|| format!("loading the fatbin of kernels/{}", m.file))?,
            None => {
                let ptx = super::nvrtc::ptx(m, self.info.compute_capability)?;
                // SAFETY: NUL-terminated PTX text.
                cu(
                    unsafe { result::module::load_data(ptx.as_ptr() as *const c_void) },
                    "cuModuleLoadData",
                )?
            }
        };
        modules.insert(m.file, module);
        Ok(module)
    }

    /// `f` launched as `at` says with the programmatic-stream-serialization attribute
    /// (`cuLaunchKernelEx`): it may start before the previous kernel in the stream completes, and
    /// waits for it with griddepcontrol.wait (sm_90 and newer).
    ///
    /// # Safety
    /// As [`Driver::launch`].
    unsafe fn launch_pdl(
        &self,
        f: sys::CUfunction,
        at: Launch,
        params: &mut [*mut c_void],
    ) -> Result<(), result::DriverError> {
        // SAFETY: a plain C union of integers and structs of integers: all zero is valid.
        let mut value: sys::CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
        value.programmaticStreamSerializationAllowed = 1;
        let mut attr = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value,
        };
        let config = sys::CUlaunchConfig {
            gridDimX: at.grid[0],
            gridDimY: at.grid[1],
            gridDimZ: at.grid[2],
            blockDimX: at.block[0],
            blockDimY: at.block[1],
            blockDimZ: at.block[2],
            sharedMemBytes: at.shared,
            hStream: self.stream,
            attrs: &mut attr,
            numAttrs: 1,
        };
        // SAFETY: config and its one attribute outlive the call; the parameters are the caller's.
        unsafe { sys::cuLaunchKernelEx(&config, f, params.as_mut_ptr(), std::ptr::null_mut()) }
            .result()
    }

    fn function(&self, name: &str) -> Result<sys::CUfunction> {
        if let Some(&f) = self.functions.lock().unwrap().get(name) {
            return Ok(f);
        }
        let m = module_of(name).ok_or_else(|| Error::Kernel {
            kernel: name.to_string(),
            message: format!("no kernel named '{name}' in kernels/*.cu"),
        })?;
        let module = self.load(m)?;
        // SAFETY: module is loaded and never unloaded.
        let f = cu(
            unsafe { result::module::get_function(module, CString::new(name)?) },
            name,
        )?;
        // Launches may ask for more than 48 KiB of dynamic shared memory (the tensor-core data
        // gradients' 3 stages: 60 KiB) only after this opt-in: up to the device's most per block,
        // less the kernel's static shared memory. (Done at load, before any graph capture.)
        use sys::CUfunction_attribute::*;
        // SAFETY: f is a loaded function.
        unsafe {
            let fixed = cu(
                result::function::get_function_attribute(f, CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES),
                "cuFuncGetAttribute",
            )?;
            let most = self.info.shared_per_block_optin - fixed;
            cu(
                result::function::set_function_attribute(
                    f,
                    CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    most,
                ),
                "cuFuncSetAttribute",
            )
            .with_context(|| format!("allowing {name} {most} bytes of dynamic shared memory"))?;
        }
        self.functions.lock().unwrap().insert(name.to_string(), f);
        Ok(f)
    }
}

/// Leaves capture mode however `record` left, ending the stream's capture if `work` panicked.
struct EndCapture<'a>(&'a Cuda);

impl Drop for EndCapture<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // SAFETY: the stream lives until Drop; the discarded graph is ours.
            if let Ok(graph) = unsafe { result::stream::end_capture(self.0.stream) } {
                let _ = unsafe { result::graph::destroy(graph) };
            }
        }
        self.0.capturing.store(false, Ordering::Release);
    }
}

impl Drop for Cuda {
    fn drop(&mut self) {
        if self.bind().is_ok() {
            if !self.stream.is_null() {
                // Queued work may still run kernels of the modules unloaded below.
                let _ = self.sync_stream();
                for (_, exec) in self.graphs.get_mut().unwrap().drain() {
                    // SAFETY: instantiated by us, never used after this.
                    let _ = unsafe { result::graph::exec_destroy(exec) };
                }
                // SAFETY: created in `new`, never used after this.
                let _ = unsafe { result::stream::destroy(self.stream) };
            }
            for &module in self.modules.get_mut().unwrap().values() {
                // SAFETY: loaded by us, no function of it is used after this.
                let _ = unsafe { result::module::unload(module) };
            }
        }
        // SAFETY: balances the retain in `new`.
        let _ = unsafe { result::primary_ctx::release(self.dev) };
    }
}

impl Driver for Cuda {
    fn name(&self) -> String {
        format!("cuda:{} ({})", self.info.ordinal, self.info.name)
    }

    fn sms(&self) -> usize {
        self.info.multiprocessors.max(1) as usize
    }

    fn alloc(&self, bytes: usize) -> Result<DevPtr> {
        self.not_capturing("alloc")?;
        self.bind()?;
        // SAFETY: context is current.
        cu(
            unsafe { result::malloc_sync(bytes.max(1)) },
            &format!("cuMemAlloc of {bytes} bytes on {}", self.name()),
        )
    }

    fn free(&self, ptr: DevPtr) -> Result<()> {
        self.not_capturing("free")?;
        self.bind()?;
        // Work queued before may still use the memory (cuMemFree may synchronise by itself, but
        // that is not a documented promise).
        self.sync_stream()?;
        // SAFETY: ptr came from alloc, and no queued work uses it any more.
        cu(unsafe { result::free_sync(ptr) }, "cuMemFree")
    }

    fn htod(&self, dst: DevPtr, src: &[u8]) -> Result<()> {
        self.not_capturing("copy to device")?;
        self.bind()?;
        // SAFETY: dst is a device allocation of at least src.len() bytes (checked by the driver);
        // src outlives the copy, as the stream is synchronised before returning.
        cu(
            unsafe { result::memcpy_htod_async(dst, src, self.stream) },
            "cuMemcpyHtoDAsync",
        )?;
        self.sync_stream()
    }

    fn dtoh(&self, dst: &mut [u8], src: DevPtr) -> Result<()> {
        self.not_capturing("copy from device")?;
        self.bind()?;
        // SAFETY: as above; dst is filled when the stream has been synchronised.
        cu(
            unsafe { result::memcpy_dtoh_async(dst, src, self.stream) },
            "cuMemcpyDtoHAsync",
        )?;
        self.sync_stream()
    }

    fn memset(&self, dst: DevPtr, byte: u8, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(()); // nothing to do, and a graph's memset node may not be empty
        }
        self.bind()?;
        // SAFETY: as above; a memset node when capturing.
        cu(
            unsafe { result::memset_d8_async(dst, byte, bytes, self.stream) },
            "cuMemsetD8Async",
        )
    }

    unsafe fn launch(&self, name: &str, at: Launch, params: &mut [*mut c_void]) -> Result<()> {
        self.bind()?;
        let f = self.function(name)?;
        let Launch {
            grid,
            block,
            shared: shared_bytes,
            pdl,
        } = at;
        // SAFETY: the caller vouches for the parameters (see Driver::launch). cuLaunchKernel(Ex)
        // copies the parameter values, into the kernel node when capturing.
        let early = pdl && self.info.compute_capability.0 >= 9;
        let r = match early {
            true => unsafe { self.launch_pdl(f, at, params) },
            false => unsafe {
                result::launch_kernel(
                    f,
                    (grid[0], grid[1], grid[2]),
                    (block[0], block[1], block[2]),
                    shared_bytes,
                    self.stream,
                    params,
                )
            },
        };
        let shape = || format!("grid {grid:?}, block {block:?}, {shared_bytes} B shared");
        r.map_err(|e| Error::Kernel {
            kernel: name.to_string(),
            message: format!(
                "{} ({}): {}",
                if early {
                    "cuLaunchKernelEx"
                } else {
                    "cuLaunchKernel"
                },
                shape(),
                driver_error(e, "launch")
            ),
        })?;
        if self.sync_each && !self.capturing.load(Ordering::Acquire) {
            self.sync_stream().map_err(|e| Error::Kernel {
                kernel: name.to_string(),
                message: format!("failed ({}): {e:#}", shape()),
            })?;
        }
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        self.not_capturing("synchronize")?;
        self.bind()?;
        self.sync_stream()
    }

    fn time(&self, work: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        self.not_capturing("time")?;
        self.bind()?;
        let flags = sys::CUevent_flags::CU_EVENT_DEFAULT;
        let start = cu(result::event::create(flags), "cuEventCreate")?;
        let end = cu(result::event::create(flags), "cuEventCreate")?;
        let timed = (|| -> Result<f64> {
            // SAFETY: events created above; our stream.
            unsafe {
                cu(result::event::record(start, self.stream), "cuEventRecord")?;
                work()?;
                cu(result::event::record(end, self.stream), "cuEventRecord")?;
                cu(result::event::synchronize(end), "cuEventSynchronize")?;
                Ok(cu(result::event::elapsed(start, end), "cuEventElapsedTime")? as f64)
            }
        })();
        // SAFETY: not used after this.
        unsafe {
            let _ = result::event::destroy(start);
            let _ = result::event::destroy(end);
        }
        timed
    }

    fn capture(&self, work: &mut dyn FnMut() -> Result<()>) -> Result<u64> {
        if self.capturing.swap(true, Ordering::AcqRel) {
            return Err(not_while_capturing("cuda: a nested capture"));
        }
        let graph = {
            let _end = EndCapture(self);
            self.bind().and_then(|()| self.record(work))?
        };
        // SAFETY: a complete graph from end_capture; the exec keeps what it needs of it.
        let exec = unsafe { result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) };
        // SAFETY: not used after this.
        let _ = unsafe { result::graph::destroy(graph) };
        let exec = cu(exec, "cuGraphInstantiate")?;
        let id = self.next_graph.fetch_add(1, Ordering::Relaxed) + 1;
        self.graphs.lock().unwrap().insert(id, exec);
        Ok(id)
    }

    fn replay(&self, graph: u64) -> Result<()> {
        self.not_capturing("replay")?;
        self.bind()?;
        let graphs = self.graphs.lock().unwrap();
        let &exec = graphs
            .get(&graph)
            .ok_or_else(|| anyhow!("cuda: replay of graph {graph}, which does not exist"))?;
        // SAFETY: a live exec (the lock keeps it so); our stream.
        cu(
            unsafe { result::graph::launch(exec, self.stream) },
            &format!("cuGraphLaunch (graph {graph})"),
        )
    }

    fn free_graph(&self, graph: u64) -> Result<()> {
        self.not_capturing("free of a graph")?;
        let exec = self
            .graphs
            .lock()
            .unwrap()
            .remove(&graph)
            .ok_or_else(|| anyhow!("cuda: free of graph {graph}, which does not exist"))?;
        self.bind()?;
        // SAFETY: removed from the map, never used after this; an exec still running is freed
        // by CUDA when it completes.
        cu(
            unsafe { result::graph::exec_destroy(exec) },
            "cuGraphExecDestroy",
        )
    }

    fn graph_count(&self) -> usize {
        self.graphs.lock().unwrap().len()
    }
}
