//! `plankton preview`: originals beside augmented patches (PNG).

use super::prelude::*;

#[derive(Args)]
pub struct PreviewArgs {
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    pipeline: PipelineArg,
    #[arg(long, default_value_t = 8)]
    images: usize,
    #[arg(long, default_value_t = 7)]
    augmentations: usize,
}

pub fn run(a: PreviewArgs) -> Result<()> {
    let cfg = a.pipeline.load()?;
    let ds = open_dataset(&a.data)?;
    let records = if ds.train.is_empty() {
        &ds.test
    } else {
        &ds.train
    };
    let order = pick_spread(records, records.len());
    let picked: Vec<_> = order.iter().map(|&i| records[i].clone()).collect();
    let opts = PreviewOptions {
        images: a.images,
        augmentations: a.augmentations,
        ..Default::default()
    };
    let s = render_preview(&cfg, &picked, &a.out, &opts)?;
    for (p, why) in &s.skipped {
        tracing::warn!(path = %p.display(), reason = %why, "not previewed");
    }
    println!(
        "wrote {} ({}x{} px, {} images x {} augmentations)",
        a.out.display(),
        s.width,
        s.height,
        s.shown.len(),
        a.augmentations
    );
    Ok(())
}
