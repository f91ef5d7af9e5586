//! Stratified train/validation splits (fixed once, stored as a file) and bagging splits.
//!
//! A split file is CSV `path,class,subset` with `path` relative to the dataset root
//! (`train/<class>/<file>`), so it stays valid when the dataset folder moves and never depends
//! on listing order.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::sources::Dataset;
use plankton_core::rng::{Purpose, Stream};

#[derive(Debug, thiserror::Error)]
pub enum SplitError {
    #[error("{path}: cannot read/write split file: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid split file: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("valid fraction must be in [0, 1), got {0}")]
    BadFraction(f64),
    #[error("cross-validation needs at least 2 folds, got {0}")]
    BadFolds(usize),
    #[error("{folds} folds, but class `{class}` has only {images} image(s): every fold must validate every class, so use at most {images} folds")]
    TooManyFolds {
        folds: usize,
        class: String,
        images: usize,
    },
}

/// One row of a split file (`path,class,subset`, CSV-quoted as needed).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct SplitRow {
    pub path: String,
    pub class: String,
    pub subset: String,
}

/// The rows of a split file with their line numbers, header checked.
pub fn read_rows(path: &Path) -> Result<Vec<(usize, SplitRow)>, SplitError> {
    let invalid = |reason: String| SplitError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let mut r = csv::ReaderBuilder::new()
        .from_path(path)
        .map_err(|e| match e.into_kind() {
            csv::ErrorKind::Io(source) => SplitError::Io {
                path: path.to_path_buf(),
                source,
            },
            other => invalid(format!("{other:?}")),
        })?;
    let header = r.headers().map_err(|e| invalid(e.to_string()))?.clone();
    if header
        .iter()
        .map(|h| h.trim_start_matches('\u{feff}').trim())
        .collect::<Vec<_>>()
        != ["path", "class", "subset"]
    {
        return Err(invalid("expected header `path,class,subset`".into()));
    }
    let mut rows = Vec::new();
    for record in r.records() {
        let record = record.map_err(|e| invalid(e.to_string()))?;
        let line = record.position().map_or(0, |p| p.line() as usize);
        if record.iter().all(|f| f.trim().is_empty()) {
            continue;
        }
        if record.len() != 3 {
            return Err(invalid(format!("line {line}: expected 3 columns")));
        }
        let row: SplitRow = record
            .deserialize(Some(&header))
            .map_err(|e| invalid(format!("line {line}: {e}")))?;
        rows.push((line, row));
    }
    Ok(rows)
}

/// Indices into `Dataset::train`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    pub train: Vec<usize>,
    pub valid: Vec<usize>,
}

/// Holds out `valid_fraction` of every class (rounded; at least one image of any class with two
/// or more, so every class is validated). `key` selects independent splits from one seed
/// (0 = the main split, 1.. = bagging splits).
pub fn stratified(
    labels: &[u32],
    valid_fraction: f64,
    seed: u64,
    key: u64,
) -> Result<Split, SplitError> {
    if !(0.0..1.0).contains(&valid_fraction) {
        return Err(SplitError::BadFraction(valid_fraction));
    }
    let classes = indices_by_class(labels);
    let (mut train, mut valid) = (Vec::new(), Vec::new());
    for (class, mut idx) in classes {
        Stream::new(seed, Purpose::Split, key, class as u64).shuffle(&mut idx);
        let n = idx.len();
        let mut k = (valid_fraction * n as f64).round() as usize;
        if valid_fraction > 0.0 && n >= 2 {
            k = k.clamp(1, n - 1);
        } else {
            k = k.min(n.saturating_sub(1));
        }
        valid.extend_from_slice(&idx[..k]);
        train.extend_from_slice(&idx[k..]);
    }
    train.sort_unstable();
    valid.sort_unstable();
    Ok(Split { train, valid })
}

/// Record indices per class, classes in label order.
fn indices_by_class(labels: &[u32]) -> Vec<(u32, Vec<usize>)> {
    let mut by_class: HashMap<u32, Vec<usize>> = HashMap::new();
    for (i, &l) in labels.iter().enumerate() {
        by_class.entry(l).or_default().push(i);
    }
    let mut classes: Vec<_> = by_class.into_iter().collect();
    classes.sort();
    classes
}

/// For cross-validation folds that are trained on (`plankton split --folds`): every fold must
/// validate every class, so no class may have fewer images than there are folds. (The blend and
/// fusion jobs cut validation predictions into folds too, where a rare class legitimately
/// misses some folds; they do not ask for this.)
pub fn check_folds(labels: &[u32], class_names: &[String], folds: usize) -> Result<(), SplitError> {
    if folds < 2 {
        return Err(SplitError::BadFolds(folds));
    }
    let smallest = indices_by_class(labels)
        .into_iter()
        .map(|(c, idx)| (idx.len(), c))
        .min();
    match smallest {
        Some((images, class)) if images < folds => Err(SplitError::TooManyFolds {
            folds,
            class: class_names
                .get(class as usize)
                .cloned()
                .unwrap_or_else(|| class.to_string()),
            images,
        }),
        _ => Ok(()),
    }
}

/// `folds` stratified folds for cross-validation: each class's images are shuffled and dealt
/// round-robin to the folds; split k validates on fold k and trains on the others.
pub fn stratified_folds(labels: &[u32], folds: usize, seed: u64) -> Result<Vec<Split>, SplitError> {
    if folds < 2 {
        return Err(SplitError::BadFolds(folds));
    }
    let classes = indices_by_class(labels);
    let mut fold_of = vec![0usize; labels.len()];
    // A running offset spreads the classes' remainders over the folds.
    let mut offset = 0;
    for (class, mut idx) in classes {
        Stream::new(seed, Purpose::Split, u64::MAX, class as u64).shuffle(&mut idx);
        for (j, &i) in idx.iter().enumerate() {
            fold_of[i] = (offset + j) % folds;
        }
        offset += idx.len();
    }
    Ok((0..folds)
        .map(|k| Split {
            train: (0..labels.len()).filter(|&i| fold_of[i] != k).collect(),
            valid: (0..labels.len()).filter(|&i| fold_of[i] == k).collect(),
        })
        .collect())
}

/// The main split (key 0) and `bagging` more (keys 1..=bagging).
pub fn stratified_with_bagging(
    labels: &[u32],
    valid_fraction: f64,
    seed: u64,
    bagging: usize,
) -> Result<Vec<Split>, SplitError> {
    (0..=bagging as u64)
        .map(|k| stratified(labels, valid_fraction, seed, k))
        .collect()
}

/// Computes the main split and `bagging` bagging splits of `ds` and writes them: the main one
/// to `out`, bagging split k beside it as `<stem>-bag<k>.csv`.
pub fn write_split_files(
    ds: &Dataset,
    out: &Path,
    valid_fraction: f64,
    seed: u64,
    bagging: usize,
) -> Result<Vec<(PathBuf, Split)>, SplitError> {
    // Dataset::open labels every train record.
    let labels: Vec<u32> = ds
        .train
        .iter()
        .map(|r| r.label.unwrap_or(u32::MAX))
        .collect();
    let splits = stratified_with_bagging(&labels, valid_fraction, seed, bagging)?;
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "split".into());
    let mut written = Vec::with_capacity(splits.len());
    for (k, split) in splits.into_iter().enumerate() {
        let path = if k == 0 {
            out.to_path_buf()
        } else {
            out.with_file_name(format!("{stem}-bag{k}.csv"))
        };
        split.save(ds, &path)?;
        written.push((path, split));
    }
    Ok(written)
}

fn relative(ds: &Dataset, i: usize) -> String {
    let p = &ds.train[i].path;
    p.strip_prefix(&ds.root)
        .unwrap_or(p)
        .to_string_lossy()
        .replace('\\', "/")
}

impl Split {
    pub fn save(&self, ds: &Dataset, path: &Path) -> Result<(), SplitError> {
        let mut rows: Vec<(usize, &str)> = self.train.iter().map(|&i| (i, "train")).collect();
        rows.extend(self.valid.iter().map(|&i| (i, "valid")));
        rows.sort();
        // Through the csv crate: a file name may hold commas and quotes.
        let mut w = csv::Writer::from_writer(Vec::new());
        let bad = |e: csv::Error| SplitError::Invalid {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        w.write_record(["path", "class", "subset"]).map_err(bad)?;
        for (i, subset) in rows {
            let class = ds.train[i]
                .label
                .map(|l| ds.class_names[l as usize].as_str())
                .unwrap_or("");
            w.write_record([relative(ds, i).as_str(), class, subset])
                .map_err(bad)?;
        }
        let text = w.into_inner().map_err(|e| SplitError::Invalid {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let io = |source| SplitError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        plankton_core::fsx::write_atomic(path, text.as_ref()).map_err(|e| io(e.source))
    }

    /// Loads a split for `ds`; every listed path must exist in the dataset.
    pub fn load(ds: &Dataset, path: &Path) -> Result<Split, SplitError> {
        let invalid = |reason: String| SplitError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let rows = read_rows(path)?;
        let index: HashMap<String, usize> =
            (0..ds.train.len()).map(|i| (relative(ds, i), i)).collect();
        let mut split = Split {
            train: Vec::new(),
            valid: Vec::new(),
        };
        let mut first_line: HashMap<usize, usize> = HashMap::new();
        for (line, row) in rows {
            let &i = index.get(&row.path).ok_or_else(|| {
                invalid(format!("line {line}: `{}` is not in the dataset", row.path))
            })?;
            // Listed twice, an image could be trained on and validated on at once.
            if let Some(first) = first_line.insert(i, line) {
                return Err(invalid(format!(
                    "line {line}: `{}` is listed again (first on line {first})",
                    row.path
                )));
            }
            let folder = ds.train[i]
                .label
                .map_or("", |l| ds.class_names[l as usize].as_str());
            if row.class != folder {
                return Err(invalid(format!(
                    "line {line}: `{}` says class `{}` but the image is in the class folder `{folder}`",
                    row.path, row.class
                )));
            }
            match row.subset.as_str() {
                "train" => split.train.push(i),
                "valid" => split.valid.push(i),
                s => {
                    return Err(invalid(format!(
                        "line {line}: subset `{s}` is not train/valid"
                    )))
                }
            }
        }
        split.train.sort_unstable();
        split.valid.sort_unstable();
        Ok(split)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_partition_every_class_evenly() {
        let labels: Vec<u32> = (0..103u32).map(|i| i % 3 + (i / 60)).collect();
        let folds = stratified_folds(&labels, 5, 7).unwrap();
        let mut seen = vec![0; labels.len()];
        for f in &folds {
            for &i in &f.valid {
                seen[i] += 1;
            }
            assert_eq!(f.train.len() + f.valid.len(), labels.len());
            for class in 0..4u32 {
                let n = labels.iter().filter(|&&l| l == class).count();
                let v = f.valid.iter().filter(|&&i| labels[i] == class).count();
                assert!(v == n / 5 || v == n / 5 + 1, "class {class}: {v} of {n}");
            }
        }
        assert!(
            seen.iter().all(|&s| s == 1),
            "every image validated exactly once"
        );
        assert!(stratified_folds(&labels, 1, 7).is_err());
    }

    #[test]
    fn more_folds_than_the_smallest_class_has_images_are_refused_naming_it() {
        let labels = [0u32, 0, 0, 1, 1, 2, 2, 2, 2];
        let names: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        assert!(check_folds(&labels, &names, 2).is_ok());
        let err = check_folds(&labels, &names, 3).unwrap_err().to_string();
        assert!(
            err.contains("class `b`")
                && err.contains("only 2 image(s)")
                && err.contains("at most 2 folds"),
            "{err}"
        );
        assert!(matches!(
            check_folds(&labels, &names, 1),
            Err(SplitError::BadFolds(1))
        ));
    }

    fn labels() -> Vec<u32> {
        (0..300u32)
            .map(|i| {
                if i < 200 {
                    0
                } else if i < 290 {
                    1
                } else {
                    2
                }
            })
            .collect()
    }

    #[test]
    fn every_class_is_split_in_proportion() {
        let l = labels();
        let s = stratified(&l, 0.1, 7, 0).unwrap();
        let count = |v: &[usize], c| v.iter().filter(|&&i| l[i] == c).count();
        assert_eq!(
            (count(&s.valid, 0), count(&s.valid, 1), count(&s.valid, 2)),
            (20, 9, 1)
        );
        assert_eq!(s.train.len() + s.valid.len(), 300);
        let mut all: Vec<usize> = s.train.iter().chain(&s.valid).copied().collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 300, "disjoint and complete");
    }

    #[test]
    fn seeded_and_distinct_per_key() {
        let l = labels();
        assert_eq!(
            stratified(&l, 0.1, 7, 0).unwrap(),
            stratified(&l, 0.1, 7, 0).unwrap()
        );
        let bags = stratified_with_bagging(&l, 0.1, 7, 3).unwrap();
        assert_eq!(bags.len(), 4);
        assert_ne!(bags[0].valid, bags[1].valid);
        assert_ne!(bags[1].valid, bags[2].valid);
    }

    #[test]
    fn rejects_bad_fraction() {
        assert!(stratified(&[0, 1], 1.0, 0, 0).is_err());
    }
}
