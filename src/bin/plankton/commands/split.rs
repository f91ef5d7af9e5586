//! `plankton split`: stratified train/validation, bagging and K-fold splits.

use super::prelude::*;

#[derive(Args)]
pub struct SplitArgs {
    #[arg(long)]
    data: PathBuf,
    /// Output CSV; bagging splits go beside it as <stem>-bag<k>.csv.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    pipeline: PipelineArg,
    /// Validation fraction (default: the pipeline's split.valid_fraction).
    #[arg(long)]
    valid_fraction: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    /// Number of extra bagging splits (default: the pipeline's split.bagging; at most 1,000).
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=1000))]
    bagging: Option<u64>,
    /// Write K cross-validation folds (<stem>-fold<k>.csv) instead.
    #[arg(long, conflicts_with = "bagging")]
    folds: Option<usize>,
}

pub fn run(a: SplitArgs) -> Result<()> {
    if a.folds.is_some() {
        let cfg = a.pipeline.load()?;
        let ds = open_dataset(&a.data)?;
        write_folds(
            &ds,
            &a.out,
            a.folds.unwrap_or(5),
            a.seed.unwrap_or(cfg.seed),
        )
    } else {
        let cfg = a.pipeline.load()?;
        let ds = open_dataset(&a.data)?;
        write_splits(
            &ds,
            &a.out,
            a.valid_fraction.unwrap_or(cfg.split.valid_fraction),
            a.seed.unwrap_or(cfg.seed),
            a.bagging.map_or(cfg.split.bagging, |b| b as usize),
        )
    }
}

fn write_folds(ds: &Dataset, out: &Path, folds: usize, seed: u64) -> Result<()> {
    let labels: Vec<u32> = ds
        .train
        .iter()
        .map(|r| r.label.unwrap_or(u32::MAX))
        .collect();
    plankton::split::check_folds(&labels, &ds.class_names, folds)?;
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "split".into());
    for (k, split) in plankton::split::stratified_folds(&labels, folds, seed)?
        .into_iter()
        .enumerate()
    {
        let path = out.with_file_name(format!("{stem}-fold{k}.csv"));
        split.save(ds, &path)?;
        println!(
            "wrote {} ({} train / {} valid)",
            path.display(),
            split.train.len(),
            split.valid.len()
        );
    }
    Ok(())
}

fn write_splits(
    ds: &Dataset,
    out: &Path,
    valid_fraction: f64,
    seed: u64,
    bagging: usize,
) -> Result<()> {
    for (path, split) in plankton::split::write_split_files(ds, out, valid_fraction, seed, bagging)?
    {
        println!(
            "wrote {} ({} train / {} valid)",
            path.display(),
            split.train.len(),
            split.valid.len()
        );
    }
    Ok(())
}
