//! DeepLabV3 as `torchvision.models.segmentation.deeplabv3_resnet{50,101}(num_classes, aux_loss=False)`:
//! a dilated ResNet (output stride 8) and a `DeepLabHead` (ASPP + 3×3 conv + BN + ReLU + 1×1
//! classifier), logits upsampled bilinearly (align_corners = false) to the input size.
//!
//! Keys are torchvision's: `backbone.*`, `classifier.0.convs.{0..4}.*`, `classifier.0.project.*`,
//! `classifier.{1,2,4}.*`. The head's width and the ASPP rates are parameters so that reduced
//! versions can be checked against PyTorch cheaply; the model uses 256 and [12, 24, 36].

use candle_core::{Result, Tensor};

use super::layers::{join, BatchNorm, Builder, Conv2d, ConvBnRelu, Dropout, Init, Pass};
use super::ops;
use super::resnet::ResNet;
use crate::config::schema::Backbone;

/// torchvision's ASPP rates for DeepLabV3.
pub const ASPP_RATES: [usize; 3] = [12, 24, 36];
/// Channels of the ASPP branches and the head.
pub const HEAD_WIDTH: usize = 256;
/// Dropout probability after the ASPP projection.
pub const ASPP_DROPOUT: f64 = 0.5;

fn conv_bn_relu(
    b: &mut Builder,
    prefix: &str,
    cin: usize,
    cout: usize,
    k: usize,
    dilation: usize,
) -> Result<ConvBnRelu> {
    let padding = if k == 1 { 0 } else { dilation };
    let conv = b.conv2d(
        &join(prefix, "0"),
        cin,
        cout,
        k,
        1,
        padding,
        dilation,
        false,
        Init::TorchDefault,
    )?;
    let bn = b.batch_norm(&join(prefix, "1"), cout)?;
    Ok(ConvBnRelu { conv, bn })
}

/// Atrous Spatial Pyramid Pooling (`torchvision.models.segmentation.deeplabv3.ASPP`).
#[derive(Debug)]
pub struct Aspp {
    /// `convs.0` (1×1) and `convs.1..3` (3×3, dilated by the rates).
    pub branches: Vec<ConvBnRelu>,
    /// `convs.4`: global average pool → 1×1 conv (`convs.4.1`) → BN (`convs.4.2`) → ReLU,
    /// then back to the feature size (bilinear from 1×1 is a broadcast).
    pub pool_conv: Conv2d,
    pub pool_bn: BatchNorm,
    /// `project`: 1×1 conv 5·out → out, BN, ReLU, Dropout.
    pub project: ConvBnRelu,
    pub dropout: Dropout,
}

impl Aspp {
    pub fn new(
        b: &mut Builder,
        prefix: &str,
        cin: usize,
        rates: [usize; 3],
        cout: usize,
        dropout: f64,
    ) -> Result<Self> {
        let convs = join(prefix, "convs");
        let mut branches = vec![conv_bn_relu(b, &join(&convs, "0"), cin, cout, 1, 1)?];
        for (i, rate) in rates.iter().enumerate() {
            branches.push(conv_bn_relu(
                b,
                &join(&convs, &(i + 1).to_string()),
                cin,
                cout,
                3,
                *rate,
            )?);
        }
        let pool = join(&convs, "4");
        let pool_conv = b.conv2d(
            &join(&pool, "1"),
            cin,
            cout,
            1,
            1,
            0,
            1,
            false,
            Init::TorchDefault,
        )?;
        let pool_bn = b.batch_norm(&join(&pool, "2"), cout)?;
        let project = conv_bn_relu(b, &join(prefix, "project"), 5 * cout, cout, 1, 1)?;
        let seed = b.next_seed();
        Ok(Self {
            branches,
            pool_conv,
            pool_bn,
            project,
            dropout: Dropout::new(dropout, seed),
        })
    }

    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let mut outs = Vec::with_capacity(5);
        for branch in &self.branches {
            outs.push(branch.forward(x, pass)?);
        }
        let (n, _, h, w) = x.dims4()?;
        let pooled = x.mean_keepdim((2, 3))?;
        let pooled = self
            .pool_bn
            .forward_relu(&self.pool_conv.forward(&pooled, pass)?, pass)?;
        let c = pooled.dim(1)?;
        outs.push(pooled.broadcast_as((n, c, h, w))?.contiguous()?);
        let cat = Tensor::cat(&outs, 1)?;
        drop(outs);
        let y = self.project.forward(&cat, pass)?;
        self.dropout.forward(&y, pass.is_train())
    }
}

/// `DeepLabHead(in_channels, num_classes)`: `0` ASPP, `1` 3×3 conv, `2` BN, `3` ReLU,
/// `4` 1×1 conv with bias.
#[derive(Debug)]
pub struct DeepLabHead {
    pub aspp: Aspp,
    pub conv: ConvBnRelu,
    pub classifier: Conv2d,
}

impl DeepLabHead {
    /// `width` is 256 in torchvision; smaller widths are for tests.
    pub fn new(
        b: &mut Builder,
        prefix: &str,
        cin: usize,
        num_classes: usize,
        width: usize,
        rates: [usize; 3],
        dropout: f64,
    ) -> Result<Self> {
        let aspp = Aspp::new(b, &join(prefix, "0"), cin, rates, width, dropout)?;
        let conv = b.conv2d(
            &join(prefix, "1"),
            width,
            width,
            3,
            1,
            1,
            1,
            false,
            Init::TorchDefault,
        )?;
        let bn = b.batch_norm(&join(prefix, "2"), width)?;
        let classifier = b.conv2d(
            &join(prefix, "4"),
            width,
            num_classes,
            1,
            1,
            0,
            1,
            true,
            Init::TorchDefault,
        )?;
        Ok(Self {
            aspp,
            conv: ConvBnRelu { conv, bn },
            classifier,
        })
    }

    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let y = self.aspp.forward(x, pass)?;
        let y = self.conv.forward(&y, pass)?;
        self.classifier.forward(&y, pass)
    }
}

/// The whole segmentation network: `backbone` and `classifier`.
#[derive(Debug)]
pub struct DeepLabV3 {
    pub backbone: ResNet,
    pub classifier: DeepLabHead,
}

impl DeepLabV3 {
    /// torchvision's `deeplabv3_resnet*`: dilation in layer3 and layer4, 256-wide head.
    pub fn new(b: &mut Builder, backbone: Backbone, num_classes: usize) -> Result<Self> {
        let backbone = ResNet::new(b, "backbone", backbone, [false, true, true])?;
        let classifier = DeepLabHead::new(
            b,
            "classifier",
            backbone.out_channels,
            num_classes,
            HEAD_WIDTH,
            ASPP_RATES,
            ASPP_DROPOUT,
        )?;
        Ok(Self {
            backbone,
            classifier,
        })
    }

    /// [N, 3, H, W] → logits [N, num_classes, H, W].
    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let features = self.backbone.forward(x, pass)?;
        let logits = self.classifier.forward(&features, pass)?;
        ops::resize_bilinear(&logits, h, w)
    }
}
