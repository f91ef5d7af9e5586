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
}

/// Runs (or resumes) the chain: [`Plan::new`], [`Plan::execute`], then the report.
pub fn run(
    opts: &ReplayOptions,
    rt: &tokio::runtime::Handle,
    on_event: &mut dyn FnMut(ReplayEvent),
) -> Result<ReplayReport, ReplayError> {
    let mut plan = Plan::new(&opts.replay_file, &opts.data, &opts.out)?;
    plan.stop = opts.stop.clone();
    plan.check_output_folder()?;
    // One replay per output folder: two would train the same members twice and race on files.
    let _lock = crate::fsx::lock_dir(&plan.layout.root)?;
    plan.claim_output_folder()?;
    let done = plan.execute(opts.device, rt, on_event)?;
    let report = plan.report(done);
    report::write(&plan.layout.root, &report)?;
    Ok(report)
}
