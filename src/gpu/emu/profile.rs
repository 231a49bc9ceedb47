//! The emulator's profiler: per kernel, the memory traffic its launches ask for, counted as
//! Nsight Compute (`ncu`) counts it on a GPU, so the two can be compared metric by metric.
//!
//! How the runtime counts (src/gpu/emu/profile.cpp): each lane logs its global and shared
//! accesses; when lanes converge (a warp collective completes, a `__syncthreads`, the block's
//! end) the k-th execution of one instruction by each lane becomes one warp-level request.
//! - A global request touches the distinct 32-byte sectors its lanes' bytes fall in;
//!   efficiency = bytes requested / (sectors · 32) (1.0: perfectly coalesced; 0.125: each
//!   4-byte lane in a sector of its own).
//! - A shared request needs, per phase (the whole warp for accesses of up to 4 bytes; two
//!   half-warps for 8-byte and four quarter-warps for 16-byte accesses), as many wavefronts as
//!   the most distinct 4-byte words any one of the 32 banks must serve (lanes reading the same
//!   word share it); the ideal is one per phase, and bank conflicts = wavefronts − ideal.
//!   "Ways" = wavefronts / ideal (1: conflict-free; 32: every lane in one bank).
//! - An `ldmatrix` is one request of one phase per 8×8 matrix (its 8 rows of 16 bytes); an
//!   `mma.sync` m16n8k16 is one tensor-core instruction (one HMMA.16816 on sm_80–sm_90).
//!
//! The counts are exact for the emulated instruction stream, deterministic, and the same on any
//! host. Where they can differ from `ncu` on a GPU: instruction counts follow the host compiler's
//! code, not nvcc's (a value the host compiler keeps in a register nvcc may load twice, or the
//! other way round, and it may split or merge accesses differently), so requests may differ
//! while sectors per request and wavefronts per request, which depend only on the addresses a
//! warp touches, agree; atomics are one class (ncu splits `op_atom` from `op_red`); L1/L2 hits
//! and DRAM traffic are not modelled (`ncu`'s sector counts are L1 requests too, before caching).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// One launch's (or a sum of launches') counts. Field order is the runtime's
/// (src/gpu/emu/internal.h `Counters`); each field names its Nsight Compute metric.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Counters {
    /// `l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum`: global load instructions (per warp).
    pub gld_requests: u64,
    /// `l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum`: 32-byte sectors they touch.
    pub gld_sectors: u64,
    /// Bytes the loads' lanes asked for (ncu: `smsp__sass_data_bytes_mem_global_op_ld.sum`).
    pub gld_bytes: u64,
    /// `l1tex__t_requests_pipe_lsu_mem_global_op_st.sum`.
    pub gst_requests: u64,
    /// `l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum`.
    pub gst_sectors: u64,
    /// `smsp__sass_data_bytes_mem_global_op_st.sum`.
    pub gst_bytes: u64,
    /// `l1tex__t_requests_pipe_lsu_mem_global_op_atom.sum` + `..._op_red.sum`.
    pub gatom_requests: u64,
    /// `l1tex__t_sectors_pipe_lsu_mem_global_op_atom.sum` + `..._op_red.sum`.
    pub gatom_sectors: u64,
    pub gatom_bytes: u64,
    /// `l1tex__t_requests_pipe_lsu_mem_global_op_ldgsts.sum`: cp.async (LDGSTS) instructions.
    pub ldgsts_requests: u64,
    /// `l1tex__t_sectors_pipe_lsu_mem_global_op_ldgsts.sum`.
    pub ldgsts_sectors: u64,
    pub ldgsts_bytes: u64,
    /// `smsp__inst_executed_op_shared_ld.sum`: shared load instructions (LDS).
    pub sld_requests: u64,
    /// `l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum`.
    pub sld_wavefronts: u64,
    /// The wavefronts the loads would need without bank conflicts:
    /// `l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum` = wavefronts − this.
    pub sld_ideal: u64,
    /// `smsp__inst_executed_op_shared_st.sum`.
    pub sst_requests: u64,
    /// `l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum`.
    pub sst_wavefronts: u64,
    /// `l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum` = wavefronts − this.
    pub sst_ideal: u64,
    /// `smsp__inst_executed_op_shared_atom.sum`.
    pub satom_requests: u64,
    /// `smsp__inst_executed_op_ldsm.sum`: ldmatrix instructions.
    pub ldsm_requests: u64,
    /// `l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ldsm.sum`.
    pub ldsm_wavefronts: u64,
    /// Conflict-free wavefronts of the ldmatrix instructions (one per 8×8 matrix).
    pub ldsm_ideal: u64,
    /// `smsp__inst_executed_pipe_tensor_op_hmma.sum`: mma.sync instructions (per warp).
    pub hmma: u64,
}

impl Counters {
    fn add(&mut self, o: &Counters) {
        let a: &mut [u64; 23] = bytemuck::cast_mut(self);
        let b: &[u64; 23] = bytemuck::cast_ref(o);
        for (x, y) in a.iter_mut().zip(b) {
            *x += y;
        }
    }
}

impl Counters {
    /// The counts that one Nsight Compute metric measures directly, by that metric's name (as
    /// `ncu --metrics` takes it): global loads and stores (requests and sectors), cp.async, shared
    /// loads and stores (instructions, wavefronts, bank conflicts), ldmatrix and mma.sync.
    pub fn ncu_metrics(&self) -> [(&'static str, u64); 15] {
        [
            (
                "l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum",
                self.gld_requests,
            ),
            (
                "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum",
                self.gld_sectors,
            ),
            (
                "l1tex__t_requests_pipe_lsu_mem_global_op_st.sum",
                self.gst_requests,
            ),
            (
                "l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum",
                self.gst_sectors,
            ),
            (
                "l1tex__t_requests_pipe_lsu_mem_global_op_ldgsts.sum",
                self.ldgsts_requests,
            ),
            (
                "l1tex__t_sectors_pipe_lsu_mem_global_op_ldgsts.sum",
                self.ldgsts_sectors,
            ),
            ("smsp__inst_executed_op_shared_ld.sum", self.sld_requests),
            (
                "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum",
                self.sld_wavefronts,
            ),
            (
                "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum",
                self.sld_wavefronts.saturating_sub(self.sld_ideal),
            ),
            ("smsp__inst_executed_op_shared_st.sum", self.sst_requests),
            (
                "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum",
                self.sst_wavefronts,
            ),
            (
                "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum",
                self.sst_wavefronts.saturating_sub(self.sst_ideal),
            ),
            ("smsp__inst_executed_op_ldsm.sum", self.ldsm_requests),
            (
                "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ldsm.sum",
                self.ldsm_wavefronts,
            ),
            ("smsp__inst_executed_pipe_tensor_op_hmma.sum", self.hmma),
        ]
    }
}

/// What the profiler counted for one kernel over its launches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelProfile {
    pub launches: u64,
    pub counters: Counters,
}

impl KernelProfile {
    pub(super) fn add(&mut self, c: &Counters) {
        self.launches += 1;
        self.counters.add(c);
    }
    /// Global load bytes requested / bytes of the sectors touched (None without loads).
    pub fn gld_efficiency(&self) -> Option<f64> {
        ratio(self.counters.gld_bytes, 32 * self.counters.gld_sectors)
    }
    pub fn gst_efficiency(&self) -> Option<f64> {
        ratio(self.counters.gst_bytes, 32 * self.counters.gst_sectors)
    }
    pub fn ldgsts_efficiency(&self) -> Option<f64> {
        ratio(
            self.counters.ldgsts_bytes,
            32 * self.counters.ldgsts_sectors,
        )
    }
    /// Shared loads' wavefronts / conflict-free wavefronts: the average n of n-way conflicts.
    pub fn sld_ways(&self) -> Option<f64> {
        ratio(self.counters.sld_wavefronts, self.counters.sld_ideal)
    }
    pub fn sst_ways(&self) -> Option<f64> {
        ratio(self.counters.sst_wavefronts, self.counters.sst_ideal)
    }
    pub fn ldsm_ways(&self) -> Option<f64> {
        ratio(self.counters.ldsm_wavefronts, self.counters.ldsm_ideal)
    }
}

fn ratio(a: u64, b: u64) -> Option<f64> {
    (b > 0).then(|| a as f64 / b as f64)
}

/// Every profiled launch of the process (any [`super::Emu`] with profiling on), per kernel.
static ALL: Mutex<BTreeMap<&'static str, KernelProfile>> = Mutex::new(BTreeMap::new());
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Profiles every emulator made from now on in this process (as `MURA_EMU_PROFILE=1` does).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Whether [`enable`] was called or `MURA_EMU_PROFILE=1` is set.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed) || std::env::var("MURA_EMU_PROFILE").is_ok_and(|v| v == "1")
}

pub(super) fn record(kernel: &'static str, c: &Counters) {
    ALL.lock().unwrap().entry(kernel).or_default().add(c);
}

/// What every profiling emulator of this process counted, per kernel.
pub fn all() -> Vec<(String, KernelProfile)> {
    ALL.lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect()
}

/// Everything profiled since the snapshot `before` (taken with [`all`]), summed over kernels:
/// the traffic of the work done in between.
pub fn since(before: &[(String, KernelProfile)]) -> KernelProfile {
    let mut total = KernelProfile::default();
    for (name, now) in all() {
        let was = before
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(KernelProfile::default(), |(_, p)| *p);
        total.launches += now.launches - was.launches;
        let sum: &mut [u64; 23] = bytemuck::cast_mut(&mut total.counters);
        let (a, b): (&[u64; 23], &[u64; 23]) = (
            bytemuck::cast_ref(&now.counters),
            bytemuck::cast_ref(&was.counters),
        );
        for ((t, x), y) in sum.iter_mut().zip(a).zip(b) {
            *t += x - y;
        }
    }
    total
}

/// The legend of [`table`]'s columns.
pub const LEGEND: &str = "Emulator profile (Nsight Compute's definitions, see \
     src/gpu/emu/profile.rs): requests are warp-level instructions, sect/req 32-byte sectors \
     per request, eff = bytes requested / bytes of those sectors, ways = shared wavefronts / \
     conflict-free wavefronts, mma = mma.sync instructions.";

/// Every profiled launch of this process as a [`table`] (no floors), after a line saying what
/// the columns count.
pub fn report() -> String {
    format!(
        "\n{LEGEND} Per kernel, all launches.\n\n{}",
        table(&all(), &|_| None)
    )
}

/// One JSON object per kernel of `profile` (`mura bench --profile --json`): its launches and
/// counts, efficiencies as fractions and ways as wavefronts over the conflict-free ones, as
/// [`table`] shows them (null where the kernel made no such access).
pub fn json(profile: &[(String, KernelProfile)]) -> Vec<serde_json::Value> {
    profile
        .iter()
        .map(|(name, p)| {
            let c = &p.counters;
            serde_json::json!({
                "kernel": name,
                "launches": p.launches,
                "ld_requests": c.gld_requests,
                "ld_sectors": c.gld_sectors,
                "ld_efficiency": p.gld_efficiency(),
                "st_requests": c.gst_requests,
                "st_sectors": c.gst_sectors,
                "st_efficiency": p.gst_efficiency(),
                "atomic_requests": c.gatom_requests,
                "cp_async_requests": c.ldgsts_requests,
                "cp_async_efficiency": p.ldgsts_efficiency(),
                "shared_ld_requests": c.sld_requests,
                "shared_ld_ways": p.sld_ways(),
                "shared_st_requests": c.sst_requests,
                "shared_st_ways": p.sst_ways(),
                "ldmatrix": c.ldsm_requests,
                "ldmatrix_ways": p.ldsm_ways(),
                "mma": c.hmma,
            })
        })
        .collect()
}

/// The profile as a markdown table, one row per kernel, with the caller's roofline floor of
/// each kernel (µs per launch) where `floor_us` knows it.
pub fn table(
    profile: &[(String, KernelProfile)],
    floor_us: &dyn Fn(&str) -> Option<f64>,
) -> String {
    let mut s = String::from(
        "| kernel | launches | global ld req | sect/req | eff | global st req | sect/req | eff \
         | atomics | cp.async req | eff | shared ld req | ways | shared st req | ways \
         | ldmatrix | ways | mma | floor µs |\n\
         |---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    for (name, p) in profile {
        let c = &p.counters;
        let per = |a: u64, b: u64| ratio(a, b).map_or("-".into(), |r| format!("{r:.1}"));
        let pct = |r: Option<f64>| r.map_or("-".into(), |r| format!("{:.0}%", 100.0 * r));
        let ways = |r: Option<f64>| r.map_or("-".into(), |r| format!("{r:.2}"));
        let floor = floor_us(name).map_or("-".into(), |f| format!("{f:.1}"));
        writeln!(
            s,
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {floor} |",
            p.launches,
            c.gld_requests,
            per(c.gld_sectors, c.gld_requests),
            pct(p.gld_efficiency()),
            c.gst_requests,
            per(c.gst_sectors, c.gst_requests),
            pct(p.gst_efficiency()),
            c.gatom_requests,
            c.ldgsts_requests,
            pct(p.ldgsts_efficiency()),
            c.sld_requests,
            ways(p.sld_ways()),
            c.sst_requests,
            ways(p.sst_ways()),
            c.ldsm_requests,
            ways(p.ldsm_ways()),
            c.hmma,
        )
        .unwrap();
    }
    s
}
