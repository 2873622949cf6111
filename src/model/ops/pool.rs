//! Max pooling with padding and arbitrary stride, with a backward (Candle's only supports
//! kernel == stride without padding).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
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

    /// [`PoolGeom::argmax`] for the 2×2, stride-2, unpadded pool (the U-Net's): four loads and
    /// three comparisons, no window arithmetic.
    #[inline]
    fn argmax_2x2<T: WithDType>(&self, plane: &[T], oh: usize, ow: usize) -> usize {
        let i = 2 * oh * self.w + 2 * ow;
        let mut best = i;
        for j in [i + 1, i + self.w, i + self.w + 1] {
            if plane[j] > plane[best] {
                best = j;
            }
        }
        best
    }

    /// The window argmax, through the 2×2 fast path when it applies.
    #[inline]
    fn argmax_any<T: WithDType>(&self, plane: &[T], oh: usize, ow: usize) -> usize {
        if self.kernel == 2 && self.stride == 2 && self.padding == 0 {
            self.argmax_2x2(plane, oh, ow)
        } else {
            self.argmax(plane, oh, ow)
        }
    }

    fn out_shape(&self, x: &Shape) -> Result<Shape> {
        let (n, c, _, _) = x.dims4()?;
        Ok(Shape::from((n, c, self.ho, self.wo)))
    }
}

fn contiguous<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    super::conv::slice(s, l, "max_pool2d")
}

/// The argmax of every window of the 3×3, stride-1, padding-1 pool (the soft morphology of the
/// clDice loss), in two separable passes: the leftmost maximum of each row's three columns,
/// then the topmost of the three rows' maxima. That is the first maximum in scan order, as
/// [`PoolGeom::argmax`] picks it (inputs without NaN; the unit test checks the equality).
/// `scratch` holds the row pass between calls (no allocation per plane).
fn argmax_3x3_s1<T: WithDType>(
    plane: &[T],
    h: usize,
    w: usize,
    scratch: &mut Vec<u32>,
    out: &mut Vec<u32>,
) {
    // Row pass: column index of the leftmost maximum of x-1..=x+1 (clamped) in each row.
    let cols = scratch;
    cols.clear();
    cols.resize(h * w, 0);
    for (row, cr) in plane.chunks_exact(w).zip(cols.chunks_exact_mut(w)) {
        for (x, c) in cr.iter_mut().enumerate() {
            let mut best = x.saturating_sub(1);
            for j in best + 1..(x + 2).min(w) {
                if row[j] > row[best] {
                    best = j;
                }
            }
            *c = best as u32;
        }
    }
    // Column pass over the row maxima.
    out.clear();
    out.reserve(h * w);
    for y in 0..h {
        let (r0, r1) = (y.saturating_sub(1), (y + 2).min(h));
        for x in 0..w {
            let mut best = r0 * w + cols[r0 * w + x] as usize;
            for r in r0 + 1..r1 {
                let i = r * w + cols[r * w + x] as usize;
                if plane[i] > plane[best] {
                    best = i;
                }
            }
            out.push(best as u32);
        }
    }
}

/// Whether [`argmax_3x3_s1`] applies: 3×3, stride 1, padding 1 (the output is the input's size).
fn is_3x3_s1(g: &PoolGeom) -> bool {
    g.kernel == 3 && g.stride == 1 && g.padding == 1 && g.h * g.w <= u32::MAX as usize
}

fn pool_fwd<T: WithDType>(g: &PoolGeom, x: &[T]) -> Vec<T> {
    let (hw, ohw) = (g.h * g.w, g.ho * g.wo);
    let mut y = super::zeros(g.planes * ohw);
    y.par_chunks_mut(ohw).zip(x.par_chunks(hw)).for_each_init(
        Default::default,
        |(cols, idx), (yp, xp)| {
            if is_3x3_s1(g) {
                argmax_3x3_s1(xp, g.h, g.w, cols, idx);
                for (o, &i) in yp.iter_mut().zip(idx.iter()) {
                    *o = xp[i as usize];
                }
                return;
            }
            for oh in 0..g.ho {
                for ow in 0..g.wo {
                    yp[oh * g.wo + ow] = xp[g.argmax_any(xp, oh, ow)];
                }
            }
        },
    );
    y
}

fn pool_bwd<T: WithDType>(g: &PoolGeom, x: &[T], gy: &[T]) -> Vec<T> {
    let (hw, ohw) = (g.h * g.w, g.ho * g.wo);
    let mut gx = super::zeros(g.planes * hw);
    gx.par_chunks_mut(hw)
        .zip(x.par_chunks(hw).zip(gy.par_chunks(ohw)))
        .for_each_init(Default::default, |(cols, idx), (gxp, (xp, gyp))| {
            if is_3x3_s1(g) {
                argmax_3x3_s1(xp, g.h, g.w, cols, idx);
                for (&i, &gv) in idx.iter().zip(gyp) {
                    gxp[i as usize] += gv;
                }
                return;
            }
            for oh in 0..g.ho {
                for ow in 0..g.wo {
                    gxp[g.argmax_any(xp, oh, ow)] += gyp[oh * g.wo + ow];
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
    if super::generic::cpu_custom(x) {
        return x.contiguous()?.apply_op1(MaxPool(g));
    }
    super::generic::max_pool2d(x, g.kernel, g.stride, g.padding)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 2×2 fast path picks the same element as the general window scan, ties included
    /// (first maximum in scan order), on odd and even sizes.
    #[test]
    fn fast_2x2_argmax_matches_general() {
        for (h, w) in [(6, 8), (7, 9), (2, 2)] {
            let g = PoolGeom::new(&Shape::from((1, 1, h, w)), 2, 2, 0).unwrap();
            // Few distinct values, so that ties are frequent.
            let plane: Vec<f32> = (0..h * w).map(|i| ((i * 7 + i / 3) % 4) as f32).collect();
            let mut ties = 0;
            for oh in 0..g.ho {
                for ow in 0..g.wo {
                    let a = g.argmax_2x2(&plane, oh, ow);
                    assert_eq!(a, g.argmax(&plane, oh, ow), "{h}x{w} at {oh},{ow}");
                    let i = 2 * oh * w + 2 * ow;
                    let window = [i, i + 1, i + w, i + w + 1];
                    ties +=
                        usize::from(window.iter().filter(|&&j| plane[j] == plane[a]).count() > 1);
                }
            }
            assert!(ties > 0 || h == 2, "{h}x{w}: no ties exercised");
        }
    }

    /// The separable 3×3 stride-1 path picks the same element as the general window scan,
    /// ties included, on planes down to one row or column.
    #[test]
    fn separable_3x3_argmax_matches_general() {
        for (h, w) in [(9, 11), (8, 8), (1, 5), (5, 1), (2, 3), (1, 1)] {
            let g = PoolGeom::new(&Shape::from((1, 1, h, w)), 3, 1, 1).unwrap();
            assert!(is_3x3_s1(&g));
            for seed in 0..3 {
                // Few distinct values, so that ties are frequent.
                let plane: Vec<f64> = (0..h * w)
                    .map(|i| ((i * (7 + seed) + i / 3 + seed) % 3) as f64)
                    .collect();
                let (mut cols, mut idx) = (Vec::new(), Vec::new());
                argmax_3x3_s1(&plane, h, w, &mut cols, &mut idx);
                for oh in 0..h {
                    for ow in 0..w {
                        assert_eq!(
                            idx[oh * w + ow] as usize,
                            g.argmax(&plane, oh, ow),
                            "{h}x{w} seed {seed} at {oh},{ow}"
                        );
                    }
                }
            }
        }
    }
}
