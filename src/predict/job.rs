//! `plankton predict`: a trained run directory + images -> a predictions Parquet file (and a
//! Kaggle submission). The images stream through the same stages as training (decode -> warp
//! -> ZMUV -> batch, bounded channels); with TTA each image is decoded once and warped by every
//! quasi-random transform, the views are batched together, and an image's outputs are
//! aggregated as soon as its last view comes back, so memory stays bounded however many images
//! there are.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tch::{Device, Kind};

use super::aggregate::{Aggregation, Aggregator};
use super::tta::{quasi_random_transforms, TtaConfig};
use crate::config::PipelineConfig;
use crate::device::{download, BatchTensors, Download};
use crate::evaluate::calibration::{apply_temperature, TemperatureFit};
use crate::imgproc::Augmentation;
use crate::model::Network;
use crate::scoring::{self, Scores};
use crate::sinks::parquet::{ParquetSinkError, PredictionRow, PredictionWriter, UnknownColumns};
use crate::sinks::submission::{self, SubmissionRow, SubmissionSummary};
use crate::sources::{is_dataset, Dataset, ImageRecord};
use crate::split::Split;
use crate::stages::batch::Batch;
use crate::stages::normalise::ZmuvStats;
use crate::topology::{Loader, LoaderSpec, SamplePlan};
use crate::train::{patch_sizes, RunDir, TrainError};
use plankton_core::unknown::{ImageScores, UnknownCalibration, ViewMean};

#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{path}: not a usable run directory: {reason}")]
    RunDir { path: PathBuf, reason: String },
    /// A file of a run (calibration.json, unknown.json) that cannot be used.
    #[error("{path}: {reason}")]
    RunFile { path: PathBuf, reason: String },
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Dataset(#[from] crate::sources::DatasetError),
    #[error(transparent)]
    Split(#[from] crate::split::SplitError),
    #[error(transparent)]
    Normalise(#[from] crate::stages::normalise::NormaliseError),
    #[error("data path: {0}")]
    Loader(#[from] crate::topology::LoaderError),
    #[error(transparent)]
    Parquet(#[from] ParquetSinkError),
    #[error(transparent)]
    Submission(#[from] submission::SubmissionError),
    #[error("tta: {0}")]
    Tta(String),
}

/// Which images of a competition-layout dataset folder to predict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Subset {
    /// `test/` (what a submission needs); of a folder of IFCB bins, the ROIs without a label.
    #[default]
    Test,
    /// The run's own validation images (its split.csv): for calibration and evaluation.
    Valid,
    /// The run's training images.
    Train,
    /// Every labelled image (`train/<class>/`).
    Labelled,
    /// Labelled and test images.
    All,
    /// The run's validation images and every labelled image of a class the run was not trained
    /// on: known against held-out classes, for judging the unknown scores (`plankton evaluate
    /// --data` with the full dataset names the held-out classes).
    HeldOut,
}

/// Which weights of the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Weights {
    /// best.safetensors (lowest validation loss), else the final weights.
    Best,
    /// model.safetensors (the last step).
    Final,
    Path(PathBuf),
}

impl std::str::FromStr for Weights {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "best" => Weights::Best,
            "final" => Weights::Final,
            p => Weights::Path(PathBuf::from(p)),
        })
    }
}

#[derive(Debug, Clone)]
pub struct PredictOptions {
    /// The run directory `plankton train` wrote.
    pub model: PathBuf,
    pub weights: Weights,
    /// A dataset folder (competition layout), folders of images, or image files.
    pub data: Vec<PathBuf>,
    pub subset: Subset,
    pub out: PathBuf,
    pub submission: Option<PathBuf>,
    /// Column order of the submission (default: the dataset's sampleSubmission.csv, else the
    /// model's class order).
    pub sample_submission: Option<PathBuf>,
    /// Transforms per image (default: the run's `[tta]`); 1 = a single un-augmented pass.
    pub tta: Option<usize>,
    pub aggregation: Option<Aggregation>,
    pub device: Device,
    /// Overrides the run's `[compute] precision`.
    pub precision: Option<crate::device::Precision>,
    /// Patches per forward pass (default: the run's `[batch] size`).
    pub batch_size: Option<usize>,
    /// Apply the run's calibration.json when present.
    pub calibrate: bool,
    pub model_id: Option<String>,
    /// Classes listed per row in `top_classes`.
    pub top_k: usize,
}

impl PredictOptions {
    pub fn new(model: &Path, data: Vec<PathBuf>, out: &Path) -> Self {
        PredictOptions {
            model: model.to_path_buf(),
            weights: Weights::Best,
            data,
            subset: Subset::Test,
            out: out.to_path_buf(),
            submission: None,
            sample_submission: None,
            tta: None,
            aggregation: None,
            device: Device::Cpu,
            precision: None,
            batch_size: None,
            calibrate: true,
            model_id: None,
            top_k: 5,
        }
    }
}

/// Progress while predicting.
#[derive(Debug, Clone)]
pub enum PredictEvent {
    Started {
        images: usize,
        views: usize,
        model_id: String,
    },
    Progress {
        images_done: usize,
        images_total: usize,
        images_per_second: f64,
    },
}

#[derive(Debug, Clone)]
pub struct PredictSummary {
    pub out: PathBuf,
    pub model_id: String,
    pub images: usize,
    pub predicted: usize,
    /// (path, reason) of images set aside.
    pub failed: Vec<(PathBuf, String)>,
    pub views: usize,
    pub aggregation: Aggregation,
    pub temperature: Option<f64>,
    pub seconds: f64,
    /// Images per second, and patches (images x views) per second.
    pub images_per_second: f64,
    pub patches_per_second: f64,
    /// Scores on the images whose class the source knows.
    pub scores: Option<Scores>,
    pub submission: Option<(PathBuf, SubmissionSummary)>,
    /// Images the run's unknown rule called unknown, and the rule's score (None without
    /// `unknown.json`).
    pub unknown: Option<(usize, plankton_core::unknown::Score)>,
}

/// A loaded model: everything needed to turn patches into class probabilities.
pub struct LoadedModel {
    pub cfg: PipelineConfig,
    pub class_names: Vec<String>,
    pub zmuv: ZmuvStats,
    pub net: Network,
    pub weights_path: PathBuf,
    pub model_id: String,
    pub calibration: Option<TemperatureFit>,
    /// The run's unknown-image rule (`unknown.json`), if calibrated.
    pub unknown: Option<UnknownCalibration>,
}

/// FNV-1a over the weights file: a content id that changes whenever the weights do.
fn content_hash(path: &Path) -> Result<u64, PredictError> {
    let bytes = std::fs::read(path).map_err(|e| PredictError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(crate::rng::fnv1a64(&bytes))
}

pub fn read_class_names(path: &Path) -> Result<Vec<String>, PredictError> {
    let text = std::fs::read_to_string(path).map_err(|e| PredictError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if names.is_empty() {
        return Err(PredictError::RunDir {
            path: path.to_path_buf(),
            reason: "no class names".into(),
        });
    }
    Ok(names)
}

/// A JSON file of a run, if it exists; a file that does not parse is an error naming it.
fn read_run_json<T: serde::de::DeserializeOwned>(
    path: &Path,
    what: &str,
) -> Result<Option<T>, PredictError> {
    if !path.exists() {
        if path.symlink_metadata().is_ok() {
            return Err(PredictError::RunFile {
                path: path.to_path_buf(),
                reason: format!("a link to nothing: the run's {what} is missing"),
            });
        }
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| PredictError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| PredictError::RunFile {
            path: path.to_path_buf(),
            reason: format!("bad {what}: {e}"),
        })
}

/// Reads a run's calibration.json, if any.
pub fn read_calibration(run: &RunDir) -> Result<Option<TemperatureFit>, PredictError> {
    let path = run.calibration();
    let Some(fit) = read_run_json::<TemperatureFit>(&path, "calibration file")? else {
        return Ok(None);
    };
    if !(fit.temperature > 0.0 && fit.temperature.is_finite()) {
        return Err(PredictError::RunFile {
            path,
            reason: format!("temperature {} must be > 0", fit.temperature),
        });
    }
    Ok(Some(fit))
}

/// Reads a run's unknown.json, if any, checked against the run's classes and network.
pub fn read_unknown(
    run: &RunDir,
    classes: usize,
    feature_dim: usize,
) -> Result<Option<UnknownCalibration>, PredictError> {
    let path = run.unknown();
    let Some(cal) = read_run_json::<UnknownCalibration>(&path, "unknown-image rule")? else {
        return Ok(None);
    };
    let bad = |reason: String| PredictError::RunFile {
        path: path.clone(),
        reason,
    };
    cal.validate(classes).map_err(|e| bad(e.to_string()))?;
    if let Some(space) = &cal.feature_space {
        if space.dim != feature_dim {
            return Err(bad(format!(
                "its feature space has dimension {}, the network's features {feature_dim}: fitted for other weights? run `plankton calibrate --unknown` again",
                space.dim
            )));
        }
    }
    Ok(Some(cal))
}

impl LoadedModel {
    /// Warns when the unknown rule was fitted with another number of TTA views: averaging fewer
    /// views spreads the features and logits more, so far more known images cross thresholds
    /// fitted on more views (a reviewer saw 5 of 7 confident training images flagged at 1 view
    /// against a rule fitted at 2).
    pub fn check_unknown_views(&self, views: usize) {
        if let Some(u) = &self.unknown {
            if u.views != views {
                tracing::warn!(
                    fitted = u.views,
                    now = views,
                    "the unknown rule was fitted with another number of TTA views: its false-unknown rate will differ; fit it with `plankton calibrate --unknown --tta {views}`"
                );
            }
        }
    }

    /// Whether a forward pass must return the penultimate features too.
    pub fn wants_features(&self) -> bool {
        self.unknown
            .as_ref()
            .is_some_and(|u| u.feature_space.is_some())
    }

    /// The unknown columns of one image from its TTA aggregate.
    pub fn unknown_columns(&self, out: &ImageOutputs) -> UnknownColumns {
        let space = self.unknown.as_ref().and_then(|u| u.feature_space.as_ref());
        let features = space.zip(out.mean_features.as_deref());
        let scores = ImageScores::of(&out.probabilities, &out.mean_logits, features);
        UnknownColumns {
            energy: Some(scores.energy as f32),
            mahalanobis: scores.mahalanobis.map(|d| d as f32),
            unknown: self.unknown.as_ref().and_then(|u| u.is_unknown(&scores)),
        }
    }

    pub fn load(
        model: &Path,
        weights: &Weights,
        device: Device,
        calibrate: bool,
    ) -> Result<LoadedModel, PredictError> {
        let run = RunDir::new(model);
        let bad = |reason: String| PredictError::RunDir {
            path: model.to_path_buf(),
            reason,
        };
        if !model.is_dir() {
            return Err(bad("no such folder".into()));
        }
        for needed in [run.pipeline(), run.classes(), run.zmuv()] {
            if !needed.is_file() {
                return Err(bad(format!(
                    "{} is missing (is this a folder written by `plankton train`?)",
                    needed.display()
                )));
            }
        }
        crate::device::ensure(device).map_err(TrainError::from)?;
        let cfg = PipelineConfig::load(&run.pipeline()).map_err(|e| bad(e.to_string()))?;
        let class_names = read_class_names(&run.classes())?;
        let zmuv = ZmuvStats::load(&run.zmuv())?;
        if zmuv.inputs.len() != cfg.patches.len() {
            return Err(bad(format!(
                "zmuv.json has {} inputs, the pipeline {}",
                zmuv.inputs.len(),
                cfg.patches.len()
            )));
        }
        let (weights_path, kind) = match weights {
            Weights::Best if run.best_weights().is_file() => (run.best_weights(), "best"),
            Weights::Best | Weights::Final => (run.final_weights(), "final"),
            Weights::Path(p) => (p.clone(), "file"),
        };
        if !weights_path.is_file() {
            return Err(bad(format!(
                "{} is missing (did training finish?)",
                weights_path.display()
            )));
        }
        let sizes = patch_sizes(&cfg)?;
        let mut net =
            Network::load_from(&cfg.model, &sizes, class_names.len(), device, &weights_path)?;
        net.set_compute(&cfg.compute);
        crate::device::apply_globals(&cfg.compute, device);
        let hash = content_hash(&weights_path)?;
        let run_name = model
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "run".into());
        let model_id = format!("{run_name}/{kind}@{:08x}", hash >> 32);
        let (calibration, unknown) = if calibrate {
            (
                read_calibration(&run)?,
                read_unknown(&run, class_names.len(), net.feature_dim())?,
            )
        } else {
            (None, None)
        };
        if let Some(u) = &unknown {
            let t = calibration.map(|c| c.temperature);
            if u.score == plankton_core::unknown::Score::MaxProbability && u.temperature != t {
                tracing::warn!(
                    fitted = ?u.temperature, now = ?t,
                    "the unknown rule's max-probability threshold was fitted at another temperature: run `plankton calibrate --unknown` again"
                );
            }
            // The content hash: the run's folder name may differ where it was fitted.
            let hash = |id: &str| id.rsplit('@').next().map(str::to_string);
            if let Some(fitted) = &u.model_id {
                if hash(fitted) != hash(&model_id) {
                    tracing::warn!(
                        fitted = %fitted, now = %model_id,
                        "the unknown rule was fitted with other weights (their features differ): run `plankton calibrate --unknown` again for these"
                    );
                }
            }
        }
        Ok(LoadedModel {
            cfg,
            class_names,
            zmuv,
            net,
            weights_path,
            model_id,
            calibration,
            unknown,
        })
    }

    /// Overrides the run's `[compute] precision` (a model trained in fp32 can predict in bf16).
    pub fn set_precision(&mut self, precision: crate::device::Precision) {
        self.cfg.compute.precision = precision;
        self.net.set_compute(&self.cfg.compute);
    }
}

/// Files under `dir`, recursively, sorted, hidden entries skipped.
fn list_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), PredictError> {
    let io = |e: std::io::Error| PredictError::Io {
        path: dir.to_path_buf(),
        message: e.to_string(),
    };
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(io)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(io)?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = e.path();
        if path.is_dir() {
            list_files(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

/// The images a job predicts.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// Labels in the model's class order where the source knows a class the model has.
    pub records: Vec<ImageRecord>,
    /// By record: the true class as the dataset names it, also one the model lacks (held out).
    pub true_classes: Vec<Option<String>>,
    /// The dataset's sampleSubmission.csv, if any.
    pub sample_submission: Option<PathBuf>,
}

/// The images to predict.
pub fn resolve_inputs(
    data: &[PathBuf],
    subset: Subset,
    run: &RunDir,
    class_names: &[String],
) -> Result<Inputs, PredictError> {
    if data.is_empty() {
        return Err(PredictError::Input("no --data given".into()));
    }
    let model_index: HashMap<&str, u32> = class_names
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i as u32))
        .collect();
    let mut records = Vec::new();
    let mut true_classes = Vec::new();
    let mut sample_submission = None;
    for d in data {
        // Records of plain folders and files have no true class: keep the two lists aligned
        // whatever order the sources come in.
        true_classes.resize(records.len(), None);
        let plain = !(d.is_dir() && is_dataset(d));
        if plain && !matches!(subset, Subset::Test | Subset::All) {
            return Err(PredictError::Input(format!(
                "{}: not a dataset folder (train/<class>/, test/, or IFCB bins with labels), so it has no {subset:?} images; give the dataset's root folder",
                d.display()
            )));
        }
        if d.is_dir() && is_dataset(d) {
            let ds = Dataset::open(d)?;
            for p in &ds.problems {
                tracing::warn!(path = %p.path.display(), reason = %p.reason, "layout problem: skipped");
            }
            let remap = |r: &ImageRecord| {
                let mut r = r.clone();
                r.label = r.label.and_then(|l| {
                    model_index
                        .get(ds.class_names[l as usize].as_str())
                        .copied()
                });
                r
            };
            let picked: Vec<&ImageRecord> = match subset {
                Subset::Test => ds.test.iter().collect(),
                Subset::Labelled => ds.train.iter().collect(),
                Subset::All => ds.train.iter().chain(&ds.test).collect(),
                Subset::Valid | Subset::Train => {
                    let split = Split::load(&ds, &run.split())?;
                    let idx = if subset == Subset::Valid {
                        &split.valid
                    } else {
                        &split.train
                    };
                    idx.iter().map(|&i| &ds.train[i]).collect()
                }
                Subset::HeldOut => {
                    let split = Split::load(&ds, &run.split())?;
                    let unseen: Vec<&ImageRecord> = ds
                        .train
                        .iter()
                        .filter(|r| {
                            r.label.is_some_and(|l| {
                                !model_index.contains_key(ds.class_names[l as usize].as_str())
                            })
                        })
                        .collect();
                    if unseen.is_empty() {
                        return Err(PredictError::Input(format!(
                            "{}: every labelled class is one the run knows: give the dataset that still holds the held-out classes' folders",
                            d.display()
                        )));
                    }
                    split
                        .valid
                        .iter()
                        .map(|&i| &ds.train[i])
                        .chain(unseen)
                        .collect()
                }
            };
            if picked.is_empty() {
                return Err(PredictError::Input(format!(
                    "{}: no images in the {subset:?} subset",
                    d.display()
                )));
            }
            for r in picked {
                true_classes.push(r.label.map(|l| ds.class_names[l as usize].clone()));
                records.push(remap(r));
            }
            let sub = d.join("sampleSubmission.csv");
            if sub.is_file() {
                sample_submission = Some(sub);
            }
        } else if d.is_dir() {
            let mut files = Vec::new();
            list_files(d, &mut files)?;
            if files.is_empty() {
                return Err(PredictError::Input(format!("{}: no files", d.display())));
            }
            for f in files {
                let id = f
                    .strip_prefix(d)
                    .unwrap_or(&f)
                    .to_string_lossy()
                    .into_owned();
                records.push(ImageRecord {
                    id,
                    path: f,
                    label: None,
                });
            }
        } else if d.is_file() {
            let id = d
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let stem = d.file_stem().map(|n| n.to_string_lossy().into_owned());
            if d.extension()
                .is_some_and(|x| x == "hdr" || x == "adc" || x == "roi")
                && stem.is_some_and(|s| crate::sources::ifcb::generation(&s).is_some())
            {
                return Err(PredictError::Input(format!(
                    "{}: a file of an IFCB bin: pass the folder that holds the bin (its ROIs are the images)",
                    d.display()
                )));
            }
            records.push(ImageRecord {
                id,
                path: d.clone(),
                label: None,
            });
        } else if let Some(id) = d.file_name().and_then(|n| n.to_str()).filter(|n| {
            crate::sources::ifcb::parse_roi_pid(n)
                .is_some_and(|(bin, _)| d.with_file_name(format!("{bin}.hdr")).is_file())
        }) {
            // One ROI by its pid path (`<bin folder>/<roi pid>`).
            records.push(ImageRecord {
                id: id.to_string(),
                path: d.clone(),
                label: None,
            });
        } else {
            return Err(PredictError::Input(format!(
                "{}: no such file or folder",
                d.display()
            )));
        }
    }
    true_classes.resize(records.len(), None);
    Ok(Inputs {
        records,
        true_classes,
        sample_submission,
    })
}

/// Training-set class frequencies of the run (the fallback answer for an unreadable image, and
/// what the daemon's drift gauges compare the class mix with), uniform when the split is not
/// available.
pub fn class_prior(run: &RunDir, class_names: &[String]) -> Vec<f64> {
    let mut counts = vec![1.0f64; class_names.len()]; // add-one: no class gets probability 0
    if let Ok(rows) = crate::split::read_rows(&run.split()) {
        for (_, row) in rows.iter().filter(|(_, r)| r.subset == "train") {
            if let Some(i) = class_names.iter().position(|c| *c == row.class) {
                counts[i] += 1.0;
            }
        }
    }
    let total: f64 = counts.iter().sum();
    counts.iter().map(|c| c / total).collect()
}

/// Runs a prediction job. Blocking: call from a thread that may block, with a handle to the
/// runtime the data path runs on.
pub fn run(
    opts: &PredictOptions,
    rt: &tokio::runtime::Handle,
    on_event: &mut dyn FnMut(PredictEvent),
) -> Result<PredictSummary, PredictError> {
    let started = Instant::now();
    // Refused before the work, not after it: a folder where a file is to be written.
    for out in std::iter::once(&opts.out).chain(&opts.submission) {
        if out.is_dir() {
            return Err(PredictError::Input(format!(
                "{}: is a folder; give a file path to write",
                out.display()
            )));
        }
    }
    let mut model = LoadedModel::load(&opts.model, &opts.weights, opts.device, opts.calibrate)?;
    if let Some(precision) = opts.precision {
        model.set_precision(precision);
    }
    let run_dir = RunDir::new(&opts.model);
    let Inputs {
        records,
        true_classes,
        sample_submission: found_sample,
    } = resolve_inputs(&opts.data, opts.subset, &run_dir, &model.class_names)?;
    let (cfg, tta, transforms) = job_config(opts, &model)?;
    let views = transforms.len();
    let model_id = opts
        .model_id
        .clone()
        .unwrap_or_else(|| model.model_id.clone());
    let metadata = output_metadata(opts, &model, &cfg, &tta, views);
    let mut writer = PredictionWriter::create(
        &opts.out,
        model.class_names.clone(),
        &model_id,
        &metadata,
        opts.top_k,
    )?;
    on_event(PredictEvent::Started {
        images: records.len(),
        views,
        model_id: model_id.clone(),
    });
    model.check_unknown_views(views);
    let records = Arc::new(records);
    let mut probabilities: Vec<Option<Vec<f32>>> = vec![None; records.len()];
    let mut job = Predicting::new(&model, records.clone(), views, tta.aggregation, started);
    let mut unknown_images = 0usize;
    let failures = job.predict(&cfg, transforms, rt, on_event, &mut |rec, out| {
        let r = &records[rec];
        let unknown = model.unknown_columns(&out);
        unknown_images += usize::from(unknown.unknown == Some(true));
        writer.push(PredictionRow {
            image_id: r.id.clone(),
            source_path: r.path.display().to_string(),
            label: true_classes[rec].clone(),
            probabilities: Some(out.probabilities.clone()),
            views: views as u16,
            error: None,
            unknown,
        })?;
        probabilities[rec] = Some(out.probabilities);
        Ok(())
    })?;
    let done = job.done;
    let failed: Vec<(PathBuf, String)> = failures
        .iter()
        .map(|f| (f.path.clone(), f.reason.clone()))
        .collect();
    metrics::counter!(crate::telemetry::PREDICT_FAILED).increment(failed.len() as u64);
    write_unpredicted(&mut writer, &model, &records, &probabilities, &failed)?;
    writer.finish()?;
    on_event(PredictEvent::Progress {
        images_done: done,
        images_total: records.len(),
        images_per_second: done as f64 / started.elapsed().as_secs_f64(),
    });

    let scores = labelled_scores(&records, &probabilities, model.class_names.len());
    let submission = match &opts.submission {
        None => None,
        Some(path) => {
            let header = opts.sample_submission.clone().or(found_sample);
            let s =
                write_submission_file(path, header, &model, &run_dir, &records, &probabilities)?;
            Some((path.clone(), s))
        }
    };
    let seconds = started.elapsed().as_secs_f64().max(1e-9);
    Ok(PredictSummary {
        out: opts.out.clone(),
        model_id,
        images: records.len(),
        predicted: done,
        failed,
        views,
        aggregation: tta.aggregation,
        temperature: model.calibration.map(|c| c.temperature),
        seconds,
        images_per_second: done as f64 / seconds,
        patches_per_second: (done * views) as f64 / seconds,
        scores,
        submission,
        unknown: model.unknown.as_ref().map(|u| (unknown_images, u.score)),
    })
}

/// The run's pipeline and TTA with the job's overrides (transforms, aggregation, batch size),
/// the views, and a data path sized for them: each record in flight holds all of its views, so
/// just enough records stay in flight to fill the next batches and memory does not grow with
/// the transform count.
pub(crate) fn job_config(
    opts: &PredictOptions,
    model: &LoadedModel,
) -> Result<(PipelineConfig, TtaConfig, Arc<Vec<Augmentation>>), PredictError> {
    let mut cfg = model.cfg.clone();
    let mut tta: TtaConfig = cfg.tta.clone();
    if let Some(n) = opts.tta {
        tta.transforms = n;
    }
    if let Some(a) = opts.aggregation {
        tta.aggregation = a;
    }
    tta.validate().map_err(PredictError::Tta)?;
    if let Some(b) = opts.batch_size {
        if b == 0 {
            return Err(PredictError::Input("--batch-size must be > 0".into()));
        }
        cfg.batch.size = b;
    }
    let transforms = Arc::new(quasi_random_transforms(&tta));
    let views = transforms.len();
    let workers = cfg.worker_count();
    let per_batch = cfg.batch.size.div_ceil(views);
    cfg.loader.reorder_window = cfg
        .loader
        .reorder_window
        .min((2 * workers).max(per_batch * (cfg.channels.batches + 1)) + workers);
    cfg.loader.cache_decoded = false; // each image is decoded once anyway
    if cfg.train.threads > 0 {
        tch::set_num_threads(cfg.train.threads as i32);
    }
    Ok((cfg, tta, transforms))
}

/// The Parquet file's metadata: what produced these predictions.
fn output_metadata(
    opts: &PredictOptions,
    model: &LoadedModel,
    cfg: &PipelineConfig,
    tta: &TtaConfig,
    views: usize,
) -> serde_json::Value {
    serde_json::json!({
        "model_id": model.model_id,
        "run_dir": opts.model.display().to_string(),
        "weights": model.weights_path.display().to_string(),
        "pipeline": cfg.name,
        "model": cfg.model,
        "patches": cfg.patches,
        "zmuv": model.zmuv.inputs,
        "tta": tta,
        "views": views,
        "temperature": model.calibration.map(|c| c.temperature),
        "calibration": model.calibration,
        "unknown": model.unknown.as_ref().map(|u| serde_json::json!({
            "score": u.score,
            "false_unknown_rate": u.false_unknown_rate,
            "thresholds": u.thresholds,
            "valid_false_unknown": u.valid_false_unknown,
            "views": u.views,
        })),
        "device": crate::device::name(model.net.device),
        "precision": model.net.precision(),
        "plankton_version": env!("CARGO_PKG_VERSION"),
        "created_unix": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
    })
}

/// One image's outputs, aggregated over its views.
#[derive(Debug, Clone)]
pub struct ImageOutputs {
    /// Aggregated (and temperature-scaled, when the run is calibrated) probabilities.
    pub probabilities: Vec<f32>,
    /// The logits averaged over the views.
    pub mean_logits: Vec<f32>,
    /// The penultimate features averaged over the views, when the job asked for them.
    pub mean_features: Option<Vec<f32>>,
}

/// A prediction job in progress: views come back per batch, each image's outputs go to the
/// caller once all of its views are in.
pub struct Predicting<'a> {
    model: &'a LoadedModel,
    records: Arc<Vec<ImageRecord>>,
    aggregator: Aggregator,
    /// Per-view logits (and features) averaged per image.
    view_mean: ViewMean,
    feature_dim: Option<usize>,
    pub done: usize,
    started: Instant,
    last_event: Instant,
}

impl<'a> Predicting<'a> {
    /// Features are computed when the model's unknown rule needs them.
    pub fn new(
        model: &'a LoadedModel,
        records: Arc<Vec<ImageRecord>>,
        views: usize,
        aggregation: Aggregation,
        started: Instant,
    ) -> Self {
        let mut job = Predicting {
            model,
            records,
            aggregator: Aggregator::new(model.class_names.len(), views, aggregation),
            view_mean: ViewMean::new(model.class_names.len(), views),
            feature_dim: None,
            done: 0,
            started,
            last_event: Instant::now(),
        };
        if model.wants_features() {
            job = job.with_features();
        }
        job
    }

    /// Also averages the penultimate features of each image's views.
    pub fn with_features(mut self) -> Self {
        let d = self.model.net.feature_dim();
        self.feature_dim = Some(d);
        self.view_mean = ViewMean::new(self.model.class_names.len() + d, self.aggregator.views());
        self
    }

    /// Runs every view of every record through the network; returns the images the data path
    /// set aside.
    pub fn predict(
        &mut self,
        cfg: &PipelineConfig,
        transforms: Arc<Vec<Augmentation>>,
        rt: &tokio::runtime::Handle,
        on_event: &mut dyn FnMut(PredictEvent),
        on_image: &mut dyn FnMut(usize, ImageOutputs) -> Result<(), PredictError>,
    ) -> Result<Vec<crate::topology::Failure>, PredictError> {
        let _enter = rt.enter();
        let spec = LoaderSpec {
            records: self.records.clone(),
            plan: SamplePlan::Ordered { epochs: 1 },
            augment: false,
            zmuv: Some(self.model.zmuv.inputs.clone()),
            first_epoch: 0,
            views: Some(transforms),
        };
        let mut loader = Loader::spawn(cfg, spec)?;
        let _guard = tch::no_grad_guard();
        crate::telemetry::describe();
        let batch_seconds = metrics::histogram!(crate::telemetry::PREDICT_BATCH_SECONDS);
        let patches_total = metrics::counter!(crate::telemetry::PREDICT_PATCHES);
        // One batch in flight: the next batch's forward pass is enqueued before this one's
        // result is read back, so a GPU computes while the host aggregates and writes.
        let mut in_flight: Option<(Batch, Download, Instant)> = None;
        loop {
            let launched = rt
                .block_on(loader.next_batch())
                .map(|batch| self.launch(batch));
            let Some((batch, outputs, t_batch)) = std::mem::replace(&mut in_flight, launched)
            else {
                if in_flight.is_none() {
                    break;
                }
                continue;
            };
            let flat: Vec<f32> =
                Vec::try_from(outputs.wait().flatten(0, -1)).expect("float tensor");
            batch_seconds.record(t_batch.elapsed().as_secs_f64());
            patches_total.increment(batch.len as u64);
            self.take(&batch, &flat, on_image)?;
            if self.last_event.elapsed().as_secs_f64() > 0.2 {
                self.last_event = Instant::now();
                on_event(PredictEvent::Progress {
                    images_done: self.done,
                    images_total: self.records.len(),
                    images_per_second: self.done as f64 / self.started.elapsed().as_secs_f64(),
                });
            }
        }
        Ok(rt.block_on(loader.finish())?.failures)
    }

    /// Enqueues the batch's forward pass; its logits (and features: one row of C + F values per
    /// view) are read back later.
    fn launch(&self, batch: Batch) -> (Batch, Download, Instant) {
        let t_batch = Instant::now();
        let net = &self.model.net;
        let inputs: Vec<tch::Tensor> = (0..batch.inputs.len())
            .map(|k| net.upload(&batch.input_tensor(k)))
            .collect();
        let outputs = if self.feature_dim.is_some() {
            let (features, logits) = net.forward_features(&inputs);
            tch::Tensor::cat(&[logits, features], 1)
        } else {
            net.forward_t(&inputs, false).to_kind(Kind::Float)
        };
        (batch, download(&outputs), t_batch)
    }

    /// Aggregates the batch's views; hands on every image whose views are all in.
    fn take(
        &mut self,
        batch: &Batch,
        outputs: &[f32],
        on_image: &mut dyn FnMut(usize, ImageOutputs) -> Result<(), PredictError>,
    ) -> Result<(), PredictError> {
        let classes = self.model.class_names.len();
        let width = classes + self.feature_dim.unwrap_or(0);
        let temperature = self.model.calibration.map(|c| c.temperature);
        let images_total = metrics::counter!(crate::telemetry::PREDICT_IMAGES);
        for (i, &record) in batch.record_indices[..batch.len].iter().enumerate() {
            let row = &outputs[i * width..(i + 1) * width];
            // The aggregator renormalises each view: logits serve as log-probabilities.
            let aggregated = self.aggregator.push(record, &row[..classes]);
            let mean = self.view_mean.push(record, row);
            let (Some((rec, p)), Some(mut mean)) = (aggregated, mean) else {
                continue;
            };
            let mut p: Vec<f32> = p.into_iter().map(|v| v as f32).collect();
            if let Some(t) = temperature {
                p = apply_temperature(&p, classes, t);
            }
            let mean_features = self.feature_dim.map(|_| mean.split_off(classes));
            on_image(
                rec,
                ImageOutputs {
                    probabilities: p,
                    mean_logits: mean,
                    mean_features,
                },
            )?;
            self.done += 1;
            images_total.increment(1);
        }
        Ok(())
    }
}

/// A row with its reason for every image without a prediction.
fn write_unpredicted(
    writer: &mut PredictionWriter,
    model: &LoadedModel,
    records: &[ImageRecord],
    probabilities: &[Option<Vec<f32>>],
    failed: &[(PathBuf, String)],
) -> Result<(), PredictError> {
    let failed_reasons: HashMap<&Path, &str> = failed
        .iter()
        .map(|(p, r)| (p.as_path(), r.as_str()))
        .collect();
    for (r, p) in records.iter().zip(probabilities) {
        if p.is_some() {
            continue;
        }
        let reason = failed_reasons
            .get(r.path.as_path())
            .copied()
            .unwrap_or("no prediction (the data path dropped it)");
        writer.push(PredictionRow {
            image_id: r.id.clone(),
            source_path: r.path.display().to_string(),
            label: r.label.map(|l| model.class_names[l as usize].clone()),
            probabilities: None,
            views: 0,
            error: Some(reason.to_string()),
            unknown: Default::default(),
        })?;
    }
    Ok(())
}

/// Scores on the images whose class the source knows.
fn labelled_scores(
    records: &[ImageRecord],
    probabilities: &[Option<Vec<f32>>],
    classes: usize,
) -> Option<Scores> {
    let mut labelled_probs = Vec::new();
    let mut labels = Vec::new();
    for (r, p) in records.iter().zip(probabilities) {
        if let (Some(l), Some(p)) = (r.label, p) {
            labelled_probs.extend_from_slice(p);
            labels.push(l as usize);
        }
    }
    (!labels.is_empty()).then(|| scoring::score(&labelled_probs, &labels, classes))
}

/// The competition's submission CSV, in the columns of `header` (a sampleSubmission.csv) or
/// the model's class order.
fn write_submission_file(
    path: &Path,
    header: Option<PathBuf>,
    model: &LoadedModel,
    run_dir: &RunDir,
    records: &[ImageRecord],
    probabilities: &[Option<Vec<f32>>],
) -> Result<SubmissionSummary, PredictError> {
    let (columns, from) = match &header {
        Some(h) => (
            crate::sources::dataset::read_submission_classes(h)?,
            h.clone(),
        ),
        None => (model.class_names.clone(), run_dir.classes()),
    };
    let rows: Vec<SubmissionRow> = records
        .iter()
        .zip(probabilities)
        .map(|(r, p)| SubmissionRow {
            image_id: &r.id,
            probabilities: p.as_deref(),
        })
        .collect();
    Ok(submission::write_submission(
        path,
        &model.class_names,
        &columns,
        &from,
        &rows,
        &class_prior(run_dir, &model.class_names),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain folder before a dataset: each record keeps its own true class.
    #[test]
    fn true_classes_stay_aligned_with_records_across_sources() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::create_dir_all(&plain).unwrap();
        std::fs::write(plain.join("p.png"), b"x").unwrap();
        let ds = dir.path().join("ds");
        for (class, file) in [("a", "x.png"), ("b", "y.png")] {
            std::fs::create_dir_all(ds.join("train").join(class)).unwrap();
            std::fs::write(ds.join("train").join(class).join(file), b"x").unwrap();
        }
        let classes = vec!["a".to_string(), "b".to_string()];
        let run = RunDir::new(dir.path());
        let inputs = resolve_inputs(&[plain, ds], Subset::All, &run, &classes).unwrap();
        assert_eq!(inputs.records.len(), 3);
        assert_eq!(inputs.true_classes.len(), 3);
        for (r, t) in inputs.records.iter().zip(&inputs.true_classes) {
            assert_eq!(r.label.map(|l| classes[l as usize].clone()), *t, "{}", r.id);
        }
        assert_eq!(inputs.true_classes[0], None);
    }
}
