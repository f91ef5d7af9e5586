//! `plankton features` end to end: one row per image in listing order, the columns of the
//! chosen sets equal to the kernels' values, the raw size, and bad images kept with a reason.

use std::path::Path;
use std::process::Command;

use arrow::array::{Array, Float64Array, StringArray, UInt32Array};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use plankton::features::{haralick, lbp, moments, tas, zernike};
use plankton::sources::synth::{generate, SynthOptions};
use plankton::stages::decode::{decode_file, DecodeLimits};

#[test]
fn features_of_a_dataset_match_the_kernels_and_keep_bad_images() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    generate(
        &SynthOptions {
            classes: 2,
            per_class: 3,
            test: 2,
            seed: 9,
            threads: 0,
        },
        &data,
    )
    .unwrap();
    std::fs::write(data.join("test/broken.jpg"), b"not an image").unwrap();
    let out = dir.path().join("f.parquet");
    let o = Command::new(env!("CARGO_BIN_EXE_plankton"))
        .arg("features")
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{text}");
    assert!(
        text.contains("9 images x 66 feature columns") && text.contains("1 set aside"),
        "{text}"
    );
    let reader =
        ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&out).unwrap()).unwrap();
    let kv = reader
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .cloned()
        .unwrap_or_default();
    assert!(kv.iter().any(|e| e.key == "plankton.features"));
    let batches: Vec<_> = reader.build().unwrap().map(|b| b.unwrap()).collect();
    let b = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
    assert_eq!(b.num_rows(), 9);
    let col = |n: &str| {
        b.column_by_name(n)
            .unwrap_or_else(|| panic!("no column {n}"))
            .clone()
    };
    let paths = col("source_path");
    let paths = paths.as_any().downcast_ref::<StringArray>().unwrap();
    let errors = col("error");
    let errors = errors.as_any().downcast_ref::<StringArray>().unwrap();
    let rows = col("rows");
    let rows = rows.as_any().downcast_ref::<UInt32Array>().unwrap();
    let contrast = col("haralick.d0.contrast");
    let contrast = contrast.as_any().downcast_ref::<Float64Array>().unwrap();
    let orientation = col(&format!("moments.{}", moments::MOMENT_INFO_NAMES[4]));
    let orientation = orientation.as_any().downcast_ref::<Float64Array>().unwrap();
    for i in 0..b.num_rows() {
        let path = Path::new(paths.value(i));
        if path.ends_with("broken.jpg") {
            assert!(
                errors.value(i).contains("broken.jpg"),
                "{}",
                errors.value(i)
            );
            assert!(contrast.is_null(i) && rows.is_null(i));
            continue;
        }
        assert!(errors.is_null(i));
        let img = decode_file(path, &DecodeLimits::default()).unwrap();
        assert_eq!(rows.value(i), img.height());
        let h = haralick::haralick(&img);
        let ci = haralick::FEATURE_NAMES
            .iter()
            .position(|n| *n == "contrast")
            .unwrap();
        assert_eq!(contrast.value(i), h[0][ci]);
        assert_eq!(orientation.value(i), moments::moment_info(&img)[4]);
    }
}

#[test]
fn zernike_lbp_and_tas_columns_match_the_kernels() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    generate(
        &SynthOptions {
            classes: 2,
            per_class: 2,
            test: 1,
            seed: 4,
            threads: 0,
        },
        &data,
    )
    .unwrap();
    std::fs::write(data.join("test/broken.jpg"), b"not an image").unwrap();
    let out = dir.path().join("f.parquet");
    let o = Command::new(env!("CARGO_BIN_EXE_plankton"))
        .args([
            "features",
            "--set",
            "zernike, lbp,tas",
            "--threads",
            "2",
            "--data",
        ])
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{text}");
    let (nz, nl, nt) = (
        zernike::ZERNIKE_NAMES.len(),
        lbp::LBP_NAMES.len(),
        tas::TAS_NAMES.len(),
    );
    assert_eq!((nz, nl, nt), (25, 20, 54));
    assert!(
        text.contains("6 images x 99 feature columns") && text.contains("1 set aside"),
        "{text}"
    );
    let reader =
        ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&out).unwrap()).unwrap();
    let kv = reader
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .cloned()
        .unwrap_or_default();
    let meta = kv
        .iter()
        .find(|e| e.key == "plankton.features")
        .and_then(|e| e.value.clone())
        .unwrap();
    let meta: serde_json::Value = serde_json::from_str(&meta).unwrap();
    assert_eq!(meta["sets"], serde_json::json!(["zernike", "lbp", "tas"]));
    let batches: Vec<_> = reader.build().unwrap().map(|b| b.unwrap()).collect();
    let b = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
    assert_eq!(b.num_rows(), 6);
    // The feature columns are exactly the sets' names, in order, between `cols` and `error`.
    let names: Vec<String> = b
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let want: Vec<String> = zernike::ZERNIKE_NAMES
        .iter()
        .map(|n| format!("zernike.{n}"))
        .chain(lbp::LBP_NAMES.iter().map(|n| format!("lbp.{n}")))
        .chain(tas::TAS_NAMES.iter().map(|n| format!("tas.{n}")))
        .collect();
    assert_eq!(names[5..names.len() - 1], want[..]);
    let paths = b.column_by_name("source_path").unwrap().clone();
    let paths = paths.as_any().downcast_ref::<StringArray>().unwrap();
    let value = |col: &str, i: usize| -> Option<f64> {
        let c = b
            .column_by_name(col)
            .unwrap_or_else(|| panic!("no column {col}"));
        let c = c.as_any().downcast_ref::<Float64Array>().unwrap();
        (!c.is_null(i)).then(|| c.value(i))
    };
    for i in 0..b.num_rows() {
        let path = Path::new(paths.value(i));
        if path.ends_with("broken.jpg") {
            assert!(want.iter().all(|c| value(c, i).is_none()));
            continue;
        }
        let img = decode_file(path, &DecodeLimits::default()).unwrap();
        let mut expect = Vec::new();
        expect.extend_from_slice(&zernike::zernike(&img));
        expect.extend_from_slice(&lbp::lbp(&img));
        expect.extend_from_slice(&tas::pftas(&img));
        for (c, e) in want.iter().zip(&expect) {
            let got = value(c, i).unwrap();
            assert!(got.is_finite(), "{c}");
            assert_eq!(got.to_bits(), e.to_bits(), "{}: {c}", path.display());
        }
        let pixels = (img.width() * img.height()) as f64;
        let lbp_total: f64 = lbp::LBP_NAMES
            .iter()
            .map(|n| value(&format!("lbp.{n}"), i).unwrap())
            .sum();
        assert_eq!(lbp_total, pixels);
    }
}

#[test]
fn unknown_feature_sets_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_plankton"))
        .args(["features", "--set", "moments,zernikee", "--data"])
        .arg(dir.path())
        .arg("--out")
        .arg(dir.path().join("x.parquet"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("zernikee"), "{err}");
    assert!(
        err.contains("zernike, lbp, tas"),
        "the message lists the known sets: {err}"
    );
}
