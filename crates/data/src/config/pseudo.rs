//! `[pseudo]`: pseudo-labelling settings (the job itself is in the main crate, train::pseudo).
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[pseudo]` section of a pipeline TOML. Off unless `predictions` is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PseudoConfig {
    /// Predictions or blend Parquet whose probabilities become the soft targets of its images
    /// (normally the test set's, from the current best blend). Unset = no pseudo-labels. The
    /// images are read from the rows' `source_path`, so a relative one must hold from the
    /// training's working folder (an unreadable image is set aside and counted, as in training).
    pub predictions: Option<PathBuf>,
    /// Fraction of every batch taken from the pseudo-labelled images (the write-up's typical
    /// 0.33; the reference's final models used 0.67 with dropout off, see `train.dropout`).
    pub fraction: f64,
    /// Cut the pseudo-labelled images into this many chunks of a fixed permutation...
    pub shards: usize,
    /// ...and train on every chunk except this one (ignored when `shards` is 1).
    pub shard: usize,
    /// Seed of that permutation: the same for every model of a sharded round, so the chunks
    /// partition the images.
    pub shard_seed: u64,
}

impl Default for PseudoConfig {
    fn default() -> Self {
        PseudoConfig {
            predictions: None,
            fraction: 0.33,
            shards: 1,
            shard: 0,
            shard_seed: 0,
        }
    }
}

impl PseudoConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.fraction > 0.0 && self.fraction < 1.0) {
            return Err(format!(
                "pseudo.fraction must be in (0, 1), got {}",
                self.fraction
            ));
        }
        if self.shards == 0 || self.shard >= self.shards {
            return Err(format!(
                "pseudo.shard must be in 0..pseudo.shards ({}), got {}",
                self.shards, self.shard
            ));
        }
        Ok(())
    }

    /// How a batch of `batch_size` splits into (labelled, pseudo-labelled) images: both parts
    /// get at least one image, so a tiny batch still mixes.
    pub fn batch_split(&self, batch_size: usize) -> Result<(usize, usize), String> {
        if batch_size < 2 {
            return Err(format!("pseudo-labelling needs batch.size >= 2 (one labelled + one pseudo-labelled image), got {batch_size}"));
        }
        let pseudo =
            ((batch_size as f64 * self.fraction).round() as usize).clamp(1, batch_size - 1);
        Ok((batch_size - pseudo, pseudo))
    }
}
