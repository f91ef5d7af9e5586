//! `plankton publish`: a backfill or replay producer. Every image file under the inputs becomes
//! one message on a JetStream subject, with a bounded number of publishes awaiting their
//! JetStream acks at any time; a publish whose ack does not come (or says no) is sent again
//! with the same `Nats-Msg-Id`, which the stream de-duplicates, so nothing is dropped silently
//! and nothing is stored twice. What still fails is listed with its reason.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishAckFuture};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;

use crate::serve::config::NatsConfig;
use crate::serve::nats::{self, NatsError, HEADER_ID, HEADER_NAME, HEADER_REF, HEADER_SOURCE};
use crate::serve::spool::id_for_path;

#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// Servers, credentials, TLS, and the stream (created when missing if `create_stream`).
    pub nats: NatsConfig,
    pub subject: String,
    /// Image files, or folders searched recursively (hidden entries skipped).
    pub inputs: Vec<PathBuf>,
    /// Send the file's absolute path (`Plankton-Ref`) instead of its bytes: for images on
    /// storage the daemons share, or larger than the server's `max_payload`.
    pub reference: bool,
    /// `Plankton-Source` of every message (the camera or instrument).
    pub source: Option<String>,
    /// Publishes awaiting their JetStream ack at most.
    pub in_flight: usize,
    /// Attempts per message before it is reported as failed.
    pub attempts: u32,
}

/// One image to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub path: PathBuf,
    /// The image id: the path relative to the folder given (as the daemon's folder source
    /// names it), or the file name for a file given on its own.
    pub id: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct PublishSummary {
    pub published: u64,
    /// Acked as duplicates (the stream already held that `Nats-Msg-Id` within its window).
    pub duplicates: u64,
    pub bytes: u64,
    /// Files not published, with the reason.
    pub failed: Vec<(PathBuf, String)>,
    /// The stream's sequence range this run's messages got.
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
}

/// The files to publish, in a stable order (sorted paths; folders recursively; a file named
/// twice is published once), each id `id_prefix` + the id the folder source would give it.
/// Two files that would get one id are refused: the stream would drop the second as a
/// duplicate of the first.
pub fn list_inputs(inputs: &[PathBuf], id_prefix: &str) -> Result<Vec<Item>, String> {
    let items = list_files(inputs)?;
    let mut seen_paths = std::collections::HashSet::new();
    let mut by_id: std::collections::HashMap<String, PathBuf> = std::collections::HashMap::new();
    let mut clashes = Vec::new();
    let mut out = Vec::new();
    for mut item in items {
        if !seen_paths.insert(std::path::absolute(&item.path).unwrap_or(item.path.clone())) {
            continue;
        }
        item.id = format!("{id_prefix}{}", item.id);
        crate::serve::spool::sanitize_id(&item.id)
            .map_err(|e| format!("--id-prefix `{id_prefix}`: {e}"))?;
        match by_id.get(&item.id) {
            Some(first) => clashes.push(format!(
                "{} and {} (id {})",
                first.display(),
                item.path.display(),
                item.id
            )),
            None => {
                by_id.insert(item.id.clone(), item.path.clone());
                out.push(item);
            }
        }
    }
    if !clashes.is_empty() {
        let n = clashes.len();
        clashes.truncate(5);
        return Err(format!(
            "{n} file(s) would share an image id with another (ids are paths under the folder given): {}{}; publish such folders one at a time with their own --id-prefix",
            clashes.join("; "),
            if n > 5 { "; ..." } else { "" }
        ));
    }
    Ok(out)
}

fn list_files(inputs: &[PathBuf]) -> Result<Vec<Item>, String> {
    let mut items = Vec::new();
    for input in inputs {
        let meta = std::fs::metadata(input).map_err(|e| format!("{}: {e}", input.display()))?;
        if meta.is_dir() {
            let listing = crate::fsx::files_under(input).map_err(|e| e.to_string())?;
            for p in listing.other {
                // Said, not silent.
                tracing::warn!(path = %p.display(), "not published: not a regular file (a symbolic link, FIFO, socket or device)");
            }
            for f in listing.files {
                let rel = f.strip_prefix(input).unwrap_or(&f).to_path_buf();
                items.push(Item {
                    id: id_for_path(&rel),
                    path: f,
                });
            }
        } else if meta.is_file() {
            let name = input.file_name().map(PathBuf::from).unwrap_or_default();
            items.push(Item {
                id: id_for_path(&name),
                path: input.clone(),
            });
        } else {
            return Err(format!("{}: neither a file nor a folder", input.display()));
        }
    }
    Ok(items)
}

/// A message on its way: what to send again if its ack does not come.
struct Sent {
    item: Item,
    attempt: u32,
}

/// Publishes `items`; `progress(done, total)` after each acked (or finally failed) message.
pub async fn publish(
    opts: &PublishOptions,
    items: Vec<Item>,
    mut progress: impl FnMut(u64, u64),
) -> Result<PublishSummary, NatsError> {
    let client = nats::connect(&opts.nats, "plankton-publish", true).await?;
    let js = jetstream::new(client.clone());
    let stream = nats::stream(&js, &opts.nats).await?;
    let mut stream_info = stream;
    let subjects = stream_info
        .info()
        .await
        .map(|i| i.config.subjects.clone())
        .map_err(|e| NatsError::Stream {
            stream: opts.nats.stream.clone(),
            message: e.to_string(),
        })?;
    if !subjects.iter().any(|s| subject_matches(s, &opts.subject)) {
        return Err(NatsError::Stream {
            stream: opts.nats.stream.clone(),
            message: format!(
                "its subjects {subjects:?} do not cover `{}`: the messages would go nowhere",
                opts.subject
            ),
        });
    }
    let max_payload = client.server_info().max_payload;
    let total = items.len() as u64;
    let mut summary = PublishSummary::default();
    let mut done = 0u64;
    let mut waiting = futures_util::stream::FuturesUnordered::new();
    let mut queue: VecDeque<(Item, u32)> = items.into_iter().map(|i| (i, 1)).collect();
    // Acks are awaited together, so a server that went away costs one ack timeout, not one
    // per message in flight; re-sends wait until `retry_at` (a moment for the server).
    let mut retry_at = tokio::time::Instant::now();
    while !queue.is_empty() || !waiting.is_empty() {
        // Keep up to `in_flight` publishes waiting for their acks.
        while waiting.len() < opts.in_flight.max(1) {
            let Some((item, attempt)) = queue.pop_front() else {
                break;
            };
            if attempt > 1 {
                tokio::time::sleep_until(retry_at).await;
            }
            match send(&js, opts, &item, max_payload).await {
                Ok((ack, len)) => {
                    if attempt == 1 {
                        summary.bytes += len as u64;
                    }
                    waiting.push(async move {
                        let result = ack.await;
                        (Sent { item, attempt }, result)
                    })
                }
                Err(reason) => {
                    summary.failed.push((item.path, reason));
                    done += 1;
                    progress(done, total);
                }
            }
        }
        let Some((sent, result)) = waiting.next().await else {
            continue;
        };
        match result {
            Ok(ack) => {
                if ack.duplicate {
                    summary.duplicates += 1;
                } else {
                    summary.published += 1;
                    summary.first_seq = Some(
                        summary
                            .first_seq
                            .map_or(ack.sequence, |s| s.min(ack.sequence)),
                    );
                    summary.last_seq = Some(
                        summary
                            .last_seq
                            .map_or(ack.sequence, |s| s.max(ack.sequence)),
                    );
                }
                done += 1;
                progress(done, total);
            }
            Err(e) if sent.attempt < opts.attempts => {
                tracing::warn!(file = %sent.item.path.display(), attempt = sent.attempt, error = %e, "no JetStream ack; publishing again");
                // 0.2, 0.4, 0.8... s from now.
                let wait = Duration::from_millis(100 << sent.attempt.min(6));
                retry_at = retry_at.max(tokio::time::Instant::now() + wait);
                queue.push_front((sent.item, sent.attempt + 1));
            }
            Err(e) => {
                summary.failed.push((
                    sent.item.path,
                    format!("no JetStream ack after {} attempts: {e}", sent.attempt),
                ));
                done += 1;
                progress(done, total);
            }
        }
    }
    client.flush().await.ok();
    Ok(summary)
}

/// Sends one message; its ack future and payload size, or why it cannot be sent.
async fn send(
    js: &jetstream::Context,
    opts: &PublishOptions,
    item: &Item,
    max_payload: usize,
) -> Result<(PublishAckFuture, usize), String> {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", item.id.as_str());
    headers.insert(HEADER_ID, item.id.as_str());
    if let Some(name) = item.path.file_name() {
        headers.insert(HEADER_NAME, name.to_string_lossy().as_ref());
    }
    if let Some(source) = &opts.source {
        headers.insert(HEADER_SOURCE, source.as_str());
    }
    let payload = if opts.reference {
        let abs = std::path::absolute(&item.path).map_err(|e| e.to_string())?;
        let Some(text) = abs.to_str().filter(|t| !t.chars().any(char::is_control)) else {
            return Err("its path is not UTF-8 or holds control characters, so it cannot travel in a header: publish its bytes (without --reference)".into());
        };
        headers.insert(HEADER_REF, text);
        Bytes::new()
    } else {
        let bytes = tokio::fs::read(&item.path)
            .await
            .map_err(|e| format!("cannot read: {e}"))?;
        // The server counts the headers too.
        let header_bytes: usize = 12
            + headers
                .iter()
                .map(|(k, v)| {
                    k.to_string().len() + v.iter().map(|x| x.as_str().len() + 4).sum::<usize>()
                })
                .sum::<usize>();
        if bytes.len() + header_bytes > max_payload {
            return Err(format!(
                "{} bytes, more than the server's max_payload ({max_payload}): publish it as a reference (--reference) from shared storage, or raise max_payload",
                bytes.len()
            ));
        }
        Bytes::from(bytes)
    };
    let len = payload.len();
    let message = jetstream::message::PublishMessage::build()
        .payload(payload)
        .headers(headers);
    js.send_publish(opts.subject.clone(), message)
        .await
        .map(|ack| (ack, len))
        .map_err(|e| format!("cannot publish: {e}"))
}

/// Whether a stream subject (with `*` and `>` wildcards) covers a concrete subject.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn stream_subjects_with_wildcards_cover_concrete_subjects() {
        assert!(subject_matches("plankton.images.>", "plankton.images.cam1"));
        assert!(subject_matches(
            "plankton.images.>",
            "plankton.images.cam1.x"
        ));
        assert!(!subject_matches("plankton.images.>", "plankton.images"));
        assert!(subject_matches("plankton.*.raw", "plankton.cam1.raw"));
        assert!(!subject_matches("plankton.*.raw", "plankton.cam1.jpg"));
        assert!(subject_matches("a.b", "a.b"));
        assert!(!subject_matches("a.b", "a.b.c"));
    }

    #[test]
    fn folders_are_listed_recursively_in_order_with_ids_as_the_folder_source_names_them() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::create_dir_all(d.join("b/c")).unwrap();
        std::fs::create_dir_all(d.join(".hidden")).unwrap();
        for f in ["a.jpg", "b/c/z.png", "b/y.jpg", ".dot.jpg", ".hidden/h.jpg"] {
            std::fs::write(d.join(f), b"x").unwrap();
        }
        let items = list_inputs(&[d.to_path_buf(), d.join("a.jpg")], "").unwrap();
        let rel: Vec<(String, String)> = items
            .iter()
            .map(|i| {
                (
                    i.path.strip_prefix(d).unwrap().display().to_string(),
                    i.id.clone(),
                )
            })
            .collect();
        let expect = |p: &str, full: &str| (p.to_string(), id_for_path(Path::new(full)));
        assert_eq!(
            rel,
            vec![
                expect("a.jpg", "a.jpg"),
                expect("b/c/z.png", "b/c/z.png"),
                expect("b/y.jpg", "b/y.jpg"),
            ],
            "a.jpg given twice is published once"
        );
        assert!(list_inputs(&[d.join("missing")], "").is_err());
        // Two folders with a file of one name: one id for two images, refused.
        let other = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(other.path().join("cam2")).unwrap();
        std::fs::write(other.path().join("cam2/a.jpg"), b"y").unwrap();
        let cam2 = other.path().join("cam2");
        let e = list_inputs(&[d.to_path_buf(), cam2.clone()], "").unwrap_err();
        assert!(
            e.contains("would share an image id") && e.contains("--id-prefix"),
            "{e}"
        );
        let ok = list_inputs(std::slice::from_ref(&cam2), "cam2-").unwrap();
        assert_eq!(
            ok[0].id,
            format!("cam2-{}", id_for_path(Path::new("a.jpg")))
        );
        assert!(list_inputs(&[cam2], "bad prefix ").is_err());
    }
}
