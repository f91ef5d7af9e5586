//! A network built from `ModelConfig`: branches of layers (one per input patch) whose features
//! are concatenated, then dropout and a linear classifier (softmax lives in the loss and in
//! prediction). Parameters are plain named tensors so the trainer owns their optimiser state
//! and checkpoints them with safetensors.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::device::{self, ComputeConfig, Precision};

use super::config::{Activation, BranchConfig, LayerSpec, ModelConfig};
use super::cyclic::{self, PoolFunction};
use super::ModelError;

/// A trainable tensor. `decay` marks the weights that get L2 weight decay (not biases).
#[derive(Debug)]
pub struct Param {
    pub name: String,
    pub tensor: Tensor,
    pub decay: bool,
}

#[derive(Debug)]
enum Layer {
    Slice,
    Slice8,
    Conv {
        w: usize,
        b: usize,
        untied: bool,
        act: Activation,
    },
    Pool,
    ConvRoll,
    Dropout(f64),
    Dense {
        w: usize,
        b: usize,
        act: Activation,
        maxout: i64,
        flatten: bool,
    },
    DenseRoll,
    CyclicPool {
        views: i64,
        function: PoolFunction,
    },
}

/// What one layer does to one image, for `plankton model` summaries and compute matching.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerInfo {
    pub branch: usize,
    pub name: String,
    /// Output shape per view: [C, H, W] or [F].
    pub shape: Vec<usize>,
    /// Views per image after the layer (1, 4 or 8).
    pub views: usize,
    pub params: usize,
    /// Multiply-accumulates per image (all views).
    pub macs: u64,
}

#[derive(Debug)]
struct Branch {
    input: usize,
    layers: Vec<Layer>,
}

#[derive(Debug)]
pub struct Network {
    pub params: Vec<Param>,
    branches: Vec<Branch>,
    classifier: (usize, usize),
    classifier_dropout: f64,
    leaky_slope: f64,
    pub num_classes: usize,
    pub device: Device,
    pub summary: Vec<LayerInfo>,
    /// bf16 autocast in `forward_t` (see `set_compute`).
    precision: Precision,
    /// Inputs and conv weights laid out channels-last.
    channels_last: bool,
}

#[derive(Debug, Clone, Copy)]
enum Shape {
    Map { c: usize, h: usize, w: usize },
    Flat(usize),
}

impl Shape {
    fn numel(self) -> usize {
        match self {
            Shape::Map { c, h, w } => c * h * w,
            Shape::Flat(f) => f,
        }
    }
    fn dims(self) -> Vec<usize> {
        match self {
            Shape::Map { c, h, w } => vec![c, h, w],
            Shape::Flat(f) => vec![f],
        }
    }
}

/// An orthogonal matrix of the given shape (rows x cols), as the reference draws it: the U or
/// V of the SVD of a standard normal matrix, whichever has that shape.
pub fn orthogonal(rows: usize, cols: usize, gain: f64) -> Tensor {
    let a = Tensor::randn([rows as i64, cols as i64], (Kind::Double, Device::Cpu));
    // `svd` rather than `linalg_svd`: tch always passes linalg_svd a driver, which CPU rejects.
    let (u, _, v) = a.svd(true, true);
    let q = if u.size() == [rows as i64, cols as i64] {
        u
    } else {
        v.tr()
    };
    (q * gain).to_kind(Kind::Float).contiguous()
}

struct Builder<'a> {
    params: &'a mut Vec<Param>,
    device: Device,
    /// Draw initial weights (else zeros: the weights are about to be loaded).
    init: bool,
}

impl Builder<'_> {
    fn orthogonal(&self, rows: usize, cols: usize, gain: f64) -> Tensor {
        if self.init {
            orthogonal(rows, cols, gain)
        } else {
            Tensor::zeros([rows as i64, cols as i64], (Kind::Float, Device::Cpu))
        }
    }

    fn add(&mut self, name: String, t: Tensor, decay: bool) -> usize {
        let t = t.to_device(self.device).set_requires_grad(true);
        self.params.push(Param {
            name,
            tensor: t,
            decay,
        });
        self.params.len() - 1
    }
}

impl Network {
    /// Builds the network for `num_classes` classes and square patches of `patch_sizes`.
    /// Initial weights come from torch's global generator: seed it (`tch::manual_seed`) first
    /// for a reproducible initialisation.
    pub fn new(
        cfg: &ModelConfig,
        patch_sizes: &[usize],
        num_classes: usize,
        device: Device,
    ) -> Result<Network, ModelError> {
        Self::build(cfg, patch_sizes, num_classes, device, true)
    }

    /// Loads saved weights into a network built without drawing initial weights (the
    /// orthogonal initialisation of a full-width convroll4 takes about half a second, as long as
    /// a prediction pass over a few images).
    pub fn load_from(
        cfg: &ModelConfig,
        patch_sizes: &[usize],
        num_classes: usize,
        device: Device,
        weights: &Path,
    ) -> Result<Network, ModelError> {
        let mut net = Self::build(cfg, patch_sizes, num_classes, device, false)?;
        net.load(weights)?;
        Ok(net)
    }

    fn build(
        cfg: &ModelConfig,
        patch_sizes: &[usize],
        num_classes: usize,
        device: Device,
        init: bool,
    ) -> Result<Network, ModelError> {
        if num_classes == 0 {
            return Err(ModelError::Invalid(
                "the network needs at least one class".into(),
            ));
        }
        let branches_cfg = cfg.branches(patch_sizes);
        if branches_cfg.is_empty() {
            return Err(ModelError::Invalid(
                "the model has no branch (preset = \"custom\" needs [[model.branch]])".into(),
            ));
        }
        cfg.validate().map_err(ModelError::Invalid)?;
        let mut params = Vec::new();
        let mut summary = Vec::new();
        let mut branches = Vec::new();
        let mut features = 0;
        let _guard = tch::no_grad_guard();
        for (bi, bc) in branches_cfg.iter().enumerate() {
            let size = *patch_sizes.get(bc.input).ok_or_else(|| {
                ModelError::Invalid(format!(
                    "branch {bi} reads input {} but the pipeline has {} [[patch]] entries",
                    bc.input,
                    patch_sizes.len()
                ))
            })?;
            let mut b = Builder {
                params: &mut params,
                device,
                init,
            };
            let (branch, out) = build_branch(cfg, bi, bc, size, &mut b, &mut summary)?;
            features += out;
            branches.push(branch);
        }
        let mut b = Builder {
            params: &mut params,
            device,
            init,
        };
        let w = b.add(
            "classifier.weight".into(),
            b.orthogonal(num_classes, features, 1.0),
            true,
        );
        let bias = b.add(
            "classifier.bias".into(),
            Tensor::zeros([num_classes as i64], (Kind::Float, Device::Cpu)),
            false,
        );
        summary.push(LayerInfo {
            branch: usize::MAX,
            name: "classifier".into(),
            shape: vec![num_classes],
            views: 1,
            params: features * num_classes + num_classes,
            macs: (features * num_classes) as u64,
        });
        Ok(Network {
            params,
            branches,
            classifier: (w, bias),
            classifier_dropout: cfg.dropout,
            leaky_slope: cfg.leaky_slope,
            num_classes,
            device,
            summary,
            precision: Precision::Fp32,
            channels_last: false,
        })
    }

    /// Applies a pipeline's `[compute]`: precision of the forward pass and the memory layout.
    /// Call it before creating the optimiser (channels-last replaces the conv weight tensors;
    /// loading weights afterwards keeps the layout).
    pub fn set_compute(&mut self, compute: &ComputeConfig) {
        self.precision = compute.precision;
        if compute.channels_last != self.channels_last {
            let _guard = tch::no_grad_guard();
            for p in self.params.iter_mut().filter(|p| p.tensor.dim() == 4) {
                let t = if compute.channels_last {
                    device::channels_last(&p.tensor)
                } else {
                    p.tensor.contiguous()
                };
                p.tensor = t.detach().set_requires_grad(true);
            }
            self.channels_last = compute.channels_last;
        }
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// A host batch tensor on this network's device, in its layout (pinned memory and a
    /// non-blocking copy on CUDA, so the host does not wait for it).
    pub fn upload(&self, host: &Tensor) -> Tensor {
        device::upload(host, self.device, self.channels_last)
    }

    /// Logits (B x classes, fp32) for one batch: `inputs[k]` is B x 1 x H x W for patch k. In
    /// bf16 precision the layers run under autocast and the logits come back as fp32, so the
    /// softmax and the loss stay fp32.
    pub fn forward_t(&self, inputs: &[Tensor], train: bool) -> Tensor {
        if self.precision == Precision::Bf16 {
            let _autocast = device::Autocast::enter(self.device);
            return self.forward_layers(inputs, train).to_kind(Kind::Float);
        }
        self.forward_layers(inputs, train)
    }

    /// Width of the penultimate features (what the classifier reads).
    pub fn feature_dim(&self) -> usize {
        self.params[self.classifier.0].tensor.size()[1] as usize
    }

    /// The penultimate features (B x F, fp32: what the classifier reads, before its dropout)
    /// and the logits (B x classes, fp32) of one batch in evaluation mode: what the
    /// unknown-image scores need (`plankton_core::unknown`).
    pub fn forward_features(&self, inputs: &[Tensor]) -> (Tensor, Tensor) {
        let run = || {
            let features = self.features(inputs, false);
            let logits = self.classify(&features, false);
            (features.to_kind(Kind::Float), logits.to_kind(Kind::Float))
        };
        if self.precision == Precision::Bf16 {
            let _autocast = device::Autocast::enter(self.device);
            return run();
        }
        run()
    }

    fn forward_layers(&self, inputs: &[Tensor], train: bool) -> Tensor {
        let features = self.features(inputs, train);
        self.classify(&features, train)
    }

    fn classify(&self, features: &Tensor, train: bool) -> Tensor {
        let x = features.dropout(self.classifier_dropout, train);
        let (w, b) = self.classifier;
        x.linear(&self.params[w].tensor, Some(&self.params[b].tensor))
    }

    fn features(&self, inputs: &[Tensor], train: bool) -> Tensor {
        let feats: Vec<Tensor> = self
            .branches
            .iter()
            .map(|b| {
                let mut x = inputs[b.input].shallow_clone();
                for layer in &b.layers {
                    x = self.apply(layer, &x, train);
                }
                // A branch may end on a conv map: the classifier reads flat features.
                if x.dim() > 2 {
                    x.flatten(1, -1)
                } else {
                    x
                }
            })
            .collect();
        if feats.len() == 1 {
            feats.into_iter().next().unwrap()
        } else {
            Tensor::cat(&feats, 1)
        }
    }

    fn activate(&self, x: Tensor, act: Activation) -> Tensor {
        match act {
            Activation::Leaky => cyclic::leaky_relu(&x, self.leaky_slope),
            Activation::Relu => x.relu(),
            Activation::Linear => x,
        }
    }

    fn apply(&self, layer: &Layer, x: &Tensor, train: bool) -> Tensor {
        let p = |i: usize| &self.params[i].tensor;
        match *layer {
            Layer::Slice => cyclic::slice(x),
            Layer::Slice8 => cyclic::slice(&cyclic::stack_rotated_45(x)),
            Layer::Conv { w, b, untied, act } => {
                let y = if untied {
                    x.conv2d(p(w), None::<Tensor>, [1, 1], [1, 1], [1, 1], 1) + p(b)
                } else {
                    x.conv2d(p(w), Some(p(b)), [1, 1], [1, 1], [1, 1], 1)
                };
                self.activate(y, act)
            }
            Layer::Pool => x.max_pool2d([3, 3], [2, 2], [0, 0], [1, 1], false),
            Layer::ConvRoll => cyclic::conv_roll(x),
            Layer::Dropout(q) => x.dropout(q, train),
            Layer::Dense {
                w,
                b,
                act,
                maxout,
                flatten,
            } => {
                let x = if flatten {
                    x.flatten(1, -1)
                } else {
                    x.shallow_clone()
                };
                let y = x.linear(p(w), Some(p(b)));
                let y = if maxout > 1 {
                    let n = y.size()[0];
                    y.view([n, -1, maxout]).amax(2, false)
                } else {
                    y
                };
                self.activate(y, act)
            }
            Layer::DenseRoll => cyclic::dense_roll(x),
            Layer::CyclicPool { views, function } => cyclic::pool(x, views, function),
        }
    }

    /// Multiply-accumulates per image for one forward pass.
    pub fn macs_per_image(&self) -> u64 {
        self.summary.iter().map(|l| l.macs).sum()
    }

    pub fn parameter_count(&self) -> usize {
        self.params.iter().map(|p| p.tensor.numel()).sum()
    }

    /// A text table of the layers (shape per view, views, parameters, MACs).
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{:<6} {:<22} {:>14} {:>5} {:>10} {:>14}\n",
            "branch", "layer", "shape", "views", "params", "MACs/image"
        );
        for l in &self.summary {
            let shape = l
                .shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("x");
            let branch = if l.branch == usize::MAX {
                "-".into()
            } else {
                l.branch.to_string()
            };
            s += &format!(
                "{branch:<6} {:<22} {shape:>14} {:>5} {:>10} {:>14}\n",
                l.name, l.views, l.params, l.macs
            );
        }
        s += &format!(
            "total: {} parameters, {:.1} MMACs per image\n",
            self.parameter_count(),
            self.macs_per_image() as f64 / 1e6
        );
        s
    }

    /// Writes all parameters to a safetensors file durably ([`crate::fsx`]): a crash or a power
    /// loss never leaves a half-written file under `path`.
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        let err = |e: &dyn std::fmt::Display| ModelError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let named: Vec<(&str, Tensor)> = self
            .params
            .iter()
            .map(|p| {
                (
                    p.name.as_str(),
                    p.tensor.to_device(Device::Cpu).contiguous(),
                )
            })
            .collect();
        crate::fsx::write_atomic_via(path, |tmp| Tensor::write_safetensors(&named, tmp))
            .map_err(|e| err(&e))?
            .map_err(|e| err(&e.source))
    }

    /// Loads parameters saved by `save`; every name and shape must match this network.
    pub fn load(&mut self, path: &Path) -> Result<(), ModelError> {
        let err = |message: String| ModelError::Io {
            path: path.to_path_buf(),
            message,
        };
        let stored = Tensor::read_safetensors(path).map_err(|e| err(e.to_string()))?;
        let mut by_name: std::collections::HashMap<String, Tensor> = stored.into_iter().collect();
        // Check everything before copying anything, so a failed load leaves the network as it was.
        let mut matched = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let t = by_name
                .remove(&p.name)
                .ok_or_else(|| err(format!("no tensor named {}", p.name)))?;
            if t.size() != p.tensor.size() {
                return Err(err(format!(
                    "{}: stored shape {:?}, network has {:?}",
                    p.name,
                    t.size(),
                    p.tensor.size()
                )));
            }
            matched.push(t);
        }
        if let Some(extra) = by_name.keys().next() {
            return Err(err(format!(
                "tensor {extra} does not belong to this network"
            )));
        }
        let _guard = tch::no_grad_guard();
        for (p, t) in self.params.iter_mut().zip(matched) {
            p.tensor.copy_(&t);
        }
        Ok(())
    }
}

/// What [`Network::init_from`] carried over from an earlier run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InitFrom {
    /// Classes of both runs: their output rows are the earlier run's.
    pub kept: Vec<String>,
    /// Classes only this run has: fresh output rows.
    pub added: Vec<String>,
    /// Classes only the earlier run had: their rows are left out.
    pub dropped: Vec<String>,
}

impl Network {
    /// Starts from an earlier run's weights (fine-tuning when the class list changes): every
    /// layer but the classifier must match in name and shape and is copied; the classifier's
    /// rows (weight and bias) are copied by class name, so classes of both runs keep what they
    /// learned, new classes start from this network's fresh initialisation and classes the
    /// earlier run alone had are dropped.
    pub fn init_from(
        &mut self,
        path: &Path,
        old_classes: &[String],
        new_classes: &[String],
    ) -> Result<InitFrom, ModelError> {
        let err = |message: String| ModelError::Io {
            path: path.to_path_buf(),
            message,
        };
        let stored = Tensor::read_safetensors(path).map_err(|e| err(e.to_string()))?;
        let by_name: std::collections::HashMap<String, Tensor> = stored.into_iter().collect();
        let is_classifier = |n: &str| n == "classifier.weight" || n == "classifier.bias";
        for p in &self.params {
            let t = by_name.get(&p.name).ok_or_else(|| {
                err(format!(
                    "no tensor named {}: the earlier run's network is another architecture",
                    p.name
                ))
            })?;
            let (have, want) = (t.size(), p.tensor.size());
            let same = if is_classifier(&p.name) {
                have.first() == Some(&(old_classes.len() as i64)) && have[1..] == want[1..]
            } else {
                have == want
            };
            if !same {
                return Err(err(format!(
                    "{}: stored shape {have:?}, this network has {want:?} (with {} earlier classes): the networks differ",
                    p.name,
                    old_classes.len()
                )));
            }
        }
        let old_index: std::collections::HashMap<&str, i64> = old_classes
            .iter()
            .enumerate()
            .map(|(i, c)| (c.as_str(), i as i64))
            .collect();
        let _guard = tch::no_grad_guard();
        for p in self.params.iter_mut() {
            let t = &by_name[&p.name];
            if !is_classifier(&p.name) {
                p.tensor.copy_(t);
                continue;
            }
            for (i, class) in new_classes.iter().enumerate() {
                if let Some(&j) = old_index.get(class.as_str()) {
                    p.tensor
                        .get(i as i64)
                        .copy_(&t.get(j).to_device(p.tensor.device()));
                }
            }
        }
        let new: std::collections::HashSet<&str> = new_classes.iter().map(String::as_str).collect();
        Ok(InitFrom {
            kept: new_classes
                .iter()
                .filter(|c| old_index.contains_key(c.as_str()))
                .cloned()
                .collect(),
            added: new_classes
                .iter()
                .filter(|c| !old_index.contains_key(c.as_str()))
                .cloned()
                .collect(),
            dropped: old_classes
                .iter()
                .filter(|c| !new.contains(c.as_str()))
                .cloned()
                .collect(),
        })
    }
}

fn build_branch(
    cfg: &ModelConfig,
    bi: usize,
    bc: &BranchConfig,
    size: usize,
    b: &mut Builder,
    summary: &mut Vec<LayerInfo>,
) -> Result<(Branch, usize), ModelError> {
    let mut shape = Shape::Map {
        c: 1,
        h: size,
        w: size,
    };
    let mut views = 1usize;
    let mut layers = Vec::new();
    for (li, spec) in bc.layers.iter().enumerate() {
        let invalid = |why: String| {
            ModelError::Invalid(format!(
                "branch {bi}, layer {li} ({}): {why}",
                layer_name(spec)
            ))
        };
        let mut params = 0;
        let mut macs = 0u64;
        let prefix = format!("b{bi}.l{li}");
        let layer = match *spec {
            LayerSpec::Slice {} | LayerSpec::Slice8 {} => {
                if views != 1 {
                    return Err(invalid("the batch is already sliced".into()));
                }
                match shape {
                    Shape::Map { h, w, .. } if h == w => {}
                    _ => return Err(invalid("needs a square input map".into())),
                }
                if matches!(spec, LayerSpec::Slice8 {}) {
                    views = 8;
                    Layer::Slice8
                } else {
                    views = 4;
                    Layer::Slice
                }
            }
            LayerSpec::Conv {
                filters,
                activation,
                untied_biases,
            } => {
                let Shape::Map { c, h, w } = shape else {
                    return Err(invalid("needs a conv map, got dense features".into()));
                };
                if filters == 0 {
                    return Err(invalid("filters must be > 0".into()));
                }
                let untied = untied_biases.unwrap_or(cfg.untied_biases);
                let (layer, n) = conv_layer(b, &prefix, (c, h, w), filters, untied, activation);
                params = n;
                macs = (views * filters * c * 9 * h * w) as u64;
                shape = Shape::Map { c: filters, h, w };
                layer
            }
            LayerSpec::Pool {} => {
                let Shape::Map { c, h, w } = shape else {
                    return Err(invalid("needs a conv map".into()));
                };
                if h < 3 || w < 3 {
                    return Err(invalid(format!("map {h}x{w} is smaller than the 3x3 pool")));
                }
                shape = Shape::Map {
                    c,
                    h: (h - 3) / 2 + 1,
                    w: (w - 3) / 2 + 1,
                };
                Layer::Pool
            }
            LayerSpec::ConvRoll {} => {
                let Shape::Map { c, h, w } = shape else {
                    return Err(invalid("needs a conv map".into()));
                };
                if views < 4 {
                    return Err(invalid("needs a sliced batch (add `slice` first)".into()));
                }
                if h != w {
                    return Err(invalid(format!(
                        "only defined for square maps, got {h}x{w}"
                    )));
                }
                if h % 2 == 0 {
                    tracing::warn!(branch = bi, layer = li, size = h, "conv roll on an even-sized map: the rolled views are not pixel-aligned (keep map sizes odd)");
                }
                shape = Shape::Map { c: 4 * c, h, w };
                Layer::ConvRoll
            }
            LayerSpec::Dropout { p } => {
                if !(0.0..1.0).contains(&p) {
                    return Err(invalid(format!("p must be in [0, 1), got {p}")));
                }
                Layer::Dropout(p)
            }
            LayerSpec::Dense {
                units,
                activation,
                maxout,
            } => {
                if units == 0 || maxout == 0 {
                    return Err(invalid("units and maxout must be > 0".into()));
                }
                let fan_in = shape.numel();
                let flatten = matches!(shape, Shape::Map { .. });
                let (layer, n) =
                    dense_layer(b, &prefix, fan_in, units, maxout, activation, flatten);
                params = n;
                macs = (views * fan_in * units * maxout) as u64;
                shape = Shape::Flat(units);
                layer
            }
            LayerSpec::DenseRoll {} => {
                let Shape::Flat(f) = shape else {
                    return Err(invalid(
                        "needs dense features (put a dense layer first)".into(),
                    ));
                };
                if views < 4 {
                    return Err(invalid("needs a sliced batch".into()));
                }
                shape = Shape::Flat(4 * f);
                Layer::DenseRoll
            }
            LayerSpec::CyclicPool { function } => {
                if views == 1 {
                    return Err(invalid("needs a sliced batch".into()));
                }
                let pooled = views;
                views = 1;
                Layer::CyclicPool {
                    views: pooled as i64,
                    function,
                }
            }
        };
        summary.push(LayerInfo {
            branch: bi,
            name: layer_name(spec).into(),
            shape: shape.dims(),
            views,
            params,
            macs,
        });
        layers.push(layer);
    }
    if views != 1 {
        return Err(ModelError::Invalid(format!(
            "branch {bi} ends with {views} views per image: end it with `cyclic_pool`"
        )));
    }
    let out = shape.numel();
    Ok((
        Branch {
            input: bc.input,
            layers,
        },
        out,
    ))
}

/// A 3x3 convolution of a `c x h x w` map: orthogonal weights, biases of 0.1 (one per filter,
/// or per filter and pixel when untied). Returns the layer and its parameter count.
fn conv_layer(
    b: &mut Builder,
    prefix: &str,
    (c, h, w): (usize, usize, usize),
    filters: usize,
    untied: bool,
    act: Activation,
) -> (Layer, usize) {
    let weight = b
        .orthogonal(filters, c * 9, 1.0)
        .view([filters as i64, c as i64, 3, 3]);
    let wi = b.add(format!("{prefix}.conv.weight"), weight, true);
    let bias_shape: Vec<i64> = if untied {
        vec![filters as i64, h as i64, w as i64]
    } else {
        vec![filters as i64]
    };
    let bias = Tensor::full(bias_shape.as_slice(), 0.1, (Kind::Float, Device::Cpu));
    let bi = b.add(format!("{prefix}.conv.bias"), bias, false);
    let params = filters * c * 9 + if untied { filters * h * w } else { filters };
    (
        Layer::Conv {
            w: wi,
            b: bi,
            untied,
            act,
        },
        params,
    )
}

/// A dense layer of `units` x `maxout` outputs: orthogonal weights, biases of 0.1. Returns the
/// layer and its parameter count.
fn dense_layer(
    b: &mut Builder,
    prefix: &str,
    fan_in: usize,
    units: usize,
    maxout: usize,
    act: Activation,
    flatten: bool,
) -> (Layer, usize) {
    let outputs = units * maxout;
    let weight = b.orthogonal(outputs, fan_in, 1.0);
    let wi = b.add(format!("{prefix}.dense.weight"), weight, true);
    let bias = Tensor::full([outputs as i64], 0.1, (Kind::Float, Device::Cpu));
    let bi = b.add(format!("{prefix}.dense.bias"), bias, false);
    (
        Layer::Dense {
            w: wi,
            b: bi,
            act,
            maxout: maxout as i64,
            flatten,
        },
        fan_in * outputs + outputs,
    )
}

fn layer_name(spec: &LayerSpec) -> &'static str {
    match spec {
        LayerSpec::Slice {} => "slice",
        LayerSpec::Slice8 {} => "slice8",
        LayerSpec::Conv { .. } => "conv",
        LayerSpec::Pool {} => "pool",
        LayerSpec::ConvRoll {} => "conv_roll",
        LayerSpec::Dropout { .. } => "dropout",
        LayerSpec::Dense { .. } => "dense",
        LayerSpec::DenseRoll {} => "dense_roll",
        LayerSpec::CyclicPool { .. } => "cyclic_pool",
    }
}
