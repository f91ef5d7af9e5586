//! Image features for late fusion (SPEC.md "Extra image features"): pure kernels on the decoded
//! uint8 image, separate from the plumbing so they can be tested and benchmarked alone.

pub mod job;
pub mod writer;

pub use plankton_core::features::{haralick, lbp, moments, tas, zernike};
