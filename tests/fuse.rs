//! `plankton fuse`: late fusion of stored predictions with image features.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Builder, StringBuilder, UInt32Builder};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use plankton::fusion::{self, job::scale_learning_rate, ApplyOptions, FitOptions, SetSpec};
use plankton::rng::{Purpose, Stream};
use plankton::sinks::parquet::{PredictionRow, PredictionWriter, Predictions};

/// A constructed validation set: the "convnet" cannot tell the classes of a pair (2k, 2k+1)
/// apart; with `signal`, `moments.m0` tells the parity of the class.
struct Case {
    classes: usize,
    rows: usize,
    signal: bool,
    seed: u64,
}

/// Where the constructed images "are", and whether the predictions carry their labels.
struct Layout {
    root: String,
    labels: bool,
}

fn softmax(z: &[f64]) -> Vec<f32> {
    let m = z.iter().cloned().fold(f64::MIN, f64::max);
    let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| (v / s) as f32).collect()
}

fn class_names(c: usize) -> Vec<String> {
    (0..c).map(|k| format!("class_{k:03}")).collect()
}

const MOMENT_COLUMNS: usize = 7;
const HARALICK_COLUMNS: usize = 52;

/// Writes `valid.parquet` and `features.parquet` into `dir`; returns their paths.
fn write_case(dir: &Path, case: &Case) -> (PathBuf, PathBuf) {
    write_case_in(
        dir,
        case,
        &Layout {
            root: "/data".into(),
            labels: true,
        },
    )
}

fn write_case_in(dir: &Path, case: &Case, layout: &Layout) -> (PathBuf, PathBuf) {
    let names = class_names(case.classes);
    let mut s = Stream::new(case.seed, Purpose::Other, 0, 0);
    let preds = dir.join("valid.parquet");
    let mut w = PredictionWriter::create(
        &preds,
        names.clone(),
        "convnet-test",
        &serde_json::json!({"kind": "test convnet"}),
        5,
    )
    .unwrap();
    let mut ids = StringBuilder::new();
    let mut paths = StringBuilder::new();
    let mut labels = StringBuilder::new();
    let mut rows = UInt32Builder::new();
    let mut cols = UInt32Builder::new();
    let mut values: Vec<Float64Builder> = (0..MOMENT_COLUMNS + HARALICK_COLUMNS)
        .map(|_| Float64Builder::new())
        .collect();
    let mut errors = StringBuilder::new();
    for i in 0..case.rows {
        let t = s.below(case.classes as u64) as usize;
        let mut z: Vec<f64> = (0..case.classes).map(|_| s.normal()).collect();
        let boost = 6.0 + s.normal();
        z[t] += boost;
        if (t ^ 1) < case.classes {
            z[t ^ 1] += boost;
        }
        let id = format!("{i}.jpg");
        let path = format!("{}/train/{}/{id}", layout.root, names[t]);
        w.push(PredictionRow {
            image_id: id.clone(),
            source_path: path.clone(),
            label: layout.labels.then(|| names[t].clone()),
            probabilities: Some(softmax(&z)),
            views: 1,
            error: None,
            unknown: Default::default(),
        })
        .unwrap();
        ids.append_value(&id);
        paths.append_value(&path);
        labels.append_value(&names[t]);
        rows.append_value(100);
        cols.append_value(80);
        for (k, b) in values.iter_mut().enumerate() {
            let parity = if t.is_multiple_of(2) { 1.0 } else { -1.0 };
            // Raw scales like the real features (sizes in the hundreds): standardisation's job.
            let v = if k == 0 && case.signal {
                150.0 + 40.0 * (parity + 0.7 * s.normal())
            } else {
                50.0 + 10.0 * s.normal()
            };
            b.append_value(v);
        }
        errors.append_null();
    }
    w.finish().unwrap();
    let mut fields = vec![
        Field::new("image_id", DataType::Utf8, false),
        Field::new("source_path", DataType::Utf8, false),
        Field::new("label", DataType::Utf8, true),
        Field::new("rows", DataType::UInt32, true),
        Field::new("cols", DataType::UInt32, true),
    ];
    let mut names_v: Vec<String> = (0..MOMENT_COLUMNS)
        .map(|k| format!("moments.m{k}"))
        .collect();
    names_v.extend((0..HARALICK_COLUMNS).map(|k| format!("haralick.d{}.f{}", k / 13, k % 13)));
    fields.extend(
        names_v
            .iter()
            .map(|n| Field::new(n, DataType::Float64, true)),
    );
    fields.push(Field::new("error", DataType::Utf8, true));
    let schema = Arc::new(Schema::new(fields));
    let mut arrays: Vec<ArrayRef> = vec![
        Arc::new(ids.finish()),
        Arc::new(paths.finish()),
        Arc::new(labels.finish()),
        Arc::new(rows.finish()),
        Arc::new(cols.finish()),
    ];
    arrays.extend(values.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
    arrays.push(Arc::new(errors.finish()));
    let batch = RecordBatch::try_new(schema.clone(), arrays).unwrap();
    let feats = dir.join("features.parquet");
    let mut fw =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&feats).unwrap(), schema, None)
            .unwrap();
    fw.write(&batch).unwrap();
    fw.close().unwrap();
    (preds, feats)
}

fn env<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// Tuning aid (not a test): `STEPS=.. LR=.. SIGNAL=0|1 cargo test --release --test fuse experiment -- --ignored --nocapture`.
#[test]
#[ignore]
fn experiment() {
    let dir = tempfile::tempdir().unwrap();
    let case = Case {
        classes: env("C", 121),
        rows: env("N", 3000),
        signal: env("SIGNAL", 1) == 1,
        seed: env("SEED", 1),
    };
    let (preds, feats) = write_case(dir.path(), &case);
    let mut o = FitOptions::new(
        &preds,
        &feats,
        &dir.path().join("fused.parquet"),
        &dir.path().join("model"),
    );
    o.sets = SetSpec::parse_list(&env("SETS", "moments".to_string())).unwrap();
    o.train.steps = env("STEPS", o.train.steps);
    scale_learning_rate(&mut o.train, env("LR", fusion::job::DEFAULT_LEARNING_RATE));
    o.repeats = env("R", 10);
    let s = fusion::fit(&o, &|_, _| {}).unwrap();
    print!(
        "steps {} lr {}: {}",
        o.train.steps,
        o.train.schedule[0].1,
        s.render()
    );
}

fn fit_opts(
    dir: &Path,
    preds: &Path,
    feats: &Path,
    sets: &str,
    repeats: usize,
    steps: usize,
) -> FitOptions {
    let mut o = FitOptions::new(
        preds,
        feats,
        &dir.join("fused-valid.parquet"),
        &dir.join("model"),
    );
    o.sets = SetSpec::parse_list(sets).unwrap();
    o.repeats = repeats;
    o.train.steps = steps;
    o
}

fn probabilities(path: &Path) -> Vec<Option<Vec<f32>>> {
    Predictions::read(path)
        .unwrap()
        .rows
        .into_iter()
        .map(|r| r.probabilities)
        .collect()
}

#[test]
fn a_feature_the_convnet_lacks_lowers_the_out_of_fold_loss() {
    let dir = tempfile::tempdir().unwrap();
    let (preds, feats) = write_case(
        dir.path(),
        &Case {
            classes: 20,
            rows: 1000,
            signal: true,
            seed: 1,
        },
    );
    let o = fit_opts(
        dir.path(),
        &preds,
        &feats,
        "moments,haralick",
        4,
        fusion::job::DEFAULT_STEPS,
    );
    let t0 = std::time::Instant::now();
    let s = fusion::fit(&o, &|_, _| {}).unwrap();
    eprintln!("{}({:.1} s)", s.render(), t0.elapsed().as_secs_f64());
    let (before, after) = (s.before.unwrap(), s.after.unwrap());
    assert_eq!(before.n, 1000);
    assert!(
        after.log_loss < before.log_loss - 0.2,
        "{} -> {}",
        before.log_loss,
        after.log_loss
    );
    assert!(
        after.top1 > before.top1 + 0.15,
        "{} -> {}",
        before.top1,
        after.top1
    );
    // The written file holds exactly the out-of-fold predictions that were scored.
    let l = plankton::evaluate::load_labelled(&o.out, &[]).unwrap();
    let rescored = plankton::scoring::kaggle_log_loss(&l.probs, &l.labels, 20);
    assert!(
        (rescored - after.log_loss).abs() < 1e-6,
        "{rescored} vs {}",
        after.log_loss
    );
    let p = Predictions::read(&o.out).unwrap();
    let f = &p.model["fusion"];
    assert_eq!(f["mode"], "fit");
    assert_eq!(f["out_of_fold"], true);
    assert_eq!(f["repeats"], 4);
    assert_eq!(f["sets"][0]["name"], "moments");
    assert_eq!(f["sets"][0]["l2"], 0.002);
    assert_eq!(f["sets"][1]["l2"], 0.0002);
    assert!((f["log_loss_after"].as_f64().unwrap() - after.log_loss).abs() < 1e-12);
    assert_eq!(p.model["source_model_ids"][0], "convnet-test");
    assert!(
        o.model_out.join("fusion.json").is_file()
            && o.model_out.join("fusion.safetensors").is_file()
    );
}

#[test]
fn pure_noise_features_do_not_make_it_much_worse() {
    let dir = tempfile::tempdir().unwrap();
    let (preds, feats) = write_case(
        dir.path(),
        &Case {
            classes: 20,
            rows: 1000,
            signal: false,
            seed: 2,
        },
    );
    // The reference's 10 repeats: their average is what keeps the memorised noise out.
    let o = fit_opts(
        dir.path(),
        &preds,
        &feats,
        "moments,haralick",
        10,
        fusion::job::DEFAULT_STEPS,
    );
    let s = fusion::fit(&o, &|_, _| {}).unwrap();
    eprintln!("{}", s.render());
    let (before, after) = (s.before.unwrap().log_loss, s.after.unwrap().log_loss);
    assert!(after < before + 0.03, "{before} -> {after}");
}

#[test]
fn apply_reproduces_the_final_nets_and_fits_are_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let (preds, feats) = write_case(
        dir.path(),
        &Case {
            classes: 8,
            rows: 300,
            signal: true,
            seed: 3,
        },
    );
    let a = fit_opts(
        &dir.path().join("a"),
        &preds,
        &feats,
        "moments,haralick",
        2,
        300,
    );
    let sa = fusion::fit(&a, &|_, _| {}).unwrap();
    let b = fit_opts(
        &dir.path().join("b"),
        &preds,
        &feats,
        "moments,haralick",
        2,
        300,
    );
    let sb = fusion::fit(&b, &|_, _| {}).unwrap();
    // Same seed: the same nets, bit for bit, and the same out-of-fold predictions.
    assert_eq!(
        std::fs::read(a.model_out.join("fusion.safetensors")).unwrap(),
        std::fs::read(b.model_out.join("fusion.safetensors")).unwrap()
    );
    assert_eq!(probabilities(&a.out), probabilities(&b.out));
    assert_eq!(sa.model_id, sb.model_id);
    let mut c = fit_opts(
        &dir.path().join("c"),
        &preds,
        &feats,
        "moments,haralick",
        2,
        300,
    );
    c.seed = 7;
    fusion::fit(&c, &|_, _| {}).unwrap();
    assert_ne!(probabilities(&a.out), probabilities(&c.out));

    // Applying the model to the file it was fitted on gives the final nets' in-sample predictions.
    let mut ap = ApplyOptions::new(
        &a.model_out,
        &preds,
        &feats,
        &dir.path().join("applied-1.parquet"),
    );
    let s1 = fusion::apply(&ap).unwrap();
    ap.out = dir.path().join("applied-2.parquet");
    ap.threads = 1;
    let s2 = fusion::apply(&ap).unwrap();
    assert_eq!(
        probabilities(&dir.path().join("applied-1.parquet")),
        probabilities(&ap.out)
    );
    let in_sample = sa.final_in_sample.unwrap().log_loss;
    assert_eq!(s1.after.unwrap().log_loss, in_sample);
    assert_eq!(s2.after.unwrap().log_loss, in_sample);
    assert_eq!(s1.before.unwrap().log_loss, sa.before.unwrap().log_loss);
    // In-sample is optimistic compared with out of fold.
    assert!(in_sample < sa.after.unwrap().log_loss);
    let p = Predictions::read(&ap.out).unwrap();
    assert_eq!(
        p.model_ids,
        vec![sa.model_id.trim_end_matches(":out-of-fold").to_string()]
    );
    assert_eq!(p.model["fusion"]["mode"], "apply");
}

#[test]
fn one_set_alone_reproduces_its_group_of_a_two_set_fit() {
    let dir = tempfile::tempdir().unwrap();
    let (preds, feats) = write_case(
        dir.path(),
        &Case {
            classes: 6,
            rows: 200,
            signal: true,
            seed: 4,
        },
    );
    let both = fit_opts(
        &dir.path().join("both"),
        &preds,
        &feats,
        "moments,haralick",
        2,
        100,
    );
    fusion::fit(&both, &|_, _| {}).unwrap();
    let one = fit_opts(&dir.path().join("one"), &preds, &feats, "moments", 2, 100);
    fusion::fit(&one, &|_, _| {}).unwrap();
    let read = |p: &Path| tch::Tensor::read_safetensors(p.join("fusion.safetensors")).unwrap();
    let (b, o) = (read(&both.model_out), read(&one.model_out));
    let w = |v: &[(String, tch::Tensor)]| {
        v.iter()
            .find(|(n, _)| n == "moments.w2")
            .unwrap()
            .1
            .shallow_clone()
    };
    assert!(w(&b).equal(&w(&o)));
}

#[test]
fn errors_name_the_file_and_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (preds, feats) = write_case(
        dir.path(),
        &Case {
            classes: 6,
            rows: 120,
            signal: true,
            seed: 5,
        },
    );
    // A set the features file lacks.
    let o = fit_opts(dir.path(), &preds, &feats, "moments,zernike", 1, 10);
    let e = fusion::fit(&o, &|_, _| {}).unwrap_err().to_string();
    assert!(
        e.contains(&feats.display().to_string())
            && e.contains("`zernike`")
            && e.contains("moments, haralick"),
        "{e}"
    );
    // No features file.
    let missing = dir.path().join("nowhere.parquet");
    let o = fit_opts(dir.path(), &preds, &missing, "moments", 1, 10);
    let e = fusion::fit(&o, &|_, _| {}).unwrap_err().to_string();
    assert!(e.contains(&missing.display().to_string()), "{e}");
    // Not a features file: the predictions file has no `<set>.` columns.
    let o = fit_opts(dir.path(), &preds, &preds, "moments", 1, 10);
    let e = fusion::fit(&o, &|_, _| {}).unwrap_err().to_string();
    assert!(
        e.contains(&preds.display().to_string()) && e.contains("moments"),
        "{e}"
    );
    // Unlabelled predictions cannot be fitted on.
    let unlabelled = dir.path().join("unlabelled.parquet");
    let src = Predictions::read(&preds).unwrap();
    let mut w = PredictionWriter::create(
        &unlabelled,
        src.class_names.clone(),
        "convnet-test",
        &serde_json::json!({}),
        5,
    )
    .unwrap();
    for r in &src.rows {
        w.push(PredictionRow {
            label: None,
            ..r.clone()
        })
        .unwrap();
    }
    w.finish().unwrap();
    let o = fit_opts(dir.path(), &unlabelled, &feats, "moments", 1, 10);
    let e = fusion::fit(&o, &|_, _| {}).unwrap_err().to_string();
    assert!(
        e.contains(&unlabelled.display().to_string()) && e.contains("--data"),
        "{e}"
    );

    // Apply: predictions of other classes than the model's.
    let o = fit_opts(dir.path(), &preds, &feats, "moments", 1, 10);
    fusion::fit(&o, &|_, _| {}).unwrap();
    let other = dir.path().join("other-classes.parquet");
    let mut names = src.class_names.clone();
    names.swap(0, 1);
    let mut w =
        PredictionWriter::create(&other, names, "convnet-test", &serde_json::json!({}), 5).unwrap();
    for r in &src.rows {
        w.push(r.clone()).unwrap();
    }
    w.finish().unwrap();
    let e = fusion::apply(&ApplyOptions::new(
        &o.model_out,
        &other,
        &feats,
        &dir.path().join("x.parquet"),
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.contains(&other.display().to_string())
            && e.contains(&o.model_out.display().to_string())
            && e.contains("class 0"),
        "{e}"
    );
    // Apply: not a model folder.
    let e = fusion::apply(&ApplyOptions::new(
        dir.path(),
        &preds,
        &feats,
        &dir.path().join("x.parquet"),
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("fusion.json"), "{e}");
    // Apply: features lacking one of the model's columns.
    let fewer = dir.path().join("fewer.parquet");
    rewrite_features(&feats, &fewer, |name| name != "moments.m3");
    let e = fusion::apply(&ApplyOptions::new(
        &o.model_out,
        &preds,
        &fewer,
        &dir.path().join("x.parquet"),
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.contains(&fewer.display().to_string()) && e.contains("moments.m3"),
        "{e}"
    );
}

/// Copies a features file keeping the columns `keep` accepts.
fn rewrite_features(from: &Path, to: &Path, keep: impl Fn(&str) -> bool) {
    let r = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(from).unwrap(),
    )
    .unwrap()
    .build()
    .unwrap();
    let batches: Vec<RecordBatch> = r.map(|b| b.unwrap()).collect();
    let schema = batches[0].schema();
    let idx: Vec<usize> = (0..schema.fields().len())
        .filter(|&i| keep(schema.field(i).name()))
        .collect();
    let projected: Vec<RecordBatch> = batches.iter().map(|b| b.project(&idx).unwrap()).collect();
    let mut w = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(to).unwrap(),
        projected[0].schema(),
        None,
    )
    .unwrap();
    for b in &projected {
        w.write(b).unwrap();
    }
    w.close().unwrap();
}

#[test]
fn failed_and_featureless_rows_pass_through() {
    let dir = tempfile::tempdir().unwrap();
    let (preds, feats) = write_case(
        dir.path(),
        &Case {
            classes: 6,
            rows: 150,
            signal: true,
            seed: 6,
        },
    );
    // Row 0 failed to predict; row 1 has no features row; row 2's features row is an error row;
    // row 3 has one non-finite feature value (imputed, still fused).
    let src = Predictions::read(&preds).unwrap();
    let edited = dir.path().join("edited.parquet");
    let mut w = PredictionWriter::create(
        &edited,
        src.class_names.clone(),
        "convnet-test",
        &serde_json::json!({}),
        5,
    )
    .unwrap();
    for (i, r) in src.rows.iter().enumerate() {
        let mut r = r.clone();
        match i {
            0 => {
                r.probabilities = None;
                r.views = 0;
                r.error = Some("unreadable: truncated JPEG".into());
            }
            1 => {
                r.source_path = "/elsewhere/1.jpg".into();
                r.image_id = "not-in-features.jpg".into();
            }
            _ => {}
        }
        w.push(r).unwrap();
    }
    w.finish().unwrap();
    let feats2 = dir.path().join("features2.parquet");
    edit_features(&feats, &feats2);
    let o = fit_opts(dir.path(), &edited, &feats2, "moments,haralick", 2, 200);
    let s = fusion::fit(&o, &|_, _| {}).unwrap();
    assert_eq!(
        (
            s.rows.total,
            s.rows.fused,
            s.rows.failed,
            s.rows.without_features
        ),
        (150, 147, 1, 2)
    );
    assert_eq!(s.rows.imputed_values, 1);
    assert_eq!(s.rows.without_features_examples.len(), 2);
    assert_eq!(s.all_labelled_before.unwrap().n, 149);
    let out = Predictions::read(&o.out).unwrap();
    assert_eq!(out.rows.len(), 150);
    assert_eq!(out.rows[0].probabilities, None);
    assert_eq!(
        out.rows[0].error.as_deref(),
        Some("unreadable: truncated JPEG")
    );
    assert_eq!(out.rows[0].views, 0);
    let original = Predictions::read(&edited).unwrap();
    assert_eq!(out.rows[1].probabilities, original.rows[1].probabilities);
    assert_eq!(out.rows[2].probabilities, original.rows[2].probabilities);
    assert_ne!(out.rows[3].probabilities, original.rows[3].probabilities);
    for (a, b) in out.rows.iter().zip(&original.rows) {
        assert_eq!(
            (&a.image_id, &a.source_path, &a.label),
            (&b.image_id, &b.source_path, &b.label)
        );
    }
    // Applying keeps the same rows aside.
    let s = fusion::apply(&ApplyOptions::new(
        &o.model_out,
        &edited,
        &feats2,
        &dir.path().join("applied.parquet"),
    ))
    .unwrap();
    assert_eq!(
        (
            s.rows.fused,
            s.rows.failed,
            s.rows.without_features,
            s.rows.imputed_values
        ),
        (147, 1, 2, 1)
    );
    let applied = Predictions::read(&dir.path().join("applied.parquet")).unwrap();
    assert_eq!(applied.rows[0].probabilities, None);
    assert_eq!(
        applied.rows[1].probabilities,
        original.rows[1].probabilities
    );
}

/// Row 2 becomes an error row (null values, like `plankton features` writes an unreadable
/// image); row 3 gets a NaN in `moments.m1`.
fn edit_features(from: &Path, to: &Path) {
    use arrow::array::{Array, Float64Array, StringArray};
    let r = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(from).unwrap(),
    )
    .unwrap()
    .build()
    .unwrap();
    let batches: Vec<RecordBatch> = r.map(|b| b.unwrap()).collect();
    let b = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
    let schema = b.schema();
    let cols: Vec<ArrayRef> = (0..b.num_columns())
        .map(|k| {
            let name = schema.field(k).name().as_str();
            let col = b.column(k);
            if name == "error" {
                let v: StringArray = (0..b.num_rows())
                    .map(|i| (i == 2).then_some("decode failed"))
                    .collect();
                Arc::new(v) as ArrayRef
            } else if let Some(f) = col.as_any().downcast_ref::<Float64Array>() {
                let v: Float64Array = (0..b.num_rows())
                    .map(|i| {
                        if i == 2 {
                            None
                        } else if i == 3 && name == "moments.m1" {
                            Some(f64::NAN)
                        } else {
                            Some(f.value(i))
                        }
                    })
                    .collect();
                Arc::new(v) as ArrayRef
            } else {
                col.clone()
            }
        })
        .collect();
    let out = RecordBatch::try_new(schema.clone(), cols).unwrap();
    let mut w =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(to).unwrap(), schema, None)
            .unwrap();
    w.write(&out).unwrap();
    w.close().unwrap();
}

#[test]
fn command_line_fits_with_labels_from_a_dataset_folder_then_applies() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let layout = Layout {
        root: data.display().to_string(),
        labels: false,
    };
    let (preds, feats) = write_case_in(
        dir.path(),
        &Case {
            classes: 6,
            rows: 200,
            signal: true,
            seed: 7,
        },
        &layout,
    );
    // The true classes live only in the dataset folder, as for real validation predictions.
    for r in Predictions::read(&preds).unwrap().rows {
        let p = Path::new(&r.source_path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"").unwrap();
    }
    let run = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_plankton"))
            .arg("fuse")
            .args(args)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr),
        )
    };
    let s = |p: &Path| p.display().to_string();
    let (fused, model, report) = (
        dir.path().join("fused-valid.parquet"),
        dir.path().join("fusion"),
        dir.path().join("fuse.json"),
    );
    let (ok, text) = run(&[
        "--predictions",
        &s(&preds),
        "--features",
        &s(&feats),
        "--data",
        &s(&data),
        "--out",
        &s(&fused),
        "--model-out",
        &s(&model),
        "--sets",
        "moments:0.001,haralick",
        "--repeats",
        "2",
        "--folds",
        "4",
        "--steps",
        "300",
        "--seed",
        "3",
        "--report",
        &s(&report),
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("fitted fusion on 200 labelled rows")
            && text.contains("out of fold")
            && text.contains("L2 0.001"),
        "{text}"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["folds"], 4);
    assert_eq!(r["nets_trained"], 2 * 5 * 2);
    assert!(r["after"]["log_loss"].as_f64().unwrap() < r["before"]["log_loss"].as_f64().unwrap());
    assert!(model.join("fusion.json").is_file());
    // Apply to "test" predictions (here the same file); options of a fit are refused.
    let applied = dir.path().join("fused-test.parquet");
    let (ok, text) = run(&[
        "--model",
        &s(&model),
        "--predictions",
        &s(&preds),
        "--features",
        &s(&feats),
        "--out",
        &s(&applied),
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("applied fusion[moments+haralick]@") && text.contains("200 fused"),
        "{text}"
    );
    assert_eq!(Predictions::read(&applied).unwrap().rows.len(), 200);
    let (ok, text) = run(&[
        "--model",
        &s(&model),
        "--predictions",
        &s(&preds),
        "--features",
        &s(&feats),
        "--out",
        &s(&applied),
        "--repeats",
        "3",
    ]);
    assert!(!ok && text.contains("--repeats"), "{text}");
    let (ok, text) = run(&[
        "--predictions",
        &s(&preds),
        "--features",
        &s(&feats),
        "--out",
        &s(&applied),
    ]);
    assert!(!ok && text.contains("--model-out"), "{text}");
}
