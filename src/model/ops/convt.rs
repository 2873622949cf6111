//! Transposed convolution with kernel == stride (the U-Net's 2×2, stride-2 up-sampling) on CPU,
//! one GEMM per image in each direction.
//!
//! Every input pixel writes its own `s`×`s` output block, so with the weight `w` [C, O, s, s]
//! viewed as the matrix [C, O·s·s]: `Z = wᵀ · x` ([O·s·s, H·W] per image) and `y` is `Z` with
//! its rows spread over the blocks (a pixel shuffle). Backward: `gZ` is `gy` gathered back into
//! that layout, `gx = w · gZ` and `gw = Σ_n x_n · gZᵀ`. Built from Candle ops instead (permute,
//! matmul, permute), the same thing costs two strided copies forward and a chain of them
//! backward, each also paying Candle's zeros-plus-add gradient accumulation.

use super::conv::{dispatch2, storage_slice};
use super::gemm::{matmul, sum_partials, MatRef};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// Shapes of one transposed convolution: x [N, C, H, W], w [C, O, s, s].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geom {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    s: usize,
}

impl Geom {
    fn new(x: &Shape, w: &Shape) -> Result<Self> {
        let (n, c, h, wd) = x.dims4()?;
        let (wc, o, kh, kw) = w.dims4()?;
        if wc != c {
            candle_core::bail!(
                "conv_transpose2d: input has {c} channels but the weight expects {wc}"
            );
        }
        if kh != kw || kh == 0 {
            candle_core::bail!("conv_transpose2d: kernel {kh}x{kw} must be square");
        }
        Ok(Self {
            n,
            c,
            h,
            w: wd,
            o,
            s: kh,
        })
    }

    /// Input pixels per image.
    fn p(&self) -> usize {
        self.h * self.w
    }

    /// Rows of `Z`: O·s·s.
    fn rows(&self) -> usize {
        self.o * self.s * self.s
    }

    fn out_shape(&self) -> Shape {
        Shape::from((self.n, self.o, self.h * self.s, self.w * self.s))
    }

    /// Images per parallel task and whether a task parallelises inside its GEMMs (as in
    /// `conv::image_split`).
    fn split(&self) -> (usize, bool) {
        let threads = rayon::current_num_threads();
        if threads > 1 && self.n > 1 {
            (self.n.div_ceil(threads.min(self.n)), false)
        } else {
            (self.n.max(1), true)
        }
    }

    /// Writes one image's output `y` [O, H·s, W·s] row by row, each output row `(o, a, i)`
    /// interleaving the `s` rows `src(o·s + a, b, i)` (b < s) of `Z` (the pixel shuffle), so
    /// that every output line is written once, in order.
    fn shuffle<'z, T: Copy + 'z>(&self, y: &mut [T], src: impl Fn(usize, usize, usize) -> &'z [T]) {
        let s = self.s;
        for (row, out) in y.chunks_exact_mut(self.w * s).enumerate() {
            let (o, r) = (row / (self.h * s), row % (self.h * s));
            let (a, i) = (r % s, r / s);
            for b in 0..s {
                let zr = src(o * s + a, b, i);
                for (d, v) in out.iter_mut().skip(b).step_by(s).zip(zr) {
                    *d = *v;
                }
            }
        }
    }
}

fn forward<T: WithDType>(g: &Geom, x: &[T], w: &[T]) -> Vec<T> {
    let (p, rows) = (g.p(), g.rows());
    let mut y = super::zeros(g.n * rows * p);
    let wt = MatRef::row_major(w, g.c, rows).t();
    let (per, par) = g.split();
    x.par_chunks(per * g.c * p)
        .zip(y.par_chunks_mut(per * rows * p))
        .with_max_len(1)
        .for_each(|(xs, ys)| {
            let mut z = vec![T::from_f64(0.0); rows * p];
            for (xi, yi) in xs.chunks_exact(g.c * p).zip(ys.chunks_exact_mut(rows * p)) {
                matmul(&mut z, p, wt, MatRef::row_major(xi, g.c, p), false, par);
                g.shuffle(yi, |oa, b, i| &z[(oa * g.s + b) * p + i * g.w..][..g.w]);
            }
        });
    y
}

/// `gZ` [O·s·s, H·W] of one image from its output gradient.
fn gather<T: WithDType>(g: &Geom, gy: &[T], gz: &mut [T]) {
    let (p, s) = (g.p(), g.s);
    // The inverse of `Geom::shuffle`: output row (o, a, i) of gy holds, interleaved, row i of
    // Z's rows (o·s + a)·s + b for b < s.
    for (row, out) in gy.chunks_exact(g.w * s).enumerate() {
        let (o, r) = (row / (g.h * s), row % (g.h * s));
        let (oa, i) = (o * s + r % s, r / s);
        for (j, block) in out.chunks_exact(s).enumerate() {
            for (b, v) in block.iter().enumerate() {
                gz[(oa * s + b) * p + i * g.w + j] = *v;
            }
        }
    }
}

/// (gx, gw) from x, w and gy.
fn backward<T: WithDType>(g: &Geom, x: &[T], w: &[T], gy: &[T]) -> (Vec<T>, Vec<T>) {
    let (p, rows, c) = (g.p(), g.rows(), g.c);
    let mut gx = super::zeros(g.n * c * p);
    let wm = MatRef::row_major(w, c, rows);
    let (per, par) = g.split();
    // The weight gradient [C, rows] has the pixel count as inner dimension: accumulated as its
    // transpose [rows, C] when C < rows (see `conv::grad_weight` for why).
    let transposed = c < rows;
    let partials: Vec<Vec<T>> = x
        .par_chunks(per * c * p)
        .zip(gy.par_chunks(per * rows * p))
        .zip(gx.par_chunks_mut(per * c * p))
        .with_max_len(1)
        .map(|((xs, gys), gxs)| {
            let mut acc = vec![T::from_f64(0.0); c * rows];
            let mut gz = vec![T::from_f64(0.0); rows * p];
            let images = xs
                .chunks_exact(c * p)
                .zip(gys.chunks_exact(rows * p))
                .zip(gxs.chunks_exact_mut(c * p));
            for ((xi, gyi), gxi) in images {
                gather(g, gyi, &mut gz);
                let (zm, xm) = (MatRef::row_major(&gz, rows, p), MatRef::row_major(xi, c, p));
                matmul(gxi, p, wm, zm, false, par);
                if transposed {
                    matmul(&mut acc, c, zm, xm.t(), true, par);
                } else {
                    matmul(&mut acc, rows, xm, zm.t(), true, par);
                }
            }
            acc
        })
        .collect();
    (gx, sum_partials(partials, c, rows, transposed))
}

const OP: &str = "driveline-conv-transpose2d";

/// The differentiable op (x, w) -> y.
struct ConvT;

impl CustomOp2 for ConvT {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geom::new(l1.shape(), l2.shape())?;
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
        let g = Geom::new(x.shape(), w.shape())?;
        let gy = gy.contiguous()?;
        let (gx, gw) = match x.dtype() {
            DType::F64 => backward_tensors::<f64>(&g, x, w, &gy)?,
            _ => backward_tensors::<f32>(&g, x, w, &gy)?,
        };
        Ok((x.track_op().then_some(gx), w.track_op().then_some(gw)))
    }
}

/// [`backward`] on CPU tensors.
fn backward_tensors<T: WithDType>(
    g: &Geom,
    x: &Tensor,
    w: &Tensor,
    gy: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (gx, gw) = {
        let ((xs, xl), (ws, wl), (gs, gl)) = (
            x.storage_and_layout(),
            w.storage_and_layout(),
            gy.storage_and_layout(),
        );
        backward(
            g,
            storage_slice::<T>(&xs, xl, OP)?,
            storage_slice::<T>(&ws, wl, OP)?,
            storage_slice::<T>(&gs, gl, OP)?,
        )
    };
    Ok((
        Tensor::from_vec(gx, x.shape(), x.device())?,
        Tensor::from_vec(gw, w.shape(), x.device())?,
    ))
}

/// Whether [`conv_transpose2d_cpu`] handles these tensors.
pub(crate) fn supported(x: &Tensor, w: &Tensor) -> bool {
    super::generic::cpu_custom(x) && w.dtype() == x.dtype()
}

/// `x` [N, C, H, W], `w` [C, O, s, s] -> [N, O, H·s, W·s] (kernel == stride, no padding).
pub(crate) fn conv_transpose2d_cpu(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Geom::new(x.shape(), w.shape())?;
    x.contiguous()?.apply_op2(&w.contiguous()?, ConvT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::max_abs_diff;
    use candle_core::{Device, Var};

    /// The custom op equals the Candle-ops construction: output and both gradients, with an
    /// uneven batch (image-parallel tasks of 2 and 1) and both weight-gradient orientations.
    #[test]
    fn matches_candle_ops() {
        let dev = Device::Cpu;
        // (C, O): C < O·4 (transposed accumulation) and C ≥ O·4.
        for (c, o) in [(3, 2), (9, 2)] {
            let x = Var::randn(0.0f64, 1.0, (3, c, 4, 5), &dev).unwrap();
            let w = Var::randn(0.0f64, 1.0, (c, o, 2, 2), &dev).unwrap();
            let r = Tensor::randn(0.0f64, 1.0, (3, o, 8, 10), &dev).unwrap();
            let y1 = conv_transpose2d_cpu(x.as_tensor(), w.as_tensor()).unwrap();
            let y2 = super::super::conv_transpose2d_matmul(x.as_tensor(), w.as_tensor()).unwrap();
            assert!(max_abs_diff(&y1, &y2) < 1e-12);
            let g1 = (y1 * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (y2 * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [x.as_tensor(), w.as_tensor()] {
                let (a, b) = (g1.get(v).unwrap(), g2.get(v).unwrap());
                assert!(a.sum_all().unwrap().to_scalar::<f64>().unwrap().abs() > 0.0);
                assert!(max_abs_diff(a, b) < 1e-12, "C={c} O={o}");
            }
        }
    }
}
