//! Unknown-image scores end to end through the CLI: a synthetic set with one class held out of
//! training (a sampleSubmission.csv without it), `calibrate --unknown`, `predict --subset
//! held-out`, `evaluate` with the full dataset. The held-out class must be called unknown more
//! often than the known ones: a property of the scores that can fail.

use std::path::Path;
use std::process::{Command, Output};

use plankton::sinks::parquet::Predictions;
use plankton::sources::synth::{generate, SynthOptions};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_plankton"))
        .args(args)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

fn plankton(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "plankton {args:?} failed:\n{}",
        text(&out)
    );
    text(&out)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

const PIPELINE: &str = include_str!("../pipelines/synth-unknown.toml");

#[test]
fn a_held_out_class_is_called_unknown_more_often_than_the_known_ones() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let full = root.join("full");
    let summary = generate(
        &SynthOptions {
            classes: 6,
            per_class: 60,
            test: 0,
            seed: 3,
            threads: 2,
        },
        &full,
    )
    .unwrap();
    // The last class is held out: the training dataset's sampleSubmission.csv leaves it out,
    // and its folder is skipped as an unknown class folder.
    let held_out_class = summary.class_names.last().unwrap().clone();
    let known = &summary.class_names[..summary.class_names.len() - 1];
    let held = root.join("held");
    std::fs::create_dir_all(&held).unwrap();
    std::os::unix::fs::symlink(full.join("train"), held.join("train")).unwrap();
    std::fs::write(
        held.join("sampleSubmission.csv"),
        format!("image,{}\n", known.join(",")),
    )
    .unwrap();
    let pipeline = root.join("p.toml");
    std::fs::write(&pipeline, PIPELINE).unwrap();
    let model = root.join("run");
    plankton(&[
        "train",
        "--pipeline",
        s(&pipeline),
        "--data",
        s(&held),
        "--out",
        s(&model),
        "--device",
        "cpu",
    ]);

    // Before calibration: energy on every row, no Mahalanobis, no rule.
    let before = root.join("before.parquet");
    plankton(&[
        "predict",
        "--model",
        s(&model),
        "--data",
        s(&full),
        "--subset",
        "held-out",
        "--out",
        s(&before),
        "--device",
        "cpu",
    ]);
    let rows = Predictions::read(&before).unwrap().rows;
    assert_eq!(
        rows.len(),
        75 + 60,
        "validation images + the held-out class"
    );
    assert!(rows
        .iter()
        .all(|r| r.unknown.energy.is_some_and(f32::is_finite)
            && r.unknown.mahalanobis.is_none()
            && r.unknown.unknown.is_none()));

    // --unknown needs the dataset; a rate of 1 is refused.
    let out = run(&["calibrate", "--model", s(&model), "--unknown"]);
    assert!(!out.status.success() && text(&out).contains("--unknown needs --data"));
    let out = run(&[
        "calibrate",
        "--model",
        s(&model),
        "--unknown",
        "--data",
        s(&held),
        "--false-unknown-rate",
        "1",
        "--device",
        "cpu",
    ]);
    assert!(
        !out.status.success() && text(&out).contains("must be in [0, 1)"),
        "{}",
        text(&out)
    );
    assert!(!model.join("unknown.json").exists());

    let out = plankton(&[
        "calibrate",
        "--model",
        s(&model),
        "--unknown",
        "--data",
        s(&held),
        "--min-images",
        "20",
        "--device",
        "cpu",
    ]);
    assert!(
        out.contains("feature space on 225 training images"),
        "{out}"
    );
    let rule: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("unknown.json")).unwrap()).unwrap();
    assert_eq!(rule["score"], "mahalanobis");
    assert_eq!(rule["valid_images"], 75);
    // At most 5% of the 75 validation images lie above each threshold.
    for score in ["max_probability", "energy", "mahalanobis"] {
        let rate = rule["valid_false_unknown"][score].as_f64().unwrap();
        assert!(rate <= 0.05, "{score}: {rate}");
    }

    let preds = root.join("held_out.parquet");
    let out = plankton(&[
        "predict",
        "--model",
        s(&model),
        "--data",
        s(&full),
        "--subset",
        "held-out",
        "--out",
        s(&preds),
        "--device",
        "cpu",
    ]);
    assert!(
        out.contains("called unknown by the run's mahalanobis rule"),
        "{out}"
    );
    let p = Predictions::read(&preds).unwrap();
    assert_eq!(p.model["unknown"]["score"], "mahalanobis");
    let flagged = |held_out: bool| {
        let rs: Vec<_> = p
            .rows
            .iter()
            .filter(|r| r.source_path.contains(&format!("/{held_out_class}/")) == held_out)
            .collect();
        assert!(rs
            .iter()
            .all(|r| r.unknown.mahalanobis.is_some() && r.unknown.unknown.is_some()));
        rs.iter()
            .filter(|r| r.unknown.unknown == Some(true))
            .count() as f64
            / rs.len() as f64
    };
    let (known_rate, held_rate) = (flagged(false), flagged(true));
    assert!(
        held_rate > known_rate + 0.2,
        "held-out called unknown {held_rate:.3}, known {known_rate:.3}"
    );

    // The EcoTaxa export routes the flagged images: only them (for experts to place), under a
    // category of their own, or everything else.
    let flagged_ids: Vec<&str> = p
        .rows
        .iter()
        .filter(|r| r.unknown.unknown == Some(true))
        .map(|r| r.image_id.as_str())
        .collect();
    let only = root.join("unknowns");
    plankton(&[
        "export",
        "ecotaxa",
        "--predictions",
        s(&preds),
        "--out",
        s(&only),
        "--unknowns",
        "only",
        "--unknown-category",
        "other<living",
    ]);
    let table = std::fs::read_to_string(only.join("ecotaxa_unknowns.tsv")).unwrap();
    let header: Vec<&str> = table.lines().next().unwrap().split('\t').collect();
    let col = |name: &str| header.iter().position(|h| h.ends_with(name)).unwrap();
    let objects: Vec<Vec<&str>> = table
        .lines()
        .skip(2)
        .map(|l| l.split('\t').collect())
        .collect();
    assert_eq!(objects.len(), flagged_ids.len());
    assert!(objects
        .iter()
        .all(|o| o[col("object_annotation_category")] == "other<living"
            && o[col("object_plankton_unknown")] == "yes"
            && known.contains(&o[col("object_plankton_predicted")].to_string())
            && flagged_ids.contains(&o[col("object_id")])));
    let out = plankton(&[
        "export",
        "ecotaxa",
        "--predictions",
        s(&preds),
        "--out",
        s(&root.join("rest")),
        "--unknowns",
        "exclude",
    ]);
    assert!(
        out.contains(&format!("{} object(s)", p.rows.len() - flagged_ids.len())),
        "{out}"
    );
    // Without a rule there is nothing to route by.
    let out = run(&[
        "export",
        "ecotaxa",
        "--predictions",
        s(&before),
        "--out",
        s(&root.join("none")),
        "--unknowns",
        "only",
    ]);
    assert!(
        !out.status.success() && text(&out).contains("calibrate --unknown"),
        "{}",
        text(&out)
    );

    let report = root.join("report");
    let out = plankton(&[
        "evaluate",
        "--predictions",
        s(&preds),
        "--data",
        s(&full),
        "--out",
        s(&report),
    ]);
    assert!(
        out.contains(&format!("vs 60 of held-out classes ({held_out_class})")),
        "{out}"
    );
    let e: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report.join("unknown.json")).unwrap()).unwrap();
    assert_eq!(e["known"], 75);
    assert_eq!(e["held_out"], 60);
    let best = e["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["auroc"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert!(best > 0.8, "best AUROC {best}: {out}");
    // The known images are the validation images the thresholds were fitted on: the file's
    // float32 columns at the stored thresholds give back calibrate's rates exactly.
    for sc in e["scores"].as_array().unwrap() {
        let name = sc["score"].as_str().unwrap();
        assert_eq!(
            sc["false_unknown_rate"].as_f64(),
            rule["valid_false_unknown"][name].as_f64(),
            "{name}"
        );
    }
    let png = image::open(report.join("unknown.png")).unwrap();
    assert!(png.width() > 1000, "three histograms side by side");
    let md = std::fs::read_to_string(report.join("summary.md")).unwrap();
    assert!(md.contains("## Unknown images") && md.contains(&held_out_class));

    // predict writes the held-out images' true classes in `label`: evaluate needs no --data.
    let out = plankton(&["evaluate", "--predictions", s(&preds)]);
    assert!(out.contains("vs 60 of held-out classes"), "{out}");
    assert!(rule["model_id"]
        .as_str()
        .is_some_and(|m| m.contains("best@")));
    // Only held-out images: said as such, not as missing labels.
    let only_held = root.join("only_held.parquet");
    plankton(&[
        "predict",
        "--model",
        s(&model),
        "--data",
        s(&full.join("train").join(&held_out_class)),
        "--out",
        s(&only_held),
        "--device",
        "cpu",
    ]);
    let out = run(&[
        "evaluate",
        "--predictions",
        s(&only_held),
        "--data",
        s(&full),
    ]);
    assert!(
        !out.status.success() && text(&out).contains("not trained on (held out)"),
        "{}",
        text(&out)
    );
    // A class folder given where the dataset's root is wanted.
    let out = run(&[
        "calibrate",
        "--model",
        s(&model),
        "--unknown",
        "--data",
        s(&held.join("train")),
        "--device",
        "cpu",
    ]);
    assert!(
        !out.status.success() && text(&out).contains("not a dataset folder"),
        "{}",
        text(&out)
    );
    let out = run(&[
        "export",
        "ecotaxa",
        "--predictions",
        s(&preds),
        "--out",
        s(&root.join("both")),
        "--unknowns",
        "exclude",
        "--unknown-category",
        "x",
    ]);
    assert!(
        !out.status.success() && text(&out).contains("drop one"),
        "{}",
        text(&out)
    );

    // A rule that does not fit the run is refused, naming the file.
    let rule_path = model.join("unknown.json");
    let mut broken = rule.clone();
    broken["feature_space"]["dim"] = 7.into();
    std::fs::write(&rule_path, serde_json::to_vec(&broken).unwrap()).unwrap();
    let out = run(&[
        "predict",
        "--model",
        s(&model),
        "--data",
        s(&full),
        "--subset",
        "held-out",
        "--out",
        s(&root.join("x.parquet")),
        "--device",
        "cpu",
    ]);
    assert!(
        !out.status.success() && text(&out).contains("unknown.json"),
        "{}",
        text(&out)
    );
    std::fs::write(&rule_path, b"{ not json").unwrap();
    let out = run(&[
        "predict",
        "--model",
        s(&model),
        "--data",
        s(&full),
        "--out",
        s(&root.join("y.parquet")),
        "--subset",
        "valid",
        "--device",
        "cpu",
    ]);
    assert!(
        !out.status.success() && text(&out).contains("bad unknown-image rule"),
        "{}",
        text(&out)
    );
    // --no-calibration predicts without it.
    plankton(&[
        "predict",
        "--model",
        s(&model),
        "--data",
        s(&full),
        "--out",
        s(&root.join("z.parquet")),
        "--subset",
        "valid",
        "--device",
        "cpu",
        "--no-calibration",
    ]);
    // And a dataset with no class the run lacks is no held-out set.
    let out = run(&[
        "predict",
        "--model",
        s(&model),
        "--data",
        s(&held),
        "--subset",
        "held-out",
        "--out",
        s(&root.join("w.parquet")),
        "--device",
        "cpu",
        "--no-calibration",
    ]);
    assert!(
        !out.status.success() && text(&out).contains("every labelled class is one the run knows"),
        "{}",
        text(&out)
    );
}
