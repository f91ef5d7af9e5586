//! `plankton replay` end to end on a tiny synthetic competition-layout dataset: every stage
//! runs and is scored, the submission is written, a rerun skips everything, and a replay that
//! lost an intermediate output redoes only what follows it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use plankton::sources::synth::{generate, SynthOptions};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_plankton"))
}

/// A tiny cyclic net (milliseconds per step), one torch thread.
fn member_pipeline(width: f64) -> String {
    common::tiny_net_toml("tiny-member", 7, width)
        + r#"
[train]
steps = 40
learning_rate = 0.01
validate_every = 20
checkpoint_every = 20
threads = 1
[tta]
transforms = 3
"#
}

const REPLAY: &str = r#"
name = "tiny-replay"
seed = 5
valid_fraction = 0.25

[[member]]
name = "a"
pipeline = "a.toml"
bagging = 1

[[member]]
name = "b"
pipeline = "b.toml"
seed = 99

[features]
sets = ["moments", "haralick"]

[fuse]
sets = ["moments", "haralick"]
repeats = 2
folds = 3

[blend]
select = "all"
folds = 3

[pseudo]
members = ["a"]
shards = 2
fraction = 0.5
dropout = false
weight = 0.5
"#;

fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let data = dir.join("data");
    generate(
        &SynthOptions {
            classes: 3,
            per_class: 16,
            test: 12,
            seed: 13,
            threads: 0,
        },
        &data,
    )
    .unwrap();
    std::fs::write(dir.join("a.toml"), member_pipeline(0.125)).unwrap();
    std::fs::write(dir.join("b.toml"), member_pipeline(0.25)).unwrap();
    std::fs::write(dir.join("replay.toml"), REPLAY).unwrap();
    (data, dir.join("replay.toml"))
}

/// `plankton replay --pipeline REPLAY --data DATA --out OUT`, more flags to be added.
fn replay_cmd(replay: &Path, data: &Path, out: &Path) -> Command {
    let mut cmd = bin();
    cmd.arg("replay")
        .arg("--pipeline")
        .arg(replay)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out);
    cmd
}

fn replay(replay: &Path, data: &Path, out: &Path) -> String {
    let o = replay_cmd(replay, data, out).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "replay failed:\n{text}");
    text
}

/// `plankton replay --plan`: (status, step name) per step.
fn plan(replay: &Path, data: &Path, out: &Path) -> Vec<(String, String)> {
    let o = replay_cmd(replay, data, out)
        .arg("--plan")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "replay --plan failed:\n{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    text.lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .filter(|l| !l.contains(" steps: "))
        .map(|l| {
            let rest = l.trim_start().split_once("  ").unwrap().1;
            let (status, name) = rest.split_at(6);
            (status.trim().to_string(), name.trim().to_string())
        })
        .collect()
}

fn report(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap()
}

fn stage_losses(r: &serde_json::Value) -> Vec<(String, Option<f64>, Option<f64>)> {
    r["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["stage"].as_str().unwrap().to_string(),
                s["valid"]["log_loss"].as_f64(),
                s["test"]["log_loss"].as_f64(),
            )
        })
        .collect()
}

#[test]
fn the_whole_chain_runs_scores_every_stage_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (data, file) = setup(dir.path());
    let out = dir.path().join("out");
    // Planned before anything runs, and planning writes nothing.
    let planned = plan(&file, &data, &out);
    assert!(!out.exists(), "--plan created the output folder");
    assert!(planned.iter().all(|(s, _)| s == "to run"), "{planned:?}");
    let names: Vec<&str> = planned.iter().map(|(_, n)| n.as_str()).collect();
    for expected in [
        "split",
        "train a",
        "train a bag 1",
        "predict a bag 1 test, TTA",
        "average a bags",
        "fuse b",
        "blend",
        "pseudo-label a-shard1",
        "final mix",
        "submission",
    ] {
        assert!(
            names.contains(&expected),
            "no step `{expected}` in {names:?}"
        );
    }
    let text = replay(&file, &data, &out);
    assert!(text.contains("| + pseudo-labels |"), "{text}");

    let r = report(&out);
    // The plan was the whole chain: every step it listed ran.
    assert_eq!(r["steps_run"].as_u64(), Some(planned.len() as u64), "{r}");
    let stages = stage_losses(&r);
    // "+ bagging" appears when the best single member (a or b) is the bagged one.
    let names: Vec<&str> = stages
        .iter()
        .map(|s| s.0.as_str())
        .filter(|s| *s != "+ bagging")
        .collect();
    assert_eq!(
        names,
        [
            "single network",
            "+ TTA",
            "+ fusion",
            "+ blend",
            "+ pseudo-labels"
        ],
        "{stages:?}"
    );
    for (name, valid, test) in &stages {
        // Bags validate on different images: scored on test only.
        if name != "+ bagging" {
            assert!(
                valid.is_some_and(|v| v.is_finite() && v > 0.0),
                "{name}: valid {valid:?}"
            );
        }
        assert!(
            test.is_some_and(|v| v.is_finite() && v > 0.0),
            "{name}: test {test:?}"
        );
    }
    // Fusion is blended only for members whose out-of-fold validation loss it lowered, and the
    // blend read exactly those fused files.
    let fusion = r["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == "+ fusion")
        .unwrap();
    let note = fusion["note"].as_str().unwrap();
    let inputs = std::fs::read_to_string(out.join("blend/inputs.txt")).unwrap();
    for m in ["a", "b"] {
        let part = note
            .split("; ")
            .find(|p| p.starts_with(&format!("{m}: ")))
            .unwrap_or_else(|| panic!("no fusion decision for {m}: {note}"));
        let (before, after): (f64, f64) = {
            let nums: Vec<f64> = part
                .split(|c: char| !(c.is_ascii_digit() || c == '.'))
                .filter_map(|t| t.parse().ok())
                .collect();
            (nums[0], nums[1])
        };
        let fused_file = format!("members/{m}/valid-fused.parquet");
        if part.ends_with("not blended") {
            assert!(
                after >= before - 1e-3 && !inputs.contains(&fused_file),
                "{part}\n{inputs}"
            );
        } else {
            assert!(
                after < before + 1e-3 && inputs.contains(&fused_file),
                "{part}\n{inputs}"
            );
        }
    }
    let weights = r["blend_weights"].as_array().unwrap();
    assert_eq!(weights.len(), 2);
    let total: f64 = weights.iter().map(|w| w[1].as_f64().unwrap()).sum();
    assert!((total - 1.0).abs() < 1e-9, "blend weights sum to {total}");

    // Every member, bag and pseudo-label model was trained on the shared split.
    for run in [
        "members/a/run",
        "members/a/bag1",
        "members/b/run",
        "pseudo/a-shard0",
        "pseudo/a-shard1",
    ] {
        assert!(
            out.join(run).join("model.safetensors").exists(),
            "{run} has no final weights"
        );
    }
    let split_a = std::fs::read_to_string(out.join("members/a/run/split.csv")).unwrap();
    assert_eq!(
        split_a,
        std::fs::read_to_string(out.join("members/b/run/split.csv")).unwrap()
    );
    assert_ne!(
        split_a,
        std::fs::read_to_string(out.join("members/a/bag1/split.csv")).unwrap()
    );

    // The per-stage picture.
    let png = std::fs::read(out.join("report.png")).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 2_000,
        "report.png"
    );

    // The submission: the sample submission's header and one row per test image.
    let sub = std::fs::read_to_string(out.join("submission.csv")).unwrap();
    let sample = std::fs::read_to_string(data.join("sampleSubmission.csv")).unwrap();
    assert_eq!(sub.lines().next(), sample.lines().next());
    assert_eq!(sub.lines().count(), 13);

    // A rerun finds every output and runs nothing.
    replay(&file, &data, &out);
    let again = report(&out);
    assert_eq!(again["steps_run"], 0, "{again}");
    assert_eq!(stage_losses(&again), stages);

    assert!(plan(&file, &data, &out).iter().all(|(s, _)| s == "done"));
    // However the output folder is spelled, it is the same folder: nothing reruns.
    let respelled = out.join("..").join("out").join(".");
    assert!(plan(&file, &data, &respelled)
        .iter()
        .all(|(s, _)| s == "done"));

    // What the run would refuse, the plan refuses: another dataset, a member whose pipeline
    // changed since it was trained, an output folder that is busy or not a replay's.
    let refused = |replay: &Path, data: &Path, out: &Path, plan: bool| {
        let mut cmd = replay_cmd(replay, data, out);
        if plan {
            cmd.arg("--plan");
        }
        let o = cmd.output().unwrap();
        assert!(
            !o.status.success(),
            "not refused: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let other = dir.path().join("other-data");
    generate(
        &SynthOptions {
            classes: 3,
            per_class: 16,
            test: 12,
            seed: 14,
            threads: 0,
        },
        &other,
    )
    .unwrap();
    for plan in [true, false] {
        let err = refused(&file, &other, &out, plan);
        assert!(err.contains("another dataset"), "{err}");
    }
    let b = std::fs::read_to_string(dir.path().join("b.toml")).unwrap();
    std::fs::write(
        dir.path().join("b.toml"),
        b.replace("learning_rate = 0.01", "learning_rate = 0.02"),
    )
    .unwrap();
    let err = refused(&file, &data, &out, true);
    assert!(
        err.contains("members/b/run") && err.contains("another pipeline"),
        "{err}"
    );
    std::fs::write(dir.path().join("b.toml"), &b).unwrap();
    {
        let _held = plankton::fsx::lock_dir(&out).unwrap();
        let err = refused(&file, &data, &out, false);
        assert!(err.contains("another plankton process"), "{err}");
    }
    let foreign = dir.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
    for plan in [true, false] {
        let err = refused(&file, &data, &foreign, plan);
        assert!(err.contains("not a replay's"), "{err}");
    }
    assert_eq!(
        std::fs::read_to_string(foreign.join("notes.txt")).unwrap(),
        "mine"
    );
    let err = refused(&file, &data, &foreign.join("notes.txt"), true);
    assert!(err.contains("is not a folder"), "{err}");

    // Losing an intermediate output redoes it and what follows, and lands on the same scores;
    // the plan says so beforehand (trainings are kept).
    std::fs::remove_file(out.join("members/b/valid.parquet")).unwrap();
    let replanned = plan(&file, &data, &out);
    let first = replanned.iter().position(|(s, _)| s != "done").unwrap();
    assert_eq!(
        replanned[first],
        ("to run".to_string(), "predict b valid, TTA".to_string())
    );
    for (status, name) in &replanned[first + 1..] {
        let expected = if name.starts_with("train ") {
            "done"
        } else {
            "rerun"
        };
        assert_eq!(status, expected, "{name}: {replanned:?}");
    }
    replay(&file, &data, &out);
    let redone = report(&out);
    assert!(redone["steps_run"].as_u64().unwrap() >= 4, "{redone}");
    let close = |a: &Option<f64>, b: &Option<f64>| match (a, b) {
        (Some(a), Some(b)) => (a - b).abs() < 1e-9,
        (None, None) => true,
        _ => false,
    };
    for (x, y) in stage_losses(&redone).iter().zip(&stages) {
        assert!(
            x.0 == y.0 && close(&x.1, &y.1) && close(&x.2, &y.2),
            "{x:?} vs {y:?}"
        );
    }

    // The stored copy is compared as a config: one written without a field that has a default
    // (an older version's) is the same replay.
    let stored = std::fs::read_to_string(out.join("replay.toml")).unwrap();
    let older = stored.replace("only_if_better = true\n", "");
    assert_ne!(older, stored);
    std::fs::write(out.join("replay.toml"), older).unwrap();
    replay(&file, &data, &out);
    assert_eq!(report(&out)["steps_run"], 0);

    // Another configuration in the same folder is refused rather than mixed in.
    std::fs::write(&file, REPLAY.replace("seed = 5", "seed = 6")).unwrap();
    let o = replay_cmd(&file, &data, &out).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("another configuration"),
        "{err}"
    );
}

#[test]
fn a_failing_step_says_which_step_and_why_and_keeps_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let (data, file) = setup(dir.path());
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(&file, out.join("replay.toml")).unwrap();
    // The split step cannot create its folder: a file is in the way.
    std::fs::write(out.join("split"), b"not a folder").unwrap();
    let o = replay_cmd(&file, &data, &out).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    // The step by number and name, then the cause with the path, as a chain (not one string).
    assert!(err.contains("step 1/22 `split` failed"), "{err}");
    let cause = err
        .split("Caused by:")
        .nth(1)
        .unwrap_or_else(|| panic!("no cause chain:\n{err}"));
    assert!(
        cause.contains(&out.join("split").display().to_string()),
        "{err}"
    );
    // Nothing after the failed step ran.
    assert!(!out.join("members").exists());

    // The library keeps the typed source: an io::Error with its kind.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let opts = plankton::replay::ReplayOptions {
        replay_file: file.clone(),
        data: data.clone(),
        out: out.clone(),
        device: tch::Device::Cpu,
        stop: None,
        only: None,
    };
    let e = plankton::replay::run(&opts, rt.handle(), &mut |_| {}).unwrap_err();
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    let mut io_kind = None;
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            io_kind = Some(io.kind());
        }
        source = s.source();
    }
    // create_dir_all on the file `split`: "File exists".
    assert_eq!(
        io_kind,
        Some(std::io::ErrorKind::AlreadyExists),
        "no such io::Error in the chain of {e:?}"
    );
}

/// SIGTERM (a scheduler's stop) during a training step: the member checkpoints, the replay
/// exits 130 saying which step it stopped in, and leaves no lock behind.
#[test]
fn sigterm_stops_a_replay_with_a_checkpoint_and_exit_130() {
    let dir = tempfile::tempdir().unwrap();
    let (data, file) = setup(dir.path());
    let slow = member_pipeline(0.125).replace("steps = 40", "steps = 1000000");
    assert_ne!(slow, member_pipeline(0.125));
    std::fs::write(dir.path().join("a.toml"), slow).unwrap();
    let out = dir.path().join("out");
    let child = replay_cmd(&file, &data, &out)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let latest = out.join("members/a/run/checkpoints/LATEST");
    let t0 = std::time::Instant::now();
    while !latest.exists() {
        assert!(
            t0.elapsed().as_secs() < 120,
            "no checkpoint within 2 minutes"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(
        err.contains("stopped during step 2/") && err.contains("`train a`"),
        "{err}"
    );
    assert!(!out.join("members/a/run/model.safetensors").exists());
    // The folder is free again: --plan shows the member still to train.
    let planned = plan(&file, &data, &out);
    assert_eq!(planned[1], ("to run".to_string(), "train a".to_string()));
    let _free = plankton::fsx::lock_dir(&out).unwrap();
}

#[test]
fn a_bad_replay_file_names_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let (data, file) = setup(dir.path());
    for (bad, expect) in [
        (
            REPLAY.replace("members = [\"a\"]", "members = [\"zz\"]"),
            "`zz` is not a [[member]]",
        ),
        (
            REPLAY.replace("valid_fraction = 0.25", "valid_fraction = 0.25\ntypo = 1"),
            "unknown field `typo`",
        ),
        (
            REPLAY.replace("pipeline = \"b.toml\"", "pipeline = \"missing.toml\""),
            "missing.toml",
        ),
        (
            REPLAY.replace(
                "sets = [\"moments\", \"haralick\"]\nrepeats",
                "sets = [\"zernike\"]\nrepeats",
            ),
            "not computed",
        ),
    ] {
        std::fs::write(&file, &bad).unwrap();
        let o = replay_cmd(&file, &data, &dir.path().join("o"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("replay.toml") && err.contains(expect),
            "expected `{expect}`:\n{err}"
        );
    }
}

/// Members and blend only: the part that runs distributed.
const REPLAY_MEMBERS: &str = r#"
name = "tiny-members"
seed = 5
valid_fraction = 0.25

[[member]]
name = "a"
pipeline = "a.toml"
bagging = 1

[[member]]
name = "b"
pipeline = "b.toml"
seed = 99

[blend]
select = "all"
folds = 3
"#;

/// Every prediction file under `out` (relative path -> rows of (id, probabilities)); the image
/// features file is compared by the fusion's predictions it feeds.
fn prediction_files(out: &Path) -> std::collections::BTreeMap<String, Vec<(String, Vec<f32>)>> {
    let mut files = std::collections::BTreeMap::new();
    let mut stack = vec![out.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet")
                && !p
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("features")
            {
                let mut rows: Vec<(String, Vec<f32>)> =
                    plankton::sinks::parquet::Predictions::read(&p)
                        .unwrap()
                        .rows
                        .into_iter()
                        .map(|r| (r.image_id, r.probabilities.unwrap_or_default()))
                        .collect();
                rows.sort_by(|a, b| a.0.cmp(&b.0));
                let rel = p.strip_prefix(out).unwrap().display().to_string();
                files.insert(rel, rows);
            }
        }
    }
    files
}

fn assert_same_predictions(a: &Path, b: &Path) {
    let (fa, fb) = (prediction_files(a), prediction_files(b));
    assert_eq!(
        fa.keys().collect::<Vec<_>>(),
        fb.keys().collect::<Vec<_>>(),
        "the same prediction files"
    );
    for (name, rows) in &fa {
        let other = &fb[name];
        assert_eq!(rows.len(), other.len(), "{name}");
        for (x, y) in rows.iter().zip(other) {
            assert_eq!(x.0, y.0, "{name}");
            let gap =
                x.1.iter()
                    .zip(&y.1)
                    .map(|(p, q)| (p - q).abs())
                    .fold(0f32, f32::max);
            assert!(gap <= 1e-5, "{name}: {} differs by {gap}", x.0);
        }
    }
    assert_eq!(
        std::fs::read_to_string(a.join("submission.csv")).unwrap(),
        std::fs::read_to_string(b.join("submission.csv")).unwrap()
    );
}

#[test]
fn members_run_as_concurrent_jobs_on_one_folder_give_the_sequential_result() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = setup(dir.path());
    let file = dir.path().join("members.toml");
    std::fs::write(&file, REPLAY_MEMBERS).unwrap();
    let sequential = dir.path().join("sequential");
    replay(&file, &data, &sequential);

    // Three jobs at once on one folder: a, b chosen by a Slurm array index, and a again (a job
    // started twice): the split is made once, each step runs in one process.
    let jobs = dir.path().join("jobs");
    let start = |only: &str| {
        let mut c = replay_cmd(&file, &data, &jobs);
        c.args(["--device", "cpu", "--only", only]);
        c.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // b: the Slurm array script itself, as task 1 of the array.
    let slurm_task = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/slurm/replay.sbatch"))
        .args(["members"])
        .args([&file, &data, &jobs])
        .env("SLURM_ARRAY_TASK_ID", "1")
        .env("PLANKTON", env!("CARGO_BIN_EXE_plankton"))
        .env("PLANKTON_DEVICE", "cpu")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let children = [start("member=a"), slurm_task, start("member=0")];
    let outputs: Vec<String> = children
        .into_iter()
        .map(|c| {
            let o = c.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&o.stdout).to_string()
                + &String::from_utf8_lossy(&o.stderr);
            assert!(o.status.success(), "{text}");
            text
        })
        .collect();
    assert!(outputs[1].contains("member b:"), "{}", outputs[1]);
    assert!(
        !outputs[1].contains("train a"),
        "the array task ran only member b: {}",
        outputs[1]
    );
    // a's steps ran once between the two processes that asked for it.
    let trained_a = outputs
        .iter()
        .filter(|t| t.contains("done: train a ("))
        .count();
    assert_eq!(trained_a, 1, "{outputs:?}");
    // And every later step of a too: the process that trained does not redo what the other
    // did meanwhile (its outputs are newer than the training).
    for step in [
        "predict a valid, one pass",
        "predict a test, TTA",
        "average a bags",
    ] {
        let runs = outputs
            .iter()
            .map(|t| t.matches(&format!("done: {step} (")).count())
            .sum::<usize>();
        assert_eq!(runs, 1, "{step}: {outputs:?}");
    }
    // Nothing after the members has run yet; the whole replay runs it, reusing the members.
    assert!(!jobs.join("blend").exists() && !jobs.join("report.json").exists());
    let planned = plan(&file, &data, &jobs);
    for (status, name) in &planned {
        let members_step = ["split", "train ", "predict ", "average "]
            .iter()
            .any(|p| name.starts_with(p));
        assert_eq!(status == "done", members_step, "{name}: {status}");
    }
    let rest = planned.iter().filter(|(s, _)| s == "to run").count();
    replay(&file, &data, &jobs);
    let r = report(&jobs);
    assert_eq!(
        r["steps_run"].as_u64(),
        Some(rest as u64),
        "only the rest ran: {r}"
    );
    assert_same_predictions(&sequential, &jobs);
    // A member run again as a part (here: an output lost) makes what read it stale: the
    // blend and the submission are removed, so the next whole replay redoes them.
    std::fs::remove_file(jobs.join("members/b/valid.parquet")).unwrap();
    let o = replay_cmd(&file, &data, &jobs)
        .args(["--device", "cpu", "--only", "member=b"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(jobs.join("members/b/valid.parquet").is_file());
    assert!(!jobs.join("blend/weights.json").exists() && !jobs.join("submission.csv").exists());
    let planned = plan(&file, &data, &jobs);
    assert!(
        planned.contains(&("to run".to_string(), "blend".to_string())),
        "{planned:?}"
    );

    // --devices: the same, members in child processes, one per device at a time.
    let devices = dir.path().join("devices");
    let o = replay_cmd(&file, &data, &devices)
        .args(["--devices", "cpu,cpu"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{text}");
    assert!(
        text.contains("member a: started on cpu") && text.contains("member b: done on cpu"),
        "{text}"
    );
    assert!(devices.join("logs/member-a.log").is_file());
    assert_same_predictions(&sequential, &devices);
}

#[test]
fn only_refuses_unknown_members_and_a_missing_task_index_and_a_whole_replay_waits_its_turn() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = setup(dir.path());
    let file = dir.path().join("members.toml");
    std::fs::write(&file, REPLAY_MEMBERS).unwrap();
    let out = dir.path().join("out");
    for (only, says) in [
        ("member=c", "names no member (members: 0=a, 1=b"),
        ("member=2", "names no member"),
        ("member=task", "SLURM_ARRAY_TASK_ID"),
        ("a", "expected member=NAME"),
    ] {
        let o = replay_cmd(&file, &data, &out)
            .args(["--only", only])
            .env_remove("SLURM_ARRAY_TASK_ID")
            .env_remove("JOB_COMPLETION_INDEX")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(says), "{only}: {err}");
    }
    let o = replay_cmd(&file, &data, &out)
        .args(["--only", "member=task"])
        .env("JOB_COMPLETION_INDEX", "7")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("JOB_COMPLETION_INDEX=7 names no member"),
        "{err}"
    );
    // While a member job holds the folder, a whole replay is refused (its later steps read
    // every member's outputs), and the other way round.
    let part = plankton::fsx::lock_dir_shared(&out).unwrap();
    let o = replay_cmd(&file, &data, &out).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("another plankton process"),
        "{err}"
    );
    drop(part);
    let whole = plankton::fsx::lock_dir(&out).unwrap();
    let o = replay_cmd(&file, &data, &out)
        .args(["--only", "member=a"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("another plankton process"),
        "{err}"
    );
    drop(whole);
}
