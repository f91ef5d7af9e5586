//! `plankton fuse`: late fusion of predictions with image features.

use super::prelude::*;

#[derive(Args)]
pub struct FuseArgs {
    /// Predictions to fuse: labelled validation predictions to fit on, any with --model.
    #[arg(long)]
    predictions: PathBuf,
    /// The features Parquet (`plankton features`) of the same images.
    #[arg(long)]
    features: PathBuf,
    /// Dataset folder(s) holding the true classes (default: the file's `label` column).
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// The fused predictions Parquet (out of fold when fitting).
    #[arg(long)]
    out: PathBuf,
    /// Apply this fusion model folder instead of fitting one.
    #[arg(long, conflicts_with_all = ["model_out", "sets", "repeats", "folds", "seed", "steps", "learning_rate"])]
    model: Option<PathBuf>,
    /// Where to store the fitted model (fusion.json, fusion.safetensors).
    #[arg(long, required_unless_present = "model")]
    model_out: Option<PathBuf>,
    /// Feature sets, one fusion group each, averaged uniformly; `set:L2` sets a penalty
    /// (default 0.002 for moments, 0.0002 otherwise).
    #[arg(long, default_value = "moments,haralick")]
    sets: String,
    /// Nets per set, with different seeds, averaged.
    #[arg(long, default_value_t = 10)]
    repeats: usize,
    /// Cross-validation folds for the out-of-fold predictions and loss.
    #[arg(long, default_value_t = 5)]
    folds: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Mini-batch updates per net.
    #[arg(long, default_value_t = plankton::fusion::job::DEFAULT_STEPS)]
    steps: usize,
    /// First learning rate (dropped x0.1 at 100/240 and again at 200/240 of the steps).
    #[arg(long, default_value_t = plankton::fusion::job::DEFAULT_LEARNING_RATE)]
    learning_rate: f64,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Also write the summary (scores, row counts, settings) as JSON.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Classes listed per row in top_classes.
    #[arg(long, default_value_t = 5, value_parser = super::positive)]
    top_k: usize,
}

pub async fn run(a: FuseArgs) -> Result<()> {
    use plankton::fusion::{self, ApplyOptions, FitOptions};
    let s = tokio::task::spawn_blocking(move || -> Result<fusion::FusionSummary> {
        let Some(model_out) = a.model_out else {
            let mut o = ApplyOptions::new(
                a.model.as_deref().expect("clap: --model or --model-out"),
                &a.predictions,
                &a.features,
                &a.out,
            );
            (o.data, o.threads, o.report, o.top_k) = (a.data, a.threads, a.report, a.top_k);
            return Ok(fusion::apply(&o)?);
        };
        let mut o = FitOptions::new(&a.predictions, &a.features, &a.out, &model_out);
        (
            o.data, o.repeats, o.folds, o.seed, o.threads, o.report, o.top_k,
        ) = (
            a.data, a.repeats, a.folds, a.seed, a.threads, a.report, a.top_k,
        );
        o.sets = fusion::SetSpec::parse_list(&a.sets)?;
        o.train.steps = a.steps;
        fusion::job::scale_learning_rate(&mut o.train, a.learning_rate);
        let pb = progress(0, "fuse");
        let r = fusion::fit(&o, &|done, total| {
            pb.set_length(total as u64);
            pb.set_position(done as u64);
        });
        pb.finish_and_clear();
        Ok(r?)
    })
    .await??;
    print!("{}", s.render());
    Ok(())
}
