//! `plankton drift`: a drift report of predictions files against reference ones.

use super::prelude::*;

#[derive(Args)]
pub struct DriftArgs {
    /// Predictions the current ones are compared with (e.g. a week the model was known to do
    /// well on, or its validation predictions).
    #[arg(long, required = true, num_args = 1..)]
    reference: Vec<PathBuf>,
    /// Predictions to examine (files from predict, or the daemon's rolling files: these carry
    /// receive/capture times, image sizes and brightness).
    #[arg(long, required = true, num_args = 1..)]
    current: Vec<PathBuf>,
    /// Report folder: summary.md, drift.csv, drift.json, drift.png.
    #[arg(long)]
    out: PathBuf,
    /// Images per window.
    #[arg(long, default_value_t = 500, value_parser = super::positive)]
    window: usize,
}

pub async fn run(a: DriftArgs) -> Result<()> {
    let opts = plankton::drift::DriftOptions {
        reference: a.reference,
        current: a.current,
        out: a.out,
        window: a.window,
    };
    let out = opts.out.clone();
    let r = tokio::task::spawn_blocking(move || plankton::drift::run(&opts)).await??;
    println!(
        "{} current images in {} window(s) of {} against {} reference images{}",
        r.current_images,
        r.windows.len(),
        r.window,
        r.reference_images,
        if r.time_ordered {
            ""
        } else {
            " (file order: no times in the files)"
        }
    );
    if let Some(w) = plankton::drift::furthest(&r) {
        let f = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.3}"));
        println!(
            "furthest window {} ({} images): class-mix divergence {} bits, where sampling noise alone reaches {}",
            w.index,
            w.stats.images,
            f(w.stats.divergence),
            f(w.noise_95)
        );
    }
    println!(
        "report: {} (summary.md, drift.csv, drift.json, drift.png)",
        out.display()
    );
    Ok(())
}
