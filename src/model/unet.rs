//! The small U-Net of `/work/shared/bench/unet_ref.py`, with its `state_dict` keys:
//! `downs.i.{0,1,3,4}` (conv3×3 no bias + BN + ReLU, twice), `ups.j` (ConvTranspose2d k=2 s=2,
//! or bilinear ×2 followed by a 1×1 conv when `upsample = "bilinear"`), `dec.j.{0,1,3,4}`
//! (the same double block on the concatenation `[up(x), skip]`) and `head` (1×1 conv).
//!
//! Levels are separated by 2×2 max pooling, so inputs must be a multiple of
//! [`UNet::stride`] = 2^(levels-1).

use candle_core::{Result, Tensor};

use super::layers::{join, Builder, Conv2d, ConvBnRelu, ConvTranspose2d, Init, Pass};
use super::ops;
use crate::config::schema::Upsample;

/// `block(i, o)`: two conv3×3 (no bias) + BN + ReLU, keys `0`, `1` and `3`, `4`.
#[derive(Clone, Debug)]
pub struct DoubleConv {
    pub first: ConvBnRelu,
    pub second: ConvBnRelu,
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
        Ok(Self { first, second })
    }

    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        self.second.forward(&self.first.forward(x, pass)?, pass)
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
        })
    }

    /// Side multiple the input must have: 2^(levels-1).
    pub fn stride(&self) -> usize {
        1 << (self.downs.len() - 1)
    }

    /// [N, 3, H, W] → logits [N, num_classes, H, W]; H and W must be multiples of [`Self::stride`].
    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let s = self.stride();
        if h % s != 0 || w % s != 0 {
            candle_core::bail!("U-Net input {h}×{w} is not a multiple of its stride {s}");
        }
        let mut skips = Vec::with_capacity(self.downs.len());
        let mut x = x.clone();
        let last = self.downs.len() - 1;
        for (i, down) in self.downs.iter().enumerate() {
            x = down.forward(&x, pass)?;
            if i < last {
                skips.push(x.clone());
                x = ops::max_pool2d(&x, 2, 2, 0)?;
            }
        }
        for (up, dec) in self.ups.iter().zip(&self.dec) {
            let skip = skips
                .pop()
                .ok_or_else(|| candle_core::Error::Msg("U-Net: no skip left".into()))?;
            x = dec.forward(&Tensor::cat(&[up.forward(&x, pass)?, skip], 1)?, pass)?;
        }
        self.head.forward(&x, pass)
    }
}
