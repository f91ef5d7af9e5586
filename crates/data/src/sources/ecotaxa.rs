//! EcoTaxa tables (<https://ecotaxa.obs-vlfr.fr>), as its exports write them and its import
//! reads them: tab-separated, UTF-8 (with or without a byte-order mark), a header row of
//! lowercase `<table>_<field>` names, then, in import packages and some exports, a row of
//! column types (`[t]` text, `[f]` float); values may be quoted. Only what we use is read:
//! the object id, its image file, its category and the annotation status.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum EcotaxaError {
    #[error("{path}: {reason}")]
    Table { path: PathBuf, reason: String },
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One row of an EcoTaxa table.
#[derive(Debug, Clone, PartialEq)]
pub struct EcotaxaObject {
    pub object_id: String,
    /// Relative to the table's folder (exports put images in per-sample subfolders).
    pub img_file_name: Option<String>,
    /// The taxon's display name (`object_annotation_category`), if any.
    pub category: Option<String>,
    /// `predicted`, `validated`, `dubious`, `discarded` (lowercased), if any.
    pub status: Option<String>,
    /// The row's line in the table (for messages).
    pub line: u64,
}

impl EcotaxaObject {
    /// A category an expert confirmed: what training may use.
    pub fn validated_category(&self) -> Option<&str> {
        (self.status.as_deref() == Some("validated"))
            .then_some(self.category.as_deref())
            .flatten()
    }
}

/// True for a row of EcoTaxa column types (`[t]`, `[f]`) rather than data.
fn is_types_row(record: &csv::StringRecord) -> bool {
    !record.is_empty()
        && record
            .iter()
            .all(|v| matches!(v.trim(), "[t]" | "[f]" | "[i]" | ""))
        && record.iter().any(|v| !v.trim().is_empty())
}

/// Reads an EcoTaxa table (`ecotaxa_*.tsv`). Needs the `object_id` column; the image, category
/// and status columns are read when present.
pub fn read_table(path: &Path) -> Result<Vec<EcotaxaObject>, EcotaxaError> {
    let bytes = std::fs::read(path).map_err(|source| EcotaxaError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    read_table_bytes(&bytes, path)
}

/// [`read_table`] on bytes already read (a table inside a zip); `path` names it in errors.
pub fn read_table_bytes(bytes: &[u8], path: &Path) -> Result<Vec<EcotaxaObject>, EcotaxaError> {
    let bad = |reason: String| EcotaxaError::Table {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    // EcoTaxa itself reads a table without a byte-order mark as Latin-1: text that is not UTF-8
    // is taken as Latin-1 here (every byte is a character), UTF-8 as UTF-8.
    let text: std::borrow::Cow<'_, [u8]> = match std::str::from_utf8(bytes) {
        Ok(_) => bytes.into(),
        Err(_) => bytes
            .iter()
            .map(|&b| b as char)
            .collect::<String>()
            .into_bytes()
            .into(),
    };
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(b'\t')
        .flexible(true)
        .from_reader(text.as_ref());
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| bad(e.to_string()))?
        .iter()
        .map(|h| h.trim().to_ascii_lowercase())
        .collect();
    let column = |name: &str| header.iter().position(|h| h == name);
    let Some(id_col) = column("object_id") else {
        // A file that is no table at all (an image given by mistake) has a header of junk.
        let shown: Vec<String> = header
            .iter()
            .take(8)
            .map(|h| h.chars().filter(|c| !c.is_control()).take(40).collect())
            .collect();
        return Err(bad(format!(
            "not an EcoTaxa table: no `object_id` column (header: {}{})",
            shown.join(", "),
            if header.len() > 8 { ", ..." } else { "" }
        )));
    };
    let (img_col, cat_col, status_col) = (
        column("img_file_name"),
        column("object_annotation_category"),
        column("object_annotation_status"),
    );
    let mut objects = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let record = record.map_err(|e| bad(e.to_string()))?;
        if i == 0 && is_types_row(&record) {
            continue;
        }
        if record.iter().all(|v| v.trim().is_empty()) {
            continue;
        }
        let line = record.position().map_or(0, |p| p.line());
        let get = |c: Option<usize>| {
            c.and_then(|c| record.get(c))
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(String::from)
        };
        // An empty id is kept (empty): `import` sets that object aside with its line.
        objects.push(EcotaxaObject {
            object_id: get(Some(id_col)).unwrap_or_default(),
            img_file_name: get(img_col),
            category: get(cat_col),
            status: get(status_col).map(|s| s.to_ascii_lowercase()),
            line,
        });
    }
    Ok(objects)
}

/// How `import` maps EcoTaxa taxa to class folders.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// EcoTaxa category -> class folder; `None` leaves the category's objects out (a merge is
    /// two categories to one class). Categories not listed keep their name.
    pub mapping: std::collections::HashMap<String, Option<String>>,
}

/// Reads a mapping CSV: `ecotaxa,class` (an empty class leaves the category out).
pub fn read_mapping(
    path: &Path,
) -> Result<std::collections::HashMap<String, Option<String>>, EcotaxaError> {
    use crate::sources::dataset::{read_pairs_csv, DatasetError};
    let rows = read_pairs_csv(path, &[["ecotaxa", "class"]]).map_err(|e| match e {
        DatasetError::Io { path, source } => EcotaxaError::Io { path, source },
        other => EcotaxaError::Table {
            path: path.to_path_buf(),
            reason: match other {
                DatasetError::BadCsv { reason, .. } => reason,
                e => e.to_string(),
            },
        },
    })?;
    let mut map = std::collections::HashMap::new();
    for (from, to) in rows {
        if from.is_empty() {
            continue;
        }
        if map
            .insert(from.clone(), (!to.is_empty()).then_some(to))
            .is_some()
        {
            return Err(EcotaxaError::Table {
                path: path.to_path_buf(),
                reason: format!("`{from}` is mapped twice"),
            });
        }
    }
    Ok(map)
}

#[derive(Debug, Clone, Default)]
pub struct ImportSummary {
    /// Validated objects, per class folder.
    pub labelled: std::collections::BTreeMap<String, usize>,
    /// Objects without a validated category (test images).
    pub unlabelled: usize,
    /// Objects of categories the mapping leaves out.
    pub left_out: usize,
    /// Objects set aside: (object id, reason).
    pub problems: Vec<(String, String)>,
    pub tables: usize,
}

/// Where an import's tables and images are read from.
enum Package {
    Folder(PathBuf),
    Zip(zip::ZipArchive<std::fs::File>),
}

impl Package {
    fn tables(&mut self) -> Vec<String> {
        let is_table = |name: &str| {
            let file = name.rsplit('/').next().unwrap_or(name);
            file.starts_with("ecotaxa") && (file.ends_with(".tsv") || file.ends_with(".txt"))
        };
        match self {
            Package::Folder(root) => plankton_core::fsx::files_under(root)
                .map(|l| l.files)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|p| {
                    p.strip_prefix(&*root)
                        .ok()
                        .map(|r| r.to_string_lossy().into_owned())
                })
                .filter(|n| is_table(n))
                .collect(),
            Package::Zip(z) => {
                let mut names: Vec<String> = z
                    .file_names()
                    .filter(|n| is_table(n))
                    .map(String::from)
                    .collect();
                names.sort();
                names
            }
        }
    }

    /// Reads an entry of at most `limit` bytes (checked before reading: a zip entry's declared
    /// size, a file's length; and while reading, as a zip can lie).
    fn read(&mut self, name: &str, limit: u64) -> std::io::Result<Vec<u8>> {
        let too_big = |size: u64| {
            std::io::Error::other(format!(
                "{size} bytes, over the limit of {limit} bytes (a zip bomb, or not an image)"
            ))
        };
        let mut bytes = Vec::new();
        match self {
            Package::Folder(root) => {
                let path = root.join(name);
                let size = std::fs::metadata(&path)?.len();
                if size > limit {
                    return Err(too_big(size));
                }
                std::io::Read::read_to_end(
                    &mut std::io::Read::take(std::fs::File::open(&path)?, limit + 1),
                    &mut bytes,
                )?;
            }
            Package::Zip(z) => {
                let f = z.by_name(name).map_err(std::io::Error::other)?;
                if f.size() > limit {
                    return Err(too_big(f.size()));
                }
                std::io::Read::read_to_end(&mut std::io::Read::take(f, limit + 1), &mut bytes)?;
            }
        }
        if bytes.len() as u64 > limit {
            return Err(too_big(bytes.len() as u64));
        }
        Ok(bytes)
    }
}

/// An image path that stays inside the package: relative, no `..`.
fn inside_package(name: &str) -> bool {
    let p = Path::new(name);
    !name.contains('\\')
        && p.components().all(|c| {
            matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::CurDir
            )
        })
}

/// The largest table read (a project export of millions of objects is a few hundred MB).
const MAX_TABLE_BYTES: u64 = 4 << 30;

/// A file name for an object's image, unique among `taken`: its id with path separators and
/// other odd characters as `_`, then `.ext` (`_2`, `_3`... before it when taken).
pub fn object_file_name(
    id: &str,
    ext: &str,
    taken: &mut std::collections::HashSet<String>,
) -> String {
    let stem: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut name = format!("{stem}.{ext}");
    let mut n = 1;
    while !taken.insert(name.clone()) {
        n += 1;
        name = format!("{stem}_{n}.{ext}");
    }
    name
}

/// A class folder name: path separators and a leading dot made harmless.
fn folder_name(category: &str) -> String {
    let clean: String = category
        .chars()
        .map(|c| {
            if matches!(c, '/' | '\\' | '\0') {
                '_'
            } else {
                c
            }
        })
        .collect();
    match clean.strip_prefix('.') {
        Some(rest) => format!("_{rest}"),
        None => clean,
    }
}

/// An EcoTaxa export or package (a `.zip`, a folder, or one `ecotaxa*.tsv`) to a dataset in the
/// competition layout under `out` (which must not exist or be empty): validated objects to
/// `train/<class>/`, the others to `test/`, each image named after its object id; `objects.csv`
/// keeps the link back (`image,object_id,category,status`). An object whose image is missing
/// or not an image is set aside with the reason; nothing else is lost.
pub fn import(
    input: &Path,
    out: &Path,
    opts: &ImportOptions,
) -> Result<ImportSummary, EcotaxaError> {
    let bad = |path: &Path, reason: String| EcotaxaError::Table {
        path: path.to_path_buf(),
        reason,
    };
    let mut package = if input.is_dir() {
        Package::Folder(input.to_path_buf())
    } else if input
        .extension()
        .is_some_and(|x| x.eq_ignore_ascii_case("zip"))
    {
        let f = std::fs::File::open(input).map_err(|source| EcotaxaError::Io {
            path: input.to_path_buf(),
            source,
        })?;
        Package::Zip(
            zip::ZipArchive::new(f).map_err(|e| bad(input, format!("not a readable zip: {e}")))?,
        )
    } else if input.is_file() {
        let parent = input.parent().map(Path::to_path_buf).unwrap_or_default();
        let name = input
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        return import_tables(
            Package::Folder(parent.clone()),
            vec![name],
            &parent,
            out,
            opts,
        );
    } else {
        return Err(bad(input, "no such file or folder".into()));
    };
    let tables = package.tables();
    if tables.is_empty() {
        return Err(bad(input, "no EcoTaxa table (ecotaxa*.tsv) in it".into()));
    }
    import_tables(package, tables, input, out, opts)
}

fn import_tables(
    mut package: Package,
    tables: Vec<String>,
    base: &Path,
    out: &Path,
    opts: &ImportOptions,
) -> Result<ImportSummary, EcotaxaError> {
    let bad = |path: &Path, reason: String| EcotaxaError::Table {
        path: path.to_path_buf(),
        reason,
    };
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| EcotaxaError::Io { path, source }
    };
    let occupied = |p: &Path| {
        p.exists()
            && std::fs::read_dir(p)
                .map(|mut d| d.next().is_some())
                .unwrap_or(true)
    };
    if occupied(out) {
        return Err(bad(
            out,
            "exists and is not empty: give a new folder for the dataset".into(),
        ));
    }
    // Every table is read first: nothing is created for a package that is not one.
    let mut parsed = Vec::new();
    for table in tables {
        let table_path = base.join(&table);
        let bytes = package
            .read(&table, MAX_TABLE_BYTES)
            .map_err(io(&table_path))?;
        parsed.push((table.clone(), read_table_bytes(&bytes, &table_path)?));
    }
    // Written into a staging folder beside `out` and renamed into place at the end: a failed
    // or killed import leaves no dataset that looks complete.
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "dataset".into());
    let staging = out.with_file_name(format!(".{name}.importing-{}", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io(&staging))?;
    }
    std::fs::create_dir_all(staging.join("test")).map_err(io(&staging))?;
    let result = fill(&mut package, parsed, base, &staging, opts);
    let summary = match result {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    if out.exists() {
        // Empty (checked above); another import may have filled it meanwhile.
        std::fs::remove_dir(out).map_err(|e| {
            let _ = std::fs::remove_dir_all(&staging);
            bad(out, format!("was filled while importing: {e}"))
        })?;
    }
    std::fs::rename(&staging, out).map_err(|e| {
        let _ = std::fs::remove_dir_all(&staging);
        bad(
            out,
            format!("cannot move the imported dataset into place: {e}"),
        )
    })?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        let _ = std::fs::File::open(parent).and_then(|d| d.sync_all());
    }
    Ok(summary)
}

/// Writes the objects' images under `dir` (a staging folder) and `objects.csv`. An object that
/// cannot be imported is set aside with the reason; only a failure to write `objects.csv` stops.
fn fill(
    package: &mut Package,
    parsed: Vec<(String, Vec<EcotaxaObject>)>,
    base: &Path,
    dir: &Path,
    opts: &ImportOptions,
) -> Result<ImportSummary, EcotaxaError> {
    let image_limit = plankton_core::decode::DecodeLimits::default().max_bytes;
    let mut summary = ImportSummary {
        tables: parsed.len(),
        ..Default::default()
    };
    let mut seen = std::collections::HashSet::new();
    let mut taken = std::collections::HashSet::new();
    let mut rows: Vec<Vec<String>> = Vec::new();
    for (table, objects) in parsed {
        let table_dir = table.rsplit_once('/').map_or("", |(d, _)| d).to_string();
        for object in objects {
            let mut set_aside = |reason: String| {
                let who = if object.object_id.is_empty() {
                    format!("{table} line {}", object.line)
                } else {
                    object.object_id.clone()
                };
                summary.problems.push((who, reason));
            };
            if object.object_id.is_empty() {
                set_aside("no object_id".into());
                continue;
            }
            // An object with several images has a row per image: its first one is used.
            if !seen.insert(object.object_id.clone()) {
                continue;
            }
            let Some(img) = object.img_file_name.as_deref() else {
                set_aside("no img_file_name".into());
                continue;
            };
            if !inside_package(img) {
                set_aside(format!("image path `{img}` leaves the package: not read"));
                continue;
            }
            let img_name = if table_dir.is_empty() {
                img.to_string()
            } else {
                format!("{table_dir}/{img}")
            };
            let class = match object.validated_category() {
                Some(c) => match opts.mapping.get(c) {
                    Some(None) => {
                        summary.left_out += 1;
                        continue;
                    }
                    Some(Some(to)) => Some(folder_name(to)),
                    None => Some(folder_name(c)),
                },
                None => None,
            };
            let pixels = match package.read(&img_name, image_limit) {
                Ok(b) => b,
                Err(e) => {
                    set_aside(format!("image {}: {e}", base.join(&img_name).display()));
                    continue;
                }
            };
            if let Err(e) = plankton_core::decode::decode_bytes(
                &pixels,
                &base.join(&img_name),
                &Default::default(),
            ) {
                set_aside(e.to_string());
                continue;
            }
            let ext = Path::new(img)
                .extension()
                .map(|x| x.to_string_lossy().to_ascii_lowercase())
                .unwrap_or_else(|| "png".into());
            let file = object_file_name(&object.object_id, &ext, &mut taken);
            let dest = match &class {
                Some(c) => dir.join("train").join(c).join(&file),
                None => dir.join("test").join(&file),
            };
            let written = dest
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    plankton_core::fsx::write_atomic(&dest, &pixels).map_err(|e| e.to_string())
                });
            if let Err(e) = written {
                set_aside(format!("cannot write {}: {e}", dest.display()));
                continue;
            }
            match &class {
                Some(c) => *summary.labelled.entry(c.clone()).or_default() += 1,
                None => summary.unlabelled += 1,
            }
            rows.push(vec![
                file,
                object.object_id.clone(),
                object.category.clone().unwrap_or_default(),
                object.status.clone().unwrap_or_default(),
            ]);
        }
    }
    let csv = crate::table::csv_bytes(&["image", "object_id", "category", "status"], rows);
    let p = dir.join("objects.csv");
    plankton_core::fsx::write_atomic(&p, &csv).map_err(|e| EcotaxaError::Table {
        path: p.clone(),
        reason: e.to_string(),
    })?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of a real general export: BOM, quoted strings, no types row, images in
    /// per-sample folders; and of an import package: a types row.
    #[test]
    fn exports_and_import_packages_are_read_alike() {
        let dir = tempfile::tempdir().unwrap();
        let export = dir.path().join("ecotaxa_export.tsv");
        std::fs::write(
            &export,
            "\u{feff}\"img_file_name\"\t\"img_rank\"\t\"object_id\"\t\"object_annotation_status\"\t\"object_annotation_category\"\t\"object_annotation_hierarchy\"\n\
             \"s1/a_1.png\"\t0\t\"a_1\"\t\"validated\"\t\"Oncaeidae\"\t\"Biota>Animalia>Oncaeidae\"\n\
             \"s1/a_2.png\"\t0\t\"a_2\"\t\"predicted\"\t\"detritus\"\t\"Biota>detritus\"\n\
             \"s1/a_3.png\"\t0\t\"a_3\"\t\"\"\t\"\"\t\"\"\n",
        )
        .unwrap();
        let rows = read_table(&export).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].img_file_name.as_deref(), Some("s1/a_1.png"));
        assert_eq!(rows[0].validated_category(), Some("Oncaeidae"));
        assert_eq!(
            rows[1].validated_category(),
            None,
            "predicted is not a label"
        );
        assert_eq!(
            (rows[2].category.as_deref(), rows[2].status.as_deref()),
            (None, None)
        );

        let package = dir.path().join("ecotaxa_pack.tsv");
        std::fs::write(
            &package,
            "object_id\timg_file_name\tobject_annotation_status\tobject_annotation_category\tobject_area\n\
             [t]\t[t]\t[t]\t[t]\t[f]\n\
             x\tx.png\tValidated\tcopepod\t12\n",
        )
        .unwrap();
        let rows = read_table(&package).unwrap();
        assert_eq!(rows.len(), 1, "the types row is not an object");
        assert_eq!(rows[0].validated_category(), Some("copepod"));

        std::fs::write(&package, "image\tclass\nx\ty\n").unwrap();
        let e = read_table(&package).unwrap_err().to_string();
        assert!(
            e.contains("ecotaxa_pack.tsv") && e.contains("no `object_id`"),
            "{e}"
        );
    }

    fn png(v: u8) -> Vec<u8> {
        let mut out = Vec::new();
        image::GrayImage::from_pixel(6, 5, image::Luma([v]))
            .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    /// What a hostile or broken package holds is set aside object by object with the reason;
    /// nothing outside the package is read; a zip bomb is refused by its declared size; the
    /// dataset appears whole or not at all.
    #[test]
    fn import_sets_bad_objects_aside_and_reads_nothing_outside_the_package() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret.png"), png(9)).unwrap();
        let zip_path = dir.path().join("export.zip");
        let mut z = zip::ZipWriter::new(std::fs::File::create(&zip_path).unwrap());
        let deflated = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        // Latin-1 (no BOM), as EcoTaxa itself would read it.
        let mut table: Vec<u8> =
            b"object_id\timg_file_name\tobject_annotation_status\tobject_annotation_category\n"
                .to_vec();
        table.extend_from_slice(b"a\ts/a.png\tvalidated\tcop\xe9pode\n");
        table.extend_from_slice(b"b\ts/b.png\tpredicted\tdetritus\n");
        table.extend_from_slice(b"c\t../secret.png\tvalidated\tcop\xe9pode\n");
        table.extend_from_slice(b"\ts/a.png\tvalidated\tx\n");
        table.extend_from_slice(b"d\ts/missing.png\tvalidated\tx\n");
        table.extend_from_slice(b"e\ts/bomb.png\tvalidated\tx\n");
        z.start_file("ecotaxa_export.tsv", deflated).unwrap();
        z.write_all(&table).unwrap();
        for (name, bytes) in [("s/a.png", png(1)), ("s/b.png", png(2))] {
            z.start_file(name, deflated).unwrap();
            z.write_all(&bytes).unwrap();
        }
        z.start_file("s/bomb.png", deflated).unwrap();
        z.write_all(&vec![0u8; 65 << 20]).unwrap();
        z.finish().unwrap();

        let out = dir.path().join("ds");
        let s = import(&zip_path, &out, &ImportOptions::default()).unwrap();
        assert_eq!(s.labelled.get("copépode"), Some(&1), "{s:?}");
        assert_eq!(s.unlabelled, 1);
        let reasons: Vec<String> = s
            .problems
            .iter()
            .map(|(w, r)| format!("{w}: {r}"))
            .collect();
        assert_eq!(reasons.len(), 4, "{reasons:?}");
        assert!(
            reasons[0].starts_with("c: image path `../secret.png` leaves the package"),
            "{reasons:?}"
        );
        assert!(
            reasons[1].starts_with("ecotaxa_export.tsv line 5: no object_id"),
            "{reasons:?}"
        );
        assert!(
            reasons[2].starts_with("d: image") && reasons[2].contains("missing.png"),
            "{reasons:?}"
        );
        assert!(
            reasons[3].starts_with("e: image") && reasons[3].contains("over the limit"),
            "{reasons:?}"
        );
        assert_eq!(
            std::fs::read(out.join("train/copépode/a.png")).unwrap(),
            png(1)
        );
        assert!(out.join("test/b.png").is_file() && out.join("objects.csv").is_file());
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("importing"))
            .collect();
        assert!(left.is_empty(), "no staging folder left: {left:?}");
        // A second import into it is refused; a package that is not one creates nothing.
        let e = import(&zip_path, &out, &ImportOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("exists and is not empty"), "{e}");
        let not = dir.path().join("ecotaxa_bad.tsv");
        std::fs::write(&not, "image\tclass\n").unwrap();
        let out2 = dir.path().join("ds2");
        assert!(import(&not, &out2, &ImportOptions::default()).is_err());
        assert!(!out2.exists());
    }
}
