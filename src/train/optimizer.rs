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
        let zeros = || params.iter().map(|p| p.tensor.zeros_like()).collect::<Vec<_>>();
        Optimizer {
            kind: cfg.optimizer,
            momentum: cfg.momentum,
            weight_decay: cfg.weight_decay,
            betas: (cfg.adam_beta1, cfg.adam_beta2),
            epsilon: cfg.adam_epsilon,
            first: zeros(),
            second: if cfg.optimizer == OptimizerKind::Adam { zeros() } else { Vec::new() },
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
                grad = grad + &p.tensor * (2.0 * self.weight_decay);
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
            named.push((format!("first.{}", p.name), self.first[i].to_device(Device::Cpu)));
            if let Some(s) = self.second.get(i) {
                named.push((format!("second.{}", p.name), s.to_device(Device::Cpu)));
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
                    reason: format!("no optimiser state `{key}` (was it saved by another optimiser?)"),
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
