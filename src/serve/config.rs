//! The daemon's config file (`plankton serve --pipeline pipelines/camera-daemon.toml`): which
//! trained run to serve, where images come from, where predictions go, and how hard to push.
//! The image pipeline itself (patches, ZMUV, network, TTA ranges) is the run's own
//! `pipeline.toml`, so the daemon cannot drift from what the model was trained with.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::predict::aggregate::Aggregation;

#[derive(Debug, thiserror::Error)]
pub enum ServeConfigError {
    #[error("{path}: cannot read daemon config: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{path}: invalid daemon config: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// What a source does when the ingest queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backpressure {
    /// Wait for room (a folder source simply picks files up later).
    Block,
    /// Refuse at once (HTTP answers 503 with Retry-After).
    Reject,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    pub name: String,
    /// Run directory written by `plankton train`.
    pub model: PathBuf,
    /// "best", "final" or a .safetensors path.
    pub weights: String,
    /// auto (cuda:0 when a GPU is usable, else the CPU), cpu, cuda or cuda:N.
    pub device: String,
    /// Overrides the run's `[compute] precision` ("fp32" or "bf16").
    pub precision: Option<crate::device::Precision>,
    /// Test-time transforms per image (1 = one pass: lowest latency).
    pub tta: usize,
    pub aggregation: Aggregation,
    /// libtorch intra-op threads (0 = libtorch's default).
    pub threads: usize,
    pub watch: WatchConfig,
    pub http: HttpConfig,
    pub nats: NatsConfig,
    pub batch: MicroBatchConfig,
    pub queue: QueueConfig,
    pub output: OutputConfig,
    pub checks: ImageChecks,
    /// Rolling drift windows per source, exported as gauges (`serve::drift`).
    pub drift: super::drift::DriftConfig,
    /// Durable copy of every accepted image until its prediction is in a finished file.
    pub spool: PathBuf,
    /// Bad input goes here, with a `.reason` file beside it.
    pub quarantine: PathBuf,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            name: "camera-daemon".into(),
            model: PathBuf::from("run"),
            weights: "best".into(),
            device: "auto".into(),
            precision: None,
            tta: 1,
            aggregation: Aggregation::MeanProbability,
            threads: 0,
            watch: WatchConfig::default(),
            http: HttpConfig::default(),
            nats: NatsConfig::default(),
            batch: MicroBatchConfig::default(),
            queue: QueueConfig::default(),
            output: OutputConfig::default(),
            checks: ImageChecks::default(),
            drift: super::drift::DriftConfig::default(),
            spool: PathBuf::from("serve/spool"),
            quarantine: PathBuf::from("serve/quarantine"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WatchMode {
    /// inotify (or the platform's equivalent), with a periodic rescan as a safety net.
    Notify,
    /// Rescan the folder every `poll_interval_ms` (network mounts, where no events arrive).
    Poll,
}

/// What the folder source does with symbolic links in the watched folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SymlinkPolicy {
    /// Never follow a link (each is skipped, logged once and counted).
    Skip,
    /// Follow a link whose target is a file inside the watched folder; skip every other.
    Inside,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatchConfig {
    pub enabled: bool,
    pub dir: PathBuf,
    pub recursive: bool,
    pub mode: WatchMode,
    pub poll_interval_ms: u64,
    /// A file is taken once its size and modification time have not changed for this long.
    pub settle_ms: u64,
    /// An IFCB bin (`<bin>.hdr`, `.adc`, `.roi`) is taken once all three files are present and
    /// none has changed for this long: the instrument writes a bin over minutes, pausing
    /// between triggers. Its ROIs are then predicted one by one (ids: the ROI pids).
    pub ifcb_settle_ms: u64,
    /// Files still being written under a temporary name (rename-into-place convention).
    pub ignore_suffixes: Vec<String>,
    pub backpressure: Backpressure,
    /// Symbolic links: `skip` (default) or `inside` (only links to files within the folder).
    pub symlinks: SymlinkPolicy,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            enabled: false,
            dir: PathBuf::from("serve/in"),
            recursive: true,
            mode: WatchMode::Notify,
            poll_interval_ms: 1000,
            settle_ms: 500,
            ifcb_settle_ms: 60_000,
            ignore_suffixes: vec![".tmp".into(), ".part".into(), ".partial".into()],
            backpressure: Backpressure::Block,
            symlinks: SymlinkPolicy::Skip,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub enabled: bool,
    /// Also serves /metrics, /healthz and /readyz.
    pub bind: String,
    pub max_body_bytes: usize,
    /// An upload whose body stops arriving for this long gets 408 (a stalled client does not
    /// hold a connection forever; a slow but steady one is never cut).
    pub body_idle_timeout_ms: u64,
    /// A connection with no complete request head (line and headers) for this long is closed:
    /// one sending its head too slowly, and one idle between two requests (keep-alive), alike.
    /// Answers say so (`Keep-Alive: timeout=N`).
    pub header_timeout_ms: u64,
    /// File holding the bearer token uploads must present; required when `bind` is not loopback.
    pub token_file: Option<PathBuf>,
    /// How long `?wait=true` waits for the prediction.
    pub sync_timeout_ms: u64,
    pub backpressure: Backpressure,
    pub retry_after_seconds: u64,
    /// Recent predictions kept in memory for `GET /v1/predictions/{id}`.
    pub recent_results: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: true,
            bind: "127.0.0.1:8470".into(),
            max_body_bytes: 16 << 20,
            body_idle_timeout_ms: 30_000,
            header_timeout_ms: 75_000,
            token_file: None,
            sync_timeout_ms: 10_000,
            backpressure: Backpressure::Reject,
            retry_after_seconds: 1,
            recent_results: 100_000,
        }
    }
}

/// A JetStream pull consumer shared by every daemon of a group (see `serve::nats`): each
/// message is one image (its bytes, or a `Plankton-Ref` header naming a file on shared storage),
/// acked once its row is in a finished Parquet file, so a daemon that dies leaves its messages to
/// the others.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    pub enabled: bool,
    /// Server URLs of one cluster (`nats://host:4222`, `tls://host:4222`); the client fails over
    /// between them and reconnects without end.
    pub servers: Vec<String>,
    /// File holding a token (`authorization { token }` on the server).
    pub token_file: Option<PathBuf>,
    /// User name, with `password_file`.
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    /// A `.creds` file (JWT + NKey seed), as `nsc` writes them.
    pub credentials_file: Option<PathBuf>,
    /// Refuse to talk to a server without TLS.
    pub tls: bool,
    /// CA certificates (PEM) to trust beyond the system's (TLS is then required).
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// The JetStream stream holding the images.
    pub stream: String,
    /// The stream's subjects, used when the daemon creates the stream (`create_stream`).
    pub subjects: Vec<String>,
    /// Create the stream (file storage, limits retention) if it does not exist yet; off where
    /// the stream is provisioned with its own retention by whoever runs the servers.
    pub create_stream: bool,
    /// The durable consumer every daemon of the group shares (created if missing).
    pub consumer: String,
    /// Only messages on this subject (empty: the whole stream).
    pub filter_subject: String,
    /// Messages asked for per pull request.
    pub batch: usize,
    /// A message not acked this long after delivery goes to another daemon. The daemon keeps
    /// the messages it holds alive (in-progress acks) until their file is finished, so this is
    /// how fast the group notices a daemon that died, not a bound on `output.roll_seconds`.
    pub ack_wait_seconds: u64,
    /// Unacked messages the consumer hands out across the group: the bound on what all the
    /// daemons hold between delivery and a finished file (memory and spool space); the rest of a
    /// backlog waits in the stream. A daemon finishes its open file early when the group holds
    /// half of it, so files then hold about this many rows at most.
    pub max_ack_pending: usize,
    /// Deliveries of one message before JetStream drops it without a row; -1 (the default): no
    /// limit. Bad input is terminated with its error row anyway; a limit only matters for a
    /// message that kills every daemon it reaches, and it also drops messages handed back
    /// often (an id pending with other bytes for a long time).
    pub max_deliver: i64,
    /// Folders a `Plankton-Ref` header may name a file in (after symbolic links are resolved);
    /// empty: references are refused.
    pub reference_dirs: Vec<PathBuf>,
    /// Publish every row this daemon writes (from any source), once its file is finished, as
    /// JSON (the body of `GET /v1/predictions/{id}`) on this subject; empty: off. Core NATS:
    /// capture the subject with a stream for a durable feed.
    pub results_subject: String,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            enabled: false,
            servers: vec!["nats://127.0.0.1:4222".into()],
            token_file: None,
            user: None,
            password_file: None,
            credentials_file: None,
            tls: false,
            ca_file: None,
            client_cert: None,
            client_key: None,
            stream: "PLANKTON".into(),
            subjects: vec!["plankton.images.>".into()],
            create_stream: true,
            consumer: "plankton-daemons".into(),
            filter_subject: String::new(),
            batch: 64,
            ack_wait_seconds: 30,
            max_ack_pending: 1024,
            max_deliver: -1,
            reference_dirs: Vec::new(),
            results_subject: String::new(),
        }
    }
}

impl NatsConfig {
    fn validate(&self) -> Result<(), String> {
        // JetStream names: no white space, `.`, `*`, `>` or path separators.
        let bad_name = |n: &str| {
            n.is_empty()
                || n.len() > 200
                || n.chars().any(|c| {
                    c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>' | '/' | '\\')
                })
        };
        if self.servers.is_empty() {
            return Err("nats.servers: name at least one server".into());
        }
        if bad_name(&self.stream) {
            return Err(format!(
                "nats.stream `{}`: a JetStream name (no spaces, `.`, `*`, `>` or slashes)",
                self.stream
            ));
        }
        if bad_name(&self.consumer) {
            return Err(format!(
                "nats.consumer `{}`: a JetStream name (no spaces, `.`, `*`, `>` or slashes)",
                self.consumer
            ));
        }
        if self.create_stream && self.subjects.is_empty() {
            return Err(
                "nats.subjects: a stream the daemon creates needs at least one subject".into(),
            );
        }
        if self.batch == 0 || self.ack_wait_seconds == 0 || self.max_ack_pending == 0 {
            return Err(
                "nats.batch, nats.ack_wait_seconds and nats.max_ack_pending must be > 0".into(),
            );
        }
        if self
            .results_subject
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '*' | '>'))
        {
            return Err(format!(
                "nats.results_subject `{}`: a subject without spaces or wildcards",
                self.results_subject
            ));
        }
        if self.max_deliver == 0 || self.max_deliver < -1 {
            return Err("nats.max_deliver must be > 0, or -1 for no limit".into());
        }
        if self.user.is_some() != self.password_file.is_some() {
            return Err("nats.user and nats.password_file go together".into());
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            return Err("nats.client_cert and nats.client_key go together".into());
        }
        let ways = [
            self.token_file.is_some(),
            self.user.is_some(),
            self.credentials_file.is_some(),
        ];
        if ways.iter().filter(|w| **w).count() > 1 {
            return Err("nats: one of token_file, user/password_file or credentials_file".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MicroBatchConfig {
    /// A batch goes to the model when it holds this many images...
    pub max_images: usize,
    /// ...or when its oldest image has waited this long.
    pub max_latency_ms: u64,
}

impl Default for MicroBatchConfig {
    fn default() -> Self {
        MicroBatchConfig {
            max_images: 32,
            max_latency_ms: 50,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Accepted images waiting for decode (the bound on memory: images are read from the spool).
    pub ingest: usize,
    /// Decoded patches waiting for the model.
    pub patches: usize,
    /// Decode/warp worker threads; 0 = one per core.
    pub workers: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            ingest: 1024,
            patches: 256,
            workers: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputConfig {
    pub dir: PathBuf,
    /// A Parquet file is closed (and renamed into place) after this many rows...
    pub roll_rows: usize,
    /// ...or this many seconds after its first row, whichever comes first.
    pub roll_seconds: u64,
    pub top_k: usize,
    /// Image feature sets written next to each predictions file (`features-*.parquet`, the
    /// columns of `plankton features`), for late fusion of the stream: e.g.
    /// ["moments", "haralick"]. Empty: none.
    pub features: Vec<String>,
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig {
            dir: PathBuf::from("serve/out"),
            roll_rows: 10_000,
            roll_seconds: 300,
            top_k: 5,
            features: Vec::new(),
        }
    }
}

/// Obvious non-organisms, flagged in the row's `flag` column (they are still predicted: the
/// flag tells a reader not to trust the class).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImageChecks {
    /// An image whose width or height is below this is flagged `too_small` (0: no check).
    pub min_side_px: u32,
    /// An image whose grey levels span at most this many levels (max - min) is flagged `blank`.
    pub blank_max_range: u8,
}

impl Default for ImageChecks {
    fn default() -> Self {
        ImageChecks {
            min_side_px: 8,
            blank_max_range: 8,
        }
    }
}

impl ImageChecks {
    /// The flag of a decoded image, if any (`too_small` before `blank`).
    pub fn flag(&self, img: &image::GrayImage) -> Option<&'static str> {
        if img.width() < self.min_side_px || img.height() < self.min_side_px {
            return Some("too_small");
        }
        let (mut lo, mut hi) = (u8::MAX, u8::MIN);
        // Chunked so the compiler vectorises the min/max (a 4096x4096 frame is 16 M pixels).
        for chunk in img.as_raw().chunks(4096) {
            lo = lo.min(chunk.iter().copied().min().unwrap_or(u8::MAX));
            hi = hi.max(chunk.iter().copied().max().unwrap_or(u8::MIN));
        }
        (hi.saturating_sub(lo) <= self.blank_max_range).then_some("blank")
    }
}

impl ServeConfig {
    /// Loads and validates; relative paths are taken relative to the config file's folder.
    pub fn load(path: &Path) -> Result<Self, ServeConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ServeConfigError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_toml_str(&text, path, base)
    }

    pub fn from_toml_str(text: &str, path: &Path, base: &Path) -> Result<Self, ServeConfigError> {
        let invalid = |message: String| ServeConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let mut cfg: ServeConfig = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        for p in [
            &mut cfg.model,
            &mut cfg.spool,
            &mut cfg.quarantine,
            &mut cfg.watch.dir,
            &mut cfg.output.dir,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        let n = &mut cfg.nats;
        for t in [
            cfg.http.token_file.as_mut(),
            n.token_file.as_mut(),
            n.password_file.as_mut(),
            n.credentials_file.as_mut(),
            n.ca_file.as_mut(),
            n.client_cert.as_mut(),
            n.client_key.as_mut(),
        ]
        .into_iter()
        .flatten()
        .chain(n.reference_dirs.iter_mut())
        {
            if t.is_relative() {
                *t = base.join(&*t);
            }
        }
        cfg.validate().map_err(invalid)?;
        Ok(cfg)
    }

    pub fn feature_sets(
        &self,
    ) -> Result<Vec<crate::features::job::FeatureSet>, crate::features::job::FeaturesError> {
        crate::features::job::FeatureSet::parse_list(&self.output.features.join(","))
    }

    pub fn validate(&self) -> Result<(), String> {
        if let Err(e) = self.device.parse::<crate::device::DeviceChoice>() {
            return Err(format!("device: {e}"));
        }
        if !self.watch.enabled && !self.http.enabled && !self.nats.enabled {
            return Err("no source: enable [watch], [http] and/or [nats]".into());
        }
        self.drift.validate()?;
        if self.nats.enabled {
            self.nats.validate()?;
        }
        if self.batch.max_images == 0 {
            return Err("batch.max_images must be > 0".into());
        }
        if self.queue.ingest == 0 || self.queue.patches == 0 {
            return Err("queue capacities must be > 0".into());
        }
        if self.output.roll_rows == 0 || self.output.roll_seconds == 0 {
            return Err("output.roll_rows and output.roll_seconds must be > 0".into());
        }
        self.feature_sets()
            .map_err(|e| format!("output.features: {e}"))?;
        if self.tta == 0 || self.tta > crate::predict::tta::MAX_TRANSFORMS {
            return Err(format!(
                "tta must be within 1..={}",
                crate::predict::tta::MAX_TRANSFORMS
            ));
        }
        if self.http.enabled {
            let addr: SocketAddr = self
                .http
                .bind
                .parse()
                .map_err(|e| format!("http.bind `{}`: {e}", self.http.bind))?;
            if !addr.ip().is_loopback() && self.http.token_file.is_none() {
                return Err(format!(
                    "http.bind `{}` is reachable beyond this machine: set http.token_file (uploads must present a bearer token)",
                    self.http.bind
                ));
            }
            if self.http.max_body_bytes == 0 {
                return Err("http.max_body_bytes must be > 0".into());
            }
            if self.http.body_idle_timeout_ms == 0 || self.http.header_timeout_ms == 0 {
                return Err(
                    "http.body_idle_timeout_ms and http.header_timeout_ms must be > 0".into(),
                );
            }
        }
        if self.watch.enabled && self.watch.poll_interval_ms == 0 {
            return Err("watch.poll_interval_ms must be > 0".into());
        }
        let mut dirs = vec![
            ("spool", &self.spool),
            ("quarantine", &self.quarantine),
            ("output.dir", &self.output.dir),
        ];
        if self.watch.enabled {
            dirs.push(("watch.dir", &self.watch.dir));
        }
        // Each folder has one owner: a quarantined upload named like an output file, or the
        // spool's own files, must never land among another folder's files (a watched folder
        // holding the output takes every finished file back in, without end). Compared as the
        // file system will resolve them: `..` and symbolic links of the existing part resolved.
        let resolved: Vec<PathBuf> = dirs
            .iter()
            .map(|(_, d)| crate::fsx::resolve_path(d))
            .collect();
        for (i, (a, da)) in dirs.iter().enumerate() {
            for (j, (b, db)) in dirs.iter().enumerate().skip(i + 1) {
                let (ra, rb) = (&resolved[i], &resolved[j]);
                if ra.starts_with(rb) || rb.starts_with(ra) {
                    return Err(format!(
                        "{a} ({}) and {b} ({}) must be separate folders, neither inside the other",
                        da.display(),
                        db.display()
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_paths_are_relative_to_the_file() {
        let cfg = ServeConfig::from_toml_str(
            "model = \"runs/a\"\n",
            Path::new("/etc/p/d.toml"),
            Path::new("/etc/p"),
        )
        .unwrap();
        assert_eq!(cfg.model, PathBuf::from("/etc/p/runs/a"));
        assert_eq!(cfg.spool, PathBuf::from("/etc/p/serve/spool"));
        assert_eq!(cfg.http.backpressure, Backpressure::Reject);
        assert_eq!(cfg.watch.symlinks, SymlinkPolicy::Skip);
    }

    #[test]
    fn a_nats_source_is_checked_and_its_files_are_relative_to_the_config() {
        let load = |nats: &str| {
            ServeConfig::from_toml_str(
                &format!("[http]\nenabled = false\n[nats]\nenabled = true\n{nats}"),
                Path::new("/etc/p/d.toml"),
                Path::new("/etc/p"),
            )
        };
        let cfg = load("token_file = \"tok\"\nreference_dirs = [\"shared\"]\n").unwrap();
        assert_eq!(cfg.nats.token_file, Some(PathBuf::from("/etc/p/tok")));
        assert_eq!(
            cfg.nats.reference_dirs,
            vec![PathBuf::from("/etc/p/shared")]
        );
        for (bad, says) in [
            ("stream = \"a.b\"", "nats.stream"),
            ("consumer = \"\"", "nats.consumer"),
            ("servers = []", "nats.servers"),
            ("max_ack_pending = 0", "nats.max_ack_pending"),
            ("max_deliver = 0", "nats.max_deliver"),
            ("user = \"u\"", "password_file"),
            ("client_key = \"k\"", "client_cert"),
            ("token_file = \"t\"\ncredentials_file = \"c\"", "one of"),
            ("subjects = []", "nats.subjects"),
            ("results_subject = \"out.>\"", "nats.results_subject"),
            ("acks = 1", "unknown field"),
        ] {
            let e = load(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let none = ServeConfig::from_toml_str(
            "[http]\nenabled = false\n",
            Path::new("d.toml"),
            Path::new("."),
        )
        .unwrap_err()
        .to_string();
        assert!(none.contains("[nats]"), "{none}");
    }

    #[cfg(unix)]
    #[test]
    fn folders_are_compared_as_the_file_system_resolves_them() {
        let tmp = tempfile::tempdir().unwrap();
        let r = tmp.path();
        std::fs::create_dir_all(r.join("x")).unwrap();
        std::fs::create_dir_all(r.join("real")).unwrap();
        std::fs::create_dir_all(r.join("a")).unwrap();
        std::os::unix::fs::symlink(r.join("real"), r.join("link")).unwrap();
        std::os::unix::fs::symlink(r.join("a"), r.join("b")).unwrap();
        let q = |p: &Path| format!("{:?}", p.to_str().unwrap());
        for (text, want) in [
            (
                format!(
                    "spool = {}\nquarantine = {}\n",
                    q(&r.join("s")),
                    q(&r.join("x/../s"))
                ),
                "spool",
            ),
            (
                format!(
                    "spool = {}\n[watch]\nenabled = true\ndir = {}\n",
                    q(&r.join("real")),
                    q(&r.join("link"))
                ),
                "watch.dir",
            ),
            (
                format!(
                    "[output]\ndir = {}\n[watch]\nenabled = true\ndir = {}\n",
                    q(&r.join("b/o")),
                    q(&r.join("a"))
                ),
                "output.dir",
            ),
            (
                format!(
                    "[output]\ndir = {}\n[watch]\nenabled = true\ndir = {}\n",
                    q(&r.join("x/../w/out")),
                    q(&r.join("w"))
                ),
                "must be separate",
            ),
        ] {
            let err = ServeConfig::from_toml_str(&text, Path::new("d.toml"), r)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(want) && err.contains("must be separate folders"),
                "{text}: {err}"
            );
        }
        // Siblings that merely share a prefix of their names are fine.
        let ok = format!(
            "spool = {}\nquarantine = {}\n",
            q(&r.join("s")),
            q(&r.join("s2"))
        );
        ServeConfig::from_toml_str(&ok, Path::new("d.toml"), r).unwrap();
    }

    #[test]
    fn image_checks_flag_tiny_and_blank_images_only() {
        let checks = ImageChecks::default();
        let tiny = image::GrayImage::from_pixel(1, 1, image::Luma([0]));
        assert_eq!(checks.flag(&tiny), Some("too_small"));
        let thin = image::GrayImage::from_fn(200, 5, |x, _| image::Luma([x as u8]));
        assert_eq!(checks.flag(&thin), Some("too_small"));
        let blank = image::GrayImage::from_pixel(300, 200, image::Luma([250]));
        assert_eq!(checks.flag(&blank), Some("blank"));
        // Sensor noise of a few levels is still blank; one dark organism is not.
        let mut noisy = image::GrayImage::from_fn(64, 64, |x, y| {
            image::Luma([247 + ((x * 7 + y * 3) % 5) as u8])
        });
        assert_eq!(checks.flag(&noisy), Some("blank"));
        noisy.put_pixel(40, 63, image::Luma([90]));
        assert_eq!(checks.flag(&noisy), None);
        let off = ImageChecks {
            min_side_px: 0,
            blank_max_range: 0,
        };
        assert_eq!(off.flag(&thin), None);
        assert_eq!(off.flag(&tiny), Some("blank"));
    }

    #[test]
    fn bad_configs_name_the_problem() {
        for (text, want) in [
            ("[http]\nbind = \"0.0.0.0:80\"\n", "token_file"),
            ("[http]\nenabled = false\n", "no source"),
            ("[batch]\nmax_images = 0\n", "max_images"),
            (
                "[watch]\nenabled = true\ndir = \"x\"\n[output]\ndir = \"x/out\"\n",
                "output.dir (./x/out) and watch.dir (./x) must be separate folders",
            ),
            (
                "quarantine = \"o\"\n[output]\ndir = \"o\"\n",
                "quarantine (./o) and output.dir (./o) must be separate",
            ),
            (
                "spool = \"s\"\nquarantine = \"s/q\"\n",
                "spool (./s) and quarantine (./s/q) must be separate",
            ),
            ("[http]\nbody_idle_timeout_ms = 0\n", "body_idle_timeout_ms"),
            ("[htp]\n", "unknown field"),
            (
                "[output]\nfeatures = [\"moments\", \"colour\"]\n",
                "output.features: unknown feature set `colour`",
            ),
            (
                "[watch]\nsymlinks = \"follow\"\n",
                "unknown variant `follow`",
            ),
            ("[checks]\nmin_side = 3\n", "unknown field `min_side`"),
        ] {
            let err = ServeConfig::from_toml_str(text, Path::new("d.toml"), Path::new("."))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(want) && err.contains("d.toml"),
                "{text}: {err}"
            );
        }
    }
}
