//! The HTTP source and the daemon's operational endpoints.
//!
//! `POST /v1/images` spools the body (durably, fsynced) before it answers 202, so an
//! acknowledged image survives a crash; `?wait=true` then waits for its prediction.
//! `GET /v1/predictions/{id}` reports a recent result, `GET /metrics` the Prometheus text,
//! `GET /healthz` liveness and `GET /readyz` readiness (model loaded, not draining).
//!
//! `POST /v1/images` with `Content-Type: multipart/form-data` carries several images, one per
//! part (see [`upload_multipart`]): each part is spooled like a single upload, and the answer
//! lists every part as accepted or rejected.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::multipart::MultipartError;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::serve::config::{Backpressure, HttpConfig};
use crate::serve::results::ResultStore;
use crate::serve::spool::{self, Spool, SpoolEntry};
use crate::telemetry::{STAGE_DROPPED, STAGE_ERRORS, STAGE_RECEIVED};

/// The `source` recorded in the spool for uploads: `http`, or `http:<name>` with the client's
/// file name ([`upload_source`]).
pub const SOURCE: &str = "http";

/// Longest client file name kept (bytes, cut at a character boundary).
const MAX_NAME_BYTES: usize = 255;

/// The `source` of an upload: the client's file name (from `?name=` or the multipart part's
/// filename) without any folder part, cut to [`MAX_NAME_BYTES`]; it is recorded, never used as
/// a path. Control characters were refused before this.
pub fn upload_source(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or("").trim();
    if base.is_empty() {
        return SOURCE.to_string();
    }
    let mut end = base.len().min(MAX_NAME_BYTES);
    while !base.is_char_boundary(end) {
        end -= 1;
    }
    format!("{SOURCE}:{}", &base[..end])
}
/// Header that may carry the image id instead of `?id=`.
pub const ID_HEADER: &str = "x-image-id";

pub struct HttpState {
    pub spool: Arc<Spool>,
    pub ingest: async_channel::Sender<SpoolEntry>,
    pub results: Arc<ResultStore>,
    pub cfg: HttpConfig,
    /// Bearer token uploads and prediction look-ups must present (None: no auth).
    pub token: Option<String>,
    /// Model loaded and sources running.
    pub ready: Arc<AtomicBool>,
    /// False while draining for shutdown: uploads get 503.
    pub accepting: Arc<AtomicBool>,
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

pub fn router(state: Arc<HttpState>) -> Router {
    let limit = state.cfg.max_body_bytes;
    Router::new()
        .route("/v1/images", post(upload))
        .route("/v1/predictions/{id}", get(prediction))
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            refusals_close_unread_bodies,
        ))
        .with_state(state)
}

/// A refused request that carried a body answers `Connection: close` (its body may be unread,
/// so the connection cannot carry another request, and a client told so opens a new one
/// instead of writing into a closing socket): uploads refused before reading, 404s and 405s
/// alike. Not a 422 (the body was read) nor a 503 busy whose body was drained ([`busy`]: the
/// connection stays usable for the retry).
async fn refusals_close_unread_bodies(
    State(state): State<Arc<HttpState>>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    use axum::body::HttpBody;
    let may_have_body = request.body().size_hint().exact() != Some(0);
    let mut response = next.run(request).await;
    let status = response.status();
    let refused = status.is_client_error() || status.is_server_error();
    if may_have_body
        && refused
        && status != StatusCode::UNPROCESSABLE_ENTITY
        && !response.headers().contains_key(header::CONNECTION)
    {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    // How long this connection may then sit idle before the daemon closes it (see `serve`).
    if response
        .headers()
        .get(header::CONNECTION)
        .is_none_or(|v| v != "close")
    {
        let secs = (state.cfg.header_timeout_ms / 1000).max(1);
        if let Ok(v) = HeaderValue::from_str(&format!("timeout={secs}")) {
            response.headers_mut().insert("keep-alive", v);
        }
    }
    response
}

/// Beyond `sync_timeout_ms`, how long requests in flight at shutdown may still take.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Serves until `shutdown` is cancelled, then finishes the requests in flight (graceful) for at
/// most `sync_timeout_ms` + [`SHUTDOWN_GRACE`]: a client that stalls mid-upload must not keep
/// the daemon from stopping (its image was never spooled nor acknowledged). A connection with
/// no complete request head for `header_timeout_ms` is closed: one sending half its headers,
/// and one left idle between requests alike (hyper's timer runs from the previous answer), so
/// answers announce it as `Keep-Alive: timeout=N` for clients that reuse connections.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<HttpState>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let grace = Duration::from_millis(state.cfg.sync_timeout_ms) + SHUTDOWN_GRACE;
    let header_timeout = Duration::from_millis(state.cfg.header_timeout_ms);
    let app = router(state);
    let (closing_tx, closing_rx) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    let mut accept_failures = 0u64;
    let mut last_accept_log: Option<tokio::time::Instant> = None;
    loop {
        let (stream, _peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            // Finished connection tasks are reaped as they go, so the set stays small.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a second (connections close
                    // meanwhile), keep serving, and say so once per ten seconds.
                    accept_failures += 1;
                    if last_accept_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        tracing::warn!(error = %e, failures = accept_failures, "http: cannot accept connections; retrying every second");
                        last_accept_log = Some(tokio::time::Instant::now());
                        accept_failures = 0;
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            },
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut closing = closing_rx.clone();
        connections.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = closing.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    drop(listener);
    let _ = closing_tx.send(true);
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(grace_ms = grace.as_millis() as u64, connections = connections.len(), "http: connections still open after the shutdown grace period (a request or its head still arriving) are closed");
        connections.abort_all();
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
struct UploadQuery {
    id: Option<String>,
    name: Option<String>,
    #[serde(default)]
    wait: bool,
}

/// A refused request: counted under `STAGE_ERRORS{stage="http",reason}` and answered as JSON.
/// How a failed spool write is answered: 507 Insufficient Storage when the disk is full (the
/// client should retry later; nothing was accepted), 500 otherwise.
fn spool_failure(e: &spool::SpoolError) -> (StatusCode, &'static str) {
    match e {
        spool::SpoolError::DiskFull { .. } => (StatusCode::INSUFFICIENT_STORAGE, "disk_full"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "spool"),
    }
}

fn reject(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Response {
    metrics::counter!(STAGE_ERRORS, "stage" => "http", "reason" => reason).increment(1);
    let message = message.into();
    tracing::debug!(reason, %message, "http request refused");
    (status, Json(json!({ "error": message, "reason": reason }))).into_response()
}

fn unauthorized() -> Response {
    let mut r = reject(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "missing or wrong bearer token",
    );
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

fn unavailable(cfg: &HttpConfig, status: &str, message: &str) -> Response {
    let mut r = (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "status": status, "error": message })),
    )
        .into_response();
    r.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(cfg.retry_after_seconds),
    );
    r
}

/// 413 at once for a body declared (`Content-Length`) larger than `max_body_bytes`, before any
/// of it is read (a client that does not send `Expect: 100-continue` would otherwise wait).
fn declared_too_large(cfg: &HttpConfig, headers: &HeaderMap) -> Option<Response> {
    let declared = declared_length(headers)?;
    (declared > cfg.max_body_bytes as u64).then(|| {
        reject(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "body of {declared} bytes is larger than http.max_body_bytes = {}",
                cfg.max_body_bytes
            ),
        )
    })
}

/// The body length a request declares (`Content-Length`), if it does.
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// 408 for a body that stopped arriving for `body_idle_timeout_ms` (a stalled client; nothing
/// of it was spooled). A slow but steady upload is never cut.
fn body_stalled(cfg: &HttpConfig) -> Response {
    reject(
        StatusCode::REQUEST_TIMEOUT,
        "body_stalled",
        format!(
            "no part of the body arrived for http.body_idle_timeout_ms = {} ms",
            cfg.body_idle_timeout_ms
        ),
    )
}

enum BodyError {
    TooLarge,
    Stalled,
    Broken(String),
}

/// The whole body, at most `limit` bytes; a pause longer than `idle` between two pieces of it is
/// a stall (however long the whole upload takes).
async fn read_body(request: Request, limit: usize, idle: Duration) -> Result<Bytes, BodyError> {
    let mut out = Vec::new();
    consume_body(request, limit, idle, |data| out.extend_from_slice(data)).await?;
    Ok(Bytes::from(out))
}

/// Hands the body to `take` piece by piece: at most `limit` bytes, no pause longer than `idle`.
async fn consume_body(
    request: Request,
    limit: usize,
    idle: Duration,
    mut take: impl FnMut(&[u8]),
) -> Result<(), BodyError> {
    use axum::body::HttpBody;
    let mut body = request.into_body();
    let mut seen = 0usize;
    loop {
        let frame = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx));
        match tokio::time::timeout(idle, frame).await {
            Err(_) => return Err(BodyError::Stalled),
            Ok(None) => return Ok(()),
            Ok(Some(Err(e))) => return Err(BodyError::Broken(e.to_string())),
            Ok(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    seen += data.len();
                    if seen > limit {
                        return Err(BodyError::TooLarge);
                    }
                    take(data);
                }
            }
        }
    }
}

/// How long a refused upload's body may take to be read and thrown away (see [`busy`]).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// 503 busy for an upload whose body was not read. The body is read and thrown away first (at
/// most `max_body_bytes`, within [`DRAIN_TIMEOUT`]; nothing is kept, so memory stays bounded)
/// so that the connection stays usable for the client's retry: closing a socket with unread
/// input makes the kernel reset it, and a keep-alive client then sees a broken pipe instead
/// of the 503. A body too large or too slow to drain gets the 503 with `Connection: close`.
async fn busy(cfg: &HttpConfig, request: Request, message: &str) -> Response {
    let limit = cfg.max_body_bytes;
    let idle = Duration::from_millis(cfg.body_idle_timeout_ms);
    let drained = declared_length(request.headers()).is_none_or(|n| n <= limit as u64)
        && tokio::time::timeout(DRAIN_TIMEOUT, consume_body(request, limit, idle, |_| {}))
            .await
            .is_ok_and(|r| r.is_ok());
    let mut r = unavailable(cfg, "busy", message);
    r.headers_mut().insert(
        header::CONNECTION,
        HeaderValue::from_static(if drained { "keep-alive" } else { "close" }),
    );
    r
}

/// Compares without an early exit, so the time taken does not tell how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u64::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= u64::from(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

fn authorized(state: &HttpState, headers: &HeaderMap) -> bool {
    let Some(token) = state.token.as_deref() else {
        return true;
    };
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some((scheme, presented)) = value.trim().split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer")
        && constant_time_eq(presented.trim().as_bytes(), token.as_bytes())
}

/// `POST /v1/images`: one image, or several in a multipart body.
async fn upload(
    State(state): State<Arc<HttpState>>,
    query: Result<Query<UploadQuery>, QueryRejection>,
    headers: HeaderMap,
    request: Request,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    if !state.accepting.load(Ordering::SeqCst) {
        metrics::counter!(STAGE_ERRORS, "stage" => "http", "reason" => "draining").increment(1);
        return unavailable(
            &state.cfg,
            "draining",
            "shutting down: not accepting uploads",
        );
    }
    let Query(query) = match query {
        Ok(q) => q,
        Err(e) => return reject(StatusCode::BAD_REQUEST, "bad_query", e.body_text()),
    };
    if is_multipart(&headers) {
        return upload_multipart(&state, query, &headers, request).await;
    }

    let (id, name) = match single_id_and_name(&query, &headers) {
        Ok(x) => x,
        Err(r) => return r,
    };

    // Room first: under `reject`, a full queue refuses before the body is read or spooled.
    if state.ingest.is_closed() {
        metrics::counter!(STAGE_ERRORS, "stage" => "http", "reason" => "draining").increment(1);
        return unavailable(&state.cfg, "draining", "the pipeline is shutting down");
    }
    if state.cfg.backpressure == Backpressure::Reject && state.ingest.is_full() {
        metrics::counter!(STAGE_DROPPED, "stage" => "http").increment(1);
        return busy(&state.cfg, request, "ingest queue full: retry later").await;
    }

    if let Some(r) = declared_too_large(&state.cfg, &headers) {
        return r;
    }
    let idle = Duration::from_millis(state.cfg.body_idle_timeout_ms);
    let bytes = match read_body(request, state.cfg.max_body_bytes, idle).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => {
            return reject(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!(
                    "body larger than http.max_body_bytes = {}",
                    state.cfg.max_body_bytes
                ),
            )
        }
        Err(BodyError::Stalled) => return body_stalled(&state.cfg),
        Err(BodyError::Broken(e)) => {
            return reject(
                StatusCode::BAD_REQUEST,
                "body",
                format!("cannot read the body: {e}"),
            )
        }
    };
    if bytes.is_empty() {
        return reject(
            StatusCode::BAD_REQUEST,
            "empty_body",
            "empty body: send the image bytes",
        );
    }

    let (entry, duplicate) = match spool_one(&state, &id, &name, bytes).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let seq = entry.seq;
    // An id already pending is already on its way through the pipeline: not a second time.
    if !duplicate {
        if let Err(e) = state.ingest.send(entry).await {
            // Spooled, so it is safe: the next start picks it up from the spool.
            tracing::warn!(id = %e.0.id, "ingest queue closed; the image stays in the spool for the next start");
        }
    }
    if !query.wait {
        let mut body = json!({ "id": id, "status": "accepted" });
        if duplicate {
            body["duplicate"] = json!(true);
        }
        return (StatusCode::ACCEPTED, Json(body)).into_response();
    }
    wait_for_prediction(&state, &id, seq).await
}

/// The id of a single upload: `?id=` or `X-Image-Id`, validated (never silently altered), else
/// a fresh one; and its `?name=`.
// The error is the request's early answer (built at most once per request).
#[allow(clippy::result_large_err)]
fn single_id_and_name(
    query: &UploadQuery,
    headers: &HeaderMap,
) -> Result<(String, String), Response> {
    let header_id = match headers.get(ID_HEADER).map(|v| v.to_str()) {
        None => None,
        Some(Ok(v)) => Some(v.to_string()),
        Some(Err(_)) => {
            return Err(reject(
                StatusCode::BAD_REQUEST,
                "bad_id",
                "X-Image-Id is not visible ASCII",
            ))
        }
    };
    let raw_id = match (query.id.clone(), header_id) {
        (Some(q), Some(h)) if q != h => {
            return Err(reject(
                StatusCode::BAD_REQUEST,
                "bad_id",
                format!("?id={q:?} and X-Image-Id {h:?} disagree"),
            ))
        }
        (Some(q), _) => Some(q),
        (None, h) => h,
    };
    let id = match raw_id {
        Some(raw) => match spool::sanitize_id(&raw) {
            Ok(id) => id,
            Err(e) => return Err(reject(StatusCode::BAD_REQUEST, "bad_id", e.to_string())),
        },
        None => spool::new_id(),
    };
    let name = query.name.clone().unwrap_or_default();
    if name.chars().any(char::is_control) {
        return Err(reject(
            StatusCode::BAD_REQUEST,
            "bad_name",
            "?name= must not contain control characters",
        ));
    }
    Ok((id, name))
}

/// Spools one upload (durable before acknowledged: the spool fsyncs, so it runs off the async
/// workers). Returns the entry and whether its id was already pending with these bytes.
// The error is the request's early answer (built at most once per request).
#[allow(clippy::result_large_err)]
async fn spool_one(
    state: &HttpState,
    id: &str,
    name: &str,
    bytes: Bytes,
) -> Result<(SpoolEntry, bool), Response> {
    let spool = state.spool.clone();
    let (accept_id, accept_name) = (id.to_string(), name.to_string());
    let spooled = tokio::task::spawn_blocking(move || {
        let before = spool.pending_key(&accept_id);
        spool
            .accept(
                &accept_id,
                &upload_source(&accept_name),
                &accept_name,
                &bytes,
            )
            .map(|entry| {
                let duplicate = before.as_ref() == Some(&entry.key());
                (entry, duplicate)
            })
    })
    .await;
    let accepted = match spooled {
        Ok(Ok(x)) => x,
        Ok(Err(e @ spool::SpoolError::Conflict { .. })) => {
            return Err(reject(StatusCode::CONFLICT, "conflict", e.to_string()));
        }
        Ok(Err(e)) => {
            tracing::error!(id = %id, error = %e, "cannot spool an upload");
            let (status, reason) = spool_failure(&e);
            return Err(reject(
                status,
                reason,
                format!("cannot spool the image: {e}"),
            ));
        }
        Err(e) => {
            tracing::error!(id = %id, error = %e, "spool task failed");
            return Err(reject(
                StatusCode::INTERNAL_SERVER_ERROR,
                "spool",
                "cannot spool the image",
            ));
        }
    };
    metrics::counter!(STAGE_RECEIVED, "stage" => "http").increment(1);
    Ok(accepted)
}

/// `?wait=true`: the prediction (200), the quarantine record of a refused image (422), or
/// "pending" (202) after `sync_timeout_ms`.
async fn wait_for_prediction(state: &HttpState, id: &str, seq: u64) -> Response {
    match state
        .results
        .wait(id, seq, Duration::from_millis(state.cfg.sync_timeout_ms))
        .await
    {
        // Refused (bad input): recorded durably (quarantine + its owed error row) by now.
        Some(p) if p.error.is_some() => {
            let mut body = serde_json::to_value(&p).expect("serialisable");
            body["status"] = json!("quarantined");
            (StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response()
        }
        Some(p) => (StatusCode::OK, Json(p)).into_response(),
        None => (
            StatusCode::ACCEPTED,
            Json(json!({ "id": id, "status": "pending" })),
        )
            .into_response(),
    }
}

/// True for a `multipart/form-data` body (several images, one per part); any other body is
/// one image.
fn is_multipart(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("multipart/form-data"))
}

/// One part of a multipart upload, as read from the body.
struct Part {
    /// The form field name: the image id when it is a valid id used by no other part.
    field_name: Option<String>,
    /// The part's filename: the image's original name (for the record only).
    file_name: String,
    bytes: Bytes,
}

/// The id of each part: its field name when that is a valid id ([`spool::sanitize_id`]) that no
/// other part of the request uses, else a fresh [`spool::new_id`]. A name shared by several
/// parts is a form field (`curl -F file=@a.jpg -F file=@b.jpg`), not an id: taking it would
/// make the later parts duplicates of the first.
fn part_ids<'a>(field_names: impl Iterator<Item = Option<&'a str>> + Clone) -> Vec<String> {
    let mut uses = std::collections::HashMap::<&str, usize>::new();
    for name in field_names.clone().flatten() {
        *uses.entry(name).or_default() += 1;
    }
    field_names
        .map(|name| match name {
            Some(n) if uses[n] == 1 => spool::sanitize_id(n).unwrap_or_else(|_| spool::new_id()),
            _ => spool::new_id(),
        })
        .collect()
}

fn multipart_error(cfg: &HttpConfig, e: MultipartError) -> Response {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return reject(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "body larger than http.max_body_bytes = {}",
                cfg.max_body_bytes
            ),
        );
    }
    reject(e.status(), "bad_multipart", e.body_text())
}

/// What became of one part.
enum PartOutcome {
    Accepted { duplicate: bool },
    Rejected(String),
}

/// `POST /v1/images` with a `multipart/form-data` body: one image per part.
///
/// The whole body is read first (it is bounded by `max_body_bytes`, 413 beyond, as a single
/// upload is), so a body that is too large or malformed spools nothing. A part that is empty,
/// or whose filename holds control characters, is rejected on its own (its entry says why);
/// no single part can exceed `max_body_bytes` without the whole body doing so, so "too large"
/// is the whole request's 413. Backpressure is all or nothing: under `reject`, unless the
/// ingest queue has room for every acceptable part the request gets 503 with Retry-After and
/// nothing is spooled (more parts than the queue holds at all: 413, as retrying cannot help).
/// Every accepted part is spooled (fsynced) before the answer, 202 JSON
/// `{"images": [{"id", "name", "status": "accepted" | "rejected", "error"?, "duplicate"?}]}` in
/// part order; when no part is accepted the same list comes with 400 (or 500 when the spool
/// failed). `?id=`, `?name=`, `?wait=` and `X-Image-Id` belong to single uploads: 400 here.
async fn upload_multipart(
    state: &HttpState,
    query: UploadQuery,
    headers: &HeaderMap,
    request: Request,
) -> Response {
    if query.id.is_some() || query.name.is_some() || query.wait || headers.contains_key(ID_HEADER) {
        return reject(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "a multipart upload takes each id from its part's name and each name from its part's \
             filename: ?id=, ?name=, ?wait= and X-Image-Id are for single uploads",
        );
    }
    if state.ingest.is_closed() {
        metrics::counter!(STAGE_ERRORS, "stage" => "http", "reason" => "draining").increment(1);
        return unavailable(&state.cfg, "draining", "the pipeline is shutting down");
    }
    let refusing = state.cfg.backpressure == Backpressure::Reject;
    // A full queue refuses before the body is read (the room for every part is checked below).
    if refusing && state.ingest.is_full() {
        metrics::counter!(STAGE_DROPPED, "stage" => "http").increment(1);
        return busy(&state.cfg, request, "ingest queue full: retry later").await;
    }

    if let Some(r) = declared_too_large(&state.cfg, headers) {
        return r;
    }
    let parts = match read_parts(&state.cfg, request).await {
        Ok(parts) => parts,
        Err(r) => return r,
    };
    if parts.is_empty() {
        return reject(
            StatusCode::BAD_REQUEST,
            "empty_body",
            "a multipart upload without parts: send one image per part",
        );
    }
    let ids = part_ids(parts.iter().map(|p| p.field_name.as_deref()));
    let (mut outcomes, to_spool) = screen_parts(&parts, &ids);
    if refusing && !to_spool.is_empty() {
        if let Some(r) = no_room_for(state, to_spool.len()) {
            return r;
        }
    }
    let failures = match spool_parts(state, to_spool, &mut outcomes).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    multipart_answer(&parts, &ids, outcomes, failures)
}

/// Reads every part of a multipart body, piece by piece, so that only a pause, not a slow
/// link, ends the upload.
// The error is the request's early answer (built at most once per request).
#[allow(clippy::result_large_err)]
async fn read_parts(cfg: &HttpConfig, request: Request) -> Result<Vec<Part>, Response> {
    let mut multipart = match Multipart::from_request(request, &()).await {
        Ok(m) => m,
        Err(e) => return Err(reject(e.status(), "bad_multipart", e.body_text())),
    };
    let idle = Duration::from_millis(cfg.body_idle_timeout_ms);
    let mut parts = Vec::new();
    loop {
        let Ok(next) = tokio::time::timeout(idle, multipart.next_field()).await else {
            return Err(body_stalled(cfg));
        };
        let mut field = match next {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => return Err(multipart_error(cfg, e)),
        };
        let field_name = field.name().map(str::to_string);
        let file_name = field.file_name().unwrap_or_default().to_string();
        let mut bytes = Vec::new();
        loop {
            let Ok(chunk) = tokio::time::timeout(idle, field.chunk()).await else {
                return Err(body_stalled(cfg));
            };
            match chunk {
                Ok(Some(c)) => bytes.extend_from_slice(&c),
                Ok(None) => break,
                Err(e) => return Err(multipart_error(cfg, e)),
            }
        }
        parts.push(Part {
            field_name,
            file_name,
            bytes: Bytes::from(bytes),
        });
    }
    Ok(parts)
}

/// A part to spool: its index, id, filename and bytes.
type ToSpool = (usize, String, String, Bytes);

/// Rejects the parts that are empty or whose filename holds control characters (their outcome
/// is set); the others are to be spooled (their outcome is `None` until then).
fn screen_parts(parts: &[Part], ids: &[String]) -> (Vec<Option<PartOutcome>>, Vec<ToSpool>) {
    let mut outcomes = Vec::with_capacity(parts.len());
    let mut to_spool = Vec::new();
    for (i, (part, id)) in parts.iter().zip(ids).enumerate() {
        let problem = if part.bytes.is_empty() {
            Some(("empty_part", "empty part: send the image bytes"))
        } else if part.file_name.chars().any(char::is_control) {
            Some((
                "bad_name",
                "the part's filename must not contain control characters",
            ))
        } else {
            None
        };
        match problem {
            Some((reason, message)) => {
                metrics::counter!(STAGE_ERRORS, "stage" => "http", "reason" => reason).increment(1);
                outcomes.push(Some(PartOutcome::Rejected(message.to_string())));
            }
            None => {
                outcomes.push(None);
                to_spool.push((i, id.clone(), part.file_name.clone(), part.bytes.clone()));
            }
        }
    }
    (outcomes, to_spool)
}

/// Under `reject`: room for all `n` images in the ingest queue, or the answer that refuses
/// them all (413 when the queue could never hold them, else 503 to retry).
fn no_room_for(state: &HttpState, n: usize) -> Option<Response> {
    let capacity = state.ingest.capacity()?;
    if n > capacity {
        return Some(reject(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_parts",
            format!(
                "{n} images in one request, more than the ingest queue holds \
                 (queue.ingest = {capacity}): send fewer per request"
            ),
        ));
    }
    if capacity.saturating_sub(state.ingest.len()) < n {
        metrics::counter!(STAGE_DROPPED, "stage" => "http").increment(n as u64);
        // The body was read: the connection stays usable for the retry.
        let mut r = unavailable(
            &state.cfg,
            "busy",
            "ingest queue has no room for all the images: retry later",
        );
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        return Some(r);
    }
    None
}

/// How the spooling of a multipart upload's parts failed, if it did.
#[derive(Default)]
struct SpoolFailures {
    spool_failed: bool,
    disk_full: bool,
    conflict: bool,
}

/// Spools the parts (durable before acknowledged, one after the other, off the async workers)
/// and sends each new one on; sets each part's outcome.
// The error is the request's early answer (built at most once per request).
#[allow(clippy::result_large_err)]
async fn spool_parts(
    state: &HttpState,
    to_spool: Vec<ToSpool>,
    outcomes: &mut [Option<PartOutcome>],
) -> Result<SpoolFailures, Response> {
    let spool = state.spool.clone();
    let spooled = tokio::task::spawn_blocking(move || {
        to_spool
            .into_iter()
            .map(|(i, id, name, bytes)| {
                let before = spool.pending_key(&id);
                let result = spool.accept(&id, &upload_source(&name), &name, &bytes);
                (
                    i,
                    id,
                    result.map(|entry| {
                        let duplicate = before.as_ref() == Some(&entry.key());
                        (entry, duplicate)
                    }),
                )
            })
            .collect::<Vec<_>>()
    })
    .await;
    let spooled = match spooled {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "spool task failed");
            return Err(reject(
                StatusCode::INTERNAL_SERVER_ERROR,
                "spool",
                "cannot spool the images",
            ));
        }
    };
    let mut failures = SpoolFailures::default();
    for (i, id, result) in spooled {
        outcomes[i] = Some(match result {
            Ok((entry, duplicate)) => {
                metrics::counter!(STAGE_RECEIVED, "stage" => "http").increment(1);
                // An id already pending is already on its way through the pipeline.
                if !duplicate {
                    if let Err(e) = state.ingest.send(entry).await {
                        tracing::warn!(id = %e.0.id, "ingest queue closed; the image stays in the spool for the next start");
                    }
                }
                PartOutcome::Accepted { duplicate }
            }
            Err(e @ spool::SpoolError::Conflict { .. }) => {
                metrics::counter!(STAGE_ERRORS, "stage" => "http", "reason" => "conflict")
                    .increment(1);
                failures.conflict = true;
                PartOutcome::Rejected(e.to_string())
            }
            Err(e) => {
                tracing::error!(id = %id, error = %e, "cannot spool an upload");
                let (status, reason) = spool_failure(&e);
                metrics::counter!(STAGE_ERRORS, "stage" => "http", "reason" => reason).increment(1);
                failures.spool_failed = true;
                failures.disk_full |= status == StatusCode::INSUFFICIENT_STORAGE;
                PartOutcome::Rejected(format!("cannot spool the image: {e}"))
            }
        });
    }
    Ok(failures)
}

/// The multipart answer: every part's outcome in part order; 202 when any was accepted, else
/// the status of the worst failure.
fn multipart_answer(
    parts: &[Part],
    ids: &[String],
    outcomes: Vec<Option<PartOutcome>>,
    failures: SpoolFailures,
) -> Response {
    let mut any_accepted = false;
    let images: Vec<serde_json::Value> = parts
        .iter()
        .zip(ids)
        .zip(outcomes)
        .map(|((part, id), outcome)| {
            let mut entry = json!({ "id": id, "name": part.file_name });
            match outcome.expect("every part has an outcome") {
                PartOutcome::Accepted { duplicate } => {
                    any_accepted = true;
                    entry["status"] = json!("accepted");
                    if duplicate {
                        entry["duplicate"] = json!(true);
                    }
                }
                PartOutcome::Rejected(error) => {
                    entry["status"] = json!("rejected");
                    entry["error"] = json!(error);
                }
            }
            entry
        })
        .collect();
    let status = if any_accepted {
        StatusCode::ACCEPTED
    } else if failures.disk_full {
        StatusCode::INSUFFICIENT_STORAGE
    } else if failures.spool_failed {
        StatusCode::INTERNAL_SERVER_ERROR
    } else if failures.conflict {
        StatusCode::CONFLICT
    } else {
        StatusCode::BAD_REQUEST
    };
    let mut body = json!({ "images": images });
    if !any_accepted {
        body["error"] = json!("no image in the request was accepted");
    }
    (status, Json(body)).into_response()
}

async fn prediction(
    State(state): State<Arc<HttpState>>,
    Path(raw): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let id = match spool::sanitize_id(&raw) {
        Ok(id) => id,
        Err(e) => return reject(StatusCode::BAD_REQUEST, "bad_id", e.to_string()),
    };
    if let Some(p) = state.results.get(&id) {
        return (StatusCode::OK, Json(p)).into_response();
    }
    let spool = state.spool.clone();
    let lookup = id.clone();
    let pending = tokio::task::spawn_blocking(move || spool.contains(&lookup))
        .await
        .unwrap_or(false);
    if pending {
        (
            StatusCode::ACCEPTED,
            Json(json!({ "id": id, "status": "pending" })),
        )
            .into_response()
    } else {
        (
            StatusCode::NOT_FOUND,
            Json(json!({ "id": id, "status": "unknown" })),
        )
            .into_response()
    }
}

async fn metrics_text(State(state): State<Arc<HttpState>>) -> Response {
    match &state.metrics {
        Some(handle) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            )],
            handle.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled").into_response(),
    }
}

async fn readyz(State(state): State<Arc<HttpState>>) -> Response {
    let ready = state.ready.load(Ordering::SeqCst);
    let accepting = state.accepting.load(Ordering::SeqCst);
    if ready && accepting {
        (StatusCode::OK, "ready").into_response()
    } else {
        let why = if !ready {
            "not ready: model or sources still starting"
        } else {
            "draining"
        };
        (StatusCode::SERVICE_UNAVAILABLE, why).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::results::ServedPrediction;
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    struct Fixture {
        _dir: tempfile::TempDir,
        spool_dir: std::path::PathBuf,
        state: Arc<HttpState>,
        rx: async_channel::Receiver<SpoolEntry>,
    }

    fn fixture(cfg: HttpConfig, token: Option<&str>, queue: usize) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("spool");
        let spool = Arc::new(Spool::open(&spool_dir).unwrap());
        let (tx, rx) = async_channel::bounded(queue);
        let state = Arc::new(HttpState {
            spool,
            ingest: tx,
            results: Arc::new(ResultStore::new(16)),
            cfg,
            token: token.map(str::to_string),
            ready: Arc::new(AtomicBool::new(true)),
            accepting: Arc::new(AtomicBool::new(true)),
            metrics: None,
        });
        Fixture {
            _dir: dir,
            spool_dir,
            state,
            rx,
        }
    }

    fn files_under(dir: &std::path::Path) -> usize {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return 0;
        };
        rd.map(|e| e.unwrap().path())
            .map(|p| if p.is_dir() { files_under(&p) } else { 1 })
            .sum()
    }

    fn post_req(uri: &str) -> axum::http::request::Builder {
        Request::builder().method("POST").uri(uri)
    }

    async fn call(
        state: &Arc<HttpState>,
        req: Request,
    ) -> (StatusCode, HeaderMap, serde_json::Value, String) {
        let resp = router(state.clone()).oneshot(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        (parts.status, parts.headers, json, text)
    }

    fn upload_req(uri: &str, body: &'static [u8]) -> Request {
        post_req(uri).body(Body::from(body)).unwrap()
    }

    fn get_req(uri: &str) -> Request {
        Request::builder().uri(uri).body(Body::empty()).unwrap()
    }

    fn pred(id: &str) -> ServedPrediction {
        ServedPrediction {
            id: id.into(),
            seq: 0,
            quarantined: None,
            flag: None,
            image_height: None,
            image_width: None,
            model_id: "model-1".into(),
            predicted_class: Some("copepod".into()),
            confidence: Some(0.75),
            top_classes: vec!["copepod".into(), "diatom".into()],
            top_probabilities: vec![0.75, 0.25],
            error: None,
            received_unix_ms: 5,
            latency_ms: 1.5,
            unknown: None,
            energy: None,
            mahalanobis: None,
        }
    }

    #[tokio::test]
    async fn upload_is_spooled_and_queued() {
        let f = fixture(HttpConfig::default(), None, 8);
        let (status, _, json, _) = call(
            &f.state,
            upload_req("/v1/images?id=img-1&name=a%20b.jpg", b"abc"),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert_eq!(json, json!({"id": "img-1", "status": "accepted"}));
        let entry = f.rx.try_recv().unwrap();
        assert_eq!(
            (
                entry.id.as_str(),
                entry.source.as_str(),
                entry.original_name.as_str()
            ),
            ("img-1", "http:a b.jpg", "a b.jpg")
        );
        assert_eq!(std::fs::read(&entry.bytes_path).unwrap(), b"abc");
        assert!(f.state.spool.contains("img-1"));

        // The id from the header; and a fresh one when none is given.
        let req = post_req("/v1/images")
            .header("X-Image-Id", "img-2")
            .body(Body::from("def"))
            .unwrap();
        let (status, _, json, _) = call(&f.state, req).await;
        assert_eq!(
            (status, json["id"].as_str()),
            (StatusCode::ACCEPTED, Some("img-2"))
        );
        assert_eq!(f.rx.try_recv().unwrap().id, "img-2");
        let (status, _, json, _) = call(&f.state, upload_req("/v1/images", b"ghi")).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        let fresh = json["id"].as_str().unwrap().to_string();
        assert_eq!(f.rx.try_recv().unwrap().id, fresh);
        assert!(f.state.spool.contains(&fresh));

        // The same id again while pending: acknowledged, not queued twice.
        let (status, _, json, _) = call(&f.state, upload_req("/v1/images?id=img-1", b"abc")).await;
        assert_eq!(
            (status, json["status"].as_str(), json["duplicate"].as_bool()),
            (StatusCode::ACCEPTED, Some("accepted"), Some(true))
        );
        assert!(f.rx.is_empty());
        // Other bytes under that id while it is pending: 409, the spooled image unchanged.
        let (status, headers, json, _) =
            call(&f.state, upload_req("/v1/images?id=img-1", b"xyz")).await;
        assert_eq!(
            (status, json["reason"].as_str()),
            (StatusCode::CONFLICT, Some("conflict")),
            "{json}"
        );
        assert!(
            json["error"]
                .as_str()
                .is_some_and(|e| e.contains("already spooled with other bytes")),
            "{json}"
        );
        assert_eq!(headers[header::CONNECTION], "close");
        assert!(f.rx.is_empty());

        let (status, _, json, _) = call(&f.state, upload_req("/v1/images?id=img-9", b"")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{json}");
        assert!(!f.state.spool.contains("img-9") && f.rx.is_empty());
    }

    #[tokio::test]
    async fn bad_ids_are_refused_and_nothing_is_spooled() {
        let f = fixture(HttpConfig::default(), None, 8);
        let before = files_under(&f.spool_dir);
        for uri in [
            "/v1/images?id=..%2Fx",
            "/v1/images?id=a%2Fb",
            "/v1/images?id=img&wait=maybe",
        ] {
            let (status, _, json, _) = call(&f.state, upload_req(uri, b"abc")).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}");
            assert!(
                json["error"].as_str().is_some_and(|e| !e.is_empty()),
                "{uri}: {json}"
            );
        }
        for id in ["../x", "a/b"] {
            let req = post_req("/v1/images")
                .header("X-Image-Id", id)
                .body(Body::from("abc"))
                .unwrap();
            let (status, _, json, _) = call(&f.state, req).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{id}: {json}");
            assert!(
                json["error"].as_str().unwrap().contains(id),
                "the reason names the id: {json}"
            );
        }
        let req = post_req("/v1/images?id=one")
            .header("X-Image-Id", "two")
            .body(Body::from("abc"))
            .unwrap();
        assert_eq!(call(&f.state, req).await.0, StatusCode::BAD_REQUEST);
        let (status, _, _, _) = call(&f.state, get_req("/v1/predictions/..%2Fx")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(f.rx.is_empty());
        assert_eq!(files_under(&f.spool_dir), before);
    }

    #[tokio::test]
    async fn token_is_required_when_configured() {
        let f = fixture(HttpConfig::default(), Some("s3cret"), 8);
        let (status, headers, _, _) = call(&f.state, upload_req("/v1/images?id=a", b"abc")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
        for auth in [
            "Bearer wrong",
            "Bearer s3cre",
            "Bearer s3crett",
            "Basic s3cret",
            "s3cret",
        ] {
            let req = post_req("/v1/images?id=a")
                .header("Authorization", auth)
                .body(Body::from("abc"))
                .unwrap();
            assert_eq!(
                call(&f.state, req).await.0,
                StatusCode::UNAUTHORIZED,
                "{auth}"
            );
        }
        assert!(f.rx.is_empty() && !f.state.spool.contains("a"));
        assert_eq!(
            call(&f.state, get_req("/v1/predictions/a")).await.0,
            StatusCode::UNAUTHORIZED
        );

        let req = post_req("/v1/images?id=a")
            .header("Authorization", "Bearer s3cret")
            .body(Body::from("abc"))
            .unwrap();
        assert_eq!(call(&f.state, req).await.0, StatusCode::ACCEPTED);
        assert_eq!(f.rx.try_recv().unwrap().id, "a");
        let req = Request::builder()
            .uri("/v1/predictions/a")
            .header("Authorization", "Bearer s3cret")
            .body(Body::empty())
            .unwrap();
        assert_eq!(call(&f.state, req).await.0, StatusCode::ACCEPTED);
        // Operational endpoints stay open.
        assert_eq!(call(&f.state, get_req("/healthz")).await.0, StatusCode::OK);
        assert!(
            constant_time_eq(b"abc", b"abc")
                && !constant_time_eq(b"abc", b"abd")
                && !constant_time_eq(b"ab", b"abc")
        );
    }

    #[tokio::test]
    async fn oversize_bodies_get_413() {
        let cfg = HttpConfig {
            max_body_bytes: 10,
            ..HttpConfig::default()
        };
        let f = fixture(cfg, None, 8);
        let (status, _, json, _) =
            call(&f.state, upload_req("/v1/images?id=big", b"0123456789A")).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{json}");
        assert!(!f.state.spool.contains("big") && f.rx.is_empty());
        let (status, _, _, _) =
            call(&f.state, upload_req("/v1/images?id=fits", b"0123456789")).await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }

    #[tokio::test]
    async fn full_queue_under_reject_answers_503_and_spools_nothing() {
        let cfg = HttpConfig {
            retry_after_seconds: 7,
            ..HttpConfig::default()
        };
        let f = fixture(cfg, None, 1);
        assert_eq!(
            call(&f.state, upload_req("/v1/images?id=first", b"abc"))
                .await
                .0,
            StatusCode::ACCEPTED
        );
        let before = files_under(&f.spool_dir);
        let (status, headers, json, _) =
            call(&f.state, upload_req("/v1/images?id=second", b"abc")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(headers[header::RETRY_AFTER], "7");
        assert_eq!(json["status"], "busy");
        assert!(!f.state.spool.contains("second"));
        assert_eq!(files_under(&f.spool_dir), before);
        assert_eq!(f.rx.len(), 1);
        // Room again: accepted.
        assert_eq!(f.rx.try_recv().unwrap().id, "first");
        assert_eq!(
            call(&f.state, upload_req("/v1/images?id=second", b"abc"))
                .await
                .0,
            StatusCode::ACCEPTED
        );
    }

    #[tokio::test]
    async fn full_queue_under_block_waits_for_room() {
        let cfg = HttpConfig {
            backpressure: Backpressure::Block,
            ..HttpConfig::default()
        };
        let f = fixture(cfg, None, 1);
        assert_eq!(
            call(&f.state, upload_req("/v1/images?id=first", b"abc"))
                .await
                .0,
            StatusCode::ACCEPTED
        );
        let state = f.state.clone();
        let blocked = tokio::spawn(async move {
            call(&state, upload_req("/v1/images?id=second", b"abc"))
                .await
                .0
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!blocked.is_finished());
        assert_eq!(f.rx.recv().await.unwrap().id, "first");
        assert_eq!(blocked.await.unwrap(), StatusCode::ACCEPTED);
        assert_eq!(f.rx.recv().await.unwrap().id, "second");
    }

    #[tokio::test]
    async fn wait_true_returns_the_prediction_or_pending() {
        let f = fixture(HttpConfig::default(), None, 8);
        let (rx, results) = (f.rx.clone(), f.state.results.clone());
        let engine = tokio::spawn(async move {
            let entry = rx.recv().await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            results.publish(ServedPrediction {
                seq: entry.seq,
                ..pred(&entry.id)
            });
        });
        let (status, _, json, _) =
            call(&f.state, upload_req("/v1/images?id=w1&wait=true", b"abc")).await;
        assert_eq!(status, StatusCode::OK, "{json}");
        let got: ServedPrediction = serde_json::from_value(json).unwrap();
        assert_eq!(got, pred("w1"));
        engine.await.unwrap();

        let cfg = HttpConfig {
            sync_timeout_ms: 50,
            ..HttpConfig::default()
        };
        let f = fixture(cfg, None, 8);
        let (status, _, json, _) =
            call(&f.state, upload_req("/v1/images?id=w2&wait=true", b"abc")).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert_eq!(json, json!({"id": "w2", "status": "pending"}));

        // A refused image answers 422 with its reason (once its quarantine is recorded).
        let f = fixture(HttpConfig::default(), None, 8);
        let (rx, results) = (f.rx.clone(), f.state.results.clone());
        let engine = tokio::spawn(async move {
            let entry = rx.recv().await.unwrap();
            results.publish(ServedPrediction {
                seq: entry.seq,
                predicted_class: None,
                confidence: None,
                top_classes: vec![],
                top_probabilities: vec![],
                error: Some("w3: not an image".into()),
                quarantined: Some("/q/w3".into()),
                ..pred(&entry.id)
            });
        });
        let (status, headers, json, _) =
            call(&f.state, upload_req("/v1/images?id=w3&wait=true", b"abc")).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{json}");
        assert_eq!(
            (json["status"].as_str(), json["error"].as_str()),
            (Some("quarantined"), Some("w3: not an image"))
        );
        assert_eq!(json["quarantined"], "/q/w3");
        assert!(
            headers.get(header::CONNECTION).is_none(),
            "the body was read: the connection stays usable"
        );
        engine.await.unwrap();
    }

    #[test]
    fn upload_source_keeps_the_file_name_only() {
        assert_eq!(upload_source(""), "http");
        assert_eq!(upload_source("  "), "http");
        assert_eq!(upload_source("IMG_1.jpg"), "http:IMG_1.jpg");
        assert_eq!(upload_source("../../etc/passwd"), "http:passwd");
        assert_eq!(upload_source("C:\\cam\\a b.png"), "http:a b.png");
        assert_eq!(upload_source("dir/"), "http");
        let long = format!("{}.jpg", "é".repeat(300));
        let kept = upload_source(&long);
        assert!(
            kept.len() <= SOURCE.len() + 1 + MAX_NAME_BYTES && kept.starts_with("http:é"),
            "{kept}"
        );
    }

    /// Sends raw HTTP/1.1 requests one after the other on ONE keep-alive connection; returns
    /// each answer's head (lower case) and body, or the I/O error that ended the connection.
    fn on_one_connection(
        addr: std::net::SocketAddr,
        requests: Vec<Vec<u8>>,
    ) -> Vec<Result<(String, String), String>> {
        use std::io::{BufRead, BufReader, Read, Write};
        let conn = std::net::TcpStream::connect(addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut writer = conn;
        let mut out = Vec::new();
        for req in requests {
            let answer = (|| -> std::io::Result<(String, String)> {
                writer.write_all(&req)?;
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line)? == 0 {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "closed",
                        ));
                    }
                    if line == "\r\n" {
                        break;
                    }
                    head.push_str(&line.to_ascii_lowercase());
                }
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                let mut body = vec![0u8; len];
                reader.read_exact(&mut body)?;
                Ok((head, String::from_utf8_lossy(&body).into_owned()))
            })();
            let stop = answer.is_err();
            out.push(answer.map_err(|e| e.to_string()));
            if stop {
                break;
            }
        }
        out
    }

    #[tokio::test]
    async fn oversized_declared_bodies_get_413_at_once_stalled_ones_408_and_404_405_close() {
        let cfg = HttpConfig {
            max_body_bytes: 1000,
            body_idle_timeout_ms: 300,
            ..HttpConfig::default()
        };
        let f = fixture(cfg, None, 8);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(listener, f.state.clone(), shutdown.clone()));
        let head = |method: &str, path: &str, len: u64| {
            format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n")
                .into_bytes()
        };
        let health = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        let t0 = std::time::Instant::now();
        let answers = tokio::task::spawn_blocking({
            let big = head("POST", "/v1/images?id=big", 99_999_999_999);
            move || on_one_connection(addr, vec![big])
        })
        .await
        .unwrap();
        let (h, b) = answers[0].as_ref().unwrap();
        assert!(
            h.starts_with("http/1.1 413")
                && h.contains("connection: close")
                && b.contains("99999999999"),
            "{h}{b}"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "answered before any body was sent"
        );
        // Half a body, then nothing: 408 after body_idle_timeout_ms, nothing spooled.
        let mut stalled = head("POST", "/v1/images?id=slow", 500);
        stalled.extend_from_slice(&[1u8; 100]);
        let answers = tokio::task::spawn_blocking(move || on_one_connection(addr, vec![stalled]))
            .await
            .unwrap();
        let (h, _) = answers[0].as_ref().unwrap();
        assert!(
            h.starts_with("http/1.1 408") && h.contains("connection: close"),
            "{h}"
        );
        assert!(!f.state.spool.contains("slow"));
        // Slow but steady (the whole body takes three idle timeouts, no pause is one): accepted.
        let steady = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut conn = std::net::TcpStream::connect(addr).unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            conn.write_all(b"POST /v1/images?id=steady HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 500\r\n\r\n").unwrap();
            for _ in 0..10 {
                std::thread::sleep(Duration::from_millis(100));
                conn.write_all(&[5u8; 50]).unwrap();
            }
            let mut answer = String::new();
            conn.read_to_string(&mut answer).unwrap();
            answer
        })
        .await
        .unwrap();
        assert!(steady.starts_with("HTTP/1.1 202"), "{steady}");
        assert!(f.state.spool.contains("steady"));
        // Wrong method or path with a body: closed, and said so.
        for (method, path) in [
            ("PUT", "/v1/images"),
            ("POST", "/v1/predictions/x"),
            ("POST", "/nowhere"),
        ] {
            let mut req = head(method, path, 10);
            req.extend_from_slice(b"0123456789");
            let answers = tokio::task::spawn_blocking({
                let health = health.clone();
                move || on_one_connection(addr, vec![req, health])
            })
            .await
            .unwrap();
            let (h, _) = answers[0].as_ref().unwrap();
            assert!(
                (h.starts_with("http/1.1 405") || h.starts_with("http/1.1 404"))
                    && h.contains("connection: close"),
                "{method} {path}: {h}"
            );
        }
        // A GET that is refused carries no body: its connection stays open.
        let answers = tokio::task::spawn_blocking({
            let health = health.clone();
            move || {
                on_one_connection(
                    addr,
                    vec![
                        b"GET /v1/predictions/nope HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
                        health,
                    ],
                )
            }
        })
        .await
        .unwrap();
        assert!(
            answers.len() == 2
                && answers[1]
                    .as_ref()
                    .is_ok_and(|(h, _)| h.starts_with("http/1.1 200")),
            "{answers:?}"
        );
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_half_sent_request_head_is_dropped_after_header_timeout_ms() {
        let f = fixture(
            HttpConfig {
                header_timeout_ms: 300,
                ..HttpConfig::default()
            },
            None,
            8,
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(listener, f.state.clone(), shutdown.clone()));
        let (took, got) = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut conn = std::net::TcpStream::connect(addr).unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let t0 = std::time::Instant::now();
            conn.write_all(b"POST /v1/images?id=half HTTP/1.1\r\nHost: x\r\nContent-Le")
                .unwrap();
            let mut buf = Vec::new();
            let r = conn.read_to_end(&mut buf);
            (
                t0.elapsed(),
                r.map(|_| String::from_utf8_lossy(&buf).into_owned())
                    .map_err(|e| e.kind()),
            )
        })
        .await
        .unwrap();
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(5),
            "closed after {took:?}: {got:?}"
        );
        assert!(
            got.as_ref().map_or(true, |text| !text.contains("202")),
            "{got:?}"
        );
        // Normal requests are served meanwhile, and say how long an idle connection is kept.
        let (status, headers, _, _) = call(&f.state, get_req("/healthz")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["keep-alive"], "timeout=1");
        let f75 = fixture(HttpConfig::default(), None, 8);
        let (_, headers, _, _) = call(&f75.state, upload_req("/v1/images?id=k", b"abc")).await;
        assert_eq!(headers["keep-alive"], "timeout=75");
        // A refusal that closes the connection does not announce a keep-alive.
        let (status, headers, _, _) =
            call(&f75.state, upload_req("/v1/images?id=.bad", b"abc")).await;
        assert_eq!(
            (status, headers.get("keep-alive")),
            (StatusCode::BAD_REQUEST, None)
        );
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_503_keeps_the_keep_alive_connection_usable_and_other_refusals_close_it() {
        let f = fixture(
            HttpConfig {
                max_body_bytes: 300_000,
                ..HttpConfig::default()
            },
            Some("tok"),
            1,
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(listener, f.state.clone(), shutdown.clone()));
        let post = |id: &str, len: usize| {
            let mut r = format!("POST /v1/images?id={id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\nContent-Length: {len}\r\n\r\n").into_bytes();
            r.extend(std::iter::repeat_n(7u8, len));
            r
        };
        let health = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        // The first fills the one-image queue; the second is refused (503) before its body is
        // read; the health check after it must still be answered on the same connection.
        let requests = vec![post("first", 10), post("second", 200_000), health.clone()];
        let answers = tokio::task::spawn_blocking(move || on_one_connection(addr, requests))
            .await
            .unwrap();
        assert_eq!(answers.len(), 3, "{answers:?}");
        let (h0, _) = answers[0].as_ref().unwrap();
        assert!(h0.starts_with("http/1.1 202"), "{h0}");
        let (h1, b1) = answers[1].as_ref().unwrap();
        assert!(
            h1.starts_with("http/1.1 503") && h1.contains("retry-after: 1") && b1.contains("busy"),
            "{h1}{b1}"
        );
        assert!(!h1.contains("connection: close"), "{h1}");
        let (h2, b2) = answers[2]
            .as_ref()
            .unwrap_or_else(|e| panic!("the connection broke after the 503: {e}"));
        assert!(h2.starts_with("http/1.1 200") && b2 == "ok", "{h2}{b2}");
        assert!(
            !f.state.spool.contains("second"),
            "refused: nothing spooled"
        );

        // A refusal whose body is not read (wrong token; a body too large to drain) says
        // `Connection: close`, so the client does not write its next request into a dead socket.
        let bad_token = b"POST /v1/images?id=x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope\r\nContent-Length: 5\r\n\r\nhello".to_vec();
        let answers = tokio::task::spawn_blocking(move || on_one_connection(addr, vec![bad_token]))
            .await
            .unwrap();
        let (h, _) = answers[0].as_ref().unwrap();
        assert!(
            h.starts_with("http/1.1 401") && h.contains("connection: close"),
            "{h}"
        );
        let huge = b"POST /v1/images?id=y HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\nContent-Length: 900000\r\n\r\n".to_vec();
        let answers = tokio::task::spawn_blocking(move || on_one_connection(addr, vec![huge]))
            .await
            .unwrap();
        let (h, _) = answers[0].as_ref().unwrap();
        assert!(
            h.starts_with("http/1.1 503") && h.contains("connection: close"),
            "{h}"
        );
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn predictions_are_known_pending_or_unknown() {
        let f = fixture(HttpConfig::default(), None, 8);
        let (status, _, json, _) = call(&f.state, get_req("/v1/predictions/p1")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(json, json!({"id": "p1", "status": "unknown"}));
        assert_eq!(
            call(&f.state, upload_req("/v1/images?id=p1", b"abc"))
                .await
                .0,
            StatusCode::ACCEPTED
        );
        let (status, _, json, _) = call(&f.state, get_req("/v1/predictions/p1")).await;
        assert_eq!(
            (status, json["status"].as_str()),
            (StatusCode::ACCEPTED, Some("pending"))
        );
        f.state.results.publish(pred("p1"));
        let (status, _, json, _) = call(&f.state, get_req("/v1/predictions/p1")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            serde_json::from_value::<ServedPrediction>(json).unwrap(),
            pred("p1")
        );
    }

    #[tokio::test]
    async fn health_and_readiness() {
        let f = fixture(HttpConfig::default(), None, 8);
        let (status, _, _, text) = call(&f.state, get_req("/healthz")).await;
        assert_eq!((status, text.as_str()), (StatusCode::OK, "ok"));
        assert_eq!(call(&f.state, get_req("/readyz")).await.0, StatusCode::OK);
        f.state.ready.store(false, Ordering::SeqCst);
        assert_eq!(
            call(&f.state, get_req("/readyz")).await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        f.state.ready.store(true, Ordering::SeqCst);
        f.state.accepting.store(false, Ordering::SeqCst);
        assert_eq!(
            call(&f.state, get_req("/readyz")).await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        // Draining: uploads are refused with Retry-After.
        let (status, headers, _, _) = call(&f.state, upload_req("/v1/images?id=d", b"abc")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(headers.contains_key(header::RETRY_AFTER));
        assert!(!f.state.spool.contains("d") && f.rx.is_empty());
        f.state.accepting.store(true, Ordering::SeqCst);
        assert_eq!(call(&f.state, get_req("/readyz")).await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn metrics_render_prometheus_text() {
        let f = fixture(HttpConfig::default(), None, 8);
        assert_eq!(
            call(&f.state, get_req("/metrics")).await.0,
            StatusCode::NOT_FOUND
        );

        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::counter!(STAGE_RECEIVED, "stage" => "http").increment(3);
        });
        let state = Arc::new(HttpState {
            spool: f.state.spool.clone(),
            ingest: f.state.ingest.clone(),
            results: f.state.results.clone(),
            cfg: f.state.cfg.clone(),
            token: Some("t".into()),
            ready: f.state.ready.clone(),
            accepting: f.state.accepting.clone(),
            metrics: Some(handle),
        });
        let (status, headers, _, text) = call(&state, get_req("/metrics")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], "text/plain; version=0.0.4");
        assert!(
            text.contains("plankton_stage_received_total{stage=\"http\"} 3"),
            "{text}"
        );
    }

    const BOUNDARY: &str = "XyZ-boundary-42";

    /// A `multipart/form-data` body: (field name, filename, bytes) per part.
    fn multipart_body(parts: &[(Option<&str>, Option<&str>, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for (name, file, bytes) in parts {
            body.extend_from_slice(
                format!("--{BOUNDARY}\r\nContent-Disposition: form-data").as_bytes(),
            );
            if let Some(n) = name {
                body.extend_from_slice(format!("; name=\"{n}\"").as_bytes());
            }
            if let Some(f) = file {
                body.extend_from_slice(format!("; filename=\"{f}\"").as_bytes());
            }
            body.extend_from_slice(b"\r\nContent-Type: application/octet-stream\r\n\r\n");
            body.extend_from_slice(bytes);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
        body
    }

    fn multipart_req(uri: &str, body: Vec<u8>) -> Request {
        post_req(uri)
            .header(
                header::CONTENT_TYPE,
                format!("multipart/form-data; boundary={BOUNDARY}"),
            )
            .body(Body::from(body))
            .unwrap()
    }

    #[tokio::test]
    async fn multipart_spools_each_part_and_rejects_empty_ones_alone() {
        let f = fixture(HttpConfig::default(), None, 8);
        let body = multipart_body(&[
            (Some("mp-1"), Some("a.jpg"), b"aaa"),
            (Some("file"), Some("b.jpg"), b"bbb"),
            (Some("file"), Some("c.jpg"), b"ccc"),
            (Some("../x"), Some("d.jpg"), b"ddd"),
            (Some("mp-empty"), Some("e.jpg"), b""),
            (None, None, b"fff"),
        ]);
        let (status, _, json, text) = call(&f.state, multipart_req("/v1/images", body)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{text}");
        let images = json["images"].as_array().unwrap();
        assert_eq!(images.len(), 6, "{json}");
        let ids: Vec<&str> = images.iter().map(|e| e["id"].as_str().unwrap()).collect();
        // A valid, unshared field name is the id; shared or invalid names get fresh ids.
        assert_eq!(ids[0], "mp-1");
        assert_eq!(ids[4], "mp-empty");
        for id in [ids[1], ids[2], ids[3], ids[5]] {
            assert!(
                !["file", "../x"].contains(&id) && spool::sanitize_id(id).is_ok(),
                "{id}"
            );
        }
        assert_eq!(
            ids.iter().collect::<std::collections::HashSet<_>>().len(),
            6
        );
        let names: Vec<&str> = images.iter().map(|e| e["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", ""]);
        for (i, e) in images.iter().enumerate() {
            if i == 4 {
                assert_eq!(e["status"], "rejected", "{e}");
                assert!(e["error"].as_str().unwrap().contains("empty"), "{e}");
                assert!(!f.state.spool.contains(ids[i]));
            } else {
                assert_eq!(e["status"], "accepted", "{e}");
                assert!(e.get("error").is_none(), "{e}");
            }
        }
        // Spooled and queued in part order, bytes and names as sent.
        for (i, want) in [
            (0, b"aaa"),
            (1, b"bbb"),
            (2, b"ccc"),
            (3, b"ddd"),
            (5, b"fff"),
        ] {
            let entry = f.rx.try_recv().unwrap();
            assert_eq!(
                (entry.id.as_str(), entry.source.clone()),
                (ids[i], upload_source(names[i]))
            );
            assert_eq!(entry.original_name, names[i]);
            assert_eq!(std::fs::read(&entry.bytes_path).unwrap(), want);
            assert!(f.state.spool.contains(ids[i]));
        }
        assert!(f.rx.is_empty());

        // The same id again while pending: accepted as a duplicate, not queued twice.
        let body = multipart_body(&[(Some("mp-1"), Some("a.jpg"), b"aaa")]);
        let (status, _, json, _) = call(&f.state, multipart_req("/v1/images", body)).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert_eq!(
            json,
            json!({"images": [{"id": "mp-1", "name": "a.jpg", "status": "accepted", "duplicate": true}]})
        );
        assert!(f.rx.is_empty());
        // Other bytes under it: that part is rejected (409 when no part is accepted).
        let body = multipart_body(&[(Some("mp-1"), Some("a.jpg"), b"other")]);
        let (status, _, json, _) = call(&f.state, multipart_req("/v1/images", body)).await;
        assert_eq!(status, StatusCode::CONFLICT, "{json}");
        assert_eq!(json["images"][0]["status"], "rejected");
        assert!(f.rx.is_empty());

        // Nothing acceptable: 400 with the list; no parts at all: 400.
        let body = multipart_body(&[(Some("z"), Some("z.jpg"), b"")]);
        let (status, _, json, _) = call(&f.state, multipart_req("/v1/images", body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{json}");
        assert_eq!(json["images"][0]["status"], "rejected");
        let (status, _, _, _) =
            call(&f.state, multipart_req("/v1/images", multipart_body(&[]))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(f.rx.is_empty() && !f.state.spool.contains("z"));
    }

    #[tokio::test]
    async fn multipart_refuses_bad_requests_and_spools_nothing() {
        let cfg = HttpConfig {
            max_body_bytes: 400,
            ..HttpConfig::default()
        };
        let f = fixture(cfg, Some("tok"), 8);
        let before = files_under(&f.spool_dir);
        let one = || multipart_body(&[(Some("q1"), Some("a.jpg"), b"aaa")]);
        let authed = |uri: &str, body: Vec<u8>| {
            let mut r = multipart_req(uri, body);
            r.headers_mut().insert(
                header::AUTHORIZATION,
                HeaderValue::from_static("Bearer tok"),
            );
            r
        };
        // No token.
        assert_eq!(
            call(&f.state, multipart_req("/v1/images", one())).await.0,
            StatusCode::UNAUTHORIZED
        );
        // Single-upload parameters.
        for uri in [
            "/v1/images?id=x",
            "/v1/images?name=n",
            "/v1/images?wait=true",
        ] {
            let (status, _, json, _) = call(&f.state, authed(uri, one())).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {json}");
        }
        let mut r = authed("/v1/images", one());
        r.headers_mut()
            .insert(ID_HEADER, HeaderValue::from_static("x"));
        assert_eq!(call(&f.state, r).await.0, StatusCode::BAD_REQUEST);
        // Malformed: no closing boundary.
        let mut cut = one();
        cut.truncate(cut.len() - 10);
        let (status, _, json, _) = call(&f.state, authed("/v1/images", cut)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{json}");
        // The whole body over max_body_bytes, though each part is small: 413, none spooled.
        let big = multipart_body(&[
            (Some("q2"), Some("a.jpg"), &[1u8; 150]),
            (Some("q3"), Some("b.jpg"), &[2u8; 150]),
            (Some("q4"), Some("c.jpg"), &[3u8; 150]),
        ]);
        let (status, _, json, _) = call(&f.state, authed("/v1/images", big)).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{json}");
        assert!(f.rx.is_empty());
        assert_eq!(files_under(&f.spool_dir), before);
        // A raw body that merely mentions multipart elsewhere is still one image.
        let r = post_req("/v1/images?id=raw")
            .header(header::AUTHORIZATION, "Bearer tok")
            .header(header::CONTENT_TYPE, "image/jpeg")
            .body(Body::from("abc"))
            .unwrap();
        assert_eq!(call(&f.state, r).await.0, StatusCode::ACCEPTED);
        assert_eq!(f.rx.try_recv().unwrap().id, "raw");
    }

    #[tokio::test]
    async fn multipart_under_reject_needs_room_for_every_part() {
        let cfg = HttpConfig {
            retry_after_seconds: 5,
            ..HttpConfig::default()
        };
        let f = fixture(cfg, None, 3);
        assert_eq!(
            call(&f.state, upload_req("/v1/images?id=first", b"abc"))
                .await
                .0,
            StatusCode::ACCEPTED
        );
        let before = files_under(&f.spool_dir);
        let three = || {
            multipart_body(&[
                (Some("r1"), None, b"1"),
                (Some("r2"), None, b"2"),
                (Some("r3"), None, b"3"),
            ])
        };
        // Room for two, three sent: 503, none spooled.
        let (status, headers, json, _) = call(&f.state, multipart_req("/v1/images", three())).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{json}");
        assert_eq!(headers[header::RETRY_AFTER], "5");
        assert_eq!(
            headers[header::CONNECTION],
            "keep-alive",
            "the body was read: the retry may use this connection"
        );
        assert_eq!(json["status"], "busy");
        assert_eq!(files_under(&f.spool_dir), before);
        assert_eq!(f.rx.len(), 1);
        // More than the queue ever holds: 413 (retrying cannot help).
        let four = multipart_body(&[
            (None, None, b"1"),
            (None, None, b"2"),
            (None, None, b"3"),
            (None, None, b"4"),
        ]);
        let (status, _, json, _) = call(&f.state, multipart_req("/v1/images", four)).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{json}");
        assert_eq!(json["reason"], "too_many_parts");
        assert_eq!(files_under(&f.spool_dir), before);
        // Room again: all three accepted.
        assert_eq!(f.rx.try_recv().unwrap().id, "first");
        let (status, _, json, _) = call(&f.state, multipart_req("/v1/images", three())).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{json}");
        assert_eq!(f.rx.len(), 3);
    }

    #[test]
    fn part_ids_take_unique_valid_names_only() {
        let names = [
            Some("a"),
            Some("file"),
            None,
            Some("file"),
            Some("b/c"),
            Some("d"),
        ];
        let ids = part_ids(names.iter().copied());
        assert_eq!(ids[0], "a");
        assert_eq!(ids[5], "d");
        for id in &ids[1..5] {
            assert!(!["file", "b/c", "a", "d"].contains(&id.as_str()));
            assert!(spool::sanitize_id(id).is_ok(), "{id}");
        }
        assert!(is_multipart(&HeaderMap::from_iter([(
            header::CONTENT_TYPE,
            HeaderValue::from_static("Multipart/Form-Data ; boundary=x"),
        )])));
        for ct in [
            "image/jpeg",
            "multipart/mixed; boundary=x",
            "application/octet-stream",
        ] {
            let h = HeaderMap::from_iter([(header::CONTENT_TYPE, HeaderValue::from_static(ct))]);
            assert!(!is_multipart(&h), "{ct}");
        }
        assert!(!is_multipart(&HeaderMap::new()));
    }

    #[tokio::test]
    async fn serve_answers_over_tcp_and_stops_on_cancel() {
        let f = fixture(HttpConfig::default(), None, 8);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(listener, f.state.clone(), shutdown.clone()));
        // Plain std I/O on a blocking thread (tokio's io-util is not enabled).
        let answer = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut conn = std::net::TcpStream::connect(addr).unwrap();
            conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut answer = String::new();
            conn.read_to_string(&mut answer).unwrap();
            answer
        })
        .await
        .unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"),
            "{answer}"
        );
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}
