//! Metric names in one place, and the per-stage meters every stage uses.
//!
//! Every stage emits the same family (received / sent / errors / busy time), labelled only by
//! stage (and error reason): low cardinality, never per image. Meters also keep their own
//! atomic totals so that `loader-bench` can print per-stage rates without a metrics exporter.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub const STAGE_RECEIVED: &str = "plankton_stage_received_total";
pub const STAGE_SENT: &str = "plankton_stage_sent_total";
pub const STAGE_ERRORS: &str = "plankton_stage_errors_total";
/// Items a stage refused or let go under backpressure (e.g. HTTP 503), by stage.
pub const STAGE_DROPPED: &str = "plankton_stage_dropped_total";
/// Microseconds because `metrics` counters are integers; seconds would round busy time away.
pub const STAGE_BUSY_MICROSECONDS: &str = "plankton_stage_busy_microseconds_total";

/// Time a daemon stage spent on one item or batch; its `_sum` is the stage's busy seconds, so
/// `rate(plankton_stage_busy_seconds_sum[1m])` says where the daemon's time goes.
pub const STAGE_BUSY_SECONDS: &str = "plankton_stage_busy_seconds";

/// Records the time since `started` as busy time of `stage`.
pub fn busy_since(stage: &'static str, started: std::time::Instant) {
    metrics::histogram!(STAGE_BUSY_SECONDS, "stage" => stage)
        .record(started.elapsed().as_secs_f64());
}

/// Records a stage's busy time when dropped: for a function with several ways out.
pub struct Busy(&'static str, std::time::Instant);

impl Busy {
    pub fn start(stage: &'static str) -> Busy {
        Busy(stage, std::time::Instant::now())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        busy_since(self.0, self.1);
    }
}
pub const QUEUE_DEPTH: &str = "plankton_queue_depth";
pub const QUEUE_CAPACITY: &str = "plankton_queue_capacity";
/// How long the consumer (the model) waited for each batch: the "is the accelerator starved?"
/// histogram.
pub const BATCH_WAIT_SECONDS: &str = "plankton_batch_wait_seconds";
pub const LAYOUT_PROBLEMS: &str = "plankton_layout_problems_total";

pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(STAGE_RECEIVED, "Items a stage took from its input");
    describe_counter!(STAGE_SENT, "Items a stage passed on");
    describe_counter!(STAGE_ERRORS, "Items a stage set aside, by reason");
    describe_counter!(STAGE_DROPPED, "Items a stage refused under backpressure");
    describe_counter!(
        STAGE_BUSY_MICROSECONDS,
        Unit::Microseconds,
        "Time a stage spent working (summed over its workers)"
    );
    describe_gauge!(QUEUE_DEPTH, "Items waiting in a bounded channel");
    describe_gauge!(QUEUE_CAPACITY, "Capacity of a bounded channel");
    describe_histogram!(
        BATCH_WAIT_SECONDS,
        Unit::Seconds,
        "Time the consumer waited for each batch"
    );
    describe_histogram!(
        TRAIN_STEP_SECONDS,
        Unit::Seconds,
        "Model compute time per training step"
    );
    describe_counter!(TRAIN_IMAGES, "Images trained on");
    describe_gauge!(
        TRAIN_IMAGES_PER_SECOND,
        "Training throughput (moving average)"
    );
    describe_gauge!(TRAIN_LOSS, "Training loss of the last step");
    describe_gauge!(TRAIN_LEARNING_RATE, "Current learning rate");
    describe_gauge!(
        VALID_LOG_LOSS,
        "Validation log loss (Kaggle clipping) at the last validation"
    );
    describe_gauge!(
        VALID_TOP1,
        "Validation top-1 accuracy at the last validation"
    );
    describe_histogram!(STAGE_BUSY_SECONDS, Unit::Seconds, "Busy time of a daemon stage per item or batch (spool: copy + fsync; decode: decode + warp; model: forward pass; writer: rows and finished files)");
    describe_histogram!(
        PREDICT_BATCH_SECONDS,
        Unit::Seconds,
        "Model compute time per prediction batch (all TTA views in it)"
    );
    describe_counter!(
        PREDICT_IMAGES,
        "Images predicted (after combining their TTA views)"
    );
    describe_counter!(
        PREDICT_PATCHES,
        "Patches (image x TTA view) through the model"
    );
    describe_counter!(
        PREDICT_FAILED,
        "Images that could not be predicted (kept as rows with their reason)"
    );
    describe_histogram!(
        SERVE_LATENCY_SECONDS,
        Unit::Seconds,
        "From acceptance (spooled) to the prediction row handed to the writer"
    );
    describe_histogram!(
        SERVE_BATCH_IMAGES,
        "Images per model batch (micro-batching)"
    );
    describe_gauge!(SERVE_MODEL_INFO, "1 for the model version being served");
    describe_counter!(SERVE_MODEL_RELOADS, "Model reloads, by outcome");
    describe_counter!(SERVE_FILES, "Prediction files finished");
    describe_counter!(
        SERVE_FLAGGED,
        "Images flagged as not an organism (too small, blank), by flag"
    );
    describe_gauge!(
        SERVE_SPOOLED,
        "Images accepted whose rows are not yet in a finished file"
    );
    describe_gauge!(
        PROCESS_RESIDENT_BYTES,
        Unit::Bytes,
        "Resident memory of the process"
    );
    describe_counter!(
        LAYOUT_PROBLEMS,
        "Dataset entries skipped because they do not fit the layout"
    );
}

/// Counters of one stage.
#[derive(Debug)]
pub struct StageMeter {
    pub name: &'static str,
    received: AtomicU64,
    sent: AtomicU64,
    errors: AtomicU64,
    busy_ns: AtomicU64,
    m_received: metrics::Counter,
    m_sent: metrics::Counter,
    m_busy: metrics::Counter,
}

/// A point-in-time copy of a meter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StageTotals {
    pub received: u64,
    pub sent: u64,
    pub errors: u64,
    pub busy: Duration,
}

impl StageMeter {
    pub fn new(name: &'static str) -> Self {
        StageMeter {
            name,
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            busy_ns: AtomicU64::new(0),
            m_received: metrics::counter!(STAGE_RECEIVED, "stage" => name),
            m_sent: metrics::counter!(STAGE_SENT, "stage" => name),
            m_busy: metrics::counter!(STAGE_BUSY_MICROSECONDS, "stage" => name),
        }
    }

    pub fn received(&self, n: u64) {
        self.received.fetch_add(n, Ordering::Relaxed);
        self.m_received.increment(n);
    }

    pub fn sent(&self, n: u64) {
        self.sent.fetch_add(n, Ordering::Relaxed);
        self.m_sent.increment(n);
    }

    pub fn error(&self, reason: &'static str) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(STAGE_ERRORS, "stage" => self.name, "reason" => reason).increment(1);
    }

    pub fn busy(&self, d: Duration) {
        let before = self
            .busy_ns
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
        let after = before + d.as_nanos() as u64;
        self.m_busy.increment(after / 1000 - before / 1000);
    }

    pub fn totals(&self) -> StageTotals {
        StageTotals {
            received: self.received.load(Ordering::Relaxed),
            sent: self.sent.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            busy: Duration::from_nanos(self.busy_ns.load(Ordering::Relaxed)),
        }
    }
}

/// Peak resident set size of this process in bytes (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_kib("VmHWM:").map(|k| k * 1024)
}

/// Current resident set size in bytes (Linux `VmRSS`), if known.
pub fn current_rss_bytes() -> Option<u64> {
    proc_status_kib("VmRSS:").map(|k| k * 1024)
}

fn proc_status_kib(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

pub const TRAIN_STEP_SECONDS: &str = "plankton_train_step_seconds";
pub const TRAIN_IMAGES: &str = "plankton_train_images_total";
pub const TRAIN_IMAGES_PER_SECOND: &str = "plankton_train_images_per_second";
pub const TRAIN_LOSS: &str = "plankton_train_loss";
pub const TRAIN_LEARNING_RATE: &str = "plankton_train_learning_rate";
pub const VALID_LOG_LOSS: &str = "plankton_valid_log_loss";
pub const VALID_TOP1: &str = "plankton_valid_top1_accuracy";
pub const PREDICT_BATCH_SECONDS: &str = "plankton_predict_batch_seconds";
pub const PREDICT_IMAGES: &str = "plankton_predict_images_total";
pub const PREDICT_PATCHES: &str = "plankton_predict_patches_total";
pub const PREDICT_FAILED: &str = "plankton_predict_failed_total";
pub const SERVE_LATENCY_SECONDS: &str = "plankton_serve_latency_seconds";
pub const SERVE_BATCH_IMAGES: &str = "plankton_serve_batch_images";
pub const SERVE_MODEL_INFO: &str = "plankton_serve_model_info";
pub const SERVE_MODEL_RELOADS: &str = "plankton_serve_model_reloads_total";
pub const SERVE_FILES: &str = "plankton_serve_files_total";
/// Images predicted but flagged as not an organism (`too_small`, `blank`), by flag.
pub const SERVE_FLAGGED: &str = "plankton_serve_flagged_total";
/// Images held in the spool: accepted, their row not yet in a finished file.
pub const SERVE_SPOOLED: &str = "plankton_serve_spooled_images";
pub const PROCESS_RESIDENT_BYTES: &str = "plankton_process_resident_bytes";
