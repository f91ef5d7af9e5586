//! `plankton drift` on daemon-shaped predictions files: a stream that keeps the reference's class
//! mix stays within the sampling noise the report computes; the part that turns to two classes
//! in darker images stands out in divergence and brightness, in time order even when the files
//! are given out of order.

use std::path::Path;
use std::process::Command;

use plankton::rng::{Purpose, Stream};
use plankton::sinks::parquet::{PredictionRow, PredictionWriter, ServeColumns};

const CLASSES: [&str; 6] = ["a", "b", "c", "d", "e", "f"];

/// Rows with predicted classes drawn from `mix`, one per minute from `start_min`.
fn write(path: &Path, n: usize, start_min: u64, mix: &[f64], brightness: f32, seed: u64) {
    let names: Vec<String> = CLASSES.iter().map(|c| c.to_string()).collect();
    let mut w =
        PredictionWriter::create_served(path, names, "m", &serde_json::json!({}), 3).unwrap();
    let mut rng = Stream::new(seed, Purpose::Other, 0, 0);
    let total: f64 = mix.iter().sum();
    for i in 0..n {
        let mut u = rng.next_f64() * total;
        let mut k = 0;
        while k + 1 < mix.len() && u >= mix[k] {
            u -= mix[k];
            k += 1;
        }
        let mut p = vec![0.02f32; CLASSES.len()];
        p[k] = 1.0 - 0.02 * (CLASSES.len() - 1) as f32;
        w.push_served(
            PredictionRow {
                image_id: format!("img{seed}-{i}"),
                source_path: "cam".into(),
                probabilities: Some(p),
                views: 1,
                ..Default::default()
            },
            ServeColumns {
                seq: i as u64,
                received_unix_ms: (start_min + i as u64) * 60_000,
                image_size: Some((64, 48)),
                brightness: Some(brightness),
                ..Default::default()
            },
        )
        .unwrap();
    }
    w.finish().unwrap();
}

fn plankton(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_plankton"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn a_shifted_stream_stands_out_and_a_stationary_one_stays_in_the_noise() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let mix = [0.3, 0.25, 0.2, 0.1, 0.1, 0.05];
    write(&d.join("reference.parquet"), 2000, 0, &mix, 120.0, 1);
    // 800 images like the reference, then 400 of classes e and f only, darker.
    write(&d.join("day1.parquet"), 800, 10_000, &mix, 121.0, 2);
    write(
        &d.join("day2.parquet"),
        400,
        10_800,
        &[0.0, 0.0, 0.0, 0.0, 0.5, 0.5],
        60.0,
        3,
    );
    let out = d.join("report");
    // Files given out of time order: the report orders rows by their receive times.
    let (ok, text) = plankton(&[
        "drift",
        "--reference",
        &s(&d.join("reference.parquet")),
        "--current",
        &s(&d.join("day2.parquet")),
        &s(&d.join("day1.parquet")),
        "--out",
        &s(&out),
        "--window",
        "200",
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("1200 current images in 6 window(s) of 200"),
        "{text}"
    );
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("drift.json")).unwrap()).unwrap();
    assert_eq!(r["time_ordered"], true);
    let noise = r["noise_divergence_95"].as_f64().unwrap();
    assert!(noise > 0.0 && noise < 0.05, "noise floor {noise}");
    let windows = r["windows"].as_array().unwrap();
    assert_eq!(windows.len(), 6);
    for w in &windows[..4] {
        let div = w["divergence"].as_f64().unwrap();
        assert!(
            div < 2.0 * noise,
            "stationary window {}: {div} vs noise {noise}",
            w["index"]
        );
        assert!((w["mean_brightness"].as_f64().unwrap() - 121.0).abs() < 1e-6);
    }
    for w in &windows[4..] {
        let div = w["divergence"].as_f64().unwrap();
        assert!(div > 10.0 * noise, "shifted window {}: {div}", w["index"]);
        assert_eq!(w["mean_brightness"].as_f64().unwrap(), 60.0);
        let moved: Vec<&str> = w["moved"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["class"].as_str().unwrap())
            .collect();
        assert!(moved.contains(&"a") && moved.contains(&"f"), "{moved:?}");
    }
    assert_eq!(r["reference"]["mean_pixels"].as_f64(), Some(3072.0));
    let csv = std::fs::read_to_string(out.join("drift.csv")).unwrap();
    assert_eq!(csv.lines().count(), 7);
    assert!(image::open(out.join("drift.png")).unwrap().width() >= 900);
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(
        md.contains("Furthest window: 4") || md.contains("Furthest window: 5"),
        "{md}"
    );

    // A short last window is judged against the noise of its own size; a window beyond the
    // data is the data (the noise draws no larger than it).
    let (ok, text) = plankton(&[
        "drift",
        "--reference",
        &s(&d.join("reference.parquet")),
        "--current",
        &s(&d.join("day1.parquet")),
        "--out",
        &s(&d.join("tail")),
        "--window",
        "700",
    ]);
    assert!(ok, "{text}");
    let t: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("tail/drift.json")).unwrap()).unwrap();
    let noise: Vec<f64> = t["windows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["noise_95"].as_f64().unwrap())
        .collect();
    assert!(noise.len() == 2 && noise[1] > noise[0], "{noise:?}");
    let (ok, text) = plankton(&[
        "drift",
        "--reference",
        &s(&d.join("reference.parquet")),
        "--current",
        &s(&d.join("day1.parquet")),
        "--out",
        &s(&d.join("huge")),
        "--window",
        "1000000000000",
    ]);
    assert!(
        ok && text.contains("800 current images in 1 window(s) of 800"),
        "{text}"
    );

    // Refusals name the problem.
    let names: Vec<String> = ["x", "y"].iter().map(|c| c.to_string()).collect();
    let other = d.join("other.parquet");
    PredictionWriter::create(&other, names, "m", &serde_json::json!({}), 1)
        .unwrap()
        .finish()
        .unwrap();
    let (ok, text) = plankton(&[
        "drift",
        "--reference",
        &s(&d.join("reference.parquet")),
        "--current",
        &s(&other),
        "--out",
        &s(&d.join("r2")),
    ]);
    assert!(!ok && text.contains("classes differ"), "{text}");
    let (ok, text) = plankton(&[
        "drift",
        "--reference",
        &s(&d.join("missing.parquet")),
        "--current",
        &s(&d.join("day1.parquet")),
        "--out",
        &s(&d.join("r3")),
    ]);
    assert!(!ok && text.contains("missing.parquet"), "{text}");
    let (ok, text) = plankton(&[
        "drift",
        "--reference",
        &s(&d.join("reference.parquet")),
        "--current",
        &s(&d.join("day1.parquet")),
        "--out",
        &s(&d.join("r4")),
        "--window",
        "0",
    ]);
    assert!(!ok && text.contains("--window"), "{text}");
}
