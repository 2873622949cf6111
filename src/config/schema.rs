//! The typed experiment schema: every key an experiment file may set, with its default.
//!
//! Unknown keys are refused (`deny_unknown_fields`); value ranges are checked by
//! [`Experiment::validate`], which reports the dotted key path of each problem so
//! that the loader can point at the file, line and column it came from.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use super::resources::Resources;

/// One experiment, after `extends` has been merged and `--set` overrides applied.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// Experiment name: `runs/<name>/` holds its outputs.
    pub name: String,
    /// Parent file, deep-merged under this one (path relative to this file). Consumed by the loader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extends: Option<String>,
    /// Free text shown in reports.
    #[serde(default)]
    pub description: String,
    /// Pipeline file name in `pipelines/` (without `.toml`).
    #[serde(default = "default_pipeline")]
    pub pipeline: String,
    #[serde(default)]
    pub data: DataConfig,
    #[serde(default)]
    pub model: ModelConfig,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub augment: AugmentConfig,
    #[serde(default)]
    pub evaluate: EvaluateConfig,
    #[serde(default)]
    pub report: ReportConfig,
    /// What each stage asks of a Slurm cluster (`[resources.default]`, `[resources.<stage>]`);
    /// part of no stage key.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub resources: BTreeMap<String, Resources>,
}

fn default_pipeline() -> String {
    "deeplabv3".into()
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// The original DRIVE tree (`training/images`, `training/1st_manual`, `training/mask`, `test/...`).
    Drive,
    /// `train_images`, `train_masks`, `valid_images`, `valid_masks`, `test_images` (the seed's layout).
    SplitDirs,
    /// Procedurally generated fundus-like images; needs no files.
    Synthetic,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Normalize {
    /// ImageNet mean/std per channel (the seed's choice, needed for torchvision weights).
    Imagenet,
    /// Per-image, per-channel standardisation (zero mean, unit variance).
    PerImage,
    /// Contrast-limited adaptive histogram equalisation of each channel (OpenCV's
    /// `createCLAHE(2.0, (8, 8))`, `src/data/clahe.rs`) on the whole image, then per-image
    /// standardisation: evens out the fundus's uneven illumination before the net sees it.
    Clahe,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    pub layout: Layout,
    /// Dataset root. Relative paths in experiment files resolve against the project root.
    pub root: String,
    /// Number of labelled images held out for validation (ignored when `valid_ids` is set
    /// or the layout is already split). 0: train on every labelled image, validate nothing
    /// (needs `evaluate.checkpoint = "last"`).
    pub valid_count: usize,
    /// Pin the validation images explicitly (e.g. `["25", "26", "35", "40"]`).
    pub valid_ids: Vec<String>,
    /// Seed of the train/valid shuffle.
    pub split_seed: u64,
    pub normalize: Normalize,
    /// Native-resolution models (`train.crop`) only: every image is resized by this factor
    /// before anything else, in training and in prediction, and the probabilities are resized
    /// back, so scores stay at the images' own resolution. Above 1 a vessel spans more pixels
    /// of the first level, at the cost of less context per crop. Unset: 1 (and absent from
    /// the stages' keys).
    pub zoom: Option<f32>,
    pub synthetic: SyntheticConfig,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            layout: Layout::Drive,
            root: "data/DRIVE".into(),
            valid_count: 4,
            valid_ids: Vec::new(),
            split_seed: 42,
            normalize: Normalize::Imagenet,
            zoom: None,
            synthetic: SyntheticConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticConfig {
    /// Labelled images generated (split into train/valid like DRIVE's training set).
    pub count: usize,
    /// Test images generated (they carry labels, so the test split is scored too).
    pub test_count: usize,
    /// Width and height of each generated image.
    pub width: u32,
    pub height: u32,
    /// Generator seed.
    pub seed: u64,
    /// Width in pixels of the thickest vessel at the tree's root.
    pub vessel_width: f32,
    /// Width in pixels that vessels taper down to; branching stops near it. 1 px (the default)
    /// gives realistic trees ending in capillaries; `min_vessel_width = vessel_width` gives a few
    /// thick unbranched vessels of constant width (a fixture that a model with a coarse output
    /// stride can draw exactly).
    pub min_vessel_width: f32,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            count: 12,
            test_count: 4,
            width: 128,
            height: 128,
            seed: 7,
            vessel_width: 5.0,
            min_vessel_width: 1.0,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    Deeplabv3,
    Unet,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Backbone {
    Resnet18,
    Resnet34,
    Resnet50,
    Resnet101,
}

impl Backbone {
    pub fn as_str(self) -> &'static str {
        match self {
            Backbone::Resnet18 => "resnet18",
            Backbone::Resnet34 => "resnet34",
            Backbone::Resnet50 => "resnet50",
            Backbone::Resnet101 => "resnet101",
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Upsample {
    /// 2×2 transposed convolution, stride 2.
    Transpose,
    /// Bilinear ×2 followed by a 1×1 convolution.
    Bilinear,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    pub arch: Arch,
    pub backbone: Backbone,
    pub num_classes: usize,
    /// torchvision weights to start from (`.safetensors` or PyTorch `.pth`); empty: from scratch.
    pub pretrained: String,
    /// U-Net: channels per level, top to bottom.
    pub widths: Vec<usize>,
    /// U-Net: how the decoder upsamples.
    pub upsample: Upsample,
    /// U-Net: `[model.dropblock]`, structured dropout after every 3×3 convolution in training
    /// (SA-UNet's blocks). Unset: off, and absent from the `model` section's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropblock: Option<DropBlock>,
    /// U-Net: `"spatial"` puts SA-UNet's spatial attention between the bottleneck's two
    /// convolutions. Unset: none, and absent from the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention: Option<Attention>,
    /// U-Net: deep supervision with this decay `d` (nnU-Net's scheme). Every decoder level
    /// above the full-resolution one gets a 1×1 head (`aux.j`); in training its logits,
    /// upsampled bilinearly to the input's size, add a loss term weighted d^k at 1/2^k of the
    /// resolution, and the sum is divided by the weights' total. Evaluation and inference use
    /// the main head only. Unset: off, and absent from the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deep_supervision: Option<f64>,
}

/// `[model.dropblock]`: DropBlock (Ghiasi et al., NeurIPS 2018) in SA-UNet's place, between each
/// 3×3 convolution and its BatchNorm: in training, square blocks of `size`×`size` are zeroed in
/// each channel so that about `drop` of the activations are, and the rest scaled up to keep the
/// sum; evaluation leaves the activations as they are.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DropBlock {
    /// The fraction of activations dropped (SA-UNet: 1 − keep_prob, 0.1 to 0.18).
    pub drop: f64,
    /// The block's side, shrunk to the feature map's where that is smaller.
    pub size: usize,
}

impl Default for DropBlock {
    fn default() -> Self {
        Self { drop: 0.1, size: 7 }
    }
}

/// `model.attention`: an attention module in the U-Net's bottleneck.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Attention {
    /// SA-UNet's spatial attention (CBAM's spatial half): the channel-wise mean and max, a 7×7
    /// convolution (2 → 1, no bias) and a sigmoid give a map that multiplies every channel.
    Spatial,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            arch: Arch::Deeplabv3,
            backbone: Backbone::Resnet50,
            num_classes: 2,
            pretrained: String::new(),
            widths: vec![16, 32, 64, 128],
            upsample: Upsample::Transpose,
            dropblock: None,
            attention: None,
            deep_supervision: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Optimizer {
    Adam,
    Adamw,
    Sgd,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Scheduler {
    None,
    Cosine,
    Step,
    Poly,
    /// Linear decay to `lr_min_factor × lr` over the run (the U-Net recipe).
    Linear,
}

/// `[train.cldice]`: the soft-clDice term of Shit et al. (CVPR 2021) on the vessel
/// probabilities, added to `train.loss` with a weight.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Cldice {
    /// The term's weight: the loss becomes `train.loss + weight × (1 − clDice)`.
    pub weight: f64,
    /// Erosions of the soft skeleton: it thins structures up to about twice this width (DRIVE's
    /// widest vessels are ~12 px at native resolution).
    pub iters: usize,
}

impl Default for Cldice {
    fn default() -> Self {
        Self {
            weight: 0.5,
            iters: 10,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Loss {
    #[serde(rename = "ce")]
    Ce,
    #[serde(rename = "ce+dice")]
    CeDice,
}

/// The number format training computes in (`train.precision`): `f32` everywhere; `tf32` (TF32
/// GEMMs) and `bf16` (autocast of the convolutions and GEMMs, f32 master weights) on CUDA only.
/// [`Experiment::validate`] refuses them on `train.device = "cpu"`, and the train stage on a
/// CPU that `auto` selects (`model::device::check_precision`, `apply_precision`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    F32,
    Tf32,
    Bf16,
}

impl Precision {
    /// The value as written in an experiment file.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
        }
    }
}

/// Keys the schema no longer has, with what to do instead: a file that sets one is refused
/// with this advice rather than a bare "unknown key".
pub const REMOVED_KEYS: &[(&str, &str)] = &[(
    "train.threads",
    "was removed: no code read it. The number of threads is a setting of the process, not of \
     the experiment: use `driveline --threads N` or the RAYON_NUM_THREADS environment variable",
)];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Square side the images are resized to (multiple of 8, at least 64).
    pub imgsz: u32,
    /// Epochs (passes over the train split). Ignored when `steps > 0`.
    pub epochs: usize,
    /// Iterations instead of epochs (crop training); 0: use `epochs`.
    pub steps: usize,
    /// With `steps`: validate and checkpoint every this many iterations.
    pub valid_every_steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub optimizer: Optimizer,
    /// SGD momentum.
    pub momentum: f64,
    pub weight_decay: f64,
    pub scheduler: Scheduler,
    /// `step` scheduler: epochs (or validation periods) between decays, and the factor.
    pub step_size: usize,
    pub gamma: f64,
    /// `linear`/`poly`/`cosine`: floor of the learning rate as a fraction of `lr`.
    pub lr_min_factor: f64,
    pub loss: Loss,
    /// Per-class weights of the cross-entropy; empty: unweighted.
    pub class_weights: Vec<f64>,
    pub seed: u64,
    /// `cpu`, `cuda`, `cuda:N` or `auto`.
    pub device: String,
    /// `f32`; `tf32` or `bf16` on CUDA (see [`Precision`]).
    pub precision: Precision,
    /// Activation recomputation per ResNet stage (layer1..layer4): each stage keeps only its
    /// input and output between the forward and the backward pass, whose start runs the stage
    /// again. Less memory for one more backbone forward per step; the same gradients. On every
    /// device; the U-Net ignores it.
    pub recompute: bool,
    /// Decay of an exponential moving average of the weights (0: off; e.g. 0.999). When on,
    /// validation, the kept checkpoints and evaluation use the average (`training::ema`).
    pub ema: f64,
    /// After training, choose the vessel threshold with the best pooled F1 on the train
    /// images' own predictions (inside the FOV, no TTA) and store it in the checkpoints, for
    /// `evaluate.threshold = "train"` and `driveline infer`. The valid images play no part.
    pub pick_threshold: bool,
    /// A soft-clDice term added to the loss (`training::loss::soft_cldice`): rewards predicted
    /// vessels that cover the labelled centrelines and centrelines that stay inside the labelled
    /// vessels. Unset: off (and absent from the train stage's key).
    pub cldice: Option<Cldice>,
    /// Random crops of this side at native resolution (0: whole resized images).
    pub crop: u32,
    /// Save valid-set predictions as PNG every N periods (0: never).
    pub save_preds_every: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            imgsz: 512,
            epochs: 100,
            steps: 0,
            valid_every_steps: 250,
            batch: 2,
            lr: 1e-4,
            optimizer: Optimizer::Adam,
            momentum: 0.9,
            weight_decay: 0.0,
            scheduler: Scheduler::None,
            step_size: 30,
            gamma: 0.1,
            lr_min_factor: 0.0,
            loss: Loss::Ce,
            class_weights: Vec::new(),
            seed: 42,
            device: "cpu".into(),
            precision: Precision::F32,
            recompute: false,
            ema: 0.0,
            pick_threshold: false,
            cldice: None,
            crop: 0,
            save_preds_every: 10,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Horizontal flip with probability 0.5.
    pub hflip: bool,
    /// Vertical flip with probability 0.5.
    pub vflip: bool,
    /// Random multiples of 90° rotation.
    pub rot90: bool,
    /// Rotation by a uniform angle in ±`rotate` degrees with probability 0.5 (0: off). With
    /// `train.crop`, the crop is cut from a window wide enough for any angle and zoom drawn, so
    /// its corners hold image rather than zero fill (`Augmenter::window_for`).
    pub rotate: f32,
    /// Random scale in [`scale_min`, `scale_max`] followed by a crop/pad back to size (1, 1: off).
    pub scale_min: f32,
    pub scale_max: f32,
    /// Brightness jitter: add a uniform offset in ±`brightness` (fraction of full scale; 0: off).
    pub brightness: f32,
    /// Contrast jitter: multiply around the mean by 1 ± `contrast` (0: off).
    pub contrast: f32,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            hflip: true,
            vflip: false,
            rot90: false,
            rotate: 25.0,
            scale_min: 1.0,
            scale_max: 1.0,
            brightness: 0.0,
            contrast: 0.0,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointChoice {
    BestIou,
    BestLoss,
    Last,
}

/// Test-time augmentation: the views of an image whose vessel probabilities are averaged.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Tta {
    /// One pass on the image as it is.
    #[default]
    None,
    /// The image and its horizontal mirror (2 passes), as the reference scripts do.
    Flip,
    /// The 8 symmetries of the square: the 4 rotations by 90°, each also mirrored (8 passes).
    Dihedral,
}

impl Tta {
    /// The views, as (transpose H and W, flip H, flip W) applied in that order; the identity
    /// first.
    pub fn views(self) -> &'static [(bool, bool, bool)] {
        const ALL: [(bool, bool, bool); 8] = [
            (false, false, false),
            (false, false, true),
            (false, true, false),
            (false, true, true),
            (true, false, false),
            (true, false, true),
            (true, true, false),
            (true, true, true),
        ];
        match self {
            Tta::None => &ALL[..1],
            Tta::Flip => &ALL[..2],
            Tta::Dihedral => &ALL,
        }
    }

    /// How it reads in logs: empty for none.
    pub fn label(self) -> &'static str {
        match self {
            Tta::None => "",
            Tta::Flip => " + flip TTA",
            Tta::Dihedral => " + dihedral TTA (8 views)",
        }
    }
}

impl std::str::FromStr for Tta {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" | "false" => Ok(Tta::None),
            "flip" | "true" => Ok(Tta::Flip),
            "dihedral" => Ok(Tta::Dihedral),
            _ => Err(format!(
                "unknown TTA `{s}`: expected \"none\", \"flip\" or \"dihedral\" (or a boolean)"
            )),
        }
    }
}

/// `evaluate.threshold`: a fixed probability, or the one chosen on the training images.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Threshold {
    Value(f32),
    /// The checkpoint's [`crate::model::checkpoint::ChosenThreshold`].
    Train,
}

impl Serialize for Threshold {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Threshold::Value(v) => s.serialize_f32(*v),
            Threshold::Train => s.serialize_str("train"),
        }
    }
}

impl<'de> Deserialize<'de> for Threshold {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Threshold;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a probability in (0, 1) or \"train\"")
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Threshold, E> {
                Ok(Threshold::Value(v as f32))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Threshold, E> {
                Ok(Threshold::Value(v as f32))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Threshold, E> {
                Ok(Threshold::Value(v as f32))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Threshold, E> {
                match v {
                    "train" => Ok(Threshold::Train),
                    _ => Err(E::custom(format!(
                        "unknown threshold `{v}`: expected a probability in (0, 1) or \"train\""
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// Accepts the strings of [`Tta`] and, as earlier versions did, a boolean (`true` = flip).
impl<'de> Deserialize<'de> for Tta {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Tta;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"none\", \"flip\", \"dihedral\" or a boolean")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Tta, E> {
                Ok(if v { Tta::Flip } else { Tta::None })
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Tta, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EvaluateConfig {
    pub checkpoint: CheckpointChoice,
    /// Test-time augmentation: `"none"` (or `false`), `"flip"` (or `true`: the image and its
    /// mirror) or `"dihedral"` (the 8 rotations/mirrors of the square).
    pub tta: Tta,
    /// Probability at or above which a pixel is vessel: a number in (0, 1), or `"train"`, the
    /// threshold the train stage chose and stored in the checkpoint (`train.pick_threshold`).
    pub threshold: Threshold,
    /// Native-resolution inference: tile side (0: whole image, padded to the stride).
    pub tile: u32,
    pub overlap: u32,
}

impl Default for EvaluateConfig {
    fn default() -> Self {
        Self {
            checkpoint: CheckpointChoice::BestIou,
            tta: Tta::None,
            threshold: Threshold::Value(0.5),
            tile: 0,
            overlap: 64,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ReportConfig {
    /// Test images shown side by side in reports.
    pub images: usize,
}

impl Default for ReportConfig {
    fn default() -> Self {
        Self { images: 4 }
    }
}

impl Experiment {
    /// A default experiment (all schema defaults, empty name): the template that tells which
    /// keys exist.
    pub fn template() -> Self {
        Experiment {
            name: String::new(),
            extends: None,
            description: String::new(),
            pipeline: default_pipeline(),
            data: DataConfig::default(),
            model: ModelConfig::default(),
            train: TrainConfig::default(),
            augment: AugmentConfig::default(),
            evaluate: EvaluateConfig::default(),
            report: ReportConfig::default(),
            resources: BTreeMap::new(),
        }
    }

    /// The template with every optional section and key set to its defaults: all the keys an
    /// experiment file may set (an unset section or key has none in the template).
    pub fn known() -> Self {
        let mut e = Self::template();
        e.train.cldice = Some(Cldice::default());
        e.model.dropblock = Some(DropBlock::default());
        e.model.attention = Some(Attention::Spatial);
        e.model.deep_supervision = Some(0.5);
        e.data.zoom = Some(1.0);
        e
    }

    /// The canonical value of a dotted key or section (`train.lr`, `augment`), as JSON.
    pub fn value_at(&self, path: &str) -> Option<serde_json::Value> {
        let mut v = serde_json::to_value(self).ok()?;
        for part in path.split('.') {
            v = v.get_mut(part)?.take();
        }
        Some(v)
    }

    /// Range checks the types cannot express: (dotted key, message) for each problem.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut p: Vec<(String, String)> = super::resources::validate(&self.resources);
        let mut bad = |k: &str, m: String| p.push((k.to_string(), m));
        let ok_name = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
                && !s.starts_with('.')
        };
        if !ok_name(&self.name) {
            bad(
                "name",
                format!(
                    "{:?} must be non-empty and use only letters, digits, '_', '-', '.'",
                    self.name
                ),
            );
        }
        if !ok_name(&self.pipeline) {
            bad(
                "pipeline",
                format!("{:?} is not a pipeline name", self.pipeline),
            );
        }
        let d = &self.data;
        if d.layout != Layout::SplitDirs
            && d.valid_ids.is_empty()
            && d.valid_count == 0
            && self.evaluate.checkpoint != CheckpointChoice::Last
        {
            bad(
                "data.valid_count",
                "0 trains on every labelled image, which leaves nothing to choose a best \
                 checkpoint on: set evaluate.checkpoint = \"last\""
                    .into(),
            );
        }
        if d.layout == Layout::Synthetic {
            let s = &d.synthetic;
            if s.count < 2 {
                bad("data.synthetic.count", format!("{} is below 2", s.count));
            } else if d.valid_ids.is_empty() && d.valid_count >= s.count {
                bad(
                    "data.valid_count",
                    format!(
                        "{} leaves no training image out of data.synthetic.count = {}",
                        d.valid_count, s.count
                    ),
                );
            }
            if s.width < 32 || s.height < 32 {
                bad(
                    "data.synthetic.width",
                    format!("{}×{} is below 32×32", s.width, s.height),
                );
            }
            if s.vessel_width.is_nan() || s.vessel_width <= 0.0 {
                bad(
                    "data.synthetic.vessel_width",
                    format!("{} must be > 0", s.vessel_width),
                );
            }
            if !(s.min_vessel_width > 0.0 && s.min_vessel_width <= s.vessel_width.max(1.0)) {
                bad(
                    "data.synthetic.min_vessel_width",
                    format!(
                        "{} must be > 0 and at most data.synthetic.vessel_width = {}",
                        s.min_vessel_width, s.vessel_width
                    ),
                );
            }
        } else if d.root.is_empty() {
            bad("data.root", "must name the dataset folder".into());
        }
        let m = &self.model;
        if m.num_classes < 2 {
            bad("model.num_classes", format!("{} is below 2", m.num_classes));
        }
        if m.widths.is_empty() || m.widths.len() > 6 || m.widths.contains(&0) {
            bad(
                "model.widths",
                format!("{:?}: 1 to 6 levels, each at least 1 channel", m.widths),
            );
        }
        if let Some(d) = &m.dropblock {
            if !(0.0..1.0).contains(&d.drop) {
                bad(
                    "model.dropblock.drop",
                    format!(
                        "{} must be in [0, 1): the fraction of activations dropped",
                        d.drop
                    ),
                );
            }
            if d.size == 0 {
                bad("model.dropblock.size", "must be at least 1".into());
            }
        }
        if let Some(d) = m.deep_supervision {
            if !(d > 0.0 && d <= 1.0) {
                bad(
                    "model.deep_supervision",
                    format!("{d} must be in (0, 1]: the weight decay per level; remove the key to turn it off"),
                );
            }
        }
        if m.arch != Arch::Unet {
            for (key, set) in [
                ("model.dropblock", m.dropblock.is_some()),
                ("model.attention", m.attention.is_some()),
                ("model.deep_supervision", m.deep_supervision.is_some()),
            ] {
                if set {
                    bad(key, "is a U-Net option: model.arch is not \"unet\"".into());
                }
            }
        }
        let t = &self.train;
        if t.imgsz < 64 || !t.imgsz.is_multiple_of(8) {
            bad(
                "train.imgsz",
                format!("{} must be a multiple of 8 and at least 64", t.imgsz),
            );
        }
        if t.epochs == 0 && t.steps == 0 {
            bad(
                "train.epochs",
                "must be at least 1 (or set train.steps)".into(),
            );
        }
        if t.steps > 0 && t.valid_every_steps == 0 {
            bad("train.valid_every_steps", "must be at least 1".into());
        }
        if t.batch == 0 {
            bad("train.batch", "must be at least 1".into());
        }
        if !(t.lr.is_finite() && t.lr > 0.0) {
            bad("train.lr", format!("{} must be > 0", t.lr));
        }
        if !(0.0..1.0).contains(&t.momentum) {
            bad(
                "train.momentum",
                format!("{} must be in [0, 1)", t.momentum),
            );
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            bad(
                "train.weight_decay",
                format!("{} must be >= 0", t.weight_decay),
            );
        }
        if !(t.gamma > 0.0 && t.gamma <= 1.0) {
            bad("train.gamma", format!("{} must be in (0, 1]", t.gamma));
        }
        if t.step_size == 0 {
            bad("train.step_size", "must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&t.lr_min_factor) {
            bad(
                "train.lr_min_factor",
                format!("{} must be in [0, 1]", t.lr_min_factor),
            );
        }
        if !t.class_weights.is_empty()
            && (t.class_weights.len() != m.num_classes
                || t.class_weights.iter().any(|w| !(w.is_finite() && *w > 0.0)))
        {
            bad(
                "train.class_weights",
                format!(
                    "{:?}: one positive weight per class ({} classes)",
                    t.class_weights, m.num_classes
                ),
            );
        }
        let dev_ok = t.device == "cpu"
            || t.device == "cuda"
            || t.device == "auto"
            || t.device
                .strip_prefix("cuda:")
                .is_some_and(|n| n.parse::<usize>().is_ok());
        if !dev_ok {
            bad(
                "train.device",
                format!("{:?}: expected cpu, cuda, cuda:N or auto", t.device),
            );
        }
        if t.device == "cpu" && t.precision != Precision::F32 {
            bad(
                "train.precision",
                format!(
                    "{:?} runs on CUDA only, and train.device = \"cpu\" trains in f32: \
                     remove the key or set it to \"f32\"",
                    t.precision.as_str()
                ),
            );
        }
        if !(0.0..1.0).contains(&t.ema) {
            bad(
                "train.ema",
                format!(
                    "{} must be in [0, 1): 0 is off, 0.999 a common decay",
                    t.ema
                ),
            );
        }
        if let Some(c) = &t.cldice {
            if !(c.weight.is_finite() && c.weight > 0.0 && c.weight <= 10.0) {
                bad(
                    "train.cldice.weight",
                    format!(
                        "{} must be in (0, 10]; remove [train.cldice] to turn it off",
                        c.weight
                    ),
                );
            }
            if !(1..=64).contains(&c.iters) {
                bad(
                    "train.cldice.iters",
                    format!("{} must be in 1..=64", c.iters),
                );
            }
        }
        if t.crop != 0 && (t.crop < 32 || !t.crop.is_multiple_of(8)) {
            bad(
                "train.crop",
                format!("{} must be 0 (off) or a multiple of 8, at least 32", t.crop),
            );
        }
        if let Some(z) = self.data.zoom {
            if !(z.is_finite() && (0.25..=4.0).contains(&z)) {
                bad("data.zoom", format!("{z} must be in [0.25, 4]"));
            } else if t.crop == 0 {
                bad(
                    "data.zoom",
                    format!(
                        "{z} needs native-resolution training (train.crop > 0, pipeline = \"native\"); \
                         resized data have train.imgsz instead"
                    ),
                );
            }
        }
        let a = &self.augment;
        if !(0.0..=180.0).contains(&a.rotate) {
            bad(
                "augment.rotate",
                format!("{} must be in [0, 180] degrees", a.rotate),
            );
        }
        if !(a.scale_min > 0.0 && a.scale_min <= a.scale_max && a.scale_max <= 4.0) {
            bad(
                "augment.scale_min",
                format!(
                    "[{}, {}]: need 0 < scale_min <= scale_max <= 4",
                    a.scale_min, a.scale_max
                ),
            );
        }
        if !(0.0..=1.0).contains(&a.brightness) {
            bad(
                "augment.brightness",
                format!("{} must be in [0, 1]", a.brightness),
            );
        }
        if !(0.0..1.0).contains(&a.contrast) {
            bad(
                "augment.contrast",
                format!("{} must be in [0, 1)", a.contrast),
            );
        }
        let e = &self.evaluate;
        if let Threshold::Value(v) = e.threshold {
            if !(v > 0.0 && v < 1.0) {
                bad(
                    "evaluate.threshold",
                    format!("{v} must be in (0, 1), or \"train\""),
                );
            }
        }
        if e.tile != 0 && (e.tile < 64 || !e.tile.is_multiple_of(8)) {
            bad(
                "evaluate.tile",
                format!(
                    "{} must be 0 (whole image) or a multiple of 8, at least 64",
                    e.tile
                ),
            );
        }
        if e.tile != 0 && e.overlap * 2 >= e.tile {
            bad(
                "evaluate.overlap",
                format!(
                    "{} must be less than half of evaluate.tile ({})",
                    e.overlap, e.tile
                ),
            );
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tta(v: &str) -> Result<Tta, toml::de::Error> {
        toml::from_str::<EvaluateConfig>(&format!("tta = {v}")).map(|e| e.tta)
    }

    #[test]
    fn tta_reads_names_and_the_old_booleans() {
        assert_eq!(tta("false").unwrap(), Tta::None);
        assert_eq!(tta("true").unwrap(), Tta::Flip);
        assert_eq!(tta("\"none\"").unwrap(), Tta::None);
        assert_eq!(tta("\"flip\"").unwrap(), Tta::Flip);
        assert_eq!(tta("\"dihedral\"").unwrap(), Tta::Dihedral);
        let e = tta("\"sideways\"").unwrap_err().to_string();
        assert!(e.contains("sideways") && e.contains("dihedral"), "{e}");
        assert!(tta("3").is_err());
        // Written back as names, so stage keys show what ran.
        let cfg = EvaluateConfig {
            tta: Tta::Dihedral,
            ..Default::default()
        };
        assert!(toml::to_string(&cfg)
            .unwrap()
            .contains("tta = \"dihedral\""));
    }

    #[test]
    fn tta_views_are_distinct_and_start_with_the_identity() {
        for t in [Tta::None, Tta::Flip, Tta::Dihedral] {
            let v = t.views();
            assert_eq!(v[0], (false, false, false));
            let mut u = v.to_vec();
            u.sort();
            u.dedup();
            assert_eq!(u.len(), v.len());
        }
        assert_eq!(Tta::Dihedral.views().len(), 8);
        assert_eq!(
            Tta::Flip.views(),
            &[(false, false, false), (false, false, true)]
        );
    }

    #[test]
    fn zoom_is_checked_and_needs_crop_training() {
        let zoom_errors = |zoom: Option<f32>, crop: u32| {
            let mut e = Experiment::template();
            e.name = "z".into();
            e.data.zoom = zoom;
            e.train.crop = crop;
            e.validate()
                .into_iter()
                .filter(|(k, _)| k == "data.zoom")
                .map(|(_, m)| m)
                .collect::<Vec<_>>()
        };
        assert!(zoom_errors(None, 0).is_empty());
        assert!(zoom_errors(Some(1.5), 96).is_empty());
        let m = zoom_errors(Some(1.5), 0);
        assert!(m.len() == 1 && m[0].contains("train.crop"), "{m:?}");
        for bad in [0.1, 5.0, f32::NAN] {
            let m = zoom_errors(Some(bad), 96);
            assert!(m.len() == 1 && m[0].contains("[0.25, 4]"), "{bad}: {m:?}");
        }
        // Unset, it is null: absent from the stage keys of experiments that do not use it.
        let e = Experiment::template();
        assert_eq!(e.value_at("data.zoom"), Some(serde_json::Value::Null));
    }

    #[test]
    fn sa_unet_options_are_checked_and_absent_from_keys_when_unset() {
        let errors = |f: &dyn Fn(&mut Experiment)| {
            let mut e = Experiment::template();
            e.name = "s".into();
            e.model.arch = Arch::Unet;
            f(&mut e);
            e.validate()
                .into_iter()
                .filter(|(k, _)| k.starts_with("model."))
                .collect::<Vec<_>>()
        };
        assert!(errors(&|e| {
            e.model.dropblock = Some(DropBlock::default());
            e.model.attention = Some(Attention::Spatial);
        })
        .is_empty());
        for drop in [-0.1, 1.0, f64::NAN] {
            let m = errors(&|e| e.model.dropblock = Some(DropBlock { drop, size: 7 }));
            assert!(
                m.len() == 1 && m[0].0 == "model.dropblock.drop",
                "{drop}: {m:?}"
            );
        }
        let m = errors(&|e| e.model.dropblock = Some(DropBlock { drop: 0.1, size: 0 }));
        assert!(m.len() == 1 && m[0].0 == "model.dropblock.size", "{m:?}");
        for d in [0.0, 1.5, f64::NAN] {
            let m = errors(&|e| e.model.deep_supervision = Some(d));
            assert!(
                m.len() == 1 && m[0].0 == "model.deep_supervision",
                "{d}: {m:?}"
            );
        }
        assert!(errors(&|e| e.model.deep_supervision = Some(0.5)).is_empty());
        let m = errors(&|e| {
            e.model.arch = Arch::Deeplabv3;
            e.model.attention = Some(Attention::Spatial);
        });
        assert!(
            m.len() == 1 && m[0].0 == "model.attention" && m[0].1.contains("unet"),
            "{m:?}"
        );
        // Unset, the `model` section reads as before the options existed, so the train stage
        // keys of every experiment without them are unchanged.
        let model = Experiment::template().value_at("model").unwrap();
        let keys: Vec<&String> = model.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "arch",
                "backbone",
                "num_classes",
                "pretrained",
                "upsample",
                "widths"
            ]
        );
        let file = "name = \"s\"\n[model]\narch = \"unet\"\nattention = \"spatial\"\n\
                    [model.dropblock]\ndrop = 0.15\n";
        let e: Experiment = toml::from_str(file).unwrap();
        assert_eq!(
            e.model.dropblock,
            Some(DropBlock {
                drop: 0.15,
                size: 7
            })
        );
        assert_eq!(e.model.attention, Some(Attention::Spatial));
    }
}
