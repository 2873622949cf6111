//! Losses: the training loss of `train.loss` and the plain cross-entropy of validation.

use anyhow::Result;
use candle_core::{DType, Tensor};

use crate::config::{Experiment, Loss};

/// Cross-entropy (optionally class-weighted, PyTorch's weighted mean), plus the soft Dice
/// loss of the vessel class (`ce+dice`, as both references compute it).
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
    let ce = ((logp * &target)?.sum_all()? * (-1.0 / denom))?;
    if exp.train.loss == Loss::Ce {
        return Ok(ce);
    }
    let p1 = candle_nn::ops::softmax(logits, 1)?.narrow(1, 1, 1)?;
    let t1: Vec<f32> = labels
        .iter()
        .map(|&l| if l == 1 { 1.0 } else { 0.0 })
        .collect();
    let t1 = Tensor::from_vec(t1, (n, 1, h, w), logits.device())?;
    let inter = (&p1 * &t1)?.sum_all()?;
    let total = (p1.sum_all()? + t1.sum_all()?)?;
    let dice = (((inter * 2.0)? + 1.0)? / (total + 1.0)?)?;
    Ok((ce + (dice.neg()? + 1.0)?)?)
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
