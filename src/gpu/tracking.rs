//! A driver wrapper that counts device memory: bytes live now, the peak since creation (or the
//! last reset), and allocation calls; optionally refusing allocations beyond a limit, or failing
//! one allocation with a given error, so that running out of memory, or a driver fault where an
//! allocation was expected, can be tested on any executor.

use super::{DevPtr, Driver, Error, Launch};
use crate::model::schedule::Stage;
use anyhow::{bail, Result};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Counts {
    live: HashMap<DevPtr, usize>,
    current: usize,
    peak: usize,
    allocs: u64,
}

pub struct Tracking {
    inner: Arc<dyn Driver>,
    limit: Option<usize>,
    /// The allocation call (counting from 1) that fails, and with what.
    fault: Option<(u64, Error)>,
    counts: Mutex<Counts>,
}

impl Tracking {
    pub fn new(inner: Arc<dyn Driver>) -> Self {
        Self::with_limit(inner, None)
    }
    /// Allocations that would take the live total past `limit` bytes fail as out of memory.
    pub fn with_limit(inner: Arc<dyn Driver>, limit: Option<usize>) -> Self {
        Tracking {
            inner,
            limit,
            fault: None,
            counts: Mutex::default(),
        }
    }
    /// The `n`-th allocation call (counting from 1) fails with `error` and allocates nothing.
    pub fn failing(inner: Arc<dyn Driver>, n: u64, error: Error) -> Self {
        Tracking {
            fault: Some((n, error)),
            ..Self::new(inner)
        }
    }
    /// Bytes allocated through this driver and not yet freed.
    pub fn current_bytes(&self) -> usize {
        self.counts.lock().unwrap().current
    }
    /// The largest `current_bytes` seen.
    pub fn peak_bytes(&self) -> usize {
        self.counts.lock().unwrap().peak
    }
    /// Allocation calls so far.
    pub fn alloc_calls(&self) -> u64 {
        self.counts.lock().unwrap().allocs
    }
}

impl Driver for Tracking {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn sms(&self) -> usize {
        self.inner.sms()
    }
    fn stage(&self, stage: Stage) {
        self.inner.stage(stage)
    }
    fn alloc(&self, bytes: usize) -> Result<DevPtr> {
        let mut c = self.counts.lock().unwrap();
        c.allocs += 1;
        if let Some((_, e)) = self.fault.as_ref().filter(|(n, _)| *n == c.allocs) {
            bail!(e.clone());
        }
        if let Some(limit) = self.limit.filter(|&l| c.current + bytes > l) {
            bail!(Error::OutOfMemory {
                what: format!(
                    "{bytes} bytes requested on {}, {} of the {limit} allowed in use",
                    self.inner.name(),
                    c.current
                ),
            });
        }
        let p = self.inner.alloc(bytes)?;
        c.live.insert(p, bytes);
        c.current += bytes;
        c.peak = c.peak.max(c.current);
        Ok(p)
    }
    fn free(&self, ptr: DevPtr) -> Result<()> {
        self.inner.free(ptr)?;
        let mut c = self.counts.lock().unwrap();
        if let Some(bytes) = c.live.remove(&ptr) {
            c.current -= bytes;
        }
        Ok(())
    }
    fn htod(&self, dst: DevPtr, src: &[u8]) -> Result<()> {
        self.inner.htod(dst, src)
    }
    fn dtoh(&self, dst: &mut [u8], src: DevPtr) -> Result<()> {
        self.inner.dtoh(dst, src)
    }
    fn memset(&self, dst: DevPtr, byte: u8, bytes: usize) -> Result<()> {
        self.inner.memset(dst, byte, bytes)
    }
    unsafe fn launch(&self, name: &str, at: Launch, params: &mut [*mut c_void]) -> Result<()> {
        // SAFETY: forwarded unchanged; the caller's contract is the inner driver's.
        unsafe { self.inner.launch(name, at, params) }
    }
    fn synchronize(&self) -> Result<()> {
        self.inner.synchronize()
    }
    fn time(&self, work: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        self.inner.time(work)
    }
    // The inner driver refuses allocations and frees while capturing, so the counts stay exact:
    // a graph's memory is whatever was allocated before its capture.
    fn capture(&self, work: &mut dyn FnMut() -> Result<()>) -> Result<u64> {
        self.inner.capture(work)
    }
    fn replay(&self, graph: u64) -> Result<()> {
        self.inner.replay(graph)
    }
    fn free_graph(&self, graph: u64) -> Result<()> {
        self.inner.free_graph(graph)
    }
    fn graph_count(&self) -> usize {
        self.inner.graph_count()
    }
}
