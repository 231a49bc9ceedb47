//! `gpu::ops::adam::update` against `ops::adam::update` (the CPU's f32 step) and against
//! torch.optim.Adam's formula in f64: three steps with weight decay (an L2 term added to the
//! gradient) over a size that is not a multiple of the block.

use crate::common::gpu::{check, f64s, read, refused, Exec};
use mura::gpu::ops::adam;
use mura::gpu::DeviceBuffer;
use mura::ops::adam::{self as cpu, Step};

/// Parameters and moments `[n]`: host vectors or device buffers.
struct State<V> {
    p: V,
    m: V,
    v: V,
}

impl<T: Copy + Default> State<Vec<T>> {
    /// `p` with zero moments.
    fn new(p: Vec<T>) -> State<Vec<T>> {
        let zeros = vec![T::default(); p.len()];
        State {
            m: zeros.clone(),
            v: zeros,
            p,
        }
    }
}

/// torch.optim.Adam's step `s` in f64.
fn torch_step(s: Step, st: &mut State<Vec<f64>>, g: &[f32]) {
    let (bc1, bc2) = s.bias_corrections();
    for (((p, m), v), &g) in st.p.iter_mut().zip(&mut st.m).zip(&mut st.v).zip(g) {
        let grad = g as f64 + s.weight_decay * *p;
        *m = s.beta1 * *m + (1.0 - s.beta1) * grad;
        *v = s.beta2 * *v + (1.0 - s.beta2) * grad * grad;
        *p -= s.lr / bc1 * *m / (v.sqrt() / bc2.sqrt() + s.eps);
    }
}

/// The hyper-parameters of step `t`: PyTorch's defaults, learning rate 1e-3, weight decay `wd`.
fn step(t: u64, wd: f64) -> Step {
    Step {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: wd,
        t,
    }
}

/// `n` normal samples times `scale`, as f32.
fn f32s(x: &mut Exec, n: usize, scale: f64) -> Vec<f32> {
    x.randn(n, scale, 0.0).iter().map(|&v| v as f32).collect()
}

#[test]
fn three_steps_with_weight_decay() {
    let x = &mut Exec::new::<f32>("adam_update");
    let n = 5_003;
    let p0 = f32s(x, n, 1.0);
    let dev = State {
        p: DeviceBuffer::from_slice(&x.d, &p0).unwrap(),
        m: DeviceBuffer::<f32>::zeroed(&x.d, n).unwrap(),
        v: DeviceBuffer::<f32>::zeroed(&x.d, n).unwrap(),
    };
    let (mut cpu_st, mut f64_st) = (State::new(p0.clone()), State::new(f64s(&p0)));
    for t in 1..=3 {
        let (s, g) = (step(t, 1e-2), f32s(x, n, 0.1));
        let gb = DeviceBuffer::from_slice(&x.d, &g).unwrap();
        let moments = (dev.m.slice(), dev.v.slice());
        adam::update(&*x.d, s, dev.p.slice(), gb.slice(), moments).unwrap();
        cpu::update(s, &mut cpu_st.p, &g, &mut cpu_st.m, &mut cpu_st.v);
        torch_step(s, &mut f64_st, &g);
        let dev = [("params", &dev.p), ("m", &dev.m), ("v", &dev.v)];
        let cpu = [&cpu_st.p, &cpu_st.m, &cpu_st.v].map(|v| f64s(v));
        let f64 = [&f64_st.p, &f64_st.m, &f64_st.v];
        for (((what, b), c), r) in dev.into_iter().zip(cpu).zip(f64) {
            let got = read(b);
            check(&format!("{what} after step {t} (CPU)"), &got, &c, 1e-5);
            check(&format!("{what} after step {t} (f64)"), &got, r, 1e-5);
        }
    }
}

/// Gradients or moments of another length than the parameters are refused, nothing updated.
#[test]
fn refuses_mismatched_lengths() {
    let x = &mut Exec::new::<f32>("adam_refuses");
    let n = 10;
    let (p, p0) = x.random::<f32>(n, 1.0, 0.0);
    let b = DeviceBuffer::<f32>::zeroed(&x.d, n).unwrap();
    let short = b.slice().range(0, n - 1).unwrap();
    let s = step(1, 0.0);
    let (d, ps, bs) = (&*x.d, p.slice(), b.slice());
    let e = adam::update(d, s, ps, short, (bs, bs));
    refused(
        e,
        "Adam over 10 parameters with 9 gradients and 10/10 moments",
    );
    let e = adam::update(d, s, ps, bs, (bs, short));
    refused(
        e,
        "Adam over 10 parameters with 10 gradients and 10/9 moments",
    );
    check("params after refused steps", &read(&p), &p0, 0.0);
}
