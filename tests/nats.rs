//! Daemons as a NATS JetStream consumer group, against a real `nats-server` (Debian's package,
//! which `make test` unpacks into .tools/bin) started by each test on loopback with JetStream
//! on a temporary store: two daemons on one stream with a `kill -9`, a server restart
//! mid-stream, a slow group under a fast publisher, and compaction to one row per image.
//!
//! The group is throttled by the ack-after-durable rule itself: with `max_ack_pending` 8 and
//! files rolled every second, at most 8 images are between delivery and a finished file, so a
//! stream of 80 takes seconds and a kill lands mid-stream.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "common/tiny_serve.rs"]
mod tiny_serve;
use tiny_serve::trained;

const DEADLINE: Duration = Duration::from_secs(120);
const STREAM: &str = "IMAGES";
const CONSUMER: &str = "daemons";
const SUBJECT: &str = "plankton.images.test";

// ---------------------------------------------------------------------------------------------
// nats-server

fn nats_server_bin() -> Option<PathBuf> {
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/nats-server");
    if local.is_file() {
        return Some(local);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("nats-server"))
            .find(|p| p.is_file())
    });
    if on_path.is_none() {
        assert!(
            std::env::var_os("PLANKTON_REQUIRE_NATS").is_none(),
            "nats-server required (PLANKTON_REQUIRE_NATS): `make nats-server` unpacks it"
        );
        eprintln!("skipping: no nats-server; `make test` unpacks Debian's into .tools/bin");
    }
    on_path
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct NatsServer {
    child: Child,
    port: u16,
    store: PathBuf,
    bin: PathBuf,
}

impl NatsServer {
    fn start(bin: &Path, store: &Path, port: u16) -> NatsServer {
        let child = Command::new(bin)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        let server = NatsServer {
            child,
            port,
            store: store.to_path_buf(),
            bin: bin.to_path_buf(),
        };
        poll("nats-server listening", Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        server
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// `kill -9` and a new server on the same port and store.
    fn restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        *self = NatsServer::start(&self.bin.clone(), &self.store.clone(), self.port);
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The consumer's (not yet delivered, delivered and unacked, being redelivered) counts.
fn consumer_counts(url: &str) -> Option<(u64, usize, usize)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = async_nats::connect(url).await.ok()?;
        let js = async_nats::jetstream::new(client);
        let mut c: async_nats::jetstream::consumer::PullConsumer =
            js.get_consumer_from_stream(CONSUMER, STREAM).await.ok()?;
        let info = c.info().await.ok()?;
        Some((info.num_pending, info.num_ack_pending, info.num_redelivered))
    })
}

/// Messages on `subject`, collected by a subscriber thread (started before this returns).
fn subscribe(url: &str, subject: &str) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (url, subject, sink) = (url.to_string(), subject.to_string(), got.clone());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            use futures_util::StreamExt;
            let client = async_nats::connect(url).await.unwrap();
            let mut sub = client.subscribe(subject).await.unwrap();
            client.flush().await.unwrap();
            ready_tx.send(()).unwrap();
            while let Some(m) = sub.next().await {
                let text = String::from_utf8_lossy(&m.payload).to_string();
                sink.lock().unwrap().push(text);
            }
        });
    });
    ready_rx.recv_timeout(DEADLINE).expect("subscribed");
    got
}

// ---------------------------------------------------------------------------------------------
// The tiny run and the images

/// The id `plankton publish` (and the folder source) gives a file at `relative`.
fn id_of(relative: &str) -> String {
    plankton::serve::spool::id_for_path(Path::new(relative))
}

/// `n` image files `img-000.jpg`... (the synthetic test images, repeated) in `dir`; their ids.
fn image_folder(dir: &Path, n: usize) -> BTreeSet<String> {
    std::fs::create_dir_all(dir).unwrap();
    let imgs = &trained().images;
    (0..n)
        .map(|i| {
            let name = format!("img-{i:03}.jpg");
            std::fs::copy(&imgs[i % imgs.len()], dir.join(&name)).unwrap();
            id_of(&name)
        })
        .collect()
}

fn plankton() -> Command {
    Command::new(env!("CARGO_BIN_EXE_plankton"))
}

fn publish(url: &str, args: &[&str], dir: &Path) -> String {
    let out = plankton()
        .args([
            "publish",
            "--nats",
            url,
            "--stream",
            STREAM,
            "--subject",
            SUBJECT,
        ])
        .args(args)
        .arg(dir)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "publish failed: {text}");
    text
}

// ---------------------------------------------------------------------------------------------
// Daemons

struct Site {
    dir: tempfile::TempDir,
}

struct Knobs {
    max_ack_pending: usize,
    roll_seconds: u64,
    ack_wait_seconds: u64,
    reference_dir: Option<PathBuf>,
    results_subject: &'static str,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            max_ack_pending: 8,
            roll_seconds: 1,
            ack_wait_seconds: 2,
            reference_dir: None,
            results_subject: "",
        }
    }
}

impl Site {
    fn new(url: &str, k: &Knobs) -> Site {
        let site = Site {
            dir: tempfile::tempdir().unwrap(),
        };
        let q = |p: &Path| format!("{:?}", p.to_str().unwrap());
        let refs = k
            .reference_dir
            .as_ref()
            .map_or("[]".to_string(), |d| format!("[{}]", q(d)));
        let text = format!(
            r#"name = "nats-test"
model = {run}
device = "cpu"
threads = 1
spool = {spool}
quarantine = {quarantine}

[http]
enabled = true
bind = "127.0.0.1:0"

[nats]
enabled = true
servers = ["{url}"]
stream = "{STREAM}"
subjects = ["plankton.images.>"]
consumer = "{CONSUMER}"
batch = 4
ack_wait_seconds = {ack_wait}
max_ack_pending = {map}
reference_dirs = {refs}
results_subject = "{results}"

[batch]
max_images = 4
max_latency_ms = 5

[queue]
ingest = 16
patches = 16
workers = 1

[output]
dir = {out}
roll_rows = 100000
roll_seconds = {roll}
top_k = 2
"#,
            run = q(&trained().run),
            spool = q(&site.dir.path().join("spool")),
            quarantine = q(&site.dir.path().join("quarantine")),
            out = q(&site.out()),
            ack_wait = k.ack_wait_seconds,
            map = k.max_ack_pending,
            roll = k.roll_seconds,
            results = k.results_subject,
        );
        std::fs::write(site.dir.path().join("daemon.toml"), text).unwrap();
        site
    }

    fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    fn quarantine(&self) -> PathBuf {
        self.dir.path().join("quarantine")
    }

    fn start(&self) -> Daemon {
        let mut child = plankton()
            .args(["serve", "--pipeline"])
            .arg(self.dir.path().join("daemon.toml"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.path().join("daemon.log"))
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let t0 = Instant::now();
        let mut addr = None;
        loop {
            let line = rx
                .recv_timeout(DEADLINE.saturating_sub(t0.elapsed()))
                .unwrap_or_else(|_| panic!("daemon not ready: {}", self.log()));
            if let Some(a) = line.strip_prefix("listening on http://") {
                addr = Some(a.parse::<SocketAddr>().unwrap());
            }
            if line.starts_with("ready:") {
                break;
            }
        }
        Daemon {
            child,
            addr: addr.expect("listening line"),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }
}

struct Daemon {
    child: Child,
    addr: SocketAddr,
}

impl Daemon {
    fn kill_9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn stop(mut self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                assert!(s.success(), "the daemon exits 0 after a drain: {s}");
                return;
            }
            assert!(t0.elapsed() < DEADLINE, "the daemon did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn metric(&self, series: &str) -> Option<f64> {
        let mut s = TcpStream::connect(self.addr).ok()?;
        use std::io::{Read, Write};
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Rows

#[derive(Debug, Clone)]
struct Row {
    id: String,
    stream_seq: Option<u64>,
    error: Option<String>,
}

fn read_rows(path: &Path) -> Vec<Row> {
    use arrow::array::{Array, StringArray, UInt64Array};
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(path).unwrap(),
    )
    .unwrap()
    .build()
    .unwrap();
    let mut rows = Vec::new();
    for b in reader {
        let b = b.unwrap();
        let s = |c: &str| {
            b.column_by_name(c)
                .unwrap()
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap()
                .clone()
        };
        let (ids, errors) = (s("image_id"), s("error"));
        let seqs = b
            .column_by_name("stream_seq")
            .unwrap()
            .as_any()
            .downcast_ref::<UInt64Array>()
            .unwrap()
            .clone();
        for i in 0..b.num_rows() {
            rows.push(Row {
                id: ids.value(i).to_string(),
                stream_seq: (!seqs.is_null(i)).then(|| seqs.value(i)),
                error: (!errors.is_null(i)).then(|| errors.value(i).to_string()),
            });
        }
    }
    rows
}

/// Rows of every finished predictions file in the sites' output folders.
fn finished_rows(sites: &[&Site]) -> Vec<Row> {
    let mut rows = Vec::new();
    for site in sites {
        let Ok(listing) = std::fs::read_dir(site.out()) else {
            continue;
        };
        let mut names: Vec<String> = listing
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("predictions-") && n.ends_with(".parquet"))
            .collect();
        names.sort();
        for n in names {
            rows.extend(read_rows(&site.out().join(n)));
        }
    }
    rows
}

fn poll<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until every id has a row and the consumer has nothing pending or unacked.
fn drained(server: &NatsServer, sites: &[&Site], ids: &BTreeSet<String>) -> Vec<Row> {
    poll("the stream to drain", DEADLINE, || {
        let rows = finished_rows(sites);
        let seen: BTreeSet<String> = rows.iter().map(|r| r.id.clone()).collect();
        let counts = consumer_counts(&server.url())?;
        (ids.is_subset(&seen) && counts.0 == 0 && counts.1 == 0).then_some(rows)
    })
}

fn compact(sites: &[&Site], out: &Path) -> (Vec<Row>, String) {
    let o = plankton()
        .arg("compact")
        .arg("--out")
        .arg(out)
        .args(sites.iter().map(|s| s.out()))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "compact: {text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    (read_rows(out), text)
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn two_daemons_share_a_stream_and_a_kill_9_loses_nothing() {
    let Some(bin) = nats_server_bin() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let server = NatsServer::start(&bin, &tmp.path().join("js"), free_port());
    let images = tmp.path().join("images");
    let mut ids = image_folder(&images, 80);
    std::fs::write(images.join("junk.jpg"), b"not an image at all").unwrap();
    let junk_id = id_of("junk.jpg");
    ids.insert(junk_id.clone());
    let knobs = Knobs::default();
    let (a, b) = (
        Site::new(&server.url(), &knobs),
        Site::new(&server.url(), &knobs),
    );
    let (da, db) = (a.start(), b.start());
    let said = publish(&server.url(), &[], &images);
    assert!(said.contains("published 81 message(s)"), "{said}");
    // Mid-stream: a has written rows, and the stream is far from drained.
    poll("daemon a's first finished file", DEADLINE, || {
        (!finished_rows(&[&a]).is_empty()).then_some(())
    });
    let before_kill = finished_rows(&[&a, &b]).len();
    da.kill_9();
    assert!(
        before_kill < 60,
        "the kill came mid-stream ({before_kill} of 81 rows written)"
    );
    // b alone drains the stream: what a held unacked comes to b after ack_wait.
    let a_spooled = std::fs::read_dir(a.dir.path().join("spool/pending"))
        .map(|d| d.count())
        .unwrap_or(0);
    drained(&server, &[&a, &b], &ids);
    let redelivered = db.metric("plankton_nats_redelivered_total").unwrap_or(0.0);
    if a_spooled > 0 {
        assert!(
            redelivered >= 1.0,
            "a held {a_spooled} spool files at its death; b got none of them"
        );
    }
    // a again: it predicts what its spool held (extra rows) and acks those deliveries.
    let da = a.start();
    poll("a's spool replayed", DEADLINE, || {
        let left = std::fs::read_dir(a.dir.path().join("spool/pending"))
            .map(|d| d.count())
            .unwrap_or(0);
        (left == 0).then_some(())
    });
    let rows = drained(&server, &[&a, &b], &ids);
    let mut per_id: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &rows {
        *per_id.entry(&r.id).or_default() += 1;
        assert!(r.stream_seq.is_some(), "{r:?}: every row names its message");
    }
    let extra = rows.len() - ids.len();
    eprintln!(
        "{} rows for {} images: {extra} extra after one kill -9",
        rows.len(),
        ids.len()
    );
    assert!(
        extra <= knobs.max_ack_pending,
        "at most the messages a held can come twice: {extra}"
    );
    // Both daemons took part.
    assert!(!finished_rows(&[&b]).is_empty() && !finished_rows(&[&a]).is_empty());
    // The junk message: an error row, quarantined, terminated (not redelivered for ever).
    let junk: Vec<&Row> = rows.iter().filter(|r| r.id == junk_id).collect();
    assert!(junk.iter().all(|r| r.error.is_some()), "{junk:?}");
    let quarantined = [&a, &b]
        .iter()
        .filter(|s| std::fs::read_dir(s.quarantine()).is_ok_and(|mut d| d.next().is_some()))
        .count();
    assert!(quarantined >= 1, "the junk image is in a quarantine folder");
    let (compacted, said) = compact(&[&a, &b], &tmp.path().join("all.parquet"));
    // A predictions file like any other (class names and model kept from both daemons' files).
    let back =
        plankton::sinks::parquet::Predictions::read(&tmp.path().join("all.parquet")).unwrap();
    assert_eq!(back.class_names.len(), 4);
    assert!(back.model["model_id"].is_string(), "{}", back.model);
    let compacted_ids: Vec<&str> = compacted.iter().map(|r| r.id.as_str()).collect();
    let unique: BTreeSet<&str> = compacted_ids.iter().copied().collect();
    assert_eq!(compacted_ids.len(), ids.len(), "one row per id: {said}");
    assert_eq!(unique.len(), ids.len());
    assert_eq!(
        unique,
        ids.iter().map(String::as_str).collect::<BTreeSet<_>>()
    );
    let errors = compacted.iter().filter(|r| r.error.is_some()).count();
    assert_eq!(errors, 1, "only the junk image failed");
    db.stop();
    da.stop();
    // Nothing pending, nothing being redelivered, once both have drained.
    let (pending, ack_pending, _) = consumer_counts(&server.url()).unwrap();
    assert_eq!((pending, ack_pending), (0, 0));
}

#[test]
fn a_server_restart_mid_stream_loses_nothing_and_references_are_read_from_shared_storage() {
    let Some(bin) = nats_server_bin() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let mut server = NatsServer::start(&bin, &tmp.path().join("js"), free_port());
    let images = tmp.path().join("shared");
    let ids = image_folder(&images, 40);
    let site = Site::new(
        &server.url(),
        &Knobs {
            reference_dir: Some(images.clone()),
            ..Knobs::default()
        },
    );
    let daemon = site.start();
    let said = publish(
        &server.url(),
        &["--reference", "--source", "cam-7"],
        &images,
    );
    assert!(said.contains("published 40 message(s)"), "{said}");
    poll("the first finished file", DEADLINE, || {
        (!finished_rows(&[&site]).is_empty()).then_some(())
    });
    server.restart();
    let rows = drained(&server, &[&site], &ids);
    assert!(rows.iter().all(|r| r.error.is_none()), "{rows:?}");
    let reconnects = daemon
        .metric("plankton_nats_reconnects_total")
        .unwrap_or(0.0);
    assert!(
        reconnects >= 1.0,
        "the daemon saw the server go: {reconnects}"
    );
    eprintln!(
        "{} rows for {} images after a server restart",
        rows.len(),
        ids.len()
    );
    daemon.stop();
}

#[test]
fn a_slow_group_leaves_the_backlog_in_the_stream_and_holds_at_most_max_ack_pending() {
    let Some(bin) = nats_server_bin() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let server = NatsServer::start(&bin, &tmp.path().join("js"), free_port());
    let images = tmp.path().join("images");
    image_folder(&images, 200);
    let knobs = Knobs {
        max_ack_pending: 4,
        roll_seconds: 2,
        ..Knobs::default()
    };
    let site = Site::new(&server.url(), &knobs);
    let daemon = site.start();
    let t0 = Instant::now();
    let said = publish(&server.url(), &["--in-flight", "32"], &images);
    assert!(said.contains("published 200 message(s)"), "{said}");
    eprintln!("published 200 in {:.2} s", t0.elapsed().as_secs_f64());
    for _ in 0..20 {
        let (pending, ack_pending, _) = consumer_counts(&server.url()).unwrap();
        assert!(
            ack_pending <= 4,
            "the group holds at most max_ack_pending: {ack_pending}"
        );
        assert!(pending >= 150, "the backlog waits in the stream: {pending}");
        let held = daemon.metric("plankton_nats_held_messages").unwrap_or(0.0);
        assert!(held <= 4.0, "held {held}");
        let spooled = std::fs::read_dir(site.dir.path().join("spool/pending"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert!(
            spooled <= 2 * 4,
            "spool: {spooled} files (bytes + sidecar each)"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A re-publish of the same files is recognised by the stream: nothing stored twice.
    let again = publish(&server.url(), &[], &images);
    assert!(
        again.contains("published 0 message(s) (200 duplicate(s)"),
        "{again}"
    );
    daemon.stop();
    // Acked exactly what is written: every image with a row in a finished file, and nothing
    // else (the rest stays in the stream for the next daemon: not yet delivered, or delivered
    // while this one stopped and offered again after ack_wait).
    let written: BTreeSet<String> = finished_rows(&[&site]).into_iter().map(|r| r.id).collect();
    assert!(!written.is_empty());
    poll("acks = rows written", Duration::from_secs(10), || {
        let (pending, ack_pending, _) = consumer_counts(&server.url())?;
        let acked = 200 - pending as usize - ack_pending;
        (acked == written.len()).then_some(())
    });
}

#[test]
fn a_long_roll_does_not_stall_the_group_at_max_ack_pending() {
    // Acked only once their file is finished: with files rolled every 10 minutes, a group at
    // max_ack_pending would wait that long; a daemon finishes its file early instead.
    let Some(bin) = nats_server_bin() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let server = NatsServer::start(&bin, &tmp.path().join("js"), free_port());
    let images = tmp.path().join("images");
    let ids = image_folder(&images, 40);
    let site = Site::new(
        &server.url(),
        &Knobs {
            roll_seconds: 600,
            results_subject: "plankton.results",
            ..Knobs::default()
        },
    );
    let results = subscribe(&server.url(), "plankton.results");
    let daemon = site.start();
    publish(&server.url(), &[], &images);
    let t0 = Instant::now();
    let rows = drained(&server, &[&site], &ids);
    assert_eq!(rows.len(), 40);
    let rolls = daemon
        .metric("plankton_nats_pressure_rolls_total")
        .unwrap_or(0.0);
    assert!(rolls >= 1.0, "finished early {rolls} times");
    // Each written row was published as a result, once its file was finished.
    let got = poll("40 results", DEADLINE, || {
        let got = results.lock().unwrap().clone();
        (got.len() >= 40).then_some(got)
    });
    let result_ids: BTreeSet<String> = got
        .iter()
        .map(|j| {
            let v: serde_json::Value = serde_json::from_str(j).unwrap();
            assert!(v["predicted_class"].is_string(), "{v}");
            v["id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(result_ids, ids);
    eprintln!(
        "40 images through 8 unacked at most in {:.1} s, {rolls} early file(s)",
        t0.elapsed().as_secs_f64()
    );
    daemon.stop();
}
