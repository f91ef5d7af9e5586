//! Training: the loop that pulls batches from the data path (bounded channel, so the next
//! batches are prepared while the model computes), the optimiser, validation, checkpoints and
//! the run directory.

pub mod curve;
pub mod optimizer;
pub mod pseudo;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use crate::device::BatchTensors;

pub use optimizer::Optimizer;
pub use plankton_data::config::train::{self as config, OptimizerKind, TrainConfig};
pub use plankton_data::run_dir::{self, HistoryRow, RunDir, RunDirError, TrainState};

use crate::config::PipelineConfig;
use crate::model::{ModelError, Network};
use crate::rng::mix64;
use crate::scoring::{self, Scores};
use crate::sources::{Dataset, ImageRecord};
use crate::split::Split;
use crate::stages::batch::Batch;
use crate::stages::normalise::{Zmuv, ZmuvStats};
use crate::telemetry;
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

/// Salt of the pseudo-labelled loader's random streams, so its shuffling and augmentation are
/// independent of the labelled loader's.
const PSEUDO_SEED_SALT: u64 = 0x7073_6575_646f;

/// The pseudo-labelled part of training: its loader and targets.
struct PseudoFeed {
    set: pseudo::PseudoSet,
    cfg: PipelineConfig,
    loader: Loader,
}

impl PseudoFeed {
    fn batches_per_epoch(&self) -> u64 {
        (self.set.len() / self.cfg.batch.size).max(1) as u64
    }

    /// The loader positioned where step `step` of the run reads: one pseudo batch per step, so
    /// a resumed run reads the same pseudo batches as an uninterrupted one.
    fn spawn(
        set: &pseudo::PseudoSet,
        cfg: &PipelineConfig,
        zmuv: &[Zmuv],
        step: u64,
        remaining: u64,
        rt: &tokio::runtime::Handle,
    ) -> Result<Loader, TrainError> {
        let per_epoch = (set.len() / cfg.batch.size).max(1) as u64;
        spawn_train_loader(
            cfg,
            &set.records,
            zmuv,
            step / per_epoch,
            step % per_epoch,
            remaining,
            rt,
        )
    }

    fn next(
        &mut self,
        step: u64,
        remaining: u64,
        zmuv: &[Zmuv],
        rt: &tokio::runtime::Handle,
        failures: &mut Vec<Failure>,
    ) -> Result<Batch, TrainError> {
        for _ in 0..3 {
            if let Some(b) = rt.block_on(self.loader.next_batch()) {
                return Ok(b);
            }
            let loader = Self::spawn(
                &self.set,
                &self.cfg,
                zmuv,
                step.div_ceil(self.batches_per_epoch()) * self.batches_per_epoch(),
                remaining,
                rt,
            )?;
            let s = rt.block_on(std::mem::replace(&mut self.loader, loader).finish())?;
            merge_failures(failures, s.failures);
        }
        Err(TrainError::Config(
            "the pseudo-labelled images yield no batches (are they all unreadable?)".into(),
        ))
    }

    /// Targets of a mixed batch: one-hot rows for the labelled part, then the soft rows.
    fn targets(&self, labelled: &Batch, pseudo: &Batch, classes: usize) -> Tensor {
        let mut t = vec![0f32; (labelled.len + pseudo.len) * classes];
        for (i, &l) in labelled.labels[..labelled.len].iter().enumerate() {
            t[i * classes + l as usize] = 1.0;
        }
        for (i, &r) in pseudo.record_indices[..pseudo.len].iter().enumerate() {
            let row = labelled.len + i;
            t[row * classes..(row + 1) * classes].copy_from_slice(self.set.target(r));
        }
        Tensor::from_slice(&t).view([(labelled.len + pseudo.len) as i64, classes as i64])
    }
}

fn batch_inputs(batch: &Batch, net: &Network) -> Vec<Tensor> {
    (0..batch.inputs.len())
        .map(|k| net.upload(&batch.input_tensor(k)))
        .collect()
}

fn subset(ds: &Dataset, idx: &[usize]) -> Arc<Vec<ImageRecord>> {
    Arc::new(idx.iter().map(|&i| ds.train[i].clone()).collect())
}

/// Everything a run needs before its first step.
struct Prepared {
    cfg: PipelineConfig,
    train: Arc<Vec<ImageRecord>>,
    valid: Arc<Vec<ImageRecord>>,
    zmuv: Vec<Zmuv>,
    net: Network,
    optimizer: Optimizer,
    state: TrainState,
    history: Vec<HistoryRow>,
    pseudo: Option<pseudo::PseudoSet>,
}

fn prepare(
    opts: &TrainOptions,
    run: &RunDir,
    rt: &tokio::runtime::Handle,
) -> Result<Prepared, TrainError> {
    crate::device::ensure(opts.device)?;
    let ds = Dataset::open(&opts.data)?;
    for p in &ds.problems {
        tracing::warn!(path = %p.path.display(), reason = %p.reason, "layout problem: skipped");
        metrics::counter!(telemetry::LAYOUT_PROBLEMS).increment(1);
    }
    if ds.train.is_empty() {
        return Err(TrainError::Config(format!(
            "{}: no labelled training images (train/<class>/...)",
            opts.data.display()
        )));
    }
    let checkpoint = if opts.resume {
        run.latest_checkpoint()?
    } else {
        None
    };
    let cfg = if opts.resume {
        let path = run.pipeline();
        let mut cfg = PipelineConfig::load(&path).map_err(|e| TrainError::Config(e.to_string()))?;
        // The one change a resume takes is the length of the run (`--steps`): everything else
        // stays the run's own, so the resumed run is the same run.
        let mut other_length = cfg.clone();
        other_length.train.steps = opts.config.train.steps;
        if other_length != opts.config {
            tracing::warn!(run = %path.display(), "resuming with the run's own pipeline.toml (it differs from --pipeline)");
        } else if cfg.train.steps != opts.config.train.steps {
            let at = match &checkpoint {
                Some(dir) => RunDir::load_state(dir)?.step,
                None => 0,
            };
            if opts.config.train.steps < at {
                return Err(TrainError::Config(format!(
                    "--steps {} is below the checkpoint's step {at} in {}: a run cannot be shortened past where it is",
                    opts.config.train.steps,
                    run.root.display()
                )));
            }
            tracing::info!(
                from = cfg.train.steps,
                to = opts.config.train.steps,
                "resuming with a new train.steps"
            );
            cfg.train.steps = opts.config.train.steps;
            let text =
                toml::to_string_pretty(&cfg).map_err(|e| TrainError::Config(e.to_string()))?;
            run_dir::write_atomic(&path, text.as_bytes())?;
        }
        cfg
    } else {
        if run.checkpoints().exists() || run.history().exists() {
            return Err(TrainError::Config(format!(
                "{}: already holds a run; pass --resume to continue it or choose another --out",
                run.root.display()
            )));
        }
        std::fs::create_dir_all(&run.root).map_err(|e| TrainError::io(&run.root, e))?;
        let text =
            toml::to_string_pretty(&opts.config).map_err(|e| TrainError::Config(e.to_string()))?;
        run_dir::write_atomic(&run.pipeline(), text.as_bytes())?;
        opts.config.clone()
    };
    cfg.train
        .validate()
        .map_err(|e| TrainError::Config(format!("{}: {e}", run.pipeline().display())))?;
    let sizes = patch_sizes(&cfg)?;

    let classes = ds.class_names.join("\n") + "\n";
    if opts.resume {
        let stored = std::fs::read_to_string(run.classes())
            .map_err(|e| TrainError::io(&run.classes(), e))?;
        if stored != classes {
            return Err(TrainError::Config(format!(
                "{}: the dataset's classes differ from the run's",
                run.classes().display()
            )));
        }
    } else {
        run_dir::write_atomic(&run.classes(), classes.as_bytes())?;
    }

    let split = if opts.resume {
        Split::load(&ds, &run.split())?
    } else {
        let split = match &opts.split_file {
            Some(f) => Split::load(&ds, f)?,
            None => {
                let labels: Vec<u32> = ds
                    .train
                    .iter()
                    .map(|r| r.label.unwrap_or(u32::MAX))
                    .collect();
                crate::split::stratified(&labels, cfg.split.valid_fraction, cfg.seed, 0)?
            }
        };
        split.save(&ds, &run.split())?;
        split
    };
    if split.train.is_empty() {
        return Err(TrainError::Config(
            "the split leaves no training images".into(),
        ));
    }
    let train = subset(&ds, &split.train);
    let valid = subset(&ds, &split.valid);
    let pseudo = pseudo::load(&cfg.pseudo, &ds)?;
    if let Some(p) = &pseudo {
        tracing::info!(
            images = p.len(),
            failed_rows = p.failed_rows,
            labelled_rows = p.labelled_rows,
            other_shards = p.other_shards,
            fraction = cfg.pseudo.fraction,
            "pseudo-labelled images"
        );
    }

    let zmuv = if opts.resume {
        ZmuvStats::load(&run.zmuv())?
    } else {
        let (stats, _) = rt.block_on(crate::data_path::estimate_zmuv(&cfg, train.clone()))?;
        stats.save(&run.zmuv())?;
        stats
    };
    if zmuv.inputs.len() != cfg.patches.len() {
        return Err(TrainError::Config(format!(
            "{}: {} inputs, the pipeline has {}",
            run.zmuv().display(),
            zmuv.inputs.len(),
            cfg.patches.len()
        )));
    }

    tch::manual_seed(mix64(cfg.seed) as i64);
    let mut net = Network::new(&cfg.model, &sizes, ds.class_names.len(), opts.device)?;
    net.set_compute(&cfg.compute);
    crate::device::apply_globals(&cfg.compute, opts.device);
    let mut optimizer = Optimizer::new(&cfg.train, &net.params);
    let mut state = TrainState {
        step: 0,
        epoch: 0,
        batches_in_epoch: 0,
        optimizer_updates: 0,
        best_valid_loss: None,
        best_step: None,
        elapsed_seconds: 0.0,
        images_seen: 0,
    };
    let mut history = Vec::new();
    if let Some(dir) = checkpoint {
        state = RunDir::load_state(&dir)?;
        if state.step > cfg.train.steps {
            return Err(TrainError::Config(format!(
                "{}: train.steps {} is below the checkpoint's step {}: a run cannot be shortened past where it is",
                run.pipeline().display(),
                cfg.train.steps,
                state.step
            )));
        }
        net.load(&dir.join("model.safetensors"))?;
        optimizer.load(
            &net.params,
            &dir.join("optimizer.safetensors"),
            state.optimizer_updates,
        )?;
        history = run_dir::read_history(&dir.join("history.csv"))?;
        tracing::info!(checkpoint = %dir.display(), step = state.step, "resuming");
    } else if opts.resume {
        tracing::warn!(run = %run.root.display(), "no checkpoint yet: starting from step 0");
    }
    Ok(Prepared {
        cfg,
        train,
        valid,
        zmuv: zmuv.inputs,
        net,
        optimizer,
        state,
        history,
        pseudo,
    })
}

/// Spawns the training loader at `epoch`, skipping the `skip` batches of that epoch already
/// consumed (the loader is deterministic per (seed, epoch, index), so this resumes exactly).
fn spawn_train_loader(
    cfg: &PipelineConfig,
    records: &Arc<Vec<ImageRecord>>,
    zmuv: &[Zmuv],
    epoch: u64,
    skip: u64,
    remaining_steps: u64,
    rt: &tokio::runtime::Handle,
) -> Result<Loader, TrainError> {
    let per_epoch = (records.len() / cfg.batch.size).max(1) as u64;
    let epochs = (remaining_steps + skip) / per_epoch + 2;
    let _enter = rt.enter();
    let mut loader = Loader::spawn(
        cfg,
        LoaderSpec {
            records: records.clone(),
            plan: SamplePlan::Shuffled { epochs },
            augment: cfg.augment.enabled,
            zmuv: Some(zmuv.to_vec()),
            first_epoch: epoch,
            views: None,
        },
    )?;
    for _ in 0..skip {
        match rt.block_on(loader.next_batch()) {
            Some(b) if b.epoch == epoch => {}
            _ => break,
        }
    }
    Ok(loader)
}

/// Trains (or resumes) a run. Blocking: call it from a thread that may block (not from inside
/// an async task), with a handle to the runtime the data path should run on.
pub fn run(
    opts: &TrainOptions,
    rt: &tokio::runtime::Handle,
    on_event: &mut dyn FnMut(TrainEvent),
) -> Result<TrainSummary, TrainError> {
    let run = RunDir::new(&opts.out);
    // One process per run folder: a second `train` on it (or a second resume) would interleave
    // checkpoints and weights of two networks.
    let _lock = crate::fsx::lock_dir(&run.root)?;
    // Temporaries of a writer killed mid-write (kill -9) in an earlier attempt of this run.
    let swept = crate::fsx::sweep_stale_temps(&run.root)
        + crate::fsx::sweep_stale_temps(&run.checkpoints());
    if swept > 0 {
        tracing::info!(files = swept, run = %run.root.display(), "removed temporaries of an interrupted write");
    }
    let Prepared {
        cfg,
        train,
        valid,
        zmuv,
        mut net,
        mut optimizer,
        mut state,
        mut history,
        pseudo,
    } = prepare(opts, &run, rt)?;
    let tc = &cfg.train;
    if tc.threads > 0 {
        tch::set_num_threads(tc.threads as i32);
    }
    telemetry::describe();
    on_event(TrainEvent::Started {
        start_step: state.step,
        total_steps: tc.steps,
        train_images: train.len(),
        valid_images: valid.len(),
        pseudo_images: pseudo.as_ref().map_or(0, |p| p.len()),
        parameters: net.parameter_count(),
    });

    let step_seconds = metrics::histogram!(telemetry::TRAIN_STEP_SECONDS);
    let images_total = metrics::counter!(telemetry::TRAIN_IMAGES);
    let mut failures: Vec<Failure> = Vec::new();
    // With pseudo-labels each batch is `labelled_cfg.batch.size` labelled images followed by
    // the pseudo loader's share.
    let mut labelled_cfg = cfg.clone();
    let mut feed = match pseudo {
        Some(set) => {
            let (n_labelled, n_pseudo) = cfg
                .pseudo
                .batch_split(cfg.batch.size)
                .map_err(TrainError::Config)?;
            labelled_cfg.batch.size = n_labelled;
            let mut pcfg = cfg.clone();
            pcfg.batch.size = n_pseudo;
            pcfg.batch.drop_last = true;
            pcfg.seed = mix64(cfg.seed ^ PSEUDO_SEED_SALT);
            let loader = PseudoFeed::spawn(
                &set,
                &pcfg,
                &zmuv,
                state.step,
                tc.steps - state.step.min(tc.steps),
                rt,
            )?;
            Some(PseudoFeed {
                set,
                cfg: pcfg,
                loader,
            })
        }
        None => None,
    };
    let cfg_for_labelled = labelled_cfg;
    let mut loader = spawn_train_loader(
        &cfg_for_labelled,
        &train,
        &zmuv,
        state.epoch,
        state.batches_in_epoch,
        tc.steps - state.step.min(tc.steps),
        rt,
    )?;
    let run_started = Instant::now();
    let elapsed_before = state.elapsed_seconds;
    let mut window = Window::default();
    let mut total_wait = Duration::ZERO;
    let mut stopped_early = false;
    let mut ema_rate: Option<f64> = None;
    let mut last_scores: Option<(u64, Scores)> = None;
    // Losses stay on the device until read back (`loss_readback_every`): every step on the
    // CPU (reading costs nothing there), every `log_every` steps on a GPU, which then never
    // waits for the host in between. Every validation, checkpoint and stop reads back first, so
    // a diverged run stops before it saves anything.
    let readback_every = match tc.loss_readback_every {
        0 if net.device.is_cuda() => tc.log_every.max(1),
        0 => 1,
        n => n,
    };
    let mut unread = Unread::default();

    while state.step < tc.steps {
        let t_wait = Instant::now();
        let batch = match rt.block_on(loader.next_batch()) {
            Some(b) => b,
            None => {
                // Plan exhausted (bad images made epochs shorter than planned): go on with the
                // next epoch.
                let s = rt.block_on(loader.finish())?;
                merge_failures(&mut failures, s.failures);
                loader = spawn_train_loader(
                    &cfg_for_labelled,
                    &train,
                    &zmuv,
                    state.epoch + 1,
                    0,
                    tc.steps - state.step,
                    rt,
                )?;
                continue;
            }
        };
        let waited = t_wait.elapsed();
        let t_step = Instant::now();
        if batch.epoch != state.epoch {
            state.epoch = batch.epoch;
            state.batches_in_epoch = 0;
        }
        let lr = tc.learning_rate_at(state.step);
        // Dropout masks depend only on (seed, step), so a resumed run draws the same ones.
        tch::manual_seed((mix64(cfg.seed ^ mix64(state.step.wrapping_add(1))) >> 1) as i64);
        let mut images = batch.len as u64;
        let loss = match feed.as_mut() {
            None if tc.dropout => {
                let inputs = batch_inputs(&batch, &net);
                let labels = net.upload(&batch.labels_tensor());
                train_step(&mut net, &mut optimizer, &inputs, &labels, lr)
            }
            None => {
                let inputs = batch_inputs(&batch, &net);
                let targets = net.upload(
                    &batch
                        .labels_tensor()
                        .one_hot(net.num_classes as i64)
                        .to_kind(Kind::Float),
                );
                train_step_soft(&mut net, &mut optimizer, &inputs, &targets, lr, false)
            }
            Some(feed) => {
                let pb = feed.next(state.step, tc.steps - state.step, &zmuv, rt, &mut failures)?;
                let inputs: Vec<Tensor> = (0..batch.inputs.len())
                    .map(|k| {
                        net.upload(&Tensor::cat(
                            &[batch.input_tensor(k), pb.input_tensor(k)],
                            0,
                        ))
                    })
                    .collect();
                let targets = net.upload(&feed.targets(&batch, &pb, net.num_classes));
                images += pb.len as u64;
                train_step_soft(&mut net, &mut optimizer, &inputs, &targets, lr, tc.dropout)
            }
        };
        unread.losses.push(loss);
        unread.steps.push((state.step, lr, state.epoch));
        state.step += 1;
        state.batches_in_epoch += 1;
        state.images_seen += images;
        state.optimizer_updates = optimizer.updates;
        drop(batch);
        unread.images += images;
        unread.wait += waited;

        let last = state.step == tc.steps;
        let validate = state.step % tc.validate_every == 0 || last;
        let mut stop = opts.stop.as_ref().is_some_and(|s| s.is_cancelled());
        let read_now = unread.steps.len() as u64 >= readback_every
            || validate
            || state.step % tc.checkpoint_every == 0
            || last
            || stop;
        if read_now {
            let losses = unread.read_back();
            // The wait for the device counts as this step's time.
            unread.wall += waited + t_step.elapsed();
            for (&value, &(step, _, _)) in losses.iter().zip(&unread.steps) {
                if !value.is_finite() {
                    return Err(TrainError::Diverged { step, loss: value });
                }
            }
            let (images, wait, wall) = (unread.images, unread.wait, unread.wall);
            total_wait += wait;
            window.add(&losses, images, wait, wall);
            let rate = images as f64 / wall.as_secs_f64().max(1e-9);
            let ema = ema_rate.map_or(rate, |e| 0.9 * e + 0.1 * rate);
            ema_rate = Some(ema);
            images_total.increment(images);
            metrics::gauge!(telemetry::TRAIN_IMAGES_PER_SECOND).set(ema);
            let per_step = wall.as_secs_f64() / losses.len() as f64;
            for (&loss_value, &(step, lr, epoch)) in losses.iter().zip(&unread.steps) {
                step_seconds.record(per_step);
                metrics::gauge!(telemetry::TRAIN_LOSS).set(loss_value);
                metrics::gauge!(telemetry::TRAIN_LEARNING_RATE).set(lr);
                on_event(TrainEvent::Step {
                    step: step + 1,
                    total_steps: tc.steps,
                    loss: loss_value,
                    learning_rate: lr,
                    images_per_second: ema,
                    epoch,
                });
            }
            unread = Unread::default();
            // A stop asked for from an event handler counts for this step, as Ctrl-C does.
            stop = opts.stop.as_ref().is_some_and(|s| s.is_cancelled());
        } else {
            unread.wall += waited + t_step.elapsed();
        }
        let checkpoint = state.step % tc.checkpoint_every == 0 || last || stop;

        state.elapsed_seconds = elapsed_before + run_started.elapsed().as_secs_f64();
        if validate {
            let (scores, bad) = if valid.is_empty() {
                (
                    Scores {
                        log_loss: f64::NAN,
                        top1: f64::NAN,
                        top5: f64::NAN,
                        n: 0,
                    },
                    Vec::new(),
                )
            } else {
                evaluate(&net, &cfg, valid.clone(), &zmuv, rt)?
            };
            merge_failures(&mut failures, bad);
            let row = window.row(state.step, state.epoch, lr, &scores, state.elapsed_seconds);
            window = Window::default();
            if scores.n > 0 {
                metrics::gauge!(telemetry::VALID_LOG_LOSS).set(scores.log_loss);
                metrics::gauge!(telemetry::VALID_TOP1).set(scores.top1);
            }
            let better = scores.n > 0 && state.best_valid_loss.is_none_or(|b| scores.log_loss < b);
            if better {
                state.best_valid_loss = Some(scores.log_loss);
                state.best_step = Some(state.step);
                net.save(&run.best_weights())?;
                let info = serde_json::json!({ "step": state.step, "valid": scores });
                run_dir::write_atomic(
                    &run.best_info(),
                    serde_json::to_string_pretty(&info).unwrap().as_bytes(),
                )?;
            }
            history.push(row.clone());
            run_dir::write_history(&run.history(), &history)?;
            if let Err(e) = curve::render_learning_curve(&run.learning_curve(), &cfg.name, &history)
            {
                // A picture is not worth stopping a run for.
                tracing::warn!(error = %e, "learning curve not drawn");
            }
            last_scores = Some((state.step, scores));
            on_event(TrainEvent::Validated(row));
        }
        if checkpoint {
            let path = run.save_checkpoint(&state, tc.keep_checkpoints, |dir| {
                net.save(&dir.join("model.safetensors"))?;
                optimizer.save(&net.params, &dir.join("optimizer.safetensors"))?;
                run_dir::write_history(&dir.join("history.csv"), &history)?;
                Ok::<(), TrainError>(())
            })?;
            on_event(TrainEvent::Checkpointed {
                step: state.step,
                path,
            });
        }
        if stop && !last {
            stopped_early = true;
            break;
        }
    }
    let summary = rt.block_on(loader.finish())?;
    merge_failures(&mut failures, summary.failures);
    if let Some(feed) = feed {
        let s = rt.block_on(feed.loader.finish())?;
        merge_failures(&mut failures, s.failures);
    }
    if !stopped_early {
        net.save(&run.final_weights())?;
        if valid.is_empty() {
            // Without validation the final weights are the best we know.
            net.save(&run.best_weights())?;
        }
    }
    for f in &failures {
        tracing::warn!(path = %f.path.display(), kind = f.kind, reason = %f.reason, "image set aside");
    }
    let wall = run_started.elapsed().as_secs_f64().max(1e-9);
    Ok(TrainSummary {
        run_dir: run.root.clone(),
        steps: state.step,
        stopped_early,
        best_valid_loss: state.best_valid_loss,
        best_step: state.best_step,
        final_scores: last_scores
            .filter(|(s, sc)| *s == state.step && sc.n > 0)
            .map(|(_, s)| s),
        history,
        images_per_second: state.images_seen as f64 / (elapsed_before + wall).max(1e-9),
        batch_wait_fraction: total_wait.as_secs_f64() / wall,
        failures,
    })
}

fn merge_failures(into: &mut Vec<Failure>, new: Vec<Failure>) {
    for f in new {
        if !into.iter().any(|g| g.path == f.path) {
            into.push(f);
        }
    }
}

/// Steps whose losses are still on the device, and the loop's time spent on them.
#[derive(Default)]
struct Unread {
    losses: Vec<Tensor>,
    /// (0-based step, learning rate, epoch) of each loss.
    steps: Vec<(u64, f64, u64)>,
    images: u64,
    wait: Duration,
    wall: Duration,
}

impl Unread {
    /// One copy for all the pending losses (waits for the device to finish them).
    fn read_back(&self) -> Vec<f64> {
        let all = Tensor::stack(&self.losses, 0)
            .to_kind(Kind::Double)
            .to_device(Device::Cpu);
        Vec::<f64>::try_from(&all).expect("a 1-d double tensor")
    }
}

/// Training statistics between two history rows.
#[derive(Default)]
struct Window {
    loss_sum: f64,
    steps: u64,
    images: u64,
    wait: Duration,
    wall: Duration,
}

impl Window {
    fn add(&mut self, losses: &[f64], images: u64, wait: Duration, wall: Duration) {
        self.loss_sum += losses.iter().sum::<f64>();
        self.steps += losses.len() as u64;
        self.images += images;
        self.wait += wait;
        self.wall += wall;
    }

    fn row(&self, step: u64, epoch: u64, lr: f64, s: &Scores, elapsed: f64) -> HistoryRow {
        let wall = self.wall.as_secs_f64().max(1e-9);
        HistoryRow {
            step,
            epoch,
            learning_rate: lr,
            train_loss: self.loss_sum / self.steps.max(1) as f64,
            valid_loss: s.log_loss,
            valid_top1: s.top1,
            valid_top5: s.top5,
            images_per_second: self.images as f64 / wall,
            batch_wait_fraction: self.wait.as_secs_f64() / wall,
            elapsed_seconds: elapsed,
        }
    }
}
