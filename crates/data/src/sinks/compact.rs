//! `plankton compact`: one row per image from the daemons' rolling prediction files. Delivery is
//! at-least-once (a daemon killed between writing a row and acking its message leaves the
//! message to another daemon, which writes a second row), so the files of a group of daemons
//! may hold an image twice. Compaction keeps, for each `image_id`, the earliest accepted row
//! (`received_at`) that has a prediction, else the earliest error row (files without
//! `received_at`: the first in input order), and writes them to one Parquet file with the same
//! columns (files of an older version, lacking columns added since, compact with newer ones:
//! their rows are null there). The DuckDB equivalent is in the README.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::{Array, BooleanArray, StringArray, TimestampMillisecondArray};
use arrow::datatypes::SchemaRef;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use super::parquet_file::ParquetFile;

#[derive(Debug, thiserror::Error)]
pub enum CompactError {
    #[error("{path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{path}: its columns differ from {first}'s (files of different models or versions cannot be compacted into one)")]
    Schema { path: PathBuf, first: PathBuf },
    #[error("{path}: its classes differ from {first}'s (same count, other names or order): the probabilities would be read against the wrong classes")]
    Classes { path: PathBuf, first: PathBuf },
    #[error("no prediction files (predictions-*.parquet) in {0}")]
    Empty(String),
    #[error(transparent)]
    Write(#[from] super::parquet_file::ParquetFileError),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactSummary {
    pub files: usize,
    pub rows: usize,
    /// Rows written: one per image id.
    pub kept: usize,
    /// Ids that had more than one row.
    pub duplicated_ids: usize,
}

/// The prediction files among `inputs`: files as given, folders' finished
/// `predictions-*.parquet` files (not `.partial` ones), in name order.
pub fn prediction_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, CompactError> {
    let mut files = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let listing = std::fs::read_dir(input).map_err(|e| CompactError::Read {
                path: input.clone(),
                message: e.to_string(),
            })?;
            let mut found: Vec<PathBuf> = listing
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name().is_some_and(|n| {
                        let n = n.to_string_lossy();
                        n.starts_with("predictions-") && n.ends_with(".parquet")
                    })
                })
                .collect();
            found.sort();
            files.extend(found);
        } else {
            files.push(input.clone());
        }
    }
    if files.is_empty() {
        let names: Vec<String> = inputs.iter().map(|p| p.display().to_string()).collect();
        return Err(CompactError::Empty(names.join(", ")));
    }
    Ok(files)
}

fn open(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>, CompactError> {
    let read = |message: String| CompactError::Read {
        path: path.to_path_buf(),
        message,
    };
    let file = File::open(path).map_err(|e| read(e.to_string()))?;
    ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| read(format!("not Parquet: {e}")))
}

fn strings<'a>(
    batch: &'a arrow::record_batch::RecordBatch,
    name: &str,
    path: &Path,
) -> Result<&'a StringArray, CompactError> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
        .ok_or_else(|| CompactError::Read {
            path: path.to_path_buf(),
            message: format!("no text column `{name}`: not a predictions file"),
        })
}

/// Every column of `narrow` is in `wide` with its type, and every column `narrow` lacks may be
/// null.
fn within(narrow: &SchemaRef, wide: &SchemaRef) -> bool {
    narrow.fields().iter().all(|f| {
        wide.field_with_name(f.name())
            .is_ok_and(|w| w.data_type() == f.data_type())
    }) && wide
        .fields()
        .iter()
        .all(|w| w.is_nullable() || narrow.field_with_name(w.name()).is_ok())
}

/// The columns of the compacted file: the widest file's, when every other file's columns are
/// among them (same types) and those it lacks may be null. Files written before a version added
/// nullable columns (the unknown scores, `image_brightness`) compact with newer ones; their rows
/// get nulls there.
fn common_schema(
    schemas: &[SchemaRef],
    files: &[PathBuf],
    first: &Path,
) -> Result<SchemaRef, CompactError> {
    let widest = schemas
        .iter()
        .max_by_key(|s| s.fields().len())
        .expect("at least one file")
        .clone();
    for (s, path) in schemas.iter().zip(files) {
        if !within(s, &widest) {
            return Err(CompactError::Schema {
                path: path.clone(),
                first: first.to_path_buf(),
            });
        }
    }
    Ok(widest)
}

/// `batch` in the columns of `schema`, nulls where it lacks one.
fn widen(
    batch: &arrow::record_batch::RecordBatch,
    schema: &SchemaRef,
) -> arrow::record_batch::RecordBatch {
    if batch.schema().fields() == schema.fields() {
        return batch.clone();
    }
    let columns: Vec<arrow::array::ArrayRef> = schema
        .fields()
        .iter()
        .map(|f| {
            batch
                .column_by_name(f.name())
                .cloned()
                .unwrap_or_else(|| arrow::array::new_null_array(f.data_type(), batch.num_rows()))
        })
        .collect();
    arrow::record_batch::RecordBatch::try_new(schema.clone(), columns)
        .expect("columns checked against the schema")
}

/// The key-value metadata two files share: a key with one value in both is kept; a key whose
/// values are JSON objects (the model description, which names the daemon and its spool) keeps
/// the fields they agree on; any other key is left out.
fn merge_metadata(a: Vec<(String, String)>, b: &[(String, String)]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (key, value) in a {
        let Some((_, other)) = b.iter().find(|(k, _)| k == &key) else {
            continue;
        };
        if &value == other {
            out.push((key, value));
            continue;
        }
        let parse = |t: &str| serde_json::from_str::<serde_json::Value>(t).ok();
        if let (Some(serde_json::Value::Object(x)), Some(serde_json::Value::Object(y))) =
            (parse(&value), parse(other))
        {
            let common: serde_json::Map<String, serde_json::Value> =
                x.into_iter().filter(|(k, v)| y.get(k) == Some(v)).collect();
            out.push((key, serde_json::Value::Object(common).to_string()));
        }
    }
    out
}

/// The row an image id keeps so far.
struct Kept {
    file: usize,
    row: usize,
    /// It has a prediction (no error).
    predicted: bool,
    /// When the daemon accepted it (ms), i64::MIN without that column.
    when: i64,
    /// Rows of this id seen.
    count: usize,
}

/// Compacts `files` into `out` (written atomically).
pub fn compact(files: &[PathBuf], out: &Path) -> Result<CompactSummary, CompactError> {
    // Pass 1: which row of which file each id keeps (two columns read).
    let mut schema: Option<(SchemaRef, PathBuf)> = None;
    let mut schemas: Vec<SchemaRef> = Vec::with_capacity(files.len());
    let mut metadata: Option<Vec<(String, String)>> = None;
    let mut keep: HashMap<String, Kept> = HashMap::new();
    let mut rows = 0usize;
    for (fi, path) in files.iter().enumerate() {
        let builder = open(path)?;
        schemas.push(builder.schema().clone());
        match &schema {
            None => schema = Some((builder.schema().clone(), path.clone())),
            Some((s, first)) => {
                if !(within(s, builder.schema()) || within(builder.schema(), s)) {
                    return Err(CompactError::Schema {
                        path: path.clone(),
                        first: first.clone(),
                    });
                }
            }
        }
        let kv: Vec<(String, String)> = builder
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .map(|kv| {
                kv.iter()
                    .filter_map(|e| Some((e.key.clone(), e.value.clone()?)))
                    .collect()
            })
            .unwrap_or_default();
        let classes = |kv: &[(String, String)]| {
            kv.iter()
                .find(|(k, _)| k == super::parquet::META_CLASS_NAMES)
                .map(|(_, v)| v.clone())
        };
        if let (Some(m), Some((_, first))) = (&metadata, &schema) {
            if classes(m) != classes(&kv) {
                return Err(CompactError::Classes {
                    path: path.clone(),
                    first: first.clone(),
                });
            }
        }
        metadata = Some(match metadata {
            None => kv,
            Some(m) => merge_metadata(m, &kv),
        });
        let fields = builder.schema().fields();
        let columns: Vec<usize> = ["image_id", "error", "received_at"]
            .iter()
            .filter_map(|c| fields.iter().position(|f| f.name() == c))
            .collect();
        let mask = ProjectionMask::roots(builder.parquet_schema(), columns);
        let reader = builder
            .with_projection(mask)
            .build()
            .map_err(|e| CompactError::Read {
                path: path.clone(),
                message: e.to_string(),
            })?;
        let mut row = 0usize;
        for batch in reader {
            let batch = batch.map_err(|e| CompactError::Read {
                path: path.clone(),
                message: e.to_string(),
            })?;
            let ids = strings(&batch, "image_id", path)?;
            let errors = strings(&batch, "error", path)?;
            // The daemon's acceptance time; files without it (plankton predict) keep input order.
            let received = batch
                .column_by_name("received_at")
                .and_then(|c| c.as_any().downcast_ref::<TimestampMillisecondArray>());
            for i in 0..batch.num_rows() {
                let predicted = errors.is_null(i);
                let when = received.map_or(i64::MIN, |r| r.value(i));
                keep.entry(ids.value(i).to_string())
                    .and_modify(|k| {
                        k.count += 1;
                        if (predicted && !k.predicted)
                            || (predicted == k.predicted && when < k.when)
                        {
                            *k = Kept {
                                file: fi,
                                row,
                                predicted,
                                when,
                                count: k.count,
                            };
                        }
                    })
                    .or_insert(Kept {
                        file: fi,
                        row,
                        predicted,
                        when,
                        count: 1,
                    });
                row += 1;
            }
        }
        rows += row;
    }
    let Some((_, first)) = schema else {
        return Err(CompactError::Empty("no files".into()));
    };
    let schema = common_schema(&schemas, files, &first)?;
    // Pass 2: each file's kept rows, in order.
    let mut kept_rows: Vec<Vec<usize>> = vec![Vec::new(); files.len()];
    for k in keep.values() {
        kept_rows[k.file].push(k.row);
    }
    let mut writer = ParquetFile::create(out, schema.clone(), metadata.unwrap_or_default(), None)?;
    for (fi, path) in files.iter().enumerate() {
        let mut wanted = std::mem::take(&mut kept_rows[fi]);
        if wanted.is_empty() {
            continue;
        }
        wanted.sort_unstable();
        let reader = open(path)?.build().map_err(|e| CompactError::Read {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let (mut start, mut next) = (0usize, 0usize);
        for batch in reader {
            let batch = batch.map_err(|e| CompactError::Read {
                path: path.clone(),
                message: e.to_string(),
            })?;
            let n = batch.num_rows();
            let mut mask = vec![false; n];
            while next < wanted.len() && wanted[next] < start + n {
                mask[wanted[next] - start] = true;
                next += 1;
            }
            start += n;
            let picked = arrow::compute::filter_record_batch(&batch, &BooleanArray::from(mask))
                .map_err(|e| CompactError::Read {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            if picked.num_rows() > 0 {
                writer.write(&widen(&picked, &schema))?;
            }
        }
    }
    writer.finish()?;
    Ok(CompactSummary {
        files: files.len(),
        rows,
        kept: keep.len(),
        duplicated_ids: keep.values().filter(|k| k.count > 1).count(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::parquet::{PredictionRow, PredictionWriter, Predictions, ServeColumns};

    fn write(path: &Path, rows: &[(&str, Option<f32>, u64)]) {
        write_classes(path, rows, &["a", "b"]);
    }

    fn write_classes(path: &Path, rows: &[(&str, Option<f32>, u64)], classes: &[&str]) {
        let classes: Vec<String> = classes.iter().map(|c| c.to_string()).collect();
        let mut w =
            PredictionWriter::create_served(path, classes, "m", &serde_json::json!({}), 2).unwrap();
        for (id, p, seq) in rows {
            w.push_served(
                PredictionRow {
                    image_id: id.to_string(),
                    source_path: format!("nats:{seq}"),
                    label: None,
                    probabilities: p.map(|p| vec![p, 1.0 - p]),
                    views: 1,
                    error: p.is_none().then(|| "bad image".to_string()),
                    unknown: Default::default(),
                },
                ServeColumns {
                    seq: *seq,
                    stream_seq: Some(*seq),
                    ..Default::default()
                },
            )
            .unwrap();
        }
        w.finish().unwrap();
    }

    #[test]
    fn one_row_per_id_preferring_a_prediction_over_an_error_row() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        write(
            &d.join("predictions-1-0001.parquet"),
            &[("x", Some(0.9), 1), ("y", None, 2), ("z", Some(0.2), 3)],
        );
        write(
            &d.join("predictions-2-0001.parquet"),
            &[("x", Some(0.8), 4), ("y", Some(0.3), 5), ("w", None, 6)],
        );
        std::fs::write(d.join("predictions-3-0001.parquet.partial"), b"unfinished").unwrap();
        let files = prediction_files(&[d.to_path_buf()]).unwrap();
        assert_eq!(files.len(), 2, "the .partial file is not read");
        let out = d.join("compact/all.parquet");
        let s = compact(&files, &out).unwrap();
        assert_eq!(
            s,
            CompactSummary {
                files: 2,
                rows: 6,
                kept: 4,
                duplicated_ids: 2
            }
        );
        let back = Predictions::read(&out).unwrap();
        let mut got: Vec<(String, Option<f32>)> = back
            .rows
            .iter()
            .map(|r| (r.image_id.clone(), r.probabilities.as_ref().map(|p| p[0])))
            .collect();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            got,
            vec![
                ("w".into(), None),
                ("x".into(), Some(0.9)),
                ("y".into(), Some(0.3)),
                ("z".into(), Some(0.2)),
            ],
            "x: the first file's row; y: the later row with a prediction"
        );
    }

    #[test]
    fn the_earliest_accepted_row_wins_whatever_the_order_of_the_inputs() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let file = |name: &str, p: f32, received: u64| {
            let path = d.join(name);
            let mut w = PredictionWriter::create_served(
                &path,
                vec!["a".into(), "b".into()],
                "m",
                &serde_json::json!({}),
                2,
            )
            .unwrap();
            w.push_served(
                PredictionRow {
                    image_id: "x".into(),
                    source_path: "nats".into(),
                    label: None,
                    probabilities: Some(vec![p, 1.0 - p]),
                    views: 1,
                    error: None,
                    unknown: Default::default(),
                },
                ServeColumns {
                    received_unix_ms: received,
                    ..Default::default()
                },
            )
            .unwrap();
            w.finish().unwrap();
            path
        };
        let later = file("a-later.parquet", 0.9, 2_000);
        let earlier = file("b-earlier.parquet", 0.8, 1_000);
        compact(&[later, earlier], &d.join("o.parquet")).unwrap();
        let back = Predictions::read(&d.join("o.parquet")).unwrap();
        assert_eq!(back.rows.len(), 1);
        assert_eq!(back.rows[0].probabilities.as_ref().unwrap()[0], 0.8);
    }

    #[test]
    fn files_of_several_daemons_keep_the_model_fields_they_share() {
        let a = vec![
            (
                "plankton.class_names".to_string(),
                "[\"a\",\"b\"]".to_string(),
            ),
            (
                "plankton.model".to_string(),
                r#"{"model_id":"m1","daemon":"cam-a","spool_id":"x","tta":1}"#.to_string(),
            ),
            ("other".to_string(), "1".to_string()),
        ];
        let b = vec![
            (
                "plankton.class_names".to_string(),
                "[\"a\",\"b\"]".to_string(),
            ),
            (
                "plankton.model".to_string(),
                r#"{"model_id":"m1","daemon":"cam-b","spool_id":"y","tta":1}"#.to_string(),
            ),
            ("other".to_string(), "2".to_string()),
        ];
        let m = merge_metadata(a, &b);
        assert_eq!(m.len(), 2, "{m:?}");
        assert_eq!(m[0], b[0]);
        let model: serde_json::Value = serde_json::from_str(&m[1].1).unwrap();
        assert_eq!(model, serde_json::json!({"model_id": "m1", "tta": 1}));
    }

    /// A daemon upgraded mid-day: its older files lack the columns added since (all nullable);
    /// they compact with the newer ones, their rows null there.
    #[test]
    fn files_of_an_older_version_compact_with_newer_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let newer = d.join("predictions-2.parquet");
        let mut w = PredictionWriter::create_served(
            &newer,
            vec!["a".into(), "b".into()],
            "m",
            &serde_json::json!({}),
            2,
        )
        .unwrap();
        w.push_served(
            PredictionRow {
                image_id: "new".into(),
                probabilities: Some(vec![0.7, 0.3]),
                views: 1,
                unknown: crate::sinks::parquet::UnknownColumns {
                    energy: Some(-3.5),
                    mahalanobis: Some(12.0),
                    unknown: Some(true),
                },
                ..Default::default()
            },
            ServeColumns {
                seq: 2,
                brightness: Some(99.0),
                ..Default::default()
            },
        )
        .unwrap();
        w.finish().unwrap();
        // The older file: the same columns without the ones added since.
        let older = d.join("predictions-1.parquet");
        write(&older, &[("old", Some(0.9), 1)]);
        let added = ["energy", "mahalanobis", "unknown", "image_brightness"];
        let b = open(&older).unwrap();
        let kv = b.metadata().file_metadata().key_value_metadata().cloned();
        let keep: Vec<usize> = b
            .schema()
            .fields()
            .iter()
            .enumerate()
            .filter(|(_, f)| !added.contains(&f.name().as_str()))
            .map(|(i, _)| i)
            .collect();
        let batches: Vec<_> = b
            .build()
            .unwrap()
            .map(|r| r.unwrap().project(&keep).unwrap())
            .collect();
        let props = parquet::file::properties::WriterProperties::builder()
            .set_key_value_metadata(kv)
            .build();
        let mut aw = parquet::arrow::ArrowWriter::try_new(
            File::create(&older).unwrap(),
            batches[0].schema(),
            Some(props),
        )
        .unwrap();
        for batch in &batches {
            aw.write(batch).unwrap();
        }
        aw.close().unwrap();
        assert!(open(&older)
            .unwrap()
            .schema()
            .field_with_name("energy")
            .is_err());

        let out = d.join("all.parquet");
        let s = compact(&[older, newer], &out).unwrap();
        assert_eq!(s.kept, 2);
        let rows = Predictions::read(&out).unwrap().rows;
        let by_id = |id: &str| rows.iter().find(|r| r.image_id == id).unwrap().clone();
        assert_eq!(by_id("old").unknown, Default::default());
        assert_eq!(by_id("new").unknown.energy, Some(-3.5));
        assert_eq!(by_id("new").unknown.unknown, Some(true));
    }

    #[test]
    fn files_of_another_layout_or_not_parquet_are_refused_by_name() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        write(&d.join("predictions-1.parquet"), &[("x", Some(0.9), 1)]);
        let other = d.join("other.parquet");
        let mut w = PredictionWriter::create(
            &other,
            vec!["a".into(), "b".into(), "c".into()],
            "m",
            &serde_json::json!({}),
            2,
        )
        .unwrap();
        w.push(PredictionRow {
            image_id: "x".into(),
            source_path: "x".into(),
            label: None,
            probabilities: Some(vec![0.2, 0.3, 0.5]),
            views: 1,
            error: None,
            unknown: Default::default(),
        })
        .unwrap();
        w.finish().unwrap();
        let e = compact(
            &[d.join("predictions-1.parquet"), other.clone()],
            &d.join("o.parquet"),
        )
        .unwrap_err();
        assert!(
            matches!(e, CompactError::Schema { ref path, .. } if path == &other),
            "{e}"
        );
        // Same columns, classes in another order: refused.
        let swapped = d.join("predictions-2.parquet");
        write_classes(&swapped, &[("y", Some(0.1), 2)], &["b", "a"]);
        let e = compact(
            &[d.join("predictions-1.parquet"), swapped.clone()],
            &d.join("o.parquet"),
        )
        .unwrap_err();
        assert!(
            matches!(e, CompactError::Classes { ref path, .. } if path == &swapped),
            "{e}"
        );
        std::fs::write(d.join("junk.parquet"), b"not parquet").unwrap();
        let e = compact(&[d.join("junk.parquet")], &d.join("o.parquet")).unwrap_err();
        assert!(e.to_string().contains("junk.parquet"), "{e}");
        assert!(!d.join("o.parquet").exists());
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            prediction_files(&[empty.path().to_path_buf()]),
            Err(CompactError::Empty(_))
        ));
    }
}
