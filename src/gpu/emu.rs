//! Driver 2: the CPU emulator. The same kernels/*.cu, compiled by the host C++ compiler against
//! src/gpu/emu/cuda_emu.h (build.rs), run as fibers by src/gpu/emu/runtime.cpp. Launches are
//! synchronous and serialised (the runtime has one set of fibers).
//! A captured graph is a list of nodes holding what a CUDA graph's nodes hold: a memset's
//! destination, byte and length; a launch's kernel, grid, block, shared bytes and a copy of each
//! parameter's bytes.
//!
//! Device memory is a reserved range of host address space (src/gpu/emu/checks.cpp), and every
//! launch runs under the checkers selected by [`Checks`] (all of them unless `MURA_EMU_CHECKS`
//! says otherwise): memcheck, initcheck and racecheck, which fail the launch with one error
//! naming the kernel, block, thread, address and allocation. With profiling on
//! (`MURA_EMU_PROFILE=1` or [`Emu::with_profile`]) each launch's memory traffic is counted as
//! Nsight Compute counts it ([`profile`]).

pub mod profile;

use super::kernels::{emu_tables, EmuKernel};
use super::record::{Event, Log, Op};
use super::{not_while_capturing, DevPtr, Driver, Error, Launch};
use anyhow::{anyhow, bail, Context, Result};
use profile::{Counters, KernelProfile};
use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

extern "C" {
    fn mura_emu_launch(
        name: *const c_char,
        prev_name: *const c_char,
        prev_clock: u32,
        clock: *mut u32,
        entry: unsafe extern "C" fn(*mut *mut c_void),
        params: *mut *mut c_void,
        grid: *const c_uint,
        block: *const c_uint,
        dyn_shared_bytes: c_uint,
        flags: c_uint,
        counters: *mut Counters,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
    fn mura_emu_alloc(
        bytes: usize,
        poison: c_int,
        out_of_space: *mut c_int,
        err: *mut c_char,
        errlen: usize,
    ) -> u64;
    fn mura_emu_free(ptr: u64);
    fn mura_emu_limits(max_threads: *mut c_uint, max_dyn_shared: *mut c_uint);
    fn mura_emu_written(ptr: u64, bytes: usize);
}

static LAUNCH: Mutex<()> = Mutex::new(());

/// The emulator's checkers, each on or off (src/gpu/emu/checks.cpp describes them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checks {
    /// Every device access in a live allocation, every shared access inside the block's shared
    /// memory, every access naturally aligned.
    pub memcheck: bool,
    /// No device byte read before a copy, memset or store wrote it (fresh allocations are also
    /// poisoned with 0xff).
    pub initcheck: bool,
    /// No unsynchronised conflicting shared accesses within a block, and no plain store to a
    /// device byte that another block of the same launch accesses.
    pub racecheck: bool,
}

impl Checks {
    pub fn all() -> Self {
        Checks {
            memcheck: true,
            initcheck: true,
            racecheck: true,
        }
    }
    pub fn none() -> Self {
        Checks {
            memcheck: false,
            initcheck: false,
            racecheck: false,
        }
    }
    /// `MURA_EMU_CHECKS`: unset or `all` for every checker, `none` (or `off`, `0`) for none, or a
    /// comma-separated list of `memcheck`, `initcheck`, `racecheck`.
    pub fn from_env() -> Result<Self> {
        match std::env::var("MURA_EMU_CHECKS") {
            Err(_) => Ok(Self::all()),
            Ok(v) => Self::parse(&v).with_context(|| format!("MURA_EMU_CHECKS={v}")),
        }
    }
    pub fn parse(v: &str) -> Result<Self> {
        let mut c = Self::none();
        for word in v.split(',').map(str::trim) {
            match word {
                "all" => c = Self::all(),
                "none" | "off" | "0" | "" => {}
                "memcheck" => c.memcheck = true,
                "initcheck" => c.initcheck = true,
                "racecheck" => c.racecheck = true,
                _ => {
                    bail!("unknown checker '{word}': use all, none or memcheck,initcheck,racecheck")
                }
            }
        }
        Ok(c)
    }
    /// The runtime's flag bits (src/gpu/emu/internal.h).
    fn flags(self) -> c_uint {
        self.memcheck as c_uint | (self.initcheck as c_uint) << 1 | (self.racecheck as c_uint) << 2
    }
}

const PROFILE_FLAG: c_uint = 8;
/// The launch is a programmatic dependent one (internal.h `kPdl`).
const PDL_FLAG: c_uint = 16;

#[derive(Clone, Copy)]
struct Entry {
    /// The kernel compiled with the memory hooks (checkers, profiler).
    entry: unsafe extern "C" fn(*mut *mut c_void),
    /// The kernel compiled without them, for launches with every check off (mutants have none).
    plain: Option<unsafe extern "C" fn(*mut *mut c_void)>,
    /// Each parameter's size in bytes (one per parameter).
    param_sizes: &'static [c_int],
}

fn table() -> &'static HashMap<&'static str, Entry> {
    static TABLE: OnceLock<HashMap<&'static str, Entry>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut map = HashMap::new();
        for k in emu_tables().into_iter().flatten() {
            map.insert(kernel_name(k), entry_of(k));
        }
        for k in plain::plain_tables().into_iter().flatten() {
            map.get_mut(kernel_name(k))
                .expect("a plain twin of every kernel")
                .plain = Some(k.entry);
        }
        map
    })
}

fn kernel_name(k: &'static EmuKernel) -> &'static str {
    // SAFETY: build.rs fills the tables with string literals.
    unsafe { CStr::from_ptr(k.name) }
        .to_str()
        .expect("kernel names are ASCII")
}

fn entry_of(k: &'static EmuKernel) -> Entry {
    Entry {
        entry: k.entry,
        plain: None,
        // SAFETY: build.rs points it at `arity` sizes (plus a terminating 0).
        param_sizes: unsafe { std::slice::from_raw_parts(k.param_sizes, k.arity as usize) },
    }
}

/// The streaming multiprocessors the emulator stands for unless told otherwise ([`Emu::with_sms`]):
/// an H100 SXM's. Grids sized from them ([`Driver::sms`]) are the ones that GPU would get.
pub const SMS: usize = 132;

/// Kernel `name`'s name as the kernel tables spell it and its parameters' sizes in bytes.
pub fn signature(name: &str) -> Result<(&'static str, &'static [c_int])> {
    let (&name, k) = table()
        .get_key_value(name)
        .ok_or_else(|| anyhow!("no kernel named '{name}' in kernels/*.cu"))?;
    Ok((name, k.param_sizes))
}

/// What the emulator models of a device (`mura info` prints it): warps of 32 lanes, blocks of
/// at most `max_threads` threads with at most `max_dynamic_shared` bytes of dynamic shared memory
/// (the smallest limit of the GPUs mura targets), run one at a time in an adversarial order.
pub struct Model {
    pub max_threads: u32,
    pub max_dynamic_shared: u32,
}

pub fn model() -> Model {
    let (mut max_threads, mut max_dynamic_shared) = (0, 0);
    // SAFETY: writes two unsigned ints.
    unsafe { mura_emu_limits(&mut max_threads, &mut max_dynamic_shared) };
    Model {
        max_threads,
        max_dynamic_shared,
    }
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
        at: Launch,
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
    unsafe fn launch(name: &'static str, entry: Entry, at: Launch, params: &[*mut c_void]) -> Node {
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
            at,
            data,
            offsets,
        }
    }
}

/// A copy of a kernel file with one planted bug (src/gpu/emu/mutants.txt), for the checkers'
/// mutation suite: its kernels are the file's, renamed `<kernel>__<name>`.
pub struct Mutant {
    pub name: &'static str,
    /// The kernels/ file it mutates.
    pub file: &'static str,
    /// The checker that must catch it.
    pub checker: &'static str,
    kernels: &'static [EmuKernel],
}

// SAFETY: a Mutant's kernel table points only to constant static data that build.rs generated
// (string literals, functions, arrays of sizes), which no one writes.
unsafe impl Sync for Mutant {}
unsafe impl Send for Mutant {}

mod plain {
    use super::EmuKernel;
    include!(concat!(env!("OUT_DIR"), "/emu_plain.rs"));
}

mod mutants {
    use super::{EmuKernel, Mutant};
    include!(concat!(env!("OUT_DIR"), "/emu_mutants.rs"));
}
pub use mutants::mutants;

pub struct Emu {
    /// Live allocations: address -> size in bytes.
    allocs: Mutex<BTreeMap<u64, usize>>,
    /// The nodes recorded so far while a capture is in progress.
    capturing: Mutex<Option<Vec<Node>>>,
    graphs: Mutex<HashMap<u64, Arc<[Node]>>>,
    next_graph: AtomicU64,
    /// The checkers every launch runs under, or why `MURA_EMU_CHECKS` could not be read.
    checks: Result<Checks, String>,
    /// Per kernel, what the profiler counted (None: not profiling).
    profile: Option<Mutex<BTreeMap<&'static str, KernelProfile>>>,
    /// Kernels launched under their own name run the mutant's copy instead (see [`Mutant`]).
    mutant: Option<&'static Mutant>,
    sms: usize,
    /// What ran, when logging ([`Emu::with_log`]).
    log: Option<Mutex<Log>>,
    /// This emulator's stream: its last kernel, which a programmatic dependent launch may overlap.
    stream: Mutex<StreamPos>,
}

/// The last operation of a stream, for the racecheck of programmatic dependent launches: the
/// kernel launched last and the runtime's clock of that launch, or none (`clock` 0) when a copy
/// or memset came after it.
#[derive(Default)]
struct StreamPos {
    clock: u32,
    kernel: Option<&'static str>,
}

impl Default for Emu {
    fn default() -> Self {
        Self::new()
    }
}

impl Emu {
    /// The checkers of `MURA_EMU_CHECKS` (all by default); profiling when `MURA_EMU_PROFILE=1` or
    /// after [`profile::enable`].
    pub fn new() -> Self {
        let emu = Emu {
            allocs: Mutex::default(),
            capturing: Mutex::default(),
            graphs: Mutex::default(),
            next_graph: AtomicU64::default(),
            checks: Checks::from_env().map_err(|e| format!("{e:#}")),
            profile: None,
            mutant: None,
            sms: SMS,
            log: None,
            stream: Mutex::default(),
        };
        emu.with_profile(profile::enabled())
    }

    /// An emulator running every launch under exactly `checks`.
    pub fn with_checks(checks: Checks) -> Self {
        let mut emu = Self::new();
        emu.checks = Ok(checks);
        emu
    }

    /// Counts every launch's memory traffic ([`profile`]) when `on`.
    pub fn with_profile(mut self, on: bool) -> Self {
        self.profile = on.then(Mutex::default);
        self
    }

    /// Grids sized for a card of `sms` streaming multiprocessors ([`Driver::sms`]).
    pub fn with_sms(mut self, sms: usize) -> Self {
        self.sms = sms.max(1);
        self
    }

    /// Logs every launch and memset as it runs (a graph's nodes at each replay), with its
    /// parameters as [`record::Log`] keeps them; [`Emu::executed`] returns the log.
    pub fn with_log(mut self) -> Self {
        self.log = Some(Mutex::default());
        self
    }

    /// What ran since the last call (or since [`Emu::with_log`]); empty when not logging.
    pub fn executed(&self) -> Vec<Event> {
        match &self.log {
            Some(log) => std::mem::take(&mut log.lock().unwrap().events),
            None => Vec::new(),
        }
    }

    /// Appends what `op` of `log` makes to the log, when logging.
    fn note(&self, op: impl FnOnce(&Log) -> Result<Op>) -> Result<()> {
        if let Some(log) = &self.log {
            let mut log = log.lock().unwrap();
            let op = op(&log)?;
            log.events.push(Event { stage: None, op });
        }
        Ok(())
    }

    /// Launches of the kernels of `mutant`'s file run its copies (an error if there is none).
    pub fn with_mutant(mut self, mutant: &str) -> Result<Self> {
        static ALL: OnceLock<Vec<Mutant>> = OnceLock::new();
        let all = ALL.get_or_init(|| mutants().into());
        self.mutant =
            Some(all.iter().find(|m| m.name == mutant).ok_or_else(|| {
                anyhow!("emu: no mutant named '{mutant}' (src/gpu/emu/mutants.txt)")
            })?);
        Ok(self)
    }

    /// What the profiler counted per kernel since this emulator was made (empty unless profiling).
    pub fn profile(&self) -> Vec<(String, KernelProfile)> {
        match &self.profile {
            None => Vec::new(),
            Some(p) => p
                .lock()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
        }
    }

    /// The kernel launched as `name`: the mutant's copy when there is one, else the real one.
    fn resolve(&self, name: &str) -> Result<(&'static str, Entry)> {
        if let Some(m) = self.mutant {
            let renamed = format!("{name}__{}", m.name);
            if let Some(k) = m.kernels.iter().find(|k| kernel_name(k) == renamed) {
                return Ok((kernel_name(k), entry_of(k)));
            }
        }
        let (&name, &k) = table().get_key_value(name).ok_or_else(|| Error::Kernel {
            kernel: name.to_string(),
            message: format!("no kernel named '{name}' in kernels/*.cu"),
        })?;
        Ok((name, k))
    }

    /// Checks that [ptr, ptr + bytes) lies inside one live allocation.
    fn check(&self, ptr: DevPtr, bytes: usize, what: &str) -> Result<()> {
        let allocs = self.allocs.lock().unwrap();
        match allocs.range(..=ptr).next_back() {
            Some((&base, &size)) if ptr + bytes as u64 <= base + size as u64 => Ok(()),
            _ => bail!(Error::Driver {
                call: format!("emu: {what}"),
                message: format!("{bytes} bytes at {ptr:#x} are outside every allocation"),
            }),
        }
    }

    fn not_capturing(&self, what: &str) -> Result<()> {
        match *self.capturing.lock().unwrap() {
            Some(_) => Err(not_while_capturing(&format!("emu: {what}"))),
            None => Ok(()),
        }
    }

    /// Runs kernel `name` now, under this emulator's checks (and profiler).
    ///
    /// # Safety
    /// As [`Driver::launch`], with `params` of the kernel's arity.
    unsafe fn run(
        &self,
        name: &'static str,
        entry: Entry,
        at: Launch,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        let checks = self.checks.as_ref().map_err(|e| anyhow!("emu: {e}"))?;
        let checking = checks.flags()
            | if self.profile.is_some() {
                PROFILE_FLAG
            } else {
                0
            };
        let flags = checking | if at.pdl { PDL_FLAG } else { 0 };
        let cname = CString::new(name).expect("a kernel name is a C identifier");
        let mut stream = self.stream.lock().unwrap();
        let prev = stream
            .kernel
            .map(|k| CString::new(k).expect("a kernel name is a C identifier"));
        let mut clock = 0u32;
        let mut counters = Counters::default();
        let mut err = [0 as c_char; 1024];
        let rc = {
            let _serial = LAUNCH.lock().unwrap_or_else(|e| e.into_inner());
            // SAFETY: the caller vouches for the parameters (see Driver::launch).
            unsafe {
                mura_emu_launch(
                    cname.as_ptr(),
                    prev.as_ref().map_or(std::ptr::null(), |p| p.as_ptr()),
                    stream.clock,
                    &mut clock,
                    match entry.plain {
                        Some(plain) if checking == 0 => plain,
                        _ => entry.entry,
                    },
                    params.as_mut_ptr(),
                    at.grid.as_ptr(),
                    at.block.as_ptr(),
                    at.shared,
                    flags,
                    &mut counters,
                    err.as_mut_ptr(),
                    err.len(),
                )
            }
        };
        *stream = StreamPos {
            clock,
            kernel: Some(name),
        };
        drop(stream);
        if rc != 0 {
            // SAFETY: the runtime writes a NUL-terminated message.
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy();
            bail!(Error::Kernel {
                kernel: name.to_string(),
                message: msg.into_owned(),
            });
        }
        if let Some(p) = &self.profile {
            p.lock().unwrap().entry(name).or_default().add(&counters);
            profile::record(name, &counters);
        }
        // SAFETY: as above.
        self.note(|log| unsafe { log.launch(name, at, params, entry.param_sizes) })
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
        for &ptr in self.allocs.get_mut().unwrap().keys() {
            // SAFETY: allocated by mura_emu_alloc, freed once.
            unsafe { mura_emu_free(ptr) };
        }
    }
}

impl Driver for Emu {
    fn name(&self) -> String {
        "emu".into()
    }

    fn sms(&self) -> usize {
        self.sms
    }

    fn alloc(&self, bytes: usize) -> Result<DevPtr> {
        self.not_capturing("alloc")?;
        let poison = self.checks.as_ref().is_ok_and(|c| c.initcheck);
        let (mut err, mut out_of_space) = ([0 as c_char; 256], 0);
        // SAFETY: the runtime writes a NUL-terminated message into `err` when it fails.
        let p = unsafe {
            mura_emu_alloc(
                bytes,
                poison as c_int,
                &mut out_of_space,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if p == 0 {
            // SAFETY: as above.
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy();
            bail!(match out_of_space {
                0 => Error::Driver {
                    call: "emu: alloc".into(),
                    message: msg.into_owned(),
                },
                _ => Error::OutOfMemory {
                    what: format!("emu: {msg}"),
                },
            });
        }
        self.allocs.lock().unwrap().insert(p, bytes);
        if let Some(log) = &self.log {
            log.lock().unwrap().alloc(p, bytes);
        }
        Ok(p)
    }

    fn free(&self, ptr: DevPtr) -> Result<()> {
        self.not_capturing("free")?;
        self.allocs
            .lock()
            .unwrap()
            .remove(&ptr)
            .ok_or_else(|| anyhow!("emu: free of {ptr:#x}, not allocated"))?;
        // SAFETY: allocated by mura_emu_alloc, freed once (just removed from the live set).
        unsafe { mura_emu_free(ptr) };
        Ok(())
    }

    fn htod(&self, dst: DevPtr, src: &[u8]) -> Result<()> {
        self.not_capturing("copy to device")?;
        self.check(dst, src.len(), "copy to device")?;
        // SAFETY: checked to lie inside a live allocation.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len());
            mura_emu_written(dst, src.len());
        }
        *self.stream.lock().unwrap() = StreamPos::default();
        Ok(())
    }

    fn dtoh(&self, dst: &mut [u8], src: DevPtr) -> Result<()> {
        self.not_capturing("copy from device")?;
        self.check(src, dst.len(), "copy from device")?;
        // SAFETY: checked to lie inside a live allocation.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        *self.stream.lock().unwrap() = StreamPos::default();
        Ok(())
    }

    fn memset(&self, dst: DevPtr, byte: u8, bytes: usize) -> Result<()> {
        self.check(dst, bytes, "memset")?;
        if let Some(nodes) = self.capturing.lock().unwrap().as_mut() {
            nodes.push(Node::Memset { dst, byte, bytes });
            return Ok(());
        }
        // SAFETY: checked to lie inside a live allocation.
        unsafe {
            std::ptr::write_bytes(dst as *mut u8, byte, bytes);
            mura_emu_written(dst, bytes);
        }
        *self.stream.lock().unwrap() = StreamPos::default();
        self.note(|log| Ok(log.memset(dst, byte, bytes)))
    }

    unsafe fn launch(&self, name: &str, at: Launch, params: &mut [*mut c_void]) -> Result<()> {
        let (name, k) = self.resolve(name)?;
        if params.len() != k.param_sizes.len() {
            bail!(Error::Kernel {
                kernel: name.to_string(),
                message: format!(
                    "takes {} parameters, {} given",
                    k.param_sizes.len(),
                    params.len()
                ),
            });
        }
        if let Some(nodes) = self.capturing.lock().unwrap().as_mut() {
            // SAFETY: the caller vouches for the parameters (see Driver::launch).
            nodes.push(unsafe { Node::launch(name, k, at, params) });
            return Ok(());
        }
        // SAFETY: as above.
        unsafe { self.run(name, k, at, params) }
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
                    at,
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
                    unsafe { self.run(name, *entry, *at, &mut params) }
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
