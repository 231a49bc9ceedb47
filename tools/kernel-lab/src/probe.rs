//! The launches that check the emulator's profiler against Nsight Compute on a GPU: each kernel
//! launched exactly once, at fixed shapes, so that what `ncu` reads for a kernel on the card and
//! what the emulator's profiler counts for it (`mura::gpu::emu::profile`) describe the very same
//! launch. Three test-only kernels whose counts tests/device/profile.rs pins by hand, and three
//! tensor-core kernels of the DenseNet-169 step at the shapes of its first dense layer (batch 1,
//! 56×56, the BN + ReLU in front and the output's statistics in the epilogue, as the model runs
//! them; no split-K, so one launch each).
//!
//! `cargo bench --bench kernels -- --probe --device emu|cuda[:N]` runs them
//! (`scripts/gpu-check.sh`, stage `ncu`, runs it under `ncu` on the card and on the emulator
//! beside it).

use anyhow::Result;
use half::bf16;
use mura::gpu::kernels::testing;
use mura::gpu::ops::conv_tc::{self, FwdOut};
use mura::gpu::ops::{BnRelu, ConvIn};
use mura::gpu::{DeviceBuffer, Driver, Launch, Nhwc};
use mura::ops::conv::Conv;
use mura::rng::Rng;
use std::sync::Arc;

/// One launch of the probe: its kernel and what it shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub kernel: &'static str,
    pub what: &'static str,
}

/// The probe's launches, in the order [`run`] makes them.
pub const PROBES: [Probe; 6] = [
    Probe {
        kernel: "selftest_copy_fwd_f32",
        what: "a coalesced copy of 4100 floats (33 blocks of 128)",
    },
    Probe {
        kernel: "selftest_strided_fwd_f32",
        what: "a copy of 1024 floats read 8 apart (a sector per lane)",
    },
    Probe {
        kernel: "selftest_banks_fwd_f32",
        what: "one warp storing and loading one shared-memory bank (32-way conflicts)",
    },
    Probe {
        kernel: "conv1x1_tc_fwd_bf16",
        what: "DenseNet-169 block 1 layer 1: BN-ReLU-conv1x1 64 -> 128 at 56x56, batch 1",
    },
    Probe {
        kernel: "conv3x3_tc_fwd_bf16",
        what: "DenseNet-169 block 1 layer 1: BN-ReLU-conv3x3 128 -> 32 at 56x56, batch 1",
    },
    Probe {
        kernel: "conv3x3_tc_bwd_weight_bf16",
        what: "its weight gradient (split-K over the pixels)",
    },
];

/// Launches every probe once on `d` (inputs drawn from `seed`) and waits for them.
pub fn run(d: &Arc<dyn Driver>, seed: u64) -> Result<()> {
    let mut rng = Rng::new(seed);
    let mut random = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.normal() as f32).collect() };
    // The copies, then the bank conflicts (float4s, as the kernel reads and writes them).
    let x = DeviceBuffer::from_slice(d, &random(4100))?;
    let y = DeviceBuffer::<f32>::alloc(d, 4100)?;
    let at = Launch::linear(33, 128);
    unsafe { testing::selftest_copy_fwd_f32(&**d, at, y.ptr(), x.ptr(), 4100) }?;
    let x = DeviceBuffer::from_slice(d, &random(1024 * 8))?;
    let y = DeviceBuffer::<f32>::alloc(d, 1024)?;
    let at = Launch::linear(8, 128);
    unsafe { testing::selftest_strided_fwd_f32(&**d, at, y.ptr(), x.ptr(), 8, 1024) }?;
    let inp = DeviceBuffer::<[f32; 4]>::from_slice(d, bytemuck::cast_slice(&random(32 * 4)))?;
    let out = DeviceBuffer::<[f32; 4]>::alloc(d, 32)?;
    let vw = DeviceBuffer::<f32>::alloc(d, 32)?;
    let at = Launch::linear(1, 32);
    unsafe { testing::selftest_banks_fwd_f32(&**d, at, out.ptr(), vw.ptr(), inp.ptr(), 32, 32) }?;
    tensor_cores(d, &mut rng)?;
    d.synchronize()
}

/// The three tensor-core launches of [`PROBES`].
fn tensor_cores(d: &Arc<dyn Driver>, rng: &mut Rng) -> Result<()> {
    let (n, h, w, c0, c1, k) = (1, 56, 56, 64, 128, 32);
    let rows = n * h * w;
    let mut bf16s = |len: usize| -> Result<DeviceBuffer<bf16>> {
        let v: Vec<bf16> = (0..len).map(|_| bf16::from_f64(rng.normal())).collect();
        DeviceBuffer::from_slice(d, &v)
    };
    let (x, w1, w3, dy) = (
        bf16s(rows * c0)?,
        bf16s(c0 * c1)?,
        bf16s(9 * c1 * k)?,
        bf16s(rows * k)?,
    );
    let mid = DeviceBuffer::<bf16>::alloc(d, rows * c1)?;
    let out = DeviceBuffer::<bf16>::alloc(d, rows * k)?;
    let stats = DeviceBuffer::<f32>::zeroed(d, 2 * c1)?;
    let dw = DeviceBuffer::<f32>::zeroed(d, 9 * c1 * k)?;
    let ones = |c: usize| DeviceBuffer::<f32>::from_slice(d, &vec![1.0; c]);
    let zeros = |c: usize| DeviceBuffer::<f32>::zeroed(d, c);
    let (s0, t0, s1, t1) = (ones(c0)?, zeros(c0)?, ones(c1)?, zeros(c1)?);
    let pre = |s: &DeviceBuffer<f32>, t: &DeviceBuffer<f32>| BnRelu {
        scale: s.slice(),
        shift: t.slice(),
    };
    let nhwc = |b: &DeviceBuffer<bf16>, c| Nhwc::new(b.slice(), (n, h, w, c), c);
    let stats1 = Some(stats.slice().range(0, 2 * c1)?);
    let x = nhwc(&x, c0)?;
    let pw = Some(pre(&s0, &t0));
    let conv1 = ConvIn {
        x,
        pre: pw,
        w: w1.slice(),
        g: Conv::POINTWISE,
    };
    let out1 = FwdOut {
        stats: stats1,
        ..FwdOut::plain(nhwc(&mid, c1)?)
    };
    conv_tc::fwd_split(&**d, conv1, out1, None)?;
    let (mid, p3) = (nhwc(&mid, c1)?, Some(pre(&s1, &t1)));
    let stats3 = Some(stats.slice().range(0, 2 * k)?);
    let conv3 = ConvIn {
        x: mid,
        pre: p3,
        w: w3.slice(),
        g: Conv::CONV3,
    };
    let out3 = FwdOut {
        stats: stats3,
        ..FwdOut::plain(nhwc(&out, k)?)
    };
    conv_tc::fwd_split(&**d, conv3, out3, None)?;
    conv_tc::bwd_weight(&**d, mid, p3, Conv::CONV3, nhwc(&dy, k)?, dw.slice())
}
