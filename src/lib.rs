//! plankton: plankton image classification as a streaming pipeline.
pub mod config;
pub mod imgproc;
pub mod rng;
pub mod sources;
pub mod stages;
pub mod telemetry;
pub mod topology;
pub mod split;
pub mod npy;
pub mod sinks;
pub mod data_path;
