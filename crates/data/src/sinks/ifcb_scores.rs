//! Per-bin class scores in the form IFCB tools read: `<bin>_class.h5`, the "v3" file that WHOI's
//! ifcb_classifier writes and the IFCB dashboard (ifcbdb, through pyifcb's
//! `ClassScoresDirectory`) serves and converts:
//!
//! | dataset | type | shape |
//! |---|---|---|
//! | `output_scores` | float32 (the classifier: float16) | ROIs x classes |
//! | `output_classes` | float32, 0-based argmax | ROIs |
//! | `class_labels` | variable-length strings | classes |
//! | `roi_numbers` | uint16 (uint32 past 65,535) | ROIs: the 1-based ADC row |
//! | `metadata` | attributes `version` = `v3`, `model_id`, `timestamp`, `bin_id` (fixed-width UTF-8: h5py reads them as bytes, the classifier's as str; no reader uses them) | |
//!
//! Files go where the classifier puts them and pyifcb looks: `D<YYYY>/D<YYYYMMDD>/` for
//! current-generation bins, `<IFCBn_YYYY_DDD>/` for old ones. Optionally beside each, the CSV the
//! dashboard offers for download (`<bin>_class_scores.csv`: `pid` then one column per class).
//! Rows without probabilities (images that failed) are left out, as the classifier leaves out
//! ROIs without an image; rows whose id is not a ROI pid are counted and skipped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use plankton_core::ifcb::{generation, parse_roi_pid, Generation};

use super::parquet::Predictions;

#[derive(Debug, thiserror::Error)]
pub enum IfcbScoresError {
    #[error("{path}: {reason}")]
    Write { path: PathBuf, reason: String },
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct IfcbScoresSummary {
    pub bins: usize,
    pub rois: usize,
    /// Rows whose image failed (no probabilities).
    pub failed: usize,
    /// Rows whose id is not an IFCB ROI pid.
    pub not_rois: usize,
    /// Bins (pid, ROIs exported, ROIs with an image in the bin) whose file lists fewer ROIs
    /// than the bin holds, where the bin was found beside the rows' source paths.
    pub partial: Vec<(String, usize, usize)>,
    pub files: Vec<PathBuf>,
}

/// Where a bin's class-score file goes under `out` (the classifier's default layout).
pub fn class_file(out: &Path, bin: &str) -> PathBuf {
    let folder = match generation(bin) {
        // DYYYYMMDDTHHMMSS_IFCBnnn -> DYYYY/DYYYYMMDD/
        Some(Generation::Current) => out.join(&bin[..5]).join(&bin[..9]),
        // IFCBn_YYYY_DDD_HHMMSS -> IFCBn_YYYY_DDD/
        _ => out.join(bin.rsplit_once('_').map_or(bin, |(day, _)| day)),
    };
    folder.join(format!("{bin}_class.h5"))
}

/// The v3 class-score file of one bin, as bytes.
pub fn class_h5(
    bin: &str,
    model_id: &str,
    timestamp: &str,
    class_names: &[String],
    rois: &[(u32, &[f32])],
) -> Result<Vec<u8>, String> {
    use hdf5_pure::{AttrValue, FileBuilder};
    let n = rois.len() as u64;
    let c = class_names.len() as u64;
    let mut scores = Vec::with_capacity(rois.len() * class_names.len());
    let mut classes = Vec::with_capacity(rois.len());
    for (_, p) in rois {
        scores.extend_from_slice(p);
        classes.push(super::parquet::top_k(p, 1).first().copied().unwrap_or(0) as f32);
    }
    let mut f = FileBuilder::new();
    f.create_dataset("metadata")
        .with_f32_data(&[])
        .with_shape(&[0])
        .set_attr("version", AttrValue::String("v3".into()))
        .set_attr("model_id", AttrValue::String(model_id.into()))
        .set_attr("timestamp", AttrValue::String(timestamp.into()))
        .set_attr("bin_id", AttrValue::String(bin.into()));
    f.create_dataset("output_scores")
        .with_f32_data(&scores)
        .with_shape(&[n, c]);
    f.create_dataset("output_classes")
        .with_f32_data(&classes)
        .with_shape(&[n]);
    let labels: Vec<&str> = class_names.iter().map(String::as_str).collect();
    f.create_dataset("class_labels")
        .with_vlen_strings(&labels)
        .with_shape(&[c]);
    let numbers: Vec<u32> = rois.iter().map(|(r, _)| *r).collect();
    if numbers.iter().all(|&r| r <= u16::MAX as u32) {
        let small: Vec<u16> = numbers.iter().map(|&r| r as u16).collect();
        f.create_dataset("roi_numbers")
            .with_u16_data(&small)
            .with_shape(&[n]);
    } else {
        f.create_dataset("roi_numbers")
            .with_u32_data(&numbers)
            .with_shape(&[n]);
    }
    f.finish().map_err(|e| format!("HDF5: {e}"))
}

/// Writes every bin's class scores under `out`; `csv` adds the dashboard's CSV beside each.
pub fn write_class_scores(
    preds: &Predictions,
    out: &Path,
    csv: bool,
) -> Result<IfcbScoresSummary, IfcbScoresError> {
    let mut summary = IfcbScoresSummary::default();
    let mut bins: BTreeMap<&str, Vec<(u32, &[f32])>> = BTreeMap::new();
    let mut sources: BTreeMap<&str, &str> = BTreeMap::new();
    for row in &preds.rows {
        let Some((bin, number)) = parse_roi_pid(&row.image_id) else {
            summary.not_rois += 1;
            continue;
        };
        let Some(p) = &row.probabilities else {
            summary.failed += 1;
            continue;
        };
        bins.entry(bin).or_default().push((number, p.as_slice()));
        sources.entry(bin).or_insert(row.source_path.as_str());
    }
    let model_id = preds.model_ids.join(",");
    let timestamp = plankton_core::clock::utc_iso8601(std::time::SystemTime::now());
    for (bin, mut rois) in bins {
        rois.sort_by_key(|(n, _)| *n);
        // A ROI predicted twice (two daemons, a redelivery): its first row counts.
        rois.dedup_by_key(|(n, _)| *n);
        let path = class_file(out, bin);
        let fail = |reason: String| IfcbScoresError::Write {
            path: path.clone(),
            reason,
        };
        let bytes =
            class_h5(bin, &model_id, &timestamp, &preds.class_names, &rois).map_err(fail)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
        }
        plankton_core::fsx::write_atomic(&path, &bytes).map_err(|e| fail(e.to_string()))?;
        summary.files.push(path.clone());
        if csv {
            let csv_path = path.with_file_name(format!("{bin}_class_scores.csv"));
            let mut w = ::csv::Writer::from_writer(Vec::new());
            let header: Vec<&str> = std::iter::once("pid")
                .chain(preds.class_names.iter().map(String::as_str))
                .collect();
            let write_err = |e: ::csv::Error| fail(e.to_string());
            w.write_record(&header).map_err(write_err)?;
            for (number, p) in &rois {
                let mut record = vec![format!("{bin}_{number:05}")];
                record.extend(p.iter().map(|v| v.to_string()));
                w.write_record(&record).map_err(write_err)?;
            }
            let bytes = w.into_inner().map_err(|e| fail(e.to_string()))?;
            plankton_core::fsx::write_atomic(&csv_path, &bytes).map_err(|e| fail(e.to_string()))?;
            summary.files.push(csv_path);
        }
        summary.bins += 1;
        summary.rois += rois.len();
        // The bin itself, where its source is here: `<folder>/<roi pid>` (predict) or
        // `<folder>/<bin>.roi` (the daemon).
        if let Some(source) = sources.get(bin).map(Path::new) {
            let hdr = match source.extension() {
                Some(x) if x == "roi" => source.with_extension("hdr"),
                _ => source.with_file_name(format!("{bin}.hdr")),
            };
            if let Ok(whole) = plankton_core::ifcb::Bin::open(&hdr) {
                if whole.rois.len() > rois.len() {
                    summary
                        .partial
                        .push((bin.to_string(), rois.len(), whole.rois.len()));
                }
            }
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_go_where_the_classifier_puts_them() {
        let out = Path::new("/o");
        assert_eq!(
            class_file(out, "D20130526T095207_IFCB013"),
            Path::new("/o/D2013/D20130526/D20130526T095207_IFCB013_class.h5")
        );
        assert_eq!(
            class_file(out, "IFCB5_2012_028_081515"),
            Path::new("/o/IFCB5_2012_028/IFCB5_2012_028_081515_class.h5")
        );
    }

    /// The real bins of both generations: files where the classifier puts them, rows sorted by
    /// ROI number, scores and labels as given (read back with hdf5-pure's reader; h5py reads
    /// them in tests/annotation_loop.rs), a failed row left out, a bin held in part reported.
    #[test]
    fn the_fixture_bins_round_trip_and_a_partial_bin_is_reported() {
        use super::super::parquet::PredictionRow;
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/ifcb");
        let classes = vec!["diatom".to_string(), "ciliate".to_string()];
        let mut rows = Vec::new();
        let mut expected = BTreeMap::new();
        for hdr in plankton_core::ifcb::find_bins(&fixtures).unwrap() {
            let bin = plankton_core::ifcb::Bin::open(&hdr).unwrap();
            // In reverse order, and the current bin's first ROI failed to decode.
            for (k, r) in bin.rois.iter().enumerate().rev() {
                let p = (k as f32 + 1.0) / (bin.rois.len() as f32 + 2.0);
                let failed = bin.generation == plankton_core::ifcb::Generation::Current && k == 0;
                rows.push(PredictionRow {
                    image_id: bin.roi_id(r),
                    source_path: bin.roi_path(r).display().to_string(),
                    label: None,
                    probabilities: (!failed).then(|| vec![p, 1.0 - p]),
                    views: 1,
                    error: failed.then(|| "corrupt".to_string()),
                    unknown: Default::default(),
                });
                if !failed {
                    expected
                        .entry(bin.pid.clone())
                        .or_insert_with(Vec::new)
                        .push((r.number, p));
                }
            }
        }
        rows.push(PredictionRow {
            image_id: "not_a_roi.jpg".into(),
            source_path: "x".into(),
            label: None,
            probabilities: Some(vec![0.5, 0.5]),
            views: 1,
            error: None,
            unknown: Default::default(),
        });
        let preds = Predictions {
            class_names: classes.clone(),
            model: serde_json::Value::Null,
            rows,
            model_ids: vec!["m@1".into()],
        };
        let out = tempfile::tempdir().unwrap();
        let s = write_class_scores(&preds, out.path(), true).unwrap();
        assert_eq!((s.bins, s.failed, s.not_rois), (2, 1, 1));
        for (pid, mut want) in expected {
            want.sort_by_key(|(n, _)| *n);
            let path = class_file(out.path(), &pid);
            assert!(path.is_file(), "{}", path.display());
            let f = hdf5_pure::File::from_bytes(std::fs::read(&path).unwrap()).unwrap();
            let numbers: Vec<u32> = f
                .dataset("roi_numbers")
                .unwrap()
                .read_u16()
                .unwrap()
                .into_iter()
                .map(u32::from)
                .collect();
            assert_eq!(
                numbers,
                want.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
                "{pid}"
            );
            let scores = f.dataset("output_scores").unwrap();
            assert_eq!(scores.shape().unwrap(), vec![want.len() as u64, 2]);
            let values = scores.read_f32().unwrap();
            for (i, (_, p)) in want.iter().enumerate() {
                assert_eq!(
                    (values[2 * i], values[2 * i + 1]),
                    (*p, 1.0 - p),
                    "{pid} row {i}"
                );
            }
            assert!(path
                .with_file_name(format!("{pid}_class_scores.csv"))
                .is_file());
        }
        // The current-generation bin lost its first ROI: reported as held in part.
        assert_eq!(s.partial.len(), 1, "{:?}", s.partial);
        assert_eq!(s.partial[0].0, "D20130526T095207_IFCB013");
        assert_eq!(s.partial[0].1 + 1, s.partial[0].2);
    }
}
