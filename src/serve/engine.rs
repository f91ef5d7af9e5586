//! The daemon's processing core: spooled images -> decode/warp/ZMUV workers (the replay path's
//! stage kernels) -> micro-batcher (full batch or oldest image waited `max_latency_ms`) ->
//! model -> per-image aggregation of the TTA views -> rolling Parquet files. An image leaves
//! the spool only when the file holding its row has been renamed into place.
//!
//! ```text
//!  ingest (bounded) ─▶ workers ×N ─▶ patches (bounded) ─▶ model thread ─▶ rows (bounded) ─▶ writer thread
//!        ▲  bad input ─▶ quarantine + error row ───────────────────────────────────▲        │ finished file
//!   sources (watch, http, spool replay)                                                   ▼
//!                                                                          spool.complete(ids)
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tch::{Device, Kind};

use super::config::ServeConfig;
use super::results::{ResultStore, ServedPrediction};
use super::spool::{EntryKey, Spool, SpoolEntry};
use crate::features::job::FeatureSet;
use crate::features::writer::{FeatureRow, FeatureWriter};
use crate::imgproc::Augmentation;
use crate::predict::aggregate::aggregate;
use crate::predict::job::{ImageOutputs, LoadedModel, PredictError, Weights};
use crate::predict::tta::quasi_random_transforms;
use crate::sinks::parquet::{top_k, PredictionRow, PredictionWriter, ServeColumns, UnknownColumns};
use crate::stages::decode::decode_bytes;
use crate::stages::warp::make_patch;
use crate::telemetry;
use plankton_core::unknown::ViewMean;

use crate::telemetry::{
    PROCESS_RESIDENT_BYTES, SERVE_BATCH_IMAGES, SERVE_FILES, SERVE_LATENCY_SECONDS,
    SERVE_MODEL_INFO, SERVE_MODEL_RELOADS,
};

pub fn describe() {
    telemetry::describe();
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What the workers need of the model being served (the network itself stays on the model
/// thread: tensors are not shareable between threads).
pub struct Prep {
    pub cfg: crate::config::PipelineConfig,
    pub zmuv: Vec<crate::stages::normalise::Zmuv>,
    pub model_id: String,
    pub transforms: Vec<Augmentation>,
}

impl Prep {
    pub fn of(model: &LoadedModel, tta: usize) -> Prep {
        let mut t = model.cfg.tta.clone();
        t.transforms = tta;
        Prep {
            cfg: model.cfg.clone(),
            zmuv: model.zmuv.inputs.clone(),
            model_id: model.model_id.clone(),
            transforms: quasi_random_transforms(&t),
        }
    }
}

/// The preprocessing of the model being served, swapped when the model thread reloads.
pub struct ModelSlot {
    pub prep: RwLock<Arc<Prep>>,
    /// Set by SIGHUP (or a changed weights file); the model thread reloads before its next batch.
    pub reload: AtomicBool,
}

/// Spool entries being processed, so an entry that arrives twice (spool replay and a rescan,
/// say) is processed once. Keyed by (id, seq): a new acceptance of an id (a good upload after a
/// quarantined one) is a different entry and is processed.
#[derive(Default)]
pub struct InFlight(Mutex<HashSet<EntryKey>>);

impl InFlight {
    fn begin(&self, entry: &SpoolEntry) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(entry.key())
    }
    fn end(&self, keys: impl IntoIterator<Item = EntryKey>) {
        let mut set = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for k in keys {
            set.remove(&k);
        }
    }
}

/// An image's size and feature values, in the columns of the daemon's feature sets.
type Features = ((u32, u32), Vec<f64>);

struct PatchSet {
    entry: SpoolEntry,
    /// (height, width) of the decoded image, and its flag (`too_small`, `blank`).
    size: (u32, u32),
    /// Mean grey level of the decoded image (0-255).
    brightness: f32,
    flag: Option<&'static str>,
    features: Option<Features>,
    /// views x inputs x pixels.
    views: Vec<Vec<Vec<f32>>>,
    accepted: Instant,
}

/// A row for the writer plus what it needs to finish the image's life cycle.
pub struct OutRow {
    pub entry: SpoolEntry,
    pub model_id: String,
    pub probabilities: Option<Vec<f32>>,
    pub error: Option<String>,
    pub views: u16,
    pub size: Option<(u32, u32)>,
    pub brightness: Option<f32>,
    pub flag: Option<&'static str>,
    features: Option<Features>,
    pub unknown: UnknownColumns,
}

impl OutRow {
    /// The error row of a refused image.
    fn refused(entry: SpoolEntry, model_id: String, reason: String) -> OutRow {
        OutRow {
            entry,
            model_id,
            probabilities: None,
            error: Some(reason),
            views: 0,
            size: None,
            brightness: None,
            flag: None,
            features: None,
            unknown: UnknownColumns::default(),
        }
    }
}

/// An image that came as a JetStream message and whose row is now in a finished file: its
/// delivery is to be acked, or terminated when the row is an error row (see `serve::nats`).
#[derive(Debug, Clone, PartialEq)]
pub struct Settled {
    pub key: EntryKey,
    pub reply: String,
    pub failed: bool,
}

impl Settled {
    pub fn of(entry: &SpoolEntry, failed: bool) -> Option<Settled> {
        entry.delivery.as_ref().map(|d| Settled {
            key: entry.key(),
            reply: d.reply.clone(),
            failed,
        })
    }
}

pub struct Engine {
    pub model: LoadedModel,
    pub ingest: async_channel::Receiver<SpoolEntry>,
    pub spool: Arc<Spool>,
    pub results: Arc<ResultStore>,
    pub slot: Arc<ModelSlot>,
    pub cfg: ServeConfig,
    pub in_flight: Arc<InFlight>,
    /// Where the writer reports finished images that came as JetStream messages.
    pub settled: Option<async_channel::Sender<Settled>>,
    /// Set by the NATS source when the consumer group holds nearly `max_ack_pending` messages:
    /// the writer then finishes a file holding messages at once (see `serve::nats`).
    pub roll_now: Arc<AtomicBool>,
    /// Where the writer sends the rows of each finished file (`nats.results_subject`).
    pub results_out: Option<async_channel::Sender<ServedPrediction>>,
}

/// Handles of the running engine threads; `join` waits for the drain to finish.
pub struct Running {
    threads: Vec<(String, std::thread::JoinHandle<()>)>,
}

impl Running {
    /// Waits for every thread; names the ones that panicked.
    pub fn join(self) -> Result<(), String> {
        let mut crashed = Vec::new();
        for (name, t) in self.threads {
            if t.join().is_err() {
                crashed.push(name);
            }
        }
        if crashed.is_empty() {
            Ok(())
        } else {
            Err(format!("daemon thread(s) crashed: {}", crashed.join(", ")))
        }
    }
}

pub fn load_model(cfg: &ServeConfig) -> Result<LoadedModel, PredictError> {
    let weights: Weights = cfg.weights.parse().expect("infallible");
    let device =
        crate::device::select(&cfg.device).map_err(|e| PredictError::Input(e.to_string()))?;
    let mut model = LoadedModel::load(&cfg.model, &weights, device, true)?;
    if let Some(precision) = cfg.precision {
        model.set_precision(precision);
    }
    model.check_unknown_views(cfg.tta);
    tracing::info!(model = %model.model_id, device = %crate::device::name(device), precision = ?model.net.precision(), "model loaded");
    Ok(model)
}

fn set_model_info(old: Option<&str>, new: &str) {
    if let Some(old) = old {
        metrics::gauge!(SERVE_MODEL_INFO, "model_id" => old.to_string()).set(0.0);
    }
    metrics::gauge!(SERVE_MODEL_INFO, "model_id" => new.to_string()).set(1.0);
}

impl Engine {
    /// Starts the workers, the model thread and the writer thread. They stop, after draining,
    /// once the ingest channel is closed and empty.
    pub fn start(self) -> Result<Running, String> {
        describe();
        set_model_info(None, &self.model.model_id);
        let class_names = self.model.class_names.clone();
        super::drift::describe();
        let drift = super::drift::DriftTracker::new(
            self.cfg.drift.clone(),
            crate::predict::job::class_prior(
                &crate::train::RunDir::new(&self.cfg.model),
                &class_names,
            ),
        );
        let feature_sets: Arc<Vec<FeatureSet>> =
            Arc::new(self.cfg.feature_sets().map_err(|e| e.to_string())?);
        let (patches_tx, patches_rx) = async_channel::bounded::<PatchSet>(self.cfg.queue.patches);
        let (rows_tx, rows_rx) = async_channel::bounded::<OutRow>(self.cfg.batch.max_images * 4);
        let workers = if self.cfg.queue.workers > 0 {
            self.cfg.queue.workers
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        };
        let mut threads = Vec::new();
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.clone())
                .spawn(f)
                .map(|h| (name, h))
                .map_err(|e| e.to_string())
        };
        for w in 0..workers {
            let ctx = WorkerCtx {
                ingest: self.ingest.clone(),
                patches: patches_tx.clone(),
                rows: rows_tx.clone(),
                slot: self.slot.clone(),
                spool: self.spool.clone(),
                quarantine: self.cfg.quarantine.clone(),
                in_flight: self.in_flight.clone(),
                feature_sets: feature_sets.clone(),
                checks: self.cfg.checks.clone(),
            };
            threads.push(spawn(
                format!("serve-worker-{w}"),
                Box::new(move || ctx.run()),
            )?);
        }
        drop(patches_tx);
        let (patches_weak, rows_weak) = (patches_rx.downgrade(), rows_rx.downgrade());
        let model_ctx = ModelCtx {
            model: self.model,
            patches: patches_rx,
            rows: rows_tx,
            slot: self.slot.clone(),
            cfg: self.cfg.clone(),
        };
        threads.push(spawn(
            "serve-model".into(),
            Box::new(move || model_ctx.run()),
        )?);
        let writer = WriterCtx {
            rows: rows_rx,
            spool: self.spool.clone(),
            results: self.results.clone(),
            cfg: self.cfg.clone(),
            in_flight: self.in_flight.clone(),
            class_names,
            feature_sets,
            drift,
            settled: self.settled,
            roll_now: self.roll_now.clone(),
            results_out: self.results_out,
        };
        threads.push(spawn(
            "serve-writer".into(),
            Box::new(move || writer.run()),
        )?);
        let housekeeping = Housekeeping {
            ingest: self.ingest.downgrade(),
            patches: patches_weak,
            rows: rows_weak,
            spool: self.spool.clone(),
            output_dir: self.cfg.output.dir.clone(),
            relock: None,
        };
        threads.push(spawn(
            "serve-housekeeping".into(),
            Box::new(move || housekeeping.run()),
        )?);
        Ok(Running { threads })
    }
}

/// The daemon's periodic chores, a few times a second: samples the queue depths into their
/// gauges from one place, so they fall back to zero when the pipeline goes idle (setting them
/// at each send left the last busy value standing), and keeps the output folder locked. Holds
/// the queues weakly: it ends when they close.
struct Housekeeping {
    ingest: async_channel::WeakReceiver<SpoolEntry>,
    patches: async_channel::WeakReceiver<PatchSet>,
    rows: async_channel::WeakReceiver<OutRow>,
    spool: Arc<Spool>,
    output_dir: PathBuf,
    /// The output folder's lock, taken again if the folder was removed while running.
    relock: Option<super::daemon::DirLock>,
}

/// How often the housekeeping thread runs (the queue gauges are sampled).
pub const GAUGE_PERIOD: Duration = Duration::from_millis(200);

impl Housekeeping {
    /// The output folder was removed while running: make it again and take its lock again, so
    /// that a second daemon still cannot start on it. (The rows of the file open at that moment
    /// went with it; their images stay spooled and are predicted again at the next start.)
    fn ensure_output_lock(&mut self) {
        if self.output_dir.join(super::daemon::OUTPUT_LOCK).exists() {
            return;
        }
        match super::daemon::DirLock::acquire(
            &self.output_dir,
            super::daemon::OUTPUT_LOCK,
            "output folder",
        ) {
            Ok(l) => {
                tracing::warn!(dir = %self.output_dir.display(), "the output folder was removed while running: made again and locked (the images of the file open then stay spooled until the next start)");
                self.relock = Some(l);
            }
            Err(e) => {
                tracing::error!(error = %e, "the output folder was removed while running and cannot be locked again")
            }
        }
    }

    fn run(mut self) {
        let depth = |queue: &'static str, n: Option<usize>| {
            metrics::gauge!(telemetry::QUEUE_DEPTH, "queue" => queue).set(n.unwrap_or(0) as f64);
            n.is_some()
        };
        loop {
            // Upgrading takes a receiver for a moment; a queue that is closed reads as empty.
            let open = [
                depth("ingest", self.ingest.upgrade().map(|r| r.len())),
                depth("patches", self.patches.upgrade().map(|r| r.len())),
                depth("rows", self.rows.upgrade().map(|r| r.len())),
            ];
            metrics::gauge!(telemetry::SERVE_SPOOLED).set(self.spool.len() as f64);
            if !open.iter().any(|&o| o) {
                return;
            }
            self.ensure_output_lock();
            std::thread::sleep(GAUGE_PERIOD);
        }
    }
}

struct WorkerCtx {
    ingest: async_channel::Receiver<SpoolEntry>,
    patches: async_channel::Sender<PatchSet>,
    rows: async_channel::Sender<OutRow>,
    slot: Arc<ModelSlot>,
    spool: Arc<Spool>,
    quarantine: PathBuf,
    in_flight: Arc<InFlight>,
    feature_sets: Arc<Vec<FeatureSet>>,
    checks: crate::serve::config::ImageChecks,
}

impl WorkerCtx {
    fn run(self) {
        while let Ok(entry) = self.ingest.recv_blocking() {
            if !self.in_flight.begin(&entry) {
                metrics::counter!(telemetry::STAGE_DROPPED, "stage" => "decode", "reason" => "duplicate").increment(1);
                continue;
            }
            metrics::counter!(telemetry::STAGE_RECEIVED, "stage" => "decode").increment(1);
            let accepted = Instant::now();
            let model = self
                .slot
                .prep
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            // Quarantined before a restart: only its error row is still owed.
            if let Some(q) = &entry.quarantined {
                let reason = q.reason.clone();
                if self
                    .rows
                    .send_blocking(OutRow::refused(entry, model.model_id.clone(), reason))
                    .is_err()
                {
                    break;
                }
                continue;
            }
            let augs = &model.transforms;
            let decode_started = Instant::now();
            let result = std::fs::read(&entry.bytes_path)
                .map_err(|e| {
                    (
                        format!(
                            "{}: cannot read spooled image: {e}",
                            entry.bytes_path.display()
                        ),
                        "io",
                    )
                })
                .and_then(|bytes| {
                    // Errors name the image by its id (and the client's file name, if any).
                    let name = if entry.original_name.is_empty() {
                        entry.id.clone()
                    } else {
                        format!("{} ({})", entry.id, super::one_line(&entry.original_name))
                    };
                    decode_bytes(&bytes, Path::new(&name), &model.cfg.decode)
                        .map_err(|e| (e.to_string(), e.kind()))
                });
            match result {
                Err((reason, "io")) => {
                    // Not the image's fault (the spool's file vanished or the disk failed): it
                    // stays spooled, and the next start tries again.
                    metrics::counter!(telemetry::STAGE_ERRORS, "stage" => "decode", "reason" => "io").increment(1);
                    tracing::error!(id = %entry.id, reason = %reason, "cannot read a spooled image; it stays in the spool");
                    self.in_flight.end([entry.key()]);
                }
                Err((reason, kind)) => {
                    metrics::counter!(telemetry::STAGE_ERRORS, "stage" => "decode", "reason" => kind).increment(1);
                    // The quarantine is durable (and owes this row) before the row is sent.
                    match self.spool.quarantine(&entry, &reason, &self.quarantine) {
                        Ok(record) => {
                            if self
                                .rows
                                .send_blocking(OutRow::refused(
                                    record,
                                    model.model_id.clone(),
                                    reason,
                                ))
                                .is_err()
                            {
                                break;
                            }
                        }
                        Err(e) => {
                            tracing::error!(id = %entry.id, error = %e, "quarantine failed; the image stays in the spool");
                            self.in_flight.end([entry.key()]);
                        }
                    }
                }
                Ok(img) => {
                    let views = augs
                        .iter()
                        .map(|aug| {
                            model
                                .cfg
                                .patches
                                .iter()
                                .zip(&model.zmuv)
                                .map(|(patch, z)| {
                                    let mut buf = vec![0f32; patch.pixels()];
                                    make_patch(&img, patch, aug, &mut buf);
                                    z.apply(&mut buf);
                                    buf
                                })
                                .collect()
                        })
                        .collect();
                    // On the decoded image, before any warp: the features describe the raw image,
                    // as `plankton features` computes them.
                    let features = (!self.feature_sets.is_empty()).then(|| {
                        (
                            (img.height(), img.width()),
                            crate::features::writer::compute(&self.feature_sets, &img),
                        )
                    });
                    let flag = self.checks.flag(&img);
                    if let Some(flag) = flag {
                        metrics::counter!(telemetry::SERVE_FLAGGED, "flag" => flag).increment(1);
                    }
                    metrics::counter!(telemetry::STAGE_SENT, "stage" => "decode").increment(1);
                    telemetry::busy_since("decode", decode_started);
                    let size = (img.height(), img.width());
                    let raw = img.as_raw();
                    let brightness = (raw.iter().map(|&v| u64::from(v)).sum::<u64>() as f64
                        / raw.len().max(1) as f64) as f32;
                    if self
                        .patches
                        .send_blocking(PatchSet {
                            entry,
                            size,
                            brightness,
                            flag,
                            features,
                            views,
                            accepted,
                        })
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    }
}

struct ModelCtx {
    model: LoadedModel,
    patches: async_channel::Receiver<PatchSet>,
    rows: async_channel::Sender<OutRow>,
    slot: Arc<ModelSlot>,
    cfg: ServeConfig,
}

impl ModelCtx {
    /// The next micro-batch: waits for a first image, then takes more until the batch is full or
    /// the first one has waited `max_latency_ms`. Empty when the channel is closed and drained.
    fn next_batch(&self, rt: &tokio::runtime::Runtime) -> Vec<PatchSet> {
        let mut batch = Vec::with_capacity(self.cfg.batch.max_images);
        let Ok(first) = self.patches.recv_blocking() else {
            return batch;
        };
        let deadline = tokio::time::Instant::from_std(
            Instant::now() + Duration::from_millis(self.cfg.batch.max_latency_ms),
        );
        batch.push(first);
        while batch.len() < self.cfg.batch.max_images {
            match self.patches.try_recv() {
                Ok(p) => batch.push(p),
                Err(async_channel::TryRecvError::Closed) => break,
                Err(async_channel::TryRecvError::Empty) => {
                    match rt.block_on(async {
                        tokio::time::timeout_at(deadline, self.patches.recv()).await
                    }) {
                        Ok(Ok(p)) => batch.push(p),
                        _ => break, // deadline, or closed
                    }
                }
            }
        }
        batch
    }

    fn reload(&mut self) {
        let old = self.model.model_id.clone();
        let loaded = load_model(&self.cfg).map_err(|e| e.to_string()).and_then(|m| {
            if m.cfg.patches != self.model.cfg.patches || m.class_names != self.model.class_names {
                Err("the new run has other patches or classes than the one being served: restart the daemon for it".into())
            } else {
                Ok(m)
            }
        });
        match loaded {
            Ok(m) => {
                tracing::info!(old = %old, new = %m.model_id, "model reloaded");
                set_model_info(Some(&old), &m.model_id);
                *self.slot.prep.write().unwrap() = Arc::new(Prep::of(&m, self.cfg.tta));
                self.model = m;
                metrics::counter!(SERVE_MODEL_RELOADS, "outcome" => "ok").increment(1);
            }
            Err(e) => {
                tracing::error!(error = %e, model = %old, "model reload failed; still serving the previous model");
                metrics::counter!(SERVE_MODEL_RELOADS, "outcome" => "failed").increment(1);
            }
        }
    }

    fn run(mut self) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("timer runtime");
        if self.cfg.threads > 0 {
            tch::set_num_threads(self.cfg.threads as i32);
        }
        let _guard = tch::no_grad_guard();
        let batch_images = metrics::histogram!(SERVE_BATCH_IMAGES);
        let forward_seconds = metrics::histogram!(telemetry::PREDICT_BATCH_SECONDS);
        let latency = metrics::histogram!(SERVE_LATENCY_SECONDS);
        let batch_wait = metrics::histogram!(telemetry::BATCH_WAIT_SECONDS);
        loop {
            let t_wait = Instant::now();
            let batch = self.next_batch(&rt);
            batch_wait.record(t_wait.elapsed().as_secs_f64());
            if batch.is_empty() {
                break;
            }
            if self.slot.reload.swap(false, Ordering::SeqCst) {
                self.reload();
            }
            let model = &self.model;
            batch_images.record(batch.len() as f64);
            let t0 = Instant::now();
            let views = batch[0].views.len();
            let classes = model.class_names.len();
            let inputs: Vec<tch::Tensor> = model
                .cfg
                .patches
                .iter()
                .enumerate()
                .map(|(k, p)| {
                    let mut flat = Vec::with_capacity(batch.len() * views * p.pixels());
                    for set in &batch {
                        for v in &set.views {
                            flat.extend_from_slice(&v[k]);
                        }
                    }
                    model.net.upload(&tch::Tensor::from_slice(&flat).view([
                        (batch.len() * views) as i64,
                        1,
                        p.rows as i64,
                        p.cols as i64,
                    ]))
                })
                .collect();
            // Logits (and the penultimate features when the unknown rule needs them): one row
            // of C + F values per view.
            let feature_dim = model.wants_features().then(|| model.net.feature_dim());
            let outputs = match feature_dim {
                Some(_) => {
                    let (features, logits) = model.net.forward_features(&inputs);
                    tch::Tensor::cat(&[logits, features], 1)
                }
                None => model.net.forward_t(&inputs, false).to_kind(Kind::Float),
            }
            .to_device(Device::Cpu);
            let flat: Vec<f32> = Vec::try_from(outputs.flatten(0, -1)).expect("float tensor");
            forward_seconds.record(t0.elapsed().as_secs_f64());
            telemetry::busy_since("model", t0);
            metrics::counter!(telemetry::PREDICT_PATCHES).increment((batch.len() * views) as u64);
            let width = classes + feature_dim.unwrap_or(0);
            let mut out = vec![0f64; classes];
            let mut logits = Vec::with_capacity(views * classes);
            for (i, set) in batch.into_iter().enumerate() {
                let block = &flat[i * views * width..(i + 1) * views * width];
                let mut mean = ViewMean::new(width, views);
                let mut averaged = None;
                logits.clear();
                for row in block.chunks_exact(width) {
                    logits.extend_from_slice(&row[..classes]);
                    averaged = mean.push(0, row);
                }
                let mut averaged = averaged.expect("every view of the image");
                // The aggregation renormalises each view: logits serve as log-probabilities.
                aggregate(&logits, classes, self.cfg.aggregation, &mut out);
                let mut p: Vec<f32> = out.iter().map(|&v| v as f32).collect();
                if let Some(c) = &model.calibration {
                    p = crate::evaluate::calibration::apply_temperature(&p, classes, c.temperature);
                }
                let mean_features = feature_dim.map(|_| averaged.split_off(classes));
                let image = ImageOutputs {
                    probabilities: p,
                    mean_logits: averaged,
                    mean_features,
                };
                let unknown = model.unknown_columns(&image);
                let p = image.probabilities;
                // From the moment the image was spooled (acknowledged), not from when a worker
                // picked it up: queueing is part of what a client waits for.
                let waited_ms = unix_ms().saturating_sub(set.entry.received_unix_ms) as f64;
                latency.record((waited_ms / 1000.0).max(set.accepted.elapsed().as_secs_f64()));
                metrics::counter!(telemetry::PREDICT_IMAGES).increment(1);
                let row = OutRow {
                    entry: set.entry,
                    model_id: model.model_id.clone(),
                    probabilities: Some(p),
                    error: None,
                    views: views as u16,
                    size: Some(set.size),
                    brightness: Some(set.brightness),
                    flag: set.flag,
                    features: set.features,
                    unknown,
                };
                if self.rows.send_blocking(row).is_err() {
                    return;
                }
            }
        }
    }
}

struct WriterCtx {
    rows: async_channel::Receiver<OutRow>,
    spool: Arc<Spool>,
    results: Arc<ResultStore>,
    cfg: ServeConfig,
    in_flight: Arc<InFlight>,
    class_names: Vec<String>,
    feature_sets: Arc<Vec<FeatureSet>>,
    drift: super::drift::DriftTracker,
    settled: Option<async_channel::Sender<Settled>>,
    roll_now: Arc<AtomicBool>,
    results_out: Option<async_channel::Sender<ServedPrediction>>,
}

/// How often a writer whose open file holds JetStream messages looks at the pressure flag.
const PRESSURE_CHECK: Duration = Duration::from_millis(200);

/// The open output file: rows since it was opened and the ids to release when it is finished.
struct OpenFile {
    writer: PredictionWriter,
    /// The features file beside it (same stamp), when the daemon writes features.
    features: Option<FeatureWriter>,
    model_id: String,
    opened: Instant,
    /// The spool entries whose rows are in this file.
    keys: Vec<EntryKey>,
    /// Those that came as JetStream messages, to be acked once the file is finished.
    settle: Vec<Settled>,
    /// Its rows as published results (only when `results_out` is set).
    served: Vec<ServedPrediction>,
    path: PathBuf,
    /// flocks held on the `.partial` files while they are written: another daemon's start-up
    /// clean-up skips them.
    _partial_locks: Vec<std::fs::File>,
}

/// Holds an flock on a `.partial` file being written (best effort: the file is ours anyway).
fn lock_partial(final_path: &Path) -> Option<std::fs::File> {
    let mut p = final_path.as_os_str().to_owned();
    p.push(".partial");
    let f = std::fs::File::open(PathBuf::from(p)).ok()?;
    f.try_lock().ok()?;
    Some(f)
}

/// Spool entries whose rows are already in a finished file of this spool (a crash between a
/// file's rename and the release of its images) are released instead of predicted again, so
/// a `kill -9` does not duplicate rows. Only files finished since the oldest entry was accepted
/// are read (two columns each). Returns the entries still to process, and those released.
pub fn release_already_written(
    spool: &Spool,
    out_dir: &Path,
    pending: Vec<SpoolEntry>,
) -> (Vec<SpoolEntry>, Vec<SpoolEntry>) {
    let Some(oldest) = pending.iter().map(|e| e.received_unix_ms).min() else {
        return (pending, Vec::new());
    };
    // A little slack for a file system whose clock is not ours (a network mount).
    let since = UNIX_EPOCH + Duration::from_millis(oldest.saturating_sub(5_000));
    let mut written = HashSet::new();
    let Ok(listing) = std::fs::read_dir(out_dir) else {
        return (pending, Vec::new());
    };
    for e in listing.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("predictions-") && name.ends_with(".parquet")) {
            continue;
        }
        if e.metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t < since)
        {
            continue;
        }
        match crate::sinks::parquet::served_keys(&e.path()) {
            Ok((model, keys))
                if model.get("spool_id").and_then(|v| v.as_str()) == Some(spool.id()) =>
            {
                written.extend(keys)
            }
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(file = %e.path().display(), error = %err, "cannot read a finished prediction file; its images are predicted again")
            }
        }
    }
    let (done, todo): (Vec<SpoolEntry>, Vec<SpoolEntry>) = pending
        .into_iter()
        .partition(|e| written.contains(&e.key()));
    if done.is_empty() {
        return (todo, done);
    }
    let keys: Vec<EntryKey> = done.iter().map(SpoolEntry::key).collect();
    match spool.complete(&keys) {
        Ok(()) => {
            tracing::info!(images = keys.len(), "released spooled images whose rows were already in a finished file (a crash came between the two)");
            (todo, done)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot release images already written; they are predicted again");
            let mut all = todo;
            all.extend(done);
            all.sort_by_key(|e| e.seq);
            (all, Vec::new())
        }
    }
}

/// Removes unfinished output files a crash left behind (their images are still in the spool).
/// A `.partial` file another running daemon holds (flock) is left alone: its writer is alive.
pub fn clean_partial_outputs(dir: &Path) -> std::io::Result<usize> {
    let mut n = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().ends_with(".partial") {
                let in_use = std::fs::File::open(e.path())
                    .is_ok_and(|f| matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock)));
                if in_use {
                    tracing::warn!(file = %e.path().display(), "an unfinished prediction file is being written by another process: left alone");
                    continue;
                }
                std::fs::remove_file(e.path())?;
                n += 1;
            }
        }
    }
    Ok(n)
}

impl WriterCtx {
    fn open(&self, model_id: &str, seq: &mut u64) -> Result<OpenFile, String> {
        *seq += 1;
        let stamp = format!("{}-{:04}", unix_ms(), seq);
        let path = self
            .cfg
            .output
            .dir
            .join(format!("predictions-{stamp}.parquet"));
        let model = serde_json::json!({ "model_id": model_id, "daemon": self.cfg.name, "tta": self.cfg.tta, "aggregation": self.cfg.aggregation, "spool_id": self.spool.id() });
        let writer = PredictionWriter::create_served(
            &path,
            self.class_names.clone(),
            model_id,
            &model,
            self.cfg.output.top_k,
        )
        .map_err(|e| e.to_string())?;
        let features = if self.feature_sets.is_empty() {
            None
        } else {
            Some(
                FeatureWriter::create(
                    &self
                        .cfg
                        .output
                        .dir
                        .join(format!("features-{stamp}.parquet")),
                    &self.feature_sets,
                )
                .map_err(|e| e.to_string())?,
            )
        };
        let mut partial_locks: Vec<std::fs::File> = lock_partial(&path).into_iter().collect();
        if features.is_some() {
            partial_locks.extend(lock_partial(
                &self
                    .cfg
                    .output
                    .dir
                    .join(format!("features-{stamp}.parquet")),
            ));
        }
        Ok(OpenFile {
            writer,
            features,
            model_id: model_id.to_string(),
            opened: Instant::now(),
            keys: Vec::new(),
            settle: Vec::new(),
            served: Vec::new(),
            path,
            _partial_locks: partial_locks,
        })
    }

    fn finish(&self, file: OpenFile) {
        let _busy = telemetry::Busy::start("writer");
        let OpenFile {
            writer,
            features,
            keys,
            settle,
            served,
            path,
            ..
        } = file;
        // The features file first: the images leave the spool only once both files are in place.
        if let Some(f) = features {
            if let Err(e) = f.finish() {
                tracing::error!(error = %e, path = %path.display(), "features file not finished; its images stay in the spool");
                return;
            }
        }
        match writer.finish() {
            Ok(rows) => {
                metrics::counter!(SERVE_FILES).increment(1);
                tracing::info!(path = %path.display(), rows, "prediction file finished");
                match self.spool.complete(&keys) {
                    Ok(()) => {
                        if let Some(tx) = &self.settled {
                            for s in settle {
                                let _ = tx.try_send(s);
                            }
                        }
                        if let Some(tx) = &self.results_out {
                            for p in served {
                                let _ = tx.try_send(p);
                            }
                        }
                    }
                    // Not acked either: a restart releases them (their rows are in this file)
                    // and acks them then.
                    Err(e) => {
                        tracing::error!(error = %e, "could not release finished images from the spool (they will be predicted again after a restart)")
                    }
                }
                self.in_flight.end(keys);
            }
            Err(e) => {
                tracing::error!(error = %e, path = %path.display(), "prediction file not finished; its images stay in the spool")
            }
        }
    }

    fn run(mut self) {
        if let Err(e) = std::fs::create_dir_all(&self.cfg.output.dir) {
            tracing::error!(error = %e, dir = %self.cfg.output.dir.display(), "cannot create the output folder");
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("timer runtime");
        let roll_after = Duration::from_secs(self.cfg.output.roll_seconds);
        let mut seq = 0u64;
        let mut open: Option<OpenFile> = None;
        let k = self.cfg.output.top_k.min(self.class_names.len());
        let mut last_rss = Instant::now() - Duration::from_secs(1);
        loop {
            // Wake up at the roll deadline even when no rows come (and a few times a second while
            // the file holds JetStream messages, for a pressure roll).
            let row = match &open {
                Some(f) => {
                    let mut left = roll_after.saturating_sub(f.opened.elapsed());
                    if !f.settle.is_empty() {
                        left = left.min(PRESSURE_CHECK);
                    }
                    match recv_timeout(&rt, &self.rows, left) {
                        Recv::Row(r) => Some(r),
                        Recv::Timeout => None,
                        Recv::Closed => break,
                    }
                }
                None => match self.rows.recv_blocking() {
                    Ok(r) => Some(r),
                    Err(_) => break,
                },
            };
            // The consumer group is near max_ack_pending: its messages are acked only once their
            // file is finished, so the file is finished now instead of at roll_seconds.
            // (The flag is cleared whatever the file holds: one raised while the file held no
            // message must not cut the next file short.)
            let pressure = self.roll_now.swap(false, Ordering::SeqCst)
                && open.as_ref().is_some_and(|f| !f.settle.is_empty());
            if pressure {
                metrics::counter!(super::nats::PRESSURE_ROLLS).increment(1);
            }
            if open.as_ref().is_some_and(|f| {
                pressure
                    || f.opened.elapsed() >= roll_after
                    || row.as_ref().is_some_and(|r| r.model_id != f.model_id)
            }) {
                self.finish(open.take().expect("open"));
            }
            let Some(mut row) = row else { continue };
            let settle = Settled::of(&row.entry, row.error.is_some());
            let row_started = Instant::now();
            if open.is_none() {
                match self.open(&row.model_id, &mut seq) {
                    Ok(f) => open = Some(f),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot open a prediction file; the image stays in the spool");
                        continue;
                    }
                }
            }
            let f = open.as_mut().expect("open");
            if let Some(p) = &row.probabilities {
                let top = top_k(p, 1)[0];
                self.drift.observe(
                    super::drift::source_label(&row.entry.source, &self.cfg.watch.dir),
                    &plankton_core::drift::Observation {
                        predicted: top,
                        confidence: f64::from(p[top]),
                        unknown: row.unknown.unknown,
                        pixels: row.size.map(|(h, w)| u64::from(h) * u64::from(w)),
                        brightness: row.brightness.map(f64::from),
                    },
                );
            }
            let served = ServedPrediction {
                id: row.entry.id.clone(),
                seq: row.entry.seq,
                quarantined: row
                    .entry
                    .quarantined
                    .as_ref()
                    .map(|q| q.path.display().to_string()),
                flag: row.flag.map(str::to_string),
                image_height: row.size.map(|(h, _)| h),
                image_width: row.size.map(|(_, w)| w),
                model_id: row.model_id.clone(),
                predicted_class: row
                    .probabilities
                    .as_ref()
                    .map(|p| self.class_names[top_k(p, 1)[0]].clone()),
                confidence: row.probabilities.as_ref().map(|p| p[top_k(p, 1)[0]]),
                top_classes: row.probabilities.as_ref().map_or(Vec::new(), |p| {
                    top_k(p, k)
                        .into_iter()
                        .map(|i| self.class_names[i].clone())
                        .collect()
                }),
                top_probabilities: row.probabilities.as_ref().map_or(Vec::new(), |p| {
                    top_k(p, k).into_iter().map(|i| p[i]).collect()
                }),
                error: row.error.clone(),
                received_unix_ms: row.entry.received_unix_ms,
                latency_ms: unix_ms().saturating_sub(row.entry.received_unix_ms) as f64,
                unknown: row.unknown.unknown,
                energy: row.unknown.energy,
                mahalanobis: row.unknown.mahalanobis,
            };
            if let Some(fw) = f.features.as_mut() {
                let (size, values) = row
                    .features
                    .take()
                    .map_or((None, None), |(s, v)| (Some(s), Some(v)));
                let pushed = fw.push(FeatureRow {
                    image_id: row.entry.id.clone(),
                    source_path: row.entry.source.clone(),
                    label: None,
                    size,
                    values,
                    error: row.error.clone(),
                });
                if let Err(e) = pushed {
                    tracing::error!(error = %e, "cannot write a feature row; the image stays in the spool");
                    continue;
                }
            }
            let pushed = f.writer.push_served(
                PredictionRow {
                    image_id: row.entry.id.clone(),
                    source_path: row.entry.source.clone(),
                    label: None,
                    probabilities: row.probabilities,
                    views: row.views,
                    error: row.error,
                    unknown: row.unknown,
                },
                ServeColumns {
                    seq: row.entry.seq,
                    received_unix_ms: row.entry.received_unix_ms,
                    image_size: row.size,
                    brightness: row.brightness,
                    flag: row.flag.map(str::to_string),
                    stream_seq: row.entry.delivery.as_ref().map(|d| d.stream_seq),
                    captured_unix_ms: row.entry.delivery.as_ref().and_then(|d| d.captured_unix_ms),
                },
            );
            if let Err(e) = pushed {
                tracing::error!(error = %e, "cannot write a prediction row; the image stays in the spool");
                continue;
            }
            f.keys.push(row.entry.key());
            f.settle.extend(settle);
            if self.results_out.is_some() {
                f.served.push(served.clone());
            }
            self.results.publish(served);
            metrics::counter!(telemetry::STAGE_SENT, "stage" => "writer").increment(1);
            telemetry::busy_since("writer", row_started);
            // Reading /proc costs a syscall and a parse: once a second is enough for a gauge.
            if last_rss.elapsed() >= Duration::from_secs(1) {
                last_rss = Instant::now();
                if let Some(rss) = telemetry::current_rss_bytes() {
                    metrics::gauge!(PROCESS_RESIDENT_BYTES).set(rss as f64);
                }
            }
            if f.keys.len() >= self.cfg.output.roll_rows {
                self.finish(open.take().expect("open"));
            }
        }
        if let Some(f) = open.take() {
            self.finish(f);
        }
    }
}

enum Recv<T> {
    Row(T),
    Timeout,
    Closed,
}

fn recv_timeout<T>(
    rt: &tokio::runtime::Runtime,
    rx: &async_channel::Receiver<T>,
    timeout: Duration,
) -> Recv<T> {
    match rt.block_on(async { tokio::time::timeout(timeout, rx.recv()).await }) {
        Ok(Ok(v)) => Recv::Row(v),
        Ok(Err(_)) => Recv::Closed,
        Err(_) => Recv::Timeout,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_up_clean_up_leaves_a_partial_file_another_process_is_writing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::write(
            dir.join("predictions-1-0001.parquet.partial"),
            b"left by a crash",
        )
        .unwrap();
        std::fs::write(
            dir.join("predictions-2-0001.parquet.partial"),
            b"being written",
        )
        .unwrap();
        std::fs::write(dir.join("predictions-0-0001.parquet"), b"finished").unwrap();
        let held = lock_partial(&dir.join("predictions-2-0001.parquet")).expect("locked");
        assert_eq!(clean_partial_outputs(dir).unwrap(), 1);
        assert!(!dir.join("predictions-1-0001.parquet.partial").exists());
        assert!(
            dir.join("predictions-2-0001.parquet.partial").exists(),
            "in use: kept"
        );
        assert!(dir.join("predictions-0-0001.parquet").exists());
        drop(held);
        assert_eq!(clean_partial_outputs(dir).unwrap(), 1);
    }
}
