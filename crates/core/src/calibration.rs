//! Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks") of stored
//! probabilities. The logits are not stored, but log p is a valid stand-in: softmax(log p) = p
//! for a normalised row, and softmax(log p / T) equals softmax(z / T) for any logits z with
//! softmax(z) = p, because the shift between log p and z is the same for every class.
//!
//! One scalar T is fitted on labelled data (validation) by minimising the negative
//! log-likelihood; T > 1 softens overconfident predictions. Top-1 predictions do not change.

use serde::{Deserialize, Serialize};

use crate::metrics::{expected_calibration_error, RELIABILITY_BINS};
use crate::scoring::kaggle_log_loss;

/// Probabilities are floored here before the log, so that p = 0 becomes a very negative, finite
/// logit.
pub const LOG_FLOOR: f64 = 1e-30;
/// Search interval of the temperature.
pub const T_MIN: f64 = 0.05;
pub const T_MAX: f64 = 20.0;

/// The fitted temperature and what it does to the fitting data.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TemperatureFit {
    pub temperature: f64,
    /// Kaggle log loss before and after scaling (after: of the f32 rows `apply_temperature`
    /// returns).
    pub log_loss_before: f64,
    pub log_loss_after: f64,
    /// Expected calibration error (15 bins) before and after.
    pub ece_before: f64,
    pub ece_after: f64,
    pub n: usize,
}

fn logits(row: &[f32], out: &mut Vec<f64>) {
    out.clear();
    out.extend(row.iter().map(|&p| (p as f64).max(LOG_FLOOR).ln()));
}

/// log sum exp of `l / t`, computed stably.
fn log_sum_exp(l: &[f64], t: f64) -> f64 {
    let m = l.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b)) / t;
    m + l.iter().map(|&v| (v / t - m).exp()).sum::<f64>().ln()
}

/// softmax(ln(max(p, 1e-30)) / t) of every row of `probs` (row-major, `classes` columns).
/// T = 1 returns the rows normalised (rows that sum to 0 become uniform); it never produces NaN
/// for finite, non-negative input.
pub fn apply_temperature(probs: &[f32], classes: usize, t: f64) -> Vec<f32> {
    assert!(classes > 0, "no classes");
    assert_eq!(probs.len() % classes, 0, "probs must be rows x classes");
    assert!(
        t.is_finite() && t > 0.0,
        "temperature must be positive, got {t}"
    );
    let mut out = Vec::with_capacity(probs.len());
    let mut l = Vec::with_capacity(classes);
    for row in probs.chunks_exact(classes) {
        logits(row, &mut l);
        let lse = log_sum_exp(&l, t);
        out.extend(l.iter().map(|&v| (v / t - lse).exp() as f32));
    }
    out
}

/// Mean negative log-likelihood of the labels under softmax(log p / t). Not clipped (this is
/// what the fit minimises); finite because of the floor on p.
pub fn temperature_nll(probs: &[f32], labels: &[usize], classes: usize, t: f64) -> f64 {
    assert_eq!(
        probs.len(),
        labels.len() * classes,
        "probs must be rows x classes"
    );
    let mut l = Vec::with_capacity(classes);
    let total: f64 = probs
        .chunks_exact(classes)
        .zip(labels)
        .map(|(row, &y)| {
            logits(row, &mut l);
            log_sum_exp(&l, t) - l[y] / t
        })
        .sum();
    total / labels.len() as f64
}

/// The temperature in [0.05, 20] minimising [`temperature_nll`], found by golden-section search
/// on ln T. The NLL is convex in 1/T (a log-sum-exp of linear functions of 1/T minus a linear
/// term), hence unimodal in ln T, so the search finds the minimum of the interval. The result
/// is never worse on the NLL than T = 1: if rounding made it so, T = 1 is returned.
///
/// With no rows, T = 1 and NaN scores.
pub fn fit_temperature(probs: &[f32], labels: &[usize], classes: usize) -> TemperatureFit {
    assert!(classes > 0, "no classes");
    assert_eq!(
        probs.len(),
        labels.len() * classes,
        "probs must be rows x classes"
    );
    let n = labels.len();
    let log_loss_before = kaggle_log_loss(probs, labels, classes);
    let ece_before = if n == 0 {
        f64::NAN
    } else {
        expected_calibration_error(probs, labels, classes, RELIABILITY_BINS)
    };
    if n == 0 {
        return TemperatureFit {
            temperature: 1.0,
            log_loss_before,
            log_loss_after: log_loss_before,
            ece_before,
            ece_after: ece_before,
            n,
        };
    }

    let nll = |u: f64| temperature_nll(probs, labels, classes, u.exp());
    let inv_phi = (5f64.sqrt() - 1.0) / 2.0;
    let (mut a, mut b) = (T_MIN.ln(), T_MAX.ln());
    let mut c = b - inv_phi * (b - a);
    let mut d = a + inv_phi * (b - a);
    let (mut fc, mut fd) = (nll(c), nll(d));
    // ln(400) shrinks below 1e-10 after about 50 steps; the bound is deterministic.
    for _ in 0..64 {
        if b - a < 1e-10 {
            break;
        }
        if fc <= fd {
            b = d;
            d = c;
            fd = fc;
            c = b - inv_phi * (b - a);
            fc = nll(c);
        } else {
            a = c;
            c = d;
            fc = fd;
            d = a + inv_phi * (b - a);
            fd = nll(d);
        }
    }
    let (mut u, mut best) = if fc <= fd { (c, fc) } else { (d, fd) };
    // The interval's ends are candidates too (a minimum at the boundary).
    for end in [T_MIN.ln(), T_MAX.ln()] {
        let f = nll(end);
        if f < best {
            (u, best) = (end, f);
        }
    }
    let at_one = nll(0.0);
    let temperature = if best.is_nan() || best > at_one {
        1.0
    } else {
        u.exp()
    };

    let scaled = apply_temperature(probs, classes, temperature);
    TemperatureFit {
        temperature,
        log_loss_before,
        log_loss_after: kaggle_log_loss(&scaled, labels, classes),
        ece_before,
        ece_after: expected_calibration_error(&scaled, labels, classes, RELIABILITY_BINS),
        n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{Purpose, Stream};

    /// Stored probabilities softmax(z) of `n` rows with logits z ~ N(0, scale^2), and labels
    /// drawn from softmax(z / t0): a model whose calibration is fixed by temperature t0.
    fn overconfident(n: usize, c: usize, scale: f64, t0: f64, seed: u64) -> (Vec<f32>, Vec<usize>) {
        let mut rng = Stream::new(seed, Purpose::Other, 0, 0);
        let mut probs = Vec::with_capacity(n * c);
        let mut labels = Vec::with_capacity(n);
        for _ in 0..n {
            let z: Vec<f64> = (0..c).map(|_| scale * rng.normal()).collect();
            let softmax = |t: f64| {
                let m = z.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                let e: Vec<f64> = z.iter().map(|&v| ((v - m) / t).exp()).collect();
                let s: f64 = e.iter().sum();
                e.into_iter().map(|v| v / s).collect::<Vec<f64>>()
            };
            probs.extend(softmax(1.0).into_iter().map(|p| p as f32));
            let truth = softmax(t0);
            let u = rng.next_f64();
            let mut acc = 0.0;
            let mut y = c - 1;
            for (j, p) in truth.iter().enumerate() {
                acc += p;
                if u < acc {
                    y = j;
                    break;
                }
            }
            labels.push(y);
        }
        (probs, labels)
    }

    #[test]
    fn recovers_a_known_temperature() {
        for (t0, seed) in [(2.5, 1), (0.6, 2), (1.0, 3)] {
            let (probs, labels) = overconfident(20_000, 10, 3.0, t0, seed);
            let fit = fit_temperature(&probs, &labels, 10);
            let rel = (fit.temperature / t0).ln().abs();
            assert!(rel < 0.05, "fitted {} for t0 = {t0}", fit.temperature);
            assert!(fit.log_loss_after <= fit.log_loss_before + 1e-9, "{fit:?}");
            if t0 != 1.0 {
                assert!(fit.ece_after < fit.ece_before, "{fit:?}");
            }
            assert_eq!(fit.n, 20_000);
        }
    }

    #[test]
    fn temperature_one_is_identity_on_normalised_rows() {
        let (probs, _) = overconfident(50, 6, 2.0, 1.0, 9);
        let out = apply_temperature(&probs, 6, 1.0);
        for (a, b) in probs.iter().zip(&out) {
            assert!((a - b).abs() <= 1e-6 * a.max(1e-30) + 1e-12, "{a} vs {b}");
        }
        // Unnormalised rows come back normalised; zero rows uniform; zeros stay (near) zero.
        let out = apply_temperature(&[2.0, 2.0, 0.0, 0.0, 0.0, 0.0], 3, 1.0);
        assert_eq!(&out[..2], &[0.5, 0.5]);
        assert!(out[2] < 1e-29);
        for v in &out[3..] {
            assert!((v - 1.0 / 3.0).abs() < 1e-7);
        }
    }

    #[test]
    fn extreme_temperatures_stay_finite_and_keep_the_argmax() {
        let probs = [0.0f32, 1e-38, 0.3, 0.7];
        for t in [T_MIN, 0.5, 3.0, T_MAX] {
            let out = apply_temperature(&probs, 4, t);
            assert!(out.iter().all(|v| v.is_finite() && *v >= 0.0), "{out:?}");
            let s: f32 = out.iter().sum();
            assert!((s - 1.0).abs() < 1e-6);
            assert_eq!(
                out.iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .unwrap()
                    .0,
                3
            );
        }
    }

    #[test]
    fn fitting_never_increases_the_nll() {
        // Assorted data, including rows with zeros on the label, and a perfectly confident set
        // whose optimum sits at the lower end of the interval.
        let (mut probs, mut labels) = overconfident(500, 5, 1.5, 1.7, 4);
        probs[..5].copy_from_slice(&[0.0, 0.5, 0.5, 0.0, 0.0]);
        labels[0] = 0;
        for (p, l) in [(probs, labels), (vec![0.9, 0.1, 0.2, 0.8], vec![0, 1])] {
            let c = p.len() / l.len();
            let fit = fit_temperature(&p, &l, c);
            let before = temperature_nll(&p, &l, c, 1.0);
            let after = temperature_nll(&p, &l, c, fit.temperature);
            assert!(
                after <= before,
                "{after} > {before} at T = {}",
                fit.temperature
            );
            assert!((T_MIN..=T_MAX).contains(&fit.temperature));
        }
        let fit = fit_temperature(&[0.9, 0.1, 0.2, 0.8], &[0, 1], 2);
        assert!((fit.temperature - T_MIN).abs() < 1e-6, "{fit:?}");
    }

    #[test]
    fn fit_round_trips_through_json() {
        let fit = fit_temperature(&[0.6, 0.4, 0.3, 0.7, 0.5, 0.5], &[0, 1, 1], 2);
        let back: TemperatureFit =
            serde_json::from_str(&serde_json::to_string(&fit).unwrap()).unwrap();
        assert_eq!(fit, back);
    }
}
