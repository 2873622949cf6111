//! What the cache keeps, and taking back the rest: `driveline gc` and `driveline cache verify`.
//!
//! An object is *reachable* when something the user can see refers to it, or when a
//! reachable object was computed from it:
//! - a `runs/<experiment>/<stage>` link points at it;
//! - an installed comparison report (`reports/<name>/.driveline-key`) was copied from it;
//! - it is a stage of an experiment named with `--keep`;
//! - it is upstream (`MANIFEST.json`'s `upstream`) of a reachable object.
//!
//! `gc` removes the other objects, and the work folders of unreachable keys (unfinished
//! stages, with their resume state). It never touches an object or work folder whose key's
//! lock is held: another process is computing or publishing it. It holds each key's lock while
//! it removes that key's files, so no process can start computing it meanwhile. Quarantined
//! objects (`quarantine/`) are left for the user to inspect; their size is reported.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::cache::{dir_size, Cache, Check, Damage, Depth, MANIFEST};
use super::runner::{Env, REPORT_KEY_FILE};

/// Keys that `runs/` links and installed reports refer to (not yet closed over upstream).
pub fn referenced(env: &Env) -> Result<BTreeSet<String>> {
    let objects = env.cache.root.join("objects");
    let objects = objects.canonicalize().unwrap_or(objects);
    let mut keys = BTreeSet::new();
    if let Ok(exps) = fs::read_dir(&env.runs_dir) {
        for exp in exps.flatten() {
            let Ok(stages) = fs::read_dir(exp.path()) else {
                continue;
            };
            for st in stages.flatten() {
                let Ok(target) = fs::read_link(st.path()) else {
                    continue;
                };
                let target = target.canonicalize().unwrap_or(target);
                if target.parent() == Some(objects.as_path()) {
                    if let Some(k) = target.file_name() {
                        keys.insert(k.to_string_lossy().into_owned());
                    }
                }
            }
        }
    }
    if let Ok(reports) = fs::read_dir(env.project_root.join("reports")) {
        for r in reports.flatten() {
            if let Ok(k) = fs::read_to_string(r.path().join(REPORT_KEY_FILE)) {
                keys.insert(k.trim().to_string());
            }
        }
    }
    Ok(keys)
}

/// `roots` and everything upstream of them, through the published manifests.
pub fn closure(cache: &Cache, roots: &BTreeSet<String>) -> BTreeSet<String> {
    let mut keep = BTreeSet::new();
    let mut todo: Vec<String> = roots.iter().cloned().collect();
    while let Some(k) = todo.pop() {
        if !keep.insert(k.clone()) {
            continue;
        }
        let text = fs::read_to_string(cache.object_dir(&k).join(MANIFEST)).unwrap_or_default();
        if let Ok(m) = serde_json::from_str::<super::cache::Manifest>(&text) {
            todo.extend(m.upstream.into_values().filter(|u| !keep.contains(u)));
        }
    }
    keep
}

/// One folder `gc` removed, or would remove.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Removed {
    /// `object` or `work`.
    pub what: &'static str,
    pub key: String,
    pub bytes: u64,
    /// The stage that computed it, when its manifest says.
    pub stage: Option<String>,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct GcReport {
    pub kept: usize,
    pub kept_bytes: u64,
    pub removed: Vec<Removed>,
    /// Keys left alone because another process holds their lock.
    pub in_use: Vec<String>,
    pub quarantine_bytes: u64,
    pub dry_run: bool,
}

impl GcReport {
    pub fn freed(&self) -> u64 {
        self.removed.iter().map(|r| r.bytes).sum()
    }
}

/// Remove (or, with `dry_run`, list) what `keep` does not reach.
pub fn gc(cache: &Cache, keep: &BTreeSet<String>, dry_run: bool) -> Result<GcReport> {
    let mut r = GcReport {
        dry_run,
        ..GcReport::default()
    };
    for key in cache.keys()? {
        let dir = cache.object_dir(&key);
        if keep.contains(&key) {
            r.kept += 1;
            r.kept_bytes += dir_size(&dir);
            continue;
        }
        let stage = fs::read_to_string(dir.join(MANIFEST))
            .ok()
            .and_then(|t| serde_json::from_str::<super::cache::Manifest>(&t).ok())
            .map(|m| m.stage);
        let Some(_lock) = cache.try_lock(&key)? else {
            r.in_use.push(key);
            continue;
        };
        let bytes = dir_size(&dir);
        if !dry_run {
            remove(&dir)?;
            cache.forget(&key);
        }
        r.removed.push(Removed {
            what: "object",
            key,
            bytes,
            stage,
        });
    }
    let work = cache.root.join("work");
    for e in fs::read_dir(&work).with_context(|| format!("cannot list {}", work.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        // `<key>`, or leftovers named `<key>.old-<pid>` / `<key>.tmp-...`.
        let key = name.split('.').next().unwrap_or_default().to_string();
        if key.is_empty() || (keep.contains(&key) && key == name) {
            continue;
        }
        let Some(_lock) = cache.try_lock(&key)? else {
            r.in_use.push(name);
            continue;
        };
        let bytes = dir_size(&e.path());
        if !dry_run {
            remove(&e.path())?;
        }
        r.removed.push(Removed {
            what: "work",
            key: name,
            bytes,
            stage: None,
        });
    }
    r.quarantine_bytes = dir_size(&cache.root.join("quarantine"));
    Ok(r)
}

fn remove(p: &Path) -> Result<()> {
    let res = if p.is_dir() {
        fs::remove_dir_all(p)
    } else {
        fs::remove_file(p)
    };
    res.with_context(|| format!("cannot remove {}", p.display()))
}

/// What `cache verify` found.
#[derive(Debug, Default)]
pub struct VerifyReport {
    pub good: usize,
    pub bytes: u64,
    pub damaged: Vec<Damage>,
    /// Keys asked for that have no published object.
    pub missing: Vec<String>,
}

/// Hash every file of every object in `keys` (ignoring stamps and what this process already
/// verified); damaged objects are quarantined.
pub fn verify(cache: &Cache, keys: &BTreeSet<String>) -> VerifyReport {
    let mut r = VerifyReport::default();
    for k in keys {
        match cache.check_with(k, Depth::Full, true) {
            Check::Valid(m) => {
                r.good += 1;
                r.bytes += m.files.values().map(|(s, _)| s).sum::<u64>();
            }
            Check::Missing => r.missing.push(k.clone()),
            Check::Damaged(d) => r.damaged.push(d),
        }
    }
    r
}

/// A size in human units.
pub fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// The quarantine folder, for messages.
pub fn quarantine_dir(cache: &Cache) -> PathBuf {
    cache.root.join("quarantine")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::cache::Manifest;

    fn publish(c: &Cache, key: &str, upstream: &[(&str, &str)]) {
        fs::create_dir_all(c.work_dir(key)).unwrap();
        fs::write(c.work_dir(key).join("out.bin"), vec![1u8; 1000]).unwrap();
        c.publish(
            key,
            Manifest {
                stage: format!("stage-{key}"),
                kind: "debug".into(),
                version: 1,
                key: key.into(),
                params: Default::default(),
                upstream: upstream
                    .iter()
                    .map(|(n, k)| (n.to_string(), k.to_string()))
                    .collect(),
                data_hash: String::new(),
                inputs: Default::default(),
                seconds: 0.0,
                computed_for: "e".into(),
                files: Default::default(),
            },
        )
        .unwrap();
    }

    #[test]
    fn closure_follows_upstream_keys() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Cache::open(tmp.path()).unwrap();
        publish(&c, "a", &[]);
        publish(&c, "b", &[("a", "a")]);
        publish(&c, "c", &[("b", "b")]);
        publish(&c, "x", &[]);
        let keep = closure(&c, &BTreeSet::from(["c".to_string()]));
        assert_eq!(keep, BTreeSet::from(["a".into(), "b".into(), "c".into()]));
    }

    #[test]
    fn gc_removes_exactly_the_unreached_and_spares_locked_keys() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Cache::open(tmp.path()).unwrap();
        publish(&c, "a", &[]);
        publish(&c, "b", &[("a", "a")]);
        publish(&c, "x", &[]);
        publish(&c, "y", &[]);
        fs::create_dir_all(c.work_dir("w1")).unwrap();
        fs::write(c.work_dir("w1").join("state.json"), b"{}").unwrap();
        fs::create_dir_all(c.work_dir("w2")).unwrap();
        let _busy_y = c.lock("y", || {}).unwrap();
        let _busy_w2 = c.lock("w2", || {}).unwrap();
        let keep = closure(&c, &BTreeSet::from(["b".to_string()]));

        let dry = gc(&c, &keep, true).unwrap();
        assert_eq!(dry.removed.len(), 2, "{dry:?}");
        assert!(c.object_dir("x").exists() && c.work_dir("w1").exists());

        let x_bytes = dir_size(&c.object_dir("x"));
        assert!(x_bytes > 1000, "the output and its manifest");
        let r = gc(&c, &keep, false).unwrap();
        let removed: BTreeSet<&str> = r.removed.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(removed, BTreeSet::from(["x", "w1"]));
        assert_eq!(r.freed(), x_bytes + 2);
        assert_eq!(r.kept, 2);
        let in_use: BTreeSet<&str> = r.in_use.iter().map(|s| s.as_str()).collect();
        assert_eq!(in_use, BTreeSet::from(["y", "w2"]));
        assert!(!c.object_dir("x").exists() && !c.work_dir("w1").exists());
        assert!(c.object_dir("y").exists() && c.work_dir("w2").exists());
        assert!(c.lookup("a").is_some() && c.lookup("b").is_some());
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
    }
}
