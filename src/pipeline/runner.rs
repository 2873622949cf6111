//! Plans and runs an experiment's stages: computes every stage's key up front (params, files
//! by content, upstream keys, dataset hash), says why each stale stage must run, and runs only
//! those, under a per-key lock, publishing each output atomically. The comparison report is a
//! stage like the others ([`run_compare`]); both go through one sequence, `execute`.
//!
//! What enters a stage's key, exactly:
//! - its name, its implementation (`run`) and that implementation's `version()`;
//! - the canonical JSON values of the params its pipeline lists; a file among them
//!   (`model.pretrained`) enters by the blake3 of its content instead of its path; an optional
//!   key left unset (`train.cldice`, null) does not enter at all;
//! - the keys of the stages it `needs` (so everything upstream, transitively);
//! - with `data = "listing" | "content"`, the hash of the file names (and contents) under
//!   `data.root` (not the path: moving the data set re-runs nothing).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

use super::cache::{hash_file, hash_tree, short, Cache, Check, Manifest, MANIFEST};
use super::dag::{covers, Pipeline, StageDecl};
use super::executor::local::InProcess;
use super::schedule::Plan;
use crate::config::load::PATH_KEYS;
use crate::config::{Experiment, Layout, Loaded};
use crate::progress::Progress;
use crate::stages::{self, DataInputs, StageCtx};

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
    pub fn say(&self, line: &str) {
        if self.quiet {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }
}

/// A stage with its key and whether it must run.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Planned {
    pub name: String,
    pub kind: String,
    /// What the implementation provides downstream (`split`, `train`, `report`, ...).
    pub role: String,
    pub key: String,
    /// Canonical values of the params the pipeline lists, by dotted key.
    pub params: BTreeMap<String, Value>,
    /// External files among the params, entered in the key by content: key → blake3.
    pub inputs: BTreeMap<String, String>,
    /// The stages it `needs`: name → key.
    pub upstream: BTreeMap<String, String>,
    /// Every stage upstream of it, transitively: name → (role, key).
    pub ancestors: BTreeMap<String, (String, String)>,
    pub data_hash: String,
    /// `data.root`, passed to the stage when it reads the dataset.
    pub data_root: Option<String>,
    /// None when a verified output exists; else why it must run.
    pub stale: Option<String>,
}

impl Planned {
    /// The experiment as this stage may see it: the values of its params (and `data.root`
    /// when it reads the dataset), every other key at its default. Params that are not
    /// experiment keys (the comparison's `order`) are not part of it.
    pub fn view(&self) -> Result<Experiment> {
        let mut v = serde_json::to_value(Experiment::template())?;
        for (k, val) in &self.params {
            let top = k.split('.').next().unwrap_or_default();
            if v.get(top).is_some() {
                set_path(&mut v, k, val.clone());
            }
        }
        if let Some(root) = &self.data_root {
            set_path(&mut v, "data.root", Value::String(root.clone()));
        }
        serde_json::from_value(v)
            .with_context(|| format!("stage `{}`: building its view of the experiment", self.name))
    }
}

fn set_path(v: &mut Value, path: &str, val: Value) {
    let mut cur = v;
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        let Value::Object(map) = cur else { return };
        if parts.peek().is_none() {
            map.insert(part.to_string(), val);
            return;
        }
        cur = map
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Default::default()));
    }
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
    /// Unix times (seconds) when its computation started and ended (stages that ran).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<f64>,
    /// The Slurm job that computed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExperimentReport {
    pub name: String,
    pub stages: Vec<StageReport>,
}

/// Compute keys and staleness for every stage of the experiment's pipeline. Published
/// outputs are verified on the way (see `cache`): a damaged one is quarantined and its stage
/// is stale.
pub fn plan(env: &Env, loaded: &Loaded, pipeline: &Pipeline) -> Result<Vec<Planned>> {
    let exp = &loaded.exp;
    let mut planned: BTreeMap<String, Planned> = BTreeMap::new();
    let mut data_hashes: BTreeMap<DataInputs, String> = BTreeMap::new();
    let mut out = Vec::new();
    for st in &pipeline.stages {
        let imp = stages::lookup(st.kind())
            .with_context(|| format!("unknown stage implementation `{}`", st.kind()))?;
        let params = stage_params(exp, st)?;
        let (key_params, inputs) = external_inputs(loaded, st, &params)?;
        let upstream: BTreeMap<String, String> = st
            .needs
            .iter()
            .map(|n| {
                (
                    n.clone(),
                    planned.get(n).map(|p| p.key.clone()).unwrap_or_default(),
                )
            })
            .collect();
        let ancestors = pipeline
            .ancestors(&st.name)
            .into_iter()
            .filter_map(|a| {
                planned
                    .get(&a)
                    .map(|p| (a, (p.role.clone(), p.key.clone())))
            })
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
            &key_params,
            &upstream,
            &data_hash,
        );
        let mut p = Planned {
            name: st.name.clone(),
            kind: st.kind().to_string(),
            role: imp.role().to_string(),
            key,
            params,
            inputs,
            upstream,
            ancestors,
            data_hash,
            data_root: (st.data != DataInputs::None).then(|| exp.data.root.clone()),
            stale: None,
        };
        p.stale = staleness(env, &p, imp.version(), previous(env, &exp.name, &st.name));
        planned.insert(st.name.clone(), p.clone());
        out.push(p);
    }
    Ok(out)
}

/// Whether `p` must run: None when its output is published and verifies.
fn staleness(env: &Env, p: &Planned, version: u32, prev: Option<Manifest>) -> Option<String> {
    match env.cache.check(&p.key) {
        Check::Valid(_) => None,
        Check::Damaged(d) => {
            eprintln!("warning: {d}");
            Some(format!("output damaged: {} {}", d.file, d.problem))
        }
        Check::Missing => Some(stale_reason(prev, p, version)),
    }
}

/// The canonical values of the params `st` lists, by dotted key. An optional key left unset
/// (null) enters neither the key nor the stage's view, so adding one to a pipeline leaves every
/// existing key as it was.
fn stage_params(exp: &Experiment, st: &StageDecl) -> Result<BTreeMap<String, Value>> {
    let mut params = BTreeMap::new();
    for p in &st.params {
        let v = exp
            .value_at(p)
            .with_context(|| format!("stage `{}`: param `{p}` not in the experiment", st.name))?;
        if !v.is_null() {
            params.insert(p.clone(), v);
        }
    }
    Ok(params)
}

/// The files among a stage's params (`model.pretrained`, and `data.root` when the stage has
/// no `data` inputs that already cover it) enter its key by content, not by path: returns the
/// params as the key hashes them, and the content hash of each file.
fn external_inputs(
    loaded: &Loaded,
    st: &StageDecl,
    params: &BTreeMap<String, Value>,
) -> Result<(BTreeMap<String, Value>, BTreeMap<String, String>)> {
    let mut key_params = params.clone();
    let mut inputs = BTreeMap::new();
    for file_key in PATH_KEYS {
        let Some(param) = params.keys().find(|p| covers(p, file_key)) else {
            continue;
        };
        let path = loaded.exp.value_at(file_key);
        let path = path.as_ref().and_then(Value::as_str).unwrap_or_default();
        let replacement = if path.is_empty() {
            continue;
        } else if *file_key == "data.root" && st.data != DataInputs::None {
            // Already covered by the dataset hash.
            Value::String("<data>".into())
        } else {
            let p = Path::new(path);
            let h = if p.is_dir() {
                hash_tree(p, true)
            } else {
                hash_file(p)
            }
            .with_context(|| {
                format!(
                    "{file_key} = {path} (set at {}): the stage `{}` reads it",
                    loaded.origin(file_key),
                    st.name
                )
            })?;
            inputs.insert(file_key.to_string(), h.clone());
            Value::String(format!("blake3:{h}"))
        };
        let v = key_params.get_mut(param).expect("found above");
        if param == file_key {
            *v = replacement;
        } else {
            let rest = &file_key[param.len() + 1..];
            set_path(v, rest, replacement);
        }
    }
    Ok((key_params, inputs))
}

/// The key of a stage: a hash of its name, implementation and version, the canonical values
/// of its params (files by content), its upstream keys and the hash of the dataset files it
/// reads.
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
    let text = fs::read_to_string(link.join(MANIFEST)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Why `p` must run, against the output the experiment had last (`prev`): the first kind of
/// difference found, in this order: implementation, params (changed, added, removed), external
/// files, upstream stages, dataset files, implementation version.
fn stale_reason(prev: Option<Manifest>, p: &Planned, version: u32) -> String {
    let Some(prev) = prev else {
        return "never run".into();
    };
    if prev.kind != p.kind {
        return format!("implementation {} → {}", prev.kind, p.kind);
    }
    let mut changes = Vec::new();
    for (k, v) in &p.params {
        match prev.params.get(k) {
            Some(old) if old != v => diff_values(k, old, v, &mut changes),
            None => changes.push(format!("{k} added")),
            _ => {}
        }
    }
    for k in prev.params.keys().filter(|k| !p.params.contains_key(*k)) {
        changes.push(format!("{k} removed"));
    }
    for (k, h) in &p.inputs {
        match prev.inputs.get(k) {
            Some(old) if old != h => changes.push(format!("{k}: file content changed")),
            None => changes.push(format!("{k}: file added")),
            _ => {}
        }
    }
    for k in prev.inputs.keys().filter(|k| !p.inputs.contains_key(*k)) {
        changes.push(format!("{k}: file removed"));
    }
    if !changes.is_empty() {
        return changes.join(", ");
    }
    let ups: Vec<&str> = p
        .upstream
        .iter()
        .filter(|(n, k)| prev.upstream.get(*n) != Some(*k))
        .map(|(n, _)| n.as_str())
        .collect();
    if !ups.is_empty() {
        return format!("upstream {} changed", ups.join(", "));
    }
    if prev.data_hash != p.data_hash {
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

/// Run (or, with `dry_run`, only plan) one experiment, in this process.
pub fn run(env: &Env, loaded: &Loaded, opts: &RunOptions) -> Result<ExperimentReport> {
    let plan = Plan::build(env, std::slice::from_ref(loaded), opts)?;
    let mut exec = InProcess::new(opts.clone());
    plan.run(env, &mut exec, opts)?
        .into_iter()
        .next()
        .context("no experiment planned")
}

/// Compute and publish one stage, under its key's lock: the one sequence every stage goes
/// through (experiment stages and the comparison report alike), whatever the executor.
pub fn execute(
    env: &Env,
    exp_name: &str,
    p: &Planned,
    force: bool,
    opts: &RunOptions,
    reason: &str,
) -> Result<(String, f64)> {
    let imp = stages::lookup(&p.kind).with_context(|| format!("unknown stage `{}`", p.kind))?;
    let _lock = env.cache.lock(&p.key, || {
        eprintln!("  {}: waiting for another process computing it", p.name)
    })?;
    if !force && env.cache.lookup(&p.key).is_some() {
        opts.say(&format!(
            "  {}: cached ({}; computed by another process)",
            p.name,
            short(&p.key)
        ));
        return Ok(("cached".into(), 0.0));
    }
    opts.say(&format!("  {}: stale ({reason}) → running", p.name));
    // What it consumes must still be there and whole (verified by content once per process).
    let mut upstream = BTreeMap::new();
    for (name, (role, key)) in &p.ancestors {
        if env.cache.lookup(key).is_none() {
            bail!(
                "experiment `{exp_name}`: stage `{}` needs the output of `{name}` ({}), which is missing or damaged; run again to recompute it",
                p.name,
                short(key)
            );
        }
        upstream.insert(name.clone(), (role.clone(), env.cache.object_dir(key)));
    }
    let work = env.cache.work_dir(&p.key);
    if work.exists() && (force || !imp.resumable()) {
        fs::remove_dir_all(&work).with_context(|| format!("cannot clear {}", work.display()))?;
    }
    fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let view = p.view()?;
    let progress = Progress::new(&p.name, false);
    let ctx = StageCtx {
        exp: &view,
        params: &p.params,
        stage: &p.name,
        out: &work,
        upstream,
        progress: &progress,
    };
    let t0 = Instant::now();
    imp.run(&ctx)
        .with_context(|| format!("experiment `{exp_name}`: stage `{}` failed", p.name))?;
    let seconds = t0.elapsed().as_secs_f64();
    env.cache.publish(
        &p.key,
        Manifest {
            stage: p.name.clone(),
            kind: p.kind.clone(),
            version: imp.version(),
            key: p.key.clone(),
            params: p.params.clone(),
            upstream: p.upstream.clone(),
            data_hash: p.data_hash.clone(),
            inputs: p.inputs.clone(),
            seconds,
            computed_for: exp_name.to_string(),
            files: BTreeMap::new(),
        },
    )?;
    opts.say(&format!(
        "  {}: ran in {seconds:.1} s ({})",
        p.name,
        short(&p.key)
    ));
    Ok(("ran".into(), seconds))
}

/// The file in an installed comparison report that names the object it was copied from.
pub const REPORT_KEY_FILE: &str = ".driveline-key";

/// The comparison report of experiments (`driveline report`), as a planned stage: the
/// `compare` stage downstream of the experiments' `report` stages (`reports`: experiment name
/// and key of its report stage, in order). Once it has run, [`install`] copies it to
/// `<out_root>/<name>/`.
pub fn plan_compare(
    env: &Env,
    name: &str,
    reports: &[(String, String)],
    out_root: &Path,
) -> Result<Planned> {
    if reports.is_empty() {
        bail!("no experiment to compare");
    }
    let imp = stages::lookup("compare").context("no compare stage")?;
    let params = BTreeMap::from([
        ("name".to_string(), serde_json::json!(name)),
        (
            "order".to_string(),
            serde_json::json!(reports.iter().map(|(n, _)| n).collect::<Vec<_>>()),
        ),
    ]);
    let upstream: BTreeMap<String, String> = reports.iter().cloned().collect();
    let key = stage_key("compare", "compare", imp.version(), &params, &upstream, "");
    let mut p = Planned {
        name: "compare".into(),
        kind: "compare".into(),
        role: imp.role().into(),
        key,
        params,
        inputs: BTreeMap::new(),
        ancestors: upstream
            .iter()
            .map(|(n, k)| (n.clone(), ("report".to_string(), k.clone())))
            .collect(),
        upstream,
        data_hash: String::new(),
        data_root: None,
        stale: None,
    };
    let prev = fs::read_to_string(out_root.join(name).join(REPORT_KEY_FILE))
        .ok()
        .and_then(|k| env.cache.lookup(k.trim()));
    p.stale = staleness(env, &p, imp.version(), prev);
    Ok(p)
}

/// Copy the published comparison `key` to `dest` unless it is there already; returns whether
/// it was (re)written.
pub fn install_report(env: &Env, key: &str, dest: &Path) -> Result<bool> {
    let installed = fs::read_to_string(dest.join(REPORT_KEY_FILE)).is_ok_and(|s| s.trim() == key);
    if !installed {
        install(&env.cache.object_dir(key), dest, key)?;
    }
    Ok(!installed)
}

/// Copy a published comparison to `dest` (a real folder, so it can be opened, moved, or
/// committed), replacing the previous one atomically.
fn install(src: &Path, dest: &Path, key: &str) -> Result<()> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let file_name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{file_name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("cannot clear {}", tmp.display()))?;
    }
    copy_dir(src, &tmp)?;
    fs::remove_file(tmp.join(MANIFEST)).ok();
    fs::write(tmp.join(REPORT_KEY_FILE), format!("{key}\n"))?;
    if dest.exists() {
        let old = parent.join(format!(".{file_name}.old-{}", std::process::id()));
        fs::rename(dest, &old).with_context(|| format!("cannot replace {}", dest.display()))?;
        fs::rename(&tmp, dest)?;
        fs::remove_dir_all(&old).ok();
    } else {
        fs::rename(&tmp, dest).with_context(|| format!("cannot write {}", dest.display()))?;
    }
    Ok(())
}

fn copy_dir(src: &Path, dst: &Path) -> Result<()> {
    fs::create_dir_all(dst).with_context(|| format!("cannot create {}", dst.display()))?;
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

/// Point `runs/<exp>/<stage>` at the published object (atomic replace of a symlink).
pub fn link_run(env: &Env, exp: &str, stage: &str, key: &str) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_optional_params_leave_the_key_as_it_was() -> Result<()> {
        let decl = |params: &str| -> StageDecl {
            toml::from_str(&format!("name = \"train\"\nparams = [{params}]")).expect("decl")
        };
        let (with, without) = (decl(r#""train.lr", "train.cldice""#), decl(r#""train.lr""#));
        let mut exp = Experiment::template();
        assert_eq!(stage_params(&exp, &with)?, stage_params(&exp, &without)?);
        exp.train.cldice = Some(Default::default());
        let set = stage_params(&exp, &with)?;
        assert_eq!(
            set["train.cldice"],
            serde_json::json!({"weight": 0.5, "iters": 10})
        );
        assert_ne!(set, stage_params(&exp, &without)?);
        Ok(())
    }

    fn planned() -> Planned {
        Planned {
            name: "train".into(),
            kind: "train".into(),
            role: "train".into(),
            key: "k".into(),
            params: BTreeMap::from([
                ("train.lr".to_string(), serde_json::json!(0.001)),
                (
                    "model".to_string(),
                    serde_json::json!({"pretrained": "w.safetensors"}),
                ),
            ]),
            inputs: BTreeMap::from([("model.pretrained".to_string(), "h1".to_string())]),
            upstream: BTreeMap::from([("preprocess".to_string(), "u1".to_string())]),
            ancestors: BTreeMap::new(),
            data_hash: String::new(),
            data_root: None,
            stale: None,
        }
    }

    fn manifest_of(p: &Planned, version: u32) -> Manifest {
        Manifest {
            stage: p.name.clone(),
            kind: p.kind.clone(),
            version,
            key: "old".into(),
            params: p.params.clone(),
            upstream: p.upstream.clone(),
            data_hash: p.data_hash.clone(),
            inputs: p.inputs.clone(),
            seconds: 0.0,
            computed_for: "e".into(),
            files: BTreeMap::new(),
        }
    }

    #[test]
    fn stale_reason_names_each_kind_of_change() {
        let p = planned();
        let same = manifest_of(&p, 3);
        assert_eq!(stale_reason(None, &p, 3), "never run");
        assert_eq!(
            stale_reason(Some(same.clone()), &p, 3),
            "output missing from the cache"
        );
        assert_eq!(
            stale_reason(Some(same.clone()), &p, 4),
            "implementation version 3 → 4"
        );

        let mut m = same.clone();
        m.kind = "train_old".into();
        assert_eq!(
            stale_reason(Some(m), &p, 3),
            "implementation train_old → train"
        );

        let mut m = same.clone();
        m.params
            .insert("train.epochs".into(), serde_json::json!(10));
        assert_eq!(stale_reason(Some(m), &p, 3), "train.epochs removed");

        let mut m = same.clone();
        m.params.remove("train.lr");
        assert_eq!(stale_reason(Some(m), &p, 3), "train.lr added");

        let mut m = same.clone();
        m.params.insert("train.lr".into(), serde_json::json!(0.01));
        assert_eq!(stale_reason(Some(m), &p, 3), "train.lr 0.01 → 0.001");

        let mut m = same.clone();
        m.inputs.insert("model.pretrained".into(), "h0".into());
        assert_eq!(
            stale_reason(Some(m), &p, 3),
            "model.pretrained: file content changed"
        );

        let mut m = same.clone();
        m.upstream.insert("preprocess".into(), "u0".into());
        assert_eq!(stale_reason(Some(m), &p, 3), "upstream preprocess changed");

        let mut m = same;
        m.data_hash = "d0".into();
        assert_eq!(stale_reason(Some(m), &p, 3), "dataset files changed");
    }

    #[test]
    fn view_holds_only_the_listed_params() {
        let mut p = planned();
        p.params = BTreeMap::from([
            ("train.lr".to_string(), serde_json::json!(0.5)),
            (
                "augment".to_string(),
                serde_json::to_value(crate::config::AugmentConfig {
                    rot90: true,
                    ..Default::default()
                })
                .unwrap(),
            ),
        ]);
        p.data_root = Some("/data/x".into());
        let v = p.view().unwrap();
        let d = Experiment::template();
        assert_eq!(v.train.lr, 0.5);
        assert!(v.augment.rot90);
        assert_eq!(v.data.root, "/data/x");
        // Unlisted keys hold their defaults, whatever the experiment says.
        assert_eq!(v.train.epochs, d.train.epochs);
        assert_eq!(v.model, d.model);
        assert_eq!(v.name, d.name);
    }
}
