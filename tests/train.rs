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
    generate(
        &SynthOptions {
            classes,
            per_class,
            test: 0,
            seed,
            threads: 0,
        },
        &data,
    )
    .unwrap();
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
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// History rows without the timing columns (which legitimately differ between runs).
fn history_scores(run: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(run.join("history.csv")).unwrap();
    text.lines()
        .skip(1)
        .map(|l| l.split(',').take(7).map(String::from).collect())
        .collect()
}

#[test]
fn resume_after_kill_9_ends_like_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path(), 3, 16, 11);
    let pipeline = write(&dir.path().join("p.toml"), &tiny_pipeline(160, ""));
    let straight = dir.path().join("straight");
    run_ok(
        bin()
            .args(["train", "--data"])
            .arg(&data)
            .arg("--pipeline")
            .arg(&pipeline)
            .arg("--out")
            .arg(&straight),
    );

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
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !killed.join("model.safetensors").exists(),
        "the run finished before the kill: the test proves nothing"
    );

    let out = run_ok(
        bin()
            .args(["train", "--resume", "--data"])
            .arg(&data)
            .arg("--out")
            .arg(&killed),
    );
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
    let out = run_ok(
        bin()
            .args(["train", "--data"])
            .arg(&data)
            .arg("--pipeline")
            .arg(&pipeline)
            .arg("--out")
            .arg(&run),
    );
    assert!(out.contains("best valid log loss"), "{out}");

    let cfg = PipelineConfig::load(&run.join("pipeline.toml")).unwrap();
    assert_eq!(
        cfg,
        PipelineConfig::load(&pipeline).unwrap(),
        "the run keeps the config it used"
    );
    let classes: Vec<String> = std::fs::read_to_string(run.join("classes.txt"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(classes.len(), 3);
    let split = std::fs::read_to_string(run.join("split.csv")).unwrap();
    assert_eq!(split.lines().count(), 1 + 30);
    assert!(run.join("zmuv.json").is_file());
    let history = run_dir::read_history(&run.join("history.csv")).unwrap();
    assert_eq!(
        history.iter().map(|r| r.step).collect::<Vec<_>>(),
        vec![20, 40]
    );
    let png = image::open(run.join("learning_curve.png")).unwrap();
    assert!(png.width() > 600 && png.height() > 300);

    // best.safetensors loads into the network the run's config describes, and its validation
    // loss is the one best.json reports.
    let mut net = Network::new(
        &cfg.model,
        &train::patch_sizes(&cfg).unwrap(),
        3,
        tch::Device::Cpu,
    )
    .unwrap();
    net.load(&run.join("best.safetensors")).unwrap();
    let best: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("best.json")).unwrap()).unwrap();
    let best_loss = best["valid"]["log_loss"].as_f64().unwrap();
    assert!(history
        .iter()
        .any(|r| (r.valid_loss - best_loss).abs() < 1e-9));
    // serde_json's float parsing may be off by an ulp.
    assert!(history.iter().all(|r| r.valid_loss >= best_loss - 1e-12));
    let ckpts: Vec<_> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    assert_eq!(ckpts.len(), 2, "keep_checkpoints = 2: {ckpts:?}");

    // A second run into the same directory is refused instead of mixing two runs.
    let out = bin()
        .args(["train", "--data"])
        .arg(&data)
        .arg("--pipeline")
        .arg(&pipeline)
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--resume") && err.contains(run.to_str().unwrap()),
        "{err}"
    );

    // A run folder another process is working in (a train started a moment earlier, before
    // it wrote anything) is refused too, even with --resume: one process per run.
    let fresh = dir.path().join("fresh");
    let _held = plankton::fsx::lock_dir(&fresh).unwrap();
    for resume in [false, true] {
        let mut cmd = bin();
        cmd.args(["train", "--data"])
            .arg(&data)
            .arg("--pipeline")
            .arg(&pipeline)
            .arg("--out")
            .arg(&fresh);
        if resume {
            cmd.arg("--resume");
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("another plankton process"),
            "{err}"
        );
    }
    assert!(!fresh.join("pipeline.toml").exists());
}

#[test]
fn bad_images_are_set_aside_and_training_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path(), 3, 10, 3);
    let class_dir = std::fs::read_dir(data.join("train"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let empty = class_dir.join("zz_empty.jpg");
    std::fs::write(&empty, b"").unwrap();
    let truncated = class_dir.join("zz_truncated.jpg");
    let good = std::fs::read_dir(&class_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "jpg") && p != &empty)
        .unwrap();
    let bytes = std::fs::read(good).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();

    let mut cfg =
        PipelineConfig::from_toml_str(&tiny_pipeline(30, ""), Path::new("tiny.toml")).unwrap();
    cfg.split.valid_fraction = 0.3;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let opts = TrainOptions {
        config: cfg,
        data: data.clone(),
        out: dir.path().join("run"),
        resume: false,
        device: tch::Device::Cpu,
        split_file: None,
        init_from: None,
        stop: None,
    };
    let summary = train::run(&opts, rt.handle(), &mut |_| {}).unwrap();
    assert_eq!(summary.steps, 30);
    let mut bad: Vec<_> = summary
        .failures
        .iter()
        .map(|f| {
            (
                f.path.file_name().unwrap().to_string_lossy().into_owned(),
                f.kind,
            )
        })
        .collect();
    bad.sort();
    assert_eq!(
        bad,
        vec![
            ("zz_empty.jpg".to_string(), "empty"),
            ("zz_truncated.jpg".to_string(), "corrupt")
        ]
    );
}

#[test]
fn bad_configs_and_devices_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path(), 2, 4, 1);
    for (name, text, expect) in [
        (
            "typo.toml",
            tiny_pipeline(10, "lerning_rate = 0.1"),
            "lerning_rate",
        ),
        ("zero.toml", tiny_pipeline(0, ""), "train.steps"),
        (
            "layers.toml",
            "[model]\npreset = \"custom\"\n".to_string(),
            "model.branch",
        ),
        (
            "width.toml",
            "[model]\nwidth = -1.0\n".to_string(),
            "model.width",
        ),
    ] {
        let p = write(&dir.path().join(name), &text);
        let out = bin()
            .args(["train", "--data"])
            .arg(&data)
            .arg("--pipeline")
            .arg(&p)
            .arg("--out")
            .arg(dir.path().join("r"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{name} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(name) && err.contains(expect), "{name}: {err}");
    }
    let p = write(&dir.path().join("ok.toml"), &tiny_pipeline(10, ""));
    let out = bin()
        .args(["train", "--device", "cuda:3", "--data"])
        .arg(&data)
        .arg("--pipeline")
        .arg(&p)
        .arg("--out")
        .arg(dir.path().join("r2"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // Without a GPU: CUDA could not be loaded (naming libtorch_cuda and why); with one GPU:
    // libtorch_cuda is loaded but cuda:3 does not exist.
    assert!(
        err.contains("cuda:3") && err.contains("libtorch_cuda"),
        "{err}"
    );
    let out = bin()
        .args(["train", "--device", "gpu", "--data"])
        .arg(&data)
        .arg("--pipeline")
        .arg(&p)
        .arg("--out")
        .arg(dir.path().join("r3"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("`gpu` is not a device")
            && err.contains("auto, cpu, cuda or cuda:N"),
        "{err}"
    );
}

fn loss_log(path: &Path) -> Vec<(u64, f64)> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("step,loss"));
    lines
        .map(|l| {
            l.split_once(',')
                .map(|(s, v)| (s.parse().unwrap(), v.parse().unwrap()))
                .unwrap()
        })
        .collect()
}

/// Reading the losses back in chunks (what a GPU run does every `log_every` steps) changes
/// nothing: the same per-step losses, history and weights as reading every step.
#[test]
fn deferred_loss_readback_gives_the_same_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path(), 3, 12, 5);
    let mut runs = Vec::new();
    for every in [1u64, 7] {
        let p = write(
            &dir.path().join(format!("p{every}.toml")),
            &tiny_pipeline(30, &format!("loss_readback_every = {every}")),
        );
        let run = dir.path().join(format!("run{every}"));
        let log = dir.path().join(format!("losses{every}.csv"));
        run_ok(
            bin()
                .args(["train", "--device", "cpu", "--data"])
                .arg(&data)
                .arg("--pipeline")
                .arg(&p)
                .arg("--out")
                .arg(&run)
                .arg("--loss-log")
                .arg(&log),
        );
        let losses = loss_log(&log);
        assert_eq!(
            losses.iter().map(|l| l.0).collect::<Vec<_>>(),
            (1..=30).collect::<Vec<_>>(),
            "one loss per step, in order"
        );
        assert!(losses.iter().all(|l| l.1.is_finite() && l.1 > 0.0));
        runs.push((run, losses));
    }
    assert_eq!(runs[0].1, runs[1].1);
    assert_eq!(history_scores(&runs[0].0), history_scores(&runs[1].0));
    assert_eq!(
        std::fs::read(runs[0].0.join("model.safetensors")).unwrap(),
        std::fs::read(runs[1].0.join("model.safetensors")).unwrap()
    );
}

/// bf16 autocast and the channels-last layout are real switches on the CPU too: the run
/// trains, checkpoints (channels-last optimiser state included), resumes, and predicts in either
/// precision; its losses differ from fp32 by bf16 rounding, not more.
#[test]
fn bf16_channels_last_runs_train_checkpoint_resume_and_predict() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path(), 3, 12, 6);
    let fp32 = write(&dir.path().join("fp32.toml"), &tiny_pipeline(20, ""));
    let bf16 = write(
        &dir.path().join("bf16.toml"),
        &(tiny_pipeline(20, "") + "\n[compute]\nprecision = \"bf16\"\nchannels_last = true\n"),
    );
    let mut logs = Vec::new();
    for (name, p) in [("fp32", &fp32), ("bf16", &bf16)] {
        let log = dir.path().join(format!("{name}.csv"));
        run_ok(
            bin()
                .args(["train", "--device", "cpu", "--data"])
                .arg(&data)
                .arg("--pipeline")
                .arg(p)
                .arg("--out")
                .arg(dir.path().join(name))
                .arg("--loss-log")
                .arg(&log),
        );
        logs.push(loss_log(&log));
    }
    let run = dir.path().join("bf16");
    let stored = std::fs::read_to_string(run.join("pipeline.toml")).unwrap();
    assert!(
        stored.contains("[compute]")
            && stored.contains("precision = \"bf16\"")
            && stored.contains("channels_last = true"),
        "{stored}"
    );
    let (a, b) = (&logs[0], &logs[1]);
    assert_ne!(a, b, "bf16 autocast changed nothing: is it applied?");
    let first = (a[0].1 - b[0].1).abs() / a[0].1;
    assert!(
        first < 0.02,
        "the first step's loss differs by {first} between fp32 and bf16"
    );

    // The checkpoint (optimiser state in channels-last) reloads: train on to 30 steps.
    let more = write(
        &dir.path().join("more.toml"),
        &(tiny_pipeline(30, "") + "\n[compute]\nprecision = \"bf16\"\nchannels_last = true\n"),
    );
    std::fs::write(
        run.join("pipeline.toml"),
        std::fs::read_to_string(&more).unwrap(),
    )
    .unwrap();
    let out = run_ok(
        bin()
            .args(["train", "--resume", "--device", "cpu", "--data"])
            .arg(&data)
            .arg("--out")
            .arg(&run),
    );
    assert!(out.contains("trained at step 30"), "{out}");

    let mut probabilities = Vec::new();
    for precision in ["bf16", "fp32"] {
        let pred = dir.path().join(format!("pred-{precision}.parquet"));
        run_ok(
            bin()
                .args([
                    "predict",
                    "--device",
                    "cpu",
                    "--subset",
                    "train",
                    "--tta",
                    "2",
                    "--precision",
                    precision,
                    "--model",
                ])
                .arg(&run)
                .arg("--data")
                .arg(&data)
                .arg("--out")
                .arg(&pred),
        );
        let rows = plankton::sinks::parquet::Predictions::read(&pred)
            .unwrap()
            .rows;
        assert!(!rows.is_empty());
        probabilities.push(
            rows.into_iter()
                .map(|r| r.probabilities.expect("predicted"))
                .collect::<Vec<_>>(),
        );
    }
    let worst = probabilities[0]
        .iter()
        .flatten()
        .zip(probabilities[1].iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst > 0.0 && worst < 0.05,
        "bf16 and fp32 predictions differ by {worst}"
    );
    let out = bin()
        .args(["predict", "--precision", "fp16", "--model"])
        .arg(&run)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(dir.path().join("x.parquet"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("fp16") && err.contains("fp32 or bf16"),
        "{err}"
    );
}

/// The shapes of the synthetic families are easy to tell apart: a correct cyclic net must learn
/// them in a few hundred steps, far above chance (1/3): on this machine it reaches 36/36.
#[test]
fn a_small_cyclic_net_learns_synthetic_classes() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path(), 3, 40, 21);
    let mut cfg =
        PipelineConfig::from_toml_str(&tiny_pipeline(600, ""), Path::new("tiny.toml")).unwrap();
    cfg.split.valid_fraction = 0.3;
    cfg.train.validate_every = 100;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let opts = TrainOptions {
        config: cfg,
        data,
        out: dir.path().join("run"),
        resume: false,
        device: tch::Device::Cpu,
        split_file: None,
        init_from: None,
        stop: None,
    };
    let s = train::run(&opts, rt.handle(), &mut |_| {}).unwrap();
    let last = s.final_scores.expect("validated at the end");
    let first = &s.history[0];
    assert_eq!(last.n, 36);
    assert!(
        last.top1 >= 0.85,
        "top-1 {} after 600 steps: {:?}",
        last.top1,
        s.history
    );
    assert!(
        last.log_loss < first.valid_loss && last.log_loss < 0.6,
        "{:?}",
        s.history
    );
}

/// A resumed run's loss log keeps the rows up to its checkpoint and goes on from there, so it
/// reads as one run; a folder is refused as the log.
#[test]
fn the_loss_log_of_a_resumed_run_reads_as_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path(), 3, 8, 9);
    let p = write(&dir.path().join("p.toml"), &tiny_pipeline(20, ""));
    let run = dir.path().join("run");
    let log = dir.path().join("losses.csv");
    run_ok(
        bin()
            .args(["train", "--device", "cpu", "--data"])
            .arg(&data)
            .arg("--pipeline")
            .arg(&p)
            .arg("--out")
            .arg(&run)
            .arg("--loss-log")
            .arg(&log),
    );
    // Continue to 30 steps from the checkpoint at 20 (`--resume --steps 30`), and pretend steps
    // 21-25 were logged before a crash: they are replaced, not repeated.
    let mut text = std::fs::read_to_string(&log).unwrap();
    text += "21,9.9\n25,9.9\n";
    std::fs::write(&log, text).unwrap();
    let resumed = run_ok(
        bin()
            .args([
                "train", "--resume", "--steps", "30", "--device", "cpu", "--data",
            ])
            .arg(&data)
            .arg("--out")
            .arg(&run)
            .arg("--loss-log")
            .arg(&log),
    );
    assert!(!resumed.contains("differs from --pipeline"), "{resumed}");
    let steps: Vec<u64> = loss_log(&log).iter().map(|l| l.0).collect();
    assert_eq!(steps, (1..=30).collect::<Vec<_>>());
    let stored = std::fs::read_to_string(run.join("pipeline.toml")).unwrap();
    assert!(stored.contains("steps = 30"), "{stored}");
    // Shorter than where the run is: refused, naming both numbers.
    let out = bin()
        .args([
            "train", "--resume", "--steps", "10", "--device", "cpu", "--data",
        ])
        .arg(&data)
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("10") && err.contains("30"), "{err}");
    assert!(loss_log(&log).iter().all(|l| l.1 < 9.0));

    let out = bin()
        .args(["train", "--device", "cpu", "--data"])
        .arg(&data)
        .arg("--pipeline")
        .arg(&p)
        .arg("--out")
        .arg(dir.path().join("r2"))
        .arg("--loss-log")
        .arg(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--loss-log") && err.contains("a file is needed"),
        "{err}"
    );
    assert!(!dir.path().join("r2").exists(), "nothing was started");
}

/// SIGTERM (a scheduler's stop) ends a run with a checkpoint and exit status 130, not 0, so
/// that `plankton train ... && plankton predict ...` does not go on with an unfinished run;
/// `--resume` then finishes it.
#[test]
fn sigterm_checkpoints_and_exits_130_and_resume_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path(), 3, 8, 4);
    let p = write(&dir.path().join("p.toml"), &tiny_pipeline(1_000_000, ""));
    let run = dir.path().join("run");
    let child = bin()
        .args(["train", "--device", "cpu", "--data"])
        .arg(&data)
        .arg("--pipeline")
        .arg(&p)
        .arg("--out")
        .arg(&run)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !run.join("checkpoints/LATEST").exists() {
        assert!(
            t0.elapsed().as_secs() < 120,
            "no checkpoint within 2 minutes"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stdout}\n{stderr}");
    assert!(stdout.contains("stopped at step"), "{stdout}");
    assert!(stderr.contains("--resume"), "{stderr}");
    let latest = std::fs::read_to_string(run.join("checkpoints/LATEST")).unwrap();
    let stopped_at: u64 = latest.trim().trim_start_matches("step-").parse().unwrap();
    assert!(stopped_at >= 10, "{latest}");

    let text = run_ok(
        bin()
            .args(["train", "--resume", "--device", "cpu", "--data"])
            .arg(&data)
            .arg("--out")
            .arg(&run)
            .arg("--steps")
            .arg((stopped_at + 10).to_string()),
    );
    assert!(
        text.contains(&format!("trained at step {}", stopped_at + 10)),
        "{text}"
    );
}
