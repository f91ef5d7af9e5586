//! `plankton demo`: the main job on an embedded default dataset.

use super::prelude::*;

#[derive(Args)]
pub struct DemoArgs {
    /// Where all demo outputs go.
    #[arg(long, default_value = "demo-out")]
    out: PathBuf,
    /// Synthetic classes for the loader part.
    #[arg(long, default_value_t = 24)]
    classes: usize,
    #[arg(long, default_value_t = 60)]
    per_class: usize,
    /// Skip downloading the real planktonclas images (offline machines).
    #[arg(long)]
    no_real_data: bool,
}

pub async fn run(a: DemoArgs) -> Result<()> {
    let opts = plankton::demo::DemoOptions {
        out: a.out,
        classes: a.classes,
        per_class: a.per_class,
        real_data: !a.no_real_data,
        epochs: 5,
        train_steps: 0,
    };
    let pb = progress(
        (opts.classes * opts.per_class) as u64 * opts.epochs,
        "loading",
    );
    plankton::demo::run(
        &opts,
        |line| pb.suspend(|| println!("{}", line.trim_end())),
        |_, n| pb.inc(n as u64),
    )
    .await?;
    pb.finish_and_clear();
    Ok(())
}
