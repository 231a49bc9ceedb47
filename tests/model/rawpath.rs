//! The device-side data path on the executor named by MURA_TEST_DEVICE (the emulator by
//! default): the store's u8 images uploaded as they are and augmented by the model's device
//! give the same training step and the same predictions as f32 inputs built on the host.

use super::{loss, model};
use crate::common::gpu::{f64s, rel_err, seed, test_driver};
use mura::data::loader::{aug_params, Augment, Loader, LoaderConfig};
use mura::data::prep::{prep, PrepConfig};
use mura::data::store::Store;
use mura::data::synth::{synth, SynthConfig};
use mura::data::{Split, StudyType};
use mura::eval::predict_split;
use mura::gpu::model::{Engine, GpuDenseNet};
use mura::loss::LossLevel;
use mura::net::{Misuse, Net};
use mura::ops::augment::{self, AugParams};
use mura::ops::Mode;
use mura::optim::Adam;
use mura::out::Progress;
use mura::precision::Precision;
use mura::rng::Rng;
use mura::weights::TensorData;
use std::sync::Arc;

/// n random store images of side `src` and their augmentations (the first one the identity).
fn raw_batch(rng: &mut Rng, n: usize, src: usize) -> (Vec<u8>, Vec<AugParams>) {
    let raw = (0..n * src * src).map(|_| rng.below(256) as u8).collect();
    let aug = Augment {
        flip: true,
        max_rotation_deg: 30.0,
    };
    let seed = rng.next_u64();
    let mut params: Vec<AugParams> = (0..n).map(|i| aug_params(&aug, seed, 1, i)).collect();
    params[0] = AugParams::IDENTITY;
    (raw, params)
}

/// The f32 inputs the host builds from a raw batch: [n, out, out, 3].
fn host_inputs(raw: &[u8], src: usize, params: &[AugParams], out: usize) -> Vec<f32> {
    let len = out * out * 3;
    let mut x = vec![0f32; params.len() * len];
    for (i, p) in params.iter().enumerate() {
        let img = &raw[i * src * src..][..src * src];
        augment::image(img, src, *p, out, &mut x[i * len..][..len]);
    }
    x
}

fn close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = rel_err(&f64s(got), &f64s(want));
    assert!(e <= tol, "{what}: rel err {e} > {tol}");
}

/// Training steps through `forward_raw` against `forward` of the host-augmented inputs, on two
/// copies of one model: logits, loss, every gradient and the Adam-updated weights and running
/// statistics within 1e-5 on the emulator, where both copies add in the same order. On a GPU
/// the atomics add in a different order each run: values within `tol` (f32 1e-4; bf16 2e-2, a
/// stored activation may round the other way), and the weights within what an Adam step can
/// move a parameter whose noise-level gradient changed sign (2·lr per step) plus `tol`. Batches
/// of 3, then 2 (fewer views reuse the buffers), then 3 views; after the first step the raw path
/// allocates nothing on the device.
fn raw_steps_match<T: Engine>(test: &str) {
    let precision = T::PRECISION;
    let d = test_driver();
    let tol = match (d.name() == "emu", precision) {
        (true, _) => 1e-5,
        (false, Precision::F32) => 1e-4,
        (false, Precision::Bf16) => 2e-2,
    };
    let lr = 1e-3;
    let seed = seed(test);
    let mut rng = Rng::new(seed.value);
    let cpu = model(&mut rng);
    let mut host = GpuDenseNet::<T>::new(d.clone(), cpu.cast()).unwrap();
    let mut dev = GpuDenseNet::<T>::new(d, cpu.cast()).unwrap();
    assert!(dev.wants_raw_input());
    let mut adams = [
        Adam::new(cpu.num_params(), lr, 1e-4),
        Adam::new(cpu.num_params(), lr, 1e-4),
    ];
    let (src, out) = (37, 32);
    let mut allocs = None;
    for (step, n) in [3usize, 2, 3].into_iter().enumerate() {
        let (raw, params) = raw_batch(&mut rng, n, src);
        let x = host_inputs(&raw, src, &params, out);
        host.zero_grad().unwrap();
        dev.zero_grad().unwrap();
        let want = host.forward(&x, n, out, out, Mode::Train).unwrap();
        let got = dev
            .forward_raw(&raw, src, &params, out, Mode::Train)
            .unwrap();
        assert_eq!(got.len(), n);
        close(&format!("step {step} logits"), &got, &want, tol);
        let ((lw, dw), (lg, dg)) = (loss(&want), loss(&got));
        close(&format!("step {step} loss"), &[lg], &[lw], tol);
        host.backward(&dw).unwrap();
        dev.backward(&dg).unwrap();
        let (gw, gg) = (host.grads().unwrap(), dev.grads().unwrap());
        close(&format!("step {step} gradients"), &gg, &gw, tol);
        host.adam_step(&mut adams[0]).unwrap();
        dev.adam_step(&mut adams[1]).unwrap();
        let (sw, sg) = (host.to_state_dict().unwrap(), dev.to_state_dict().unwrap());
        assert_eq!(sw.tensors.len(), sg.tensors.len());
        for (a, b) in sw.tensors.iter().zip(&sg.tensors) {
            match (&a.data, &b.data) {
                (TensorData::F32(va), TensorData::F32(vb)) if tol > 1e-5 => {
                    let what = format!("step {step} {}", a.name);
                    let scale = va.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                    let bound = 2.0 * lr * (step + 1) as f64 + tol * scale;
                    let worst = va
                        .iter()
                        .zip(vb)
                        .map(|(x, y)| (x - y).abs() as f64)
                        .fold(0.0, f64::max);
                    assert!(worst <= bound, "{what}: differs by {worst} > {bound}");
                }
                (TensorData::F32(va), TensorData::F32(vb)) => {
                    close(&format!("step {step} {}", a.name), vb, va, tol)
                }
                (va, vb) => assert_eq!(va, vb, "step {step} {}", a.name),
            }
        }
        let calls = dev.memory().alloc_calls();
        if let Some(before) = allocs {
            assert_eq!(calls, before, "step {step} allocated device memory");
        }
        allocs = Some(calls);
    }
}

#[test]
fn raw_training_steps_match_the_f32_path() {
    raw_steps_match::<f32>("raw_training_steps_match_the_f32_path");
}

#[test]
fn raw_training_steps_match_the_f32_path_bf16() {
    raw_steps_match::<half::bf16>("raw_training_steps_match_the_f32_path_bf16");
}

/// The CPU model's `forward_raw` (host augmentation, then `forward`) and the device's agree
/// as well as the CPU and device forwards do (1e-4).
#[test]
fn cpu_and_device_raw_forwards_agree() {
    let d = test_driver();
    let seed = seed("cpu_and_device_raw_forwards_agree");
    let mut rng = Rng::new(seed.value);
    let mut cpu = model(&mut rng);
    let mut dev = GpuDenseNet::<f32>::new(d, cpu.cast()).unwrap();
    assert!(!Net::wants_raw_input(&cpu));
    let (raw, params) = raw_batch(&mut rng, 4, 29);
    for mode in [Mode::Train, Mode::Eval] {
        let want = Net::forward_raw(&mut cpu, &raw, 29, &params, 32, mode).unwrap();
        let got = dev.forward_raw(&raw, 29, &params, 32, mode).unwrap();
        close(&format!("{mode:?} logits"), &got, &want, 1e-4);
    }
    // Shapes that disagree are errors on both, not panics.
    let nets: [&mut dyn Net; 2] = [&mut cpu, &mut dev];
    for net in nets {
        let e = net
            .forward_raw(&raw[1..], 29, &params, 32, Mode::Eval)
            .unwrap_err();
        let want = Misuse::RawShape {
            bytes: raw.len() - 1,
            n: 4,
            side: 29,
        };
        assert_eq!(Misuse::find(&e), Some(&want), "{e:#}");
        let e = net.forward_raw(&[], 29, &[], 32, Mode::Eval).unwrap_err();
        assert_eq!(Misuse::find(&e), Some(&Misuse::EmptyRaw), "{e:#}");
    }
}

/// A synthetic store, its loader's raw batches (the store's bytes, the same studies and
/// augmentations as the f32 batches, which they reproduce through `augment_image`), and
/// evaluation through the raw path giving the CPU's predictions.
#[test]
fn raw_batches_and_raw_evaluation() {
    let seed = seed("raw_batches_and_raw_evaluation");
    let mut rng = Rng::new(seed.value);
    let root = crate::common::tmp("raw");
    let syn = root.join("syn");
    let cfg = SynthConfig {
        studies: 24,
        seed: rng.next_u64(),
        valid_fraction: 0.3,
    };
    synth(&syn, &cfg, Progress::Quiet).unwrap();
    let out = root.join("store");
    prep(&PrepConfig {
        mura_root: syn,
        out: out.clone(),
        size: 40,
        study_types: StudyType::ALL.to_vec(),
        strict: false,
        progress: Progress::Quiet,
    })
    .unwrap();
    let store = Arc::new(Store::open(&out).unwrap());
    let lc = LoaderConfig {
        batch_studies: 3,
        max_views: Some(3),
        image_size: 32,
        augment: Some(Augment {
            flip: true,
            max_rotation_deg: 30.0,
        }),
        seed: rng.next_u64(),
        shuffle: true,
        workers: 2,
        prefetch: 2,
    };
    let loader = Loader::new(store.clone(), Split::Train, &StudyType::ALL, lc.clone()).unwrap();
    let (f, r): (Vec<_>, Vec<_>) = (loader.epoch(2).collect(), loader.epoch_raw(2).collect());
    assert_eq!(f.len(), r.len());
    for (f, r) in f.iter().zip(&r) {
        assert_eq!(
            (&f.studies, &f.image_ids, &f.aug),
            (&r.studies, &r.image_ids, &r.aug)
        );
        assert_eq!((f.n_images, f.size, r.src_size), (r.n_images, r.size, 40));
        assert!(f.raw.is_none() && r.images.is_empty());
        let raw = r.raw.as_ref().unwrap();
        let want: Vec<u8> = r
            .image_ids
            .iter()
            .flat_map(|&i| store.image(i))
            .copied()
            .collect();
        assert_eq!(raw, &want);
        assert_eq!(host_inputs(raw, 40, &r.aug, 32), f.images);
    }

    // Evaluation: the device model takes raw batches and predicts what the CPU model does.
    let d = test_driver();
    let mut cpu = model(&mut rng);
    let mut dev = GpuDenseNet::<f32>::new(d, cpu.cast()).unwrap();
    let val = Loader::new(store.clone(), Split::Valid, &StudyType::ALL, lc.for_eval()).unwrap();
    let want = predict_split(&mut cpu, &store, &val, LossLevel::Study).unwrap();
    let got = predict_split(&mut dev, &store, &val, LossLevel::Study).unwrap();
    assert_eq!(got.studies.len(), want.studies.len());
    for (g, w) in got.studies.iter().zip(&want.studies) {
        assert_eq!(g.study, w.study);
        assert!(
            (g.probability - w.probability).abs() <= 1e-5,
            "study {}: {} vs {}",
            g.study,
            g.probability,
            w.probability
        );
    }
    let (gl, wl) = (got.loss, want.loss);
    assert!((gl - wl).abs() <= 1e-5 * wl.abs(), "loss {gl} vs {wl}");
    std::fs::remove_dir_all(&root).unwrap();
}
