//! Plans and runs an experiment's stages: computes every stage's key up front (params,
//! upstream keys, dataset hash), says why each stale stage must run, and runs only those,
//! under a per-key lock, publishing each output atomically.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

use super::cache::{hash_tree, Cache, Manifest};
use super::dag::{DataInputs, Pipeline};
use crate::config::{Layout, Loaded};
use crate::progress::Progress;
use crate::stages::{self, StageCtx};

/// Where things live.
#[derive(Debug, Clone)]
pub struct Env {
    pub project_root: PathBuf,
    pub cache: Cache,
    /// `runs/`: `runs/<experiment>/<stage>` links to the published outputs.
    pub runs_dir: PathBuf,
}

impl Env {
    pub fn new(project_root: &Path, cache_dir: Option<&Path>) -> Result<Env> {
        let cache_root = match cache_dir {
            Some(d) => d.to_path_buf(),
            None => project_root.join(".driveline").join("cache"),
        };
        Ok(Env {
            project_root: project_root.to_path_buf(),
            cache: Cache::open(&cache_root)?,
            runs_dir: project_root.join("runs"),
        })
    }
}

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Run up to and including this stage only.
    pub until: Option<String>,
    /// Re-run this stage and everything downstream of it, even if cached.
    pub force: Option<String>,
    /// Plan and report, run nothing.
    pub dry_run: bool,
    /// No human-readable lines on stdout (JSON mode).
    pub quiet: bool,
}

impl RunOptions {
    /// A human-readable status line: stdout, or stderr when stdout carries JSON.
    fn say(&self, line: &str) {
        if self.quiet {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }
}

/// A stage with its key and whether it must run.
#[derive(Debug, Clone)]
pub struct Planned {
    pub name: String,
    pub kind: String,
    pub key: String,
    pub params: BTreeMap<String, Value>,
    pub upstream: BTreeMap<String, String>,
    pub data_hash: String,
    /// None when a verified output exists; else why it must run.
    pub stale: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    pub name: String,
    /// `ran`, `cached`, or (dry run / status) `stale`.
    pub status: String,
    pub key: String,
    pub seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The stage's role (`split`, `train`, `report`, ...).
    #[serde(skip)]
    pub role: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExperimentReport {
    pub name: String,
    pub stages: Vec<StageReport>,
}

/// Compute keys and staleness for every stage of the experiment's pipeline.
pub fn plan(env: &Env, loaded: &Loaded, pipeline: &Pipeline) -> Result<Vec<Planned>> {
    let exp = &loaded.exp;
    let mut keys: BTreeMap<String, String> = BTreeMap::new();
    let mut data_hashes: BTreeMap<DataInputs, String> = BTreeMap::new();
    let mut out = Vec::new();
    for st in &pipeline.stages {
        let imp = stages::lookup(st.kind())
            .with_context(|| format!("unknown stage implementation `{}`", st.kind()))?;
        let mut params = BTreeMap::new();
        for p in &st.params {
            let v = exp.value_at(p).with_context(|| {
                format!("stage `{}`: param `{p}` not in the experiment", st.name)
            })?;
            params.insert(p.clone(), v);
        }
        let upstream: BTreeMap<String, String> = st
            .needs
            .iter()
            .map(|n| (n.clone(), keys.get(n).cloned().unwrap_or_default()))
            .collect();
        let data_hash = match st.data {
            DataInputs::None => String::new(),
            _ if exp.data.layout == Layout::Synthetic => String::new(),
            d => match data_hashes.get(&d) {
                Some(h) => h.clone(),
                None => {
                    let root = Path::new(&exp.data.root);
                    let h = hash_tree(root, d == DataInputs::Content).with_context(|| {
                        format!("data.root (set at {})", loaded.origin("data.root"))
                    })?;
                    data_hashes.insert(d, h.clone());
                    h
                }
            },
        };
        let key = stage_key(
            &st.name,
            st.kind(),
            imp.version(),
            &params,
            &upstream,
            &data_hash,
        );
        keys.insert(st.name.clone(), key.clone());
        let stale = if env.cache.lookup(&key).is_some() {
            None
        } else {
            Some(stale_reason(
                env,
                &exp.name,
                &st.name,
                imp.version(),
                &params,
                &upstream,
                &data_hash,
            ))
        };
        out.push(Planned {
            name: st.name.clone(),
            kind: st.kind().to_string(),
            key,
            params,
            upstream,
            data_hash,
            stale,
        });
    }
    Ok(out)
}

/// The key of a stage: a hash of its name, implementation and version, the canonical values
/// of its params, its upstream keys and the hash of the external files it reads.
pub fn stage_key(
    name: &str,
    kind: &str,
    version: u32,
    params: &BTreeMap<String, Value>,
    upstream: &BTreeMap<String, String>,
    data_hash: &str,
) -> String {
    let canonical = serde_json::json!({
        "stage": name,
        "kind": kind,
        "version": version,
        "params": params,
        "upstream": upstream,
        "data": data_hash,
    });
    let mut h = blake3::Hasher::new();
    h.update(b"driveline-stage-key-v1\0");
    h.update(canonical.to_string().as_bytes());
    h.finalize().to_hex().to_string()
}

/// The manifest of what `runs/<exp>/<stage>` pointed to last, if any.
fn previous(env: &Env, exp: &str, stage: &str) -> Option<Manifest> {
    let link = env.runs_dir.join(exp).join(stage);
    let text = fs::read_to_string(link.join(super::cache::MANIFEST)).ok()?;
    serde_json::from_str(&text).ok()
}

fn stale_reason(
    env: &Env,
    exp: &str,
    stage: &str,
    version: u32,
    params: &BTreeMap<String, Value>,
    upstream: &BTreeMap<String, String>,
    data_hash: &str,
) -> String {
    let Some(prev) = previous(env, exp, stage) else {
        return "never run".into();
    };
    let mut changes = Vec::new();
    for (k, v) in params {
        match prev.params.get(k) {
            Some(old) if old != v => diff_values(k, old, v, &mut changes),
            None => changes.push(format!("{k} added")),
            _ => {}
        }
    }
    if !changes.is_empty() {
        return changes.join(", ");
    }
    let ups: Vec<&String> = upstream
        .iter()
        .filter(|(n, k)| prev.upstream.get(*n) != Some(*k))
        .map(|(n, _)| n)
        .collect();
    if !ups.is_empty() {
        let names: Vec<&str> = ups.iter().map(|s| s.as_str()).collect();
        return format!("upstream {} changed", names.join(", "));
    }
    if prev.data_hash != data_hash {
        return "dataset files changed".into();
    }
    if prev.version != version {
        return format!("implementation version {} → {version}", prev.version);
    }
    "output missing from the cache".into()
}

/// Describe how `old` became `new`, leaf by leaf for sections.
fn diff_values(key: &str, old: &Value, new: &Value, out: &mut Vec<String>) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let sub = format!("{key}.{k}");
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) if x != y => diff_values(&sub, x, y, out),
                    (None, Some(y)) => out.push(format!("{sub} → {y}")),
                    (Some(x), None) => out.push(format!("{sub} {x} removed")),
                    _ => {}
                }
            }
        }
        _ => out.push(format!("{key} {old} → {new}")),
    }
}

/// Run (or, with `dry_run`, only plan) one experiment.
pub fn run(
    env: &Env,
    loaded: &Loaded,
    opts: &RunOptions,
    done_now: &mut BTreeSet<String>,
) -> Result<ExperimentReport> {
    let exp = &loaded.exp;
    let pipeline = Pipeline::load(&exp.pipeline, &env.project_root)
        .with_context(|| format!("experiment `{}`: pipeline `{}`", exp.name, exp.pipeline))?;
    let planned = plan(env, loaded, &pipeline)?;
    let selected: BTreeSet<String> = match &opts.until {
        Some(u) => {
            if pipeline.stage(u).is_none() {
                bail!(
                    "--until {u}: no such stage in pipeline `{}` (stages: {})",
                    pipeline.name,
                    stage_names(&pipeline)
                );
            }
            let mut s = pipeline.ancestors(u);
            s.insert(u.clone());
            s
        }
        None => pipeline.stages.iter().map(|s| s.name.clone()).collect(),
    };
    let forced: BTreeSet<String> = match &opts.force {
        Some(f) => {
            if pipeline.stage(f).is_none() {
                bail!(
                    "--force {f}: no such stage in pipeline `{}` (stages: {})",
                    pipeline.name,
                    stage_names(&pipeline)
                );
            }
            pipeline.downstream_of(f)
        }
        None => BTreeSet::new(),
    };
    let say = |line: String| opts.say(&line);
    if !opts.dry_run {
        say(format!("{} ({})", exp.name, pipeline.name));
    }
    let mut report = ExperimentReport {
        name: exp.name.clone(),
        stages: Vec::new(),
    };
    let mut published: BTreeMap<String, (String, PathBuf)> = BTreeMap::new();
    for p in planned.iter().filter(|p| selected.contains(&p.name)) {
        let force = forced.contains(&p.name) && !done_now.contains(&p.key);
        let reason = if force {
            Some("forced".to_string())
        } else {
            p.stale.clone()
        };
        let Some(reason) = reason else {
            if !opts.dry_run {
                link_run(env, &exp.name, &p.name, &p.key)?;
            }
            say(format!("  {}: cached ({})", p.name, &p.key[..12]));
            published.insert(
                p.name.clone(),
                (role_of(&p.kind), env.cache.object_dir(&p.key)),
            );
            report.stages.push(StageReport {
                name: p.name.clone(),
                status: "cached".into(),
                key: p.key.clone(),
                seconds: 0.0,
                reason: None,
                role: role_of(&p.kind),
            });
            continue;
        };
        if opts.dry_run {
            say(format!("  {}: stale ({reason})", p.name));
            report.stages.push(StageReport {
                name: p.name.clone(),
                status: "stale".into(),
                key: p.key.clone(),
                seconds: 0.0,
                reason: Some(reason),
                role: role_of(&p.kind),
            });
            continue;
        }
        let (status, seconds) =
            run_stage(env, loaded, &pipeline, p, force, &published, opts, &reason)?;
        done_now.insert(p.key.clone());
        link_run(env, &exp.name, &p.name, &p.key)?;
        published.insert(
            p.name.clone(),
            (role_of(&p.kind), env.cache.object_dir(&p.key)),
        );
        report.stages.push(StageReport {
            name: p.name.clone(),
            status,
            key: p.key.clone(),
            seconds,
            reason: Some(reason),
            role: role_of(&p.kind),
        });
    }
    Ok(report)
}

fn role_of(kind: &str) -> String {
    stages::lookup(kind).map_or(kind, |s| s.role()).to_string()
}

fn stage_names(p: &Pipeline) -> String {
    p.stages
        .iter()
        .map(|s| s.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[allow(clippy::too_many_arguments)]
fn run_stage(
    env: &Env,
    loaded: &Loaded,
    pipeline: &Pipeline,
    p: &Planned,
    force: bool,
    published: &BTreeMap<String, (String, PathBuf)>,
    opts: &RunOptions,
    reason: &str,
) -> Result<(String, f64)> {
    let exp = &loaded.exp;
    let say = |line: String| opts.say(&line);
    let imp = stages::lookup(&p.kind).with_context(|| format!("unknown stage `{}`", p.kind))?;
    let _lock = env.cache.lock(&p.key, || {
        eprintln!("  {}: waiting for another process computing it", p.name)
    })?;
    if !force && env.cache.lookup(&p.key).is_some() {
        say(format!(
            "  {}: cached ({}; computed by another process)",
            p.name,
            &p.key[..12]
        ));
        return Ok(("cached".into(), 0.0));
    }
    say(format!("  {}: stale ({reason}) → running", p.name));
    let work = env.cache.work_dir(&p.key);
    if work.exists() && (force || !imp.resumable()) {
        fs::remove_dir_all(&work).with_context(|| format!("cannot clear {}", work.display()))?;
    }
    fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let upstream: BTreeMap<String, (String, PathBuf)> = pipeline
        .ancestors(&p.name)
        .into_iter()
        .filter_map(|a| published.get(&a).map(|v| (a, v.clone())))
        .collect();
    let progress = Progress::new(&p.name, false);
    let ctx = StageCtx {
        exp,
        stage: &p.name,
        out: &work,
        upstream,
        project_root: &env.project_root,
        progress: &progress,
    };
    let t0 = Instant::now();
    imp.run(&ctx)
        .with_context(|| format!("experiment `{}`: stage `{}` failed", exp.name, p.name))?;
    let seconds = t0.elapsed().as_secs_f64();
    let version = imp.version();
    env.cache.publish(
        &p.key,
        Manifest {
            stage: p.name.clone(),
            kind: p.kind.clone(),
            version,
            key: p.key.clone(),
            params: p.params.clone(),
            upstream: p.upstream.clone(),
            data_hash: p.data_hash.clone(),
            seconds,
            computed_for: exp.name.clone(),
            files: BTreeMap::new(),
        },
    )?;
    say(format!(
        "  {}: ran in {seconds:.1} s ({})",
        p.name,
        &p.key[..12]
    ));
    Ok(("ran".into(), seconds))
}

/// Point `runs/<exp>/<stage>` at the published object (atomic replace of a symlink).
fn link_run(env: &Env, exp: &str, stage: &str, key: &str) -> Result<()> {
    let dir = env.runs_dir.join(exp);
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let target = env.cache.object_dir(key);
    let target = target.canonicalize().unwrap_or(target);
    let link = dir.join(stage);
    if fs::read_link(&link).ok().as_deref() == Some(target.as_path()) {
        return Ok(());
    }
    let tmp = dir.join(format!(".{stage}.tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&target, &tmp)
        .with_context(|| format!("cannot create link {}", tmp.display()))?;
    fs::rename(&tmp, &link).with_context(|| format!("cannot update {}", link.display()))?;
    Ok(())
}
