//! Ensemble blending: the weight fit against scipy's fmin_l_bfgs_b
//! (tests/fixtures/blend/gen_blend_fixture.py), and `plankton blend` on prediction files.

use std::path::{Path, PathBuf};
use std::process::Command;

use plankton::blend::{self, lbfgs, ApplyOptions, BlendError, FitOptions, Select, Weighting};
use plankton::rng::{Purpose, Stream};
use plankton::scoring::kaggle_log_loss;
use plankton::sinks::parquet::{PredictionRow, PredictionWriter, Predictions};
use serde_json::Value;

// ---- golden test against scipy --------------------------------------------------------------

struct Golden {
    members: Vec<Vec<f32>>,
    labels: Vec<usize>,
    classes: usize,
    json: Value,
}

fn golden() -> Golden {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/blend");
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("blend_fixture.json")).unwrap())
            .unwrap();
    let arr = plankton::npy::read(&dir.join("members.npy")).unwrap();
    let (k, n, c) = (arr.shape[0], arr.shape[1], arr.shape[2]);
    assert_eq!((k, n, c), (5, 600, 10));
    // float32 read back as f64: the cast back is exact.
    let data: Vec<f32> = arr.data.iter().map(|&v| v as f32).collect();
    let members = data.chunks_exact(n * c).map(|m| m.to_vec()).collect();
    let labels = json["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    Golden {
        members,
        labels,
        classes: c,
        json,
    }
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn refs(m: &[Vec<f32>]) -> Vec<&[f32]> {
    m.iter().map(|v| v.as_slice()).collect()
}

/// Largest |ours - scipy| over the weights, and the relative loss difference.
fn compare(fit: &blend::BlendFit, oracle: &Value) -> (f64, f64) {
    let w = floats(&oracle["weights"]);
    let dw = fit
        .weights
        .iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    let loss = oracle["loss"].as_f64().unwrap();
    (dw, (fit.log_loss - loss).abs() / loss)
}

#[test]
fn golden_fixture_records_its_tools() {
    let g = golden();
    let v = &g.json["versions"];
    assert!(v["scipy"].is_string() && v["numpy"].is_string(), "{v}");
    // The fixture's single-member losses are the crate's scorer.
    for (m, want) in g.members.iter().zip(floats(&g.json["single_log_loss"])) {
        let got = kaggle_log_loss(m, &g.labels, g.classes);
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    }
    // W = 0 (uniform weights) scores what scipy's objective scored there.
    let t = blend::LabelTerms::new(&refs(&g.members), &g.labels, g.classes);
    let at_zero = t.log_loss(&[0.2; 5]);
    assert!((at_zero - g.json["loss_at_zero"].as_f64().unwrap()).abs() < 1e-12);
}

#[test]
fn weights_match_scipy_with_the_reference_settings() {
    let g = golden();
    let fit = blend::fit_weights(&refs(&g.members), &g.labels, g.classes);
    assert!(fit.converged, "{:?}", fit.stop);
    let (dw, dl) = compare(&fit, &g.json["reference"]);
    eprintln!(
        "reference settings: |dw| <= {dw:e}, relative loss difference {dl:e}, {} iterations",
        fit.iterations
    );
    assert!(dl <= 1e-12, "loss differs by {dl:e} (relative)");
    // The same iterates as scipy here (measured: 6e-17); the margin is for summation order.
    assert!(dw <= 1e-8, "weights differ by up to {dw:e}");
    assert!((fit.weights.iter().sum::<f64>() - 1.0).abs() < 1e-12);
}

#[test]
fn weights_match_scipy_at_tight_tolerances() {
    let g = golden();
    let opts = lbfgs::Options {
        factr: 10.0,
        pgtol: 1e-12,
        ..Default::default()
    };
    let fit = blend::fit_weights_with(&refs(&g.members), &g.labels, g.classes, &opts);
    assert!(fit.converged, "{:?}", fit.stop);
    let (dw, dl) = compare(&fit, &g.json["tight"]);
    eprintln!(
        "tight settings: |dw| <= {dw:e}, relative loss difference {dl:e}, {} iterations",
        fit.iterations
    );
    assert!(dl <= 1e-12, "loss differs by {dl:e} (relative)");
    // Measured: 1.1e-8; past the loss minimum the weights are fixed only to ~sqrt(eps).
    assert!(dw <= 1e-7, "weights differ by up to {dw:e}");
    // The worst member alone earns weight: its errors are its own.
    assert!(fit.weights[3] > 0.05, "{:?}", fit.weights);
}

// ---- prediction files ------------------------------------------------------------------------

const CLASSES: [&str; 4] = ["acantharia", "copepod", "diatom", "jelly"];

fn class_names() -> Vec<String> {
    CLASSES.iter().map(|s| s.to_string()).collect()
}

/// A dataset folder in the competition layout (train/<class>/<file>.jpg; the files are never
/// decoded) and its rows' (image id, source path, label).
fn dataset(root: &Path, n: usize) -> Vec<(String, String, usize)> {
    let mut rows = Vec::new();
    for i in 0..n {
        let label = (i * 7 + i / 3) % CLASSES.len();
        let dir = root.join("train").join(CLASSES[label]);
        std::fs::create_dir_all(&dir).unwrap();
        let id = format!("{}.jpg", 1000 + i);
        let path = dir.join(&id);
        std::fs::write(&path, b"not decoded").unwrap();
        rows.push((id, path.display().to_string(), label));
    }
    rows
}

fn softmax(z: &[f64]) -> Vec<f32> {
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| (v / s) as f32).collect()
}

/// Member probabilities: softmax(signal * onehot + shared * noise_shared + own * noise_own).
/// `key` picks the member's own noise; the shared noise is the same for every member.
fn member(labels: &[usize], signal: f64, shared: f64, own: f64, key: u64) -> Vec<Vec<f32>> {
    labels
        .iter()
        .enumerate()
        .map(|(i, &y)| {
            let mut s = Stream::new(7, Purpose::Other, 0, i as u64);
            let mut o = Stream::new(7, Purpose::Other, key, i as u64);
            let z: Vec<f64> = (0..CLASSES.len())
                .map(|c| {
                    let hit = if c == y { signal } else { 0.0 };
                    hit + shared * s.normal() + own * o.normal()
                })
                .collect();
            softmax(&z)
        })
        .collect()
}

fn write_member(
    path: &Path,
    classes: Vec<String>,
    model_id: &str,
    rows: &[(String, String, usize)],
    probs: &[Vec<f32>],
) {
    let mut w = PredictionWriter::create(
        path,
        classes,
        model_id,
        &serde_json::json!({"model_id": model_id}),
        3,
    )
    .unwrap();
    for ((id, path, _), p) in rows.iter().zip(probs) {
        w.push(PredictionRow {
            image_id: id.clone(),
            source_path: path.clone(),
            label: None,
            probabilities: Some(p.clone()),
            views: 1,
            error: None,
            unknown: Default::default(),
        })
        .unwrap();
    }
    w.finish().unwrap();
}

struct Setup {
    dir: tempfile::TempDir,
    data: PathBuf,
    rows: Vec<(String, String, usize)>,
    files: Vec<PathBuf>,
    probs: Vec<Vec<Vec<f32>>>,
}

/// Three members: two good ones whose errors are correlated, one poorer with its own errors.
fn setup(n: usize) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let rows = dataset(&data, n);
    let labels: Vec<usize> = rows.iter().map(|r| r.2).collect();
    let specs = [(2.5, 1.2, 0.8), (2.3, 1.2, 0.9), (1.6, 0.0, 1.0)];
    let mut files = Vec::new();
    let mut probs = Vec::new();
    for (k, &(signal, shared, own)) in specs.iter().enumerate() {
        let p = member(&labels, signal, shared, own, k as u64 + 1);
        let f = dir.path().join(format!("m{k}_valid.parquet"));
        write_member(&f, class_names(), &format!("model-{k}"), &rows, &p);
        files.push(f);
        probs.push(p);
    }
    Setup {
        dir,
        data,
        rows,
        files,
        probs,
    }
}

fn read_probs(path: &Path) -> (Predictions, Vec<Option<Vec<f32>>>) {
    let p = Predictions::read(path).unwrap();
    let probs = p.rows.iter().map(|r| r.probabilities.clone()).collect();
    (p, probs)
}

#[test]
fn fit_weights_sum_to_one_and_beat_the_best_member() {
    let s = setup(240);
    let out = s.dir.path().join("blend.parquet");
    let mut o = FitOptions::new(s.files.clone(), vec![s.data.clone()], &out);
    o.select = Select::All;
    o.report = Some(s.dir.path().join("report.json"));
    let r = blend::fit(&o).unwrap().report;
    let sum: f64 = r.members.iter().map(|m| m.weight).sum();
    assert!((sum - 1.0).abs() < 1e-12, "{sum}");
    let best = r
        .members
        .iter()
        .map(|m| m.single_log_loss)
        .fold(f64::INFINITY, f64::min);
    assert!(
        r.log_loss < best,
        "blend {} vs best single {best}",
        r.log_loss
    );
    assert!(r.fit.converged);
    assert_eq!((r.fit_rows, r.rows, r.error_rows), (240, 240, 0));

    // The file: same columns, labels from the dataset, the blend of the members' rows.
    let (p, probs) = read_probs(&out);
    assert_eq!(p.class_names, class_names());
    assert_eq!(p.model_ids, vec![r.model_id.clone()]);
    let members = &p.model["blend"]["members"];
    assert_eq!(members.as_array().unwrap().len(), 3);
    assert_eq!(members[2]["model_ids"][0], "model-2");
    for (i, row) in p.rows.iter().enumerate() {
        assert_eq!(row.label.as_deref(), Some(CLASSES[s.rows[i].2]));
        assert_eq!(row.views, 3);
        let want: Vec<f64> = (0..4)
            .map(|c| {
                (0..3)
                    .map(|k| r.members[k].weight * s.probs[k][i][c] as f64)
                    .sum()
            })
            .collect();
        for (a, b) in probs[i].as_ref().unwrap().iter().zip(&want) {
            assert!((*a as f64 - b).abs() < 1e-6);
        }
    }
    // The stored report says the same.
    let rep: Value =
        serde_json::from_str(&std::fs::read_to_string(s.dir.path().join("report.json")).unwrap())
            .unwrap();
    assert_eq!(rep["model_id"], r.model_id.as_str());
    assert!((rep["log_loss"].as_f64().unwrap() - r.log_loss).abs() < 1e-15);
}

#[test]
fn uniform_weights_average_the_members() {
    let s = setup(60);
    let out = s.dir.path().join("uniform.parquet");
    let mut o = FitOptions::new(s.files.clone(), vec![s.data.clone()], &out);
    o.select = Select::All;
    o.weighting = Weighting::Uniform;
    let r = blend::fit(&o).unwrap().report;
    for m in &r.members {
        assert!((m.weight - 1.0 / 3.0).abs() < 1e-15);
    }
    assert_eq!((r.fit.iterations, r.fit.stop), (0, None));
    let (_, probs) = read_probs(&out);
    for (i, p) in probs.iter().enumerate() {
        for (c, v) in p.as_ref().unwrap().iter().enumerate() {
            let mean = (0..3).map(|k| s.probs[k][i][c] as f64).sum::<f64>() / 3.0;
            assert!((*v as f64 - mean).abs() < 1e-6);
        }
    }
}

#[test]
fn apply_reproduces_the_fitted_blend() {
    let s = setup(150);
    let out = s.dir.path().join("fit.parquet");
    let weights = s.dir.path().join("weights.json");
    let mut o = FitOptions::new(s.files.clone(), vec![s.data.clone()], &out);
    o.weights_out = Some(weights.clone());
    o.folds = 3;
    let fitted = blend::fit(&o).unwrap().report;
    let selected: Vec<PathBuf> = fitted
        .members
        .iter()
        .filter(|m| m.selected)
        .map(|m| m.file.clone())
        .collect();

    // Every member, and only the weighted ones, give the same file.
    for given in [s.files.clone(), selected] {
        let applied = s.dir.path().join("applied.parquet");
        let a = blend::apply(&ApplyOptions::new(&weights, given, &applied)).unwrap();
        assert_eq!(a.model_id, fitted.model_id);
        let (p0, want) = read_probs(&out);
        let (p1, got) = read_probs(&applied);
        assert_eq!(p1.model_ids, p0.model_ids);
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            for (a, b) in g.as_ref().unwrap().iter().zip(w.as_ref().unwrap()) {
                assert!((a - b).abs() <= 1e-7, "{a} vs {b}");
            }
        }
    }
}

#[test]
fn apply_checks_count_order_and_classes() {
    let s = setup(60);
    let weights = s.dir.path().join("weights.json");
    let mut o = FitOptions::new(
        s.files.clone(),
        vec![s.data.clone()],
        &s.dir.path().join("b.parquet"),
    );
    o.select = Select::All;
    o.weights_out = Some(weights.clone());
    blend::fit(&o).unwrap();
    let out = s.dir.path().join("x.parquet");

    let err = blend::apply(&ApplyOptions::new(&weights, s.files[..2].to_vec(), &out)).unwrap_err();
    assert!(matches!(err, BlendError::WeightsFile { .. }), "{err}");
    assert!(err.to_string().contains("m2_valid.parquet"), "{err}");

    let swapped = vec![s.files[1].clone(), s.files[0].clone(), s.files[2].clone()];
    let err = blend::apply(&ApplyOptions::new(&weights, swapped.clone(), &out)).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("m1_valid.parquet") && text.contains("model-0"),
        "{text}"
    );
    let mut allow = ApplyOptions::new(&weights, swapped, &out);
    allow.allow_other_models = true;
    blend::apply(&allow).unwrap();

    let other = s.dir.path().join("other_classes.parquet");
    let mut names = class_names();
    names.swap(1, 2);
    write_member(&other, names, "model-2", &s.rows, &s.probs[2]);
    let files = vec![s.files[0].clone(), s.files[1].clone(), other.clone()];
    let err = blend::apply(&ApplyOptions::new(&weights, files, &out)).unwrap_err();
    assert!(matches!(err, BlendError::ClassMismatch { .. }), "{err}");
    assert!(err.to_string().contains("other_classes.parquet"), "{err}");
}

#[test]
fn mismatched_classes_and_missing_files_name_the_file() {
    let s = setup(40);
    let out = s.dir.path().join("b.parquet");
    let other = s.dir.path().join("five_classes.parquet");
    let mut names = class_names();
    names.push("extra".into());
    let five: Vec<Vec<f32>> = s.probs[0]
        .iter()
        .map(|p| [p.as_slice(), &[0.0]].concat())
        .collect();
    write_member(&other, names, "five", &s.rows, &five);
    let err = blend::fit(&FitOptions::new(
        vec![s.files[0].clone(), other],
        vec![s.data.clone()],
        &out,
    ))
    .unwrap_err();
    assert!(matches!(err, BlendError::ClassMismatch { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("five_classes.parquet") && text.contains("m0_valid.parquet"),
        "{text}"
    );

    let missing = s.dir.path().join("no_such_member.parquet");
    let err = blend::fit(&FitOptions::new(
        vec![s.files[0].clone(), missing],
        vec![s.data.clone()],
        &out,
    ))
    .unwrap_err();
    assert!(err.to_string().contains("no_such_member.parquet"), "{err}");

    let err = blend::fit(&FitOptions::new(
        vec![s.files[0].clone(), s.files[0].clone()],
        vec![],
        &out,
    ))
    .unwrap_err();
    assert!(matches!(err, BlendError::Duplicate { .. }), "{err}");
    assert!(!out.exists(), "no output after an error");
}

#[test]
fn rows_failing_in_any_member_become_error_rows() {
    let s = setup(90);
    // Member 1 failed on row 5 and lacks row 7; rows are matched by image id when the paths
    // differ (another mount of the same images).
    let f = s.dir.path().join("m1_partial.parquet");
    let mut w =
        PredictionWriter::create(&f, class_names(), "model-1", &serde_json::json!({}), 3).unwrap();
    for (i, ((id, path, _), p)) in s.rows.iter().zip(&s.probs[1]).enumerate().rev() {
        if i == 7 {
            continue;
        }
        w.push(PredictionRow {
            image_id: id.clone(),
            source_path: format!("/elsewhere/{}", path.rsplit('/').next().unwrap()),
            label: None,
            probabilities: (i != 5).then(|| p.clone()),
            views: if i == 5 { 0 } else { 1 },
            error: (i == 5).then(|| "corrupt JPEG".to_string()),
            unknown: Default::default(),
        })
        .unwrap();
    }
    w.finish().unwrap();
    let out = s.dir.path().join("b.parquet");
    let mut o = FitOptions::new(
        vec![s.files[0].clone(), f, s.files[2].clone()],
        vec![s.data.clone()],
        &out,
    );
    o.select = Select::All;
    let r = blend::fit(&o).unwrap().report;
    assert_eq!((r.rows, r.error_rows, r.fit_rows), (90, 2, 88));
    let (p, probs) = read_probs(&out);
    let e5 = p.rows[5].error.as_deref().unwrap();
    assert!(e5.contains("m1_partial.parquet: corrupt JPEG"), "{e5}");
    assert!(p.rows[7]
        .error
        .as_deref()
        .unwrap()
        .contains("not in m1_partial.parquet"));
    assert!(probs[5].is_none() && probs[7].is_none() && probs[6].is_some());
    assert_eq!(
        p.rows[5].source_path, s.rows[5].1,
        "rows keep the first member's path and order"
    );
}

#[test]
fn cv_selection_prefers_a_complementary_member_to_a_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let rows = dataset(&data, 300);
    let labels: Vec<usize> = rows.iter().map(|r| r.2).collect();
    let good = member(&labels, 2.5, 1.2, 0.5, 1);
    let other = member(&labels, 1.8, 0.0, 1.0, 2);
    let files: Vec<PathBuf> = ["good", "good_copy", "different"]
        .iter()
        .map(|n| dir.path().join(format!("{n}.parquet")))
        .collect();
    write_member(&files[0], class_names(), "good", &rows, &good);
    write_member(&files[1], class_names(), "good-again", &rows, &good);
    write_member(&files[2], class_names(), "different", &rows, &other);
    let out = dir.path().join("b.parquet");
    let summary = blend::fit(&FitOptions::new(files, vec![data], &out)).unwrap();
    let r = &summary.report;
    // Alone, the copy looks as good as the original and better than the other member...
    assert!(r.members[1].single_log_loss < r.members[2].single_log_loss);
    // ...but the second member added is the one with errors of its own.
    let sel = r.selection.as_ref().unwrap();
    assert_eq!(sel.steps[0].added, 0);
    assert_eq!(sel.steps[1].added, 2);
    assert!(sel.steps[1].cv_log_loss < sel.steps[0].cv_log_loss);
    assert_eq!(sel.chosen(), &[0, 2]);
    assert!(!r.members[1].selected && r.members[1].weight == 0.0);
    assert!(r.members[2].weight > 0.05, "{:?}", r.members);
    let text = summary.render();
    assert!(
        text.contains("<- chosen") && text.contains("different.parquet"),
        "{text}"
    );
}

#[test]
fn cv_needs_enough_rows() {
    let s = setup(4);
    let err = blend::fit(&FitOptions::new(
        s.files.clone(),
        vec![s.data.clone()],
        &s.dir.path().join("b.parquet"),
    ))
    .unwrap_err();
    assert!(
        matches!(err, BlendError::TooFewRows { rows: 4, folds: 5 }),
        "{err}"
    );
}

// ---- the command line -------------------------------------------------------------------------

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_plankton"))
}

fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_fits_then_applies() {
    let s = setup(120);
    let d = s.dir.path();
    let (ok, stdout, stderr) = run(bin()
        .arg("blend")
        .arg("--predictions")
        .args(&s.files)
        .arg("--data")
        .arg(&s.data)
        .arg("--out")
        .arg(d.join("blend.parquet"))
        .arg("--weights-out")
        .arg(d.join("w.json"))
        .arg("--report")
        .arg(d.join("r.json"))
        .args(["--folds", "4"]));
    assert!(ok, "{stdout}\n{stderr}");
    for want in [
        "single log loss",
        "m2_valid.parquet",
        "CV log loss",
        "blended log loss",
        "<- chosen",
    ] {
        assert!(stdout.contains(want), "`{want}` missing:\n{stdout}");
    }
    let (ok, stdout, stderr) = run(bin()
        .arg("blend")
        .arg("--weights")
        .arg(d.join("w.json"))
        .arg("--predictions")
        .args(&s.files)
        .arg("--out")
        .arg(d.join("applied.parquet")));
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("wrote 120 rows"), "{stdout}");
    let (_, a) = read_probs(&d.join("blend.parquet"));
    let (_, b) = read_probs(&d.join("applied.parquet"));
    assert_eq!(a.len(), b.len());

    let (ok, _, stderr) = run(bin()
        .arg("blend")
        .arg("--predictions")
        .arg(&s.files[0])
        .arg(d.join("missing.parquet"))
        .arg("--out")
        .arg(d.join("x.parquet")));
    assert!(!ok && stderr.contains("missing.parquet"), "{stderr}");
}
