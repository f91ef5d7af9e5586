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

/// One image as the drift window sees it; what its source does not know is None.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    pub predicted: usize,
    /// The top probability.
    pub confidence: f64,
    /// The run's unknown rule (None without one).
    pub unknown: Option<bool>,
    /// Height x width of the decoded image.
    pub pixels: Option<u64>,
    /// Mean grey level, 0-255.
    pub brightness: Option<f64>,
}

/// What a window of observations looks like. Means over the images that had the value.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct WindowStats {
    pub images: u64,
    /// Jensen-Shannon divergence (bits) of the predicted class mix from the prior.
    pub divergence: Option<f64>,
    pub mean_confidence: Option<f64>,
    pub unknown_rate: Option<f64>,
    pub mean_pixels: Option<f64>,
    pub mean_brightness: Option<f64>,
}

/// Running sums of one optional value.
#[derive(Debug, Clone, Copy, Default)]
struct Mean {
    sum: f64,
    n: u64,
}

impl Mean {
    fn add(&mut self, v: Option<f64>, sign: f64) {
        if let Some(v) = v.filter(|v| v.is_finite()) {
            self.sum += sign * v;
            if sign > 0.0 {
                self.n += 1;
            } else {
                self.n -= 1;
            }
        }
    }
    fn get(&self) -> Option<f64> {
        (self.n > 0).then(|| self.sum / self.n as f64)
    }
}

/// The last `capacity` observations of one stream (e.g. one camera): adding one beyond it
/// drops the oldest, so the statistics always describe the most recent images. Sums are kept
/// incrementally: a push costs O(1), `stats` O(classes).
#[derive(Debug, Clone)]
pub struct DriftWindow {
    capacity: usize,
    ring: std::collections::VecDeque<Observation>,
    counts: Vec<u64>,
    confidence: Mean,
    unknown: Mean,
    pixels: Mean,
    brightness: Mean,
}

impl DriftWindow {
    /// A window of the last `capacity` observations (at least 1).
    pub fn new(classes: usize, capacity: usize) -> DriftWindow {
        let capacity = capacity.max(1);
        DriftWindow {
            capacity,
            ring: std::collections::VecDeque::with_capacity(capacity.min(1 << 16)),
            counts: vec![0; classes],
            confidence: Mean::default(),
            unknown: Mean::default(),
            pixels: Mean::default(),
            brightness: Mean::default(),
        }
    }

    fn account(&mut self, o: &Observation, sign: f64) {
        if let Some(c) = self.counts.get_mut(o.predicted) {
            if sign > 0.0 {
                *c += 1;
            } else {
                *c -= 1;
            }
        }
        self.confidence.add(Some(o.confidence), sign);
        self.unknown
            .add(o.unknown.map(|u| f64::from(u8::from(u))), sign);
        self.pixels.add(o.pixels.map(|p| p as f64), sign);
        self.brightness.add(o.brightness, sign);
    }

    pub fn push(&mut self, o: &Observation) {
        if self.ring.len() == self.capacity {
            if let Some(old) = self.ring.pop_front() {
                self.account(&old, -1.0);
            }
        }
        self.account(o, 1.0);
        self.ring.push_back(*o);
    }

    pub fn len(&self) -> usize {
        self.ring.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }

    /// Predicted images per class in the window.
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// The window's statistics against `prior` (the training class frequencies).
    pub fn stats(&self, prior: &[f64]) -> WindowStats {
        let counts: Vec<f64> = self.counts.iter().map(|&c| c as f64).collect();
        WindowStats {
            images: self.ring.len() as u64,
            divergence: js_divergence(&counts, prior),
            mean_confidence: self.confidence.get(),
            unknown_rate: self.unknown.get(),
            mean_pixels: self.pixels.get(),
            mean_brightness: self.brightness.get(),
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
        let mut stationary = DriftWindow::new(4, 1000);
        let mut shifted = DriftWindow::new(4, 1000);
        for i in 0..400usize {
            let o = |predicted| Observation {
                predicted,
                confidence: 0.8,
                unknown: Some(false),
                pixels: Some(900),
                brightness: Some(120.0),
            };
            stationary.push(&o(i % 4));
            shifted.push(&o(i % 2));
        }
        let (a, b) = (stationary.stats(&prior), shifted.stats(&prior));
        assert!(a.divergence.unwrap() < 0.01, "{a:?}");
        assert!(b.divergence.unwrap() > 0.2, "{b:?}");
        assert_eq!(a.images, 400);
        assert!((a.mean_confidence.unwrap() - 0.8).abs() < 1e-12);
    }

    /// The window forgets: after a shift, the oldest images leave and only the new mix counts.
    #[test]
    fn a_rolling_window_keeps_only_the_last_images() {
        let mut w = DriftWindow::new(2, 10);
        let o = |predicted, brightness: Option<f64>, unknown| Observation {
            predicted,
            confidence: 0.5,
            unknown,
            pixels: None,
            brightness,
        };
        for _ in 0..10 {
            w.push(&o(0, Some(200.0), Some(true)));
        }
        for _ in 0..10 {
            w.push(&o(1, Some(50.0), None));
        }
        assert_eq!(w.len(), 10);
        assert_eq!(w.counts(), &[0, 10]);
        let s = w.stats(&[0.5, 0.5]);
        assert_eq!(s.mean_brightness, Some(50.0));
        assert_eq!(s.unknown_rate, None, "no image in the window had the rule");
        assert_eq!(s.mean_pixels, None);
        assert!((s.divergence.unwrap() - 0.311).abs() < 1e-3);
        w.push(&o(0, None, Some(false)));
        let s = w.stats(&[0.5, 0.5]);
        assert_eq!(
            (s.images, s.unknown_rate, s.mean_brightness),
            (10, Some(0.0), Some(50.0))
        );
    }
}
