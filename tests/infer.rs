//! `driveline infer` through the real binary: a tiny DeepLabV3-ResNet18 is trained once (in a
//! scratch project under the target folder, shared by the tests of this file), then images are
//! segmented with its best checkpoint.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use driveline::config::Tta;
use driveline::model::checkpoint;
use driveline::predict::{probs_to_image, Mode, Predictor};
use image::{GrayImage, Rgb, RgbImage};

/// The tiny experiment: synthetic 64×64 images, ResNet-18, one epoch.
const TINY: &str = r#"name = "tiny"
pipeline = "deeplabv3"
[data]
layout = "synthetic"
valid_count = 2
[data.synthetic]
count = 4
test_count = 2
width = 64
height = 64
[model]
backbone = "resnet18"
[train]
imgsz = 64
epochs = 1
batch = 2
"#;

/// A tiny crop-trained U-Net (native-resolution prediction): 30 steps on 64-px crops, at a
/// learning rate high enough that its probabilities spread (about 40..181 of 255 on
/// `fake_fundus`), so that 8-bit outputs can tell tiled from untiled prediction.
const TINY_UNET: &str = r#"name = "tiny"
pipeline = "native"
[data]
layout = "synthetic"
valid_count = 2
[data.synthetic]
count = 4
test_count = 2
width = 96
height = 96
[model]
arch = "unet"
widths = [8, 16, 32]
[train]
crop = 64
steps = 30
valid_every_steps = 30
batch = 2
lr = 0.003
"#;

/// Trains `experiment` (through `driveline run --until train`, pipeline `pipelines/<pipeline>`)
/// in `<target>/tmp/<folder>` (replaced on each run) and keeps only its best checkpoint (the
/// cache and the other checkpoints weigh ~250 MB). Returns (folder, checkpoint).
fn train(folder: &str, pipeline: &str, experiment: &str) -> (PathBuf, PathBuf) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(folder);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::create_dir_all(dir.join("pipelines")).unwrap();
    std::fs::create_dir_all(dir.join("experiments")).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(
        root.join("pipelines").join(pipeline),
        dir.join("pipelines").join(pipeline),
    )
    .unwrap();
    std::fs::write(dir.join("experiments/tiny.toml"), experiment).unwrap();
    let out = driveline(&dir, &["run", "--until", "train", "experiments/tiny.toml"]);
    assert!(out.status.success(), "training failed:\n{}", stderr(&out));
    let trained = dir.join("runs/tiny/train/best_model_iou.safetensors");
    assert!(trained.is_file(), "no checkpoint at {}", trained.display());
    let ckpt = dir.join("best_model_iou.safetensors");
    std::fs::copy(&trained, &ckpt).unwrap();
    std::fs::remove_dir_all(dir.join("runs")).unwrap();
    std::fs::remove_dir_all(dir.join(".driveline")).unwrap();
    (dir, ckpt)
}

/// The tiny DeepLabV3 (trained once per test binary).
fn trained() -> &'static (PathBuf, PathBuf) {
    static TRAINED: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    TRAINED.get_or_init(|| train("infer-test", "deeplabv3.toml", TINY))
}

fn driveline(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_driveline"))
        .current_dir(cwd)
        .args(args)
        .env_remove("DRIVELINE_CACHE_DIR")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `driveline infer --model <tiny checkpoint> ARGS` from the scratch project.
fn infer(args: &[&str]) -> Output {
    let (dir, ckpt) = trained();
    let mut a = vec!["infer", "--model", ckpt.to_str().unwrap()];
    a.extend_from_slice(args);
    driveline(dir, &a)
}

/// A fundus-like test image: dark background, a bright disc, a few darker lines.
fn fake_fundus(w: u32, h: u32, seed: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let (cx, cy) = (w as f32 / 2.0, h as f32 / 2.0);
        let r = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt();
        if r > cx.min(cy) {
            return Rgb([0, 0, 0]);
        }
        let line = (x + 2 * y + seed * 17) % 41 < 3;
        let v = if line {
            90
        } else {
            170 + ((x * 7 + y * 3 + seed) % 40) as u8
        };
        Rgb([v, v / 2, v / 5])
    })
}

/// The DRIVE test images (20 TIFFs, 565×584), or 20 generated PNGs of that size in `scratch`.
fn test_images(scratch: &Path) -> PathBuf {
    if let Some(drive) = common::drive_root() {
        return drive.join("test/images");
    }
    let dir = scratch.join("generated");
    std::fs::create_dir_all(&dir).unwrap();
    for i in 1..=20 {
        fake_fundus(565, 584, i)
            .save(dir.join(format!("{i:02}_test.png")))
            .unwrap();
    }
    dir
}

fn stem(p: &Path) -> String {
    p.file_stem().unwrap().to_string_lossy().into_owned()
}

fn sorted_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn infer_writes_three_pngs_per_image_at_original_resolution() {
    let scratch = tempfile::tempdir().unwrap();
    let input = test_images(scratch.path());
    let out = scratch.path().join("out");
    let o = infer(&[
        "--input",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "infer failed:\n{}", stderr(&o));
    assert!(
        stderr(&o).contains("resized to 64×64"),
        "the checkpoint's imgsz is used:\n{}",
        stderr(&o)
    );

    let mut inputs: Vec<PathBuf> = std::fs::read_dir(&input)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    inputs.sort();
    assert_eq!(inputs.len(), 20);
    let mut expected: Vec<String> = inputs
        .iter()
        .flat_map(|p| {
            let s = stem(p);
            ["mask", "overlay", "prob"].map(|k| format!("{s}_{k}.png"))
        })
        .collect();
    expected.sort();
    assert_eq!(
        sorted_names(&out),
        expected,
        "exactly 60 outputs, no temp files"
    );

    // What the library predicts with the same checkpoint, for the images checked in full.
    let (_, ckpt) = trained();
    let (model, meta) = checkpoint::load(ckpt, &candle_core::Device::Cpu).unwrap();
    let predictor = Predictor {
        model: &model,
        normalize: meta.preprocess.normalize,
        mode: Mode::Resize(meta.preprocess.imgsz),
        tta: Tta::None,
    };

    let mut vessels = 0u64;
    for (i, p) in inputs.iter().enumerate() {
        let s = stem(p);
        let mask = image::open(out.join(format!("{s}_mask.png")))
            .unwrap()
            .to_luma8();
        let prob = image::open(out.join(format!("{s}_prob.png")))
            .unwrap()
            .to_luma8();
        let over = image::open(out.join(format!("{s}_overlay.png")))
            .unwrap()
            .to_rgb8();
        assert_eq!(mask.dimensions(), (565, 584), "{s} mask");
        assert_eq!(prob.dimensions(), (565, 584), "{s} prob");
        assert_eq!(over.dimensions(), (565, 584), "{s} overlay");
        // The mask is the probability map at 0.5: p ≥ 0.5 ⇔ round(255 p) ≥ 128.
        for (m, q) in mask.iter().zip(prob.iter()) {
            assert!(*m == 0 || *m == 255, "{s}: mask value {m}");
            assert_eq!(*m == 255, *q >= 128, "{s}: mask and probability disagree");
        }
        vessels += mask.iter().filter(|&&m| m == 255).count() as u64;
        if i < 2 {
            let orig = image::open(p).unwrap().to_rgb8();
            // The probability map is the model's prediction, pixel for pixel (so the mask is
            // too): not a constant, not a blank.
            let expected = probs_to_image(&predictor.probs(&orig).unwrap(), 565, 584).unwrap();
            let worst = expected
                .iter()
                .zip(prob.iter())
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap();
            assert!(
                worst <= 1,
                "{s}: prob.png differs from the model's prediction by {worst}"
            );
            let (lo, hi) = (prob.iter().min().unwrap(), prob.iter().max().unwrap());
            assert!(hi > lo, "{s}: the probability map is constant ({lo})");
            // The overlay is the photograph, tinted green where the mask is set.
            for ((o, m), px) in orig.pixels().zip(mask.iter()).zip(over.pixels()) {
                if *m == 0 {
                    assert_eq!(o, px, "{s}: overlay changed an unmasked pixel");
                } else {
                    assert!(
                        px[1] >= 172 && px[1] >= px[0],
                        "{s}: masked pixel not green"
                    );
                }
            }
        }
    }
    let total = 20 * 565 * 584;
    assert!(
        vessels < total,
        "every pixel predicted as vessel: the model output is degenerate"
    );
    assert!(
        vessels > 0,
        "no pixel predicted as vessel: the model output is degenerate"
    );
}

#[test]
fn infer_folder_skips_non_images_and_defaults_out_dir() {
    let (dir, _) = trained();
    let input = tempfile::tempdir().unwrap();
    fake_fundus(90, 70, 1)
        .save(input.path().join("a.png"))
        .unwrap();
    let grey = GrayImage::from_fn(50, 40, |x, y| image::Luma([((x * y) % 256) as u8]));
    grey.save(input.path().join("b.bmp")).unwrap();
    std::fs::write(input.path().join("notes.txt"), "not an image").unwrap();
    let o = infer(&["--input", input.path().to_str().unwrap(), "--imgsz", "96"]);
    assert!(o.status.success(), "infer failed:\n{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("skipping") && err.contains("notes.txt"),
        "{err}"
    );
    assert!(err.contains("resized to 96×96"), "--imgsz is used:\n{err}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("2 image(s)"), "{stdout}");

    let out = dir.join("runs/infer/best_model_iou");
    let names = sorted_names(&out);
    for f in [
        "a_mask.png",
        "a_overlay.png",
        "a_prob.png",
        "b_mask.png",
        "b_overlay.png",
        "b_prob.png",
    ] {
        assert!(names.contains(&f.to_string()), "{f} missing in {names:?}");
    }
    assert!(
        !names.iter().any(|n| n.starts_with("notes")),
        "the text file was predicted: {names:?}"
    );
    let a = image::open(out.join("a_overlay.png")).unwrap();
    assert_eq!((a.width(), a.height()), (90, 70));
    let b = image::open(out.join("b_mask.png")).unwrap();
    assert_eq!((b.width(), b.height()), (50, 40));
}

#[test]
fn infer_rejects_a_non_image_file_by_name() {
    let scratch = tempfile::tempdir().unwrap();
    let bogus = scratch.path().join("scan_07.tif");
    std::fs::write(&bogus, "this is text, not a TIFF").unwrap();
    let out = scratch.path().join("out");
    let o = infer(&[
        "--input",
        bogus.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success(), "a text file was accepted as an image");
    let err = stderr(&o);
    assert!(err.contains("scan_07.tif"), "the file is not named:\n{err}");
    let left = if out.exists() {
        sorted_names(&out)
    } else {
        vec![]
    };
    assert!(left.is_empty(), "outputs left behind: {left:?}");
}

#[test]
fn infer_rejects_files_that_are_not_driveline_checkpoints() {
    let scratch = tempfile::tempdir().unwrap();
    let img = scratch.path().join("x.png");
    fake_fundus(40, 40, 3).save(&img).unwrap();
    // A text file, and a valid safetensors file without driveline metadata.
    let text = scratch.path().join("model.safetensors");
    std::fs::write(&text, "definitely not a model").unwrap();
    let plain = scratch.path().join("plain.safetensors");
    let t = candle_core::Tensor::zeros((2, 2), candle_core::DType::F32, &candle_core::Device::Cpu)
        .unwrap();
    candle_core::safetensors::save(&[("w".to_string(), t)].into_iter().collect(), &plain).unwrap();
    for bad in [&text, &plain] {
        let o = driveline(
            scratch.path(),
            &[
                "infer",
                "--model",
                bad.to_str().unwrap(),
                "--input",
                img.to_str().unwrap(),
            ],
        );
        assert!(!o.status.success(), "{} accepted", bad.display());
        let err = stderr(&o);
        assert!(
            err.contains("not a driveline checkpoint") && err.contains(bad.to_str().unwrap()),
            "{err}"
        );
    }
    let o = driveline(
        scratch.path(),
        &[
            "infer",
            "--model",
            "missing.safetensors",
            "--input",
            img.to_str().unwrap(),
        ],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("checkpoint not found: missing.safetensors"),
        "{}",
        stderr(&o)
    );
    assert!(
        !scratch.path().join("runs").exists(),
        "nothing is written when the checkpoint is bad"
    );
}

#[test]
fn infer_reports_missing_input_and_empty_folders() {
    let scratch = tempfile::tempdir().unwrap();
    let o = infer(&["--input", scratch.path().join("nope").to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("input not found"), "{}", stderr(&o));
    std::fs::write(scratch.path().join("readme.md"), "x").unwrap();
    let o = infer(&["--input", scratch.path().to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no images found"), "{}", stderr(&o));
}

#[test]
fn infer_native_checkpoint_in_tiles_with_tta() {
    let (dir, ckpt) = train("infer-test-unet", "native.toml", TINY_UNET);
    let input = tempfile::tempdir().unwrap();
    // Wider than a tile and lower than one: tiles of 64×50 (or 128×50), padded to the
    // U-Net's stride.
    let wide = input.path().join("wide.png");
    fake_fundus(150, 50, 2).save(&wide).unwrap();
    // `driveline infer --tta ARGS` into `dir/<name>`; returns the probability map.
    let run = |name: &str, args: &[&str], log: &str| {
        let out = dir.join(name);
        let mut a = vec![
            "infer",
            "--model",
            ckpt.to_str().unwrap(),
            "--input",
            wide.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--tta",
        ];
        a.extend_from_slice(args);
        let o = driveline(&dir, &a);
        assert!(o.status.success(), "infer {args:?} failed:\n{}", stderr(&o));
        assert!(stderr(&o).contains(log), "{}", stderr(&o));
        for k in ["prob", "mask", "overlay"] {
            let img = image::open(out.join(format!("wide_{k}.png"))).unwrap();
            assert_eq!((img.width(), img.height()), (150, 50), "{name} {k}");
        }
        image::open(out.join("wide_prob.png")).unwrap().to_luma8()
    };
    let whole = run("whole", &[], "native resolution + flip TTA");
    let diff = |p: &GrayImage| -> (u8, usize) {
        let d: Vec<u8> = p
            .iter()
            .zip(whole.iter())
            .map(|(a, b)| a.abs_diff(*b))
            .collect();
        (
            d.iter().copied().max().unwrap(),
            d.iter().filter(|&&v| v > 1).count(),
        )
    };
    // Two tiles whose overlap (56: 28 px kept on each side of the cut) covers the U-Net's
    // context: the same probabilities as the whole image, TTA included.
    let tiled = run(
        "tiled",
        &["--tile", "128", "--overlap", "56"],
        "native resolution, tiles 128 overlapping by 56 + flip TTA",
    );
    let (worst, _) = diff(&tiled);
    assert!(
        worst <= 1,
        "tiled + TTA differs from the whole image by {worst}/255"
    );
    // Three tiles without overlap: no context beyond the cuts, so the seams show (tiling did
    // happen).
    let seamed = run(
        "seamed",
        &["--tile", "64", "--overlap", "0"],
        "native resolution, tiles 64 overlapping by 0 + flip TTA",
    );
    let (worst, changed) = diff(&seamed);
    assert!(
        changed > 100,
        "64-px tiles changed only {changed} pixels of the whole-image prediction (worst {worst})"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
