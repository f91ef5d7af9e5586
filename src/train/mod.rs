//! Training: the loop that pulls batches from the data path (bounded channel, so the next
//! batches are prepared while the model computes), the optimiser, validation, checkpoints and
//! the run directory.

pub mod curve;
pub mod optimizer;
mod prepare;
pub mod pseudo;
mod trainer;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use crate::device::BatchTensors;

pub use optimizer::Optimizer;
pub use plankton_data::config::train::{self as config, OptimizerKind, TrainConfig};
pub use plankton_data::run_dir::{self, HistoryRow, RunDir, RunDirError, TrainState};
pub use trainer::run;

use crate::config::PipelineConfig;
use crate::model::{ModelError, Network};
use crate::scoring::{self, Scores};
use crate::sources::ImageRecord;
use crate::stages::batch::Batch;
use crate::stages::normalise::Zmuv;
use crate::topology::{Failure, Loader, LoaderSpec, SamplePlan};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{path}: bad checkpoint: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Dataset(#[from] crate::sources::dataset::DatasetError),
    #[error(transparent)]
    Split(#[from] crate::split::SplitError),
    #[error(transparent)]
    Normalise(#[from] crate::stages::normalise::NormaliseError),
    #[error("data path: {0}")]
    Loader(#[from] crate::topology::LoaderError),
    #[error("training diverged at step {step}: loss is {loss} (lower the learning rate; the last checkpoint is intact)")]
    Diverged { step: u64, loss: f64 },
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    #[error(transparent)]
    Busy(#[from] crate::fsx::LockError),
}

impl From<RunDirError> for TrainError {
    fn from(e: RunDirError) -> Self {
        match e {
            RunDirError::Io { path, message } => TrainError::Io { path, message },
            RunDirError::Checkpoint { path, reason } => TrainError::Checkpoint { path, reason },
        }
    }
}

impl TrainError {
    pub fn io(path: &Path, e: impl std::fmt::Display) -> Self {
        TrainError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }
}

/// What `plankton train` asks for.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// The pipeline. On resume the run's own `pipeline.toml` is used; only a different
    /// `train.steps` (with everything else equal) is taken from here, to lengthen the run.
    pub config: PipelineConfig,
    pub data: PathBuf,
    pub out: PathBuf,
    pub resume: bool,
    pub device: Device,
    /// A split file (`path,class,subset`) instead of a fresh stratified split.
    pub split_file: Option<PathBuf>,
    /// Set to stop after the current step; the run writes a checkpoint and returns.
    pub stop: Option<tokio_util::sync::CancellationToken>,
    /// Fine-tune: start a new run from this earlier run's weights (best, else final), output
    /// rows matched by class name (see `Network::init_from`).
    pub init_from: Option<PathBuf>,
}

/// Progress reported while training.
#[derive(Debug, Clone)]
pub enum TrainEvent {
    Started {
        start_step: u64,
        total_steps: u64,
        train_images: usize,
        valid_images: usize,
        pseudo_images: usize,
        parameters: usize,
    },
    Step {
        step: u64,
        total_steps: u64,
        loss: f64,
        learning_rate: f64,
        images_per_second: f64,
        epoch: u64,
    },
    Validated(HistoryRow),
    Checkpointed {
        step: u64,
        path: PathBuf,
    },
}

#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub run_dir: PathBuf,
    pub steps: u64,
    pub stopped_early: bool,
    pub best_valid_loss: Option<f64>,
    pub best_step: Option<u64>,
    /// Scores of the final weights on the validation set.
    pub final_scores: Option<Scores>,
    pub history: Vec<HistoryRow>,
    pub images_per_second: f64,
    /// Fraction of the loop's wall time spent waiting for batches.
    pub batch_wait_fraction: f64,
    pub failures: Vec<Failure>,
}

/// Square patch sizes of the pipeline (the cyclic layers rotate by 90 degrees).
pub fn patch_sizes(cfg: &PipelineConfig) -> Result<Vec<usize>, TrainError> {
    cfg.patches
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if p.rows == p.cols {
                Ok(p.rows)
            } else {
                Err(TrainError::Config(format!(
                    "patch[{i}] is {}x{}: the networks need square patches",
                    p.rows, p.cols
                )))
            }
        })
        .collect()
}

/// Validation log loss and accuracy of `net` on `records` (no augmentation).
pub fn evaluate(
    net: &Network,
    cfg: &PipelineConfig,
    records: Arc<Vec<ImageRecord>>,
    zmuv: &[Zmuv],
    rt: &tokio::runtime::Handle,
) -> Result<(Scores, Vec<Failure>), TrainError> {
    let (probs, labels, failures) = predict_probabilities(net, cfg, records, zmuv, rt)?;
    let labels: Vec<usize> = labels.into_iter().map(|l| l as usize).collect();
    Ok((scoring::score(&probs, &labels, net.num_classes), failures))
}

/// Row-major class probabilities, labels, and the records that failed to decode.
pub type Probabilities = (Vec<f32>, Vec<i64>, Vec<Failure>);

/// Class probabilities (row-major) and labels of every record that decoded, in record order.
pub fn predict_probabilities(
    net: &Network,
    cfg: &PipelineConfig,
    records: Arc<Vec<ImageRecord>>,
    zmuv: &[Zmuv],
    rt: &tokio::runtime::Handle,
) -> Result<Probabilities, TrainError> {
    let _enter = rt.enter();
    let spec = LoaderSpec {
        records,
        plan: SamplePlan::Ordered { epochs: 1 },
        augment: false,
        zmuv: Some(zmuv.to_vec()),
        first_epoch: 0,
        views: None,
    };
    let mut loader = Loader::spawn(cfg, spec)?;
    let mut probs = Vec::new();
    let mut labels = Vec::new();
    let _guard = tch::no_grad_guard();
    while let Some(batch) = rt.block_on(loader.next_batch()) {
        let inputs = batch_inputs(&batch, net);
        let p = net
            .forward_t(&inputs, false)
            .softmax(-1, Kind::Float)
            .to_device(Device::Cpu);
        let flat: Vec<f32> = Vec::try_from(p.flatten(0, -1)).expect("float tensor");
        probs.extend_from_slice(&flat);
        labels.extend_from_slice(&batch.labels[..batch.len]);
    }
    let summary = rt.block_on(loader.finish())?;
    Ok((probs, labels, summary.failures))
}

/// One optimisation step on one batch (forward in training mode, cross-entropy on the logits,
/// backward, update). Returns the batch's mean loss as a 0-d tensor on the network's device,
/// not read back: reading it (`double_value`) waits for the device, which a GPU run does only
/// every `log_every` steps.
pub fn train_step(
    net: &mut Network,
    optimizer: &mut Optimizer,
    inputs: &[Tensor],
    labels: &Tensor,
    lr: f64,
) -> Tensor {
    let logits = net.forward_t(inputs, true);
    let loss = logits.cross_entropy_for_logits(labels);
    apply_loss(net, optimizer, loss, lr)
}

/// One step on soft targets (`N x C` rows summing to 1): the cross-entropy
/// `-sum_c t_c log softmax(z)_c`, which equals the usual loss on one-hot rows, so labelled and
/// pseudo-labelled images share one batch. `dropout = false` trains with dropout off.
pub fn train_step_soft(
    net: &mut Network,
    optimizer: &mut Optimizer,
    inputs: &[Tensor],
    targets: &Tensor,
    lr: f64,
    dropout: bool,
) -> Tensor {
    let logits = net.forward_t(inputs, dropout);
    let loss = -(targets * logits.log_softmax(-1, Kind::Float))
        .sum_dim_intlist(1, false, Kind::Float)
        .mean(Kind::Float);
    apply_loss(net, optimizer, loss, lr)
}

fn apply_loss(net: &mut Network, optimizer: &mut Optimizer, loss: Tensor, lr: f64) -> Tensor {
    loss.backward();
    optimizer.step(&mut net.params, lr);
    loss.detach()
}

pub(crate) fn batch_inputs(batch: &Batch, net: &Network) -> Vec<Tensor> {
    (0..batch.inputs.len())
        .map(|k| net.upload(&batch.input_tensor(k)))
        .collect()
}
