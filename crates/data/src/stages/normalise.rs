//! ZMUV normalisation: one global scalar mean and std per network input, estimated on augmented
//! training patches, stored with the run and applied as (x - mean) / std at train and predict
//! time alike.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum NormaliseError {
    #[error("{path}: cannot read/write ZMUV stats: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid ZMUV stats: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Zmuv {
    pub mean: f32,
    pub std: f32,
}

impl Zmuv {
    pub const IDENTITY: Zmuv = Zmuv {
        mean: 0.0,
        std: 1.0,
    };

    #[inline]
    pub fn apply(&self, xs: &mut [f32]) {
        let (m, inv) = (self.mean, 1.0 / self.std);
        for x in xs {
            *x = (*x - m) * inv;
        }
    }
}

/// What is saved next to a run (`zmuv.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZmuvStats {
    /// One entry per network input, in `[[patch]]` order.
    pub inputs: Vec<Zmuv>,
    /// Number of augmented patches the estimate is based on.
    pub samples: usize,
    pub seed: u64,
}

impl ZmuvStats {
    pub fn save(&self, path: &Path) -> Result<(), NormaliseError> {
        let io = |source| NormaliseError::Io {
            path: path.to_path_buf(),
            source,
        };
        let json = serde_json::to_vec_pretty(self).expect("serialisable");
        plankton_core::fsx::write_atomic(path, &json).map_err(|e| io(e.source))
    }

    pub fn load(path: &Path) -> Result<Self, NormaliseError> {
        let bytes = std::fs::read(path).map_err(|source| NormaliseError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |reason: String| NormaliseError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let stats: ZmuvStats =
            serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
        if stats.inputs.is_empty() {
            return Err(invalid("no inputs".into()));
        }
        if let Some(z) = stats
            .inputs
            .iter()
            .find(|z| !(z.std > 0.0 && z.std.is_finite() && z.mean.is_finite()))
        {
            return Err(invalid(format!(
                "mean {} / std {} must be finite with std > 0",
                z.mean, z.std
            )));
        }
        Ok(stats)
    }
}

/// Streaming mean/variance over all pixels of many patches (f64 sums: 8192 patches of 95x95
/// are 74M pixels, beyond what f32 accumulates exactly).
#[derive(Debug, Clone, Default)]
pub struct ZmuvAccumulator {
    n: u64,
    sum: f64,
    sumsq: f64,
}

impl ZmuvAccumulator {
    pub fn add(&mut self, xs: &[f32]) {
        // Per-patch partial sums keep the f64 additions few and the rounding error small.
        let (mut s, mut q) = (0f64, 0f64);
        for &x in xs {
            let x = x as f64;
            s += x;
            q += x * x;
        }
        self.n += xs.len() as u64;
        self.sum += s;
        self.sumsq += q;
    }

    pub fn merge(&mut self, other: &ZmuvAccumulator) {
        self.n += other.n;
        self.sum += other.sum;
        self.sumsq += other.sumsq;
    }

    pub fn finish(&self) -> Zmuv {
        if self.n == 0 {
            return Zmuv::IDENTITY;
        }
        let mean = self.sum / self.n as f64;
        let var = (self.sumsq / self.n as f64 - mean * mean).max(0.0);
        // A constant input (all background) would give std 0; fall back to 1 rather than NaN.
        let std = if var > 1e-12 { var.sqrt() } else { 1.0 };
        Zmuv {
            mean: mean as f32,
            std: std as f32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulator_matches_two_pass_statistics() {
        let a: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
            .collect();
        let b: Vec<f32> = (0..500).map(|i| (i as f32 / 500.0).powi(2)).collect();
        let mut acc = ZmuvAccumulator::default();
        acc.add(&a);
        acc.add(&b);
        let all: Vec<f64> = a.iter().chain(&b).map(|&x| x as f64).collect();
        let mean = all.iter().sum::<f64>() / all.len() as f64;
        let std = (all.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / all.len() as f64).sqrt();
        let z = acc.finish();
        assert!((z.mean as f64 - mean).abs() < 1e-6 && (z.std as f64 - std).abs() < 1e-6);
        let mut xs = all.iter().map(|&x| x as f32).collect::<Vec<_>>();
        z.apply(&mut xs);
        let m2 = xs.iter().map(|&x| x as f64).sum::<f64>() / xs.len() as f64;
        assert!(m2.abs() < 1e-5);
    }

    #[test]
    fn stats_roundtrip_and_validation() {
        let dir = std::env::temp_dir().join(format!("zmuv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("zmuv.json");
        let s = ZmuvStats {
            inputs: vec![Zmuv {
                mean: 0.1,
                std: 0.2,
            }],
            samples: 10,
            seed: 3,
        };
        s.save(&p).unwrap();
        assert_eq!(ZmuvStats::load(&p).unwrap(), s);
        std::fs::write(
            &p,
            r#"{"inputs":[{"mean":0.1,"std":0.0}],"samples":1,"seed":1}"#,
        )
        .unwrap();
        assert!(ZmuvStats::load(&p)
            .unwrap_err()
            .to_string()
            .contains("zmuv.json"));
    }
}
