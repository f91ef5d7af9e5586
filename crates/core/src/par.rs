//! Data-parallel jobs on a rayon pool, written once: "`threads` = 0 means one per core", results
//! in input order, a panic in one item propagates instead of leaving a hole.
use rayon::prelude::*;

/// A pool of `threads` workers (0 = one per core). `on_start` runs on each worker before any
/// work (libtorch jobs pin libtorch to one thread per worker there).
pub fn pool_with(threads: usize, on_start: impl Fn() + Send + Sync + 'static) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("plankton-par-{i}"))
        .start_handler(move |_| on_start())
        .build()
        .expect("a thread pool can be built")
}

/// Runs `job` on `threads` workers: 0 uses rayon's global pool (one worker per core, built
/// once per process), so repeated calls (blend selection's steps) spawn no threads.
fn on_workers<R: Send>(threads: usize, job: impl FnOnce() -> R + Send) -> R {
    if threads == 0 {
        job()
    } else {
        pool_with(threads, || {}).install(job)
    }
}

/// `f` over `items` on `threads` workers (0 = one per core), results in input order.
pub fn map<T: Sync, R: Send>(
    threads: usize,
    items: &[T],
    f: impl Fn(&T) -> R + Sync + Send,
) -> Vec<R> {
    if threads == 1 || items.len() <= 1 {
        return items.iter().map(f).collect();
    }
    on_workers(threads, || items.par_iter().map(f).collect())
}

/// `f` over `0..n` on `threads` workers (0 = one per core), results in index order.
pub fn map_range<R: Send>(
    threads: usize,
    n: usize,
    f: impl Fn(usize) -> R + Sync + Send,
) -> Vec<R> {
    if threads == 1 || n <= 1 {
        return (0..n).map(f).collect();
    }
    on_workers(threads, || (0..n).into_par_iter().map(f).collect())
}

/// `f` over `0..n` on an existing pool (one built once for many calls), in index order.
pub fn map_range_on<R: Send>(
    pool: &rayon::ThreadPool,
    n: usize,
    f: impl Fn(usize) -> R + Sync + Send,
) -> Vec<R> {
    pool.install(|| (0..n).into_par_iter().map(f).collect())
}

/// `f` over `0..n` on `threads` workers (0 = one per core), stopping early at an error: the
/// error of the lowest index among those that failed is returned.
pub fn try_for_each_range<E: Send>(
    threads: usize,
    n: usize,
    f: impl Fn(usize) -> Result<(), E> + Sync + Send,
) -> Result<(), E> {
    let failed = std::sync::atomic::AtomicBool::new(false);
    let errors: Vec<(usize, E)> = on_workers(threads, || {
        (0..n)
            .into_par_iter()
            .filter_map(|i| {
                if failed.load(std::sync::atomic::Ordering::Relaxed) {
                    return None;
                }
                f(i).err().map(|e| {
                    failed.store(true, std::sync::atomic::Ordering::Relaxed);
                    (i, e)
                })
            })
            .collect()
    });
    match errors.into_iter().min_by_key(|(i, _)| *i) {
        Some((_, e)) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn results_keep_the_input_order_for_any_thread_count() {
        let items: Vec<u64> = (0..1000).collect();
        for threads in [0, 1, 2, 3, 8] {
            let out = map(threads, &items, |&x| x * x);
            assert_eq!(
                out,
                items.iter().map(|x| x * x).collect::<Vec<_>>(),
                "{threads}"
            );
            assert_eq!(map_range(threads, 5, |i| i + 1), vec![1, 2, 3, 4, 5]);
        }
    }

    #[test]
    fn the_work_is_shared_between_workers() {
        let seen = std::sync::Mutex::new(std::collections::HashSet::new());
        map_range(4, 64, |_| {
            std::thread::sleep(std::time::Duration::from_millis(2));
            seen.lock().unwrap().insert(std::thread::current().id());
        });
        assert!(seen.lock().unwrap().len() > 1);
    }

    #[test]
    fn the_lowest_failing_index_is_reported_and_work_stops_early() {
        let ran = AtomicUsize::new(0);
        let r = try_for_each_range(2, 10_000, |i| {
            ran.fetch_add(1, Ordering::Relaxed);
            if i == 7 || i == 9 {
                Err(i)
            } else {
                Ok(())
            }
        });
        assert_eq!(r, Err(7));
        assert!(ran.load(Ordering::Relaxed) < 10_000);
        assert_eq!(try_for_each_range(0, 100, |_| Ok::<(), ()>(())), Ok(()));
    }

    #[test]
    #[should_panic(expected = "boom")]
    fn a_panic_in_an_item_propagates() {
        map_range(2, 10, |i| {
            if i == 3 {
                panic!("boom");
            }
            i
        });
    }
}
