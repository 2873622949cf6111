//! Confusion counts and segmentation metrics for binary vessel segmentation.
//!
//! Everything here is exact: counts are integers, and the ROC AUC is the Mann–Whitney
//! statistic computed from the full sorted score lists (ties count 1/2), not from a
//! quantised histogram.
//!
//! **Empty-class convention.** A ratio whose denominator is zero is reported as `1.0`:
//! the denominator counts every pixel that could have been got wrong, so when it is zero
//! nothing was got wrong. For example, an image with no vessel in the truth and none
//! predicted has vessel IoU = Dice = sensitivity = precision = 1. No metric ever returns
//! NaN. (The DRIVE/MMSeg literature varies here — some skip such images, some count 0;
//! we pick 1 and apply it uniformly.)
//!
//! Pixel values: in `pred`, `truth` and `mask`, any non-zero byte means "vessel"
//! (resp. "inside the field of view"), so both 0/1 and 0/255 maps work.

use rayon::slice::ParallelSliceMut;
use serde::{Deserialize, Serialize};

/// `num / den`, or `1.0` when `den == 0` (see the module's empty-class convention).
fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        1.0
    } else {
        num as f64 / den as f64
    }
}

/// Pixel counts of a binary segmentation against its ground truth (vessel = positive).
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confusion {
    /// Vessel predicted, vessel in truth.
    pub tp: u64,
    /// Vessel predicted, background in truth.
    pub fp: u64,
    /// Background predicted, vessel in truth.
    pub fn_: u64,
    /// Background predicted, background in truth.
    pub tn: u64,
}

impl Confusion {
    /// Counts of one prediction; `mask` (e.g. the field of view) keeps only the pixels where
    /// it is non-zero.
    ///
    /// # Panics
    /// If the slices differ in length (a caller bug, not a data error).
    pub fn from_pixels(pred: &[u8], truth: &[u8], mask: Option<&[u8]>) -> Self {
        let mut c = Self::default();
        c.add(pred, truth, mask);
        c
    }

    /// Adds the counts of one prediction; `mask` keeps only the pixels where it is non-zero.
    ///
    /// # Panics
    /// If the slices differ in length (a caller bug, not a data error).
    pub fn add(&mut self, pred: &[u8], truth: &[u8], mask: Option<&[u8]>) {
        assert_eq!(
            pred.len(),
            truth.len(),
            "prediction and truth lengths differ"
        );
        // counts[2 * truth + pred]: [tn, fp, fn, tp]
        let mut counts = [0u64; 4];
        match mask {
            None => {
                for (&p, &t) in pred.iter().zip(truth) {
                    counts[2 * usize::from(t != 0) + usize::from(p != 0)] += 1;
                }
            }
            Some(m) => {
                assert_eq!(m.len(), pred.len(), "mask and prediction lengths differ");
                for ((&p, &t), &k) in pred.iter().zip(truth).zip(m) {
                    if k != 0 {
                        counts[2 * usize::from(t != 0) + usize::from(p != 0)] += 1;
                    }
                }
            }
        }
        self.tn += counts[0];
        self.fp += counts[1];
        self.fn_ += counts[2];
        self.tp += counts[3];
    }

    /// Adds another set of counts (e.g. pooling images into a dataset total).
    pub fn merge(&mut self, o: &Confusion) {
        self.tp += o.tp;
        self.fp += o.fp;
        self.fn_ += o.fn_;
        self.tn += o.tn;
    }

    /// Number of pixels counted.
    pub fn total(&self) -> u64 {
        self.tp + self.fp + self.fn_ + self.tn
    }

    /// (TP + TN) / all.
    pub fn accuracy(&self) -> f64 {
        ratio(self.tp + self.tn, self.total())
    }

    /// Vessel IoU: TP / (TP + FP + FN).
    pub fn iou_vessel(&self) -> f64 {
        ratio(self.tp, self.tp + self.fp + self.fn_)
    }

    /// Background IoU: TN / (TN + FP + FN).
    pub fn iou_background(&self) -> f64 {
        ratio(self.tn, self.tn + self.fp + self.fn_)
    }

    /// Mean of the background and vessel IoU.
    pub fn miou(&self) -> f64 {
        0.5 * (self.iou_vessel() + self.iou_background())
    }

    /// Vessel Dice (= F1): 2TP / (2TP + FP + FN).
    pub fn dice(&self) -> f64 {
        ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn_)
    }

    /// Sensitivity (recall): TP / (TP + FN).
    pub fn sensitivity(&self) -> f64 {
        ratio(self.tp, self.tp + self.fn_)
    }

    /// Specificity: TN / (TN + FP).
    pub fn specificity(&self) -> f64 {
        ratio(self.tn, self.tn + self.fp)
    }

    /// Precision: TP / (TP + FP).
    pub fn precision(&self) -> f64 {
        ratio(self.tp, self.tp + self.fp)
    }

    /// All the metrics above in one serialisable record.
    pub fn summary(&self) -> Summary {
        Summary {
            accuracy: self.accuracy(),
            iou_vessel: self.iou_vessel(),
            iou_background: self.iou_background(),
            miou: self.miou(),
            dice: self.dice(),
            sensitivity: self.sensitivity(),
            specificity: self.specificity(),
            precision: self.precision(),
        }
    }
}

/// The metrics of one [`Confusion`], for JSON/CSV output.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub accuracy: f64,
    pub iou_vessel: f64,
    pub iou_background: f64,
    pub miou: f64,
    pub dice: f64,
    pub sensitivity: f64,
    pub specificity: f64,
    pub precision: f64,
}

/// Maps an `f32` to a `u32` whose unsigned order is the numeric order of the floats
/// (`-0.0` and `0.0` map to the same key, so they tie). NaN sorts above +∞.
fn order_key(s: f32) -> u32 {
    let bits = (s + 0.0).to_bits(); // -0.0 + 0.0 == +0.0
    if bits >> 31 == 1 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

/// The (score, is vessel) of each pixel that `mask` keeps (non-zero; all without a mask).
///
/// # Panics
/// If the slices differ in length (a caller bug, not a data error).
fn masked<'a>(
    scores: &'a [f32],
    truth: &'a [u8],
    mask: Option<&'a [u8]>,
) -> impl Iterator<Item = (f32, bool)> + 'a {
    assert_eq!(scores.len(), truth.len(), "scores and truth lengths differ");
    if let Some(m) = mask {
        assert_eq!(m.len(), scores.len(), "mask and scores lengths differ");
    }
    scores
        .iter()
        .zip(truth)
        .enumerate()
        .filter(move |(i, _)| mask.is_none_or(|m| m[*i] != 0))
        .map(|(_, (&s, &t))| (s, t != 0))
}

/// Accumulates scores of positive and negative pixels over many images for an exact,
/// pooled ROC AUC (memory: 4 bytes per counted pixel).
#[derive(Default, Clone, Debug)]
pub struct AucAccumulator {
    pos: Vec<u32>,
    neg: Vec<u32>,
}

impl AucAccumulator {
    /// Adds one image's vessel scores; `truth` non-zero marks vessel, `mask` non-zero keeps a pixel.
    ///
    /// # Panics
    /// If the slices differ in length (a caller bug, not a data error).
    pub fn add(&mut self, scores: &[f32], truth: &[u8], mask: Option<&[u8]>) {
        for (s, vessel) in masked(scores, truth, mask) {
            if vessel {
                self.pos.push(order_key(s));
            } else {
                self.neg.push(order_key(s));
            }
        }
    }

    /// Adds another accumulator's pixels.
    pub fn merge(&mut self, o: &AucAccumulator) {
        self.pos.extend_from_slice(&o.pos);
        self.neg.extend_from_slice(&o.neg);
    }

    /// Exact ROC AUC = P(score of a random vessel pixel > that of a random background pixel),
    /// ties counting 1/2; `None` if either class is absent.
    pub fn auc(&self) -> Option<f64> {
        if self.pos.is_empty() || self.neg.is_empty() {
            return None;
        }
        let (mut pos, mut neg) = (self.pos.clone(), self.neg.clone());
        rayon::join(|| pos.par_sort_unstable(), || neg.par_sort_unstable());
        // twice the Mann–Whitney U: Σ over positives of 2·#(neg below) + #(neg equal).
        let mut u2: u128 = 0;
        let (mut below, mut j) = (0usize, 0usize);
        let mut i = 0;
        while i < pos.len() {
            let key = pos[i];
            let mut run = 0u128;
            while i < pos.len() && pos[i] == key {
                run += 1;
                i += 1;
            }
            while below < neg.len() && neg[below] < key {
                below += 1;
            }
            j = j.max(below);
            while j < neg.len() && neg[j] == key {
                j += 1;
            }
            let equal = (j - below) as u128;
            u2 += run * (2 * below as u128 + equal);
        }
        let pairs = pos.len() as u128 * neg.len() as u128;
        Some(u2 as f64 / (2 * pairs) as f64)
    }
}

/// Exact ROC AUC of vessel `scores` against `truth` over the pixels where `mask` is non-zero
/// (ties count 1/2, Mann–Whitney); `None` if one class is absent.
pub fn auc_roc(scores: &[f32], truth: &[u8], mask: Option<&[u8]>) -> Option<f64> {
    let mut acc = AucAccumulator::default();
    acc.add(scores, truth, mask);
    acc.auc()
}

/// Vessel/background pixel counts by probability, in steps of 1/[`ThresholdSweep::STEPS`]:
/// the confusion counts at every threshold k/STEPS at once, to pick the F1-optimal one.
#[derive(Clone, Debug)]
pub struct ThresholdSweep {
    /// Pixels whose probability q has ⌊q·STEPS⌋ = k, by class (index 0: background).
    counts: [Vec<u64>; 2],
}

impl Default for ThresholdSweep {
    fn default() -> Self {
        ThresholdSweep {
            counts: [vec![0; Self::STEPS + 1], vec![0; Self::STEPS + 1]],
        }
    }
}

impl ThresholdSweep {
    /// Candidate thresholds are k/1000 for k = 1..=999.
    pub const STEPS: usize = 1000;

    /// Adds one image's vessel probabilities; `truth` non-zero marks vessel, `mask` non-zero
    /// keeps a pixel.
    ///
    /// # Panics
    /// If the slices differ in length (a caller bug, not a data error).
    pub fn add(&mut self, probs: &[f32], truth: &[u8], mask: Option<&[u8]>) {
        for (q, vessel) in masked(probs, truth, mask) {
            let k = ((q as f64) * Self::STEPS as f64).floor();
            let k = k.clamp(0.0, Self::STEPS as f64) as usize;
            self.counts[usize::from(vessel)][k] += 1;
        }
    }

    /// The confusion counts of the mask `q >= k / STEPS`.
    pub fn confusion_at(&self, k: usize) -> Confusion {
        let above = |c: &Vec<u64>| c[k..].iter().sum::<u64>();
        let below = |c: &Vec<u64>| c[..k].iter().sum::<u64>();
        Confusion {
            tp: above(&self.counts[1]),
            fp: above(&self.counts[0]),
            tn: below(&self.counts[0]),
            fn_: below(&self.counts[1]),
        }
    }

    /// The threshold k/STEPS (0 < k < STEPS) with the highest F1 (Dice) of the pooled pixels,
    /// and that F1; among equal F1s, the threshold nearest 0.5. `None` without any vessel pixel.
    pub fn best_f1(&self) -> Option<(f32, f64)> {
        if self.counts[1].iter().all(|&c| c == 0) {
            return None;
        }
        let half = Self::STEPS / 2;
        (1..Self::STEPS)
            .map(|k| (k, self.confusion_at(k).dice()))
            .max_by(|a, b| {
                a.1.total_cmp(&b.1)
                    .then(b.0.abs_diff(half).cmp(&a.0.abs_diff(half)))
            })
            .map(|(k, f1)| (k as f32 / Self::STEPS as f32, f1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Six pixels, one outside the mask: vessel at 0.9, 0.7, 0.2; background at 0.6, 0.1
    /// (and 0.95 masked out). At 0.5: TP 2, FP 1, FN 1, F1 = 4/6. At 0.65 (any threshold in
    /// (0.6, 0.7]): TP 2, FP 0, FN 1, F1 = 4/5. At 0.15 (in (0.1, 0.2]): TP 3, FP 1, F1 = 6/7,
    /// the best; the ties in (0.1, 0.2] resolve to 0.2, the one nearest 0.5.
    #[test]
    fn the_f1_optimal_threshold_of_a_toy_example() {
        let probs = [0.9f32, 0.7, 0.2, 0.6, 0.1, 0.95];
        let truth = [1u8, 1, 1, 0, 0, 0];
        let mask = [1u8, 1, 1, 1, 1, 0];
        let mut s = ThresholdSweep::default();
        s.add(&probs, &truth, Some(&mask));
        let c = s.confusion_at(500);
        assert_eq!((c.tp, c.fp, c.tn, c.fn_), (2, 1, 1, 1));
        assert!((c.dice() - 4.0 / 6.0).abs() < 1e-12);
        assert!((s.confusion_at(650).dice() - 0.8).abs() < 1e-12);
        let (t, f1) = s.best_f1().unwrap();
        assert_eq!(t, 0.2);
        assert!((f1 - 6.0 / 7.0).abs() < 1e-12, "{f1}");
        // The counts at the chosen threshold are those of the mask `q >= t`.
        let pred: Vec<u8> = probs.iter().map(|&q| u8::from(q >= t)).collect();
        assert_eq!(
            Confusion::from_pixels(&pred, &truth, Some(&mask)),
            s.confusion_at(200)
        );
        // Without the mask, the 0.95 background pixel is a false positive at every threshold.
        let mut all = ThresholdSweep::default();
        all.add(&probs, &truth, None);
        assert_eq!(all.confusion_at(200).fp, 2);
        assert!(ThresholdSweep::default().best_f1().is_none());
    }

    #[test]
    fn confusion_counts_tiny_example() {
        let pred = [1, 1, 0, 0, 1, 0, 255];
        let truth = [1, 0, 1, 0, 1, 0, 0];
        let c = Confusion::from_pixels(&pred, &truth, None);
        assert_eq!(
            c,
            Confusion {
                tp: 2,
                fp: 2,
                fn_: 1,
                tn: 2
            }
        );
        assert!((c.accuracy() - 4.0 / 7.0).abs() < 1e-12);
        assert!((c.iou_vessel() - 2.0 / 5.0).abs() < 1e-12);
        assert!((c.iou_background() - 2.0 / 5.0).abs() < 1e-12);
        assert!((c.miou() - 0.4).abs() < 1e-12);
        assert!((c.dice() - 4.0 / 7.0).abs() < 1e-12);
        assert!((c.sensitivity() - 2.0 / 3.0).abs() < 1e-12);
        assert!((c.specificity() - 0.5).abs() < 1e-12);
        assert!((c.precision() - 0.5).abs() < 1e-12);
    }

    #[test]
    fn fov_mask_excludes_pixels() {
        let pred = [1, 1, 0, 0];
        let truth = [1, 0, 1, 0];
        let mask = [1, 0, 0, 1];
        let c = Confusion::from_pixels(&pred, &truth, Some(&mask));
        assert_eq!(
            c,
            Confusion {
                tp: 1,
                fp: 0,
                fn_: 0,
                tn: 1
            }
        );
        let mut pooled = c;
        pooled.merge(&Confusion::from_pixels(&pred, &truth, None));
        assert_eq!(pooled.total(), 6);
        assert_eq!(pooled.tp, 2);
    }

    #[test]
    fn empty_classes_score_one_and_never_nan() {
        // no vessel anywhere, none predicted
        let c = Confusion::from_pixels(&[0, 0, 0], &[0, 0, 0], None);
        assert_eq!(c.iou_vessel(), 1.0);
        assert_eq!(c.dice(), 1.0);
        assert_eq!(c.sensitivity(), 1.0);
        assert_eq!(c.precision(), 1.0);
        assert_eq!(c.iou_background(), 1.0);
        assert_eq!(c.miou(), 1.0);
        // no vessel in truth but some predicted: vessel IoU/Dice 0, not 1
        let c = Confusion::from_pixels(&[1, 0, 0], &[0, 0, 0], None);
        assert_eq!(c.iou_vessel(), 0.0);
        assert_eq!(c.dice(), 0.0);
        assert_eq!(c.sensitivity(), 1.0);
        assert_eq!(c.precision(), 0.0);
        assert!((c.iou_background() - 2.0 / 3.0).abs() < 1e-12);
        // everything vessel: background IoU and specificity follow the same convention
        let c = Confusion::from_pixels(&[1, 1], &[1, 1], None);
        assert_eq!(c.iou_background(), 1.0);
        assert_eq!(c.specificity(), 1.0);
        // nothing counted at all
        let c = Confusion::default();
        let s = c.summary();
        for v in [
            s.accuracy,
            s.iou_vessel,
            s.iou_background,
            s.miou,
            s.dice,
            s.sensitivity,
            s.specificity,
            s.precision,
        ] {
            assert_eq!(v, 1.0);
        }
    }

    #[test]
    fn auc_hand_cases() {
        // positives 0.35, 0.8; negatives 0.1, 0.4: pairs won 0.35>0.1, 0.8>0.1, 0.8>0.4 → 3/4
        assert_eq!(
            auc_roc(&[0.1, 0.4, 0.35, 0.8], &[0, 0, 1, 1], None),
            Some(0.75)
        );
        // all tied → 1/2
        assert_eq!(auc_roc(&[0.3; 5], &[0, 1, 0, 1, 1], None), Some(0.5));
        // perfect and inverted
        assert_eq!(auc_roc(&[0.1, 0.2, 0.9], &[0, 0, 1], None), Some(1.0));
        assert_eq!(auc_roc(&[0.9, 0.2, 0.1], &[0, 0, 1], None), Some(0.0));
        // partial ties: pos {0.5, 0.7}, neg {0.5, 0.2}: 0.5 vs 0.5 half, 0.5>0.2, 0.7>both → 3.5/4
        assert_eq!(
            auc_roc(&[0.5, 0.7, 0.5, 0.2], &[1, 1, 0, 0], None),
            Some(0.875)
        );
        // -0.0 and 0.0 tie
        assert_eq!(auc_roc(&[-0.0, 0.0], &[1, 0], None), Some(0.5));
        // negative scores order correctly
        assert_eq!(auc_roc(&[-2.0, -1.0], &[0, 1], None), Some(1.0));
    }

    #[test]
    fn auc_mask_and_missing_class() {
        // masking out the 0.4 negative leaves pos {0.35, 0.8} vs neg {0.1} → 1
        assert_eq!(
            auc_roc(&[0.1, 0.4, 0.35, 0.8], &[0, 0, 1, 1], Some(&[1, 0, 1, 1])),
            Some(1.0)
        );
        assert_eq!(auc_roc(&[0.1, 0.2], &[1, 1], None), None);
        assert_eq!(auc_roc(&[0.1, 0.2], &[0, 0], None), None);
        assert_eq!(auc_roc(&[0.1, 0.2], &[0, 1], Some(&[0, 1])), None);
    }

    #[test]
    fn auc_pooled_matches_brute_force() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut acc = AucAccumulator::default();
        let (mut all_s, mut all_t) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            // coarse scores so that ties are frequent
            let s: Vec<f32> = (0..300)
                .map(|_| rng.random_range(0..20) as f32 / 20.0)
                .collect();
            let t: Vec<u8> = s
                .iter()
                .map(|&v| u8::from(rng.random::<f32>() < 0.2 + 0.5 * v))
                .collect();
            let mut part = AucAccumulator::default();
            part.add(&s, &t, None);
            acc.merge(&part);
            all_s.extend(s);
            all_t.extend(t);
        }
        let (mut won, mut pairs) = (0.0f64, 0.0f64);
        for (i, &si) in all_s.iter().enumerate() {
            if all_t[i] == 0 {
                continue;
            }
            for (j, &sj) in all_s.iter().enumerate() {
                if all_t[j] != 0 {
                    continue;
                }
                pairs += 1.0;
                won += if si > sj {
                    1.0
                } else if si == sj {
                    0.5
                } else {
                    0.0
                };
            }
        }
        let got = acc.auc().unwrap();
        assert!(
            (got - won / pairs).abs() < 1e-12,
            "{got} vs {}",
            won / pairs
        );
    }
}
