//! `plankton features`: image features for late fusion, one Parquet row per image.
//!
//! Images are decoded by the same decode stage as training (limits, set-aside rules) on every
//! core, in chunks so memory stays bounded, and written in listing order. Columns: `image_id`,
//! `source_path`, `label` (when known), `rows`, `cols` (the raw size: informative, since size is
//! proportional to the organism's), then one float64 column per feature value, named
//! `<set>.<name>` (e.g. `moments.orientation`, `haralick.d0.contrast`, `zernike.n2_l0`,
//! `lbp.code_7`, `tas.band_out3`), and `error`. The footer metadata `plankton.features` lists
//! the sets and columns.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Builder, StringBuilder, UInt32Builder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use image::GrayImage;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use super::{haralick, lbp, moments, tas, zernike};
use crate::sources::{Dataset, ImageRecord};
use crate::stages::decode::{decode_file, DecodeLimits};

#[derive(Debug, thiserror::Error)]
pub enum FeaturesError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("unknown feature set `{0}` (known: moments, hu, haralick, zernike, lbp, tas)")]
    UnknownSet(String),
    #[error(transparent)]
    Dataset(#[from] crate::sources::DatasetError),
    #[error("{0}")]
    Input(String),
}

/// A group of feature columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureSet {
    /// The reference's 7 "moments info" values.
    Moments,
    /// Hu's 7 invariant moments.
    Hu,
    /// Haralick texture: 4 directions x 13.
    Haralick,
    /// Zernike moments |Z_nl|, radius 20, degree 8: 25 (evaluated by the reference, unused).
    Zernike,
    /// Rotation-invariant local binary pattern counts, radius 20, 7 points: 20 (evaluated by
    /// the reference, unused). All NaN only for an empty image, which decoding never yields.
    Lbp,
    /// Parameter-free threshold adjacency statistics: 54 (evaluated by the reference, unused).
    Tas,
}

impl FeatureSet {
    pub fn parse_list(s: &str) -> Result<Vec<FeatureSet>, FeaturesError> {
        s.split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| match t {
                "moments" => Ok(FeatureSet::Moments),
                "hu" => Ok(FeatureSet::Hu),
                "haralick" => Ok(FeatureSet::Haralick),
                "zernike" => Ok(FeatureSet::Zernike),
                "lbp" => Ok(FeatureSet::Lbp),
                "tas" => Ok(FeatureSet::Tas),
                other => Err(FeaturesError::UnknownSet(other.to_string())),
            })
            .collect()
    }

    pub fn name(self) -> &'static str {
        match self {
            FeatureSet::Moments => "moments",
            FeatureSet::Hu => "hu",
            FeatureSet::Haralick => "haralick",
            FeatureSet::Zernike => "zernike",
            FeatureSet::Lbp => "lbp",
            FeatureSet::Tas => "tas",
        }
    }

    pub fn columns(self) -> Vec<String> {
        match self {
            FeatureSet::Moments => moments::MOMENT_INFO_NAMES.iter().map(|n| format!("moments.{n}")).collect(),
            FeatureSet::Hu => moments::HU_NAMES.iter().map(|n| format!("hu.{n}")).collect(),
            FeatureSet::Haralick => (0..4).flat_map(|d| haralick::FEATURE_NAMES.iter().map(move |n| format!("haralick.d{d}.{n}"))).collect(),
            FeatureSet::Zernike => zernike::ZERNIKE_NAMES.iter().map(|n| format!("zernike.{n}")).collect(),
            FeatureSet::Lbp => lbp::LBP_NAMES.iter().map(|n| format!("lbp.{n}")).collect(),
            FeatureSet::Tas => tas::TAS_NAMES.iter().map(|n| format!("tas.{n}")).collect(),
        }
    }

    pub fn compute(self, img: &GrayImage, out: &mut Vec<f64>) {
        match self {
            FeatureSet::Moments => out.extend_from_slice(&moments::moment_info(img)),
            FeatureSet::Hu => out.extend_from_slice(&moments::hu_moments(img)),
            FeatureSet::Haralick => out.extend(haralick::haralick(img).iter().flatten()),
            FeatureSet::Zernike => out.extend_from_slice(&zernike::zernike(img)),
            FeatureSet::Lbp => out.extend_from_slice(&lbp::lbp(img)),
            FeatureSet::Tas => out.extend_from_slice(&tas::pftas(img)),
        }
    }
}

#[derive(Debug, Clone)]
pub struct FeaturesOptions {
    /// Dataset folders (competition layout: train and test images) or folders/files of images.
    pub data: Vec<PathBuf>,
    pub out: PathBuf,
    pub sets: Vec<FeatureSet>,
    pub threads: usize,
    pub decode: DecodeLimits,
}

#[derive(Debug, Clone)]
pub struct FeaturesSummary {
    pub images: usize,
    pub failed: Vec<(PathBuf, String)>,
    pub columns: usize,
    pub seconds: f64,
}

/// Records of dataset folders (train then test), other folders (recursively) and files.
fn records(data: &[PathBuf]) -> Result<Vec<(ImageRecord, Option<String>)>, FeaturesError> {
    let mut out = Vec::new();
    for d in data {
        if d.is_dir() && (d.join("train").is_dir() || d.join("test").is_dir()) {
            let ds = Dataset::open(d)?;
            for r in ds.train.iter().chain(&ds.test) {
                let label = r.label.map(|l| ds.class_names[l as usize].clone());
                out.push((r.clone(), label));
            }
        } else if d.is_dir() {
            let mut stack = vec![d.clone()];
            let mut files = Vec::new();
            while let Some(dir) = stack.pop() {
                let rd = std::fs::read_dir(&dir).map_err(|e| FeaturesError::Io { path: dir.clone(), message: e.to_string() })?;
                for e in rd.flatten() {
                    if e.file_name().to_string_lossy().starts_with('.') {
                        continue;
                    }
                    let p = e.path();
                    if p.is_dir() {
                        stack.push(p);
                    } else {
                        files.push(p);
                    }
                }
            }
            files.sort();
            for f in files {
                let id = f.strip_prefix(d).unwrap_or(&f).to_string_lossy().into_owned();
                out.push((ImageRecord { id, path: f, label: None }, None));
            }
        } else if d.is_file() {
            let id = d.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            out.push((ImageRecord { id, path: d.clone(), label: None }, None));
        } else {
            return Err(FeaturesError::Input(format!("{}: no such file or folder", d.display())));
        }
    }
    Ok(out)
}

fn schema(columns: &[String], sets: &[FeatureSet]) -> SchemaRef {
    let mut fields = vec![
        Field::new("image_id", DataType::Utf8, false),
        Field::new("source_path", DataType::Utf8, false),
        Field::new("label", DataType::Utf8, true),
        Field::new("rows", DataType::UInt32, true),
        Field::new("cols", DataType::UInt32, true),
    ];
    fields.extend(columns.iter().map(|c| Field::new(c, DataType::Float64, true)));
    fields.push(Field::new("error", DataType::Utf8, true));
    let meta = serde_json::json!({
        "sets": sets.iter().map(|s| s.name()).collect::<Vec<_>>(),
        "columns": columns,
        "plankton_version": env!("CARGO_PKG_VERSION"),
    });
    Arc::new(Schema::new_with_metadata(fields, [("plankton.features".to_string(), meta.to_string())].into_iter().collect::<std::collections::HashMap<String, String>>()))
}

type Computed = Result<(u32, u32, Vec<f64>), String>;

/// Runs the job (blocking; uses `threads` worker threads, 0 = one per core).
pub fn run(opts: &FeaturesOptions, mut progress: impl FnMut(usize, usize)) -> Result<FeaturesSummary, FeaturesError> {
    let started = std::time::Instant::now();
    if opts.sets.is_empty() {
        return Err(FeaturesError::Input("no feature set chosen".into()));
    }
    let recs = records(&opts.data)?;
    if recs.is_empty() {
        return Err(FeaturesError::Input("no images found".into()));
    }
    let columns: Vec<String> = opts.sets.iter().flat_map(|s| s.columns()).collect();
    let schema = schema(&columns, &opts.sets);
    let io = |p: &Path, e: String| FeaturesError::Io { path: p.to_path_buf(), message: e };
    if let Some(dir) = opts.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e.to_string()))?;
    }
    let mut tmp = opts.out.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = PathBuf::from(tmp);
    let file = File::create(&tmp).map_err(|e| io(&tmp, e.to_string()))?;
    let meta = schema.metadata().get("plankton.features").cloned().unwrap_or_default();
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_key_value_metadata(Some(vec![KeyValue::new("plankton.features".to_string(), meta)]))
        .build();
    let mut writer = ArrowWriter::try_new(file, schema.clone(), Some(props)).map_err(|e| io(&tmp, e.to_string()))?;
    let threads = if opts.threads > 0 { opts.threads } else { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) };
    let mut failed = Vec::new();
    const CHUNK: usize = 512;
    let result = (|| -> Result<(), FeaturesError> {
        for (c, chunk) in recs.chunks(CHUNK).enumerate() {
            let computed: Vec<Computed> = {
                let next = std::sync::atomic::AtomicUsize::new(0);
                let slots: Vec<std::sync::Mutex<Option<Computed>>> = (0..chunk.len()).map(|_| std::sync::Mutex::new(None)).collect();
                std::thread::scope(|s| {
                    for _ in 0..threads.min(chunk.len()) {
                        s.spawn(|| loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if i >= chunk.len() {
                                break;
                            }
                            let path = &chunk[i].0.path;
                            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                decode_file(path, &opts.decode).map_err(|e| e.to_string()).map(|img| {
                                    let mut v = Vec::with_capacity(columns.len());
                                    for set in &opts.sets {
                                        set.compute(&img, &mut v);
                                    }
                                    (img.height(), img.width(), v)
                                })
                            }))
                            .unwrap_or_else(|_| Err(format!("{}: feature computation panicked", path.display())));
                            *slots[i].lock().unwrap() = Some(r);
                        });
                    }
                });
                slots.into_iter().map(|m| m.into_inner().unwrap().expect("computed")).collect()
            };
            let mut ids = StringBuilder::new();
            let mut paths = StringBuilder::new();
            let mut labels = StringBuilder::new();
            let mut rows = UInt32Builder::new();
            let mut cols = UInt32Builder::new();
            let mut values: Vec<Float64Builder> = (0..columns.len()).map(|_| Float64Builder::new()).collect();
            let mut errors = StringBuilder::new();
            for ((rec, label), r) in chunk.iter().zip(computed) {
                ids.append_value(&rec.id);
                paths.append_value(rec.path.display().to_string());
                labels.append_option(label.as_deref());
                match r {
                    Ok((h, w, v)) => {
                        rows.append_value(h);
                        cols.append_value(w);
                        for (b, x) in values.iter_mut().zip(v) {
                            b.append_value(x);
                        }
                        errors.append_null();
                    }
                    Err(e) => {
                        rows.append_null();
                        cols.append_null();
                        for b in values.iter_mut() {
                            b.append_null();
                        }
                        tracing::warn!(path = %rec.path.display(), reason = %e, "image set aside");
                        errors.append_value(&e);
                        failed.push((rec.path.clone(), e));
                    }
                }
            }
            let mut arrays: Vec<ArrayRef> = vec![Arc::new(ids.finish()), Arc::new(paths.finish()), Arc::new(labels.finish()), Arc::new(rows.finish()), Arc::new(cols.finish())];
            arrays.extend(values.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
            arrays.push(Arc::new(errors.finish()));
            let batch = RecordBatch::try_new(schema.clone(), arrays).expect("columns match the schema");
            writer.write(&batch).map_err(|e| io(&tmp, e.to_string()))?;
            progress(((c + 1) * CHUNK).min(recs.len()), recs.len());
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    writer.close().map_err(|e| io(&tmp, e.to_string()))?;
    std::fs::rename(&tmp, &opts.out).map_err(|e| io(&opts.out, e.to_string()))?;
    Ok(FeaturesSummary { images: recs.len(), failed, columns: columns.len(), seconds: started.elapsed().as_secs_f64() })
}
