//! Whole-image prediction, shared by training-time validation, the `evaluate` stage and
//! `driveline infer`.
//!
//! Two ways to see an image, decided by how the model was trained (checkpoint metadata):
//! - **resize** (the seed's protocol): resize to `imgsz`, predict, resize the probabilities
//!   back to the image's own resolution (bilinear);
//! - **native** (crop-trained U-Net): predict at the original resolution, the image padded
//!   by reflection to the network's stride, or in overlapping tiles for large images.
//!
//! Optional test-time augmentation averages with the horizontally flipped prediction.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, D};
use image::RgbImage;

use crate::config::Normalize;
use crate::data::{self, ChannelStats};
use crate::model::ops::resize_bilinear;
use crate::model::SegModel;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Resize to a square side, predict, resize back.
    Resize(u32),
    /// Predict at native resolution; `tile` = 0: the whole image at once.
    Native { tile: u32, overlap: u32 },
}

pub struct Predictor<'a> {
    pub model: &'a SegModel,
    pub normalize: Normalize,
    pub mode: Mode,
    pub tta: bool,
}

/// An image as a normalised [1, 3, H, W] tensor.
pub fn image_tensor(img: &RgbImage, stats: &ChannelStats, device: &Device) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    let v = data::to_chw_f32_with(img, stats);
    Ok(Tensor::from_vec(v, (1, 3, h as usize, w as usize), device)?)
}

impl Predictor<'_> {
    /// Logits [1, C, H, W] for an image at the size the model should see it (no resizing):
    /// padded by reflection to the model's stride and cropped back.
    pub fn logits_at(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let s = self.model.stride();
        let (ph, pw) = (h.div_ceil(s) * s - h, w.div_ceil(s) * s - w);
        let xp = if ph > 0 || pw > 0 {
            reflect_pad(x, ph, pw)?
        } else {
            x.clone()
        };
        let y = self.model.forward(&xp, false)?;
        Ok(y.narrow(2, 0, h)?.narrow(3, 0, w)?)
    }

    /// Vessel probability [H, W] for the normalised input tensor [1, 3, H, W], with TTA.
    fn probs_tensor(&self, x: &Tensor) -> Result<Tensor> {
        let p = vessel_prob(&self.logits_at(x)?)?;
        if !self.tta {
            return Ok(p);
        }
        let flipped = flip_w(x)?;
        let pf = flip_w(&vessel_prob(&self.logits_at(&flipped)?)?)?;
        Ok(((p + pf)? * 0.5)?)
    }

    /// Vessel probability of every pixel of `img`, at `img`'s own resolution (row-major).
    pub fn probs(&self, img: &RgbImage) -> Result<Vec<f32>> {
        let device = self.model.device();
        let stats = ChannelStats::for_image(self.normalize, img);
        let (w, h) = img.dimensions();
        let p = match self.mode {
            Mode::Resize(size) => {
                let small = data::resize_rgb(img, size, size);
                let x = image_tensor(&small, &stats, device)?;
                let p = self.probs_tensor(&x)?; // [1, 1, size, size]
                resize_bilinear(&p, h as usize, w as usize)?
            }
            Mode::Native { tile, overlap } => {
                let x = image_tensor(img, &stats, device)?;
                if tile == 0 || (w <= tile && h <= tile) {
                    self.probs_tensor(&x)?
                } else {
                    self.tiled(&x, tile as usize, overlap as usize)?
                }
            }
        };
        Ok(p.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
    }

    /// Predict in `tile`×`tile` windows overlapping by `overlap`, averaging where they overlap.
    fn tiled(&self, x: &Tensor, tile: usize, overlap: usize) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let starts = |len: usize| -> Vec<usize> {
            if len <= tile {
                return vec![0];
            }
            let step = tile - overlap;
            let mut v: Vec<usize> = (0..)
                .map(|i| i * step)
                .take_while(|s| s + tile < len)
                .collect();
            v.push(len - tile);
            v
        };
        let mut acc = vec![0f32; h * w];
        let mut cnt = vec![0f32; h * w];
        for y0 in starts(h) {
            for x0 in starts(w) {
                let th = tile.min(h);
                let tw = tile.min(w);
                // Contiguous: the flip (TTA) and the reflection padding index-select it.
                let crop = x.narrow(2, y0, th)?.narrow(3, x0, tw)?.contiguous()?;
                let p = self
                    .probs_tensor(&crop)?
                    .flatten_all()?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?;
                for yy in 0..th {
                    for xx in 0..tw {
                        let i = (y0 + yy) * w + x0 + xx;
                        acc[i] += p[yy * tw + xx];
                        cnt[i] += 1.0;
                    }
                }
            }
        }
        let v: Vec<f32> = acc.iter().zip(&cnt).map(|(a, c)| a / c.max(1.0)).collect();
        Ok(Tensor::from_vec(v, (1, 1, h, w), x.device())?)
    }
}

/// Softmax probability of class 1 (vessel): [N, C, H, W] → [N, 1, H, W].
pub fn vessel_prob(logits: &Tensor) -> Result<Tensor> {
    let p = candle_nn::ops::softmax(logits, 1)?;
    Ok(p.narrow(1, 1, 1)?)
}

/// Argmax class per pixel: [N, C, H, W] → u8 values, row-major.
pub fn argmax_u8(logits: &Tensor) -> Result<Vec<u8>> {
    Ok(logits
        .argmax(1)?
        .flatten_all()?
        .to_dtype(DType::U8)?
        .to_vec1::<u8>()?)
}

fn flip_w(x: &Tensor) -> Result<Tensor> {
    let w = x.dim(D::Minus1)?;
    let idx: Vec<u32> = (0..w as u32).rev().collect();
    let idx = Tensor::new(idx.as_slice(), x.device())?;
    Ok(x.index_select(&idx, 3)?)
}

/// Reflect-pad the bottom and right edges (numpy's `mode="reflect"`: the edge pixel is not
/// repeated).
pub fn reflect_pad(x: &Tensor, ph: usize, pw: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    anyhow::ensure!(ph < h && pw < w, "image too small to pad by reflection");
    let mut y = x.clone();
    if ph > 0 {
        let idx: Vec<u32> = (0..h + ph)
            .map(|i| if i < h { i } else { 2 * (h - 1) - i } as u32)
            .collect();
        y = y.index_select(&Tensor::new(idx.as_slice(), x.device())?, 2)?;
    }
    if pw > 0 {
        let idx: Vec<u32> = (0..w + pw)
            .map(|i| if i < w { i } else { 2 * (w - 1) - i } as u32)
            .collect();
        y = y.index_select(&Tensor::new(idx.as_slice(), x.device())?, 3)?;
    }
    Ok(y)
}

/// The prediction mode a checkpoint's metadata implies, with the evaluate options.
pub fn mode_for(crop: u32, imgsz: u32, tile: u32, overlap: u32) -> Mode {
    if crop > 0 {
        Mode::Native { tile, overlap }
    } else {
        Mode::Resize(imgsz)
    }
}

/// Probabilities to an 8-bit grey image (0..255).
pub fn probs_to_image(p: &[f32], w: u32, h: u32) -> Result<image::GrayImage> {
    let v: Vec<u8> = p
        .iter()
        .map(|x| (x.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    image::GrayImage::from_raw(w, h, v).context("probability map has the wrong size")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflect_pad_mirrors_without_repeating_the_edge() {
        let x = Tensor::arange(0f32, 3.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 1, 3))
            .unwrap();
        let x = x.broadcast_as((1, 1, 2, 3)).unwrap().contiguous().unwrap();
        let y = reflect_pad(&x, 1, 2).unwrap();
        assert_eq!(y.dims4().unwrap(), (1, 1, 3, 5));
        let row = y
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(row, [0.0, 1.0, 2.0, 1.0, 0.0]);
    }

    #[test]
    fn flip_is_an_involution() {
        let x = Tensor::arange(0f32, 12.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 3, 4))
            .unwrap();
        let back = flip_w(&flip_w(&x).unwrap()).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let f = flip_w(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(&f[..4], &[3.0, 2.0, 1.0, 0.0]);
    }
}
