//! `plankton zmuv`: the global ZMUV statistics.

use super::prelude::*;

#[derive(Args)]
pub struct ZmuvArgs {
    #[arg(long)]
    data: PathBuf,
    /// Output JSON (a run keeps it as zmuv.json).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    pipeline: PipelineArg,
}

pub async fn run(a: ZmuvArgs) -> Result<()> {
    let cfg = a.pipeline.load()?;
    let ds = open_dataset(&a.data)?;
    estimate(&cfg, &ds, &a.out).await
}

async fn estimate(cfg: &PipelineConfig, ds: &Dataset, out: &Path) -> Result<()> {
    let (stats, summary) = plankton::data_path::estimate_and_save_zmuv(cfg, ds, out).await?;
    for f in &summary.failures {
        tracing::warn!(reason = %f.reason, "set aside");
    }
    for (k, z) in stats.inputs.iter().enumerate() {
        println!(
            "input {k}: mean {:.5} std {:.5} over {} augmented patches -> {}",
            z.mean,
            z.std,
            stats.samples,
            out.display()
        );
    }
    Ok(())
}
