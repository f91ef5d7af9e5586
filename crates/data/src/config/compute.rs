//! `[compute]`: how the network computes wherever it runs (applied by the main crate's `device`).
use serde::{Deserialize, Serialize};

/// Arithmetic precision of the network's forward (and so backward) pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    #[default]
    Fp32,
    /// bf16 autocast: convolutions and matmuls in bfloat16; weights, optimiser state, softmax
    /// and the loss stay fp32.
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fp32" => Ok(Precision::Fp32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(format!("precision `{s}`: expected fp32 or bf16")),
        }
    }
}

/// `[compute]` of a pipeline: how the network computes, wherever it runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ComputeConfig {
    pub precision: Precision,
    /// Activations and conv weights in channels-last (NHWC) layout, which tensor cores prefer.
    pub channels_last: bool,
    /// Let cuDNN time its algorithms once per input shape and keep the fastest.
    pub cudnn_benchmark: bool,
    /// TF32 for fp32 convolutions and matmuls on GPUs that have it (about 1e-3 relative error;
    /// PyTorch allows it for convolutions by default). Off: fp32 means IEEE fp32.
    pub tf32: bool,
}

impl Default for ComputeConfig {
    fn default() -> Self {
        ComputeConfig {
            precision: Precision::Fp32,
            channels_last: false,
            cudnn_benchmark: true,
            tf32: false,
        }
    }
}
