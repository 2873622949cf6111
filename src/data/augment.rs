//! Train-time augmentation, applied jointly to a sample's image, label and field of view.
//!
//! Works on the 8-bit images of a [`Sample`] (see the module docs of `data`): flips and
//! 90° turns move bytes exactly; a free rotation and a scale are fused into one inverse
//! affine warp sampled once — bilinear for the image, nearest for label and FOV, zero
//! outside the source — with the conventions of PIL's `Image.rotate` (pixel centres at
//! `+0.5`, rotation about `(w/2, h/2)`, bilinear value truncated to 8 bits), so a pure
//! rotation matches PIL's output byte for byte. Photometric jitter touches the image only.

use image::imageops;
use image::{GrayImage, RgbImage};
use rand::rngs::StdRng;
use rand::Rng;

use super::Sample;
use crate::config::schema::AugmentConfig;

/// A seeded random augmentation recipe (see [`AugmentConfig`] for each knob).
#[derive(Debug, Clone, PartialEq)]
pub struct Augmenter {
    cfg: AugmentConfig,
}

/// Inverse affine map of output pixel centres to source coordinates about `(cx, cy)`:
/// `src = c + [[a, b], [d, e]] · (p − c)`.
#[derive(Debug, Clone, Copy)]
struct Warp {
    a: f64,
    b: f64,
    d: f64,
    e: f64,
}

impl Warp {
    /// PIL `rotate(angle_deg)` (counter-clockwise on screen) combined with a zoom by `scale`
    /// about the centre (a zoom > 1 enlarges, then the centre crop keeps the size).
    fn new(angle_deg: f64, scale: f64) -> Self {
        let phi = -angle_deg.to_radians();
        let (s, c) = phi.sin_cos();
        Self {
            a: c / scale,
            b: s / scale,
            d: -s / scale,
            e: c / scale,
        }
    }

    /// Source coordinates of output pixel `(x, y)` in a `w`×`h` image.
    fn source(&self, x: u32, y: u32, w: u32, h: u32) -> (f64, f64) {
        let (cx, cy) = (w as f64 / 2.0, h as f64 / 2.0);
        let (dx, dy) = (x as f64 + 0.5 - cx, y as f64 + 0.5 - cy);
        (
            self.a * dx + self.b * dy + cx,
            self.d * dx + self.e * dy + cy,
        )
    }

    /// Bilinear warp of an RGB image (PIL's `bilinear_filter` semantics, zero fill).
    fn rgb(&self, img: &RgbImage) -> RgbImage {
        let (w, h) = img.dimensions();
        let clamp_x = |v: i64| v.clamp(0, w as i64 - 1) as u32;
        let clamp_y = |v: i64| v.clamp(0, h as i64 - 1) as u32;
        RgbImage::from_fn(w, h, |x, y| {
            let (sx, sy) = self.source(x, y, w, h);
            if !(0.0..w as f64).contains(&sx) || !(0.0..h as f64).contains(&sy) {
                return image::Rgb([0, 0, 0]);
            }
            let (xi, yi) = (sx - 0.5, sy - 0.5);
            let (x0, y0) = (xi.floor(), yi.floor());
            let (fx, fy) = (xi - x0, yi - y0);
            let (x0, y0) = (x0 as i64, y0 as i64);
            let (xa, xb, ya, yb) = (clamp_x(x0), clamp_x(x0 + 1), clamp_y(y0), clamp_y(y0 + 1));
            let (p00, p01) = (img.get_pixel(xa, ya).0, img.get_pixel(xb, ya).0);
            let (p10, p11) = (img.get_pixel(xa, yb).0, img.get_pixel(xb, yb).0);
            let mut out = [0u8; 3];
            for c in 0..3 {
                let top = p00[c] as f64 + fx * (p01[c] as f64 - p00[c] as f64);
                let bottom = p10[c] as f64 + fx * (p11[c] as f64 - p10[c] as f64);
                out[c] = (top + fy * (bottom - top)) as u8;
            }
            image::Rgb(out)
        })
    }

    /// Nearest-neighbour warp of a mask (zero fill).
    fn mask(&self, m: &GrayImage) -> GrayImage {
        let (w, h) = m.dimensions();
        GrayImage::from_fn(w, h, |x, y| {
            let (sx, sy) = self.source(x, y, w, h);
            if !(0.0..w as f64).contains(&sx) || !(0.0..h as f64).contains(&sy) {
                return image::Luma([0]);
            }
            *m.get_pixel(sx as u32, sy as u32)
        })
    }
}

/// Applies the same pixel-moving transform to image, label and FOV.
fn map_all(
    s: Sample,
    rgb: impl Fn(&RgbImage) -> RgbImage,
    mask: impl Fn(&GrayImage) -> GrayImage,
) -> Sample {
    Sample {
        id: s.id,
        image: rgb(&s.image),
        label: s.label.as_ref().map(&mask),
        fov: mask(&s.fov),
    }
}

impl Augmenter {
    pub fn new(cfg: &AugmentConfig) -> Self {
        Self { cfg: cfg.clone() }
    }

    /// The side of the window to cut before [`apply`](Self::apply) so that the centred
    /// `crop`×`crop` part of its result ([`centre_crop`]) holds only source pixels, whatever
    /// angle and zoom `apply` draws: without it, a free rotation or a zoom out of a crop fills
    /// its corners with zeros (black image, background label) that the image does not have.
    /// A rotation by θ needs `crop·(|cos θ| + |sin θ|)` (at most `crop·√2`, at 45°), a zoom by
    /// `s < 1` needs `crop / s`; two more pixels cover the bilinear footprint, and the side
    /// keeps the parity of `crop` so the centre crop is exact. `crop` itself when neither
    /// applies, so recipes without them cut and draw exactly as before.
    pub fn window_for(&self, crop: u32) -> u32 {
        let zoom = f64::from(self.cfg.scale_min).min(1.0);
        if self.cfg.rotate <= 0.0 && zoom >= 1.0 {
            return crop;
        }
        let turn = if self.cfg.rotate > 0.0 {
            let r = f64::from(self.cfg.rotate.min(45.0)).to_radians();
            r.cos() + r.sin()
        } else {
            1.0
        };
        let side = (f64::from(crop) * turn / zoom).ceil() as u32 + 2;
        side + (side - crop) % 2
    }

    /// Returns a randomly augmented copy of `sample`, in this order: horizontal flip (p 0.5),
    /// vertical flip (p 0.5), a turn by k·90° (k uniform in 0..4; odd k swaps width and
    /// height, so use it on square inputs when batching), a rotation by a uniform angle in
    /// ±`rotate`° (p 0.5) fused with a zoom uniform in [`scale_min`, `scale_max`] and a
    /// centre crop/pad back to size, then brightness (uniform offset ±`brightness`·255) and
    /// contrast (factor 1 ± `contrast` around the image's mean) on the image only.
    /// Disabled steps draw no random numbers.
    ///
    /// [`scale_min`]: AugmentConfig::scale_min
    /// [`scale_max`]: AugmentConfig::scale_max
    pub fn apply(&self, sample: &Sample, rng: &mut StdRng) -> Sample {
        let cfg = &self.cfg;
        let mut s = sample.clone();
        if cfg.hflip && rng.random_bool(0.5) {
            s = map_all(s, imageops::flip_horizontal, imageops::flip_horizontal);
        }
        if cfg.vflip && rng.random_bool(0.5) {
            s = map_all(s, imageops::flip_vertical, imageops::flip_vertical);
        }
        if cfg.rot90 {
            s = match rng.random_range(0..4u8) {
                1 => map_all(s, imageops::rotate90, imageops::rotate90),
                2 => map_all(s, imageops::rotate180, imageops::rotate180),
                3 => map_all(s, imageops::rotate270, imageops::rotate270),
                _ => s,
            };
        }
        let mut angle = 0.0f64;
        if cfg.rotate > 0.0 && rng.random_bool(0.5) {
            let r = f64::from(cfg.rotate);
            angle = rng.random_range(-r..=r);
        }
        let (lo, hi) = (f64::from(cfg.scale_min), f64::from(cfg.scale_max));
        let scale = if hi > lo {
            rng.random_range(lo..=hi)
        } else {
            lo
        };
        if angle != 0.0 || (scale != 1.0 && scale > 0.0) {
            let warp = Warp::new(angle, if scale > 0.0 { scale } else { 1.0 });
            s = map_all(s, |i| warp.rgb(i), |m| warp.mask(m));
        }
        let offset = if cfg.brightness > 0.0 {
            let b = f64::from(cfg.brightness);
            rng.random_range(-b..=b) * 255.0
        } else {
            0.0
        };
        let factor = if cfg.contrast > 0.0 {
            let c = f64::from(cfg.contrast);
            1.0 + rng.random_range(-c..=c)
        } else {
            1.0
        };
        if offset != 0.0 || factor != 1.0 {
            jitter(&mut s.image, offset, factor);
        }
        s
    }
}

/// `v ← (v − mean)·factor + mean + offset`, rounded and clamped to 8 bits; `mean` is over
/// all values of the image.
fn jitter(img: &mut RgbImage, offset: f64, factor: f64) {
    let n = img.as_raw().len().max(1) as f64;
    let mean = img.as_raw().iter().map(|&v| v as f64).sum::<f64>() / n;
    let mut lut = [0u8; 256];
    for (v, slot) in lut.iter_mut().enumerate() {
        *slot = ((v as f64 - mean) * factor + mean + offset)
            .round()
            .clamp(0.0, 255.0) as u8;
    }
    for v in img.iter_mut() {
        *v = lut[*v as usize];
    }
}

/// A `crop`×`crop` window at a uniformly random position that lies inside the image
/// (image, label and FOV cut alike). Along a side shorter than `crop` the window starts at
/// 0 and the rest is zero-padded (FOV 0 there, so padding is never scored).
pub fn random_crop(sample: &Sample, crop: u32, rng: &mut StdRng) -> Sample {
    let (w, h) = sample.image.dimensions();
    let x0 = rng.random_range(0..=w.saturating_sub(crop));
    let y0 = rng.random_range(0..=h.saturating_sub(crop));
    crop_at(sample, x0, y0, crop)
}

/// The centred `crop`×`crop` window (the inverse of the margin [`Augmenter::window_for`]
/// adds: a window of the same parity loses equal strips on each side).
pub fn centre_crop(sample: &Sample, crop: u32) -> Sample {
    let (w, h) = sample.image.dimensions();
    crop_at(
        sample,
        w.saturating_sub(crop) / 2,
        h.saturating_sub(crop) / 2,
        crop,
    )
}

/// The `crop`×`crop` window at `(x0, y0)`, zero-padded where it passes the image's edge.
fn crop_at(sample: &Sample, x0: u32, y0: u32, crop: u32) -> Sample {
    let (w, h) = sample.image.dimensions();
    let (cw, ch) = (crop.min(w - x0), crop.min(h - y0));
    let rgb = |i: &RgbImage| {
        let mut out = RgbImage::new(crop, crop);
        imageops::replace(&mut out, &*imageops::crop_imm(i, x0, y0, cw, ch), 0, 0);
        out
    };
    let mask = |m: &GrayImage| {
        let mut out = GrayImage::new(crop, crop);
        imageops::replace(&mut out, &*imageops::crop_imm(m, x0, y0, cw, ch), 0, 0);
        out
    };
    Sample {
        id: sample.id.clone(),
        image: rgb(&sample.image),
        label: sample.label.as_ref().map(mask),
        fov: mask(&sample.fov),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// A sample whose label marks exactly the pixels with red value 200 (distinctive), and
    /// whose image encodes each pixel's position elsewhere.
    fn marked(w: u32, h: u32, marks: &[(u32, u32)]) -> Sample {
        let image = RgbImage::from_fn(w, h, |x, y| {
            if marks.contains(&(x, y)) {
                image::Rgb([200, 0, 0])
            } else {
                image::Rgb([(x % 100) as u8, (y % 100) as u8, 50])
            }
        });
        let label = GrayImage::from_fn(w, h, |x, y| {
            image::Luma([u8::from(marks.contains(&(x, y)))])
        });
        Sample {
            id: "m".into(),
            fov: GrayImage::from_pixel(w, h, image::Luma([1])),
            image,
            label: Some(label),
        }
    }

    fn cfg() -> AugmentConfig {
        AugmentConfig {
            hflip: false,
            vflip: false,
            rot90: false,
            rotate: 0.0,
            scale_min: 1.0,
            scale_max: 1.0,
            brightness: 0.0,
            contrast: 0.0,
        }
    }

    /// Label pixels are exactly where the image has the marker colour.
    fn aligned(s: &Sample) -> bool {
        let l = s.label.as_ref().unwrap();
        s.image
            .enumerate_pixels()
            .all(|(x, y, p)| (p.0 == [200, 0, 0]) == (l.get_pixel(x, y).0[0] == 1))
    }

    #[test]
    fn flips_and_turns_keep_label_aligned() {
        let s = marked(9, 9, &[(1, 2), (7, 3), (4, 8)]);
        let aug = Augmenter::new(&AugmentConfig {
            hflip: true,
            vflip: true,
            rot90: true,
            ..cfg()
        });
        let mut rng = StdRng::seed_from_u64(1);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..40 {
            let a = aug.apply(&s, &mut rng);
            assert!(aligned(&a));
            assert_eq!(
                a.label
                    .as_ref()
                    .unwrap()
                    .iter()
                    .filter(|&&v| v == 1)
                    .count(),
                3
            );
            seen.insert(a.image.as_raw().clone());
        }
        // the 8 symmetries of the square all occur
        assert_eq!(seen.len(), 8);
    }

    #[test]
    fn flip_twice_is_identity() {
        let s = marked(6, 4, &[(0, 0), (5, 1)]);
        let once = map_all(
            s.clone(),
            imageops::flip_horizontal,
            imageops::flip_horizontal,
        );
        assert_ne!(once, s);
        assert_eq!(once.label.as_ref().unwrap().get_pixel(5, 0).0, [1]);
        let twice = map_all(once, imageops::flip_horizontal, imageops::flip_horizontal);
        assert_eq!(twice, s);
    }

    /// Bytes computed with PIL 13: `Image.fromarray(a).rotate(17.0, BILINEAR / NEAREST)` of a
    /// 7×6 grey ramp `a[y, x] = (37x + 23y) % 256`.
    #[test]
    fn rotation_matches_pil() {
        let ramp = GrayImage::from_fn(7, 6, |x, y| image::Luma([((37 * x + 23 * y) % 256) as u8]));
        let rgb = RgbImage::from_fn(7, 6, |x, y| {
            let v = ramp.get_pixel(x, y).0[0];
            image::Rgb([v, v, v])
        });
        let warp = Warp::new(17.0, 1.0);
        let r = warp.rgb(&rgb);
        let got: Vec<u8> = r.pixels().map(|p| p.0[1]).collect();
        #[rustfmt::skip]
        let pil: [u8; 42] = [
            0, 67, 102, 140, 182, 224, 0,
            25, 67, 109, 151, 193, 177, 25,
            36, 78, 120, 162, 205, 232, 32,
            48, 89, 131, 174, 216, 147, 54,
            70, 101, 143, 185, 197, 78, 55,
            0, 112, 154, 196, 176, 13, 0,
        ];
        assert_eq!(got, pil);
        // nearest on the mask reads the source pixel containing the mapped centre
        let n = warp.mask(&ramp);
        assert_eq!(n.get_pixel(0, 0).0, [0]); // outside: zero fill
        assert_eq!(n.get_pixel(3, 3).0, ramp.get_pixel(3, 3).0); // the centre stays
    }

    #[test]
    fn rotation_and_scale_move_label_with_image() {
        // a thick block: nearest and bilinear agree in its interior
        let mut marks = Vec::new();
        for y in 10..18 {
            for x in 20..28 {
                marks.push((x, y));
            }
        }
        let s = marked(40, 40, &marks);
        let aug = Augmenter::new(&AugmentConfig {
            rotate: 30.0,
            scale_min: 0.8,
            scale_max: 1.25,
            ..cfg()
        });
        let mut rng = StdRng::seed_from_u64(5);
        let mut rotated = 0;
        let mut zero_filled = 0;
        for _ in 0..10 {
            let a = aug.apply(&s, &mut rng);
            let l = a.label.as_ref().unwrap();
            let n = l.iter().filter(|&&v| v == 1).count();
            assert!(n > 20, "label pixels lost: {n}");
            // every label pixel sits on a reddish image pixel (bilinear blends at the rim, where
            // the marker still weighs at least 1/4: R ≥ 0.25·200 + 0.75·20)
            for (x, y, p) in l.enumerate_pixels() {
                if p.0[0] == 1 {
                    let px = a.image.get_pixel(x, y).0;
                    assert!(px[0] >= 60 && px[1] < 60, "({x},{y}) {px:?}");
                }
            }
            rotated += usize::from(a.image != s.image);
            // Outside the source (corners, when rotated or shrunk) image, label and FOV are
            // zero-filled; inside, the FOV stays 1. No source pixel is black (blue is 50, or
            // red 200 on the marker), so a black image pixel means "outside".
            let mut outside = 0;
            for (x, y, f) in a.fov.enumerate_pixels() {
                let black = a.image.get_pixel(x, y).0 == [0, 0, 0];
                assert_eq!(f.0[0], u8::from(!black), "FOV at ({x},{y})");
                if black {
                    assert_eq!(l.get_pixel(x, y).0[0], 0, "label outside at ({x},{y})");
                    outside += 1;
                }
            }
            zero_filled += usize::from(outside > 0);
        }
        assert!(rotated > 3);
        assert!(
            zero_filled > 3,
            "only {zero_filled} of 10 draws zero-filled"
        );
    }

    #[test]
    fn jitter_touches_image_only() {
        let s = marked(8, 8, &[(2, 2)]);
        let aug = Augmenter::new(&AugmentConfig {
            brightness: 0.2,
            contrast: 0.3,
            ..cfg()
        });
        let mut rng = StdRng::seed_from_u64(9);
        let a = aug.apply(&s, &mut rng);
        assert_ne!(a.image, s.image);
        assert_eq!(a.label, s.label);
        assert_eq!(a.fov, s.fov);
        // deterministic given the seed
        let b = aug.apply(&s, &mut StdRng::seed_from_u64(9));
        assert_eq!(a, b);
    }

    /// A rotated or zoomed-out crop cut through `window_for` and `centre_crop` holds only
    /// source pixels (FOV 1 everywhere, as in the source), for angles up to 45° and zooms down
    /// to 0.7; the plain crop of the same draws does not (zero corners), so the margin is what
    /// keeps them out. Recipes without rotation or zoom-out keep the plain crop.
    #[test]
    fn window_margin_keeps_warped_corners_inside_the_source() {
        let s = marked(300, 280, &[]);
        for (rotate, scale_min) in [(45.0, 1.0), (180.0, 1.0), (15.0, 0.7), (0.0, 0.8)] {
            let aug = Augmenter::new(&AugmentConfig {
                rotate,
                scale_min,
                scale_max: 1.2,
                ..cfg()
            });
            let window = aug.window_for(48);
            assert!(
                window > 48 && (window - 48).is_multiple_of(2),
                "window {window}"
            );
            let (mut warped, mut zero_corners) = (0, 0);
            for seed in 0..40 {
                let mut rng = StdRng::seed_from_u64(seed);
                let cut = random_crop(&s, window, &mut rng);
                let a = centre_crop(&aug.apply(&cut, &mut rng), 48);
                assert_eq!(a.image.dimensions(), (48, 48));
                assert!(
                    a.fov.iter().all(|&v| v == 1),
                    "rotate {rotate}, scale_min {scale_min}, seed {seed}: a zero-filled pixel"
                );
                warped += usize::from(a != centre_crop(&cut, 48));
                let mut rng = StdRng::seed_from_u64(seed);
                let plain = aug.apply(&random_crop(&s, 48, &mut rng), &mut rng);
                zero_corners += usize::from(plain.fov.contains(&0));
            }
            assert!(warped > 10 && zero_corners > 10, "{warped} {zero_corners}");
        }
        assert_eq!(Augmenter::new(&cfg()).window_for(96), 96);
    }

    #[test]
    fn random_crop_stays_inside() {
        let (w, h) = (37, 29);
        let s = marked(w, h, &[]);
        let mut rng = StdRng::seed_from_u64(2);
        let mut corners = std::collections::HashSet::new();
        for _ in 0..300 {
            let c = random_crop(&s, 16, &mut rng);
            assert_eq!(c.image.dimensions(), (16, 16));
            // the image encodes (x % 100, y % 100): recover the window origin
            let p = c.image.get_pixel(0, 0).0;
            let (x0, y0) = (p[0] as u32, p[1] as u32);
            assert!(x0 + 16 <= w && y0 + 16 <= h, "window at ({x0},{y0})");
            assert_eq!(
                c.image.get_pixel(15, 15).0[..2],
                [(x0 + 15) as u8, (y0 + 15) as u8]
            );
            assert!(c.fov.iter().all(|&v| v == 1));
            corners.insert((x0, y0));
        }
        // both extremes are reachable
        assert!(corners.iter().any(|&(x, _)| x == 0));
        assert!(corners.iter().any(|&(x, _)| x == w - 16));
        // larger than the image: zero padding with FOV 0
        let c = random_crop(&s, 40, &mut rng);
        assert_eq!(c.image.dimensions(), (40, 40));
        assert_eq!(c.fov.get_pixel(39, 39).0, [0]);
        assert_eq!(c.fov.get_pixel(36, 28).0, [1]);
    }
}
