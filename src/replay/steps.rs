//! What each step of the plan does.

use std::path::{Path, PathBuf};

use tch::Device;

use super::plan::{Action, Mean, Plan, Step};
use super::{ReplayError, ReplayEvent, StepFailure};
use crate::blend;
use crate::config::PipelineConfig;
use crate::predict::job::{self as predict, PredictOptions, Subset};
use crate::sinks::parquet::Predictions;
use crate::train::{self, RunDir, TrainOptions};

/// The prediction files the blend reads, and why: a member's fused predictions replace its own
/// when fusion is on (and, with `only_if_better`, lowered the out-of-fold loss).
pub(super) struct BlendInputs {
    pub valid: Vec<PathBuf>,
    pub test: Vec<PathBuf>,
    /// One line per fused member for the report.
    pub fuse_notes: Vec<String>,
}

impl BlendInputs {
    /// Written beside the blend's outputs: other inputs make them stale.
    pub fn signature(&self) -> String {
        self.valid
            .iter()
            .chain(&self.test)
            .map(|p| format!("{}\n", p.display()))
            .collect()
    }
}

/// (before, after) validation log loss of a fusion fit, from its report.
pub(super) fn fusion_gain(fused_valid: &Path) -> Option<(f64, f64)> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fused_valid.with_extension("json")).ok()?)
            .ok()?;
    Some((
        v["before"]["log_loss"].as_f64()?,
        v["after"]["log_loss"].as_f64()?,
    ))
}

impl Plan {
    pub(super) fn blend_inputs(&self) -> BlendInputs {
        let mut inputs = BlendInputs {
            valid: Vec::new(),
            test: Vec::new(),
            fuse_notes: Vec::new(),
        };
        for m in &self.cfg.members {
            let dir = self.layout.member(&m.name);
            let (mut v, mut t) = (dir.join("valid.parquet"), self.layout.member_test(m));
            if self.fuse_on {
                let fv = dir.join("valid-fused.parquet");
                let gain = fusion_gain(&fv);
                let keep = !self.cfg.fuse.only_if_better
                    || gain.is_some_and(|(before, after)| after < before);
                inputs.fuse_notes.push(match gain {
                    Some((b, a)) => format!(
                        "{}: {b:.3} -> {a:.3} out-of-fold, {}",
                        m.name,
                        if keep { "blended" } else { "not blended" }
                    ),
                    None => format!("{}: no fusion report", m.name),
                });
                if keep {
                    (v, t) = (fv, dir.join("test-fused.parquet"));
                }
            }
            inputs.valid.push(v);
            inputs.test.push(t);
        }
        inputs
    }

    /// A member's pipeline as trained for one bag (bag 0: the member itself).
    pub(super) fn bag_pipeline(&self, member: usize, bag: usize) -> PipelineConfig {
        let mut c = self.pipelines[member].clone();
        if bag > 0 {
            c.seed = crate::rng::mix64(c.seed ^ bag as u64);
        }
        c
    }

    pub(super) fn perform(
        &self,
        step: &Step,
        device: Device,
        rt: &tokio::runtime::Handle,
        on_event: &mut dyn FnMut(ReplayEvent),
    ) -> Result<(), StepFailure> {
        let (cfg, layout, data) = (&self.cfg, &self.layout, self.data.as_path());
        match &step.action {
            Action::Split => {
                let dir = layout.split().parent().expect("split/").to_path_buf();
                std::fs::create_dir_all(&dir).map_err(ReplayError::io(&dir))?;
                let max_bags = cfg.members.iter().map(|m| m.bagging).max().unwrap_or(0);
                crate::split::write_split_files(
                    &self.ds,
                    &layout.split(),
                    cfg.valid_fraction,
                    cfg.seed,
                    max_bags,
                )?;
            }
            Action::Train { member, bag } => {
                let name = &cfg.members[*member].name;
                let label = match bag {
                    0 => name.clone(),
                    b => format!("{name} bag {b}"),
                };
                train_member(
                    &label,
                    self.stop.clone(),
                    &self.bag_pipeline(*member, *bag),
                    data,
                    &layout.bag_split(*bag),
                    &layout.member_run(name, *bag),
                    device,
                    rt,
                    on_event,
                )?;
            }
            Action::Predict {
                member,
                bag,
                subset,
                tta,
                out,
            } => {
                let run = layout.member_run(&cfg.members[*member].name, *bag);
                predict_run(&run, data, *subset, *tta, out, device, rt)?;
            }
            Action::Average(means) => {
                for m in means {
                    average(m)?;
                }
            }
            Action::Features => {
                let fo = crate::features::job::FeaturesOptions {
                    data: vec![data.to_path_buf()],
                    out: layout.features(),
                    sets: crate::features::job::FeatureSet::parse_list(
                        &cfg.features.sets.join(","),
                    )?,
                    threads: 0,
                    decode: self.pipelines[0].decode,
                };
                crate::features::job::run(&fo, |_, _| {})?;
            }
            Action::Fuse { member } => self.fuse_member(*member)?,
            Action::Blend => self.blend()?,
            Action::Pseudo { member, shard } => {
                self.pseudo_member(*member, *shard, device, rt, on_event)?
            }
            Action::Submission { predictions } => {
                write_submission(predictions, &self.ds, &layout.submission())?
            }
        }
        Ok(())
    }

    /// Fuses one member with the image features: fitted out-of-fold on its validation
    /// predictions (what the blend is then fitted on), applied to its test predictions.
    fn fuse_member(&self, member: usize) -> Result<(), crate::fusion::FusionError> {
        use crate::fusion::job as fusion;
        let m = &self.cfg.members[member];
        let dir = self.layout.member(&m.name);
        let (valid, valid_out, test_out, model) = (
            dir.join("valid.parquet"),
            dir.join("valid-fused.parquet"),
            dir.join("test-fused.parquet"),
            dir.join("fusion"),
        );
        let features = self.layout.features();
        let mut fo = fusion::FitOptions::new(&valid, &features, &valid_out, &model);
        fo.data = vec![self.data.clone()];
        fo.sets = crate::fusion::SetSpec::parse_list(&self.cfg.fuse.sets.join(","))?;
        fo.repeats = self.cfg.fuse.repeats;
        fo.folds = self.cfg.fuse.folds;
        fo.seed = self.cfg.seed;
        fo.report = Some(valid_out.with_extension("json"));
        let s = fusion::fit(&fo, &|_, _| {})?;
        tracing::info!(
            predictions = %valid.display(),
            before = s.before.as_ref().map(|b| b.log_loss),
            after_out_of_fold = s.after.as_ref().map(|a| a.log_loss),
            "fused"
        );
        if self.has_test {
            let mut ao = fusion::ApplyOptions::new(
                &model,
                &self.layout.member_test(m),
                &features,
                &test_out,
            );
            ao.data = vec![self.data.clone()];
            ao.report = Some(test_out.with_extension("json"));
            fusion::apply(&ao)?;
        }
        Ok(())
    }

    /// Blend weights fitted on the members' validation predictions, applied to their test ones.
    fn blend(&self) -> Result<(), StepFailure> {
        let inputs = self.blend_inputs();
        let bdir = self.layout.blend();
        let weights = bdir.join("weights.json");
        let mut fo = blend::job::FitOptions::new(
            inputs.valid.clone(),
            vec![self.data.clone()],
            &self.layout.blend_valid(),
        );
        fo.weights_out = Some(weights.clone());
        fo.report = Some(bdir.join("report.json"));
        fo.select = if self.cfg.blend.select == "all" {
            blend::select::Select::All
        } else {
            blend::select::Select::Cv
        };
        if self.cfg.blend.uniform {
            fo.weighting = blend::select::Weighting::Uniform;
        }
        fo.folds = self.cfg.blend.folds;
        blend::job::fit(&fo)?;
        if self.has_test {
            let mut ao = blend::job::ApplyOptions::new(
                &weights,
                inputs.test.clone(),
                &self.layout.blend_test(),
            );
            ao.allow_other_models = true;
            blend::job::apply(&ao)?;
        }
        let signature = bdir.join("inputs.txt");
        crate::fsx::write_atomic(&signature, inputs.signature().as_bytes())?;
        Ok(())
    }

    /// One pseudo-label model: the member retrained with the blend's soft test targets (one
    /// shard of them), then its validation and test predictions.
    fn pseudo_member(
        &self,
        member: usize,
        shard: usize,
        device: Device,
        rt: &tokio::runtime::Handle,
        on_event: &mut dyn FnMut(ReplayEvent),
    ) -> Result<(), StepFailure> {
        let (cfg, m) = (&self.cfg, &self.cfg.members[member]);
        let tag = format!("{}-shard{shard}", m.name);
        let pdir = self.layout.pseudo();
        let run = pdir.join(&tag);
        let (v, t) = self.pseudo_outputs(&m.name, shard);
        let targets_file = self.layout.blend_test();
        let mut c = self.pipelines[member].clone();
        c.seed = crate::rng::mix64(c.seed ^ (0x1000 + shard as u64));
        c.pseudo = crate::train::pseudo::PseudoConfig {
            predictions: Some(
                std::path::absolute(&targets_file).map_err(ReplayError::io(&targets_file))?,
            ),
            fraction: cfg.pseudo.fraction,
            shards: cfg.pseudo.shards,
            shard: if cfg.pseudo.shards > 1 { shard } else { 0 },
            shard_seed: cfg.seed,
        };
        c.train.dropout = cfg.pseudo.dropout;
        // A model trained on other soft targets (the blend changed) is stale.
        let targets = std::fs::read(&targets_file).map_err(ReplayError::io(&targets_file))?;
        let targets = format!("{:016x}\n", crate::rng::fnv1a64(&targets));
        let stamp = pdir.join(format!("{tag}.targets"));
        if run.exists() && std::fs::read_to_string(&stamp).ok().as_deref() != Some(targets.as_str())
        {
            tracing::info!(run = %run.display(), "the blend's targets changed: retraining");
            std::fs::remove_dir_all(&run).map_err(ReplayError::io(&run))?;
        }
        std::fs::create_dir_all(&pdir).map_err(ReplayError::io(&pdir))?;
        crate::fsx::write_atomic(&stamp, targets.as_bytes())?;
        if !RunDir::new(&run).final_weights().exists() {
            train_member(
                &tag,
                self.stop.clone(),
                &c,
                &self.data,
                &self.layout.split(),
                &run,
                device,
                rt,
                on_event,
            )?;
        }
        predict_run(&run, &self.data, Subset::Valid, m.tta, &v, device, rt)?;
        predict_run(&run, &self.data, Subset::Test, m.tta, &t, device, rt)?;
        Ok(())
    }
}

/// Trains one network of the chain (resuming a half-trained one).
#[allow(clippy::too_many_arguments)]
fn train_member(
    name: &str,
    stop: Option<tokio_util::sync::CancellationToken>,
    cfg: &PipelineConfig,
    data: &Path,
    split: &Path,
    run: &Path,
    device: Device,
    rt: &tokio::runtime::Handle,
    on_event: &mut dyn FnMut(ReplayEvent),
) -> Result<(), train::TrainError> {
    let rd = RunDir::new(run);
    let resume = rd.checkpoints().exists() || rd.history().exists();
    let opts = TrainOptions {
        config: cfg.clone(),
        data: data.to_path_buf(),
        out: run.to_path_buf(),
        resume,
        device,
        split_file: Some(split.to_path_buf()),
        init_from: None,
        stop,
    };
    let summary = train::run(&opts, rt, &mut |event| {
        on_event(ReplayEvent::Train {
            name: name.to_string(),
            event,
        })
    })?;
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
) -> Result<(), predict::PredictError> {
    let mut opts = PredictOptions::new(run, vec![data.to_path_buf()], out);
    opts.subset = subset;
    opts.tta = tta;
    opts.device = device;
    // The final weights: `best` was chosen on the very validation images the later stages
    // are fitted and scored on.
    opts.weights = predict::Weights::Final;
    opts.calibrate = false;
    predict::run(&opts, rt, &mut |_| {})?;
    Ok(())
}

/// Weighted mean of prediction files row by row (bags, the final mix), through the blend's
/// apply with fixed weights.
fn average(mean: &Mean) -> Result<(), StepFailure> {
    let first = Predictions::read(&mean.inputs[0])?;
    let wf = blend::job::WeightsFile {
        format: blend::job::WEIGHTS_FORMAT.to_string(),
        model_id: mean.model_id.clone(),
        class_names: first.class_names.clone(),
        members: mean
            .inputs
            .iter()
            .zip(&mean.weights)
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
    if let Some(dir) = mean.out.parent() {
        std::fs::create_dir_all(dir).map_err(ReplayError::io(dir))?;
    }
    let weights_path = mean.out.with_extension("weights.json");
    let text = serde_json::to_string_pretty(&wf).expect("serialisable");
    crate::fsx::write_atomic(&weights_path, text.as_bytes())?;
    let mut opts = blend::job::ApplyOptions::new(&weights_path, mean.inputs.clone(), &mean.out);
    opts.allow_other_models = true;
    blend::job::apply(&opts)?;
    Ok(())
}

fn write_submission(
    predictions: &Path,
    ds: &crate::sources::Dataset,
    out: &Path,
) -> Result<(), StepFailure> {
    let p = Predictions::read(predictions)?;
    let sample = ds.root.join("sampleSubmission.csv");
    let (columns, from) = if sample.exists() {
        (
            crate::sources::dataset::read_submission_classes(&sample)?,
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
    crate::sinks::submission::write_submission(
        out,
        &p.class_names,
        &columns,
        &from,
        &rows,
        &prior,
    )?;
    Ok(())
}
