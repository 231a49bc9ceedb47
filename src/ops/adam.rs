//! One Adam step over flat f32 buffers, as torch.optim.Adam (amsgrad off, weight decay an L2 term
//! added to the gradient): the CPU reference of kernels/adam.cu. The optimiser's state and
//! hyper-parameters live in `crate::optim::Adam`.

/// The hyper-parameters of step `t` (1-based, already counted).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Step {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub t: u64,
}

impl Step {
    /// The bias corrections `(1 − β1^t, 1 − β2^t)`, in f64 as PyTorch computes them.
    pub fn bias_corrections(&self) -> (f64, f64) {
        let t = self.t as i32;
        (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t))
    }
}

/// `params -= lr/bc1 · m / (sqrt(v)/sqrt(bc2) + eps)` after updating the moments `m, v` from
/// `grads` (all `[n]`).
pub fn update(s: Step, params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32]) {
    assert_eq!(params.len(), m.len(), "parameter count changed");
    assert_eq!(grads.len(), m.len(), "one gradient per parameter");
    assert_eq!(v.len(), m.len(), "one second moment per parameter");
    let (bc1, bc2) = s.bias_corrections();
    let (step_size, bc2_sqrt) = ((s.lr / bc1) as f32, bc2.sqrt() as f32);
    let b2 = s.beta2 as f32;
    let (one_m_b1, one_m_b2) = ((1.0 - s.beta1) as f32, (1.0 - s.beta2) as f32);
    let (wd, eps) = (s.weight_decay as f32, s.eps as f32);
    for (((p, &g), m), v) in params.iter_mut().zip(grads).zip(m).zip(v) {
        let g = if wd != 0.0 { g + wd * *p } else { g };
        // torch: exp_avg.lerp_(grad, 1 - β1); exp_avg_sq.mul_(β2).addcmul_(grad, grad, 1 - β2)
        *m += one_m_b1 * (g - *m);
        *v = *v * b2 + one_m_b2 * g * g;
        *p -= step_size * *m / (v.sqrt() / bc2_sqrt + eps);
    }
}
