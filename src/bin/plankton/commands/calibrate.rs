//! `plankton calibrate`: a temperature fitted on validation predictions.

use super::prelude::*;

#[derive(Args)]
pub struct CalibrateArgs {
    /// The run directory to store calibration.json in.
    #[arg(long)]
    model: PathBuf,
    /// Predictions of the run's validation images (`plankton predict --subset valid`).
    #[arg(long)]
    predictions: PathBuf,
    /// Dataset folder(s) holding the true classes (default: the file's `label` column).
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// Refuse to store a temperature fitted on fewer labelled images.
    #[arg(long, default_value_t = plankton::evaluate::MIN_CALIBRATION_IMAGES)]
    min_images: usize,
}

pub async fn run(a: CalibrateArgs) -> Result<()> {
    let (model, predictions, data, min) = (a.model.clone(), a.predictions, a.data, a.min_images);
    // Reading Parquet and fitting are blocking work: off the async runtime's threads.
    let fit = tokio::task::spawn_blocking(move || {
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
    Ok(())
}
