//! The durable spool: "nothing accepted is lost".
//!
//! Every accepted image is written here before it is acknowledged, and removed only once its
//! prediction row is in a finished Parquet file. On restart, [`Spool::pending`] lists what must
//! be processed again (at-least-once; results are idempotent by image id).
//!
//! ```text
//!  <dir>/seq                    high-water mark of the acceptance counter (reserved in blocks)
//!  <dir>/pending/<id>.bytes     the image bytes, exactly as received
//!  <dir>/pending/<id>.json      the sidecar (SpoolEntry); its presence marks a complete entry
//!  <dir>/quarantined/<id>.<seq>.json  a quarantined entry whose error row is not yet in a
//!                               finished file (its bytes are in the quarantine folder)
//!  <dir>/daemon.lock            held (flock) by the one daemon using this spool
//!  <dir>/spool-id               this spool's identity (random, made once): the daemon's output
//!                               files name it, so a restart can tell its own rows from others
//!  <dir>/.tmp-* , pending/.tmp-*  files being written (deleted at open: never acknowledged)
//! ```
//!
//! An entry is one acceptance: (id, seq). The same id can be accepted again once its earlier
//! entry has left `pending/` (completed or quarantined), and [`Spool::complete`] removes only
//! the entry whose row was written, never a newer one with the same id.
//!
//! Quarantine keeps the promise that every acknowledged image ends as a row: the record in
//! `quarantined/` is written first (fsynced), then the `.reason` file and the bytes go to the
//! quarantine folder, then the pending sidecar goes. A crash anywhere in between is finished at
//! the next open, and the record stays (listed by [`Spool::pending`] with `quarantined` set, so
//! the engine writes its error row again) until the row is in a finished file.
//!
//! Accept: bytes and sidecar are written to temp names and fsynced, renamed into place (bytes
//! first, sidecar last), then the directory is fsynced; only then does `accept` return. A crash
//! at any point before that leaves temp files or bytes without a sidecar, both cleaned at the
//! next open, and the client (never acknowledged) sends again. Remove: sidecar first, then
//! bytes, so a crash in between leaves orphan bytes (cleaned at open), never a sidecar without
//! bytes. Ids are valid file names by construction ([`sanitize_id`]), and temp names start with
//! '.', which no id can, so the two never meet.
//!
//! All methods block (file I/O and fsync): call them from `spawn_blocking` or a worker thread.
//! Operations on the same id are serialised (accept / complete / quarantine of one id never
//! interleave); different ids proceed in parallel.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    /// The spool's disk is full (or over quota): the daemon answers 507 and the client retries.
    #[error("{path}: {message} (the spool's disk is full)")]
    DiskFull { path: PathBuf, message: String },
    #[error("bad image id `{id}`: {reason}")]
    BadId { id: String, reason: String },
    #[error("image id `{id}` is already spooled with other bytes (accepted as seq {seq}, not yet in a finished file): send it again once its row is written, or use another id")]
    Conflict { id: String, seq: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpoolEntry {
    /// Safe: [A-Za-z0-9._-], no leading '.', at most 200 characters.
    pub id: String,
    /// "http" or the watched file's path as text.
    pub source: String,
    /// Client/file name, for the record only (never used as a path).
    pub original_name: String,
    pub received_unix_ms: u64,
    /// Acceptance order, continues across restarts.
    pub seq: u64,
    /// Where the image bytes are in the spool.
    pub bytes_path: PathBuf,
    /// Set once the image was refused (bad input): its bytes are in the quarantine folder and
    /// only its error row is still owed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantined: Option<Quarantined>,
    /// For a file taken from the watched folder: which version of which file (the folder
    /// source's ledger key and state), so a restart knows it was taken even when a crash came
    /// before the ledger line was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watched: Option<WatchedFile>,
    /// For an image that came as a JetStream message: which delivery, to be acked once its row
    /// is in a finished file (see `serve::nats`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<Delivery>,
}

/// The JetStream message an entry came in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub stream_seq: u64,
    /// The message's `$JS.ACK.…` reply subject: an ack published to it from any connection
    /// settles the message, so one kept here is acked after a restart too.
    pub reply: String,
    /// When the instrument captured the image (the `Plankton-Captured` header), if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub captured_unix_ms: Option<u64>,
}

/// The version of a watched file an entry holds (see `serve::watch`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchedFile {
    /// The watch ledger's key of its path relative to the watched folder.
    pub key: String,
    pub size: u64,
    pub mtime_ns: u64,
}

/// Where a refused image went and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantined {
    pub reason: String,
    /// The image's bytes in the quarantine folder (`<that>.reason` beside it).
    pub path: PathBuf,
}

/// One acceptance of an image: the id and the acceptance's seq.
pub type EntryKey = (String, u64);

impl SpoolEntry {
    pub fn key(&self) -> EntryKey {
        (self.id.clone(), self.seq)
    }
}

pub const MAX_ID_LEN: usize = 200;
const PENDING: &str = "pending";
const QUARANTINED: &str = "quarantined";
const SEQ_FILE: &str = "seq";
const ID_FILE: &str = "spool-id";
const TMP_PREFIX: &str = ".tmp-";
const BYTES_SUFFIX: &str = ".bytes";
const SIDECAR_SUFFIX: &str = ".json";
/// Sequence numbers are reserved durably this many at a time (one small fsynced write per
/// block, not per image); a restart skips the unused rest of a block, which keeps seq monotone.
const SEQ_BLOCK: u64 = 4096;

pub struct Spool {
    dir: PathBuf,
    /// See [`Spool::id`].
    spool_id: String,
    pending_dir: PathBuf,
    quarantined_dir: PathBuf,
    /// Next seq to hand out; `seq_reserved` is the durable bound it may not pass without
    /// reserving the next block.
    next_seq: AtomicU64,
    seq_reserved: Mutex<u64>,
    count: AtomicUsize,
    /// Ids with an accept / complete / quarantine in progress.
    busy: Mutex<HashSet<String>>,
    busy_cv: Condvar,
    tmp_counter: AtomicU64,
}

fn io_err(path: &Path, e: impl Cause) -> SpoolError {
    if e.disk_full() {
        SpoolError::DiskFull {
            path: path.to_path_buf(),
            message: e.text(),
        }
    } else {
        SpoolError::Io {
            path: path.to_path_buf(),
            message: e.text(),
        }
    }
}

/// What went wrong with a spool file: an I/O error (which may be a full disk) or a reason.
trait Cause {
    fn text(&self) -> String;
    fn disk_full(&self) -> bool {
        false
    }
}

impl Cause for std::io::Error {
    fn text(&self) -> String {
        self.to_string()
    }
    fn disk_full(&self) -> bool {
        crate::fsx::is_disk_full(self)
    }
}

impl Cause for String {
    fn text(&self) -> String {
        self.clone()
    }
}

impl Cause for &str {
    fn text(&self) -> String {
        (*self).to_string()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// fsync a directory so that renames and removals in it are durable.
fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(|e| io_err(dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn remove_if_present(path: &Path) -> Result<bool, SpoolError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(path, e)),
    }
}

/// Writes `bytes` to `path` and fsyncs it (the caller renames it into place).
fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), SpoolError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| io_err(path, e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| io_err(path, e))
}

/// Releases a claimed id when dropped.
struct Claim<'a> {
    spool: &'a Spool,
    id: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        lock(&self.spool.busy).remove(&self.id);
        self.spool.busy_cv.notify_all();
    }
}

/// Where the bytes of a new entry come from.
enum Payload<'a> {
    Bytes(&'a [u8]),
    File(&'a Path),
}

impl Spool {
    /// Creates `dir` (and `dir/pending`, `dir/quarantined`), deletes leftover temp files and
    /// orphan bytes (never acknowledged), finishes quarantines a crash interrupted, and continues
    /// seq after the highest one ever reserved.
    pub fn open(dir: &Path) -> Result<Spool, SpoolError> {
        let pending_dir = dir.join(PENDING);
        let quarantined_dir = dir.join(QUARANTINED);
        for d in [&pending_dir, &quarantined_dir] {
            fs::create_dir_all(d).map_err(|e| io_err(d, e))?;
        }
        for d in [dir, pending_dir.as_path(), quarantined_dir.as_path()] {
            for name in list_names(d)? {
                if name.starts_with(TMP_PREFIX) {
                    let p = d.join(&name);
                    tracing::info!(path = %p.display(), "spool: removing a temp file left by an interrupted write");
                    remove_if_present(&p)?;
                }
            }
        }
        let mut records = Vec::new();
        for name in list_names(&quarantined_dir)? {
            if !name.ends_with(SIDECAR_SUFFIX) {
                continue;
            }
            let p = quarantined_dir.join(&name);
            match fs::read(&p)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<SpoolEntry>(&b).map_err(|e| e.to_string()))
            {
                Ok(e) if e.quarantined.is_some() && sanitize_id(&e.id).is_ok() => records.push(e),
                Ok(_) => {
                    tracing::error!(path = %p.display(), "spool: ignoring a quarantine record without a quarantine")
                }
                Err(e) => {
                    tracing::error!(path = %p.display(), error = %e, "spool: unreadable quarantine record ignored")
                }
            }
        }
        let names = list_names(&pending_dir)?;
        let sidecars: HashSet<&str> = names
            .iter()
            .filter_map(|n| n.strip_suffix(SIDECAR_SUFFIX))
            .filter(|id| sanitize_id(id).is_ok())
            .collect();
        for n in &names {
            if let Some(id) = n.strip_suffix(BYTES_SUFFIX) {
                if !sidecars.contains(id) {
                    let p = pending_dir.join(n);
                    tracing::info!(path = %p.display(), "spool: removing image bytes without a sidecar (an accept interrupted before it was acknowledged)");
                    remove_if_present(&p)?;
                }
            }
        }
        sync_dir(&pending_dir)?;
        sync_dir(dir)?;

        let seq_path = dir.join(SEQ_FILE);
        let stored = match fs::read_to_string(&seq_path) {
            Ok(t) => t
                .trim()
                .parse::<u64>()
                .map_err(|e| io_err(&seq_path, format!("bad seq file: {e}")))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io_err(&seq_path, e)),
        };
        let mut max_seen = records.iter().map(|r| r.seq).max();
        for id in &sidecars {
            let p = pending_dir.join(format!("{id}{SIDECAR_SUFFIX}"));
            if let Some(e) = fs::read(&p)
                .ok()
                .and_then(|b| serde_json::from_slice::<SpoolEntry>(&b).ok())
            {
                max_seen = Some(max_seen.map_or(e.seq, |m| m.max(e.seq)));
            }
        }
        let next = stored.max(max_seen.map_or(0, |m| m + 1));
        let spool_id = spool_identity(dir)?;
        let spool = Spool {
            dir: dir.to_path_buf(),
            spool_id,
            pending_dir,
            quarantined_dir,
            next_seq: AtomicU64::new(next),
            seq_reserved: Mutex::new(next),
            count: AtomicUsize::new(0),
            busy: Mutex::new(HashSet::new()),
            busy_cv: Condvar::new(),
            tmp_counter: AtomicU64::new(0),
        };
        let mut finished_sidecars = 0;
        for r in &records {
            if spool.finish_quarantine(r)? {
                tracing::info!(id = %r.id, seq = r.seq, "spool: finished a quarantine a crash interrupted");
                finished_sidecars += 1;
            }
        }
        let count = sidecars.len() - finished_sidecars + records.len();
        spool.count.store(count, Ordering::SeqCst);
        tracing::info!(dir = %dir.display(), pending = count, quarantined = records.len(), next_seq = next, "spool opened");
        Ok(spool)
    }

    /// Completes the steps of a quarantine after its record was written (idempotent): the
    /// `.reason` file, the bytes moved out of `pending/`, the pending sidecar removed. Returns
    /// whether a pending sidecar of this entry was still there (and is now removed).
    fn finish_quarantine(&self, record: &SpoolEntry) -> Result<bool, SpoolError> {
        let q = record.quarantined.as_ref().expect("a quarantine record");
        let sidecar = self.sidecar_path(&record.id);
        // A pending sidecar with another seq is a later acceptance of the same id: it is not
        // ours, so this quarantine had already finished.
        let ours = match fs::read(&sidecar) {
            Ok(b) => serde_json::from_slice::<SpoolEntry>(&b).is_ok_and(|e| e.seq == record.seq),
            Err(_) => false,
        };
        if !ours {
            return Ok(false);
        }
        let reason_path = reason_path_of(&q.path);
        if !reason_path.exists() {
            if let Some(dir) = reason_path.parent() {
                fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
            }
            let tmp = self.tmp_path(reason_path.parent().unwrap_or(Path::new(".")), "reason");
            write_synced(&tmp, reason_text(record, &q.reason).as_bytes())?;
            fs::rename(&tmp, &reason_path).map_err(|e| io_err(&reason_path, e))?;
        }
        let src = self.bytes_path(&record.id);
        if src.exists() {
            move_file(&src, &q.path, |dir, what| self.tmp_path(dir, what))?;
        }
        if let Some(dir) = q.path.parent() {
            sync_dir(dir)?;
        }
        remove_if_present(&sidecar)?;
        remove_if_present(&src)?;
        sync_dir(&self.pending_dir)?;
        Ok(true)
    }

    /// This spool's identity: made once (random), kept in `<dir>/spool-id`. Together with an
    /// entry's seq it names one acceptance for good: seqs restart if a spool is deleted, ids do not.
    pub fn id(&self) -> &str {
        &self.spool_id
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn bytes_path(&self, id: &str) -> PathBuf {
        self.pending_dir.join(format!("{id}{BYTES_SUFFIX}"))
    }

    fn sidecar_path(&self, id: &str) -> PathBuf {
        self.pending_dir.join(format!("{id}{SIDECAR_SUFFIX}"))
    }

    fn record_path(&self, id: &str, seq: u64) -> PathBuf {
        self.quarantined_dir
            .join(format!("{id}.{seq}{SIDECAR_SUFFIX}"))
    }

    fn tmp_path(&self, dir: &Path, what: &str) -> PathBuf {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        dir.join(format!("{TMP_PREFIX}{}-{n}-{what}", std::process::id()))
    }

    /// Waits until no other operation holds `id`, then holds it.
    fn claim(&self, id: &str) -> Claim<'_> {
        let mut busy = lock(&self.busy);
        while busy.contains(id) {
            busy = self.busy_cv.wait(busy).unwrap_or_else(|e| e.into_inner());
        }
        busy.insert(id.to_string());
        Claim {
            spool: self,
            id: id.to_string(),
        }
    }

    fn alloc_seq(&self) -> Result<u64, SpoolError> {
        let mut reserved = lock(&self.seq_reserved);
        let seq = self.next_seq.fetch_add(1, Ordering::SeqCst);
        if seq >= *reserved {
            let bound = seq + SEQ_BLOCK;
            let tmp = self.tmp_path(&self.dir, SEQ_FILE);
            let dest = self.dir.join(SEQ_FILE);
            write_synced(&tmp, bound.to_string().as_bytes())?;
            fs::rename(&tmp, &dest).map_err(|e| io_err(&dest, e))?;
            sync_dir(&self.dir)?;
            *reserved = bound;
        }
        Ok(seq)
    }

    fn read_sidecar(&self, id: &str) -> Result<Option<SpoolEntry>, SpoolError> {
        let p = self.sidecar_path(id);
        match fs::read(&p) {
            Ok(b) => {
                let mut e: SpoolEntry = serde_json::from_slice(&b)
                    .map_err(|e| io_err(&p, format!("corrupt sidecar: {e}")))?;
                e.id = id.to_string();
                e.bytes_path = self.bytes_path(id);
                e.quarantined = None;
                Ok(Some(e))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&p, e)),
        }
    }

    /// Stores `bytes` durably under `id` and returns once it would survive a crash. If `id` is
    /// already pending with the same bytes (a retry), returns the existing entry unchanged; with
    /// other bytes, [`SpoolError::Conflict`] (one id names one image until its row is written:
    /// silently keeping either would break the promise made to the other upload).
    pub fn accept(
        &self,
        id: &str,
        source: &str,
        original_name: &str,
        bytes: &[u8],
    ) -> Result<SpoolEntry, SpoolError> {
        self.accept_payload(id, source, original_name, Payload::Bytes(bytes), None, None)
    }

    /// As [`Spool::accept`], for an image that came as a JetStream message (`delivery` is kept
    /// in its sidecar). A redelivery of a message still pending returns the existing entry,
    /// whose delivery is the first one's.
    pub fn accept_delivery(
        &self,
        id: &str,
        source: &str,
        original_name: &str,
        bytes: &[u8],
        delivery: Delivery,
    ) -> Result<SpoolEntry, SpoolError> {
        self.accept_payload(
            id,
            source,
            original_name,
            Payload::Bytes(bytes),
            None,
            Some(delivery),
        )
    }

    /// As [`Spool::accept`], copying `source_file` (which is neither modified nor removed);
    /// `watched` says which version of a watched file it is.
    pub fn accept_file(
        &self,
        id: &str,
        source_file: &Path,
        original_name: &str,
        watched: Option<WatchedFile>,
    ) -> Result<SpoolEntry, SpoolError> {
        let source = source_file.to_string_lossy();
        self.accept_payload(
            id,
            &source,
            original_name,
            Payload::File(source_file),
            watched,
            None,
        )
    }

    fn accept_payload(
        &self,
        id: &str,
        source: &str,
        original_name: &str,
        payload: Payload<'_>,
        watched: Option<WatchedFile>,
        delivery: Option<Delivery>,
    ) -> Result<SpoolEntry, SpoolError> {
        let _busy = crate::telemetry::Busy::start("spool");
        let id = sanitize_id(id)?;
        let _claim = self.claim(&id);
        match self.read_sidecar(&id) {
            Ok(Some(existing)) => {
                let same = match payload {
                    Payload::Bytes(b) => fs::read(&existing.bytes_path).is_ok_and(|old| old == b),
                    Payload::File(src) => match (fs::read(&existing.bytes_path), fs::read(src)) {
                        (Ok(old), Ok(new)) => old == new,
                        _ => false,
                    },
                };
                if same {
                    return Ok(existing);
                }
                return Err(SpoolError::Conflict {
                    id,
                    seq: existing.seq,
                });
            }
            Ok(None) => {}
            // A sidecar we cannot read is replaced by the new entry (it may be corrupt).
            Err(e) => {
                tracing::warn!(id = %id, error = %e, "spool: unreadable sidecar is replaced by a new accept")
            }
        }
        let tmp_bytes = self.tmp_path(&self.pending_dir, "bytes");
        let written = match payload {
            Payload::Bytes(b) => write_synced(&tmp_bytes, b),
            Payload::File(src) => copy_synced(src, &tmp_bytes),
        };
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp_bytes);
            return Err(e);
        }
        let entry = match self.alloc_seq() {
            Ok(seq) => SpoolEntry {
                id: id.clone(),
                source: source.to_string(),
                original_name: original_name.to_string(),
                received_unix_ms: now_ms(),
                seq,
                bytes_path: self.bytes_path(&id),
                quarantined: None,
                watched,
                delivery,
            },
            Err(e) => {
                let _ = fs::remove_file(&tmp_bytes);
                return Err(e);
            }
        };
        let tmp_json = self.tmp_path(&self.pending_dir, "json");
        let json = serde_json::to_vec(&entry).expect("SpoolEntry serialises");
        let sidecar = self.sidecar_path(&id);
        let placed = write_synced(&tmp_json, &json)
            .and_then(|_| {
                fs::rename(&tmp_bytes, &entry.bytes_path).map_err(|e| io_err(&entry.bytes_path, e))
            })
            .and_then(|_| fs::rename(&tmp_json, &sidecar).map_err(|e| io_err(&sidecar, e)));
        if let Err(e) = placed {
            // No sidecar: the entry does not exist, and its bytes must not linger.
            let _ = fs::remove_file(&tmp_bytes);
            let _ = fs::remove_file(&tmp_json);
            let _ = fs::remove_file(&entry.bytes_path);
            return Err(e);
        }
        // The entry is in place (listed by `pending`, found by a retried accept); only its
        // durability is in doubt if this fails, so the caller must not acknowledge.
        self.count.fetch_add(1, Ordering::SeqCst);
        sync_dir(&self.pending_dir)?;
        Ok(entry)
    }

    /// Complete entries, sorted by seq: the images to process and the quarantined ones whose
    /// error row is still owed (`quarantined` set). An entry whose bytes are missing is logged
    /// and removed; one whose sidecar is corrupt but whose bytes exist is kept with a rebuilt
    /// sidecar.
    pub fn pending(&self) -> Result<Vec<SpoolEntry>, SpoolError> {
        let mut out = Vec::new();
        let mut dropped = false;
        for name in list_names(&self.quarantined_dir)? {
            if !name.ends_with(SIDECAR_SUFFIX) {
                continue;
            }
            let p = self.quarantined_dir.join(&name);
            match fs::read(&p) {
                Ok(b) => match serde_json::from_slice::<SpoolEntry>(&b) {
                    Ok(e) if e.quarantined.is_some() && sanitize_id(&e.id).is_ok() => out.push(e),
                    _ => {}
                },
                Err(e) if e.kind() == io::ErrorKind::NotFound => {} // completed meanwhile
                Err(e) => return Err(io_err(&p, e)),
            }
        }
        for name in list_names(&self.pending_dir)? {
            let Some(id) = name.strip_suffix(SIDECAR_SUFFIX) else {
                continue;
            };
            if sanitize_id(id).is_err() {
                tracing::warn!(file = %self.pending_dir.join(&name).display(), "spool: ignoring a file that is not a spool entry");
                continue;
            }
            let _claim = self.claim(id);
            let bytes_path = self.bytes_path(id);
            let bytes_meta = fs::metadata(&bytes_path);
            match self.read_sidecar(id) {
                Ok(None) => continue, // completed meanwhile
                Ok(Some(entry)) if bytes_meta.is_ok() => out.push(entry),
                Ok(Some(entry)) => {
                    tracing::error!(id = %id, seq = entry.seq, source = %super::one_line(&entry.source), bytes = %bytes_path.display(),
                        "spool: entry's image bytes are missing; dropping the entry");
                    if remove_if_present(&self.sidecar_path(id))? {
                        self.count.fetch_sub(1, Ordering::SeqCst);
                        dropped = true;
                    }
                }
                Err(e) => match bytes_meta {
                    Ok(meta) => {
                        tracing::error!(id = %id, error = %e, "spool: sidecar unreadable; rebuilding it from the image bytes");
                        let received = meta
                            .modified()
                            .ok()
                            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                            .map_or(0, |d| d.as_millis() as u64);
                        let entry = SpoolEntry {
                            id: id.to_string(),
                            source: "spool-recovered".into(),
                            original_name: id.to_string(),
                            received_unix_ms: received,
                            seq: self.alloc_seq()?,
                            bytes_path: bytes_path.clone(),
                            quarantined: None,
                            watched: None,
                            // Its message (if any) is redelivered by JetStream after ack_wait.
                            delivery: None,
                        };
                        let tmp = self.tmp_path(&self.pending_dir, "json");
                        let dest = self.sidecar_path(id);
                        write_synced(
                            &tmp,
                            &serde_json::to_vec(&entry).expect("SpoolEntry serialises"),
                        )?;
                        fs::rename(&tmp, &dest).map_err(|e| io_err(&dest, e))?;
                        sync_dir(&self.pending_dir)?;
                        out.push(entry);
                    }
                    Err(_) => {
                        tracing::error!(id = %id, error = %e, "spool: sidecar unreadable and image bytes missing; dropping the entry");
                        if remove_if_present(&self.sidecar_path(id))? {
                            self.count.fetch_sub(1, Ordering::SeqCst);
                            dropped = true;
                        }
                    }
                },
            }
        }
        if dropped {
            sync_dir(&self.pending_dir)?;
        }
        out.sort_by(|a, b| a.seq.cmp(&b.seq).then_with(|| a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Whether `id` is pending (false for ids that are not valid).
    /// The key of the acceptance pending under `id`, if any. Compare it with the key that
    /// `accept` returns to tell a retry (same key) from a new acceptance: between the two calls
    /// the pending one may have been quarantined or completed, which frees the id.
    pub fn pending_key(&self, id: &str) -> Option<EntryKey> {
        let id = sanitize_id(id).ok()?;
        self.read_sidecar(&id).ok().flatten().map(|e| e.key())
    }

    pub fn contains(&self, id: &str) -> bool {
        sanitize_id(id).is_ok() && self.sidecar_path(id).exists()
    }

    /// Pending entries (a counter, not a directory listing).
    pub fn len(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes the entries whose rows are in a finished file: each (id, seq) removes that
    /// acceptance only, never a later one of the same id (keys not pending, or with invalid
    /// ids, are fine). fsyncs each touched directory once.
    pub fn complete(&self, keys: &[EntryKey]) -> Result<(), SpoolError> {
        let mut first_err = None;
        let (mut touched, mut touched_records) = (false, false);
        for (id, seq) in keys {
            if sanitize_id(id).is_err() {
                continue;
            }
            let _claim = self.claim(id);
            match remove_if_present(&self.record_path(id, *seq)) {
                Ok(true) => {
                    self.count.fetch_sub(1, Ordering::SeqCst);
                    touched_records = true;
                    continue;
                }
                Ok(false) => {}
                Err(e) => {
                    first_err.get_or_insert(e);
                    continue;
                }
            }
            match self.read_sidecar(id) {
                Ok(Some(e)) if e.seq == *seq => {}
                Ok(_) => continue, // gone, or a later acceptance of the same id
                Err(e) => {
                    first_err.get_or_insert(e);
                    continue;
                }
            }
            match remove_if_present(&self.sidecar_path(id)) {
                Ok(true) => {
                    self.count.fetch_sub(1, Ordering::SeqCst);
                    touched = true;
                }
                Ok(false) => {}
                Err(e) => {
                    first_err.get_or_insert(e);
                    continue; // keep the bytes: the entry is still pending
                }
            }
            match remove_if_present(&self.bytes_path(id)) {
                Ok(removed) => touched |= removed,
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        if touched {
            sync_dir(&self.pending_dir)?;
        }
        if touched_records {
            sync_dir(&self.quarantined_dir)?;
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Refuses a pending entry: records it in `quarantined/` (so its error row is owed until
    /// [`Spool::complete`]), moves its bytes to `quarantine_dir/<id>` (`<id>.<n>` if that name is
    /// taken) with `<that>.reason` beside it, and frees the id for a new acceptance. Returns the
    /// record (the entry with `quarantined` set).
    pub fn quarantine(
        &self,
        entry: &SpoolEntry,
        reason: &str,
        quarantine_dir: &Path,
    ) -> Result<SpoolEntry, SpoolError> {
        let id = sanitize_id(&entry.id)?;
        fs::create_dir_all(quarantine_dir).map_err(|e| io_err(quarantine_dir, e))?;
        let _claim = self.claim(&id);
        match self.read_sidecar(&id)? {
            Some(e) if e.seq == entry.seq => {}
            _ => {
                return Err(io_err(
                    &self.sidecar_path(&id),
                    format!("entry (id {id}, seq {}) is not pending", entry.seq),
                ))
            }
        }
        let mut name = id.clone();
        let mut n = 1u64;
        while quarantine_dir.join(&name).exists()
            || quarantine_dir.join(format!("{name}.reason")).exists()
        {
            name = format!("{id}.{n}");
            n += 1;
        }
        let dest = quarantine_dir.join(&name);
        let mut record = entry.clone();
        record.id = id.clone();
        record.quarantined = Some(Quarantined {
            reason: reason.to_string(),
            path: dest.clone(),
        });
        let tmp = self.tmp_path(&self.quarantined_dir, "json");
        let record_path = self.record_path(&id, entry.seq);
        write_synced(
            &tmp,
            &serde_json::to_vec(&record).expect("SpoolEntry serialises"),
        )?;
        fs::rename(&tmp, &record_path).map_err(|e| io_err(&record_path, e))?;
        sync_dir(&self.quarantined_dir)?;
        // The record now owes the row: the rest is finished at the next open if a crash cuts it.
        self.count.fetch_add(1, Ordering::SeqCst);
        let sidecar_removed = self.finish_quarantine(&record)?;
        if sidecar_removed {
            self.count.fetch_sub(1, Ordering::SeqCst);
        }
        tracing::warn!(id = %id, source = %super::one_line(&entry.source), reason = %super::one_line(reason), path = %dest.display(), "image quarantined");
        Ok(record)
    }
}

/// Reads `<dir>/spool-id`, or makes it (durably) the first time.
fn spool_identity(dir: &Path) -> Result<String, SpoolError> {
    let path = dir.join(ID_FILE);
    match fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&path, e)),
    }
    let id = format!("spool-{}", new_id());
    let tmp = dir.join(format!("{TMP_PREFIX}{}-id", std::process::id()));
    let _ = fs::remove_file(&tmp);
    write_synced(&tmp, format!("{id}\n").as_bytes())?;
    fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))?;
    sync_dir(dir)?;
    Ok(id)
}

/// The `.reason` file beside a quarantined image.
fn reason_path_of(quarantined: &Path) -> PathBuf {
    let mut p = quarantined.as_os_str().to_owned();
    p.push(".reason");
    PathBuf::from(p)
}

fn reason_text(entry: &SpoolEntry, reason: &str) -> String {
    format!(
        "reason: {}\nid: {}\nsource: {}\noriginal_name: {}\nreceived_unix_ms: {}\nseq: {}\nquarantined_unix_ms: {}\n",
        super::one_line(reason),
        entry.id,
        super::one_line(&entry.source),
        super::one_line(&entry.original_name),
        entry.received_unix_ms,
        entry.seq,
        now_ms()
    )
}

/// Moves `src` to `dest` (rename; across file systems: copy with the same mode, then remove).
fn move_file(
    src: &Path,
    dest: &Path,
    tmp_in: impl Fn(&Path, &str) -> PathBuf,
) -> Result<(), SpoolError> {
    match fs::rename(src, dest) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(io_err(src, e)),
        Err(_) => {
            // Another file system (EXDEV) or similar: copy, then remove.
            let tmp = tmp_in(dest.parent().unwrap_or(Path::new(".")), "bytes");
            copy_synced(src, &tmp)?;
            fs::rename(&tmp, dest).map_err(|e| io_err(dest, e))?;
            remove_if_present(src).map(|_| ())
        }
    }
}

/// Copies `src` to a new file `dest` with the same read/write/execute bits (a file readable by
/// its owner only stays so; setuid, setgid and sticky bits are dropped: a daemon running as
/// root must not turn a user's file into a root-owned setuid one) and fsyncs it. `src` itself
/// must not be a symbolic link: a link swapped in after the folder was scanned is refused, not
/// followed. Errors name the file that failed: `src` for reading, `dest` for writing (a full
/// spool is not the source file's fault).
fn copy_synced(src: &Path, dest: &Path) -> Result<(), SpoolError> {
    use std::io::Read;
    let mut open = OpenOptions::new();
    open.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        open.custom_flags(libc::O_NOFOLLOW);
    }
    let mut from = open.open(src).map_err(|e| io_err(src, e))?;
    let meta = from.metadata().map_err(|e| io_err(src, e))?;
    if !meta.is_file() {
        return Err(io_err(src, "not a regular file"));
    }
    let mut to = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .map_err(|e| io_err(dest, e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        to.set_permissions(fs::Permissions::from_mode(
            meta.permissions().mode() & 0o777,
        ))
        .map_err(|e| io_err(dest, e))?;
    }
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(src, e)),
        };
        to.write_all(&buf[..n]).map_err(|e| io_err(dest, e))?;
    }
    to.sync_all().map_err(|e| io_err(dest, e))
}

/// File names (UTF-8 only: spool names always are) in `dir`.
fn list_names(dir: &Path) -> Result<Vec<String>, SpoolError> {
    let mut out = Vec::new();
    for ent in fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let ent = ent.map_err(|e| io_err(dir, e))?;
        if let Ok(name) = ent.file_name().into_string() {
            out.push(name);
        }
    }
    Ok(out)
}

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Checks a client-supplied id: only [A-Za-z0-9._-]{1,200}, not starting with '.'. Never
/// alters it: anything else is an error with a reason.
pub fn sanitize_id(raw: &str) -> Result<String, SpoolError> {
    let bad = |reason: String| {
        // The id goes into logs and HTTP answers: shown escaped and cut short.
        let mut shown: String = raw
            .chars()
            .take(64)
            .collect::<String>()
            .escape_debug()
            .to_string();
        if raw.chars().count() > 64 {
            shown.push('…');
        }
        Err(SpoolError::BadId { id: shown, reason })
    };
    if raw.is_empty() {
        return bad("empty".into());
    }
    if raw.len() > MAX_ID_LEN {
        return bad(format!("longer than {MAX_ID_LEN} characters"));
    }
    if raw.starts_with('.') {
        return bad("must not start with '.'".into());
    }
    if let Some((i, c)) = raw.char_indices().find(|&(_, c)| !is_id_char(c)) {
        return bad(format!(
            "character {:?} at byte {i} is not allowed (only A-Z a-z 0-9 . _ -)",
            c
        ));
    }
    Ok(raw.to_string())
}

use crate::rng::fnv1a64;

fn path_bytes(p: &Path) -> Vec<u8> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        p.as_os_str().as_bytes().to_vec()
    }
    #[cfg(not(unix))]
    {
        p.to_string_lossy().as_bytes().to_vec()
    }
}

/// Deterministic id for a watched file (path relative to the watched folder): components joined
/// by "__", other characters replaced by '_', a leading '.' replaced, cut to fit, plus "-" and 8
/// hex digits of the FNV-1a hash of the path's bytes (so paths that sanitise alike still differ).
/// Always passes [`sanitize_id`].
pub fn id_for_path(relative: &Path) -> String {
    let parts: Vec<String> = relative
        .components()
        .map(|c| {
            c.as_os_str()
                .to_string_lossy()
                .chars()
                .map(|ch| if is_id_char(ch) { ch } else { '_' })
                .collect()
        })
        .collect();
    let mut base = parts.join("__");
    if base.is_empty() {
        base.push_str("file");
    }
    if base.starts_with('.') {
        base.replace_range(0..1, "_");
    }
    base.truncate(MAX_ID_LEN - 9); // ASCII only by now
    let h = fnv1a64(&path_bytes(relative));
    format!("{base}-{:08x}", (h ^ (h >> 32)) as u32)
}

/// A fresh id for an upload without one: "<unix_ms>-<process counter>-<8 hex>", unique across
/// restarts (time, counter, and a hash of time, pid and counter).
pub fn new_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut seed = Vec::with_capacity(28);
    seed.extend_from_slice(&now.as_nanos().to_le_bytes());
    seed.extend_from_slice(&std::process::id().to_le_bytes());
    seed.extend_from_slice(&n.to_le_bytes());
    let h = fnv1a64(&seed);
    format!("{}-{n}-{:08x}", now.as_millis(), (h ^ (h >> 32)) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(entries: &[SpoolEntry]) -> Vec<&str> {
        entries.iter().map(|e| e.id.as_str()).collect()
    }

    #[test]
    fn a_new_acceptance_after_a_quarantine_has_a_new_key() {
        // What the HTTP handler relies on to tell a retry from a new acceptance: the id can be
        // freed (quarantined) between its look and its accept.
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let bad = spool.accept("same", "http", "", b"not an image").unwrap();
        assert_eq!(spool.pending_key("same"), Some(bad.key()));
        let retry = spool.accept("same", "http", "", b"not an image").unwrap();
        assert_eq!(retry.key(), bad.key(), "a retry is the same acceptance");
        let before = spool.pending_key("same");
        spool
            .quarantine(&bad, "corrupt", &dir.path().join("q"))
            .unwrap();
        let good = spool.accept("same", "http", "", b"an image").unwrap();
        assert_ne!(
            before,
            Some(good.key()),
            "a new acceptance must be sent down the pipeline"
        );
        assert_eq!(spool.pending_key("same"), Some(good.key()));
        assert_eq!(spool.pending_key("other"), None);
        assert_eq!(spool.pending_key("../bad"), None);
    }

    #[test]
    fn accept_pending_round_trip_and_seq_continues_across_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("spool");
        let spool = Spool::open(&dir).unwrap();
        assert!(spool.is_empty());
        let a = spool.accept("b-first", "http", "x.png", b"one").unwrap();
        let b = spool.accept("a-second", "http", "y.png", b"two").unwrap();
        assert!(a.seq < b.seq);
        assert_eq!(fs::read(&a.bytes_path).unwrap(), b"one");
        assert_eq!(spool.len(), 2);
        assert!(spool.contains("b-first") && !spool.contains("nope") && !spool.contains("../x"));
        let listed = spool.pending().unwrap();
        assert_eq!(listed, vec![a.clone(), b.clone()]);
        drop(spool);

        let spool = Spool::open(&dir).unwrap();
        assert_eq!(spool.len(), 2);
        assert_eq!(spool.pending().unwrap(), vec![a.clone(), b.clone()]);
        let c = spool.accept("c", "http", "z.png", b"three").unwrap();
        assert!(c.seq > b.seq);
        spool.complete(&[a.key(), b.key(), c.key()]).unwrap();
        assert!(spool.is_empty());
        let first_id = spool.id().to_string();
        drop(spool);
        // Even with nothing pending, seq keeps growing after a restart; the identity stays.
        let spool = Spool::open(&dir).unwrap();
        assert_eq!(spool.id(), first_id);
        assert!(first_id.starts_with("spool-") && sanitize_id(&first_id).is_ok());
        let d = spool.accept("d", "http", "w.png", b"four").unwrap();
        assert!(d.seq > c.seq, "{} > {}", d.seq, c.seq);
    }

    #[test]
    fn accept_is_idempotent_and_complete_removes() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = Spool::open(tmp.path()).unwrap();
        let a = spool.accept("img", "http", "a.png", b"first").unwrap();
        let again = spool.accept("img", "http", "other.png", b"first").unwrap();
        assert_eq!(a, again, "a retry with the same bytes is the same entry");
        // Other bytes under a pending id: refused, never silently dropped.
        match spool.accept("img", "http", "other.png", b"second") {
            Err(SpoolError::Conflict { id, seq }) => assert_eq!((id.as_str(), seq), ("img", a.seq)),
            other => panic!("{other:?}"),
        }
        assert_eq!(fs::read(&a.bytes_path).unwrap(), b"first");
        assert_eq!(spool.len(), 1);
        spool
            .complete(&[a.key(), ("never-was".into(), 0), ("../bad".into(), 1)])
            .unwrap();
        assert!(!spool.contains("img") && spool.is_empty());
        assert!(!a.bytes_path.exists());
        assert!(spool.pending().unwrap().is_empty());
        // After completion the same id is a new entry (at-least-once).
        let b = spool.accept("img", "http", "a.png", b"third").unwrap();
        assert!(b.seq > a.seq);
        assert_eq!(spool.pending().unwrap().len(), 1);
    }

    #[test]
    fn accept_file_copies_and_leaves_the_source() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = Spool::open(&tmp.path().join("s")).unwrap();
        let src = tmp.path().join("in.jpg");
        fs::write(&src, b"jpegdata").unwrap();
        let e = spool
            .accept_file(&id_for_path(Path::new("in.jpg")), &src, "in.jpg", None)
            .unwrap();
        assert_eq!(fs::read(&src).unwrap(), b"jpegdata");
        assert_eq!(fs::read(&e.bytes_path).unwrap(), b"jpegdata");
        assert_eq!(e.source, src.to_string_lossy());
        assert!(spool
            .accept_file("missing", &tmp.path().join("nope"), "nope", None)
            .is_err());
        assert_eq!(spool.len(), 1);
        let leftovers: Vec<String> = list_names(&tmp.path().join("s").join(PENDING)).unwrap();
        assert!(
            leftovers.iter().all(|n| !n.starts_with(TMP_PREFIX)),
            "{leftovers:?}"
        );
    }

    #[test]
    fn crash_leftovers_are_cleaned_and_never_listed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("spool");
        let spool = Spool::open(&dir).unwrap();
        spool.accept("kept", "http", "k.png", b"k").unwrap();
        drop(spool);
        let p = dir.join(PENDING);
        fs::write(p.join(".tmp-123-0-bytes"), b"partial").unwrap();
        fs::write(p.join(".tmp-123-1-json"), b"{\"id\":").unwrap();
        fs::write(dir.join(".tmp-123-2-seq"), b"99").unwrap();
        fs::write(p.join("orphan.bytes"), b"renamed but no sidecar").unwrap();
        let spool = Spool::open(&dir).unwrap();
        assert_eq!(ids(&spool.pending().unwrap()), vec!["kept"]);
        assert_eq!(spool.len(), 1);
        let mut names = list_names(&p).unwrap();
        names.sort();
        assert_eq!(names, vec!["kept.bytes", "kept.json"]);
        assert!(!dir.join(".tmp-123-2-seq").exists());
    }

    #[test]
    fn entry_without_bytes_is_dropped_and_corrupt_sidecar_is_rebuilt() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = Spool::open(tmp.path()).unwrap();
        let gone = spool.accept("gone", "http", "g.png", b"g").unwrap();
        let ok = spool.accept("ok", "http", "o.png", b"o").unwrap();
        spool.accept("mangled", "http", "m.png", b"m").unwrap();
        fs::remove_file(&gone.bytes_path).unwrap();
        fs::write(spool.sidecar_path("mangled"), b"not json").unwrap();
        let listed = spool.pending().unwrap();
        assert_eq!(ids(&listed), vec!["ok", "mangled"]);
        assert_eq!(listed[0], ok);
        assert!(listed[1].seq > ok.seq);
        assert!(!spool.contains("gone"));
        assert_eq!(spool.len(), 2);
        // The rebuilt sidecar is durable.
        drop(spool);
        let spool = Spool::open(tmp.path()).unwrap();
        assert_eq!(ids(&spool.pending().unwrap()), vec!["ok", "mangled"]);
    }

    #[test]
    fn quarantine_moves_bytes_and_writes_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = Spool::open(&tmp.path().join("spool")).unwrap();
        let q = tmp.path().join("quarantine");
        let e = spool
            .accept("bad", "http", "evil\nname.png", b"notanimage")
            .unwrap();
        let record = spool.quarantine(&e, "decode: not an image", &q).unwrap();
        let moved = record.quarantined.clone().unwrap().path;
        assert_eq!(moved, q.join("bad"));
        assert_eq!(fs::read(&moved).unwrap(), b"notanimage");
        let reason = fs::read_to_string(q.join("bad.reason")).unwrap();
        assert!(
            reason.contains("decode: not an image")
                && reason.contains("evil\\nname.png")
                && reason.contains("source: http"),
            "{reason}"
        );
        assert!(!spool.contains("bad") && !e.bytes_path.exists());
        // Its error row is still owed: listed (quarantined) until completed.
        assert_eq!(spool.len(), 1);
        assert_eq!(spool.pending().unwrap(), vec![record.clone()]);
        // The same id quarantined again does not overwrite the first.
        let e2 = spool.accept("bad", "http", "again.png", b"again").unwrap();
        let record2 = spool.quarantine(&e2, "again", &q).unwrap();
        assert_eq!(record2.quarantined.unwrap().path, q.join("bad.1"));
        assert!(q.join("bad.1.reason").exists());
        assert_eq!(fs::read(&moved).unwrap(), b"notanimage");
        spool.complete(&[e.key(), e2.key()]).unwrap();
        assert!(spool.is_empty() && spool.pending().unwrap().is_empty());
        assert!(q.join("bad").is_file() && q.join("bad.1").is_file());
    }

    #[test]
    fn an_id_reused_after_a_quarantine_is_a_new_entry_that_completing_the_old_one_keeps() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = Spool::open(&tmp.path().join("spool")).unwrap();
        let q = tmp.path().join("quarantine");
        let bad = spool.accept("fix1", "http", "", b"truncated").unwrap();
        spool.quarantine(&bad, "truncated", &q).unwrap();
        let good = spool.accept("fix1", "http", "", b"good image").unwrap();
        assert!(good.seq > bad.seq && good.quarantined.is_none());
        assert_eq!(fs::read(&good.bytes_path).unwrap(), b"good image");
        // The error row's file is finished first: the new acceptance must stay.
        spool.complete(&[bad.key()]).unwrap();
        assert!(spool.contains("fix1"));
        assert_eq!(spool.pending().unwrap(), vec![good.clone()]);
        spool.complete(&[good.key()]).unwrap();
        assert!(spool.is_empty() && !spool.contains("fix1"));
    }

    #[test]
    fn a_quarantine_cut_by_a_crash_is_finished_at_open_and_its_row_still_owed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("spool");
        let q = tmp.path().join("quarantine");
        let spool = Spool::open(&dir).unwrap();
        let e = spool.accept("cut", "http", "c.jpg", b"bytes").unwrap();
        drop(spool);
        // The crash came right after the record was written: bytes and sidecar still pending.
        let mut record = e.clone();
        record.quarantined = Some(Quarantined {
            reason: "truncated".into(),
            path: q.join("cut"),
        });
        fs::write(
            dir.join(QUARANTINED).join(format!("cut.{}.json", e.seq)),
            serde_json::to_vec(&record).unwrap(),
        )
        .unwrap();
        let spool = Spool::open(&dir).unwrap();
        assert_eq!(fs::read(q.join("cut")).unwrap(), b"bytes");
        assert!(fs::read_to_string(q.join("cut.reason"))
            .unwrap()
            .contains("truncated"));
        assert!(!spool.contains("cut") && !e.bytes_path.exists());
        let listed = spool.pending().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].quarantined.as_ref().unwrap().reason, "truncated");
        assert_eq!(spool.len(), 1);
        spool.complete(&[e.key()]).unwrap();
        drop(spool);
        let spool = Spool::open(&dir).unwrap();
        assert!(spool.is_empty() && spool.pending().unwrap().is_empty());
    }

    #[test]
    fn copy_errors_name_the_side_that_failed() {
        // The watcher tells "cannot read the file" (skip it until it changes) from "cannot store
        // it" (a full spool: retry) by the path an error names.
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("in.jpg");
        fs::write(&src, b"jpegdata").unwrap();
        let dest = tmp.path().join("no-such-folder").join("copy");
        match copy_synced(&src, &dest) {
            Err(SpoolError::Io { path, .. }) => assert_eq!(path, dest),
            other => panic!("{other:?}"),
        }
        let folder = tmp.path().join("a-folder");
        fs::create_dir(&folder).unwrap();
        match copy_synced(&folder, &tmp.path().join("copy2")) {
            Err(SpoolError::Io { path, message }) => {
                assert_eq!(path, folder, "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[cfg(unix)]
    #[test]
    fn accept_file_keeps_the_mode_and_refuses_a_symlink() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let spool = Spool::open(&tmp.path().join("s")).unwrap();
        let q = tmp.path().join("q");
        let private = tmp.path().join("private.jpg");
        fs::write(&private, b"secret").unwrap();
        fs::set_permissions(&private, fs::Permissions::from_mode(0o600)).unwrap();
        let e = spool
            .accept_file("p", &private, "private.jpg", None)
            .unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&e.bytes_path), 0o600);
        // A setuid/setgid/sticky file keeps its rwx bits only.
        let suid = tmp.path().join("suid.jpg");
        fs::write(&suid, b"binary").unwrap();
        fs::set_permissions(&suid, fs::Permissions::from_mode(0o7755)).unwrap();
        let s = spool.accept_file("s", &suid, "suid.jpg", None).unwrap();
        assert_eq!(mode(&s.bytes_path), 0o755);
        let qs = spool.quarantine(&s, "bad", &q).unwrap();
        assert_eq!(mode(&qs.quarantined.unwrap().path), 0o755);
        let record = spool.quarantine(&e, "bad", &q).unwrap();
        assert_eq!(mode(&record.quarantined.unwrap().path), 0o600);
        let link = tmp.path().join("link.jpg");
        std::os::unix::fs::symlink(&private, &link).unwrap();
        assert!(spool.accept_file("l", &link, "link.jpg", None).is_err());
        assert!(!spool.contains("l"));
    }

    #[test]
    fn sanitize_id_rejects_traversal_and_accepts_normal_ids() {
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "/etc/passwd",
            "x\0y",
            "a\\b",
            ".hidden",
            "sp ace",
            "ü",
            &"a".repeat(201),
        ] {
            let err = sanitize_id(bad).unwrap_err();
            assert!(matches!(err, SpoolError::BadId { .. }), "{bad:?}");
            assert!(!err.to_string().is_empty());
        }
        for good in [
            "a",
            "IMG_0001.jpg",
            "2024-01-01T12-00-00.123",
            "x..y",
            "-lead",
            &"a".repeat(200),
        ] {
            assert_eq!(sanitize_id(good).unwrap(), good);
        }
        let id = new_id();
        assert!(sanitize_id(&id).is_ok(), "{id}");
        assert_ne!(new_id(), new_id());
    }

    #[test]
    fn id_for_path_is_sanitary_and_distinct() {
        let long = "x".repeat(500);
        let paths = [
            "../x",
            "a b/ü.jpg",
            "a_b/ü.jpg",
            "a/b.jpg",
            "a__b.jpg",
            "a/b/c.jpg",
            ".hidden",
            "x",
            "..",
            "",
            long.as_str(),
            "a\nb",
            "/abs/p.png",
        ];
        let mut seen = HashSet::new();
        for p in paths {
            let id = id_for_path(Path::new(p));
            assert!(sanitize_id(&id).is_ok(), "{p:?} -> {id}");
            assert!(seen.insert(id.clone()), "collision for {p:?}: {id}");
            assert_eq!(id, id_for_path(Path::new(p)), "deterministic");
        }
        assert!(id_for_path(Path::new("a/b.jpg")).starts_with("a__b.jpg-"));
    }

    #[test]
    fn concurrent_accepts_of_one_id_make_one_entry() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = std::sync::Arc::new(Spool::open(tmp.path()).unwrap());
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let s = spool.clone();
                std::thread::spawn(move || {
                    s.accept("same", "http", "n", format!("{}", i % 2).as_bytes())
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        // The first accept wins; the same bytes again are that entry, other bytes a conflict.
        let entries: Vec<&SpoolEntry> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert!(entries.windows(2).all(|w| w[0] == w[1]));
        let kept = fs::read(&entries[0].bytes_path).unwrap();
        assert_eq!(entries.len(), 4, "the four uploads of the winning bytes");
        assert!(results.iter().all(|r| match r {
            Ok(_) => true,
            Err(SpoolError::Conflict { .. }) => true,
            Err(e) => panic!("{e}"),
        }));
        assert!(kept == b"0" || kept == b"1");
        assert_eq!(spool.len(), 1);
        assert_eq!(spool.pending().unwrap().len(), 1);
    }
}
