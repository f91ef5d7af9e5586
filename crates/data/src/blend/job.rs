//! `plankton blend`: reads member prediction files, matches their rows, fits (or applies) the
//! blend weights and writes the blended predictions as Parquet with the same columns.
//!
//! Rows are matched by `source_path`, else by `image_id` (when the members were predicted from
//! different mounts of the same images). A row that any member failed on, or that a member
//! lacks, is written as an error row naming the member and its reason, so nothing is lost
//! silently and no row is blended from fewer members than the weights assume.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::select::{forward_select, Select, Selection, Weighting};
use super::{blend, fit_terms, lbfgs, uniform_fit, BlendError, BlendFit, LabelTerms};
use crate::evaluate::load_labelled;
use crate::sinks::parquet::{PredictionRow, PredictionWriter, Predictions};
use plankton_core::scoring::kaggle_log_loss;

/// `format` of the weights file.
pub const WEIGHTS_FORMAT: &str = "plankton.blend-weights/1";
/// Seed of the CV folds (fixed: the selection must not change between runs on the same files).
pub const CV_SEED: u64 = 0;

/// `plankton blend` in fit mode.
#[derive(Debug, Clone)]
pub struct FitOptions {
    /// Validation predictions of the members.
    pub predictions: Vec<PathBuf>,
    /// Dataset folders holding the true classes (empty: the files' `label` column).
    pub data: Vec<PathBuf>,
    pub out: PathBuf,
    pub weights_out: Option<PathBuf>,
    pub report: Option<PathBuf>,
    pub select: Select,
    pub weighting: Weighting,
    pub folds: usize,
    pub top_k: usize,
    pub lbfgs: lbfgs::Options,
}

impl FitOptions {
    pub fn new(predictions: Vec<PathBuf>, data: Vec<PathBuf>, out: &Path) -> FitOptions {
        FitOptions {
            predictions,
            data,
            out: out.to_path_buf(),
            weights_out: None,
            report: None,
            select: Select::Cv,
            weighting: Weighting::Fitted,
            folds: 5,
            top_k: 5,
            lbfgs: lbfgs::Options::default(),
        }
    }
}

/// One member as the fit saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberReport {
    pub file: PathBuf,
    pub model_ids: Vec<String>,
    /// Kaggle log loss of this member alone on the fitting rows.
    pub single_log_loss: f64,
    /// 0 for members left out by the selection.
    pub weight: f64,
    /// Its W (None when left out).
    pub w_raw: Option<f64>,
    pub selected: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlendReport {
    pub model_id: String,
    pub class_names: Vec<String>,
    pub members: Vec<MemberReport>,
    pub select: Select,
    pub weighting: Weighting,
    /// Forward selection, with `--select cv`.
    pub selection: Option<Selection>,
    /// The final fit over the selected members, on all fitting rows.
    pub fit: BlendFit,
    /// Kaggle log loss of the blended rows as written (f32) on the fitting rows.
    pub log_loss: f64,
    /// Index of the member with the lowest single log loss.
    pub best_single: usize,
    /// Rows the weights were fitted on: predicted by every member, with a known class.
    pub fit_rows: usize,
    /// Rows predicted by every member but without a known class (blended, not fitted on).
    pub unlabelled_rows: usize,
    pub rows: usize,
    pub error_rows: usize,
}

#[derive(Debug, Clone)]
pub struct FitSummary {
    pub report: BlendReport,
    pub out: PathBuf,
    pub weights_out: Option<PathBuf>,
    pub report_path: Option<PathBuf>,
}

/// A member of a weights file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightsMember {
    /// The predictions file the weights were fitted on (apply mode takes another file of the
    /// same model, e.g. its test predictions).
    pub file: PathBuf,
    pub model_ids: Vec<String>,
    pub weight: f64,
    pub selected: bool,
}

/// What `--weights-out` writes and `--weights` reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightsFile {
    pub format: String,
    pub model_id: String,
    pub class_names: Vec<String>,
    pub members: Vec<WeightsMember>,
    pub select: Select,
    pub weighting: Weighting,
    /// Blended log loss on the fitting rows, for the record.
    pub log_loss: f64,
    pub fit_rows: usize,
}

impl WeightsFile {
    pub fn load(path: &Path) -> Result<WeightsFile, BlendError> {
        let text = std::fs::read_to_string(path).map_err(|e| BlendError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let bad = |reason: String| BlendError::WeightsFile {
            path: path.to_path_buf(),
            reason,
        };
        let w: WeightsFile = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if w.format != WEIGHTS_FORMAT {
            return Err(bad(format!(
                "format `{}`, expected `{WEIGHTS_FORMAT}`",
                w.format
            )));
        }
        if w.members.is_empty() || !w.members.iter().any(|m| m.selected) {
            return Err(bad("no member carries weight".into()));
        }
        if w.members
            .iter()
            .any(|m| !(m.weight.is_finite() && m.weight >= 0.0))
        {
            return Err(bad("weights must be finite and non-negative".into()));
        }
        Ok(w)
    }

    fn save(&self, path: &Path) -> Result<(), BlendError> {
        write_json(path, &serde_json::to_value(self).expect("serialisable"))
    }
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<(), BlendError> {
    let io = |e: std::io::Error| BlendError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let json = serde_json::to_string_pretty(v).expect("serialisable");
    plankton_core::fsx::write_atomic(path, json.as_bytes()).map_err(|e| io(e.source))
}

struct Member {
    path: PathBuf,
    p: Predictions,
}

/// Reads the members; all must exist, be distinct and share the first one's classes.
fn read_members(
    paths: &[PathBuf],
    classes: Option<(&[String], &Path)>,
) -> Result<Vec<Member>, BlendError> {
    if paths.is_empty() {
        return Err(BlendError::NoMembers);
    }
    let mut seen = Vec::new();
    for p in paths {
        let key = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
        if seen.contains(&key) {
            return Err(BlendError::Duplicate { path: p.clone() });
        }
        seen.push(key);
    }
    let mut members: Vec<Member> = Vec::with_capacity(paths.len());
    for path in paths {
        let p = Predictions::read(path)?;
        let reference = match (classes, members.first()) {
            (Some((names, from)), _) => Some((names, from)),
            (None, Some(first)) => Some((first.p.class_names.as_slice(), first.path.as_path())),
            (None, None) => None,
        };
        if let Some((names, from)) = reference {
            if let Some(detail) = class_difference(names, &p.class_names) {
                return Err(BlendError::ClassMismatch {
                    path: path.clone(),
                    reference: from.to_path_buf(),
                    detail,
                });
            }
        }
        members.push(Member {
            path: path.clone(),
            p,
        });
    }
    Ok(members)
}

fn class_difference(want: &[String], got: &[String]) -> Option<String> {
    if want.len() != got.len() {
        return Some(format!("{} classes, expected {}", got.len(), want.len()));
    }
    want.iter().zip(got).position(|(a, b)| a != b).map(|i| {
        format!(
            "class {i} is `{}`, expected `{}` (same classes in the same order are needed)",
            got[i], want[i]
        )
    })
}

/// One output row: where each member has it.
struct Aligned {
    image_id: String,
    source_path: String,
    /// Row index in each member's file.
    slots: Vec<Option<usize>>,
}

fn align(members: &[Member]) -> Vec<Aligned> {
    let k = members.len();
    let mut out: Vec<Aligned> = Vec::new();
    let mut index = plankton_core::rows::RowIndex::<usize>::new();
    for (j, m) in members.iter().enumerate() {
        for (ri, r) in m.p.rows.iter().enumerate() {
            let found = index
                .get(&r.source_path, &r.image_id)
                .copied()
                .filter(|&o| out[o].slots[j].is_none());
            let o = match found {
                Some(o) => o,
                None => {
                    let o = out.len();
                    out.push(Aligned {
                        image_id: r.image_id.clone(),
                        source_path: r.source_path.clone(),
                        slots: vec![None; k],
                    });
                    index.insert(&r.source_path, &r.image_id, o);
                    o
                }
            };
            out[o].slots[j] = Some(ri);
        }
    }
    out
}

fn file_name(p: &Path) -> String {
    p.file_name().map_or_else(
        || p.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

impl Aligned {
    /// Each member's probabilities, or why the row cannot be blended.
    fn probabilities<'a>(&self, members: &'a [Member]) -> Result<Vec<&'a [f32]>, String> {
        let mut probs = Vec::with_capacity(members.len());
        let mut why = Vec::new();
        for (m, slot) in members.iter().zip(&self.slots) {
            match slot.map(|i| &m.p.rows[i]) {
                None => why.push(format!("not in {}", file_name(&m.path))),
                Some(PredictionRow {
                    probabilities: Some(p),
                    ..
                }) => probs.push(p.as_slice()),
                Some(r) => why.push(format!(
                    "{}: {}",
                    file_name(&m.path),
                    r.error.as_deref().unwrap_or("no prediction")
                )),
            }
        }
        if why.is_empty() {
            Ok(probs)
        } else {
            Err(format!("not blended: {}", why.join("; ")))
        }
    }

    /// The first label any member's row carries.
    fn row_label(&self, members: &[Member]) -> Option<String> {
        members
            .iter()
            .zip(&self.slots)
            .find_map(|(m, s)| s.and_then(|i| m.p.rows[i].label.clone()))
    }

    fn views(&self, members: &[Member]) -> u16 {
        members
            .iter()
            .zip(&self.slots)
            .filter_map(|(m, s)| s.map(|i| m.p.rows[i].views))
            .fold(0u16, |a, v| a.saturating_add(v))
    }
}

/// A stable id for the blend: FNV-1a over the member model ids and the weights' bits.
fn blend_model_id(members: &[WeightsMember]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    };
    for m in members {
        for id in &m.model_ids {
            eat(id.as_bytes());
            eat(&[0]);
        }
        eat(&m.weight.to_bits().to_le_bytes());
    }
    format!("blend@{h:016x}")
}

struct Written {
    rows: usize,
    error_rows: usize,
}

/// Writes every aligned row into `w`: blended with `weights` where all members predicted it,
/// an error row otherwise.
fn write_blend(
    mut w: PredictionWriter,
    members: &[Member],
    rows: &[Aligned],
    weights: &[f64],
    label_of: impl Fn(usize, &Aligned) -> Option<String>,
) -> Result<Written, BlendError> {
    let mut error_rows = 0;
    for (i, a) in rows.iter().enumerate() {
        let (probabilities, error) = match a.probabilities(members) {
            Ok(p) => (Some(blend(&p, weights)), None),
            Err(e) => {
                error_rows += 1;
                (None, Some(e))
            }
        };
        w.push(PredictionRow {
            image_id: a.image_id.clone(),
            source_path: a.source_path.clone(),
            label: label_of(i, a),
            views: if probabilities.is_some() {
                a.views(members)
            } else {
                0
            },
            probabilities,
            error,
            unknown: Default::default(),
        })?;
    }
    Ok(Written {
        rows: w.finish()?,
        error_rows,
    })
}

fn metadata(w: &WeightsFile, extra: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "blend": {
            "members": w.members.iter().map(|m| serde_json::json!({
                "file": m.file, "model_ids": m.model_ids, "weight": m.weight, "selected": m.selected,
            })).collect::<Vec<_>>(),
            "select": w.select,
            "weighting": w.weighting,
            "fit_log_loss": w.log_loss,
            "fit_rows": w.fit_rows,
            "details": extra,
        }
    })
}

/// Fit mode: labels from `data` (or the label column), member selection, weights, and the
/// blended validation predictions.
pub fn fit(opts: &FitOptions) -> Result<FitSummary, BlendError> {
    let members = read_members(&opts.predictions, None)?;
    let class_names = members[0].p.class_names.clone();
    let classes = class_names.len();
    let rows = align(&members);

    // True classes, by the first member's source paths (a blended row always has one).
    let labelled = load_labelled(&members[0].path, &opts.data)?;
    let label_by_path: HashMap<&str, usize> = labelled
        .paths
        .iter()
        .map(String::as_str)
        .zip(labelled.labels.iter().copied())
        .collect();
    let mut member_probs: Vec<Vec<f32>> = vec![Vec::new(); members.len()];
    let mut labels = Vec::new();
    let mut label_of_row: Vec<Option<usize>> = vec![None; rows.len()];
    let mut unlabelled_rows = 0;
    for (i, a) in rows.iter().enumerate() {
        let Ok(probs) = a.probabilities(&members) else {
            continue;
        };
        let first = &members[0].p.rows[a.slots[0].expect("blended rows are in every member")];
        match label_by_path.get(first.source_path.as_str()) {
            Some(&l) => {
                for (acc, p) in member_probs.iter_mut().zip(&probs) {
                    acc.extend_from_slice(p);
                }
                labels.push(l);
                label_of_row[i] = Some(l);
            }
            None => unlabelled_rows += 1,
        }
    }
    if labels.is_empty() {
        return Err(BlendError::Member {
            path: members[0].path.clone(),
            reason: "no row with a known class is predicted by every member: are these predictions of the same images?".into(),
        });
    }
    let refs: Vec<&[f32]> = member_probs.iter().map(|v| v.as_slice()).collect();
    let terms = LabelTerms::new(&refs, &labels, classes);
    let single: Vec<f64> = refs
        .iter()
        .map(|p| kaggle_log_loss(p, &labels, classes))
        .collect();

    let all: Vec<usize> = (0..members.len()).collect();
    let selection = match opts.select {
        Select::All => None,
        Select::Cv => Some(forward_select(
            &terms,
            &labels,
            opts.folds,
            CV_SEED,
            opts.weighting,
            &opts.lbfgs,
        )?),
    };
    let selected: Vec<usize> = selection
        .as_ref()
        .map_or(all.clone(), |s| s.chosen().to_vec());
    let fit_set = terms.subset(&(0..terms.rows).collect::<Vec<_>>(), &selected);
    let fit = match opts.weighting {
        Weighting::Fitted => fit_terms(&fit_set, &opts.lbfgs),
        Weighting::Uniform => uniform_fit(&fit_set),
    };
    let mut weights = vec![0.0; members.len()];
    let mut w_raw = vec![None; members.len()];
    for (s, &k) in selected.iter().enumerate() {
        weights[k] = fit.weights[s];
        w_raw[k] = Some(fit.w_raw[s]);
    }
    let blended = blend(&refs, &weights);
    let log_loss = kaggle_log_loss(&blended, &labels, classes);

    let mut wf = WeightsFile {
        format: WEIGHTS_FORMAT.into(),
        model_id: String::new(),
        class_names: class_names.clone(),
        members: members
            .iter()
            .enumerate()
            .map(|(k, m)| WeightsMember {
                file: m.path.clone(),
                model_ids: m.p.model_ids.clone(),
                weight: weights[k],
                selected: w_raw[k].is_some(),
            })
            .collect(),
        select: opts.select,
        weighting: opts.weighting,
        log_loss,
        fit_rows: labels.len(),
    };
    wf.model_id = blend_model_id(&wf.members);
    let best_single = (0..single.len()).fold(0, |b, k| if single[k] < single[b] { k } else { b });
    let details = serde_json::json!({
        "folds": selection.as_ref().map(|s| s.folds),
        "chosen_size": selection.as_ref().map(|s| s.chosen_size),
        "single_log_loss": single,
        "iterations": fit.iterations,
        "converged": fit.converged,
    });
    let writer = PredictionWriter::create(
        &opts.out,
        class_names.clone(),
        &wf.model_id,
        &metadata(&wf, details),
        opts.top_k,
    )?;
    let written = write_blend(writer, &members, &rows, &weights, |i, a| {
        label_of_row[i]
            .map(|l| class_names[l].clone())
            .or_else(|| a.row_label(&members))
    })?;
    if let Some(p) = &opts.weights_out {
        wf.save(p)?;
    }
    let report = BlendReport {
        model_id: wf.model_id.clone(),
        class_names,
        members: members
            .iter()
            .enumerate()
            .map(|(k, m)| MemberReport {
                file: m.path.clone(),
                model_ids: m.p.model_ids.clone(),
                single_log_loss: single[k],
                weight: weights[k],
                w_raw: w_raw[k],
                selected: w_raw[k].is_some(),
            })
            .collect(),
        select: opts.select,
        weighting: opts.weighting,
        selection,
        fit,
        log_loss,
        best_single,
        fit_rows: labels.len(),
        unlabelled_rows,
        rows: written.rows,
        error_rows: written.error_rows,
    };
    if let Some(p) = &opts.report {
        write_json(p, &serde_json::to_value(&report).expect("serialisable"))?;
    }
    Ok(FitSummary {
        report,
        out: opts.out.clone(),
        weights_out: opts.weights_out.clone(),
        report_path: opts.report.clone(),
    })
}

impl FitSummary {
    /// The table `plankton blend` prints.
    pub fn render(&self) -> String {
        let r = &self.report;
        let name = |k: usize| r.members[k].file.display().to_string();
        let width = (0..r.members.len())
            .map(|k| name(k).len())
            .max()
            .unwrap_or(0)
            .max(6);
        let how = match (r.select, r.weighting) {
            (Select::Cv, w) => format!(
                "{}-fold CV forward selection, {} weights",
                r.selection.as_ref().map_or(0, |s| s.folds),
                weighting_name(w)
            ),
            (Select::All, w) => format!("all members, {} weights", weighting_name(w)),
        };
        let selected = r.members.iter().filter(|m| m.selected).count();
        let mut t = format!(
            "blend of {selected} of {} members on {} labelled images ({how}):\n",
            r.members.len(),
            r.fit_rows
        );
        t.push_str(&format!(
            "  {:<width$}  {:>15}  {:>8}\n",
            "member", "single log loss", "weight"
        ));
        for (k, m) in r.members.iter().enumerate() {
            t.push_str(&format!(
                "  {:<width$}  {:>15.5}  {:>8}\n",
                name(k),
                m.single_log_loss,
                if m.selected {
                    format!("{:.4}", m.weight)
                } else {
                    "-".into()
                }
            ));
        }
        if let Some(s) = &r.selection {
            t.push_str(&format!(
                "forward selection ({}-fold CV log loss on the validation images):\n",
                s.folds
            ));
            t.push_str("  size  CV log loss  added\n");
            for st in &s.steps {
                t.push_str(&format!(
                    "  {:>4}  {:>11.5}  {}{}\n",
                    st.size,
                    st.cv_log_loss,
                    name(st.added),
                    if st.size == s.chosen_size {
                        "  <- chosen"
                    } else {
                        ""
                    }
                ));
            }
        }
        let fit = match (r.fit.stop, r.weighting) {
            (_, Weighting::Uniform) => String::new(),
            (None, _) => "; one member, nothing to fit".into(),
            (Some(stop), _) => format!(
                "; L-BFGS {} iterations, {}",
                r.fit.iterations,
                if r.fit.converged {
                    "converged".to_string()
                } else {
                    format!("NOT converged ({stop:?})")
                }
            ),
        };
        t.push_str(&format!(
            "blended log loss {:.5} on {} images (best single {:.5}: {}){fit}\n",
            r.log_loss,
            r.fit_rows,
            r.members[r.best_single].single_log_loss,
            name(r.best_single)
        ));
        t.push_str(&format!(
            "wrote {} rows ({}) -> {}",
            r.rows,
            r.model_id,
            self.out.display()
        ));
        if r.error_rows > 0 || r.unlabelled_rows > 0 {
            t.push_str(&format!(" ({} error rows not predicted by every member, {} blended rows without a known class)", r.error_rows, r.unlabelled_rows));
        }
        t.push('\n');
        if let Some(p) = &self.weights_out {
            t.push_str(&format!("weights: {}\n", p.display()));
        }
        if let Some(p) = &self.report_path {
            t.push_str(&format!("report: {}\n", p.display()));
        }
        t
    }
}

fn weighting_name(w: Weighting) -> &'static str {
    match w {
        Weighting::Fitted => "fitted",
        Weighting::Uniform => "uniform",
    }
}

/// `plankton blend --weights` (apply mode).
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    pub weights: PathBuf,
    /// Predictions of the weights file's members, in its order: all of them, or only those
    /// with weight.
    pub predictions: Vec<PathBuf>,
    pub out: PathBuf,
    /// Accept a file whose model ids differ from the member's (e.g. the bagged version of a
    /// member, as the reference substituted on the test set).
    pub allow_other_models: bool,
    pub top_k: usize,
}

impl ApplyOptions {
    pub fn new(weights: &Path, predictions: Vec<PathBuf>, out: &Path) -> ApplyOptions {
        ApplyOptions {
            weights: weights.to_path_buf(),
            predictions,
            out: out.to_path_buf(),
            allow_other_models: false,
            top_k: 5,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ApplySummary {
    pub out: PathBuf,
    pub model_id: String,
    /// Each file given and its weight.
    pub members: Vec<(PathBuf, f64)>,
    pub rows: usize,
    pub error_rows: usize,
    /// Log loss on the blended rows whose `label` column is set, and how many.
    pub labelled: Option<(usize, f64)>,
}

pub fn apply(opts: &ApplyOptions) -> Result<ApplySummary, BlendError> {
    let wf = WeightsFile::load(&opts.weights)?;
    let selected: Vec<usize> = (0..wf.members.len())
        .filter(|&k| wf.members[k].selected)
        .collect();
    let given = opts.predictions.len();
    let which: Vec<usize> = if given == wf.members.len() {
        (0..wf.members.len()).collect()
    } else if given == selected.len() {
        selected.clone()
    } else {
        let list = |ks: &[usize]| {
            ks.iter()
                .map(|&k| file_name(&wf.members[k].file))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(BlendError::WeightsFile {
            path: opts.weights.clone(),
            reason: format!(
                "{given} predictions files given, but it blends {} members ({}) of which {} carry weight ({}): pass the predictions of all of them, or of the weighted ones, in this order",
                wf.members.len(),
                list(&(0..wf.members.len()).collect::<Vec<_>>()),
                selected.len(),
                list(&selected)
            ),
        });
    };
    let members = read_members(&opts.predictions, Some((&wf.class_names, &opts.weights)))?;
    for (m, &k) in members.iter().zip(&which) {
        let stored = &wf.members[k];
        let shared = m.p.model_ids.iter().any(|id| stored.model_ids.contains(id));
        if !opts.allow_other_models
            && !shared
            && !m.p.model_ids.is_empty()
            && !stored.model_ids.is_empty()
        {
            return Err(BlendError::Member {
                path: m.path.clone(),
                reason: format!(
                    "predictions of model {}, but member {} of {} was fitted on predictions of model {} ({}): give the files in the weights file's order, or pass --allow-other-models for another model standing in for it (e.g. its bagged version)",
                    m.p.model_ids.join(", "),
                    k + 1,
                    opts.weights.display(),
                    stored.model_ids.join(", "),
                    stored.file.display()
                ),
            });
        }
    }
    let weights: Vec<f64> = which.iter().map(|&k| wf.members[k].weight).collect();
    let rows = align(&members);
    let meta = metadata(
        &wf,
        serde_json::json!({
            "weights_file": opts.weights,
            "applied_to": opts.predictions,
        }),
    );
    let writer = PredictionWriter::create(
        &opts.out,
        wf.class_names.clone(),
        &wf.model_id,
        &meta,
        opts.top_k,
    )?;
    let written = write_blend(writer, &members, &rows, &weights, |_, a| {
        a.row_label(&members)
    })?;

    // Score the rows that carry their class (e.g. blended validation predictions).
    let index: HashMap<&str, usize> = wf
        .class_names
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i))
        .collect();
    let (mut probs, mut labels) = (Vec::new(), Vec::new());
    for a in &rows {
        let (Ok(p), Some(l)) = (a.probabilities(&members), a.row_label(&members)) else {
            continue;
        };
        if let Some(&l) = index.get(l.as_str()) {
            probs.extend(blend(&p, &weights));
            labels.push(l);
        }
    }
    let labelled = (!labels.is_empty()).then(|| {
        (
            labels.len(),
            kaggle_log_loss(&probs, &labels, wf.class_names.len()),
        )
    });
    Ok(ApplySummary {
        out: opts.out.clone(),
        model_id: wf.model_id.clone(),
        members: members
            .iter()
            .map(|m| m.path.clone())
            .zip(weights)
            .collect(),
        rows: written.rows,
        error_rows: written.error_rows,
        labelled,
    })
}

impl ApplySummary {
    pub fn render(&self) -> String {
        let mut t = format!("blend {}:\n", self.model_id);
        for (p, w) in &self.members {
            t.push_str(&format!("  {:>8.4}  {}\n", w, p.display()));
        }
        if let Some((n, l)) = self.labelled {
            t.push_str(&format!(
                "log loss {l:.5} on the {n} blended rows with a known class\n"
            ));
        }
        t.push_str(&format!(
            "wrote {} rows -> {}",
            self.rows,
            self.out.display()
        ));
        if self.error_rows > 0 {
            t.push_str(&format!(
                " ({} error rows not predicted by every member)",
                self.error_rows
            ));
        }
        t.push('\n');
        t
    }
}
