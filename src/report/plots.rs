//! PNG charts drawn with plotters: per-experiment training curves, the best-mIoU bar
//! chart and the overlaid validation-mIoU curves of several experiments.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::Context;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle, RGBColor};

use super::format::fmt_metric;
use super::glyphs::{GlyphBackend, FONT_BOLD, FONT_REGULAR};
use super::{ExperimentSummary, TrainUnit, ACCURACY_PNG, LOSS_PNG, MIOU_PNG};

const FAMILY: &str = "sans-serif";

/// Colour of experiment `i` in every comparison chart (Tableau 10).
pub(crate) fn palette(i: usize) -> RGBColor {
    const TABLEAU: [RGBColor; 10] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
    ];
    TABLEAU[i % TABLEAU.len()]
}
const TRAIN_COLOR: RGBColor = RGBColor(31, 119, 180);
const VALID_COLOR: RGBColor = RGBColor(255, 127, 14);
const EXTRA_COLOR: RGBColor = RGBColor(44, 160, 44);
const TEXT_COLOR: RGBColor = RGBColor(40, 40, 40);
const GRID_COLOR: RGBColor = RGBColor(225, 225, 225);
const SIZE: (u32, u32) = (960, 600);

/// Registers the bundled fonts with plotters once per process. Text is drawn by
/// [`GlyphBackend`]; plotters still resolves a font for every text style it builds.
fn ensure_fonts() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            register_font(FAMILY, FontStyle::Normal, FONT_REGULAR)
                .map_err(|_| "the bundled DejaVuSans.ttf is not a valid font".to_string())?;
            register_font(FAMILY, FontStyle::Bold, FONT_BOLD)
                .map_err(|_| "the bundled DejaVuSans-Bold.ttf is not a valid font".to_string())
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

fn font(size: f64) -> TextStyle<'static> {
    (FAMILY, size).into_font().color(&TEXT_COLOR)
}

fn bold(size: f64) -> TextStyle<'static> {
    (FAMILY, size, FontStyle::Bold)
        .into_font()
        .color(&TEXT_COLOR)
}

type Area<'a> = DrawingArea<GlyphBackend<'a>, Shift>;

/// Draws into an RGB buffer of `size` with `draw` and saves it as PNG at `path`.
fn render_png(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&Area) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    ensure_fonts()?;
    let (w, h) = size;
    let mut buf = vec![255u8; w as usize * h as usize * 3];
    {
        let root =
            GlyphBackend::new(BitMapBackend::with_buffer(&mut buf, size)).into_drawing_area();
        root.fill(&WHITE)?;
        draw(&root).with_context(|| format!("drawing {}", path.display()))?;
        root.present()?;
    }
    let img = image::RgbImage::from_raw(w, h, buf).context("plot buffer has the wrong size")?;
    img.save_with_format(path, image::ImageFormat::Png)
        .with_context(|| format!("writing {}", path.display()))
}

/// One line of a line chart.
struct Series {
    label: String,
    color: RGBColor,
    points: Vec<(f64, f64)>,
    /// Point to circle (e.g. the best epoch), if any.
    highlight: Option<(f64, f64)>,
}

/// How to choose the y range of a line chart.
#[derive(Clone, Copy)]
enum YRange {
    /// From 0 to just above the largest value (losses).
    FromZero,
    /// Around the data, padded, clipped to `[0, 1]` (accuracies, IoU).
    Unit,
}

struct LineChart<'a> {
    title: &'a str,
    x_desc: &'a str,
    y_desc: &'a str,
    /// x values are whole numbers (epochs, steps): label them without decimals.
    integer_x: bool,
    y_range: YRange,
    legend_at: SeriesLabelPosition,
    series: Vec<Series>,
}

fn finite_extent(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values
        .filter(|v| v.is_finite())
        .fold(None, |acc, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
        })
}

fn draw_line_chart(area: &Area, chart: &LineChart) -> anyhow::Result<()> {
    let all = || chart.series.iter().flat_map(|s| s.points.iter().copied());
    let (x0, x1) = finite_extent(all().map(|p| p.0)).unwrap_or((0.0, 1.0));
    let (x0, x1) = if x1 > x0 {
        (x0, x1)
    } else {
        (x0 - 1.0, x1 + 1.0)
    };
    let (y0, y1) = match (chart.y_range, finite_extent(all().map(|p| p.1))) {
        (_, None) => (0.0, 1.0),
        (YRange::FromZero, Some((lo, hi))) => {
            let lo = lo.min(0.0);
            let hi = if hi > lo { hi } else { lo + 1.0 };
            (lo, hi + 0.06 * (hi - lo))
        }
        (YRange::Unit, Some((lo, hi))) => {
            let pad = (0.08 * (hi - lo)).max(0.01);
            ((lo - pad).max(0.0), (hi + pad).min(1.0))
        }
    };
    let (y0, y1) = if y1 > y0 {
        (y0, y1)
    } else {
        (y0 - 0.5, y1 + 0.5)
    };

    let mut ctx = ChartBuilder::on(area)
        .caption(chart.title, bold(30.0))
        .margin(18)
        .margin_right(30)
        .x_label_area_size(72)
        .y_label_area_size(100)
        .build_cartesian_2d(x0..x1, y0..y1)?;

    let x_labels = if chart.integer_x {
        ((x1 - x0).round() as usize + 1).clamp(2, 11)
    } else {
        11
    };
    let x_fmt = |x: &f64| {
        if (x - x.round()).abs() < 1e-6 {
            format!("{}", x.round() as i64)
        } else {
            format!("{x:.1}")
        }
    };
    let y_fmt = |y: &f64| {
        let span = y1 - y0;
        if span < 0.05 {
            format!("{y:.3}")
        } else {
            format!("{y:.2}")
        }
    };
    ctx.configure_mesh()
        .x_desc(chart.x_desc)
        .y_desc(chart.y_desc)
        .axis_desc_style(font(24.0))
        .label_style(font(20.0))
        .x_labels(x_labels)
        .y_labels(8)
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .bold_line_style(GRID_COLOR.stroke_width(1))
        .light_line_style(WHITE)
        .axis_style(RGBColor(120, 120, 120))
        .draw()?;

    if chart.series.iter().all(|s| s.points.is_empty()) {
        let (w, h) = area.dim_in_pixel();
        area.draw(&Text::new(
            "no data recorded",
            (w as i32 / 2, h as i32 / 2),
            font(24.0).pos(Pos::new(HPos::Center, VPos::Center)),
        ))?;
        return Ok(());
    }

    for s in &chart.series {
        let color = s.color;
        let points: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        let markers = if points.len() <= 40 {
            points.clone()
        } else {
            Vec::new()
        };
        ctx.draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(s.label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
        ctx.draw_series(
            markers
                .into_iter()
                .map(|p| Circle::new(p, 3, color.filled())),
        )?;
        if let Some(p) = s.highlight.filter(|p| p.0.is_finite() && p.1.is_finite()) {
            ctx.draw_series(std::iter::once(Circle::new(p, 7, color.stroke_width(2))))?;
        }
    }
    ctx.configure_series_labels()
        .position(chart.legend_at.clone())
        .margin(12)
        .label_font(font(20.0))
        .background_style(WHITE.mix(0.9))
        .border_style(RGBColor(180, 180, 180))
        .draw()?;
    Ok(())
}

/// Paths of the three curve plots [`plot_experiment_curves`] writes.
#[derive(Debug, Clone, PartialEq)]
pub struct CurveFiles {
    pub loss: PathBuf,
    pub accuracy: PathBuf,
    pub miou: PathBuf,
}

/// Draws an experiment's training curves into `out_dir`: `loss.png` (train vs valid
/// loss), `accuracy.png` (pixel accuracy) and `miou.png` (mIoU and vessel IoU), all
/// against the epoch, or the step for step-based runs. The best epoch is circled.
pub fn plot_experiment_curves(
    summary: &ExperimentSummary,
    out_dir: &Path,
) -> anyhow::Result<CurveFiles> {
    let unit = summary.unit.label();
    let hist = &summary.history;
    let pts = |f: &dyn Fn(&super::PeriodRow) -> Option<f64>| -> Vec<(f64, f64)> {
        hist.iter()
            .filter_map(|r| f(r).map(|y| (summary.x_of(r), y)))
            .collect()
    };
    let best_row = hist.iter().find(|r| {
        let at = match summary.unit {
            TrainUnit::Epoch => r.period,
            TrainUnit::Step => r.step,
        };
        at == summary.best_epoch
    });
    let best = |f: &dyn Fn(&super::PeriodRow) -> f64| best_row.map(|r| (summary.x_of(r), f(r)));
    let integer_x = true;
    let files = CurveFiles {
        loss: out_dir.join(LOSS_PNG),
        accuracy: out_dir.join(ACCURACY_PNG),
        miou: out_dir.join(MIOU_PNG),
    };

    let title = format!("{} — loss", summary.name);
    render_png(&files.loss, SIZE, |area| {
        draw_line_chart(
            area,
            &LineChart {
                title: &title,
                x_desc: unit,
                y_desc: "Loss",
                integer_x,
                y_range: YRange::FromZero,
                legend_at: SeriesLabelPosition::UpperRight,
                series: vec![
                    Series {
                        label: "train loss".into(),
                        color: TRAIN_COLOR,
                        points: pts(&|r| Some(r.train_loss)),
                        highlight: None,
                    },
                    Series {
                        label: "valid loss".into(),
                        color: VALID_COLOR,
                        points: pts(&|r| Some(r.valid_loss)),
                        highlight: best(&|r| r.valid_loss),
                    },
                ],
            },
        )
    })?;

    let title = format!("{} — pixel accuracy", summary.name);
    let mut series = Vec::new();
    if hist.iter().any(|r| r.train_pixel_acc.is_some()) {
        series.push(Series {
            label: "train accuracy".into(),
            color: TRAIN_COLOR,
            points: pts(&|r| r.train_pixel_acc),
            highlight: None,
        });
    }
    series.push(Series {
        label: "valid accuracy".into(),
        color: VALID_COLOR,
        points: pts(&|r| Some(r.pixel_acc)),
        highlight: best(&|r| r.pixel_acc),
    });
    render_png(&files.accuracy, SIZE, |area| {
        draw_line_chart(
            area,
            &LineChart {
                title: &title,
                x_desc: unit,
                y_desc: "Pixel accuracy",
                integer_x,
                y_range: YRange::Unit,
                legend_at: SeriesLabelPosition::LowerRight,
                series,
            },
        )
    })?;

    let title = format!("{} — mIoU", summary.name);
    let mut series = Vec::new();
    if hist.iter().any(|r| r.train_miou.is_some()) {
        series.push(Series {
            label: "train mIoU".into(),
            color: TRAIN_COLOR,
            points: pts(&|r| r.train_miou),
            highlight: None,
        });
    }
    series.push(Series {
        label: "valid mIoU".into(),
        color: VALID_COLOR,
        points: pts(&|r| Some(r.miou)),
        highlight: best(&|r| r.miou),
    });
    series.push(Series {
        label: "valid vessel IoU".into(),
        color: EXTRA_COLOR,
        points: pts(&|r| Some(r.vessel_iou)),
        highlight: None,
    });
    render_png(&files.miou, SIZE, |area| {
        draw_line_chart(
            area,
            &LineChart {
                title: &title,
                x_desc: unit,
                y_desc: "IoU",
                integer_x,
                y_range: YRange::Unit,
                legend_at: SeriesLabelPosition::LowerRight,
                series,
            },
        )
    })?;
    Ok(files)
}

/// Draws every experiment's validation mIoU against training progress into one chart
/// at `path`, one colour per experiment (same order as the bar chart), best point
/// circled. When the experiments mix epoch- and step-based runs the x axis is the
/// percentage of each run's training instead.
pub fn plot_valid_miou_overlay(exps: &[ExperimentSummary], path: &Path) -> anyhow::Result<()> {
    let mixed = exps.windows(2).any(|w| w[0].unit != w[1].unit);
    let unit = exps.first().map(|e| e.unit).unwrap_or_default();
    let series = exps
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let span = e
                .history
                .iter()
                .map(|r| e.x_of(r))
                .fold(0.0f64, f64::max)
                .max(1.0);
            let x = |r: &super::PeriodRow| {
                if mixed {
                    100.0 * e.x_of(r) / span
                } else {
                    e.x_of(r)
                }
            };
            let points: Vec<(f64, f64)> = e.history.iter().map(|r| (x(r), r.miou)).collect();
            let highlight = e
                .history
                .iter()
                .filter(|r| r.miou.is_finite())
                .max_by(|a, b| a.miou.total_cmp(&b.miou))
                .map(|r| (x(r), r.miou));
            Series {
                label: e.name.clone(),
                color: palette(i),
                points,
                highlight,
            }
        })
        .collect();
    let x_desc = if mixed {
        "Training progress (%)"
    } else {
        unit.label()
    };
    render_png(path, SIZE, |area| {
        draw_line_chart(
            area,
            &LineChart {
                title: "Validation mIoU during training",
                x_desc,
                y_desc: "Validation mIoU",
                integer_x: !mixed,
                y_range: YRange::Unit,
                legend_at: SeriesLabelPosition::LowerRight,
                series,
            },
        )
    })
}

/// Draws the best validation mIoU of each experiment as horizontal bars (names on the
/// y axis, so long names stay legible), each labelled with its value and best epoch.
pub fn plot_best_miou_bars(exps: &[ExperimentSummary], path: &Path) -> anyhow::Result<()> {
    let n = exps.len();
    let height = (170 + 70 * n as u32).clamp(SIZE.1, 1400);
    render_png(path, (SIZE.0, height), |area| {
        let label_font = font(20.0);
        let name_width = exps
            .iter()
            .map(|e| area.estimate_text_size(&e.name, &label_font).map(|s| s.0))
            .try_fold(0u32, |acc, w| w.map(|w| acc.max(w)))?;
        let value_font = bold(20.0);
        let labels: Vec<String> = exps.iter().map(bar_label).collect();
        let y_area = name_width.min(SIZE.0 / 2) + 24;
        // Each bar's label sits right of the bar: choose the x range so the widest
        // one fits inside the plot (plot width = image width - label area - margins).
        let plot_px = f64::from(SIZE.0.saturating_sub(y_area + 18 + 30).max(100));
        let mut x_max = 0.1f64;
        for (e, label) in exps.iter().zip(&labels) {
            let v = e.best_valid_miou;
            if !v.is_finite() {
                continue;
            }
            let label_px = f64::from(area.estimate_text_size(label, &value_font)?.0) + 20.0;
            let share = (label_px / plot_px).min(0.8);
            x_max = x_max.max(v.max(0.0) / (1.0 - share));
        }
        // Slot j (from the bottom) holds experiment n-1-j, so the first is on top.
        let slots = n.max(1) as f64;
        // Bars fill ~60% of their slot (at most 90 px thick).
        let slot_px = height.saturating_sub(18 * 2 + 50 + 72) / n.max(1) as u32;
        let gap = (slot_px / 5).max(slot_px.saturating_sub(90) / 2).max(6);
        let mut ctx = ChartBuilder::on(area)
            .caption("Best validation mIoU per experiment", bold(30.0))
            .margin(18)
            .margin_right(30)
            .x_label_area_size(72)
            .y_label_area_size(y_area)
            .build_cartesian_2d(0.0..x_max, 0.0..slots)?;
        ctx.configure_mesh()
            .disable_y_mesh()
            .y_labels(0)
            .x_desc("Best validation mIoU")
            .axis_desc_style(font(24.0))
            .label_style(label_font.clone())
            .x_labels(8)
            // The range may run past 1 to make room for labels; mIoU itself cannot.
            .x_label_formatter(&|x| {
                if *x <= 1.0 + 1e-9 {
                    format!("{x:.2}")
                } else {
                    String::new()
                }
            })
            .bold_line_style(GRID_COLOR.stroke_width(1))
            .light_line_style(WHITE)
            .axis_style(RGBColor(120, 120, 120))
            .draw()?;
        for (i, (e, label)) in exps.iter().zip(labels).enumerate() {
            let j = (n - 1 - i) as f64;
            let v = e.best_valid_miou;
            let v = if v.is_finite() { v.max(0.0) } else { 0.0 };
            let mut bar = Rectangle::new([(0.0, j), (v, j + 1.0)], palette(i).filled());
            bar.set_margin(gap, gap, 0, 0);
            ctx.draw_series(std::iter::once(bar))?;
            ctx.draw_series(std::iter::once(
                EmptyElement::at((v, j + 0.5))
                    + Text::new(
                        label,
                        (8, 0),
                        value_font.pos(Pos::new(HPos::Left, VPos::Center)),
                    ),
            ))?;
            // The name goes left of the axis, outside the plotting area: draw it on
            // the whole image at the pixel the chart maps the slot centre to.
            let (px, py) = ctx.backend_coord(&(0.0, j + 0.5));
            area.draw(&Text::new(
                e.name.clone(),
                (px - 12, py),
                label_font.pos(Pos::new(HPos::Right, VPos::Center)),
            ))?;
        }
        Ok(())
    })
}

/// "0.8182 (epoch 12)", or "—" when the experiment has no finite best mIoU.
fn bar_label(e: &ExperimentSummary) -> String {
    if e.best_valid_miou.is_finite() {
        format!(
            "{} ({} {})",
            fmt_metric(e.best_valid_miou),
            e.unit.label().to_lowercase(),
            e.best_epoch
        )
    } else {
        "—".to_string()
    }
}

/// Draws a one-dimensional sweep into `path`: the value of `key` (one category per distinct
/// value, in increasing order) against validation F1 (the vessel Dice) and the best validation
/// mIoU, one point per experiment.
pub fn plot_sweep(exps: &[ExperimentSummary], key: &str, path: &Path) -> anyhow::Result<()> {
    use plotters::coord::ranged1d::{IntoSegmentedCoord, SegmentValue};
    use serde_json::Value;

    let values: Vec<Value> = exps
        .iter()
        .map(|e| e.flat_config().get(key).cloned().unwrap_or(Value::Null))
        .collect();
    // Order the experiments by their value: numbers numerically, anything else by its text.
    let mut order: Vec<usize> = (0..exps.len()).collect();
    order.sort_by(|&a, &b| match (values[a].as_f64(), values[b].as_f64()) {
        (Some(x), Some(y)) => x.total_cmp(&y),
        _ => crate::config::params::fmt_value(&values[a])
            .cmp(&crate::config::params::fmt_value(&values[b])),
    });
    let labels: Vec<String> = order
        .iter()
        .map(|&i| crate::config::params::fmt_value(&values[i]))
        .collect();
    let f1: Vec<(usize, f64)> = order
        .iter()
        .enumerate()
        .map(|(x, &i)| (x, exps[i].valid_f1()))
        .filter(|(_, y)| y.is_finite())
        .collect();
    let miou: Vec<(usize, f64)> = order
        .iter()
        .enumerate()
        .map(|(x, &i)| (x, exps[i].best_valid_miou))
        .filter(|(_, y)| y.is_finite())
        .collect();
    let (lo, hi) = finite_extent(f1.iter().chain(&miou).map(|p| p.1)).unwrap_or((0.0, 1.0));
    let pad = (0.08 * (hi - lo)).max(0.02);
    let (y0, y1) = ((lo - pad).max(0.0), (hi + pad).min(1.0));
    let (y0, y1) = if y1 > y0 { (y0, y1) } else { (0.0, 1.0) };
    // A discrete range includes its upper end: 0..n-1 is n categories.
    let n = exps.len().max(1) as i32;
    let title = format!("Sweep over {key}");
    render_png(path, SIZE, |area| {
        let mut ctx = ChartBuilder::on(area)
            .caption(&title, bold(30.0))
            .margin(18)
            .margin_right(30)
            .x_label_area_size(72)
            .y_label_area_size(100)
            .build_cartesian_2d((0..n - 1).into_segmented(), y0..y1)?;
        let x_fmt = |v: &SegmentValue<i32>| match v {
            SegmentValue::CenterOf(i) => usize::try_from(*i)
                .ok()
                .and_then(|i| labels.get(i))
                .cloned()
                .unwrap_or_default(),
            _ => String::new(),
        };
        ctx.configure_mesh()
            .x_desc(key)
            .y_desc("Validation score")
            .axis_desc_style(font(24.0))
            .label_style(font(20.0))
            .x_labels(exps.len().max(1))
            .y_labels(8)
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&|y| format!("{y:.3}"))
            .disable_x_mesh()
            .bold_line_style(GRID_COLOR.stroke_width(1))
            .light_line_style(WHITE)
            .axis_style(RGBColor(120, 120, 120))
            .draw()?;
        let at = |x: usize| SegmentValue::CenterOf(x as i32);
        for (label, color, pts) in [
            ("valid F1 (final evaluation, FOV)", TRAIN_COLOR, &f1),
            ("best valid mIoU", VALID_COLOR, &miou),
        ] {
            ctx.draw_series(LineSeries::new(
                pts.iter().map(|&(x, y)| (at(x), y)),
                color.stroke_width(2),
            ))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
            ctx.draw_series(
                pts.iter()
                    .map(|&(x, y)| Circle::new((at(x), y), 5, color.filled())),
            )?;
        }
        ctx.configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .margin(12)
            .label_font(font(20.0))
            .background_style(WHITE.mix(0.9))
            .border_style(RGBColor(180, 180, 180))
            .draw()?;
        Ok(())
    })
}
