//! ReLU, sigmoid and the linear layer.

use super::{matmul, Float, Mat};

pub fn relu_fwd<T: Float>(x: &[T]) -> Vec<T> {
    x.iter()
        .map(|&v| if v < T::ZERO { T::ZERO } else { v }) // NaN propagates, as in PyTorch
        .collect()
}

/// `dx = dy * (x > 0)`.
pub fn relu_bwd<T: Float>(x: &[T], dy: &[T]) -> Vec<T> {
    x.iter()
        .zip(dy)
        .map(|(&v, &d)| if v > T::ZERO { d } else { T::ZERO })
        .collect()
}

/// Numerically stable logistic function.
pub fn sigmoid<T: Float>(z: T) -> T {
    if z >= T::ZERO {
        T::ONE / (T::ONE + (-z).exp())
    } else {
        let e = z.exp();
        e / (T::ONE + e)
    }
}

/// `dz = dy * s * (1 - s)` with `s = sigmoid(z)`.
pub fn sigmoid_bwd<T: Float>(z: T, dy: T) -> T {
    let s = sigmoid(z);
    dy * s * (T::ONE - s)
}

/// `y: [n, o] = x: [n, i] · wᵀ + b`, with PyTorch's `w: [o, i]`, `b: [o]`.
pub fn linear_fwd<T: Float>(x: &[T], n: usize, i: usize, w: &[T], b: &[T]) -> Vec<T> {
    let o = b.len();
    let mut y: Vec<T> = (0..n).flat_map(|_| b.iter().copied()).collect();
    matmul(n, o, i, &mut y, o, true, Mat::rows(x, i), Mat::t(w, i));
    y
}

/// Accumulates `dw: [o, i]`, `db: [o]`; returns `dx: [n, i]`.
pub fn linear_bwd<T: Float>(
    x: &[T],
    n: usize,
    i: usize,
    w: &[T],
    dy: &[T],
    dw: &mut [T],
    db: &mut [T],
) -> Vec<T> {
    let o = db.len();
    matmul(o, i, n, dw, i, true, Mat::t(dy, o), Mat::rows(x, i));
    for r in 0..n {
        db.iter_mut()
            .zip(&dy[r * o..][..o])
            .for_each(|(d, &g)| *d += g);
    }
    let mut dx = vec![T::ZERO; n * i];
    matmul(
        n,
        i,
        o,
        &mut dx,
        i,
        false,
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
    fn relu_propagates_nan() {
        let y = relu_fwd(&[f32::NAN, -1.0, 2.0]);
        assert!(y[0].is_nan() && y[1] == 0.0 && y[2] == 2.0);
        let f = crate::ops::BnRelu {
            scale: &[1.0f32],
            shift: &[0.0],
        };
        assert!(f.at(0, f32::NAN).is_nan());
    }

    #[test]
    fn relu_and_sigmoid_gradients() {
        let mut rng = Rng::new(1);
        let mut x = randn(&mut rng, 20);
        let r = randn(&mut rng, 20);
        let dx = relu_bwd(&x, &r);
        let err = fd_check(&mut x, &dx, |x| dot(&relu_fwd(x), &r));
        assert!(err < TOL, "relu rel err {err}");
        let mut z = randn(&mut rng, 20);
        let ds: Vec<f64> = z.iter().zip(&r).map(|(&z, &d)| sigmoid_bwd(z, d)).collect();
        let err = fd_check(&mut z, &ds, |z| {
            z.iter().zip(&r).map(|(&z, &d)| sigmoid(z) * d).sum()
        });
        assert!(err < TOL, "sigmoid rel err {err}");
        assert_eq!(sigmoid(1e4f32), 1.0);
        assert_eq!(sigmoid(-1e4f32), 0.0);
        assert!((sigmoid(0.3f64) - 1.0 / (1.0 + (-0.3f64).exp())).abs() < 1e-16);
    }

    #[test]
    fn linear_gradients() {
        let mut rng = Rng::new(2);
        let (n, i, o) = (3, 5, 2);
        let mut x = randn(&mut rng, n * i);
        let mut wb = randn(&mut rng, o * i + o);
        let r = randn(&mut rng, n * o);
        let f = |x: &[f64], wb: &[f64]| dot(&linear_fwd(x, n, i, &wb[..o * i], &wb[o * i..]), &r);
        let mut dwb = vec![0.0; o * i + o];
        let (dw, db) = dwb.split_at_mut(o * i);
        let dx = linear_bwd(&x, n, i, &wb[..o * i], &r, dw, db);
        let xs = x.clone();
        let err = fd_check(&mut wb, &dwb, |wb| f(&xs, wb));
        assert!(err < TOL, "linear dW rel err {err}");
        let wbs = wb.clone();
        let err = fd_check(&mut x, &dx, |x| f(x, &wbs));
        assert!(err < TOL, "linear dX rel err {err}");
    }
}
