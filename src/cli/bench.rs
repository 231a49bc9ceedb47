//! `mura bench`: time an eval forward and a training step (forward + backward + Adam).

use super::arch::ArchArgs;
use crate::device::Device;
use crate::gpu::launch_plan::{self, Card, LaunchPlan, PlanPass};
use crate::loss::{weighted_bce_f32, LossLevel};
use crate::net::Net;
use crate::ops::augment::AugParams;
use crate::ops::Mode;
use crate::optim::Adam;
use crate::precision::Precision;
use crate::rng::Rng;
use anyhow::{bail, Result};
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// cpu | cuda[:N] | emu | auto
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// f32 | bf16 (GPU backends)
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
    #[command(flatten)]
    pub arch: ArchArgs,
    /// Images per batch
    #[arg(long, default_value_t = 8, value_parser = super::count(crate::bounds::BATCH))]
    pub batch: usize,
    /// Square input size in pixels
    #[arg(long, default_value_t = 224, value_parser = super::count(crate::bounds::SIDE))]
    pub image_size: usize,
    /// Timed steps (medians are reported)
    #[arg(long, default_value_t = 5, value_parser = super::count(crate::bounds::STEPS))]
    pub steps: usize,
    /// Untimed steps first
    #[arg(long, default_value_t = 1, value_parser = super::count(crate::bounds::WARMUP))]
    pub warmup: usize,
    /// Print one JSON line instead of a table
    #[arg(long)]
    pub json: bool,
    /// GPU devices: launch kernel by kernel instead of replaying captured CUDA graphs
    #[arg(long)]
    pub no_graphs: bool,
    /// emu: count each kernel's memory traffic as Nsight Compute does and print it per kernel
    #[arg(long)]
    pub profile: bool,
    /// Print the launch plan of one GPU training step and one eval forward instead (any machine:
    /// the launches are recorded, nothing runs)
    #[arg(long, conflicts_with_all = ["profile", "no_graphs"])]
    pub plan: bool,
    /// --plan: the card's streaming multiprocessors (grids are sized for them)
    #[arg(long, default_value_t = 132, requires = "plan")]
    pub sms: usize,
    /// --plan: the architecture whose ptxas figures give the blocks per SM (80, 86, 89, 90)
    #[arg(long, default_value_t = 90, requires = "plan")]
    pub arch_sm: u32,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn run(args: Args) -> Result<()> {
    use crate::bounds::{BATCH, SIDE, STEPS, WARMUP};
    BATCH.check("--batch", args.batch)?;
    STEPS.check("--steps", args.steps)?;
    WARMUP.check("--warmup", args.warmup)?;
    SIDE.check("--image-size", args.image_size)?;
    let spec = args.arch.spec()?;
    if args.plan {
        return plan(&args, &spec);
    }
    let device = crate::gpu::resolve(args.device)?;
    if args.profile {
        anyhow::ensure!(device == Device::Emu, "--profile needs --device emu");
        crate::gpu::emu::profile::enable();
    }
    let mut model = crate::backend::build(device, args.precision, spec.clone(), None, 0)?;
    model.use_graphs(!args.no_graphs);
    let (fwd, step) = time_steps(&args, model.as_mut())?;
    let measured = Measured {
        device,
        // (MURA_CUDA_SYNC=1, for debugging, turns graphs off.)
        graphs: !args.no_graphs && !crate::gpu::cuda::sync_each_launch(),
        forward: median(fwd.clone()),
        train_step: median(step.clone()),
        forward_times: fwd,
        step_times: step,
        peak: model.peak_device_bytes(),
    };
    match args.json {
        true => print_json(&args, &spec.arch, &measured),
        false => print_table(&args, &spec.arch, &measured),
    }
    if args.profile {
        let profile = crate::gpu::emu::profile::all();
        match args.json {
            // One JSON line per kernel after the timing line.
            true => crate::gpu::emu::profile::json(&profile)
                .iter()
                .for_each(|k| crate::out!("{k}")),
            false => crate::out::block(&crate::gpu::emu::profile::report()),
        }
    }
    Ok(())
}

/// One batch of random inputs, in the form `model` reads: GPU models read u8 images and augment
/// them on the device, as in training (the timed step includes that upload); the CPU model reads
/// normalised f32 inputs.
struct Inputs {
    raw: bool,
    n: usize,
    s: usize,
    x: Vec<f32>,
    images: Vec<u8>,
    params: Vec<AugParams>,
    labels: Vec<f64>,
    view_study: Vec<usize>,
    w: Vec<(f64, f64)>,
}

impl Inputs {
    fn new(model: &dyn Net, n: usize, s: usize) -> Inputs {
        let mut rng = Rng::new(1);
        let raw = model.wants_raw_input();
        let x: Vec<f32> = match raw {
            true => Vec::new(),
            false => (0..n * s * s * 3).map(|_| rng.normal() as f32).collect(),
        };
        let images: Vec<u8> = match raw {
            true => (0..n * s * s).map(|_| rng.below(256) as u8).collect(),
            false => Vec::new(),
        };
        Inputs {
            raw,
            n,
            s,
            x,
            images,
            params: vec![AugParams::IDENTITY; n],
            labels: (0..n).map(|_| rng.below(2) as f64).collect(),
            view_study: (0..n).collect(),
            w: vec![(0.5, 0.5); n],
        }
    }

    fn forward(&self, model: &mut dyn Net, mode: Mode) -> Result<Vec<f32>> {
        let s = self.s;
        match self.raw {
            true => model.forward_raw(&self.images, s, &self.params, s, mode),
            false => model.forward(&self.x, self.n, s, s, mode),
        }
    }
}

/// Runs `--warmup` then `--steps` eval forwards and training steps; the seconds of each timed
/// forward, and of each timed step.
fn time_steps(args: &Args, model: &mut dyn Net) -> Result<(Vec<f64>, Vec<f64>)> {
    let inputs = Inputs::new(model, args.batch, args.image_size);
    let mut adam = Adam::new(model.num_params(), 1e-4, 0.0);
    let (mut fwd, mut step) = (Vec::new(), Vec::new());
    for i in 0..args.warmup + args.steps {
        let t = Instant::now();
        let logits = inputs.forward(model, Mode::Eval)?;
        let tf = t.elapsed().as_secs_f64();
        anyhow::ensure!(logits.iter().all(|z| z.is_finite()), "non-finite logits");

        let t = Instant::now();
        model.zero_grad()?;
        let logits = inputs.forward(model, Mode::Train)?;
        let (_, dlogits) = weighted_bce_f32(
            &logits,
            &inputs.view_study,
            &inputs.labels,
            &inputs.w,
            LossLevel::Image,
        );
        model.backward(&dlogits)?;
        model.adam_step(&mut adam)?;
        model.finish()?; // (Adam's kernels are only queued)
        let ts = t.elapsed().as_secs_f64();
        if i >= args.warmup {
            fwd.push(tf);
            step.push(ts);
        }
    }
    Ok((fwd, step))
}

/// What a timed bench measured, and on what.
struct Measured {
    device: Device,
    graphs: bool,
    /// Medians, in seconds.
    forward: f64,
    train_step: f64,
    /// Every timed forward's and training step's seconds.
    forward_times: Vec<f64>,
    step_times: Vec<f64>,
    peak: Option<usize>,
}

/// The medians, and every timed step's seconds, so that any other statistic can be recomputed
/// from the record: one JSON line.
fn print_json(args: &Args, arch: &str, m: &Measured) {
    let n = args.batch;
    let mut j = serde_json::json!({
        "arch": arch,
        "device": m.device.to_string(),
        "precision": args.precision.to_string(),
        "batch": n,
        "image_size": args.image_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "forward_s": m.forward,
        "train_step_s": m.train_step,
        "images_per_s": n as f64 / m.train_step,
        "forward_times_s": m.forward_times,
        "train_step_times_s": m.step_times,
    });
    if m.device != Device::Cpu {
        j["graphs"] = m.graphs.into();
    }
    if let Some(b) = m.peak {
        j["peak_device_bytes"] = b.into();
    }
    crate::out!("{j}");
}

fn print_table(args: &Args, arch: &str, m: &Measured) {
    let (n, s, precision) = (args.batch, args.image_size, args.precision);
    let (f, st) = (m.forward, m.train_step);
    let ips = n as f64 / st;
    let on = match m.device {
        Device::Cpu => format!("cpu ({} threads)", rayon::current_num_threads()),
        d if !m.graphs => format!("{d} ({precision:?}, no graphs)"),
        d => format!("{d} ({precision:?}, graphs)"),
    };
    crate::out!(
        "{} on {on}, batch {n}, {s}x{s}, median of {} steps after {} warm-up",
        arch,
        args.steps,
        args.warmup
    );
    crate::out!("forward (eval)   {f:.3} s");
    crate::out!("train step       {st:.3} s   (forward + backward + Adam)");
    crate::out!("images/s         {ips:.1}   (training)");
    if let Some(b) = m.peak {
        crate::out!(
            "peak memory      {:.1} MiB (device)",
            b as f64 / (1 << 20) as f64
        );
    }
}

/// Most SMs `--sms` takes.
const MAX_SMS: usize = 1 << 16;

/// `--plan`: the launch plan, as text or one JSON object.
fn plan(args: &Args, spec: &crate::spec::DenseNetSpec) -> Result<()> {
    if args.sms == 0 || args.sms > MAX_SMS {
        bail!(
            "--sms {} is not a card's SM count (1 to {MAX_SMS})",
            args.sms
        );
    }
    let card = Card {
        sms: args.sms,
        arch: format!("sm_{}", args.arch_sm),
    };
    let p = launch_plan::plan(spec, args.precision, args.batch, args.image_size, card)?;
    let occupancy = match p.occupancy {
        true => format!("blocks per SM from ptxas's report for {}", p.card.arch),
        false => format!(
            "no ptxas report for {} (the build had no nvcc): blocks per SM and waves left empty",
            p.card.arch
        ),
    };
    match args.json {
        true => plan_json(args, &spec.arch, &p, &occupancy),
        false => plan_table(args, &spec.arch, &p, &occupancy),
    }
    Ok(())
}

/// `--plan --json`: the plan's totals and every launch, as one JSON object.
fn plan_json(args: &Args, arch: &str, p: &LaunchPlan, occupancy: &str) {
    let (train, eval) = (p.summary(PlanPass::Train), p.summary(PlanPass::Eval));
    let launches: Vec<serde_json::Value> = p
        .launches
        .iter()
        .map(|l| {
            serde_json::json!({
                "pass": l.pass.name(),
                "stage": l.stage.to_string(),
                "kernel": l.kernel,
                "grid": l.grid,
                "block": l.block,
                "blocks": l.blocks(),
                "threads": l.threads(),
                "shared_bytes": l.shared_bytes,
                "pdl": l.pdl,
                "resident_per_sm": l.resident_per_sm,
                "waves": l.waves,
                "floor_us": l.floor_s * 1e6,
            })
        })
        .collect();
    let j = serde_json::json!({
        "arch": arch,
        "precision": args.precision.to_string(),
        "batch": args.batch,
        "image_size": args.image_size,
        "sms": p.card.sms,
        "arch_sm": p.card.arch,
        "occupancy": occupancy,
        "launch_us": launch_plan::LAUNCH_S * 1e6,
        "train_launches": train.launches,
        "eval_launches": eval.launches,
        "memsets": p.train_memsets,
        "eval_memsets": p.eval_memsets,
        "underfilled": train.underfilled,
        "one_block": train.one_block,
        "tensor_core_underfilled": train.tensor_core_underfilled,
        "pdl": train.pdl,
        "eval_pdl": eval.pdl,
        "floor_ms": train.floor_s * 1e3,
        "launch_bound_ms": train.launch_bound_s * 1e3,
        "eval_underfilled": eval.underfilled,
        "eval_one_block": eval.one_block,
        "eval_floor_ms": eval.floor_s * 1e3,
        "eval_launch_bound_ms": eval.launch_bound_s * 1e3,
        "launches": launches,
    });
    crate::out!("{j}");
}

/// `--plan`: a line on what was planned, a table of every launch, the two passes' totals and the
/// train step's largest launch groups.
fn plan_table(args: &Args, arch: &str, p: &LaunchPlan, occupancy: &str) {
    crate::out!(
        "launch plan of {}, {}, batch {}, {s}x{s}, on {} SMs (nothing run): {occupancy}",
        arch,
        args.precision,
        args.batch,
        p.card.sms,
        s = args.image_size
    );
    launch_rows(p);
    pass_totals(args, p);
    crate::out!();
    crate::out!("largest launch groups of the train step:");
    crate::out!(
        "{:<28} {:>8} {:>6} {:>9} {:>15}",
        "kernel",
        "launches",
        "<SMs",
        "floor ms",
        "launch-bound ms"
    );
    for (k, n, under, floor, bound) in p.groups(PlanPass::Train) {
        crate::out!(
            "{k:<28} {n:>8} {under:>6} {:>9.3} {:>15.3}",
            floor * 1e3,
            bound * 1e3
        );
    }
}

/// The table of every launch, in order.
fn launch_rows(p: &LaunchPlan) {
    crate::out!(
        "{:<5} {:<20} {:<28} {:>16} {:>12} {:>7} {:>4} {:>7} {:>9}",
        "pass",
        "stage",
        "kernel",
        "grid",
        "block",
        "smem B",
        "/SM",
        "waves",
        "floor µs"
    );
    let dims = |d: [u32; 3]| format!("{}x{}x{}", d[0], d[1], d[2]);
    for l in &p.launches {
        crate::out!(
            "{:<5} {:<20} {:<28} {:>16} {:>12} {:>7} {:>4} {:>7} {:>9.2}",
            l.pass.name(),
            l.stage.to_string(),
            l.kernel,
            dims(l.grid),
            dims(l.block),
            l.shared_bytes,
            l.resident_per_sm.map_or("-".into(), |r| r.to_string()),
            l.waves.map_or("-".into(), |w| format!("{w:.2}")),
            l.floor_s * 1e6
        );
    }
}

/// The train step's and the eval forward's totals, and what the columns mean.
fn pass_totals(args: &Args, p: &LaunchPlan) {
    let (train, eval) = (p.summary(PlanPass::Train), p.summary(PlanPass::Eval));
    crate::out!();
    crate::out!(
        "{:<13} {:>8} {:>7} {:>6} {:>7} {:>9} {:>6} {:>9} {:>15}",
        "",
        "launches",
        "memsets",
        "<SMs",
        "1-block",
        "tc <SMs",
        "pdl",
        "floor ms",
        "launch-bound ms"
    );
    for (name, s, memsets) in [
        ("train step", train, p.train_memsets),
        ("eval forward", eval, p.eval_memsets),
    ] {
        crate::out!(
            "{name:<13} {:>8} {memsets:>7} {:>6} {:>7} {:>9} {:>6} {:>9.3} {:>15.3}",
            s.launches,
            s.underfilled,
            s.one_block,
            s.tensor_core_underfilled,
            s.pdl,
            s.floor_s * 1e3,
            s.launch_bound_s * 1e3
        );
    }
    crate::out!(
        "(launch-bound: every launch at least {} µs, graph node overhead and ramp; <SMs: fewer \
         blocks than SMs; pdl: programmatic dependent launches, which may start while the \
         launch before them runs (not credited); floor: the roofline's, H100 at {} precision)",
        launch_plan::LAUNCH_S * 1e6,
        args.precision
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(device: Device, image_size: usize) -> Args {
        Args {
            device,
            precision: Precision::F32,
            arch: ArchArgs {
                arch: "custom".into(),
                growth_rate: 4,
                block_config: vec![2, 2],
                num_init_features: 8,
                bn_size: 2,
            },
            batch: 2,
            image_size,
            steps: 1,
            warmup: 0,
            json: true,
            no_graphs: false,
            profile: false,
            plan: false,
            sms: 132,
            arch_sm: 90,
        }
    }

    #[test]
    fn runs_on_cpu_and_refuses_unknown_devices_and_tiny_inputs() {
        run(args(Device::Cpu, 32)).unwrap();
        let e = run(args(Device::Cpu, 3)).unwrap_err().to_string();
        assert!(e.contains("out of range"), "{e}");
        let mut deep = args(Device::Cpu, 16);
        deep.arch.block_config = vec![1; 6];
        let e = run(deep).unwrap_err().to_string();
        assert!(e.contains("too small"), "{e}");
    }
}
