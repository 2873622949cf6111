//! `driveline`: run retinal-vessel segmentation experiments declared in TOML files.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use driveline::config::{self, Loaded};
use driveline::pipeline::runner::{self, ExperimentReport};
use driveline::pipeline::schedule::Plan;
use driveline::pipeline::{cache, executor, gc};
use driveline::pipeline::{Env, Pipeline, RunOptions};

/// The embedded default experiment: synthetic data and a small model, end to end in minutes.
const QUICK: &str = include_str!("../experiments/quick.toml");

#[derive(Parser)]
#[command(
    name = "driveline",
    version,
    about = "Retinal-vessel segmentation experiments from declarative TOML files"
)]
struct Cli {
    /// Cache directory (default: <project>/.driveline/cache).
    #[arg(long, global = true, env = "DRIVELINE_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Worker threads (default: every core; RAYON_NUM_THREADS is respected too).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the stale stages of experiments (default: the embedded quick experiment).
    Run(RunArgs),
    /// Show fresh/stale per stage, with the reason; runs nothing.
    Status(StatusArgs),
    /// Run experiments (what is stale) and write their comparison report to reports/<name>/.
    Report(ReportArgs),
    /// Time training steps, inference or data loading on this machine.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
        /// Print one JSON object per benchmark.
        #[arg(long, global = true)]
        json: bool,
    },
    /// Segment images with a trained checkpoint: <stem>_prob.png, <stem>_mask.png and
    /// <stem>_overlay.png per image, at the image's own resolution.
    Infer(InferArgs),
    /// Print an experiment's stage graph.
    Dag(DagArgs),
    /// One row per experiment (under runs/, or named): stage states, the params that differ,
    /// metrics. Reads the cache; never trains.
    Runs(RunsArgs),
    /// The params that differ between two experiments and every metric with its delta.
    Diff(DiffArgs),
    /// Remove cached outputs that no runs/ link, installed report or --keep experiment reaches.
    Gc(GcArgs),
    /// Compute one planned stage (what local children and Slurm jobs run).
    #[command(hide = true)]
    ExecStage {
        #[arg(long)]
        spec: PathBuf,
        #[arg(long)]
        result: PathBuf,
    },
    /// Inspect the cache.
    Cache {
        #[command(subcommand)]
        what: CacheCmd,
    },
}

/// Sweeps from the command line (and limits on those in files).
#[derive(Args, Clone)]
struct SweepArgs {
    /// Sweep a key over values: --sweep train.lr=1e-4,3e-4 (repeatable; one experiment per
    /// point of the grid, or of the zipped lists with --sweep-mode zip).
    #[arg(long = "sweep", value_name = "KEY=V1,V2,...")]
    sweeps: Vec<String>,
    /// How sweep lists combine: grid (every combination) or zip (i-th values together).
    /// Replaces the file's `[sweep] mode`.
    #[arg(long, value_name = "grid|zip")]
    sweep_mode: Option<config::SweepMode>,
    /// Most points a sweep may expand to.
    #[arg(long, default_value_t = config::sweep::MAX_POINTS)]
    max_points: usize,
}

impl Default for SweepArgs {
    fn default() -> Self {
        SweepArgs {
            sweeps: Vec::new(),
            sweep_mode: None,
            max_points: config::sweep::MAX_POINTS,
        }
    }
}

#[derive(Args)]
struct RunsArgs {
    /// Experiment or sweep files (default: every experiment under runs/).
    experiments: Vec<PathBuf>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    #[command(flatten)]
    sweep: SweepArgs,
    /// Sort by a metric (best first: miou, valid_f1, valid_auc, test_f1, test_auc; train_time
    /// shortest first), a param (train.lr, or its last segment) or name.
    #[arg(long, value_name = "METRIC")]
    sort: Option<String>,
    /// Print JSON.
    #[arg(long, conflicts_with = "csv")]
    json: bool,
    /// Print CSV.
    #[arg(long)]
    csv: bool,
}

#[derive(Args)]
struct DiffArgs {
    /// An experiment file, or the name of an experiment under runs/.
    a: String,
    /// An experiment file, or the name of an experiment under runs/.
    b: String,
    /// Overrides for experiment files given as A or B.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct GcArgs {
    /// Show what would be removed; remove nothing.
    #[arg(long)]
    dry_run: bool,
    /// Also keep every stage of these experiments (as they are planned now).
    #[arg(long, value_name = "EXP.toml", num_args = 1..)]
    keep: Vec<PathBuf>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
}

#[derive(Subcommand)]
enum CacheCmd {
    /// Re-hash published outputs against their manifests; damaged ones are quarantined.
    Verify(VerifyArgs),
}

#[derive(Args)]
struct VerifyArgs {
    /// The experiments whose outputs to check (default: what runs/ and reports/ refer to).
    experiments: Vec<PathBuf>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Check every object in the cache.
    #[arg(long)]
    all: bool,
}

#[derive(Args)]
struct RunArgs {
    experiments: Vec<PathBuf>,
    /// Override a key: --set train.lr=3e-4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    #[command(flatten)]
    sweep: SweepArgs,
    /// Stop after this stage.
    #[arg(long)]
    until: Option<String>,
    /// Re-run this stage and everything downstream even if cached.
    #[arg(long)]
    force: Option<String>,
    /// Show what would run, run nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    exec: ExecArgs,
}

/// Where stages run.
#[derive(Args)]
struct ExecArgs {
    /// `local` (this machine) or `slurm` (each stage a batch job on the cluster).
    #[arg(long, env = "DRIVELINE_EXECUTOR", default_value = "local")]
    executor: String,
    /// The most stages running at once (local executor; Slurm queues what it cannot run).
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// Slurm: seconds between two status polls (one `squeue` call each).
    #[arg(long, env = "DRIVELINE_POLL_INTERVAL", default_value_t = 5.0)]
    poll_interval: f64,
    /// Slurm: leave the submitted jobs running when the driver is interrupted.
    #[arg(long)]
    detach: bool,
}

#[derive(Args)]
struct StatusArgs {
    experiments: Vec<PathBuf>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    #[command(flatten)]
    sweep: SweepArgs,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ReportArgs {
    experiments: Vec<PathBuf>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    #[command(flatten)]
    sweep: SweepArgs,
    /// Report name: the folder under --out.
    #[arg(long, default_value = "comparison")]
    name: String,
    /// Where reports go (default: <project>/reports).
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    exec: ExecArgs,
}

#[derive(Args)]
struct InferArgs {
    /// Checkpoint written by the train stage, e.g. runs/quick/train/best_model_iou.safetensors.
    #[arg(long)]
    model: PathBuf,
    /// An image, or a folder of images (tif, tiff, png, jpg, jpeg, gif, bmp).
    #[arg(long)]
    input: PathBuf,
    /// Resize images to this square side (default: as the checkpoint was trained).
    #[arg(long)]
    imgsz: Option<u32>,
    /// Output folder (default: runs/infer/<experiment>/<stem>/ for runs/<experiment>/train/<stem>.safetensors, else runs/infer/<stem>/).
    #[arg(long)]
    out: Option<PathBuf>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Test-time augmentation: none, flip (the default when the flag has no value: the
    /// image and its mirror) or dihedral (the 8 rotations/mirrors).
    #[arg(long, value_name = "KIND", num_args = 0..=1, default_value = "none", default_missing_value = "flip")]
    tta: driveline::config::Tta,
    /// Vessel probability threshold for the mask [default: the one stored in the checkpoint
    /// by train.pick_threshold, else 0.5].
    #[arg(long)]
    threshold: Option<f32>,
    /// Native-resolution models: predict in tiles of this side (0: whole image).
    #[arg(long, default_value_t = 0)]
    tile: u32,
    /// Overlap between tiles.
    #[arg(long, default_value_t = 64)]
    overlap: u32,
    /// No progress output.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Args)]
struct DagArgs {
    experiment: Option<PathBuf>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Graphviz output.
    #[arg(long)]
    dot: bool,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Training steps (forward, loss, backward, Adam) on random data.
    TrainStep {
        #[arg(long, default_value = "deeplabv3", value_parser = parse_arch)]
        arch: config::Arch,
        #[arg(long, default_value = "resnet50", value_parser = parse_backbone)]
        backbone: config::Backbone,
        #[arg(long, default_value_t = 256)]
        imgsz: usize,
        #[arg(long, default_value_t = 2)]
        batch: usize,
        #[arg(long, default_value_t = 5)]
        steps: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Training loss: `ce` (the DeepLabV3 reference) or `ce+dice` (the U-Net reference).
        #[arg(long, default_value = "ce", value_parser = parse_loss)]
        loss: config::schema::Loss,
        /// `cpu`, `cuda`, `cuda:N` or `auto` (GPU peak memory is reported beside the RSS).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Activation recomputation per ResNet stage (`train.recompute`).
        #[arg(long)]
        recompute: bool,
        /// `train.precision`: `f32`, or on CUDA `tf32` or `bf16` (on the CPU, bf16 is emulated
        /// on the generic path: for trying commands, not for timing).
        #[arg(long, default_value = "f32", value_parser = parse_precision)]
        precision: config::Precision,
    },
    /// Whole-image inference of one image (565×584 random, or --image) at --imgsz.
    Infer {
        #[arg(long, default_value = "deeplabv3", value_parser = parse_arch)]
        arch: config::Arch,
        #[arg(long, default_value = "resnet50", value_parser = parse_backbone)]
        backbone: config::Backbone,
        #[arg(long, default_value_t = 768)]
        imgsz: u32,
        #[arg(long)]
        image: Option<PathBuf>,
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// `cpu`, `cuda`, `cuda:N` or `auto`.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// One epoch of batch building (augmentation, normalisation) for an experiment's data.
    Data {
        experiment: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// `cpu`, `cuda`, `cuda:N` or `auto`: batches are built on the host for every device
        /// and then copied to it.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// The same seed and batch trained for a few steps on the CPU custom ops and on --device
    /// (on `cpu`: the device-generic path a GPU runs): loss difference and prediction
    /// agreement. Fails (exit status 1) outside the tolerances.
    Agree {
        #[arg(long, default_value = "deeplabv3", value_parser = parse_arch)]
        arch: config::Arch,
        #[arg(long, default_value = "resnet50", value_parser = parse_backbone)]
        backbone: config::Backbone,
        #[arg(long, default_value_t = 128)]
        imgsz: usize,
        #[arg(long, default_value_t = 2)]
        batch: usize,
        #[arg(long, default_value_t = 3)]
        steps: usize,
        #[arg(long, default_value = "cuda")]
        device: String,
        /// The device side's `train.precision`: `f32`; on CUDA `tf32` (loss tolerance 1e-2
        /// instead of 1e-3) or `bf16` (see `bench::BF16_LOSS_TOLERANCE`; emulated on the CPU).
        #[arg(long, default_value = "f32", value_parser = parse_precision)]
        precision: config::Precision,
        /// Activation recomputation per ResNet stage on the device side.
        #[arg(long)]
        recompute: bool,
        /// Adam (lr 1e-4) instead of SGD (lr 0.01, momentum 0.9): see `bench::agree`.
        #[arg(long)]
        adam: bool,
    },
}

fn parse_arch(s: &str) -> Result<config::Arch, String> {
    serde_json::from_value(serde_json::Value::String(s.into()))
        .map_err(|_| format!("unknown arch {s:?} (deeplabv3, unet)"))
}

fn parse_precision(s: &str) -> Result<config::Precision, String> {
    serde_json::from_value(serde_json::Value::String(s.into()))
        .map_err(|_| format!("unknown precision {s:?} (f32, tf32, bf16)"))
}

fn parse_loss(s: &str) -> Result<config::schema::Loss, String> {
    serde_json::from_value(serde_json::Value::String(s.into()))
        .map_err(|_| format!("unknown loss {s:?} (ce, ce+dice)"))
}

fn parse_backbone(s: &str) -> Result<config::Backbone, String> {
    serde_json::from_value(serde_json::Value::String(s.into()))
        .map_err(|_| format!("unknown backbone {s:?} (resnet18, resnet34, resnet50, resnet101)"))
}

fn main() -> ExitCode {
    // Candle 0.11 runs element-wise ops on its own pool of spin-waiting threads, beside the
    // rayon pool that our convolutions, GEMMs and data loading use: two pools on the same
    // cores oversubscribe them (measured 1.6x slower training steps on 2 cores). Unless the
    // user chose otherwise, element-wise ops run on the calling thread and rayon owns the cores.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    tune_allocator();
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Keeps freed tensor buffers in the process instead of handing them back to the kernel.
///
/// glibc serves allocations above its mmap threshold (dynamic, starting at 128 KiB) with fresh
/// `mmap`s and returns freed memory at the heap top once it exceeds the trim threshold; a
/// training step allocates and frees hundreds of multi-MiB tensors, so every one of them was
/// page-faulted and zeroed by the kernel again (16 % of a U-Net step in `perf`). With a 32 MiB
/// mmap threshold (glibc's maximum) and no trimming, freed buffers are reused: U-Net step at
/// 96 px batch 16 measured 2.13 s → 1.49 s (dev build), for a few MiB more peak RSS.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before any other thread
    // exists. A rejected value leaves glibc's default in place (harmless).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn real_main(cli: Cli) -> Result<()> {
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("cannot configure the thread pool")?;
    }
    let g = Global {
        cache_dir: cli.cache_dir,
        threads: cli.threads,
    };
    match cli.cmd {
        Cmd::Run(a) => cmd_run(&g, a),
        Cmd::Status(a) => cmd_status(&g, a),
        Cmd::Report(a) => cmd_report(&g, a),
        Cmd::Bench { what, json } => cmd_bench(&g, what, json),
        Cmd::Infer(a) => cmd_infer(a),
        Cmd::Dag(a) => cmd_dag(a),
        Cmd::Runs(a) => cmd_runs(&g, a),
        Cmd::Diff(a) => cmd_diff(&g, a),
        Cmd::Gc(a) => cmd_gc(&g, a),
        Cmd::ExecStage { spec, result } => cmd_exec_stage(&g, &spec, &result),
        Cmd::Cache {
            what: CacheCmd::Verify(a),
        } => cmd_cache_verify(&g, a),
    }
}

/// Options every subcommand shares.
struct Global {
    cache_dir: Option<PathBuf>,
    threads: Option<usize>,
}

impl Global {
    /// Where the experiments' project lives and its cache.
    fn env(&self, experiments: &[PathBuf]) -> Result<Env> {
        let mut env = Env::new(&project_root(experiments), self.cache_dir.as_deref())?;
        // Jobs and child processes find the cache by this path, from any directory.
        if let Ok(abs) = env.cache.root.canonicalize() {
            env.cache.root = abs;
        }
        Ok(env)
    }

    fn executor(
        &self,
        env: &Env,
        a: &ExecArgs,
        opts: &RunOptions,
    ) -> Result<Box<dyn executor::Executor>> {
        executor::select(
            env,
            &executor::ExecutorOptions {
                kind: a.executor.clone(),
                jobs: a.jobs,
                threads: self.threads,
                poll_interval: a.poll_interval,
                detach: a.detach,
            },
            opts,
        )
    }
}

/// `driveline run`: run the stale stages.
fn cmd_run(g: &Global, a: RunArgs) -> Result<()> {
    let exps = load_sweep(&a.experiments, &a.sets, &a.sweep)?;
    let env = g.env(&a.experiments)?;
    let opts = RunOptions {
        until: a.until,
        force: a.force,
        dry_run: a.dry_run,
        quiet: a.json,
    };
    let plan = Plan::build(&env, &exps, &opts)?;
    let mut exec = g.executor(&env, &a.exec, &opts)?;
    let reports = plan.run(&env, exec.as_mut(), &opts)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string(
                &serde_json::json!({ "experiments": reports, "executor": exec.stats() })
            )?
        );
    }
    Ok(())
}

/// `driveline status`: fresh/stale per stage and why, and the Slurm job of each stage queued
/// or running; runs nothing (a damaged output is moved to quarantine, as by any lookup).
fn cmd_status(g: &Global, a: StatusArgs) -> Result<()> {
    let exps = load_sweep(&a.experiments, &a.sets, &a.sweep)?;
    let env = g.env(&a.experiments)?;
    let mut planned = Vec::new();
    for l in &exps {
        let pipeline = Pipeline::load(&l.exp.pipeline, &env.project_root)?;
        planned.push((l, pipeline.name.clone(), runner::plan(&env, l, &pipeline)?));
    }
    let stale: BTreeSet<String> = planned
        .iter()
        .flat_map(|(_, _, ps)| {
            ps.iter()
                .filter(|p| p.stale.is_some())
                .map(|p| p.key.clone())
        })
        .collect();
    let jobs = executor::slurm::live_jobs(&env, &stale);
    let mut reports = Vec::new();
    for (l, pipeline, ps) in planned {
        if !a.json {
            println!("{} ({pipeline})", l.exp.name);
        }
        let mut stages = Vec::new();
        for p in ps {
            let job = jobs.get(&p.key);
            if !a.json {
                match (&p.stale, job) {
                    (None, _) => println!("  {}: fresh ({})", p.name, cache::short(&p.key)),
                    (Some(r), Some((id, state))) => println!(
                        "  {}: {} in Slurm job {id} ({r})",
                        p.name,
                        state.to_lowercase()
                    ),
                    (Some(r), None) => println!("  {}: stale ({r})", p.name),
                }
            }
            stages.push(runner::StageReport {
                name: p.name,
                status: match (&p.stale, job) {
                    (None, _) => "fresh".into(),
                    (Some(_), Some((_, state))) => state.to_lowercase(),
                    (Some(_), None) => "stale".into(),
                },
                key: p.key,
                seconds: 0.0,
                reason: p.stale,
                role: String::new(),
                started_at: None,
                finished_at: None,
                job: job.map(|(id, _)| id.clone()),
            });
        }
        reports.push(ExperimentReport {
            name: l.exp.name.clone(),
            stages,
        });
    }
    if a.json {
        print_json(&reports)?;
    }
    Ok(())
}

/// `driveline report`: run what is stale, then the comparison report in `reports/<name>/`.
fn cmd_report(g: &Global, a: ReportArgs) -> Result<()> {
    if a.experiments.is_empty() {
        bail!("name the experiments to compare, e.g. driveline report experiments/r50_512.toml experiments/r101_640.toml");
    }
    let name = a.name;
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        bail!("--name {name:?}: a plain folder name is needed");
    }
    let exps = load_sweep(&a.experiments, &a.sets, &a.sweep)?;
    let env = g.env(&a.experiments)?;
    let opts = RunOptions {
        quiet: a.json,
        ..RunOptions::default()
    };
    let out_root = a.out.unwrap_or_else(|| env.project_root.join("reports"));
    let mut plan = Plan::build(&env, &exps, &opts)?;
    plan.add_compare(&env, &name, &out_root)?;
    let mut exec = g.executor(&env, &a.exec, &opts)?;
    let mut reports = plan.run(&env, exec.as_mut(), &opts)?;
    let st = reports
        .pop()
        .and_then(|r| r.stages.into_iter().next())
        .context("the comparison was not planned")?;
    let dest = out_root.join(&name);
    let written = runner::install_report(&env, &st.key, &dest)?;
    if a.json {
        let v = serde_json::json!({
            "executor": exec.stats(),
            "experiments": reports,
            "report": {"name": name, "status": st.status, "key": st.key,
                       "seconds": st.seconds, "path": dest, "started_at": st.started_at,
                       "finished_at": st.finished_at, "job": st.job},
        });
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!(
            "report `{name}`: {} → {}",
            if written { "written" } else { "up to date" },
            dest.join("index.html").display()
        );
    }
    Ok(())
}

/// `driveline bench ...`: one benchmark, human-readable or JSON.
fn cmd_bench(g: &Global, what: BenchCmd, json: bool) -> Result<()> {
    let r = match what {
        BenchCmd::TrainStep {
            arch,
            backbone,
            imgsz,
            batch,
            steps,
            warmup,
            loss,
            device,
            recompute,
            precision,
        } => driveline::bench::train_step_with(
            &bench_opts(&device, recompute, precision)?,
            arch,
            backbone,
            imgsz,
            batch,
            steps.max(1),
            warmup,
            loss,
        )?,
        BenchCmd::Infer {
            arch,
            backbone,
            imgsz,
            image,
            steps,
            device,
        } => driveline::bench::infer_with(
            &bench_opts(&device, false, config::Precision::F32)?,
            arch,
            backbone,
            imgsz,
            image.as_deref(),
            steps.max(1),
        )?,
        BenchCmd::Data {
            experiment,
            sets,
            reps,
            device,
        } => bench_data(
            g,
            experiment,
            &sets,
            reps,
            &bench_opts(&device, false, config::Precision::F32)?,
        )?,
        BenchCmd::Agree {
            arch,
            backbone,
            imgsz,
            batch,
            steps,
            device,
            precision,
            recompute,
            adam,
        } => {
            return bench_agree(
                &bench_opts(&device, recompute, precision)?,
                (arch, backbone),
                (imgsz, batch, steps.max(1)),
                adam,
                json,
            )
        }
    };
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!("{}", r.human());
    }
    Ok(())
}

/// The device and options of a model benchmark.
fn bench_opts(
    device: &str,
    recompute: bool,
    precision: config::Precision,
) -> Result<driveline::bench::BenchOpts> {
    Ok(driveline::bench::BenchOpts {
        device: driveline::model::device::select(device)?,
        recompute,
        precision,
    })
}

/// `driveline bench agree`: prints the comparison; an error when it fails.
fn bench_agree(
    opts: &driveline::bench::BenchOpts,
    (arch, backbone): (config::Arch, config::Backbone),
    (imgsz, batch, steps): (usize, usize, usize),
    adam: bool,
    json: bool,
) -> Result<()> {
    let r = driveline::bench::agree(opts, arch, backbone, imgsz, batch, steps, adam)?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!("{}", r.human());
    }
    if !r.pass_vs_f64 {
        bail!(
            "{} does not agree with the CPU: its losses are {:.2e} from float64 (the CPU's float32 {:.2e}, tolerance {:.0e}), {:.4} % of pixels agree (at least {:.1} % needed)",
            r.device,
            r.device_f32_error,
            r.cpu_f32_error,
            r.loss_tolerance,
            100.0 * r.pixel_agreement,
            100.0 * r.min_pixel_agreement
        );
    }
    Ok(())
}

/// `driveline bench data`: the experiment's stages up to preprocess, then epochs of batches.
fn bench_data(
    g: &Global,
    experiment: PathBuf,
    sets: &[String],
    reps: usize,
    bench: &driveline::bench::BenchOpts,
) -> Result<driveline::bench::BenchResult> {
    let files = vec![experiment];
    let exps = load_all(&files, sets)?;
    let env = g.env(&files)?;
    let l = &exps[0];
    let opts = RunOptions {
        until: Some("preprocess".into()),
        quiet: true,
        ..RunOptions::default()
    };
    let rep = runner::run(&env, l, &opts)?;
    let pre = rep
        .stages
        .iter()
        .find(|s| s.role == "preprocess")
        .context("the pipeline has no preprocess stage")?;
    let ds = driveline::stages::preprocess::load(&env.cache.object_dir(&pre.key))?;
    driveline::bench::data_epoch_with(bench, &l.exp, &ds, reps.max(1))
}

/// `driveline infer`: segment new images with a trained checkpoint.
fn cmd_infer(a: InferArgs) -> Result<()> {
    let summary = driveline::infer::run(&driveline::infer::InferOptions {
        model: a.model,
        input: a.input,
        out: a.out,
        imgsz: a.imgsz,
        device: a.device,
        tta: a.tta,
        threshold: a.threshold,
        tile: a.tile,
        overlap: a.overlap,
        quiet: a.quiet,
    })?;
    println!(
        "{} image(s) → {}{}",
        summary.images.len(),
        summary.out.display(),
        match summary.skipped.len() {
            0 => String::new(),
            n => format!(" ({n} non-image file(s) skipped)"),
        }
    );
    Ok(())
}

/// `driveline dag`: print an experiment's stage graph.
fn cmd_dag(a: DagArgs) -> Result<()> {
    let files: Vec<PathBuf> = a.experiment.into_iter().collect();
    let exps = load_all(&files, &a.sets)?;
    let root = project_root(&files);
    for l in &exps {
        let p = Pipeline::load(&l.exp.pipeline, &root)?;
        if a.dot {
            print!("{}", p.to_dot());
            continue;
        }
        println!(
            "{}: pipeline `{}` ({})",
            l.exp.name,
            p.name,
            p.file.display()
        );
        for s in &p.stages {
            let needs = if s.needs.is_empty() {
                String::new()
            } else {
                format!(" ← {}", s.needs.join(", "))
            };
            println!("  {} [{}]{needs}", s.name, s.kind());
            if !s.params.is_empty() {
                println!("      params: {}", s.params.join(", "));
            }
        }
    }
    Ok(())
}

/// `driveline runs`: the experiment table, from the cache.
fn cmd_runs(g: &Global, a: RunsArgs) -> Result<()> {
    let env = g.env(&a.experiments)?;
    let rows = if a.experiments.is_empty() {
        if !a.sets.is_empty() || !a.sweep.sweeps.is_empty() {
            bail!("--set and --sweep apply to experiment files: name them, e.g. driveline runs experiments/quick.toml --sweep train.lr=1e-4,3e-4");
        }
        driveline::runs::from_runs_dir(&env)?
    } else {
        let exps = load_sweep(&a.experiments, &a.sets, &a.sweep)?;
        driveline::runs::from_experiments(&env, &exps)?
    };
    let mut table = driveline::runs::Table::new(rows);
    if let Some(key) = &a.sort {
        table.sort(key)?;
    }
    if a.json {
        println!("{}", serde_json::to_string(&table.to_json())?);
    } else if a.csv {
        print!("{}", table.to_csv()?);
    } else {
        print!("{}", table.to_text());
    }
    Ok(())
}

/// `driveline diff A B`: what differs between two experiments (files or names under runs/).
fn cmd_diff(g: &Global, a: DiffArgs) -> Result<()> {
    let files: Vec<PathBuf> = [&a.a, &a.b]
        .into_iter()
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .collect();
    let env = g.env(&files)?;
    let row = |arg: &str| -> Result<driveline::runs::Row> {
        let path = Path::new(arg);
        if path.is_file() {
            let exps = load_all(&[path.to_path_buf()], &a.sets)?;
            if exps.len() != 1 {
                let names: Vec<&str> = exps.iter().map(|l| l.exp.name.as_str()).collect();
                bail!(
                    "{arg} is a sweep of {} experiments: name one of them (under runs/): {}",
                    exps.len(),
                    names.join(", ")
                );
            }
            Ok(driveline::runs::from_experiments(&env, &exps)?.remove(0))
        } else if arg.ends_with(".toml") {
            bail!("experiment file {arg} not found");
        } else {
            driveline::runs::from_run(&env, arg).with_context(|| {
                format!("`{arg}` is neither an experiment file nor an experiment under runs/")
            })
        }
    };
    let d = driveline::runs::diff(row(&a.a)?, row(&a.b)?);
    if a.json {
        println!("{}", serde_json::to_string(&d.to_json())?);
    } else {
        print!("{}", d.to_text());
    }
    Ok(())
}

/// The keys of every stage of `files`' experiments, as planned now.
fn planned_keys(env: &Env, files: &[PathBuf], sets: &[String]) -> Result<BTreeSet<String>> {
    let mut keys = BTreeSet::new();
    if files.is_empty() {
        return Ok(keys);
    }
    for l in load_all(files, sets)? {
        let pipeline = Pipeline::load(&l.exp.pipeline, &env.project_root)?;
        keys.extend(runner::plan(env, &l, &pipeline)?.into_iter().map(|p| p.key));
    }
    Ok(keys)
}

/// `driveline exec-stage` (hidden): compute one planned stage; what local children and Slurm
/// jobs run.
fn cmd_exec_stage(g: &Global, spec: &Path, result: &Path) -> Result<()> {
    let env = g.env(&[])?;
    executor::exec_stage(&env, spec, result)
}

/// `driveline gc`: remove what nothing reaches.
fn cmd_gc(g: &Global, a: GcArgs) -> Result<()> {
    let env = g.env(&a.keep)?;
    let mut roots = gc::referenced(&env)?;
    roots.extend(planned_keys(&env, &a.keep, &a.sets)?);
    let keep = gc::closure(&env.cache, &roots);
    let r = gc::gc(&env.cache, &keep, a.dry_run)?;
    let verb = if a.dry_run { "would remove" } else { "removed" };
    for x in &r.removed {
        let what = match &x.stage {
            Some(s) => format!("{} (stage {s})", x.what),
            None => x.what.to_string(),
        };
        println!(
            "  {verb} {what} {} ({})",
            cache::short(&x.key),
            gc::human_bytes(x.bytes)
        );
    }
    for k in &r.in_use {
        println!("  kept {}: in use by another process", cache::short(k));
    }
    println!(
        "kept {} object(s), {} (reached from runs/, reports/{}); {verb} {} folder(s), {} {}",
        r.kept,
        gc::human_bytes(r.kept_bytes),
        if a.keep.is_empty() { "" } else { " and --keep" },
        r.removed.len(),
        gc::human_bytes(r.freed()),
        if a.dry_run { "would be freed" } else { "freed" },
    );
    if r.quarantine_bytes > 0 {
        println!(
            "quarantined objects: {} in {} (left for inspection; delete by hand)",
            gc::human_bytes(r.quarantine_bytes),
            gc::quarantine_dir(&env.cache).display()
        );
    }
    Ok(())
}

/// `driveline cache verify`: hash published outputs against their manifests.
fn cmd_cache_verify(g: &Global, a: VerifyArgs) -> Result<()> {
    let env = g.env(&a.experiments)?;
    let keys = if a.all {
        env.cache.keys()?.into_iter().collect()
    } else if a.experiments.is_empty() {
        gc::closure(&env.cache, &gc::referenced(&env)?)
    } else {
        planned_keys(&env, &a.experiments, &a.sets)?
    };
    let t0 = std::time::Instant::now();
    let r = gc::verify(&env.cache, &keys);
    for d in &r.damaged {
        println!("BAD {d}");
    }
    for k in &r.missing {
        println!("missing {} (not computed yet)", cache::short(k));
    }
    println!(
        "verified {} object(s), {} in {:.2} s: {} damaged",
        r.good + r.damaged.len(),
        gc::human_bytes(r.bytes),
        t0.elapsed().as_secs_f64(),
        r.damaged.len()
    );
    if !r.damaged.is_empty() {
        bail!(
            "{} damaged object(s) moved to {}; `driveline run` recomputes them",
            r.damaged.len(),
            gc::quarantine_dir(&env.cache).display()
        );
    }
    Ok(())
}

fn print_json(reports: &[ExperimentReport]) -> Result<()> {
    println!(
        "{}",
        serde_json::to_string(&serde_json::json!({ "experiments": reports }))?
    );
    Ok(())
}

/// The project root: the nearest ancestor of the first experiment file that has a
/// `pipelines/` folder; else the working directory.
fn project_root(experiments: &[PathBuf]) -> PathBuf {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    if let Some(first) = experiments.first() {
        let abs = if first.is_absolute() {
            first.clone()
        } else {
            cwd.join(first)
        };
        let mut dir = abs.parent();
        while let Some(d) = dir {
            if d.join("pipelines").is_dir() {
                return d.to_path_buf();
            }
            dir = d.parent();
        }
    }
    cwd
}

/// Load every experiment (all problems of all files are reported before anything runs); the
/// `[sweep]` of a file expands to its points.
fn load_all(files: &[PathBuf], sets: &[String]) -> Result<Vec<Loaded>> {
    load_sweep(files, sets, &SweepArgs::default())
}

/// [`load_all`] with `--sweep` keys added to every file (or to the quick experiment when no
/// file is named).
fn load_sweep(files: &[PathBuf], sets: &[String], sweep: &SweepArgs) -> Result<Vec<Loaded>> {
    let root = project_root(files);
    let opts = config::SweepOptions {
        sweeps: sweep.sweeps.clone(),
        mode: sweep.sweep_mode,
        max_points: sweep.max_points,
    };
    if files.is_empty() {
        let quick = root.join("experiments").join("quick.toml");
        let loaded = if quick.is_file() {
            config::load_points(&quick, sets, &opts, &root)
        } else {
            let name = Path::new("<embedded>/quick.toml");
            config::load_str_points(QUICK, name, sets, &opts, &root)
        };
        return loaded.map_err(|e| anyhow::anyhow!("invalid experiment:\n{e}"));
    }
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for f in files {
        match config::load_points(f, sets, &opts, &root) {
            Ok(l) => out.extend(l),
            Err(e) => errors.push(e.to_string()),
        }
    }
    if !errors.is_empty() {
        bail!("invalid experiment:\n{}", errors.join("\n"));
    }
    let mut names = BTreeSet::new();
    for l in &out {
        if !names.insert(l.exp.name.clone()) {
            bail!("two experiments are named `{}`", l.exp.name);
        }
    }
    Ok(out)
}
