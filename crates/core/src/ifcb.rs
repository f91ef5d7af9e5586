//! IFCB "bins": what an Imaging FlowCytobot writes, three files per sample run:
//! `<bin>.hdr` (settings, `key: value` lines), `<bin>.adc` (one CSV row per trigger) and
//! `<bin>.roi` (the regions of interest, raw 8-bit grey, back to back). Two generations:
//!
//! | pid | ADC columns |
//! |---|---|
//! | `DYYYYMMDDTHHMMSS_IFCBnnn` | named by the header's `ADCFileFormat` line (`ROIx, ROIy, ROIwidth, ROIheight, start_byte`) |
//! | `IFCBn_YYYY_DDD_HHMMSS` | fixed: x, y, width, height, start byte in columns 10-14 (1-based) |
//!
//! A ROI is `height` rows of `width` bytes at `start_byte` of the .roi file; triggers without
//! an image (width or height 0) are skipped; a ROI's id is the standard IFCB pid,
//! `<bin>_<5-digit ADC row number>`. A bin is read whole or refused: a row pointing past the
//! end of its .roi file (a truncated or half-written bin), a missing file of the three or a
//! header that names no ADC columns refuse the bin with the reason.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum IfcbError {
    #[error("{path}: {reason}")]
    Bin { path: PathBuf, reason: String },
}

fn bad(path: &Path, reason: impl Into<String>) -> IfcbError {
    IfcbError::Bin {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// No ROI is larger than this: an IFCB camera frame is 1380 x 1034 pixels (1.4 Mpx); a bigger
/// ROI is a corrupt ADC row, refused before anything is read (a sparse .roi can claim gigabytes).
pub const MAX_ROI_PIXELS: u64 = 16 << 20;

/// Which instrument generation wrote a bin (from its pid).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generation {
    /// `IFCBn_YYYY_DDD_HHMMSS`: fixed ADC columns.
    Old,
    /// `DYYYYMMDDTHHMMSS_IFCBnnn`: the header names the ADC columns.
    Current,
}

/// The generation of a bin pid, or None when `pid` is not one.
pub fn generation(pid: &str) -> Option<Generation> {
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = pid.strip_prefix('D') {
        let (stamp, inst) = rest.split_once("_IFCB")?;
        let (date, time) = stamp.split_once('T')?;
        return (digits(date, 8)
            && digits(time, 6)
            && !inst.is_empty()
            && digits(inst, inst.len()))
        .then_some(Generation::Current);
    }
    let rest = pid.strip_prefix("IFCB")?;
    let parts: Vec<&str> = rest.split('_').collect();
    (parts.len() == 4
        && !parts[0].is_empty()
        && digits(parts[0], parts[0].len())
        && digits(parts[1], 4)
        && digits(parts[2], 3)
        && digits(parts[3], 6))
    .then_some(Generation::Old)
}

/// One image of a bin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roi {
    /// The 1-based ADC row number (the pid's last part).
    pub number: u32,
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
    pub start_byte: u64,
}

/// A bin, its ROIs checked against its .roi file.
#[derive(Debug, Clone)]
pub struct Bin {
    pub pid: String,
    pub generation: Generation,
    pub hdr: PathBuf,
    pub adc: PathBuf,
    pub roi: PathBuf,
    /// The header's `key: value` lines (a current-generation header; the old one is CSV).
    pub header: Vec<(String, String)>,
    pub rois: Vec<Roi>,
}

/// Where the five ROI fields are among an ADC row's columns.
struct Columns {
    x: usize,
    y: usize,
    width: usize,
    height: usize,
    start: usize,
}

/// The old generation's fixed layout (0-based: columns 10-14 of 15).
const OLD_COLUMNS: Columns = Columns {
    x: 9,
    y: 10,
    width: 11,
    height: 12,
    start: 13,
};

impl Bin {
    /// Opens the bin whose header is `hdr` (`<bin>.hdr`; the .adc and .roi beside it).
    pub fn open(hdr: &Path) -> Result<Bin, IfcbError> {
        let pid = hdr
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let generation = generation(&pid).ok_or_else(|| {
            bad(
                hdr,
                "not an IFCB bin name (DYYYYMMDDTHHMMSS_IFCBnnn or IFCBn_YYYY_DDD_HHMMSS)",
            )
        })?;
        let (adc, roi) = (hdr.with_extension("adc"), hdr.with_extension("roi"));
        for p in [hdr, &adc, &roi] {
            if !p.is_file() {
                return Err(bad(p, "missing: a bin is its .hdr, .adc and .roi files"));
            }
        }
        let text = std::fs::read(hdr).map_err(|e| bad(hdr, e.to_string()))?;
        let text = String::from_utf8_lossy(&text);
        let header: Vec<(String, String)> = text
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let columns = match generation {
            Generation::Old => OLD_COLUMNS,
            Generation::Current => {
                let format = header
                    .iter()
                    .find(|(k, _)| k == "ADCFileFormat")
                    .map(|(_, v)| v.as_str())
                    .ok_or_else(|| {
                        bad(
                            hdr,
                            "unknown header format: no ADCFileFormat line names the ADC columns",
                        )
                    })?;
                let names: Vec<String> = format
                    .split(',')
                    .map(|n| n.trim().to_ascii_lowercase())
                    .collect();
                let find = |name: &str| {
                    names
                        .iter()
                        .position(|n| n == name)
                        .ok_or_else(|| bad(hdr, format!("ADCFileFormat names no `{name}` column")))
                };
                Columns {
                    x: find("roix")?,
                    y: find("roiy")?,
                    width: find("roiwidth")?,
                    height: find("roiheight")?,
                    start: find("start_byte")?,
                }
            }
        };
        let roi_len = std::fs::metadata(&roi)
            .map_err(|e| bad(&roi, e.to_string()))?
            .len();
        let adc_text = std::fs::read(&adc).map_err(|e| bad(&adc, e.to_string()))?;
        let adc_text = String::from_utf8_lossy(&adc_text);
        let mut rois = Vec::new();
        for (i, line) in adc_text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let number = i as u32 + 1;
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            let value = |c: usize, what: &str| -> Result<f64, IfcbError> {
                let f = fields.get(c).ok_or_else(|| {
                    bad(&adc, format!("row {number}: no column {} ({what})", c + 1))
                })?;
                f.parse::<f64>()
                    .map_err(|_| bad(&adc, format!("row {number}: {what} `{f}` is not a number")))
            };
            let (w, h) = (
                value(columns.width, "width")?,
                value(columns.height, "height")?,
            );
            if w < 0.0 || h < 0.0 {
                return Err(bad(
                    &adc,
                    format!("row {number}: negative size {w} x {h}: a corrupt ADC file"),
                ));
            }
            if w == 0.0 || h == 0.0 {
                continue; // a trigger without an image
            }
            if w * h > MAX_ROI_PIXELS as f64 {
                return Err(bad(
                    &adc,
                    format!("row {number}: a {w} x {h} ROI is larger than any IFCB camera frame (limit {MAX_ROI_PIXELS} pixels): a corrupt ADC file"),
                ));
            }
            let whole = |v: f64, what: &str| -> Result<u64, IfcbError> {
                if v < 0.0 || v.fract() != 0.0 || v > u32::MAX as f64 {
                    return Err(bad(
                        &adc,
                        format!("row {number}: {what} {v:.0} is not a pixel count or offset"),
                    ));
                }
                Ok(v as u64)
            };
            let r = Roi {
                number,
                x: whole(value(columns.x, "x")?.max(0.0), "x")? as u32,
                y: whole(value(columns.y, "y")?.max(0.0), "y")? as u32,
                width: whole(w, "width")? as u32,
                height: whole(h, "height")? as u32,
                start_byte: whole(value(columns.start, "start byte")?, "start byte")?,
            };
            let end = r.start_byte + r.width as u64 * r.height as u64;
            if end > roi_len {
                return Err(bad(
                    &roi,
                    format!(
                        "ADC row {number} points past the end of the .roi file (bytes {}..{end}, the file has {roi_len}): truncated or still being written",
                        r.start_byte
                    ),
                ));
            }
            rois.push(r);
        }
        Ok(Bin {
            pid,
            generation,
            hdr: hdr.to_path_buf(),
            adc,
            roi,
            header,
            rois,
        })
    }

    /// The standard IFCB pid of a ROI: `<bin>_<5-digit number>`.
    pub fn roi_id(&self, r: &Roi) -> String {
        format!("{}_{:05}", self.pid, r.number)
    }

    /// One ROI's pixels from the bin's open .roi file, read straight into its image.
    pub fn read_roi(
        &self,
        roi_file: &std::fs::File,
        r: &Roi,
    ) -> Result<image::GrayImage, IfcbError> {
        let mut pixels = vec![0u8; r.width as usize * r.height as usize];
        std::os::unix::fs::FileExt::read_exact_at(roi_file, &mut pixels, r.start_byte).map_err(
            |e| {
                bad(
                    &self.roi,
                    format!(
                        "ROI {}: {e} (the file changed since the bin was opened)",
                        r.number
                    ),
                )
            },
        )?;
        Ok(image::GrayImage::from_raw(r.width, r.height, pixels).expect("width x height bytes"))
    }

    /// Opens the bin's .roi file for [`Bin::read_roi`].
    pub fn open_roi_file(&self) -> Result<std::fs::File, IfcbError> {
        std::fs::File::open(&self.roi).map_err(|e| bad(&self.roi, e.to_string()))
    }

    /// Every ROI's pixels, in ADC order (each read with one `pread`).
    pub fn images(&self) -> Result<Vec<(String, image::GrayImage)>, IfcbError> {
        let file = self.open_roi_file()?;
        self.rois
            .iter()
            .map(|r| Ok((self.roi_id(r), self.read_roi(&file, r)?)))
            .collect()
    }
}

/// The headers of the bins under `dir` (nested by date as labs store them), sorted; files
/// that are not bin headers are left alone.
pub fn find_bins(dir: &Path) -> Result<Vec<PathBuf>, IfcbError> {
    let listing = crate::fsx::files_under(dir).map_err(|e| bad(dir, e.to_string()))?;
    Ok(listing
        .files
        .into_iter()
        .filter(|p| is_bin_header(p))
        .collect())
}

/// Splits a ROI pid (`<bin pid>_<number>`, 5 digits, more past 99999 as pyifcb writes them)
/// into the bin pid and the ROI number.
pub fn parse_roi_pid(name: &str) -> Option<(&str, u32)> {
    let (bin, number) = name.rsplit_once('_')?;
    let canonical = number.len() == 5 || (number.len() > 5 && !number.starts_with('0'));
    if !canonical || !number.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    generation(bin)?;
    Some((bin, number.parse().ok()?))
}

impl Bin {
    /// Where a ROI is addressed as a file: `<bin folder>/<roi pid>` (no such file exists; the
    /// decode stage reads the pixels from the bin), so every stage that takes a path takes ROIs.
    pub fn roi_path(&self, r: &Roi) -> PathBuf {
        self.hdr.with_file_name(self.roi_id(r))
    }
}

/// What a folder of bins holds: every ROI (id, path) of the bins that open, the bins refused
/// with their reason, and the files that belong to no bin.
#[derive(Debug, Default)]
pub struct BinListing {
    pub rois: Vec<(String, PathBuf)>,
    pub bins: usize,
    pub refused: Vec<(PathBuf, String)>,
    pub other: Vec<PathBuf>,
}

/// Lists the ROIs of the bins under `dir` (nested by date as labs store them), in bin then ADC
/// order. A bin that does not open is refused whole, with its reason.
pub fn list_rois(dir: &Path) -> Result<BinListing, IfcbError> {
    let listing = crate::fsx::files_under(dir).map_err(|e| bad(dir, e.to_string()))?;
    let mut out = BinListing::default();
    let mut stems = std::collections::HashSet::new();
    let mut first_of: std::collections::HashMap<std::ffi::OsString, &PathBuf> = Default::default();
    for hdr in listing.files.iter().filter(|p| is_bin_header(p)) {
        stems.insert(hdr.with_extension(""));
        let pid = hdr.file_stem().unwrap_or_default().to_os_string();
        if let Some(first) = first_of.get(&pid) {
            // Two bins with one pid would give their ROIs the same ids.
            out.refused.push((
                hdr.clone(),
                format!(
                    "a bin with the same pid is at {}: its ROIs would have the same ids",
                    first.display()
                ),
            ));
            continue;
        }
        first_of.insert(pid, hdr);
        match Bin::open(hdr) {
            Ok(bin) => {
                out.bins += 1;
                out.rois
                    .extend(bin.rois.iter().map(|r| (bin.roi_id(r), bin.roi_path(r))));
            }
            Err(IfcbError::Bin { path, reason }) => out.refused.push((path, reason)),
        }
    }
    for f in listing.files {
        let part_of_bin = f
            .extension()
            .is_some_and(|x| x == "hdr" || x == "adc" || x == "roi")
            && stems.contains(&f.with_extension(""));
        if !part_of_bin {
            // An .adc or .roi whose header is missing is a bin that cannot be read.
            if f.extension().is_some_and(|x| x == "adc" || x == "roi")
                && f.file_stem()
                    .is_some_and(|s| generation(&s.to_string_lossy()).is_some())
            {
                out.refused.push((
                    f.with_extension("hdr"),
                    "missing: a bin is its .hdr, .adc and .roi files".into(),
                ));
            } else {
                out.other.push(f);
            }
        }
    }
    out.refused.sort();
    out.refused.dedup();
    Ok(out)
}

fn is_bin_header(p: &Path) -> bool {
    p.extension().is_some_and(|x| x == "hdr")
        && p.file_stem()
            .is_some_and(|s| generation(&s.to_string_lossy()).is_some())
}

/// True when `dir` holds at least one bin header (at any depth).
pub fn has_bins(dir: &Path) -> bool {
    crate::fsx::files_under(dir).is_ok_and(|l| l.files.iter().any(|p| is_bin_header(p)))
}

/// Bins opened recently, so that reading a bin's ROIs one by one parses its ADC file once.
/// Keyed by the header and the ADC and ROI files' sizes and times: a bin still being written
/// is opened again.
type BinKey = (PathBuf, u64, Option<std::time::SystemTime>, u64);
static OPEN_BINS: std::sync::Mutex<Vec<(BinKey, std::sync::Arc<Bin>)>> =
    std::sync::Mutex::new(Vec::new());
const OPEN_BINS_KEPT: usize = 64;

fn open_cached(hdr: &Path) -> Result<std::sync::Arc<Bin>, IfcbError> {
    let stat = |p: &Path| std::fs::metadata(p).map_err(|e| bad(p, e.to_string()));
    let (adc, roi) = (
        stat(&hdr.with_extension("adc"))?,
        stat(&hdr.with_extension("roi"))?,
    );
    let key = (hdr.to_path_buf(), adc.len(), adc.modified().ok(), roi.len());
    if let Some((_, bin)) = OPEN_BINS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .find(|(k, _)| *k == key)
    {
        return Ok(bin.clone());
    }
    let bin = std::sync::Arc::new(Bin::open(hdr)?);
    let mut open = OPEN_BINS.lock().unwrap_or_else(|e| e.into_inner());
    if open.len() >= OPEN_BINS_KEPT {
        open.remove(0);
    }
    open.push((key, bin.clone()));
    Ok(bin)
}

/// Reads the ROI that `path` addresses (`<bin folder>/<roi pid>`, see [`Bin::roi_path`]);
/// None when `path` does not name a ROI of a bin beside it. `max_pixels` refuses absurd sizes
/// before reading.
pub fn read_roi(path: &Path, max_pixels: u64) -> Option<Result<image::GrayImage, String>> {
    let name = path.file_name()?.to_str()?;
    let (bin_pid, number) = parse_roi_pid(name)?;
    let hdr = path.with_file_name(format!("{bin_pid}.hdr"));
    if !hdr.is_file() {
        return None;
    }
    Some((|| {
        let bin = open_cached(&hdr).map_err(|e| format!("bin not readable: {e}"))?;
        let r = bin
            .rois
            .binary_search_by_key(&number, |r| r.number)
            .map(|i| &bin.rois[i])
            .map_err(|_| format!("bin {bin_pid} has no ROI {number} with an image"))?;
        let pixels = r.width as u64 * r.height as u64;
        if pixels > max_pixels {
            return Err(format!(
                "{}x{} pixels exceeds the limit of {max_pixels} pixels",
                r.width, r.height
            ));
        }
        let file = bin.open_roi_file().map_err(|e| e.to_string())?;
        bin.read_roi(&file, r).map_err(|e| e.to_string())
    })())
}

/// The current generation's ADC columns, as the instruments' headers name them.
const ADC_FILE_FORMAT: &str = "trigger#, ADC_time, PMTA, PMTB, PMTC, PMTD, peakA, peakB, peakC, peakD, time of flight, grabtimestart, grabtimeend, ROIx, ROIy, ROIwidth, ROIheight,start_byte, comparator_out, STartPoint, SignalLength, status, runTime, inhibitTime";

/// Writes images as a current-generation bin `<dir>/<pid>.{roi,adc,hdr}` (the header last, so
/// a reader that finds the header finds the bin whole): for tests, benchmarks and synthetic
/// instrument streams. ROI `i` is ADC row `i + 1` at x = y = 1 (libifcb 0.8.1 skips rows whose
/// ROIx is 0); other ADC fields are zero.
pub fn write_bin(dir: &Path, pid: &str, images: &[image::GrayImage]) -> Result<PathBuf, IfcbError> {
    if generation(pid) != Some(Generation::Current) {
        return Err(bad(
            &dir.join(pid),
            "not a current-generation bin pid (DYYYYMMDDTHHMMSS_IFCBnnn)",
        ));
    }
    let mut roi = Vec::new();
    let mut adc = String::new();
    for (i, img) in images.iter().enumerate() {
        let start = roi.len();
        roi.extend_from_slice(img.as_raw());
        adc.push_str(&format!(
            "{},{:.6},0,0,0,0,0,0,0,0,0,0,0,1,1,{},{},{start},0,0,0,0,0,0\n",
            i + 1,
            i as f64 * 0.25,
            img.width(),
            img.height()
        ));
    }
    let header = format!(
        "softwareVersion: plankton {}\nsampleTime: {}\nADCFileFormat: {ADC_FILE_FORMAT}\n",
        env!("CARGO_PKG_VERSION"),
        &pid[1..16],
    );
    let write = |ext: &str, bytes: &[u8]| {
        let p = dir.join(format!("{pid}.{ext}"));
        crate::fsx::write_atomic(&p, bytes).map_err(|e| bad(&p, e.to_string()))?;
        Ok::<PathBuf, IfcbError>(p)
    };
    write("roi", &roi)?;
    write("adc", adc.as_bytes())?;
    write("hdr", header.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/ifcb")
    }

    #[test]
    fn pids_of_both_generations_and_not_pids() {
        assert_eq!(
            generation("D20130526T095207_IFCB013"),
            Some(Generation::Current)
        );
        assert_eq!(generation("IFCB5_2012_028_081515"), Some(Generation::Old));
        for no in [
            "D2013_IFCB013",
            "IFCB5_2012_28_081515",
            "img-001",
            "D20130526T095207_IFCB",
            "",
        ] {
            assert_eq!(generation(no), None, "{no}");
        }
    }

    /// ROI geometry and pixels of two real bins against libifcb's (make_golden.py).
    #[test]
    fn real_bins_of_both_generations_match_libifcb() {
        let golden: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixtures().join("golden.json")).unwrap())
                .unwrap();
        let bins = find_bins(&fixtures()).unwrap();
        assert_eq!(bins.len(), 2, "{bins:?}");
        for hdr in bins {
            let bin = Bin::open(&hdr).unwrap();
            let expected: Vec<&serde_json::Value> = golden[&bin.pid]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["width"].as_u64().unwrap() * r["height"].as_u64().unwrap() > 0)
                .collect();
            assert_eq!(bin.rois.len(), expected.len(), "{}", bin.pid);
            let images = bin.images().unwrap();
            for ((r, (id, img)), want) in bin.rois.iter().zip(&images).zip(&expected) {
                assert_eq!(r.number as u64, want["number"].as_u64().unwrap());
                assert_eq!(r.width as u64, want["width"].as_u64().unwrap());
                assert_eq!(r.height as u64, want["height"].as_u64().unwrap());
                assert_eq!(r.x as i64, want["x"].as_i64().unwrap());
                assert_eq!(r.start_byte, want["start_byte"].as_u64().unwrap());
                assert_eq!(id, &format!("{}_{:05}", bin.pid, r.number));
                let hash = format!("{:016x}", crate::rng::fnv1a64(img.as_raw()));
                assert_eq!(hash, want["fnv1a64"].as_str().unwrap(), "{id}");
            }
        }
    }

    fn copy_bin(to: &Path) -> PathBuf {
        let from = fixtures().join("D2013/D20130526/D20130526T095207_IFCB013");
        for e in ["hdr", "adc", "roi"] {
            std::fs::copy(
                from.with_extension(e),
                to.join(format!("D20130526T095207_IFCB013.{e}")),
            )
            .unwrap();
        }
        to.join("D20130526T095207_IFCB013.hdr")
    }

    #[test]
    fn a_truncated_roi_file_a_missing_file_and_an_unknown_header_refuse_the_bin() {
        let tmp = tempfile::tempdir().unwrap();
        let hdr = copy_bin(tmp.path());
        assert!(Bin::open(&hdr).is_ok());
        // Truncated (or still being written): refused whole, never half-counted.
        let roi = hdr.with_extension("roi");
        let len = std::fs::metadata(&roi).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&roi)
            .unwrap()
            .set_len(len - 100)
            .unwrap();
        let e = Bin::open(&hdr).unwrap_err().to_string();
        assert!(e.contains("points past the end of the .roi file"), "{e}");
        // No ADCFileFormat line: the columns are unknown.
        let hdr2 = copy_bin(tmp.path());
        let text = std::fs::read_to_string(&hdr2).unwrap();
        let without: String = text
            .lines()
            .filter(|l| !l.starts_with("ADCFileFormat"))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&hdr2, without).unwrap();
        let e = Bin::open(&hdr2).unwrap_err().to_string();
        assert!(e.contains("unknown header format"), "{e}");
        // A missing .adc.
        let hdr3 = copy_bin(tmp.path());
        std::fs::remove_file(hdr3.with_extension("adc")).unwrap();
        let e = Bin::open(&hdr3).unwrap_err().to_string();
        assert!(e.contains(".adc") && e.contains("missing"), "{e}");
        // A row whose numbers are not numbers.
        let hdr4 = copy_bin(tmp.path());
        let adc = std::fs::read_to_string(hdr4.with_extension("adc")).unwrap();
        let mut lines: Vec<String> = adc.lines().map(String::from).collect();
        let mut fields: Vec<&str> = lines[6].split(',').collect(); // ROI 7, the first image
        fields[15] = "wide";
        lines[6] = fields.join(",");
        std::fs::write(hdr4.with_extension("adc"), lines.join("\n")).unwrap();
        let e = Bin::open(&hdr4).unwrap_err().to_string();
        assert!(e.contains("row 7: width `wide` is not a number"), "{e}");
        // A negative size, and a ROI no camera makes (refused before anything is read: a sparse
        // .roi could claim gigabytes).
        for (value, why) in [
            ("-40", "negative size"),
            ("100000", "larger than any IFCB camera frame"),
        ] {
            let hdr5 = copy_bin(tmp.path());
            let adc = std::fs::read_to_string(hdr5.with_extension("adc")).unwrap();
            let mut lines: Vec<String> = adc.lines().map(String::from).collect();
            let mut fields: Vec<String> = lines[6].split(',').map(String::from).collect();
            fields[15] = value.into();
            fields[16] = value.trim_start_matches('-').into();
            lines[6] = fields.join(",");
            std::fs::write(hdr5.with_extension("adc"), lines.join("\n")).unwrap();
            let e = Bin::open(&hdr5).unwrap_err().to_string();
            assert!(e.contains("row 7") && e.contains(why), "{e}");
        }
    }

    /// A ROI addressed by its pid path decodes to the same pixels as the bin read whole; the
    /// listing names a refused bin and leaves stray files apart.
    #[test]
    fn rois_read_by_pid_path_equal_the_bin_read_whole_and_bad_bins_are_listed_apart() {
        use crate::decode::{decode_file, DecodeLimits};
        let tmp = tempfile::tempdir().unwrap();
        let day = tmp.path().join("2013/D20130526");
        std::fs::create_dir_all(&day).unwrap();
        let hdr = copy_bin(&day);
        std::fs::write(tmp.path().join("notes.txt"), b"cruise log").unwrap();
        let bin = Bin::open(&hdr).unwrap();
        let listing = list_rois(tmp.path()).unwrap();
        assert_eq!((listing.bins, listing.rois.len()), (1, bin.rois.len()));
        assert_eq!(listing.other, vec![tmp.path().join("notes.txt")]);
        for ((id, path), (want_id, want)) in listing.rois.iter().zip(bin.images().unwrap()) {
            assert_eq!(id, &want_id);
            assert_eq!(path, &day.join(&want_id));
            let img = decode_file(path, &DecodeLimits::default()).unwrap();
            assert_eq!(img, want, "{id}");
        }
        assert_eq!(
            parse_roi_pid("D20130526T095207_IFCB013_00007"),
            Some(("D20130526T095207_IFCB013", 7))
        );
        // Past 99999 the number has six digits (pyifcb's pids); a padded six is not a pid.
        assert_eq!(
            parse_roi_pid("D20130526T095207_IFCB013_100001"),
            Some(("D20130526T095207_IFCB013", 100_001))
        );
        assert_eq!(parse_roi_pid("D20130526T095207_IFCB013_000007"), None);
        assert_eq!(parse_roi_pid("D20130526T095207_IFCB013_0007"), None);
        // A ROI number without an image, and a pid path whose bin is not there.
        let e = decode_file(
            &day.join("D20130526T095207_IFCB013_00001"),
            &DecodeLimits::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("has no ROI 1 with an image"), "{e}");
        let e = decode_file(
            &day.join("D20990526T095207_IFCB013_00007"),
            &DecodeLimits::default(),
        )
        .unwrap_err();
        assert_eq!(e.kind(), "io", "{e}");
        // A second bin, truncated after listing: its ROIs fail with the bin's reason.
        let other = tmp.path().join("2013/D20130527");
        std::fs::create_dir_all(&other).unwrap();
        for e in ["hdr", "adc", "roi"] {
            std::fs::copy(
                hdr.with_extension(e),
                other.join(format!("D20130527T095207_IFCB013.{e}")),
            )
            .unwrap();
        }
        let roi = other.join("D20130527T095207_IFCB013.roi");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&roi)
            .unwrap()
            .set_len(10)
            .unwrap();
        std::fs::remove_file(other.join("D20130527T095207_IFCB013.hdr")).unwrap();
        let listing = list_rois(tmp.path()).unwrap();
        assert_eq!(listing.bins, 1);
        assert_eq!(listing.refused.len(), 1, "{:?}", listing.refused);
        assert!(
            listing.refused[0].1.contains("missing"),
            "{:?}",
            listing.refused
        );
        std::fs::copy(&hdr, other.join("D20130527T095207_IFCB013.hdr")).unwrap();
        let listing = list_rois(tmp.path()).unwrap();
        assert_eq!(listing.refused.len(), 1, "{:?}", listing.refused);
        assert!(
            listing.refused[0].1.contains("past the end"),
            "{:?}",
            listing.refused
        );
        let e = decode_file(
            &other.join("D20130527T095207_IFCB013_00007"),
            &DecodeLimits::default(),
        )
        .unwrap_err();
        assert_eq!(e.kind(), "bad_roi");
        assert!(e.to_string().contains("past the end"), "{e}");
        // The same pid in a second folder: refused, naming the first.
        let twin = tmp.path().join("copy");
        std::fs::create_dir_all(&twin).unwrap();
        copy_bin(&twin);
        let listing = list_rois(tmp.path()).unwrap();
        assert!(
            listing
                .refused
                .iter()
                .any(|(_, r)| r.contains("a bin with the same pid is at")),
            "{:?}",
            listing.refused
        );
        assert_eq!(listing.bins, 1);
    }

    #[test]
    fn a_written_bin_reads_back_pixel_for_pixel() {
        let tmp = tempfile::tempdir().unwrap();
        let images: Vec<image::GrayImage> = (0..5u32)
            .map(|i| {
                image::GrayImage::from_fn(3 + i, 7 - i, |x, y| {
                    image::Luma([(x * 31 + y * 7 + i) as u8])
                })
            })
            .collect();
        let hdr = write_bin(tmp.path(), "D20240102T030405_IFCB999", &images).unwrap();
        let bin = Bin::open(&hdr).unwrap();
        let read: Vec<image::GrayImage> =
            bin.images().unwrap().into_iter().map(|(_, i)| i).collect();
        assert_eq!(read, images);
        assert_eq!(bin.roi_id(&bin.rois[4]), "D20240102T030405_IFCB999_00005");
        assert_eq!((bin.rois[2].x, bin.rois[2].y, bin.rois[2].width), (1, 1, 5));
        // Every ADC row has exactly the columns the header names (other readers go by position).
        let names = ADC_FILE_FORMAT.split(',').count();
        let adc = std::fs::read_to_string(hdr.with_extension("adc")).unwrap();
        assert!(adc.lines().all(|l| l.split(',').count() == names), "{adc}");
        assert!(write_bin(tmp.path(), "img_1", &images).is_err());
    }
}
