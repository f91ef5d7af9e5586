//! `plankton export`: predictions in the forms other tools read (IFCB class-score files,
//! EcoTaxa import packages).

use super::prelude::*;
use plankton::sinks::parquet::Predictions;

#[derive(Subcommand)]
pub enum ExportCommand {
    /// Per-bin class scores for IFCB tools: `<bin>_class.h5` (ifcb_classifier's v3 file, read
    /// by the IFCB dashboard) under D<YYYY>/D<YYYYMMDD>/, optionally the dashboard's CSV.
    Ifcb(IfcbArgs),
    /// An EcoTaxa import package (ecotaxa_<name>.tsv + PNG images; a folder, or a zip when
    /// --out ends in .zip), status `predicted`, least confident first if asked.
    Ecotaxa(EcotaxaArgs),
}

#[derive(Args)]
pub struct IfcbArgs {
    /// Predictions (Parquet from predict, compact or the daemon) of IFCB ROIs.
    #[arg(long)]
    predictions: PathBuf,
    /// The class-score folder (what the dashboard's class_scores data directory points at).
    #[arg(long)]
    out: PathBuf,
    /// Also write `<bin>_class_scores.csv` (pid, then one column per class) beside each file.
    #[arg(long)]
    csv: bool,
}

#[derive(Args)]
pub struct EcotaxaArgs {
    /// Predictions (Parquet); the images are read back from their source paths.
    #[arg(long)]
    predictions: PathBuf,
    /// The package: a new folder, or a new .zip file (EcoTaxa imports either).
    #[arg(long)]
    out: PathBuf,
    /// Least confident first (lowest top probability; with --limit, the least confident N: see
    /// docs/RESULTS.md on how that compares with a random pick).
    #[arg(long)]
    least_confident_first: bool,
    /// At most this many objects.
    #[arg(long, value_parser = super::positive)]
    limit: Option<usize>,
    /// Renames: a CSV `class,ecotaxa` from our class names to EcoTaxa taxon names.
    #[arg(long)]
    mapping: Option<PathBuf>,
    /// Add feature columns (object_<set>_<name>, [f]) from a `plankton features` Parquet file.
    #[arg(long)]
    features: Option<PathBuf>,
    /// Which objects by the run's unknown rule (the predictions' `unknown` column): all, only
    /// the flagged ones (a package for experts to place), or exclude them.
    #[arg(long, default_value = "all")]
    unknowns: plankton::sinks::ecotaxa::UnknownRouting,
    /// The EcoTaxa category of objects flagged unknown (e.g. `other<living`), instead of their
    /// predicted class (kept in object_plankton_predicted).
    #[arg(long)]
    unknown_category: Option<String>,
}

pub fn run(which: ExportCommand) -> Result<()> {
    match which {
        ExportCommand::Ifcb(a) => {
            let preds = Predictions::read(&a.predictions)?;
            let s = plankton::sinks::ifcb_scores::write_class_scores(&preds, &a.out, a.csv)?;
            if s.bins == 0 {
                bail!(
                    "{}: no IFCB ROI among its {} row(s) (ids like D20130526T095207_IFCB013_00007)",
                    a.predictions.display(),
                    preds.rows.len()
                );
            }
            for (bin, exported, total) in &s.partial {
                tracing::warn!(%bin, exported, total, "the predictions hold only some of the bin's ROIs: its class-score file lists only those (export the predictions of the whole bin, e.g. after `plankton compact` of the daemon's files)");
            }
            println!(
                "{} bin(s), {} ROI(s) -> {} ({} failed row(s) and {} row(s) of other images left out)",
                s.bins,
                s.rois,
                a.out.display(),
                s.failed,
                s.not_rois
            );
            Ok(())
        }
        ExportCommand::Ecotaxa(a) => ecotaxa(a),
    }
}

fn ecotaxa(a: EcotaxaArgs) -> Result<()> {
    use plankton::sinks::ecotaxa::{export, EcotaxaExportOptions, ExtraColumns};
    let preds = Predictions::read(&a.predictions)?;
    let mut opts = EcotaxaExportOptions {
        least_confident_first: a.least_confident_first,
        limit: a.limit,
        unknowns: a.unknowns,
        unknown_category: a.unknown_category.clone(),
        ..Default::default()
    };
    if let Some(m) = &a.mapping {
        for (class, taxon) in
            plankton::sources::dataset::read_pairs_csv(m, &[["class", "ecotaxa"]])?
        {
            if !preds.class_names.contains(&class) {
                bail!(
                    "{}: `{class}` is not a class of {} (its classes: {})",
                    m.display(),
                    a.predictions.display(),
                    preds.class_names.join(", ")
                );
            }
            if taxon.is_empty() {
                bail!("{}: `{class}` has no EcoTaxa name", m.display());
            }
            if opts.rename.insert(class.clone(), taxon).is_some() {
                bail!("{}: `{class}` is mapped twice", m.display());
            }
        }
    }
    if let Some(f) = &a.features {
        let sets = plankton::fusion::features::FeatureFile::sets_of(f)?;
        let file = plankton::fusion::features::FeatureFile::read(f, &sets, &[])?;
        let mut extra = ExtraColumns::default();
        for set in &file.sets {
            extra.names.extend(set.columns.iter().cloned());
        }
        for i in 0..file.len() {
            if !file.usable(i) {
                continue;
            }
            let row: Vec<f64> = file.sets.iter().flat_map(|s| s.row(i).to_vec()).collect();
            extra.by_id.insert(file.image_ids[i].clone(), row);
        }
        opts.extra = extra;
    }
    let s = export(&preds, &a.out, &opts)?;
    for (id, reason) in &s.unreadable {
        tracing::warn!(image = %id, %reason, "image not readable: left out of the package");
    }
    println!(
        "{} object(s) -> {} ({} failed prediction row(s), {} unreadable image(s){} left out)",
        s.objects,
        s.table.display(),
        s.failed_rows,
        s.unreadable.len(),
        if s.routed_out > 0 {
            format!(", {} by --unknowns", s.routed_out)
        } else {
            String::new()
        }
    );
    Ok(())
}
