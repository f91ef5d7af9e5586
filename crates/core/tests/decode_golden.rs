//! Our decoder (the `image` crate's pure-Rust JPEG decoder) against Pillow/libjpeg-turbo on the
//! real plankton fixture images (tests/fixtures/decode/gen_decode_fixtures.py). Two JPEG
//! implementations may round the inverse DCT and chroma upsampling differently, so the check is
//! a tolerance, stated here: at most 2 grey levels on any pixel, under 0.5 on average.

use std::path::Path;

use plankton_core::decode::{decode_file, DecodeLimits};
use plankton_core::npy;

#[test]
fn decoder_matches_pillow_within_rounding() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("decode/expected.json")).unwrap()).unwrap();
    let images = expected["images"].as_array().expect("images");
    assert!(images.len() >= 8);
    let fixtures_dir = root.join("decode");
    for info in images {
        let jpeg = fixtures_dir.join(info["jpeg"].as_str().unwrap());
        let stem = jpeg.file_stem().unwrap().to_string_lossy().into_owned();
        let img = decode_file(&jpeg, &DecodeLimits::default()).unwrap();
        let (rows, cols) = (
            info["rows"].as_u64().unwrap() as u32,
            info["cols"].as_u64().unwrap() as u32,
        );
        assert_eq!((img.height(), img.width()), (rows, cols), "{stem}");
        let pil = npy::read(&fixtures_dir.join(info["pixels"].as_str().unwrap())).unwrap();
        let diffs: Vec<f64> = img
            .as_raw()
            .iter()
            .zip(&pil.data)
            .map(|(&a, &b)| (a as f64 - b).abs())
            .collect();
        let max = diffs.iter().cloned().fold(0.0, f64::max);
        let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
        let sum: f64 = img.as_raw().iter().map(|&v| v as f64).sum();
        eprintln!(
            "{stem}: max |diff| {max}, mean {mean:.4}, sum {sum} vs Pillow {}",
            info["sum"]
        );
        assert!(max <= 2.0 && mean < 0.5, "{stem}: max {max}, mean {mean}");
    }
}
