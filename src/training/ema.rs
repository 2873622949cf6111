//! An exponential moving average (EMA) of a model's weights, `train.ema`.
//!
//! The average covers the whole `state_dict`: parameters and BatchNorm running statistics, as
//! timm's `ModelEmaV2` does; integer entries (`num_batches_tracked`) are copied. It starts as
//! a copy of the model and, after the model's optimiser step t (1-based), moves towards it:
//!
//! ```text
//! d_t    = min(decay, (1 + t) / (10 + t))      the warm-up of TensorFlow's and timm's EMA
//! avg_t  = d_t · avg_{t-1} + (1 − d_t) · w_t
//! ```
//!
//! The warm-up keeps the first steps, taken from random initial weights, from dominating the
//! average of a short run. Validation, the kept checkpoints and evaluation use the average;
//! the optimiser keeps stepping the raw weights.

use std::collections::HashMap;

use anyhow::{Context, Result};
use candle_core::Tensor;

use crate::model::SegModel;

/// The decay applied after optimiser step `t` (1-based) for a target `decay`.
pub fn decay_at(decay: f64, t: u64) -> f64 {
    decay.min((1.0 + t as f64) / (10.0 + t as f64))
}

/// The averaged weights, held as a second model of the same configuration (so that it
/// validates, predicts and saves like any model).
pub struct Ema {
    pub model: SegModel,
    decay: f64,
    /// Updates applied so far (the `t` of the last one).
    pub updates: u64,
}

impl Ema {
    /// An average that starts at `model`'s current weights, `updates` steps into the run.
    pub fn new(model: &SegModel, decay: f64, updates: u64) -> Result<Self> {
        let copy = SegModel::new(model.config(), model.device(), 0)?;
        copy.load_state_dict(&copied(model)?)
            .context("copying the weights into the EMA model")?;
        Ok(Ema {
            model: copy,
            decay,
            updates,
        })
    }

    /// One update towards `model`'s weights, after its optimiser step.
    pub fn update(&mut self, model: &SegModel) -> Result<()> {
        self.updates += 1;
        let d = decay_at(self.decay, self.updates);
        let avg: HashMap<String, Tensor> = self.model.state_dict()?.into_iter().collect();
        let mut next = HashMap::with_capacity(avg.len());
        for (k, w) in model.state_dict()? {
            let a = avg
                .get(&k)
                .with_context(|| format!("the EMA model has no `{k}`"))?;
            let v = if w.dtype().is_float() {
                ((a * d)? + (&w * (1.0 - d))?)?
            } else {
                w.copy()?
            };
            next.insert(k, v);
        }
        self.model.load_state_dict(&next)
    }
}

/// `model`'s state as tensors that share no storage with its variables.
fn copied(model: &SegModel) -> Result<HashMap<String, Tensor>> {
    model
        .state_dict()?
        .into_iter()
        .map(|(k, t)| Ok((k, t.copy()?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::schema::{Arch, ModelConfig};
    use candle_core::{DType, Device};

    fn tiny() -> SegModel {
        let cfg = ModelConfig {
            arch: Arch::Unet,
            widths: vec![4, 8],
            ..ModelConfig::default()
        };
        SegModel::new(&cfg, &Device::Cpu, 7).unwrap()
    }

    fn set_all(model: &SegModel, value: f64) {
        let sd: HashMap<String, Tensor> = model
            .state_dict()
            .unwrap()
            .into_iter()
            .map(|(k, t)| {
                let v = if t.dtype().is_float() {
                    (t.ones_like().unwrap() * value).unwrap()
                } else {
                    t.copy().unwrap()
                };
                (k, v)
            })
            .collect();
        model.load_state_dict(&sd).unwrap();
    }

    fn values(model: &SegModel) -> Vec<(String, Vec<f64>)> {
        model
            .state_dict()
            .unwrap()
            .into_iter()
            .filter(|(_, t)| t.dtype().is_float())
            .map(|(k, t)| {
                let v = t
                    .to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap();
                (k, v)
            })
            .collect()
    }

    #[test]
    fn the_warm_up_decay_follows_the_formula() {
        assert!((decay_at(0.999, 1) - 2.0 / 11.0).abs() < 1e-15);
        assert!((decay_at(0.999, 90) - 91.0 / 100.0).abs() < 1e-15);
        assert_eq!(decay_at(0.5, 100), 0.5);
        assert_eq!(decay_at(0.999, 100_000), 0.999);
    }

    /// Weights 1, then 3, then 5 after three steps with decay 0.25, from a start of 1:
    /// d_1 = min(0.25, 2/11) = 2/11, d_2 = d_3 = 0.25 (3/12 and 4/13 exceed it), so
    /// avg_1 = 2/11·1 + 9/11·1 = 1, avg_2 = 0.25·1 + 0.75·3 = 2.5, avg_3 = 0.25·2.5 + 0.75·5
    /// = 4.375, in every float entry (BatchNorm statistics included).
    #[test]
    fn the_average_matches_a_hand_computed_example() {
        let m = tiny();
        set_all(&m, 1.0);
        let mut ema = Ema::new(&m, 0.25, 0).unwrap();
        let expect = [(1.0, 1.0), (3.0, 2.5), (5.0, 4.375)];
        for (w, avg) in expect {
            set_all(&m, w);
            ema.update(&m).unwrap();
            for (k, v) in values(&ema.model) {
                assert!(
                    v.iter().all(|x| (x - avg).abs() < 1e-6),
                    "{k}: {:?} after w = {w}, expected {avg}",
                    &v[..v.len().min(4)]
                );
            }
        }
        assert_eq!(ema.updates, 3);
        // The raw model is untouched by the average.
        assert!(values(&m).iter().all(|(_, v)| v.iter().all(|&x| x == 5.0)));
    }

    /// The average's start is a copy: later changes to the model reach it only through update.
    #[test]
    fn the_average_does_not_share_storage_with_the_model() {
        let m = tiny();
        set_all(&m, 2.0);
        let ema = Ema::new(&m, 0.9, 0).unwrap();
        set_all(&m, -1.0);
        assert!(values(&ema.model)
            .iter()
            .all(|(_, v)| v.iter().all(|&x| x == 2.0)));
    }
}
