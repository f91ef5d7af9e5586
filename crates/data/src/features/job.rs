//! `plankton features`: image features for late fusion, one Parquet row per image.
//!
//! Images are decoded by the same decode stage as training (limits, set-aside rules) on every
//! core, in chunks so memory stays bounded, and written in listing order. Columns: `image_id`,
//! `source_path`, `label` (when known), `rows`, `cols` (the raw size: informative, since size is
//! proportional to the organism's), then one float64 column per feature value, named
//! `<set>.<name>` (e.g. `moments.orientation`, `haralick.d0.contrast`, `zernike.n2_l0`,
//! `lbp.code_7`, `tas.band_out3`), and `error`. The footer metadata `plankton.features` lists
//! the sets and columns.

use std::path::PathBuf;

use image::GrayImage;

use super::writer::{self, FeatureRow, FeatureWriter};
use super::{haralick, lbp, moments, tas, zernike};
use crate::sources::{Dataset, ImageRecord};
use plankton_core::decode::{decode_file, DecodeLimits};

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
            FeatureSet::Moments => moments::MOMENT_INFO_NAMES
                .iter()
                .map(|n| format!("moments.{n}"))
                .collect(),
            FeatureSet::Hu => moments::HU_NAMES
                .iter()
                .map(|n| format!("hu.{n}"))
                .collect(),
            FeatureSet::Haralick => (0..4)
                .flat_map(|d| {
                    haralick::FEATURE_NAMES
                        .iter()
                        .map(move |n| format!("haralick.d{d}.{n}"))
                })
                .collect(),
            FeatureSet::Zernike => zernike::ZERNIKE_NAMES
                .iter()
                .map(|n| format!("zernike.{n}"))
                .collect(),
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

/// Records of dataset folders (train then test; the competition layout or IFCB bins), other folders (recursively) and files.
fn records(data: &[PathBuf]) -> Result<Vec<(ImageRecord, Option<String>)>, FeaturesError> {
    let mut out = Vec::new();
    for d in data {
        if d.is_dir() && crate::sources::is_dataset(d) {
            let ds = Dataset::open(d)?;
            for r in ds.train.iter().chain(&ds.test) {
                let label = r.label.map(|l| ds.class_names[l as usize].clone());
                out.push((r.clone(), label));
            }
        } else if d.is_dir() {
            let mut stack = vec![d.clone()];
            let mut files = Vec::new();
            while let Some(dir) = stack.pop() {
                let rd = std::fs::read_dir(&dir).map_err(|e| FeaturesError::Io {
                    path: dir.clone(),
                    message: e.to_string(),
                })?;
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
                let id = f
                    .strip_prefix(d)
                    .unwrap_or(&f)
                    .to_string_lossy()
                    .into_owned();
                out.push((
                    ImageRecord {
                        id,
                        path: f,
                        label: None,
                    },
                    None,
                ));
            }
        } else if d.is_file() {
            let id = d
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            out.push((
                ImageRecord {
                    id,
                    path: d.clone(),
                    label: None,
                },
                None,
            ));
        } else {
            return Err(FeaturesError::Input(format!(
                "{}: no such file or folder",
                d.display()
            )));
        }
    }
    Ok(out)
}

type Computed = Result<(u32, u32, Vec<f64>), String>;

/// Runs the job (blocking; uses `threads` worker threads, 0 = one per core).
pub fn run(
    opts: &FeaturesOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<FeaturesSummary, FeaturesError> {
    let started = std::time::Instant::now();
    if opts.sets.is_empty() {
        return Err(FeaturesError::Input("no feature set chosen".into()));
    }
    let recs = records(&opts.data)?;
    if recs.is_empty() {
        return Err(FeaturesError::Input("no images found".into()));
    }
    let columns = writer::columns(&opts.sets).len();
    // Dropped on an error: the partial file goes with it.
    let mut out = FeatureWriter::create(&opts.out, &opts.sets)?;
    let pool = plankton_core::par::pool_with(opts.threads, || {});
    let mut failed = Vec::new();
    const CHUNK: usize = 512;
    for (c, chunk) in recs.chunks(CHUNK).enumerate() {
        let computed: Vec<Computed> = plankton_core::par::map_range_on(&pool, chunk.len(), |i| {
            let path = &chunk[i].0.path;
            // One image's panic is its own error row, not the end of the job.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                decode_file(path, &opts.decode)
                    .map_err(|e| e.to_string())
                    .map(|img| (img.height(), img.width(), writer::compute(&opts.sets, &img)))
            }))
            .unwrap_or_else(|_| Err(format!("{}: feature computation panicked", path.display())))
        });
        for ((rec, label), r) in chunk.iter().zip(computed) {
            let (size, values, error) = match r {
                Ok((h, w, v)) => (Some((h, w)), Some(v), None),
                Err(e) => {
                    tracing::warn!(path = %rec.path.display(), reason = %e, "image set aside");
                    failed.push((rec.path.clone(), e.clone()));
                    (None, None, Some(e))
                }
            };
            out.push(FeatureRow {
                image_id: rec.id.clone(),
                source_path: rec.path.display().to_string(),
                label: label.clone(),
                size,
                values,
                error,
            })?;
        }
        progress(((c + 1) * CHUNK).min(recs.len()), recs.len());
    }
    out.finish()?;
    Ok(FeaturesSummary {
        images: recs.len(),
        failed,
        columns,
        seconds: started.elapsed().as_secs_f64(),
    })
}
