//! The U-Net recipe's options through the real binary:
//! - `train.pick_threshold`: the train stage stores in each checkpoint the threshold with the
//!   best F1 on the train images, `evaluate.threshold = "train"` scores with it, and
//!   `driveline infer` uses it when `--threshold` is not given. Bad uses are refused.
//! - `data.valid_count = 0`: training on every labelled image, with no validation, through to
//!   the report.

mod common;

use std::path::Path;

use common::Project;
use driveline::config::Tta;
use driveline::metrics::Confusion;
use driveline::model::checkpoint;
use driveline::predict::{mode_for, Predictor};
use driveline::stages::preprocess;

/// A tiny crop-trained U-Net whose probabilities spread enough for the threshold to matter.
const EXP: &str = r#"name = "t"
pipeline = "native"
[data]
layout = "synthetic"
valid_count = 2
[data.synthetic]
count = 6
test_count = 2
width = 96
height = 96
[model]
arch = "unet"
widths = [8, 16, 32]
[train]
crop = 64
steps = 30
valid_every_steps = 15
batch = 2
lr = 0.003
pick_threshold = true
[evaluate]
checkpoint = "last"
threshold = "train"
"#;

/// Probabilities of every train image (with its label and FOV) under `ckpt`, predicted as the
/// train stage does: whole image, no TTA.
fn train_probs(ckpt: &Path, ds: &preprocess::Dataset) -> Vec<(Vec<f32>, Vec<u8>, Vec<u8>)> {
    let (model, meta) = checkpoint::load(ckpt, &candle_core::Device::Cpu).unwrap();
    let pre = &meta.preprocess;
    let pred = Predictor {
        model: &model,
        normalize: pre.normalize,
        mode: mode_for(pre, 0, 0),
        tta: Tta::None,
    };
    ds.train
        .iter()
        .map(|p| {
            let s = p.original();
            let probs = pred.probs(&s.image).unwrap();
            let label = s.label.as_ref().unwrap().as_raw().clone();
            (probs, label, s.fov.as_raw().clone())
        })
        .collect()
}

/// Pooled F1 of the masks `q >= t` over the images, counted pixel by pixel.
fn f1_at(images: &[(Vec<f32>, Vec<u8>, Vec<u8>)], t: f32) -> f64 {
    let mut c = Confusion::default();
    for (probs, label, fov) in images {
        let mask: Vec<u8> = probs.iter().map(|&q| u8::from(q >= t)).collect();
        c.add(&mask, label, Some(fov));
    }
    c.dice()
}

#[test]
fn the_threshold_picked_on_the_train_images_is_stored_and_used_by_evaluate_and_infer() {
    let p = Project::new();
    let e = p.experiment("t", EXP);
    p.run_json(&[e.to_str().unwrap(), "--until", "evaluate"]);
    let train_dir = p.path().join("runs/t/train");
    let ds = preprocess::load(&p.path().join("runs/t/preprocess")).unwrap();

    // Every kept checkpoint carries the threshold that is F1-optimal on the train images:
    // no threshold on a grid of 1/1000 does better, and the F1 it records is the real one.
    for file in [
        "last.safetensors",
        "best_model_iou.safetensors",
        "best_model_loss.safetensors",
    ] {
        let ckpt = train_dir.join(file);
        let chosen = checkpoint::read_meta(&ckpt)
            .unwrap()
            .threshold
            .unwrap_or_else(|| panic!("{file} has no chosen threshold"));
        let images = train_probs(&ckpt, &ds);
        let f1 = f1_at(&images, chosen.value);
        assert!(
            (f1 - chosen.f1).abs() < 1e-12,
            "{file}: F1 {f1} ≠ recorded {}",
            chosen.f1
        );
        for k in (10..1000).step_by(10) {
            let t = k as f32 / 1000.0;
            assert!(
                f1_at(&images, t) <= f1 + 1e-12,
                "{file}: threshold {t} beats the chosen {} on the train images",
                chosen.value
            );
        }
        assert!(chosen.how.contains("train images"), "{}", chosen.how);
    }
    let chosen = checkpoint::read_meta(&train_dir.join("last.safetensors"))
        .unwrap()
        .threshold
        .unwrap();
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(train_dir.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(
        summary["threshold"].as_f64().map(|v| v as f32),
        Some(chosen.value)
    );

    // evaluate scored with it.
    let metrics: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(p.path().join("runs/t/evaluate/metrics.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        metrics["threshold"].as_f64().map(|v| v as f32),
        Some(chosen.value)
    );

    // infer uses it unless --threshold says otherwise: the mask is exactly `q >= chosen`.
    let ckpt = train_dir.join("last.safetensors");
    let img = &ds.test[0].original().image;
    let input = p.path().join("in.png");
    img.save(&input).unwrap();
    let (model, meta) = checkpoint::load(&ckpt, &candle_core::Device::Cpu).unwrap();
    let probs = whole_image_probs(&model, &meta, img);
    for (args, t) in [(vec![], chosen.value), (vec!["--threshold", "0.5"], 0.5)] {
        let (log, mask) = infer_one(&p, &ckpt, &input, &format!("out{t}"), &args);
        assert_eq!(
            log.contains("from the checkpoint"),
            t == chosen.value,
            "threshold {t}:\n{log}"
        );
        let expect: Vec<u8> = probs
            .iter()
            .map(|&q| if q >= t { 255 } else { 0 })
            .collect();
        assert_eq!(mask.as_raw(), &expect, "infer's mask at threshold {t}");
    }
}

#[test]
fn a_threshold_from_train_without_one_picked_is_refused() {
    let p = Project::new();
    let e = p.experiment("t", &EXP.replace("pick_threshold = true\n", ""));
    let out = p.run(&["run", e.to_str().unwrap(), "--until", "evaluate"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("evaluate.threshold") && err.contains("train.pick_threshold = true"),
        "{err}"
    );
    assert!(
        p.path().join("runs/t/train").exists(),
        "train should be kept"
    );
    assert!(
        !p.path().join("runs/t/evaluate").exists(),
        "nothing evaluated is published"
    );

    let e = p.experiment(
        "u",
        &EXP.replace("threshold = \"train\"", "threshold = \"trian\""),
    );
    let out = p.run(&["run", e.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("u.toml") && err.contains("trian"), "{err}");
}

/// `data.valid_count = 0`: every labelled image trains, nothing validates, only the last
/// checkpoint is kept, and evaluate and report still run; without `evaluate.checkpoint =
/// "last"` the file is refused, naming the key.
#[test]
fn training_on_every_labelled_image_runs_through_to_the_report() {
    let p = Project::new();
    let exp = EXP
        .replace("valid_count = 2", "valid_count = 0")
        .replace("count = 6", "count = 5");
    let e = p.experiment("t", &exp);
    let out = p.run(&["run", e.to_str().unwrap()]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("no valid images"), "{log}");
    let ds = preprocess::load(&p.path().join("runs/t/preprocess")).unwrap();
    assert_eq!((ds.train.len(), ds.valid.len()), (5, 0));
    let train = p.path().join("runs/t/train");
    assert!(train.join("last.safetensors").is_file());
    assert!(!train.join("best_model_iou.safetensors").exists());
    assert!(!train.join("best_model_loss.safetensors").exists());
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(train.join("summary.json")).unwrap())
            .unwrap();
    assert!(summary["best_valid_miou"].is_null(), "{summary}");
    assert!(summary["threshold"].as_f64().is_some(), "{summary}");
    let metrics: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(p.path().join("runs/t/evaluate/metrics.json")).unwrap(),
    )
    .unwrap();
    assert!(metrics["splits"].get("valid").is_none(), "{metrics}");
    assert_eq!(
        metrics["predicted"].as_array().unwrap().len(),
        2,
        "the test images"
    );
    assert!(p.path().join("runs/t/report").exists());

    let e = p.experiment("u", &exp.replace("checkpoint = \"last\"\n", ""));
    let out = p.run(&["run", e.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("u.toml") && err.contains("data.valid_count") && err.contains("\"last\""),
        "{err}"
    );
}

/// `data.zoom`: the train stage trains on the images resized by the factor and says so in its
/// checkpoints; evaluate scores at the images' own resolution; infer writes maps at the input's
/// own size, equal to the predictor's (zoom, predict, resize back).
#[test]
fn a_zoomed_recipe_trains_zoomed_and_answers_at_native_resolution() {
    let p = Project::new();
    let text = EXP
        .replace("name = \"t\"", "name = \"z\"")
        .replace("pick_threshold = true\n", "")
        .replace("threshold = \"train\"", "threshold = 0.5")
        .replace("valid_count = 2\n", "valid_count = 2\nzoom = 1.5\n");
    let e = p.experiment("z", &text);
    p.run_json(&[e.to_str().unwrap(), "--until", "evaluate"]);
    let ckpt = p.path().join("runs/z/train/last.safetensors");
    let (model, meta) = checkpoint::load(&ckpt, &candle_core::Device::Cpu).unwrap();
    assert_eq!(meta.preprocess.zoom, Some(1.5));

    // Scored at native resolution: every valid pixel once.
    let ds = preprocess::load(&p.path().join("runs/z/preprocess")).unwrap();
    let metrics: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(p.path().join("runs/z/evaluate/metrics.json")).unwrap(),
    )
    .unwrap();
    let native: usize = ds.valid.iter().map(|v| v.original().fov.len()).sum();
    assert_eq!(
        metrics["splits"]["valid"]["all"]["pixels"].as_u64(),
        Some(native as u64),
        "{metrics}"
    );

    let img = &ds.test[0].original().image;
    let input = p.path().join("in.png");
    img.save(&input).unwrap();
    let probs = whole_image_probs(&model, &meta, img);
    assert_eq!(probs.len(), (img.width() * img.height()) as usize);
    let (log, mask) = infer_one(&p, &ckpt, &input, "out", &[]);
    assert!(log.contains("zoomed by 1.5"), "{log}");
    assert_eq!(mask.dimensions(), img.dimensions());
    let expect: Vec<u8> = probs
        .iter()
        .map(|&q| if q >= 0.5 { 255 } else { 0 })
        .collect();
    assert_eq!(mask.as_raw(), &expect);
}

/// The checkpoint's probabilities for `img`: whole image, no TTA, as `driveline infer` with its
/// defaults computes them.
fn whole_image_probs(
    model: &driveline::model::SegModel,
    meta: &checkpoint::CheckpointMeta,
    img: &image::RgbImage,
) -> Vec<f32> {
    Predictor {
        model,
        normalize: meta.preprocess.normalize,
        mode: mode_for(&meta.preprocess, 0, 0),
        tta: Tta::None,
    }
    .probs(img)
    .unwrap()
}

/// `driveline infer` of one image on the CPU into `<project>/<out>`, with `extra` arguments:
/// its log (it must succeed) and the mask it wrote.
fn infer_one(
    p: &Project,
    ckpt: &Path,
    input: &Path,
    out: &str,
    extra: &[&str],
) -> (String, image::GrayImage) {
    let out_dir = p.path().join(out);
    let mut args = vec![
        "infer",
        "--device",
        "cpu",
        "--model",
        ckpt.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ];
    args.extend(extra);
    let run = p.run(&args);
    let log = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(run.status.success(), "{log}");
    let stem = input.file_stem().unwrap().to_str().unwrap();
    let mask = image::open(out_dir.join(format!("{stem}_mask.png")))
        .unwrap()
        .to_luma8();
    (log, mask)
}
