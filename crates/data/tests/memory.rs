//! No memory growth over epochs: after the decode cache is warm (epoch 0), the resident set
//! stays flat while the loader runs more epochs (buffers are pooled, queues bounded).
//! Own test binary so no other test shares the process while RSS is read.

use std::sync::Arc;

use plankton_data::config::{PatchConfig, PipelineConfig};
use plankton_data::sources::{synth, Dataset};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resident_memory_is_flat_across_epochs() {
    if plankton_data::telemetry::current_rss_bytes().is_none() {
        eprintln!("no /proc/self/status here: nothing to measure");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    synth::generate(
        &synth::SynthOptions {
            classes: 6,
            per_class: 40,
            test: 0,
            seed: 11,
            threads: 0,
        },
        dir.path(),
    )
    .unwrap();
    let ds = Dataset::open(dir.path()).unwrap();
    let mut cfg = PipelineConfig::reference_default();
    cfg.patches = vec![PatchConfig::size_normalised(63, 56.0)];
    let epochs = 10;
    let report =
        plankton_data::data_path::loader_bench(&cfg, Arc::new(ds.train), epochs, |_, _| {})
            .await
            .unwrap();
    let rss = &report.rss_after_epoch;
    assert_eq!(rss.len(), epochs as usize);
    let mib = |b: u64| b as f64 / 1048576.0;
    eprintln!(
        "RSS after each epoch (MiB): {:?}",
        rss.iter()
            .map(|&b| format!("{:.1}", mib(b)))
            .collect::<Vec<_>>()
    );
    // From epoch 1 on the cache is full. Allow 8 MiB of allocator noise: leaking every
    // 63x63 patch would add 240 x 15.9 kB = 3.8 MB per epoch, 34 MB over the nine epochs.
    let settled = rss[1];
    let last = *rss.last().unwrap();
    assert!(
        last <= settled + 8 * 1048576,
        "RSS grew from {:.1} to {:.1} MiB over {} epochs",
        mib(settled),
        mib(last),
        epochs - 1
    );
}
