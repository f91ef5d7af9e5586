//! The main job on an embedded default dataset (`plankton demo`, `make demo`): synthetic and
//! real data, augmentation previews, split, ZMUV, the data path measured, and a short training
//! run with its learning curve, then the trained run predicts with test-time augmentation:
//! validation images (to fit a temperature), the test images (Parquet + Kaggle submission), and
//! an evaluation report of the test predictions.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{Fill, PipelineConfig};
use crate::data_path::{self, DataPathError, LoaderBenchReport};
use crate::sinks::preview::{pick_spread, render_preview, PreviewError, PreviewOptions};
use crate::sources::{planktonclas, synth, Dataset, DatasetError};
use crate::split::SplitError;
use crate::topology::LoaderError;

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub out: PathBuf,
    /// Synthetic classes and images per class.
    pub classes: usize,
    pub per_class: usize,
    /// Fetch the real planktonclas images (needs PyPI).
    pub real_data: bool,
    /// Loader epochs to measure.
    pub epochs: u64,
    /// Training steps of the last part (0 = the embedded demo-train pipeline's).
    pub train_steps: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{path}: cannot create output folder: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Synth(#[from] synth::SynthError),
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error(transparent)]
    Preview(#[from] PreviewError),
    #[error(transparent)]
    Split(#[from] SplitError),
    #[error(transparent)]
    DataPath(#[from] DataPathError),
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error("synthetic data generation stopped: {0}")]
    Join(String),
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
    #[error(transparent)]
    Predict(#[from] crate::predict::job::PredictError),
    #[error(transparent)]
    Evaluate(#[from] crate::evaluate::EvaluateError),
}

/// The pipeline the demo trains with (`pipelines/demo-train.toml`, embedded).
pub fn embedded_train_pipeline() -> PipelineConfig {
    PipelineConfig::from_toml_str(
        include_str!("../pipelines/demo-train.toml"),
        std::path::Path::new("pipelines/demo-train.toml"),
    )
    .expect("embedded demo-train pipeline is valid (tested)")
}

/// Runs the demo; `say` receives one line per step, `on_batch` each loaded batch (progress).
pub async fn run(
    opts: &DemoOptions,
    mut say: impl FnMut(String),
    on_batch: impl FnMut(u64, usize),
) -> Result<LoaderBenchReport, DemoError> {
    let out = &opts.out;
    std::fs::create_dir_all(out).map_err(|source| DemoError::Io {
        path: out.clone(),
        source,
    })?;
    let cfg = PipelineConfig::embedded_demo();
    say("== plankton demo: the data path (decode -> warp/augment -> ZMUV -> batch) ==".into());
    let synth_ds = synthesise(opts, &cfg, &mut say).await?;
    let real_ds = fetch_real(opts, &mut say)?;
    previews(out, &cfg, &synth_ds, real_ds.as_ref(), &mut say)?;
    split_and_zmuv(out, &cfg, &synth_ds, &mut say).await?;

    // 5. The data path alone, as loader-bench runs it.
    let train = Arc::new(synth_ds.train.clone());
    let report = data_path::loader_bench(&cfg, train, opts.epochs, on_batch).await?;
    say("[5/9] data path:".into());
    say(report.render());

    // 6-9: the real images when we have them, else the synthetic set.
    let (data, which) = match &real_ds {
        Some(real) => (real.root.clone(), "planktonclas"),
        None => (synth_ds.root.clone(), "synthetic"),
    };
    let run_dir = train_demo(opts, &data, which, &mut say).await?;
    predict_and_evaluate(out, &run_dir, &data, &mut say).await?;
    say(format!("outputs: {}", out.display()));
    Ok(report)
}

/// 1. Synthetic competition-layout data.
async fn synthesise(
    opts: &DemoOptions,
    cfg: &PipelineConfig,
    say: &mut impl FnMut(String),
) -> Result<Dataset, DemoError> {
    let synth_dir = opts.out.join("synth");
    let synth_opts = synth::SynthOptions {
        classes: opts.classes,
        per_class: opts.per_class,
        test: opts.classes * 5,
        seed: cfg.seed,
        threads: 0,
    };
    let t0 = std::time::Instant::now();
    let dir = synth_dir.clone();
    let s = tokio::task::spawn_blocking(move || synth::generate(&synth_opts, &dir))
        .await
        .map_err(|e| DemoError::Join(e.to_string()))??;
    say(format!(
        "[1/9] synthetic data: {} train / {} test images, {} classes -> {} ({:.1} s)",
        s.train_images,
        s.test_images,
        s.class_names.len(),
        synth_dir.display(),
        t0.elapsed().as_secs_f64()
    ));
    Ok(Dataset::open(&synth_dir)?)
}

/// 2. Real plankton images (optional: needs PyPI; the demo goes on without them).
fn fetch_real(
    opts: &DemoOptions,
    say: &mut impl FnMut(String),
) -> Result<Option<Dataset>, DemoError> {
    if !opts.real_data {
        return Ok(None);
    }
    let real_dir = opts.out.join("planktonclas");
    let fetch = planktonclas::PlanktonclasOptions::new(&real_dir, opts.out.join("cache"));
    match planktonclas::fetch(&fetch) {
        Ok(s) => {
            say(format!(
                "[2/9] real data: planktonclas {} images in {} classes -> {}",
                s.train_images + s.test_images,
                s.class_names.len(),
                real_dir.display()
            ));
            Ok(Some(Dataset::open(&real_dir)?))
        }
        Err(e) => {
            say(format!("[2/9] real data skipped: {e}"));
            Ok(None)
        }
    }
}

/// 3. Augmentation previews.
fn previews(
    out: &Path,
    cfg: &PipelineConfig,
    synth_ds: &Dataset,
    real_ds: Option<&Dataset>,
    say: &mut impl FnMut(String),
) -> Result<(), DemoError> {
    for (name, ds) in [("synth", Some(synth_ds)), ("planktonclas", real_ds)] {
        let Some(ds) = ds else { continue };
        let picked: Vec<_> = pick_spread(&ds.train, ds.train.len())
            .iter()
            .map(|&i| ds.train[i].clone())
            .collect();
        let png = out.join(format!("preview-{name}.png"));
        render_preview(cfg, &picked, &png, &PreviewOptions::default())?;
        say(format!("[3/9] augmentation preview -> {}", png.display()));
        if name == "planktonclas" {
            // Grey-background images: the reference's fill of 0 frames every rotated patch;
            // show the border-median fill beside it.
            let mut border = cfg.clone();
            border.patches[0].fill = Fill::BorderMedian;
            let png = out.join("preview-planktonclas-border-fill.png");
            render_preview(&border, &picked, &png, &PreviewOptions::default())?;
            say(format!(
                "[3/9] same with fill = \"border_median\" -> {}",
                png.display()
            ));
        }
    }
    Ok(())
}

/// 4. Split files and ZMUV statistics of the synthetic set.
async fn split_and_zmuv(
    out: &Path,
    cfg: &PipelineConfig,
    ds: &Dataset,
    say: &mut impl FnMut(String),
) -> Result<(), DemoError> {
    for (path, split) in crate::split::write_split_files(
        ds,
        &out.join("split.csv"),
        cfg.split.valid_fraction,
        cfg.seed,
        cfg.split.bagging,
    )? {
        say(format!(
            "wrote {} ({} train / {} valid)",
            path.display(),
            split.train.len(),
            split.valid.len()
        ));
    }
    let zmuv_path = out.join("zmuv.json");
    let (stats, _) = data_path::estimate_and_save_zmuv(cfg, ds, &zmuv_path).await?;
    say(format!(
        "[4/9] split files and ZMUV (mean {:.4}, std {:.4} over {} augmented patches) -> {}",
        stats.inputs[0].mean,
        stats.inputs[0].std,
        stats.samples,
        zmuv_path.display()
    ));
    Ok(())
}

/// 6. A short training run with its learning curve; returns the run folder.
async fn train_demo(
    opts: &DemoOptions,
    data: &Path,
    which: &str,
    say: &mut impl FnMut(String),
) -> Result<PathBuf, DemoError> {
    let mut train_cfg = embedded_train_pipeline();
    if opts.train_steps > 0 {
        train_cfg.train.steps = opts.train_steps;
        train_cfg.train.validate_every = train_cfg.train.validate_every.min(opts.train_steps);
    }
    let run_dir = opts.out.join(format!("run-{which}"));
    let _ = std::fs::remove_dir_all(&run_dir);
    say(format!(
        "[6/9] training a quarter-width cyclic convroll4 on the {which} images for {} steps -> {}",
        train_cfg.train.steps,
        run_dir.display()
    ));
    let train_opts = crate::train::TrainOptions {
        config: train_cfg,
        data: data.to_path_buf(),
        out: run_dir.clone(),
        resume: false,
        device: tch::Device::Cpu,
        split_file: None,
        init_from: None,
        stop: None,
    };
    let handle = tokio::runtime::Handle::current();
    let (summary, lines) = tokio::task::spawn_blocking(move || {
        let mut lines = Vec::new();
        let r = crate::train::run(&train_opts, &handle, &mut |e| {
            if let crate::train::TrainEvent::Validated(r) = e {
                lines.push(format!("  {}", r.summary()));
            }
        });
        r.map(|s| (s, lines))
    })
    .await
    .map_err(|e| DemoError::Join(e.to_string()))??;
    for l in lines {
        say(l);
    }
    if let Some(s) = summary.final_scores {
        say(format!(
            "  final: log loss {:.3}, top-1 {:.2}, top-5 {:.2} on {} validation images; learning curve -> {}",
            s.log_loss,
            s.top1,
            s.top5,
            s.n,
            run_dir.join("learning_curve.png").display()
        ));
    }
    Ok(run_dir)
}

/// 7-9. Predict with TTA, calibrate on the validation images, predict the test images into
/// Parquet and a submission, evaluate.
async fn predict_and_evaluate(
    out: &Path,
    run_dir: &Path,
    data: &Path,
    say: &mut impl FnMut(String),
) -> Result<(), DemoError> {
    let predictions = out.join("predictions");
    let handle = tokio::runtime::Handle::current();
    let (run_c, data_c, pred_c) = (
        run_dir.to_path_buf(),
        data.to_path_buf(),
        predictions.clone(),
    );
    let (valid, fit, test, eval) = tokio::task::spawn_blocking(move || -> Result<_, DemoError> {
        use crate::predict::job::{run, PredictOptions, Subset};
        let mut opts =
            PredictOptions::new(&run_c, vec![data_c.clone()], &pred_c.join("valid.parquet"));
        opts.subset = Subset::Valid;
        opts.calibrate = false;
        let valid = run(&opts, &handle, &mut |_| {})?;
        // Shown, not stored: the demo run has far too few validation images for a temperature
        // to be trusted (`plankton calibrate` refuses below MIN_CALIBRATION_IMAGES).
        let (fit, _) = crate::evaluate::fit_calibration(&valid.out, &[])?;
        let mut opts =
            PredictOptions::new(&run_c, vec![data_c.clone()], &pred_c.join("test.parquet"));
        opts.submission = Some(pred_c.join("submission.csv"));
        let test = run(&opts, &handle, &mut |_| {})?;
        let eval = crate::evaluate::run(&test.out, &[data_c], Some(&pred_c.join("report")), 20)?;
        Ok((valid, fit, test, eval))
    })
    .await
    .map_err(|e| DemoError::Join(e.to_string()))??;
    let scores = |s: &Option<crate::scoring::Scores>| {
        s.map_or("no labels".into(), |s| {
            format!("log loss {:.3}, top-1 {:.2}", s.log_loss, s.top1)
        })
    };
    say(format!(
        "[7/9] validation images with {} quasi-random transforms: {} ({:.0} patches/s) -> {}",
        valid.views,
        scores(&valid.scores),
        valid.patches_per_second,
        valid.out.display()
    ));
    say(format!(
        "[8/9] a temperature fitted on them would be {:.2} (log loss {:.3} -> {:.3}), but {} images are too few to trust (`plankton calibrate` needs {}): not applied. Test images: {} -> {}, {}",
        fit.temperature,
        fit.log_loss_before,
        fit.log_loss_after,
        fit.n,
        crate::evaluate::MIN_CALIBRATION_IMAGES,
        scores(&test.scores),
        test.out.display(),
        test.submission.as_ref().map_or(String::new(), |(p, _)| format!("submission {}", p.display()))
    ));
    let e = &eval.evaluation;
    say(format!(
        "[9/9] evaluation of the {} test images: log loss {:.3}, top-1 {:.2}, top-3 {:.2}, ECE {:.3} -> {}",
        e.n,
        e.log_loss,
        e.top_k[0],
        e.top_k.get(2).copied().unwrap_or(f64::NAN),
        e.ece,
        predictions.join("report").display()
    ));
    if let Some(files) = &eval.files {
        say(format!(
            "  summary {}, confusion matrix {}, reliability diagram {}, images to check first {}",
            files.summary_md.display(),
            files.confusion_png.display(),
            files.reliability_png.display(),
            files.least_confident_csv.display()
        ));
    }
    Ok(())
}
