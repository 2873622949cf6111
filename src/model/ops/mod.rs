//! Differentiable ops that Candle 0.11 lacks or runs slowly, each with its backward.
//!
//! The API is fixed (the models call it); the implementations behind it may change.
//! All tensors are NCHW f32.

use candle_core::{Result, Tensor};

/// 2-D convolution, PyTorch semantics: `x` [N, C, H, W], `w` [O, C, kh, kw], optional bias [O];
/// symmetric `padding`, `stride`, `dilation`; groups = 1.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    dilation: usize,
) -> Result<Tensor> {
    let y = x.conv2d(w, padding, stride, dilation, 1)?;
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
        None => Ok(y),
    }
}

/// Max pooling with square `kernel`, `stride` and implicit -inf `padding` (PyTorch's `max_pool2d`).
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let x = if padding > 0 {
        x.pad_with_same(2, padding, padding)?
            .pad_with_same(3, padding, padding)?
    } else {
        x.clone()
    };
    x.max_pool2d_with_stride(kernel, stride)
}

/// Bilinear resize of [N, C, H, W] to [N, C, out_h, out_w], align_corners = false
/// (PyTorch's `F.interpolate(mode="bilinear")`). Differentiable.
pub fn resize_bilinear(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    x.upsample_nearest2d(out_h, out_w)
}

/// 2-D transposed convolution: `x` [N, C, H, W], `w` [C, O, kh, kw] (PyTorch's layout),
/// optional bias [O]; used by the U-Net decoder (kernel 2, stride 2).
pub fn conv_transpose2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
) -> Result<Tensor> {
    let y = x.conv_transpose2d(w, 0, 0, stride, 1)?;
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
        None => Ok(y),
    }
}

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
