//! `plankton replay`: the whole reference solution as one resumable chain on a dataset folder —
//! train the members (and their bags) on one shared split, predict with TTA, compute image
//! features, fuse, blend, run a pseudo-label round, write the submission and a report with the
//! score after every stage.
//!
//! Plan, then execute: [`Plan::new`] reads the replay file and the dataset and lists every step
//! with its outputs before anything runs ([`Plan::status`] says which would run; `plankton
//! replay --plan` prints it); [`Plan::execute`] runs them in order. Every step writes its outputs
//! atomically and is skipped when they are all present, so a killed replay picks up where it
//! stopped (a half-trained member resumes from its last checkpoint). The replay file is copied
//! into the output folder on the first run; a later run with a different file is refused
//! instead of mixing two configurations.

pub mod config;
mod plan;
mod report;
mod steps;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Device;

pub use config::{MemberConfig, ReplayConfig, ReplayConfigError};
pub use plan::{Plan, Reuse, Step, StepStatus};

use crate::scoring::Scores;
use crate::train::TrainEvent;

/// What made a step fail, kept whole (a `TrainError`, a `BlendError`, an I/O error with its
/// path...) so that callers can look at it and a CLI can print the chain of causes.
pub type StepFailure = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Config(#[from] ReplayConfigError),
    #[error("{path}: not a dataset folder")]
    Dataset {
        path: PathBuf,
        #[source]
        source: crate::sources::dataset::DatasetError,
    },
    #[error("{path}: no labelled images (train/<class>/...)")]
    NoLabelledImages { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot write")]
    Write {
        path: PathBuf,
        #[source]
        source: crate::fsx::WriteError,
    },
    #[error("step {index}/{steps} `{step}` failed")]
    Step {
        index: usize,
        steps: usize,
        step: String,
        #[source]
        source: StepFailure,
    },
    #[error("stopped during step {index}/{steps} `{step}` (a training step checkpointed first); run the same command again to resume")]
    Stopped {
        index: usize,
        steps: usize,
        step: String,
    },
    #[error("step `{step}` finished without writing {missing}")]
    Incomplete { step: String, missing: PathBuf },
    #[error(transparent)]
    Busy(#[from] crate::fsx::LockError),
    #[error("{path}: holds a replay of another configuration (its replay.toml differs); use another --out")]
    OtherReplay { path: PathBuf },
    #[error("{path}: holds a replay of another dataset ({stored}; now {now}): its networks and scores belong to that one; use another --out")]
    OtherDataset {
        path: PathBuf,
        stored: String,
        now: String,
    },
    #[error("{run}: trained from another pipeline than member `{member}`'s {pipeline} is now; delete that folder to retrain it with the new one, or use another --out")]
    MemberChanged {
        run: PathBuf,
        member: String,
        pipeline: PathBuf,
    },
    #[error("{path}: is not a folder")]
    NotAFolder { path: PathBuf },
    #[error("{path}: holds files that are not a replay's (no replay.toml); choose an empty or new --out")]
    NotAReplayFolder { path: PathBuf },
    #[error("--only {0}")]
    Only(String),
}

impl ReplayError {
    fn io(path: &Path) -> impl Fn(std::io::Error) -> ReplayError + '_ {
        move |source| ReplayError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub replay_file: PathBuf,
    pub data: PathBuf,
    pub out: PathBuf,
    pub device: Device,
    /// Cancelled (SIGTERM, Ctrl-C): a training step checkpoints and stops at once, any other
    /// step finishes first; then the replay ends with [`ReplayError::Stopped`] and a rerun
    /// resumes it.
    pub stop: Option<tokio_util::sync::CancellationToken>,
    /// Run only these steps (see [`Only`]); None: the whole chain.
    pub only: Option<Only>,
}

/// Progress of the chain.
#[derive(Debug, Clone)]
pub enum ReplayEvent {
    Started {
        steps: usize,
    },
    StepStarted {
        index: usize,
        name: String,
    },
    StepSkipped {
        index: usize,
        name: String,
    },
    StepDone {
        index: usize,
        name: String,
        seconds: f64,
    },
    Train {
        name: String,
        event: TrainEvent,
    },
}

/// The score of one stage of the chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageScore {
    pub stage: String,
    /// Which predictions were scored.
    pub source: String,
    pub valid: Option<Scores>,
    /// On the test images when the dataset has their labels (`test_labels.csv`).
    pub test: Option<Scores>,
    pub note: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplayReport {
    pub name: String,
    pub stages: Vec<StageScore>,
    /// The blend's members and weights.
    pub blend_weights: Vec<(String, f64)>,
    pub submission: Option<PathBuf>,
    pub steps_run: usize,
    pub steps_skipped: usize,
}

/// Where everything lives under `--out`.
#[derive(Debug, Clone)]
struct Layout {
    root: PathBuf,
}

impl Layout {
    fn split(&self) -> PathBuf {
        self.root.join("split/split.csv")
    }
    /// Bag 0 is the shared split itself.
    fn bag_split(&self, bag: usize) -> PathBuf {
        if bag == 0 {
            self.split()
        } else {
            self.root.join(format!("split/split-bag{bag}.csv"))
        }
    }
    fn member(&self, name: &str) -> PathBuf {
        self.root.join("members").join(name)
    }
    /// The run folder of a member (bag 0) or of one of its bags.
    fn member_run(&self, name: &str, bag: usize) -> PathBuf {
        if bag == 0 {
            self.member(name).join("run")
        } else {
            self.member(name).join(format!("bag{bag}"))
        }
    }
    /// The member's test predictions that the blend reads: its bags' average when it has bags.
    fn member_test(&self, m: &MemberConfig) -> PathBuf {
        self.member(&m.name).join(if m.bagging > 0 {
            "test.parquet"
        } else {
            "test-main.parquet"
        })
    }
    fn features(&self) -> PathBuf {
        self.root.join("features.parquet")
    }
    fn blend(&self) -> PathBuf {
        self.root.join("blend")
    }
    fn blend_valid(&self) -> PathBuf {
        self.blend().join("valid.parquet")
    }
    fn blend_test(&self) -> PathBuf {
        self.blend().join("test.parquet")
    }
    fn pseudo(&self) -> PathBuf {
        self.root.join("pseudo")
    }
    fn final_dir(&self) -> PathBuf {
        self.root.join("final")
    }
    fn submission(&self) -> PathBuf {
        self.root.join("submission.csv")
    }
    /// The lock a process holds while it runs `step` (hidden: not an output).
    fn step_lock(&self, step: &str) -> PathBuf {
        let slug: String = step
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.root.join(".locks").join(format!("{slug}.lock"))
    }
    /// Held while a process claims the folder (writes replay.toml and dataset.txt).
    fn claim_lock(&self) -> PathBuf {
        self.root.join(".locks").join("claim.lock")
    }
}

/// The part of the chain one process runs (`plankton replay --only`), so that members train
/// as separate jobs (a Slurm array, a Kubernetes Indexed Job, one process per GPU) on one shared
/// output folder; a replay without `--only` then runs what is left (fusion, blend, pseudo-labels,
/// submission), skipping the members already trained and predicted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Only {
    /// A member by name, or by its 0-based index in the replay file; `task` takes the index from
    /// `SLURM_ARRAY_TASK_ID` (a Slurm job array) or `JOB_COMPLETION_INDEX` (a Kubernetes Indexed
    /// Job).
    Member(String),
}

/// The environment variables `--only member=task` reads, in order.
pub const TASK_INDEX_VARS: [&str; 2] = ["SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"];

impl std::str::FromStr for Only {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('=') {
            Some(("member", m)) if !m.trim().is_empty() => Ok(Only::Member(m.trim().to_string())),
            _ => Err(format!(
                "`{s}`: expected member=NAME, member=INDEX (0-based) or member=task (SLURM_ARRAY_TASK_ID / JOB_COMPLETION_INDEX)"
            )),
        }
    }
}

impl Only {
    /// The member's index in `cfg`.
    pub fn member_index(&self, cfg: &ReplayConfig) -> Result<usize, ReplayError> {
        let Only::Member(m) = self;
        let names = || {
            cfg.members
                .iter()
                .enumerate()
                .map(|(i, m)| format!("{i}={}", m.name))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let by_index = |text: &str, origin: &str| -> Result<usize, ReplayError> {
            match text.trim().parse::<usize>() {
                Ok(i) if i < cfg.members.len() => Ok(i),
                _ => Err(ReplayError::Only(format!(
                    "{origin}{text} names no member (members: {}; an array's indices start at 0)",
                    names()
                ))),
            }
        };
        if let Some(i) = cfg.members.iter().position(|x| &x.name == m) {
            return Ok(i);
        }
        if m == "task" {
            for var in TASK_INDEX_VARS {
                if let Ok(v) = std::env::var(var) {
                    return by_index(&v, &format!("member=task: {var}="));
                }
            }
            return Err(ReplayError::Only(format!(
                "member=task: neither {} is set (run it as an array task, or name the member)",
                TASK_INDEX_VARS.join(" nor ")
            )));
        }
        by_index(m, "member=")
    }
}

/// Runs (or resumes) the chain: [`Plan::new`], [`Plan::execute`], then the report.
pub fn run(
    opts: &ReplayOptions,
    rt: &tokio::runtime::Handle,
    on_event: &mut dyn FnMut(ReplayEvent),
) -> Result<ReplayReport, ReplayError> {
    assert!(opts.only.is_none(), "run_only runs a part");
    let (plan, _lock) = start(opts)?;
    let done = plan.execute(opts.device, rt, on_event)?;
    let report = plan.report(done);
    report::write(&plan.layout.root, &report)?;
    Ok(report)
}

/// What a `--only` run did.
#[derive(Debug, Clone)]
pub struct PartDone {
    pub member: String,
    pub ran: usize,
    pub skipped: usize,
}

/// Runs (or resumes) the part of the chain `opts.only` names; several such processes share the
/// output folder, each step run by one of them (a lock per step). The report is written by the
/// replay without `--only` that runs the rest once every member is done.
pub fn run_only(
    opts: &ReplayOptions,
    rt: &tokio::runtime::Handle,
    on_event: &mut dyn FnMut(ReplayEvent),
) -> Result<PartDone, ReplayError> {
    let (plan, _lock) = start(opts)?;
    let member = plan
        .steps()
        .iter()
        .find_map(|s| s.member)
        .map_or_else(String::new, |k| plan.member_name(k).to_string());
    let done = plan.execute(opts.device, rt, on_event)?;
    if done.ran > 0 {
        plan.remove_downstream()?;
    }
    Ok(PartDone {
        member,
        ran: done.ran,
        skipped: done.skipped,
    })
}

/// Checks and claims the output folder (replay.toml, dataset.txt) and lets it go: before
/// member processes are started on it (`--devices`), so that what they share is settled first.
pub fn claim_folder(opts: &ReplayOptions) -> Result<(), ReplayError> {
    start(opts).map(|_| ())
}

/// Plans, selects, locks and claims the output folder. A whole replay holds the folder alone;
/// `--only` parts hold it shared (with each other, never with a whole replay, whose later steps
/// read every member's outputs).
fn start(opts: &ReplayOptions) -> Result<(Plan, crate::fsx::DirLock), ReplayError> {
    let mut plan = Plan::new(&opts.replay_file, &opts.data, &opts.out)?;
    plan.stop = opts.stop.clone();
    if let Some(only) = &opts.only {
        plan.select(only)?;
    }
    plan.check_output_folder()?;
    let lock = if opts.only.is_some() {
        crate::fsx::lock_dir_shared(&plan.layout.root)?
    } else {
        crate::fsx::lock_dir(&plan.layout.root)?
    };
    {
        // Parts started together claim the folder one after the other.
        let _claim = crate::fsx::lock_file_waiting(&plan.layout.claim_lock(), || ())?;
        plan.claim_output_folder()?;
    }
    Ok((plan, lock))
}
