//! plankton: plankton image classification as a streaming pipeline.
pub mod rng;
pub mod sources;
