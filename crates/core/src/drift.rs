//! Drift of a stream of predictions against what the model was trained on (issue 17): what one
//! window of images looks like (predicted class mix, confidence, unknown rate, image size and
//! brightness) and how far its class mix is from the training prior.
//!
//! The divergence is Jensen-Shannon in bits (base 2: 0 for the same mix, 1 for disjoint ones),
//! symmetric and finite when a class is missing from one side, unlike Kullback-Leibler.

/// Jensen-Shannon divergence (bits) between two distributions over the same classes; each is
/// normalised first (counts may be given). None when either sums to zero or lengths differ.
pub fn js_divergence(p: &[f64], q: &[f64]) -> Option<f64> {
    if p.len() != q.len() {
        return None;
    }
    let (sp, sq): (f64, f64) = (p.iter().sum(), q.iter().sum());
    if !(sp > 0.0 && sq > 0.0) || p.iter().chain(q).any(|&v| v < 0.0 || !v.is_finite()) {
        return None;
    }
    let kl_to_mid = |a: f64, b: f64| {
        let m = 0.5 * (a + b);
        if a > 0.0 {
            a * (a / m).log2()
        } else {
            0.0
        }
    };
    let d: f64 = p
        .iter()
        .zip(q)
        .map(|(&a, &b)| {
            let (a, b) = (a / sp, b / sq);
            0.5 * (kl_to_mid(a, b) + kl_to_mid(b, a))
        })
        .sum();
    Some(d.clamp(0.0, 1.0))
}

/// One image as the drift window sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    pub predicted: usize,
    /// The top probability.
    pub confidence: f64,
    pub unknown: bool,
    pub pixels: u64,
    /// Mean grey level, 0-255.
    pub brightness: f64,
}

/// What a window of observations looks like.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowStats {
    pub images: u64,
    /// Jensen-Shannon divergence (bits) of the predicted class mix from the prior.
    pub divergence: Option<f64>,
    pub mean_confidence: f64,
    pub unknown_rate: f64,
    pub mean_pixels: f64,
    pub mean_brightness: f64,
}

/// A window of observations (e.g. the last N minutes of one camera), reset by the caller.
#[derive(Debug, Clone)]
pub struct DriftWindow {
    counts: Vec<u64>,
    images: u64,
    confidence: f64,
    unknown: u64,
    pixels: f64,
    brightness: f64,
}

impl DriftWindow {
    pub fn new(classes: usize) -> DriftWindow {
        DriftWindow {
            counts: vec![0; classes],
            images: 0,
            confidence: 0.0,
            unknown: 0,
            pixels: 0.0,
            brightness: 0.0,
        }
    }

    pub fn push(&mut self, o: &Observation) {
        if let Some(c) = self.counts.get_mut(o.predicted) {
            *c += 1;
        }
        self.images += 1;
        self.confidence += o.confidence;
        self.unknown += u64::from(o.unknown);
        self.pixels += o.pixels as f64;
        self.brightness += o.brightness;
    }

    /// The window's statistics against `prior` (the training class frequencies).
    pub fn stats(&self, prior: &[f64]) -> WindowStats {
        let n = self.images.max(1) as f64;
        let counts: Vec<f64> = self.counts.iter().map(|&c| c as f64).collect();
        WindowStats {
            images: self.images,
            divergence: js_divergence(&counts, prior),
            mean_confidence: self.confidence / n,
            unknown_rate: self.unknown as f64 / n,
            mean_pixels: self.pixels / n,
            mean_brightness: self.brightness / n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divergence_bounds_and_symmetry() {
        assert_eq!(js_divergence(&[1.0, 2.0], &[2.0, 4.0]), Some(0.0));
        assert!((js_divergence(&[1.0, 0.0], &[0.0, 1.0]).unwrap() - 1.0).abs() < 1e-12);
        let (p, q) = ([0.2, 0.5, 0.3], [0.6, 0.1, 0.3]);
        assert_eq!(js_divergence(&p, &q), js_divergence(&q, &p));
        assert_eq!(js_divergence(&[0.0, 0.0], &[1.0, 1.0]), None);
        assert_eq!(js_divergence(&[1.0], &[1.0, 1.0]), None);
    }

    /// A stream drawn from the prior stays near 0; one of only two classes moves far away.
    #[test]
    fn a_shifted_window_diverges_and_a_stationary_one_does_not() {
        let prior = [0.25, 0.25, 0.25, 0.25];
        let mut stationary = DriftWindow::new(4);
        let mut shifted = DriftWindow::new(4);
        for i in 0..400usize {
            let o = |predicted| Observation {
                predicted,
                confidence: 0.8,
                unknown: false,
                pixels: 900,
                brightness: 120.0,
            };
            stationary.push(&o(i % 4));
            shifted.push(&o(i % 2));
        }
        let (a, b) = (stationary.stats(&prior), shifted.stats(&prior));
        assert!(a.divergence.unwrap() < 0.01, "{a:?}");
        assert!(b.divergence.unwrap() > 0.2, "{b:?}");
        assert_eq!(a.images, 400);
        assert!((a.mean_confidence - 0.8).abs() < 1e-12);
    }
}
