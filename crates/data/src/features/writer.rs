//! The features Parquet file, streamed: `plankton features` and the daemon write through it.
//!
//! Columns: `image_id`, `source_path`, `label` (when known), `rows`, `cols` (the raw size),
//! one float64 column per feature value named `<set>.<name>`, and `error`. The footer metadata
//! `plankton.features` lists the sets and columns. Rows are written to `<path>.partial` and the
//! file is renamed into place when finished, so a crash never leaves a half file under the
//! final name.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Builder, StringBuilder, UInt32Builder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use image::GrayImage;

use super::job::{FeatureSet, FeaturesError};
use crate::sinks::parquet_file::ParquetFile;

/// Footer key of the JSON description of the sets and columns.
pub const META_FEATURES: &str = "plankton.features";

const ROWS_PER_BATCH: usize = 1024;

/// One image's features: `values` in the writer's column order, or `error` when the image
/// could not be read.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureRow {
    pub image_id: String,
    pub source_path: String,
    pub label: Option<String>,
    /// (rows, cols) of the decoded image.
    pub size: Option<(u32, u32)>,
    pub values: Option<Vec<f64>>,
    pub error: Option<String>,
}

/// The values of `sets` for one decoded image, concatenated in column order.
pub fn compute(sets: &[FeatureSet], img: &GrayImage) -> Vec<f64> {
    let mut v = Vec::new();
    for set in sets {
        set.compute(img, &mut v);
    }
    v
}

pub fn columns(sets: &[FeatureSet]) -> Vec<String> {
    sets.iter().flat_map(|s| s.columns()).collect()
}

fn schema(columns: &[String], sets: &[FeatureSet]) -> SchemaRef {
    let mut fields = vec![
        Field::new("image_id", DataType::Utf8, false),
        Field::new("source_path", DataType::Utf8, false),
        Field::new("label", DataType::Utf8, true),
        Field::new("rows", DataType::UInt32, true),
        Field::new("cols", DataType::UInt32, true),
    ];
    fields.extend(
        columns
            .iter()
            .map(|c| Field::new(c, DataType::Float64, true)),
    );
    fields.push(Field::new("error", DataType::Utf8, true));
    let meta = serde_json::json!({
        "sets": sets.iter().map(|s| s.name()).collect::<Vec<_>>(),
        "columns": columns,
        "plankton_version": env!("CARGO_PKG_VERSION"),
    });
    Arc::new(Schema::new_with_metadata(
        fields,
        [(META_FEATURES.to_string(), meta.to_string())]
            .into_iter()
            .collect::<std::collections::HashMap<String, String>>(),
    ))
}

/// Streams feature rows into a Parquet file.
pub struct FeatureWriter {
    file: ParquetFile,
    schema: SchemaRef,
    columns: usize,
    rows: Vec<FeatureRow>,
    written: usize,
}

impl FeatureWriter {
    pub fn create(path: &Path, sets: &[FeatureSet]) -> Result<FeatureWriter, FeaturesError> {
        let io = |p: &Path, e: String| FeaturesError::Io {
            path: p.to_path_buf(),
            message: e,
        };
        let columns = columns(sets);
        let schema = schema(&columns, sets);
        let meta = schema
            .metadata()
            .get(META_FEATURES)
            .cloned()
            .unwrap_or_default();
        let file = ParquetFile::create(
            path,
            schema.clone(),
            vec![(META_FEATURES.to_string(), meta)],
            None,
        )
        .map_err(|e| io(&e.path, e.message))?;
        Ok(FeatureWriter {
            file,
            schema,
            columns: columns.len(),
            rows: Vec::with_capacity(ROWS_PER_BATCH),
            written: 0,
        })
    }

    /// Queues a row (written in batches). A row whose value count does not match the columns
    /// is refused: it would shift every later column.
    pub fn push(&mut self, row: FeatureRow) -> Result<(), FeaturesError> {
        if let Some(v) = &row.values {
            if v.len() != self.columns {
                return Err(FeaturesError::Input(format!(
                    "{}: {} feature values for {} columns",
                    row.source_path,
                    v.len(),
                    self.columns
                )));
            }
        }
        self.rows.push(row);
        if self.rows.len() >= ROWS_PER_BATCH {
            self.flush()?;
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.written + self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn flush(&mut self) -> Result<(), FeaturesError> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let mut ids = StringBuilder::new();
        let mut paths = StringBuilder::new();
        let mut labels = StringBuilder::new();
        let mut rows = UInt32Builder::new();
        let mut cols = UInt32Builder::new();
        let mut values: Vec<Float64Builder> =
            (0..self.columns).map(|_| Float64Builder::new()).collect();
        let mut errors = StringBuilder::new();
        for r in self.rows.drain(..) {
            ids.append_value(&r.image_id);
            paths.append_value(&r.source_path);
            labels.append_option(r.label.as_deref());
            rows.append_option(r.size.map(|s| s.0));
            cols.append_option(r.size.map(|s| s.1));
            match &r.values {
                Some(v) => values
                    .iter_mut()
                    .zip(v)
                    .for_each(|(b, &x)| b.append_value(x)),
                None => values.iter_mut().for_each(|b| b.append_null()),
            }
            errors.append_option(r.error.as_deref());
        }
        let mut arrays: Vec<ArrayRef> = vec![
            Arc::new(ids.finish()),
            Arc::new(paths.finish()),
            Arc::new(labels.finish()),
            Arc::new(rows.finish()),
            Arc::new(cols.finish()),
        ];
        arrays.extend(values.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
        arrays.push(Arc::new(errors.finish()));
        let batch =
            RecordBatch::try_new(self.schema.clone(), arrays).expect("columns match the schema");
        self.written += batch.num_rows();
        self.file.write(&batch).map_err(|e| FeaturesError::Io {
            path: e.path,
            message: e.message,
        })
    }

    /// Writes what is queued, closes the file and renames it into place; returns the rows.
    pub fn finish(mut self) -> Result<usize, FeaturesError> {
        self.flush()?;
        self.file.finish().map_err(|e| FeaturesError::Io {
            path: e.path,
            message: e.message,
        })?;
        Ok(self.written)
    }
}
