//! Sinks: what the pipeline writes for people and downstream tools.
pub mod compact;
pub mod ecotaxa;
pub mod ifcb_scores;
pub mod parquet;
pub mod parquet_file;
pub mod plot;
pub mod preview;
pub mod report;
pub mod submission;
pub mod text;
