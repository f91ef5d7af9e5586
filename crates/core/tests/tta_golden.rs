//! Quasi-random TTA transforms against an independent oracle: scipy's unscrambled Halton
//! sequence, a numpy reimplementation of the reference's `build_quasirandom_transforms`
//! mapping, and the classic scikit-image affine matrix (fixtures made by
//! tests/fixtures/tta/gen_tta_fixtures.py).
// Index loops mirror the formulas (and name the failing element), so they stay.
#![allow(clippy::needless_range_loop)]

use std::path::{Path, PathBuf};

use plankton_core::halton::{self, Halton, PRIMES};
use plankton_core::tta::{quasi_random_transforms, TtaConfig};
use serde_json::Value;

fn fixture() -> Value {
    let path: PathBuf =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tta/halton_tta.json");
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

fn cases() -> Vec<Value> {
    let doc = fixture();
    let cases = doc["cases"].as_array().unwrap().clone();
    assert_eq!(cases.len(), 2, "fixture set changed");
    cases
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn config(case: &Value) -> TtaConfig {
    let cfg: TtaConfig = serde_json::from_value(case["config"].clone()).unwrap();
    cfg.validate().unwrap();
    cfg
}

#[test]
fn fixture_records_its_versions() {
    let doc = fixture();
    for k in ["python", "numpy", "scipy", "scikit-image"] {
        assert!(doc["versions"][k].is_string(), "missing version of {k}");
    }
}

#[test]
fn first_point_is_reciprocal_primes() {
    let first = Halton::new(7).next_point();
    let want = [
        1.0 / 2.0,
        1.0 / 3.0,
        1.0 / 5.0,
        1.0 / 7.0,
        1.0 / 11.0,
        1.0 / 13.0,
        1.0 / 17.0,
    ];
    assert_eq!(first, want.to_vec());
    assert_eq!(PRIMES, [2, 3, 5, 7, 11, 13, 17]);
}

#[test]
fn halton_points_match_scipy() {
    for case in cases() {
        let want = case["points"].as_array().unwrap();
        let bits = case["points_bits"].as_array().unwrap();
        assert_eq!(want.len(), bits.len());
        let got = halton::points(7, want.len());
        for (k, ((g, w), b)) in got.iter().zip(want).zip(bits).enumerate() {
            let (w, b) = (w.as_array().unwrap(), b.as_array().unwrap());
            assert_eq!((w.len(), b.len()), (7, 7));
            for d in 0..7 {
                let wv = f(&w[d]);
                assert!(
                    (g[d] - wv).abs() <= 1e-15,
                    "point {k} dim {d}: {} vs scipy {wv}",
                    g[d]
                );
                // The digit-reversal sum is accumulated in the same order as scipy's, so the
                // values are bit-identical (compared via the bit patterns: serde_json's default
                // decimal parser may be one ulp off).
                let exact = f64::from_bits(b[d].as_u64().unwrap());
                assert_eq!(
                    g[d].to_bits(),
                    exact.to_bits(),
                    "point {k} dim {d}: {} vs {exact}",
                    g[d]
                );
            }
        }
    }
}

#[test]
fn transform_parameters_match_the_reference_mapping() {
    for case in cases() {
        let name = case["name"].as_str().unwrap();
        let cfg = config(&case);
        let want = case["params"].as_array().unwrap();
        let got = quasi_random_transforms(&cfg);
        assert_eq!(got.len(), cfg.transforms, "{name}");
        assert_eq!(want.len(), cfg.transforms, "{name}");
        for (k, (a, p)) in got.iter().zip(want).enumerate() {
            let close = |g: f64, key: &str| {
                let w = f(&p[key]);
                assert!(
                    (g - w).abs() <= 1e-12,
                    "{name} #{k} {key}: {g} vs oracle {w}"
                );
            };
            close(a.shift_x, "shift_x");
            close(a.shift_y, "shift_y");
            close(a.rotation_deg, "rotation");
            close(a.shear_deg, "shear");
            close(a.zoom, "zoom");
            close(a.stretch, "stretch");
            close(a.zoom * a.stretch, "zoom_x");
            close(a.zoom / a.stretch, "zoom_y");
            assert_eq!(a.flip, p["flip"].as_bool().unwrap(), "{name} #{k} flip");
        }
        if !cfg.flip {
            assert!(got.iter().all(|a| !a.flip));
        }
        if cfg.stretch == 1.0 {
            assert!(got.iter().all(|a| a.stretch == 1.0));
        }
    }
}

#[test]
fn augmentation_matrices_match_scikit_image() {
    for case in cases() {
        let name = case["name"].as_str().unwrap();
        let cfg = config(&case);
        let want = case["matrices"].as_array().unwrap();
        let got = quasi_random_transforms(&cfg);
        assert_eq!(got.len(), want.len());
        for (k, (a, m)) in got.iter().zip(want).enumerate() {
            let m = m.as_array().unwrap();
            let g = a.matrix();
            for i in 0..2 {
                let row = m[i].as_array().unwrap();
                for j in 0..3 {
                    let w = f(&row[j]);
                    assert!(
                        (g.m[i][j] - w).abs() <= 1e-12,
                        "{name} #{k} M[{i}][{j}]: {} vs {w}",
                        g.m[i][j]
                    );
                }
            }
            let last: Vec<f64> = m[2].as_array().unwrap().iter().map(f).collect();
            assert_eq!(last, vec![0.0, 0.0, 1.0]);
        }
    }
}
