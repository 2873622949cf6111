//! Fused, in-place optimizer updates on CPU storages: one parallel pass per parameter over the
//! weight, its gradient and its moment buffers, instead of ~10 Candle tensor ops that each
//! allocate and fill a parameter-sized temporary.
//!
//! Each element's update depends only on that element, so splitting the pass across threads
//! cannot change any result (runs stay bitwise reproducible). Arithmetic is done in f64 and
//! rounded once to the storage type.

use std::cell::RefCell;

use anyhow::{bail, Result};
use candle_core::{CpuStorage, InplaceOp1, Layout, Tensor, WithDType};
use rayon::prelude::*;

use crate::config::Optimizer as Kind;

/// Hyper-parameters of one step.
pub(super) struct Hyper {
    pub kind: Kind,
    /// 1-based step number (for Adam's bias correction).
    pub step: u64,
    pub lr: f64,
    pub weight_decay: f64,
    pub momentum: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

/// Whether the fused path applies: CPU tensors of the same float dtype, `w` contiguous.
pub(super) fn supported(w: &Tensor, g: &Tensor) -> bool {
    w.device().is_cpu()
        && g.device().is_cpu()
        && w.dtype() == g.dtype()
        && matches!(w.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
        && w.is_contiguous()
        && w.shape() == g.shape()
}

/// Elements per parallel task (large enough that small parameters run in one piece).
const CHUNK: usize = 1 << 15;

/// Runs `f` with mutable access to the contiguous CPU storage of `t` (through Candle's in-place
/// op hook, which takes the storage's write lock).
fn with_mut<F>(t: &Tensor, f: F) -> candle_core::Result<()>
where
    F: FnOnce(&mut CpuStorage, &Layout) -> candle_core::Result<()>,
{
    struct Op<F>(RefCell<Option<F>>);
    impl<F: FnOnce(&mut CpuStorage, &Layout) -> candle_core::Result<()>> InplaceOp1 for Op<F> {
        fn name(&self) -> &'static str {
            "driveline-optim-inplace"
        }
        fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
            match self.0.borrow_mut().take() {
                Some(f) => f(s, l),
                None => candle_core::bail!("in-place optimizer op run twice"),
            }
        }
    }
    if !t.is_contiguous() {
        candle_core::bail!("fused optimizer: state tensor is not contiguous");
    }
    t.inplace_op1(&Op(RefCell::new(Some(f))))
}

/// The float types the fused updates run on.
trait Elem: WithDType {
    /// The storage's elements, if it holds this type.
    fn vec_mut(s: &mut CpuStorage) -> Option<&mut Vec<Self>>;
}

impl Elem for f32 {
    fn vec_mut(s: &mut CpuStorage) -> Option<&mut Vec<Self>> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
}

impl Elem for f64 {
    fn vec_mut(s: &mut CpuStorage) -> Option<&mut Vec<Self>> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
}

/// The contiguous elements of a storage as `T`.
fn slice_mut<'a, T: Elem>(s: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<&'a mut [T]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused optimizer: not contiguous".into()))?;
    match T::vec_mut(s) {
        Some(v) => Ok(&mut v[a..b]),
        None => candle_core::bail!("fused optimizer: state and parameter dtypes differ"),
    }
}

/// Reads the contiguous elements of `t` as `T` and passes them to `f`.
fn with_ref<T: WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> candle_core::Result<R>,
) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*s else {
        bail!("fused optimizer: gradient is not on the CPU");
    };
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| anyhow::anyhow!("fused optimizer: gradient is not contiguous"))?;
    Ok(f(&T::cpu_storage_as_slice(cpu)?[a..b])?)
}

/// Adam / AdamW (see `torch.optim.Adam`, `AdamW`): updates `w`, `m` and `v` in place from `g`.
pub(super) fn adam(h: &Hyper, w: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor) -> Result<()> {
    match w.dtype() {
        candle_core::DType::F32 => adam_t::<f32>(h, w, g, m, v),
        _ => adam_t::<f64>(h, w, g, m, v),
    }
}

fn adam_t<T: Elem>(h: &Hyper, w: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor) -> Result<()> {
    let t = h.step as i32;
    let (b1, b2, eps) = (h.beta1, h.beta2, h.eps);
    let step = h.lr / (1.0 - b1.powi(t));
    let sqrt_bc2 = (1.0 - b2.powi(t)).sqrt();
    let l2 = if h.kind == Kind::Adam {
        h.weight_decay
    } else {
        0.0
    };
    let decay = if h.kind == Kind::Adamw {
        1.0 - h.lr * h.weight_decay
    } else {
        1.0
    };
    with_ref::<T, _>(g, |gs| {
        with_mut(m, |ms, ml| {
            let ms = slice_mut::<T>(ms, ml)?;
            with_mut(v, |vs, vl| {
                let vs = slice_mut::<T>(vs, vl)?;
                with_mut(w, |ws, wl| {
                    let ws = slice_mut::<T>(ws, wl)?;
                    if ws.len() != gs.len() || ms.len() != gs.len() || vs.len() != gs.len() {
                        candle_core::bail!("fused optimizer: state and parameter sizes differ");
                    }
                    ws.par_chunks_mut(CHUNK)
                        .zip(gs.par_chunks(CHUNK))
                        .zip(ms.par_chunks_mut(CHUNK))
                        .zip(vs.par_chunks_mut(CHUNK))
                        .for_each(|(((w, g), m), v)| {
                            for i in 0..w.len() {
                                let wi = w[i].to_f64();
                                let gi = g[i].to_f64() + l2 * wi;
                                let mi = b1 * m[i].to_f64() + (1.0 - b1) * gi;
                                let vi = b2 * v[i].to_f64() + (1.0 - b2) * gi * gi;
                                let mi_t = T::from_f64(mi);
                                let vi_t = T::from_f64(vi);
                                m[i] = mi_t;
                                v[i] = vi_t;
                                let denom = vi_t.to_f64().sqrt() / sqrt_bc2 + eps;
                                w[i] = T::from_f64(wi * decay - step * mi_t.to_f64() / denom);
                            }
                        });
                    Ok(())
                })
            })
        })
    })
}

/// SGD with momentum (dampening 0, no Nesterov): `buf = μ·buf + g` (`buf = g` on the first
/// step), `w -= lr·buf`; without momentum `w -= lr·g` and `m` is left untouched.
pub(super) fn sgd(h: &Hyper, w: &Tensor, g: &Tensor, m: &Tensor, first: bool) -> Result<()> {
    match w.dtype() {
        candle_core::DType::F32 => sgd_t::<f32>(h, w, g, m, first),
        _ => sgd_t::<f64>(h, w, g, m, first),
    }
}

fn sgd_t<T: Elem>(h: &Hyper, w: &Tensor, g: &Tensor, m: &Tensor, first: bool) -> Result<()> {
    let (lr, wd, mu) = (h.lr, h.weight_decay, h.momentum);
    with_ref::<T, _>(g, |gs| {
        with_mut(m, |ms, ml| {
            let ms = slice_mut::<T>(ms, ml)?;
            with_mut(w, |ws, wl| {
                let ws = slice_mut::<T>(ws, wl)?;
                if ws.len() != gs.len() || ms.len() != gs.len() {
                    candle_core::bail!("fused optimizer: state and parameter sizes differ");
                }
                ws.par_chunks_mut(CHUNK)
                    .zip(gs.par_chunks(CHUNK))
                    .zip(ms.par_chunks_mut(CHUNK))
                    .for_each(|((w, g), m)| {
                        for i in 0..w.len() {
                            let wi = w[i].to_f64();
                            let gi = g[i].to_f64() + wd * wi;
                            let d = if mu > 0.0 {
                                let b = if first { gi } else { mu * m[i].to_f64() + gi };
                                let b_t = T::from_f64(b);
                                m[i] = b_t;
                                b_t.to_f64()
                            } else {
                                gi
                            };
                            w[i] = T::from_f64(wi - lr * d);
                        }
                    });
                Ok(())
            })
        })
    })
}
