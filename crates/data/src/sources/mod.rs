//! Sources: where image records (id, path, label if any) come from.
pub mod dataset;
pub mod ecotaxa;
pub use plankton_core::ifcb;
pub mod planktonclas;
pub mod synth;

pub use dataset::{is_dataset, Dataset, DatasetError, ImageRecord, LayoutProblem};
