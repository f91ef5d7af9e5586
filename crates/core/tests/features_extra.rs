//! Golden tests: our Zernike moments, local binary patterns and parameter-free threshold
//! adjacency statistics against mahotas 1.4.19, called as benanne/kaggle-ndsb
//! `extract_features.py` did on the raw uint8 image:
//!
//! * `mahotas.features.zernike_moments(img, radius=20, degree=8)`
//!   (tests/fixtures/features/zernike/gen_zernike_fixtures.py);
//! * `mahotas.features.lbp(img, radius=20, points=7, ignore_zeros=False)`
//!   (tests/fixtures/features/lbp/gen_lbp_fixtures.py);
//! * `mahotas.features.pftas(img)` (tests/fixtures/features/tas/gen_tas_fixtures.py);
//!
//! each on the real plankton images (their Pillow pixels, tests/fixtures/warp/<stem>.src.npy,
//! since our JPEG decoder is not bit-identical to libjpeg-turbo) and on synthetic edge cases
//! (blank, white and constant images, images smaller than the radius, a single pixel, empty
//! images, ...).
//!
//! Tolerances: Zernike `|ours - mahotas| <= 1e-12 + 1e-10 |mahotas|` (the absolute floor is for
//! moments that vanish by symmetry and come out as ~1e-17 rounding noise in both; values are
//! O(0.01..3)). LBP: exactly equal (integer counts). PFTAS: exactly equal, and its thresholds
//! (Otsu's T, the standard deviation and mu) bit-identical.

use std::path::{Path, PathBuf};

use plankton_core::decode::{decode_file, DecodeLimits};
use plankton_core::features::lbp::{
    axis_map, lbp, lbp_raw, sample_shifts, try_lbp_raw, CODES, LBP_NAMES, POINTS,
};
use plankton_core::features::tas::{pftas, pftas_raw, thresholds, try_pftas_raw, MASKS, TAS_NAMES};
use plankton_core::features::zernike::{
    center_of_mass, zernike, zernike_raw, DEGREE, ORDERS, RADIUS, ZERNIKE_NAMES,
};
use plankton_core::npy;

fn fixture_dir(kernel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/features")
        .join(kernel)
}

fn expected(kernel: &str) -> serde_json::Value {
    let path = fixture_dir(kernel).join("expected.json");
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// The case's uint8 pixels (row-major), rows, cols.
fn pixels(kernel: &str, case: &serde_json::Value) -> (Vec<u8>, usize, usize) {
    let rows = case["rows"].as_u64().unwrap() as usize;
    let cols = case["cols"].as_u64().unwrap() as usize;
    let px: Vec<u8> = if let Some(file) = case["pixels"].as_str() {
        let a = npy::read(&fixture_dir(kernel).join(file)).unwrap();
        assert_eq!(a.dtype, "|u1", "{file}");
        assert_eq!(a.shape, vec![rows, cols], "{file}");
        a.data.iter().map(|&v| v as u8).collect()
    } else {
        case["inline"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| row.as_array().unwrap().iter())
            .map(|v| v.as_u64().unwrap() as u8)
            .collect()
    };
    assert_eq!(px.len(), rows * cols);
    (px, rows, cols)
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().expect("mahotas gave a finite value"))
        .collect()
}

/// Asserts `|got - want| <= atol + rtol |want|` elementwise; returns the worst relative
/// difference over the values above `atol`.
fn assert_close(
    what: &str,
    names: &[&str],
    got: &[f64],
    want: &[f64],
    rtol: f64,
    atol: f64,
) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}");
    let mut worst = 0.0f64;
    for (k, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        assert!(
            err <= atol + rtol * w.abs(),
            "{what} {}: ours {g:e} vs mahotas {w:e} (|diff| {err:e})",
            names[k]
        );
        if w.abs() > atol {
            worst = worst.max(err / w.abs());
        }
    }
    worst
}

/// The real images decoded by our own decoder, with their fixture case.
fn decoded_real_cases(kernel: &str) -> Vec<(String, image::GrayImage, serde_json::Value)> {
    let images = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/images");
    let exp = expected(kernel);
    exp["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["pixels"].is_string())
        .map(|case| {
            let name = case["name"].as_str().unwrap().to_string();
            let img = decode_file(
                &images.join(format!("{name}.jpg")),
                &DecodeLimits::default(),
            )
            .unwrap();
            (name, img, case.clone())
        })
        .collect()
}

const ZERNIKE_RTOL: f64 = 1e-10;
const ZERNIKE_ATOL: f64 = 1e-12;

#[test]
fn zernike_matches_mahotas_on_real_and_synthetic_images() {
    let exp = expected("zernike");
    assert_eq!(exp["radius"].as_f64().unwrap(), RADIUS);
    assert_eq!(exp["degree"].as_u64().unwrap() as usize, DEGREE);
    let orders: Vec<(usize, usize)> = exp["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o[0].as_u64().unwrap() as usize,
                o[1].as_u64().unwrap() as usize,
            )
        })
        .collect();
    assert_eq!(orders, ORDERS);
    let cases = exp["cases"].as_array().unwrap();
    assert!(cases.iter().filter(|c| c["pixels"].is_string()).count() >= 8);
    let mut worst_all = 0.0f64;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let (px, rows, cols) = pixels("zernike", case);
        // The centre of mass is the same to the last bit (exact sums, one division).
        let cm = center_of_mass(&px, rows, cols);
        match case["center_of_mass_bits"].as_array() {
            None => assert_eq!(cm, None, "{name}"),
            Some(want) => assert_eq!(
                cm.map(|(r, c)| [r.to_bits(), c.to_bits()]),
                Some([want[0].as_u64().unwrap(), want[1].as_u64().unwrap()]),
                "{name}"
            ),
        }
        let got = zernike_raw(&px, rows, cols);
        let want = floats(&case["features"]);
        let worst = assert_close(
            name,
            &ZERNIKE_NAMES,
            &got,
            &want,
            ZERNIKE_RTOL,
            ZERNIKE_ATOL,
        );
        worst_all = worst_all.max(worst);
        eprintln!("zernike {name:28} {rows:3}x{cols:<3} worst relative diff {worst:.2e}");
        if case["pixels_in_circle"].as_u64().unwrap() == 0 {
            assert_eq!(
                got, [0.0; 25],
                "{name}: mahotas keeps no pixel and returns zeros"
            );
        }
        if let Some(img) = image::GrayImage::from_raw(cols as u32, rows as u32, px) {
            assert_eq!(zernike(&img), got, "{name}");
        }
    }
    eprintln!("zernike: worst relative diff over all cases {worst_all:.2e}");
}

#[test]
fn zernike_on_our_decode_is_finite_and_close() {
    // Our decoder differs from Pillow by at most 2 grey levels per pixel: not golden, but the
    // moments must stay finite and close (|Z| are weighted means over ~1,260 pixels).
    for (name, img, case) in decoded_real_cases("zernike") {
        let got = zernike(&img);
        assert!(got.iter().all(|v| v.is_finite()), "{name}");
        let want = floats(&case["features"]);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs())
            .fold(0.0f64, f64::max);
        eprintln!("zernike {name:28} our decode: worst |diff| {worst:.2e}");
        assert!(worst < 5e-3, "{name}: {worst}");
    }
}

#[test]
fn lbp_sampling_positions_are_mahotas_ones() {
    let exp = expected("lbp");
    assert_eq!(
        exp["radius"].as_f64().unwrap(),
        plankton_core::features::lbp::RADIUS
    );
    assert_eq!(exp["points"].as_u64().unwrap() as usize, POINTS);
    let codes: Vec<u8> = exp["codes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u8)
        .collect();
    assert_eq!(codes, CODES);
    assert_eq!(exp["names"].as_array().unwrap().len(), LBP_NAMES.len());
    let theirs: Vec<(f64, f64)> = exp["shifts_bits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                f64::from_bits(p[0].as_u64().unwrap()),
                f64::from_bits(p[1].as_u64().unwrap()),
            )
        })
        .collect();
    for (k, (ours, theirs)) in sample_shifts().iter().zip(&theirs).enumerate() {
        // numpy's sin/cos may differ from libm's in the last bit; what matters is that the
        // pixel read is the same, for every position along axes up to 1000 pixels.
        assert!(
            (ours.0 - theirs.0).abs() <= 1e-13 && (ours.1 - theirs.1).abs() <= 1e-13,
            "angle {k}: {ours:?} vs numpy {theirs:?}"
        );
        for len in [1, 2, 19, 20, 21, 40, 41, 1000] {
            assert_eq!(
                axis_map(len, ours.0),
                axis_map(len, theirs.0),
                "angle {k} rows {len}"
            );
            assert_eq!(
                axis_map(len, ours.1),
                axis_map(len, theirs.1),
                "angle {k} cols {len}"
            );
        }
        if ours != theirs {
            eprintln!("lbp angle {k}: shifts differ from numpy's in the last bits (same pixels)");
        }
    }
}

#[test]
fn lbp_matches_mahotas_exactly_on_real_and_synthetic_images() {
    let exp = expected("lbp");
    let cases = exp["cases"].as_array().unwrap();
    assert!(cases.iter().filter(|c| c["pixels"].is_string()).count() >= 8);
    let mut compared = 0;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let (px, rows, cols) = pixels("lbp", case);
        let got = lbp_raw(&px, rows, cols);
        if case["features"].is_null() {
            assert!(
                case["error"].as_str().unwrap().starts_with("ValueError"),
                "{name}"
            );
            assert!(try_lbp_raw(&px, rows, cols).is_none(), "{name}");
            assert!(got.iter().all(|v| v.is_nan()), "{name}");
            continue;
        }
        let want = floats(&case["features"]);
        assert_close(name, &LBP_NAMES, &got, &want, 0.0, 0.0);
        assert_eq!(got.iter().sum::<f64>(), (rows * cols) as f64, "{name}");
        let img = image::GrayImage::from_raw(cols as u32, rows as u32, px).unwrap();
        assert_eq!(lbp(&img), got, "{name}");
        compared += 1;
    }
    assert!(compared >= 21, "{compared}");
}

#[test]
fn lbp_on_our_decode_is_close() {
    // A 1-2 grey-level decode difference flips a comparison only where neighbour and centre
    // are nearly equal (observed: at most 0.09% of the pixels change bin).
    for (name, img, case) in decoded_real_cases("lbp") {
        let got = lbp(&img);
        let want = floats(&case["features"]);
        let moved: f64 = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs())
            .sum::<f64>()
            / 2.0;
        let share = moved / (img.width() * img.height()) as f64;
        eprintln!("lbp {name:28} our decode: {share:.4} of the pixels change bin");
        assert!(share < 0.01, "{name}: {share}");
    }
}

#[test]
fn pftas_matches_mahotas_exactly_on_real_and_synthetic_images() {
    let exp = expected("tas");
    let masks: Vec<&str> = exp["masks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    assert_eq!(masks, MASKS);
    let cases = exp["cases"].as_array().unwrap();
    assert!(cases.iter().filter(|c| c["pixels"].is_string()).count() >= 8);
    let mut compared = 0;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let (px, rows, cols) = pixels("tas", case);
        let got = pftas_raw(&px, rows, cols);
        if case["features"].is_null() {
            assert!(
                case["error"].as_str().unwrap().starts_with("ValueError"),
                "{name}"
            );
            assert!(try_pftas_raw(&px, rows, cols).is_none(), "{name}");
            assert!(got.iter().all(|v| v.is_nan()), "{name}");
            continue;
        }
        let th = thresholds(&px);
        assert_eq!(
            th.otsu as u64,
            case["otsu"].as_u64().unwrap(),
            "{name} otsu"
        );
        assert_eq!(
            th.above,
            case["above_otsu"].as_u64().unwrap(),
            "{name} above"
        );
        assert_eq!(
            th.std.to_bits(),
            case["std_bits"].as_u64().unwrap(),
            "{name} std {}",
            th.std
        );
        assert_eq!(
            th.mu.to_bits(),
            case["mu_bits"].as_u64().unwrap(),
            "{name} mu {}",
            th.mu
        );
        let want: Vec<f64> = case["features_bits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| f64::from_bits(b.as_u64().unwrap()))
            .collect();
        assert_close(name, &TAS_NAMES, &got, &want, 0.0, 0.0);
        let img = image::GrayImage::from_raw(cols as u32, rows as u32, px).unwrap();
        assert_eq!(pftas(&img), got, "{name}");
        compared += 1;
    }
    assert!(compared >= 22, "{compared}");
}

#[test]
fn pftas_on_our_decode_is_close() {
    // The masks depend on thresholds that move with the decode (1-2 grey levels): not golden,
    // but the shares must stay finite and close (observed: at most 0.004 apart).
    for (name, img, case) in decoded_real_cases("tas") {
        let got = pftas(&img);
        assert!(got.iter().all(|v| v.is_finite()), "{name}");
        let want = floats(&case["features"]);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs())
            .fold(0.0f64, f64::max);
        eprintln!("pftas {name:28} our decode: worst |diff| {worst:.4}");
        assert!(worst < 0.02, "{name}: {worst}");
    }
}
