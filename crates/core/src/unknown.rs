//! Scores of how unknown an image looks to a trained network (issue 17): higher is more
//! unknown, for every score, so one threshold rule serves all.
//!
//! | score | from | definition |
//! |---|---|---|
//! | `max_probability` | probabilities | `1 - max_c p_c` |
//! | `energy` | logits | `-logsumexp_c(f_c)` (Liu et al. 2020, temperature 1) |
//! | `mahalanobis` | penultimate features | `min_c (x - mu_c)' S^-1 (x - mu_c)`, class means and one shared covariance fitted on the training images (Lee et al. 2018) |
//!
//! And the measures that judge a score on known vs unknown images: AUROC (the probability that a
//! random unknown scores above a random known, ties counting half) and the threshold that keeps a
//! target fraction of known images below it.

use serde::{Deserialize, Serialize};

/// `1 - max p`: high when no class is likely.
pub fn max_probability(p: &[f32]) -> f64 {
    1.0 - p.iter().copied().fold(f32::MIN, f32::max) as f64
}

/// `-logsumexp(logits)`: high when every logit is low.
pub fn energy(logits: &[f32]) -> f64 {
    let m = logits.iter().copied().fold(f32::MIN, f32::max) as f64;
    let s: f64 = logits.iter().map(|&f| (f as f64 - m).exp()).sum();
    -(m + s.ln())
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum UnknownError {
    #[error("{0}")]
    Fit(String),
}

/// Class means and the shared precision matrix of penultimate features, stored with a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureSpace {
    pub dim: usize,
    /// One mean per class (row-major, classes x dim); a class without training images has none
    /// and is skipped when scoring.
    pub means: Vec<Option<Vec<f64>>>,
    /// The inverse of the shared (pooled within-class) covariance plus `ridge` on its diagonal,
    /// dim x dim row-major.
    pub precision: Vec<f64>,
    pub ridge: f64,
}

impl FeatureSpace {
    /// Fits class means and the pooled within-class covariance of `features` (rows x dim,
    /// row-major) with `labels`; `ridge` (relative to the mean variance) keeps it invertible.
    pub fn fit(
        features: &[f32],
        labels: &[u32],
        classes: usize,
        dim: usize,
        ridge: f64,
    ) -> Result<FeatureSpace, UnknownError> {
        let n = labels.len();
        if dim == 0 || features.len() != n * dim {
            return Err(UnknownError::Fit(format!(
                "{} feature values for {n} images of dimension {dim}",
                features.len()
            )));
        }
        let mut sums = vec![vec![0f64; dim]; classes];
        let mut counts = vec![0usize; classes];
        for (i, &l) in labels.iter().enumerate() {
            let l = l as usize;
            if l >= classes {
                return Err(UnknownError::Fit(format!(
                    "label {l} of image {i}: only {classes} classes"
                )));
            }
            counts[l] += 1;
            for (s, &x) in sums[l].iter_mut().zip(&features[i * dim..(i + 1) * dim]) {
                *s += x as f64;
            }
        }
        if n <= counts.iter().filter(|&&c| c > 0).count() {
            return Err(UnknownError::Fit(format!(
                "{n} images: too few to estimate a covariance around the class means"
            )));
        }
        let means: Vec<Option<Vec<f64>>> = sums
            .into_iter()
            .zip(&counts)
            .map(|(s, &c)| (c > 0).then(|| s.into_iter().map(|v| v / c as f64).collect()))
            .collect();
        let mut cov = vec![0f64; dim * dim];
        for (i, &l) in labels.iter().enumerate() {
            let mu = means[l as usize]
                .as_ref()
                .expect("a labelled class has a mean");
            let d: Vec<f64> = features[i * dim..(i + 1) * dim]
                .iter()
                .zip(mu)
                .map(|(&x, m)| x as f64 - m)
                .collect();
            for a in 0..dim {
                for b in 0..=a {
                    cov[a * dim + b] += d[a] * d[b];
                }
            }
        }
        let used = counts.iter().filter(|&&c| c > 0).count();
        let scale = 1.0 / (n - used) as f64;
        for a in 0..dim {
            for b in 0..=a {
                let v = cov[a * dim + b] * scale;
                cov[a * dim + b] = v;
                cov[b * dim + a] = v;
            }
        }
        let mean_var = (0..dim).map(|a| cov[a * dim + a]).sum::<f64>() / dim as f64;
        let added = ridge * mean_var.max(f64::MIN_POSITIVE);
        for a in 0..dim {
            cov[a * dim + a] += added;
        }
        let precision = invert_spd(&cov, dim).ok_or_else(|| {
            UnknownError::Fit(
                "the feature covariance is singular even with the ridge: a larger ridge is needed"
                    .into(),
            )
        })?;
        Ok(FeatureSpace {
            dim,
            means,
            precision,
            ridge,
        })
    }

    /// The smallest squared Mahalanobis distance of `x` to a class mean.
    pub fn mahalanobis(&self, x: &[f32]) -> f64 {
        assert_eq!(x.len(), self.dim, "feature dimension");
        let mut best = f64::INFINITY;
        let mut d = vec![0f64; self.dim];
        for mu in self.means.iter().flatten() {
            for ((di, &xi), m) in d.iter_mut().zip(x).zip(mu) {
                *di = xi as f64 - m;
            }
            let mut q = 0f64;
            for a in 0..self.dim {
                let row = &self.precision[a * self.dim..(a + 1) * self.dim];
                let s: f64 = row.iter().zip(&d).map(|(p, v)| p * v).sum();
                q += d[a] * s;
            }
            best = best.min(q);
        }
        best
    }
}

/// Inverse of a symmetric positive-definite matrix by Cholesky; None if it is not one.
fn invert_spd(m: &[f64], n: usize) -> Option<Vec<f64>> {
    // L L' = m
    let mut l = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = (0..j).map(|k| l[i * n + k] * l[j * n + k]).sum();
            if i == j {
                let v = m[i * n + i] - s;
                if v <= 0.0 || !v.is_finite() {
                    return None;
                }
                l[i * n + i] = v.sqrt();
            } else {
                l[i * n + j] = (m[i * n + j] - s) / l[j * n + j];
            }
        }
    }
    // inv(L) by forward substitution, then inv(m) = inv(L)' inv(L).
    let mut li = vec![0f64; n * n];
    for c in 0..n {
        for i in c..n {
            let s: f64 = (c..i).map(|k| l[i * n + k] * li[k * n + c]).sum();
            let rhs = if i == c { 1.0 } else { 0.0 };
            li[i * n + c] = (rhs - s) / l[i * n + i];
        }
    }
    let mut inv = vec![0f64; n * n];
    for a in 0..n {
        for b in 0..=a {
            let s: f64 = (a.max(b)..n).map(|k| li[k * n + a] * li[k * n + b]).sum();
            inv[a * n + b] = s;
            inv[b * n + a] = s;
        }
    }
    Some(inv)
}

/// AUROC of `scores` for telling unknown (`true`) from known images: the probability that a
/// random unknown scores higher than a random known one, ties counting half (the Mann-Whitney
/// statistic). None without images of both kinds.
pub fn auroc(scores: &[f64], unknown: &[bool]) -> Option<f64> {
    assert_eq!(scores.len(), unknown.len());
    let positives = unknown.iter().filter(|&&u| u).count();
    let negatives = unknown.len() - positives;
    if positives == 0 || negatives == 0 {
        return None;
    }
    // Average ranks (1-based) over ties.
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut ranks = vec![0f64; scores.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = rank;
        }
        i = j + 1;
    }
    let rank_sum: f64 = ranks
        .iter()
        .zip(unknown)
        .filter(|(_, &u)| u)
        .map(|(r, _)| r)
        .sum();
    let p = positives as f64;
    Some((rank_sum - p * (p + 1.0) / 2.0) / (p * negatives as f64))
}

/// The threshold above which an image is called unknown so that at most `false_unknown_rate`
/// of the `known` scores lie above it (the `1 - rate` quantile of the known scores, taken as
/// the smallest known score with at most that fraction above it).
pub fn threshold_for(known: &[f64], false_unknown_rate: f64) -> Option<f64> {
    if known.is_empty() || !(0.0..1.0).contains(&false_unknown_rate) {
        return None;
    }
    let mut s: Vec<f64> = known.to_vec();
    s.sort_by(f64::total_cmp);
    let allowed = (false_unknown_rate * s.len() as f64).floor() as usize;
    Some(s[s.len() - 1 - allowed])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_point_the_same_way() {
        assert!((max_probability(&[0.1, 0.7, 0.2]) - 0.3).abs() < 1e-6);
        assert!(max_probability(&[0.34, 0.33, 0.33]) > max_probability(&[0.9, 0.05, 0.05]));
        // Low logits everywhere are more unknown than one high logit.
        assert!(energy(&[-1.0, -1.0, -1.0]) > energy(&[8.0, -1.0, -1.0]));
        assert!((energy(&[0.0, 0.0]) + 2f64.ln()).abs() < 1e-12);
        // Large logits do not overflow.
        assert!((energy(&[1000.0, 1000.0]) + 1000.0 + 2f64.ln()).abs() < 1e-9);
    }

    #[test]
    fn auroc_and_threshold_on_small_cases() {
        let scores = [0.1, 0.4, 0.35, 0.8];
        let unknown = [false, true, false, true];
        assert_eq!(auroc(&scores, &unknown), Some(1.0));
        assert_eq!(auroc(&scores, &[true, false, true, false]), Some(0.0));
        // One tie between the classes counts half.
        assert_eq!(auroc(&[0.5, 0.5], &[true, false]), Some(0.5));
        assert_eq!(auroc(&[0.5, 0.6], &[true, true]), None);
        let known: Vec<f64> = (1..=20).map(f64::from).collect();
        // 5% of 20 known images may lie above: the threshold is the 19th value.
        assert_eq!(threshold_for(&known, 0.05), Some(19.0));
        assert_eq!(threshold_for(&known, 0.0), Some(20.0));
        assert_eq!(threshold_for(&[], 0.05), None);
    }

    #[test]
    fn a_bad_fit_says_why() {
        assert!(FeatureSpace::fit(&[1.0, 2.0], &[0], 1, 2, 1e-3)
            .unwrap_err()
            .to_string()
            .contains("too few"));
        assert!(FeatureSpace::fit(&[1.0; 6], &[0, 5, 0], 2, 2, 1e-3)
            .unwrap_err()
            .to_string()
            .contains("label 5"));
    }
}
