//! What a run needs before its first step: the dataset, the run's own pipeline (fresh or
//! resumed), its classes, split and ZMUV statistics, and the network with its optimiser,
//! restored from the latest checkpoint on resume.

use std::path::Path;
use std::sync::Arc;

use super::{patch_sizes, pseudo, run_dir, Optimizer, RunDir, TrainError, TrainOptions};
use super::{HistoryRow, TrainState};
use crate::config::PipelineConfig;
use crate::model::Network;
use crate::rng::mix64;
use crate::sources::{Dataset, ImageRecord};
use crate::split::Split;
use crate::stages::normalise::{Zmuv, ZmuvStats};
use crate::telemetry;

/// Everything a run needs before its first step.
pub(super) struct Prepared {
    pub cfg: PipelineConfig,
    pub train: Arc<Vec<ImageRecord>>,
    pub valid: Arc<Vec<ImageRecord>>,
    pub zmuv: Vec<Zmuv>,
    pub net: Network,
    pub optimizer: Optimizer,
    pub state: TrainState,
    pub history: Vec<HistoryRow>,
    pub pseudo: Option<pseudo::PseudoSet>,
}

pub(super) fn prepare(
    opts: &TrainOptions,
    run: &RunDir,
    rt: &tokio::runtime::Handle,
) -> Result<Prepared, TrainError> {
    crate::device::ensure(opts.device)?;
    let ds = open_dataset(opts)?;
    let checkpoint = if opts.resume {
        run.latest_checkpoint()?
    } else {
        None
    };
    let cfg = if opts.resume {
        resumed_config(opts, run, checkpoint.as_deref())?
    } else {
        refuse_existing_run(run)?;
        opts.config.clone()
    };
    cfg.train.validate().map_err(|e| {
        let source = match opts.resume {
            true => run.pipeline().display().to_string(),
            false => format!("pipeline `{}`", cfg.name),
        };
        TrainError::Config(format!("{source}: {e}"))
    })?;
    let sizes = patch_sizes(&cfg)?;
    if opts.resume {
        // First: another dataset would otherwise fail on a split line, less clearly.
        check_classes(run, &ds)?;
    }
    if let (false, Some(from)) = (opts.resume, &opts.init_from) {
        // Checked before anything is written: an earlier run whose network does not fit leaves
        // no half-made run behind (on a throwaway CPU network; the real one is seeded below).
        let mut probe = Network::new(&cfg.model, &sizes, ds.class_names.len(), tch::Device::Cpu)?;
        carry_weights(from, &ds, &mut probe)?;
        let zmuv = RunDir::new(from).zmuv();
        if !zmuv.is_file() {
            return Err(TrainError::Config(format!(
                "--init-from {}: no zmuv.json: not a trained run",
                from.display()
            )));
        }
    }
    let split = run_split(opts, run, &ds, &cfg)?;
    let pseudo = pseudo::load(&cfg.pseudo, &ds)?;
    if !opts.resume {
        // Written only now: a bad --steps or --split leaves no half-made run behind.
        std::fs::create_dir_all(&run.root).map_err(|e| TrainError::io(&run.root, e))?;
        write_pipeline(run, &cfg)?;
        run_dir::write_atomic(&run.classes(), class_list(&ds).as_bytes())?;
        split.save(&ds, &run.split())?;
    }
    let train = subset(&ds, &split.train);
    let valid = subset(&ds, &split.valid);
    if let Some(p) = &pseudo {
        tracing::info!(
            images = p.len(),
            failed_rows = p.failed_rows,
            labelled_rows = p.labelled_rows,
            other_shards = p.other_shards,
            fraction = cfg.pseudo.fraction,
            "pseudo-labelled images"
        );
    }
    let zmuv = run_zmuv(opts, run, &cfg, &train, rt)?;

    tch::manual_seed(mix64(cfg.seed) as i64);
    let mut net = Network::new(&cfg.model, &sizes, ds.class_names.len(), opts.device)?;
    net.set_compute(&cfg.compute);
    crate::device::apply_globals(&cfg.compute, opts.device);
    let mut optimizer = Optimizer::new(&cfg.train, &net.params);
    let (state, history) = match checkpoint {
        Some(dir) => restore(run, &cfg, &dir, &mut net, &mut optimizer)?,
        None => {
            // A fine-tuning run stopped before its first checkpoint starts again from the
            // earlier run it names (init_from.json), not from random weights.
            let recorded = std::fs::read_to_string(run.root.join("init_from.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|v| v["run"].as_str().map(std::path::PathBuf::from));
            match (&opts.init_from, opts.resume, recorded) {
                (Some(from), false, _) => init_from(run, from, &ds, &mut net)?,
                (_, true, Some(from)) => init_from(run, &from, &ds, &mut net)?,
                _ if opts.resume => {
                    tracing::warn!(run = %run.root.display(), "no checkpoint yet: starting from step 0")
                }
                _ => {}
            }
            (TrainState::default(), Vec::new())
        }
    };
    Ok(Prepared {
        cfg,
        train,
        valid,
        zmuv,
        net,
        optimizer,
        state,
        history,
        pseudo,
    })
}

fn open_dataset(opts: &TrainOptions) -> Result<Dataset, TrainError> {
    let ds = Dataset::open(&opts.data)?;
    for p in &ds.problems {
        tracing::warn!(path = %p.path.display(), reason = %p.reason, "layout problem: skipped");
        metrics::counter!(telemetry::LAYOUT_PROBLEMS).increment(1);
    }
    if ds.train.is_empty() {
        return Err(TrainError::Config(format!(
            "{}: no labelled training images (train/<class>/..., or for IFCB bins labels.csv `pid,class` / validated ecotaxa*.tsv objects)",
            opts.data.display()
        )));
    }
    Ok(ds)
}

/// A new run goes into a folder that holds none yet.
fn refuse_existing_run(run: &RunDir) -> Result<(), TrainError> {
    if run.checkpoints().exists() || run.history().exists() {
        return Err(TrainError::Config(format!(
            "{}: already holds a run; pass --resume to continue it or choose another --out",
            run.root.display()
        )));
    }
    Ok(())
}

/// A resumed run keeps its own pipeline. The one change a resume takes is the length of the
/// run (`--steps`): everything else stays the run's own, so the resumed run is the same run.
fn resumed_config(
    opts: &TrainOptions,
    run: &RunDir,
    checkpoint: Option<&Path>,
) -> Result<PipelineConfig, TrainError> {
    let path = run.pipeline();
    let mut cfg = PipelineConfig::load(&path).map_err(|e| TrainError::Config(e.to_string()))?;
    let wanted_steps = opts.config.train.steps;
    let mut other_length = cfg.clone();
    other_length.train.steps = wanted_steps;
    if other_length != opts.config {
        tracing::warn!(run = %path.display(), "resuming with the run's own pipeline.toml (it differs from --pipeline)");
        return Ok(cfg);
    }
    if cfg.train.steps == wanted_steps {
        return Ok(cfg);
    }
    let at = match checkpoint {
        Some(dir) => RunDir::load_state(dir)?.step,
        None => 0,
    };
    if wanted_steps < at {
        return Err(TrainError::Config(format!(
            "--steps {wanted_steps} is below the checkpoint's step {at} in {}: a run cannot be shortened past where it is",
            run.root.display()
        )));
    }
    tracing::info!(
        from = cfg.train.steps,
        to = wanted_steps,
        "resuming with a new train.steps"
    );
    cfg.train.steps = wanted_steps;
    write_pipeline(run, &cfg)?;
    Ok(cfg)
}

fn write_pipeline(run: &RunDir, cfg: &PipelineConfig) -> Result<(), TrainError> {
    let text = toml::to_string_pretty(cfg).map_err(|e| TrainError::Config(e.to_string()))?;
    run_dir::write_atomic(&run.pipeline(), text.as_bytes())?;
    Ok(())
}

/// A new run starts from an earlier run's weights; what was carried over is kept in the run
/// (`init_from.json`) and logged.
fn init_from(run: &RunDir, from: &Path, ds: &Dataset, net: &mut Network) -> Result<(), TrainError> {
    let (weights, carried) = carry_weights(from, ds, net)?;
    if carried.kept.is_empty() {
        tracing::warn!(from = %from.display(), "no class in common with the earlier run: only its features carry over");
    }
    tracing::info!(
        from = %weights.display(),
        kept = carried.kept.len(),
        added = ?carried.added,
        dropped = ?carried.dropped,
        "fine-tuning from an earlier run"
    );
    let record = serde_json::json!({
        "run": from.display().to_string(),
        "weights": weights.display().to_string(),
        "kept": carried.kept,
        "added": carried.added,
        "dropped": carried.dropped,
    });
    run_dir::write_atomic(
        &run.root.join("init_from.json"),
        serde_json::to_string_pretty(&record)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    Ok(())
}

/// Copies an earlier run's weights into `net` (see `Network::init_from`).
fn carry_weights(
    from: &Path,
    ds: &Dataset,
    net: &mut Network,
) -> Result<(std::path::PathBuf, crate::model::network::InitFrom), TrainError> {
    let earlier = RunDir::new(from);
    let weights = [earlier.best_weights(), earlier.final_weights()]
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| {
            TrainError::Config(format!(
                "--init-from {}: no weights (best.safetensors or model.safetensors): not a trained run",
                from.display()
            ))
        })?;
    let classes: Vec<String> = std::fs::read_to_string(earlier.classes())
        .map_err(|e| TrainError::io(&earlier.classes(), e))?
        .lines()
        .map(str::to_string)
        .filter(|c| !c.is_empty())
        .collect();
    let carried = net
        .init_from(&weights, &classes, &ds.class_names)
        .map_err(|e| TrainError::Config(format!("--init-from {}: {e}", from.display())))?;
    Ok((weights, carried))
}

fn class_list(ds: &Dataset) -> String {
    ds.class_names.join("\n") + "\n"
}

/// A resumed run's dataset must have the run's classes.
fn check_classes(run: &RunDir, ds: &Dataset) -> Result<(), TrainError> {
    let stored =
        std::fs::read_to_string(run.classes()).map_err(|e| TrainError::io(&run.classes(), e))?;
    if stored != class_list(ds) {
        return Err(TrainError::Config(format!(
            "{}: the dataset's classes differ from the run's",
            run.classes().display()
        )));
    }
    Ok(())
}

/// The run's split: its own on resume, else the `--split` file's or a fresh stratified one.
fn run_split(
    opts: &TrainOptions,
    run: &RunDir,
    ds: &Dataset,
    cfg: &PipelineConfig,
) -> Result<Split, TrainError> {
    let split = match &opts.split_file {
        _ if opts.resume => Split::load(ds, &run.split())?,
        Some(f) => Split::load(ds, f)?,
        None => {
            let labels: Vec<u32> = ds
                .train
                .iter()
                .map(|r| r.label.unwrap_or(u32::MAX))
                .collect();
            crate::split::stratified(&labels, cfg.split.valid_fraction, cfg.seed, 0)?
        }
    };
    if split.train.is_empty() {
        return Err(TrainError::Config(
            "the split leaves no training images".into(),
        ));
    }
    Ok(split)
}

/// ZMUV statistics: the run's own on resume, else estimated on the training images.
fn run_zmuv(
    opts: &TrainOptions,
    run: &RunDir,
    cfg: &PipelineConfig,
    train: &Arc<Vec<ImageRecord>>,
    rt: &tokio::runtime::Handle,
) -> Result<Vec<Zmuv>, TrainError> {
    let zmuv = if opts.resume {
        ZmuvStats::load(&run.zmuv())?
    } else if let Some(from) = &opts.init_from {
        // The earlier run's weights expect its input statistics: re-estimating them on the new
        // data would feed the carried-over layers inputs on another scale.
        let stats = ZmuvStats::load(&RunDir::new(from).zmuv())?;
        stats.save(&run.zmuv())?;
        stats
    } else {
        let (stats, _) = rt.block_on(crate::data_path::estimate_zmuv(cfg, train.clone()))?;
        stats.save(&run.zmuv())?;
        stats
    };
    if zmuv.inputs.len() != cfg.patches.len() {
        return Err(TrainError::Config(format!(
            "{}: {} inputs, the pipeline has {}",
            run.zmuv().display(),
            zmuv.inputs.len(),
            cfg.patches.len()
        )));
    }
    Ok(zmuv.inputs)
}

/// Loads a checkpoint's weights, optimiser state and history into a fresh network.
fn restore(
    run: &RunDir,
    cfg: &PipelineConfig,
    dir: &Path,
    net: &mut Network,
    optimizer: &mut Optimizer,
) -> Result<(TrainState, Vec<HistoryRow>), TrainError> {
    let state = RunDir::load_state(dir)?;
    if state.step > cfg.train.steps {
        return Err(TrainError::Config(format!(
            "{}: train.steps {} is below the checkpoint's step {}: a run cannot be shortened past where it is",
            run.pipeline().display(),
            cfg.train.steps,
            state.step
        )));
    }
    net.load(&dir.join("model.safetensors"))?;
    optimizer.load(
        &net.params,
        &dir.join("optimizer.safetensors"),
        state.optimizer_updates,
    )?;
    let history = run_dir::read_history(&dir.join("history.csv"))?;
    tracing::info!(checkpoint = %dir.display(), step = state.step, "resuming");
    Ok((state, history))
}

fn subset(ds: &Dataset, idx: &[usize]) -> Arc<Vec<ImageRecord>> {
    Arc::new(idx.iter().map(|&i| ds.train[i].clone()).collect())
}
