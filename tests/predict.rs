//! Prediction end to end: a small trained run predicts with TTA into Parquet (read back by
//! pyarrow, pandas and DuckDB, scored against scikit-learn), a Kaggle submission in the
//! sampleSubmission order, bad images kept as rows with their reason, calibration stored and
//! applied, and clear errors for bad arguments.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use plankton::config::PipelineConfig;
use plankton::predict::job::{self, PredictOptions, Subset, Weights};
use plankton::sinks::parquet::Predictions;
use plankton::sources::synth::{generate, SynthOptions};
use plankton::train::{self, TrainOptions};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_plankton"))
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "{cmd:?} should have failed");
    String::from_utf8_lossy(&out.stderr).to_string()
}

struct Trained {
    _dir: tempfile::TempDir,
    data: PathBuf,
    run: PathBuf,
    final_log_loss: f64,
    final_top1: f64,
}

/// One small run shared by the tests of this file: 4 classes, 23x23 patches, 80 steps.
fn trained() -> &'static Trained {
    static RUN: OnceLock<Trained> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        generate(
            &SynthOptions {
                classes: 4,
                per_class: 20,
                test: 12,
                seed: 5,
                threads: 0,
            },
            &data,
        )
        .unwrap();
        let config = PipelineConfig::from_toml_str(
            &(common::tiny_net_toml("tiny-predict", 3, 0.125)
                + r#"
[train]
steps = 80
learning_rate = 0.01
validate_every = 40
checkpoint_every = 40
threads = 1
[split]
valid_fraction = 0.25
[tta]
transforms = 8
"#),
            Path::new("tiny-predict.toml"),
        )
        .unwrap();
        let run = dir.path().join("run");
        let rt = tokio::runtime::Runtime::new().unwrap();
        let opts = TrainOptions {
            config,
            data: data.clone(),
            out: run.clone(),
            resume: false,
            device: tch::Device::Cpu,
            split_file: None,
            init_from: None,
            stop: None,
        };
        let summary = train::run(&opts, rt.handle(), &mut |_| {}).unwrap();
        let s = summary.final_scores.expect("validation scores");
        Trained {
            _dir: dir,
            data,
            run,
            final_log_loss: s.log_loss,
            final_top1: s.top1,
        }
    })
}

fn predict(opts: &PredictOptions) -> job::PredictSummary {
    let rt = tokio::runtime::Runtime::new().unwrap();
    job::run(opts, rt.handle(), &mut |_| {}).unwrap()
}

/// The Python with pyarrow, pandas, DuckDB and scikit-learn (`make test` installs it).
fn python() -> Option<PathBuf> {
    let p = std::env::var_os("PLANKTON_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".pyenv-tools/bin/python"));
    let ok = p.is_file()
        && Command::new(&p)
            .args(["-c", "import pyarrow, pandas, duckdb, sklearn"])
            .output()
            .is_ok_and(|o| o.status.success());
    if ok {
        Some(p)
    } else if std::env::var_os("PLANKTON_REQUIRE_PYTHON").is_some() {
        panic!(
            "{}: no Python with pyarrow, pandas, duckdb and scikit-learn (run `make pytools`)",
            p.display()
        );
    } else {
        eprintln!("skipping the Python reader check: {} lacks pyarrow/pandas/duckdb/sklearn (`make test` installs them)", p.display());
        None
    }
}

#[test]
fn a_single_pass_scores_what_the_trainer_measured() {
    let t = trained();
    let mut opts = PredictOptions::new(
        &t.run,
        vec![t.data.clone()],
        &t.run.join("../valid-1.parquet"),
    );
    opts.subset = Subset::Valid;
    opts.tta = Some(1);
    opts.weights = Weights::Final;
    opts.calibrate = false;
    let s = predict(&opts);
    let scores = s.scores.expect("validation images are labelled");
    assert_eq!(s.views, 1);
    assert!(
        (scores.log_loss - t.final_log_loss).abs() < 1e-5,
        "{} vs trainer {}",
        scores.log_loss,
        t.final_log_loss
    );
    assert_eq!(scores.top1, t.final_top1);
}

#[test]
fn tta_predictions_read_cleanly_in_pyarrow_pandas_duckdb_and_match_sklearn() {
    let t = trained();
    let dir = tempfile::tempdir().unwrap();
    let pred = dir.path().join("test.parquet");
    let text = run_ok(
        bin()
            .arg("predict")
            .arg("--model")
            .arg(&t.run)
            .arg("--data")
            .arg(&t.data)
            .arg("--out")
            .arg(&pred),
    );
    assert!(text.contains("x 8 view(s)"), "{text}");
    let p = Predictions::read(&pred).unwrap();
    assert_eq!(p.rows.len(), 12);
    assert_eq!(p.class_names.len(), 4);
    assert_eq!(p.model["tta"]["transforms"], 8);
    assert!(p
        .rows
        .iter()
        .all(|r| r.label.is_some() && r.views == 8 && r.error.is_none()));
    let report = dir.path().join("report");
    run_ok(
        bin()
            .arg("evaluate")
            .arg("--predictions")
            .arg(&pred)
            .arg("--data")
            .arg(&t.data)
            .arg("--out")
            .arg(&report),
    );
    for f in [
        "report.json",
        "summary.md",
        "per_class.csv",
        "least_confident.csv",
        "confusion_matrix.png",
        "reliability.png",
    ] {
        assert!(report.join(f).is_file(), "{f} missing");
    }
    // Another dataset whose test images have the same names but other classes: scoring against
    // it would be silently wrong, so it is refused.
    let other = dir.path().join("other");
    generate(
        &SynthOptions {
            classes: 4,
            per_class: 20,
            test: 12,
            seed: 6,
            threads: 0,
        },
        &other,
    )
    .unwrap();
    let err = run_err(
        bin()
            .arg("evaluate")
            .arg("--predictions")
            .arg(&pred)
            .arg("--data")
            .arg(&other)
            .arg("--out")
            .arg(dir.path().join("report-other")),
    );
    assert!(err.contains("another true class than --data"), "{err}");
    let Some(py) = python() else { return };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/check_predictions.py");
    let out = run_ok(
        Command::new(py)
            .arg(script)
            .arg(&pred)
            .arg(report.join("report.json"))
            .args(["12", "8"]),
    );
    assert!(out.contains("\"rows\": 12"), "{out}");
}

#[test]
fn tta_views_change_the_prediction_and_aggregations_agree_on_one_view() {
    let t = trained();
    let dir = tempfile::tempdir().unwrap();
    let run = |tta: usize, agg: &str| -> Vec<Vec<f32>> {
        let out = dir.path().join(format!("{tta}-{agg}.parquet"));
        run_ok(
            bin()
                .arg("predict")
                .arg("--model")
                .arg(&t.run)
                .arg("--data")
                .arg(&t.data)
                .arg("--out")
                .arg(&out)
                .args(["--tta", &tta.to_string(), "--aggregation", agg]),
        );
        Predictions::read(&out)
            .unwrap()
            .rows
            .into_iter()
            .map(|r| r.probabilities.unwrap())
            .collect()
    };
    let one = run(1, "mean-probability");
    assert_eq!(one, run(1, "entropy-weighted"));
    let eight = run(8, "mean-probability");
    assert_ne!(one, eight);
    let geometric = run(8, "geometric-mean");
    assert_ne!(eight, geometric);
    for (a, b) in geometric.iter().zip(run(8, "mean-log-probability")) {
        for (x, y) in a.iter().zip(b) {
            assert!(
                (x - y).abs() < 1e-6,
                "geometric mean and mean log-probability differ: {x} {y}"
            );
        }
    }
}

#[test]
fn bad_images_keep_their_row_and_the_submission_follows_the_sample_header() {
    let t = trained();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("test")).unwrap();
    for e in std::fs::read_dir(t.data.join("test")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), data.join("test").join(e.file_name())).unwrap();
    }
    std::fs::write(data.join("test/zero.jpg"), b"").unwrap();
    std::fs::write(data.join("test/notes.txt"), b"not an image").unwrap();
    let good = std::fs::read_dir(t.data.join("test"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(data.join("test/truncated.jpg"), &bytes[..bytes.len() / 3]).unwrap();
    // The sample submission lists the classes in another order than the model.
    let classes: Vec<String> = std::fs::read_to_string(t.run.join("classes.txt"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let mut header: Vec<String> = classes.clone();
    header.reverse();
    std::fs::write(
        data.join("sampleSubmission.csv"),
        format!("image,{}\n", header.join(",")),
    )
    .unwrap();

    let pred = dir.path().join("p.parquet");
    let sub = dir.path().join("sub.csv");
    let text = run_ok(
        bin()
            .arg("predict")
            .arg("--model")
            .arg(&t.run)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&pred)
            .arg("--submission")
            .arg(&sub)
            .args(["--tta", "3"]),
    );
    assert!(text.contains("set aside"), "{text}");
    let p = Predictions::read(&pred).unwrap();
    assert_eq!(p.rows.len(), 15);
    let failed: Vec<_> = p
        .rows
        .iter()
        .filter(|r| r.probabilities.is_none())
        .collect();
    let failed_ids: Vec<&str> = failed.iter().map(|r| r.image_id.as_str()).collect();
    assert_eq!(failed_ids, ["notes.txt", "truncated.jpg", "zero.jpg"]);
    for r in &failed {
        let e = r.error.as_deref().unwrap();
        assert!(e.contains(&r.image_id), "the reason names the file: {e}");
        assert_eq!(r.views, 0);
    }
    let csv = std::fs::read_to_string(&sub).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], format!("image,{}", header.join(",")));
    assert_eq!(
        lines.len(),
        16,
        "every image has a row, unreadable ones too"
    );
    // Row of a good image: the columns are the model's probabilities, reordered.
    let row = p.rows.iter().find(|r| r.probabilities.is_some()).unwrap();
    let line = lines
        .iter()
        .find(|l| l.starts_with(&format!("{},", row.image_id)))
        .unwrap();
    let values: Vec<f64> = line
        .split(',')
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect();
    let probs = row.probabilities.as_ref().unwrap();
    let sum: f64 = probs.iter().map(|&x| x as f64).sum();
    for (col, class) in header.iter().enumerate() {
        let m = classes.iter().position(|c| c == class).unwrap();
        assert!((values[col] - probs[m] as f64 / sum).abs() < 1e-6);
    }
    let zero = lines.iter().find(|l| l.starts_with("zero.jpg,")).unwrap();
    let total: f64 = zero
        .split(',')
        .skip(1)
        .map(|v| v.parse::<f64>().unwrap())
        .sum();
    assert!(
        (total - 1.0).abs() < 1e-5,
        "fallback row is a distribution: {zero}"
    );
}

#[test]
fn calibration_is_fitted_stored_and_applied() {
    let t = trained();
    // A copy of the run, so the other tests keep predicting uncalibrated.
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    for f in [
        "pipeline.toml",
        "classes.txt",
        "split.csv",
        "zmuv.json",
        "best.safetensors",
        "model.safetensors",
    ] {
        std::fs::copy(t.run.join(f), run.join(f)).unwrap();
    }
    let valid = dir.path().join("valid.parquet");
    run_ok(
        bin()
            .arg("predict")
            .arg("--model")
            .arg(&run)
            .arg("--data")
            .arg(&t.data)
            .args(["--subset", "valid"])
            .arg("--out")
            .arg(&valid),
    );
    let err = run_err(
        bin()
            .arg("calibrate")
            .arg("--model")
            .arg(&run)
            .arg("--predictions")
            .arg(&valid),
    );
    assert!(
        err.contains("only 20 labelled images") && !run.join("calibration.json").exists(),
        "{err}"
    );
    let text = run_ok(
        bin()
            .arg("calibrate")
            .arg("--model")
            .arg(&run)
            .arg("--predictions")
            .arg(&valid)
            .args(["--min-images", "20"]),
    );
    assert!(text.contains("temperature"), "{text}");
    let fit: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("calibration.json")).unwrap())
            .unwrap();
    let temperature = fit["temperature"].as_f64().unwrap();
    assert!(
        fit["log_loss_after"].as_f64().unwrap() <= fit["log_loss_before"].as_f64().unwrap() + 1e-9
    );

    let (raw, scaled) = (
        dir.path().join("raw.parquet"),
        dir.path().join("scaled.parquet"),
    );
    run_ok(
        bin()
            .arg("predict")
            .arg("--model")
            .arg(&run)
            .arg("--data")
            .arg(&t.data)
            .arg("--out")
            .arg(&raw)
            .arg("--no-calibration"),
    );
    run_ok(
        bin()
            .arg("predict")
            .arg("--model")
            .arg(&run)
            .arg("--data")
            .arg(&t.data)
            .arg("--out")
            .arg(&scaled),
    );
    let (raw, scaled) = (
        Predictions::read(&raw).unwrap(),
        Predictions::read(&scaled).unwrap(),
    );
    assert!(raw.model["temperature"].is_null());
    assert_eq!(scaled.model["temperature"].as_f64().unwrap(), temperature);
    for (a, b) in raw.rows.iter().zip(&scaled.rows) {
        let (a, b) = (
            a.probabilities.as_ref().unwrap(),
            b.probabilities.as_ref().unwrap(),
        );
        let expected = plankton::evaluate::calibration::apply_temperature(a, a.len(), temperature);
        for (x, y) in expected.iter().zip(b) {
            assert!((x - y).abs() < 1e-6);
        }
    }
    // Refitting on calibrated predictions undoes the stored temperature first: same answer.
    let valid2 = dir.path().join("valid2.parquet");
    run_ok(
        bin()
            .arg("predict")
            .arg("--model")
            .arg(&run)
            .arg("--data")
            .arg(&t.data)
            .args(["--subset", "valid"])
            .arg("--out")
            .arg(&valid2),
    );
    let (refit, _) = plankton::evaluate::fit_calibration(&valid2, &[]).unwrap();
    assert!(
        (refit.temperature / temperature - 1.0).abs() < 1e-3,
        "{} vs {temperature}",
        refit.temperature
    );
}

#[test]
fn bad_arguments_name_the_problem() {
    let t = trained();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.parquet");
    let err = run_err(
        bin()
            .arg("predict")
            .arg("--model")
            .arg(dir.path().join("nope"))
            .arg("--data")
            .arg(&t.data)
            .arg("--out")
            .arg(&out),
    );
    assert!(
        err.contains("nope") && err.contains("not a usable run directory"),
        "{err}"
    );
    let err = run_err(
        bin()
            .arg("predict")
            .arg("--model")
            .arg(&t.run)
            .arg("--data")
            .arg(dir.path().join("missing"))
            .arg("--out")
            .arg(&out),
    );
    assert!(
        err.contains("missing") && err.contains("no such file"),
        "{err}"
    );
    let err = run_err(
        bin()
            .arg("predict")
            .arg("--model")
            .arg(&t.run)
            .arg("--data")
            .arg(&t.data)
            .arg("--out")
            .arg(&out)
            .args(["--tta", "20000"]),
    );
    assert!(err.contains("tta.transforms"), "{err}");
    assert!(!out.exists(), "no output on failure");
    // A folder given as the submission file is refused before any prediction is made.
    let err = run_err(
        bin()
            .arg("predict")
            .arg("--model")
            .arg(&t.run)
            .arg("--data")
            .arg(&t.data)
            .arg("--out")
            .arg(&out)
            .arg("--submission")
            .arg(dir.path()),
    );
    assert!(err.contains("is a folder"), "{err}");
    assert!(!out.exists(), "predictions written before the refusal");
    let err = run_err(
        bin()
            .arg("evaluate")
            .arg("--predictions")
            .arg(dir.path().join("none.parquet")),
    );
    assert!(err.contains("none.parquet"), "{err}");
    std::fs::write(dir.path().join("bad.parquet"), b"PAR1 garbage").unwrap();
    let err = run_err(
        bin()
            .arg("evaluate")
            .arg("--predictions")
            .arg(dir.path().join("bad.parquet")),
    );
    assert!(
        err.contains("bad.parquet") && err.contains("not a plankton predictions file"),
        "{err}"
    );
}

#[test]
fn a_plain_folder_and_single_files_are_predicted_too() {
    let t = trained();
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("camera");
    std::fs::create_dir_all(folder.join("2026-11-28")).unwrap();
    let mut tests: Vec<PathBuf> = std::fs::read_dir(t.data.join("test"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    tests.sort();
    std::fs::copy(&tests[0], folder.join("a.jpg")).unwrap();
    std::fs::copy(&tests[1], folder.join("2026-11-28/b.jpg")).unwrap();
    std::fs::write(folder.join(".hidden.jpg"), b"ignored").unwrap();
    let out = dir.path().join("p.parquet");
    let sub = dir.path().join("s.csv");
    run_ok(
        bin()
            .arg("predict")
            .arg("--model")
            .arg(&t.run)
            .arg("--data")
            .arg(&folder)
            .arg(&tests[2])
            .arg("--out")
            .arg(&out)
            .arg("--submission")
            .arg(&sub)
            .args(["--tta", "2"]),
    );
    let p = Predictions::read(&out).unwrap();
    let ids: Vec<&str> = p.rows.iter().map(|r| r.image_id.as_str()).collect();
    let third = tests[2].file_name().unwrap().to_str().unwrap();
    assert_eq!(ids, ["2026-11-28/b.jpg", "a.jpg", third]);
    assert!(p.rows.iter().all(|r| r.label.is_none() && r.views == 2));
    let header = std::fs::read_to_string(&sub)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string();
    let classes = std::fs::read_to_string(t.run.join("classes.txt")).unwrap();
    assert_eq!(
        header,
        format!("image,{}", classes.lines().collect::<Vec<_>>().join(",")),
        "model class order without a sample submission"
    );
}
