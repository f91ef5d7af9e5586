//! Pipeline stages: decode, warp (rescale + augment), normalise (ZMUV), batch. Each file holds
//! the per-item work of one stage; `topology` runs them as async tasks and worker threads.
pub mod batch;
pub use plankton_core::decode;
pub mod normalise;
pub mod warp;
