//! A dataset folder mixing good images with corrupt, truncated, zero-byte, non-image,
//! oversized and bomb files, a stray file and an unknown class folder: the run completes, every
//! bad file is reported by name with its reason and counted in metrics, every good file is
//! processed. (Own test binary: it installs a global metrics recorder.)

use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use image::{GrayImage, ImageFormat, Luma};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use plankton::config::{PatchConfig, PipelineConfig};
use plankton::sources::Dataset;
use plankton::topology::{Loader, LoaderSpec, SamplePlan};

fn encode(img: &GrayImage, fmt: ImageFormat) -> Vec<u8> {
    let mut c = Cursor::new(Vec::new());
    img.write_to(&mut c, fmt).unwrap();
    c.into_inner()
}

fn organism(w: u32, h: u32, seed: u32) -> GrayImage {
    GrayImage::from_fn(w, h, |x, y| {
        let (dx, dy) = (x as f32 - w as f32 / 2.0, y as f32 - h as f32 / 2.0);
        Luma([if dx * dx + dy * dy < (w.min(h) as f32 / 3.0).powi(2) {
            40 + (seed * 7 % 50) as u8
        } else {
            235
        }])
    })
}

/// Incompressible pixels: the PNG is about as large as the raw image.
fn noise(w: u32, h: u32) -> GrayImage {
    GrayImage::from_fn(w, h, |x, y| {
        Luma([(plankton::rng::mix64((y * w + x) as u64) & 255) as u8])
    })
}

/// Writes the mixed folder; returns (good files, bad files with the expected error kind).
fn build(root: &Path) -> (Vec<String>, Vec<(String, &'static str)>) {
    std::fs::write(root.join("sampleSubmission.csv"), "image,copepod,diatom\n").unwrap();
    for c in ["copepod", "diatom", "mystery_class"] {
        std::fs::create_dir_all(root.join("train").join(c)).unwrap();
    }
    let mut good = Vec::new();
    for i in 0..6u32 {
        let (class, fmt, ext) = if i % 2 == 0 {
            ("copepod", ImageFormat::Jpeg, "jpg")
        } else {
            ("diatom", ImageFormat::Png, "png")
        };
        let name = format!("train/{class}/good{i}.{ext}");
        std::fs::write(root.join(&name), encode(&organism(40 + i * 9, 50, i), fmt)).unwrap();
        good.push(name);
    }
    let jpeg = encode(&organism(64, 64, 9), ImageFormat::Jpeg);
    let mut corrupt = jpeg.clone();
    for b in corrupt.iter_mut().skip(200).take(400) {
        *b = 0x5A;
    }
    let bomb = encode(&GrayImage::new(6000, 6000), ImageFormat::Png); // 36 Mpx of zeros, ~40 kB
    let files: Vec<(&str, Vec<u8>, &'static str)> = vec![
        (
            "train/copepod/truncated.jpg",
            jpeg[..jpeg.len() * 2 / 3].to_vec(),
            "corrupt",
        ),
        ("train/copepod/zero.jpg", Vec::new(), "empty"),
        (
            "train/diatom/notes.txt",
            b"lab notebook, not an image".to_vec(),
            "not_an_image",
        ),
        ("train/diatom/bomb.png", bomb, "too_many_pixels"),
        ("train/diatom/scrambled.jpg", corrupt, "corrupt"),
        (
            "train/copepod/huge.png",
            encode(&noise(600, 600), ImageFormat::Png),
            "too_many_bytes",
        ),
    ];
    let mut bad = Vec::new();
    for (name, bytes, kind) in files {
        std::fs::write(root.join(name), bytes).unwrap();
        bad.push((name.to_string(), kind));
    }
    std::fs::write(
        root.join("train/mystery_class/x.png"),
        encode(&organism(30, 30, 1), ImageFormat::Png),
    )
    .unwrap();
    std::fs::write(root.join("train/stray.jpg"), &jpeg).unwrap();
    (good, bad)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_files_are_named_counted_and_set_aside() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (good, bad) = build(dir.path());
    let ds = Dataset::open(dir.path()).unwrap();
    let problems: Vec<String> = ds.problems.iter().map(|p| p.to_string()).collect();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("mystery_class") && p.contains("unknown class")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.contains("stray.jpg")),
        "{problems:?}"
    );
    assert_eq!(ds.train.len(), good.len() + bad.len());

    let mut cfg = PipelineConfig::reference_default();
    cfg.patches = vec![PatchConfig::size_normalised(31, 27.0)];
    cfg.batch.size = 4;
    // A byte limit above every other file makes the 600x600 noise PNG "oversized".
    let huge = std::fs::metadata(dir.path().join("train/copepod/huge.png"))
        .unwrap()
        .len();
    let largest_good = good
        .iter()
        .map(|g| std::fs::metadata(dir.path().join(g)).unwrap().len())
        .max()
        .unwrap();
    assert!(
        huge > largest_good,
        "fixture: huge.png must be the largest file"
    );
    cfg.decode.max_bytes = largest_good.max(
        dir.path()
            .join("train/diatom/bomb.png")
            .metadata()
            .unwrap()
            .len(),
    );
    assert!(huge > cfg.decode.max_bytes);

    for epochs in [1u64, 2] {
        let spec = LoaderSpec {
            records: Arc::new(ds.train.clone()),
            plan: SamplePlan::Ordered { epochs },
            augment: true,
            zmuv: None,
            first_epoch: 0,
            views: None,
        };
        let mut loader = Loader::spawn(&cfg, spec).unwrap();
        let mut processed = Vec::new();
        while let Some(b) = loader.next_batch().await {
            for (i, &r) in b.record_indices.iter().enumerate() {
                assert!(b.input(0)[i * 31 * 31..(i + 1) * 31 * 31]
                    .iter()
                    .all(|v| v.is_finite()));
                processed.push(
                    ds.train[r]
                        .path
                        .strip_prefix(dir.path())
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
        let summary = loader.finish().await.unwrap();
        let mut once: Vec<String> = processed.clone();
        once.sort();
        once.dedup();
        let mut want = good.clone();
        want.sort();
        assert_eq!(once, want, "every good file processed, no bad one");
        assert_eq!(processed.len(), good.len() * epochs as usize);
        // Each bad file reported once, by name, with its reason.
        assert_eq!(summary.failures.len(), bad.len(), "{:?}", summary.failures);
        for (name, kind) in &bad {
            let f = summary
                .failures
                .iter()
                .find(|f| f.path.ends_with(name))
                .unwrap_or_else(|| panic!("{name} not reported"));
            assert_eq!(f.kind, *kind, "{name}: {}", f.reason);
            assert!(
                f.reason
                    .contains(Path::new(name).file_name().unwrap().to_str().unwrap()),
                "{}",
                f.reason
            );
        }
    }

    // Metrics: decode errors by reason (2 runs: 1 + 2 epochs = 3 passes over each bad file).
    let mut errors: HashMap<String, u64> = HashMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let k = key.key();
        if k.name() == plankton::telemetry::STAGE_ERRORS {
            let reason = k
                .labels()
                .find(|l| l.key() == "reason")
                .unwrap()
                .value()
                .to_string();
            if let DebugValue::Counter(n) = value {
                *errors.entry(reason).or_default() += n;
            }
        }
    }
    let mut expected: HashMap<String, u64> = HashMap::new();
    for (_, kind) in &bad {
        *expected.entry(kind.to_string()).or_default() += 3;
    }
    assert_eq!(errors, expected);
}

#[test]
fn cli_loader_bench_completes_and_names_every_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    let (_good, bad) = build(dir.path());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_plankton"))
        .args(["loader-bench", "--epochs", "1", "--data"])
        .arg(dir.path())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    for (name, _) in bad.iter().filter(|(_, k)| *k != "too_many_bytes") {
        assert!(
            text.contains(Path::new(name).file_name().unwrap().to_str().unwrap()),
            "{name} missing from:\n{text}"
        );
    }
    assert!(
        text.contains("mystery_class") && text.contains("stray.jpg"),
        "{text}"
    );
}
