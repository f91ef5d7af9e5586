//! Charts: PNG size, data where it belongs, the bitmap font, tick choice, bad input.

use plankton_data::sinks::font5x7::{draw_text, draw_text_vertical, glyph, text_width};
use plankton_data::sinks::plot::{
    format_tick, line_chart_areas, nice_ticks, render_heatmap, render_line_charts, Heatmap,
    LineChart, PlotError, Series,
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

#[test]
fn glyphs_are_drawn_pixel_for_pixel_and_spaces_are_blank() {
    let (w, h) = (120u32, 60u32);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    let scale = 3;
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        draw_text(&root, 10, 10, "A ", scale, BLACK).unwrap();
        draw_text(&root, 60, 10, "  ", scale, BLACK).unwrap();
        root.present().unwrap();
    }
    let img = image::RgbImage::from_raw(w, h, buf).unwrap();
    let rows = glyph('A');
    for (r, bits) in rows.iter().enumerate() {
        for c in 0..5u32 {
            let on = bits & (0x10 >> c) != 0;
            // Every pixel of the scaled dot agrees with the bit.
            for (dx, dy) in [(0, 0), (2, 2), (0, 2), (2, 0)] {
                let p = img
                    .get_pixel(10 + c * scale + dx, 10 + r as u32 * scale + dy)
                    .0;
                assert_eq!(p == [0, 0, 0], on, "glyph A row {r} col {c}");
            }
        }
    }
    assert!(rows.iter().any(|&b| b != 0));
    // The space after A and the two spaces elsewhere leave the background untouched.
    let blank =
        |x0: u32, x1: u32| (x0..x1).all(|x| (0..h).all(|y| img.get_pixel(x, y).0 == [255; 3]));
    assert!(blank(10 + 5 * scale, 60), "space after A has ink");
    assert!(blank(60, w), "spaces have ink");
    assert_eq!(text_width("A ", scale), 11 * scale);
    assert_eq!(text_width("", scale), 0);
}

#[test]
fn vertical_text_is_the_glyph_turned_anticlockwise() {
    let (w, h) = (40u32, 40u32);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        draw_text_vertical(&root, 5, 30, "F", 1, BLACK).unwrap();
        root.present().unwrap();
    }
    let img = image::RgbImage::from_raw(w, h, buf).unwrap();
    for (r, bits) in glyph('F').iter().enumerate() {
        for c in 0..5u32 {
            let on = bits & (0x10 >> c) != 0;
            // Glyph row r becomes image column 5 + r; glyph column c counts up from y = 29.
            let p = img.get_pixel(5 + r as u32, 29 - c).0;
            assert_eq!(p == [0, 0, 0], on, "F row {r} col {c}");
        }
    }
}

#[test]
fn every_printable_character_has_a_glyph() {
    for c in ' '..='~' {
        let inked = glyph(c).iter().any(|&b| b != 0);
        assert_eq!(inked, c != ' ', "{c:?}");
    }
    assert_eq!(glyph('é'), glyph('?'));

    // A sheet of the whole font, to look at.
    let (w, h) = (32 * 6 * 3 + 12, 3 * 10 * 3 + 12);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        let chars: Vec<char> = (' '..='~').collect();
        for (i, line) in chars.chunks(32).enumerate() {
            let text: String = line.iter().collect();
            draw_text(&root, 6, 6 + i as i32 * 30, &text, 3, BLACK).unwrap();
        }
        root.present().unwrap();
    }
    let sheet = kept("font.png");
    std::fs::create_dir_all(sheet.parent().unwrap()).unwrap();
    image::RgbImage::from_raw(w, h, buf)
        .unwrap()
        .save(&sheet)
        .unwrap();
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
