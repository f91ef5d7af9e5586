//! The command line end to end: warp (against the scikit-image fixtures), preview, split,
//! synth, zmuv, and clear errors for bad arguments.

use std::path::{Path, PathBuf};
use std::process::Command;

use plankton::npy;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_plankton"))
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// `plankton warp` with a fixture case's parameters reproduces scikit-image's output; the only
/// difference allowed is our JPEG decoder's rounding (at most one grey level, 1/255).
#[test]
fn warp_command_matches_scikit_image_cases() {
    let cases: Vec<serde_json::Value> = serde_json::from_slice(
        &std::fs::read(root().join("tests/fixtures/warp/cases.json")).unwrap(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for case in cases.iter().filter(|c| c["out_rows"] == c["out_cols"]) {
        let name = case["name"].as_str().unwrap();
        let size = case["out_rows"].as_u64().unwrap();
        let stem = case["source"]
            .as_str()
            .unwrap()
            .trim_end_matches(".src.npy");
        let ds = case["ds"].as_f64().unwrap();
        let out = dir.path().join(format!("{name}.npy"));
        let mut cmd = bin();
        cmd.arg("warp")
            .arg("--input")
            .arg(root().join(format!("tests/fixtures/images/{stem}.jpg")))
            .arg("--out")
            .arg(&out);
        cmd.args(["--size", &size.to_string()]);
        if name.starts_with("fix") {
            cmd.args(["--ds", &ds.to_string()]);
        }
        for (flag, key) in [
            ("--rotation", "rotation_deg"),
            ("--shift-x", "shift_x"),
            ("--shift-y", "shift_y"),
            ("--zoom", "zoom"),
            ("--stretch", "stretch"),
            ("--shear", "shear_deg"),
        ] {
            cmd.args([flag, &case[key].as_f64().unwrap().to_string()]);
        }
        if case["flip"].as_bool().unwrap() {
            cmd.arg("--flip");
        }
        run_ok(&mut cmd);
        let ours = npy::read(&out).unwrap();
        let want = npy::read(
            &root()
                .join("tests/fixtures/warp")
                .join(case["expected"].as_str().unwrap()),
        )
        .unwrap();
        assert_eq!(ours.dtype, "<f4");
        assert_eq!(ours.shape, want.shape, "{name}");
        let max = ours
            .data
            .iter()
            .zip(&want.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(max <= 1.0 / 255.0 + 1e-6, "{name}: max difference {max}");
        checked += 1;
    }
    assert!(checked >= 20, "{checked}");
}

#[test]
fn synth_split_preview_and_zmuv_commands() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let text = run_ok(
        bin()
            .args([
                "synth",
                "--classes",
                "5",
                "--per-class",
                "12",
                "--test",
                "7",
                "--seed",
                "3",
                "--out",
            ])
            .arg(&data),
    );
    assert!(
        text.contains("60 train images in 5 classes and 7 test images"),
        "{text}"
    );

    let split = dir.path().join("split.csv");
    run_ok(
        bin()
            .args(["split", "--bagging", "2", "--data"])
            .arg(&data)
            .arg("--out")
            .arg(&split),
    );
    let rows = std::fs::read_to_string(&split).unwrap();
    assert_eq!(rows.lines().count(), 61);
    assert_eq!(
        rows.lines().filter(|l| l.ends_with(",valid")).count(),
        5,
        "one per class at 10% of 12"
    );
    assert!(
        dir.path().join("split-bag1.csv").is_file() && dir.path().join("split-bag2.csv").is_file()
    );
    let ds = plankton::sources::Dataset::open(&data).unwrap();
    let loaded = plankton::split::Split::load(&ds, &split).unwrap();
    assert_eq!(loaded.valid.len(), 5);
    // A split that lists an image twice (train and valid: a leak) or under another class than
    // its folder is refused with the line.
    let first = rows.lines().nth(1).unwrap().to_string();
    let (path_class, _) = first.rsplit_once(',').unwrap();
    for (bad, expect) in [
        (format!("{rows}{path_class},valid\n"), "line 62: "),
        (
            rows.replacen(
                &first,
                &first.replace(",train", ",valid").replacen(",", ",x", 1),
                1,
            ),
            "but the image is in the class folder",
        ),
    ] {
        let f = dir.path().join("bad-split.csv");
        std::fs::write(&f, &bad).unwrap();
        let e = plankton::split::Split::load(&ds, &f)
            .unwrap_err()
            .to_string();
        assert!(e.contains(expect) && e.contains("bad-split.csv"), "{e}");
    }

    let png = dir.path().join("preview.png");
    run_ok(
        bin()
            .args(["preview", "--images", "4", "--augmentations", "3", "--data"])
            .arg(&data)
            .arg("--out")
            .arg(&png),
    );
    let img = image::open(&png).unwrap();
    assert_eq!(img.height(), 4 * (96 + 4) + 4);
    assert_eq!(img.width(), 4 * 96 + 5 * 4 + 8);

    let zmuv = dir.path().join("zmuv.json");
    let pipeline = dir.path().join("p.toml");
    std::fs::write(&pipeline, "[zmuv]\nsamples = 100\n").unwrap();
    run_ok(
        bin()
            .args(["zmuv", "--data"])
            .arg(&data)
            .arg("--out")
            .arg(&zmuv)
            .arg("--pipeline")
            .arg(&pipeline),
    );
    let stats = plankton::stages::normalise::ZmuvStats::load(&zmuv).unwrap();
    assert_eq!(stats.samples, 100);
    assert!(stats.inputs[0].mean > 0.0 && stats.inputs[0].std > 0.0);
}

#[test]
fn bad_arguments_get_clear_errors() {
    let out = bin()
        .args(["loader-bench", "--data", "/nonexistent/plankton"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/plankton") && err.contains("no such folder"),
        "{err}"
    );

    // split: --bagging with --folds would be ignored, and an unbounded --bagging would write
    // files without end; both are refused before anything is read.
    for (args, expect) in [
        (
            &["--folds", "3", "--bagging", "2"][..],
            "cannot be used with",
        ),
        (&["--bagging", "100000"][..], "not in 0..=1000"),
    ] {
        let out = bin()
            .args([
                "split",
                "--data",
                "/nonexistent",
                "--out",
                "/nonexistent/s.csv",
            ])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(expect),
            "{args:?}: {err}"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(&p, "[augment]\nzoom = [0.0, 2.0]\n").unwrap();
    let out = bin()
        .args(["loader-bench", "--data", "."])
        .arg("--pipeline")
        .arg(&p)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("bad.toml") && err.contains("zoom"),
        "{err}"
    );

    let out = bin()
        .args(["warp", "--input"])
        .arg(dir.path().join("missing.jpg"))
        .args(["--out", "x.npy"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("missing.jpg"),
        "{err}"
    );

    // More folds than the smallest class has images: refused, nothing written.
    let data = dir.path().join("data");
    let out = bin()
        .args([
            "synth",
            "--classes",
            "2",
            "--per-class",
            "4",
            "--test",
            "0",
            "--out",
        ])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = bin()
        .args(["split", "--folds", "200", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(dir.path().join("cv.csv"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("200 folds") && err.contains("at most 4 folds"),
        "{err}"
    );
    assert!(!dir.path().join("cv-fold0.csv").exists());

    // Counts of 0 are refused by name, not quietly raised to 1.
    for (cmd, flag) in [
        ("predict", "--tta"),
        ("predict", "--top-k"),
        ("predict", "--batch-size"),
        ("blend", "--top-k"),
        ("fuse", "--top-k"),
    ] {
        let out = bin().args([cmd, flag, "0"]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(flag) && err.contains("must be at least 1"),
            "{cmd} {flag} 0: {err}"
        );
    }

    // A train that is refused for its arguments leaves no half-made run behind.
    let run = dir.path().join("run");
    let out = bin()
        .args(["train", "--steps", "0", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("steps"), "{err}");
    assert!(!run.exists(), "a refused run left {}", run.display());

    // A file in the way of --out is named as such (it used to read "File exists", twice).
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let out = bin()
        .args(["train", "--steps", "1", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("a-file: not a folder"),
        "{err}"
    );
    assert!(!err.contains("Caused by"), "{err}");
}

/// File names with a comma and with a quote survive a split file: `plankton split` writes it,
/// `plankton train --split` (through `Split::load`) reads every row back to the same image.
#[test]
fn file_names_with_commas_and_quotes_survive_the_split_file() {
    use plankton::sources::Dataset;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    run_ok(
        bin()
            .args([
                "synth",
                "--classes",
                "2",
                "--per-class",
                "4",
                "--test",
                "0",
                "--out",
            ])
            .arg(&data),
    );
    let class_dir = std::fs::read_dir(data.join("train"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let images: Vec<PathBuf> = std::fs::read_dir(&class_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    std::fs::rename(&images[0], class_dir.join("a,b.png")).unwrap();
    std::fs::rename(&images[1], class_dir.join("say \"cheese\".png")).unwrap();
    let out = dir.path().join("split.csv");
    run_ok(
        bin()
            .args(["split", "--valid-fraction", "0.5", "--data"])
            .arg(&data)
            .arg("--out")
            .arg(&out),
    );
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(
        text.contains("\"a,b.png\"") || text.contains("/a,b.png\""),
        "the comma is quoted: {text}"
    );
    let ds = Dataset::open(&data).unwrap();
    let split = plankton::split::Split::load(&ds, &out).unwrap();
    assert_eq!(split.train.len() + split.valid.len(), ds.train.len());
    let mut all: Vec<usize> = split.train.iter().chain(&split.valid).copied().collect();
    all.sort();
    assert_eq!(all, (0..ds.train.len()).collect::<Vec<_>>());
}
