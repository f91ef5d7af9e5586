//! `plankton synth`: a synthetic plankton dataset in the competition layout.

use super::prelude::*;

#[derive(Args)]
pub struct SynthArgs {
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 121)]
    classes: usize,
    #[arg(long, default_value_t = 250)]
    per_class: usize,
    #[arg(long, default_value_t = 1000)]
    test: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Worker threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

pub async fn run(a: SynthArgs) -> Result<()> {
    let opts = synth::SynthOptions {
        classes: a.classes,
        per_class: a.per_class,
        test: a.test,
        seed: a.seed,
        threads: a.threads,
    };
    let t0 = std::time::Instant::now();
    let total = (opts.classes * opts.per_class + opts.test) as u64;
    let pb = spinner(&format!("synthesising {total} images"));
    let s = tokio::task::spawn_blocking(move || synth::generate(&opts, &a.out).map(|s| (s, a.out)))
        .await??;
    pb.finish_and_clear();
    println!(
        "wrote {} train images in {} classes and {} test images to {} in {:.1} s",
        s.0.train_images,
        s.0.class_names.len(),
        s.0.test_images,
        s.1.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
