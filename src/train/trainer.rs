//! The training loop: a [`Trainer`] holds what lives from one step to the next (network,
//! optimiser, loaders, the losses not yet read back, the statistics of the current history
//! row), and [`run`] drives it step by step.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use super::prepare::{prepare, Prepared};
use super::{batch_inputs, evaluate, pseudo, run_dir, train_step, train_step_soft};
use super::{curve, HistoryRow, Optimizer, RunDir, TrainState};
use super::{TrainError, TrainEvent, TrainOptions, TrainSummary};
use crate::config::PipelineConfig;
use crate::device::BatchTensors;
use crate::model::Network;
use crate::rng::mix64;
use crate::scoring::Scores;
use crate::sources::ImageRecord;
use crate::stages::batch::Batch;
use crate::stages::normalise::Zmuv;
use crate::telemetry;
use crate::topology::{Failure, Loader, LoaderSpec, SamplePlan};

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
    let made_here = !run.root.exists();
    // One process per run folder: a second `train` on it (or a second resume) would interleave
    // checkpoints and weights of two networks.
    let lock = crate::fsx::lock_dir(&run.root)?;
    // Temporaries of a writer killed mid-write (kill -9) in an earlier attempt of this run.
    let swept = crate::fsx::sweep_stale_temps(&run.root)
        + crate::fsx::sweep_stale_temps(&run.checkpoints());
    if swept > 0 {
        tracing::info!(files = swept, run = %run.root.display(), "removed temporaries of an interrupted write");
    }
    let prepared = match prepare(opts, &run, rt) {
        Ok(p) => p,
        Err(e) => {
            // A refused new run leaves no folder behind (just its lock was made).
            drop(lock);
            if made_here {
                remove_if_only_lock(&run.root);
            }
            return Err(e);
        }
    };
    let _lock = lock;
    let mut trainer = Trainer::start(opts, rt, run, prepared, on_event)?;
    let total_steps = trainer.cfg.train.steps;
    let mut stopped_early = false;
    while trainer.state.step < total_steps {
        let (batch, waited) = trainer.next_batch()?;
        let t_step = Instant::now();
        let lr = trainer.step(batch, waited)?;

        let tc = &trainer.cfg.train;
        let step = trainer.state.step;
        let last = step == total_steps;
        let validate = step % tc.validate_every == 0 || last;
        let checkpoint = step % tc.checkpoint_every == 0 || last;
        let mut stop = trainer.stop_requested();
        // Every validation, checkpoint and stop reads the losses back first, so a diverged run
        // stops before it saves anything.
        if trainer.unread.steps.len() as u64 >= trainer.readback_every
            || validate
            || checkpoint
            || stop
        {
            trainer.read_back(waited, t_step, on_event)?;
            // A stop asked for from an event handler counts for this step, as Ctrl-C does.
            stop = trainer.stop_requested();
        } else {
            trainer.unread.wall += waited + t_step.elapsed();
        }
        trainer.state.elapsed_seconds =
            trainer.elapsed_before + trainer.run_started.elapsed().as_secs_f64();
        if validate {
            trainer.validate(lr, on_event)?;
        }
        if checkpoint || stop {
            trainer.checkpoint(on_event)?;
        }
        if stop && !last {
            stopped_early = true;
            break;
        }
    }
    trainer.finish(stopped_early)
}

/// The state of a run between two steps.
struct Trainer<'a> {
    opts: &'a TrainOptions,
    rt: &'a tokio::runtime::Handle,
    run: RunDir,
    cfg: PipelineConfig,
    /// `cfg` with the batch size of the labelled part of a batch (all of it without pseudo-labels).
    labelled_cfg: PipelineConfig,
    train: Arc<Vec<ImageRecord>>,
    valid: Arc<Vec<ImageRecord>>,
    zmuv: Vec<Zmuv>,
    net: Network,
    optimizer: Optimizer,
    state: TrainState,
    history: Vec<HistoryRow>,
    /// The labelled loader (taken only while one epoch's loader is replaced by the next).
    loader: Option<Loader>,
    pseudo: Option<PseudoFeed>,
    failures: Vec<Failure>,
    /// Losses stay on the device until read back: every step on the CPU (reading costs
    /// nothing there), every `log_every` steps on a GPU, which then never waits for the host in
    /// between.
    readback_every: u64,
    unread: Unread,
    window: Window,
    total_wait: Duration,
    ema_rate: Option<f64>,
    last_scores: Option<(u64, Scores)>,
    run_started: Instant,
    elapsed_before: f64,
    step_seconds: metrics::Histogram,
    images_total: metrics::Counter,
}

impl<'a> Trainer<'a> {
    fn start(
        opts: &'a TrainOptions,
        rt: &'a tokio::runtime::Handle,
        run: RunDir,
        prepared: Prepared,
        on_event: &mut dyn FnMut(TrainEvent),
    ) -> Result<Self, TrainError> {
        let Prepared {
            cfg,
            train,
            valid,
            zmuv,
            net,
            optimizer,
            state,
            history,
            pseudo,
        } = prepared;
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
        let remaining = tc.steps - state.step.min(tc.steps);
        // With pseudo-labels each batch is `labelled_cfg.batch.size` labelled images followed
        // by the pseudo loader's share.
        let mut labelled_cfg = cfg.clone();
        let pseudo = match pseudo {
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
                let loader = PseudoFeed::spawn(&set, &pcfg, &zmuv, state.step, remaining, rt)?;
                Some(PseudoFeed {
                    set,
                    cfg: pcfg,
                    loader,
                })
            }
            None => None,
        };
        let loader = spawn_train_loader(
            &labelled_cfg,
            &train,
            &zmuv,
            state.epoch,
            state.batches_in_epoch,
            remaining,
            rt,
        )?;
        let readback_every = match tc.loss_readback_every {
            0 if net.device.is_cuda() => tc.log_every.max(1),
            0 => 1,
            n => n,
        };
        Ok(Trainer {
            opts,
            rt,
            run,
            labelled_cfg,
            train,
            valid,
            zmuv,
            net,
            optimizer,
            elapsed_before: state.elapsed_seconds,
            state,
            history,
            loader: Some(loader),
            pseudo,
            failures: Vec::new(),
            readback_every,
            unread: Unread::default(),
            window: Window::default(),
            total_wait: Duration::ZERO,
            ema_rate: None,
            last_scores: None,
            run_started: Instant::now(),
            step_seconds: metrics::histogram!(telemetry::TRAIN_STEP_SECONDS),
            images_total: metrics::counter!(telemetry::TRAIN_IMAGES),
            cfg,
        })
    }

    fn stop_requested(&self) -> bool {
        self.opts.stop.as_ref().is_some_and(|s| s.is_cancelled())
    }

    /// The next labelled batch and the time spent waiting for it. When the loader's plan runs
    /// out (bad images made epochs shorter than planned) training goes on with the next epoch.
    fn next_batch(&mut self) -> Result<(Batch, Duration), TrainError> {
        loop {
            let t_wait = Instant::now();
            let loader = self.loader.as_mut().expect("a loader between steps");
            if let Some(batch) = self.rt.block_on(loader.next_batch()) {
                return Ok((batch, t_wait.elapsed()));
            }
            // The spent loader is finished first: its error (why the epoch ended early) is the
            // one to report, before a new epoch starts decoding.
            let spent = self.loader.take().expect("a loader between steps");
            let spent = self.rt.block_on(spent.finish())?;
            merge_failures(&mut self.failures, spent.failures);
            self.loader = Some(spawn_train_loader(
                &self.labelled_cfg,
                &self.train,
                &self.zmuv,
                self.state.epoch + 1,
                0,
                self.cfg.train.steps - self.state.step,
                self.rt,
            )?);
        }
    }

    /// One optimisation step on `batch` (and a pseudo-labelled share): the loss stays on the
    /// device in `unread`. Returns the step's learning rate.
    fn step(&mut self, batch: Batch, waited: Duration) -> Result<f64, TrainError> {
        if batch.epoch != self.state.epoch {
            self.state.epoch = batch.epoch;
            self.state.batches_in_epoch = 0;
        }
        let tc = &self.cfg.train;
        let step = self.state.step;
        let lr = tc.learning_rate_at(step);
        // Dropout masks depend only on (seed, step), so a resumed run draws the same ones.
        tch::manual_seed((mix64(self.cfg.seed ^ mix64(step.wrapping_add(1))) >> 1) as i64);
        let net = &mut self.net;
        let mut images = batch.len as u64;
        let loss = match self.pseudo.as_mut() {
            None if tc.dropout => {
                let inputs = batch_inputs(&batch, net);
                let labels = net.upload(&batch.labels_tensor());
                train_step(net, &mut self.optimizer, &inputs, &labels, lr)
            }
            None => {
                let inputs = batch_inputs(&batch, net);
                let targets = net.upload(
                    &batch
                        .labels_tensor()
                        .one_hot(net.num_classes as i64)
                        .to_kind(Kind::Float),
                );
                train_step_soft(net, &mut self.optimizer, &inputs, &targets, lr, false)
            }
            Some(feed) => {
                let remaining = tc.steps - step;
                let pb = feed.next(step, remaining, &self.zmuv, self.rt, &mut self.failures)?;
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
                train_step_soft(net, &mut self.optimizer, &inputs, &targets, lr, tc.dropout)
            }
        };
        self.unread.losses.push(loss);
        self.unread.steps.push((step, lr, self.state.epoch));
        self.unread.images += images;
        self.unread.wait += waited;
        self.state.step += 1;
        self.state.batches_in_epoch += 1;
        self.state.images_seen += images;
        self.state.optimizer_updates = self.optimizer.updates;
        Ok(lr)
    }

    /// Reads the pending losses back (waiting for the device, which counts as this step's
    /// time), refuses a diverged run, and reports each step.
    fn read_back(
        &mut self,
        waited: Duration,
        t_step: Instant,
        on_event: &mut dyn FnMut(TrainEvent),
    ) -> Result<(), TrainError> {
        let losses = self.unread.read_back();
        self.unread.wall += waited + t_step.elapsed();
        for (&value, &(step, _, _)) in losses.iter().zip(&self.unread.steps) {
            if !value.is_finite() {
                return Err(TrainError::Diverged { step, loss: value });
            }
        }
        let unread = std::mem::take(&mut self.unread);
        let (images, wait, wall) = (unread.images, unread.wait, unread.wall);
        self.total_wait += wait;
        self.window.add(&losses, images, wait, wall);
        let rate = images as f64 / wall.as_secs_f64().max(1e-9);
        let ema = self.ema_rate.map_or(rate, |e| 0.9 * e + 0.1 * rate);
        self.ema_rate = Some(ema);
        self.images_total.increment(images);
        metrics::gauge!(telemetry::TRAIN_IMAGES_PER_SECOND).set(ema);
        let per_step = wall.as_secs_f64() / losses.len() as f64;
        for (&loss, &(step, learning_rate, epoch)) in losses.iter().zip(&unread.steps) {
            self.step_seconds.record(per_step);
            metrics::gauge!(telemetry::TRAIN_LOSS).set(loss);
            metrics::gauge!(telemetry::TRAIN_LEARNING_RATE).set(learning_rate);
            on_event(TrainEvent::Step {
                step: step + 1,
                total_steps: self.cfg.train.steps,
                loss,
                learning_rate,
                images_per_second: ema,
                epoch,
            });
        }
        Ok(())
    }

    /// Scores the validation images, keeps the best weights, appends a history row (and the
    /// learning curve drawn from it).
    fn validate(
        &mut self,
        lr: f64,
        on_event: &mut dyn FnMut(TrainEvent),
    ) -> Result<(), TrainError> {
        let scores = if self.valid.is_empty() {
            Scores {
                log_loss: f64::NAN,
                top1: f64::NAN,
                top5: f64::NAN,
                n: 0,
            }
        } else {
            let (scores, bad) = evaluate(
                &self.net,
                &self.cfg,
                self.valid.clone(),
                &self.zmuv,
                self.rt,
            )?;
            merge_failures(&mut self.failures, bad);
            scores
        };
        let state = &mut self.state;
        let row = self
            .window
            .row(state.step, state.epoch, lr, &scores, state.elapsed_seconds);
        self.window = Window::default();
        if scores.n > 0 {
            metrics::gauge!(telemetry::VALID_LOG_LOSS).set(scores.log_loss);
            metrics::gauge!(telemetry::VALID_TOP1).set(scores.top1);
        }
        if scores.n > 0 && state.best_valid_loss.is_none_or(|b| scores.log_loss < b) {
            state.best_valid_loss = Some(scores.log_loss);
            state.best_step = Some(state.step);
            self.net.save(&self.run.best_weights())?;
            let info = serde_json::json!({ "step": state.step, "valid": scores });
            run_dir::write_atomic(
                &self.run.best_info(),
                serde_json::to_string_pretty(&info).unwrap().as_bytes(),
            )?;
        }
        self.history.push(row.clone());
        run_dir::write_history(&self.run.history(), &self.history)?;
        let curve_png = self.run.learning_curve();
        if let Err(e) = curve::render_learning_curve(&curve_png, &self.cfg.name, &self.history) {
            // A picture is not worth stopping a run for.
            tracing::warn!(error = %e, "learning curve not drawn");
        }
        self.last_scores = Some((state.step, scores));
        on_event(TrainEvent::Validated(row));
        Ok(())
    }

    fn checkpoint(&mut self, on_event: &mut dyn FnMut(TrainEvent)) -> Result<(), TrainError> {
        let (net, optimizer, history) = (&self.net, &self.optimizer, &self.history);
        let keep = self.cfg.train.keep_checkpoints;
        let path = self.run.save_checkpoint(&self.state, keep, |dir| {
            net.save(&dir.join("model.safetensors"))?;
            optimizer.save(&net.params, &dir.join("optimizer.safetensors"))?;
            run_dir::write_history(&dir.join("history.csv"), history)?;
            Ok::<(), TrainError>(())
        })?;
        on_event(TrainEvent::Checkpointed {
            step: self.state.step,
            path,
        });
        Ok(())
    }

    /// Drains the loaders, writes the final weights (unless stopped early) and sums up.
    fn finish(mut self, stopped_early: bool) -> Result<TrainSummary, TrainError> {
        let loader = self.loader.take().expect("a loader between steps");
        let summary = self.rt.block_on(loader.finish())?;
        merge_failures(&mut self.failures, summary.failures);
        if let Some(feed) = self.pseudo {
            let s = self.rt.block_on(feed.loader.finish())?;
            merge_failures(&mut self.failures, s.failures);
        }
        if !stopped_early {
            self.net.save(&self.run.final_weights())?;
            if self.valid.is_empty() {
                // Without validation the final weights are the best we know.
                self.net.save(&self.run.best_weights())?;
            }
        }
        for f in &self.failures {
            tracing::warn!(path = %f.path.display(), kind = f.kind, reason = %f.reason, "image set aside");
        }
        let wall = self.run_started.elapsed().as_secs_f64().max(1e-9);
        let state = self.state;
        Ok(TrainSummary {
            run_dir: self.run.root.clone(),
            steps: state.step,
            stopped_early,
            best_valid_loss: state.best_valid_loss,
            best_step: state.best_step,
            final_scores: self
                .last_scores
                .filter(|(s, sc)| *s == state.step && sc.n > 0)
                .map(|(_, s)| s),
            history: self.history,
            images_per_second: state.images_seen as f64 / (self.elapsed_before + wall).max(1e-9),
            batch_wait_fraction: self.total_wait.as_secs_f64() / wall,
            failures: self.failures,
        })
    }
}

fn remove_if_only_lock(dir: &std::path::Path) {
    let only_lock = std::fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .filter_map(Result::ok)
            .all(|e| e.file_name() == ".lock")
    });
    if only_lock {
        let _ = std::fs::remove_file(dir.join(".lock"));
        let _ = std::fs::remove_dir(dir);
    }
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
