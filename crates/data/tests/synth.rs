//! Synthetic plankton generator: determinism, Kaggle layout, size information, appearance.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use plankton_data::sources::synth::{class_names, generate, render, SynthError, SynthOptions};

const N: usize = 121;

fn opts(classes: usize, per_class: usize, test: usize, seed: u64, threads: usize) -> SynthOptions {
    SynthOptions {
        classes,
        per_class,
        test,
        seed,
        threads,
    }
}

/// All files under `root` (relative path -> bytes).
fn read_tree(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    fs::read(&p).unwrap(),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn files_in(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn render_is_deterministic_in_seed_class_and_index() {
    let mut differs_by_seed = 0;
    for c in [0, 17, 40, 60, 77, 95, 120] {
        for i in [0u64, 5] {
            let a = render(7, c, N, i);
            let b = render(7, c, N, i);
            assert_eq!(a.dimensions(), b.dimensions());
            assert_eq!(
                a.as_raw(),
                b.as_raw(),
                "class {c} index {i} not reproducible"
            );
            let other = render(8, c, N, i);
            if other.dimensions() != a.dimensions() || other.as_raw() != a.as_raw() {
                differs_by_seed += 1;
            }
            let next = render(7, c, N, i + 1);
            assert!(next.dimensions() != a.dimensions() || next.as_raw() != a.as_raw());
        }
    }
    assert_eq!(
        differs_by_seed, 14,
        "a different seed must give different images"
    );
}

#[test]
fn output_does_not_depend_on_thread_count() {
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let o = opts(6, 4, 5, 42, 1);
    generate(&o, d1.path()).unwrap();
    generate(
        &SynthOptions {
            threads: 2,
            ..o.clone()
        },
        d2.path(),
    )
    .unwrap();
    let t1 = read_tree(d1.path());
    let t2 = read_tree(d2.path());
    assert_eq!(t1.len(), 6 * 4 + 5 + 2);
    assert_eq!(t1.keys().collect::<Vec<_>>(), t2.keys().collect::<Vec<_>>());
    for (k, v) in &t1 {
        assert!(
            v == &t2[k],
            "{} differs between 1 and 2 threads",
            k.display()
        );
    }
    // a rerun into the same folder rewrites identical bytes and leaves no temporary files
    generate(&SynthOptions { threads: 3, ..o }, d1.path()).unwrap();
    assert_eq!(read_tree(d1.path()), t1);
}

#[test]
fn writes_the_kaggle_layout() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("data"); // does not exist yet
    let (classes, per_class, test) = (9, 3, 12);
    let s = generate(&opts(classes, per_class, test, 3, 2), &out).unwrap();
    assert_eq!(s.class_names, class_names(classes));
    assert_eq!((s.train_images, s.test_images), (classes * per_class, test));

    let mut all_ids = BTreeSet::new();
    let train_dirs = files_in(&out.join("train"));
    assert_eq!(
        train_dirs,
        s.class_names.iter().cloned().collect::<BTreeSet<_>>()
    );
    for name in &s.class_names {
        let files = files_in(&out.join("train").join(name));
        assert_eq!(files.len(), per_class, "{name}");
        for f in files {
            let id = f
                .strip_suffix(".jpg")
                .unwrap_or_else(|| panic!("not a .jpg: {f}"));
            assert!(
                id.len() >= 6 && id.bytes().all(|b| b.is_ascii_digit()),
                "bad id {id}"
            );
            assert!(all_ids.insert(id.to_string()), "duplicate id {id}");
            let img = image::open(out.join("train").join(name).join(&f)).unwrap();
            assert_eq!(img.color(), image::ColorType::L8, "{f} is not grayscale");
        }
    }
    let test_files = files_in(&out.join("test"));
    assert_eq!(test_files.len(), test);
    for f in &test_files {
        let id = f.strip_suffix(".jpg").unwrap();
        assert!(id.bytes().all(|b| b.is_ascii_digit()));
        assert!(all_ids.insert(id.to_string()), "test id {id} repeats an id");
    }

    let sub = fs::read_to_string(out.join("sampleSubmission.csv")).unwrap();
    let mut lines = sub.lines();
    assert_eq!(
        lines.next().unwrap(),
        format!("image,{}", s.class_names.join(","))
    );
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), test);
    let mut sub_images = BTreeSet::new();
    for row in &rows {
        let cols: Vec<&str> = row.split(',').collect();
        assert_eq!(cols.len(), classes + 1);
        sub_images.insert(cols[0].to_string());
        let p: Vec<f64> = cols[1..].iter().map(|c| c.parse().unwrap()).collect();
        assert!(p.iter().all(|&x| (x - 1.0 / classes as f64).abs() < 1e-9));
    }
    assert_eq!(sub_images, test_files);

    let labels = fs::read_to_string(out.join("test_labels.csv")).unwrap();
    let mut lines = labels.lines();
    assert_eq!(lines.next().unwrap(), "image,class");
    let mut labelled = BTreeSet::new();
    for row in lines {
        let (img, class) = row.split_once(',').unwrap();
        assert!(
            s.class_names.iter().any(|n| n == class),
            "unknown class {class}"
        );
        assert!(labelled.insert(img.to_string()), "{img} labelled twice");
    }
    assert_eq!(labelled, test_files);
    // no temporary files anywhere
    assert!(read_tree(&out).keys().all(|p| !p
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with('.')));
}

#[test]
fn sizes_carry_class_information_and_span_the_competition_range() {
    let per = 9u64;
    let mut medians = Vec::new();
    let (mut smallest, mut largest) = (u32::MAX, 0u32);
    for c in 0..N {
        let mut sides: Vec<u32> = (0..per)
            .map(|i| {
                let img = render(1, c, N, i);
                let (w, h) = img.dimensions();
                assert!(w.min(h) >= 16 && w.max(h) <= 420, "class {c}: {w}x{h}");
                w.max(h)
            })
            .collect();
        sides.sort();
        smallest = smallest.min(sides[0]);
        largest = largest.max(*sides.last().unwrap());
        medians.push(sides[sides.len() / 2] as f64);
    }
    let lo = medians.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = medians.iter().cloned().fold(0.0, f64::max);
    assert!(
        hi / lo > 3.0,
        "class medians {lo}..{hi}: size must be informative"
    );
    assert!(smallest <= 45, "smallest image side {smallest}");
    assert!(largest >= 300, "largest image side {largest}");
    // within a class, sizes scatter (log-normal), but far less than across classes
    let logs: Vec<f64> = medians.iter().map(|m| m.ln()).collect();
    let mean = logs.iter().sum::<f64>() / logs.len() as f64;
    let sd = (logs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / logs.len() as f64).sqrt();
    assert!(sd > 0.4, "log-sd of class medians {sd}");
}

#[test]
fn organisms_are_dark_on_a_light_background() {
    for c in (0..N).step_by(5) {
        for i in 0..2u64 {
            let img = render(11, c, N, i);
            let (w, h) = (img.width() as usize, img.height() as usize);
            let px = img.as_raw();
            let mut border = Vec::new();
            for x in 0..w {
                border.push(px[x] as f64);
                border.push(px[(h - 1) * w + x] as f64);
            }
            for y in 0..h {
                border.push(px[y * w] as f64);
                border.push(px[y * w + w - 1] as f64);
            }
            let bmean = border.iter().sum::<f64>() / border.len() as f64;
            let darkest = *px.iter().min().unwrap();
            // centre: the middle half of the image
            let mut centre = Vec::new();
            for y in h / 4..(3 * h / 4).max(h / 4 + 1) {
                for x in w / 4..(3 * w / 4).max(w / 4 + 1) {
                    centre.push(px[y * w + x] as f64);
                }
            }
            let cmean = centre.iter().sum::<f64>() / centre.len() as f64;
            assert!(bmean > 230.0, "class {c} #{i}: border mean {bmean}");
            assert!(
                cmean < bmean - 5.0,
                "class {c} #{i}: centre {cmean} vs border {bmean}"
            );
            assert!(
                (darkest as f64) < bmean - 60.0,
                "class {c} #{i}: darkest {darkest}, faint organism"
            );
        }
    }
}

#[test]
fn bad_options_and_io_errors_are_reported_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let e = generate(&opts(0, 5, 5, 0, 1), dir.path()).unwrap_err();
    assert!(matches!(e, SynthError::InvalidOptions(_)));
    assert!(e.to_string().contains("classes"), "{e}");
    let e = generate(&opts(3, 0, 5, 0, 1), dir.path()).unwrap_err();
    assert!(e.to_string().contains("per_class"), "{e}");

    // an output folder below a regular file cannot be created: the error names the path
    let file = dir.path().join("plain_file");
    fs::write(&file, b"x").unwrap();
    let e = generate(&opts(2, 1, 1, 0, 1), &file.join("out")).unwrap_err();
    assert!(matches!(e, SynthError::Io { .. }), "{e:?}");
    assert!(e.to_string().contains("plain_file"), "{e}");
}

#[test]
fn test_set_classes_cover_the_classes() {
    let dir = tempfile::tempdir().unwrap();
    let s = generate(&opts(4, 1, 40, 9, 2), dir.path()).unwrap();
    let labels = fs::read_to_string(dir.path().join("test_labels.csv")).unwrap();
    let seen: BTreeSet<&str> = labels
        .lines()
        .skip(1)
        .map(|r| r.split_once(',').unwrap().1)
        .collect();
    assert_eq!(
        seen.len(),
        s.class_names.len(),
        "40 uniform draws over 4 classes should hit all"
    );
}
