//! plankton-core: the pure parts of plankton, with no libtorch, no async runtime and no file
//! formats beyond `.npy`: image decoding and warping, the feature kernels, scoring and metrics,
//! calibration, L-BFGS, the Halton sequence, the counter-based RNG and durable file writes.
//! A kernel here is changed, tested and benchmarked without linking libtorch
//! (`cargo test -p plankton-core`).
pub mod aggregate;
pub mod calibration;
pub mod clock;
pub mod decode;
pub mod drift;
pub mod features;
pub mod fsx;
pub mod halton;
pub mod ifcb;
pub mod imgproc;
pub mod lbfgs;
pub mod metrics;
pub mod npy;
pub mod par;
pub mod rng;
pub mod rows;
pub mod scoring;
pub mod tta;
pub mod unknown;
