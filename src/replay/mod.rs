//! `plankton replay`: the whole reference solution as one resumable chain on a dataset folder —
//! train the members (and their bags) on one shared split, predict with TTA, compute image
//! features, fuse, blend, run a pseudo-label round, write the submission and a report with the
//! score after every stage.
//!
//! Every step writes its outputs atomically and is skipped when they are all present, so a
//! killed replay picks up where it stopped (a half-trained member resumes from its last
//! checkpoint). The replay file is copied into the output folder on the first run; a later run
//! with a different file is refused instead of mixing two configurations.

pub mod config;

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::Device;

pub use config::{MemberConfig, ReplayConfig, ReplayConfigError};

use crate::blend;
use crate::config::PipelineConfig;
use crate::evaluate;
use crate::predict::job::{self as predict, PredictOptions, Subset};
use crate::scoring::{self, Scores};
use crate::sinks::parquet::Predictions;
use crate::sources::Dataset;
use crate::train::{self, RunDir, TrainEvent, TrainOptions};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Config(#[from] ReplayConfigError),
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("step `{step}`: {message}")]
    Step { step: String, message: String },
    #[error("{path}: holds a replay of another configuration (its replay.toml differs); use another --out")]
    OtherReplay { path: PathBuf },
}

fn step_err(step: &str) -> impl Fn(String) -> ReplayError + '_ {
    move |message| ReplayError::Step {
        step: step.to_string(),
        message,
    }
}

#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub replay_file: PathBuf,
    pub data: PathBuf,
    pub out: PathBuf,
    pub device: Device,
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
struct Layout {
    root: PathBuf,
}

impl Layout {
    fn split(&self) -> PathBuf {
        self.root.join("split/split.csv")
    }
    fn bag_split(&self, k: usize) -> PathBuf {
        self.root.join(format!("split/split-bag{k}.csv"))
    }
    fn member(&self, name: &str) -> PathBuf {
        self.root.join("members").join(name)
    }
    fn features(&self) -> PathBuf {
        self.root.join("features.parquet")
    }
    fn blend(&self) -> PathBuf {
        self.root.join("blend")
    }
    fn pseudo(&self) -> PathBuf {
        self.root.join("pseudo")
    }
    fn final_dir(&self) -> PathBuf {
        self.root.join("final")
    }
}

/// Runs steps, skipping those whose outputs are all present — until one step runs: what
/// follows may depend on its outputs, so from then on every step runs again (trainings
/// excepted: a trained network depends only on its pipeline, data and split).
struct Chain<'a> {
    on_event: &'a mut dyn FnMut(ReplayEvent),
    index: usize,
    ran: usize,
    skipped: usize,
    dirty: bool,
}

impl Chain<'_> {
    fn step(
        &mut self,
        name: &str,
        outputs: &[PathBuf],
        f: impl FnOnce(&mut dyn FnMut(ReplayEvent)) -> Result<(), ReplayError>,
    ) -> Result<(), ReplayError> {
        let dirty = self.dirty;
        self.run_step(name, outputs, dirty, f)
    }

    /// A training step: skipped whenever its final weights exist.
    fn train_step(
        &mut self,
        name: &str,
        outputs: &[PathBuf],
        f: impl FnOnce(&mut dyn FnMut(ReplayEvent)) -> Result<(), ReplayError>,
    ) -> Result<(), ReplayError> {
        self.run_step(name, outputs, false, f)
    }

    fn run_step(
        &mut self,
        name: &str,
        outputs: &[PathBuf],
        force: bool,
        f: impl FnOnce(&mut dyn FnMut(ReplayEvent)) -> Result<(), ReplayError>,
    ) -> Result<(), ReplayError> {
        self.index += 1;
        if !force && !outputs.is_empty() && outputs.iter().all(|p| p.exists()) {
            self.skipped += 1;
            tracing::info!(step = name, "outputs present: skipped");
            (self.on_event)(ReplayEvent::StepSkipped {
                index: self.index,
                name: name.into(),
            });
            return Ok(());
        }
        (self.on_event)(ReplayEvent::StepStarted {
            index: self.index,
            name: name.into(),
        });
        let t = Instant::now();
        f(self.on_event)?;
        if let Some(missing) = outputs.iter().find(|p| !p.exists()) {
            return Err(ReplayError::Step {
                step: name.into(),
                message: format!("finished without writing {}", missing.display()),
            });
        }
        self.ran += 1;
        self.dirty = true;
        let seconds = t.elapsed().as_secs_f64();
        tracing::info!(step = name, seconds, "step done");
        (self.on_event)(ReplayEvent::StepDone {
            index: self.index,
            name: name.into(),
            seconds,
        });
        Ok(())
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> ReplayError + '_ {
    move |e| ReplayError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Trains one network of the chain (resuming a half-trained one).
#[allow(clippy::too_many_arguments)]
fn train_member(
    name: &str,
    cfg: &PipelineConfig,
    data: &Path,
    split: &Path,
    run: &Path,
    device: Device,
    rt: &tokio::runtime::Handle,
    on_event: &mut dyn FnMut(ReplayEvent),
) -> Result<(), ReplayError> {
    let rd = RunDir::new(run);
    let resume = rd.checkpoints().exists() || rd.history().exists();
    let opts = TrainOptions {
        config: cfg.clone(),
        data: data.to_path_buf(),
        out: run.to_path_buf(),
        resume,
        device,
        split_file: Some(split.to_path_buf()),
        stop: None,
    };
    let summary = train::run(&opts, rt, &mut |event| {
        on_event(ReplayEvent::Train {
            name: name.to_string(),
            event,
        })
    })
    .map_err(|e| step_err(name)(e.to_string()))?;
    tracing::info!(
        member = name,
        steps = summary.steps,
        best_valid_loss = summary.best_valid_loss,
        "trained"
    );
    Ok(())
}

fn predict_run(
    run: &Path,
    data: &Path,
    subset: Subset,
    tta: Option<usize>,
    out: &Path,
    device: Device,
    rt: &tokio::runtime::Handle,
) -> Result<(), ReplayError> {
    let mut opts = PredictOptions::new(run, vec![data.to_path_buf()], out);
    opts.subset = subset;
    opts.tta = tta;
    opts.device = device;
    // The final weights: `best` was chosen on the very validation images the later stages
    // are fitted and scored on.
    opts.weights = predict::Weights::Final;
    opts.calibrate = false;
    predict::run(&opts, rt, &mut |_| {})
        .map_err(|e| step_err(&out.display().to_string())(e.to_string()))?;
    Ok(())
}

/// Weighted average of prediction files row by row (bags, pseudo-label shards, the final mix).
fn average(files: &[PathBuf], weights: &[f64], out: &Path, name: &str) -> Result<(), ReplayError> {
    let first = Predictions::read(&files[0]).map_err(|e| step_err(name)(e.to_string()))?;
    let wf = blend::job::WeightsFile {
        format: blend::job::WEIGHTS_FORMAT.to_string(),
        model_id: name.to_string(),
        class_names: first.class_names.clone(),
        members: files
            .iter()
            .zip(weights)
            .map(|(f, &w)| blend::job::WeightsMember {
                file: f.clone(),
                model_ids: Vec::new(),
                weight: w,
                selected: true,
            })
            .collect(),
        select: blend::select::Select::All,
        weighting: blend::select::Weighting::Uniform,
        // Fixed weights, not fitted: no fitting rows and no loss to record (JSON has no NaN).
        log_loss: 0.0,
        fit_rows: 0,
    };
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let weights_path = out.with_extension("weights.json");
    let text = serde_json::to_string_pretty(&wf).expect("serialisable");
    crate::train::run_dir::write_atomic(&weights_path, text.as_bytes())
        .map_err(|e| step_err(name)(e.to_string()))?;
    let mut opts = blend::job::ApplyOptions::new(&weights_path, files.to_vec(), out);
    opts.allow_other_models = true;
    blend::job::apply(&opts).map_err(|e| step_err(name)(e.to_string()))?;
    Ok(())
}

/// Scores of a predictions file against the dataset's labels, if any of its rows has one.
fn scores_of(path: &Path, data: &Path) -> Option<Scores> {
    if !path.exists() {
        return None;
    }
    let l = evaluate::load_labelled(path, &[data.to_path_buf()]).ok()?;
    Some(scoring::score(&l.probs, &l.labels, l.class_names.len()))
}

/// Runs (or resumes) the chain.
pub fn run(
    opts: &ReplayOptions,
    rt: &tokio::runtime::Handle,
    on_event: &mut dyn FnMut(ReplayEvent),
) -> Result<ReplayReport, ReplayError> {
    let cfg = ReplayConfig::load(&opts.replay_file)?;
    // Temporaries of a replay killed mid-write (its report files live here).
    crate::fsx::sweep_stale_temps(&opts.out);
    let mut pipelines = cfg.member_pipelines(&opts.replay_file)?;
    for (p, m) in pipelines.iter_mut().zip(&cfg.members) {
        if let Some(seed) = m.seed {
            p.seed = seed;
        }
        p.split.valid_fraction = cfg.valid_fraction;
    }
    let ds = Dataset::open(&opts.data).map_err(|e| ReplayError::Step {
        step: "dataset".into(),
        message: e.to_string(),
    })?;
    if ds.train.is_empty() {
        return Err(ReplayError::Step {
            step: "dataset".into(),
            message: format!(
                "{}: no labelled images (train/<class>/...)",
                opts.data.display()
            ),
        });
    }
    let layout = Layout {
        root: opts.out.clone(),
    };
    std::fs::create_dir_all(&layout.root).map_err(io(&layout.root))?;
    let stored = layout.root.join("replay.toml");
    let canonical = toml::to_string_pretty(&cfg).expect("serialisable");
    // Compared as parsed configs, not text: a field added by a later version (with its
    // default) must not make an old output folder look like another replay.
    match std::fs::read_to_string(&stored) {
        Ok(text) if toml::from_str::<ReplayConfig>(&text).ok().as_ref() != Some(&cfg) => {
            return Err(ReplayError::OtherReplay {
                path: layout.root.clone(),
            })
        }
        Ok(_) => {}
        Err(_) => crate::train::run_dir::write_atomic(&stored, canonical.as_bytes())
            .map_err(|e| step_err("replay.toml")(e.to_string()))?,
    }
    let data = opts.data.as_path();
    let device = opts.device;
    let has_test = !ds.test.is_empty();
    let pseudo_on = !cfg.pseudo.members.is_empty() && has_test;
    if !cfg.pseudo.members.is_empty() && !has_test {
        tracing::warn!(data = %data.display(), "no test images: the pseudo-label round is skipped");
    }
    let fuse_on = !cfg.fuse.sets.is_empty();
    let max_bags = cfg.members.iter().map(|m| m.bagging).max().unwrap_or(0);
    let steps = 1
        + cfg
            .members
            .iter()
            .map(|m| {
                1 + m.bagging
                    + 2
                    + usize::from(has_test) * (2 + m.bagging + usize::from(m.bagging > 0))
            })
            .sum::<usize>()
        + usize::from(fuse_on) * (1 + cfg.members.len())
        + 1
        + usize::from(pseudo_on) * (cfg.pseudo.members.len() * cfg.pseudo.shards + 1)
        + usize::from(has_test);
    on_event(ReplayEvent::Started { steps });
    let mut chain = Chain {
        on_event,
        index: 0,
        ran: 0,
        skipped: 0,
        dirty: false,
    };

    // One split for every member, so their validation predictions line up for the blend.
    chain.step(
        "split",
        &std::iter::once(layout.split())
            .chain((1..=max_bags).map(|k| layout.bag_split(k)))
            .collect::<Vec<_>>(),
        |_| {
            std::fs::create_dir_all(layout.split().parent().unwrap()).map_err(io(&layout.root))?;
            crate::split::write_split_files(
                &ds,
                &layout.split(),
                cfg.valid_fraction,
                cfg.seed,
                max_bags,
            )
            .map_err(|e| step_err("split")(e.to_string()))?;
            Ok(())
        },
    )?;

    // Members: train, predict validation (one pass and TTA) and test (TTA; bags averaged).
    for (m, pcfg) in cfg.members.iter().zip(&pipelines) {
        let dir = layout.member(&m.name);
        let run = dir.join("run");
        chain.train_step(
            &format!("train {}", m.name),
            &[RunDir::new(&run).final_weights()],
            |ev| train_member(&m.name, pcfg, data, &layout.split(), &run, device, rt, ev),
        )?;
        for k in 1..=m.bagging {
            let bag_run = dir.join(format!("bag{k}"));
            chain.train_step(
                &format!("train {} bag {k}", m.name),
                &[RunDir::new(&bag_run).final_weights()],
                |ev| {
                    let mut c = pcfg.clone();
                    c.seed = crate::rng::mix64(pcfg.seed ^ k as u64);
                    train_member(
                        &format!("{} bag {k}", m.name),
                        &c,
                        data,
                        &layout.bag_split(k),
                        &bag_run,
                        device,
                        rt,
                        ev,
                    )
                },
            )?;
        }
        let single = dir.join("valid-single.parquet");
        chain.step(
            &format!("predict {} valid, one pass", m.name),
            std::slice::from_ref(&single),
            |_| predict_run(&run, data, Subset::Valid, Some(1), &single, device, rt),
        )?;
        let valid = dir.join("valid.parquet");
        chain.step(
            &format!("predict {} valid, TTA", m.name),
            std::slice::from_ref(&valid),
            |_| predict_run(&run, data, Subset::Valid, m.tta, &valid, device, rt),
        )?;
        if has_test {
            let test_single = dir.join("test-single.parquet");
            chain.step(
                &format!("predict {} test, one pass", m.name),
                std::slice::from_ref(&test_single),
                |_| predict_run(&run, data, Subset::Test, Some(1), &test_single, device, rt),
            )?;
            let test_main = dir.join("test-main.parquet");
            chain.step(
                &format!("predict {} test, TTA", m.name),
                std::slice::from_ref(&test_main),
                |_| predict_run(&run, data, Subset::Test, m.tta, &test_main, device, rt),
            )?;
            let mut bag_files = vec![test_main.clone()];
            for k in 1..=m.bagging {
                let f = dir.join(format!("test-bag{k}.parquet"));
                let bag_run = dir.join(format!("bag{k}"));
                chain.step(
                    &format!("predict {} bag {k} test, TTA", m.name),
                    std::slice::from_ref(&f),
                    |_| predict_run(&bag_run, data, Subset::Test, m.tta, &f, device, rt),
                )?;
                bag_files.push(f);
            }
            if m.bagging > 0 {
                let test = dir.join("test.parquet");
                chain.step(
                    &format!("average {} bags", m.name),
                    std::slice::from_ref(&test),
                    |_| {
                        let w = vec![1.0 / bag_files.len() as f64; bag_files.len()];
                        average(&bag_files, &w, &test, &format!("{}-bagged", m.name))
                    },
                )?;
            }
        }
    }
    let member_test = |m: &MemberConfig| {
        let dir = layout.member(&m.name);
        if m.bagging > 0 {
            dir.join("test.parquet")
        } else {
            dir.join("test-main.parquet")
        }
    };

    // Features and late fusion.
    let (mut blend_valid, mut blend_test): (Vec<PathBuf>, Vec<PathBuf>) = cfg
        .members
        .iter()
        .map(|m| (layout.member(&m.name).join("valid.parquet"), member_test(m)))
        .unzip();
    let mut fuse_notes: Vec<String> = Vec::new();
    if fuse_on {
        chain.step("features", &[layout.features()], |_| {
            let sets = crate::features::job::FeatureSet::parse_list(&cfg.features.sets.join(","))
                .map_err(|e| step_err("features")(e.to_string()))?;
            let fo = crate::features::job::FeaturesOptions {
                data: vec![data.to_path_buf()],
                out: layout.features(),
                sets,
                threads: 0,
                decode: pipelines[0].decode,
            };
            crate::features::job::run(&fo, |_, _| {})
                .map_err(|e| step_err("features")(e.to_string()))?;
            Ok(())
        })?;
        for (k, m) in cfg.members.iter().enumerate() {
            let dir = layout.member(&m.name);
            let (fv, ft, model) = (
                dir.join("valid-fused.parquet"),
                dir.join("test-fused.parquet"),
                dir.join("fusion"),
            );
            let mut outputs = vec![fv.clone()];
            if has_test {
                outputs.push(ft.clone());
            }
            chain.step(&format!("fuse {}", m.name), &outputs, |_| {
                fuse_member(
                    &cfg,
                    &blend_valid[k],
                    has_test.then_some(&blend_test[k]),
                    &layout.features(),
                    data,
                    &fv,
                    &ft,
                    &model,
                )
            })?;
            let gain = fusion_gain(&fv);
            let keep =
                !cfg.fuse.only_if_better || gain.is_some_and(|(before, after)| after < before);
            fuse_notes.push(match gain {
                Some((b, a)) => format!(
                    "{}: {b:.3} -> {a:.3} out-of-fold, {}",
                    m.name,
                    if keep { "blended" } else { "not blended" }
                ),
                None => format!("{}: no fusion report", m.name),
            });
            if keep {
                blend_valid[k] = fv;
                blend_test[k] = ft;
            }
        }
    }

    // Blend: weights fitted on the members' validation predictions, applied to their test ones.
    let bdir = layout.blend();
    let (bw, bv, bt, breport) = (
        bdir.join("weights.json"),
        bdir.join("valid.parquet"),
        bdir.join("test.parquet"),
        bdir.join("report.json"),
    );
    let mut outputs = vec![bw.clone(), bv.clone(), breport.clone()];
    if has_test {
        outputs.push(bt.clone());
    }
    // Which files the blend read (fused or not) decides its outputs: a change reruns it.
    let inputs = bdir.join("inputs.txt");
    let signature: String = blend_valid
        .iter()
        .chain(&blend_test)
        .map(|p| format!("{}\n", p.display()))
        .collect();
    if std::fs::read_to_string(&inputs).ok().as_deref() != Some(signature.as_str()) {
        let _ = std::fs::remove_file(&inputs);
    }
    outputs.push(inputs.clone());
    chain.step("blend", &outputs, |_| {
        let mut fo =
            blend::job::FitOptions::new(blend_valid.clone(), vec![data.to_path_buf()], &bv);
        fo.weights_out = Some(bw.clone());
        fo.report = Some(breport.clone());
        fo.select = if cfg.blend.select == "all" {
            blend::select::Select::All
        } else {
            blend::select::Select::Cv
        };
        if cfg.blend.uniform {
            fo.weighting = blend::select::Weighting::Uniform;
        }
        fo.folds = cfg.blend.folds;
        blend::job::fit(&fo).map_err(|e| step_err("blend")(e.to_string()))?;
        if has_test {
            let mut ao = blend::job::ApplyOptions::new(&bw, blend_test.clone(), &bt);
            ao.allow_other_models = true;
            blend::job::apply(&ao).map_err(|e| step_err("blend")(e.to_string()))?;
        }
        crate::train::run_dir::write_atomic(&inputs, signature.as_bytes())
            .map_err(|e| step_err("blend")(e.to_string()))
    })?;

    // Pseudo-label round: members retrained with the blend's soft test targets, sharded.
    let pdir = layout.pseudo();
    let mut pseudo_valid = Vec::new();
    let mut pseudo_test = Vec::new();
    if pseudo_on {
        for name in &cfg.pseudo.members {
            let k = cfg
                .members
                .iter()
                .position(|m| &m.name == name)
                .expect("validated");
            let m = &cfg.members[k];
            for s in 0..cfg.pseudo.shards {
                let tag = format!("{name}-shard{s}");
                let run = pdir.join(&tag);
                let (v, t) = (
                    pdir.join(format!("{tag}-valid.parquet")),
                    pdir.join(format!("{tag}-test.parquet")),
                );
                chain.step(&format!("pseudo-label {tag}"), &[v.clone(), t.clone()], |ev| {
                    let mut c = pipelines[k].clone();
                    c.seed = crate::rng::mix64(c.seed ^ (0x1000 + s as u64));
                    c.pseudo = crate::train::pseudo::PseudoConfig {
                        predictions: Some(std::path::absolute(&bt).map_err(io(&bt))?),
                        fraction: cfg.pseudo.fraction,
                        shards: cfg.pseudo.shards,
                        shard: if cfg.pseudo.shards > 1 { s } else { 0 },
                        shard_seed: cfg.seed,
                    };
                    c.train.dropout = cfg.pseudo.dropout;
                    // A model trained on other soft targets (the blend changed) is stale.
                    let targets = format!("{:016x}\n", crate::rng::fnv1a64(&std::fs::read(&bt).map_err(io(&bt))?));
                    let stamp = pdir.join(format!("{tag}.targets"));
                    if run.exists() && std::fs::read_to_string(&stamp).ok().as_deref() != Some(targets.as_str()) {
                        tracing::info!(run = %run.display(), "the blend's targets changed: retraining");
                        std::fs::remove_dir_all(&run).map_err(io(&run))?;
                    }
                    std::fs::create_dir_all(&pdir).map_err(io(&pdir))?;
                    crate::train::run_dir::write_atomic(&stamp, targets.as_bytes()).map_err(|e| step_err("pseudo")(e.to_string()))?;
                    if !RunDir::new(&run).final_weights().exists() {
                        train_member(&tag, &c, data, &layout.split(), &run, device, rt, ev)?;
                    }
                    predict_run(&run, data, Subset::Valid, m.tta, &v, device, rt)?;
                    predict_run(&run, data, Subset::Test, m.tta, &t, device, rt)
                })?;
                pseudo_valid.push(v);
                pseudo_test.push(t);
            }
        }
    }

    // The final answer: (blend + mean of the pseudo-label models) / 2, as the reference.
    let fdir = layout.final_dir();
    let (fv, ft) = (fdir.join("valid.parquet"), fdir.join("test.parquet"));
    let submission = layout.root.join("submission.csv");
    if pseudo_on {
        chain.step("final mix", &[fv.clone(), ft.clone()], |_| {
            let n = pseudo_valid.len() as f64;
            let w: Vec<f64> = std::iter::once(1.0 - cfg.pseudo.weight)
                .chain(std::iter::repeat_n(
                    cfg.pseudo.weight / n,
                    pseudo_valid.len(),
                ))
                .collect();
            average(
                &std::iter::once(bv.clone())
                    .chain(pseudo_valid.iter().cloned())
                    .collect::<Vec<_>>(),
                &w,
                &fv,
                "final",
            )?;
            average(
                &std::iter::once(bt.clone())
                    .chain(pseudo_test.iter().cloned())
                    .collect::<Vec<_>>(),
                &w,
                &ft,
                "final",
            )
        })?;
    }
    let (final_valid, final_test) = if pseudo_on {
        (fv, ft)
    } else {
        (bv.clone(), bt.clone())
    };
    if has_test {
        chain.step("submission", std::slice::from_ref(&submission), |_| {
            write_submission(&final_test, &ds, &submission)
        })?;
    }

    // The report: the score after every stage.
    let mut stages = Vec::new();
    let single: Vec<(usize, Scores)> = cfg
        .members
        .iter()
        .enumerate()
        .filter_map(|(k, m)| {
            scores_of(&layout.member(&m.name).join("valid-single.parquet"), data).map(|s| (k, s))
        })
        .collect();
    let best = single
        .iter()
        .min_by(|a, b| a.1.log_loss.total_cmp(&b.1.log_loss))
        .map(|(k, _)| *k)
        .unwrap_or(0);
    let bm = &cfg.members[best];
    let bdir_m = layout.member(&bm.name);
    stages.push(StageScore {
        stage: "single network".into(),
        source: format!("{}: one pass", bm.name),
        valid: scores_of(&bdir_m.join("valid-single.parquet"), data),
        test: scores_of(&bdir_m.join("test-single.parquet"), data),
        note: "the member with the lowest one-pass validation loss".into(),
    });
    stages.push(StageScore {
        stage: "+ TTA".into(),
        source: format!("{}: TTA", bm.name),
        valid: scores_of(&bdir_m.join("valid.parquet"), data),
        test: scores_of(&bdir_m.join("test-main.parquet"), data),
        note: String::new(),
    });
    if bm.bagging > 0 {
        stages.push(StageScore {
            stage: "+ bagging".into(),
            source: format!("{}: {} models averaged", bm.name, bm.bagging + 1),
            valid: None,
            test: scores_of(&bdir_m.join("test.parquet"), data),
            note: "bags validate on different images: test only".into(),
        });
    }
    if fuse_on {
        stages.push(StageScore {
            stage: "+ fusion".into(),
            source: format!("{}: fused with {}", bm.name, cfg.fuse.sets.join("+")),
            valid: scores_of(&bdir_m.join("valid-fused.parquet"), data),
            test: scores_of(&bdir_m.join("test-fused.parquet"), data),
            note: format!(
                "validation out-of-fold ({} folds); {}",
                cfg.fuse.folds,
                fuse_notes.join("; ")
            ),
        });
    }
    let report: Option<blend::job::BlendReport> = std::fs::read_to_string(&breport)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let blend_weights: Vec<(String, f64)> = report
        .as_ref()
        .map(|r| {
            r.members
                .iter()
                .zip(&cfg.members)
                .map(|(rm, m)| (m.name.clone(), rm.weight))
                .collect()
        })
        .unwrap_or_default();
    let cv_note = report
        .as_ref()
        .and_then(|r| r.selection.as_ref())
        .and_then(|s| {
            s.steps
                .iter()
                .map(|st| st.cv_log_loss)
                .min_by(f64::total_cmp)
        })
        .map(|cv| {
            format!("validation is in-sample (weights fitted on it); cross-validated: {cv:.4}")
        })
        .unwrap_or_else(|| "validation is in-sample (weights fitted on it)".into());
    stages.push(StageScore {
        stage: "+ blend".into(),
        source: format!(
            "{} members",
            blend_weights.iter().filter(|(_, w)| *w > 0.0).count()
        ),
        valid: scores_of(&bv, data),
        test: scores_of(&bt, data),
        note: cv_note,
    });
    if pseudo_on {
        stages.push(StageScore {
            stage: "+ pseudo-labels".into(),
            source: format!(
                "(blend + mean of {} pseudo-label models) / 2",
                pseudo_valid.len()
            ),
            valid: scores_of(&final_valid, data),
            test: scores_of(&final_test, data),
            note: String::new(),
        });
    }
    let report = ReplayReport {
        name: cfg.name.clone(),
        stages,
        blend_weights,
        submission: submission.exists().then_some(submission),
        steps_run: chain.ran,
        steps_skipped: chain.skipped,
    };
    write_report(&layout.root, &report)?;
    Ok(report)
}

/// (before, after) validation log loss of a fusion fit, from its report.
fn fusion_gain(fused_valid: &Path) -> Option<(f64, f64)> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fused_valid.with_extension("json")).ok()?)
            .ok()?;
    Some((
        v["before"]["log_loss"].as_f64()?,
        v["after"]["log_loss"].as_f64()?,
    ))
}

/// Fuses one member with the image features: fitted out-of-fold on its validation
/// predictions (what the blend is then fitted on), applied to its test predictions.
#[allow(clippy::too_many_arguments)]
fn fuse_member(
    cfg: &ReplayConfig,
    valid: &Path,
    test: Option<&PathBuf>,
    features: &Path,
    data: &Path,
    valid_out: &Path,
    test_out: &Path,
    model: &Path,
) -> Result<(), ReplayError> {
    use crate::fusion::job as fusion;
    let err = |e: crate::fusion::FusionError| step_err("fuse")(e.to_string());
    let mut fo = fusion::FitOptions::new(valid, features, valid_out, model);
    fo.data = vec![data.to_path_buf()];
    fo.sets = crate::fusion::SetSpec::parse_list(&cfg.fuse.sets.join(",")).map_err(err)?;
    fo.repeats = cfg.fuse.repeats;
    fo.folds = cfg.fuse.folds;
    fo.seed = cfg.seed;
    fo.report = Some(valid_out.with_extension("json"));
    let s = fusion::fit(&fo, &|_, _| {}).map_err(err)?;
    tracing::info!(
        predictions = %valid.display(),
        before = s.before.as_ref().map(|b| b.log_loss),
        after_out_of_fold = s.after.as_ref().map(|a| a.log_loss),
        "fused"
    );
    if let Some(t) = test {
        let mut ao = fusion::ApplyOptions::new(model, t, features, test_out);
        ao.data = vec![data.to_path_buf()];
        ao.report = Some(test_out.with_extension("json"));
        fusion::apply(&ao).map_err(err)?;
    }
    Ok(())
}

fn write_submission(predictions: &Path, ds: &Dataset, out: &Path) -> Result<(), ReplayError> {
    let p = Predictions::read(predictions).map_err(|e| step_err("submission")(e.to_string()))?;
    let sample = ds.root.join("sampleSubmission.csv");
    let (columns, from) = if sample.exists() {
        (
            crate::sources::dataset::read_submission_classes(&sample)
                .map_err(|e| step_err("submission")(e.to_string()))?,
            sample,
        )
    } else {
        (p.class_names.clone(), predictions.to_path_buf())
    };
    // Unreadable images get the training class frequencies (add-one), as `plankton predict`.
    let mut prior = vec![1.0f64; p.class_names.len()];
    for r in &ds.train {
        if let Some(i) = r.label.and_then(|l| {
            p.class_names
                .iter()
                .position(|c| c == &ds.class_names[l as usize])
        }) {
            prior[i] += 1.0;
        }
    }
    let total: f64 = prior.iter().sum();
    prior.iter_mut().for_each(|v| *v /= total);
    let rows: Vec<crate::sinks::submission::SubmissionRow> = p
        .rows
        .iter()
        .map(|r| crate::sinks::submission::SubmissionRow {
            image_id: &r.image_id,
            probabilities: r.probabilities.as_deref(),
        })
        .collect();
    crate::sinks::submission::write_submission(out, &p.class_names, &columns, &from, &rows, &prior)
        .map_err(|e| step_err("submission")(e.to_string()))?;
    Ok(())
}

fn fmt_scores(s: &Option<Scores>) -> (String, String) {
    match s {
        Some(s) => (format!("{:.4}", s.log_loss), format!("{:.3}", s.top1)),
        None => ("-".into(), "-".into()),
    }
}

fn write_report(root: &Path, report: &ReplayReport) -> Result<(), ReplayError> {
    let json = serde_json::to_string_pretty(report).expect("serialisable");
    crate::train::run_dir::write_atomic(&root.join("report.json"), json.as_bytes())
        .map_err(|e| step_err("report")(e.to_string()))?;
    let mut md = format!("# Replay `{}`\n\n| stage | predictions | valid log loss | valid top-1 | test log loss | test top-1 | note |\n|---|---|---|---|---|---|---|\n", report.name);
    for s in &report.stages {
        let (vl, va) = fmt_scores(&s.valid);
        let (tl, ta) = fmt_scores(&s.test);
        md.push_str(&format!(
            "| {} | {} | {vl} | {va} | {tl} | {ta} | {} |\n",
            s.stage, s.source, s.note
        ));
    }
    if !report.blend_weights.is_empty() {
        md.push_str("\nBlend weights: ");
        md.push_str(
            &report
                .blend_weights
                .iter()
                .map(|(n, w)| format!("{n} {w:.3}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
        md.push('\n');
    }
    crate::train::run_dir::write_atomic(&root.join("report.md"), md.as_bytes())
        .map_err(|e| step_err("report")(e.to_string()))?;
    if let Err(e) = render_stages(&root.join("report.png"), report) {
        // A picture is not worth failing a finished replay for.
        tracing::warn!(error = %e, "report.png not drawn");
    }
    Ok(())
}

/// Log loss after each stage as bars: validation (blue) beside test (red), stage k at x = k.
fn render_stages(path: &Path, report: &ReplayReport) -> Result<(), crate::sinks::plot::PlotError> {
    use crate::sinks::plot::{render_charts, Bars, Chart, LineChart};
    let bars =
        |pick: fn(&StageScore) -> &Option<Scores>, from: f64, to: f64| -> Vec<(f64, f64, f64)> {
            report
                .stages
                .iter()
                .enumerate()
                .filter_map(|(k, s)| {
                    pick(s)
                        .as_ref()
                        .map(|sc| (k as f64 + 1.0 + from, k as f64 + 1.0 + to, sc.log_loss))
                })
                .collect()
        };
    let names: Vec<String> = report
        .stages
        .iter()
        .enumerate()
        .map(|(k, s)| format!("{} {}", k + 1, s.stage.trim_start_matches("+ ")))
        .collect();
    let chart = Chart {
        lines: LineChart {
            title: format!("replay {}: log loss after each stage", report.name),
            x_label: format!("stage: {}", names.join(", ")),
            y_label: "log loss".into(),
            series: Vec::new(),
            log_y: false,
            y_range: None,
        },
        bars: vec![
            Bars {
                name: "validation".into(),
                bars: bars(|s| &s.valid, -0.4, 0.0),
                colour: (31, 119, 180),
            },
            Bars {
                name: "test".into(),
                bars: bars(|s| &s.test, 0.0, 0.4),
                colour: (214, 39, 40),
            },
        ],
    };
    render_charts(path, &[chart], 900, 480)
}
