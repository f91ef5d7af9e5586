//! plankton: plankton image classification as a streaming pipeline.
//!
//! The workspace is layered (docs/ARCHITECTURE.md): `plankton-core` holds the pure kernels,
//! `plankton-data` the data path, file formats, reports and the jobs that need no network; this
//! crate holds everything that runs a network (libtorch): the models, training, prediction,
//! fusion, the daemon, replay and the demo. The lower crates' modules are re-exported here at
//! their old paths, so `plankton::config`, `plankton::imgproc` and so on keep working.
pub mod demo;
pub mod device;
pub mod fusion;
pub mod model;
pub mod predict;
pub mod publish;
pub mod replay;
pub mod serve;
pub mod train;

pub use plankton_core::{fsx, imgproc, npy, par, rng, rows, scoring};
pub use plankton_data::{
    blend, config, data_path, drift, evaluate, features, sinks, sources, split, stages, telemetry,
    topology,
};
