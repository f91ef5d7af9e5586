//! Predictions as an EcoTaxa import package (what experts validate; EcoTaxa's import reads it
//! as written): one `ecotaxa_<name>.tsv` and the images beside it, in a folder or a `.zip`.
//!
//! The table: UTF-8 with a byte-order mark (EcoTaxa reads a table without one as Latin-1), a
//! row of lowercase `<table>_<field>` names, then the row of types (`[t]` text, `[f]` float),
//! then one object per row:
//!
//! | column | type | value |
//! |---|---|---|
//! | `img_file_name` | [t] | the image, PNG, beside the table |
//! | `img_rank` | [f] | 0 |
//! | `object_id` | [t] | our image id (an IFCB ROI pid for bins) |
//! | `object_annotation_status` | [t] | `predicted` |
//! | `object_annotation_category` | [t] | the top class, renamed by the mapping if given |
//! | `object_plankton_p1`, `object_plankton_margin` | [f] | top probability, top minus second |
//! | `object_plankton_second` | [t] | the second class |
//! | `object_plankton_model` | [t] | the model id |
//! | `object_<feature>` | [f] | feature columns, if given |
//! | `sample_id` | [t] | the IFCB bin, else `plankton` |
//!
//! Images are decoded from their source (files or IFCB ROIs) and written as PNG, losslessly.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use plankton_core::decode::{decode_file, DecodeLimits};

use super::parquet::{top_k, Predictions};
use crate::sources::ecotaxa::object_file_name;

#[derive(Debug, thiserror::Error)]
pub enum EcotaxaExportError {
    #[error("{path}: {reason}")]
    Write { path: PathBuf, reason: String },
    #[error("{0}")]
    Options(String),
}

/// Extra numeric columns per image id (e.g. the features of `plankton features`).
#[derive(Debug, Clone, Default)]
pub struct ExtraColumns {
    /// Column names as given (made into `object_<name>` lowercase).
    pub names: Vec<String>,
    pub by_id: HashMap<String, Vec<f64>>,
}

/// Which objects go into the package by the predictions' `unknown` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnknownRouting {
    /// Every predicted object.
    #[default]
    All,
    /// Only the objects the run's unknown rule flagged (for experts to place).
    Only,
    /// Leave the flagged objects out.
    Exclude,
}

impl std::str::FromStr for UnknownRouting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(UnknownRouting::All),
            "only" => Ok(UnknownRouting::Only),
            "exclude" => Ok(UnknownRouting::Exclude),
            _ => Err(format!("`{s}`: expected all, only or exclude")),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct EcotaxaExportOptions {
    /// Least confident (lowest top probability) first.
    pub least_confident_first: bool,
    /// At most this many objects.
    pub limit: Option<usize>,
    /// Our class name -> EcoTaxa taxon name (classes not listed keep their name).
    pub rename: HashMap<String, String>,
    pub extra: ExtraColumns,
    pub decode: DecodeLimits,
    pub unknowns: UnknownRouting,
    /// The category of objects flagged unknown (e.g. EcoTaxa's `other<living`), instead of
    /// their predicted class (still in `object_plankton_predicted`).
    pub unknown_category: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct EcotaxaExportSummary {
    pub objects: usize,
    /// Rows of images that failed to predict (no probabilities): not exported.
    pub failed_rows: usize,
    /// Predicted rows left out by `unknowns`.
    pub routed_out: usize,
    /// Images that could not be read back: (id, reason); their objects are left out.
    pub unreadable: Vec<(String, String)>,
    pub table: PathBuf,
}

/// `object_<name>`, lowercase, other characters than letters, digits and `_` as `_`.
fn column_name(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("object_{clean}")
}

/// A TSV field: tabs and line breaks would split the row.
fn field(v: &str) -> String {
    v.replace(['\t', '\n', '\r'], " ")
}

/// Writes the package to `out`: a folder, or a zip when `out` ends in `.zip`.
pub fn export(
    preds: &Predictions,
    out: &Path,
    opts: &EcotaxaExportOptions,
) -> Result<EcotaxaExportSummary, EcotaxaExportError> {
    let fail = |path: &Path, reason: String| EcotaxaExportError::Write {
        path: path.to_path_buf(),
        reason,
    };
    let zip = out
        .extension()
        .is_some_and(|x| x.eq_ignore_ascii_case("zip"));
    // Never over an earlier package: stale images would sit beside the new table.
    let occupied = if zip || out.is_file() {
        out.exists()
    } else {
        std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_some())
    };
    if occupied {
        return Err(fail(
            out,
            "exists: give a new .zip file or a new (or empty) folder for the package".into(),
        ));
    }
    let name = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plankton".into());
    let table_name = format!("ecotaxa_{name}.tsv");
    let mut summary = EcotaxaExportSummary::default();
    let has_rule = preds.rows.iter().any(|r| r.unknown.unknown.is_some());
    if !has_rule && (opts.unknowns != UnknownRouting::All || opts.unknown_category.is_some()) {
        return Err(EcotaxaExportError::Options(
            "the predictions have no `unknown` values: fit the run's rule (`plankton calibrate --unknown`) and predict again".into(),
        ));
    }
    if opts.unknowns == UnknownRouting::Exclude && opts.unknown_category.is_some() {
        return Err(EcotaxaExportError::Options(
            "an unknown category with the unknown images excluded names nothing: drop one of the two".into(),
        ));
    }
    if let Some(c) = &opts.unknown_category {
        if c.trim().is_empty() || c.chars().any(char::is_control) {
            return Err(EcotaxaExportError::Options(format!(
                "unknown category {c:?}: give a name without tabs, line breaks or other control characters"
            )));
        }
    }
    let mut rows: Vec<(&super::parquet::PredictionRow, &[f32])> = Vec::new();
    for r in &preds.rows {
        let flagged = r.unknown.unknown == Some(true);
        let wanted = match opts.unknowns {
            UnknownRouting::All => true,
            UnknownRouting::Only => flagged,
            UnknownRouting::Exclude => !flagged,
        };
        match &r.probabilities {
            Some(p) if wanted => rows.push((r, p.as_slice())),
            Some(_) => summary.routed_out += 1,
            None => summary.failed_rows += 1,
        }
    }
    if rows.is_empty() && opts.unknowns == UnknownRouting::Only {
        return Err(EcotaxaExportError::Options(
            "no predicted image is flagged unknown: nothing to export".into(),
        ));
    }
    let top = |p: &[f32]| p.iter().copied().fold(f32::MIN, f32::max);
    if opts.least_confident_first {
        rows.sort_by(|a, b| top(a.1).total_cmp(&top(b.1)));
    }
    if let Some(limit) = opts.limit {
        rows.truncate(limit);
    }
    let renamed = |c: usize| {
        let class = &preds.class_names[c];
        opts.rename.get(class).unwrap_or(class).clone()
    };
    let extra_cols: Vec<String> = opts.extra.names.iter().map(|n| column_name(n)).collect();
    let mut header = vec![
        "img_file_name",
        "img_rank",
        "object_id",
        "object_annotation_status",
        "object_annotation_category",
        "object_plankton_p1",
        "object_plankton_margin",
        "object_plankton_second",
        "object_plankton_model",
    ];
    let mut types = vec![
        "[t]", "[f]", "[t]", "[t]", "[t]", "[f]", "[f]", "[t]", "[t]",
    ];
    if has_rule {
        header.extend([
            "object_plankton_predicted",
            "object_plankton_unknown",
            "object_plankton_energy",
            "object_plankton_mahalanobis",
        ]);
        types.extend(["[t]", "[t]", "[f]", "[f]"]);
    }
    header.extend(extra_cols.iter().map(String::as_str));
    types.extend(extra_cols.iter().map(|_| "[f]"));
    header.push("sample_id");
    types.push("[t]");
    let mut table = String::from("\u{feff}");
    table.push_str(&header.join("\t"));
    table.push('\n');
    table.push_str(&types.join("\t"));
    table.push('\n');
    let model = preds.model_ids.join(",");
    let mut taken = std::collections::HashSet::new();
    let mut images: Vec<(String, Vec<u8>)> = Vec::new();
    for (r, p) in rows {
        let img = match decode_file(Path::new(&r.source_path), &opts.decode) {
            Ok(img) => img,
            Err(e) => {
                summary.unreadable.push((r.image_id.clone(), e.to_string()));
                continue;
            }
        };
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .map_err(|e| fail(Path::new(&r.source_path), format!("PNG: {e}")))?;
        let file = object_file_name(&r.image_id, "png", &mut taken);
        let best = top_k(p, 2);
        let p1 = p[best[0]];
        let p2 = best.get(1).map_or(0.0, |&j| p[j]);
        let flagged = r.unknown.unknown == Some(true);
        let category = match (&opts.unknown_category, flagged) {
            (Some(c), true) => c.clone(),
            _ => renamed(best[0]),
        };
        let mut cells = vec![
            field(&file),
            "0".into(),
            field(&r.image_id),
            "predicted".into(),
            field(&category),
            format!("{p1}"),
            format!("{}", p1 - p2),
            best.get(1).map(|&j| field(&renamed(j))).unwrap_or_default(),
            field(&model),
        ];
        if has_rule {
            let num = |v: Option<f32>| {
                v.filter(|v| v.is_finite())
                    .map_or(String::new(), |v| format!("{v}"))
            };
            cells.extend([
                field(&renamed(best[0])),
                match r.unknown.unknown {
                    Some(true) => "yes".into(),
                    Some(false) => "no".into(),
                    None => String::new(),
                },
                num(r.unknown.energy),
                num(r.unknown.mahalanobis),
            ]);
        }
        let values = opts.extra.by_id.get(&r.image_id);
        for k in 0..extra_cols.len() {
            // EcoTaxa stores an empty [f] value as missing.
            cells.push(
                values
                    .and_then(|v| v.get(k))
                    .filter(|v| v.is_finite())
                    .map(|v| format!("{v}"))
                    .unwrap_or_default(),
            );
        }
        let sample = plankton_core::ifcb::parse_roi_pid(&r.image_id)
            .map_or("plankton", |(bin, _)| bin)
            .to_string();
        cells.push(sample);
        table.push_str(&cells.join("\t"));
        table.push('\n');
        images.push((file, png));
        summary.objects += 1;
    }
    let zip = out
        .extension()
        .is_some_and(|x| x.eq_ignore_ascii_case("zip"));
    if summary.objects == 0 {
        if let Some((id, reason)) = summary.unreadable.first() {
            return Err(EcotaxaExportError::Options(format!(
                "none of the {} images could be read back (first: {id}: {reason}); the predictions name them by the paths predict was given: run export where predict ran, or predict with absolute --data paths",
                summary.unreadable.len()
            )));
        }
    }
    if zip {
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| fail(dir, e.to_string()))?;
        }
        let written = plankton_core::fsx::write_atomic_with(out, |f| {
            let mut z = zip::ZipWriter::new(f);
            // PNGs are compressed already.
            let stored = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Stored);
            let deflated = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated);
            z.start_file(table_name.as_str(), deflated)?;
            z.write_all(table.as_bytes())?;
            for (name, png) in &images {
                z.start_file(name.as_str(), stored)?;
                z.write_all(png)?;
            }
            z.finish()?;
            Ok(())
        });
        written.map_err(|e| fail(out, e.to_string()))?;
        summary.table = out.to_path_buf();
    } else {
        std::fs::create_dir_all(out).map_err(|e| fail(out, e.to_string()))?;
        for (name, png) in &images {
            let p = out.join(name);
            plankton_core::fsx::write_atomic(&p, png).map_err(|e| fail(&p, e.to_string()))?;
        }
        // The table last: a package with a table is whole.
        let p = out.join(&table_name);
        plankton_core::fsx::write_atomic(&p, table.as_bytes())
            .map_err(|e| fail(&p, e.to_string()))?;
        summary.table = p;
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_ecotaxa_columns_and_unique_files() {
        assert_eq!(column_name("moments.Hu 1"), "object_moments_hu_1");
        let mut taken = Default::default();
        assert_eq!(
            object_file_name("a/b.jpg", "png", &mut taken),
            "a_b.jpg.png"
        );
        assert_eq!(
            object_file_name("a b.jpg", "png", &mut taken),
            "a_b.jpg_2.png"
        );
        assert_eq!(field("x\ty\nz"), "x y z");
    }
}
