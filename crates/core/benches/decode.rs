//! Decode throughput: JPEG bytes already in memory -> 8-bit grayscale (what
//! scripts/baseline_bench.py times for Pillow), on the real plankton fixture images. One thread.

use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use plankton_core::decode::{decode_bytes, DecodeLimits};

fn bench_decode(c: &mut Criterion) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/images");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    files.sort();
    let blobs: Vec<(std::path::PathBuf, Vec<u8>)> = files
        .iter()
        .map(|p| (p.clone(), std::fs::read(p).unwrap()))
        .collect();
    let limits = DecodeLimits::default();
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(blobs.len() as u64));
    group.bench_function("jpeg_to_gray_fixture_images", |b| {
        b.iter(|| {
            for (p, bytes) in &blobs {
                std::hint::black_box(decode_bytes(bytes, p, &limits).unwrap());
            }
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(3)).warm_up_time(std::time::Duration::from_secs(1));
    targets = bench_decode
}
criterion_main!(benches);
