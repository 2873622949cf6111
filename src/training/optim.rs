//! Optimizers over named parameters, with state that can be saved and restored exactly
//! (training resumes from a checkpoint to the same weights as an uninterrupted run).
//!
//! Adam and AdamW follow `torch.optim.Adam` / `AdamW` (bias-corrected moments; Adam adds the
//! weight decay to the gradient, AdamW decays the weights directly); SGD follows
//! `torch.optim.SGD` with momentum (dampening 0, no Nesterov).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::config::Optimizer as Kind;

mod fused;

pub struct Optimizer {
    kind: Kind,
    params: Vec<(String, Var)>,
    /// First moment (Adam) or momentum buffer (SGD), by parameter name.
    m: HashMap<String, Tensor>,
    /// Second moment (Adam).
    v: HashMap<String, Tensor>,
    /// Steps taken.
    pub step: u64,
    pub lr: f64,
    pub weight_decay: f64,
    pub momentum: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
}

impl Optimizer {
    pub fn new(
        kind: Kind,
        params: Vec<(String, Var)>,
        lr: f64,
        weight_decay: f64,
        momentum: f64,
    ) -> Self {
        Optimizer {
            kind,
            params,
            m: HashMap::new(),
            v: HashMap::new(),
            step: 0,
            lr,
            weight_decay,
            momentum,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }

    /// One update from the gradients of `loss`.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.apply(&grads)
    }

    fn apply(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        // Moved out while the updates borrow `self` mutably, and always put back.
        let params = std::mem::take(&mut self.params);
        let res = params.iter().try_for_each(|(name, var)| {
            let Some(g) = grads.get(var.as_tensor()) else {
                return Ok(());
            };
            let w = var.as_tensor();
            if fused::supported(w, g) {
                self.fused_update(name, w, g)
            } else {
                self.tensor_update(name, var, g)
            }
        });
        self.params = params;
        res
    }

    /// The update of one parameter as a single in-place pass over `w`, its moments and `g`
    /// (CPU, f32/f64): the tensor-op version below allocates ~10 parameter-sized temporaries.
    fn fused_update(&mut self, name: &str, w: &Tensor, g: &Tensor) -> Result<()> {
        let h = fused::Hyper {
            kind: self.kind,
            step: self.step,
            lr: self.lr,
            weight_decay: self.weight_decay,
            momentum: self.momentum,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
        };
        let g = g.contiguous()?;
        // Moments absent before the first step are zeros: β·0 + (1-β)·g is (1-β)·g exactly,
        // as in the tensor path; SGD's first momentum buffer is the gradient itself.
        let first = !self.m.contains_key(name);
        let fresh = |t: Option<&Tensor>| match t {
            Some(t) => t.contiguous(),
            None => w.zeros_like(),
        };
        let m = fresh(self.m.get(name))?;
        match self.kind {
            Kind::Adam | Kind::Adamw => {
                let v = fresh(self.v.get(name))?;
                fused::adam(&h, w, &g, &m, &v)?;
                self.v.insert(name.to_string(), v);
                self.m.insert(name.to_string(), m);
            }
            Kind::Sgd => {
                fused::sgd(&h, w, &g, &m, first)?;
                if self.momentum > 0.0 {
                    self.m.insert(name.to_string(), m);
                }
            }
        }
        Ok(())
    }

    /// The same update as [`Self::fused_update`] in Candle tensor ops (any device and dtype).
    fn tensor_update(&mut self, name: &str, var: &Var, g: &Tensor) -> Result<()> {
        let t = self.step as i32;
        let w = var.as_tensor();
        match self.kind {
            Kind::Adam | Kind::Adamw => {
                let g = if self.kind == Kind::Adam && self.weight_decay > 0.0 {
                    (g + (w * self.weight_decay)?)?
                } else {
                    g.clone()
                };
                let m = match self.m.get(name) {
                    Some(m) => ((m * self.beta1)? + (&g * (1.0 - self.beta1))?)?,
                    None => (&g * (1.0 - self.beta1))?,
                };
                let v = match self.v.get(name) {
                    Some(v) => ((v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?,
                    None => (g.sqr()? * (1.0 - self.beta2))?,
                };
                let bc1 = 1.0 - self.beta1.powi(t);
                let bc2 = 1.0 - self.beta2.powi(t);
                let denom = ((v.sqrt()? / bc2.sqrt())? + self.eps)?;
                let upd = ((&m / denom)? * (self.lr / bc1))?;
                let base = if self.kind == Kind::Adamw && self.weight_decay > 0.0 {
                    (w * (1.0 - self.lr * self.weight_decay))?
                } else {
                    w.clone()
                };
                var.set(&(base - upd)?)?;
                self.m.insert(name.to_string(), m);
                self.v.insert(name.to_string(), v);
            }
            Kind::Sgd => {
                let g = if self.weight_decay > 0.0 {
                    (g + (w * self.weight_decay)?)?
                } else {
                    g.clone()
                };
                let d = if self.momentum > 0.0 {
                    let buf = match self.m.get(name) {
                        Some(b) => ((b * self.momentum)? + &g)?,
                        None => g,
                    };
                    self.m.insert(name.to_string(), buf.clone());
                    buf
                } else {
                    g
                };
                var.set(&(w - (d * self.lr)?)?)?;
            }
        }
        Ok(())
    }

    /// Save the optimizer state (moments and step count) as safetensors.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (k, t) in &self.m {
            tensors.insert(format!("m.{k}"), t.clone());
        }
        for (k, t) in &self.v {
            tensors.insert(format!("v.{k}"), t.clone());
        }
        let dev = self
            .params
            .first()
            .map(|(_, v)| v.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        tensors.insert("step".into(), Tensor::new(&[self.step as f64], &dev)?);
        let tmp = path.with_extension("tmp");
        candle_core::safetensors::save(&tensors, &tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    /// Restore what [`Optimizer::save`] wrote.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let dev = self
            .params
            .first()
            .map(|(_, v)| v.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let tensors = candle_core::safetensors::load(path, &dev)
            .with_context(|| format!("cannot read optimizer state {}", path.display()))?;
        self.m.clear();
        self.v.clear();
        for (k, t) in tensors {
            if let Some(n) = k.strip_prefix("m.") {
                self.m.insert(n.to_string(), t);
            } else if let Some(n) = k.strip_prefix("v.") {
                self.v.insert(n.to_string(), t);
            } else if k == "step" {
                self.step = t.to_vec1::<f64>()?.first().copied().unwrap_or(0.0) as u64;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Adam on f(w) = sum(w²)/2 (gradient w): the first step moves each weight by lr·sign(w).
    #[test]
    fn adam_first_step_is_lr_times_sign() {
        let w = Var::new(&[1.0f32, -2.0, 0.5], &Device::Cpu).unwrap();
        let mut opt = Optimizer::new(Kind::Adam, vec![("w".into(), w.clone())], 0.1, 0.0, 0.9);
        let loss = (w.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
        opt.backward_step(&loss).unwrap();
        let got = w.as_tensor().to_vec1::<f32>().unwrap();
        for (g, e) in got.iter().zip([0.9f32, -1.9, 0.4]) {
            assert!((g - e).abs() < 1e-5, "{got:?}");
        }
    }

    #[test]
    fn sgd_momentum_matches_hand_computation() {
        let w = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let mut opt = Optimizer::new(Kind::Sgd, vec![("w".into(), w.clone())], 0.1, 0.0, 0.9);
        for _ in 0..2 {
            let loss = (w.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
            opt.backward_step(&loss).unwrap();
        }
        // step 1: buf = 1, w = 0.9; step 2: buf = 0.9 + 0.9 = 1.8, w = 0.9 - 0.18 = 0.72
        let got = w.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((got - 0.72).abs() < 1e-6, "{got}");
    }

    /// The fused in-place update gives the tensor-op update's weights and moments (to f32
    /// rounding) for every optimizer, with and without weight decay and momentum.
    #[test]
    fn fused_matches_tensor_ops() {
        let init: Vec<f32> = (0..1000)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        for (kind, wd, mom) in [
            (Kind::Adam, 0.0, 0.9),
            (Kind::Adam, 0.1, 0.9),
            (Kind::Adamw, 0.1, 0.9),
            (Kind::Sgd, 0.05, 0.9),
            (Kind::Sgd, 0.0, 0.0),
        ] {
            let wa = Var::new(init.as_slice(), &Device::Cpu).unwrap();
            let wb = Var::new(init.as_slice(), &Device::Cpu).unwrap();
            let mut a = Optimizer::new(kind, vec![("w".into(), wa.clone())], 0.01, wd, mom);
            let mut b = Optimizer::new(kind, vec![("w".into(), wb.clone())], 0.01, wd, mom);
            for _ in 0..3 {
                // f(w) = Σ w³/3 + w: gradient w² + 1, different for every element.
                let loss = |w: &Var| {
                    let t = w.as_tensor();
                    ((t.powf(3.0).unwrap() / 3.0).unwrap() + t)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                };
                a.backward_step(&loss(&wa)).unwrap();
                let grads = loss(&wb).backward().unwrap();
                b.step += 1;
                let g = grads.get(wb.as_tensor()).unwrap();
                b.tensor_update("w", &wb, g).unwrap();
            }
            let close = |x: &Tensor, y: &Tensor| {
                let (x, y) = (x.to_vec1::<f32>().unwrap(), y.to_vec1::<f32>().unwrap());
                x.iter()
                    .zip(&y)
                    .all(|(p, q)| (p - q).abs() <= 1e-6 * (1.0 + q.abs()))
            };
            assert!(close(wa.as_tensor(), wb.as_tensor()), "{kind:?} weights");
            assert_eq!(a.m.len(), b.m.len(), "{kind:?}");
            for (k, m) in &b.m {
                assert!(close(&a.m[k], m), "{kind:?} first moment");
            }
            for (k, v) in &b.v {
                assert!(close(&a.v[k], v), "{kind:?} second moment");
            }
            assert!(a.v.len() == b.v.len());
        }
    }

    /// Save then load restores every piece of state exactly: both moments of every parameter
    /// (Adam/AdamW: m and v; SGD: the momentum buffer m) and the step count, and the restored
    /// optimizer takes the same next step as the original (what resuming a run relies on).
    #[test]
    fn state_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let init = |v: &[f32]| Var::new(v, &Device::Cpu).unwrap();
        let params = || {
            vec![
                ("w".to_string(), init(&[1.0, 2.0, -0.5])),
                ("b".to_string(), init(&[0.25])),
            ]
        };
        // f = Σ w³/3 + w: gradient w² + 1, different for every element and every step.
        let loss = |ps: &[(String, Var)]| {
            let mut total = Tensor::new(0f32, &Device::Cpu).unwrap();
            for (_, v) in ps {
                let t = v.as_tensor();
                let f = ((t.powf(3.0).unwrap() / 3.0).unwrap() + t).unwrap();
                total = (total + f.sum_all().unwrap()).unwrap();
            }
            total
        };
        let bits = |t: &Tensor| -> Vec<u32> {
            t.to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        };
        let same = |x: &HashMap<String, Tensor>, y: &HashMap<String, Tensor>, what: &str| {
            let mut kx: Vec<&String> = x.keys().collect();
            let mut ky: Vec<&String> = y.keys().collect();
            kx.sort();
            ky.sort();
            assert_eq!(kx, ky, "{what}: parameter names");
            for (k, t) in x {
                assert_eq!(t.dims(), y[k].dims(), "{what}.{k}: shape");
                assert_eq!(t.dtype(), y[k].dtype(), "{what}.{k}: dtype");
                assert_eq!(bits(t), bits(&y[k]), "{what}.{k}: values");
            }
        };
        for (kind, wd) in [(Kind::Adam, 0.0), (Kind::Adamw, 0.1), (Kind::Sgd, 0.01)] {
            let pa = params();
            let mut a = Optimizer::new(kind, pa.clone(), 0.01, wd, 0.9);
            for _ in 0..3 {
                a.backward_step(&loss(&pa)).unwrap();
            }
            let path = dir.path().join(format!("{kind:?}.safetensors"));
            a.save(&path).unwrap();

            // A fresh optimizer over parameters holding the same weights, as on resume.
            let pb = params();
            for ((_, va), (_, vb)) in pa.iter().zip(&pb) {
                vb.set(va.as_tensor()).unwrap();
            }
            let mut b = Optimizer::new(kind, pb.clone(), 0.01, wd, 0.9);
            b.load(&path).unwrap();
            assert_eq!(a.step, 3, "{kind:?}");
            assert_eq!(b.step, a.step, "{kind:?}: step");
            assert_eq!(a.m.len(), 2, "{kind:?}: every parameter has a first moment");
            let n_v = if kind == Kind::Sgd { 0 } else { 2 };
            assert_eq!(a.v.len(), n_v, "{kind:?}: second moments");
            same(&a.m, &b.m, &format!("{kind:?} m"));
            same(&a.v, &b.v, &format!("{kind:?} v"));

            a.backward_step(&loss(&pa)).unwrap();
            b.backward_step(&loss(&pb)).unwrap();
            for ((n, va), (_, vb)) in pa.iter().zip(&pb) {
                assert_eq!(
                    bits(va.as_tensor()),
                    bits(vb.as_tensor()),
                    "{kind:?}: {n} after one more step"
                );
            }
        }
    }
}
