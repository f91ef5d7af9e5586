//! The cyclic layers and the network built on them, checked against the SPEC ("Network"):
//!
//! 1. naive index-loop references of rot90, CyclicSlice, CyclicRoll, CyclicConvRoll,
//!    CyclicPool and the 45-degree input rotation, compared with the tch functions;
//! 2. rotation invariance of sliced-and-pooled networks (and non-invariance of `plain`);
//! 3. gradients: autograd against central differences in f64, and through whole networks;
//! 4. orthogonal initialisation;
//! 5. clear config / architecture errors;
//! 6. safetensors save -> load;
//! 7. the layer summary and MAC count of the reference convroll4.
// Index loops mirror the formulas (and name the failing element), so they stay.
#![allow(clippy::needless_range_loop)]

use plankton::model::cyclic::{
    conv_roll, dense_roll, pool, rot90, slice, stack_rotated_45, PoolFunction,
};
use plankton::model::network::orthogonal;
use plankton::model::{
    Activation, BranchConfig, LayerSpec, ModelConfig, ModelError, Network, Preset,
};
use tch::{Device, Kind, Tensor};

const CPU: Device = Device::Cpu;

// ---------------------------------------------------------------------------------------------
// Plain-array helpers (row-major, explicit indices; no tensor ops in the references).
// ---------------------------------------------------------------------------------------------

/// A row-major n-d array of f64.
#[derive(Clone, Debug, PartialEq)]
struct Nd {
    dims: Vec<usize>,
    v: Vec<f64>,
}

impl Nd {
    fn zeros(dims: &[usize]) -> Nd {
        Nd {
            dims: dims.to_vec(),
            v: vec![0.0; dims.iter().product()],
        }
    }
    fn from_tensor(t: &Tensor) -> Nd {
        let dims: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        let v = Vec::<f64>::try_from(&t.detach().to_kind(Kind::Double).contiguous().view([-1]))
            .unwrap();
        Nd { dims, v }
    }
    fn at(&self, i: &[usize]) -> usize {
        assert_eq!(i.len(), self.dims.len());
        let mut k = 0;
        for (d, (&ii, &n)) in i.iter().zip(&self.dims).enumerate() {
            assert!(ii < n, "index {ii} out of range {n} on axis {d}");
            k = k * n + ii;
        }
        k
    }
    fn get(&self, i: &[usize]) -> f64 {
        self.v[self.at(i)]
    }
    fn set(&mut self, i: &[usize], x: f64) {
        let k = self.at(i);
        self.v[k] = x;
    }
}

fn randn(shape: &[i64]) -> Tensor {
    Tensor::randn(shape, (Kind::Float, CPU))
}

fn randn64(shape: &[i64]) -> Tensor {
    Tensor::randn(shape, (Kind::Double, CPU))
}

fn assert_nd_close(name: &str, got: &Nd, want: &Nd, tol: f64) {
    assert_eq!(got.dims, want.dims, "{name}: shape");
    for (k, (g, w)) in got.v.iter().zip(&want.v).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{name}: element {k}: got {g}, want {w}"
        );
    }
}

/// Where output pixel (r, c) of k counter-clockwise quarter turns of an h x w image comes from,
/// applying the SPEC's single-turn rule out[r][c] = in[c][W-1-r] k times.
fn rot_source(mut r: usize, mut c: usize, k: usize, h: usize, w: usize) -> (usize, usize) {
    // Walk back from the k-th rotation to the input: rotation j (1-based) maps an image of
    // dims (hj, wj) to (wj, hj); its input has width wj.
    for j in (1..=k % 4).rev() {
        // input of rotation j = result of j-1 rotations: dims (h, w) if j-1 is even.
        let w_in = if (j - 1) % 2 == 0 { w } else { h };
        let (nr, nc) = (c, w_in - 1 - r);
        r = nr;
        c = nc;
    }
    (r, c)
}

/// rot90 by k quarter turns (k >= 0) of every B x C plane.
fn naive_rot(x: &Nd, k: usize) -> Nd {
    let (b, ch, h, w) = (x.dims[0], x.dims[1], x.dims[2], x.dims[3]);
    let (oh, ow) = if k.is_multiple_of(2) { (h, w) } else { (w, h) };
    let mut out = Nd::zeros(&[b, ch, oh, ow]);
    for n in 0..b {
        for c in 0..ch {
            for r in 0..oh {
                for col in 0..ow {
                    let (sr, sc) = rot_source(r, col, k, h, w);
                    out.set(&[n, c, r, col], x.get(&[n, c, sr, sc]));
                }
            }
        }
    }
    out
}

/// CyclicSlice: out batch v*B + b = rot^v(x[b]).
fn naive_slice(x: &Nd) -> Nd {
    let (b, ch, h, w) = (x.dims[0], x.dims[1], x.dims[2], x.dims[3]);
    assert_eq!(h, w);
    let mut out = Nd::zeros(&[4 * b, ch, h, w]);
    for v in 0..4 {
        for n in 0..b {
            for c in 0..ch {
                for r in 0..h {
                    for col in 0..w {
                        let (sr, sc) = rot_source(r, col, v, h, w);
                        out.set(&[v * b + n, c, r, col], x.get(&[n, c, sr, sc]));
                    }
                }
            }
        }
    }
    out
}

/// CyclicRoll (dense): out[i*B + b][k*F + f] = in[((i+k)%4)*B + b][f].
fn naive_dense_roll(x: &Nd) -> Nd {
    let (n4, f) = (x.dims[0], x.dims[1]);
    let b = n4 / 4;
    let mut out = Nd::zeros(&[n4, 4 * f]);
    for i in 0..4 {
        for n in 0..b {
            for k in 0..4 {
                for j in 0..f {
                    out.set(&[i * b + n, k * f + j], x.get(&[((i + k) % 4) * b + n, j]));
                }
            }
        }
    }
    out
}

/// CyclicConvRoll: out[i*B + b][k*C + c] = rot^{-k}(in[((i+k)%4)*B + b][c]); the inverse
/// rotations in order 0, 270, 180, 90 degrees counter-clockwise.
fn naive_conv_roll(x: &Nd) -> Nd {
    let (n4, ch, h, w) = (x.dims[0], x.dims[1], x.dims[2], x.dims[3]);
    assert_eq!(h, w);
    let b = n4 / 4;
    let inverse_quarter_turns = [0usize, 3, 2, 1];
    let mut out = Nd::zeros(&[n4, 4 * ch, h, w]);
    for i in 0..4 {
        for n in 0..b {
            for k in 0..4 {
                for c in 0..ch {
                    for r in 0..h {
                        for col in 0..w {
                            let (sr, sc) = rot_source(r, col, inverse_quarter_turns[k], h, w);
                            let v = x.get(&[((i + k) % 4) * b + n, c, sr, sc]);
                            out.set(&[i * b + n, k * ch + c, r, col], v);
                        }
                    }
                }
            }
        }
    }
    out
}

/// CyclicPool over `views` views of (V*B, ...): out[b][f] = reduce_v in[v*B + b][f].
fn naive_pool(x: &Nd, views: usize, function: PoolFunction) -> Nd {
    let b = x.dims[0] / views;
    let f: usize = x.dims[1..].iter().product();
    let mut dims = x.dims.clone();
    dims[0] = b;
    let mut out = Nd::zeros(&dims);
    for n in 0..b {
        for j in 0..f {
            let vals: Vec<f64> = (0..views).map(|v| x.v[(v * b + n) * f + j]).collect();
            out.v[n * f + j] = match function {
                PoolFunction::Rms => {
                    (vals.iter().map(|a| a * a).sum::<f64>() / views as f64 + 1e-12).sqrt()
                }
                PoolFunction::Mean => vals.iter().sum::<f64>() / views as f64,
                PoolFunction::Max => vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
            };
        }
    }
    out
}

/// The image rotated by `sign` * 45 degrees about the centre of a square n x n map: output
/// pixel (r, c) samples the input at the centre + R(sign*45) (c - m, r - m), bilinear, with
/// coordinates clamped to the map (border replication).
fn naive_rotate45(x: &Nd, sign: f64) -> Nd {
    let (b, ch, h, w) = (x.dims[0], x.dims[1], x.dims[2], x.dims[3]);
    assert_eq!(h, w);
    let m = (w as f64 - 1.0) / 2.0;
    let (s, co) = (
        sign * std::f64::consts::FRAC_PI_4.sin(),
        std::f64::consts::FRAC_PI_4.cos(),
    );
    let mut out = Nd::zeros(&x.dims);
    for n in 0..b {
        for c in 0..ch {
            for r in 0..h {
                for col in 0..w {
                    let (dx, dy) = (col as f64 - m, r as f64 - m);
                    let sx = (m + co * dx - s * dy).clamp(0.0, w as f64 - 1.0);
                    let sy = (m + s * dx + co * dy).clamp(0.0, h as f64 - 1.0);
                    let (x0, y0) = (sx.floor() as usize, sy.floor() as usize);
                    let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
                    let (fx, fy) = (sx - x0 as f64, sy - y0 as f64);
                    let v = (1.0 - fy)
                        * ((1.0 - fx) * x.get(&[n, c, y0, x0]) + fx * x.get(&[n, c, y0, x1]))
                        + fy * ((1.0 - fx) * x.get(&[n, c, y1, x0]) + fx * x.get(&[n, c, y1, x1]));
                    out.set(&[n, c, r, col], v);
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// 1. The tch cyclic functions against the naive references.
// ---------------------------------------------------------------------------------------------

#[test]
fn rot90_matches_index_formula() {
    tch::manual_seed(1);
    // Hand-checked 2x3 case: in = [[1,2,3],[4,5,6]] -> numpy rot90 = [[3,6],[2,5],[1,4]].
    let x = Tensor::from_slice(&[1f32, 2., 3., 4., 5., 6.]).view([1, 1, 2, 3]);
    let got = Nd::from_tensor(&rot90(&x, 1));
    assert_eq!(got.dims, vec![1, 1, 3, 2]);
    assert_eq!(got.v, vec![3., 6., 2., 5., 1., 4.]);

    for &(b, c, h, w) in &[
        (1usize, 1usize, 5usize, 5usize),
        (2, 3, 6, 6),
        (3, 2, 7, 7),
        (2, 2, 4, 7),
        (1, 3, 5, 2),
    ] {
        let x = randn(&[b as i64, c as i64, h as i64, w as i64]);
        let xn = Nd::from_tensor(&x);
        for k in -5i64..=6 {
            let want = naive_rot(&xn, k.rem_euclid(4) as usize);
            let got = Nd::from_tensor(&rot90(&x, k));
            assert_nd_close(&format!("rot90 k={k} {b}x{c}x{h}x{w}"), &got, &want, 0.0);
        }
        // 3-d input (C x H x W) rotates its last two axes too.
        let x3 = x.get(0);
        let got = Nd::from_tensor(&rot90(&x3, 1).unsqueeze(0));
        assert_nd_close(
            "rot90 3-d",
            &got,
            &naive_rot(&Nd::from_tensor(&x3.unsqueeze(0)), 1),
            0.0,
        );
    }
}

#[test]
fn slice_matches_naive() {
    tch::manual_seed(2);
    for &(b, c, s) in &[(1i64, 1i64, 5i64), (2, 3, 6), (3, 2, 7), (2, 1, 1)] {
        let x = randn(&[b, c, s, s]);
        let got = Nd::from_tensor(&slice(&x));
        assert_nd_close(
            &format!("slice {b}x{c}x{s}"),
            &got,
            &naive_slice(&Nd::from_tensor(&x)),
            0.0,
        );
    }
}

#[test]
fn dense_roll_matches_naive() {
    tch::manual_seed(3);
    for &(b, f) in &[(1i64, 1i64), (1, 5), (2, 3), (3, 7)] {
        let x = randn(&[4 * b, f]);
        let got = Nd::from_tensor(&dense_roll(&x));
        assert_nd_close(
            &format!("dense_roll {b}x{f}"),
            &got,
            &naive_dense_roll(&Nd::from_tensor(&x)),
            0.0,
        );
    }
    // Hand-written case, B = 1, F = 1: views [a, b, c, d] -> view i = [x_i, x_i+1, x_i+2, x_i+3].
    let x = Tensor::from_slice(&[10f32, 11., 12., 13.]).view([4, 1]);
    let got = Nd::from_tensor(&dense_roll(&x));
    assert_eq!(
        got.v,
        vec![10., 11., 12., 13., 11., 12., 13., 10., 12., 13., 10., 11., 13., 10., 11., 12.]
    );
}

#[test]
fn conv_roll_matches_naive() {
    tch::manual_seed(4);
    for &(b, c, s) in &[
        (1i64, 1i64, 5i64),
        (2, 3, 5),
        (1, 2, 6),
        (2, 1, 7),
        (1, 2, 1),
    ] {
        let x = randn(&[4 * b, c, s, s]);
        let got = Nd::from_tensor(&conv_roll(&x));
        assert_nd_close(
            &format!("conv_roll {b}x{c}x{s}"),
            &got,
            &naive_conv_roll(&Nd::from_tensor(&x)),
            0.0,
        );
    }
}

/// The point of the conv roll: after `slice`, view i holds rot^i(x); block k of view i comes
/// from view i+k, i.e. rot^{i+k}(x), rotated back by k turns -> rot^i(x). So every channel block
/// of a view is the same, spatially aligned map.
#[test]
fn conv_roll_of_slice_aligns_all_blocks() {
    tch::manual_seed(5);
    for &(b, c, s) in &[(1i64, 1i64, 5i64), (2, 3, 7), (2, 2, 6)] {
        let x = randn(&[b, c, s, s]);
        let sliced = slice(&x);
        let rolled = conv_roll(&sliced);
        let r = Nd::from_tensor(&rolled);
        let sl = Nd::from_tensor(&sliced);
        for n in 0..(4 * b) as usize {
            for k in 0..4 {
                for ch in 0..c as usize {
                    for y in 0..s as usize {
                        for xx in 0..s as usize {
                            assert_eq!(
                                r.get(&[n, k * c as usize + ch, y, xx]),
                                sl.get(&[n, ch, y, xx]),
                                "view row {n}, block {k} not aligned with block 0"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn pool_matches_naive() {
    tch::manual_seed(6);
    let functions = [PoolFunction::Rms, PoolFunction::Mean, PoolFunction::Max];
    for &views in &[4i64, 8] {
        for &b in &[1i64, 2, 3] {
            for shape in [
                vec![views * b, 5],
                vec![views * b, 3, 5, 5],
                vec![views * b, 2, 4, 4],
            ] {
                for kind in [Kind::Float, Kind::Double] {
                    let x = Tensor::randn(shape.as_slice(), (kind, CPU));
                    let xn = Nd::from_tensor(&x);
                    for f in functions {
                        let got = Nd::from_tensor(&pool(&x, views, f));
                        let tol = if kind == Kind::Float { 1e-6 } else { 1e-12 };
                        assert_nd_close(
                            &format!("pool {f:?} views={views} {shape:?}"),
                            &got,
                            &naive_pool(&xn, views as usize, f),
                            tol,
                        );
                    }
                }
            }
        }
    }
    // The epsilon: all-zero views give sqrt(1e-12) = 1e-6, not 0 (and a finite gradient).
    let z = Tensor::zeros([4, 3], (Kind::Double, CPU)).set_requires_grad(true);
    let y = pool(&z, 4, PoolFunction::Rms);
    assert!(Nd::from_tensor(&y)
        .v
        .iter()
        .all(|&v| (v - 1e-6).abs() < 1e-15));
    y.sum(Kind::Double).backward();
    assert!(Nd::from_tensor(&z.grad()).v.iter().all(|g| g.is_finite()));
    // Default pool function is the reference's RMS.
    assert_eq!(PoolFunction::default(), PoolFunction::Rms);
}

#[test]
fn stack_rotated_45_matches_naive_bilinear_rotation() {
    tch::manual_seed(7);
    for &(b, c, s) in &[(1i64, 1i64, 9i64), (2, 2, 8), (1, 1, 15)] {
        let x = randn64(&[b, c, s, s]);
        let out = stack_rotated_45(&x);
        assert_eq!(out.size(), vec![2 * b, c, s, s]);
        let first = Nd::from_tensor(&out.narrow(0, 0, b));
        assert_nd_close(
            "stack_rotated_45 keeps x first",
            &first,
            &Nd::from_tensor(&x),
            0.0,
        );
        let rotated = Nd::from_tensor(&out.narrow(0, b, b));
        let xn = Nd::from_tensor(&x);
        let err = |want: &Nd| {
            rotated
                .v
                .iter()
                .zip(&want.v)
                .map(|(g, w)| (g - w).abs())
                .fold(0.0, f64::max)
        };
        let (e_pos, e_neg) = (
            err(&naive_rotate45(&xn, 1.0)),
            err(&naive_rotate45(&xn, -1.0)),
        );
        // The SPEC does not fix the direction; it must be a true 45-degree rotation either way.
        assert!(
            e_pos.min(e_neg) < 1e-5,
            "{b}x{c}x{s}: 45-degree rotation differs from naive (+: {e_pos}, -: {e_neg})"
        );
        // The 8-way net's invariance needs the 45-degree rotation to commute with rot90.
        let a = stack_rotated_45(&rot90(&x, 1));
        let bb = rot90(&stack_rotated_45(&x), 1);
        let d = (&a - &bb).abs().max().double_value(&[]);
        assert!(d < 1e-6, "rotate45 does not commute with rot90: {d}");
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Rotation invariance of whole networks.
// ---------------------------------------------------------------------------------------------

fn custom(layers: Vec<LayerSpec>) -> ModelConfig {
    ModelConfig {
        preset: Preset::Custom,
        branches: vec![BranchConfig { input: 0, layers }],
        ..ModelConfig::default()
    }
}

fn conv(filters: usize) -> LayerSpec {
    LayerSpec::Conv {
        filters,
        activation: Activation::Leaky,
        untied_biases: None,
    }
}

fn build(cfg: &ModelConfig, sizes: &[usize], classes: usize, seed: i64) -> Network {
    tch::manual_seed(seed);
    Network::new(cfg, sizes, classes, CPU).unwrap_or_else(|e| panic!("{e}"))
}

/// Makes every bias random (tied or untied), so that untied biases differ per position and the
/// invariance test does not rely on constant initial biases.
fn randomise_biases(net: &mut Network, seed: i64) {
    tch::manual_seed(seed);
    tch::no_grad(|| {
        for p in net.params.iter_mut().filter(|p| p.name.ends_with("bias")) {
            let noisy = &p.tensor + p.tensor.randn_like() * 0.3;
            p.tensor.copy_(&noisy);
        }
    });
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).abs().max().double_value(&[]);
    d / a.abs().max().double_value(&[]).max(1e-12)
}

/// Relative logit differences between the batch and the batch rotated by 90, 180, 270 degrees.
fn rotation_diffs(net: &Network, sizes: &[usize], batch: i64, seed: i64) -> Vec<f64> {
    plankton::model::invariance::check(net, sizes, batch as usize, seed).per_rotation
}

fn assert_invariant(what: &str, net: &Network, sizes: &[usize]) {
    let diffs = rotation_diffs(net, sizes, 2, 99);
    for (k, d) in diffs.iter().enumerate() {
        assert!(
            *d < 1e-4,
            "{what}: logits change by {d:e} (relative) under a {}-degree rotation",
            90 * (k + 1)
        );
    }
}

#[test]
fn convroll4_is_rotation_invariant() {
    for &size in &[47usize, 95, 46] {
        let cfg = ModelConfig {
            width: 0.125,
            untied_biases: size == 47,
            ..ModelConfig::default()
        };
        let mut net = build(&cfg, &[size], 7, 10);
        randomise_biases(&mut net, 11);
        assert_invariant(&format!("convroll4 at {size}"), &net, &[size]);
    }
    // maxout dense layers and mean pooling.
    let cfg = ModelConfig {
        width: 0.125,
        maxout: 2,
        cyclic_pool: PoolFunction::Mean,
        ..ModelConfig::default()
    };
    let mut net = build(&cfg, &[47], 5, 12);
    randomise_biases(&mut net, 13);
    assert_invariant("convroll4 maxout/mean", &net, &[47]);
}

#[test]
fn custom_cyclic_network_is_rotation_invariant() {
    let dense = |units, maxout| LayerSpec::Dense {
        units,
        activation: Activation::Leaky,
        maxout,
    };
    for function in [PoolFunction::Rms, PoolFunction::Mean, PoolFunction::Max] {
        let layers = vec![
            LayerSpec::Slice {},
            LayerSpec::Conv {
                filters: 6,
                activation: Activation::Leaky,
                untied_biases: Some(true),
            },
            LayerSpec::Conv {
                filters: 4,
                activation: Activation::Relu,
                untied_biases: Some(false),
            },
            LayerSpec::Pool {},
            LayerSpec::ConvRoll {},
            LayerSpec::Conv {
                filters: 5,
                activation: Activation::Leaky,
                untied_biases: Some(true),
            },
            LayerSpec::Pool {},
            LayerSpec::ConvRoll {},
            LayerSpec::Dropout { p: 0.5 },
            dense(12, 2),
            LayerSpec::DenseRoll {},
            LayerSpec::Dense {
                units: 9,
                activation: Activation::Linear,
                maxout: 3,
            },
            LayerSpec::DenseRoll {},
            dense(6, 1),
            LayerSpec::CyclicPool { function },
        ];
        let mut net = build(&custom(layers), &[23], 4, 20);
        randomise_biases(&mut net, 21);
        assert_invariant(&format!("custom net, {function:?} pool"), &net, &[23]);
    }
}

#[test]
fn eight_view_network_is_invariant_to_quarter_turns() {
    let cfg = ModelConfig {
        width: 0.125,
        views: 8,
        untied_biases: true,
        ..ModelConfig::default()
    };
    let mut net = build(&cfg, &[47], 6, 30);
    assert!(
        net.summary
            .iter()
            .any(|l| l.name == "slice8" && l.views == 8),
        "views = 8 must start with slice8"
    );
    randomise_biases(&mut net, 31);
    assert_invariant("convroll4, 8 views", &net, &[47]);

    let layers = vec![
        LayerSpec::Slice8 {},
        conv(4),
        LayerSpec::Pool {},
        LayerSpec::ConvRoll {},
        conv(4),
        LayerSpec::Dense {
            units: 6,
            activation: Activation::Leaky,
            maxout: 2,
        },
        LayerSpec::DenseRoll {},
        LayerSpec::CyclicPool {
            function: PoolFunction::Rms,
        },
    ];
    let mut net = build(&custom(layers), &[15], 3, 32);
    randomise_biases(&mut net, 33);
    assert_invariant("custom slice8", &net, &[15]);
}

#[test]
fn multiscale_is_rotation_invariant() {
    let cfg = ModelConfig {
        preset: Preset::Multiscale,
        width: 0.25,
        ..ModelConfig::default()
    };
    let mut net = build(&cfg, &[47, 23], 5, 40);
    randomise_biases(&mut net, 41);
    assert_invariant("multiscale", &net, &[47, 23]);
}

#[test]
fn plain_network_is_not_rotation_invariant() {
    let cfg = ModelConfig {
        preset: Preset::Plain,
        width: 0.125,
        ..ModelConfig::default()
    };
    let net = build(&cfg, &[47], 7, 50);
    assert!(
        net.summary.iter().all(|l| l.views == 1),
        "plain has no cyclic layer"
    );
    let diffs = rotation_diffs(&net, &[47], 2, 99);
    for (k, d) in diffs.iter().enumerate() {
        assert!(
            *d > 1e-3,
            "plain net unexpectedly invariant under {} degrees ({d:e})",
            90 * (k + 1)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Gradients.
// ---------------------------------------------------------------------------------------------

/// Autograd of sum(f(x) * w) against central differences for every coordinate of x (f64).
fn grad_check(name: &str, f: &dyn Fn(&Tensor) -> Tensor, x: &Tensor, skip: &dyn Fn(usize) -> bool) {
    let x = x.to_kind(Kind::Double).detach().set_requires_grad(true);
    let y = f(&x);
    let w = Tensor::randn(y.size().as_slice(), (Kind::Double, CPU));
    (&y * &w).sum(Kind::Double).backward();
    let g = Nd::from_tensor(&x.grad());
    assert!(
        g.v.iter().any(|&v| v != 0.0),
        "{name}: gradient is all zero"
    );
    let base = Nd::from_tensor(&x);
    let shape = x.size();
    let eps = 1e-6;
    let loss = |v: &[f64]| {
        tch::no_grad(|| {
            (f(&Tensor::from_slice(v).view(shape.as_slice())) * &w)
                .sum(Kind::Double)
                .double_value(&[])
        })
    };
    for j in 0..base.v.len() {
        if skip(j) {
            continue;
        }
        let mut p = base.v.clone();
        p[j] += eps;
        let mut m = base.v.clone();
        m[j] -= eps;
        let fd = (loss(&p) - loss(&m)) / (2.0 * eps);
        assert!(
            (fd - g.v[j]).abs() <= 1e-6 * (1.0 + fd.abs()),
            "{name}: coordinate {j}: autograd {} vs finite difference {fd}",
            g.v[j]
        );
    }
}

#[test]
fn cyclic_layers_pass_correct_gradients() {
    tch::manual_seed(60);
    let none = |_: usize| false;
    grad_check("rot90", &|x| rot90(x, 1), &randn64(&[2, 2, 3, 4]), &none);
    grad_check("slice", &slice, &randn64(&[2, 2, 3, 3]), &none);
    grad_check("conv_roll", &conv_roll, &randn64(&[8, 2, 3, 3]), &none);
    grad_check("dense_roll", &dense_roll, &randn64(&[8, 3]), &none);
    grad_check(
        "stack_rotated_45",
        &stack_rotated_45,
        &randn64(&[1, 1, 5, 5]),
        &none,
    );
    for views in [4, 8] {
        grad_check(
            "pool rms",
            &|x| pool(x, views, PoolFunction::Rms),
            &randn64(&[2 * views, 3]),
            &none,
        );
        grad_check(
            "pool mean",
            &|x| pool(x, views, PoolFunction::Mean),
            &randn64(&[2 * views, 2, 2, 2]),
            &none,
        );
        // Max: random continuous values have no ties; the gradient must go to the arg-max only.
        let x = randn64(&[2 * views, 3]);
        grad_check(
            "pool max",
            &|x| pool(x, views, PoolFunction::Max),
            &x,
            &none,
        );
        let xs = x.detach().set_requires_grad(true);
        pool(&xs, views, PoolFunction::Max)
            .sum(Kind::Double)
            .backward();
        let g = Nd::from_tensor(&xs.grad());
        assert_eq!(
            g.v.iter().filter(|&&v| v == 1.0).count(),
            6,
            "max pool: one unit gradient per output"
        );
        assert_eq!(g.v.iter().filter(|&&v| v == 0.0).count(), g.v.len() - 6);
    }
    // A chain of them: slice -> conv roll -> pool.
    grad_check(
        "slice+conv_roll+pool",
        &|x| pool(&conv_roll(&slice(x)).square(), 4, PoolFunction::Rms),
        &randn64(&[2, 1, 3, 3]),
        &none,
    );
}

fn tiny_layers(act: Activation) -> Vec<LayerSpec> {
    vec![
        LayerSpec::Slice {},
        LayerSpec::Conv {
            filters: 3,
            activation: act,
            untied_biases: Some(true),
        },
        LayerSpec::Pool {},
        LayerSpec::ConvRoll {},
        LayerSpec::Conv {
            filters: 2,
            activation: act,
            untied_biases: Some(false),
        },
        LayerSpec::Pool {},
        LayerSpec::ConvRoll {},
        LayerSpec::Dropout { p: 0.5 },
        LayerSpec::Dense {
            units: 4,
            activation: Activation::Linear,
            maxout: 2,
        },
        LayerSpec::DenseRoll {},
        LayerSpec::Dense {
            units: 3,
            activation: act,
            maxout: 1,
        },
        LayerSpec::CyclicPool {
            function: PoolFunction::Rms,
        },
    ]
}

#[test]
fn every_parameter_of_a_network_gets_a_gradient() {
    let mut cases: Vec<(String, ModelConfig, Vec<usize>)> = vec![
        (
            "custom leaky".into(),
            custom(tiny_layers(Activation::Leaky)),
            vec![11],
        ),
        (
            "convroll4 untied maxout".into(),
            ModelConfig {
                width: 0.125,
                maxout: 2,
                untied_biases: true,
                ..ModelConfig::default()
            },
            vec![47],
        ),
        (
            "multiscale".into(),
            ModelConfig {
                preset: Preset::Multiscale,
                width: 0.125,
                ..ModelConfig::default()
            },
            vec![23, 15],
        ),
        (
            "plain".into(),
            ModelConfig {
                preset: Preset::Plain,
                width: 0.125,
                ..ModelConfig::default()
            },
            vec![23],
        ),
    ];
    cases.push((
        "8 views".into(),
        ModelConfig {
            width: 0.125,
            views: 8,
            ..ModelConfig::default()
        },
        vec![23],
    ));
    for (what, cfg, sizes) in cases {
        let net = build(&cfg, &sizes, 5, 70);
        tch::manual_seed(71);
        let inputs: Vec<Tensor> = sizes
            .iter()
            .map(|&s| randn(&[3, 1, s as i64, s as i64]))
            .collect();
        let labels = Tensor::from_slice(&[0i64, 3, 4]);
        for train in [false, true] {
            for p in &net.params {
                let mut t = p.tensor.shallow_clone();
                t.zero_grad();
            }
            let loss = net
                .forward_t(&inputs, train)
                .cross_entropy_for_logits(&labels);
            assert!(loss.double_value(&[]).is_finite(), "{what}: loss");
            loss.backward();
            for p in &net.params {
                let g = p.tensor.grad();
                assert!(
                    g.defined(),
                    "{what} (train={train}): {} has no gradient",
                    p.name
                );
                assert_eq!(g.size(), p.tensor.size());
                assert!(
                    g.isfinite().all().int64_value(&[]) == 1,
                    "{what}: {} gradient not finite",
                    p.name
                );
                assert!(
                    g.abs().sum(Kind::Double).double_value(&[]) > 0.0,
                    "{what} (train={train}): {} gradient is zero",
                    p.name
                );
            }
        }
    }
}

/// The whole network in f64 (relu/linear activations only: the leaky slope tensor is f32),
/// autograd against central differences for input pixels and parameter entries.
#[test]
fn network_gradients_match_finite_differences() {
    let mut net = build(&custom(tiny_layers(Activation::Relu)), &[11], 4, 80);
    randomise_biases(&mut net, 81);
    for p in &mut net.params {
        p.tensor = p
            .tensor
            .detach()
            .to_kind(Kind::Double)
            .set_requires_grad(true);
    }
    tch::manual_seed(82);
    let x = randn64(&[2, 1, 11, 11]).set_requires_grad(true);
    let labels = Tensor::from_slice(&[1i64, 3]);
    let loss_of = |net: &Network, x: &Tensor| {
        // Not cross_entropy_for_logits: tch computes that log-softmax in f32.
        net.forward_t(&[x.shallow_clone()], false)
            .log_softmax(-1, Kind::Double)
            .nll_loss(&labels)
    };
    let loss = loss_of(&net, &x);
    loss.backward();
    let eps = 1e-6;
    let check = |what: &str, ad: f64, fd: f64| {
        assert!(
            (ad - fd).abs() <= 1e-6 + 1e-4 * fd.abs(),
            "{what}: autograd {ad} vs finite difference {fd}"
        );
    };
    // Input pixels.
    let gx = Nd::from_tensor(&x.grad());
    assert!(gx.v.iter().any(|&v| v != 0.0));
    let xv = Nd::from_tensor(&x);
    for j in [0usize, 5, 17, 60, 120, 121, 150, 241] {
        let eval = |d: f64| {
            let mut v = xv.v.clone();
            v[j] += d;
            tch::no_grad(|| {
                loss_of(&net, &Tensor::from_slice(&v).view([2, 1, 11, 11])).double_value(&[])
            })
        };
        check(
            &format!("input {j}"),
            gx.v[j],
            (eval(eps) - eval(-eps)) / (2.0 * eps),
        );
    }
    // Three entries of every parameter tensor.
    let grads: Vec<Nd> = net
        .params
        .iter()
        .map(|p| Nd::from_tensor(&p.tensor.grad()))
        .collect();
    for pi in 0..net.params.len() {
        let n = grads[pi].v.len();
        for j in [0, n / 2, n - 1] {
            let base = Nd::from_tensor(&net.params[pi].tensor);
            let mut eval = |d: f64| {
                let mut v = base.v.clone();
                v[j] += d;
                let shape = net.params[pi].tensor.size();
                tch::no_grad(|| {
                    net.params[pi]
                        .tensor
                        .copy_(&Tensor::from_slice(&v).view(shape.as_slice()))
                });
                let l = tch::no_grad(|| loss_of(&net, &x).double_value(&[]));
                tch::no_grad(|| {
                    net.params[pi]
                        .tensor
                        .copy_(&Tensor::from_slice(&base.v).view(shape.as_slice()))
                });
                l
            };
            let fd = (eval(eps) - eval(-eps)) / (2.0 * eps);
            check(&format!("{}[{j}]", net.params[pi].name), grads[pi].v[j], fd);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Orthogonal initialisation.
// ---------------------------------------------------------------------------------------------

/// max |Q^T Q - g^2 I| (tall) or |Q Q^T - g^2 I| (wide) for a rows x cols matrix.
fn orthonormality_error(q: &Tensor, gain: f64) -> f64 {
    let q = q.to_kind(Kind::Double);
    let (r, c) = (q.size()[0], q.size()[1]);
    let gram = if r >= c {
        q.tr().matmul(&q)
    } else {
        q.matmul(&q.tr())
    };
    let n = r.min(c);
    (gram - Tensor::eye(n, (Kind::Double, CPU)) * (gain * gain))
        .abs()
        .max()
        .double_value(&[])
}

#[test]
fn orthogonal_has_orthonormal_rows_or_columns() {
    tch::manual_seed(90);
    for &(r, c) in &[
        (5usize, 3usize),
        (3, 5),
        (4, 4),
        (32, 9),
        (16, 288),
        (1, 7),
        (7, 1),
    ] {
        for gain in [1.0, 2.0] {
            let q = orthogonal(r, c, gain);
            assert_eq!(q.size(), vec![r as i64, c as i64]);
            assert_eq!(q.kind(), Kind::Float);
            let e = orthonormality_error(&q, gain);
            assert!(
                e < 1e-5 * gain * gain,
                "orthogonal({r}, {c}, {gain}): error {e}"
            );
        }
    }
    // Random, and reproducible from the seed.
    tch::manual_seed(91);
    let a = orthogonal(6, 4, 1.0);
    let b = orthogonal(6, 4, 1.0);
    tch::manual_seed(91);
    let a2 = orthogonal(6, 4, 1.0);
    assert!(max_rel_diff(&a, &b) > 1e-2);
    assert_eq!(max_rel_diff(&a, &a2), 0.0);
}

#[test]
fn network_weights_are_orthogonal() {
    let cfg = ModelConfig {
        width: 0.25,
        ..ModelConfig::default()
    };
    let net = build(&cfg, &[47], 9, 92);
    let mut convs = 0;
    for p in &net.params {
        let s = p.tensor.size();
        if p.name.ends_with("conv.weight") {
            assert_eq!(s.len(), 4, "{}", p.name);
            assert_eq!(&s[2..], &[3, 3]);
            let flat = p.tensor.detach().reshape([s[0], s[1] * 9]);
            let e = orthonormality_error(&flat, 1.0);
            assert!(e < 1e-5, "{} ({:?}) not orthogonal: {e}", p.name, s);
            assert!(p.decay, "{} should get weight decay", p.name);
            convs += 1;
        } else if p.name.ends_with("weight") {
            assert_eq!(s.len(), 2);
            let e = orthonormality_error(&p.tensor.detach(), 1.0);
            assert!(e < 1e-5, "{} ({:?}) not orthogonal: {e}", p.name, s);
            assert!(p.decay);
        } else {
            assert!(p.name.ends_with("bias"), "{}", p.name);
            assert!(!p.decay, "{}: biases get no weight decay", p.name);
        }
    }
    assert_eq!(convs, 7, "3 stages of convroll4 at 47: 2 + 2 + 3 convs");
}

// ---------------------------------------------------------------------------------------------
// 5. Errors.
// ---------------------------------------------------------------------------------------------

fn build_err(cfg: &ModelConfig, sizes: &[usize]) -> String {
    match Network::new(cfg, sizes, 3, CPU) {
        Ok(_) => panic!("expected an error for {cfg:?} on {sizes:?}"),
        Err(e) => {
            assert!(matches!(e, ModelError::Invalid(_)), "{e:?}");
            e.to_string()
        }
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(
            msg.contains(p),
            "error message {msg:?} does not mention {p:?}"
        );
    }
}

#[test]
fn architecture_errors_name_branch_and_layer() {
    let cp = LayerSpec::CyclicPool {
        function: PoolFunction::Rms,
    };
    let dense = LayerSpec::Dense {
        units: 4,
        activation: Activation::Leaky,
        maxout: 1,
    };

    let e = build_err(
        &custom(vec![conv(4), LayerSpec::ConvRoll {}, cp.clone()]),
        &[9],
    );
    assert_mentions(&e, &["branch 0", "layer 1", "conv_roll", "slice"]);

    let e = build_err(
        &custom(vec![
            LayerSpec::Slice {},
            conv(4),
            LayerSpec::Pool {},
            LayerSpec::ConvRoll {},
            dense.clone(),
        ]),
        &[9],
    );
    assert_mentions(&e, &["branch 0", "4 views", "cyclic_pool"]);

    let e = build_err(
        &custom(vec![LayerSpec::Slice8 {}, conv(4), dense.clone()]),
        &[9],
    );
    assert_mentions(&e, &["branch 0", "8 views", "cyclic_pool"]);

    // Slicing needs a square map: dense features are not one.
    let e = build_err(
        &custom(vec![dense.clone(), LayerSpec::Slice {}, cp.clone()]),
        &[9],
    );
    assert_mentions(&e, &["branch 0", "layer 1", "slice", "square"]);

    let e = build_err(
        &custom(vec![LayerSpec::Slice {}, LayerSpec::Slice {}, cp.clone()]),
        &[9],
    );
    assert_mentions(&e, &["layer 1", "slice", "already sliced"]);

    let e = build_err(
        &custom(vec![
            LayerSpec::Slice {},
            conv(2),
            LayerSpec::DenseRoll {},
            cp.clone(),
        ]),
        &[9],
    );
    assert_mentions(&e, &["layer 2", "dense_roll", "dense"]);

    let e = build_err(&custom(vec![dense.clone(), LayerSpec::DenseRoll {}]), &[9]);
    assert_mentions(&e, &["layer 1", "dense_roll", "sliced"]);

    let e = build_err(&custom(vec![conv(2), cp.clone()]), &[9]);
    assert_mentions(&e, &["layer 1", "cyclic_pool", "sliced"]);

    let e = build_err(&custom(vec![dense.clone(), conv(2)]), &[9]);
    assert_mentions(&e, &["layer 1", "conv", "dense features"]);

    let e = build_err(&custom(vec![dense.clone(), LayerSpec::Pool {}]), &[9]);
    assert_mentions(&e, &["layer 1", "pool"]);

    let e = build_err(
        &custom(vec![
            LayerSpec::Pool {},
            LayerSpec::Pool {},
            LayerSpec::Pool {},
        ]),
        &[9],
    );
    assert_mentions(&e, &["layer 2", "pool", "1x1"]);

    let e = build_err(&custom(vec![conv(0)]), &[9]);
    assert_mentions(&e, &["layer 0", "conv", "filters"]);

    let e = build_err(
        &custom(vec![LayerSpec::Dense {
            units: 0,
            activation: Activation::Leaky,
            maxout: 1,
        }]),
        &[9],
    );
    assert_mentions(&e, &["layer 0", "dense"]);

    let e = build_err(&custom(vec![LayerSpec::Dropout { p: 1.0 }]), &[9]);
    assert_mentions(&e, &["layer 0", "dropout", "p"]);

    // Second branch of a multi-branch custom model: the index in the message is that branch's.
    let mut cfg = custom(vec![LayerSpec::Slice {}, conv(2), cp.clone()]);
    cfg.branches.push(BranchConfig {
        input: 1,
        layers: vec![conv(2), LayerSpec::ConvRoll {}],
    });
    let e = build_err(&cfg, &[9, 9]);
    assert_mentions(&e, &["branch 1", "layer 1", "conv_roll"]);

    // A branch reading an input the pipeline does not have.
    let mut cfg = custom(vec![LayerSpec::Slice {}, conv(2), cp.clone()]);
    cfg.branches[0].input = 2;
    let e = build_err(&cfg, &[9, 9]);
    assert_mentions(&e, &["branch 0", "input 2"]);
    let e = build_err(
        &ModelConfig {
            preset: Preset::Multiscale,
            width: 0.125,
            ..ModelConfig::default()
        },
        &[47],
    );
    assert_mentions(&e, &["branch 1", "input 1"]);

    // Model-level settings.
    assert_mentions(
        &build_err(
            &ModelConfig {
                preset: Preset::Custom,
                ..ModelConfig::default()
            },
            &[9],
        ),
        &["no branch"],
    );
    assert_mentions(
        &build_err(
            &ModelConfig {
                views: 3,
                width: 0.125,
                ..ModelConfig::default()
            },
            &[47],
        ),
        &["views", "3"],
    );
    assert_mentions(
        &build_err(
            &ModelConfig {
                leaky_slope: 1.5,
                width: 0.125,
                ..ModelConfig::default()
            },
            &[47],
        ),
        &["leaky_slope"],
    );
    assert_mentions(
        &build_err(
            &ModelConfig {
                dropout: 1.0,
                width: 0.125,
                ..ModelConfig::default()
            },
            &[47],
        ),
        &["dropout"],
    );
    // Too many stages for the input size.
    let e = build_err(
        &ModelConfig {
            stages: 4,
            width: 0.125,
            ..ModelConfig::default()
        },
        &[23],
    );
    assert_mentions(&e, &["branch 0", "pool"]);
}

/// A `[[branch]]` layer list in TOML parses into the LayerSpec values it names.
#[test]
fn custom_branch_toml_parses_into_layer_specs() {
    let text = r#"
        preset = "custom"
        untied_biases = true
        [[branch]]
        input = 0
        layers = [
            { type = "slice" },
            { type = "conv", filters = 8 },
            { type = "conv", filters = 4, activation = "relu", untied_biases = false },
            { type = "pool" },
            { type = "conv_roll" },
            { type = "dropout", p = 0.25 },
            { type = "dense", units = 6, maxout = 2, activation = "linear" },
            { type = "dense_roll" },
            { type = "cyclic_pool", function = "max" },
        ]
    "#;
    let cfg: ModelConfig = toml::from_str(text).unwrap();
    assert_eq!(cfg.preset, Preset::Custom);
    assert!(cfg.untied_biases);
    let want = vec![
        LayerSpec::Slice {},
        LayerSpec::Conv {
            filters: 8,
            activation: Activation::Leaky,
            untied_biases: None,
        },
        LayerSpec::Conv {
            filters: 4,
            activation: Activation::Relu,
            untied_biases: Some(false),
        },
        LayerSpec::Pool {},
        LayerSpec::ConvRoll {},
        LayerSpec::Dropout { p: 0.25 },
        LayerSpec::Dense {
            units: 6,
            activation: Activation::Linear,
            maxout: 2,
        },
        LayerSpec::DenseRoll {},
        LayerSpec::CyclicPool {
            function: PoolFunction::Max,
        },
    ];
    assert_eq!(
        cfg.branches,
        vec![BranchConfig {
            input: 0,
            layers: want
        }]
    );
    let net = build(&cfg, &[15], 3, 100);
    // untied_biases = true applies to the first conv (None), not the second (Some(false)).
    let shapes: Vec<Vec<i64>> = net
        .params
        .iter()
        .filter(|p| p.name.ends_with("conv.bias"))
        .map(|p| p.tensor.size())
        .collect();
    assert_eq!(shapes, vec![vec![8, 15, 15], vec![4]]);
    // Dense maxout defaults to 1.
    let cfg: ModelConfig = toml::from_str(
        "preset = \"custom\"\n[[branch]]\nlayers = [{type = \"dense\", units = 3}]\n",
    )
    .unwrap();
    assert_eq!(
        cfg.branches[0].layers,
        vec![LayerSpec::Dense {
            units: 3,
            activation: Activation::Leaky,
            maxout: 1
        }]
    );
}

fn toml_err(text: &str) -> String {
    match toml::from_str::<ModelConfig>(text) {
        Ok(cfg) => panic!("expected a parse error, got {cfg:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn toml_unknown_fields_are_rejected_with_context() {
    // Unknown field in a struct layer (inline table).
    let e = toml_err(
        "preset = \"custom\"\n[[branch]]\nlayers = [{type = \"conv\", filters = 8, bogus = 1}]\n",
    );
    assert_mentions(&e, &["bogus", "filters"]);
    assert!(
        e.contains("line 3") || e.contains("3 |"),
        "error should point at the line: {e}"
    );
    // The same as an array of tables.
    let e = toml_err("preset = \"custom\"\n[[branch]]\n[[branch.layers]]\ntype = \"dense\"\nunits = 4\nbogus = 1\n");
    assert_mentions(&e, &["bogus"]);
    // Unknown layer type.
    let e = toml_err(
        "preset = \"custom\"\n[[branch]]\nlayers = [{type = \"convolution\", filters = 8}]\n",
    );
    assert_mentions(&e, &["convolution", "conv_roll"]);
    // Missing required field.
    let e = toml_err("preset = \"custom\"\n[[branch]]\nlayers = [{type = \"conv\"}]\n");
    assert_mentions(&e, &["filters"]);
    // Unknown field in a branch and in the model.
    let e = toml_err("preset = \"custom\"\n[[branch]]\ninputs = 1\nlayers = []\n");
    assert_mentions(&e, &["inputs"]);
    let e = toml_err("preset = \"convroll4\"\nwidht = 0.5\n");
    assert_mentions(&e, &["widht"]);
    let e = toml_err("preset = \"resnet\"\n");
    assert_mentions(&e, &["resnet"]);
    let e = toml_err("cyclic_pool = \"median\"\n");
    assert_mentions(&e, &["median"]);
}

/// Field-less layers (`slice`, `pool`, `conv_roll`, `dense_roll`, ...) silently accept unknown
/// keys: serde's `deny_unknown_fields` is not enforced for unit variants of an internally tagged
/// enum. `{type = "pool", size = 2}` parses as a plain 3x3/2 pool instead of failing.
#[test]
fn toml_unknown_fields_on_unit_layers_are_rejected() {
    for layer in [
        "{type = \"pool\", size = 2}",
        "{type = \"slice\", views = 8}",
        "{type = \"dense_roll\", units = 4}",
        "{type = \"conv_roll\", bogus = 1}",
    ] {
        let text = format!("preset = \"custom\"\n[[branch]]\nlayers = [{layer}]\n");
        if let Ok(cfg) = toml::from_str::<ModelConfig>(&text) {
            panic!("{layer} was accepted as {:?}", cfg.branches[0].layers);
        }
    }
}

/// A branch whose last layer leaves a conv map (no dense layer, e.g. a cyclic pool straight
/// after a conv) builds, but `forward_t` then feeds the 4-d map to the classifier, which fails.
#[test]
fn branch_ending_with_a_conv_map_is_flattened() {
    let layers = vec![
        LayerSpec::Slice {},
        conv(3),
        LayerSpec::Pool {},
        LayerSpec::ConvRoll {},
        LayerSpec::CyclicPool {
            function: PoolFunction::Rms,
        },
    ];
    let net = build(&custom(layers), &[9], 5, 110);
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        tch::no_grad(|| net.forward_t(&[randn(&[2, 1, 9, 9])], false).size())
    }));
    assert_eq!(
        out.ok(),
        Some(vec![2, 5]),
        "forward must give B x classes logits"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. save -> load.
// ---------------------------------------------------------------------------------------------

#[test]
fn save_load_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let cfg = ModelConfig {
        width: 0.125,
        untied_biases: true,
        maxout: 2,
        ..ModelConfig::default()
    };
    let mut a = build(&cfg, &[47], 6, 120);
    randomise_biases(&mut a, 121);
    a.save(&path).unwrap();
    let mut b = build(&cfg, &[47], 6, 122);
    tch::manual_seed(123);
    let x = randn(&[3, 1, 47, 47]);
    let la = tch::no_grad(|| a.forward_t(&[x.shallow_clone()], false));
    let lb = tch::no_grad(|| b.forward_t(&[x.shallow_clone()], false));
    assert!(
        max_rel_diff(&la, &lb) > 1e-3,
        "different seeds should give different nets"
    );
    b.load(&path).unwrap();
    let lb = tch::no_grad(|| b.forward_t(&[x.shallow_clone()], false));
    assert_eq!(
        Nd::from_tensor(&la),
        Nd::from_tensor(&lb),
        "logits after load must be identical"
    );
    // Built without initial weights, then loaded (what prediction does): the same logits.
    let c = Network::load_from(&cfg, &[47], 6, Device::Cpu, &path).unwrap();
    let lc = tch::no_grad(|| c.forward_t(&[x.shallow_clone()], false));
    assert_eq!(
        Nd::from_tensor(&la),
        Nd::from_tensor(&lc),
        "load_from must give the saved net"
    );
    for (p, q) in a.params.iter().zip(&b.params) {
        assert_eq!(p.name, q.name);
        assert_eq!(
            Nd::from_tensor(&p.tensor),
            Nd::from_tensor(&q.tensor),
            "{}",
            p.name
        );
        assert!(
            q.tensor.requires_grad(),
            "{} must stay trainable after load",
            q.name
        );
    }
    // Still trainable: gradients reach the loaded tensors.
    b.forward_t(&[x.shallow_clone()], true)
        .cross_entropy_for_logits(&Tensor::from_slice(&[0i64, 1, 2]))
        .backward();
    assert!(b.params.iter().all(|p| p.tensor.grad().defined()));

    let shown = path.display().to_string();
    let load_err = |cfg: &ModelConfig, sizes: &[usize], classes: usize| {
        let mut n = build(cfg, sizes, classes, 124);
        let e = n.load(&path).unwrap_err();
        assert!(matches!(e, ModelError::Io { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains(&shown),
            "error {msg:?} should name the file {shown}"
        );
        msg
    };
    // Different width: same names, other shapes.
    let e = load_err(
        &ModelConfig {
            width: 0.25,
            ..cfg.clone()
        },
        &[47],
        6,
    );
    assert!(e.contains("shape"), "{e}");
    // Tied instead of untied biases.
    load_err(
        &ModelConfig {
            untied_biases: false,
            ..cfg.clone()
        },
        &[47],
        6,
    );
    // Other class count.
    load_err(&cfg, &[47], 7);
    // Other input size (untied biases are per position).
    load_err(&cfg, &[95], 6);
    // Fewer layers: other names at the same positions.
    load_err(
        &ModelConfig {
            stages: 2,
            ..cfg.clone()
        },
        &[47],
        6,
    );
    // A file with every tensor of the network plus extra ones.
    let two = custom(vec![
        LayerSpec::Dense {
            units: 4,
            activation: Activation::Leaky,
            maxout: 1
        };
        2
    ]);
    let one = custom(vec![LayerSpec::Dense {
        units: 4,
        activation: Activation::Leaky,
        maxout: 1,
    }]);
    let extra = dir.path().join("extra.safetensors");
    build(&two, &[5], 3, 125).save(&extra).unwrap();
    let e = build(&one, &[5], 3, 126)
        .load(&extra)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&extra.display().to_string()) && e.contains("does not belong"),
        "{e}"
    );
    // The other way round: a tensor of the network is missing from the file.
    let fewer = dir.path().join("fewer.safetensors");
    build(&one, &[5], 3, 127).save(&fewer).unwrap();
    let e = build(&two, &[5], 3, 128)
        .load(&fewer)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&fewer.display().to_string())
            && e.contains("no tensor named b0.l1.dense.weight"),
        "{e}"
    );
    // Missing file / not a safetensors file.
    let missing = dir.path().join("missing.safetensors");
    let e = b.load(&missing).unwrap_err().to_string();
    assert!(e.contains(&missing.display().to_string()), "{e}");
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a model").unwrap();
    let e = b.load(&junk).unwrap_err().to_string();
    assert!(e.contains(&junk.display().to_string()), "{e}");
}

/// A failed load must leave the network as it was. Today `load` copies every matching tensor
/// before it finds the mismatch (here: the classifier of another class count), so the error
/// leaves a half-loaded network behind.
#[test]
fn failed_load_leaves_the_network_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seven.safetensors");
    let cfg = ModelConfig {
        width: 0.125,
        ..ModelConfig::default()
    };
    build(&cfg, &[47], 7, 150).save(&path).unwrap();
    let mut net = build(&cfg, &[47], 6, 151);
    let x = randn(&[2, 1, 47, 47]);
    let before = tch::no_grad(|| net.forward_t(&[x.shallow_clone()], false));
    assert!(net.load(&path).is_err());
    let after = tch::no_grad(|| net.forward_t(&[x.shallow_clone()], false));
    assert_eq!(
        max_rel_diff(&before, &after),
        0.0,
        "the failed load changed the network"
    );
}

// ---------------------------------------------------------------------------------------------
// 7. Summary and MACs of the reference convroll4.
// ---------------------------------------------------------------------------------------------

/// MACs and parameters of the SPEC's convroll4 (4 views, 95x95, dense 256 without maxout):
/// slice -> [conv32, conv16] pool roll -> [conv64, conv32] pool roll -> [conv128, conv128,
/// conv64] pool roll -> [conv256, conv256, conv128] pool roll -> dense 256 -> dense roll ->
/// dense 256 -> cyclic pool -> classifier.
fn reference_convroll4(classes: usize, views: usize) -> (u64, usize) {
    let stages: [(usize, &[usize]); 4] = [
        (95, &[32, 16]),
        (47, &[64, 32]),
        (23, &[128, 128, 64]),
        (11, &[256, 256, 128]),
    ];
    let mut macs = 0usize;
    let mut params = 0usize;
    let mut cin = 1;
    for (size, filters) in stages {
        for &f in filters {
            macs += views * f * cin * 9 * size * size;
            params += f * cin * 9 + f;
            cin = f;
        }
        cin *= 4; // conv roll
    }
    let flat = cin * 5 * 5; // 512 x 5 x 5
    assert_eq!(flat, 12800);
    macs += views * flat * 256;
    params += flat * 256 + 256;
    macs += views * (4 * 256) * 256; // after the dense roll
    params += 1024 * 256 + 256;
    macs += 256 * classes; // after the cyclic pool: once per image
    params += 256 * classes + classes;
    (macs as u64, params)
}

#[test]
fn convroll4_summary_and_macs_match_the_spec() {
    let cfg = ModelConfig::default();
    assert_eq!(
        (cfg.width, cfg.views, cfg.dense_units, cfg.maxout),
        (1.0, 4, 256, 1)
    );
    let names: Vec<&str> = cfg.branches(&[95])[0]
        .layers
        .iter()
        .map(|l| match l {
            LayerSpec::Slice {} => "slice",
            LayerSpec::Conv { .. } => "conv",
            LayerSpec::Pool {} => "pool",
            LayerSpec::ConvRoll {} => "roll",
            LayerSpec::Dropout { .. } => "drop",
            LayerSpec::Dense { .. } => "dense",
            LayerSpec::DenseRoll {} => "droll",
            LayerSpec::CyclicPool { .. } => "cpool",
            LayerSpec::Slice8 {} => "slice8",
        })
        .collect();
    assert_eq!(
        names.join(" "),
        "slice conv conv pool roll conv conv pool roll conv conv conv pool roll conv conv conv pool roll drop dense droll drop dense cpool"
    );
    let filters: Vec<usize> = cfg.branches(&[95])[0]
        .layers
        .iter()
        .filter_map(|l| {
            if let LayerSpec::Conv { filters, .. } = l {
                Some(*filters)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(filters, vec![32, 16, 64, 32, 128, 128, 64, 256, 256, 128]);

    let net = build(&cfg, &[95], 121, 130);
    let (macs, params) = reference_convroll4(121, 4);
    assert_eq!(net.macs_per_image(), macs, "{}", net.describe());
    assert_eq!(net.parameter_count(), params);
    assert_eq!(net.summary.iter().map(|l| l.params).sum::<usize>(), params);
    // 13 layers with parameters: 10 convs, 2 dense, the classifier.
    assert_eq!(net.summary.iter().filter(|l| l.params > 0).count(), 13);

    let mut sizes: Vec<usize> = net
        .summary
        .iter()
        .filter(|l| l.shape.len() == 3)
        .map(|l| l.shape[1])
        .collect();
    sizes.dedup();
    assert_eq!(sizes, vec![95, 47, 23, 11, 5]);
    for l in net.summary.iter().filter(|l| l.shape.len() == 3) {
        assert_eq!(l.shape[1], l.shape[2], "{l:?}: maps stay square");
    }
    // Views: 4 from the slice to the cyclic pool, then 1; the last map is 512 x 5 x 5.
    let pos = |name: &str| net.summary.iter().position(|l| l.name == name).unwrap();
    assert!(net.summary[..pos("cyclic_pool")]
        .iter()
        .all(|l| l.views == 4));
    assert!(net.summary[pos("cyclic_pool")..]
        .iter()
        .all(|l| l.views == 1));
    let last_map = net
        .summary
        .iter()
        .rev()
        .find(|l| l.shape.len() == 3)
        .unwrap();
    assert_eq!(last_map.shape, vec![512, 5, 5]);
    let cls = net.summary.last().unwrap();
    assert_eq!(
        (cls.name.as_str(), cls.shape.clone(), cls.macs),
        ("classifier", vec![121], 256 * 121)
    );
    let text = net.describe();
    assert!(
        text.contains("512x5x5") && text.contains("32x95x95"),
        "{text}"
    );

    // Eight views double every per-view cost (everything but the classifier).
    let cfg8 = ModelConfig {
        views: 8,
        ..ModelConfig::default()
    };
    let net8 = build(&cfg8, &[95], 121, 131);
    let (macs8, params8) = reference_convroll4(121, 8);
    assert_eq!(net8.macs_per_image(), macs8);
    assert_eq!(net8.parameter_count(), params8);
    assert_eq!(macs8 - 256 * 121, 2 * (macs - 256 * 121));
}

/// The summary's conv output shapes agree with the untied-bias tensors (one bias per channel
/// per position), dense params count maxout pieces, and the forward gives B x classes.
#[test]
fn summary_shapes_match_parameters() {
    let cfg = ModelConfig {
        width: 0.25,
        untied_biases: true,
        maxout: 2,
        ..ModelConfig::default()
    };
    let net = build(&cfg, &[95], 10, 140);
    let conv_maps: Vec<&Vec<usize>> = net
        .summary
        .iter()
        .filter(|l| l.name == "conv")
        .map(|l| &l.shape)
        .collect();
    let biases: Vec<Vec<usize>> = net
        .params
        .iter()
        .filter(|p| p.name.ends_with("conv.bias"))
        .map(|p| p.tensor.size().iter().map(|&d| d as usize).collect())
        .collect();
    assert_eq!(conv_maps.len(), biases.len());
    for (m, b) in conv_maps.iter().zip(&biases) {
        assert_eq!(*m, b, "untied bias shape = conv output shape");
    }
    // Dense with maxout 2: 2 * units outputs, units after the max.
    let dense: Vec<&plankton::model::LayerInfo> =
        net.summary.iter().filter(|l| l.name == "dense").collect();
    assert_eq!(dense[0].shape, vec![64]);
    assert_eq!(dense[0].params, 128 * 5 * 5 * 128 + 128);
    let logits = tch::no_grad(|| net.forward_t(&[randn(&[2, 1, 95, 95])], false));
    assert_eq!(logits.size(), vec![2, 10]);
}

/// The leaky ReLU shim (csrc/leaky_relu.cpp): max(x, s*x) forward, 1 or s backward.
#[test]
fn leaky_relu_shim_matches_its_definition() {
    use plankton::model::cyclic::leaky_relu;
    let x = Tensor::from_slice(&[-3.0f64, -0.5, 0.0, 0.25, 2.0]).set_requires_grad(true);
    let y = leaky_relu(&x, 1.0 / 3.0);
    let got: Vec<f64> = Vec::try_from(&y).unwrap();
    let want = [-1.0, -0.5 / 3.0, 0.0, 0.25, 2.0];
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-12, "{got:?}");
    }
    y.sum(Kind::Double).backward();
    let grad: Vec<f64> = Vec::try_from(&x.grad()).unwrap();
    assert_eq!(grad[0], 1.0 / 3.0);
    assert_eq!(grad[4], 1.0);
    // f32 and a 4-d map take the same kernel.
    let m = Tensor::randn([2, 3, 5, 5], (Kind::Float, tch::Device::Cpu));
    let diff = (leaky_relu(&m, 0.2) - m.maximum(&(&m * 0.2)))
        .abs()
        .max()
        .double_value(&[]);
    assert!(diff < 1e-7);
}

// ---------------------------------------------------------------------------------------------
// 6. Penultimate features (for the unknown-image scores).
// ---------------------------------------------------------------------------------------------

/// The features the classifier reads, and logits equal to the plain forward pass's.
#[test]
fn forward_features_gives_the_classifier_input_and_the_same_logits() {
    let cfg = plankton::config::PipelineConfig::from_toml_str(
        "name = \"f\"\n[[patch]]\nrows = 23\ncols = 23\n[model]\npreset = \"convroll4\"\nwidth = 0.125\ndense_units = 16\n",
        std::path::Path::new("f.toml"),
    )
    .unwrap();
    let net = build(&cfg.model, &[23], 5, 3);
    let x = randn(&[3, 1, 23, 23]);
    let (features, logits) = net.forward_features(std::slice::from_ref(&x));
    let plain = net.forward_t(&[x], false);
    assert_eq!(logits.size(), vec![3, 5]);
    let w = net
        .params
        .iter()
        .find(|p| p.name == "classifier.weight")
        .unwrap();
    assert_eq!(features.size(), vec![3, w.tensor.size()[1]]);
    let diff = f64::try_from((logits - plain).abs().max()).unwrap();
    assert!(diff < 1e-5, "{diff}");
}
