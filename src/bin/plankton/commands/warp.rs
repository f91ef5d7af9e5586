//! `plankton warp`: one patch for exact parameters, as .npy.

use super::prelude::*;

#[derive(Args)]
pub struct WarpArgs {
    #[arg(long)]
    input: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// Patch size (square); with the default size-normalised mode the organism fills size-10 px.
    #[arg(long, default_value_t = 95)]
    size: usize,
    /// Fixed-scale mode with this downscale factor instead of size normalisation.
    #[arg(long)]
    ds: Option<f64>,
    #[arg(long, default_value_t = 0.0)]
    rotation: f64,
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    shift_x: f64,
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    shift_y: f64,
    #[arg(long, default_value_t = 1.0)]
    zoom: f64,
    #[arg(long, default_value_t = 1.0)]
    stretch: f64,
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    shear: f64,
    #[arg(long)]
    flip: bool,
    /// Fill outside the source with the image's border median instead of 0.
    #[arg(long)]
    border_fill: bool,
}

pub fn run(a: WarpArgs) -> Result<()> {
    use plankton::config::{Fill, PatchConfig};
    let img = plankton::stages::decode::decode_file(&a.input, &Default::default())?;
    let mut patch = match a.ds {
        Some(ds) => PatchConfig::fixed_scale(a.size, ds),
        None => PatchConfig::size_normalised(a.size, a.size as f64 - 10.0),
    };
    if a.border_fill {
        patch.fill = Fill::BorderMedian;
    }
    let aug = Augmentation {
        rotation_deg: a.rotation,
        shift_x: a.shift_x,
        shift_y: a.shift_y,
        zoom: a.zoom,
        stretch: a.stretch,
        shear_deg: a.shear,
        flip: a.flip,
    };
    if !(aug.zoom > 0.0 && aug.stretch > 0.0) {
        bail!("--zoom and --stretch must be > 0");
    }
    let mut out = vec![0.0f32; patch.pixels()];
    plankton::stages::warp::make_patch(&img, &patch, &aug, &mut out);
    plankton::npy::write_f32(&a.out, &[patch.rows, patch.cols], &out)?;
    println!(
        "wrote {} ({}x{} float32, source {}x{}, ds {:.4})",
        a.out.display(),
        patch.rows,
        patch.cols,
        img.height(),
        img.width(),
        patch.ds(img.height() as usize, img.width() as usize)
    );
    Ok(())
}
