//! The report's tables as plain data, so that HTML and Markdown show the same cells.

use super::format::{
    fmt_bytes_mib, fmt_count, fmt_duration, fmt_metric, fmt_opt_metric, or_missing, MISSING,
};
use super::{ExperimentSummary, SplitMetrics};

/// One table cell: its text and whether to emphasise it (best value of a column).
pub(crate) struct Cell {
    pub text: String,
    pub strong: bool,
}

impl Cell {
    fn plain(text: impl Into<String>) -> Self {
        Cell {
            text: text.into(),
            strong: false,
        }
    }
}

/// A table with a header row; `numeric[i]` right-aligns column `i`.
pub(crate) struct Table {
    pub headers: Vec<String>,
    pub numeric: Vec<bool>,
    pub rows: Vec<Vec<Cell>>,
}

/// Whether any experiment has final metrics on the test split.
fn any_test(exps: &[ExperimentSummary]) -> bool {
    exps.iter().any(|e| e.split_metrics("test").is_some())
}

/// One row per experiment: configuration, best validation scores and test scores (the
/// test columns only when some experiment has them). The best validation mIoU is
/// emphasised.
pub(crate) fn results_table(exps: &[ExperimentSummary]) -> Table {
    let with_test = any_test(exps);
    let mut headers: Vec<(&str, bool)> = vec![
        ("Experiment", false),
        ("Arch", false),
        ("Backbone", false),
        ("Image size", false),
        ("Trained", true),
        ("Best at", true),
        ("Best valid mIoU", true),
        ("Valid Dice", true),
        ("Valid AUC", true),
    ];
    if with_test {
        headers.extend([("Test mIoU", true), ("Test Dice", true), ("Test AUC", true)]);
    }
    let top = exps
        .iter()
        .map(|e| e.best_valid_miou)
        .filter(|v| v.is_finite())
        .fold(f64::NEG_INFINITY, f64::max);
    let rows = exps
        .iter()
        .map(|e| {
            let mut row = vec![
                Cell::plain(e.name.clone()),
                Cell::plain(or_missing(&e.arch)),
                Cell::plain(or_missing(&e.backbone)),
                Cell::plain(or_missing(&e.imgsz)),
                Cell::plain(format!("{} {}", e.epochs, unit_word(e, e.epochs))),
                Cell::plain(format!(
                    "{} {}",
                    e.unit.label().to_lowercase(),
                    e.best_epoch
                )),
                Cell {
                    text: fmt_metric(e.best_valid_miou),
                    strong: exps.len() > 1 && e.best_valid_miou == top,
                },
                Cell::plain(fmt_metric(e.best_valid_dice)),
                Cell::plain(fmt_opt_metric(e.split_metrics("valid").and_then(|m| m.auc))),
            ];
            if with_test {
                let t = e.split_metrics("test");
                row.extend([
                    Cell::plain(fmt_opt_metric(t.map(|m| m.miou))),
                    Cell::plain(fmt_opt_metric(t.map(|m| m.dice))),
                    Cell::plain(fmt_opt_metric(t.and_then(|m| m.auc))),
                ]);
            }
            row
        })
        .collect();
    Table {
        numeric: headers.iter().map(|h| h.1).collect(),
        headers: headers.iter().map(|h| h.0.to_string()).collect(),
        rows,
    }
}

/// [`results_table`] with a column per param in `keys` (short names as headings) after the
/// experiment's name.
pub(crate) fn results_table_with_params(exps: &[ExperimentSummary], keys: &[String]) -> Table {
    let mut t = results_table(exps);
    if keys.is_empty() {
        return t;
    }
    let shorts = crate::config::params::short_keys(keys);
    let flat: Vec<_> = exps.iter().map(ExperimentSummary::flat_config).collect();
    for (i, (key, short)) in keys.iter().zip(shorts).enumerate() {
        let values: Vec<Option<&serde_json::Value>> = flat.iter().map(|f| f.get(key)).collect();
        let numeric = values.iter().all(|v| v.is_none_or(|v| v.is_number()));
        t.headers.insert(1 + i, short);
        t.numeric.insert(1 + i, numeric);
        for (row, v) in t.rows.iter_mut().zip(values) {
            let text = v.map_or(MISSING.to_string(), crate::config::params::fmt_value);
            row.insert(1 + i, Cell::plain(text));
        }
    }
    t
}

/// One row per experiment: what training cost (time, memory, model size, device).
pub(crate) fn cost_table(exps: &[ExperimentSummary]) -> Table {
    let headers = [
        ("Experiment", false),
        ("Train time", true),
        ("Peak memory (RSS)", true),
        ("Parameters", true),
        ("Device", false),
    ];
    Table {
        headers: headers.iter().map(|h| h.0.to_string()).collect(),
        numeric: headers.iter().map(|h| h.1).collect(),
        rows: exps
            .iter()
            .map(|e| {
                vec![
                    Cell::plain(e.name.clone()),
                    Cell::plain(fmt_duration(e.train_seconds)),
                    Cell::plain(fmt_bytes_mib(e.peak_rss_mib)),
                    Cell::plain(fmt_count(e.param_count)),
                    Cell::plain(or_missing(&e.device)),
                ]
            })
            .collect(),
    }
}

/// "epochs"/"steps" (singular for 1).
fn unit_word(e: &ExperimentSummary, n: usize) -> String {
    let w = e.unit.label().to_lowercase();
    if n == 1 {
        w
    } else {
        format!("{w}s")
    }
}

/// Key/value table describing one experiment: configuration, best scores and cost.
pub(crate) fn details_table(e: &ExperimentSummary) -> Table {
    let valid_auc = e.split_metrics("valid").and_then(|m| m.auc);
    let test = e.split_metrics("test");
    let mut kv: Vec<(&str, String)> = vec![
        ("Architecture", or_missing(&e.arch).to_string()),
        ("Backbone", or_missing(&e.backbone).to_string()),
        ("Image size", or_missing(&e.imgsz).to_string()),
        (
            "Training length",
            format!("{} {}", e.epochs, unit_word(e, e.epochs)),
        ),
        (
            if e.unit == super::TrainUnit::Step {
                "Best step"
            } else {
                "Best epoch"
            },
            e.best_epoch.to_string(),
        ),
        ("Best valid mIoU", fmt_metric(e.best_valid_miou)),
        ("Best valid vessel Dice", fmt_metric(e.best_valid_dice)),
        ("Valid AUC", fmt_opt_metric(valid_auc)),
    ];
    if let Some(t) = test {
        kv.extend([
            ("Test mIoU", fmt_metric(t.miou)),
            ("Test vessel Dice", fmt_metric(t.dice)),
            ("Test AUC", fmt_opt_metric(t.auc)),
        ]);
    }
    kv.extend([
        ("Train time", fmt_duration(e.train_seconds)),
        ("Peak memory (RSS)", fmt_bytes_mib(e.peak_rss_mib)),
        ("Parameters", fmt_count(e.param_count)),
        ("Device", or_missing(&e.device).to_string()),
    ]);
    Table {
        headers: vec!["Property".into(), "Value".into()],
        numeric: vec![false, false],
        rows: kv
            .into_iter()
            .map(|(k, v)| vec![Cell::plain(k), Cell::plain(v)])
            .collect(),
    }
}

/// Final metrics of one experiment, one row per evaluated split; `None` when it has none.
pub(crate) fn eval_table(e: &ExperimentSummary) -> Option<Table> {
    if e.eval.is_empty() {
        return None;
    }
    let headers = [
        "Split",
        "Accuracy",
        "mIoU",
        "Vessel IoU",
        "Dice",
        "Sensitivity",
        "Specificity",
        "Precision",
        "AUC",
    ];
    let row = |m: &SplitMetrics| {
        vec![
            Cell::plain(if m.fov {
                format!("{} (FOV)", m.split)
            } else {
                format!("{} (all pixels)", m.split)
            }),
            Cell::plain(fmt_metric(m.accuracy)),
            Cell::plain(fmt_metric(m.miou)),
            Cell::plain(fmt_metric(m.vessel_iou)),
            Cell::plain(fmt_metric(m.dice)),
            Cell::plain(fmt_metric(m.sensitivity)),
            Cell::plain(fmt_metric(m.specificity)),
            Cell::plain(fmt_metric(m.precision)),
            Cell::plain(m.auc.map(fmt_metric).unwrap_or_else(|| MISSING.into())),
        ]
    };
    Some(Table {
        headers: headers.iter().map(|h| h.to_string()).collect(),
        numeric: headers
            .iter()
            .map(|h| *h != "Split" && *h != "Pixels")
            .collect(),
        rows: e.eval.iter().map(row).collect(),
    })
}
