//! Local binary patterns for late fusion (SPEC.md "Extra image features and late fusion":
//! evaluated by the reference, unused in the end): `mahotas.features.lbp(img, radius=20,
//! points=7, ignore_zeros=False)` on the raw (not inverted) uint8 image, 20 values.
//!
//! The reference (benanne/kaggle-ndsb `extract_features.py`) calls it on `img_o`, the uint8
//! image as loaded, before its `uint_to_float` inversion.
//!
//! What mahotas 1.4.19 does (`mahotas/features/lbp.py`, `interpolate.shift` and
//! `_interpolate.cpp`'s `zoom_shift`, `features/_lbp.cpp`), re-stated here and followed
//! exactly (checked against mahotas by `tests/fixtures/features/lbp/gen_lbp_fixtures.py` and
//! `crates/core/tests/features_extra.rs`):
//!
//! * Sampling points: angles `k * 2 pi / 7` (k = 0..7, numpy `linspace`), one neighbour image
//!   per angle from `shift(img, [20 sin, 20 cos], order=1, mode='constant', cval=0)`.
//! * **No interpolation happens.** `zoom_shift` turns the output position `kk` into
//!   `std_like_round(kk + s + 0.5)` (round half away from zero) with `s = -20 sin` (rows) or
//!   `-20 cos` (columns) *before* computing the order-1 spline weights, which at an integer
//!   position are (1, 0): every neighbour is a single pixel. Because of the `+ 0.5`, that pixel
//!   is `floor(s) + 1` away, not `round(s)`: for angle 0 the neighbour of `(r, c)` is
//!   `(r + 1, c - 19)` (one row *below*, 19 columns left), and for the others
//!   `(r - 15, c - 12)`, `(r - 19, c + 5)`, `(r - 8, c + 19)`, `(r + 9, c + 19)`,
//!   `(r + 20, c + 5)`, `(r + 16, c - 12)`. At the exact integer shift -20 the rounding of
//!   negative positions (`ceil(v - 0.5)`) also drops column 19 (which `floor(s) + 1` would map
//!   to column 0). We evaluate mahotas' formula itself per row and column, so these details
//!   hold by construction.
//! * Outside the image the neighbour is 0, so it never beats the centre (`0 > v` is false): an
//!   image smaller than the radius in both directions has code 0 everywhere.
//! * Code: bit k set when neighbour k is **strictly greater** than the centre. Rotation
//!   invariance: the code is replaced by its smallest rotation over the 7 bits (`_lbp.map`).
//! * Output: the number of pixels with each of the 20 codes that are their own smallest
//!   rotation ([`CODES`], ascending), as f64: a histogram summing to rows x cols (not
//!   normalised, so it scales with the image size).
//! * Edge cases: an empty image (0 rows or 0 columns) makes mahotas raise `ValueError` (max of
//!   an empty array); [`try_lbp_raw`] returns `None` there and [`lbp`] / [`lbp_raw`] all-NaN.
//!   Blank, constant and tiny images give `[rows * cols, 0, ..., 0]`.
//!
//! Numerics: counts of integer comparisons, so the results are exactly mahotas' (the golden
//! test compares for equality).
//!
//! Cost: 7 passes of one byte compare per pixel on plain slices (vectorised), then a 128-bin
//! histogram; no floating point per pixel. 5-30 us on typical plankton images, ~120 us on a
//! 412 x 503 one (crates/core/benches/features_extra.rs), against 0.3-38 ms for mahotas, whose `shift`
//! allocates and interpolates a full float64 image per sampling point.

use image::GrayImage;

/// Radius of the sampling circle, in pixels, as the reference called it.
pub const RADIUS: f64 = 20.0;

/// Number of sampling points, as the reference called it.
pub const POINTS: usize = 7;

/// The rotation-invariant 7-bit codes (each its own smallest rotation), in output order.
pub const CODES: [u8; 20] = [
    0, 1, 3, 5, 7, 9, 11, 13, 15, 19, 21, 23, 27, 29, 31, 43, 47, 55, 63, 127,
];

/// Column names (`code_<c>`, c from [`CODES`]) of [`lbp`], in its order. mahotas'
/// `lbp_names(20, 7)` are positional (`lbp_r20_p7_<i>`); the code itself says which pattern
/// is counted.
pub const LBP_NAMES: [&str; 20] = [
    "code_0", "code_1", "code_3", "code_5", "code_7", "code_9", "code_11", "code_13", "code_15",
    "code_19", "code_21", "code_23", "code_27", "code_29", "code_31", "code_43", "code_47",
    "code_55", "code_63", "code_127",
];

/// The smallest rotation of each 7-bit code (mahotas' `_lbp.map`).
const CANONICAL: [u8; 128] = {
    let mut t = [0u8; 128];
    let mut v = 0;
    while v < 128 {
        let mut best = v;
        let mut x = v;
        let mut i = 0;
        while i < POINTS {
            x = (x >> 1) | ((x & 1) << (POINTS - 1));
            if x < best {
                best = x;
            }
            i += 1;
        }
        t[v] = best as u8;
        v += 1;
    }
    t
};

/// mahotas.features.lbp(img, radius=20, points=7, ignore_zeros=False): pixel counts per code
/// of [`CODES`]. All NaN for an empty image (where mahotas raises).
pub fn lbp(img: &GrayImage) -> [f64; 20] {
    lbp_raw(img.as_raw(), img.height() as usize, img.width() as usize)
}

/// The same on a raw buffer (rows x cols, row-major u8). All NaN when `rows == 0 || cols == 0`.
///
/// Panics if `pixels.len() != rows * cols`.
pub fn lbp_raw(pixels: &[u8], rows: usize, cols: usize) -> [f64; 20] {
    try_lbp_raw(pixels, rows, cols).unwrap_or([f64::NAN; 20])
}

/// [`lbp_raw`], but `None` where mahotas raises `ValueError` (an empty image).
pub fn try_lbp_raw(pixels: &[u8], rows: usize, cols: usize) -> Option<[f64; 20]> {
    assert_eq!(
        Some(pixels.len()),
        rows.checked_mul(cols),
        "lbp: buffer length does not match {rows} x {cols}"
    );
    if rows == 0 || cols == 0 {
        return None;
    }
    let codes = lbp_codes(pixels, rows, cols, true);
    // Four interleaved u32 partial histograms (a uniform image would serialise one), flushed
    // to u64 every 2^30 pixels.
    let mut canon = [0u64; 128];
    for block in codes.chunks(1 << 30) {
        let mut part = [[0u32; 128]; 4];
        let mut quads = block.chunks_exact(4);
        for q in &mut quads {
            part[0][q[0] as usize] += 1;
            part[1][q[1] as usize] += 1;
            part[2][q[2] as usize] += 1;
            part[3][q[3] as usize] += 1;
        }
        for &c in quads.remainder() {
            part[0][c as usize] += 1;
        }
        for p in &part {
            for (code, &n) in p.iter().enumerate() {
                canon[CANONICAL[code] as usize] += n as u64;
            }
        }
    }
    Some(CODES.map(|c| canon[c as usize] as f64))
}

/// The rotation-variant 7-bit code of every pixel (row-major). `allow_affine: false` forces the
/// general gather (for testing it against the fast path).
fn lbp_codes(pixels: &[u8], rows: usize, cols: usize, allow_affine: bool) -> Vec<u8> {
    let mut codes = vec![0u8; pixels.len()];
    // The neighbour row with a 0 appended: out-of-range columns gather index `cols`.
    let mut ext = vec![0u8; cols + 1];
    for (k, (sr, sc)) in sample_shifts().into_iter().enumerate() {
        let row_map = axis_map(rows, sr);
        let col_map = axis_map(cols, sc);
        let bit = 1u8 << k;
        // In practice the valid columns are one interval at a constant offset, which lets the
        // compare run on plain slices; the general gather is kept for exactness.
        let affine = affine_span(&col_map).filter(|_| allow_affine);
        let col_idx: Vec<usize> = col_map.iter().map(|m| m.unwrap_or(cols)).collect();
        for (r, src_row) in row_map.iter().enumerate() {
            let Some(src_row) = *src_row else {
                continue; // every neighbour is the constant 0: no bit
            };
            let centre = &pixels[r * cols..(r + 1) * cols];
            let nb = &pixels[src_row * cols..(src_row + 1) * cols];
            let out = &mut codes[r * cols..(r + 1) * cols];
            match affine {
                Some((lo, hi, src_lo)) => {
                    let nb = &nb[src_lo..src_lo + (hi - lo)];
                    for ((o, &c), &n) in out[lo..hi].iter_mut().zip(&centre[lo..hi]).zip(nb) {
                        *o |= bit & 0u8.wrapping_sub((n > c) as u8);
                    }
                }
                None => {
                    ext[..cols].copy_from_slice(nb);
                    for ((o, &c), &i) in out.iter_mut().zip(centre).zip(&col_idx) {
                        *o |= bit & 0u8.wrapping_sub((ext[i] > c) as u8);
                    }
                }
            }
        }
    }
    codes
}

/// The (row, column) shift `zoom_shift` receives for each sampling point, in bit order:
/// `-(20 sin t)`, `-(20 cos t)` for `t = k * 2 pi / 7` (`interpolate.shift` negates the shift
/// it is given). Angle 0 gives exactly (-0.0, -20.0).
pub fn sample_shifts() -> [(f64, f64); POINTS] {
    let step = 2.0 * std::f64::consts::PI / POINTS as f64;
    std::array::from_fn(|k| {
        let t = k as f64 * step;
        (-(RADIUS * t.sin()), -(RADIUS * t.cos()))
    })
}

/// For each output position `kk` along an axis of length `len`, the input position
/// `zoom_shift` reads with shift `s`, or `None` outside (the constant 0).
pub fn axis_map(len: usize, s: f64) -> Vec<Option<usize>> {
    (0..len)
        .map(|kk| {
            let v = std_like_round(kk as f64 + s + 0.5);
            (v >= 0.0 && v < len as f64).then_some(v as usize)
        })
        .collect()
}

/// mahotas' `std_like_round`: half away from zero.
fn std_like_round(v: f64) -> f64 {
    if v > 0.0 {
        (v + 0.5).floor()
    } else {
        (v - 0.5).ceil()
    }
}

/// `(lo, hi, src_lo)` when the positions mapping inside are exactly `lo..hi` and map to
/// `src_lo..src_lo + (hi - lo)`; `None` otherwise (also when none maps inside).
fn affine_span(map: &[Option<usize>]) -> Option<(usize, usize, usize)> {
    let lo = map.iter().position(Option::is_some)?;
    let hi = lo + map[lo..].iter().take_while(|m| m.is_some()).count();
    let src_lo = map[lo]?;
    let contiguous = map[lo..hi]
        .iter()
        .enumerate()
        .all(|(i, m)| *m == Some(src_lo + i));
    let rest_empty = map[hi..].iter().all(Option::is_none);
    (contiguous && rest_empty).then_some((lo, hi, src_lo))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_the_fixed_points_of_the_rotation_map() {
        let fixed: Vec<u8> = (0..128u8).filter(|&c| CANONICAL[c as usize] == c).collect();
        assert_eq!(fixed, CODES);
        for (c, name) in CODES.iter().zip(LBP_NAMES) {
            assert_eq!(name, format!("code_{c}"));
        }
        // Rotating a code never changes its class.
        for (v, &canon) in CANONICAL.iter().enumerate() {
            let rot = (v >> 1) | ((v & 1) << 6);
            assert_eq!(canon, CANONICAL[rot]);
        }
    }

    #[test]
    fn neighbour_offsets_are_floor_plus_one() {
        // Documented offsets: (row, col) per angle, valid away from the borders.
        let want = [
            (1, -19),
            (-15, -12),
            (-19, 5),
            (-8, 19),
            (9, 19),
            (20, 5),
            (16, -12),
        ];
        for ((sr, sc), (dr, dc)) in sample_shifts().into_iter().zip(want) {
            let rows = axis_map(100, sr);
            let cols = axis_map(100, sc);
            assert_eq!(rows[50], Some((50 + dr) as usize));
            assert_eq!(cols[50], Some((50 + dc) as usize));
        }
        // Exact shift -20: position 19 would round to -0.5 -> ceil(-1) = -1: outside.
        let m = axis_map(40, -20.0);
        assert_eq!((m[18], m[19], m[20]), (None, None, Some(1)));
    }

    #[test]
    fn tiny_and_constant_images_are_all_code_zero() {
        let mut want = [0.0; 20];
        want[0] = 35.0;
        assert_eq!(lbp_raw(&[3; 35], 5, 7), want);
        want[0] = 12.0;
        let ramp: Vec<u8> = (0..12).map(|k| k * 20).collect();
        assert_eq!(lbp_raw(&ramp, 3, 4), want);
    }

    #[test]
    fn empty_images_are_undefined() {
        assert!(try_lbp_raw(&[], 0, 0).is_none());
        assert!(try_lbp_raw(&[], 0, 4).is_none());
        assert!(try_lbp_raw(&[], 4, 0).is_none());
        assert!(lbp_raw(&[], 0, 3).iter().all(|v| v.is_nan()));
    }

    #[test]
    fn general_gather_matches_the_affine_path() {
        let (rows, cols) = (45, 52);
        let px: Vec<u8> = (0..rows * cols).map(|k| ((k * 7919) % 251) as u8).collect();
        let fast = lbp_codes(&px, rows, cols, true);
        assert_eq!(fast, lbp_codes(&px, rows, cols, false));
        assert!(fast.iter().any(|&c| c != 0));
        assert_eq!(affine_span(&[None, Some(0), Some(2), None]), None);
        assert_eq!(affine_span(&[None, Some(3), Some(4)]), Some((1, 3, 3)));
        assert_eq!(affine_span(&[None, None]), None);
    }
}
