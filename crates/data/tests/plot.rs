//! Charts: PNG size, data where it belongs, the lettering, tick choice, bad input.

use plankton_data::sinks::plot::{
    format_tick, line_chart_areas, nice_ticks, render_heatmap, render_line_charts, Heatmap,
    LineChart, PlotError, Series,
};
use plankton_data::sinks::text::{
    ascent, cap_height, draw_text, draw_text_vertical, text_height, text_width,
};
use plotters::prelude::*;

const RED: (u8, u8, u8) = (220, 20, 60);
const GREEN: (u8, u8, u8) = (20, 160, 40);

fn curve(name: &str, colour: (u8, u8, u8), dashed: bool, f: impl Fn(f64) -> f64) -> Series {
    Series {
        name: name.into(),
        points: (1..=40).map(|e| (e as f64, f(e as f64))).collect(),
        colour,
        dashed,
    }
}

fn learning_curves() -> Vec<LineChart> {
    vec![
        LineChart {
            title: "Loss".into(),
            x_label: "epoch".into(),
            y_label: "cross-entropy".into(),
            series: vec![
                curve("train", RED, false, |e| 4.0 * (-e / 9.0).exp() + 0.6),
                curve("valid", GREEN, true, |e| 4.2 * (-e / 11.0).exp() + 0.8),
            ],
            log_y: true,
            y_range: None,
        },
        LineChart {
            title: "Accuracy (%)".into(),
            x_label: "epoch".into(),
            y_label: "top-1 [%]".into(),
            series: vec![
                curve("train", RED, false, |e| 100.0 - 90.0 * (-e / 8.0).exp()),
                curve("valid_acc", GREEN, true, |e| {
                    95.0 - 88.0 * (-e / 10.0).exp()
                }),
            ],
            log_y: false,
            y_range: Some((0.0, 100.0)),
        },
        LineChart {
            title: "Learning rate".into(),
            x_label: "epoch".into(),
            series: vec![curve("", (40, 40, 200), false, |e| 0.1 * 0.8f64.powf(e))],
            log_y: true,
            ..Default::default()
        },
    ]
}

/// Charts worth looking at are kept under target/tmp/plot.
fn kept(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("plot")
        .join(name)
}

fn has_colour_near(
    img: &image::RgbImage,
    (x, y): (f64, f64),
    colour: (u8, u8, u8),
    r: i64,
) -> bool {
    let (cx, cy) = (x.round() as i64, y.round() as i64);
    (cy - r..=cy + r).any(|py| {
        (cx - r..=cx + r).any(|px| {
            px >= 0
                && py >= 0
                && img
                    .get_pixel_checked(px as u32, py as u32)
                    .is_some_and(|p| p.0 == [colour.0, colour.1, colour.2])
        })
    })
}

#[test]
fn line_charts_png_has_requested_size() {
    let path = kept("curves.png");
    render_line_charts(&path, &learning_curves(), 1300, 380).unwrap();
    let img = image::open(&path).unwrap();
    assert_eq!((img.width(), img.height()), (1300, 380));
}

#[test]
fn series_colour_appears_where_the_data_is() {
    let chart = LineChart {
        title: "diagonal".into(),
        series: vec![Series {
            name: String::new(),
            points: vec![(0.0, 0.0), (10.0, 10.0), (20.0, 0.0)],
            colour: RED,
            dashed: false,
        }],
        y_range: Some((-5.0, 15.0)),
        ..Default::default()
    };
    let charts = [chart];
    let path = kept("diagonal.png");
    render_line_charts(&path, &charts, 500, 400).unwrap();
    let img = image::open(&path).unwrap().to_rgb8();
    let area = line_chart_areas(&charts, 500, 400)[0];
    // The points themselves and points on the segments between them.
    for (x, y) in [
        (0.0, 0.0),
        (10.0, 10.0),
        (20.0, 0.0),
        (5.0, 5.0),
        (15.0, 5.0),
    ] {
        let at = area.to_pixel(x, y).unwrap();
        assert!(
            has_colour_near(&img, at, RED, 2),
            "no series colour near ({x}, {y}) -> {at:?}"
        );
    }
    // Well away from the line: above the peak, below the valley.
    for (x, y) in [(10.0, 14.0), (10.0, -4.0), (2.0, 12.0)] {
        let at = area.to_pixel(x, y).unwrap();
        assert!(
            !has_colour_near(&img, at, RED, 4),
            "series colour at ({x}, {y}) -> {at:?}"
        );
    }
}

/// Draws `text` on a white `w x h` canvas.
fn lettered(
    w: u32,
    h: u32,
    draw: impl FnOnce(&DrawingArea<BitMapBackend, plotters::coord::Shift>),
) -> image::RgbImage {
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        draw(&root);
        root.present().unwrap();
    }
    image::RgbImage::from_raw(w, h, buf).unwrap()
}

/// The box around every pixel that is not white.
fn ink_box(img: &image::RgbImage) -> Option<(u32, u32, u32, u32)> {
    let mut b: Option<(u32, u32, u32, u32)> = None;
    for (x, y, p) in img.enumerate_pixels() {
        if p.0 != [255; 3] {
            b = Some(match b {
                None => (x, y, x, y),
                Some((x0, y0, x1, y1)) => (x0.min(x), y0.min(y), x1.max(x), y1.max(y)),
            });
        }
    }
    b
}

#[test]
fn text_stays_in_its_measured_box_is_anti_aliased_and_spaces_are_blank() {
    let scale = 2;
    let img = lettered(200, 60, |root| {
        draw_text(root, 10, 10, "Hg ", scale, BLACK).unwrap();
        draw_text(root, 120, 10, "   ", scale, BLACK).unwrap();
    });
    let (x0, y0, x1, y1) = ink_box(&img).expect("ink");
    // Inside the line's box: from its top left, text_width wide, text_height tall (the g's
    // descender included), with the capital reaching up to about the cap height.
    assert!(x0 >= 10 && x1 < 10 + text_width("Hg", scale), "{x0}..{x1}");
    assert!(y0 >= 10 && y1 < 10 + text_height(scale), "{y0}..{y1}");
    assert!(
        y1 > 10 + ascent(scale),
        "the g's descender goes below the baseline"
    );
    let cap_top = 10 + ascent(scale) as i32 - cap_height(scale) as i32;
    // (the top row of the H may be a partly covered one)
    assert!(
        (y0 as i32 - cap_top).abs() <= 1,
        "H's top {y0} vs the cap height's {cap_top}"
    );
    // Solid strokes and, at their edges, grey: anti-aliased, in the ink's colour only.
    let greys: Vec<u8> = img
        .pixels()
        .filter(|p| p.0 != [255; 3])
        .map(|p| p.0[0])
        .collect();
    assert!(greys.iter().any(|&g| g < 40), "no solid ink");
    assert!(
        greys.iter().any(|&g| (60..200).contains(&g)),
        "no anti-aliased edge"
    );
    assert!(
        img.pixels().all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]),
        "black ink on white is grey"
    );
    // The trailing space and the three spaces leave the background untouched.
    assert!(text_width("Hg ", scale) > text_width("Hg", scale));
    assert!(x1 < 120);
    assert_eq!(text_width("", scale), 0);
    // Proportional: an i is narrower than an m.
    assert!(text_width("iiii", 1) < text_width("mmmm", 1));
}

#[test]
fn vertical_text_is_the_horizontal_text_turned_anticlockwise() {
    let (w, h) = (80u32, 80u32);
    let flat = lettered(w, h, |root| {
        draw_text(root, 10, 20, "Fy", 1, BLACK).unwrap()
    });
    let turned = lettered(w, h, |root| {
        draw_text_vertical(root, 20, 70, "Fy", 1, BLACK).unwrap()
    });
    // (x, y) of the horizontal text, relative to its top left (10, 20), lands at column 20 + dy
    // and row 70 - dx - 1.
    let mut inked = 0;
    for (x, y, p) in flat.enumerate_pixels() {
        if x < 10 || y < 20 {
            assert_eq!(p.0, [255; 3]);
            continue;
        }
        let (dx, dy) = (x - 10, y - 20);
        let q = turned.get_pixel(20 + dy, 70 - dx - 1).0;
        assert_eq!(p.0, q, "({dx}, {dy})");
        inked += (p.0 != [255; 3]) as usize;
    }
    assert!(inked > 20, "{inked} pixels of ink");
}

#[test]
fn every_printable_character_has_ink() {
    for c in (' '..='~').chain("éüßµ°±".chars()) {
        let img = lettered(40, 40, |root| {
            draw_text(root, 5, 5, &c.to_string(), 2, BLACK).unwrap()
        });
        assert_eq!(ink_box(&img).is_some(), c != ' ', "{c:?}");
    }

    // A sheet of the whole font at both layout scales, to look at.
    let chars: Vec<char> = (' '..='~').collect();
    let sheet_img = lettered(700, 200, |root| {
        let mut y = 6;
        for scale in [1, 2] {
            for line in chars.chunks(48) {
                let text: String = line.iter().collect();
                draw_text(root, 6, y, &text, scale, BLACK).unwrap();
                y += text_height(scale) as i32 + 4;
            }
        }
        draw_text(
            root,
            6,
            y,
            "log loss 0.6125 top-1 83.2% (fold 2/5): ÄÖÜ éè",
            1,
            BLACK,
        )
        .unwrap();
    });
    let sheet = kept("font.png");
    std::fs::create_dir_all(sheet.parent().unwrap()).unwrap();
    sheet_img.save(&sheet).unwrap();
}

#[test]
fn nice_ticks_are_round_and_cover_the_range() {
    let ranges = [
        (0.0, 1.0),
        (0.0, 1.01),
        (-3.7, 12.2),
        (0.0013, 0.0021),
        (1e5, 3.2e5),
        (17.0, 17.9),
        (-1e-6, 1e-6),
        (0.0, 17.9),
        (2.3, 97.0),
        (1.0, 40.0),
        (-250.0, -10.0),
    ];
    for (lo, hi) in ranges {
        let ticks = nice_ticks(lo, hi, 8);
        assert!((3..=8).contains(&ticks.len()), "{lo}..{hi}: {ticks:?}");
        let step = ticks[1] - ticks[0];
        let mantissa = step / 10f64.powf(step.log10().floor());
        assert!(
            [1.0, 2.0, 5.0, 10.0]
                .iter()
                .any(|m| (mantissa - m).abs() < 1e-6),
            "{lo}..{hi}: step {step}"
        );
        for w in ticks.windows(2) {
            assert!(
                ((w[1] - w[0]) - step).abs() < step * 1e-6,
                "{lo}..{hi}: uneven {ticks:?}"
            );
        }
        for t in &ticks {
            assert!(
                (t / step - (t / step).round()).abs() < 1e-6,
                "{t} not a multiple of {step}"
            );
        }
        let slack = step * 1e-9;
        assert!(
            ticks[0] >= lo - slack && *ticks.last().unwrap() <= hi + slack,
            "{lo}..{hi}: {ticks:?}"
        );
        assert!(
            ticks[0] - lo < step && hi - ticks.last().unwrap() < step,
            "{lo}..{hi}: {ticks:?}"
        );
    }
    assert!(nice_ticks(0.0, 1.0, 4).len() <= 4);
    assert_eq!(nice_ticks(0.0, 1.0, 8), vec![0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
    assert_eq!(nice_ticks(2.0, 2.0, 8), vec![2.0]);
    assert!(nice_ticks(f64::NAN, 1.0, 8).is_empty());
    assert_eq!(nice_ticks(-1e308, 1e308, 8).len(), 2);
    assert!(nice_ticks(1.0, 1.0 + 1e-15, 8).len() <= 8);
    assert!(nice_ticks(0.0, 5e-324, 8).len() <= 8);
}

#[test]
fn tick_labels_are_compact() {
    assert_eq!(format_tick(0.5, 0.5), "0.5");
    assert_eq!(format_tick(0.3, 0.1), "0.3");
    assert_eq!(format_tick(1200.0, 200.0), "1200");
    assert_eq!(format_tick(120000.0, 20000.0), "1.2e5");
    assert_eq!(format_tick(100000.0, 100000.0), "1e5");
    assert_eq!(format_tick(5e-4, 1e-4), "5e-4");
    assert_eq!(format_tick(-0.0, 0.1), "0.0");
    assert_eq!(format_tick(-2.5, 0.5), "-2.5");
    assert_eq!(format_tick(40.0, 10.0), "40");
}

#[test]
fn non_finite_points_and_empty_series_do_not_panic() {
    let mut charts = learning_curves();
    charts[0].series[0].points[3].1 = f64::NAN;
    charts[0].series[0].points[4].1 = -1.0; // not drawable on a log axis
    charts[1].series[0].points[5].0 = f64::INFINITY;
    charts[1].series[1].points.clear();
    charts.push(LineChart {
        title: "nothing finite".into(),
        series: vec![Series {
            name: "nan".into(),
            points: vec![(f64::NAN, 1.0), (2.0, f64::NEG_INFINITY)],
            colour: RED,
            dashed: false,
        }],
        log_y: true,
        ..Default::default()
    });
    let path = kept("non_finite.png");
    render_line_charts(&path, &charts, 1600, 300).unwrap();
    let img = image::open(&path).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (1600, 300));
    // The chart with nothing finite still has its frame.
    let a = line_chart_areas(&charts, 1600, 300)[3];
    assert!(
        a.left > 1200 && a.right < 1600 && a.bottom > a.top + 100,
        "{a:?}"
    );
    for (x, y) in [
        (a.left, (a.top + a.bottom) / 2),
        ((a.left + a.right) / 2, a.bottom),
    ] {
        assert_eq!(
            img.get_pixel(x as u32, y as u32).0,
            [70, 70, 70],
            "frame at ({x}, {y})"
        );
    }
}

#[test]
fn heatmap_of_121_classes_renders() {
    let n = 121;
    let values: Vec<Vec<f64>> = (0..n)
        .map(|r| {
            (0..n)
                .map(|c| {
                    if r == c {
                        0.7
                    } else if (r + 1) % n == c {
                        0.3
                    } else {
                        0.0
                    }
                })
                .collect()
        })
        .collect();
    let labels: Vec<String> = (0..n)
        .map(|i| format!("class_{i:03}_with_a_long_descriptive_name"))
        .collect();
    let map = Heatmap {
        title: "Confusion (valid)".into(),
        row_labels: labels.clone(),
        col_labels: labels,
        values,
        annotate: true,
    };
    let path = kept("confusion_121.png");
    render_heatmap(&path, &map, 4).unwrap();
    let img = image::open(&path).unwrap().to_rgb8();
    assert!(
        img.width() >= 484 && img.height() >= 484,
        "{:?}",
        img.dimensions()
    );
    assert!(
        img.width() < 1000 && img.height() < 1000,
        "{:?}",
        img.dimensions()
    );
}

#[test]
fn heatmap_shades_high_values_dark() {
    let map = Heatmap {
        title: "3 classes".into(),
        row_labels: vec!["copepod".into(), "diatom".into(), "chaetognath".into()],
        col_labels: vec!["copepod".into(), "diatom".into(), "chaetognath".into()],
        values: vec![
            vec![1.0, 0.0, 0.0],
            vec![0.25, 0.75, 0.0],
            vec![0.0, 0.5, 0.5],
        ],
        annotate: true,
    };
    let path = kept("confusion_3.png");
    render_heatmap(&path, &map, 40).unwrap();
    let img = image::open(&path).unwrap().to_rgb8();
    let count = |c: [u8; 3]| img.pixels().filter(|p| p.0 == c).count();
    // The 1.0 cell in full dark blue (less its number), the zeros plain white.
    assert!(count([8, 48, 107]) > 40 * 40 / 2);
    assert!(count([255, 255, 255]) > 4 * 40 * 40);
}

#[test]
fn unwritable_path_is_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not_a_dir");
    std::fs::write(&file, b"x").unwrap();
    let path = file.join("curves.png");
    let err = render_line_charts(&path, &learning_curves(), 600, 300).unwrap_err();
    assert!(matches!(err, PlotError::Write { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );

    let map = Heatmap {
        values: vec![vec![1.0]],
        ..Default::default()
    };
    let err = render_heatmap(&path, &map, 10).unwrap_err();
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[test]
fn unusable_input_is_refused_not_drawn() {
    let path = std::path::Path::new("never_written.png");
    let mut charts = learning_curves();
    charts[0].y_range = Some((0.0, 10.0)); // log axis cannot start at 0
    let err = render_line_charts(path, &charts, 800, 300).unwrap_err();
    assert!(matches!(err, PlotError::Invalid { .. }), "{err:?}");
    assert!(render_line_charts(path, &learning_curves(), 60, 40).is_err());
    let ragged = Heatmap {
        values: vec![vec![1.0, 2.0], vec![3.0]],
        ..Default::default()
    };
    assert!(render_heatmap(path, &ragged, 10).is_err());
    assert!(!path.exists());
}
