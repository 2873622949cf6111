//! The local executors: in this process (one stage at a time), or child processes.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};

use super::Executor;
use super::{
    install_signal_handlers, interrupted, job_dir, now, ExecutorOptions, JobSpec, Outcome,
};
use crate::pipeline::runner::{self, Env, RunOptions};
use crate::pipeline::schedule::Node;

/// One stage at a time, in this process: `--jobs 1`, the default.
pub struct InProcess {
    opts: RunOptions,
    finished: Vec<(usize, Result<Outcome>)>,
}

impl InProcess {
    pub fn new(opts: RunOptions) -> InProcess {
        InProcess {
            opts,
            finished: Vec::new(),
        }
    }
}

impl Executor for InProcess {
    fn capacity(&self) -> usize {
        1
    }

    fn start(&mut self, env: &Env, node: &Node, idx: usize, reason: &str) -> Result<()> {
        let started = now();
        let res = runner::execute(
            env,
            &node.exp,
            &node.planned,
            node.force,
            &self.opts,
            reason,
        )
        .map(|(status, seconds)| Outcome {
            status,
            seconds,
            started_at: Some(started),
            finished_at: Some(now()),
            job: None,
        });
        self.finished.push((idx, res));
        Ok(())
    }

    fn wait(&mut self, _env: &Env) -> Result<Vec<(usize, Result<Outcome>)>> {
        Ok(std::mem::take(&mut self.finished))
    }

    fn abort(&mut self) {}
}

/// Up to `--jobs N` stages at once, each in a child `driveline exec-stage`.
pub struct Processes {
    jobs: usize,
    threads: usize,
    bin: PathBuf,
    children: BTreeMap<usize, Running>,
}

struct Running {
    child: Child,
    result: PathBuf,
    what: String,
}

impl Processes {
    pub fn new(env: &Env, o: &ExecutorOptions) -> Result<Processes> {
        let _ = env;
        install_signal_handlers();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(Processes {
            jobs: o.jobs.max(1),
            // The cores split between the stages running at once (2 trains on 2 cores: 1 each).
            threads: o.threads.unwrap_or((cores / o.jobs.max(1)).max(1)),
            bin: std::env::current_exe().context("cannot find the driveline binary")?,
            children: BTreeMap::new(),
        })
    }
}

impl Executor for Processes {
    fn capacity(&self) -> usize {
        self.jobs
    }

    fn start(&mut self, env: &Env, node: &Node, idx: usize, reason: &str) -> Result<()> {
        let dir = job_dir(env, &node.planned.key);
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let spec = dir.join(format!("spec-local-{}.json", std::process::id()));
        super::write_atomic(
            &spec,
            serde_json::to_string(&JobSpec::of(env, node, reason))?.as_bytes(),
        )?;
        let result = dir.join(format!("result-local-{}.json", std::process::id()));
        fs::remove_file(&result).ok();
        let child = Command::new(&self.bin)
            .arg("--cache-dir")
            .arg(&env.cache.root)
            .arg("--threads")
            .arg(self.threads.to_string())
            .arg("exec-stage")
            .arg("--spec")
            .arg(&spec)
            .arg("--result")
            .arg(&result)
            .env("RAYON_NUM_THREADS", self.threads.to_string())
            .current_dir(&env.project_root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        self.children.insert(
            idx,
            Running {
                child,
                result,
                what: format!("experiment `{}`: stage `{}`", node.exp, node.planned.name),
            },
        );
        Ok(())
    }

    fn wait(&mut self, _env: &Env) -> Result<Vec<(usize, Result<Outcome>)>> {
        loop {
            let mut out = Vec::new();
            for (&i, r) in self.children.iter_mut() {
                if let Some(status) = r.child.try_wait()? {
                    let res = if status.success() {
                        fs::read_to_string(&r.result)
                            .ok()
                            .and_then(|t| serde_json::from_str::<Outcome>(&t).ok())
                            .ok_or_else(|| anyhow!("{}: finished without a result", r.what))
                    } else {
                        Err(anyhow!(
                            "{} failed ({status}); its messages are above",
                            r.what
                        ))
                    };
                    out.push((i, res));
                }
            }
            for (i, _) in &out {
                self.children.remove(i);
            }
            if !out.is_empty() || self.children.is_empty() || interrupted() {
                return Ok(out);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn abort(&mut self) {
        for r in self.children.values_mut() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(r.child.id() as libc::pid_t, libc::SIGTERM);
            }
        }
        for r in self.children.values_mut() {
            r.child.wait().ok();
        }
    }

    fn stats(&self) -> serde_json::Value {
        serde_json::json!({"name": "local", "jobs": self.jobs, "threads_per_stage": self.threads})
    }
}
