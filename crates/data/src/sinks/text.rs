//! Lettering for the plots: DejaVu Sans (matplotlib's default face; Bitstream Vera licence,
//! LICENSES/DejaVu.txt), embedded from the `dejavu` crate and rasterised with ab_glyph,
//! anti-aliased onto whatever is below. No system fonts: CI machines have none.
//!
//! Sizes are layout scales: 1 for tick labels and legends, 2 for titles.

use std::sync::OnceLock;

use ab_glyph::{point, Font, FontRef, PxScale, ScaleFont};
use plotters::coord::Shift;
use plotters::drawing::DrawingAreaErrorKind;
use plotters::prelude::*;

pub type DrawError = DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>;

fn font() -> &'static FontRef<'static> {
    static FONT: OnceLock<FontRef<'static>> = OnceLock::new();
    FONT.get_or_init(|| {
        FontRef::try_from_slice(dejavu::sans::regular()).expect("DejaVu Sans is a valid font")
    })
}

/// Pixels per em at a layout scale: 11 px for labels, 17 px for titles.
pub fn font_px(scale: u32) -> f32 {
    5.0 + 6.0 * scale.max(1) as f32
}

fn scaled(scale: u32) -> ab_glyph::PxScaleFont<&'static FontRef<'static>> {
    font().as_scaled(PxScale::from(font_px(scale)))
}

/// Height of one line (ascent + descent), in pixels.
pub fn text_height(scale: u32) -> u32 {
    let f = scaled(scale);
    (f.ascent() - f.descent()).ceil() as u32
}

/// Height of a capital or a digit above the baseline: what labels are centred on.
pub fn cap_height(scale: u32) -> u32 {
    let f = scaled(scale);
    f.outline_glyph(f.scaled_glyph('H'))
        .map(|g| (-g.px_bounds().min.y).round() as u32)
        .unwrap_or(text_height(scale) * 2 / 3)
}

/// From the top of a line to its baseline.
pub fn ascent(scale: u32) -> u32 {
    scaled(scale).ascent().round() as u32
}

/// From the top of a line to the middle of its capitals: a label drawn at `y - cap_middle`
/// looks centred on `y`.
pub fn cap_middle(scale: u32) -> u32 {
    ascent(scale) - cap_height(scale) / 2
}

/// Advance of the text (kerning included), in pixels.
pub fn text_width(text: &str, scale: u32) -> u32 {
    let f = scaled(scale);
    let mut x = 0.0f32;
    let mut prev = None;
    for c in text.chars() {
        let id = f.glyph_id(c);
        if let Some(p) = prev {
            x += f.kern(p, id);
        }
        x += f.h_advance(id);
        prev = Some(id);
    }
    x.ceil() as u32
}

/// The advance of a digit: how many characters of a label fit in a width, roughly.
pub fn advance(scale: u32) -> u32 {
    text_width("0", scale).max(1)
}

/// Every covered pixel of `text` laid out from (0, 0) = the top left of its line, with its
/// coverage in 0..=1.
fn for_each_pixel(
    text: &str,
    scale: u32,
    mut put: impl FnMut(i32, i32, f32) -> Result<(), DrawError>,
) -> Result<(), DrawError> {
    let f = scaled(scale);
    let baseline = f.ascent();
    let mut x = 0.0f32;
    let mut prev = None;
    for c in text.chars() {
        let id = f.glyph_id(c);
        if let Some(p) = prev {
            x += f.kern(p, id);
        }
        let glyph = id.with_scale_and_position(f.scale(), point(x, baseline));
        if let Some(outline) = f.outline_glyph(glyph) {
            let b = outline.px_bounds();
            let mut covered = Vec::new();
            outline.draw(|gx, gy, c| covered.push((gx, gy, c)));
            for (gx, gy, c) in covered {
                if c > 0.0 {
                    put(
                        b.min.x as i32 + gx as i32,
                        b.min.y as i32 + gy as i32,
                        c.min(1.0),
                    )?;
                }
            }
        }
        x += f.h_advance(id);
        prev = Some(id);
    }
    Ok(())
}

/// Draws `text` with its line's top left corner at (x, y).
pub fn draw_text(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    x: i32,
    y: i32,
    text: &str,
    scale: u32,
    colour: RGBColor,
) -> Result<(), DrawError> {
    for_each_pixel(text, scale, |px, py, c| {
        area.draw_pixel((x + px, y + py), &colour.mix(c as f64))
    })
}

/// Draws `text` turned a quarter anticlockwise (reading upwards): its line's top edge is at x,
/// and it starts at y, going up.
pub fn draw_text_vertical(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    x: i32,
    y: i32,
    text: &str,
    scale: u32,
    colour: RGBColor,
) -> Result<(), DrawError> {
    for_each_pixel(text, scale, |px, py, c| {
        area.draw_pixel((x + py, y - px - 1), &colour.mix(c as f64))
    })
}
