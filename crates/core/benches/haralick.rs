//! Haralick texture features (mahotas.features.haralick(img, ignore_zeros=False), 4 x 13
//! values) per image on the real plankton fixture images, decoded by our decoder. One thread.
//!
//! mahotas baseline, measured in the same session on the same machine (2-core AMD EPYC VM;
//! mahotas 1.4.19, numpy 2.4.6, CPython 3.11.7; Pillow-decoded pixels, which differ from ours
//! by at most 2 grey levels; best of 5 repeats of a timeit loop) with:
//!
//!     .pyenv-tools/bin/python tests/fixtures/features/haralick/time_mahotas.py
//!
//! | image (rows x cols, levels)        | mahotas  | ours (criterion median) | ratio |
//! |------------------------------------|----------|-------------------------|-------|
//! | actinoptychus_1 (62x74, 256)       | 3630 us  |  72.3 us                |  50x  |
//! | bacillariophyceae_1 (59x36, 188)   | 1927 us  |  31.9 us                |  60x  |
//! | ciliophora_1 (101x102, 199)        | 2198 us  |  73.0 us                |  30x  |
//! | dinoflagellata_1 (53x55, 213)      | 2397 us  |  39.7 us                |  60x  |
//! | noctilucales_1 (412x503, 248)      | 4825 us  | 558.8 us                |   8.6x|
//! | noctilucales_2 (305x77, 211)       | 2614 us  | 112.5 us                |  23x  |
//! | tripos_1 (107x160, 220)            | 2716 us  | 100.5 us                |  27x  |
//! | tripos_2 (188x50, 231)             | 2826 us  |  72.6 us                |  39x  |
//! | all 8 images                       | 23134 us | 1780 us (`all_8_images`; the sum of the per-image medians is 1061 us) | 13x (22x) |
//!
//! mahotas spends its time in NumPy passes over the full (max+1)^2 matrix (about 2 ms even for
//! a tiny image); ours is proportional to pixels + distinct grey-level pairs, so the gap is
//! widest on the small images typical of plankton data.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use plankton_core::decode::{decode_file, DecodeLimits};
use plankton_core::features::haralick::haralick;

fn images() -> Vec<(String, image::GrayImage)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/images");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| {
            let img = decode_file(p, &DecodeLimits::default()).unwrap();
            let stem = p.file_stem().unwrap().to_string_lossy();
            (format!("{stem}_{}x{}", img.height(), img.width()), img)
        })
        .collect()
}

fn bench_haralick(c: &mut Criterion) {
    let imgs = images();
    let mut group = c.benchmark_group("haralick");
    for (name, img) in &imgs {
        group.throughput(Throughput::Elements(1));
        group.bench_function(name.as_str(), |b| {
            b.iter(|| std::hint::black_box(haralick(std::hint::black_box(img))))
        });
    }
    group.throughput(Throughput::Elements(imgs.len() as u64));
    group.bench_function("all_8_images", |b| {
        b.iter(|| {
            for (_, img) in &imgs {
                std::hint::black_box(haralick(std::hint::black_box(img)));
            }
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(2)).warm_up_time(std::time::Duration::from_secs(1));
    targets = bench_haralick
}
criterion_main!(benches);
