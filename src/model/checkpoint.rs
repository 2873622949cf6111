//! Checkpoints: safetensors files with torchvision's `state_dict` keys (loadable by
//! `model.load_state_dict(safetensors.torch.load_file(path), strict=True)`), `num_batches_tracked`
//! as int64, and everything inference needs as JSON under the `driveline` metadata key.
//!
//! [`load_pretrained`] starts a model from torchvision weights (`.safetensors` or PyTorch `.pth`):
//! a full DeepLabV3 (COCO) or an ImageNet ResNet.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::path::Path;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::SegModel;
use crate::config::schema::{ModelConfig, Normalize};

/// Version of the checkpoint layout written by [`save`]; [`load`] refuses newer ones.
pub const FORMAT_VERSION: u32 = 1;
/// safetensors `__metadata__` key holding the [`CheckpointMeta`] JSON.
pub const METADATA_KEY: &str = "driveline";

/// How images were prepared for the model: inference must do the same.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Preprocess {
    /// Square side images were resized to (`train.imgsz`); unused when `crop > 0`.
    pub imgsz: u32,
    pub normalize: Normalize,
    /// Side of the native-resolution random crops trained on (0: whole resized images).
    pub crop: u32,
    /// `data.zoom`: native images were resized by this factor before the model saw them
    /// (absent: 1, as in older checkpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zoom: Option<f32>,
}

/// A vessel threshold chosen from data after training (`train.pick_threshold`), which
/// `evaluate.threshold = "train"` and `driveline infer` use.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChosenThreshold {
    /// Probability at or above which a pixel is vessel.
    pub value: f32,
    /// The pooled F1 at that threshold on the images it was chosen on.
    pub f1: f64,
    /// How it was chosen, e.g. "F1-optimal on the 16 train images (inside the FOV)".
    pub how: String,
}

/// What a checkpoint says about itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointMeta {
    /// [`FORMAT_VERSION`] at the time of writing.
    pub format: u32,
    /// Architecture, backbone, classes, U-Net widths and upsampling: enough to rebuild the model.
    pub model: ModelConfig,
    pub preprocess: Preprocess,
    /// Free-form facts from the caller (epoch, metric, ...); `null` when none.
    #[serde(default)]
    pub extra: serde_json::Value,
    /// The threshold chosen from data, if any (absent from older checkpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<ChosenThreshold>,
}

/// Writes `model` to `path` atomically (temporary file in the same directory, then rename).
pub fn save(
    model: &SegModel,
    preprocess: &Preprocess,
    extra: serde_json::Value,
    threshold: Option<&ChosenThreshold>,
    path: &Path,
) -> anyhow::Result<()> {
    let meta = CheckpointMeta {
        format: FORMAT_VERSION,
        model: model.config().clone(),
        preprocess: preprocess.clone(),
        extra,
        threshold: threshold.cloned(),
    };
    let mut info = HashMap::new();
    info.insert(
        METADATA_KEY.to_string(),
        serde_json::to_string(&meta).context("serialising checkpoint metadata")?,
    );
    info.insert("format".to_string(), "pt".to_string());
    let tensors = model
        .state_dict()
        .and_then(|sd| {
            sd.into_iter()
                .map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?.contiguous()?)))
                .collect::<candle_core::Result<Vec<_>>>()
        })
        .context("collecting the model's tensors")?;
    let bytes = safetensors::serialize(tensors, Some(info))
        .with_context(|| format!("serialising checkpoint {}", path.display()))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(&bytes)
        .and_then(|_| tmp.as_file().sync_all())
        .with_context(|| format!("writing {}", tmp.path().display()))?;
    tmp.persist(path)
        .with_context(|| format!("renaming the checkpoint to {}", path.display()))?;
    Ok(())
}

fn not_ours(path: &Path, why: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("not a driveline checkpoint: {} ({why})", path.display())
}

/// Parses the driveline metadata out of a safetensors JSON header (the bytes after the 8-byte
/// length prefix).
fn meta_from_header(path: &Path, header: &[u8]) -> anyhow::Result<CheckpointMeta> {
    #[derive(Deserialize)]
    struct Header {
        #[serde(rename = "__metadata__", default)]
        metadata: Option<HashMap<String, String>>,
    }
    let header: Header = serde_json::from_slice(header)
        .map_err(|e| not_ours(path, format!("unreadable safetensors header: {e}")))?;
    let json = header
        .metadata
        .and_then(|mut m| m.remove(METADATA_KEY))
        .ok_or_else(|| not_ours(path, "no driveline metadata"))?;
    let meta: CheckpointMeta = serde_json::from_str(&json)
        .map_err(|e| not_ours(path, format!("bad driveline metadata: {e}")))?;
    if meta.format > FORMAT_VERSION {
        bail!(
            "checkpoint {} has format {}, this driveline reads up to {FORMAT_VERSION}",
            path.display(),
            meta.format
        );
    }
    Ok(meta)
}

/// Reads only the metadata of a checkpoint (its header), without the tensors.
pub fn read_meta(path: &Path) -> anyhow::Result<CheckpointMeta> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| not_ours(path, "too short for a safetensors file"))?;
    let len = u64::from_le_bytes(len);
    let file_len = f
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if len > file_len.saturating_sub(8) || len > 100_000_000 {
        return Err(not_ours(path, "not a safetensors file"));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header)
        .with_context(|| format!("reading {}", path.display()))?;
    meta_from_header(path, &header)
}

/// Loads a checkpoint written by [`save`]: rebuilds the model from its metadata on `device`
/// and loads every tensor (strictly).
pub fn load(path: &Path, device: &Device) -> anyhow::Result<(SegModel, CheckpointMeta)> {
    let meta = read_meta(path)?;
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| not_ours(path, format!("not a safetensors file: {e}")))?;
    let model = SegModel::new(&meta.model, device, 0)
        .with_context(|| format!("rebuilding the model of {}", path.display()))?;
    model
        .load_state_dict(&tensors)
        .with_context(|| format!("loading the weights of {}", path.display()))?;
    Ok((model, meta))
}

/// Reads a state dict from `.safetensors` or a PyTorch zip `.pth`/`.pt` (by content).
fn read_state_dict(path: &Path) -> anyhow::Result<HashMap<String, Tensor>> {
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let read = f.read_exact(&mut magic).is_ok();
    // Legacy files are a pickle (protocol 2) starting with a LONG1 magic number.
    if read && magic[..3] == [0x80, 0x02, 0x8a] {
        bail!(
            "{} is a legacy (pre-1.6, non-zip) PyTorch file, which cannot be read: re-save it with \
             `torch.save(torch.load(p), q)` or convert it to .safetensors",
            path.display()
        );
    }
    if read && &magic == b"PK\x03\x04" {
        let mut tensors = candle_core::pickle::read_all(path)
            .with_context(|| format!("reading PyTorch file {}", path.display()))?;
        // Some training scripts wrap the weights: {"state_dict": ...} or {"model": ...}.
        for key in ["state_dict", "model"] {
            if tensors.is_empty() {
                tensors = candle_core::pickle::read_all_with_key(path, Some(key))
                    .with_context(|| format!("reading PyTorch file {}", path.display()))?;
            }
        }
        if tensors.is_empty() {
            bail!("no tensors found in PyTorch file {}", path.display());
        }
        Ok(tensors.into_iter().collect())
    } else {
        candle_core::safetensors::load(path, &Device::Cpu).with_context(|| {
            format!(
                "reading {} (expected .safetensors or a PyTorch .pth)",
                path.display()
            )
        })
    }
}

/// Loads torchvision weights into `model` and returns notes on what was left out.
///
/// Accepted: a full torchvision DeepLabV3 `state_dict` (`aux_classifier.*` dropped; a
/// `classifier.4` whose class count differs is left freshly initialised), an ImageNet ResNet
/// (keys without `backbone.`; `fc.*` dropped; the whole classifier stays fresh), or, for the
/// U-Net, a state dict with the reference script's keys. Missing `num_batches_tracked` are
/// taken as 0 like PyTorch does. Any other missing, mismatched or unexpected key is an error
/// naming it; the model is unchanged on error.
pub fn load_pretrained(model: &SegModel, path: &Path) -> anyhow::Result<Vec<String>> {
    let mut tensors = read_state_dict(path)?;
    let mut notes = Vec::new();
    let dropped = tensors.len();
    tensors.retain(|k, _| !k.starts_with("aux_classifier.") && !k.starts_with("fc."));
    if tensors.len() < dropped {
        notes.push(format!(
            "dropped {} aux_classifier/fc tensors",
            dropped - tensors.len()
        ));
    }
    let model_keys: HashSet<String> = model.store().keys().into_iter().collect();
    let is_deeplab = matches!(model.net(), super::Net::DeepLabV3(_));
    let mut fresh: Vec<&'static str> = Vec::new();
    if is_deeplab && !tensors.keys().any(|k| k.starts_with("backbone.")) {
        tensors = tensors
            .into_iter()
            .map(|(k, t)| (format!("backbone.{k}"), t))
            .collect();
        fresh.push("classifier.");
        notes.push("ImageNet backbone: the classifier is freshly initialised".into());
    } else if is_deeplab {
        let ours = model
            .store()
            .state_dict()
            .context("reading the model's tensors")?;
        let ours: HashMap<_, _> = ours.into_iter().collect();
        let mismatch = ["classifier.4.weight", "classifier.4.bias"]
            .iter()
            .any(|k| match (tensors.get(*k), ours.get(*k)) {
                (Some(a), Some(b)) => a.dims() != b.dims(),
                _ => false,
            });
        if mismatch {
            tensors.retain(|k, _| !k.starts_with("classifier.4."));
            fresh.push("classifier.4.");
            notes.push(format!(
                "classifier.4 has another class count: freshly initialised for {} classes",
                model.config().num_classes
            ));
        }
    }
    let mut unexpected: Vec<&String> = tensors
        .keys()
        .filter(|k| !model_keys.contains(*k))
        .collect();
    unexpected.sort();
    if let Some(k) = unexpected.first() {
        bail!(
            "{}: unexpected key `{k}` ({} in all) for a {:?} model",
            path.display(),
            unexpected.len(),
            model.config().arch
        );
    }
    let skip = |k: &str| fresh.iter().any(|p| k.starts_with(p));
    model
        .store()
        .load(&tensors, &skip, true)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(notes)
}
