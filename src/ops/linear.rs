//! The linear layer (the head's single-logit classifier; kernels/linear.cu on the GPU).

use super::{matmul, Float, Gemm, Mat, Out};

/// `y: [n, o] = x: [n, i] · wᵀ + b`, with PyTorch's `w: [o, i]`, `b: [o]`.
pub fn fwd<T: Float>(x: &[T], n: usize, i: usize, w: &[T], b: &[T]) -> Vec<T> {
    let o = b.len();
    let mut y: Vec<T> = (0..n).flat_map(|_| b.iter().copied()).collect();
    let g = Gemm { m: n, n: o, k: i };
    matmul(g, Out::accumulate(&mut y, o), Mat::rows(x, i), Mat::t(w, i));
    y
}

/// Accumulates `dw: [o, i]`, `db: [o]`; returns `dx: [n, i]`.
pub fn bwd<T: Float>(
    x: &[T],
    n: usize,
    i: usize,
    w: &[T],
    dy: &[T],
    dw: &mut [T],
    db: &mut [T],
) -> Vec<T> {
    let o = db.len();
    let g = Gemm { m: o, n: i, k: n };
    matmul(g, Out::accumulate(dw, i), Mat::t(dy, o), Mat::rows(x, i));
    for r in 0..n {
        db.iter_mut()
            .zip(&dy[r * o..][..o])
            .for_each(|(d, &g)| *d += g);
    }
    let mut dx = vec![T::ZERO; n * i];
    let g = Gemm { m: n, n: i, k: o };
    matmul(
        g,
        Out::overwrite(&mut dx, i),
        Mat::rows(dy, o),
        Mat::rows(w, i),
    );
    dx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{dot, fd_check, randn, TOL};
    use crate::rng::Rng;

    #[test]
    fn linear_gradients() {
        let mut rng = Rng::new(2);
        let (n, i, o) = (3, 5, 2);
        let mut x = randn(&mut rng, n * i);
        let mut wb = randn(&mut rng, o * i + o);
        let r = randn(&mut rng, n * o);
        let f = |x: &[f64], wb: &[f64]| dot(&fwd(x, n, i, &wb[..o * i], &wb[o * i..]), &r);
        let mut dwb = vec![0.0; o * i + o];
        let (dw, db) = dwb.split_at_mut(o * i);
        let dx = bwd(&x, n, i, &wb[..o * i], &r, dw, db);
        let xs = x.clone();
        let err = fd_check(&mut wb, &dwb, |wb| f(&xs, wb));
        assert!(err < TOL, "linear dW rel err {err}");
        let wbs = wb.clone();
        let err = fd_check(&mut x, &dx, |x| f(x, &wbs));
        assert!(err < TOL, "linear dX rel err {err}");
    }
}
