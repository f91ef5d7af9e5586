//! The annotation loop on IFCB bins, end to end through the CLI: a tiny synthetic set written
//! as instrument bins -> train -> predict the unlabelled ROIs -> per-bin class scores for IFCB
//! tools (read back as pyifcb reads them) -> the least confident to an EcoTaxa package ->
//! a scripted "validation" (what an expert does in EcoTaxa, then exports) -> import -> fine-tune
//! from the first run -> predict again: the validated images score better.

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use plankton::sinks::parquet::Predictions;
use plankton::sources::ifcb::write_bin;
use plankton::sources::synth::{generate, SynthOptions};
use plankton::sources::Dataset;

fn plankton(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_plankton"))
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "plankton {args:?} failed:\n{text}");
    text
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The Python with h5py (`make test` installs it), if any.
fn python_with_h5py() -> Option<PathBuf> {
    let p = std::env::var_os("PLANKTON_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".pyenv-tools/bin/python"));
    let ok = p.is_file()
        && Command::new(&p)
            .args(["-c", "import h5py, numpy"])
            .output()
            .is_ok_and(|o| o.status.success());
    if ok {
        Some(p)
    } else if std::env::var_os("PLANKTON_REQUIRE_PYTHON").is_some() {
        panic!("{}: no Python with h5py (run `make pytools`)", p.display());
    } else {
        eprintln!("skipping the h5py reader check: `make test` installs it");
        None
    }
}

/// Mean log loss of `ids` (true classes in `truth`) in a predictions file.
fn log_loss(preds: &Predictions, ids: &[String], truth: &HashMap<String, String>) -> f64 {
    let rows: HashMap<&str, &Vec<f32>> = preds
        .rows
        .iter()
        .filter_map(|r| r.probabilities.as_ref().map(|p| (r.image_id.as_str(), p)))
        .collect();
    let total: f64 = ids
        .iter()
        .map(|id| {
            let c = preds
                .class_names
                .iter()
                .position(|c| *c == truth[id])
                .unwrap();
            -(rows[id.as_str()][c] as f64).max(1e-15).ln()
        })
        .sum();
    total / ids.len() as f64
}

#[test]
fn predict_export_validate_import_fine_tune_predict_again_on_ifcb_bins() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // A tiny synthetic set, its images written as two bins of an instrument's day folder.
    let synth = root.join("synth");
    generate(
        &SynthOptions {
            classes: 4,
            per_class: 16,
            test: 32,
            seed: 21,
            threads: 1,
        },
        &synth,
    )
    .unwrap();
    let ds = Dataset::open(&synth).unwrap();
    let day = root.join("bins/D2024/D20240611");
    std::fs::create_dir_all(&day).unwrap();
    let decode = |p: &Path| plankton::stages::decode::decode_file(p, &Default::default()).unwrap();
    let mut truth = HashMap::new();
    let mut labels = String::from("pid,class\n");
    let train_images: Vec<_> = ds.train.iter().map(|r| decode(&r.path)).collect();
    write_bin(&day, "D20240611T010000_IFCB104", &train_images).unwrap();
    for (i, r) in ds.train.iter().enumerate() {
        let pid = format!("D20240611T010000_IFCB104_{:05}", i + 1);
        let class = &ds.class_names[r.label.unwrap() as usize];
        labels.push_str(&format!("{pid},{class}\n"));
        truth.insert(pid, class.clone());
    }
    let test_truth: HashMap<String, String> =
        plankton::sources::dataset::read_labels_csv(&synth.join("test_labels.csv"))
            .unwrap()
            .into_iter()
            .collect();
    let test_images: Vec<_> = ds.test.iter().map(|r| decode(&r.path)).collect();
    write_bin(&day, "D20240611T020000_IFCB104", &test_images).unwrap();
    for (i, r) in ds.test.iter().enumerate() {
        let pid = format!("D20240611T020000_IFCB104_{:05}", i + 1);
        truth.insert(pid, test_truth[&r.id].clone());
    }
    let bins = root.join("bins");
    std::fs::write(bins.join("labels.csv"), labels).unwrap();

    // Train on the labelled bin, predict the unlabelled one.
    let pipeline = root.join("tiny.toml");
    std::fs::write(
        &pipeline,
        common::tiny_net_toml("tiny-loop", 7, 0.125)
            + "[train]\nsteps = 40\nlearning_rate = 0.01\nvalidate_every = 20\ncheckpoint_every = 20\nthreads = 1\n[split]\nvalid_fraction = 0.25\n[tta]\ntransforms = 2\n",
    )
    .unwrap();
    let run1 = root.join("run1");
    plankton(&[
        "train",
        "--pipeline",
        s(&pipeline),
        "--data",
        s(&bins),
        "--out",
        s(&run1),
        "--device",
        "cpu",
    ]);
    let p1 = root.join("p1.parquet");
    let out = plankton(&[
        "predict",
        "--model",
        s(&run1),
        "--data",
        s(&bins),
        "--out",
        s(&p1),
        "--device",
        "cpu",
    ]);
    let preds1 = Predictions::read(&p1).unwrap();
    assert_eq!(preds1.rows.len(), 32, "the unlabelled ROIs: {out}");
    assert!(preds1
        .rows
        .iter()
        .all(|r| r.image_id.starts_with("D20240611T020000_IFCB104_") && r.error.is_none()));

    // Per-bin class scores, read as pyifcb's v3 reader does (h5py).
    let scores = root.join("class_scores");
    plankton(&[
        "export",
        "ifcb",
        "--predictions",
        s(&p1),
        "--out",
        s(&scores),
        "--csv",
    ]);
    let h5 = scores.join("D2024/D20240611/D20240611T020000_IFCB104_class.h5");
    assert!(h5.is_file());
    let csv =
        std::fs::read_to_string(h5.with_file_name("D20240611T020000_IFCB104_class_scores.csv"))
            .unwrap();
    assert_eq!(csv.lines().count(), 33);
    assert!(csv.starts_with(&format!("pid,{}", preds1.class_names.join(","))));
    if let Some(py) = python_with_h5py() {
        let script = r#"
import sys, json, h5py, numpy as np
with h5py.File(sys.argv[1], 'r') as f:
    # pyifcb ifcb/data/products/class_scores.py, v3
    ds = f['output_scores']
    labels = [l.decode('ascii') for l in f['class_labels'][:]]
    rois = f['roi_numbers'][:]
    m = f['metadata'].attrs
    text = lambda v: v.decode() if isinstance(v, bytes) else str(v)
    print(json.dumps({"shape": list(ds.shape), "labels": labels, "rois": [int(r) for r in rois],
                      "first": [float(v) for v in ds[0]], "version": text(m['version']),
                      "bin": text(m['bin_id']), "classes": [int(c) for c in f['output_classes'][:]]}))
"#;
        let out = Command::new(py)
            .args(["-c", script, s(&h5)])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["shape"], serde_json::json!([32, 4]));
        assert_eq!(v["labels"], serde_json::json!(preds1.class_names));
        assert_eq!(v["rois"], serde_json::json!((1..=32).collect::<Vec<u32>>()));
        assert_eq!(
            (v["version"].as_str(), v["bin"].as_str()),
            (Some("v3"), Some("D20240611T020000_IFCB104"))
        );
        let row1 = preds1
            .rows
            .iter()
            .find(|r| r.image_id.ends_with("_00001"))
            .unwrap();
        let want = row1.probabilities.as_ref().unwrap();
        for (a, b) in v["first"].as_array().unwrap().iter().zip(want) {
            assert!((a.as_f64().unwrap() - *b as f64).abs() < 1e-6);
        }
        let argmax = plankton::sinks::parquet::top_k(want, 1)[0];
        assert_eq!(v["classes"][0].as_u64(), Some(argmax as u64));
    }

    // Features of the bins' ROIs, for the package's feature columns.
    let features = root.join("features.parquet");
    plankton(&[
        "features",
        "--data",
        s(&bins),
        "--set",
        "moments,hu",
        "--out",
        s(&features),
        "--threads",
        "1",
    ]);

    // The 12 least confident to EcoTaxa.
    let pack = root.join("pack.zip");
    plankton(&[
        "export",
        "ecotaxa",
        "--predictions",
        s(&p1),
        "--out",
        s(&pack),
        "--least-confident-first",
        "--limit",
        "12",
        "--features",
        s(&features),
    ]);
    let mut zip = zip::ZipArchive::new(std::fs::File::open(&pack).unwrap()).unwrap();
    let mut table = String::new();
    zip.by_name("ecotaxa_pack.tsv")
        .unwrap()
        .read_to_string(&mut table)
        .unwrap();
    let table = table
        .strip_prefix('\u{feff}')
        .expect("a BOM: EcoTaxa reads UTF-8 by it");
    let lines: Vec<&str> = table.lines().collect();
    let header: Vec<&str> = lines[0].split('\t').collect();
    let types: Vec<&str> = lines[1].split('\t').collect();
    assert_eq!(header.len(), types.len());
    assert!(
        types.iter().all(|t| *t == "[t]" || *t == "[f]"),
        "{types:?}"
    );
    for required in [
        "img_file_name",
        "object_id",
        "object_annotation_category",
        "object_annotation_status",
    ] {
        assert!(header.contains(&required), "{required} in {header:?}");
    }
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let objects: Vec<Vec<&str>> = lines[2..].iter().map(|l| l.split('\t').collect()).collect();
    assert_eq!(objects.len(), 12);
    let hu = header
        .iter()
        .position(|h| h.starts_with("object_hu_"))
        .unwrap_or_else(|| panic!("feature columns in {header:?}"));
    assert_eq!(types[hu], "[f]");
    assert!(
        objects.iter().all(|o| o[hu].parse::<f64>().is_ok()),
        "every object has its features"
    );
    let p1s: Vec<f64> = objects
        .iter()
        .map(|o| o[col("object_plankton_p1")].parse().unwrap())
        .collect();
    assert!(
        p1s.windows(2).all(|w| w[0] <= w[1]),
        "least confident first: {p1s:?}"
    );
    let all_p1: Vec<f32> = preds1
        .rows
        .iter()
        .map(|r| {
            r.probabilities
                .as_ref()
                .unwrap()
                .iter()
                .copied()
                .fold(0.0, f32::max)
        })
        .collect();
    let twelfth = {
        let mut v = all_p1.clone();
        v.sort_by(f32::total_cmp);
        v[11]
    };
    assert!((p1s[11] - twelfth as f64).abs() < 1e-6, "the 12 lowest");
    for o in &objects {
        assert_eq!(o[col("object_annotation_status")], "predicted");
        // The image in the package is the ROI, pixel for pixel.
        let mut png = Vec::new();
        zip.by_name(o[col("img_file_name")])
            .unwrap()
            .read_to_end(&mut png)
            .unwrap();
        let img = image::load_from_memory(&png).unwrap().to_luma8();
        let roi = plankton::stages::decode::decode_file(
            &day.join(o[col("object_id")]),
            &Default::default(),
        )
        .unwrap();
        assert_eq!(img, roi);
    }

    // "Validation" in EcoTaxa: an expert sets the true taxon (EcoTaxa's own names, mapped back
    // on import) and EcoTaxa exports: quoted strings, a BOM, no types row, images per sample.
    let validated = root.join("export");
    std::fs::create_dir_all(validated.join("D20240611T020000_IFCB104")).unwrap();
    let mut export = String::from("\u{feff}\"img_file_name\"\t\"img_rank\"\t\"object_id\"\t\"object_annotation_status\"\t\"object_annotation_category\"\n");
    let taxon = |class: &str| format!("Taxon {class}");
    let mut mapping = String::from("ecotaxa,class\n");
    for c in &preds1.class_names {
        mapping.push_str(&format!("{},{c}\n", taxon(c)));
    }
    let mut validated_ids = Vec::new();
    for o in &objects {
        let id = o[col("object_id")].to_string();
        let img = format!("D20240611T020000_IFCB104/{}", o[col("img_file_name")]);
        let mut png = Vec::new();
        zip.by_name(o[col("img_file_name")])
            .unwrap()
            .read_to_end(&mut png)
            .unwrap();
        std::fs::write(validated.join(&img), png).unwrap();
        export.push_str(&format!(
            "\"{img}\"\t0\t\"{id}\"\t\"validated\"\t\"{}\"\n",
            taxon(&truth[&id])
        ));
        validated_ids.push(id);
    }
    std::fs::write(validated.join("ecotaxa_export.tsv"), export).unwrap();
    std::fs::write(root.join("mapping.csv"), mapping).unwrap();
    let ds2 = root.join("validated_ds");
    let out = plankton(&[
        "import",
        "ecotaxa",
        s(&validated),
        "--out",
        s(&ds2),
        "--mapping",
        s(&root.join("mapping.csv")),
    ]);
    let imported = Dataset::open(&ds2).unwrap();
    assert_eq!(imported.train.len(), 12, "{out}");
    assert!(imported.test.is_empty());
    for r in &imported.train {
        let id = r.id.trim_end_matches(".png");
        assert_eq!(
            imported.class_names[r.label.unwrap() as usize],
            truth[id],
            "{id}"
        );
    }

    // Fine-tune from the first run on the validated images, predict again.
    let run2 = root.join("run2");
    plankton(&[
        "train",
        "--init-from",
        s(&run1),
        "--data",
        s(&ds2),
        "--out",
        s(&run2),
        "--device",
        "cpu",
        "--steps",
        "30",
    ]);
    assert_eq!(
        std::fs::read_to_string(run2.join("zmuv.json")).unwrap(),
        std::fs::read_to_string(run1.join("zmuv.json")).unwrap(),
        "the carried-over weights keep the input statistics they were trained with"
    );
    // Another architecture is refused before anything is written.
    let wide = root.join("wide.toml");
    std::fs::write(
        &wide,
        common::tiny_net_toml("tiny-wide", 7, 0.25) + "[train]\nsteps = 4\nthreads = 1\n",
    )
    .unwrap();
    let run3 = root.join("run3");
    let out = Command::new(env!("CARGO_BIN_EXE_plankton"))
        .args([
            "train",
            "--init-from",
            s(&run1),
            "--pipeline",
            s(&wide),
            "--data",
            s(&ds2),
            "--out",
            s(&run3),
            "--device",
            "cpu",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("the networks differ"),
        "{err}"
    );
    assert!(!run3.exists(), "no half-made run");
    let carried: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run2.join("init_from.json")).unwrap())
            .unwrap();
    assert_eq!(
        carried["kept"].as_array().unwrap().len(),
        imported.class_names.len()
    );
    let p2 = root.join("p2.parquet");
    plankton(&[
        "predict",
        "--model",
        s(&run2),
        "--data",
        s(&bins),
        "--subset",
        "all",
        "--out",
        s(&p2),
        "--device",
        "cpu",
    ]);
    let preds2 = Predictions::read(&p2).unwrap();
    assert_eq!(preds2.rows.len(), 64 + 32);
    // Scored against the bins' own labels (labels.csv): the labelled ROIs of the classes the
    // fine-tuned run knows (the validated images may not cover every class).
    let report = root.join("report");
    let out = plankton(&[
        "evaluate",
        "--predictions",
        s(&p2),
        "--data",
        s(&bins),
        "--out",
        s(&report),
    ]);
    let scorable = truth
        .iter()
        .filter(|(pid, c)| pid.contains("T010000") && preds2.class_names.contains(c))
        .count();
    assert!(
        out.contains(&format!("{scorable} images: log loss")),
        "{out}"
    );
    assert!(report.join("report.json").is_file());
    let (before, after) = (
        log_loss(&preds1, &validated_ids, &truth),
        log_loss(&preds2, &validated_ids, &truth),
    );
    eprintln!("validated images' log loss: {before:.3} before fine-tuning, {after:.3} after");
    assert!(
        after < before,
        "the validated images score better after fine-tuning: {before:.3} -> {after:.3}"
    );
}
