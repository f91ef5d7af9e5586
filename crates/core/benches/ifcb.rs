//! IFCB bin reading, against libifcb on the same files (scripts/ifcb_read_bench.py):
//!
//!     python3 -m venv /tmp/ifcbbench/venv && /tmp/ifcbbench/venv/bin/pip install libifcb==0.8.1
//!     /tmp/ifcbbench/venv/bin/python scripts/ifcb_read_bench.py --make /tmp/ifcbbench/bin --rois 5000 --seed 0
//!     PLANKTON_IFCB_BENCH_BIN=/tmp/ifcbbench/bin/D20240611T010000_IFCB104.hdr \
//!         cargo bench -p plankton-core --bench ifcb
//!     /tmp/ifcbbench/venv/bin/python scripts/ifcb_read_bench.py --read /tmp/ifcbbench/bin/D20240611T010000_IFCB104.hdr
//!
//! Without the variable, a bin of 5,000 ROIs of the same size ranges is written to a temporary
//! folder. Two paths are timed, both from the files (warm in the page cache): the whole bin
//! read at once (`Bin::open` + `images`), and every ROI read by its pid path as the data path
//! does (`decode_file` on `<folder>/<roi pid>`, the ADC parsed once and cached). One thread.

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use plankton_core::decode::{decode_file, DecodeLimits};
use plankton_core::ifcb::{write_bin, Bin};

fn bench_ifcb(c: &mut Criterion) {
    let _tmp;
    let hdr = match std::env::var_os("PLANKTON_IFCB_BENCH_BIN") {
        Some(p) => PathBuf::from(p),
        None => {
            _tmp = tempfile::tempdir().unwrap();
            let mut state = 0x9e37_79b9_7f4a_7c15u64;
            let mut next = move |n: u32| {
                state = plankton_core::rng::mix64(state);
                (state % n as u64) as u32
            };
            let images: Vec<image::GrayImage> = (0..5000)
                .map(|_| {
                    let (w, h) = (40 + next(361), 30 + next(171));
                    image::GrayImage::from_fn(w, h, |x, y| image::Luma([(x ^ y) as u8]))
                })
                .collect();
            write_bin(_tmp.path(), "D20240611T010000_IFCB104", &images).unwrap()
        }
    };
    let bin = Bin::open(&hdr).unwrap();
    let paths: Vec<PathBuf> = bin.rois.iter().map(|r| bin.roi_path(r)).collect();
    let limits = DecodeLimits::default();
    let mut group = c.benchmark_group("ifcb");
    group.throughput(Throughput::Elements(bin.rois.len() as u64));
    group.sample_size(10);
    group.bench_function("whole_bin_open_and_all_pixels", |b| {
        b.iter(|| {
            let bin = Bin::open(&hdr).unwrap();
            std::hint::black_box(bin.images().unwrap());
        })
    });
    group.bench_function("every_roi_by_pid_path", |b| {
        b.iter(|| {
            for p in &paths {
                std::hint::black_box(decode_file(p, &limits).unwrap());
            }
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(std::time::Duration::from_secs(5)).warm_up_time(std::time::Duration::from_secs(1));
    targets = bench_ifcb
}
criterion_main!(benches);
