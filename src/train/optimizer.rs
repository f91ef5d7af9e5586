//! SGD with Nesterov momentum and Adam, with L2 weight decay on non-bias parameters, written
//! over plain tensors so that their state can be checkpointed and restored exactly.

use std::collections::HashMap;
use std::path::Path;

use tch::{Device, Tensor};

use super::config::{OptimizerKind, TrainConfig};
use super::TrainError;
use crate::model::Param;

pub struct Optimizer {
    kind: OptimizerKind,
    momentum: f64,
    weight_decay: f64,
    betas: (f64, f64),
    epsilon: f64,
    /// Per parameter: Nesterov velocity, or Adam's first moment.
    first: Vec<Tensor>,
    /// Adam's second moment (empty for Nesterov).
    second: Vec<Tensor>,
    /// Updates applied so far (Adam's bias correction).
    pub updates: u64,
}

impl Optimizer {
    pub fn new(cfg: &TrainConfig, params: &[Param]) -> Self {
        let zeros = || {
            params
                .iter()
                .map(|p| p.tensor.zeros_like())
                .collect::<Vec<_>>()
        };
        Optimizer {
            kind: cfg.optimizer,
            momentum: cfg.momentum,
            weight_decay: cfg.weight_decay,
            betas: (cfg.adam_beta1, cfg.adam_beta2),
            epsilon: cfg.adam_epsilon,
            first: zeros(),
            second: if cfg.optimizer == OptimizerKind::Adam {
                zeros()
            } else {
                Vec::new()
            },
            updates: 0,
        }
    }

    /// Applies one update from the gradients in `params` (then zeroes them).
    pub fn step(&mut self, params: &mut [Param], lr: f64) {
        let _guard = tch::no_grad_guard();
        self.updates += 1;
        for (i, p) in params.iter_mut().enumerate() {
            let mut grad = p.tensor.grad();
            if !grad.defined() {
                continue;
            }
            // d/dw of lambda * sum(w^2).
            if p.decay && self.weight_decay > 0.0 {
                // A new tensor, not `+=`: in place would change the stored gradient itself.
                #[allow(clippy::assign_op_pattern)]
                {
                    grad = grad + &p.tensor * (2.0 * self.weight_decay);
                }
            }
            match self.kind {
                OptimizerKind::Nesterov => {
                    let step = &grad * lr;
                    let v = &mut self.first[i];
                    let _ = v.g_mul_scalar_(self.momentum).g_sub_(&step);
                    // One addition into the weights: rounding then stays below the update's.
                    let _ = p.tensor.g_add_(&(&*v * self.momentum - &step));
                }
                OptimizerKind::Adam => {
                    let (b1, b2) = self.betas;
                    let t = self.updates as i32;
                    let m = &mut self.first[i];
                    let _ = m.g_mul_scalar_(b1);
                    let _ = m.g_add_(&(&grad * (1.0 - b1)));
                    let v = &mut self.second[i];
                    let _ = v.g_mul_scalar_(b2);
                    let _ = v.g_add_(&(grad.square() * (1.0 - b2)));
                    let m_hat = &self.first[i] / (1.0 - b1.powi(t));
                    let v_hat = &self.second[i] / (1.0 - b2.powi(t));
                    let update = m_hat / (v_hat.sqrt() + self.epsilon) * lr;
                    let _ = p.tensor.g_sub_(&update);
                }
            }
            p.tensor.zero_grad();
        }
    }

    /// Saves the moment tensors (named after their parameters) to a safetensors file.
    pub fn save(&self, params: &[Param], path: &Path) -> Result<(), TrainError> {
        let mut named: Vec<(String, Tensor)> = Vec::new();
        for (i, p) in params.iter().enumerate() {
            // contiguous(): channels-last state is saved in the standard layout.
            named.push((
                format!("first.{}", p.name),
                self.first[i].to_device(Device::Cpu).contiguous(),
            ));
            if let Some(s) = self.second.get(i) {
                named.push((
                    format!("second.{}", p.name),
                    s.to_device(Device::Cpu).contiguous(),
                ));
            }
        }
        Tensor::write_safetensors(&named, path).map_err(|e| TrainError::io(path, e))
    }

    pub fn load(&mut self, params: &[Param], path: &Path, updates: u64) -> Result<(), TrainError> {
        let stored = Tensor::read_safetensors(path).map_err(|e| TrainError::io(path, e))?;
        let by_name: HashMap<String, Tensor> = stored.into_iter().collect();
        let _guard = tch::no_grad_guard();
        for (i, p) in params.iter().enumerate() {
            let restore = |slot: &mut Tensor, key: String| -> Result<(), TrainError> {
                let t = by_name.get(&key).ok_or_else(|| TrainError::Checkpoint {
                    path: path.to_path_buf(),
                    reason: format!(
                        "no optimiser state `{key}` (was it saved by another optimiser?)"
                    ),
                })?;
                slot.copy_(t);
                Ok(())
            };
            restore(&mut self.first[i], format!("first.{}", p.name))?;
            if let Some(s) = self.second.get_mut(i) {
                restore(s, format!("second.{}", p.name))?;
            }
        }
        self.updates = updates;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// One parameter w with loss 0.5 * sum(w^2) (gradient w), optionally decayed.
    fn param(values: &[f32], decay: bool) -> Vec<Param> {
        let t = Tensor::from_slice(values).set_requires_grad(true);
        vec![Param {
            name: "w".into(),
            tensor: t,
            decay,
        }]
    }

    fn backward(params: &[Param]) {
        (params[0].tensor.square().sum(Kind::Float) * 0.5).backward();
    }

    fn values(params: &[Param]) -> Vec<f32> {
        Vec::try_from(&params[0].tensor.detach()).unwrap()
    }

    #[test]
    fn nesterov_follows_lasagnes_update() {
        let cfg = TrainConfig {
            momentum: 0.9,
            weight_decay: 0.0,
            ..Default::default()
        };
        let mut p = param(&[1.0, -2.0], false);
        let mut opt = Optimizer::new(&cfg, &p);
        // Step 1 from v = 0: v = -lr g; w += mu v - lr g = -(1 + mu) lr g.
        backward(&p);
        opt.step(&mut p, 0.1);
        let w1 = values(&p);
        assert!((w1[0] - (1.0 - 1.9 * 0.1)).abs() < 1e-6, "{w1:?}");
        // Step 2: g = w1, v = mu (-lr g0) - lr g1; w += mu v - lr g1.
        backward(&p);
        opt.step(&mut p, 0.1);
        let v = 0.9 * (-0.1 * 1.0) - 0.1 * w1[0];
        let expected = w1[0] + 0.9 * v - 0.1 * w1[0];
        assert!((values(&p)[0] - expected).abs() < 1e-6);
        assert_eq!(opt.updates, 2);
    }

    #[test]
    fn weight_decay_applies_to_weights_only() {
        let cfg = TrainConfig {
            momentum: 0.0,
            weight_decay: 0.5,
            ..Default::default()
        };
        for (decay, expected) in [(true, 1.0 - 0.1 * (1.0 + 2.0 * 0.5)), (false, 1.0 - 0.1)] {
            let mut p = param(&[1.0], decay);
            let mut opt = Optimizer::new(&cfg, &p);
            backward(&p);
            opt.step(&mut p, 0.1);
            assert!(
                (values(&p)[0] - expected as f32).abs() < 1e-6,
                "decay {decay}"
            );
        }
    }

    #[test]
    fn adam_first_step_moves_each_weight_by_the_learning_rate() {
        let cfg = TrainConfig {
            optimizer: OptimizerKind::Adam,
            ..Default::default()
        };
        let mut p = param(&[3.0, -0.001], false);
        let mut opt = Optimizer::new(&cfg, &p);
        backward(&p);
        opt.step(&mut p, 0.01);
        // Bias-corrected m/sqrt(v) = g/|g| on the first step, whatever the gradient's size.
        let w = values(&p);
        assert!(
            (w[0] - 2.99).abs() < 1e-5 && (w[1] - 0.009).abs() < 1e-5,
            "{w:?}"
        );
    }

    #[test]
    fn state_round_trips_through_safetensors() {
        let cfg = TrainConfig {
            optimizer: OptimizerKind::Adam,
            ..Default::default()
        };
        let mut p = param(&[1.0, 2.0], true);
        let mut opt = Optimizer::new(&cfg, &p);
        backward(&p);
        opt.step(&mut p, 0.01);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("opt.safetensors");
        opt.save(&p, &path).unwrap();
        let mut restored = Optimizer::new(&cfg, &p);
        restored.load(&p, &path, opt.updates).unwrap();
        let mut q = param(&values(&p), true);
        backward(&p);
        opt.step(&mut p, 0.01);
        backward(&q);
        restored.step(&mut q, 0.01);
        assert_eq!(values(&p), values(&q));
        // Nesterov state has no second moment: loading Adam's file into it is fine, the
        // reverse names the missing tensor.
        let nesterov = Optimizer::new(&TrainConfig::default(), &p);
        nesterov.save(&p, &path).unwrap();
        let err = restored.load(&p, &path, 1).unwrap_err().to_string();
        assert!(err.contains("second.w"), "{err}");
    }
}
