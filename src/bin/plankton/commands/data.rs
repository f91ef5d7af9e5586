//! `plankton data`: obtain a real dataset.

use super::prelude::*;

#[derive(Subcommand)]
pub enum DataCommand {
    /// The 105 labelled plankton images of the `planktonclas` PyPI package, in competition layout.
    Planktonclas {
        #[arg(long)]
        out: PathBuf,
        /// Where the downloaded wheel is kept.
        #[arg(long, default_value = "data-cache")]
        cache: PathBuf,
        #[arg(long, default_value = planktonclas::DEFAULT_PYTHON)]
        python: String,
    },
}

pub fn run(which: DataCommand) -> Result<()> {
    let DataCommand::Planktonclas { out, cache, python } = which;
    let s = planktonclas::fetch(&planktonclas::PlanktonclasOptions {
        out: out.clone(),
        cache_dir: cache,
        python,
    })?;
    println!(
        "planktonclas {}: {} train + {} test images in {} classes at {}{} (package split: {})",
        planktonclas::PLANKTONCLAS_VERSION,
        s.train_images,
        s.test_images,
        s.class_names.len(),
        out.display(),
        if s.from_cache { " (cached)" } else { "" },
        out.join(planktonclas::SPLIT_FILE).display()
    );
    Ok(())
}
