//! Decode stage: file bytes -> 8-bit grayscale, with limits against decompression bombs.
//!
//! Any format the `image` crate decodes is accepted. Colour images are reduced to luma with the
//! Rec. 709 weights (what scikit-image's `rgb2gray`, used by the reference loader, applies);
//! the competition images are single-channel already.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{GrayImage, ImageFormat, ImageReader, Limits};
use serde::{Deserialize, Serialize};

/// Limits applied before and during decoding.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecodeLimits {
    /// Files larger than this are refused without being read.
    pub max_bytes: u64,
    /// Images whose header declares more pixels than this are refused before decoding.
    pub max_pixels: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        // Plankton crops are at most a few hundred pixels a side; 16 Mpx leaves ample room for
        // other instruments while refusing the classic 50k x 50k bomb.
        DecodeLimits {
            max_bytes: 64 << 20,
            max_pixels: 16 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("{path}: cannot read file: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: empty file (0 bytes)")]
    Empty { path: PathBuf },
    #[error("{path}: not a regular file (a pipe, socket or device): not read")]
    NotAFile { path: PathBuf },
    #[error("{path}: file is {size} bytes, over the limit of {limit} bytes")]
    TooManyBytes {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("{path}: not an image (format not recognised)")]
    NotAnImage { path: PathBuf },
    #[error("{path}: {width}x{height} pixels exceeds the limit of {limit} pixels (decompression-bomb guard)")]
    TooManyPixels {
        path: PathBuf,
        width: u32,
        height: u32,
        limit: u64,
    },
    #[error("{path}: corrupt or truncated image: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: IFCB ROI: {reason}")]
    BadRoi { path: PathBuf, reason: String },
}

impl DecodeError {
    /// A short, low-cardinality reason for metrics labels and quarantine reports.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Io { .. } => "io",
            DecodeError::Empty { .. } => "empty",
            DecodeError::NotAFile { .. } => "not_a_file",
            DecodeError::TooManyBytes { .. } => "too_many_bytes",
            DecodeError::NotAnImage { .. } => "not_an_image",
            DecodeError::TooManyPixels { .. } => "too_many_pixels",
            DecodeError::Corrupt { .. } => "corrupt",
            DecodeError::BadRoi { .. } => "bad_roi",
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            DecodeError::Io { path, .. }
            | DecodeError::Empty { path }
            | DecodeError::NotAFile { path }
            | DecodeError::TooManyBytes { path, .. }
            | DecodeError::NotAnImage { path }
            | DecodeError::TooManyPixels { path, .. }
            | DecodeError::Corrupt { path, .. }
            | DecodeError::BadRoi { path, .. } => path,
        }
    }
}

/// Reads and decodes one file. A path that names an IFCB ROI (`<bin folder>/<roi pid>`, see
/// [`crate::ifcb::Bin::roi_path`]) is read from its bin.
pub fn decode_file(path: &Path, limits: &DecodeLimits) -> Result<GrayImage, DecodeError> {
    let io = |source| DecodeError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return match crate::ifcb::read_roi(path, limits.max_pixels) {
                Some(roi) => roi.map_err(|reason| DecodeError::BadRoi {
                    path: path.to_path_buf(),
                    reason,
                }),
                None => Err(io(e)),
            }
        }
        other => other.map_err(io)?,
    };
    // Opening a FIFO with no writer blocks forever; a device could be endless.
    if !meta.is_file() {
        return Err(DecodeError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let size = meta.len();
    if size > limits.max_bytes {
        return Err(DecodeError::TooManyBytes {
            path: path.to_path_buf(),
            size,
            limit: limits.max_bytes,
        });
    }
    let bytes = std::fs::read(path).map_err(io)?;
    decode_bytes(&bytes, path, limits)
}

/// Decodes bytes already in memory; `path` only names the item in errors.
pub fn decode_bytes(
    bytes: &[u8],
    path: &Path,
    limits: &DecodeLimits,
) -> Result<GrayImage, DecodeError> {
    let p = || path.to_path_buf();
    if bytes.is_empty() {
        return Err(DecodeError::Empty { path: p() });
    }
    if bytes.len() as u64 > limits.max_bytes {
        return Err(DecodeError::TooManyBytes {
            path: p(),
            size: bytes.len() as u64,
            limit: limits.max_bytes,
        });
    }
    let format = image::guess_format(bytes).map_err(|_| DecodeError::NotAnImage { path: p() })?;
    // Decoders' messages may end in (or hold) newlines: one line for logs and the `error` column.
    let corrupt = |reason: String| DecodeError::Corrupt {
        path: p(),
        reason: reason.split_whitespace().collect::<Vec<_>>().join(" "),
    };
    let header = ImageReader::with_format(Cursor::new(bytes), format);
    let (width, height) = header
        .into_dimensions()
        .map_err(|e| corrupt(e.to_string()))?;
    if width as u64 * height as u64 > limits.max_pixels {
        return Err(DecodeError::TooManyPixels {
            path: p(),
            width,
            height,
            limit: limits.max_pixels,
        });
    }
    if width == 0 || height == 0 {
        return Err(corrupt(format!("{width}x{height} image has no pixels")));
    }
    if format == ImageFormat::Jpeg && !jpeg_has_end_marker(bytes) {
        // The JPEG decoder pads a truncated scan with grey instead of failing; a crop that lost
        // its tail would silently train the model on half an organism.
        return Err(corrupt(
            "JPEG ends before its end-of-image marker (truncated)".into(),
        ));
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut decode_limits = Limits::default();
    decode_limits.max_image_width = Some(width);
    decode_limits.max_image_height = Some(height);
    decode_limits.max_alloc = Some(limits.max_pixels.saturating_mul(16).max(1 << 20));
    reader.limits(decode_limits);
    let img = reader.decode().map_err(|e| corrupt(e.to_string()))?;
    Ok(img.into_luma8())
}

/// True when the JPEG's last marker (ignoring trailing padding) is EOI (FF D9).
fn jpeg_has_end_marker(bytes: &[u8]) -> bool {
    let tail = &bytes[bytes.len().saturating_sub(64)..];
    tail.windows(2).any(|w| w == [0xFF, 0xD9])
}

#[cfg(test)]
mod tests {

    /// A FIFO in an image folder (nothing will ever write to it) is refused at once instead of
    /// blocking the reader forever.
    #[test]
    fn a_fifo_is_refused_without_being_opened() {
        let dir = std::env::temp_dir().join(format!("plankton-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("frame.jpg");
        let _ = std::fs::remove_file(&fifo);
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let e = decode_file(&fifo, &DecodeLimits::default()).unwrap_err();
        assert_eq!(e.kind(), "not_a_file", "{e}");
        assert!(e.to_string().contains("frame.jpg"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    use super::*;

    fn png_bytes(w: u32, h: u32) -> Vec<u8> {
        let img = GrayImage::from_fn(w, h, |x, y| image::Luma([(x * 7 + y * 3) as u8]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    fn jpeg_bytes(w: u32, h: u32) -> Vec<u8> {
        let img = GrayImage::from_fn(w, h, |x, y| image::Luma([((x * 5) ^ (y * 3)) as u8]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Jpeg).unwrap();
        out.into_inner()
    }

    #[test]
    fn decodes_png_to_gray() {
        let img = decode_bytes(
            &png_bytes(13, 7),
            Path::new("a.png"),
            &DecodeLimits::default(),
        )
        .unwrap();
        assert_eq!(img.dimensions(), (13, 7));
        assert_eq!(img.get_pixel(2, 1).0[0], 17);
    }

    #[test]
    fn refuses_bombs_from_the_header() {
        let limits = DecodeLimits {
            max_pixels: 50,
            ..Default::default()
        };
        let err = decode_bytes(&png_bytes(13, 7), Path::new("bomb.png"), &limits).unwrap_err();
        assert_eq!(err.kind(), "too_many_pixels");
        assert!(err.to_string().contains("bomb.png"), "{err}");
    }

    #[test]
    fn classifies_bad_bytes() {
        let l = DecodeLimits::default();
        assert_eq!(
            decode_bytes(b"", Path::new("z"), &l).unwrap_err().kind(),
            "empty"
        );
        assert_eq!(
            decode_bytes(b"hello world, not an image", Path::new("t.txt"), &l)
                .unwrap_err()
                .kind(),
            "not_an_image"
        );
        let jpg = jpeg_bytes(40, 40);
        assert!(decode_bytes(&jpg, Path::new("ok.jpg"), &l).is_ok());
        let png = png_bytes(40, 40);
        for (name, cut) in [
            ("cut.jpg", &jpg[..jpg.len() / 2]),
            ("head.jpg", &jpg[..40]),
            ("cut.png", &png[..png.len() / 2]),
        ] {
            let err = decode_bytes(cut, Path::new(name), &l).unwrap_err();
            assert_eq!(err.kind(), "corrupt", "{name}");
            // One line: it goes into log lines and the predictions' `error` column.
            let text = err.to_string();
            assert!(
                !text.contains('\n') && text == text.trim(),
                "{name}: {text:?}"
            );
        }
    }
}
