//! Recent predictions kept in memory for the HTTP API: `GET /v1/predictions/{id}` reads them and
//! `POST /v1/images?wait=true` waits for one. Bounded (the oldest results go first) and
//! best-effort: the durable record is the Parquet output, not this store.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// One image's outcome as the HTTP API reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServedPrediction {
    pub id: String,
    /// The acceptance this result is of (a later upload of the same id has a higher seq).
    pub seq: u64,
    pub model_id: String,
    pub predicted_class: Option<String>,
    pub confidence: Option<f32>,
    pub top_classes: Vec<String>,
    pub top_probabilities: Vec<f32>,
    /// Set when the image could not be classified (bad input, ...); the class fields are then empty.
    pub error: Option<String>,
    /// Where the refused image was put (set with `error`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantined: Option<String>,
    /// `too_small` or `blank`: predicted, but not an organism.
    pub flag: Option<String>,
    pub image_height: Option<u32>,
    pub image_width: Option<u32>,
    pub received_unix_ms: u64,
    /// From acceptance to prediction.
    pub latency_ms: f64,
    /// The run's unknown rule says no trained class fits (absent without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unknown: Option<bool>,
    /// Unknown scores (see the predictions file's columns).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mahalanobis: Option<f32>,
}

struct Waiter {
    key: u64,
    /// Only a result of this acceptance or a later one wakes it.
    min_seq: u64,
    tx: oneshot::Sender<ServedPrediction>,
}

#[derive(Default)]
struct Inner {
    results: HashMap<String, ServedPrediction>,
    /// Insertion order of the ids in `results` (each id once), oldest first.
    order: VecDeque<String>,
    waiters: HashMap<String, Vec<Waiter>>,
    next_key: u64,
}

/// Keeps the most recent `capacity` results (first in, first out) and wakes whoever waits for one.
pub struct ResultStore {
    capacity: usize,
    inner: Mutex<Inner>,
}

impl ResultStore {
    pub fn new(capacity: usize) -> Self {
        ResultStore {
            capacity,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the maps consistent (no multi-step invariants
        // span an unwind point), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores the result (replacing an earlier acceptance's result for the same id, which keeps
    /// its place in the eviction order; a result older than the stored one is not kept) and
    /// wakes every waiter of that id whose acceptance it is.
    pub fn publish(&self, p: ServedPrediction) {
        let mut inner = self.lock();
        if let Some(waiters) = inner.waiters.remove(&p.id) {
            let mut still = Vec::new();
            for w in waiters {
                if p.seq >= w.min_seq {
                    // A waiter that gave up has dropped its receiver: nothing to do.
                    let _ = w.tx.send(p.clone());
                } else {
                    still.push(w);
                }
            }
            if !still.is_empty() {
                inner.waiters.insert(p.id.clone(), still);
            }
        }
        if self.capacity == 0 {
            return;
        }
        if inner.results.get(&p.id).is_some_and(|old| old.seq > p.seq) {
            return;
        }
        let id = p.id.clone();
        if inner.results.insert(id.clone(), p).is_none() {
            inner.order.push_back(id);
        }
        while inner.results.len() > self.capacity {
            match inner.order.pop_front() {
                Some(old) => {
                    inner.results.remove(&old);
                }
                None => break,
            }
        }
    }

    pub fn get(&self, id: &str) -> Option<ServedPrediction> {
        self.lock().results.get(id).cloned()
    }

    pub fn len(&self) -> usize {
        self.lock().results.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits up to `timeout` for the result of acceptance `min_seq` (or a later one) of `id`;
    /// returns at once when it is already known. None on timeout.
    pub async fn wait(
        &self,
        id: &str,
        min_seq: u64,
        timeout: Duration,
    ) -> Option<ServedPrediction> {
        let fresh = |p: &ServedPrediction| p.seq >= min_seq;
        let (key, rx) = {
            let mut inner = self.lock();
            // Register first, then look: a publish cannot slip between the look and the
            // registration (both happen under the lock), so no wake-up is lost.
            let (tx, rx) = oneshot::channel();
            let key = inner.next_key;
            inner.next_key += 1;
            inner
                .waiters
                .entry(id.to_string())
                .or_default()
                .push(Waiter { key, min_seq, tx });
            if let Some(p) = inner.results.get(id).filter(|p| fresh(p)).cloned() {
                remove_waiter(&mut inner, id, key);
                return Some(p);
            }
            (key, rx)
        };
        // Removes the registration however this future ends (timeout, or dropped by its caller).
        let _guard = WaiterGuard {
            store: self,
            id,
            key,
        };
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(p)) => Some(p),
            // Timed out (or, impossibly, the sender vanished): it may have landed just now.
            _ => self.get(id).filter(fresh),
        }
    }

    #[cfg(test)]
    fn waiter_count(&self) -> usize {
        self.lock().waiters.values().map(Vec::len).sum()
    }
}

fn remove_waiter(inner: &mut Inner, id: &str, key: u64) {
    if let Some(list) = inner.waiters.get_mut(id) {
        list.retain(|w| w.key != key);
        if list.is_empty() {
            inner.waiters.remove(id);
        }
    }
}

struct WaiterGuard<'a> {
    store: &'a ResultStore,
    id: &'a str,
    key: u64,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        remove_waiter(&mut self.store.lock(), self.id, self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn pred(id: &str, class: &str) -> ServedPrediction {
        ServedPrediction {
            id: id.into(),
            seq: 0,
            quarantined: None,
            flag: None,
            image_height: None,
            image_width: None,
            model_id: "m".into(),
            predicted_class: Some(class.into()),
            confidence: Some(0.9),
            top_classes: vec![class.into()],
            top_probabilities: vec![0.9],
            error: None,
            received_unix_ms: 1,
            latency_ms: 2.0,
            unknown: None,
            energy: None,
            mahalanobis: None,
        }
    }

    #[test]
    fn keeps_the_most_recent_capacity_results() {
        let store = ResultStore::new(2);
        store.publish(pred("a", "x"));
        store.publish(pred("b", "x"));
        store.publish(pred("a", "y")); // replaces, does not count twice
        assert_eq!(store.len(), 2);
        assert_eq!(
            store.get("a").unwrap().predicted_class.as_deref(),
            Some("y")
        );
        store.publish(pred("c", "x"));
        assert_eq!(store.len(), 2);
        assert!(store.get("a").is_none(), "oldest evicted first");
        assert!(store.get("b").is_some() && store.get("c").is_some());
        store.publish(pred("d", "x"));
        assert!(store.get("b").is_none());

        let none = ResultStore::new(0);
        none.publish(pred("a", "x"));
        assert!(none.get("a").is_none());
    }

    #[tokio::test]
    async fn wait_returns_a_known_result_at_once() {
        let store = ResultStore::new(4);
        store.publish(pred("a", "x"));
        let got = store.wait("a", 0, Duration::from_secs(5)).await;
        assert_eq!(got, Some(pred("a", "x")));
        assert_eq!(store.waiter_count(), 0);
    }

    #[tokio::test]
    async fn publish_wakes_every_waiter() {
        let store = Arc::new(ResultStore::new(4));
        let mut tasks = Vec::new();
        for _ in 0..3 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                s.wait("a", 0, Duration::from_secs(10)).await
            }));
        }
        while store.waiter_count() < 3 {
            tokio::task::yield_now().await;
        }
        let start = std::time::Instant::now();
        store.publish(pred("b", "x"));
        store.publish(pred("a", "y"));
        for t in tasks {
            assert_eq!(t.await.unwrap(), Some(pred("a", "y")));
        }
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(store.waiter_count(), 0);
    }

    #[tokio::test]
    async fn wait_times_out_and_cleans_up() {
        let store = ResultStore::new(4);
        let start = std::time::Instant::now();
        assert_eq!(store.wait("a", 0, Duration::from_millis(50)).await, None);
        assert!(start.elapsed() >= Duration::from_millis(50));
        assert_eq!(store.waiter_count(), 0);
        // A waiter whose future is dropped is removed too.
        let fut = store.wait("b", 0, Duration::from_secs(10));
        let _ = tokio::time::timeout(Duration::from_millis(10), fut).await;
        assert_eq!(store.waiter_count(), 0);
        store.publish(pred("a", "x"));
    }

    #[tokio::test]
    async fn a_waiter_for_a_new_acceptance_ignores_the_old_result() {
        let store = Arc::new(ResultStore::new(4));
        let old = ServedPrediction {
            seq: 5,
            error: Some("truncated".into()),
            predicted_class: None,
            ..pred("fix1", "x")
        };
        store.publish(old.clone());
        assert_eq!(store.wait("fix1", 6, Duration::from_millis(30)).await, None);
        let s = store.clone();
        let waiting = tokio::spawn(async move { s.wait("fix1", 6, Duration::from_secs(10)).await });
        while store.waiter_count() < 1 {
            tokio::task::yield_now().await;
        }
        store.publish(old.clone()); // a late copy of the old one wakes nobody and stores nothing
        assert_eq!(store.waiter_count(), 1);
        let new = ServedPrediction {
            seq: 6,
            ..pred("fix1", "y")
        };
        store.publish(new.clone());
        assert_eq!(waiting.await.unwrap(), Some(new.clone()));
        store.publish(old);
        assert_eq!(
            store.get("fix1"),
            Some(new),
            "an older result does not replace a newer one"
        );
    }
}
