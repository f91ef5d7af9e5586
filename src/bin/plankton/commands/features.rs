//! `plankton features`: image features for late fusion.

use super::prelude::*;

#[derive(Args)]
pub struct FeaturesArgs {
    /// Dataset folders (train and test images), folders of images, or image files.
    #[arg(long, required = true, num_args = 1..)]
    data: Vec<PathBuf>,
    /// The features Parquet file to write (image_id, source_path, error, <set>.<name> columns).
    #[arg(long)]
    out: PathBuf,
    /// Comma-separated: moments, hu, haralick, zernike, lbp, tas.
    #[arg(long, default_value = "moments,hu,haralick")]
    set: String,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

pub async fn run(a: FeaturesArgs) -> Result<()> {
    use plankton::features::job::{self, FeatureSet, FeaturesOptions};
    let opts = FeaturesOptions {
        data: a.data,
        out: a.out,
        sets: FeatureSet::parse_list(&a.set)?,
        threads: a.threads,
        decode: Default::default(),
    };
    let s = tokio::task::spawn_blocking(move || {
        let pb = progress(0, "features");
        let r = job::run(&opts, |done, total| {
            pb.set_length(total as u64);
            pb.set_position(done as u64);
        });
        pb.finish_and_clear();
        r.map(|s| (s, opts.out))
    })
    .await??;
    let (s, out) = s;
    for (p, r) in &s.failed {
        tracing::warn!(path = %p.display(), reason = %r, "set aside");
    }
    println!(
        "{} images x {} feature columns in {:.1} s ({:.0} images/s), {} set aside (rows kept with the reason) -> {}",
        s.images,
        s.columns,
        s.seconds,
        s.images as f64 / s.seconds.max(1e-9),
        s.failed.len(),
        out.display()
    );
    Ok(())
}
