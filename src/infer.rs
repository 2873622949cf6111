//! `driveline infer`: segment fundus photographs with a trained checkpoint (the seed's
//! `inference_image.py`).
//!
//! Everything about the model comes from the checkpoint's metadata (architecture, backbone,
//! normalisation, how it was trained), so no experiment file is needed. Images are predicted the
//! way the checkpoint was trained: crop-trained models at native resolution (optionally in
//! tiles), the others resized to the checkpoint's `imgsz` and the probabilities resized back;
//! `--imgsz N` resizes to N whatever the checkpoint. For every image, three PNGs at the image's
//! original resolution go to `--out` (else [`default_out_dir`]): `<stem>_prob.png` (probability
//! × 255), `<stem>_mask.png` (0/255 at the threshold) and `<stem>_overlay.png` (predicted
//! vessels in green over the photograph). Each file is written to a temporary name and renamed,
//! so an interrupted run leaves no partial PNG behind.
//!
//! Images are processed one after the other: the model already uses every core per image.

use std::collections::BTreeMap;
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use image::{GrayImage, ImageFormat};

use crate::config::Tta;
use crate::model::{checkpoint, device};
use crate::predict::{mode_for, probs_to_image, Mode, Predictor};
use crate::progress::Progress;
use crate::stages::evaluate::overlay;

/// File extensions (lower case) read as images when the input is a folder.
pub const IMAGE_EXTENSIONS: [&str; 7] = ["tif", "tiff", "png", "jpg", "jpeg", "gif", "bmp"];

/// What `driveline infer` was asked to do.
#[derive(Debug, Clone)]
pub struct InferOptions {
    /// The checkpoint (a `.safetensors` written by the train stage).
    pub model: PathBuf,
    /// An image file, or a folder whose image files are all predicted.
    pub input: PathBuf,
    /// Output folder; `None`: [`default_out_dir`] of the checkpoint.
    pub out: Option<PathBuf>,
    /// Resize every image to this square side instead of the checkpoint's own mode.
    pub imgsz: Option<u32>,
    /// `cpu`, `cuda`, `cuda:N` or `auto`.
    pub device: String,
    /// Test-time augmentation.
    pub tta: Tta,
    /// Probability at or above which a pixel is a vessel in the mask; `None`: the threshold
    /// the checkpoint was trained to (`train.pick_threshold`), else 0.5.
    pub threshold: Option<f32>,
    /// Native-resolution prediction in tiles of this side (0: the whole image at once).
    pub tile: u32,
    /// Overlap between neighbouring tiles.
    pub overlap: u32,
    /// No progress output on stderr.
    pub quiet: bool,
}

/// What an inference run did.
#[derive(Debug, Clone, PartialEq)]
pub struct InferSummary {
    /// The output folder.
    pub out: PathBuf,
    /// The images predicted, in order.
    pub images: Vec<PathBuf>,
    /// Files of the input folder that were not images (skipped).
    pub skipped: Vec<PathBuf>,
    /// The prediction mode used.
    pub mode: Mode,
}

/// The default output folder, under the working directory: `runs/infer/<experiment>/<stem>/`
/// for a checkpoint in a pipeline's train folder (`runs/<experiment>/train/<stem>.safetensors`),
/// else `runs/infer/<stem>/` (`<stem>`: the checkpoint's file stem).
pub fn default_out_dir(model: &Path) -> PathBuf {
    let name = |p: Option<&Path>| {
        p.and_then(|p| p.file_name())
            .map(|s| s.to_string_lossy().into_owned())
            .filter(|s| !s.is_empty() && s != "." && s != "..")
    };
    let stem = model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "model".into());
    let base = Path::new("runs").join("infer");
    let parent = model.parent();
    match (name(parent), name(parent.and_then(Path::parent))) {
        (Some(dir), Some(exp)) if dir == "train" => base.join(exp).join(stem),
        _ => base.join(stem),
    }
}

/// Whether `path` has one of the [`IMAGE_EXTENSIONS`] (case-insensitive).
pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// The images to predict: `input` itself when it is a file, else the image files directly in
/// the folder, sorted by name. Returns (images, skipped non-image entries).
pub fn list_inputs(input: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    if !input.exists() {
        bail!("input not found: {}", input.display());
    }
    if input.is_file() {
        return Ok((vec![input.to_path_buf()], Vec::new()));
    }
    let mut images = Vec::new();
    let mut skipped = Vec::new();
    for e in std::fs::read_dir(input).with_context(|| format!("cannot list {}", input.display()))? {
        let p = e
            .with_context(|| format!("cannot list {}", input.display()))?
            .path();
        if p.is_file() && has_image_extension(&p) {
            images.push(p);
        } else {
            skipped.push(p);
        }
    }
    images.sort();
    skipped.sort();
    if images.is_empty() {
        bail!(
            "no images found in {} (looked for {})",
            input.display(),
            IMAGE_EXTENSIONS.join(", ")
        );
    }
    Ok((images, skipped))
}

/// Output name stem of an image (its file stem), checked to be unique across `images`.
fn stems(images: &[PathBuf]) -> Result<Vec<String>> {
    let mut seen: BTreeMap<String, &Path> = BTreeMap::new();
    let mut out = Vec::with_capacity(images.len());
    for p in images {
        let stem = p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .with_context(|| format!("{} has no file name", p.display()))?;
        if let Some(prev) = seen.insert(stem.clone(), p) {
            bail!(
                "{} and {} would write the same outputs ({stem}_*.png): predict them separately",
                prev.display(),
                p.display()
            );
        }
        out.push(stem);
    }
    Ok(out)
}

/// Reads an image file (any supported format, by content) as 8-bit RGB, naming it on error.
fn read_image(path: &Path) -> Result<image::RgbImage> {
    let img = image::ImageReader::open(path)
        .with_context(|| format!("cannot open {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read {}", path.display()))?
        .decode()
        .with_context(|| format!("not a readable image: {}", path.display()))?;
    Ok(img.to_rgb8())
}

/// An 8-bit grey or RGB image as PNG bytes.
fn png_bytes<P>(img: &image::ImageBuffer<P, Vec<u8>>) -> Result<Vec<u8>>
where
    P: image::PixelWithColorType<Subpixel = u8>,
{
    let mut bytes = Vec::new();
    img.write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)?;
    Ok(bytes)
}

/// Encodes `img` as PNG and writes it to `path` through a temporary file in the same folder,
/// renamed into place once complete.
fn write_png_atomic<P>(img: &image::ImageBuffer<P, Vec<u8>>, path: &Path) -> Result<()>
where
    P: image::PixelWithColorType<Subpixel = u8>,
{
    let bytes = png_bytes(img).with_context(|| format!("encoding {}", path.display()))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".driveline-")
        .suffix(".png.tmp")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(&bytes)
        .with_context(|| format!("writing {}", tmp.path().display()))?;
    tmp.persist(path)
        .with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// The mode `opts` asks for given the checkpoint's preprocessing.
fn mode(opts: &InferOptions, pre: &checkpoint::Preprocess) -> Mode {
    match opts.imgsz {
        Some(n) => Mode::Resize(n),
        None => mode_for(pre, opts.tile, opts.overlap),
    }
}

/// A mode in words, for the log.
fn describe(mode: Mode) -> String {
    match mode {
        Mode::Resize(n) => format!("resized to {n}×{n}"),
        Mode::Native {
            tile,
            overlap,
            zoom,
        } => {
            let mut s = "native resolution".to_string();
            if zoom != 1.0 {
                s += &format!(", zoomed by {zoom}");
            }
            if tile > 0 {
                s += &format!(", tiles {tile} overlapping by {overlap}");
            }
            s
        }
    }
}

/// Predicts every input image and writes its three PNGs; see the module documentation.
pub fn run(opts: &InferOptions) -> Result<InferSummary> {
    if let Some(t) = opts.threshold {
        ensure!(
            t.is_finite() && t > 0.0 && t < 1.0,
            "--threshold {t}: must be in (0, 1)"
        );
    }
    if let Some(n) = opts.imgsz {
        ensure!((8..=8192).contains(&n), "--imgsz {n}: must be in 8..=8192");
    }
    if opts.tile != 0 {
        ensure!(
            opts.tile >= 64 && opts.tile.is_multiple_of(8),
            "--tile {}: must be 0 (whole image) or a multiple of 8, at least 64",
            opts.tile
        );
        ensure!(
            opts.overlap * 2 < opts.tile,
            "--overlap {}: must be less than half of --tile ({})",
            opts.overlap,
            opts.tile
        );
    }
    if !opts.model.exists() {
        bail!("checkpoint not found: {}", opts.model.display());
    }
    if !opts.model.is_file() {
        bail!("checkpoint {} is not a file", opts.model.display());
    }
    let (images, skipped) = list_inputs(&opts.input)?;
    let names = stems(&images)?;
    let progress = Progress::new("infer", opts.quiet);
    for s in &skipped {
        progress.log(&format!("skipping {} (not an image file)", s.display()));
    }

    if opts.input.is_file() {
        // A file named explicitly must be an image: fail before loading the model or creating
        // the output folder.
        read_image(&opts.input)?;
    }

    let device = device::select(&opts.device)?;
    let (model, meta) = checkpoint::load(&opts.model, &device)?;
    let mode = mode(opts, &meta.preprocess);
    let threshold = match (opts.threshold, &meta.threshold) {
        (Some(t), _) => t,
        (None, Some(chosen)) => {
            progress.log(&format!(
                "threshold {} from the checkpoint ({})",
                chosen.value, chosen.how
            ));
            chosen.value
        }
        (None, None) => 0.5,
    };
    if opts.tile != 0 && matches!(mode, Mode::Resize(_)) {
        progress.log("--tile ignored: this checkpoint predicts resized images");
    }
    let predictor = Predictor {
        model: &model,
        normalize: meta.preprocess.normalize,
        mode,
        tta: opts.tta,
    };
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| default_out_dir(&opts.model));
    std::fs::create_dir_all(&out)
        .with_context(|| format!("cannot create output folder {}", out.display()))?;
    progress.log(&format!(
        "{} image(s), {}{}, {} → {}",
        images.len(),
        describe(mode),
        opts.tta.label(),
        device::name(&device),
        out.display()
    ));

    let mut bar = progress.bar(images.len() as u64, "predict");
    for (path, stem) in images.iter().zip(&names) {
        predict_one(&predictor, path, stem, threshold, &out)
            .with_context(|| format!("predicting {}", path.display()))?;
        bar.inc(1);
    }
    bar.finish();
    Ok(InferSummary {
        out,
        images,
        skipped,
        mode,
    })
}

/// Predicts one image and writes `<stem>_{prob,mask,overlay}.png` into `out`.
fn predict_one(
    predictor: &Predictor,
    path: &Path,
    stem: &str,
    threshold: f32,
    out: &Path,
) -> Result<()> {
    let img = read_image(path)?;
    let (w, h) = img.dimensions();
    let probs = predictor.probs(&img)?;
    let mask: Vec<u8> = probs.iter().map(|&q| u8::from(q >= threshold)).collect();
    let mask_img = GrayImage::from_raw(w, h, mask.iter().map(|&m| m * 255).collect())
        .context("mask has the wrong size")?;
    write_png_atomic(
        &probs_to_image(&probs, w, h)?,
        &out.join(format!("{stem}_prob.png")),
    )?;
    write_png_atomic(&mask_img, &out.join(format!("{stem}_mask.png")))?;
    write_png_atomic(
        &overlay(&img, &mask, None),
        &out.join(format!("{stem}_overlay.png")),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_listing_sorts_images_and_skips_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for f in ["b.PNG", "a.tif", "notes.txt", "c.jpeg"] {
            std::fs::write(d.join(f), b"x").unwrap();
        }
        std::fs::create_dir(d.join("sub.png")).unwrap();
        let (images, skipped) = list_inputs(d).unwrap();
        let names: Vec<_> = images
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["a.tif", "b.PNG", "c.jpeg"]);
        assert_eq!(skipped.len(), 2, "{skipped:?}");
    }

    #[test]
    fn empty_folder_and_missing_input_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("readme.md"), b"x").unwrap();
        let e = list_inputs(dir.path()).unwrap_err().to_string();
        assert!(e.contains("no images found"), "{e}");
        let e = list_inputs(&dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("input not found"), "{e}");
    }

    #[test]
    fn clashing_stems_are_refused() {
        let e = stems(&[PathBuf::from("x/a.png"), PathBuf::from("x/a.tif")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("a.png") && e.contains("a.tif"), "{e}");
        assert_eq!(stems(&[PathBuf::from("01_test.tif")]).unwrap(), ["01_test"]);
    }

    #[test]
    fn default_out_dir_names_the_experiment_of_a_run_checkpoint() {
        assert_eq!(
            default_out_dir(Path::new("runs/quick/train/best_model_iou.safetensors")),
            Path::new("runs/infer/quick/best_model_iou")
        );
        assert_eq!(
            default_out_dir(Path::new("/models/r50.safetensors")),
            Path::new("runs/infer/r50")
        );
        assert_eq!(
            default_out_dir(Path::new("r50.safetensors")),
            Path::new("runs/infer/r50")
        );
    }

    #[test]
    fn atomic_png_leaves_only_the_final_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.png");
        let img = GrayImage::from_pixel(3, 2, image::Luma([7]));
        write_png_atomic(&img, &p).unwrap();
        let back = image::open(&p).unwrap().to_luma8();
        assert_eq!(back, img);
        let entries = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(entries, 1);
    }
}
