//! Metrics of stored predictions against labels: Kaggle's log loss, top-k accuracy, per-class
//! precision / recall / F1, the confusion matrix, a reliability diagram with its expected
//! calibration error, and the least confident images (the ones a person should look at first:
//! the reference's stated use of its predictions beyond the leaderboard was to speed up manual
//! annotation).
//!
//! All functions take row-major `n x C` probabilities as stored by predict (`f32`). Rows are
//! divided by their sum (in `f64`) before anything that reads a probability, as Kaggle's scorer
//! does, so unnormalised rows are fine. The predicted class of a row is its first maximum (the
//! lowest class index among ties, as `numpy.argmax`).

use serde::Serialize;

use crate::scoring::{kaggle_log_loss, top_k_accuracy};

/// Number of equal-width confidence bins of the reliability diagram (Guo et al. 2017 use 15).
pub const RELIABILITY_BINS: usize = 15;

/// Everything [`evaluate`] measures on a set of scored images.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    pub n: usize,
    pub classes: Vec<String>,
    /// Kaggle's multi-class log loss (rows normalised, then clipped to [1e-15, 1 - 1e-15]).
    pub log_loss: f64,
    /// `top_k[k - 1]` is the top-k accuracy, for k = 1..=min(5, C). Ties count against the
    /// label (see [`crate::scoring::top_k_accuracy`]).
    pub top_k: Vec<f64>,
    pub per_class: Vec<PerClass>,
    /// Unweighted mean over all C classes (classes without support included, with recall 0),
    /// as scikit-learn's `average="macro"` with `labels=range(C)`.
    pub macro_avg: Averages,
    /// Mean over classes weighted by support, as scikit-learn's `average="weighted"`.
    pub weighted_avg: Averages,
    /// `confusion[true][predicted]`: counts, predicted = top-1 class.
    pub confusion: Vec<Vec<u64>>,
    /// [`RELIABILITY_BINS`] equal-width bins of top-1 confidence; bin b holds confidences in
    /// (b/15, (b+1)/15] (the first bin also holds 0).
    pub reliability: Vec<ReliabilityBin>,
    /// Expected calibration error, sum over bins of n_b / N * |accuracy_b - confidence_b|.
    pub ece: f64,
    /// Mean entropy (nats) of the normalised rows.
    pub mean_entropy: f64,
    /// The least confident images, least confident first.
    pub least_confident: Vec<Uncertain>,
}

/// Precision, recall and F1 of one class. Divisions by zero give 0, as scikit-learn's
/// `zero_division=0`: a class that is never predicted has precision 0, a class without support
/// has recall 0, and F1 = 2 tp / (2 tp + fp + fn) is 0 when that denominator is 0.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PerClass {
    pub class: String,
    /// Number of images whose true class this is.
    pub support: u64,
    /// Number of images predicted (top-1) as this class.
    pub predicted: u64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Kaggle log loss over the images of this class; `None` without support.
    pub log_loss: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Averages {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ReliabilityBin {
    /// Confidence interval of the bin, (lower, upper].
    pub lower: f64,
    pub upper: f64,
    pub count: u64,
    /// Mean top-1 confidence of the bin's images; NaN (null in JSON) when empty.
    pub confidence: f64,
    /// Fraction of the bin's images whose top-1 class is right; NaN (null in JSON) when empty.
    pub accuracy: f64,
}

/// One image's uncertainty. `index` is the row in the evaluated arrays; the caller maps it to
/// an image id and path.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Uncertain {
    pub index: usize,
    pub predicted: String,
    /// Top-1 probability of the normalised row.
    pub confidence: f64,
    /// Top-1 minus top-2 probability.
    pub margin: f64,
    /// Entropy (nats) of the normalised row.
    pub entropy: f64,
    pub true_class: String,
    pub correct: bool,
}

/// What one normalised row says about itself.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowSummary {
    /// First index of the maximum.
    pub predicted: usize,
    pub confidence: f64,
    pub margin: f64,
    pub entropy: f64,
}

/// Top-1 class, confidence, margin and entropy of one row after dividing it by its sum.
/// A row summing to 0 (or not finite) reads as uniform.
pub fn summarise_row(row: &[f32]) -> RowSummary {
    let sum: f64 = row.iter().map(|&p| p as f64).sum();
    let c = row.len();
    let p = |j: usize| {
        if sum > 0.0 && sum.is_finite() {
            row[j] as f64 / sum
        } else {
            1.0 / c as f64
        }
    };
    let (mut best, mut second) = (0usize, f64::NEG_INFINITY);
    let mut best_p = f64::NEG_INFINITY;
    let mut entropy = 0.0;
    for j in 0..c {
        let q = p(j);
        if q > best_p {
            second = best_p;
            best_p = q;
            best = j;
        } else if q > second {
            second = q;
        }
        if q > 0.0 {
            entropy -= q * q.ln();
        }
    }
    RowSummary {
        predicted: best,
        confidence: best_p,
        margin: if c > 1 { best_p - second } else { best_p },
        entropy,
    }
}

/// Bin of a top-1 confidence: b with b/bins < conf <= (b+1)/bins, edges computed as b / bins.
pub fn confidence_bin(conf: f64, bins: usize) -> usize {
    let nb = bins as f64;
    let mut b = ((conf * nb).ceil() as i64 - 1).clamp(0, bins as i64 - 1) as usize;
    // Settle rounding at the edges against the edges as written (b / bins).
    while b > 0 && conf <= b as f64 / nb {
        b -= 1;
    }
    while b + 1 < bins && conf > (b + 1) as f64 / nb {
        b += 1;
    }
    b
}

/// Reliability diagram bins of `(confidence, correct)` pairs and their expected calibration
/// error (NaN for no pairs).
pub fn reliability(pairs: &[(f64, bool)], bins: usize) -> (Vec<ReliabilityBin>, f64) {
    let mut count = vec![0u64; bins];
    let mut conf = vec![0.0f64; bins];
    let mut hits = vec![0u64; bins];
    for &(c, ok) in pairs {
        let b = confidence_bin(c, bins);
        count[b] += 1;
        conf[b] += c;
        hits[b] += ok as u64;
    }
    let n = pairs.len() as f64;
    let mut ece = 0.0;
    let out = (0..bins)
        .map(|b| {
            let k = count[b] as f64;
            let (confidence, accuracy) = if count[b] == 0 {
                (f64::NAN, f64::NAN)
            } else {
                (conf[b] / k, hits[b] as f64 / k)
            };
            if count[b] > 0 {
                ece += k / n * (accuracy - confidence).abs();
            }
            ReliabilityBin {
                lower: b as f64 / bins as f64,
                upper: (b + 1) as f64 / bins as f64,
                count: count[b],
                confidence,
                accuracy,
            }
        })
        .collect();
    (out, if pairs.is_empty() { f64::NAN } else { ece })
}

/// Expected calibration error of top-1 confidences over `bins` equal-width bins (Guo et al.
/// 2017): sum over bins of n_b / N * |accuracy_b - confidence_b|.
pub fn expected_calibration_error(
    probs: &[f32],
    labels: &[usize],
    classes: usize,
    bins: usize,
) -> f64 {
    check_shape(probs, labels, classes);
    let pairs: Vec<(f64, bool)> = probs
        .chunks_exact(classes)
        .zip(labels)
        .map(|(row, &y)| {
            let s = summarise_row(row);
            (s.confidence, s.predicted == y)
        })
        .collect();
    reliability(&pairs, bins).1
}

fn check_shape(probs: &[f32], labels: &[usize], classes: usize) {
    assert!(classes > 0, "no classes");
    assert_eq!(
        probs.len(),
        labels.len() * classes,
        "probs must be rows x classes"
    );
    if let Some(&y) = labels.iter().find(|&&y| y >= classes) {
        panic!("label {y} out of range for {classes} classes");
    }
}

fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

/// Measures `probs` (row-major `labels.len() x classes.len()`) against `labels`, keeping the
/// `least_confident` least confident images (ascending top-1 probability, ties broken by the
/// smaller top-1 / top-2 margin, then by row).
///
/// Panics when the shapes disagree or a label is out of range (caller bugs, not data errors).
/// With no rows, the scores are NaN (null in JSON) and the counts 0.
pub fn evaluate(
    probs: &[f32],
    labels: &[usize],
    classes: &[String],
    least_confident: usize,
) -> Evaluation {
    let c = classes.len();
    check_shape(probs, labels, c);
    let n = labels.len();
    let rows: Vec<RowSummary> = probs.chunks_exact(c).map(summarise_row).collect();

    let mut confusion = vec![vec![0u64; c]; c];
    let mut class_loss = vec![0.0f64; c];
    for ((row, s), &y) in probs.chunks_exact(c).zip(&rows).zip(labels) {
        confusion[y][s.predicted] += 1;
        class_loss[y] += kaggle_log_loss(row, &[y], c);
    }

    let per_class: Vec<PerClass> = (0..c)
        .map(|k| {
            let tp = confusion[k][k];
            let support: u64 = confusion[k].iter().sum();
            let predicted: u64 = confusion.iter().map(|r| r[k]).sum();
            PerClass {
                class: classes[k].clone(),
                support,
                predicted,
                precision: ratio(tp, predicted),
                recall: ratio(tp, support),
                // 2 tp + fp + fn = predicted + support.
                f1: ratio(2 * tp, predicted + support),
                log_loss: (support > 0).then(|| class_loss[k] / support as f64),
            }
        })
        .collect();
    let average = |weight: &dyn Fn(&PerClass) -> f64| {
        let total: f64 = per_class.iter().map(weight).sum();
        let mean = |f: &dyn Fn(&PerClass) -> f64| {
            if total > 0.0 {
                per_class.iter().map(|p| weight(p) * f(p)).sum::<f64>() / total
            } else {
                0.0
            }
        };
        Averages {
            precision: mean(&|p| p.precision),
            recall: mean(&|p| p.recall),
            f1: mean(&|p| p.f1),
        }
    };
    let macro_avg = average(&|_| 1.0);
    let weighted_avg = average(&|p| p.support as f64);

    let pairs: Vec<(f64, bool)> = rows
        .iter()
        .zip(labels)
        .map(|(s, &y)| (s.confidence, s.predicted == y))
        .collect();
    let (reliability, ece) = reliability(&pairs, RELIABILITY_BINS);

    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| {
        let (ra, rb) = (&rows[a], &rows[b]);
        ra.confidence
            .total_cmp(&rb.confidence)
            .then(ra.margin.total_cmp(&rb.margin))
            .then(a.cmp(&b))
    });
    let least_confident = order
        .into_iter()
        .take(least_confident)
        .map(|i| {
            let s = &rows[i];
            Uncertain {
                index: i,
                predicted: classes[s.predicted].clone(),
                confidence: s.confidence,
                margin: s.margin,
                entropy: s.entropy,
                true_class: classes[labels[i]].clone(),
                correct: s.predicted == labels[i],
            }
        })
        .collect();

    let nan_if_empty = |v: f64| if n == 0 { f64::NAN } else { v };
    Evaluation {
        n,
        classes: classes.to_vec(),
        log_loss: kaggle_log_loss(probs, labels, c),
        top_k: (1..=c.min(5))
            .map(|k| top_k_accuracy(probs, labels, c, k))
            .collect(),
        per_class,
        macro_avg,
        weighted_avg,
        confusion,
        reliability,
        ece,
        mean_entropy: nan_if_empty(rows.iter().map(|s| s.entropy).sum::<f64>() / n as f64),
        least_confident,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(c: usize) -> Vec<String> {
        (0..c).map(|i| format!("c{i}")).collect()
    }

    #[test]
    fn hand_computed_three_rows() {
        // Row 0: predicts 0 (right); row 1 unnormalised, predicts 1 (label 0); row 2 predicts 2.
        let probs = [0.7, 0.2, 0.1, 0.2, 0.6, 0.2, 0.1, 0.1, 0.8];
        let e = evaluate(&probs, &[0, 0, 2], &names(3), 2);
        assert_eq!(
            e.confusion,
            vec![vec![1, 1, 0], vec![0, 0, 0], vec![0, 0, 1]]
        );
        assert_eq!(e.per_class[1].support, 0);
        assert_eq!(e.per_class[1].precision, 0.0);
        assert_eq!(e.per_class[1].log_loss, None);
        assert_eq!(e.per_class[0].recall, 0.5);
        assert!((e.per_class[0].f1 - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(e.top_k.len(), 3);
        assert!((e.top_k[0] - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(e.least_confident.len(), 2);
        assert_eq!(e.least_confident[0].index, 1);
        assert!(!e.least_confident[0].correct);
        assert_eq!(e.least_confident[1].index, 0);
        // Weighted recall = accuracy.
        assert!((e.weighted_avg.recall - 2.0 / 3.0).abs() < 1e-12);
        let expected_loss = -(0.7f64.ln() + (0.2f64 / 1.0).ln() + 0.8f64.ln()) / 3.0;
        assert!((e.log_loss - expected_loss).abs() < 1e-6);
    }

    #[test]
    fn least_confident_ties_break_on_margin() {
        // Same top-1 (0.5, exactly), margins 0.125 and 0.0625: the smaller margin comes first.
        let probs = [0.5f32, 0.125, 0.375, 0.5, 0.4375, 0.0625];
        let e = evaluate(&probs, &[0, 0], &names(3), 5);
        assert_eq!(e.least_confident.len(), 2);
        assert_eq!(e.least_confident[0].index, 1);
        assert_eq!(e.least_confident[1].index, 0);
    }

    #[test]
    fn bins_follow_the_written_edges() {
        assert_eq!(confidence_bin(1.0, 15), 14);
        assert_eq!(confidence_bin(0.0, 15), 0);
        assert_eq!(confidence_bin(1.0 / 15.0, 15), 0);
        assert_eq!(confidence_bin(1.0 / 15.0 + 1e-12, 15), 1);
        for b in 0..15 {
            let edge = b as f64 / 15.0;
            if b > 0 {
                assert_eq!(confidence_bin(edge, 15), b - 1);
            }
            assert_eq!(confidence_bin(edge + 1e-9, 15), b);
        }
    }

    #[test]
    fn perfectly_calibrated_bins_have_zero_ece() {
        // 10 images at confidence 0.8, 8 right.
        let pairs: Vec<(f64, bool)> = (0..10).map(|i| (0.8, i < 8)).collect();
        let (bins, ece) = reliability(&pairs, 15);
        assert!(ece.abs() < 1e-12);
        assert_eq!(bins.iter().map(|b| b.count).sum::<u64>(), 10);
    }

    #[test]
    fn empty_input_gives_nan_scores() {
        let e = evaluate(&[], &[], &names(4), 3);
        assert_eq!(e.n, 0);
        assert!(e.log_loss.is_nan() && e.ece.is_nan() && e.mean_entropy.is_nan());
        assert!(e.least_confident.is_empty());
        assert!(serde_json::to_string(&e).is_ok());
    }

    #[test]
    fn entropy_of_uniform_row_is_ln_c() {
        let s = summarise_row(&[1.0, 1.0, 1.0, 1.0]);
        assert!((s.entropy - 4f64.ln()).abs() < 1e-12);
        assert_eq!(s.predicted, 0);
        assert_eq!(s.margin, 0.0);
        let z = summarise_row(&[0.0, 0.0]);
        assert_eq!(z.confidence, 0.5);
    }
}
