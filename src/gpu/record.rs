//! Driver 3: the recorder, for launch plans. It runs nothing and allocates nothing: it hands out
//! addresses (never reused), checks copies and memsets against them as the emulator does, and
//! records every launch and memset, with the [`Stage`] the GPU model marked it with and a copy
//! of its parameters, in the order a stream would run them (a captured graph's nodes again at
//! each replay). The GPU model runs on it exactly as on CUDA, through the same code path, so the
//! record is the launch sequence a GPU would get, for any network, batch and input size, on any
//! machine ([`super::launch_plan`]).
//!
//! The record's parameters are machine-independent: a pointer is kept as the allocation it
//! points into (numbered in allocation order) and its offset there, so the recorder's record and
//! the emulator's log of what it executed ([`super::emu::Emu::with_log`]) can be compared launch
//! for launch.

use super::{emu, not_while_capturing, DevPtr, Driver, Launch};
use crate::model::schedule::Stage;
use anyhow::{anyhow, bail, Result};
use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_int, c_void};
use std::sync::{Arc, Mutex};

/// A launch parameter as recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arg {
    /// A 4-byte value (an `int` or a `float`), bit for bit.
    Value(u32),
    /// A null pointer.
    Null,
    /// A pointer into the `alloc`-th allocation (from 0, in allocation order), `offset` bytes in.
    Addr { alloc: usize, offset: u64 },
    /// A pointer into no live allocation (never made by a checked launcher).
    Stray(u64),
}

/// One recorded kernel launch.
#[derive(Clone, Debug, PartialEq)]
pub struct Launched {
    pub kernel: &'static str,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    /// Dynamic shared bytes.
    pub shared: u32,
    /// A programmatic dependent launch ([`Launch::pdl`]).
    pub pdl: bool,
    pub args: Vec<Arg>,
}

impl Launched {
    pub fn blocks(&self) -> u64 {
        self.grid.iter().map(|&g| g as u64).product()
    }
    pub fn threads(&self) -> u32 {
        self.block.iter().product()
    }
}

/// One recorded operation of a stream.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    Launch(Launched),
    Memset { dst: Arg, byte: u8, bytes: usize },
}

/// A recorded operation and the stage it was marked with (None: the driver had no marks).
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub stage: Option<Stage>,
    pub op: Op,
}

/// A stream's record: the allocations (to turn pointers into [`Arg::Addr`]) and the operations.
#[derive(Default)]
pub struct Log {
    /// Every allocation made, live or freed: base → (bytes, number).
    allocs: BTreeMap<DevPtr, (usize, usize)>,
    pub events: Vec<Event>,
}

impl Log {
    /// Notes an allocation of `bytes` at `ptr` (addresses are never reused).
    pub fn alloc(&mut self, ptr: DevPtr, bytes: usize) {
        let n = self.allocs.len();
        self.allocs.insert(ptr, (bytes, n));
    }

    /// `ptr` as an allocation and offset.
    pub fn addr(&self, ptr: DevPtr) -> Arg {
        if ptr == 0 {
            return Arg::Null;
        }
        match self.allocs.range(..=ptr).next_back() {
            Some((&base, &(bytes, alloc))) if ptr - base <= bytes as u64 => Arg::Addr {
                alloc,
                offset: ptr - base,
            },
            _ => Arg::Stray(ptr),
        }
    }

    /// A launch as an [`Op`], its parameters read through `params` (of the sizes `sizes`: 8-byte
    /// ones are pointers, 4-byte ones values).
    ///
    /// # Safety
    /// `params[i]` must point to `sizes[i]` readable bytes.
    pub unsafe fn launch(
        &self,
        kernel: &'static str,
        at: Launch,
        params: &[*mut c_void],
        sizes: &[c_int],
    ) -> Result<Op> {
        let args = params
            .iter()
            .zip(sizes)
            .map(|(&p, &size)| match size {
                // SAFETY: the caller's promise.
                4 => Ok(Arg::Value(unsafe { (p as *const u32).read_unaligned() })),
                8 => Ok(self.addr(unsafe { (p as *const u64).read_unaligned() })),
                s => bail!("kernel {kernel}: a {s}-byte parameter"),
            })
            .collect::<Result<_>>()?;
        Ok(Op::Launch(Launched {
            kernel,
            grid: at.grid,
            block: at.block,
            shared: at.shared,
            pdl: at.pdl,
            args,
        }))
    }

    /// A memset as an [`Op`].
    pub fn memset(&self, dst: DevPtr, byte: u8, bytes: usize) -> Op {
        Op::Memset {
            dst: self.addr(dst),
            byte,
            bytes,
        }
    }
}

/// The recording driver (module docs).
pub struct Recorder {
    sms: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    log: Log,
    /// Live allocations: base → bytes.
    live: BTreeMap<DevPtr, usize>,
    next: DevPtr,
    stage: Option<Stage>,
    /// The events of the capture in progress.
    capturing: Option<Vec<Event>>,
    graphs: HashMap<u64, Arc<[Event]>>,
    next_graph: u64,
}

/// Where the recorder's addresses start, and the gap after each allocation.
const BASE: DevPtr = 1 << 40;
const GAP: u64 = 256;

impl Recorder {
    /// A recorder standing for a card of `sms` streaming multiprocessors.
    pub fn new(sms: usize) -> Recorder {
        Recorder {
            sms: sms.max(1),
            state: Mutex::new(State {
                next: BASE,
                ..State::default()
            }),
        }
    }

    /// The events recorded since the last call (or since creation), leaving the record empty.
    pub fn take(&self) -> Vec<Event> {
        std::mem::take(&mut self.state.lock().unwrap().log.events)
    }

    /// Records `op` at the current stage: into the capture in progress, or the stream.
    fn record(&self, s: &mut State, op: Op) {
        let e = Event { stage: s.stage, op };
        match s.capturing.as_mut() {
            Some(nodes) => nodes.push(e),
            None => s.log.events.push(e),
        }
    }

    fn not_capturing(s: &State, what: &str) -> Result<()> {
        match s.capturing {
            Some(_) => Err(not_while_capturing(&format!("recorder: {what}"))),
            None => Ok(()),
        }
    }

    /// Checks that [ptr, ptr + bytes) lies inside one live allocation.
    fn check(s: &State, ptr: DevPtr, bytes: usize, what: &str) -> Result<()> {
        match s.live.range(..=ptr).next_back() {
            Some((&base, &size)) if ptr + bytes as u64 <= base + size as u64 => Ok(()),
            _ => bail!("recorder: {what} of {bytes} bytes at {ptr:#x} is outside every allocation"),
        }
    }
}

impl Driver for Recorder {
    fn name(&self) -> String {
        format!("recorder ({} SMs)", self.sms)
    }

    fn sms(&self) -> usize {
        self.sms
    }

    fn stage(&self, stage: Stage) {
        self.state.lock().unwrap().stage = Some(stage);
    }

    fn alloc(&self, bytes: usize) -> Result<DevPtr> {
        let mut s = self.state.lock().unwrap();
        Self::not_capturing(&s, "alloc")?;
        let ptr = s.next;
        let span = (bytes.max(1) as u64).next_multiple_of(GAP) + GAP;
        s.next = ptr
            .checked_add(span)
            .ok_or_else(|| anyhow!("recorder: out of addresses"))?;
        s.live.insert(ptr, bytes);
        s.log.alloc(ptr, bytes);
        Ok(ptr)
    }

    fn free(&self, ptr: DevPtr) -> Result<()> {
        let mut s = self.state.lock().unwrap();
        Self::not_capturing(&s, "free")?;
        s.live
            .remove(&ptr)
            .map(drop)
            .ok_or_else(|| anyhow!("recorder: free of {ptr:#x}, not allocated"))
    }

    fn htod(&self, dst: DevPtr, src: &[u8]) -> Result<()> {
        let s = self.state.lock().unwrap();
        Self::not_capturing(&s, "copy to device")?;
        Self::check(&s, dst, src.len(), "copy to device")
    }

    /// Nothing ran, so what comes back is zeros.
    fn dtoh(&self, dst: &mut [u8], src: DevPtr) -> Result<()> {
        let s = self.state.lock().unwrap();
        Self::not_capturing(&s, "copy from device")?;
        Self::check(&s, src, dst.len(), "copy from device")?;
        dst.fill(0);
        Ok(())
    }

    fn memset(&self, dst: DevPtr, byte: u8, bytes: usize) -> Result<()> {
        let mut s = self.state.lock().unwrap();
        Self::check(&s, dst, bytes, "memset")?;
        let op = s.log.memset(dst, byte, bytes);
        self.record(&mut s, op);
        Ok(())
    }

    unsafe fn launch(&self, name: &str, at: Launch, params: &mut [*mut c_void]) -> Result<()> {
        let (kernel, sizes) = emu::signature(name)?;
        if params.len() != sizes.len() {
            bail!(
                "kernel {kernel} takes {} parameters, {} given",
                sizes.len(),
                params.len()
            );
        }
        let mut s = self.state.lock().unwrap();
        // SAFETY: the caller vouches for the parameters (see Driver::launch).
        let op = unsafe { s.log.launch(kernel, at, params, sizes)? };
        self.record(&mut s, op);
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Self::not_capturing(&self.state.lock().unwrap(), "synchronize")
    }

    /// Records `work`; nothing runs, so no time passes.
    fn time(&self, work: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        Self::not_capturing(&self.state.lock().unwrap(), "time")?;
        work()?;
        Ok(0.0)
    }

    fn capture(&self, work: &mut dyn FnMut() -> Result<()>) -> Result<u64> {
        {
            let mut s = self.state.lock().unwrap();
            if s.capturing.is_some() {
                return Err(not_while_capturing("recorder: a nested capture"));
            }
            s.capturing = Some(Vec::new());
        }
        let worked = work();
        let mut s = self.state.lock().unwrap();
        let nodes = s.capturing.take().unwrap_or_default();
        worked?;
        s.next_graph += 1;
        let id = s.next_graph;
        s.graphs.insert(id, nodes.into());
        Ok(id)
    }

    fn replay(&self, graph: u64) -> Result<()> {
        let mut s = self.state.lock().unwrap();
        Self::not_capturing(&s, "replay")?;
        let nodes =
            s.graphs.get(&graph).cloned().ok_or_else(|| {
                anyhow!("recorder: replay of graph {graph}, which does not exist")
            })?;
        s.log.events.extend(nodes.iter().cloned());
        Ok(())
    }

    fn free_graph(&self, graph: u64) -> Result<()> {
        let mut s = self.state.lock().unwrap();
        Self::not_capturing(&s, "free of a graph")?;
        match s.graphs.remove(&graph) {
            Some(_) => Ok(()),
            None => bail!("recorder: free of graph {graph}, which does not exist"),
        }
    }

    fn graph_count(&self) -> usize {
        self.state.lock().unwrap().graphs.len()
    }
}
