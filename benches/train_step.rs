//! One training step of convroll4 on the CPU (`plankton::train::train_step`: forward with
//! dropout, cross-entropy, backward, Nesterov momentum 0.9 with L2 0.0005), batch 32, random
//! inputs and labels. Cases: 95x95 full width, 95x95 quarter width, 47x47 half width (our CPU
//! experiments). `scripts/pytorch_train_step.py` is the same network in PyTorch and
//! `scripts/train_step_compare.sh` compares the two (docs/BENCHMARKS.md).
//!
//! Three modes:
//! - criterion (the default, `cargo bench --bench train_step`): every case at the torch default
//!   thread count, or at each count of `PLANKTON_BENCH_THREADS=1,2`;
//! - a plain timing loop for the comparison script, selected by `PLANKTON_TRAIN_STEP`, e.g.
//!   `PLANKTON_TRAIN_STEP="case=95_w1 threads=2 warmup=3 steps=10 phases=0"`: one case, one
//!   process, one JSON line on stdout with every timed step (`phases=1` additionally splits
//!   the steps into forward+loss / backward / loss read + optimiser step, in the same order of
//!   operations as `train_step`);
//! - `PLANKTON_TRAIN_STEP="case=95_w1 check=FILE"` writes a safetensors file for
//!   `pytorch_train_step.py --check FILE`, which proves the two networks compute the same thing:
//!   the initial parameters, an input batch with labels, the logits without dropout, and the
//!   parameters after two optimiser steps without dropout (`after.<name>`).

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use plankton::model::{ModelConfig, Network, Preset};
use plankton::train::{train_step, Optimizer, TrainConfig};
use tch::{Device, Kind, Tensor};

const BATCH: i64 = 32;
const CLASSES: usize = 121;
const LR: f64 = 0.003;

/// (name, patch size, width).
const CASES: [(&str, usize, f64); 3] = [
    ("95_w1", 95, 1.0),
    ("95_w0.25", 95, 0.25),
    ("47_w0.5", 47, 0.5),
];

struct Setup {
    net: Network,
    optimizer: Optimizer,
    inputs: Vec<Tensor>,
    labels: Tensor,
}

fn setup(size: usize, width: f64) -> Setup {
    tch::manual_seed(0);
    let model_cfg = ModelConfig {
        preset: Preset::Convroll4,
        width,
        ..Default::default()
    };
    let net = Network::new(&model_cfg, &[size], CLASSES, Device::Cpu).expect("convroll4 builds");
    let optimizer = Optimizer::new(
        &TrainConfig {
            weight_decay: 0.0005,
            ..Default::default()
        },
        &net.params,
    );
    let s = size as i64;
    let inputs = vec![Tensor::randn([BATCH, 1, s, s], (Kind::Float, Device::Cpu))];
    let labels = Tensor::randint(CLASSES as i64, [BATCH], (Kind::Int64, Device::Cpu));
    Setup {
        net,
        optimizer,
        inputs,
        labels,
    }
}

fn case(name: &str) -> (usize, f64) {
    CASES
        .iter()
        .find(|c| c.0 == name)
        .map(|c| (c.1, c.2))
        .unwrap_or_else(|| {
            let names: Vec<_> = CASES.iter().map(|c| c.0).collect();
            panic!("unknown case {name:?}; one of {names:?}")
        })
}

fn parse<T: std::str::FromStr>(kv: &str, v: &str) -> T {
    v.parse()
        .unwrap_or_else(|_| panic!("PLANKTON_TRAIN_STEP: bad value in `{kv}`"))
}

/// The comparison script's mode: warm-up steps discarded, then `steps` timed steps.
fn timing_mode(spec: &str) {
    let mut name = "95_w0.25".to_string();
    let mut check = None;
    let (mut threads, mut warmup, mut steps, mut phases) = (0i32, 3usize, 10usize, false);
    for kv in spec.split_whitespace() {
        let (k, v) = kv
            .split_once('=')
            .unwrap_or_else(|| panic!("PLANKTON_TRAIN_STEP: `{kv}` is not key=value"));
        match k {
            "case" => name = v.to_string(),
            "threads" => threads = parse(kv, v),
            "warmup" => warmup = parse(kv, v),
            "steps" => steps = parse(kv, v),
            "phases" => phases = v == "1" || v == "true",
            "check" => check = Some(v.to_string()),
            _ => panic!(
                "PLANKTON_TRAIN_STEP: unknown key `{k}` (case, threads, warmup, steps, phases, check)"
            ),
        }
    }
    if threads > 0 {
        tch::set_num_threads(threads);
    }
    let (size, width) = case(&name);
    let mut s = setup(size, width);
    if let Some(path) = check {
        write_check(&mut s, &path);
        return;
    }
    // Reads the loss back, as the PyTorch side's `loss.item()` does.
    let mut step =
        || train_step(&mut s.net, &mut s.optimizer, &s.inputs, &s.labels, LR).double_value(&[]);
    for _ in 0..warmup {
        std::hint::black_box(step());
    }
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t = Instant::now();
        std::hint::black_box(step());
        times.push(t.elapsed().as_secs_f64());
    }
    let mut phase_times: Vec<[f64; 3]> = Vec::new();
    if phases {
        for _ in 0..steps {
            let t0 = Instant::now();
            let logits = s.net.forward_t(&s.inputs, true);
            let loss = logits.cross_entropy_for_logits(&s.labels);
            let t1 = Instant::now();
            loss.backward();
            let t2 = Instant::now();
            let value = loss.double_value(&[]);
            if value.is_finite() {
                s.optimizer.step(&mut s.net.params, LR);
            }
            let t3 = Instant::now();
            phase_times.push([
                (t1 - t0).as_secs_f64(),
                (t2 - t1).as_secs_f64(),
                (t3 - t2).as_secs_f64(),
            ]);
        }
    }
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.6}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let phase = |i: usize| list(&phase_times.iter().map(|p| p[i]).collect::<Vec<_>>());
    println!(
        "{{\"impl\":\"plankton\",\"case\":\"{name}\",\"threads\":{},\"params\":{},\"step_s\":[{}],\"forward_s\":[{}],\"backward_s\":[{}],\"optimizer_s\":[{}]}}",
        tch::get_num_threads(),
        s.net.parameter_count(),
        list(&times),
        phase(0),
        phase(1),
        phase(2),
    );
}

/// The reference file for the PyTorch side's equivalence check (dropout off: deterministic).
fn write_check(s: &mut Setup, path: &str) {
    let mut named: Vec<(String, Tensor)> = s
        .net
        .params
        .iter()
        .map(|p| (p.name.clone(), p.tensor.detach().copy()))
        .collect();
    named.push(("input".into(), s.inputs[0].copy()));
    named.push(("labels".into(), s.labels.copy()));
    let logits = tch::no_grad(|| s.net.forward_t(&s.inputs, false));
    named.push(("logits".into(), logits));
    for _ in 0..2 {
        let loss = s
            .net
            .forward_t(&s.inputs, false)
            .cross_entropy_for_logits(&s.labels);
        loss.backward();
        s.optimizer.step(&mut s.net.params, LR);
    }
    for p in &s.net.params {
        named.push((format!("after.{}", p.name), p.tensor.detach().copy()));
    }
    Tensor::write_safetensors(&named, path).expect("write the check file");
}

fn bench_train_step(c: &mut Criterion) {
    let threads: Vec<i32> = match std::env::var("PLANKTON_BENCH_THREADS") {
        Ok(v) => v
            .split(',')
            .map(|t| {
                t.trim()
                    .parse()
                    .expect("PLANKTON_BENCH_THREADS: comma-separated counts")
            })
            .collect(),
        Err(_) => vec![tch::get_num_threads()],
    };
    let mut group = c.benchmark_group("train_step");
    // Steps take from ~0.1 s to several seconds: flat sampling, the minimum 10 samples.
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Elements(BATCH as u64));
    for &t in &threads {
        tch::set_num_threads(t);
        for (name, size, width) in CASES {
            let mut s = setup(size, width);
            // Roughly ten steps' worth, so criterion does not warn for the slow cases.
            let t0 = Instant::now();
            train_step(&mut s.net, &mut s.optimizer, &s.inputs, &s.labels, LR).double_value(&[]);
            group.measurement_time((t0.elapsed() * 11).max(Duration::from_secs(2)));
            group.bench_function(
                BenchmarkId::new(format!("convroll4_{name}"), format!("t{t}")),
                |b| {
                    b.iter(|| {
                        train_step(&mut s.net, &mut s.optimizer, &s.inputs, &s.labels, LR)
                            .double_value(&[])
                    })
                },
            );
        }
    }
    group.finish();
}

fn main() {
    if let Ok(spec) = std::env::var("PLANKTON_TRAIN_STEP") {
        timing_mode(&spec);
        return;
    }
    let mut criterion = Criterion::default().configure_from_args();
    bench_train_step(&mut criterion);
    criterion.final_summary();
}
