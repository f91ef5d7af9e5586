//! Prediction: quasi-random test-time augmentation (Halton transforms), aggregation of the
//! per-transform outputs, and the streaming `plankton predict` job.

pub use plankton_core::{aggregate, halton, tta};
pub mod job;
pub mod unknown;
