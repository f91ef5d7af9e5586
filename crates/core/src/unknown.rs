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

/// Class means and the shared covariance of penultimate features, stored with a run, kept in
/// whitened form: with the covariance `S = L L'` (Cholesky), `W = L^-1` maps a feature vector to
/// coordinates where the Mahalanobis distance is the Euclidean one, so scoring an image costs one
/// triangular product (dim^2 / 2) plus classes x dim, not classes x dim^2.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureSpace {
    pub dim: usize,
    /// `W = L^-1`, dim x dim row-major, lower triangular.
    pub whiten: Vec<f64>,
    /// `W mu_c` for each class; a class without training images has none and is skipped.
    pub centres: Vec<Option<Vec<f64>>>,
    /// Added to the covariance's diagonal, relative to the mean variance.
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
        let whiten = inverse_cholesky(&cov, dim).ok_or_else(|| {
            UnknownError::Fit(
                "the feature covariance is singular even with the ridge: a larger ridge is needed"
                    .into(),
            )
        })?;
        let centres = means
            .iter()
            .map(|m| m.as_ref().map(|m| lower_times(&whiten, m, dim)))
            .collect();
        Ok(FeatureSpace {
            dim,
            whiten,
            centres,
            ridge,
        })
    }

    /// Classes the space has a centre for.
    pub fn classes(&self) -> usize {
        self.centres.len()
    }

    /// The smallest squared Mahalanobis distance of `x` to a class mean.
    pub fn mahalanobis(&self, x: &[f32]) -> f64 {
        assert_eq!(x.len(), self.dim, "feature dimension");
        let x: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let z = lower_times(&self.whiten, &x, self.dim);
        self.centres
            .iter()
            .flatten()
            .map(|c| z.iter().zip(c).map(|(a, b)| (a - b) * (a - b)).sum::<f64>())
            .fold(f64::INFINITY, f64::min)
    }

    /// Checks a space read from a file: sizes consistent, values finite.
    pub fn validate(&self) -> Result<(), UnknownError> {
        let bad = |m: String| Err(UnknownError::Fit(m));
        if self.dim == 0 || self.whiten.len() != self.dim * self.dim {
            return bad(format!(
                "whitening matrix of {} values for dimension {}",
                self.whiten.len(),
                self.dim
            ));
        }
        if self.centres.iter().flatten().any(|c| c.len() != self.dim) {
            return bad(format!("a class centre is not of dimension {}", self.dim));
        }
        // L^-1 of a Cholesky factor has a positive diagonal (an all-zero matrix would give
        // every image the same distance).
        if (0..self.dim).any(|i| self.whiten[i * self.dim + i] <= 0.0) {
            return bad("the whitening matrix's diagonal must be positive".into());
        }
        if !(self.ridge >= 0.0 && self.ridge.is_finite()) {
            return bad(format!("ridge {} must be >= 0", self.ridge));
        }
        if self.centres.iter().all(Option::is_none) {
            return bad("no class has a centre".into());
        }
        let finite = self.whiten.iter().all(|v| v.is_finite())
            && self
                .centres
                .iter()
                .flatten()
                .flatten()
                .all(|v| v.is_finite());
        if !finite {
            return bad("non-finite values".into());
        }
        Ok(())
    }
}

/// `L x` for a lower-triangular `L` (n x n row-major).
fn lower_times(l: &[f64], x: &[f64], n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| {
            l[i * n..i * n + i + 1]
                .iter()
                .zip(x)
                .map(|(a, b)| a * b)
                .sum()
        })
        .collect()
}

/// `L^-1` where `L L' = m` (Cholesky) for a symmetric positive-definite `m`; None if it is not
/// one.
fn inverse_cholesky(m: &[f64], n: usize) -> Option<Vec<f64>> {
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
    // Forward substitution, one column of the identity at a time.
    let mut li = vec![0f64; n * n];
    for c in 0..n {
        for i in c..n {
            let s: f64 = (c..i).map(|k| l[i * n + k] * li[k * n + c]).sum();
            let rhs = if i == c { 1.0 } else { 0.0 };
            li[i * n + c] = (rhs - s) / l[i * n + i];
        }
    }
    Some(li)
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

/// The scores, by name as stored in a run's `unknown.json` and in predictions files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Score {
    /// `1 - max p` of the (temperature-scaled) TTA-aggregated probabilities.
    MaxProbability,
    /// `-logsumexp` of the logits averaged over the TTA views.
    Energy,
    /// Squared Mahalanobis distance of the penultimate features averaged over the TTA views.
    Mahalanobis,
}

impl Score {
    pub const ALL: [Score; 3] = [Score::MaxProbability, Score::Energy, Score::Mahalanobis];

    pub fn name(self) -> &'static str {
        match self {
            Score::MaxProbability => "max_probability",
            Score::Energy => "energy",
            Score::Mahalanobis => "mahalanobis",
        }
    }
}

impl std::fmt::Display for Score {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

impl std::str::FromStr for Score {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let snake = s.replace('-', "_");
        Score::ALL
            .into_iter()
            .find(|x| x.name() == snake)
            .ok_or_else(|| {
                format!("unknown score `{s}`: expected max-probability, energy or mahalanobis")
            })
    }
}

/// One image's unknown scores (higher = more unknown for each).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct ImageScores {
    pub max_probability: f64,
    pub energy: f64,
    /// None without a fitted feature space.
    pub mahalanobis: Option<f64>,
}

/// A score as predictions files store it (float32), back in f64: thresholds are fitted on, and
/// rules compare, exactly the values a reader of the file sees, so a threshold equal to the
/// largest validation score is not crossed by that image's own rounding.
pub fn as_stored(v: f64) -> f64 {
    v as f32 as f64
}

impl ImageScores {
    /// From an image's TTA aggregate: probabilities, mean logits, and mean features when the
    /// run has a feature space. Each score is rounded as stored ([`as_stored`]).
    pub fn of(
        probabilities: &[f32],
        mean_logits: &[f32],
        features: Option<(&FeatureSpace, &[f32])>,
    ) -> ImageScores {
        ImageScores {
            max_probability: as_stored(max_probability(probabilities)),
            energy: as_stored(energy(mean_logits)),
            mahalanobis: features.map(|(space, x)| as_stored(space.mahalanobis(x))),
        }
    }

    pub fn get(&self, score: Score) -> Option<f64> {
        match score {
            Score::MaxProbability => Some(self.max_probability),
            Score::Energy => Some(self.energy),
            Score::Mahalanobis => self.mahalanobis,
        }
    }
}

/// What `plankton calibrate --unknown` stores in a run (`unknown.json`): the feature space fitted
/// on the run's training images and, for each score, the threshold that calls at most
/// `false_unknown_rate` of its validation images unknown. `score` is the one that decides the
/// `unknown` column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnknownCalibration {
    pub score: Score,
    pub false_unknown_rate: f64,
    /// By score name; a score without a threshold is absent.
    pub thresholds: std::collections::BTreeMap<Score, f64>,
    /// The validation images' false-unknown rate at each threshold (ties can push it under the
    /// target).
    pub valid_false_unknown: std::collections::BTreeMap<Score, f64>,
    pub feature_space: Option<FeatureSpace>,
    /// The temperature the probabilities had when `max_probability` was thresholded.
    pub temperature: Option<f64>,
    /// TTA views per image when fitted (predictions with other views score differently).
    pub views: usize,
    pub train_images: usize,
    pub valid_images: usize,
    /// The model (run/weights@content hash) the features and thresholds came from: other
    /// weights give other features.
    #[serde(default)]
    pub model_id: Option<String>,
}

impl UnknownCalibration {
    /// Checks a calibration read from a file.
    pub fn validate(&self, classes: usize) -> Result<(), UnknownError> {
        let bad = |m: String| Err(UnknownError::Fit(m));
        if !self.thresholds.contains_key(&self.score) {
            return bad(format!(
                "no threshold for its deciding score `{}`",
                self.score
            ));
        }
        if self.thresholds.values().any(|t| t.is_nan()) {
            return bad("a threshold is NaN".into());
        }
        if self.views == 0 {
            return bad("views must be at least 1".into());
        }
        if self
            .temperature
            .is_some_and(|t| !(t > 0.0 && t.is_finite()))
        {
            return bad("temperature must be > 0".into());
        }
        if self
            .thresholds
            .get(&Score::Mahalanobis)
            .is_some_and(|t| *t < 0.0)
            || self
                .thresholds
                .get(&Score::MaxProbability)
                .is_some_and(|t| !(0.0..=1.0).contains(t))
        {
            return bad(
                "a threshold out of its score's range (mahalanobis >= 0, max_probability in [0, 1])"
                    .into(),
            );
        }
        if !(0.0..1.0).contains(&self.false_unknown_rate) {
            return bad(format!(
                "false_unknown_rate {} is not in [0, 1)",
                self.false_unknown_rate
            ));
        }
        match &self.feature_space {
            Some(space) => {
                space.validate()?;
                if space.classes() != classes {
                    return bad(format!(
                        "its feature space has {} classes, the run {classes}",
                        space.classes()
                    ));
                }
            }
            None if self.thresholds.contains_key(&Score::Mahalanobis) => {
                return bad("a mahalanobis threshold without a feature space".into())
            }
            None => {}
        }
        Ok(())
    }

    /// Whether the deciding score calls the image unknown (None when the image lacks it).
    pub fn is_unknown(&self, s: &ImageScores) -> Option<bool> {
        let t = self.thresholds.get(&self.score)?;
        s.get(self.score).map(|v| v > *t)
    }
}

/// Per-record means of view rows that arrive contiguously (a record's views one after another,
/// as the data path delivers them): what the TTA aggregate of logits and features is.
#[derive(Debug, Clone)]
pub struct ViewMean {
    width: usize,
    views: usize,
    record: Option<usize>,
    count: usize,
    sums: Vec<f64>,
}

impl ViewMean {
    pub fn new(width: usize, views: usize) -> Self {
        assert!(views > 0, "ViewMean: views must be > 0");
        ViewMean {
            width,
            views,
            record: None,
            count: 0,
            sums: vec![0.0; width],
        }
    }

    /// Adds one view row of `record`; the mean once the record has all its views. A row of
    /// another record discards the incomplete one (the aggregator reports that case).
    pub fn push(&mut self, record: usize, row: &[f32]) -> Option<Vec<f32>> {
        assert_eq!(row.len(), self.width, "ViewMean: row width");
        if self.record != Some(record) {
            self.record = Some(record);
            self.count = 0;
            self.sums.iter_mut().for_each(|s| *s = 0.0);
        }
        for (s, &v) in self.sums.iter_mut().zip(row) {
            *s += v as f64;
        }
        self.count += 1;
        if self.count < self.views {
            return None;
        }
        self.record = None;
        let n = self.count as f64;
        Some(self.sums.iter().map(|s| (s / n) as f32).collect())
    }
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

    #[test]
    fn view_means_and_the_unknown_rule() {
        let mut m = ViewMean::new(2, 3);
        assert_eq!(m.push(4, &[1.0, 0.0]), None);
        assert_eq!(m.push(4, &[2.0, 3.0]), None);
        assert_eq!(m.push(4, &[3.0, 6.0]), Some(vec![2.0, 3.0]));
        // An interrupted record starts over.
        assert_eq!(m.push(5, &[1.0, 1.0]), None);
        assert_eq!(m.push(6, &[1.0, 1.0]), None);
        let features = [
            0.0f32, 0.0, 0.1, 0.0, 5.0, 5.0, 5.1, 5.0, 0.0, 0.2, 5.0, 5.2,
        ];
        let space = FeatureSpace::fit(&features, &[0, 0, 1, 1, 0, 1], 2, 2, 1e-3).unwrap();
        let mut thresholds = std::collections::BTreeMap::new();
        thresholds.insert(Score::Energy, -2.0);
        let mut cal = UnknownCalibration {
            score: Score::Energy,
            false_unknown_rate: 0.05,
            thresholds,
            valid_false_unknown: Default::default(),
            feature_space: Some(space.clone()),
            temperature: None,
            views: 1,
            train_images: 6,
            valid_images: 0,
            model_id: None,
        };
        assert!(cal.validate(2).is_ok());
        let mut zeroed = cal.clone();
        if let Some(space) = zeroed.feature_space.as_mut() {
            space.whiten.iter_mut().for_each(|v| *v = 0.0);
        }
        assert!(zeroed
            .validate(2)
            .unwrap_err()
            .to_string()
            .contains("diagonal"));
        assert!(cal
            .validate(3)
            .unwrap_err()
            .to_string()
            .contains("2 classes"));
        let sure = ImageScores::of(&[0.99, 0.01], &[6.0, -1.0], Some((&space, &[0.0, 0.1])));
        let vague = ImageScores::of(&[0.5, 0.5], &[-3.0, -3.0], Some((&space, &[20.0, -9.0])));
        assert_eq!(cal.is_unknown(&sure), Some(false));
        assert_eq!(cal.is_unknown(&vague), Some(true));
        assert!(vague.mahalanobis.unwrap() > 100.0 * sure.mahalanobis.unwrap());
        cal.score = Score::Mahalanobis;
        assert!(cal
            .validate(2)
            .unwrap_err()
            .to_string()
            .contains("no threshold"));
        let json = serde_json::to_string(&cal).unwrap();
        let back: UnknownCalibration = serde_json::from_str(&json).unwrap();
        assert_eq!(back, cal);
        assert_eq!(
            "max-probability".parse::<Score>(),
            Ok(Score::MaxProbability)
        );
        assert!("maxp".parse::<Score>().is_err());
    }
}
