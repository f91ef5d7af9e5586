//! The learning-curve picture of a run: losses and accuracies against steps.

use std::path::Path;

use super::run_dir::HistoryRow;
use crate::sinks::plot::{render_line_charts, LineChart, PlotError, Series};

const TRAIN: (u8, u8, u8) = (31, 119, 180);
const VALID: (u8, u8, u8) = (214, 39, 40);
const TOP5: (u8, u8, u8) = (44, 160, 44);

fn series(
    name: &str,
    colour: (u8, u8, u8),
    dashed: bool,
    rows: &[HistoryRow],
    f: impl Fn(&HistoryRow) -> f64,
) -> Series {
    Series {
        name: name.into(),
        points: rows.iter().map(|r| (r.step as f64, f(r))).collect(),
        colour,
        dashed,
    }
}

/// Two panels: train and validation log loss; validation top-1 and top-5 accuracy.
pub fn render_learning_curve(
    path: &Path,
    title: &str,
    rows: &[HistoryRow],
) -> Result<(), PlotError> {
    let loss = LineChart {
        title: format!("{title}: log loss"),
        x_label: "step".into(),
        y_label: "log loss".into(),
        series: vec![
            series("train (dropout, augmented)", TRAIN, true, rows, |r| {
                r.train_loss
            }),
            series("validation", VALID, false, rows, |r| r.valid_loss),
        ],
        log_y: false,
        y_range: None,
    };
    let accuracy = LineChart {
        title: format!("{title}: validation accuracy"),
        x_label: "step".into(),
        y_label: "accuracy".into(),
        series: vec![
            series("top-1", VALID, false, rows, |r| r.valid_top1),
            series("top-5", TOP5, true, rows, |r| r.valid_top5),
        ],
        log_y: false,
        y_range: Some((0.0, 1.0)),
    };
    render_line_charts(path, &[loss, accuracy], 1200, 450)
}
