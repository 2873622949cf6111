//! Synthetic experiment summaries for the report tests: three experiments that cover
//! epoch- and step-based runs, with and without test metrics / AUC, and a prediction
//! grid with a missing cell.

use std::path::{Path, PathBuf};

use driveline::report::{ExperimentSummary, PeriodRow, PredictionImage, SplitMetrics, TrainUnit};

/// Writes a small fundus-like RGB overlay, a binary mask and a grey probability map
/// for image `id` of experiment `seed` under `dir`.
fn write_prediction(dir: &Path, exp: &str, id: &str, seed: u32) -> PredictionImage {
    let (w, h) = (72u32, 64u32);
    let vessel = |x: u32, y: u32| {
        let fx = x as f32 / w as f32;
        let fy = y as f32 / h as f32;
        let a = ((fx * 9.0 + seed as f32).sin() * 0.25 + 0.5 - fy).abs() < 0.04;
        let b = ((fy * 7.0 + id.len() as f32).cos() * 0.2 + 0.5 - fx).abs() < 0.03;
        a || b
    };
    let overlay = image::RgbImage::from_fn(w, h, |x, y| {
        if vessel(x, y) {
            image::Rgb([40, 230, 90])
        } else {
            let r = 120 + ((x * 3 + y + seed * 20) % 100) as u8;
            image::Rgb([r, 50, 30])
        }
    });
    let mask = image::GrayImage::from_fn(w, h, |x, y| {
        image::Luma([if vessel(x, y) { 255 } else { 0 }])
    });
    let prob = image::GrayImage::from_fn(w, h, |x, y| {
        image::Luma([if vessel(x, y) {
            230
        } else {
            ((x + y) % 60) as u8
        }])
    });
    let base: PathBuf = dir.join(format!("{exp}_{id}"));
    let paths = PredictionImage {
        id: id.to_string(),
        overlay_png: base.with_extension("overlay.png"),
        mask_png: base.with_extension("mask.png"),
        prob_png: base.with_extension("prob.png"),
    };
    overlay.save(&paths.overlay_png).unwrap();
    mask.save(&paths.mask_png).unwrap();
    prob.save(&paths.prob_png).unwrap();
    paths
}

/// A plausible training history: losses fall, accuracy and IoU rise and saturate.
fn history(
    n: usize,
    unit: TrainUnit,
    steps_per: usize,
    ceiling: f64,
    with_train: bool,
) -> Vec<PeriodRow> {
    (1..=n)
        .map(|i| {
            let t = i as f64 / n as f64;
            let rise = 1.0 - (-4.0 * t).exp();
            let wiggle = 0.006 * ((i * 7) as f64).sin();
            let miou = 0.48 + (ceiling - 0.48) * rise + wiggle;
            let step = i * steps_per;
            PeriodRow {
                period: match unit {
                    TrainUnit::Epoch => i,
                    TrainUnit::Step => 1 + step / 500,
                },
                step,
                train_loss: 0.65 * (-3.0 * t).exp() + 0.08,
                valid_loss: 0.6 * (-2.5 * t).exp() + 0.12 + wiggle.abs(),
                pixel_acc: 0.90 + 0.065 * rise + wiggle / 3.0,
                miou,
                vessel_iou: 2.0 * miou - 1.0 + 0.02,
                vessel_dice: (2.0 * (2.0 * miou - 0.98)) / (1.0 + (2.0 * miou - 0.98)),
                lr: 1e-3 * (1.0 - t),
                seconds: 42.0 * i as f64,
                train_pixel_acc: with_train.then_some(0.91 + 0.07 * rise),
                train_miou: with_train.then_some(0.50 + (ceiling + 0.03 - 0.50) * rise),
            }
        })
        .collect()
}

fn metrics(split: &str, miou: f64, auc: Option<f64>, fov: bool) -> SplitMetrics {
    SplitMetrics {
        split: split.to_string(),
        accuracy: 0.955 + miou / 100.0,
        miou,
        vessel_iou: 2.0 * miou - 1.0,
        dice: 0.78 + (miou - 0.8),
        sensitivity: 0.79,
        specificity: 0.981,
        precision: 0.81,
        auc,
        fov,
    }
}

/// Three experiments whose prediction PNGs are written under `dir`.
pub fn synthetic_summaries(dir: &Path) -> Vec<ExperimentSummary> {
    std::fs::create_dir_all(dir).unwrap();
    let ids = ["01", "02", "03"];
    let a_hist = history(12, TrainUnit::Epoch, 5, 0.82, true);
    let b_hist = history(8, TrainUnit::Epoch, 5, 0.80, false);
    let c_hist = history(30, TrainUnit::Step, 200, 0.79, false);
    let best = |h: &[PeriodRow], unit: TrainUnit| {
        let r = h.iter().max_by(|a, b| a.miou.total_cmp(&b.miou)).unwrap();
        let at = match unit {
            TrainUnit::Epoch => r.period,
            TrainUnit::Step => r.step,
        };
        (at, r.miou, r.vessel_dice)
    };
    let (a_at, a_miou, a_dice) = best(&a_hist, TrainUnit::Epoch);
    let (b_at, b_miou, b_dice) = best(&b_hist, TrainUnit::Epoch);
    let (c_at, c_miou, c_dice) = best(&c_hist, TrainUnit::Step);
    vec![
        ExperimentSummary {
            name: "deeplabv3_resnet50_512".into(),
            description: "DeepLabV3 with a ResNet-50 backbone, images resized to 512 px.".into(),
            arch: "deeplabv3".into(),
            backbone: "resnet50".into(),
            imgsz: "512".into(),
            unit: TrainUnit::Epoch,
            epochs: 12,
            best_epoch: a_at,
            best_valid_miou: a_miou,
            best_valid_dice: a_dice,
            history: a_hist,
            eval: vec![
                metrics("valid", a_miou, Some(0.9712), true),
                metrics("valid", a_miou - 0.01, Some(0.9655), false),
                metrics("test", 0.8012, Some(0.9701), true),
            ],
            train_seconds: 3725.0,
            peak_rss_mib: 5210.0,
            param_count: 39_635_522,
            device: "cpu (2 threads)".into(),
            predictions: ids
                .iter()
                .enumerate()
                .map(|(k, id)| write_prediction(dir, "a", id, k as u32))
                .collect(),
            config: Default::default(),
        },
        ExperimentSummary {
            name: "deeplabv3_resnet101_768".into(),
            description: "Deeper backbone, larger images <768 px> & no test labels.".into(),
            arch: "deeplabv3".into(),
            backbone: "resnet101".into(),
            imgsz: "768".into(),
            unit: TrainUnit::Epoch,
            epochs: 8,
            best_epoch: b_at,
            best_valid_miou: b_miou,
            best_valid_dice: b_dice,
            history: b_hist,
            eval: vec![metrics("valid", b_miou, None, true)],
            train_seconds: 7260.5,
            peak_rss_mib: 9020.0,
            param_count: 58_627_650,
            device: "cpu (2 threads)".into(),
            predictions: ids
                .iter()
                .enumerate()
                .map(|(k, id)| write_prediction(dir, "b", id, 3 + k as u32))
                .collect(),
            config: Default::default(),
        },
        ExperimentSummary {
            name: "unet_crops96".into(),
            description: String::new(),
            arch: "unet".into(),
            backbone: String::new(),
            imgsz: "native crops 96".into(),
            unit: TrainUnit::Step,
            epochs: 6000,
            best_epoch: c_at,
            best_valid_miou: c_miou,
            best_valid_dice: c_dice,
            history: c_hist,
            eval: Vec::new(),
            train_seconds: 58.25,
            peak_rss_mib: 610.0,
            param_count: 1_940_000,
            device: "cpu".into(),
            // Only two of the three images: the grid must show an empty cell.
            predictions: ids[..2]
                .iter()
                .enumerate()
                .map(|(k, id)| write_prediction(dir, "c", id, 7 + k as u32))
                .collect(),
            config: Default::default(),
        },
    ]
}

/// A one-dimensional sweep over `train.lr`: four points (values not in increasing order, and
/// the best validation mIoU in neither value order), each with its params in `config`.
#[allow(dead_code)]
pub fn sweep_summaries(dir: &Path) -> Vec<ExperimentSummary> {
    let base = synthetic_summaries(dir).remove(0);
    let points = [
        ("3e-4", 3e-4, 0.70),
        ("1e-4", 1e-4, 0.62),
        ("1e-3", 1e-3, 0.78),
        ("3e-3", 3e-3, 0.66),
    ];
    points
        .iter()
        .enumerate()
        .map(|(k, (text, lr, miou))| {
            let name = format!("sweep.lr_{text}");
            let mut e = base.clone();
            e.name = name.clone();
            e.description = String::new();
            e.best_valid_miou = *miou;
            e.best_valid_dice = miou - 0.2;
            e.history = history(6 + k, TrainUnit::Epoch, 5, *miou, false);
            e.eval = vec![
                metrics("valid", *miou, Some(0.95 + k as f64 / 100.0), true),
                metrics("test", miou - 0.01, Some(0.94), true),
            ];
            e.predictions = ["01", "02"]
                .iter()
                .enumerate()
                .map(|(j, id)| write_prediction(dir, &name, id, (10 + 2 * k + j) as u32))
                .collect();
            e.config = [
                ("name".to_string(), serde_json::json!(name)),
                (
                    "train".to_string(),
                    serde_json::json!({"lr": lr, "seed": 1, "epochs": 8}),
                ),
                (
                    "model".to_string(),
                    serde_json::json!({"backbone": "resnet50"}),
                ),
            ]
            .into();
            e
        })
        .collect()
}
