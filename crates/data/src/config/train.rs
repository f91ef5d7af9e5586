//! `[train]` section of a pipeline TOML. Defaults are the reference's convroll4 run: 840 chunks
//! of 8,192 images in batches of 32 = 215,040 steps, Nesterov momentum 0.9, learning rate 0.003
//! divided by 10 at chunks 700 and 800, validation and checkpoint every 20 chunks.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// SGD with Nesterov momentum (Lasagne's form: v = mu v - lr g; w += mu v - lr g).
    #[default]
    Nesterov,
    Adam,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Optimiser steps; each step is one batch of `batch.size` images (x views inside the net).
    pub steps: u64,
    pub optimizer: OptimizerKind,
    pub learning_rate: f64,
    pub momentum: f64,
    /// Points (fractions of `steps`) where the learning rate is multiplied by `lr_drop_factor`.
    pub lr_drops: Vec<f64>,
    pub lr_drop_factor: f64,
    /// Explicit schedule as `[step, learning_rate]` pairs (first must be step 0); replaces
    /// `learning_rate` / `lr_drops` when given.
    pub lr_schedule: Vec<(u64, f64)>,
    /// L2 coefficient lambda of `lambda * sum(w^2)` over non-bias parameters (the reference's big
    /// models: 0.0005).
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    /// Validate (and log validation scores) every this many steps, and at the end.
    pub validate_every: u64,
    /// Write a resumable checkpoint every this many steps, and at the end.
    pub checkpoint_every: u64,
    /// Checkpoints kept on disk (the best weights are kept separately).
    pub keep_checkpoints: usize,
    /// Torch intra-op threads; 0 = one per core.
    pub threads: usize,
    /// Steps between structured log lines when no terminal shows a progress bar.
    pub log_every: u64,
    /// Steps between read-backs of the training loss from the device (each waits for the
    /// device to finish). 0: every step on the CPU (free there), every `log_every` steps on a
    /// GPU, so it never waits for the host in between.
    pub loss_readback_every: u64,
    /// Dropout while training. The reference switched it off for its final pseudo-labelled
    /// models: the soft targets regularise enough.
    pub dropout: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 215_040,
            optimizer: OptimizerKind::Nesterov,
            learning_rate: 0.003,
            momentum: 0.9,
            lr_drops: vec![700.0 / 840.0, 800.0 / 840.0],
            lr_drop_factor: 0.1,
            lr_schedule: Vec::new(),
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            validate_every: 5_120,
            checkpoint_every: 5_120,
            keep_checkpoints: 2,
            threads: 0,
            log_every: 100,
            loss_readback_every: 0,
            dropout: true,
        }
    }
}

impl TrainConfig {
    /// The learning rate for (0-based) step `step`.
    pub fn learning_rate_at(&self, step: u64) -> f64 {
        if !self.lr_schedule.is_empty() {
            return self
                .lr_schedule
                .iter()
                .take_while(|(s, _)| *s <= step)
                .last()
                .map(|&(_, lr)| lr)
                .unwrap_or(self.lr_schedule[0].1);
        }
        let drops = self
            .lr_drops
            .iter()
            .filter(|&&f| step >= (f * self.steps as f64).round() as u64)
            .count();
        self.learning_rate * self.lr_drop_factor.powi(drops as i32)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.steps == 0 {
            return Err("train.steps must be > 0".into());
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return Err(format!(
                "train.learning_rate must be > 0, got {}",
                self.learning_rate
            ));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(format!(
                "train.momentum must be in [0, 1), got {}",
                self.momentum
            ));
        }
        if let Some(f) = self.lr_drops.iter().find(|f| !(0.0..=1.0).contains(*f)) {
            return Err(format!("train.lr_drops are fractions of the run, got {f}"));
        }
        if let Some(&(s, _)) = self.lr_schedule.first() {
            if s != 0 {
                return Err("train.lr_schedule must start at step 0".into());
            }
            if self.lr_schedule.windows(2).any(|w| w[0].0 >= w[1].0) {
                return Err("train.lr_schedule steps must increase".into());
            }
            if self
                .lr_schedule
                .iter()
                .any(|&(_, lr)| !(lr > 0.0 && lr.is_finite()))
            {
                return Err("train.lr_schedule learning rates must be > 0".into());
            }
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(format!(
                "train.weight_decay must be >= 0, got {}",
                self.weight_decay
            ));
        }
        if self.validate_every == 0 || self.checkpoint_every == 0 || self.log_every == 0 {
            return Err("train.validate_every, checkpoint_every and log_every must be > 0".into());
        }
        if self.keep_checkpoints == 0 {
            return Err("train.keep_checkpoints must be >= 1 (resume needs one)".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_schedule_drops_at_chunks_700_and_800() {
        let c = TrainConfig::default();
        let chunk = 256; // 8192 / 32 steps per chunk
        assert_eq!(c.learning_rate_at(0), 0.003);
        assert_eq!(c.learning_rate_at(700 * chunk - 1), 0.003);
        assert!((c.learning_rate_at(700 * chunk) - 0.0003).abs() < 1e-12);
        assert!((c.learning_rate_at(800 * chunk) - 0.00003).abs() < 1e-12);
    }

    #[test]
    fn explicit_schedule_wins() {
        let c = TrainConfig {
            lr_schedule: vec![(0, 0.1), (10, 0.01)],
            ..Default::default()
        };
        assert_eq!(c.learning_rate_at(9), 0.1);
        assert_eq!(c.learning_rate_at(10), 0.01);
        assert!(c.validate().is_ok());
    }
}
