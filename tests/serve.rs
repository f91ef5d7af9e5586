//! The camera-ingest daemon end to end, driven through the CLI (`plankton serve --pipeline`):
//! folder ingest, HTTP upload (sync wait, look-up, id validation, bearer token, multipart), quarantine of
//! bad input, 503 backpressure without losing anything accepted, at-least-once across a
//! `kill -9`, graceful drain on SIGTERM, hot reload on SIGHUP, and the Prometheus exposition.
//!
//! Every daemon binds 127.0.0.1:0 (the port is read from its `listening on` line) and works in
//! its own temporary folder; waits poll with a deadline.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use plankton::config::PipelineConfig;
use plankton::sinks::parquet::{PredictionRow, Predictions};

#[path = "common/tiny_serve.rs"]
mod tiny_serve;
use tiny_serve::trained;

/// How long anything may take before a test gives up (generous: CI machines are slow).
const DEADLINE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// The shared tiny run (tests/common/tiny_serve.rs) and the binary.

/// The binary under test: this build's, or `PLANKTON_SERVE_BIN` (to run these tests against
/// another build, e.g. to show that a test fails on the build before its fix).
fn plankton_bin() -> PathBuf {
    std::env::var_os("PLANKTON_SERVE_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_plankton")),
        PathBuf::from,
    )
}

/// `plankton serve` on the site's config, stdout piped (its `listening on` / `ready:` lines).
fn serve_command(site: &Site) -> Command {
    let mut c = Command::new(plankton_bin());
    c.arg("serve")
        .arg("--pipeline")
        .arg(site.config())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    c
}

fn image_bytes(i: usize) -> Vec<u8> {
    let imgs = &trained().images;
    std::fs::read(&imgs[i % imgs.len()]).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Daemon config and process.

/// The knobs the tests turn; everything else is small and fast.
#[derive(Clone)]
struct Cfg {
    run: PathBuf,
    watch: bool,
    token_file: Option<PathBuf>,
    tta: usize,
    max_images: usize,
    max_latency_ms: u64,
    ingest: usize,
    patches: usize,
    workers: usize,
    roll_rows: usize,
    roll_seconds: u64,
    retry_after_seconds: u64,
    sync_timeout_ms: u64,
    /// `[output] features`, as a TOML array.
    features: &'static str,
    /// Extra TOML sections appended to the config.
    extra: &'static str,
}

impl Cfg {
    fn new() -> Cfg {
        Cfg {
            run: trained().run.clone(),
            watch: false,
            token_file: None,
            tta: 1,
            max_images: 8,
            max_latency_ms: 5,
            ingest: 64,
            patches: 16,
            workers: 1,
            roll_rows: 10_000,
            roll_seconds: 600,
            retry_after_seconds: 1,
            sync_timeout_ms: 20_000,
            features: "[]",
            extra: "",
        }
    }
}

/// A daemon's folder: config, in/, out/, spool/, quarantine/, log.
struct Site {
    dir: tempfile::TempDir,
}

impl Site {
    fn new(cfg: &Cfg) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let site = Site { dir };
        std::fs::create_dir_all(site.input()).unwrap();
        let q = |p: &Path| format!("{:?}", p.to_str().unwrap());
        let token = cfg
            .token_file
            .as_ref()
            .map_or(String::new(), |t| format!("token_file = {}\n", q(t)));
        let text = format!(
            r#"name = "test-daemon"
model = {run}
weights = "best"
device = "cpu"
tta = {tta}
threads = 1
spool = {spool}
quarantine = {quarantine}

[watch]
enabled = {watch}
dir = {input}
recursive = true
mode = "notify"
poll_interval_ms = 100
settle_ms = 100
backpressure = "block"

[http]
enabled = true
bind = "127.0.0.1:0"
{token}sync_timeout_ms = {sync}
backpressure = "reject"
retry_after_seconds = {retry}

[batch]
max_images = {max_images}
max_latency_ms = {max_latency_ms}

[queue]
ingest = {ingest}
patches = {patches}
workers = {workers}

[output]
dir = {out}
roll_rows = {roll_rows}
roll_seconds = {roll_seconds}
top_k = 3
features = {features}
{extra}
"#,
            run = q(&cfg.run),
            tta = cfg.tta,
            spool = q(&site.spool()),
            quarantine = q(&site.quarantine()),
            watch = cfg.watch,
            input = q(&site.input()),
            retry = cfg.retry_after_seconds,
            sync = cfg.sync_timeout_ms,
            max_images = cfg.max_images,
            max_latency_ms = cfg.max_latency_ms,
            ingest = cfg.ingest,
            patches = cfg.patches,
            workers = cfg.workers,
            out = q(&site.out()),
            roll_rows = cfg.roll_rows,
            roll_seconds = cfg.roll_seconds,
            features = cfg.features,
            extra = cfg.extra,
        );
        std::fs::write(site.config(), text).unwrap();
        site
    }
    fn root(&self) -> &Path {
        self.dir.path()
    }
    fn config(&self) -> PathBuf {
        self.root().join("daemon.toml")
    }
    fn input(&self) -> PathBuf {
        self.root().join("in")
    }
    fn out(&self) -> PathBuf {
        self.root().join("out")
    }
    fn spool(&self) -> PathBuf {
        self.root().join("spool")
    }
    fn quarantine(&self) -> PathBuf {
        self.root().join("quarantine")
    }
    fn pending_files(&self) -> Vec<String> {
        names(&self.spool().join("pending"))
    }
    /// Spooled (acknowledged, not yet in a finished file) image ids.
    fn pending_ids(&self) -> BTreeSet<String> {
        self.pending_files()
            .iter()
            .filter_map(|n| n.strip_suffix(".json"))
            .map(String::from)
            .collect()
    }

    fn start(&self) -> Daemon {
        Daemon::start(self)
    }

    /// Rows of the finished prediction files, with the model id of the file holding each; fails
    /// on unfinished (`.partial`) files.
    fn finished_rows(&self) -> Vec<(PredictionRow, String)> {
        let mut rows = Vec::new();
        for n in names(&self.out()) {
            assert!(!n.ends_with(".partial"), "unfinished output file left: {n}");
            if n.starts_with("features-") {
                continue; // the features beside a predictions file (see its own test)
            }
            assert!(
                n.starts_with("predictions-") && n.ends_with(".parquet"),
                "unexpected output file {n}"
            );
            let p = Predictions::read(&self.out().join(&n)).unwrap();
            assert_eq!(
                p.model_ids.len(),
                1,
                "{n}: one model per file: {:?}",
                p.model_ids
            );
            assert_eq!(p.class_names.len(), 4);
            for r in p.rows {
                rows.push((r, p.model_ids[0].clone()));
            }
        }
        rows
    }

    /// Rows of the finished files, counted by image id.
    fn finished_counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for (r, _) in self.finished_rows() {
            *counts.entry(r.image_id).or_insert(0) += 1;
        }
        counts
    }
}

/// The visible names in `dir` (hidden ones, such as the daemon's lock file, left out).
fn names(dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    v.sort();
    v
}

struct Daemon {
    child: Child,
    addr: SocketAddr,
    ready: String,
    log: PathBuf,
}

impl Daemon {
    fn start(site: &Site) -> Daemon {
        Daemon::start_with(site, serve_command(site))
    }

    /// Starts `command` (a `plankton serve` of the site, possibly wrapped) as the site's daemon.
    fn start_with(site: &Site, mut command: Command) -> Daemon {
        // Each start appends to the same log (a restart's log follows the first one's).
        let log = site.root().join("daemon.log");
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut child = command.stderr(err).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let t0 = Instant::now();
        let mut addr = None;
        let ready = loop {
            let left = DEADLINE.saturating_sub(t0.elapsed());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(a) = line.strip_prefix("listening on http://") {
                        addr = Some(a.trim().parse::<SocketAddr>().unwrap());
                    } else if line.starts_with("ready: ") {
                        break line;
                    }
                }
                Err(e) => {
                    let _ = child.kill();
                    let status = child.wait();
                    panic!(
                        "daemon not ready ({e}; exit {status:?}):\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
            }
        };
        let addr = addr.expect("`listening on` comes before `ready:`");
        Daemon {
            child,
            addr,
            ready,
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{sig} failed");
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if t0.elapsed() > DEADLINE {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("daemon did not exit within {DEADLINE:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then the exit status must be 0 (drained).
    fn stop(mut self) {
        self.signal("TERM");
        let status = self.wait_exit();
        assert!(
            status.success(),
            "daemon exited with {status:?} after SIGTERM:\n{}",
            self.log()
        );
    }

    fn post(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
        http(self.addr, "POST", path, headers, body)
    }

    fn get(&self, path: &str) -> Resp {
        http(self.addr, "GET", path, &[], b"")
    }

    fn upload(&self, id: &str, body: &[u8]) -> Resp {
        self.post(&format!("/v1/images?id={id}"), &[], body)
    }

    /// Uploads and waits for the prediction (200).
    fn predict(&self, id: &str, body: &[u8]) -> serde_json::Value {
        let r = self.post(&format!("/v1/images?id={id}&wait=true"), &[], body);
        assert_eq!(r.status, 200, "{id}: {}\n{}", r.text(), self.log());
        r.json()
    }

    /// Uploads a bad image and waits for its refusal (422, quarantined, with the reason).
    fn refused(&self, id: &str, body: &[u8]) -> serde_json::Value {
        let r = self.post(&format!("/v1/images?id={id}&wait=true"), &[], body);
        assert_eq!(r.status, 422, "{id}: {}\n{}", r.text(), self.log());
        let j = r.json();
        assert_eq!(j["status"], "quarantined", "{j}");
        j
    }

    /// Polls `GET /v1/predictions/{id}` until it answers 200.
    fn wait_predicted(&self, id: &str) -> serde_json::Value {
        poll(&format!("prediction of {id}"), || {
            let r = self.get(&format!("/v1/predictions/{id}"));
            assert!(
                matches!(r.status, 200 | 202 | 404),
                "{id}: {} {}",
                r.status,
                r.text()
            );
            (r.status == 200).then(|| r.json())
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Calls `f` until it returns Some, failing after DEADLINE.
fn poll<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t0.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// A tiny HTTP/1.1 client (no client crate in the dependencies).

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    conn.write_all(req.as_bytes()).unwrap();
    conn.write_all(body).unwrap();
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end: {}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let mut parts = status_line.splitn(3, ' ');
    assert_eq!(parts.next(), Some("HTTP/1.1"), "{status_line}");
    let status: u16 = parts.next().unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (k, v) = l
                .split_once(':')
                .unwrap_or_else(|| panic!("bad header line {l:?}"));
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect();
    let mut resp = Resp {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    };
    if resp
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        resp.body = dechunk(&resp.body);
    } else if let Some(n) = resp.header("content-length") {
        assert_eq!(resp.body.len(), n.parse::<usize>().unwrap(), "body length");
    }
    resp
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size_text = String::from_utf8_lossy(&b[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
        b = &b[eol + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[test]
fn folder_ingest_predicts_each_settled_file_once_and_drains_on_sigterm() {
    let site = Site::new(&Cfg {
        watch: true,
        ..Cfg::new()
    });
    let d = site.start();
    let input = site.input();
    std::fs::create_dir_all(input.join("sub")).unwrap();
    // Written in place, in a subfolder, renamed into place from a temporary name, and one
    // still being written (never renamed): that one must never be taken.
    std::fs::write(input.join("a.jpg"), image_bytes(0)).unwrap();
    std::fs::write(input.join("sub/b.jpg"), image_bytes(1)).unwrap();
    std::fs::write(input.join("c.jpg.tmp"), image_bytes(2)).unwrap();
    std::fs::write(input.join("d.jpg.tmp"), image_bytes(3)).unwrap();
    std::fs::rename(input.join("c.jpg.tmp"), input.join("c.jpg")).unwrap();
    let ids: BTreeSet<String> = ["a.jpg", "sub/b.jpg", "c.jpg"]
        .iter()
        .map(|p| plankton::serve::spool::id_for_path(Path::new(p)))
        .collect();
    for id in &ids {
        let p = d.wait_predicted(id);
        assert!(
            p["predicted_class"].is_string() && p["error"].is_null(),
            "{p}"
        );
    }
    d.stop();

    let rows = site.finished_rows();
    let counts = site.finished_counts();
    assert_eq!(
        counts.keys().cloned().collect::<BTreeSet<_>>(),
        ids,
        "exactly the settled files"
    );
    assert!(
        counts.values().all(|&n| n == 1),
        "one row per image: {counts:?}"
    );
    for (r, _) in &rows {
        assert!(
            r.error.is_none() && r.probabilities.as_ref().is_some_and(|p| p.len() == 4),
            "{r:?}"
        );
        assert!(
            Path::new(&r.source_path).starts_with(&input),
            "source is the watched file: {}",
            r.source_path
        );
    }
    assert_eq!(
        site.pending_files(),
        Vec::<String>::new(),
        "spool pending/ is empty"
    );
    // The watched folder is never modified.
    assert!(
        input.join("a.jpg").is_file()
            && input.join("sub/b.jpg").is_file()
            && input.join("d.jpg.tmp").is_file()
    );

    // A restart does not take the same files again (the ledger), only new ones: once a file
    // written after the restart is predicted, the scans that took it have seen the old ones.
    let d = site.start();
    std::fs::write(input.join("e.jpg"), image_bytes(4)).unwrap();
    let e = plankton::serve::spool::id_for_path(Path::new("e.jpg"));
    d.wait_predicted(&e);
    d.stop();
    let counts = site.finished_counts();
    let mut want: BTreeMap<String, usize> = ids.iter().map(|id| (id.clone(), 1)).collect();
    want.insert(e, 1);
    assert_eq!(counts, want, "each file once across the restart");
    assert_eq!(site.pending_files(), Vec::<String>::new());
}

#[test]
fn http_upload_waits_for_the_prediction_and_refuses_bad_ids() {
    let site = Site::new(&Cfg::new());
    let d = site.start();
    assert!(
        d.ready.contains("0 spooled image(s) replayed"),
        "{}",
        d.ready
    );
    assert_eq!(d.get("/healthz").status, 200);
    assert_eq!(d.get("/readyz").status, 200);

    let p = d.predict("a", &image_bytes(0));
    assert_eq!(p["id"], "a");
    let class = p["predicted_class"]
        .as_str()
        .unwrap_or_else(|| panic!("{p}"))
        .to_string();
    assert!(p["error"].is_null(), "{p}");
    assert_eq!(p["top_classes"][0], class.as_str());
    let conf = p["confidence"].as_f64().unwrap();
    assert!(conf > 0.0 && conf <= 1.0, "{p}");

    let r = d.get("/v1/predictions/a");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["predicted_class"], class.as_str());
    assert_eq!(d.get("/v1/predictions/never-sent").status, 404);

    for path in [
        "/v1/images?id=..%2Fx",
        "/v1/images?id=a%2Fb",
        "/v1/images?id=.hidden",
    ] {
        let r = d.post(path, &[], &image_bytes(1));
        assert_eq!(r.status, 400, "{path}: {}", r.text());
        assert!(
            r.json()["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{path}: {}",
            r.text()
        );
    }
    let r = d.post("/v1/images", &[("X-Image-Id", "a/b")], &image_bytes(1));
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(d.get("/v1/predictions/..%2Fx").status, 400);
    // Only `a` is spooled (until its file is finished): nothing refused was.
    assert_eq!(site.pending_ids(), BTreeSet::from(["a".to_string()]));

    d.stop();
    let counts = site.finished_counts();
    assert_eq!(counts, BTreeMap::from([("a".to_string(), 1)]));
}

#[test]
fn http_uploads_need_the_bearer_token_when_one_is_configured() {
    let tokens = tempfile::tempdir().unwrap();
    let token_file = tokens.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let site = Site::new(&Cfg {
        token_file: Some(token_file),
        ..Cfg::new()
    });
    let d = site.start();
    let r = d.upload("t1", &image_bytes(0));
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let r = d.post(
        "/v1/images?id=t1",
        &[("Authorization", "Bearer wrong")],
        &image_bytes(0),
    );
    assert_eq!(r.status, 401);
    assert_eq!(d.get("/v1/predictions/t1").status, 401);
    assert!(!site.pending_ids().contains("t1"));

    let r = d.post(
        "/v1/images?id=t1",
        &[("Authorization", "Bearer s3cret-token")],
        &image_bytes(0),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["id"], "t1");
    // Operational endpoints stay open.
    assert_eq!(d.get("/healthz").status, 200);
    assert_eq!(d.get("/metrics").status, 200);
    d.stop();
    assert_eq!(
        site.finished_counts(),
        BTreeMap::from([("t1".to_string(), 1)])
    );
}

#[test]
fn bad_input_is_quarantined_with_its_reason_and_the_daemon_keeps_serving() {
    let site = Site::new(&Cfg::new());
    let d = site.start();
    let p = d.refused("junk", b"this is not an image, just text");
    let err = p["error"]
        .as_str()
        .unwrap_or_else(|| panic!("an error: {p}"))
        .to_string();
    assert!(
        err.contains("not an image") && err.contains("junk"),
        "{err}"
    );
    assert!(p["predicted_class"].is_null(), "{p}");

    let q = site.quarantine();
    assert_eq!(
        std::fs::read(q.join("junk")).unwrap(),
        b"this is not an image, just text"
    );
    let reason = std::fs::read_to_string(q.join("junk.reason")).unwrap();
    assert!(
        reason.contains("not an image")
            && reason.contains("id: junk")
            && reason.contains("source: http"),
        "{reason}"
    );

    // Truncated JPEG: the header says JPEG, the data stops short.
    let good = image_bytes(0);
    let p = d.refused("cut", &good[..good.len().min(40)]);
    assert!(p["error"].as_str().is_some(), "{p}");
    assert!(q.join("cut.reason").is_file());

    let p = d.predict("fine", &image_bytes(1));
    assert!(
        p["predicted_class"].is_string() && p["error"].is_null(),
        "{p}"
    );
    d.stop();

    let rows: BTreeMap<String, PredictionRow> = site
        .finished_rows()
        .into_iter()
        .map(|(r, _)| (r.image_id.clone(), r))
        .collect();
    assert_eq!(
        rows.keys().map(String::as_str).collect::<Vec<_>>(),
        ["cut", "fine", "junk"]
    );
    assert!(
        rows["junk"]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("not an image"))
            && rows["junk"].probabilities.is_none()
    );
    assert!(rows["cut"].error.is_some() && rows["cut"].probabilities.is_none());
    assert!(rows["fine"].error.is_none() && rows["fine"].probabilities.is_some());
    assert_eq!(site.pending_files(), Vec::<String>::new());
}

#[test]
fn multipart_upload_spools_each_part_and_quarantines_the_bad_one() {
    let site = Site::new(&Cfg::new());
    let d = site.start();
    let boundary = "plankton-test-boundary-7f3a";
    let junk: &[u8] = b"this is not an image either";
    // A valid, unshared field name is the id; a name used twice (a plain form field) is not.
    let parts: [(&str, &str, Vec<u8>); 3] = [
        ("mp-good", "good.jpg", image_bytes(2)),
        ("file", "other.jpg", image_bytes(3)),
        ("file", "junk.jpg", junk.to_vec()),
    ];
    let mut body = Vec::new();
    for (name, file, bytes) in &parts {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{file}\"\r\nContent-Type: image/jpeg\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    let content_type = format!("multipart/form-data; boundary={boundary}");
    let r = d.post("/v1/images", &[("Content-Type", &content_type)], &body);
    assert_eq!(r.status, 202, "{}", r.text());
    let answer = r.json();
    let images = answer["images"].as_array().unwrap();
    assert_eq!(images.len(), 3, "{answer}");
    let ids: Vec<String> = images
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids[0], "mp-good");
    assert!(
        ids[1] != "file" && ids[2] != "file" && ids[1] != ids[2],
        "{ids:?}"
    );
    for (e, (_, file, _)) in images.iter().zip(&parts) {
        assert_eq!(e["status"], "accepted", "{answer}");
        assert_eq!(e["name"], *file, "{answer}");
    }
    for id in &ids {
        d.wait_predicted(id);
    }
    d.stop();

    let rows: BTreeMap<String, PredictionRow> = site
        .finished_rows()
        .into_iter()
        .map(|(r, _)| (r.image_id.clone(), r))
        .collect();
    assert_eq!(
        rows.keys().cloned().collect::<BTreeSet<_>>(),
        ids.iter().cloned().collect::<BTreeSet<_>>(),
        "all three parts in the finished files"
    );
    for id in &ids[..2] {
        assert!(
            rows[id].error.is_none() && rows[id].probabilities.is_some(),
            "{:?}",
            rows[id]
        );
    }
    let bad = &ids[2];
    assert!(
        rows[bad]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("not an image")),
        "{:?}",
        rows[bad]
    );
    assert!(rows[bad].probabilities.is_none());
    let q = site.quarantine();
    assert_eq!(std::fs::read(q.join(bad)).unwrap(), junk);
    let reason = std::fs::read_to_string(q.join(format!("{bad}.reason"))).unwrap();
    assert!(
        reason.contains("not an image") && reason.contains(&format!("id: {bad}")),
        "{reason}"
    );
    assert!(!q.join(&ids[0]).exists() && !q.join(&ids[1]).exists());
    assert_eq!(site.pending_files(), Vec::<String>::new());
}

#[test]
fn overload_answers_503_with_retry_after_and_loses_nothing_accepted() {
    // One-image queue, one worker, one-image batches, many views per image: the pipeline is
    // slower than eight clients uploading at once.
    let cfg = Cfg {
        ingest: 1,
        patches: 1,
        max_images: 1,
        tta: 64,
        retry_after_seconds: 3,
        ..Cfg::new()
    };
    let site = Site::new(&cfg);
    let d = site.start();
    let addr = d.addr;
    let mut accepted = BTreeSet::new();
    let mut refused = BTreeSet::new();
    let t0 = Instant::now();
    let mut round = 0;
    while refused.is_empty() {
        assert!(t0.elapsed() < DEADLINE, "no upload was ever refused");
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let body = image_bytes(t);
                std::thread::spawn(move || {
                    (0..4)
                        .map(|k| {
                            let id = format!("r{round}-t{t}-k{k}");
                            let r = http(addr, "POST", &format!("/v1/images?id={id}"), &[], &body);
                            (id, r)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for t in threads {
            for (id, r) in t.join().unwrap() {
                match r.status {
                    202 => {
                        assert_eq!(r.json()["status"], "accepted");
                        accepted.insert(id);
                    }
                    503 => {
                        assert_eq!(r.header("retry-after"), Some("3"), "{}", r.text());
                        assert_eq!(r.json()["status"], "busy");
                        refused.insert(id);
                    }
                    s => panic!("{id}: unexpected {s}: {}", r.text()),
                }
            }
        }
        round += 1;
    }
    assert!(!accepted.is_empty());
    for id in &accepted {
        d.wait_predicted(id);
    }
    d.stop();
    let counts = site.finished_counts();
    let got: BTreeSet<String> = counts.keys().cloned().collect();
    assert_eq!(
        got, accepted,
        "every accepted upload predicted, no refused one"
    );
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
    assert!(site.pending_ids().is_empty());
    eprintln!(
        "overload: {} accepted, {} refused in {round} round(s)",
        accepted.len(),
        refused.len()
    );
}

#[test]
fn kill_9_loses_nothing_acknowledged_and_a_restart_finishes_it() {
    let cfg = Cfg {
        roll_rows: 100_000,
        roll_seconds: 3600,
        ..Cfg::new()
    };
    let site = Site::new(&cfg);
    let d = site.start();
    let ids: BTreeSet<String> = (0..6).map(|i| format!("crash-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let r = d.upload(id, &image_bytes(i));
        assert_eq!(r.status, 202, "{}", r.text());
    }
    // Predicted (rows in the open, unfinished file), but no file finished yet.
    for id in &ids {
        d.wait_predicted(id);
    }
    let mut d = d;
    d.signal("KILL");
    let status = d.wait_exit();
    assert!(!status.success(), "{status:?}");
    drop(d);
    assert!(
        names(&site.out()).iter().all(|n| n.ends_with(".partial")),
        "nothing finished: {:?}",
        names(&site.out())
    );
    assert_eq!(
        site.pending_ids(),
        ids,
        "the spool still holds every acknowledged image"
    );

    let d = site.start();
    assert!(
        d.ready
            .contains(&format!("({} spooled image(s) replayed)", ids.len())),
        "{}",
        d.ready
    );
    for id in &ids {
        d.wait_predicted(id);
    }
    d.stop();
    let counts = site.finished_counts();
    for id in &ids {
        assert!(
            counts.contains_key(id),
            "{id} missing after the restart: {counts:?}"
        );
    }
    assert!(site.pending_ids().is_empty(), "{:?}", site.pending_files());
}

#[test]
fn sigterm_right_after_uploads_drains_every_accepted_image() {
    // Many views per image and small batches: work is still queued when SIGTERM comes.
    let site = Site::new(&Cfg {
        max_latency_ms: 20,
        max_images: 2,
        tta: 256,
        ..Cfg::new()
    });
    let d = site.start();
    let ids: Vec<String> = (0..10).map(|i| format!("drain-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let r = d.upload(id, &image_bytes(i));
        assert_eq!(r.status, 202, "{}", r.text());
    }
    let last = d.get("/v1/predictions/drain-9").status;
    let t0 = Instant::now();
    d.stop();
    let took = t0.elapsed();
    let counts = site.finished_counts();
    assert_eq!(counts.keys().cloned().collect::<Vec<_>>(), {
        let mut v = ids.clone();
        v.sort();
        v
    });
    assert!(site.pending_ids().is_empty());
    eprintln!(
        "drain of {} images took {took:?} (last one {} at SIGTERM)",
        ids.len(),
        if last == 202 {
            "still pending"
        } else {
            "already predicted"
        }
    );
}

#[test]
fn sighup_reloads_changed_weights_and_later_rows_carry_the_new_model_id() {
    // A copy of the run: its weights are replaced here.
    let runs = tempfile::tempdir().unwrap();
    let run = runs.path().join("run-reload");
    std::fs::create_dir_all(&run).unwrap();
    for e in std::fs::read_dir(&trained().run).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), run.join(e.file_name())).unwrap();
        }
    }
    let site = Site::new(&Cfg {
        run: run.clone(),
        ..Cfg::new()
    });
    let d = site.start();
    let first = d.predict("before", &image_bytes(0))["model_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(first.starts_with("run-reload/best@"), "{first}");
    assert!(d.ready.contains(&first), "{}", d.ready);

    // New weights: a freshly initialised network of the same shape.
    let pcfg = PipelineConfig::load(&run.join("pipeline.toml")).unwrap();
    let sizes: Vec<usize> = pcfg.patches.iter().map(|p| p.rows).collect();
    tch::manual_seed(12345);
    let net = plankton::model::Network::new(&pcfg.model, &sizes, 4, tch::Device::Cpu).unwrap();
    net.save(&run.join("best.safetensors")).unwrap();
    d.signal("HUP");

    let mut n = 0;
    let second = poll("a prediction by the reloaded model", || {
        n += 1;
        let p = d.predict(&format!("after-{n}"), &image_bytes(n));
        let m = p["model_id"].as_str().unwrap().to_string();
        (m != first).then_some(m)
    });
    assert!(second.starts_with("run-reload/best@"), "{second}");
    let metrics = d.get("/metrics").text();
    let reloads = metric_value(
        &metrics,
        "plankton_serve_model_reloads_total{outcome=\"ok\"}",
    );
    assert!(reloads.is_some_and(|v| v >= 1.0), "{metrics}");
    assert_eq!(
        metric_value(
            &metrics,
            &format!("plankton_serve_model_info{{model_id=\"{second}\"}}")
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(
            &metrics,
            &format!("plankton_serve_model_info{{model_id=\"{first}\"}}")
        ),
        Some(0.0),
        "{metrics}"
    );
    d.stop();

    let rows = site.finished_rows();
    let model_of = |id: &str| {
        rows.iter()
            .find(|(r, _)| r.image_id == id)
            .map(|(_, m)| m.clone())
            .unwrap()
    };
    assert_eq!(model_of("before"), first);
    assert_eq!(model_of(&format!("after-{n}")), second);
}

/// The value of the sample `series` (name with its labels, as rendered) in Prometheus text.
fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.trim().split(' ').next()?.parse().ok())
    })
}

#[test]
fn metrics_exposition_has_the_daemon_series_and_passes_promtool() {
    let site = Site::new(&Cfg::new());
    let d = site.start();
    d.predict("m1", &image_bytes(0));
    d.refused("m2", b"junk bytes");
    let r = d.get("/metrics");
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain")),
        "{:?}",
        r.headers
    );
    let text = r.text();
    for want in [
        "plankton_stage_received_total{stage=\"http\"}",
        "plankton_stage_received_total{stage=\"decode\"}",
        "plankton_stage_sent_total{stage=\"decode\"}",
        "plankton_stage_sent_total{stage=\"writer\"}",
        "plankton_stage_errors_total{stage=\"decode\"",
        "plankton_queue_depth{queue=\"ingest\"}",
        "plankton_serve_latency_seconds",
        "plankton_serve_batch_images",
        "plankton_serve_model_info{model_id=",
    ] {
        assert!(text.contains(want), "/metrics lacks {want}:\n{text}");
    }
    assert_eq!(
        metric_value(&text, "plankton_stage_received_total{stage=\"http\"}"),
        Some(2.0),
        "{text}"
    );
    // Where the time goes: every stage that touched the image has busy time.
    for stage in ["spool", "decode", "model", "writer"] {
        let busy = metric_value(
            &text,
            &format!("plankton_stage_busy_seconds_sum{{stage=\"{stage}\"}}"),
        );
        assert!(
            busy.is_some_and(|b| b > 0.0),
            "no busy time for {stage}: {text}"
        );
    }
    d.stop();

    match which("promtool") {
        Some(promtool) => {
            let mut child = Command::new(promtool)
                .args(["check", "metrics"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool check metrics failed ({}):\n{}{}\n--- exposition:\n{text}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        None if std::env::var_os("PLANKTON_REQUIRE_PROMTOOL").is_some() => {
            panic!("PLANKTON_REQUIRE_PROMTOOL is set but no promtool is on PATH (Debian: apt-get install prometheus)")
        }
        None => eprintln!(
            "skipping `promtool check metrics`: no promtool on PATH (`make test` installs it)"
        ),
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

#[test]
fn sigterm_is_not_held_up_by_idle_or_stalled_connections() {
    let site = Site::new(&Cfg {
        sync_timeout_ms: 300,
        ..Cfg::new()
    });
    let d = site.start();
    // A keep-alive connection left idle after one request.
    let mut idle = TcpStream::connect(d.addr).unwrap();
    idle.set_read_timeout(Some(DEADLINE)).unwrap();
    idle.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n", d.addr).as_bytes())
        .unwrap();
    let mut buf = [0u8; 512];
    let n = idle.read(&mut buf).unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    // An upload that stops a tenth of the way through its body (a camera that lost its link).
    let mut stalled = TcpStream::connect(d.addr).unwrap();
    stalled
        .write_all(format!("POST /v1/images?id=stalled HTTP/1.1\r\nHost: {}\r\nContent-Length: 1000\r\n\r\n0123456789", d.addr).as_bytes())
        .unwrap();
    // A request sent after it is answered: the stalled one has reached the server.
    assert_eq!(d.get("/healthz").status, 200);
    let t0 = Instant::now();
    d.stop();
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(10), "stop took {took:?}");
    assert!(
        site.pending_ids().is_empty() && site.finished_counts().is_empty(),
        "the stalled upload was never accepted"
    );
    eprintln!("stop with an idle and a stalled connection took {took:?}");
}

#[test]
fn features_are_written_beside_each_predictions_file() {
    use arrow::array::{Array, Float64Array, StringArray, UInt32Array};
    use plankton::features::{haralick, moments};
    let site = Site::new(&Cfg {
        watch: true,
        roll_rows: 2,
        features: r#"["moments", "haralick"]"#,
        ..Cfg::new()
    });
    let d = site.start();
    let input = site.input();
    let files = ["a.jpg", "b.jpg", "c.jpg"];
    for (i, f) in files.iter().enumerate() {
        std::fs::write(input.join(f), image_bytes(i)).unwrap();
    }
    std::fs::write(input.join("broken.jpg"), b"not an image").unwrap();
    for f in files.iter().chain(&["broken.jpg"]) {
        d.wait_predicted(&plankton::serve::spool::id_for_path(Path::new(f)));
    }
    d.stop();

    // Every predictions file has a features file of the same stamp holding the same images.
    let out = site.out();
    let mut seen = BTreeSet::new();
    for n in names(&out)
        .into_iter()
        .filter(|n| n.starts_with("predictions-"))
    {
        let fname = n.replacen("predictions-", "features-", 1);
        let preds = Predictions::read(&out.join(&n)).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            std::fs::File::open(out.join(&fname)).unwrap_or_else(|e| panic!("{fname}: {e}")),
        )
        .unwrap();
        let batches: Vec<_> = reader.build().unwrap().map(|b| b.unwrap()).collect();
        let b = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
        assert_eq!(b.num_rows(), preds.rows.len(), "{fname}");
        let col = |c: &str| {
            b.column_by_name(c)
                .unwrap_or_else(|| panic!("{fname}: no column {c}"))
                .clone()
        };
        let (ids, errors, rows) = (col("image_id"), col("error"), col("rows"));
        let ids = ids.as_any().downcast_ref::<StringArray>().unwrap();
        let errors = errors.as_any().downcast_ref::<StringArray>().unwrap();
        let rows = rows.as_any().downcast_ref::<UInt32Array>().unwrap();
        let contrast = col("haralick.d1.contrast");
        let contrast = contrast.as_any().downcast_ref::<Float64Array>().unwrap();
        let major = col(&format!("moments.{}", moments::MOMENT_INFO_NAMES[6]));
        let major = major.as_any().downcast_ref::<Float64Array>().unwrap();
        for (i, p) in preds.rows.iter().enumerate() {
            assert_eq!(ids.value(i), p.image_id);
            seen.insert(p.image_id.clone());
            if p.source_path.ends_with("broken.jpg") {
                assert!(
                    !errors.is_null(i) && contrast.is_null(i) && rows.is_null(i),
                    "the bad image keeps its row, with the reason"
                );
                continue;
            }
            let img = plankton::stages::decode::decode_file(
                Path::new(&p.source_path),
                &Default::default(),
            )
            .unwrap();
            assert_eq!(rows.value(i), img.height());
            let ci = haralick::FEATURE_NAMES
                .iter()
                .position(|n| *n == "contrast")
                .unwrap();
            assert_eq!(contrast.value(i), haralick::haralick(&img)[1][ci]);
            assert_eq!(major.value(i), moments::moment_info(&img)[6]);
        }
    }
    assert_eq!(seen.len(), 4, "every image has its features row: {seen:?}");
}

// ---------------------------------------------------------------------------------------------
// Issue 12: promises kept under abuse. Each test below failed before its fix.

/// The daemon's own columns of one finished row (see `sinks::parquet`).
#[derive(Debug, Clone)]
struct ServedRow {
    id: String,
    seq: u64,
    source_path: String,
    error: Option<String>,
    has_probabilities: bool,
    size: Option<(u32, u32)>,
    flag: Option<String>,
}

/// Every finished row with the daemon's columns, in file then row order.
fn served_rows(site: &Site) -> Vec<ServedRow> {
    use arrow::array::{Array, FixedSizeListArray, StringArray, UInt32Array, UInt64Array};
    let mut out = Vec::new();
    for n in names(&site.out())
        .into_iter()
        .filter(|n| n.starts_with("predictions-") && n.ends_with(".parquet"))
    {
        let path = site.out().join(&n);
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            std::fs::File::open(&path).unwrap(),
        )
        .unwrap();
        for b in reader.build().unwrap() {
            let b = b.unwrap();
            let col = |c: &str| {
                b.column_by_name(c)
                    .unwrap_or_else(|| panic!("{n}: no column {c}"))
                    .clone()
            };
            let (ids, seqs, paths, errors, probs, hs, ws, flags) = (
                col("image_id"),
                col("seq"),
                col("source_path"),
                col("error"),
                col("probabilities"),
                col("image_height"),
                col("image_width"),
                col("flag"),
            );
            let s = |a: &arrow::array::ArrayRef| {
                a.as_any().downcast_ref::<StringArray>().unwrap().clone()
            };
            let u32s = |a: &arrow::array::ArrayRef| {
                a.as_any().downcast_ref::<UInt32Array>().unwrap().clone()
            };
            let (ids, paths, errors, flags) = (s(&ids), s(&paths), s(&errors), s(&flags));
            let (hs, ws) = (u32s(&hs), u32s(&ws));
            let seqs = seqs.as_any().downcast_ref::<UInt64Array>().unwrap().clone();
            let probs = probs
                .as_any()
                .downcast_ref::<FixedSizeListArray>()
                .unwrap()
                .clone();
            for i in 0..b.num_rows() {
                let opt = |a: &StringArray| (!a.is_null(i)).then(|| a.value(i).to_string());
                out.push(ServedRow {
                    id: ids.value(i).to_string(),
                    seq: seqs.value(i),
                    source_path: paths.value(i).to_string(),
                    error: opt(&errors),
                    has_probabilities: !probs.is_null(i),
                    size: (!hs.is_null(i)).then(|| (hs.value(i), ws.value(i))),
                    flag: opt(&flags),
                });
            }
        }
    }
    out
}

/// Starts a daemon that must refuse to start: its exit status and log (stdout + stderr).
fn start_expecting_failure(site: &Site) -> (ExitStatus, String) {
    let mut child = serve_command(site).stderr(Stdio::piped()).spawn().unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > DEADLINE {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the daemon did not refuse to start:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (status, log)
}

/// A truncated JPEG: a real header, data cut short.
fn truncated() -> Vec<u8> {
    image_bytes(0)[..40].to_vec()
}

#[test]
fn an_id_reused_after_a_quarantine_is_predicted_over_http_and_from_the_folder() {
    let site = Site::new(&Cfg {
        watch: true,
        sync_timeout_ms: 15_000,
        ..Cfg::new()
    });
    let d = site.start();
    // HTTP: the refused upload (422 and its status: see the test of served rows), then a good one
    // with the same id: predicted (200).
    let r = d.post("/v1/images?id=fix1&wait=true", &[], &truncated());
    assert!(
        r.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("corrupt")),
        "{}",
        r.text()
    );
    let p = d.predict("fix1", &image_bytes(1));
    assert!(
        p["predicted_class"].is_string() && p["error"].is_null(),
        "{p}"
    );

    // Folder: a truncated file overwritten by the good one once the first was quarantined.
    let x = plankton::serve::spool::id_for_path(Path::new("x.jpg"));
    std::fs::write(site.input().join("x.jpg"), truncated()).unwrap();
    poll("x.jpg quarantined", || {
        site.quarantine()
            .join(format!("{x}.reason"))
            .is_file()
            .then_some(())
    });
    std::fs::write(site.input().join("x.jpg"), image_bytes(2)).unwrap();
    poll("x.jpg predicted after its rewrite", || {
        let r = d.get(&format!("/v1/predictions/{x}"));
        (r.status == 200 && r.json()["predicted_class"].is_string()).then_some(())
    });
    d.stop();
    // Nothing is redone by a restart (the ledger knows the good version).
    site.start().stop();

    let rows = served_rows(&site);
    for id in ["fix1", x.as_str()] {
        let mine: Vec<&ServedRow> = rows.iter().filter(|r| r.id == id).collect();
        assert_eq!(
            mine.len(),
            2,
            "{id}: the error row and the prediction: {mine:?}"
        );
        let (bad, good) = if mine[0].seq < mine[1].seq {
            (mine[0], mine[1])
        } else {
            (mine[1], mine[0])
        };
        assert!(bad.error.is_some() && !bad.has_probabilities, "{bad:?}");
        assert!(
            good.error.is_none() && good.has_probabilities,
            "the later acceptance is the good one: {good:?}"
        );
    }
    assert!(site.pending_ids().is_empty(), "{:?}", site.pending_files());
}

#[test]
fn a_quarantined_images_error_row_survives_kill_9() {
    let site = Site::new(&Cfg::new());
    let mut d = site.start();
    let r = d.post("/v1/images?id=cut9&wait=true", &[], &truncated());
    assert!(r.json()["error"].is_string(), "{}", r.text());
    assert!(site.quarantine().join("cut9").is_file());
    d.signal("KILL");
    d.wait_exit();
    drop(d);
    site.start().stop();
    let rows: Vec<ServedRow> = served_rows(&site)
        .into_iter()
        .filter(|r| r.id == "cut9")
        .collect();
    assert_eq!(
        rows.len(),
        1,
        "exactly one error row after the crash: {rows:?}"
    );
    assert!(
        rows[0]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("corrupt")),
        "{rows:?}"
    );
    // Still exactly one quarantined copy (the restart did not quarantine it again).
    assert_eq!(names(&site.quarantine()), ["cut9", "cut9.reason"]);
    assert!(site.pending_ids().is_empty());
}

#[test]
fn a_second_daemon_on_the_same_spool_refuses_to_start_and_leaves_the_first_intact() {
    let site = Site::new(&Cfg::new());
    let d = site.start();
    d.predict("first", &image_bytes(0));
    let partial: Vec<String> = names(&site.out())
        .into_iter()
        .filter(|n| n.ends_with(".partial"))
        .collect();
    assert_eq!(partial.len(), 1, "the first daemon has an open file");

    let (status, log) = start_expecting_failure(&site);
    assert_eq!(
        status.code(),
        Some(1),
        "a clean exit with an error, not a crash: {status:?}\n{log}"
    );
    assert!(
        log.contains("in use by another daemon") && log.contains("daemon.lock"),
        "{log}"
    );
    assert!(
        !log.contains("INTERNAL ASSERT") && !log.contains("panicked"),
        "{log}"
    );

    assert!(
        site.out().join(&partial[0]).is_file(),
        "the first daemon's open file is untouched"
    );
    d.predict("second", &image_bytes(1));
    d.stop();
    assert_eq!(
        site.finished_counts(),
        BTreeMap::from([("first".to_string(), 1), ("second".to_string(), 1)])
    );
    assert!(site.pending_ids().is_empty());
    assert!(
        !d_log_mentions("not finished", &site),
        "the first daemon finished its file"
    );
}

#[cfg(unix)]
#[test]
fn symlinks_out_of_the_watched_folder_are_not_followed_and_quarantine_keeps_the_mode() {
    use std::os::unix::fs::PermissionsExt;
    let site = Site::new(&Cfg {
        watch: true,
        ..Cfg::new()
    });
    let secret = site.root().join("secret.jpg");
    std::fs::write(&secret, image_bytes(2)).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let input = site.input();
    std::os::unix::fs::symlink(&secret, input.join("link.jpg")).unwrap();
    let private = input.join("private.jpg");
    std::fs::write(&private, b"not an image, and not for everyone").unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).unwrap();
    let d = site.start();
    let id = |f: &str| plankton::serve::spool::id_for_path(Path::new(f));
    d.wait_predicted(&id("private.jpg"));
    // Written after the link: once it is predicted, the scans that took it saw the link.
    std::fs::write(input.join("ok.jpg"), image_bytes(0)).unwrap();
    d.wait_predicted(&id("ok.jpg"));
    let log = d.log();
    d.stop();
    assert!(
        !site.finished_counts().contains_key(&id("link.jpg")),
        "the link was followed out of the folder"
    );
    assert!(log.contains("symbolic link skipped"), "{log}");
    let q = site.quarantine().join(id("private.jpg"));
    let mode = std::fs::metadata(&q).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the quarantined copy keeps the file's mode");
    assert_eq!(
        names(&site.quarantine()).len(),
        2,
        "only private.jpg and its reason"
    );
}

#[cfg(unix)]
#[test]
fn a_file_name_that_is_not_utf8_is_taken_once_across_restarts() {
    use std::os::unix::ffi::OsStrExt;
    let site = Site::new(&Cfg {
        watch: true,
        ..Cfg::new()
    });
    let name = std::ffi::OsStr::from_bytes(b"caf\xe9.jpg");
    std::fs::write(site.input().join(name), image_bytes(3)).unwrap();
    let id = plankton::serve::spool::id_for_path(Path::new(name));
    let d = site.start();
    d.wait_predicted(&id);
    d.stop();
    for i in 0..2 {
        let d = site.start();
        // A new file taken after the restart: the scans that took it saw the old one too.
        let f = format!("later-{i}.jpg");
        std::fs::write(site.input().join(&f), image_bytes(i)).unwrap();
        d.wait_predicted(&plankton::serve::spool::id_for_path(Path::new(&f)));
        d.stop();
    }
    assert_eq!(
        site.finished_counts().get(&id),
        Some(&1),
        "{:?}",
        site.finished_counts()
    );
}

#[test]
fn queue_depth_gauges_fall_back_to_zero_when_idle() {
    let site = Site::new(&Cfg {
        max_images: 2,
        tta: 8,
        patches: 4,
        ..Cfg::new()
    });
    let d = site.start();
    let ids: Vec<String> = (0..24).map(|i| format!("g{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(d.upload(id, &image_bytes(i)).status, 202);
    }
    for id in &ids {
        d.wait_predicted(id);
    }
    let depths = |text: &str| {
        ["ingest", "patches", "rows"]
            .map(|q| metric_value(text, &format!("plankton_queue_depth{{queue=\"{q}\"}}")))
    };
    let t0 = Instant::now();
    let last = loop {
        let text = d.get("/metrics").text();
        let now = depths(&text);
        if now == [Some(0.0); 3] {
            break now;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "queue gauges stale at idle: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(last, [Some(0.0); 3]);
    // The images still spooled (rows in the open file) are visible as a gauge.
    assert_eq!(
        site.pending_ids().len(),
        ids.len(),
        "rows in the open file: still spooled"
    );
    poll("the spooled-images gauge", || {
        let text = d.get("/metrics").text();
        (metric_value(&text, "plankton_serve_spooled_images") == Some(ids.len() as f64))
            .then_some(())
    });
    d.stop();
}

#[test]
fn an_empty_token_file_is_refused_at_start() {
    let tokens = tempfile::tempdir().unwrap();
    for content in ["", "  \n\n"] {
        let token_file = tokens.path().join("token");
        std::fs::write(&token_file, content).unwrap();
        let site = Site::new(&Cfg {
            token_file: Some(token_file.clone()),
            ..Cfg::new()
        });
        let (status, log) = start_expecting_failure(&site);
        assert_eq!(status.code(), Some(1), "{log}");
        assert!(
            log.contains("token file is empty") && log.contains(token_file.to_str().unwrap()),
            "{content:?}: {log}"
        );
        assert!(site.pending_files().is_empty() && names(&site.out()).is_empty());
    }
}

#[test]
fn served_rows_keep_the_upload_name_the_decoded_size_and_flag_non_organisms() {
    fn png(img: &image::GrayImage) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }
    let site = Site::new(&Cfg::new());
    let d = site.start();
    let good = image_bytes(0);
    let size = image::load_from_memory(&good).unwrap();
    let r = d.post(
        "/v1/images?id=named&name=some%2Fdir%2FIMG_0007.jpg&wait=true",
        &[],
        &good,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["flag"].is_null(), "{}", r.text());
    let tiny = png(&image::GrayImage::from_pixel(1, 1, image::Luma([0])));
    let p = d.predict("tiny", &tiny);
    assert_eq!(p["flag"], "too_small", "{p}");
    let blank = png(&image::GrayImage::from_pixel(
        4096,
        4096,
        image::Luma([255]),
    ));
    let p = d.predict("blank", &blank);
    assert_eq!(
        (p["flag"].as_str(), p["image_width"].as_u64()),
        (Some("blank"), Some(4096)),
        "{p}"
    );
    let r = d.post(
        "/v1/images?id=cutn&name=cut.jpg&wait=true",
        &[],
        &truncated(),
    );
    assert_eq!(r.status, 422, "{}", r.text());
    let log = d.log();
    d.stop();

    let rows: BTreeMap<String, ServedRow> = served_rows(&site)
        .into_iter()
        .map(|r| (r.id.clone(), r))
        .collect();
    assert_eq!(
        rows["named"].source_path, "http:IMG_0007.jpg",
        "the client's file name, without its folders"
    );
    assert_eq!(rows["named"].size, Some((size.height(), size.width())));
    assert_eq!(rows["named"].flag, None);
    assert_eq!(
        (rows["tiny"].size, rows["tiny"].flag.as_deref()),
        (Some((1, 1)), Some("too_small"))
    );
    assert_eq!(
        (rows["blank"].size, rows["blank"].flag.as_deref()),
        (Some((4096, 4096)), Some("blank"))
    );
    assert!(
        rows["tiny"].has_probabilities && rows["blank"].has_probabilities,
        "flagged, still predicted"
    );
    let cut = &rows["cutn"];
    assert_eq!(cut.source_path, "http:cut.jpg");
    let err = cut.error.as_deref().unwrap();
    assert!(
        !err.contains('\n') && err == err.trim(),
        "one line: {err:?}"
    );
    // One WARN line per quarantined image, and no colour codes in a log file.
    let warned = log
        .lines()
        .filter(|l| l.contains("quarantined") && l.contains("id=cutn"))
        .count();
    assert_eq!(warned, 1, "{log}");
    assert!(!log.contains('\u{1b}'), "colour escape codes in a log file");
    assert!(
        log.lines().all(|l| !l.trim().is_empty()),
        "no line split by a decoder message"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn a_crash_between_a_files_rename_and_the_spool_release_duplicates_no_row() {
    let site = Site::new(&Cfg::new());
    let d = site.start();
    for (i, id) in ["w1", "w2", "w3"].iter().enumerate() {
        d.predict(id, &image_bytes(i));
    }
    // The spool as it is while their rows are in the open file...
    let saved = site.root().join("saved-pending");
    copy_dir(&site.spool().join("pending"), &saved);
    d.stop();
    assert!(site.pending_ids().is_empty());
    // ...put back after the file was finished: the state a kill -9 leaves when it comes between
    // the file's rename and the release of its images.
    copy_dir(&saved, &site.spool().join("pending"));
    assert_eq!(site.pending_ids().len(), 3);
    let d = site.start();
    assert!(
        d.ready.contains("(0 spooled image(s) replayed)"),
        "{}",
        d.ready
    );
    d.predict("w4", &image_bytes(3));
    let log = d.log();
    d.stop();
    assert!(log.contains("already in a finished file"), "{log}");
    let want: BTreeMap<String, usize> = ["w1", "w2", "w3", "w4"]
        .iter()
        .map(|id| (id.to_string(), 1))
        .collect();
    assert_eq!(site.finished_counts(), want, "one row each");
    assert!(site.pending_ids().is_empty());

    // Files of another spool (a copied output folder) are not taken as this spool's rows.
    let other = Site::new(&Cfg::new());
    let d = other.start();
    d.upload("w1", &image_bytes(0));
    let mut d = d;
    d.signal("KILL");
    d.wait_exit();
    drop(d);
    for n in names(&site.out())
        .into_iter()
        .filter(|n| n.ends_with(".parquet"))
    {
        std::fs::copy(site.out().join(&n), other.out().join(&n)).unwrap();
    }
    let d = other.start();
    d.wait_predicted("w1");
    d.stop();
    assert_eq!(
        other
            .finished_rows()
            .iter()
            .filter(|(r, _)| r.image_id == "w1")
            .count(),
        2,
        "its own row, and the copied file's"
    );
}

#[test]
fn the_output_folder_stays_locked_when_removed_while_running() {
    let site = Site::new(&Cfg::new());
    let d = site.start();
    d.predict("o1", &image_bytes(0));
    // Someone removes the output folder (with the open file and its lock) while running.
    std::fs::remove_dir_all(site.out()).unwrap();
    poll("the output folder made again and locked", || {
        site.out()
            .join(".plankton-serve.lock")
            .is_file()
            .then_some(())
    });
    d.predict("o2", &image_bytes(1));
    // A second daemon with its own spool but this output folder is still refused.
    let other = Site::new(&Cfg::new());
    let text = std::fs::read_to_string(other.config()).unwrap();
    let text = text.replace(
        &format!("{:?}", other.out().to_str().unwrap()),
        &format!("{:?}", site.out().to_str().unwrap()),
    );
    std::fs::write(other.config(), text).unwrap();
    let (status, log) = start_expecting_failure(&other);
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("output folder") && log.contains("in use by another daemon"),
        "{log}"
    );
    d.stop();
    assert!(d_log_mentions(
        "output folder was removed while running",
        &site
    ));
    // The rows of the file open at the removal went with it: their images stayed spooled and
    // are predicted at the next start.
    site.start().stop();
    let counts = site.finished_counts();
    assert!(
        counts.contains_key("o1") && counts.contains_key("o2"),
        "{counts:?}"
    );
    assert!(site.pending_ids().is_empty());
}

fn d_log_mentions(what: &str, site: &Site) -> bool {
    std::fs::read_to_string(site.root().join("daemon.log"))
        .unwrap_or_default()
        .contains(what)
}

#[test]
fn a_wrong_model_folder_is_refused_before_anything_is_created() {
    let site = Site::new(&Cfg {
        run: PathBuf::from("/nonexistent/run"),
        ..Cfg::new()
    });
    let (status, log) = start_expecting_failure(&site);
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("/nonexistent/run") && log.contains("no such run directory"),
        "{log}"
    );
    assert!(!site.spool().exists() && !site.out().exists() && !site.quarantine().exists());
    // A folder that exists but holds no trained run: the same.
    let empty = tempfile::tempdir().unwrap();
    let site = Site::new(&Cfg {
        run: empty.path().to_path_buf(),
        ..Cfg::new()
    });
    let (status, log) = start_expecting_failure(&site);
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("not a trained run"), "{log}");
    assert!(!site.spool().exists() && !site.out().exists() && !site.quarantine().exists());
}

#[cfg(unix)]
#[test]
fn a_watched_file_name_with_a_newline_stays_one_line_in_rows_and_logs() {
    let site = Site::new(&Cfg {
        watch: true,
        ..Cfg::new()
    });
    let d = site.start();
    std::fs::write(site.input().join("bad\nname.jpg"), b"not an image").unwrap();
    let id = plankton::serve::spool::id_for_path(Path::new("bad\nname.jpg"));
    d.wait_predicted(&id);
    let log = d.log();
    d.stop();
    let rows = served_rows(&site);
    let row = rows.iter().find(|r| r.id == id).unwrap();
    let err = row.error.as_deref().unwrap();
    assert!(
        !err.contains('\n') && err.contains("bad\\nname.jpg"),
        "{err:?}"
    );
    let warned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("image quarantined"))
        .collect();
    assert_eq!(warned.len(), 1, "{log}");
    assert!(
        warned[0].contains("name.jpg"),
        "the whole record on one line: {}",
        warned[0]
    );
}

/// A full disk under the spool: the upload that does not fit is answered 507 Insufficient
/// Storage (reason `disk_full`, so a client backs off and retries) instead of a bare 500; the
/// failed write leaves nothing behind, a later image that fits is predicted, and the daemon
/// stays healthy. The full disk is real: the daemon runs in a user+mount namespace
/// (`unshare -Urm`) with its spool on a 96 KiB tmpfs.
#[test]
fn a_full_spool_disk_answers_507_and_the_daemon_keeps_serving() {
    let probe = Command::new("unshare")
        .args(["-Urm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp"])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!(
            "SKIPPED: unprivileged user+mount namespaces (unshare -Urm) are not available here"
        );
        return;
    }
    let site = Site::new(&Cfg::new());
    std::fs::create_dir_all(site.spool()).unwrap();
    let mut c = Command::new("unshare");
    c.args([
        "-Urm",
        "sh",
        "-c",
        r#"mount -t tmpfs -o size=96k tmpfs "$0" && exec "$@""#,
    ])
    .arg(site.spool())
    .arg(plankton_bin())
    .arg("serve")
    .arg("--pipeline")
    .arg(site.config())
    .env("RUST_LOG", "info")
    .stdin(Stdio::null())
    .stdout(Stdio::piped());
    let d = Daemon::start_with(&site, c);

    // 200 KiB of bytes cannot fit in 96 KiB, whatever they are.
    let mut big = image_bytes(0);
    big.resize(200 * 1024, 0);
    let r = d.upload("too-big", &big);
    assert_eq!(r.status, 507, "{}", r.text());
    assert_eq!(r.json()["reason"], "disk_full", "{}", r.text());
    let msg = r.json()["error"].as_str().unwrap_or_default().to_string();
    assert!(msg.contains("disk is full"), "{msg}");
    // Nothing of it was accepted (the spool itself is only visible inside the namespace).
    assert_eq!(d.get("/v1/predictions/too-big").status, 404);

    let p = d.predict("fits", &image_bytes(1));
    assert!(p["error"].is_null(), "{p}");
    assert!(p["predicted_class"].is_string(), "{p}");
    assert_eq!(d.get("/healthz").status, 200);
    let metrics = d.get("/metrics").text();
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("reason=\"disk_full\"") && !l.starts_with('#')),
        "no disk_full error counted:\n{metrics}"
    );
    d.stop();
}

/// The drift gauges of the daemon, per camera folder: a camera whose stream stays the same keeps
/// its gauges exactly; one that turns to a single organism in darker images moves its class-mix
/// divergence and brightness. Only the two camera labels appear.
#[test]
fn a_shifted_camera_moves_its_drift_gauges_and_a_stationary_one_does_not() {
    let site = Site::new(&Cfg {
        watch: true,
        extra: "[drift]\nwindow_images = 24\nmin_images = 24\nmax_sources = 4\n",
        ..Cfg::new()
    });
    let d = site.start();
    let images = &trained().images;
    let put = |camera: &str, first: usize, bytes: &dyn Fn(usize) -> Vec<u8>| {
        let dir = site.input().join(camera);
        std::fs::create_dir_all(&dir).unwrap();
        for i in first..first + 24 {
            let tmp = site.root().join(format!("{camera}-{i}.tmp"));
            std::fs::write(&tmp, bytes(i)).unwrap();
            std::fs::rename(&tmp, dir.join(format!("{camera}-{i:03}.jpg"))).unwrap();
        }
    };
    let gauges = |camera: &str, seen: f64| {
        poll(
            &format!("{camera}: {seen} images in the drift counter"),
            || {
                let text = d.get("/metrics").text();
                let v = |name: &str| metric_value(&text, &format!("{name}{{source=\"{camera}\"}}"));
                (v("plankton_drift_images_total") == Some(seen)).then(|| {
                    [
                        "plankton_drift_class_divergence",
                        "plankton_drift_mean_confidence",
                        "plankton_drift_mean_brightness",
                        "plankton_drift_mean_image_pixels",
                        "plankton_drift_window_images",
                    ]
                    .map(|n| v(n).unwrap_or_else(|| panic!("{camera}: no {n}:\n{text}")))
                })
            },
        )
    };
    let same = |i: usize| std::fs::read(&images[i % images.len()]).unwrap();
    put("cam_a", 0, &same);
    put("cam_b", 0, &same);
    let (a1, b1) = (gauges("watch:cam_a", 24.0), gauges("watch:cam_b", 24.0));
    assert_eq!(a1[4], 24.0);
    // One organism, darker: every image of cam_b's second window.
    let dark = |_| {
        let img = image::open(&images[0]).unwrap().to_luma8();
        let dark = image::GrayImage::from_fn(img.width(), img.height(), |x, y| {
            image::Luma([(f32::from(img.get_pixel(x, y)[0]) * 0.35) as u8])
        });
        let mut out = std::io::Cursor::new(Vec::new());
        dark.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    };
    put("cam_a", 24, &same);
    put("cam_b", 24, &dark);
    let (a2, b2) = (gauges("watch:cam_a", 48.0), gauges("watch:cam_b", 48.0));
    for (k, (x, y)) in a1.iter().zip(&a2).enumerate() {
        assert!(
            (x - y).abs() < 1e-9,
            "stationary camera gauge {k} moved: {a1:?} -> {a2:?}"
        );
    }
    // Against the training prior (4 classes, equally frequent), a window of one predicted class
    // diverges by 0.549 bits, the most any window can.
    assert!(b2[0] > 0.5 && b2[0] >= b1[0] - 1e-9, "{b1:?} -> {b2:?}");
    assert!(b2[2] < 0.5 * b1[2], "brightness {b1:?} -> {b2:?}");
    let text = d.get("/metrics").text();
    let labels: BTreeSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("plankton_drift_"))
        .filter_map(|l| l.split("source=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(
        labels,
        BTreeSet::from(["watch:cam_a", "watch:cam_b"]),
        "{text}"
    );
    d.stop();
}
