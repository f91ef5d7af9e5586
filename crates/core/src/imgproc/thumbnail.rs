//! Anti-aliased downscaling for pictures people look at (preview originals, exports).
//!
//! Sampling a large image at a few points per output pixel (nearest neighbour, or bilinear far
//! below half size) aliases: fine stripes turn into coarse false patterns or vanish. An area
//! (box) filter averages every source pixel under an output pixel instead. fast_image_resize
//! does this with SIMD. The model's own path keeps the reference's single bilinear warp.
use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::GrayImage;

/// `img` shrunk (or stretched) to `width x height` with an area filter: each output pixel is the
/// mean of the source pixels it covers. Sizes of 0 are raised to 1.
pub fn area_resize(img: &GrayImage, width: u32, height: u32) -> GrayImage {
    let (width, height) = (width.max(1), height.max(1));
    let (w, h) = img.dimensions();
    if (w, h) == (width, height) || w == 0 || h == 0 {
        return img.clone();
    }
    let src = Image::from_vec_u8(w, h, img.as_raw().clone(), PixelType::U8)
        .expect("a GrayImage's buffer is w * h bytes");
    let mut dst = Image::new(width, height, PixelType::U8);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Box));
    Resizer::new()
        .resize(&src, &mut dst, &options)
        .expect("same pixel type, non-empty images");
    GrayImage::from_raw(width, height, dst.into_vec()).expect("width * height bytes")
}

/// `img` scaled to fit a `side x side` square, aspect kept; never enlarged.
pub fn thumbnail(img: &GrayImage, side: u32) -> GrayImage {
    let (w, h) = img.dimensions();
    let scale = (side as f64 / w.max(h).max(1) as f64).min(1.0);
    let (tw, th) = (
        (w as f64 * scale).round() as u32,
        (h as f64 * scale).round() as u32,
    );
    area_resize(img, tw, th)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mean of each `f x f` block: what an area filter gives for an integer factor.
    fn block_means(img: &GrayImage, f: u32) -> Vec<f64> {
        let (w, h) = img.dimensions();
        let mut out = Vec::new();
        for by in 0..h / f {
            for bx in 0..w / f {
                let mut sum = 0.0;
                for y in by * f..(by + 1) * f {
                    for x in bx * f..(bx + 1) * f {
                        sum += img.get_pixel(x, y).0[0] as f64;
                    }
                }
                out.push(sum / (f * f) as f64);
            }
        }
        out
    }

    #[test]
    fn an_integer_factor_gives_the_block_means() {
        // A smooth gradient plus a pseudo-random texture, 256 x 192 -> 32 x 24 (factor 8).
        let img = GrayImage::from_fn(256, 192, |x, y| {
            let noise = (x * 7919 + y * 104_729) % 61;
            image::Luma([((x + y) / 2 % 200 + noise) as u8])
        });
        let small = area_resize(&img, 32, 24);
        assert_eq!(small.dimensions(), (32, 24));
        for (got, want) in small.as_raw().iter().zip(block_means(&img, 8)) {
            assert!(
                (*got as f64 - want).abs() <= 1.0,
                "{got} vs block mean {want}"
            );
        }
    }

    #[test]
    fn fine_stripes_average_to_grey_instead_of_aliasing() {
        // One-pixel black/white columns: every sample-based shrink by an even factor sees one
        // colour only; an area filter sees both.
        let img = GrayImage::from_fn(4096, 64, |x, _| {
            image::Luma([if x % 2 == 0 { 0 } else { 255 }])
        });
        let thumb = thumbnail(&img, 128);
        assert_eq!(thumb.dimensions(), (128, 2));
        for v in thumb.as_raw() {
            assert!((120..=135).contains(v), "{v}: aliased");
        }
    }

    #[test]
    fn thumbnails_keep_the_aspect_and_never_enlarge() {
        let img = GrayImage::from_pixel(300, 100, image::Luma([77]));
        let t = thumbnail(&img, 150);
        assert_eq!(t.dimensions(), (150, 50));
        assert!(t.as_raw().iter().all(|&v| v == 77));
        let small = GrayImage::from_pixel(40, 20, image::Luma([9]));
        assert_eq!(thumbnail(&small, 150).dimensions(), (40, 20));
    }
}
