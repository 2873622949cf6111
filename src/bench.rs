//! `driveline bench`: time training steps, inference and data loading on this machine.
//!
//! Each benchmark warms up, then times several repetitions and reports the median and the
//! minimum, the peak resident memory of the process, and for the model benchmarks the
//! convolution FLOP count (a training step is counted as 3× the forward convolutions:
//! forward, input gradient, weight gradient — the usual convention, as in the PyTorch
//! reference's 490 GFLOP for DeepLabV3-R50 at 256 px, batch 2).

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::config::schema::{Loss, Precision};
use crate::config::{Arch, Backbone, Experiment, ModelConfig, Normalize, Tta};
use crate::model::{ops, SegModel};
use crate::predict::{Mode, Predictor};
use crate::training::{build_batch, image_stats, loss_fn, peak_rss_mib, Optimizer};

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub bench: String,
    pub what: String,
    pub median_s: f64,
    pub min_s: f64,
    pub runs: usize,
    pub peak_rss_mib: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gflop_per_step: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gflop_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub images_per_s: Option<f64>,
    pub threads: usize,
    /// The device the benchmark ran on (`cpu (N threads)`, `cuda:0`).
    pub device: String,
    /// Peak GPU memory in use during the benchmark, MiB (CUDA only; see
    /// [`crate::model::device::gpu_memory_mib`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_peak_mib: Option<f64>,
    /// Activation recomputation per ResNet stage (`train.recompute`) was on.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub recompute: bool,
    /// `train.precision` of the products, when not f32 (`bf16`, `tf32`; `bf16 (emulated)` on
    /// the CPU).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precision: Option<String>,
}

fn median_min(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0])
}

fn model_cfg(arch: Arch, backbone: Backbone) -> ModelConfig {
    ModelConfig {
        arch,
        backbone,
        ..ModelConfig::default()
    }
}

/// Convolution FLOPs of one forward pass of `model` on `x` (an inference pass: no graph kept,
/// so it does not raise the peak memory the benchmark reports).
fn forward_gflop(model: &SegModel, x: &Tensor) -> Result<f64> {
    ops::reset_conv_flops();
    model.infer(x)?;
    Ok(ops::conv_flops() as f64 / 1e9)
}

/// Time `steps` training steps (after `warmup`) at `imgsz`, batch `batch`, with Adam and `loss`.
pub fn train_step(
    arch: Arch,
    backbone: Backbone,
    imgsz: usize,
    batch: usize,
    steps: usize,
    warmup: usize,
    loss: Loss,
) -> Result<BenchResult> {
    train_step_with(
        &BenchOpts::default(),
        arch,
        backbone,
        imgsz,
        batch,
        steps,
        warmup,
        loss,
    )
}

/// [`train_step`] on `opts.device`, with `opts.recompute`.
#[allow(clippy::too_many_arguments)]
pub fn train_step_with(
    opts: &BenchOpts,
    arch: Arch,
    backbone: Backbone,
    imgsz: usize,
    batch: usize,
    steps: usize,
    warmup: usize,
    loss: Loss,
) -> Result<BenchResult> {
    let dev = opts.device.clone();
    let mut exp = Experiment::template();
    exp.model = model_cfg(arch, backbone);
    exp.train.loss = loss;
    let model = SegModel::new(&exp.model, &dev, 0)?;
    model.set_recompute(opts.recompute);
    let (_precision, precision) = bench_precision(opts.precision, &dev)?;
    let mut rng = StdRng::seed_from_u64(0);
    let xs: Vec<f32> = (0..batch * 3 * imgsz * imgsz)
        .map(|_| rng.random_range(-2.0..2.0))
        .collect();
    let ys: Vec<u8> = (0..batch * imgsz * imgsz)
        .map(|_| u8::from(rng.random_bool(0.1)))
        .collect();
    let x = Tensor::from_vec(xs, (batch, 3, imgsz, imgsz), &dev)?;
    let gflop = 3.0 * forward_gflop(&model, &x)?;
    let mut opt = Optimizer::new(exp.train.optimizer, model.trainable_vars(), 1e-4, 0.0, 0.9);
    let mut times = Vec::new();
    model_device::reset_gpu_peak(&dev);
    for i in 0..warmup + steps {
        let t0 = Instant::now();
        let logits = model.forward(&x, true)?;
        let loss = loss_fn(&exp, &logits, &ys)?;
        opt.backward_step(&loss)?;
        dev.synchronize()?;
        let dt = t0.elapsed().as_secs_f64();
        if i >= warmup {
            times.push(dt);
        }
    }
    let (median_s, min_s) = median_min(times);
    Ok(BenchResult {
        bench: "train_step".into(),
        what: match arch {
            Arch::Unet => format!("unet {imgsz}px batch {batch}"),
            _ => format!("{arch:?}-{} {imgsz}px batch {batch}", backbone.as_str()).to_lowercase(),
        },
        median_s,
        min_s,
        runs: steps,
        peak_rss_mib: peak_rss_mib(),
        gflop_per_step: Some(gflop),
        gflop_per_s: Some(gflop / median_s),
        images_per_s: Some(batch as f64 / median_s),
        threads: rayon::current_num_threads(),
        device: model_device::name(&dev),
        gpu_peak_mib: model_device::gpu_memory_mib(&dev).map(|(peak, _)| peak),
        recompute: opts.recompute,
        precision,
    })
}

/// Time whole-image inference of one `w`×`h` image at `imgsz` (resize mode, as evaluate does).
pub fn infer(
    arch: Arch,
    backbone: Backbone,
    imgsz: u32,
    image: Option<&std::path::Path>,
    steps: usize,
) -> Result<BenchResult> {
    infer_with(&BenchOpts::default(), arch, backbone, imgsz, image, steps)
}

/// [`infer`] on `opts.device`.
pub fn infer_with(
    opts: &BenchOpts,
    arch: Arch,
    backbone: Backbone,
    imgsz: u32,
    image: Option<&std::path::Path>,
    steps: usize,
) -> Result<BenchResult> {
    let dev = opts.device.clone();
    let model = SegModel::new(&model_cfg(arch, backbone), &dev, 0)?;
    let img = match image {
        Some(p) => image::open(p)
            .with_context(|| format!("cannot decode {}", p.display()))?
            .to_rgb8(),
        None => {
            let mut rng = StdRng::seed_from_u64(1);
            image::RgbImage::from_fn(565, 584, |_, _| {
                image::Rgb([rng.random(), rng.random(), rng.random()])
            })
        }
    };
    let p = Predictor {
        model: &model,
        normalize: Normalize::Imagenet,
        mode: Mode::Resize(imgsz),
        tta: Tta::None,
    };
    let x = Tensor::zeros(
        (1, 3, imgsz as usize, imgsz as usize),
        candle_core::DType::F32,
        &dev,
    )?;
    let gflop = forward_gflop(&model, &x)?;
    model_device::reset_gpu_peak(&dev);
    p.probs(&img)?; // warm-up
    let mut times = Vec::new();
    for _ in 0..steps {
        let t0 = Instant::now();
        p.probs(&img)?;
        dev.synchronize()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    let (median_s, min_s) = median_min(times);
    let (w, h) = img.dimensions();
    Ok(BenchResult {
        bench: "infer".into(),
        what: format!("{arch:?}-{} {w}x{h} image at {imgsz}px", backbone.as_str()).to_lowercase(),
        median_s,
        min_s,
        runs: steps,
        peak_rss_mib: peak_rss_mib(),
        gflop_per_step: Some(gflop),
        gflop_per_s: Some(gflop / median_s),
        images_per_s: Some(1.0 / median_s),
        threads: rayon::current_num_threads(),
        device: model_device::name(&dev),
        gpu_peak_mib: model_device::gpu_memory_mib(&dev).map(|(peak, _)| peak),
        recompute: false,
        precision: None,
    })
}

/// Time one epoch of batch building (augmentation + normalisation) over a preprocessed train
/// split, as the train stage's loader does it.
pub fn data_epoch(
    exp: &Experiment,
    ds: &crate::stages::preprocess::Dataset,
    reps: usize,
) -> Result<BenchResult> {
    data_epoch_with(&BenchOpts::default(), exp, ds, reps)
}

/// [`data_epoch`], each batch then copied to `opts.device` as the train stage does (nothing
/// more on the CPU).
pub fn data_epoch_with(
    opts: &BenchOpts,
    exp: &Experiment,
    ds: &crate::stages::preprocess::Dataset,
    reps: usize,
) -> Result<BenchResult> {
    let dev = &opts.device;
    // The side of a batch's images: the crop, else the preprocessed size.
    let side = if exp.train.crop > 0 {
        Some(exp.train.crop as usize)
    } else {
        ds.size.map(|s| s as usize)
    };
    let aug = crate::data::Augmenter::new(&exp.augment);
    let n = ds.train.len();
    let train: Vec<&crate::data::Sample> = ds.train.iter().map(|p| &p.work).collect();
    let stats = image_stats(exp, &train);
    let mut times = Vec::new();
    for r in 0..reps + 1 {
        let t0 = Instant::now();
        for (s, chunk) in (0..n)
            .collect::<Vec<_>>()
            .chunks(exp.train.batch)
            .enumerate()
        {
            let step = (r * 1000 + s) as u64;
            build_batch(exp, &train, &stats, chunk, &aug, step)?;
            if let (false, Some(side)) = (dev.is_cpu(), side) {
                // The train stage's host → device copy of the batch's images.
                let len = chunk.len() * 3 * side * side;
                Tensor::from_vec(vec![0f32; len], (chunk.len(), 3, side, side), dev)?;
            }
        }
        dev.synchronize()?;
        if r > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let (median_s, min_s) = median_min(times);
    Ok(BenchResult {
        bench: "data".into(),
        what: format!("one epoch of {n} images at {:?}", ds.size),
        median_s,
        min_s,
        runs: reps,
        peak_rss_mib: peak_rss_mib(),
        gflop_per_step: None,
        gflop_per_s: None,
        images_per_s: Some(n as f64 / median_s),
        threads: rayon::current_num_threads(),
        device: model_device::name(dev),
        gpu_peak_mib: None,
        recompute: false,
        precision: None,
    })
}

impl BenchResult {
    pub fn human(&self) -> String {
        let mut s = format!(
            "{:<10} {:<45} median {:>8.3} s  min {:>8.3} s",
            self.bench, self.what, self.median_s, self.min_s
        );
        if let Some(i) = self.images_per_s {
            s.push_str(&format!("  {i:>7.2} img/s"));
        }
        if let (Some(g), Some(r)) = (self.gflop_per_step, self.gflop_per_s) {
            s.push_str(&format!("  {g:>7.1} GFLOP  {r:>6.1} GFLOP/s"));
        }
        s.push_str(&format!("  peak RSS {:.0} MiB", self.peak_rss_mib));
        if let Some(g) = self.gpu_peak_mib {
            s.push_str(&format!("  GPU peak {g:.0} MiB"));
        }
        if self.recompute {
            s.push_str("  (recompute)");
        }
        if let Some(p) = &self.precision {
            s.push_str(&format!("  ({p})"));
        }
        s.push_str(&format!("  on {}", self.device));
        s
    }
}

// ---------------------------------------------------------------------------------------------
// Device benchmarks (`--device`, `bench agree`).

use crate::model::device as model_device;

/// Where and how a model benchmark runs.
#[derive(Clone, Debug)]
pub struct BenchOpts {
    pub device: Device,
    /// Activation recomputation per ResNet stage (`train.recompute`).
    pub recompute: bool,
    /// `train.precision` of the training steps (the model benchmarks and `agree`'s device
    /// side).
    pub precision: Precision,
}

impl Default for BenchOpts {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            recompute: false,
            precision: Precision::F32,
        }
    }
}

/// `precision` turned on for a benchmark on `dev`, as the train stage does, and its label
/// (`None` for f32). On the CPU, which does not train in bf16, bf16 is emulated (the generic
/// path rounds the products' operands and results to bf16, `ops::set_autocast`), so that the
/// GPU check's bf16 commands can be tried on a machine without a GPU; the timing means nothing
/// there. TF32 has
/// no CPU form and is refused.
fn bench_precision(
    precision: Precision,
    dev: &Device,
) -> Result<(model_device::PrecisionGuard, Option<String>)> {
    let emulated = dev.is_cpu() && precision == Precision::Bf16;
    let guard = if emulated {
        model_device::enable_precision(precision)?
    } else {
        model_device::apply_precision(precision, dev)?
    };
    let label = match precision {
        Precision::F32 => None,
        p if emulated => Some(format!("{} (emulated)", p.as_str())),
        p => Some(p.as_str().to_string()),
    };
    Ok((guard, label))
}

/// `driveline bench agree`: the same seed and batch trained for a few steps on the CPU custom
/// ops and on a device, compared, and both compared with the same steps in float64.
#[derive(Debug, Clone, Serialize)]
pub struct AgreeResult {
    pub bench: String,
    pub what: String,
    /// The device compared with the CPU (on the CPU itself: the device-generic path, which is
    /// what a GPU runs).
    pub device: String,
    pub steps: usize,
    pub loss_cpu: Vec<f64>,
    pub loss_device: Vec<f64>,
    /// The same steps in float64 on the CPU (the exact result, up to float64 rounding).
    pub loss_f64: Vec<f64>,
    /// Largest |loss_device − loss_cpu| / |loss_cpu| over the steps: the criterion.
    pub max_loss_rel_diff: f64,
    pub loss_tolerance: f64,
    /// Largest |loss_cpu − loss_f64| / |loss_f64|: float32's own error on the CPU custom ops.
    pub cpu_f32_error: f64,
    /// Largest |loss_device − loss_f64| / |loss_f64|.
    pub device_f32_error: f64,
    /// Fraction of pixels whose predicted class (eval mode, after the steps) is the same on the
    /// CPU and on the device.
    pub pixel_agreement: f64,
    pub min_pixel_agreement: f64,
    /// The device side's `train.precision` (`f32`, `tf32`, `bf16`, `bf16 (emulated)` on the
    /// CPU); the CPU references are f32 and f64.
    pub precision: String,
    pub recompute: bool,
    /// The criterion: losses within `loss_tolerance` and pixels ≥ `min_pixel_agreement`.
    pub pass: bool,
    /// The device is no farther from float64 than the tolerance or twice the CPU's own float32
    /// error, and the pixels agree: what the exit status reports (see [`agree`]).
    pub pass_vs_f64: bool,
    pub seconds_cpu: f64,
    pub seconds_device: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_peak_mib: Option<f64>,
}

/// `bench agree`'s loss tolerance with bf16 products (unit roundoff 2⁻⁸ against f32's 2⁻²⁴).
/// Measured on the CPU's emulation, 3 SGD steps of R50 at batch 2: 7.3e-3 from float64 at 64 px, 3.8e-3 at 128 px (2026-11-28). One
/// step of PyTorch's own bf16 autocast on R50 at 48 px is 1.2e-2 from float64. So 3e-2, bf16's
/// error with margin. (A product left in f32 would pass it too: that the casts happen is what
/// `tests/ops_generic.rs` and `tests/generic_step.rs` check.)
pub const BF16_LOSS_TOLERANCE: f64 = 3e-2;
/// `bench agree`'s share of pixels that must agree with bf16 products: a class flips where
/// the two logits are within bf16's error of each other.
pub const BF16_MIN_PIXEL_AGREEMENT: f64 = 0.99;

/// Trains `steps` steps from seed 0 on `x`/`ys` in `dtype` (the loss in f32, as the train
/// stage computes it) and returns the losses and the eval-mode predicted class per pixel.
#[allow(clippy::too_many_arguments)]
fn agree_side(
    exp: &Experiment,
    dev: &Device,
    dtype: candle_core::DType,
    generic: bool,
    recompute: bool,
    (x, ys): (&Tensor, &[u8]),
    steps: usize,
) -> Result<(Vec<f64>, Vec<u32>, f64)> {
    use candle_core::DType;
    let previous = ops::set_force_generic(generic);
    let t0 = Instant::now();
    let run = || -> Result<(Vec<f64>, Vec<u32>)> {
        let model = SegModel::with_dtype(&exp.model, dev, 0, dtype)?;
        model.set_recompute(recompute);
        let x = x.to_dtype(dtype)?.to_device(dev)?;
        let t = &exp.train;
        let mut opt = Optimizer::new(t.optimizer, model.trainable_vars(), t.lr, 0.0, t.momentum);
        let mut losses = Vec::with_capacity(steps);
        for s in 0..steps {
            model.reseed_dropout(s as u64);
            let logits = model.forward(&x, true)?.to_dtype(DType::F32)?;
            let loss = loss_fn(exp, &logits, ys)?;
            losses.push(loss.to_dtype(DType::F64)?.to_scalar::<f64>()?);
            opt.backward_step(&loss)?;
        }
        let pred = model
            .infer(&x)?
            .argmax(1)?
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_vec1::<u32>()?;
        Ok((losses, pred))
    };
    let r = run();
    ops::set_force_generic(previous);
    let (losses, pred) = r?;
    Ok((losses, pred, t0.elapsed().as_secs_f64()))
}

/// Largest |a − b| / |b| over the steps.
fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(a, b)| (a - b).abs() / b.abs().max(1e-12))
        .fold(0.0, f64::max)
}

/// The same seed and batch for `steps` training steps on the CPU (custom ops, f32), on
/// `opts.device` (on the CPU: the device-generic path) and on the CPU in f64: per-step loss
/// differences and eval-mode prediction agreement afterwards.
///
/// The criterion (loss within 1e-3 relative, 1e-2 with TF32 matmuls; ≥ 99.9 % of pixels)
/// is reported as `pass`. It does not hold between two correct float32 implementations on this
/// network: a DeepLabV3 training step at initialisation amplifies float32 rounding through its
/// training-mode BatchNorms (the gradients of either CPU path differ from float64 by a few %
/// in norm at 64 px, 0.3 ppm in eval mode), and the CPU custom ops and the generic path, both
/// on the CPU, end 3 steps 0.4–1.5 % apart at 64–128 px. So the exit status is `pass_vs_f64`:
/// the device must be as close to the float64 steps as the tolerance or twice the CPU's own
/// float32 error, whichever is larger, with the pixels agreeing.
///
/// With bf16 products the tolerances are [`BF16_LOSS_TOLERANCE`] and
/// [`BF16_MIN_PIXEL_AGREEMENT`].
///
/// The steps are SGD (lr 1e-3, momentum 0.9) unless `adam`: the loss after an SGD step moves
/// with the gradient linearly, so a wrong gradient shows; Adam's first steps move every weight
/// by ±lr whatever its gradient's size, sign noise included.
#[allow(clippy::too_many_arguments)]
pub fn agree(
    opts: &BenchOpts,
    arch: Arch,
    backbone: Backbone,
    imgsz: usize,
    batch: usize,
    steps: usize,
    adam: bool,
) -> Result<AgreeResult> {
    use candle_core::DType;
    let mut exp = Experiment::template();
    exp.model = model_cfg(arch, backbone);
    if adam {
        exp.train.optimizer = crate::config::schema::Optimizer::Adam;
        exp.train.lr = 1e-4;
    } else {
        exp.train.optimizer = crate::config::schema::Optimizer::Sgd;
        exp.train.lr = 1e-3;
        exp.train.momentum = 0.9;
    }
    let mut rng = StdRng::seed_from_u64(0);
    // Images with their own brightness per channel, as real ones have.
    let offsets: Vec<f32> = (0..batch * 3)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let plane = imgsz * imgsz;
    let xs: Vec<f32> = (0..batch * 3 * plane)
        .map(|i| offsets[i / plane] + rng.random_range(-1.0..1.0))
        .collect();
    let ys: Vec<u8> = (0..batch * imgsz * imgsz)
        .map(|_| u8::from(rng.random_bool(0.1)))
        .collect();
    let x = Tensor::from_vec(xs, (batch, 3, imgsz, imgsz), &Device::Cpu)?;
    let data = (&x, &ys[..]);
    let cpu = Device::Cpu;
    let (loss_cpu, pred_cpu, seconds_cpu) =
        agree_side(&exp, &cpu, DType::F32, false, false, data, steps)
            .context("bench agree: the CPU reference")?;
    let (loss_f64, _, _) = agree_side(&exp, &cpu, DType::F64, false, false, data, steps)
        .context("bench agree: the float64 reference")?;
    let dev = &opts.device;
    let (precision, label) = bench_precision(opts.precision, dev)?;
    model_device::reset_gpu_peak(dev);
    let side = agree_side(
        &exp,
        dev,
        DType::F32,
        dev.is_cpu(),
        opts.recompute,
        data,
        steps,
    );
    drop(precision);
    let (loss_device, pred_device, seconds_device) = side.with_context(|| {
        format!(
            "bench agree: training on {} failed (train.device = \"cpu\" avoids the device)",
            model_device::name(dev)
        )
    })?;
    let same = pred_cpu
        .iter()
        .zip(&pred_device)
        .filter(|(a, b)| a == b)
        .count();
    let pixel_agreement = same as f64 / pred_cpu.len().max(1) as f64;
    let (loss_tolerance, min_pixel_agreement) = match opts.precision {
        Precision::F32 => (1e-3, 0.999),
        Precision::Tf32 => (1e-2, 0.999),
        Precision::Bf16 => (BF16_LOSS_TOLERANCE, BF16_MIN_PIXEL_AGREEMENT),
    };
    let finite = loss_device.iter().all(|l| l.is_finite());
    let max_loss_rel_diff = max_rel(&loss_device, &loss_cpu);
    let cpu_f32_error = max_rel(&loss_cpu, &loss_f64);
    let device_f32_error = max_rel(&loss_device, &loss_f64);
    let pixels_ok = pixel_agreement >= min_pixel_agreement;
    Ok(AgreeResult {
        bench: "agree".into(),
        what: format!(
            "{arch:?}-{} {imgsz}px batch {batch}, {steps} {} steps",
            backbone.as_str(),
            if adam { "Adam" } else { "SGD" }
        )
        .to_lowercase(),
        device: model_device::name(dev) + if dev.is_cpu() { " (generic path)" } else { "" },
        steps,
        pass: finite && max_loss_rel_diff <= loss_tolerance && pixels_ok,
        pass_vs_f64: finite
            && device_f32_error <= loss_tolerance.max(2.0 * cpu_f32_error)
            && pixels_ok,
        loss_cpu,
        loss_device,
        loss_f64,
        max_loss_rel_diff,
        loss_tolerance,
        cpu_f32_error,
        device_f32_error,
        pixel_agreement,
        min_pixel_agreement,
        precision: label.unwrap_or_else(|| "f32".into()),
        recompute: opts.recompute,
        seconds_cpu,
        seconds_device,
        gpu_peak_mib: model_device::gpu_memory_mib(dev).map(|(peak, _)| peak),
    })
}

impl AgreeResult {
    pub fn human(&self) -> String {
        let verdict = |b: bool| if b { "PASS" } else { "FAIL" };
        format!(
            "agree      {:<45} {} {} vs cpu: loss max rel diff {:.2e} (≤ {:.0e}: {}), pixels {:.4}% (≥ {:.1}%); vs float64: cpu {:.2e}, device {:.2e}: {}",
            self.what,
            self.device,
            self.precision,
            self.max_loss_rel_diff,
            self.loss_tolerance,
            verdict(self.pass),
            100.0 * self.pixel_agreement,
            100.0 * self.min_pixel_agreement,
            self.cpu_f32_error,
            self.device_f32_error,
            verdict(self.pass_vs_f64)
        )
    }
}
