//! `driveline`: run retinal-vessel segmentation experiments declared in TOML files.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use driveline::config::{self, Loaded};
use driveline::pipeline::runner::{self, ExperimentReport};
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
}

#[derive(Args)]
struct RunArgs {
    experiments: Vec<PathBuf>,
    /// Override a key: --set train.lr=3e-4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
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
}

#[derive(Args)]
struct StatusArgs {
    experiments: Vec<PathBuf>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ReportArgs {
    experiments: Vec<PathBuf>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Report name: the folder under --out.
    #[arg(long, default_value = "comparison")]
    name: String,
    /// Where reports go (default: <project>/reports).
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    json: bool,
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
    /// Vessel probability threshold for the mask.
    #[arg(long, default_value_t = 0.5)]
    threshold: f32,
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
        /// TF32 matrix products on CUDA (loss tolerance 1e-2 instead of 1e-3).
        #[arg(long)]
        tf32: bool,
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
    };
    match cli.cmd {
        Cmd::Run(a) => cmd_run(&g, a),
        Cmd::Status(a) => cmd_status(&g, a),
        Cmd::Report(a) => cmd_report(&g, a),
        Cmd::Bench { what, json } => cmd_bench(&g, what, json),
        Cmd::Infer(a) => cmd_infer(a),
        Cmd::Dag(a) => cmd_dag(a),
    }
}

/// Options every subcommand shares.
struct Global {
    cache_dir: Option<PathBuf>,
}

impl Global {
    /// Where the experiments' project lives and its cache.
    fn env(&self, experiments: &[PathBuf]) -> Result<Env> {
        Env::new(&project_root(experiments), self.cache_dir.as_deref())
    }
}

/// `driveline run`: run the stale stages.
fn cmd_run(g: &Global, a: RunArgs) -> Result<()> {
    let exps = load_all(&a.experiments, &a.sets)?;
    let env = g.env(&a.experiments)?;
    let opts = RunOptions {
        until: a.until,
        force: a.force,
        dry_run: a.dry_run,
        quiet: a.json,
    };
    let reports = run_all(&env, &exps, &opts)?;
    if a.json {
        print_json(&reports)?;
    }
    Ok(())
}

/// `driveline status`: fresh/stale per stage and why; runs nothing.
fn cmd_status(g: &Global, a: StatusArgs) -> Result<()> {
    let exps = load_all(&a.experiments, &a.sets)?;
    let env = g.env(&a.experiments)?;
    let mut reports = Vec::new();
    for l in &exps {
        let pipeline = Pipeline::load(&l.exp.pipeline, &env.project_root)?;
        let planned = runner::plan(&env, l, &pipeline)?;
        if !a.json {
            println!("{} ({})", l.exp.name, pipeline.name);
        }
        let mut stages = Vec::new();
        for p in planned {
            if !a.json {
                match &p.stale {
                    None => println!("  {}: fresh ({})", p.name, &p.key[..12]),
                    Some(r) => println!("  {}: stale ({r})", p.name),
                }
            }
            stages.push(runner::StageReport {
                name: p.name,
                status: if p.stale.is_some() { "stale" } else { "fresh" }.into(),
                key: p.key,
                seconds: 0.0,
                reason: p.stale,
                role: String::new(),
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
    let exps = load_all(&a.experiments, &a.sets)?;
    let env = g.env(&a.experiments)?;
    let opts = RunOptions {
        quiet: a.json,
        ..RunOptions::default()
    };
    let reports = run_all(&env, &exps, &opts)?;
    let mut keys = Vec::new();
    for r in &reports {
        let Some(st) = r.stages.iter().find(|s| s.role == "report") else {
            bail!("experiment `{}`: its pipeline has no report stage", r.name);
        };
        keys.push((r.name.clone(), st.key.clone()));
    }
    let out_root = a.out.unwrap_or_else(|| env.project_root.join("reports"));
    let t0 = std::time::Instant::now();
    let (key, ran) = driveline::stages::report::compare(&env, &name, &keys, &out_root)?;
    let dest = out_root.join(&name);
    if a.json {
        let v = serde_json::json!({
            "experiments": reports,
            "report": {"name": name, "status": if ran {"ran"} else {"cached"}, "key": key,
                       "seconds": t0.elapsed().as_secs_f64(), "path": dest},
        });
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!(
            "report `{name}`: {} → {}",
            if ran { "written" } else { "up to date" },
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
        } => driveline::bench::train_step_with(
            &bench_opts(&device, recompute)?,
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
            &bench_opts(&device, false)?,
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
        } => bench_data(g, experiment, &sets, reps, &bench_opts(&device, false)?)?,
        BenchCmd::Agree {
            arch,
            backbone,
            imgsz,
            batch,
            steps,
            device,
            tf32,
            recompute,
            adam,
        } => {
            return bench_agree(
                &bench_opts(&device, recompute)?,
                (arch, backbone),
                (imgsz, batch, steps.max(1)),
                (tf32, adam),
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
fn bench_opts(device: &str, recompute: bool) -> Result<driveline::bench::BenchOpts> {
    Ok(driveline::bench::BenchOpts {
        device: driveline::model::device::select(device)?,
        recompute,
    })
}

/// `driveline bench agree`: prints the comparison; an error when it fails.
fn bench_agree(
    opts: &driveline::bench::BenchOpts,
    (arch, backbone): (config::Arch, config::Backbone),
    (imgsz, batch, steps): (usize, usize, usize),
    (tf32, adam): (bool, bool),
    json: bool,
) -> Result<()> {
    let r = driveline::bench::agree(opts, arch, backbone, imgsz, batch, steps, tf32, adam)?;
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
    let rep = runner::run(&env, l, &opts, &mut BTreeSet::new())?;
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

fn print_json(reports: &[ExperimentReport]) -> Result<()> {
    println!(
        "{}",
        serde_json::to_string(&serde_json::json!({ "experiments": reports }))?
    );
    Ok(())
}

fn run_all(env: &Env, exps: &[Loaded], opts: &RunOptions) -> Result<Vec<ExperimentReport>> {
    let mut done_now = BTreeSet::new();
    let mut reports = Vec::new();
    for l in exps {
        reports.push(runner::run(env, l, opts, &mut done_now)?);
    }
    Ok(reports)
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

/// Load every experiment (all problems of all files are reported before anything runs).
fn load_all(files: &[PathBuf], sets: &[String]) -> Result<Vec<Loaded>> {
    let root = project_root(files);
    if files.is_empty() {
        let quick = root.join("experiments").join("quick.toml");
        let loaded = if quick.is_file() {
            config::load(&quick, sets, &root)
        } else {
            config::load_str(QUICK, Path::new("<embedded>/quick.toml"), sets, &root)
        };
        return Ok(vec![loaded?]);
    }
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for f in files {
        match config::load(f, sets, &root) {
            Ok(l) => out.push(l),
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
