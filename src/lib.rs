//! plankton: plankton image classification as a streaming pipeline.
pub mod config;
pub mod data_path;
pub mod demo;
pub mod evaluate;
pub mod imgproc;
pub mod model;
pub mod npy;
pub mod predict;
pub mod rng;
pub mod scoring;
pub mod sinks;
pub mod sources;
pub mod split;
pub mod stages;
pub mod telemetry;
pub mod topology;
pub mod train;
