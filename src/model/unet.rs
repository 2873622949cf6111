//! The small U-Net of `/work/shared/bench/unet_ref.py`, with its `state_dict` keys:
//! `downs.i.{0,1,3,4}` (conv3×3 no bias + BN + ReLU, twice), `ups.j` (ConvTranspose2d k=2 s=2,
//! or bilinear ×2 followed by a 1×1 conv when `upsample = "bilinear"`), `dec.j.{0,1,3,4}`
//! (the same double block on the concatenation `[up(x), skip]`) and `head` (1×1 conv).
//!
//! Options, all off by default:
//! - SA-UNet's (Guo et al., ICPR 2020), whose backbone is this net: DropBlock between every 3×3
//!   convolution and its BatchNorm (`model.dropblock`, no parameters), and a spatial attention
//!   between the bottleneck's two convolutions (`model.attention = "spatial"`, key
//!   `attention.weight`, a 7×7 convolution 2 → 1 without bias);
//! - deep supervision (`model.deep_supervision`): 1×1 heads `aux.j` on the decoder levels
//!   below full resolution, trained through [`UNet::forward_supervised`], unused in inference.
//!
//! Levels are separated by 2×2 max pooling, so inputs must be a multiple of
//! [`UNet::stride`] = 2^(levels-1).

use candle_core::{Result, Tensor};

use super::layers::{join, Builder, Conv2d, ConvBnRelu, ConvTranspose2d, DropBlock, Init, Pass};
use super::ops;
use crate::config::schema::{self, Attention, Upsample};

/// `block(i, o)`: two conv3×3 (no bias) + BN + ReLU, keys `0`, `1` and `3`, `4`; with
/// `model.dropblock`, a [`DropBlock`] between each convolution and its BatchNorm.
#[derive(Clone, Debug)]
pub struct DoubleConv {
    pub first: ConvBnRelu,
    pub second: ConvBnRelu,
    /// The DropBlocks after `first.conv` and `second.conv`.
    pub drops: Option<[DropBlock; 2]>,
}

impl DoubleConv {
    pub fn new(b: &mut Builder, prefix: &str, cin: usize, cout: usize) -> Result<Self> {
        let mut unit = |conv: &str, bn: &str, cin: usize| -> Result<ConvBnRelu> {
            let conv = b.conv2d(
                &join(prefix, conv),
                cin,
                cout,
                3,
                1,
                1,
                1,
                false,
                Init::TorchDefault,
            )?;
            let bn = b.batch_norm(&join(prefix, bn), cout)?;
            Ok(ConvBnRelu { conv, bn })
        };
        let first = unit("0", "1", cin)?;
        let second = unit("3", "4", cout)?;
        Ok(Self {
            first,
            second,
            drops: None,
        })
    }

    /// The first unit: conv, DropBlock, BN, ReLU.
    pub fn forward_first(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        self.first
            .forward_dropped(x, pass, self.drops.as_ref().map(|d| &d[0]))
    }

    /// The second unit.
    pub fn forward_second(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        self.second
            .forward_dropped(x, pass, self.drops.as_ref().map(|d| &d[1]))
    }

    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        self.forward_second(&self.forward_first(x, pass)?, pass)
    }
}

/// SA-UNet's spatial attention: `x · σ(conv7×7([mean_c(x), max_c(x)]))`, the map shared by
/// all channels (PyTorch: `torch.cat([x.mean(1, True), x.amax(1, True)], 1)`, `Conv2d(2, 1, 7,
/// padding=3, bias=False)`, `sigmoid`, broadcast multiply).
#[derive(Clone, Debug)]
pub struct SpatialAttention {
    pub conv: Conv2d,
}

impl SpatialAttention {
    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let pooled = Tensor::cat(&[x.mean_keepdim(1)?, x.max_keepdim(1)?], 1)?;
        let map = candle_nn::ops::sigmoid(&self.conv.forward(&pooled, pass)?)?;
        x.broadcast_mul(&map)
    }
}

/// The decoder's ×2 upsampling.
#[derive(Clone, Debug)]
pub enum Up {
    /// `ConvTranspose2d(c, c_prev, 2, stride=2)`.
    Transpose(ConvTranspose2d),
    /// Bilinear ×2 (align_corners = false) then `Conv2d(c, c_prev, 1)` with bias.
    Bilinear(Conv2d),
}

impl Up {
    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        match self {
            Up::Transpose(t) => t.forward(x, pass),
            Up::Bilinear(conv) => {
                let (_, _, h, w) = x.dims4()?;
                conv.forward(&ops::resize_bilinear(x, 2 * h, 2 * w)?, pass)
            }
        }
    }
}

/// The U-Net.
#[derive(Clone, Debug)]
pub struct UNet {
    pub downs: Vec<DoubleConv>,
    pub ups: Vec<Up>,
    pub dec: Vec<DoubleConv>,
    pub head: Conv2d,
    /// Between the bottleneck's two units (`model.attention = "spatial"`).
    pub attention: Option<SpatialAttention>,
    /// `model.deep_supervision`.
    pub deep_supervision: Option<DeepSupervision>,
}

/// Deep supervision's 1×1 heads `aux.j` on `dec.0 ..` (all but the last decoder level), and the
/// loss weight's decay per halving of the resolution.
#[derive(Clone, Debug)]
pub struct DeepSupervision {
    pub heads: Vec<Conv2d>,
    pub decay: f64,
}

impl UNet {
    /// `widths`: channels per level, top to bottom (at least one level).
    pub fn new(
        b: &mut Builder,
        widths: &[usize],
        upsample: Upsample,
        num_classes: usize,
    ) -> Result<Self> {
        if widths.is_empty() || widths.contains(&0) {
            candle_core::bail!("U-Net widths must be non-empty and positive, got {widths:?}");
        }
        let mut downs = Vec::with_capacity(widths.len());
        for (i, &c) in widths.iter().enumerate() {
            let cin = if i == 0 { 3 } else { widths[i - 1] };
            downs.push(DoubleConv::new(b, &format!("downs.{i}"), cin, c)?);
        }
        let mut ups = Vec::new();
        for (j, i) in (1..widths.len()).rev().enumerate() {
            let name = format!("ups.{j}");
            ups.push(match upsample {
                Upsample::Transpose => {
                    Up::Transpose(b.conv_transpose2d(&name, widths[i], widths[i - 1], 2)?)
                }
                Upsample::Bilinear => Up::Bilinear(b.conv2d(
                    &name,
                    widths[i],
                    widths[i - 1],
                    1,
                    1,
                    0,
                    1,
                    true,
                    Init::TorchDefault,
                )?),
            });
        }
        let mut dec = Vec::new();
        for (j, i) in (1..widths.len()).rev().enumerate() {
            let c = widths[i - 1];
            dec.push(DoubleConv::new(b, &format!("dec.{j}"), 2 * c, c)?);
        }
        let head = b.conv2d(
            "head",
            widths[0],
            num_classes,
            1,
            1,
            0,
            1,
            true,
            Init::TorchDefault,
        )?;
        Ok(Self {
            downs,
            ups,
            dec,
            head,
            attention: None,
            deep_supervision: None,
        })
    }

    /// Adds the options of `model.dropblock`, `model.attention` and `model.deep_supervision`
    /// (none: unchanged).
    pub fn with_options(mut self, b: &mut Builder, cfg: &schema::ModelConfig) -> Result<Self> {
        if let Some(d) = cfg.dropblock {
            let mut id = 0u64;
            for block in self.downs.iter_mut().chain(self.dec.iter_mut()) {
                block.drops = Some([
                    DropBlock::new(d.drop, d.size, id),
                    DropBlock::new(d.drop, d.size, id + 1),
                ]);
                id += 2;
            }
        }
        if let Some(Attention::Spatial) = cfg.attention {
            let conv = b.conv2d("attention", 2, 1, 7, 1, 3, 1, false, Init::TorchDefault)?;
            self.attention = Some(SpatialAttention { conv });
        }
        if let Some(decay) = cfg.deep_supervision {
            let classes = self.head.weight.dims()[0];
            let levels = cfg.widths.len();
            let heads = (0..levels.saturating_sub(2))
                .map(|j| {
                    let (name, c) = (format!("aux.{j}"), cfg.widths[levels - 2 - j]);
                    b.conv2d(&name, c, classes, 1, 1, 0, 1, true, Init::TorchDefault)
                })
                .collect::<Result<_>>()?;
            self.deep_supervision = Some(DeepSupervision { heads, decay });
        }
        Ok(self)
    }

    /// Every DropBlock, encoder then decoder.
    pub fn dropblocks(&self) -> impl Iterator<Item = &DropBlock> {
        self.downs
            .iter()
            .chain(&self.dec)
            .filter_map(|b| b.drops.as_ref())
            .flatten()
    }

    /// Side multiple the input must have: 2^(levels-1).
    pub fn stride(&self) -> usize {
        1 << (self.downs.len() - 1)
    }

    /// [N, 3, H, W] → logits [N, num_classes, H, W]; H and W must be multiples of [`Self::stride`].
    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let x = self.decode(x, pass, None)?;
        self.head.forward(&x, pass)
    }

    /// The logits to train on with their loss weights: the main head's (weight 1) first, then,
    /// with deep supervision, each auxiliary head's upsampled bilinearly to the input's size
    /// (weight decay^k at 1/2^k of the resolution, finest first).
    pub fn forward_supervised(&self, x: &Tensor, pass: Pass) -> Result<Vec<(Tensor, f64)>> {
        let mut outs = Vec::new();
        let x = self.decode(x, pass, Some(&mut outs))?;
        outs.push((self.head.forward(&x, pass)?, 1.0));
        outs.reverse();
        Ok(outs)
    }

    /// The encoder and decoder: the last decoder level's features. With `aux` and deep
    /// supervision, each auxiliary head's upsampled logits and weight are pushed, coarsest first.
    fn decode(
        &self,
        x: &Tensor,
        pass: Pass,
        mut aux: Option<&mut Vec<(Tensor, f64)>>,
    ) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let s = self.stride();
        if h % s != 0 || w % s != 0 {
            candle_core::bail!("U-Net input {h}×{w} is not a multiple of its stride {s}");
        }
        let mut skips = Vec::with_capacity(self.downs.len());
        let mut x = x.clone();
        let last = self.downs.len() - 1;
        for (i, down) in self.downs.iter().enumerate() {
            x = match (&self.attention, i == last) {
                (Some(a), true) => {
                    down.forward_second(&a.forward(&down.forward_first(&x, pass)?, pass)?, pass)?
                }
                _ => down.forward(&x, pass)?,
            };
            if i < last {
                skips.push(x.clone());
                x = ops::max_pool2d(&x, 2, 2, 0)?;
            }
        }
        let levels = self.dec.len();
        for (j, (up, dec)) in self.ups.iter().zip(&self.dec).enumerate() {
            let skip = skips
                .pop()
                .ok_or_else(|| candle_core::Error::Msg("U-Net: no skip left".into()))?;
            x = dec.forward(&Tensor::cat(&[up.forward(&x, pass)?, skip], 1)?, pass)?;
            if let (Some(outs), Some(ds)) = (aux.as_deref_mut(), &self.deep_supervision) {
                if let Some(head) = ds.heads.get(j) {
                    let k = levels - 1 - j; // this level is at 1/2^k of the input's resolution
                    let logits = ops::resize_bilinear(&head.forward(&x, pass)?, h, w)?;
                    outs.push((logits, ds.decay.powi(k as i32)));
                }
            }
        }
        Ok(x)
    }
}
