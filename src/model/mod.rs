//! Models: ResNet backbones, DeepLabV3 (ASPP), U-Net, the custom ops they need, checkpoints.

pub mod ops;
