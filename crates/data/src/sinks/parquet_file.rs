//! The file side of every streamed Parquet output (predictions, features, the daemon's rolling
//! files), written once: rows go to `<path>.partial` while the file is open; `finish` writes the
//! footer and moves it into place durably ([`plankton_core::fsx::commit`]); a file dropped
//! unfinished (an error upstream) leaves nothing behind. The writers on top only turn their
//! rows into record batches.
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

/// A failed Parquet write, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct ParquetFileError {
    pub path: PathBuf,
    pub message: String,
}

fn err(path: &Path, e: impl std::fmt::Display) -> ParquetFileError {
    ParquetFileError {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

pub struct ParquetFile {
    path: PathBuf,
    tmp: PathBuf,
    writer: Option<ArrowWriter<File>>,
}

impl ParquetFile {
    /// Opens `<path>.partial` (creating the folder) for `schema`, Snappy-compressed, with
    /// `metadata` as the file's key-value metadata and at most `row_group_rows` rows per row
    /// group (None: the library's default).
    pub fn create(
        path: &Path,
        schema: SchemaRef,
        metadata: Vec<(String, String)>,
        row_group_rows: Option<usize>,
    ) -> Result<ParquetFile, ParquetFileError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".partial");
        let tmp = PathBuf::from(tmp);
        let file = File::create(&tmp).map_err(|e| err(&tmp, e))?;
        let mut props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_key_value_metadata(Some(
                metadata
                    .into_iter()
                    .map(|(k, v)| KeyValue::new(k, v))
                    .collect(),
            ))
            .set_created_by(format!("plankton {}", env!("CARGO_PKG_VERSION")));
        if let Some(rows) = row_group_rows {
            props = props.set_max_row_group_row_count(Some(rows));
        }
        let writer =
            ArrowWriter::try_new(file, schema, Some(props.build())).map_err(|e| err(&tmp, e))?;
        Ok(ParquetFile {
            path: path.to_path_buf(),
            tmp,
            writer: Some(writer),
        })
    }

    pub fn write(&mut self, batch: &RecordBatch) -> Result<(), ParquetFileError> {
        self.writer
            .as_mut()
            .expect("open until finished")
            .write(batch)
            .map_err(|e| err(&self.tmp, e))
    }

    /// Writes the footer and moves the file into place.
    pub fn finish(mut self) -> Result<(), ParquetFileError> {
        let writer = self.writer.take().expect("open until finished");
        let closed = writer.close().map_err(|e| err(&self.tmp, e));
        if let Err(e) = closed {
            let _ = std::fs::remove_file(&self.tmp);
            return Err(e);
        }
        plankton_core::fsx::commit(&self.tmp, &self.path).map_err(|e| {
            let _ = std::fs::remove_file(&self.tmp);
            err(&self.path, e.source)
        })
    }
}

impl Drop for ParquetFile {
    fn drop(&mut self) {
        if self.writer.take().is_some() {
            // Not finished (an error upstream): leave no partial file behind.
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, UInt32Array};
    use arrow::datatypes::{DataType, Field, Schema};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use std::sync::Arc;

    fn batch(schema: &SchemaRef, values: &[u32]) -> RecordBatch {
        let column: ArrayRef = Arc::new(UInt32Array::from(values.to_vec()));
        RecordBatch::try_new(schema.clone(), vec![column]).unwrap()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn finished_files_are_complete_and_dropped_ones_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let schema: SchemaRef =
            Arc::new(Schema::new(vec![Field::new("n", DataType::UInt32, false)]));
        let path = dir.path().join("sub/out.parquet");
        let mut f = ParquetFile::create(
            &path,
            schema.clone(),
            vec![("plankton.test".into(), "yes".into())],
            Some(2),
        )
        .unwrap();
        f.write(&batch(&schema, &[1, 2, 3])).unwrap();
        assert_eq!(names(&dir.path().join("sub")), vec!["out.parquet.partial"]);
        f.finish().unwrap();
        assert_eq!(names(&dir.path().join("sub")), vec!["out.parquet"]);
        let reader =
            ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&path).unwrap()).unwrap();
        let meta = reader
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .unwrap()
            .clone();
        assert!(meta
            .iter()
            .any(|kv| kv.key == "plankton.test" && kv.value.as_deref() == Some("yes")));
        assert_eq!(
            reader.metadata().num_row_groups(),
            2,
            "row groups of at most 2 rows"
        );
        let rows: usize = reader.build().unwrap().map(|b| b.unwrap().num_rows()).sum();
        assert_eq!(rows, 3);

        let other = dir.path().join("sub/dropped.parquet");
        let mut f = ParquetFile::create(&other, schema.clone(), Vec::new(), None).unwrap();
        f.write(&batch(&schema, &[4])).unwrap();
        drop(f);
        assert_eq!(names(&dir.path().join("sub")), vec!["out.parquet"]);
    }
}
