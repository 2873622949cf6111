//! The device-generic formulation of every custom op: what runs on CUDA (and on any non-CPU
//! device, or for dtypes the CPU kernels lack), written only with Candle operations that exist
//! on every device and run fast on a GPU (matmul on cuBLAS, conv2d on cuDNN or im2col + cuBLAS,
//! elementwise and trailing-axis reductions). The same code runs on CPU tensors when
//! [`set_force_generic`] is on, which is how the tests prove it against the CPU custom ops.
//!
//! Each op computes its forward on detached tensors (no autograd graph), then attaches the result
//! to the graph of its inputs with a hand-written backward ([`attach1`]..[`attach3`]): Candle's
//! own backward would run a naive `conv_transpose2d` for every convolution's input gradient, keep
//! several activation-sized tensors per BatchNorm and ReLU alive, and bail on the ResNet stem's
//! 3×3/stride-2 max-pool ("backward not supported for maxpool2d if ksize != stride"). Attaching
//! costs one device copy of the output (a custom op must return storage it owns); the forward's
//! temporaries are freed before the op returns.
//!
//! Semantics are those of the CPU ops and of PyTorch (see `mod.rs`); the backward formulas:
//! - conv2d: the input gradient is a forward convolution of the output gradient (zero-inserted
//!   between pixels for stride > 1) with the flipped, transposed kernel; the weight gradient is a
//!   GEMM of the output gradient with an im2col matrix built from strided slices; 1×1 kernels are
//!   GEMMs throughout. im2col-sized buffers (ours, and Candle's inside conv2d) are banded over
//!   images and output rows to at most [`BAND_ELEMS`] elements: Candle's CUDA im2col launch
//!   casts its element count to `u32`.
//! - BatchNorm (training): per-channel statistics as reductions over [N, C, H·W] rows; the
//!   backward keeps only the input, the output and two [C] vectors, and reduces Σg and Σg·x̂.
//! - max-pool: the gradient goes to the first maximum of each window in scan order, found again
//!   in the backward from the input and the output (no index tensor is kept).
//!
//! Mixed precision (`train.precision = "bf16"`) lives here too: [`set_autocast`] makes the
//! convolutions multiply in bf16, forward and backward, with f32 everywhere else.

use std::cell::Cell;
use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape,
    Storage, Tensor,
};

thread_local! {
    static FORCE_GENERIC: Cell<bool> = const { Cell::new(false) };
    static AUTOCAST: Cell<Option<DType>> = const { Cell::new(None) };
}

/// Test-only switch: with `true`, every op in [`super`] takes its device-generic path on CPU
/// tensors too, on the calling thread (the graph and its backward run on the thread that built
/// them). Returns the previous setting. The default (`false`) is the CPU custom ops, whose
/// numerics are unchanged by this module.
pub fn set_force_generic(on: bool) -> bool {
    FORCE_GENERIC.with(|f| f.replace(on))
}

/// Whether [`set_force_generic`] is on for this thread.
pub fn generic_forced() -> bool {
    FORCE_GENERIC.with(|f| f.get())
}

/// Whether the CPU custom-op kernels handle `x`: a CPU f32/f64 tensor, the generic path not
/// forced and no [`set_autocast`] in effect. Everything else takes this module's path.
pub(crate) fn cpu_custom(x: &Tensor) -> bool {
    x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && !generic_forced()
        && autocast().is_none()
}

/// Mixed precision for the products, PyTorch's `torch.autocast(dtype=torch.bfloat16)`
/// (`train.precision = "bf16"`), on the calling thread: with `Some(BF16)` (or `F16`), every
/// convolution (forward, input gradient, weight gradient) and the transposed convolution's GEMM
/// casts its f32 operands to that dtype, multiplies there (cuBLAS and cuDNN accumulate in f32 and
/// round the result to bf16; on the CPU the same values are emulated, see `Prod`), and hands
/// its result back as f32. Everything else stays f32: BatchNorm, ReLU, pooling, the resize, the
/// loss, the weights (the master copy the optimiser updates) and its state. Unlike PyTorch, the
/// results go back to f32 at once, so the activations kept for the backward are f32 (the same memory as
/// without autocast; `train.recompute` is what lowers it). f64 tensors are never cast.
///
/// While it is on, every op takes the device-generic path, on the CPU too (the CPU custom
/// kernels are f32/f64 only): that is how the CPU tests prove the cast is where it should be.
/// `None` turns it off. Returns the previous setting; any other dtype is an error.
pub fn set_autocast(dtype: Option<DType>) -> Result<Option<DType>> {
    if let Some(dt) = dtype {
        if !matches!(dt, DType::BF16 | DType::F16) {
            candle_core::bail!("autocast: {dt:?} is not a 16-bit float type (bf16, f16)");
        }
    }
    Ok(AUTOCAST.with(|a| a.replace(dtype)))
}

/// The [`set_autocast`] setting of this thread.
pub fn autocast() -> Option<DType> {
    AUTOCAST.with(|a| a.get())
}

/// How the products of one op run under the current [`set_autocast`]: the dtype of the op's
/// tensors (`out`) and the dtype of the products (`prod`: the autocast dtype for f32 tensors,
/// else `out`). Captured by the forward, so the backward multiplies the same way.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Prod {
    out: DType,
    prod: DType,
    /// Candle's CPU convolution has no bf16 GEMM: on the CPU the operands and results are
    /// rounded to `prod` and kept in `out`, which gives the values of a bf16 GEMM with f32
    /// accumulation (the product of two bf16 numbers is exact in f32).
    emulate: bool,
}

impl Prod {
    pub(crate) fn of(x: &Tensor) -> Self {
        let prod = match autocast() {
            Some(dt) if x.dtype() == DType::F32 => dt,
            _ => x.dtype(),
        };
        Self {
            out: x.dtype(),
            prod,
            emulate: x.device().is_cpu() && prod != x.dtype(),
        }
    }

    /// An operand of a product.
    pub(crate) fn operand(&self, t: &Tensor) -> Result<Tensor> {
        if self.emulate {
            t.to_dtype(self.prod)?.to_dtype(self.out)
        } else {
            t.to_dtype(self.prod)
        }
    }

    /// A product's result in the op's dtype (rounded to `prod` first, as a GEMM in `prod`
    /// writes it).
    pub(crate) fn result(&self, t: &Tensor) -> Result<Tensor> {
        if self.emulate {
            t.to_dtype(self.prod)?.to_dtype(self.out)
        } else {
            t.to_dtype(self.out)
        }
    }
}

/// Most elements of one im2col-style buffer: 2³⁰, well inside Candle's `u32` launch sizes.
pub(crate) const BAND_ELEMS: usize = 1 << 30;

/// Adds which op failed on which device, and the way out, to an error from the generic path.
fn on_device<T>(r: Result<T>, op: &str, dev: &Device) -> Result<T> {
    r.map_err(|e| {
        let hint = if dev.is_cpu() {
            String::new()
        } else {
            " (train.device = \"cpu\" avoids this device)".into()
        };
        e.context(format!("{op} on {}{hint}", super::super::device::name(dev)))
    })
}

// ---------------------------------------------------------------------------------------------
// Attaching a precomputed result to the graph with a hand-written backward.

/// The output of an op computed outside the graph, moved into the custom op's result once.
struct Pending(Mutex<Option<Tensor>>);

impl Pending {
    fn new(y: Tensor) -> Result<Self> {
        // The custom op returns a copy of y's storage as a contiguous tensor of y's shape.
        let y = if y.is_contiguous() && y.layout().start_offset() == 0 {
            y
        } else {
            y.force_contiguous()?
        };
        Ok(Self(Mutex::new(Some(y))))
    }

    fn take(&self, op: &str) -> Result<Tensor> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{op}: lock poisoned")))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{op}: forward ran twice")))
    }

    fn cpu(&self, op: &str) -> Result<(CpuStorage, Shape)> {
        let y = self.take(op)?;
        let (s, l) = y.storage_and_layout();
        match &*s {
            Storage::Cpu(c) => Ok((c.try_clone(l)?, l.shape().clone())),
            _ => candle_core::bail!("{op}: result not on the CPU"),
        }
    }

    fn cuda(&self, op: &str) -> Result<(CudaStorage, Shape)> {
        let y = self.take(op)?;
        let (s, l) = y.storage_and_layout();
        match &*s {
            Storage::Cuda(c) => Ok((c.try_clone(l)?, l.shape().clone())),
            _ => candle_core::bail!("{op}: result not on a CUDA device"),
        }
    }
}

type Grad = Option<Tensor>;
/// `(a, y, grad_y) -> grad_a`
type Bwd1 = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Grad> + Send + Sync>;
/// `(a, b, y, grad_y) -> (grad_a, grad_b)`
type Bwd2 = Box<dyn Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Result<(Grad, Grad)> + Send + Sync>;
/// `(a, b, c, y, grad_y) -> (grad_a, grad_b, grad_c)`
type Bwd3 = Box<
    dyn Fn(&Tensor, &Tensor, &Tensor, &Tensor, &Tensor) -> Result<(Grad, Grad, Grad)> + Send + Sync,
>;

struct Attach1 {
    name: &'static str,
    y: Pending,
    bwd: Bwd1,
}

struct Attach2 {
    name: &'static str,
    y: Pending,
    bwd: Bwd2,
}

struct Attach3 {
    name: &'static str,
    y: Pending,
    bwd: Bwd3,
}

impl CustomOp1 for Attach1 {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.y.cpu(self.name)
    }
    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.y.cuda(self.name)
    }
    fn bwd(&self, a: &Tensor, res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        on_device(
            (self.bwd)(&a.detach(), &res.detach(), &g.detach()),
            self.name,
            g.device(),
        )
    }
}

impl CustomOp2 for Attach2 {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.y.cpu(self.name)
    }
    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.y.cuda(self.name)
    }
    fn bwd(&self, a: &Tensor, b: &Tensor, res: &Tensor, g: &Tensor) -> Result<(Grad, Grad)> {
        let (ga, gb) = on_device(
            (self.bwd)(&a.detach(), &b.detach(), &res.detach(), &g.detach()),
            self.name,
            g.device(),
        )?;
        Ok((ga.filter(|_| a.track_op()), gb.filter(|_| b.track_op())))
    }
}

impl CustomOp3 for Attach3 {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.y.cpu(self.name)
    }
    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.y.cuda(self.name)
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        res: &Tensor,
        g: &Tensor,
    ) -> Result<(Grad, Grad, Grad)> {
        let (ga, gb, gc) = on_device(
            (self.bwd)(
                &a.detach(),
                &b.detach(),
                &c.detach(),
                &res.detach(),
                &g.detach(),
            ),
            self.name,
            g.device(),
        )?;
        Ok((
            ga.filter(|_| a.track_op()),
            gb.filter(|_| b.track_op()),
            gc.filter(|_| c.track_op()),
        ))
    }
}

/// `y` (computed from `a` outside the graph) as a result of `a` in the graph, with gradient
/// `bwd(a, y, grad_y)` (all detached). Without a graph to join, `y` itself.
pub(crate) fn attach1(
    name: &'static str,
    y: Tensor,
    a: &Tensor,
    bwd: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Grad> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !a.track_op() {
        return Ok(y);
    }
    let op = Attach1 {
        name,
        y: Pending::new(y)?,
        bwd: Box::new(bwd),
    };
    a.apply_op1(op)
}

/// Two-input [`attach1`]: gradients `bwd(a, b, y, grad_y)`.
pub(crate) fn attach2(
    name: &'static str,
    y: Tensor,
    a: &Tensor,
    b: &Tensor,
    bwd: impl Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Result<(Grad, Grad)> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !a.track_op() && !b.track_op() {
        return Ok(y);
    }
    let op = Attach2 {
        name,
        y: Pending::new(y)?,
        bwd: Box::new(bwd),
    };
    a.apply_op2(b, op)
}

/// Three-input [`attach1`]: gradients `bwd(a, b, c, y, grad_y)`.
pub(crate) fn attach3(
    name: &'static str,
    y: Tensor,
    (a, b, c): (&Tensor, &Tensor, &Tensor),
    bwd: impl Fn(&Tensor, &Tensor, &Tensor, &Tensor, &Tensor) -> Result<(Grad, Grad, Grad)>
        + Send
        + Sync
        + 'static,
) -> Result<Tensor> {
    if !a.track_op() && !b.track_op() && !c.track_op() {
        return Ok(y);
    }
    let op = Attach3 {
        name,
        y: Pending::new(y)?,
        bwd: Box::new(bwd),
    };
    a.apply_op3(b, c, op)
}

// ---------------------------------------------------------------------------------------------
// Shape helpers.

/// Elements `start, start + step, …` (`count` of them) along `dim`: a narrow, and for `step > 1`
/// a split of the axis into (count, step) keeping index 0 (zero-padded at the end as needed).
/// Differentiable by Candle (narrow, pad, reshape).
pub(crate) fn take_strided(
    x: &Tensor,
    dim: usize,
    start: usize,
    count: usize,
    step: usize,
) -> Result<Tensor> {
    if count == 0 {
        candle_core::bail!("take_strided: empty selection");
    }
    let len = (count - 1) * step + 1;
    let t = x.narrow(dim, start, len)?;
    if step == 1 {
        return Ok(t);
    }
    let t = t.pad_with_zeros(dim, 0, step - 1)?;
    let mut dims = t.dims().to_vec();
    dims[dim] = count;
    dims.insert(dim + 1, step);
    t.reshape(dims)?.narrow(dim + 1, 0, 1)?.squeeze(dim + 1)
}

/// The inverse placement of [`take_strided`] with `start = 0`: `x`'s `count` elements along
/// `dim` go to positions `0, step, 2·step, …` of an axis of length `len` (zeros elsewhere).
fn spread(x: &Tensor, dim: usize, step: usize, len: usize) -> Result<Tensor> {
    let count = x.dim(dim)?;
    let t = if step == 1 {
        x.clone()
    } else {
        let mut dims = x.dims().to_vec();
        dims[dim] = count * step;
        x.unsqueeze(dim + 1)?
            .pad_with_zeros(dim + 1, 0, step - 1)?
            .reshape(dims)?
    };
    let have = t.dim(dim)?;
    if have >= len {
        t.narrow(dim, 0, len)
    } else {
        t.pad_with_zeros(dim, 0, len - have)
    }
}

/// Per-channel sums of [N, C, H, W] → [C], as reductions over trailing rows.
fn channel_sum(t: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = t.dims4()?;
    t.contiguous()?.reshape((n, c, h * w))?.sum(2)?.sum(0)
}

/// `v` [C] as [1, C, 1, 1].
fn per_channel(v: &Tensor) -> Result<Tensor> {
    v.reshape((1, (), 1, 1))
}

// ---------------------------------------------------------------------------------------------
// Convolution.

/// Shapes and hyper-parameters of one convolution ([N, C, H, W] ⊛ [O, C, kh, kw]).
#[derive(Clone, Copy, Debug)]
struct Geom {
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
}

impl Geom {
    fn new(x: &Tensor, w: &Tensor, stride: usize, padding: usize, dilation: usize) -> Result<Self> {
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
        })
    }

    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.padding == 0
    }
}

/// Candle's conv2d (groups 1, symmetric padding), banded over images and then output rows so
/// that its im2col buffer (N·Ho·Wo·C·kh·kw elements) stays within [`BAND_ELEMS`].
fn conv2d_banded(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    dilation: usize,
) -> Result<Tensor> {
    let g = Geom::new(x, w, stride, padding, dilation)?;
    let per_row = g.wo * g.c * g.kh * g.kw;
    let per_image = per_row * g.ho;
    if g.n * per_image <= BAND_ELEMS {
        return x.conv2d(w, padding, stride, dilation, 1);
    }
    if per_image <= BAND_ELEMS {
        let step = (BAND_ELEMS / per_image).max(1);
        let parts = (0..g.n)
            .step_by(step)
            .map(|i| {
                x.narrow(0, i, step.min(g.n - i))?
                    .conv2d(w, padding, stride, dilation, 1)
            })
            .collect::<Result<Vec<_>>>()?;
        return Tensor::cat(&parts, 0);
    }
    // One image is too large: pad explicitly, then convolve bands of output rows.
    let rows = (BAND_ELEMS / per_row).max(1);
    let xp = x
        .pad_with_zeros(2, padding, padding)?
        .pad_with_zeros(3, padding, padding)?;
    let reach = dilation * (g.kh - 1) + 1;
    let mut images = Vec::with_capacity(g.n);
    for i in 0..g.n {
        let xi = xp.narrow(0, i, 1)?;
        let mut bands = Vec::new();
        for r0 in (0..g.ho).step_by(rows) {
            let nr = rows.min(g.ho - r0);
            let band = xi.narrow(2, r0 * stride, (nr - 1) * stride + reach)?;
            bands.push(band.conv2d(w, 0, stride, dilation, 1)?);
        }
        images.push(Tensor::cat(&bands, 2)?);
    }
    Tensor::cat(&images, 0)
}

/// `x` [N, C, H, W] (stride 1, no padding) times `w` [O, C, 1, 1]: one batched GEMM.
fn pointwise_fwd(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (n, c, h, wd) = x.dims4()?;
    let o = w.dim(0)?;
    let w2 = w.reshape((o, c))?.unsqueeze(0)?.broadcast_as((n, o, c))?;
    w2.matmul(&x.contiguous()?.reshape((n, c, h * wd))?)?
        .reshape((n, o, h, wd))
}

/// Gradients of [`pointwise_fwd`]: `gx_n = Wᵀ·gy_n`, `gW = Σ_n gy_n·x_nᵀ`, on operands in
/// `p`'s product form; the results in the op's dtype, where the sum over images is taken.
fn pointwise_bwd(x: &Tensor, w: &Tensor, gy: &Tensor, p: Prod) -> Result<(Tensor, Tensor)> {
    let (n, c, h, wd) = x.dims4()?;
    let o = w.dim(0)?;
    let gy3 = gy.contiguous()?.reshape((n, o, h * wd))?;
    let wt = w
        .reshape((o, c))?
        .t()?
        .unsqueeze(0)?
        .broadcast_as((n, c, o))?;
    let gx = p.result(&wt.matmul(&gy3)?.reshape((n, c, h, wd))?)?;
    let x3 = x.contiguous()?.reshape((n, c, h * wd))?;
    let gw = p
        .result(&gy3.matmul(&x3.transpose(1, 2)?)?)?
        .sum(0)?
        .reshape((o, c, 1, 1))?;
    Ok((gx, gw))
}

/// The forward convolution of the generic path, on tensors outside the graph.
fn conv_fwd(x: &Tensor, w: &Tensor, g: &Geom) -> Result<Tensor> {
    if g.pointwise() && g.stride == 1 {
        pointwise_fwd(x, w)
    } else {
        conv2d_banded(x, w, g.stride, g.padding, g.dilation)
    }
}

/// Input gradient: `gy` zero-inserted by the stride (and zero-extended to the padded input's
/// last window start, H + 2·padding − dilation·(kh−1)), convolved at stride 1 with the flipped,
/// transposed kernel at padding `dilation·(k−1) − padding` per axis (a crop where negative).
fn conv_input_grad(w: &Tensor, gy: &Tensor, g: &Geom) -> Result<Tensor> {
    let s = g.stride;
    let lh = g.h + 2 * g.padding - g.dilation * (g.kh - 1);
    let lw = g.w + 2 * g.padding - g.dilation * (g.kw - 1);
    let gyd = spread(&spread(gy, 2, s, lh)?, 3, s, lw)?;
    let wt = w.transpose(0, 1)?.contiguous()?.flip(&[2, 3])?;
    let qh = (g.dilation * (g.kh - 1)) as isize - g.padding as isize;
    let qw = (g.dilation * (g.kw - 1)) as isize - g.padding as isize;
    let gx = if qh == qw && qh >= 0 {
        conv2d_banded(&gyd, &wt, 1, qh as usize, g.dilation)?
    } else {
        let pad = |t: Tensor, dim: usize, q: isize| -> Result<Tensor> {
            if q > 0 {
                t.pad_with_zeros(dim, q as usize, q as usize)
            } else {
                Ok(t)
            }
        };
        let t = pad(pad(gyd, 2, qh)?, 3, qw)?;
        let mut t = conv2d_banded(&t, &wt, 1, 0, g.dilation)?;
        for (dim, q) in [(2, qh), (3, qw)] {
            if q < 0 {
                let cut = (-q) as usize;
                let len = t.dim(dim)? - 2 * cut;
                t = t.narrow(dim, cut, len)?;
            }
        }
        t
    };
    if gx.dims() != [g.n, g.c, g.h, g.w] {
        candle_core::bail!(
            "conv2d backward: input gradient {:?}, expected {:?}",
            gx.dims(),
            [g.n, g.c, g.h, g.w]
        );
    }
    Ok(gx)
}

/// Weight gradient `gW = Σ gy · im2col(x)ᵀ`: a GEMM per band of images (or of output rows of
/// one image) with an im2col matrix of at most [`BAND_ELEMS`] elements, built from strided
/// slices of the zero-padded input. Operands in `prod`'s product form; each band's product comes
/// back in the op's dtype, where the bands and images are summed.
fn conv_weight_grad(x: &Tensor, gy: &Tensor, g: &Geom, prod: Prod) -> Result<Tensor> {
    let (kk, p) = (g.kh * g.kw, g.padding);
    let per_row = g.c * kk * g.wo;
    let rows = (BAND_ELEMS / per_row).clamp(1, g.ho);
    let images = if rows == g.ho {
        (BAND_ELEMS / (per_row * g.ho)).clamp(1, g.n)
    } else {
        1
    };
    let mut acc: Option<Tensor> = None;
    for i0 in (0..g.n).step_by(images) {
        let nb = images.min(g.n - i0);
        let xp = x
            .narrow(0, i0, nb)?
            .pad_with_zeros(2, p, p)?
            .pad_with_zeros(3, p, p)?;
        for r0 in (0..g.ho).step_by(rows) {
            let nr = rows.min(g.ho - r0);
            let mut taps = Vec::with_capacity(kk);
            for i in 0..g.kh {
                let band = take_strided(&xp, 2, r0 * g.stride + i * g.dilation, nr, g.stride)?;
                for j in 0..g.kw {
                    taps.push(take_strided(&band, 3, j * g.dilation, g.wo, g.stride)?);
                }
            }
            // [nb, C, kh·kw, nr, Wo] → [nb, C·kh·kw, nr·Wo], the weight's (c, i, j) order.
            let cols = Tensor::stack(&taps, 2)?.reshape((nb, g.c * kk, nr * g.wo))?;
            drop(taps);
            let gyb = gy
                .narrow(0, i0, nb)?
                .narrow(2, r0, nr)?
                .contiguous()?
                .reshape((nb, g.o, nr * g.wo))?;
            let part = prod.result(&gyb.matmul(&cols.transpose(1, 2)?)?)?.sum(0)?;
            acc = Some(match acc {
                Some(a) => (a + part)?,
                None => part,
            });
        }
    }
    match acc {
        Some(a) => a.reshape((g.o, g.c, g.kh, g.kw)),
        None => candle_core::bail!("conv2d: empty batch"),
    }
}

/// Generic conv2d without bias (see [`super::conv2d`] for the semantics).
pub(crate) fn conv2d(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    dilation: usize,
) -> Result<Tensor> {
    let g = Geom::new(x, w, stride, padding, dilation)?;
    let dev = x.device().clone();
    let what = "conv2d (generic path)";
    if g.pointwise() && g.stride > 1 {
        // A strided 1×1 convolution is a 1×1 convolution of the subsampled input; Candle
        // differentiates the subsampling (narrow/reshape), the GEMM is ours.
        let xs = take_strided(x, 2, 0, g.ho, g.stride)?;
        let xs = take_strided(&xs, 3, 0, g.wo, g.stride)?;
        return conv2d(&xs, w, 1, 0, 1);
    }
    // Under autocast the operands are cast for the products (in the backward too, with the
    // setting of the forward) and the results come back in the input's dtype.
    let p = Prod::of(x);
    let fwd = || {
        p.result(&conv_fwd(
            &p.operand(&x.detach())?,
            &p.operand(&w.detach())?,
            &g,
        )?)
    };
    let y = on_device(fwd(), what, &dev)?;
    attach2("driveline-generic-conv2d", y, x, w, move |x, w, _, gy| {
        let (x, w, gy) = (p.operand(x)?, p.operand(w)?, p.operand(gy)?);
        let (gx, gw) = if g.pointwise() {
            pointwise_bwd(&x, &w, &gy, p)?
        } else {
            let gx = p.result(&conv_input_grad(&w, &gy, &g)?)?;
            (gx, conv_weight_grad(&x, &gy, &g, p)?)
        };
        Ok((Some(gx), Some(gw)))
    })
}

// ---------------------------------------------------------------------------------------------
// Bias, ReLU, residual addition.

/// `x` [N, C, H, W] + `b` [C].
pub(crate) fn add_channel_bias(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    let y = x.detach().broadcast_add(&per_channel(&b.detach())?)?;
    attach2("driveline-generic-bias-add", y, x, b, |_, _, _, gy| {
        Ok((Some(gy.clone()), Some(channel_sum(gy)?)))
    })
}

/// `gy` where `y > 0`, else 0.
fn relu_mask(y: &Tensor, gy: &Tensor) -> Result<Tensor> {
    gy.mul(&y.gt(0.0)?.to_dtype(gy.dtype())?)
}

/// `max(x, 0)`, gradient 0 at 0.
pub(crate) fn relu(x: &Tensor) -> Result<Tensor> {
    let y = x.detach().relu()?;
    attach1("driveline-generic-relu", y, x, |_, y, gy| {
        Ok(Some(relu_mask(y, gy)?))
    })
}

/// `max(a + b, 0)`; both inputs get the masked gradient.
pub(crate) fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let y = (a.detach() + b.detach())?.relu()?;
    attach2("driveline-generic-add-relu", y, a, b, |_, _, y, gy| {
        let g = relu_mask(y, gy)?;
        Ok((Some(g.clone()), Some(g)))
    })
}

// ---------------------------------------------------------------------------------------------
// BatchNorm (training mode).

/// Training-mode BatchNorm of `x` [N, C, H, W] with batch statistics, optionally followed by
/// ReLU. Returns the output and the batch mean and biased variance ([C], for the running
/// statistics).
pub(crate) fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (n, _, h, w) = x.dims4()?;
    let count = (n * h * w) as f64;
    let dev = x.device().clone();
    let what = "batch_norm (generic path)";
    let fwd = || -> Result<(Tensor, Tensor, Tensor, Tensor)> {
        let xd = x.detach();
        let mean = (channel_sum(&xd)? / count)?;
        let var = (channel_sum(&xd.broadcast_sub(&per_channel(&mean)?)?.sqr()?)? / count)?;
        let invstd = (var.clone() + eps)?.sqrt()?.recip()?;
        let scale = (weight.detach() * &invstd)?;
        let shift = (bias.detach() - (&mean * &scale)?)?;
        let y = xd
            .broadcast_mul(&per_channel(&scale)?)?
            .broadcast_add(&per_channel(&shift)?)?;
        let y = if relu { y.relu()? } else { y };
        Ok((y, mean, var, invstd))
    };
    let (y, mean, var, invstd) = on_device(fwd(), what, &dev)?;
    let (m4, i4) = (per_channel(&mean)?, per_channel(&invstd)?);
    let y_mean = mean.clone();
    let y = attach3(
        "driveline-generic-batch-norm",
        y,
        (x, weight, bias),
        move |x, w, _, y, gy| {
            let g = if relu { relu_mask(y, gy)? } else { gy.clone() };
            let xhat = x.broadcast_sub(&m4)?.broadcast_mul(&i4)?;
            let sum_g = channel_sum(&g)?;
            let sum_gx = channel_sum(&(&g * &xhat)?)?;
            let k = per_channel(&(w * &invstd)?)?;
            let gx = g
                .broadcast_sub(&per_channel(&(&sum_g / count)?)?)?
                .sub(&xhat.broadcast_mul(&per_channel(&(&sum_gx / count)?)?)?)?
                .broadcast_mul(&k)?;
            Ok((Some(gx), Some(sum_gx), Some(sum_g)))
        },
    )?;
    Ok((y, y_mean, var))
}

// ---------------------------------------------------------------------------------------------
// Max pooling.

/// The -inf-padded input and the (row, column) strided window taps of a max-pool.
fn pool_taps(
    x: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<(Vec<Tensor>, usize, usize)> {
    let (n, c, h, w) = x.dims4()?;
    let (ho, wo) = (
        (h + 2 * padding - kernel) / stride + 1,
        (w + 2 * padding - kernel) / stride + 1,
    );
    let xp = if padding > 0 {
        let fill = |s: (usize, usize, usize, usize)| -> Result<Tensor> {
            Tensor::full(f32::NEG_INFINITY, s, x.device())?.to_dtype(x.dtype())
        };
        let p = padding;
        let t = Tensor::cat(&[fill((n, c, h, p))?, x.clone(), fill((n, c, h, p))?], 3)?;
        let wp = w + 2 * p;
        Tensor::cat(&[fill((n, c, p, wp))?, t, fill((n, c, p, wp))?], 2)?
    } else {
        x.clone()
    };
    let mut taps = Vec::with_capacity(kernel * kernel);
    for i in 0..kernel {
        let rows = take_strided(&xp, 2, i, ho, stride)?;
        for j in 0..kernel {
            taps.push(take_strided(&rows, 3, j, wo, stride)?);
        }
    }
    Ok((taps, ho, wo))
}

/// Max pooling (see [`super::max_pool2d`]): the maximum over the window taps; the backward
/// sends each output gradient to the first tap (scan order) equal to the maximum.
pub(crate) fn max_pool2d(
    x: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let dev = x.device().clone();
    let what = "max_pool2d (generic path)";
    let fwd = || -> Result<Tensor> {
        let (taps, _, _) = pool_taps(&x.detach(), kernel, stride, padding)?;
        let mut it = taps.into_iter();
        let mut y = it
            .next()
            .ok_or_else(|| candle_core::Error::Msg("max_pool2d: empty kernel".into()))?;
        for t in it {
            y = y.maximum(&t)?;
        }
        Ok(y)
    };
    let y = on_device(fwd(), what, &dev)?;
    attach1("driveline-generic-max-pool2d", y, x, move |x, saved, gy| {
        let (_, _, h, w) = x.dims4()?;
        let (hp, wp) = (h + 2 * padding, w + 2 * padding);
        let (taps, _, _) = pool_taps(x, kernel, stride, padding)?;
        let saved = saved.clone();
        let mut taken = saved.zeros_like()?;
        let mut gxp: Option<Tensor> = None;
        for (t, tap) in taps.iter().enumerate() {
            let (i, j) = (t / kernel, t % kernel);
            let hit = tap.eq(&saved)?.to_dtype(gy.dtype())?;
            let first = (&hit * (1.0 - &taken)?)?;
            taken = (taken + &first)?;
            let part = (gy * &first)?;
            let part = spread(&part, 2, stride, hp - i)?.pad_with_zeros(2, i, 0)?;
            let part = spread(&part, 3, stride, wp - j)?.pad_with_zeros(3, j, 0)?;
            gxp = Some(match gxp {
                Some(a) => (a + part)?,
                None => part,
            });
        }
        let gxp = gxp.ok_or_else(|| candle_core::Error::Msg("max_pool2d: empty kernel".into()))?;
        Ok(Some(gxp.narrow(2, padding, h)?.narrow(3, padding, w)?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `spread` puts the elements at every `step`-th position (zeros between and after), and
    /// `take_strided` reads them back.
    #[test]
    fn spread_and_take_strided_are_inverse() {
        let x = Tensor::arange(1f32, 7., &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 2, 3))
            .unwrap();
        let r = spread(&spread(&x, 2, 2, 4).unwrap(), 3, 2, 5).unwrap();
        assert_eq!(
            r.squeeze(0)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap(),
            vec![
                vec![1., 0., 2., 0., 3.],
                vec![0.; 5],
                vec![4., 0., 5., 0., 6.],
                vec![0.; 5]
            ]
        );
        let back = take_strided(&take_strided(&r, 2, 0, 2, 2).unwrap(), 3, 0, 3, 2).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![1., 2., 3., 4., 5., 6.]
        );
    }
}
