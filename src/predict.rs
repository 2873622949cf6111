//! Whole-image prediction, shared by training-time validation, the `evaluate` stage and
//! `driveline infer`.
//!
//! Two ways to see an image, decided by how the model was trained (checkpoint metadata):
//! - **resize** (the seed's protocol): resize to `imgsz`, predict, resize the probabilities
//!   back to the image's own resolution (bilinear);
//! - **native** (crop-trained U-Net): predict at the original resolution, the image padded
//!   by reflection to the network's stride, or in overlapping tiles for large images.
//!
//! Optional test-time augmentation averages the prediction over mirrored (and, for
//! [`Tta::Dihedral`], transposed) views of the image.
//!
//! Every prediction runs [`SegModel::infer`]: eval mode on detached parameters, so no autograd
//! graph is kept and each activation is freed as soon as its consumer ran.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use crate::config::{Normalize, Tta};
use crate::data::{self, ChannelStats};
use crate::model::checkpoint::Preprocess;
use crate::model::ops::resize_bilinear;
use crate::model::SegModel;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Resize to a square side, predict, resize back.
    Resize(u32),
    /// Predict at native resolution (after resizing by `zoom`, `data.zoom`, when it is not 1:
    /// the probabilities are resized back); `tile` = 0: the whole image at once, else tiles
    /// of that side of the zoomed image.
    Native { tile: u32, overlap: u32, zoom: f32 },
}

pub struct Predictor<'a> {
    pub model: &'a SegModel,
    pub normalize: Normalize,
    pub mode: Mode,
    pub tta: Tta,
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
        let y = self.model.infer(&self.pad_to_stride(x)?)?;
        Ok(y.narrow(2, 0, h)?.narrow(3, 0, w)?)
    }

    /// Logits [1, C, H, W] of `img` whole, without TTA, at `img`'s own resolution: for images
    /// already at the size the model works at (training-time validation), zoomed first and
    /// resized back in native mode with a `zoom`.
    pub fn logits(&self, img: &RgbImage) -> Result<Tensor> {
        let zoom = match self.mode {
            Mode::Native { zoom, .. } => zoom,
            Mode::Resize(_) => 1.0,
        };
        self.at_zoom(img, zoom, |x, _| self.logits_at(x))
    }

    /// `f`'s [1, C, h, w] result for `img` zoomed by `zoom` (prepared, as a normalised tensor,
    /// with its zoomed size), resized back to `img`'s own size where the zoom changed it.
    fn at_zoom(
        &self,
        img: &RgbImage,
        zoom: f32,
        f: impl FnOnce(&Tensor, (u32, u32)) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let zoomed = zoom_image(img, zoom);
        let (img_in, (w, h)) = (zoomed.as_ref().unwrap_or(img), img.dimensions());
        let (prepared, stats) = data::prepare(img_in, self.normalize);
        let x = image_tensor(&prepared, &stats, self.model.device())?;
        let y = f(&x, img_in.dimensions())?;
        match zoomed {
            Some(_) => Ok(resize_bilinear(&y, h as usize, w as usize)?),
            None => Ok(y),
        }
    }

    /// `x` [N, C, H, W] reflect-padded at the bottom and right to multiples of the model's
    /// stride (unchanged when it already is).
    fn pad_to_stride(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let s = self.model.stride();
        let (ph, pw) = (h.div_ceil(s) * s - h, w.div_ceil(s) * s - w);
        if ph > 0 || pw > 0 {
            reflect_pad(x, ph, pw)
        } else {
            Ok(x.clone())
        }
    }

    /// Vessel probability [1, 1, H, W] for the normalised input tensor [1, 3, H, W], with TTA.
    ///
    /// As in the reference, the input is padded to the stride *before* it is flipped or
    /// transposed, so that every view sees the same pooling grid as the plain one (and tiles,
    /// whose starts are multiples of the stride, see the same grid as the whole image). Each
    /// view's probabilities are mapped back before they are averaged.
    fn probs_tensor(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let xp = self.pad_to_stride(x)?;
        let views = self.tta.views();
        let mut sum: Option<Tensor> = None;
        for &view in views {
            let v = map_view(&xp, view, false)?;
            let p = map_view(&vessel_prob(&self.model.infer(&v)?)?, view, true)?;
            sum = Some(match sum {
                None => p,
                Some(s) => (s + p)?,
            });
        }
        let mut p = sum.context("TTA has at least the identity view")?;
        if views.len() > 1 {
            // 1/2 and 1/8 are exact in binary.
            p = p.affine(1.0 / views.len() as f64, 0.0)?;
        }
        Ok(p.narrow(2, 0, h)?.narrow(3, 0, w)?)
    }

    /// Vessel probability of every pixel of `img`, at `img`'s own resolution (row-major).
    pub fn probs(&self, img: &RgbImage) -> Result<Vec<f32>> {
        let device = self.model.device();
        let (w, h) = img.dimensions();
        let p = match self.mode {
            Mode::Resize(size) => {
                // Enhanced and normalised at the model's size, as training sees its resized
                // images.
                let small = data::resize_rgb(img, size, size);
                let (small, stats) = data::prepare(&small, self.normalize);
                let x = image_tensor(&small, &stats, device)?;
                let p = self.probs_tensor(&x)?; // [1, 1, size, size]
                resize_bilinear(&p, h as usize, w as usize)?
            }
            Mode::Native {
                tile,
                overlap,
                zoom,
            } => self.at_zoom(img, zoom, |x, (zw, zh)| {
                if tile == 0 || (zw <= tile && zh <= tile) {
                    self.probs_tensor(x)
                } else {
                    self.tiled(x, tile as usize, overlap as usize)
                }
            })?,
        };
        Ok(p.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
    }

    /// Predict in windows of about `tile`×`tile` overlapping by at least `overlap`; every
    /// pixel takes its value from the one window that owns it, cut in the middle of each
    /// overlap (the overlap-tile strategy: each window's outer `overlap / 2` band, where the
    /// network saw zero padding instead of the neighbouring pixels, is discarded).
    ///
    /// Window starts are multiples of the model's stride, so every window sees the pooling
    /// grid of the whole image; the last window along an axis is stretched (by less than the
    /// stride) to end at the image's edge. Hence, in eval mode (BatchNorm on running
    /// statistics: every output pixel depends only on its receptive field), the result equals
    /// the untiled prediction wherever `overlap / 2` covers the network's context; only
    /// smaller overlaps change pixels, within `context - overlap / 2` of the cuts.
    fn tiled(&self, x: &Tensor, tile: usize, overlap: usize) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let s = self.model.stride();
        let ys = tile_spans(h, tile, overlap, s);
        let xs = tile_spans(w, tile, overlap, s);
        let mut out = vec![0f32; h * w];
        for &(y0, y1, oy0, oy1) in &ys {
            for &(x0, x1, ox0, ox1) in &xs {
                let (th, tw) = (y1 - y0, x1 - x0);
                let crop = x.narrow(2, y0, th)?.narrow(3, x0, tw)?.contiguous()?;
                let p = self
                    .probs_tensor(&crop)?
                    .flatten_all()?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?;
                for yy in oy0..oy1 {
                    let src = &p[(yy - y0) * tw + (ox0 - x0)..(yy - y0) * tw + (ox1 - x0)];
                    out[yy * w + ox0..yy * w + ox1].copy_from_slice(src);
                }
            }
        }
        Ok(Tensor::from_vec(out, (1, 1, h, w), x.device())?)
    }
}

/// The windows of the tiled prediction along one axis of length `len`: `(start, end,
/// own_start, own_end)`, where `[start, end)` is the window fed to the network and
/// `[own_start, own_end)` the pixels it supplies (consecutive owned ranges partition
/// `0..len`). Starts are multiples of `stride`, step `tile - overlap` rounded down to the
/// stride; the last window ends at `len` and may exceed `tile` by less than `stride`.
fn tile_spans(
    len: usize,
    tile: usize,
    overlap: usize,
    stride: usize,
) -> Vec<(usize, usize, usize, usize)> {
    if len <= tile {
        return vec![(0, len, 0, len)];
    }
    let step = ((tile.saturating_sub(overlap)) / stride * stride).max(stride);
    let last = (len - tile) / stride * stride;
    let mut starts: Vec<usize> = (0..).map(|i| i * step).take_while(|&s| s < last).collect();
    starts.push(last);
    let ends: Vec<usize> = starts
        .iter()
        .enumerate()
        .map(|(i, &s)| if i + 1 == starts.len() { len } else { s + tile })
        .collect();
    // Cut each overlap [next start, this end) in its middle.
    let cuts: Vec<usize> = (0..starts.len() - 1)
        .map(|i| (starts[i + 1] + ends[i]) / 2)
        .collect();
    (0..starts.len())
        .map(|i| {
            let own0 = if i == 0 { 0 } else { cuts[i - 1] };
            let own1 = if i + 1 == starts.len() { len } else { cuts[i] };
            (starts[i], ends[i], own0, own1)
        })
        .collect()
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

/// A TTA view (transpose H and W, flip H, flip W) of `x` [N, C, H, W], or with `inverse` the
/// map back from the view (the flips commute, so only the transpose moves).
fn map_view(x: &Tensor, (transpose, fh, fw): (bool, bool, bool), inverse: bool) -> Result<Tensor> {
    let mut v = x.clone();
    if transpose && !inverse {
        v = v.transpose(2, 3)?.contiguous()?;
    }
    if fh {
        v = flip(&v, 2)?;
    }
    if fw {
        v = flip(&v, 3)?;
    }
    if transpose && inverse {
        v = v.transpose(2, 3)?.contiguous()?;
    }
    Ok(v)
}

/// Mirror along dimension `dim`.
fn flip(x: &Tensor, dim: usize) -> Result<Tensor> {
    let n = x.dim(dim)?;
    let idx: Vec<u32> = (0..n as u32).rev().collect();
    let idx = Tensor::new(idx.as_slice(), x.device())?;
    Ok(x.index_select(&idx, dim)?)
}

/// Reflect-pad the bottom and right edges (numpy's `mode="reflect"`: the edge pixel is not
/// repeated).
pub fn reflect_pad(x: &Tensor, ph: usize, pw: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    anyhow::ensure!(ph < h && pw < w, "image too small to pad by reflection");
    // index_select needs a contiguous input (tiles are narrowed views).
    let mut y = x.contiguous()?;
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
pub fn mode_for(pre: &Preprocess, tile: u32, overlap: u32) -> Mode {
    if pre.crop > 0 {
        Mode::Native {
            tile,
            overlap,
            zoom: pre.zoom.unwrap_or(1.0),
        }
    } else {
        Mode::Resize(pre.imgsz)
    }
}

/// `img` resized by `zoom` (`data.zoom`), or `None` when that leaves its size as it is.
pub fn zoom_image(img: &RgbImage, zoom: f32) -> Option<RgbImage> {
    let (w, h) = img.dimensions();
    let (zw, zh) = data::zoomed_size(w, h, zoom);
    ((zw, zh) != (w, h)).then(|| data::resize_rgb(img, zw, zh))
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
        let back = flip(&flip(&x, 3).unwrap(), 3).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let f = flip(&x, 3)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(&f[..4], &[3.0, 2.0, 1.0, 0.0]);
    }

    /// A tiny U-Net (2 levels, stride 2) whose BatchNorm running statistics have moved off
    /// their initial values, so that eval-mode prediction exercises them.
    fn tiny_unet() -> SegModel {
        use crate::config::schema::{Arch, ModelConfig};
        let cfg = ModelConfig {
            arch: Arch::Unet,
            widths: vec![4, 8],
            ..ModelConfig::default()
        };
        let model = SegModel::new(&cfg, &Device::Cpu, 3).unwrap();
        let x = Tensor::randn(0.5f32, 2.0, (2, 3, 16, 16), &Device::Cpu).unwrap();
        model.forward(&x, true).unwrap();
        model
    }

    fn noise_image(w: u32, h: u32) -> RgbImage {
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(11);
        RgbImage::from_fn(w, h, |_, _| {
            image::Rgb([r.random(), r.random(), r.random()])
        })
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn tiling_with_enough_overlap_reproduces_the_whole_image() {
        let model = tiny_unet();
        // Not multiples of the stride: the edge windows are padded like the whole image.
        let img = noise_image(70, 53);
        for tta in [Tta::None, Tta::Flip, Tta::Dihedral] {
            let pred = |mode| {
                Predictor {
                    model: &model,
                    normalize: Normalize::PerImage,
                    mode,
                    tta,
                }
                .probs(&img)
                .unwrap()
            };
            let whole = pred(Mode::Native {
                tile: 0,
                overlap: 0,
                zoom: 1.0,
            });
            assert_eq!(whole.len(), 70 * 53);
            // The tiny net's context is about 9 px; a 24 px overlap keeps 12 px on each side.
            let tiled = pred(Mode::Native {
                tile: 32,
                overlap: 24,
                zoom: 1.0,
            });
            let d = max_diff(&whole, &tiled);
            assert!(d < 1e-5, "tta {tta:?}: tiled differs from whole by {d}");
            // A small overlap leaves zero-padding effects at the cuts: the comparison above
            // is able to fail.
            let thin = pred(Mode::Native {
                tile: 32,
                overlap: 2,
                zoom: 1.0,
            });
            let d = max_diff(&whole, &thin);
            assert!(
                d > 1e-4,
                "tta {tta:?}: a 2 px overlap should show the tile borders ({d})"
            );
        }
    }

    #[test]
    fn dihedral_tta_is_equivariant_under_rotation() {
        // Averaging over the 8 symmetries of the square makes the prediction of a rotated
        // image the rotated prediction, which a single pass or the flip pair does not give:
        // a wrong inverse mapping of any view breaks the equality.
        use image::{imageops, ImageBuffer, Luma};
        let model = tiny_unet();
        let img = noise_image(32, 48); // multiples of the stride: no padding
        let rot = imageops::rotate90(&img);
        let probs = |im: &RgbImage, tta| {
            Predictor {
                model: &model,
                normalize: Normalize::PerImage,
                mode: Mode::Native {
                    tile: 0,
                    overlap: 0,
                    zoom: 1.0,
                },
                tta,
            }
            .probs(im)
            .unwrap()
        };
        for (tta, equivariant) in [
            (Tta::Dihedral, true),
            (Tta::Flip, false),
            (Tta::None, false),
        ] {
            let p: ImageBuffer<Luma<f32>, Vec<f32>> =
                ImageBuffer::from_raw(32, 48, probs(&img, tta)).unwrap();
            let d = max_diff(imageops::rotate90(&p).as_raw(), &probs(&rot, tta));
            if equivariant {
                assert!(d < 1e-5, "{tta:?}: rotated prediction differs by {d}");
            } else {
                assert!(d > 1e-4, "{tta:?}: unexpectedly rotation-equivariant ({d})");
            }
        }
    }

    #[test]
    fn native_prediction_at_drive_size_matches_its_default_tiling() {
        // DRIVE's 565×584 is no multiple of the stride: whole-image prediction pads by
        // reflection and crops back; 256 px tiles with the default 64 px overlap agree.
        let model = tiny_unet();
        let img = noise_image(565, 584);
        let pred = |mode| {
            Predictor {
                model: &model,
                normalize: Normalize::PerImage,
                mode,
                tta: Tta::None,
            }
            .probs(&img)
            .unwrap()
        };
        let whole = pred(Mode::Native {
            tile: 0,
            overlap: 0,
            zoom: 1.0,
        });
        assert_eq!(whole.len(), 565 * 584);
        assert!(whole.iter().all(|p| (0.0..=1.0).contains(p)));
        let tiled = pred(Mode::Native {
            tile: 256,
            overlap: 64,
            zoom: 1.0,
        });
        let d = max_diff(&whole, &tiled);
        assert!(d < 1e-5, "tiled differs from whole by {d}");

        // Tiling did happen: without overlap, each window's edge (where it saw zero padding
        // instead of its neighbours) shows, and only near the cuts between windows.
        let s = model.stride();
        let cuts = |len| -> Vec<usize> {
            let spans = tile_spans(len, 256, 0, s);
            spans[1..].iter().map(|sp| sp.2).collect()
        };
        let (xcuts, ycuts) = (cuts(565), cuts(584));
        assert_eq!((xcuts.len(), ycuts.len()), (2, 2), "3×3 windows");
        let seamed = pred(Mode::Native {
            tile: 256,
            overlap: 0,
            zoom: 1.0,
        });
        let near = |v: usize, cuts: &[usize]| cuts.iter().any(|&c| v.abs_diff(c) <= 16);
        let mut changed = 0;
        for (i, (a, b)) in whole.iter().zip(&seamed).enumerate() {
            if (a - b).abs() > 1e-5 {
                let (x, y) = (i % 565, i / 565);
                assert!(
                    near(x, &xcuts) || near(y, &ycuts),
                    "({x},{y}) changed, away from the cuts {xcuts:?} × {ycuts:?}"
                );
                changed += 1;
            }
        }
        assert!(changed > 1000, "only {changed} pixels show the seams");
    }

    #[test]
    fn tile_spans_partition_the_axis_on_the_stride_grid() {
        for (len, tile, overlap, stride) in [
            (565, 128, 32, 8),
            (584, 256, 64, 8),
            (70, 32, 24, 2),
            (100, 64, 0, 8),
            (64, 64, 16, 8),
        ] {
            let spans = tile_spans(len, tile, overlap, stride);
            assert_eq!(spans[0].2, 0);
            assert_eq!(spans.last().unwrap().1, len);
            assert_eq!(spans.last().unwrap().3, len);
            for (i, &(s, e, o0, o1)) in spans.iter().enumerate() {
                assert_eq!(s % stride, 0, "start {s} off the stride grid");
                assert!(s <= o0 && o0 < o1 && o1 <= e && e <= len);
                assert!(e - s < tile + stride);
                if i > 0 {
                    assert_eq!(o0, spans[i - 1].3, "owned ranges must be contiguous");
                    assert!(
                        o0 - s >= overlap / 2,
                        "left margin {} < {}",
                        o0 - s,
                        overlap / 2
                    );
                }
                if i + 1 < spans.len() {
                    assert!(
                        e - o1 >= overlap / 2,
                        "right margin {} < {}",
                        e - o1,
                        overlap / 2
                    );
                }
            }
        }
    }

    #[test]
    fn clahe_predicts_on_the_equalised_image() {
        // A dim, low-contrast image that CLAHE changes a lot: predicting with `clahe` must be
        // predicting on the equalised image with per-image statistics, nothing else.
        let model = tiny_unet();
        let img = RgbImage::from_fn(40, 36, |x, y| {
            let v = (60 + x / 2 + (y * 7 % 11)) as u8;
            image::Rgb([v, v / 2 + 10, v / 3])
        });
        let probs = |im: &RgbImage, normalize| {
            Predictor {
                model: &model,
                normalize,
                mode: Mode::Native {
                    tile: 0,
                    overlap: 0,
                    zoom: 1.0,
                },
                tta: Tta::None,
            }
            .probs(im)
            .unwrap()
        };
        let equalised = data::enhance(&img, Normalize::Clahe).into_owned();
        assert_ne!(equalised, img);
        let clahe = probs(&img, Normalize::Clahe);
        let d = max_diff(&clahe, &probs(&equalised, Normalize::PerImage));
        assert_eq!(
            d, 0.0,
            "clahe differs from per_image on the equalised image by {d}"
        );
        let d = max_diff(&clahe, &probs(&img, Normalize::PerImage));
        assert!(d > 1e-4, "CLAHE should change the prediction ({d})");
    }

    #[test]
    fn zoom_predicts_on_the_resized_image_and_answers_at_native_resolution() {
        // `data.zoom`: the image is resized by the factor, enhanced and normalised at that size,
        // predicted, and the probabilities come back at the image's own size, bilinearly.
        let model = tiny_unet();
        let img = RgbImage::from_fn(30, 26, |x, y| {
            let v = (40 + 5 * x + (y * 13 % 17)) as u8;
            image::Rgb([v, v / 2 + 30, 200 - v / 3])
        });
        let pred = |zoom| Predictor {
            model: &model,
            normalize: Normalize::Clahe,
            mode: Mode::Native {
                tile: 0,
                overlap: 0,
                zoom,
            },
            tta: Tta::Dihedral,
        };
        let zoomed = pred(1.5).probs(&img).unwrap();
        assert_eq!(zoomed.len(), 30 * 26);
        let big = data::resize_rgb(&img, 45, 39);
        let at_size = pred(1.0).probs(&big).unwrap();
        let t = Tensor::from_vec(at_size, (1, 1, 39, 45), &Device::Cpu).unwrap();
        let back: Vec<f32> = resize_bilinear(&t, 26, 30)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let d = max_diff(&zoomed, &back);
        assert_eq!(
            d, 0.0,
            "zoom 1.5 differs from predicting the resized image by {d}"
        );
        let d = max_diff(&zoomed, &pred(1.0).probs(&img).unwrap());
        assert!(d > 1e-4, "the zoom should change the prediction ({d})");
        // Validation's logits come back at the image's own size too.
        let logits = pred(1.5).logits(&img).unwrap();
        assert_eq!(logits.dims4().unwrap(), (1, 2, 26, 30));
        // A zoom that leaves the size as it is changes nothing.
        let same = pred(1.01).probs(&img).unwrap();
        assert_eq!(max_diff(&same, &pred(1.0).probs(&img).unwrap()), 0.0);
    }
}
