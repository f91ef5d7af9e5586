//! Haralick texture features for late fusion (SPEC.md "Extra image features and late fusion"):
//! `mahotas.features.haralick(img, ignore_zeros=False)` on the raw (not inverted) uint8 image,
//! 4 directions x 13 features = 52 values.
//!
//! What mahotas 1.4.19 does (`mahotas/features/texture.py` and `_texture.cpp`), re-stated here
//! and followed exactly (checked against mahotas by
//! `tests/fixtures/features/haralick/gen_haralick_fixtures.py` and `crates/core/tests/features_haralick.rs`):
//!
//! * Grey levels: the co-occurrence matrix is `L x L` with `L = max pixel + 1` (so up to 256),
//!   whatever the minimum is: levels below the minimum are empty rows/columns but still count
//!   in `L` (this matters for feature 9, below). No quantisation.
//! * Directions (`_2d_deltas`, as (row, column) offsets, distance 1), in this order:
//!   `(0, 1)` horizontal, `(1, 1)` diagonal down-right, `(1, 0)` vertical, `(1, -1)` diagonal
//!   down-left. A pair is two pixels `p` and `p + delta` both inside the image (mahotas'
//!   `ExtendIgnore`: pairs leaving the image are dropped, no padding).
//! * Symmetric counting: each pair `(a, b)` counts once at `(a, b)` and once at `(b, a)` (so an
//!   equal pair adds 2 on the diagonal). The total is `T = 2 x number of pairs`; mahotas
//!   counts in int32. `p = counts / T` (a true division per entry).
//! * `ignore_zeros=False`: 0 is an ordinary grey level; nothing is removed from the matrix.
//! * The 13 features for one normalised matrix `p` (`k = 0..L`, logs base 2, `px = p.sum(0)`,
//!   `py = p.sum(1)` which are equal since `p` is symmetric, `p+[k] = sum_{i+j=k} p_ij` for
//!   `k = 0..2L`, `p-[k] = sum_{|i-j|=k} p_ij` for `k = 0..L`):
//!   0. angular second moment `sum p^2`;
//!   1. contrast `sum k^2 p-[k]`;
//!   2. correlation `(sum i j p_ij - ux uy) / (sx sy)` with `ux = sum k px`,
//!      `vx = sum k^2 px - ux^2`, `sx = sqrt(vx)`; **exactly 1** when `sx == 0` or `sy == 0`
//!      (a single grey level, e.g. a constant image);
//!   3. sum of squares: variance = `vx`;
//!   4. inverse difference moment `sum p_ij / (1 + (i-j)^2)`;
//!   5. sum average `sum k p+[k]`;
//!   6. sum variance `sum k^2 p+[k] - f5^2` (the corrected formula: `preserve_haralick_bug`
//!      is off, so the mean is f5, not the sum entropy f7);
//!   7. sum entropy `H(p+)`;
//!   8. entropy `H(p)`;
//!   9. difference variance = **`np.var(p-)`**, the population variance of the L numbers
//!      `p-[0..L]` themselves (`use_x_minus_y_variance=False`), not the variance of `|i-j|`; it
//!      therefore depends on `L` (a constant image gives `1/L - 1/L^2`);
//!   10. difference entropy `H(p-)`;
//!   11. information measure of correlation 1 `(f8 - HXY1) / max(HX, HY)`, or `f8 - HXY1`
//!       when `max(HX, HY) == 0`; `HX = H(px)`, `HY = H(py)`,
//!       `HXY1 = -sum p_ij log2(px_i py_j)`;
//!   12. information measure of correlation 2 `sqrt(max(0, 1 - exp(-2 (HXY2 - f8))))` with
//!       `HXY2 = H(outer(px, py))`.
//!
//!   `H(q) = -sum q log2 q` with `0 log 0 = 0` (mahotas adds 1 to zero entries before the log;
//!   an all-zero-entropy distribution gives -0.0). The 14th feature (maximal correlation
//!   coefficient) is not computed (`compute_14th_feature=False`).
//! * Edge cases: a constant image gives ASM 1, contrast 0, correlation 1, variance 0, IDM 1,
//!   sum average `2v`, sum variance 0, entropies 0, difference variance `1/L - 1/L^2`, both
//!   information measures 0; all finite. An image with fewer than 2 rows or 2 columns has no
//!   pair in at least one direction and mahotas **raises** `ValueError` ("the input is
//!   empty"); [`try_haralick_raw`] returns `None` there and [`haralick`] / [`haralick_raw`]
//!   return all-NaN. mahotas never returns NaN for an image it accepts (rows, cols >= 2).
//!
//! Numerics: every feature is the same formula as mahotas' in f64, evaluated in a different
//! order (mahotas uses BLAS dots and sums rounded `p_ij` into its marginals; we sum exact
//! integer counts and divide once, and take `log2(s / T)` as `log2(s) - log2(T)`), so results
//! agree to ~1e-12 relative (worst seen on the fixtures: 1.8e-12; real images <= 6e-13). Exact
//! identities of a symmetric `p` replace mahotas' `L^2` logarithms: `px = py`, so
//! `HXY1 = -sum p_ij (log2 px_i + log2 py_j) = HX + HY` and
//! `HXY2 = -sum_ij px_i py_j log2(px_i py_j) = (sum py) HX + (sum px) HY`. Degenerate inputs
//! stay exact: a constant image gives exactly mahotas' values (every log is `log2(T) - log2(T)
//! = 0`).
//!
//! Cost: per direction one branch-free pass over the pixels into a 256 x 256 u32 matrix (the
//! only allocations are that matrix and the list of its nonzero cells, once per call), then
//! work proportional to the number of distinct grey-level pairs; logarithms of counts come from
//! a table. crates/core/benches/haralick.rs: 30-110 us per typical plankton image, against 2-3.6 ms for
//! mahotas.

use image::GrayImage;

/// Snake-case names of the 13 features, in mahotas' order (`haralick_labels[:13]`).
pub const FEATURE_NAMES: [&str; 13] = [
    "angular_second_moment",
    "contrast",
    "correlation",
    "sum_of_squares_variance",
    "inverse_difference_moment",
    "sum_average",
    "sum_variance",
    "sum_entropy",
    "entropy",
    "difference_variance",
    "difference_entropy",
    "information_measure_of_correlation_1",
    "information_measure_of_correlation_2",
];

/// The 4 directions as (row offset, column offset), in mahotas' order (`_2d_deltas`): the rows
/// of the result.
pub const DIRECTIONS: [(usize, isize); 4] = [(0, 1), (1, 1), (1, 0), (1, -1)];

/// mahotas.features.haralick(img, ignore_zeros=False, return_mean=False): rows = the 4
/// directions in mahotas' order ([`DIRECTIONS`]), columns = the 13 features in mahotas' order
/// ([`FEATURE_NAMES`]). All NaN for an image under 2 x 2 (where mahotas raises).
pub fn haralick(img: &GrayImage) -> [[f64; 13]; 4] {
    haralick_raw(img.as_raw(), img.height() as usize, img.width() as usize)
}

/// The same on a raw buffer (rows x cols, row-major u8), for benches and callers without a
/// GrayImage. All NaN when `rows < 2 || cols < 2` (where mahotas raises).
///
/// Panics if `pixels.len() != rows * cols` or the image has 2^31 pixels or more (the u32
/// counts, like mahotas' int32 ones, would overflow).
pub fn haralick_raw(pixels: &[u8], rows: usize, cols: usize) -> [[f64; 13]; 4] {
    try_haralick_raw(pixels, rows, cols).unwrap_or([[f64::NAN; 13]; 4])
}

/// [`haralick_raw`], but `None` where mahotas raises `ValueError` (some direction has no pixel
/// pair: fewer than 2 rows or 2 columns).
pub fn try_haralick_raw(pixels: &[u8], rows: usize, cols: usize) -> Option<[[f64; 13]; 4]> {
    assert_eq!(
        Some(pixels.len()),
        rows.checked_mul(cols),
        "haralick: buffer length does not match {rows} x {cols}"
    );
    if rows < 2 || cols < 2 {
        return None;
    }
    assert!(
        pixels.len() < 1 << 31,
        "haralick: image too large for 32-bit co-occurrence counts"
    );
    let levels = pixels.iter().fold(0u8, |m, &v| m.max(v)) as usize + 1;
    // One-sided counts at [a * 256 + b] (fixed stride: no division to split an index), flags of
    // the 16-cell blocks touched, and the list of the nonzero cells: only flagged blocks are
    // scanned and only listed cells cleared, never all 256^2.
    let mut cmat: Box<[u32; 256 * 256]> = vec![0u32; 256 * 256].try_into().unwrap();
    let mut touched = [0u8; 256 * 256 / 16];
    let mut nonzero: Vec<u16> = Vec::with_capacity(pixels.len().min(levels * levels));
    let mut out = [[0.0; 13]; 4];
    for (d, &(dr, dc)) in DIRECTIONS.iter().enumerate() {
        for &idx in &nonzero {
            cmat[idx as usize] = 0;
        }
        nonzero.clear();
        let pairs = count_pairs(
            pixels,
            rows,
            cols,
            (dr, dc),
            &mut cmat,
            &mut touched,
            &mut nonzero,
        );
        out[d] = features(&cmat[..], &nonzero, levels, 2 * pairs);
    }
    Some(out)
}

/// Counts each in-bounds pair (p, p + (dr, dc)) once at `cmat[f[p] * 256 + f[p + delta]]`, then
/// lists the nonzero entries (ascending) in `nonzero`; returns the number of pairs.
///
/// The counting loop stays branch-free: besides the increment it only flags the 16-cell block
/// it touched (a plain store, no read), and the list is built from the flagged blocks alone.
fn count_pairs(
    pixels: &[u8],
    rows: usize,
    cols: usize,
    (dr, dc): (usize, isize),
    cmat: &mut [u32; 256 * 256],
    touched: &mut [u8; 256 * 256 / 16],
    nonzero: &mut Vec<u16>,
) -> u64 {
    let width = cols - dc.unsigned_abs();
    for r in 0..rows - dr {
        let a = &pixels[r * cols..(r + 1) * cols];
        let b = &pixels[(r + dr) * cols..(r + dr + 1) * cols];
        let (a, b) = match dc {
            1 => (&a[..width], &b[1..]),
            -1 => (&a[1..], &b[..width]),
            _ => (a, b),
        };
        for (&x, &y) in a.iter().zip(b) {
            let idx = (x as usize) << 8 | y as usize;
            cmat[idx] += 1;
            touched[idx >> 4] = 1;
        }
    }
    for (group, flags) in touched.chunks_exact_mut(8).enumerate() {
        if u64::from_ne_bytes((&*flags).try_into().unwrap()) == 0 {
            continue;
        }
        for (k, flag) in flags.iter_mut().enumerate() {
            if std::mem::take(flag) != 0 {
                let start = (group * 8 + k) * 16;
                for (idx, &c) in (start..).zip(&cmat[start..start + 16]) {
                    if c != 0 {
                        nonzero.push(idx as u16);
                    }
                }
            }
        }
    }
    ((rows - dr) * width) as u64
}

/// `1 / (1 + d^2)` for the level differences d = 0..255 (the inverse difference moment weight,
/// as mahotas' `i_j2_p1`).
const IDM_WEIGHT: [f64; 256] = {
    let mut w = [0.0; 256];
    let mut d = 0;
    while d < 256 {
        w[d] = 1.0 / ((d * d + 1) as f64);
        d += 1;
    }
    w
};

/// `log2(n)` for integers, from a table for small `n` (built once per process) and
/// `f64::log2` above it; both give `(n as f64).log2()`, so `log2(T) - log2(T)` is exactly 0.
struct Log2Int(&'static [f64]);

impl Log2Int {
    const TABLE_LEN: usize = 4096;

    fn get() -> Self {
        static TABLE: std::sync::OnceLock<Vec<f64>> = std::sync::OnceLock::new();
        Log2Int(TABLE.get_or_init(|| (0..Self::TABLE_LEN).map(|n| (n as f64).log2()).collect()))
    }

    #[inline]
    fn of(&self, n: u64) -> f64 {
        match self.0.get(n as usize) {
            Some(&v) => v,
            None => (n as f64).log2(),
        }
    }
}

/// The 13 features of one direction, from its one-sided counts `cmat` (stride 256) whose
/// nonzero entries are listed in `nonzero`; `total` = sum of the symmetric counts.
///
/// The marginals (px, p+, p-) are accumulated as exact integer counts and divided by T once,
/// where mahotas sums the rounded p_ij; and `log2(s / T)` is taken as `log2(s) - log2(T)` of
/// integers. Both differ from mahotas' rounding by ~1e-16 relative and keep the logarithms to
/// a table lookup.
fn features(cmat: &[u32], nonzero: &[u16], levels: usize, total: u64) -> [f64; 13] {
    let lg = Log2Int::get();
    let l = levels;
    let t = total as f64;
    let log2_t = lg.of(total);
    // Each unordered pair of levels {i, j} once: the symmetric count s = c[i][j] + c[j][i]
    // (mahotas' symmetrisation; 2 c[i][i] on the diagonal), standing for the m = 2 equal
    // entries p[i][j] = p[j][i] = s / T off the diagonal, m = 1 on it.
    let mut row = [0u64; 256];
    let mut plus = [0u64; 512];
    let mut minus = [0u64; 256];
    let (mut asm, mut sum_ijp, mut idm, mut ent) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for &idx in nonzero {
        let (i, j) = ((idx >> 8) as usize, (idx & 0xff) as usize);
        let c = cmat[idx as usize] as u64;
        let (s, m) = if i == j {
            (2 * c, 1u64)
        } else {
            let back = cmat[j << 8 | i] as u64;
            if i > j && back != 0 {
                continue; // counted with (j, i)
            }
            (c + back, 2u64)
        };
        row[i] += s;
        if i != j {
            row[j] += s;
        }
        let d = i.abs_diff(j);
        plus[i + j] += m * s;
        minus[d] += m * s;
        let p = s as f64 / t;
        let mp = m as f64 * p;
        asm += mp * p;
        sum_ijp += (i * j) as f64 * mp;
        idm += IDM_WEIGHT[d] * mp;
        ent += (lg.of(s) - log2_t) * mp;
    }
    let entropy = -ent;
    // mahotas' `_entropy` of a marginal given as counts: -sum (n/T) log2(n/T), zeros skipped.
    let entropy_of = |counts: &[u64]| -> f64 {
        -counts
            .iter()
            .filter(|&&n| n != 0)
            .map(|&n| (lg.of(n) - log2_t) * (n as f64 / t))
            .sum::<f64>()
    };

    let (mut ux, mut ex2, mut sum_px) = (0.0f64, 0.0f64, 0.0f64);
    for (i, &n) in row[..l].iter().enumerate() {
        let q = n as f64 / t;
        ux += q * i as f64;
        ex2 += q * (i * i) as f64;
        sum_px += q;
    }
    let vx = ex2 - ux * ux;
    let sx = vx.sqrt();
    let hx = entropy_of(&row[..l]);
    // p is symmetric, so px = py, HY = HX, and (summing log2(px_i py_j) = log2 px_i + log2 py_j
    // over rows and columns) HXY1 = HX + HY and HXY2 = (sum py) HX + (sum px) HY.
    let hxy1 = hx + hx;
    let hxy2 = sum_px * hx + sum_px * hx;

    let mut f = [0.0f64; 13];
    f[0] = asm;
    let minus = &minus[..l];
    f[1] = minus
        .iter()
        .enumerate()
        .map(|(k, &n)| (k * k) as f64 * (n as f64 / t))
        .sum();
    f[2] = if sx == 0.0 {
        1.0
    } else {
        (1.0 / sx / sx) * (sum_ijp - ux * ux)
    };
    f[3] = vx;
    f[4] = idm;
    let plus = &plus[..2 * l];
    f[5] = plus
        .iter()
        .enumerate()
        .map(|(k, &n)| k as f64 * (n as f64 / t))
        .sum();
    f[6] = plus
        .iter()
        .enumerate()
        .map(|(k, &n)| (k * k) as f64 * (n as f64 / t))
        .sum::<f64>()
        - f[5] * f[5];
    f[7] = entropy_of(plus);
    f[8] = entropy;
    // np.var of the L numbers p-[0..L]: mean, then the mean squared deviation.
    let mean = minus.iter().map(|&n| n as f64 / t).sum::<f64>() / l as f64;
    f[9] = minus
        .iter()
        .map(|&n| {
            let dev = n as f64 / t - mean;
            dev * dev
        })
        .sum::<f64>()
        / l as f64;
    f[10] = entropy_of(minus);
    f[11] = if hx == 0.0 {
        entropy - hxy1
    } else {
        (entropy - hxy1) / hx
    };
    let v = 1.0 - (-2.0 * (hxy2 - entropy)).exp();
    f[12] = if v > 0.0 { v.sqrt() } else { 0.0 };
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 + 1e-12 * b.abs()
    }

    #[test]
    fn constant_image_matches_closed_form() {
        let f = haralick_raw(&[3u8; 35], 5, 7);
        let l = 4.0;
        let want = [
            1.0,
            0.0,
            1.0,
            0.0,
            1.0,
            6.0,
            0.0,
            0.0,
            0.0,
            1.0 / l - 1.0 / (l * l),
            0.0,
            0.0,
            0.0,
        ];
        for row in f {
            for (k, (&a, &b)) in row.iter().zip(&want).enumerate() {
                assert!(close(a, b), "{}: {a} vs {b}", FEATURE_NAMES[k]);
            }
        }
    }

    #[test]
    fn checkerboard_horizontal_is_anticorrelated() {
        let px: Vec<u8> = (0..36).map(|k| ((k / 6 + k % 6) % 2) as u8).collect();
        let f = haralick_raw(&px, 6, 6);
        // Horizontal and vertical neighbours always differ: p = [[0, .5], [.5, 0]].
        for d in [0, 2] {
            assert!(close(f[d][0], 0.5) && close(f[d][1], 1.0) && close(f[d][2], -1.0));
            assert!(close(f[d][8], 1.0) && close(f[d][11], -1.0));
            assert!(close(f[d][12], (1.0 - (-2.0f64).exp()).sqrt()));
        }
        // Diagonal neighbours are always equal: correlation 1, contrast 0.
        for d in [1, 3] {
            assert!(close(f[d][1], 0.0) && close(f[d][2], 1.0) && close(f[d][4], 1.0));
        }
    }

    #[test]
    fn symmetric_counts_do_not_depend_on_pair_orientation() {
        // Transposing swaps the horizontal and vertical directions; each diagonal maps to itself.
        let (rows, cols) = (5, 8);
        let px: Vec<u8> = (0..rows * cols)
            .map(|k| ((k * 37 + k / 3) % 23) as u8)
            .collect();
        let mut tr = vec![0u8; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                tr[c * rows + r] = px[r * cols + c];
            }
        }
        let a = haralick_raw(&px, rows, cols);
        let b = haralick_raw(&tr, cols, rows);
        for (da, db) in [(0, 2), (2, 0), (1, 1), (3, 3)] {
            for k in 0..13 {
                assert!(
                    close(a[da][k], b[db][k]),
                    "{da} {k}: {} {}",
                    a[da][k],
                    b[db][k]
                );
            }
        }
    }

    #[test]
    fn too_small_images_are_undefined() {
        assert!(try_haralick_raw(&[1, 2, 3], 1, 3).is_none());
        assert!(try_haralick_raw(&[1, 2, 3], 3, 1).is_none());
        assert!(try_haralick_raw(&[], 0, 0).is_none());
        assert!(haralick_raw(&[9], 1, 1)
            .iter()
            .flatten()
            .all(|v| v.is_nan()));
        assert!(try_haralick_raw(&[1, 2, 3, 4], 2, 2).is_some());
    }

    #[test]
    fn gray_image_wrapper_uses_row_major_layout() {
        let px: Vec<u8> = (0..12).map(|k| (k * 7 % 11) as u8).collect();
        let img = GrayImage::from_raw(4, 3, px.clone()).unwrap(); // width 4, height 3
        assert_eq!(haralick(&img), haralick_raw(&px, 3, 4));
    }
}
