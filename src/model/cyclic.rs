//! The cyclic (rotation-sharing) operations of the reference, as pure tensor functions.
//!
//! Tensors are batch x channel x rows x cols. After `slice`, the batch axis holds the rotated
//! views one after another: view v occupies rows [v*B, (v+1)*B). Every other function here
//! relies on that layout, so it lives in one place.

use tch::{Kind, Tensor};

/// Rotation by k*90 degrees counter-clockwise over the last two axes, as numpy's `rot90`:
/// for k = 1, out[r][c] = in[c][W-1-r].
pub fn rot90(x: &Tensor, k: i64) -> Tensor {
    let nd = x.dim() as i64;
    match k.rem_euclid(4) {
        0 => x.shallow_clone(),
        k => x.rot90(k, [nd - 2, nd - 1]),
    }
}

/// CyclicSlice: stack [x, rot90 x, rot180 x, rot270 x] along the batch axis (B -> 4B).
pub fn slice(x: &Tensor) -> Tensor {
    Tensor::cat(&[rot90(x, 0), rot90(x, 1), rot90(x, 2), rot90(x, 3)], 0)
}

/// The 8-way variant's extra input: [x, x rotated by 45 degrees] along the batch axis
/// (B -> 2B), before `slice`. The rotation is about the patch centre, bilinear; outside the
/// source the border value is repeated (the patch is already ZMUV-normalised, so a constant 0
/// would not be background).
pub fn stack_rotated_45(x: &Tensor) -> Tensor {
    let b = x.size()[0];
    let (s, c) = (
        std::f64::consts::FRAC_PI_4.sin(),
        std::f64::consts::FRAC_PI_4.cos(),
    );
    // affine_grid maps output -> input in normalised coordinates.
    let theta = Tensor::from_slice(&[c as f32, -s as f32, 0.0, s as f32, c as f32, 0.0])
        .view([1, 2, 3])
        .to_device(x.device())
        .to_kind(x.kind())
        .expand([b, 2, 3], false);
    let grid = Tensor::affine_grid_generator(&theta, x.size(), true);
    // interpolation 0 = bilinear, padding 1 = border.
    let rotated = x.grid_sampler(&grid, 0, 1, true);
    Tensor::cat(&[x.shallow_clone(), rotated], 0)
}

/// Splits the batch axis into the 4 rotation views: (4B, ...) -> [4 x (B, ...)].
fn views4(x: &Tensor) -> Vec<Tensor> {
    x.chunk(4, 0)
}

/// CyclicRoll for dense features (4B, F) -> (4B, 4F): output view i is the concatenation over
/// k = 0..3 of input view (i + k) mod 4.
pub fn dense_roll(x: &Tensor) -> Tensor {
    let v = views4(x);
    let rows: Vec<Tensor> = (0..4)
        .map(|i| {
            Tensor::cat(
                &(0..4)
                    .map(|k| v[(i + k) % 4].shallow_clone())
                    .collect::<Vec<_>>(),
                1,
            )
        })
        .collect();
    Tensor::cat(&rows, 0)
}

/// CyclicConvRoll (4B, C, H, W) -> (4B, 4C, H, W): like `dense_roll` on channel blocks, with
/// block k (taken from view i + k) rotated back by -90k degrees so that all blocks of a view
/// are spatially aligned. Only defined for square maps.
pub fn conv_roll(x: &Tensor) -> Tensor {
    let v = views4(x);
    let rows: Vec<Tensor> = (0..4)
        .map(|i| {
            let blocks: Vec<Tensor> = (0..4)
                .map(|k| rot90(&v[(i + k) % 4], -(k as i64)))
                .collect();
            Tensor::cat(&blocks, 1)
        })
        .collect();
    Tensor::cat(&rows, 0)
}

pub use plankton_data::config::model::PoolFunction;

/// CyclicPool: (V*B, F) -> (B, F), reducing over the V views (4, or 8 for the 45-degree variant).
pub fn pool(x: &Tensor, views: i64, function: PoolFunction) -> Tensor {
    let size = x.size();
    let mut shape = vec![views, size[0] / views];
    shape.extend_from_slice(&size[1..]);
    let v = x.view(shape.as_slice());
    match function {
        PoolFunction::Rms => (v.square().mean_dim(0, false, None::<Kind>) + 1e-12).sqrt(),
        PoolFunction::Mean => v.mean_dim(0, false, None::<Kind>),
        PoolFunction::Max => v.amax(0, false),
    }
}

extern "C" {
    fn plankton_leaky_relu(x: *const std::ffi::c_void, slope: f64) -> *mut std::ffi::c_void;
}

/// Leaky ReLU max(x, slope * x) for slope in [0, 1), as one ATen kernel forward and backward
/// (the C++ shim in csrc/; tch's own `leaky_relu` has a fixed slope of 0.01).
pub fn leaky_relu(x: &Tensor, slope: f64) -> Tensor {
    // SAFETY: the shim takes a tch tensor handle (an at::Tensor*) and returns a new handle that
    // we own, or null when ATen threw.
    unsafe {
        let out = plankton_leaky_relu(x.as_ptr() as *const std::ffi::c_void, slope);
        assert!(
            !out.is_null(),
            "at::leaky_relu failed on a {:?} tensor of {:?}",
            x.size(),
            x.kind()
        );
        Tensor::from_ptr(out as *mut _)
    }
}
