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
//! `tests/fixtures/features/zernike/gen_zernike_fixtures.py` and `tests/features_extra.rs`):
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
//! both, hence an absolute floor in `tests/features_extra.rs`). The centre of mass is
//! bit-identical, and the disc test `d <= 1` uses exactly mahotas' arithmetic, so the same
//! pixels are kept.
//!
//! Cost: one pass over the image for the centre of mass, then only the rows within 21 pixels
//! of it: about 1,260 pixels x 55 polynomial terms whatever the image size.

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
    let coef = radial_coefficients();
    let mut acc = [[0.0f64; 2]; 25];
    for &(d, a, v) in &kept {
        let p = v / total;
        let mut dp = [1.0f64; DEGREE + 1];
        for k in 1..=DEGREE {
            dp[k] = dp[k - 1] * d;
        }
        let mut ap = [[1.0f64, 0.0]; DEGREE + 1];
        ap[1] = a;
        for l in 2..=DEGREE {
            let [pr, pi] = ap[l - 1];
            ap[l] = [pr * a[0] - pi * a[1], pr * a[1] + pi * a[0]];
        }
        for (j, &(n, l)) in ORDERS.iter().enumerate() {
            // mahotas accumulates V_nl = sum_m (g_m d^(n-2m)) a^l term by term, as a complex.
            let (mut vr, mut vi) = (0.0f64, 0.0f64);
            for (m, &g) in coef[j][..=(n - l) / 2].iter().enumerate() {
                let t = g * dp[n - 2 * m];
                vr += t * ap[l][0];
                vi += t * ap[l][1];
            }
            acc[j][0] += p * vr;
            acc[j][1] += p * -vi;
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
        let (mut rs, mut rc) = (0u64, 0u128);
        for (c, &v) in row.iter().enumerate() {
            rs += v as u64;
            rc += v as u128 * c as u128;
        }
        total += rs as u128;
        sr += rs as u128 * r as u128;
        sc += rc;
    }
    if total == 0 {
        return None;
    }
    let t = total as f64;
    Some((sr as f64 / t, sc as f64 / t))
}

/// The radial coefficients `g_m` of each (n, l) in [`ORDERS`], as `_zernike.cpp` computes
/// them (f64 factorials, one division).
fn radial_coefficients() -> [[f64; DEGREE / 2 + 1]; 25] {
    let fact = |k: usize| (1..=k).map(|i| i as f64).product::<f64>();
    let mut g = [[0.0; DEGREE / 2 + 1]; 25];
    for (j, &(n, l)) in ORDERS.iter().enumerate() {
        for (m, gm) in g[j][..=(n - l) / 2].iter_mut().enumerate() {
            let sign = if m % 2 == 1 { -1.0 } else { 1.0 };
            *gm = sign * fact(n - m)
                / (fact(m) * fact((n - 2 * m + l) / 2) * fact((n - 2 * m - l) / 2));
        }
    }
    g
}

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
        for row in radial_coefficients() {
            assert_eq!(row.iter().sum::<f64>(), 1.0);
        }
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
    }
}
