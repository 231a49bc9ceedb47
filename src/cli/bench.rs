//! `mura bench`: time an eval forward and a training step (forward + backward + Adam).

use super::arch::ArchArgs;
use crate::device::Device;
use crate::loss::{weighted_bce_f32, LossLevel};
use crate::model::Mode;
use crate::net::Net;
use crate::ops::augment::AugParams;
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
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Square input size in pixels
    #[arg(long, default_value_t = 224)]
    pub image_size: usize,
    /// Timed steps (medians are reported)
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Untimed steps first
    #[arg(long, default_value_t = 1)]
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
    let (device, precision) = (crate::gpu::resolve(args.device)?, args.precision);
    if args.batch == 0 || args.steps == 0 {
        bail!("--batch and --steps must be at least 1");
    }
    crate::data::image::check_side("--image-size", args.image_size)?;
    let spec = args.arch.spec()?;
    if args.profile {
        anyhow::ensure!(device == Device::Emu, "--profile needs --device emu");
        crate::gpu::emu::profile::enable();
    }
    let (n, s) = (args.batch, args.image_size);
    let mut model = crate::backend::build(device, precision, spec.clone(), None, 0)?;
    model.use_graphs(!args.no_graphs);
    // (MURA_CUDA_SYNC=1, for debugging, turns graphs off.)
    let graphs = !args.no_graphs && !crate::gpu::cuda::sync_each_launch();
    let mut rng = Rng::new(1);
    // GPU models read u8 images and augment them on the device, as in training (the timed step
    // includes that upload); the CPU model reads normalised f32 inputs.
    let raw = model.wants_raw_input();
    let x: Vec<f32> = match raw {
        true => Vec::new(),
        false => (0..n * s * s * 3).map(|_| rng.normal() as f32).collect(),
    };
    let images: Vec<u8> = match raw {
        true => (0..n * s * s).map(|_| rng.below(256) as u8).collect(),
        false => Vec::new(),
    };
    let params = vec![AugParams::IDENTITY; n];
    let labels: Vec<f64> = (0..n).map(|_| rng.below(2) as f64).collect();
    let view_study: Vec<usize> = (0..n).collect();
    let w = vec![(0.5, 0.5); n];
    let mut adam = Adam::new(model.num_params(), 1e-4, 0.0);
    let forward = |model: &mut Box<dyn Net>, mode| match raw {
        true => model.forward_raw(&images, s, &params, s, mode),
        false => model.forward(&x, n, s, s, mode),
    };

    let (mut fwd, mut step) = (Vec::new(), Vec::new());
    for i in 0..args.warmup + args.steps {
        let t = Instant::now();
        let logits = forward(&mut model, Mode::Eval)?;
        let tf = t.elapsed().as_secs_f64();
        anyhow::ensure!(logits.iter().all(|z| z.is_finite()), "non-finite logits");

        let t = Instant::now();
        model.zero_grad()?;
        let logits = forward(&mut model, Mode::Train)?;
        let (_, dlogits) = weighted_bce_f32(&logits, &view_study, &labels, &w, LossLevel::Image);
        model.backward(&dlogits)?;
        model.adam_step(&mut adam)?;
        model.finish()?; // (Adam's kernels are only queued)
        let ts = t.elapsed().as_secs_f64();
        if i >= args.warmup {
            fwd.push(tf);
            step.push(ts);
        }
    }
    let (f, st) = (median(fwd.clone()), median(step.clone()));
    let ips = n as f64 / st;
    let peak = model.peak_device_bytes();
    if args.json {
        // The medians, and every timed step's seconds, so that any other statistic can be
        // recomputed from the record.
        let mut j = serde_json::json!({
            "arch": spec.arch,
            "device": device.to_string(),
            "precision": precision.to_string(),
            "batch": n,
            "image_size": s,
            "steps": args.steps,
            "warmup": args.warmup,
            "forward_s": f,
            "train_step_s": st,
            "images_per_s": ips,
            "forward_times_s": fwd,
            "train_step_times_s": step,
        });
        if device != Device::Cpu {
            j["graphs"] = graphs.into();
        }
        if let Some(b) = peak {
            j["peak_device_bytes"] = b.into();
        }
        crate::out!("{j}");
    } else {
        let on = match device {
            Device::Cpu => format!("cpu ({} threads)", rayon::current_num_threads()),
            d if !graphs => format!("{d} ({precision:?}, no graphs)"),
            d => format!("{d} ({precision:?}, graphs)"),
        };
        crate::out!(
            "{} on {on}, batch {n}, {s}x{s}, median of {} steps after {} warm-up",
            spec.arch,
            args.steps,
            args.warmup
        );
        crate::out!("forward (eval)   {f:.3} s");
        crate::out!("train step       {st:.3} s   (forward + backward + Adam)");
        crate::out!("images/s         {ips:.1}   (training)");
        if let Some(b) = peak {
            crate::out!(
                "peak memory      {:.1} MiB (device)",
                b as f64 / (1 << 20) as f64
            );
        }
    }
    if args.profile {
        crate::out!("{}", crate::gpu::emu::profile::report().trim_end());
    }
    Ok(())
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
