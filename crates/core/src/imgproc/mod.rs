//! Pure image kernels, free of async plumbing, so they can be tested and benchmarked alone.
pub mod affine;
pub mod thumbnail;
pub mod warp;

pub use affine::{patch_transform, size_normalised_ds, Affine, Augmentation, AugmentationRanges};
pub use thumbnail::{area_resize, thumbnail};
pub use warp::{warp_inverted, GrayView};
