//! BatchNorm2d with PyTorch semantics.

use candle_core::{Result, Tensor};

/// BatchNorm2d with PyTorch semantics.
///
/// Training mode normalises with the batch statistics (biased variance) and updates the running
/// stats in place: `running = (1 - momentum) * running + momentum * batch` with the *unbiased*
/// batch variance. Eval mode normalises with the running stats.
/// Parameter names follow torchvision: `weight`, `bias`, `running_mean`, `running_var`,
/// `num_batches_tracked`.
#[derive(Clone, Debug)]
pub struct BatchNorm2d {
    pub weight: candle_core::Var,
    pub bias: candle_core::Var,
    pub running_mean: candle_core::Var,
    pub running_var: candle_core::Var,
    pub momentum: f64,
    pub eps: f64,
}

impl BatchNorm2d {
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let shape = (1, (), 1, 1);
        let (mean, var) = if train {
            let mean = x.mean_keepdim((0, 2, 3))?;
            let centered = x.broadcast_sub(&mean)?;
            let var = centered.sqr()?.mean_keepdim((0, 2, 3))?;
            let (n, _, h, w) = x.dims4()?;
            let count = (n * h * w) as f64;
            let unbiased = (var.detach().flatten_all()? * (count / (count - 1.0).max(1.0)))?;
            let m = self.momentum;
            self.running_mean.set(
                &((self.running_mean.as_tensor() * (1.0 - m))?
                    + (mean.detach().flatten_all()? * m)?)?,
            )?;
            self.running_var
                .set(&((self.running_var.as_tensor() * (1.0 - m))? + (unbiased * m)?)?)?;
            (mean, var)
        } else {
            (
                self.running_mean.as_tensor().reshape(shape)?,
                self.running_var.as_tensor().reshape(shape)?,
            )
        };
        let inv = (var + self.eps)?.sqrt()?.recip()?;
        let scale = self
            .weight
            .as_tensor()
            .reshape(shape)?
            .broadcast_mul(&inv)?;
        x.broadcast_sub(&mean)?
            .broadcast_mul(&scale)?
            .broadcast_add(&self.bias.as_tensor().reshape(shape)?)
    }
}
