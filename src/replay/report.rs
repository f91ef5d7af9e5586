//! The replay's report: the score after every stage, as JSON, Markdown and a bar chart.

use std::path::Path;

use super::plan::{Executed, Plan};
use super::{ReplayError, ReplayReport, StageScore};
use crate::blend;
use crate::evaluate;
use crate::scoring::{self, Scores};

/// Scores of a predictions file against the dataset's labels, if any of its rows has one.
fn scores_of(path: &Path, data: &Path) -> Option<Scores> {
    if !path.exists() {
        return None;
    }
    let l = evaluate::load_labelled(path, &[data.to_path_buf()]).ok()?;
    Some(scoring::score(&l.probs, &l.labels, l.class_names.len()))
}

impl Plan {
    /// The score after every stage, read from the files the steps wrote.
    pub fn report(&self, done: Executed) -> ReplayReport {
        let (cfg, layout, data) = (&self.cfg, &self.layout, self.data.as_path());
        let mut stages = Vec::new();
        // The member with the lowest one-pass validation loss stands for "a single network".
        let best = cfg
            .members
            .iter()
            .enumerate()
            .filter_map(|(k, m)| {
                scores_of(&layout.member(&m.name).join("valid-single.parquet"), data)
                    .map(|s| (k, s.log_loss))
            })
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(k, _)| k)
            .unwrap_or(0);
        let bm = &cfg.members[best];
        let dir = layout.member(&bm.name);
        let scored = |valid: &str, test: &str| {
            (
                scores_of(&dir.join(valid), data),
                scores_of(&dir.join(test), data),
            )
        };
        let (valid, test) = scored("valid-single.parquet", "test-single.parquet");
        stages.push(StageScore {
            stage: "single network".into(),
            source: format!("{}: one pass", bm.name),
            valid,
            test,
            note: "the member with the lowest one-pass validation loss".into(),
        });
        let (valid, test) = scored("valid.parquet", "test-main.parquet");
        stages.push(StageScore {
            stage: "+ TTA".into(),
            source: format!("{}: TTA", bm.name),
            valid,
            test,
            note: String::new(),
        });
        if bm.bagging > 0 {
            stages.push(StageScore {
                stage: "+ bagging".into(),
                source: format!("{}: {} models averaged", bm.name, bm.bagging + 1),
                valid: None,
                test: scores_of(&dir.join("test.parquet"), data),
                note: "bags validate on different images: test only".into(),
            });
        }
        if self.fuse_on {
            let (valid, test) = scored("valid-fused.parquet", "test-fused.parquet");
            stages.push(StageScore {
                stage: "+ fusion".into(),
                source: format!("{}: fused with {}", bm.name, cfg.fuse.sets.join("+")),
                valid,
                test,
                note: format!(
                    "validation out-of-fold ({} folds); {}",
                    cfg.fuse.folds,
                    self.blend_inputs().fuse_notes.join("; ")
                ),
            });
        }
        let blend_report: Option<blend::job::BlendReport> =
            std::fs::read_to_string(layout.blend().join("report.json"))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok());
        let blend_weights: Vec<(String, f64)> = blend_report
            .as_ref()
            .map(|r| {
                r.members
                    .iter()
                    .zip(&cfg.members)
                    .map(|(rm, m)| (m.name.clone(), rm.weight))
                    .collect()
            })
            .unwrap_or_default();
        let cv = blend_report
            .as_ref()
            .and_then(|r| r.selection.as_ref())
            .and_then(|s| {
                s.steps
                    .iter()
                    .map(|st| st.cv_log_loss)
                    .min_by(f64::total_cmp)
            });
        stages.push(StageScore {
            stage: "+ blend".into(),
            source: format!(
                "{} members",
                blend_weights.iter().filter(|(_, w)| *w > 0.0).count()
            ),
            valid: scores_of(&layout.blend_valid(), data),
            test: scores_of(&layout.blend_test(), data),
            note: match cv {
                Some(cv) => format!(
                    "validation is in-sample (weights fitted on it); cross-validated: {cv:.4}"
                ),
                None => "validation is in-sample (weights fitted on it)".into(),
            },
        });
        if self.pseudo_on {
            let (fv, ft) = self.final_predictions();
            stages.push(StageScore {
                stage: "+ pseudo-labels".into(),
                source: format!(
                    "(blend + mean of {} pseudo-label models) / 2",
                    cfg.pseudo.members.len() * cfg.pseudo.shards
                ),
                valid: scores_of(&fv, data),
                test: scores_of(&ft, data),
                note: String::new(),
            });
        }
        let submission = layout.submission();
        ReplayReport {
            name: cfg.name.clone(),
            stages,
            blend_weights,
            submission: submission.exists().then_some(submission),
            steps_run: done.ran,
            steps_skipped: done.skipped,
        }
    }
}

fn fmt_scores(s: &Option<Scores>) -> (String, String) {
    match s {
        Some(s) => (format!("{:.4}", s.log_loss), format!("{:.3}", s.top1)),
        None => ("-".into(), "-".into()),
    }
}

/// report.json, report.md and report.png in the output folder.
pub(super) fn write(root: &Path, report: &ReplayReport) -> Result<(), ReplayError> {
    let write = |name: &str, bytes: &[u8]| {
        let path = root.join(name);
        crate::fsx::write_atomic(&path, bytes).map_err(|source| ReplayError::Write { path, source })
    };
    write(
        "report.json",
        serde_json::to_string_pretty(report)
            .expect("serialisable")
            .as_bytes(),
    )?;
    let mut md = format!("# Replay `{}`\n\n| stage | predictions | valid log loss | valid top-1 | test log loss | test top-1 | note |\n|---|---|---|---|---|---|---|\n", report.name);
    for s in &report.stages {
        let (vl, va) = fmt_scores(&s.valid);
        let (tl, ta) = fmt_scores(&s.test);
        md.push_str(&format!(
            "| {} | {} | {vl} | {va} | {tl} | {ta} | {} |\n",
            s.stage, s.source, s.note
        ));
    }
    if !report.blend_weights.is_empty() {
        md.push_str("\nBlend weights: ");
        md.push_str(
            &report
                .blend_weights
                .iter()
                .map(|(n, w)| format!("{n} {w:.3}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
        md.push('\n');
    }
    write("report.md", md.as_bytes())?;
    if let Err(e) = render_stages(&root.join("report.png"), report) {
        // A picture is not worth failing a finished replay for.
        tracing::warn!(error = %e, "report.png not drawn");
    }
    Ok(())
}
/// Log loss after each stage as bars: validation (blue) beside test (red), stage k at x = k.
fn render_stages(path: &Path, report: &ReplayReport) -> Result<(), crate::sinks::plot::PlotError> {
    use crate::sinks::plot::{render_charts, Bars, Chart, LineChart};
    let bars =
        |pick: fn(&StageScore) -> &Option<Scores>, from: f64, to: f64| -> Vec<(f64, f64, f64)> {
            report
                .stages
                .iter()
                .enumerate()
                .filter_map(|(k, s)| {
                    pick(s)
                        .as_ref()
                        .map(|sc| (k as f64 + 1.0 + from, k as f64 + 1.0 + to, sc.log_loss))
                })
                .collect()
        };
    let names: Vec<String> = report
        .stages
        .iter()
        .enumerate()
        .map(|(k, s)| format!("{} {}", k + 1, s.stage.trim_start_matches("+ ")))
        .collect();
    let chart = Chart {
        lines: LineChart {
            title: format!("replay {}: log loss after each stage", report.name),
            x_label: format!("stage: {}", names.join(", ")),
            y_label: "log loss".into(),
            series: Vec::new(),
            log_y: false,
            y_range: None,
        },
        bars: vec![
            Bars {
                name: "validation".into(),
                bars: bars(|s| &s.valid, -0.4, 0.0),
                colour: (31, 119, 180),
            },
            Bars {
                name: "test".into(),
                bars: bars(|s| &s.test, 0.0, 0.4),
                colour: (214, 39, 40),
            },
        ],
    };
    render_charts(path, &[chart], 900, 480)
}
