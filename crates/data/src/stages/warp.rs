//! Warp stage: one decoded image -> one patch per configured input, with the sample's
//! augmentation drawn from its own random stream.

use image::GrayImage;

use crate::config::{AugmentConfig, Fill, PatchConfig};
use plankton_core::imgproc::{patch_transform, warp_inverted, Augmentation, GrayView};
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
    let m = patch_transform(
        rows,
        cols,
        patch.rows,
        patch.cols,
        patch.ds(rows, cols),
        aug,
    );
    let fill = match patch.fill {
        Fill::Zero => 0.0,
        Fill::BorderMedian => src.border_median_inverted(),
    };
    warp_inverted(&src, &m, out, patch.rows, patch.cols, fill);
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

    #[test]
    fn disabled_augmentation_is_identity() {
        let cfg = AugmentConfig {
            enabled: false,
            ..Default::default()
        };
        assert_eq!(augmentation_for(&cfg, 1, 2, 3), Augmentation::IDENTITY);
    }
}
