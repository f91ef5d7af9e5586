//! EcoTaxa tables (<https://ecotaxa.obs-vlfr.fr>), as its exports write them and its import
//! reads them: tab-separated, UTF-8 (with or without a byte-order mark), a header row of
//! lowercase `<table>_<field>` names, then, in import packages and some exports, a row of
//! column types (`[t]` text, `[f]` float); values may be quoted. Only what we use is read:
//! the object id, its image file, its category and the annotation status.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum EcotaxaError {
    #[error("{path}: {reason}")]
    Table { path: PathBuf, reason: String },
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One row of an EcoTaxa table.
#[derive(Debug, Clone, PartialEq)]
pub struct EcotaxaObject {
    pub object_id: String,
    /// Relative to the table's folder (exports put images in per-sample subfolders).
    pub img_file_name: Option<String>,
    /// The taxon's display name (`object_annotation_category`), if any.
    pub category: Option<String>,
    /// `predicted`, `validated`, `dubious`, `discarded` (lowercased), if any.
    pub status: Option<String>,
}

impl EcotaxaObject {
    /// A category an expert confirmed: what training may use.
    pub fn validated_category(&self) -> Option<&str> {
        (self.status.as_deref() == Some("validated"))
            .then_some(self.category.as_deref())
            .flatten()
    }
}

/// True for a row of EcoTaxa column types (`[t]`, `[f]`) rather than data.
fn is_types_row(record: &csv::StringRecord) -> bool {
    record.len() > 0
        && record
            .iter()
            .all(|v| matches!(v.trim(), "[t]" | "[f]" | "[i]" | ""))
        && record.iter().any(|v| !v.trim().is_empty())
}

/// Reads an EcoTaxa table (`ecotaxa_*.tsv`). Needs the `object_id` column; the image, category
/// and status columns are read when present.
pub fn read_table(path: &Path) -> Result<Vec<EcotaxaObject>, EcotaxaError> {
    let bytes = std::fs::read(path).map_err(|source| EcotaxaError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    read_table_bytes(&bytes, path)
}

/// [`read_table`] on bytes already read (a table inside a zip); `path` names it in errors.
pub fn read_table_bytes(bytes: &[u8], path: &Path) -> Result<Vec<EcotaxaObject>, EcotaxaError> {
    let bad = |reason: String| EcotaxaError::Table {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(b'\t')
        .flexible(true)
        .from_reader(bytes);
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| bad(e.to_string()))?
        .iter()
        .map(|h| h.trim().to_ascii_lowercase())
        .collect();
    let column = |name: &str| header.iter().position(|h| h == name);
    let Some(id_col) = column("object_id") else {
        return Err(bad(format!(
            "not an EcoTaxa table: no `object_id` column (header: {})",
            header.join(", ")
        )));
    };
    let (img_col, cat_col, status_col) = (
        column("img_file_name"),
        column("object_annotation_category"),
        column("object_annotation_status"),
    );
    let mut objects = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let record = record.map_err(|e| bad(e.to_string()))?;
        if i == 0 && is_types_row(&record) {
            continue;
        }
        if record.iter().all(|v| v.trim().is_empty()) {
            continue;
        }
        let line = record.position().map_or(0, |p| p.line());
        let get = |c: Option<usize>| {
            c.and_then(|c| record.get(c))
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(String::from)
        };
        let object_id =
            get(Some(id_col)).ok_or_else(|| bad(format!("line {line}: no object_id")))?;
        objects.push(EcotaxaObject {
            object_id,
            img_file_name: get(img_col),
            category: get(cat_col),
            status: get(status_col).map(|s| s.to_ascii_lowercase()),
        });
    }
    Ok(objects)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of a real general export: BOM, quoted strings, no types row, images in
    /// per-sample folders; and of an import package: a types row.
    #[test]
    fn exports_and_import_packages_are_read_alike() {
        let dir = tempfile::tempdir().unwrap();
        let export = dir.path().join("ecotaxa_export.tsv");
        std::fs::write(
            &export,
            "\u{feff}\"img_file_name\"\t\"img_rank\"\t\"object_id\"\t\"object_annotation_status\"\t\"object_annotation_category\"\t\"object_annotation_hierarchy\"\n\
             \"s1/a_1.png\"\t0\t\"a_1\"\t\"validated\"\t\"Oncaeidae\"\t\"Biota>Animalia>Oncaeidae\"\n\
             \"s1/a_2.png\"\t0\t\"a_2\"\t\"predicted\"\t\"detritus\"\t\"Biota>detritus\"\n\
             \"s1/a_3.png\"\t0\t\"a_3\"\t\"\"\t\"\"\t\"\"\n",
        )
        .unwrap();
        let rows = read_table(&export).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].img_file_name.as_deref(), Some("s1/a_1.png"));
        assert_eq!(rows[0].validated_category(), Some("Oncaeidae"));
        assert_eq!(
            rows[1].validated_category(),
            None,
            "predicted is not a label"
        );
        assert_eq!(
            (rows[2].category.as_deref(), rows[2].status.as_deref()),
            (None, None)
        );

        let package = dir.path().join("ecotaxa_pack.tsv");
        std::fs::write(
            &package,
            "object_id\timg_file_name\tobject_annotation_status\tobject_annotation_category\tobject_area\n\
             [t]\t[t]\t[t]\t[t]\t[f]\n\
             x\tx.png\tValidated\tcopepod\t12\n",
        )
        .unwrap();
        let rows = read_table(&package).unwrap();
        assert_eq!(rows.len(), 1, "the types row is not an object");
        assert_eq!(rows[0].validated_category(), Some("copepod"));

        std::fs::write(&package, "image\tclass\nx\ty\n").unwrap();
        let e = read_table(&package).unwrap_err().to_string();
        assert!(
            e.contains("ecotaxa_pack.tsv") && e.contains("no `object_id`"),
            "{e}"
        );
    }
}
