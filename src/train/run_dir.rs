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
//!         checkpoints/step-00001234/{model,optimizer}.safetensors, state.json, history.csv
//!         checkpoints/LATEST             name of the newest complete checkpoint
//! ```
//! A checkpoint directory is written under a temporary name and renamed into place, and
//! `LATEST` is replaced by rename, so a kill at any moment leaves the previous checkpoint
//! usable.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::TrainError;

pub struct RunDir {
    pub root: PathBuf,
}

/// Where a run stood at a checkpoint; with the weights and optimiser state this is all that is
/// needed to continue exactly (every random stream is keyed by seed and step or epoch).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

const HISTORY_HEADER: &str = "step,epoch,learning_rate,train_loss,valid_loss,valid_top1,valid_top5,images_per_second,batch_wait_fraction,elapsed_seconds";

pub fn write_history(path: &Path, rows: &[HistoryRow]) -> Result<(), TrainError> {
    let mut text = String::from(HISTORY_HEADER);
    text.push('\n');
    for r in rows {
        text += &format!(
            "{},{},{},{},{},{},{},{:.2},{:.4},{:.2}\n",
            r.step,
            r.epoch,
            r.learning_rate,
            r.train_loss,
            r.valid_loss,
            r.valid_top1,
            r.valid_top5,
            r.images_per_second,
            r.batch_wait_fraction,
            r.elapsed_seconds
        );
    }
    write_atomic(path, text.as_bytes())
}

pub fn read_history(path: &Path) -> Result<Vec<HistoryRow>, TrainError> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    let bad = |reason: String| TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let mut lines = text.lines();
    if lines.next() != Some(HISTORY_HEADER) {
        return Err(bad("unexpected header".into()));
    }
    lines
        .enumerate()
        .map(|(i, line)| {
            let f: Vec<f64> = line
                .split(',')
                .map(|v| v.parse::<f64>())
                .collect::<Result<_, _>>()
                .map_err(|e| bad(format!("line {}: {e}", i + 2)))?;
            if f.len() != 10 {
                return Err(bad(format!("line {}: expected 10 columns", i + 2)));
            }
            Ok(HistoryRow {
                step: f[0] as u64,
                epoch: f[1] as u64,
                learning_rate: f[2],
                train_loss: f[3],
                valid_loss: f[4],
                valid_top1: f[5],
                valid_top5: f[6],
                images_per_second: f[7],
                batch_wait_fraction: f[8],
                elapsed_seconds: f[9],
            })
        })
        .collect()
}

/// Writes `bytes` to `path` via a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| TrainError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))
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
    pub fn learning_curve(&self) -> PathBuf {
        self.root.join("learning_curve.png")
    }
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    /// The newest complete checkpoint, if any.
    pub fn latest_checkpoint(&self) -> Result<Option<PathBuf>, TrainError> {
        let latest = self.checkpoints().join("LATEST");
        match std::fs::read_to_string(&latest) {
            Ok(name) => {
                let dir = self.checkpoints().join(name.trim());
                if !dir.join("state.json").is_file() {
                    return Err(TrainError::Checkpoint {
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
            Err(e) => Err(TrainError::io(&latest, e)),
        }
    }

    /// Writes a checkpoint with `write(dir)` filling a fresh directory, then publishes it and
    /// removes all but the newest `keep`.
    pub fn save_checkpoint(
        &self,
        state: &TrainState,
        keep: usize,
        write: impl FnOnce(&Path) -> Result<(), TrainError>,
    ) -> Result<PathBuf, TrainError> {
        let dir = self.checkpoints();
        std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
        let name = format!("step-{:010}", state.step);
        let tmp = dir.join(format!(".tmp-{name}"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        write(&tmp)?;
        let json = serde_json::to_vec_pretty(state).expect("serialisable");
        std::fs::write(tmp.join("state.json"), json).map_err(|e| TrainError::io(&tmp, e))?;
        let target = dir.join(&name);
        let _ = std::fs::remove_dir_all(&target);
        std::fs::rename(&tmp, &target).map_err(|e| TrainError::io(&target, e))?;
        write_atomic(&dir.join("LATEST"), name.as_bytes())?;
        let mut existing: Vec<String> = std::fs::read_dir(&dir)
            .map_err(|e| TrainError::io(&dir, e))?
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

    pub fn load_state(checkpoint: &Path) -> Result<TrainState, TrainError> {
        let path = checkpoint.join("state.json");
        let bytes = std::fs::read(&path).map_err(|e| TrainError::io(&path, e))?;
        serde_json::from_slice(&bytes).map_err(|e| TrainError::Checkpoint {
            path,
            reason: e.to_string(),
        })
    }
}
