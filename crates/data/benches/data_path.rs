//! The whole data path (read file, decode, warp+augment 95x95, ZMUV, batch of 32) over a
//! synthetic competition-layout dataset (1000 images), with all cores, with and without the
//! decode cache.
//! Throughput is samples (training patches) per second.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use plankton_data::config::PipelineConfig;
use plankton_data::sources::{synth, Dataset};
use plankton_data::stages::normalise::Zmuv;
use plankton_data::topology::{Loader, LoaderSpec, SamplePlan};

fn bench_data_path(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    synth::generate(
        &synth::SynthOptions {
            classes: 20,
            per_class: 50,
            test: 0,
            seed: 1,
            threads: 0,
        },
        dir.path(),
    )
    .unwrap();
    let ds = Dataset::open(dir.path()).unwrap();
    let records = Arc::new(ds.train);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("data_path");
    for cache in [true, false] {
        // The cache only pays from the second epoch on: the cached run does 4 epochs in one
        // loader (first epoch decodes), the uncached one a single epoch.
        let epochs = if cache { 4 } else { 1 };
        group.throughput(Throughput::Elements(epochs * records.len() as u64));
        let mut cfg = PipelineConfig::reference_default();
        cfg.loader.cache_decoded = cache;
        let name = if cache {
            "epoch_95x95_cached_decode"
        } else {
            "epoch_95x95_decode_every_file"
        };
        group.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    let spec = LoaderSpec {
                        records: records.clone(),
                        plan: SamplePlan::Shuffled { epochs },
                        augment: true,
                        zmuv: Some(vec![Zmuv {
                            mean: 0.2,
                            std: 0.3,
                        }]),
                        first_epoch: 0,
                        views: None,
                    };
                    let mut loader = Loader::spawn(&cfg, spec).unwrap();
                    let mut n = 0;
                    while let Some(batch) = loader.next_batch().await {
                        n += batch.len;
                    }
                    loader.finish().await.unwrap();
                    std::hint::black_box(n)
                })
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(std::time::Duration::from_secs(5)).warm_up_time(std::time::Duration::from_secs(1));
    targets = bench_data_path
}
criterion_main!(benches);
