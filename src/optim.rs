//! Adam and ReduceLROnPlateau with PyTorch's semantics, over one flat parameter buffer.

use serde::{Deserialize, Serialize};

/// torch.optim.Adam (amsgrad off, L2 weight decay added to the gradient) over one flat f32
/// parameter buffer. The state is public so a GPU backend can run the same update as one
/// kernel and a checkpoint can store `m` and `v` as tensors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Adam {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Steps taken so far (PyTorch's `state['step']`).
    pub step: u64,
    /// First moment: [n_params]
    pub m: Vec<f32>,
    /// Second moment: [n_params]
    pub v: Vec<f32>,
}

impl Adam {
    /// PyTorch's defaults (β 0.9/0.999, eps 1e-8) with the given lr and weight decay.
    pub fn new(n_params: usize, lr: f64, weight_decay: f64) -> Self {
        Adam {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            step: 0,
            m: vec![0.0; n_params],
            v: vec![0.0; n_params],
        }
    }

    /// The hyper-parameters of the step counted so far (`self.step`).
    pub fn current(&self) -> crate::ops::adam::Step {
        crate::ops::adam::Step {
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            t: self.step,
        }
    }

    /// One update of `params: [n_params]` from `grads` (the step counted first).
    pub fn update(&mut self, params: &mut [f32], grads: &[f32]) {
        self.step += 1;
        crate::ops::adam::update(self.current(), params, grads, &mut self.m, &mut self.v);
    }
}

/// torch.optim.lr_scheduler.ReduceLROnPlateau in mode "min" with a relative threshold:
/// multiply the lr by `factor` when the metric has not improved by more than `threshold`
/// (relative) for more than `patience` epochs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReduceLrOnPlateau {
    pub factor: f64,
    pub patience: u32,
    pub threshold: f64,
    pub cooldown: u32,
    pub min_lr: f64,
    pub eps: f64,
    /// Best metric so far (None: +∞, before the first finite metric; JSON has no ∞).
    pub best: Option<f64>,
    pub num_bad_epochs: u32,
    pub cooldown_counter: u32,
}

impl Default for ReduceLrOnPlateau {
    /// PyTorch's defaults: factor 0.1, patience 10, threshold 1e-4, cooldown 0, min_lr 0, eps 1e-8.
    fn default() -> Self {
        ReduceLrOnPlateau {
            factor: 0.1,
            patience: 10,
            threshold: 1e-4,
            cooldown: 0,
            min_lr: 0.0,
            eps: 1e-8,
            best: None,
            num_bad_epochs: 0,
            cooldown_counter: 0,
        }
    }
}

impl ReduceLrOnPlateau {
    /// Record one epoch's metric (e.g. validation loss) and return the lr to use next.
    pub fn step(&mut self, metric: f64, lr: f64) -> f64 {
        // A NaN metric is never better (as in PyTorch, where the comparison is false).
        if metric < self.best.unwrap_or(f64::INFINITY) * (1.0 - self.threshold) {
            self.best = Some(metric);
            self.num_bad_epochs = 0;
        } else {
            self.num_bad_epochs += 1;
        }
        if self.cooldown_counter > 0 {
            self.cooldown_counter -= 1;
            self.num_bad_epochs = 0;
        }
        if self.num_bad_epochs > self.patience {
            self.cooldown_counter = self.cooldown;
            self.num_bad_epochs = 0;
            let new_lr = (lr * self.factor).max(self.min_lr);
            if lr - new_lr > self.eps {
                return new_lr;
            }
        }
        lr
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// Written by `scripts/optim_reference.py` with real PyTorch (torch.optim.Adam and
    /// lr_scheduler.ReduceLROnPlateau).
    fn reference() -> Value {
        serde_json::from_str(include_str!("../tests/fixtures/optim/reference.json")).unwrap()
    }

    fn f32s(v: &Value) -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    }

    #[test]
    fn adam_matches_pytorch() {
        for case in reference()["adam"].as_array().unwrap() {
            let mut params = f32s(&case["params0"]);
            let mut adam = Adam::new(
                params.len(),
                case["lr"].as_f64().unwrap(),
                case["weight_decay"].as_f64().unwrap(),
            );
            adam.beta1 = case["betas"][0].as_f64().unwrap();
            adam.beta2 = case["betas"][1].as_f64().unwrap();
            let grads = case["grads"].as_array().unwrap();
            for (t, (g, want)) in grads
                .iter()
                .zip(case["params"].as_array().unwrap())
                .enumerate()
            {
                let before = params.clone();
                adam.update(&mut params, &f32s(g));
                for (i, ((&p, w), b)) in params.iter().zip(f32s(want)).zip(before).enumerate() {
                    // Compare the update itself, relative to its size (f32 rounding only).
                    let (got_d, want_d) = (p - b, w - b);
                    assert!(
                        (got_d - want_d).abs() <= 1e-5 * want_d.abs() + 1e-7 * b.abs().max(1.0),
                        "lr {} step {t} param {i}: {p} vs torch {w}",
                        adam.lr
                    );
                }
            }
            assert_eq!(adam.step, grads.len() as u64);
        }
    }

    #[test]
    fn adam_state_round_trips_through_serde() {
        let mut adam = Adam::new(3, 1e-3, 0.0);
        let mut p = vec![0.3f32, -1.2, 2.5];
        adam.update(&mut p, &[0.1, -0.7, 0.02]);
        let back: Adam = serde_json::from_str(&serde_json::to_string(&adam).unwrap()).unwrap();
        assert_eq!(back, adam);
        // The restored optimiser continues exactly as the original.
        let (mut p1, mut p2) = (p.clone(), p);
        adam.update(&mut p1, &[0.5, 0.5, -0.5]);
        let mut back = back;
        back.update(&mut p2, &[0.5, 0.5, -0.5]);
        assert_eq!(p1, p2);
    }

    #[test]
    fn plateau_matches_pytorch() {
        for case in reference()["plateau"].as_array().unwrap() {
            let kw = &case["kwargs"];
            let mut s = ReduceLrOnPlateau::default();
            let fresh: ReduceLrOnPlateau =
                serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
            assert_eq!(fresh, s);
            if let Some(x) = kw["patience"].as_u64() {
                s.patience = x as u32;
            }
            if let Some(x) = kw["cooldown"].as_u64() {
                s.cooldown = x as u32;
            }
            if let Some(x) = kw["factor"].as_f64() {
                s.factor = x;
            }
            if let Some(x) = kw["min_lr"].as_f64() {
                s.min_lr = x;
            }
            if let Some(x) = kw["threshold"].as_f64() {
                s.threshold = x;
            }
            let mut lr = case["lr0"].as_f64().unwrap();
            let metrics = case["metrics"].as_array().unwrap();
            for (e, (m, want)) in metrics
                .iter()
                .zip(case["lrs"].as_array().unwrap())
                .enumerate()
            {
                lr = s.step(m.as_f64().unwrap(), lr);
                let want = want.as_f64().unwrap();
                assert!(
                    (lr - want).abs() <= 1e-12 * want,
                    "{kw} epoch {e}: lr {lr} vs torch {want}"
                );
            }
            let back: ReduceLrOnPlateau =
                serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
            assert_eq!(back, s);
        }
    }
}
