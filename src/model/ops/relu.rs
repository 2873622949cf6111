//! ReLU with a one-pass backward.
//!
//! Candle's `relu` backward builds `zeros_like(x)`, `x >= 0` as u8, its f32 copy and the product
//! with the gradient: four tensor-sized passes and allocations after every BN of the network.
//! Here the backward is a single pass `gx = gy · [y > 0]` (PyTorch's convention: zero gradient
//! at 0).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::conv::slice;

/// Elements per parallel task.
const CHUNK: usize = 1 << 16;

fn relu_fwd<T: WithDType>(x: &[T]) -> Vec<T> {
    let zero = T::from_f64(0.0);
    // SAFETY: the chunks of `y` pair with those of `x`, which cover its length, and each task
    // writes every element of its chunk.
    unsafe {
        super::filled(x.len(), |y| {
            y.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK))
                .for_each(|(y, x)| {
                    for (d, &s) in y.iter_mut().zip(x) {
                        d.write(if s > zero { s } else { zero });
                    }
                })
        })
    }
}

/// `gy` where `y > 0`, else 0.
fn relu_bwd<T: WithDType>(y: &[T], gy: &[T]) -> Vec<T> {
    assert_eq!(y.len(), gy.len(), "relu backward: operands of one shape");
    let zero = T::from_f64(0.0);
    // SAFETY: as in `relu_fwd`, `gy` having `y`'s length.
    unsafe {
        super::filled(y.len(), |gx| {
            gx.par_chunks_mut(CHUNK)
                .zip(y.par_chunks(CHUNK).zip(gy.par_chunks(CHUNK)))
                .for_each(|(gx, (y, gy))| {
                    for ((d, &yv), &g) in gx.iter_mut().zip(y).zip(gy) {
                        d.write(if yv > zero { g } else { zero });
                    }
                })
        })
    }
}

/// An elementwise op of two same-shaped contiguous CPU tensors, both f32 or both f64.
fn elementwise2(
    n: &str,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    f32_fn: fn(&[f32], &[f32]) -> Vec<f32>,
    f64_fn: fn(&[f64], &[f64]) -> Vec<f64>,
) -> Result<(CpuStorage, Shape)> {
    if l1.shape() != l2.shape() {
        candle_core::bail!("{n}: shapes {:?} / {:?}", l1.shape(), l2.shape());
    }
    let out = super::conv::dispatch2(n, s1, l1, s2, l2, f32_fn, f64_fn)?;
    Ok((out, l1.shape().clone()))
}

/// `max(a + b, 0)` into a new buffer, in one parallel pass (a serial `a.to_vec()` first held
/// the calling thread while the pool waited). The same arithmetic as [`add_relu_into`].
fn add_relu_vec<T: WithDType>(a: &[T], b: &[T]) -> Vec<T> {
    assert_eq!(a.len(), b.len(), "add_relu: operands of one shape");
    let zero = T::from_f64(0.0);
    // SAFETY: the chunks of the output pair with those of `a`, which cover its length, and
    // each task writes every element of its chunk.
    unsafe {
        super::filled(a.len(), |y| {
            y.par_chunks_mut(CHUNK)
                .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
                .for_each(|(y, (a, b))| {
                    for (d, (&x, &r)) in y.iter_mut().zip(a.iter().zip(b)) {
                        let s = x + r;
                        d.write(if s > zero { s } else { zero });
                    }
                })
        })
    }
}

/// x -> max(x, 0).
struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "driveline-relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = match s {
            CpuStorage::F32(_) => CpuStorage::F32(relu_fwd(slice::<f32>(s, l, self.name())?)),
            CpuStorage::F64(_) => CpuStorage::F64(relu_fwd(slice::<f64>(s, l, self.name())?)),
            _ => candle_core::bail!("{}: unsupported dtype {:?}", self.name(), s.dtype()),
        };
        Ok((y, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, gy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&gy.contiguous()?, &ReluGrad)?))
    }
}

/// (y, gy) -> gy where y > 0, else 0; not itself differentiable.
struct ReluGrad;

impl CustomOp2 for ReluGrad {
    fn name(&self) -> &'static str {
        "driveline-relu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        elementwise2(self.name(), (s1, l1), (s2, l2), relu_bwd, relu_bwd)
    }
}

/// (a, b) -> max(a + b, 0): a residual connection and its ReLU as one node (one output, one
/// gradient pass shared by both inputs).
struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "driveline-add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        elementwise2(self.name(), (s1, l1), (s2, l2), add_relu_vec, add_relu_vec)
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        gy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = y.apply_op2_no_bwd(&gy.contiguous()?, &ReluGrad)?;
        Ok((Some(g.clone()), Some(g)))
    }
}

/// `max(a + b, 0)`; on CPU f32/f64 one fused op, elsewhere the generic path's.
pub(crate) fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let cpu = super::generic::cpu_custom;
    if cpu(a) && cpu(b) && a.dtype() == b.dtype() && a.shape() == b.shape() {
        a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)
    } else {
        super::generic::add_relu(a, b)
    }
}

/// ReLU; on CPU f32/f64 the custom op above, elsewhere the generic path's.
pub(crate) fn relu(x: &Tensor) -> Result<Tensor> {
    if super::generic::cpu_custom(x) {
        x.contiguous()?.apply_op1(Relu)
    } else {
        super::generic::relu(x)
    }
}

/// In place: `y = max(y + r, 0)` elementwise (the residual addition of a ResNet block).
struct AddReluInPlace;

fn add_relu_into<T: WithDType>(y: &mut [T], r: &[T]) {
    let zero = T::from_f64(0.0);
    y.par_chunks_mut(CHUNK)
        .zip(r.par_chunks(CHUNK))
        .for_each(|(y, r)| {
            for (d, &b) in y.iter_mut().zip(r) {
                let s = *d + b;
                *d = if s > zero { s } else { zero };
            }
        });
}

impl candle_core::InplaceOp2 for AddReluInPlace {
    fn name(&self) -> &'static str {
        "driveline-add-relu-in-place"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let n = self.name();
        if l1.shape() != l2.shape() {
            candle_core::bail!("{n}: shapes {:?} / {:?}", l1.shape(), l2.shape());
        }
        let Some((a, b)) = l1.contiguous_offsets() else {
            candle_core::bail!("{n}: the destination must be contiguous");
        };
        match s1 {
            CpuStorage::F32(y) => add_relu_into(&mut y[a..b], slice::<f32>(s2, l2, n)?),
            CpuStorage::F64(y) => add_relu_into(&mut y[a..b], slice::<f64>(s2, l2, n)?),
            _ => candle_core::bail!("{n}: unsupported dtype {:?}", s1.dtype()),
        }
        Ok(())
    }
}

/// `relu(y + r)`, written over `y` on CPU (f32/f64, both contiguous, same shape and dtype,
/// neither tracking a graph); elsewhere the allocating tensor ops. `y` must be a fresh result
/// that no tensor still in use shares storage with. Bitwise equal to `relu(&(y + r)?)`.
pub(crate) fn add_relu_in_place(y: Tensor, r: &Tensor) -> Result<Tensor> {
    let in_place = super::generic::cpu_custom(&y)
        && y.dtype() == r.dtype()
        && y.shape() == r.shape()
        && !y.track_op()
        && !r.track_op()
        && y.is_contiguous()
        && r.is_contiguous();
    if !in_place {
        return relu(&(y + r)?);
    }
    y.inplace_op2(r, &AddReluInPlace)?;
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Forward is max(x, 0); the gradient of Σ relu(x)·c is c where x > 0 and 0 elsewhere,
    /// including at x = 0 (PyTorch's convention), for f32 and f64.
    #[test]
    fn forward_and_gradient() {
        let xs = [-2.0, -0.5, 0.0, 0.25, 3.0];
        let cs = [1.0, 2.0, 3.0, 4.0, 5.0];
        for dtype in [DType::F32, DType::F64] {
            let x = Var::from_tensor(
                &Tensor::new(&xs, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let c = Tensor::new(&cs, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let y = relu(x.as_tensor()).unwrap();
            let got: Vec<f64> = y.to_dtype(DType::F64).unwrap().to_vec1().unwrap();
            assert_eq!(got, vec![0.0, 0.0, 0.0, 0.25, 3.0]);
            let grads = (y * &c).unwrap().sum_all().unwrap().backward().unwrap();
            let g: Vec<f64> = grads
                .get(x.as_tensor())
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(g, vec![0.0, 0.0, 0.0, 4.0, 5.0]);
        }
    }

    /// add_relu(a, b) = relu(a + b), and both inputs get the ReLU-masked gradient.
    #[test]
    fn add_relu_forward_and_gradient() {
        let dev = Device::Cpu;
        let a =
            Var::from_tensor(&Tensor::new(&[-2.0f64, 1.0, 0.5, 0.25, 3.0], &dev).unwrap()).unwrap();
        let b =
            Var::from_tensor(&Tensor::new(&[1.0f64, -1.0, 0.5, -1.0, 1.0], &dev).unwrap()).unwrap();
        let c = Tensor::new(&[1.0f64, 2.0, 3.0, 4.0, 5.0], &dev).unwrap();
        let y = add_relu(a.as_tensor(), b.as_tensor()).unwrap();
        assert_eq!(y.to_vec1::<f64>().unwrap(), vec![0.0, 0.0, 1.0, 0.0, 4.0]);
        let grads = (y * &c).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&a, &b] {
            let g = grads.get(v.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
            assert_eq!(g, vec![0.0, 0.0, 3.0, 0.0, 5.0]);
        }
    }
}
