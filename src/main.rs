//! `plankton` command line: parse, load config, call the library.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use plankton::config::PipelineConfig;
use plankton::imgproc::Augmentation;
use plankton::sinks::preview::{pick_spread, render_preview, PreviewOptions};
use plankton::sources::{planktonclas, synth, Dataset};

#[derive(Parser)]
#[command(
    name = "plankton",
    version,
    about = "Plankton image classification as a streaming pipeline (NDSB 2015 recipe)"
)]
struct Cli {
    /// Log as JSON lines (for daemons and log collectors).
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the main job on an embedded default dataset (what `make demo` runs).
    Demo(DemoArgs),
    /// Write a synthetic plankton dataset in the competition layout.
    Synth(SynthArgs),
    /// Obtain a real dataset.
    Data {
        #[command(subcommand)]
        which: DataCommand,
    },
    /// Grid of original images beside augmented patches (PNG).
    Preview(PreviewArgs),
    /// Write the float32 patch the pipeline makes for exact parameters (before ZMUV) as .npy.
    Warp(WarpArgs),
    /// Run the data path alone (no model): images/s overall and per stage, peak memory.
    LoaderBench(LoaderBenchArgs),
    /// Write a stratified train/validation split (and bagging splits) of a dataset.
    Split(SplitArgs),
    /// Estimate the global ZMUV mean/std on augmented training patches.
    Zmuv(ZmuvArgs),
    /// Train a network (or resume a run) on a dataset in the competition layout.
    Train(TrainArgs),
    /// Print a pipeline's network: layers, shapes, parameters, multiply-accumulates.
    Model(ModelArgs),
    /// What this binary finds to compute on: its libtorch, CUDA (loaded or why not), devices.
    Devices(DevicesArgs),
    /// Predict images with a trained run (quasi-random TTA) into a Parquet file, and optionally
    /// a Kaggle submission CSV.
    Predict(PredictArgs),
    /// Score a predictions file: log loss, top-k, per-class precision/recall, confusion matrix,
    /// reliability diagram, and the least confident images.
    Evaluate(EvaluateArgs),
    /// Fit a temperature on validation predictions and store it in the run (predict applies it).
    Calibrate(CalibrateArgs),
    /// Blend members' predictions: fit weights (softmax, L-BFGS on the validation log loss)
    /// with members chosen by cross-validation, or apply the weights of an earlier fit.
    Blend(BlendArgs),
    /// The whole reference solution on a dataset folder, resumable: train the members, TTA,
    /// features, fusion, blend, pseudo-label round, submission, and the score of every stage.
    Replay(ReplayArgs),
    /// Run the camera-ingest daemon: folder watch and HTTP upload in, rolling Parquet out,
    /// Prometheus /metrics. SIGTERM/SIGINT drain and exit; SIGHUP reloads the model.
    Serve(ServeArgs),
    /// Image features for late fusion (raw size, moments, Hu, Haralick) into a Parquet file.
    Features(FeaturesArgs),
    /// Late fusion: fit per-feature-set nets on validation predictions (out-of-fold loss
    /// before/after, model folder), or apply a fitted model (--model) to other predictions.
    Fuse(FuseArgs),
}

#[derive(Args)]
struct FuseArgs {
    /// Predictions to fuse: labelled validation predictions to fit on, any with --model.
    #[arg(long)]
    predictions: PathBuf,
    /// The features Parquet (`plankton features`) of the same images.
    #[arg(long)]
    features: PathBuf,
    /// Dataset folder(s) holding the true classes (default: the file's `label` column).
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// The fused predictions Parquet (out of fold when fitting).
    #[arg(long)]
    out: PathBuf,
    /// Apply this fusion model folder instead of fitting one.
    #[arg(long, conflicts_with_all = ["model_out", "sets", "repeats", "folds", "seed", "steps", "learning_rate"])]
    model: Option<PathBuf>,
    /// Where to store the fitted model (fusion.json, fusion.safetensors).
    #[arg(long, required_unless_present = "model")]
    model_out: Option<PathBuf>,
    /// Feature sets, one fusion group each, averaged uniformly; `set:L2` sets a penalty
    /// (default 0.002 for moments, 0.0002 otherwise).
    #[arg(long, default_value = "moments,haralick")]
    sets: String,
    /// Nets per set, with different seeds, averaged.
    #[arg(long, default_value_t = 10)]
    repeats: usize,
    /// Cross-validation folds for the out-of-fold predictions and loss.
    #[arg(long, default_value_t = 5)]
    folds: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Mini-batch updates per net.
    #[arg(long, default_value_t = plankton::fusion::job::DEFAULT_STEPS)]
    steps: usize,
    /// First learning rate (dropped x0.1 at 100/240 and again at 200/240 of the steps).
    #[arg(long, default_value_t = plankton::fusion::job::DEFAULT_LEARNING_RATE)]
    learning_rate: f64,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Also write the summary (scores, row counts, settings) as JSON.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Classes listed per row in top_classes.
    #[arg(long, default_value_t = 5)]
    top_k: usize,
}

#[derive(Args)]
struct ReplayArgs {
    /// The replay file (see pipelines/replay-ndsb.toml).
    #[arg(long)]
    pipeline: PathBuf,
    /// Dataset folder in the competition layout (train/<class>/, test/).
    #[arg(long)]
    data: PathBuf,
    /// Output folder; rerunning with the same folder skips the steps already done.
    #[arg(long)]
    out: PathBuf,
    /// auto (cuda:0 when a GPU is usable, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(Args)]
struct FeaturesArgs {
    /// Dataset folders (train and test images), folders of images, or image files.
    #[arg(long, required = true, num_args = 1..)]
    data: Vec<PathBuf>,
    #[arg(long)]
    out: PathBuf,
    /// Comma-separated: moments, hu, haralick, zernike, lbp, tas.
    #[arg(long, default_value = "moments,hu,haralick")]
    set: String,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

#[derive(Args)]
struct ServeArgs {
    /// The daemon config (see pipelines/camera-daemon.toml).
    #[arg(long)]
    pipeline: PathBuf,
}

#[derive(Args)]
struct PredictArgs {
    /// The run directory written by `plankton train`.
    #[arg(long)]
    model: PathBuf,
    /// A dataset folder (competition layout), folders of images, or image files.
    #[arg(long, required = true, num_args = 1..)]
    data: Vec<PathBuf>,
    /// The predictions Parquet file to write.
    #[arg(long)]
    out: PathBuf,
    /// Which images of a dataset folder.
    #[arg(long, value_enum, default_value_t = plankton::predict::job::Subset::Test)]
    subset: plankton::predict::job::Subset,
    /// Transforms per image (default: the run's [tta], 70); 1 = one pass without augmentation.
    #[arg(long)]
    tta: Option<usize>,
    /// How an image's views are combined: mean-probability, mean-log-probability, geometric-mean
    /// or entropy-weighted (default: the run's [tta]).
    #[arg(long)]
    aggregation: Option<plankton::predict::aggregate::Aggregation>,
    /// Also write a Kaggle submission CSV.
    #[arg(long)]
    submission: Option<PathBuf>,
    /// Column order for the submission (default: the dataset's sampleSubmission.csv).
    #[arg(long)]
    sample_submission: Option<PathBuf>,
    /// best, final, or a .safetensors path.
    #[arg(long, default_value = "best")]
    weights: plankton::predict::job::Weights,
    /// auto (cuda:0 when a GPU is usable, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Patches per forward pass (default: the run's batch size).
    #[arg(long)]
    batch_size: Option<usize>,
    /// fp32 or bf16 (default: the run's [compute] precision).
    #[arg(long)]
    precision: Option<plankton::device::Precision>,
    /// Ignore the run's calibration.json.
    #[arg(long)]
    no_calibration: bool,
    /// Model id written in every row (default: <run>/<weights>@<content hash>).
    #[arg(long)]
    model_id: Option<String>,
    /// Classes listed per row in top_classes.
    #[arg(long, default_value_t = 5)]
    top_k: usize,
}

#[derive(Args)]
struct EvaluateArgs {
    #[arg(long)]
    predictions: PathBuf,
    /// Dataset folder(s) holding the true classes (default: the file's `label` column).
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// Report folder: report.json, summary.md, per_class.csv, least_confident.csv, PNGs.
    #[arg(long)]
    out: Option<PathBuf>,
    /// How many of the least confident images to list.
    #[arg(long, default_value_t = 50)]
    least_confident: usize,
}

#[derive(Args)]
struct CalibrateArgs {
    /// The run directory to store calibration.json in.
    #[arg(long)]
    model: PathBuf,
    /// Predictions of the run's validation images (`plankton predict --subset valid`).
    #[arg(long)]
    predictions: PathBuf,
    /// Dataset folder(s) holding the true classes (default: the file's `label` column).
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// Refuse to store a temperature fitted on fewer labelled images.
    #[arg(long, default_value_t = plankton::evaluate::MIN_CALIBRATION_IMAGES)]
    min_images: usize,
}

#[derive(Args)]
struct BlendArgs {
    /// Members' predictions: validation predictions to fit on; with --weights, the files to
    /// blend (e.g. test predictions) in the weights file's member order.
    #[arg(long, required = true, num_args = 1..)]
    predictions: Vec<PathBuf>,
    /// Dataset folder(s) holding the true classes (default: the files' `label` column).
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// The blended predictions Parquet file to write.
    #[arg(long)]
    out: PathBuf,
    /// Apply the weights of an earlier fit (its --weights-out) instead of fitting.
    #[arg(long, conflicts_with_all = ["weights_out", "uniform", "select", "folds", "report", "data"])]
    weights: Option<PathBuf>,
    /// Where to store the fitted weights (for --weights).
    #[arg(long)]
    weights_out: Option<PathBuf>,
    /// Equal weights instead of fitted ones.
    #[arg(long)]
    uniform: bool,
    /// cv: greedy forward selection by K-fold CV on the validation images; all: every member.
    #[arg(long, default_value = "cv")]
    select: plankton::blend::Select,
    /// Folds of the selection's cross-validation.
    #[arg(long, default_value_t = 5)]
    folds: usize,
    /// Write the fit (members, selection steps, weights, losses) as JSON.
    #[arg(long)]
    report: Option<PathBuf>,
    /// With --weights: accept files of other models standing in for members (e.g. bagged ones).
    #[arg(long, requires = "weights")]
    allow_other_models: bool,
    /// Classes listed per row in top_classes.
    #[arg(long, default_value_t = 5)]
    top_k: usize,
}

#[derive(Subcommand)]
enum DataCommand {
    /// The 105 labelled plankton images of the `planktonclas` PyPI package, in competition layout.
    Planktonclas {
        #[arg(long)]
        out: PathBuf,
        /// Where the downloaded wheel is kept.
        #[arg(long, default_value = "data-cache")]
        cache: PathBuf,
        #[arg(long, default_value = planktonclas::DEFAULT_PYTHON)]
        python: String,
    },
}

#[derive(Args)]
struct SynthArgs {
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 121)]
    classes: usize,
    #[arg(long, default_value_t = 250)]
    per_class: usize,
    #[arg(long, default_value_t = 1000)]
    test: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Worker threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

#[derive(Args)]
struct PipelineArg {
    /// Pipeline TOML (default: the built-in reference pipeline, see pipelines/default.toml).
    #[arg(long)]
    pipeline: Option<PathBuf>,
}

impl PipelineArg {
    fn load(&self) -> Result<PipelineConfig> {
        match &self.pipeline {
            Some(p) => Ok(PipelineConfig::load(p)?),
            None => Ok(PipelineConfig::reference_default()),
        }
    }
}

#[derive(Args)]
struct PreviewArgs {
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    pipeline: PipelineArg,
    #[arg(long, default_value_t = 8)]
    images: usize,
    #[arg(long, default_value_t = 7)]
    augmentations: usize,
}

#[derive(Args)]
struct WarpArgs {
    #[arg(long)]
    input: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// Patch size (square); with the default size-normalised mode the organism fills size-10 px.
    #[arg(long, default_value_t = 95)]
    size: usize,
    /// Fixed-scale mode with this downscale factor instead of size normalisation.
    #[arg(long)]
    ds: Option<f64>,
    #[arg(long, default_value_t = 0.0)]
    rotation: f64,
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    shift_x: f64,
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    shift_y: f64,
    #[arg(long, default_value_t = 1.0)]
    zoom: f64,
    #[arg(long, default_value_t = 1.0)]
    stretch: f64,
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    shear: f64,
    #[arg(long)]
    flip: bool,
    /// Fill outside the source with the image's border median instead of 0.
    #[arg(long)]
    border_fill: bool,
}

#[derive(Args)]
struct LoaderBenchArgs {
    #[arg(long)]
    data: PathBuf,
    #[command(flatten)]
    pipeline: PipelineArg,
    #[arg(long, default_value_t = 2)]
    epochs: u64,
    /// Worker threads (default: the pipeline's, 0 = one per core).
    #[arg(long)]
    workers: Option<usize>,
}

#[derive(Args)]
struct SplitArgs {
    #[arg(long)]
    data: PathBuf,
    /// Output CSV; bagging splits go beside it as <stem>-bag<k>.csv.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    pipeline: PipelineArg,
    /// Validation fraction (default: the pipeline's split.valid_fraction).
    #[arg(long)]
    valid_fraction: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    /// Number of extra bagging splits (default: the pipeline's split.bagging).
    #[arg(long)]
    bagging: Option<usize>,
    /// Write K cross-validation folds (<stem>-fold<k>.csv) instead.
    #[arg(long)]
    folds: Option<usize>,
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    pipeline: PipelineArg,
    #[arg(long)]
    data: PathBuf,
    /// The run directory (config, split, ZMUV, checkpoints, weights, history, learning curve).
    #[arg(long)]
    out: PathBuf,
    /// Continue the run in --out from its last checkpoint, with its own pipeline.toml.
    #[arg(long)]
    resume: bool,
    /// auto (cuda:0 when a GPU is usable, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Use this split file (path,class,subset; see `plankton split`) instead of a fresh one.
    #[arg(long)]
    split: Option<PathBuf>,
    /// Override train.steps.
    #[arg(long)]
    steps: Option<u64>,
    /// Write every step's training loss to this CSV (step,loss), e.g. to compare devices.
    #[arg(long)]
    loss_log: Option<PathBuf>,
}

#[derive(Args)]
struct ModelArgs {
    #[command(flatten)]
    pipeline: PipelineArg,
    /// Number of classes (121 in the competition).
    #[arg(long, default_value_t = 121)]
    classes: usize,
    /// Build the network here (auto, cpu, cuda, cuda:N).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Check the cyclic network's 90-degree invariance on random inputs (on --device) and print
    /// the largest relative difference of the logits; exits 1 if it exceeds 1e-4.
    #[arg(long)]
    check_invariance: bool,
    /// Also write the invariance check as JSON.
    #[arg(long, requires = "check_invariance")]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct DevicesArgs {
    /// JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ZmuvArgs {
    #[arg(long)]
    data: PathBuf,
    /// Output JSON (a run keeps it as zmuv.json).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    pipeline: PipelineArg,
}

#[derive(Args)]
struct DemoArgs {
    /// Where all demo outputs go.
    #[arg(long, default_value = "demo-out")]
    out: PathBuf,
    /// Synthetic classes for the loader part.
    #[arg(long, default_value_t = 24)]
    classes: usize,
    #[arg(long, default_value_t = 60)]
    per_class: usize,
    /// Skip downloading the real planktonclas images (offline machines).
    #[arg(long)]
    no_real_data: bool,
}

fn init_logging(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only on a terminal: escape codes in a log file or a pipe are noise to grep.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.compact().init();
    }
}

fn open_dataset(dir: &Path) -> Result<Dataset> {
    let ds = Dataset::open(dir)?;
    for p in &ds.problems {
        tracing::warn!(path = %p.path.display(), reason = %p.reason, "layout problem: skipped");
        metrics::counter!(plankton::telemetry::LAYOUT_PROBLEMS).increment(1);
    }
    Ok(ds)
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    match cli.command {
        Command::Demo(a) => demo(a).await,
        Command::Synth(a) => {
            let opts = synth::SynthOptions {
                classes: a.classes,
                per_class: a.per_class,
                test: a.test,
                seed: a.seed,
                threads: a.threads,
            };
            let t0 = std::time::Instant::now();
            let total = (opts.classes * opts.per_class + opts.test) as u64;
            let pb = spinner(&format!("synthesising {total} images"));
            let s = tokio::task::spawn_blocking(move || {
                synth::generate(&opts, &a.out).map(|s| (s, a.out))
            })
            .await??;
            pb.finish_and_clear();
            println!(
                "wrote {} train images in {} classes and {} test images to {} in {:.1} s",
                s.0.train_images,
                s.0.class_names.len(),
                s.0.test_images,
                s.1.display(),
                t0.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Data {
            which: DataCommand::Planktonclas { out, cache, python },
        } => {
            let s = planktonclas::fetch(&planktonclas::PlanktonclasOptions {
                out: out.clone(),
                cache_dir: cache,
                python,
            })?;
            println!(
                "planktonclas {}: {} train + {} test images in {} classes at {}{} (package split: {})",
                planktonclas::PLANKTONCLAS_VERSION, s.train_images, s.test_images, s.class_names.len(), out.display(),
                if s.from_cache { " (cached)" } else { "" }, out.join(planktonclas::SPLIT_FILE).display()
            );
            Ok(())
        }
        Command::Preview(a) => {
            let cfg = a.pipeline.load()?;
            let ds = open_dataset(&a.data)?;
            let records = if ds.train.is_empty() {
                &ds.test
            } else {
                &ds.train
            };
            let order = pick_spread(records, records.len());
            let picked: Vec<_> = order.iter().map(|&i| records[i].clone()).collect();
            let opts = PreviewOptions {
                images: a.images,
                augmentations: a.augmentations,
                ..Default::default()
            };
            let s = render_preview(&cfg, &picked, &a.out, &opts)?;
            for (p, why) in &s.skipped {
                tracing::warn!(path = %p.display(), reason = %why, "not previewed");
            }
            println!(
                "wrote {} ({}x{} px, {} images x {} augmentations)",
                a.out.display(),
                s.width,
                s.height,
                s.shown.len(),
                a.augmentations
            );
            Ok(())
        }
        Command::Warp(a) => warp_one(a),
        Command::LoaderBench(a) => {
            let mut cfg = a.pipeline.load()?;
            if let Some(w) = a.workers {
                cfg.loader.workers = w;
            }
            let ds = open_dataset(&a.data)?;
            let records = if ds.train.is_empty() {
                ds.test
            } else {
                ds.train
            };
            let report = run_loader_bench(&cfg, records, a.epochs).await?;
            print!("{}", report.render());
            Ok(())
        }
        Command::Split(a) if a.folds.is_some() => {
            let cfg = a.pipeline.load()?;
            let ds = open_dataset(&a.data)?;
            write_folds(
                &ds,
                &a.out,
                a.folds.unwrap_or(5),
                a.seed.unwrap_or(cfg.seed),
            )
        }
        Command::Split(a) => {
            let cfg = a.pipeline.load()?;
            let ds = open_dataset(&a.data)?;
            write_splits(
                &ds,
                &a.out,
                a.valid_fraction.unwrap_or(cfg.split.valid_fraction),
                a.seed.unwrap_or(cfg.seed),
                a.bagging.unwrap_or(cfg.split.bagging),
            )
        }
        Command::Zmuv(a) => {
            let cfg = a.pipeline.load()?;
            let ds = open_dataset(&a.data)?;
            zmuv(&cfg, &ds, &a.out).await
        }
        Command::Train(a) => train(a).await,
        Command::Predict(a) => predict(a).await,
        Command::Serve(a) => serve(a).await,
        Command::Replay(a) => replay(a).await,
        Command::Features(a) => {
            use plankton::features::job::{self, FeatureSet, FeaturesOptions};
            let opts = FeaturesOptions {
                data: a.data,
                out: a.out,
                sets: FeatureSet::parse_list(&a.set)?,
                threads: a.threads,
                decode: Default::default(),
            };
            let s = tokio::task::spawn_blocking(move || {
                let pb = progress(0, "features");
                let r = job::run(&opts, |done, total| {
                    pb.set_length(total as u64);
                    pb.set_position(done as u64);
                });
                pb.finish_and_clear();
                r.map(|s| (s, opts.out))
            })
            .await??;
            let (s, out) = s;
            for (p, r) in &s.failed {
                tracing::warn!(path = %p.display(), reason = %r, "set aside");
            }
            println!(
                "{} images x {} feature columns in {:.1} s ({:.0} images/s), {} set aside (rows kept with the reason) -> {}",
                s.images,
                s.columns,
                s.seconds,
                s.images as f64 / s.seconds.max(1e-9),
                s.failed.len(),
                out.display()
            );
            Ok(())
        }
        Command::Fuse(a) => {
            use plankton::fusion::{self, ApplyOptions, FitOptions};
            let s = tokio::task::spawn_blocking(move || -> Result<fusion::FusionSummary> {
                let Some(model_out) = a.model_out else {
                    let mut o = ApplyOptions::new(
                        a.model.as_deref().expect("clap: --model or --model-out"),
                        &a.predictions,
                        &a.features,
                        &a.out,
                    );
                    (o.data, o.threads, o.report, o.top_k) = (a.data, a.threads, a.report, a.top_k);
                    return Ok(fusion::apply(&o)?);
                };
                let mut o = FitOptions::new(&a.predictions, &a.features, &a.out, &model_out);
                (
                    o.data, o.repeats, o.folds, o.seed, o.threads, o.report, o.top_k,
                ) = (
                    a.data, a.repeats, a.folds, a.seed, a.threads, a.report, a.top_k,
                );
                o.sets = fusion::SetSpec::parse_list(&a.sets)?;
                o.train.steps = a.steps;
                fusion::job::scale_learning_rate(&mut o.train, a.learning_rate);
                let pb = progress(0, "fuse");
                let r = fusion::fit(&o, &|done, total| {
                    pb.set_length(total as u64);
                    pb.set_position(done as u64);
                });
                pb.finish_and_clear();
                Ok(r?)
            })
            .await??;
            print!("{}", s.render());
            Ok(())
        }
        Command::Evaluate(a) => {
            let s = plankton::evaluate::run(
                &a.predictions,
                &a.data,
                a.out.as_deref(),
                a.least_confident,
            )?;
            print!("{}", evaluation_text(&s));
            Ok(())
        }
        Command::Calibrate(a) => {
            let fit =
                plankton::evaluate::calibrate_run(&a.model, &a.predictions, &a.data, a.min_images)?;
            println!(
                "temperature {:.3} fitted on {} images: log loss {:.4} -> {:.4}, ECE {:.4} -> {:.4}; stored in {}",
                fit.temperature,
                fit.n,
                fit.log_loss_before,
                fit.log_loss_after,
                fit.ece_before,
                fit.ece_after,
                plankton::train::RunDir::new(&a.model).calibration().display()
            );
            Ok(())
        }
        Command::Blend(a) => {
            use plankton::blend::{self, ApplyOptions, FitOptions, Weighting};
            let pb = spinner("blending");
            let text = match a.weights {
                Some(w) => {
                    let mut o = ApplyOptions::new(&w, a.predictions, &a.out);
                    o.allow_other_models = a.allow_other_models;
                    o.top_k = a.top_k;
                    blend::apply(&o)?.render()
                }
                None => {
                    let mut o = FitOptions::new(a.predictions, a.data, &a.out);
                    o.weights_out = a.weights_out;
                    o.report = a.report;
                    o.select = a.select;
                    o.weighting = if a.uniform {
                        Weighting::Uniform
                    } else {
                        Weighting::Fitted
                    };
                    o.folds = a.folds;
                    o.top_k = a.top_k;
                    blend::fit(&o)?.render()
                }
            };
            pb.finish_and_clear();
            print!("{text}");
            Ok(())
        }
        Command::Model(a) => {
            let cfg = a.pipeline.load()?;
            let device = parse_device(&a.device)?;
            let sizes = plankton::train::patch_sizes(&cfg)?;
            let mut net = plankton::model::Network::new(&cfg.model, &sizes, a.classes, device)?;
            if !a.check_invariance {
                print!("{}", net.describe());
                return Ok(());
            }
            // As the pipeline computes: its [compute] precision and layout.
            net.set_compute(&cfg.compute);
            use plankton::model::invariance;
            let check = invariance::check(&net, &sizes, 8, 1);
            let tolerance = invariance::tolerance(cfg.compute.precision);
            let ok = check.max_relative_difference <= tolerance;
            let on = format!(
                "{} ({:?})",
                plankton::device::name(device),
                cfg.compute.precision
            )
            .to_lowercase();
            println!(
                "90-degree invariance on {on}: max |logit difference| {:.3e} ({:.3e} relative to max |logit| {:.3e}, tolerance {tolerance:.0e}) over {} rotations of {} inputs: {}",
                check.max_abs_difference, check.max_relative_difference, check.max_abs_logit, check.rotations, check.images,
                if ok { "ok" } else { "FAILED" }
            );
            if let Some(path) = &a.json {
                let mut v = serde_json::to_value(&check)?;
                v["ok"] = ok.into();
                v["device"] = plankton::device::name(device).into();
                v["precision"] = serde_json::to_value(cfg.compute.precision)?;
                v["tolerance"] = tolerance.into();
                std::fs::write(path, serde_json::to_string_pretty(&v)?)
                    .with_context(|| format!("--json {}", path.display()))?;
            }
            if !ok {
                anyhow::bail!("the network is not invariant to 90-degree rotations on {on}");
            }
            Ok(())
        }
        Command::Devices(a) => {
            let r = plankton::device::cuda_report();
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", r.render());
            }
            Ok(())
        }
    }
}

fn parse_device(s: &str) -> Result<tch::Device> {
    plankton::device::select(s).map_err(|e| anyhow::anyhow!("--device: {e}"))
}

fn evaluation_text(s: &plankton::evaluate::EvaluateSummary) -> String {
    let e = &s.evaluation;
    let mut t = format!("{} images: log loss {:.4}", e.n, e.log_loss);
    for (k, acc) in e.top_k.iter().enumerate() {
        t.push_str(&format!(", top-{} {:.3}", k + 1, acc));
    }
    t.push_str(&format!(
        ", ECE {:.4}, macro precision {:.3} / recall {:.3}\n",
        e.ece, e.macro_avg.precision, e.macro_avg.recall
    ));
    if s.failed > 0 || s.unlabelled > 0 {
        t.push_str(&format!(
            "not scored: {} unreadable image(s), {} without a known class\n",
            s.failed, s.unlabelled
        ));
    }
    if let Some(f) = &s.files {
        t.push_str(&format!("report: {} (summary.md, report.json, confusion_matrix.png, reliability.png, least_confident.csv)\n", f.summary_md.parent().unwrap_or(Path::new(".")).display()));
    }
    t
}

async fn serve(a: ServeArgs) -> Result<()> {
    use plankton::serve::{self, config::ServeConfig, ServeEvent};
    use std::io::Write;
    use tokio::signal::unix::{signal, SignalKind};
    let cfg = ServeConfig::load(&a.pipeline)?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let reload = Arc::new(tokio::sync::Notify::new());
    {
        let (shutdown, reload) = (shutdown.clone(), reload.clone());
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => { tracing::info!("SIGTERM"); shutdown.cancel(); }
                    _ = int.recv() => { tracing::info!("SIGINT"); shutdown.cancel(); }
                    _ = hup.recv() => { tracing::info!("SIGHUP: reloading the model"); reload.notify_one(); }
                }
            }
        });
    }
    let summary = serve::run(cfg, shutdown, reload, |e| {
        let line = match e {
            ServeEvent::Listening(addr) => format!("listening on http://{addr}"),
            ServeEvent::Ready { model_id, replayed } => {
                format!("ready: serving {model_id} ({replayed} spooled image(s) replayed)")
            }
        };
        println!("{line}");
        let _ = std::io::stdout().flush();
    })
    .await?;
    println!("stopped ({} replayed at start)", summary.replayed);
    Ok(())
}

async fn predict(a: PredictArgs) -> Result<()> {
    use plankton::predict::job::{self, PredictEvent, PredictOptions};
    let mut opts = PredictOptions::new(&a.model, a.data, &a.out);
    opts.subset = a.subset;
    opts.tta = a.tta;
    opts.aggregation = a.aggregation;
    opts.submission = a.submission;
    opts.sample_submission = a.sample_submission;
    opts.weights = a.weights;
    opts.device = parse_device(&a.device)?;
    opts.batch_size = a.batch_size;
    opts.precision = a.precision;
    opts.calibrate = !a.no_calibration;
    opts.model_id = a.model_id;
    opts.top_k = a.top_k;
    let handle = tokio::runtime::Handle::current();
    let s = tokio::task::spawn_blocking(move || {
        let mut pb: Option<ProgressBar> = None;
        let mut on_event = |e: PredictEvent| match e {
            PredictEvent::Started {
                images,
                views,
                model_id,
            } => {
                tracing::info!(images, views, model_id = %model_id, "predicting");
                let bar = progress(images as u64, "predict");
                bar.set_style(
                    ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} images ETA {eta}")
                        .unwrap()
                        .progress_chars("=> "),
                );
                pb = Some(bar);
            }
            PredictEvent::Progress {
                images_done,
                images_per_second,
                ..
            } => {
                if let Some(bar) = &pb {
                    bar.set_position(images_done as u64);
                    bar.set_message(format!("predict {images_per_second:.1} img/s"));
                }
            }
        };
        let r = job::run(&opts, &handle, &mut on_event);
        if let Some(bar) = pb {
            bar.finish_and_clear();
        }
        r
    })
    .await??;
    for (path, reason) in &s.failed {
        tracing::warn!(path = %path.display(), reason = %reason, "set aside");
    }
    print!("{}", predict_text(&s));
    Ok(())
}

fn predict_text(s: &plankton::predict::job::PredictSummary) -> String {
    let mut t = format!(
        "predicted {} of {} images x {} view(s) ({}) in {:.1} s: {:.1} images/s, {:.0} patches/s -> {}\n",
        s.predicted,
        s.images,
        s.views,
        s.aggregation,
        s.seconds,
        s.images_per_second,
        s.patches_per_second,
        s.out.display()
    );
    if let Some(temp) = s.temperature {
        t.push_str(&format!("calibrated with temperature {temp:.3}\n"));
    }
    if !s.failed.is_empty() {
        t.push_str(&format!(
            "{} image(s) set aside (rows kept with the reason in `error`):\n",
            s.failed.len()
        ));
        for (p, r) in s.failed.iter().take(10) {
            t.push_str(&format!("  {}: {r}\n", p.display()));
        }
    }
    if let Some(sc) = &s.scores {
        t.push_str(&format!(
            "on the {} images with a known class: log loss {:.4}, top-1 {:.3}, top-5 {:.3}\n",
            sc.n, sc.log_loss, sc.top1, sc.top5
        ));
    }
    if let Some((p, sub)) = &s.submission {
        t.push_str(&format!(
            "submission: {} ({} rows, {} with the class prior for unreadable images)\n",
            p.display(),
            sub.rows,
            sub.fallback_rows
        ));
    }
    t
}

async fn train(a: TrainArgs) -> Result<()> {
    use plankton::train::{self, TrainEvent, TrainOptions};
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut config = a.pipeline.load()?;
    if let Some(steps) = a.steps {
        config.train.steps = steps;
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        // SIGINT (Ctrl-C) and SIGTERM (a scheduler's or `timeout`'s stop) both end the run with
        // a checkpoint after the current step.
        use tokio::signal::unix::{signal, SignalKind};
        let stop = stop.clone();
        let mut term = signal(SignalKind::terminate())?;
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::warn!("interrupted: stopping after this step and writing a checkpoint");
            stop.store(true, Ordering::Relaxed);
        });
    }
    if let Some(path) = &a.loss_log {
        if path.is_dir() || path == &a.out {
            bail!(
                "--loss-log {}: a file is needed (not a folder, nor the run folder)",
                path.display()
            );
        }
    }
    let opts = TrainOptions {
        config,
        data: a.data,
        out: a.out,
        resume: a.resume,
        device: parse_device(&a.device)?,
        split_file: a.split,
        stop: Some(stop),
    };
    // Opened once the run starts (the run folder exists then); a resumed run keeps the rows of
    // the steps before its checkpoint, so the log reads as one run.
    let resuming = opts.resume;
    let log_path = a.loss_log.clone();
    let mut loss_log: Option<(PathBuf, std::io::BufWriter<std::fs::File>)> = None;
    let open_loss_log = move |start_step: u64| -> std::io::Result<
        Option<(PathBuf, std::io::BufWriter<std::fs::File>)>,
    > {
        let Some(path) = a.loss_log.clone() else {
            return Ok(None);
        };
        let kept: Vec<String> = match resuming.then(|| std::fs::read_to_string(&path)) {
            Some(Ok(text)) => text
                .lines()
                .skip(1)
                .filter(|l| {
                    l.split(',')
                        .next()
                        .and_then(|s| s.parse::<u64>().ok())
                        .is_some_and(|s| s <= start_step)
                })
                .map(String::from)
                .collect(),
            _ => Vec::new(),
        };
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
        writeln!(f, "step,loss")?;
        for l in kept {
            writeln!(f, "{l}")?;
        }
        f.flush()?;
        Ok(Some((path, f)))
    };
    let handle = tokio::runtime::Handle::current();
    let summary = tokio::task::spawn_blocking(move || {
        let log_every = opts.config.train.log_every;
        let mut log_error: Option<std::io::Error> = None;
        let mut pb: Option<ProgressBar> = None;
        let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let mut on_event = |e: TrainEvent| match e {
            TrainEvent::Started { start_step, total_steps, train_images, valid_images, pseudo_images, parameters } => {
                tracing::info!(start_step, total_steps, train_images, valid_images, pseudo_images, parameters, "training");
                match open_loss_log(start_step) {
                    Ok(f) => loss_log = f,
                    Err(e) => {
                        log_error.get_or_insert(e);
                    }
                }
                if terminal {
                    let bar = progress(total_steps, "train");
                    bar.set_style(
                        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
                            .unwrap()
                            .progress_chars("=> "),
                    );
                    bar.set_position(start_step);
                    bar.reset_eta();
                    pb = Some(bar);
                }
            }
            TrainEvent::Step { step, total_steps, loss, learning_rate, images_per_second, epoch } => {
                if let Some((path, f)) = &mut loss_log {
                    // Flushed as it goes, so a killed run leaves the losses it read back.
                    if let Err(e) = writeln!(f, "{step},{loss}").and_then(|_| f.flush()) {
                        if log_error.is_none() {
                            tracing::error!(path = %path.display(), error = %e, "--loss-log: cannot write");
                        }
                        log_error.get_or_insert(e);
                    }
                }
                if let Some(bar) = &pb {
                    bar.set_position(step);
                    bar.set_prefix(format!("epoch {epoch}"));
                    bar.set_message(format!("loss {loss:.4} lr {learning_rate:.2e} {images_per_second:.0} img/s"));
                } else if step % log_every == 0 || step == total_steps {
                    tracing::info!(step, total_steps, epoch, loss, learning_rate, images_per_second, "step");
                }
            }
            TrainEvent::Validated(r) => {
                match &pb {
                    Some(bar) => bar.println(r.summary()),
                    None => tracing::info!(step = r.step, train_loss = r.train_loss, valid_loss = r.valid_loss, valid_top1 = r.valid_top1, valid_top5 = r.valid_top5, images_per_second = r.images_per_second, batch_wait_fraction = r.batch_wait_fraction, "validated"),
                }
            }
            TrainEvent::Checkpointed { step, path } => {
                tracing::debug!(step, path = %path.display(), "checkpoint");
            }
        };
        let r = train::run(&opts, &handle, &mut on_event);
        if let Some(bar) = pb {
            bar.finish_and_clear();
        }
        let logged = match (loss_log, log_error) {
            (_, Some(e)) => Err(anyhow::anyhow!("--loss-log {}: {e}", log_path.as_deref().unwrap_or(Path::new("?")).display())),
            (Some((path, mut f)), None) => f.flush().with_context(|| format!("--loss-log {}", path.display())),
            (None, None) => Ok(()),
        };
        anyhow::Ok(r?).and_then(|s| logged.map(|_| s))
    })
    .await??;
    for f in &summary.failures {
        tracing::warn!(path = %f.path.display(), reason = %f.reason, "set aside");
    }
    println!(
        "{} at step {} in {}: best valid log loss {} (step {}), {:.0} images/s, data wait {:.1}% of the loop",
        if summary.stopped_early { "stopped" } else { "trained" },
        summary.steps,
        summary.run_dir.display(),
        summary.best_valid_loss.map_or("-".into(), |l| format!("{l:.4}")),
        summary.best_step.map_or("-".into(), |s| s.to_string()),
        summary.images_per_second,
        100.0 * summary.batch_wait_fraction
    );
    if let Some(s) = summary.final_scores {
        println!(
            "final weights on {} validation images: log loss {:.4}, top-1 {:.3}, top-5 {:.3}",
            s.n, s.log_loss, s.top1, s.top5
        );
    }
    Ok(())
}

fn warp_one(a: WarpArgs) -> Result<()> {
    use plankton::config::{Fill, PatchConfig};
    let img = plankton::stages::decode::decode_file(&a.input, &Default::default())?;
    let mut patch = match a.ds {
        Some(ds) => PatchConfig::fixed_scale(a.size, ds),
        None => PatchConfig::size_normalised(a.size, a.size as f64 - 10.0),
    };
    if a.border_fill {
        patch.fill = Fill::BorderMedian;
    }
    let aug = Augmentation {
        rotation_deg: a.rotation,
        shift_x: a.shift_x,
        shift_y: a.shift_y,
        zoom: a.zoom,
        stretch: a.stretch,
        shear_deg: a.shear,
        flip: a.flip,
    };
    if !(aug.zoom > 0.0 && aug.stretch > 0.0) {
        bail!("--zoom and --stretch must be > 0");
    }
    let mut out = vec![0.0f32; patch.pixels()];
    plankton::stages::warp::make_patch(&img, &patch, &aug, &mut out);
    plankton::npy::write_f32(&a.out, &[patch.rows, patch.cols], &out)?;
    println!(
        "wrote {} ({}x{} float32, source {}x{}, ds {:.4})",
        a.out.display(),
        patch.rows,
        patch.cols,
        img.height(),
        img.width(),
        patch.ds(img.height() as usize, img.width() as usize)
    );
    Ok(())
}

/// A spinner for jobs without a known count (hidden when stderr is not a terminal).
fn spinner(what: &str) -> ProgressBar {
    let pb = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressBar::new_spinner()
    } else {
        ProgressBar::hidden()
    };
    pb.set_message(what.to_string());
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    pb
}

async fn replay(a: ReplayArgs) -> Result<()> {
    use plankton::replay::{self, ReplayEvent, ReplayOptions};
    let opts = ReplayOptions {
        replay_file: a.pipeline,
        data: a.data,
        out: a.out,
        device: parse_device(&a.device)?,
    };
    let handle = tokio::runtime::Handle::current();
    let report = tokio::task::spawn_blocking(move || {
        let mut pb: Option<ProgressBar> = None;
        let mut on_event = |e: ReplayEvent| match e {
            ReplayEvent::Started { steps } => {
                let bar = progress(steps as u64, "replay");
                bar.set_style(ProgressStyle::with_template("replay [{bar:30}] {pos}/{len} steps, {elapsed} {msg}").unwrap().progress_chars("=> "));
                pb = Some(bar);
            }
            ReplayEvent::StepStarted { name, .. } => {
                if let Some(bar) = &pb {
                    bar.set_message(name);
                }
            }
            ReplayEvent::StepSkipped { name, .. } | ReplayEvent::StepDone { name, .. } => {
                if let Some(bar) = &pb {
                    bar.inc(1);
                    bar.println(format!("done: {name}"));
                }
            }
            ReplayEvent::Train { name, event: plankton::train::TrainEvent::Step { step, total_steps, loss, .. } } => {
                if let Some(bar) = &pb {
                    bar.set_message(format!("train {name}: step {step}/{total_steps}, loss {loss:.4}"));
                }
            }
            ReplayEvent::Train { name, event: plankton::train::TrainEvent::Validated(r) } => {
                tracing::info!(member = %name, step = r.step, train_loss = r.train_loss, valid_loss = r.valid_loss, valid_top1 = r.valid_top1, "validated");
            }
            ReplayEvent::Train { .. } => {}
        };
        let r = replay::run(&opts, &handle, &mut on_event);
        if let Some(bar) = pb {
            bar.finish_and_clear();
        }
        r.map(|r| (r, opts.out))
    })
    .await??;
    let (report, out) = report;
    println!(
        "{}",
        std::fs::read_to_string(out.join("report.md")).unwrap_or_default()
    );
    println!(
        "{} steps run, {} skipped (outputs present); report: {}{}",
        report.steps_run,
        report.steps_skipped,
        out.join("report.md").display(),
        report
            .submission
            .map(|s| format!(", submission: {}", s.display()))
            .unwrap_or_default()
    );
    Ok(())
}

fn progress(total: u64, what: &str) -> ProgressBar {
    let pb = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressBar::new(total)
    } else {
        ProgressBar::hidden()
    };
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} ETA {eta}")
            .unwrap()
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

async fn run_loader_bench(
    cfg: &PipelineConfig,
    records: Vec<plankton::sources::ImageRecord>,
    epochs: u64,
) -> Result<plankton::data_path::LoaderBenchReport> {
    if records.is_empty() {
        bail!("no images to load");
    }
    let pb = progress(records.len() as u64 * epochs, "loading");
    let report =
        plankton::data_path::loader_bench(cfg, Arc::new(records), epochs, |_, n| pb.inc(n as u64))
            .await?;
    pb.finish_and_clear();
    Ok(report)
}

fn write_folds(ds: &Dataset, out: &Path, folds: usize, seed: u64) -> Result<()> {
    let labels: Vec<u32> = ds
        .train
        .iter()
        .map(|r| r.label.unwrap_or(u32::MAX))
        .collect();
    plankton::split::check_folds(&labels, &ds.class_names, folds)?;
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "split".into());
    for (k, split) in plankton::split::stratified_folds(&labels, folds, seed)?
        .into_iter()
        .enumerate()
    {
        let path = out.with_file_name(format!("{stem}-fold{k}.csv"));
        split.save(ds, &path)?;
        println!(
            "wrote {} ({} train / {} valid)",
            path.display(),
            split.train.len(),
            split.valid.len()
        );
    }
    Ok(())
}

fn write_splits(
    ds: &Dataset,
    out: &Path,
    valid_fraction: f64,
    seed: u64,
    bagging: usize,
) -> Result<()> {
    for (path, split) in plankton::split::write_split_files(ds, out, valid_fraction, seed, bagging)?
    {
        println!(
            "wrote {} ({} train / {} valid)",
            path.display(),
            split.train.len(),
            split.valid.len()
        );
    }
    Ok(())
}

async fn zmuv(cfg: &PipelineConfig, ds: &Dataset, out: &Path) -> Result<()> {
    let (stats, summary) = plankton::data_path::estimate_and_save_zmuv(cfg, ds, out).await?;
    for f in &summary.failures {
        tracing::warn!(reason = %f.reason, "set aside");
    }
    for (k, z) in stats.inputs.iter().enumerate() {
        println!(
            "input {k}: mean {:.5} std {:.5} over {} augmented patches -> {}",
            z.mean,
            z.std,
            stats.samples,
            out.display()
        );
    }
    Ok(())
}

async fn demo(a: DemoArgs) -> Result<()> {
    let opts = plankton::demo::DemoOptions {
        out: a.out,
        classes: a.classes,
        per_class: a.per_class,
        real_data: !a.no_real_data,
        epochs: 5,
        train_steps: 0,
    };
    let pb = progress(
        (opts.classes * opts.per_class) as u64 * opts.epochs,
        "loading",
    );
    plankton::demo::run(
        &opts,
        |line| pb.suspend(|| println!("{}", line.trim_end())),
        |_, n| pb.inc(n as u64),
    )
    .await?;
    pb.finish_and_clear();
    Ok(())
}
