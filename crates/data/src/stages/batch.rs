//! Batch stage output: fixed-capacity batches in the layout the model wants
//! (`N x 1 x H x W` f32 per network input, plus labels), whose buffers go back to a pool when
//! the consumer drops the batch, so steady-state batching allocates nothing.

use crate::config::PatchConfig;

/// One batch. `len <= capacity`; only the first `len` samples are valid (the last batch of an
/// epoch may be partial).
#[derive(Debug)]
pub struct Batch {
    pub epoch: u64,
    /// Batch number within its epoch.
    pub number: u64,
    pub len: usize,
    pub capacity: usize,
    /// (rows, cols) per network input.
    pub shapes: Vec<(usize, usize)>,
    /// Per input: `capacity * rows * cols` floats, samples contiguous.
    pub inputs: Vec<Vec<f32>>,
    /// Class index per sample, -1 when unlabelled.
    pub labels: Vec<i64>,
    /// Index into the source's record list per sample.
    pub record_indices: Vec<usize>,
    pool: Option<async_channel::Sender<Vec<Vec<f32>>>>,
}

impl Batch {
    /// An empty batch with freshly allocated buffers.
    pub fn new(capacity: usize, patches: &[PatchConfig]) -> Self {
        let shapes: Vec<(usize, usize)> = patches.iter().map(|p| (p.rows, p.cols)).collect();
        let inputs = allocate_inputs(capacity, &shapes);
        Batch::with_buffers(capacity, shapes, inputs, None)
    }

    fn with_buffers(
        capacity: usize,
        shapes: Vec<(usize, usize)>,
        inputs: Vec<Vec<f32>>,
        pool: Option<async_channel::Sender<Vec<Vec<f32>>>>,
    ) -> Self {
        Batch {
            epoch: 0,
            number: 0,
            len: 0,
            capacity,
            shapes,
            inputs,
            labels: Vec::with_capacity(capacity),
            record_indices: Vec::with_capacity(capacity),
            pool,
        }
    }

    pub fn is_full(&self) -> bool {
        self.len == self.capacity
    }

    /// The valid part of input `k`: `len * rows * cols` floats.
    pub fn input(&self, k: usize) -> &[f32] {
        let (r, c) = self.shapes[k];
        &self.inputs[k][..self.len * r * c]
    }

    /// Appends one sample (one patch per input).
    pub fn push(&mut self, patches: &[Vec<f32>], label: Option<u32>, record_index: usize) {
        assert!(self.len < self.capacity, "batch is full");
        for (k, patch) in patches.iter().enumerate() {
            let n = self.shapes[k].0 * self.shapes[k].1;
            self.inputs[k][self.len * n..(self.len + 1) * n].copy_from_slice(patch);
        }
        self.labels.push(label.map_or(-1, i64::from));
        self.record_indices.push(record_index);
        self.len += 1;
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            // A full pool or a finished pipeline just frees the buffers.
            let _ = pool.try_send(std::mem::take(&mut self.inputs));
        }
    }
}

/// One zeroed `capacity * rows * cols` buffer per network input.
fn allocate_inputs(capacity: usize, shapes: &[(usize, usize)]) -> Vec<Vec<f32>> {
    shapes
        .iter()
        .map(|(r, c)| vec![0.0; capacity * r * c])
        .collect()
}

/// Hands out batches whose buffers come back when the batch is dropped.
#[derive(Debug)]
pub struct BatchPool {
    capacity: usize,
    shapes: Vec<(usize, usize)>,
    returned: async_channel::Receiver<Vec<Vec<f32>>>,
    returns: async_channel::Sender<Vec<Vec<f32>>>,
    allocated: usize,
}

impl BatchPool {
    /// `keep` bounds how many returned buffer sets are held for reuse.
    pub fn new(capacity: usize, patches: &[PatchConfig], keep: usize) -> Self {
        let (returns, returned) = async_channel::bounded(keep.max(1));
        BatchPool {
            capacity,
            shapes: patches.iter().map(|p| (p.rows, p.cols)).collect(),
            returned,
            returns,
            allocated: 0,
        }
    }

    pub fn take(&mut self) -> Batch {
        let inputs = match self.returned.try_recv() {
            Ok(bufs) => bufs,
            Err(_) => {
                self.allocated += 1;
                allocate_inputs(self.capacity, &self.shapes)
            }
        };
        Batch::with_buffers(
            self.capacity,
            self.shapes.clone(),
            inputs,
            Some(self.returns.clone()),
        )
    }

    /// Buffer sets allocated so far (stays flat once the pipeline is in steady state).
    pub fn allocated(&self) -> usize {
        self.allocated
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_after_drop() {
        let patches = [PatchConfig::size_normalised(5, 4.0)];
        let mut pool = BatchPool::new(3, &patches, 2);
        for _ in 0..10 {
            let mut b = pool.take();
            b.push(&[vec![1.0; 25]], Some(2), 7);
            assert_eq!(b.input(0).len(), 25);
        }
        assert_eq!(pool.allocated(), 1);
    }
}
