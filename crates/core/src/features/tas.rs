//! Parameter-free threshold adjacency statistics for late fusion (SPEC.md "Extra image features
//! and late fusion": evaluated by the reference, unused in the end): `mahotas.features.pftas(img)`
//! on the raw (not inverted) uint8 image, 54 values.
//!
//! The reference (benanne/kaggle-ndsb `extract_features.py`) calls it on `img_o`, the uint8
//! image as loaded, before its `uint_to_float` inversion.
//!
//! What mahotas 1.4.19 does (`mahotas/features/tas.py`, `thresholding.otsu` and
//! `_histogram.cpp`, `convolve` and `_convolve.cpp`), re-stated here and followed exactly
//! (checked against mahotas by `tests/fixtures/features/tas/gen_tas_fixtures.py` and
//! `crates/core/tests/features_extra.rs`):
//!
//! * Threshold `T = mahotas.otsu(img)` ([`otsu`]): Otsu on the full histogram `0..=max`, with
//!   the strict `>` of `_histogram.cpp` (the first best T wins) and its quirks: 0 when the
//!   image has one grey level or only zeros.
//! * `s` = numpy's population standard deviation of the pixels `> T` (0 if there are none), and
//!   `mu = sum(v > T) / (count(v > T) + 1e-8)`: their mean shrunk by a relative 1e-8/N, so a
//!   constant image's `mu` lies just *below* its value.
//! * Three masks, compared in f64 against the integer grey level v: `band` = `mu - s < v <
//!   mu + s`, `above_low` = `v > mu - s`, `above_mean` = `v > mu`.
//! * Per mask, `convolve(mask, [[1,1,1],[1,10,1],[1,1,1]])` with mode `'reflect'` (the pixel
//!   beyond the border is the border pixel itself, so border pixels still have 8 neighbours)
//!   and `np.histogram(V, bins=arange(11))[:9]`: values 10..18 (centre in the mask) fall in the
//!   dropped last bin or outside the range, so **only pixels outside the mask are counted**, by
//!   their number of neighbours inside it. Then the same for the complement mask: pixels inside
//!   the mask by their number of neighbours outside it. Each 9-vector is divided by its sum
//!   (the number of pixels counted), or left all 0 when that is 0.
//! * Output order ([`TAS_NAMES`]): `band_out0..8`, `above_low_out0..8`, `above_mean_out0..8`
//!   (outside pixels by inside neighbours), then `band_in0..8`, `above_low_in0..8`,
//!   `above_mean_in0..8` (inside pixels by outside neighbours).
//! * Edge cases: an empty image makes mahotas raise `ValueError` (max of an empty array);
//!   [`try_pftas_raw`] returns `None` there and [`pftas`] / [`pftas_raw`] all-NaN. Every other
//!   image, down to 1 x 1, gives finite shares: a blank image has `T = 0`, no pixel above it,
//!   `s = 0`, `mu = 0`, so every mask is empty and only `*_out0` are 1; a constant image of
//!   value v > 0 has `mu` just below v, so `band` is empty and the other two masks are full.
//!
//! Numerics: the thresholds are bit-identical to mahotas' (the same f64 operations in the same
//! order; `s` uses numpy's pairwise summation, see [`pairwise_sum_sq_dev`]), so the masks are
//! identical, and every output is the same integer count divided by the same integer: the
//! golden test compares for equality.
//!
//! Cost: a histogram pass, a pass collecting the pixels above T, then one pass computing all
//! three masks' neighbour counts at once (3 x 4-bit lanes in a u16, a separable 3 x 3 box sum)
//! and three 18-bin histograms of the results. 10-70 us on typical plankton images, ~450 us on
//! a 412 x 503 one (crates/core/benches/features_extra.rs), against 0.3-18 ms for mahotas (six full
//! convolutions and `np.histogram` calls).

use image::GrayImage;

/// The three masks, in output order.
pub const MASKS: [&str; 3] = ["band", "above_low", "above_mean"];

/// Column names of [`pftas`], in its order: `<mask>_out<k>` is the share of the pixels outside
/// the mask that have k of their 8 neighbours inside it; `<mask>_in<k>` the share of the
/// pixels inside the mask that have k neighbours outside it.
#[rustfmt::skip]
pub const TAS_NAMES: [&str; 54] = [
    "band_out0", "band_out1", "band_out2", "band_out3", "band_out4", "band_out5", "band_out6",
    "band_out7", "band_out8",
    "above_low_out0", "above_low_out1", "above_low_out2", "above_low_out3", "above_low_out4",
    "above_low_out5", "above_low_out6", "above_low_out7", "above_low_out8",
    "above_mean_out0", "above_mean_out1", "above_mean_out2", "above_mean_out3",
    "above_mean_out4", "above_mean_out5", "above_mean_out6", "above_mean_out7",
    "above_mean_out8",
    "band_in0", "band_in1", "band_in2", "band_in3", "band_in4", "band_in5", "band_in6",
    "band_in7", "band_in8",
    "above_low_in0", "above_low_in1", "above_low_in2", "above_low_in3", "above_low_in4",
    "above_low_in5", "above_low_in6", "above_low_in7", "above_low_in8",
    "above_mean_in0", "above_mean_in1", "above_mean_in2", "above_mean_in3", "above_mean_in4",
    "above_mean_in5", "above_mean_in6", "above_mean_in7", "above_mean_in8",
];

/// The intermediate values of [`pftas`], for tests and diagnostics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// `mahotas.otsu(img)`.
    pub otsu: u8,
    /// Number of pixels `> otsu`.
    pub above: u64,
    /// Standard deviation of those pixels (0 when there are none): the margin.
    pub std: f64,
    /// `sum / (count + 1e-8)` of those pixels.
    pub mu: f64,
}

/// mahotas.features.pftas(img): the 54 shares of [`TAS_NAMES`]. All NaN for an empty image
/// (where mahotas raises).
pub fn pftas(img: &GrayImage) -> [f64; 54] {
    pftas_raw(img.as_raw(), img.height() as usize, img.width() as usize)
}

/// The same on a raw buffer (rows x cols, row-major u8). All NaN when `rows == 0 || cols == 0`.
///
/// Panics if `pixels.len() != rows * cols`.
pub fn pftas_raw(pixels: &[u8], rows: usize, cols: usize) -> [f64; 54] {
    try_pftas_raw(pixels, rows, cols).unwrap_or([f64::NAN; 54])
}

/// [`pftas_raw`], but `None` where mahotas raises `ValueError` (an empty image).
pub fn try_pftas_raw(pixels: &[u8], rows: usize, cols: usize) -> Option<[f64; 54]> {
    assert_eq!(
        Some(pixels.len()),
        rows.checked_mul(cols),
        "pftas: buffer length does not match {rows} x {cols}"
    );
    if rows == 0 || cols == 0 {
        return None;
    }
    let th = thresholds(pixels);
    let (lo, hi) = (th.mu - th.std, th.mu + th.std);
    // The three mask bits of each grey level, as 4-bit lanes of a u16 so that neighbour counts
    // (at most 9 with the centre) add up lane by lane without carries.
    let lanes: [u16; 256] = std::array::from_fn(|v| {
        let v = v as f64;
        (v > lo && v < hi) as u16 | ((v > lo) as u16) << 4 | ((v > th.mu) as u16) << 8
    });
    let counts = neighbour_histograms(pixels, rows, cols, &lanes);
    let mut out = [0.0f64; 54];
    for m in 0..3 {
        for (side, base) in [(0, 0), (1, 27)] {
            let h = &counts[m][side * 9..side * 9 + 9];
            let total: u64 = h.iter().sum();
            if total > 0 {
                for (k, &n) in h.iter().enumerate() {
                    out[base + m * 9 + k] = n as f64 / total as f64;
                }
            }
        }
    }
    Some(out)
}

/// Otsu's threshold, T, the margin and mu of [`pftas`] on a non-empty image.
pub fn thresholds(pixels: &[u8]) -> Thresholds {
    let hist = histogram(pixels);
    let levels = hist.iter().rposition(|&n| n > 0).map_or(1, |m| m + 1);
    let t = otsu(&hist[..levels]);
    let n: u64 = hist[t as usize + 1..].iter().sum();
    // The pixels above T in image order (numpy's img[img > T]), compacted without branches:
    // every pixel is written, the cursor only advances past the kept ones.
    let mut above = vec![0u8; n as usize + 1];
    let mut j = 0usize;
    for &v in pixels {
        above[j] = v;
        j += (v > t) as usize;
    }
    above.truncate(j);
    let sum: u64 = hist[t as usize + 1..]
        .iter()
        .enumerate()
        .map(|(i, &c)| (t as u64 + 1 + i as u64) * c)
        .sum();
    let std = if n == 0 {
        0.0
    } else {
        // numpy's _var: exact integer sum / n, then the pairwise sum of squared deviations / n.
        let mean = sum as f64 / n as f64;
        (pairwise_sum_sq_dev(&above, mean) / n as f64).sqrt()
    };
    Thresholds {
        otsu: t,
        above: n,
        std,
        mu: sum as f64 / (n as f64 + 1e-8),
    }
}

/// Grey-level counts. Four interleaved partial histograms: on a mostly uniform image a single
/// one serialises on incrementing the same bin.
fn histogram(pixels: &[u8]) -> [u64; 256] {
    let mut part = [[0u32; 256]; 4];
    let mut hist = [0u64; 256];
    // u32 partial counts are flushed every 2^30 pixels, long before they could overflow.
    for block in pixels.chunks(1 << 30) {
        let mut quads = block.chunks_exact(4);
        for q in &mut quads {
            part[0][q[0] as usize] += 1;
            part[1][q[1] as usize] += 1;
            part[2][q[2] as usize] += 1;
            part[3][q[3] as usize] += 1;
        }
        for &v in quads.remainder() {
            part[0][v as usize] += 1;
        }
        for p in &mut part {
            for (h, c) in hist.iter_mut().zip(p.iter_mut()) {
                *h += std::mem::take(c) as u64;
            }
        }
    }
    hist
}

/// mahotas.otsu on a full histogram (`hist[i]` = count of level i, length max + 1), in
/// `_histogram.cpp`'s float operations and order. 0 for fewer than 2 levels or only zeros.
pub fn otsu(hist: &[u64]) -> u8 {
    let h: Vec<f64> = hist.iter().map(|&c| c as f64).collect();
    let n = h.len();
    if n <= 1 {
        return 0;
    }
    let hsum = h[1..].iter().fold(0.0f64, |a, &b| a + b);
    if hsum == 0.0 {
        return 0;
    }
    let mut nb = vec![0.0f64; n];
    nb[0] = h[0];
    for i in 1..n {
        nb[i] = h[i] + nb[i - 1];
    }
    let no: Vec<f64> = nb.iter().map(|&b| nb[n - 1] - b).collect();
    let mut mu_b = 0.0f64;
    let mut mu_o = 0.0f64;
    for (i, &hi) in h.iter().enumerate().skip(1) {
        mu_o += i as f64 * hi;
    }
    mu_o /= hsum;
    let mut best = nb[0] * no[0] * (mu_b - mu_o) * (mu_b - mu_o);
    let mut best_t = 0;
    for t in 1..n {
        if nb[t] == 0.0 {
            continue;
        }
        if no[t] == 0.0 {
            break;
        }
        mu_b = (mu_b * nb[t - 1] + t as f64 * h[t]) / nb[t];
        mu_o = (mu_o * no[t - 1] - t as f64 * h[t]) / no[t];
        let between = nb[t] * no[t] * (mu_b - mu_o) * (mu_b - mu_o);
        if between > best {
            best = between;
            best_t = t;
        }
    }
    best_t as u8
}

/// `sum((v - mean)^2)` over `values` in numpy's pairwise order (`DOUBLE_pairwise_sum`: plain
/// loop under 8 values, 8 interleaved accumulators up to 128, halves at a multiple of 8 above),
/// which `ndarray.std` applies to the whole contiguous array at once. A naive loop differs in
/// the last bits, and the margin must be bit-identical for `v > mu - s` to agree on every image.
pub fn pairwise_sum_sq_dev(values: &[u8], mean: f64) -> f64 {
    let sq = |v: u8| {
        let d = v as f64 - mean;
        d * d
    };
    let n = values.len();
    if n < 8 {
        values.iter().fold(0.0, |acc, &v| acc + sq(v))
    } else if n <= 128 {
        let mut r: [f64; 8] = std::array::from_fn(|j| sq(values[j]));
        let whole = n - n % 8;
        for chunk in values[8..whole].chunks_exact(8) {
            for (acc, &v) in r.iter_mut().zip(chunk) {
                *acc += sq(v);
            }
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &v in &values[whole..] {
            res += sq(v);
        }
        res
    } else {
        let half = n / 2;
        let half = half - half % 8;
        pairwise_sum_sq_dev(&values[..half], mean) + pairwise_sum_sq_dev(&values[half..], mean)
    }
}

/// Per mask m: `[outside pixels by inside-neighbour count (9) | inside pixels by
/// outside-neighbour count (9)]`, 8-neighbourhood with the border pixel repeated beyond the
/// edge (mahotas' `'reflect'`).
fn neighbour_histograms(
    pixels: &[u8],
    rows: usize,
    cols: usize,
    lanes: &[u16; 256],
) -> [[u64; 18]; 3] {
    // Padded lane image: row/column -1 and rows/cols repeat the edge.
    let pc = cols + 2;
    let mut padded = vec![0u16; (rows + 2) * pc];
    for pr in 0..rows + 2 {
        let r = pr.saturating_sub(1).min(rows - 1);
        let src = &pixels[r * cols..(r + 1) * cols];
        let dst = &mut padded[pr * pc..(pr + 1) * pc];
        for (d, &v) in dst[1..=cols].iter_mut().zip(src) {
            *d = lanes[v as usize];
        }
        dst[0] = dst[1];
        dst[cols + 1] = dst[cols];
    }
    // Per row: the 3 x 3 box sums of the lanes (separable: column sums, then 3 across), the
    // bin of each pixel per mask, then a histogram of the bins. All but the last step are
    // plain slice arithmetic the compiler vectorises; the histogram is spread over 4 copies
    // because on a uniform mask every pixel hits the same bin and one copy would serialise.
    let mut hist = [[[0u32; 18]; 4]; 3];
    let mut totals = [[0u64; 18]; 3];
    let mut pending = 0usize;
    let mut col_sums = vec![0u16; pc];
    let mut around = vec![0u16; cols];
    let mut bins = vec![0u8; cols];
    for r in 0..rows {
        let (a, b, c) = (
            &padded[r * pc..(r + 1) * pc],
            &padded[(r + 1) * pc..(r + 2) * pc],
            &padded[(r + 2) * pc..(r + 3) * pc],
        );
        for (((s, &x), &y), &z) in col_sums.iter_mut().zip(a).zip(b).zip(c) {
            *s = x + y + z;
        }
        let centre = &b[1..=cols];
        for ((((n, &l), &m), &h), &ctr) in around
            .iter_mut()
            .zip(&col_sums[..cols])
            .zip(&col_sums[1..=cols])
            .zip(&col_sums[2..])
            .zip(centre)
        {
            *n = l + m + h - ctr;
        }
        for (m, h) in hist.iter_mut().enumerate() {
            let shift = 4 * m as u32;
            for ((bin, &n), &ctr) in bins.iter_mut().zip(&around).zip(centre) {
                let inside = ((ctr >> shift) & 1) as u8;
                let k = ((n >> shift) & 15) as u8;
                // outside: bin k (inside neighbours); inside: bin 9 + (8 - k) (outside ones)
                *bin = k + inside * (17 - 2 * k);
            }
            let mut quads = bins.chunks_exact(4);
            for q in &mut quads {
                h[0][q[0] as usize] += 1;
                h[1][q[1] as usize] += 1;
                h[2][q[2] as usize] += 1;
                h[3][q[3] as usize] += 1;
            }
            for &bin in quads.remainder() {
                h[0][bin as usize] += 1;
            }
        }
        // Flush the u32 copies into u64 totals long before any could overflow.
        pending += cols;
        if pending >= 1 << 30 || r == rows - 1 {
            pending = 0;
            for (t, h) in totals.iter_mut().zip(hist.iter_mut()) {
                for copy in h.iter_mut() {
                    for (tb, hb) in t.iter_mut().zip(copy.iter_mut()) {
                        *tb += std::mem::take(hb) as u64;
                    }
                }
            }
        }
    }
    totals
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_output_layout() {
        for (i, name) in TAS_NAMES.iter().enumerate() {
            let side = if i < 27 { "out" } else { "in" };
            assert_eq!(*name, format!("{}_{side}{}", MASKS[(i % 27) / 9], i % 9));
        }
    }

    #[test]
    fn otsu_quirks() {
        assert_eq!(otsu(&[]), 0);
        assert_eq!(otsu(&[5]), 0);
        assert_eq!(otsu(&[5, 0, 0]), 0); // only zeros
        assert_eq!(otsu(&[0, 0, 0, 9]), 0); // one level
        assert_eq!(otsu(&[4, 0, 0, 0, 4]), 0); // two levels: the first best T wins
        assert_eq!(otsu(&[0, 4, 4, 0, 0, 4, 4]), 2);
    }

    #[test]
    fn pairwise_sum_is_exact_on_small_integers() {
        let v: Vec<u8> = (0..1000).map(|k| (k % 7) as u8).collect();
        let mean = 3.0;
        let naive: f64 = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum();
        assert_eq!(pairwise_sum_sq_dev(&v, mean), naive);
    }

    #[test]
    fn blank_and_constant_images() {
        // Blank: every mask empty, so every pixel is outside with 0 inside neighbours.
        let f = pftas_raw(&[0; 12], 3, 4);
        for (i, &v) in f.iter().enumerate() {
            let want = if i < 27 && i % 9 == 0 { 1.0 } else { 0.0 };
            assert_eq!(v, want, "{}", TAS_NAMES[i]);
        }
        // Constant 7: mu just below 7, s = 0: band empty, the other two masks full.
        let th = thresholds(&[7; 12]);
        assert!(th.mu < 7.0 && th.std == 0.0 && th.otsu == 0);
        let f = pftas_raw(&[7; 12], 3, 4);
        for (i, &v) in f.iter().enumerate() {
            let want = match i {
                0 => 1.0,       // band_out0
                36 | 45 => 1.0, // above_low_in0, above_mean_in0
                _ => 0.0,
            };
            assert_eq!(v, want, "{}", TAS_NAMES[i]);
        }
    }

    #[test]
    fn reflect_border_counts_the_edge_pixel_again() {
        // 1 x 3 image [on, off, on] for above_mean (mu just under 9): the off centre pixel
        // sees, with the row repeated above and below, its two on neighbours three times.
        let f = pftas_raw(&[9, 0, 9], 1, 3);
        assert_eq!(f[18 + 6], 1.0, "above_mean_out6");
        // Each on pixel: 5 of its 8 neighbours are itself reflected, 3 the off pixel.
        assert_eq!(f[45 + 3], 1.0, "above_mean_in3");
    }

    #[test]
    fn empty_images_are_undefined() {
        assert!(try_pftas_raw(&[], 0, 0).is_none());
        assert!(try_pftas_raw(&[], 0, 3).is_none());
        assert!(pftas_raw(&[], 3, 0).iter().all(|v| v.is_nan()));
    }
}
