//! The loader topology: determinism across worker counts, order, partial batches, ZMUV,
//! early consumer exit, multiscale inputs.

use std::sync::Arc;

use plankton::config::{PatchConfig, PipelineConfig};
use plankton::device::BatchTensors;
use plankton::sources::{synth, Dataset, ImageRecord};
use plankton::topology::{Loader, LoaderSpec, SamplePlan};

fn dataset(classes: usize, per_class: usize) -> (tempfile::TempDir, Dataset) {
    let dir = tempfile::tempdir().unwrap();
    let opts = synth::SynthOptions {
        classes,
        per_class,
        test: 0,
        seed: 5,
        threads: 0,
    };
    synth::generate(&opts, dir.path()).unwrap();
    let ds = Dataset::open(dir.path()).unwrap();
    (dir, ds)
}

fn small_cfg(workers: usize) -> PipelineConfig {
    let mut cfg = PipelineConfig::reference_default();
    cfg.loader.workers = workers;
    cfg.patches = vec![PatchConfig::size_normalised(31, 27.0)];
    cfg.batch.size = 8;
    cfg.channels.records = 4;
    cfg.channels.samples = 3;
    cfg.channels.batches = 2;
    cfg.loader.reorder_window = 16;
    cfg
}

/// (epoch, number, labels, record indices, raw bits of every input) per batch.
type Snapshot = Vec<(u64, u64, Vec<i64>, Vec<usize>, Vec<Vec<u32>>)>;

async fn run(
    cfg: &PipelineConfig,
    records: Arc<Vec<ImageRecord>>,
    plan: SamplePlan,
    augment: bool,
) -> Snapshot {
    let spec = LoaderSpec {
        records,
        plan,
        augment,
        zmuv: None,
        first_epoch: 0,
        views: None,
    };
    let mut loader = Loader::spawn(cfg, spec).unwrap();
    let mut out = Vec::new();
    while let Some(b) = loader.next_batch().await {
        let inputs = (0..b.shapes.len())
            .map(|k| b.input(k).iter().map(|v| v.to_bits()).collect())
            .collect();
        out.push((
            b.epoch,
            b.number,
            b.labels.clone(),
            b.record_indices.clone(),
            inputs,
        ));
    }
    let summary = loader.finish().await.unwrap();
    assert!(summary.failures.is_empty(), "{:?}", summary.failures);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_identical_for_any_worker_count() {
    let (_dir, ds) = dataset(4, 9);
    let records = Arc::new(ds.train.clone());
    let plan = SamplePlan::Shuffled { epochs: 2 };
    let one = run(&small_cfg(1), records.clone(), plan, true).await;
    let two = run(&small_cfg(2), records.clone(), plan, true).await;
    let five = run(&small_cfg(5), records.clone(), plan, true).await;
    assert_eq!(one.len(), 2 * 36usize.div_ceil(8));
    assert!(
        one == two && two == five,
        "worker count changed the batches"
    );
    let mut uncached = small_cfg(2);
    uncached.loader.cache_decoded = false;
    let without_cache = run(&uncached, records.clone(), plan, true).await;
    assert!(without_cache == one, "the decode cache changed the batches");
    // Epochs differ in order and augmentation.
    let e0: Vec<usize> = one
        .iter()
        .filter(|b| b.0 == 0)
        .flat_map(|b| b.3.clone())
        .collect();
    let e1: Vec<usize> = one
        .iter()
        .filter(|b| b.0 == 1)
        .flat_map(|b| b.3.clone())
        .collect();
    assert_ne!(e0, e1);
    let mut sorted = e0.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        (0..36).collect::<Vec<_>>(),
        "each record once per epoch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_plan_preserves_listing_order_and_handles_the_partial_batch() {
    let (_dir, ds) = dataset(2, 5);
    let records = Arc::new(ds.train.clone());
    let batches = run(
        &small_cfg(3),
        records.clone(),
        SamplePlan::Ordered { epochs: 1 },
        false,
    )
    .await;
    let sizes: Vec<usize> = batches.iter().map(|b| b.3.len()).collect();
    assert_eq!(sizes, vec![8, 2]);
    let order: Vec<usize> = batches.iter().flat_map(|b| b.3.clone()).collect();
    assert_eq!(order, (0..10).collect::<Vec<_>>());
    let labels: Vec<i64> = batches.iter().flat_map(|b| b.2.clone()).collect();
    assert_eq!(
        labels,
        records
            .iter()
            .map(|r| r.label.unwrap() as i64)
            .collect::<Vec<_>>()
    );

    let mut cfg = small_cfg(2);
    cfg.batch.drop_last = true;
    let dropped = run(&cfg, records, SamplePlan::Ordered { epochs: 1 }, false).await;
    assert_eq!(
        dropped.iter().map(|b| b.3.len()).collect::<Vec<_>>(),
        vec![8]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zmuv_estimate_normalises_augmented_batches() {
    let (_dir, ds) = dataset(3, 10);
    let mut cfg = small_cfg(2);
    cfg.zmuv.samples = 200;
    let records = Arc::new(ds.train.clone());
    let (stats, summary) = plankton::data_path::estimate_zmuv(&cfg, records.clone())
        .await
        .unwrap();
    assert_eq!(summary.samples, 200);
    let z = stats.inputs[0];
    assert!(z.mean > 0.0 && z.mean < 1.0 && z.std > 0.0, "{z:?}");
    let spec = LoaderSpec {
        records,
        plan: SamplePlan::Shuffled { epochs: 3 },
        augment: true,
        zmuv: Some(stats.inputs.clone()),
        first_epoch: 7,
        views: None,
    };
    let mut loader = Loader::spawn(&cfg, spec).unwrap();
    let (mut n, mut sum, mut sumsq) = (0f64, 0f64, 0f64);
    while let Some(b) = loader.next_batch().await {
        for &x in b.input(0) {
            n += 1.0;
            sum += x as f64;
            sumsq += (x as f64).powi(2);
        }
    }
    loader.finish().await.unwrap();
    let mean = sum / n;
    let std = (sumsq / n - mean * mean).sqrt();
    assert!(
        mean.abs() < 0.1 && (std - 1.0).abs() < 0.1,
        "normalised mean {mean} std {std}"
    );
}

/// With a long plan the source runs ahead until the reorder window is full and parks there; a
/// consumer that stops must still be able to finish (a trainer stops after its last step).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_may_stop_early_while_the_source_waits_on_the_window() {
    let (_dir, ds) = dataset(2, 20);
    let mut cfg = small_cfg(2);
    cfg.loader.reorder_window = 4;
    let spec = LoaderSpec {
        records: Arc::new(ds.train.clone()),
        plan: SamplePlan::Shuffled { epochs: 1_000_000 },
        augment: true,
        zmuv: None,
        first_epoch: 0,
        views: None,
    };
    let mut loader = Loader::spawn(&cfg, spec).unwrap();
    for _ in 0..3 {
        loader.next_batch().await.unwrap();
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    tokio::time::timeout(std::time::Duration::from_secs(20), loader.finish())
        .await
        .expect("finish hung")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_may_stop_early_without_hanging() {
    let (_dir, ds) = dataset(2, 20);
    let cfg = small_cfg(2);
    let spec = LoaderSpec {
        records: Arc::new(ds.train.clone()),
        plan: SamplePlan::Shuffled { epochs: 50 },
        augment: true,
        zmuv: None,
        first_epoch: 0,
        views: None,
    };
    let mut loader = Loader::spawn(&cfg, spec).unwrap();
    let first = loader.next_batch().await.unwrap();
    assert_eq!(first.len, 8);
    drop(first);
    let summary = tokio::time::timeout(std::time::Duration::from_secs(20), loader.finish())
        .await
        .expect("finish hung")
        .unwrap();
    assert!(summary.samples < 50 * 40, "pipeline stopped early");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multiscale_batches_carry_one_tensor_per_input() {
    let (_dir, ds) = dataset(2, 4);
    let mut cfg = small_cfg(2);
    cfg.patches = vec![
        PatchConfig::size_normalised(95, 85.0),
        PatchConfig::fixed_scale(47, 5.0),
    ];
    let spec = LoaderSpec {
        records: Arc::new(ds.train.clone()),
        plan: SamplePlan::Ordered { epochs: 1 },
        augment: true,
        zmuv: None,
        first_epoch: 0,
        views: None,
    };
    let mut loader = Loader::spawn(&cfg, spec).unwrap();
    let b = loader.next_batch().await.unwrap();
    assert_eq!(b.input_tensor(0).size(), vec![8, 1, 95, 95]);
    assert_eq!(b.input_tensor(1).size(), vec![8, 1, 47, 47]);
    assert_eq!(b.labels_tensor().size(), vec![8]);
    drop(b);
    while loader.next_batch().await.is_some() {}
    loader.finish().await.unwrap();
}

/// Test-time augmentation: each record decoded once, one sample per fixed view, consecutively
/// and in view order, whatever the worker count; each view is exactly the warp of its transform.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_views_give_one_sample_per_transform_in_order() {
    use plankton::imgproc::Augmentation;
    use plankton::stages::decode::decode_file;
    use plankton::stages::warp::make_patch;
    let (_dir, ds) = dataset(2, 4);
    let records = Arc::new(ds.train.clone());
    let views: Vec<Augmentation> = (0..3)
        .map(|i| Augmentation {
            rotation_deg: 40.0 * i as f64,
            flip: i == 2,
            ..Augmentation::IDENTITY
        })
        .collect();
    let views = Arc::new(views);
    let collect = |workers: usize| {
        let records = records.clone();
        let views = views.clone();
        async move {
            let cfg = small_cfg(workers);
            let spec = LoaderSpec {
                records,
                plan: SamplePlan::Ordered { epochs: 1 },
                augment: true, // ignored: the views decide
                zmuv: None,
                first_epoch: 0,
                views: Some(views),
            };
            let mut loader = Loader::spawn(&cfg, spec).unwrap();
            let (mut order, mut patches) = (Vec::new(), Vec::new());
            while let Some(b) = loader.next_batch().await {
                order.extend_from_slice(&b.record_indices[..b.len]);
                let n = 31 * 31;
                for i in 0..b.len {
                    patches.push(b.input(0)[i * n..(i + 1) * n].to_vec());
                }
            }
            let summary = loader.finish().await.unwrap();
            assert_eq!(summary.samples, 24);
            (order, patches)
        }
    };
    let (order, patches) = collect(1).await;
    assert_eq!(order, (0..8).flat_map(|r| [r, r, r]).collect::<Vec<_>>());
    assert_eq!(collect(3).await, (order, patches.clone()));
    let cfg = small_cfg(1);
    let img = decode_file(&records[5].path, &cfg.decode).unwrap();
    for (v, aug) in views.iter().enumerate() {
        let mut expected = vec![0f32; 31 * 31];
        make_patch(&img, &cfg.patches[0], aug, &mut expected);
        assert_eq!(patches[5 * 3 + v], expected, "view {v} of record 5");
    }
    assert_ne!(patches[15], patches[16]);
}

/// The batch stage's buffers become `N x 1 x H x W` tensors sample by sample, row-major, with
/// -1 for an unlabelled sample (the batch stage itself knows nothing of libtorch).
#[test]
fn batch_tensors_are_n_1_h_w_and_unlabelled_is_minus_one() {
    let patches = [PatchConfig {
        rows: 2,
        cols: 3,
        ..PatchConfig::size_normalised(2, 2.0)
    }];
    let mut b = plankton::stages::batch::Batch::new(4, &patches);
    b.push(&[vec![1., 2., 3., 4., 5., 6.]], Some(1), 0);
    b.push(&[vec![7., 8., 9., 10., 11., 12.]], None, 1);
    let t = b.input_tensor(0);
    assert_eq!(t.size(), vec![2, 1, 2, 3]);
    assert_eq!(t.double_value(&[1, 0, 1, 2]), 12.0);
    assert_eq!(t.double_value(&[0, 0, 1, 0]), 4.0);
    assert_eq!(
        Vec::<i64>::try_from(b.labels_tensor()).unwrap(),
        vec![1, -1]
    );
}
