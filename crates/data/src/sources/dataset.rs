//! The competition layout: `train/<class>/<file>`, `test/<file>`, optional `sampleSubmission.csv`
//! (its header fixes the class order) and optional `test_labels.csv` (`image,class`, written by
//! our synthetic and real-data sources so test predictions can be scored).
//!
//! Layout problems (a file directly in `train/`, a class folder the submission header does not
//! know, a nested folder) do not abort the listing: each is reported with its path and reason
//! and the rest of the dataset is used.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One image to process: its id (the file name, as Kaggle's `image` column uses it), where it
/// is, and its class index when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    pub id: String,
    pub path: PathBuf,
    pub label: Option<u32>,
}

/// Something in the folder that does not fit the layout and was left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutProblem {
    pub path: PathBuf,
    pub reason: String,
}

impl std::fmt::Display for LayoutProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{path}: not a dataset folder in the competition layout: {reason}")]
    NotADataset { path: PathBuf, reason: String },
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: bad CSV: {reason}")]
    BadCsv { path: PathBuf, reason: String },
}

#[derive(Debug, Clone)]
pub struct Dataset {
    pub root: PathBuf,
    pub class_names: Vec<String>,
    /// Labelled images, sorted by (class, file name).
    pub train: Vec<ImageRecord>,
    /// Unlabelled images (labels attached from `test_labels.csv` when present), sorted by name.
    pub test: Vec<ImageRecord>,
    pub problems: Vec<LayoutProblem>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DatasetError + '_ {
    move |source| DatasetError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Sorted directory entries, skipping hidden files (e.g. `.DS_Store`, our own temp files).
fn list_dir(dir: &Path) -> Result<Vec<(String, PathBuf, bool)>, DatasetError> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        let is_dir = std::fs::metadata(&path).map_err(io_err(&path))?.is_dir();
        entries.push((name, path, is_dir));
    }
    entries.sort();
    Ok(entries)
}

/// Reads the class order from a `sampleSubmission.csv` header: `image,<class 1>,...`.
pub fn read_submission_classes(path: &Path) -> Result<Vec<String>, DatasetError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_path(path)
        .map_err(|e| match e.into_kind() {
            csv::ErrorKind::Io(e) => io_err(path)(e),
            other => DatasetError::BadCsv {
                path: path.to_path_buf(),
                reason: format!("{other:?}"),
            },
        })?;
    // Only the header: class names may be quoted (and hold commas).
    let mut first = csv::StringRecord::new();
    let read = reader.read_record(&mut first);
    let header: Vec<String> = match read {
        Ok(true) => first
            .iter()
            .map(|c| c.trim_start_matches('\u{feff}').to_string())
            .collect(),
        Ok(false) => Vec::new(),
        Err(e) => {
            return Err(DatasetError::BadCsv {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
        }
    };
    let mut cols = header.iter().map(String::as_str);
    let bad = |reason: &str| DatasetError::BadCsv {
        path: path.to_path_buf(),
        reason: reason.into(),
    };
    if cols.next() != Some("image") {
        return Err(bad("header must start with `image`"));
    }
    let classes: Vec<String> = cols.map(|c| c.trim().to_string()).collect();
    if classes.is_empty() || classes.iter().any(|c| c.is_empty()) {
        return Err(bad("header must list class names after `image`"));
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = classes.iter().find(|c| !seen.insert(c.as_str())) {
        return Err(bad(&format!("class `{dup}` appears twice in the header")));
    }
    Ok(classes)
}

/// Reads a two-column CSV whose header is one of `headers` (e.g. `image,class`), rows trimmed,
/// blank rows skipped; fields may be quoted (names with commas and quotes read back whole).
pub fn read_pairs_csv(
    path: &Path,
    headers: &[[&str; 2]],
) -> Result<Vec<(String, String)>, DatasetError> {
    let bad = |reason: String| DatasetError::BadCsv {
        path: path.to_path_buf(),
        reason,
    };
    let shown = |h: &[&str; 2]| format!("`{}`", h.join(","));
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(path)
        .map_err(|e| match e.into_kind() {
            csv::ErrorKind::Io(e) => io_err(path)(e),
            other => bad(format!("{other:?}")),
        })?;
    let found: Vec<String> = reader
        .headers()
        .map_err(|e| bad(e.to_string()))?
        .iter()
        .map(|h| h.trim_start_matches('\u{feff}').trim().to_string())
        .collect();
    if !headers.iter().any(|h| found == *h) {
        let alternatives: Vec<String> = headers[1..].iter().map(shown).collect();
        let or = if alternatives.is_empty() {
            String::new()
        } else {
            format!(" (or {})", alternatives.join(", "))
        };
        return Err(bad(format!(
            "expected header {}{or}, found {:?}",
            shown(&headers[0]),
            found.join(",")
        )));
    }
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| bad(e.to_string()))?;
        let line = record.position().map_or(0, |p| p.line());
        if record.iter().all(|f| f.trim().is_empty()) {
            continue;
        }
        if record.len() != 2 {
            return Err(bad(format!("line {line}: expected {}", shown(&headers[0]))));
        }
        rows.push((record[0].trim().to_string(), record[1].trim().to_string()));
    }
    Ok(rows)
}

/// Reads `image,class` rows (`pid,class` too: IFCB ROI pids).
pub fn read_labels_csv(path: &Path) -> Result<Vec<(String, String)>, DatasetError> {
    read_pairs_csv(path, &[["image", "class"], ["pid", "class"]])
}

/// Labels by image id from `(id, class, file it came from)` rows. An id given two classes keeps
/// neither (which one is right is not ours to guess; the last one used to win silently) and is a
/// problem naming its classes; a repeated identical row is fine.
fn merge_labels(
    rows: impl IntoIterator<Item = (String, String, PathBuf)>,
    problems: &mut Vec<LayoutProblem>,
) -> HashMap<String, (String, PathBuf)> {
    let mut labels: HashMap<String, (String, PathBuf)> = HashMap::new();
    let mut conflicting = std::collections::BTreeMap::<String, (Vec<String>, PathBuf)>::new();
    for (id, class, from) in rows {
        match labels.get(&id) {
            Some((first, first_from)) if *first != class => {
                let (seen, _) = conflicting
                    .entry(id.clone())
                    .or_insert_with(|| (vec![first.clone()], first_from.clone()));
                if !seen.contains(&class) {
                    seen.push(class);
                }
            }
            _ => {
                labels.insert(id, (class, from));
            }
        }
    }
    for (id, (classes, from)) in conflicting {
        labels.remove(&id);
        problems.push(LayoutProblem {
            path: from,
            reason: format!(
                "{id} is listed with {} classes ({}): left unlabelled",
                classes.len(),
                classes.join(", ")
            ),
        });
    }
    labels
}

/// True when `dir` is a dataset: the competition layout or a folder of IFCB bins.
pub fn is_dataset(dir: &Path) -> bool {
    dir.join("train").is_dir() || dir.join("test").is_dir() || crate::sources::ifcb::has_bins(dir)
}

impl Dataset {
    /// Lists a dataset folder: the competition layout, or IFCB bins (see [`Dataset::open_bins`]).
    /// Fails only when the folder is not a dataset at all.
    pub fn open(root: &Path) -> Result<Dataset, DatasetError> {
        let not = |reason: &str| DatasetError::NotADataset {
            path: root.to_path_buf(),
            reason: reason.into(),
        };
        if !root.is_dir() {
            return Err(not("no such folder"));
        }
        let (train_dir, test_dir) = (root.join("train"), root.join("test"));
        if !train_dir.is_dir() && !test_dir.is_dir() {
            if crate::sources::ifcb::has_bins(root) {
                return Dataset::open_bins(root);
            }
            return Err(not(
                "expected a `train/<class>/` and/or a `test/` folder, or IFCB bins",
            ));
        }
        let mut problems = Vec::new();
        let submission = root.join("sampleSubmission.csv");
        let class_folders = if train_dir.is_dir() {
            list_dir(&train_dir)?
        } else {
            Vec::new()
        };
        let mut class_names: Vec<String> = if submission.is_file() {
            read_submission_classes(&submission)?
        } else {
            class_folders
                .iter()
                .filter(|(_, _, d)| *d)
                .map(|(n, _, _)| n.clone())
                .collect()
        };
        let labels_path = root.join("test_labels.csv");
        if class_names.is_empty() && test_dir.is_dir() {
            // A folder of test images only (what a trained run predicts; its classes are the
            // run's): the classes its labels name, if any, sorted.
            if labels_path.is_file() {
                let named: std::collections::BTreeSet<String> = read_labels_csv(&labels_path)?
                    .into_iter()
                    .map(|(_, c)| c)
                    .collect();
                class_names = named.into_iter().collect();
            }
        } else if class_names.is_empty() {
            return Err(not(
                "no classes: `train/` has no class folders and there is no sampleSubmission.csv",
            ));
        }
        let index: HashMap<&str, u32> = class_names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i as u32))
            .collect();

        let mut train = Vec::new();
        for (name, path, is_dir) in class_folders {
            if !is_dir {
                problems.push(LayoutProblem {
                    path,
                    reason: "file directly in train/ (expected train/<class>/<file>)".into(),
                });
                continue;
            }
            let Some(&label) = index.get(name.as_str()) else {
                let n = list_dir(&path)?.len();
                problems.push(LayoutProblem {
                    path,
                    reason: format!("unknown class folder `{name}` (not in sampleSubmission.csv); its {n} entries are skipped"),
                });
                continue;
            };
            for (file, fpath, is_dir) in list_dir(&path)? {
                if is_dir {
                    problems.push(LayoutProblem {
                        path: fpath,
                        reason: "nested folder inside a class folder".into(),
                    });
                } else {
                    train.push(ImageRecord {
                        id: file,
                        path: fpath,
                        label: Some(label),
                    });
                }
            }
        }

        let mut test = Vec::new();
        if test_dir.is_dir() {
            for (file, path, is_dir) in list_dir(&test_dir)? {
                if is_dir {
                    problems.push(LayoutProblem {
                        path,
                        reason: "folder inside test/ (expected test/<file>)".into(),
                    });
                } else {
                    test.push(ImageRecord {
                        id: file,
                        path,
                        label: None,
                    });
                }
            }
        }
        if labels_path.is_file() {
            let rows = read_labels_csv(&labels_path)?
                .into_iter()
                .map(|(image, class)| (image, class, labels_path.clone()));
            let labels = merge_labels(rows, &mut problems);
            for rec in &mut test {
                match labels.get(&rec.id).map(|(c, _)| (c, index.get(c.as_str()))) {
                    Some((_, Some(&l))) => rec.label = Some(l),
                    Some((c, None)) => problems.push(LayoutProblem {
                        path: labels_path.clone(),
                        reason: format!("label `{c}` of {} is not a known class", rec.id),
                    }),
                    None => {}
                }
            }
        }
        Ok(Dataset {
            root: root.to_path_buf(),
            class_names,
            train,
            test,
            problems,
        })
    }

    /// A folder of IFCB bins (nested by date as labs store them): every ROI is an image, its id
    /// the ROI pid. Labels come from `labels.csv` (`pid,class`) and from EcoTaxa tables
    /// (`ecotaxa*.tsv`: validated objects only, `object_id` = ROI pid) at the folder's top;
    /// labelled ROIs are the training images, the rest test images. The class order is
    /// `sampleSubmission.csv`'s when present, else the labels' names sorted. A bin that cannot
    /// be read whole is a problem with its reason, and none of its ROIs is used.
    pub fn open_bins(root: &Path) -> Result<Dataset, DatasetError> {
        let listing =
            crate::sources::ifcb::list_rois(root).map_err(|e| DatasetError::NotADataset {
                path: root.to_path_buf(),
                reason: e.to_string(),
            })?;
        let mut problems: Vec<LayoutProblem> = listing
            .refused
            .into_iter()
            .map(|(path, reason)| LayoutProblem {
                path,
                reason: format!("IFCB bin refused: {reason}"),
            })
            .collect();
        // Label and class files at the top are ours to read, not strays.
        let label_files: Vec<PathBuf> = listing
            .other
            .iter()
            .filter(|p| p.parent() == Some(root))
            .filter(|p| {
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default();
                name == "labels.csv" || (name.starts_with("ecotaxa") && name.ends_with(".tsv"))
            })
            .cloned()
            .collect();
        for path in &listing.other {
            let known = label_files.contains(path) || *path == root.join("sampleSubmission.csv");
            if !known {
                problems.push(LayoutProblem {
                    path: path.clone(),
                    reason: "not part of an IFCB bin".into(),
                });
            }
        }
        let mut labels: Vec<(String, String, PathBuf)> = Vec::new();
        for path in &label_files {
            if path.extension().is_some_and(|x| x == "csv") {
                labels.extend(
                    read_labels_csv(path)?
                        .into_iter()
                        .map(|(id, c)| (id, c, path.clone())),
                );
            } else {
                use crate::sources::ecotaxa::{read_table, EcotaxaError};
                let objects = read_table(path).map_err(|e| match e {
                    EcotaxaError::Table { path, reason } => DatasetError::BadCsv { path, reason },
                    EcotaxaError::Io { path, source } => DatasetError::Io { path, source },
                })?;
                labels.extend(objects.iter().filter_map(|o| {
                    o.validated_category()
                        .map(|c| (o.object_id.clone(), c.to_string(), path.clone()))
                }));
            }
        }
        let submission = root.join("sampleSubmission.csv");
        let class_names = if submission.is_file() {
            read_submission_classes(&submission)?
        } else {
            let set: std::collections::BTreeSet<&str> =
                labels.iter().map(|(_, c, _)| c.as_str()).collect();
            set.into_iter().map(String::from).collect()
        };
        let index: HashMap<&str, u32> = class_names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i as u32))
            .collect();
        let by_id = merge_labels(labels, &mut problems);
        let (mut train, mut test) = (Vec::new(), Vec::new());
        let mut used = std::collections::HashSet::new();
        for (id, path) in listing.rois {
            let label = match by_id.get(id.as_str()) {
                Some((class, from)) => match index.get(class.as_str()) {
                    Some(&l) => Some(l),
                    None => {
                        problems.push(LayoutProblem {
                            path: from.to_path_buf(),
                            reason: format!("label `{class}` of {id} is not a known class"),
                        });
                        None
                    }
                },
                None => None,
            };
            used.insert(id.clone());
            let rec = ImageRecord { id, path, label };
            if label.is_some() {
                train.push(rec);
            } else {
                test.push(rec);
            }
        }
        let missing: Vec<&str> = by_id
            .keys()
            .map(String::as_str)
            .filter(|id| !used.contains(*id))
            .collect();
        if !missing.is_empty() {
            let mut missing = missing;
            missing.sort();
            problems.push(LayoutProblem {
                path: by_id[missing[0]].1.to_path_buf(),
                reason: format!(
                    "{} labelled ids are not ROIs of these bins (first: {})",
                    missing.len(),
                    missing[0]
                ),
            });
        }
        // The competition layout's order: by class, then id.
        train.sort_by(|a, b| (a.label, &a.id).cmp(&(b.label, &b.id)));
        Ok(Dataset {
            root: root.to_path_buf(),
            class_names,
            train,
            test,
            problems,
        })
    }

    /// Per-class counts of the labelled images.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.class_names.len()];
        for r in &self.train {
            if let Some(l) = r.label {
                counts[l as usize] += 1;
            }
        }
        counts
    }
}

#[cfg(test)]
mod csv_tests {
    use super::*;

    #[test]
    fn labels_with_commas_and_quotes_in_image_names_are_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("test_labels.csv");
        std::fs::write(&path, "image,class\n\"a,b.jpg\",copepod\n\"say \"\"hi\"\".png\",\"odd,class\"\n\nplain.jpg,copepod\n").unwrap();
        let rows = read_labels_csv(&path).unwrap();
        assert_eq!(
            rows,
            vec![
                ("a,b.jpg".to_string(), "copepod".to_string()),
                ("say \"hi\".png".to_string(), "odd,class".to_string()),
                ("plain.jpg".to_string(), "copepod".to_string()),
            ]
        );
        std::fs::write(&path, "image,class\nx.jpg,a,b\n").unwrap();
        let err = read_labels_csv(&path).unwrap_err().to_string();
        assert!(
            err.contains("test_labels.csv") && err.contains("expected `image,class`"),
            "{err}"
        );
        std::fs::write(&path, "img,label\n").unwrap();
        assert!(read_labels_csv(&path)
            .unwrap_err()
            .to_string()
            .contains("expected header"));
    }

    #[test]
    fn an_image_labelled_twice_with_different_classes_is_left_unlabelled_and_named() {
        let dir = tempfile::tempdir().unwrap();
        for class in ["a", "b"] {
            std::fs::create_dir_all(dir.path().join("train").join(class)).unwrap();
            std::fs::write(dir.path().join("train").join(class).join("t.jpg"), b"x").unwrap();
        }
        std::fs::create_dir_all(dir.path().join("test")).unwrap();
        for image in ["x.jpg", "y.jpg"] {
            std::fs::write(dir.path().join("test").join(image), b"x").unwrap();
        }
        std::fs::write(
            dir.path().join("test_labels.csv"),
            "image,class\nx.jpg,a\ny.jpg,b\nx.jpg,b\ny.jpg,b\n",
        )
        .unwrap();
        let ds = Dataset::open(dir.path()).unwrap();
        let label = |id: &str| ds.test.iter().find(|r| r.id == id).unwrap().label;
        assert_eq!(label("x.jpg"), None);
        assert_eq!(label("y.jpg"), Some(1), "a repeated identical row is fine");
        assert_eq!(ds.problems.len(), 1, "{:?}", ds.problems);
        assert!(
            ds.problems[0]
                .reason
                .contains("x.jpg is listed with 2 classes (a, b)"),
            "{:?}",
            ds.problems
        );
    }

    /// A folder of test images only (what a trained run predicts) is a dataset: its classes
    /// are those its labels name, or none.
    #[test]
    fn a_test_only_folder_is_a_dataset_with_the_classes_its_labels_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("test")).unwrap();
        for image in ["x.jpg", "y.jpg"] {
            std::fs::write(dir.path().join("test").join(image), b"x").unwrap();
        }
        let ds = Dataset::open(dir.path()).unwrap();
        assert!(ds.class_names.is_empty() && ds.train.is_empty());
        assert_eq!(ds.test.len(), 2);
        std::fs::write(
            dir.path().join("test_labels.csv"),
            "image,class\nx.jpg,diatom\ny.jpg,copepod\n",
        )
        .unwrap();
        let ds = Dataset::open(dir.path()).unwrap();
        assert_eq!(ds.class_names, vec!["copepod", "diatom"]);
        assert_eq!(ds.test[0].label, Some(1));
    }

    /// A lab's folder of bins: labels from a CSV and from an EcoTaxa export, the rest test
    /// images; a refused bin and a stray file are named, a doubly labelled ROI left unlabelled.
    #[test]
    fn a_folder_of_ifcb_bins_is_a_dataset_labelled_from_csv_and_ecotaxa() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/ifcb");
        let dir = tempfile::tempdir().unwrap();
        let mut all = Vec::new();
        for hdr in crate::sources::ifcb::find_bins(&fixtures).unwrap() {
            let rel = hdr.parent().unwrap().strip_prefix(&fixtures).unwrap();
            let to = dir.path().join("data").join(rel);
            std::fs::create_dir_all(&to).unwrap();
            for e in ["hdr", "adc", "roi"] {
                let f = hdr.with_extension(e);
                std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
            }
            let bin = crate::sources::ifcb::Bin::open(&hdr).unwrap();
            all.extend(bin.rois.iter().map(|r| bin.roi_id(r)));
        }
        let root = dir.path().join("data");
        assert!(is_dataset(&root));
        let ds = Dataset::open(&root).unwrap();
        assert!(ds.class_names.is_empty() && ds.train.is_empty());
        assert_eq!(ds.test.len(), all.len());

        std::fs::write(
            root.join("labels.csv"),
            format!(
                "pid,class\n{},copepod\n{},diatom\n{},copepod\n",
                all[0], all[1], all[2]
            ),
        )
        .unwrap();
        std::fs::write(
            root.join("ecotaxa_validated.tsv"),
            format!(
                "object_id\tobject_annotation_status\tobject_annotation_category\n\
                 {}\tvalidated\tdiatom\n{}\tpredicted\tcopepod\n{}\tvalidated\tcopepod\n",
                all[3], all[4], all[1]
            ),
        )
        .unwrap();
        std::fs::write(root.join("cruise.txt"), b"notes").unwrap();
        let ds = Dataset::open(&root).unwrap();
        assert_eq!(ds.class_names, vec!["copepod", "diatom"]);
        let labelled: Vec<(&str, u32)> = ds
            .train
            .iter()
            .map(|r| (r.id.as_str(), r.label.unwrap()))
            .collect();
        assert_eq!(
            labelled,
            vec![
                (all[0].as_str(), 0),
                (all[2].as_str(), 0),
                (all[3].as_str(), 1)
            ],
            "all[1] has two classes, all[4] is only predicted"
        );
        assert_eq!(ds.test.len(), all.len() - 3);
        let reasons: Vec<String> = ds.problems.iter().map(|p| p.to_string()).collect();
        assert!(
            reasons.iter().any(|r| r.contains(&format!(
                "{} is listed with 2 classes (copepod, diatom)",
                all[1]
            ))),
            "{reasons:?}"
        );
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("cruise.txt: not part of an IFCB bin")),
            "{reasons:?}"
        );
        // Every ROI path decodes through its bin.
        for r in ds.train.iter().chain(&ds.test) {
            plankton_core::decode::decode_file(&r.path, &Default::default()).unwrap();
        }
        // A bin cut short is refused whole: none of its ROIs is listed.
        let old = crate::sources::ifcb::find_bins(&root).unwrap()[0].with_extension("roi");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&old)
            .unwrap()
            .set_len(100)
            .unwrap();
        let ds2 = Dataset::open(&root).unwrap();
        assert!(ds2.train.len() + ds2.test.len() < all.len());
        assert!(
            ds2.problems
                .iter()
                .any(|p| p.reason.starts_with("IFCB bin refused")
                    && p.reason.contains("past the end"))
        );
    }
}
