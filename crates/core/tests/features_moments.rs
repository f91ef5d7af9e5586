//! Golden test of crates/core/src/features/moments.rs against an independent NumPy / scikit-image
//! computation on the real plankton fixture images
//! (tests/fixtures/features/moments/gen_moments_fixtures.py; versions in expected.json).
//!
//! The kernels run on the exact pixels the oracle used (Pillow/libjpeg-turbo decode, stored as
//! tests/fixtures/warp/<stem>.src.npy; the generator asserts scikit-image's imread gives the
//! same), because our JPEG decoder is not bit-exact (crates/core/tests/decode_golden.rs). Tolerances:
//! raw moments 1e-12 relative; the 7 moment-info values 1e-9 relative (plus 1e-12 absolute
//! for values near 0); Hu moments 1e-9 relative plus an absolute floor of 1e-12 x hu1^k for
//! the k-th order products of normalised moments they are built from, because hu5..hu7 can be
//! cancellation residues (~1e-15) whose relative error means little (observed: at most ~5e-11
//! relative, so the floor is a safety margin, not what makes the test pass).
//! A second, loose check runs the features on our own decoder's pixels.

use std::path::Path;

use image::GrayImage;
use plankton_core::decode::{decode_file, DecodeLimits};
use plankton_core::features::moments::{
    hu_moments, inverted_values, moment_info, raw_moments, HU_NAMES, MOMENT_INFO_NAMES,
};
use plankton_core::npy;

fn fixture() -> (std::path::PathBuf, serde_json::Value) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/features/moments");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
    (dir, json)
}

fn f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn load_pixels(dir: &Path, info: &serde_json::Value) -> GrayImage {
    let stem = info["stem"].as_str().unwrap();
    let arr = npy::read(&dir.join(info["pixels"].as_str().unwrap())).unwrap();
    let (rows, cols) = (
        info["rows"].as_u64().unwrap() as usize,
        info["cols"].as_u64().unwrap() as usize,
    );
    assert_eq!(arr.dtype, "|u1", "{stem}");
    assert_eq!(arr.shape, vec![rows, cols], "{stem}");
    let sum: f64 = arr.data.iter().sum();
    assert_eq!(
        sum,
        info["pixel_sum"].as_f64().unwrap(),
        "{stem}: pixels changed"
    );
    let raw: Vec<u8> = arr.data.iter().map(|&v| v as u8).collect();
    GrayImage::from_raw(cols as u32, rows as u32, raw).unwrap()
}

#[test]
fn moments_match_numpy_skimage_on_real_images() {
    let (dir, json) = fixture();
    let images = json["images"].as_array().unwrap();
    assert!(images.len() >= 8);
    for info in images {
        let stem = info["stem"].as_str().unwrap();
        let img = load_pixels(&dir, info);
        let (rows, cols) = (img.height() as usize, img.width() as usize);

        let m = raw_moments(&inverted_values(&img), rows, cols);
        let want_m: Vec<Vec<f64>> = info["raw_moments"]
            .as_array()
            .unwrap()
            .iter()
            .map(f64s)
            .collect();
        for p in 0..4 {
            for q in 0..4 {
                let (a, b) = (m[p][q], want_m[p][q]);
                assert!(
                    (a - b).abs() <= 1e-12 * b.abs(),
                    "{stem}: m[{p}][{q}] {a} vs {b}"
                );
            }
        }

        let got = moment_info(&img);
        let want = f64s(&info["moment_info"]);
        let mut worst = 0.0f64;
        for i in 0..7 {
            let (a, b) = (got[i], want[i]);
            let err = (a - b).abs();
            worst = worst.max(err / b.abs().max(1e-300));
            assert!(
                err <= 1e-9 * b.abs() + 1e-12,
                "{stem}: {} {a} vs {b}",
                MOMENT_INFO_NAMES[i]
            );
        }

        let hu = hu_moments(&img);
        let want_hu = f64s(&info["hu"]);
        let scale = want_hu[0].abs();
        let mut worst_hu = 0.0f64;
        for i in 0..7 {
            // Orders of the nu products: hu1 1, hu2 2, hu3/hu4 2 (third-order nu are smaller),
            // hu5/hu7 4, hu6 3 -- bound them by powers of hu1 as an absolute floor.
            let order = [1, 2, 2, 2, 4, 3, 4][i];
            let floor = 1e-12 * scale.powi(order);
            let (a, b) = (hu[i], want_hu[i]);
            let err = (a - b).abs();
            worst_hu = worst_hu.max(err / b.abs().max(1e-300));
            assert!(
                err <= 1e-9 * b.abs() + floor,
                "{stem}: {} {a:e} vs {b:e} (|diff| {err:e})",
                HU_NAMES[i]
            );
        }
        eprintln!("{stem}: worst relative diff info {worst:.1e}, hu {worst_hu:.1e}");
    }
}

#[test]
fn features_on_our_own_decoder_are_close() {
    // Our decoder differs from libjpeg-turbo by at most a couple of grey levels; the moment
    // features are sums over all pixels, so they move very little.
    let (dir, json) = fixture();
    for info in json["images"].as_array().unwrap() {
        let stem = info["stem"].as_str().unwrap();
        let img = decode_file(
            &dir.join(info["jpeg"].as_str().unwrap()),
            &DecodeLimits::default(),
        )
        .unwrap();
        let want = f64s(&info["moment_info"]);
        let got = moment_info(&img);
        assert_eq!((got[2], got[3]), (want[2], want[3]), "{stem}");
        // Offsets and axes in pixels, orientation in degrees.
        for i in [0, 1, 5, 6] {
            assert!(
                (got[i] - want[i]).abs() <= 0.05 + 0.01 * want[i].abs(),
                "{stem}: {} {} vs {}",
                MOMENT_INFO_NAMES[i],
                got[i],
                want[i]
            );
        }
        assert!(
            (got[4] - want[4]).abs() <= 1.0,
            "{stem}: orientation {got:?} vs {want:?}"
        );
        let hu = hu_moments(&img);
        let want_hu = f64s(&info["hu"]);
        assert!(
            (hu[0] - want_hu[0]).abs() <= 0.01 * want_hu[0],
            "{stem}: hu1 {} vs {}",
            hu[0],
            want_hu[0]
        );
        eprintln!("{stem}: own decoder info {got:?}");
    }
}
