//! Building blocks shared by the networks: a named parameter store laid out like a PyTorch
//! `state_dict`, a seedable builder that creates and initialises parameters the way PyTorch
//! does, and thin layer wrappers (convolution, batch norm, dropout) over [`super::ops`].
//!
//! Candle's CPU RNG cannot be seeded, so every random number (initial weights, dropout masks)
//! comes from `rand`'s `StdRng`: the same seed gives the same model and the same masks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use rand_distr::{Distribution, Normal};

use super::ops;

/// What a forward pass is for: which BatchNorm statistics and dropout it uses, and whether it
/// records the autograd graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// Training: batch statistics (the running ones and `num_batches_tracked` updated), dropout
    /// on; the graph through the parameters is recorded.
    Train,
    /// Evaluation with the graph recorded: running statistics, no dropout, and gradients of the
    /// output with respect to the parameters remain available (every activation stays alive
    /// until the output is dropped).
    Eval,
    /// Inference: [`Pass::Eval`] on detached parameters, so that no graph is kept and each
    /// activation is freed as soon as its consumer ran; BatchNorm, ReLU and residual additions
    /// overwrite the fresh convolution outputs instead of allocating new tensors. The outputs
    /// are bitwise those of [`Pass::Eval`]. (An input that itself tracks a graph keeps tracking
    /// it, through the non-in-place paths.)
    Infer,
}

impl Pass {
    /// Whether BatchNorm uses batch statistics and dropout is active.
    pub fn is_train(self) -> bool {
        self == Pass::Train
    }

    /// The tensor of a parameter as this pass uses it: detached for inference (shared
    /// storage, no copy), the variable itself otherwise.
    pub fn param(self, v: &Var) -> Tensor {
        match self {
            Pass::Infer => v.as_tensor().detach(),
            Pass::Train | Pass::Eval => v.as_tensor().clone(),
        }
    }
}

impl From<bool> for Pass {
    /// `true` → [`Pass::Train`], `false` → [`Pass::Eval`] (the graph-recording evaluation).
    fn from(train: bool) -> Self {
        if train {
            Pass::Train
        } else {
            Pass::Eval
        }
    }
}

/// Joins a module path and a child name the way PyTorch names `state_dict` keys.
pub fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// One `state_dict` entry.
#[derive(Clone, Debug)]
enum Entry {
    /// A float tensor; `trainable` is false for BatchNorm running statistics.
    Var {
        name: String,
        var: Var,
        trainable: bool,
    },
    /// BatchNorm's `num_batches_tracked` (int64 scalar in PyTorch).
    Counter { name: String, count: Arc<AtomicI64> },
}

/// Every parameter and buffer of a network, in PyTorch's `state_dict` order and with its keys.
#[derive(Clone, Debug, Default)]
pub struct ParamStore {
    entries: Vec<Entry>,
}

impl ParamStore {
    /// Trainable parameters (weights and biases), excluding BatchNorm running statistics and
    /// `num_batches_tracked`.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.entries
            .iter()
            .filter_map(|e| match e {
                Entry::Var {
                    name,
                    var,
                    trainable: true,
                } => Some((name.clone(), var.clone())),
                _ => None,
            })
            .collect()
    }

    /// Number of trainable scalars (what `sum(p.numel() for p in model.parameters())` reports).
    pub fn param_count(&self) -> usize {
        self.trainable_vars()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum()
    }

    /// All keys, in `state_dict` order.
    pub fn keys(&self) -> Vec<String> {
        self.entries
            .iter()
            .map(|e| match e {
                Entry::Var { name, .. } | Entry::Counter { name, .. } => name.clone(),
            })
            .collect()
    }

    /// The `state_dict`: the float tensors (on the parameters' device) plus
    /// `num_batches_tracked` as int64 scalars (on the CPU).
    pub fn state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        self.entries
            .iter()
            .map(|e| match e {
                Entry::Var { name, var, .. } => Ok((name.clone(), var.as_tensor().clone())),
                Entry::Counter { name, count } => Ok((
                    name.clone(),
                    Tensor::new(count.load(Ordering::Relaxed), &Device::Cpu)?,
                )),
            })
            .collect()
    }

    /// Copies `tensors` into the store, leaving the entries for which `skip(key)` holds as
    /// they are.
    ///
    /// Every other key must be present with the right shape, except `num_batches_tracked` when
    /// `allow_missing_counters` is set (old torchvision checkpoints lack it; PyTorch then uses 0).
    /// Extra keys in `tensors` are ignored; the caller decides whether they are an error.
    /// Nothing is modified unless every key checks out.
    pub fn load(
        &self,
        tensors: &HashMap<String, Tensor>,
        skip: &dyn Fn(&str) -> bool,
        allow_missing_counters: bool,
    ) -> std::result::Result<(), String> {
        let name_of = |e: &Entry| match e {
            Entry::Var { name, .. } | Entry::Counter { name, .. } => name.clone(),
        };
        let entries: Vec<&Entry> = self.entries.iter().filter(|e| !skip(&name_of(e))).collect();
        // Check first, then write, so that a failed load leaves the model untouched.
        for e in &entries {
            match e {
                Entry::Var { name, var, .. } => match tensors.get(name) {
                    None => return Err(format!("missing key `{name}`")),
                    Some(t) if t.dims() != var.dims() => {
                        return Err(format!(
                            "shape mismatch for `{name}`: file has {:?}, model expects {:?}",
                            t.dims(),
                            var.dims()
                        ))
                    }
                    Some(_) => {}
                },
                Entry::Counter { name, .. } => {
                    if !tensors.contains_key(name) && !allow_missing_counters {
                        return Err(format!("missing key `{name}`"));
                    }
                    if let Some(t) = tensors.get(name) {
                        if t.elem_count() != 1 {
                            return Err(format!("`{name}` must hold a single integer"));
                        }
                    }
                }
            }
        }
        let set = |e: &Entry| -> Result<()> {
            match e {
                Entry::Var { name, var, .. } => {
                    if let Some(t) = tensors.get(name) {
                        let t = t
                            .to_dtype(var.dtype())?
                            .to_device(var.device())?
                            .contiguous()?;
                        var.set(&t)?;
                    }
                }
                Entry::Counter { name, count } => {
                    let n = match tensors.get(name) {
                        Some(t) => t.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?[0],
                        None => 0,
                    };
                    count.store(n, Ordering::Relaxed);
                }
            }
            Ok(())
        };
        for e in entries {
            set(e).map_err(|err| format!("cannot load a tensor: {err}"))?;
        }
        Ok(())
    }
}

/// How a convolution's weight is initialised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Init {
    /// `kaiming_normal_(mode="fan_out", nonlinearity="relu")`: what torchvision's ResNet does.
    KaimingNormalFanOut,
    /// PyTorch's default for `Conv2d`/`ConvTranspose2d`: `kaiming_uniform_(a=√5)`, i.e.
    /// U(±1/√fan_in), and the bias U(±1/√fan_in). `fan_in` is `weight.size(1) × k × k`
    /// (for a transposed convolution that is its *output* channels, as in PyTorch).
    TorchDefault,
}

/// Creates parameters in `state_dict` order, initialised from a seeded RNG.
pub struct Builder {
    store: ParamStore,
    rng: StdRng,
    device: Device,
    dtype: DType,
}

impl Builder {
    /// A builder of f32 parameters whose random numbers all derive from `seed`.
    pub fn new(device: &Device, seed: u64) -> Self {
        Self::with_dtype(device, seed, DType::F32)
    }

    /// Like [`Self::new`], with parameters and buffers of `dtype` (the values are drawn in f32
    /// and converted, so an f64 model starts from the same numbers as the f32 one).
    pub fn with_dtype(device: &Device, seed: u64, dtype: DType) -> Self {
        Self {
            store: ParamStore::default(),
            rng: StdRng::seed_from_u64(seed),
            device: device.clone(),
            dtype,
        }
    }

    /// The parameters created so far.
    pub fn finish(self) -> ParamStore {
        self.store
    }

    /// A fresh seed for a sub-generator (dropout masks), deterministic given the builder's seed.
    pub fn next_seed(&mut self) -> u64 {
        self.rng.next_u64()
    }

    fn var(
        &mut self,
        name: String,
        data: Vec<f32>,
        shape: &[usize],
        trainable: bool,
    ) -> Result<Var> {
        let var =
            Var::from_tensor(&Tensor::from_vec(data, shape, &self.device)?.to_dtype(self.dtype)?)?;
        self.store.entries.push(Entry::Var {
            name,
            var: var.clone(),
            trainable,
        });
        Ok(var)
    }

    fn uniform(&mut self, n: usize, bound: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                if bound > 0.0 {
                    self.rng.random_range(-bound..bound)
                } else {
                    0.0
                }
            })
            .collect()
    }

    fn weight(
        &mut self,
        name: String,
        shape: [usize; 4],
        fan_in: usize,
        init: Init,
    ) -> Result<Var> {
        let n: usize = shape.iter().product();
        let data = match init {
            Init::KaimingNormalFanOut => {
                let fan_out = shape[0] * shape[2] * shape[3];
                let std = (2.0 / fan_out as f64).sqrt();
                let normal = Normal::new(0.0, std)
                    .map_err(|e| candle_core::Error::Msg(format!("normal init: {e}")))?;
                (0..n)
                    .map(|_| normal.sample(&mut self.rng) as f32)
                    .collect()
            }
            Init::TorchDefault => self.uniform(n, 1.0 / (fan_in as f32).sqrt()),
        };
        self.var(name, data, &shape, true)
    }

    fn bias(&mut self, name: String, n: usize, fan_in: usize) -> Result<Var> {
        let data = self.uniform(n, 1.0 / (fan_in as f32).sqrt());
        self.var(name, data, &[n], true)
    }

    /// A `Conv2d` named `name` (`name.weight`, `name.bias`).
    #[allow(clippy::too_many_arguments)]
    pub fn conv2d(
        &mut self,
        name: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
        dilation: usize,
        bias: bool,
        init: Init,
    ) -> Result<Conv2d> {
        let fan_in = cin * k * k;
        let weight = self.weight(join(name, "weight"), [cout, cin, k, k], fan_in, init)?;
        let bias = if bias {
            Some(self.bias(join(name, "bias"), cout, fan_in)?)
        } else {
            None
        };
        Ok(Conv2d {
            weight,
            bias,
            stride,
            padding,
            dilation,
        })
    }

    /// A `ConvTranspose2d(cin, cout, k, stride=k)` with bias, PyTorch's default init.
    pub fn conv_transpose2d(
        &mut self,
        name: &str,
        cin: usize,
        cout: usize,
        k: usize,
    ) -> Result<ConvTranspose2d> {
        let fan_in = cout * k * k;
        let weight = self.weight(
            join(name, "weight"),
            [cin, cout, k, k],
            fan_in,
            Init::TorchDefault,
        )?;
        let bias = self.bias(join(name, "bias"), cout, fan_in)?;
        Ok(ConvTranspose2d {
            weight,
            bias,
            stride: k,
        })
    }

    /// A `BatchNorm2d(c)`: weight 1, bias 0, running mean 0, running var 1, momentum 0.1,
    /// eps 1e-5, and a `num_batches_tracked` counter.
    pub fn batch_norm(&mut self, name: &str, c: usize) -> Result<BatchNorm> {
        let weight = self.var(join(name, "weight"), vec![1.0; c], &[c], true)?;
        let bias = self.var(join(name, "bias"), vec![0.0; c], &[c], true)?;
        let running_mean = self.var(join(name, "running_mean"), vec![0.0; c], &[c], false)?;
        let running_var = self.var(join(name, "running_var"), vec![1.0; c], &[c], false)?;
        let count = Arc::new(AtomicI64::new(0));
        self.store.entries.push(Entry::Counter {
            name: join(name, "num_batches_tracked"),
            count: count.clone(),
        });
        Ok(BatchNorm {
            inner: ops::BatchNorm2d {
                weight,
                bias,
                running_mean,
                running_var,
                momentum: 0.1,
                eps: 1e-5,
            },
            num_batches_tracked: count,
        })
    }
}

/// `nn.Conv2d` (groups = 1).
#[derive(Clone, Debug)]
pub struct Conv2d {
    pub weight: Var,
    pub bias: Option<Var>,
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
}

impl Conv2d {
    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        ops::conv2d(
            x,
            &pass.param(&self.weight),
            self.bias.as_ref().map(|b| pass.param(b)).as_ref(),
            self.stride,
            self.padding,
            self.dilation,
        )
    }
}

/// `nn.ConvTranspose2d` with kernel = stride and no padding (the U-Net's ×2 upsampling).
#[derive(Clone, Debug)]
pub struct ConvTranspose2d {
    pub weight: Var,
    pub bias: Var,
    pub stride: usize,
}

impl ConvTranspose2d {
    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        ops::conv_transpose2d(
            x,
            &pass.param(&self.weight),
            Some(&pass.param(&self.bias)),
            self.stride,
        )
    }
}

/// `nn.BatchNorm2d`: [`ops::BatchNorm2d`] plus the `num_batches_tracked` counter that PyTorch
/// increments on every training-mode forward.
#[derive(Clone, Debug)]
pub struct BatchNorm {
    pub inner: ops::BatchNorm2d,
    pub num_batches_tracked: Arc<AtomicI64>,
}

impl BatchNorm {
    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        match pass {
            Pass::Train => {
                if !super::recompute::active() {
                    self.num_batches_tracked.fetch_add(1, Ordering::Relaxed);
                }
                self.inner.forward(x, true)
            }
            Pass::Eval => self.inner.forward(x, false),
            Pass::Infer => self.inner.forward_inference(x),
        }
    }

    /// `relu(self.forward(x, pass))`; in training on CPU one fused op.
    pub fn forward_relu(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        match pass {
            Pass::Train => {
                if !super::recompute::active() {
                    self.num_batches_tracked.fetch_add(1, Ordering::Relaxed);
                }
                self.inner.forward_relu(x, true)
            }
            Pass::Eval => self.inner.forward_relu(x, false),
            Pass::Infer => ops::relu(&self.inner.forward_inference(x)?),
        }
    }

    /// `self.forward(y, pass)`, optionally followed by ReLU; for [`Pass::Infer`] written over
    /// `y` itself, which must therefore be a fresh layer output that no other tensor shares
    /// (a convolution's result).
    fn forward_fresh(&self, y: Tensor, pass: Pass, relu: bool) -> Result<Tensor> {
        if pass == Pass::Infer {
            return self.inner.forward_inference_in_place(y, relu);
        }
        if relu {
            self.forward_relu(&y, pass)
        } else {
            self.forward(&y, pass)
        }
    }
}

/// Convolution → BatchNorm (→ ReLU), for [`Pass::Infer`] normalised in place on the
/// convolution's output.
pub fn conv_bn(
    conv: &Conv2d,
    bn: &BatchNorm,
    x: &Tensor,
    pass: Pass,
    relu: bool,
) -> Result<Tensor> {
    bn.forward_fresh(conv.forward(x, pass)?, pass, relu)
}

/// Convolution → BatchNorm → ReLU, the unit every network here is made of.
#[derive(Clone, Debug)]
pub struct ConvBnRelu {
    pub conv: Conv2d,
    pub bn: BatchNorm,
}

impl ConvBnRelu {
    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        conv_bn(&self.conv, &self.bn, x, pass, true)
    }

    /// Convolution → `drop` (if any) → BatchNorm → ReLU.
    pub fn forward_dropped(
        &self,
        x: &Tensor,
        pass: Pass,
        drop: Option<&DropBlock>,
    ) -> Result<Tensor> {
        match drop {
            None => self.forward(x, pass),
            Some(d) => {
                self.bn
                    .forward_fresh(d.forward(&self.conv.forward(x, pass)?, pass)?, pass, true)
            }
        }
    }
}

/// `nn.Dropout(p)` with its own seeded RNG: in training each element is zeroed with probability
/// `p` and the survivors scaled by 1/(1-p); in eval it is the identity. Masks are deterministic
/// given the model seed and the sequence of training forwards (they do not match PyTorch's).
#[derive(Debug)]
pub struct Dropout {
    pub p: f64,
    rng: Mutex<StdRng>,
}

impl Dropout {
    pub fn new(p: f64, seed: u64) -> Self {
        Self {
            p,
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
        }
    }

    /// Restart the mask sequence from `seed` (the trainer reseeds every step, so that a
    /// resumed run draws the same masks as an uninterrupted one).
    pub fn reseed(&self, seed: u64) {
        if let Ok(mut rng) = self.rng.lock() {
            *rng = StdRng::seed_from_u64(seed);
        }
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train || self.p <= 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 - self.p;
        let scale = (1.0 / keep) as f32;
        let mask: Vec<f32> = {
            let mut rng = self
                .rng
                .lock()
                .map_err(|_| candle_core::Error::Msg("dropout RNG lock poisoned".into()))?;
            (0..x.elem_count())
                .map(|_| {
                    if rng.random::<f64>() < keep {
                        scale
                    } else {
                        0.0
                    }
                })
                .collect()
        };
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x.mul(&mask)
    }
}

/// DropBlock (Ghiasi et al., NeurIPS 2018) as SA-UNet places it, after a convolution and
/// before its BatchNorm. In training, every channel of every sample gets its own mask: block
/// corners are drawn with probability γ among the positions where a `b`×`b` block fits
/// (`b` = `size`, or the map's side where that is smaller), every block is zeroed, and the
/// survivors are scaled by (elements / kept) so that the sum is kept in expectation, like
/// `keras-dropblock`, which SA-UNet uses. γ = drop/b² · HW/((H−b+1)(W−b+1)) makes the
/// expected dropped fraction `drop` when blocks do not overlap. In evaluation it is the
/// identity.
///
/// Masks are a function of the step's seed ([`DropBlock::reseed`]), the layer's `id` and the
/// channel plane only, so that they do not depend on the number of threads, and a resumed run
/// draws the masks of an uninterrupted one.
#[derive(Debug)]
pub struct DropBlock {
    pub drop: f64,
    pub size: usize,
    id: u64,
    seed: std::sync::atomic::AtomicU64,
}

impl Clone for DropBlock {
    fn clone(&self) -> Self {
        let seed = self.seed.load(Ordering::Relaxed);
        Self {
            drop: self.drop,
            size: self.size,
            id: self.id,
            seed: seed.into(),
        }
    }
}

impl DropBlock {
    /// `id` tells this layer's masks from the other layers' in the same step.
    pub fn new(drop: f64, size: usize, id: u64) -> Self {
        Self {
            drop,
            size: size.max(1),
            id,
            seed: 0.into(),
        }
    }

    /// Seed the next masks (the trainer reseeds every step).
    pub fn reseed(&self, seed: u64) {
        self.seed.store(seed, Ordering::Relaxed);
    }

    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        if pass != Pass::Train || self.drop <= 0.0 {
            return Ok(x.clone());
        }
        let (n, c, h, w) = x.dims4()?;
        let seed = self.seed.load(Ordering::Relaxed) ^ self.id.rotate_left(40);
        let mask = dropblock_mask(n * c, h, w, self.drop, self.size, seed);
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x.mul(&mask)
    }
}

/// The scaled masks of [`DropBlock`] for `planes` planes of `h`×`w`, row-major.
pub fn dropblock_mask(
    planes: usize,
    h: usize,
    w: usize,
    drop: f64,
    size: usize,
    seed: u64,
) -> Vec<f32> {
    use rayon::prelude::*;
    let mut m = vec![1f32; planes * h * w];
    if planes == 0 || h == 0 || w == 0 || drop <= 0.0 {
        return m;
    }
    let b = size.min(h).min(w).max(1);
    let (ph, pw) = (h - b + 1, w - b + 1);
    let gamma = drop / (b * b) as f64 * (h * w) as f64 / (ph * pw) as f64;
    m.par_chunks_mut(h * w).enumerate().for_each(|(p, plane)| {
        let mut rng = StdRng::seed_from_u64(seed ^ p as u64);
        // The corners are Bernoulli(γ) draws over the ph·pw positions, drawn as the geometric
        // gaps between successes: one random number per block instead of one per position.
        let ln_miss = (1.0 - gamma.min(1.0)).ln();
        let mut at = 0usize;
        loop {
            if gamma < 1.0 {
                let u = 1.0 - rng.random::<f64>(); // (0, 1]
                let gap = (u.ln() / ln_miss).floor();
                if gap >= (ph * pw - at) as f64 {
                    break;
                }
                at += gap as usize;
            }
            if at >= ph * pw {
                break;
            }
            let (r0, c0) = (at / pw, at % pw);
            for r in r0..r0 + b {
                plane[r * w + c0..r * w + c0 + b].fill(0.0);
            }
            at += 1;
        }
    });
    let kept = m.iter().filter(|&&v| v != 0.0).count();
    if kept > 0 {
        let scale = m.len() as f32 / kept as f32;
        m.iter_mut().for_each(|v| *v *= scale);
    }
    m
}
