//! Pipeline TOML -> typed config. Unknown keys are errors (a typo must not silently fall back
//! to a default), and every section has defaults equal to the reference's final configs, so a
//! pipeline file only states what it changes. `pipelines/*.toml` document it by example.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use plankton_core::decode::DecodeLimits;
use plankton_core::imgproc::AugmentationRanges;

pub mod compute;
pub mod model;
pub mod pseudo;
pub mod train;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read pipeline file: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid pipeline file: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: invalid value: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Free-form name, recorded with runs.
    pub name: String,
    pub seed: u64,
    pub decode: DecodeLimits,
    pub loader: LoaderConfig,
    /// One entry per network input. The reference's multiscale models read two patches of the
    /// same sample (size-normalised 95x95 and fixed-scale 47x47).
    #[serde(rename = "patch")]
    pub patches: Vec<PatchConfig>,
    pub augment: AugmentConfig,
    pub zmuv: ZmuvConfig,
    pub batch: BatchConfig,
    pub channels: ChannelConfig,
    pub split: SplitConfig,
    pub model: model::ModelConfig,
    pub train: train::TrainConfig,
    /// Test-time augmentation of `plankton predict`.
    pub tta: plankton_core::tta::TtaConfig,
    /// Pseudo-labelled images mixed into training batches (off unless `predictions` is set).
    pub pseudo: pseudo::PseudoConfig,
    /// How the network computes (precision, memory layout, cuDNN autotuning, TF32).
    pub compute: compute::ComputeConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoaderConfig {
    /// Decode+warp worker threads; 0 = one per core.
    pub workers: usize,
    /// Keep decoded images in memory after the first epoch (the reference held the whole
    /// training set as uint8 arrays). Costs rows*cols bytes per image.
    pub cache_decoded: bool,
    /// How far the workers may run ahead of the consumer when order is preserved.
    pub reorder_window: usize,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            workers: 0,
            cache_decoded: true,
            reorder_window: 256,
        }
    }
}

/// How an image is rescaled into a patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PatchMode {
    /// Largest side becomes `target` pixels (85 in the reference), centred in the patch.
    #[default]
    SizeNormalised,
    /// Constant downscale factor `ds` (5.0 and 2.0 in the reference), keeping absolute size.
    FixedScale,
}

/// The rescale a patch config resolves to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rescale {
    SizeNormalised { target: f64 },
    FixedScale { ds: f64 },
}

/// What a patch shows outside the source image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Fill {
    /// The reference: constant 0 (= white background after inversion).
    #[default]
    Zero,
    /// The median of the image border, for images on a grey background where 0 would draw a
    /// frame around every rotated patch.
    BorderMedian,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PatchConfig {
    pub rows: usize,
    pub cols: usize,
    pub mode: PatchMode,
    /// Size-normalised mode: the largest side of the organism image becomes this many pixels.
    pub target: f64,
    /// Fixed-scale mode: source pixels per patch pixel.
    pub ds: Option<f64>,
    pub fill: Fill,
    /// Shrink sources much larger than the patch with an area filter before the warp, so that
    /// its bilinear sampling does not alias (a 4,096 px image sampled down to 95 px keeps one
    /// source pixel in ~1,900). Off by default: the reference samples the original directly.
    pub antialias: bool,
}

impl Default for PatchConfig {
    fn default() -> Self {
        PatchConfig::size_normalised(95, 85.0)
    }
}

impl PatchConfig {
    pub fn size_normalised(size: usize, target: f64) -> Self {
        PatchConfig {
            rows: size,
            cols: size,
            mode: PatchMode::SizeNormalised,
            target,
            ds: None,
            fill: Fill::Zero,
            antialias: false,
        }
    }
    pub fn fixed_scale(size: usize, ds: f64) -> Self {
        PatchConfig {
            rows: size,
            cols: size,
            mode: PatchMode::FixedScale,
            target: 85.0,
            ds: Some(ds),
            fill: Fill::Zero,
            antialias: false,
        }
    }
    pub fn rescale(&self) -> Rescale {
        match self.mode {
            PatchMode::SizeNormalised => Rescale::SizeNormalised {
                target: self.target,
            },
            PatchMode::FixedScale => Rescale::FixedScale {
                ds: self.ds.unwrap_or(1.0),
            },
        }
    }
    /// Downscale factor for a source of the given size.
    pub fn ds(&self, src_rows: usize, src_cols: usize) -> f64 {
        match self.rescale() {
            Rescale::SizeNormalised { target } => {
                plankton_core::imgproc::size_normalised_ds(src_rows, src_cols, target)
            }
            Rescale::FixedScale { ds } => ds,
        }
    }
    pub fn pixels(&self) -> usize {
        self.rows * self.cols
    }
}

/// Training augmentation ranges; defaults are the reference's final configs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    pub enabled: bool,
    /// Degrees, uniform.
    pub rotation: [f64; 2],
    /// Pixels, uniform, each axis.
    pub translation: [f64; 2],
    /// Log-uniform.
    pub zoom: [f64; 2],
    /// Log-uniform in [1/stretch, stretch].
    pub stretch: f64,
    /// Degrees, uniform.
    pub shear: [f64; 2],
    pub flip: bool,
}

impl AugmentConfig {
    pub fn ranges(&self) -> AugmentationRanges {
        AugmentationRanges {
            rotation: self.rotation,
            translation: self.translation,
            zoom: self.zoom,
            stretch: self.stretch,
            shear: self.shear,
        }
    }
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            enabled: true,
            rotation: [0.0, 360.0],
            translation: [-10.0, 10.0],
            zoom: [1.0 / 1.6, 1.6],
            stretch: 1.3,
            shear: [-20.0, 20.0],
            flip: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ZmuvConfig {
    /// Number of augmented training patches the global mean/std are estimated on.
    pub samples: usize,
}

impl Default for ZmuvConfig {
    fn default() -> Self {
        ZmuvConfig { samples: 8192 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Images per batch (the network sees 4x as many after the cyclic slice).
    pub size: usize,
    /// Drop a final partial batch instead of emitting it.
    pub drop_last: bool,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            size: 32,
            drop_last: false,
        }
    }
}

/// Bounded channel capacities between stages, in items (records, samples or batches).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChannelConfig {
    /// source -> decode/warp workers (records).
    pub records: usize,
    /// workers -> batcher (finished patches).
    pub samples: usize,
    /// batcher -> model (batches): the prefetch depth that keeps an accelerator fed.
    pub batches: usize,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig {
            records: 256,
            samples: 256,
            batches: 4,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SplitConfig {
    /// Fraction of each class held out for validation.
    pub valid_fraction: f64,
    /// Extra stratified splits for bagging (0 = none).
    pub bagging: usize,
}

impl Default for SplitConfig {
    fn default() -> Self {
        SplitConfig {
            valid_fraction: 0.1,
            bagging: 0,
        }
    }
}

impl PipelineConfig {
    pub fn from_toml_str(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut cfg: PipelineConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        if cfg.patches.is_empty() {
            cfg.patches.push(PatchConfig::default());
        }
        cfg.validate(path)?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_str(&text, path)
    }

    /// The pipeline `plankton demo` runs (`pipelines/demo.toml`, embedded in the binary).
    pub fn embedded_demo() -> Self {
        Self::from_toml_str(
            include_str!("../../../../pipelines/demo.toml"),
            Path::new("pipelines/demo.toml"),
        )
        .expect("embedded demo pipeline is valid (tested)")
    }

    /// The built-in default pipeline (what `pipelines/default.toml` spells out).
    pub fn reference_default() -> Self {
        let mut cfg = PipelineConfig {
            name: "default".into(),
            seed: 42,
            ..Default::default()
        };
        cfg.patches.push(PatchConfig::default());
        cfg
    }

    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |message: String| {
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                message,
            })
        };
        for (i, p) in self.patches.iter().enumerate() {
            if p.rows == 0 || p.cols == 0 || p.rows > 4096 || p.cols > 4096 {
                return bad(format!(
                    "patch[{i}]: size {}x{} must be within 1..=4096",
                    p.rows, p.cols
                ));
            }
            if p.mode == PatchMode::FixedScale && p.ds.is_none() {
                return bad(format!("patch[{i}]: mode = \"fixed_scale\" needs `ds`"));
            }
            match p.rescale() {
                Rescale::SizeNormalised { target } if !(target > 0.0 && target.is_finite()) => {
                    return bad(format!("patch[{i}]: target must be > 0, got {target}"))
                }
                Rescale::FixedScale { ds } if !(ds > 0.0 && ds.is_finite()) => {
                    return bad(format!("patch[{i}]: ds must be > 0, got {ds}"))
                }
                _ => {}
            }
        }
        if let Err(message) = self.augment.ranges().validate("augment") {
            return bad(message);
        }
        if self.batch.size == 0 {
            return bad("batch.size must be > 0".into());
        }
        if self.pseudo.predictions.is_some() {
            if let Err(message) = self.pseudo.batch_split(self.batch.size) {
                return bad(message);
            }
        }
        if self.zmuv.samples == 0 {
            return bad("zmuv.samples must be > 0".into());
        }
        let c = &self.channels;
        if c.records == 0 || c.samples == 0 || c.batches == 0 || self.loader.reorder_window == 0 {
            return bad("channel capacities and loader.reorder_window must be > 0".into());
        }
        if !(self.split.valid_fraction >= 0.0 && self.split.valid_fraction < 1.0) {
            return bad(format!(
                "split.valid_fraction must be in [0, 1), got {}",
                self.split.valid_fraction
            ));
        }
        if self.decode.max_pixels == 0 || self.decode.max_bytes == 0 {
            return bad("decode limits must be > 0".into());
        }
        if let Err(message) = self
            .model
            .validate()
            .and_then(|_| self.train.validate())
            .and_then(|_| self.tta.validate())
            .and_then(|_| self.pseudo.validate())
        {
            return bad(message);
        }
        if self.model.preset == model::Preset::Multiscale && self.patches.len() < 2 {
            return bad("model.preset = \"multiscale\" needs two [[patch]] entries".into());
        }
        Ok(())
    }

    /// Worker threads to use: the configured count, or one per core.
    pub fn worker_count(&self) -> usize {
        if self.loader.workers > 0 {
            self.loader.workers
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_reference_defaults() {
        let cfg = PipelineConfig::from_toml_str("", Path::new("x.toml")).unwrap();
        assert_eq!(cfg.patches, vec![PatchConfig::size_normalised(95, 85.0)]);
        assert_eq!(cfg.augment.zoom, [1.0 / 1.6, 1.6]);
        assert_eq!(cfg.zmuv.samples, 8192);
    }

    #[test]
    fn unknown_keys_are_rejected_with_the_file_name() {
        let err =
            PipelineConfig::from_toml_str("[augment]\nrotaton = [0, 90]\n", Path::new("p.toml"))
                .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("p.toml") && msg.contains("rotaton"), "{msg}");
    }

    #[test]
    fn multiscale_patches_parse() {
        let text = r#"
            [[patch]]
            rows = 95
            cols = 95
            mode = "size_normalised"
            target = 85.0
            [[patch]]
            rows = 47
            cols = 47
            mode = "fixed_scale"
            ds = 5.0
            fill = "border_median"
        "#;
        let cfg = PipelineConfig::from_toml_str(text, Path::new("m.toml")).unwrap();
        assert_eq!(cfg.patches.len(), 2);
        assert_eq!(cfg.patches[1].rescale(), Rescale::FixedScale { ds: 5.0 });
        assert_eq!(cfg.patches[1].fill, Fill::BorderMedian);
    }

    #[test]
    fn invalid_values_are_rejected() {
        for text in [
            "[batch]\nsize = 0",
            "[augment]\nstretch = 0.5",
            "[augment]\nzoom = [2.0, 1.0]",
            "[[patch]]\nrows = 0\ncols = 3\nmode = \"fixed_scale\"\nds = 1.0",
        ] {
            assert!(
                PipelineConfig::from_toml_str(text, Path::new("b.toml")).is_err(),
                "{text}"
            );
        }
    }
}
