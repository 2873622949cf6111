//! `train`: fit the model on the preprocessed train split, validate every period, keep the
//! best-by-loss, best-by-IoU and last checkpoints.
//!
//! A *period* is an epoch (a shuffled pass over the train split, `train.epochs`) or, for
//! crop training with `train.steps`, `train.valid_every_steps` iterations of random crops.
//! Epoch-based runs speak of epochs (`epoch 7/100: ...`), step-based ones of periods and steps
//! (`period 7/10 (step 1680/2400): ...`).
//!
//! `train` runs these named steps, in this order:
//! 1. `check_data`: the data suits the recipe (random crops need native-resolution data, whole
//!    images need resized data).
//! 2. `setup`: the device (refusing a `train.precision` it cannot run), the model, its
//!    pretrained weights, the optimiser.
//! 3. `period_plan`: how many periods of how many optimiser steps.
//! 4. `resume`: the periods a killed run completed (`state.json`, the last weights and
//!    optimiser state), or a work folder emptied of anything else (also when the run was
//!    killed while saving a period, its last weights ahead of `state.json`).
//! 5. For each period not yet done:
//!    - `run_period`: a loader thread builds the period's batches ahead (`PeriodPlan::batches`
//!      says which images each step draws) while this thread takes the optimiser steps
//!      (`optimiser_step`: forward, loss, backward, update);
//!    - `validate`: the whole valid images at the working resolution (loss = cross-entropy,
//!      pixel accuracy, mIoU, vessel IoU and Dice), optionally saving the predictions;
//!    - `keep_checkpoints`: best-by-loss, best-by-IoU and last checkpoints (of the moving
//!      average of the weights with `train.ema`, plus the raw last weights), the optimiser
//!      state, one row of `metrics.csv`, and `state.json`, written last: it marks the period
//!      as done.
//! 6. `pick_thresholds` (with `train.pick_threshold`): the F1-optimal vessel threshold of each
//!    kept checkpoint on the train images' own predictions, stored in the checkpoint.
//! 7. `summary`: `summary.json`, and the resume state removed from the output.
//!
//! A run killed mid-way resumes after its last completed period and, since every random draw
//! derives from (seed, period, step), reaches the same weights as an uninterrupted run.
//!
//! Batches are built on the loader thread with rayon (augmentation in parallel, sharing the
//! compute's thread pool so the two never oversubscribe the cores).

use std::borrow::Cow;
use std::fs;
use std::path::{Path, PathBuf};
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
use crate::config::{Experiment, TrainConfig, Tta};
use crate::data::{self, Augmenter, ChannelStats, Sample};
use crate::metrics::Confusion;
use crate::metrics::ThresholdSweep;
use crate::model::checkpoint::{self, ChosenThreshold, Preprocess as CkptPreprocess};
use crate::model::{device, SegModel};
use crate::predict::{argmax_u8, mode_for, Mode, Predictor};
use crate::progress::{Bar, Progress};
pub use crate::report::PeriodRow;
use crate::training::{
    build_batch, image_stats, lr_at, mix, peak_rss_mib, plain_ce, reset_peak_rss, supervised_loss,
    Batch, Ema, Optimizer,
};

pub struct Train;

pub const BEST_IOU: &str = "best_model_iou.safetensors";
pub const BEST_LOSS: &str = "best_model_loss.safetensors";
pub const LAST: &str = "last.safetensors";
const LAST_OPTIM: &str = "last_optim.safetensors";
/// With `train.ema`: the raw (not averaged) last weights, which training resumes from.
const LAST_RAW: &str = "last_raw.safetensors";
const STATE: &str = "state.json";

impl Stage for Train {
    fn version(&self) -> u32 {
        // 2: peak RSS is the stage's own (reset at the start of training).
        // 3: convolutions image-parallel, sparse for dilated taps, fused BN+ReLU: f32 results
        //    differ in the last bits (summation order).
        // 4: the output files speak of periods, not epochs: `metrics.csv`'s `epoch` column is
        //    `period`, `summary.json`'s `best_epoch`/`best_loss_epoch` are
        //    `best_period`/`best_loss_period`, the checkpoints' metadata say `period`, and
        //    step-based runs save validation predictions under `valid_preds/step_NNNNNN/`.
        4
    }
    fn params(&self) -> &'static [&'static str] {
        &[
            "model",
            "augment",
            "data.normalize",
            "train.imgsz",
            "train.epochs",
            "train.steps",
            "train.valid_every_steps",
            "train.batch",
            "train.lr",
            "train.optimizer",
            "train.momentum",
            "train.weight_decay",
            "train.scheduler",
            "train.step_size",
            "train.gamma",
            "train.lr_min_factor",
            "train.loss",
            "train.class_weights",
            "train.seed",
            "train.device",
            "train.precision",
            "train.recompute",
            "train.ema",
            "train.pick_threshold",
            "train.cldice",
            "train.crop",
            "train.save_preds_every",
        ]
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
    history: Vec<PeriodRow>,
    /// (period, valid loss) of the best-by-loss checkpoint.
    best_loss: Option<(usize, f64)>,
    /// (period, valid mIoU) of the best-by-IoU checkpoint.
    best_miou: Option<(usize, f64)>,
}

/// `summary.json`: what the report needs about the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainSummary {
    pub periods: usize,
    pub steps: usize,
    /// The period (1-based) of the best-by-IoU checkpoint.
    #[serde(alias = "best_epoch")]
    pub best_period: usize,
    /// NaN (`null`) without valid images, as the other validation figures.
    #[serde(deserialize_with = "crate::report::null_as_nan")]
    pub best_valid_miou: f64,
    #[serde(deserialize_with = "crate::report::null_as_nan")]
    pub best_valid_dice: f64,
    /// The period (1-based) of the best-by-loss checkpoint.
    #[serde(alias = "best_loss_epoch")]
    pub best_loss_period: usize,
    pub train_seconds: f64,
    pub peak_rss_mib: f64,
    pub param_count: usize,
    pub device: String,
    pub history: Vec<PeriodRow>,
    /// The threshold picked on the train images for the last checkpoint
    /// (`train.pick_threshold`); its time is part of `train_seconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f32>,
}

/// The named steps of training, in order (see the module documentation).
fn train(
    exp: &Experiment,
    ds: &preprocess::Dataset,
    out: &Path,
    progress: &Progress,
) -> Result<()> {
    check_data(&exp.train, ds)?;
    let mut s = setup(exp, progress)?;
    // train.precision for the whole stage: the products of training and of validation.
    let _precision = device::apply_precision(exp.train.precision, &s.device)?;
    let plan = period_plan(&exp.train, ds.train.len());
    let mut state = resume(out, &mut s, &plan, progress)?;
    let data = TrainData::new(exp, &ds.train);
    let mut bar = progress.bar((plan.periods * plan.steps_per) as u64, "train");
    bar.inc((state.history.len() * plan.steps_per) as u64);
    for period in state.history.len()..plan.periods {
        let t0 = Instant::now();
        let trained = run_period(&data, &mut s, &plan, period, &mut bar)?;
        let save_preds = exp.train.save_preds_every > 0
            && (period + 1).is_multiple_of(exp.train.save_preds_every);
        let (valid_loss, conf) = if ds.valid.is_empty() {
            (f64::NAN, None)
        } else {
            let (loss, conf) = validate(
                &valid_predictor(exp, ds, s.scored()),
                &ds.valid,
                save_preds.then(|| out.join("valid_preds").join(plan.preds_dir(period))),
            )?;
            (loss, Some(conf))
        };
        let valid = |f: fn(&Confusion) -> f64| conf.as_ref().map_or(f64::NAN, f);
        let (first_step, n_steps) = plan.steps_of(period);
        let row = PeriodRow {
            period: period + 1,
            step: first_step + n_steps,
            train_loss: trained.loss,
            valid_loss,
            pixel_acc: valid(Confusion::accuracy),
            miou: valid(Confusion::miou),
            vessel_iou: valid(Confusion::iou_vessel),
            vessel_dice: valid(Confusion::dice),
            lr: trained.lr,
            seconds: t0.elapsed().as_secs_f64(),
            train_pixel_acc: Some(trained.conf.accuracy()),
            train_miou: Some(trained.conf.miou()),
        };
        progress.log(&if conf.is_some() {
            format!(
                "{}: train loss {:.4}, valid loss {:.4}, acc {:.4}, mIoU {:.4}, vessel Dice {:.4} ({:.1} s)",
                plan.name(period), row.train_loss, row.valid_loss, row.pixel_acc, row.miou, row.vessel_dice, row.seconds
            )
        } else {
            format!(
                "{}: train loss {:.4}, no valid images ({:.1} s)",
                plan.name(period),
                row.train_loss,
                row.seconds
            )
        });
        keep_checkpoints(&mut state, row, &s, out)?;
    }
    bar.finish();
    let picked = pick_thresholds(exp, ds, &s.device, out, progress)?;
    summary(&state, &plan, &s, picked, out)
}

/// Refuse data the recipe cannot train on: random crops need native-resolution data (the
/// `native` pipeline), whole images need resized data.
fn check_data(t: &TrainConfig, ds: &preprocess::Dataset) -> Result<()> {
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
    Ok(())
}

/// The model and what trains it.
struct Setup {
    device: Device,
    model: SegModel,
    opt: Optimizer,
    /// The moving average of the weights (`train.ema > 0`).
    ema: Option<Ema>,
    /// How an image is prepared for the model, as the checkpoints record it.
    ckpt_pre: CkptPreprocess,
}

/// The device (refusing a precision it cannot run), the model (initialised from
/// `train.seed`), its pretrained weights if any, and the optimiser.
fn setup(exp: &Experiment, progress: &Progress) -> Result<Setup> {
    let t = &exp.train;
    let device = device::select(&t.device)?;
    device::check_precision(t.precision, &device)?;
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
    let opt = Optimizer::new(
        t.optimizer,
        model.trainable_vars(),
        t.lr,
        t.weight_decay,
        t.momentum,
    );
    let ema = (t.ema > 0.0)
        .then(|| Ema::new(&model, t.ema, 0))
        .transpose()?;
    let ckpt_pre = CkptPreprocess {
        imgsz: t.imgsz,
        normalize: exp.data.normalize,
        crop: t.crop,
        zoom: exp.data.zoom,
    };
    Ok(Setup {
        device,
        model,
        opt,
        ema,
        ckpt_pre,
    })
}

impl Setup {
    /// The weights that are validated, kept and evaluated: the moving average when there is
    /// one, else the trained weights.
    fn scored(&self) -> &SegModel {
        self.ema.as_ref().map_or(&self.model, |e| &e.model)
    }
}

/// How a run divides into periods of optimiser steps.
#[derive(Debug, Clone, Copy)]
struct PeriodPlan {
    periods: usize,
    /// Optimiser steps per period (the last period of a step-based run may take fewer).
    steps_per: usize,
    /// Optimiser steps in the whole run.
    total_steps: usize,
    /// Whether the run counts steps (`train.steps`) rather than epochs.
    by_steps: bool,
}

/// Epochs of ⌈train images / batch⌉ steps, or `train.steps` in periods of
/// `train.valid_every_steps`.
fn period_plan(t: &TrainConfig, n_train: usize) -> PeriodPlan {
    if t.steps > 0 {
        PeriodPlan {
            periods: t.steps.div_ceil(t.valid_every_steps),
            steps_per: t.valid_every_steps,
            total_steps: t.steps,
            by_steps: true,
        }
    } else {
        let steps_per = n_train.div_ceil(t.batch);
        PeriodPlan {
            periods: t.epochs,
            steps_per,
            total_steps: t.epochs * steps_per,
            by_steps: false,
        }
    }
}

impl PeriodPlan {
    /// The first step of `period` (0-based) and how many steps it takes.
    fn steps_of(&self, period: usize) -> (usize, usize) {
        let first = period * self.steps_per;
        (first, self.steps_per.min(self.total_steps - first))
    }

    /// The train-image indices of each step of `period`: independent random draws per step
    /// (step-based runs), or a shuffled pass over the split cut into batches (epochs).
    fn batches(&self, t: &TrainConfig, period: usize, n_train: usize) -> Vec<Vec<usize>> {
        let (first_step, n_steps) = self.steps_of(period);
        if self.by_steps {
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
        }
    }

    /// `period` (0-based) as the log names it once done: `epoch 7/100`, or
    /// `period 7/10 (step 1680/2400)`.
    fn name(&self, period: usize) -> String {
        if self.by_steps {
            let (first, n) = self.steps_of(period);
            format!(
                "period {}/{} (step {}/{})",
                period + 1,
                self.periods,
                first + n,
                self.total_steps
            )
        } else {
            format!("epoch {}/{}", period + 1, self.periods)
        }
    }

    /// The folder under `valid_preds/` for the predictions after `period` (0-based):
    /// `epoch_007`, or `step_001680`.
    fn preds_dir(&self, period: usize) -> String {
        if self.by_steps {
            let (first, n) = self.steps_of(period);
            format!("step_{:06}", first + n)
        } else {
            format!("epoch_{:03}", period + 1)
        }
    }
}

/// The state of a killed run's completed periods, with the model and optimiser restored to
/// the last of them; or, with nothing to resume, a fresh state and a work folder emptied of
/// whatever a failed attempt left.
///
/// `state.json` is the commit point: the resume files (`LAST`, with `train.ema` `LAST_RAW`,
/// and `LAST_OPTIM`) are overwritten in place before it, so a run killed between them and
/// `state.json` leaves weights one period ahead of what `state.json` records. Resuming from
/// those would retrain that period from the wrong starting point and silently end elsewhere
/// than an uninterrupted run, so such a run starts over instead (see [`uncommitted_checkpoint`]
/// for why checking the checkpoints' periods is enough).
fn resume(out: &Path, s: &mut Setup, plan: &PeriodPlan, progress: &Progress) -> Result<State> {
    let state = read_state(out)?;
    let done = state.history.len();
    if done == 0 {
        clear_work_dir(out)?;
        return Ok(State::default());
    }
    if let Some((file, period)) = uncommitted_checkpoint(out, s.ema.is_some(), done)? {
        progress.log(&format!(
            "{file} was saved after period {period} but {STATE} records period {done} as the last done (killed while saving): starting over"
        ));
        clear_work_dir(out)?;
        return Ok(State::default());
    }
    let raw = if s.ema.is_some() { LAST_RAW } else { LAST };
    s.model
        .load_state_dict(&load_tensors(&out.join(raw), &s.device)?)?;
    if let Some(e) = &mut s.ema {
        e.model
            .load_state_dict(&load_tensors(&out.join(LAST), &s.device)?)?;
        e.updates = state.history.last().map_or(0, |r| r.step) as u64;
    }
    s.opt.load(&out.join(LAST_OPTIM))?;
    progress.log(&format!(
        "resuming after period {done} ({} done)",
        plan.name(done - 1)
    ));
    Ok(state)
}

/// `state.json` of a killed run, or an empty state when there is none.
fn read_state(out: &Path) -> Result<State> {
    match fs::read_to_string(out.join(STATE)) {
        Ok(text) => serde_json::from_str(&text).with_context(|| {
            format!(
                "malformed {STATE} in the train work directory {}",
                out.display()
            )
        }),
        Err(_) => Ok(State::default()),
    }
}

/// The first checkpoint that resume would load (`LAST`, and with `with_ema` `LAST_RAW`) whose
/// metadata say it was saved after a period other than period `done`, the last that
/// `state.json` records, as (file, its period); `None` when they all match.
///
/// Why the checkpoints' periods are enough: [`keep_checkpoints`] writes period k+1's files in
/// the order `BEST_LOSS`/`BEST_IOU` (when improved), `LAST`, `LAST_RAW`, `LAST_OPTIM`,
/// `metrics.csv`, `state.json`, each by an atomic rename. A kill
/// - before `LAST` leaves every resume file at period k, matching `state.json`: the resume is
///   sound;
/// - after `LAST` (whatever follows) leaves `LAST` at period k+1: caught here.
///
/// `LAST_OPTIM` records no period, but it is written after `LAST`, so it cannot be ahead of
/// `state.json` while `LAST` is not. `LAST_RAW` is checked too although `LAST` decides alone:
/// it is what the model resumes from, and reading a header is cheap.
///
/// The best checkpoints of a run killed after writing them but before `LAST` hold period k+1
/// while `state.json` still holds period k's best figures. The resume reruns period k+1 from
/// the same weights against the same recorded bests and, training being deterministic for a
/// given thread count and device, reaches the same figures and rewrites the same weights.
/// Caveat: a rerun on another thread count or device (f32 sums in another order) may decide
/// differently, and a best checkpoint may then keep the killed attempt's weights while
/// `summary.json` names an earlier period; such a rerun would not be bitwise equal to an
/// uninterrupted run anyway.
fn uncommitted_checkpoint(
    out: &Path,
    with_ema: bool,
    done: usize,
) -> Result<Option<(&'static str, usize)>> {
    let files: &[&'static str] = if with_ema { &[LAST, LAST_RAW] } else { &[LAST] };
    for &file in files {
        let period = saved_after(&out.join(file))?;
        if period != done {
            return Ok(Some((file, period)));
        }
    }
    Ok(None)
}

/// The period (1-based) after which the checkpoint at `path` was saved, from its metadata
/// (the `extra` that [`keep_checkpoints`] writes), without reading its tensors.
fn saved_after(path: &Path) -> Result<usize> {
    let meta = checkpoint::read_meta(path)
        .with_context(|| format!("cannot resume from {}", path.display()))?;
    meta.extra["period"]
        .as_u64()
        .map(|p| p as usize)
        .ok_or_else(|| {
            anyhow!(
                "cannot resume from {}: its metadata record no period",
                path.display()
            )
        })
}

/// Empties the train work directory of whatever a killed or failed attempt left.
fn clear_work_dir(out: &Path) -> Result<()> {
    let entries = fs::read_dir(out)
        .with_context(|| format!("cannot list the train work directory {}", out.display()))?;
    for stale in entries.flatten() {
        let p = stale.path();
        if p.is_dir() {
            fs::remove_dir_all(&p).ok();
        } else {
            fs::remove_file(&p).ok();
        }
    }
    Ok(())
}

/// What every period reads: the train images (zoomed by `data.zoom`, then enhanced per
/// `data.normalize`, whole images before any crop), their normalisation statistics (computed
/// once), the augmentation.
struct TrainData<'a> {
    exp: &'a Experiment,
    train: Vec<Cow<'a, Sample>>,
    stats: Vec<ChannelStats>,
    augmenter: Augmenter,
}

impl<'a> TrainData<'a> {
    fn new(exp: &'a Experiment, train: &'a [Prepared]) -> Self {
        let zoom = exp.data.zoom.unwrap_or(1.0);
        let train: Vec<Cow<Sample>> = train
            .par_iter()
            .map(|p| {
                let (w, h) = p.work.image.dimensions();
                let s = if data::zoomed_size(w, h, zoom) == (w, h) {
                    Cow::Borrowed(&p.work)
                } else {
                    Cow::Owned(data::zoom_sample(&p.work, zoom))
                };
                match data::enhance(&s.image, exp.data.normalize) {
                    Cow::Borrowed(_) => s,
                    // The other fields, without cloning the image that is being replaced.
                    Cow::Owned(image) => Cow::Owned(Sample {
                        id: s.id.clone(),
                        image,
                        label: s.label.clone(),
                        fov: s.fov.clone(),
                    }),
                }
            })
            .collect();
        let stats = image_stats(exp, &train.iter().map(|s| s.as_ref()).collect::<Vec<_>>());
        TrainData {
            exp,
            train,
            stats,
            augmenter: Augmenter::new(&exp.augment),
        }
    }

    /// The train images, in order.
    fn samples(&self) -> Vec<&Sample> {
        self.train.iter().map(|s| s.as_ref()).collect()
    }
}

/// What one period of optimiser steps gave.
struct Trained {
    /// Mean training loss per image.
    loss: f64,
    /// Pixel counts of the training predictions (train accuracy and mIoU).
    conf: Confusion,
    /// Learning rate of the period's last step.
    lr: f64,
}

/// The optimiser steps of `period`: a loader thread builds the batches (two ahead at most)
/// while this thread trains on them.
fn run_period(
    data: &TrainData,
    s: &mut Setup,
    plan: &PeriodPlan,
    period: usize,
    bar: &mut Bar,
) -> Result<Trained> {
    let exp = data.exp;
    let (first_step, _) = plan.steps_of(period);
    let batches = plan.batches(&exp.train, period, data.train.len());
    let (tx, rx) = sync_channel::<Result<Batch>>(2);
    let mut loss_sum = 0.0;
    let mut seen = 0usize;
    let mut conf = Confusion::default();
    let mut lr = exp.train.lr;
    std::thread::scope(|scope| -> Result<()> {
        let batches = &batches;
        scope.spawn(move || {
            let train = data.samples();
            for (i, idx) in batches.iter().enumerate() {
                let step = (first_step + i) as u64;
                let b = build_batch(exp, &train, &data.stats, idx, &data.augmenter, step);
                if tx.send(b).is_err() {
                    return;
                }
            }
        });
        for i in 0..batches.len() {
            let step = first_step + i;
            let b = rx
                .recv()
                .map_err(|_| anyhow!("the batch loader stopped"))??;
            lr = lr_at(exp, step, plan.total_steps, period);
            let n = b.n;
            let lv = optimiser_step(exp, s, b, step, lr, &mut conf)?;
            loss_sum += lv * n as f64;
            seen += n;
            bar.set_suffix(format!("loss {:.4}", loss_sum / seen as f64));
            bar.inc(1);
        }
        Ok(())
    })?;
    Ok(Trained {
        loss: loss_sum / seen.max(1) as f64,
        conf,
        lr,
    })
}

/// One optimiser step on `b` at learning rate `lr`, dropout seeded by `step`: forward,
/// loss, backward, update. Returns the batch's loss; adds its predictions to `conf`.
fn optimiser_step(
    exp: &Experiment,
    s: &mut Setup,
    b: Batch,
    step: usize,
    lr: f64,
    conf: &mut Confusion,
) -> Result<f64> {
    s.opt.lr = lr;
    s.model
        .reseed_dropout(mix(&[exp.train.seed, 3, step as u64]));
    let x = Tensor::from_vec(b.x, (b.n, 3, b.h, b.w), &s.device)?;
    let outputs = s.model.forward_supervised(&x)?;
    let logits = outputs[0].0.clone();
    let loss = supervised_loss(exp, &outputs, &b.y)?;
    let lv = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if !lv.is_finite() {
        bail!("the loss became {lv} at step {step}; lower train.lr?");
    }
    s.opt.backward_step(&loss)?;
    if let Some(e) = &mut s.ema {
        e.update(&s.model)?;
    }
    conf.add(&argmax_u8(&logits)?, &b.y, None);
    Ok(lv)
}

/// How validation sees an image: resized data at its working size, native data whole.
fn valid_predictor<'a>(
    exp: &Experiment,
    ds: &preprocess::Dataset,
    model: &'a SegModel,
) -> Predictor<'a> {
    let mode = match ds.size {
        Some(s) => Mode::Resize(s),
        None => Mode::Native {
            tile: 0,
            overlap: 0,
            zoom: exp.data.zoom.unwrap_or(1.0),
        },
    };
    Predictor {
        model,
        normalize: exp.data.normalize,
        mode,
        tta: Tta::None,
    }
}

/// Whole-image validation at the working resolution (native images zoomed by `data.zoom` are
/// scored at their own resolution): mean per-image cross-entropy, pooled
/// confusion counts (every pixel, as the seed's protocol), optional prediction PNGs.
fn validate(
    pred: &Predictor,
    valid: &[Prepared],
    save_to: Option<PathBuf>,
) -> Result<(f64, Confusion)> {
    let mut conf = Confusion::default();
    let mut loss = 0.0;
    if let Some(d) = &save_to {
        fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    for p in valid {
        let s = &p.work;
        let label = s
            .label
            .as_ref()
            .ok_or_else(|| anyhow!("valid image {} has no annotation", p.id))?;
        let logits = pred.logits(&s.image)?;
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
            let path = d.join(format!("{}.png", p.id));
            img.save(&path)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
    }
    Ok((loss / valid.len().max(1) as f64, conf))
}

/// After validating `row`: the best-by-loss and best-by-IoU checkpoints when `row` beats
/// them, the last checkpoint and optimiser state, `metrics.csv`, and `state.json` last (the
/// period counts as done once it is written; [`uncommitted_checkpoint`] says what a kill
/// before that leaves).
fn keep_checkpoints(state: &mut State, row: PeriodRow, s: &Setup, out: &Path) -> Result<()> {
    let extra = |what: &str| serde_json::json!({"period": row.period, "step": row.step, "selected_by": what, "valid_miou": row.miou, "valid_loss": row.valid_loss});
    let save = |what: &str, file: &str| {
        checkpoint::save(s.scored(), &s.ckpt_pre, extra(what), None, &out.join(file))
    };
    // Without valid images (NaN figures) there is no best, only the last checkpoint.
    let validated = !row.valid_loss.is_nan();
    if validated && state.best_loss.is_none_or(|(_, l)| row.valid_loss < l) {
        state.best_loss = Some((row.period, row.valid_loss));
        save("valid_loss", BEST_LOSS)?;
    }
    if validated && state.best_miou.is_none_or(|(_, m)| row.miou > m) {
        state.best_miou = Some((row.period, row.miou));
        save("valid_miou", BEST_IOU)?;
    }
    save("last", LAST)?;
    if s.ema.is_some() {
        let raw = out.join(LAST_RAW);
        checkpoint::save(&s.model, &s.ckpt_pre, extra("raw"), None, &raw)?;
    }
    s.opt.save(&out.join(LAST_OPTIM))?;
    state.history.push(row);
    write_metrics_csv(&out.join("metrics.csv"), &state.history)?;
    write_atomic(
        &out.join(STATE),
        serde_json::to_string_pretty(&state)?.as_bytes(),
    )
}

/// A threshold picked after training: the last checkpoint's, and the seconds picking took.
struct Picked {
    threshold: f32,
    seconds: f64,
}

/// With `train.pick_threshold`: for each kept checkpoint, the vessel threshold with the best
/// pooled F1 on the train images' own whole-image predictions (at their original resolution,
/// inside the FOV, no TTA), stored in the checkpoint. The valid images play no part. Runs after
/// the last period and is idempotent, so a run killed here redoes it.
fn pick_thresholds(
    exp: &Experiment,
    ds: &preprocess::Dataset,
    device: &Device,
    out: &Path,
    progress: &Progress,
) -> Result<Option<Picked>> {
    if !exp.train.pick_threshold {
        return Ok(None);
    }
    let t0 = Instant::now();
    let mut last = 0.0;
    // Checkpoints saved after the same period hold the same weights: predict those once.
    let mut by_period: Vec<(serde_json::Value, ChosenThreshold)> = Vec::new();
    for file in [BEST_LOSS, BEST_IOU, LAST] {
        let path = out.join(file);
        if !path.exists() {
            continue; // no best checkpoints without valid images
        }
        let (model, meta) = checkpoint::load(&path, device)?;
        let period = meta.extra["period"].clone();
        let chosen = match by_period.iter().find(|(p, _)| *p == period) {
            Some((_, c)) => c.clone(),
            None => {
                let c = threshold_on_train(&model, &meta.preprocess, ds)?;
                by_period.push((period, c.clone()));
                c
            }
        };
        checkpoint::save(
            &model,
            &meta.preprocess,
            meta.extra.clone(),
            Some(&chosen),
            &path,
        )?;
        progress.log(&format!(
            "{file}: threshold {} (train F1 {:.4})",
            chosen.value, chosen.f1
        ));
        last = chosen.value;
    }
    Ok(Some(Picked {
        threshold: last,
        seconds: t0.elapsed().as_secs_f64(),
    }))
}

/// The F1-optimal threshold of `model` on the train images (see [`pick_thresholds`]).
fn threshold_on_train(
    model: &SegModel,
    pre: &CkptPreprocess,
    ds: &preprocess::Dataset,
) -> Result<ChosenThreshold> {
    let pred = Predictor {
        model,
        normalize: pre.normalize,
        mode: mode_for(pre, 0, 0),
        tta: Tta::None,
    };
    let mut sweep = ThresholdSweep::default();
    for p in &ds.train {
        let orig = p.original();
        let label = orig
            .label
            .as_ref()
            .ok_or_else(|| anyhow!("train image {} has no annotation", p.id))?;
        let probs = pred.probs(&orig.image)?;
        sweep.add(&probs, label.as_raw(), Some(orig.fov.as_raw()));
    }
    let (value, f1) = sweep
        .best_f1()
        .ok_or_else(|| anyhow!("the train images have no vessel pixel to pick a threshold on"))?;
    Ok(ChosenThreshold {
        value,
        f1,
        how: format!(
            "F1-optimal on the {} train images' predictions (inside the FOV, no TTA)",
            ds.train.len()
        ),
    })
}

/// `summary.json` from the completed run; the resume state is removed, as it is not part of
/// the published output.
fn summary(
    state: &State,
    plan: &PeriodPlan,
    s: &Setup,
    picked: Option<Picked>,
    out: &Path,
) -> Result<()> {
    // Without valid images the last period stands in for the best (its figures are NaN).
    let best = match state.best_miou {
        Some((p, _)) => state.history.iter().find(|r| r.period == p),
        None => state.history.last(),
    }
    .cloned()
    .ok_or_else(|| anyhow!("no training period completed"))?;
    let summary = TrainSummary {
        periods: plan.periods,
        steps: plan.total_steps,
        best_period: best.period,
        best_valid_miou: best.miou,
        best_valid_dice: best.vessel_dice,
        best_loss_period: state.best_loss.map_or(best.period, |(p, _)| p),
        train_seconds: state.history.iter().map(|r| r.seconds).sum::<f64>()
            + picked.as_ref().map_or(0.0, |p| p.seconds),
        peak_rss_mib: peak_rss_mib(),
        param_count: s.model.param_count(),
        device: device::name(&s.device),
        history: state.history.clone(),
        threshold: picked.map(|p| p.threshold),
    };
    write_atomic(
        &out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    fs::remove_file(out.join(STATE)).ok();
    Ok(())
}

fn load_tensors(path: &Path, device: &Device) -> Result<std::collections::HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device)
        .with_context(|| format!("cannot read checkpoint {}", path.display()))
}

fn write_metrics_csv(path: &Path, rows: &[PeriodRow]) -> Result<()> {
    let mut w = csv::Writer::from_writer(Vec::new());
    for r in rows {
        w.serialize(r)?;
    }
    let bytes = w.into_inner().map_err(|e| anyhow!("csv: {e}"))?;
    write_atomic(path, &bytes)
}

/// Read `metrics.csv` rows (files written before the `epoch` column was named `period`
/// included).
pub fn read_metrics_csv(path: &Path) -> Result<Vec<PeriodRow>> {
    let mut r =
        csv::Reader::from_path(path).with_context(|| format!("cannot read {}", path.display()))?;
    r.deserialize()
        .map(|x| x.with_context(|| format!("malformed row in {}", path.display())))
        .collect()
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(epochs: usize, steps: usize, every: usize, batch: usize) -> TrainConfig {
        TrainConfig {
            epochs,
            steps,
            valid_every_steps: every,
            batch,
            ..TrainConfig::default()
        }
    }

    /// Step-based runs are named by period and step, epoch-based ones by epoch; the last
    /// period of a step-based run may be short.
    #[test]
    fn periods_are_named_by_their_unit() {
        let p = period_plan(&cfg(100, 2400, 240, 16), 16);
        assert_eq!((p.periods, p.steps_per, p.total_steps), (10, 240, 2400));
        assert_eq!(p.name(6), "period 7/10 (step 1680/2400)");
        assert_eq!(p.preds_dir(6), "step_001680");
        let p = period_plan(&cfg(100, 1000, 300, 16), 16);
        assert_eq!(p.periods, 4);
        assert_eq!(p.steps_of(3), (900, 100));
        assert_eq!(p.name(3), "period 4/4 (step 1000/1000)");
        let p = period_plan(&cfg(100, 0, 250, 2), 15);
        assert_eq!((p.periods, p.steps_per, p.total_steps), (100, 8, 800));
        assert_eq!(p.name(6), "epoch 7/100");
        assert_eq!(p.preds_dir(6), "epoch_007");
    }

    /// Each epoch draws every train image once; a step-based period draws `batch` images per
    /// step; both depend only on (seed, period).
    #[test]
    fn batches_cover_the_split_and_repeat() {
        let t = cfg(3, 0, 250, 4);
        let p = period_plan(&t, 10);
        let b = p.batches(&t, 1, 10);
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), [4, 4, 2]);
        let mut all: Vec<usize> = b.concat();
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert_eq!(b, p.batches(&t, 1, 10));
        assert_ne!(b, p.batches(&t, 2, 10));
        let t = cfg(0, 7, 5, 3);
        let p = period_plan(&t, 10);
        let b = p.batches(&t, 1, 10);
        assert_eq!(b.len(), 2);
        assert!(b.iter().all(|s| s.len() == 3 && s.iter().all(|&i| i < 10)));
        assert_eq!(b, p.batches(&t, 1, 10));
    }

    /// A run killed after saving period 3's last weights but before its `state.json` (2
    /// periods done) is caught, by `LAST` or, with a moving average, by `LAST_RAW`; `LAST_RAW`
    /// is not looked at without one.
    #[test]
    fn checkpoints_ahead_of_the_state_are_caught() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::config::ModelConfig {
            arch: crate::config::Arch::Unet,
            widths: vec![4, 8],
            ..Default::default()
        };
        let model = SegModel::new(&cfg, &Device::Cpu, 0).unwrap();
        let pre = CkptPreprocess {
            imgsz: 16,
            normalize: crate::config::Normalize::Imagenet,
            crop: 0,
            zoom: None,
        };
        let save = |file: &str, period: usize| {
            let extra = serde_json::json!({"period": period, "step": 4 * period});
            checkpoint::save(&model, &pre, extra, None, &dir.path().join(file)).unwrap();
        };
        let caught = |ema: bool| uncommitted_checkpoint(dir.path(), ema, 2).unwrap();
        save(LAST, 2);
        save(LAST_RAW, 2);
        assert_eq!(caught(true), None);
        save(LAST_RAW, 3);
        assert_eq!(caught(true), Some((LAST_RAW, 3)));
        assert_eq!(caught(false), None);
        save(LAST, 3);
        assert_eq!(caught(true), Some((LAST, 3)));
        assert_eq!(caught(false), Some((LAST, 3)));
        fs::remove_file(dir.path().join(LAST)).unwrap();
        let e = uncommitted_checkpoint(dir.path(), false, 2).unwrap_err();
        assert!(format!("{e:#}").contains("cannot resume from"), "{e:#}");
    }

    /// A `metrics.csv` written before the rename (an `epoch` column) still reads.
    #[test]
    fn old_metrics_csv_with_an_epoch_column_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.csv");
        fs::write(
            &path,
            "epoch,step,train_loss,valid_loss,pixel_acc,miou,vessel_iou,vessel_dice,lr,seconds\n\
             3,24,0.5,0.6,0.9,0.7,0.5,0.66,0.001,12.5\n",
        )
        .unwrap();
        let rows = read_metrics_csv(&path).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].period, rows[0].step), (3, 24));
        write_metrics_csv(&path, &rows).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("period,step,"), "{text}");
        assert_eq!(read_metrics_csv(&path).unwrap(), rows);
    }
}
