//! How well the unknown scores tell images of the run's classes from images of classes it was
//! never trained on (held-out classes: a true class, from `--data` or the `label` column, that
//! is not among the predictions' classes). Per score: AUROC, and at the run's threshold (the
//! predictions file's `plankton.model` JSON carries the thresholds of `unknown.json`) the
//! false-unknown rate on known images and the share of held-out images caught. Drawn as score
//! histograms of known vs held-out images.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::sinks::plot::{render_charts, Bars, Chart, LineChart, PlotError, Series};
use plankton_core::unknown::{auroc, Score};

/// One predicted image whose true class is known.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredRow {
    /// Its true class is not one the model was trained on.
    pub held_out: bool,
    pub class: String,
    /// By [`Score::ALL`] order: 1 - max p, energy, mahalanobis (None where the file lacks it).
    pub scores: [Option<f64>; 3],
    /// The file's `unknown` column.
    pub flagged: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScoreEvaluation {
    pub score: Score,
    /// Known vs held-out images that have this score.
    pub known: usize,
    pub held_out: usize,
    pub auroc: Option<f64>,
    /// The run's threshold for the score, if the predictions carry one.
    pub threshold: Option<f64>,
    /// Known images above the threshold.
    pub false_unknown_rate: Option<f64>,
    /// Held-out images above the threshold.
    pub held_out_detected: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HeldOutClass {
    pub class: String,
    pub images: usize,
    /// Flagged by the file's `unknown` column.
    pub flagged: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UnknownEvaluation {
    pub known: usize,
    pub held_out: usize,
    pub scores: Vec<ScoreEvaluation>,
    /// The score that decided the `unknown` column, if any.
    pub rule: Option<Score>,
    /// The `unknown` column: known images flagged, held-out images flagged.
    pub rule_false_unknown_rate: Option<f64>,
    pub rule_held_out_detected: Option<f64>,
    pub held_out_classes: Vec<HeldOutClass>,
}

fn share(flags: impl Iterator<Item = bool>) -> Option<f64> {
    let (mut n, mut yes) = (0usize, 0usize);
    for f in flags {
        n += 1;
        yes += usize::from(f);
    }
    (n > 0).then(|| yes as f64 / n as f64)
}

/// None without held-out images.
pub fn evaluate_unknown(
    rows: &[ScoredRow],
    thresholds: &BTreeMap<Score, f64>,
    rule: Option<Score>,
) -> Option<UnknownEvaluation> {
    let held_out = rows.iter().filter(|r| r.held_out).count();
    if held_out == 0 {
        return None;
    }
    let scores = Score::ALL
        .iter()
        .enumerate()
        .map(|(k, &score)| {
            let (values, unknown): (Vec<f64>, Vec<bool>) = rows
                .iter()
                .filter_map(|r| r.scores[k].map(|v| (v, r.held_out)))
                .unzip();
            let threshold = thresholds.get(&score).copied();
            let above = |want_held_out: bool| {
                threshold.and_then(|t| {
                    share(
                        values
                            .iter()
                            .zip(&unknown)
                            .filter(|(_, &h)| h == want_held_out)
                            .map(|(&v, _)| v > t),
                    )
                })
            };
            ScoreEvaluation {
                score,
                known: unknown.iter().filter(|&&h| !h).count(),
                held_out: unknown.iter().filter(|&&h| h).count(),
                auroc: auroc(&values, &unknown),
                threshold,
                false_unknown_rate: above(false),
                held_out_detected: above(true),
            }
        })
        .collect();
    let flagged = |want_held_out: bool| {
        share(
            rows.iter()
                .filter(|r| r.held_out == want_held_out)
                .filter_map(|r| r.flagged),
        )
    };
    let mut classes: BTreeMap<&str, Vec<&ScoredRow>> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.held_out) {
        classes.entry(&r.class).or_default().push(r);
    }
    Some(UnknownEvaluation {
        known: rows.len() - held_out,
        held_out,
        scores,
        rule,
        rule_false_unknown_rate: flagged(false),
        rule_held_out_detected: flagged(true),
        held_out_classes: classes
            .into_iter()
            .map(|(class, rs)| HeldOutClass {
                class: class.to_string(),
                images: rs.len(),
                flagged: share(rs.iter().filter_map(|r| r.flagged)),
            })
            .collect(),
    })
}

/// Normalised histogram (share of images per bin) over `bins` equal bins of [lo, hi].
fn histogram(values: &[f64], lo: f64, hi: f64, bins: usize) -> Vec<(f64, f64, f64)> {
    let width = (hi - lo) / bins as f64;
    let mut counts = vec![0usize; bins];
    for &v in values {
        let b = (((v - lo) / width).floor().max(0.0) as usize).min(bins - 1);
        counts[b] += 1;
    }
    let n = values.len().max(1) as f64;
    counts
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            let left = lo + i as f64 * width;
            (left, left + width, c as f64 / n)
        })
        .collect()
}

/// `unknown.png`: for each score present, the histogram of known images (bars), of held-out
/// images (an outline) and the run's threshold (dashed).
pub fn render_unknown_histograms(
    path: &Path,
    rows: &[ScoredRow],
    evaluation: &UnknownEvaluation,
) -> Result<(), PlotError> {
    const BINS: usize = 30;
    let mut charts = Vec::new();
    for (k, s) in evaluation.scores.iter().enumerate() {
        let known: Vec<f64> = rows
            .iter()
            .filter(|r| !r.held_out)
            .filter_map(|r| r.scores[k])
            .filter(|v| v.is_finite())
            .collect();
        let held: Vec<f64> = rows
            .iter()
            .filter(|r| r.held_out)
            .filter_map(|r| r.scores[k])
            .filter(|v| v.is_finite())
            .collect();
        if known.is_empty() || held.is_empty() {
            continue;
        }
        // The 99th percentiles bound the axis: a few far outliers would squash the rest.
        let mut all: Vec<f64> = known.iter().chain(&held).copied().collect();
        all.sort_by(f64::total_cmp);
        let lo = all[0];
        let mut hi = all[((all.len() - 1) as f64 * 0.99) as usize];
        if let Some(t) = s.threshold.filter(|t| t.is_finite()) {
            hi = hi.max(t);
        }
        if hi <= lo {
            hi = lo + 1.0;
        }
        let clipped = |v: &[f64]| -> Vec<f64> { v.iter().map(|&x| x.min(hi)).collect() };
        let known_bars = histogram(&clipped(&known), lo, hi, BINS);
        let held_bars = histogram(&clipped(&held), lo, hi, BINS);
        let top = known_bars
            .iter()
            .chain(&held_bars)
            .map(|b| b.2)
            .fold(0.0, f64::max)
            * 1.1;
        let mut outline = Vec::new();
        for &(l, r, h) in &held_bars {
            outline.push((l, h));
            outline.push((r, h));
        }
        let mut series = vec![Series {
            name: format!("held-out classes (n = {})", held.len()),
            points: outline,
            colour: (230, 97, 1),
            dashed: false,
        }];
        if let Some(t) = s.threshold.filter(|t| t.is_finite()) {
            series.push(Series {
                name: "run's threshold".into(),
                points: vec![(t, 0.0), (t, top)],
                colour: (40, 40, 40),
                dashed: true,
            });
        }
        charts.push(Chart {
            lines: LineChart {
                title: format!(
                    "{} (AUROC {})",
                    s.score,
                    s.auroc.map_or("n/a".into(), |a| format!("{a:.3}"))
                ),
                x_label: match s.score {
                    Score::MaxProbability => "1 - max p".into(),
                    Score::Energy => "energy (-logsumexp logits)".into(),
                    Score::Mahalanobis => "squared Mahalanobis distance".into(),
                },
                y_label: "share of images".into(),
                series,
                log_y: false,
                y_range: Some((0.0, top.max(1e-3))),
            },
            bars: vec![Bars {
                name: format!("known classes (n = {})", known.len()),
                bars: known_bars,
                colour: (158, 202, 225),
            }],
        });
    }
    if charts.is_empty() {
        return Err(PlotError::Invalid {
            path: path.to_path_buf(),
            reason: "no score with both known and held-out images".into(),
        });
    }
    let width = 560 * charts.len() as u32;
    render_charts(path, &charts, width, 480)
}

/// The report's unknown section (markdown).
pub fn summary_markdown(e: &UnknownEvaluation) -> String {
    let pct = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{:.1}%", 100.0 * v));
    let mut t = format!(
        "\n## Unknown images: {} of known classes vs {} of held-out classes\n\n| score | AUROC | threshold | known called unknown | held-out caught |\n|---|---|---|---|---|\n",
        e.known, e.held_out
    );
    for s in &e.scores {
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            s.score,
            s.auroc.map_or("n/a".into(), |a| format!("{a:.3}")),
            s.threshold.map_or("n/a".into(), |v| format!("{v:.4}")),
            pct(s.false_unknown_rate),
            pct(s.held_out_detected)
        ));
    }
    if let Some(rule) = e.rule {
        t.push_str(&format!(
            "\nThe `unknown` column ({rule} rule): {} of known images, {} of held-out images.\n",
            pct(e.rule_false_unknown_rate),
            pct(e.rule_held_out_detected)
        ));
    }
    t.push_str("\n| held-out class | images | flagged unknown |\n|---|---|---|\n");
    for c in &e.held_out_classes {
        t.push_str(&format!(
            "| {} | {} | {} |\n",
            c.class.replace('|', "\\|"),
            c.images,
            pct(c.flagged)
        ));
    }
    t.push_str("\n![score histograms](unknown.png)\n");
    t
}

/// Files of the unknown section.
pub fn unknown_png(dir: &Path) -> PathBuf {
    dir.join("unknown.png")
}
