//! Executors: where a planned stage is computed.
//!
//! - [`local::InProcess`] (`--executor local`, `--jobs 1`, the default): in this process,
//!   one stage at a time.
//! - [`local::Processes`] (`--executor local --jobs N`): up to N stages at once, each in a
//!   child `driveline exec-stage`, the cores split between them.
//! - [`slurm::Slurm`] (`--executor slurm`): each stage a Slurm batch job running
//!   `driveline exec-stage` on a compute node against the same (shared) cache directory.
//!
//! Whatever the executor, a stage is computed by `runner::execute`: under its key's lock,
//! into its work folder, published by one atomic rename. So two drivers, or a driver and a
//! job, never compute one key twice, and nothing half-written is ever published.

pub mod local;
pub mod slurm;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::runner::{self, Env, Planned, RunOptions};
use super::schedule::Node;

/// What happened to a node that finished.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    /// `ran`, or `cached` (computed meanwhile by another process).
    pub status: String,
    pub seconds: f64,
    /// Unix time (seconds) when its computation started and ended, where known.
    pub started_at: Option<f64>,
    pub finished_at: Option<f64>,
    /// The Slurm job that computed it.
    pub job: Option<String>,
}

impl Outcome {
    pub fn cached() -> Outcome {
        Outcome {
            status: "cached".into(),
            seconds: 0.0,
            started_at: None,
            finished_at: None,
            job: None,
        }
    }
}

/// Where planned stages run. The scheduler starts a node only when all it needs is published.
pub trait Executor {
    /// How many nodes may run at once.
    fn capacity(&self) -> usize;
    /// Start computing node `idx` (`reason`: why it must run, for messages).
    fn start(&mut self, env: &Env, node: &Node, idx: usize, reason: &str) -> Result<()>;
    /// Wait for started nodes to finish: returns those that did (possibly none, after a poll
    /// interval or an interrupt).
    fn wait(&mut self, env: &Env) -> Result<Vec<(usize, Result<Outcome>)>>;
    /// Stop everything running (Ctrl-C, SIGTERM).
    fn abort(&mut self);
    /// Figures for `--json` (polls, jobs).
    fn stats(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

/// Which executor, from `--executor`, `--jobs` and friends.
#[derive(Debug, Clone)]
pub struct ExecutorOptions {
    pub kind: String,
    pub jobs: usize,
    /// `--threads`: worker threads per stage (default: the cores split between the jobs).
    pub threads: Option<usize>,
    /// Slurm: seconds between two `squeue` calls.
    pub poll_interval: f64,
    /// Slurm: leave the jobs running when the driver is interrupted.
    pub detach: bool,
}

/// Build the executor named by `o` (`local` or `slurm`).
pub fn select(env: &Env, o: &ExecutorOptions, opts: &RunOptions) -> Result<Box<dyn Executor>> {
    match o.kind.as_str() {
        "local" if o.jobs <= 1 => Ok(Box::new(local::InProcess::new(opts.clone()))),
        "local" => Ok(Box::new(local::Processes::new(env, o)?)),
        "slurm" => {
            install_signal_handlers();
            Ok(Box::new(slurm::Slurm::new(env, o)?))
        }
        other => anyhow::bail!("--executor {other:?}: expected `local` or `slurm`"),
    }
}

/// What a child (`driveline exec-stage`) is given: one planned stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobSpec {
    pub planned: Planned,
    pub exp: String,
    pub force: bool,
    pub reason: String,
    pub project_root: PathBuf,
}

impl JobSpec {
    pub fn of(env: &Env, node: &Node, reason: &str) -> JobSpec {
        JobSpec {
            planned: node.planned.clone(),
            exp: node.exp.clone(),
            force: node.force,
            reason: reason.to_string(),
            project_root: env.project_root.clone(),
        }
    }
}

/// The folder of a key's job files (spec, script, logs, exit status): `<cache>/jobs/<key>/`.
pub fn job_dir(env: &Env, key: &str) -> PathBuf {
    env.cache.root.join("jobs").join(key)
}

/// `driveline exec-stage`: compute one planned stage (from `spec`), writing its [`Outcome`]
/// to `result` when it succeeds.
pub fn exec_stage(env: &Env, spec: &Path, result: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(spec).with_context(|| format!("cannot read {}", spec.display()))?;
    let s: JobSpec =
        serde_json::from_str(&text).with_context(|| format!("malformed {}", spec.display()))?;
    let opts = RunOptions {
        quiet: true,
        ..RunOptions::default()
    };
    let started = now();
    let (status, seconds) = runner::execute(env, &s.exp, &s.planned, s.force, &opts, &s.reason)?;
    let o = Outcome {
        status,
        seconds,
        started_at: Some(started),
        finished_at: Some(now()),
        job: std::env::var("SLURM_JOB_ID").ok(),
    };
    write_atomic(result, serde_json::to_string(&o)?.as_bytes())
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Unix time in seconds.
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether SIGINT or SIGTERM arrived (once the handlers are installed).
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Turn SIGINT/SIGTERM into [`interrupted`], so that the driver cancels what it started
/// before exiting (the in-process executor keeps the default: the process dies, and its
/// half-computed stage is never published).
pub fn install_signal_handlers() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}
