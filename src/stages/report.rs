//! `report`: the per-experiment report (the seed's figures 5–8: loss, accuracy and mIoU per
//! epoch, and a Markdown summary).
//!
//! The stage gathers what `train` and `evaluate` published into an [`ExperimentSummary`]
//! (`summary.json`) and renders it. The comparison of several experiments is the `compare`
//! stage, which reads these summaries.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

use super::evaluate::{self, EvalReport, Scores};
use super::train::TrainSummary;
use super::{Stage, StageCtx};
use crate::config::{Arch, Experiment};
use crate::report::{self, ExperimentSummary, PredictionImage, SplitMetrics, TrainUnit};

pub struct Report;

pub const SUMMARY: &str = "summary.json";

impl Stage for Report {
    fn version(&self) -> u32 {
        // 2: summary.json records the experiment's params (`config`).
        2
    }
    fn params(&self) -> &'static [&'static str] {
        &[
            "name",
            "description",
            "report",
            "model",
            "train.steps",
            "train.crop",
            "train.imgsz",
        ]
    }
    fn role(&self) -> &'static str {
        "report"
    }
    fn requires(&self) -> &'static [&'static str] {
        &["train", "evaluate"]
    }
    fn run(&self, ctx: &StageCtx) -> Result<()> {
        let train_dir = ctx.input("train")?;
        let eval_dir = ctx.input("evaluate")?;
        let mut summary = summarize(ctx.exp, train_dir, eval_dir)?;
        // What a comparison tells experiments apart by: the params the pipeline lists here.
        summary.config = ctx.params.clone();
        fs::write(
            ctx.out.join(SUMMARY),
            serde_json::to_string_pretty(&summary)?,
        )?;
        report::render_experiment(&summary, ctx.out)
            .with_context(|| format!("rendering the report of `{}`", ctx.exp.name))
    }
}

fn split_metrics(split: &str, s: &Scores, fov: bool) -> SplitMetrics {
    SplitMetrics {
        split: split.to_string(),
        accuracy: s.accuracy,
        miou: s.miou,
        vessel_iou: s.vessel_iou,
        dice: s.dice,
        sensitivity: s.sensitivity,
        specificity: s.specificity,
        precision: s.precision,
        auc: s.auc,
        fov,
    }
}

/// Everything the report shows about one experiment, from its published outputs.
pub fn summarize(exp: &Experiment, train_dir: &Path, eval_dir: &Path) -> Result<ExperimentSummary> {
    let p = train_dir.join("summary.json");
    let ts: TrainSummary = serde_json::from_str(
        &fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?,
    )
    .with_context(|| format!("malformed {}", p.display()))?;
    let ev: EvalReport = evaluate::load_report(eval_dir)?;
    let mut eval = Vec::new();
    for (split, s) in &ev.splits {
        eval.push(split_metrics(split, &s.fov, true));
        eval.push(split_metrics(split, &s.all, false));
    }
    // The same images for every experiment: the first test images, else valid.
    let split = if ev.predicted.iter().any(|(s, _)| s == "test") {
        "test"
    } else {
        "valid"
    };
    let predictions = ev
        .predicted
        .iter()
        .filter(|(s, _)| s == split)
        .take(exp.report.images)
        .map(|(s, id)| {
            let d = eval_dir.join("predictions").join(s);
            PredictionImage {
                id: id.clone(),
                overlay_png: d.join(format!("{id}_overlay.png")),
                mask_png: d.join(format!("{id}_mask.png")),
                prob_png: d.join(format!("{id}_prob.png")),
            }
        })
        .collect();
    let t = &exp.train;
    let (arch, backbone) = match exp.model.arch {
        Arch::Deeplabv3 => (
            "DeepLabV3".to_string(),
            exp.model.backbone.as_str().to_string(),
        ),
        Arch::Unet => (
            "U-Net".to_string(),
            format!(
                "widths {}",
                exp.model
                    .widths
                    .iter()
                    .map(|w| w.to_string())
                    .collect::<Vec<_>>()
                    .join("/")
            ),
        ),
    };
    let (unit, epochs, best_epoch) = if t.steps > 0 {
        let best_step = ts
            .history
            .iter()
            .find(|r| r.period == ts.best_period)
            .map_or(0, |r| r.step);
        (TrainUnit::Step, ts.steps, best_step)
    } else {
        (TrainUnit::Epoch, ts.periods, ts.best_period)
    };
    Ok(ExperimentSummary {
        name: exp.name.clone(),
        description: exp.description.clone(),
        arch,
        backbone,
        imgsz: if t.crop > 0 {
            format!("native, crops {}", t.crop)
        } else {
            t.imgsz.to_string()
        },
        unit,
        epochs,
        best_epoch,
        best_valid_miou: ts.best_valid_miou,
        best_valid_dice: ts.best_valid_dice,
        history: ts.history,
        eval,
        train_seconds: ts.train_seconds,
        peak_rss_mib: ts.peak_rss_mib,
        param_count: ts.param_count as u64,
        device: ts.device,
        predictions,
        config: Default::default(),
    })
}
