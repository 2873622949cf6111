//! Shared helpers for the integration tests: a scratch project with the repo's pipelines,
//! the test pipelines, and a way to run the real binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    /// A scratch project: `pipelines/` (the shipped ones and `tests/pipelines/*`), `experiments/`.
    pub fn new() -> Project {
        let dir = tempfile::tempdir().unwrap();
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        std::fs::create_dir_all(dir.path().join("pipelines")).unwrap();
        std::fs::create_dir_all(dir.path().join("experiments")).unwrap();
        for src in ["pipelines", "tests/pipelines"] {
            for e in std::fs::read_dir(root.join(src)).unwrap() {
                let p = e.unwrap().path();
                if p.extension().is_some_and(|x| x == "toml") {
                    std::fs::copy(
                        &p,
                        dir.path().join("pipelines").join(p.file_name().unwrap()),
                    )
                    .unwrap();
                }
            }
        }
        Project { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Write `experiments/<name>.toml`.
    pub fn experiment(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path().join("experiments").join(format!("{name}.toml"));
        std::fs::write(&p, text).unwrap();
        p
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_driveline"));
        c.current_dir(self.path())
            .args(args)
            .env_remove("DRIVELINE_CACHE_DIR");
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// `driveline run --json ARGS`, asserting success; returns (stage name, status) per stage of
    /// every experiment.
    pub fn run_json(&self, args: &[&str]) -> Vec<(String, String, String)> {
        let mut a = vec!["run", "--json"];
        a.extend_from_slice(args);
        let out = self.run(&a);
        assert!(
            out.status.success(),
            "driveline {a:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        parse_stages(&out.stdout)
    }

    /// Published objects in the cache.
    pub fn objects(&self) -> Vec<String> {
        let d = self.path().join(".driveline/cache/objects");
        let mut v: Vec<String> = std::fs::read_dir(d)
            .map(|r| {
                r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// What a run can write: the cache's `objects/` and `work/` trees and the `runs/` links,
    /// one line per entry (see [`tree`]).
    pub fn written(&self) -> Vec<String> {
        let mut out = Vec::new();
        for d in [".driveline/cache/objects", ".driveline/cache/work", "runs"] {
            out.extend(
                tree(&self.path().join(d))
                    .into_iter()
                    .map(|l| format!("{d}/{l}")),
            );
        }
        out
    }
}

/// (experiment, stage, status) for each stage in `--json` output.
pub fn parse_stages(stdout: &[u8]) -> Vec<(String, String, String)> {
    let v: serde_json::Value = serde_json::from_slice(stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(stdout)));
    let mut out = Vec::new();
    for e in v["experiments"].as_array().unwrap() {
        for s in e["stages"].as_array().unwrap() {
            out.push((
                e["name"].as_str().unwrap().to_string(),
                s["name"].as_str().unwrap().to_string(),
                s["status"].as_str().unwrap().to_string(),
            ));
        }
    }
    out
}

/// The stages of `exp` that ran.
pub fn ran(stages: &[(String, String, String)], exp: &str) -> Vec<String> {
    stages
        .iter()
        .filter(|(e, _, s)| e == exp && s == "ran")
        .map(|(_, n, _)| n.clone())
        .collect()
}

/// Where the tests look for the DRIVE data set, in order: `data/DRIVE` in the repository
/// (what `./setup.sh` links) and `../shared/data/DRIVE` beside it.
pub fn drive_candidates() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    vec![root.join("data/DRIVE"), root.join("../shared/data/DRIVE")]
}

/// The real DRIVE data set. When it is missing the calling test fails, saying where it was
/// looked for, unless `DRIVELINE_SKIP_DRIVE=1` asks to skip (then `None`).
pub fn drive_root() -> Option<PathBuf> {
    let candidates = drive_candidates();
    if let Some(p) = candidates
        .iter()
        .find(|p| p.join("training/images").is_dir())
    {
        return Some(
            p.canonicalize()
                .unwrap_or_else(|e| panic!("cannot resolve {}: {e}", p.display())),
        );
    }
    let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    if std::env::var("DRIVELINE_SKIP_DRIVE").as_deref() == Ok("1") {
        eprintln!(
            "DRIVE not found (looked in {}); skipped because DRIVELINE_SKIP_DRIVE=1",
            looked.join(", ")
        );
        return None;
    }
    panic!(
        "this test needs the DRIVE data set (original layout, training/images/21_training.tif, ...) \
         but found none in {}: put it at data/DRIVE (or ../shared/data/DRIVE beside the \
         repository and run ./setup.sh, which links it), or set DRIVELINE_SKIP_DRIVE=1 to skip \
         the tests that need it",
        looked.join(" or ")
    );
}

/// Every file under `dir` (recursively, relative paths, sorted) with its size; symbolic links
/// as `path -> target`. Empty when `dir` does not exist. For "nothing was written" checks.
pub fn tree(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(base).unwrap().display().to_string();
            let ft = e.file_type().unwrap();
            if ft.is_symlink() {
                out.push(format!(
                    "{rel} -> {}",
                    std::fs::read_link(&p).unwrap().display()
                ));
            } else if ft.is_dir() {
                out.push(format!("{rel}/"));
                walk(base, &p, out);
            } else {
                out.push(format!("{rel} ({} bytes)", e.metadata().unwrap().len()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Asserts that `after` lists the same entries as `before` (see [`Project::written`]),
/// naming only the entries that appeared or disappeared.
pub fn assert_unchanged(before: &[String], after: &[String], what: &str) {
    let added: Vec<&String> = after.iter().filter(|l| !before.contains(l)).collect();
    let removed: Vec<&String> = before.iter().filter(|l| !after.contains(l)).collect();
    assert!(
        added.is_empty() && removed.is_empty(),
        "{what}\nappeared: {added:#?}\ndisappeared: {removed:#?}"
    );
}

/// stage → key of experiment `exp` in `--json` output.
pub fn keys(stdout: &[u8], exp: &str) -> std::collections::BTreeMap<String, String> {
    let v: serde_json::Value = serde_json::from_slice(stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(stdout)));
    let e = v["experiments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == exp)
        .unwrap_or_else(|| panic!("no experiment {exp} in {v}"));
    e["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["key"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// A synthetic experiment on the test pipeline, tiny and fast.
pub fn synthetic_exp(name: &str) -> String {
    format!(
        r#"name = "{name}"
pipeline = "dbg"
[data]
layout = "synthetic"
valid_count = 2
[data.synthetic]
count = 6
test_count = 2
width = 64
height = 64
[train]
imgsz = 64
"#
    )
}

/// Largest absolute element of a tensor of any float dtype, as f64.
pub fn max_abs(t: &candle_core::Tensor) -> f64 {
    t.to_dtype(candle_core::DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}
