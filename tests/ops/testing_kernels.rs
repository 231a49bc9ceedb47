//! The test-only kernels of kernels/testing/ (proofs of the machinery the ops use: grid-stride
//! loops, block reductions with atomics, cp.async + ldmatrix + mma.sync) through their generated
//! launchers `mura::gpu::kernels::testing`, against CPU references.

use crate::common::gpu::{check, read, Exec};
use crate::test_device;
use half::bf16;
use mura::gpu::kernels::testing as k;
use mura::gpu::{blocks_for, Act, Launch};

test_device!(relu, relu_body);
/// ReLU forward and backward; sizes that are not multiples of the block, on fewer blocks than
/// items (the grid-stride loop) and on a full grid.
fn relu_body<T: Act>(x: &mut Exec) {
    // (items, threads a block, most blocks)
    for (n, threads, max_blocks) in [
        (1, 256, 7),
        (999, 256, 7),
        (10_007, 256, 7),
        (5_003, 128, u32::MAX),
    ] {
        let (xb, xv) = x.random::<T>(n, 1.0, 0.0);
        let (dyb, dy) = x.random::<T>(n, 1.0, 0.0);
        let (yb, dxb) = (x.poisoned::<T>(n), x.poisoned::<T>(n));
        let at = Launch::linear(blocks_for(n, threads).min(max_blocks), threads);
        // SAFETY: every buffer holds n elements; the kernels touch elements below n only.
        unsafe {
            k::relu_fwd::<T>(&*x.d, at, yb.ptr(), xb.ptr(), n).unwrap();
            k::relu_bwd::<T>(&*x.d, at, dxb.ptr(), dyb.ptr(), yb.ptr(), n).unwrap();
        }
        let y_ref: Vec<f64> = xv.iter().map(|v| v.max(0.0)).collect();
        let dx_ref: Vec<f64> = (0..n)
            .map(|i| if xv[i] > 0.0 { dy[i] } else { 0.0 })
            .collect();
        check(&format!("relu fwd n={n}"), &read(&yb), &y_ref, x.tol);
        check(&format!("relu bwd n={n}"), &read(&dxb), &dx_ref, x.tol);
    }
}

/// The sum: the output zeroed (after poisoning), then each block's sum added atomically.
#[test]
fn sum_f32() {
    let x = &mut Exec::new::<f32>("sum");
    for (n, grid) in [(1, 1), (1000, 3), (100_003, 37)] {
        let (xb, xv) = x.random::<f32>(n, 1.0, 0.5);
        let out = x.poisoned::<f32>(1);
        out.fill_bytes(0).unwrap();
        // SAFETY: x holds n elements, out one; blocks of 256 threads (a multiple of 32).
        unsafe { k::sum_fwd_f32(&*x.d, Launch::linear(grid, 256), out.ptr(), xb.ptr(), n) }
            .unwrap();
        let want: f64 = xv.iter().sum();
        check(&format!("sum n={n}"), &read(&out), &[want], 1e-5);
    }
}

/// C = A · Bᵀ on the tensor-core tile kernel; K a multiple of 8 takes the cp.async path, other K
/// the scalar one.
#[test]
fn gemm_bf16() {
    let x = &mut Exec::new::<bf16>("gemm");
    // (m, n, k)
    for (m, n, kk) in [(45, 27, 40), (33, 17, 37), (64, 32, 64), (1, 1, 1)] {
        let (a, av) = x.random::<bf16>(m * kk, 1.0, 0.0);
        let (bt, bv) = x.random::<bf16>(n * kk, 1.0, 0.0);
        let c = x.poisoned::<f32>(m * n);
        let at = Launch {
            grid: [blocks_for(n, 16), blocks_for(m, 32), 1],
            block: [128, 1, 1],
            shared: 0,
            pdl: false,
        };
        // SAFETY: a holds [m, k], bt [n, k], c [m, n]; the grid covers C in 32 x 16 tiles.
        unsafe { k::gemm_fwd_bf16(&*x.d, at, c.ptr(), a.ptr(), bt.ptr(), m, n, kk) }.unwrap();
        let dot = |i: usize, j: usize| (0..kk).map(|l| av[i * kk + l] * bv[j * kk + l]).sum();
        let want: Vec<f64> = (0..m * n).map(|ij| dot(ij / n, ij % n)).collect();
        check(&format!("gemm {m}x{n}x{kk}"), &read(&c), &want, x.tol);
    }
}
