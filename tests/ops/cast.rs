//! `gpu::ops::cast::to_bf16` against `half::bf16::from_f32` (round to nearest, ties to even), bit
//! for bit: random values over many magnitudes, and the edge cases: ties and their neighbours,
//! subnormals, the overflow to infinity, infinities, zeros and NaNs (any NaN stays a NaN); sizes
//! that are not multiples of the block, and one past what 4096 blocks of 256 cover (the
//! grid-stride loop).

use crate::common::gpu::{refused, Exec};
use half::bf16;
use mura::gpu::ops::cast;
use mura::gpu::DeviceBuffer;

/// f32 bit patterns where rounding to bf16 (the top 16 bits) is delicate.
const EDGES: [u32; 26] = [
    0x0000_0000, // +0
    0x8000_0000, // -0
    0x3f80_0000, // 1
    0x3f80_8000, // 1 + half a bf16 ulp: a tie, to the even 1
    0x3f81_8000, // a tie, to the even above
    0x3f80_8001, // just above a tie: up
    0x3f80_7fff, // just below a tie: down
    0xbf81_8000, // a negative tie: to the even (away from zero)
    0xbf80_8000, // a negative tie: to the even (towards zero)
    0x0000_0001, // the smallest subnormal: to +0
    0x0000_8000, // a subnormal tie: to the even 0
    0x0001_8000, // a subnormal tie: to the even above
    0x0000_8001, // a subnormal just above a tie
    0x007f_ffff, // the largest subnormal: up to the smallest normal
    0x0080_0000, // the smallest normal
    0x807f_ffff, // a negative subnormal
    0x7f7f_7fff, // just below the tie under the largest finite: stays finite
    0x7f7f_8000, // the tie past bf16's largest finite: to infinity
    0x7f7f_ffff, // f32's largest finite: to infinity
    0xff7f_ffff, // to -infinity
    0x7f80_0000, // +inf
    0xff80_0000, // -inf
    0x7fc0_0000, // a quiet NaN
    0xffc0_0000, // a negative NaN
    0x7f80_0001, // a NaN whose payload lies in the low bits only (truncation would give inf)
    0x7fbf_ffff, // a signalling NaN
];

/// `n` values: random f32s of magnitudes 2^-140 (subnormal) to 2^120, both signs, with arbitrary
/// low bits, then (as many as fit) the edge cases.
fn values(x: &mut Exec, n: usize) -> Vec<f32> {
    let random: Vec<f32> = (0..n.saturating_sub(EDGES.len()))
        .map(|_| {
            let e = x.rng.range(-140.0, 120.0);
            let v = (x.rng.normal() * e.exp2()) as f32;
            f32::from_bits(v.to_bits() ^ (x.rng.next_u64() as u32 & 0xffff))
        })
        .collect();
    random
        .into_iter()
        .chain(EDGES.map(f32::from_bits))
        .take(n)
        .collect()
}

#[test]
fn to_bf16_rounds_as_half_does() {
    let x = &mut Exec::new::<bf16>("cast_to_bf16");
    for n in [1, 26, 255, 257, 10_007, 4096 * 256 + 1] {
        let v = values(x, n);
        let xb = DeviceBuffer::from_slice(&x.d, &v).unwrap();
        let yb = DeviceBuffer::<bf16>::alloc(&x.d, n).unwrap();
        yb.fill_bytes(0xff).unwrap();
        cast::to_bf16(&*x.d, xb.slice(), yb.slice()).unwrap();
        let got = yb.to_vec().unwrap();
        for (i, (&f, &b)) in v.iter().zip(&got).enumerate() {
            let want = bf16::from_f32(f);
            let ok = match f.is_nan() {
                true => b.is_nan(),
                false => b.to_bits() == want.to_bits(),
            };
            assert!(
                ok,
                "n={n}, [{i}] {:#010x}: {:#06x}, half says {:#06x}",
                f.to_bits(),
                b.to_bits(),
                want.to_bits()
            );
        }
    }
}

/// An output of another length than the input is refused, nothing written.
#[test]
fn refuses_mismatched_lengths() {
    let x = &mut Exec::new::<bf16>("cast_refuses");
    let xb = DeviceBuffer::<f32>::zeroed(&x.d, 10).unwrap();
    let yb = x.poisoned::<bf16>(9);
    refused(
        cast::to_bf16(&*x.d, xb.slice(), yb.slice()),
        "a cast of 10 values into 9",
    );
    assert!(
        yb.to_vec().unwrap().iter().all(|v| v.is_nan()),
        "a refused cast wrote"
    );
}
