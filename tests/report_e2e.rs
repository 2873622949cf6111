//! End to end: two tiny experiments on synthetic data through the real pipeline
//! (split → preprocess → train → evaluate → report) and `driveline report`, then the contents
//! of `reports/e2e/`, the cache on a second report, what a change to one experiment reruns,
//! and the page in headless Chromium.
//!
//! The experiments are trained once per test binary ([`first_report`]); the tests read a
//! snapshot of the first report (kept under `<target>/test-output/report_e2e/`), so the one
//! test that edits an experiment and reports again does not disturb them.

mod browser;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// A tiny experiment: 64×64 synthetic images, ResNet-18, one epoch; `lr` differs between the
/// two, so they share split and preprocess.
fn experiment(name: &str, lr: &str) -> String {
    format!(
        r#"name = "{name}"
description = "end-to-end check, lr {lr}"
pipeline = "deeplabv3"
[data]
layout = "synthetic"
valid_count = 2
[data.synthetic]
count = 4
test_count = 2
width = 64
height = 64
[model]
backbone = "resnet18"
[train]
imgsz = 64
epochs = 1
batch = 2
lr = {lr}
"#
    )
}

const NAMES: [&str; 2] = ["alpha", "beta"];

/// The scratch project, the first report's parsed `--json` output and a snapshot of
/// `reports/e2e/` taken right after it.
struct First {
    project: PathBuf,
    json: serde_json::Value,
    snapshot: PathBuf,
}

fn output_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("test-output/report_e2e")
}

fn driveline(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_driveline"))
        .current_dir(cwd)
        .args(args)
        .env_remove("DRIVELINE_CACHE_DIR")
        .output()
        .unwrap()
}

/// `driveline report experiments/alpha.toml experiments/beta.toml --name e2e --json`.
fn report(project: &Path) -> serde_json::Value {
    let o = driveline(
        project,
        &[
            "report",
            "experiments/alpha.toml",
            "experiments/beta.toml",
            "--name",
            "e2e",
            "--json",
        ],
    );
    assert!(
        o.status.success(),
        "driveline report failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&o.stdout)))
}

/// Runs both experiments and the first report (once per test binary).
fn first_report() -> &'static First {
    static FIRST: OnceLock<First> = OnceLock::new();
    FIRST.get_or_init(|| {
        // A fixed folder, replaced on each run (the cache holds ~600 MB of checkpoints; the
        // rerun test deletes it when done).
        let project = Path::new(env!("CARGO_TARGET_TMPDIR")).join("report-e2e");
        if project.exists() {
            std::fs::remove_dir_all(&project).unwrap();
        }
        std::fs::create_dir_all(project.join("pipelines")).unwrap();
        std::fs::create_dir_all(project.join("experiments")).unwrap();
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/deeplabv3.toml"),
            project.join("pipelines/deeplabv3.toml"),
        )
        .unwrap();
        for (name, lr) in NAMES.iter().zip(["1e-3", "3e-4"]) {
            std::fs::write(
                project.join(format!("experiments/{name}.toml")),
                experiment(name, lr),
            )
            .unwrap();
        }
        let json = report(&project);
        let snapshot = output_dir().join("report");
        if snapshot.exists() {
            std::fs::remove_dir_all(&snapshot).unwrap();
        }
        copy_dir(&project.join("reports/e2e"), &snapshot);
        First {
            project,
            json,
            snapshot,
        }
    })
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}

/// experiment → stage → (status, key) from a `--json` output.
fn stages(json: &serde_json::Value) -> BTreeMap<String, BTreeMap<String, (String, String)>> {
    let mut out = BTreeMap::new();
    for e in json["experiments"].as_array().expect("experiments array") {
        let mut st = BTreeMap::new();
        for s in e["stages"].as_array().unwrap() {
            st.insert(
                s["name"].as_str().unwrap().to_string(),
                (
                    s["status"].as_str().unwrap().to_string(),
                    s["key"].as_str().unwrap().to_string(),
                ),
            );
        }
        out.insert(e["name"].as_str().unwrap().to_string(), st);
    }
    out
}

fn status_of(json: &serde_json::Value, exp: &str, stage: &str) -> String {
    stages(json)[exp][stage].0.clone()
}

const STAGES: [&str; 5] = ["split", "preprocess", "train", "evaluate", "report"];

/// Targets of the Markdown links in `md` (`[text](target)` and `![alt](target)`).
fn markdown_links(md: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = md;
    while let Some(i) = rest.find("](") {
        let after = &rest[i + 2..];
        let Some(end) = after.find(')') else { break };
        out.push(after[..end].to_string());
        rest = &after[end..];
    }
    out
}

/// Values of every `attr="…"` in `html`.
fn attr_values<'a>(html: &'a str, attr: &str) -> Vec<&'a str> {
    let pat = format!("{attr}=\"");
    html.match_indices(&pat)
        .filter_map(|(i, _)| {
            let v = &html[i + pat.len()..];
            v.find('"').map(|e| &v[..e])
        })
        .collect()
}

#[test]
fn report_e2e_first_run_runs_every_stage_once() {
    let f = first_report();
    let st = stages(&f.json);
    assert_eq!(
        st.keys().collect::<Vec<_>>(),
        NAMES.iter().collect::<Vec<_>>()
    );
    for stage in STAGES {
        assert_eq!(status_of(&f.json, "alpha", stage), "ran", "alpha {stage}");
    }
    for stage in ["split", "preprocess"] {
        assert_eq!(
            st["beta"][stage].1, st["alpha"][stage].1,
            "{stage} is shared"
        );
        assert_eq!(status_of(&f.json, "beta", stage), "cached", "beta {stage}");
    }
    for stage in ["train", "evaluate", "report"] {
        assert_ne!(st["beta"][stage].1, st["alpha"][stage].1, "{stage} differs");
        assert_eq!(status_of(&f.json, "beta", stage), "ran", "beta {stage}");
    }
    assert_eq!(f.json["report"]["status"], "ran");
    assert_eq!(f.json["report"]["name"], "e2e");
}

#[test]
fn report_e2e_folder_contents() {
    let f = first_report();
    let dir = &f.snapshot;

    // summary.csv: one row per experiment, in order, with plausible numbers.
    let mut csv = csv::Reader::from_path(dir.join("summary.csv")).unwrap();
    let header: Vec<String> = csv.headers().unwrap().iter().map(String::from).collect();
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let rows: Vec<csv::StringRecord> = csv.records().map(|r| r.unwrap()).collect();
    assert_eq!(rows.len(), 2, "one row per experiment");
    for (row, name) in rows.iter().zip(NAMES) {
        assert_eq!(&row[col("name")], name);
        assert_eq!(&row[col("arch")], "DeepLabV3");
        assert_eq!(&row[col("backbone")], "resnet18");
        assert_eq!(&row[col("epochs")], "1");
        for metric in ["best_valid_miou", "test_dice", "test_accuracy"] {
            let v: f64 = row[col(metric)]
                .parse()
                .unwrap_or_else(|e| panic!("{name} {metric} {:?}: {e}", &row[col(metric)]));
            assert!((0.0..=1.0).contains(&v), "{name} {metric} = {v}");
        }
    }

    // README.md: both experiments, and every linked PNG exists and decodes.
    let md = std::fs::read_to_string(dir.join("README.md")).unwrap();
    for name in NAMES {
        assert!(md.contains(name), "README.md does not mention {name}");
    }
    let pngs: Vec<String> = markdown_links(&md)
        .into_iter()
        .filter(|l| l.ends_with(".png"))
        .collect();
    let images = md.matches("![").count();
    // Two comparison charts, three curves per experiment, two test images per experiment.
    assert!(images >= 2 + 3 * 2 + 2 * 2, "{images} images in README.md");
    assert!(pngs.len() >= images, "{pngs:?}");
    for rel in &pngs {
        assert!(!rel.starts_with("http"), "external image {rel}");
        let p = dir.join(rel);
        image::open(&p).unwrap_or_else(|e| panic!("README image {rel} does not decode: {e}"));
    }

    // index.html: self-contained.
    let html = std::fs::read_to_string(dir.join("index.html")).unwrap();
    for name in NAMES {
        assert!(html.contains(name), "index.html does not mention {name}");
    }
    let srcs = attr_values(&html, "src");
    assert_eq!(srcs.len(), html.matches("<img").count());
    assert!(
        srcs.len() >= images,
        "{} <img> for {images} images",
        srcs.len()
    );
    for s in &srcs {
        assert!(
            s.starts_with("data:image/png;base64,"),
            "not inlined: {s:.80}"
        );
    }
    for h in attr_values(&html, "href") {
        assert!(
            !h.starts_with("http:") && !h.starts_with("https:") && !h.starts_with("//"),
            "external link {h}"
        );
    }

    // Per-experiment curves, in the comparison and in each experiment's own report.
    for name in NAMES {
        for png in ["loss.png", "accuracy.png", "miou.png"] {
            let p = dir.join("experiments").join(name).join(png);
            let img = image::open(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert!(img.width() > 100 && img.height() > 100, "{}", p.display());
        }
    }
}

#[test]
fn report_e2e_second_report_is_cached_and_a_change_reruns_only_it() {
    let f = first_report();
    // Each experiment's own report stage published its curves.
    for name in NAMES {
        for png in ["loss.png", "accuracy.png", "miou.png"] {
            let own = f.project.join("runs").join(name).join("report").join(png);
            assert!(own.is_file(), "{} missing", own.display());
        }
    }
    let again = report(&f.project);
    for name in NAMES {
        for stage in STAGES {
            assert_eq!(status_of(&again, name, stage), "cached", "{name} {stage}");
        }
    }
    assert_eq!(again["report"]["status"], "cached");
    assert_eq!(again["report"]["key"], f.json["report"]["key"]);

    // A new learning rate for beta only, and its description says so.
    let beta = f.project.join("experiments/beta.toml");
    let text = std::fs::read_to_string(&beta).unwrap();
    let edited = text.replace("3e-4", "5e-4");
    assert!(
        edited.contains("lr = 5e-4") && edited.contains("check, lr 5e-4"),
        "{edited}"
    );
    std::fs::write(&beta, edited).unwrap();
    let changed = report(&f.project);
    for stage in STAGES {
        assert_eq!(
            status_of(&changed, "alpha", stage),
            "cached",
            "alpha {stage}"
        );
    }
    for stage in ["split", "preprocess"] {
        assert_eq!(status_of(&changed, "beta", stage), "cached", "beta {stage}");
    }
    for stage in ["train", "evaluate", "report"] {
        assert_eq!(status_of(&changed, "beta", stage), "ran", "beta {stage}");
    }
    assert_eq!(changed["report"]["status"], "ran");
    assert_ne!(changed["report"]["key"], f.json["report"]["key"]);
    // The report was rewritten from the new beta: its description changed, alpha's did not.
    let before = std::fs::read_to_string(f.snapshot.join("README.md")).unwrap();
    let readme = std::fs::read_to_string(f.project.join("reports/e2e/README.md")).unwrap();
    assert!(before.contains("end-to-end check, lr 3e-4"), "{before}");
    assert!(
        readme.contains("end-to-end check, lr 5e-4") && !readme.contains("lr 3e-4"),
        "the new report does not show the edited beta:\n{readme}"
    );
    assert!(readme.contains("end-to-end check, lr 1e-3"), "{readme}");

    // The other tests read the snapshot only: the ~600 MB of checkpoints can go.
    std::fs::remove_dir_all(&f.project).unwrap();
}

#[test]
fn report_e2e_page_loads_in_chromium() {
    let Some(bin) = browser::chromium() else {
        return;
    };
    let f = first_report();
    let index = f.snapshot.join("index.html");
    let html = std::fs::read_to_string(&index).unwrap();
    let expected = html.matches("<img").count();
    // Two comparison charts, three curves per experiment, two test images per experiment.
    assert!(expected >= 2 + 3 * 2 + 2 * 2, "{expected} images");
    let shot = output_dir().join("index.png");
    browser::check_page(&bin, &index, expected, &shot);
    println!("screenshot: {}", shot.display());
}
