//! Datasets: listing files by layout, decoding them into [`Sample`]s, the synthetic
//! fundus generator, resizing, train-time augmentation and normalisation to
//! tensor-ready `f32` CHW buffers.
//!
//! Representation: a [`Sample`] keeps 8-bit images (`RgbImage` for the photograph,
//! `GrayImage` with values 0/1 for the annotation and the field of view). Resizing and
//! augmentation operate on these 8-bit images, as the PyTorch references do on PIL images
//! (the geometric transforms move bytes, not floats, and 8-bit buffers are a quarter the
//! size); [`to_chw_f32`] converts to floats last, right before batching.

mod augment;
pub mod clahe;
mod decode;
mod listing;
mod normalize;
mod resize;
mod synthetic;

use std::path::PathBuf;

pub use augment::{centre_crop, random_crop, Augmenter};
pub use decode::decode;
pub use listing::list;
pub use normalize::{enhance, prepare, to_chw_f32, to_chw_f32_with, ChannelStats};
pub use resize::{
    resize_mask, resize_mask_smooth, resize_rgb, resize_sample, zoom_sample, zoomed_size,
};
pub use synthetic::synthetic;

/// The files of one dataset image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleFiles {
    /// Image id: DRIVE's number (`"21"`), or the file stem in `split-dirs`.
    pub id: String,
    /// The photograph.
    pub image: PathBuf,
    /// The vessel annotation, when the split has one.
    pub label: Option<PathBuf>,
    /// The field-of-view mask; `None`: the whole image counts.
    pub fov: Option<PathBuf>,
}

/// A dataset's files by split, each split sorted by id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub train: Vec<SampleFiles>,
    /// `Some` only when the layout ships its own validation split (`split-dirs`).
    pub valid: Option<Vec<SampleFiles>>,
    pub test: Vec<SampleFiles>,
}

/// One decoded image with its annotation and field of view, all the same size.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub id: String,
    pub image: image::RgbImage,
    /// Vessel annotation, values 0 (background) / 1 (vessel).
    pub label: Option<image::GrayImage>,
    /// Field of view, values 0 (outside) / 1 (inside); all ones when the dataset has none.
    pub fov: image::GrayImage,
}

/// Helpers shared by the data module's tests.
#[cfg(test)]
pub(crate) mod tests_support {
    use std::path::PathBuf;

    /// The real DRIVE tree: `data/DRIVE` in the crate (what `./setup.sh` links) or
    /// `../shared/data/DRIVE` beside it. When it is missing the calling test fails, saying
    /// where it was looked for, unless `DRIVELINE_SKIP_DRIVE=1` asks to skip (then `None`).
    /// (`tests/common/mod.rs` has the same rule for the integration tests.)
    pub fn drive_root() -> Option<PathBuf> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let candidates = [root.join("data/DRIVE"), root.join("../shared/data/DRIVE")];
        if let Some(p) = candidates.iter().find(|p| p.join("training").is_dir()) {
            return Some(p.clone());
        }
        let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
        if std::env::var("DRIVELINE_SKIP_DRIVE").as_deref() == Ok("1") {
            eprintln!(
                "DRIVE not found (looked in {}); skipped because DRIVELINE_SKIP_DRIVE=1",
                looked.join(", ")
            );
            return None;
        }
        panic!(
            "this test needs the DRIVE data set (original layout) but found none in {}: put it \
             at data/DRIVE (or ../shared/data/DRIVE beside the repository and run ./setup.sh, \
             which links it), or set DRIVELINE_SKIP_DRIVE=1 to skip the tests that need it",
            looked.join(" or ")
        );
    }
}
