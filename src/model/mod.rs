//! Models: ResNet backbones, DeepLabV3 (ASPP), U-Net, the custom ops they need, checkpoints.
//!
//! [`SegModel`] is what the stages use: built from a [`ModelConfig`] and a seed, it owns every
//! parameter and buffer under torchvision's `state_dict` keys, so checkpoints and torchvision
//! weights map key for key (see [`checkpoint`]).

pub mod checkpoint;
pub mod deeplabv3;
pub mod device;
pub mod layers;
pub mod ops;
pub mod recompute;
pub mod resnet;
pub mod unet;

use std::collections::HashMap;

use anyhow::Context;
use candle_core::{DType, Device, Tensor, Var};

use crate::config::schema::{Arch, ModelConfig};
use deeplabv3::DeepLabV3;
pub use layers::Pass;
use layers::{Builder, ParamStore};
use unet::UNet;

/// The network behind a [`SegModel`].
#[derive(Debug)]
pub enum Net {
    DeepLabV3(Box<DeepLabV3>),
    UNet(UNet),
}

/// A segmentation model: the network plus its parameter store.
#[derive(Debug)]
pub struct SegModel {
    config: ModelConfig,
    device: Device,
    store: ParamStore,
    net: Net,
}

impl SegModel {
    /// Builds the network of `cfg` on `device`, initialised like PyTorch/torchvision from
    /// `seed` (same seed, same weights). `cfg.pretrained` is *not* loaded here: call
    /// [`checkpoint::load_pretrained`].
    pub fn new(cfg: &ModelConfig, device: &Device, seed: u64) -> anyhow::Result<Self> {
        Self::with_dtype(cfg, device, seed, DType::F32)
    }

    /// Like [`Self::new`] with parameters and buffers of `dtype`. Training and inference use
    /// f32; f64 (CPU) is for checks that must be free of float32 rounding, such as whole-model
    /// parity with a float64 PyTorch forward. Inputs must then be f64 too.
    pub fn with_dtype(
        cfg: &ModelConfig,
        device: &Device,
        seed: u64,
        dtype: DType,
    ) -> anyhow::Result<Self> {
        if cfg.num_classes == 0 {
            anyhow::bail!("model.num_classes must be at least 1");
        }
        let mut b = Builder::with_dtype(device, seed, dtype);
        let net = match cfg.arch {
            Arch::Deeplabv3 => Net::DeepLabV3(Box::new(
                DeepLabV3::new(&mut b, cfg.backbone, cfg.num_classes).with_context(|| {
                    format!("building deeplabv3 with {}", cfg.backbone.as_str())
                })?,
            )),
            Arch::Unet => Net::UNet(
                UNet::new(&mut b, &cfg.widths, cfg.upsample, cfg.num_classes)
                    .and_then(|u| u.with_options(&mut b, cfg))
                    .context("building unet")?,
            ),
        };
        Ok(Self {
            config: cfg.clone(),
            device: device.clone(),
            store: b.finish(),
            net,
        })
    }

    /// [N, 3, H, W] → logits [N, num_classes, H, W]. `train` selects batch statistics for
    /// BatchNorm (updating running stats and `num_batches_tracked`) and enables dropout.
    /// U-Net inputs must be multiples of [`Self::stride`].
    ///
    /// Both modes record the autograd graph through the parameters; to predict without
    /// training, use [`Self::infer`].
    pub fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.forward_pass(x, train.into())
    }

    /// Eval-mode logits on detached parameters ([`Pass::Infer`]): no autograd graph is kept,
    /// so every activation is freed as soon as its consumer ran (peak memory of a few
    /// activations instead of all of them). Bitwise equal to `forward(x, false)`.
    pub fn infer(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_pass(x, Pass::Infer)
    }

    /// The training forward: the logits to train on with their loss weights, the main head's
    /// (weight 1) first. Only a U-Net with `model.deep_supervision` has more than one.
    pub fn forward_supervised(&self, x: &Tensor) -> candle_core::Result<Vec<(Tensor, f64)>> {
        match &self.net {
            Net::UNet(m) => m.forward_supervised(x, Pass::Train),
            _ => Ok(vec![(self.forward_pass(x, Pass::Train)?, 1.0)]),
        }
    }

    /// The forward pass of the given kind (see [`Pass`]).
    pub fn forward_pass(&self, x: &Tensor, pass: Pass) -> candle_core::Result<Tensor> {
        match &self.net {
            Net::DeepLabV3(m) => m.forward(x, pass),
            Net::UNet(m) => m.forward(x, pass),
        }
    }

    /// Trainable parameters with their `state_dict` keys (BN running stats excluded).
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.store.trainable_vars()
    }

    /// Input sides should be multiples of this: 8 for DeepLabV3 (its output stride; any size
    /// works), 2^(levels-1) for the U-Net (required).
    pub fn stride(&self) -> usize {
        match &self.net {
            Net::DeepLabV3(m) => m.backbone.output_stride,
            Net::UNet(m) => m.stride(),
        }
    }

    /// Activation recomputation per ResNet stage in training (`train.recompute`): less memory,
    /// one more forward pass of the backbone per step, the same gradients. The U-Net has no
    /// stages to recompute and ignores it.
    pub fn set_recompute(&self, on: bool) {
        if let Net::DeepLabV3(m) = &self.net {
            m.backbone
                .recompute
                .store(on, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Reseed every dropout and DropBlock layer's mask generator (deterministic resume).
    pub fn reseed_dropout(&self, seed: u64) {
        match &self.net {
            Net::DeepLabV3(m) => m.classifier.aspp.dropout.reseed(seed),
            Net::UNet(m) => m.dropblocks().for_each(|d| d.reseed(seed)),
        }
    }

    /// Number of trainable scalars.
    pub fn param_count(&self) -> usize {
        self.store.param_count()
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The device the parameters live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The network itself.
    pub fn net(&self) -> &Net {
        &self.net
    }

    /// All parameters and buffers.
    pub fn store(&self) -> &ParamStore {
        &self.store
    }

    /// The `state_dict` (torchvision keys and order; `num_batches_tracked` as int64 scalars).
    pub fn state_dict(&self) -> candle_core::Result<Vec<(String, Tensor)>> {
        self.store.state_dict()
    }

    /// Loads a full `state_dict` (PyTorch's `strict=True`): every key present with the right
    /// shape and no unexpected key. The model is unchanged on error.
    pub fn load_state_dict(&self, tensors: &HashMap<String, Tensor>) -> anyhow::Result<()> {
        let keys: std::collections::HashSet<String> = self.store.keys().into_iter().collect();
        let mut unexpected: Vec<&String> = tensors.keys().filter(|k| !keys.contains(*k)).collect();
        unexpected.sort();
        if let Some(k) = unexpected.first() {
            anyhow::bail!("unexpected key `{k}` ({} in all)", unexpected.len());
        }
        self.store
            .load(tensors, &|_| false, false)
            .map_err(anyhow::Error::msg)
    }
}

#[cfg(test)]
mod tests;
