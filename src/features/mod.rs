//! Image features for late fusion (SPEC.md "Extra image features"): pure kernels on the decoded
//! uint8 image, separate from the plumbing so they can be tested and benchmarked alone.

pub mod haralick;
pub mod job;
pub mod lbp;
pub mod moments;
pub mod tas;
pub mod writer;
pub mod zernike;
