//! Minimal NumPy `.npy` (format 1.0) reader/writer for the dtypes the project exchanges with
//! Python: `|u1`, `<f4`, `<f8`, C order.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a supported .npy file: {reason}")]
    Format { path: PathBuf, reason: String },
}

/// An array read from a `.npy` file, converted to f64.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    pub shape: Vec<usize>,
    pub dtype: String,
    pub data: Vec<f64>,
}

fn header(dtype: &str, shape: &[usize]) -> Vec<u8> {
    let shape_txt = match shape {
        [n] => format!("({n},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut dict =
        format!("{{'descr': '{dtype}', 'fortran_order': False, 'shape': {shape_txt}, }}");
    // Magic (6) + version (2) + length (2) + dict + newline must be a multiple of 64.
    let total = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat((64 - total % 64) % 64));
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

/// Writes a C-order float32 array.
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<(), NpyError> {
    assert_eq!(
        shape.iter().product::<usize>(),
        data.len(),
        "npy: shape does not match data"
    );
    let mut bytes = header("<f4", shape);
    bytes.reserve(data.len() * 4);
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, bytes).map_err(|source| NpyError::Io {
        path: path.to_path_buf(),
        source,
    })
}

pub fn read(path: &Path) -> Result<NpyArray, NpyError> {
    let bytes = std::fs::read(path).map_err(|source| NpyError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |reason: &str| NpyError::Format {
        path: path.to_path_buf(),
        reason: reason.into(),
    };
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("missing magic"));
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        _ => return Err(bad("unknown version")),
    };
    let dict = std::str::from_utf8(
        bytes
            .get(start..start + hlen)
            .ok_or_else(|| bad("short header"))?,
    )
    .map_err(|_| bad("header not UTF-8"))?;
    let field = |key: &str| -> Option<&str> {
        let i = dict.find(&format!("'{key}':"))? + key.len() + 3;
        Some(dict[i..].trim_start())
    };
    let descr = field("descr")
        .and_then(|s| s.strip_prefix('\''))
        .and_then(|s| s.split('\'').next())
        .ok_or_else(|| bad("no descr"))?;
    if field("fortran_order").is_some_and(|s| s.starts_with("True")) {
        return Err(bad("Fortran order"));
    }
    let shape_txt = field("shape")
        .and_then(|s| s.strip_prefix('('))
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad("no shape"))?;
    let shape: Vec<usize> = shape_txt
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| bad("bad shape")))
        .collect::<Result<_, _>>()?;
    let n: usize = shape.iter().product();
    let body = &bytes[start + hlen..];
    let data: Vec<f64> = match descr {
        "|u1" => body
            .get(..n)
            .ok_or_else(|| bad("short data"))?
            .iter()
            .map(|&b| b as f64)
            .collect(),
        "<f4" => body
            .get(..n * 4)
            .ok_or_else(|| bad("short data"))?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        "<f8" => body
            .get(..n * 8)
            .ok_or_else(|| bad("short data"))?
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        other => return Err(bad(&format!("dtype {other} not supported"))),
    };
    Ok(NpyArray {
        shape,
        dtype: descr.to_string(),
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_roundtrip() {
        let p = std::env::temp_dir().join(format!("npy-{}.npy", std::process::id()));
        write_f32(&p, &[2, 3], &[1.0, 2.5, -3.0, 4.0, 5.0, 6.25]).unwrap();
        let a = read(&p).unwrap();
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.data, vec![1.0, 2.5, -3.0, 4.0, 5.0, 6.25]);
        let raw = std::fs::read(&p).unwrap();
        assert_eq!((raw.len() - 24) % 64, 0, "header padded to 64 bytes");
    }
}
