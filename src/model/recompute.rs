//! Activation recomputation (`train.recompute = true`): a ResNet stage keeps only its input and
//! output alive between the forward and the backward pass, and its backward runs the stage's
//! forward again, with the graph, to get the gradients. On every device: the result is attached
//! to the graph by the same copy-of-storage custom op as the generic ops (`ops/generic.rs`).
//!
//! The gradients reach the stage's parameters through one extra graph input, the concatenation
//! of the parameters (flattened): the backward returns the inner gradients concatenated the
//! same way, and Candle's backward of the concatenation hands each parameter its slice. That
//! concatenation (one copy of the stage's parameters) is the memory this costs; the stage's
//! activations are what it saves. BatchNorm's running statistics and `num_batches_tracked` are
//! not updated by the recomputation ([`active`] is set while it runs), so a step updates them
//! once, as without recomputation; the batch statistics recomputed are those of the forward.

use std::cell::Cell;
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, Layout, Result, Shape, Storage, Tensor, Var,
};

thread_local! {
    static ACTIVE: Cell<bool> = const { Cell::new(false) };
}

/// Whether a recomputation is running on this thread: BatchNorm then leaves its running
/// statistics and counter alone.
pub fn active() -> bool {
    ACTIVE.with(|a| a.get())
}

/// Sets [`active`] for its lifetime (restoring the previous value, errors included).
struct Active(bool);

impl Active {
    fn new() -> Self {
        Self(ACTIVE.with(|a| a.replace(true)))
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        ACTIVE.with(|a| a.set(self.0));
    }
}

/// The forward function of a checkpointed segment.
pub type Segment = Arc<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

struct Checkpoint {
    y: Mutex<Option<Tensor>>,
    f: Segment,
    params: Vec<Var>,
}

impl Checkpoint {
    fn take(&self) -> Result<Tensor> {
        self.y
            .lock()
            .map_err(|_| candle_core::Error::Msg("recompute: lock poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("recompute: forward ran twice".into()))
    }
}

impl CustomOp2 for Checkpoint {
    fn name(&self) -> &'static str {
        "driveline-recompute"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = self.take()?;
        let (s, l) = y.storage_and_layout();
        match &*s {
            Storage::Cpu(c) => Ok((c.try_clone(l)?, l.shape().clone())),
            _ => candle_core::bail!("recompute: result not on the CPU"),
        }
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let y = self.take()?;
        let (s, l) = y.storage_and_layout();
        match &*s {
            Storage::Cuda(c) => Ok((c.try_clone(l)?, l.shape().clone())),
            _ => candle_core::bail!("recompute: result not on a CUDA device"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        packed: &Tensor,
        _res: &Tensor,
        gy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _active = Active::new();
        let xv = Var::from_tensor(&x.detach())?;
        let y = (self.f)(xv.as_tensor())?;
        let grads = (y * gy.detach())?.sum_all()?.backward()?;
        let gx = x.track_op().then(|| grads.get(xv.as_tensor()).cloned());
        let gp = if packed.track_op() {
            let parts = self
                .params
                .iter()
                .map(|v| match grads.get(v.as_tensor()) {
                    Some(g) => g.flatten_all(),
                    None => v.as_tensor().zeros_like()?.flatten_all(),
                })
                .collect::<Result<Vec<_>>>()?;
            Some(Tensor::cat(&parts, 0)?)
        } else {
            None
        };
        Ok((gx.flatten(), gp))
    }
}

/// `f(x)` in training, recomputed in the backward instead of keeping its activations:
/// `params` must be every variable `f` uses whose gradient is wanted.
pub fn checkpoint(x: &Tensor, params: &[Var], f: Segment) -> Result<Tensor> {
    let y = f(&x.detach())?;
    if params.is_empty() && !x.track_op() {
        return Ok(y);
    }
    let y = if y.is_contiguous() && y.layout().start_offset() == 0 {
        y
    } else {
        y.force_contiguous()?
    };
    let flat = params
        .iter()
        .map(|v| v.as_tensor().flatten_all())
        .collect::<Result<Vec<_>>>()?;
    let packed = Tensor::cat(&flat, 0)?;
    drop(flat);
    x.apply_op2(
        &packed,
        Checkpoint {
            y: Mutex::new(Some(y)),
            f,
            params: params.to_vec(),
        },
    )
}
