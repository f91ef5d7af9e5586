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
use std::sync::atomic::AtomicU64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, consumer::PullConsumer, AckKind};
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
pub const GIVEN_UP: &str = "plankton_nats_given_up_total";
pub const CONSUMING: &str = "plankton_nats_consuming";

/// The share of the consumer's `max_ack_pending` held by the group at which a daemon finishes
/// its open file early (its messages are acked only then; at the cap JetStream delivers nothing
/// more, and the group would wait for `roll_seconds`).
const PRESSURE: f64 = 0.5;

/// The longest file a `Plankton-Ref` may name: the decoder's own byte limit (a larger file is
/// refused without being copied into the spool and the quarantine).
fn max_reference_bytes() -> u64 {
    plankton_core::decode::DecodeLimits::default().max_bytes
}
/// How long a message is left before JetStream offers it again when this daemon cannot take it
/// now (its id is pending with other bytes, or the spool's disk is full).
const RETRY_DELAY: Duration = Duration::from_secs(10);
/// Deliveries of a message whose reference cannot be read (yet) before it is refused.
const REFERENCE_ATTEMPTS: i64 = 5;
/// The longest a send (an ack, a NAK, an in-progress ack) may wait: while the connection is
/// down the client's queue fills, and a stop must not hang on it.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

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
    describe_gauge!(
        CONSUMING,
        "1 while the daemon pulls from its consumer (0: not connected, or the stream or consumer cannot be used: see the log)"
    );
    describe_counter!(
        GIVEN_UP,
        "Held messages no longer kept alive: their row was not written in time (an error on the way)"
    );
    describe_counter!(
        PRESSURE_ROLLS,
        "Files finished before roll_seconds because the consumer group neared max_ack_pending"
    );
}

/// The reply subjects of the deliveries this daemon holds, by spool entry (a message
/// redelivered to this daemon while its first delivery is still in the pipeline adds a second),
/// with when it was first held.
#[derive(Default)]
struct Held(Mutex<HashMap<EntryKey, HeldEntry>>);

struct HeldEntry {
    since: Instant,
    replies: Vec<String>,
    /// No longer kept alive (see [`Held::to_keep_alive`]).
    given_up: bool,
}

impl Held {
    /// Holds `reply` for `key`; true when `key` was not held yet (its entry must go down the
    /// pipeline; otherwise it already is).
    fn hold(&self, key: EntryKey, reply: String) -> bool {
        let mut held = self.0.lock().expect("held");
        let new = !held.contains_key(&key);
        let entry = held.entry(key).or_insert_with(|| HeldEntry {
            since: Instant::now(),
            replies: Vec::new(),
            given_up: false,
        });
        if !entry.replies.contains(&reply) {
            entry.replies.push(reply);
        }
        metrics::gauge!(HELD).set(held.len() as f64);
        new
    }

    fn release(&self, key: &EntryKey) -> Vec<String> {
        let mut held = self.0.lock().expect("held");
        let replies = held.remove(key).map(|e| e.replies).unwrap_or_default();
        metrics::gauge!(HELD).set(held.len() as f64);
        replies
    }

    fn is_empty(&self) -> bool {
        self.0.lock().expect("held").is_empty()
    }

    /// The replies to keep alive: those of entries held for less than `limit`. An entry held
    /// longer has met an error on its way to a finished file (its row was not written; the
    /// log says why): it is no longer kept alive, so JetStream offers it again after ack_wait
    /// (to any daemon) instead of it counting against max_ack_pending for ever. A late row
    /// still acks it.
    fn to_keep_alive(&self, limit: Duration) -> Vec<String> {
        let mut held = self.0.lock().expect("held");
        let mut out = Vec::new();
        for (key, e) in held.iter_mut() {
            if e.since.elapsed() < limit {
                out.extend(e.replies.iter().cloned());
            } else if !e.given_up {
                e.given_up = true;
                metrics::counter!(GIVEN_UP).increment(1);
                tracing::warn!(id = %key.0, held_s = e.since.elapsed().as_secs(), "nats: a message held this long has no row yet (see the errors above); no longer kept alive: JetStream offers it again after ack_wait");
            }
        }
        out
    }
}

/// The daemon's link to its consumer group.
pub struct NatsInput {
    client: async_nats::Client,
    cfg: NatsConfig,
    held: Held,
    roll_now: Arc<AtomicBool>,
    /// The consumer's ack wait (its own, which wins over the config's when the durable
    /// consumer already existed), in milliseconds: in-progress acks go out three times per.
    ack_wait_ms: AtomicU64,
    /// How long a held message is kept alive: the file holding its row should have been
    /// finished well before (`output.roll_seconds` and a margin).
    keep_alive_limit: Duration,
}

impl NatsInput {
    /// Connects (in the background: a daemon may start before its server; JetStream calls are
    /// retried until it answers).
    pub async fn start(
        cfg: &NatsConfig,
        daemon: &str,
        roll_seconds: u64,
    ) -> Result<Arc<NatsInput>, NatsError> {
        describe();
        metrics::gauge!(CONSUMING).set(0.0);
        metrics::gauge!(nats_link::CONNECTED).set(0.0);
        let client = nats_link::connect(cfg, daemon, false).await?;
        Ok(Arc::new(NatsInput {
            client,
            cfg: cfg.clone(),
            held: Held::default(),
            roll_now: Arc::default(),
            ack_wait_ms: AtomicU64::new(cfg.ack_wait_seconds * 1000),
            keep_alive_limit: Duration::from_secs(roll_seconds + 60),
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
        let consumer: jetstream::consumer::PullConsumer = stream
            .get_or_create_consumer(&self.cfg.consumer, config.clone())
            .await
            .map_err(|e| NatsError::Consumer {
                stream: self.cfg.stream.clone(),
                consumer: self.cfg.consumer.clone(),
                message: e.to_string(),
            })?;
        // An existing durable consumer keeps its own settings: say so, and follow its ack wait.
        let actual = &consumer.cached_info().config;
        let mut differs = Vec::new();
        if actual.ack_wait != config.ack_wait {
            differs.push(format!("ack_wait {:?}", actual.ack_wait));
        }
        if actual.max_ack_pending != config.max_ack_pending {
            differs.push(format!("max_ack_pending {}", actual.max_ack_pending));
        }
        if actual.max_deliver != config.max_deliver {
            differs.push(format!("max_deliver {}", actual.max_deliver));
        }
        if actual.filter_subject != config.filter_subject {
            differs.push(format!("filter_subject `{}`", actual.filter_subject));
        }
        if !differs.is_empty() {
            tracing::warn!(consumer = %self.cfg.consumer, settings = %differs.join(", "), "nats: the durable consumer exists with other settings than [nats] gives; its own are in force (change them with `nats consumer edit`, or name another consumer)");
        }
        self.ack_wait_ms
            .store(actual.ack_wait.as_millis().max(1) as u64, Ordering::SeqCst);
        Ok(consumer)
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
                        metrics::gauge!(CONSUMING).set(0.0);
                        tracing::warn!(error = %e, "nats: consumer not ready; retrying");
                        if pause(&stop, Duration::from_secs(2)).await {
                            return Ok(taken);
                        }
                    }
                }
            };
            metrics::gauge!(CONSUMING).set(1.0);
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
                        if let Some(entry) = self.take(message, &spool, &quarantine, &stop).await {
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
    /// While the spool cannot take it (a full disk), it is retried here with the message kept
    /// alive, so pulling pauses instead of each message burning its deliveries.
    async fn take(
        &self,
        message: jetstream::Message,
        spool: &Arc<Spool>,
        quarantine: &Path,
        stop: &CancellationToken,
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
        let (stream_seq, delivered) = (info.stream_sequence, info.delivered);
        let incoming = Incoming::of(&message, &self.cfg.stream, stream_seq);
        let delivery = Delivery {
            stream_seq,
            reply: reply.clone(),
            captured_unix_ms: incoming.captured_unix_ms,
        };
        let (bytes, refused) = match &incoming.reference {
            None => (message.payload.clone(), None),
            Some(r) => match read_reference(r, &self.cfg.reference_dirs).await {
                Ok(b) => (bytes::Bytes::from(b), None),
                // Shared storage that has not caught up yet (NFS), a brief I/O error: offered
                // again a few times before it counts as bad input.
                Err(e) if e.transient && delivered < REFERENCE_ATTEMPTS => {
                    tracing::warn!(id = %incoming.id, stream_seq, delivered, reason = %e.reason, "nats: reference not readable yet; offered again later");
                    self.send(&reply, AckKind::Nak(Some(RETRY_DELAY))).await;
                    metrics::counter!(NAKED).increment(1);
                    return None;
                }
                Err(e) => {
                    let reason = if e.transient {
                        format!("{} (after {delivered} deliveries)", e.reason)
                    } else {
                        e.reason
                    };
                    (bytes::Bytes::copy_from_slice(r.as_bytes()), Some(reason))
                }
            },
        };
        let mut backoff = Duration::from_secs(1);
        let entry = loop {
            let (sp, q, inc, b, d, why) = (
                spool.clone(),
                quarantine.to_path_buf(),
                incoming.clone(),
                bytes.clone(),
                delivery.clone(),
                refused.clone(),
            );
            let spooled = tokio::task::spawn_blocking(move || {
                let entry = sp.accept_delivery(&inc.id, &inc.source, &inc.name, &b, d)?;
                match why {
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
                Ok(entry) => break entry,
                // Another image under this id is pending until its row is written.
                Err(e @ SpoolError::Conflict { .. }) => {
                    tracing::info!(id = %incoming.id, stream_seq, error = %e, "nats: handed back for later");
                    self.send(&reply, AckKind::Nak(Some(RETRY_DELAY))).await;
                    metrics::counter!(NAKED).increment(1);
                    return None;
                }
                Err(e) => {
                    tracing::warn!(id = %incoming.id, stream_seq, error = %e, retry_in_s = backoff.as_secs(), "nats: cannot spool a message; pulling paused, retrying");
                    self.send(&reply, AckKind::Progress).await;
                    if pause(stop, backoff).await {
                        self.send(&reply, AckKind::Nak(None)).await;
                        metrics::counter!(NAKED).increment(1);
                        return None;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        };
        if entry.delivery.is_none() {
            // The same id and bytes, still pending from an upload or the watched folder: that
            // entry's row will not ack this message, so it waits until the row is written.
            tracing::info!(id = %incoming.id, stream_seq, "nats: this id is pending from another source; handed back for later");
            self.send(&reply, AckKind::Nak(Some(RETRY_DELAY))).await;
            metrics::counter!(NAKED).increment(1);
            return None;
        }
        self.held.hold(entry.key(), reply).then_some(entry)
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
        let sent = tokio::time::timeout(
            SEND_TIMEOUT,
            self.client.publish(reply.to_string(), kind.into()),
        )
        .await;
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "nats: cannot send an ack"),
            Err(_) => tracing::warn!(
                "nats: an ack could not be queued (no connection): its message is offered again"
            ),
        }
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
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
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut last_progress = Instant::now();
        let mut last_sample = Instant::now();
        let mut handle: Option<PullConsumer> = None;
        loop {
            tokio::select! {
                s = settled.recv() => match s {
                    Ok(s) => self.settled(s).await,
                    Err(_) => break,
                },
                Some(Ok(p)) = next_result(&results) => self.publish_result(p).await,
                _ = tick.tick() => {
                    let ack_wait = Duration::from_millis(self.ack_wait_ms.load(Ordering::SeqCst));
                    // No in-progress acks into a dead connection (they would only queue up).
                    if last_progress.elapsed() >= ack_wait / 3 && self.connected() {
                        last_progress = Instant::now();
                        for reply in self.held.to_keep_alive(self.keep_alive_limit) {
                            self.send(&reply, AckKind::Progress).await;
                        }
                    }
                    if last_sample.elapsed() >= Duration::from_millis(500) && self.connected() {
                        last_sample = Instant::now();
                        let _ = tokio::time::timeout(Duration::from_secs(2), self.sample(&js, &mut handle)).await;
                    }
                }
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

    /// Samples the consumer's counts (one request; the handle is looked up once and again
    /// only after a failed sample, e.g. when the consumer was re-created).
    async fn sample(&self, js: &jetstream::Context, handle: &mut Option<PullConsumer>) {
        if handle.is_none() {
            *handle = js
                .get_consumer_from_stream(&self.cfg.consumer, &self.cfg.stream)
                .await
                .ok();
        }
        let Some(consumer) = handle.as_mut() else {
            return;
        };
        let info = consumer.info().await.cloned();
        if info.is_err() {
            *handle = None;
        }
        if let Ok(info) = info {
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
                    tracing::warn!(id = %crate::serve::one_line(g.chars().take(64).collect::<String>()), error = %e, fallback = %fallback, "nats: a message's id is not usable; the stream sequence names it");
                    fallback.clone()
                }
            },
            None => fallback.clone(),
        };
        let captured_unix_ms = header(nats_link::HEADER_CAPTURED).and_then(|c| {
            let ms = nats_link::parse_captured(&c);
            if ms.is_none() {
                tracing::warn!(id = %id, captured = %crate::serve::one_line(&c), "nats: Plankton-Captured is neither RFC 3339 nor Unix milliseconds of 1973-9999; left out");
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

/// Why a reference was not read; `transient`: it may be readable later (a missing file on
/// storage that has not caught up, an I/O error), so the message is offered again first.
#[derive(Debug)]
struct RefError {
    reason: String,
    transient: bool,
}

/// The bytes of a `Plankton-Ref` file, if it lies inside one of `dirs` (symbolic links
/// resolved: a message must not make the daemon read whatever it names).
async fn read_reference(reference: &str, dirs: &[PathBuf]) -> Result<Vec<u8>, RefError> {
    let (reference, dirs) = (reference.to_string(), dirs.to_vec());
    tokio::task::spawn_blocking(move || {
        let refused = |reason: String| RefError {
            reason,
            transient: false,
        };
        let io = |e: std::io::Error| RefError {
            reason: format!("reference `{reference}`: {e}"),
            transient: true,
        };
        if dirs.is_empty() {
            return Err(refused(format!(
                "reference `{reference}`: this daemon takes no references (nats.reference_dirs is empty)"
            )));
        }
        // A path, or a file:// URL (no host; percent-escapes are not decoded: refused).
        let text = match reference.strip_prefix("file://") {
            Some(rest) if rest.contains('%') => {
                return Err(refused(format!(
                    "reference `{reference}`: percent-escapes in file URLs are not taken: send the plain path"
                )))
            }
            Some(rest) => rest,
            None if reference.contains("://") => {
                return Err(refused(format!(
                    "reference `{reference}`: only paths and file:// URLs on shared storage are taken"
                )))
            }
            None => reference.as_str(),
        };
        let path = Path::new(text);
        if !path.is_absolute() {
            return Err(refused(format!(
                "reference `{reference}` is not an absolute path"
            )));
        }
        let real = path.canonicalize().map_err(io)?;
        let inside = dirs
            .iter()
            .filter_map(|d| d.canonicalize().ok())
            .any(|d| real.starts_with(d));
        if !inside {
            return Err(refused(format!(
                "reference `{reference}` is outside nats.reference_dirs"
            )));
        }
        let meta = std::fs::metadata(&real).map_err(io)?;
        if !meta.is_file() {
            return Err(refused(format!(
                "reference `{reference}` is not a regular file"
            )));
        }
        if meta.len() > max_reference_bytes() {
            return Err(refused(format!(
                "reference `{reference}` is {} bytes, more than the {} an image may have",
                meta.len(),
                max_reference_bytes()
            )));
        }
        std::fs::read(&real).map_err(io)
    })
    .await
    .map_err(|e| RefError {
        reason: format!("reading a reference crashed: {e}"),
        transient: true,
    })?
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
        let url = format!("file://{}", inside.join("a.png").display());
        assert_eq!(read_reference(&url, &dirs).await.unwrap(), b"image");
        for url in [
            "http://host/a.png",
            "s3://bucket/a.png",
            "file:///x%20y.png",
        ] {
            let e = read_reference(url, &dirs).await.unwrap_err();
            assert!(!e.transient, "{url}: {}", e.reason);
        }
        for (bad, transient) in [
            (tmp.path().join("secret"), false),
            (inside.join("link"), false),
            (inside.join("../secret"), false),
            (inside.clone(), false),
            (PathBuf::from("shared/a.png"), false),
            // Not there yet (shared storage catching up): offered again before it is refused.
            (inside.join("missing.png"), true),
        ] {
            let r = read_reference(bad.to_str().unwrap(), &dirs).await;
            let e = r.expect_err(&bad.display().to_string());
            assert_eq!(e.transient, transient, "{}: {}", bad.display(), e.reason);
        }
        let none = read_reference(inside.join("a.png").to_str().unwrap(), &[]).await;
        assert!(none.unwrap_err().reason.contains("reference_dirs is empty"));
    }

    #[test]
    fn a_second_delivery_of_a_held_entry_is_not_sent_down_the_pipeline_again() {
        let held = Held::default();
        let key = ("a".to_string(), 7);
        assert!(held.hold(key.clone(), "$JS.ACK.s.c.1.5.5.0.0".into()));
        assert!(!held.hold(key.clone(), "$JS.ACK.s.c.2.5.9.0.0".into()));
        assert!(!held.hold(key.clone(), "$JS.ACK.s.c.2.5.9.0.0".into()));
        assert_eq!(
            held.to_keep_alive(Duration::from_secs(60)).len(),
            2,
            "both deliveries kept alive"
        );
        assert!(
            held.to_keep_alive(Duration::ZERO).is_empty(),
            "not once held too long"
        );
        assert_eq!(held.release(&key).len(), 2, "and both acked");
        assert!(held.is_empty());
    }
}
