//! `plankton replay`: the whole reference solution, resumable.

use super::prelude::*;

#[derive(Args)]
pub struct ReplayArgs {
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
    /// List every step with what a run would do with it now (done, to run, rerun) and exit
    /// without running or writing anything.
    #[arg(long)]
    plan: bool,
}

/// `--plan`: the steps and their status, one per line.
fn print_plan(a: &ReplayArgs) -> Result<()> {
    use plankton::replay::{Plan, StepStatus};
    let plan = Plan::new(&a.pipeline, &a.data, &a.out)?;
    // What the run would refuse, the plan refuses too.
    plan.check_output_folder()?;
    parse_device(&a.device)?;
    let status = plan.status();
    let width = plan.steps().len().to_string().len();
    for (k, (step, status)) in plan.steps().iter().zip(&status).enumerate() {
        let label = match status {
            StepStatus::Done => "done",
            StepStatus::ToRun => "to run",
            StepStatus::Rerun => "rerun",
        };
        println!("{:>width$}  {label:<6}  {}", k + 1, step.name);
    }
    let count = |s: StepStatus| status.iter().filter(|&&x| x == s).count();
    println!(
        "{} steps: {} done, {} to run, {} to rerun (an earlier step runs); output folder {}",
        status.len(),
        count(StepStatus::Done),
        count(StepStatus::ToRun),
        count(StepStatus::Rerun),
        a.out.display()
    );
    Ok(())
}

pub async fn run(a: ReplayArgs) -> Result<()> {
    use plankton::replay::{self, ReplayEvent, ReplayOptions};
    if a.plan {
        return print_plan(&a);
    }
    let opts = ReplayOptions {
        replay_file: a.pipeline,
        data: a.data,
        out: a.out,
        device: parse_device(&a.device)?,
        stop: Some(stop_on_signals(None)?),
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
    .await?;
    let report = match report {
        Err(e @ replay::ReplayError::Stopped { .. }) => {
            // Not finished: `plankton replay ... && next-step` must not go on. 130, as train.
            eprintln!("{e}");
            std::process::exit(130);
        }
        r => r?,
    };
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
