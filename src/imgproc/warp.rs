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
#[inline(always)]
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

/// Columns `[lo, hi)` of one output row whose sample point satisfies `inside`, given that the
/// sample coordinates are linear (hence monotone) in the column and that `inside` means
/// `xlo <= x < xhi && ylo <= y < yhi` (with `open_low`, `xlo < x`). The analytic bounds are
/// widened by a column and then tightened with the exact test, using the same arithmetic as
/// the loops, so the span is exact despite rounding.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn span(
    x0: f64,
    dx: f64,
    y0: f64,
    dy: f64,
    (xlo, xhi): (f64, f64),
    (ylo, yhi): (f64, f64),
    open_low: bool,
    n: usize,
) -> (usize, usize) {
    let test = |g: f64, lo: f64, hi: f64| (if open_low { g > lo } else { g >= lo }) && g < hi;
    let inside = |col: usize| {
        let c = col as f64;
        test(x0 + dx * c, xlo, xhi) && test(y0 + dy * c, ylo, yhi)
    };
    let mut lo = 0f64;
    let mut hi = n as f64;
    for (g0, s, glo, ghi) in [(x0, dx, xlo, xhi), (y0, dy, ylo, yhi)] {
        if s == 0.0 {
            if !test(g0, glo, ghi) {
                return (0, 0);
            }
        } else {
            let (a, b) = ((glo - g0) / s, (ghi - g0) / s);
            let (from, to) = if s > 0.0 { (a, b) } else { (b, a) };
            // Truncation is within one of floor/ceil; the slack and the exact fix-up cover it.
            lo = lo.max((from as i64 - 2) as f64);
            hi = hi.min((to as i64 + 3) as f64);
        }
    }
    if !(lo < hi) || hi <= 0.0 || lo >= n as f64 {
        return (0, 0);
    }
    let (mut lo, mut hi) = (lo.max(0.0) as usize, (hi.min(n as f64)) as usize);
    while lo < hi && !inside(lo) {
        lo += 1;
    }
    while hi > lo && !inside(hi - 1) {
        hi -= 1;
    }
    (lo, hi)
}

/// Warps `src` into `out` (`out_rows x out_cols`, row-major), producing `1 - v/255` samples
/// and `fill` outside the source. `m` maps output (col, row) to source (x, y).
///
/// Per output row the columns fall into three kinds of span: samples with all four neighbours
/// inside (the vectorised hot loop), samples whose footprint straddles the edge (the general
/// per-neighbour path), and samples entirely outside (plain fill).
pub fn warp_inverted(
    src: &GrayView,
    m: &Affine,
    out: &mut [f32],
    out_rows: usize,
    out_cols: usize,
    fill: f32,
) {
    assert_eq!(out.len(), out_rows * out_cols, "warp: output buffer size");
    #[cfg(target_arch = "x86_64")]
    {
        if simd::available() {
            // SAFETY: AVX2 and FMA were detected at run time.
            return unsafe { simd::warp_avx2(src, m, out, out_rows, out_cols, fill) };
        }
    }
    warp_body::<false>(src, m, out, out_rows, out_cols, fill)
}

/// The whole warp, inlined into each instruction-set variant (so that e.g. `floor` compiles to
/// one instruction under AVX2 instead of a libm call).
#[inline(always)]
fn warp_body<const SIMD: bool>(
    src: &GrayView,
    m: &Affine,
    out: &mut [f32],
    out_rows: usize,
    out_cols: usize,
    fill: f32,
) {
    let [[a, b, c], [d, e, f]] = m.m;
    if src.rows == 0 || src.cols == 0 {
        out.fill(fill);
        return;
    }
    let (rows, cols) = (src.rows as f64, src.cols as f64);
    for (r, row) in out.chunks_exact_mut(out_cols).enumerate() {
        let x0 = b * r as f64 + c;
        let y0 = e * r as f64 + f;
        // Samples with any neighbour inside: -1 < x < cols and -1 < y < rows.
        let (tlo, thi) = span(x0, a, y0, d, (-1.0, cols), (-1.0, rows), true, out_cols);
        // Samples with all four neighbours inside: 0 <= x < cols-1 and 0 <= y < rows-1.
        let (ilo, ihi) = span(x0, a, y0, d, (0.0, cols - 1.0), (0.0, rows - 1.0), false, out_cols);
        let (ilo, ihi) = if ilo < ihi { (ilo, ihi) } else { (thi, thi) };
        row[..tlo].fill(fill);
        row[thi..].fill(fill);
        for col in (tlo..ilo).chain(ihi..thi) {
            row[col] = sample_general(src, x0 + a * col as f64, y0 + d * col as f64, fill);
        }
        let interior = &mut row[ilo..ihi];
        #[cfg(target_arch = "x86_64")]
        {
            if SIMD && interior.len() >= 8 {
                // SAFETY: only instantiated with SIMD = true inside the AVX2+FMA variant; the
                // span is interior.
                let done = unsafe { simd::interior_row_avx2(src, x0, a, y0, d, interior, ilo) };
                interior_row_scalar(src, x0, a, y0, d, &mut interior[done..], ilo + done);
                continue;
            }
        }
        interior_row_scalar(src, x0, a, y0, d, interior, ilo);
    }
}

/// The scalar hot loop: every sample has its four neighbours inside the source.
#[inline(always)]
fn interior_row_scalar(src: &GrayView, x0: f64, dx: f64, y0: f64, dy: f64, out: &mut [f32], first: usize) {
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
        // SAFETY: the interior span guarantees 0 <= ix < cols-1 and 0 <= iy < rows-1, so all
        // four neighbours idx, idx+1, idx+cols, idx+cols+1 are within data (len rows*cols).
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

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::GrayView;
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn warp_avx2(src: &GrayView, m: &super::Affine, out: &mut [f32], out_rows: usize, out_cols: usize, fill: f32) {
        super::warp_body::<true>(src, m, out, out_rows, out_cols, fill)
    }

    pub fn available() -> bool {
        static AVX2: OnceLock<bool> = OnceLock::new();
        *AVX2.get_or_init(|| {
            std::env::var_os("PLANKTON_NO_SIMD").is_none()
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
        })
    }

    /// Eight samples at a time: each chunk's origin in f64, the eight offsets from it in f32
    /// lanes (exact enough that results match the scalar path to ~1e-6), neighbours fetched with two 32-bit gathers per eight
    /// samples (bytes `p00 p01` at `idx`, `p10 p11` at `idx + cols`). A gather reads four bytes,
    /// two more than needed, so chunks whose reads could pass the end of the image are left
    /// to the scalar loop. Returns how many leading samples were written.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn interior_row_avx2(src: &GrayView, x0: f64, dx: f64, y0: f64, dy: f64, out: &mut [f32], first: usize) -> usize {
        let len = src.data.len();
        let cols = src.cols;
        if len + cols + 8 >= i32::MAX as usize {
            return 0;
        }
        let base = src.data.as_ptr() as *const i32;
        let steps = _mm256_set_ps(7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0);
        let (vdx, vdy) = (_mm256_set1_ps(dx as f32), _mm256_set1_ps(dy as f32));
        let vcols = _mm256_set1_epi32(cols as i32);
        let mask = _mm256_set1_epi32(0xFF);
        let inv255 = _mm256_set1_ps(1.0 / 255.0);
        let one = _mm256_set1_ps(1.0);
        // Reads reach idx + cols + 3 at most. Coordinates are monotone along the row, so the
        // ends of a run bound its largest index: check the whole row once, else per chunk.
        let max_index = |c0: f64, c1: f64| {
            let (xa, xb) = ((x0 + dx * c0) as usize, (x0 + dx * c1) as usize);
            let (ya, yb) = ((y0 + dy * c0) as usize, (y0 + dy * c1) as usize);
            ya.max(yb) * cols + xa.max(xb) + cols + 3
        };
        let n = out.len();
        let row_safe = max_index(first as f64, (first + n - 1) as f64) < len;
        let mut i = 0;
        loop {
            if i + 8 > n {
                // Redo the last eight (overlapping) rather than leave a scalar tail.
                if i == n || n < 8 {
                    break;
                }
                i = n - 8;
            }
            let col = (first + i) as f64;
            if !row_safe && max_index(col, col + 7.0) >= len {
                break;
            }
            // Chunk origin in f64, split into an integer pixel and a fraction; the eight
            // offsets from it are small, so f32 keeps them to ~1e-5 px.
            let (xs, ys) = (x0 + dx * col, y0 + dy * col);
            let (bx, by) = (xs.floor(), ys.floor());
            let vx = _mm256_fmadd_ps(vdx, steps, _mm256_set1_ps((xs - bx) as f32));
            let vy = _mm256_fmadd_ps(vdy, steps, _mm256_set1_ps((ys - by) as f32));
            let (flx, fly) = (_mm256_floor_ps(vx), _mm256_floor_ps(vy));
            let (fx, fy) = (_mm256_sub_ps(vx, flx), _mm256_sub_ps(vy, fly));
            let origin = _mm256_set1_epi32((by as usize * cols + bx as usize) as i32);
            let idx = _mm256_add_epi32(
                origin,
                _mm256_add_epi32(_mm256_mullo_epi32(_mm256_cvtps_epi32(fly), vcols), _mm256_cvtps_epi32(flx)),
            );
            let top = _mm256_i32gather_epi32::<1>(base, idx);
            let bot = _mm256_i32gather_epi32::<1>(base, _mm256_add_epi32(idx, vcols));
            let p00 = _mm256_cvtepi32_ps(_mm256_and_si256(top, mask));
            let p01 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32::<8>(top), mask));
            let p10 = _mm256_cvtepi32_ps(_mm256_and_si256(bot, mask));
            let p11 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32::<8>(bot), mask));
            let t = _mm256_fmadd_ps(fx, _mm256_sub_ps(p01, p00), p00);
            let b = _mm256_fmadd_ps(fx, _mm256_sub_ps(p11, p10), p10);
            let v = _mm256_fmadd_ps(fy, _mm256_sub_ps(b, t), t);
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_fnmadd_ps(v, inv255, one));
            i += 8;
            if i == n {
                break;
            }
        }
        i.min(n)
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
