//! Evaluation metrics against scikit-learn / numpy oracle values
//! (tests/fixtures/evaluate/gen_evaluate_fixtures.py), and the report files.

use std::path::PathBuf;

use plankton_core::scoring::kaggle_log_loss;
use plankton_data::evaluate::calibration::{apply_temperature, fit_temperature};
use plankton_data::evaluate::metrics::{evaluate, expected_calibration_error, Evaluation};
use plankton_data::sinks::report::{write_report, ReportError};
use serde_json::Value;

struct Fixture {
    classes: Vec<String>,
    labels: Vec<usize>,
    probs: Vec<f32>,
    oracle: Value,
}

fn fixture() -> Fixture {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/evaluate/evaluate_fixture.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    let classes = strings(&v["classes"]);
    let labels = v["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_u64().unwrap() as usize)
        .collect();
    // float32 values stored as the float64 they convert to: the cast back is exact.
    let probs = v["probs"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter())
        .map(|p| p.as_f64().unwrap() as f32)
        .collect();
    Fixture {
        classes,
        labels,
        probs,
        oracle: v["oracle"].clone(),
    }
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() <= 1e-9, "{what}: {a} vs oracle {b}");
}

fn evaluated(f: &Fixture) -> Evaluation {
    evaluate(&f.probs, &f.labels, &f.classes, 20)
}

#[test]
fn fixture_has_the_intended_shape() {
    let f = fixture();
    assert_eq!(f.classes.len(), 7);
    assert_eq!(f.labels.len(), 200);
    assert_eq!(f.probs.len(), 200 * 7);
    let versions = &fixture_json()["versions"];
    assert!(versions["scikit-learn"].is_string(), "{versions}");
}

fn fixture_json() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/evaluate/evaluate_fixture.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn log_loss_matches_sklearn() {
    let f = fixture();
    let e = evaluated(&f);
    close(
        e.log_loss,
        f.oracle["log_loss_kaggle"].as_f64().unwrap(),
        "Kaggle log loss",
    );
    // The rows where clipping cannot matter, against sklearn on the raw normalised rows.
    let rows: Vec<usize> = f.oracle["unclipped_rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_u64().unwrap() as usize)
        .collect();
    let c = f.classes.len();
    let probs: Vec<f32> = rows
        .iter()
        .flat_map(|&r| f.probs[r * c..(r + 1) * c].iter().copied())
        .collect();
    let labels: Vec<usize> = rows.iter().map(|&r| f.labels[r]).collect();
    close(
        kaggle_log_loss(&probs, &labels, c),
        f.oracle["log_loss_sklearn_unclipped_subset"]
            .as_f64()
            .unwrap(),
        "log loss on unclipped rows",
    );
}

#[test]
fn top_k_matches_sklearn() {
    let f = fixture();
    let e = evaluated(&f);
    let oracle = floats(&f.oracle["top_k"]);
    assert_eq!(e.top_k.len(), 5);
    for (k, (a, b)) in e.top_k.iter().zip(&oracle).enumerate() {
        close(*a, *b, &format!("top-{}", k + 1));
    }
}

#[test]
fn per_class_scores_and_averages_match_sklearn() {
    let f = fixture();
    let e = evaluated(&f);
    let (p, r, f1) = (
        floats(&f.oracle["precision"]),
        floats(&f.oracle["recall"]),
        floats(&f.oracle["f1"]),
    );
    let support = floats(&f.oracle["support"]);
    for (k, row) in e.per_class.iter().enumerate() {
        assert_eq!(row.class, f.classes[k]);
        assert_eq!(row.support as f64, support[k], "support of {}", row.class);
        close(row.precision, p[k], &format!("precision of {}", row.class));
        close(row.recall, r[k], &format!("recall of {}", row.class));
        close(row.f1, f1[k], &format!("f1 of {}", row.class));
    }
    // Class 5 has support but is never predicted: precision 0 (zero_division=0).
    let never = &e.per_class[5];
    assert!(never.support > 0 && never.predicted == 0);
    assert_eq!(never.precision, 0.0);
    for (avg, got) in [("macro", e.macro_avg), ("weighted", e.weighted_avg)] {
        let o = &f.oracle[avg];
        close(
            got.precision,
            o["precision"].as_f64().unwrap(),
            &format!("{avg} precision"),
        );
        close(
            got.recall,
            o["recall"].as_f64().unwrap(),
            &format!("{avg} recall"),
        );
        close(got.f1, o["f1"].as_f64().unwrap(), &format!("{avg} f1"));
    }
}

#[test]
fn confusion_matrix_matches_sklearn() {
    let f = fixture();
    let e = evaluated(&f);
    let oracle: Vec<Vec<u64>> = serde_json::from_value(f.oracle["confusion"].clone()).unwrap();
    assert_eq!(e.confusion, oracle);
    let predicted: u64 = e.per_class.iter().map(|p| p.predicted).sum();
    assert_eq!(predicted, 200);
}

#[test]
fn reliability_and_ece_match_numpy() {
    let f = fixture();
    let e = evaluated(&f);
    let ece = f.oracle["ece"].as_f64().unwrap();
    close(e.ece, ece, "ECE");
    close(
        expected_calibration_error(&f.probs, &f.labels, f.classes.len(), 15),
        ece,
        "expected_calibration_error",
    );
    let bins = f.oracle["reliability"].as_array().unwrap();
    assert_eq!(e.reliability.len(), 15);
    for (b, (got, want)) in e.reliability.iter().zip(bins).enumerate() {
        assert_eq!(
            got.count,
            want["count"].as_u64().unwrap(),
            "count of bin {b}"
        );
        match (want["confidence"].as_f64(), want["accuracy"].as_f64()) {
            (Some(c), Some(a)) => {
                close(got.confidence, c, &format!("confidence of bin {b}"));
                close(got.accuracy, a, &format!("accuracy of bin {b}"));
            }
            _ => assert!(got.confidence.is_nan() && got.accuracy.is_nan()),
        }
        close(got.lower, b as f64 / 15.0, "bin edge");
    }
}

#[test]
fn entropy_and_least_confident_match_numpy() {
    let f = fixture();
    let e = evaluated(&f);
    close(
        e.mean_entropy,
        f.oracle["mean_entropy"].as_f64().unwrap(),
        "mean entropy",
    );
    let order: Vec<usize> = serde_json::from_value(f.oracle["least_confident"].clone()).unwrap();
    let got: Vec<usize> = e.least_confident.iter().map(|u| u.index).collect();
    assert_eq!(got, order);
    let (conf, margin) = (floats(&f.oracle["confidence"]), floats(&f.oracle["margin"]));
    for u in &e.least_confident {
        close(u.confidence, conf[u.index], "confidence");
        close(u.margin, margin[u.index], "margin");
        assert_eq!(u.true_class, f.classes[f.labels[u.index]]);
        assert_eq!(u.correct, u.predicted == u.true_class);
    }
    assert!(
        evaluate(&f.probs, &f.labels, &f.classes, 3)
            .least_confident
            .len()
            == 3
    );
}

#[test]
fn temperature_scaling_on_the_fixture_lowers_the_nll() {
    let f = fixture();
    let c = f.classes.len();
    let fit = fit_temperature(&f.probs, &f.labels, c);
    assert!(fit.log_loss_after <= fit.log_loss_before, "{fit:?}");
    close(
        fit.log_loss_before,
        f.oracle["log_loss_kaggle"].as_f64().unwrap(),
        "before",
    );
    // Scaling never changes the top-1 class, so top-1 accuracy stays.
    let scaled = apply_temperature(&f.probs, c, fit.temperature);
    let e = evaluate(&scaled, &f.labels, &f.classes, 0);
    close(e.top_k[0], evaluated(&f).top_k[0], "top-1 after scaling");
}

fn csv_rows(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn report_writes_every_file() {
    let f = fixture();
    let e = evaluated(&f);
    let ids: Vec<String> = (0..200).map(|i| format!("{}", 1000 + i)).collect();
    let paths: Vec<String> = (0..200)
        .map(|i| format!("train/{}/{}.jpg", f.classes[f.labels[i]], 1000 + i))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report");
    let files = write_report(&out, &e, &ids, &paths, "fixture").unwrap();
    for p in files.all() {
        assert!(p.starts_with(&out) && p.is_file(), "{}", p.display());
    }

    let json: Value = serde_json::from_str(&std::fs::read_to_string(&files.json).unwrap()).unwrap();
    assert_eq!(json["n"], 200);
    assert_eq!(json["per_class"].as_array().unwrap().len(), 7);

    let per_class = csv_rows(&files.per_class_csv);
    assert_eq!(per_class.len(), 1 + 7);
    assert_eq!(
        per_class[0],
        "class,support,predicted,precision,recall,f1,log_loss"
    );
    let least = csv_rows(&files.least_confident_csv);
    assert_eq!(least.len(), 1 + 20);
    assert_eq!(
        least[0],
        "rank,image,path,predicted,confidence,margin,entropy,true_class,correct"
    );
    let first = &e.least_confident[0];
    assert!(
        least[1].starts_with(&format!("1,{},{},", ids[first.index], paths[first.index])),
        "{}",
        least[1]
    );
    assert_eq!(least[1].split(',').count(), 9);

    for png in [&files.confusion_png, &files.reliability_png] {
        let img = image::open(png).unwrap().to_rgb8();
        assert!(
            img.width() > 200 && img.height() > 200,
            "{:?}",
            img.dimensions()
        );
        assert!(
            img.width() < 2500 && img.height() < 2500,
            "{:?}",
            img.dimensions()
        );
    }
    let summary = std::fs::read_to_string(&files.summary_md).unwrap();
    assert!(summary.starts_with("# fixture"), "{summary}");
    assert!(summary.contains("top-5 accuracy"), "{summary}");
    assert!(summary.contains(&ids[first.index]), "{summary}");
    if std::env::var_os("PLANKTON_KEEP_REPORT").is_some() {
        let keep = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("evaluate_report");
        std::fs::create_dir_all(&keep).unwrap();
        for p in files.all() {
            std::fs::copy(p, keep.join(p.file_name().unwrap())).unwrap();
        }
    }
}

#[test]
fn report_of_121_classes_stays_readable_size() {
    // Synthetic 121-class evaluation: images under 2,500 px, all labels kept.
    let c = 121;
    let classes: Vec<String> = (0..c)
        .map(|i| format!("class_{i:03}_long_name_here"))
        .collect();
    let n = 600;
    let mut probs = vec![0.0f32; n * c];
    let labels: Vec<usize> = (0..n).map(|i| (i * 7) % c).collect();
    for (i, &y) in labels.iter().enumerate() {
        for j in 0..c {
            probs[i * c + j] = 1.0 + ((i * 31 + j * 17) % 13) as f32;
        }
        probs[i * c + if i % 3 == 0 { (y + 1) % c } else { y }] += 300.0 + (i % 50) as f32 * 20.0;
    }
    let e = evaluate(&probs, &labels, &classes, 50);
    let dir = tempfile::tempdir().unwrap();
    let files = write_report(dir.path(), &e, &[], &[], "").unwrap();
    let img = image::open(&files.confusion_png).unwrap().to_rgb8();
    assert!(
        img.width() < 2500 && img.height() < 2500,
        "{:?}",
        img.dimensions()
    );
    assert!(img.width() > 121 * 10, "{:?}", img.dimensions());
    assert_eq!(csv_rows(&files.per_class_csv).len(), 1 + 121);
    assert_eq!(csv_rows(&files.least_confident_csv).len(), 1 + 50);
    if std::env::var_os("PLANKTON_KEEP_REPORT").is_some() {
        let keep = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("evaluate_report_121");
        std::fs::create_dir_all(&keep).unwrap();
        for p in files.all() {
            std::fs::copy(p, keep.join(p.file_name().unwrap())).unwrap();
        }
    }
}

#[test]
fn report_refuses_mismatched_ids_and_names_unwritable_paths() {
    let f = fixture();
    let e = evaluated(&f);
    let dir = tempfile::tempdir().unwrap();
    let err = write_report(dir.path(), &e, &["a".into()], &[], "x").unwrap_err();
    assert!(matches!(err, ReportError::Invalid(_)), "{err:?}");

    let file = dir.path().join("not_a_dir");
    std::fs::write(&file, b"x").unwrap();
    let target = file.join("report");
    let err = write_report(&target, &e, &[], &[], "x").unwrap_err();
    assert!(matches!(err, ReportError::Io { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&target.display().to_string()),
        "{err}"
    );
}

#[test]
fn csv_fields_with_commas_are_quoted() {
    let classes: Vec<String> = vec!["a,b".into(), "c\"d".into()];
    let e = evaluate(&[0.4, 0.6, 0.7, 0.3], &[0, 1], &classes, 2);
    let dir = tempfile::tempdir().unwrap();
    let files = write_report(
        dir.path(),
        &e,
        &["x".into(), "y".into()],
        &["p,1.jpg".into(), "p2.jpg".into()],
        "quoting",
    )
    .unwrap();
    let per_class = std::fs::read_to_string(&files.per_class_csv).unwrap();
    assert!(per_class.contains("\n\"a,b\",1,1,"), "{per_class}");
    assert!(per_class.contains("\n\"c\"\"d\",1,1,"), "{per_class}");
    let least = std::fs::read_to_string(&files.least_confident_csv).unwrap();
    assert!(least.contains("\"p,1.jpg\""), "{least}");
}
