//! `plankton model`: a network's layers and costs, or its rotation invariance.

use super::prelude::*;

#[derive(Args)]
pub struct ModelArgs {
    #[command(flatten)]
    pipeline: PipelineArg,
    /// Number of classes (121 in the competition).
    #[arg(long, default_value_t = 121)]
    classes: usize,
    /// Build the network here (auto, cpu, cuda, cuda:N).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Check the cyclic network's 90-degree invariance on random inputs (on --device) and print
    /// the largest relative difference of the logits; exits 1 if it exceeds 1e-4.
    #[arg(long)]
    check_invariance: bool,
    /// Also write the invariance check as JSON.
    #[arg(long, requires = "check_invariance")]
    json: Option<PathBuf>,
}

pub fn run(a: ModelArgs) -> Result<()> {
    let cfg = a.pipeline.load()?;
    let device = parse_device(&a.device)?;
    let sizes = plankton::train::patch_sizes(&cfg)?;
    let mut net = plankton::model::Network::new(&cfg.model, &sizes, a.classes, device)?;
    if !a.check_invariance {
        print!("{}", net.describe());
        return Ok(());
    }
    // As the pipeline computes: its [compute] precision and layout.
    net.set_compute(&cfg.compute);
    use plankton::model::invariance;
    let check = invariance::check(&net, &sizes, 8, 1);
    let tolerance = invariance::tolerance(cfg.compute.precision);
    let ok = check.max_relative_difference <= tolerance;
    let on = format!(
        "{} ({:?})",
        plankton::device::name(device),
        cfg.compute.precision
    )
    .to_lowercase();
    println!(
        "90-degree invariance on {on}: max |logit difference| {:.3e} ({:.3e} relative to max |logit| {:.3e}, tolerance {tolerance:.0e}) over {} rotations of {} inputs: {}",
        check.max_abs_difference, check.max_relative_difference, check.max_abs_logit, check.rotations, check.images,
        if ok { "ok" } else { "FAILED" }
    );
    if let Some(path) = &a.json {
        let mut v = serde_json::to_value(&check)?;
        v["ok"] = ok.into();
        v["device"] = plankton::device::name(device).into();
        v["precision"] = serde_json::to_value(cfg.compute.precision)?;
        v["tolerance"] = tolerance.into();
        std::fs::write(path, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("--json {}", path.display()))?;
    }
    if !ok {
        anyhow::bail!("the network is not invariant to 90-degree rotations on {on}");
    }
    Ok(())
}
