//! `plankton compact`: one row per image from the daemons' prediction files.

use super::prelude::*;
use plankton::sinks::compact;

#[derive(Args)]
pub struct CompactArgs {
    /// The Parquet file to write (one row per image id).
    #[arg(long)]
    out: PathBuf,
    /// Daemon output folders (their finished predictions-*.parquet files) or files.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
}

pub fn run(a: CompactArgs) -> Result<()> {
    let files = compact::prediction_files(&a.inputs)?;
    let out = plankton::fsx::resolve_path(&a.out);
    if files.iter().any(|f| plankton::fsx::resolve_path(f) == out) {
        bail!("--out {} is one of the inputs", a.out.display());
    }
    let s = compact::compact(&files, &a.out)?;
    println!(
        "{} row(s) from {} file(s) -> {} row(s), one per image ({} image(s) had more than one row) in {}",
        s.rows,
        s.files,
        s.kept,
        s.duplicated_ids,
        a.out.display()
    );
    Ok(())
}
