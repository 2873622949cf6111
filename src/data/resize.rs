//! Resizing with PIL's semantics: `resize(..., BILINEAR)` for photographs and
//! `resize(..., NEAREST)` for masks.
//!
//! PIL's bilinear resize is a separable convolution with a triangle kernel whose support
//! widens with the downscaling factor (so it antialiases), in 22-bit fixed point, horizontal
//! pass first into an 8-bit intermediate. We follow the same steps, so results match PIL's
//! to the byte in the cases we checked.

use image::{GrayImage, RgbImage};

use super::Sample;

/// Fixed-point precision of PIL's 8-bit resampling (`PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output index: first input index and fixed-point weights (PIL's `precompute_coeffs`
/// with the bilinear filter, support 1).
fn coeffs(in_size: u32, out_size: u32) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let w: Vec<f64> = (xmin..xmax)
                .map(|x| {
                    let t = ((x as f64 - center + 0.5) / filterscale).abs();
                    if t < 1.0 {
                        1.0 - t
                    } else {
                        0.0
                    }
                })
                .collect();
            let total: f64 = w.iter().sum();
            let k = w
                .iter()
                .map(|&v| {
                    let v = if total != 0.0 { v / total } else { v };
                    let f = v * (1u64 << PRECISION_BITS) as f64;
                    if f < 0.0 {
                        (f - 0.5) as i32
                    } else {
                        (f + 0.5) as i32
                    }
                })
                .collect();
            (xmin, k)
        })
        .collect()
}

/// `Σ k·v` rounded and clipped to 8 bits, as PIL does.
fn apply(k: &[i32], values: impl Iterator<Item = u8>) -> u8 {
    let mut ss: i64 = 1 << (PRECISION_BITS - 1);
    for (&w, v) in k.iter().zip(values) {
        ss += i64::from(w) * i64::from(v);
    }
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes a `channels`-interleaved 8-bit buffer of `w`×`h` to `ow`×`oh` (bilinear, PIL).
fn resample(src: &[u8], w: u32, h: u32, ow: u32, oh: u32, channels: usize) -> Vec<u8> {
    let c = channels;
    // horizontal pass into an 8-bit intermediate of ow × h
    let horiz = if ow != w {
        let cx = coeffs(w, ow);
        let mut out = vec![0u8; ow as usize * h as usize * c];
        for y in 0..h as usize {
            let row = &src[y * w as usize * c..(y + 1) * w as usize * c];
            for (xx, (x0, k)) in cx.iter().enumerate() {
                for ch in 0..c {
                    out[(y * ow as usize + xx) * c + ch] =
                        apply(k, (0..k.len()).map(|i| row[(x0 + i) * c + ch]));
                }
            }
        }
        out
    } else {
        src.to_vec()
    };
    if oh == h {
        return horiz;
    }
    let cy = coeffs(h, oh);
    let stride = ow as usize * c;
    let mut out = vec![0u8; oh as usize * stride];
    for (yy, (y0, k)) in cy.iter().enumerate() {
        for i in 0..stride {
            out[yy * stride + i] = apply(k, (0..k.len()).map(|j| horiz[(y0 + j) * stride + i]));
        }
    }
    out
}

/// Bilinear resize of a photograph to `width`×`height` (PIL `Image.resize(size, BILINEAR)`).
pub fn resize_rgb(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let buf = resample(img.as_raw(), w, h, width, height, 3);
    RgbImage::from_raw(width, height, buf).expect("resample returns width×height×3 bytes")
}

/// Nearest-neighbour resize of a mask (PIL `Image.resize(size, NEAREST)`: output pixel
/// `x` reads input `floor((x + 0.5) · in/out)`), so values stay 0/1.
pub fn resize_mask(mask: &GrayImage, width: u32, height: u32) -> GrayImage {
    let (w, h) = mask.dimensions();
    let sx = w as f64 / width as f64;
    let sy = h as f64 / height as f64;
    let xs: Vec<u32> = (0..width)
        .map(|x| (((x as f64 + 0.5) * sx) as u32).min(w - 1))
        .collect();
    GrayImage::from_fn(width, height, |x, y| {
        let yi = (((y as f64 + 0.5) * sy) as u32).min(h - 1);
        *mask.get_pixel(xs[x as usize], yi)
    })
}

/// Resizes a sample: image bilinear, label and FOV nearest.
pub fn resize_sample(s: &Sample, width: u32, height: u32) -> Sample {
    Sample {
        id: s.id.clone(),
        image: resize_rgb(&s.image, width, height),
        label: s.label.as_ref().map(|l| resize_mask(l, width, height)),
        fov: resize_mask(&s.fov, width, height),
    }
}

/// The size of a `w`×`h` image zoomed by `zoom` (`data.zoom`): each side rounded to the
/// nearest pixel, at least 1.
pub fn zoomed_size(w: u32, h: u32, zoom: f32) -> (u32, u32) {
    let side = |n: u32| ((n as f64 * f64::from(zoom)).round() as u32).max(1);
    (side(w), side(h))
}

/// A 0/1 mask at another size, smoothly: the 0/255 mask resized bilinearly (PIL's filter, as
/// [`resize_rgb`] resizes the photograph) and thresholded at half, so a label's edges move with
/// the photograph's instead of snapping to nearest-neighbour's 1- and 2-pixel blocks.
pub fn resize_mask_smooth(mask: &GrayImage, width: u32, height: u32) -> GrayImage {
    let (w, h) = mask.dimensions();
    let scaled: Vec<u8> = mask
        .as_raw()
        .iter()
        .map(|&v| if v > 0 { 255 } else { 0 })
        .collect();
    let out = resample(&scaled, w, h, width, height, 1)
        .into_iter()
        .map(|v| u8::from(v > 127))
        .collect();
    GrayImage::from_raw(width, height, out).expect("resample returns width×height bytes")
}

/// A native-resolution sample zoomed by `zoom` (`data.zoom`): the photograph bilinear, the
/// label and the FOV by [`resize_mask_smooth`].
pub fn zoom_sample(s: &Sample, zoom: f32) -> Sample {
    let (w, h) = s.image.dimensions();
    let (zw, zh) = zoomed_size(w, h, zoom);
    Sample {
        id: s.id.clone(),
        image: resize_rgb(&s.image, zw, zh),
        label: s.label.as_ref().map(|l| resize_mask_smooth(l, zw, zh)),
        fov: resize_mask_smooth(&s.fov, zw, zh),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 7×5 RGB test pattern: channel values from a simple formula.
    fn pattern() -> RgbImage {
        RgbImage::from_fn(7, 5, |x, y| {
            image::Rgb([
                (x * 37 + y * 11) as u8,
                (x * x * 5 + y * 40) as u8,
                ((x + y) % 2 * 200 + 20) as u8,
            ])
        })
    }

    /// Expected bytes computed with PIL 11 (`Image.fromarray(a).resize((w, h), BILINEAR)`).
    #[test]
    fn bilinear_matches_pil() {
        let img = pattern();
        let down = resize_rgb(&img, 3, 2);
        assert_eq!(down.as_raw(), &PIL_DOWN_3X2);
        let up = resize_rgb(&img, 9, 6);
        assert_eq!(up.as_raw()[..27], PIL_UP_9X6_ROW0);
    }

    #[test]
    fn nearest_mask_matches_pil() {
        // PIL NEAREST reads x = floor((i + 0.5) * 7/3) = 1, 3, 5 and y = floor((j + 0.5) * 5/2) = 1, 3
        let m = GrayImage::from_fn(7, 5, |x, y| image::Luma([(x + 10 * y) as u8]));
        assert_eq!(resize_mask(&m, 3, 2).as_raw(), &[11, 13, 15, 31, 33, 35]);
        let up = resize_mask(&m, 14, 10);
        assert_eq!(up.get_pixel(13, 9).0, [46]);
        assert_eq!(up.get_pixel(2, 1).0, [1]);
    }

    #[test]
    fn identity_size_is_a_copy() {
        let img = pattern();
        assert_eq!(resize_rgb(&img, 7, 5), img);
    }

    /// A one-pixel diagonal line zoomed by 1.5 stays one 8-connected line from corner to
    /// corner, within a pixel of the diagonal, with 1.5–3 times the pixels (PIL: 64 for 40).
    #[test]
    fn smooth_mask_zoom_keeps_a_thin_line_connected() {
        let n = 40u32;
        let m = GrayImage::from_fn(n, n, |x, y| image::Luma([u8::from(x == y)]));
        let (zw, zh) = zoomed_size(n, n, 1.5);
        assert_eq!((zw, zh), (60, 60));
        let z = resize_mask_smooth(&m, zw, zh);
        assert!(z.as_raw().iter().all(|&v| v <= 1), "values stay 0/1");
        let on: Vec<(u32, u32)> = z
            .enumerate_pixels()
            .filter(|p| p.2 .0[0] == 1)
            .map(|p| (p.0, p.1))
            .collect();
        let count = on.len() as f64;
        assert!(
            (60.0..=120.0).contains(&count),
            "{count} pixels on for a 40-pixel line"
        );
        // Every row between the ends has a pixel on, each within one pixel of the diagonal,
        // and consecutive rows touch (8-connected).
        let mut prev: Vec<u32> = Vec::new();
        for y in 1..zh - 1 {
            let xs: Vec<u32> = on.iter().filter(|p| p.1 == y).map(|p| p.0).collect();
            assert!(!xs.is_empty(), "row {y} of the zoomed line is empty");
            assert!(xs.iter().all(|&x| x.abs_diff(y) <= 1), "row {y}: {xs:?}");
            let touches = xs.iter().any(|&x| prev.iter().any(|&p| x.abs_diff(p) <= 1));
            assert!(
                prev.is_empty() || touches,
                "gap at row {y}: {prev:?} then {xs:?}"
            );
            prev = xs;
        }
        // Zooming by 1 changes nothing.
        assert_eq!(resize_mask_smooth(&m, n, n), m);
    }

    const PIL_DOWN_3X2: [u8; 18] = [
        43, 46, 119, 122, 90, 121, 201, 150, 119, 65, 126, 119, 144, 165, 121, 194, 133, 119,
    ];
    const PIL_UP_9X6_ROW0: [u8; 27] = [
        0, 0, 20, 25, 3, 153, 53, 12, 131, 82, 26, 64, 111, 45, 220, 140, 72, 64, 169, 105, 131,
        197, 143, 153, 222, 180, 20,
    ];
}
