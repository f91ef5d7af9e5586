//! `[model]` section of a pipeline TOML: a named preset (scaled by `width`, pooling depth
//! adapted to the patch size) or explicit layer lists, one `[[model.branch]]` per network input.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// The reference's `convroll4`: slice, 4 conv stages each ending in pool + conv roll,
    /// dense, dense roll, dense, cyclic pool, softmax.
    #[default]
    Convroll4,
    /// The same conv stack without any cyclic layer (one view per image), for comparison.
    Plain,
    /// `convroll4` on input 0 (size-normalised) + a half-width `convroll4` on input 1
    /// (fixed-scale), joined before the softmax (the reference's `doublescale`).
    Multiscale,
    /// Only the `[[model.branch]]` layer lists.
    Custom,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// max(x, slope * x) with the model's `leaky_slope`.
    #[default]
    Leaky,
    Relu,
    Linear,
}

/// One layer of a branch. Dense layers flatten a conv map first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum LayerSpec {
    /// CyclicSlice: 4 rotated views of every image along the batch axis.
    Slice {},
    /// The 8-way variant: the image and its 45-degree rotation, then CyclicSlice (8 views).
    Slice8 {},
    /// 3x3 "same" convolution.
    Conv {
        filters: usize,
        #[serde(default)]
        activation: Activation,
        /// One bias per channel per position; `None` = the model's `untied_biases`.
        #[serde(default)]
        untied_biases: Option<bool>,
    },
    /// Overlapping max pooling 3x3, stride 2, no padding.
    Pool {},
    /// CyclicConvRoll (channels x4).
    ConvRoll {},
    Dropout {
        p: f64,
    },
    /// Fully connected; with `maxout = k` it has k*units outputs max-pooled in groups of k.
    Dense {
        units: usize,
        #[serde(default)]
        activation: Activation,
        #[serde(default = "one")]
        maxout: usize,
    },
    /// CyclicRoll of dense features (x4).
    DenseRoll {},
    /// CyclicPool over the views.
    CyclicPool {
        #[serde(default)]
        function: PoolFunction,
    },
}

fn one() -> usize {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BranchConfig {
    /// Which `[[patch]]` this branch reads.
    #[serde(default)]
    pub input: usize,
    pub layers: Vec<LayerSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    pub preset: Preset,
    /// Channel and dense-unit multiplier for presets (0.25 = quarter width).
    pub width: f64,
    /// Pooling stages of a preset branch; 0 = as many as keep the map at least 5 px (4 for 95,
    /// 3 for 47).
    pub stages: usize,
    /// Dense units of preset branches (before `width`).
    pub dense_units: usize,
    /// Maxout pieces in preset dense layers (the reference's big models used 2 with 512 units).
    pub maxout: usize,
    pub untied_biases: bool,
    /// Negative slope of the leaky ReLU (the reference: 1/3).
    pub leaky_slope: f64,
    /// Dropout before every dense layer of a preset and before the classifier.
    pub dropout: f64,
    pub cyclic_pool: PoolFunction,
    /// 4, or 8 for the variant that adds the 45-degree rotation.
    pub views: usize,
    #[serde(rename = "branch")]
    pub branches: Vec<BranchConfig>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            preset: Preset::Convroll4,
            width: 1.0,
            stages: 0,
            dense_units: 256,
            maxout: 1,
            untied_biases: false,
            leaky_slope: 1.0 / 3.0,
            dropout: 0.5,
            cyclic_pool: PoolFunction::Rms,
            views: 4,
            branches: Vec::new(),
        }
    }
}

/// The reference convroll4's conv stages (filters per conv), each followed by pool + roll.
const CONVROLL4_STAGES: [&[usize]; 4] = [&[32, 16], &[64, 32], &[128, 128, 64], &[256, 256, 128]];

/// Map size after `n` 3x3 stride-2 pools without padding.
pub fn pooled_size(mut size: usize, n: usize) -> usize {
    for _ in 0..n {
        size = size.saturating_sub(3) / 2 + 1;
    }
    size
}

fn auto_stages(size: usize) -> usize {
    (1..=CONVROLL4_STAGES.len())
        .take_while(|&n| size >= 3 && pooled_size(size, n) >= 5)
        .last()
        .unwrap_or(1)
}

impl ModelConfig {
    /// Checks of the scalar settings (the layer lists are checked when the network is built).
    pub fn validate(&self) -> Result<(), String> {
        if !(self.width > 0.0 && self.width.is_finite()) {
            return Err(format!("model.width must be > 0, got {}", self.width));
        }
        if self.stages > CONVROLL4_STAGES.len() {
            return Err(format!(
                "model.stages: the presets have at most {}, got {}",
                CONVROLL4_STAGES.len(),
                self.stages
            ));
        }
        if !(self.leaky_slope.is_finite() && (0.0..1.0).contains(&self.leaky_slope)) {
            return Err(format!(
                "model.leaky_slope must be in [0, 1), got {}",
                self.leaky_slope
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!(
                "model.dropout must be in [0, 1), got {}",
                self.dropout
            ));
        }
        if self.views != 4 && self.views != 8 {
            return Err(format!("model.views must be 4 or 8, got {}", self.views));
        }
        if self.dense_units == 0 || self.maxout == 0 {
            return Err("model.dense_units and model.maxout must be > 0".into());
        }
        if self.preset == Preset::Custom && self.branches.is_empty() {
            return Err("model.preset = \"custom\" needs [[model.branch]] layer lists".into());
        }
        if self.preset != Preset::Custom && !self.branches.is_empty() {
            return Err("[[model.branch]] layer lists need model.preset = \"custom\"".into());
        }
        Ok(())
    }

    fn scaled(&self, n: usize, width: f64) -> usize {
        ((n as f64 * width).round() as usize).max(1)
    }

    /// The layer lists this config stands for: `patch_sizes` are the (square) input sizes.
    pub fn branches(&self, patch_sizes: &[usize]) -> Vec<BranchConfig> {
        let size = |i: usize| patch_sizes.get(i).copied().unwrap_or(0);
        match self.preset {
            Preset::Custom => self.branches.clone(),
            Preset::Convroll4 => vec![self.preset_branch(0, size(0), self.width, true)],
            Preset::Plain => vec![self.preset_branch(0, size(0), self.width, false)],
            Preset::Multiscale => vec![
                self.preset_branch(0, size(0), self.width, true),
                self.preset_branch(1, size(1), self.width / 2.0, true),
            ],
        }
    }

    fn preset_branch(&self, input: usize, size: usize, width: f64, cyclic: bool) -> BranchConfig {
        let stages = if self.stages > 0 {
            self.stages.min(CONVROLL4_STAGES.len())
        } else {
            auto_stages(size)
        };
        let mut layers = Vec::new();
        if cyclic {
            layers.push(if self.views == 8 {
                LayerSpec::Slice8 {}
            } else {
                LayerSpec::Slice {}
            });
        }
        for stage in &CONVROLL4_STAGES[..stages] {
            for &f in stage.iter() {
                layers.push(LayerSpec::Conv {
                    filters: self.scaled(f, width),
                    activation: Activation::Leaky,
                    untied_biases: None,
                });
            }
            layers.push(LayerSpec::Pool {});
            if cyclic {
                layers.push(LayerSpec::ConvRoll {});
            }
        }
        let dense = |layers: &mut Vec<LayerSpec>| {
            layers.push(LayerSpec::Dropout { p: self.dropout });
            layers.push(LayerSpec::Dense {
                units: self.scaled(self.dense_units, width),
                activation: if self.maxout > 1 {
                    Activation::Linear
                } else {
                    Activation::Leaky
                },
                maxout: self.maxout,
            });
        };
        dense(&mut layers);
        if cyclic {
            layers.push(LayerSpec::DenseRoll {});
        }
        dense(&mut layers);
        if cyclic {
            layers.push(LayerSpec::CyclicPool {
                function: self.cyclic_pool,
            });
        }
        BranchConfig { input, layers }
    }
}

/// How `pool` reduces over the views.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PoolFunction {
    /// sqrt(mean(x^2) + 1e-12): the reference's final choice.
    #[default]
    Rms,
    Mean,
    Max,
}
