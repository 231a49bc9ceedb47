//! `gpu::ops::bn` against `ops::bn` in f64, over a channel slice `[c0, c0 + c)` of a wider
//! `[rows, rs]` buffer: batch statistics; coefficients with the running-statistics update (train)
//! and from the running statistics (eval); the apply, with and without ReLU, into a slice; the
//! backward (train and eval, with and without ReLU) accumulated into a prefix of a wider buffer;
//! the backward with its per-channel part deferred and applied by `grad_fix`; and the statistics
//! and backward from per-channel sums, as the tensor-core convolutions' epilogues add them up.
//! Outputs poisoned with NaN, or random values that results are added to.

use crate::common::gpu::{
    all_nan, all_zero, check, check_cond, cols, column_sums, mat, plus_cols, read, refused,
    untouched_outside, Exec,
};
use crate::test_device;
use mura::gpu::ops::bn::{
    self, Affine, CoefStep, Deferred, Finish, Grad, Pending, Running, Saved, Scratch, Stats,
};
use mura::gpu::ops::BnRelu;
use mura::gpu::{Act, DeviceBuffer, Mat};
use mura::ops::bn::{self as cpu, BnOpts};
use mura::ops::{Activation, Mode, Out, Rows, Write};

// 5 channels at 2 of 9, 37 rows.
test_device!(slice_37x5, rows37);
fn rows37<T: Act>(x: &mut Exec) {
    case::<T>(x, (37, 5, 2, 9));
}

// All of 40 channels, 3000 rows (several row chunks).
test_device!(whole_3000x40, rows3000);
fn rows3000<T: Act>(x: &mut Exec) {
    case::<T>(x, (3000, 40, 0, 40));
}

// 3 channels at 1 of 4, 2 rows: x·scale and shift nearly cancel (condition-aware bounds).
test_device!(two_rows, rows2);
fn rows2<T: Act>(x: &mut Exec) {
    case::<T>(x, (2, 3, 1, 4));
}

/// Every step of one BN, `(rows, c, c0, rs)`.
fn case<T: Act>(x: &mut Exec, dims: (usize, usize, usize, usize)) {
    let b = Case::<T>::draw(x, dims);
    let (train, running) = b.train(x);
    let eval = b.eval(x, running);
    b.apply(x, &train);
    let opts = |act, mode| BnOpts { act, mode };
    for (norm, opts) in [
        (&train, BnOpts::relu(Mode::Train)),
        (&train, opts(Activation::Identity, Mode::Train)),
        (&eval, BnOpts::relu(Mode::Eval)),
    ] {
        b.backward(x, norm, opts);
    }
    b.backward_deferred(x, &train);
    b.coefficients_from_sums(x);
    b.backward_from_coef(x, &train);
}

/// Two `[c]` f32 vectors on the device: (mean, var), (scale, shift) or (alpha, beta).
struct Two(DeviceBuffer<f32>, DeviceBuffer<f32>);

impl Two {
    fn poisoned(x: &Exec, c: usize) -> Two {
        Two(x.poisoned(c), x.poisoned(c))
    }
    fn upload(x: &Exec, a: &[f64], b: &[f64]) -> Two {
        Two(x.upload(a).0, x.upload(b).0)
    }
    fn read(&self) -> [Vec<f64>; 2] {
        [read(&self.0), read(&self.1)]
    }
    fn stats(&self) -> Stats {
        Stats {
            mean: self.0.slice(),
            var: self.1.slice(),
        }
    }
    fn coef(&self) -> BnRelu {
        BnRelu {
            scale: self.0.slice(),
            shift: self.1.slice(),
        }
    }
    fn affine(&self) -> Affine {
        Affine {
            gamma: self.0.slice(),
            beta: self.1.slice(),
        }
    }
    fn deferred(&self) -> Deferred {
        Deferred {
            alpha: self.0.slice(),
            beta: self.1.slice(),
        }
    }
}

/// The statistics and coefficients a BN normalised with, on the device, and the values the
/// references use: `mv` the statistics, `st` the coefficients from them.
struct Norm {
    stats: Two,
    coef: Two,
    mv: [Vec<f64>; 2],
    st: [Vec<f64>; 2],
}

/// Running statistics on the device, and their reference values.
type RunningStats = (Two, [Vec<f64>; 2]);

/// A BN over channels `[c0, c0 + c)` of `x: [rows, rs]`, its inputs on the device and as stored,
/// and its scratch.
struct Case<T: Act> {
    what: String,
    rows: usize,
    c: usize,
    /// x's memory, `[rows, rs]` (`xm` views its channels).
    _xb: DeviceBuffer<T>,
    /// The channels read, `[rows, c]`.
    x: Vec<f64>,
    xm: Mat<T>,
    gamma: (DeviceBuffer<f32>, Vec<f64>),
    beta: (DeviceBuffer<f32>, Vec<f64>),
    /// The running mean and variance before the step.
    run0: [Vec<f64>; 2],
    part: DeviceBuffer<f32>,
    coef: DeviceBuffer<f32>,
    /// The reductions' count of finished blocks (zero, and left zero by every launch).
    done: DeviceBuffer<u32>,
}

/// BN inputs `[rows, rs]` (channels `c0 .. c0 + c` used), gamma, beta and running statistics
/// `[c]` whose pre-activations x·scale + shift (batch and, after the running-stat update,
/// running statistics) all keep 1e-6 of their terms' size away from 0 (5× the f32 kernels'
/// rounding there), where they and the f64 reference could take different ReLU branches (about
/// 1 draw in 100 had one). `x` rounded to `T`, the rest to f32; redrawn until well-posed.
fn well_posed<T: Act>(
    x: &mut Exec,
    (rows, c, c0, rs): (usize, usize, usize, usize),
) -> [Vec<f64>; 5] {
    let to_t = |v: Vec<f64>| {
        v.iter()
            .map(|&v| T::from_f64(v).to_f64())
            .collect::<Vec<_>>()
    };
    let to_f32 = |v: Vec<f64>| v.iter().map(|&v| v as f32 as f64).collect::<Vec<_>>();
    loop {
        let xv = to_t(x.randn(rows * rs, 2.0, 3.0));
        let (gamma, beta) = (x.randn(c, 0.5, 1.0), x.randn(c, 0.5, 0.0));
        let (rm0, rv0) = (x.randn(c, 1.0, 0.0), x.randn(c, 0.1, 1.0));
        let [gamma, beta, rm0, rv0] = [gamma, beta, rm0, rv0].map(to_f32);
        let xs = cols(&xv, rs, c0, c);
        let (m, v) = cpu::batch_stats(&xs, rows, c, c);
        let (mut rm, mut rv) = (rm0.clone(), rv0.clone());
        cpu::update_running(&mut rm, &mut rv, &m, &v, rows);
        let clear = |(s, t): (Vec<f64>, Vec<f64>)| {
            (0..rows * c).all(|i| {
                let (xs, t) = (xs[i] * s[i % c], t[i % c]);
                (xs + t).abs() >= 1e-6 * (xs.abs() + t.abs())
            })
        };
        if clear(cpu::scale_shift(&gamma, &beta, &m, &v))
            && clear(cpu::scale_shift(&gamma, &beta, &rm, &rv))
        {
            return [xv, gamma, beta, rm0, rv0];
        }
    }
}

impl<T: Act> Case<T> {
    fn draw(x: &mut Exec, (rows, c, c0, rs): (usize, usize, usize, usize)) -> Case<T> {
        let [xv, gamma, beta, rm0, rv0] = well_posed::<T>(x, (rows, c, c0, rs));
        let (xb, stored) = x.upload::<T>(&xv);
        assert_eq!(xv, stored, "stored as drawn");
        Case {
            what: format!("{:?} bn rows={rows} c={c}", T::PRECISION),
            rows,
            c,
            xm: mat(&xb, rows, rs, (c0, c)),
            _xb: xb,
            x: cols(&xv, rs, c0, c),
            gamma: x.upload(&gamma),
            beta: x.upload(&beta),
            run0: [rm0, rv0],
            part: DeviceBuffer::zeroed(&x.d, bn::scratch_len(c)).unwrap(),
            coef: DeviceBuffer::alloc(&x.d, 2 * c).unwrap(),
            done: DeviceBuffer::zeroed(&x.d, 1).unwrap(),
        }
    }

    /// The reductions' scratch, its block count checked to be zero again after a launch.
    fn scratch(&self) -> Scratch {
        Scratch {
            part: self.part.slice(),
            coef: self.coef.slice(),
            done: self.done.slice(),
        }
    }

    /// The block count and the reductions' partial sums are left zero.
    fn left_zero(&self, what: &str) {
        assert_eq!(
            self.done.to_vec().unwrap(),
            [0],
            "{what}: block count not left zero"
        );
        assert!(
            all_zero(&read(&self.part)),
            "{what}: partial sums not left zero"
        );
    }

    fn params(&self) -> Affine {
        Affine {
            gamma: self.gamma.0.slice(),
            beta: self.beta.0.slice(),
        }
    }

    fn saved(&self, n: &Norm) -> Saved<T> {
        Saved {
            x: self.xm,
            stats: n.stats.stats(),
            coef: n.coef.coef(),
        }
    }

    /// The per-channel (Σa, Σa·b) of `a, b: [rows, c]`, on the device (f32).
    fn sums(&self, x: &Exec, a: &[f64], b: &[f64]) -> DeviceBuffer<f32> {
        x.upload(&column_sums(&vec![0.0; 2 * self.c], a, b, self.c))
            .0
    }

    /// A contiguous `[rows, c]` buffer as a view.
    fn m(&self, b: &DeviceBuffer<T>) -> Mat<T> {
        mat(b, self.rows, self.c, (0, self.c))
    }

    /// A random dy `[rows, c]` on the device, and as stored.
    fn dy(&self, x: &mut Exec) -> (DeviceBuffer<T>, Vec<f64>) {
        x.random(self.rows * self.c, 1.0, 0.0)
    }

    /// `dy` masked by the training forward's ReLU: 0 where it clipped.
    fn masked(&self, n: &Norm, dy: &[f64]) -> Vec<f64> {
        let c = self.c;
        let on = |i: usize| self.x[i] * n.st[0][i % c] + n.st[1][i % c] > 0.0;
        (0..dy.len())
            .map(|i| if on(i) { dy[i] } else { 0.0 })
            .collect()
    }

    /// Batch statistics, then the coefficients with the running-statistics update: what the
    /// training forward normalised with, and the running statistics after it.
    fn train(&self, x: &Exec) -> (Norm, RunningStats) {
        let (rows, c) = (self.rows, self.c);
        let (stats, mv) = self.batch_stats(x);
        let run = Two::upload(x, &self.run0[0], &self.run0[1]);
        let coef = Two::poisoned(x, c);
        let running = Some(Running {
            stats: run.stats(),
            count: rows,
        });
        bn::scale_shift(
            &*x.d,
            self.params(),
            stats.stats(),
            running,
            None,
            coef.coef(),
        )
        .unwrap();
        let st = self.coefficients(&mv);
        self.check_pair("scale", "shift", &coef, &st);
        let [mut rm, mut rv] = self.run0.clone();
        cpu::update_running(&mut rm, &mut rv, &mv[0], &mv[1], rows);
        let rmv = [rm, rv];
        self.check_pair("running mean", "running var", &run, &rmv);
        self.train_in_one_launch(x, [&stats, &coef, &run]);
        (
            Norm {
                stats,
                coef,
                mv,
                st,
            },
            (run, rmv),
        )
    }

    /// The same in one launch, its last block merging the statistics and finishing the
    /// coefficients ([`Finish::Coefficients`], as the stem's pool statistics run): the statistics,
    /// coefficients and running statistics are the two launches' exactly.
    fn train_in_one_launch(&self, x: &Exec, two: [&Two; 3]) {
        let (what, c) = (format!("{} one-launch coefficients", self.what), self.c);
        let (stats, coef) = (Two::poisoned(x, c), Two::poisoned(x, c));
        let run = Two::upload(x, &self.run0[0], &self.run0[1]);
        let step = CoefStep {
            params: self.params(),
            stats: stats.stats(),
            running: Running {
                stats: run.stats(),
                count: self.rows,
            },
            out: coef.coef(),
            done: self.done.slice(),
        };
        bn::batch_stats(&*x.d, self.xm, Finish::Coefficients(step), self.scratch()).unwrap();
        self.left_zero(&what);
        for (name, got, want) in [
            ("stats", &stats, two[0]),
            ("coef", &coef, two[1]),
            ("running", &run, two[2]),
        ] {
            check(
                &format!("{what} {name}"),
                &got.read().concat(),
                &want.read().concat(),
                0.0,
            );
        }
    }

    /// The batch statistics, on the device and as computed there.
    fn batch_stats(&self, x: &Exec) -> (Two, [Vec<f64>; 2]) {
        let (what, c) = (&self.what, self.c);
        let stats = Two::poisoned(x, c);
        bn::batch_stats(&*x.d, self.xm, Finish::Stats(stats.stats()), self.scratch()).unwrap();
        self.left_zero(&format!("{what} batch stats"));
        let (m_ref, v_ref) = cpu::batch_stats(&self.x, self.rows, c, c);
        let mv = stats.read();
        check(&format!("{what} mean"), &mv[0], &m_ref, x.tol.min(1e-5));
        check(&format!("{what} var"), &mv[1], &v_ref, x.tol.min(1e-5));
        (stats, mv)
    }

    /// The coefficients from the running statistics (eval), which stay as they are.
    fn eval(&self, x: &Exec, (run, rmv): RunningStats) -> Norm {
        let coef = Two::poisoned(x, self.c);
        let before = run.read();
        bn::scale_shift(&*x.d, self.params(), run.stats(), None, None, coef.coef()).unwrap();
        let st = self.coefficients(&rmv);
        self.check_pair("eval scale", "eval shift", &coef, &st);
        let w = format!("{} running stats unchanged by eval", self.what);
        check(&w, &run.read().concat(), &before.concat(), 0.0);
        Norm {
            stats: run,
            coef,
            mv: rmv,
            st,
        }
    }

    /// The reference (scale, shift) from statistics `mv`.
    fn coefficients(&self, mv: &[Vec<f64>; 2]) -> [Vec<f64>; 2] {
        let (s, t) = cpu::scale_shift(&self.gamma.1, &self.beta.1, &mv[0], &mv[1]);
        [s, t]
    }

    /// Both vectors of `got` against `want`, within f32 accuracy.
    fn check_pair(&self, a: &str, b: &str, got: &Two, want: &[Vec<f64>; 2]) {
        let [ga, gb] = got.read();
        check(&format!("{} {a}", self.what), &ga, &want[0], 1e-5);
        check(&format!("{} {b}", self.what), &gb, &want[1], 1e-5);
    }

    /// The apply (+ ReLU) into channels `[1, 1 + c)` of a poisoned `[rows, c + 2]`.
    fn apply(&self, x: &Exec, n: &Norm) {
        let (rows, c) = (self.rows, self.c);
        for act in [Activation::Identity, Activation::Relu] {
            let what = format!("{} apply {act:?}", self.what);
            let yb = x.poisoned::<T>(rows * (c + 2));
            let y = mat(&yb, rows, c + 2, (1, c));
            bn::apply(&*x.d, self.xm, n.coef.coef(), act, y).unwrap();
            let mut y_ref = vec![0.0; rows * c];
            let xr = Rows::new(&self.x[..], rows, c, c);
            cpu::apply(xr, &n.st[0], &n.st[1], act, &mut y_ref, c);
            let terms: Vec<f64> = (0..rows * c)
                .map(|i| (self.x[i] * n.st[0][i % c]).abs() + n.st[1][i % c].abs())
                .collect();
            let y = read(&yb);
            check_cond(&what, &cols(&y, c + 2, 1, c), &y_ref, &terms, x.tol);
            assert!(
                untouched_outside(&y, c + 2, 1, c),
                "{what}: wrote outside its slice"
            );
        }
    }

    /// The backward (training: batch statistics, eval: running ones) of a random dy.
    fn backward(&self, x: &mut Exec, n: &Norm, opts: BnOpts) {
        let what = format!("{} bwd {opts:?}", self.what);
        let (dyb, dy) = self.dy(x);
        let g = Grads::draw(x, self);
        let (s, dym) = (self.saved(n), self.m(&dyb));
        bn::backward(&*x.d, s, opts, dym, g.affine(), g.grad(), self.scratch()).unwrap();
        self.left_zero(&what);
        let want = g.reference(self, &n.mv, opts, &dy);
        g.check_dx(&what, &want.dx, None, x.tol);
        g.check_params(&what, &want, x.tol);
    }

    /// `dx0` (`[rows, c + 1]`) plus scale·dz in its first c channels: what a deferred backward's
    /// per-element pass (or the data-gradient convolution's epilogue) leaves in dx.
    fn per_element(&self, n: &Norm, dx0: &[f64], dz: &[f64]) -> Vec<f64> {
        let c = self.c;
        let sdz: Vec<f64> = dz
            .iter()
            .enumerate()
            .map(|(i, v)| n.st[0][i % c] * v)
            .collect();
        plus_cols(dx0, (c + 1, 0, c), &sdz)
    }

    /// The training backward (with ReLU) deferred: dx receives scale·dz, the per-channel terms
    /// go to alpha and beta (which hold another reader's share), `grad_fix` adds them.
    fn backward_deferred(&self, x: &mut Exec, n: &Norm) {
        let what = format!("{} bwd deferred", self.what);
        let (dyb, dy) = self.dy(x);
        let g = Grads::draw(x, self);
        let share = Share::draw(x, self.c);
        let (s, dym, scratch) = (self.saved(n), self.m(&dyb), self.scratch());
        let def = share.dev.deferred();
        bn::backward_deferred(&*x.d, s, dym, g.affine(), g.grad(), scratch, def).unwrap();
        self.left_zero(&what);
        let want = g.reference(self, &n.mv, BnOpts::relu(Mode::Train), &dy);
        g.check_params(&what, &want, x.tol);
        // dx: its initial values plus scale·dz, each rounded to T (bounded by their sizes).
        let (dx_rs, c) = (self.c + 1, self.c);
        let after = self.per_element(n, &g.dx.1, &self.masked(n, &dy));
        let (dx0, per_element) = (cols(&g.dx.1, dx_rs, 0, c), cols(&after, dx_rs, 0, c));
        let terms: Vec<f64> = dx0
            .iter()
            .zip(&per_element)
            .map(|(a, b)| a.abs() + (b - a).abs())
            .collect();
        g.check_dx(
            &format!("{what} (per-element pass)"),
            &per_element,
            Some(&terms),
            x.tol,
        );
        self.fix(x, &g, &share, (&after, &want.dx), (&what, x.tol));
    }

    /// `grad_fix` of `g.dx`, which holds `after` (its initial values plus the per-element term
    /// scale·dz; as stored, rounded), with the per-channel terms of `share` (this BN's added to
    /// another reader's). The reference: what was stored, plus the exact rest of the BN backward
    /// (`full` less the per-element term) and the other reader's share. (Against `full` itself,
    /// bf16's rounding of the stored intermediate would count: when the rest cancels most of
    /// scale·dz, as with 2 rows, that is more than 1e-2 of the result.)
    fn fix(
        &self,
        x: &Exec,
        g: &Grads<T>,
        share: &Share,
        (after, full): (&[f64], &[f64]),
        (what, tol): (&str, f64),
    ) {
        let (rows, c, dx_rs) = (self.rows, self.c, self.c + 1);
        let stored = read(&g.dx.0);
        let (mut want, mut terms) = (Vec::new(), Vec::new());
        for r in 0..rows {
            for j in 0..c {
                let i = r * dx_rs + j;
                let rest = full[r * c + j] - after[i];
                let share = share.other[j] + share.other[c + j] * self.x[r * c + j];
                want.push(stored[i] + rest + share);
                terms.push(stored[i].abs() + rest.abs() + share.abs());
            }
        }
        bn::grad_fix(&*x.d, g.grad().mat, self.xm, share.dev.deferred()).unwrap();
        g.check_dx(&format!("{what} fixed"), &want, Some(&terms), tol);
    }

    /// The coefficients of a BN over 3 more channels than the sums of x cover: those 3 take
    /// their statistics from mean, var (left as they were), the last c from the sums (written
    /// into mean, var); the running statistics of all are updated, the sums zeroed.
    fn coefficients_from_sums(&self, x: &mut Exec) {
        let (rows, c, cc) = (self.rows, self.c, self.c + 3);
        let sums = self.sums(x, &self.x, &self.x);
        let nan = vec![f64::NAN; c];
        let (m_head, v_head) = (x.randn(3, 1.0, 0.0), x.randn(3, 0.2, 1.0));
        let stats = Two::upload(
            x,
            &[&m_head[..], &nan].concat(),
            &[&v_head[..], &nan].concat(),
        );
        let head = stats.read().map(|v| v[..3].to_vec());
        let (gamma, beta) = (x.randn(cc, 0.5, 1.0), x.randn(cc, 0.5, 0.0));
        let params = Two::upload(x, &gamma, &beta);
        let run0 = [x.randn(cc, 1.0, 0.0), x.randn(cc, 0.1, 1.0)];
        let run = Two::upload(x, &run0[0], &run0[1]);
        let out = Two::poisoned(x, cc);
        let running = Some(Running {
            stats: run.stats(),
            count: rows,
        });
        let pending = Some(Pending {
            sums: sums.slice(),
            channels: c,
        });
        let affine = params.affine();
        bn::scale_shift(&*x.d, affine, stats.stats(), running, pending, out.coef()).unwrap();
        let mv = stats.read();
        self.check_stats_from_sums(&mv, &head);
        assert!(all_zero(&read(&sums)), "{}: sums not zeroed", self.what);
        let [gamma, beta] = params.read();
        let (s_all, t_all) = cpu::scale_shift(&gamma, &beta, &mv[0], &mv[1]);
        self.check_pair("scale (sums)", "shift (sums)", &out, &[s_all, t_all]);
        let [mut rm, mut rv] = run0;
        cpu::update_running(&mut rm, &mut rv, &mv[0], &mv[1], rows);
        self.check_pair("running mean (sums)", "running var (sums)", &run, &[rm, rv]);
    }

    /// Statistics `mv` of 3 + c channels: the first 3 as they were (`head`), the last c those of
    /// x, from sums.
    fn check_stats_from_sums(&self, mv: &[Vec<f64>; 2], head: &[Vec<f64>; 2]) {
        let (what, c) = (&self.what, self.c);
        check(&format!("{what} mean kept"), &mv[0][..3], &head[0], 0.0);
        check(&format!("{what} var kept"), &mv[1][..3], &head[1], 0.0);
        let (m_ref, v_ref) = cpu::batch_stats(&self.x, self.rows, c, c);
        check(&format!("{what} mean from sums"), &mv[0][3..], &m_ref, 1e-5);
        // var = Σx²/rows − mean²: f32 sums, so relative to Σx²/rows (over 2 rows var can be far
        // smaller).
        let second: Vec<f64> = (0..c).map(|j| v_ref[j] + m_ref[j] * m_ref[j]).collect();
        let w = format!("{what} var from sums");
        check_cond(&w, &mv[1][3..], &v_ref, &second, 1e-5);
    }

    /// The training backward (with ReLU) from its per-channel coefficients, as a data-gradient
    /// convolution's BN step leaves them (`conv_tc::BnStep`, whose own test checks them and the
    /// parameters' gradients): a = Σdz/N and b = Σdz·(x − mean)/(N·(var + eps)), here taken from
    /// f32 sums (Σdz, Σdz·x) of the masked gradient dz as that step takes them, in double. x has
    /// mean 3, so a lost mean·Σdz term would show; Σdz·(x − mean) = Σdz·x − mean·Σdz cancels (f32
    /// sums, mean 3 next to std 2, few rows): within 1e-4 in f32 (the path serves bf16 storage,
    /// whose rounding is 2e-3).
    fn backward_from_coef(&self, x: &mut Exec, n: &Norm) {
        let what = format!("{} bwd from coefficients", self.what);
        let tol = x.tol.max(1e-4);
        let dy = x.randn(self.rows * self.c, 1.0, 0.0);
        let (dzb, dz) = x.upload::<T>(&self.masked(n, &dy));
        let g = Grads::draw(x, self);
        let want = g.reference(self, &n.mv, BnOpts::relu(Mode::Train), &dz);
        let (c, rows) = (self.c, self.rows as f64);
        let red = read(&self.sums(x, &dz, &self.x));
        let (m, v) = (&n.mv[0], &n.mv[1]);
        let coef: Vec<f64> = (0..c)
            .map(|j| red[j] / rows)
            .chain((0..c).map(|j| {
                let sdx = red[c + j] - m[j] * red[j];
                sdx / (v[j] + 1e-5) / rows
            }))
            .collect();
        let (coef, _) = x.upload::<f32>(&coef);
        let (s, dzm) = (self.saved(n), self.m(&dzb));
        bn::backward_from_coef(&*x.d, s, dzm, g.grad(), coef.slice()).unwrap();
        let terms = self.sums_terms(n, &dz, &g.dx.1);
        g.check_dx(&what, &want.dx, Some(&terms), tol);
    }

    /// The sizes of the terms of dx = dx0 + scale·(dz − Σdz/N − x̂·Σdz·(x − mean)/(N·σ)), the
    /// last sum taken as Σdz·x − mean·Σdz from f32 sums (over 2 rows they cancel to nothing).
    fn sums_terms(&self, n: &Norm, dz: &[f64], dx0: &[f64]) -> Vec<f64> {
        let (rows, c) = (self.rows, self.c);
        let (mg, vg, s) = (&n.mv[0], &n.mv[1], &n.st[0]);
        let (mut sum_dz, mut sum_dzx) = (vec![0.0; c], vec![0.0; c]);
        for i in 0..rows * c {
            sum_dz[i % c] += dz[i].abs();
            sum_dzx[i % c] += (dz[i] * self.x[i]).abs();
        }
        let nr = rows as f64;
        (0..rows * c)
            .map(|i| {
                let j = i % c;
                let sd = (vg[j] + 1e-5).sqrt();
                let xhat = (self.x[i] - mg[j]) / sd;
                let sum_dzx = sum_dzx[j] + mg[j].abs() * sum_dz[j];
                dx0[(i / c) * (c + 1) + j].abs()
                    + s[j].abs() * (dz[i].abs() + sum_dz[j] / nr + xhat.abs() * sum_dzx / (nr * sd))
            })
            .collect()
    }
}

/// Another reader's share of the deferred terms: random `alpha, beta: [c]`.
struct Share {
    dev: Two,
    other: Vec<f64>,
}

impl Share {
    fn draw(x: &mut Exec, c: usize) -> Share {
        let other = x.randn(2 * c, 0.1, 0.0);
        let other: Vec<f64> = other.iter().map(|&v| v as f32 as f64).collect();
        Share {
            dev: Two::upload(x, &other[..c], &other[c..]),
            other,
        }
    }
}

/// A backward's outputs, random values its results are added to: `dx: [rows, c + 1]` (the
/// first c channels written), dgamma and dbeta `[c]` f32; on the device and as stored.
struct Grads<T: Act> {
    rows: usize,
    c: usize,
    dx: (DeviceBuffer<T>, Vec<f64>),
    dg: (DeviceBuffer<f32>, Vec<f64>),
    db: (DeviceBuffer<f32>, Vec<f64>),
}

/// The reference results of a backward: dx `[rows, c]`, dgamma, dbeta.
struct Want {
    dx: Vec<f64>,
    dg: Vec<f64>,
    db: Vec<f64>,
}

impl<T: Act> Grads<T> {
    fn draw(x: &mut Exec, b: &Case<T>) -> Grads<T> {
        let dx = x.randn(b.rows * (b.c + 1), 1.0, 0.0);
        let (dg, db) = (x.randn(b.c, 1.0, 0.0), x.randn(b.c, 1.0, 0.0));
        Grads::with(x, b, [&dx, &dg, &db])
    }
    fn with(x: &Exec, b: &Case<T>, [dx, dg, db]: [&[f64]; 3]) -> Grads<T> {
        Grads {
            rows: b.rows,
            c: b.c,
            dx: x.upload(dx),
            dg: x.upload(dg),
            db: x.upload(db),
        }
    }
    fn affine(&self) -> Affine {
        Affine {
            gamma: self.dg.0.slice(),
            beta: self.db.0.slice(),
        }
    }
    /// dx's first c channels, accumulated into.
    fn grad(&self) -> Grad<T> {
        Grad {
            mat: mat(&self.dx.0, self.rows, self.c + 1, (0, self.c)),
            write: Write::Accumulate,
        }
    }
    /// The initial values plus the CPU backward (`opts`) of `dy: [rows, c]` through the BN
    /// normalised with statistics `mv`.
    fn reference(&self, b: &Case<T>, mv: &[Vec<f64>; 2], opts: BnOpts, dy: &[f64]) -> Want {
        let (rows, c) = (b.rows, b.c);
        let (mut dg, mut db) = (self.dg.1.clone(), self.db.1.clone());
        let mut dx = cols(&self.dx.1, c + 1, 0, c);
        let bn = cpu::Bn {
            gamma: &b.gamma.1,
            beta: &b.beta.1,
            mean: &mv[0],
            var: &mv[1],
        };
        let dparams = cpu::ParamGrads {
            dgamma: &mut dg,
            dbeta: &mut db,
        };
        let (xr, dyr) = (Rows::new(&b.x[..], rows, c, c), Rows::new(dy, rows, c, c));
        cpu::backward(xr, bn, opts, dyr, dparams, Out::accumulate(&mut dx, c));
        Want { dx, dg, db }
    }
    /// dx's first c channels against `want` (relative to `terms`' sizes when given); the last
    /// channel as it was.
    fn check_dx(&self, what: &str, want: &[f64], terms: Option<&[f64]>, tol: f64) {
        let (dx, c, rs) = (read(&self.dx.0), self.c, self.c + 1);
        let got = cols(&dx, rs, 0, c);
        match terms {
            Some(t) => check_cond(&format!("{what} dx"), &got, want, t, tol),
            None => check(&format!("{what} dx"), &got, want, tol),
        }
        let (beyond, was) = (cols(&dx, rs, c, 1), cols(&self.dx.1, rs, c, 1));
        check(&format!("{what} dx beyond c"), &beyond, &was, 0.0);
    }
    fn check_params(&self, what: &str, want: &Want, tol: f64) {
        check(&format!("{what} dgamma"), &read(&self.dg.0), &want.dg, tol);
        check(&format!("{what} dbeta"), &read(&self.db.0), &want.db, tol);
    }
}

/// A `[4, 3]` f32 input on the device, 384 f32 of poisoned scratch (a BN's reductions' for 3
/// channels) and poisoned (mean, var) or (scale, shift).
fn small(x: &mut Exec) -> (DeviceBuffer<f32>, DeviceBuffer<f32>, Two) {
    let (xb, _) = x.random::<f32>(4 * 3, 1.0, 0.0);
    (xb, x.poisoned(bn::scratch_len(3)), Two::poisoned(x, 3))
}

/// Operands that do not cover the launch's shapes are refused before anything is launched: the
/// outputs stay poisoned.
#[test]
fn refuses_operands_that_do_not_fit() {
    let x = &mut Exec::new::<f32>("bn_refuses");
    let (rows, c) = (4, 3);
    let (xb, f, out) = small(x);
    let xm = mat(&xb, rows, c, (0, c));
    let (d, short) = (&*x.d, |n: usize| f.slice().range(0, n).unwrap());
    let done = DeviceBuffer::<u32>::zeroed(&x.d, 1).unwrap();
    let scratch = |part| Scratch {
        part,
        coef: f.slice(),
        done: done.slice(),
    };
    let stats = Finish::Stats(out.stats());
    let e = bn::batch_stats(d, xm, stats, scratch(short(bn::scratch_len(c) - 1)));
    refused(e, "the BN scratch: 383 elements where 384 are needed");
    let stats = Stats {
        mean: short(2),
        ..out.stats()
    };
    refused(
        bn::batch_stats(d, xm, Finish::Stats(stats), scratch(f.slice())),
        "a BN's mean: 2 elements where 3 are needed",
    );
    let yb = x.poisoned::<f32>(rows * c);
    let e = bn::apply(
        d,
        xm,
        out.coef(),
        Activation::Relu,
        mat(&yb, rows, c, (0, 2)),
    );
    refused(e, "BN apply: [4, 3] and [4, 2] differ");
    let params = Affine {
        gamma: short(c),
        beta: short(c),
    };
    let pending = |channels| {
        Some(Pending {
            sums: f.slice(),
            channels,
        })
    };
    let e = bn::scale_shift(d, params, out.stats(), None, pending(c), out.coef());
    refused(e, "BN statistics from sums need the batch's row count");
    let running = Some(Running {
        stats: out.stats(),
        count: rows,
    });
    let e = bn::scale_shift(d, params, out.stats(), running, pending(c + 2), out.coef());
    refused(e, "5 pending channels of a BN of 3");
    let def = Deferred {
        alpha: short(2),
        beta: short(3),
    };
    let e = bn::grad_fix(d, mat(&yb, rows, c, (0, c)), xm, def);
    refused(e, "the deferred alpha: 2 elements where 3 are needed");
    let (yv, fv) = (read(&yb), read(&f));
    assert!(
        all_nan(&yv) && all_nan(&fv) && all_nan(&out.read().concat()),
        "a refused call wrote"
    );
}

/// A backward whose input gradient does not match its input is refused before anything is
/// launched: the parameters' gradients, the scratch, the sums and the deferred terms untouched.
#[test]
fn backward_refuses_before_launching() {
    let x = &mut Exec::new::<f32>("bn_backward_refuses");
    let (xb, f, st) = small(x);
    let (xm, d) = (mat(&xb, 4, 3, (0, 3)), &*x.d);
    let saved = Saved {
        x: xm,
        stats: st.stats(),
        coef: st.coef(),
    };
    let (grads, def) = (Two::poisoned(x, 3), Two::poisoned(x, 3));
    let dparams = Affine {
        gamma: grads.0.slice(),
        beta: grads.1.slice(),
    };
    let dxb = x.poisoned::<f32>(2 * 3);
    let dx = Grad {
        mat: mat(&dxb, 2, 3, (0, 3)),
        write: Write::Overwrite,
    };
    let done = DeviceBuffer::<u32>::zeroed(&x.d, 1).unwrap();
    let scratch = Scratch {
        part: f.slice(),
        coef: f.slice(),
        done: done.slice(),
    };
    let e = bn::backward(
        d,
        saved,
        BnOpts::relu(Mode::Train),
        xm,
        dparams,
        dx,
        scratch,
    );
    refused(e, "BN backward (dx): [4, 3] and [2, 3] differ");
    let e = bn::backward_deferred(d, saved, xm, dparams, dx, scratch, def.deferred());
    refused(e, "BN backward (dx): [4, 3] and [2, 3] differ");
    let e = bn::backward_from_coef(d, saved, xm, dx, f.slice());
    refused(e, "BN backward (dx): [4, 3] and [2, 3] differ");
    let all = [
        grads.read().concat(),
        def.read().concat(),
        read(&f),
        read(&dxb),
    ];
    assert!(all.iter().all(|v| all_nan(v)), "a refused backward wrote");
}
