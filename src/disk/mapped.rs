//! Memory-mapped files that another program may cut short under us.
//!
//! mura never writes a mapped file in place (a store changes by a new generation), but another
//! program can: truncating a store's `images.bin` while a command reads it makes the next read of
//! a page past the new end a SIGBUS, which would kill the command with no word. Every mapping is
//! therefore made through [`Mapped::map`], which registers its address range and a ready-made
//! message; [`install_fault_handler`] (called first thing by `main`) catches a SIGBUS inside a
//! registered range and ends the command with that one line and exit status 1. What mura had
//! committed to disk before is intact (every write commits in one rename). A SIGBUS anywhere else
//! is left to the default action.

use anyhow::{Context, Result};
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

/// A registered mapping: its address range and the message for a fault inside it.
struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    message: AtomicPtr<u8>,
    message_len: AtomicUsize,
}

const SLOTS: usize = 64;

static MAPPINGS: [Slot; SLOTS] = [const {
    Slot {
        start: AtomicUsize::new(0),
        len: AtomicUsize::new(0),
        message: AtomicPtr::new(std::ptr::null_mut()),
        message_len: AtomicUsize::new(0),
    }
}; SLOTS];

/// A read-only memory map of a file, registered for [`install_fault_handler`] while it lives.
pub struct Mapped {
    map: memmap2::Mmap,
    slot: Option<usize>,
}

impl Mapped {
    /// Maps `file` (opened from `path`) read-only.
    pub fn map(file: &File, path: &Path) -> Result<Mapped> {
        // SAFETY: read-only; mura never writes a mapped file, and a file another program cuts
        // short faults into the handler below, which ends the command with a message.
        let map = unsafe { memmap2::Mmap::map(file) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        let message = format!(
            "error: {} was cut short while mura read it (another program rewrote or truncated \
             it in place?); stopped; what mura had written before is intact\n",
            crate::out::escape(&path.display().to_string())
        );
        let slot = register(map.as_ptr() as usize, map.len(), message);
        Ok(Mapped { map, slot })
    }
}

impl std::ops::Deref for Mapped {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            let s = &MAPPINGS[i];
            s.len.store(0, Ordering::SeqCst);
            let msg = s.message.swap(std::ptr::null_mut(), Ordering::SeqCst);
            let len = s.message_len.load(Ordering::SeqCst);
            s.start.store(0, Ordering::SeqCst);
            if !msg.is_null() {
                // SAFETY: made from a leaked Box<[u8]> of this length in `register`.
                drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(msg, len)) });
            }
        }
    }
}

/// Takes a free slot for the range `[start, start + len)`; `None` when all are taken (the
/// mapping then works, without a message on a fault).
fn register(start: usize, len: usize, message: String) -> Option<usize> {
    if len == 0 {
        return None;
    }
    for (i, s) in MAPPINGS.iter().enumerate() {
        // A claimed slot has start 1 until it is filled.
        if s.start
            .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            let bytes = message.into_bytes().into_boxed_slice();
            s.message_len.store(bytes.len(), Ordering::SeqCst);
            s.message
                .store(Box::into_raw(bytes) as *mut u8, Ordering::SeqCst);
            s.len.store(len, Ordering::SeqCst);
            s.start.store(start, Ordering::SeqCst);
            return Some(i);
        }
    }
    None
}

/// The SIGBUS handler: the message of the mapping that holds the faulting address, then
/// `_exit(1)`; a fault outside every mapping goes back to the default action.
extern "C" fn on_fault(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for s in &MAPPINGS {
        let (start, len) = (s.start.load(Ordering::SeqCst), s.len.load(Ordering::SeqCst));
        if start > 1 && addr >= start && addr - start < len {
            let msg = s.message.load(Ordering::SeqCst);
            let n = s.message_len.load(Ordering::SeqCst);
            // SAFETY: write(2) and _exit(2) are async-signal-safe; msg points to n bytes.
            unsafe {
                if !msg.is_null() {
                    libc::write(2, msg as *const libc::c_void, n);
                }
                libc::_exit(1);
            }
        }
    }
    // SAFETY: restoring the default action; the faulting access then repeats and kills us as
    // SIGBUS would have.
    unsafe {
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
    }
}

/// Installs the SIGBUS handler for registered mappings (see the module's text).
pub fn install_fault_handler() {
    // SAFETY: a zeroed sigaction with a handler of the SA_SIGINFO signature.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_fault as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
}
