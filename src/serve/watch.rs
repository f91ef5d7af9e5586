//! Folder ingest: watches the instrument's output folder and feeds complete new files into the
//! spool, then into the ingest queue.
//!
//! A file is taken once its (size, mtime) has not changed for `settle_ms` (observed across
//! scans), skipping hidden entries and names still being written under a temporary suffix.
//! Taking is: copy into the spool (durable) -> append to `<spool>/watch-ledger.tsv` (fsynced)
//! -> send on the queue. The ledger remembers what was taken (relative path, size, mtime), so a
//! restart does not take the same file again; the folder itself is never modified.
//!
//! Crash windows: after the spool copy but before the ledger line, the entry is in the spool
//! (the engine replays it from `Spool::pending`) and records which version of which file it
//! holds, so the watcher's next start writes the missing ledger line and the file is not taken
//! a second time. After the ledger line but before the send, the spool replays it. While a file's id is still pending in the spool, the file is
//! not taken again (a rewritten file waits for its previous version to finish).
//!
//! IFCB bins: the three files of a bin (`<bin>.hdr`, `.adc`, `.roi`) are taken together, once
//! all three are present and none has changed for `ifcb_settle_ms`. The bin is read whole
//! ([`crate::sources::ifcb::Bin`]); each ROI is spooled as a PNG under its ROI pid, then the
//! three ledger lines are written. A bin that does not read whole (an ADC row past the end of
//! the .roi, an unknown header) is spooled as one entry under the bin pid and quarantined at
//! once with the reason: one error row, never some of its ROIs. A crash in the middle of a bin
//! takes it again at the next start (ROIs still pending are not spooled twice; ones already
//! written give a second row, which `plankton compact` removes).
//!
//! Notify mode: filesystem events trigger an early rescan; a rescan every `poll_interval_ms`
//! (and at the moment the next candidate settles) is the safety net. Poll mode: rescans only.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::serve::config::{Backpressure, SymlinkPolicy, WatchConfig, WatchMode};
use crate::serve::one_line;
use crate::serve::spool::{id_for_path, Spool, SpoolEntry, SpoolError, WatchedFile};
use crate::telemetry::{STAGE_DROPPED, STAGE_ERRORS, STAGE_RECEIVED};

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("the ingest queue closed while the folder watcher was still running")]
    Closed,
}

pub const LEDGER_FILE: &str = "watch-ledger.tsv";
const LEDGER_TMP: &str = ".tmp-watch-ledger.tsv";
/// A spool that keeps failing (a full disk) is logged at most this often.
const SPOOL_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);
/// Event-triggered rescans are at least this far apart (a burst of writes is one rescan).
const EVENT_GAP: Duration = Duration::from_millis(25);

fn io_err(path: &Path, e: impl std::fmt::Display) -> WatchError {
    WatchError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn error_metric(reason: &'static str) {
    metrics::counter!(STAGE_ERRORS, "stage" => "watch", "reason" => reason).increment(1);
}

/// What identifies one version of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileState {
    size: u64,
    mtime_ns: u64,
}

impl FileState {
    fn of(meta: &fs::Metadata) -> FileState {
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64);
        FileState {
            size: meta.len(),
            mtime_ns,
        }
    }
}

#[derive(Debug)]
struct SeenFile {
    rel: PathBuf,
    /// What is read: the file itself, or (a link followed under `symlinks = "inside"`) the
    /// link's target inside the folder.
    abs: PathBuf,
    state: FileState,
}

#[derive(Debug, Default)]
struct Scan {
    files: Vec<SeenFile>,
    /// Symbolic links not followed, with why.
    skipped_links: Vec<(PathBuf, &'static str)>,
    /// Folders that could not be listed (then nothing is forgotten on this scan's evidence).
    errors: Vec<(PathBuf, String)>,
}

/// The bin pid of an IFCB bin's file (`<bin>.hdr`, `.adc` or `.roi`), with the folder.
fn bin_part(rel: &Path) -> Option<PathBuf> {
    let ext = rel.extension()?;
    if ext != "hdr" && ext != "adc" && ext != "roi" {
        return None;
    }
    let stem = rel.file_stem()?.to_str()?;
    crate::sources::ifcb::generation(stem)?;
    Some(rel.with_extension(""))
}

/// A settled file with its ledger key.
type Ready = (String, SeenFile);

/// Splits settled files into whole IFCB bins (all three files settled), the bins (folder and
/// pid) whose settled files are not all there, and other files; the parts of a bin not yet
/// whole are left for a later scan.
fn whole_bins(ready: Vec<Ready>) -> (Vec<Vec<Ready>>, Vec<PathBuf>, Vec<Ready>) {
    let mut bins: std::collections::BTreeMap<PathBuf, Vec<Ready>> = Default::default();
    let mut other = Vec::new();
    for (key, f) in ready {
        match bin_part(&f.rel) {
            Some(stem) => bins.entry(stem).or_default().push((key, f)),
            None => other.push((key, f)),
        }
    }
    let (whole, incomplete): (Vec<_>, Vec<_>) =
        bins.into_iter().partition(|(_, parts)| parts.len() == 3);
    (
        whole.into_iter().map(|(_, parts)| parts).collect(),
        incomplete.into_iter().map(|(stem, _)| stem).collect(),
        other,
    )
}

fn ignored(name: &str, ignore_suffixes: &[String]) -> bool {
    name.starts_with('.')
        || ignore_suffixes
            .iter()
            .any(|s| !s.is_empty() && name.ends_with(s.as_str()))
}

/// Lists candidate files under `root` (blocking). Symbolic links are never followed out of
/// the folder: under [`SymlinkPolicy::Skip`] none is, under [`SymlinkPolicy::Inside`] a link to a
/// regular file inside `root` is (read at its target); symlinked folders never are (no loops).
fn scan(root: &Path, recursive: bool, ignore_suffixes: &[String], symlinks: SymlinkPolicy) -> Scan {
    let mut out = Scan::default();
    // Canonical root for the "inside" test (the folder itself may be reached through a link).
    let canonical_root = fs::canonicalize(root).ok();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel_dir) = stack.pop() {
        let abs_dir = root.join(&rel_dir);
        let listing = match fs::read_dir(&abs_dir) {
            Ok(l) => l,
            Err(e) => {
                out.errors.push((abs_dir, e.to_string()));
                continue;
            }
        };
        for ent in listing {
            let ent = match ent {
                Ok(e) => e,
                Err(e) => {
                    out.errors.push((abs_dir.clone(), e.to_string()));
                    continue;
                }
            };
            let name = ent.file_name();
            if ignored(&name.to_string_lossy(), ignore_suffixes) {
                continue;
            }
            let rel = rel_dir.join(&name);
            let Ok(ft) = ent.file_type() else { continue };
            if ft.is_dir() {
                if recursive {
                    stack.push(rel);
                }
                continue;
            }
            let (abs, meta) = if ft.is_symlink() {
                if symlinks == SymlinkPolicy::Skip {
                    out.skipped_links.push((
                        ent.path(),
                        "symlinks are not followed (watch.symlinks = \"skip\")",
                    ));
                    continue;
                }
                let target = match fs::canonicalize(ent.path()) {
                    Ok(t) => t,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        out.skipped_links.push((ent.path(), "dangling symlink"));
                        continue;
                    }
                    Err(e) => {
                        out.errors.push((ent.path(), e.to_string()));
                        continue;
                    }
                };
                if !canonical_root
                    .as_ref()
                    .is_some_and(|r| target.starts_with(r))
                {
                    out.skipped_links
                        .push((ent.path(), "symlink to a file outside the watched folder"));
                    continue;
                }
                let meta = fs::symlink_metadata(&target);
                (target, meta)
            } else {
                (ent.path(), ent.metadata())
            };
            match meta {
                Ok(m) if m.is_file() => out.files.push(SeenFile {
                    abs,
                    rel,
                    state: FileState::of(&m),
                }),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {} // vanished meanwhile
                Err(e) => out.errors.push((ent.path(), e.to_string())),
            }
        }
    }
    out
}

/// The ledger's text form of a relative path: its bytes, with tab, newline, carriage return
/// and backslash escaped, and bytes that are not UTF-8 written as `\\xNN`, so every name
/// (a camera's Latin-1 file name too) round-trips exactly and is found again after a restart.
fn ledger_key(rel: &Path) -> String {
    let mut s = String::new();
    let mut rest = path_bytes(rel);
    while !rest.is_empty() {
        let (valid, bad) = match std::str::from_utf8(rest) {
            Ok(v) => (v, &[][..]),
            Err(e) => {
                let (v, after) = rest.split_at(e.valid_up_to());
                let n = e.error_len().unwrap_or(after.len());
                (std::str::from_utf8(v).expect("valid prefix"), &after[..n])
            }
        };
        for c in valid.chars() {
            match c {
                '\\' => s.push_str("\\\\"),
                '\t' => s.push_str("\\t"),
                '\n' => s.push_str("\\n"),
                '\r' => s.push_str("\\r"),
                c => s.push(c),
            }
        }
        for b in bad {
            s.push_str(&format!("\\x{b:02x}"));
        }
        rest = &rest[valid.len() + bad.len()..];
    }
    s
}

#[cfg(unix)]
fn path_bytes(p: &Path) -> &[u8] {
    use std::os::unix::ffi::OsStrExt;
    p.as_os_str().as_bytes()
}

#[cfg(not(unix))]
fn path_bytes(p: &Path) -> &[u8] {
    p.to_str().map(str::as_bytes).unwrap_or_default()
}

fn unescape_key(key: &str) -> PathBuf {
    let mut out: Vec<u8> = Vec::with_capacity(key.len());
    let mut chars = key.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        match chars.next() {
            Some('t') => out.push(b'\t'),
            Some('n') => out.push(b'\n'),
            Some('r') => out.push(b'\r'),
            Some('x') => {
                let hex: String = chars.by_ref().take(2).collect();
                match u8::from_str_radix(&hex, 16) {
                    Ok(b) if hex.len() == 2 => out.push(b),
                    _ => out.extend_from_slice(format!("\\x{hex}").as_bytes()),
                }
            }
            Some(o) => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(o.encode_utf8(&mut buf).as_bytes());
            }
            None => out.push(b'\\'),
        }
    }
    path_from_bytes(out)
}

#[cfg(unix)]
fn path_from_bytes(b: Vec<u8>) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(b))
}

#[cfg(not(unix))]
fn path_from_bytes(b: Vec<u8>) -> PathBuf {
    PathBuf::from(String::from_utf8_lossy(&b).into_owned())
}

/// Files already taken: `rel_path \t size \t mtime_ns`, one line each, appended and fsynced.
struct Ledger {
    path: PathBuf,
    dir: PathBuf,
    file: File,
    entries: HashMap<String, FileState>,
    lines: usize,
}

impl Ledger {
    /// Loads the ledger and rewrites it with only the entries whose file still exists unchanged
    /// under `root` (a torn last line from a crash goes too).
    fn load_and_compact(spool_dir: &Path, root: &Path) -> Result<Ledger, WatchError> {
        let path = spool_dir.join(LEDGER_FILE);
        let mut entries = HashMap::new();
        let mut read = 0usize;
        match File::open(&path) {
            Ok(f) => {
                for line in BufReader::new(f).split(b'\n') {
                    let line = line.map_err(|e| io_err(&path, e))?;
                    read += 1;
                    let text = String::from_utf8_lossy(&line);
                    let mut parts = text.split('\t');
                    let (Some(key), Some(size), Some(mtime), None) =
                        (parts.next(), parts.next(), parts.next(), parts.next())
                    else {
                        continue;
                    };
                    let (Ok(size), Ok(mtime_ns)) = (size.parse(), mtime.parse()) else {
                        continue;
                    };
                    entries.insert(key.to_string(), FileState { size, mtime_ns });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path, e)),
        }
        entries.retain(|key, state| {
            fs::metadata(root.join(unescape_key(key))).is_ok_and(|m| FileState::of(&m) == *state)
        });
        tracing::info!(ledger = %path.display(), lines = read, kept = entries.len(), "watch: ledger loaded and compacted");
        let file = write_ledger(spool_dir, &path, &entries)?;
        Ok(Ledger {
            lines: entries.len(),
            path,
            dir: spool_dir.to_path_buf(),
            file,
            entries,
        })
    }

    fn taken(&self, key: &str, state: FileState) -> bool {
        self.entries.get(key) == Some(&state)
    }

    fn record(&mut self, key: String, state: FileState) -> Result<(), WatchError> {
        let line = format!("{key}\t{}\t{}\n", state.size, state.mtime_ns);
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.sync_data())
            .map_err(|e| io_err(&self.path, e))?;
        self.entries.insert(key, state);
        self.lines += 1;
        Ok(())
    }

    /// Forgets files no longer in the folder; rewrites the file once it is mostly stale.
    fn prune(&mut self, present: &HashSet<String>) -> Result<(), WatchError> {
        self.entries.retain(|k, _| present.contains(k));
        if self.lines > 2 * self.entries.len() + 1024 {
            self.file = write_ledger(&self.dir, &self.path, &self.entries)?;
            self.lines = self.entries.len();
        }
        Ok(())
    }
}

/// Writes `entries` as the whole ledger (temp file, fsync, rename, fsync folder) and returns it
/// opened for appending.
fn write_ledger(
    dir: &Path,
    path: &Path,
    entries: &HashMap<String, FileState>,
) -> Result<File, WatchError> {
    let tmp = dir.join(LEDGER_TMP);
    let mut text = String::new();
    for (k, s) in entries {
        text.push_str(&format!("{k}\t{}\t{}\n", s.size, s.mtime_ns));
    }
    let mut f = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| io_err(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io_err(path, e))?;
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, e))?;
    OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| io_err(path, e))
}

fn lock(l: &Mutex<Ledger>) -> std::sync::MutexGuard<'_, Ledger> {
    l.lock().unwrap_or_else(|e| e.into_inner())
}

/// A file seen with the same state since `since`.
struct Candidate {
    state: FileState,
    since: Instant,
}

fn make_watcher(
    dir: &Path,
    recursive: bool,
    wake: Arc<Notify>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut watcher =
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            // Our own reads of the folder (copying into the spool) must not cause rescans.
            Ok(ev) if matches!(ev.kind, notify::EventKind::Access(_)) => {}
            _ => wake.notify_one(),
        })?;
    let mode = if recursive {
        notify::RecursiveMode::Recursive
    } else {
        notify::RecursiveMode::NonRecursive
    };
    watcher.watch(dir, mode)?;
    Ok(watcher)
}

/// Watches `cfg.dir` and feeds complete new files into the spool and then `tx`. `spooled`: the
/// watched files the spool held at the daemon's start (from its `pending` list, before any was
/// released), which count as taken. Returns the number of files taken when `shutdown` is
/// cancelled. Fails only if the folder or the ledger cannot be set up, or if `tx` closes while
/// `shutdown` is not cancelled.
pub async fn run_watch(
    cfg: WatchConfig,
    spool: Arc<Spool>,
    quarantine: PathBuf,
    spooled: Vec<WatchedFile>,
    tx: async_channel::Sender<SpoolEntry>,
    shutdown: CancellationToken,
) -> Result<u64, WatchError> {
    let root = cfg.dir.clone();
    fs::create_dir_all(&root).map_err(|e| io_err(&root, e))?;
    let ledger = open_ledger(spool.clone(), root.clone(), spooled).await?;
    let wake = Arc::new(Notify::new());
    let watcher = match cfg.mode {
        WatchMode::Poll => None,
        WatchMode::Notify => match make_watcher(&root, cfg.recursive, wake.clone()) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(dir = %root.display(), error = %e, "watch: cannot watch the folder for events; polling instead");
                error_metric("watcher");
                None
            }
        },
    };
    let events = watcher.is_some();
    tracing::info!(dir = %root.display(), mode = ?cfg.mode, events, recursive = cfg.recursive, "watch: started");
    let mut watch = FolderWatch {
        settle: Duration::from_millis(cfg.settle_ms),
        bin_settle: Duration::from_millis(cfg.ifcb_settle_ms),
        incomplete_bins: HashSet::new(),
        quarantine,
        cfg,
        spool,
        ledger,
        tx,
        shutdown,
        candidates: HashMap::new(),
        failed: HashMap::new(),
        last_errors: HashSet::new(),
        skipped_links: HashSet::new(),
        last_spool_error: None,
        spool_errors: 0,
        taken: 0,
    };
    loop {
        let scan_started = Instant::now();
        let Some(found) = watch.scan().await else {
            break;
        };
        let complete = watch.note_problems(&found);
        let (ready, present) = watch.settled(found.files);
        if complete {
            watch.forget_missing(present).await;
        }
        watch.take_ready(ready).await?;
        if watch.shutdown.is_cancelled() || !watch.sleep(scan_started, &wake, events).await {
            break;
        }
    }
    drop(watcher);
    tracing::info!(taken = watch.taken, "watch: stopped");
    Ok(watch.taken)
}

/// Loads (and compacts) the ledger. A crash between a file's spool copy and its ledger line:
/// the spooled entry says which version it holds, so that version is not taken a second time.
async fn open_ledger(
    spool: Arc<Spool>,
    root: PathBuf,
    spooled: Vec<WatchedFile>,
) -> Result<Arc<Mutex<Ledger>>, WatchError> {
    let ledger = tokio::task::spawn_blocking(move || -> Result<Ledger, WatchError> {
        let mut ledger = Ledger::load_and_compact(spool.dir(), &root)?;
        for w in spooled {
            let state = FileState {
                size: w.size,
                mtime_ns: w.mtime_ns,
            };
            if !ledger.taken(&w.key, state) {
                ledger.record(w.key, state)?;
            }
        }
        Ok(ledger)
    })
    .await
    .expect("ledger load panicked")?;
    Ok(Arc::new(Mutex::new(ledger)))
}

/// The watcher's state between scans.
struct FolderWatch {
    cfg: WatchConfig,
    settle: Duration,
    /// How long the three files of an IFCB bin must be unchanged.
    bin_settle: Duration,
    /// Bins found incomplete or in conflict (each logged once).
    incomplete_bins: HashSet<PathBuf>,
    /// Where a refused bin's header goes, with its reason.
    quarantine: PathBuf,
    spool: Arc<Spool>,
    ledger: Arc<Mutex<Ledger>>,
    tx: async_channel::Sender<SpoolEntry>,
    shutdown: CancellationToken,
    /// Files not yet taken, with the version seen and since when.
    candidates: HashMap<String, Candidate>,
    /// Files that could not be read, by the version that failed (retried once they change).
    failed: HashMap<String, FileState>,
    /// Folders that could not be listed on the last scan (each is logged once while it stays).
    last_errors: HashSet<PathBuf>,
    /// Links skipped on the last scan (each is logged and counted once while it stays).
    skipped_links: HashSet<PathBuf>,
    last_spool_error: Option<Instant>,
    /// Spool failures since the last one logged.
    spool_errors: u64,
    taken: u64,
}

impl FolderWatch {
    /// Lists the folder off the runtime; `None` once shutdown is asked for.
    async fn scan(&self) -> Option<Scan> {
        let cfg = &self.cfg;
        let (root, ignore, recursive, symlinks) = (
            cfg.dir.clone(),
            cfg.ignore_suffixes.clone(),
            cfg.recursive,
            cfg.symlinks,
        );
        let job = tokio::task::spawn_blocking(move || scan(&root, recursive, &ignore, symlinks));
        tokio::select! {
            _ = self.shutdown.cancelled() => None,
            r = job => Some(r.expect("folder scan panicked")),
        }
    }

    /// Logs what the scan could not list or follow (once while it stays so). Returns whether
    /// the scan listed everything (only then is a missing file forgotten).
    fn note_problems(&mut self, found: &Scan) -> bool {
        let errors: HashSet<PathBuf> = found.errors.iter().map(|(p, _)| p.clone()).collect();
        for (path, message) in &found.errors {
            if !self.last_errors.contains(path) {
                tracing::warn!(path = %one_line(path.display()), error = %one_line(message), "watch: cannot list");
                error_metric("scan");
            }
        }
        let complete = errors.is_empty();
        self.last_errors = errors;
        let links: HashSet<PathBuf> = found.skipped_links.iter().map(|(p, _)| p.clone()).collect();
        for (path, why) in &found.skipped_links {
            if !self.skipped_links.contains(path) {
                tracing::warn!(path = %one_line(path.display()), reason = why, "watch: symbolic link skipped");
                metrics::counter!(STAGE_DROPPED, "stage" => "watch", "reason" => "symlink")
                    .increment(1);
            }
        }
        self.skipped_links = links;
        complete
    }

    /// The files whose version has not changed for `settle` and that are not taken yet (with
    /// their ledger keys), and the keys of every file present.
    fn settled(&mut self, files: Vec<SeenFile>) -> (Vec<(String, SeenFile)>, HashSet<String>) {
        let now = Instant::now();
        let mut ready = Vec::new();
        let mut present = HashSet::with_capacity(files.len());
        let ledger = lock(&self.ledger);
        for f in files {
            let key = ledger_key(&f.rel);
            present.insert(key.clone());
            // A bin's files stay candidates: whether the bin is taken is decided for the three
            // together (one that changes after the bin was refused half-written takes it again).
            let bin = bin_part(&f.rel).is_some();
            if !bin && ledger.taken(&key, f.state) {
                self.candidates.remove(&key);
                continue;
            }
            if !bin && self.failed.get(&key) == Some(&f.state) {
                continue;
            }
            self.failed.remove(&key);
            let seen = Candidate {
                state: f.state,
                since: now,
            };
            let settle = if bin_part(&f.rel).is_some() {
                self.bin_settle
            } else {
                self.settle
            };
            match self.candidates.get_mut(&key) {
                Some(c) if c.state == f.state => {
                    if now.duration_since(c.since) >= settle {
                        ready.push((key, f));
                    }
                }
                Some(c) => *c = seen,
                None => {
                    self.candidates.insert(key.clone(), seen);
                    if settle.is_zero() {
                        ready.push((key, f));
                    }
                }
            }
        }
        // Oldest first: the instrument's order.
        ready.sort_by(|a, b| (a.1.state.mtime_ns, &a.1.rel).cmp(&(b.1.state.mtime_ns, &b.1.rel)));
        (ready, present)
    }

    /// After a complete scan: forgets what is gone from the folder (and its ledger lines).
    async fn forget_missing(&mut self, present: HashSet<String>) {
        self.candidates.retain(|k, _| present.contains(k));
        self.failed.retain(|k, _| present.contains(k));
        let ledger = self.ledger.clone();
        let pruned = tokio::task::spawn_blocking(move || lock(&ledger).prune(&present))
            .await
            .expect("ledger prune panicked");
        if let Err(e) = pruned {
            tracing::warn!(error = %e, "watch: cannot compact the ledger");
            error_metric("ledger");
        }
    }

    /// Takes the settled files in order until shutdown (or, under `backpressure = "reject"`, a
    /// full queue: the rest stay settled candidates, taken on a later scan).
    async fn take_ready(&mut self, ready: Vec<(String, SeenFile)>) -> Result<(), WatchError> {
        let (bins, incomplete, ready) = whole_bins(ready);
        for stem in incomplete {
            let base = self.cfg.dir.join(&stem);
            // All three there, some still changing: an instrument writing, nothing to say.
            let writing = ["hdr", "adc", "roi"]
                .iter()
                .all(|e| base.with_extension(e).is_file());
            if !writing && self.incomplete_bins.insert(stem.clone()) {
                tracing::warn!(bin = %one_line(self.cfg.dir.join(&stem).display()), "watch: IFCB bin incomplete (its .hdr, .adc and .roi are not all regular files here): waiting for the rest");
                error_metric("incomplete_bin");
            }
        }
        for parts in bins {
            if self.shutdown.is_cancelled() {
                break;
            }
            let taken = {
                let ledger = lock(&self.ledger);
                parts.iter().all(|(k, f)| ledger.taken(k, f.state))
            };
            if !taken {
                self.take_bin(parts).await?;
            }
        }
        for (key, f) in ready {
            if self.shutdown.is_cancelled() {
                break;
            }
            if self.cfg.backpressure == Backpressure::Reject && self.tx.is_full() {
                break;
            }
            let id = id_for_path(&f.rel);
            if self.spool.contains(&id) {
                tracing::debug!(file = %one_line(f.abs.display()), id = %id, "watch: previous version still pending; taking it later");
                continue;
            }
            let entry = match self.spool_file(&id, &key, &f).await {
                Ok(entry) => entry,
                Err(e) => {
                    self.candidates.remove(&key);
                    self.not_taken(key, &f, &e);
                    continue;
                }
            };
            self.candidates.remove(&key);
            self.taken += 1;
            metrics::counter!(STAGE_RECEIVED, "stage" => "watch").increment(1);
            tracing::debug!(file = %one_line(f.abs.display()), id = %entry.id, seq = entry.seq, "watch: taken");
            if !self.send(entry).await? {
                break;
            }
        }
        Ok(())
    }

    /// Sends a spooled entry on the queue, waiting for room (the block policy); false once
    /// shutdown is asked for. A cancelled wait loses nothing: the entry is spooled.
    async fn send(&self, entry: SpoolEntry) -> Result<bool, WatchError> {
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => Ok(false),
            sent = self.tx.send(entry) => match sent {
                Ok(()) => Ok(true),
                Err(_) if self.shutdown.is_cancelled() => Ok(false),
                Err(_) => Err(WatchError::Closed),
            }
        }
    }

    /// Takes one IFCB bin whose three files are settled: its ROIs, or one quarantined entry.
    async fn take_bin(&mut self, parts: Vec<(String, SeenFile)>) -> Result<(), WatchError> {
        let hdr = parts
            .iter()
            .find(|(_, f)| f.abs.extension().is_some_and(|x| x == "hdr"))
            .map(|(_, f)| f.abs.clone())
            .expect("a whole bin has its header");
        // One ROI at a time, read, encoded and spooled: a bin of any size in little memory.
        let (spool, bin_hdr) = (self.spool.clone(), hdr.clone());
        let read = tokio::task::spawn_blocking(
            move || -> Result<Result<Vec<SpoolEntry>, SpoolError>, String> {
                let bin = crate::sources::ifcb::Bin::open(&bin_hdr).map_err(|e| e.to_string())?;
                let file = bin.open_roi_file().map_err(|e| e.to_string())?;
                let source = bin.roi.to_string_lossy().into_owned();
                let mut entries = Vec::with_capacity(bin.rois.len());
                for r in &bin.rois {
                    let img = bin.read_roi(&file, r).map_err(|e| e.to_string())?;
                    let id = bin.roi_id(r);
                    let mut png = Vec::new();
                    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                        .map_err(|e| format!("{id}: PNG: {e}"))?;
                    match spool.accept(&id, &source, &id, &png) {
                        Ok(e) => entries.push(e),
                        Err(e) => return Ok(Err(e)),
                    }
                }
                Ok(Ok(entries))
            },
        )
        .await
        .expect("bin read panicked");
        let entries: Vec<SpoolEntry> = match read {
            Ok(stored) => {
                match stored {
                    Ok(entries) => {
                        tracing::info!(bin = %one_line(hdr.display()), rois = entries.len(), "watch: IFCB bin taken");
                        entries
                    }
                    Err(SpoolError::Conflict { id, .. }) => {
                        // The pid is pending with other pixels: a second bin of that pid in another
                        // folder, or the bin rewritten before its rows were written. Taken once
                        // those rows are written (the spool frees the ids); logged once.
                        if self.incomplete_bins.insert(hdr.clone()) {
                            error_metric("bin_conflict");
                            tracing::warn!(bin = %one_line(hdr.display()), roi = %id, "watch: the bin's ROI ids are pending with other pixels (the same bin pid in two folders, or the bin rewritten): taken once those are written");
                        }
                        return Ok(());
                    }
                    Err(e) => {
                        // A full spool: the bin stays a candidate, retried at the next scan.
                        error_metric("spool");
                        tracing::error!(bin = %one_line(hdr.display()), error = %one_line(&e), "watch: cannot store the bin's ROIs in the spool; retrying");
                        return Ok(());
                    }
                }
            }
            Err(reason) => {
                error_metric("bad_bin");
                tracing::warn!(bin = %one_line(hdr.display()), reason = %one_line(&reason), "watch: IFCB bin refused whole (quarantined)");
                let (spool, q, hdr_file) =
                    (self.spool.clone(), self.quarantine.clone(), hdr.clone());
                let pid = hdr
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let refused = tokio::task::spawn_blocking(move || {
                    let entry = spool.accept_file(&pid, &hdr_file, &format!("{pid}.hdr"), None)?;
                    spool.quarantine(&entry, &format!("IFCB bin refused: {reason}"), &q)
                })
                .await
                .expect("spool quarantine panicked");
                match refused {
                    Ok(record) => vec![record],
                    Err(e) => {
                        error_metric("spool");
                        tracing::error!(bin = %one_line(hdr.display()), error = %one_line(&e), "watch: cannot quarantine the bin; retrying");
                        return Ok(());
                    }
                }
            }
        };
        // The bin is durable in the spool: only now is it marked taken.
        {
            let ledger = self.ledger.clone();
            let marks: Vec<(String, FileState)> =
                parts.iter().map(|(k, f)| (k.clone(), f.state)).collect();
            let recorded = tokio::task::spawn_blocking(move || {
                let mut l = lock(&ledger);
                marks.into_iter().try_for_each(|(k, s)| l.record(k, s))
            })
            .await
            .expect("ledger write panicked");
            if let Err(e) = recorded {
                tracing::error!(error = %e, "watch: cannot append to the ledger");
                error_metric("ledger");
            }
        }
        for entry in entries {
            self.taken += 1;
            metrics::counter!(STAGE_RECEIVED, "stage" => "watch").increment(1);
            if !self.send(entry).await? {
                break;
            }
        }
        Ok(())
    }

    /// Copies the file into the spool (durable), then appends its ledger line.
    async fn spool_file(
        &self,
        id: &str,
        key: &str,
        f: &SeenFile,
    ) -> Result<SpoolEntry, SpoolError> {
        let name = f
            .rel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (spool, ledger, abs) = (self.spool.clone(), self.ledger.clone(), f.abs.clone());
        let (id, key, state) = (id.to_string(), key.to_string(), f.state);
        tokio::task::spawn_blocking(move || -> Result<SpoolEntry, SpoolError> {
            let watched = WatchedFile {
                key: key.clone(),
                size: state.size,
                mtime_ns: state.mtime_ns,
            };
            let entry = spool.accept_file(&id, &abs, &name, Some(watched))?;
            if let Err(e) = lock(&ledger).record(key, state) {
                // Still sent: at worst the file is taken again after a restart.
                tracing::error!(error = %e, "watch: cannot append to the ledger");
                error_metric("ledger");
            }
            Ok(entry)
        })
        .await
        .expect("spool accept panicked")
    }

    /// Why a settled file was not taken: gone, unreadable (skipped until it changes), or a
    /// spool that cannot store it (a full disk: retried at every scan).
    fn not_taken(&mut self, key: String, f: &SeenFile, e: &SpoolError) {
        let source_problem = matches!(e, SpoolError::Io { path, .. } if *path == f.abs);
        if !f.abs.exists() {
            tracing::warn!(file = %one_line(f.abs.display()), "watch: file vanished before it could be taken");
            error_metric("vanished");
        } else if source_problem {
            tracing::warn!(file = %one_line(f.abs.display()), error = %one_line(e), "watch: cannot read file; skipped until it changes");
            error_metric("unreadable");
            self.failed.insert(key, f.state);
        } else {
            // Logged once per SPOOL_ERROR_LOG_EVERY, with how many failures it stands for.
            error_metric("spool");
            self.spool_errors += 1;
            if self
                .last_spool_error
                .is_none_or(|t: Instant| t.elapsed() >= SPOOL_ERROR_LOG_EVERY)
            {
                tracing::error!(file = %one_line(f.abs.display()), error = %one_line(e), failures = self.spool_errors, "watch: cannot store files in the spool; retrying at every scan");
                self.last_spool_error = Some(Instant::now());
                self.spool_errors = 0;
            }
        }
    }

    /// Sleeps until the next poll, the moment the next candidate settles, or an event (then a
    /// little more, so that a burst of writes is one rescan). False once shutdown is asked for.
    async fn sleep(&self, scan_started: Instant, wake: &Notify, events: bool) -> bool {
        let now = Instant::now();
        let mut deadline = now + Duration::from_millis(self.cfg.poll_interval_ms.max(1));
        for c in self.candidates.values() {
            let at = c.since + self.settle;
            if at > now && at < deadline {
                deadline = at;
            }
        }
        tokio::select! {
            _ = self.shutdown.cancelled() => false,
            _ = tokio::time::sleep_until(deadline) => true,
            _ = wake.notified(), if events => {
                tokio::select! {
                    _ = self.shutdown.cancelled() => false,
                    _ = tokio::time::sleep_until(scan_started + EVENT_GAP) => true,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::task::JoinHandle;

    const WAIT: Duration = Duration::from_secs(10);
    const QUIET: Duration = Duration::from_millis(400);

    fn config(dir: &Path, mode: WatchMode) -> WatchConfig {
        WatchConfig {
            enabled: true,
            dir: dir.to_path_buf(),
            recursive: true,
            mode,
            poll_interval_ms: 50,
            settle_ms: 50,
            ..WatchConfig::default()
        }
    }

    struct Running {
        task: JoinHandle<Result<u64, WatchError>>,
        rx: async_channel::Receiver<SpoolEntry>,
        shutdown: CancellationToken,
    }

    fn start(cfg: WatchConfig, spool: &Arc<Spool>, capacity: usize) -> Running {
        let (tx, rx) = async_channel::bounded(capacity);
        let shutdown = CancellationToken::new();
        // What the daemon passes: the watched files its spool holds at start.
        let spooled = spool
            .pending()
            .unwrap()
            .into_iter()
            .filter_map(|e| e.watched)
            .collect();
        let quarantine = spool.dir().join("quarantine");
        let task = tokio::spawn(run_watch(
            cfg,
            spool.clone(),
            quarantine,
            spooled,
            tx,
            shutdown.clone(),
        ));
        Running { task, rx, shutdown }
    }

    impl Running {
        async fn next(&self) -> SpoolEntry {
            tokio::time::timeout(WAIT, self.rx.recv())
                .await
                .expect("no entry in time")
                .unwrap()
        }

        async fn none_for(&self, d: Duration) {
            if let Ok(Ok(e)) = tokio::time::timeout(d, self.rx.recv()).await {
                panic!("unexpected entry {e:?}");
            }
        }

        async fn stop(self) -> u64 {
            self.shutdown.cancel();
            tokio::time::timeout(Duration::from_secs(5), self.task)
                .await
                .expect("watch did not stop")
                .unwrap()
                .unwrap()
        }
    }

    fn setup() -> (tempfile::TempDir, PathBuf, Arc<Spool>) {
        let tmp = tempfile::tempdir().unwrap();
        let watch = tmp.path().join("in");
        let spool = Arc::new(Spool::open(&tmp.path().join("spool")).unwrap());
        (tmp, watch, spool)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_file_is_taken_exactly_once() {
        for mode in [WatchMode::Notify, WatchMode::Poll] {
            let (_tmp, dir, spool) = setup();
            let w = start(config(&dir, mode), &spool, 16);
            tokio::time::sleep(Duration::from_millis(100)).await; // the missing folder is created
            assert!(dir.is_dir());
            fs::write(dir.join("a.jpg"), b"image-a").unwrap();
            let e = w.next().await;
            assert_eq!(e.original_name, "a.jpg");
            assert_eq!(e.id, id_for_path(Path::new("a.jpg")));
            assert_eq!(fs::read(&e.bytes_path).unwrap(), b"image-a");
            assert!(spool.contains(&e.id));
            assert_eq!(
                fs::read(dir.join("a.jpg")).unwrap(),
                b"image-a",
                "source untouched"
            );
            w.none_for(QUIET).await;
            let ledger = fs::read_to_string(spool.dir().join(LEDGER_FILE)).unwrap();
            assert_eq!(ledger.lines().count(), 1);
            assert!(ledger.starts_with("a.jpg\t7\t"), "{ledger}");
            assert_eq!(w.stop().await, 1, "{mode:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_growing_file_waits_until_it_settles() {
        let (_tmp, dir, spool) = setup();
        fs::create_dir_all(&dir).unwrap();
        let mut cfg = config(&dir, WatchMode::Notify);
        cfg.settle_ms = 600;
        let w = start(cfg, &spool, 16);
        let path = dir.join("big.png");
        let mut f = File::create(&path).unwrap();
        let mut want = Vec::new();
        for i in 0..10u8 {
            let chunk = vec![i; 1000];
            f.write_all(&chunk).unwrap();
            f.flush().unwrap();
            want.extend_from_slice(&chunk);
            tokio::time::sleep(Duration::from_millis(60)).await;
            assert!(
                w.rx.is_empty(),
                "taken while still growing (after chunk {i})"
            );
        }
        drop(f);
        let e = w.next().await;
        assert_eq!(fs::read(&e.bytes_path).unwrap(), want);
        w.none_for(QUIET).await;
        assert_eq!(w.stop().await, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn temp_suffix_and_hidden_files_are_ignored() {
        let (_tmp, dir, spool) = setup();
        fs::create_dir_all(dir.join(".hidden-dir")).unwrap();
        let w = start(config(&dir, WatchMode::Notify), &spool, 16);
        fs::write(dir.join("x.jpg.tmp"), b"partial").unwrap();
        fs::write(dir.join("y.part"), b"partial").unwrap();
        fs::write(dir.join(".hidden.jpg"), b"h").unwrap();
        fs::write(dir.join(".hidden-dir").join("inner.jpg"), b"h").unwrap();
        w.none_for(QUIET).await;
        fs::rename(dir.join("x.jpg.tmp"), dir.join("x.jpg")).unwrap();
        let e = w.next().await;
        assert_eq!(e.original_name, "x.jpg");
        assert_eq!(fs::read(&e.bytes_path).unwrap(), b"partial");
        w.none_for(QUIET).await;
        assert_eq!(w.stop().await, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nested_folders_only_when_recursive() {
        let (_tmp, dir, spool) = setup();
        fs::create_dir_all(dir.join("a/b")).unwrap();
        fs::write(dir.join("a/b/c.jpg"), b"nested").unwrap();
        let mut flat = config(&dir, WatchMode::Poll);
        flat.recursive = false;
        let w = start(flat, &spool, 16);
        w.none_for(QUIET).await;
        assert_eq!(w.stop().await, 0);

        let w = start(config(&dir, WatchMode::Notify), &spool, 16);
        let e = w.next().await;
        assert_eq!(e.id, id_for_path(Path::new("a/b/c.jpg")));
        assert_eq!(e.original_name, "c.jpg");
        // New subfolders made while running are seen too.
        fs::create_dir_all(dir.join("d/e")).unwrap();
        fs::write(dir.join("d/e/f.jpg"), b"later").unwrap();
        assert_eq!(w.next().await.id, id_for_path(Path::new("d/e/f.jpg")));
        assert_eq!(w.stop().await, 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn restart_does_not_take_a_file_again() {
        let (tmp, dir, spool) = setup();
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("keep.jpg"), b"k").unwrap();
        fs::write(dir.join("gone.jpg"), b"g").unwrap();
        let w = start(config(&dir, WatchMode::Notify), &spool, 16);
        let a = w.next().await;
        let b = w.next().await;
        assert_eq!(w.stop().await, 2);
        spool.complete(&[a.key(), b.key()]).unwrap();
        fs::remove_file(dir.join("gone.jpg")).unwrap();
        drop(spool);

        let spool = Arc::new(Spool::open(&tmp.path().join("spool")).unwrap());
        let w = start(config(&dir, WatchMode::Notify), &spool, 16);
        w.none_for(QUIET).await;
        // Compacted: only the file that still exists.
        let ledger = fs::read_to_string(spool.dir().join(LEDGER_FILE)).unwrap();
        assert_eq!(ledger.lines().count(), 1, "{ledger}");
        assert!(ledger.starts_with("keep.jpg\t"));
        // A new version of the file (rewritten by the instrument) is taken again.
        fs::write(dir.join("keep.jpg"), b"k2-longer").unwrap();
        let e = w.next().await;
        assert_eq!(fs::read(&e.bytes_path).unwrap(), b"k2-longer");
        assert_eq!(w.stop().await, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_ends_the_task_even_when_the_queue_is_full() {
        let (_tmp, dir, spool) = setup();
        let w = start(config(&dir, WatchMode::Notify), &spool, 16);
        assert_eq!(w.stop().await, 0);

        fs::create_dir_all(&dir).unwrap();
        for i in 0..3 {
            fs::write(dir.join(format!("{i}.jpg")), b"x").unwrap();
        }
        let w = start(config(&dir, WatchMode::Poll), &spool, 1);
        // One fits in the queue; the second is spooled and waiting for room.
        let deadline = Instant::now() + WAIT;
        while spool.len() < 2 {
            assert!(Instant::now() < deadline, "nothing taken");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(spool.len(), 2, "blocked on the full queue");
        assert_eq!(w.stop().await, 2);
        // Nothing taken is lost: both are in the spool for the restart.
        assert_eq!(spool.pending().unwrap().len(), 2);
    }

    #[cfg(unix)]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn symlinks_are_not_followed_out_of_the_folder() {
        use std::os::unix::fs::symlink;
        for policy in [SymlinkPolicy::Skip, SymlinkPolicy::Inside] {
            let (tmp, dir, spool) = setup();
            fs::create_dir_all(dir.join("sub")).unwrap();
            let outside = tmp.path().join("secret.jpg");
            fs::write(&outside, b"outside").unwrap();
            fs::write(dir.join("sub/real.jpg"), b"inside").unwrap();
            symlink(&outside, dir.join("out.jpg")).unwrap();
            symlink(dir.join("sub/real.jpg"), dir.join("in.jpg")).unwrap();
            symlink(tmp.path().join("nowhere"), dir.join("dangling.jpg")).unwrap();
            symlink(tmp.path(), dir.join("loop")).unwrap();
            let mut cfg = config(&dir, WatchMode::Poll);
            cfg.symlinks = policy;
            let w = start(cfg, &spool, 16);
            let mut got = vec![w.next().await];
            if policy == SymlinkPolicy::Inside {
                got.push(w.next().await);
            }
            w.none_for(QUIET).await;
            let mut names: Vec<String> = got.iter().map(|e| e.original_name.clone()).collect();
            names.sort();
            let want: &[&str] = match policy {
                SymlinkPolicy::Skip => &["real.jpg"],
                SymlinkPolicy::Inside => &["in.jpg", "real.jpg"],
            };
            assert_eq!(names, want, "{policy:?}");
            for e in &got {
                assert_eq!(fs::read(&e.bytes_path).unwrap(), b"inside", "{policy:?}");
            }
            w.stop().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_spooled_before_its_ledger_line_is_not_taken_again() {
        let (tmp, dir, spool) = setup();
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("a.jpg"), b"image-a").unwrap();
        let w = start(config(&dir, WatchMode::Poll), &spool, 16);
        let e = w.next().await;
        assert!(
            e.watched
                .as_ref()
                .is_some_and(|f| f.key == "a.jpg" && f.size == 7),
            "{e:?}"
        );
        w.stop().await;
        // The crash came before the ledger line: the entry is spooled, the ledger knows nothing.
        fs::remove_file(spool.dir().join(LEDGER_FILE)).unwrap();
        drop(spool);
        let spool = Arc::new(Spool::open(&tmp.path().join("spool")).unwrap());
        let w = start(config(&dir, WatchMode::Poll), &spool, 16);
        // The watcher's start restores the ledger line from the spooled entry...
        let deadline = Instant::now() + WAIT;
        while !fs::read_to_string(spool.dir().join(LEDGER_FILE))
            .is_ok_and(|l| l.starts_with("a.jpg\t"))
        {
            assert!(Instant::now() < deadline, "ledger line not restored");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // ...the engine replays the spooled entry and finishes it...
        spool.complete(&[e.key()]).unwrap();
        // ...and the file itself is not taken a second time.
        w.none_for(QUIET).await;
        assert_eq!(w.stop().await, 0);
        let ledger = fs::read_to_string(spool.dir().join(LEDGER_FILE)).unwrap();
        assert!(ledger.starts_with("a.jpg\t7\t"), "{ledger}");
    }

    #[test]
    fn ledger_keys_round_trip() {
        for p in [
            "a/b.jpg",
            "tab\there",
            "new\nline",
            "back\\slash",
            "ü.png",
            "lit\\x41eral",
        ] {
            let key = ledger_key(Path::new(p));
            assert!(!key.contains('\t') && !key.contains('\n'));
            assert_eq!(unescape_key(&key), PathBuf::from(p));
        }
        #[cfg(unix)]
        {
            // Not UTF-8 (Latin-1 "é", a lone continuation byte): exact round trip, distinct keys.
            let latin1 = path_from_bytes(b"caf\xe9/\x80x.jpg".to_vec());
            let key = ledger_key(&latin1);
            assert_eq!(key, "caf\\xe9/\\x80x.jpg");
            assert_eq!(unescape_key(&key), latin1);
            assert_ne!(
                ledger_key(&path_from_bytes(b"caf\xe8".to_vec())),
                ledger_key(&path_from_bytes(b"caf\xe9".to_vec()))
            );
        }
        assert!(
            ignored(".x", &[])
                && ignored("a.tmp", &[".tmp".into()])
                && !ignored("a.jpg", &[".tmp".into(), String::new()])
        );
    }

    /// A bin is taken once its three files are all there and settled: its ROIs under their
    /// pids, pixel for pixel; a bin cut short is one quarantined entry with the reason; a
    /// restart takes neither again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ifcb_bins_are_taken_whole_or_quarantined_whole() {
        let (tmp, dir, spool) = setup();
        let day = dir.join("D2024/D20240611");
        fs::create_dir_all(&day).unwrap();
        let staging = tmp.path().join("staging");
        fs::create_dir_all(&staging).unwrap();
        let images: Vec<image::GrayImage> = (0..6u32)
            .map(|i| {
                image::GrayImage::from_fn(10 + i, 8, |x, y| {
                    image::Luma([(x * 13 + y * 3 + i) as u8])
                })
            })
            .collect();
        let pid = "D20240611T010000_IFCB104";
        crate::sources::ifcb::write_bin(&staging, pid, &images).unwrap();
        let mut cfg = config(&dir, WatchMode::Poll);
        cfg.ifcb_settle_ms = 300;
        let w = start(cfg.clone(), &spool, 64);
        // The header and the ADC file alone: not a bin yet.
        for e in ["hdr", "adc"] {
            fs::copy(
                staging.join(format!("{pid}.{e}")),
                day.join(format!("{pid}.{e}")),
            )
            .unwrap();
        }
        w.none_for(Duration::from_millis(800)).await;
        fs::copy(
            staging.join(format!("{pid}.roi")),
            day.join(format!("{pid}.roi")),
        )
        .unwrap();
        for (i, want) in images.iter().enumerate() {
            let e = w.next().await;
            assert_eq!(e.id, format!("{pid}_{:05}", i + 1));
            let img = image::load_from_memory(&fs::read(&e.bytes_path).unwrap())
                .unwrap()
                .to_luma8();
            assert_eq!(&img, want, "{}", e.id);
        }
        // A second bin whose .roi is cut short: refused whole.
        let cut = "D20240611T020000_IFCB104";
        crate::sources::ifcb::write_bin(&staging, cut, &images).unwrap();
        for e in ["hdr", "adc", "roi"] {
            fs::copy(
                staging.join(format!("{cut}.{e}")),
                day.join(format!("{cut}.{e}")),
            )
            .unwrap();
        }
        let roi = day.join(format!("{cut}.roi"));
        let len = fs::metadata(&roi).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&roi)
            .unwrap()
            .set_len(len - 50)
            .unwrap();
        let e = w.next().await;
        assert_eq!(e.id, cut);
        let q = e.quarantined.as_ref().expect("quarantined at once");
        assert!(
            q.reason.contains("IFCB bin refused") && q.reason.contains("past the end"),
            "{}",
            q.reason
        );
        assert!(PathBuf::from(format!("{}.reason", q.path.display())).is_file());
        w.none_for(QUIET).await;
        // The instrument finishes writing it: the whole bin is taken after all.
        fs::copy(staging.join(format!("{cut}.roi")), &roi).unwrap();
        for i in 0..images.len() {
            assert_eq!(w.next().await.id, format!("{cut}_{:05}", i + 1));
        }
        w.none_for(QUIET).await;
        assert_eq!(w.stop().await, 13);
        // Restarted with the entries finished: nothing is taken again.
        let keys: Vec<_> = spool.pending().unwrap().iter().map(|e| e.key()).collect();
        spool.complete(&keys).unwrap();
        let w = start(cfg, &spool, 64);
        w.none_for(Duration::from_millis(800)).await;
        assert_eq!(w.stop().await, 0);
    }
}
