//! The mutation suite: each checker catches its class of bug planted in a real kernel of
//! kernels/ (src/gpu/emu/mutants.txt; build.rs compiles the mutated copies for the emulator
//! only), run through the op code the model uses, with the error naming the checker; and each
//! bug goes unnoticed without that checker: with the checks off (the emulator as it was before
//! them: the same fibers and schedules), the mutated op still matches the CPU reference.
//! Real kernels without the bug pass every checker on the same inputs.

use crate::common::gpu::{randn, rel_err, seed, upload};
use half::bf16;
use mura::gpu::emu::{mutants, Checks, Emu};
use mura::gpu::ops::bn::{self, Stats};
use mura::gpu::ops::conv_tc::{self, FwdOut};
use mura::gpu::ops::ConvIn;
use mura::gpu::{DeviceBuffer, Driver, Mat, Nhwc};
use mura::ops::conv::{self, Conv};
use mura::ops::Image;
use mura::rng::Rng;
use std::sync::Arc;

fn emu(checks: Checks, mutant: Option<&str>) -> Arc<dyn Driver> {
    let e = Emu::with_checks(checks);
    Arc::new(match mutant {
        Some(m) => e.with_mutant(m).unwrap(),
        None => e,
    })
}

fn read_bf16(b: &DeviceBuffer<bf16>) -> Vec<f64> {
    b.to_vec().unwrap().iter().map(|x| x.to_f64()).collect()
}

/// A convolution forward through `conv_tc` (`g`: 1×1 or 3×3) of random inputs on `d`, against the
/// CPU reference: the relative error, or the launch's error. `ws`: split the reduction into
/// 32-wide chunks over a workspace (partial sums, tile counts) zeroed when `Some(true)`, else
/// only allocated.
fn conv_forward(
    d: &Arc<dyn Driver>,
    rng: &mut Rng,
    g: Conv,
    split: Option<bool>,
) -> anyhow::Result<f64> {
    let (n, h, w, c, co) = (2, 7, 7, 16, 24); // 98 pixels: one 128-row tile, 30 rows past the end
    let (xb, x) = upload::<bf16>(d, &randn(rng, n * h * w * c, 1.0, 0.2));
    let (wb, wt) = upload::<bf16>(d, &randn(rng, g.k * g.k * c * co, 0.3, 0.0));
    let y = DeviceBuffer::<bf16>::alloc(d, n * h * w * co)?;
    let (xv, yv) = (
        Nhwc::new(xb.slice(), (n, h, w, c), c)?,
        Nhwc::new(y.slice(), (n, h, w, co), co)?,
    );
    let ws = DeviceBuffer::<f32>::alloc(d, n * h * w * co)?;
    let tiles = DeviceBuffer::<u32>::alloc(d, 1)?;
    if split == Some(true) {
        ws.fill_bytes(0)?;
        tiles.fill_bytes(0)?;
    }
    let ws = conv_tc::SplitK {
        ws: ws.slice(),
        tiles: tiles.slice(),
    };
    let split = split.map(|_| (ws, 32));
    let conv = ConvIn {
        x: xv,
        pre: None,
        w: wb.slice(),
        g,
    };
    conv_tc::fwd_split(&**d, conv, FwdOut::plain(yv), split)?;
    let mut want = vec![0.0; n * h * w * co];
    let img = Image {
        data: &x,
        n,
        h,
        w,
        c,
        rs: c,
    };
    conv::fwd(img, None, &wt, co, g, &mut want, co);
    Ok(rel_err(&read_bf16(&y), &want))
}

/// Per-channel mean and biased variance of random `[rows, c]` f32 through `bn::batch_stats` on `d`,
/// against the CPU: the larger relative error of the two, or the launch's error.
fn bn_stats(d: &Arc<dyn Driver>, rng: &mut Rng, rows: usize, c: usize) -> anyhow::Result<f64> {
    let x: Vec<f32> = randn(rng, rows * c, 1.5, 0.7)
        .iter()
        .map(|&v| v as f32)
        .collect();
    let xb = DeviceBuffer::from_slice(d, &x)?;
    let mean = DeviceBuffer::<f32>::alloc(d, c)?;
    let var = DeviceBuffer::<f32>::alloc(d, c)?;
    let part = DeviceBuffer::<f32>::zeroed(d, bn::scratch_len(c))?;
    let stats = Stats {
        mean: mean.slice(),
        var: var.slice(),
    };
    let done = DeviceBuffer::<u32>::zeroed(d, 1)?;
    let scratch = bn::Scratch {
        part: part.slice(),
        coef: part.slice(),
        done: done.slice(),
    };
    let xm = Mat::dense(xb.slice(), rows, c)?;
    bn::batch_stats(&**d, xm, bn::Finish::Stats(stats), scratch)?;
    let mut m = vec![0.0f64; c];
    let mut v = vec![0.0f64; c];
    for (i, &xi) in x.iter().enumerate() {
        m[i % c] += xi as f64 / rows as f64;
    }
    for (i, &xi) in x.iter().enumerate() {
        v[i % c] += (xi as f64 - m[i % c]).powi(2) / rows as f64;
    }
    let got = |b: &DeviceBuffer<f32>| {
        b.to_vec()
            .unwrap()
            .iter()
            .map(|&x| x as f64)
            .collect::<Vec<_>>()
    };
    Ok(rel_err(&got(&mean), &m).max(rel_err(&got(&var), &v)))
}

/// Two convolutions in a row through `conv_tc` on `d`: x -> 1×1 -> y -> 3×3 -> z, the second
/// reading what the first wrote (a programmatic dependent launch: it may start before the first
/// ends), against the CPU reference of the 3×3 on the y the device computed: the relative error,
/// or the launch's error.
fn conv_chain(d: &Arc<dyn Driver>, rng: &mut Rng) -> anyhow::Result<f64> {
    let (n, h, w, c, cy, cz) = (1, 6, 5, 16, 24, 8);
    let (xb, _) = upload::<bf16>(d, &randn(rng, n * h * w * c, 1.0, 0.2));
    let (w1, _) = upload::<bf16>(d, &randn(rng, c * cy, 0.3, 0.0));
    let (w3, w3v) = upload::<bf16>(d, &randn(rng, 9 * cy * cz, 0.3, 0.0));
    let y = DeviceBuffer::<bf16>::alloc(d, n * h * w * cy)?;
    let z = DeviceBuffer::<bf16>::alloc(d, n * h * w * cz)?;
    let xv = Nhwc::new(xb.slice(), (n, h, w, c), c)?;
    let yv = Nhwc::new(y.slice(), (n, h, w, cy), cy)?;
    let zv = Nhwc::new(z.slice(), (n, h, w, cz), cz)?;
    let conv = |x, w: &DeviceBuffer<bf16>, g| ConvIn {
        x,
        pre: None,
        w: w.slice(),
        g,
    };
    conv_tc::fwd_split(
        &**d,
        conv(xv, &w1, Conv::POINTWISE),
        FwdOut::plain(yv),
        None,
    )?;
    conv_tc::fwd_split(&**d, conv(yv, &w3, Conv::CONV3), FwdOut::plain(zv), None)?;
    let ys = read_bf16(&y);
    let mut want = vec![0.0; n * h * w * cz];
    let img = Image {
        data: &ys,
        n,
        h,
        w,
        c: cy,
        rs: cy,
    };
    conv::fwd(img, None, &w3v, cz, Conv::CONV3, &mut want, cz);
    Ok(rel_err(&read_bf16(&z), &want))
}

fn expect_caught(r: anyhow::Result<f64>, want: &[&str]) {
    let e = format!("{:#}", r.expect_err("the checker should fail the launch"));
    eprintln!("caught: {e}");
    for w in want {
        assert!(e.contains(w), "error '{e}' lacks '{w}'");
    }
}

#[test]
fn the_suite_covers_every_mutant_and_checker() {
    let names: Vec<(&str, &str)> = mutants().iter().map(|m| (m.name, m.checker)).collect();
    assert_eq!(
        names,
        [
            ("row_past_end", "memcheck"),
            ("mean_without_barrier", "racecheck"),
            ("pdl_without_wait", "racecheck")
        ],
        "a mutant in src/gpu/emu/mutants.txt without a test here (or the other way round)"
    );
    assert!(Emu::new().with_mutant("no_such_mutant").is_err());
}

/// conv_tc.cu with the im2col operand's row bound one too far: the tile row past the last pixel
/// reads the row after the input, a read no output depends on.
#[test]
fn memcheck_catches_a_row_index_one_past_the_end() {
    let seed = seed("memcheck_catches_a_row_index_one_past_the_end");
    let mut rng = Rng::new(seed.value);
    for g in [Conv::POINTWISE, Conv::CONV3] {
        let off = emu(Checks::none(), Some("row_past_end"));
        let e = conv_forward(&off, &mut rng, g, None).unwrap();
        assert!(
            e <= 1e-2,
            "k{}: without memcheck the mutant still computes the right output ({e})",
            g.k
        );
        let on = emu(Checks::all(), Some("row_past_end"));
        let kernel = format!("conv{0}x{0}_tc_fwd_bf16__row_past_end", g.k);
        expect_caught(
            conv_forward(&on, &mut rng, g, None),
            &[
                &format!("kernel {kernel}: memcheck: out of bounds: "),
                "bytes past its end, by thread (",
            ],
        );
        assert!(conv_forward(&emu(Checks::all(), None), &mut rng, g, None).unwrap() <= 1e-2);
    }
}

/// The split-K forward (conv_tc.cu: partial sums added into an f32 workspace, then
/// conv_tc_fwd_finish_bf16) with its workspace allocated but never zeroed: the launch protocol's
/// bug (the model zeroes it before every forward; no in-bounds change to the kernels' text can
/// read bytes that zeroing did not write). Fresh memory that happens to be zero, as fresh host
/// pages are, hides it; on a GPU it is whatever was there.
#[test]
fn initcheck_catches_an_unwritten_split_k_workspace() {
    let seed = seed("initcheck_catches_an_unwritten_split_k_workspace");
    let mut rng = Rng::new(seed.value);
    let g = Conv::CONV3;
    let off = emu(Checks::none(), None);
    let e = conv_forward(&off, &mut rng, g, Some(false)).unwrap();
    assert!(
        e <= 1e-2,
        "without initcheck the unzeroed workspace goes unnoticed ({e})"
    );
    let on = emu(Checks::all(), None);
    expect_caught(
        conv_forward(&on, &mut rng, g, Some(false)),
        &[
            "kernel conv3x3_tc_fwd_bf16: initcheck: read of device memory nothing wrote",
            "4-byte atomic at",
            "of allocation #",
        ],
    );
    assert!(conv_forward(&on, &mut rng, g, Some(true)).unwrap() <= 1e-2);
}

/// bn.cu's chunk statistics without the barrier between the chunk means that row 0's
/// threads store in shared memory and the loads of every thread. In a one-block grid the
/// emulator's lockstep schedule runs row 0 first, so the values come out right; on a GPU warps
/// race.
#[test]
fn racecheck_catches_a_removed_barrier() {
    let seed = seed("racecheck_catches_a_removed_barrier");
    let mut rng = Rng::new(seed.value);
    let (rows, c) = (300, 20);
    let off = emu(Checks::none(), Some("mean_without_barrier"));
    let e = bn_stats(&off, &mut rng, rows, c).unwrap();
    assert!(
        e <= 1e-5,
        "without racecheck the mutant's statistics are right ({e})"
    );
    let on = emu(Checks::all(), Some("mean_without_barrier"));
    expect_caught(
        bn_stats(&on, &mut rng, rows, c),
        &[
            "kernel bn_stats_part_fwd_f32__mean_without_barrier: racecheck: shared memory hazard",
            "at dynamic shared offset ",
            "with no __syncthreads between them",
        ],
    );
    assert!(bn_stats(&emu(Checks::all(), None), &mut rng, rows, c).unwrap() <= 1e-5);
}

/// conv_tc.cu without its griddepcontrol.wait: the 3×3 of a chain, a programmatic dependent
/// launch, loads the 1×1's output before its wait. The emulator runs the two one after the other,
/// so without racecheck the values are right; racecheck treats the code before the wait as if it
/// ran before the previous kernel did, and names both kernels.
#[test]
fn racecheck_catches_a_programmatic_launch_without_its_wait() {
    let seed = seed("racecheck_catches_a_programmatic_launch_without_its_wait");
    let mut rng = Rng::new(seed.value);
    let off = emu(Checks::none(), Some("pdl_without_wait"));
    let e = conv_chain(&off, &mut rng).unwrap();
    assert!(
        e <= 1e-2,
        "without racecheck the mutant computes the right output ({e})"
    );
    let on = emu(Checks::all(), Some("pdl_without_wait"));
    expect_caught(
        conv_chain(&on, &mut rng),
        &[
            "kernel conv3x3_tc_fwd_bf16__pdl_without_wait: racecheck: programmatic dependent launch race",
            "before its griddepcontrol.wait (pdl_wait), touches bytes the previous kernel, \
             conv1x1_tc_fwd_bf16__pdl_without_wait, writes",
        ],
    );
    assert!(conv_chain(&emu(Checks::all(), None), &mut rng).unwrap() <= 1e-2);
}
