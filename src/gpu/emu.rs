//! Driver 2: the CPU emulator. The same kernels/*.cu, compiled by the host C++ compiler against
//! src/gpu/emu/cuda_emu.h (build.rs), run as fibers by src/gpu/emu/runtime.cpp. Device memory is
//! host memory; launches are synchronous and serialised (the runtime has one set of fibers).
//! A captured graph is a list of nodes holding what a CUDA graph's nodes hold: a memset's
//! destination, byte and length; a launch's kernel, grid, block, shared bytes and a copy of each
//! parameter's bytes.

use super::kernels::{emu_tables, EmuKernel};
use super::{not_while_capturing, DevPtr, Driver};
use anyhow::{anyhow, bail, Context, Result};
use std::alloc::Layout;
use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
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
    /// Each parameter's size in bytes (one per parameter).
    param_sizes: &'static [c_int],
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
            // SAFETY: build.rs points it at `arity` sizes (plus a terminating 0).
            let param_sizes =
                unsafe { std::slice::from_raw_parts(k.param_sizes, k.arity as usize) };
            map.insert(
                name,
                Entry {
                    entry: k.entry,
                    param_sizes,
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

/// One recorded operation of a graph.
enum Node {
    Memset {
        dst: DevPtr,
        byte: u8,
        bytes: usize,
    },
    Launch {
        name: &'static str,
        entry: Entry,
        grid: [u32; 3],
        block: [u32; 3],
        shared_bytes: u32,
        /// The parameters' bytes, parameter `i` at byte offset `offsets[i]` (16-byte aligned, so
        /// every parameter type is properly aligned).
        data: Vec<u128>,
        offsets: Vec<usize>,
    },
}

impl Node {
    /// A launch node with a copy of each parameter's value.
    ///
    /// # Safety
    /// `params[i]` must point to `entry.param_sizes[i]` readable bytes.
    unsafe fn launch(
        name: &'static str,
        entry: Entry,
        grid: [u32; 3],
        block: [u32; 3],
        shared_bytes: u32,
        params: &[*mut c_void],
    ) -> Node {
        let mut offsets = Vec::with_capacity(params.len());
        let mut end = 0;
        for &size in entry.param_sizes {
            offsets.push(end);
            end += (size as usize).next_multiple_of(16);
        }
        let mut data = vec![0u128; end / 16];
        let base = data.as_mut_ptr() as *mut u8;
        for ((&p, &size), &off) in params.iter().zip(entry.param_sizes).zip(&offsets) {
            // SAFETY: the caller vouches for the source; the destination has room by construction.
            unsafe { std::ptr::copy_nonoverlapping(p as *const u8, base.add(off), size as usize) };
        }
        Node::Launch {
            name,
            entry,
            grid,
            block,
            shared_bytes,
            data,
            offsets,
        }
    }
}

#[derive(Default)]
pub struct Emu {
    /// Live allocations: address -> size in bytes.
    allocs: Mutex<BTreeMap<u64, usize>>,
    /// The nodes recorded so far while a capture is in progress.
    capturing: Mutex<Option<Vec<Node>>>,
    graphs: Mutex<HashMap<u64, Arc<[Node]>>>,
    next_graph: AtomicU64,
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

    fn not_capturing(&self, what: &str) -> Result<()> {
        match *self.capturing.lock().unwrap() {
            Some(_) => Err(not_while_capturing(&format!("emu: {what}"))),
            None => Ok(()),
        }
    }

    /// Runs kernel `name` now.
    ///
    /// # Safety
    /// As [`Driver::launch`], with `params` of the kernel's arity.
    unsafe fn run(
        name: &str,
        entry: Entry,
        grid: [u32; 3],
        block: [u32; 3],
        shared_bytes: u32,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        let mut err = [0 as c_char; 512];
        let _serial = LAUNCH.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the caller vouches for the parameters (see Driver::launch).
        let rc = unsafe {
            mura_emu_launch(
                entry.entry,
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
}

/// Ends the capture in progress on drop, whatever way `work` left (error or panic).
struct EndCapture<'a>(&'a Mutex<Option<Vec<Node>>>);

impl EndCapture<'_> {
    fn nodes(&self) -> Vec<Node> {
        self.0.lock().unwrap().take().unwrap_or_default()
    }
}

impl Drop for EndCapture<'_> {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
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
        self.not_capturing("alloc")?;
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
        self.not_capturing("free")?;
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
        self.not_capturing("copy to device")?;
        self.check(dst, src.len(), "copy to device")?;
        // SAFETY: checked to lie inside a live allocation.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    fn dtoh(&self, dst: &mut [u8], src: DevPtr) -> Result<()> {
        self.not_capturing("copy from device")?;
        self.check(src, dst.len(), "copy from device")?;
        // SAFETY: checked to lie inside a live allocation.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn memset(&self, dst: DevPtr, byte: u8, bytes: usize) -> Result<()> {
        self.check(dst, bytes, "memset")?;
        if let Some(nodes) = self.capturing.lock().unwrap().as_mut() {
            nodes.push(Node::Memset { dst, byte, bytes });
            return Ok(());
        }
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
        let (&name, &k) = table()
            .get_key_value(name)
            .ok_or_else(|| anyhow!("no kernel named '{name}' in kernels/*.cu"))?;
        if params.len() != k.param_sizes.len() {
            bail!(
                "kernel {name} takes {} parameters, {} given",
                k.param_sizes.len(),
                params.len()
            );
        }
        if let Some(nodes) = self.capturing.lock().unwrap().as_mut() {
            // SAFETY: the caller vouches for the parameters (see Driver::launch).
            nodes.push(unsafe { Node::launch(name, k, grid, block, shared_bytes, params) });
            return Ok(());
        }
        // SAFETY: as above.
        unsafe { Self::run(name, k, grid, block, shared_bytes, params) }
    }

    fn synchronize(&self) -> Result<()> {
        self.not_capturing("synchronize")
    }

    fn time(&self, work: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        self.not_capturing("time")?;
        let t = Instant::now();
        work()?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    }

    fn capture(&self, work: &mut dyn FnMut() -> Result<()>) -> Result<u64> {
        {
            let mut capturing = self.capturing.lock().unwrap();
            if capturing.is_some() {
                return Err(not_while_capturing("emu: a nested capture"));
            }
            *capturing = Some(Vec::new());
        }
        let end = EndCapture(&self.capturing);
        work()?;
        let nodes = end.nodes();
        let id = self.next_graph.fetch_add(1, Ordering::Relaxed) + 1;
        self.graphs.lock().unwrap().insert(id, nodes.into());
        Ok(id)
    }

    fn replay(&self, graph: u64) -> Result<()> {
        self.not_capturing("replay")?;
        let nodes = self
            .graphs
            .lock()
            .unwrap()
            .get(&graph)
            .cloned()
            .ok_or_else(|| anyhow!("emu: replay of graph {graph}, which does not exist"))?;
        for node in nodes.iter() {
            match node {
                &Node::Memset { dst, byte, bytes } => self.memset(dst, byte, bytes),
                Node::Launch {
                    name,
                    entry,
                    grid,
                    block,
                    shared_bytes,
                    data,
                    offsets,
                } => {
                    let base = data.as_ptr() as *mut u8;
                    // The kernel reads its parameters through these and never writes them.
                    // SAFETY: each offset lies inside `data`.
                    let mut params: Vec<*mut c_void> = offsets
                        .iter()
                        .map(|&o| unsafe { base.add(o) } as *mut c_void)
                        .collect();
                    // SAFETY: the parameters were vouched for at capture; the buffers they point
                    // to must still be live, as on CUDA.
                    unsafe { Self::run(name, *entry, *grid, *block, *shared_bytes, &mut params) }
                }
            }
            .with_context(|| format!("replaying graph {graph}"))?;
        }
        Ok(())
    }

    fn free_graph(&self, graph: u64) -> Result<()> {
        self.not_capturing("free of a graph")?;
        match self.graphs.lock().unwrap().remove(&graph) {
            Some(_) => Ok(()),
            None => bail!("emu: free of graph {graph}, which does not exist"),
        }
    }

    fn graph_count(&self) -> usize {
        self.graphs.lock().unwrap().len()
    }
}
