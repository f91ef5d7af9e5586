//! Affine warp throughput: 95x95 size-normalised training patches with random augmentation, cut
//! from the real plankton fixture images (the same work scripts/baseline_bench.py times for
//! scikit-image). One thread.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use plankton_core::imgproc::{patch_transform, warp_inverted, GrayView};
use plankton_data::config::{AugmentConfig, PatchConfig};
use plankton_data::stages::decode::{decode_file, DecodeLimits};
use plankton_data::stages::warp::{augmentation_for, make_patch};

fn images() -> Vec<image::GrayImage> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/images");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| decode_file(p, &DecodeLimits::default()).unwrap())
        .collect()
}

fn bench_warp(c: &mut Criterion) {
    let imgs = images();
    let aug = AugmentConfig::default();
    let mut group = c.benchmark_group("warp");
    for (name, patch) in [
        (
            "95x95_size_normalised",
            PatchConfig::size_normalised(95, 85.0),
        ),
        ("47x47_fixed_ds5", PatchConfig::fixed_scale(47, 5.0)),
    ] {
        // Precomputed matrices: the kernel alone, as the scikit-image `_warp_fast` baseline.
        let jobs: Vec<_> = (0..256)
            .map(|i| {
                let img = &imgs[i % imgs.len()];
                let (rows, cols) = (img.height() as usize, img.width() as usize);
                let a = augmentation_for(&aug, 1, 0, i as u64);
                (
                    i % imgs.len(),
                    patch_transform(rows, cols, patch.rows, patch.cols, patch.ds(rows, cols), &a),
                )
            })
            .collect();
        let mut out = vec![0.0f32; patch.pixels()];
        group.throughput(Throughput::Elements(jobs.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                for (k, m) in &jobs {
                    let img = &imgs[*k];
                    let src =
                        GrayView::new(img.as_raw(), img.height() as usize, img.width() as usize);
                    warp_inverted(&src, m, &mut out, patch.rows, patch.cols, 0.0);
                }
                std::hint::black_box(&out);
            })
        });
    }
    group.finish();

    // The whole make_patch (matrix + warp) on 47x47 patches (the planktonclas pipelines), with
    // and without the anti-aliased pre-downscale; the eight images are 36-503 px, so some of
    // them are shrunk first and some are not.
    let mut group = c.benchmark_group("make_patch_47");
    let augs: Vec<_> = (0..256).map(|i| augmentation_for(&aug, 1, 0, i)).collect();
    for antialias in [false, true] {
        let patch = PatchConfig {
            antialias,
            ..PatchConfig::size_normalised(47, 42.0)
        };
        let mut out = vec![0.0f32; patch.pixels()];
        group.throughput(Throughput::Elements(augs.len() as u64));
        let name = if antialias { "antialias" } else { "reference" };
        group.bench_function(name, |b| {
            b.iter(|| {
                for (i, a) in augs.iter().enumerate() {
                    make_patch(&imgs[i % imgs.len()], &patch, a, &mut out);
                }
                std::hint::black_box(&out);
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(3)).warm_up_time(std::time::Duration::from_secs(1));
    targets = bench_warp
}
criterion_main!(benches);
