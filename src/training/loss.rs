//! Losses: the training loss of `train.loss` and the plain cross-entropy of validation.
//!
//! On the CPU, cross-entropy and the Dice term run as one fused op ([`FusedCeDice`]): one
//! parallel pass forward and one backward. The composition of Candle ops that computes the
//! same loss on other devices (and with `[train.cldice]`) took about 18 ms of a 0.39 s U-Net
//! step at 96 px, batch 16, on one thread while the rayon pool waited: Candle's reductions
//! over the channel axis and its broadcasts' backward run serially.

use std::sync::OnceLock;

use anyhow::Result;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::config::{Experiment, Loss};
use crate::model::ops;

/// Cross-entropy (optionally class-weighted, PyTorch's weighted mean), plus the soft Dice
/// loss of the vessel class (`ce+dice`, as both references compute it), plus
/// `weight × (1 − soft clDice)` with `[train.cldice]`.
pub fn loss_fn(exp: &Experiment, logits: &Tensor, labels: &[u8]) -> Result<Tensor> {
    let (_, c, _, _) = logits.dims4()?;
    let weights = class_weights(exp, c);
    let dice = exp.train.loss == Loss::CeDice;
    if (dice || exp.train.cldice.is_some()) && c < 2 {
        anyhow::bail!(
            "the Dice and clDice terms need a vessel class: the model has {c} output channel(s)"
        );
    }
    if exp.train.cldice.is_none() && ops::cpu_custom(logits) {
        return fused_ce_dice(logits, labels, &weights, dice);
    }
    composite_loss(exp, logits, labels, &weights)
}

/// The loss of the training forward's outputs: [`loss_fn`] of the main logits, or with deep
/// supervision the weighted mean of every output's loss (`model.deep_supervision`).
pub fn supervised_loss(
    exp: &Experiment,
    outputs: &[(Tensor, f64)],
    labels: &[u8],
) -> Result<Tensor> {
    if let [(logits, _)] = outputs {
        return loss_fn(exp, logits, labels);
    }
    let total: f64 = outputs.iter().map(|(_, w)| w).sum();
    let mut sum: Option<Tensor> = None;
    for (logits, w) in outputs {
        let term = (loss_fn(exp, logits, labels)? * (w / total))?;
        sum = Some(match sum {
            None => term,
            Some(s) => (s + term)?,
        });
    }
    sum.ok_or_else(|| anyhow::anyhow!("the model gave no output to train on"))
}

/// `train.class_weights`, or 1 for each of the `c` classes.
fn class_weights(exp: &Experiment, c: usize) -> Vec<f32> {
    if exp.train.class_weights.is_empty() {
        vec![1.0; c]
    } else {
        exp.train.class_weights.iter().map(|&x| x as f32).collect()
    }
}

/// [`loss_fn`] as a composition of Candle ops: every device, and clDice.
fn composite_loss(
    exp: &Experiment,
    logits: &Tensor,
    labels: &[u8],
    weights: &[f32],
) -> Result<Tensor> {
    let (n, c, h, w) = logits.dims4()?;
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
    let target =
        Tensor::from_vec(onehot, (n, c, h, w), logits.device())?.to_dtype(logits.dtype())?;
    let logp = candle_nn::ops::log_softmax(logits, 1)?;
    let mut loss = ((logp * &target)?.sum_all()? * (-1.0 / denom))?;
    let dice = exp.train.loss == Loss::CeDice;
    if !dice && exp.train.cldice.is_none() {
        return Ok(loss);
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

/// The fused op behind [`loss_fn`] on the CPU: `logits` [N, C, H, W] (f32 or f64, any layout).
fn fused_ce_dice(logits: &Tensor, labels: &[u8], weights: &[f32], dice: bool) -> Result<Tensor> {
    let (n, _, h, w) = logits.dims4()?;
    if labels.len() != n * h * w {
        anyhow::bail!("{} labels for {n}×{h}×{w} logits", labels.len());
    }
    let op = FusedCeDice {
        labels: labels.to_vec(),
        weights: weights.iter().map(|&v| v as f64).collect(),
        dice,
        sums: OnceLock::new(),
    };
    Ok(logits.contiguous()?.apply_op1(op)?)
}

/// Cross-entropy and, with `dice`, the soft Dice loss of class 1, from the logits in one op:
///
/// ```text
/// p = softmax over C,  y = min(label, C − 1),  t = [label = 1]
/// CE   = −Σ w_y · log p_y / Σ w_y                     (PyTorch's weighted mean)
/// Dice = 1 − (2·I + 1) / (P + T + 1),  I = Σ p₁·t,  P = Σ p₁,  T = Σ t
/// ∂CE/∂z_k   = w_y · (p_k − [k = y]) / Σ w_y
/// ∂Dice/∂z_k = g · p₁ · ([k = 1] − p_k),  g = ∂Dice/∂p₁ = (2I + 1)/(P + T + 1)² − 2t/(P + T + 1)
/// ```
///
/// Sums are f64, images run in parallel and their sums are added in image order, so the loss
/// and its gradient are the same bits for any thread count. The forward keeps its sums for the
/// backward.
struct FusedCeDice {
    labels: Vec<u8>,
    weights: Vec<f64>,
    dice: bool,
    sums: OnceLock<Sums>,
}

/// The loss's batch sums: `Σ w_y log p_y`, `Σ w_y`, I, P, T.
#[derive(Clone, Copy, Default, Debug)]
struct Sums {
    wlogp: f64,
    wsum: f64,
    inter: f64,
    p1: f64,
    t1: f64,
}

impl Sums {
    fn add(self, o: Sums) -> Sums {
        Sums {
            wlogp: self.wlogp + o.wlogp,
            wsum: self.wsum + o.wsum,
            inter: self.inter + o.inter,
            p1: self.p1 + o.p1,
            t1: self.t1 + o.t1,
        }
    }

    fn loss(&self, dice: bool) -> f64 {
        let ce = -self.wlogp / self.wsum;
        if dice {
            ce + 1.0 - (2.0 * self.inter + 1.0) / (self.p1 + self.t1 + 1.0)
        } else {
            ce
        }
    }
}

impl FusedCeDice {
    /// The softmax of pixel `i` of one image `z` [C, HW] into `p`; returns log Σ exp(z − max)
    /// and the max, so that log p_k = z_k − max − lse.
    #[inline]
    fn softmax<T: WithDType>(z: &[T], hw: usize, i: usize, p: &mut [f64]) -> (f64, f64) {
        let mut m = f64::NEG_INFINITY;
        for (k, pk) in p.iter_mut().enumerate() {
            *pk = z[k * hw + i].to_f64();
            m = m.max(*pk);
        }
        let mut s = 0.0;
        for pk in p.iter_mut() {
            *pk = (*pk - m).exp();
            s += *pk;
        }
        for pk in p.iter_mut() {
            *pk /= s;
        }
        (s.ln(), m)
    }

    fn class(&self, label: u8, c: usize) -> usize {
        (label as usize).min(c - 1)
    }

    fn forward<T: WithDType>(&self, z: &[T], c: usize, hw: usize) -> Sums {
        z.par_chunks(c * hw)
            .zip(self.labels.par_chunks(hw))
            .map(|(zi, li)| {
                let mut p = vec![0f64; c];
                let mut s = Sums::default();
                for (i, &l) in li.iter().enumerate() {
                    let (lse, m) = Self::softmax(zi, hw, i, &mut p);
                    let y = self.class(l, c);
                    let w = self.weights[y];
                    s.wlogp += w * (zi[y * hw + i].to_f64() - m - lse);
                    s.wsum += w;
                    if self.dice {
                        let t = if l == 1 { 1.0 } else { 0.0 };
                        s.inter += p[1] * t;
                        s.p1 += p[1];
                        s.t1 += t;
                    }
                }
                s
            })
            .collect::<Vec<Sums>>()
            .into_iter()
            // In image order: the same sums for any thread count and any work stealing.
            .fold(Sums::default(), Sums::add)
    }

    fn backward<T: WithDType>(&self, z: &[T], c: usize, hw: usize, sums: Sums, g: f64) -> Vec<T> {
        let d = sums.p1 + sums.t1 + 1.0;
        let (g_inter, g_t) = ((2.0 * sums.inter + 1.0) / (d * d), -2.0 / d);
        let mut gz = vec![T::zero(); z.len()];
        gz.par_chunks_mut(c * hw)
            .zip(z.par_chunks(c * hw))
            .zip(self.labels.par_chunks(hw))
            .for_each(|((gi, zi), li)| {
                let mut p = vec![0f64; c];
                for (i, &l) in li.iter().enumerate() {
                    Self::softmax(zi, hw, i, &mut p);
                    let y = self.class(l, c);
                    let wce = g * self.weights[y] / sums.wsum;
                    let gd = if self.dice {
                        let t = if l == 1 { 1.0 } else { 0.0 };
                        g * (g_inter + g_t * t) * p[1]
                    } else {
                        0.0
                    };
                    for (k, &pk) in p.iter().enumerate() {
                        let ce = wce * (pk - if k == y { 1.0 } else { 0.0 });
                        let di = if self.dice {
                            gd * (if k == 1 { 1.0 } else { 0.0 } - pk)
                        } else {
                            0.0
                        };
                        gi[k * hw + i] = T::from_f64(ce + di);
                    }
                }
            });
        gz
    }
}

impl CustomOp1 for FusedCeDice {
    fn name(&self) -> &'static str {
        "driveline-ce-dice"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, c, h, w) = l.shape().dims4()?;
        let (sums, out) = match s {
            CpuStorage::F32(_) => {
                let sums = self.forward(ops::cpu_slice::<f32>(s, l, "fused loss")?, c, h * w);
                (sums, CpuStorage::F32(vec![sums.loss(self.dice) as f32]))
            }
            CpuStorage::F64(_) => {
                let sums = self.forward(ops::cpu_slice::<f64>(s, l, "fused loss")?, c, h * w);
                (sums, CpuStorage::F64(vec![sums.loss(self.dice)]))
            }
            _ => candle_core::bail!("fused loss: unsupported dtype {:?}", s.dtype()),
        };
        // A second forward of the same op (not done by Candle) would find the same sums.
        let _ = self.sums.set(sums);
        Ok((out, Shape::from(())))
    }

    fn bwd(&self, z: &Tensor, _loss: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let Some(&sums) = self.sums.get() else {
            candle_core::bail!("fused loss: backward before forward");
        };
        let g = g.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let (_, c, h, w) = z.dims4()?;
        let (s, l) = z.storage_and_layout();
        let gz = match &*s {
            candle_core::Storage::Cpu(cs @ CpuStorage::F32(_)) => {
                let v = self.backward(
                    ops::cpu_slice::<f32>(cs, l, "fused loss")?,
                    c,
                    h * w,
                    sums,
                    g,
                );
                Tensor::from_vec(v, z.shape(), z.device())?
            }
            candle_core::Storage::Cpu(cs @ CpuStorage::F64(_)) => {
                let v = self.backward(
                    ops::cpu_slice::<f64>(cs, l, "fused loss")?,
                    c,
                    h * w,
                    sums,
                    g,
                );
                Tensor::from_vec(v, z.shape(), z.device())?
            }
            _ => candle_core::bail!("fused loss: backward needs CPU f32/f64 logits"),
        };
        Ok(Some(gz))
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Seeded logits [n, c, h, w] in `dtype` and labels, some ≥ c (clamped to the last class).
    fn case(n: usize, c: usize, h: usize, w: usize, dtype: DType) -> (Var, Vec<u8>) {
        let mut rng = StdRng::seed_from_u64((n * 1000 + c * 100 + h * 10 + w) as u64);
        let z: Vec<f64> = (0..n * c * h * w)
            .map(|_| rng.random_range(-3.0..3.0))
            .collect();
        let labels = (0..n * h * w)
            .map(|_| rng.random_range(0..=c as u8))
            .collect();
        let z = Tensor::from_vec(z, (n, c, h, w), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        (Var::from_tensor(&z).unwrap(), labels)
    }

    fn experiment(dice: bool, weights: &[f64]) -> Experiment {
        let mut e = Experiment::template();
        e.train.loss = if dice { Loss::CeDice } else { Loss::Ce };
        e.train.class_weights = weights.to_vec();
        e
    }

    /// Loss value and gradient (as f64 vectors) of one path.
    fn value_and_grad(loss: Tensor, z: &Var) -> (f64, Vec<f64>) {
        let g = loss.backward().unwrap();
        let gz = g.get(z.as_tensor()).unwrap();
        let v = loss
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let gz = gz
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        (v, gz)
    }

    /// The fused op and the composition of Candle ops give the same loss and gradient in f64
    /// (to rounding) and in f32 (to f32 precision), with and without Dice and class weights,
    /// for 2 and 3 classes and labels past the last class.
    #[test]
    fn fused_matches_composite() {
        for (c, weights) in [(2, vec![]), (2, vec![1.0, 1.5]), (3, vec![0.5, 2.0, 1.0])] {
            for dice in [false, true] {
                let e = experiment(dice, &weights);
                for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-6)] {
                    let (z, labels) = case(3, c, 5, 7, dtype);
                    let w = class_weights(&e, c);
                    let fused = value_and_grad(
                        fused_ce_dice(z.as_tensor(), &labels, &w, dice).unwrap(),
                        &z,
                    );
                    let comp =
                        value_and_grad(composite_loss(&e, z.as_tensor(), &labels, &w).unwrap(), &z);
                    let what = format!("{c} classes, weights {weights:?}, dice {dice}, {dtype:?}");
                    assert!(
                        (fused.0 - comp.0).abs() <= tol * comp.0.abs(),
                        "loss {} against {}: {what}",
                        fused.0,
                        comp.0
                    );
                    let scale = comp.1.iter().fold(0f64, |a, v| a.max(v.abs()));
                    let err = fused
                        .1
                        .iter()
                        .zip(&comp.1)
                        .fold(0f64, |a, (x, y)| a.max((x - y).abs()));
                    assert!(
                        err <= tol * scale,
                        "gradient off by {err} of {scale}: {what}"
                    );
                }
            }
        }
    }

    /// The fused op's gradient against central differences of its own loss, in f64, at every
    /// logit, with Dice and class weights.
    #[test]
    fn fused_gradient_matches_finite_differences() {
        let (z, labels) = case(2, 3, 4, 5, DType::F64);
        let w = [0.5f32, 2.0, 1.0];
        let loss = |t: &Tensor| -> f64 {
            fused_ce_dice(t, &labels, &w, true)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let (_, g) = value_and_grad(fused_ce_dice(z.as_tensor(), &labels, &w, true).unwrap(), &z);
        let base: Vec<f64> = z.flatten_all().unwrap().to_vec1().unwrap();
        let h = 1e-6;
        for (i, &gi) in g.iter().enumerate() {
            let at = |d: f64| {
                let mut v = base.clone();
                v[i] += d;
                loss(&Tensor::from_vec(v, z.shape(), &Device::Cpu).unwrap())
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            assert!((fd - gi).abs() < 1e-8, "logit {i}: {gi} against {fd}");
        }
    }

    /// Training is reproducible for any thread count: the fused loss and its gradient are the
    /// same bits on 1, 2 and 3 threads (f64, where any change in the order of the sums shows).
    #[test]
    fn fused_is_the_same_bits_on_any_thread_count() {
        let (z, labels) = case(7, 2, 9, 11, DType::F64);
        let w = [1.0f32, 1.5];
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let (v, g) = pool.install(|| {
                value_and_grad(fused_ce_dice(z.as_tensor(), &labels, &w, true).unwrap(), &z)
            });
            (
                v.to_bits(),
                g.iter().map(|x| x.to_bits()).collect::<Vec<u64>>(),
            )
        };
        let one = run(1);
        for threads in [2, 3] {
            assert!(run(threads) == one, "{threads} threads differ from one");
        }
    }

    /// Deep supervision's loss is the weighted mean of each output's loss; one output is
    /// the plain loss.
    #[test]
    fn supervised_loss_is_the_weighted_mean() {
        let mut exp = Experiment::template();
        exp.train.loss = Loss::CeDice;
        let z = |seed: u64| {
            let v: Vec<f32> = (0..2 * 2 * 4 * 4)
                .map(|i| ((i as u64 * 7 + seed * 13) % 11) as f32 / 5.0 - 1.0)
                .collect();
            Tensor::from_vec(v, (2, 2, 4, 4), &Device::Cpu).unwrap()
        };
        let labels: Vec<u8> = (0..2 * 4 * 4).map(|i| (i % 3 == 0) as u8).collect();
        let l = |t: &Tensor| {
            loss_fn(&exp, t, &labels)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let (a, b, c) = (z(1), z(2), z(3));
        let got = supervised_loss(
            &exp,
            &[(a.clone(), 1.0), (b.clone(), 0.5), (c.clone(), 0.25)],
            &labels,
        )
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
        let want = (l(&a) + 0.5 * l(&b) + 0.25 * l(&c)) / 1.75;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        assert!(
            (l(&a) - l(&b)).abs() > 1e-3,
            "the outputs must differ for the test to mean anything"
        );
        let one = supervised_loss(&exp, &[(a.clone(), 1.0)], &labels).unwrap();
        assert_eq!(one.to_scalar::<f32>().unwrap(), l(&a));
    }

    /// The train stage's entry point takes the fused op on the CPU, the composition where the
    /// generic path is forced: the same loss either way.
    #[test]
    fn loss_fn_dispatch_gives_the_same_loss() {
        let e = experiment(true, &[1.0, 1.5]);
        let (z, labels) = case(2, 2, 6, 6, DType::F32);
        let v = |t: Tensor| t.to_scalar::<f32>().unwrap();
        let fused = v(loss_fn(&e, z.as_tensor(), &labels).unwrap());
        let direct = v(fused_ce_dice(z.as_tensor(), &labels, &[1.0, 1.5], true).unwrap());
        let prev = ops::set_force_generic(true);
        let comp = v(loss_fn(&e, z.as_tensor(), &labels).unwrap());
        ops::set_force_generic(prev);
        assert_eq!(
            fused.to_bits(),
            direct.to_bits(),
            "the CPU path is the fused op"
        );
        assert_ne!(
            fused.to_bits(),
            comp.to_bits(),
            "the forced path is the composition"
        );
        assert!((fused - comp).abs() < 1e-6, "{fused} against {comp}");
    }
}
