//! Reading the features Parquet written by `plankton features` (its own reader here, so that
//! fusion depends only on the file's columns: `image_id`, `source_path`, `error` and float
//! columns named `<set>.<name>`; sets added later are picked up by their prefix).

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::{Array, Float64Array, StringArray};
use arrow::datatypes::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use super::FusionError;

/// One feature set's columns for every row of the file.
#[derive(Debug, Clone)]
pub struct SetValues {
    pub name: String,
    pub columns: Vec<String>,
    /// Row-major `rows x columns`; NaN where the file holds null.
    pub values: Vec<f64>,
}

impl SetValues {
    pub fn row(&self, i: usize) -> &[f64] {
        let f = self.columns.len();
        &self.values[i * f..(i + 1) * f]
    }
}

/// The rows of a features file and the requested sets' values.
#[derive(Debug, Clone)]
pub struct FeatureFile {
    pub path: PathBuf,
    pub image_ids: Vec<String>,
    pub source_paths: Vec<String>,
    /// Why a row has no features (the image could not be read).
    pub errors: Vec<Option<String>>,
    pub sets: Vec<SetValues>,
    /// Row by source path, else by image id where that is unique.
    rows: crate::rows::RowIndex<usize>,
}

/// Columns `<set>.*` of the file, in file order.
fn set_columns<'a>(names: impl Iterator<Item = &'a str>, set: &str) -> Vec<String> {
    let prefix = format!("{set}.");
    names
        .filter(|n| n.starts_with(&prefix) && n.len() > prefix.len())
        .map(str::to_string)
        .collect()
}

/// The sets present in a list of column names (the part before the first dot).
fn sets_present<'a>(names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for n in names {
        if let Some((set, _)) = n.split_once('.') {
            if !out.iter().any(|s| s == set) {
                out.push(set.to_string());
            }
        }
    }
    out
}

impl FeatureFile {
    /// The feature sets (`<set>.<name>` column prefixes) a features file holds.
    pub fn sets_of(path: &Path) -> Result<Vec<String>, FusionError> {
        let file = File::open(path).map_err(|e| FusionError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let builder =
            ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| FusionError::Format {
                path: path.to_path_buf(),
                what: "features",
                reason: format!("cannot read Parquet: {e}"),
            })?;
        let schema = builder.schema().clone();
        Ok(sets_present(
            schema.fields().iter().map(|f| f.name().as_str()),
        ))
    }

    /// Reads the identifying columns and the columns of `sets`. `wanted` optionally fixes a
    /// set's exact columns (a stored model's): every one must be present, extra ones are
    /// ignored.
    pub fn read(
        path: &Path,
        sets: &[String],
        wanted: &[Option<Vec<String>>],
    ) -> Result<FeatureFile, FusionError> {
        let bad = |reason: String| FusionError::Format {
            path: path.to_path_buf(),
            what: "features",
            reason,
        };
        let file = File::open(path).map_err(|e| FusionError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| bad(format!("cannot read Parquet: {e}")))?;
        let schema = builder.schema().clone();
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        for required in ["image_id", "source_path"] {
            if !names.contains(&required) {
                return Err(bad(format!(
                    "no `{required}` column (was it written by `plankton features`?)"
                )));
            }
        }
        let mut chosen: Vec<(String, Vec<String>)> = Vec::new();
        for (k, set) in sets.iter().enumerate() {
            let present = set_columns(names.iter().copied(), set);
            let columns = match wanted.get(k).and_then(|w| w.as_ref()) {
                Some(w) => {
                    let missing: Vec<&String> = w.iter().filter(|c| !present.contains(c)).collect();
                    if present.is_empty() || !missing.is_empty() {
                        return Err(FusionError::MissingSet {
                            path: path.to_path_buf(),
                            set: set.clone(),
                            reason: if present.is_empty() {
                                format!("no `{set}.*` columns")
                            } else {
                                format!("{} of the model's {} `{set}.*` columns are missing (first: `{}`)", missing.len(), w.len(), missing[0])
                            },
                            available: sets_present(names.iter().copied()),
                        });
                    }
                    w.clone()
                }
                None => present,
            };
            if columns.is_empty() {
                return Err(FusionError::MissingSet {
                    path: path.to_path_buf(),
                    set: set.clone(),
                    reason: format!("no `{set}.*` columns"),
                    available: sets_present(names.iter().copied()),
                });
            }
            chosen.push((set.clone(), columns));
        }
        let mut roots: Vec<usize> = ["image_id", "source_path", "error"]
            .iter()
            .filter_map(|n| names.iter().position(|x| x == n))
            .collect();
        for (_, cols) in &chosen {
            roots.extend(
                cols.iter()
                    .map(|c| names.iter().position(|x| x == c).expect("present")),
            );
        }
        roots.sort_unstable();
        roots.dedup();
        // Only the needed columns: a features file may carry hundreds (Haralick, Zernike, LBP...).
        let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
        let reader = builder
            .with_projection(mask)
            .build()
            .map_err(|e| bad(format!("cannot read Parquet: {e}")))?;
        let mut out = FeatureFile {
            path: path.to_path_buf(),
            image_ids: Vec::new(),
            source_paths: Vec::new(),
            errors: Vec::new(),
            sets: chosen
                .iter()
                .map(|(s, c)| SetValues {
                    name: s.clone(),
                    columns: c.clone(),
                    values: Vec::new(),
                })
                .collect(),
            rows: crate::rows::RowIndex::new(),
        };
        for batch in reader {
            let batch = batch.map_err(|e| bad(format!("cannot read Parquet: {e}")))?;
            let strings = |name: &str| -> Result<Option<StringArray>, FusionError> {
                match batch.column_by_name(name) {
                    None => Ok(None),
                    Some(c) => c
                        .as_any()
                        .downcast_ref::<StringArray>()
                        .cloned()
                        .map(Some)
                        .ok_or_else(|| bad(format!("`{name}` is not utf8"))),
                }
            };
            let ids = strings("image_id")?.expect("projected");
            let paths = strings("source_path")?.expect("projected");
            let errors = strings("error")?;
            for i in 0..batch.num_rows() {
                out.image_ids.push(ids.value(i).to_string());
                out.source_paths.push(paths.value(i).to_string());
                out.errors.push(
                    errors
                        .as_ref()
                        .and_then(|e| (!e.is_null(i)).then(|| e.value(i).to_string())),
                );
            }
            for set in &mut out.sets {
                let arrays = set
                    .columns
                    .iter()
                    .map(|c| {
                        let col = batch.column_by_name(c).expect("projected");
                        if !matches!(
                            col.data_type(),
                            DataType::Float64
                                | DataType::Float32
                                | DataType::Int32
                                | DataType::Int64
                                | DataType::UInt32
                        ) {
                            return Err(bad(format!("`{c}` is {}, not a number", col.data_type())));
                        }
                        let col = arrow::compute::cast(col, &DataType::Float64)
                            .map_err(|e| bad(format!("`{c}`: {e}")))?;
                        Ok(col
                            .as_any()
                            .downcast_ref::<Float64Array>()
                            .expect("cast to f64")
                            .clone())
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                for i in 0..batch.num_rows() {
                    set.values.extend(arrays.iter().map(|a| {
                        if a.is_null(i) {
                            f64::NAN
                        } else {
                            a.value(i)
                        }
                    }));
                }
            }
        }
        for (i, (p, id)) in out.source_paths.iter().zip(&out.image_ids).enumerate() {
            out.rows.insert(p, id, i);
        }
        Ok(out)
    }

    pub fn len(&self) -> usize {
        self.image_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.image_ids.is_empty()
    }

    /// The row for a prediction: by source path, else by image id when that is unique.
    pub fn find(&self, source_path: &str, image_id: &str) -> Option<usize> {
        self.rows.get(source_path, image_id).copied()
    }

    /// Whether row `i` has usable values for every set: no error, and in each set at least one
    /// non-null value (the rest are imputed).
    pub fn usable(&self, i: usize) -> bool {
        self.errors[i].is_none()
            && self
                .sets
                .iter()
                .all(|s| s.row(i).iter().any(|v| v.is_finite()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_are_chosen_by_prefix() {
        let names = [
            "image_id",
            "rows",
            "moments.a",
            "moments.b",
            "momentsx.c",
            "haralick.d0.x",
            "error",
        ];
        assert_eq!(
            set_columns(names.iter().copied(), "moments"),
            vec!["moments.a", "moments.b"]
        );
        assert_eq!(
            set_columns(names.iter().copied(), "haralick"),
            vec!["haralick.d0.x"]
        );
        assert_eq!(
            sets_present(names.iter().copied()),
            vec!["moments", "momentsx", "haralick"]
        );
    }
}
