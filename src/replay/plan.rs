//! The chain as data: every step with its outputs, decided before anything runs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use tch::Device;

use super::{Layout, ReplayConfig, ReplayError, ReplayEvent};
use crate::config::PipelineConfig;
use crate::predict::job::Subset;
use crate::sources::Dataset;
use crate::train::RunDir;

/// When a step whose outputs all exist is skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Reuse {
    /// Always: a trained network depends only on its pipeline, data and split, all fixed by the
    /// replay file (which an output folder cannot change).
    WhenPresent,
    /// Until a step before it runs in this invocation: its inputs may then have changed.
    UntilUpstreamRuns,
}

impl Reuse {
    /// Whether a step whose outputs are all present is skipped, given whether a step before it
    /// ran (or will run) in this invocation.
    fn skips(self, upstream_ran: bool) -> bool {
        self == Reuse::WhenPresent || !upstream_ran
    }
}

/// What a step does; the paths it reads and writes follow from the plan's layout.
#[derive(Debug, Clone)]
pub(super) enum Action {
    /// The shared split and the bags' splits.
    Split,
    /// Trains member `member` (bag 0) or one of its bags, resuming a half-trained run.
    Train {
        member: usize,
        bag: usize,
    },
    Predict {
        member: usize,
        bag: usize,
        subset: Subset,
        tta: Option<usize>,
        out: PathBuf,
    },
    /// Row-wise weighted means of prediction files (bags, the final mix).
    Average(Vec<Mean>),
    Features,
    Fuse {
        member: usize,
    },
    Blend,
    /// One pseudo-label model: trained on the blend's soft test targets, then predicting.
    Pseudo {
        member: usize,
        shard: usize,
    },
    Submission {
        predictions: PathBuf,
    },
}

/// One weighted mean of prediction files.
#[derive(Debug, Clone)]
pub(super) struct Mean {
    pub inputs: Vec<PathBuf>,
    pub weights: Vec<f64>,
    pub out: PathBuf,
    pub model_id: String,
}

/// One step of the chain.
#[derive(Debug, Clone)]
pub struct Step {
    pub name: String,
    /// Every file the step writes; it counts as done when all of them exist.
    pub outputs: Vec<PathBuf>,
    pub reuse: Reuse,
    /// The member whose step it is (train, predict, average its bags): what `--only member=`
    /// selects.
    pub member: Option<usize>,
    pub(super) action: Action,
}

/// What running the plan now would do with a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum StepStatus {
    /// Outputs present: skipped.
    Done,
    /// Outputs missing (or stale): runs.
    ToRun,
    /// Outputs present, but a step before it runs: runs again.
    Rerun,
}

/// Counts of what [`Plan::execute`] did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Executed {
    pub ran: usize,
    pub skipped: usize,
}

/// Steps in order, as [`Plan::new`] lists them.
#[derive(Default)]
struct StepList(Vec<Step>);

impl StepList {
    /// A step that reruns once a step before it ran ([`Reuse::UntilUpstreamRuns`]).
    fn derived(&mut self, name: impl Into<String>, outputs: Vec<PathBuf>, action: Action) {
        self.0.push(Step {
            name: name.into(),
            outputs,
            reuse: Reuse::UntilUpstreamRuns,
            member: None,
            action,
        });
    }

    /// Marks the steps from `first` on as member `k`'s.
    fn belong_to(&mut self, first: usize, k: usize) {
        for step in &mut self.0[first..] {
            step.member = Some(k);
        }
    }
}

/// The replay, planned: configuration, dataset and every step in order.
pub struct Plan {
    pub(super) cfg: ReplayConfig,
    /// Each member's pipeline with the replay's overrides (seed, validation fraction).
    pub(super) pipelines: Vec<PipelineConfig>,
    pub(super) ds: Dataset,
    pub(super) data: PathBuf,
    pub(super) layout: Layout,
    pub(super) has_test: bool,
    pub(super) fuse_on: bool,
    pub(super) pseudo_on: bool,
    steps: Vec<Step>,
    /// With a selection ([`Plan::select`]): the outputs of the steps after the members.
    downstream: Vec<PathBuf>,
    /// See [`super::ReplayOptions::stop`].
    pub(super) stop: Option<tokio_util::sync::CancellationToken>,
}

impl Plan {
    /// Reads the replay file, its member pipelines and the dataset, and lists the steps. Writes
    /// nothing.
    pub fn new(replay_file: &Path, data: &Path, out: &Path) -> Result<Plan, ReplayError> {
        let cfg = ReplayConfig::load(replay_file)?;
        let mut pipelines = cfg.member_pipelines(replay_file)?;
        for (p, m) in pipelines.iter_mut().zip(&cfg.members) {
            if let Some(seed) = m.seed {
                p.seed = seed;
            }
            p.split.valid_fraction = cfg.valid_fraction;
        }
        let ds = Dataset::open(data).map_err(|source| ReplayError::Dataset {
            path: data.to_path_buf(),
            source,
        })?;
        // Paths are written into outputs (blend inputs, file metadata) that later runs compare:
        // `out`, `./out` and `/abs/out` must be the same folder to them.
        let (data, out) = (
            &crate::fsx::resolve_path(data),
            &crate::fsx::resolve_path(out),
        );
        if ds.train.is_empty() {
            return Err(ReplayError::NoLabelledImages {
                path: data.to_path_buf(),
            });
        }
        let has_test = !ds.test.is_empty();
        if !cfg.pseudo.members.is_empty() && !has_test {
            tracing::warn!(data = %data.display(), "no test images: the pseudo-label round is skipped");
        }
        let mut plan = Plan {
            pseudo_on: !cfg.pseudo.members.is_empty() && has_test,
            fuse_on: !cfg.fuse.sets.is_empty(),
            has_test,
            cfg,
            pipelines,
            ds,
            data: data.to_path_buf(),
            layout: Layout {
                root: out.to_path_buf(),
            },
            steps: Vec::new(),
            downstream: Vec::new(),
            stop: None,
        };
        plan.steps = plan.list_steps();
        Ok(plan)
    }

    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// Keeps only the steps `only` names, and the shared split they need: one process of
    /// several sharing the output folder (see [`super::Only`]). Returns the member's index.
    pub fn select(&mut self, only: &super::Only) -> Result<usize, ReplayError> {
        let k = only.member_index(&self.cfg)?;
        // What reads the members' outputs (fusion, blend, pseudo-labels, the final mix, the
        // submission): stale once a part has run something (see `remove_downstream`).
        self.downstream = self
            .steps
            .iter()
            .filter(|s| s.member.is_none() && !matches!(s.action, Action::Split | Action::Features))
            .flat_map(|s| s.outputs.iter().cloned())
            .collect();
        self.steps
            .retain(|s| s.member == Some(k) || matches!(s.action, Action::Split));
        Ok(k)
    }

    /// After a part ran a step (a member trained or predicted again): removes the outputs of
    /// the steps after the members that exist, so that the whole replay that follows runs them
    /// again, as a sequential replay would have. Returns how many files it removed.
    pub fn remove_downstream(&self) -> Result<usize, ReplayError> {
        let mut removed = 0;
        for p in &self.downstream {
            match std::fs::remove_file(p) {
                Ok(()) => {
                    tracing::info!(file = %p.display(), "removed: it read outputs this part has just rewritten");
                    removed += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(ReplayError::io(p)(e)),
            }
        }
        Ok(removed)
    }

    /// Member `k`'s name.
    pub fn member_name(&self, k: usize) -> &str {
        &self.cfg.members[k].name
    }

    fn list_steps(&self) -> Vec<Step> {
        let mut steps = StepList::default();
        let max_bags = self
            .cfg
            .members
            .iter()
            .map(|m| m.bagging)
            .max()
            .unwrap_or(0);
        // One split for every member, so their validation predictions line up for the blend.
        steps.derived(
            "split",
            (0..=max_bags).map(|k| self.layout.bag_split(k)).collect(),
            Action::Split,
        );
        for k in 0..self.cfg.members.len() {
            let first = steps.0.len();
            self.member_steps(k, &mut steps);
            steps.belong_to(first, k);
        }
        if self.fuse_on {
            self.fusion_steps(&mut steps);
        }
        // Blend: weights fitted on the members' validation predictions, applied to their test ones.
        let bdir = self.layout.blend();
        let mut outputs = vec![
            bdir.join("weights.json"),
            self.layout.blend_valid(),
            bdir.join("report.json"),
            bdir.join("inputs.txt"),
        ];
        if self.has_test {
            outputs.push(self.layout.blend_test());
        }
        steps.derived("blend", outputs, Action::Blend);
        if self.pseudo_on {
            self.pseudo_steps(&mut steps);
        }
        if self.has_test {
            steps.derived(
                "submission",
                vec![self.layout.submission()],
                Action::Submission {
                    predictions: self.final_predictions().1,
                },
            );
        }
        steps.0
    }

    /// A member: train it and its bags, predict validation (one pass and TTA) and test (TTA;
    /// bags averaged).
    fn member_steps(&self, k: usize, steps: &mut StepList) {
        let m = &self.cfg.members[k];
        let dir = self.layout.member(&m.name);
        for bag in 0..=m.bagging {
            steps.0.push(Step {
                name: match bag {
                    0 => format!("train {}", m.name),
                    b => format!("train {} bag {b}", m.name),
                },
                outputs: vec![RunDir::new(&self.layout.member_run(&m.name, bag)).final_weights()],
                reuse: Reuse::WhenPresent,
                member: Some(k),
                action: Action::Train { member: k, bag },
            });
        }
        let mut predict =
            |what: &str, bag: usize, subset: Subset, tta: Option<usize>, file: &str| {
                let out = dir.join(file);
                let bag_name = match bag {
                    0 => String::new(),
                    b => format!(" bag {b}"),
                };
                steps.derived(
                    format!("predict {}{bag_name} {what}", m.name),
                    vec![out.clone()],
                    Action::Predict {
                        member: k,
                        bag,
                        subset,
                        tta,
                        out,
                    },
                );
            };
        let one_pass = Some(1);
        predict(
            "valid, one pass",
            0,
            Subset::Valid,
            one_pass,
            "valid-single.parquet",
        );
        predict("valid, TTA", 0, Subset::Valid, m.tta, "valid.parquet");
        if !self.has_test {
            return;
        }
        predict(
            "test, one pass",
            0,
            Subset::Test,
            one_pass,
            "test-single.parquet",
        );
        predict("test, TTA", 0, Subset::Test, m.tta, "test-main.parquet");
        let bag_files: Vec<PathBuf> = (1..=m.bagging)
            .map(|bag| {
                let file = format!("test-bag{bag}.parquet");
                predict("test, TTA", bag, Subset::Test, m.tta, &file);
                dir.join(file)
            })
            .collect();
        if m.bagging > 0 {
            let inputs: Vec<PathBuf> = std::iter::once(dir.join("test-main.parquet"))
                .chain(bag_files)
                .collect();
            let out = self.layout.member_test(m);
            steps.derived(
                format!("average {} bags", m.name),
                vec![out.clone()],
                Action::Average(vec![Mean {
                    weights: vec![1.0 / inputs.len() as f64; inputs.len()],
                    inputs,
                    out,
                    model_id: format!("{}-bagged", m.name),
                }]),
            );
        }
    }

    /// Image features, then each member fused with them.
    fn fusion_steps(&self, steps: &mut StepList) {
        steps.derived("features", vec![self.layout.features()], Action::Features);
        for (k, m) in self.cfg.members.iter().enumerate() {
            let dir = self.layout.member(&m.name);
            let mut outputs = vec![dir.join("valid-fused.parquet")];
            if self.has_test {
                outputs.push(dir.join("test-fused.parquet"));
            }
            steps.derived(
                format!("fuse {}", m.name),
                outputs,
                Action::Fuse { member: k },
            );
        }
    }

    /// The pseudo-label round (members retrained with the blend's soft test targets, sharded),
    /// then the final answer: (blend + mean of the pseudo-label models) / 2, as the reference.
    fn pseudo_steps(&self, steps: &mut StepList) {
        let (cfg, layout) = (&self.cfg, &self.layout);
        let (mut pv, mut pt) = (Vec::new(), Vec::new());
        for name in &cfg.pseudo.members {
            let k = cfg
                .members
                .iter()
                .position(|m| &m.name == name)
                .expect("validated");
            for shard in 0..cfg.pseudo.shards {
                let (v, t) = self.pseudo_outputs(name, shard);
                steps.derived(
                    format!("pseudo-label {name}-shard{shard}"),
                    vec![v.clone(), t.clone()],
                    Action::Pseudo { member: k, shard },
                );
                pv.push(v);
                pt.push(t);
            }
        }
        let n = pv.len() as f64;
        let weights: Vec<f64> = std::iter::once(1.0 - cfg.pseudo.weight)
            .chain(std::iter::repeat_n(cfg.pseudo.weight / n, pv.len()))
            .collect();
        let mean = |first: PathBuf, rest: Vec<PathBuf>, out: PathBuf| Mean {
            inputs: std::iter::once(first).chain(rest).collect(),
            weights: weights.clone(),
            out,
            model_id: "final".into(),
        };
        let (fv, ft) = self.final_predictions();
        steps.derived(
            "final mix",
            vec![fv.clone(), ft.clone()],
            Action::Average(vec![
                mean(layout.blend_valid(), pv, fv),
                mean(layout.blend_test(), pt, ft),
            ]),
        );
    }

    /// A pseudo-label model's (validation, test) predictions.
    pub(super) fn pseudo_outputs(&self, member: &str, shard: usize) -> (PathBuf, PathBuf) {
        let tag = format!("{member}-shard{shard}");
        let p = self.layout.pseudo();
        (
            p.join(format!("{tag}-valid.parquet")),
            p.join(format!("{tag}-test.parquet")),
        )
    }

    /// The chain's answer: (validation, test) predictions of the final mix, else of the blend.
    pub(super) fn final_predictions(&self) -> (PathBuf, PathBuf) {
        if self.pseudo_on {
            let f = self.layout.final_dir();
            (f.join("valid.parquet"), f.join("test.parquet"))
        } else {
            (self.layout.blend_valid(), self.layout.blend_test())
        }
    }

    /// Whether a step's outputs are all there and current.
    fn is_present(&self, step: &Step) -> bool {
        if !step.outputs.iter().all(|p| p.exists()) {
            return false;
        }
        match step.action {
            // Which files the blend read (fused or not) decides its outputs.
            Action::Blend => {
                std::fs::read_to_string(self.layout.blend().join("inputs.txt")).ok()
                    == Some(self.blend_inputs().signature())
            }
            _ => true,
        }
    }

    /// What running the plan now would do with each step, without running anything.
    pub fn status(&self) -> Vec<StepStatus> {
        let mut upstream_runs = false;
        self.steps
            .iter()
            .map(|step| {
                let present = self.is_present(step);
                let status = match (present, step.reuse.skips(upstream_runs)) {
                    (false, _) => StepStatus::ToRun,
                    (true, false) => StepStatus::Rerun,
                    (true, true) => StepStatus::Done,
                };
                upstream_runs |= status != StepStatus::Done;
                status
            })
            .collect()
    }

    /// Refuses an output folder this replay could not use: a file, a folder of other files, or
    /// one holding a replay of another configuration or dataset. Writes nothing.
    pub fn check_output_folder(&self) -> Result<(), ReplayError> {
        let root = &self.layout.root;
        if !root.exists() {
            return Ok(());
        }
        if !root.is_dir() {
            return Err(ReplayError::NotAFolder { path: root.clone() });
        }
        let stored = root.join("replay.toml");
        // Compared as parsed configs, not text: a field added by a later version (with its
        // default) must not make an old output folder look like another replay.
        match std::fs::read_to_string(&stored) {
            Ok(text) => {
                if toml::from_str::<ReplayConfig>(&text).ok().as_ref() != Some(&self.cfg) {
                    return Err(ReplayError::OtherReplay { path: root.clone() });
                }
            }
            Err(_) => {
                // Hidden entries are the locks and other processes' temporary files (members
                // started together), not foreign files.
                let foreign = std::fs::read_dir(root)
                    .map_err(ReplayError::io(root))?
                    .filter_map(|e| e.ok())
                    .any(|e| !e.file_name().to_string_lossy().starts_with('.'));
                if foreign {
                    return Err(ReplayError::NotAReplayFolder { path: root.clone() });
                }
            }
        }
        // A member trained from a pipeline file that has changed since.
        for (k, m) in self.cfg.members.iter().enumerate() {
            for bag in 0..=m.bagging {
                let run = RunDir::new(&self.layout.member_run(&m.name, bag));
                let Ok(trained) = PipelineConfig::load(&run.pipeline()) else {
                    continue;
                };
                if trained != self.bag_pipeline(k, bag) {
                    return Err(ReplayError::MemberChanged {
                        run: run.root.clone(),
                        member: m.name.clone(),
                        pipeline: m.pipeline.clone(),
                    });
                }
            }
        }
        if let Ok(stored) = std::fs::read_to_string(root.join("dataset.txt")) {
            let now = self.dataset_fingerprint();
            if stored != now {
                return Err(ReplayError::OtherDataset {
                    path: root.clone(),
                    stored: stored.trim().replace('\n', ", "),
                    now: now.trim().replace('\n', ", "),
                });
            }
        }
        Ok(())
    }

    /// Which images, with which labels: what the stored networks and scores depend on.
    fn dataset_fingerprint(&self) -> String {
        let mut h = Vec::new();
        let rel = |p: &Path| {
            p.strip_prefix(&self.ds.root)
                .unwrap_or(p)
                .display()
                .to_string()
        };
        for r in &self.ds.train {
            let class = r.label.map(|l| self.ds.class_names[l as usize].as_str());
            h.extend(format!("{}\t{}\n", rel(&r.path), class.unwrap_or("")).bytes());
        }
        for r in &self.ds.test {
            h.extend(format!("test\t{}\n", rel(&r.path)).bytes());
        }
        format!(
            "{} labelled and {} test images in {} classes\nfingerprint {:016x}\n",
            self.ds.train.len(),
            self.ds.test.len(),
            self.ds.class_names.len(),
            crate::rng::fnv1a64(&h)
        )
    }

    /// Checks the output folder ([`Plan::check_output_folder`]), then creates it, stores the
    /// replay file and the dataset's fingerprint in it and removes temporaries of a replay
    /// killed mid-write.
    pub fn claim_output_folder(&self) -> Result<(), ReplayError> {
        self.check_output_folder()?;
        let root = &self.layout.root;
        std::fs::create_dir_all(root).map_err(ReplayError::io(root))?;
        crate::fsx::sweep_stale_temps(root);
        let write = |name: &str, text: String| {
            let path = root.join(name);
            if path.exists() {
                return Ok(());
            }
            crate::fsx::write_atomic(&path, text.as_bytes())
                .map_err(|source| ReplayError::Write { path, source })
        };
        write(
            "replay.toml",
            toml::to_string_pretty(&self.cfg).expect("serialisable"),
        )?;
        write("dataset.txt", self.dataset_fingerprint())
    }

    /// Runs the steps in order, skipping those whose outputs are present (see [`Reuse`]).
    pub fn execute(
        &self,
        device: Device,
        rt: &tokio::runtime::Handle,
        on_event: &mut dyn FnMut(ReplayEvent),
    ) -> Result<Executed, ReplayError> {
        let total = self.steps.len();
        on_event(ReplayEvent::Started { steps: total });
        let mut done = Executed::default();
        // When the last step this process ran finished: a present output written after it (by
        // another process sharing the folder, from the same inputs) is current.
        let mut last_ran: Option<std::time::SystemTime> = None;
        for (i, step) in self.steps.iter().enumerate() {
            let index = i + 1;
            // One process at a time per step (members run as separate jobs share the split,
            // and a job run twice must not train one network twice at once); the outputs are
            // looked at once the lock is ours.
            let lock = self.layout.step_lock(&step.name);
            let _step_lock = crate::fsx::lock_file_waiting(&lock, || {
                tracing::info!(step = %step.name, "another process is running this step: waiting for it");
            })?;
            let written_since = |t: std::time::SystemTime| {
                step.outputs.iter().all(|p| {
                    std::fs::metadata(p)
                        .and_then(|m| m.modified())
                        .is_ok_and(|m| m >= t)
                })
            };
            let current = step.reuse.skips(done.ran > 0) || last_ran.is_some_and(written_since);
            if current && self.is_present(step) {
                done.skipped += 1;
                tracing::info!(step = %step.name, "outputs present: skipped");
                on_event(ReplayEvent::StepSkipped {
                    index,
                    name: step.name.clone(),
                });
                continue;
            }
            on_event(ReplayEvent::StepStarted {
                index,
                name: step.name.clone(),
            });
            let t = Instant::now();
            let result = self.perform(step, device, rt, on_event);
            if self.stop.as_ref().is_some_and(|s| s.is_cancelled()) {
                return Err(ReplayError::Stopped {
                    index,
                    steps: total,
                    step: step.name.clone(),
                });
            }
            result.map_err(|source| ReplayError::Step {
                index,
                steps: total,
                step: step.name.clone(),
                source,
            })?;
            if let Some(missing) = step.outputs.iter().find(|p| !p.exists()) {
                return Err(ReplayError::Incomplete {
                    step: step.name.clone(),
                    missing: missing.clone(),
                });
            }
            done.ran += 1;
            last_ran = Some(std::time::SystemTime::now());
            let seconds = t.elapsed().as_secs_f64();
            tracing::info!(step = %step.name, seconds, "step done");
            on_event(ReplayEvent::StepDone {
                index,
                name: step.name.clone(),
                seconds,
            });
        }
        Ok(done)
    }
}
