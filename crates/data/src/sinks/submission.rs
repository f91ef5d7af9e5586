//! Kaggle submission CSV: `image,<class 1>,...,<class C>` in the column order of the
//! competition's `sampleSubmission.csv` (or the model's class order when there is none), every
//! row normalised to sum to 1.
//!
//! Kaggle rejects a submission with a missing image, so an image that could not be read still
//! gets a row: the fallback distribution (the training-set class prior, the best constant
//! answer under log loss), and is counted.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SubmissionError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{path}: the submission's classes do not match the model's: {reason}")]
    Classes { path: PathBuf, reason: String },
    #[error("{path}: image `{image}` would appear twice (two inputs hold a file of that name); a submission needs one row per image")]
    DuplicateImage { path: PathBuf, image: String },
}

/// One image: its id and its probabilities in the model's class order (`None` = failed).
pub struct SubmissionRow<'a> {
    pub image_id: &'a str,
    pub probabilities: Option<&'a [f32]>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SubmissionSummary {
    pub rows: usize,
    /// Images written with the fallback distribution.
    pub fallback_rows: usize,
}

/// For each submission column, the model class it takes its value from.
pub fn column_mapping(
    model_classes: &[String],
    columns: &[String],
    columns_from: &Path,
) -> Result<Vec<usize>, SubmissionError> {
    let bad = |reason: String| SubmissionError::Classes {
        path: columns_from.to_path_buf(),
        reason,
    };
    let missing: Vec<&String> = model_classes
        .iter()
        .filter(|c| !columns.contains(c))
        .collect();
    if !missing.is_empty() {
        return Err(bad(format!(
            "the model predicts {} class(es) the header lacks: {}",
            missing.len(),
            preview(&missing)
        )));
    }
    columns
        .iter()
        .map(|c| {
            model_classes
                .iter()
                .position(|m| m == c)
                .ok_or_else(|| bad(format!("the header's class `{c}` is unknown to the model")))
        })
        .collect()
}

fn preview(names: &[&String]) -> String {
    let mut s: Vec<&str> = names.iter().take(5).map(|s| s.as_str()).collect();
    if names.len() > 5 {
        s.push("...");
    }
    s.join(", ")
}

/// Writes the CSV (under a temporary name, renamed when complete).
pub fn write_submission(
    path: &Path,
    model_classes: &[String],
    columns: &[String],
    columns_from: &Path,
    rows: &[SubmissionRow<'_>],
    fallback: &[f64],
) -> Result<SubmissionSummary, SubmissionError> {
    let mapping = column_mapping(model_classes, columns, columns_from)?;
    let mut seen = std::collections::HashSet::with_capacity(rows.len());
    if let Some(dup) = rows.iter().find(|r| !seen.insert(r.image_id)) {
        return Err(SubmissionError::DuplicateImage {
            path: path.to_path_buf(),
            image: dup.image_id.to_string(),
        });
    }
    assert_eq!(
        fallback.len(),
        model_classes.len(),
        "fallback has one value per class"
    );
    let io = |p: &Path, e: std::io::Error| SubmissionError::Io {
        path: p.to_path_buf(),
        message: e.to_string(),
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    }
    let tmp = plankton_core::fsx::temp_path(path);
    let file = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
    // Through the csv crate: an image id (a file name) may hold commas and quotes.
    let mut out = csv::Writer::from_writer(std::io::BufWriter::new(file));
    let mut fallback_rows = 0;
    let mut values = vec![0f64; model_classes.len()];
    let to_io = |e: csv::Error| std::io::Error::other(e.to_string());
    let result = (|| -> std::io::Result<()> {
        out.write_record(std::iter::once("image").chain(columns.iter().map(String::as_str)))
            .map_err(to_io)?;
        let mut record: Vec<String> = Vec::with_capacity(mapping.len() + 1);
        for row in rows {
            match row.probabilities {
                Some(p) => {
                    for (v, &x) in values.iter_mut().zip(p) {
                        *v = (x as f64).max(0.0);
                    }
                }
                None => {
                    values.copy_from_slice(fallback);
                    fallback_rows += 1;
                }
            }
            let sum: f64 = values.iter().sum();
            let uniform = 1.0 / values.len() as f64;
            record.clear();
            record.push(row.image_id.to_string());
            for &m in &mapping {
                let v = if sum > 0.0 && sum.is_finite() {
                    values[m] / sum
                } else {
                    uniform
                };
                // Shortest text that reads back to the same f32: small probabilities keep their
                // digits (a fixed number of decimals would round them to 0).
                record.push(format!("{:e}", v as f32));
            }
            out.write_record(&record).map_err(to_io)?;
        }
        out.flush()
    })();
    result.map_err(|e| io(&tmp, e))?;
    out.into_inner()
        .map_err(|e| io(&tmp, std::io::Error::other(e.to_string())))?;
    plankton_core::fsx::commit(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(path, e.source)
    })?;
    Ok(SubmissionSummary {
        rows: rows.len(),
        fallback_rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn columns_follow_the_header_and_rows_are_normalised() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub.csv");
        let model = names(&["a", "b", "c"]);
        let header = names(&["c", "a", "b"]);
        let p = [0.2f32, 0.2, 0.6];
        let unnormalised = [1.0f32, 1.0, 2.0];
        let rows = [
            SubmissionRow {
                image_id: "1.jpg",
                probabilities: Some(&p),
            },
            SubmissionRow {
                image_id: "2.jpg",
                probabilities: Some(&unnormalised),
            },
            SubmissionRow {
                image_id: "3.jpg",
                probabilities: None,
            },
        ];
        let s = write_submission(
            &path,
            &model,
            &header,
            Path::new("h.csv"),
            &rows,
            &[0.5, 0.25, 0.25],
        )
        .unwrap();
        assert_eq!(
            s,
            SubmissionSummary {
                rows: 3,
                fallback_rows: 1
            }
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "image,c,a,b");
        let parse =
            |l: &str| -> Vec<f64> { l.split(',').skip(1).map(|v| v.parse().unwrap()).collect() };
        let r1 = parse(lines[1]);
        assert!((r1[0] - 0.6).abs() < 1e-7 && (r1[1] - 0.2).abs() < 1e-7);
        let r2 = parse(lines[2]);
        assert!((r2[0] - 0.5).abs() < 1e-7 && (r2.iter().sum::<f64>() - 1.0).abs() < 1e-6);
        assert_eq!(parse(lines[3]), vec![0.25, 0.5, 0.25]);
        assert!(lines[3].starts_with("3.jpg,"));
    }

    #[test]
    fn an_image_id_twice_is_refused_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub.csv");
        let model = names(&["a", "b"]);
        let p = [0.5f32, 0.5];
        let row = |id| SubmissionRow {
            image_id: id,
            probabilities: Some(&p),
        };
        let e = write_submission(
            &path,
            &model,
            &model,
            Path::new("h.csv"),
            &[row("1.jpg"), row("2.jpg"), row("1.jpg")],
            &[0.5, 0.5],
        )
        .unwrap_err();
        assert!(
            matches!(&e, SubmissionError::DuplicateImage { image, .. } if image == "1.jpg"),
            "{e}"
        );
        assert!(!path.exists());
    }

    #[test]
    fn mismatched_classes_name_the_header_file_and_class() {
        let model = names(&["a", "b"]);
        let err = column_mapping(
            &model,
            &names(&["a", "b", "zz"]),
            Path::new("sampleSubmission.csv"),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("sampleSubmission.csv") && msg.contains("zz"),
            "{msg}"
        );
        let err = column_mapping(&model, &names(&["a"]), Path::new("s.csv")).unwrap_err();
        assert!(err.to_string().contains("lacks: b"), "{err}");
    }

    #[test]
    fn ids_and_class_names_with_commas_and_quotes_are_quoted_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.csv");
        let model = names(&["plain", "with,comma"]);
        let p = [0.25f32, 0.75];
        let rows = [SubmissionRow {
            image_id: "a,b \"c\".jpg",
            probabilities: Some(&p),
        }];
        write_submission(&path, &model, &model, Path::new("x"), &rows, &[0.5, 0.5]).unwrap();
        // What a reader of the submission sees: the class header the dataset reader parses, and
        // the rows through an ordinary CSV reader.
        assert_eq!(
            crate::sources::dataset::read_submission_classes(&path).unwrap(),
            model
        );
        let mut r = csv::Reader::from_path(&path).unwrap();
        let rec = r.records().next().unwrap().unwrap();
        assert_eq!(&rec[0], "a,b \"c\".jpg");
        assert_eq!(rec.len(), 3);
        assert!((rec[2].parse::<f64>().unwrap() - 0.75).abs() < 1e-7);
    }

    #[test]
    fn tiny_probabilities_keep_their_digits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.csv");
        let model = names(&["a", "b"]);
        let p = [1.0f32 - 1e-12, 1.234e-12];
        write_submission(
            &path,
            &model,
            &model,
            Path::new("x"),
            &[SubmissionRow {
                image_id: "i",
                probabilities: Some(&p),
            }],
            &[0.5, 0.5],
        )
        .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let v: f64 = text
            .lines()
            .nth(1)
            .unwrap()
            .split(',')
            .nth(2)
            .unwrap()
            .parse()
            .unwrap();
        assert!((v / 1.234e-12 - 1.0).abs() < 1e-5, "{text}");
    }
}
