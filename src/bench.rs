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

use crate::config::schema::Loss;
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
    let dev = Device::Cpu;
    let mut exp = Experiment::template();
    exp.model = model_cfg(arch, backbone);
    exp.train.loss = loss;
    let model = SegModel::new(&exp.model, &dev, 0)?;
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
    for i in 0..warmup + steps {
        let t0 = Instant::now();
        let logits = model.forward(&x, true)?;
        let loss = loss_fn(&exp, &logits, &ys)?;
        opt.backward_step(&loss)?;
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
    let dev = Device::Cpu;
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
    p.probs(&img)?; // warm-up
    let mut times = Vec::new();
    for _ in 0..steps {
        let t0 = Instant::now();
        p.probs(&img)?;
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
    })
}

/// Time one epoch of batch building (augmentation + normalisation) over a preprocessed train
/// split, as the train stage's loader does it.
pub fn data_epoch(
    exp: &Experiment,
    ds: &crate::stages::preprocess::Dataset,
    reps: usize,
) -> Result<BenchResult> {
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
        }
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
        s
    }
}
