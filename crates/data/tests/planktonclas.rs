//! The planktonclas source: unpacking a synthetic wheel of the real structure (no network), the
//! cache and error paths of `fetch`, and one real `fetch` from PyPI.
use std::fs;
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};

use plankton_data::sources::planktonclas::{
    fetch, install_from_wheel, PlanktonclasError, PlanktonclasOptions, COMPLETE_MARKER,
    PLANKTONCLAS_VERSION, SAMPLE_SUBMISSION_FILE, SPLIT_FILE, TEST_LABELS_FILE,
};
use zip::write::SimpleFileOptions;
use zip::CompressionMethod;

const IMG: &str = "planktonclas/resources/demo-images";
const DS: &str = "planktonclas/resources/dataset_files";

fn jpeg(w: u32, h: u32, shade: u8) -> Vec<u8> {
    let img = image::GrayImage::from_fn(w, h, |x, y| image::Luma([shade ^ (x * 7 + y * 3) as u8]));
    let mut buf = Cursor::new(Vec::new());
    image::DynamicImage::ImageLuma8(img)
        .write_to(&mut buf, image::ImageFormat::Jpeg)
        .unwrap();
    buf.into_inner()
}

fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::GrayImage::from_fn(w, h, |x, y| image::Luma([(x * 20 + y) as u8]));
    let mut buf = Cursor::new(Vec::new());
    image::DynamicImage::ImageLuma8(img)
        .write_to(&mut buf, image::ImageFormat::Png)
        .unwrap();
    buf.into_inner()
}

/// The synthetic wheel's images: (path under demo-images, bytes).
fn synthetic_images() -> Vec<(String, Vec<u8>)> {
    vec![
        ("Alpha/a1.jpg".into(), jpeg(9, 7, 10)),
        ("Alpha/a2.jpg".into(), jpeg(12, 5, 20)),
        ("Alpha/a3.jpg".into(), jpeg(6, 6, 30)),
        ("Alpha/shared.jpg".into(), jpeg(8, 8, 40)),
        ("Beta/b1.jpg".into(), jpeg(10, 10, 50)),
        ("Beta/b2.png".into(), png(4, 11)),
        ("Beta/b3.jpg".into(), jpeg(7, 9, 60)),
        ("Beta/shared.jpg".into(), jpeg(5, 8, 70)),
        ("Beta/extra.jpg".into(), jpeg(3, 3, 80)),
    ]
}

/// Split files in the real format: `<Class>/<file> <label index>`, CRLF line ends.
fn synthetic_split_files() -> Vec<(&'static str, String)> {
    let crlf = |lines: &[&str]| lines.iter().map(|l| format!("{l}\r\n")).collect::<String>();
    vec![
        ("classes.txt", crlf(&["Alpha", "Beta"])),
        (
            "train.txt",
            crlf(&[
                "Alpha/a1.jpg 0",
                "Beta/b1.jpg 1",
                "Alpha/shared.jpg 0",
                "Beta/b2.png 1",
            ]),
        ),
        (
            "val.txt",
            crlf(&["Alpha/a2.jpg 0", "", "# comment", "Beta/b3.jpg\t1"]),
        ),
        ("test.txt", crlf(&["Alpha/a3.jpg 0", "Beta/shared.jpg 1"])),
    ]
}

/// Writes a wheel with the real internal structure; `extra` entries are appended verbatim and
/// `replace` overrides split files by name.
fn build_wheel(path: &Path, extra: &[(&str, &[u8])], replace: &[(&str, &str)]) -> PathBuf {
    let mut w = zip::ZipWriter::new(fs::File::create(path).unwrap());
    let deflated = SimpleFileOptions::default().compression_method(CompressionMethod::Deflated);
    let stored = SimpleFileOptions::default().compression_method(CompressionMethod::Stored);
    w.start_file("planktonclas/__init__.py", deflated).unwrap();
    w.write_all(b"# synthetic\n").unwrap();
    w.add_directory(format!("{IMG}/Alpha/"), stored).unwrap();
    for (rel, bytes) in synthetic_images() {
        w.start_file(format!("{IMG}/{rel}"), stored).unwrap();
        w.write_all(&bytes).unwrap();
    }
    w.start_file(format!("{IMG}/Beta/.DS_Store"), stored)
        .unwrap();
    w.write_all(b"junk").unwrap();
    for (name, text) in synthetic_split_files() {
        let text = replace
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(text, |(_, t)| t.to_string());
        w.start_file(format!("{DS}/{name}"), deflated).unwrap();
        w.write_all(text.as_bytes()).unwrap();
    }
    w.start_file(format!("{DS}/README.md"), deflated).unwrap();
    w.write_all(b"not a split file").unwrap();
    w.start_file(
        format!("planktonclas-{PLANKTONCLAS_VERSION}.dist-info/WHEEL"),
        deflated,
    )
    .unwrap();
    w.write_all(b"Wheel-Version: 1.0\n").unwrap();
    for (name, bytes) in extra {
        w.start_file(*name, stored).unwrap();
        w.write_all(bytes).unwrap();
    }
    w.finish().unwrap();
    path.to_path_buf()
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// All regular files under `dir`, relative, sorted.
fn files_under(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[test]
fn install_from_synthetic_wheel_writes_competition_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let wheel = build_wheel(
        &tmp.path().join("planktonclas-0.2.4-py3-none-any.whl"),
        &[],
        &[],
    );
    let out = tmp.path().join("data");

    let s = install_from_wheel(&wheel, &out).unwrap();
    assert!(!s.from_cache);
    assert_eq!(s.class_names, vec!["Alpha", "Beta"]);
    assert_eq!(s.train_images, 7, "4 train + 2 val + 1 unlisted");
    assert_eq!(s.test_images, 2);

    // Every image exactly where the Kaggle layout puts it; `shared.jpg` occurs in both classes
    // and gets a class prefix; the .DS_Store and non-data entries are not copied.
    let expected = vec![
        COMPLETE_MARKER,
        SAMPLE_SUBMISSION_FILE,
        SPLIT_FILE,
        TEST_LABELS_FILE,
        "test/a3.jpg",
        "test/Beta_shared.jpg",
        "train/Alpha/Alpha_shared.jpg",
        "train/Alpha/a1.jpg",
        "train/Alpha/a2.jpg",
        "train/Beta/b1.jpg",
        "train/Beta/b2.png",
        "train/Beta/b3.jpg",
        "train/Beta/extra.jpg",
    ];
    let mut expected: Vec<String> = expected.into_iter().map(String::from).collect();
    expected.sort();
    assert_eq!(files_under(&out), expected);

    // Bytes are copied unchanged.
    let images = synthetic_images();
    let bytes_of = |rel: &str| images.iter().find(|(r, _)| r == rel).unwrap().1.clone();
    assert_eq!(
        fs::read(out.join("train/Alpha/a1.jpg")).unwrap(),
        bytes_of("Alpha/a1.jpg")
    );
    assert_eq!(
        fs::read(out.join("train/Beta/b2.png")).unwrap(),
        bytes_of("Beta/b2.png")
    );
    assert_eq!(
        fs::read(out.join("test/Beta_shared.jpg")).unwrap(),
        bytes_of("Beta/shared.jpg")
    );
    let decoded = image::open(out.join("train/Alpha/a2.jpg")).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (12, 5));

    assert_eq!(
        read(&out.join(TEST_LABELS_FILE)),
        "image,class\na3.jpg,Alpha\nBeta_shared.jpg,Beta\n"
    );

    let sub = read(&out.join(SAMPLE_SUBMISSION_FILE));
    let lines: Vec<&str> = sub.lines().collect();
    assert_eq!(lines[0], "image,Alpha,Beta");
    assert_eq!(lines.len(), 3);
    for (line, name) in lines[1..].iter().zip(["a3.jpg", "Beta_shared.jpg"]) {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f[0], name);
        let p: Vec<f64> = f[1..].iter().map(|v| v.parse().unwrap()).collect();
        assert_eq!(p.len(), 2);
        assert!(p.iter().all(|&v| (v - 0.5).abs() < 1e-12), "{line}");
    }

    assert_eq!(
        read(&out.join(SPLIT_FILE)),
        "image,class,split\n\
         a1.jpg,Alpha,train\n\
         b1.jpg,Beta,train\n\
         Alpha_shared.jpg,Alpha,train\n\
         b2.png,Beta,train\n\
         a2.jpg,Alpha,val\n\
         b3.jpg,Beta,val\n\
         a3.jpg,Alpha,test\n\
         Beta_shared.jpg,Beta,test\n\
         extra.jpg,Beta,unlisted\n"
    );
    let marker = read(&out.join(COMPLETE_MARKER));
    assert!(marker.contains(PLANKTONCLAS_VERSION), "{marker}");
}

#[test]
fn second_install_is_a_cached_no_op() {
    let tmp = tempfile::tempdir().unwrap();
    let wheel = build_wheel(&tmp.path().join("w.whl"), &[], &[]);
    let out = tmp.path().join("data");
    let first = install_from_wheel(&wheel, &out).unwrap();
    assert!(!first.from_cache);

    // Proof that nothing is rewritten: a removed file stays removed, and even a vanished wheel
    // does not matter.
    fs::remove_file(out.join("train/Alpha/a1.jpg")).unwrap();
    fs::remove_file(&wheel).unwrap();
    let second = install_from_wheel(&wheel, &out).unwrap();
    assert!(second.from_cache);
    assert_eq!(second.class_names, first.class_names);
    assert_eq!(second.train_images, first.train_images);
    assert_eq!(second.test_images, first.test_images);
    assert!(!out.join("train/Alpha/a1.jpg").exists());
}

#[test]
fn zip_slip_entries_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        format!("{IMG}/Alpha/../../../../../evil.jpg"),
        "../evil.jpg".to_string(),
        "/tmp/planktonclas-evil.jpg".to_string(),
        format!("{IMG}\\..\\..\\evil.jpg"),
    ];
    for (i, entry) in cases.iter().enumerate() {
        let wheel = build_wheel(
            &tmp.path().join(format!("slip{i}.whl")),
            &[(entry.as_str(), &jpeg(4, 4, 1))],
            &[],
        );
        let out = tmp.path().join(format!("out{i}"));
        let err = install_from_wheel(&wheel, &out).unwrap_err();
        assert!(
            matches!(err, PlanktonclasError::UnsafeEntry { .. }),
            "{entry}: {err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("unsafe entry") && msg.contains("slip"),
            "{msg}"
        );
        assert!(!out.join(COMPLETE_MARKER).exists());
    }
    assert!(!tmp.path().join("evil.jpg").exists());
    assert!(!Path::new("/tmp/planktonclas-evil.jpg").exists());
}

#[test]
fn unexpected_entries_and_bad_split_files_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");

    // An image nested one folder too deep.
    let nested = format!("{IMG}/Alpha/sub/x.jpg");
    let wheel = build_wheel(
        &tmp.path().join("a.whl"),
        &[(nested.as_str(), &jpeg(4, 4, 1))],
        &[],
    );
    let err = install_from_wheel(&wheel, &out).unwrap_err();
    assert!(
        matches!(err, PlanktonclasError::UnexpectedEntry { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("sub/x.jpg"), "{err}");

    // A non-image file among the images.
    let text = format!("{IMG}/Beta/notes.txt");
    let wheel = build_wheel(&tmp.path().join("b.whl"), &[(text.as_str(), b"hi")], &[]);
    let err = install_from_wheel(&wheel, &out).unwrap_err();
    assert!(
        matches!(err, PlanktonclasError::UnexpectedEntry { .. }),
        "{err}"
    );

    // A label that contradicts the image's folder.
    let wheel = build_wheel(
        &tmp.path().join("c.whl"),
        &[],
        &[("test.txt", "Alpha/a3.jpg 1\r\nBeta/shared.jpg 1\r\n")],
    );
    let err = install_from_wheel(&wheel, &out).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, PlanktonclasError::SplitFile { .. }), "{msg}");
    assert!(msg.contains("test.txt line 1"), "{msg}");

    // A split file naming an image the wheel lacks.
    let wheel = build_wheel(
        &tmp.path().join("d.whl"),
        &[],
        &[("val.txt", "Alpha/a2.jpg 0\r\nAlpha/missing.jpg 0\r\n")],
    );
    let err = install_from_wheel(&wheel, &out).unwrap_err();
    assert!(err.to_string().contains("missing.jpg"), "{err}");

    // A malformed line.
    let wheel = build_wheel(
        &tmp.path().join("e.whl"),
        &[],
        &[("train.txt", "Alpha/a1.jpg\r\n")],
    );
    let err = install_from_wheel(&wheel, &out).unwrap_err();
    assert!(err.to_string().contains("train.txt line 1"), "{err}");

    // Not a zip at all.
    let junk = tmp.path().join("junk.whl");
    fs::write(&junk, b"not a zip").unwrap();
    let err = install_from_wheel(&junk, &out).unwrap_err();
    assert!(matches!(err, PlanktonclasError::Zip { .. }), "{err}");
    assert!(err.to_string().contains("junk.whl"), "{err}");

    assert!(!out.join(COMPLETE_MARKER).exists());
}

#[test]
fn fetch_uses_a_wheel_already_in_the_cache_without_running_pip() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    fs::create_dir_all(&cache).unwrap();
    build_wheel(
        &cache.join(format!(
            "planktonclas-{PLANKTONCLAS_VERSION}-py3-none-any.whl"
        )),
        &[],
        &[],
    );
    let opts = PlanktonclasOptions {
        out: tmp.path().join("data"),
        cache_dir: cache,
        // Running pip would fail: proves the cached wheel is used.
        python: "/nonexistent/python3".to_string(),
    };
    let s = fetch(&opts).unwrap();
    assert!(!s.from_cache);
    assert_eq!((s.train_images, s.test_images), (7, 2));
    let again = fetch(&opts).unwrap();
    assert!(again.from_cache);
}

#[test]
fn failed_download_names_the_command_and_suggests_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");

    // The interpreter cannot be started.
    let opts = PlanktonclasOptions {
        out: tmp.path().join("data"),
        cache_dir: cache.clone(),
        python: "/nonexistent/python3".to_string(),
    };
    let msg = fetch(&opts).unwrap_err().to_string();
    assert!(
        msg.contains("/nonexistent/python3 -m pip download"),
        "{msg}"
    );
    assert!(
        msg.contains("by hand") && msg.contains(&cache.display().to_string()),
        "{msg}"
    );

    // The command runs and fails: its stderr is quoted.
    let script = tmp.path().join("fake-python");
    fs::write(
        &script,
        "#!/bin/sh\necho 'ERROR: no network here' >&2\nexit 3\n",
    )
    .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let opts = PlanktonclasOptions {
        python: script.display().to_string(),
        ..opts
    };
    let err = fetch(&opts).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, PlanktonclasError::Download { .. }), "{msg}");
    assert!(msg.contains("-m pip download --no-deps"), "{msg}");
    assert!(msg.contains("planktonclas==0.2.4"), "{msg}");
    assert!(msg.contains("ERROR: no network here"), "{msg}");
    assert!(msg.contains("by hand"), "{msg}");
    assert!(!opts.out.join(COMPLETE_MARKER).exists());
}

/// The one test that uses the network: `pip download` from PyPI.
#[test]
fn real_fetch_gives_105_images_in_6_classes() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = PlanktonclasOptions::new(tmp.path().join("data"), tmp.path().join("cache"));
    assert_eq!(opts.python, "python3");
    let s = fetch(&opts).unwrap_or_else(|e| panic!("{e}"));
    assert!(!s.from_cache);
    assert_eq!(s.class_names.len(), 6, "{:?}", s.class_names);
    assert_eq!(s.train_images + s.test_images, 105);

    let out = &opts.out;
    let mut on_disk_train = 0;
    for class in &s.class_names {
        on_disk_train += fs::read_dir(out.join("train").join(class)).unwrap().count();
    }
    let on_disk_test = fs::read_dir(out.join("test")).unwrap().count();
    assert_eq!(on_disk_train, s.train_images);
    assert_eq!(on_disk_test, s.test_images);
    assert_eq!(on_disk_train + on_disk_test, 105);

    let split = read(&out.join(SPLIT_FILE));
    let rows: Vec<&str> = split.lines().skip(1).collect();
    assert_eq!(rows.len(), 105);
    let test_rows = rows.iter().filter(|r| r.ends_with(",test")).count();
    assert_eq!(test_rows, s.test_images);
    assert_eq!(
        read(&out.join(TEST_LABELS_FILE)).lines().count(),
        1 + s.test_images
    );
    let header = read(&out.join(SAMPLE_SUBMISSION_FILE));
    assert_eq!(
        header.lines().next().unwrap(),
        format!("image,{}", s.class_names.join(","))
    );

    let again = fetch(&opts).unwrap();
    assert!(again.from_cache);
}
