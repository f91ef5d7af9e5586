//! Sources: where image records (id, path, label if any) come from.
pub mod dataset;
pub mod ifcb;
pub mod planktonclas;
pub mod synth;

pub use dataset::{Dataset, DatasetError, ImageRecord, LayoutProblem};
