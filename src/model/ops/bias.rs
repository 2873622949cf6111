//! Per-channel bias addition with a fast backward.
//!
//! `y.broadcast_add(b.reshape((1, C, 1, 1)))` differentiates through Candle's multi-axis
//! `sum_keepdim((0, 2, 3))`, which on [2, 256, 64, 64] costs about as much as a convolution's
//! backward. Here the bias gradient is one parallel pass of per-channel sums, and the input
//! gradient is the output gradient itself (no copy).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::conv::slice;

/// `x` [N, C, H, W] + `b` [C] broadcast over N, H, W.
pub(crate) fn add_channel_bias(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (_, c, _, _) = x.dims4()?;
    if b.elem_count() != c {
        candle_core::bail!("bias has {} elements for {c} channels", b.elem_count());
    }
    if super::generic::cpu_custom(x) {
        x.contiguous()?.apply_op2(&b.contiguous()?, BiasAdd)
    } else {
        super::generic::add_channel_bias(x, b)
    }
}

/// One parallel pass into an unfilled buffer: a copy (`x.to_vec()`) or a zero fill first ran
/// on the calling thread while the pool waited.
fn add<T: WithDType>(x: &[T], b: &[T], hw: usize) -> Vec<T> {
    let c = b.len();
    if x.is_empty() {
        return Vec::new();
    }
    // SAFETY: the chunks of `hw` elements below cover all x.len() of them, and each writes
    // every element of its chunk.
    unsafe {
        super::filled(x.len(), |y| {
            y.par_chunks_mut(hw)
                .zip(x.par_chunks(hw))
                .enumerate()
                .for_each(|(i, (yp, xp))| {
                    let v = b[i % c];
                    for (e, &xv) in yp.iter_mut().zip(xp) {
                        e.write(xv + v);
                    }
                });
        })
    }
}

/// Per-channel sums of `g` [N, C, HW] (f64 accumulation).
fn channel_sums<T: WithDType>(g: &[T], c: usize, hw: usize) -> Vec<T> {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let s: f64 = g
                .chunks_exact(hw)
                .skip(ch)
                .step_by(c)
                .map(|p| p.iter().map(|v| v.to_f64()).sum::<f64>())
                .sum();
            T::from_f64(s)
        })
        .collect()
}

/// (x, b) -> x + b per channel.
struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "driveline-bias-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, _, h, w) = l1.shape().dims4()?;
        let y = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(add(
                slice(s1, l1, "bias add")?,
                slice(s2, l2, "bias add")?,
                h * w,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(add(
                slice(s1, l1, "bias add")?,
                slice(s2, l2, "bias add")?,
                h * w,
            )),
            _ => candle_core::bail!(
                "bias add: unsupported dtypes {:?} / {:?}",
                s1.dtype(),
                s2.dtype()
            ),
        };
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        gy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let gb = if b.track_op() {
            Some(gy.contiguous()?.apply_op1_no_bwd(&ChannelSum)?)
        } else {
            None
        };
        Ok((x.track_op().then(|| gy.clone()), gb))
    }
}

/// [N, C, H, W] -> [C]: sums over N, H, W.
struct ChannelSum;

impl candle_core::CustomOp1 for ChannelSum {
    fn name(&self) -> &'static str {
        "driveline-channel-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, c, h, w) = l.shape().dims4()?;
        let out = match s {
            CpuStorage::F32(_) => {
                CpuStorage::F32(channel_sums(slice::<f32>(s, l, "bias add")?, c, h * w))
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(channel_sums(slice::<f64>(s, l, "bias add")?, c, h * w))
            }
            _ => candle_core::bail!("channel sum: unsupported dtype {:?}", s.dtype()),
        };
        Ok((out, Shape::from(c)))
    }
}
