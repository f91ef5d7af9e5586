//! Image feature kernels for late fusion (SPEC.md "Extra image features"): pure functions of the
//! decoded uint8 image.
pub mod haralick;
pub mod lbp;
pub mod moments;
pub mod tas;
pub mod zernike;
