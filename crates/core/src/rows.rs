//! Matching rows of one file to rows of another (predictions to labels, to features, to other
//! members' predictions), written once.
//!
//! A row is found by its source path first. Files written on another machine or from another
//! copy of the dataset have other paths, so the image id (the file name) is the fallback, but
//! only where it is unambiguous: an id that two different rows share (the same file name in two
//! class folders) matches nothing by id.
use std::collections::HashMap;

#[derive(Debug, Clone)]
pub struct RowIndex<T> {
    by_path: HashMap<String, T>,
    /// `None`: the id was given two different values, so it cannot match alone.
    by_id: HashMap<String, Option<T>>,
}

impl<T> Default for RowIndex<T> {
    fn default() -> Self {
        RowIndex {
            by_path: HashMap::new(),
            by_id: HashMap::new(),
        }
    }
}

impl<T: Clone + PartialEq> RowIndex<T> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a row. The first value of a path is kept; an id given two different values becomes
    /// ambiguous (the same value twice, e.g. one class under two paths, stays usable).
    pub fn insert(&mut self, path: &str, id: &str, value: T) {
        self.by_path
            .entry(path.to_string())
            .or_insert_with(|| value.clone());
        self.by_id
            .entry(id.to_string())
            .and_modify(|v| {
                if v.as_ref() != Some(&value) {
                    *v = None;
                }
            })
            .or_insert(Some(value));
    }

    /// The value of the row with this path, else of the row with this id if that is unique.
    pub fn get(&self, path: &str, id: &str) -> Option<&T> {
        self.by_path
            .get(path)
            .or_else(|| self.by_id.get(id).and_then(Option::as_ref))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_first_then_a_unique_id() {
        let mut ix = RowIndex::new();
        ix.insert("/data/train/a/x.jpg", "x.jpg", 0);
        ix.insert("/data/train/b/y.jpg", "y.jpg", 1);
        assert_eq!(ix.get("/data/train/a/x.jpg", "other.jpg"), Some(&0));
        // Another machine's copy: other paths, same file names.
        assert_eq!(ix.get("/mnt/copy/a/x.jpg", "x.jpg"), Some(&0));
        assert_eq!(ix.get("/mnt/copy/b/y.jpg", "y.jpg"), Some(&1));
        assert_eq!(ix.get("/mnt/copy/c/z.jpg", "z.jpg"), None);
    }

    #[test]
    fn an_id_with_two_values_matches_only_by_path() {
        let mut ix = RowIndex::new();
        ix.insert("/d/a/1.jpg", "1.jpg", "a");
        ix.insert("/d/b/1.jpg", "1.jpg", "b");
        assert_eq!(ix.get("/elsewhere/1.jpg", "1.jpg"), None);
        assert_eq!(ix.get("/d/b/1.jpg", "1.jpg"), Some(&"b"));
        // The same value twice (one class, two copies of a file) stays usable by id.
        ix.insert("/d/a/2.jpg", "2.jpg", "a");
        ix.insert("/d/a/copy/2.jpg", "2.jpg", "a");
        assert_eq!(ix.get("/elsewhere/2.jpg", "2.jpg"), Some(&"a"));
    }

    #[test]
    fn the_first_value_of_a_path_is_kept() {
        let mut ix = RowIndex::new();
        ix.insert("/d/x.jpg", "x.jpg", 3);
        ix.insert("/d/x.jpg", "x.jpg", 4);
        assert_eq!(ix.get("/d/x.jpg", "x.jpg"), Some(&3));
        // ...and the id, given 3 and then 4, no longer matches alone.
        assert_eq!(ix.get("/other/x.jpg", "x.jpg"), None);
    }
}
