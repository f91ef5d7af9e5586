//! Late fusion of stored convnet predictions with image features (SPEC.md "Extra image features
//! and late fusion"; reference: benanne/kaggle-ndsb, the `featmomentsinfo_*` /
//! `featharalick_*` configurations, `train_fuse_blend.py`, `blend_momentsinfo_haralick.py`).
//!
//! Per feature set a small net maps the standardised features to a correction of the
//! convnet's log-probabilities (`softmax(log p + net(x))`); it is trained `repeats` times with
//! different seeds and the repeats' probabilities are averaged, then the sets' averages are
//! averaged uniformly. The convnets are never retrained: only their predictions files are read.
//!
//! `plankton fuse` fits on labelled (validation) predictions: K-fold cross-validation over those
//! rows gives honest out-of-fold fused predictions (written out, so a later blend can use them
//! without leakage) and the loss before/after; then the final nets are fitted on all rows and
//! stored in a model folder, which `plankton fuse --model` applies to other (test) predictions.

pub mod features;
pub mod job;
pub mod net;

use std::path::PathBuf;

pub use job::{apply, fit, ApplyOptions, FitOptions, FusionSummary};

#[derive(Debug, thiserror::Error)]
pub enum FusionError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{path}: not a plankton {what} file: {reason}")]
    Format {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error("{path}: feature set `{set}` is not there ({reason}); the file has: {}", if available.is_empty() { "no `<set>.<name>` columns".to_string() } else { available.join(", ") })]
    MissingSet {
        path: PathBuf,
        set: String,
        reason: String,
        available: Vec<String>,
    },
    #[error("{path}: its classes differ from {other}'s: {reason}")]
    ClassMismatch {
        path: PathBuf,
        other: PathBuf,
        reason: String,
    },
    #[error(transparent)]
    Predictions(#[from] crate::sinks::parquet::ParquetSinkError),
    #[error(transparent)]
    Labels(#[from] crate::evaluate::EvaluateError),
    #[error("{path}: {reason}")]
    TooFewRows { path: PathBuf, reason: String },
    #[error("{path}: not a usable fusion model: {reason}")]
    Model { path: PathBuf, reason: String },
    #[error("{0}")]
    Input(String),
}

impl FusionError {
    pub(crate) fn io(path: &std::path::Path, e: impl std::fmt::Display) -> FusionError {
        FusionError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }
}

/// The reference's L2 for its "moments info" net; every other set used its feature nets' 0.0002.
pub const L2_MOMENTS: f64 = 0.002;
pub const L2_DEFAULT: f64 = 0.0002;

/// One fusion group: a feature set and the L2 of its nets.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SetSpec {
    pub name: String,
    pub l2: f64,
}

impl SetSpec {
    /// `moments,haralick` or with explicit penalties `moments:0.002,haralick:0.0002`.
    pub fn parse_list(s: &str) -> Result<Vec<SetSpec>, FusionError> {
        let mut out: Vec<SetSpec> = Vec::new();
        for item in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (name, l2) = match item.split_once(':') {
                Some((n, l)) => {
                    let l2: f64 = l.trim().parse().map_err(|_| {
                        FusionError::Input(format!(
                            "--sets: `{item}`: the L2 after `:` is not a number"
                        ))
                    })?;
                    if !(l2.is_finite() && l2 >= 0.0) {
                        return Err(FusionError::Input(format!(
                            "--sets: `{item}`: the L2 must be >= 0"
                        )));
                    }
                    (n.trim(), l2)
                }
                None => (
                    item,
                    if item == "moments" {
                        L2_MOMENTS
                    } else {
                        L2_DEFAULT
                    },
                ),
            };
            if name.is_empty() || name.contains('.') {
                return Err(FusionError::Input(format!("--sets: `{item}` is not a set name (the part before the dot of a column such as `moments.orientation_deg`)")));
            }
            if out.iter().any(|x| x.name == name) {
                return Err(FusionError::Input(format!("--sets: `{name}` given twice")));
            }
            out.push(SetSpec {
                name: name.to_string(),
                l2,
            });
        }
        if out.is_empty() {
            return Err(FusionError::Input("--sets: no feature set given".into()));
        }
        Ok(out)
    }
}

/// Per-column mean and standard deviation, fitted on the rows a net is trained on and stored
/// with it, so that new rows are scaled exactly as the training rows were.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Standardisation {
    pub mean: Vec<f64>,
    pub sd: Vec<f64>,
}

impl Standardisation {
    /// Over the finite values of each column (population sd, as scikit-learn's StandardScaler
    /// that the reference used). A constant column gets sd 1 (it then maps to 0 and carries
    /// nothing, instead of dividing by zero); a column without a finite value gets mean 0, sd 1.
    pub fn fit<'a>(columns: usize, rows: impl Iterator<Item = &'a [f64]>) -> Standardisation {
        let mut n = vec![0usize; columns];
        let mut sum = vec![0.0f64; columns];
        let mut sq = vec![0.0f64; columns];
        let rows: Vec<&[f64]> = rows.collect();
        for r in &rows {
            for (j, &v) in r.iter().enumerate() {
                if v.is_finite() {
                    n[j] += 1;
                    sum[j] += v;
                }
            }
        }
        let mean: Vec<f64> = (0..columns)
            .map(|j| if n[j] > 0 { sum[j] / n[j] as f64 } else { 0.0 })
            .collect();
        // Two passes: the raw sizes and Haralick sums are large, a one-pass variance would cancel.
        for r in &rows {
            for (j, &v) in r.iter().enumerate() {
                if v.is_finite() {
                    sq[j] += (v - mean[j]).powi(2);
                }
            }
        }
        let sd = (0..columns)
            .map(|j| {
                let s = if n[j] > 0 {
                    (sq[j] / n[j] as f64).sqrt()
                } else {
                    0.0
                };
                if s > 0.0 && s.is_finite() {
                    s
                } else {
                    1.0
                }
            })
            .collect();
        Standardisation { mean, sd }
    }

    /// Appends the standardised row; a non-finite value (NaN from a degenerate image, or null)
    /// becomes 0, the column's mean. Returns how many values were imputed so.
    pub fn apply(&self, raw: &[f64], out: &mut Vec<f32>) -> usize {
        let mut imputed = 0;
        for ((&v, &m), &s) in raw.iter().zip(&self.mean).zip(&self.sd) {
            let z = (v - m) / s;
            if z.is_finite() {
                out.push(z as f32);
            } else {
                out.push(0.0);
                imputed += 1;
            }
        }
        imputed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_lists_take_the_reference_penalties_by_default() {
        let s = SetSpec::parse_list("moments, haralick,zernike:0.01").unwrap();
        assert_eq!(
            s[0],
            SetSpec {
                name: "moments".into(),
                l2: 0.002
            }
        );
        assert_eq!(
            s[1],
            SetSpec {
                name: "haralick".into(),
                l2: 0.0002
            }
        );
        assert_eq!(
            s[2],
            SetSpec {
                name: "zernike".into(),
                l2: 0.01
            }
        );
        assert!(SetSpec::parse_list("moments,moments").is_err());
        assert!(SetSpec::parse_list("moments:x").is_err());
        assert!(SetSpec::parse_list("haralick.d0").is_err());
        assert!(SetSpec::parse_list(" , ").is_err());
    }

    #[test]
    fn standardisation_handles_constant_and_missing_values() {
        let rows: Vec<Vec<f64>> = vec![
            vec![1.0, 5.0, f64::NAN],
            vec![3.0, 5.0, f64::NAN],
            vec![f64::NAN, 5.0, f64::NAN],
        ];
        let s = Standardisation::fit(3, rows.iter().map(|r| r.as_slice()));
        assert_eq!(s.mean, vec![2.0, 5.0, 0.0]);
        assert_eq!(s.sd, vec![1.0, 1.0, 1.0]);
        let mut out = Vec::new();
        assert_eq!(s.apply(&[3.0, 7.0, f64::INFINITY], &mut out), 1);
        assert_eq!(out, vec![1.0, 2.0, 0.0]);
    }
}
