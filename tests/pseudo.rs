//! Pseudo-labelling: soft targets from a predictions Parquet mixed into training batches,
//! sharding of the pseudo-labelled images, refusal of labelled images, resume.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use plankton::config::PipelineConfig;
use plankton::model::Network;
use plankton::sinks::parquet::{PredictionRow, PredictionWriter};
use plankton::sources::synth::{generate, SynthOptions};
use plankton::sources::Dataset;
use plankton::stages::normalise::ZmuvStats;
use plankton::train::pseudo::{self, PseudoConfig};
use plankton::train::{self, RunDir, TrainEvent, TrainOptions};

fn synth(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    generate(
        &SynthOptions {
            classes: 3,
            per_class: 16,
            test: 24,
            seed: 21,
            threads: 0,
        },
        &data,
    )
    .unwrap();
    data
}

/// The tiny net of tests/train.rs (milliseconds per step, one torch thread).
fn pipeline(steps: u64, extra: &str) -> PipelineConfig {
    let text = common::tiny_net_toml("tiny-pseudo", 7, 0.125)
        + &format!(
            r#"
[train]
steps = {steps}
learning_rate = 0.01
validate_every = 10
checkpoint_every = 10
threads = 1
{extra}
"#
        );
    PipelineConfig::from_toml_str(&text, Path::new("tiny-pseudo.toml")).unwrap()
}

/// Writes a predictions file over `records` whose soft target is `target(i)`.
fn write_predictions(
    path: &Path,
    classes: &[String],
    records: &[(String, String)],
    target: impl Fn(usize) -> Vec<f32>,
) {
    let mut w = PredictionWriter::create(
        path,
        classes.to_vec(),
        "blend@test",
        &serde_json::json!({"run": "test"}),
        3,
    )
    .unwrap();
    for (i, (id, source)) in records.iter().enumerate() {
        w.push(PredictionRow {
            image_id: id.clone(),
            source_path: source.clone(),
            label: None,
            probabilities: Some(target(i)),
            views: 1,
            error: None,
            unknown: Default::default(),
        })
        .unwrap();
    }
    w.finish().unwrap();
}

fn test_records(ds: &Dataset) -> Vec<(String, String)> {
    ds.test
        .iter()
        .map(|r| (r.id.clone(), r.path.display().to_string()))
        .collect()
}

/// Torch's random generator is process-global: runs of parallel tests would draw each other's
/// initial weights and dropout masks, so training runs take turns.
static TORCH: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn train(
    cfg: PipelineConfig,
    data: &Path,
    out: &Path,
    resume: bool,
    stop_at: Option<u64>,
) -> (train::TrainSummary, usize) {
    let _turn = TORCH.lock().unwrap_or_else(|e| e.into_inner());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let opts = TrainOptions {
        config: cfg,
        data: data.to_path_buf(),
        out: out.to_path_buf(),
        resume,
        device: tch::Device::Cpu,
        split_file: None,
        init_from: None,
        stop: Some(stop.clone()),
    };
    let mut pseudo_images = usize::MAX;
    let summary = train::run(&opts, rt.handle(), &mut |e| match e {
        TrainEvent::Started {
            pseudo_images: n, ..
        } => pseudo_images = n,
        TrainEvent::Step { step, .. } if Some(step) == stop_at => stop.cancel(),
        _ => {}
    })
    .unwrap();
    (summary, pseudo_images)
}

#[test]
fn shards_partition_the_pseudo_labelled_images() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    let ds = Dataset::open(&data).unwrap();
    let preds = dir.path().join("blend.parquet");
    let n = ds.class_names.len();
    write_predictions(&preds, &ds.class_names, &test_records(&ds), |i| {
        let mut t = vec![1.0; n];
        t[i % n] = 2.0; // unnormalised on purpose
        t
    });
    let mut kept_by_shard = Vec::new();
    for shard in 0..3 {
        let cfg = PseudoConfig {
            predictions: Some(preds.clone()),
            shards: 3,
            shard,
            shard_seed: 9,
            ..Default::default()
        };
        let set = pseudo::load(&cfg, &ds).unwrap().unwrap();
        assert_eq!(set.len(), 16, "shard {shard} keeps 2/3 of 24");
        assert_eq!(set.other_shards, 8);
        for i in 0..set.len() {
            let row = set.target(i);
            assert!(
                (row.iter().sum::<f32>() - 1.0).abs() < 1e-6,
                "targets are normalised"
            );
            assert!((row.iter().cloned().fold(0.0, f32::max) - 0.5).abs() < 1e-6);
        }
        kept_by_shard.push(
            set.records
                .iter()
                .map(|r| r.path.clone())
                .collect::<std::collections::BTreeSet<_>>(),
        );
    }
    // Each image is left out by exactly one of the three models.
    for r in &ds.test {
        let kept = kept_by_shard.iter().filter(|s| s.contains(&r.path)).count();
        assert_eq!(kept, 2, "{}", r.path.display());
    }
    // The file's row order does not change the shards.
    let mut reversed = test_records(&ds);
    reversed.reverse();
    let preds2 = dir.path().join("reversed.parquet");
    write_predictions(&preds2, &ds.class_names, &reversed, |_| vec![1.0; n]);
    let cfg = PseudoConfig {
        predictions: Some(preds2),
        shards: 3,
        shard: 0,
        shard_seed: 9,
        ..Default::default()
    };
    let set = pseudo::load(&cfg, &ds).unwrap().unwrap();
    assert_eq!(
        set.records
            .iter()
            .map(|r| r.path.clone())
            .collect::<std::collections::BTreeSet<_>>(),
        kept_by_shard[0]
    );
}

#[test]
fn labelled_images_and_foreign_classes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    let ds = Dataset::open(&data).unwrap();
    let n = ds.class_names.len();

    // Rows naming the labelled training images (validation images among them) never become
    // pseudo-labels: that would leak a blend fitted on validation back into training.
    let train_rows: Vec<(String, String)> = ds
        .train
        .iter()
        .map(|r| (r.id.clone(), r.path.display().to_string()))
        .collect();
    let preds = dir.path().join("train-preds.parquet");
    write_predictions(&preds, &ds.class_names, &train_rows, |_| vec![1.0; n]);
    let cfg = PseudoConfig {
        predictions: Some(preds.clone()),
        ..Default::default()
    };
    let e = pseudo::load(&cfg, &ds).unwrap_err().to_string();
    assert!(
        e.contains("train-preds.parquet") && e.contains("48 are labelled training images"),
        "{e}"
    );

    // Another class list is an error naming the file and the difference.
    let mut other = ds.class_names.clone();
    other[0] = "not_a_class".into();
    let preds = dir.path().join("other-classes.parquet");
    write_predictions(&preds, &other, &test_records(&ds), |_| vec![1.0; n]);
    let cfg = PseudoConfig {
        predictions: Some(preds),
        ..Default::default()
    };
    let e = pseudo::load(&cfg, &ds).unwrap_err().to_string();
    assert!(
        e.contains("other-classes.parquet") && e.contains("not_a_class"),
        "{e}"
    );

    // A missing file is named too.
    let cfg = PseudoConfig {
        predictions: Some(dir.path().join("nope.parquet")),
        ..Default::default()
    };
    let e = pseudo::load(&cfg, &ds).unwrap_err().to_string();
    assert!(e.contains("nope.parquet"), "{e}");
}

/// Mean probability the network gives class 0 on the test images.
fn mean_class0_on_test(run: &Path, cfg: &PipelineConfig, ds: &Dataset) -> f64 {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let sizes = train::patch_sizes(cfg).unwrap();
    let net = Network::load_from(
        &cfg.model,
        &sizes,
        ds.class_names.len(),
        tch::Device::Cpu,
        &RunDir::new(run).final_weights(),
    )
    .unwrap();
    let zmuv = ZmuvStats::load(&RunDir::new(run).zmuv()).unwrap();
    let (probs, _, _) = train::predict_probabilities(
        &net,
        cfg,
        Arc::new(ds.test.clone()),
        &zmuv.inputs,
        rt.handle(),
    )
    .unwrap();
    let n = ds.class_names.len();
    probs.chunks(n).map(|p| p[0] as f64).sum::<f64>() / (probs.len() / n) as f64
}

#[test]
fn soft_targets_reach_the_loss() {
    // Pseudo-labels that call every test image class 0 pull the network's predictions on those
    // images towards class 0, far beyond what the labelled images alone teach.
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    let ds = Dataset::open(&data).unwrap();
    let n = ds.class_names.len();
    let preds = dir.path().join("class0.parquet");
    write_predictions(&preds, &ds.class_names, &test_records(&ds), |_| {
        let mut t = vec![0.0; n];
        t[0] = 1.0;
        t
    });
    let plain_cfg = pipeline(60, "");
    let pseudo_cfg = pipeline(
        60,
        &format!(
            "dropout = false\n[pseudo]\npredictions = {:?}\nfraction = 0.5\n",
            preds.display().to_string()
        ),
    );
    let (plain, none) = train(
        plain_cfg.clone(),
        &data,
        &dir.path().join("plain"),
        false,
        None,
    );
    let (with, seen) = train(
        pseudo_cfg.clone(),
        &data,
        &dir.path().join("pseudo"),
        false,
        None,
    );
    assert_eq!(none, 0);
    assert_eq!(seen, 24);
    assert_eq!(plain.steps, 60);
    assert_eq!(with.steps, 60);
    let p_plain = mean_class0_on_test(&dir.path().join("plain"), &plain_cfg, &ds);
    let p_pseudo = mean_class0_on_test(&dir.path().join("pseudo"), &pseudo_cfg, &ds);
    assert!(
        p_pseudo > p_plain + 0.2 && p_pseudo > 0.6,
        "class-0 probability on test: {p_plain:.3} without, {p_pseudo:.3} with pseudo-labels"
    );
}

#[test]
fn a_resumed_pseudo_labelled_run_reads_the_same_batches() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    let ds = Dataset::open(&data).unwrap();
    let n = ds.class_names.len();
    let preds = dir.path().join("soft.parquet");
    write_predictions(&preds, &ds.class_names, &test_records(&ds), |i| {
        (0..n)
            .map(|c| if c == i % n { 0.7 } else { 0.15 })
            .collect()
    });
    let cfg = pipeline(
        40,
        &format!(
            "[pseudo]\npredictions = {:?}\nfraction = 0.33\nshards = 3\nshard = 2\n",
            preds.display().to_string()
        ),
    );
    let (straight, seen) = train(
        cfg.clone(),
        &data,
        &dir.path().join("straight"),
        false,
        None,
    );
    assert_eq!(seen, 16);
    let (first, _) = train(
        cfg.clone(),
        &data,
        &dir.path().join("resumed"),
        false,
        Some(20),
    );
    assert!(first.stopped_early && first.steps == 20);
    let (resumed, _) = train(cfg, &data, &dir.path().join("resumed"), true, None);
    assert_eq!(resumed.steps, 40);
    let losses = |s: &train::TrainSummary| {
        s.history
            .iter()
            .map(|r| (r.step, r.train_loss, r.valid_loss))
            .collect::<Vec<_>>()
    };
    assert_eq!(losses(&straight), losses(&resumed));
}
