//! Pseudo-labelling (SPEC.md "Semi-supervised"): unlabelled images carrying SOFT targets, the
//! class probabilities of a predictions or blend Parquet, mixed into every training batch at a
//! fixed fraction.
//!
//! Soft targets (not the argmax) are what the reference used: a 60/40 image teaches the network
//! that it is ambiguous, so the ensemble's knowledge is distilled instead of its mistakes being
//! hardened. The test images can be sharded across several models (the reference: 3 models,
//! each on 2/3 of a fixed permutation), so that models trained on different pseudo-labelled
//! subsets still disagree enough to be worth averaging.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use crate::rng::{Purpose, Stream};
use crate::sinks::parquet::Predictions;
use crate::sources::{Dataset, ImageRecord};

use super::TrainError;

pub use plankton_data::config::pseudo::PseudoConfig;

/// The pseudo-labelled images of one model and their soft targets.
#[derive(Debug, Clone)]
pub struct PseudoSet {
    pub records: Arc<Vec<ImageRecord>>,
    /// Row-major `records.len() x classes`, each row summing to 1, in the dataset's class order.
    pub targets: Vec<f32>,
    pub classes: usize,
    /// Rows of the file left out and why (failed predictions, labelled images, other shards).
    pub failed_rows: usize,
    pub labelled_rows: usize,
    pub other_shards: usize,
}

fn canonical(path: &str) -> String {
    std::fs::canonicalize(path)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| path.to_string())
}

/// Reads the soft targets for a training run on `ds`.
///
/// Rows are keyed by their source path: any image can be pseudo-labelled (the dataset's test
/// set, or images a daemon classified), except the dataset's own labelled images, which are
/// refused so validation images can never leak a blend's opinion into training.
pub fn load(cfg: &PseudoConfig, ds: &Dataset) -> Result<Option<PseudoSet>, TrainError> {
    let Some(path) = &cfg.predictions else {
        return Ok(None);
    };
    cfg.validate().map_err(TrainError::Config)?;
    let bad = |reason: String| {
        TrainError::Config(format!(
            "{}: pseudo-label predictions: {reason}",
            path.display()
        ))
    };
    let preds = Predictions::read(path)
        .map_err(|e| TrainError::Config(format!("pseudo-label predictions: {e}")))?;
    let remap = class_mapping(&preds.class_names, &ds.class_names).map_err(bad)?;
    let labelled: HashSet<String> = ds
        .train
        .iter()
        .map(|r| canonical(&r.path.display().to_string()))
        .collect();

    let mut rows: Vec<(String, String, Vec<f32>)> = Vec::new();
    let (mut failed_rows, mut labelled_rows) = (0, 0);
    for row in &preds.rows {
        let Some(p) = row
            .probabilities
            .as_ref()
            .filter(|p| p.iter().all(|v| v.is_finite() && *v >= 0.0))
        else {
            failed_rows += 1;
            continue;
        };
        if labelled.contains(&canonical(&row.source_path)) {
            labelled_rows += 1;
            continue;
        }
        let sum: f32 = p.iter().sum();
        if sum <= 0.0 {
            failed_rows += 1;
            continue;
        }
        let mut t = vec![0f32; ds.class_names.len()];
        for (i, &j) in remap.iter().enumerate() {
            t[j] = p[i] / sum;
        }
        rows.push((row.source_path.clone(), row.image_id.clone(), t));
    }
    // File order must not matter: sort, then permute with the round's shared seed.
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows.dedup_by(|a, b| a.0 == b.0);
    let mut order: Vec<usize> = (0..rows.len()).collect();
    Stream::new(cfg.shard_seed, Purpose::Split, u64::MAX, 0).shuffle(&mut order);
    let mut records = Vec::new();
    let mut targets = Vec::new();
    let mut other_shards = 0;
    for (pos, &i) in order.iter().enumerate() {
        if cfg.shards > 1 && pos * cfg.shards / rows.len() == cfg.shard {
            other_shards += 1;
            continue;
        }
        let (source, id, t) = &rows[i];
        records.push(ImageRecord {
            id: id.clone(),
            path: PathBuf::from(source),
            label: None,
        });
        targets.extend_from_slice(t);
    }
    if records.is_empty() {
        return Err(bad(format!(
            "no usable rows ({} in the file: {failed_rows} without probabilities, {labelled_rows} are labelled training images, {other_shards} in the left-out shard)",
            preds.rows.len()
        )));
    }
    Ok(Some(PseudoSet {
        records: Arc::new(records),
        targets,
        classes: ds.class_names.len(),
        failed_rows,
        labelled_rows,
        other_shards,
    }))
}

/// For each class of the file, its index among the dataset's classes. The same set of names in
/// another order is remapped; a different set is an error naming the differences.
fn class_mapping(file: &[String], dataset: &[String]) -> Result<Vec<usize>, String> {
    let index: HashMap<&str, usize> = dataset
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i))
        .collect();
    let missing: Vec<&str> = file
        .iter()
        .filter(|c| !index.contains_key(c.as_str()))
        .map(String::as_str)
        .collect();
    let file_set: HashSet<&str> = file.iter().map(String::as_str).collect();
    let absent: Vec<&str> = dataset
        .iter()
        .filter(|c| !file_set.contains(c.as_str()))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() || !absent.is_empty() || file.len() != dataset.len() {
        return Err(format!(
            "its {} classes differ from the dataset's {} (not in the dataset: {:?}; not in the file: {:?})",
            file.len(),
            dataset.len(),
            missing.iter().take(5).collect::<Vec<_>>(),
            absent.iter().take(5).collect::<Vec<_>>()
        ));
    }
    Ok(file.iter().map(|c| index[c.as_str()]).collect())
}

impl PseudoSet {
    /// Soft target of record `i`.
    pub fn target(&self, i: usize) -> &[f32] {
        &self.targets[i * self.classes..(i + 1) * self.classes]
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_split_rounds_and_keeps_both_parts() {
        let cfg = PseudoConfig::default();
        assert_eq!(cfg.batch_split(32).unwrap(), (21, 11));
        assert_eq!(cfg.batch_split(2).unwrap(), (1, 1));
        let heavy = PseudoConfig {
            fraction: 0.67,
            ..Default::default()
        };
        assert_eq!(heavy.batch_split(32).unwrap(), (11, 21));
        assert!(cfg.batch_split(1).is_err());
    }

    #[test]
    fn bad_fraction_and_shard_are_named() {
        let cfg = PseudoConfig {
            fraction: 1.0,
            ..Default::default()
        };
        assert!(cfg.validate().unwrap_err().contains("pseudo.fraction"));
        let cfg = PseudoConfig {
            shards: 3,
            shard: 3,
            ..Default::default()
        };
        assert!(cfg.validate().unwrap_err().contains("pseudo.shard"));
    }

    #[test]
    fn classes_are_remapped_by_name() {
        let ds = vec!["a".to_string(), "b".into(), "c".into()];
        let file = vec!["c".to_string(), "a".into(), "b".into()];
        assert_eq!(class_mapping(&file, &ds).unwrap(), vec![2, 0, 1]);
        let other = vec!["a".to_string(), "b".into(), "d".into()];
        let e = class_mapping(&other, &ds).unwrap_err();
        assert!(e.contains("\"d\"") && e.contains("\"c\""), "{e}");
    }
}
