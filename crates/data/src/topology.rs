//! Wires the data path: source -> [decode -> warp -> normalise] x N workers -> batch -> consumer,
//! joined by bounded channels whose capacities come from the pipeline TOML.
//!
//! ```text
//!  source task ──records(bounded)──▶ worker threads (decode, warp, ZMUV) ──samples(bounded)──▶
//!  batch task (restores order, fills pooled batches) ──batches(bounded)──▶ Loader::next_batch
//! ```
//!
//! Order is preserved: every item carries a sequence number and the batch task emits them in
//! sequence. A semaphore of `reorder_window` permits bounds how far the source may run ahead of
//! the batch task, so a slow item holds back at most that many finished ones: memory stays
//! bounded whatever the scheduling. Each sample's augmentation is a pure function of
//! (seed, epoch, index), so batches are identical for any worker count.
//!
//! A file that cannot be decoded is counted (metrics + report), named with its reason, and set
//! aside; the pipeline keeps going. A crashed stage names itself in `Loader::finish`.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use image::GrayImage;
use tokio::sync::Semaphore;

use crate::config::PipelineConfig;
use crate::sources::ImageRecord;
use crate::stages::batch::{Batch, BatchPool};
use crate::stages::normalise::Zmuv;
use crate::stages::warp::{augmentation_for, make_patch};
use crate::telemetry::{self, StageMeter, StageTotals};
use plankton_core::decode::decode_file;
use plankton_core::imgproc::Augmentation;
use plankton_core::rng::{Purpose, Stream};

/// Which samples the loader produces, in what order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplePlan {
    /// Every record once per epoch, in listing order (replay, validation, prediction).
    Ordered { epochs: u64 },
    /// A fresh seeded permutation per epoch (training).
    Shuffled { epochs: u64 },
    /// `count` records drawn with replacement (the reference's chunk sampling; ZMUV estimation).
    Random { count: u64 },
}

/// Epoch number used for `SamplePlan::Random` augmentation streams, kept apart from training
/// epochs so the ZMUV chunk does not see the same augmentations as epoch 0.
pub const RANDOM_PLAN_EPOCH: u64 = u64::MAX - 1;

#[derive(Debug, Clone)]
pub struct LoaderSpec {
    pub records: Arc<Vec<ImageRecord>>,
    pub plan: SamplePlan,
    /// Apply random training augmentation (else the identity transform).
    pub augment: bool,
    /// Per-input ZMUV; `None` yields raw inverted patches.
    pub zmuv: Option<Vec<Zmuv>>,
    /// First epoch number (to resume a run mid-way with the same random streams).
    pub first_epoch: u64,
    /// Fixed transforms per record (test-time augmentation): each record is decoded once and
    /// yields one sample per view, consecutively and in this order; `augment` is then ignored.
    pub views: Option<Arc<Vec<Augmentation>>>,
}

/// A bad item that was set aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub path: PathBuf,
    pub kind: &'static str,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("pipeline stage `{stage}` crashed: {message}")]
    StageCrashed { stage: String, message: String },
    #[error("pipeline stage `{stage}` stopped early: {message}")]
    StoppedEarly { stage: String, message: String },
    #[error("no records to load")]
    Empty,
}

/// Live counters of a running loader.
#[derive(Debug)]
pub struct LoaderStats {
    pub source: StageMeter,
    pub decode: StageMeter,
    pub warp: StageMeter,
    pub batch: StageMeter,
    failures: Mutex<Vec<Failure>>,
    failed_paths: Mutex<HashSet<PathBuf>>,
    queues: [QueueGauge; 3],
}

/// Depth of one bounded channel, observed by the stages at every send/receive.
#[derive(Debug)]
pub struct QueueGauge {
    pub name: &'static str,
    gauge: metrics::Gauge,
    sum: AtomicU64,
    n: AtomicU64,
}

impl QueueGauge {
    fn new(name: &'static str) -> Self {
        QueueGauge {
            name,
            gauge: metrics::gauge!(telemetry::QUEUE_DEPTH, "queue" => name),
            sum: AtomicU64::new(0),
            n: AtomicU64::new(0),
        }
    }

    fn observe(&self, depth: usize) {
        self.gauge.set(depth as f64);
        self.sum.fetch_add(depth as u64, Ordering::Relaxed);
        self.n.fetch_add(1, Ordering::Relaxed);
    }

    /// Mean depth over all observations.
    pub fn mean(&self) -> f64 {
        let n = self.n.load(Ordering::Relaxed);
        if n == 0 {
            0.0
        } else {
            self.sum.load(Ordering::Relaxed) as f64 / n as f64
        }
    }
}

impl LoaderStats {
    fn new() -> Self {
        LoaderStats {
            source: StageMeter::new("source"),
            decode: StageMeter::new("decode"),
            warp: StageMeter::new("warp"),
            batch: StageMeter::new("batch"),
            failures: Mutex::new(Vec::new()),
            failed_paths: Mutex::new(HashSet::new()),
            queues: QUEUES.map(QueueGauge::new),
        }
    }

    fn record_failure(&self, f: &Failure) {
        if self.failed_paths.lock().unwrap().insert(f.path.clone()) {
            tracing::warn!(path = %f.path.display(), reason = %f.reason, kind = f.kind, "image set aside");
            self.failures.lock().unwrap().push(f.clone());
        }
    }

    /// Distinct bad files seen so far (each reported once even if met every epoch).
    pub fn failures(&self) -> Vec<Failure> {
        self.failures.lock().unwrap().clone()
    }
}

/// What a finished loader reports.
#[derive(Debug, Clone)]
pub struct LoaderSummary {
    pub samples: u64,
    pub batches: u64,
    pub wall: Duration,
    pub failures: Vec<Failure>,
    /// (stage, totals) in pipeline order.
    pub stages: Vec<(&'static str, StageTotals)>,
    /// (queue, mean depth, capacity).
    pub queues: Vec<(&'static str, f64, usize)>,
    /// Total time the consumer waited in `next_batch`.
    pub consumer_wait: Duration,
    pub workers: usize,
}

struct WorkItem {
    seq: u64,
    epoch: u64,
    record: usize,
    aug_index: u64,
}

struct Done {
    seq: u64,
    epoch: u64,
    record: usize,
    /// One entry per view (one, unless `LoaderSpec::views`), each holding a patch per input.
    result: Result<Vec<Vec<Vec<f32>>>, Failure>,
}

type DecodedCache = Vec<OnceLock<Result<Arc<GrayImage>, Failure>>>;

const QUEUES: [&str; 3] = ["records", "samples", "batches"];

/// A running data path. Pull batches with `next_batch`, then call `finish`.
pub struct Loader {
    batches: async_channel::Receiver<Batch>,
    pub stats: Arc<LoaderStats>,
    tasks: Vec<(
        &'static str,
        tokio::task::JoinHandle<Result<u64, LoaderError>>,
    )>,
    workers: Vec<std::thread::JoinHandle<()>>,
    wait_histogram: metrics::Histogram,
    consumer_wait: Duration,
    started: Instant,
    capacities: [usize; 3],
    worker_count: usize,
}

impl Loader {
    /// Starts the pipeline on the current tokio runtime.
    pub fn spawn(cfg: &PipelineConfig, spec: LoaderSpec) -> Result<Loader, LoaderError> {
        if spec.records.is_empty() {
            return Err(LoaderError::Empty);
        }
        telemetry::describe();
        let stats = Arc::new(LoaderStats::new());
        let capacities = [
            cfg.channels.records,
            cfg.channels.samples,
            cfg.channels.batches,
        ];
        for (q, cap) in QUEUES.iter().zip(capacities) {
            metrics::gauge!(telemetry::QUEUE_CAPACITY, "queue" => *q).set(cap as f64);
        }
        let (records_tx, records_rx) = async_channel::bounded::<WorkItem>(capacities[0]);
        let (samples_tx, samples_rx) = async_channel::bounded::<Done>(capacities[1]);
        let (batches_tx, batches_rx) = async_channel::bounded::<Batch>(capacities[2]);
        let window = Arc::new(Semaphore::new(cfg.loader.reorder_window));
        let worker_count = cfg.worker_count();
        // Per-sample buffers cycle between workers and the batch task.
        let views = spec.views.as_ref().map_or(1, |v| v.len().max(1));
        let buffer_pool = async_channel::bounded::<Vec<f32>>(
            (cfg.loader.reorder_window + worker_count) * cfg.patches.len() * views,
        );
        let cache: Option<Arc<DecodedCache>> = cfg
            .loader
            .cache_decoded
            .then(|| Arc::new((0..spec.records.len()).map(|_| OnceLock::new()).collect()));

        let total = match spec.plan {
            SamplePlan::Ordered { epochs } | SamplePlan::Shuffled { epochs } => {
                epochs * spec.records.len() as u64
            }
            SamplePlan::Random { count } => count,
        };

        let source = tokio::spawn(run_source(
            cfg.seed,
            spec.clone(),
            records_tx,
            window.clone(),
            stats.clone(),
        ));

        let mut workers = Vec::with_capacity(worker_count);
        for w in 0..worker_count {
            let ctx = WorkerCtx {
                cfg: cfg.clone(),
                spec: spec.clone(),
                cache: cache.clone(),
                records: records_rx.clone(),
                samples: samples_tx.clone(),
                buffers: buffer_pool.1.clone(),
                stats: stats.clone(),
            };
            let handle = std::thread::Builder::new()
                .name(format!("plankton-worker-{w}"))
                .spawn(move || ctx.run())
                .map_err(|e| LoaderError::StageCrashed {
                    stage: "worker".into(),
                    message: e.to_string(),
                })?;
            workers.push(handle);
        }
        drop((records_rx, samples_tx));

        let pool = BatchPool::new(cfg.batch.size, &cfg.patches, capacities[2] + 2);
        let batcher = tokio::spawn(run_batcher(BatcherCtx {
            samples: samples_rx,
            batches: batches_tx,
            pool,
            window,
            buffers: buffer_pool.0,
            stats: stats.clone(),
            drop_last: cfg.batch.drop_last,
            records: spec.records.clone(),
            total,
        }));

        Ok(Loader {
            batches: batches_rx,
            stats,
            tasks: vec![("source", source), ("batch", batcher)],
            workers,
            wait_histogram: metrics::histogram!(telemetry::BATCH_WAIT_SECONDS),
            consumer_wait: Duration::ZERO,
            started: Instant::now(),
            capacities,
            worker_count,
        })
    }
}

impl Loader {
    /// The next batch, or `None` when the plan is exhausted. The time spent waiting here is
    /// the consumer's starvation, recorded in the batch-wait histogram.
    pub async fn next_batch(&mut self) -> Option<Batch> {
        let t0 = Instant::now();
        let batch = self.batches.recv().await.ok();
        let waited = t0.elapsed();
        self.stats.queues[2].observe(self.batches.len());
        if batch.is_some() {
            self.consumer_wait += waited;
            self.wait_histogram.record(waited.as_secs_f64());
        }
        batch
    }

    /// Stops the pipeline (if the consumer quit early) and reports. A stage that panicked or
    /// stopped early is named in the error.
    pub async fn finish(self) -> Result<LoaderSummary, LoaderError> {
        let Loader {
            batches,
            stats,
            tasks,
            workers,
            consumer_wait,
            started,
            capacities,
            worker_count,
            ..
        } = self;
        batches.close();
        drop(batches);
        let mut results = Vec::new();
        for (stage, task) in tasks {
            results.push(match task.await {
                Ok(r) => r.map(|n| (stage, n)),
                Err(e) => Err(LoaderError::StageCrashed {
                    stage: stage.into(),
                    message: e.to_string(),
                }),
            });
        }
        let joined = tokio::task::spawn_blocking(move || {
            workers
                .into_iter()
                .map(|w| w.join().map_err(panic_message))
                .collect::<Vec<_>>()
        })
        .await
        .expect("join workers");
        for (w, r) in joined.into_iter().enumerate() {
            if let Err(message) = r {
                return Err(LoaderError::StageCrashed {
                    stage: format!("worker-{w} (decode/warp)"),
                    message,
                });
            }
        }
        let mut batch_count = 0;
        for r in results {
            let (stage, n) = r?;
            if stage == "batch" {
                batch_count = n;
            }
        }
        Ok(LoaderSummary {
            samples: stats.batch.totals().sent,
            batches: batch_count,
            wall: started.elapsed(),
            failures: stats.failures(),
            stages: [&stats.source, &stats.decode, &stats.warp, &stats.batch]
                .iter()
                .map(|m| (m.name, m.totals()))
                .collect(),
            queues: stats
                .queues
                .iter()
                .zip(capacities)
                .map(|(q, c)| (q.name, q.mean(), c))
                .collect(),
            consumer_wait,
            workers: worker_count,
        })
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// Record indices of one epoch.
fn epoch_order(plan: SamplePlan, seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if let SamplePlan::Shuffled { .. } = plan {
        Stream::new(seed, Purpose::Shuffle, epoch, 0).shuffle(&mut order);
    }
    order
}

async fn run_source(
    seed: u64,
    spec: LoaderSpec,
    records: async_channel::Sender<WorkItem>,
    window: Arc<Semaphore>,
    stats: Arc<LoaderStats>,
) -> Result<u64, LoaderError> {
    let n = spec.records.len();
    let items: Box<dyn Iterator<Item = (u64, usize, u64)> + Send> = match spec.plan {
        SamplePlan::Ordered { epochs } | SamplePlan::Shuffled { epochs } => {
            let plan = spec.plan;
            Box::new(
                (spec.first_epoch..spec.first_epoch + epochs).flat_map(move |epoch| {
                    epoch_order(plan, seed, epoch, n)
                        .into_iter()
                        .map(move |r| (epoch, r, r as u64))
                }),
            )
        }
        SamplePlan::Random { count } => {
            let mut rng = Stream::new(seed, Purpose::ZmuvSample, spec.first_epoch, 0);
            Box::new((0..count).map(move |i| (RANDOM_PLAN_EPOCH, rng.below(n as u64) as usize, i)))
        }
    };
    let mut seq = 0u64;
    for (epoch, record, aug_index) in items {
        let Ok(permit) = window.acquire().await else {
            break;
        };
        permit.forget();
        if records
            .send(WorkItem {
                seq,
                epoch,
                record,
                aug_index,
            })
            .await
            .is_err()
        {
            break; // downstream stopped (consumer finished early): not an error
        }
        stats.queues[0].observe(records.len());
        stats.source.sent(1);
        seq += 1;
    }
    Ok(seq)
}

struct WorkerCtx {
    cfg: PipelineConfig,
    spec: LoaderSpec,
    cache: Option<Arc<DecodedCache>>,
    records: async_channel::Receiver<WorkItem>,
    samples: async_channel::Sender<Done>,
    buffers: async_channel::Receiver<Vec<f32>>,
    stats: Arc<LoaderStats>,
}

impl WorkerCtx {
    fn decode(&self, record: usize) -> Result<Arc<GrayImage>, Failure> {
        let path = &self.spec.records[record].path;
        let load = || {
            decode_file(path, &self.cfg.decode)
                .map(Arc::new)
                .map_err(|e| Failure {
                    path: path.clone(),
                    kind: e.kind(),
                    reason: e.to_string(),
                })
        };
        match &self.cache {
            Some(cache) => cache[record].get_or_init(load).clone(),
            None => load(),
        }
    }

    fn run(self) {
        let stats = &self.stats;
        while let Ok(item) = self.records.recv_blocking() {
            stats.queues[0].observe(self.records.len());
            stats.decode.received(1);
            let t0 = Instant::now();
            let path = &self.spec.records[item.record].path;
            let decoded = guarded(path, "decode", || self.decode(item.record));
            stats.decode.busy(t0.elapsed());
            let result = match decoded {
                Err(f) => {
                    stats.decode.error(f.kind);
                    Err(f)
                }
                Ok(img) => guarded(path, "warp", || {
                    stats.decode.sent(1);
                    stats.warp.received(1);
                    let t1 = Instant::now();
                    let drawn;
                    let augs: &[Augmentation] = match &self.spec.views {
                        Some(views) => views,
                        None => {
                            drawn = [if self.spec.augment {
                                augmentation_for(
                                    &self.cfg.augment,
                                    self.cfg.seed,
                                    item.epoch,
                                    item.aug_index,
                                )
                            } else {
                                Augmentation::IDENTITY
                            }];
                            &drawn
                        }
                    };
                    let mut samples = Vec::with_capacity(augs.len());
                    for aug in augs {
                        let mut patches = Vec::with_capacity(self.cfg.patches.len());
                        for (k, patch) in self.cfg.patches.iter().enumerate() {
                            let mut buf = self.buffers.try_recv().unwrap_or_default();
                            buf.resize(patch.pixels(), 0.0);
                            make_patch(&img, patch, aug, &mut buf);
                            if let Some(z) = self.spec.zmuv.as_ref().and_then(|z| z.get(k)) {
                                z.apply(&mut buf);
                            }
                            patches.push(buf);
                        }
                        samples.push(patches);
                    }
                    stats.warp.busy(t1.elapsed());
                    stats.warp.sent(1);
                    Ok(samples)
                })
                .inspect_err(|f| stats.warp.error(f.kind)),
            };
            let done = Done {
                seq: item.seq,
                epoch: item.epoch,
                record: item.record,
                result,
            };
            if self.samples.send_blocking(done).is_err() {
                break;
            }
            stats.queues[1].observe(self.samples.len());
        }
    }
}

/// Runs one item's work, turning a panic (a decoder bug on hostile input, say) into a Failure of
/// that item: a worker that died would leave a hole in the sequence and stall the pipeline.
fn guarded<T>(
    path: &std::path::Path,
    stage: &str,
    work: impl FnOnce() -> Result<T, Failure>,
) -> Result<T, Failure> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).unwrap_or_else(|p| {
        Err(Failure {
            path: path.to_path_buf(),
            kind: "panic",
            reason: format!(
                "{}: {stage} stage panicked: {}",
                path.display(),
                panic_message(p)
            ),
        })
    })
}

struct BatcherCtx {
    samples: async_channel::Receiver<Done>,
    batches: async_channel::Sender<Batch>,
    pool: BatchPool,
    window: Arc<Semaphore>,
    buffers: async_channel::Sender<Vec<f32>>,
    stats: Arc<LoaderStats>,
    drop_last: bool,
    records: Arc<Vec<ImageRecord>>,
    total: u64,
}

async fn run_batcher(mut ctx: BatcherCtx) -> Result<u64, LoaderError> {
    let mut pending: BTreeMap<u64, Done> = BTreeMap::new();
    let mut next = 0u64;
    let mut current: Option<Batch> = None;
    let mut epoch = None;
    let mut number = 0u64;
    let mut sent_batches = 0u64;
    let stats = ctx.stats.clone();

    // Sends a batch; false when the consumer has gone.
    async fn emit(ctx: &BatcherCtx, batch: Batch, stats: &LoaderStats) -> bool {
        let len = batch.len as u64;
        if ctx.batches.send(batch).await.is_err() {
            return false;
        }
        stats.batch.sent(len);
        stats.queues[2].observe(ctx.batches.len());
        true
    }

    'outer: while let Ok(done) = ctx.samples.recv().await {
        stats.queues[1].observe(ctx.samples.len());
        pending.insert(done.seq, done);
        while let Some(d) = pending.remove(&next) {
            next += 1;
            ctx.window.add_permits(1);
            stats.batch.received(1);
            if epoch != Some(d.epoch) {
                if let Some(b) = current.take() {
                    if b.len > 0 && (!ctx.drop_last || b.is_full()) {
                        if !emit(&ctx, b, &stats).await {
                            break 'outer;
                        }
                        sent_batches += 1;
                    }
                }
                epoch = Some(d.epoch);
                number = 0;
            }
            match d.result {
                Err(f) => stats.record_failure(&f),
                Ok(samples) => {
                    for patches in samples {
                        let t0 = Instant::now();
                        let batch = current.get_or_insert_with(|| {
                            let mut b = ctx.pool.take();
                            b.epoch = d.epoch;
                            b.number = number;
                            number += 1;
                            b
                        });
                        batch.push(&patches, ctx.records[d.record].label, d.record);
                        for buf in patches {
                            let _ = ctx.buffers.try_send(buf);
                        }
                        stats.batch.busy(t0.elapsed());
                        if batch.is_full() {
                            let b = current.take().expect("batch");
                            if !emit(&ctx, b, &stats).await {
                                break 'outer;
                            }
                            sent_batches += 1;
                        }
                    }
                }
            }
        }
    }
    // The source may be parked on the reorder window: wake it so it sees the pipeline ending.
    ctx.window.close();
    if ctx.batches.is_closed() {
        return Ok(sent_batches); // consumer stopped early
    }
    if next < ctx.total {
        return Err(LoaderError::StoppedEarly {
            stage: "decode/warp workers".into(),
            message: format!("only {next} of {} samples arrived", ctx.total),
        });
    }
    if let Some(b) = current.take() {
        if b.len > 0 && (!ctx.drop_last || b.is_full()) && emit(&ctx, b, &stats).await {
            sent_batches += 1;
        }
    }
    Ok(sent_batches)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_item_becomes_a_named_failure() {
        let r: Result<(), Failure> = guarded(std::path::Path::new("/data/x.jpg"), "decode", || {
            panic!("bad huffman table")
        });
        let f = r.unwrap_err();
        assert_eq!(f.kind, "panic");
        assert!(
            f.reason.contains("/data/x.jpg") && f.reason.contains("bad huffman table"),
            "{}",
            f.reason
        );
        let ok: Result<u8, Failure> = guarded(std::path::Path::new("y"), "warp", || Ok(3));
        assert_eq!(ok.unwrap(), 3);
    }

    #[test]
    fn shuffled_epochs_are_permutations_and_differ() {
        let plan = SamplePlan::Shuffled { epochs: 2 };
        let (a, b) = (epoch_order(plan, 1, 0, 50), epoch_order(plan, 1, 1, 50));
        assert_ne!(a, b);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
        assert_eq!(
            epoch_order(SamplePlan::Ordered { epochs: 1 }, 1, 3, 4),
            vec![0, 1, 2, 3]
        );
    }
}
