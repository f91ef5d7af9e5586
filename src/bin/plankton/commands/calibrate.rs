//! `plankton calibrate`: a temperature fitted on validation predictions, and (`--unknown`) the
//! unknown-image rule fitted on the run's training and validation images.

use super::prelude::*;

#[derive(Args)]
pub struct CalibrateArgs {
    /// The run directory to store calibration.json (and unknown.json) in.
    #[arg(long)]
    model: PathBuf,
    /// Predictions of the run's validation images (`plankton predict --subset valid`): fits the
    /// temperature.
    #[arg(long, required_unless_present = "unknown")]
    predictions: Option<PathBuf>,
    /// Dataset folder(s): with --predictions, where the true classes are (default: the file's
    /// `label` column); with --unknown, the dataset the run was trained on (required).
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// Refuse to store a temperature (or unknown thresholds) fitted on fewer labelled images.
    #[arg(long, default_value_t = plankton::evaluate::MIN_CALIBRATION_IMAGES)]
    min_images: usize,
    /// Fit the unknown-image rule (unknown.json): the Mahalanobis feature space on the run's
    /// training images, a threshold per score on its validation images. Runs the network over
    /// both; after the temperature when --predictions is given too.
    #[arg(long)]
    unknown: bool,
    /// The fraction of validation images (all of known classes) the rule may call unknown.
    #[arg(long, default_value_t = 0.05)]
    false_unknown_rate: f64,
    /// The score that decides the `unknown` column: mahalanobis, energy or max-probability.
    #[arg(long, default_value = "mahalanobis")]
    unknown_score: plankton::predict::unknown::Score,
    /// Added to the feature covariance's diagonal, relative to its mean variance.
    #[arg(long, default_value_t = plankton::predict::unknown::DEFAULT_RIDGE)]
    ridge: f64,
    /// Transforms per image (default: the run's [tta], as predict uses them).
    #[arg(long, value_parser = super::positive)]
    tta: Option<usize>,
    /// best, final, or a .safetensors path (the weights predict will use).
    #[arg(long, default_value = "best")]
    weights: plankton::predict::job::Weights,
    /// auto (cuda:0 when a GPU is usable, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Patches per forward pass (default: the run's batch size).
    #[arg(long, value_parser = super::positive)]
    batch_size: Option<usize>,
}

pub async fn run(a: CalibrateArgs) -> Result<()> {
    if a.unknown && a.data.is_empty() {
        anyhow::bail!("--unknown needs --data: the dataset the run was trained on");
    }
    if let Some(predictions) = a.predictions.clone() {
        let (model, data, min) = (a.model.clone(), a.data.clone(), a.min_images);
        // Reading Parquet and fitting are blocking work: off the async runtime's threads.
        let fit = tokio::task::spawn_blocking(move || {
            // --data here names the labels; with --unknown the dataset (the same thing when
            // the predictions are of the run's validation images).
            plankton::evaluate::calibrate_run(&model, &predictions, &data, min)
        })
        .await??;
        println!(
            "temperature {:.3} fitted on {} images: log loss {:.4} -> {:.4}, ECE {:.4} -> {:.4}; stored in {}",
            fit.temperature,
            fit.n,
            fit.log_loss_before,
            fit.log_loss_after,
            fit.ece_before,
            fit.ece_after,
            plankton::train::RunDir::new(&a.model).calibration().display()
        );
    }
    if a.unknown {
        calibrate_unknown(a).await?;
    }
    Ok(())
}

async fn calibrate_unknown(a: CalibrateArgs) -> Result<()> {
    use plankton::predict::job::PredictEvent;
    use plankton::predict::unknown::{calibrate, UnknownOptions};
    let opts = UnknownOptions {
        model: a.model,
        weights: a.weights,
        data: a.data,
        false_unknown_rate: a.false_unknown_rate,
        score: a.unknown_score,
        ridge: a.ridge,
        min_images: a.min_images,
        tta: a.tta,
        device: parse_device(&a.device)?,
        batch_size: a.batch_size,
    };
    let handle = tokio::runtime::Handle::current();
    let fit = tokio::task::spawn_blocking(move || {
        let mut pb: Option<ProgressBar> = None;
        let mut pass = 0;
        let mut on_event = |e: PredictEvent| match e {
            PredictEvent::Started { images, views, .. } => {
                pass += 1;
                let what = if pass == 1 { "training" } else { "validation" };
                tracing::info!(images, views, "unknown rule: {what} images");
                if let Some(bar) = pb.take() {
                    bar.finish_and_clear();
                }
                pb = Some(progress(images as u64, what));
            }
            PredictEvent::Progress { images_done, .. } => {
                if let Some(bar) = &pb {
                    bar.set_position(images_done as u64);
                }
            }
        };
        let r = calibrate(&opts, &handle, &mut on_event);
        if let Some(bar) = pb {
            bar.finish_and_clear();
        }
        r
    })
    .await??;
    let c = &fit.calibration;
    println!(
        "unknown rule fitted in {:.1} s: feature space on {} training images, thresholds on {} validation images ({} view(s)); {} deciding, target false-unknown rate {}",
        fit.seconds, c.train_images, c.valid_images, c.views, c.score, c.false_unknown_rate
    );
    for (score, t) in &c.thresholds {
        println!(
            "  {score:<16} threshold {t:>12.4}  validation images called unknown {:.3}",
            c.valid_false_unknown
                .get(score)
                .copied()
                .unwrap_or(f64::NAN)
        );
    }
    if fit.failed > 0 {
        println!(
            "{} image(s) could not be read and were left out",
            fit.failed
        );
    }
    println!("stored in {}", fit.path.display());
    Ok(())
}
