//! The self-contained run directory and its crash-safe checkpoints.
//!
//! ```text
//! RUN_DIR/pipeline.toml   the config used (resume reads this one)
//!         classes.txt     class order of the logits
//!         split.csv       train/valid split (path,class,subset)
//!         zmuv.json       normalisation stats
//!         history.csv     one row per validation
//!         best.safetensors + best.json   weights with the lowest validation log loss
//!         model.safetensors              final weights
//!         learning_curve.png
//!         calibration.json  temperature fitted on validation predictions (optional)
//!         unknown.json      unknown-image rule: feature space + thresholds (optional, `calibrate --unknown`)
//!         checkpoints/step-00001234/{model,optimizer}.safetensors, state.json, history.csv
//!         checkpoints/LATEST             name of the newest complete checkpoint
//! ```
//! A checkpoint directory is written under a temporary name and renamed into place, and
//! `LATEST` is replaced by rename, so a kill at any moment leaves the previous checkpoint
//! usable.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use plankton_core::fsx;

/// A run folder that cannot be read or written. The training crate folds it into its own error.
#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{path}: bad checkpoint: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
}

impl RunDirError {
    pub fn io(path: &Path, e: impl std::fmt::Display) -> Self {
        RunDirError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }
}

pub struct RunDir {
    pub root: PathBuf,
}

/// Where a run stood at a checkpoint; with the weights and optimiser state this is all that is
/// needed to continue exactly (every random stream is keyed by seed and step or epoch).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainState {
    /// Steps completed.
    pub step: u64,
    /// Epoch of the last batch consumed, and how many of its batches were consumed.
    pub epoch: u64,
    pub batches_in_epoch: u64,
    pub optimizer_updates: u64,
    pub best_valid_loss: Option<f64>,
    pub best_step: Option<u64>,
    /// Training time so far (excluding time before a crash that was not checkpointed).
    pub elapsed_seconds: f64,
    pub images_seen: u64,
}

/// One row of `history.csv`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryRow {
    pub step: u64,
    pub epoch: u64,
    pub learning_rate: f64,
    /// Mean training loss (data term) since the previous row.
    pub train_loss: f64,
    pub valid_loss: f64,
    pub valid_top1: f64,
    pub valid_top5: f64,
    pub images_per_second: f64,
    /// Fraction of wall time the model waited for batches since the previous row.
    pub batch_wait_fraction: f64,
    pub elapsed_seconds: f64,
}

impl HistoryRow {
    /// One line for people: losses, accuracy, throughput and how long the model waited for data.
    pub fn summary(&self) -> String {
        format!(
            "step {}: train loss {:.4}, valid log loss {:.4}, top-1 {:.3}, top-5 {:.3}, {:.0} img/s, waited for data {:.1}% of the time",
            self.step, self.train_loss, self.valid_loss, self.valid_top1, self.valid_top5, self.images_per_second,
            100.0 * self.batch_wait_fraction
        )
    }
}

/// Writes `history.csv` (columns named as [`HistoryRow`]'s fields) durably.
pub fn write_history(path: &Path, rows: &[HistoryRow]) -> Result<(), RunDirError> {
    let mut w = csv::Writer::from_writer(Vec::new());
    for r in rows {
        w.serialize(r).map_err(|e| RunDirError::io(path, e))?;
    }
    let bytes = w.into_inner().map_err(|e| RunDirError::io(path, e))?;
    write_atomic(path, &bytes)
}

/// Reads `history.csv` by column name, so added or reordered columns do not shift values.
pub fn read_history(path: &Path) -> Result<Vec<HistoryRow>, RunDirError> {
    let bad = |reason: String| RunDirError::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let mut r = csv::Reader::from_path(path).map_err(|e| match e.kind() {
        csv::ErrorKind::Io(io) => RunDirError::io(path, io),
        _ => bad(e.to_string()),
    })?;
    r.deserialize()
        .enumerate()
        .map(|(i, row)| row.map_err(|e| bad(format!("row {}: {e}", i + 1))))
        .collect()
}

/// Writes `bytes` to `path` durably ([`fsx::write_atomic`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RunDirError> {
    fsx::write_atomic(path, bytes).map_err(|e| RunDirError::io(&e.path, e.source))
}

impl RunDir {
    pub fn new(root: &Path) -> Self {
        RunDir {
            root: root.to_path_buf(),
        }
    }
    pub fn pipeline(&self) -> PathBuf {
        self.root.join("pipeline.toml")
    }
    pub fn classes(&self) -> PathBuf {
        self.root.join("classes.txt")
    }
    pub fn split(&self) -> PathBuf {
        self.root.join("split.csv")
    }
    pub fn zmuv(&self) -> PathBuf {
        self.root.join("zmuv.json")
    }
    pub fn history(&self) -> PathBuf {
        self.root.join("history.csv")
    }
    pub fn best_weights(&self) -> PathBuf {
        self.root.join("best.safetensors")
    }
    pub fn best_info(&self) -> PathBuf {
        self.root.join("best.json")
    }
    pub fn final_weights(&self) -> PathBuf {
        self.root.join("model.safetensors")
    }
    /// Temperature fitted on validation predictions (`plankton calibrate`), applied by predict.
    pub fn calibration(&self) -> PathBuf {
        self.root.join("calibration.json")
    }
    /// `plankton calibrate --unknown`'s feature space and thresholds.
    pub fn unknown(&self) -> PathBuf {
        self.root.join("unknown.json")
    }
    pub fn learning_curve(&self) -> PathBuf {
        self.root.join("learning_curve.png")
    }
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    /// The newest complete checkpoint, if any.
    pub fn latest_checkpoint(&self) -> Result<Option<PathBuf>, RunDirError> {
        let latest = self.checkpoints().join("LATEST");
        match std::fs::read_to_string(&latest) {
            Ok(name) => {
                let dir = self.checkpoints().join(name.trim());
                if !dir.join("state.json").is_file() {
                    return Err(RunDirError::Checkpoint {
                        path: latest,
                        reason: format!(
                            "names {} which is not a complete checkpoint",
                            dir.display()
                        ),
                    });
                }
                Ok(Some(dir))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(RunDirError::io(&latest, e)),
        }
    }

    /// Writes a checkpoint with `write(dir)` filling a fresh directory, then publishes it and
    /// removes all but the newest `keep`.
    pub fn save_checkpoint<E: From<RunDirError>>(
        &self,
        state: &TrainState,
        keep: usize,
        write: impl FnOnce(&Path) -> Result<(), E>,
    ) -> Result<PathBuf, E> {
        let io = |path: &Path, e: std::io::Error| E::from(RunDirError::io(path, e));
        let dir = self.checkpoints();
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        let name = format!("step-{:010}", state.step);
        let tmp = dir.join(format!(".tmp-{name}"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        write(&tmp)?;
        let json = serde_json::to_vec_pretty(state).expect("serialisable");
        std::fs::write(tmp.join("state.json"), json).map_err(|e| io(&tmp, e))?;
        // Durable before it is published: every file, then the folder, then the rename.
        sync_files_in(&tmp).map_err(|e| io(&tmp, e))?;
        let target = dir.join(&name);
        let _ = std::fs::remove_dir_all(&target);
        std::fs::rename(&tmp, &target).map_err(|e| io(&target, e))?;
        fsx::sync_dir(&dir).map_err(|e| io(&dir, e))?;
        write_atomic(&dir.join("LATEST"), name.as_bytes())?;
        let mut existing: Vec<String> = std::fs::read_dir(&dir)
            .map_err(|e| io(&dir, e))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("step-"))
            .collect();
        existing.sort();
        let excess = existing.len().saturating_sub(keep);
        for old in &existing[..excess] {
            let _ = std::fs::remove_dir_all(dir.join(old));
        }
        Ok(target)
    }

    pub fn load_state(checkpoint: &Path) -> Result<TrainState, RunDirError> {
        let path = checkpoint.join("state.json");
        let bytes = std::fs::read(&path).map_err(|e| RunDirError::io(&path, e))?;
        serde_json::from_slice(&bytes).map_err(|e| RunDirError::Checkpoint {
            path,
            reason: e.to_string(),
        })
    }
}

/// fsync of every file in `dir` and of `dir` itself.
fn sync_files_in(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::File::open(entry.path())?.sync_all()?;
        }
    }
    fsx::sync_dir(dir)
}
