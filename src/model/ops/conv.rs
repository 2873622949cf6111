//! CPU 2-D convolution as im2col + GEMM, with a backward that also runs on GEMM.
//!
//! Candle's CPU conv2d computes its input gradient with a naive transposed convolution, which
//! dominates training time. Here the forward is `y_n = W · im2col(x_n)` per image (no im2col at
//! all for 1×1/stride-1/no-padding kernels), the weight gradient is
//! `Σ_n gy_n · im2col(x_n)ᵀ` and the input gradient is `col2im(Wᵀ · gy_n)`. The im2col buffer is
//! recomputed in the backward pass rather than kept alive, so the memory held between forward
//! and backward is only what Candle keeps anyway (the inputs).

use super::gemm::{matmul, MatRef};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// Shapes and hyper-parameters of one convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ConvGeom {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
    dilation: usize,
    ho: usize,
    wo: usize,
    /// Most elements of an im2col buffer ([`COL_BUDGET`]; smaller in tests to exercise bands).
    col_budget: usize,
}

impl ConvGeom {
    /// Validates the shapes of `x` [N, C, H, W] and `w` [O, C, kh, kw] and derives the output size.
    pub fn new(
        x: &Shape,
        w: &Shape,
        stride: usize,
        padding: usize,
        dilation: usize,
    ) -> Result<Self> {
        let (n, c, h, wd) = x.dims4()?;
        let (o, wc, kh, kw) = w.dims4()?;
        if wc != c {
            candle_core::bail!("conv2d: input has {c} channels but the weight expects {wc}");
        }
        if stride == 0 || dilation == 0 || kh == 0 || kw == 0 {
            candle_core::bail!("conv2d: stride, dilation and kernel size must be positive");
        }
        let (eh, ew) = (dilation * (kh - 1) + 1, dilation * (kw - 1) + 1);
        if h + 2 * padding < eh || wd + 2 * padding < ew {
            candle_core::bail!(
                "conv2d: padded input {}x{} smaller than the dilated kernel {eh}x{ew}",
                h + 2 * padding,
                wd + 2 * padding
            );
        }
        Ok(Self {
            n,
            c,
            h,
            w: wd,
            o,
            kh,
            kw,
            stride,
            padding,
            dilation,
            ho: (h + 2 * padding - eh) / stride + 1,
            wo: (wd + 2 * padding - ew) / stride + 1,
            col_budget: COL_BUDGET,
        })
    }

    /// Rows of the im2col matrix (= columns of the flattened weight).
    fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// Output pixels per image (= columns of the im2col matrix).
    fn p(&self) -> usize {
        self.ho * self.wo
    }

    /// Input elements per image.
    fn img(&self) -> usize {
        self.c * self.h * self.w
    }

    /// A 1×1 stride-1 unpadded kernel: the image itself is its im2col matrix.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
    }

    fn out_shape(&self) -> Shape {
        Shape::from((self.n, self.o, self.ho, self.wo))
    }
}

/// Range `[lo, hi)` of output indices `i` whose input index `i*stride + off - pad` lies in
/// `[0, in_len)`.
fn valid_range(
    out_len: usize,
    in_len: usize,
    off: usize,
    stride: usize,
    pad: usize,
) -> (usize, usize) {
    let lo = if pad > off {
        (pad - off).div_ceil(stride)
    } else {
        0
    };
    if in_len + pad < off + 1 {
        return (0, 0);
    }
    let hi = ((in_len - 1 + pad - off) / stride + 1).min(out_len);
    (lo.min(hi), hi)
}

/// Most elements an im2col buffer may hold (32 MiB of f32): larger images are processed in bands
/// of output rows, so that e.g. a 64-channel 3×3 convolution at 584×565 does not allocate a
/// 760 MB buffer.
const COL_BUDGET: usize = 1 << 23;

impl ConvGeom {
    /// Bands `[oh0, oh1)` of output rows whose im2col matrix fits the budget (at least one row).
    fn bands(&self) -> impl Iterator<Item = (usize, usize)> {
        let rows = (self.col_budget / (self.k() * self.wo).max(1)).clamp(1, self.ho);
        let ho = self.ho;
        (0..ho).step_by(rows).map(move |r| (r, (r + rows).min(ho)))
    }

    /// Size of the im2col buffer for the largest band.
    fn col_len(&self) -> usize {
        if self.pointwise() {
            return 0;
        }
        self.bands()
            .map(|(a, b)| (b - a) * self.wo * self.k())
            .max()
            .unwrap_or(0)
    }
}

/// Fills `col` [k, (oh1-oh0)·Wo] with the receptive fields of output rows `[oh0, oh1)` of one
/// image `x` [C, H, W] (zeros for padding).
fn im2col<T: WithDType>(g: &ConvGeom, x: &[T], (oh0, oh1): (usize, usize), col: &mut [T]) {
    let (bp, khw) = ((oh1 - oh0) * g.wo, g.kh * g.kw);
    let zero = T::from_f64(0.0);
    col[..g.k() * bp]
        .par_chunks_mut(bp)
        .with_min_len(8)
        .enumerate()
        .for_each(|(r, row)| {
            let (c, ki, kj) = (r / khw, (r / g.kw) % g.kh, r % g.kw);
            let (oh_lo, oh_hi) = valid_range(g.ho, g.h, ki * g.dilation, g.stride, g.padding);
            let (ow_lo, ow_hi) = valid_range(g.wo, g.w, kj * g.dilation, g.stride, g.padding);
            let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
            for (oh, dst) in (oh0..oh1).zip(row.chunks_exact_mut(g.wo)) {
                if oh < oh_lo || oh >= oh_hi || ow_lo >= ow_hi {
                    dst.fill(zero);
                    continue;
                }
                let ih = oh * g.stride + ki * g.dilation - g.padding;
                let src = &plane[ih * g.w..(ih + 1) * g.w];
                dst[..ow_lo].fill(zero);
                dst[ow_hi..].fill(zero);
                let iw0 = ow_lo * g.stride + kj * g.dilation - g.padding;
                if g.stride == 1 {
                    dst[ow_lo..ow_hi].copy_from_slice(&src[iw0..iw0 + (ow_hi - ow_lo)]);
                } else {
                    for (d, s) in dst[ow_lo..ow_hi]
                        .iter_mut()
                        .zip(src[iw0..].iter().step_by(g.stride))
                    {
                        *d = *s;
                    }
                }
            }
        });
}

/// Adjoint of [`im2col`]: adds the band `dcol` [k, (oh1-oh0)·Wo] into `gx` [C, H, W]. Parallel
/// over channels (each channel owns its rows of `dcol`, so no two tasks write the same element).
fn col2im_add<T: WithDType>(g: &ConvGeom, dcol: &[T], (oh0, oh1): (usize, usize), gx: &mut [T]) {
    let (bp, khw) = ((oh1 - oh0) * g.wo, g.kh * g.kw);
    gx.par_chunks_mut(g.h * g.w)
        .enumerate()
        .for_each(|(c, plane)| {
            for ki in 0..g.kh {
                let (oh_lo, oh_hi) = valid_range(g.ho, g.h, ki * g.dilation, g.stride, g.padding);
                let (oh_lo, oh_hi) = (oh_lo.max(oh0), oh_hi.min(oh1));
                for kj in 0..g.kw {
                    let (ow_lo, ow_hi) =
                        valid_range(g.wo, g.w, kj * g.dilation, g.stride, g.padding);
                    if ow_lo >= ow_hi {
                        continue;
                    }
                    let row = &dcol[(c * khw + ki * g.kw + kj) * bp..][..bp];
                    for oh in oh_lo..oh_hi {
                        let ih = oh * g.stride + ki * g.dilation - g.padding;
                        let iw0 = ow_lo * g.stride + kj * g.dilation - g.padding;
                        let r0 = (oh - oh0) * g.wo;
                        let src = &row[r0 + ow_lo..r0 + ow_hi];
                        let dst = &mut plane[ih * g.w + iw0..(ih + 1) * g.w];
                        if g.stride == 1 {
                            for (d, s) in dst.iter_mut().zip(src) {
                                *d += *s;
                            }
                        } else {
                            for (d, s) in dst.iter_mut().step_by(g.stride).zip(src) {
                                *d += *s;
                            }
                        }
                    }
                }
            }
        });
}

/// Columns `[oh0·Wo, oh1·Wo)` of the row-major [rows, p] matrix `m` (a band of output rows).
fn band<T>(m: &[T], rows: usize, p: usize, wo: usize, (oh0, oh1): (usize, usize)) -> MatRef<'_, T> {
    MatRef {
        data: &m[oh0 * wo..],
        rows,
        cols: (oh1 - oh0) * wo,
        rs: p,
        cs: 1,
    }
}

/// `y` [N, O, Ho, Wo] from `x` [N, C, H, W] and `w` [O, C, kh, kw].
fn forward<T: WithDType>(g: &ConvGeom, x: &[T], w: &[T]) -> Vec<T> {
    let (k, p) = (g.k(), g.p());
    let mut y = vec![T::from_f64(0.0); g.n * g.o * p];
    let mut col = vec![T::from_f64(0.0); g.col_len()];
    let wm = MatRef::row_major(w, g.o, k);
    for (xi, yi) in x.chunks_exact(g.img()).zip(y.chunks_exact_mut(g.o * p)) {
        if g.pointwise() {
            matmul(yi, p, wm, MatRef::row_major(xi, k, p), false);
            continue;
        }
        for b in g.bands() {
            let bp = (b.1 - b.0) * g.wo;
            im2col(g, xi, b, &mut col);
            matmul(
                &mut yi[b.0 * g.wo..],
                p,
                wm,
                MatRef::row_major(&col, k, bp),
                false,
            );
        }
    }
    y
}

/// `gw` [O, C, kh, kw] = Σ_n gy_n · im2col(x_n)ᵀ.
fn grad_weight<T: WithDType>(g: &ConvGeom, x: &[T], gy: &[T]) -> Vec<T> {
    let (k, p) = (g.k(), g.p());
    let mut gw = vec![T::from_f64(0.0); g.o * k];
    let mut col = vec![T::from_f64(0.0); g.col_len()];
    let mut first = true;
    for (xi, gyi) in x.chunks_exact(g.img()).zip(gy.chunks_exact(g.o * p)) {
        if g.pointwise() {
            let xm = MatRef::row_major(xi, k, p).t();
            matmul(&mut gw, k, MatRef::row_major(gyi, g.o, p), xm, !first);
            first = false;
            continue;
        }
        for b in g.bands() {
            let bp = (b.1 - b.0) * g.wo;
            im2col(g, xi, b, &mut col);
            let cm = MatRef::row_major(&col, k, bp).t();
            matmul(&mut gw, k, band(gyi, g.o, p, g.wo, b), cm, !first);
            first = false;
        }
    }
    gw
}

/// `gx` [N, C, H, W] = col2im(Wᵀ · gy_n) per image.
fn grad_input<T: WithDType>(g: &ConvGeom, gy: &[T], w: &[T]) -> Vec<T> {
    let (k, p) = (g.k(), g.p());
    let mut gx = vec![T::from_f64(0.0); g.n * g.img()];
    let mut dcol = vec![T::from_f64(0.0); g.col_len()];
    let wt = MatRef::row_major(w, g.o, k).t();
    for (gyi, gxi) in gy.chunks_exact(g.o * p).zip(gx.chunks_exact_mut(g.img())) {
        if g.pointwise() {
            matmul(gxi, p, wt, MatRef::row_major(gyi, g.o, p), false);
            continue;
        }
        for b in g.bands() {
            let bp = (b.1 - b.0) * g.wo;
            matmul(&mut dcol, bp, wt, band(gyi, g.o, p, g.wo, b), false);
            col2im_add(g, &dcol, b, gxi);
        }
    }
    gx
}

/// Contiguous slice of a CPU storage, or an error naming the op.
fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// Runs `f` on the two storages as f32 or f64 slices.
fn dispatch2(
    op: &str,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    f32_fn: impl FnOnce(&[f32], &[f32]) -> Vec<f32>,
    f64_fn: impl FnOnce(&[f64], &[f64]) -> Vec<f64>,
) -> Result<CpuStorage> {
    match (s1, s2) {
        (CpuStorage::F32(_), CpuStorage::F32(_)) => Ok(CpuStorage::F32(f32_fn(
            slice(s1, l1, op)?,
            slice(s2, l2, op)?,
        ))),
        (CpuStorage::F64(_), CpuStorage::F64(_)) => Ok(CpuStorage::F64(f64_fn(
            slice(s1, l1, op)?,
            slice(s2, l2, op)?,
        ))),
        _ => candle_core::bail!(
            "{op}: unsupported dtypes {:?} / {:?} (f32 or f64, both the same)",
            s1.dtype(),
            s2.dtype()
        ),
    }
}

/// The differentiable convolution (x, w) -> y.
struct Conv2d {
    stride: usize,
    padding: usize,
    dilation: usize,
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "driveline-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = ConvGeom::new(
            l1.shape(),
            l2.shape(),
            self.stride,
            self.padding,
            self.dilation,
        )?;
        let y = dispatch2(
            self.name(),
            s1,
            l1,
            s2,
            l2,
            |x, w| forward(&g, x, w),
            |x, w| forward(&g, x, w),
        )?;
        Ok((y, g.out_shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        gy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = ConvGeom::new(
            x.shape(),
            w.shape(),
            self.stride,
            self.padding,
            self.dilation,
        )?;
        let gy = gy.contiguous()?;
        let gx = if x.track_op() {
            Some(gy.apply_op2_no_bwd(w, &GradInput(g))?)
        } else {
            None
        };
        let gw = if w.track_op() {
            Some(x.apply_op2_no_bwd(&gy, &GradWeight(g))?)
        } else {
            None
        };
        Ok((gx, gw))
    }
}

/// Input gradient (gy, w) -> gx; not itself differentiable.
struct GradInput(ConvGeom);

impl CustomOp2 for GradInput {
    fn name(&self) -> &'static str {
        "driveline-conv2d-grad-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = &self.0;
        if l1.shape() != &g.out_shape() {
            candle_core::bail!(
                "{}: gradient shape {:?} != {:?}",
                self.name(),
                l1.shape(),
                g.out_shape()
            );
        }
        let gx = dispatch2(
            self.name(),
            s1,
            l1,
            s2,
            l2,
            |gy, w| grad_input(g, gy, w),
            |gy, w| grad_input(g, gy, w),
        )?;
        Ok((gx, Shape::from((g.n, g.c, g.h, g.w))))
    }
}

/// Weight gradient (x, gy) -> gw; not itself differentiable.
struct GradWeight(ConvGeom);

impl CustomOp2 for GradWeight {
    fn name(&self) -> &'static str {
        "driveline-conv2d-grad-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = &self.0;
        if l2.shape() != &g.out_shape() {
            candle_core::bail!(
                "{}: gradient shape {:?} != {:?}",
                self.name(),
                l2.shape(),
                g.out_shape()
            );
        }
        let gw = dispatch2(
            self.name(),
            s1,
            l1,
            s2,
            l2,
            |x, gy| grad_weight(g, x, gy),
            |x, gy| grad_weight(g, x, gy),
        )?;
        Ok((gw, Shape::from((g.o, g.c, g.kh, g.kw))))
    }
}

/// Differentiable convolution without bias on CPU f32/f64 tensors (see the module doc).
pub(crate) fn conv2d_cpu(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    dilation: usize,
) -> Result<Tensor> {
    ConvGeom::new(x.shape(), w.shape(), stride, padding, dilation)?;
    x.contiguous()?.apply_op2(
        &w.contiguous()?,
        Conv2d {
            stride,
            padding,
            dilation,
        },
    )
}

/// Whether [`conv2d_cpu`] handles tensors of this device and dtype.
pub(crate) fn supported(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Processing in bands of output rows gives the same results as one band.
    #[test]
    fn bands_match_single_pass() {
        let geoms = [(1, 2, 3, 1), (2, 1, 1, 1), (1, 2, 2, 2), (1, 1, 3, 3)];
        for (stride, padding, dilation, kernel) in geoms {
            let xs = Shape::from((2, 3, 11, 9));
            let ws = Shape::from((4, 3, kernel, kernel));
            let g = ConvGeom::new(&xs, &ws, stride, padding, dilation).unwrap();
            // Budget of ~1.5 output rows: bands of one row, plus uneven ends.
            let small = ConvGeom {
                col_budget: g.k() * g.wo * 3 / 2,
                ..g
            };
            assert!(small.bands().count() == g.ho && g.bands().count() == 1 || g.pointwise());
            let x: Vec<f64> = (0..xs.elem_count())
                .map(|i| ((i * 37) % 23) as f64 - 11.0)
                .collect();
            let w: Vec<f64> = (0..ws.elem_count())
                .map(|i| ((i * 13) % 7) as f64 - 3.0)
                .collect();
            let gy: Vec<f64> = (0..g.n * g.o * g.p())
                .map(|i| ((i * 5) % 11) as f64)
                .collect();
            assert_eq!(forward(&g, &x, &w), forward(&small, &x, &w));
            assert_eq!(grad_weight(&g, &x, &gy), grad_weight(&small, &x, &gy));
            assert_eq!(grad_input(&g, &gy, &w), grad_input(&small, &gy, &w));
        }
    }

    #[test]
    fn valid_range_bounds() {
        // Output i reads input i*stride + off - pad.
        assert_eq!(valid_range(5, 5, 0, 1, 1), (1, 5));
        assert_eq!(valid_range(5, 5, 2, 1, 1), (0, 4));
        // Padding larger than the image: no output reads inside it (an empty range).
        let (lo, hi) = valid_range(3, 2, 0, 1, 12);
        assert!(lo >= hi);
        assert_eq!(valid_range(4, 7, 0, 2, 1), (1, 4));
    }
}
