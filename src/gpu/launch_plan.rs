//! The launch plan of one training step and one eval forward (`mura bench --plan`): every kernel
//! launch and memset the GPU model queues, recorded by the [`Recorder`] through the very code
//! the CUDA path runs (captured graphs replayed included), nothing run and nothing allocated on
//! any device. Each launch comes with its stage, grid, block and shared memory, the blocks an SM
//! holds at once (from ptxas's registers and shared memory for one architecture, when the build
//! had nvcc), the waves it takes on a card of `sms` SMs, and the floor of the work it does: the
//! roofline's floor ([`crate::roofline`]) of each launch of the step's minimal design, given to
//! the launch that does that work (a convolution's to its kernel, a statistics pass's to the
//! kernel that sums them, usually the producing convolution's epilogue). Launches that do no such
//! work (coefficients, merges, fix-ups, finishing passes) have a floor of 0.
//!
//! A launch costs at least [`LAUNCH_S`] whatever its work, so the step takes at least
//! `launch_bound` = Σ max(floor, [`LAUNCH_S`]) over its launches, against `floor` = Σ floor.

use super::kernels::{self, PtxasEntry};
use super::model::{Engine, GpuDenseNet};
use super::record::{Event, Launched, Op, Recorder};
use super::Driver;
use crate::model::schedule::Stage;
use crate::model::DenseNet;
use crate::net::Net;
use crate::ops::augment::AugParams;
use crate::ops::Mode;
use crate::optim::Adam;
use crate::precision::Precision;
use crate::roofline::{self, Machine, Op as Work, Pass as WorkPass, Work as Unit};
use crate::spec::DenseNetSpec;
use anyhow::{bail, Context, Result};
use half::bf16;
use std::sync::Arc;

/// The least one kernel launch costs, whatever its work: even replayed from a CUDA graph, a node's overhead plus the ramp-up and drain of its grid are about
/// 2 µs on an H100 (and more for a grid that leaves SMs idle). An assumption, not a measurement
/// of this code: the figure a launch plan's `launch_bound` is computed with.
pub const LAUNCH_S: f64 = 2e-6;

/// The batch sizes a plan accepts (a plan serves every smaller batch, and sizing the split-K
/// workspace visits each).
pub const MAX_BATCH: usize = 4096;

/// Which part of a plan a launch belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanPass {
    /// One training step: zero the gradients, forward, backward, Adam.
    Train,
    /// One eval forward with fixed weights.
    Eval,
}

impl PlanPass {
    pub fn name(self) -> &'static str {
        match self {
            PlanPass::Train => "train",
            PlanPass::Eval => "eval",
        }
    }
}

/// What bounds the blocks one SM holds at once, per architecture (CUDA C++ Programming Guide,
/// "Compute Capabilities"; shared memory with the largest carveout).
#[derive(Clone, Copy, Debug)]
struct SmLimits {
    threads: u32,
    blocks: u32,
    regs: u32,
    smem: u32,
}

/// Registers are allocated per warp in units of 256, from 4 sub-partitions of a quarter of the
/// register file each; shared memory in units of 128 bytes, with 1 KiB reserved per block.
const REG_UNIT: u32 = 256;
const SUB_PARTITIONS: u32 = 4;
const SMEM_UNIT: u32 = 128;
const SMEM_RESERVED: u32 = 1024;

/// The architectures build.rs compiles SASS for (`sm_80`, `sm_86`, `sm_89`, `sm_90`).
fn limits(arch: &str) -> Option<SmLimits> {
    let (threads, blocks, smem_kib) = match arch {
        "sm_80" => (2048, 32, 164),
        "sm_86" => (1536, 16, 100),
        "sm_89" => (1536, 24, 100),
        "sm_90" => (2048, 32, 228),
        _ => return None,
    };
    Some(SmLimits {
        threads,
        blocks,
        regs: 65536,
        smem: smem_kib * 1024,
    })
}

/// Blocks of `threads` threads with `regs` registers each and `smem` bytes of shared memory
/// (static + dynamic) that one SM of `l` holds at once (0: the launch cannot run).
fn resident(l: SmLimits, regs: u32, threads: u32, smem: u32) -> u32 {
    let warps = threads.div_ceil(32).max(1);
    let by_threads = l.threads / (warps * 32);
    let per_warp = (regs.max(1) * 32).next_multiple_of(REG_UNIT);
    let by_regs = (l.regs / SUB_PARTITIONS / per_warp) * SUB_PARTITIONS / warps;
    let by_smem = l.smem / (smem + SMEM_RESERVED).next_multiple_of(SMEM_UNIT);
    l.blocks.min(by_threads).min(by_regs).min(by_smem)
}

/// The card a plan is for.
#[derive(Clone, Debug)]
pub struct Card {
    pub sms: usize,
    /// `sm_90`, ...: whose ptxas figures give the blocks per SM.
    pub arch: String,
}

/// Each kernel's resources on one architecture, from the ptxas report build.rs kept (empty when
/// the build had no nvcc).
struct Resources {
    limits: SmLimits,
    entries: Vec<PtxasEntry>,
}

impl Resources {
    fn of(arch: &str) -> Result<Resources> {
        let limits = limits(arch).with_context(|| {
            format!("no occupancy figures for {arch}: use one of sm_80, sm_86, sm_89, sm_90")
        })?;
        let entries = kernels::parse_ptxas(kernels::PTXAS_REPORT)
            .into_iter()
            .filter(|e| e.arch == arch)
            .collect();
        Ok(Resources { limits, entries })
    }

    /// Blocks per SM of `l`, when ptxas reported its kernel.
    fn resident(&self, l: &Launched) -> Option<u32> {
        let e = self.entries.iter().find(|e| e.kernel == l.kernel)?;
        Some(resident(
            self.limits,
            e.registers,
            l.threads(),
            e.smem_bytes + l.shared,
        ))
    }
}

/// One launch of a plan.
#[derive(Clone, Debug)]
pub struct PlannedLaunch {
    pub pass: PlanPass,
    pub stage: Stage,
    pub kernel: &'static str,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_bytes: u32,
    /// A programmatic dependent launch ([`crate::gpu::Launch::pdl`]).
    pub pdl: bool,
    /// Blocks an SM holds at once (None without a ptxas report).
    pub resident_per_sm: Option<u32>,
    /// Blocks over (resident × SMs): 1.0 fills the card once (None without a ptxas report).
    pub waves: Option<f64>,
    /// The floor of the work it does, seconds (module docs).
    pub floor_s: f64,
}

impl PlannedLaunch {
    pub fn blocks(&self) -> u64 {
        self.grid.iter().map(|&g| g as u64).product()
    }
    pub fn threads(&self) -> u32 {
        self.block.iter().product()
    }
    /// A tensor-core kernel (`*_tc_*`).
    pub fn tensor_core(&self) -> bool {
        self.kernel.contains("_tc_")
    }
}

/// The launch plan of one training step and one eval forward.
#[derive(Clone, Debug)]
pub struct LaunchPlan {
    pub spec: DenseNetSpec,
    pub precision: Precision,
    pub batch: usize,
    pub image_size: usize,
    pub card: Card,
    /// Whether ptxas figures were found for the card's architecture.
    pub occupancy: bool,
    pub launches: Vec<PlannedLaunch>,
    /// Memsets of each pass.
    pub train_memsets: usize,
    pub eval_memsets: usize,
}

/// Figures of one pass of a plan.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub launches: usize,
    /// Launches with fewer blocks than the card has SMs.
    pub underfilled: usize,
    pub one_block: usize,
    /// Tensor-core launches with fewer blocks than SMs.
    pub tensor_core_underfilled: usize,
    /// Programmatic dependent launches (may start while the launch before them still runs).
    pub pdl: usize,
    pub floor_s: f64,
    /// Σ max(floor, [`LAUNCH_S`]).
    pub launch_bound_s: f64,
}

impl LaunchPlan {
    /// The launches of `pass`.
    pub fn of(&self, pass: PlanPass) -> impl Iterator<Item = &PlannedLaunch> {
        self.launches.iter().filter(move |l| l.pass == pass)
    }

    pub fn summary(&self, pass: PlanPass) -> Summary {
        let sms = self.card.sms as u64;
        let (mut s, mut floor, mut bound) = (
            Summary {
                launches: 0,
                underfilled: 0,
                one_block: 0,
                tensor_core_underfilled: 0,
                pdl: 0,
                floor_s: 0.0,
                launch_bound_s: 0.0,
            },
            0.0,
            0.0,
        );
        for l in self.of(pass) {
            s.launches += 1;
            let under = l.blocks() < sms;
            s.underfilled += under as usize;
            s.one_block += (l.blocks() == 1) as usize;
            s.tensor_core_underfilled += (under && l.tensor_core()) as usize;
            s.pdl += l.pdl as usize;
            floor += l.floor_s;
            bound += l.floor_s.max(LAUNCH_S);
        }
        s.floor_s = floor;
        s.launch_bound_s = bound;
        s
    }

    /// Per kernel of `pass`, in order of its share of the launch bound: (kernel, launches,
    /// launches with fewer blocks than SMs, Σ floor, Σ max(floor, [`LAUNCH_S`])).
    pub fn groups(&self, pass: PlanPass) -> Vec<(&'static str, usize, usize, f64, f64)> {
        let mut groups: Vec<(&'static str, usize, usize, f64, f64)> = Vec::new();
        for l in self.of(pass) {
            let i = match groups.iter().position(|g| g.0 == l.kernel) {
                Some(i) => i,
                None => {
                    groups.push((l.kernel, 0, 0, 0.0, 0.0));
                    groups.len() - 1
                }
            };
            let g = &mut groups[i];
            g.1 += 1;
            g.2 += (l.blocks() < self.card.sms as u64) as usize;
            g.3 += l.floor_s;
            g.4 += l.floor_s.max(LAUNCH_S);
        }
        groups.sort_by(|a, b| b.4.total_cmp(&a.4).then(a.0.cmp(b.0)));
        groups
    }
}

/// The plan of `spec` at `batch` images of `image_size`² stored in `precision`, on `card`.
pub fn plan(
    spec: &DenseNetSpec,
    precision: Precision,
    batch: usize,
    image_size: usize,
    card: Card,
) -> Result<LaunchPlan> {
    if batch == 0 || batch > MAX_BATCH {
        bail!("a launch plan takes a batch of 1 to {MAX_BATCH} images, not {batch}");
    }
    let res = Resources::of(&card.arch)?;
    let rec = Arc::new(Recorder::new(card.sms));
    let (d, take): (Arc<dyn Driver>, _) = (rec.clone(), || rec.take());
    let (train, eval) = match precision {
        Precision::F32 => record::<f32>(d, &take, spec, batch, image_size)?,
        Precision::Bf16 => record::<bf16>(d, &take, spec, batch, image_size)?,
    };
    let machine = Machine::h100(precision);
    let works = roofline::works(spec, batch, image_size, precision)?;
    let eval_works: Vec<Unit> = works
        .iter()
        .filter(|w| w.row.pass == WorkPass::Fwd && w.row.op != Work::BnStats)
        .cloned()
        .collect();
    let mut launches = Vec::new();
    let mut memsets = [0, 0];
    for (pass, events, works) in [
        (PlanPass::Train, &train, &works),
        (PlanPass::Eval, &eval, &eval_works),
    ] {
        let floors = attribute(works, events, &machine).context(pass.name())?;
        for (e, floor_s) in events.iter().zip(floors) {
            let l = match &e.op {
                Op::Launch(l) => l,
                Op::Memset { .. } => {
                    memsets[(pass == PlanPass::Eval) as usize] += 1;
                    continue;
                }
            };
            let resident_per_sm = res.resident(l);
            launches.push(PlannedLaunch {
                pass,
                stage: e.stage.context("a launch before any stage mark")?,
                kernel: l.kernel,
                grid: l.grid,
                block: l.block,
                shared_bytes: l.shared,
                pdl: l.pdl,
                resident_per_sm,
                waves: resident_per_sm
                    .map(|r| l.blocks() as f64 / (r.max(1) as u64 * card.sms as u64) as f64),
                floor_s,
            });
        }
    }
    Ok(LaunchPlan {
        spec: spec.clone(),
        precision,
        batch,
        image_size,
        occupancy: !res.entries.is_empty(),
        card,
        launches,
        train_memsets: memsets[0],
        eval_memsets: memsets[1],
    })
}

/// What the GPU model storing `T` on `d` queues for one training step and for one eval
/// forward of `n` images of `s`², as training and evaluation run them (u8 images augmented on
/// the device; the weights' bf16 copy refreshed by the forward after each Adam step; graphs
/// replayed after their capture): `take` returns what `d` recorded since it was last called.
pub fn record<T: Engine>(
    d: Arc<dyn Driver>,
    take: &dyn Fn() -> Vec<Event>,
    spec: &DenseNetSpec,
    n: usize,
    s: usize,
) -> Result<(Vec<Event>, Vec<Event>)> {
    let mut model = GpuDenseNet::<T>::new(d, DenseNet::new(spec.clone(), 0))?;
    let images = vec![0u8; n * s * s];
    let aug = vec![AugParams::IDENTITY; n];
    let mut adam = Adam::new(model.num_params(), 1e-4, 0.0);
    let mut step = |model: &mut GpuDenseNet<T>| -> Result<()> {
        model.zero_grad()?;
        let logits = model.forward_raw(&images, s, &aug, s, Mode::Train)?;
        model.backward(&vec![0.0; logits.len()])?;
        model.adam_step(&mut adam)
    };
    step(&mut model)?; // captures the graphs
    take();
    step(&mut model)?;
    let train = take();
    let eval = |model: &mut GpuDenseNet<T>| model.forward_raw(&images, s, &aug, s, Mode::Eval);
    eval(&mut model)?; // refreshes the weight copy after Adam, captures the eval graph
    take();
    eval(&mut model)?;
    Ok((train, take()))
}

/// Which launches do a roofline work's part: the kernel families of the step's kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    ConvFwd,
    ConvBwdData,
    ConvBwdWeight,
    Stats,
    MaxPoolFwd,
    MaxPoolBwd,
    AvgPoolFwd,
    AvgPoolBwd,
    HeadFwd,
    HeadBwd,
    Adam,
}

fn family_of(kernel: &str) -> Option<Family> {
    use Family::*;
    let conv = kernel.starts_with("conv") && !kernel.contains("finish");
    Some(match kernel {
        k if conv && k.contains("bwd_weight") => ConvBwdWeight,
        k if conv && k.contains("bwd_data") => ConvBwdData,
        k if conv && k.contains("_fwd") => ConvFwd,
        k if k.starts_with("bn_stats_part") => Stats,
        k if k.starts_with("maxpool_fwd") => MaxPoolFwd,
        k if k.starts_with("maxpool_bwd") => MaxPoolBwd,
        k if k.starts_with("avgpool_fwd") => AvgPoolFwd,
        k if k.starts_with("avgpool_bwd") => AvgPoolBwd,
        k if k.starts_with("bn_apply_fwd") || k.starts_with("gap_fwd") => HeadFwd,
        k if k.starts_with("gap_bwd") => HeadBwd,
        k if k.starts_with("adam") => Adam,
        _ => return None,
    })
}

/// The family of the launch that does `w` (None: a statistics pass, done by a statistics
/// kernel if the stage has one, else by its producer's launch).
fn family_for(w: &Unit) -> Option<Family> {
    use Family::*;
    Some(match (w.row.op, w.row.pass) {
        (Work::BnStats, _) => return None,
        (Work::MaxPool, WorkPass::Fwd) => MaxPoolFwd,
        (Work::MaxPool, _) => MaxPoolBwd,
        (Work::AvgPool, WorkPass::Fwd) => AvgPoolFwd,
        (Work::AvgPool, _) => AvgPoolBwd,
        (Work::Head, WorkPass::Fwd) => HeadFwd,
        (Work::Head, _) => HeadBwd,
        (Work::Adam, _) => Adam,
        (_, WorkPass::Fwd) => ConvFwd,
        (_, WorkPass::BwdData) => ConvBwdData,
        (_, _) => ConvBwdWeight,
    })
}

/// Each event's floor (0 for memsets): every work of `works` given to the launch of its stage
/// that does it — the k-th work of a family in a stage to the k-th launch of that family there;
/// a statistics pass to a statistics kernel when that is the next launch of a family after its
/// producer's, else to its producer's launch (the work before it), whose epilogue sums them.
/// Every work finds a launch, or the plan and the roofline disagree about the step and this is
/// an error.
fn attribute(works: &[Unit], events: &[Event], m: &Machine) -> Result<Vec<f64>> {
    let mut floors = vec![0.0; events.len()];
    let mut taken = vec![false; events.len()];
    let family = |e: &Event| match &e.op {
        Op::Launch(l) => family_of(l.kernel),
        Op::Memset { .. } => None,
    };
    let mut last: Option<usize> = None;
    for w in works {
        let here = |i: usize| events[i].stage == Some(w.stage);
        let at = match family_for(w) {
            Some(f) => {
                (0..events.len()).find(|&i| here(i) && !taken[i] && family(&events[i]) == Some(f))
            }
            None => last.filter(|&p| here(p)).map(|p| {
                let next = (p + 1..events.len()).find(|&i| here(i) && family(&events[i]).is_some());
                next.filter(|&i| !taken[i] && family(&events[i]) == Some(Family::Stats))
                    .unwrap_or(p)
            }),
        };
        let at = at.with_context(|| {
            format!(
                "no launch of the plan does {} {} at {} (the roofline's step and the model's \
                 disagree)",
                w.row.op, w.row.pass, w.stage
            )
        })?;
        taken[at] = true;
        floors[at] += w.row.floor_s(m);
        last = Some(at);
    }
    Ok(floors)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks per SM as NVIDIA's occupancy calculator gives them.
    #[test]
    fn resident_blocks_per_sm() {
        let sm90 = limits("sm_90").unwrap();
        // 256 threads at 128 registers: 32 KiB of registers a block, 2 blocks (16 warps).
        assert_eq!(resident(sm90, 128, 256, 37888), 2);
        // At 130 registers a warp takes 4352 of a sub-partition's 16384: 3 warps each, 12 an
        // SM, one block of 8.
        assert_eq!(resident(sm90, 130, 256, 0), 1);
        // 128 threads at 127 registers, 25.6 KB of shared memory: 4 blocks.
        assert_eq!(resident(sm90, 127, 128, 25600), 4);
        // Small blocks hit the 32-block limit; big shared memory limits the rest.
        assert_eq!(resident(sm90, 16, 32, 0), 32);
        assert_eq!(resident(sm90, 32, 128, 100 * 1024), 2);
        let sm86 = limits("sm_86").unwrap();
        assert_eq!(resident(sm86, 32, 1024, 0), 1, "1536 threads an SM");
        assert_eq!(
            resident(sm86, 120, 256, 61440),
            1,
            "100 KiB of shared memory"
        );
        assert_eq!(resident(sm90, 32, 256, 300 * 1024), 0, "does not fit");
        assert!(limits("sm_75").is_none());
    }

    /// Every work of the roofline's step is given to a launch: the plan's floor is the
    /// roofline's, in both precisions, and the eval forward's is its forward's without the
    /// statistics.
    #[test]
    fn the_floor_is_the_roofline_floor() {
        let spec = DenseNetSpec::preset("densenet121").unwrap();
        for precision in [Precision::F32, Precision::Bf16] {
            let card = Card {
                sms: 132,
                arch: "sm_90".into(),
            };
            let p = plan(&spec, precision, 2, 64, card).unwrap();
            let m = Machine::h100(precision);
            let rows = roofline::table(&spec, 2, 64, precision).unwrap();
            let want = roofline::totals(&rows, &m).floor_s;
            let got = p.summary(PlanPass::Train);
            assert!(
                (got.floor_s / want - 1.0).abs() < 1e-9,
                "{precision}: {got:?} vs {want}"
            );
            assert!(got.launch_bound_s >= got.floor_s + (got.launches as f64 - 200.0) * 1e-9);
            let fwd: f64 = rows
                .iter()
                .filter(|r| r.pass == WorkPass::Fwd && r.op != Work::BnStats)
                .map(|r| r.count as f64 * r.floor_s(&m))
                .sum();
            let eval = p.summary(PlanPass::Eval).floor_s;
            assert!(
                (eval / fwd - 1.0).abs() < 1e-9,
                "{precision}: {eval} vs {fwd}"
            );
            // Every launch is staged; a training step ends with Adam.
            let last = p.of(PlanPass::Train).last().unwrap();
            assert_eq!((last.stage, last.kernel), (Stage::Adam, "adam_fwd_f32"));
            assert!(p.train_memsets > 0 && p.eval_memsets > 0);
        }
    }

    #[test]
    fn refuses_what_it_cannot_plan() {
        let spec = DenseNetSpec::preset("densenet121").unwrap();
        let card = |arch: &str| Card {
            sms: 132,
            arch: arch.into(),
        };
        let e = plan(&spec, Precision::Bf16, 2, 64, card("sm_75")).unwrap_err();
        assert!(format!("{e:#}").contains("use one of sm_80"), "{e:#}");
        let e = plan(&spec, Precision::Bf16, MAX_BATCH + 1, 64, card("sm_90")).unwrap_err();
        assert!(format!("{e:#}").contains("batch of 1 to"), "{e:#}");
        let e = plan(&spec, Precision::Bf16, 1, 8, card("sm_90")).unwrap_err();
        assert!(format!("{e:#}").contains("too small"), "{e:#}");
    }
}
