//! Predictions as Parquet: one row per image, written as the predictions stream in, readable by
//! pyarrow, pandas and DuckDB. The file explains itself: class names and the model's metadata
//! travel in the footer's key-value metadata.
//!
//! | column | type | |
//! |---|---|---|
//! | `image_id` | utf8 | the file name (Kaggle's `image` column) |
//! | `source_path` | utf8 | where the image was read |
//! | `model_id` | utf8 | which model (run, weights, content hash) |
//! | `label` | utf8, nullable | the true class when the source knows it |
//! | `predicted_class` | utf8, nullable | top-1 class |
//! | `confidence` | float32, nullable | top-1 probability |
//! | `entropy` | float32, nullable | of the predicted distribution, in nats |
//! | `probabilities` | fixed_size_list<float32>[C], nullable | in `plankton.class_names` order |
//! | `top_classes` | list<utf8>, nullable | the k most probable classes, best first |
//! | `top_probabilities` | list<float32>, nullable | their probabilities |
//! | `views` | uint16 | test-time transforms averaged (0 for an image that failed) |
//! | `error` | utf8, nullable | why an image has no prediction (unreadable, too large...) |
//! | `energy` | float32, nullable | unknown score: `-logsumexp` of the logits averaged over the views (higher = less like any class) |
//! | `mahalanobis` | float32, nullable | unknown score: squared Mahalanobis distance of the view-averaged penultimate features to the nearest training class mean (null unless the run has `unknown.json`) |
//! | `unknown` | bool, nullable | the run's unknown rule (`plankton calibrate --unknown`) says no trained class fits (null without one) |
//!
//! The third unknown score, `1 - max p`, is `1 - confidence`.
//!
//! The daemon (`plankton serve`) adds eight columns after these:
//!
//! | column | type | |
//! |---|---|---|
//! | `seq` | uint64 | the spool's acceptance number (grows across restarts): of two rows with one `image_id`, the higher `seq` is the later upload |
//! | `received_at` | timestamp[ms, UTC] | when the image was accepted (acknowledged) |
//! | `image_height`, `image_width` | uint32, nullable | the decoded image's size (null when it could not be decoded) |
//! | `flag` | utf8, nullable | `too_small` or `blank` ([serve] `[checks]`): predicted, but not an organism |
//! | `stream_seq` | uint64, nullable | NATS input: the JetStream stream sequence of the message (two rows with one `stream_seq` are one message delivered twice, e.g. after a `kill -9`; `plankton compact` keeps one) |
//! | `captured_at` | timestamp[ms, UTC], nullable | NATS input: the capture time the message's `Plankton-Captured` header gave |
//! | `image_brightness` | float32, nullable | mean grey level (0-255) of the decoded image (what `plankton drift` and the drift gauges watch) |
//!
//! An image that could not be read keeps its row, with null predictions and the reason in
//! `error`, so nothing is silently lost. The file is written under a temporary name and renamed
//! into place when complete: a crash never leaves a truncated file under the final name.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, BooleanBuilder, FixedSizeListArray, FixedSizeListBuilder,
    Float32Array, Float32Builder, ListBuilder, StringArray, StringBuilder,
    TimestampMillisecondBuilder, UInt16Array, UInt16Builder, UInt32Builder, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::parquet_file::{ParquetFile, ParquetFileError};
use plankton_core::metrics::summarise_row;

/// Footer keys.
pub const META_CLASS_NAMES: &str = "plankton.class_names";
pub const META_MODEL: &str = "plankton.model";
pub const META_FORMAT: &str = "plankton.format";
/// Bumped when the columns change meaning.
pub const FORMAT: &str = "predictions/1";

/// Rows buffered before they become one Arrow record batch.
const ROWS_PER_BATCH: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ParquetSinkError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{path}: not a plankton predictions file: {reason}")]
    Format { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl Fn(String) -> ParquetSinkError + '_ {
    move |message| ParquetSinkError::Io {
        path: path.to_path_buf(),
        message,
    }
}

/// One image's prediction.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PredictionRow {
    pub image_id: String,
    pub source_path: String,
    pub label: Option<String>,
    /// `None` for an image that failed (then `error` says why).
    pub probabilities: Option<Vec<f32>>,
    pub views: u16,
    pub error: Option<String>,
    pub unknown: UnknownColumns,
}

/// The unknown-image columns of a row (`plankton_core::unknown`); all None when not computed.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct UnknownColumns {
    pub energy: Option<f32>,
    pub mahalanobis: Option<f32>,
    pub unknown: Option<bool>,
}

/// What the daemon records of each image beside its prediction (see the module's table).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ServeColumns {
    pub seq: u64,
    pub received_unix_ms: u64,
    /// (height, width) of the decoded image.
    pub image_size: Option<(u32, u32)>,
    pub flag: Option<String>,
    /// The JetStream stream sequence of the message the image came in (NATS input only): with
    /// `image_id` it makes a redelivery after a crash visible as a second row of one message.
    pub stream_seq: Option<u64>,
    /// When the instrument captured the image, if its source said (NATS `Plankton-Captured`).
    pub captured_unix_ms: Option<u64>,
    /// Mean grey level (0-255) of the decoded image.
    pub brightness: Option<f32>,
}

/// Indices of the `k` largest entries, largest first (ties: lower index first).
pub fn top_k(p: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..p.len()).collect();
    idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

fn serve_fields() -> Vec<Field> {
    vec![
        Field::new("seq", DataType::UInt64, false),
        Field::new(
            "received_at",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
        Field::new("image_height", DataType::UInt32, true),
        Field::new("image_width", DataType::UInt32, true),
        Field::new("flag", DataType::Utf8, true),
        Field::new("stream_seq", DataType::UInt64, true),
        Field::new(
            "captured_at",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            true,
        ),
        Field::new("image_brightness", DataType::Float32, true),
    ]
}

pub fn schema(classes: usize, metadata: std::collections::HashMap<String, String>) -> SchemaRef {
    schema_with(classes, metadata, false)
}

fn schema_with(
    classes: usize,
    metadata: std::collections::HashMap<String, String>,
    serve_columns: bool,
) -> SchemaRef {
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    let mut fields = vec![
        Field::new("image_id", DataType::Utf8, false),
        Field::new("source_path", DataType::Utf8, false),
        Field::new("model_id", DataType::Utf8, false),
        Field::new("label", DataType::Utf8, true),
        Field::new("predicted_class", DataType::Utf8, true),
        Field::new("confidence", DataType::Float32, true),
        Field::new("entropy", DataType::Float32, true),
        Field::new(
            "probabilities",
            DataType::FixedSizeList(item, classes as i32),
            true,
        ),
        Field::new(
            "top_classes",
            DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
            true,
        ),
        Field::new(
            "top_probabilities",
            DataType::List(Arc::new(Field::new("item", DataType::Float32, true))),
            true,
        ),
        Field::new("views", DataType::UInt16, false),
        Field::new("error", DataType::Utf8, true),
        Field::new("energy", DataType::Float32, true),
        Field::new("mahalanobis", DataType::Float32, true),
        Field::new("unknown", DataType::Boolean, true),
    ];
    if serve_columns {
        fields.extend(serve_fields());
    }
    Arc::new(Schema::new_with_metadata(fields, metadata))
}

/// Streams prediction rows into a Parquet file.
pub struct PredictionWriter {
    file: ParquetFile,
    schema: SchemaRef,
    class_names: Arc<Vec<String>>,
    model_id: String,
    top_k: usize,
    rows: Vec<PredictionRow>,
    /// The daemon's columns of `rows` (None: a writer without them).
    serve: Option<Vec<ServeColumns>>,
    written: usize,
}

impl PredictionWriter {
    /// `model_metadata` is a JSON object describing the model and how it predicted.
    pub fn create(
        path: &Path,
        class_names: Vec<String>,
        model_id: &str,
        model_metadata: &serde_json::Value,
        top_k: usize,
    ) -> Result<Self, ParquetSinkError> {
        Self::create_with(path, class_names, model_id, model_metadata, top_k, false)
    }

    /// As [`PredictionWriter::create`], with the daemon's columns ([`ServeColumns`]): rows go
    /// in with [`PredictionWriter::push_served`].
    pub fn create_served(
        path: &Path,
        class_names: Vec<String>,
        model_id: &str,
        model_metadata: &serde_json::Value,
        top_k: usize,
    ) -> Result<Self, ParquetSinkError> {
        Self::create_with(path, class_names, model_id, model_metadata, top_k, true)
    }

    fn create_with(
        path: &Path,
        class_names: Vec<String>,
        model_id: &str,
        model_metadata: &serde_json::Value,
        top_k: usize,
        serve_columns: bool,
    ) -> Result<Self, ParquetSinkError> {
        let kv = [
            (
                META_CLASS_NAMES.to_string(),
                serde_json::to_string(&class_names).expect("strings"),
            ),
            (META_MODEL.to_string(), model_metadata.to_string()),
            (META_FORMAT.to_string(), FORMAT.to_string()),
        ];
        let schema = schema_with(
            class_names.len(),
            kv.iter().cloned().collect(),
            serve_columns,
        );
        let file = ParquetFile::create(path, schema.clone(), kv.to_vec(), Some(65_536))
            .map_err(file_err)?;
        Ok(PredictionWriter {
            file,
            schema,
            class_names: Arc::new(class_names),
            model_id: model_id.to_string(),
            top_k: top_k.max(1),
            rows: Vec::with_capacity(ROWS_PER_BATCH),
            serve: serve_columns.then(|| Vec::with_capacity(ROWS_PER_BATCH)),
            written: 0,
        })
    }

    pub fn push(&mut self, row: PredictionRow) -> Result<(), ParquetSinkError> {
        assert!(self.serve.is_none(), "a served writer takes push_served");
        self.push_row(row)
    }

    /// A row with the daemon's columns (the writer must come from `create_served`).
    pub fn push_served(
        &mut self,
        row: PredictionRow,
        serve: ServeColumns,
    ) -> Result<(), ParquetSinkError> {
        self.serve
            .as_mut()
            .expect("a writer made by create_served")
            .push(serve);
        self.push_row(row)
    }

    fn push_row(&mut self, row: PredictionRow) -> Result<(), ParquetSinkError> {
        if let Some(p) = &row.probabilities {
            assert_eq!(p.len(), self.class_names.len(), "one probability per class");
        }
        self.rows.push(row);
        if self.rows.len() >= ROWS_PER_BATCH {
            self.flush_rows()?;
        }
        Ok(())
    }

    /// Rows pushed so far.
    pub fn len(&self) -> usize {
        self.written + self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn flush_rows(&mut self) -> Result<(), ParquetSinkError> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let batch = self.record_batch();
        self.file.write(&batch).map_err(file_err)?;
        self.written += self.rows.len();
        self.rows.clear();
        if let Some(s) = self.serve.as_mut() {
            s.clear();
        }
        Ok(())
    }

    fn record_batch(&self) -> RecordBatch {
        let classes = self.class_names.len();
        let k = self.top_k.min(classes);
        let mut ids = StringBuilder::new();
        let mut paths = StringBuilder::new();
        let mut models = StringBuilder::new();
        let mut labels = StringBuilder::new();
        let mut predicted = StringBuilder::new();
        let mut confidence = Float32Builder::new();
        let mut entropies = Float32Builder::new();
        let mut probs = FixedSizeListBuilder::new(Float32Builder::new(), classes as i32)
            .with_field(Arc::new(Field::new("item", DataType::Float32, false)));
        let mut top_classes = ListBuilder::new(StringBuilder::new());
        let mut top_probs = ListBuilder::new(Float32Builder::new());
        let mut views = UInt16Builder::new();
        let mut errors = StringBuilder::new();
        let mut energies = Float32Builder::new();
        let mut distances = Float32Builder::new();
        let mut unknown = BooleanBuilder::new();
        for r in &self.rows {
            energies.append_option(r.unknown.energy);
            distances.append_option(r.unknown.mahalanobis);
            unknown.append_option(r.unknown.unknown);
            ids.append_value(&r.image_id);
            paths.append_value(&r.source_path);
            models.append_value(&self.model_id);
            labels.append_option(r.label.as_deref());
            views.append_value(r.views);
            errors.append_option(r.error.as_deref());
            match &r.probabilities {
                Some(p) => {
                    let top = top_k(p, k);
                    predicted.append_value(&self.class_names[top[0]]);
                    confidence.append_value(p[top[0]]);
                    entropies.append_value(summarise_row(p).entropy as f32);
                    probs.values().append_slice(p);
                    probs.append(true);
                    for &i in &top {
                        top_classes.values().append_value(&self.class_names[i]);
                        top_probs.values().append_value(p[i]);
                    }
                    top_classes.append(true);
                    top_probs.append(true);
                }
                None => {
                    predicted.append_null();
                    confidence.append_null();
                    entropies.append_null();
                    // A null fixed-size list still occupies its slots.
                    probs.values().append_slice(&vec![0.0; classes]);
                    probs.append(false);
                    top_classes.append(false);
                    top_probs.append(false);
                }
            }
        }
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(ids.finish()),
            Arc::new(paths.finish()),
            Arc::new(models.finish()),
            Arc::new(labels.finish()),
            Arc::new(predicted.finish()),
            Arc::new(confidence.finish()),
            Arc::new(entropies.finish()),
            Arc::new(probs.finish()),
            Arc::new(top_classes.finish()),
            Arc::new(top_probs.finish()),
            Arc::new(views.finish()),
            Arc::new(errors.finish()),
            Arc::new(energies.finish()),
            Arc::new(distances.finish()),
            Arc::new(unknown.finish()),
        ];
        if let Some(serve) = &self.serve {
            let mut seq = UInt64Builder::new();
            let mut received = TimestampMillisecondBuilder::new().with_timezone("UTC");
            let mut heights = UInt32Builder::new();
            let mut widths = UInt32Builder::new();
            let mut flags = StringBuilder::new();
            let mut stream_seqs = UInt64Builder::new();
            let mut captured = TimestampMillisecondBuilder::new().with_timezone("UTC");
            let mut brightness = Float32Builder::new();
            for s in serve {
                brightness.append_option(s.brightness);
                seq.append_value(s.seq);
                received.append_value(s.received_unix_ms as i64);
                heights.append_option(s.image_size.map(|(h, _)| h));
                widths.append_option(s.image_size.map(|(_, w)| w));
                flags.append_option(s.flag.as_deref());
                stream_seqs.append_option(s.stream_seq);
                captured.append_option(s.captured_unix_ms.map(|ms| ms as i64));
            }
            columns.push(Arc::new(seq.finish()));
            columns.push(Arc::new(received.finish()));
            columns.push(Arc::new(heights.finish()));
            columns.push(Arc::new(widths.finish()));
            columns.push(Arc::new(flags.finish()));
            columns.push(Arc::new(stream_seqs.finish()));
            columns.push(Arc::new(captured.finish()));
            columns.push(Arc::new(brightness.finish()));
        }
        RecordBatch::try_new(self.schema.clone(), columns).expect("columns match the schema")
    }

    /// Writes the footer and moves the file into place; returns the row count.
    pub fn finish(mut self) -> Result<usize, ParquetSinkError> {
        self.flush_rows()?;
        self.file.finish().map_err(file_err)?;
        Ok(self.written)
    }
}

fn file_err(e: ParquetFileError) -> ParquetSinkError {
    io(&e.path)(e.message)
}

/// The `plankton.model` JSON and the (image_id, seq) of every row of a daemon's predictions
/// file (only those two columns are read). A file without `seq` (not the daemon's) gives none.
pub fn served_keys(
    path: &Path,
) -> Result<(serde_json::Value, Vec<(String, u64)>), ParquetSinkError> {
    use arrow::array::UInt64Array;
    use parquet::arrow::ProjectionMask;
    let bad = |reason: String| ParquetSinkError::Format {
        path: path.to_path_buf(),
        reason,
    };
    let file = File::open(path).map_err(|e| io(path)(e.to_string()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| bad(format!("cannot read Parquet: {e}")))?;
    let model = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| {
            kv.iter()
                .find(|e| e.key == META_MODEL)
                .and_then(|e| e.value.clone())
        })
        .and_then(|v| serde_json::from_str(&v).ok())
        .unwrap_or(serde_json::Value::Null);
    let fields = builder.schema().fields();
    let (Some(id_col), Some(seq_col)) = (
        fields.iter().position(|f| f.name() == "image_id"),
        fields.iter().position(|f| f.name() == "seq"),
    ) else {
        return Ok((model, Vec::new()));
    };
    let mask = ProjectionMask::roots(builder.parquet_schema(), [id_col, seq_col]);
    let reader = builder
        .with_projection(mask)
        .build()
        .map_err(|e| bad(format!("cannot read Parquet: {e}")))?;
    let mut keys = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| bad(format!("cannot read Parquet: {e}")))?;
        let ids = batch
            .column_by_name("image_id")
            .and_then(|c| c.as_any().downcast_ref::<StringArray>().cloned());
        let seqs = batch
            .column_by_name("seq")
            .and_then(|c| c.as_any().downcast_ref::<UInt64Array>().cloned());
        let (Some(ids), Some(seqs)) = (ids, seqs) else {
            return Err(bad("`image_id` is not utf8 or `seq` is not uint64".into()));
        };
        keys.extend((0..batch.num_rows()).map(|i| (ids.value(i).to_string(), seqs.value(i))));
    }
    Ok((model, keys))
}

/// A predictions file read back whole (for evaluation, calibration and submissions).
#[derive(Debug, Clone)]
pub struct Predictions {
    pub class_names: Vec<String>,
    /// The `plankton.model` JSON.
    pub model: serde_json::Value,
    pub rows: Vec<PredictionRow>,
    pub model_ids: Vec<String>,
}

impl Predictions {
    pub fn read(path: &Path) -> Result<Predictions, ParquetSinkError> {
        let bad = |reason: String| ParquetSinkError::Format {
            path: path.to_path_buf(),
            reason,
        };
        let file = File::open(path).map_err(|e| io(path)(e.to_string()))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| bad(format!("cannot read Parquet: {e}")))?;
        let kv: std::collections::HashMap<String, String> = builder
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .map(|kv| {
                kv.iter()
                    .filter_map(|e| e.value.clone().map(|v| (e.key.clone(), v)))
                    .collect()
            })
            .unwrap_or_default();
        let class_names: Vec<String> = kv
            .get(META_CLASS_NAMES)
            .ok_or_else(|| bad(format!("no `{META_CLASS_NAMES}` in the file's metadata")))
            .and_then(|s| {
                serde_json::from_str(s).map_err(|e| bad(format!("{META_CLASS_NAMES}: {e}")))
            })?;
        let model = kv
            .get(META_MODEL)
            .map(|s| serde_json::from_str(s).map_err(|e| bad(format!("{META_MODEL}: {e}"))))
            .transpose()?
            .unwrap_or(serde_json::Value::Null);
        let reader = builder
            .build()
            .map_err(|e| bad(format!("cannot read Parquet: {e}")))?;
        let mut rows = Vec::new();
        let mut model_ids = Vec::new();
        for batch in reader {
            let batch = batch.map_err(|e| bad(format!("cannot read Parquet: {e}")))?;
            let col = |name: &str| {
                batch
                    .column_by_name(name)
                    .ok_or_else(|| bad(format!("no `{name}` column")))
            };
            let strings = |name: &str| -> Result<StringArray, ParquetSinkError> {
                col(name)?
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .cloned()
                    .ok_or_else(|| bad(format!("`{name}` is not utf8")))
            };
            let ids = strings("image_id")?;
            let paths = strings("source_path")?;
            let models = strings("model_id")?;
            let labels = strings("label")?;
            let errors = strings("error")?;
            let probs = col("probabilities")?
                .as_any()
                .downcast_ref::<FixedSizeListArray>()
                .cloned()
                .ok_or_else(|| bad("`probabilities` is not a fixed-size list".into()))?;
            if probs.value_length() as usize != class_names.len() {
                return Err(bad(format!(
                    "{} probabilities per row but {} class names",
                    probs.value_length(),
                    class_names.len()
                )));
            }
            let values = probs
                .values()
                .as_any()
                .downcast_ref::<Float32Array>()
                .cloned()
                .ok_or_else(|| bad("`probabilities` items are not float32".into()))?;
            let views = col("views")?
                .as_any()
                .downcast_ref::<UInt16Array>()
                .cloned()
                .ok_or_else(|| bad("`views` is not uint16".into()))?;
            // Files written before the unknown columns existed have none of them.
            let floats = |name: &str| -> Result<Option<Float32Array>, ParquetSinkError> {
                batch
                    .column_by_name(name)
                    .map(|c| {
                        c.as_any()
                            .downcast_ref::<Float32Array>()
                            .cloned()
                            .ok_or_else(|| bad(format!("`{name}` is not float32")))
                    })
                    .transpose()
            };
            let energies = floats("energy")?;
            let distances = floats("mahalanobis")?;
            let unknown = batch
                .column_by_name("unknown")
                .map(|c| {
                    c.as_any()
                        .downcast_ref::<BooleanArray>()
                        .cloned()
                        .ok_or_else(|| bad("`unknown` is not bool".into()))
                })
                .transpose()?;
            let c = class_names.len();
            for i in 0..batch.num_rows() {
                let float_at = |a: &Option<Float32Array>| {
                    a.as_ref().and_then(|a| (!a.is_null(i)).then(|| a.value(i)))
                };
                let opt = |a: &StringArray| (!a.is_null(i)).then(|| a.value(i).to_string());
                rows.push(PredictionRow {
                    image_id: ids.value(i).to_string(),
                    source_path: paths.value(i).to_string(),
                    label: opt(&labels),
                    probabilities: (!probs.is_null(i)).then(|| {
                        let start = probs.value_offset_at(i);
                        values.values()[start..start + c].to_vec()
                    }),
                    views: views.value(i),
                    error: opt(&errors),
                    unknown: UnknownColumns {
                        energy: float_at(&energies),
                        mahalanobis: float_at(&distances),
                        unknown: unknown
                            .as_ref()
                            .and_then(|a| (!a.is_null(i)).then(|| a.value(i))),
                    },
                });
                let m = models.value(i);
                if !model_ids.iter().any(|x| x == m) {
                    model_ids.push(m.to_string());
                }
            }
        }
        Ok(Predictions {
            class_names,
            model,
            rows,
            model_ids,
        })
    }
}
