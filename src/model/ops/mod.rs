//! Differentiable ops that Candle 0.11 lacks or runs slowly, each with its backward.
//!
//! The API is fixed (the models call it); the implementations behind it may change.
//! All tensors are NCHW; the CPU kernels handle f32 and f64 (f64 for precise gradient checks).

mod batchnorm;
mod bias;
mod conv;
mod convt;
mod direct;
mod gemm;
mod generic;
mod pool;
mod relu;
mod resize;
mod winograd;

pub use batchnorm::BatchNorm2d;
pub(crate) use conv::slice as cpu_slice;
pub use conv::{direct_conv_available, set_direct_conv, set_winograd_conv, WinogradMode};
pub(crate) use generic::cpu_custom;
pub use generic::{autocast, generic_forced, set_autocast, set_force_generic};

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{Result, Tensor};

/// A vector of `len` elements that `fill` writes, without zero-filling it first: a zero fill
/// (or a copy) of an op's output ran on the calling thread while the pool waited.
///
/// # Safety
/// `fill` must initialise every one of the `len` elements it is given.
pub(crate) unsafe fn filled<T>(len: usize, fill: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    fill(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: the caller's promise.
    unsafe { v.set_len(len) };
    v
}

/// `len` zeros written by the pool's threads, for outputs that are accumulated into. A
/// `vec![0.0; len]` of an op's output is a serial memset (glibc's calloc clears reused heap
/// memory on the calling thread) while the pool waits: 2–3 % of the DeepLabV3 step's samples.
pub(crate) fn zeros<T: candle_core::WithDType>(len: usize) -> Vec<T> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 15;
    let zero = T::from_f64(0.0);
    if len <= CHUNK {
        return vec![zero; len];
    }
    // SAFETY: the chunks cover all `len` elements, and each task writes every one of its own.
    unsafe {
        filled(len, |v| {
            v.par_chunks_mut(CHUNK).for_each(|c| {
                for e in c {
                    e.write(zero);
                }
            })
        })
    }
}

/// Multiply-add FLOPs (2 per MAC) of every forward convolution since the last reset: the
/// benchmarks' FLOP count.
static CONV_FLOPS: AtomicU64 = AtomicU64::new(0);

pub fn reset_conv_flops() {
    CONV_FLOPS.store(0, Ordering::Relaxed);
}

pub fn conv_flops() -> u64 {
    CONV_FLOPS.load(Ordering::Relaxed)
}

/// 2-D convolution, PyTorch semantics: `x` [N, C, H, W], `w` [O, C, kh, kw], optional bias [O];
/// symmetric `padding`, `stride`, `dilation`; groups = 1.
///
/// On CPU (f32/f64) this is an im2col + GEMM custom op whose backward also runs on GEMM (Candle's
/// CPU input gradient is a naive transposed convolution), except f32 3×3 stride-1 "same"
/// convolutions: with ≥ 128 channels on maps of ≥ 32×32 they run Winograd F(2×2, 3×3)
/// (`winograd.rs`; [`set_winograd_conv`]), and otherwise on x86-64 CPUs with AVX2 and FMA
/// direct kernels without im2col (`direct.rs`; [`set_direct_conv`] turns them off); elsewhere (and with
/// [`set_force_generic`]) the device-generic formulation: Candle's conv2d forward, the input
/// gradient as a forward convolution, the weight gradient as a GEMM (see `generic.rs`).
/// The padding may exceed the image (ASPP's dilated branches on small inputs).
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    dilation: usize,
) -> Result<Tensor> {
    if let (Ok((n, c, _, _)), Ok((o, _, kh, kw))) = (x.dims4(), w.dims4()) {
        let y_hw = |len: usize, k: usize| {
            (len + 2 * padding).saturating_sub(dilation * (k - 1) + 1) / stride + 1
        };
        let (h, wd) = (x.dim(2)?, x.dim(3)?);
        let macs = n * o * c * kh * kw * y_hw(h, kh) * y_hw(wd, kw);
        CONV_FLOPS.fetch_add(2 * macs as u64, Ordering::Relaxed);
    }
    let y = if conv::supported(x) {
        conv::conv2d_cpu(x, w, stride, padding, dilation)?
    } else {
        generic::conv2d(x, w, stride, padding, dilation)?
    };
    match bias {
        Some(b) => bias::add_channel_bias(&y, b),
        None => Ok(y),
    }
}

/// `max(x, 0)` with a one-pass backward (zero gradient at 0, as PyTorch). Candle's own `relu`
/// backward takes four tensor-sized passes.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    relu::relu(x)
}

/// `max(a + b, 0)` (a residual connection and its ReLU) as one op with a one-pass backward.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    relu::add_relu(a, b)
}

/// `relu(y + r)` for inference, written over `y`'s storage where it can be (CPU f32/f64,
/// contiguous, no graph tracked by either): `y` must be a fresh result that no tensor still in
/// use shares storage with. Bitwise equal to `relu(&(y + r)?)`, which it falls back to.
pub fn add_relu_in_place(y: Tensor, r: &Tensor) -> Result<Tensor> {
    relu::add_relu_in_place(y, r)
}

/// Max pooling with square `kernel`, `stride` and implicit -inf `padding` (PyTorch's `max_pool2d`,
/// floor mode). The gradient goes to the first maximum of each window in scan order, as in
/// PyTorch.
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    pool::max_pool2d(x, kernel, stride, padding)
}

/// Bilinear resize of [N, C, H, W] to [N, C, out_h, out_w], align_corners = false
/// (PyTorch's `F.interpolate(mode="bilinear")`, without antialiasing, also when downsampling).
/// Differentiable: two matmuls with interpolation matrices.
pub fn resize_bilinear(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    resize::resize_bilinear(x, out_h, out_w)
}

/// 2-D transposed convolution: `x` [N, C, H, W], `w` [C, O, kh, kw] (PyTorch's layout),
/// optional bias [O]; used by the U-Net decoder (kernel 2, stride 2).
///
/// Only non-overlapping kernels (`kh == kw == stride`, no padding) are supported: then every
/// input pixel writes its own `stride`×`stride` output block, which is one matmul and a pixel
/// shuffle. On CPU (f32/f64) that is a custom op with a GEMM backward; elsewhere (and with
/// [`set_force_generic`]) Candle's matmul and reshapes, which its autograd differentiates.
/// Other shapes are an error.
pub fn conv_transpose2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
) -> Result<Tensor> {
    let c = x.dims4()?.1;
    let (wc, _, kh, kw) = w.dims4()?;
    if wc != c {
        candle_core::bail!("conv_transpose2d: input has {c} channels but the weight expects {wc}");
    }
    if kh != stride || kw != stride {
        candle_core::bail!(
            "conv_transpose2d: only kernel == stride is supported (kernel {kh}x{kw}, stride {stride})"
        );
    }
    let y = if convt::supported(x, w) {
        convt::conv_transpose2d_cpu(x, w)?
    } else {
        conv_transpose2d_matmul(x, w)?
    };
    match bias {
        Some(b) => bias::add_channel_bias(&y, b),
        None => Ok(y),
    }
}

/// [`conv_transpose2d`] without bias from Candle ops: [N·H·W, C] · [C, O·s·s], then
/// [N, H, W, O, s, s] -> [N, O, H, s, W, s]. Shapes are checked by the caller.
/// Under [`set_autocast`] the GEMM runs in the autocast dtype (Candle's autograd casts the
/// gradients back).
fn conv_transpose2d_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (n, c, h, wd) = x.dims4()?;
    let (_, o, s, _) = w.dims4()?;
    let p = generic::Prod::of(x);
    let cols = x.permute((0, 2, 3, 1))?.reshape((n * h * wd, c))?;
    let y = p
        .operand(&cols)?
        .matmul(&p.operand(&w.reshape((c, o * s * s))?)?)?;
    p.result(&y)?
        .reshape(vec![n, h, wd, o, s, s])?
        .permute(vec![0, 3, 1, 4, 2, 5])?
        .reshape((n, o, h * s, wd * s))
}

/// Largest |a − b| over all elements (f32 or f64 tensors of one shape), for tests.
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .and_then(|d| {
            d.abs()?
                .max_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()
        })
        .expect("max_abs_diff: tensors of one shape and float dtype")
}
