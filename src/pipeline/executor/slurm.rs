//! `--executor slurm`: every stale stage a Slurm batch job, submitted once its upstream
//! stages are published (the driver waits; no `--dependency`), running `driveline
//! exec-stage` on a compute node against the same cache directory.
//!
//! ```text
//! <cache>/jobs/<key>/job.sh            the batch script (#SBATCH name, log, cpus, mem, time, ...)
//! <cache>/jobs/<key>/spec.json         the planned stage it computes
//! <cache>/jobs/<key>/job.json          the submitted job: id, driver pid, time (reattach)
//! <cache>/jobs/<key>/slurm-<id>.log    its output
//! <cache>/jobs/<key>/exit-<id>         its exit status, written by the script at the end
//! <cache>/jobs/<key>/result-<id>.json  what exec-stage did (ran / cached, times)
//! ```
//! **Status:** one `squeue -j <all our ids>` per poll cycle (`--poll-interval`), whatever the
//! number of jobs. A job that has left the queue ended: its exit file says how; without one
//! (killed by Slurm), `scontrol show job` says why: cancelled, timed out, out of memory, node
//! failure, preempted. `sacct` is never needed. Preempted and node-failure jobs are resubmitted
//! up to `retries` times.
//!
//! **Reattach:** a driver that finds a `job.json` whose job is still queued or running (or has
//! just ended) adopts it instead of submitting the stage again, so a driver restarted after a
//! crash or SIGKILL never doubles a job; submission is serialised per key by a lock file.
//!
//! **Interrupt:** Ctrl-C or SIGTERM cancels (`scancel`) the jobs this driver submitted, and
//! those it adopted from a dead driver, unless it runs with `--detach`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::{interrupted, job_dir, now, write_atomic, Executor, ExecutorOptions, JobSpec, Outcome};
use crate::config::Resources;
use crate::pipeline::cache::short;
use crate::pipeline::runner::Env;
use crate::pipeline::schedule::Node;

/// `job.json`: a submitted job, for reattaching.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    /// The driver that submitted it.
    pub driver_pid: u32,
    pub submitted_at: f64,
    pub stage: String,
    pub exp: String,
}

struct Job {
    id: String,
    dir: PathBuf,
    stage: String,
    exp: String,
    resources: Resources,
    /// Submitted by this driver, or adopted from a driver that is gone: cancelled on interrupt.
    ours: bool,
    attempts: u32,
    state: String,
    node: Node,
    reason: String,
}

impl Job {
    fn log(&self) -> PathBuf {
        self.dir.join(format!("slurm-{}.log", self.id))
    }

    fn what(&self) -> String {
        format!(
            "experiment `{}`: stage `{}` (Slurm job {}, log {})",
            self.exp,
            self.stage,
            self.id,
            self.log().display()
        )
    }
}

pub struct Slurm {
    poll: Duration,
    detach: bool,
    threads: Option<usize>,
    bin: PathBuf,
    jobs: BTreeMap<usize, Job>,
    /// Ids listed by the last `squeue` (with their state), and when it ran.
    snapshot: BTreeMap<String, String>,
    snapshot_at: f64,
    last_poll: Option<Instant>,
    polls: u64,
    squeue_calls: u64,
    submitted: u64,
    adopted: u64,
}

/// Whether `cmd` is an executable on PATH.
fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            let f = d.join(cmd);
            fs::metadata(&f).is_ok_and(|m| m.is_file())
        })
    })
}

impl Slurm {
    pub fn new(env: &Env, o: &ExecutorOptions) -> Result<Slurm> {
        for cmd in ["sbatch", "squeue", "scontrol"] {
            if !on_path(cmd) {
                bail!(
                    "--executor slurm: `{cmd}` is not on PATH. Run driveline where Slurm's commands are (a login node), or use --executor local; scripts/slurm-dev.sh starts a single-node cluster on this machine"
                );
            }
        }
        if !env.cache.root.is_absolute() {
            bail!(
                "--executor slurm needs an absolute cache directory (got {})",
                env.cache.root.display()
            );
        }
        if o.poll_interval <= 0.0 || !o.poll_interval.is_finite() {
            bail!("--poll-interval {}: must be positive", o.poll_interval);
        }
        let mut s = Slurm {
            poll: Duration::from_secs_f64(o.poll_interval),
            detach: o.detach,
            threads: o.threads,
            bin: std::env::current_exe().context("cannot find the driveline binary")?,
            jobs: BTreeMap::new(),
            snapshot: BTreeMap::new(),
            snapshot_at: 0.0,
            last_poll: None,
            polls: 0,
            squeue_calls: 0,
            submitted: 0,
            adopted: 0,
        };
        // One look at the whole queue, to reattach to jobs of an earlier driver.
        s.snapshot = s.squeue(None)?;
        s.snapshot_at = now();
        Ok(s)
    }

    /// One `squeue` call: id → state for the given ids (None: every job of this user).
    fn squeue(&mut self, ids: Option<&[String]>) -> Result<BTreeMap<String, String>> {
        self.squeue_calls += 1;
        let mut c = Command::new("squeue");
        c.args(["-h", "-o", "%i|%T"]);
        match ids {
            Some(ids) => {
                c.arg("-j").arg(ids.join(","));
            }
            None => {
                c.arg("--me");
            }
        }
        let out = c.output().context("cannot run squeue")?;
        let err = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            // Every id has left Slurm's memory: nothing is queued.
            if err.contains("Invalid job id") {
                return Ok(BTreeMap::new());
            }
            bail!("squeue failed ({}): {}", out.status, err.trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let (id, st) = l.trim().split_once('|')?;
                Some((id.to_string(), st.to_string()))
            })
            .collect())
    }

    /// Submit node's job (or adopt the one a previous driver left); returns the job.
    fn submit_or_adopt(&mut self, env: &Env, node: &Node, reason: &str) -> Result<Job> {
        let key = &node.planned.key;
        let dir = job_dir(env, key);
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        // Serialise submission of this key between drivers.
        let lock = env.cache.lock(&format!("{key}.submit"), || {})?;
        let mut job = Job {
            id: String::new(),
            dir: dir.clone(),
            stage: node.planned.name.clone(),
            exp: node.exp.clone(),
            resources: node.resources.clone(),
            ours: true,
            attempts: 1,
            state: "PENDING".into(),
            node: node.clone(),
            reason: reason.to_string(),
        };
        if let Some(rec) = read_record(&dir) {
            // Queued or running at our last look, or submitted since by another driver.
            let alive = self.snapshot.contains_key(&rec.id) || rec.submitted_at >= self.snapshot_at;
            if alive {
                job.id = rec.id.clone();
                job.ours = !pid_alive(rec.driver_pid) || rec.driver_pid == std::process::id();
                self.adopted += 1;
                eprintln!(
                    "  {}: reattached to Slurm job {} ({})",
                    job.stage,
                    job.id,
                    self.snapshot
                        .get(&job.id)
                        .map_or("just submitted", |s| s.as_str())
                );
                drop(lock);
                return Ok(job);
            }
        }
        let spec = dir.join("spec.json");
        write_atomic(
            &spec,
            serde_json::to_string_pretty(&JobSpec::of(env, node, reason))?.as_bytes(),
        )?;
        let script = dir.join("job.sh");
        write_atomic(
            &script,
            batch_script(&self.bin, env, node, &dir, self.threads).as_bytes(),
        )?;
        job.id = sbatch(&script).with_context(|| {
            format!(
                "experiment `{}`: submitting stage `{}` ({})",
                node.exp,
                node.planned.name,
                script.display()
            )
        })?;
        write_atomic(
            &dir.join("job.json"),
            serde_json::to_string_pretty(&JobRecord {
                id: job.id.clone(),
                driver_pid: std::process::id(),
                submitted_at: now(),
                stage: job.stage.clone(),
                exp: job.exp.clone(),
            })?
            .as_bytes(),
        )?;
        self.submitted += 1;
        eprintln!(
            "  {} ({}): stale ({reason}) → Slurm job {} ({})",
            job.stage,
            job.exp,
            job.id,
            short(key)
        );
        drop(lock);
        Ok(job)
    }

    /// How an ended job finished.
    fn ended(&mut self, env: &Env, job: &mut Job) -> Ended {
        let exit = job.dir.join(format!("exit-{}", job.id));
        // The script writes its exit file just before it ends; give a shared file system a
        // moment to show it.
        for _ in 0..10 {
            if exit.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Ok(t) = fs::read_to_string(&exit) {
            let rc = t.trim();
            if rc == "0" {
                let res = job.dir.join(format!("result-{}.json", job.id));
                return match fs::read_to_string(&res)
                    .ok()
                    .and_then(|t| serde_json::from_str::<Outcome>(&t).ok())
                {
                    Some(o) => Ended::Ok(o),
                    None => Ended::Failed(anyhow!(
                        "{} exited 0 without a result file {}",
                        job.what(),
                        res.display()
                    )),
                };
            }
            return Ended::Failed(anyhow!(
                "{} failed with exit code {rc}{}",
                job.what(),
                log_tail(&job.log())
            ));
        }
        let state = scontrol_state(&job.id);
        let r = &job.resources;
        let why = match state.as_deref() {
            Some("CANCELLED") => "was cancelled (scancel)".to_string(),
            Some("TIMEOUT") => format!(
                "timed out (time = {})",
                r.time.as_deref().unwrap_or("the partition's limit")
            ),
            Some("OUT_OF_MEMORY") => format!(
                "ran out of memory (mem = {})",
                r.mem.as_deref().unwrap_or("the cluster default")
            ),
            Some("NODE_FAIL") | Some("BOOT_FAIL") => "lost its node (node failure)".into(),
            Some("PREEMPTED") => "was preempted".into(),
            Some("DEADLINE") => "passed its deadline".into(),
            Some("COMPLETED") => "completed without writing its exit status".into(),
            Some("FAILED") => "failed before driveline started (see the log)".into(),
            Some(other) => format!("ended in state {other}"),
            None => "ended without an exit status (Slurm no longer knows it)".into(),
        };
        let retriable = matches!(
            state.as_deref(),
            Some("PREEMPTED") | Some("NODE_FAIL") | Some("BOOT_FAIL")
        );
        if retriable && job.attempts <= r.retries.unwrap_or(0) {
            eprintln!(
                "  {}: Slurm job {} {why}; resubmitting (retry {} of {})",
                job.stage,
                job.id,
                job.attempts,
                r.retries.unwrap_or(0)
            );
            fs::remove_file(job.dir.join("job.json")).ok();
            let (node, reason) = (job.node.clone(), job.reason.clone());
            match self.submit_or_adopt(env, &node, &reason) {
                Ok(mut j) => {
                    j.attempts = job.attempts + 1;
                    return Ended::Resubmitted(Box::new(j));
                }
                Err(e) => return Ended::Failed(e),
            }
        }
        Ended::Failed(anyhow!("{} {why}{}", job.what(), log_tail(&job.log())))
    }
}

enum Ended {
    Ok(Outcome),
    Failed(anyhow::Error),
    Resubmitted(Box<Job>),
}

impl Executor for Slurm {
    fn capacity(&self) -> usize {
        // Slurm queues what cannot run yet; the driver submits whatever is ready.
        usize::MAX
    }

    fn start(&mut self, env: &Env, node: &Node, idx: usize, reason: &str) -> Result<()> {
        let job = self.submit_or_adopt(env, node, reason)?;
        self.jobs.insert(idx, job);
        Ok(())
    }

    fn wait(&mut self, env: &Env) -> Result<Vec<(usize, Result<Outcome>)>> {
        if let Some(t) = self.last_poll {
            while t.elapsed() < self.poll {
                if interrupted() {
                    return Ok(Vec::new());
                }
                std::thread::sleep(Duration::from_millis(50).min(self.poll));
            }
        }
        self.last_poll = Some(Instant::now());
        self.polls += 1;
        let ids: Vec<String> = self.jobs.values().map(|j| j.id.clone()).collect();
        let listed = self.squeue(Some(&ids))?;
        self.snapshot = listed.clone();
        self.snapshot_at = now();
        let mut out = Vec::new();
        let idxs: Vec<usize> = self.jobs.keys().copied().collect();
        for i in idxs {
            let Some(mut job) = self.jobs.remove(&i) else {
                continue;
            };
            if let Some(state) = listed.get(&job.id) {
                if *state != job.state {
                    if state == "RUNNING" {
                        eprintln!(
                            "  {} ({}): running (Slurm job {})",
                            job.stage, job.exp, job.id
                        );
                    }
                    job.state = state.clone();
                }
                self.jobs.insert(i, job);
                continue;
            }
            match self.ended(env, &mut job) {
                Ended::Ok(mut o) => {
                    o.job = Some(job.id.clone());
                    eprintln!(
                        "  {} ({}): {} in Slurm job {} ({:.1} s)",
                        job.stage, job.exp, o.status, job.id, o.seconds
                    );
                    out.push((i, Ok(o)));
                }
                Ended::Failed(e) => out.push((i, Err(e))),
                Ended::Resubmitted(j) => {
                    self.jobs.insert(i, *j);
                }
            }
        }
        Ok(out)
    }

    fn abort(&mut self) {
        if self.detach {
            let ids: Vec<&str> = self.jobs.values().map(|j| j.id.as_str()).collect();
            eprintln!("--detach: leaving Slurm jobs {} running", ids.join(", "));
            return;
        }
        let ids: Vec<String> = self
            .jobs
            .values()
            .filter(|j| j.ours)
            .map(|j| j.id.clone())
            .collect();
        if ids.is_empty() {
            return;
        }
        let ok = Command::new("scancel")
            .args(&ids)
            .status()
            .is_ok_and(|s| s.success());
        eprintln!(
            "{} Slurm jobs {}",
            if ok { "cancelled" } else { "could not cancel" },
            ids.join(", ")
        );
    }

    fn stats(&self) -> serde_json::Value {
        serde_json::json!({
            "name": "slurm",
            "polls": self.polls,
            "squeue_calls": self.squeue_calls,
            "submitted": self.submitted,
            "adopted": self.adopted,
            "poll_interval": self.poll.as_secs_f64(),
        })
    }
}

fn read_record(dir: &Path) -> Option<JobRecord> {
    serde_json::from_str(&fs::read_to_string(dir.join("job.json")).ok()?).ok()
}

fn pid_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

/// Quote for a POSIX shell.
fn sh(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The batch script of a node.
fn batch_script(bin: &Path, env: &Env, node: &Node, dir: &Path, threads: Option<usize>) -> String {
    let r = &node.resources;
    let p = &node.planned;
    let mut s = String::from("#!/bin/bash\n");
    let mut opt = |o: String| {
        s.push_str("#SBATCH ");
        s.push_str(&o);
        s.push('\n');
    };
    opt(format!("--job-name=dl-{}-{}", short(&p.key), p.name));
    opt(format!("--output={}", dir.join("slurm-%j.log").display()));
    if let Some(c) = r.cpus {
        opt(format!("--cpus-per-task={c}"));
    }
    if let Some(m) = &r.mem {
        opt(format!("--mem={m}"));
    }
    if let Some(t) = &r.time {
        opt(format!("--time={t}"));
    }
    if let Some(g) = r.gpus.filter(|g| *g > 0) {
        opt(format!("--gpus={g}"));
    }
    if let Some(x) = &r.partition {
        opt(format!("--partition={x}"));
    }
    if let Some(x) = &r.account {
        opt(format!("--account={x}"));
    }
    for x in r.extra.iter().flatten() {
        opt(x.clone());
    }
    let threads = match threads {
        Some(t) => t.to_string(),
        None => "${SLURM_CPUS_PER_TASK:-1}".into(),
    };
    let d = dir.display().to_string();
    s.push_str(&format!(
        "# driveline: stage `{}` of experiment `{}`, key {}\n\
         cd {}\n\
         {} --cache-dir {} --threads \"{threads}\" exec-stage --spec {} --result {}\"/result-$SLURM_JOB_ID.json\"\n\
         rc=$?\n\
         echo $rc > {d_q}\"/exit-$SLURM_JOB_ID.tmp\" && mv {d_q}\"/exit-$SLURM_JOB_ID.tmp\" {d_q}\"/exit-$SLURM_JOB_ID\"\n\
         exit $rc\n",
        p.name,
        node.exp,
        p.key,
        sh(&env.project_root.display().to_string()),
        sh(&bin.display().to_string()),
        sh(&env.cache.root.display().to_string()),
        sh(&dir.join("spec.json").display().to_string()),
        sh(&d),
        d_q = sh(&d),
    ));
    s
}

/// `sbatch --parsable script` → the job id.
fn sbatch(script: &Path) -> Result<String> {
    let out = Command::new("sbatch")
        .arg("--parsable")
        .arg(script)
        .output()
        .context("cannot run sbatch")?;
    if !out.status.success() {
        bail!(
            "sbatch failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let id = text
        .trim()
        .split(';')
        .next()
        .unwrap_or_default()
        .to_string();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit() || c == '_') {
        bail!("sbatch printed no job id: {text:?}");
    }
    Ok(id)
}

/// `JobState` from `scontrol show job -o ID`, while Slurm remembers the job.
fn scontrol_state(id: &str) -> Option<String> {
    let out = Command::new("scontrol")
        .args(["show", "job", "-o", id])
        .output()
        .ok()?;
    parse_job_state(&String::from_utf8_lossy(&out.stdout))
}

fn parse_job_state(text: &str) -> Option<String> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix("JobState="))
        .map(str::to_string)
}

/// The last lines of a job's log, for a failure message.
fn log_tail(log: &Path) -> String {
    let Ok(t) = fs::read_to_string(log) else {
        return String::new();
    };
    let lines: Vec<&str> = t.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return String::new();
    }
    let tail = &lines[lines.len().saturating_sub(6)..];
    format!("; the log ends with:\n    {}", tail.join("\n    "))
}

/// For `driveline status`: the live job of each key that has one, as (id, state), with one
/// `squeue` call. Empty where Slurm's commands are not installed.
pub fn live_jobs(env: &Env, keys: &BTreeSet<String>) -> BTreeMap<String, (String, String)> {
    let recs: Vec<(String, JobRecord)> = keys
        .iter()
        .filter_map(|k| read_record(&job_dir(env, k)).map(|r| (k.clone(), r)))
        .collect();
    if recs.is_empty() || !on_path("squeue") {
        return BTreeMap::new();
    }
    let ids: Vec<&str> = recs.iter().map(|(_, r)| r.id.as_str()).collect();
    let Ok(out) = Command::new("squeue")
        .args(["-h", "-o", "%i|%T", "-j", &ids.join(",")])
        .output()
    else {
        return BTreeMap::new();
    };
    let listed: BTreeMap<String, String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (i, s) = l.trim().split_once('|')?;
            Some((i.to_string(), s.to_string()))
        })
        .collect();
    recs.into_iter()
        .filter_map(|(k, r)| listed.get(&r.id).map(|s| (k, (r.id.clone(), s.clone()))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_state_is_read_from_scontrol_output() {
        let t =
            "JobId=12 JobName=dl-x UserId=root(0) JobState=TIMEOUT Reason=TimeLimit ExitCode=0:15";
        assert_eq!(parse_job_state(t).as_deref(), Some("TIMEOUT"));
        assert_eq!(
            parse_job_state("slurm_load_jobs error: Invalid job id"),
            None
        );
    }

    #[test]
    fn shell_quoting_survives_quotes_and_spaces() {
        assert_eq!(sh("/a b/c"), "'/a b/c'");
        assert_eq!(sh("it's"), "'it'\\''s'");
    }
}
