//! Small CSV files (labels, splits, per-class tables, sample submissions) through the csv
//! crate: a field with a comma, a quote or a line break is quoted, so it reads back whole.

/// A CSV file as bytes: the header, then one record per row.
pub fn csv_bytes<R, F>(header: &[&str], rows: R) -> Vec<u8>
where
    R: IntoIterator<Item = Vec<F>>,
    F: AsRef<[u8]>,
{
    let mut w = csv::Writer::from_writer(Vec::new());
    // Writing into memory cannot fail.
    w.write_record(header).expect("in memory");
    for row in rows {
        w.write_record(row).expect("in memory");
    }
    w.into_inner().expect("in memory")
}

/// Shortest round-trip form of a number; NaN as an empty field.
pub fn num(v: f64) -> String {
    if v.is_nan() {
        String::new()
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn awkward_fields_are_quoted_and_read_back_whole() {
        let bytes = csv_bytes(
            &["image", "class"],
            [
                vec!["a,b.jpg", "x"],
                vec!["say \"hi\".jpg", "y"],
                vec!["plain.jpg", "line\nbreak"],
            ],
        );
        let mut r = csv::Reader::from_reader(bytes.as_slice());
        let rows: Vec<Vec<String>> = r
            .records()
            .map(|rec| rec.unwrap().iter().map(String::from).collect())
            .collect();
        assert_eq!(
            rows,
            vec![
                vec!["a,b.jpg", "x"],
                vec!["say \"hi\".jpg", "y"],
                vec!["plain.jpg", "line\nbreak"],
            ]
        );
        assert_eq!(num(f64::NAN), "");
        assert_eq!(num(0.1), "0.1");
    }
}
