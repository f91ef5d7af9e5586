//! Augmentation preview: a grid with one row per image, the original on the left and several
//! augmented patches beside it (as the reference write-up showed), drawn with plotters.
//!
//! Patches are shown as a person sees the original (dark organism on light ground): the
//! network's inverted values are mapped back with 1 - x. Whatever the fill puts outside the
//! source therefore shows up plainly, which is the point of looking.

use std::path::{Path, PathBuf};

use image::GrayImage;
use plotters::prelude::*;

use crate::config::PipelineConfig;
use crate::sources::ImageRecord;
use crate::stages::warp::{augmentation_for, make_patch};
use plankton_core::decode::decode_file;

#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    #[error("no decodable images to preview (tried {tried}; first problem: {first})")]
    NothingToShow { tried: usize, first: String },
    #[error("drawing the preview failed: {0}")]
    Draw(String),
    #[error("{path}: cannot write preview: {reason}")]
    Write { path: PathBuf, reason: String },
}

#[derive(Debug, Clone)]
pub struct PreviewOptions {
    /// Rows: images shown.
    pub images: usize,
    /// Augmented patches per image.
    pub augmentations: usize,
    /// Pixel size of each cell.
    pub cell: u32,
}

impl Default for PreviewOptions {
    fn default() -> Self {
        PreviewOptions {
            images: 8,
            augmentations: 7,
            cell: 96,
        }
    }
}

/// What went into the picture.
#[derive(Debug, Clone)]
pub struct PreviewSummary {
    pub shown: Vec<PathBuf>,
    pub skipped: Vec<(PathBuf, String)>,
    pub width: u32,
    pub height: u32,
}

/// Picks images spread over the classes (one per class in turn) so the grid shows variety.
pub fn pick_spread(records: &[ImageRecord], n: usize) -> Vec<usize> {
    let mut by_label: std::collections::BTreeMap<Option<u32>, Vec<usize>> = Default::default();
    for (i, r) in records.iter().enumerate() {
        by_label.entry(r.label).or_default().push(i);
    }
    let groups: Vec<Vec<usize>> = by_label.into_values().collect();
    let mut picked = Vec::new();
    let mut round = 0;
    while picked.len() < n && groups.iter().any(|g| g.len() > round) {
        for g in &groups {
            if picked.len() < n && g.len() > round {
                picked.push(g[round]);
            }
        }
        round += 1;
    }
    picked
}

/// Renders the preview of `records` (tried in order until `images` decode) into `out` (PNG).
pub fn render_preview(
    cfg: &PipelineConfig,
    records: &[ImageRecord],
    out: &Path,
    opts: &PreviewOptions,
) -> Result<PreviewSummary, PreviewError> {
    let mut rows: Vec<(usize, GrayImage)> = Vec::new();
    let mut skipped = Vec::new();
    for (i, r) in records.iter().enumerate() {
        if rows.len() == opts.images {
            break;
        }
        match decode_file(&r.path, &cfg.decode) {
            Ok(img) => rows.push((i, img)),
            Err(e) => skipped.push((r.path.clone(), e.to_string())),
        }
    }
    if rows.is_empty() {
        let first = skipped
            .first()
            .map(|(_, e)| e.clone())
            .unwrap_or_else(|| "no images".into());
        return Err(PreviewError::NothingToShow {
            tried: skipped.len(),
            first,
        });
    }
    let patch = &cfg.patches[0];
    let gap = 4u32;
    let cell = opts.cell;
    let cols = 1 + opts.augmentations as u32;
    let width = cols * cell + (cols + 1) * gap + 2 * gap;
    let height = rows.len() as u32 * (cell + gap) + gap;
    let mut buf = vec![255u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        let draw_err = |e: &dyn std::fmt::Display| PreviewError::Draw(e.to_string());
        root.fill(&RGBColor(236, 236, 236))
            .map_err(|e| draw_err(&e))?;
        for (row, (index, img)) in rows.iter().enumerate() {
            let y0 = gap + row as u32 * (cell + gap);
            // Original, scaled to fit the cell: shrunk with an area filter (a large image
            // sampled pixel by pixel aliases), enlarged by nearest neighbour (shows pixels).
            let shrunk;
            let img = if img.width().max(img.height()) > cell {
                shrunk = plankton_core::imgproc::thumbnail(img, cell);
                &shrunk
            } else {
                img
            };
            let (w, h) = img.dimensions();
            let scale = (cell as f64 / w.max(h) as f64).min(4.0);
            let (dw, dh) = ((w as f64 * scale) as u32, (h as f64 * scale) as u32);
            let (ox, oy) = (gap + (cell - dw) / 2, y0 + (cell - dh) / 2);
            for y in 0..dh {
                for x in 0..dw {
                    let sx = ((x as f64 / scale) as u32).min(w - 1);
                    let sy = ((y as f64 / scale) as u32).min(h - 1);
                    let v = img.get_pixel(sx, sy).0[0];
                    root.draw_pixel(((ox + x) as i32, (oy + y) as i32), &RGBColor(v, v, v))
                        .map_err(|e| draw_err(&e))?;
                }
            }
            // Augmented patches, drawn at the cell size.
            let mut patch_buf = vec![0.0f32; patch.pixels()];
            for k in 0..opts.augmentations {
                let aug = augmentation_for(
                    &cfg.augment,
                    cfg.seed,
                    0,
                    (*index * opts.augmentations + k) as u64,
                );
                make_patch(img, patch, &aug, &mut patch_buf);
                let x0 = 3 * gap + (k as u32 + 1) * (cell + gap);
                for y in 0..cell {
                    for x in 0..cell {
                        let pr = (y as usize * patch.rows) / cell as usize;
                        let pc = (x as usize * patch.cols) / cell as usize;
                        let v = ((1.0 - patch_buf[pr * patch.cols + pc]).clamp(0.0, 1.0) * 255.0)
                            .round() as u8;
                        root.draw_pixel(((x0 + x) as i32, (y0 + y) as i32), &RGBColor(v, v, v))
                            .map_err(|e| draw_err(&e))?;
                    }
                }
            }
        }
        root.present().map_err(|e| draw_err(&e))?;
    }
    let img = image::RgbImage::from_raw(width, height, buf).expect("buffer size");
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| PreviewError::Write {
            path: out.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    img.save_with_format(out, image::ImageFormat::Png)
        .map_err(|e| PreviewError::Write {
            path: out.to_path_buf(),
            reason: e.to_string(),
        })?;
    Ok(PreviewSummary {
        shown: rows.iter().map(|(i, _)| records[*i].path.clone()).collect(),
        skipped,
        width,
        height,
    })
}
