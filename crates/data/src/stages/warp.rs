//! Warp stage: one decoded image -> one patch per configured input, with the sample's
//! augmentation drawn from its own random stream.

use image::GrayImage;

use crate::config::{AugmentConfig, Fill, PatchConfig};
use plankton_core::imgproc::{
    area_resize, patch_transform, warp_inverted, Affine, Augmentation, GrayView,
};
use plankton_core::rng::{Purpose, Stream};

/// Draws one training augmentation, in the reference's order of draws.
pub fn sample_augmentation(cfg: &AugmentConfig, rng: &mut Stream) -> Augmentation {
    if !cfg.enabled {
        return Augmentation::IDENTITY;
    }
    let shift_x = rng.uniform(cfg.translation[0], cfg.translation[1]);
    let shift_y = rng.uniform(cfg.translation[0], cfg.translation[1]);
    let rotation_deg = rng.uniform(cfg.rotation[0], cfg.rotation[1]);
    let shear_deg = rng.uniform(cfg.shear[0], cfg.shear[1]);
    let flip = cfg.flip && rng.bernoulli(0.5);
    let zoom = rng.log_uniform(cfg.zoom[0], cfg.zoom[1]);
    let stretch = if cfg.stretch > 1.0 {
        rng.log_uniform(1.0 / cfg.stretch, cfg.stretch)
    } else {
        1.0
    };
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

/// The augmentation of sample `index` in `epoch`: a pure function of (seed, epoch, index), so
/// it does not depend on worker count or scheduling.
pub fn augmentation_for(cfg: &AugmentConfig, seed: u64, epoch: u64, index: u64) -> Augmentation {
    sample_augmentation(cfg, &mut Stream::new(seed, Purpose::Augment, epoch, index))
}

/// Cuts one patch of `patch` geometry out of `img` (before ZMUV).
pub fn make_patch(img: &GrayImage, patch: &PatchConfig, aug: &Augmentation, out: &mut [f32]) {
    let (cols, rows) = (img.width() as usize, img.height() as usize);
    let src = GrayView::new(img.as_raw(), rows, cols);
    let ds = patch.ds(rows, cols);
    let m = patch_transform(rows, cols, patch.rows, patch.cols, ds, aug);
    let fill = match patch.fill {
        Fill::Zero => 0.0,
        Fill::BorderMedian => src.border_median_inverted(),
    };
    let shrink = if patch.antialias {
        antialias_factor(ds, aug)
    } else {
        None
    };
    match shrink {
        None => warp_inverted(&src, &m, out, patch.rows, patch.cols, fill),
        Some(f) => {
            let small = area_resize(
                img,
                (cols as f64 / f).round() as u32,
                (rows as f64 / f).round() as u32,
            );
            let (fx, fy) = (
                cols as f64 / small.width() as f64,
                rows as f64 / small.height() as f64,
            );
            // Pixel centres of the original in the shrunk image's coordinates.
            let to_small = Affine::translate(0.5, 0.5)
                .then(&Affine::scale(1.0 / fx, 1.0 / fy))
                .then(&Affine::translate(-0.5, -0.5));
            let view = GrayView::new(
                small.as_raw(),
                small.height() as usize,
                small.width() as usize,
            );
            warp_inverted(&view, &m.then(&to_small), out, patch.rows, patch.cols, fill);
        }
    }
}

/// How much to shrink the source before the warp (`antialias`): so that the warp's finest
/// step is about one pixel of the shrunk image; `None` when the step is already under 1.5 source
/// pixels (bilinear sampling at that rate barely aliases, and the reference path stays exact).
fn antialias_factor(ds: f64, aug: &Augmentation) -> Option<f64> {
    let magnification = aug.zoom * aug.stretch.max(1.0 / aug.stretch);
    let finest_step = ds / magnification;
    (finest_step >= 1.5).then_some(finest_step)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_stay_in_the_configured_ranges() {
        let cfg = AugmentConfig::default();
        let mut flips = 0;
        for i in 0..2000 {
            let a = augmentation_for(&cfg, 1, 0, i);
            assert!((0.0..360.0).contains(&a.rotation_deg));
            assert!((-10.0..10.0).contains(&a.shift_x) && (-10.0..10.0).contains(&a.shift_y));
            assert!(a.zoom >= 1.0 / 1.6 - 1e-12 && a.zoom <= 1.6 + 1e-12);
            assert!(a.stretch >= 1.0 / 1.3 - 1e-12 && a.stretch <= 1.3 + 1e-12);
            assert!((-20.0..20.0).contains(&a.shear_deg));
            flips += a.flip as usize;
        }
        assert!((850..1150).contains(&flips), "{flips}");
    }

    #[test]
    fn zoom_is_log_uniform() {
        let cfg = AugmentConfig::default();
        let above = (0..4000)
            .filter(|&i| augmentation_for(&cfg, 3, 1, i).zoom > 1.0)
            .count();
        assert!((1800..2200).contains(&above), "{above}");
    }

    fn stripes(size: u32) -> GrayImage {
        GrayImage::from_fn(size, size, |x, _| {
            image::Luma([if x % 2 == 0 { 0 } else { 255 }])
        })
    }

    fn patch_of(img: &GrayImage, antialias: bool, aug: &Augmentation) -> Vec<f32> {
        let patch = PatchConfig {
            antialias,
            ..PatchConfig::size_normalised(31, 31.0)
        };
        let mut out = vec![0f32; 31 * 31];
        make_patch(img, &patch, aug, &mut out);
        out
    }

    fn spread(v: &[f32]) -> f32 {
        let (lo, hi) = v
            .iter()
            .fold((f32::MAX, f32::MIN), |(l, h), &x| (l.min(x), h.max(x)));
        hi - lo
    }

    /// One-pixel stripes 20x smaller than a patch pixel: sampled directly they alias into
    /// stripes of full contrast (or any pattern), averaged they are the mean grey.
    #[test]
    fn antialias_turns_stripes_finer_than_a_patch_pixel_into_their_mean() {
        let img = stripes(620);
        let aug = Augmentation {
            rotation_deg: 17.0,
            ..Augmentation::IDENTITY
        };
        let aliased = patch_of(&img, false, &aug);
        let filtered = patch_of(&img, true, &aug);
        // The centre of the patch lies well inside the image whatever the rotation.
        let centre = |v: &[f32]| -> Vec<f32> {
            (10..21)
                .flat_map(|y| (10..21).map(move |x| v[y * 31 + x]))
                .collect()
        };
        assert!(spread(&centre(&aliased)) > 0.5, "{:?}", centre(&aliased));
        let c = centre(&filtered);
        assert!(spread(&c) < 0.05, "{c:?}");
        assert!(c.iter().all(|v| (v - 0.5).abs() < 0.03), "{c:?}");
    }

    /// A smooth image looks the same either way (up to the filter's blur): the shrunk image's coordinates line up with
    /// the original's. (A dark blob on white: the border matches the fill, so pixels straddling
    /// the edge do not count.)
    #[test]
    fn antialias_keeps_the_geometry_of_smooth_images() {
        let img = GrayImage::from_fn(600, 400, |x, y| {
            let (dx, dy) = (x as f64 - 300.0, y as f64 - 200.0);
            let blob = (-(dx * dx + dy * dy) / (2.0 * 50.0 * 50.0)).exp();
            image::Luma([(255.0 * (1.0 - blob)).round() as u8])
        });
        for aug in [
            Augmentation::IDENTITY,
            Augmentation {
                rotation_deg: 63.0,
                zoom: 1.3,
                stretch: 1.2,
                shear_deg: 8.0,
                shift_x: 3.0,
                ..Augmentation::IDENTITY
            },
        ] {
            let (a, b) = (patch_of(&img, false, &aug), patch_of(&img, true, &aug));
            // The area filter blurs by about one patch pixel (the peak drops a few percent), but
            // the blob's mass and centre stay put: a misaligned shrink would move the centre by
            // half a shrunk pixel (0.5 patch pixels).
            let moments = |v: &[f32]| {
                let mass: f64 = v.iter().map(|&p| p as f64).sum();
                let (mut cx, mut cy) = (0.0, 0.0);
                for (i, &p) in v.iter().enumerate() {
                    cx += (i % 31) as f64 * p as f64 / mass;
                    cy += (i / 31) as f64 * p as f64 / mass;
                }
                (mass, cx, cy)
            };
            let ((ma, xa, ya), (mb, xb, yb)) = (moments(&a), moments(&b));
            assert!((ma - mb).abs() < 0.01 * ma, "{aug:?}: mass {ma} vs {mb}");
            assert!(
                (xa - xb).abs() < 0.05 && (ya - yb).abs() < 0.05,
                "{aug:?}: centre ({xa}, {ya}) vs ({xb}, {yb})"
            );
            let worst = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(worst < 0.06, "{aug:?}: {worst}");
        }
    }

    /// Sources near the patch's scale take the reference path, bit for bit.
    #[test]
    fn antialias_leaves_small_sources_exact() {
        let img = stripes(40);
        let aug = Augmentation {
            rotation_deg: 30.0,
            ..Augmentation::IDENTITY
        };
        assert_eq!(patch_of(&img, false, &aug), patch_of(&img, true, &aug));
    }

    #[test]
    fn disabled_augmentation_is_identity() {
        let cfg = AugmentConfig {
            enabled: false,
            ..Default::default()
        };
        assert_eq!(augmentation_for(&cfg, 1, 2, 3), Augmentation::IDENTITY);
    }
}
