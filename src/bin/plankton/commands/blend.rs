//! `plankton blend`: fit or apply ensemble weights.

use super::prelude::*;

#[derive(Args)]
pub struct BlendArgs {
    /// Members' predictions: validation predictions to fit on; with --weights, the files to
    /// blend (e.g. test predictions) in the weights file's member order.
    #[arg(long, required = true, num_args = 1..)]
    predictions: Vec<PathBuf>,
    /// Dataset folder(s) holding the true classes (default: the files' `label` column).
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// The blended predictions Parquet file to write.
    #[arg(long)]
    out: PathBuf,
    /// Apply the weights of an earlier fit (its --weights-out) instead of fitting.
    #[arg(long, conflicts_with_all = ["weights_out", "uniform", "select", "folds", "report", "data"])]
    weights: Option<PathBuf>,
    /// Where to store the fitted weights (for --weights).
    #[arg(long)]
    weights_out: Option<PathBuf>,
    /// Equal weights instead of fitted ones.
    #[arg(long)]
    uniform: bool,
    /// cv: greedy forward selection by K-fold CV on the validation images; all: every member.
    #[arg(long, default_value = "cv")]
    select: plankton::blend::Select,
    /// Folds of the selection's cross-validation.
    #[arg(long, default_value_t = 5)]
    folds: usize,
    /// Write the fit (members, selection steps, weights, losses) as JSON.
    #[arg(long)]
    report: Option<PathBuf>,
    /// With --weights: accept files of other models standing in for members (e.g. bagged ones).
    #[arg(long, requires = "weights")]
    allow_other_models: bool,
    /// Classes listed per row in top_classes.
    #[arg(long, default_value_t = 5, value_parser = super::positive)]
    top_k: usize,
}

pub async fn run(a: BlendArgs) -> Result<()> {
    use plankton::blend::{self, ApplyOptions, FitOptions, Weighting};
    let pb = spinner("blending");
    // L-BFGS fits and Parquet I/O are blocking work: off the async runtime's threads.
    let text = tokio::task::spawn_blocking(move || -> Result<String> {
        Ok(match a.weights {
            Some(w) => {
                let mut o = ApplyOptions::new(&w, a.predictions, &a.out);
                o.allow_other_models = a.allow_other_models;
                o.top_k = a.top_k;
                blend::apply(&o)?.render()
            }
            None => {
                let mut o = FitOptions::new(a.predictions, a.data, &a.out);
                o.weights_out = a.weights_out;
                o.report = a.report;
                o.select = a.select;
                o.weighting = if a.uniform {
                    Weighting::Uniform
                } else {
                    Weighting::Fitted
                };
                o.folds = a.folds;
                o.top_k = a.top_k;
                blend::fit(&o)?.render()
            }
        })
    })
    .await??;
    pb.finish_and_clear();
    print!("{text}");
    Ok(())
}
