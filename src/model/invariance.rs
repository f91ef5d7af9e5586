//! The cyclic networks' defining property, checkable on any device: the logits do not change
//! when the input is rotated by 90, 180 or 270 degrees (`plankton model --check-invariance`,
//! the GPU check, and the model tests).

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use super::cyclic::rot90;
use super::Network;

/// Largest relative logit change accepted in fp32.
pub const TOLERANCE: f64 = 1e-4;
/// ... and under bf16 autocast, where a rotated input rounds differently (8-bit mantissa).
pub const TOLERANCE_BF16: f64 = 5e-2;

/// The tolerance for a network's precision.
pub fn tolerance(precision: crate::device::Precision) -> f64 {
    match precision {
        crate::device::Precision::Fp32 => TOLERANCE,
        crate::device::Precision::Bf16 => TOLERANCE_BF16,
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct InvarianceCheck {
    pub images: usize,
    pub rotations: usize,
    /// Largest |logit(rotated) - logit(original)| over every image, class and rotation.
    pub max_abs_difference: f64,
    /// `max_abs_difference` / the largest |logit|.
    pub max_relative_difference: f64,
    pub max_abs_logit: f64,
    /// The relative difference for 90, 180 and 270 degrees.
    pub per_rotation: Vec<f64>,
}

/// Forward passes of `images` random inputs (seeded, drawn on the CPU) and their three
/// rotations on the network's device, in evaluation mode.
pub fn check(net: &Network, sizes: &[usize], images: usize, seed: i64) -> InvarianceCheck {
    tch::manual_seed(seed);
    let host: Vec<Tensor> = sizes
        .iter()
        .map(|&s| {
            Tensor::randn(
                [images as i64, 1, s as i64, s as i64],
                (Kind::Float, Device::Cpu),
            )
        })
        .collect();
    let _guard = tch::no_grad_guard();
    let logits = |k: i64| {
        let inputs: Vec<Tensor> = host
            .iter()
            .map(|x| net.upload(&rot90(x, k).contiguous()))
            .collect();
        net.forward_t(&inputs, false)
            .to_kind(Kind::Double)
            .to_device(Device::Cpu)
    };
    let base = logits(0);
    let max_abs_logit = base.abs().max().double_value(&[]);
    let diffs: Vec<f64> = (1..4)
        .map(|k| (&base - logits(k)).abs().max().double_value(&[]))
        .collect();
    let max_abs_difference = diffs.iter().cloned().fold(0.0, f64::max);
    let scale = max_abs_logit.max(1e-12);
    InvarianceCheck {
        images,
        rotations: 3,
        max_abs_difference,
        max_relative_difference: max_abs_difference / scale,
        max_abs_logit,
        per_rotation: diffs.iter().map(|d| d / scale).collect(),
    }
}
