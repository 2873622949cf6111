//! Reports: training curves, comparison charts, prediction grids, HTML / Markdown / CSV.
//!
//! The stages collect what happened in a run into an [`ExperimentSummary`] (stored as
//! JSON next to the run) and call [`render_experiment`] for one run or
//! [`render_comparison`] for several. Nothing here trains or evaluates: this module
//! only draws and formats, so that the article's figures (training curves per
//! experiment, best validation mIoU side by side, test predictions) can be rebuilt
//! from the stored summaries alone.
//!
//! Plots are drawn with plotters into an in-memory RGB buffer and encoded with the
//! `image` crate; text uses the DejaVu Sans font bundled under `assets/fonts/`, so
//! nothing depends on fonts installed on the machine.

mod format;
mod glyphs;
mod html;
mod markdown;
mod plots;
mod tables;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

pub use format::{fmt_bytes_mib, fmt_count, fmt_duration, fmt_metric};
pub use plots::{
    plot_best_miou_bars, plot_experiment_curves, plot_sweep, plot_valid_miou_overlay, CurveFiles,
};

/// What one training-progress unit is: experiments either run whole epochs or a fixed
/// number of optimiser steps (e.g. random crops at native resolution).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum TrainUnit {
    #[default]
    Epoch,
    Step,
}

impl TrainUnit {
    /// Axis label / table heading for this unit ("Epoch" or "Step").
    pub fn label(self) -> &'static str {
        match self {
            TrainUnit::Epoch => "Epoch",
            TrainUnit::Step => "Step",
        }
    }
}

/// One training period and the validation pass that ended it: the row the curves are drawn
/// from. A period is an epoch, or `train.valid_every_steps` steps (step-based training).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeriodRow {
    /// 1-based period number: the epoch, or the count of `train.valid_every_steps` step
    /// blocks. Read from files that still name it `epoch`.
    #[serde(alias = "epoch")]
    pub period: usize,
    /// Optimiser steps completed when the validation pass ran.
    pub step: usize,
    /// Mean training loss since the previous row.
    pub train_loss: f64,
    /// Mean validation loss. The validation figures are NaN (`null` in JSON) for a run
    /// without valid images (`data.valid_count = 0`).
    #[serde(deserialize_with = "null_as_nan")]
    pub valid_loss: f64,
    /// Validation pixel accuracy in `[0, 1]`.
    #[serde(deserialize_with = "null_as_nan")]
    pub pixel_acc: f64,
    /// Validation mean IoU over background and vessel, in `[0, 1]`.
    #[serde(deserialize_with = "null_as_nan")]
    pub miou: f64,
    /// Validation IoU of the vessel class alone.
    #[serde(deserialize_with = "null_as_nan")]
    pub vessel_iou: f64,
    /// Validation Dice (F1) of the vessel class.
    #[serde(deserialize_with = "null_as_nan")]
    pub vessel_dice: f64,
    /// Learning rate in effect at the end of the period.
    pub lr: f64,
    /// Wall-clock seconds since training started.
    pub seconds: f64,
    /// Training pixel accuracy, when the trainer tracked it (drawn next to validation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_pixel_acc: Option<f64>,
    /// Training mean IoU, when the trainer tracked it (drawn next to validation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_miou: Option<f64>,
}

/// A float that may be missing: JSON writes NaN as `null`, which reads back as NaN.
pub fn null_as_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Final evaluation of one model on one split.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SplitMetrics {
    /// Split name: `"train"`, `"valid"` or `"test"`.
    pub split: String,
    pub accuracy: f64,
    pub miou: f64,
    pub vessel_iou: f64,
    /// Vessel Dice (F1).
    pub dice: f64,
    /// Vessel recall.
    pub sensitivity: f64,
    /// Background recall.
    pub specificity: f64,
    /// Vessel precision.
    pub precision: f64,
    /// Area under the ROC curve of the vessel probability, when computed.
    #[serde(default)]
    pub auc: Option<f64>,
    /// Whether the metrics count only pixels inside the field-of-view mask.
    #[serde(default)]
    pub fov: bool,
}

/// One test image's prediction, as PNG files written by the evaluate stage.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PredictionImage {
    /// Image id (e.g. `"01"`); images with the same id line up across experiments.
    pub id: String,
    /// Input image with the predicted vessels drawn over it (shown in the grids).
    pub overlay_png: PathBuf,
    /// Binary predicted mask.
    pub mask_png: PathBuf,
    /// Vessel probability as a grey-level image.
    pub prob_png: PathBuf,
}

/// Everything a report shows about one experiment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExperimentSummary {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Model family, e.g. `"deeplabv3"` or `"unet"`.
    pub arch: String,
    /// Backbone, e.g. `"resnet50"`; empty when the architecture has none.
    #[serde(default)]
    pub backbone: String,
    /// Training resolution as shown to readers, e.g. `"512"` or `"native crops 96"`.
    pub imgsz: String,
    /// Whether `epochs`, `best_epoch` and the curves' x axis count epochs or steps.
    #[serde(default)]
    pub unit: TrainUnit,
    /// Length of training in `unit`s.
    pub epochs: usize,
    /// Epoch (or step) whose checkpoint had the best validation mIoU.
    pub best_epoch: usize,
    #[serde(deserialize_with = "null_as_nan")]
    pub best_valid_miou: f64,
    /// Validation vessel Dice of the best checkpoint.
    #[serde(deserialize_with = "null_as_nan")]
    pub best_valid_dice: f64,
    /// One row per validation pass, in training order.
    #[serde(default)]
    pub history: Vec<PeriodRow>,
    /// Final evaluation of the best checkpoint, one entry per split (and FOV setting).
    #[serde(default)]
    pub eval: Vec<SplitMetrics>,
    pub train_seconds: f64,
    pub peak_rss_mib: f64,
    pub param_count: u64,
    /// Where it trained, e.g. `"cpu (2 threads)"`.
    pub device: String,
    /// Test-image predictions of the best checkpoint.
    #[serde(default)]
    pub predictions: Vec<PredictionImage>,
    /// The experiment's canonical params by key (`train.lr`, or a whole section such as
    /// `augment` as an object): a comparison shows the ones that differ between experiments,
    /// and plots a one-dimensional sweep against its swept value.
    #[serde(default)]
    pub config: std::collections::BTreeMap<String, serde_json::Value>,
}

impl ExperimentSummary {
    /// Final metrics on `split`, preferring the field-of-view-restricted entry when
    /// both were computed (that is how DRIVE results are usually reported).
    pub fn split_metrics(&self, split: &str) -> Option<&SplitMetrics> {
        let mut matching = self.eval.iter().filter(|m| m.split == split);
        let first = matching.next()?;
        if first.fov {
            return Some(first);
        }
        Some(matching.find(|m| m.fov).unwrap_or(first))
    }

    /// Validation F1 (vessel Dice) of the final evaluation inside the FOV, else the best
    /// checkpoint's during training.
    pub fn valid_f1(&self) -> f64 {
        self.split_metrics("valid")
            .map_or(self.best_valid_dice, |m| m.dice)
    }

    /// The params, sections flattened to dotted keys.
    pub fn flat_config(&self) -> std::collections::BTreeMap<String, serde_json::Value> {
        crate::config::params::flatten(&self.config)
    }

    /// x coordinate of a history row on this experiment's curves.
    fn x_of(&self, row: &PeriodRow) -> f64 {
        match self.unit {
            TrainUnit::Epoch => row.period as f64,
            TrainUnit::Step => row.step as f64,
        }
    }
}

/// File names of the per-experiment curve plots, relative to the experiment's folder.
pub const LOSS_PNG: &str = "loss.png";
pub const ACCURACY_PNG: &str = "accuracy.png";
pub const MIOU_PNG: &str = "miou.png";
/// File names of the comparison plots, relative to the comparison folder.
pub const BEST_MIOU_PNG: &str = "best_valid_miou.png";
pub const MIOU_OVERLAY_PNG: &str = "valid_miou_curves.png";
/// The swept value against valid F1 and mIoU, when exactly one param differs.
pub const SWEEP_PNG: &str = "sweep.png";

/// Most differing params shown as columns of the results table (beyond that, the table would
/// be mostly params; the experiments' own sections list them).
pub const MAX_PARAM_COLUMNS: usize = 6;

/// The params (dotted keys) whose values differ between the experiments, labels excepted.
pub fn differing_params(exps: &[ExperimentSummary]) -> Vec<String> {
    if exps.len() < 2 {
        return Vec::new();
    }
    let flat: Vec<_> = exps.iter().map(ExperimentSummary::flat_config).collect();
    let refs: Vec<_> = flat.iter().collect();
    crate::config::params::differing(&refs)
}

/// Renders one experiment's report into `out_dir`: `loss.png`, `accuracy.png`,
/// `miou.png` (train vs valid per epoch) and a short `README.md` (best epoch,
/// details, final metrics per split).
pub fn render_experiment(summary: &ExperimentSummary, out_dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(out_dir)
        .with_context(|| format!("creating report folder {}", out_dir.display()))?;
    plot_experiment_curves(summary, out_dir)?;
    let md = markdown::experiment_readme(summary);
    let path = out_dir.join("README.md");
    fs::write(&path, md).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Renders a comparison of several experiments into `out_dir`:
///
/// - `index.html`: self-contained page (every image inlined as a data URI);
/// - `README.md`: the same content for a code host, images by relative path;
/// - `summary.csv`: one row per experiment (see [`write_summary_csv`]);
/// - `best_valid_miou.png` (bar chart) and `valid_miou_curves.png` (overlay);
/// - `sweep.png` when exactly one param differs (a one-dimensional sweep): the swept value
///   against valid F1 and mIoU;
/// - `experiments/<name>/`: each experiment's report (see [`render_experiment`]);
/// - `predictions/<name>/`: copies of the prediction PNGs shown in the grid.
///
/// Fails when `exps` is empty or a prediction PNG cannot be read.
pub fn render_comparison(
    title: &str,
    exps: &[ExperimentSummary],
    out_dir: &Path,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        !exps.is_empty(),
        "no experiments to compare for report `{title}`"
    );
    fs::create_dir_all(out_dir)
        .with_context(|| format!("creating report folder {}", out_dir.display()))?;
    let slugs = unique_slugs(exps);
    let mut layout = Vec::with_capacity(exps.len());
    for (exp, slug) in exps.iter().zip(&slugs) {
        let exp_rel = PathBuf::from("experiments").join(slug);
        render_experiment(exp, &out_dir.join(&exp_rel))
            .with_context(|| format!("rendering the report of experiment `{}`", exp.name))?;
        let predictions = copy_predictions(exp, out_dir, slug)?;
        layout.push(ExpFiles {
            curves: [LOSS_PNG, ACCURACY_PNG, MIOU_PNG].map(|f| exp_rel.join(f)),
            predictions,
        });
    }
    plot_best_miou_bars(exps, &out_dir.join(BEST_MIOU_PNG))?;
    plot_valid_miou_overlay(exps, &out_dir.join(MIOU_OVERLAY_PNG))?;
    write_summary_csv(exps, &out_dir.join("summary.csv"))?;
    let differing = differing_params(exps);
    let sweep_key = match differing.as_slice() {
        [one] => {
            plot_sweep(exps, one, &out_dir.join(SWEEP_PNG))?;
            Some(one.clone())
        }
        _ => None,
    };
    let param_columns = if differing.len() <= MAX_PARAM_COLUMNS {
        differing
    } else {
        Vec::new()
    };

    let doc = ReportDoc {
        title,
        exps,
        files: &layout,
        grid_ids: grid_ids(exps),
        param_columns,
        sweep_key,
    };
    let md = markdown::comparison_readme(&doc);
    let md_path = out_dir.join("README.md");
    fs::write(&md_path, md).with_context(|| format!("writing {}", md_path.display()))?;
    let page = html::comparison_page(&doc, out_dir)?;
    let html_path = out_dir.join("index.html");
    fs::write(&html_path, page).with_context(|| format!("writing {}", html_path.display()))?;
    Ok(())
}

/// Column names of [`write_summary_csv`], in order.
pub const SUMMARY_CSV_HEADER: [&str; 24] = [
    "name",
    "arch",
    "backbone",
    "imgsz",
    "unit",
    "epochs",
    "best_epoch",
    "best_valid_miou",
    "valid_dice",
    "valid_auc",
    "test_accuracy",
    "test_miou",
    "test_vessel_iou",
    "test_dice",
    "test_sensitivity",
    "test_specificity",
    "test_precision",
    "test_auc",
    "test_fov",
    "train_seconds",
    "peak_rss_mib",
    "params",
    "device",
    "description",
];

/// Writes one CSV row per experiment (columns: [`SUMMARY_CSV_HEADER`]). Numbers are
/// written in full precision; missing values (no test split, no AUC, non-finite
/// numbers) are empty fields so that spreadsheets and pandas read them as missing.
pub fn write_summary_csv(exps: &[ExperimentSummary], path: &Path) -> anyhow::Result<()> {
    let mut w =
        csv::Writer::from_path(path).with_context(|| format!("creating {}", path.display()))?;
    w.write_record(SUMMARY_CSV_HEADER)?;
    for e in exps {
        let num = |v: f64| {
            if v.is_finite() {
                v.to_string()
            } else {
                String::new()
            }
        };
        let opt = |v: Option<f64>| v.map(num).unwrap_or_default();
        let test = e.split_metrics("test");
        let t = |f: fn(&SplitMetrics) -> f64| opt(test.map(f));
        let row: [String; 24] = [
            e.name.clone(),
            e.arch.clone(),
            e.backbone.clone(),
            e.imgsz.clone(),
            e.unit.label().to_lowercase(),
            e.epochs.to_string(),
            e.best_epoch.to_string(),
            num(e.best_valid_miou),
            num(e.best_valid_dice),
            opt(e.split_metrics("valid").and_then(|m| m.auc)),
            t(|m| m.accuracy),
            t(|m| m.miou),
            t(|m| m.vessel_iou),
            t(|m| m.dice),
            t(|m| m.sensitivity),
            t(|m| m.specificity),
            t(|m| m.precision),
            opt(test.and_then(|m| m.auc)),
            test.map(|m| m.fov.to_string()).unwrap_or_default(),
            num(e.train_seconds),
            num(e.peak_rss_mib),
            e.param_count.to_string(),
            e.device.clone(),
            e.description.clone(),
        ];
        w.write_record(&row)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    w.flush()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Where one experiment's files ended up inside a comparison folder (relative paths).
pub(crate) struct ExpFiles {
    /// Loss, accuracy and mIoU curves.
    pub curves: [PathBuf; 3],
    /// Copied prediction overlays by image id.
    pub predictions: HashMap<String, CopiedPrediction>,
}

/// One prediction's copies inside the comparison folder (relative paths).
pub(crate) struct CopiedPrediction {
    pub overlay: PathBuf,
    pub mask: PathBuf,
    pub prob: PathBuf,
}

/// Everything the HTML and Markdown writers need for a comparison page.
pub(crate) struct ReportDoc<'a> {
    pub title: &'a str,
    pub exps: &'a [ExperimentSummary],
    pub files: &'a [ExpFiles],
    /// Image ids of the prediction grid's rows, in order of first appearance.
    pub grid_ids: Vec<String>,
    /// Params that differ between the experiments, shown as results-table columns.
    pub param_columns: Vec<String>,
    /// The one param that differs (a one-dimensional sweep): `SWEEP_PNG` was drawn.
    pub sweep_key: Option<String>,
}

/// Folder-safe, unique names for the experiments (`/` and spaces would break paths).
fn unique_slugs(exps: &[ExperimentSummary]) -> Vec<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    exps.iter()
        .map(|e| {
            let mut slug: String = e
                .name
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            if slug.is_empty() || slug.starts_with('.') {
                slug.insert(0, '_');
            }
            let n = seen.entry(slug.clone()).or_insert(0);
            *n += 1;
            if *n > 1 {
                slug = format!("{slug}-{n}");
            }
            slug
        })
        .collect()
}

/// Copies an experiment's prediction PNGs to `predictions/<slug>/` so that README.md
/// can reference them by relative path.
fn copy_predictions(
    exp: &ExperimentSummary,
    out_dir: &Path,
    slug: &str,
) -> anyhow::Result<HashMap<String, CopiedPrediction>> {
    let mut copied = HashMap::new();
    if exp.predictions.is_empty() {
        return Ok(copied);
    }
    let rel_dir = PathBuf::from("predictions").join(slug);
    let dir = out_dir.join(&rel_dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for p in &exp.predictions {
        let id_slug: String =
            p.id.chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
        let copy = |src: &Path, kind: &str| -> anyhow::Result<PathBuf> {
            let rel = rel_dir.join(format!("{id_slug}_{kind}.png"));
            fs::copy(src, out_dir.join(&rel)).with_context(|| {
                format!(
                    "copying the {kind} prediction of image `{}` of experiment `{}` from {}",
                    p.id,
                    exp.name,
                    src.display()
                )
            })?;
            Ok(rel)
        };
        let entry = CopiedPrediction {
            overlay: copy(&p.overlay_png, "overlay")?,
            mask: copy(&p.mask_png, "mask")?,
            prob: copy(&p.prob_png, "prob")?,
        };
        copied.entry(p.id.clone()).or_insert(entry);
    }
    Ok(copied)
}

/// Rows of the prediction grid: every image id any experiment predicted, in order of
/// first appearance (experiments that lack an id get an empty cell).
fn grid_ids(exps: &[ExperimentSummary]) -> Vec<String> {
    let mut ids: Vec<String> = Vec::new();
    for p in exps.iter().flat_map(|e| &e.predictions) {
        if !ids.contains(&p.id) {
            ids.push(p.id.clone());
        }
    }
    ids
}
