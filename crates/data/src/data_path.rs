//! Jobs that run the data path on its own: ZMUV estimation and the loader benchmark.

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::path::{Path, PathBuf};

use crate::config::PipelineConfig;
use crate::sources::Dataset;
use crate::sources::ImageRecord;
use crate::stages::normalise::{NormaliseError, ZmuvAccumulator, ZmuvStats};
use crate::telemetry::{self, StageTotals};
use crate::topology::{Loader, LoaderError, LoaderSpec, LoaderSummary, SamplePlan};

#[derive(Debug, thiserror::Error)]
pub enum DataPathError {
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    Normalise(#[from] NormaliseError),
    #[error("{0}: no labelled training images to estimate ZMUV on")]
    NoTrainingImages(PathBuf),
}

/// Estimates ZMUV on the training images of `ds` and saves the stats to `out`.
pub async fn estimate_and_save_zmuv(
    cfg: &PipelineConfig,
    ds: &Dataset,
    out: &Path,
) -> Result<(ZmuvStats, LoaderSummary), DataPathError> {
    if ds.train.is_empty() {
        return Err(DataPathError::NoTrainingImages(ds.root.clone()));
    }
    let (stats, summary) = estimate_zmuv(cfg, Arc::new(ds.train.clone())).await?;
    stats.save(out)?;
    Ok((stats, summary))
}

/// Estimates the global mean/std per network input on `cfg.zmuv.samples` augmented training
/// patches drawn with replacement (the reference's chunk), through the same loader as training.
pub async fn estimate_zmuv(
    cfg: &PipelineConfig,
    train: Arc<Vec<ImageRecord>>,
) -> Result<(ZmuvStats, LoaderSummary), LoaderError> {
    let spec = LoaderSpec {
        records: train,
        plan: SamplePlan::Random {
            count: cfg.zmuv.samples as u64,
        },
        augment: true,
        zmuv: None,
        first_epoch: 0,
        views: None,
    };
    let mut loader = Loader::spawn(cfg, spec)?;
    let mut acc = vec![ZmuvAccumulator::default(); cfg.patches.len()];
    while let Some(batch) = loader.next_batch().await {
        for (k, a) in acc.iter_mut().enumerate() {
            a.add(batch.input(k));
        }
    }
    let summary = loader.finish().await?;
    let stats = ZmuvStats {
        inputs: acc.iter().map(|a| a.finish()).collect(),
        samples: summary.samples as usize,
        seed: cfg.seed,
    };
    Ok((stats, summary))
}

/// 95x95 training patches per second that the reference network (convroll4, batch of 32, fp32)
/// consumes on one NVIDIA H200, measured with scripts/gpu_consumption.py (PyTorch 2.11), and the
/// fastest variant measured (batch 128, bf16 autocast). See docs/BENCHMARKS.md.
pub const GPU_CONSUMPTION_REFERENCE: f64 = 1977.0;
pub const GPU_CONSUMPTION_FASTEST: f64 = 6446.0;

/// Results of `loader-bench`.
#[derive(Debug, Clone)]
pub struct LoaderBenchReport {
    pub summary: LoaderSummary,
    pub epochs: u64,
    /// Wall-clock time of each epoch (from the first batch request to the epoch's last batch).
    pub epoch_times: Vec<Duration>,
    /// Resident set size after each epoch, bytes.
    pub rss_after_epoch: Vec<u64>,
    pub peak_rss: Option<u64>,
}

impl LoaderBenchReport {
    pub fn images_per_second(&self) -> f64 {
        self.summary.samples as f64 / self.summary.wall.as_secs_f64()
    }

    /// Human-readable report.
    pub fn render(&self) -> String {
        let s = &self.summary;
        let mut out = String::new();
        let mb = |b: u64| b as f64 / (1024.0 * 1024.0);
        out +=
            &format!(
            "loader-bench: {} samples in {} batches over {} epoch(s), {} worker(s), {:.2} s wall\n",
            s.samples, s.batches, self.epochs, s.workers, s.wall.as_secs_f64()
        );
        out += &format!(
            "  overall: {:.0} images/s ({:.0} images/s per worker)\n",
            self.images_per_second(),
            self.images_per_second() / s.workers as f64
        );
        for (i, t) in self.epoch_times.iter().enumerate() {
            let rss = self
                .rss_after_epoch
                .get(i)
                .map(|&b| format!(", RSS after {:.1} MiB", mb(b)))
                .unwrap_or_default();
            out += &format!("  epoch {i}: {:.2} s{rss}\n", t.as_secs_f64());
        }
        out +=
            "  per stage (items, errors, busy time summed over workers, items/s per busy core):\n";
        for (
            name,
            StageTotals {
                received: _,
                sent,
                errors,
                busy,
            },
        ) in &s.stages
        {
            let rate = if busy.as_secs_f64() > 0.0 {
                format!("{:.0}/s", *sent as f64 / busy.as_secs_f64())
            } else {
                "-".into()
            };
            out += &format!(
                "    {name:<7} sent {sent:>8}  errors {errors:>5}  busy {:>8.3} s  {rate}\n",
                busy.as_secs_f64()
            );
        }
        out += "  queues (mean depth / capacity):";
        for (q, mean, cap) in &s.queues {
            out += &format!("  {q} {mean:.1}/{cap}");
        }
        out += &format!(
            "\n  consumer waited {:.3} s in total for batches\n",
            s.consumer_wait.as_secs_f64()
        );
        let rate = self.images_per_second();
        out += &format!(
            "  GPU feed: the reference convroll4 trains on ~{GPU_CONSUMPTION_REFERENCE:.0} (fp32, batch 32) to ~{GPU_CONSUMPTION_FASTEST:.0} (bf16, batch 128) \
             95x95 patches/s on one H200; this loader makes {:.1}x / {:.1}x that\n",
            rate / GPU_CONSUMPTION_REFERENCE,
            rate / GPU_CONSUMPTION_FASTEST
        );
        if let Some(p) = self.peak_rss {
            out += &format!("  peak memory (RSS high-water mark): {:.1} MiB\n", mb(p));
        }
        if !s.failures.is_empty() {
            out += &format!("  {} file(s) set aside:\n", s.failures.len());
            for f in &s.failures {
                out += &format!("    {}\n", f.reason);
            }
        }
        out
    }
}

/// Runs the training data path for `epochs` with a consumer that takes batches as fast as
/// they come: the loader's own ceiling.
pub async fn loader_bench(
    cfg: &PipelineConfig,
    records: Arc<Vec<ImageRecord>>,
    epochs: u64,
    mut on_batch: impl FnMut(u64, usize),
) -> Result<LoaderBenchReport, LoaderError> {
    let spec = LoaderSpec {
        records,
        plan: SamplePlan::Shuffled { epochs },
        augment: true,
        zmuv: None,
        first_epoch: 0,
        views: None,
    };
    let mut loader = Loader::spawn(cfg, spec)?;
    let mut epoch_times = Vec::new();
    let mut rss_after_epoch = Vec::new();
    let mut current_epoch = None;
    let mut epoch_start = Instant::now();
    let mut checksum = 0f64;
    while let Some(batch) = loader.next_batch().await {
        if current_epoch != Some(batch.epoch) {
            if current_epoch.is_some() {
                epoch_times.push(epoch_start.elapsed());
                rss_after_epoch.extend(telemetry::current_rss_bytes());
                epoch_start = Instant::now();
            }
            current_epoch = Some(batch.epoch);
        }
        // Touch the data so the work cannot be optimised away.
        checksum += batch.input(0).first().copied().unwrap_or(0.0) as f64;
        on_batch(batch.epoch, batch.len);
    }
    epoch_times.push(epoch_start.elapsed());
    rss_after_epoch.extend(telemetry::current_rss_bytes());
    std::hint::black_box(checksum);
    let summary = loader.finish().await?;
    Ok(LoaderBenchReport {
        summary,
        epochs,
        epoch_times,
        rss_after_epoch,
        peak_rss: telemetry::peak_rss_bytes(),
    })
}
