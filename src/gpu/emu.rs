//! Driver 2: the CPU emulator. The same kernels/*.cu, compiled by the host C++ compiler against
//! src/gpu/emu/cuda_emu.h (build.rs), run as fibers by src/gpu/emu/runtime.cpp. Device memory is
//! host memory; launches are synchronous and serialised (the runtime has one set of fibers).

use super::kernels::{emu_tables, EmuKernel};
use super::{DevPtr, Driver};
use anyhow::{anyhow, bail, Context, Result};
use std::alloc::Layout;
use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

extern "C" {
    fn mura_emu_launch(
        entry: unsafe extern "C" fn(*mut *mut c_void),
        params: *mut *mut c_void,
        grid: *const c_uint,
        block: *const c_uint,
        dyn_shared_bytes: c_uint,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
}

static LAUNCH: Mutex<()> = Mutex::new(());
const ALIGN: usize = 256; // as cudaMalloc

#[derive(Clone, Copy)]
struct Entry {
    entry: unsafe extern "C" fn(*mut *mut c_void),
    arity: usize,
}

fn table() -> &'static HashMap<&'static str, Entry> {
    static TABLE: OnceLock<HashMap<&'static str, Entry>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut map = HashMap::new();
        for k in emu_tables().into_iter().flatten() {
            let k: &EmuKernel = k;
            // SAFETY: build.rs fills the table with string literals.
            let name = unsafe { CStr::from_ptr(k.name) }
                .to_str()
                .expect("kernel names are ASCII");
            map.insert(
                name,
                Entry {
                    entry: k.entry,
                    arity: k.arity as usize,
                },
            );
        }
        map
    })
}

/// Names of every kernel the emulator can run.
pub fn kernel_names() -> Vec<&'static str> {
    let mut v: Vec<_> = table().keys().copied().collect();
    v.sort();
    v
}

#[derive(Default)]
pub struct Emu {
    /// Live allocations: address -> size in bytes.
    allocs: Mutex<BTreeMap<u64, usize>>,
}

impl Emu {
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks that [ptr, ptr + bytes) lies inside one live allocation.
    fn check(&self, ptr: DevPtr, bytes: usize, what: &str) -> Result<()> {
        let allocs = self.allocs.lock().unwrap();
        match allocs.range(..=ptr).next_back() {
            Some((&base, &size)) if ptr + bytes as u64 <= base + size as u64 => Ok(()),
            _ => bail!("emu: {what} of {bytes} bytes at {ptr:#x} is outside every allocation"),
        }
    }
}

impl Drop for Emu {
    fn drop(&mut self) {
        for (&ptr, &size) in self.allocs.get_mut().unwrap().iter() {
            // SAFETY: allocated in `alloc` with this layout.
            unsafe {
                std::alloc::dealloc(
                    ptr as *mut u8,
                    Layout::from_size_align(size.max(1), ALIGN).unwrap(),
                )
            };
        }
    }
}

impl Driver for Emu {
    fn name(&self) -> String {
        "emu".into()
    }

    fn alloc(&self, bytes: usize) -> Result<DevPtr> {
        let layout =
            Layout::from_size_align(bytes.max(1), ALIGN).context("emu: allocation too large")?;
        // SAFETY: non-zero size.
        let p = unsafe { std::alloc::alloc(layout) };
        if p.is_null() {
            bail!("emu: out of memory allocating {bytes} bytes");
        }
        self.allocs.lock().unwrap().insert(p as u64, bytes);
        Ok(p as u64)
    }

    fn free(&self, ptr: DevPtr) -> Result<()> {
        let size = self
            .allocs
            .lock()
            .unwrap()
            .remove(&ptr)
            .ok_or_else(|| anyhow!("emu: free of {ptr:#x}, not allocated"))?;
        // SAFETY: allocated in `alloc` with this layout.
        unsafe {
            std::alloc::dealloc(
                ptr as *mut u8,
                Layout::from_size_align(size.max(1), ALIGN).unwrap(),
            )
        };
        Ok(())
    }

    fn htod(&self, dst: DevPtr, src: &[u8]) -> Result<()> {
        self.check(dst, src.len(), "copy to device")?;
        // SAFETY: checked to lie inside a live allocation.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    fn dtoh(&self, dst: &mut [u8], src: DevPtr) -> Result<()> {
        self.check(src, dst.len(), "copy from device")?;
        // SAFETY: checked to lie inside a live allocation.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn memset(&self, dst: DevPtr, byte: u8, bytes: usize) -> Result<()> {
        self.check(dst, bytes, "memset")?;
        // SAFETY: checked to lie inside a live allocation.
        unsafe { std::ptr::write_bytes(dst as *mut u8, byte, bytes) };
        Ok(())
    }

    unsafe fn launch(
        &self,
        name: &str,
        grid: [u32; 3],
        block: [u32; 3],
        shared_bytes: u32,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        let k = table()
            .get(name)
            .ok_or_else(|| anyhow!("no kernel named '{name}' in kernels/*.cu"))?;
        if params.len() != k.arity {
            bail!(
                "kernel {name} takes {} parameters, {} given",
                k.arity,
                params.len()
            );
        }
        let mut err = [0 as c_char; 512];
        let _serial = LAUNCH.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the caller vouches for the parameters (see Driver::launch).
        let rc = unsafe {
            mura_emu_launch(
                k.entry,
                params.as_mut_ptr(),
                grid.as_ptr(),
                block.as_ptr(),
                shared_bytes,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if rc != 0 {
            // SAFETY: the runtime writes a NUL-terminated message.
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy();
            bail!("emu: kernel {name}: {msg}");
        }
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn time(&self, work: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        let t = Instant::now();
        work()?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    }
}
