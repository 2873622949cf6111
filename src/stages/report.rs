//! `report`: the per-experiment report (the seed's figures 5–8: loss, accuracy and mIoU per
//! epoch, and a Markdown summary), and the comparison report of several experiments.
//!
//! The per-experiment stage gathers what `train` and `evaluate` published into an
//! [`ExperimentSummary`] (`summary.json`) and renders it. The comparison (`driveline report`)
//! is a cached stage too: its key is the hash of the experiments' report keys, so rerunning it
//! with nothing changed does no work, and changing one experiment redoes only that
//! experiment's stages and the comparison.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::evaluate::{self, EvalReport, Scores};
use super::train::TrainSummary;
use super::{Stage, StageCtx};
use crate::config::{Arch, Experiment};
use crate::pipeline::cache::Manifest;
use crate::pipeline::Env;
use crate::report::{self, ExperimentSummary, PredictionImage, SplitMetrics, TrainUnit};

pub struct Report;

pub const SUMMARY: &str = "summary.json";

impl Stage for Report {
    fn version(&self) -> u32 {
        // 2: summary.json records the experiment's params (`config`).
        2
    }
    fn role(&self) -> &'static str {
        "report"
    }
    fn requires(&self) -> &'static [&'static str] {
        &["train", "evaluate"]
    }
    fn run(&self, ctx: &StageCtx) -> Result<()> {
        let train_dir = ctx.input("train")?;
        let eval_dir = ctx.input("evaluate")?;
        let summary = summarize(ctx.exp, train_dir, eval_dir)?;
        fs::write(
            ctx.out.join(SUMMARY),
            serde_json::to_string_pretty(&summary)?,
        )?;
        report::render_experiment(&summary, ctx.out)
            .with_context(|| format!("rendering the report of `{}`", ctx.exp.name))
    }
}

fn split_metrics(split: &str, s: &Scores, fov: bool) -> SplitMetrics {
    SplitMetrics {
        split: split.to_string(),
        accuracy: s.accuracy,
        miou: s.miou,
        vessel_iou: s.vessel_iou,
        dice: s.dice,
        sensitivity: s.sensitivity,
        specificity: s.specificity,
        precision: s.precision,
        auc: s.auc,
        fov,
    }
}

/// Everything the report shows about one experiment, from its published outputs.
pub fn summarize(exp: &Experiment, train_dir: &Path, eval_dir: &Path) -> Result<ExperimentSummary> {
    let p = train_dir.join("summary.json");
    let ts: TrainSummary = serde_json::from_str(
        &fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?,
    )
    .with_context(|| format!("malformed {}", p.display()))?;
    let ev: EvalReport = evaluate::load_report(eval_dir)?;
    let mut eval = Vec::new();
    for (split, s) in &ev.splits {
        eval.push(split_metrics(split, &s.fov, true));
        eval.push(split_metrics(split, &s.all, false));
    }
    // The same images for every experiment: the first test images, else valid.
    let split = if ev.predicted.iter().any(|(s, _)| s == "test") {
        "test"
    } else {
        "valid"
    };
    let predictions = ev
        .predicted
        .iter()
        .filter(|(s, _)| s == split)
        .take(exp.report.images)
        .map(|(s, id)| {
            let d = eval_dir.join("predictions").join(s);
            PredictionImage {
                id: id.clone(),
                overlay_png: d.join(format!("{id}_overlay.png")),
                mask_png: d.join(format!("{id}_mask.png")),
                prob_png: d.join(format!("{id}_prob.png")),
            }
        })
        .collect();
    let t = &exp.train;
    let (arch, backbone) = match exp.model.arch {
        Arch::Deeplabv3 => (
            "DeepLabV3".to_string(),
            exp.model.backbone.as_str().to_string(),
        ),
        Arch::Unet => (
            "U-Net".to_string(),
            format!(
                "widths {}",
                exp.model
                    .widths
                    .iter()
                    .map(|w| w.to_string())
                    .collect::<Vec<_>>()
                    .join("/")
            ),
        ),
    };
    let (unit, epochs, best_epoch) = if t.steps > 0 {
        let best_step = ts
            .history
            .iter()
            .find(|r| r.epoch == ts.best_epoch)
            .map_or(0, |r| r.step);
        (TrainUnit::Step, ts.steps, best_step)
    } else {
        (TrainUnit::Epoch, ts.periods, ts.best_epoch)
    };
    Ok(ExperimentSummary {
        name: exp.name.clone(),
        description: exp.description.clone(),
        arch,
        backbone,
        imgsz: if t.crop > 0 {
            format!("native, crops {}", t.crop)
        } else {
            t.imgsz.to_string()
        },
        unit,
        epochs,
        best_epoch,
        best_valid_miou: ts.best_valid_miou,
        best_valid_dice: ts.best_valid_dice,
        history: ts.history,
        eval,
        train_seconds: ts.train_seconds,
        peak_rss_mib: ts.peak_rss_mib,
        param_count: ts.param_count as u64,
        device: ts.device,
        predictions,
        // TODO(lead): use `ctx.params` (the params the pipeline declares for this stage) once
        // StageCtx::params lands; until then every section of the experiment.
        config: serde_json::from_value(serde_json::to_value(exp)?)?,
    })
}

/// The comparison report of experiments already run: `reports/<name>/`, through the cache.
/// `report_keys` are the keys of each experiment's `report` stage, in order.
pub fn compare(
    env: &Env,
    name: &str,
    exps: &[(String, String)],
    out_root: &Path,
) -> Result<(String, bool)> {
    if exps.is_empty() {
        bail!("no experiment to compare");
    }
    let upstream: std::collections::BTreeMap<String, String> =
        exps.iter().map(|(n, k)| (n.clone(), k.clone())).collect();
    let mut params = std::collections::BTreeMap::new();
    params.insert("name".to_string(), serde_json::json!(name));
    params.insert(
        "order".to_string(),
        serde_json::json!(exps.iter().map(|(n, _)| n).collect::<Vec<_>>()),
    );
    let key = crate::pipeline::runner::stage_key("compare", "compare", 1, &params, &upstream, "");
    let dest = out_root.join(name);
    let stamp = dest.join(".driveline-key");
    let up_to_date = |k: &str| fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == k);
    let mut ran = false;
    if env.cache.lookup(&key).is_none() {
        let _lock = env
            .cache
            .lock(&key, || eprintln!("  compare: waiting for another process"))?;
        if env.cache.lookup(&key).is_none() {
            let work = env.cache.work_dir(&key);
            if work.exists() {
                fs::remove_dir_all(&work)?;
            }
            fs::create_dir_all(&work)?;
            let t0 = std::time::Instant::now();
            let mut summaries = Vec::new();
            for (n, k) in exps {
                let p = env.cache.object_dir(k).join(SUMMARY);
                let s: ExperimentSummary = serde_json::from_str(
                    &fs::read_to_string(&p)
                        .with_context(|| format!("cannot read {}", p.display()))?,
                )
                .with_context(|| format!("malformed report summary of `{n}`"))?;
                summaries.push(s);
            }
            let title = format!("driveline report: {name}");
            report::render_comparison(&title, &summaries, &work)?;
            env.cache.publish(
                &key,
                Manifest {
                    stage: "compare".into(),
                    kind: "compare".into(),
                    version: 1,
                    key: key.clone(),
                    params,
                    upstream,
                    data_hash: String::new(),
                    seconds: t0.elapsed().as_secs_f64(),
                    computed_for: name.to_string(),
                    files: Default::default(),
                },
            )?;
            ran = true;
        }
    }
    if !up_to_date(&key) {
        install(&env.cache.object_dir(&key), &dest, &key)?;
        ran = true;
    }
    Ok((key, ran))
}

/// Copy a published comparison to `dest` (a real folder, so it can be opened, moved, or
/// committed), replacing the previous one atomically.
fn install(src: &Path, dest: &Path, key: &str) -> Result<()> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent)?;
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        dest.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    copy_dir(src, &tmp)?;
    fs::remove_file(tmp.join(crate::pipeline::cache::MANIFEST)).ok();
    fs::write(tmp.join(".driveline-key"), format!("{key}\n"))?;
    if dest.exists() {
        let old = parent.join(format!(".old-{}", std::process::id()));
        fs::rename(dest, &old)?;
        fs::rename(&tmp, dest)?;
        fs::remove_dir_all(&old).ok();
    } else {
        fs::rename(&tmp, dest)?;
    }
    Ok(())
}

fn copy_dir(src: &Path, dst: &Path) -> Result<()> {
    fs::create_dir_all(dst)?;
    for e in fs::read_dir(src).with_context(|| format!("cannot list {}", src.display()))? {
        let e = e?;
        let to: PathBuf = dst.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &to)?;
        } else {
            fs::copy(e.path(), &to)
                .with_context(|| format!("cannot copy {}", e.path().display()))?;
        }
    }
    Ok(())
}
