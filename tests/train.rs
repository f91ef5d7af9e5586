//! Training end to end on small synthetic datasets: the run directory, resuming after kill -9,
//! bad images and bad configs, and that the network actually learns.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use plankton::config::PipelineConfig;
use plankton::model::Network;
use plankton::sources::synth::{generate, SynthOptions};
use plankton::train::{self, run_dir, TrainOptions};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_plankton"))
}

fn synth(dir: &Path, classes: usize, per_class: usize, seed: u64) -> PathBuf {
    let data = dir.join("data");
    generate(&SynthOptions { classes, per_class, test: 0, seed, threads: 0 }, &data).unwrap();
    data
}

/// A small cyclic net on 23x23 patches: milliseconds per step. One torch thread, because the
/// tests of this file run in parallel (OpenMP threads of several runs spinning on 2 cores slow
/// each other down a hundredfold).
fn tiny_pipeline(steps: u64, extra: &str) -> String {
    common::tiny_net_toml("tiny", 7, 0.125)
        + &format!(
            r#"
[train]
steps = {steps}
learning_rate = 0.01
validate_every = 20
checkpoint_every = 10
threads = 1
{extra}
"#
        )
}

fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// History rows without the timing columns (which legitimately differ between runs).
fn history_scores(run: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(run.join("history.csv")).unwrap();
    text.lines().skip(1).map(|l| l.split(',').take(7).map(String::from).collect()).collect()
}

#[test]
fn resume_after_kill_9_ends_like_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path(), 3, 16, 11);
    let pipeline = write(&dir.path().join("p.toml"), &tiny_pipeline(160, ""));
    let straight = dir.path().join("straight");
    run_ok(bin().args(["train", "--data"]).arg(&data).arg("--pipeline").arg(&pipeline).arg("--out").arg(&straight));

    // Kill -9 as soon as a checkpoint past step 20 exists, well before the end.
    let killed = dir.path().join("killed");
    let mut child = bin()
        .args(["train", "--data"])
        .arg(&data)
        .arg("--pipeline")
        .arg(&pipeline)
        .arg("--out")
        .arg(&killed)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let latest = killed.join("checkpoints/LATEST");
    let t0 = Instant::now();
    loop {
        let step = std::fs::read_to_string(&latest)
            .ok()
            .and_then(|s| s.trim().trim_start_matches("step-").parse::<u64>().ok());
        if step.is_some_and(|s| s >= 20) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!killed.join("model.safetensors").exists(), "the run finished before the kill: the test proves nothing");

    let out = run_ok(bin().args(["train", "--resume", "--data"]).arg(&data).arg("--out").arg(&killed));
    assert!(out.contains("trained at step 160"), "{out}");
    assert_eq!(history_scores(&killed), history_scores(&straight));
    assert_eq!(
        std::fs::read(killed.join("model.safetensors")).unwrap(),
        std::fs::read(straight.join("model.safetensors")).unwrap(),
        "final weights differ from the uninterrupted run"
    );
}

#[test]
fn run_dir_is_self_contained_and_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path(), 3, 10, 5);
    let pipeline = write(&dir.path().join("p.toml"), &tiny_pipeline(40, ""));
    let run = dir.path().join("run");
    let out = run_ok(bin().args(["train", "--data"]).arg(&data).arg("--pipeline").arg(&pipeline).arg("--out").arg(&run));
    assert!(out.contains("best valid log loss"), "{out}");

    let cfg = PipelineConfig::load(&run.join("pipeline.toml")).unwrap();
    assert_eq!(cfg, PipelineConfig::load(&pipeline).unwrap(), "the run keeps the config it used");
    let classes: Vec<String> = std::fs::read_to_string(run.join("classes.txt")).unwrap().lines().map(String::from).collect();
    assert_eq!(classes.len(), 3);
    let split = std::fs::read_to_string(run.join("split.csv")).unwrap();
    assert_eq!(split.lines().count(), 1 + 30);
    assert!(run.join("zmuv.json").is_file());
    let history = run_dir::read_history(&run.join("history.csv")).unwrap();
    assert_eq!(history.iter().map(|r| r.step).collect::<Vec<_>>(), vec![20, 40]);
    let png = image::open(run.join("learning_curve.png")).unwrap();
    assert!(png.width() > 600 && png.height() > 300);

    // best.safetensors loads into the network the run's config describes, and its validation
    // loss is the one best.json reports.
    let mut net = Network::new(&cfg.model, &train::patch_sizes(&cfg).unwrap(), 3, tch::Device::Cpu).unwrap();
    net.load(&run.join("best.safetensors")).unwrap();
    let best: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join("best.json")).unwrap()).unwrap();
    let best_loss = best["valid"]["log_loss"].as_f64().unwrap();
    assert!(history.iter().any(|r| (r.valid_loss - best_loss).abs() < 1e-9));
    // serde_json's float parsing may be off by an ulp.
    assert!(history.iter().all(|r| r.valid_loss >= best_loss - 1e-12));
    let ckpts: Vec<_> = std::fs::read_dir(run.join("checkpoints")).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with("step-")).collect();
    assert_eq!(ckpts.len(), 2, "keep_checkpoints = 2: {ckpts:?}");

    // A second run into the same directory is refused instead of mixing two runs.
    let out = bin().args(["train", "--data"]).arg(&data).arg("--pipeline").arg(&pipeline).arg("--out").arg(&run).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--resume") && err.contains(run.to_str().unwrap()), "{err}");
}

#[test]
fn bad_images_are_set_aside_and_training_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path(), 3, 10, 3);
    let class_dir = std::fs::read_dir(data.join("train")).unwrap().next().unwrap().unwrap().path();
    let empty = class_dir.join("zz_empty.jpg");
    std::fs::write(&empty, b"").unwrap();
    let truncated = class_dir.join("zz_truncated.jpg");
    let good = std::fs::read_dir(&class_dir).unwrap().filter_map(|e| e.ok()).map(|e| e.path()).find(|p| p.extension().is_some_and(|e| e == "jpg") && p != &empty).unwrap();
    let bytes = std::fs::read(good).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();

    let mut cfg = PipelineConfig::from_toml_str(&tiny_pipeline(30, ""), Path::new("tiny.toml")).unwrap();
    cfg.split.valid_fraction = 0.3;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let opts = TrainOptions { config: cfg, data: data.clone(), out: dir.path().join("run"), resume: false, device: tch::Device::Cpu, split_file: None, stop: None };
    let summary = train::run(&opts, rt.handle(), &mut |_| {}).unwrap();
    assert_eq!(summary.steps, 30);
    let mut bad: Vec<_> = summary.failures.iter().map(|f| (f.path.file_name().unwrap().to_string_lossy().into_owned(), f.kind)).collect();
    bad.sort();
    assert_eq!(bad, vec![("zz_empty.jpg".to_string(), "empty"), ("zz_truncated.jpg".to_string(), "corrupt")]);
}

#[test]
fn bad_configs_and_devices_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path(), 2, 4, 1);
    for (name, text, expect) in [
        ("typo.toml", tiny_pipeline(10, "lerning_rate = 0.1"), "lerning_rate"),
        ("zero.toml", tiny_pipeline(0, ""), "train.steps"),
        ("layers.toml", "[model]\npreset = \"custom\"\n".to_string(), "model.branch"),
        ("width.toml", "[model]\nwidth = -1.0\n".to_string(), "model.width"),
    ] {
        let p = write(&dir.path().join(name), &text);
        let out = bin().args(["train", "--data"]).arg(&data).arg("--pipeline").arg(&p).arg("--out").arg(dir.path().join("r")).output().unwrap();
        assert!(!out.status.success(), "{name} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(name) && err.contains(expect), "{name}: {err}");
    }
    let p = write(&dir.path().join("ok.toml"), &tiny_pipeline(10, ""));
    let out = bin().args(["train", "--device", "cuda:3", "--data"]).arg(&data).arg("--pipeline").arg(&p).arg("--out").arg(dir.path().join("r2")).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cuda:3") && err.contains("CUDA device"), "{err}");
}

/// The shapes of the synthetic families are easy to tell apart: a correct cyclic net must learn
/// them in a few hundred steps, far above chance (1/3): on this machine it reaches 36/36.
#[test]
fn a_small_cyclic_net_learns_synthetic_classes() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path(), 3, 40, 21);
    let mut cfg = PipelineConfig::from_toml_str(&tiny_pipeline(600, ""), Path::new("tiny.toml")).unwrap();
    cfg.split.valid_fraction = 0.3;
    cfg.train.validate_every = 100;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let opts = TrainOptions { config: cfg, data, out: dir.path().join("run"), resume: false, device: tch::Device::Cpu, split_file: None, stop: None };
    let s = train::run(&opts, rt.handle(), &mut |_| {}).unwrap();
    let last = s.final_scores.expect("validated at the end");
    let first = &s.history[0];
    assert_eq!(last.n, 36);
    assert!(last.top1 >= 0.85, "top-1 {} after 600 steps: {:?}", last.top1, s.history);
    assert!(last.log_loss < first.valid_loss && last.log_loss < 0.6, "{:?}", s.history);
}
