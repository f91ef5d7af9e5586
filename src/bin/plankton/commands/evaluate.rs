//! `plankton evaluate`: scores, per-class figures and plots of a predictions file.

use super::prelude::*;

#[derive(Args)]
pub struct EvaluateArgs {
    /// The predictions Parquet file (from predict, blend, fuse, compact or the daemon).
    #[arg(long)]
    predictions: PathBuf,
    /// Dataset folder(s) holding the true classes (default: the file's `label` column).
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// Report folder: report.json, summary.md, per_class.csv, least_confident.csv, PNGs.
    #[arg(long)]
    out: Option<PathBuf>,
    /// How many of the least confident images to list.
    #[arg(long, default_value_t = 50)]
    least_confident: usize,
}

pub async fn run(a: EvaluateArgs) -> Result<()> {
    // Reading Parquet and drawing the report are blocking work: off the async runtime's threads.
    let s = tokio::task::spawn_blocking(move || {
        plankton::evaluate::run(&a.predictions, &a.data, a.out.as_deref(), a.least_confident)
    })
    .await??;
    print!("{}", evaluation_text(&s));
    Ok(())
}

fn evaluation_text(s: &plankton::evaluate::EvaluateSummary) -> String {
    let e = &s.evaluation;
    let mut t = format!("{} images: log loss {:.4}", e.n, e.log_loss);
    for (k, acc) in e.top_k.iter().enumerate() {
        t.push_str(&format!(", top-{} {:.3}", k + 1, acc));
    }
    t.push_str(&format!(
        ", ECE {:.4}, macro precision {:.3} / recall {:.3}\n",
        e.ece, e.macro_avg.precision, e.macro_avg.recall
    ));
    if s.failed > 0 || s.unlabelled > 0 {
        t.push_str(&format!(
            "not scored: {} unreadable image(s), {} without a class the model knows{}\n",
            s.failed,
            s.unlabelled,
            s.unknown.as_ref().map_or(String::new(), |u| format!(
                " ({} of them of held-out classes)",
                u.held_out
            ))
        ));
    }
    if let Some(u) = &s.unknown {
        t.push_str(&format!(
            "unknown scores, {} images of known classes vs {} of held-out classes ({}):\n",
            u.known,
            u.held_out,
            u.held_out_classes
                .iter()
                .map(|c| c.class.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let pct = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{:.1}%", 100.0 * v));
        for sc in &u.scores {
            t.push_str(&format!(
                "  {:<16} AUROC {}  at the run's threshold: known called unknown {}, held-out caught {}\n",
                sc.score.to_string(),
                sc.auroc.map_or("n/a".into(), |a| format!("{a:.3}")),
                pct(sc.false_unknown_rate),
                pct(sc.held_out_detected)
            ));
        }
        if let Some(rule) = u.rule {
            t.push_str(&format!(
                "  `unknown` column ({rule} rule): known {}, held-out {}\n",
                pct(u.rule_false_unknown_rate),
                pct(u.rule_held_out_detected)
            ));
        }
    }
    if let Some(f) = &s.files {
        t.push_str(&format!("report: {} (summary.md, report.json, confusion_matrix.png, reliability.png, least_confident.csv{})\n", f.summary_md.parent().unwrap_or(Path::new(".")).display(), if s.unknown.is_some() { ", unknown.png, unknown.json" } else { "" }));
    }
    t
}
