//! Evaluation of stored predictions: scores, per-class metrics, calibration, and the images a
//! person should check first.

pub mod calibration;
pub mod metrics;
