//! `plankton train`: train a network or resume a run.

use super::prelude::*;

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pipeline: PipelineArg,
    /// The dataset: the competition layout (train/<class>/, test/), or a folder of IFCB bins
    /// labelled by labels.csv (pid,class) and/or validated EcoTaxa tables (ecotaxa*.tsv).
    #[arg(long)]
    data: PathBuf,
    /// The run directory (config, split, ZMUV, checkpoints, weights, history, learning curve).
    #[arg(long)]
    out: PathBuf,
    /// Continue the run in --out from its last checkpoint, with its own pipeline.toml. (A run
    /// stopped by SIGTERM or Ctrl-C checkpoints first and exits with status 130.)
    #[arg(long)]
    resume: bool,
    /// auto (cuda:0 when a GPU is usable, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Use this split file (path,class,subset; see `plankton split`) instead of a fresh one.
    #[arg(long)]
    split: Option<PathBuf>,
    /// Override train.steps; with --resume, lengthens (or shortens, not past the checkpoint)
    /// the run.
    #[arg(long)]
    steps: Option<u64>,
    /// Write every step's training loss to this CSV (step,loss), e.g. to compare devices.
    #[arg(long)]
    loss_log: Option<PathBuf>,
    /// Fine-tune: start this new run from an earlier run's weights (its best, else final).
    /// The class list may grow or shrink: classes of both runs keep their output rows, new
    /// ones start fresh. Without --pipeline the earlier run's pipeline.toml is used.
    #[arg(long, value_name = "RUN", conflicts_with = "resume")]
    init_from: Option<PathBuf>,
}

pub async fn run(a: TrainArgs) -> Result<()> {
    use plankton::train::{self, TrainEvent, TrainOptions};
    use std::io::Write;
    // Resuming without --pipeline: the run's own pipeline, so that only --steps can differ.
    let own = a.out.join("pipeline.toml");
    let earlier = a.init_from.as_ref().map(|r| r.join("pipeline.toml"));
    let mut config = match (&a.pipeline.pipeline, &earlier) {
        (None, _) if a.resume && own.exists() => PipelineConfig::load(&own)?,
        (None, Some(earlier)) => PipelineConfig::load(earlier)
            .context("--init-from: the earlier run's pipeline (pass --pipeline to use another)")?,
        _ => a.pipeline.load()?,
    };
    if let Some(steps) = a.steps {
        config.train.steps = steps;
    }
    // SIGINT (Ctrl-C) and SIGTERM both end the run with a checkpoint after the current step.
    let stop = stop_on_signals(None)?;
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
        init_from: a.init_from,
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
    if summary.stopped_early {
        // Not finished: a script's `plankton train ... && plankton predict ...` must not go on
        // with a half-trained run. 130 is the shell's "interrupted".
        eprintln!(
            "the run is not finished (checkpoint at step {}); continue it with --resume",
            summary.steps
        );
        std::process::exit(STOPPED_EXIT_CODE);
    }
    Ok(())
}

/// Exit status of a run stopped by SIGTERM/SIGINT after writing its checkpoint.
const STOPPED_EXIT_CODE: i32 = 130;
