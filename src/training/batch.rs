//! Batches for the model: crop (native-resolution training), augment and normalise a few
//! training images into one N×3×H×W input and its labels. Every random draw is seeded from
//! (`train.seed`, step, position in the batch) through [`mix`], so a batch is the same however
//! many threads build it and whether or not the run was resumed.

use anyhow::{anyhow, bail, Result};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rayon::prelude::*;

use crate::config::Experiment;
use crate::data::{self, Augmenter, ChannelStats, Sample};

/// Mix integers into one seed (SplitMix64 finaliser per word).
pub fn mix(words: &[u64]) -> u64 {
    let mut h: u64 = 0x9E37_79B9_7F4A_7C15;
    for &w in words {
        let mut z = h ^ w.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        h = z ^ (z >> 31);
    }
    h
}

/// A batch ready for the model.
pub struct Batch {
    /// The normalised images, N×3×H×W, row-major.
    pub x: Vec<f32>,
    /// The labels, N×H×W class indices.
    pub y: Vec<u8>,
    pub n: usize,
    pub h: usize,
    pub w: usize,
}

/// The normalisation statistics of each training image (whole image, as the reference does),
/// computed once: recomputing them over the full 565×584 image for every 96-px crop cost 36×
/// the crop's own work.
pub fn image_stats(exp: &Experiment, train: &[&Sample]) -> Vec<ChannelStats> {
    train
        .par_iter()
        .map(|s| ChannelStats::for_image(exp.data.normalize, &s.image))
        .collect()
}

/// Build one batch of the images `idx` of `train`: crop (native training), augment, normalise
/// with `stats` (from [`image_stats`], one per image of `train`). Deterministic in (seed, step,
/// position in batch).
pub fn build_batch(
    exp: &Experiment,
    train: &[&Sample],
    stats: &[ChannelStats],
    idx: &[usize],
    aug: &Augmenter,
    step: u64,
) -> Result<Batch> {
    let t = &exp.train;
    let items: Vec<(Vec<f32>, Vec<u8>, u32, u32)> = idx
        .par_iter()
        .enumerate()
        .map(|(j, &i)| {
            let mut rng = StdRng::seed_from_u64(mix(&[t.seed, 4, step, j as u64]));
            let full = train
                .get(i)
                .ok_or_else(|| anyhow!("no train image {i} (the split has {})", train.len()))?;
            let stats = stats
                .get(i)
                .ok_or_else(|| anyhow!("no normalisation statistics for train image {i}"))?;
            let s = if t.crop > 0 {
                // Cut a window wide enough for the rotation/zoom, augment it, keep its centre.
                let window = aug.window_for(t.crop);
                let s = aug.apply(&data::random_crop(full, window, &mut rng), &mut rng);
                if window > t.crop {
                    data::centre_crop(&s, t.crop)
                } else {
                    s
                }
            } else {
                aug.apply(full, &mut rng)
            };
            let (w, h) = s.image.dimensions();
            let label = s
                .label
                .ok_or_else(|| anyhow!("train image {} has no annotation", s.id))?
                .into_raw();
            Ok((data::to_chw_f32_with(&s.image, stats), label, w, h))
        })
        .collect::<Result<_>>()?;
    let Some((w, h)) = items.first().map(|it| (it.2, it.3)) else {
        bail!("an empty batch (no image indices)");
    };
    if items.iter().any(|it| it.2 != w || it.3 != h) {
        bail!("images of one batch differ in size (use train.crop or the resize pipeline)");
    }
    let mut x = Vec::with_capacity(items.len() * 3 * (w * h) as usize);
    let mut y = Vec::with_capacity(items.len() * (w * h) as usize);
    for (xi, yi, _, _) in items.iter() {
        x.extend_from_slice(xi);
        y.extend_from_slice(yi);
    }
    Ok(Batch {
        x,
        y,
        n: idx.len(),
        h: h as usize,
        w: w as usize,
    })
}
