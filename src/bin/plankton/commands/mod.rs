//! One module per command, each with its arguments and a `run`, as cargo's `commands/` do;
//! what several commands share is here.
pub mod blend;
pub mod calibrate;
pub mod compact;
pub mod data;
pub mod demo;
pub mod devices;
pub mod drift;
pub mod evaluate;
pub mod export;
pub mod features;
pub mod fuse;
pub mod import;
pub mod loader_bench;
pub mod model;
pub mod predict;
pub mod preview;
pub mod publish;
pub mod replay;
pub mod serve;
pub mod split;
pub mod synth;
pub mod train;
pub mod warp;
pub mod zmuv;

/// What every command module starts from.
pub mod prelude {
    pub use std::path::{Path, PathBuf};
    pub use std::sync::Arc;

    pub use anyhow::{bail, Context, Result};
    pub use clap::{Args, Subcommand};
    pub use indicatif::{ProgressBar, ProgressStyle};
    pub use plankton::config::PipelineConfig;
    pub use plankton::imgproc::Augmentation;
    pub use plankton::sinks::preview::{pick_spread, render_preview, PreviewOptions};
    pub use plankton::sources::{planktonclas, synth, Dataset};

    pub use super::{open_dataset, parse_device, progress, spinner, stop_on_signals, PipelineArg};
}

use prelude::*;

#[derive(Args)]
pub struct PipelineArg {
    /// Pipeline TOML (default: the built-in reference pipeline, see pipelines/default.toml).
    #[arg(long)]
    pipeline: Option<PathBuf>,
}

impl PipelineArg {
    pub fn load(&self) -> Result<PipelineConfig> {
        match &self.pipeline {
            Some(p) => Ok(PipelineConfig::load(p)?),
            None => Ok(PipelineConfig::reference_default()),
        }
    }
}

pub fn open_dataset(dir: &Path) -> Result<Dataset> {
    let ds = Dataset::open(dir)?;
    for p in &ds.problems {
        tracing::warn!(path = %p.path.display(), reason = %p.reason, "layout problem: skipped");
        metrics::counter!(plankton::telemetry::LAYOUT_PROBLEMS).increment(1);
    }
    Ok(ds)
}

/// A count that must be at least 1 (clap refuses 0 with this message instead of the job
/// quietly using 1).
pub fn positive(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

pub fn parse_device(s: &str) -> Result<tch::Device> {
    plankton::device::select(s).map_err(|e| anyhow::anyhow!("--device: {e}"))
}

/// A spinner for jobs without a known count (hidden when stderr is not a terminal).
pub fn spinner(what: &str) -> ProgressBar {
    let pb = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressBar::new_spinner()
    } else {
        ProgressBar::hidden()
    };
    pb.set_message(what.to_string());
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    pb
}

pub fn progress(total: u64, what: &str) -> ProgressBar {
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

/// The one way commands stop: a token cancelled by the first SIGTERM (a scheduler's or
/// `timeout`'s stop) or SIGINT (Ctrl-C). `hangup`, when given, is notified on every SIGHUP (the
/// daemon reloads its model on it).
pub fn stop_on_signals(
    hangup: Option<Arc<tokio::sync::Notify>>,
) -> Result<tokio_util::sync::CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let token = tokio_util::sync::CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let cancel = token.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::warn!("SIGTERM: stopping (a training run checkpoints first)"); cancel.cancel(); }
                _ = int.recv() => { tracing::warn!("SIGINT: stopping (a training run checkpoints first)"); cancel.cancel(); }
                _ = hup.recv() => match &hangup {
                    Some(n) => { tracing::info!("SIGHUP: reloading the model"); n.notify_one(); }
                    None => tracing::info!("SIGHUP ignored"),
                },
            }
        }
    });
    Ok(token)
}
