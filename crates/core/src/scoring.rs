//! Scores of predicted class distributions: Kaggle's multi-class log loss and top-k accuracy.

/// Log loss, top-1 and top-5 accuracy over `n` rows.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Scores {
    pub log_loss: f64,
    pub top1: f64,
    pub top5: f64,
    pub n: usize,
}

/// Kaggle's clipping: each row is divided by its sum, then clipped to [1e-15, 1 - 1e-15].
pub const KAGGLE_EPS: f64 = 1e-15;

/// Multi-class log loss as Kaggle scores it. `probs` is row-major `labels.len() x classes`.
pub fn kaggle_log_loss(probs: &[f32], labels: &[usize], classes: usize) -> f64 {
    assert_eq!(
        probs.len(),
        labels.len() * classes,
        "probs must be rows x classes"
    );
    if labels.is_empty() {
        return f64::NAN;
    }
    let total: f64 = probs
        .chunks_exact(classes)
        .zip(labels)
        .map(|(row, &y)| {
            let sum: f64 = row.iter().map(|&p| p as f64).sum();
            let p = (row[y] as f64 / sum).clamp(KAGGLE_EPS, 1.0 - KAGGLE_EPS);
            -p.ln()
        })
        .sum();
    total / labels.len() as f64
}

/// Fraction of rows whose label is among the `k` highest probabilities (ties count against).
pub fn top_k_accuracy(probs: &[f32], labels: &[usize], classes: usize, k: usize) -> f64 {
    if labels.is_empty() {
        return f64::NAN;
    }
    let hits = probs
        .chunks_exact(classes)
        .zip(labels)
        .filter(|(row, &y)| row.iter().filter(|&&p| p >= row[y]).count() <= k)
        .count();
    hits as f64 / labels.len() as f64
}

pub fn score(probs: &[f32], labels: &[usize], classes: usize) -> Scores {
    Scores {
        log_loss: kaggle_log_loss(probs, labels, classes),
        top1: top_k_accuracy(probs, labels, classes, 1),
        top5: top_k_accuracy(probs, labels, classes, 5),
        n: labels.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_loss_normalises_rows_and_clips() {
        // Row 0 sums to 2: normalised p(label) = 0.5. Row 1 gives its label 0: clipped to 1e-15.
        let probs = [1.0, 1.0, 0.0, 1.0];
        let l = kaggle_log_loss(&probs, &[0, 0], 2);
        let expected = (-(0.5f64).ln() - (1e-15f64).ln()) / 2.0;
        assert!((l - expected).abs() < 1e-9, "{l} vs {expected}");
    }

    #[test]
    fn top_k_counts_ties_against_the_label() {
        let probs = [0.5, 0.5, 0.0, 0.2, 0.7, 0.1];
        assert_eq!(top_k_accuracy(&probs, &[0, 1], 3, 1), 0.5);
        assert_eq!(top_k_accuracy(&probs, &[0, 0], 3, 2), 1.0);
    }
}
