//! Bilinear affine warp of an 8-bit grayscale image into an inverted float patch.
//!
//! Semantics match `skimage.transform.warp(1 - img/255, M, order=1, mode='constant', cval=fill)`:
//! each output pixel samples the source at `M·(col, row, 1)`; each of the four bilinear
//! neighbours that lies outside the source contributes `fill` instead of a pixel. The inversion
//! `x = 1 - v/255` is folded into the kernel: bilinear weights sum to one, so for a sample whose
//! four neighbours are all inside, `Σ w (1 - v/255) = 1 - (Σ w v)/255` and the kernel can
//! interpolate the raw bytes. The source is never converted to float, which matters because a
//! source image is often several times larger than the patch cut from it.

use super::affine::Affine;

/// A borrowed row-major 8-bit grayscale image.
#[derive(Debug, Clone, Copy)]
pub struct GrayView<'a> {
    pub data: &'a [u8],
    pub rows: usize,
    pub cols: usize,
}

impl<'a> GrayView<'a> {
    pub fn new(data: &'a [u8], rows: usize, cols: usize) -> Self {
        assert_eq!(
            data.len(),
            rows * cols,
            "GrayView: buffer size does not match {rows}x{cols}"
        );
        GrayView { data, rows, cols }
    }

    #[inline]
    fn inverted_or(&self, r: isize, c: isize, fill: f32) -> f32 {
        if r < 0 || c < 0 || r >= self.rows as isize || c >= self.cols as isize {
            fill
        } else {
            1.0 - self.data[r as usize * self.cols + c as usize] as f32 * (1.0 / 255.0)
        }
    }

    /// The median of the border pixels, inverted: the value a background-aware fill uses so
    /// that a rotated patch of an image on a grey background shows no frame.
    pub fn border_median_inverted(&self) -> f32 {
        if self.rows == 0 || self.cols == 0 {
            return 0.0;
        }
        let mut hist = [0u32; 256];
        let last_row = (self.rows - 1) * self.cols;
        for c in 0..self.cols {
            hist[self.data[c] as usize] += 1;
            if self.rows > 1 {
                hist[self.data[last_row + c] as usize] += 1;
            }
        }
        for r in 1..self.rows.saturating_sub(1) {
            hist[self.data[r * self.cols] as usize] += 1;
            if self.cols > 1 {
                hist[self.data[r * self.cols + self.cols - 1] as usize] += 1;
            }
        }
        let total: u32 = hist.iter().sum();
        let mut seen = 0;
        for (v, &n) in hist.iter().enumerate() {
            seen += n;
            if 2 * seen >= total {
                return 1.0 - v as f32 / 255.0;
            }
        }
        0.0
    }
}

/// Bilinear sample with per-neighbour fill (the slow, general path).
#[inline]
fn sample_general(src: &GrayView, x: f64, y: f64, fill: f32) -> f32 {
    if !(x > -1.0 && y > -1.0 && x < src.cols as f64 && y < src.rows as f64) {
        return fill; // all four neighbours outside (also catches NaN)
    }
    let (xf, yf) = (x.floor(), y.floor());
    let (c0, r0) = (xf as isize, yf as isize);
    let (dx, dy) = ((x - xf) as f32, (y - yf) as f32);
    let top = (1.0 - dx) * src.inverted_or(r0, c0, fill) + dx * src.inverted_or(r0, c0 + 1, fill);
    let bottom =
        (1.0 - dx) * src.inverted_or(r0 + 1, c0, fill) + dx * src.inverted_or(r0 + 1, c0 + 1, fill);
    (1.0 - dy) * top + dy * bottom
}

/// Columns `[lo, hi)` of one output row whose sample point has all four neighbours inside,
/// i.e. `0 <= x < cols-1` and `0 <= y < rows-1`. Sample coordinates are monotone in the column,
/// so checking the two ends (with the same arithmetic the loop uses) makes the span exact.
fn interior_span(x0: f64, dx: f64, y0: f64, dy: f64, src: &GrayView, n: usize) -> (usize, usize) {
    let (xmax, ymax) = ((src.cols as f64) - 1.0, (src.rows as f64) - 1.0);
    let inside = |col: usize| {
        let x = x0 + dx * col as f64;
        let y = y0 + dy * col as f64;
        x >= 0.0 && x < xmax && y >= 0.0 && y < ymax
    };
    let mut lo = 0f64;
    let mut hi = n as f64;
    for (g0, s, upper) in [(x0, dx, xmax), (y0, dy, ymax)] {
        if s == 0.0 {
            if !(g0 >= 0.0 && g0 < upper) {
                return (0, 0);
            }
        } else {
            let (a, b) = ((0.0 - g0) / s, (upper - g0) / s);
            let (from, to) = if s > 0.0 { (a, b) } else { (b, a) };
            lo = lo.max(from.ceil());
            hi = hi.min(to.floor() + 1.0);
        }
    }
    if !(lo < hi) {
        return (0, 0);
    }
    let (mut lo, mut hi) = (lo.max(0.0) as usize, (hi.min(n as f64)) as usize);
    // Floating-point rounding can put an end one column off: nudge until both ends are inside.
    while lo < hi && !inside(lo) {
        lo += 1;
    }
    while hi > lo && !inside(hi - 1) {
        hi -= 1;
    }
    // A one-column nudge the other way may also be possible; the general path covers it.
    (lo, hi)
}

/// Warps `src` into `out` (`out_rows x out_cols`, row-major), producing `1 - v/255` samples
/// and `fill` outside the source. `m` maps output (col, row) to source (x, y).
pub fn warp_inverted(
    src: &GrayView,
    m: &Affine,
    out: &mut [f32],
    out_rows: usize,
    out_cols: usize,
    fill: f32,
) {
    assert_eq!(out.len(), out_rows * out_cols, "warp: output buffer size");
    let [[a, b, c], [d, e, f]] = m.m;
    if src.rows == 0 || src.cols == 0 {
        out.fill(fill);
        return;
    }
    for (r, row) in out.chunks_exact_mut(out_cols).enumerate() {
        let x0 = b * r as f64 + c;
        let y0 = e * r as f64 + f;
        let (lo, hi) = if src.rows >= 2 && src.cols >= 2 {
            interior_span(x0, a, y0, d, src, out_cols)
        } else {
            (0, 0)
        };
        for (col, o) in row.iter_mut().enumerate().take(lo) {
            *o = sample_general(src, x0 + a * col as f64, y0 + d * col as f64, fill);
        }
        interior_row(src, x0, a, y0, d, &mut row[lo..hi], lo);
        for (col, o) in row.iter_mut().enumerate().skip(hi) {
            *o = sample_general(src, x0 + a * col as f64, y0 + d * col as f64, fill);
        }
    }
}

/// The hot loop: every sample has its four neighbours inside the source.
#[inline]
fn interior_row(src: &GrayView, x0: f64, dx: f64, y0: f64, dy: f64, out: &mut [f32], first: usize) {
    let data = src.data;
    let cols = src.cols;
    for (i, o) in out.iter_mut().enumerate() {
        let col = (first + i) as f64;
        let x = x0 + dx * col;
        let y = y0 + dy * col;
        // Both are >= 0 here, so truncation is floor.
        let (ix, iy) = (x as usize, y as usize);
        let (fx, fy) = ((x - ix as f64) as f32, (y - iy as f64) as f32);
        let idx = iy * cols + ix;
        debug_assert!(ix + 1 < cols && iy + 1 < src.rows);
        // SAFETY: interior_span guarantees 0 <= ix < cols-1 and 0 <= iy < rows-1, so all four
        // neighbours idx, idx+1, idx+cols, idx+cols+1 are within data (len rows*cols).
        let (p00, p01, p10, p11) = unsafe {
            (
                *data.get_unchecked(idx) as f32,
                *data.get_unchecked(idx + 1) as f32,
                *data.get_unchecked(idx + cols) as f32,
                *data.get_unchecked(idx + cols + 1) as f32,
            )
        };
        let top = p00 + fx * (p01 - p00);
        let bottom = p10 + fx * (p11 - p10);
        *o = 1.0 - (top + fy * (bottom - top)) * (1.0 / 255.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imgproc::affine::{patch_transform, Augmentation};

    fn reference(src: &GrayView, m: &Affine, rows: usize, cols: usize, fill: f32) -> Vec<f32> {
        let mut out = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            for c in 0..cols {
                let (x, y) = m.apply(c as f64, r as f64);
                out.push(sample_general(src, x, y, fill));
            }
        }
        out
    }

    fn test_image(rows: usize, cols: usize) -> Vec<u8> {
        (0..rows * cols)
            .map(|i| ((i * 37 + i / cols * 11) % 256) as u8)
            .collect()
    }

    #[test]
    fn fast_path_equals_general_path() {
        let data = test_image(37, 53);
        let src = GrayView::new(&data, 37, 53);
        for (k, aug) in [
            Augmentation::IDENTITY,
            Augmentation {
                rotation_deg: 33.0,
                zoom: 1.3,
                shear_deg: 12.0,
                ..Augmentation::IDENTITY
            },
            Augmentation {
                flip: true,
                shift_x: 4.5,
                shift_y: -7.25,
                stretch: 1.2,
                ..Augmentation::IDENTITY
            },
            Augmentation {
                rotation_deg: 90.0,
                zoom: 0.7,
                ..Augmentation::IDENTITY
            },
        ]
        .iter()
        .enumerate()
        {
            let m = patch_transform(37, 53, 41, 29, 0.9 + k as f64 * 0.3, aug);
            let mut out = vec![0.0; 41 * 29];
            warp_inverted(&src, &m, &mut out, 41, 29, 0.25);
            let want = reference(&src, &m, 41, 29, 0.25);
            for (i, (a, b)) in out.iter().zip(&want).enumerate() {
                assert!((a - b).abs() < 2e-6, "case {k} pixel {i}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn border_median_of_uniform_border() {
        let mut data = vec![255u8; 5 * 6];
        data[2 * 6 + 2] = 0;
        let v = GrayView::new(&data, 5, 6);
        assert_eq!(v.border_median_inverted(), 0.0);
    }
}
