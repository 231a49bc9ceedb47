//! The whole DenseNet on the GPU op layer against the CPU model, on the executor named by
//! MURA_TEST_DEVICE (the emulator by default): a tiny net's training step — loss, every
//! parameter's gradient, Adam-updated weights, BN running statistics — then eval logits and
//! the CAM feature map; and bf16 storage tracking f32 over a few steps.

use super::{loss, model, model_of, tiny, wide};
use crate::common::gpu::{f64s, rel_err, seed, test_driver};
use half::bf16;
use mura::backend;
use mura::device::Device;
use mura::gpu::model::{Engine, GpuDenseNet};
use mura::gpu::{Driver, Error};
use mura::model::DenseNet;
use mura::net::{Misuse, Net};
use mura::ops::Mode;
use mura::optim::Adam;
use mura::precision::Precision;
use mura::rng::Rng;
use mura::spec::Role;
use mura::weights::TensorData;
use std::sync::Arc;

/// The GPU model of `model` storing activations at `precision`, on `d`.
fn gpu_net(d: &Arc<dyn Driver>, model: &DenseNet<f32>, precision: Precision) -> Box<dyn Net> {
    match precision {
        Precision::F32 => Box::new(GpuDenseNet::<f32>::new(d.clone(), model.cast()).unwrap()),
        Precision::Bf16 => Box::new(GpuDenseNet::<bf16>::new(d.clone(), model.cast()).unwrap()),
    }
}

fn batch(rng: &mut Rng, n: usize, hw: usize) -> Vec<f32> {
    (0..n * hw * hw * 3).map(|_| rng.normal() as f32).collect()
}

/// Every parameter tensor's gradient (GPU's or the CPU model's in f32) against the CPU model run
/// in f64: within 3e-4 relative (typically 1e-6; a few well-posed draws in 1000 reach 1.4e-4),
/// or within 1e-4 of the whole gradient's norm: a tensor whose gradient is itself a cancellation
/// cannot resolve to 3e-4 of its own norm in f32 — norm0's weight (the BNs after it make the loss
/// nearly invariant to its scale), a BN bias summing gradients of both signs (up to 6e-4 of its
/// norm, 2e-5 of the whole). A lost, doubled or misplaced gradient term is percents of the whole.
fn check_grads(got: &[f32], truth: &[f64]) {
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let whole = norm(truth);
    let mut at = 0;
    for t in tiny().state_dict_layout() {
        if t.role != Role::Param {
            continue;
        }
        let r = at..at + t.numel();
        let (g, want) = (f64s(&got[r.clone()]), &truth[r]);
        let e = rel_err(&g, want);
        assert!(
            e <= 3e-4 || e * norm(want) <= 1e-4 * whole,
            "gradient of {}: rel err {e} (norm {}, whole gradient {whole})",
            t.name,
            norm(want)
        );
        at += t.numel();
    }
    assert_eq!(at, got.len(), "every parameter compared");
}

/// The f64 gradient of the test's loss at `x`, then at `x` moved by 1e-6 relative in `moves`
/// random directions.
fn f64_gradients(
    model: &DenseNet<f32>,
    x: &[f32],
    (n, hw): (usize, usize),
    moves: usize,
    rng: &mut Rng,
) -> Vec<Vec<f64>> {
    (0..=moves)
        .map(|k| {
            let mut m = model.cast::<f64>();
            let scale = if k == 0 { 0.0 } else { 1e-6 };
            let xk: Vec<f64> = x
                .iter()
                .map(|&v| v as f64 * (1.0 + scale * rng.normal()))
                .collect();
            let logits = m.forward(&xk, n, hw, hw, Mode::Train);
            let as32: Vec<f32> = logits.iter().map(|&v| v as f32).collect();
            m.backward(&f64s(&loss(&as32).1));
            m.grads
        })
        .collect()
}

#[test]
fn training_step_matches_cpu() {
    let d = test_driver();
    let seed = seed("training_step_matches_cpu");
    let mut rng = Rng::new(seed.value);
    let (n, hw) = (2, 32);
    // A well-posed draw: about 1 in 200 puts a pre-ReLU value or a max-pool tie within f32
    // rounding of flipping, where the f64 gradient itself jumps by percents when the input moves
    // by 1e-6 (in one of 16 random directions; smooth changes are ~3e-6) and any f32 run may land
    // on either side; such a draw is replaced (from the same seed, so a failure still replays).
    let (mut cpu, x, truths) = (1..=8)
        .find_map(|_| {
            let m = model(&mut rng);
            let x = batch(&mut rng, n, hw);
            let truths = f64_gradients(&m, &x, (n, hw), 16, &mut rng);
            let jump = truths[1..]
                .iter()
                .map(|t| rel_err(t, &truths[0]))
                .fold(0.0, f64::max);
            match jump <= 1e-5 {
                true => Some((m, x, truths)),
                false => {
                    eprintln!("draw replaced: its f64 gradient jumps by {jump:.1e} within 1e-6");
                    None
                }
            }
        })
        .expect("a well-posed draw in 8");
    let mut gpu = GpuDenseNet::<f32>::new(d, cpu.cast()).unwrap();
    let before = cpu.cast::<f32>();

    // One training step on both.
    // Adam's eps at 1e-3, not PyTorch's 1e-8: with 1e-8 a first step moves every parameter by
    // lr·sign(g), so where a gradient is rounding noise (norm0's bias: the BNs after it leave the
    // loss all but invariant to it) two f32 implementations would move it ±lr at random; with
    // 1e-3 noise-level gradients move nothing measurable and real ones still ~lr·g/(|g|+1e-3).
    let mut adams = [
        Adam::new(cpu.num_params(), 1e-4, 1e-4),
        Adam::new(cpu.num_params(), 1e-4, 1e-4),
    ];
    for a in &mut adams {
        a.eps = 1e-3;
    }
    let nets: [&mut dyn Net; 2] = [&mut cpu, &mut gpu];
    let mut out = Vec::new();
    for net in nets {
        net.zero_grad().unwrap();
        let logits = net.forward(&x, n, hw, hw, Mode::Train).unwrap();
        let (l, dl) = loss(&logits);
        net.backward(&dl).unwrap();
        out.push((logits, l));
    }
    let (cpu_logits, cpu_loss) = (&out[0].0, out[0].1);
    let (gpu_logits, gpu_loss) = (&out[1].0, out[1].1);
    let e = rel_err(&f64s(gpu_logits), &f64s(cpu_logits));
    assert!(e <= 1e-4, "train logits: rel err {e}");
    let e = rel_err(&[gpu_loss as f64], &[cpu_loss as f64]);
    assert!(e <= 1e-4, "loss {gpu_loss} vs {cpu_loss}: rel err {e}");
    check_grads(&gpu.grads().unwrap(), &truths[0]);
    check_grads(&cpu.grads, &truths[0]);

    // Adam, then weights, running statistics and counters.
    Net::adam_step(&mut cpu, &mut adams[0]).unwrap();
    gpu.adam_step(&mut adams[1]).unwrap();
    let (sc, sg) = (
        Net::to_state_dict(&cpu).unwrap(),
        gpu.to_state_dict().unwrap(),
    );
    assert_eq!(sc.tensors.len(), sg.tensors.len());
    for (a, b) in sc.tensors.iter().zip(&sg.tensors) {
        assert_eq!(a.name, b.name);
        match (&a.data, &b.data) {
            (TensorData::F32(u), TensorData::F32(v)) => {
                let e = rel_err(&f64s(v), &f64s(u));
                assert!(e <= 1e-4, "after the step, {}: rel err {e}", a.name);
            }
            (TensorData::I64(u), TensorData::I64(v)) => assert_eq!(u, v, "{}", a.name),
            _ => panic!("{}: dtypes differ", a.name),
        }
    }
    // The device's first moment after one step is (1 − β1) × its gradient (plus weight decay).
    let mut moments = Adam::new(cpu.num_params(), 1e-4, 1e-4);
    gpu.export_adam(&mut moments).unwrap();
    let g = gpu.grads().unwrap();
    let want: Vec<f64> = (g.iter().zip(&before.params))
        .map(|(&g, &p)| 0.1 * (g as f64 + 1e-4 * p as f64))
        .collect();
    let e = rel_err(&f64s(&moments.m), &want);
    assert!(e <= 1e-6, "Adam first moment as exported: rel err {e}");

    // Eval mode with the updated weights and running statistics; and the CAM features.
    let x2 = batch(&mut rng, 3, 36);
    let le_c = Net::forward(&mut cpu, &x2, 3, 36, 36, Mode::Eval).unwrap();
    let le_g = gpu.forward(&x2, 3, 36, 36, Mode::Eval).unwrap();
    let e = rel_err(&f64s(&le_g), &f64s(&le_c));
    assert!(e <= 1e-4, "eval logits: rel err {e}");
    let (lc, fc, hc, wc) = Net::forward_features(&mut cpu, &x2, 3, 36, 36).unwrap();
    let (lg, fg, hg, wg) = gpu.forward_features(&x2, 3, 36, 36).unwrap();
    assert_eq!((hg, wg), (hc, wc));
    assert!(rel_err(&f64s(&lg), &f64s(&lc)) <= 1e-4);
    let e = rel_err(&f64s(&fg), &f64s(&fc));
    assert!(e <= 1e-4, "feature map: rel err {e}");
    let ((wg, bg), (wc, bc)) = (gpu.classifier().unwrap(), Net::classifier(&cpu).unwrap());
    assert!(
        rel_err(&f64s(&wg), &f64s(&wc)) <= 1e-4,
        "classifier weights"
    );
    assert!(
        rel_err(&[bg as f64], &[bc as f64]) <= 1e-4,
        "classifier bias"
    );

    // Backward needs a train forward; the last forward was eval.
    let e = gpu.backward(&[0.0; 3]).unwrap_err();
    assert_eq!(Misuse::find(&e), Some(&Misuse::NoForward), "{e:#}");
}

/// One bf16 training step (tensor-core convolutions; batch statistics and BN-backward reductions
/// summed in their epilogues) against the CPU model in f64. This net amplifies rounding about 15×
/// (the f32 path: ~1e-6 in logits and gradient), and bf16 stores every activation and gradient
/// with 8 significant bits (2^-9 relative), so the bf16 step is 0.2–5% off in logits and 10–25%
/// in the gradient (the CUDA-core bf16 path measured the same). The bounds (logits 0.1, whole
/// gradient 0.4, each tensor carrying ≥ 5% of the norm 0.8) catch gross wiring errors — a
/// gradient lost, doubled, negated or sent to the wrong tensor is ≥ 100% off. The sharp checks
/// are elsewhere: every fused kernel against the CPU reference at 1e-2 (tests/ops/conv_tc.rs,
/// tests/ops/bn.rs and the other op tests), and the backward's structure, deferred BN terms included, which
/// the f32 path shares, at 1e-4 in `training_step_matches_cpu`.
#[test]
fn bf16_training_step_matches_cpu() {
    let d = test_driver();
    let seed = seed("bf16_training_step_matches_cpu");
    let mut rng = Rng::new(seed.value);
    let cpu = model_of(wide(), &mut rng);
    let mut gpu = GpuDenseNet::<bf16>::new(d, cpu.cast()).unwrap();
    let (n, hw) = (4, 36);
    let x = batch(&mut rng, n, hw);
    gpu.zero_grad().unwrap();
    let logits = gpu.forward(&x, n, hw, hw, Mode::Train).unwrap();
    let (_, dl) = loss(&logits);
    gpu.backward(&dl).unwrap();
    let mut truth = cpu.cast::<f64>();
    let logits64 = truth.forward(&f64s(&x), n, hw, hw, Mode::Train);
    let e = rel_err(&f64s(&logits), &logits64);
    assert!(e <= 0.1, "bf16 train logits: rel err {e}");
    let dl64: Vec<f64> = f64s(&loss(&logits64.iter().map(|&v| v as f32).collect::<Vec<_>>()).1);
    truth.backward(&dl64);
    let grads = f64s(&gpu.grads().unwrap());
    let e = rel_err(&grads, &truth.grads);
    assert!(e <= 0.4, "bf16 whole gradient: rel err {e}");
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let whole = norm(&truth.grads);
    let mut at = 0;
    let (mut checked, mut worst) = (0, 0.0f64);
    for t in wide().state_dict_layout() {
        if t.role != Role::Param {
            continue;
        }
        let r = at..at + t.numel();
        at += t.numel();
        if norm(&truth.grads[r.clone()]) < 0.05 * whole {
            continue;
        }
        let e = rel_err(&grads[r.clone()], &truth.grads[r]);
        assert!(e <= 0.8, "bf16 gradient of {}: rel err {e}", t.name);
        worst = worst.max(e);
        checked += 1;
    }
    assert!(
        checked >= 3,
        "only {checked} tensors carry 5% of the gradient"
    );
    eprintln!("bf16 step: whole gradient rel err {e:.2e}, worst of {checked} tensors {worst:.2e}");
}

/// A few steps in bf16 storage track f32 (both on the device) within 2% in loss.
#[test]
fn bf16_steps_track_f32() {
    let d = test_driver();
    let seed = seed("bf16_steps_track_f32");
    let mut rng = Rng::new(seed.value);
    let base = model(&mut rng);
    let (n, hw) = (4, 32);
    let x = batch(&mut rng, n, hw);
    let mut losses = Vec::new();
    for precision in [Precision::F32, Precision::Bf16] {
        let mut net = gpu_net(&d, &base, precision);
        let mut adam = Adam::new(net.num_params(), 1e-3, 0.0);
        let mut ls = Vec::new();
        for _ in 0..4 {
            net.zero_grad().unwrap();
            let logits = net.forward(&x, n, hw, hw, Mode::Train).unwrap();
            let (l, dl) = loss(&logits);
            net.backward(&dl).unwrap();
            net.adam_step(&mut adam).unwrap();
            ls.push(l);
        }
        losses.push(ls);
    }
    eprintln!("f32 losses {:?}, bf16 losses {:?}", losses[0], losses[1]);
    for (a, b) in losses[0].iter().zip(&losses[1]) {
        assert!(
            ((b - a) / a).abs() <= 0.02,
            "bf16 loss {b} vs f32 {a}: {:?} vs {:?}",
            losses[1],
            losses[0]
        );
    }
    assert!(
        losses[0][3] < losses[0][0],
        "the loss falls on a fixed batch: {:?}",
        losses[0]
    );
}

/// `net::build` gives the GPU model for `emu`, from a state dict, agreeing with the CPU model.
#[test]
fn build_emu_from_state_dict() {
    let seed = seed("build_emu_from_state_dict");
    let mut rng = Rng::new(seed.value);
    let cpu = model(&mut rng);
    let sd = cpu.to_state_dict();
    let mut emu = backend::build(Device::Emu, Precision::F32, tiny(), Some(&sd), 0).unwrap();
    let mut host = backend::build(Device::Cpu, Precision::F32, tiny(), Some(&sd), 0).unwrap();
    let x = batch(&mut rng, 1, 20);
    let a = emu.forward(&x, 1, 20, 20, Mode::Eval).unwrap();
    let b = host.forward(&x, 1, 20, 20, Mode::Eval).unwrap();
    assert!(rel_err(&f64s(&a), &f64s(&b)) <= 1e-4);
    assert_eq!(emu.to_state_dict().unwrap(), sd, "state dict round trip");
    let e = emu.forward(&x[..3 * 4], 1, 2, 2, Mode::Eval).unwrap_err();
    assert!(
        matches!(Misuse::find(&e), Some(Misuse::TooSmall { h: 2, w: 2, .. })),
        "{e:#}"
    );
}

/// The CPU model and the GPU model (on the emulator) answer the same misuse with the same
/// error, never a panic: an input of the wrong length, an image too small for the net, a raw
/// batch of the wrong length, a backward with no train forward before it (none yet, an eval
/// forward, its tape already used), logit gradients for another batch size (which spend the
/// tape).
#[test]
fn cpu_and_gpu_models_refuse_the_same_misuse_alike() {
    let seed = seed("cpu_and_gpu_models_refuse_the_same_misuse_alike");
    let mut rng = Rng::new(seed.value);
    let sd = model(&mut rng).to_state_dict();
    let x = batch(&mut rng, 2, 20);
    // The misuse each call answers, in order, on one model.
    let answers = |net: &mut dyn Net| -> Vec<Misuse> {
        let misuse = |r: anyhow::Result<()>| {
            let e = r.expect_err("misuse refused");
            Misuse::find(&e)
                .cloned()
                .unwrap_or_else(|| panic!("untyped: {e:#}"))
        };
        let drop = |r: anyhow::Result<Vec<f32>>| r.map(|_| ());
        let raw = vec![0u8; 2 * 24 * 24];
        let aug = [mura::ops::augment::AugParams::IDENTITY; 2];
        let mut got = vec![
            misuse(net.backward(&[0.0; 2])),
            misuse(drop(net.forward(&x[1..], 2, 20, 20, Mode::Train))),
            misuse(drop(net.forward(&x[..3 * 4], 1, 2, 2, Mode::Eval))),
            misuse(drop(net.forward_raw(&raw[1..], 24, &aug, 20, Mode::Eval))),
        ];
        net.forward(&x, 2, 20, 20, Mode::Eval).unwrap();
        got.push(misuse(net.backward(&[0.0; 2])));
        net.forward(&x, 2, 20, 20, Mode::Train).unwrap();
        got.push(misuse(net.backward(&[0.0; 3])));
        got.push(misuse(net.backward(&[0.0; 2])));
        net.forward(&x, 2, 20, 20, Mode::Train).unwrap();
        net.backward(&[0.0; 2]).unwrap();
        got.push(misuse(net.backward(&[0.0; 2])));
        got
    };
    let want = vec![
        Misuse::NoForward,
        Misuse::InputShape {
            len: x.len() - 1,
            n: 2,
            h: 20,
            w: 20,
        },
        Misuse::TooSmall {
            h: 2,
            w: 2,
            arch: tiny().arch,
        },
        Misuse::RawShape {
            bytes: 2 * 24 * 24 - 1,
            n: 2,
            side: 24,
        },
        Misuse::NoForward,
        Misuse::GradShape { len: 3, n: 2 },
        Misuse::NoForward,
        Misuse::NoForward,
    ];
    for device in [Device::Cpu, Device::Emu] {
        let mut net = backend::build(device, Precision::F32, tiny(), Some(&sd), 0).unwrap();
        assert_eq!(answers(&mut *net), want, "{device:?}");
    }
}

/// Steady-state steps allocate nothing; peak memory is reported; a batch that does not fit is
/// a clear error naming the largest that would.
#[test]
fn memory_plan_and_out_of_memory() {
    use mura::gpu::tracking::Tracking;
    let seed = seed("memory_plan_and_out_of_memory");
    let mut rng = Rng::new(seed.value);
    let base = model(&mut rng);
    let hw = 32;
    let mut net = GpuDenseNet::<f32>::new(test_driver(), base.cast()).unwrap();
    let fixed = net.memory().current_bytes();
    let mut adam = Adam::new(net.num_params(), 1e-3, 0.0);
    let mut step = |net: &mut GpuDenseNet<f32>, n: usize| {
        let x = batch(&mut rng, n, hw);
        net.zero_grad().unwrap();
        let logits = net.forward(&x, n, hw, hw, Mode::Train).unwrap();
        net.backward(&loss(&logits).1).unwrap();
        net.adam_step(&mut adam).unwrap();
    };
    step(&mut net, 1);
    let plan1 = net.memory().current_bytes() - fixed;
    step(&mut net, 2);
    let plan2 = net.memory().current_bytes() - fixed;
    let calls = net.memory().alloc_calls();
    step(&mut net, 2);
    let x = batch(&mut rng, 2, hw);
    net.forward(&x, 2, hw, hw, Mode::Eval).unwrap();
    assert_eq!(
        net.memory().alloc_calls(),
        calls,
        "steady-state steps allocate nothing"
    );
    assert!(plan2 > plan1 && plan1 > 0);
    let peak = net.peak_device_bytes().unwrap();
    assert!(peak >= fixed + plan2, "peak {peak} < {fixed} + {plan2}");

    // Room for the model and the plan of 3.5 images: 3 fit, 8 do not.
    let per_image = plan2 - plan1;
    let limit = fixed + plan1 - per_image + 7 * per_image / 2;
    let tight = Arc::new(Tracking::with_limit(test_driver(), Some(limit)));
    let mut net = GpuDenseNet::<f32>::new(tight, base.cast()).unwrap();
    let e = net
        .forward(&batch(&mut rng, 8, hw), 8, hw, hw, Mode::Train)
        .unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("does not fit") && msg.contains("the largest batch that fits is 3"),
        "{msg}"
    );
    assert!(Error::is_out_of_memory(&e), "the error stays typed: {msg}");
    net.forward(&batch(&mut rng, 3, hw), 3, hw, hw, Mode::Train)
        .unwrap();
}

/// Only running out of memory makes a plan search for a smaller batch: any other failure while
/// the plan is allocated (here a driver fault at its third allocation, as an earlier kernel's
/// illegal address would make cuMemAlloc report) is the error, as itself, with no probing; an
/// out-of-memory at the same allocation still searches (the probes after it fit, so 7 of 8).
#[test]
fn a_plan_failure_other_than_out_of_memory_is_reported_as_itself() {
    use mura::gpu::tracking::Tracking;
    let seed = seed("a_plan_failure_other_than_out_of_memory_is_reported_as_itself");
    let mut rng = Rng::new(seed.value);
    let base = model(&mut rng);
    let (n, hw) = (8, 32);
    let x = batch(&mut rng, n, hw);
    let d = test_driver();
    let setup = {
        let counting = Arc::new(Tracking::new(d.clone()));
        GpuDenseNet::<f32>::new(counting.clone(), base.cast()).unwrap();
        counting.alloc_calls()
    };
    let fault = Error::Driver {
        call: "cuMemAlloc".into(),
        message: "CUDA_ERROR_ILLEGAL_ADDRESS (an illegal memory access was encountered)".into(),
    };
    let oom = Error::OutOfMemory {
        what: "cuMemAlloc of 4096 bytes".into(),
    };
    for (forced, searches) in [(fault, false), (oom, true)] {
        let failing = Arc::new(Tracking::failing(d.clone(), setup + 3, forced.clone()));
        let mut net = GpuDenseNet::<f32>::new(failing.clone(), base.cast()).unwrap();
        let e = net.forward(&x, n, hw, hw, Mode::Train).unwrap_err();
        let msg = format!("{e:#}");
        assert_eq!(Error::find(&e), Some(&forced), "{msg}");
        assert!(msg.contains(&forced.to_string()), "{msg}");
        assert_eq!(
            msg.contains("the largest batch that fits is 7"),
            searches,
            "{msg}"
        );
        // Each probe of the search allocates a whole plan; without one, nothing after the fault.
        let probed = failing.alloc_calls() > setup + 3;
        assert_eq!(probed, searches, "{msg}");
        // The model is usable afterwards: the next allocations succeed.
        net.forward(&x, n, hw, hw, Mode::Train).unwrap();
    }
}

/// Forward and backward replayed from captured graphs give what kernel-by-kernel launches give,
/// over steps that change the batch size within a plan, grow the plan, and interleave eval
/// forwards: bit for bit on the emulator (its launches are deterministic), within the atomics'
/// reordering on a GPU (f32: 1e-4 of the whole, room for a few parameters whose noise-level
/// gradient changed sign, which 4 Adam steps move by up to 8e-3 either way). Graphs are
/// captured once per pass and batch size, and dropped with their plan.
#[test]
fn graphs_replay_what_direct_launches_do() {
    let d = test_driver();
    let seed = seed("graphs_replay_what_direct_launches_do");
    let mut rng = Rng::new(seed.value);
    let base = model(&mut rng);
    graphs_case::<f32>(&d, &mut rng, &base, 1e-4);
    let base = model_of(wide(), &mut rng);
    graphs_case::<bf16>(&d, &mut rng, &base, 2e-2);
}

/// [`graphs_replay_what_direct_launches_do`] for activations stored as `T`.
fn graphs_case<T: Engine>(d: &Arc<dyn Driver>, rng: &mut Rng, base: &DenseNet<f32>, tol: f64) {
    let exact = d.name() == "emu";
    let hw = 32;
    let batches: Vec<(usize, Vec<f32>)> = [3, 2, 3, 5]
        .iter()
        .map(|&n| (n, batch(rng, n, hw)))
        .collect();
    let mut results = Vec::new();
    for graphs in [false, true] {
        let mut net = GpuDenseNet::<T>::new(d.clone(), base.cast()).unwrap();
        net.use_graphs(graphs);
        let before = net.driver().graph_count();
        let mut adam = Adam::new(net.num_params(), 1e-3, 0.0);
        let mut out: Vec<f32> = Vec::new();
        for (i, (n, x)) in batches.iter().enumerate() {
            net.zero_grad().unwrap();
            let logits = net.forward(x, *n, hw, hw, Mode::Train).unwrap();
            net.backward(&loss(&logits).1).unwrap();
            net.adam_step(&mut adam).unwrap();
            out.extend(&logits);
            out.extend(net.forward(x, *n, hw, hw, Mode::Eval).unwrap());
            if graphs {
                // Plan of 3: (train, eval, backward) × sizes seen; the plan of 5 drops them.
                let want = [3, 6, 6, 3][i];
                assert_eq!(net.driver().graph_count() - before, want, "step {i}");
            }
        }
        out.extend(net.grads().unwrap());
        for t in net.to_state_dict().unwrap().tensors {
            match t.data {
                TensorData::F32(v) => out.extend(v),
                TensorData::I64(v) => out.extend(v.iter().map(|&c| c as f32)),
            }
        }
        results.push(out);
    }
    let (direct, graphed) = (&results[0], &results[1]);
    let precision = T::PRECISION;
    if exact {
        assert!(
            direct
                .iter()
                .zip(graphed)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{precision}: graph replay differs from direct launches on the emulator"
        );
    } else {
        let e = rel_err(&f64s(graphed), &f64s(direct));
        assert!(e <= tol, "{precision}: graph replay vs direct: rel err {e}");
    }
}
