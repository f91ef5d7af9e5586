//! plankton-data: everything between files and tensors that needs no libtorch: the pipeline
//! config, datasets and sources, the data-path stages and their async topology, telemetry,
//! the file formats (Parquet predictions and features, split files, submissions), reports and
//! plots, evaluation, blending and the image-feature job. Kernels come from `plankton-core`;
//! the network side (`plankton`) builds on this crate, never the other way round.
pub mod blend;
pub mod config;
pub mod data_path;
pub mod drift;
pub mod evaluate;
pub mod features;
pub mod run_dir;
pub mod sinks;
pub mod sources;
pub mod split;
pub mod stages;
pub mod table;
pub mod telemetry;
pub mod topology;
