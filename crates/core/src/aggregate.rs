//! Aggregation of the per-transform (per-view) network outputs of one image into one
//! probability row (SPEC.md "Test-time augmentation", the reference's predict_convnet.py
//! averaging methods).
//!
//! Inputs are LOG-probabilities (log_softmax of the logits), `views x classes` row-major. Every
//! view is first renormalised in f64 (`logp - logsumexp(logp)`), so rows only need to be
//! log-probabilities up to a per-view additive constant: raw logits give the same result. All
//! arithmetic is f64 and subtracts the maximum before exponentiating.

use serde::{Deserialize, Serialize};

/// How the views of one image are combined.
///
/// `MeanLogProbability` and `GeometricMean` are mathematically the same distribution: softmax of
/// the mean log-probability equals the renormalised geometric mean of the probabilities (each
/// view's log-probabilities differ from its logits by a per-view constant, which the final
/// normalisation removes). The reference had both as separate methods ("avg-logits": mean the
/// logits, then softmax; "avg-probs-geom": mean log(softmax), then softmax), so both names are
/// kept; they agree to rounding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// Mean over views of the probabilities (the reference's default "avg-probs").
    #[default]
    MeanProbability,
    /// Softmax of the mean log-probability (the reference's "avg-logits").
    MeanLogProbability,
    /// Renormalised geometric mean of the probabilities (the reference's "avg-probs-geom").
    GeometricMean,
    /// `sum_v w_v p_v / sum_v w_v` with `w_v = exp(-H(p_v))` (the reference's "avg-probs-ent").
    EntropyWeighted,
}

/// Parses a name as the config writes it (`geometric_mean`) or as the command line does
/// (`geometric-mean`).
impl std::str::FromStr for Aggregation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let snake = s.replace('-', "_");
        Aggregation::ALL
            .into_iter()
            .find(|a| a.name() == snake)
            .ok_or_else(|| {
                let names: Vec<String> = Aggregation::ALL
                    .iter()
                    .map(|a| a.name().replace('_', "-"))
                    .collect();
                format!(
                    "unknown aggregation `{s}`: expected one of {}",
                    names.join(", ")
                )
            })
    }
}

impl Aggregation {
    pub const ALL: [Aggregation; 4] = [
        Aggregation::MeanProbability,
        Aggregation::MeanLogProbability,
        Aggregation::GeometricMean,
        Aggregation::EntropyWeighted,
    ];

    /// The snake_case name (as in the TOML config).
    pub fn name(self) -> &'static str {
        match self {
            Aggregation::MeanProbability => "mean_probability",
            Aggregation::MeanLogProbability => "mean_log_probability",
            Aggregation::GeometricMean => "geometric_mean",
            Aggregation::EntropyWeighted => "entropy_weighted",
        }
    }
}

impl std::fmt::Display for Aggregation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// log(sum(exp(row))) in f64, stable. `-inf` for an all `-inf` row.
fn log_sum_exp(row: impl Iterator<Item = f64> + Clone) -> f64 {
    let m = row.clone().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY || !m.is_finite() {
        return m;
    }
    m + row.map(|v| (v - m).exp()).sum::<f64>().ln()
}

/// Softmax of `z` written into `out` (max subtracted first).
fn softmax_into(z: &[f64], out: &mut [f64]) {
    let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut s = 0.0;
    for (o, &v) in out.iter_mut().zip(z) {
        *o = (v - m).exp();
        s += *o;
    }
    for o in out.iter_mut() {
        *o /= s;
    }
}

/// Divides `out` by its sum.
fn renormalise(out: &mut [f64]) {
    let s: f64 = out.iter().sum();
    for o in out.iter_mut() {
        *o /= s;
    }
}

/// Combines `log_probs` (`views x classes` row-major log-probabilities, views >= 1) into one
/// probability row `out` (length `classes`) that sums to 1.
///
/// Panics if `classes == 0`, `out.len() != classes`, or `log_probs` is empty or not a multiple
/// of `classes`.
pub fn aggregate(log_probs: &[f32], classes: usize, method: Aggregation, out: &mut [f64]) {
    assert!(classes > 0, "aggregate: classes must be > 0");
    assert_eq!(out.len(), classes, "aggregate: out has the wrong length");
    assert!(
        !log_probs.is_empty() && log_probs.len().is_multiple_of(classes),
        "aggregate: {} values is not a positive multiple of {classes} classes",
        log_probs.len()
    );
    let views = log_probs.len() / classes;
    // Per-view normalised log-probabilities in f64.
    let mut lp: Vec<f64> = Vec::with_capacity(log_probs.len());
    for row in log_probs.chunks_exact(classes) {
        let lse = log_sum_exp(row.iter().map(|&v| v as f64));
        lp.extend(row.iter().map(|&v| v as f64 - lse));
    }
    out.iter_mut().for_each(|o| *o = 0.0);
    match method {
        Aggregation::MeanProbability => {
            for row in lp.chunks_exact(classes) {
                for (o, &l) in out.iter_mut().zip(row) {
                    *o += l.exp();
                }
            }
            // Dividing by `views` is the reference's mean; the final renormalisation only
            // removes rounding.
            for o in out.iter_mut() {
                *o /= views as f64;
            }
            renormalise(out);
        }
        Aggregation::MeanLogProbability => {
            let mut mean = vec![0.0f64; classes];
            for row in lp.chunks_exact(classes) {
                for (m, &l) in mean.iter_mut().zip(row) {
                    *m += l;
                }
            }
            for m in mean.iter_mut() {
                *m /= views as f64;
            }
            softmax_into(&mean, out);
        }
        Aggregation::GeometricMean => {
            // prod_v p_v^(1/V), computed as exp(sum_v log(p_v) / V) relative to its maximum,
            // then renormalised.
            let mut logs = vec![0.0f64; classes];
            let w = 1.0 / views as f64;
            for row in lp.chunks_exact(classes) {
                for (g, &l) in logs.iter_mut().zip(row) {
                    *g += w * l;
                }
            }
            let m = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            for (o, &g) in out.iter_mut().zip(&logs) {
                *o = (g - m).exp();
            }
            renormalise(out);
        }
        Aggregation::EntropyWeighted => {
            let mut wsum = 0.0f64;
            for row in lp.chunks_exact(classes) {
                // H = -sum p log p, with 0 log 0 = 0 (p underflowed or log p = -inf).
                let h: f64 = row
                    .iter()
                    .map(|&l| {
                        let p = l.exp();
                        if p > 0.0 {
                            -p * l
                        } else {
                            0.0
                        }
                    })
                    .sum();
                let w = (-h).exp();
                wsum += w;
                for (o, &l) in out.iter_mut().zip(row) {
                    *o += w * l.exp();
                }
            }
            for o in out.iter_mut() {
                *o /= wsum;
            }
            renormalise(out);
        }
    }
}

/// What went wrong feeding an [`Aggregator`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AggregateError {
    /// A row of `got` arrived while `expected` still had `missing` views outstanding.
    Interleaved {
        expected: usize,
        got: usize,
        missing: usize,
    },
    /// A row had the wrong number of classes.
    RowLength { expected: usize, got: usize },
    /// The stream ended with `missing` views of record `record` outstanding.
    Incomplete { record: usize, missing: usize },
}

impl std::fmt::Display for AggregateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AggregateError::Interleaved {
                expected,
                got,
                missing,
            } => write!(
                f,
                "TTA views interleaved: record {got} started while record {expected} still \
                 misses {missing} view(s)"
            ),
            AggregateError::RowLength { expected, got } => {
                write!(f, "TTA row has {got} classes, expected {expected}")
            }
            AggregateError::Incomplete { record, missing } => write!(
                f,
                "TTA stream ended with record {record} missing {missing} view(s)"
            ),
        }
    }
}

impl std::error::Error for AggregateError {}

/// Streaming aggregation: collects the `views` consecutive rows of each record (in any batch
/// split) and emits the aggregated probability row once the record's last view has arrived.
///
/// Contract: the rows of one record arrive consecutively (all views of record r before any view
/// of the next record), as the predict job produces them. A row of a different record arriving
/// while one is incomplete is a bug upstream: [`Aggregator::try_push`] reports it as
/// [`AggregateError::Interleaved`] and drops the incomplete record's buffered rows, [`Aggregator::push`]
/// panics. Call [`Aggregator::finish`] at the end of the stream to check nothing was left behind
/// (the reference asserted the same about its remainder).
#[derive(Debug, Clone)]
pub struct Aggregator {
    classes: usize,
    views: usize,
    method: Aggregation,
    buf: Vec<f32>,
    current: Option<usize>,
}

impl Aggregator {
    /// Panics if `classes` or `views` is 0.
    pub fn new(classes: usize, views: usize, method: Aggregation) -> Self {
        assert!(classes > 0, "Aggregator: classes must be > 0");
        assert!(views > 0, "Aggregator: views must be > 0");
        Aggregator {
            classes,
            views,
            method,
            buf: Vec::with_capacity(classes * views),
            current: None,
        }
    }

    pub fn classes(&self) -> usize {
        self.classes
    }

    pub fn views(&self) -> usize {
        self.views
    }

    pub fn method(&self) -> Aggregation {
        self.method
    }

    /// Views buffered for the record in progress (0 between records).
    pub fn pending(&self) -> usize {
        self.buf.len() / self.classes
    }

    /// Adds one view row of `record`; returns `(record, probabilities)` when it completes the
    /// record. Panics on a protocol violation (see [`Aggregator::try_push`]).
    pub fn push(&mut self, record: usize, log_probs_row: &[f32]) -> Option<(usize, Vec<f64>)> {
        match self.try_push(record, log_probs_row) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        }
    }

    /// As [`Aggregator::push`], but reports interleaved records and wrong row lengths. After an
    /// `Interleaved` error the incomplete record is discarded and the offending row starts a new
    /// record; after a `RowLength` error the row is ignored.
    pub fn try_push(
        &mut self,
        record: usize,
        log_probs_row: &[f32],
    ) -> Result<Option<(usize, Vec<f64>)>, AggregateError> {
        if log_probs_row.len() != self.classes {
            return Err(AggregateError::RowLength {
                expected: self.classes,
                got: log_probs_row.len(),
            });
        }
        let mut err = None;
        if let Some(cur) = self.current {
            if cur != record {
                err = Some(AggregateError::Interleaved {
                    expected: cur,
                    got: record,
                    missing: self.views - self.pending(),
                });
                self.buf.clear();
            }
        }
        self.current = Some(record);
        self.buf.extend_from_slice(log_probs_row);
        if let Some(e) = err {
            // Only reachable with views >= 2 (a record in progress), so the new row alone
            // cannot complete its record here.
            return Err(e);
        }
        if self.pending() == self.views {
            let mut out = vec![0.0f64; self.classes];
            aggregate(&self.buf, self.classes, self.method, &mut out);
            self.buf.clear();
            self.current = None;
            return Ok(Some((record, out)));
        }
        Ok(None)
    }

    /// Pushes a batch: `records[i]` owns row `i` of `log_probs` (`records.len() x classes`).
    /// Returns the records completed by this batch, in order. Panics like [`Aggregator::push`].
    pub fn push_batch(&mut self, records: &[usize], log_probs: &[f32]) -> Vec<(usize, Vec<f64>)> {
        assert_eq!(
            log_probs.len(),
            records.len() * self.classes,
            "push_batch: rows and records disagree"
        );
        records
            .iter()
            .zip(log_probs.chunks_exact(self.classes))
            .filter_map(|(&r, row)| self.push(r, row))
            .collect()
    }

    /// Checks that no record is left incomplete at the end of the stream.
    pub fn finish(&self) -> Result<(), AggregateError> {
        match self.current {
            Some(record) if self.pending() > 0 => Err(AggregateError::Incomplete {
                record,
                missing: self.views - self.pending(),
            }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_softmax(z: &[f64]) -> Vec<f32> {
        let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        z.iter().map(|v| (v - lse) as f32).collect()
    }

    /// Deterministic pseudo-random views (xorshift), logits in [-4, 4).
    fn random_views(views: usize, classes: usize, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 * 8.0 - 4.0
        };
        (0..views)
            .flat_map(|_| {
                let z: Vec<f64> = (0..classes).map(|_| next()).collect();
                log_softmax(&z)
            })
            .collect()
    }

    fn agg(lp: &[f32], classes: usize, m: Aggregation) -> Vec<f64> {
        let mut out = vec![0.0; classes];
        aggregate(lp, classes, m, &mut out);
        out
    }

    #[test]
    fn names_are_snake_case_and_serde_agrees() {
        for m in Aggregation::ALL {
            let json = serde_json::to_string(&m).unwrap();
            assert_eq!(json, format!("\"{}\"", m.name()));
            let back: Aggregation = serde_json::from_str(&json).unwrap();
            assert_eq!(back, m);
        }
        assert_eq!(Aggregation::default(), Aggregation::MeanProbability);
    }

    #[test]
    fn single_view_returns_its_probabilities() {
        let lp = random_views(1, 6, 7);
        for m in Aggregation::ALL {
            let out = agg(&lp, 6, m);
            for (o, &l) in out.iter().zip(&lp) {
                assert!((o - (l as f64).exp()).abs() < 1e-6, "{m}: {o} vs {l}");
            }
        }
    }

    #[test]
    fn rows_sum_to_one() {
        for seed in 1..20 {
            let lp = random_views(9, 121, seed);
            for m in Aggregation::ALL {
                let s: f64 = agg(&lp, 121, m).iter().sum();
                assert!((s - 1.0).abs() < 1e-12, "{m}: {s}");
            }
        }
    }

    #[test]
    fn uniform_views_stay_uniform() {
        let c = 5;
        let lp = vec![-(c as f32).ln(); 3 * c];
        for m in Aggregation::ALL {
            for o in agg(&lp, c, m) {
                assert!((o - 0.2).abs() < 1e-12, "{m}: {o}");
            }
        }
    }

    #[test]
    fn mean_probability_is_the_plain_mean() {
        let lp = random_views(4, 7, 3);
        let out = agg(&lp, 7, Aggregation::MeanProbability);
        for c in 0..7 {
            let want: f64 = (0..4).map(|v| (lp[v * 7 + c] as f64).exp()).sum::<f64>() / 4.0;
            assert!((out[c] - want).abs() < 1e-6);
        }
    }

    #[test]
    fn mean_log_probability_and_geometric_mean_agree() {
        for seed in 1..30 {
            let lp = random_views(13, 37, seed);
            let a = agg(&lp, 37, Aggregation::MeanLogProbability);
            let b = agg(&lp, 37, Aggregation::GeometricMean);
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 1e-9, "{x} {y}");
            }
        }
    }

    #[test]
    fn logits_give_the_same_result_as_log_probabilities() {
        let lp = random_views(3, 8, 11);
        let shifted: Vec<f32> = lp
            .chunks(8)
            .enumerate()
            .flat_map(|(v, r)| r.iter().map(move |&x| x + 3.0 * v as f32))
            .collect();
        for m in Aggregation::ALL {
            let a = agg(&lp, 8, m);
            let b = agg(&shifted, 8, m);
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 1e-6, "{m}");
            }
        }
    }

    #[test]
    fn entropy_weighting_favours_the_confident_view() {
        // View 0 confident in class 0, view 1 nearly uniform leaning to class 1.
        let confident = log_softmax(&[8.0, 0.0, 0.0, 0.0]);
        let vague = log_softmax(&[0.0, 0.5, 0.0, 0.0]);
        let lp: Vec<f32> = confident.iter().chain(&vague).copied().collect();
        let mean = agg(&lp, 4, Aggregation::MeanProbability);
        let ent = agg(&lp, 4, Aggregation::EntropyWeighted);
        assert!(ent[0] > mean[0], "{ent:?} {mean:?}");
        assert!(ent[1] < mean[1]);
        // Exact weights: w = exp(-H).
        let p = |r: &[f32]| r.iter().map(|&l| (l as f64).exp()).collect::<Vec<_>>();
        let (p0, p1) = (p(&confident), p(&vague));
        let h = |p: &[f64]| -p.iter().map(|x| x * x.ln()).sum::<f64>();
        let (w0, w1) = ((-h(&p0)).exp(), (-h(&p1)).exp());
        for c in 0..4 {
            let want = (w0 * p0[c] + w1 * p1[c]) / (w0 + w1);
            assert!((ent[c] - want).abs() < 1e-6);
        }
    }

    #[test]
    fn zero_probabilities_are_handled() {
        // A view with exactly-zero probabilities (log p = -inf) and one with extreme logits.
        let lp = vec![
            0.0,
            f32::NEG_INFINITY,
            f32::NEG_INFINITY,
            -1e-30,
            -200.0,
            -300.0,
        ];
        for m in Aggregation::ALL {
            let out = agg(&lp, 3, m);
            assert!(
                out.iter().all(|v| v.is_finite() && *v >= 0.0),
                "{m}: {out:?}"
            );
            assert!((out.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            assert!(out[0] > 0.99);
        }
    }

    #[test]
    fn aggregator_groups_across_batch_boundaries() {
        let (classes, views, records) = (5, 4, 7);
        let all = random_views(views * records, classes, 99);
        let ids: Vec<usize> = (0..records).flat_map(|r| vec![100 + r; views]).collect();
        for method in Aggregation::ALL {
            let want: Vec<Vec<f64>> = all
                .chunks(views * classes)
                .map(|c| agg(c, classes, method))
                .collect();
            for batch in [1usize, 3, 4, 5, 11, 28, 100] {
                let mut a = Aggregator::new(classes, views, method);
                let mut got = Vec::new();
                for (rb, lb) in ids.chunks(batch).zip(all.chunks(batch * classes)) {
                    got.extend(a.push_batch(rb, lb));
                }
                a.finish().unwrap();
                assert_eq!(got.len(), records);
                for (r, (id, row)) in got.iter().enumerate() {
                    assert_eq!(*id, 100 + r);
                    assert_eq!(row, &want[r], "batch {batch}");
                }
            }
        }
    }

    #[test]
    fn aggregator_reports_protocol_errors() {
        let row = [0.0f32, -1.0, -2.0];
        let mut a = Aggregator::new(3, 2, Aggregation::MeanProbability);
        assert_eq!(a.try_push(1, &row), Ok(None));
        assert_eq!(a.pending(), 1);
        assert_eq!(
            a.finish(),
            Err(AggregateError::Incomplete {
                record: 1,
                missing: 1
            })
        );
        assert_eq!(
            a.try_push(2, &row),
            Err(AggregateError::Interleaved {
                expected: 1,
                got: 2,
                missing: 1
            })
        );
        // The offending row started record 2.
        assert!(a.try_push(2, &row).unwrap().is_some());
        assert_eq!(
            a.try_push(3, &row[..2]),
            Err(AggregateError::RowLength {
                expected: 3,
                got: 2
            })
        );
        assert_eq!(a.finish(), Ok(()));
    }

    #[test]
    #[should_panic(expected = "interleaved")]
    fn push_panics_on_interleaving() {
        let mut a = Aggregator::new(2, 3, Aggregation::GeometricMean);
        a.push(0, &[0.0, -1.0]);
        a.push(1, &[0.0, -1.0]);
    }

    #[test]
    fn names_parse_in_both_spellings_and_unknown_ones_list_the_choices() {
        for a in Aggregation::ALL {
            assert_eq!(a.name().parse::<Aggregation>(), Ok(a));
            assert_eq!(a.name().replace('_', "-").parse::<Aggregation>(), Ok(a));
        }
        let err = "median".parse::<Aggregation>().unwrap_err();
        assert!(
            err.contains("median") && err.contains("geometric-mean"),
            "{err}"
        );
    }
}
