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

/// The real DRIVE data set, when present beside the repository.
pub fn drive_root() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/DRIVE");
    if p.join("training/images").is_dir() {
        Some(p.canonicalize().unwrap())
    } else {
        eprintln!("note: ../shared/data/DRIVE not found; the real-data variant is skipped");
        None
    }
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
