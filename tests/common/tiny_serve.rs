//! The tiny served run that the daemon's tests (tests/serve.rs, tests/nats.rs) share: trained
//! once per test binary from pipelines/tiny-serve.toml on a small synthetic set.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plankton::config::PipelineConfig;
use plankton::sources::synth::{generate, SynthOptions};
use plankton::train::{self, TrainOptions};

pub struct Trained {
    _dir: tempfile::TempDir,
    pub run: PathBuf,
    /// The synthetic dataset's unlabelled test images (JPEG).
    pub images: Vec<PathBuf>,
}

/// One small run shared by the tests of a file (pipelines/tiny-serve.toml: 4 classes, 23x23
/// patches, a few steps; the daemon's behaviour, not the model's accuracy, is under test).
pub fn trained() -> &'static Trained {
    static RUN: OnceLock<Trained> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        generate(
            &SynthOptions {
                classes: 4,
                per_class: 8,
                test: 12,
                seed: 11,
                threads: 1,
            },
            &data,
        )
        .unwrap();
        let config = PipelineConfig::from_toml_str(
            include_str!("../../pipelines/tiny-serve.toml"),
            Path::new("pipelines/tiny-serve.toml"),
        )
        .unwrap();
        let run = dir.path().join("run");
        let rt = tokio::runtime::Runtime::new().unwrap();
        let opts = TrainOptions {
            config,
            data: data.clone(),
            out: run.clone(),
            resume: false,
            device: tch::Device::Cpu,
            split_file: None,
            init_from: None,
            stop: None,
        };
        train::run(&opts, rt.handle(), &mut |_| {}).unwrap();
        assert!(
            run.join("best.safetensors").is_file(),
            "the run has best weights"
        );
        let mut images: Vec<PathBuf> = std::fs::read_dir(data.join("test"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        images.sort();
        assert!(images.len() >= 12, "{images:?}");
        Trained {
            _dir: dir,
            run,
            images,
        }
    })
}
