//! The evaluation report of a set of scored images: the numbers as JSON and CSV, a confusion
//! matrix and a reliability diagram as PNG, and a short Markdown summary for people.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::plot::{
    render_charts, render_heatmap_with_text, Bars, Chart, Heatmap, LineChart, PlotError, Series,
};
use crate::table::{self, csv_bytes};
use plankton_core::metrics::{Evaluation, PerClass};

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{path}: cannot write: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot serialise the evaluation: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Plot(#[from] PlotError),
    #[error("cannot write a report: {0}")]
    Invalid(String),
}

/// The files [`write_report`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportFiles {
    pub json: PathBuf,
    pub per_class_csv: PathBuf,
    pub least_confident_csv: PathBuf,
    pub confusion_png: PathBuf,
    pub reliability_png: PathBuf,
    pub summary_md: PathBuf,
}

impl ReportFiles {
    pub fn all(&self) -> [&Path; 6] {
        [
            &self.json,
            &self.per_class_csv,
            &self.least_confident_csv,
            &self.confusion_png,
            &self.reliability_png,
            &self.summary_md,
        ]
    }
}

/// Classes up to this many get their counts printed in the confusion matrix's cells.
pub const ANNOTATE_UP_TO: usize = 30;
/// Least confident images listed in summary.md (the CSV has all the evaluation kept).
pub const SUMMARY_UNCERTAIN: usize = 10;
/// Worst classes by recall listed in summary.md.
pub const SUMMARY_WORST: usize = 5;

const BLUE: (u8, u8, u8) = (31, 119, 180);
const RED: (u8, u8, u8) = (214, 39, 40);
const GREY: (u8, u8, u8) = (120, 120, 120);

/// Writes report.json, per_class.csv, least_confident.csv, confusion_matrix.png,
/// reliability.png and summary.md into `dir` (created if needed). `ids` and `paths` are indexed
/// by the evaluation's rows (`Uncertain::index`); each may be empty, leaving its column blank.
pub fn write_report(
    dir: &Path,
    eval: &Evaluation,
    ids: &[String],
    paths: &[String],
    title: &str,
) -> Result<ReportFiles, ReportError> {
    for (what, v) in [("ids", ids), ("paths", paths)] {
        if !v.is_empty() && v.len() != eval.n {
            return Err(ReportError::Invalid(format!(
                "{} {what} for {} evaluated images",
                v.len(),
                eval.n
            )));
        }
    }
    if let Some(u) = eval.least_confident.iter().find(|u| u.index >= eval.n) {
        return Err(ReportError::Invalid(format!(
            "least confident row {} of {} images",
            u.index, eval.n
        )));
    }
    std::fs::create_dir_all(dir).map_err(|source| ReportError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let files = ReportFiles {
        json: dir.join("report.json"),
        per_class_csv: dir.join("per_class.csv"),
        least_confident_csv: dir.join("least_confident.csv"),
        confusion_png: dir.join("confusion_matrix.png"),
        reliability_png: dir.join("reliability.png"),
        summary_md: dir.join("summary.md"),
    };
    let mut json = serde_json::to_string_pretty(eval).map_err(|source| ReportError::Json {
        path: files.json.clone(),
        source,
    })?;
    json.push('\n');
    write(&files.json, &json)?;
    write(&files.per_class_csv, per_class_csv(eval))?;
    write(
        &files.least_confident_csv,
        least_confident_csv(eval, ids, paths),
    )?;
    render_confusion(&files.confusion_png, eval, title)?;
    render_reliability(&files.reliability_png, eval, title)?;
    write(&files.summary_md, summary_md(eval, ids, title))?;
    Ok(files)
}

fn write(path: &Path, text: impl AsRef<[u8]>) -> Result<(), ReportError> {
    plankton_core::fsx::write_atomic(path, text.as_ref()).map_err(|e| ReportError::Io {
        path: e.path,
        source: e.source,
    })
}

fn per_class_csv(eval: &Evaluation) -> Vec<u8> {
    let header = [
        "class",
        "support",
        "predicted",
        "precision",
        "recall",
        "f1",
        "log_loss",
    ];
    csv_bytes(
        &header,
        eval.per_class.iter().map(|p| {
            vec![
                p.class.clone(),
                p.support.to_string(),
                p.predicted.to_string(),
                table::num(p.precision),
                table::num(p.recall),
                table::num(p.f1),
                p.log_loss.map_or(String::new(), table::num),
            ]
        }),
    )
}

fn lookup(v: &[String], i: usize) -> &str {
    v.get(i).map_or("", String::as_str)
}

fn least_confident_csv(eval: &Evaluation, ids: &[String], paths: &[String]) -> Vec<u8> {
    let header = [
        "rank",
        "image",
        "path",
        "predicted",
        "confidence",
        "margin",
        "entropy",
        "true_class",
        "correct",
    ];
    csv_bytes(
        &header,
        eval.least_confident.iter().enumerate().map(|(rank, u)| {
            vec![
                (rank + 1).to_string(),
                lookup(ids, u.index).to_string(),
                lookup(paths, u.index).to_string(),
                u.predicted.clone(),
                table::num(u.confidence),
                table::num(u.margin),
                table::num(u.entropy),
                u.true_class.clone(),
                u.correct.to_string(),
            ]
        }),
    )
}

/// Cell size giving a readable matrix: large cells with room for counts for few classes, and
/// an image under about 2,500 px for many (18 px cells for 121 classes; every label still fits
/// since the font is 8 px high).
pub fn confusion_cell_px(classes: usize) -> u32 {
    let c = classes.max(1) as u32;
    if classes <= ANNOTATE_UP_TO {
        (900 / c).clamp(24, 60)
    } else {
        (2200 / c).clamp(2, 40)
    }
}

fn render_confusion(path: &Path, eval: &Evaluation, title: &str) -> Result<(), PlotError> {
    // Rows without support have nothing to normalise: NaN, drawn grey.
    let values: Vec<Vec<f64>> = eval
        .confusion
        .iter()
        .map(|row| {
            let total: u64 = row.iter().sum();
            row.iter()
                .map(|&k| {
                    if total == 0 {
                        f64::NAN
                    } else {
                        k as f64 / total as f64
                    }
                })
                .collect()
        })
        .collect();
    let annotate = eval.classes.len() <= ANNOTATE_UP_TO;
    let heading = if annotate {
        "confusion (rows: true, cols: predicted; shade: row fraction, numbers: counts)"
    } else {
        "confusion (rows: true, cols: predicted; shade: row fraction)"
    };
    let map = Heatmap {
        title: join_title(title, heading),
        row_labels: eval.classes.clone(),
        col_labels: eval.classes.clone(),
        values,
        annotate: false,
    };
    let texts: Vec<Vec<String>> = eval
        .confusion
        .iter()
        .map(|row| {
            row.iter()
                .map(|&k| {
                    if annotate && k > 0 {
                        k.to_string()
                    } else {
                        String::new()
                    }
                })
                .collect()
        })
        .collect();
    render_heatmap_with_text(path, &map, confusion_cell_px(eval.classes.len()), &texts)
}

fn join_title(title: &str, what: &str) -> String {
    if title.is_empty() {
        what.to_string()
    } else {
        format!("{title}: {what}")
    }
}

fn render_reliability(path: &Path, eval: &Evaluation, title: &str) -> Result<(), PlotError> {
    let filled: Vec<_> = eval.reliability.iter().filter(|b| b.count > 0).collect();
    let ece = if eval.ece.is_nan() {
        "n/a".to_string()
    } else {
        format!("{:.4}", eval.ece)
    };
    let reliability = Chart {
        lines: LineChart {
            title: join_title(title, &format!("reliability (ECE = {ece})")),
            x_label: "top-1 confidence".into(),
            y_label: "accuracy".into(),
            series: vec![
                Series {
                    name: "perfect calibration".into(),
                    points: vec![(0.0, 0.0), (1.0, 1.0)],
                    colour: GREY,
                    dashed: true,
                },
                Series {
                    name: "bin: mean confidence, accuracy".into(),
                    points: filled.iter().map(|b| (b.confidence, b.accuracy)).collect(),
                    colour: RED,
                    dashed: false,
                },
            ],
            log_y: false,
            y_range: Some((0.0, 1.0)),
        },
        bars: vec![Bars {
            name: "accuracy per bin".into(),
            bars: filled
                .iter()
                .map(|b| (b.lower, b.upper, b.accuracy))
                .collect(),
            colour: (158, 202, 225),
        }],
    };
    let max = filled.iter().map(|b| b.count).max().unwrap_or(0);
    let counts = Chart {
        lines: LineChart {
            title: format!("images per bin (n = {})", eval.n),
            x_label: "top-1 confidence".into(),
            y_label: "images".into(),
            series: Vec::new(),
            log_y: false,
            y_range: (max > 0).then_some((0.0, max as f64 * 1.08)),
        },
        bars: vec![Bars {
            name: String::new(),
            // A zero-height bar over 0..1 (not drawn) pins the x extent to the full range.
            bars: std::iter::once((0.0, 1.0, 0.0))
                .chain(filled.iter().map(|b| (b.lower, b.upper, b.count as f64)))
                .collect(),
            colour: BLUE,
        }],
    };
    render_charts(path, &[reliability, counts], 1300, 520)
}

fn pct(v: f64) -> String {
    if v.is_nan() {
        "n/a".into()
    } else {
        format!("{:.2}%", 100.0 * v)
    }
}

fn num(v: f64, digits: usize) -> String {
    if v.is_nan() {
        "n/a".into()
    } else {
        format!("{v:.digits$}")
    }
}

fn md(s: &str) -> String {
    s.replace('|', "\\|")
}

/// Most frequent wrong prediction for a class: (class, count).
fn most_confused(eval: &Evaluation, k: usize) -> Option<(&str, u64)> {
    eval.confusion[k]
        .iter()
        .enumerate()
        .filter(|&(j, &n)| j != k && n > 0)
        .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(&a.0)))
        .map(|(j, &n)| (eval.classes[j].as_str(), n))
}

fn summary_md(eval: &Evaluation, ids: &[String], title: &str) -> String {
    let mut s = String::new();
    let heading = if title.is_empty() {
        "Evaluation"
    } else {
        title
    };
    let _ = writeln!(s, "# {}\n", md(heading));
    let _ = writeln!(s, "{} images, {} classes.\n", eval.n, eval.classes.len());
    let _ = writeln!(s, "| metric | value |\n|---|---|");
    let _ = writeln!(
        s,
        "| log loss (Kaggle: rows normalised, clipped to [1e-15, 1-1e-15]) | {} |",
        num(eval.log_loss, 4)
    );
    for (k, acc) in eval.top_k.iter().enumerate() {
        let _ = writeln!(s, "| top-{} accuracy | {} |", k + 1, pct(*acc));
    }
    let _ = writeln!(
        s,
        "| expected calibration error ({} bins) | {} |",
        eval.reliability.len(),
        num(eval.ece, 4)
    );
    let _ = writeln!(s, "| mean entropy (nats) | {} |", num(eval.mean_entropy, 4));
    let _ = writeln!(
        s,
        "| macro precision / recall / F1 | {} / {} / {} |",
        num(eval.macro_avg.precision, 4),
        num(eval.macro_avg.recall, 4),
        num(eval.macro_avg.f1, 4)
    );
    let _ = writeln!(
        s,
        "| weighted precision / recall / F1 | {} / {} / {} |",
        num(eval.weighted_avg.precision, 4),
        num(eval.weighted_avg.recall, 4),
        num(eval.weighted_avg.f1, 4)
    );
    let never = eval.per_class.iter().filter(|p| p.predicted == 0).count();
    if never > 0 {
        let _ = writeln!(
            s,
            "\n{never} class(es) never predicted: their precision counts as 0 in the averages."
        );
    }

    let mut worst: Vec<(usize, &PerClass)> = eval
        .per_class
        .iter()
        .enumerate()
        .filter(|(_, p)| p.support > 0)
        .collect();
    worst.sort_by(|a, b| {
        a.1.recall
            .total_cmp(&b.1.recall)
            .then(b.1.support.cmp(&a.1.support))
            .then(a.0.cmp(&b.0))
    });
    let _ = writeln!(
        s,
        "\n## Worst {} classes by recall\n\n| class | support | recall | precision | most often mistaken for |\n|---|---|---|---|---|",
        worst.len().min(SUMMARY_WORST)
    );
    for &(k, p) in worst.iter().take(SUMMARY_WORST) {
        let confused =
            most_confused(eval, k).map_or("-".to_string(), |(c, n)| format!("{} ({n})", md(c)));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            md(&p.class),
            p.support,
            pct(p.recall),
            pct(p.precision),
            confused
        );
    }

    let shown = eval.least_confident.len().min(SUMMARY_UNCERTAIN);
    let _ = writeln!(
        s,
        "\n## Least confident images (first {shown}; all kept are in least_confident.csv)\n\n\
         | rank | image | predicted | confidence | margin | true class | correct |\n\
         |---|---|---|---|---|---|---|"
    );
    for (rank, u) in eval.least_confident.iter().take(shown).enumerate() {
        let image = match lookup(ids, u.index) {
            "" => format!("row {}", u.index),
            id => md(id),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            rank + 1,
            image,
            md(&u.predicted),
            num(u.confidence, 4),
            num(u.margin, 4),
            md(&u.true_class),
            if u.correct { "yes" } else { "no" }
        );
    }
    let _ = writeln!(
        s,
        "\nFiles: report.json, per_class.csv, least_confident.csv, confusion_matrix.png, reliability.png."
    );
    s
}
