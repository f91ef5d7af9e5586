//! The fusion network (reference: the `featmomentsinfo_*` / `featharalick_*` configurations of
//! benanne/kaggle-ndsb): standardised features -> dense 80 (ReLU) -> dense 80 (ReLU) -> dense C
//! (linear), added to `log p_convnet`, then softmax.
//!
//! Many such nets are trained at once as one "stack": every weight carries a leading model axis
//! and the layers are batched matrix products. The nets stay independent (the loss is a sum of
//! per-model losses, the optimiser is element-wise, every model draws its own mini-batches from
//! its own rows), but a few thousand rows x 10 repeats x (K folds + the final fit) then cost a
//! few hundred small libtorch calls per step instead of sixty times as many: that is what makes
//! the reference's recipe take seconds on a CPU.

use tch::{Kind, Tensor};

use crate::rng::{Purpose, Stream};

/// Units of both hidden layers (the reference's 80).
pub const HIDDEN: usize = 80;

/// How the stack is trained. The defaults are the reference's (see `TrainSettings::reference`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainSettings {
    pub batch_size: usize,
    /// Mini-batch updates per model.
    pub steps: usize,
    pub momentum: f64,
    /// `(fraction of the steps, learning rate from there on)`, first entry at 0.
    pub schedule: Vec<(f64, f64)>,
}

impl TrainSettings {
    /// The reference's optimiser: Nesterov momentum 0.9, batches of 128, learning rate 1e-3
    /// dropped to 1e-4 after 100 of its 240 chunks and to 1e-5 after 200, here as fractions of
    /// `steps`.
    pub fn reference(steps: usize) -> Self {
        TrainSettings {
            batch_size: 128,
            steps,
            momentum: 0.9,
            schedule: vec![(0.0, 1e-3), (100.0 / 240.0, 1e-4), (200.0 / 240.0, 1e-5)],
        }
    }

    pub fn learning_rate(&self, step: usize) -> f64 {
        let at = step as f64 / self.steps.max(1) as f64;
        self.schedule
            .iter()
            .take_while(|(from, _)| at >= *from)
            .last()
            .map_or(self.schedule[0].1, |s| s.1)
    }
}

/// The rows every model of a stack learns from.
pub struct TrainData<'a> {
    /// `[n, F]` float32 standardised features.
    pub x: &'a Tensor,
    /// `[n, C]` float32 log-probabilities of the convnet.
    pub log_p: &'a Tensor,
    /// `[n]` int64 true classes.
    pub targets: &'a Tensor,
    /// Which of the n rows to train on.
    pub rows: &'a [i64],
}

/// M fusion nets with weights `[M, in, out]` and biases `[M, 1, out]`.
#[derive(Debug)]
pub struct Stack {
    pub weights: Vec<Tensor>,
    pub biases: Vec<Tensor>,
}

/// Lasagne's `Orthogonal(gain)` for a `rows x cols` weight: a Gaussian matrix made orthonormal
/// along its shorter side. Gram-Schmidt on our own stream instead of numpy's SVD: the same
/// (Haar) distribution, and bit-reproducible from the seed.
fn orthogonal(stream: &mut Stream, rows: usize, cols: usize, gain: f64) -> Vec<f32> {
    let (k, len) = if rows <= cols {
        (rows, cols)
    } else {
        (cols, rows)
    };
    let mut v: Vec<Vec<f64>> = (0..k)
        .map(|_| (0..len).map(|_| stream.normal()).collect())
        .collect();
    for i in 0..k {
        let (done, rest) = v.split_at_mut(i);
        let vi = &mut rest[0];
        for vj in done.iter() {
            let d: f64 = vi.iter().zip(vj).map(|(a, b)| a * b).sum();
            vi.iter_mut().zip(vj).for_each(|(a, b)| *a -= d * b);
        }
        let norm = vi.iter().map(|a| a * a).sum::<f64>().sqrt().max(1e-12);
        vi.iter_mut().for_each(|a| *a /= norm);
    }
    let mut out = vec![0.0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            let a = if rows <= cols { v[r][c] } else { v[c][r] };
            out[r * cols + c] = (gain * a) as f32;
        }
    }
    out
}

impl Stack {
    /// Fresh nets, one per seed: orthogonal weights (gain sqrt 2 before a ReLU, 1 for the
    /// output layer) and biases of 0.1, as the reference initialised them.
    pub fn new(seeds: &[u64], inputs: usize, classes: usize) -> Stack {
        let dims = [
            (inputs, HIDDEN, 2f64.sqrt()),
            (HIDDEN, HIDDEN, 2f64.sqrt()),
            (HIDDEN, classes, 1.0),
        ];
        let m = seeds.len() as i64;
        let mut weights = Vec::new();
        let mut biases = Vec::new();
        for (layer, &(i, o, gain)) in dims.iter().enumerate() {
            let mut w = Vec::with_capacity(seeds.len() * i * o);
            for &s in seeds {
                let mut stream = Stream::new(s, Purpose::Other, 0xF05E, layer as u64);
                w.extend(orthogonal(&mut stream, i, o, gain));
            }
            weights.push(
                Tensor::from_slice(&w)
                    .view([m, i as i64, o as i64])
                    .set_requires_grad(true),
            );
            biases.push(
                Tensor::full([m, 1, o as i64], 0.1, (Kind::Float, tch::Device::Cpu))
                    .set_requires_grad(true),
            );
        }
        Stack { weights, biases }
    }

    pub fn models(&self) -> usize {
        self.weights[0].size()[0] as usize
    }

    pub fn inputs(&self) -> usize {
        self.weights[0].size()[1] as usize
    }

    pub fn classes(&self) -> usize {
        self.weights[2].size()[2] as usize
    }

    /// Models `start..start + len` (sharing storage, without gradients).
    pub fn slice(&self, start: usize, len: usize) -> Stack {
        let cut = |t: &Tensor| t.detach().narrow(0, start as i64, len as i64);
        Stack {
            weights: self.weights.iter().map(cut).collect(),
            biases: self.biases.iter().map(cut).collect(),
        }
    }

    /// Handles sharing this stack's storage (to move the nets to a worker thread).
    pub fn shallow(&self) -> Stack {
        Stack {
            weights: self.weights.iter().map(|t| t.shallow_clone()).collect(),
            biases: self.biases.iter().map(|t| t.shallow_clone()).collect(),
        }
    }

    /// Fused log-probabilities `[M, B, C]` for features `[M, B, F]` and convnet log-probs
    /// `[M, B, C]`.
    fn forward(&self, x: &Tensor, log_p: &Tensor) -> Tensor {
        let h1 = self.biases[0].baddbmm(x, &self.weights[0], 1.0, 1.0).relu();
        let h2 = self.biases[1]
            .baddbmm(&h1, &self.weights[1], 1.0, 1.0)
            .relu();
        let z = self.biases[2].baddbmm(&h2, &self.weights[2], 1.0, 1.0);
        (z + log_p).log_softmax(-1, Kind::Float)
    }

    /// Mean over the models of the fused probabilities of `n` rows: `x` `[n, F]`, `log_p`
    /// `[n, C]` -> row-major `n x C`. The reference averaged its repeats' probabilities
    /// uniformly. Rows go through in fixed chunks (bounded memory for a whole test set; the
    /// same rows in the same order always meet the same chunks, so results are reproducible).
    pub fn predict(&self, x: &Tensor, log_p: &Tensor) -> Vec<f32> {
        const CHUNK: i64 = 4096;
        let _guard = tch::no_grad_guard();
        let m = self.models() as i64;
        let (n, f) = (x.size()[0], x.size()[1]);
        let c = log_p.size()[1];
        let mut out = Vec::with_capacity((n * c) as usize);
        let mut start = 0;
        while start < n {
            let len = CHUNK.min(n - start);
            let xs = x
                .narrow(0, start, len)
                .unsqueeze(0)
                .expand([m, len, f], false)
                .contiguous();
            let lp = log_p
                .narrow(0, start, len)
                .unsqueeze(0)
                .expand([m, len, c], false);
            let p = self
                .forward(&xs, &lp)
                .exp()
                .mean_dim(0, false, Kind::Float)
                .contiguous()
                .view([-1]);
            out.extend(Vec::<f32>::try_from(&p).expect("float tensor"));
            start += len;
        }
        out
    }

    /// Trains every model on `data.rows`, reference-style: each step draws `batch_size` rows per
    /// model uniformly with replacement from the model's own stream (`seeds[m]`; the
    /// reference's chunks were `np.random.randint` draws), minimises cross-entropy +
    /// `l2 * sum(w^2)` over the weights (not the biases) with Nesterov momentum as Lasagne
    /// writes it. Returns the mean training cross-entropy per model over the last tenth of the
    /// steps.
    pub fn train(
        &mut self,
        data: &TrainData,
        seeds: &[u64],
        settings: &TrainSettings,
        l2: f64,
    ) -> f64 {
        let m = self.models();
        assert_eq!(seeds.len(), m, "one sampling seed per model");
        assert!(!data.rows.is_empty(), "training needs rows");
        let b = settings.batch_size;
        let c = data.log_p.size()[1];
        let f = data.x.size()[1];
        let n_rows = data.rows.len() as u64;
        let mut streams: Vec<Stream> = seeds
            .iter()
            .map(|&s| Stream::new(s, Purpose::Shuffle, 0xF05E, 0))
            .collect();
        let params: Vec<Tensor> = self
            .weights
            .iter()
            .chain(&self.biases)
            .map(|t| t.shallow_clone())
            .collect();
        let mut velocity: Vec<Tensor> = params.iter().map(|p| p.zeros_like()).collect();
        let mut idx = vec![0i64; m * b];
        let tail_from = settings.steps - settings.steps / 10;
        let (mut tail_loss, mut tail_steps) = (0.0, 0usize);
        for step in 0..settings.steps {
            for (k, s) in streams.iter_mut().enumerate() {
                for slot in &mut idx[k * b..(k + 1) * b] {
                    *slot = data.rows[s.below(n_rows) as usize];
                }
            }
            let ri = Tensor::from_slice(&idx);
            let x = data.x.index_select(0, &ri).view([m as i64, b as i64, f]);
            let lp = data
                .log_p
                .index_select(0, &ri)
                .view([m as i64, b as i64, c]);
            let t = data
                .targets
                .index_select(0, &ri)
                .view([m as i64, b as i64, 1]);
            let nll = -self
                .forward(&x, &lp)
                .gather(2, &t, false)
                .mean_dim(1, false, Kind::Float)
                .sum(Kind::Float);
            nll.backward();
            if step >= tail_from {
                tail_loss += nll.double_value(&[]) / m as f64;
                tail_steps += 1;
            }
            let lr = settings.learning_rate(step);
            let _guard = tch::no_grad_guard();
            for (i, (p, v)) in params.iter().zip(&mut velocity).enumerate() {
                let mut g = p.grad();
                // The penalty's gradient, added here rather than through autograd.
                if i < self.weights.len() && l2 > 0.0 {
                    g += p * (2.0 * l2);
                }
                // Lasagne's nesterov_momentum: v <- mu v - lr g; p <- p + mu v - lr g.
                let _ = v.g_mul_scalar_(settings.momentum).g_add_(&(&g * -lr));
                let mut p = p.shallow_clone();
                let _ = p.g_add_(&(v.shallow_clone() * settings.momentum - &g * lr));
                let _ = p.grad().zero_();
            }
        }
        tail_loss / tail_steps.max(1) as f64
    }

    /// The tensors to store, named `<prefix>.w<k>` / `<prefix>.b<k>`.
    pub fn named(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (k, (w, b)) in self.weights.iter().zip(&self.biases).enumerate() {
            out.push((format!("{prefix}.w{k}"), w.detach().contiguous()));
            out.push((format!("{prefix}.b{k}"), b.detach().contiguous()));
        }
        out
    }

    /// The inverse of [`Stack::named`]; `None` when a tensor is missing or misshapen.
    pub fn from_named(
        stored: &[(String, Tensor)],
        prefix: &str,
        inputs: usize,
        classes: usize,
    ) -> Result<Stack, String> {
        let get = |name: String| {
            stored
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, t)| t.to_kind(Kind::Float))
                .ok_or_else(|| format!("no tensor `{name}`"))
        };
        let mut weights = Vec::new();
        let mut biases = Vec::new();
        for k in 0..3 {
            weights.push(get(format!("{prefix}.w{k}"))?);
            biases.push(get(format!("{prefix}.b{k}"))?);
        }
        let m = weights[0].size()[0];
        let dims = [(inputs, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, classes)];
        for (k, &(i, o)) in dims.iter().enumerate() {
            let (want_w, want_b) = (vec![m, i as i64, o as i64], vec![m, 1, o as i64]);
            if weights[k].size() != want_w || biases[k].size() != want_b {
                return Err(format!(
                    "layer {k}: weights {:?} / bias {:?}, expected {want_w:?} / {want_b:?}",
                    weights[k].size(),
                    biases[k].size()
                ));
            }
        }
        Ok(Stack { weights, biases })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orthogonal_rows_or_columns_are_orthonormal_times_gain() {
        let mut s = Stream::new(3, Purpose::Other, 0, 0);
        for (r, c) in [(7, 80), (80, 80), (80, 121), (52, 8)] {
            let w = orthogonal(&mut s, r, c, 2.0);
            let (k, along_rows) = if r <= c { (r, true) } else { (c, false) };
            for i in 0..k {
                for j in 0..k {
                    let d: f64 = if along_rows {
                        (0..c)
                            .map(|t| w[i * c + t] as f64 * w[j * c + t] as f64)
                            .sum()
                    } else {
                        (0..r)
                            .map(|t| w[t * c + i] as f64 * w[t * c + j] as f64)
                            .sum()
                    };
                    let want = if i == j { 4.0 } else { 0.0 };
                    assert!((d - want).abs() < 1e-4, "{r}x{c} [{i},{j}] {d}");
                }
            }
        }
    }

    #[test]
    fn schedule_drops_at_the_reference_fractions() {
        let s = TrainSettings::reference(240);
        assert_eq!(s.learning_rate(0), 1e-3);
        assert_eq!(s.learning_rate(99), 1e-3);
        assert_eq!(s.learning_rate(100), 1e-4);
        assert_eq!(s.learning_rate(200), 1e-5);
        assert_eq!(s.learning_rate(239), 1e-5);
    }
}
