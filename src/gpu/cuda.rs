//! Driver 1: a real CUDA device through cudarc's driver API (loaded at run time, so nothing of
//! CUDA is needed to build). Kernels come from the embedded fatbins, or are compiled with NVRTC
//! on first use when the build had no nvcc. Work goes to the legacy default stream, in order.

use super::kernels::{module_of, KernelModule};
use super::{DevPtr, Driver};
use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{result, sys};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::Mutex;

/// Fails with "no CUDA driver found" unless libcuda can be loaded (cudarc panics without it).
fn require_driver() -> Result<()> {
    // SAFETY: only tries to dlopen the library.
    if !unsafe { sys::is_culib_present() } {
        bail!("no CUDA driver found (libcuda could not be loaded)");
    }
    result::init().map_err(|e| anyhow!("cuInit failed: {e}"))
}

/// Number of CUDA devices; an error when there is no driver.
pub fn device_count() -> Result<usize> {
    require_driver()?;
    Ok(result::device::get_count().map_err(|e| anyhow!("cuDeviceGetCount: {e}"))? as usize)
}

/// The driver's CUDA version, e.g. (13, 0).
pub fn driver_version() -> Result<(i32, i32)> {
    require_driver()?;
    let mut v = 0;
    // SAFETY: writes one int.
    unsafe { sys::cuDriverGetVersion(&mut v) }
        .result()
        .map_err(|e| anyhow!("cuDriverGetVersion: {e}"))?;
    Ok((v / 1000, (v % 1000) / 10))
}

/// What `mura info` shows about a device.
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub memory_bytes: usize,
    pub multiprocessors: i32,
}

pub fn device_info(ordinal: usize) -> Result<DeviceInfo> {
    require_driver()?;
    let dev = result::device::get(ordinal as i32).map_err(|e| anyhow!("cuda:{ordinal}: {e}"))?;
    let attr = |a| {
        unsafe { result::device::get_attribute(dev, a) }.map_err(|e| anyhow!("cuda:{ordinal}: {e}"))
    };
    use sys::CUdevice_attribute::*;
    Ok(DeviceInfo {
        ordinal,
        name: result::device::get_name(dev).map_err(|e| anyhow!("{e}"))?,
        compute_capability: (
            attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        ),
        // SAFETY: dev came from device::get.
        memory_bytes: unsafe { result::device::total_mem(dev) }.map_err(|e| anyhow!("{e}"))?,
        multiprocessors: attr(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
    })
}

pub struct Cuda {
    info: DeviceInfo,
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
    /// Loaded modules by file, and functions by kernel name.
    modules: Mutex<HashMap<&'static str, sys::CUmodule>>,
    functions: Mutex<HashMap<String, sys::CUfunction>>,
}

// SAFETY: CUDA contexts, modules and functions may be used from any thread; every call makes
// the context current first.
unsafe impl Send for Cuda {}
unsafe impl Sync for Cuda {}

fn cu<T>(r: Result<T, result::DriverError>, what: &str) -> Result<T> {
    r.map_err(|e| anyhow!("{what}: {e}"))
}

impl Cuda {
    pub fn new(ordinal: usize) -> Result<Self> {
        let count = device_count()?;
        if ordinal >= count {
            bail!("no CUDA device {ordinal}: found {count}");
        }
        let info = device_info(ordinal)?;
        let dev = cu(result::device::get(ordinal as i32), "cuDeviceGet")?;
        // SAFETY: dev is a valid device.
        let ctx = cu(
            unsafe { result::primary_ctx::retain(dev) },
            "cuDevicePrimaryCtxRetain",
        )?;
        let cuda = Self {
            info,
            dev,
            ctx,
            modules: Mutex::default(),
            functions: Mutex::default(),
        };
        cuda.bind()?;
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
                let ptx = nvrtc_compile(m, self.info.compute_capability)?;
                let ptx = CString::new(ptx).context("PTX with a NUL byte")?;
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

    fn function(&self, name: &str) -> Result<sys::CUfunction> {
        if let Some(&f) = self.functions.lock().unwrap().get(name) {
            return Ok(f);
        }
        let m =
            module_of(name).ok_or_else(|| anyhow!("no kernel named '{name}' in kernels/*.cu"))?;
        let module = self.load(m)?;
        // SAFETY: module is loaded and never unloaded.
        let f = cu(
            unsafe { result::module::get_function(module, CString::new(name)?) },
            name,
        )?;
        self.functions.lock().unwrap().insert(name.to_string(), f);
        Ok(f)
    }
}

/// PTX for compute capability `cc` from the module's embedded source. NVRTC needs the CUDA
/// headers (cuda_bf16.h): MURA_CUDA_INCLUDE, else CUDA_HOME/include, CUDA_PATH/include or
/// /usr/local/cuda/include, whichever exist.
pub fn nvrtc_compile(m: &KernelModule, (major, minor): (i32, i32)) -> Result<String> {
    // SAFETY: only tries to dlopen the library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        bail!("kernels/{} needs NVRTC (libnvrtc not found): install the CUDA toolkit, or build with NVCC set", m.file);
    }
    let mut include_paths: Vec<String> = std::env::var("MURA_CUDA_INCLUDE").into_iter().collect();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(home) = std::env::var(var) {
            include_paths.push(format!("{home}/include"));
        }
    }
    include_paths.push("/usr/local/cuda/include".into());
    include_paths.retain(|p| std::path::Path::new(p).join("cuda_bf16.h").is_file());
    if include_paths.is_empty() {
        bail!("NVRTC needs the CUDA headers (cuda_bf16.h): set MURA_CUDA_INCLUDE or CUDA_HOME");
    }
    let opts = cudarc::nvrtc::CompileOptions {
        include_paths,
        options: vec![
            format!("--gpu-architecture=compute_{major}{minor}"),
            "-std=c++17".into(),
        ],
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(m.source, opts)
        .map_err(|e| anyhow!("NVRTC failed on kernels/{}: {e}", m.file))?;
    Ok(ptx.to_src())
}

impl Drop for Cuda {
    fn drop(&mut self) {
        if self.bind().is_ok() {
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

    fn alloc(&self, bytes: usize) -> Result<DevPtr> {
        self.bind()?;
        // SAFETY: context is current.
        cu(unsafe { result::malloc_sync(bytes.max(1)) }, "cuMemAlloc")
            .with_context(|| format!("allocating {bytes} bytes on {}", self.name()))
    }

    fn free(&self, ptr: DevPtr) -> Result<()> {
        self.bind()?;
        // SAFETY: ptr came from alloc.
        cu(unsafe { result::free_sync(ptr) }, "cuMemFree")
    }

    fn htod(&self, dst: DevPtr, src: &[u8]) -> Result<()> {
        self.bind()?;
        // SAFETY: dst is a device allocation of at least src.len() bytes (checked by the driver).
        cu(
            unsafe { result::memcpy_htod_sync(dst, src) },
            "cuMemcpyHtoD",
        )
    }

    fn dtoh(&self, dst: &mut [u8], src: DevPtr) -> Result<()> {
        self.bind()?;
        // SAFETY: as above.
        cu(
            unsafe { result::memcpy_dtoh_sync(dst, src) },
            "cuMemcpyDtoH",
        )
    }

    fn memset(&self, dst: DevPtr, byte: u8, bytes: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: as above.
        cu(
            unsafe { result::memset_d8_sync(dst, byte, bytes) },
            "cuMemsetD8",
        )
    }

    unsafe fn launch(
        &self,
        name: &str,
        grid: [u32; 3],
        block: [u32; 3],
        shared_bytes: u32,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        self.bind()?;
        let f = self.function(name)?;
        // SAFETY: the caller vouches for the parameters (see Driver::launch).
        let r = unsafe {
            result::launch_kernel(
                f,
                (grid[0], grid[1], grid[2]),
                (block[0], block[1], block[2]),
                shared_bytes,
                std::ptr::null_mut(),
                params,
            )
        };
        cu(r, &format!("launching {name}"))
    }

    fn synchronize(&self) -> Result<()> {
        self.bind()?;
        cu(result::ctx::synchronize(), "cuCtxSynchronize")
    }

    fn time(&self, work: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        self.bind()?;
        let flags = sys::CUevent_flags::CU_EVENT_DEFAULT;
        let start = cu(result::event::create(flags), "cuEventCreate")?;
        let end = cu(result::event::create(flags), "cuEventCreate")?;
        let timed = (|| -> Result<f64> {
            // SAFETY: events created above; null stream.
            unsafe {
                cu(
                    result::event::record(start, std::ptr::null_mut()),
                    "cuEventRecord",
                )?;
                work()?;
                cu(
                    result::event::record(end, std::ptr::null_mut()),
                    "cuEventRecord",
                )?;
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
}
