//! Every kernel against a CPU reference, on the executor named by MURA_TEST_DEVICE (the emulator
//! by default): fresh random inputs, outputs poisoned with NaN before launch, sizes that are not
//! multiples of the block or tile sizes.

use half::bf16;
use mura::gpu::testing::{fresh_seed, rel_err, test_driver};
use mura::gpu::{arg, blocks_for, DeviceBuffer, Driver};
use mura::rng::Rng;
use std::sync::Arc;

const NAN: u8 = 0xff; // every byte 0xff: NaN as f32 and as bf16

fn setup(test: &str) -> (Arc<dyn Driver>, Rng) {
    (
        test_driver().expect("test device"),
        Rng::new(fresh_seed(test)),
    )
}

fn normal(rng: &mut Rng, n: usize, scale: f64, offset: f64) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.normal() * scale + offset) as f32)
        .collect()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn bf16s_to_f64(v: &[bf16]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

#[test]
fn relu_f32() {
    let (d, mut rng) = setup("relu_f32");
    for n in [1usize, 999, 10_007] {
        let x = normal(&mut rng, n, 1.0, 0.0);
        let dy = normal(&mut rng, n, 1.0, 0.0);
        let xb = DeviceBuffer::from_slice(&d, &x).unwrap();
        let dyb = DeviceBuffer::from_slice(&d, &dy).unwrap();
        let yb = DeviceBuffer::<f32>::alloc(&d, n).unwrap();
        let dxb = DeviceBuffer::<f32>::alloc(&d, n).unwrap();
        yb.fill_bytes(NAN).unwrap();
        dxb.fill_bytes(NAN).unwrap();
        let (mut y, mut xp, mut dx, mut dyp, mut ni) =
            (yb.ptr(), xb.ptr(), dxb.ptr(), dyb.ptr(), n as i32);
        let grid = [blocks_for(n, 256).min(7), 1, 1]; // fewer blocks than items: the grid-stride loop
        unsafe {
            d.launch(
                "relu_fwd_f32",
                grid,
                [256, 1, 1],
                0,
                &mut [arg(&mut y), arg(&mut xp), arg(&mut ni)],
            )
            .unwrap();
            d.launch(
                "relu_bwd_f32",
                grid,
                [256, 1, 1],
                0,
                &mut [arg(&mut dx), arg(&mut dyp), arg(&mut y), arg(&mut ni)],
            )
            .unwrap();
        }
        let y_ref: Vec<f64> = x.iter().map(|&v| v.max(0.0) as f64).collect();
        let dx_ref: Vec<f64> = x
            .iter()
            .zip(&dy)
            .map(|(&v, &g)| if v > 0.0 { g as f64 } else { 0.0 })
            .collect();
        assert!(
            rel_err(&f64s(&yb.to_vec().unwrap()), &y_ref) <= 1e-5,
            "relu_fwd_f32 n={n}"
        );
        assert!(
            rel_err(&f64s(&dxb.to_vec().unwrap()), &dx_ref) <= 1e-5,
            "relu_bwd_f32 n={n}"
        );
    }
}

#[test]
fn relu_bf16() {
    let (d, mut rng) = setup("relu_bf16");
    let n = 5_003;
    let x: Vec<bf16> = normal(&mut rng, n, 1.0, 0.0)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    let dy: Vec<bf16> = normal(&mut rng, n, 1.0, 0.0)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    let xb = DeviceBuffer::from_slice(&d, &x).unwrap();
    let dyb = DeviceBuffer::from_slice(&d, &dy).unwrap();
    let yb = DeviceBuffer::<bf16>::alloc(&d, n).unwrap();
    let dxb = DeviceBuffer::<bf16>::alloc(&d, n).unwrap();
    yb.fill_bytes(NAN).unwrap();
    dxb.fill_bytes(NAN).unwrap();
    let (mut y, mut xp, mut dx, mut dyp, mut ni) =
        (yb.ptr(), xb.ptr(), dxb.ptr(), dyb.ptr(), n as i32);
    let grid = [blocks_for(n, 128), 1, 1];
    unsafe {
        d.launch(
            "relu_fwd_bf16",
            grid,
            [128, 1, 1],
            0,
            &mut [arg(&mut y), arg(&mut xp), arg(&mut ni)],
        )
        .unwrap();
        d.launch(
            "relu_bwd_bf16",
            grid,
            [128, 1, 1],
            0,
            &mut [arg(&mut dx), arg(&mut dyp), arg(&mut y), arg(&mut ni)],
        )
        .unwrap();
    }
    let y_ref: Vec<f64> = x.iter().map(|v| v.to_f64().max(0.0)).collect();
    let dx_ref: Vec<f64> = x
        .iter()
        .zip(&dy)
        .map(|(v, g)| if v.to_f64() > 0.0 { g.to_f64() } else { 0.0 })
        .collect();
    assert!(rel_err(&bf16s_to_f64(&yb.to_vec().unwrap()), &y_ref) <= 1e-2);
    assert!(rel_err(&bf16s_to_f64(&dxb.to_vec().unwrap()), &dx_ref) <= 1e-2);
}

/// The sum op: zero the output, then the block-reduction kernel adds each block's sum atomically.
#[test]
fn sum_f32() {
    let (d, mut rng) = setup("sum_f32");
    for (n, grid) in [(1usize, 1u32), (1000, 3), (100_003, 37)] {
        let x = normal(&mut rng, n, 1.0, 0.5);
        let xb = DeviceBuffer::from_slice(&d, &x).unwrap();
        let out = DeviceBuffer::<f32>::alloc(&d, 1).unwrap();
        out.fill_bytes(NAN).unwrap();
        out.fill_bytes(0).unwrap();
        let (mut o, mut xp, mut ni) = (out.ptr(), xb.ptr(), n as i32);
        unsafe {
            d.launch(
                "sum_fwd_f32",
                [grid, 1, 1],
                [256, 1, 1],
                0,
                &mut [arg(&mut o), arg(&mut xp), arg(&mut ni)],
            )
        }
        .unwrap();
        let reference: f64 = x.iter().map(|&v| v as f64).sum();
        let got = out.to_vec().unwrap()[0] as f64;
        assert!(
            rel_err(&[got], &[reference]) <= 1e-5,
            "n={n}: {got} vs {reference}"
        );
    }
}

/// torch.optim.Adam with weight decay (L2 added to the gradient) over three steps, in f64.
#[test]
fn adam_f32() {
    let (d, mut rng) = setup("adam_f32");
    let n = 5_003;
    let (lr, beta1, beta2, eps, wd) = (1e-3f64, 0.9f64, 0.999f64, 1e-8f64, 1e-2f64);
    let p0 = normal(&mut rng, n, 1.0, 0.0);
    let pb = DeviceBuffer::from_slice(&d, &p0).unwrap();
    let mb = DeviceBuffer::<f32>::alloc(&d, n).unwrap();
    let vb = DeviceBuffer::<f32>::alloc(&d, n).unwrap();
    mb.fill_bytes(0).unwrap();
    vb.fill_bytes(0).unwrap();
    let (mut p, mut m, mut v) = (f64s(&p0), vec![0f64; n], vec![0f64; n]);
    for t in 1..=3 {
        let g = normal(&mut rng, n, 0.1, 0.0);
        let gb = DeviceBuffer::from_slice(&d, &g).unwrap();
        let (bc1, bc2) = (1.0 - beta1.powi(t), 1.0 - beta2.powi(t));
        for i in 0..n {
            let grad = g[i] as f64 + wd * p[i];
            m[i] = beta1 * m[i] + (1.0 - beta1) * grad;
            v[i] = beta2 * v[i] + (1.0 - beta2) * grad * grad;
            p[i] -= lr / bc1 * m[i] / (v[i].sqrt() / bc2.sqrt() + eps);
        }
        let (mut pp, mut gp, mut mp, mut vp, mut ni) =
            (pb.ptr(), gb.ptr(), mb.ptr(), vb.ptr(), n as i32);
        let mut h = [
            lr,
            beta1,
            1.0 - beta1,
            beta2,
            1.0 - beta2,
            eps,
            wd,
            bc1,
            bc2,
        ]
        .map(|x| x as f32);
        let mut params = vec![
            arg(&mut pp),
            arg(&mut gp),
            arg(&mut mp),
            arg(&mut vp),
            arg(&mut ni),
        ];
        params.extend(h.iter_mut().map(arg));
        unsafe {
            d.launch(
                "adam_fwd_f32",
                [blocks_for(n, 256).min(8), 1, 1],
                [256, 1, 1],
                0,
                &mut params,
            )
        }
        .unwrap();
        assert!(
            rel_err(&f64s(&pb.to_vec().unwrap()), &p) <= 1e-5,
            "params after step {t}"
        );
        assert!(
            rel_err(&f64s(&mb.to_vec().unwrap()), &m) <= 1e-5,
            "m after step {t}"
        );
        assert!(
            rel_err(&f64s(&vb.to_vec().unwrap()), &v) <= 1e-5,
            "v after step {t}"
        );
    }
}

#[test]
fn bn_stats_f32() {
    let (d, mut rng) = setup("bn_stats_f32");
    for (n, h, w, c) in [
        (3usize, 5usize, 7usize, 45usize),
        (2, 9, 9, 64),
        (1, 1, 3, 5),
    ] {
        let r = n * h * w;
        let x = normal(&mut rng, r * c, 2.0, 3.0);
        let xb = DeviceBuffer::from_slice(&d, &x).unwrap();
        let mean = DeviceBuffer::<f32>::alloc(&d, c).unwrap();
        let var = DeviceBuffer::<f32>::alloc(&d, c).unwrap();
        mean.fill_bytes(NAN).unwrap();
        var.fill_bytes(NAN).unwrap();
        let (mut mp, mut vp, mut xp, mut ri, mut ci) =
            (mean.ptr(), var.ptr(), xb.ptr(), r as i32, c as i32);
        let mut params = [
            arg(&mut mp),
            arg(&mut vp),
            arg(&mut xp),
            arg(&mut ri),
            arg(&mut ci),
        ];
        unsafe {
            d.launch(
                "bn_stats_fwd_f32",
                [blocks_for(c, 32), 1, 1],
                [32, 16, 1],
                0,
                &mut params,
            )
        }
        .unwrap();
        let mut m_ref = vec![0f64; c];
        let mut v_ref = vec![0f64; c];
        for ch in 0..c {
            let col: Vec<f64> = (0..r).map(|i| x[i * c + ch] as f64).collect();
            m_ref[ch] = col.iter().sum::<f64>() / r as f64;
            v_ref[ch] = col.iter().map(|v| (v - m_ref[ch]).powi(2)).sum::<f64>() / r as f64;
        }
        assert!(
            rel_err(&f64s(&mean.to_vec().unwrap()), &m_ref) <= 1e-5,
            "mean for {n}x{h}x{w}x{c}"
        );
        assert!(
            rel_err(&f64s(&var.to_vec().unwrap()), &v_ref) <= 1e-5,
            "var for {n}x{h}x{w}x{c}"
        );
    }
}

/// C = A * B^T on the tensor-core tile kernel; K multiple of 8 takes the cp.async path, other K
/// the scalar one.
#[test]
fn gemm_bf16() {
    let (d, mut rng) = setup("gemm_bf16");
    for (m, n, k) in [
        (45usize, 27usize, 40usize),
        (33, 17, 37),
        (64, 32, 64),
        (1, 1, 1),
    ] {
        let a: Vec<bf16> = normal(&mut rng, m * k, 1.0, 0.0)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let bt: Vec<bf16> = normal(&mut rng, n * k, 1.0, 0.0)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let ab = DeviceBuffer::from_slice(&d, &a).unwrap();
        let bb = DeviceBuffer::from_slice(&d, &bt).unwrap();
        let cb = DeviceBuffer::<f32>::alloc(&d, m * n).unwrap();
        cb.fill_bytes(NAN).unwrap();
        let (mut cp, mut ap, mut bp) = (cb.ptr(), ab.ptr(), bb.ptr());
        let (mut mi, mut ni, mut ki) = (m as i32, n as i32, k as i32);
        let grid = [blocks_for(n, 16), blocks_for(m, 32), 1];
        let mut params = [
            arg(&mut cp),
            arg(&mut ap),
            arg(&mut bp),
            arg(&mut mi),
            arg(&mut ni),
            arg(&mut ki),
        ];
        unsafe { d.launch("gemm_fwd_bf16", grid, [128, 1, 1], 0, &mut params) }.unwrap();
        let mut c_ref = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c_ref[i * n + j] = (0..k)
                    .map(|l| a[i * k + l].to_f64() * bt[j * k + l].to_f64())
                    .sum();
            }
        }
        let err = rel_err(&f64s(&cb.to_vec().unwrap()), &c_ref);
        assert!(err <= 1e-2, "gemm {m}x{n}x{k}: rel err {err}");
    }
}
