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
    /// Run one member's steps only (train its bags, predict, average), for members run as
    /// separate jobs on one shared --out: member=NAME, member=INDEX (0-based), or member=task
    /// (SLURM_ARRAY_TASK_ID of a Slurm array, JOB_COMPLETION_INDEX of a Kubernetes Indexed Job).
    /// A replay without --only then runs the rest once every member is done.
    #[arg(long, conflicts_with = "devices")]
    only: Option<plankton::replay::Only>,
    /// Train the members concurrently, one per device (e.g. cuda:0,cuda:1; a device may repeat),
    /// each in its own process (log in <out>/logs/), then run the rest on the first device.
    #[arg(long, value_delimiter = ',', conflicts_with = "device")]
    devices: Vec<String>,
}

/// `--plan`: the steps and their status, one per line.
fn print_plan(a: &ReplayArgs) -> Result<()> {
    use plankton::replay::{Plan, StepStatus};
    let mut plan = Plan::new(&a.pipeline, &a.data, &a.out)?;
    if let Some(only) = &a.only {
        plan.select(only)?;
    }
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
    for d in &a.devices {
        plankton::device::select(d).map_err(|e| anyhow::anyhow!("--devices `{d}`: {e}"))?;
    }
    let stop = stop_on_signals(None)?;
    let device = a.devices.first().unwrap_or(&a.device);
    let opts = ReplayOptions {
        replay_file: a.pipeline.clone(),
        data: a.data.clone(),
        out: a.out.clone(),
        device: parse_device(device)?,
        stop: Some(stop.clone()),
        only: a.only.clone(),
    };
    if !a.devices.is_empty() {
        let o = opts.clone();
        tokio::task::spawn_blocking(move || replay::claim_folder(&o)).await??;
        members_on_devices(&a, &stop).await?;
    }
    if opts.only.is_some() {
        return run_part(opts).await;
    }
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

/// `--only`: one member's steps, with a line per step.
async fn run_part(opts: plankton::replay::ReplayOptions) -> Result<()> {
    use plankton::replay::{self, ReplayEvent};
    let handle = tokio::runtime::Handle::current();
    let done = tokio::task::spawn_blocking(move || {
        let mut on_event = |e: ReplayEvent| match e {
            ReplayEvent::StepSkipped { name, .. } => println!("present: {name}"),
            ReplayEvent::StepDone { name, seconds, .. } => {
                println!("done: {name} ({seconds:.1} s)")
            }
            ReplayEvent::StepStarted { name, .. } => tracing::info!(step = %name, "started"),
            _ => {}
        };
        replay::run_only(&opts, &handle, &mut on_event)
    })
    .await?;
    let done = match done {
        Err(e @ replay::ReplayError::Stopped { .. }) => {
            eprintln!("{e}");
            std::process::exit(130);
        }
        r => r?,
    };
    println!(
        "member {}: {} step(s) run, {} skipped (outputs present); run the replay without --only once every member is done",
        done.member, done.ran, done.skipped
    );
    Ok(())
}

/// `--devices`: every member in its own `replay --only` process, at most one per device at a
/// time; returns once all have finished (an error names the members that failed and their logs).
/// The children end with this process: on an error here, and on its death (PR_SET_PDEATHSIG).
async fn members_on_devices(
    a: &ReplayArgs,
    stop: &tokio_util::sync::CancellationToken,
) -> Result<()> {
    let mut running: Vec<Running> = Vec::new();
    let result = schedule_members(a, stop, &mut running).await;
    if result.is_err() || stop.is_cancelled() {
        for r in &running {
            // SAFETY: a plain kill(2) on a child we started and have not reaped.
            unsafe { libc::kill(r.child.id() as i32, libc::SIGTERM) };
        }
        for r in &mut running {
            let _ = r.child.wait();
        }
    }
    if stop.is_cancelled() {
        eprintln!("stopped: the members checkpointed; run the same command again to resume");
        std::process::exit(130);
    }
    result
}

/// A member process.
struct Running {
    member: String,
    device: String,
    log: PathBuf,
    child: std::process::Child,
}

async fn schedule_members(
    a: &ReplayArgs,
    stop: &tokio_util::sync::CancellationToken,
    running: &mut Vec<Running>,
) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let cfg = plankton::replay::ReplayConfig::load(&a.pipeline)?;
    let logs = a.out.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("{}", logs.display()))?;
    let exe = std::env::current_exe()?;
    let mut queue: std::collections::VecDeque<String> =
        cfg.members.iter().map(|m| m.name.clone()).collect();
    let mut free: Vec<String> = a.devices.iter().rev().cloned().collect();
    let mut failed = Vec::new();
    while !queue.is_empty() || !running.is_empty() {
        while let (Some(device), false) = (free.last().cloned(), queue.is_empty()) {
            free.pop();
            let member = queue.pop_front().expect("not empty");
            let log = logs.join(format!("member-{member}.log"));
            let file = std::fs::File::create(&log).with_context(|| format!("{}", log.display()))?;
            let mut cmd = std::process::Command::new(&exe);
            cmd.arg("replay")
                .arg("--pipeline")
                .arg(&a.pipeline)
                .arg("--data")
                .arg(&a.data)
                .arg("--out")
                .arg(&a.out)
                .arg("--device")
                .arg(&device)
                .arg("--only")
                .arg(format!("member={member}"))
                .stdin(std::process::Stdio::null())
                .stdout(file.try_clone()?)
                .stderr(file);
            // SAFETY: prctl is async-signal-safe; the child asks for SIGTERM (a checkpoint and
            // exit) when this process dies, so a killed scheduler leaves no GPU busy.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                    Ok(())
                });
            }
            let child = cmd.spawn().context("cannot start a member process")?;
            println!(
                "member {member}: started on {device} (log {})",
                log.display()
            );
            running.push(Running {
                member,
                device,
                log,
                child,
            });
        }
        // Wait for any member to finish, or a stop.
        let finished = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            f = first_exit(running) => f?,
        };
        let (r, status) = finished;
        free.push(r.device.clone());
        if status.success() {
            println!("member {}: done on {}", r.member, r.device);
        } else {
            eprintln!(
                "member {}: failed on {} ({status}); see {}",
                r.member,
                r.device,
                r.log.display()
            );
            failed.push(r.member);
        }
    }
    if !failed.is_empty() {
        bail!(
            "member(s) {} failed (logs in {}); rerun to resume",
            failed.join(", "),
            logs.display()
        );
    }
    Ok(())
}

/// Waits until one of the running children exits; removes it and returns it with its status.
async fn first_exit(running: &mut Vec<Running>) -> Result<(Running, std::process::ExitStatus)> {
    loop {
        for i in 0..running.len() {
            let status = running[i]
                .child
                .try_wait()
                .with_context(|| format!("member {}: cannot wait for it", running[i].member))?;
            if let Some(status) = status {
                return Ok((running.swap_remove(i), status));
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
