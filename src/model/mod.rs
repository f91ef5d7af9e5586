//! The convnets: cyclic layers (`cyclic`), architecture config (`config`), and the network
//! built from it (`network`).

pub use plankton_data::config::model as config;
pub mod cyclic;
pub mod invariance;
pub mod network;

pub use config::{Activation, BranchConfig, LayerSpec, ModelConfig, Preset};
pub use cyclic::PoolFunction;
pub use network::{LayerInfo, Network, Param};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid model: {0}")]
    Invalid(String),
    #[error("{path}: {message}")]
    Io {
        path: std::path::PathBuf,
        message: String,
    },
}
