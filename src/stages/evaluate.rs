//! `evaluate`: score the chosen checkpoint the way the DRIVE literature does.
//!
//! For every valid image and every test image: the vessel probability at the image's original
//! resolution (predicted at the trained size and resized back, or at native resolution for
//! crop-trained models; optional flip or dihedral TTA), the binary mask at `evaluate.threshold`, and an
//! overlay on the fundus photograph. Where annotations exist: pixel accuracy, mIoU, vessel
//! IoU, Dice/F1, sensitivity, specificity, precision and exact AUC-ROC — inside the FOV mask
//! (the DRIVE convention) and over the whole image — per image and pooled over each split.
//! Output: `metrics.csv`, `metrics.json`, `predictions/<split>/<id>_{prob,mask,overlay}.png`.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use image::{GrayImage, Rgb, RgbImage};
use serde::{Deserialize, Serialize};

use super::preprocess::{self, Prepared};
use super::train::{BEST_IOU, BEST_LOSS, LAST};
use super::{Stage, StageCtx};
use crate::config::{CheckpointChoice, Threshold, Tta};
use crate::metrics::{AucAccumulator, Confusion};
use crate::model::{checkpoint, device};
use crate::predict::{mode_for, probs_to_image, Predictor};

pub struct Evaluate;

impl Stage for Evaluate {
    fn version(&self) -> u32 {
        // 2: native tiling takes each pixel from its most central tile.
        // 3: sparse dilated convolutions and the in-place inference pass (last-bit changes).
        3
    }
    fn params(&self) -> &'static [&'static str] {
        &[
            "evaluate.checkpoint",
            "evaluate.tta",
            "evaluate.threshold",
            "evaluate.tile",
            "evaluate.overlap",
            "train.device",
        ]
    }
    fn role(&self) -> &'static str {
        "evaluate"
    }
    fn requires(&self) -> &'static [&'static str] {
        &["preprocess", "train"]
    }
    fn run(&self, ctx: &StageCtx) -> Result<()> {
        let ds = preprocess::load(ctx.input("preprocess")?)?;
        let ckpt = ctx
            .input("train")?
            .join(checkpoint_file(ctx.exp.evaluate.checkpoint));
        evaluate(ctx, &ds, &ckpt)
    }
}

pub fn checkpoint_file(c: CheckpointChoice) -> &'static str {
    match c {
        CheckpointChoice::BestIou => BEST_IOU,
        CheckpointChoice::BestLoss => BEST_LOSS,
        CheckpointChoice::Last => LAST,
    }
}

/// Metrics of one region (inside the FOV, or the whole image).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Scores {
    pub accuracy: f64,
    pub miou: f64,
    pub vessel_iou: f64,
    pub dice: f64,
    pub sensitivity: f64,
    pub specificity: f64,
    pub precision: f64,
    pub auc: Option<f64>,
    pub pixels: u64,
}

impl Scores {
    fn new(c: &Confusion, auc: Option<f64>) -> Scores {
        Scores {
            accuracy: c.accuracy(),
            miou: c.miou(),
            vessel_iou: c.iou_vessel(),
            dice: c.dice(),
            sensitivity: c.sensitivity(),
            specificity: c.specificity(),
            precision: c.precision(),
            auc,
            pixels: c.total(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageScores {
    pub id: String,
    pub fov: Scores,
    pub all: Scores,
}

/// One split's results: pooled over its images, and per image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SplitScores {
    pub images: Vec<ImageScores>,
    pub fov: Scores,
    pub all: Scores,
}

/// `metrics.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalReport {
    pub checkpoint: String,
    pub tta: Tta,
    pub threshold: f32,
    /// Split name → scores (only splits with annotations).
    pub splits: BTreeMap<String, SplitScores>,
    /// Every image a prediction was written for: (split, id).
    pub predicted: Vec<(String, String)>,
}

fn evaluate(ctx: &StageCtx, ds: &preprocess::Dataset, ckpt: &Path) -> Result<()> {
    let e = &ctx.exp.evaluate;
    let device = device::select(&ctx.exp.train.device)?;
    let (model, meta) = checkpoint::load(ckpt, &device)?;
    let threshold = match e.threshold {
        Threshold::Value(v) => v,
        Threshold::Train => {
            let chosen = meta.threshold.as_ref().ok_or_else(|| {
                anyhow!(
                    "evaluate.threshold = \"train\": the checkpoint {} has no chosen threshold; \
                     train with train.pick_threshold = true",
                    ckpt.display()
                )
            })?;
            ctx.progress.log(&format!(
                "threshold {} ({}, F1 {:.4} there)",
                chosen.value, chosen.how, chosen.f1
            ));
            chosen.value
        }
    };
    let predictor = Predictor {
        model: &model,
        normalize: meta.preprocess.normalize,
        mode: mode_for(&meta.preprocess, e.tile, e.overlap),
        tta: e.tta,
    };
    let mut report = EvalReport {
        checkpoint: ckpt
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        tta: e.tta,
        threshold,
        splits: BTreeMap::new(),
        predicted: Vec::new(),
    };
    let mut csv_rows: Vec<CsvRow> = Vec::new();
    let total = ds.valid.len() + ds.test.len();
    let mut bar = ctx.progress.bar(total as u64, "predict");
    for (split, items) in [("valid", &ds.valid), ("test", &ds.test)] {
        let dir = ctx.out.join("predictions").join(split);
        fs::create_dir_all(&dir)?;
        let mut pooled_fov = (Confusion::default(), AucAccumulator::default());
        let mut pooled_all = (Confusion::default(), AucAccumulator::default());
        let mut images = Vec::new();
        for p in items.iter() {
            let s = score_image(&predictor, p, threshold, &dir)?;
            report.predicted.push((split.to_string(), p.id.clone()));
            if let Some((img, cf, af, ca, aa)) = s {
                pooled_fov.0.merge(&cf);
                pooled_fov.1.merge(&af);
                pooled_all.0.merge(&ca);
                pooled_all.1.merge(&aa);
                csv_rows.push(CsvRow::new(split, &img.id, "fov", &img.fov));
                csv_rows.push(CsvRow::new(split, &img.id, "all", &img.all));
                images.push(img);
            }
            bar.inc(1);
        }
        if !images.is_empty() {
            let fov = Scores::new(&pooled_fov.0, pooled_fov.1.auc());
            let all = Scores::new(&pooled_all.0, pooled_all.1.auc());
            csv_rows.push(CsvRow::new(split, "pooled", "fov", &fov));
            csv_rows.push(CsvRow::new(split, "pooled", "all", &all));
            ctx.progress.log(&format!(
                "{split}: inside FOV: Dice {:.4}, sensitivity {:.4}, specificity {:.4}, AUC {}, mIoU {:.4}",
                fov.dice,
                fov.sensitivity,
                fov.specificity,
                fov.auc.map_or("—".into(), |a| format!("{a:.4}")),
                fov.miou
            ));
            report
                .splits
                .insert(split.to_string(), SplitScores { images, fov, all });
        }
    }
    bar.finish();
    let mut w = csv::Writer::from_path(ctx.out.join("metrics.csv"))?;
    for r in &csv_rows {
        w.serialize(r)?;
    }
    w.flush()?;
    fs::write(
        ctx.out.join("metrics.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    Ok(())
}

type Scored = (
    ImageScores,
    Confusion,
    AucAccumulator,
    Confusion,
    AucAccumulator,
);

/// Predict one image, write its PNGs, and score it when it has an annotation.
fn score_image(
    pred: &Predictor,
    p: &Prepared,
    threshold: f32,
    dir: &Path,
) -> Result<Option<Scored>> {
    let orig = p.original();
    let (w, h) = orig.image.dimensions();
    let probs = pred.probs(&orig.image)?;
    let mask: Vec<u8> = probs.iter().map(|&q| u8::from(q >= threshold)).collect();
    probs_to_image(&probs, w, h)?
        .save(dir.join(format!("{}_prob.png", p.id)))
        .context("cannot write probability map")?;
    let mask_img = GrayImage::from_raw(w, h, mask.iter().map(|&m| m * 255).collect())
        .ok_or_else(|| anyhow!("mask size"))?;
    mask_img.save(dir.join(format!("{}_mask.png", p.id)))?;
    let label = orig.label.as_ref().map(|l| l.as_raw().as_slice());
    overlay(&orig.image, &mask, label).save(dir.join(format!("{}_overlay.png", p.id)))?;
    let Some(truth) = label else {
        return Ok(None);
    };
    let fov = orig.fov.as_raw().as_slice();
    let cf = Confusion::from_pixels(&mask, truth, Some(fov));
    let ca = Confusion::from_pixels(&mask, truth, None);
    let mut af = AucAccumulator::default();
    af.add(&probs, truth, Some(fov));
    let mut aa = AucAccumulator::default();
    aa.add(&probs, truth, None);
    let img = ImageScores {
        id: p.id.clone(),
        fov: Scores::new(&cf, af.auc()),
        all: Scores::new(&ca, aa.auc()),
    };
    Ok(Some((img, cf, af, ca, aa)))
}

/// Predicted vessels over the fundus photograph. With an annotation: true positives green,
/// false positives red, false negatives blue; without: predicted vessels green.
pub fn overlay(img: &RgbImage, mask: &[u8], truth: Option<&[u8]>) -> RgbImage {
    let mut out = img.clone();
    for (i, px) in out.pixels_mut().enumerate() {
        let pred = mask[i] != 0;
        let colour = match truth.map(|t| t[i] != 0) {
            Some(true) if pred => Some([0u8, 230, 64]),
            Some(false) if pred => Some([255, 40, 40]),
            Some(true) => Some([40, 120, 255]),
            None if pred => Some([0, 230, 64]),
            _ => None,
        };
        if let Some(c) = colour {
            let Rgb(p) = *px;
            *px = Rgb([
                ((p[0] as u16 + 3 * c[0] as u16) / 4) as u8,
                ((p[1] as u16 + 3 * c[1] as u16) / 4) as u8,
                ((p[2] as u16 + 3 * c[2] as u16) / 4) as u8,
            ]);
        }
    }
    out
}

#[derive(Debug, Serialize)]
struct CsvRow<'a> {
    split: &'a str,
    image: String,
    region: &'a str,
    accuracy: f64,
    miou: f64,
    vessel_iou: f64,
    dice: f64,
    sensitivity: f64,
    specificity: f64,
    precision: f64,
    auc: Option<f64>,
    pixels: u64,
}

impl<'a> CsvRow<'a> {
    fn new(split: &'a str, image: &str, region: &'a str, s: &Scores) -> Self {
        CsvRow {
            split,
            image: image.to_string(),
            region,
            accuracy: s.accuracy,
            miou: s.miou,
            vessel_iou: s.vessel_iou,
            dice: s.dice,
            sensitivity: s.sensitivity,
            specificity: s.specificity,
            precision: s.precision,
            auc: s.auc,
            pixels: s.pixels,
        }
    }
}

/// Load an evaluate output's `metrics.json`.
pub fn load_report(dir: &Path) -> Result<EvalReport> {
    let p = dir.join("metrics.json");
    let text = fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("malformed {}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_colours_tp_fp_fn() {
        let img = RgbImage::from_pixel(4, 1, Rgb([0, 0, 0]));
        let mask = [1, 1, 0, 0];
        let truth = [1, 0, 1, 0];
        let o = overlay(&img, &mask, Some(&truth));
        assert!(o.get_pixel(0, 0)[1] > 150, "TP is green");
        assert!(o.get_pixel(1, 0)[0] > 150, "FP is red");
        assert!(o.get_pixel(2, 0)[2] > 150, "FN is blue");
        assert_eq!(o.get_pixel(3, 0), &Rgb([0, 0, 0]), "TN untouched");
    }
}
