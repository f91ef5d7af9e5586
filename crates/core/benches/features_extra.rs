//! Zernike moments, local binary patterns and parameter-free TAS per image on the real
//! plankton fixture images, decoded by our decoder. One thread.
//!
//! mahotas baseline, measured in the same session on the same machine (2-core AMD EPYC VM;
//! mahotas 1.4.19, numpy 2.4.6, CPython 3.11.7; Pillow-decoded pixels, which differ from ours
//! by at most 2 grey levels; best of 5 repeats of a timeit loop) with:
//!
//!     .pyenv-tools/bin/python tests/fixtures/features/lbp/time_mahotas_extra.py
//!
//! mahotas / ours (criterion median), run of 2026-11-29 (full table: docs/BENCHMARKS.md,
//! "Zernike, LBP and TAS vs mahotas"):
//!
//! | image (rows x cols)          | zernike | lbp  | tas  |
//! |------------------------------|---------|------|------|
//! | actinoptychus_1 (62x74)      | 18x     | 48x  | 29x  |
//! | bacillariophyceae_1 (59x36)  | 18x     | 40x  | 31x  |
//! | ciliophora_1 (101x102)       | 22x     | 70x  | 33x  |
//! | dinoflagellata_1 (53x55)     | 18x     | 45x  | 27x  |
//! | noctilucales_1 (412x503)     | 53x     | 200x | 37x  |
//! | noctilucales_2 (305x77)      | 20x     | 79x  | 47x  |
//! | tripos_1 (107x160)           | 20x     | 81x  | 34x  |
//! | tripos_2 (188x50)            | 20x     | 54x  | 31x  |
//! | all 8 images (`all_8_images`)| 26x (9.8 ms / 0.38 ms) | 147x (31.3 / 0.21 ms) | 35x (23.8 / 0.67 ms) |

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use plankton_core::decode::{decode_file, DecodeLimits};
use plankton_core::features::{lbp::lbp, tas::pftas, zernike::zernike};

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

fn bench_kernel<T>(
    c: &mut Criterion,
    group: &str,
    imgs: &[(String, image::GrayImage)],
    f: fn(&image::GrayImage) -> T,
) {
    let mut g = c.benchmark_group(group);
    for (name, img) in imgs {
        g.throughput(Throughput::Elements(1));
        g.bench_function(name.as_str(), |b| {
            b.iter(|| std::hint::black_box(f(std::hint::black_box(img))))
        });
    }
    g.throughput(Throughput::Elements(imgs.len() as u64));
    g.bench_function("all_8_images", |b| {
        b.iter(|| {
            for (_, img) in imgs {
                std::hint::black_box(f(std::hint::black_box(img)));
            }
        })
    });
    g.finish();
}

fn bench_features_extra(c: &mut Criterion) {
    let imgs = images();
    bench_kernel(c, "zernike", &imgs, zernike);
    bench_kernel(c, "lbp", &imgs, lbp);
    bench_kernel(c, "tas", &imgs, pftas);
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(2)).warm_up_time(std::time::Duration::from_secs(1));
    targets = bench_features_extra
}
criterion_main!(benches);
