//! `plankton drift`: how a stream of predictions moved away from a reference, without Grafana.
//! The current predictions are cut, in time order (`captured_at`, else `received_at`, else file
//! order), into windows of a fixed number of images; each window's predicted class mix is
//! compared with the reference files' mix (Jensen-Shannon, bits), beside its mean confidence,
//! unknown rate, image size and brightness where the files have them. A window drawn at random
//! from the reference mix diverges by sampling alone: the report draws 200 such windows and
//! marks their 95th percentile, so a reader sees which divergences mean something.
//!
//! Writes `drift.csv` (one row per window), `drift.json`, `drift.png` (the measures over time)
//! and `summary.md` into the output folder.

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::{Array, Float32Array, TimestampMillisecondArray, UInt32Array};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::Serialize;

use crate::sinks::parquet::{top_k, ParquetSinkError, Predictions};
use crate::sinks::plot::{render_line_charts, LineChart, PlotError, Series};
use plankton_core::drift::{js_divergence, DriftWindow, Observation, WindowStats};
use plankton_core::rng::{Purpose, Stream};

#[derive(Debug, thiserror::Error)]
pub enum DriftError {
    #[error(transparent)]
    Predictions(#[from] ParquetSinkError),
    #[error(transparent)]
    Plot(#[from] PlotError),
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{0}")]
    Input(String),
}

/// One predicted row, as drift sees it.
#[derive(Debug, Clone, Copy)]
struct Row {
    observation: Observation,
    /// captured_at, else received_at (ms since the epoch).
    time_ms: Option<i64>,
}

/// The rows of some predictions files (rows without a prediction are skipped), and their class
/// names.
fn read_rows(paths: &[PathBuf]) -> Result<(Vec<String>, Vec<Row>), DriftError> {
    let mut classes: Option<(Vec<String>, PathBuf)> = None;
    let mut rows = Vec::new();
    for path in paths {
        let p = Predictions::read(path)?;
        match &classes {
            None => classes = Some((p.class_names.clone(), path.clone())),
            Some((c, first)) if *c != p.class_names => {
                return Err(DriftError::Input(format!(
                    "{}: its classes differ from {}'s: predictions of another model cannot be compared class by class",
                    path.display(),
                    first.display()
                )))
            }
            Some(_) => {}
        }
        let extra = served_columns(path)?;
        for (i, r) in p.rows.iter().enumerate() {
            let Some(probs) = &r.probabilities else {
                continue;
            };
            let top = top_k(probs, 1)[0];
            let e = extra.get(i).copied().unwrap_or_default();
            rows.push(Row {
                observation: Observation {
                    predicted: top,
                    confidence: f64::from(probs[top]),
                    unknown: r.unknown.unknown,
                    pixels: e.size.map(|(h, w)| u64::from(h) * u64::from(w)),
                    brightness: e.brightness.map(f64::from),
                },
                time_ms: e.time_ms,
            });
        }
    }
    let (classes, _) = classes.ok_or_else(|| DriftError::Input("no predictions files".into()))?;
    Ok((classes, rows))
}

#[derive(Debug, Clone, Copy, Default)]
struct Extra {
    time_ms: Option<i64>,
    size: Option<(u32, u32)>,
    brightness: Option<f32>,
}

/// The daemon's columns a drift report uses, by row (empty for files without them).
fn served_columns(path: &Path) -> Result<Vec<Extra>, DriftError> {
    let bad = |m: String| {
        DriftError::Predictions(ParquetSinkError::Format {
            path: path.to_path_buf(),
            reason: m,
        })
    };
    let file = File::open(path).map_err(|e| DriftError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| bad(format!("cannot read Parquet: {e}")))?;
    let wanted = [
        "captured_at",
        "received_at",
        "image_height",
        "image_width",
        "image_brightness",
    ];
    let fields = builder.schema().fields();
    let roots: Vec<usize> = wanted
        .iter()
        .filter_map(|w| fields.iter().position(|f| f.name() == w))
        .collect();
    if roots.is_empty() {
        return Ok(Vec::new());
    }
    let mask = parquet::arrow::ProjectionMask::roots(builder.parquet_schema(), roots);
    let reader = builder
        .with_projection(mask)
        .build()
        .map_err(|e| bad(format!("cannot read Parquet: {e}")))?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| bad(format!("cannot read Parquet: {e}")))?;
        let ts = |n: &str| {
            batch.column_by_name(n).and_then(|c| {
                c.as_any()
                    .downcast_ref::<TimestampMillisecondArray>()
                    .cloned()
            })
        };
        let u32s = |n: &str| {
            batch
                .column_by_name(n)
                .and_then(|c| c.as_any().downcast_ref::<UInt32Array>().cloned())
        };
        let (captured, received) = (ts("captured_at"), ts("received_at"));
        let (heights, widths) = (u32s("image_height"), u32s("image_width"));
        let brightness = batch
            .column_by_name("image_brightness")
            .and_then(|c| c.as_any().downcast_ref::<Float32Array>().cloned());
        for i in 0..batch.num_rows() {
            let at_ts = |a: &Option<TimestampMillisecondArray>| {
                a.as_ref().and_then(|a| (!a.is_null(i)).then(|| a.value(i)))
            };
            let at_u32 = |a: &Option<UInt32Array>| {
                a.as_ref().and_then(|a| (!a.is_null(i)).then(|| a.value(i)))
            };
            out.push(Extra {
                time_ms: at_ts(&captured).or(at_ts(&received)),
                size: at_u32(&heights).zip(at_u32(&widths)),
                brightness: brightness
                    .as_ref()
                    .and_then(|a| (!a.is_null(i)).then(|| a.value(i))),
            });
        }
    }
    Ok(out)
}

#[derive(Debug, Clone)]
pub struct DriftOptions {
    pub reference: Vec<PathBuf>,
    pub current: Vec<PathBuf>,
    pub out: PathBuf,
    /// Images per window.
    pub window: usize,
}

/// A class whose share moved most between the reference and a window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassShift {
    pub class: String,
    pub reference_share: f64,
    pub share: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WindowReport {
    pub index: usize,
    pub first_row: usize,
    pub start_ms: Option<i64>,
    pub end_ms: Option<i64>,
    #[serde(flatten)]
    pub stats: WindowStats,
    /// The divergence a window of this many images drawn from the reference mix stays under
    /// 95% of the time: a short last window diverges more by chance alone.
    pub noise_95: Option<f64>,
    /// The three classes whose share changed most, largest change first.
    pub moved: Vec<ClassShift>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DriftReport {
    pub reference_images: usize,
    pub current_images: usize,
    pub window: usize,
    /// The reference itself, as one window (its divergence from itself is 0).
    pub reference: WindowStats,
    /// 95th percentile of the divergence of windows of `window` images drawn at random from the
    /// reference mix.
    pub noise_divergence_95: Option<f64>,
    pub windows: Vec<WindowReport>,
    /// Whether the current rows were ordered by time (else file order).
    pub time_ordered: bool,
}

/// A time in ms since the epoch as ISO 8601 (seconds).
fn iso_ms(ms: i64) -> String {
    plankton_core::clock::utc_iso8601(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64),
    )
}

/// The divergence of `draws` windows of `n` images drawn from `mix`: its 95th percentile.
fn noise_floor(mix: &[f64], n: usize, draws: usize) -> Option<f64> {
    let total: f64 = mix.iter().sum();
    if total <= 0.0 || n == 0 {
        return None;
    }
    let mut cdf = Vec::with_capacity(mix.len());
    let mut acc = 0.0;
    for &m in mix {
        acc += m / total;
        cdf.push(acc);
    }
    let mut rng = Stream::new(17, Purpose::Other, n as u64, mix.len() as u64);
    let mut d: Vec<f64> = (0..draws)
        .filter_map(|_| {
            let mut counts = vec![0f64; mix.len()];
            for _ in 0..n {
                let u = rng.next_f64();
                let k = cdf.partition_point(|&c| c <= u).min(mix.len() - 1);
                counts[k] += 1.0;
            }
            js_divergence(&counts, mix)
        })
        .collect();
    d.sort_by(f64::total_cmp);
    d.get(((d.len() as f64 * 0.95) as usize).min(d.len().saturating_sub(1)))
        .copied()
}

pub fn run(opts: &DriftOptions) -> Result<DriftReport, DriftError> {
    if opts.window == 0 {
        return Err(DriftError::Input("--window must be > 0".into()));
    }
    if opts.reference.is_empty() || opts.current.is_empty() {
        return Err(DriftError::Input(
            "give --reference and --current predictions files".into(),
        ));
    }
    let (classes, reference) = read_rows(&opts.reference)?;
    let (current_classes, mut current) = read_rows(&opts.current)?;
    if classes != current_classes {
        return Err(DriftError::Input(format!(
            "{}: its classes differ from the reference's ({}): predictions of another model cannot be compared class by class",
            opts.current[0].display(),
            opts.reference[0].display()
        )));
    }
    let names = |paths: &[PathBuf]| {
        paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (rows, paths) in [(&reference, &opts.reference), (&current, &opts.current)] {
        if rows.is_empty() {
            return Err(DriftError::Input(format!(
                "{}: no predicted image (every row is an error row, or there are none)",
                names(paths)
            )));
        }
    }
    // A window beyond the data is the data (and the noise draws stay as large as the data).
    let window = opts.window.min(current.len());
    let time_ordered = current.iter().all(|r| r.time_ms.is_some());
    if time_ordered {
        current.sort_by_key(|r| r.time_ms);
    }
    let mut whole = DriftWindow::new(classes.len(), reference.len());
    for r in &reference {
        whole.push(&r.observation);
    }
    let mix: Vec<f64> = whole.counts().iter().map(|&c| c as f64).collect();
    let reference_stats = whole.stats(&mix);
    let total: f64 = mix.iter().sum();
    let reference_share: Vec<f64> = mix.iter().map(|c| c / total).collect();
    let mut windows = Vec::new();
    let mut noise_by_size: std::collections::HashMap<usize, Option<f64>> = Default::default();
    for (index, chunk) in current.chunks(window).enumerate() {
        let mut w = DriftWindow::new(classes.len(), chunk.len());
        for r in chunk {
            w.push(&r.observation);
        }
        let n = chunk.len() as f64;
        let mut moved: Vec<ClassShift> = w
            .counts()
            .iter()
            .enumerate()
            .map(|(k, &c)| ClassShift {
                class: classes[k].clone(),
                reference_share: reference_share[k],
                share: c as f64 / n,
            })
            .collect();
        moved.sort_by(|a, b| {
            (b.share - b.reference_share)
                .abs()
                .total_cmp(&(a.share - a.reference_share).abs())
        });
        moved.truncate(3);
        let noise_95 = *noise_by_size
            .entry(chunk.len())
            .or_insert_with(|| noise_floor(&mix, chunk.len(), 200));
        windows.push(WindowReport {
            index,
            first_row: index * window,
            start_ms: chunk.first().and_then(|r| r.time_ms),
            end_ms: chunk.last().and_then(|r| r.time_ms),
            stats: w.stats(&mix),
            noise_95,
            moved,
        });
    }
    let report = DriftReport {
        reference_images: reference.len(),
        current_images: current.len(),
        window,
        reference: reference_stats,
        noise_divergence_95: noise_by_size.get(&window).copied().flatten(),
        windows,
        time_ordered,
    };
    write(&opts.out, &report)?;
    Ok(report)
}

fn write(dir: &Path, r: &DriftReport) -> Result<(), DriftError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e: std::io::Error| DriftError::Io {
            path,
            message: e.to_string(),
        }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let json = dir.join("drift.json");
    std::fs::write(&json, serde_json::to_vec_pretty(r).expect("serialisable"))
        .map_err(io(&json))?;
    let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.6}"));
    let time = |v: Option<i64>| v.map_or(String::new(), iso_ms);
    let mut csv = String::from("window,first_row,images,start,end,divergence_bits,noise_95_bits,mean_confidence,unknown_rate,mean_pixels,mean_brightness,moved_most\n");
    for w in &r.windows {
        csv.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{},{}\n",
            w.index,
            w.first_row,
            w.stats.images,
            time(w.start_ms),
            time(w.end_ms),
            opt(w.stats.divergence),
            opt(w.noise_95),
            opt(w.stats.mean_confidence),
            opt(w.stats.unknown_rate),
            opt(w.stats.mean_pixels),
            opt(w.stats.mean_brightness),
            w.moved.first().map_or(String::new(), |m| format!(
                "\"{}\"",
                m.class.replace('"', "\"\"")
            ))
        ));
    }
    let path = dir.join("drift.csv");
    std::fs::write(&path, csv).map_err(io(&path))?;
    render(&dir.join("drift.png"), r)?;
    let path = dir.join("summary.md");
    std::fs::write(&path, summary(r)).map_err(io(&path))?;
    Ok(())
}

/// x of a window: hours since the first window's start when time-ordered, else its index.
fn x_of(r: &DriftReport, w: &WindowReport) -> f64 {
    match (
        r.time_ordered,
        r.windows.first().and_then(|f| f.start_ms),
        w.end_ms,
    ) {
        (true, Some(t0), Some(t)) => (t - t0) as f64 / 3.6e6,
        _ => w.index as f64,
    }
}

fn render(path: &Path, r: &DriftReport) -> Result<(), PlotError> {
    let x_label = if r.time_ordered {
        "hours since the first image (window ends)"
    } else {
        "window (file order)"
    };
    let line = |name: &str, f: &dyn Fn(&WindowStats) -> Option<f64>, colour| Series {
        name: name.into(),
        points: r
            .windows
            .iter()
            .filter_map(|w| f(&w.stats).map(|v| (x_of(r, w), v)))
            .collect(),
        colour,
        dashed: false,
    };
    let flat = |name: &str, v: Option<f64>| -> Option<Series> {
        let v = v?;
        let xs: Vec<f64> = r.windows.iter().map(|w| x_of(r, w)).collect();
        let (lo, hi) = (
            xs.iter().copied().fold(f64::INFINITY, f64::min),
            xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        );
        Some(Series {
            name: name.into(),
            points: vec![(lo, v), (hi.max(lo + 1e-9), v)],
            colour: (120, 120, 120),
            dashed: true,
        })
    };
    let blue = (31, 119, 180);
    let mut charts = vec![LineChart {
        title: format!("class mix vs reference ({} images a window)", r.window),
        x_label: x_label.into(),
        y_label: "Jensen-Shannon divergence (bits)".into(),
        series: std::iter::once(line("window", &|s| s.divergence, blue))
            .chain(flat("sampling noise (95%)", r.noise_divergence_95))
            .collect(),
        log_y: false,
        y_range: None,
    }];
    let mut add = |title: &str, y: &str, f: &dyn Fn(&WindowStats) -> Option<f64>| {
        let s = line("window", f, blue);
        if s.points.is_empty() {
            return;
        }
        charts.push(LineChart {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y.into(),
            series: std::iter::once(s)
                .chain(flat("reference", f(&r.reference)))
                .collect(),
            log_y: false,
            y_range: None,
        });
    };
    add("mean confidence", "top-1 probability", &|s| {
        s.mean_confidence
    });
    add("unknown rate", "share called unknown", &|s| s.unknown_rate);
    add("image size", "mean pixels (h x w)", &|s| s.mean_pixels);
    add("brightness", "mean grey level (0-255)", &|s| {
        s.mean_brightness
    });
    let width = 440 * charts.len() as u32;
    render_line_charts(path, &charts, width.max(900), 440)
}

/// The window furthest from the reference relative to its own sampling noise (a short last
/// window diverges more by chance).
pub fn furthest(r: &DriftReport) -> Option<&WindowReport> {
    let excess = |w: &WindowReport| {
        w.stats.divergence.unwrap_or(0.0) / w.noise_95.filter(|n| *n > 0.0).unwrap_or(1.0)
    };
    r.windows
        .iter()
        .max_by(|a, b| excess(a).total_cmp(&excess(b)))
}

fn summary(r: &DriftReport) -> String {
    let f = |v: Option<f64>, d: usize| v.map_or("n/a".to_string(), |v| format!("{v:.d$}"));
    let mut t = format!(
        "# Drift report\n\nReference: {} images. Current: {} images in {} windows of {} ({}).\n\nSampling noise: a window of {} images drawn from the reference mix diverges by up to {} bits (95th percentile of 200 draws).\n\n",
        r.reference_images,
        r.current_images,
        r.windows.len(),
        r.window,
        if r.time_ordered { "in time order" } else { "in file order: the files have no capture or receive times" },
        r.window,
        f(r.noise_divergence_95, 3)
    );
    t.push_str("| | divergence (bits) | confidence | unknown rate | pixels | brightness |\n|---|---|---|---|---|---|\n");
    t.push_str(&format!(
        "| reference | 0 | {} | {} | {} | {} |\n",
        f(r.reference.mean_confidence, 3),
        f(r.reference.unknown_rate, 3),
        f(r.reference.mean_pixels, 0),
        f(r.reference.mean_brightness, 1)
    ));
    for w in &r.windows {
        t.push_str(&format!(
            "| window {} ({} images{}) | {} (noise {}) | {} | {} | {} | {} |\n",
            w.index,
            w.stats.images,
            w.start_ms
                .map_or(String::new(), |s| format!(", from {}", iso_ms(s))),
            f(w.stats.divergence, 3),
            f(w.noise_95, 3),
            f(w.stats.mean_confidence, 3),
            f(w.stats.unknown_rate, 3),
            f(w.stats.mean_pixels, 0),
            f(w.stats.mean_brightness, 1)
        ));
    }
    if let Some(w) = furthest(r) {
        t.push_str(&format!(
            "\nFurthest window: {} ({} bits). Classes that moved most there:\n\n",
            w.index,
            f(w.stats.divergence, 3)
        ));
        for m in &w.moved {
            t.push_str(&format!(
                "- {}: {:.1}% of the reference, {:.1}% of the window\n",
                m.class.replace('|', "\\|"),
                100.0 * m.reference_share,
                100.0 * m.share
            ));
        }
    }
    t.push_str("\n![drift over time](drift.png)\n");
    t
}
