//! `train`: fit the model on the preprocessed train split, validate every period, keep the
//! best-by-loss, best-by-IoU and last checkpoints.
//!
//! A *period* is an epoch (a shuffled pass over the train split, `train.epochs`) or, for
//! crop training with `train.steps`, `train.valid_every_steps` iterations of random crops.
//! After each period: validation on the whole valid images (loss = cross-entropy, pixel
//! accuracy, mIoU, vessel IoU and Dice, at the working resolution), one row in
//! `metrics.csv`, checkpoints, and `state.json` — written last, it marks the period as done:
//! a run killed mid-way resumes after the last completed period and, since every random
//! draw derives from (seed, period, step), reaches the same weights as an uninterrupted run.
//!
//! Batches are built ahead of the model on a loader thread (augmentation in parallel with
//! rayon, sharing the compute's thread pool so the two never oversubscribe the cores).

pub mod optim;

use std::fs;
use std::path::Path;
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::preprocess::{self, Prepared};
use super::{Stage, StageCtx};
use crate::config::{Experiment, Loss, Normalize, Scheduler, Tta};
use crate::data::{self, Augmenter, ChannelStats};
use crate::metrics::Confusion;
use crate::model::checkpoint::{self, Preprocess as CkptPreprocess};
use crate::model::{device, SegModel};
use crate::predict::{argmax_u8, image_tensor, Mode, Predictor};
pub use crate::report::EpochRow;

pub struct Train;

pub const BEST_IOU: &str = "best_model_iou.safetensors";
pub const BEST_LOSS: &str = "best_model_loss.safetensors";
pub const LAST: &str = "last.safetensors";
const LAST_OPTIM: &str = "last_optim.safetensors";
const STATE: &str = "state.json";

impl Stage for Train {
    fn version(&self) -> u32 {
        // 2: peak RSS is the stage's own (reset at the start of training).
        // 3: convolutions image-parallel, sparse for dilated taps, fused BN+ReLU: f32 results
        //    differ in the last bits (summation order).
        3
    }
    fn role(&self) -> &'static str {
        "train"
    }
    fn requires(&self) -> &'static [&'static str] {
        &["preprocess"]
    }
    fn resumable(&self) -> bool {
        true
    }
    fn run(&self, ctx: &StageCtx) -> Result<()> {
        let ds = preprocess::load(ctx.input("preprocess")?)?;
        train(ctx.exp, &ds, ctx.out, ctx.progress)
    }
}

/// What survives a kill: the completed periods and the best values so far.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
struct State {
    history: Vec<EpochRow>,
    best_loss: Option<(usize, f64)>,
    best_miou: Option<(usize, f64)>,
}

/// `summary.json`: what the report needs about the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainSummary {
    pub periods: usize,
    pub steps: usize,
    pub best_epoch: usize,
    pub best_valid_miou: f64,
    pub best_valid_dice: f64,
    pub best_loss_epoch: usize,
    pub train_seconds: f64,
    pub peak_rss_mib: f64,
    pub param_count: usize,
    pub device: String,
    pub history: Vec<EpochRow>,
}

/// Mix integers into one seed (SplitMix64 finaliser per word).
pub fn mix(words: &[u64]) -> u64 {
    let mut h: u64 = 0x9E37_79B9_7F4A_7C15;
    for &w in words {
        let mut z = h ^ w.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        h = z ^ (z >> 31);
    }
    h
}

/// A batch ready for the model.
pub struct Batch {
    x: Vec<f32>,
    y: Vec<u8>,
    n: usize,
    h: usize,
    w: usize,
}

/// The learning rate at `step` of `total` (schedulers of `torch.optim.lr_scheduler`, stepped
/// per iteration except `step`, which decays per period).
pub fn lr_at(exp: &Experiment, step: usize, total: usize, period: usize) -> f64 {
    let t = &exp.train;
    let frac = if total == 0 {
        0.0
    } else {
        step as f64 / total as f64
    };
    let floor = t.lr * t.lr_min_factor;
    match t.scheduler {
        Scheduler::None => t.lr,
        Scheduler::Step => t.lr * t.gamma.powi((period / t.step_size) as i32),
        Scheduler::Cosine => {
            floor + (t.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * frac).cos())
        }
        Scheduler::Poly => floor + (t.lr - floor) * (1.0 - frac).max(0.0).powf(0.9),
        Scheduler::Linear => floor + (t.lr - floor) * (1.0 - frac).max(0.0),
    }
}

fn train(
    exp: &Experiment,
    ds: &preprocess::Dataset,
    out: &Path,
    progress: &crate::pipeline::progress::Progress,
) -> Result<()> {
    let t = &exp.train;
    if ds.train.is_empty() {
        bail!("the train split is empty");
    }
    if t.crop > 0 && ds.size.is_some() {
        bail!(
            "train.crop = {} needs native-resolution data: use pipeline = \"native\" (its preprocess keeps the original size)",
            t.crop
        );
    }
    if t.crop == 0 && ds.size.is_none() {
        bail!("native-resolution data needs train.crop > 0 (random crops)");
    }
    let device = device::select(&t.device)?;
    reset_peak_rss();
    let model = SegModel::new(&exp.model, &device, t.seed)?;
    model.set_recompute(t.recompute);
    if !exp.model.pretrained.is_empty() {
        let notes = checkpoint::load_pretrained(&model, Path::new(&exp.model.pretrained))
            .with_context(|| format!("model.pretrained = {}", exp.model.pretrained))?;
        for n in notes {
            progress.log(&n);
        }
    }
    let mut opt = optim::Optimizer::new(
        t.optimizer,
        model.trainable_vars(),
        t.lr,
        t.weight_decay,
        t.momentum,
    );
    let ckpt_pre = CkptPreprocess {
        imgsz: t.imgsz,
        normalize: exp.data.normalize,
        crop: t.crop,
    };

    // Periods and steps.
    let n_train = ds.train.len();
    let (periods, steps_per) = if t.steps > 0 {
        (t.steps.div_ceil(t.valid_every_steps), t.valid_every_steps)
    } else {
        (t.epochs, n_train.div_ceil(t.batch))
    };
    let total_steps = if t.steps > 0 {
        t.steps
    } else {
        periods * steps_per
    };

    // Resume.
    let mut state: State = match fs::read_to_string(out.join(STATE)) {
        Ok(s) => {
            serde_json::from_str(&s).context("malformed state.json in the train work directory")?
        }
        Err(_) => State::default(),
    };
    if !state.history.is_empty() {
        let tensors = load_tensors(&out.join(LAST), &device)?;
        model.load_state_dict(&tensors)?;
        opt.load(&out.join(LAST_OPTIM))?;
        progress.log(&format!("resuming after period {}", state.history.len()));
    } else {
        for stale in fs::read_dir(out)?.flatten() {
            let p = stale.path();
            if p.is_dir() {
                fs::remove_dir_all(&p).ok();
            } else {
                fs::remove_file(&p).ok();
            }
        }
    }
    let augmenter = Augmenter::new(&exp.augment);
    let mode = match ds.size {
        Some(s) => Mode::Resize(s),
        None => Mode::Native {
            tile: 0,
            overlap: 0,
        },
    };
    let predictor = Predictor {
        model: &model,
        normalize: exp.data.normalize,
        mode,
        tta: Tta::None,
    };

    let start_period = state.history.len();
    let mut bar = progress.bar((periods * steps_per) as u64, "train");
    bar.inc((start_period * steps_per) as u64);
    let stats = image_stats(exp, &ds.train);
    for period in start_period..periods {
        let t0 = Instant::now();
        let first_step = period * steps_per;
        let n_steps = steps_per.min(total_steps - first_step);
        // The sample indices of each step of this period.
        let plan: Vec<Vec<usize>> = if t.steps > 0 {
            (0..n_steps)
                .map(|s| {
                    let mut r = StdRng::seed_from_u64(mix(&[t.seed, 1, (first_step + s) as u64]));
                    (0..t.batch).map(|_| r.random_range(0..n_train)).collect()
                })
                .collect()
        } else {
            let mut order: Vec<usize> = (0..n_train).collect();
            order.shuffle(&mut StdRng::seed_from_u64(mix(&[t.seed, 2, period as u64])));
            order.chunks(t.batch).map(|c| c.to_vec()).collect()
        };
        let (tx, rx) = sync_channel::<Result<Batch>>(2);
        let mut loss_sum = 0.0;
        let mut seen = 0usize;
        let mut train_conf = Confusion::default();
        let mut lr = t.lr;
        std::thread::scope(|scope| -> Result<()> {
            let plan = &plan;
            let augmenter = &augmenter;
            let stats = &stats;
            scope.spawn(move || {
                for (s, idx) in plan.iter().enumerate() {
                    let step = (first_step + s) as u64;
                    let b = build_batch(exp, &ds.train, stats, idx, augmenter, step);
                    if tx.send(b).is_err() {
                        return;
                    }
                }
            });
            for s in 0..plan.len() {
                let step = first_step + s;
                let b = rx
                    .recv()
                    .map_err(|_| anyhow!("the batch loader stopped"))??;
                lr = lr_at(exp, step, total_steps, period);
                opt.lr = lr;
                model.reseed_dropout(mix(&[t.seed, 3, step as u64]));
                let x = Tensor::from_vec(b.x, (b.n, 3, b.h, b.w), &device)?;
                let logits = model.forward(&x, true)?;
                let loss = loss_fn(exp, &logits, &b.y)?;
                let lv = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                if !lv.is_finite() {
                    bail!("the loss became {lv} at step {step}; lower train.lr?");
                }
                opt.backward_step(&loss)?;
                train_conf.add(&argmax_u8(&logits)?, &b.y, None);
                loss_sum += lv * b.n as f64;
                seen += b.n;
                bar.set_suffix(format!("loss {:.4}", loss_sum / seen as f64));
                bar.inc(1);
            }
            Ok(())
        })?;
        let train_loss = loss_sum / seen.max(1) as f64;

        // Validation.
        let save_preds = t.save_preds_every > 0 && (period + 1) % t.save_preds_every == 0;
        let (valid_loss, conf) = validate(
            &predictor,
            &ds.valid,
            exp.data.normalize,
            if save_preds {
                Some(
                    out.join("valid_preds")
                        .join(format!("epoch_{:03}", period + 1)),
                )
            } else {
                None
            },
        )?;
        let row = EpochRow {
            epoch: period + 1,
            step: first_step + n_steps,
            train_loss,
            valid_loss,
            pixel_acc: conf.accuracy(),
            miou: conf.miou(),
            vessel_iou: conf.iou_vessel(),
            vessel_dice: conf.dice(),
            lr,
            seconds: t0.elapsed().as_secs_f64(),
            train_pixel_acc: Some(train_conf.accuracy()),
            train_miou: Some(train_conf.miou()),
        };
        progress.log(&format!(
            "epoch {}/{periods}: train loss {:.4}, valid loss {:.4}, acc {:.4}, mIoU {:.4}, vessel Dice {:.4} ({:.1} s)",
            row.epoch, row.train_loss, row.valid_loss, row.pixel_acc, row.miou, row.vessel_dice, row.seconds
        ));
        let extra = |what: &str| serde_json::json!({"epoch": row.epoch, "step": row.step, "selected_by": what, "valid_miou": row.miou, "valid_loss": row.valid_loss});
        if state.best_loss.is_none_or(|(_, l)| row.valid_loss < l) {
            state.best_loss = Some((row.epoch, row.valid_loss));
            checkpoint::save(&model, &ckpt_pre, extra("valid_loss"), &out.join(BEST_LOSS))?;
        }
        if state.best_miou.is_none_or(|(_, m)| row.miou > m) {
            state.best_miou = Some((row.epoch, row.miou));
            checkpoint::save(&model, &ckpt_pre, extra("valid_miou"), &out.join(BEST_IOU))?;
        }
        checkpoint::save(&model, &ckpt_pre, extra("last"), &out.join(LAST))?;
        opt.save(&out.join(LAST_OPTIM))?;
        state.history.push(row);
        write_metrics_csv(&out.join("metrics.csv"), &state.history)?;
        write_atomic(
            &out.join(STATE),
            serde_json::to_string_pretty(&state)?.as_bytes(),
        )?;
    }
    bar.finish();

    let best = state
        .best_miou
        .and_then(|(e, _)| state.history.iter().find(|r| r.epoch == e))
        .cloned()
        .ok_or_else(|| anyhow!("no validation happened"))?;
    let summary = TrainSummary {
        periods,
        steps: total_steps,
        best_epoch: best.epoch,
        best_valid_miou: best.miou,
        best_valid_dice: best.vessel_dice,
        best_loss_epoch: state.best_loss.map_or(0, |(e, _)| e),
        train_seconds: state.history.iter().map(|r| r.seconds).sum(),
        peak_rss_mib: peak_rss_mib(),
        param_count: model.param_count(),
        device: device::name(&device),
        history: state.history.clone(),
    };
    fs::write(
        out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    // The resume state is not part of the published output.
    fs::remove_file(out.join(STATE)).ok();
    Ok(())
}

fn load_tensors(path: &Path, device: &Device) -> Result<std::collections::HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device)
        .with_context(|| format!("cannot read checkpoint {}", path.display()))
}

/// The normalisation statistics of each training image (whole image, as the reference does),
/// computed once: recomputing them over the full 565×584 image for every 96-px crop cost 36×
/// the crop's own work.
pub fn image_stats(exp: &Experiment, train: &[Prepared]) -> Vec<ChannelStats> {
    train
        .par_iter()
        .map(|p| ChannelStats::for_image(exp.data.normalize, &p.work.image))
        .collect()
}

/// Build one batch: crop (native training), augment, normalise with `stats` (from
/// [`image_stats`], one per image of `train`). Deterministic in (seed, step, position in batch).
pub fn build_batch(
    exp: &Experiment,
    train: &[Prepared],
    stats: &[ChannelStats],
    idx: &[usize],
    aug: &Augmenter,
    step: u64,
) -> Result<Batch> {
    let t = &exp.train;
    let items: Vec<(Vec<f32>, Vec<u8>, u32, u32)> = idx
        .par_iter()
        .enumerate()
        .map(|(j, &i)| {
            let mut rng = StdRng::seed_from_u64(mix(&[t.seed, 4, step, j as u64]));
            let full = &train[i].work;
            let stats = stats
                .get(i)
                .ok_or_else(|| anyhow!("no normalisation statistics for train image {i}"))?;
            let s = if t.crop > 0 {
                data::random_crop(full, t.crop, &mut rng)
            } else {
                full.clone()
            };
            let s = aug.apply(&s, &mut rng);
            let (w, h) = s.image.dimensions();
            let label = s
                .label
                .ok_or_else(|| anyhow!("train image {} has no annotation", s.id))?
                .into_raw();
            Ok((data::to_chw_f32_with(&s.image, stats), label, w, h))
        })
        .collect::<Result<_>>()?;
    let (w, h) = (items[0].2, items[0].3);
    if items.iter().any(|it| it.2 != w || it.3 != h) {
        bail!("images of one batch differ in size (use train.crop or the resize pipeline)");
    }
    let mut x = Vec::with_capacity(items.len() * 3 * (w * h) as usize);
    let mut y = Vec::with_capacity(items.len() * (w * h) as usize);
    for (xi, yi, _, _) in items.iter() {
        x.extend_from_slice(xi);
        y.extend_from_slice(yi);
    }
    Ok(Batch {
        x,
        y,
        n: idx.len(),
        h: h as usize,
        w: w as usize,
    })
}

/// Cross-entropy (optionally class-weighted, PyTorch's weighted mean), plus the soft Dice
/// loss of the vessel class (`ce+dice`, as both references compute it).
pub fn loss_fn(exp: &Experiment, logits: &Tensor, labels: &[u8]) -> Result<Tensor> {
    let (n, c, h, w) = logits.dims4()?;
    let weights: Vec<f32> = if exp.train.class_weights.is_empty() {
        vec![1.0; c]
    } else {
        exp.train.class_weights.iter().map(|&x| x as f32).collect()
    };
    let hw = h * w;
    let mut onehot = vec![0f32; n * c * hw];
    let mut denom = 0f64;
    for b in 0..n {
        for i in 0..hw {
            let k = (labels[b * hw + i] as usize).min(c - 1);
            onehot[(b * c + k) * hw + i] = weights[k];
            denom += weights[k] as f64;
        }
    }
    let target = Tensor::from_vec(onehot, (n, c, h, w), logits.device())?;
    let logp = candle_nn::ops::log_softmax(logits, 1)?;
    let ce = ((logp * &target)?.sum_all()? * (-1.0 / denom))?;
    if exp.train.loss == Loss::Ce {
        return Ok(ce);
    }
    let p1 = candle_nn::ops::softmax(logits, 1)?.narrow(1, 1, 1)?;
    let t1: Vec<f32> = labels
        .iter()
        .map(|&l| if l == 1 { 1.0 } else { 0.0 })
        .collect();
    let t1 = Tensor::from_vec(t1, (n, 1, h, w), logits.device())?;
    let inter = (&p1 * &t1)?.sum_all()?;
    let total = (p1.sum_all()? + t1.sum_all()?)?;
    let dice = (((inter * 2.0)? + 1.0)? / (total + 1.0)?)?;
    Ok((ce + (dice.neg()? + 1.0)?)?)
}

/// Whole-image validation at the working resolution: mean per-image cross-entropy, pooled
/// confusion counts (every pixel, as the seed's protocol), optional prediction PNGs.
fn validate(
    pred: &Predictor,
    valid: &[Prepared],
    normalize: Normalize,
    save_to: Option<std::path::PathBuf>,
) -> Result<(f64, Confusion)> {
    let mut conf = Confusion::default();
    let mut loss = 0.0;
    if let Some(d) = &save_to {
        fs::create_dir_all(d)?;
    }
    for p in valid {
        let s = &p.work;
        let label = s
            .label
            .as_ref()
            .ok_or_else(|| anyhow!("valid image {} has no annotation", p.id))?;
        let stats = ChannelStats::for_image(normalize, &s.image);
        let x = image_tensor(&s.image, &stats, pred.model.device())?;
        let logits = pred.logits_at(&x)?;
        let (_, _, h, w) = logits.dims4()?;
        let y = label.as_raw();
        let l = plain_ce(&logits, y)?;
        loss += l;
        let am = argmax_u8(&logits)?;
        conf.add(&am, y, None);
        if let Some(d) = &save_to {
            let img: Vec<u8> = am.iter().map(|&v| if v == 1 { 255 } else { 0 }).collect();
            let img =
                image::GrayImage::from_raw(w as u32, h as u32, img).context("prediction size")?;
            img.save(d.join(format!("{}.png", p.id)))?;
        }
    }
    Ok((loss / valid.len().max(1) as f64, conf))
}

fn plain_ce(logits: &Tensor, labels: &[u8]) -> Result<f64> {
    let (n, c, h, w) = logits.dims4()?;
    let logp = candle_nn::ops::log_softmax(logits, 1)?
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?;
    let hw = h * w;
    let mut s = 0f64;
    for b in 0..n {
        for i in 0..hw {
            let k = (labels[b * hw + i] as usize).min(c - 1);
            s -= logp[(b * c + k) * hw + i] as f64;
        }
    }
    Ok(s / (n * hw) as f64)
}

fn write_metrics_csv(path: &Path, rows: &[EpochRow]) -> Result<()> {
    let mut w = csv::Writer::from_writer(Vec::new());
    for r in rows {
        w.serialize(r)?;
    }
    let bytes = w.into_inner().map_err(|e| anyhow!("csv: {e}"))?;
    write_atomic(path, &bytes)
}

/// Read `metrics.csv` rows.
pub fn read_metrics_csv(path: &Path) -> Result<Vec<EpochRow>> {
    let mut r =
        csv::Reader::from_path(path).with_context(|| format!("cannot read {}", path.display()))?;
    r.deserialize().map(|x| x.map_err(Into::into)).collect()
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Reset the peak resident set (Linux: `5` to /proc/self/clear_refs), so that a stage's peak
/// is its own and not that of earlier stages in the same process. Best effort.
pub fn reset_peak_rss() {
    let _ = fs::write("/proc/self/clear_refs", b"5");
}

/// Peak resident set of this process (VmHWM), MiB; 0 where /proc is unavailable.
pub fn peak_rss_mib() -> f64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
