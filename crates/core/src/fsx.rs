//! Durable file writes, written once for the whole project.
//!
//! Every output file (checkpoints, Parquet files, reports, split files, the daemon's spool) is
//! written under a temporary name beside its destination, flushed to disk (fsync), renamed into
//! place and then the folder is flushed, so that after a crash *or a power loss* a reader sees
//! either the old file or the whole new one, never a torn one. The temporary name is unique per
//! process and call, so two writers of the same destination (two processes, or two files of one
//! step such as `report.json` and `report.md`) never share a temporary file.
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A failed durable write, naming the file. `is_disk_full` lets a caller answer differently
/// (the daemon answers 507 Insufficient Storage instead of 500).
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct WriteError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl WriteError {
    pub fn new(path: impl Into<PathBuf>, source: io::Error) -> Self {
        WriteError {
            path: path.into(),
            source,
        }
    }

    pub fn is_disk_full(&self) -> bool {
        is_disk_full(&self.source)
    }
}

/// True for "no space left on device" and "disk quota exceeded".
pub fn is_disk_full(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull
        || e.kind() == io::ErrorKind::QuotaExceeded
        || matches!(e.raw_os_error(), Some(28) | Some(122))
}

/// A temporary path beside `dest`, unique to this process and call. It ends in `.tmp`, which
/// every folder watcher of the project ignores, and starts with a dot, so listings skip it.
pub fn temp_path(dest: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.{}-{n}.tmp", std::process::id()))
}

/// Removes the temporary files that [`temp_path`] made in `dir` for processes no longer running
/// (a writer killed between create and rename leaves one; the names are unique, so nothing
/// else would ever replace it). Files of live processes and every other file are kept. Returns
/// how many were removed.
pub fn sweep_stale_temps(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = temp_owner(&name) else {
            continue;
        };
        if !process_alive(pid) && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// The process id in a name made by [`temp_path`]: `.{name}.{pid}-{n}.tmp`.
fn temp_owner(file_name: &str) -> Option<u32> {
    let stem = file_name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let (_, tail) = stem.rsplit_once('.')?;
    let (pid, n) = tail.split_once('-')?;
    n.parse::<u64>().ok()?;
    pid.parse().ok()
}

fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    #[cfg(target_os = "linux")]
    {
        Path::new("/proc").join(pid.to_string()).exists()
    }
    #[cfg(not(target_os = "linux"))]
    {
        // Without /proc, keep them: a stale file is clutter, a deleted live one is a failed write.
        true
    }
}

/// Writes `bytes` to `path` durably (see the module documentation).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// Writes `path` durably through `fill`, which writes the whole content to the temporary file.
/// On any error the temporary file is removed and the destination is untouched.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<(), WriteError> {
    let tmp = temp_path(path);
    let result = File::create(&tmp)
        .and_then(|mut f| {
            fill(&mut f)?;
            f.flush()?;
            f.sync_all()
        })
        .map_err(|e| WriteError::new(path, e))
        .and_then(|()| rename_durable(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes `path` durably through a writer that needs a path of its own (libtorch's `save`, a
/// Parquet writer): `fill` writes the file at the temporary path it is given.
pub fn write_atomic_via<E>(
    path: &Path,
    fill: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<Result<(), WriteError>, E> {
    let tmp = temp_path(path);
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let result = commit(&tmp, path);
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    Ok(result)
}

/// Moves a finished temporary file into place durably: fsync of the file, rename, fsync of the
/// folder.
pub fn commit(tmp: &Path, dest: &Path) -> Result<(), WriteError> {
    File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| WriteError::new(dest, e))?;
    rename_durable(tmp, dest)
}

fn rename_durable(tmp: &Path, dest: &Path) -> Result<(), WriteError> {
    std::fs::rename(tmp, dest).map_err(|e| WriteError::new(dest, e))?;
    sync_parent(dest).map_err(|e| WriteError::new(dest, e))
}

/// Flushes the folder holding `path`, so that a rename or a new file in it survives a power loss.
pub fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => sync_dir(dir),
        _ => sync_dir(Path::new(".")),
    }
}

/// What is under a folder, recursively, hidden entries (a leading dot) left out: the regular
/// files, sorted, and the other entries met (symbolic links, FIFOs, sockets, devices), which
/// are not followed: a link may point anywhere, a FIFO would block its reader.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FilesUnder {
    pub files: Vec<PathBuf>,
    pub other: Vec<PathBuf>,
}

/// See [`FilesUnder`]; an error's message names the entry that could not be read.
pub fn files_under(dir: &Path) -> io::Result<FilesUnder> {
    let named = |p: &Path| {
        let p = p.display().to_string();
        move |e: io::Error| io::Error::new(e.kind(), format!("{p}: {e}"))
    };
    let mut out = FilesUnder::default();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(named(&d))? {
            let e = e.map_err(named(&d))?;
            if e.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let t = e.file_type().map_err(named(&e.path()))?;
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                out.files.push(e.path());
            } else {
                out.other.push(e.path());
            }
        }
    }
    out.files.sort();
    out.other.sort();
    Ok(out)
}

#[cfg(test)]
mod files_under_tests {
    #[test]
    fn regular_files_sorted_links_and_fifos_apart_hidden_left_out() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::create_dir_all(d.join("b/c")).unwrap();
        std::fs::create_dir_all(d.join(".hidden")).unwrap();
        for f in ["z.jpg", "b/c/a.png", "b/y.jpg", ".dot", ".hidden/h.jpg"] {
            std::fs::write(d.join(f), b"x").unwrap();
        }
        std::os::unix::fs::symlink(d.join("z.jpg"), d.join("link.jpg")).unwrap();
        std::os::unix::fs::symlink(d, d.join("b/loop")).unwrap();
        let l = super::files_under(d).unwrap();
        let rel = |v: &[std::path::PathBuf]| -> Vec<String> {
            v.iter()
                .map(|p| p.strip_prefix(d).unwrap().display().to_string())
                .collect()
        };
        assert_eq!(rel(&l.files), ["b/c/a.png", "b/y.jpg", "z.jpg"]);
        assert_eq!(rel(&l.other), ["b/loop", "link.jpg"], "links not followed");
        let e = super::files_under(&d.join("missing")).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}

/// Flushes a folder's entries (a no-op where folders cannot be opened, i.e. not on Unix).
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "plankton-fsx-{}-{}",
            std::process::id(),
            temp_path(Path::new("x")).display()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn writes_replace_whole_files_and_leave_no_temporaries() {
        let dir = scratch();
        let path = dir.join("report.json");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second, longer").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second, longer");
        assert_eq!(entries(&dir), vec!["report.json".to_string()]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_failed_fill_leaves_the_old_file_and_no_temporary() {
        let dir = scratch();
        let path = dir.join("weights.bin");
        write_atomic(&path, b"old").unwrap();
        let err = write_atomic_with(&path, |f| {
            f.write_all(b"half")?;
            Err(io::Error::new(io::ErrorKind::StorageFull, "disk full"))
        })
        .unwrap_err();
        assert!(err.is_disk_full(), "{err}");
        assert!(err.to_string().contains("weights.bin"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(entries(&dir), vec!["weights.bin".to_string()]);

        let failed: Result<Result<(), WriteError>, &str> = write_atomic_via(&path, |tmp| {
            std::fs::write(tmp, b"partial").unwrap();
            Err("encoder failed")
        });
        assert_eq!(failed.unwrap_err(), "encoder failed");
        assert_eq!(entries(&dir), vec!["weights.bin".to_string()]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn temporaries_are_unique_hidden_and_end_in_tmp() {
        let a = temp_path(Path::new("/out/report.json"));
        let b = temp_path(Path::new("/out/report.json"));
        assert_ne!(a, b);
        assert_eq!(a.parent(), Some(Path::new("/out")));
        let name = a.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with(".report.json.") && name.ends_with(".tmp"),
            "{name}"
        );
    }

    #[test]
    fn a_missing_folder_is_an_error_naming_the_file() {
        let err = write_atomic(Path::new("/nonexistent-plankton-dir/x.csv"), b"x").unwrap_err();
        assert!(err.to_string().contains("x.csv"), "{err}");
        assert!(!err.is_disk_full());
    }

    #[test]
    fn stale_temporaries_of_dead_processes_are_swept_and_nothing_else() {
        let dir = scratch();
        let ours = temp_path(&dir.join("report.json"));
        std::fs::write(&ours, b"being written").unwrap();
        // A pid above the kernel's maximum (4194304) can never be running.
        let dead = dir.join(".report.json.999999999-0.tmp");
        std::fs::write(&dead, b"torn").unwrap();
        for keep in [".hidden", "report.json", "x.tmp", ".a.b.c-d.tmp"] {
            std::fs::write(dir.join(keep), b"keep").unwrap();
        }
        assert_eq!(sweep_stale_temps(&dir), 1);
        assert!(!dead.exists());
        assert!(ours.exists());
        assert_eq!(
            entries(&dir),
            vec![
                ".a.b.c-d.tmp".to_string(),
                ".hidden".to_string(),
                ours.file_name().unwrap().to_string_lossy().into_owned(),
                "report.json".to_string(),
                "x.tmp".to_string(),
            ]
            .into_iter()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
        );
        assert_eq!(sweep_stale_temps(&dir.join("missing")), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }
}

/// `path` as the file system resolves it: its longest existing ancestor canonicalised (symbolic
/// links and `..` resolved), the rest appended with `.` dropped and `..` applied.
pub fn resolve_path(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    let base = loop {
        if let Ok(c) = std::fs::canonicalize(&existing) {
            break c;
        }
        match (
            existing.file_name().map(|n| n.to_os_string()),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            // Nothing of it exists (or a `..` tail): resolve the text alone.
            _ => break std::env::current_dir().unwrap_or_default().join(&existing),
        }
    };
    let mut out = PathBuf::new();
    for c in base
        .components()
        .chain(rest.iter().rev().flat_map(|n| Path::new(n).components()))
    {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// An exclusive claim on a folder for one process (a train run, a replay): an advisory lock on
/// `<dir>/.lock`, held while this value lives and released by the kernel when the process ends,
/// kill -9 included, so a crash never leaves a stale lock behind.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    pub path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{dir}: another plankton process is working in this folder (it holds {lock}); wait for it to finish or choose another folder")]
    Busy { dir: PathBuf, lock: PathBuf },
    #[error("{path}: not a folder (a file of that name is in the way)")]
    NotAFolder { path: PathBuf },
    #[error("{path}: cannot lock: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Creates `dir` if needed and locks it, or says that another process holds it.
pub fn lock_dir(dir: &Path) -> Result<DirLock, LockError> {
    lock_dir_as(dir, false)
}

/// As [`lock_dir`], shared: any number of processes holding it shared (the members of one
/// replay run as separate jobs) keep out one that wants it exclusively, and the other way round.
pub fn lock_dir_shared(dir: &Path) -> Result<DirLock, LockError> {
    lock_dir_as(dir, true)
}

fn lock_dir_as(dir: &Path, shared: bool) -> Result<DirLock, LockError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LockError::Io { path, source }
    };
    if dir.exists() && !dir.is_dir() {
        return Err(LockError::NotAFolder {
            path: dir.to_path_buf(),
        });
    }
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let path = dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    let locked = if shared {
        file.try_lock_shared()
    } else {
        file.try_lock()
    };
    match locked {
        Ok(()) => Ok(DirLock { _file: file, path }),
        Err(std::fs::TryLockError::WouldBlock) => Err(LockError::Busy {
            dir: dir.to_path_buf(),
            lock: path,
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(io_err(&path)(e)),
    }
}

/// An exclusive lock on the file `path` (created if missing), waiting while another process
/// holds it: one step of a job that several processes share runs in one of them at a time.
/// `on_wait` is called first when it has to wait.
pub fn lock_file_waiting(path: &Path, on_wait: impl FnOnce()) -> Result<DirLock, LockError> {
    let io_err = |source| LockError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err)?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io_err)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            on_wait();
            file.lock().map_err(io_err)?;
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io_err(e)),
    }
    Ok(DirLock {
        _file: file,
        path: path.to_path_buf(),
    })
}

#[cfg(test)]
mod lock_tests {
    use super::*;

    #[test]
    fn a_folder_is_locked_once_until_the_lock_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let first = lock_dir(&run).unwrap();
        assert!(run.join(".lock").exists());
        let second = lock_dir(&run).unwrap_err();
        assert!(matches!(second, LockError::Busy { .. }), "{second}");
        assert!(
            second.to_string().contains("another plankton process"),
            "{second}"
        );
        drop(first);
        let _again = lock_dir(&run).unwrap();
    }

    #[test]
    fn shared_holders_exclude_an_exclusive_one_and_the_other_way_round() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let a = lock_dir_shared(&out).unwrap();
        let b = lock_dir_shared(&out).unwrap();
        assert!(matches!(lock_dir(&out), Err(LockError::Busy { .. })));
        drop((a, b));
        let whole = lock_dir(&out).unwrap();
        assert!(matches!(lock_dir_shared(&out), Err(LockError::Busy { .. })));
        drop(whole);
    }

    #[test]
    fn a_waiting_lock_is_taken_once_the_holder_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("locks/step.lock");
        let held = lock_file_waiting(&path, || panic!("free")).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        let waiter = std::thread::spawn(move || {
            let _l = lock_file_waiting(&p, || ()).unwrap();
            tx.send(()).unwrap();
        });
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(300))
                .is_err(),
            "waits while held"
        );
        drop(held);
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("taken once released");
        waiter.join().unwrap();
    }

    #[test]
    fn a_file_in_the_way_is_named_as_not_a_folder() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("out");
        std::fs::write(&file, b"x").unwrap();
        let e = lock_dir(&file).unwrap_err();
        assert!(matches!(e, LockError::NotAFolder { .. }), "{e}");
        assert!(e.to_string().contains("not a folder"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
    }
}
