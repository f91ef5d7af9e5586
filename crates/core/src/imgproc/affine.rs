//! Affine maps and the reference's patch geometry (SPEC.md "Rescale + augmentation").
//!
//! Coordinates are (x = column, y = row) with pixel centres at integers. Every matrix maps
//! OUTPUT coordinates to SOURCE coordinates, and `a.then(b)` means "apply a, then b" (= b·a), the
//! same convention as scikit-image's `tform_a + tform_b` that the reference composed with.

/// A 2D affine map `(x, y) -> (a x + b y + c, d x + e y + f)` stored as `[[a, b, c], [d, e, f]]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Affine {
    pub m: [[f64; 3]; 2],
}

impl Affine {
    pub const IDENTITY: Affine = Affine {
        m: [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
    };

    pub fn translate(tx: f64, ty: f64) -> Self {
        Affine {
            m: [[1.0, 0.0, tx], [0.0, 1.0, ty]],
        }
    }

    pub fn scale(sx: f64, sy: f64) -> Self {
        Affine {
            m: [[sx, 0.0, 0.0], [0.0, sy, 0.0]],
        }
    }

    /// The classic scikit-image `AffineTransform(scale, rotation, shear, translation)` matrix
    /// (angles in radians): `[[sx cos r, -sy sin(r+s), tx], [sx sin r, sy cos(r+s), ty]]`.
    pub fn skimage(sx: f64, sy: f64, rotation: f64, shear: f64, tx: f64, ty: f64) -> Self {
        Affine {
            m: [
                [sx * rotation.cos(), -sy * (rotation + shear).sin(), tx],
                [sx * rotation.sin(), sy * (rotation + shear).cos(), ty],
            ],
        }
    }

    /// Matrix product `self · other` (apply `other` first).
    pub fn mul(&self, o: &Affine) -> Affine {
        let a = &self.m;
        let b = &o.m;
        Affine {
            m: [
                [
                    a[0][0] * b[0][0] + a[0][1] * b[1][0],
                    a[0][0] * b[0][1] + a[0][1] * b[1][1],
                    a[0][0] * b[0][2] + a[0][1] * b[1][2] + a[0][2],
                ],
                [
                    a[1][0] * b[0][0] + a[1][1] * b[1][0],
                    a[1][0] * b[0][1] + a[1][1] * b[1][1],
                    a[1][0] * b[0][2] + a[1][1] * b[1][2] + a[1][2],
                ],
            ],
        }
    }

    /// Apply `self`, then `next`.
    pub fn then(&self, next: &Affine) -> Affine {
        next.mul(self)
    }

    #[inline]
    pub fn apply(&self, x: f64, y: f64) -> (f64, f64) {
        let m = &self.m;
        (
            m[0][0] * x + m[0][1] * y + m[0][2],
            m[1][0] * x + m[1][1] * y + m[1][2],
        )
    }
}

/// The six augmentation parameters of one sample (degrees and pixels, as in the reference).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Augmentation {
    pub rotation_deg: f64,
    pub shift_x: f64,
    pub shift_y: f64,
    /// Isotropic zoom (> 1 enlarges the organism).
    pub zoom: f64,
    /// Anisotropic stretch: zoom_x = zoom * stretch, zoom_y = zoom / stretch.
    pub stretch: f64,
    pub shear_deg: f64,
    pub flip: bool,
}

/// The ranges augmentations are drawn from: training's `[augment]` (random) and test time's
/// `[tta]` (quasi-random) share them, and their checks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AugmentationRanges {
    /// Degrees, and source pixels per axis (uniform).
    pub rotation: [f64; 2],
    pub translation: [f64; 2],
    /// Log-uniform; > 1 enlarges the organism.
    pub zoom: [f64; 2],
    /// The stretch is log-uniform in [1/stretch, stretch]; 1 = none.
    pub stretch: f64,
    /// Degrees (uniform).
    pub shear: [f64; 2],
}

impl AugmentationRanges {
    /// Finite ranges with low <= high, zoom > 0, stretch >= 1. The message names the key as
    /// `<section>.<key>` (section: the config table, "augment" or "tta").
    pub fn validate(&self, section: &str) -> Result<(), String> {
        for (key, [lo, hi]) in [
            ("rotation", self.rotation),
            ("translation", self.translation),
            ("shear", self.shear),
            ("zoom", self.zoom),
        ] {
            if !lo.is_finite() || !hi.is_finite() || lo > hi {
                return Err(format!(
                    "{section}.{key}: range [{lo}, {hi}] must be finite with low <= high"
                ));
            }
        }
        if self.zoom[0] <= 0.0 {
            return Err(format!(
                "{section}.zoom: must be > 0, got [{}, {}]",
                self.zoom[0], self.zoom[1]
            ));
        }
        if !self.stretch.is_finite() || self.stretch < 1.0 {
            return Err(format!(
                "{section}.stretch: must be finite and >= 1 (1 = no stretch), got {}",
                self.stretch
            ));
        }
        Ok(())
    }
}

impl Default for Augmentation {
    fn default() -> Self {
        Self::IDENTITY
    }
}

impl Augmentation {
    pub const IDENTITY: Augmentation = Augmentation {
        rotation_deg: 0.0,
        shift_x: 0.0,
        shift_y: 0.0,
        zoom: 1.0,
        stretch: 1.0,
        shear_deg: 0.0,
        flip: false,
    };

    /// The matrix A of SPEC.md (before centring). A flip is shear + 180 deg together with
    /// rotation + 180 deg, exactly as the reference expressed it.
    pub fn matrix(&self) -> Affine {
        let (mut rot, mut shear) = (self.rotation_deg, self.shear_deg);
        if self.flip {
            rot += 180.0;
            shear += 180.0;
        }
        let zoom_x = self.zoom * self.stretch;
        let zoom_y = self.zoom / self.stretch;
        Affine::skimage(
            1.0 / zoom_x,
            1.0 / zoom_y,
            rot.to_radians(),
            shear.to_radians(),
            self.shift_x,
            self.shift_y,
        )
    }
}

/// Full output->source map for one patch: M = G·R (SPEC.md).
///
/// `ds` is the downscale factor (source pixels per output pixel); the output centre lands on
/// the source centre, and the augmentation acts about the source centre
/// c = (cols/2 - 0.5, rows/2 - 0.5).
pub fn patch_transform(
    src_rows: usize,
    src_cols: usize,
    out_rows: usize,
    out_cols: usize,
    ds: f64,
    aug: &Augmentation,
) -> Affine {
    let (rows, cols) = (src_rows as f64, src_cols as f64);
    let rescale = Affine::translate(
        cols / (2.0 * ds) - out_cols as f64 / 2.0,
        rows / (2.0 * ds) - out_rows as f64 / 2.0,
    )
    .then(&Affine::scale(ds, ds));
    let (cx, cy) = (cols / 2.0 - 0.5, rows / 2.0 - 0.5);
    let augment = Affine::translate(-cx, -cy)
        .then(&aug.matrix())
        .then(&Affine::translate(cx, cy));
    rescale.then(&augment)
}

/// Downscale factor of the size-normalised mode: the largest side becomes `target` pixels.
pub fn size_normalised_ds(src_rows: usize, src_cols: usize, target: f64) -> f64 {
    src_rows.max(src_cols) as f64 / target
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked_with_their_section_named() {
        let ok = AugmentationRanges {
            rotation: [0.0, 360.0],
            translation: [-8.0, 8.0],
            zoom: [0.7, 1.4],
            stretch: 1.2,
            shear: [-10.0, 10.0],
        };
        assert_eq!(ok.validate("augment"), Ok(()));
        let check = |f: fn(&mut AugmentationRanges), section: &str, key: &str| {
            let mut r = ok;
            f(&mut r);
            let e = r.validate(section).unwrap_err();
            assert!(e.starts_with(&format!("{section}.{key}: ")), "{e}");
        };
        check(|r| r.rotation = [10.0, 0.0], "augment", "rotation");
        check(|r| r.translation = [f64::NAN, 1.0], "tta", "translation");
        check(|r| r.shear = [0.0, f64::INFINITY], "augment", "shear");
        check(|r| r.zoom = [0.0, 1.4], "tta", "zoom");
        check(|r| r.stretch = 0.9, "augment", "stretch");
        check(|r| r.stretch = f64::NAN, "tta", "stretch");
    }

    fn close(a: &Affine, b: &Affine) -> bool {
        a.m.iter()
            .flatten()
            .zip(b.m.iter().flatten())
            .all(|(x, y)| (x - y).abs() < 1e-12)
    }

    #[test]
    fn identity_augmentation_is_identity_matrix() {
        assert!(close(&Augmentation::IDENTITY.matrix(), &Affine::IDENTITY));
    }

    #[test]
    fn composition_order_is_apply_first_then_second() {
        let t = Affine::translate(3.0, 0.0).then(&Affine::scale(2.0, 2.0));
        assert_eq!(t.apply(1.0, 1.0), (8.0, 2.0));
    }

    #[test]
    fn flip_mirrors_about_the_vertical_axis() {
        let flip = Augmentation {
            flip: true,
            ..Augmentation::IDENTITY
        }
        .matrix();
        let (x, y) = flip.apply(2.0, 5.0);
        assert!(
            (x + 2.0).abs() < 1e-12 && (y - 5.0).abs() < 1e-12,
            "{x} {y}"
        );
    }

    #[test]
    fn output_centre_maps_near_source_centre_without_augmentation() {
        // Reference half-pixel convention: output coordinate tw/2 lands on source cols/2.
        let m = patch_transform(170, 120, 95, 95, 2.0, &Augmentation::IDENTITY);
        let (x, y) = m.apply(47.5, 47.5);
        assert!(
            (x - 60.0).abs() < 1e-9 && (y - 85.0).abs() < 1e-9,
            "{x} {y}"
        );
    }

    #[test]
    fn rotation_is_about_the_source_centre() {
        let aug = Augmentation {
            rotation_deg: 90.0,
            ..Augmentation::IDENTITY
        };
        let m = patch_transform(50, 50, 50, 50, 1.0, &aug);
        let c = (24.5, 24.5);
        let (x, y) = m.apply(c.0, c.1);
        assert!((x - c.0).abs() < 1e-9 && (y - c.1).abs() < 1e-9);
    }
}
