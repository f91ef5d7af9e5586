//! Which members go into the blend: greedy forward selection, each candidate ensemble scored by
//! K-fold cross-validation on the validation rows (weights fitted on K-1 folds, the log loss
//! measured on the held-out fold, pooled over all rows).
//!
//! The reference chose its members by hand from validation scores; SPEC asks for selection by
//! cross-validation on the validation set. Scoring held-out folds matters because the in-sample
//! loss of a fitted blend never gets worse when a member is added: every extra member would be
//! "selected". A member that is poor alone but errs where the others do not still lowers the
//! held-out loss, and is added; a near-copy of a member already in does not.

use serde::{Deserialize, Serialize};

use super::{fit_terms, lbfgs, uniform_fit, BlendError, LabelTerms};
use crate::split::{stratified_folds, Split};

/// `--select`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Select {
    /// Greedy forward selection by K-fold cross-validation on the validation rows.
    #[default]
    Cv,
    /// Every member given.
    All,
}

impl std::str::FromStr for Select {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cv" => Ok(Select::Cv),
            "all" => Ok(Select::All),
            _ => Err(format!("unknown selection `{s}`: expected cv or all")),
        }
    }
}

/// How a candidate ensemble's weights are set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Weighting {
    /// softmax(W) fitted by L-BFGS.
    #[default]
    Fitted,
    /// 1 / K each.
    Uniform,
}

impl Weighting {
    fn fit(self, terms: &LabelTerms, opts: &lbfgs::Options) -> Vec<f64> {
        match self {
            Weighting::Fitted => fit_terms(terms, opts).weights,
            Weighting::Uniform => uniform_fit(terms).weights,
        }
    }
}

/// The best ensemble of one size found by forward selection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SizeStep {
    pub size: usize,
    /// The member added at this size (index into the members given).
    pub added: usize,
    /// All members of the ensemble, in the order they were added.
    pub members: Vec<usize>,
    pub cv_log_loss: f64,
}

/// Forward selection from 1 to all members.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Selection {
    pub folds: usize,
    pub seed: u64,
    pub steps: Vec<SizeStep>,
    /// The size with the lowest CV loss (the smallest, if a larger one only ties it).
    pub chosen_size: usize,
}

impl Selection {
    /// Members of the chosen ensemble, in the order they were added.
    pub fn chosen(&self) -> &[usize] {
        &self.steps[self.chosen_size - 1].members
    }
}

/// A larger ensemble must beat a smaller one by this relative margin to be chosen. Fits stop
/// at a relative decrease of about 2e-9 (scipy's factr), so smaller differences are the
/// optimiser's, not the members': a near-copy of a member already in must not be chosen on them.
pub const TIE: f64 = 1e-6;

/// Pooled held-out log loss of the ensemble `members` over `folds`.
pub fn cv_log_loss(
    terms: &LabelTerms,
    members: &[usize],
    folds: &[Split],
    weighting: Weighting,
    opts: &lbfgs::Options,
) -> f64 {
    let (mut total, mut n) = (0.0, 0usize);
    for f in folds {
        let w = weighting.fit(&terms.subset(&f.train, members), opts);
        let held = terms.subset(&f.valid, members);
        total += held.log_loss(&w) * held.rows as f64;
        n += held.rows;
    }
    total / n as f64
}

/// Greedy forward selection over all `terms.members` members: at each size, the member whose
/// addition gives the lowest CV loss (ties: the lower index). Folds are stratified by `labels`
/// and fixed by `seed`, the same for every candidate.
pub fn forward_select(
    terms: &LabelTerms,
    labels: &[usize],
    folds: usize,
    seed: u64,
    weighting: Weighting,
    opts: &lbfgs::Options,
) -> Result<Selection, BlendError> {
    assert_eq!(labels.len(), terms.rows, "one label per row");
    if terms.rows < folds {
        return Err(BlendError::TooFewRows {
            rows: terms.rows,
            folds,
        });
    }
    let labels32: Vec<u32> = labels.iter().map(|&l| l as u32).collect();
    let splits = stratified_folds(&labels32, folds, seed)?;
    let mut chosen: Vec<usize> = Vec::new();
    let mut steps = Vec::new();
    let mut remaining: Vec<usize> = (0..terms.members).collect();
    while !remaining.is_empty() {
        let losses = plankton_core::par::map(0, &remaining, |&c| {
            let mut ens = chosen.clone();
            ens.push(c);
            cv_log_loss(terms, &ens, &splits, weighting, opts)
        });
        let (best, loss) = remaining
            .iter()
            .zip(&losses)
            // A NaN loss (a degenerate fold) ranks last.
            .map(|(&c, &l)| (c, if l.is_nan() { f64::INFINITY } else { l }))
            .fold(None::<(usize, f64)>, |acc, (c, l)| match acc {
                Some((_, bl)) if l >= bl => acc,
                _ => Some((c, l)),
            })
            .expect("a candidate");
        chosen.push(best);
        remaining.retain(|&c| c != best);
        steps.push(SizeStep {
            size: chosen.len(),
            added: best,
            members: chosen.clone(),
            cv_log_loss: loss,
        });
    }
    let min = steps
        .iter()
        .map(|s| s.cv_log_loss)
        .fold(f64::INFINITY, f64::min);
    let chosen_size = steps
        .iter()
        .find(|s| s.cv_log_loss <= min + TIE * min.abs().max(1.0))
        .map_or(steps.len(), |s| s.size);
    Ok(Selection {
        folds,
        seed,
        steps,
        chosen_size,
    })
}
