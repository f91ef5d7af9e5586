//! plankton: plankton image classification as a streaming pipeline.
pub mod blend;
pub mod config;
pub mod data_path;
pub mod demo;
pub mod device;
pub mod evaluate;
pub mod features;
pub mod fusion;
pub mod model;
pub mod predict;
pub mod replay;
pub mod serve;
pub mod sinks;
pub mod sources;
pub mod split;
pub mod stages;
pub mod telemetry;
pub mod topology;
pub mod train;

// The pure kernels live in plankton-core (no libtorch); re-exported at their old paths.
pub use plankton_core::{fsx, imgproc, npy, rng, scoring};
