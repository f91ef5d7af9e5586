//! Image-moment features for late fusion (SPEC.md "Extra image features and late fusion").
//!
//! What the reference does (benanne/kaggle-ndsb: `compute_image_moment_stats.py`, the
//! "moments info" assembled in `load.py` `PredictionsWithMomentsDataLoader`, and the Hu moments
//! of `extract_features.py`), re-stated here and followed exactly:
//!
//! * Input: the decoded uint8 image, inverted by the reference's loader `data.uint_to_float`:
//!   `1 - img / float32(255)`. NumPy evaluates that in **float32** (uint8 array / float32
//!   scalar), and the script then widens to float64; [`inverted_values`] reproduces the float32
//!   rounding so the results agree with the reference to the last few ulps, not just to 1e-8.
//! * Moment convention: the reference ran under 2015 scikit-image, whose `moments` /
//!   `moments_central` index `m[p, q] = sum img[r, c] * c^p * r^q`: the FIRST index is the
//!   column power (x), the second the row power (y). (Modern scikit-image swapped this to row
//!   first.) Hence its `x_centroid = m[1,0]/m00` is the column centroid and `y_centroid =
//!   m[0,1]/m00` the row centroid, and `mu20` is the spread along x (columns).
//! * Orientation: `0.5 * atan2(2 mu11, mu20 - mu02)` in degrees, plus 180 when negative, so it
//!   lies in [0, 180). Image y runs down the rows, so 0 is a horizontal (wide) object, 90 a
//!   vertical (tall) one, and angles increase clockwise as displayed.
//! * Axes: `sqrt` of the larger / smaller eigenvalue of `[[mu20, mu11], [mu11, mu02]]` where the
//!   central moments are divided by m00 (a weighted covariance; no factor 2 or 4 as in
//!   regionprops' axis *lengths*).
//! * The 7-value vector (`load.py`): `abs(centroids[:, [1, 0]] - shape / 2)` with centroids
//!   stored as `(x, y)`, so the order is (row offset, column offset) = `|y_c - rows/2|`,
//!   `|x_c - cols/2|`; then `img.shape` = (rows, cols); then angle, minor axis, major axis.
//!   Note `shape / 2`, not `(shape - 1) / 2`: with pixel centres at integer indices a perfectly
//!   centred symmetric object has offset 0.5 along each axis (its centroid is (rows-1)/2,
//!   (cols-1)/2). The reference stored these as float32; we return f64.
//! * Hu moments: the reference used `cv2.HuMoments(cv2.moments(a))` on the same inverted image
//!   (it was computed but not used in the end). OpenCV indexes `nu_pq` x (column) first, like
//!   2015 scikit-image; Hu's seventh invariant changes sign under a reflection, so with modern
//!   scikit-image the equivalent is `moments_hu(moments_normalized(moments_central(a.T, 3), 3))`
//!   (transposed). hu1..hu6 do not depend on this.
//!
//! Degenerate input, where the reference would divide by zero and emit NaN: an all-white image
//! (inverted mass m00 == 0) gives centroid offsets |rows/2 - rows/2| = 0 (centroid taken at
//! shape/2), orientation 0, both axes 0 and all Hu moments 0, so downstream Parquet columns
//! stay finite. A tiny negative minor eigenvalue from rounding (a one-pixel-thin line) is
//! clamped to 0 before the square root.

use image::GrayImage;

/// Parquet column names of [`moment_info`], in its order.
pub const MOMENT_INFO_NAMES: [&str; 7] = [
    "centroid_offset_row",
    "centroid_offset_col",
    "image_rows",
    "image_cols",
    "orientation_deg",
    "minor_axis",
    "major_axis",
];

/// Parquet column names of [`hu_moments`].
pub const HU_NAMES: [&str; 7] = ["hu1", "hu2", "hu3", "hu4", "hu5", "hu6", "hu7"];

/// The reference loader's inversion `1 - v / 255`, evaluated in float32 as NumPy does for
/// `1 - (uint8_array / np.float32(255.0))`, widened to f64. Row-major, `rows x cols`.
pub fn inverted_values(img: &GrayImage) -> Vec<f64> {
    img.as_raw()
        .iter()
        .map(|&v| f64::from(1.0f32 - (f32::from(v) / 255.0f32)))
        .collect()
}

/// Moments `m[p][q] = sum v * (c - x0)^p * (r - y0)^q` for p, q <= 3 (c = column, r = row).
fn moments_about(values: &[f64], rows: usize, cols: usize, x0: f64, y0: f64) -> [[f64; 4]; 4] {
    assert_eq!(
        values.len(),
        rows * cols,
        "moments: {} values for a {rows} x {cols} image",
        values.len()
    );
    let mut m = [[0.0f64; 4]; 4];
    if cols == 0 {
        return m;
    }
    let dx: Vec<f64> = (0..cols).map(|c| c as f64 - x0).collect();
    for (r, row) in values.chunks_exact(cols).enumerate() {
        // Per-row sums of v * dx^p, then weighted by dy^q.
        let mut s = [0.0f64; 4];
        for (&v, &x) in row.iter().zip(&dx) {
            let x2 = x * x;
            s[0] += v;
            s[1] += v * x;
            s[2] += v * x2;
            s[3] += v * x2 * x;
        }
        let y = r as f64 - y0;
        let yq = [1.0, y, y * y, y * y * y];
        for (p, &sp) in s.iter().enumerate() {
            for (q, &yv) in yq.iter().enumerate() {
                m[p][q] += sp * yv;
            }
        }
    }
    m
}

/// Raw moments `m[p][q] = sum v * x^p * y^q` (p, q <= 3) of an image given as `values`
/// (rows x cols, row-major), with x = column index and y = row index: the FIRST index is the
/// column power, as 2015 scikit-image `measure.moments` (and OpenCV's `m_pq`) used; modern
/// scikit-image's `moments(a.T, order=3)` gives the same array.
///
/// # Panics
/// If `values.len() != rows * cols`.
pub fn raw_moments(values: &[f64], rows: usize, cols: usize) -> [[f64; 4]; 4] {
    moments_about(values, rows, cols, 0.0, 0.0)
}

/// Central moments `mu[p][q]` (x = column first) about the intensity centroid, plus m00 and the
/// centroid `(x_c, y_c)`. `None` when the total mass is not positive.
fn central_moments(values: &[f64], rows: usize, cols: usize) -> Option<([[f64; 4]; 4], f64, f64)> {
    let m = raw_moments(values, rows, cols);
    let m00 = m[0][0];
    if m00.is_nan() || m00 <= 0.0 {
        return None;
    }
    let xc = m[1][0] / m00;
    let yc = m[0][1] / m00;
    Some((moments_about(values, rows, cols, xc, yc), xc, yc))
}

/// The 7-value info of `values` (already inverted); see [`moment_info`].
fn moment_info_values(values: &[f64], rows: usize, cols: usize) -> [f64; 7] {
    let (r, c) = (rows as f64, cols as f64);
    let Some((mc, xc, yc)) = central_moments(values, rows, cols) else {
        return [0.0, 0.0, r, c, 0.0, 0.0, 0.0];
    };
    let m00 = mc[0][0];
    let (mu20, mu02, mu11) = (mc[2][0] / m00, mc[0][2] / m00, mc[1][1] / m00);
    let mut angle = (0.5 * (2.0 * mu11).atan2(mu20 - mu02)).to_degrees();
    if angle < 0.0 {
        angle += 180.0;
    }
    // Eigenvalues of the symmetric 2x2 [[mu20, mu11], [mu11, mu02]].
    let mean = 0.5 * (mu20 + mu02);
    let half = (0.5 * (mu20 - mu02)).hypot(mu11);
    let major_sq = mean + half;
    // The smaller one as det / larger (as LAPACK's 2x2 symmetric solver does): no
    // cancellation for elongated objects.
    let det = mu20 * mu02 - mu11 * mu11;
    let minor_sq = if major_sq > 0.0 { det / major_sq } else { 0.0 };
    [
        (yc - r / 2.0).abs(),
        (xc - c / 2.0).abs(),
        r,
        c,
        angle,
        minor_sq.max(0.0).sqrt(),
        major_sq.max(0.0).sqrt(),
    ]
}

/// The reference's 7-value "moments info" of one image (`compute_image_moment_stats.py` +
/// `load.py`), computed on the inverted image `1 - v/255` (float32 as the reference's loader):
///
/// `[|y_c - rows/2|, |x_c - cols/2|, rows, cols, orientation_deg, minor_axis, major_axis]`
///
/// where `(x_c, y_c)` = (column, row) intensity centroid from the first-order raw moments;
/// the row offset comes FIRST (the reference swaps its stored `(x, y)` centroid to `(y, x)`
/// before subtracting `img.shape / 2`); orientation = `0.5 * atan2(2 mu11, mu20 - mu02)` in
/// degrees, mapped into [0, 180) by adding 180 to negatives (0 = horizontal, 90 = vertical);
/// axes = sqrt of the eigenvalues of `[[mu20, mu11], [mu11, mu02]] / m00` (x = column first).
/// See the module docs for the conventions and the blank-image fallback.
pub fn moment_info(img: &GrayImage) -> [f64; 7] {
    let values = inverted_values(img);
    moment_info_values(&values, img.height() as usize, img.width() as usize)
}

/// Hu's invariants from normalised central moments `nu[p][q]` (x first).
fn hu_from_nu(nu: &[[f64; 4]; 4]) -> [f64; 7] {
    let (n20, n02, n11) = (nu[2][0], nu[0][2], nu[1][1]);
    let (n30, n03, n21, n12) = (nu[3][0], nu[0][3], nu[2][1], nu[1][2]);
    let t0 = n30 + n12;
    let t1 = n21 + n03;
    let q0 = t0 * t0;
    let q1 = t1 * t1;
    let a = n30 - 3.0 * n12;
    let b = 3.0 * n21 - n03;
    [
        n20 + n02,
        (n20 - n02) * (n20 - n02) + 4.0 * n11 * n11,
        a * a + b * b,
        q0 + q1,
        a * t0 * (q0 - 3.0 * q1) + b * t1 * (3.0 * q0 - q1),
        (n20 - n02) * (q0 - q1) + 4.0 * n11 * t0 * t1,
        b * t0 * (q0 - 3.0 * q1) - a * t1 * (3.0 * q0 - q1),
    ]
}

/// Hu moments of already-inverted `values`; see [`hu_moments`].
fn hu_values(values: &[f64], rows: usize, cols: usize) -> [f64; 7] {
    let Some((mu, _, _)) = central_moments(values, rows, cols) else {
        return [0.0; 7];
    };
    let m00 = mu[0][0];
    let mut nu = [[0.0f64; 4]; 4];
    for p in 0..4 {
        for q in 0..4 {
            if p + q >= 2 {
                nu[p][q] = mu[p][q] / m00.powf((p + q) as f64 / 2.0 + 1.0);
            }
        }
    }
    hu_from_nu(&nu)
}

/// Hu's 7 invariant moments of the inverted image (float32 `1 - v/255` as [`moment_info`]),
/// as the reference's `cv2.HuMoments(cv2.moments(a))`: normalised central moments
/// `nu_pq = mu_pq / m00^((p+q)/2 + 1)` indexed x (column) first, then Hu's formulas. Equal to
/// scikit-image's `moments_hu(moments_normalized(moments_central(a.T, order=3), order=3))`;
/// without the transpose hu7 has the opposite sign. All zeros for a blank (all-255) image.
pub fn hu_moments(img: &GrayImage) -> [f64; 7] {
    let values = inverted_values(img);
    hu_values(&values, img.height() as usize, img.width() as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Relative + absolute closeness.
    fn close(a: f64, b: f64, rel: f64, abs: f64) -> bool {
        (a - b).abs() <= rel * a.abs().max(b.abs()) + abs
    }

    /// A uint8 image that is 0 (inverted: 1) where `inside(row, col)` and 255 elsewhere.
    fn mask_image(rows: u32, cols: u32, inside: impl Fn(f64, f64) -> bool) -> GrayImage {
        GrayImage::from_fn(cols, rows, |c, r| {
            image::Luma([if inside(r as f64, c as f64) { 0 } else { 255 }])
        })
    }

    #[test]
    fn inversion_matches_numpy_float32() {
        let img = GrayImage::from_raw(3, 1, vec![0, 255, 7]).unwrap();
        let v = inverted_values(&img);
        assert_eq!(v[0], 1.0);
        assert_eq!(v[1], 0.0);
        // float32(1 - float32(7 / 255)), not the f64 value.
        assert_eq!(v[2], f64::from(1.0f32 - 7.0f32 / 255.0f32));
        assert_ne!(v[2], 1.0 - 7.0 / 255.0);
    }

    #[test]
    fn raw_moments_x_is_column() {
        // One unit of mass at row 2, column 5 of a 4 x 7 image.
        let mut v = vec![0.0; 4 * 7];
        v[2 * 7 + 5] = 1.0;
        let m = raw_moments(&v, 4, 7);
        for (p, row) in m.iter().enumerate() {
            for (q, &v) in row.iter().enumerate() {
                assert_eq!(v, 5f64.powi(p as i32) * 2f64.powi(q as i32), "m[{p}][{q}]");
            }
        }
    }

    #[test]
    fn centred_symmetric_blob_has_half_pixel_offset() {
        // Disc centred on the pixel grid's centre: the centroid is ((rows-1)/2, (cols-1)/2),
        // so |centroid - shape/2| is exactly 0.5 along each axis (reference's shape/2).
        for (rows, cols) in [(41u32, 41u32), (40, 60), (33, 50)] {
            let (cy, cx) = ((rows - 1) as f64 / 2.0, (cols - 1) as f64 / 2.0);
            let img = mask_image(rows, cols, |r, c| {
                (r - cy).powi(2) + (c - cx).powi(2) <= 81.0
            });
            let info = moment_info(&img);
            assert!((info[0] - 0.5).abs() < 1e-12, "{info:?}");
            assert!((info[1] - 0.5).abs() < 1e-12, "{info:?}");
            assert_eq!((info[2], info[3]), (rows as f64, cols as f64));
            // A disc whose pixel set is symmetric under transposition (centre on the same
            // kind of grid point along both axes): equal axes.
            if rows % 2 == cols % 2 {
                assert!(close(info[5], info[6], 1e-9, 0.0), "{info:?}");
            }
        }
        // Shifted blob: offsets are the shift (row first).
        let img = mask_image(40, 60, |r, c| {
            (r - 25.5).powi(2) + (c - 19.5).powi(2) <= 36.0
        });
        let info = moment_info(&img);
        assert!(
            (info[0] - 5.5).abs() < 1e-12 && (info[1] - 10.5).abs() < 1e-12,
            "{info:?}"
        );
    }

    #[test]
    fn bar_orientation() {
        // Horizontal bar (wide): 0 degrees.
        let h = moment_info(&mask_image(30, 50, |r, c| {
            (13.0..=16.0).contains(&r) && (5.0..=44.0).contains(&c)
        }));
        assert!(h[4].abs() < 1e-9 || (h[4] - 180.0).abs() < 1e-9, "{h:?}");
        assert!(h[6] > h[5]);
        // Vertical bar (tall): 90 degrees.
        let v = moment_info(&mask_image(50, 30, |r, c| {
            (5.0..=44.0).contains(&r) && (13.0..=16.0).contains(&c)
        }));
        assert!((v[4] - 90.0).abs() < 1e-9, "{v:?}");
        assert!(close(h[5], v[5], 1e-12, 0.0) && close(h[6], v[6], 1e-12, 0.0));
        // Diagonal r == c (down-right as displayed, y down): +45; anti-diagonal: 135.
        let d = moment_info(&mask_image(40, 40, |r, c| (r - c).abs() <= 1.0));
        assert!((d[4] - 45.0).abs() < 1e-9, "{d:?}");
        let a = moment_info(&mask_image(40, 40, |r, c| (r + c - 39.0).abs() <= 1.0));
        assert!((a[4] - 135.0).abs() < 1e-9, "{a:?}");
        // Always within [0, 180).
        for info in [h, v, d, a] {
            assert!((0.0..180.0).contains(&info[4]));
        }
    }

    #[test]
    fn ellipse_axes_scale_with_semi_axes() {
        // A filled ellipse with semi-axes (a, b) has variances a^2/4 and b^2/4, so the axes
        // returned (sqrt of the eigenvalues) are a/2 and b/2, up to pixelisation.
        let ellipse = |a: f64, b: f64, rows: u32, cols: u32| {
            let (cy, cx) = ((rows - 1) as f64 / 2.0, (cols - 1) as f64 / 2.0);
            moment_info(&mask_image(rows, cols, |r, c| {
                ((c - cx) / a).powi(2) + ((r - cy) / b).powi(2) <= 1.0
            }))
        };
        let e1 = ellipse(60.0, 25.0, 101, 161);
        assert!((e1[6] / 30.0 - 1.0).abs() < 0.01, "{e1:?}");
        assert!((e1[5] / 12.5 - 1.0).abs() < 0.02, "{e1:?}");
        assert!(e1[4].abs() < 1e-9 || (e1[4] - 180.0).abs() < 1e-9);
        // Doubling both semi-axes doubles both axes.
        let e2 = ellipse(120.0, 50.0, 201, 321);
        assert!((e2[6] / e1[6] - 2.0).abs() < 0.01 && (e2[5] / e1[5] - 2.0).abs() < 0.02);
        // Tall ellipse: orientation 90, same axes.
        let t = ellipse(25.0, 60.0, 161, 101);
        assert!((t[4] - 90.0).abs() < 1e-9, "{t:?}");
        assert!(close(t[6], e1[6], 1e-12, 0.0) && close(t[5], e1[5], 1e-12, 0.0));
    }

    #[test]
    fn hu_matches_scikit_image_docstring_example() {
        // skimage.measure.moments_hu docstring: 20x20 zeros, [13:17, 13:17] = 0.5,
        // [10:12, 10:12] = 1 -> round(hu, 4) = [0.7454, 0.3512, 0.104, 0.0406, 0.0026, 0.0241, 0].
        let mut v = vec![0.0; 400];
        for r in 13..17 {
            for c in 13..17 {
                v[r * 20 + c] = 0.5;
            }
        }
        for r in 10..12 {
            for c in 10..12 {
                v[r * 20 + c] = 1.0;
            }
        }
        let hu = hu_values(&v, 20, 20);
        let want = [0.7454, 0.3512, 0.104, 0.0406, 0.0026, 0.0241, 0.0];
        for (h, w) in hu.iter().zip(want) {
            assert!((h - w).abs() <= 5e-5, "{hu:?}");
        }
    }

    #[test]
    fn hu_invariant_under_rotate90_and_hu7_flips_under_transpose() {
        // An asymmetric shape so that every invariant is non-trivial.
        let img = mask_image(45, 60, |r, c| {
            ((c - 25.0) / 18.0).powi(2) + ((r - 20.0) / 9.0).powi(2) <= 1.0
                || ((c - 44.0).abs() <= 4.0 && (8.0..=38.0).contains(&r))
                || ((r - 33.0).powi(2) + (c - 12.0).powi(2) <= 16.0)
        });
        let hu = hu_moments(&img);
        let rot = hu_moments(&image::imageops::rotate90(&img));
        for i in 0..7 {
            assert!(
                close(hu[i], rot[i], 1e-6, 1e-18),
                "hu{}: {} vs {}",
                i + 1,
                hu[i],
                rot[i]
            );
        }
        assert!(hu[6].abs() > 1e-12, "{hu:?}");
        // Transpose = reflection: hu1..hu6 equal, hu7 negated.
        let (w, h) = img.dimensions();
        let tr = GrayImage::from_fn(h, w, |c, r| *img.get_pixel(r, c));
        let t = hu_moments(&tr);
        for i in 0..6 {
            assert!(close(hu[i], t[i], 1e-9, 1e-18));
        }
        assert!(close(hu[6], -t[6], 1e-9, 1e-18));
    }

    #[test]
    fn blank_image_is_finite() {
        let img = GrayImage::from_pixel(10, 7, image::Luma([255]));
        assert_eq!(moment_info(&img), [0.0, 0.0, 7.0, 10.0, 0.0, 0.0, 0.0]);
        assert_eq!(hu_moments(&img), [0.0; 7]);
        let empty = GrayImage::new(0, 0);
        assert!(moment_info(&empty).iter().all(|v| v.is_finite()));
        assert_eq!(hu_moments(&empty), [0.0; 7]);
    }

    #[test]
    fn names() {
        assert_eq!(MOMENT_INFO_NAMES.len(), 7);
        assert_eq!(HU_NAMES[0], "hu1");
        assert_eq!(HU_NAMES[6], "hu7");
    }
}
