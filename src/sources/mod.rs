//! Sources: stages that yield image records (id, path, label if any).
pub mod planktonclas;
pub mod synth;
