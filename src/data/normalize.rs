//! Conversion of an 8-bit RGB image to a normalised `f32` CHW buffer, ready for a tensor
//! of shape `(3, height, width)`.

use std::borrow::Cow;

use image::RgbImage;

use super::clahe;
use crate::config::schema::Normalize;

/// ImageNet channel means on /255 values (torchvision's convention).
const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations on /255 values.
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// Added to a per-image standard deviation, as `unet_ref.py` does.
const PER_IMAGE_EPS: f32 = 1e-6;

/// Per-channel statistics a buffer is normalised with: `out = (v / 255 − mean) / std`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChannelStats {
    pub mean: [f32; 3],
    /// Divisor per channel (for per-image statistics this already includes the `1e-6`).
    pub std: [f32; 3],
}

impl ChannelStats {
    /// ImageNet mean/std (`torch_ref.py`).
    pub fn imagenet() -> Self {
        Self {
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }

    /// The image's own per-channel mean and population standard deviation (+1e-6) over all
    /// pixels, on /255 values (`unet_ref.py`: `(img - img.mean((0,1))) / (img.std((0,1)) + 1e-6)`).
    /// For crop training compute this on the whole image, then normalise crops with
    /// [`to_chw_f32_with`], as the reference does.
    pub fn of_image(img: &RgbImage) -> Self {
        let n = (img.width() as f64 * img.height() as f64).max(1.0);
        let (mut sum, mut sq) = ([0f64; 3], [0f64; 3]);
        for p in img.pixels() {
            for c in 0..3 {
                let v = p.0[c] as f64 / 255.0;
                sum[c] += v;
                sq[c] += v * v;
            }
        }
        let mut mean = [0f32; 3];
        let mut std = [0f32; 3];
        for c in 0..3 {
            let m = sum[c] / n;
            mean[c] = m as f32;
            std[c] = ((sq[c] / n - m * m).max(0.0).sqrt()) as f32 + PER_IMAGE_EPS;
        }
        Self { mean, std }
    }

    /// The statistics `normalize` calls for on `img`, which must already be [`enhance`]d.
    pub fn for_image(normalize: Normalize, img: &RgbImage) -> Self {
        match normalize {
            Normalize::Imagenet => Self::imagenet(),
            Normalize::PerImage | Normalize::Clahe => Self::of_image(img),
        }
    }
}

/// The whole-image transform `normalize` applies before the affine normalisation: CLAHE of
/// each channel for [`Normalize::Clahe`], nothing (a borrow) otherwise. It must see the whole
/// image: crops are taken from its output, never the other way round.
pub fn enhance(img: &RgbImage, normalize: Normalize) -> Cow<'_, RgbImage> {
    match normalize {
        Normalize::Imagenet | Normalize::PerImage => Cow::Borrowed(img),
        Normalize::Clahe => {
            let (w, h) = (img.width() as usize, img.height() as usize);
            let mut out = img.clone();
            for c in 0..3 {
                let plane: Vec<u8> = img.pixels().map(|p| p.0[c]).collect();
                let eq = clahe::clahe(
                    &plane,
                    w,
                    h,
                    (clahe::TILES, clahe::TILES),
                    clahe::CLIP_LIMIT,
                );
                for (p, v) in out.pixels_mut().zip(eq) {
                    p.0[c] = v;
                }
            }
            Cow::Owned(out)
        }
    }
}

/// What every whole-image input goes through: [`enhance`], then the statistics of the
/// enhanced image. Normalise with [`to_chw_f32_with`] on the returned image (or crops of it).
pub fn prepare(img: &RgbImage, normalize: Normalize) -> (Cow<'_, RgbImage>, ChannelStats) {
    let img = enhance(img, normalize);
    let stats = ChannelStats::for_image(normalize, &img);
    (img, stats)
}

/// Normalises `img` per `normalize` into a CHW `f32` buffer of `3 × height × width` values
/// (ImageNet: `(v/255 − mean) / std`; per-image: the image's own statistics; CLAHE: those of
/// the equalised image).
pub fn to_chw_f32(img: &RgbImage, normalize: Normalize) -> Vec<f32> {
    let (img, stats) = prepare(img, normalize);
    to_chw_f32_with(&img, &stats)
}

/// Normalises `img` into a CHW `f32` buffer with the given statistics.
pub fn to_chw_f32_with(img: &RgbImage, stats: &ChannelStats) -> Vec<f32> {
    let plane = img.width() as usize * img.height() as usize;
    let mut out = vec![0f32; 3 * plane];
    // Per channel, a lookup table of the 256 possible values.
    let lut: Vec<[f32; 256]> = (0..3)
        .map(|c| {
            let mut t = [0f32; 256];
            for (v, slot) in t.iter_mut().enumerate() {
                *slot = (v as f32 / 255.0 - stats.mean[c]) / stats.std[c];
            }
            t
        })
        .collect();
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (i, p) in img.pixels().enumerate() {
        r[i] = lut[0][p.0[0] as usize];
        g[i] = lut[1][p.0[1] as usize];
        b[i] = lut[2][p.0[2] as usize];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imagenet_values_and_layout() {
        let mut img = RgbImage::new(2, 1);
        img.put_pixel(0, 0, image::Rgb([255, 0, 128]));
        img.put_pixel(1, 0, image::Rgb([0, 255, 0]));
        let v = to_chw_f32(&img, Normalize::Imagenet);
        assert_eq!(v.len(), 6);
        let close = |a: f32, b: f32| (a - b).abs() < 1e-5;
        assert!(close(v[0], (1.0 - 0.485) / 0.229)); // R of pixel 0
        assert!(close(v[1], (0.0 - 0.485) / 0.229)); // R of pixel 1
        assert!(close(v[3], (1.0 - 0.456) / 0.224)); // G of pixel 1
        assert!(close(v[4], (128.0 / 255.0 - 0.406) / 0.225)); // B of pixel 0
    }

    #[test]
    fn per_image_is_zero_mean_unit_variance() {
        let img = RgbImage::from_fn(5, 4, |x, y| {
            image::Rgb([(x * 50) as u8, (y * 60) as u8, 77])
        });
        let v = to_chw_f32(&img, Normalize::PerImage);
        for c in 0..2 {
            let ch = &v[c * 20..(c + 1) * 20];
            let mean = ch.iter().sum::<f32>() / 20.0;
            let var = ch.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / 20.0;
            assert!(mean.abs() < 1e-5, "{mean}");
            assert!((var - 1.0).abs() < 1e-3, "{var}");
        }
        // a constant channel becomes 0, not NaN
        assert!(v[40..].iter().all(|&x| x == 0.0));
    }
}
