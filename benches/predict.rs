//! `plankton predict`'s whole job (`plankton::predict::job::run`: load the run, read + decode
//! every image once, warp it by each test-time transform, ZMUV, batch, forward, aggregate the
//! views, write the Parquet file) on the CPU, with 1 (a single un-augmented pass, the baseline),
//! 10 and 70 (the reference's count) transforms per image. Throughput is patches
//! (images x transforms) per second; images/s = patches/s / transforms.
//!
//! Data: 24 synthetic test images (`plankton synth`, seed 1). Networks: the demo's
//! (`pipelines/demo-train.toml`: quarter-width cyclic convroll4 on 47x47, batch 16) and the
//! full-width reference convroll4 on 95x95 (batch 32) with 1 and 10 transforms. The run
//! directories are written without training (random initial weights: the cost of a forward
//! pass does not depend on the weights' values).
//!
//! Where the time goes:
//! - `load_only` (both networks): the job's fixed cost, reading, hashing and loading the weights
//!   into a new network (throughput: loads/s);
//! - on the same images and transforms, demo network only:
//!   - `loader_only`: the data path alone (decode once, 70 warps per image, ZMUV, batches), no
//!     model;
//!   - `forward_only`: the network alone on the same number of patches (random batches of the
//!     job's batch size), no data path.
//!
//! Knobs: `PLANKTON_BENCH_THREADS=1,2` (libtorch intra-op threads; default: torch's own count),
//! `PLANKTON_BENCH_TTA=1,10,70` (demo network), `PLANKTON_BENCH_REFERENCE=1,10` (reference
//! network; `0` leaves it out).
//! Reproduce: `cargo bench --bench predict` (docs/BENCHMARKS.md).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use plankton::config::PipelineConfig;
use plankton::model::Network;
use plankton::predict::job::{run, LoadedModel, PredictOptions, Subset, Weights};
use plankton::predict::tta::quasi_random_transforms;
use plankton::sources::synth::{generate, SynthOptions};
use plankton::sources::Dataset;
use plankton::stages::normalise::{Zmuv, ZmuvStats};
use plankton::topology::{Loader, LoaderSpec, SamplePlan};
use tch::{Device, Kind, Tensor};

fn env_list(name: &str, default: Vec<usize>) -> Vec<usize> {
    match std::env::var(name) {
        Ok(v) => v
            .split(',')
            .map(|t| {
                t.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}: comma-separated counts"))
            })
            .collect(),
        Err(_) => default,
    }
}

/// A run directory as `plankton train` leaves it, without training: pipeline.toml,
/// classes.txt, zmuv.json and the initial weights as model.safetensors.
fn make_run(dir: &Path, cfg: &PipelineConfig, classes: &[String]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("pipeline.toml"),
        toml::to_string_pretty(cfg).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("classes.txt"), classes.join("\n") + "\n").unwrap();
    ZmuvStats {
        inputs: vec![
            Zmuv {
                mean: 0.2,
                std: 0.3
            };
            cfg.patches.len()
        ],
        samples: 1024,
        seed: 1,
    }
    .save(&dir.join("zmuv.json"))
    .unwrap();
    tch::manual_seed(0);
    let sizes = plankton::train::patch_sizes(cfg).unwrap();
    let t0 = Instant::now();
    let net = Network::new(&cfg.model, &sizes, classes.len(), Device::Cpu).unwrap();
    let built = t0.elapsed();
    net.save(&dir.join("model.safetensors")).unwrap();
    let bytes = std::fs::metadata(dir.join("model.safetensors"))
        .unwrap()
        .len();
    eprintln!(
        "{}: weights {:.1} MB, Network::new (initialisation) {:.3} s",
        dir.display(),
        bytes as f64 / 1e6,
        built.as_secs_f64()
    );
    dir.to_path_buf()
}

fn predict_once(
    rt: &tokio::runtime::Runtime,
    run_dir: &Path,
    data: &Path,
    out: &Path,
    tta: usize,
) -> (usize, usize) {
    let mut opts = PredictOptions::new(run_dir, vec![data.to_path_buf()], out);
    opts.subset = Subset::Test;
    opts.weights = Weights::Final;
    opts.calibrate = false;
    opts.tta = Some(tta);
    let s = run(&opts, rt.handle(), &mut |_| {}).unwrap();
    assert_eq!(s.predicted, s.images, "every image predicted");
    (s.images, s.views)
}

fn bench_predict(c: &mut Criterion) {
    let threads = env_list(
        "PLANKTON_BENCH_THREADS",
        vec![tch::get_num_threads() as usize],
    );
    let ttas = env_list("PLANKTON_BENCH_TTA", vec![1, 10, 70]);
    // The full-width net's transform counts (0: leave it out). Not 70: one such job takes
    // about 40 s on 2 cores.
    let mut reference_ttas = env_list("PLANKTON_BENCH_REFERENCE", vec![1, 10]);
    reference_ttas.retain(|&n| n > 0);

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    generate(
        &SynthOptions {
            classes: 6,
            per_class: 2,
            test: 24,
            seed: 1,
            threads: 0,
        },
        &data,
    )
    .unwrap();
    let ds = Dataset::open(&data).unwrap();
    let records = Arc::new(ds.test.clone());
    let out = dir.path().join("predictions.parquet");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    let demo_cfg = plankton::demo::embedded_train_pipeline();
    let mut cases = vec![(
        "demo_47_w0.25",
        make_run(&dir.path().join("demo"), &demo_cfg, &ds.class_names),
        demo_cfg.clone(),
        ttas.clone(),
    )];
    if !reference_ttas.is_empty() {
        let cfg = PipelineConfig::reference_default();
        cases.push((
            "reference_95_w1",
            make_run(&dir.path().join("reference"), &cfg, &ds.class_names),
            cfg,
            reference_ttas,
        ));
    }

    let mut group = c.benchmark_group("predict");
    // Iterations take from ~0.1 s to many seconds: flat sampling, the minimum 10 samples.
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1));
    for &t in &threads {
        tch::set_num_threads(t as i32);
        eprintln!(
            "predict bench: libtorch threads {}, {} images, {} cores",
            tch::get_num_threads(),
            records.len(),
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
        for (name, run_dir, cfg, ttas) in &cases {
            for &tta in ttas {
                // One untimed job: the patch count, and ten jobs' worth of measurement time.
                let t0 = Instant::now();
                let (images, views) = predict_once(&rt, run_dir, &data, &out, tta);
                let once = t0.elapsed();
                eprintln!(
                    "{name} tta {tta}: one untimed job {:.2} s",
                    once.as_secs_f64()
                );
                group.throughput(Throughput::Elements((images * views) as u64));
                group.measurement_time((once * 11).max(Duration::from_secs(2)));
                group.bench_function(
                    BenchmarkId::new(format!("{name}_tta{tta}"), format!("t{t}")),
                    |b| b.iter(|| predict_once(&rt, run_dir, &data, &out, tta)),
                );
            }
            // The job's fixed cost: reading, hashing and loading the weights into a new network.
            group.throughput(Throughput::Elements(1));
            group.measurement_time(Duration::from_secs(2));
            group.bench_function(
                BenchmarkId::new(format!("{name}_load_only"), format!("t{t}")),
                |b| {
                    b.iter(|| {
                        LoadedModel::load(run_dir, &Weights::Final, Device::Cpu, false).unwrap()
                    })
                },
            );
            if *name != "demo_47_w0.25" {
                continue;
            }
            let views = *ttas.iter().max().unwrap();
            let patches = records.len() * views;
            group.throughput(Throughput::Elements(patches as u64));

            // The data path alone, set up as the job sets it up (no decode cache, ordered, fixed
            // views, the same reorder window).
            let transforms = Arc::new(quasi_random_transforms(
                &plankton::predict::tta::TtaConfig {
                    transforms: views,
                    ..cfg.tta.clone()
                },
            ));
            let mut loader_cfg = cfg.clone();
            loader_cfg.loader.cache_decoded = false;
            let workers = loader_cfg.worker_count();
            let per_batch = loader_cfg.batch.size.div_ceil(views);
            loader_cfg.loader.reorder_window = loader_cfg
                .loader
                .reorder_window
                .min((2 * workers).max(per_batch * (loader_cfg.channels.batches + 1)) + workers);
            let load = || {
                rt.block_on(async {
                    let spec = LoaderSpec {
                        records: records.clone(),
                        plan: SamplePlan::Ordered { epochs: 1 },
                        augment: false,
                        zmuv: Some(vec![Zmuv {
                            mean: 0.2,
                            std: 0.3,
                        }]),
                        first_epoch: 0,
                        views: Some(transforms.clone()),
                    };
                    let mut loader = Loader::spawn(&loader_cfg, spec).unwrap();
                    let mut n = 0;
                    while let Some(batch) = loader.next_batch().await {
                        n += batch.len;
                    }
                    loader.finish().await.unwrap();
                    assert_eq!(n, patches);
                    std::hint::black_box(n)
                })
            };
            group.measurement_time(Duration::from_secs(3));
            group.bench_function(
                BenchmarkId::new(format!("{name}_loader_only_tta{views}"), format!("t{t}")),
                |b| b.iter(load),
            );

            // The network alone on the same number of patches, in the job's batches.
            tch::manual_seed(0);
            let sizes = plankton::train::patch_sizes(cfg).unwrap();
            let net = Network::new(&cfg.model, &sizes, ds.class_names.len(), Device::Cpu).unwrap();
            let bs = cfg.batch.size;
            let s = sizes[0] as i64;
            let full = Tensor::randn([bs as i64, 1, s, s], (Kind::Float, Device::Cpu));
            let last = patches % bs;
            let tail = Tensor::randn([last as i64, 1, s, s], (Kind::Float, Device::Cpu));
            let forward = || {
                let _guard = tch::no_grad_guard();
                for _ in 0..patches / bs {
                    let p = net
                        .forward_t(std::slice::from_ref(&full), false)
                        .log_softmax(-1, Kind::Float);
                    std::hint::black_box(Vec::<f32>::try_from(p.flatten(0, -1)).unwrap());
                }
                if last > 0 {
                    let p = net
                        .forward_t(std::slice::from_ref(&tail), false)
                        .log_softmax(-1, Kind::Float);
                    std::hint::black_box(Vec::<f32>::try_from(p.flatten(0, -1)).unwrap());
                }
            };
            let t0 = Instant::now();
            forward();
            group.measurement_time((t0.elapsed() * 11).max(Duration::from_secs(2)));
            group.bench_function(
                BenchmarkId::new(format!("{name}_forward_only_tta{views}"), format!("t{t}")),
                |b| b.iter(forward),
            );
        }
    }
    group.finish();
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    bench_predict(&mut criterion);
    criterion.final_summary();
}
