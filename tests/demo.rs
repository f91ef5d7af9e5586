//! The demo job end to end on small sizes (offline: no real data).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_writes_every_output() {
    let dir = tempfile::tempdir().unwrap();
    let opts = plankton::demo::DemoOptions {
        out: dir.path().join("demo"),
        classes: 4,
        per_class: 10,
        real_data: false,
        epochs: 2,
        train_steps: 20,
    };
    let mut lines = Vec::new();
    let report = plankton::demo::run(&opts, |l| lines.push(l), |_, _| {})
        .await
        .unwrap();
    assert_eq!(report.summary.samples, 2 * 40);
    assert!(report.summary.failures.is_empty());
    for f in [
        "preview-synth.png",
        "split.csv",
        "split-bag1.csv",
        "split-bag2.csv",
        "zmuv.json",
        "synth/sampleSubmission.csv",
    ] {
        assert!(opts.out.join(f).is_file(), "{f} missing");
    }
    assert!(
        !opts.out.join("preview-planktonclas.png").exists(),
        "real data was not asked for"
    );
    let text = lines.join("\n");
    assert!(
        text.contains("[5/9] data path")
            && text.contains("GPU feed")
            && text.contains("[6/9] training")
            && text.contains("[9/9] evaluation"),
        "{text}"
    );
    for f in [
        "run-synthetic/learning_curve.png",
        "run-synthetic/best.safetensors",
        "run-synthetic/history.csv",
        "predictions/valid.parquet",
        "predictions/test.parquet",
        "predictions/submission.csv",
        "predictions/report/summary.md",
        "predictions/report/confusion_matrix.png",
        "predictions/report/reliability.png",
    ] {
        assert!(opts.out.join(f).is_file(), "{f} missing");
    }
    let z = plankton::stages::normalise::ZmuvStats::load(&opts.out.join("zmuv.json")).unwrap();
    assert_eq!(z.samples, 2048);
}
