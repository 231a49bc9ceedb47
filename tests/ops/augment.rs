//! `gpu::ops::augment` against `ops::augment::image`: bit-identical in f32 (so a GPU run sees
//! exactly the CPU's inputs), and in bf16 the CPU's f32 values rounded; flips, rotations up to
//! 30°, shrinking, enlarging and the identity.

use crate::common::gpu::{all_nan, check, f64s, nhwc, read, refused, Exec};
use crate::test_device;
use half::bf16;
use mura::data::loader::{aug_params, Augment};
use mura::gpu::ops::augment;
use mura::gpu::{Act, DeviceBuffer};
use mura::ops::augment::{self as cpu, AugParams};
use mura::precision::Precision;

/// `ops::augment::image` of each of the `[n, s, s]` images of `src`: `[n, out_size, out_size, 3]`.
fn reference(src: &[u8], s: usize, params: &[AugParams], out_size: usize) -> Vec<f32> {
    let len = out_size * out_size * 3;
    let mut want = vec![0f32; params.len() * len];
    for (i, (p, out)) in params.iter().zip(want.chunks_mut(len)).enumerate() {
        cpu::image(&src[i * s * s..][..s * s], s, *p, out_size, out);
    }
    want
}

test_device!(matches_cpu, matches_cpu_body);
fn matches_cpu_body<T: Act>(x: &mut Exec) {
    let seed = x.rng.next_u64();
    // (images, source side, output side): shrinking, the same size, enlarging.
    for dims in [(5, 40, 32), (2, 23, 23), (1, 17, 29)] {
        case::<T>(x, seed, dims);
    }
}

/// `n` random `src_size`² images augmented into `out_size`²: the first as it is, the others
/// flipped and rotated as in epoch 3 of a run with `seed`.
fn case<T: Act>(x: &mut Exec, seed: u64, (n, src_size, out_size): (usize, usize, usize)) {
    let what = format!("{:?} augment {n}x{src_size}->{out_size}", T::PRECISION);
    let aug = Augment {
        flip: true,
        max_rotation_deg: 30.0,
    };
    let src: Vec<u8> = (0..n * src_size * src_size)
        .map(|_| (x.rng.uniform() * 256.0) as u8)
        .collect();
    let mut params: Vec<AugParams> = (0..n).map(|i| aug_params(&aug, seed, 3, i)).collect();
    params[0] = AugParams::IDENTITY;
    let srcb = DeviceBuffer::from_slice(&x.d, &src).unwrap();
    let steps = x.poisoned::<f32>(4 * n);
    let out = x.poisoned::<T>(n * out_size * out_size * 3);
    let view = nhwc(&out, (n, out_size, out_size), 3, (0, 3));
    augment::images(&*x.d, srcb.slice(), src_size, &params, steps.slice(), view).unwrap();
    let want = reference(&src, src_size, &params, out_size);
    check_rounded::<T>(x, &what, &read(&out), &want);
}

/// `got` against the CPU's f32 values `want`: exactly in f32, within 1e-2 in bf16, and bit for
/// bit the CPU's values rounded to `T`.
fn check_rounded<T: Act>(x: &Exec, what: &str, got: &[f64], want: &[f32]) {
    let (tol, round): (f64, fn(f32) -> f64) = match T::PRECISION {
        Precision::F32 => (0.0, |v| v as f64),
        Precision::Bf16 => (x.tol, |v| bf16::from_f32(v).to_f64()),
    };
    check(what, got, &f64s(want), tol);
    // (Not `bf16::from_f64`: half 2.7 drops an f64's low 32 bits before rounding, so values just
    // above a tie round down.)
    let same = got
        .iter()
        .zip(want)
        .all(|(a, &b)| a.to_bits() == round(b).to_bits());
    assert!(same, "{what}: not the CPU's values rounded");
}

/// Outputs that are not a contiguous `[n, s, s, 3]`, and sources and step scratch too short for
/// the images, are refused before anything is launched.
#[test]
fn refuses_operands_that_do_not_fit() {
    let x = &mut Exec::new::<f32>("augment_refuses");
    let (n, s) = (2, 8);
    let params = vec![AugParams::IDENTITY; n];
    let src = DeviceBuffer::<u8>::zeroed(&x.d, n * 10 * 10).unwrap();
    let (steps, out) = (x.poisoned::<f32>(4 * n), x.poisoned::<f32>(n * s * s * 4));
    let d = &*x.d;
    let go = |src_size, steps: mura::gpu::Slice<f32>, view| {
        augment::images(d, src.slice(), src_size, &params, steps, view)
    };
    let wide = nhwc(&out, (n, s, s), 4, (0, 3));
    refused(
        go(10, steps.slice(), wide),
        "a contiguous [2, s, s, 3] is needed",
    );
    let one = nhwc(&out, (1, s, s), 3, (0, 3));
    refused(
        go(10, steps.slice(), one),
        "augmenting 2 images into (1, 8, 8, 3)",
    );
    let view = nhwc(&out, (n, s, s), 3, (0, 3));
    refused(
        go(11, steps.slice(), view),
        "the source images: 200 elements where 242 are needed",
    );
    let short = steps.slice().range(0, 7).unwrap();
    refused(
        go(10, short, view),
        "the augmentation steps: 7 elements where 8 are needed",
    );
    assert!(
        all_nan(&read(&out)) && all_nan(&read(&steps)),
        "a refused call wrote"
    );
}
