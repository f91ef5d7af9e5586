//! Charts people read: learning curves (line charts side by side) and heatmaps (confusion
//! matrices), as PNG. Axes, ticks, labels and legends are laid out here (ticks that never
//! overlap, a legend in the emptiest corner, every k-th of 121 heatmap labels) and lettered in
//! DejaVu Sans (`text`); plotters rasterises.

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

use super::text::{
    advance, ascent, cap_height, cap_middle, draw_text, draw_text_vertical, text_height,
    text_width, DrawError,
};

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("{path}: cannot plot: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{path}: drawing failed: {reason}")]
    Draw { path: PathBuf, reason: String },
    #[error("{path}: cannot write PNG: {reason}")]
    Write { path: PathBuf, reason: String },
}

#[derive(Debug, Clone, Default)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub colour: (u8, u8, u8),
    pub dashed: bool,
}

#[derive(Debug, Clone, Default)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    pub log_y: bool,
    /// Fixed y extent; lines leaving it are clipped. `None` fits the data.
    pub y_range: Option<(f64, f64)>,
}

/// Bars beneath a chart's lines: each `(x_left, x_right, height)` rises from 0 (from the bottom
/// of the axis on a log axis). Bars are drawn clipped to the plot area and count towards the
/// data extent when the chart has no fixed y range.
#[derive(Debug, Clone, Default)]
pub struct Bars {
    pub name: String,
    pub bars: Vec<(f64, f64, f64)>,
    pub colour: (u8, u8, u8),
}

/// A line chart with bars drawn beneath its lines (e.g. a reliability diagram, a histogram).
#[derive(Debug, Clone, Default)]
pub struct Chart {
    pub lines: LineChart,
    /// Drawn in order, before the lines; named ones get a filled swatch in the legend.
    pub bars: Vec<Bars>,
}

#[derive(Debug, Clone, Default)]
pub struct Heatmap {
    pub title: String,
    /// One per row of `values`, or empty for none.
    pub row_labels: Vec<String>,
    /// One per column of `values`, or empty for none.
    pub col_labels: Vec<String>,
    /// Rows x cols, e.g. a confusion matrix normalised per row.
    pub values: Vec<Vec<f64>>,
    /// Print values in cells large enough to hold them (zeros are left blank).
    pub annotate: bool,
}

/// Where a chart's data lands in the image: the frame of the plot area in pixels and the data
/// extent it shows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlotArea {
    pub left: i32,
    pub top: i32,
    pub right: i32,
    pub bottom: i32,
    pub x_range: (f64, f64),
    pub y_range: (f64, f64),
    pub log_y: bool,
}

impl PlotArea {
    /// Pixel position of a data point; `None` when it cannot be shown (not finite, or not
    /// positive on a log axis). Points outside the ranges map outside the frame.
    pub fn to_pixel(&self, x: f64, y: f64) -> Option<(f64, f64)> {
        if !x.is_finite() || !y.is_finite() || (self.log_y && y <= 0.0) {
            return None;
        }
        let fx = (x - self.x_range.0) / (self.x_range.1 - self.x_range.0);
        let fy = if self.log_y {
            (y / self.y_range.0).log10() / (self.y_range.1 / self.y_range.0).log10()
        } else {
            (y - self.y_range.0) / (self.y_range.1 - self.y_range.0)
        };
        Some((
            self.left as f64 + fx * (self.right - self.left) as f64,
            self.bottom as f64 - fy * (self.bottom - self.top) as f64,
        ))
    }

    fn contains(&self, (x, y): (f64, f64)) -> bool {
        x >= self.left as f64
            && x <= self.right as f64
            && y >= self.top as f64
            && y <= self.bottom as f64
    }
}

/// At most `max_ticks` values m x 10^k (m in 1, 2, 5) evenly spaced inside [lo, hi], with the
/// smallest such spacing; at least 3 come back for max_ticks >= 8 and a non-empty range.
pub fn nice_ticks(lo: f64, hi: f64, max_ticks: usize) -> Vec<f64> {
    if !lo.is_finite() || !hi.is_finite() || max_ticks == 0 {
        return Vec::new();
    }
    let (lo, hi) = (lo.min(hi), lo.max(hi));
    if lo == hi || max_ticks == 1 {
        return vec![lo];
    }
    if !(hi - lo).is_finite() {
        return vec![lo, hi];
    }
    // One decade below the spacing that would give exactly max_ticks, so the first fit is
    // the smallest.
    let start = ((hi - lo) / max_ticks as f64).log10().floor() as i32 - 1;
    for exp in start..start + 3 {
        for m in [1.0, 2.0, 5.0] {
            // Scale by dividing for negative exponents so that e.g. 3 x 0.1 comes out as 0.3.
            let value = |k: f64| {
                if exp >= 0 {
                    k * m * 10f64.powi(exp)
                } else {
                    k * m / 10f64.powi(-exp)
                }
            };
            let step = value(1.0);
            let first = (lo / step - 1e-9).ceil();
            let last = (hi / step + 1e-9).floor();
            if last - first + 1.0 <= max_ticks as f64 {
                return (0..=(last - first) as i64)
                    .map(|i| value(first + i as f64))
                    .collect();
            }
        }
    }
    vec![lo, hi]
}

/// Short label for tick `value` on an axis whose ticks are `step` apart: just enough decimals
/// for the step, and scientific notation (`1.2e5`, `5e-4`) for very large or small values.
pub fn format_tick(value: f64, step: f64) -> String {
    let step_exp = (step.abs().log10() + 1e-9).floor() as i32;
    let a = value.abs();
    let text = if a != 0.0 && !(1e-3..1e5).contains(&a) {
        let mut exp = a.log10().floor() as i32;
        let digits = (exp - step_exp).clamp(0, 3) as usize;
        let mut mantissa = format!("{:.*}", digits, value / 10f64.powi(exp));
        if mantissa.trim_start_matches('-').starts_with("10") {
            exp += 1;
            mantissa = format!("{:.*}", digits, value / 10f64.powi(exp));
        }
        if mantissa.contains('.') {
            mantissa = mantissa
                .trim_end_matches('0')
                .trim_end_matches('.')
                .to_string();
        }
        format!("{mantissa}e{exp}")
    } else {
        format!("{:.*}", (-step_exp).max(0) as usize, value)
    };
    // -0.0 and values that round to zero read as plain zero.
    match text.strip_prefix('-') {
        Some(rest) if rest.trim_matches(|c| c == '0' || c == '.').is_empty() => rest.to_string(),
        _ => text,
    }
}

const WHITE: RGBColor = RGBColor(255, 255, 255);
const INK: RGBColor = RGBColor(30, 30, 30);
const FRAME: RGBColor = RGBColor(70, 70, 70);
const GRID: RGBColor = RGBColor(228, 228, 228);
const LEGEND_EDGE: RGBColor = RGBColor(200, 200, 200);
const MISSING: RGBColor = RGBColor(190, 190, 190);
const MARGIN: i32 = 8;
const GAP: i32 = 4;
const TICK: i32 = 3;
const DASH: (f64, f64) = (8.0, 5.0);
/// Series with at most this many drawable points also get a marker at each point.
const MARKERS_UP_TO: usize = 30;
const MAX_LABEL_CHARS: usize = 20;

struct Ticks {
    values: Vec<f64>,
    labels: Vec<String>,
}

impl Ticks {
    fn widest(&self, scale: u32) -> i32 {
        self.labels
            .iter()
            .map(|l| text_width(l, scale))
            .max()
            .unwrap_or(0) as i32
    }
}

struct Panel {
    left: i32,
    width: i32,
    scale: u32,
    title_scale: u32,
    area: PlotArea,
    x_ticks: Ticks,
    y_ticks: Ticks,
}

/// Plot areas of `charts` laid out side by side in a `width` x `height` image, as
/// `render_line_charts` draws them.
pub fn line_chart_areas(charts: &[LineChart], width: u32, height: u32) -> Vec<PlotArea> {
    layout(&panels_of(charts), width, height)
        .into_iter()
        .map(|p| p.area)
        .collect()
}

/// Charts side by side in one row, each with axes, round-number ticks, title and legend.
pub fn render_line_charts(
    path: &Path,
    charts: &[LineChart],
    width: u32,
    height: u32,
) -> Result<(), PlotError> {
    render_panels(path, &panels_of(charts), width, height)
}

/// Like [`render_line_charts`], for charts that also have bars.
pub fn render_charts(
    path: &Path,
    charts: &[Chart],
    width: u32,
    height: u32,
) -> Result<(), PlotError> {
    let panels: Vec<(&LineChart, &[Bars])> = charts
        .iter()
        .map(|c| (&c.lines, c.bars.as_slice()))
        .collect();
    render_panels(path, &panels, width, height)
}

fn panels_of(charts: &[LineChart]) -> Vec<(&LineChart, &[Bars])> {
    charts.iter().map(|c| (c, &[][..])).collect()
}

fn render_panels(
    path: &Path,
    charts: &[(&LineChart, &[Bars])],
    width: u32,
    height: u32,
) -> Result<(), PlotError> {
    let invalid = |reason: String| PlotError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    if charts.is_empty() {
        return Err(invalid("no charts".into()));
    }
    for (chart, _) in charts {
        if let Some((lo, hi)) = chart.y_range {
            if !(lo.is_finite() && hi.is_finite() && lo < hi && (!chart.log_y || lo > 0.0)) {
                return Err(invalid(format!(
                    "chart '{}': y range ({lo}, {hi}) is not usable",
                    chart.title
                )));
            }
        }
    }
    let panels = layout(charts, width, height);
    if panels
        .iter()
        .any(|p| p.area.right - p.area.left < 20 || p.area.bottom - p.area.top < 20)
    {
        return Err(invalid(format!(
            "{width}x{height} leaves no room to plot {} chart(s)",
            charts.len()
        )));
    }
    draw_png(path, width, height, |root| {
        root.fill(&WHITE)?;
        charts
            .iter()
            .zip(&panels)
            .try_for_each(|((c, bars), p)| draw_chart(root, c, bars, p))
    })
}

/// A heatmap with `cell_px`-pixel cells, labelled rows and columns (every k-th label where they
/// would crowd, truncated when long) and a colour bar; white is the lowest value.
pub fn render_heatmap(path: &Path, map: &Heatmap, cell_px: u32) -> Result<(), PlotError> {
    render_heatmap_cells(path, map, cell_px, None)
}

/// Like [`render_heatmap`], with `cell_text[r][c]` printed in the cells instead of the values
/// (e.g. counts on a row-normalised confusion matrix); empty strings are left blank. Printed
/// whatever `map.annotate` says, in cells large enough to hold them.
pub fn render_heatmap_with_text(
    path: &Path,
    map: &Heatmap,
    cell_px: u32,
    cell_text: &[Vec<String>],
) -> Result<(), PlotError> {
    let same_shape = cell_text.len() == map.values.len()
        && cell_text
            .iter()
            .zip(&map.values)
            .all(|(t, v)| t.len() == v.len());
    if !same_shape {
        return Err(PlotError::Invalid {
            path: path.to_path_buf(),
            reason: "cell text does not match the heatmap's shape".into(),
        });
    }
    render_heatmap_cells(path, map, cell_px, Some(cell_text))
}

fn render_heatmap_cells(
    path: &Path,
    map: &Heatmap,
    cell_px: u32,
    cell_text: Option<&[Vec<String>]>,
) -> Result<(), PlotError> {
    let invalid = |reason: &str| PlotError::Invalid {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let rows = map.values.len();
    let cols = map.values.first().map_or(0, Vec::len);
    if rows == 0 || cols == 0 || cell_px == 0 {
        return Err(invalid("no cells to draw"));
    }
    if map.values.iter().any(|r| r.len() != cols) {
        return Err(invalid("rows of the heatmap differ in length"));
    }
    if !(map.row_labels.is_empty() || map.row_labels.len() == rows)
        || !(map.col_labels.is_empty() || map.col_labels.len() == cols)
    {
        return Err(invalid(
            "label count does not match the heatmap's rows or columns",
        ));
    }
    let h = HeatLayout::new(map, cell_px);
    draw_png(path, h.width as u32, h.height as u32, |root| {
        root.fill(&WHITE)?;
        draw_heatmap(root, map, cell_text, &h)
    })
}

fn draw_png(
    path: &Path,
    width: u32,
    height: u32,
    draw: impl FnOnce(&Area) -> Result<(), DrawError>,
) -> Result<(), PlotError> {
    if width == 0 || height == 0 {
        return Err(PlotError::Invalid {
            path: path.to_path_buf(),
            reason: format!("image size {width}x{height}"),
        });
    }
    let mut buf = vec![255u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        draw(&root)
            .and_then(|()| root.present())
            .map_err(|e| PlotError::Draw {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
    }
    let write_err = |reason: String| PlotError::Write {
        path: path.to_path_buf(),
        reason,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| write_err(e.to_string()))?;
    }
    let img = image::RgbImage::from_raw(width, height, buf).expect("buffer sized to the image");
    img.save_with_format(path, image::ImageFormat::Png)
        .map_err(|e| write_err(e.to_string()))
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

fn line(
    root: &Area,
    from: (i32, i32),
    to: (i32, i32),
    style: impl Into<ShapeStyle>,
) -> Result<(), DrawError> {
    root.draw(&PathElement::new(vec![from, to], style))
}

fn rect(
    root: &Area,
    from: (i32, i32),
    to: (i32, i32),
    style: impl Into<ShapeStyle>,
) -> Result<(), DrawError> {
    root.draw(&Rectangle::new([from, to], style))
}

fn px((x, y): (f64, f64)) -> (i32, i32) {
    (x.round() as i32, y.round() as i32)
}

fn rgb((r, g, b): (u8, u8, u8)) -> RGBColor {
    RGBColor(r, g, b)
}

/// `label` shortened (ending in "..") until it is at most `max_px` wide at `scale`: measured,
/// since the letters of a proportional font differ in width.
fn fit_width(label: &str, scale: u32, max_px: i32) -> String {
    if text_width(label, scale) as i32 <= max_px {
        return label.to_string();
    }
    let chars: Vec<char> = label.chars().collect();
    (0..chars.len())
        .rev()
        .map(|n| chars[..n].iter().collect::<String>() + "..")
        .find(|t| text_width(t, scale) as i32 <= max_px)
        .unwrap_or_else(|| "..".into())
}

fn truncate(label: &str, max_chars: usize) -> String {
    if label.chars().count() <= max_chars {
        label.to_string()
    } else {
        let head: String = label.chars().take(max_chars.saturating_sub(2)).collect();
        format!("{head}..")
    }
}

// ---------------------------------------------------------------------------------------------
// Line charts

fn layout(charts: &[(&LineChart, &[Bars])], width: u32, height: u32) -> Vec<Panel> {
    let n = charts.len().max(1) as i32;
    let panel_w = width as i32 / n;
    charts
        .iter()
        .enumerate()
        .map(|(i, (c, bars))| layout_panel(c, bars, i as i32 * panel_w, panel_w, height as i32))
        .collect()
}

fn layout_panel(chart: &LineChart, bars: &[Bars], left: i32, width: i32, height: i32) -> Panel {
    let scale = if width.min(height) >= 700 { 2 } else { 1 };
    let th = |s: u32| text_height(s) as i32;
    let title_scale = if text_width(&chart.title, scale + 1) as i32 <= width - 2 * MARGIN {
        scale + 1
    } else {
        scale
    };
    let (x_range, y_range) = data_ranges(chart, bars);

    let title_h = if chart.title.is_empty() {
        0
    } else {
        th(title_scale) + 2 * GAP
    };
    let x_label_h = if chart.x_label.is_empty() {
        0
    } else {
        th(scale) + GAP
    };
    let top = MARGIN + title_h;
    let bottom = (height - MARGIN - x_label_h - th(scale) - TICK - GAP).max(top + 1);
    let y_ticks = pick_ticks(y_range, chart.log_y, (bottom - top) as f64, |_| {
        th(scale) + 2
    });

    let y_label_w = if chart.y_label.is_empty() {
        0
    } else {
        th(scale) + GAP
    };
    let plot_left = left + MARGIN + y_label_w + y_ticks.widest(scale) + GAP + TICK;
    // Room for half of a typical x tick label past the right edge of the frame.
    let right = (left + width - MARGIN - 3 * advance(scale) as i32).max(plot_left + 1);
    let x_gap = 2 * advance(scale) as i32;
    let x_ticks = pick_ticks(x_range, false, (right - plot_left) as f64, |t| {
        t.widest(scale) + x_gap
    });
    Panel {
        left,
        width,
        scale,
        title_scale,
        area: PlotArea {
            left: plot_left,
            top,
            right,
            bottom,
            x_range,
            y_range,
            log_y: chart.log_y,
        },
        x_ticks,
        y_ticks,
    }
}

fn data_ranges(chart: &LineChart, bars: &[Bars]) -> ((f64, f64), (f64, f64)) {
    let usable = |&(x, y): &(f64, f64)| x.is_finite() && y.is_finite() && (!chart.log_y || y > 0.0);
    // A bar spans x_left..x_right and 0..height (only its top on a log axis).
    let bar_points = bars.iter().flat_map(|b| &b.bars).flat_map(|&(x0, x1, h)| {
        let base = if chart.log_y { h } else { 0.0 };
        [(x0, base), (x1, h)]
    });
    let points: Vec<(f64, f64)> = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .chain(bar_points)
        .filter(usable)
        .collect();
    let extent = |v: &mut dyn Iterator<Item = f64>| {
        v.fold(None, |acc: Option<(f64, f64)>, v| {
            Some(acc.map_or((v, v), |(lo, hi)| (lo.min(v), hi.max(v))))
        })
    };
    let x = match extent(&mut points.iter().map(|p| p.0)) {
        None => (0.0, 1.0),
        Some((lo, hi)) if lo == hi => (lo - 1.0, hi + 1.0),
        Some(r) => r,
    };
    let y = match (chart.y_range, extent(&mut points.iter().map(|p| p.1))) {
        (Some(r), _) => r,
        (None, None) if chart.log_y => (1.0, 10.0),
        (None, None) => (0.0, 1.0),
        (None, Some((lo, hi))) if chart.log_y => {
            let (a, b) = (lo.log10(), hi.log10());
            let pad = if a == b { 0.3 } else { 0.05 * (b - a) };
            (10f64.powf(a - pad), 10f64.powf(b + pad))
        }
        (None, Some((lo, hi))) => {
            let pad = if lo == hi {
                lo.abs().max(1.0) * 0.1
            } else {
                0.05 * (hi - lo)
            };
            (lo - pad, hi + pad)
        }
    };
    (x, y)
}

/// Round-number ticks, as many (up to 8) as leave `needed_gap` pixels between neighbours.
fn pick_ticks(
    (lo, hi): (f64, f64),
    log: bool,
    len_px: f64,
    needed_gap: impl Fn(&Ticks) -> i32,
) -> Ticks {
    let frac = |v: f64| {
        if log {
            (v / lo).log10() / (hi / lo).log10()
        } else {
            (v - lo) / (hi - lo)
        }
    };
    let mut best = None;
    for max in (2..=8).rev() {
        let ticks = if log {
            log_ticks(lo, hi, max)
        } else {
            linear_ticks(lo, hi, max)
        };
        let gap = ticks
            .values
            .windows(2)
            .map(|w| (frac(w[1]) - frac(w[0])) * len_px)
            .fold(f64::INFINITY, f64::min);
        let fits = gap >= needed_gap(&ticks) as f64;
        best = Some(ticks);
        if fits {
            break;
        }
    }
    best.expect("at least one tick count tried")
}

fn linear_ticks(lo: f64, hi: f64, max: usize) -> Ticks {
    let values = nice_ticks(lo, hi, max);
    let step = match values.as_slice() {
        [a, b, ..] => b - a,
        [a] => a.abs().max(1.0),
        [] => 1.0,
    };
    let labels = values.iter().map(|&v| format_tick(v, step)).collect();
    Ticks { values, labels }
}

/// Ticks for a log axis: the densest of 1..9, 1-2-3-5, 1-2-5, 1-3 or 1 per decade that fits;
/// every k-th power of ten over many decades; linear round numbers within about a decade.
fn log_ticks(lo: f64, hi: f64, max: usize) -> Ticks {
    let (a, b) = (lo.log10().floor() as i32, hi.log10().floor() as i32);
    let inside = |v: &f64| *v >= lo * (1.0 - 1e-9) && *v <= hi * (1.0 + 1e-9);
    let per_decade = |mantissas: &[f64], every: i32| -> Vec<f64> {
        (a..=b)
            .filter(|e| e.rem_euclid(every) == 0)
            .flat_map(|e| mantissas.iter().map(move |m| m * 10f64.powi(e)))
            .filter(inside)
            .collect()
    };
    let per_value = |values: Vec<f64>| Ticks {
        labels: values.iter().map(|&v| format_tick(v, v)).collect(),
        values,
    };
    let sets: [&[f64]; 5] = [
        &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
        &[1.0, 2.0, 3.0, 5.0],
        &[1.0, 2.0, 5.0],
        &[1.0, 3.0],
        &[1.0],
    ];
    for mantissas in sets {
        let values = per_decade(mantissas, 1);
        if values.len() <= max {
            return if values.len() >= 3 {
                per_value(values)
            } else {
                linear_ticks(lo, hi, max)
            };
        }
    }
    let every = ((b - a + 1) as usize).div_ceil(max.max(1)) as i32;
    per_value(per_decade(&[1.0], every.max(2)))
}

fn draw_chart(root: &Area, chart: &LineChart, bars: &[Bars], p: &Panel) -> Result<(), DrawError> {
    let a = &p.area;
    let s = p.scale;
    let th = text_height(s) as i32;
    let x_px = |x: f64| {
        a.to_pixel(x, a.y_range.0)
            .map_or(a.left, |q| q.0.round() as i32)
    };
    let y_px = |y: f64| {
        a.to_pixel(a.x_range.0, y)
            .map_or(a.bottom, |q| q.1.round() as i32)
    };

    for &x in &p.x_ticks.values {
        let px = x_px(x);
        line(root, (px, a.top), (px, a.bottom), GRID)?;
    }
    for &y in &p.y_ticks.values {
        let py = y_px(y);
        line(root, (a.left, py), (a.right, py), GRID)?;
    }

    let mut ink = Vec::new();
    for b in bars {
        draw_bars(root, a, b, &mut ink)?;
    }
    for series in &chart.series {
        draw_series(root, a, series, &mut ink)?;
    }
    let has_data = chart
        .series
        .iter()
        .flat_map(|s| &s.points)
        .any(|&(x, y)| a.to_pixel(x, y).is_some())
        || bars
            .iter()
            .flat_map(|b| &b.bars)
            .any(|&(x0, x1, h)| a.to_pixel(x0, h).is_some() && a.to_pixel(x1, h).is_some());
    if !has_data {
        let msg = "no data";
        let x = (a.left + a.right - text_width(msg, s) as i32) / 2;
        draw_text(root, x, (a.top + a.bottom - th) / 2, msg, s, FRAME)?;
    }

    rect(root, (a.left, a.top), (a.right, a.bottom), FRAME)?;
    for (&x, label) in p.x_ticks.values.iter().zip(&p.x_ticks.labels) {
        let px = x_px(x);
        line(root, (px, a.bottom), (px, a.bottom + TICK), FRAME)?;
        let tx = px - text_width(label, s) as i32 / 2;
        draw_text(root, tx, a.bottom + TICK + 2, label, s, INK)?;
    }
    for (&y, label) in p.y_ticks.values.iter().zip(&p.y_ticks.labels) {
        let py = y_px(y);
        line(root, (a.left - TICK, py), (a.left, py), FRAME)?;
        let tx = a.left - TICK - GAP - text_width(label, s) as i32;
        // Centred on the capitals, not on the descenders.
        draw_text(root, tx, py - cap_middle(s) as i32, label, s, INK)?;
    }

    if !chart.title.is_empty() {
        let title = fit_width(&chart.title, p.title_scale, p.width - 2 * MARGIN);
        let tw = text_width(&title, p.title_scale) as i32;
        let tx = ((a.left + a.right - tw) / 2).max(p.left + MARGIN);
        draw_text(root, tx, MARGIN + GAP, &title, p.title_scale, INK)?;
    }
    if !chart.x_label.is_empty() {
        let tx = (a.left + a.right - text_width(&chart.x_label, s) as i32) / 2;
        draw_text(
            root,
            tx,
            a.bottom + TICK + 2 + th + GAP,
            &chart.x_label,
            s,
            INK,
        )?;
    }
    if !chart.y_label.is_empty() {
        let ty = (a.top + a.bottom + text_width(&chart.y_label, s) as i32) / 2;
        draw_text_vertical(root, p.left + MARGIN, ty, &chart.y_label, s, INK)?;
    }
    draw_legend(root, a, bars, &chart.series, &ink, s)
}

/// Draws filled bars clipped to the plot area, each with a darker edge so that neighbours stay
/// apart; the pixels they cover go into `ink` (sampled every few pixels).
fn draw_bars(
    root: &Area,
    a: &PlotArea,
    bars: &Bars,
    ink: &mut Vec<(f64, f64)>,
) -> Result<(), DrawError> {
    let fill = rgb(bars.colour);
    let edge = RGBColor(
        (bars.colour.0 as f64 * 0.6) as u8,
        (bars.colour.1 as f64 * 0.6) as u8,
        (bars.colour.2 as f64 * 0.6) as u8,
    );
    let base = if a.log_y { a.y_range.0 } else { 0.0 };
    for &(x0, x1, h) in &bars.bars {
        let (Some(p), Some(q)) = (
            a.to_pixel(x0.min(x1), base.min(h)),
            a.to_pixel(x0.max(x1), base.max(h)),
        ) else {
            continue;
        };
        // p is bottom-left, q top-right in pixels; clip to the frame.
        let left = p.0.max(a.left as f64).round() as i32;
        let right = q.0.min(a.right as f64).round() as i32;
        let top = q.1.max(a.top as f64).round() as i32;
        let bottom = p.1.min(a.bottom as f64).round() as i32;
        if left >= right || top >= bottom {
            continue;
        }
        rect(root, (left, top), (right, bottom), fill.filled())?;
        rect(root, (left, top), (right, bottom), edge)?;
        for y in (top..=bottom).step_by(4) {
            ink.extend((left..=right).step_by(4).map(|x| (x as f64, y as f64)));
        }
    }
    Ok(())
}

/// Draws one series clipped to the plot area; the pixel positions it covers go into `ink`
/// so the legend can avoid them.
fn draw_series(
    root: &Area,
    a: &PlotArea,
    series: &Series,
    ink: &mut Vec<(f64, f64)>,
) -> Result<(), DrawError> {
    let colour = rgb(series.colour);
    let bounds = (a.left as f64, a.top as f64, a.right as f64, a.bottom as f64);
    let pixels: Vec<Option<(f64, f64)>> = series
        .points
        .iter()
        .map(|&(x, y)| a.to_pixel(x, y))
        .collect();
    let mut phase = 0.0;
    // A point that cannot be shown breaks the line rather than being bridged.
    for pair in pixels.windows(2) {
        let (Some(p), Some(q)) = (pair[0], pair[1]) else {
            phase = 0.0;
            continue;
        };
        let Some((p, q)) = clip(p, q, bounds) else {
            continue;
        };
        stroke(root, p, q, colour, series.dashed, &mut phase)?;
        let steps = ((q.0 - p.0).hypot(q.1 - p.1) / 2.0).ceil().max(1.0) as usize;
        ink.extend((0..=steps).map(|i| {
            let t = i as f64 / steps as f64;
            (p.0 + t * (q.0 - p.0), p.1 + t * (q.1 - p.1))
        }));
    }
    let shown: Vec<(f64, f64)> = pixels
        .into_iter()
        .flatten()
        .filter(|&p| a.contains(p))
        .collect();
    if shown.len() <= MARKERS_UP_TO {
        for &(x, y) in &shown {
            root.draw(&Circle::new(
                (x.round() as i32, y.round() as i32),
                3,
                colour.filled(),
            ))?;
        }
        ink.extend(shown);
    }
    Ok(())
}

/// Liang-Barsky: the part of segment p-q inside `(x0, y0, x1, y1)`.
fn clip(
    p: (f64, f64),
    q: (f64, f64),
    (x0, y0, x1, y1): (f64, f64, f64, f64),
) -> Option<((f64, f64), (f64, f64))> {
    let (dx, dy) = (q.0 - p.0, q.1 - p.1);
    let (mut t0, mut t1) = (0.0f64, 1.0f64);
    for (d, dist) in [
        (-dx, p.0 - x0),
        (dx, x1 - p.0),
        (-dy, p.1 - y0),
        (dy, y1 - p.1),
    ] {
        if d == 0.0 {
            if dist < 0.0 {
                return None;
            }
            continue;
        }
        let t = dist / d;
        if d < 0.0 {
            t0 = t0.max(t);
        } else {
            t1 = t1.min(t);
        }
        if t0 > t1 {
            return None;
        }
    }
    Some((
        (p.0 + t0 * dx, p.1 + t0 * dy),
        (p.0 + t1 * dx, p.1 + t1 * dy),
    ))
}

/// Draws p-q two pixels wide, solid or dashed; `phase` carries the dash pattern on to the next
/// segment of the same line.
fn stroke(
    root: &Area,
    p: (f64, f64),
    q: (f64, f64),
    colour: RGBColor,
    dashed: bool,
    phase: &mut f64,
) -> Result<(), DrawError> {
    let style = colour.stroke_width(2);
    if !dashed {
        return line(root, px(p), px(q), style);
    }
    let len = (q.0 - p.0).hypot(q.1 - p.1);
    let at = |d: f64| px((p.0 + (q.0 - p.0) * d / len, p.1 + (q.1 - p.1) * d / len));
    let period = DASH.0 + DASH.1;
    let mut d = 0.0;
    while d < len {
        let pos = *phase % period;
        let on = pos < DASH.0;
        let run = (if on { DASH.0 - pos } else { period - pos }).min(len - d);
        if on {
            line(root, at(d), at(d + run), style)?;
        }
        d += run;
        *phase += run;
    }
    Ok(())
}
/// The legend goes in whichever inner corner of the plot area the lines cross least.
fn draw_legend(
    root: &Area,
    a: &PlotArea,
    bars: &[Bars],
    series: &[Series],
    ink: &[(f64, f64)],
    s: u32,
) -> Result<(), DrawError> {
    // Bars first (they are drawn first), as a filled swatch (`None`); lines as a stroke
    // (`Some(dashed)`).
    type Entry<'a> = (&'a str, (u8, u8, u8), Option<bool>);
    let named: Vec<Entry> = bars
        .iter()
        .filter(|b| !b.name.is_empty())
        .map(|b| (b.name.as_str(), b.colour, None))
        .chain(
            series
                .iter()
                .filter(|s| !s.name.is_empty())
                .map(|s| (s.name.as_str(), s.colour, Some(s.dashed))),
        )
        .collect();
    if named.is_empty() {
        return Ok(());
    }
    let si = s as i32;
    let swatch = 18 * si;
    let row_h = text_height(s) as i32 + 3 * si;
    let names: Vec<String> = named
        .iter()
        .map(|n| fit_width(n.0, s, (a.right - a.left) / 2))
        .collect();
    let text_w = names.iter().map(|n| text_width(n, s)).max().unwrap_or(0) as i32;
    let (w, h) = (swatch + text_w + 4 * GAP, named.len() as i32 * row_h + GAP);
    let inset = 6;
    let corners = [
        (a.right - inset - w, a.top + inset),
        (a.left + inset, a.top + inset),
        (a.right - inset - w, a.bottom - inset - h),
        (a.left + inset, a.bottom - inset - h),
    ];
    let crossings = |&(x, y): &(i32, i32)| {
        ink.iter()
            .filter(|p| {
                p.0 >= x as f64 && p.0 <= (x + w) as f64 && p.1 >= y as f64 && p.1 <= (y + h) as f64
            })
            .count()
    };
    let (x, y) = *corners
        .iter()
        .min_by_key(|c| crossings(c))
        .expect("four corners");
    rect(root, (x, y), (x + w, y + h), WHITE.filled())?;
    rect(root, (x, y), (x + w, y + h), LEGEND_EDGE)?;
    for (i, (&(_, colour, dashed), name)) in named.iter().zip(&names).enumerate() {
        let row_y = y + GAP + i as i32 * row_h;
        let mid = row_y + cap_middle(s) as i32;
        let colour = rgb(colour);
        let (x0, x1) = ((x + GAP) as f64, (x + GAP + swatch) as f64);
        match dashed {
            Some(dashed) => {
                let mid = mid as f64;
                stroke(root, (x0, mid), (x1, mid), colour, dashed, &mut 0.0)?;
            }
            None => {
                let bottom = row_y + ascent(s) as i32;
                let top = bottom - cap_height(s) as i32;
                rect(root, (x0 as i32, top), (x1 as i32, bottom), colour.filled())?;
            }
        }
        draw_text(root, x + swatch + 3 * GAP, row_y, name, s, INK)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Heatmaps

struct HeatLayout {
    width: i32,
    height: i32,
    cell: i32,
    /// Top-left corner of the matrix.
    origin: (i32, i32),
    title_scale: u32,
    /// Label every k-th row / column so that labels never overlap.
    row_every: usize,
    col_every: usize,
    row_label_w: i32,
    value_range: (f64, f64),
    bar_ticks: Ticks,
}

impl HeatLayout {
    fn new(map: &Heatmap, cell_px: u32) -> Self {
        let cell = cell_px as i32;
        let (rows, cols) = (map.values.len() as i32, map.values[0].len() as i32);
        let pitch = text_height(1) as i32 + 1;
        let every = |labels: &[String]| {
            if labels.is_empty() {
                0
            } else {
                ((pitch + cell - 1) / cell) as usize
            }
        };
        let (row_every, col_every) = (every(&map.row_labels), every(&map.col_labels));
        let widest = |labels: &[String], every: usize| {
            labels
                .iter()
                .step_by(every.max(1))
                .map(|l| text_width(&truncate(l, MAX_LABEL_CHARS), 1) as i32)
                .max()
                .map_or(0, |w| w + GAP + TICK)
        };
        let row_label_w = widest(&map.row_labels, row_every);
        let col_label_h = widest(&map.col_labels, col_every);

        let finite = map
            .values
            .iter()
            .flatten()
            .copied()
            .filter(|v| v.is_finite());
        let lo = finite.clone().fold(0.0f64, f64::min);
        let hi = finite.fold(lo, f64::max);
        // Fractions (a normalised confusion matrix) keep the full 0..1 scale, so that colours
        // mean the same in every such map.
        let value_range = if lo >= 0.0 && hi <= 1.0 {
            (0.0, 1.0)
        } else {
            (lo, if hi > lo { hi } else { lo + 1.0 })
        };
        let (mw, mh) = (cols * cell, rows * cell);
        let bar_ticks = pick_ticks(value_range, false, mh as f64, |_| text_height(1) as i32 + 4);

        let title_scale = if text_width(&map.title, 2) as i32 <= row_label_w + mw {
            2
        } else {
            1
        };
        let title_h = if map.title.is_empty() {
            0
        } else {
            text_height(title_scale) as i32 + 2 * GAP
        };
        let origin = (MARGIN + row_label_w, MARGIN + title_h);
        let bar_w = 3 * GAP + 12 + TICK + GAP + bar_ticks.widest(1);
        let width = (origin.0 + mw + bar_w + MARGIN)
            .max(text_width(&map.title, title_scale) as i32 + 2 * MARGIN);
        HeatLayout {
            width,
            height: origin.1 + mh + col_label_h + MARGIN,
            cell,
            origin,
            title_scale,
            row_every,
            col_every,
            row_label_w,
            value_range,
            bar_ticks,
        }
    }

    fn colour(&self, v: f64) -> RGBColor {
        if !v.is_finite() {
            return MISSING;
        }
        let t =
            ((v - self.value_range.0) / (self.value_range.1 - self.value_range.0)).clamp(0.0, 1.0);
        // White through mid blue to dark blue (the ends of matplotlib's "Blues").
        let stops = [
            (255.0, 255.0, 255.0),
            (107.0, 174.0, 214.0),
            (8.0, 48.0, 107.0),
        ];
        let (i, f) = if t < 0.5 {
            (0, t * 2.0)
        } else {
            (1, t * 2.0 - 1.0)
        };
        let mix = |a: f64, b: f64| (a + (b - a) * f).round() as u8;
        let (a, b) = (stops[i], stops[i + 1]);
        RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
    }
}

fn cell_text(v: f64) -> Option<String> {
    if !v.is_finite() || v == 0.0 {
        return None;
    }
    Some(if v.fract() == 0.0 && v.abs() < 1e6 {
        format!("{v:.0}")
    } else if v.abs() < 1.0 {
        // ".85" rather than "0.85": the cells are small.
        format!("{v:.2}").replacen("0.", ".", 1)
    } else {
        format!("{v:.1}")
    })
}

fn draw_heatmap(
    root: &Area,
    map: &Heatmap,
    texts: Option<&[Vec<String>]>,
    h: &HeatLayout,
) -> Result<(), DrawError> {
    let (ox, oy, c) = (h.origin.0, h.origin.1, h.cell);
    let (rows, cols) = (map.values.len() as i32, map.values[0].len() as i32);
    let text_scale = if c >= 60 { 2 } else { 1 };
    for (r, row) in map.values.iter().enumerate() {
        for (k, &v) in row.iter().enumerate() {
            let (x, y) = (ox + k as i32 * c, oy + r as i32 * c);
            let bg = h.colour(v);
            rect(root, (x, y), (x + c, y + c), bg.filled())?;
            let text = match texts {
                Some(t) => Some(t[r][k].clone()).filter(|t| !t.is_empty()),
                None => cell_text(v).filter(|_| map.annotate),
            };
            let Some(text) = text else {
                continue;
            };
            let (tw, th) = (
                text_width(&text, text_scale) as i32,
                cap_height(text_scale) as i32,
            );
            if tw + 2 <= c && th + 2 <= c {
                let luma = 0.299 * bg.0 as f64 + 0.587 * bg.1 as f64 + 0.114 * bg.2 as f64;
                let dark = luma < 140.0;
                let ink = if dark { WHITE } else { INK };
                draw_text(
                    root,
                    x + (c - tw) / 2,
                    y + c / 2 - cap_middle(text_scale) as i32,
                    &text,
                    text_scale,
                    ink,
                )?;
            }
        }
    }
    rect(
        root,
        (ox - 1, oy - 1),
        (ox + cols * c, oy + rows * c),
        FRAME,
    )?;

    let centre = |i: usize| i as i32 * c + c / 2;
    for (r, label) in map
        .row_labels
        .iter()
        .enumerate()
        .step_by(h.row_every.max(1))
    {
        let label = truncate(label, MAX_LABEL_CHARS);
        let y = oy + centre(r);
        line(root, (ox - 1 - TICK, y), (ox - 1, y), FRAME)?;
        let x = ox - 1 - TICK - GAP - text_width(&label, 1) as i32;
        draw_text(
            root,
            x.max(MARGIN),
            y - cap_middle(1) as i32,
            &label,
            1,
            INK,
        )?;
    }
    let bottom = oy + rows * c;
    for (k, label) in map
        .col_labels
        .iter()
        .enumerate()
        .step_by(h.col_every.max(1))
    {
        let label = truncate(label, MAX_LABEL_CHARS);
        let x = ox + centre(k);
        line(root, (x, bottom), (x, bottom + TICK), FRAME)?;
        let y = bottom + TICK + GAP + text_width(&label, 1) as i32;
        draw_text_vertical(root, x - cap_middle(1) as i32, y, &label, 1, INK)?;
    }

    if !map.title.is_empty() {
        let tw = text_width(&map.title, h.title_scale) as i32;
        let tx = ((ox - h.row_label_w + ox + cols * c - tw) / 2).max(MARGIN);
        draw_text(root, tx, MARGIN + GAP, &map.title, h.title_scale, INK)?;
    }

    // Colour bar, highest value at the top.
    let bx = ox + cols * c + 3 * GAP;
    let bh = rows * c;
    let (lo, hi) = h.value_range;
    for i in 0..bh {
        let v = hi - (hi - lo) * (i as f64 + 0.5) / bh as f64;
        rect(
            root,
            (bx, oy + i),
            (bx + 12, oy + i + 1),
            h.colour(v).filled(),
        )?;
    }
    rect(root, (bx - 1, oy - 1), (bx + 12, oy + bh), FRAME)?;
    for (&v, label) in h.bar_ticks.values.iter().zip(&h.bar_ticks.labels) {
        let y = oy + ((hi - v) / (hi - lo) * (bh - 1) as f64).round() as i32;
        line(root, (bx + 12, y), (bx + 12 + TICK, y), FRAME)?;
        draw_text(
            root,
            bx + 12 + TICK + GAP,
            y - cap_middle(1) as i32,
            label,
            1,
            INK,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod fit_tests {
    use super::*;

    #[test]
    fn labels_are_cut_to_the_measured_width_not_a_character_count() {
        let title = "test.parquet (run-planktonclas/best@dc14f1a0): reliability (ECE 0.123)";
        assert_eq!(fit_width(title, 2, 10_000), title);
        let cut = fit_width(title, 2, 300);
        assert!(cut.ends_with("..") && text_width(&cut, 2) <= 300, "{cut}");
        // The longest cut that fits: one more character would not.
        let kept = cut.trim_end_matches("..").chars().count();
        let longer: String = title.chars().take(kept + 1).collect::<String>() + "..";
        assert!(text_width(&longer, 2) > 300, "{longer}");
        // Narrow letters: more of them fit in the same width.
        let narrow = fit_width(&"i".repeat(200), 1, 100);
        let wide = fit_width(&"m".repeat(200), 1, 100);
        assert!(narrow.len() > 2 * wide.len(), "{narrow} / {wide}");
        assert_eq!(fit_width("anything", 1, 0), "..");
    }
}
