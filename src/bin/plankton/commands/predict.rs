//! `plankton predict`: TTA predictions into Parquet (and a submission).

use super::prelude::*;

#[derive(Args)]
pub struct PredictArgs {
    /// The run directory written by `plankton train`.
    #[arg(long)]
    model: PathBuf,
    /// A dataset folder (competition layout, or IFCB bins), folders of images, or image files.
    #[arg(long, required = true, num_args = 1..)]
    data: Vec<PathBuf>,
    /// The predictions Parquet file to write.
    #[arg(long)]
    out: PathBuf,
    /// Which images of a dataset folder.
    #[arg(long, value_enum, default_value_t = plankton::predict::job::Subset::Test)]
    subset: plankton::predict::job::Subset,
    /// Transforms per image (default: the run's [tta], 70); 1 = one pass without augmentation.
    #[arg(long, value_parser = super::positive)]
    tta: Option<usize>,
    /// How an image's views are combined: mean-probability, mean-log-probability, geometric-mean
    /// or entropy-weighted (default: the run's [tta]).
    #[arg(long)]
    aggregation: Option<plankton::predict::aggregate::Aggregation>,
    /// Also write a Kaggle submission CSV.
    #[arg(long)]
    submission: Option<PathBuf>,
    /// Column order for the submission (default: the dataset's sampleSubmission.csv).
    #[arg(long)]
    sample_submission: Option<PathBuf>,
    /// best, final, or a .safetensors path.
    #[arg(long, default_value = "best")]
    weights: plankton::predict::job::Weights,
    /// auto (cuda:0 when a GPU is usable, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Patches per forward pass (default: the run's batch size).
    #[arg(long, value_parser = super::positive)]
    batch_size: Option<usize>,
    /// fp32 or bf16 (default: the run's [compute] precision).
    #[arg(long)]
    precision: Option<plankton::device::Precision>,
    /// Ignore the run's calibration.json.
    #[arg(long)]
    no_calibration: bool,
    /// Model id written in every row (default: <run>/<weights>@<content hash>).
    #[arg(long)]
    model_id: Option<String>,
    /// Classes listed per row in top_classes.
    #[arg(long, default_value_t = 5, value_parser = super::positive)]
    top_k: usize,
}

pub async fn run(a: PredictArgs) -> Result<()> {
    use plankton::predict::job::{self, PredictEvent, PredictOptions};
    let mut opts = PredictOptions::new(&a.model, a.data, &a.out);
    opts.subset = a.subset;
    opts.tta = a.tta;
    opts.aggregation = a.aggregation;
    opts.submission = a.submission;
    opts.sample_submission = a.sample_submission;
    opts.weights = a.weights;
    opts.device = parse_device(&a.device)?;
    opts.batch_size = a.batch_size;
    opts.precision = a.precision;
    opts.calibrate = !a.no_calibration;
    opts.model_id = a.model_id;
    opts.top_k = a.top_k;
    let handle = tokio::runtime::Handle::current();
    let s = tokio::task::spawn_blocking(move || {
        let mut pb: Option<ProgressBar> = None;
        let mut on_event = |e: PredictEvent| match e {
            PredictEvent::Started {
                images,
                views,
                model_id,
            } => {
                tracing::info!(images, views, model_id = %model_id, "predicting");
                let bar = progress(images as u64, "predict");
                bar.set_style(
                    ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} images ETA {eta}")
                        .unwrap()
                        .progress_chars("=> "),
                );
                pb = Some(bar);
            }
            PredictEvent::Progress {
                images_done,
                images_per_second,
                ..
            } => {
                if let Some(bar) = &pb {
                    bar.set_position(images_done as u64);
                    bar.set_message(format!("predict {images_per_second:.1} img/s"));
                }
            }
        };
        let r = job::run(&opts, &handle, &mut on_event);
        if let Some(bar) = pb {
            bar.finish_and_clear();
        }
        r
    })
    .await??;
    for (path, reason) in &s.failed {
        tracing::warn!(path = %path.display(), reason = %reason, "set aside");
    }
    print!("{}", predict_text(&s));
    Ok(())
}

fn predict_text(s: &plankton::predict::job::PredictSummary) -> String {
    let mut t = format!(
        "predicted {} of {} images x {} view(s) ({}) in {:.1} s: {:.1} images/s, {:.0} patches/s -> {}\n",
        s.predicted,
        s.images,
        s.views,
        s.aggregation,
        s.seconds,
        s.images_per_second,
        s.patches_per_second,
        s.out.display()
    );
    if let Some(temp) = s.temperature {
        t.push_str(&format!("calibrated with temperature {temp:.3}\n"));
    }
    if let Some((n, score)) = s.unknown {
        t.push_str(&format!(
            "{n} of {} predicted images called unknown by the run's {score} rule (column `unknown`)\n",
            s.predicted
        ));
    }
    if !s.failed.is_empty() {
        t.push_str(&format!(
            "{} image(s) set aside (rows kept with the reason in `error`):\n",
            s.failed.len()
        ));
        for (p, r) in s.failed.iter().take(10) {
            t.push_str(&format!("  {}: {r}\n", p.display()));
        }
    }
    if let Some(sc) = &s.scores {
        t.push_str(&format!(
            "on the {} images with a known class: log loss {:.4}, top-1 {:.3}, top-5 {:.3}\n",
            sc.n, sc.log_loss, sc.top1, sc.top5
        ));
    }
    if let Some((p, sub)) = &s.submission {
        t.push_str(&format!(
            "submission: {} ({} rows, {} with the class prior for unreadable images)\n",
            p.display(),
            sub.rows,
            sub.fallback_rows
        ));
    }
    t
}
