//! Prediction: quasi-random test-time augmentation (Halton transforms), aggregation of the
//! per-transform outputs, and the streaming `plankton predict` job.

pub mod aggregate;
pub use plankton_core::halton;
pub mod job;
pub mod tta;
