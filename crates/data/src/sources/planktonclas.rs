//! Real plankton images from the `planktonclas` wheel on PyPI.
//!
//! The package `planktonclas` 0.2.4 (Apache-2.0) ships 105 labelled EcoTaxa/FlowCam plankton
//! JPEGs in 6 classes. The wheel is fetched with `python3 -m pip download --no-deps` (never
//! installed) and unpacked here, with the `zip` crate, into the layout of the Kaggle National
//! Data Science Bowl competition, so that everything downstream reads it exactly like the
//! competition data.
//!
//! Inside the wheel (version 0.2.4):
//! - `planktonclas/resources/demo-images/<Class>/<file>.jpg`: the images, one folder per class;
//! - `planktonclas/resources/dataset_files/classes.txt`: class names, one a line, in label order;
//! - `planktonclas/resources/dataset_files/{train,val,test}.txt`: one image a line,
//!   `<Class>/<file>.jpg <label index>` (CRLF line ends; blank lines and `#` lines are skipped,
//!   as the package's own reader does).
//!
//! Written into `out`:
//! - `train/<Class>/<file>`: the package's `train` and `val` images (and any image not listed in a
//!   split file);
//! - `test/<file>` plus `test_labels.csv` (`image,class`): the package's `test` images;
//! - `sampleSubmission.csv`: `image,<class 1>,...` (classes sorted), one row per test image with
//!   uniform probabilities;
//! - `splits/planktonclas_split.csv` (`image,class,split`), split being the package's own
//!   `train` / `val` / `test`, or `unlisted`;
//! - `.planktonclas-0.2.4.complete`, written last: its presence means the dataset is complete.
//!
//! Every file is written under a temporary name and renamed into place, so an interrupted run
//! leaves no half-written file under its final name; a rerun rewrites the same files.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::table::csv_bytes;

/// The pinned package version.
pub const PLANKTONCLAS_VERSION: &str = "0.2.4";
/// The interpreter used to run pip when none is given.
pub const DEFAULT_PYTHON: &str = "python3";
/// Completion marker in `out`, written last.
pub const COMPLETE_MARKER: &str = ".planktonclas-0.2.4.complete";
/// The package's own split, relative to `out`.
pub const SPLIT_FILE: &str = "splits/planktonclas_split.csv";
/// Labels of the test images, relative to `out`.
pub const TEST_LABELS_FILE: &str = "test_labels.csv";
/// The Kaggle-style sample submission, relative to `out`.
pub const SAMPLE_SUBMISSION_FILE: &str = "sampleSubmission.csv";

const IMAGES_PREFIX: &str = "planktonclas/resources/demo-images/";
const SPLITS_PREFIX: &str = "planktonclas/resources/dataset_files/";
const CLASSES_FILE: &str = "classes.txt";
/// The package's split files, in the order they are reported.
const SPLIT_NAMES: [&str; 3] = ["train", "val", "test"];
/// Refuse to inflate any single entry beyond this (the largest real image is a few hundred KiB).
const MAX_ENTRY_BYTES: u64 = 64 << 20;
/// How much of pip's stderr an error quotes.
const STDERR_TAIL_BYTES: usize = 2000;

/// Where to put the dataset, where to keep the downloaded wheel, and which Python runs pip.
#[derive(Debug, Clone)]
pub struct PlanktonclasOptions {
    /// Dataset root to write (Kaggle competition layout).
    pub out: PathBuf,
    /// Folder holding (or receiving) `planktonclas-0.2.4-*.whl`.
    pub cache_dir: PathBuf,
    /// Python interpreter used as `<python> -m pip download ...`; default `python3`.
    pub python: String,
}

impl PlanktonclasOptions {
    /// Options with the default interpreter (`python3`).
    pub fn new(out: impl Into<PathBuf>, cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            out: out.into(),
            cache_dir: cache_dir.into(),
            python: DEFAULT_PYTHON.to_string(),
        }
    }
}

/// What the dataset holds.
#[derive(Debug, Clone)]
pub struct PlanktonclasSummary {
    /// Class names, sorted (the column order of `sampleSubmission.csv`).
    pub class_names: Vec<String>,
    /// Images under `out/train/` (the package's train + val splits, plus unlisted images).
    pub train_images: usize,
    /// Images under `out/test/`.
    pub test_images: usize,
    /// True when `out` already held a complete dataset and nothing was written.
    pub from_cache: bool,
}

/// Everything that can go wrong; each names the file or command and the reason.
#[derive(Debug, thiserror::Error)]
pub enum PlanktonclasError {
    /// A file-system operation failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The Python interpreter could not be started at all.
    #[error(
        "could not run `{command}`: {source}; download planktonclas-{PLANKTONCLAS_VERSION}-py3-none-any.whl \
         from https://pypi.org/project/planktonclas/{PLANKTONCLAS_VERSION}/#files and place it in {} by hand",
        cache_dir.display()
    )]
    Spawn {
        command: String,
        cache_dir: PathBuf,
        #[source]
        source: io::Error,
    },
    /// pip ran and failed.
    #[error(
        "`{command}` failed ({status}); stderr ends with:\n{stderr_tail}\n\
         download planktonclas-{PLANKTONCLAS_VERSION}-py3-none-any.whl from \
         https://pypi.org/project/planktonclas/{PLANKTONCLAS_VERSION}/#files and place it in {} by hand",
        cache_dir.display()
    )]
    Download {
        command: String,
        status: String,
        stderr_tail: String,
        cache_dir: PathBuf,
    },
    /// pip reported success but no matching wheel appeared.
    #[error(
        "`{command}` succeeded but no planktonclas-{PLANKTONCLAS_VERSION}-*.whl is in {}; \
         place the wheel there by hand",
        cache_dir.display()
    )]
    WheelNotFound { command: String, cache_dir: PathBuf },
    /// The wheel is not a readable zip archive.
    #[error("reading wheel {}{}: {source}; if it is corrupt, delete it and retry",
        path.display(), entry.as_deref().map(|e| format!(" (entry {e})")).unwrap_or_default())]
    Zip {
        path: PathBuf,
        entry: Option<String>,
        #[source]
        source: zip::result::ZipError,
    },
    /// An entry name that would escape the output folder (zip-slip).
    #[error("wheel {}: unsafe entry name {entry:?} ({reason}); refusing to unpack (zip-slip guard)", wheel.display())]
    UnsafeEntry {
        wheel: PathBuf,
        entry: String,
        reason: &'static str,
    },
    /// An entry in the data folders that does not fit the expected layout.
    #[error("wheel {}: unexpected entry {entry:?}: {reason}", wheel.display())]
    UnexpectedEntry {
        wheel: PathBuf,
        entry: String,
        reason: String,
    },
    /// A malformed line in one of the split files.
    #[error("wheel {}: {file} line {line}: {reason}", wheel.display())]
    SplitFile {
        wheel: PathBuf,
        file: String,
        line: usize,
        reason: String,
    },
    /// Something the layout needs is missing from the wheel.
    #[error("wheel {}: {what}", wheel.display())]
    Missing { wheel: PathBuf, what: String },
}

impl PlanktonclasError {
    fn io(action: &'static str, path: &Path, source: io::Error) -> Self {
        Self::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

type Result<T> = std::result::Result<T, PlanktonclasError>;

/// Makes sure `opts.out` holds the dataset: returns at once if it is already complete, otherwise
/// downloads the wheel into `opts.cache_dir` (unless one is already there) and unpacks it.
pub fn fetch(opts: &PlanktonclasOptions) -> Result<PlanktonclasSummary> {
    if let Some(summary) = read_marker(&opts.out) {
        return Ok(summary);
    }
    let wheel = match find_cached_wheel(&opts.cache_dir)? {
        Some(w) => {
            tracing::info!(wheel = %w.display(), "using cached planktonclas wheel");
            w
        }
        None => download_wheel(opts)?,
    };
    install_from_wheel(&wheel, &opts.out)
}

/// The part after download: unpack an already-downloaded wheel file into the competition layout.
///
/// Returns at once (with `from_cache = true`) if `out` already holds a complete dataset.
pub fn install_from_wheel(wheel: &Path, out: &Path) -> Result<PlanktonclasSummary> {
    if let Some(summary) = read_marker(out) {
        return Ok(summary);
    }
    let contents = read_wheel(wheel)?;
    let plan = plan_layout(wheel, contents)?;
    write_layout(out, &plan)?;
    tracing::info!(
        out = %out.display(),
        classes = plan.class_names.len(),
        train = plan.train_images,
        test = plan.test_images,
        "planktonclas dataset written"
    );
    Ok(PlanktonclasSummary {
        class_names: plan.class_names,
        train_images: plan.train_images,
        test_images: plan.test_images,
        from_cache: false,
    })
}

// ---------------------------------------------------------------------------------------------
// Download

fn find_cached_wheel(cache_dir: &Path) -> Result<Option<PathBuf>> {
    let prefix = format!("planktonclas-{PLANKTONCLAS_VERSION}-");
    let entries = match fs::read_dir(cache_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(PlanktonclasError::io("listing", cache_dir, e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| PlanktonclasError::io("listing", cache_dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with(&prefix) && name.ends_with(".whl") && entry.path().is_file() {
            found.push(entry.path());
        }
    }
    found.sort();
    Ok(found.into_iter().next())
}

fn download_wheel(opts: &PlanktonclasOptions) -> Result<PathBuf> {
    let cache_dir = &opts.cache_dir;
    fs::create_dir_all(cache_dir)
        .map_err(|e| PlanktonclasError::io("creating cache folder", cache_dir, e))?;
    let spec = format!("planktonclas=={PLANKTONCLAS_VERSION}");
    let args: Vec<String> = vec![
        "-m".into(),
        "pip".into(),
        "download".into(),
        "--no-deps".into(),
        "--only-binary=:all:".into(),
        "--disable-pip-version-check".into(),
        "--no-input".into(),
        spec,
        "-d".into(),
        cache_dir.display().to_string(),
    ];
    let command = format!("{} {}", opts.python, args.join(" "));
    tracing::info!(%command, "downloading planktonclas wheel");
    let output = Command::new(&opts.python)
        .args(&args)
        .output()
        .map_err(|source| PlanktonclasError::Spawn {
            command: command.clone(),
            cache_dir: cache_dir.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(PlanktonclasError::Download {
            command,
            status: output.status.to_string(),
            stderr_tail: tail(&output.stderr, STDERR_TAIL_BYTES),
            cache_dir: cache_dir.clone(),
        });
    }
    find_cached_wheel(cache_dir)?.ok_or_else(|| PlanktonclasError::WheelNotFound {
        command,
        cache_dir: cache_dir.clone(),
    })
}

/// The last `max` bytes of a process's output, as text.
fn tail(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim_end();
    if text.len() <= max {
        return text.to_string();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &text[start..])
}

// ---------------------------------------------------------------------------------------------
// Reading the wheel

/// The parts of the wheel we use, validated.
struct WheelContents {
    /// Image path relative to demo-images (`<Class>/<file>`) -> bytes.
    images: BTreeMap<String, Vec<u8>>,
    /// Split file name (`classes.txt`, `train.txt`, ...) -> text.
    split_files: HashMap<String, String>,
}

fn read_wheel(wheel: &Path) -> Result<WheelContents> {
    let zip_err = |entry: Option<String>| {
        let path = wheel.to_path_buf();
        move |source| PlanktonclasError::Zip {
            path,
            entry,
            source,
        }
    };
    let file = fs::File::open(wheel).map_err(|e| PlanktonclasError::io("opening", wheel, e))?;
    let mut archive = zip::ZipArchive::new(io::BufReader::new(file)).map_err(zip_err(None))?;

    let wanted_split_files: Vec<String> = std::iter::once(CLASSES_FILE.to_string())
        .chain(SPLIT_NAMES.iter().map(|s| format!("{s}.txt")))
        .collect();
    let mut images = BTreeMap::new();
    let mut split_files = HashMap::new();
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).map_err(zip_err(None))?;
        let name = entry.name().to_string();
        check_entry_name(wheel, &name)?;
        if entry.is_dir() {
            continue;
        }
        if let Some(rel) = name.strip_prefix(IMAGES_PREFIX) {
            if ignorable_file(rel.rsplit('/').next().unwrap_or(rel)) {
                continue;
            }
            let (class, file) =
                split_image_path(rel).map_err(|reason| PlanktonclasError::UnexpectedEntry {
                    wheel: wheel.to_path_buf(),
                    entry: name.clone(),
                    reason,
                })?;
            let bytes = read_entry(&mut entry, wheel, &name)?;
            images.insert(format!("{class}/{file}"), bytes);
        } else if let Some(rel) = name.strip_prefix(SPLITS_PREFIX) {
            if !wanted_split_files.iter().any(|w| w == rel) {
                continue;
            }
            let bytes = read_entry(&mut entry, wheel, &name)?;
            let text = String::from_utf8(bytes).map_err(|_| PlanktonclasError::SplitFile {
                wheel: wheel.to_path_buf(),
                file: rel.to_string(),
                line: 0,
                reason: "not UTF-8 text".to_string(),
            })?;
            split_files.insert(rel.to_string(), text);
        }
    }
    if images.is_empty() {
        return Err(PlanktonclasError::Missing {
            wheel: wheel.to_path_buf(),
            what: format!("no images under {IMAGES_PREFIX}"),
        });
    }
    Ok(WheelContents {
        images,
        split_files,
    })
}

/// Zip-slip guard, applied to every entry of the wheel: a name must be a relative path of plain
/// components.
fn check_entry_name(wheel: &Path, name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("empty name")
    } else if name.starts_with('/') || name.starts_with('\\') {
        Some("absolute path")
    } else if name.contains('\\') {
        Some("backslash in path")
    } else if name.contains(':') {
        Some("drive or stream separator ':' in path")
    } else if name.contains('\0') {
        Some("NUL in path")
    } else if name.split('/').any(|c| c == "..") {
        Some("'..' component")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(PlanktonclasError::UnsafeEntry {
            wheel: wheel.to_path_buf(),
            entry: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Files the package's own scanner skips.
fn ignorable_file(file: &str) -> bool {
    file.starts_with('.') || file.ends_with(".db")
}

/// `<Class>/<file>` with an image extension, both parts safe as file names and CSV fields.
fn split_image_path(rel: &str) -> std::result::Result<(&str, &str), String> {
    let mut parts = rel.split('/');
    let (Some(class), Some(file), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err("expected demo-images/<Class>/<file>".to_string());
    };
    check_plain_name(class).map_err(|r| format!("class name {class:?}: {r}"))?;
    check_plain_name(file).map_err(|r| format!("file name {file:?}: {r}"))?;
    let ext = file.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("jpg" | "jpeg" | "png") => Ok((class, file)),
        _ => Err("not a .jpg/.jpeg/.png image".to_string()),
    }
}

/// A name used as a single path component and as a CSV field.
fn check_plain_name(name: &str) -> std::result::Result<(), &'static str> {
    if name.is_empty() {
        Err("empty")
    } else if name.starts_with('.') {
        Err("starts with '.'")
    } else if name
        .chars()
        .any(|c| c.is_control() || matches!(c, '/' | '\\' | ',' | '"' | ':'))
    {
        Err("contains a character unsafe in file names or CSV (control, / \\ , \" :)")
    } else {
        Ok(())
    }
}

fn read_entry<R: Read>(entry: &mut R, wheel: &Path, name: &str) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    entry
        .take(MAX_ENTRY_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| PlanktonclasError::io("inflating wheel entry", &wheel.join(name), e))?;
    if bytes.len() as u64 > MAX_ENTRY_BYTES {
        return Err(PlanktonclasError::UnexpectedEntry {
            wheel: wheel.to_path_buf(),
            entry: name.to_string(),
            reason: format!("larger than {MAX_ENTRY_BYTES} bytes"),
        });
    }
    Ok(bytes)
}

// ---------------------------------------------------------------------------------------------
// Planning the layout

struct PlannedImage {
    /// File name in the output (unique across classes).
    out_name: String,
    class: String,
    /// `train`, `val`, `test` or `unlisted`.
    split: &'static str,
    bytes: Vec<u8>,
}

struct Plan {
    class_names: Vec<String>,
    /// In split-file order: train, val, test, then unlisted (sorted).
    images: Vec<PlannedImage>,
    train_images: usize,
    test_images: usize,
}

/// Non-empty, non-comment lines (trimmed), numbered from 1, as the package's reader sees them.
fn content_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
}

fn plan_layout(wheel: &Path, contents: WheelContents) -> Result<Plan> {
    let WheelContents {
        mut images,
        split_files,
    } = contents;
    let split_err = |file: &str, line: usize, reason: String| PlanktonclasError::SplitFile {
        wheel: wheel.to_path_buf(),
        file: file.to_string(),
        line,
        reason,
    };

    // Label order, if the package gives one.
    let label_names: Option<Vec<String>> = split_files
        .get(CLASSES_FILE)
        .map(|t| content_lines(t).map(|(_, l)| l.to_string()).collect());
    let have_split_files = SPLIT_NAMES
        .iter()
        .any(|s| split_files.contains_key(&format!("{s}.txt")));
    if have_split_files && label_names.is_none() {
        return Err(PlanktonclasError::Missing {
            wheel: wheel.to_path_buf(),
            what: format!("split files present but {SPLITS_PREFIX}{CLASSES_FILE} is missing"),
        });
    }

    // (relative path, split) in split-file order.
    let mut listed: Vec<(String, &'static str)> = Vec::new();
    let mut seen: HashMap<String, (&'static str, usize)> = HashMap::new();
    for split in SPLIT_NAMES {
        let file = format!("{split}.txt");
        let Some(text) = split_files.get(&file) else {
            continue;
        };
        let labels = label_names.as_deref().unwrap_or(&[]);
        for (line_no, line) in content_lines(text) {
            let (path, label) = parse_split_line(line).ok_or_else(|| {
                split_err(
                    &file,
                    line_no,
                    format!("expected '<relative path> <integer label>', got {line:?}"),
                )
            })?;
            let path = path.replace('\\', "/");
            let path = path.trim_start_matches("./").to_string();
            let (class, _) = split_image_path(&path)
                .map_err(|r| split_err(&file, line_no, format!("path {path:?}: {r}")))?;
            let label_name = usize::try_from(label)
                .ok()
                .and_then(|l| labels.get(l))
                .ok_or_else(|| {
                    split_err(
                        &file,
                        line_no,
                        format!(
                            "label {label} is not an index into {CLASSES_FILE} ({} classes)",
                            labels.len()
                        ),
                    )
                })?;
            if label_name != class {
                return Err(split_err(
                    &file,
                    line_no,
                    format!("label {label} means {label_name:?} in {CLASSES_FILE} but the image is in folder {class:?}"),
                ));
            }
            if !images.contains_key(&path) {
                return Err(split_err(
                    &file,
                    line_no,
                    format!("image {IMAGES_PREFIX}{path} is not in the wheel"),
                ));
            }
            if let Some((prev_split, prev_line)) = seen.get(&path) {
                return Err(split_err(
                    &file,
                    line_no,
                    format!("image {path} already listed in {prev_split}.txt line {prev_line}"),
                ));
            }
            seen.insert(path.clone(), (split, line_no));
            listed.push((path, split));
        }
    }
    let unlisted: Vec<String> = images
        .keys()
        .filter(|p| !seen.contains_key(*p))
        .cloned()
        .collect();
    if !unlisted.is_empty() && have_split_files {
        tracing::warn!(
            count = unlisted.len(),
            "planktonclas images not listed in any split file go to train (split `unlisted`)"
        );
    }
    let order: Vec<(String, &'static str)> = listed
        .into_iter()
        .chain(unlisted.into_iter().map(|p| (p, "unlisted")))
        .collect();

    // Output names: the file name, prefixed with the class where the package reuses a name.
    let mut base_count: HashMap<&str, usize> = HashMap::new();
    for path in images.keys() {
        let file = path.split_once('/').map_or(path.as_str(), |(_, f)| f);
        *base_count.entry(file).or_default() += 1;
    }
    let mut names: Vec<(String, String)> = Vec::with_capacity(order.len());
    let mut used: HashSet<String> = HashSet::new();
    for (path, _) in &order {
        let (class, file) = path.split_once('/').expect("validated <Class>/<file>");
        let out_name = if base_count[file] > 1 {
            format!("{class}_{file}")
        } else {
            file.to_string()
        };
        if !used.insert(out_name.clone()) {
            return Err(PlanktonclasError::UnexpectedEntry {
                wheel: wheel.to_path_buf(),
                entry: format!("{IMAGES_PREFIX}{path}"),
                reason: format!("output name {out_name} collides with another image"),
            });
        }
        names.push((class.to_string(), out_name));
    }

    let mut classes: BTreeSet<String> = label_names.unwrap_or_default().into_iter().collect();
    let mut planned = Vec::with_capacity(order.len());
    let (mut train_images, mut test_images) = (0, 0);
    for ((path, split), (class, out_name)) in order.into_iter().zip(names) {
        let bytes = images
            .remove(&path)
            .expect("every planned image is in the wheel");
        if split == "test" {
            test_images += 1;
        } else {
            train_images += 1;
        }
        classes.insert(class.clone());
        planned.push(PlannedImage {
            out_name,
            class,
            split,
            bytes,
        });
    }
    for class in &classes {
        check_plain_name(class)
            .map_err(|r| split_err(CLASSES_FILE, 0, format!("class name {class:?}: {r}")))?;
    }
    Ok(Plan {
        class_names: classes.into_iter().collect(),
        images: planned,
        train_images,
        test_images,
    })
}

/// `<path><whitespace><integer>` (or tab-separated), as the package's `_parse_split_line`.
fn parse_split_line(line: &str) -> Option<(String, i64)> {
    let (path, label) = if let Some((p, l)) = line.rsplit_once('\t') {
        (p, l)
    } else {
        line.rsplit_once(char::is_whitespace)?
    };
    let path = path.trim();
    let label: i64 = label.trim().parse().ok()?;
    if path.is_empty() {
        return None;
    }
    Some((path.to_string(), label))
}

// ---------------------------------------------------------------------------------------------
// Writing

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    plankton_core::fsx::write_atomic(path, bytes)
        .map_err(|e| PlanktonclasError::io("writing", path, e.source))
}

fn create_dir(path: &Path) -> Result<()> {
    fs::create_dir_all(path).map_err(|e| PlanktonclasError::io("creating folder", path, e))
}

fn write_layout(out: &Path, plan: &Plan) -> Result<()> {
    let train_dir = out.join("train");
    let test_dir = out.join("test");
    create_dir(&test_dir)?;
    create_dir(&out.join("splits"))?;
    for class in &plan.class_names {
        create_dir(&train_dir.join(class))?;
    }

    let mut test_labels = Vec::new();
    let mut split_rows = Vec::new();
    for img in &plan.images {
        let dest = if img.split == "test" {
            test_labels.push(vec![img.out_name.clone(), img.class.clone()]);
            test_dir.join(&img.out_name)
        } else {
            train_dir.join(&img.class).join(&img.out_name)
        };
        write_atomic(&dest, &img.bytes)?;
        split_rows.push(vec![
            img.out_name.clone(),
            img.class.clone(),
            img.split.to_string(),
        ]);
    }

    let classes = plan.class_names.len();
    let p = (1.0 / classes as f64).to_string();
    let header: Vec<&str> = std::iter::once("image")
        .chain(plan.class_names.iter().map(String::as_str))
        .collect();
    let submission = csv_bytes(
        &header,
        test_labels.iter().map(|row| {
            std::iter::once(row[0].clone())
                .chain(std::iter::repeat_n(p.clone(), classes))
                .collect::<Vec<_>>()
        }),
    );

    write_atomic(
        &out.join(TEST_LABELS_FILE),
        &csv_bytes(&["image", "class"], test_labels),
    )?;
    write_atomic(&out.join(SAMPLE_SUBMISSION_FILE), &submission)?;
    write_atomic(
        &out.join(SPLIT_FILE),
        &csv_bytes(&["image", "class", "split"], split_rows),
    )?;

    let marker = serde_json::json!({
        "package": "planktonclas",
        "version": PLANKTONCLAS_VERSION,
        "class_names": plan.class_names,
        "train_images": plan.train_images,
        "test_images": plan.test_images,
    });
    let marker = serde_json::to_vec_pretty(&marker).expect("JSON of plain values");
    write_atomic(&out.join(COMPLETE_MARKER), &marker)
}

/// The summary stored in a completion marker, or `None` when `out` is not complete.
fn read_marker(out: &Path) -> Option<PlanktonclasSummary> {
    let path = out.join(COMPLETE_MARKER);
    let bytes = fs::read(&path).ok()?;
    let parsed = (|| {
        let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        if v.get("version")?.as_str()? != PLANKTONCLAS_VERSION {
            return None;
        }
        let class_names = v
            .get("class_names")?
            .as_array()?
            .iter()
            .map(|c| c.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()?;
        Some(PlanktonclasSummary {
            class_names,
            train_images: usize::try_from(v.get("train_images")?.as_u64()?).ok()?,
            test_images: usize::try_from(v.get("test_images")?.as_u64()?).ok()?,
            from_cache: true,
        })
    })();
    if parsed.is_none() {
        tracing::warn!(marker = %path.display(), "unreadable completion marker; rewriting the dataset");
    }
    parsed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_lines_parse_like_the_package() {
        assert_eq!(
            parse_split_line("A/x.jpg 3"),
            Some(("A/x.jpg".to_string(), 3))
        );
        assert_eq!(
            parse_split_line("A/x y.jpg\t0"),
            Some(("A/x y.jpg".to_string(), 0))
        );
        assert_eq!(parse_split_line("A/x.jpg"), None);
        assert_eq!(parse_split_line("A/x.jpg three"), None);
        let lines: Vec<_> = content_lines("a 0\r\n\r\n# c\r\n b 1 \r\n").collect();
        assert_eq!(lines, vec![(1, "a 0"), (4, "b 1")]);
    }

    #[test]
    fn entry_names_are_checked() {
        let w = Path::new("w.whl");
        assert!(check_entry_name(w, "planktonclas/resources/demo-images/A/x.jpg").is_ok());
        for bad in ["../x", "a/../../x", "/etc/passwd", "a\\..\\x", "C:/x", ""] {
            assert!(check_entry_name(w, bad).is_err(), "{bad}");
        }
        assert!(split_image_path("A/x.jpg").is_ok());
        assert!(split_image_path("A/B/x.jpg").is_err());
        assert!(split_image_path("x.jpg").is_err());
        assert!(split_image_path("A/x.txt").is_err());
        assert!(split_image_path("A/x,y.jpg").is_err());
    }

    #[test]
    fn tail_keeps_the_end() {
        assert_eq!(tail(b"short\n", 100), "short");
        assert_eq!(tail(b"0123456789", 4), "...6789");
    }
}
