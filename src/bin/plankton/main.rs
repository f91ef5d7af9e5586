//! `plankton` command line: parse the arguments and hand each command to its module in
//! `commands/` (its arguments and a `run`); the library does the work.

mod commands;

use anyhow::Result;
use clap::{Parser, Subcommand};

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
    Demo(commands::demo::DemoArgs),
    /// Write a synthetic plankton dataset in the competition layout.
    Synth(commands::synth::SynthArgs),
    /// Obtain a real dataset.
    Data {
        #[command(subcommand)]
        which: commands::data::DataCommand,
    },
    /// Grid of original images beside augmented patches (PNG).
    Preview(commands::preview::PreviewArgs),
    /// Write the float32 patch the pipeline makes for exact parameters (before ZMUV) as .npy.
    Warp(commands::warp::WarpArgs),
    /// Run the data path alone (no model): images/s overall and per stage, peak memory.
    LoaderBench(commands::loader_bench::LoaderBenchArgs),
    /// Write a stratified train/validation split (and bagging splits) of a dataset.
    Split(commands::split::SplitArgs),
    /// Estimate the global ZMUV mean/std on augmented training patches.
    Zmuv(commands::zmuv::ZmuvArgs),
    /// Train a network (or resume or fine-tune a run) on a dataset: the competition layout or a
    /// folder of IFCB bins with labels.
    Train(commands::train::TrainArgs),
    /// Print a pipeline's network: layers, shapes, parameters, multiply-accumulates.
    Model(commands::model::ModelArgs),
    /// What this binary finds to compute on: its libtorch, CUDA (loaded or why not), devices.
    Devices(commands::devices::DevicesArgs),
    /// Predict images with a trained run (quasi-random TTA) into a Parquet file, and optionally
    /// a Kaggle submission CSV.
    Predict(commands::predict::PredictArgs),
    /// Score a predictions file: log loss, top-k, per-class precision/recall, confusion matrix,
    /// reliability diagram, and the least confident images.
    Evaluate(commands::evaluate::EvaluateArgs),
    /// Fit a temperature on validation predictions, and (--unknown) the unknown-image rule on the
    /// run's training and validation images; both are stored in the run (predict applies them).
    Calibrate(commands::calibrate::CalibrateArgs),
    /// How a stream of predictions moved from a reference: class mix, confidence, unknown rate,
    /// image size and brightness per window of images, with plots
    Drift(commands::drift::DriftArgs),
    /// Blend members' predictions: fit weights (softmax, L-BFGS on the validation log loss)
    /// with members chosen by cross-validation, or apply the weights of an earlier fit.
    Blend(commands::blend::BlendArgs),
    /// The whole reference solution on a dataset folder, resumable: train the members, TTA,
    /// features, fusion, blend, pseudo-label round, submission, and the score of every stage.
    Replay(commands::replay::ReplayArgs),
    /// Run the camera-ingest daemon: folder watch, HTTP upload and a NATS JetStream consumer
    /// group in, rolling Parquet out, Prometheus /metrics. SIGTERM/SIGINT drain and exit;
    /// SIGHUP reloads the model.
    Serve(commands::serve::ServeArgs),
    /// Publish image files to a NATS JetStream subject for a group of daemons (backfill),
    /// with a bounded number of publishes awaiting their acks; nothing is dropped silently.
    Publish(commands::publish::PublishArgs),
    /// One row per image from the daemons' prediction files (delivery is at-least-once).
    Compact(commands::compact::CompactArgs),
    /// Predictions for other tools: per-bin class scores for IFCB tools, EcoTaxa packages.
    Export {
        #[command(subcommand)]
        which: commands::export::ExportCommand,
    },
    /// Annotations from other tools: an EcoTaxa export to a dataset.
    Import {
        #[command(subcommand)]
        which: commands::import::ImportCommand,
    },
    /// Image features for late fusion (raw size, moments, Hu, Haralick) into a Parquet file.
    Features(commands::features::FeaturesArgs),
    /// Late fusion: fit per-feature-set nets on validation predictions (out-of-fold loss
    /// before/after, model folder), or apply a fitted model (--model) to other predictions.
    Fuse(commands::fuse::FuseArgs),
}

fn init_logging(json: bool) {
    use tracing_subscriber::EnvFilter;
    // The NATS client's own connection lines repeat ours (plankton::serve::nats logs them).
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,async_nats=warn"));
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

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    match dispatch(cli.command).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", error_report(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Demo(a) => commands::demo::run(a).await,
        Command::Synth(a) => commands::synth::run(a).await,
        Command::Data { which } => commands::data::run(which),
        Command::Preview(a) => commands::preview::run(a),
        Command::Warp(a) => commands::warp::run(a),
        Command::LoaderBench(a) => commands::loader_bench::run(a).await,
        Command::Split(a) => commands::split::run(a),
        Command::Zmuv(a) => commands::zmuv::run(a).await,
        Command::Train(a) => commands::train::run(a).await,
        Command::Model(a) => commands::model::run(a),
        Command::Devices(a) => commands::devices::run(a),
        Command::Predict(a) => commands::predict::run(a).await,
        Command::Evaluate(a) => commands::evaluate::run(a).await,
        Command::Calibrate(a) => commands::calibrate::run(a).await,
        Command::Drift(a) => commands::drift::run(a).await,
        Command::Blend(a) => commands::blend::run(a).await,
        Command::Replay(a) => commands::replay::run(a).await,
        Command::Serve(a) => commands::serve::run(a).await,
        Command::Publish(a) => commands::publish::run(a).await,
        Command::Compact(a) => commands::compact::run(a),
        Command::Export { which } => commands::export::run(which),
        Command::Import { which } => commands::import::run(which),
        Command::Features(a) => commands::features::run(a).await,
        Command::Fuse(a) => commands::fuse::run(a).await,
    }
}

/// `Error: <message>`, then the causes in anyhow's layout, leaving out each cause whose text
/// the lines above already say (many messages name their cause: "x: cannot lock: File exists"
/// followed by "Caused by: File exists" told the user nothing new).
fn error_report(e: &anyhow::Error) -> String {
    let mut said = e.to_string();
    let mut causes = Vec::new();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !said.contains(&text) {
            said.push('\n');
            said.push_str(&text);
            causes.push(text);
        }
    }
    let mut report = format!("Error: {e}");
    match causes.as_slice() {
        [] => {}
        [only] => report.push_str(&format!("\n\nCaused by:\n    {only}")),
        many => {
            report.push_str("\n\nCaused by:");
            for (i, c) in many.iter().enumerate() {
                report.push_str(&format!("\n    {i}: {c}"));
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::error_report;

    #[derive(Debug, thiserror::Error)]
    #[error("{path}: cannot lock: {source}")]
    struct Named {
        path: &'static str,
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn a_cause_the_message_already_names_is_not_repeated() {
        let io = || std::io::Error::from_raw_os_error(17);
        let e = anyhow::Error::new(Named {
            path: "out",
            source: io(),
        });
        let report = error_report(&e);
        assert!(report.starts_with("Error: out: cannot lock: "), "{report}");
        assert_eq!(report.matches(&io().to_string()).count(), 1, "{report}");
        assert!(!report.contains("Caused by"), "{report}");

        // A cause the message does not say is kept, numbered when there are several.
        let e = anyhow::Error::new(io())
            .context("reading x")
            .context("step 1/3 failed");
        let report = error_report(&e);
        assert!(
            report.contains("Caused by:\n    0: reading x\n    1: "),
            "{report}"
        );
        let e = anyhow::Error::new(io()).context("step 1/3 failed");
        assert!(
            error_report(&e).contains("Caused by:\n    File exists"),
            "{}",
            error_report(&e)
        );
    }
}
