//! Decoding a [`SampleFiles`] into a [`Sample`].

use std::path::Path;

use anyhow::{bail, Context, Result};
use image::{GrayImage, RgbImage};

use super::{Sample, SampleFiles};

/// Reads any supported image file (TIFF, GIF, PNG, JPEG), erroring with its path.
fn open(path: &Path) -> Result<image::DynamicImage> {
    image::ImageReader::open(path)
        .with_context(|| format!("cannot open {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read {}", path.display()))?
        .decode()
        .with_context(|| format!("cannot decode image {}", path.display()))
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// Reads a mask as 0/1: luminance > 127 is 1. DRIVE's GIFs are palette images; the decoder
/// expands the palette to colours (black/white), so thresholding the luminance reads them as
/// PIL's `np.array(Image.open(gif)) > 127` does.
fn open_mask(path: &Path, what: &str, image_path: &Path, image: &RgbImage) -> Result<GrayImage> {
    let mut m = open(path)?.to_luma8();
    if m.dimensions() != image.dimensions() {
        bail!(
            "{what} {} is {}×{} but image {} is {}×{}",
            file_name(path),
            m.width(),
            m.height(),
            file_name(image_path),
            image.width(),
            image.height()
        );
    }
    for v in m.iter_mut() {
        *v = u8::from(*v > 127);
    }
    Ok(m)
}

/// Decodes the image (to 8-bit RGB), its annotation and its field of view (both to 0/1; the
/// FOV is all ones when `files.fov` is `None`). Errors name the file that is unreadable or
/// whose size differs from the image's.
pub fn decode(files: &SampleFiles) -> Result<Sample> {
    let image = open(&files.image)?.to_rgb8();
    let label = files
        .label
        .as_deref()
        .map(|p| open_mask(p, "label", &files.image, &image))
        .transpose()?;
    let fov = match files.fov.as_deref() {
        Some(p) => open_mask(p, "field-of-view mask", &files.image, &image)?,
        None => GrayImage::from_pixel(image.width(), image.height(), image::Luma([1])),
    };
    Ok(Sample {
        id: files.id.clone(),
        image,
        label,
        fov,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::schema::Layout;
    use image::{Luma, Rgb};

    fn files(dir: &Path, label: Option<&str>, fov: Option<&str>) -> SampleFiles {
        SampleFiles {
            id: "x".into(),
            image: dir.join("img.png"),
            label: label.map(|l| dir.join(l)),
            fov: fov.map(|f| dir.join(f)),
        }
    }

    #[test]
    fn decode_binarises_and_fills_fov() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        RgbImage::from_pixel(4, 3, Rgb([10, 20, 30]))
            .save(d.join("img.png"))
            .unwrap();
        let mut lab = GrayImage::new(4, 3);
        lab.put_pixel(1, 2, Luma([255]));
        lab.put_pixel(2, 2, Luma([127]));
        lab.put_pixel(3, 2, Luma([128]));
        lab.save(d.join("lab.png")).unwrap();
        let s = decode(&files(d, Some("lab.png"), None)).unwrap();
        let l = s.label.unwrap();
        assert_eq!(l.get_pixel(1, 2).0, [1]);
        assert_eq!(l.get_pixel(2, 2).0, [0]);
        assert_eq!(l.get_pixel(3, 2).0, [1]);
        assert_eq!(l.iter().map(|&v| v as u32).sum::<u32>(), 2);
        assert!(s.fov.iter().all(|&v| v == 1));
        assert_eq!(s.fov.dimensions(), (4, 3));
        assert_eq!(s.image.get_pixel(0, 0).0, [10, 20, 30]);
    }

    #[test]
    fn decode_size_mismatch_names_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        RgbImage::new(5, 4).save(d.join("img.png")).unwrap();
        GrayImage::new(4, 4).save(d.join("lab.png")).unwrap();
        let err = format!(
            "{:#}",
            decode(&files(d, Some("lab.png"), None)).unwrap_err()
        );
        assert!(
            err.contains("label lab.png is 4×4 but image img.png is 5×4"),
            "{err}"
        );
        GrayImage::new(5, 4).save(d.join("lab.png")).unwrap();
        GrayImage::new(5, 3).save(d.join("fov.png")).unwrap();
        let err = format!(
            "{:#}",
            decode(&files(d, Some("lab.png"), Some("fov.png"))).unwrap_err()
        );
        assert!(err.contains("fov.png is 5×3"), "{err}");
    }

    #[test]
    fn decode_undecodable_file_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("img.png"), b"not an image at all").unwrap();
        let err = format!("{:#}", decode(&files(d, None, None)).unwrap_err());
        assert!(err.contains("img.png"), "{err}");
        RgbImage::new(2, 2).save(d.join("img.png")).unwrap();
        let err = format!(
            "{:#}",
            decode(&files(d, Some("missing.gif"), None)).unwrap_err()
        );
        assert!(err.contains("missing.gif"), "{err}");
    }

    /// Reads real DRIVE files; expected counts come from PIL
    /// (`(np.array(Image.open(p)) > 127).sum()`).
    #[test]
    fn real_drive_decodes_like_pil() {
        let Some(root) = super::super::tests_support::drive_root() else {
            return;
        };
        let listing = super::super::list(Layout::Drive, &root).unwrap();
        let s = decode(&listing.train[0]).unwrap();
        assert_eq!(s.id, "21");
        assert_eq!(s.image.dimensions(), (565, 584));
        let count = |m: &GrayImage| m.iter().map(|&v| v as u64).sum::<u64>();
        assert_eq!(count(s.label.as_ref().unwrap()), 24658);
        assert_eq!(count(&s.fov), 225600);
        // PIL mean of channel R over the image: 138.727...
        let mean_r = s.image.pixels().map(|p| p.0[0] as f64).sum::<f64>() / (565.0 * 584.0);
        assert!((mean_r - 138.7270851).abs() < 1e-4, "{mean_r}");
        let t = decode(&listing.test[0]).unwrap();
        assert_eq!(count(&t.fov), 224377);
    }
}
