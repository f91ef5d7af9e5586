//! `plankton fuse`: fitting (cross-validated, then final) and applying fusion models, and the
//! model folder they live in.
//!
//! Rows: a prediction row is *fused* when it has probabilities and a row of the features file
//! (matched by source path, else by a unique image id) with no error and at least one value in
//! every set (other missing or non-finite values are imputed with the fitted mean). A failed
//! prediction stays an error row; a row without usable features keeps the convnet's
//! probabilities unchanged. Both are counted, and the first few named, in the summary and in
//! the output file's metadata.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use tch::Tensor;

use super::features::{FeatureFile, SetValues};
use super::net::{Stack, TrainData, TrainSettings};
use super::{FusionError, SetSpec, Standardisation};
use crate::rng::mix64;
use crate::scoring::{score, Scores};
use crate::sinks::parquet::{PredictionRow, PredictionWriter, Predictions};

pub const MODEL_JSON: &str = "fusion.json";
pub const MODEL_WEIGHTS: &str = "fusion.safetensors";
pub const MODEL_FORMAT: &str = "plankton.fusion/1";

/// Mini-batch updates per net by default, and the first learning rate. The reference ran
/// 61,440 updates (240 chunks of 32,768 rows in batches of 128) at 1e-3 on 27,000 training
/// rows. Here a validation set about ten times smaller is fitted (K + 1) x repeats x sets
/// times, so we keep its optimiser, batch size, initialisation and schedule shape but take
/// 1,000 updates at ten times the rate: on a constructed 3,000-row, 121-class case (README,
/// "Late fusion") that matched the best out-of-fold loss of longer, slower runs (4,000 at 3e-3,
/// 8,000 at 1e-3) in a quarter of the time, while twice as many updates at 1e-2 started to fit
/// noise features (+0.015 out of fold).
pub const DEFAULT_STEPS: usize = 1000;
pub const DEFAULT_LEARNING_RATE: f64 = 0.01;

/// Rows named in the summary when they could not be fused.
const EXAMPLES: usize = 10;

#[derive(Debug, Clone)]
pub struct FitOptions {
    /// Labelled (validation) predictions.
    pub predictions: PathBuf,
    pub features: PathBuf,
    /// Dataset folders holding the true classes (empty: the predictions' `label` column).
    pub data: Vec<PathBuf>,
    /// The out-of-fold fused predictions.
    pub out: PathBuf,
    pub model_out: PathBuf,
    pub sets: Vec<SetSpec>,
    pub repeats: usize,
    pub folds: usize,
    pub seed: u64,
    pub train: TrainSettings,
    /// Worker threads (0 = one per core); each trains its nets on one libtorch thread.
    pub threads: usize,
    pub report: Option<PathBuf>,
    pub top_k: usize,
}

impl FitOptions {
    /// The reference's recipe: moments (L2 0.002) and Haralick (L2 0.0002), 10 repeats, 5 folds.
    pub fn new(predictions: &Path, features: &Path, out: &Path, model_out: &Path) -> FitOptions {
        let mut train = TrainSettings::reference(DEFAULT_STEPS);
        scale_learning_rate(&mut train, DEFAULT_LEARNING_RATE);
        FitOptions {
            predictions: predictions.to_path_buf(),
            features: features.to_path_buf(),
            data: Vec::new(),
            out: out.to_path_buf(),
            model_out: model_out.to_path_buf(),
            sets: SetSpec::parse_list("moments,haralick").expect("valid"),
            repeats: 10,
            folds: 5,
            seed: 42,
            train,
            threads: 0,
            report: None,
            top_k: 5,
        }
    }
}

/// Sets the schedule's first rate to `lr`, keeping the reference's drops (x0.1, x0.01).
pub fn scale_learning_rate(t: &mut TrainSettings, lr: f64) {
    let base = t.schedule[0].1;
    for s in &mut t.schedule {
        s.1 *= lr / base;
    }
}

#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// The folder written by a fit.
    pub model: PathBuf,
    pub predictions: PathBuf,
    pub features: PathBuf,
    /// Optional: dataset folders with true classes, to score before/after.
    pub data: Vec<PathBuf>,
    pub out: PathBuf,
    pub threads: usize,
    pub report: Option<PathBuf>,
    pub top_k: usize,
}

impl ApplyOptions {
    pub fn new(model: &Path, predictions: &Path, features: &Path, out: &Path) -> ApplyOptions {
        ApplyOptions {
            model: model.to_path_buf(),
            predictions: predictions.to_path_buf(),
            features: features.to_path_buf(),
            data: Vec::new(),
            out: out.to_path_buf(),
            threads: 0,
            report: None,
            top_k: 5,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct RowCounts {
    pub total: usize,
    pub fused: usize,
    /// Rows without a prediction (kept as error rows).
    pub failed: usize,
    /// Predicted rows without usable features (kept unchanged).
    pub without_features: usize,
    /// Feature values replaced by their column's mean (non-finite or null).
    pub imputed_values: usize,
    /// Fused rows with a known class (the fit rows, or the scored rows of an apply).
    pub labelled: usize,
    /// Source paths of some rows that could not be fused.
    pub without_features_examples: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct FusionSummary {
    pub mode: &'static str,
    pub sets: Vec<SetSpec>,
    pub columns: Vec<usize>,
    pub repeats: usize,
    pub folds: Option<usize>,
    pub seed: u64,
    pub train: TrainSettings,
    pub rows: RowCounts,
    /// The stored predictions on the labelled fused rows.
    pub before: Option<Scores>,
    /// Fit: out-of-fold; apply: the model's predictions; on the same rows as `before`.
    pub after: Option<Scores>,
    /// The same over every labelled predicted row (unfused rows count unchanged).
    pub all_labelled_before: Option<Scores>,
    pub all_labelled_after: Option<Scores>,
    /// Fit: the final nets on their own training rows (what an apply to the fit file gives).
    pub final_in_sample: Option<Scores>,
    pub model_id: String,
    pub source_model_ids: Vec<String>,
    pub out: PathBuf,
    pub model_dir: PathBuf,
    pub seconds: f64,
    pub nets_trained: usize,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct GroupFile {
    set: SetSpec,
    columns: Vec<String>,
    standardisation: Standardisation,
    repeats: usize,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct ModelFile {
    format: String,
    model_id: String,
    class_names: Vec<String>,
    groups: Vec<GroupFile>,
    train: TrainSettings,
    seed: u64,
    folds: usize,
    source_predictions: PathBuf,
    source_model_ids: Vec<String>,
    source_model: serde_json::Value,
    cv_before: Option<Scores>,
    cv_after: Option<Scores>,
    created_by: String,
}

/// A fitted group: its columns, scaling and final nets.
struct Group {
    set: SetSpec,
    columns: Vec<String>,
    standardisation: Standardisation,
    stack: Stack,
}

/// Predictions matched to features.
struct Matched {
    p: Predictions,
    feats: FeatureFile,
    /// Per prediction row: the feature row when the row can be fused.
    feature_row: Vec<Option<usize>>,
    counts: RowCounts,
}

fn match_rows(p: Predictions, feats: FeatureFile) -> Matched {
    let mut counts = RowCounts {
        total: p.rows.len(),
        ..Default::default()
    };
    let feature_row = p
        .rows
        .iter()
        .map(|r| {
            if r.probabilities.is_none() {
                counts.failed += 1;
                return None;
            }
            match feats
                .find(&r.source_path, &r.image_id)
                .filter(|&i| feats.usable(i))
            {
                Some(i) => {
                    counts.fused += 1;
                    Some(i)
                }
                None => {
                    counts.without_features += 1;
                    if counts.without_features_examples.len() < EXAMPLES {
                        counts.without_features_examples.push(r.source_path.clone());
                    }
                    None
                }
            }
        })
        .collect();
    Matched {
        p,
        feats,
        feature_row,
        counts,
    }
}

/// True classes per prediction row: from dataset folders (as `plankton evaluate` matches them)
/// or the file's `label` column.
fn row_labels(
    p: &Predictions,
    path: &Path,
    data: &[PathBuf],
    required: bool,
) -> Result<Vec<Option<usize>>, FusionError> {
    let index: HashMap<&str, usize> = p
        .class_names
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i))
        .collect();
    if data.is_empty() {
        let labels: Vec<Option<usize>> = p
            .rows
            .iter()
            .map(|r| r.label.as_deref().and_then(|l| index.get(l).copied()))
            .collect();
        if required && labels.iter().all(Option::is_none) {
            // The evaluate module words this error (and its hint) for us.
            crate::evaluate::load_labelled(path, data)?;
        }
        return Ok(labels);
    }
    let l = match crate::evaluate::load_labelled(path, data) {
        Ok(l) => l,
        Err(e) if required => return Err(e.into()),
        Err(_) => return Ok(vec![None; p.rows.len()]),
    };
    let by_path: HashMap<&str, usize> = l
        .paths
        .iter()
        .map(String::as_str)
        .zip(l.labels.iter().copied())
        .collect();
    Ok(p.rows
        .iter()
        .map(|r| by_path.get(r.source_path.as_str()).copied())
        .collect())
}

/// Log of the stored probabilities, clipped so that a zero does not become -inf (the
/// reference's `T.log(p)` met no exact zeros in float32 softmax averages; we may).
fn log_probs(rows: &[&[f32]]) -> Vec<f32> {
    rows.iter()
        .flat_map(|r| r.iter().map(|&p| p.max(1e-15).ln()))
        .collect()
}

fn standardised(
    set: &SetValues,
    st: &Standardisation,
    feature_rows: &[usize],
) -> (Vec<f32>, usize) {
    let mut x = Vec::with_capacity(feature_rows.len() * set.columns.len());
    let imputed = feature_rows
        .iter()
        .map(|&i| st.apply(set.row(i), &mut x))
        .sum();
    (x, imputed)
}

/// Seed of net `repeat` of block `block` of a set. Keyed by the set's name, not its position,
/// so `--sets moments` alone reproduces the moments nets of `--sets moments,haralick`.
fn net_seed(seed: u64, set: &str, block: usize, repeat: usize) -> u64 {
    let name = set.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    mix64(mix64(seed ^ mix64(name)) ^ mix64(((block as u64) << 32) | repeat as u64))
}

fn threads(requested: usize) -> usize {
    if requested > 0 {
        requested
    } else {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    }
}

/// Runs `units` independent jobs on `workers` threads, each with one libtorch thread: these
/// nets are far too small for intra-op parallelism, and on a busy machine libtorch's own
/// threads made a step ten times slower. Results come back in unit order and do not depend on
/// which worker ran what.
fn run_units<T: Send>(
    units: usize,
    workers: usize,
    f: impl Fn(usize) -> T + Sync + Send,
) -> Vec<T> {
    let before = tch::get_num_threads();
    let pool = crate::par::pool_with(workers.clamp(1, units.max(1)), || tch::set_num_threads(1));
    let out = crate::par::map_range_on(&pool, units, f);
    tch::set_num_threads(before);
    out
}

/// Mean over the groups of their nets' fused probabilities for the given prediction rows.
fn fuse_rows(groups: &[Group], m: &Matched, rows: &[usize], workers: usize) -> (Vec<f32>, usize) {
    let c = m.p.class_names.len();
    let probs: Vec<&[f32]> = rows
        .iter()
        .map(|&i| {
            m.p.rows[i]
                .probabilities
                .as_deref()
                .expect("fused rows are predicted")
        })
        .collect();
    let lp = log_probs(&probs);
    let feature_rows: Vec<usize> = rows
        .iter()
        .map(|&i| m.feature_row[i].expect("fused rows have features"))
        .collect();
    // Tensors are not Sync: each worker takes its group's nets (storage-sharing handles) out.
    let stacks: Vec<Mutex<Option<Stack>>> = groups
        .iter()
        .map(|g| Mutex::new(Some(g.stack.shallow())))
        .collect();
    let scaling: Vec<(&str, &Standardisation, usize)> = groups
        .iter()
        .map(|g| (g.set.name.as_str(), &g.standardisation, g.columns.len()))
        .collect();
    let per_group = run_units(groups.len(), workers, |g| {
        let (name, standardisation, columns) = scaling[g];
        let stack = stacks[g]
            .lock()
            .expect("unpoisoned")
            .take()
            .expect("one unit per group");
        let set = m
            .feats
            .sets
            .iter()
            .find(|s| s.name == name)
            .expect("read with the model's sets");
        let (x, imputed) = standardised(set, standardisation, &feature_rows);
        let xt = Tensor::from_slice(&x).view([rows.len() as i64, columns as i64]);
        let lpt = Tensor::from_slice(&lp).view([rows.len() as i64, c as i64]);
        (stack.predict(&xt, &lpt), imputed)
    });
    let mut out = vec![0.0f32; rows.len() * c];
    let mut imputed = 0;
    for (p, i) in &per_group {
        imputed += i;
        for (o, v) in out.iter_mut().zip(p) {
            *o += v / groups.len() as f32;
        }
    }
    (out, imputed)
}

fn scores_of(probs: &[f32], labels: &[usize], classes: usize) -> Option<Scores> {
    (!labels.is_empty()).then(|| score(probs, labels, classes))
}

fn model_hash(bytes: &[u8]) -> String {
    let h = bytes.chunks(8).fold(0x5eed_u64, |h, c| {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        mix64(h ^ u64::from_le_bytes(w))
    });
    format!("{:012x}", h & 0xffff_ffff_ffff)
}

/// Writes every row: fused where `fused` has one, else unchanged (failed rows stay errors).
fn write_output(
    path: &Path,
    m: &Matched,
    fused: &HashMap<usize, &[f32]>,
    model_id: &str,
    meta: &serde_json::Value,
    top_k: usize,
) -> Result<usize, FusionError> {
    let mut w = PredictionWriter::create(path, m.p.class_names.clone(), model_id, meta, top_k)?;
    for (i, r) in m.p.rows.iter().enumerate() {
        let mut row: PredictionRow = r.clone();
        if let Some(p) = fused.get(&i) {
            row.probabilities = Some(p.to_vec());
        }
        w.push(row)?;
    }
    Ok(w.finish()?)
}

/// Where a fit or an apply writes: the fused predictions (the summary in their metadata) and
/// the optional JSON report.
struct Outputs<'a> {
    predictions: &'a Path,
    out: &'a Path,
    report: Option<&'a Path>,
    top_k: usize,
}

impl Outputs<'_> {
    fn write(
        &self,
        summary: FusionSummary,
        m: &Matched,
        fused: &HashMap<usize, &[f32]>,
        started: Instant,
    ) -> Result<FusionSummary, FusionError> {
        let meta = output_metadata(&summary, &m.p, self.predictions);
        write_output(self.out, m, fused, &summary.model_id, &meta, self.top_k)?;
        let summary = FusionSummary {
            seconds: started.elapsed().as_secs_f64(),
            ..summary
        };
        if let Some(r) = self.report {
            write_json(r, &summary)?;
        }
        Ok(summary)
    }
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), FusionError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| FusionError::io(dir, e))?;
    }
    let json = serde_json::to_string_pretty(value).expect("serialisable");
    crate::fsx::write_atomic(path, json.as_bytes()).map_err(|e| FusionError::io(path, e.source))
}

fn output_metadata(
    summary: &FusionSummary,
    source: &Predictions,
    source_path: &Path,
) -> serde_json::Value {
    serde_json::json!({
        "kind": "fusion",
        "fusion": {
            "mode": summary.mode,
            "out_of_fold": summary.mode == "fit",
            "sets": summary.sets,
            "columns": summary.columns,
            "repeats": summary.repeats,
            "folds": summary.folds,
            "seed": summary.seed,
            "train": summary.train,
            "model_dir": summary.model_dir,
            "log_loss_before": summary.before.map(|s| s.log_loss),
            "log_loss_after": summary.after.map(|s| s.log_loss),
            "rows": summary.rows,
        },
        "source_predictions": source_path,
        "source_model_ids": source.model_ids,
        "source_model": source.model,
    })
}

impl FitOptions {
    fn check(&self) -> Result<(), FusionError> {
        if self.repeats == 0 {
            return Err(FusionError::Input("--repeats must be at least 1".into()));
        }
        if self.folds < 2 {
            return Err(FusionError::Input(
                "--folds must be at least 2 (the loss after fusion is measured out of fold)".into(),
            ));
        }
        if self.train.steps == 0 || self.train.batch_size == 0 {
            return Err(FusionError::Input(
                "--steps and the batch size must be at least 1".into(),
            ));
        }
        if !self
            .train
            .schedule
            .iter()
            .all(|(_, lr)| lr.is_finite() && *lr > 0.0)
        {
            return Err(FusionError::Input(
                "--learning-rate must be a positive number".into(),
            ));
        }
        Ok(())
    }
}

/// Fits fusion on labelled predictions: out-of-fold fused predictions to `out`, final nets to
/// `model_out`. `progress(done, total)` counts trained blocks of nets.
pub fn fit(
    opts: &FitOptions,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<FusionSummary, FusionError> {
    let started = Instant::now();
    opts.check()?;
    let p = Predictions::read(&opts.predictions)?;
    let labels = row_labels(&p, &opts.predictions, &opts.data, true)?;
    let names: Vec<String> = opts.sets.iter().map(|s| s.name.clone()).collect();
    let feats = FeatureFile::read(&opts.features, &names, &[])?;
    let mut m = match_rows(p, feats);
    let c = m.p.class_names.len();
    let fit_rows = labelled_rows(opts, &mut m, &labels)?;
    let y: Vec<usize> = fit_rows
        .iter()
        .map(|&i| labels[i].expect("labelled"))
        .collect();
    let y32: Vec<u32> = y.iter().map(|&v| v as u32).collect();
    let splits = crate::split::stratified_folds(&y32, opts.folds, opts.seed)
        .map_err(|e| FusionError::Input(e.to_string()))?;
    let workers = threads(opts.threads);
    let (oof, groups) = cross_fit(opts, &m, &fit_rows, &y, &splits, workers, progress);

    // The final nets on every fusable row: the in-sample score, and the output for fused rows
    // without a label (no leakage: they were not fitted on).
    let fusable: Vec<usize> = (0..m.p.rows.len())
        .filter(|&i| m.feature_row[i].is_some())
        .collect();
    let (final_probs, imputed) = fuse_rows(&groups, &m, &fusable, workers);
    m.counts.imputed_values = imputed;
    let final_by_row: HashMap<usize, &[f32]> = fusable
        .iter()
        .enumerate()
        .map(|(k, &i)| (i, &final_probs[k * c..(k + 1) * c]))
        .collect();
    let in_sample: Vec<f32> = fit_rows
        .iter()
        .flat_map(|i| final_by_row[i].iter().copied())
        .collect();

    let before_probs: Vec<f32> = fit_rows
        .iter()
        .flat_map(|&i| m.p.rows[i].probabilities.as_deref().expect("predicted"))
        .copied()
        .collect();
    let before = score(&before_probs, &y, c);
    let after = score(&oof, &y, c);
    let mut fused: HashMap<usize, &[f32]> = final_by_row.clone();
    for (j, &i) in fit_rows.iter().enumerate() {
        fused.insert(i, &oof[j * c..(j + 1) * c]);
    }
    let (all_before, all_after) = all_labelled(&m, &labels, &fused);
    let model_id = save_model(opts, &m, &groups, before, after)?;

    let summary = FusionSummary {
        mode: "fit",
        sets: opts.sets.clone(),
        columns: groups.iter().map(|g| g.columns.len()).collect(),
        repeats: opts.repeats,
        folds: Some(opts.folds),
        seed: opts.seed,
        train: opts.train.clone(),
        rows: m.counts.clone(),
        before: Some(before),
        after: Some(after),
        all_labelled_before: all_before,
        all_labelled_after: all_after,
        final_in_sample: Some(score(&in_sample, &y, c)),
        model_id: format!("{model_id}:out-of-fold"),
        source_model_ids: m.p.model_ids.clone(),
        out: opts.out.clone(),
        model_dir: opts.model_out.clone(),
        seconds: 0.0,
        nets_trained: opts.sets.len() * (opts.folds + 1) * opts.repeats,
    };
    let outputs = Outputs {
        predictions: &opts.predictions,
        out: &opts.out,
        report: opts.report.as_deref(),
        top_k: opts.top_k,
    };
    outputs.write(summary, &m, &fused, started)
}

/// The prediction rows fusion is fitted on (labelled, with features); enough for the folds.
fn labelled_rows(
    opts: &FitOptions,
    m: &mut Matched,
    labels: &[Option<usize>],
) -> Result<Vec<usize>, FusionError> {
    let fit_rows: Vec<usize> = (0..m.p.rows.len())
        .filter(|&i| m.feature_row[i].is_some() && labels[i].is_some())
        .collect();
    let n = fit_rows.len();
    m.counts.labelled = n;
    if n < 2 * opts.folds {
        return Err(FusionError::TooFewRows {
            path: opts.predictions.clone(),
            reason: format!(
                "only {n} labelled rows have features in {} ({} predicted rows, {} without usable features); {} folds need at least {}",
                opts.features.display(),
                m.counts.fused + m.counts.without_features,
                m.counts.without_features,
                opts.folds,
                2 * opts.folds
            ),
        });
    }
    Ok(fit_rows)
}

/// What every net of the cross-fit trains on: the fitted rows' features (by feature-file row),
/// log probabilities and classes.
struct FitData<'a> {
    m: &'a Matched,
    feature_rows: Vec<usize>,
    log_p: Vec<f32>,
    targets: Vec<i64>,
}

/// What one unit of the cross-fit yields.
enum UnitOut {
    /// Predictions for the held-out fold's rows (row-major).
    Held(Vec<f32>),
    /// The final nets, fitted on every row.
    Final(Stack, Standardisation),
}

/// Trains every (set, block): blocks 0..K hold out fold k, block K is the final fit on all
/// rows. Returns the out-of-fold predictions (each row's fold nets, averaged over the sets) and
/// the final groups.
fn cross_fit(
    opts: &FitOptions,
    m: &Matched,
    fit_rows: &[usize],
    y: &[usize],
    splits: &[crate::split::Split],
    workers: usize,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> (Vec<f32>, Vec<Group>) {
    let c = m.p.class_names.len();
    let probs: Vec<&[f32]> = fit_rows
        .iter()
        .map(|&i| m.p.rows[i].probabilities.as_deref().expect("predicted"))
        .collect();
    let data = FitData {
        m,
        feature_rows: fit_rows
            .iter()
            .map(|&i| m.feature_row[i].expect("has features"))
            .collect(),
        log_p: log_probs(&probs),
        targets: y.iter().map(|&v| v as i64).collect(),
    };
    let blocks = opts.folds + 1;
    let units = opts.sets.len() * blocks;
    let done = AtomicUsize::new(0);
    progress(0, units);
    let outs = run_units(units, workers, |u| {
        let out = fit_unit(opts, &data, splits, u / blocks, u % blocks);
        progress(done.fetch_add(1, Ordering::Relaxed) + 1, units);
        out
    });

    let n = fit_rows.len();
    let mut oof = vec![0.0f32; n * c];
    let mut groups = Vec::new();
    for (u, out) in outs.into_iter().enumerate() {
        let (g, b) = (u / blocks, u % blocks);
        match out {
            UnitOut::Held(p) => {
                for (k, &j) in splits[b].valid.iter().enumerate() {
                    for (o, v) in oof[j * c..(j + 1) * c]
                        .iter_mut()
                        .zip(&p[k * c..(k + 1) * c])
                    {
                        *o += v / opts.sets.len() as f32;
                    }
                }
            }
            UnitOut::Final(stack, standardisation) => groups.push(Group {
                set: opts.sets[g].clone(),
                columns: m.feats.sets[g].columns.clone(),
                standardisation,
                stack,
            }),
        }
    }
    (oof, groups)
}

/// The nets of set `g` for block `b`: standardised on the block's training rows.
fn fit_unit(
    opts: &FitOptions,
    d: &FitData,
    splits: &[crate::split::Split],
    g: usize,
    b: usize,
) -> UnitOut {
    let (n, c) = (d.targets.len(), d.m.p.class_names.len());
    let spec = &opts.sets[g];
    let set = &d.m.feats.sets[g];
    let train_rows: Vec<usize> = if b < opts.folds {
        splits[b].train.clone()
    } else {
        (0..n).collect()
    };
    let st = Standardisation::fit(
        set.columns.len(),
        train_rows.iter().map(|&j| set.row(d.feature_rows[j])),
    );
    let (x, _) = standardised(set, &st, &d.feature_rows);
    let xt = Tensor::from_slice(&x).view([n as i64, set.columns.len() as i64]);
    let lpt = Tensor::from_slice(&d.log_p).view([n as i64, c as i64]);
    let tt = Tensor::from_slice(&d.targets);
    let seeds: Vec<u64> = (0..opts.repeats)
        .map(|r| net_seed(opts.seed, &spec.name, b, r))
        .collect();
    let mut stack = Stack::new(&seeds, set.columns.len(), c);
    let rows: Vec<i64> = train_rows.iter().map(|&j| j as i64).collect();
    stack.train(
        &TrainData {
            x: &xt,
            log_p: &lpt,
            targets: &tt,
            rows: &rows,
        },
        &seeds,
        &opts.train,
        spec.l2,
    );
    if b < opts.folds {
        let held: Vec<i64> = splits[b].valid.iter().map(|&j| j as i64).collect();
        let held = Tensor::from_slice(&held);
        UnitOut::Held(stack.predict(&xt.index_select(0, &held), &lpt.index_select(0, &held)))
    } else {
        UnitOut::Final(stack.slice(0, opts.repeats), st)
    }
}

/// Stores the final nets (safetensors) and the model file; returns the model id, which names
/// the weights' hash.
fn save_model(
    opts: &FitOptions,
    m: &Matched,
    groups: &[Group],
    before: Scores,
    after: Scores,
) -> Result<String, FusionError> {
    let mut named = Vec::new();
    for g in groups {
        named.extend(g.stack.named(&g.set.name));
    }
    std::fs::create_dir_all(&opts.model_out).map_err(|e| FusionError::io(&opts.model_out, e))?;
    let weights_path = opts.model_out.join(MODEL_WEIGHTS);
    let tmp = crate::fsx::temp_path(&weights_path);
    Tensor::write_safetensors(&named, &tmp).map_err(|e| FusionError::io(&tmp, e))?;
    let bytes = std::fs::read(&tmp).map_err(|e| FusionError::io(&tmp, e))?;
    crate::fsx::commit(&tmp, &weights_path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        FusionError::io(&weights_path, e.source)
    })?;
    let set_names = opts
        .sets
        .iter()
        .map(|s| s.name.as_str())
        .collect::<Vec<_>>()
        .join("+");
    let model_id = format!("fusion[{set_names}]@{}", model_hash(&bytes));
    let file = ModelFile {
        format: MODEL_FORMAT.into(),
        model_id: model_id.clone(),
        class_names: m.p.class_names.clone(),
        groups: groups
            .iter()
            .map(|g| GroupFile {
                set: g.set.clone(),
                columns: g.columns.clone(),
                standardisation: g.standardisation.clone(),
                repeats: opts.repeats,
            })
            .collect(),
        train: opts.train.clone(),
        seed: opts.seed,
        folds: opts.folds,
        source_predictions: opts.predictions.clone(),
        source_model_ids: m.p.model_ids.clone(),
        source_model: m.p.model.clone(),
        cv_before: Some(before),
        cv_after: Some(after),
        created_by: format!("plankton {}", env!("CARGO_PKG_VERSION")),
    };
    write_json(&opts.model_out.join(MODEL_JSON), &file)?;
    Ok(model_id)
}

/// Scores over every labelled predicted row: stored probabilities, and with `fused` replacing
/// those it has.
fn all_labelled(
    m: &Matched,
    labels: &[Option<usize>],
    fused: &HashMap<usize, &[f32]>,
) -> (Option<Scores>, Option<Scores>) {
    let c = m.p.class_names.len();
    let (mut b, mut a, mut y) = (Vec::new(), Vec::new(), Vec::new());
    for (i, r) in m.p.rows.iter().enumerate() {
        let (Some(p), Some(l)) = (&r.probabilities, labels[i]) else {
            continue;
        };
        b.extend_from_slice(p);
        a.extend_from_slice(fused.get(&i).copied().unwrap_or(p));
        y.push(l);
    }
    (scores_of(&b, &y, c), scores_of(&a, &y, c))
}

fn load_model(dir: &Path) -> Result<(ModelFile, Vec<Group>), FusionError> {
    let bad = |path: &Path, reason: String| FusionError::Model {
        path: path.to_path_buf(),
        reason,
    };
    let json_path = dir.join(MODEL_JSON);
    let text = std::fs::read_to_string(&json_path).map_err(|e| {
        bad(
            &json_path,
            format!(
                "{e} (is {} a folder written by `plankton fuse --model-out`?)",
                dir.display()
            ),
        )
    })?;
    let file: ModelFile =
        serde_json::from_str(&text).map_err(|e| bad(&json_path, e.to_string()))?;
    if file.format != MODEL_FORMAT {
        return Err(bad(
            &json_path,
            format!(
                "format `{}`, this build reads `{MODEL_FORMAT}`",
                file.format
            ),
        ));
    }
    let weights_path = dir.join(MODEL_WEIGHTS);
    let stored =
        Tensor::read_safetensors(&weights_path).map_err(|e| bad(&weights_path, e.to_string()))?;
    let c = file.class_names.len();
    let groups = file
        .groups
        .iter()
        .map(|g| {
            let stack = Stack::from_named(&stored, &g.set.name, g.columns.len(), c)
                .map_err(|r| bad(&weights_path, format!("set `{}`: {r}", g.set.name)))?;
            if g.standardisation.mean.len() != g.columns.len()
                || g.standardisation.sd.len() != g.columns.len()
            {
                return Err(bad(
                    &json_path,
                    format!(
                        "set `{}`: standardisation does not match its {} columns",
                        g.set.name,
                        g.columns.len()
                    ),
                ));
            }
            Ok(Group {
                set: g.set.clone(),
                columns: g.columns.clone(),
                standardisation: g.standardisation.clone(),
                stack,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if groups.is_empty() {
        return Err(bad(&json_path, "no feature set".into()));
    }
    Ok((file, groups))
}

/// Applies a stored fusion model to predictions (e.g. of the test images).
pub fn apply(opts: &ApplyOptions) -> Result<FusionSummary, FusionError> {
    let started = Instant::now();
    let (file, groups) = load_model(&opts.model)?;
    let p = Predictions::read(&opts.predictions)?;
    if p.class_names != file.class_names {
        let first = p
            .class_names
            .iter()
            .zip(&file.class_names)
            .position(|(a, b)| a != b);
        return Err(FusionError::ClassMismatch {
            path: opts.predictions.clone(),
            other: opts.model.clone(),
            reason: match first {
                Some(k) => format!(
                    "class {k} is `{}` here but `{}` in the model",
                    p.class_names[k], file.class_names[k]
                ),
                None => format!(
                    "{} classes here, {} in the model",
                    p.class_names.len(),
                    file.class_names.len()
                ),
            },
        });
    }
    let labels = row_labels(&p, &opts.predictions, &opts.data, false)?;
    let names: Vec<String> = groups.iter().map(|g| g.set.name.clone()).collect();
    let wanted: Vec<Option<Vec<String>>> = groups.iter().map(|g| Some(g.columns.clone())).collect();
    let feats = FeatureFile::read(&opts.features, &names, &wanted)?;
    let mut m = match_rows(p, feats);
    let c = m.p.class_names.len();
    let fusable: Vec<usize> = (0..m.p.rows.len())
        .filter(|&i| m.feature_row[i].is_some())
        .collect();
    let (probs, imputed) = fuse_rows(&groups, &m, &fusable, threads(opts.threads));
    m.counts.imputed_values = imputed;
    let fused: HashMap<usize, &[f32]> = fusable
        .iter()
        .enumerate()
        .map(|(k, &i)| (i, &probs[k * c..(k + 1) * c]))
        .collect();
    let (mut b, mut a, mut y) = (Vec::new(), Vec::new(), Vec::new());
    for &i in &fusable {
        if let Some(l) = labels[i] {
            b.extend_from_slice(m.p.rows[i].probabilities.as_deref().expect("predicted"));
            a.extend_from_slice(fused[&i]);
            y.push(l);
        }
    }
    m.counts.labelled = y.len();
    let (all_before, all_after) = all_labelled(&m, &labels, &fused);
    let summary = FusionSummary {
        mode: "apply",
        sets: groups.iter().map(|g| g.set.clone()).collect(),
        columns: groups.iter().map(|g| g.columns.len()).collect(),
        repeats: groups[0].stack.models(),
        folds: None,
        seed: file.seed,
        train: file.train.clone(),
        rows: m.counts.clone(),
        before: scores_of(&b, &y, c),
        after: scores_of(&a, &y, c),
        all_labelled_before: all_before,
        all_labelled_after: all_after,
        final_in_sample: None,
        model_id: file.model_id.clone(),
        source_model_ids: m.p.model_ids.clone(),
        out: opts.out.clone(),
        model_dir: opts.model.clone(),
        seconds: 0.0,
        nets_trained: 0,
    };
    let outputs = Outputs {
        predictions: &opts.predictions,
        out: &opts.out,
        report: opts.report.as_deref(),
        top_k: opts.top_k,
    };
    outputs.write(summary, &m, &fused, started)
}

impl FusionSummary {
    /// What the command line prints.
    pub fn render(&self) -> String {
        let sets: Vec<String> = self
            .sets
            .iter()
            .zip(&self.columns)
            .map(|(s, n)| format!("{} ({n} columns, L2 {})", s.name, s.l2))
            .collect();
        let mut t = match self.mode {
            "fit" => format!(
                "fitted fusion on {} labelled rows: {} x {} repeats, {}-fold out-of-fold + final ({} nets, {} steps each) in {:.1} s\n",
                self.rows.labelled,
                sets.join(" + "),
                self.repeats,
                self.folds.unwrap_or(0),
                self.nets_trained,
                self.train.steps,
                self.seconds
            ),
            _ => format!("applied {} ({}, {} repeats) in {:.1} s\n", self.model_id, sets.join(" + "), self.repeats, self.seconds),
        };
        let which = if self.mode == "fit" {
            "out of fold"
        } else {
            "after"
        };
        if let (Some(b), Some(a)) = (self.before, self.after) {
            t.push_str(&format!(
                "log loss on the {} labelled fused rows: {:.4} before -> {:.4} {which} ({:+.4}); top-1 {:.3} -> {:.3}\n",
                b.n,
                b.log_loss,
                a.log_loss,
                a.log_loss - b.log_loss,
                b.top1,
                a.top1
            ));
        }
        if let (Some(b), Some(a)) = (self.all_labelled_before, self.all_labelled_after) {
            if Some(b.n) != self.before.map(|s| s.n) {
                t.push_str(&format!(
                    "over all {} labelled rows (unfused ones unchanged): {:.4} -> {:.4}\n",
                    b.n, b.log_loss, a.log_loss
                ));
            }
        }
        if let Some(f) = self.final_in_sample {
            t.push_str(&format!(
                "final nets on their own training rows (in-sample, optimistic): {:.4}\n",
                f.log_loss
            ));
        }
        t.push_str(&format!(
            "{} rows: {} fused, {} failed (kept as error rows), {} without usable features (kept unchanged), {} feature values imputed -> {}\n",
            self.rows.total,
            self.rows.fused,
            self.rows.failed,
            self.rows.without_features,
            self.rows.imputed_values,
            self.out.display()
        ));
        for p in &self.rows.without_features_examples {
            t.push_str(&format!("  no features: {p}\n"));
        }
        if self.mode == "fit" {
            t.push_str(&format!(
                "model: {} ({})\n",
                self.model_dir.display(),
                self.model_id.trim_end_matches(":out-of-fold")
            ));
        }
        t
    }
}
