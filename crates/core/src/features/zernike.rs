//! Zernike moments for late fusion (SPEC.md "Extra image features and late fusion": evaluated
//! by the reference, unused in the end): `mahotas.features.zernike_moments(img, radius=20,
//! degree=8)` on the raw (not inverted) uint8 image, 25 values.
//!
//! The reference (benanne/kaggle-ndsb `extract_features.py`) calls it on `img_o`, the uint8
//! image as loaded, before its `uint_to_float` inversion; so the weights are the raw grey
//! levels, where the plankton images' background is white (255) and the organism dark.
//!
//! What mahotas 1.4.19 does (`mahotas/features/zernike.py`, `_zernike.cpp`,
//! `_center_of_mass.cpp`), re-stated here and followed exactly (checked against mahotas by
//! `tests/fixtures/features/zernike/gen_zernike_fixtures.py` and `crates/core/tests/features_extra.rs`):
//!
//! * Centre: the intensity centre of mass `(c0, c1) = (sum r v, sum c v) / sum v` over the
//!   whole image (rows r, columns c, integer pixel positions; sums exact in f64).
//! * Unit disc: `y = (r - c0) / 20`, `x = (c - c1) / 20`, `d = max(sqrt(x^2 + y^2), 1e-9)`;
//!   a pixel takes part when `d <= 1` **and its value is > 0** (zero pixels are dropped, which
//!   only matters for their count: they weigh 0 anyway). Each kept pixel weighs
//!   `p = v / sum of the kept v`, so the weights sum to 1 (the disc is not normalised by its
//!   area).
//! * The angle enters as the complex number `a = (x + i y) / d` (so `a = 0` at a pixel exactly
//!   on the centre, where `d` was clamped to 1e-9), raised to `a^l`, except that `a^0` is
//!   exactly 1 even there (numpy `ones_like`).
//! * For n = 0..=8 and l = n, n-2, ... >= 0, in the order n ascending, then l ascending
//!   ([`ORDERS`]): `Z_nl = (n + 1) / pi * sum p conj(R_nl(d) a^l)` with the radial polynomial
//!   `R_nl(d) = sum_{m=0}^{(n-l)/2} (-1)^m (n-m)! / (m! ((n-2m+l)/2)! ((n-2m-l)/2)!) d^(n-2m)`;
//!   the value is `|Z_nl|`. Since the weights sum to 1, `|Z_00| = 1/pi` for every image with
//!   a kept pixel: a constant column.
//! * Edge cases (mahotas never raises here): an all-zero image or an empty one (its centre of
//!   mass is NaN) and an image whose nonzero pixels all lie farther than 20 pixels from the
//!   centre of mass (two dots far apart) keep no pixel, and mahotas returns 25 zeros; so do we.
//!   An image smaller than the disc simply keeps all its nonzero pixels. All outputs are
//!   finite.
//!
//! Numerics: the same f64 operations as mahotas in the same order, per pixel in row-major
//! order, except that the powers `d^k` and `a^l` come from repeated multiplication where
//! mahotas calls `pow` and numpy's complex power. Worst relative difference on the fixtures:
//! 6e-13 (values are O(0.001..3); moments that vanish by symmetry come out as ~1e-17 noise in
//! both, hence an absolute floor in `crates/core/tests/features_extra.rs`). The centre of mass is
//! bit-identical, and the disc test `d <= 1` uses exactly mahotas' arithmetic, so the same
//! pixels are kept.
//!
//! Cost: one pass over the image for the centre of mass, then only the 43 x 43 box around it:
//! about 1,260 kept pixels x (55 polynomial terms + 25 complex accumulations) whatever the
//! image size, the 55 terms unrolled so that the 25 sums overlap. ~37 us on a small plankton
//! image, ~75 us on a 412 x 503 one (crates/core/benches/features_extra.rs), against 1-7 ms for mahotas.

use image::GrayImage;

/// Radius of the disc, in pixels, as the reference called it.
pub const RADIUS: f64 = 20.0;

/// Highest order n, as the reference called it.
pub const DEGREE: usize = 8;

/// (n, l) of each value, in mahotas' order.
pub const ORDERS: [(usize, usize); 25] = [
    (0, 0),
    (1, 1),
    (2, 0),
    (2, 2),
    (3, 1),
    (3, 3),
    (4, 0),
    (4, 2),
    (4, 4),
    (5, 1),
    (5, 3),
    (5, 5),
    (6, 0),
    (6, 2),
    (6, 4),
    (6, 6),
    (7, 1),
    (7, 3),
    (7, 5),
    (7, 7),
    (8, 0),
    (8, 2),
    (8, 4),
    (8, 6),
    (8, 8),
];

/// Column names (`n<n>_l<l>`) of [`zernike`], in its order ([`ORDERS`]).
pub const ZERNIKE_NAMES: [&str; 25] = [
    "n0_l0", "n1_l1", "n2_l0", "n2_l2", "n3_l1", "n3_l3", "n4_l0", "n4_l2", "n4_l4", "n5_l1",
    "n5_l3", "n5_l5", "n6_l0", "n6_l2", "n6_l4", "n6_l6", "n7_l1", "n7_l3", "n7_l5", "n7_l7",
    "n8_l0", "n8_l2", "n8_l4", "n8_l6", "n8_l8",
];

/// mahotas.features.zernike_moments(img, radius=20, degree=8): `|Z_nl|` in [`ORDERS`] order.
/// 25 zeros when no nonzero pixel lies within the disc (including blank and empty images).
pub fn zernike(img: &GrayImage) -> [f64; 25] {
    zernike_raw(img.as_raw(), img.height() as usize, img.width() as usize)
}

/// The same on a raw buffer (rows x cols, row-major u8).
///
/// Panics if `pixels.len() != rows * cols`.
pub fn zernike_raw(pixels: &[u8], rows: usize, cols: usize) -> [f64; 25] {
    assert_eq!(
        Some(pixels.len()),
        rows.checked_mul(cols),
        "zernike: buffer length does not match {rows} x {cols}"
    );
    let Some((c0, c1)) = center_of_mass(pixels, rows, cols) else {
        return [0.0; 25];
    };
    // Kept pixels as (d, a, v), in mahotas' (row-major) order. Rows farther than 21 from c0
    // cannot pass `d <= 1` (|y| >= 1.05), so only the band around the centre is visited.
    let r_lo = (c0 - (RADIUS + 1.0)).ceil().max(0.0) as usize;
    let r_hi = ((c0 + (RADIUS + 1.0)).floor() as usize).min(rows - 1);
    let c_lo = (c1 - (RADIUS + 1.0)).ceil().max(0.0) as usize;
    let c_hi = ((c1 + (RADIUS + 1.0)).floor() as usize).min(cols - 1);
    let mut kept: Vec<(f64, [f64; 2], f64)> = Vec::with_capacity(1400);
    let mut total = 0.0f64;
    for r in r_lo..=r_hi {
        let y = (r as f64 - c0) / RADIUS;
        let row = &pixels[r * cols..(r + 1) * cols];
        for (c, &v) in row.iter().enumerate().take(c_hi + 1).skip(c_lo) {
            let x = (c as f64 - c1) / RADIUS;
            let d = (x * x + y * y).sqrt().max(1e-9);
            if d <= 1.0 && v > 0 {
                kept.push((d, [x / d, y / d], v as f64));
                // Integer-valued: exact, whatever the summation order numpy uses.
                total += v as f64;
            }
        }
    }
    if kept.is_empty() {
        return [0.0; 25];
    }
    let mut acc = [[0.0f64; 2]; 25];
    for &(d, a, v) in &kept {
        let p = v / total;
        // Powers by squaring (as numpy's integer complex power does): short dependency chains.
        let d2 = d * d;
        let d4 = d2 * d2;
        let d3 = d2 * d;
        let dp = [1.0, d, d2, d3, d4, d4 * d, d3 * d3, d4 * d3, d4 * d4];
        let a2 = cmul(a, a);
        let a4 = cmul(a2, a2);
        let a3 = cmul(a2, a);
        let ap = [
            [1.0, 0.0],
            a,
            a2,
            a3,
            a4,
            cmul(a4, a),
            cmul(a3, a3),
            cmul(a4, a3),
            cmul(a4, a4),
        ];
        // R_nl(d) for all 25 orders from one flat list of terms, each order's terms in
        // mahotas' order (m ascending). Unrolled with constant indices so the 25 sums stay in
        // registers and overlap. mahotas multiplies each term by a^l before summing; summing
        // first differs by rounding only.
        let mut radial = [0.0f64; 25];
        macro_rules! add_terms {
            ($($t:literal)*) => {
                $( radial[TERMS[$t].0 as usize] += TERM_COEFFICIENTS[$t] * dp[TERMS[$t].1 as usize]; )*
            };
        }
        add_terms!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27
            28 29 30 31 32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50 51 52 53 54);
        for (j, &(_, l)) in ORDERS.iter().enumerate() {
            let pr = p * radial[j];
            acc[j][0] += pr * ap[l][0];
            acc[j][1] -= pr * ap[l][1];
        }
    }
    let mut out = [0.0f64; 25];
    for (j, &(n, _)) in ORDERS.iter().enumerate() {
        let s = (n + 1) as f64 / std::f64::consts::PI;
        out[j] = (acc[j][0] * s).hypot(acc[j][1] * s);
    }
    out
}

/// mahotas.center_of_mass(img) as (row, column); `None` where mahotas gives NaN (the pixel
/// sum is 0, including an empty image).
///
/// Panics if `pixels.len() != rows * cols`.
pub fn center_of_mass(pixels: &[u8], rows: usize, cols: usize) -> Option<(f64, f64)> {
    assert_eq!(
        Some(pixels.len()),
        rows.checked_mul(cols),
        "center_of_mass: buffer length does not match {rows} x {cols}"
    );
    if cols == 0 {
        return None;
    }
    // mahotas sums v * index in f64, exact for any realistic image; integer sums give those
    // exact values and cannot overflow (u128).
    let (mut total, mut sr, mut sc) = (0u128, 0u128, 0u128);
    for (r, row) in pixels.chunks_exact(cols).enumerate() {
        // u32 sums over chunks of 4096 columns (v * local column < 2^20, 4096 of them < 2^32)
        // vectorise; the chunk offset is added back in wide integers. Exact, like mahotas'
        // f64 sums on any realistic image, and overflow-free on any image.
        let mut rs = 0u64;
        for (k, chunk) in row.chunks(4096).enumerate() {
            let (mut s, mut sc_local) = (0u32, 0u32);
            for (c, &v) in chunk.iter().enumerate() {
                s += v as u32;
                sc_local += v as u32 * c as u32;
            }
            rs += s as u64;
            sc += sc_local as u128 + (k as u128 * 4096) * s as u128;
        }
        total += rs as u128;
        sr += rs as u128 * r as u128;
    }
    if total == 0 {
        return None;
    }
    let t = total as f64;
    Some((sr as f64 / t, sc as f64 / t))
}

fn cmul(a: [f64; 2], b: [f64; 2]) -> [f64; 2] {
    [a[0] * b[0] - a[1] * b[1], a[0] * b[1] + a[1] * b[0]]
}

/// Number of terms of all 25 radial polynomials together.
const N_TERMS: usize = 55;

/// The terms of the radial polynomials as (index into [`ORDERS`], power of d), order by order,
/// m ascending within an order (power n - 2m descending), as `_zernike.cpp` sums them.
const TERMS: [(u8, u8); N_TERMS] = {
    let mut t = [(0u8, 0u8); N_TERMS];
    let (mut i, mut j) = (0, 0);
    while j < ORDERS.len() {
        let (n, l) = ORDERS[j];
        let mut m = 0;
        while m <= (n - l) / 2 {
            t[i] = (j as u8, (n - 2 * m) as u8);
            i += 1;
            m += 1;
        }
        j += 1;
    }
    assert!(i == N_TERMS);
    t
};

/// The coefficient `g_m = (-1)^m (n-m)! / (m! ((n-2m+l)/2)! ((n-2m-l)/2)!)` of each term of
/// [`TERMS`]. `_zernike.cpp` evaluates it with f64 factorials, which are exact up to 8!, and
/// the quotient is an integer, so integer arithmetic gives the very same values.
const TERM_COEFFICIENTS: [f64; N_TERMS] = {
    const fn fact(k: usize) -> i64 {
        let mut f = 1i64;
        let mut i = 2;
        while i <= k {
            f *= i as i64;
            i += 1;
        }
        f
    }
    let mut g = [0.0f64; N_TERMS];
    let mut i = 0;
    while i < N_TERMS {
        let (n, l) = ORDERS[TERMS[i].0 as usize];
        let m = (n - TERMS[i].1 as usize) / 2;
        let q = fact(n - m) / (fact(m) * fact((n - 2 * m + l) / 2) * fact((n - 2 * m - l) / 2));
        g[i] = if m % 2 == 1 { -q as f64 } else { q as f64 };
        i += 1;
    }
    g
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_and_names_agree() {
        let mut want = Vec::new();
        for n in 0..=DEGREE {
            for l in (0..=n).filter(|l| (n - l) % 2 == 0) {
                want.push((n, l));
            }
        }
        assert_eq!(ORDERS.to_vec(), want);
        for (&(n, l), name) in ORDERS.iter().zip(ZERNIKE_NAMES) {
            assert_eq!(name, format!("n{n}_l{l}"));
        }
    }

    #[test]
    fn radial_polynomials_are_one_at_the_rim() {
        // R_nl(1) = 1 for every (n, l): the coefficients of each polynomial sum to 1.
        let mut sums = [0.0f64; 25];
        for (&(j, _), &g) in TERMS.iter().zip(&TERM_COEFFICIENTS) {
            sums[j as usize] += g;
        }
        assert_eq!(sums, [1.0; 25]);
        // Spot checks: R_40 = 6d^4 - 6d^2 + 1, R_62 = 15d^6 - 20d^4 + 6d^2, R_88 = d^8.
        let terms_of = |j: usize| -> Vec<(u8, f64)> {
            TERMS
                .iter()
                .zip(&TERM_COEFFICIENTS)
                .filter(|((o, _), _)| *o as usize == j)
                .map(|(&(_, k), &g)| (k, g))
                .collect()
        };
        assert_eq!(terms_of(6), vec![(4, 6.0), (2, -6.0), (0, 1.0)]);
        assert_eq!(terms_of(13), vec![(6, 15.0), (4, -20.0), (2, 6.0)]);
        assert_eq!(terms_of(24), vec![(8, 1.0)]);
    }

    #[test]
    fn degenerate_images_give_zeros() {
        assert_eq!(zernike_raw(&[], 0, 0), [0.0; 25]);
        assert_eq!(zernike_raw(&[], 0, 7), [0.0; 25]);
        assert_eq!(zernike_raw(&[], 7, 0), [0.0; 25]);
        assert_eq!(zernike_raw(&[0; 12], 3, 4), [0.0; 25]);
        let mut dots = vec![0u8; 80];
        dots[1] = 9;
        dots[78] = 9;
        assert_eq!(zernike_raw(&dots, 1, 80), [0.0; 25]);
    }

    #[test]
    fn single_pixel_keeps_only_the_l0_moments() {
        // At the centre a = 0, so only a^0 = 1 survives; R_n0(1e-9) is +-1 (alternating).
        let z = zernike_raw(&[7], 1, 1);
        for (j, &(n, l)) in ORDERS.iter().enumerate() {
            let want = if l == 0 {
                (n + 1) as f64 / std::f64::consts::PI
            } else {
                0.0
            };
            assert!(
                (z[j] - want).abs() < 1e-12,
                "{}: {}",
                ZERNIKE_NAMES[j],
                z[j]
            );
        }
    }

    #[test]
    fn centre_of_mass_is_row_then_column() {
        let px = [0, 0, 0, 0, 0, 9];
        assert_eq!(center_of_mass(&px, 2, 3), Some((1.0, 2.0)));
        assert_eq!(center_of_mass(&[0; 6], 2, 3), None);
        // Rows wider than one 4096-column chunk.
        let mut wide = vec![0u8; 2 * 9000];
        wide[9000 + 8191] = 255;
        wide[4500] = 255;
        assert_eq!(
            center_of_mass(&wide, 2, 9000),
            Some((0.5, (4500.0 + 8191.0) / 2.0))
        );
    }
}
