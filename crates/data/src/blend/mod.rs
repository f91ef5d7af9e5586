//! Ensemble blending of prediction files (SPEC "Ensembling"): the blend is sum_k w_k P_k with
//! w = softmax(W), W chosen from 0 by L-BFGS to minimise the Kaggle log loss of the blend on
//! labelled validation predictions, as the reference's `ensemble_predictions.py` did with
//! scipy's `fmin_l_bfgs_b`. Members are chosen by greedy forward selection scored by K-fold
//! cross-validation on the same validation rows ([`select`]); [`job`] reads and writes the
//! Parquet files and the weights file `plankton blend` uses.
//!
//! The log loss of a blend only depends, per row, on the members' probabilities of the true
//! class and on their row sums (Kaggle divides each row by its sum before clipping), so the fit
//! works on an n x K table of those ([`LabelTerms`]) instead of n x K x C probabilities: one
//! evaluation costs O(nK) whatever the number of classes.

pub mod job;
pub use plankton_core::lbfgs;
pub mod select;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::evaluate::EvaluateError;
use crate::sinks::parquet::ParquetSinkError;
use crate::split::SplitError;
use plankton_core::scoring::KAGGLE_EPS;

pub use job::{
    apply, fit, ApplyOptions, ApplySummary, BlendReport, FitOptions, FitSummary, WeightsFile,
};
pub use select::{forward_select, Select, Selection, SizeStep, Weighting};

#[derive(Debug, thiserror::Error)]
pub enum BlendError {
    #[error(transparent)]
    Predictions(#[from] ParquetSinkError),
    #[error(transparent)]
    Labels(#[from] EvaluateError),
    #[error(transparent)]
    Folds(#[from] SplitError),
    #[error("blend needs at least one predictions file (--predictions)")]
    NoMembers,
    #[error("{path}: given twice in --predictions")]
    Duplicate { path: PathBuf },
    #[error("{path}: its classes differ from those of {reference}: {detail}")]
    ClassMismatch {
        path: PathBuf,
        reference: PathBuf,
        detail: String,
    },
    #[error("{path}: {reason}")]
    Member { path: PathBuf, reason: String },
    #[error("{path}: not a blend weights file: {reason}")]
    WeightsFile { path: PathBuf, reason: String },
    #[error("only {rows} labelled rows predicted by every member: {folds}-fold cross-validation needs at least {folds} (pass a lower --folds or --select all)")]
    TooFewRows { rows: usize, folds: usize },
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
}

/// Fitted blend weights and what they score on the fitting rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlendFit {
    /// softmax(W): non-negative, summing to 1.
    pub weights: Vec<f64>,
    /// W. Only defined up to a constant shift (softmax forgets it): compare weights, not W.
    pub w_raw: Vec<f64>,
    /// Kaggle log loss of the (f64) blend on the fitting rows.
    pub log_loss: f64,
    pub iterations: usize,
    pub evaluations: usize,
    pub converged: bool,
    /// None for fits that did not run the optimiser (one member, uniform weights, no rows).
    pub stop: Option<lbfgs::Stop>,
}

/// Per row i and member k: the probability of the true class, a_ik, and the row sum, s_ik.
/// The blended Kaggle loss of row i is -ln(clip(sum_k w_k a_ik / sum_k w_k s_ik)).
#[derive(Debug, Clone, PartialEq)]
pub struct LabelTerms {
    pub rows: usize,
    pub members: usize,
    /// Row-major rows x members.
    a: Vec<f64>,
    s: Vec<f64>,
}

impl LabelTerms {
    /// `members[k]` is row-major `labels.len() x classes`.
    pub fn new(members: &[&[f32]], labels: &[usize], classes: usize) -> LabelTerms {
        let rows = labels.len();
        for m in members {
            assert_eq!(
                m.len(),
                rows * classes,
                "each member must be rows x classes"
            );
        }
        let k = members.len();
        let (mut a, mut s) = (vec![0.0; rows * k], vec![0.0; rows * k]);
        for (j, m) in members.iter().enumerate() {
            for (i, row) in m.chunks_exact(classes).enumerate() {
                a[i * k + j] = row[labels[i]] as f64;
                s[i * k + j] = row.iter().map(|&p| p as f64).sum();
            }
        }
        LabelTerms {
            rows,
            members: k,
            a,
            s,
        }
    }

    /// The table restricted to some rows and members (in the order given).
    pub fn subset(&self, rows: &[usize], members: &[usize]) -> LabelTerms {
        let k = members.len();
        let (mut a, mut s) = (
            Vec::with_capacity(rows.len() * k),
            Vec::with_capacity(rows.len() * k),
        );
        for &i in rows {
            for &j in members {
                a.push(self.a[i * self.members + j]);
                s.push(self.s[i * self.members + j]);
            }
        }
        LabelTerms {
            rows: rows.len(),
            members: k,
            a,
            s,
        }
    }

    /// Sum over rows of the clipped blended loss; with `grad`, also d(sum)/dw (a clipped row
    /// contributes nothing, as the gradient of a clip is 0 outside its range).
    fn total(&self, w: &[f64], mut grad: Option<&mut [f64]>) -> f64 {
        let k = self.members;
        if let Some(g) = grad.as_deref_mut() {
            g.iter_mut().for_each(|v| *v = 0.0);
        }
        let mut total = 0.0;
        for (a, s) in self.a.chunks_exact(k).zip(self.s.chunks_exact(k)) {
            let q: f64 = a.iter().zip(w).map(|(a, w)| a * w).sum();
            let r: f64 = s.iter().zip(w).map(|(s, w)| s * w).sum();
            let p = q / r;
            let clipped = p.clamp(KAGGLE_EPS, 1.0 - KAGGLE_EPS);
            total -= clipped.ln();
            if let Some(g) = grad.as_deref_mut() {
                if p > KAGGLE_EPS && p < 1.0 - KAGGLE_EPS {
                    for j in 0..k {
                        g[j] += s[j] / r - a[j] / q;
                    }
                }
            }
        }
        total
    }

    /// Mean Kaggle log loss of the blend with weights `w` (one per member).
    pub fn log_loss(&self, w: &[f64]) -> f64 {
        assert_eq!(w.len(), self.members, "one weight per member");
        self.total(w, None) / self.rows as f64
    }

    /// Mean loss as a function of W (w = softmax(W)) and its gradient in W.
    pub fn loss_and_gradient(&self, w_raw: &[f64], grad: &mut [f64]) -> f64 {
        let w = softmax(w_raw);
        let n = self.rows as f64;
        let loss = self.total(&w, Some(grad)) / n;
        // Through the softmax: dL/dW_j = w_j (g_j - sum_k w_k g_k).
        let mean: f64 = grad.iter().zip(&w).map(|(g, w)| g * w).sum();
        for (g, w) in grad.iter_mut().zip(&w) {
            *g = w * (*g - mean) / n;
        }
        loss
    }
}

/// softmax of a vector, shifted by its maximum so large W neither overflow nor lose precision.
pub fn softmax(w: &[f64]) -> Vec<f64> {
    let m = w.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
    let e: Vec<f64> = w.iter().map(|&v| (v - m).exp()).collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|v| v / z).collect()
}

/// Equal weights; the loss they score on `terms`.
pub fn uniform_fit(terms: &LabelTerms) -> BlendFit {
    let k = terms.members;
    let weights = vec![1.0 / k as f64; k];
    BlendFit {
        log_loss: if terms.rows == 0 {
            f64::NAN
        } else {
            terms.log_loss(&weights)
        },
        weights,
        w_raw: vec![0.0; k],
        iterations: 0,
        evaluations: 0,
        converged: true,
        stop: None,
    }
}

/// Fits W from 0 on a precomputed table; see [`fit_weights`].
pub fn fit_terms(terms: &LabelTerms, opts: &lbfgs::Options) -> BlendFit {
    assert!(terms.members > 0, "no members to blend");
    if terms.members == 1 || terms.rows == 0 {
        return uniform_fit(terms);
    }
    let m = lbfgs::minimize(
        |w, g| terms.loss_and_gradient(w, g),
        &vec![0.0; terms.members],
        opts,
    );
    let weights = softmax(&m.x);
    BlendFit {
        log_loss: terms.log_loss(&weights),
        weights,
        w_raw: m.x,
        iterations: m.iterations,
        evaluations: m.evaluations,
        converged: m.stop.converged(),
        stop: Some(m.stop),
    }
}

/// The weights w = softmax(W) minimising the Kaggle log loss of sum_k w_k P_k on `labels`,
/// found by L-BFGS from W = 0 with scipy's settings as the reference used them.
/// `members[k]` is row-major `labels.len() x classes`.
pub fn fit_weights(members: &[&[f32]], labels: &[usize], classes: usize) -> BlendFit {
    fit_weights_with(members, labels, classes, &lbfgs::Options::default())
}

pub fn fit_weights_with(
    members: &[&[f32]],
    labels: &[usize],
    classes: usize,
    opts: &lbfgs::Options,
) -> BlendFit {
    fit_terms(&LabelTerms::new(members, labels, classes), opts)
}

/// sum_k w_k P_k, accumulated in f64. Rows are not renormalised: with weights summing to 1 a
/// blend of normalised rows is normalised, as in the reference.
pub fn blend(members: &[&[f32]], weights: &[f64]) -> Vec<f32> {
    assert_eq!(members.len(), weights.len(), "one weight per member");
    assert!(!members.is_empty(), "no members to blend");
    let len = members[0].len();
    let mut acc = vec![0.0f64; len];
    for (m, &w) in members.iter().zip(weights) {
        assert_eq!(m.len(), len, "members must have the same shape");
        if w == 0.0 {
            continue;
        }
        acc.iter_mut()
            .zip(m.iter())
            .for_each(|(a, &p)| *a += w * p as f64);
    }
    acc.into_iter().map(|v| v as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use plankton_core::scoring::kaggle_log_loss;

    fn members() -> (Vec<Vec<f32>>, Vec<usize>) {
        // Two members that are each right where the other is unsure.
        let a = vec![0.7, 0.2, 0.1, 0.3, 0.4, 0.3, 0.6, 0.3, 0.1, 0.2, 0.2, 0.6];
        let b = vec![0.4, 0.3, 0.3, 0.1, 0.8, 0.1, 0.3, 0.4, 0.3, 0.1, 0.1, 0.8];
        (vec![a, b], vec![0, 1, 0, 2])
    }

    #[test]
    fn loss_matches_the_scorer_and_gradient_matches_differences() {
        let (m, labels) = members();
        let refs: Vec<&[f32]> = m.iter().map(|v| v.as_slice()).collect();
        let t = LabelTerms::new(&refs, &labels, 3);
        let w_raw = [0.3, -0.2];
        let w = softmax(&w_raw);
        let blended = blend(&refs, &w);
        assert!((t.log_loss(&w) - kaggle_log_loss(&blended, &labels, 3)).abs() < 1e-7);
        let mut g = [0.0; 2];
        t.loss_and_gradient(&w_raw, &mut g);
        for j in 0..2 {
            let h = 1e-6;
            let (mut up, mut down) = (w_raw, w_raw);
            up[j] += h;
            down[j] -= h;
            let mut tmp = [0.0; 2];
            let fd = (t.loss_and_gradient(&up, &mut tmp) - t.loss_and_gradient(&down, &mut tmp))
                / (2.0 * h);
            assert!((fd - g[j]).abs() < 1e-8, "{j}: {fd} vs {}", g[j]);
        }
    }

    #[test]
    fn fitted_weights_sum_to_one_and_beat_each_member() {
        let (m, labels) = members();
        let refs: Vec<&[f32]> = m.iter().map(|v| v.as_slice()).collect();
        let f = fit_weights(&refs, &labels, 3);
        assert!((f.weights.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(f.converged, "{:?}", f.stop);
        for r in &refs {
            assert!(f.log_loss <= kaggle_log_loss(r, &labels, 3) + 1e-12);
        }
    }

    #[test]
    fn one_member_gets_all_the_weight() {
        let (m, labels) = members();
        let f = fit_weights(&[&m[0]], &labels, 3);
        assert_eq!(f.weights, vec![1.0]);
        assert!((f.log_loss - kaggle_log_loss(&m[0], &labels, 3)).abs() < 1e-12);
    }

    #[test]
    fn a_row_clipped_to_eps_adds_no_gradient() {
        // Both members give the true class of row 1 exactly 0.
        let a = [0.9f32, 0.1, 1.0, 0.0];
        let b = [0.5f32, 0.5, 1.0, 0.0];
        let t = LabelTerms::new(&[&a, &b], &[0, 1], 2);
        let only_first = LabelTerms::new(&[&a[..2], &b[..2]], &[0], 2);
        let (mut g, mut g1) = ([0.0; 2], [0.0; 2]);
        let l = t.loss_and_gradient(&[0.1, 0.0], &mut g);
        let l1 = only_first.loss_and_gradient(&[0.1, 0.0], &mut g1);
        assert!((l - (l1 - KAGGLE_EPS.ln()) / 2.0).abs() < 1e-12);
        assert!((g[0] - g1[0] / 2.0).abs() < 1e-15);
    }
}
