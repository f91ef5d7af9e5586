//! The replay file (`pipelines/replay-*.toml`): which members to train and how the stages
//! after them (TTA, features, fusion, blend, pseudo-labels) are chained.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::PipelineConfig;

#[derive(Debug, thiserror::Error)]
pub enum ReplayConfigError {
    #[error("{path}: cannot read replay file: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{path}: invalid replay file: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplayConfig {
    pub name: String,
    /// Seed of the shared split (and of the pseudo-label shards).
    pub seed: u64,
    /// Fraction of each class every member is validated on: one split for all members, so
    /// their validation predictions can be blended.
    pub valid_fraction: f64,
    #[serde(rename = "member")]
    pub members: Vec<MemberConfig>,
    pub features: FeaturesStage,
    pub fuse: FuseStage,
    pub blend: BlendStage,
    pub pseudo: PseudoStage,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        ReplayConfig {
            name: "replay".into(),
            seed: 42,
            valid_fraction: 0.1,
            members: Vec::new(),
            features: FeaturesStage::default(),
            fuse: FuseStage::default(),
            blend: BlendStage::default(),
            pseudo: PseudoStage::default(),
        }
    }
}

/// One convnet of the ensemble.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    /// Folder name under `members/` (letters, digits, `-`, `_`).
    pub name: String,
    /// Its pipeline TOML, relative to the replay file.
    pub pipeline: PathBuf,
    /// Extra models trained on bagging splits of the same data; their test predictions are
    /// averaged with the member's (the reference's bagged members). The blend weights are
    /// fitted on the member's own validation predictions, since every bag validates on
    /// different images.
    #[serde(default)]
    pub bagging: usize,
    /// Overrides the pipeline's seed: the same architecture with another seed is another
    /// member worth blending.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Transforms at prediction time (default: the pipeline's `[tta]`).
    #[serde(default)]
    pub tta: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeaturesStage {
    /// Feature sets `plankton features` computes for the fusion stage.
    pub sets: Vec<String>,
}

impl Default for FeaturesStage {
    fn default() -> Self {
        FeaturesStage {
            sets: vec!["moments".into(), "haralick".into()],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FuseStage {
    /// Fuse each member's predictions with these feature sets (one fusion group per set,
    /// averaged). Empty: no fusion stage.
    pub sets: Vec<String>,
    /// Fusion nets per set, trained with different seeds and averaged.
    pub repeats: usize,
    /// Folds of the out-of-fold validation predictions the blend is fitted on.
    pub folds: usize,
    /// Blend a member's fused predictions only where fusion lowered its out-of-fold
    /// validation loss. On a few hundred validation images the fusion nets can fit noise; the
    /// reference kept fusion because it gained on validation, and this applies that test.
    pub only_if_better: bool,
}

impl Default for FuseStage {
    fn default() -> Self {
        FuseStage {
            sets: vec!["moments".into(), "haralick".into()],
            repeats: 10,
            folds: 5,
            only_if_better: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BlendStage {
    /// "cv" (forward selection by cross-validated log loss) or "all".
    pub select: String,
    /// Equal weights instead of fitted ones.
    pub uniform: bool,
    pub folds: usize,
}

impl Default for BlendStage {
    fn default() -> Self {
        BlendStage {
            select: "cv".into(),
            uniform: false,
            folds: 5,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PseudoStage {
    /// Members retrained with the blend's soft test targets (empty: no pseudo-label round).
    pub members: Vec<String>,
    /// Models per member, each on all but one shard of the test images (the reference: 3).
    pub shards: usize,
    /// Fraction of each batch that is pseudo-labelled (the reference's final models: 0.67).
    pub fraction: f64,
    /// Dropout while training them (the reference switched it off).
    pub dropout: bool,
    /// Weight of the pseudo-label models' mean in the final answer (the reference: 1/2, the
    /// other half being the blend).
    pub weight: f64,
}

impl Default for PseudoStage {
    fn default() -> Self {
        PseudoStage {
            members: Vec::new(),
            shards: 3,
            fraction: 0.67,
            dropout: false,
            weight: 0.5,
        }
    }
}

impl ReplayConfig {
    pub fn load(path: &Path) -> Result<ReplayConfig, ReplayConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ReplayConfigError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let cfg: ReplayConfig = toml::from_str(&text).map_err(|e| ReplayConfigError::Invalid {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        cfg.validate()
            .map_err(|message| ReplayConfigError::Invalid {
                path: path.to_path_buf(),
                message,
            })?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.members.is_empty() {
            return Err("no [[member]]: the replay needs at least one network".into());
        }
        if !(self.valid_fraction > 0.0 && self.valid_fraction < 1.0) {
            return Err(format!("valid_fraction must be in (0, 1): the later stages are fitted on validation predictions, got {}", self.valid_fraction));
        }
        let mut seen = std::collections::HashSet::new();
        for m in &self.members {
            if m.name.is_empty()
                || !m
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(format!(
                    "member name `{}`: use letters, digits, `-` and `_` (it names a folder)",
                    m.name
                ));
            }
            // `--only member=` takes a name, an index or `task`: a name must not read as the others.
            if m.name == "task" || m.name.chars().all(|c| c.is_ascii_digit()) {
                return Err(format!(
                    "member name `{}`: `task` and numbers are taken by `--only member=` (an array index); choose another",
                    m.name
                ));
            }
            if !seen.insert(m.name.as_str()) {
                return Err(format!("member `{}` is listed twice", m.name));
            }
            if m.tta == Some(0) {
                return Err(format!("member `{}`: tta must be >= 1", m.name));
            }
        }
        for name in &self.pseudo.members {
            if !seen.contains(name.as_str()) {
                return Err(format!("pseudo.members: `{name}` is not a [[member]]"));
            }
        }
        if !self.pseudo.members.is_empty() {
            if self.pseudo.shards == 0 {
                return Err("pseudo.shards must be >= 1".into());
            }
            if !(self.pseudo.fraction > 0.0 && self.pseudo.fraction < 1.0) {
                return Err(format!(
                    "pseudo.fraction must be in (0, 1), got {}",
                    self.pseudo.fraction
                ));
            }
            if !(0.0..=1.0).contains(&self.pseudo.weight) {
                return Err(format!(
                    "pseudo.weight must be in [0, 1], got {}",
                    self.pseudo.weight
                ));
            }
        }
        if !matches!(self.blend.select.as_str(), "cv" | "all") {
            return Err(format!(
                "blend.select must be \"cv\" or \"all\", got `{}`",
                self.blend.select
            ));
        }
        if self.blend.folds < 2 || (!self.fuse.sets.is_empty() && self.fuse.folds < 2) {
            return Err("blend.folds and fuse.folds must be >= 2".into());
        }
        if !self.fuse.sets.is_empty() && self.fuse.repeats == 0 {
            return Err("fuse.repeats must be >= 1".into());
        }
        for s in &self.fuse.sets {
            if !self.features.sets.contains(s) {
                return Err(format!(
                    "fuse.sets: `{s}` is not computed (add it to features.sets)"
                ));
            }
        }
        Ok(())
    }

    /// The members' pipelines, resolved against the replay file's folder.
    pub fn member_pipelines(
        &self,
        replay_file: &Path,
    ) -> Result<Vec<PipelineConfig>, ReplayConfigError> {
        let dir = replay_file.parent().unwrap_or(Path::new("."));
        self.members
            .iter()
            .map(|m| {
                let path = dir.join(&m.pipeline);
                PipelineConfig::load(&path).map_err(|e| ReplayConfigError::Invalid {
                    path: replay_file.to_path_buf(),
                    message: format!("member `{}`: {e}", m.name),
                })
            })
            .collect()
    }
}
