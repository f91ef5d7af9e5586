//! Wiring of the daemon: spool, model, engine threads, sources, signals, drain.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use super::config::ServeConfig;
use super::engine::{self, Engine, InFlight, ModelSlot};
use super::results::ResultStore;
use super::spool::{self, Spool, SpoolEntry};
use super::{http, nats, watch};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Spool(#[from] spool::SpoolError),
    #[error(transparent)]
    Model(#[from] crate::predict::job::PredictError),
    #[error("{path}: {message}")]
    Io {
        path: std::path::PathBuf,
        message: String,
    },
    #[error(transparent)]
    Nats(#[from] super::nats::NatsError),
    #[error("http.bind {addr}: {message}")]
    Bind { addr: String, message: String },
    #[error("{path}: {message}")]
    Locked {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("{path}: {message}")]
    Token {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("{0}")]
    Crashed(String),
}

/// The process-wide Prometheus recorder (installed once; later daemons in the same process,
/// e.g. tests, share it).
pub fn prometheus() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            match metrics::set_global_recorder(recorder) {
                Ok(()) => Some(handle),
                Err(e) => {
                    tracing::warn!(error = %e, "another metrics recorder is installed: /metrics will be empty");
                    None
                }
            }
        })
        .clone()
}

/// An exclusive advisory lock (flock) on `<dir>/<name>`, held while the value lives; the file
/// holds the holder's pid for the error message of the next one. The lock, not the file, is
/// what counts: a file left by a killed daemon is simply locked again.
pub struct DirLock {
    _file: std::fs::File,
}

impl DirLock {
    pub fn acquire(dir: &std::path::Path, name: &str, what: &str) -> Result<DirLock, ServeError> {
        use std::io::{Read, Seek, Write};
        let path = dir.join(name);
        let locked = |message: String| ServeError::Locked {
            path: path.clone(),
            message,
        };
        std::fs::create_dir_all(dir)
            .map_err(|e| locked(format!("cannot create the {what} folder: {e}")))?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| locked(format!("cannot open the lock file: {e}")))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let who = if holder.is_empty() {
                    "another process".to_string()
                } else {
                    format!("another daemon (pid {holder})")
                };
                return Err(locked(format!(
                    "the {what} {} is in use by {who}: one daemon per {what}. Stop that one, or give this config its own spool and output folders",
                    dir.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(locked(format!("cannot lock: {e}")))
            }
        }
        // Ours now: say who holds it (best effort; the lock is what matters).
        let _ = file
            .set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| writeln!(file, "{}", std::process::id()));
        Ok(DirLock { _file: file })
    }
}

/// The spool's lock file (one daemon per spool).
pub const SPOOL_LOCK: &str = "daemon.lock";
/// The output folder's lock file (one daemon writes and cleans a folder's `.partial` files).
pub const OUTPUT_LOCK: &str = ".plankton-serve.lock";

/// The bearer token in `path`: its content without surrounding white space, which must not be
/// empty (an empty token would make every upload fail with 401).
pub fn read_token(path: &std::path::Path) -> Result<String, ServeError> {
    let err = |message: String| ServeError::Token {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| err(format!("cannot read the bearer token: {e}")))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(err("the bearer token file is empty: put the token uploads must present in it (http.token_file)".into()));
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(err(
            "the bearer token must be one line without spaces or control characters".into(),
        ));
    }
    Ok(token.to_string())
}

/// What a finished daemon reports.
#[derive(Debug, Clone)]
pub struct ServeSummary {
    pub replayed: usize,
    pub watched: u64,
}

/// Events for whoever started the daemon (the CLI prints them; tests wait on them).
#[derive(Debug, Clone)]
pub enum ServeEvent {
    /// The HTTP endpoint is bound (port 0 resolved).
    Listening(SocketAddr),
    /// Model loaded, sources running.
    Ready { model_id: String, replayed: usize },
}

/// Runs the daemon until `shutdown` is cancelled, then stops accepting, drains in-flight work,
/// finishes the open Parquet file and returns. `reload` asks for a model reload (SIGHUP).
pub async fn run(
    cfg: ServeConfig,
    shutdown: CancellationToken,
    reload: Arc<tokio::sync::Notify>,
    mut on_event: impl FnMut(ServeEvent) + Send,
) -> Result<ServeSummary, ServeError> {
    check_model(&cfg)?;
    // One daemon per spool and output folder, before anything in them is touched: a second
    // one started by mistake must not delete the first one's open `.partial` file.
    let _spool_lock = DirLock::acquire(&cfg.spool, SPOOL_LOCK, "spool")?;
    let _output_lock = DirLock::acquire(&cfg.output.dir, OUTPUT_LOCK, "output folder")?;
    // Everything that can fail cheaply fails before the model is loaded and the engine threads
    // start (a half-started daemon must not exit with libtorch threads still running).
    let token = match &cfg.http.token_file {
        Some(p) if cfg.http.enabled => Some(read_token(p)?),
        _ => None,
    };
    let listener = if cfg.http.enabled {
        Some(bind(&cfg).await?)
    } else {
        None
    };
    // Connects in the background (the server may come up later); bad credentials files fail here.
    let nats = if cfg.nats.enabled {
        Some(nats::NatsInput::start(&cfg.nats, &cfg.name, cfg.output.roll_seconds).await?)
    } else {
        None
    };
    let metrics_handle = prometheus();
    engine::describe();
    let spool = Arc::new(Spool::open(&cfg.spool)?);
    let cleaned = engine::clean_partial_outputs(&cfg.output.dir).map_err(|e| ServeError::Io {
        path: cfg.output.dir.clone(),
        message: e.to_string(),
    })?;
    if cleaned > 0 {
        tracing::warn!(files = cleaned, "removed unfinished prediction files of an earlier run (their images are still spooled)");
    }
    // Accepted before a crash or a stop: processed again (outputs are idempotent by id), but
    // for those whose rows made it into a finished file before the crash.
    let pending = spool.pending()?;
    // The watcher counts these files as taken, released below or not.
    let spooled_files: Vec<spool::WatchedFile> =
        pending.iter().filter_map(|e| e.watched.clone()).collect();
    let (pending, released) = engine::release_already_written(&spool, &cfg.output.dir, pending);
    // The deliveries of spooled messages: acked once their rows are written (now, for those
    // already written before a crash).
    let (settled_tx, settled_rx) = async_channel::unbounded::<engine::Settled>();
    let (results_tx, results_rx) = async_channel::unbounded::<super::results::ServedPrediction>();
    let publish_results = nats.is_some() && !cfg.nats.results_subject.is_empty();
    if let Some(n) = &nats {
        n.restore(&pending);
        for e in &released {
            if let Some(s) = engine::Settled::of(e, e.quarantined.is_some()) {
                let _ = settled_tx.try_send(s);
            }
        }
    }
    let cfg_c = cfg.clone();
    let model = tokio::task::spawn_blocking(move || engine::load_model(&cfg_c))
        .await
        .map_err(|e| ServeError::Crashed(e.to_string()))??;
    let model_id = model.model_id.clone();
    let weights_path = model.weights_path.clone();
    let slot = Arc::new(ModelSlot {
        prep: RwLock::new(Arc::new(engine::Prep::of(&model, cfg.tta))),
        reload: AtomicBool::new(false),
    });
    let (ingest_tx, ingest_rx) = async_channel::bounded::<SpoolEntry>(cfg.queue.ingest);
    let results = Arc::new(ResultStore::new(cfg.http.recent_results));
    let in_flight = Arc::new(InFlight::default());
    let running = Engine {
        model,
        ingest: ingest_rx,
        spool: spool.clone(),
        results: results.clone(),
        slot: slot.clone(),
        cfg: cfg.clone(),
        in_flight,
        settled: nats.is_some().then(|| settled_tx.clone()),
        roll_now: nats
            .as_ref()
            .map_or_else(Default::default, |n| n.roll_signal()),
        results_out: publish_results.then_some(results_tx),
    }
    .start()
    .map_err(ServeError::Crashed)?;
    // From here on nothing returns early: the engine is always drained and joined below.

    let sources = CancellationToken::new();
    let mut tasks = Vec::new();
    let replayed = pending.len();
    if replayed > 0 {
        tracing::info!(images = replayed, "replaying spooled images");
    }
    tasks.push(tokio::spawn(replay_pending(
        pending,
        ingest_tx.clone(),
        sources.clone(),
    )));
    if cfg.watch.enabled {
        let (wcfg, sp, q, tx, stop) = (
            cfg.watch.clone(),
            spool.clone(),
            cfg.quarantine.clone(),
            ingest_tx.clone(),
            sources.clone(),
        );
        tasks.push(tokio::spawn(async move {
            watch::run_watch(wcfg, sp, q, spooled_files, tx, stop)
                .await
                .map_err(|e| e.to_string())
        }));
    }
    // Ends once the writer has finished (its sender dropped) and every ack is sent.
    drop(settled_tx);
    let results_rx = publish_results.then_some(results_rx);
    let acker = nats
        .clone()
        .map(|n| tokio::spawn(n.settle(settled_rx, results_rx)));
    if let Some(n) = &nats {
        let (sp, q, tx, stop) = (
            spool.clone(),
            cfg.quarantine.clone(),
            ingest_tx.clone(),
            sources.clone(),
        );
        tasks.push(tokio::spawn(n.clone().pull(sp, q, tx, stop)));
    }
    let ready = Arc::new(AtomicBool::new(false));
    let accepting = Arc::new(AtomicBool::new(true));
    if let Some((listener, addr)) = listener {
        tracing::info!(%addr, "listening");
        on_event(ServeEvent::Listening(addr));
        let state = Arc::new(http::HttpState {
            spool: spool.clone(),
            ingest: ingest_tx.clone(),
            results: results.clone(),
            cfg: cfg.http.clone(),
            token,
            ready: ready.clone(),
            accepting: accepting.clone(),
            metrics: metrics_handle,
        });
        let stop = sources.clone();
        tasks.push(tokio::spawn(async move {
            http::serve(listener, state, stop)
                .await
                .map(|_| 0)
                .map_err(|e| e.to_string())
        }));
    }
    tasks.push(tokio::spawn(watch_for_reload(
        slot.clone(),
        weights_path,
        reload,
        sources.clone(),
    )));
    ready.store(true, Ordering::SeqCst);
    on_event(ServeEvent::Ready { model_id, replayed });

    shutdown.cancelled().await;
    tracing::info!("stopping: no new images; draining in-flight work");
    accepting.store(false, Ordering::SeqCst);
    ready.store(false, Ordering::SeqCst);
    sources.cancel();
    let mut watched = 0;
    for t in tasks {
        match t.await {
            Ok(Ok(n)) => watched += n,
            Ok(Err(e)) => tracing::error!(error = %e, "a source stopped with an error"),
            Err(e) => tracing::error!(error = %e, "a source crashed"),
        }
    }
    ingest_tx.close();
    tokio::task::spawn_blocking(move || running.join())
        .await
        .map_err(|e| ServeError::Crashed(e.to_string()))?
        .map_err(ServeError::Crashed)?;
    if let Some(acker) = acker {
        if let Err(e) = acker.await {
            tracing::error!(error = %e, "the NATS acker crashed (unacked messages are redelivered)");
        }
    }
    tracing::info!("stopped: every accepted image is in a finished file or still spooled");
    Ok(ServeSummary { replayed, watched })
}

/// A wrong `model` must not leave folders behind (the run is loaded later, after the locks).
fn check_model(cfg: &ServeConfig) -> Result<(), ServeError> {
    if cfg.model.join("pipeline.toml").is_file() {
        return Ok(());
    }
    let why = if cfg.model.is_dir() {
        "not a trained run (no pipeline.toml in it)"
    } else {
        "no such run directory"
    };
    Err(ServeError::Io {
        path: cfg.model.clone(),
        message: format!("model: {why}: name a folder written by `plankton train`"),
    })
}

async fn bind(cfg: &ServeConfig) -> Result<(tokio::net::TcpListener, SocketAddr), ServeError> {
    let bind_error = |e: std::io::Error| ServeError::Bind {
        addr: cfg.http.bind.clone(),
        message: e.to_string(),
    };
    let listener = tokio::net::TcpListener::bind(&cfg.http.bind)
        .await
        .map_err(bind_error)?;
    let addr = listener.local_addr().map_err(bind_error)?;
    Ok((listener, addr))
}

/// Sends what the spool held at the start into the pipeline again.
async fn replay_pending(
    pending: Vec<SpoolEntry>,
    tx: async_channel::Sender<SpoolEntry>,
    stop: CancellationToken,
) -> Result<u64, String> {
    for e in pending {
        tokio::select! {
            r = tx.send(e) => if r.is_err() { break },
            _ = stop.cancelled() => break,
        }
    }
    Ok(0)
}

/// A new weights file (a retrained run written in place) or SIGHUP: reload between batches.
async fn watch_for_reload(
    slot: Arc<ModelSlot>,
    weights_path: std::path::PathBuf,
    reload: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
) -> Result<u64, String> {
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut seen = modified(&weights_path);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = reload.notified() => slot.reload.store(true, Ordering::SeqCst),
            _ = tokio::time::sleep(Duration::from_secs(2)) => {
                let now = modified(&weights_path);
                if now.is_some() && now != seen {
                    seen = now;
                    tracing::info!(weights = %weights_path.display(), "weights changed on disk: reloading");
                    slot.reload.store(true, Ordering::SeqCst);
                }
            }
        }
    }
    Ok(0)
}
