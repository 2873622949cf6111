//! Losses: the training loss of `train.loss` and the plain cross-entropy of validation.

use anyhow::Result;
use candle_core::{DType, Tensor};

use crate::config::{Experiment, Loss};
use crate::model::ops;

/// Cross-entropy (optionally class-weighted, PyTorch's weighted mean), plus the soft Dice
/// loss of the vessel class (`ce+dice`, as both references compute it), plus
/// `weight × (1 − soft clDice)` with `[train.cldice]`.
pub fn loss_fn(exp: &Experiment, logits: &Tensor, labels: &[u8]) -> Result<Tensor> {
    let (n, c, h, w) = logits.dims4()?;
    let weights: Vec<f32> = if exp.train.class_weights.is_empty() {
        vec![1.0; c]
    } else {
        exp.train.class_weights.iter().map(|&x| x as f32).collect()
    };
    let hw = h * w;
    let mut onehot = vec![0f32; n * c * hw];
    let mut denom = 0f64;
    for b in 0..n {
        for i in 0..hw {
            let k = (labels[b * hw + i] as usize).min(c - 1);
            onehot[(b * c + k) * hw + i] = weights[k];
            denom += weights[k] as f64;
        }
    }
    let target = Tensor::from_vec(onehot, (n, c, h, w), logits.device())?;
    let logp = candle_nn::ops::log_softmax(logits, 1)?;
    let mut loss = ((logp * &target)?.sum_all()? * (-1.0 / denom))?;
    let dice = exp.train.loss == Loss::CeDice;
    if !dice && exp.train.cldice.is_none() {
        return Ok(loss);
    }
    if c < 2 {
        anyhow::bail!(
            "the Dice and clDice terms need a vessel class: the model has {c} output channel(s)"
        );
    }
    // The vessel probabilities and target, shared by the Dice and clDice terms.
    let p1 = candle_nn::ops::softmax(logits, 1)?.narrow(1, 1, 1)?;
    let t1: Vec<f32> = labels
        .iter()
        .map(|&l| if l == 1 { 1.0 } else { 0.0 })
        .collect();
    let t1 = Tensor::from_vec(t1, (n, 1, h, w), logits.device())?.to_dtype(logits.dtype())?;
    if dice {
        let inter = (&p1 * &t1)?.sum_all()?;
        let total = (p1.sum_all()? + t1.sum_all()?)?;
        let dice = (((inter * 2.0)? + 1.0)? / (total + 1.0)?)?;
        loss = (loss + (dice.neg()? + 1.0)?)?;
    }
    if let Some(cl) = &exp.train.cldice {
        loss = (loss + (soft_cldice(&p1, &t1, cl.iters)? * cl.weight)?)?;
    }
    Ok(loss)
}

/// Soft erosion: the minimum over each 3×3 neighbourhood (a square structuring element;
/// the border does not count as background).
fn soft_erode(x: &Tensor) -> Result<Tensor> {
    Ok(ops::max_pool2d(&x.neg()?, 3, 1, 1)?.neg()?)
}

/// Soft dilation: the maximum over each 3×3 neighbourhood.
fn soft_dilate(x: &Tensor) -> Result<Tensor> {
    Ok(ops::max_pool2d(x, 3, 1, 1)?)
}

/// The soft skeleton of Shit et al., "clDice" (CVPR 2021), Algorithm 1: what each of `iters`
/// erosions removes that an opening (erode, then dilate) would not restore, accumulated as a
/// soft union. `x` holds values in [0, 1], [N, 1, H, W].
pub fn soft_skeleton(x: &Tensor, iters: usize) -> Result<Tensor> {
    let open = |t: &Tensor| soft_dilate(&soft_erode(t)?);
    let mut img = x.clone();
    let mut skel = ops::relu(&(&img - open(&img)?)?)?;
    for _ in 0..iters {
        img = soft_erode(&img)?;
        let delta = ops::relu(&(&img - open(&img)?)?)?;
        // skel ∪ delta = skel + delta − skel·delta, written as the paper does.
        skel = (&skel + ops::relu(&(&delta - (&skel * &delta)?)?)?)?;
    }
    Ok(skel)
}

/// `1 − clDice` of probabilities `p` against a binary target `t` (both [N, 1, H, W], pooled
/// over the batch): topology precision is the fraction of `p`'s soft skeleton inside `t`,
/// topology sensitivity the fraction of `t`'s skeleton covered by `p`, and clDice their
/// harmonic mean. The target's skeleton is constant; gradients flow through `p` and its
/// skeleton. Both fractions carry a smoothing of 1 (as the paper's code), so empty batches
/// give 0 loss rather than NaN.
pub fn soft_cldice(p: &Tensor, t: &Tensor, iters: usize) -> Result<Tensor> {
    let t = t.detach();
    let (skel_p, skel_t) = (soft_skeleton(p, iters)?, soft_skeleton(&t, iters)?.detach());
    let frac = |num: Tensor, den: Tensor| -> Result<Tensor> {
        Ok(((num.sum_all()? + 1.0)? / (den.sum_all()? + 1.0)?)?)
    };
    let tprec = frac((&skel_p * &t)?, skel_p.clone())?;
    let tsens = frac((&skel_t * p)?, skel_t.clone())?;
    let cl = ((&tprec * &tsens)? * 2.0)?.div(&(&tprec + &tsens)?)?;
    Ok((cl.neg()? + 1.0)?)
}

/// Unweighted mean cross-entropy over every pixel of `logits` (N×C×H×W) against `labels`
/// (N·H·W class indices), in f64: the validation loss.
pub fn plain_ce(logits: &Tensor, labels: &[u8]) -> Result<f64> {
    let (n, c, h, w) = logits.dims4()?;
    let logp = candle_nn::ops::log_softmax(logits, 1)?
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?;
    let hw = h * w;
    let mut s = 0f64;
    for b in 0..n {
        for i in 0..hw {
            let k = (labels[b * hw + i] as usize).min(c - 1);
            s -= logp[(b * c + k) * hw + i] as f64;
        }
    }
    Ok(s / (n * hw) as f64)
}
