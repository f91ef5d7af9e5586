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

/// The real interval `[from, to]` of columns `col` for which `g0 + s * col` lies in `[lo, hi]`
/// (`inv_s = 1 / s`), ignoring rounding and open/closed ends; callers widen or verify it.
/// For `s == 0` the interval is everything or nothing (NaN coordinates give nothing).
#[inline(always)]
fn col_interval(g0: f64, s: f64, inv_s: f64, lo: f64, hi: f64) -> (f64, f64) {
    if s == 0.0 {
        return if g0 >= lo && g0 <= hi {
            (f64::NEG_INFINITY, f64::INFINITY)
        } else {
            (f64::INFINITY, f64::NEG_INFINITY)
        };
    }
    let (a, b) = ((lo - g0) * inv_s, (hi - g0) * inv_s);
    if s > 0.0 {
        (a, b)
    } else {
        (b, a)
    }
}

/// The per-row column spans of one output row: `[tlo, thi)` may touch the source (everything
/// outside it is plain fill), `[ilo, ihi)` is interior (all four neighbours inside).
struct RowSpans {
    tlo: usize,
    thi: usize,
    ilo: usize,
    ihi: usize,
}

/// Geometry shared by every row of one warp: the column step of the sample point and its
/// reciprocals, so that a row's spans cost a few multiplications rather than divisions.
struct SpanGeom {
    a: f64,
    d: f64,
    inv_a: f64,
    inv_d: f64,
    cols: f64,
    rows: f64,
    n: usize,
}

impl SpanGeom {
    /// The geometry of warping `src` through `m` into rows of `n` columns.
    #[inline(always)]
    fn new(m: &Affine, src: &GrayView, n: usize) -> Self {
        let (a, d) = (m.m[0][0], m.m[1][0]);
        SpanGeom {
            a,
            d,
            inv_a: 1.0 / a,
            inv_d: 1.0 / d,
            cols: src.cols as f64,
            rows: src.rows as f64,
            n,
        }
    }

    /// The touch span alone (`None`: empty), as described for [`SpanGeom::row`].
    #[inline(always)]
    fn touch(&self, x0: f64, y0: f64) -> Option<(usize, usize)> {
        let nf = self.n as f64;
        // Touch: -1 < x < cols and -1 < y < rows.
        let (fx, tx) = col_interval(x0, self.a, self.inv_a, -1.0, self.cols);
        let (fy, ty) = col_interval(y0, self.d, self.inv_d, -1.0, self.rows);
        let (from, to) = (fx.max(fy), tx.min(ty));
        if from.is_nan() || to.is_nan() || from > to || to < -1.0 || from > nf + 1.0 {
            return None;
        }
        let tlo = from.ceil().clamp(0.0, nf) as usize;
        let thi = (to.floor() + 1.0).clamp(0.0, nf) as usize;
        Some((tlo, thi))
    }

    /// Spans of the row whose sample point is `(x0 + a col, y0 + d col)`.
    ///
    /// The touch span is the analytic interval rounded outwards, unchecked. A column it wrongly
    /// includes is still sampled exactly (as `fill`); a column it could wrongly exclude lies
    /// within rounding (~1e-13 px for any sane geometry) of the open edge `-1` or `cols`,
    /// where every inside neighbour's weight is that rounding and the exact value is `fill`.
    ///
    /// The interior span must under-approximate, with exactly the arithmetic of the interior
    /// loops (`x0 + a * col as f64`), because they skip the per-neighbour test: the analytic
    /// interval is rounded inwards and its two ends are checked (and, rarely, moved inwards)
    /// with the exact test. The coordinates are monotone in the column (rounding is monotone),
    /// so two inside ends put every column between them inside.
    #[inline(always)]
    fn row(&self, x0: f64, y0: f64) -> RowSpans {
        let n = self.n;
        let nf = n as f64;
        let empty = RowSpans {
            tlo: 0,
            thi: 0,
            ilo: 0,
            ihi: 0,
        };
        let Some((tlo, thi)) = self.touch(x0, y0) else {
            return empty;
        };
        // Interior: 0 <= x < cols - 1 and 0 <= y < rows - 1.
        let (xhi, yhi) = (self.cols - 1.0, self.rows - 1.0);
        let (fx, tx) = col_interval(x0, self.a, self.inv_a, 0.0, xhi);
        let (fy, ty) = col_interval(y0, self.d, self.inv_d, 0.0, yhi);
        let (from, to) = (fx.max(fy), tx.min(ty));
        let (mut ilo, mut ihi) = (0usize, 0usize);
        if from <= to && to >= 0.0 && from < nf {
            ilo = from.ceil().clamp(0.0, nf) as usize;
            ihi = (to.floor() + 1.0).clamp(0.0, nf) as usize;
            let inside = |col: usize| {
                let c = col as f64;
                let (x, y) = (x0 + self.a * c, y0 + self.d * c);
                x >= 0.0 && x < xhi && y >= 0.0 && y < yhi
            };
            while ilo < ihi && !inside(ilo) {
                ilo += 1;
            }
            while ihi > ilo && !inside(ihi - 1) {
                ihi -= 1;
            }
        }
        if ilo >= ihi {
            // No interior: park the empty span at the end of the touch span.
            return RowSpans {
                tlo,
                thi,
                ilo: thi,
                ihi: thi,
            };
        }
        RowSpans {
            tlo: tlo.min(ilo),
            thi: thi.max(ihi),
            ilo,
            ihi,
        }
    }
}

/// Which interior kernel a warp runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(dead_code)]
enum Level {
    Scalar,
    Avx2,
    Avx512,
}

/// Warps `src` into `out` (`out_rows x out_cols`, row-major), producing `1 - v/255` samples
/// and `fill` outside the source. `m` maps output (col, row) to source (x, y).
///
/// Per output row the columns fall into three kinds of span: samples with all four neighbours
/// inside (the vectorised hot loop), samples whose footprint straddles the edge (the general
/// per-neighbour path), and samples entirely outside (plain fill). With AVX-512, one vector
/// pass covers a row's whole touch span instead, with the per-neighbour fill done in the
/// lanes: through a row-pair copy of the touched source region where that is small (one
/// gather per sample), else straight from the source (two gathers).
pub fn warp_inverted(
    src: &GrayView,
    m: &Affine,
    out: &mut [f32],
    out_rows: usize,
    out_cols: usize,
    fill: f32,
) {
    warp_at(best_level(), true, src, m, out, out_rows, out_cols, fill)
}

/// The fastest kernel this CPU runs (`PLANKTON_NO_SIMD` forces scalar, `PLANKTON_NO_AVX512`
/// at most AVX2).
fn best_level() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        simd::level()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Level::Scalar
    }
}

/// `pairs`: whether the AVX-512 level may use the row-pair copy (tests turn it off to reach
/// the per-span kernels on small sources too).
#[allow(clippy::too_many_arguments)]
fn warp_at(
    level: Level,
    pairs: bool,
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
        match level {
            // SAFETY: `simd::level` only reports a level whose features were detected at run
            // time (and callers in tests only pass levels at or below it).
            Level::Avx512 => {
                // First the row-pair copy (small sources); it declines, writing nothing, where
                // the copy would not pay. SAFETY of both calls: as above.
                if pairs
                    && unsafe { simd::warp_pairs_avx512(src, m, out, out_rows, out_cols, fill) }
                {
                    return;
                }
                if unsafe { simd::warp_touch_avx512(src, m, out, out_rows, out_cols, fill) } {
                    return;
                }
                return unsafe { simd::warp_avx512(src, m, out, out_rows, out_cols, fill) };
            }
            // SAFETY: as above.
            Level::Avx2 => {
                return unsafe { simd::warp_avx2(src, m, out, out_rows, out_cols, fill) }
            }
            Level::Scalar => {}
        }
    }
    let _ = level;
    warp_body::<0>(src, m, out, out_rows, out_cols, fill)
}

/// The whole warp, inlined into each instruction-set variant (so that e.g. `floor` compiles to
/// one instruction under AVX2 instead of a libm call). `K`: 0 scalar, 1 AVX2, 2 AVX-512; it
/// must only be non-zero inside a function compiled with (and called after detecting) those
/// features.
#[inline(always)]
fn warp_body<const K: u8>(
    src: &GrayView,
    m: &Affine,
    out: &mut [f32],
    out_rows: usize,
    out_cols: usize,
    fill: f32,
) {
    debug_assert_eq!(out.len(), out_rows * out_cols);
    let [[a, b, c], [d, e, f]] = m.m;
    if src.rows == 0 || src.cols == 0 || out_cols == 0 {
        out.fill(fill);
        return;
    }
    let geom = SpanGeom::new(m, src, out_cols);
    #[cfg(target_arch = "x86_64")]
    let simd_ok = K != 0 && simd::supports(src);
    for (r, row) in out.chunks_exact_mut(out_cols).enumerate() {
        let x0 = b * r as f64 + c;
        let y0 = e * r as f64 + f;
        let RowSpans { tlo, thi, ilo, ihi } = geom.row(x0, y0);
        row[..tlo].fill(fill);
        row[thi..].fill(fill);
        let (left, rest) = row[..thi].split_at_mut(ilo);
        let (interior, right) = rest.split_at_mut(ihi - ilo);
        for (i, o) in left[tlo..].iter_mut().enumerate() {
            let col = (tlo + i) as f64;
            *o = sample_general(src, x0 + a * col, y0 + d * col, fill);
        }
        for (i, o) in right.iter_mut().enumerate() {
            let col = (ihi + i) as f64;
            *o = sample_general(src, x0 + a * col, y0 + d * col, fill);
        }
        #[cfg(target_arch = "x86_64")]
        {
            if simd_ok && K == 1 && interior.len() >= 8 {
                // SAFETY: K == 1 is only instantiated inside the AVX2 variant; `supports` holds.
                // (The AVX-512 variant only runs here for sources `supports` rejects.)
                unsafe { simd::interior_row_avx2(src, x0, a, y0, d, interior, ilo) };
                continue;
            }
        }
        interior_row_scalar(src, x0, a, y0, d, interior, ilo);
    }
}

/// The scalar hot loop: every sample has its four neighbours inside the source.
#[inline(always)]
fn interior_row_scalar(
    src: &GrayView,
    x0: f64,
    dx: f64,
    y0: f64,
    dy: f64,
    out: &mut [f32],
    first: usize,
) {
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
        // SAFETY: `out` is an interior span of `SpanGeom::row`, whose ends were checked with
        // exactly this arithmetic and whose coordinates are monotone in the column, so
        // 0 <= x < cols-1 and 0 <= y < rows-1 here: all four neighbours idx, idx+1, idx+cols,
        // idx+cols+1 are within data (len rows*cols).
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
    use super::{GrayView, Level};
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn warp_avx2(
        src: &GrayView,
        m: &super::Affine,
        out: &mut [f32],
        out_rows: usize,
        out_cols: usize,
        fill: f32,
    ) {
        super::warp_body::<1>(src, m, out, out_rows, out_cols, fill)
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn warp_avx512(
        src: &GrayView,
        m: &super::Affine,
        out: &mut [f32],
        out_rows: usize,
        out_cols: usize,
        fill: f32,
    ) {
        super::warp_body::<2>(src, m, out, out_rows, out_cols, fill)
    }

    thread_local! {
        /// The row-pair copy's buffer, reused across calls on a thread.
        static PAIRS: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    /// The part of the source one warp can touch, as a row-pair copy: entry `(j, k)` is
    /// `p[gy0 + j][gx0 + k] | p[gy0 + j + 1][gx0 + k] << 8` (positions outside the image hold
    /// arbitrary bytes; the kernel replaces them by `fill`). One 32-bit read at entry `(j, k)`
    /// is the whole bilinear cell `(gx0 + k, gy0 + j)`: bytes p00, p10, p01, p11.
    struct Pairs<'a> {
        data: &'a [u16],
        /// Entries per row: the cell columns plus one.
        stride: usize,
        /// Cell ranges (inclusive), within [-1, cols-1] x [-1, rows-1].
        gx0: i64,
        gx1: i64,
        gy0: i64,
        gy1: i64,
        cols: i64,
        rows: i64,
    }

    /// Warps through a row-pair copy of the touched part of the source (one gather per 16
    /// samples instead of two, and every neighbour's inside test done in the vector lanes, so
    /// one pass covers a row's whole touch span). Returns false (having written nothing) where
    /// the copy would cost more than it saves or the geometry is not finite.
    ///
    /// # Safety
    /// AVX-512F, AVX2 and FMA must be available.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn warp_pairs_avx512(
        src: &GrayView,
        m: &super::Affine,
        out: &mut [f32],
        out_rows: usize,
        out_cols: usize,
        fill: f32,
    ) -> bool {
        if !supports(src) || out_rows == 0 || out_cols == 0 {
            return false;
        }
        let (rows, cols) = (src.rows as i64, src.cols as i64);
        let (mut minx, mut maxx, mut miny, mut maxy) =
            (f64::INFINITY, -f64::INFINITY, f64::INFINITY, -f64::INFINITY);
        for (c, r) in [
            (0, 0),
            (out_cols - 1, 0),
            (0, out_rows - 1),
            (out_cols - 1, out_rows - 1),
        ] {
            let (x, y) = m.apply(c as f64, r as f64);
            minx = minx.min(x);
            maxx = maxx.max(x);
            miny = miny.min(y);
            maxy = maxy.max(y);
        }
        if !(minx.is_finite() && maxx.is_finite() && miny.is_finite() && maxy.is_finite()) {
            return false;
        }
        // A fill that is (to f32 rounding) `1 - v/255` for a byte `v` can be stored in the copy
        // itself: every position outside the image holds `v`, and the kernel needs no
        // per-neighbour masks (the value `1 - (Σ w v)/255` differs from `fill` by the rounding
        // of `fill`, ~3e-8). The border-median fill and the usual 0 and 1 are such fills.
        let pad_f = 255.0 * (1.0 - fill as f64);
        let padded = (0.0..=255.0).contains(&pad_f.round())
            && (1.0 - pad_f.round() / 255.0 - fill as f64).abs() <= 1e-7;
        let pad = if padded { pad_f.round() as u8 } else { 0 };
        // Cells of the sample points (the patch is the image of a rectangle, so its corners
        // bound it), one cell of margin for rounding, cut to the cells with any neighbour
        // inside; the padded copy keeps one more ring of cells (all fill), so that the cell of
        // every sample of a touch span (which may lie up to rounding outside [-1, cols)) is in
        // the copy without a per-lane clamp. Clamping in f64 first keeps the casts exact.
        let m1 = if padded { 1 } else { 0 };
        let cell = |v: f64, lo: i64, hi: i64| v.floor().clamp(lo as f64, hi as f64) as i64;
        let gx0 = cell(minx - 1.0, -1 - m1, cols - 1 + m1);
        let gx1 = cell(maxx + 1.0, -1 - m1, cols - 1 + m1);
        let gy0 = cell(miny - 1.0, -1 - m1, rows - 1 + m1);
        let gy1 = cell(maxy + 1.0, -1 - m1, rows - 1 + m1);
        let stride = (gx1 - gx0 + 2) as usize;
        let prow = (gy1 - gy0 + 1) as usize;
        // An entry of the copy costs a small fraction of the gathered element it saves per
        // sample (measured: the 95x95 bench's sources up to 77x305 gain), so allow three per
        // sample; a zoomed-out patch of a large source would copy mostly unsampled pixels.
        if prow * stride > 3 * out_rows * out_cols {
            return false;
        }
        // The kernels form entry indices (absolute, or relative to a step's origin) in f32,
        // which must stay exact.
        if (gy1 + 2) * stride as i64 + gx1 + 2 >= 1 << 23 || prow * stride >= 1 << 23 {
            return false;
        }
        PAIRS.with(|buf| {
            let mut buf = buf.borrow_mut();
            if buf.len() < prow * stride {
                buf.resize(prow * stride, 0);
            }
            let buf = &mut buf[..prow * stride];
            let (ucols, data) = (src.cols, src.data);
            // Image columns the copy holds: gx0 ..= gx1 + 1, of which c0 ..= c1 are inside
            // (none where c1 < c0: a patch wholly beside the image).
            let (c0, c1) = (gx0.max(0), (gx1 + 1).min(cols - 1));
            let k0 = (c0 - gx0).clamp(0, stride as i64) as usize;
            let width = if c1 < c0 { 0 } else { (c1 - c0 + 1) as usize };
            let pp = pad as u16 * 0x101;
            for (j, dst) in buf.chunks_exact_mut(stride).enumerate() {
                let r = gy0 + j as i64;
                let row = |r: i64| {
                    (r >= 0 && r < rows).then(|| {
                        let at = r as usize * ucols + c0 as usize;
                        &data[at..at + width]
                    })
                };
                let (left, rest) = dst.split_at_mut(k0);
                let (mid, right) = rest.split_at_mut(width);
                left.fill(pp);
                right.fill(pp);
                match (row(r), row(r + 1)) {
                    (Some(t), Some(b)) => {
                        for ((d, &t), &b) in mid.iter_mut().zip(t).zip(b) {
                            *d = t as u16 | (b as u16) << 8;
                        }
                    }
                    (Some(t), None) => {
                        for (d, &t) in mid.iter_mut().zip(t) {
                            *d = t as u16 | pp & 0xFF00;
                        }
                    }
                    (None, Some(b)) => {
                        for (d, &b) in mid.iter_mut().zip(b) {
                            *d = (b as u16) << 8 | pp & 0xFF;
                        }
                    }
                    (None, None) => mid.fill(pp),
                }
            }
            let pairs = Pairs {
                data: buf,
                stride,
                gx0,
                gx1,
                gy0,
                gy1,
                cols,
                rows,
            };
            let (a, d) = (m.m[0][0], m.m[1][0]);
            // SAFETY: the features are enabled in this function.
            for_each_touch_span(m, src, out, out_cols, fill, |row, x0, y0, tlo| {
                if padded {
                    unsafe { pairs_row_padded_avx512(&pairs, x0, a, y0, d, row, tlo) };
                } else {
                    unsafe { pairs_row_avx512(&pairs, x0, a, y0, d, row, tlo, fill) };
                }
            });
        });
        true
    }

    // The pair kernel's bounds: each lane's cell (cx, cy) is clamped to [gx0, gx1] x [gy0, gy1]
    // (NaN to the lower bound; all these f32 integers, and cy * stride + cx, are exact below
    // 2^24, which `warp_pairs_avx512` checks), so its entry index
    // (cy - gy0) * stride + (cx - gx0) is at most (prow - 1) * stride + stride - 2, and the
    // 32-bit read covers that entry and the next: both within the copy (prow * stride entries).
    // Values: a neighbour column is outside exactly when the cell column is -1 (left) or
    // cols - 1 (right), a neighbour row when the cell row is -1 (top) or rows - 1 (bottom);
    // those lanes take `fill` in raw units, 255 (1 - fill), so that 1 - v/255 gives back `fill`
    // (up to rounding) with the bilinear weights summing to one. Samples the touch span
    // wrongly includes lie within rounding of the edge -1 / cols, so their cell clamps by at
    // most one and the fraction, taken from the clamped cell, stays within rounding of 0 or 1.

    // The padded kernel's bounds and values: a sample of a touch span lies within rounding
    // of [-1, cols) x [-1, rows), and within rounding of the corners' bounding box, so its cell
    // is in [gx0, gx1] x [gy0, gy1] (the padded copy's cell range: the box plus one cell of
    // margin, cut to [-2, cols] x [-2, rows]); a lane's f32 coordinate is off by ~1e-5 px at
    // most, so where its floor is off by one at a cell edge the cell is still in that range
    // and the fraction (taken from that cell) is within rounding of 0 or 1. Its entry index
    // (cy - gy0) * stride + (cx - gx0) is then in [0, prow * stride - 2] and the 32-bit read
    // covers that entry and the next. Memory safety does not rest on this: the index is
    // clamped to that range in the lanes (NaN or out-of-range coordinates convert to
    // i32::MIN and wrap arbitrarily, then clamp), so any coordinate reads inside the copy.
    // Every neighbour outside the image reads the pad byte, so the value is the bilinear mix
    // of pixels and pad bytes, exactly the per-neighbour fill.

    /// One row's touch span through the padded pair copy; sixteen samples per step, the last
    /// partial step a masked store.
    ///
    /// # Safety
    /// AVX-512F, AVX2 and FMA must be available.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn pairs_row_padded_avx512(
        p: &Pairs,
        x0: f64,
        dx: f64,
        y0: f64,
        dy: f64,
        out: &mut [f32],
        first: usize,
    ) {
        let base = p.data.as_ptr() as *const i32;
        let steps = _mm512_setr_ps(
            0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
        );
        let (vdx, vdy) = (_mm512_set1_ps(dx as f32), _mm512_set1_ps(dy as f32));
        let vstride = _mm512_set1_ps(p.stride as f32);
        let (stride, gx0, gy0) = (p.stride as f64, p.gx0 as f64, p.gy0 as f64);
        let last = _mm512_set1_epi32((p.data.len() - 2) as i32);
        let zero = _mm512_setzero_si512();
        let mask = _mm512_set1_epi32(0xFF);
        let inv255 = _mm512_set1_ps(1.0 / 255.0);
        let one = _mm512_set1_ps(1.0);
        let n = out.len();
        let mut i = 0;
        while i < n {
            let col = (first + i) as f64;
            let (xs, ys) = (x0 + dx * col, y0 + dy * col);
            // The step's origin cell's entry, exact in f64 for any cell in the copy's range
            // (the only case the result is trusted in: the lanes clamp the index); the
            // conversion gives i32::MIN for NaN or out-of-range values, without branches.
            let (bx, by) = (xs.floor(), ys.floor());
            let origin = _mm_cvttsd_si32(_mm_set_sd((by - gy0) * stride + (bx - gx0)));
            let vx = _mm512_fmadd_ps(vdx, steps, _mm512_set1_ps((xs - bx) as f32));
            let vy = _mm512_fmadd_ps(vdy, steps, _mm512_set1_ps((ys - by) as f32));
            let flx = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(vx);
            let fly = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(vy);
            let fx = _mm512_sub_ps(vx, flx);
            let fy = _mm512_sub_ps(vy, fly);
            let rel = _mm512_cvtps_epi32(_mm512_fmadd_ps(fly, vstride, flx));
            let idx = _mm512_min_epi32(
                _mm512_max_epi32(_mm512_add_epi32(rel, _mm512_set1_epi32(origin)), zero),
                last,
            );
            // SAFETY: 0 <= idx <= len - 2 entries of 2 bytes: the 4 bytes read are in the copy.
            let cell = _mm512_i32gather_epi32::<2>(idx, base);
            let p00 = _mm512_cvtepi32_ps(_mm512_and_si512(cell, mask));
            let p10 = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32::<8>(cell), mask));
            let p01 = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32::<16>(cell), mask));
            let p11 = _mm512_cvtepi32_ps(_mm512_srli_epi32::<24>(cell));
            let t = _mm512_fmadd_ps(fx, _mm512_sub_ps(p01, p00), p00);
            let b = _mm512_fmadd_ps(fx, _mm512_sub_ps(p11, p10), p10);
            let v = _mm512_fmadd_ps(fy, _mm512_sub_ps(b, t), t);
            let res = _mm512_fnmadd_ps(v, inv255, one);
            // SAFETY: i < n, so out[i..i+16] (full step) or its first n-i lanes (masked store)
            // are within `out`.
            if i + 16 <= n {
                _mm512_storeu_ps(out.as_mut_ptr().add(i), res);
            } else {
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), ((1u32 << (n - i)) - 1) as u16, res);
            }
            i += 16;
        }
    }

    /// One row's touch span through the pair copy; sixteen samples per step, the last partial
    /// step a masked store. Inlined into the row loop, so its constants are hoisted out of it.
    ///
    /// # Safety
    /// AVX-512F, AVX2 and FMA must be available.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn pairs_row_avx512(
        p: &Pairs,
        x0: f64,
        dx: f64,
        y0: f64,
        dy: f64,
        out: &mut [f32],
        first: usize,
        fill: f32,
    ) {
        let base = p.data.as_ptr() as *const i32;
        let steps = _mm512_setr_ps(
            0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
        );
        let (vdx, vdy) = (_mm512_set1_ps(dx as f32), _mm512_set1_ps(dy as f32));
        // Cells are handled as absolute f32 integers (exact: below 2^24); the entry index is
        // cy * stride + cx - (gy0 * stride + gx0), exact in f32 too (the copy is small).
        let vstride = _mm512_set1_ps(p.stride as f32);
        let corner = _mm512_set1_epi32((p.gy0 * p.stride as i64 + p.gx0) as i32);
        let (vgx0, vgx1) = (_mm512_set1_ps(p.gx0 as f32), _mm512_set1_ps(p.gx1 as f32));
        let (vgy0, vgy1) = (_mm512_set1_ps(p.gy0 as f32), _mm512_set1_ps(p.gy1 as f32));
        let minus1 = _mm512_set1_ps(-1.0);
        let (xr, yb) = (
            _mm512_set1_ps((p.cols - 1) as f32),
            _mm512_set1_ps((p.rows - 1) as f32),
        );
        let mask = _mm512_set1_epi32(0xFF);
        let inv255 = _mm512_set1_ps(1.0 / 255.0);
        let one = _mm512_set1_ps(1.0);
        let vfill = _mm512_set1_ps(255.0 * (1.0 - fill));
        let (gx0, gx1, gy0, gy1) = (p.gx0 as f64, p.gx1 as f64, p.gy0 as f64, p.gy1 as f64);
        let n = out.len();
        let mut i = 0;
        while i < n {
            let col = (first + i) as f64;
            let (xs, ys) = (x0 + dx * col, y0 + dy * col);
            // f64::max/min return the non-NaN operand, so bx, by are in range even for NaN.
            let bx = xs.floor().max(gx0).min(gx1);
            let by = ys.floor().max(gy0).min(gy1);
            let (vbx, vby) = (_mm512_set1_ps(bx as f32), _mm512_set1_ps(by as f32));
            let vx = _mm512_fmadd_ps(vdx, steps, _mm512_set1_ps((xs - bx) as f32));
            let vy = _mm512_fmadd_ps(vdy, steps, _mm512_set1_ps((ys - by) as f32));
            // max_ps(v, lo) returns lo for a NaN v.
            let cx = _mm512_min_ps(
                _mm512_max_ps(
                    _mm512_add_ps(
                        _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(vx),
                        vbx,
                    ),
                    vgx0,
                ),
                vgx1,
            );
            let cy = _mm512_min_ps(
                _mm512_max_ps(
                    _mm512_add_ps(
                        _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(vy),
                        vby,
                    ),
                    vgy0,
                ),
                vgy1,
            );
            let fx = _mm512_sub_ps(vx, _mm512_sub_ps(cx, vbx));
            let fy = _mm512_sub_ps(vy, _mm512_sub_ps(cy, vby));
            let left = _mm512_cmpeq_ps_mask(cx, minus1);
            let right = _mm512_cmpeq_ps_mask(cx, xr);
            let top = _mm512_cmpeq_ps_mask(cy, minus1);
            let bottom = _mm512_cmpeq_ps_mask(cy, yb);
            let idx =
                _mm512_sub_epi32(_mm512_cvtps_epi32(_mm512_fmadd_ps(cy, vstride, cx)), corner);
            // SAFETY: idx is a clamped cell's entry; see the bounds argument above.
            let cell = _mm512_i32gather_epi32::<2>(idx, base);
            let p00 = _mm512_cvtepi32_ps(_mm512_and_si512(cell, mask));
            let p10 = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32::<8>(cell), mask));
            let p01 = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32::<16>(cell), mask));
            let p11 = _mm512_cvtepi32_ps(_mm512_srli_epi32::<24>(cell));
            let p00 = _mm512_mask_mov_ps(p00, left | top, vfill);
            let p01 = _mm512_mask_mov_ps(p01, right | top, vfill);
            let p10 = _mm512_mask_mov_ps(p10, left | bottom, vfill);
            let p11 = _mm512_mask_mov_ps(p11, right | bottom, vfill);
            let t = _mm512_fmadd_ps(fx, _mm512_sub_ps(p01, p00), p00);
            let b = _mm512_fmadd_ps(fx, _mm512_sub_ps(p11, p10), p10);
            let v = _mm512_fmadd_ps(fy, _mm512_sub_ps(b, t), t);
            let res = _mm512_fnmadd_ps(v, inv255, one);
            // SAFETY: i < n, so out[i..i+16] (full step) or its first n-i lanes (masked store)
            // are within `out`.
            if i + 16 <= n {
                _mm512_storeu_ps(out.as_mut_ptr().add(i), res);
            } else {
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), ((1u32 << (n - i)) - 1) as u16, res);
            }
            i += 16;
        }
    }

    /// Warps a source the row-pair copy declines (large ones): one vector pass per row's
    /// touch span straight from the source, two gathers per sixteen samples, the neighbours
    /// outside the source replaced by `fill` in the lanes. Returns false (having written
    /// nothing) where `supports(src)` fails.
    ///
    /// # Safety
    /// AVX-512F, AVX2 and FMA must be available.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn warp_touch_avx512(
        src: &GrayView,
        m: &super::Affine,
        out: &mut [f32],
        out_rows: usize,
        out_cols: usize,
        fill: f32,
    ) -> bool {
        if !supports(src) || out_cols == 0 {
            return false;
        }
        debug_assert_eq!(out.len(), out_rows * out_cols);
        let (a, d) = (m.m[0][0], m.m[1][0]);
        // SAFETY: the features are enabled in this function; `supports` holds.
        for_each_touch_span(m, src, out, out_cols, fill, |row, x0, y0, tlo| unsafe {
            touch_row_avx512(src, x0, a, y0, d, row, tlo, fill)
        });
        true
    }

    /// The row walk of the AVX-512 one-pass kernels: fills each output row outside its touch
    /// span and hands the span to `kernel(span, x0, y0, first column)`, where the row's sample
    /// point is `(x0 + a col, y0 + d col)`.
    ///
    /// # Safety
    /// AVX-512F must be available (the fills use it).
    #[inline(always)]
    unsafe fn for_each_touch_span(
        m: &super::Affine,
        src: &GrayView,
        out: &mut [f32],
        out_cols: usize,
        fill: f32,
        mut kernel: impl FnMut(&mut [f32], f64, f64, usize),
    ) {
        let [[_, b, c], [_, e, f]] = m.m;
        let geom = super::SpanGeom::new(m, src, out_cols);
        for (r, row) in out.chunks_exact_mut(out_cols).enumerate() {
            let x0 = b * r as f64 + c;
            let y0 = e * r as f64 + f;
            // SAFETY (the fills): the caller guarantees AVX-512F.
            let Some((tlo, thi)) = geom.touch(x0, y0) else {
                unsafe { fill_avx512(row, fill) };
                continue;
            };
            unsafe {
                fill_avx512(&mut row[..tlo], fill);
                fill_avx512(&mut row[thi..], fill);
            }
            kernel(&mut row[tlo..thi], x0, y0, tlo);
        }
    }

    // The touch kernel: like `interior_row_avx2` (same clamped cells, so the same bounds
    // argument, given below), but each lane's real cell (cx, cy) may differ from its clamped cell
    // (ccx, ccy) in [0, cols-2] x [0, rows-2]. The lane's four bytes, [top pair, bottom pair]
    // of the clamped cell (t0 t1 b0 b1, low byte first), are rotated left by
    // 8 (ccx - cx) + 16 (ccy - cy) bits: where the real cell is one left of (above) the clamped
    // one, its right column (bottom row) is the clamped cell's left column (top row), and
    // vice versa; every byte that rotation brings in from elsewhere belongs to a neighbour
    // outside the source, and every neighbour outside is masked to `fill` (raw 255 (1 - fill)):
    // with d = cx - ccx, the left column is inside iff d is 0 or 1, i.e. d (d - 1) == 0, the
    // right iff d (d + 1) == 0 (likewise rows); these are exact small-integer f32 products
    // (huge or NaN ones compare unequal to 0, i.e. outside). The fraction is the real cell's.

    /// # Safety
    /// AVX-512F, AVX2 and FMA must be available, and `supports(src)` must hold.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn touch_row_avx512(
        src: &GrayView,
        x0: f64,
        dx: f64,
        y0: f64,
        dy: f64,
        out: &mut [f32],
        first: usize,
        fill: f32,
    ) {
        let cols = src.cols;
        let base = src.data.as_ptr() as *const i32;
        let steps = _mm512_setr_ps(
            0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
        );
        let (vdx, vdy) = (_mm512_set1_ps(dx as f32), _mm512_set1_ps(dy as f32));
        let vcols = _mm512_set1_epi32(cols as i32);
        let vbot = _mm512_set1_epi32(cols as i32 - 2);
        let mask = _mm512_set1_epi32(0xFF);
        let inv255 = _mm512_set1_ps(1.0 / 255.0);
        let one = _mm512_set1_ps(1.0);
        let (eight, sixteen) = (_mm512_set1_ps(8.0), _mm512_set1_ps(16.0));
        let zero = _mm512_setzero_ps();
        let vfill = _mm512_set1_ps(255.0 * (1.0 - fill));
        let (xmax, ymax) = ((cols - 2) as f64, (src.rows - 2) as f64);
        let n = out.len();
        let mut i = 0;
        while i < n {
            let col = (first + i) as f64;
            let (xs, ys) = (x0 + dx * col, y0 + dy * col);
            // f64::max/min return the non-NaN operand, so bx, by are in range even for NaN.
            let bx = xs.floor().max(0.0).min(xmax);
            let by = ys.floor().max(0.0).min(ymax);
            let vx = _mm512_fmadd_ps(vdx, steps, _mm512_set1_ps((xs - bx) as f32));
            let vy = _mm512_fmadd_ps(vdy, steps, _mm512_set1_ps((ys - by) as f32));
            let rx = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(vx);
            let ry = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(vy);
            // max_ps(v, lo) returns lo for a NaN v.
            let flx = _mm512_min_ps(
                _mm512_max_ps(rx, _mm512_set1_ps(-bx as f32)),
                _mm512_set1_ps((xmax - bx) as f32),
            );
            let fly = _mm512_min_ps(
                _mm512_max_ps(ry, _mm512_set1_ps(-by as f32)),
                _mm512_set1_ps((ymax - by) as f32),
            );
            let (fx, fy) = (_mm512_sub_ps(vx, rx), _mm512_sub_ps(vy, ry));
            // d = cx - ccx, e = cy - ccy.
            let (dd, de) = (_mm512_sub_ps(rx, flx), _mm512_sub_ps(ry, fly));
            let origin = _mm512_set1_epi32((by as usize * cols + bx as usize) as i32);
            let idx = _mm512_add_epi32(
                origin,
                _mm512_add_epi32(
                    _mm512_mullo_epi32(_mm512_cvtps_epi32(fly), vcols),
                    _mm512_cvtps_epi32(flx),
                ),
            );
            // SAFETY: idx is a clamped cell index; see the bounds argument above.
            let top = _mm512_i32gather_epi32::<1>(idx, base);
            let bot = _mm512_i32gather_epi32::<1>(_mm512_add_epi32(idx, vbot), base);
            // t0 t1 b0 b1: the low half of `top`, the high half of `bot`.
            let quad = _mm512_ternarylogic_epi32::<0xCA>(
                _mm512_set1_epi32(0xFFFF_0000u32 as i32),
                bot,
                top,
            );
            // Rotate left by -(8 d + 16 e) (mod 32; vprolvd takes the count mod 32).
            let rot = _mm512_cvtps_epi32(_mm512_fmadd_ps(de, sixteen, _mm512_mul_ps(dd, eight)));
            let quad = _mm512_rolv_epi32(quad, _mm512_sub_epi32(_mm512_setzero_si512(), rot));
            let p00 = _mm512_cvtepi32_ps(_mm512_and_si512(quad, mask));
            let p01 = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32::<8>(quad), mask));
            let p10 = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32::<16>(quad), mask));
            let p11 = _mm512_cvtepi32_ps(_mm512_srli_epi32::<24>(quad));
            let left = _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(_mm512_fmsub_ps(dd, dd, dd), zero);
            let right = _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(_mm512_fmadd_ps(dd, dd, dd), zero);
            let up = _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(_mm512_fmsub_ps(de, de, de), zero);
            let down = _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(_mm512_fmadd_ps(de, de, de), zero);
            let p00 = _mm512_mask_mov_ps(p00, left | up, vfill);
            let p01 = _mm512_mask_mov_ps(p01, right | up, vfill);
            let p10 = _mm512_mask_mov_ps(p10, left | down, vfill);
            let p11 = _mm512_mask_mov_ps(p11, right | down, vfill);
            let t = _mm512_fmadd_ps(fx, _mm512_sub_ps(p01, p00), p00);
            let b = _mm512_fmadd_ps(fx, _mm512_sub_ps(p11, p10), p10);
            let v = _mm512_fmadd_ps(fy, _mm512_sub_ps(b, t), t);
            let res = _mm512_fnmadd_ps(v, inv255, one);
            // SAFETY: i < n, so out[i..i+16] (full step) or its first n-i lanes (masked store)
            // are within `out`.
            if i + 16 <= n {
                _mm512_storeu_ps(out.as_mut_ptr().add(i), res);
            } else {
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), ((1u32 << (n - i)) - 1) as u16, res);
            }
            i += 16;
        }
    }

    /// `dst.fill(v)` in whole and one masked sixteen-lane store: the fill spans are short
    /// and of varying length, where the generic loop's scalar tail dominates.
    ///
    /// # Safety
    /// AVX-512F must be available.
    #[inline(always)]
    unsafe fn fill_avx512(dst: &mut [f32], v: f32) {
        let v = _mm512_set1_ps(v);
        let n = dst.len();
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: i + 16 <= n.
            _mm512_storeu_ps(dst.as_mut_ptr().add(i), v);
            i += 16;
        }
        if i < n {
            // SAFETY: the first n - i (< 16) lanes from i are within `dst`.
            _mm512_mask_storeu_ps(dst.as_mut_ptr().add(i), ((1u32 << (n - i)) - 1) as u16, v);
        }
    }

    pub fn level() -> Level {
        static LEVEL: OnceLock<Level> = OnceLock::new();
        *LEVEL.get_or_init(|| {
            if std::env::var_os("PLANKTON_NO_SIMD").is_some()
                || !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
            {
                Level::Scalar
            } else if std::env::var_os("PLANKTON_NO_AVX512").is_none()
                && is_x86_feature_detected!("avx512f")
            {
                Level::Avx512
            } else {
                Level::Avx2
            }
        })
    }

    /// Whether the vector kernels handle this source: at least 2x2 (so that an interior exists
    /// and the clamp range `[0, cols-2] x [0, rows-2]` is non-empty), dimensions exact in f32,
    /// and every byte offset (plus a gather's slack) fits in an i32.
    #[inline(always)]
    pub fn supports(src: &GrayView) -> bool {
        src.rows >= 2
            && src.cols >= 2
            && src.rows < (1 << 24)
            && src.cols < (1 << 24)
            && src.data.len() < (i32::MAX as usize) - 4
    }

    // Both kernels (`interior_row_avx2`, `touch_row_avx512`): the chunk's origin in f64 (the
    // same arithmetic as the spans), clamped to an integer pixel (bx, by) of the cell range,
    // and a fraction; the lane offsets from it are small, so f32 keeps
    // them to ~1e-6 px. Memory safety does not rest on the spans: each lane's integer cell
    // (bx + flx, by + fly) is clamped to [0, cols-2] x [0, rows-2] (NaN goes to the lower
    // bound: `max_ps(v, lo)` returns `lo` when `v` is NaN), so with idx = cell index,
    //   top gather    reads bytes idx .. idx+3          <= (rows-1)*cols + 1 <= len - 1,
    //   bottom gather reads bytes idx+cols-2 .. idx+cols+1 <= rows*cols - 1 = len - 1,
    // and both start at >= 0 (cols >= 2). The bottom pair is bytes 2 and 3 of its word. Where a
    // lane's coordinate rounds onto the cell edge, the clamp moves the cell and the fraction
    // (computed from the clamped cell) becomes 1 (or ~-1e-6), so the value stays right.

    /// Eight samples per step; the last partial step redoes the last eight (the row has at
    /// least eight).
    ///
    /// # Safety
    /// AVX2 and FMA must be available, `supports(src)` must hold, and `out.len() >= 8`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn interior_row_avx2(
        src: &GrayView,
        x0: f64,
        dx: f64,
        y0: f64,
        dy: f64,
        out: &mut [f32],
        first: usize,
    ) {
        let n = out.len();
        assert!(n >= 8);
        let cols = src.cols;
        let base = src.data.as_ptr() as *const i32;
        let steps = _mm256_set_ps(7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0);
        let (vdx, vdy) = (_mm256_set1_ps(dx as f32), _mm256_set1_ps(dy as f32));
        let vcols = _mm256_set1_epi32(cols as i32);
        let vbot = _mm256_set1_epi32(cols as i32 - 2);
        let mask = _mm256_set1_epi32(0xFF);
        let inv255 = _mm256_set1_ps(1.0 / 255.0);
        let one = _mm256_set1_ps(1.0);
        let (xmax, ymax) = ((cols - 2) as f64, (src.rows - 2) as f64);
        let mut i = 0;
        loop {
            if i + 8 > n {
                if i == n {
                    break;
                }
                i = n - 8;
            }
            let col = (first + i) as f64;
            let (xs, ys) = (x0 + dx * col, y0 + dy * col);
            let bx = xs.floor().max(0.0).min(xmax);
            let by = ys.floor().max(0.0).min(ymax);
            let vx = _mm256_fmadd_ps(vdx, steps, _mm256_set1_ps((xs - bx) as f32));
            let vy = _mm256_fmadd_ps(vdy, steps, _mm256_set1_ps((ys - by) as f32));
            let flx = _mm256_min_ps(
                _mm256_max_ps(_mm256_floor_ps(vx), _mm256_set1_ps(-bx as f32)),
                _mm256_set1_ps((xmax - bx) as f32),
            );
            let fly = _mm256_min_ps(
                _mm256_max_ps(_mm256_floor_ps(vy), _mm256_set1_ps(-by as f32)),
                _mm256_set1_ps((ymax - by) as f32),
            );
            let (fx, fy) = (_mm256_sub_ps(vx, flx), _mm256_sub_ps(vy, fly));
            let origin = _mm256_set1_epi32((by as usize * cols + bx as usize) as i32);
            let idx = _mm256_add_epi32(
                origin,
                _mm256_add_epi32(
                    _mm256_mullo_epi32(_mm256_cvtps_epi32(fly), vcols),
                    _mm256_cvtps_epi32(flx),
                ),
            );
            // SAFETY: idx is a clamped cell index; see the bounds argument above.
            let top = _mm256_i32gather_epi32::<1>(base, idx);
            let bot = _mm256_i32gather_epi32::<1>(base, _mm256_add_epi32(idx, vbot));
            let p00 = _mm256_cvtepi32_ps(_mm256_and_si256(top, mask));
            let p01 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32::<8>(top), mask));
            let p10 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32::<16>(bot), mask));
            let p11 = _mm256_cvtepi32_ps(_mm256_srli_epi32::<24>(bot));
            let t = _mm256_fmadd_ps(fx, _mm256_sub_ps(p01, p00), p00);
            let b = _mm256_fmadd_ps(fx, _mm256_sub_ps(p11, p10), p10);
            let v = _mm256_fmadd_ps(fy, _mm256_sub_ps(b, t), t);
            // SAFETY: i + 8 <= n.
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_fnmadd_ps(v, inv255, one));
            i += 8;
        }
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

    /// Every kernel level this CPU runs (scalar always).
    fn levels() -> Vec<Level> {
        let mut v = vec![Level::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                v.push(Level::Avx2);
                if is_x86_feature_detected!("avx512f") {
                    v.push(Level::Avx512);
                }
            }
        }
        v
    }

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
        fn range(&mut self, lo: f64, hi: f64) -> f64 {
            lo + (hi - lo) * self.next()
        }
    }

    fn check_all_levels(
        src: &GrayView,
        m: &Affine,
        rows: usize,
        cols: usize,
        fill: f32,
        tol: f32,
        what: &str,
    ) {
        let want = reference(src, m, rows, cols, fill);
        for level in levels() {
            for pairs in [false, true] {
                let mut out = vec![f32::NAN; rows * cols];
                warp_at(level, pairs, src, m, &mut out, rows, cols, fill);
                for (i, (a, b)) in out.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= tol,
                        "{what} {level:?} pairs {pairs} pixel ({}, {}): {a} vs {b} (m = {m:?})",
                        i / cols,
                        i % cols
                    );
                }
            }
        }
    }

    #[test]
    fn every_level_matches_the_general_path_on_random_transforms() {
        let mut rng = Lcg(7);
        for case in 0..400 {
            let rows = 2 + (rng.next() * 70.0) as usize;
            let cols = 2 + (rng.next() * 70.0) as usize;
            let data = test_image(rows, cols);
            let src = GrayView::new(&data, rows, cols);
            let (out_rows, out_cols) = (
                1 + (rng.next() * 60.0) as usize,
                1 + (rng.next() * 60.0) as usize,
            );
            let scale = rng.range(0.2, 4.0);
            let rot = rng.range(0.0, std::f64::consts::TAU);
            let shear = rng.range(-0.4, 0.4);
            let stretch = rng.range(0.7, 1.4);
            let mut m = Affine::skimage(scale * stretch, scale / stretch, rot, shear, 0.0, 0.0);
            // Centre the patch on a random point in (and a little around) the source.
            let (cx, cy) = (
                rng.range(-3.0, cols as f64 + 3.0),
                rng.range(-3.0, rows as f64 + 3.0),
            );
            let (px, py) = m.apply(out_cols as f64 / 2.0, out_rows as f64 / 2.0);
            m.m[0][2] = cx - px;
            m.m[1][2] = cy - py;
            if case % 5 == 0 {
                // Axis-aligned steps (a zero column step in x or y) are a special case of the spans.
                m = Affine {
                    m: [[scale, 0.0, m.m[0][2]], [0.0, scale / stretch, m.m[1][2]]],
                };
            }
            let fill = if case % 2 == 0 { 0.0 } else { 0.37 };
            check_all_levels(
                &src,
                &m,
                out_rows,
                out_cols,
                fill,
                2e-6 * scale.max(1.0) as f32,
                &format!("case {case}"),
            );
        }
    }

    #[test]
    fn samples_at_the_last_row_and_column_stay_in_bounds_and_exact() {
        // The source is the front of a larger buffer whose tail is 255s; the image's last row
        // and column are 0 and 200, so reading the wrong byte near the end would show.
        for (rows, cols) in [(2, 2), (2, 9), (9, 2), (5, 7), (17, 33)] {
            let mut buf = test_image(rows, cols);
            for c in 0..cols {
                buf[(rows - 1) * cols + c] = 0;
            }
            for r in 0..rows {
                buf[r * cols + cols - 1] = 200;
            }
            buf.extend(std::iter::repeat_n(255u8, 64));
            let src = GrayView::new(&buf[..rows * cols], rows, cols);
            let (xe, ye) = ((cols - 1) as f64, (rows - 1) as f64);
            for eps in [0.0, 1e-12, 1e-9, 1e-7, 3e-6, 0.25] {
                // Rows of samples running along the bottom edge, the right edge, and towards the
                // bottom-right corner, just inside the interior bound (and exactly on it).
                for m in [
                    Affine {
                        m: [[0.05, 0.0, 0.0], [0.0, 0.0, ye - eps]],
                    },
                    Affine {
                        m: [[0.0, 0.0, xe - eps], [0.05, 0.0, 0.0]],
                    },
                    Affine {
                        m: [[0.01, 0.0, xe - eps - 0.4], [0.01, 0.0, ye - eps - 0.4]],
                    },
                    Affine {
                        m: [[-0.01, 0.0, xe - eps], [-0.01, 0.0, ye - eps]],
                    },
                ] {
                    check_all_levels(
                        &src,
                        &m,
                        3,
                        40,
                        0.5,
                        2e-6,
                        &format!("{rows}x{cols} eps {eps}"),
                    );
                }
            }
        }
    }

    #[test]
    fn degenerate_shapes() {
        let data = test_image(1, 5);
        let m = Affine {
            m: [[0.3, 0.1, -0.5], [0.2, 0.3, -0.4]],
        };
        check_all_levels(&GrayView::new(&data, 1, 5), &m, 6, 7, 0.1, 2e-6, "1x5");
        check_all_levels(&GrayView::new(&data, 5, 1), &m, 6, 7, 0.1, 2e-6, "5x1");
        let mut out = vec![0.0; 12];
        warp_inverted(&GrayView::new(&[], 0, 0), &m, &mut out, 3, 4, 0.25);
        assert!(out.iter().all(|&v| v == 0.25));
        warp_inverted(&GrayView::new(&data, 1, 5), &m, &mut [], 0, 0, 0.25);
        let nan = Affine {
            m: [[f64::NAN, 0.0, 1.0], [0.0, 1.0, 1.0]],
        };
        for level in levels() {
            let mut out = vec![0.0; 12];
            warp_at(
                level,
                true,
                &GrayView::new(&data, 1, 5),
                &nan,
                &mut out,
                3,
                4,
                0.25,
            );
            assert!(out.iter().all(|&v| v == 0.25), "{level:?}");
        }
    }

    /// The pair path is really taken for a patch around a small source (so the `pairs` runs of
    /// the tests above exercise it) and declined for a large one.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn pair_copy_is_used_for_small_sources_only() {
        if !levels().contains(&Level::Avx512) {
            return;
        }
        let m = Affine {
            m: [[0.9, 0.3, -4.0], [-0.3, 0.9, 3.0]],
        };
        // A zoomed-out patch of a large source touches far more pixels than it samples.
        let far = Affine {
            m: [[7.2, 2.4, 10.0], [-2.4, 7.2, 80.0]],
        };
        // Wholly beside the image (the padded copy then holds no pixel).
        let beside = Affine {
            m: [[0.1, 0.02, -9.0], [-0.02, 0.1, -6.0]],
        };
        // 0.3 is no byte's inverse (the masked kernel); the others are (the padded one).
        for fill in [0.3, 0.0, 1.0 - 100.0 / 255.0, 1.0] {
            for (rows, cols, m, used) in [
                (20, 30, m, true),
                (2, 2, m, true),
                (400, 400, m, true),
                (400, 400, far, false),
                (20, 30, beside, true),
            ] {
                let data = test_image(rows, cols);
                let src = GrayView::new(&data, rows, cols);
                let mut out = vec![f32::NAN; 24 * 26];
                // SAFETY: Avx512 is among the detected levels.
                let took = unsafe { simd::warp_pairs_avx512(&src, &m, &mut out, 24, 26, fill) };
                assert_eq!(took, used, "{rows}x{cols}");
                if !took {
                    // The declined case goes straight to the source. SAFETY: as above.
                    assert!(unsafe { simd::warp_touch_avx512(&src, &m, &mut out, 24, 26, fill) });
                }
                {
                    // The far transform's scale (~7.6) scales the lanes' f32 position error.
                    let tol = if took { 2e-6 } else { 2e-5 };
                    let want = reference(&src, &m, 24, 26, fill);
                    for (i, (a, b)) in out.iter().zip(&want).enumerate() {
                        assert!(
                            (a - b).abs() <= tol,
                            "{rows}x{cols} fill {fill} pixel {i}: {a} vs {b}"
                        );
                    }
                }
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
