//! `preprocess` / `preprocess_native`: decode every image of the split once (TIFF, GIF, PNG,
//! JPEG; in parallel), check it, and store compact 8-bit arrays so that training and
//! evaluation never decode files again.
//!
//! `preprocess` resizes to `train.imgsz` (bilinear image, nearest annotation and FOV) and
//! also keeps the original-resolution annotation, FOV and image for evaluation at DRIVE's
//! native size; `preprocess_native` keeps images at their original size (crop training).
//! Output: `data.safetensors` (u8 tensors `<split>/<id>/<image|label|fov>[/orig]`, metadata
//! listing the ids per split).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use image::{GrayImage, RgbImage};
use rayon::prelude::*;
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

use super::split::{Entry, SplitFile};
use super::{DataInputs, Stage, StageCtx};
use crate::config::{Experiment, Layout};
use crate::data::{self, Sample, SampleFiles};

pub const FILE: &str = "data.safetensors";

/// Resize to `train.imgsz`.
pub struct Preprocess;
/// Keep the native resolution.
pub struct PreprocessNative;

impl Stage for Preprocess {
    fn version(&self) -> u32 {
        1
    }
    fn params(&self) -> &'static [&'static str] {
        &["data.layout", "data.synthetic", "train.imgsz"]
    }
    fn data(&self) -> DataInputs {
        DataInputs::Content
    }
    fn role(&self) -> &'static str {
        "preprocess"
    }
    fn requires(&self) -> &'static [&'static str] {
        &["split"]
    }
    fn run(&self, ctx: &StageCtx) -> Result<()> {
        let size = ctx.exp.train.imgsz;
        run(ctx, Some(size))
    }
}

impl Stage for PreprocessNative {
    fn version(&self) -> u32 {
        1
    }
    fn params(&self) -> &'static [&'static str] {
        &["data.layout", "data.synthetic"]
    }
    fn data(&self) -> DataInputs {
        DataInputs::Content
    }
    fn role(&self) -> &'static str {
        "preprocess"
    }
    fn requires(&self) -> &'static [&'static str] {
        &["split"]
    }
    fn run(&self, ctx: &StageCtx) -> Result<()> {
        run(ctx, None)
    }
}

/// One image as prepared: at the working size, plus the original when resized.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub id: String,
    /// At the size the model sees (`train.imgsz`, or native).
    pub work: Sample,
    /// At the original resolution, when `work` was resized.
    pub orig: Option<Sample>,
}

impl Prepared {
    /// The sample at its original resolution.
    pub fn original(&self) -> &Sample {
        self.orig.as_ref().unwrap_or(&self.work)
    }
}

/// The whole preprocessed dataset.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Side the images were resized to, or None (native resolution).
    pub size: Option<u32>,
    pub train: Vec<Prepared>,
    pub valid: Vec<Prepared>,
    pub test: Vec<Prepared>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    size: Option<u32>,
    splits: BTreeMap<String, Vec<(String, bool)>>,
}

fn run(ctx: &StageCtx, size: Option<u32>) -> Result<()> {
    let split = SplitFile::load(ctx.input("split")?)?;
    let exp = ctx.exp;
    let mut all: Vec<(&str, &Entry)> = Vec::new();
    for (name, entries) in split.splits() {
        all.extend(entries.iter().map(|e| (name, e)));
    }
    let bar = std::sync::Mutex::new(ctx.progress.bar(all.len() as u64, "decode"));
    let prepared: Vec<(&str, Prepared)> = all
        .par_iter()
        .map(|(name, e)| {
            let s = load_entry(exp, e)?;
            let p = match size {
                Some(sz) => Prepared {
                    id: s.id.clone(),
                    work: data::resize_sample(&s, sz, sz),
                    orig: Some(s),
                },
                None => Prepared {
                    id: s.id.clone(),
                    work: s,
                    orig: None,
                },
            };
            if let Ok(mut b) = bar.lock() {
                b.inc(1);
            }
            Ok((*name, p))
        })
        .collect::<Result<_>>()?;
    if let Ok(b) = bar.into_inner() {
        b.finish();
    }
    for (name, p) in &prepared {
        if *name != "test" && p.work.label.is_none() {
            bail!("{name} image {} has no annotation", p.id);
        }
    }
    write(ctx.out, size, &prepared)
}

fn load_entry(exp: &Experiment, e: &Entry) -> Result<Sample> {
    if exp.data.layout == Layout::Synthetic {
        let i = e
            .index
            .ok_or_else(|| anyhow!("synthetic entry {} has no index", e.id))?;
        return Ok(data::synthetic(&exp.data.synthetic, i));
    }
    let root = Path::new(&exp.data.root);
    let image = e
        .image
        .as_ref()
        .ok_or_else(|| anyhow!("split entry {} has no image", e.id))?;
    let files = SampleFiles {
        id: e.id.clone(),
        image: root.join(image),
        label: e.label.as_ref().map(|l| root.join(l)),
        fov: e.fov.as_ref().map(|f| root.join(f)),
    };
    data::decode(&files)
}

fn write(out: &Path, size: Option<u32>, prepared: &[(&str, Prepared)]) -> Result<()> {
    let mut meta = Meta {
        size,
        splits: BTreeMap::new(),
    };
    let mut tensors: Vec<(String, Vec<usize>, &[u8])> = Vec::new();
    for (split, p) in prepared {
        meta.splits
            .entry(split.to_string())
            .or_default()
            .push((p.id.clone(), p.work.label.is_some()));
        let versions = std::iter::once(("", &p.work)).chain(p.orig.iter().map(|o| ("/orig", o)));
        for (suffix, s) in versions {
            let base = format!("{split}/{}/", p.id);
            let (w, h) = s.image.dimensions();
            let (w, h) = (w as usize, h as usize);
            tensors.push((
                format!("{base}image{suffix}"),
                vec![h, w, 3],
                s.image.as_raw(),
            ));
            if let Some(l) = &s.label {
                tensors.push((format!("{base}label{suffix}"), vec![h, w], l.as_raw()));
            }
            tensors.push((format!("{base}fov{suffix}"), vec![h, w], s.fov.as_raw()));
        }
    }
    let views = tensors
        .iter()
        .map(|(n, shape, d)| Ok((n.clone(), TensorView::new(Dtype::U8, shape.clone(), d)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let mut md = std::collections::HashMap::new();
    md.insert("driveline".to_string(), serde_json::to_string(&meta)?);
    let bytes = safetensors::serialize(views, Some(md))?;
    fs::write(out.join(FILE), bytes)
        .with_context(|| format!("cannot write {}", out.join(FILE).display()))
}

/// Load a `preprocess` output directory.
pub fn load(dir: &Path) -> Result<Dataset> {
    let path = dir.join(FILE);
    let bytes = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let (_, st_meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("malformed {}", path.display()))?;
    let meta: Meta = st_meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("driveline"))
        .ok_or_else(|| anyhow!("{} has no driveline metadata", path.display()))
        .and_then(|s| serde_json::from_str(s).map_err(Into::into))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("malformed {}", path.display()))?;
    let get = |name: &str| -> Result<(Vec<usize>, Vec<u8>)> {
        let t = st
            .tensor(name)
            .with_context(|| format!("{}: missing tensor {name}", path.display()))?;
        Ok((t.shape().to_vec(), t.data().to_vec()))
    };
    let sample = |base: &str, id: &str, suffix: &str, has_label: bool| -> Result<Sample> {
        let (shape, img) = get(&format!("{base}image{suffix}"))?;
        let (h, w) = (shape[0] as u32, shape[1] as u32);
        let image = RgbImage::from_raw(w, h, img).context("bad image tensor")?;
        let label = if has_label {
            let (_, l) = get(&format!("{base}label{suffix}"))?;
            Some(GrayImage::from_raw(w, h, l).context("bad label tensor")?)
        } else {
            None
        };
        let (_, f) = get(&format!("{base}fov{suffix}"))?;
        let fov = GrayImage::from_raw(w, h, f).context("bad fov tensor")?;
        Ok(Sample {
            id: id.to_string(),
            image,
            label,
            fov,
        })
    };
    let mut ds = Dataset {
        size: meta.size,
        train: Vec::new(),
        valid: Vec::new(),
        test: Vec::new(),
    };
    for (split, ids) in &meta.splits {
        let list = match split.as_str() {
            "train" => &mut ds.train,
            "valid" => &mut ds.valid,
            "test" => &mut ds.test,
            other => bail!("{}: unknown split {other}", path.display()),
        };
        for (id, has_label) in ids {
            let base = format!("{split}/{id}/");
            let work = sample(&base, id, "", *has_label)?;
            let orig = if meta.size.is_some() {
                Some(sample(&base, id, "/orig", *has_label)?)
            } else {
                None
            };
            list.push(Prepared {
                id: id.clone(),
                work,
                orig,
            });
        }
    }
    Ok(ds)
}
