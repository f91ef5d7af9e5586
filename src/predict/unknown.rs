//! `plankton calibrate --unknown`: the run's unknown-image rule. The penultimate features of
//! the run's training images (averaged over the TTA views, as predict averages them) give the
//! class means and shared covariance of the Mahalanobis score; the run's validation images,
//! scored exactly as predict scores them, give each score's threshold for a target
//! false-unknown rate. Stored as `unknown.json` in the run, where predict and the daemon pick
//! it up.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tch::Device;

use super::job::{
    job_config, read_calibration, resolve_inputs, ImageOutputs, LoadedModel, PredictError,
    PredictEvent, PredictOptions, Predicting, Subset, Weights,
};
use crate::sources::ImageRecord;
use crate::train::RunDir;
pub use plankton_core::unknown::Score;
use plankton_core::unknown::{threshold_for, FeatureSpace, ImageScores, UnknownCalibration};

/// Ridge added to the feature covariance, relative to its mean variance: a run has fewer
/// training images than feature dimensions more often than not.
pub const DEFAULT_RIDGE: f64 = 0.01;

#[derive(Debug, Clone)]
pub struct UnknownOptions {
    pub model: PathBuf,
    pub weights: Weights,
    /// The dataset the run was trained on (its split.csv picks training and validation images).
    pub data: Vec<PathBuf>,
    pub false_unknown_rate: f64,
    /// The score that decides the `unknown` column.
    pub score: Score,
    pub ridge: f64,
    /// Refuse thresholds fitted on fewer validation images.
    pub min_images: usize,
    pub tta: Option<usize>,
    pub device: Device,
    pub batch_size: Option<usize>,
}

/// What was fitted, with the validation images' scores for the report.
#[derive(Debug, Clone)]
pub struct UnknownFit {
    pub calibration: UnknownCalibration,
    pub path: PathBuf,
    /// Images set aside (unreadable) in the two passes.
    pub failed: usize,
    pub seconds: f64,
}

/// The records of a pass, each image's aggregated outputs (None for an image the data path set
/// aside), and how many were set aside.
type PassOutputs = (Vec<ImageRecord>, Vec<Option<ImageOutputs>>, usize);

/// Every image's aggregated outputs.
fn outputs_of(
    model: &LoadedModel,
    records: Vec<ImageRecord>,
    opts: &PredictOptions,
    features: bool,
    rt: &tokio::runtime::Handle,
    on_event: &mut dyn FnMut(PredictEvent),
) -> Result<PassOutputs, PredictError> {
    let (cfg, tta, transforms) = job_config(opts, model)?;
    let views = transforms.len();
    let records = Arc::new(records);
    on_event(PredictEvent::Started {
        images: records.len(),
        views,
        model_id: model.model_id.clone(),
    });
    let mut outputs: Vec<Option<ImageOutputs>> = vec![None; records.len()];
    let mut job = Predicting::new(
        model,
        records.clone(),
        views,
        tta.aggregation,
        Instant::now(),
    );
    if features {
        job = job.with_features();
    }
    let failures = job.predict(&cfg, transforms, rt, on_event, &mut |rec, out| {
        outputs[rec] = Some(out);
        Ok(())
    })?;
    let records = Arc::try_unwrap(records).unwrap_or_else(|r| (*r).clone());
    Ok((records, outputs, failures.len()))
}

/// Fits the rule and writes `unknown.json` into the run. Blocking: call from a thread that may
/// block, with a handle to the runtime the data path runs on.
pub fn calibrate(
    opts: &UnknownOptions,
    rt: &tokio::runtime::Handle,
    on_event: &mut dyn FnMut(PredictEvent),
) -> Result<UnknownFit, PredictError> {
    let started = Instant::now();
    if !(0.0..1.0).contains(&opts.false_unknown_rate) || opts.false_unknown_rate.is_nan() {
        return Err(PredictError::Input(format!(
            "--false-unknown-rate {} must be in [0, 1)",
            opts.false_unknown_rate
        )));
    }
    if !(opts.ridge > 0.0 && opts.ridge.is_finite()) {
        return Err(PredictError::Input(format!(
            "--ridge {} must be > 0",
            opts.ridge
        )));
    }
    // Without the run's own unknown.json (it is what is being replaced, and may not match the
    // weights any more); with its temperature, as predict applies it.
    let mut model = LoadedModel::load(&opts.model, &opts.weights, opts.device, false)?;
    let run = RunDir::new(&opts.model);
    model.calibration = read_calibration(&run)?;
    let mut popts = PredictOptions::new(&opts.model, opts.data.clone(), &run.unknown());
    popts.tta = opts.tta;
    popts.batch_size = opts.batch_size;
    popts.device = opts.device;
    let classes = model.class_names.len();

    let train = resolve_inputs(&opts.data, Subset::Train, &run, &model.class_names)?.records;
    let valid = resolve_inputs(&opts.data, Subset::Valid, &run, &model.class_names)?.records;
    // Before the passes over the network: a split too small is known from the listing.
    let too_few = |n: usize| {
        PredictError::Input(format!(
            "{}: only {n} validation images; thresholds fitted on fewer than {} follow their noise (at a false-unknown rate of {}, the threshold is the {}-th largest validation score): validate on more images or pass a lower --min-images",
            opts.model.display(),
            opts.min_images,
            opts.false_unknown_rate,
            (opts.false_unknown_rate * n as f64).floor() as usize + 1
        ))
    };
    if valid.len() < opts.min_images {
        return Err(too_few(valid.len()));
    }
    let (train, outputs, failed_train) = outputs_of(&model, train, &popts, true, rt, on_event)?;
    let dim = model.net.feature_dim();
    let mut features = Vec::new();
    let mut labels = Vec::new();
    for (r, out) in train.iter().zip(&outputs) {
        if let (Some(l), Some(out)) = (r.label, out) {
            features.extend_from_slice(out.mean_features.as_deref().expect("features asked"));
            labels.push(l);
        }
    }
    drop(outputs);
    let space = FeatureSpace::fit(&features, &labels, classes, dim, opts.ridge).map_err(|e| {
        PredictError::Input(format!(
            "{}: cannot fit the feature space on {} training images: {e}",
            opts.model.display(),
            labels.len()
        ))
    })?;
    drop(features);

    let (_, outputs, failed_valid) = outputs_of(&model, valid, &popts, true, rt, on_event)?;
    let scores: Vec<ImageScores> = outputs
        .iter()
        .flatten()
        .map(|o| {
            ImageScores::of(
                &o.probabilities,
                &o.mean_logits,
                Some((&space, o.mean_features.as_deref().expect("features asked"))),
            )
        })
        .collect();
    if scores.len() < opts.min_images {
        return Err(too_few(scores.len()));
    }
    let mut thresholds = BTreeMap::new();
    let mut valid_false_unknown = BTreeMap::new();
    for score in Score::ALL {
        let known: Vec<f64> = scores.iter().filter_map(|s| s.get(score)).collect();
        if let Some(t) = threshold_for(&known, opts.false_unknown_rate) {
            let above = known.iter().filter(|&&v| v > t).count();
            thresholds.insert(score, t);
            valid_false_unknown.insert(score, above as f64 / known.len() as f64);
        }
    }
    let (_, _, transforms) = job_config(&popts, &model)?;
    let calibration = UnknownCalibration {
        score: opts.score,
        false_unknown_rate: opts.false_unknown_rate,
        thresholds,
        valid_false_unknown,
        feature_space: Some(space),
        temperature: model.calibration.map(|c| c.temperature),
        views: transforms.len(),
        train_images: labels.len(),
        valid_images: scores.len(),
        model_id: Some(model.model_id.clone()),
    };
    calibration
        .validate(classes)
        .map_err(|e| PredictError::Input(e.to_string()))?;
    let path = run.unknown();
    let json = serde_json::to_vec_pretty(&calibration).expect("serialisable");
    crate::train::run_dir::write_atomic(&path, &json).map_err(|e| PredictError::Io {
        path: path.clone(),
        message: e.to_string(),
    })?;
    Ok(UnknownFit {
        calibration,
        path,
        failed: failed_train + failed_valid,
        seconds: started.elapsed().as_secs_f64(),
    })
}
