//! `[nats]`: the daemon as one member of a JetStream consumer group. Every daemon of the group
//! pulls from one durable consumer; JetStream hands each message to one of them.
//!
//! A message's life here: pulled -> its image spooled (with the delivery's reply subject) ->
//! the usual pipeline -> its row in a finished Parquet file -> acked (`+ACK`, or `+TERM` for an
//! image refused as bad input, whose error row is written: it is never redelivered). Until
//! then the daemon keeps it alive with in-progress acks (`+WPI`), so a file that stays open for
//! `output.roll_seconds` does not make JetStream hand its images to another daemon. A daemon
//! that dies sends nothing more: after `ack_wait_seconds` its unacked messages go to the others
//! (at-least-once; the rows carry `stream_seq`, so a duplicate is visible, and
//! `plankton compact` keeps one row per image). Restarted, it predicts what its spool still
//! holds and acks those deliveries by their kept reply subjects.
//!
//! Backpressure is the stream's: the daemon pulls only while its ingest queue has room, and the
//! consumer's `max_ack_pending` bounds what the group holds; the rest of a backlog stays in
//! JetStream.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, AckKind};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{self as nats_link, NatsError};
use crate::serve::config::NatsConfig;
use crate::serve::engine::Settled;
use crate::serve::results::ServedPrediction;
use crate::serve::spool::{self, Delivery, EntryKey, Spool, SpoolEntry, SpoolError};

pub const RECEIVED: &str = "plankton_nats_received_total";
pub const REDELIVERED: &str = "plankton_nats_redelivered_total";
pub const ACKED: &str = "plankton_nats_acked_total";
pub const TERMINATED: &str = "plankton_nats_terminated_total";
pub const NAKED: &str = "plankton_nats_naked_total";
pub const HELD: &str = "plankton_nats_held_messages";
pub const CONSUMER_PENDING: &str = "plankton_nats_consumer_pending_messages";
pub const CONSUMER_ACK_PENDING: &str = "plankton_nats_consumer_ack_pending_messages";
pub const CONSUMER_REDELIVERED: &str = "plankton_nats_consumer_redelivered_messages";
pub const PRESSURE_ROLLS: &str = "plankton_nats_pressure_rolls_total";

/// The share of the consumer's `max_ack_pending` held by the group at which a daemon finishes
/// its open file early (its messages are acked only then; at the cap JetStream delivers nothing
/// more, and the group would wait for `roll_seconds`).
const PRESSURE: f64 = 0.5;

/// The longest file a `Plankton-Ref` may name (the decoder refuses larger images anyway).
const MAX_REFERENCE_BYTES: u64 = 256 << 20;
/// How long a message is left before JetStream offers it again when this daemon cannot take it
/// now (its id is pending with other bytes, or the spool's disk is full).
const RETRY_DELAY: Duration = Duration::from_secs(5);

pub fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_counter!(RECEIVED, "JetStream deliveries this daemon took");
    describe_counter!(
        REDELIVERED,
        "Deliveries that were not a message's first (another daemon died, or an ack was lost)"
    );
    describe_counter!(
        ACKED,
        "Messages acked once their row was in a finished file"
    );
    describe_counter!(
        TERMINATED,
        "Messages terminated (bad input: their error row is written, they are not redelivered)"
    );
    describe_counter!(
        NAKED,
        "Messages handed back for later (id pending with other bytes, spool disk full)"
    );
    describe_gauge!(
        HELD,
        "Messages this daemon holds between delivery and a finished file"
    );
    describe_gauge!(
        CONSUMER_PENDING,
        "Messages of the stream not yet delivered to the consumer group (the backlog)"
    );
    describe_gauge!(
        CONSUMER_ACK_PENDING,
        "Messages delivered to the group and not yet acked"
    );
    describe_gauge!(
        CONSUMER_REDELIVERED,
        "Messages the consumer is redelivering now"
    );
    describe_counter!(
        nats_link::RECONNECTS,
        "Times the connection to NATS was lost (the client reconnects)"
    );
    describe_gauge!(nats_link::CONNECTED, "1 while connected to a NATS server");
    describe_counter!(
        PRESSURE_ROLLS,
        "Files finished before roll_seconds because the consumer group neared max_ack_pending"
    );
}

/// The reply subjects of the deliveries this daemon holds, by spool entry (a message
/// redelivered to this daemon while its first delivery is still in the pipeline adds a second).
#[derive(Default)]
struct Held(Mutex<HashMap<EntryKey, Vec<String>>>);

impl Held {
    /// Holds `reply` for `key`; true when `key` was not held yet (its entry must go down the
    /// pipeline; otherwise it already is).
    fn hold(&self, key: EntryKey, reply: String) -> bool {
        let mut held = self.0.lock().expect("held");
        let new = !held.contains_key(&key);
        let replies = held.entry(key).or_default();
        if !replies.contains(&reply) {
            replies.push(reply);
        }
        metrics::gauge!(HELD).set(held.len() as f64);
        new
    }

    fn release(&self, key: &EntryKey) -> Vec<String> {
        let mut held = self.0.lock().expect("held");
        let replies = held.remove(key).unwrap_or_default();
        metrics::gauge!(HELD).set(held.len() as f64);
        replies
    }

    fn is_empty(&self) -> bool {
        self.0.lock().expect("held").is_empty()
    }

    fn replies(&self) -> Vec<String> {
        let held = self.0.lock().expect("held");
        held.values().flatten().cloned().collect()
    }
}

/// The daemon's link to its consumer group.
pub struct NatsInput {
    client: async_nats::Client,
    cfg: NatsConfig,
    held: Held,
    roll_now: Arc<AtomicBool>,
}

impl NatsInput {
    /// Connects (in the background: a daemon may start before its server; JetStream calls are
    /// retried until it answers).
    pub async fn start(cfg: &NatsConfig, daemon: &str) -> Result<Arc<NatsInput>, NatsError> {
        describe();
        let client = nats_link::connect(cfg, daemon, false).await?;
        Ok(Arc::new(NatsInput {
            client,
            cfg: cfg.clone(),
            held: Held::default(),
            roll_now: Arc::default(),
        }))
    }

    /// The flag this source sets when the group nears `max_ack_pending` (the engine's
    /// `roll_now`).
    pub fn roll_signal(&self) -> Arc<AtomicBool> {
        self.roll_now.clone()
    }

    /// Spool entries of an earlier run that came as messages: their deliveries are acked (by
    /// their kept reply subjects) once their rows are written.
    pub fn restore(&self, entries: &[SpoolEntry]) {
        for e in entries {
            if let Some(d) = &e.delivery {
                self.held.hold(e.key(), d.reply.clone());
            }
        }
    }

    async fn consumer(
        &self,
        js: &jetstream::Context,
    ) -> Result<jetstream::consumer::PullConsumer, NatsError> {
        let stream = nats_link::stream(js, &self.cfg).await?;
        let config = pull::Config {
            durable_name: Some(self.cfg.consumer.clone()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(self.cfg.ack_wait_seconds),
            max_ack_pending: self.cfg.max_ack_pending as i64,
            max_deliver: self.cfg.max_deliver,
            filter_subject: self.cfg.filter_subject.clone(),
            ..Default::default()
        };
        stream
            .get_or_create_consumer(&self.cfg.consumer, config)
            .await
            .map_err(|e| NatsError::Consumer {
                stream: self.cfg.stream.clone(),
                consumer: self.cfg.consumer.clone(),
                message: e.to_string(),
            })
    }

    /// The source: pulls messages while the ingest queue has room, until `stop`. Returns the
    /// deliveries taken.
    pub async fn pull(
        self: Arc<Self>,
        spool: Arc<Spool>,
        quarantine: PathBuf,
        tx: async_channel::Sender<SpoolEntry>,
        stop: CancellationToken,
    ) -> Result<u64, String> {
        let js = jetstream::new(self.client.clone());
        let mut taken = 0u64;
        let mut announced = false;
        'connect: loop {
            let consumer = loop {
                let attempt = tokio::select! {
                    _ = stop.cancelled() => return Ok(taken),
                    r = self.consumer(&js) => r,
                };
                match attempt {
                    Ok(c) => break c,
                    Err(e) => {
                        tracing::warn!(error = %e, "nats: consumer not ready; retrying");
                        if pause(&stop, Duration::from_secs(2)).await {
                            return Ok(taken);
                        }
                    }
                }
            };
            if !announced {
                announced = true;
                tracing::info!(stream = %self.cfg.stream, consumer = %self.cfg.consumer, "nats: consuming");
            }
            let messages = consumer
                .stream()
                .max_messages_per_batch(self.cfg.batch)
                // Short-lived pull requests: after a stop, the server stops delivering to this
                // daemon within seconds.
                .heartbeat(Duration::from_secs(2))
                .expires(Duration::from_secs(5))
                .messages()
                .await;
            let mut messages = match messages {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "nats: cannot pull; retrying");
                    if pause(&stop, Duration::from_secs(2)).await {
                        return Ok(taken);
                    }
                    continue 'connect;
                }
            };
            loop {
                let next = tokio::select! {
                    _ = stop.cancelled() => {
                        self.hand_back_buffered(&mut messages).await;
                        return Ok(taken);
                    }
                    m = messages.next() => m,
                };
                match next {
                    None => continue 'connect,
                    // Missed heartbeats while the server restarts, and the like: the pull
                    // stream carries on by itself.
                    Some(Err(e)) => tracing::debug!(error = %e, "nats: pull"),
                    Some(Ok(message)) => {
                        taken += 1;
                        if let Some(entry) = self.take(message, &spool, &quarantine).await {
                            let key = entry.key();
                            tokio::select! {
                                r = tx.send(entry) => if r.is_err() { return Ok(taken) },
                                _ = stop.cancelled() => {
                                    // Not in the pipeline yet: handed back for another daemon
                                    // now, and out of the spool (no second row later).
                                    self.hand_back(&spool, key).await;
                                    self.hand_back_buffered(&mut messages).await;
                                    return Ok(taken);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Spools one delivery; the entry to send down the pipeline, if it is not there already.
    async fn take(
        &self,
        message: jetstream::Message,
        spool: &Arc<Spool>,
        quarantine: &Path,
    ) -> Option<SpoolEntry> {
        metrics::counter!(RECEIVED).increment(1);
        let Some(reply) = message.reply.as_ref().map(|r| r.to_string()) else {
            tracing::warn!(subject = %message.subject, "nats: a message without a reply subject (not from JetStream) is ignored");
            return None;
        };
        let Ok(info) = message.info() else {
            tracing::warn!(reply = %reply, "nats: a message whose reply subject is not a JetStream ack subject is ignored");
            return None;
        };
        if info.delivered > 1 {
            metrics::counter!(REDELIVERED).increment(1);
        }
        let stream_seq = info.stream_sequence;
        let incoming = Incoming::of(&message, &self.cfg.stream, stream_seq);
        let delivery = Delivery {
            stream_seq,
            reply: reply.clone(),
            captured_unix_ms: incoming.captured_unix_ms,
        };
        let (bytes, refused) = match &incoming.reference {
            None => (message.payload.to_vec(), None),
            Some(r) => match read_reference(r, &self.cfg.reference_dirs).await {
                Ok(b) => (b, None),
                Err(reason) => (r.as_bytes().to_vec(), Some(reason)),
            },
        };
        let (sp, q, inc) = (spool.clone(), quarantine.to_path_buf(), incoming.clone());
        let spooled = tokio::task::spawn_blocking(move || {
            let entry = sp.accept_delivery(&inc.id, &inc.source, &inc.name, &bytes, delivery)?;
            match refused {
                // Bad input like any other: quarantined with its reason, its error row owed.
                Some(reason) => sp.quarantine(&entry, &reason, &q),
                None => Ok(entry),
            }
        })
        .await
        .unwrap_or_else(|e| {
            Err(SpoolError::Io {
                path: spool.dir().to_path_buf(),
                message: format!("spooling crashed: {e}"),
            })
        });
        match spooled {
            // The same id and bytes, still pending from an upload or the watched folder: that
            // entry's row will not ack this message, so it waits until the row is written.
            Ok(entry) if entry.delivery.is_none() => {
                tracing::info!(id = %incoming.id, stream_seq, "nats: this id is pending from another source; handed back for later");
                self.send(&reply, AckKind::Nak(Some(RETRY_DELAY))).await;
                metrics::counter!(NAKED).increment(1);
                None
            }
            Ok(entry) => self.held.hold(entry.key(), reply).then_some(entry),
            Err(e) => {
                // Another daemon may take it now; this one may take it later.
                tracing::warn!(id = %incoming.id, stream_seq, error = %e, "nats: cannot spool a message; handed back");
                self.send(&reply, AckKind::Nak(Some(RETRY_DELAY))).await;
                metrics::counter!(NAKED).increment(1);
                None
            }
        }
    }

    /// Gives a held entry's messages back to the group (`-NAK`: redelivered at once) and
    /// drops it from the spool.
    async fn hand_back(&self, spool: &Arc<Spool>, key: EntryKey) {
        for reply in self.held.release(&key) {
            self.send(&reply, AckKind::Nak(None)).await;
            metrics::counter!(NAKED).increment(1);
        }
        let sp = spool.clone();
        let _ = tokio::task::spawn_blocking(move || sp.complete(&[key])).await;
    }

    /// At a stop: the messages already delivered into the pull's buffer go back to the group
    /// at once instead of waiting out `ack_wait`.
    async fn hand_back_buffered(&self, messages: &mut pull::Stream) {
        for _ in 0..self.cfg.batch {
            match tokio::time::timeout(Duration::from_millis(100), messages.next()).await {
                Ok(Some(Ok(m))) => {
                    if let Some(reply) = &m.reply {
                        self.send(reply, AckKind::Nak(None)).await;
                        metrics::counter!(NAKED).increment(1);
                    }
                }
                Ok(Some(Err(_))) => {}
                Ok(None) | Err(_) => break,
            }
        }
    }

    async fn send(&self, reply: &str, kind: AckKind) {
        if let Err(e) = self.client.publish(reply.to_string(), kind.into()).await {
            tracing::warn!(error = %e, "nats: cannot send an ack");
        }
    }

    /// Acks the messages whose rows are in finished files, keeps the held ones alive, and
    /// samples the consumer's counts, until the writer has finished (`settled` closed); then
    /// flushes what it sent.
    pub async fn settle(
        self: Arc<Self>,
        settled: async_channel::Receiver<Settled>,
        results: Option<async_channel::Receiver<ServedPrediction>>,
    ) {
        let js = jetstream::new(self.client.clone());
        let every = Duration::from_secs(self.cfg.ack_wait_seconds).div_f64(3.0);
        let mut progress = tokio::time::interval(every.max(Duration::from_millis(250)));
        let mut sample = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                s = settled.recv() => match s {
                    Ok(s) => self.settled(s).await,
                    Err(_) => break,
                },
                Some(Ok(p)) = next_result(&results) => self.publish_result(p).await,
                _ = progress.tick() => {
                    for reply in self.held.replies() {
                        self.send(&reply, AckKind::Progress).await;
                    }
                }
                _ = sample.tick() => self.sample(&js).await,
            }
        }
        // Rows of the last files (the writer has finished, so nothing more comes).
        if let Some(r) = &results {
            while let Ok(p) = r.try_recv() {
                self.publish_result(p).await;
            }
        }
        match tokio::time::timeout(Duration::from_secs(10), self.client.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "nats: the last acks may not have reached the server (their messages will be redelivered)")
            }
            Err(_) => tracing::warn!(
                "nats: no server to flush the last acks to (their messages will be redelivered)"
            ),
        }
    }

    async fn publish_result(&self, p: ServedPrediction) {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(nats_link::HEADER_ID, p.id.as_str());
        let body = serde_json::to_vec(&p).expect("a prediction serialises");
        let subject = self.cfg.results_subject.clone();
        if let Err(e) = self
            .client
            .publish_with_headers(subject, headers, body.into())
            .await
        {
            tracing::warn!(id = %p.id, error = %e, "nats: cannot publish a result");
        }
    }

    async fn settled(&self, s: Settled) {
        let mut replies = self.held.release(&s.key);
        if !replies.contains(&s.reply) {
            replies.push(s.reply);
        }
        let (kind, counter) = if s.failed {
            (AckKind::Term, TERMINATED)
        } else {
            (AckKind::Ack, ACKED)
        };
        for reply in replies {
            self.send(&reply, kind).await;
        }
        metrics::counter!(counter).increment(1);
    }

    async fn sample(&self, js: &jetstream::Context) {
        let Ok(mut consumer) = js
            .get_consumer_from_stream::<pull::Config, _, _>(&self.cfg.consumer, &self.cfg.stream)
            .await
        else {
            return;
        };
        if let Ok(info) = consumer.info().await {
            metrics::gauge!(CONSUMER_PENDING).set(info.num_pending as f64);
            metrics::gauge!(CONSUMER_ACK_PENDING).set(info.num_ack_pending as f64);
            metrics::gauge!(CONSUMER_REDELIVERED).set(info.num_redelivered as f64);
            // The consumer's own limit (it may have been created with another one).
            let cap = info.config.max_ack_pending.max(1) as f64;
            if info.num_ack_pending as f64 >= PRESSURE * cap && !self.held.is_empty() {
                self.roll_now.store(true, Ordering::SeqCst);
            }
        }
    }
}

/// The next published result, or never when results are not published.
async fn next_result(
    results: &Option<async_channel::Receiver<ServedPrediction>>,
) -> Option<Result<ServedPrediction, async_channel::RecvError>> {
    match results {
        Some(r) => Some(r.recv().await),
        None => std::future::pending().await,
    }
}

/// Sleeps, unless stopped first; true when stopped.
async fn pause(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

/// What a message's headers say about its image.
#[derive(Debug, Clone, PartialEq)]
struct Incoming {
    id: String,
    source: String,
    name: String,
    captured_unix_ms: Option<u64>,
    reference: Option<String>,
}

impl Incoming {
    fn of(message: &async_nats::Message, stream: &str, stream_seq: u64) -> Incoming {
        let header = |name: &str| {
            message
                .headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_string())
                .filter(|v| !v.trim().is_empty())
        };
        let fallback = format!("{stream}-{stream_seq}");
        let given = header(nats_link::HEADER_ID).or_else(|| header("Nats-Msg-Id"));
        let id = match &given {
            Some(g) => match spool::sanitize_id(g) {
                Ok(id) => id,
                Err(e) => {
                    tracing::warn!(id = %crate::serve::one_line(g), error = %e, fallback = %fallback, "nats: a message's id is not usable; the stream sequence names it");
                    fallback.clone()
                }
            },
            None => fallback.clone(),
        };
        let captured_unix_ms = header(nats_link::HEADER_CAPTURED).and_then(|c| {
            let ms = nats_link::parse_captured(&c);
            if ms.is_none() {
                tracing::warn!(id = %id, captured = %crate::serve::one_line(&c), "nats: Plankton-Captured is neither RFC 3339 nor Unix milliseconds; left out");
            }
            ms
        });
        Incoming {
            source: header(nats_link::HEADER_SOURCE)
                .unwrap_or_else(|| format!("nats:{}", message.subject)),
            name: header(nats_link::HEADER_NAME)
                .or(given)
                .unwrap_or_else(|| id.clone()),
            id,
            captured_unix_ms,
            reference: header(nats_link::HEADER_REF),
        }
    }
}

/// The bytes of a `Plankton-Ref` file, if it lies inside one of `dirs` (symbolic links
/// resolved: a message must not make the daemon read whatever it names).
async fn read_reference(reference: &str, dirs: &[PathBuf]) -> Result<Vec<u8>, String> {
    let (reference, dirs) = (reference.to_string(), dirs.to_vec());
    tokio::task::spawn_blocking(move || {
        if dirs.is_empty() {
            return Err(format!(
                "reference `{reference}`: this daemon takes no references (nats.reference_dirs is empty)"
            ));
        }
        let path = Path::new(&reference);
        let real = path
            .canonicalize()
            .map_err(|e| format!("reference `{reference}`: {e}"))?;
        let inside = dirs
            .iter()
            .filter_map(|d| d.canonicalize().ok())
            .any(|d| real.starts_with(d));
        if !inside {
            return Err(format!(
                "reference `{reference}` is outside nats.reference_dirs"
            ));
        }
        let meta = std::fs::metadata(&real).map_err(|e| format!("reference `{reference}`: {e}"))?;
        if !meta.is_file() {
            return Err(format!("reference `{reference}` is not a regular file"));
        }
        if meta.len() > MAX_REFERENCE_BYTES {
            return Err(format!(
                "reference `{reference}` is {} bytes, more than the {MAX_REFERENCE_BYTES} taken",
                meta.len()
            ));
        }
        std::fs::read(&real).map_err(|e| format!("reference `{reference}`: {e}"))
    })
    .await
    .map_err(|e| format!("reading a reference crashed: {e}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn references_are_read_only_inside_the_configured_folders() {
        let tmp = tempfile::tempdir().unwrap();
        let inside = tmp.path().join("shared");
        std::fs::create_dir(&inside).unwrap();
        std::fs::write(inside.join("a.png"), b"image").unwrap();
        std::fs::write(tmp.path().join("secret"), b"no").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("secret"), inside.join("link")).unwrap();
        let dirs = vec![inside.clone()];
        let ok = read_reference(inside.join("a.png").to_str().unwrap(), &dirs).await;
        assert_eq!(ok.unwrap(), b"image");
        for bad in [
            tmp.path().join("secret"),
            inside.join("link"),
            inside.join("../secret"),
            inside.join("missing.png"),
            inside.clone(),
        ] {
            let r = read_reference(bad.to_str().unwrap(), &dirs).await;
            assert!(r.is_err(), "{}: {r:?}", bad.display());
        }
        let none = read_reference(inside.join("a.png").to_str().unwrap(), &[]).await;
        assert!(none.unwrap_err().contains("reference_dirs is empty"));
    }

    #[test]
    fn a_second_delivery_of_a_held_entry_is_not_sent_down_the_pipeline_again() {
        let held = Held::default();
        let key = ("a".to_string(), 7);
        assert!(held.hold(key.clone(), "$JS.ACK.s.c.1.5.5.0.0".into()));
        assert!(!held.hold(key.clone(), "$JS.ACK.s.c.2.5.9.0.0".into()));
        assert!(!held.hold(key.clone(), "$JS.ACK.s.c.2.5.9.0.0".into()));
        assert_eq!(held.replies().len(), 2, "both deliveries kept alive");
        assert_eq!(held.release(&key).len(), 2, "and both acked");
        assert!(held.replies().is_empty());
    }
}
