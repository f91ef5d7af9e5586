//! The warp against scikit-image's `warp(order=1, mode='constant', cval=0)` on real plankton
//! images (fixtures made by tests/fixtures/warp/gen_warp_fixtures.py), plus properties that
//! need no oracle: identity, exact 90-degree rotation, and agreement with a naive per-pixel
//! bilinear sampler on random inputs.

use std::path::{Path, PathBuf};

use plankton_core::imgproc::{patch_transform, warp_inverted, Affine, Augmentation, GrayView};
use plankton_core::npy;
use proptest::prelude::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/warp")
}

fn load_u8(path: &Path) -> (Vec<u8>, usize, usize) {
    let a = npy::read(path).unwrap();
    assert_eq!(a.dtype, "|u1", "{}", path.display());
    (
        a.data.iter().map(|&v| v as u8).collect(),
        a.shape[0],
        a.shape[1],
    )
}

#[test]
fn matches_scikit_image_on_real_plankton() {
    let cases: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(fixtures().join("cases.json")).unwrap()).unwrap();
    assert!(cases.len() >= 25, "fixture set shrank: {}", cases.len());
    let mut worst = (0.0f64, String::new());
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let f = |k: &str| case[k].as_f64().unwrap_or_else(|| panic!("{name}: {k}"));
        let u = |k: &str| case[k].as_u64().unwrap() as usize;
        let (src, rows, cols) = load_u8(&fixtures().join(case["source"].as_str().unwrap()));
        let aug = Augmentation {
            rotation_deg: f("rotation_deg"),
            shift_x: f("shift_x"),
            shift_y: f("shift_y"),
            zoom: f("zoom"),
            stretch: f("stretch"),
            shear_deg: f("shear_deg"),
            flip: case["flip"].as_bool().unwrap(),
        };
        let (out_rows, out_cols) = (u("out_rows"), u("out_cols"));
        let m = patch_transform(rows, cols, out_rows, out_cols, f("ds"), &aug);
        let want_m = &case["matrix"];
        for r in 0..2 {
            for c in 0..3 {
                let w = want_m[r][c].as_f64().unwrap();
                assert!(
                    (m.m[r][c] - w).abs() < 1e-9,
                    "{name}: matrix[{r}][{c}] {} vs {w}",
                    m.m[r][c]
                );
            }
        }
        let mut out = vec![f32::NAN; out_rows * out_cols];
        warp_inverted(
            &GrayView::new(&src, rows, cols),
            &m,
            &mut out,
            out_rows,
            out_cols,
            0.0,
        );
        let want = npy::read(&fixtures().join(case["expected"].as_str().unwrap())).unwrap();
        assert_eq!(want.shape, vec![out_rows, out_cols], "{name}");
        for (i, (&a, &b)) in out.iter().zip(&want.data).enumerate() {
            let d = (a as f64 - b).abs();
            assert!(
                d < 1e-5,
                "{name}: pixel ({}, {}) ours {a} skimage {b}",
                i / out_cols,
                i % out_cols
            );
            if d > worst.0 {
                worst = (d, name.to_string());
            }
        }
    }
    eprintln!("worst abs difference {:.2e} in {}", worst.0, worst.1);
}

#[test]
fn identity_transform_reproduces_the_inverted_image() {
    let (src, rows, cols) = load_u8(&fixtures().join("tripos_1.src.npy"));
    let m = patch_transform(rows, cols, rows, cols, 1.0, &Augmentation::IDENTITY);
    assert_eq!(m, Affine::IDENTITY);
    let mut out = vec![0.0; rows * cols];
    warp_inverted(
        &GrayView::new(&src, rows, cols),
        &m,
        &mut out,
        rows,
        cols,
        0.0,
    );
    for (o, &s) in out.iter().zip(&src) {
        assert!((o - (1.0 - s as f32 / 255.0)).abs() < 1e-6);
    }
}

/// numpy's rot90 (counter-clockwise): out[r][c] = in[c][W-1-r].
fn rot90(src: &[u8], n: usize) -> Vec<u8> {
    (0..n * n)
        .map(|i| src[(i % n) * n + (n - 1 - i / n)])
        .collect()
}

#[test]
fn rotation_by_90_degrees_is_exact_array_rotation() {
    let (src, rows, cols) = load_u8(&fixtures().join("ciliophora_1.src.npy"));
    let n = rows.min(cols);
    let square: Vec<u8> = (0..n * n).map(|i| src[(i / n) * cols + i % n]).collect();
    let mut expect = square.clone();
    for quarter in 1..=3 {
        expect = rot90(&expect, n);
        let aug = Augmentation {
            rotation_deg: 90.0 * quarter as f64,
            ..Augmentation::IDENTITY
        };
        let m = patch_transform(n, n, n, n, 1.0, &aug);
        let mut out = vec![0.0; n * n];
        warp_inverted(&GrayView::new(&square, n, n), &m, &mut out, n, n, 0.0);
        for (i, (o, &e)) in out.iter().zip(&expect).enumerate() {
            assert!(
                (o - (1.0 - e as f32 / 255.0)).abs() < 1e-5,
                "rot {quarter}x90 pixel {i}: {o} vs {e}"
            );
        }
    }
}

/// Independent naive sampler: four neighbours, each `fill` when outside.
fn naive(
    src: &[u8],
    rows: usize,
    cols: usize,
    m: &Affine,
    out_rows: usize,
    out_cols: usize,
    fill: f64,
) -> Vec<f64> {
    let px = |r: f64, c: f64| {
        if r < 0.0 || c < 0.0 || r >= rows as f64 || c >= cols as f64 {
            fill
        } else {
            1.0 - src[r as usize * cols + c as usize] as f64 / 255.0
        }
    };
    let mut out = Vec::new();
    for r in 0..out_rows {
        for c in 0..out_cols {
            let (x, y) = m.apply(c as f64, r as f64);
            let (x0, y0) = (x.floor(), y.floor());
            let (dx, dy) = (x - x0, y - y0);
            let top = (1.0 - dx) * px(y0, x0) + dx * px(y0, x0 + 1.0);
            let bot = (1.0 - dx) * px(y0 + 1.0, x0) + dx * px(y0 + 1.0, x0 + 1.0);
            out.push((1.0 - dy) * top + dy * bot);
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn agrees_with_naive_bilinear_sampler(
        rows in 1usize..40, cols in 1usize..40, out_rows in 1usize..30, out_cols in 1usize..30,
        seed in any::<u64>(), rotation in 0.0f64..360.0, shift_x in -15.0f64..15.0, shift_y in -15.0f64..15.0,
        zoom in 0.4f64..2.5, stretch in 0.7f64..1.4, shear in -30.0f64..30.0, flip in any::<bool>(),
        ds in 0.2f64..3.0, fill in 0.0f32..1.0,
    ) {
        let src: Vec<u8> = (0..rows * cols).map(|i| (plankton_core::rng::mix64(seed ^ i as u64) & 255) as u8).collect();
        let aug = Augmentation { rotation_deg: rotation, shift_x, shift_y, zoom, stretch, shear_deg: shear, flip };
        let m = patch_transform(rows, cols, out_rows, out_cols, ds, &aug);
        let mut out = vec![0.0; out_rows * out_cols];
        warp_inverted(&GrayView::new(&src, rows, cols), &m, &mut out, out_rows, out_cols, fill);
        let want = naive(&src, rows, cols, &m, out_rows, out_cols, fill as f64);
        for (i, (&a, &b)) in out.iter().zip(&want).enumerate() {
            prop_assert!((a as f64 - b).abs() < 2e-5, "pixel {}: {} vs {}", i, a, b);
        }
    }
}
