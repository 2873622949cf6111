//! ResNet backbones with torchvision's module tree and `state_dict` keys (`conv1`, `bn1`,
//! `layer1..layer4`, `N.conv1/bn1/.../downsample.0/downsample.1`), without the `fc` head.
//!
//! `replace_stride_with_dilation` follows torchvision's `_make_layer` exactly: in a dilated
//! layer the stride becomes 1 and the dilation is multiplied by it; the layer's *first* block
//! uses the dilation in force before the layer (`previous_dilation`), the others the new one.
//! torchvision's BasicBlock refuses dilation; ours (resnet18/34) accepts it, using it on both
//! 3×3 convolutions with padding = dilation.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{Result, Tensor, Var};

use super::layers::{conv_bn, join, BatchNorm, Builder, Conv2d, Init, Pass};
use super::ops;
use crate::config::schema::Backbone;

/// The projection shortcut `downsample = Sequential(conv1x1(stride), BatchNorm2d)`.
#[derive(Clone, Debug)]
pub struct Downsample {
    pub conv: Conv2d,
    pub bn: BatchNorm,
}

impl Downsample {
    fn new(b: &mut Builder, prefix: &str, cin: usize, cout: usize, stride: usize) -> Result<Self> {
        let conv = b.conv2d(
            &join(prefix, "0"),
            cin,
            cout,
            1,
            stride,
            0,
            1,
            false,
            Init::KaimingNormalFanOut,
        )?;
        let bn = b.batch_norm(&join(prefix, "1"), cout)?;
        Ok(Self { conv, bn })
    }

    fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        conv_bn(&self.conv, &self.bn, x, pass, false)
    }

    fn trainable(&self) -> Vec<Var> {
        vec![
            self.conv.weight.clone(),
            self.bn.inner.weight.clone(),
            self.bn.inner.bias.clone(),
        ]
    }
}

/// The end of a residual block: `relu(y + identity)`, for [`Pass::Infer`] written over `y`
/// (the block's last BatchNorm output, fresh).
fn residual_relu(y: Tensor, identity: &Tensor, pass: Pass) -> Result<Tensor> {
    if pass == Pass::Infer {
        ops::add_relu_in_place(y, identity)
    } else {
        ops::add_relu(&y, identity)
    }
}

/// torchvision's `BasicBlock` (expansion 1), with dilation allowed.
#[derive(Clone, Debug)]
pub struct BasicBlock {
    pub conv1: Conv2d,
    pub bn1: BatchNorm,
    pub conv2: Conv2d,
    pub bn2: BatchNorm,
    pub downsample: Option<Downsample>,
}

impl BasicBlock {
    /// Output channels = `planes`. `downsample` adds the projection shortcut.
    pub fn new(
        b: &mut Builder,
        prefix: &str,
        inplanes: usize,
        planes: usize,
        stride: usize,
        dilation: usize,
        downsample: bool,
    ) -> Result<Self> {
        let k = Init::KaimingNormalFanOut;
        let d = dilation;
        let conv1 = b.conv2d(
            &join(prefix, "conv1"),
            inplanes,
            planes,
            3,
            stride,
            d,
            d,
            false,
            k,
        )?;
        let bn1 = b.batch_norm(&join(prefix, "bn1"), planes)?;
        let conv2 = b.conv2d(&join(prefix, "conv2"), planes, planes, 3, 1, d, d, false, k)?;
        let bn2 = b.batch_norm(&join(prefix, "bn2"), planes)?;
        let downsample = if downsample {
            Some(Downsample::new(
                b,
                &join(prefix, "downsample"),
                inplanes,
                planes,
                stride,
            )?)
        } else {
            None
        };
        Ok(Self {
            conv1,
            bn1,
            conv2,
            bn2,
            downsample,
        })
    }

    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let y = conv_bn(&self.conv1, &self.bn1, x, pass, true)?;
        let y = conv_bn(&self.conv2, &self.bn2, &y, pass, false)?;
        let identity = match &self.downsample {
            Some(d) => d.forward(x, pass)?,
            None => x.clone(),
        };
        residual_relu(y, &identity, pass)
    }
}

/// torchvision's `Bottleneck` (expansion 4, stride on the 3×3 conv, "ResNet V1.5").
#[derive(Clone, Debug)]
pub struct Bottleneck {
    pub conv1: Conv2d,
    pub bn1: BatchNorm,
    pub conv2: Conv2d,
    pub bn2: BatchNorm,
    pub conv3: Conv2d,
    pub bn3: BatchNorm,
    pub downsample: Option<Downsample>,
}

impl Bottleneck {
    /// Output channels = `4 × planes`. `downsample` adds the projection shortcut.
    pub fn new(
        b: &mut Builder,
        prefix: &str,
        inplanes: usize,
        planes: usize,
        stride: usize,
        dilation: usize,
        downsample: bool,
    ) -> Result<Self> {
        let k = Init::KaimingNormalFanOut;
        let out = planes * 4;
        let conv1 = b.conv2d(
            &join(prefix, "conv1"),
            inplanes,
            planes,
            1,
            1,
            0,
            1,
            false,
            k,
        )?;
        let bn1 = b.batch_norm(&join(prefix, "bn1"), planes)?;
        let conv2 = b.conv2d(
            &join(prefix, "conv2"),
            planes,
            planes,
            3,
            stride,
            dilation,
            dilation,
            false,
            k,
        )?;
        let bn2 = b.batch_norm(&join(prefix, "bn2"), planes)?;
        let conv3 = b.conv2d(&join(prefix, "conv3"), planes, out, 1, 1, 0, 1, false, k)?;
        let bn3 = b.batch_norm(&join(prefix, "bn3"), out)?;
        let downsample = if downsample {
            Some(Downsample::new(
                b,
                &join(prefix, "downsample"),
                inplanes,
                out,
                stride,
            )?)
        } else {
            None
        };
        Ok(Self {
            conv1,
            bn1,
            conv2,
            bn2,
            conv3,
            bn3,
            downsample,
        })
    }

    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let y = conv_bn(&self.conv1, &self.bn1, x, pass, true)?;
        let y = conv_bn(&self.conv2, &self.bn2, &y, pass, true)?;
        let y = conv_bn(&self.conv3, &self.bn3, &y, pass, false)?;
        let identity = match &self.downsample {
            Some(d) => d.forward(x, pass)?,
            None => x.clone(),
        };
        residual_relu(y, &identity, pass)
    }
}

/// A residual block of either kind.
#[derive(Clone, Debug)]
pub enum Block {
    Basic(BasicBlock),
    Bottleneck(Bottleneck),
}

impl Block {
    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        match self {
            Block::Basic(b) => b.forward(x, pass),
            Block::Bottleneck(b) => b.forward(x, pass),
        }
    }

    /// The block's trainable parameters (convolution weights, BatchNorm weights and biases).
    pub fn trainable(&self) -> Vec<Var> {
        let cb = |c: &super::layers::Conv2d, b: &BatchNorm| {
            [
                c.weight.clone(),
                b.inner.weight.clone(),
                b.inner.bias.clone(),
            ]
        };
        let (mut v, ds) = match self {
            Block::Basic(b) => {
                let mut v = cb(&b.conv1, &b.bn1).to_vec();
                v.extend(cb(&b.conv2, &b.bn2));
                (v, &b.downsample)
            }
            Block::Bottleneck(b) => {
                let mut v = cb(&b.conv1, &b.bn1).to_vec();
                v.extend(cb(&b.conv2, &b.bn2));
                v.extend(cb(&b.conv3, &b.bn3));
                (v, &b.downsample)
            }
        };
        if let Some(d) = ds {
            v.extend(d.trainable());
        }
        v
    }
}

/// Runs a stage's blocks in order.
fn run_blocks(blocks: &[Block], x: &Tensor, pass: Pass) -> Result<Tensor> {
    let mut x = x.clone();
    for block in blocks {
        x = block.forward(&x, pass)?;
    }
    Ok(x)
}

/// Block type and blocks per layer of each backbone.
fn layout(backbone: Backbone) -> (bool, [usize; 4]) {
    match backbone {
        Backbone::Resnet18 => (false, [2, 2, 2, 2]),
        Backbone::Resnet34 => (false, [3, 4, 6, 3]),
        Backbone::Resnet50 => (true, [3, 4, 6, 3]),
        Backbone::Resnet101 => (true, [3, 4, 23, 3]),
    }
}

/// A ResNet trunk (stem + layer1..layer4), returning layer4's features.
#[derive(Clone, Debug)]
pub struct ResNet {
    pub conv1: Conv2d,
    pub bn1: BatchNorm,
    pub layers: Vec<Vec<Block>>,
    /// Channels of layer4's output: 2048 (Bottleneck) or 512 (BasicBlock).
    pub out_channels: usize,
    /// Input pixels per output pixel (32, or 8 with dilation in layer3 and layer4).
    pub output_stride: usize,
    /// Activation recomputation per stage (layer1..layer4) in training
    /// (`train.recompute`; see [`super::recompute`]).
    pub recompute: Arc<AtomicBool>,
}

impl ResNet {
    /// Builds `backbone` under `prefix` (e.g. `"backbone"`), with torchvision's
    /// `replace_stride_with_dilation` for layer2..layer4.
    pub fn new(
        b: &mut Builder,
        prefix: &str,
        backbone: Backbone,
        replace_stride_with_dilation: [bool; 3],
    ) -> Result<Self> {
        let (bottleneck, blocks) = layout(backbone);
        let expansion = if bottleneck { 4 } else { 1 };
        let conv1 = b.conv2d(
            &join(prefix, "conv1"),
            3,
            64,
            7,
            2,
            3,
            1,
            false,
            Init::KaimingNormalFanOut,
        )?;
        let bn1 = b.batch_norm(&join(prefix, "bn1"), 64)?;
        let mut inplanes = 64;
        let mut dilation = 1;
        let mut output_stride = 4;
        let mut layers = Vec::with_capacity(4);
        for (i, (&n, planes)) in blocks.iter().zip([64, 128, 256, 512]).enumerate() {
            let mut stride = if i == 0 { 1 } else { 2 };
            let previous_dilation = dilation;
            if i > 0 && replace_stride_with_dilation[i - 1] {
                dilation *= stride;
                stride = 1;
            }
            output_stride *= stride;
            let name = join(prefix, &format!("layer{}", i + 1));
            let has_downsample = stride != 1 || inplanes != planes * expansion;
            let mut layer = Vec::with_capacity(n);
            for j in 0..n {
                let p = join(&name, &j.to_string());
                let (s, d, ds) = if j == 0 {
                    (stride, previous_dilation, has_downsample)
                } else {
                    (1, dilation, false)
                };
                layer.push(if bottleneck {
                    Block::Bottleneck(Bottleneck::new(b, &p, inplanes, planes, s, d, ds)?)
                } else {
                    Block::Basic(BasicBlock::new(b, &p, inplanes, planes, s, d, ds)?)
                });
                inplanes = planes * expansion;
            }
            layers.push(layer);
        }
        Ok(Self {
            conv1,
            bn1,
            layers,
            out_channels: inplanes,
            output_stride,
            recompute: Arc::new(AtomicBool::new(false)),
        })
    }

    /// [N, 3, H, W] → layer4 features [N, out_channels, ⌈H/os⌉, ⌈W/os⌉] (PyTorch's rounding).
    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let x = conv_bn(&self.conv1, &self.bn1, x, pass, true)?;
        let mut x = ops::max_pool2d(&x, 3, 2, 1)?;
        let recompute = pass == Pass::Train && self.recompute.load(Ordering::Relaxed);
        for layer in &self.layers {
            x = if recompute {
                let blocks = layer.clone();
                let params: Vec<Var> = layer.iter().flat_map(Block::trainable).collect();
                super::recompute::checkpoint(
                    &x,
                    &params,
                    Arc::new(move |x: &Tensor| run_blocks(&blocks, x, Pass::Train)),
                )?
            } else {
                run_blocks(layer, &x, pass)?
            };
        }
        Ok(x)
    }
}
