//! `plankton import`: annotations from other tools into datasets.

use super::prelude::*;

#[derive(Subcommand)]
pub enum ImportCommand {
    /// An EcoTaxa export (zip, folder or ecotaxa_*.tsv) to a dataset in the competition layout:
    /// validated objects become labelled training images, the rest test images.
    Ecotaxa(EcotaxaArgs),
}

#[derive(Args)]
pub struct EcotaxaArgs {
    /// The EcoTaxa export: a zip, a folder, or one ecotaxa_*.tsv (images beside it).
    input: PathBuf,
    /// The dataset folder to write (new or empty).
    #[arg(long)]
    out: PathBuf,
    /// Renames and merges: a CSV `ecotaxa,class` (an empty class leaves the taxon out).
    #[arg(long)]
    mapping: Option<PathBuf>,
}

pub fn run(which: ImportCommand) -> Result<()> {
    use plankton::sources::ecotaxa::{import, read_mapping, ImportOptions};
    let ImportCommand::Ecotaxa(a) = which;
    let mut opts = ImportOptions::default();
    if let Some(m) = &a.mapping {
        opts.mapping = read_mapping(m)?;
    }
    let s = import(&a.input, &a.out, &opts)?;
    for (id, reason) in &s.problems {
        tracing::warn!(object = %id, %reason, "object set aside");
    }
    let labelled: usize = s.labelled.values().sum();
    println!(
        "{} table(s): {labelled} validated object(s) in {} class(es), {} unlabelled (test/), {} left out by the mapping, {} set aside -> {}",
        s.tables,
        s.labelled.len(),
        s.unlabelled,
        s.left_out,
        s.problems.len(),
        a.out.display()
    );
    for (class, n) in &s.labelled {
        println!("  {class}: {n}");
    }
    Ok(())
}
