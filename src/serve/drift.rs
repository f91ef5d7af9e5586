//! Drift gauges of the daemon: per source (camera), a rolling window of the last images'
//! predicted class mix against the run's training prior (Jensen-Shannon, bits), mean
//! confidence, unknown rate, image size and brightness (`plankton_core::drift`), exported as
//! Prometheus gauges labelled by `source` only. Sources are bounded: past `max_sources` the
//! rest share `source="other"`, so a camera per folder cannot blow up the series count. Alert
//! rules over these gauges: docker/prometheus/alerts.yml.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use plankton_core::drift::{DriftWindow, Observation};

pub const DRIFT_IMAGES: &str = "plankton_drift_images_total";
pub const DRIFT_WINDOW_IMAGES: &str = "plankton_drift_window_images";
pub const DRIFT_DIVERGENCE: &str = "plankton_drift_class_divergence";
pub const DRIFT_CONFIDENCE: &str = "plankton_drift_mean_confidence";
pub const DRIFT_UNKNOWN_RATE: &str = "plankton_drift_unknown_rate";
pub const DRIFT_PIXELS: &str = "plankton_drift_mean_image_pixels";
pub const DRIFT_BRIGHTNESS: &str = "plankton_drift_mean_brightness";

/// `[drift]` of the daemon's config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DriftConfig {
    pub enabled: bool,
    /// Images per rolling window (per source).
    pub window_images: usize,
    /// The gauges of a source are set once its window holds this many images: a handful of
    /// images says nothing about a class mix.
    pub min_images: usize,
    /// Distinct `source` label values; later sources are counted as `other`.
    pub max_sources: usize,
}

impl Default for DriftConfig {
    fn default() -> Self {
        DriftConfig {
            enabled: true,
            window_images: 500,
            min_images: 100,
            max_sources: 8,
        }
    }
}

impl DriftConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.window_images == 0 {
            return Err("[drift] window_images must be > 0".into());
        }
        if self.min_images > self.window_images {
            return Err(format!(
                "[drift] min_images {} exceeds window_images {}: the gauges would never be set",
                self.min_images, self.window_images
            ));
        }
        if self.max_sources == 0 {
            return Err("[drift] max_sources must be > 0".into());
        }
        Ok(())
    }
}

/// The drift label of an image's source: `http` for uploads, `nats:<last subject token>` for NATS
/// messages, `watch:<first folder below the watched one>` for watched files (a camera per
/// folder; `watch` for files at its top), and a publisher's own `Plankton-Source` header as
/// given (at most 64 characters). The prefixes keep a camera folder named `http` or `other` apart
/// from those buckets.
pub fn source_label(source: &str, watch_dir: &std::path::Path) -> String {
    if source == "http" || source.starts_with("http:") {
        return "http".into();
    }
    if let Some(subject) = source.strip_prefix("nats:") {
        let token = subject.split(['/', ':']).next().unwrap_or(subject);
        let last = token.rsplit('.').next().unwrap_or(token);
        return if last.is_empty() {
            "nats".into()
        } else {
            format!("nats:{last}")
        };
    }
    let path = std::path::Path::new(source);
    match path.strip_prefix(watch_dir) {
        Ok(rel) if rel.components().count() > 1 => rel
            .components()
            .next()
            .map(|c| {
                let name: String = c.as_os_str().to_string_lossy().chars().take(64).collect();
                format!("watch:{name}")
            })
            .unwrap_or_else(|| "watch".into()),
        Ok(_) => "watch".into(),
        Err(_) if path.is_absolute() => "other".into(),
        Err(_) => source.chars().take(64).collect(),
    }
}

/// Rolling windows per source and the gauges they set.
pub struct DriftTracker {
    cfg: DriftConfig,
    prior: Vec<f64>,
    windows: HashMap<String, DriftWindow>,
}

impl DriftTracker {
    /// `prior`: the run's training class frequencies (what the class mix is compared with).
    pub fn new(cfg: DriftConfig, prior: Vec<f64>) -> Self {
        DriftTracker {
            cfg,
            prior,
            windows: HashMap::new(),
        }
    }

    /// Another model (other classes, other prior): the windows start over.
    pub fn reset(&mut self, prior: Vec<f64>) {
        self.prior = prior;
        self.windows.clear();
    }

    /// Label values in use (at most `max_sources` + `other`).
    pub fn sources(&self) -> Vec<String> {
        let mut s: Vec<String> = self.windows.keys().cloned().collect();
        s.sort();
        s
    }

    /// Adds one predicted image and updates its source's gauges.
    pub fn observe(&mut self, source: String, o: &Observation) {
        if !self.cfg.enabled {
            return;
        }
        let label =
            if self.windows.contains_key(&source) || self.windows.len() < self.cfg.max_sources {
                source
            } else {
                "other".to_string()
            };
        let classes = self.prior.len();
        let capacity = self.cfg.window_images;
        let window = self
            .windows
            .entry(label.clone())
            .or_insert_with(|| DriftWindow::new(classes, capacity));
        window.push(o);
        metrics::counter!(DRIFT_IMAGES, "source" => label.clone()).increment(1);
        let stats = window.stats(&self.prior);
        metrics::gauge!(DRIFT_WINDOW_IMAGES, "source" => label.clone()).set(stats.images as f64);
        if (stats.images as usize) < self.cfg.min_images {
            return;
        }
        let set = |name: &'static str, v: Option<f64>| {
            if let Some(v) = v {
                metrics::gauge!(name, "source" => label.clone()).set(v);
            }
        };
        set(DRIFT_DIVERGENCE, stats.divergence);
        set(DRIFT_CONFIDENCE, stats.mean_confidence);
        set(DRIFT_UNKNOWN_RATE, stats.unknown_rate);
        set(DRIFT_PIXELS, stats.mean_pixels);
        set(DRIFT_BRIGHTNESS, stats.mean_brightness);
    }
}

/// Describes the gauges (HELP lines).
pub fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_counter!(
        DRIFT_IMAGES,
        "Predicted images per source (a camera that stops sending shows here first)"
    );
    describe_gauge!(
        DRIFT_WINDOW_IMAGES,
        "Images in the source's rolling drift window"
    );
    describe_gauge!(DRIFT_DIVERGENCE, "Jensen-Shannon divergence (bits, 0-1) of the window's predicted class mix from the run's training class frequencies");
    describe_gauge!(DRIFT_CONFIDENCE, "Mean top-1 probability over the window");
    describe_gauge!(
        DRIFT_UNKNOWN_RATE,
        "Share of the window's images the run's unknown rule calls unknown"
    );
    describe_gauge!(
        DRIFT_PIXELS,
        "Mean decoded image size (height x width) over the window"
    );
    describe_gauge!(
        DRIFT_BRIGHTNESS,
        "Mean grey level (0-255) of the window's decoded images"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn source_labels_stay_few_and_meaningful() {
        let w = Path::new("/data/in");
        assert_eq!(source_label("http", w), "http");
        assert_eq!(source_label("http:IMG_1.jpg", w), "http");
        assert_eq!(source_label("/data/in/cam2/2026/x.png", w), "watch:cam2");
        assert_eq!(source_label("/data/in/other/x.png", w), "watch:other");
        assert_eq!(source_label("/data/in/x.png", w), "watch");
        assert_eq!(source_label("/elsewhere/x.png", w), "other");
        assert_eq!(source_label("nats:plankton.images.cam7", w), "nats:cam7");
        assert_eq!(source_label("IFCB104", w), "IFCB104");
    }

    #[test]
    fn sources_past_the_bound_share_other() {
        let mut t = DriftTracker::new(
            DriftConfig {
                max_sources: 2,
                ..Default::default()
            },
            vec![0.5, 0.5],
        );
        let o = Observation {
            predicted: 0,
            confidence: 0.9,
            unknown: None,
            pixels: None,
            brightness: None,
        };
        for s in ["a", "b", "c", "d", "a"] {
            t.observe(s.into(), &o);
        }
        assert_eq!(t.sources(), ["a", "b", "other"]);
        assert!(DriftConfig {
            min_images: 600,
            ..Default::default()
        }
        .validate()
        .is_err());
    }
}
