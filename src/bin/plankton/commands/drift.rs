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
    let worst = r
        .windows
        .iter()
        .filter_map(|w| w.stats.divergence.map(|d| (d, w.index)))
        .max_by(|a, b| a.0.total_cmp(&b.0));
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
    if let Some((d, i)) = worst {
        println!(
            "largest class-mix divergence {d:.3} bits (window {i}); sampling noise alone reaches {} bits",
            r.noise_divergence_95
                .map_or("n/a".to_string(), |n| format!("{n:.3}"))
        );
    }
    println!(
        "report: {} (summary.md, drift.csv, drift.json, drift.png)",
        out.display()
    );
    Ok(())
}
