//! Evaluation of stored predictions: scores, per-class metrics, calibration, and the images a
//! person should check first. `plankton evaluate` and `plankton calibrate` read a predictions
//! Parquet file and the true classes (from the file's `label` column or a dataset folder).

pub use plankton_core::{calibration, metrics};
pub mod unknown;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::sinks::parquet::{ParquetSinkError, Predictions};
use crate::sinks::report::{write_report, ReportError, ReportFiles};
use crate::sources::Dataset;
use calibration::{apply_temperature, fit_temperature, TemperatureFit};
use metrics::Evaluation;
use plankton_core::rows::RowIndex;

#[derive(Debug, thiserror::Error)]
pub enum EvaluateError {
    #[error(transparent)]
    Predictions(#[from] ParquetSinkError),
    #[error(transparent)]
    Dataset(#[from] crate::sources::DatasetError),
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error("{path}: {reason}")]
    NoLabels { path: PathBuf, reason: String },
    #[error("{path}: {count} of its rows carry another true class than --data gives them (e.g. `{example}`: `{own}` in the file, `{given}` in --data); is --data the dataset these predictions were made on?")]
    LabelsDisagree {
        path: PathBuf,
        count: usize,
        example: String,
        own: String,
        given: String,
    },
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{path}: only {n} labelled images; a temperature fitted on fewer than {min} follows their noise (it can make the test loss worse, not better): predict more validation images or pass a lower --min-images")]
    TooFewForCalibration { path: PathBuf, n: usize, min: usize },
}

/// Fewest labelled images `plankton calibrate` stores a temperature from, by default. On the 10
/// validation images of the demo run a fitted T of 0.27 doubled the test log loss.
pub const MIN_CALIBRATION_IMAGES: usize = 50;

/// The labelled, predicted rows of a predictions file, ready to score.
#[derive(Debug, Clone)]
pub struct Labelled {
    pub class_names: Vec<String>,
    /// Row-major n x C.
    pub probs: Vec<f32>,
    pub labels: Vec<usize>,
    pub ids: Vec<String>,
    pub paths: Vec<String>,
    /// Rows without a prediction (unreadable images).
    pub failed: usize,
    /// Predicted rows whose class is unknown.
    pub unlabelled: usize,
    /// Predicted rows whose true class is known but not one of the model's (held out), counted
    /// in `unlabelled` too.
    pub held_out: usize,
    /// Every predicted row with a true class, known to the model or not, with its unknown
    /// scores.
    pub scored: Vec<unknown::ScoredRow>,
    /// The run's unknown thresholds and deciding score, from the file's `plankton.model`.
    pub unknown_thresholds: std::collections::BTreeMap<plankton_core::unknown::Score, f64>,
    pub unknown_rule: Option<plankton_core::unknown::Score>,
    /// The temperature already applied to the stored probabilities, if any.
    pub temperature: Option<f64>,
    pub model_ids: Vec<String>,
}

/// True class names by source path, else by image id where the id is in one class only.
fn dataset_labels(dirs: &[PathBuf]) -> Result<RowIndex<String>, EvaluateError> {
    let mut labels = RowIndex::new();
    for d in dirs {
        let ds = Dataset::open(d)?;
        for r in ds.train.iter().chain(&ds.test) {
            let Some(l) = r.label else { continue };
            let class = ds.class_names[l as usize].clone();
            labels.insert(&r.path.display().to_string(), &r.id, class);
        }
    }
    Ok(labels)
}

/// Reads a predictions file and attaches true classes: from `data` (dataset folders in the
/// competition layout; matched by source path, else by image id) or the file's `label` column.
pub fn load_labelled(predictions: &Path, data: &[PathBuf]) -> Result<Labelled, EvaluateError> {
    let p = Predictions::read(predictions)?;
    let classes = p.class_names.len();
    let index: HashMap<&str, usize> = p
        .class_names
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i))
        .collect();
    let labels = if data.is_empty() {
        RowIndex::new()
    } else {
        dataset_labels(data)?
    };
    let mut out = Labelled {
        class_names: p.class_names.clone(),
        probs: Vec::new(),
        labels: Vec::new(),
        ids: Vec::new(),
        paths: Vec::new(),
        failed: 0,
        unlabelled: 0,
        temperature: p.model.get("temperature").and_then(|t| t.as_f64()),
        model_ids: p.model_ids.clone(),
        held_out: 0,
        scored: Vec::new(),
        unknown_thresholds: p
            .model
            .pointer("/unknown/thresholds")
            .and_then(|t| serde_json::from_value(t.clone()).ok())
            .unwrap_or_default(),
        unknown_rule: p
            .model
            .pointer("/unknown/score")
            .and_then(|t| serde_json::from_value(t.clone()).ok()),
    };
    let (mut disagree, mut example) = (0usize, None);
    for row in &p.rows {
        let Some(probs) = &row.probabilities else {
            out.failed += 1;
            continue;
        };
        let class = if data.is_empty() {
            row.label.clone()
        } else {
            labels.get(&row.source_path, &row.image_id).cloned()
        };
        // The file's own label (written by predict from its dataset) against --data's.
        if let (Some(own), Some(given)) = (&row.label, &class) {
            if own != given {
                disagree += 1;
                example.get_or_insert_with(|| (row.image_id.clone(), own.clone(), given.clone()));
            }
        }
        if let Some(c) = &class {
            use plankton_core::unknown::{as_stored, max_probability};
            out.scored.push(unknown::ScoredRow {
                held_out: !index.contains_key(c.as_str()),
                class: c.clone(),
                scores: [
                    Some(as_stored(max_probability(probs))),
                    row.unknown.energy.map(f64::from),
                    row.unknown.mahalanobis.map(f64::from),
                ],
                flagged: row.unknown.unknown,
            });
            out.held_out += usize::from(!index.contains_key(c.as_str()));
        }
        match class.as_deref().and_then(|c| index.get(c)) {
            Some(&l) => {
                out.probs.extend_from_slice(probs);
                out.labels.push(l);
                out.ids.push(row.image_id.clone());
                out.paths.push(row.source_path.clone());
            }
            None => out.unlabelled += 1,
        }
    }
    if let Some((example, own, given)) = example {
        return Err(EvaluateError::LabelsDisagree {
            path: predictions.to_path_buf(),
            count: disagree,
            example,
            own,
            given,
        });
    }
    if out.labels.is_empty() && out.held_out > 0 {
        return Err(EvaluateError::NoLabels {
            path: predictions.to_path_buf(),
            reason: format!(
                "all {} of its images with a true class are of classes the model was not trained on (held out): judging the unknown scores needs images of known classes beside them (`plankton predict --subset held-out` adds the run's validation images)",
                out.held_out
            ),
        });
    }
    if out.labels.is_empty() {
        return Err(EvaluateError::NoLabels {
            path: predictions.to_path_buf(),
            reason: format!(
                "none of its {} rows has a known true class ({}); pass --data with the dataset folder that holds the labels",
                p.rows.len(),
                if data.is_empty() { "its `label` column is empty" } else { "no match by path or image id in --data" }
            ),
        });
    }
    debug_assert_eq!(out.probs.len(), out.labels.len() * classes);
    Ok(out)
}

#[derive(Debug, Clone)]
pub struct EvaluateSummary {
    pub evaluation: Evaluation,
    pub files: Option<ReportFiles>,
    pub failed: usize,
    pub unlabelled: usize,
    /// Known against held-out classes, when the file holds images of classes the model lacks.
    pub unknown: Option<unknown::UnknownEvaluation>,
}

/// Scores a predictions file and (with `out`) writes the report folder.
pub fn run(
    predictions: &Path,
    data: &[PathBuf],
    out: Option<&Path>,
    least_confident: usize,
) -> Result<EvaluateSummary, EvaluateError> {
    let l = load_labelled(predictions, data)?;
    let evaluation = metrics::evaluate(&l.probs, &l.labels, &l.class_names, least_confident);
    let files = match out {
        Some(dir) => {
            let title = format!(
                "{} ({})",
                predictions
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                l.model_ids.join(", ")
            );
            Some(write_report(dir, &evaluation, &l.ids, &l.paths, &title)?)
        }
        None => None,
    };
    let unknown_eval = unknown::evaluate_unknown(&l.scored, &l.unknown_thresholds, l.unknown_rule);
    if let (Some(files), Some(u)) = (&files, &unknown_eval) {
        let dir = files.summary_md.parent().unwrap_or(Path::new("."));
        unknown::render_unknown_histograms(&unknown::unknown_png(dir), &l.scored, u)
            .map_err(ReportError::from)?;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |e: std::io::Error| EvaluateError::Io {
                path,
                message: e.to_string(),
            }
        };
        let json = dir.join("unknown.json");
        std::fs::write(&json, serde_json::to_vec_pretty(u).expect("serialisable"))
            .map_err(io(&json))?;
        let mut md = std::fs::read_to_string(&files.summary_md).map_err(io(&files.summary_md))?;
        md.push_str(&unknown::summary_markdown(u));
        std::fs::write(&files.summary_md, md).map_err(io(&files.summary_md))?;
    }
    Ok(EvaluateSummary {
        evaluation,
        files,
        failed: l.failed,
        unlabelled: l.unlabelled,
        unknown: unknown_eval,
    })
}

/// Fits a temperature on labelled (validation) predictions. Probabilities already scaled by a
/// temperature T0 are first brought back to T = 1, so the result is the total temperature.
pub fn fit_calibration(
    predictions: &Path,
    data: &[PathBuf],
) -> Result<(TemperatureFit, Labelled), EvaluateError> {
    let mut l = load_labelled(predictions, data)?;
    let classes = l.class_names.len();
    if let Some(t0) = l.temperature.filter(|t| *t != 1.0) {
        l.probs = apply_temperature(&l.probs, classes, 1.0 / t0);
    }
    let fit = fit_temperature(&l.probs, &l.labels, classes);
    Ok((fit, l))
}

/// `plankton calibrate`: fits the temperature and stores it in the run (`calibration.json`),
/// where `plankton predict` picks it up.
pub fn calibrate_run(
    run_dir: &Path,
    predictions: &Path,
    data: &[PathBuf],
    min_images: usize,
) -> Result<TemperatureFit, EvaluateError> {
    let (fit, l) = fit_calibration(predictions, data)?;
    if fit.n < min_images {
        return Err(EvaluateError::TooFewForCalibration {
            path: predictions.to_path_buf(),
            n: fit.n,
            min: min_images,
        });
    }
    let run = crate::run_dir::RunDir::new(run_dir);
    let classes_path = run.classes();
    let run_classes = std::fs::read_to_string(&classes_path).map_err(|e| EvaluateError::Io {
        path: classes_path.clone(),
        message: e.to_string(),
    })?;
    let run_classes: Vec<&str> = run_classes
        .lines()
        .filter(|s| !s.trim().is_empty())
        .collect();
    if run_classes != l.class_names.iter().map(String::as_str).collect::<Vec<_>>() {
        return Err(EvaluateError::NoLabels {
            path: predictions.to_path_buf(),
            reason: format!(
                "its classes differ from the run's {}: predictions of another model?",
                classes_path.display()
            ),
        });
    }
    let path = run.calibration();
    let text = serde_json::to_string_pretty(&fit).expect("serialisable");
    plankton_core::fsx::write_atomic(&path, text.as_bytes()).map_err(|e| EvaluateError::Io {
        path: path.clone(),
        message: e.to_string(),
    })?;
    Ok(fit)
}
