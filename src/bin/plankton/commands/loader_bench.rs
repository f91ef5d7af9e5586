//! `plankton loader-bench`: the data path alone.

use super::prelude::*;

#[derive(Args)]
pub struct LoaderBenchArgs {
    #[arg(long)]
    data: PathBuf,
    #[command(flatten)]
    pipeline: PipelineArg,
    #[arg(long, default_value_t = 2)]
    epochs: u64,
    /// Worker threads (default: the pipeline's, 0 = one per core).
    #[arg(long)]
    workers: Option<usize>,
}

pub async fn run(a: LoaderBenchArgs) -> Result<()> {
    let mut cfg = a.pipeline.load()?;
    if let Some(w) = a.workers {
        cfg.loader.workers = w;
    }
    let ds = open_dataset(&a.data)?;
    let records = if ds.train.is_empty() {
        ds.test
    } else {
        ds.train
    };
    let report = run_loader_bench(&cfg, records, a.epochs).await?;
    print!("{}", report.render());
    Ok(())
}

async fn run_loader_bench(
    cfg: &PipelineConfig,
    records: Vec<plankton::sources::ImageRecord>,
    epochs: u64,
) -> Result<plankton::data_path::LoaderBenchReport> {
    if records.is_empty() {
        bail!("no images to load");
    }
    let pb = progress(records.len() as u64 * epochs, "loading");
    let report =
        plankton::data_path::loader_bench(cfg, Arc::new(records), epochs, |_, n| pb.inc(n as u64))
            .await?;
    pb.finish_and_clear();
    Ok(report)
}
