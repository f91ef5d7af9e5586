//! Quasi-random test-time augmentation (SPEC.md "Test-time augmentation (TTA)").
//!
//! The reference built its test-time transforms from the first `n` points of the classic
//! 7-dimensional Halton sequence (`tta.build_quasirandom_transforms`), mapping each coordinate
//! through an inverse CDF: dims 0/1 shift x/y, dim 2 rotation, dim 3 shear (uniform over their
//! ranges), dim 4 flip (s > 0.5), dim 5 zoom and dim 6 stretch (log-uniform). All seven
//! coordinates are consumed for every point whether or not flip/stretch are enabled, so turning
//! one off never shifts the others.

use serde::{Deserialize, Serialize};

use crate::aggregate::Aggregation;
use crate::halton::Halton;
use crate::imgproc::{Augmentation, AugmentationRanges};

/// Upper bound on `tta.transforms` accepted by [`TtaConfig::validate`].
pub const MAX_TRANSFORMS: usize = 10_000;

/// The `[tta]` section of the pipeline config. Defaults are the reference's TTA settings
/// (70 transforms, milder ranges than training).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TtaConfig {
    /// Number of quasi-random transforms (views) per image. 0 or 1: a single pass with the
    /// identity transform (the reference's "noaug").
    pub transforms: usize,
    /// Rotation range in degrees (uniform).
    pub rotation: [f64; 2],
    /// Translation range in source pixels, for x and y independently (uniform).
    pub translation: [f64; 2],
    /// Zoom range (log-uniform); > 1 enlarges the organism.
    pub zoom: [f64; 2],
    /// Stretch factor s: the stretch is log-uniform in [1/s, s]; 1.0 = no stretch.
    pub stretch: f64,
    /// Shear range in degrees (uniform).
    pub shear: [f64; 2],
    /// Mirror about half the transforms (Halton dim 4 > 0.5).
    pub flip: bool,
    /// How the views of one image are combined.
    pub aggregation: Aggregation,
}

impl Default for TtaConfig {
    fn default() -> Self {
        TtaConfig {
            transforms: 70,
            rotation: [0.0, 360.0],
            translation: [-8.0, 8.0],
            zoom: [1.0 / 1.4, 1.4],
            stretch: 1.2,
            shear: [-10.0, 10.0],
            flip: true,
            aggregation: Aggregation::MeanProbability,
        }
    }
}

impl TtaConfig {
    /// Checks the ranges; the message names the offending key (e.g. "tta.zoom: ...").
    pub fn validate(&self) -> Result<(), String> {
        if self.transforms > MAX_TRANSFORMS {
            return Err(format!(
                "tta.transforms: at most {MAX_TRANSFORMS}, got {}",
                self.transforms
            ));
        }
        self.ranges().validate("tta")
    }

    pub fn ranges(&self) -> AugmentationRanges {
        AugmentationRanges {
            rotation: self.rotation,
            translation: self.translation,
            zoom: self.zoom,
            stretch: self.stretch,
            shear: self.shear,
        }
    }

    /// Number of views per image that [`quasi_random_transforms`] yields (at least 1).
    pub fn views(&self) -> usize {
        self.transforms.max(1)
    }

    /// True when TTA is off (a single identity pass).
    pub fn is_noaug(&self) -> bool {
        self.transforms <= 1
    }
}

/// `lo + (hi - lo) * s`, the reference's inverse CDF of the uniform distribution.
#[inline]
fn uniform(s: f64, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * s
}

/// Maps one 7-dimensional point in [0, 1)^7 to an augmentation, as the reference did.
pub fn transform_from_point(cfg: &TtaConfig, s: &[f64]) -> Augmentation {
    assert_eq!(
        s.len(),
        7,
        "transform_from_point: need a 7-dimensional point"
    );
    let shift_x = uniform(s[0], cfg.translation[0], cfg.translation[1]);
    let shift_y = uniform(s[1], cfg.translation[0], cfg.translation[1]);
    let rotation_deg = uniform(s[2], cfg.rotation[0], cfg.rotation[1]);
    let shear_deg = uniform(s[3], cfg.shear[0], cfg.shear[1]);
    let flip = cfg.flip && s[4] > 0.5;
    let zoom = uniform(s[5], cfg.zoom[0].ln(), cfg.zoom[1].ln()).exp();
    let ls = cfg.stretch.ln();
    let stretch = uniform(s[6], -ls, ls).exp();
    Augmentation {
        rotation_deg,
        shift_x,
        shift_y,
        zoom,
        stretch,
        shear_deg,
        flip,
    }
}

/// The test-time transforms of `cfg`: `[IDENTITY]` when `cfg.transforms <= 1`, else the first
/// `cfg.transforms` points of `Halton(7)` (from index 1) mapped by [`transform_from_point`].
/// The transform of view `v` does not depend on the total count (a prefix of a longer list).
pub fn quasi_random_transforms(cfg: &TtaConfig) -> Vec<Augmentation> {
    if cfg.transforms <= 1 {
        return vec![Augmentation::IDENTITY];
    }
    Halton::new(7)
        .take(cfg.transforms)
        .map(|p| transform_from_point(cfg, &p))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_reference_settings() {
        let c = TtaConfig::default();
        assert_eq!(c.transforms, 70);
        assert_eq!(c.zoom, [1.0 / 1.4, 1.4]);
        assert_eq!(c.stretch, 1.2);
        assert!(c.flip);
        assert_eq!(c.aggregation, Aggregation::MeanProbability);
        c.validate().unwrap();
    }

    #[test]
    fn toml_section_parses_with_defaults_and_rejects_unknown_keys() {
        let c: TtaConfig = toml::from_str(
            "transforms = 35\nrotation = [0, 90]\naggregation = \"entropy_weighted\"",
        )
        .unwrap();
        assert_eq!(c.transforms, 35);
        assert_eq!(c.rotation, [0.0, 90.0]);
        assert_eq!(c.aggregation, Aggregation::EntropyWeighted);
        assert_eq!(c.shear, [-10.0, 10.0]);
        assert!(toml::from_str::<TtaConfig>("rotations = [0, 1]").is_err());
        assert!(toml::from_str::<TtaConfig>("aggregation = \"median\"").is_err());
        let empty: TtaConfig = toml::from_str("").unwrap();
        assert_eq!(empty, TtaConfig::default());
        let back: TtaConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn validate_names_the_key() {
        let bad = |f: fn(&mut TtaConfig), key: &str| {
            let mut c = TtaConfig::default();
            f(&mut c);
            let e = c.validate().unwrap_err();
            assert!(e.starts_with(&format!("tta.{key}:")), "{e}");
        };
        bad(|c| c.transforms = 10_001, "transforms");
        bad(|c| c.rotation = [10.0, 0.0], "rotation");
        bad(|c| c.translation = [f64::NAN, 1.0], "translation");
        bad(|c| c.shear = [0.0, f64::INFINITY], "shear");
        bad(|c| c.zoom = [0.0, 1.4], "zoom");
        bad(|c| c.zoom = [-1.0, 1.4], "zoom");
        bad(|c| c.zoom = [1.4, 1.0], "zoom");
        bad(|c| c.stretch = 0.9, "stretch");
        bad(|c| c.stretch = f64::NAN, "stretch");
        let ok = TtaConfig {
            transforms: 0,
            stretch: 1.0,
            zoom: [1.0, 1.0],
            ..TtaConfig::default()
        };
        ok.validate().unwrap();
    }

    #[test]
    fn noaug_is_a_single_identity() {
        for n in [0, 1] {
            let c = TtaConfig {
                transforms: n,
                ..TtaConfig::default()
            };
            assert_eq!(quasi_random_transforms(&c), vec![Augmentation::IDENTITY]);
            assert_eq!(c.views(), 1);
            assert!(c.is_noaug());
        }
    }

    #[test]
    fn first_transform_maps_the_first_halton_point() {
        let c = TtaConfig::default();
        let t = quasi_random_transforms(&c);
        assert_eq!(t.len(), 70);
        let a = t[0];
        // (1/2, 1/3, 1/5, 1/7, 1/11, 1/13, 1/17)
        assert_eq!(a.shift_x, 0.0);
        assert!((a.shift_y - (-8.0 + 16.0 / 3.0)).abs() < 1e-12);
        assert!((a.rotation_deg - 72.0).abs() < 1e-12);
        assert!((a.shear_deg - (-10.0 + 20.0 / 7.0)).abs() < 1e-12);
        assert!(!a.flip);
        let lz = 1.4f64.ln();
        assert!((a.zoom - (-lz + 2.0 * lz / 13.0).exp()).abs() < 1e-12);
        let ls = 1.2f64.ln();
        assert!((a.stretch - (-ls + 2.0 * ls / 17.0).exp()).abs() < 1e-12);
    }

    #[test]
    fn ranges_are_respected_and_flip_is_balanced() {
        let c = TtaConfig::default();
        let t = quasi_random_transforms(&c);
        for a in &t {
            assert!((-8.0..8.0).contains(&a.shift_x) && (-8.0..8.0).contains(&a.shift_y));
            assert!((0.0..360.0).contains(&a.rotation_deg));
            assert!((-10.0..10.0).contains(&a.shear_deg));
            assert!(a.zoom >= 1.0 / 1.4 - 1e-12 && a.zoom <= 1.4 + 1e-12);
            assert!(a.stretch >= 1.0 / 1.2 - 1e-12 && a.stretch <= 1.2 + 1e-12);
        }
        let flips = t.iter().filter(|a| a.flip).count();
        assert!((30..=40).contains(&flips), "{flips}");
    }

    #[test]
    fn disabling_flip_and_stretch_leaves_the_other_dimensions_alone() {
        let on = quasi_random_transforms(&TtaConfig::default());
        let off = quasi_random_transforms(&TtaConfig {
            flip: false,
            stretch: 1.0,
            ..TtaConfig::default()
        });
        for (a, b) in on.iter().zip(&off) {
            assert!(!b.flip);
            assert_eq!(b.stretch, 1.0);
            assert_eq!(
                (a.shift_x, a.shift_y, a.rotation_deg, a.shear_deg, a.zoom),
                (b.shift_x, b.shift_y, b.rotation_deg, b.shear_deg, b.zoom)
            );
        }
    }

    #[test]
    fn fewer_transforms_are_a_prefix() {
        let long = quasi_random_transforms(&TtaConfig::default());
        let short = quasi_random_transforms(&TtaConfig {
            transforms: 35,
            ..TtaConfig::default()
        });
        assert_eq!(&long[..35], &short[..]);
    }
}
