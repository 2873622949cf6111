//! The typed experiment schema: every key an experiment file may set, with its default.
//!
//! Unknown keys are refused (`deny_unknown_fields`); value ranges are checked by
//! [`Experiment::validate`], which reports the dotted key path of each problem so
//! that the loader can point at the file, line and column it came from.

use serde::{Deserialize, Serialize};

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
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub layout: Layout,
    /// Dataset root. Relative paths in experiment files resolve against the project root.
    pub root: String,
    /// Number of labelled images held out for validation (ignored when `valid_ids` is set
    /// or the layout is already split).
    pub valid_count: usize,
    /// Pin the validation images explicitly (e.g. `["25", "26", "35", "40"]`).
    pub valid_ids: Vec<String>,
    /// Seed of the train/valid shuffle.
    pub split_seed: u64,
    pub normalize: Normalize,
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

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Loss {
    #[serde(rename = "ce")]
    Ce,
    #[serde(rename = "ce+dice")]
    CeDice,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    F32,
    Tf32,
    Bf16,
}

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
    pub precision: Precision,
    /// Random crops of this side at native resolution (0: whole resized images).
    pub crop: u32,
    /// Save valid-set predictions as PNG every N epochs (0: never).
    pub save_preds_every: usize,
    /// Worker threads (0: every core).
    pub threads: usize,
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
            crop: 0,
            save_preds_every: 10,
            threads: 0,
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
    /// Rotation by a uniform angle in ±`rotate` degrees with probability 0.5 (0: off).
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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EvaluateConfig {
    pub checkpoint: CheckpointChoice,
    /// Average with the horizontally flipped prediction.
    pub tta: bool,
    /// Probability above which a pixel is vessel.
    pub threshold: f32,
    /// Native-resolution inference: tile side (0: whole image, padded to the stride).
    pub tile: u32,
    pub overlap: u32,
}

impl Default for EvaluateConfig {
    fn default() -> Self {
        Self {
            checkpoint: CheckpointChoice::BestIou,
            tta: false,
            threshold: 0.5,
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
