//! Max pooling with padding and arbitrary stride, with a backward (Candle's only supports
//! kernel == stride without padding).

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

/// Geometry of a square max pool over [N, C, H, W].
#[derive(Clone, Copy, Debug)]
struct PoolGeom {
    planes: usize,
    h: usize,
    w: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    ho: usize,
    wo: usize,
}

impl PoolGeom {
    fn new(x: &Shape, kernel: usize, stride: usize, padding: usize) -> Result<Self> {
        let (n, c, h, w) = x.dims4()?;
        if kernel == 0 || stride == 0 {
            candle_core::bail!("max_pool2d: kernel and stride must be positive");
        }
        if 2 * padding > kernel {
            candle_core::bail!("max_pool2d: padding {padding} exceeds half the kernel {kernel}");
        }
        if h + 2 * padding < kernel || w + 2 * padding < kernel {
            candle_core::bail!("max_pool2d: input {h}x{w} smaller than the kernel {kernel}");
        }
        Ok(Self {
            planes: n * c,
            h,
            w,
            kernel,
            stride,
            padding,
            ho: (h + 2 * padding - kernel) / stride + 1,
            wo: (w + 2 * padding - kernel) / stride + 1,
        })
    }

    /// Clamped input window `[lo, hi)` of output index `o` along an axis of length `len`.
    fn window(&self, o: usize, len: usize) -> (usize, usize) {
        let start = o * self.stride;
        let lo = start.saturating_sub(self.padding);
        let hi = (start + self.kernel).saturating_sub(self.padding).min(len);
        (lo, hi)
    }

    /// Index (within the plane) of the window maximum; the first one in scan order on ties,
    /// as PyTorch does.
    fn argmax<T: WithDType>(&self, plane: &[T], oh: usize, ow: usize) -> usize {
        let (h0, h1) = self.window(oh, self.h);
        let (w0, w1) = self.window(ow, self.w);
        let mut best = h0 * self.w + w0;
        for ih in h0..h1 {
            for iw in w0..w1 {
                let i = ih * self.w + iw;
                if plane[i] > plane[best] {
                    best = i;
                }
            }
        }
        best
    }

    fn out_shape(&self, x: &Shape) -> Result<Shape> {
        let (n, c, _, _) = x.dims4()?;
        Ok(Shape::from((n, c, self.ho, self.wo)))
    }
}

fn contiguous<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => candle_core::bail!("max_pool2d: input must be contiguous"),
    }
}

fn pool_fwd<T: WithDType>(g: &PoolGeom, x: &[T]) -> Vec<T> {
    let (hw, ohw) = (g.h * g.w, g.ho * g.wo);
    let mut y = vec![T::from_f64(0.0); g.planes * ohw];
    y.par_chunks_mut(ohw)
        .zip(x.par_chunks(hw))
        .for_each(|(yp, xp)| {
            for oh in 0..g.ho {
                for ow in 0..g.wo {
                    yp[oh * g.wo + ow] = xp[g.argmax(xp, oh, ow)];
                }
            }
        });
    y
}

fn pool_bwd<T: WithDType>(g: &PoolGeom, x: &[T], gy: &[T]) -> Vec<T> {
    let (hw, ohw) = (g.h * g.w, g.ho * g.wo);
    let mut gx = vec![T::from_f64(0.0); g.planes * hw];
    gx.par_chunks_mut(hw)
        .zip(x.par_chunks(hw).zip(gy.par_chunks(ohw)))
        .for_each(|(gxp, (xp, gyp))| {
            for oh in 0..g.ho {
                for ow in 0..g.wo {
                    gxp[g.argmax(xp, oh, ow)] += gyp[oh * g.wo + ow];
                }
            }
        });
    gx
}

/// Forward op x -> y.
struct MaxPool(PoolGeom);

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "driveline-max-pool2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = match s {
            CpuStorage::F32(_) => CpuStorage::F32(pool_fwd(&self.0, contiguous(s, l)?)),
            CpuStorage::F64(_) => CpuStorage::F64(pool_fwd(&self.0, contiguous(s, l)?)),
            _ => candle_core::bail!("max_pool2d: unsupported dtype {:?}", s.dtype()),
        };
        Ok((y, self.0.out_shape(l.shape())?))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, gy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(
            &gy.contiguous()?,
            &MaxPoolGrad(self.0),
        )?))
    }
}

/// Backward op (x, gy) -> gx: routes each output gradient to its window's argmax (recomputed,
/// so no index tensor is kept between forward and backward).
struct MaxPoolGrad(PoolGeom);

impl CustomOp2 for MaxPoolGrad {
    fn name(&self) -> &'static str {
        "driveline-max-pool2d-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let gx = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(pool_bwd(&self.0, contiguous(s1, l1)?, contiguous(s2, l2)?))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(pool_bwd(&self.0, contiguous(s1, l1)?, contiguous(s2, l2)?))
            }
            _ => candle_core::bail!("max_pool2d backward: unsupported dtypes"),
        };
        Ok((gx, l1.shape().clone()))
    }
}

/// Max pool on CPU f32/f64 tensors; other devices/dtypes pad with the minimum value and use
/// Candle's pooling (whose backward is only right for kernel == stride).
pub(crate) fn max_pool2d(
    x: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let g = PoolGeom::new(x.shape(), kernel, stride, padding)?;
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        return x.contiguous()?.apply_op1(MaxPool(g));
    }
    let x = if padding > 0 {
        let min = x.min_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()? - 1.0;
        let (n, c, h, w) = x.dims4()?;
        let fill = |s: (usize, usize, usize, usize)| -> Result<Tensor> {
            Tensor::full(min, s, x.device())?.to_dtype(x.dtype())
        };
        let x = Tensor::cat(
            &[
                fill((n, c, h, padding))?,
                x.clone(),
                fill((n, c, h, padding))?,
            ],
            3,
        )?;
        let wp = w + 2 * padding;
        Tensor::cat(
            &[fill((n, c, padding, wp))?, x, fill((n, c, padding, wp))?],
            2,
        )?
    } else {
        x.clone()
    };
    x.max_pool2d_with_stride(kernel, stride)
}
