//! The HTTP source and the daemon's operational endpoints.
//!
//! `POST /v1/images` spools the body (durably, fsynced) before it answers 202, so an
//! acknowledged image survives a crash; `?wait=true` then waits for its prediction.
//! `GET /v1/predictions/{id}` reports a recent result, `GET /metrics` the Prometheus text,
//! `GET /healthz` liveness and `GET /readyz` readiness (model loaded, not draining).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query, Request, State};
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

/// The `source` recorded in the spool for uploads.
pub const SOURCE: &str = "http";
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
        .with_state(state)
}

/// Beyond `sync_timeout_ms`, how long requests in flight at shutdown may still take.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Serves until `shutdown` is cancelled, then finishes the requests in flight (graceful) for at
/// most `sync_timeout_ms` + [`SHUTDOWN_GRACE`]: a client that stalls mid-upload must not keep
/// the daemon from stopping (its image was never spooled nor acknowledged).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<HttpState>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let grace = Duration::from_millis(state.cfg.sync_timeout_ms) + SHUTDOWN_GRACE;
    let stop = shutdown.clone();
    let server = std::future::IntoFuture::into_future(
        axum::serve(listener, router(state))
            .with_graceful_shutdown(async move { shutdown.cancelled().await }),
    );
    tokio::select! {
        r = server => r,
        _ = async { stop.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(grace_ms = grace.as_millis() as u64, "http: requests still in flight after the shutdown grace period are dropped");
            Ok(())
        }
    }
}

#[derive(Debug, Deserialize)]
struct UploadQuery {
    id: Option<String>,
    name: Option<String>,
    #[serde(default)]
    wait: bool,
}

/// A refused request: counted under `STAGE_ERRORS{stage="http",reason}` and answered as JSON.
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

    // The id: `?id=` or `X-Image-Id`, validated (never silently altered), else a fresh one.
    let header_id = match headers.get(ID_HEADER).map(|v| v.to_str()) {
        None => None,
        Some(Ok(v)) => Some(v.to_string()),
        Some(Err(_)) => {
            return reject(
                StatusCode::BAD_REQUEST,
                "bad_id",
                "X-Image-Id is not visible ASCII",
            )
        }
    };
    let raw_id = match (query.id, header_id) {
        (Some(q), Some(h)) if q != h => {
            return reject(
                StatusCode::BAD_REQUEST,
                "bad_id",
                format!("?id={q:?} and X-Image-Id {h:?} disagree"),
            )
        }
        (Some(q), _) => Some(q),
        (None, h) => h,
    };
    let id = match raw_id {
        Some(raw) => match spool::sanitize_id(&raw) {
            Ok(id) => id,
            Err(e) => return reject(StatusCode::BAD_REQUEST, "bad_id", e.to_string()),
        },
        None => spool::new_id(),
    };
    let name = query.name.unwrap_or_default();
    if name.chars().any(char::is_control) {
        return reject(
            StatusCode::BAD_REQUEST,
            "bad_name",
            "?name= must not contain control characters",
        );
    }

    // Room first: under `reject`, a full queue refuses before the body is read or spooled.
    if state.ingest.is_closed() {
        metrics::counter!(STAGE_ERRORS, "stage" => "http", "reason" => "draining").increment(1);
        return unavailable(&state.cfg, "draining", "the pipeline is shutting down");
    }
    if state.cfg.backpressure == Backpressure::Reject && state.ingest.is_full() {
        metrics::counter!(STAGE_DROPPED, "stage" => "http").increment(1);
        return unavailable(&state.cfg, "busy", "ingest queue full: retry later");
    }

    let bytes = match Bytes::from_request(request, &()).await {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return reject(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!(
                    "body larger than http.max_body_bytes = {}",
                    state.cfg.max_body_bytes
                ),
            )
        }
        Err(e) => return reject(e.status(), "body", e.body_text()),
    };
    if bytes.is_empty() {
        return reject(
            StatusCode::BAD_REQUEST,
            "empty_body",
            "empty body: send the image bytes",
        );
    }

    // Durable before acknowledged: the spool fsyncs, so it runs off the async workers.
    let spool = state.spool.clone();
    let (accept_id, accept_name) = (id.clone(), name.clone());
    let spooled = tokio::task::spawn_blocking(move || {
        let already = spool.contains(&accept_id);
        spool
            .accept(&accept_id, SOURCE, &accept_name, &bytes)
            .map(|entry| (entry, already))
    })
    .await;
    let (entry, duplicate) = match spooled {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            tracing::error!(id = %id, error = %e, "cannot spool an upload");
            return reject(
                StatusCode::INTERNAL_SERVER_ERROR,
                "spool",
                format!("cannot spool the image: {e}"),
            );
        }
        Err(e) => {
            tracing::error!(id = %id, error = %e, "spool task failed");
            return reject(
                StatusCode::INTERNAL_SERVER_ERROR,
                "spool",
                "cannot spool the image",
            );
        }
    };
    metrics::counter!(STAGE_RECEIVED, "stage" => "http").increment(1);

    // An id already pending is already on its way through the pipeline: not a second time.
    if !duplicate {
        if let Err(e) = state.ingest.send(entry).await {
            // Spooled, so it is safe: the next start picks it up from the spool.
            tracing::warn!(id = %e.0.id, "ingest queue closed; the image stays in the spool for the next start");
        }
    }

    let accepted = || {
        let mut body = json!({ "id": id, "status": "accepted" });
        if duplicate {
            body["duplicate"] = json!(true);
        }
        (StatusCode::ACCEPTED, Json(body)).into_response()
    };
    if !query.wait {
        return accepted();
    }
    match state
        .results
        .wait(&id, Duration::from_millis(state.cfg.sync_timeout_ms))
        .await
    {
        Some(p) => (StatusCode::OK, Json(p)).into_response(),
        None => (
            StatusCode::ACCEPTED,
            Json(json!({ "id": id, "status": "pending" })),
        )
            .into_response(),
    }
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
            model_id: "model-1".into(),
            predicted_class: Some("copepod".into()),
            confidence: Some(0.75),
            top_classes: vec!["copepod".into(), "diatom".into()],
            top_probabilities: vec![0.75, 0.25],
            error: None,
            received_unix_ms: 5,
            latency_ms: 1.5,
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
            ("img-1", "http", "a b.jpg")
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
            (status, json["status"].as_str()),
            (StatusCode::ACCEPTED, Some("accepted"))
        );
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
            results.publish(pred(&entry.id));
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
