//! Sinks: what the pipeline writes for people and downstream tools.
pub mod preview;
