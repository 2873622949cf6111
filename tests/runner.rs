//! The runner's promises, end to end through the real binary: caching, exact invalidation,
//! sharing between experiments, reverts, crash safety, concurrency and bad input.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{assert_unchanged, drive_root, parse_stages, ran, synthetic_exp, Project};

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn second_run_runs_nothing() {
    let p = Project::new();
    let e = p.experiment("a", &synthetic_exp("a"));
    let e = e.to_str().unwrap();
    let first = p.run_json(&[e]);
    assert_eq!(
        ran(&first, "a"),
        names(&["split", "preprocess", "fit", "score"])
    );
    let t0 = Instant::now();
    let second = p.run_json(&[e]);
    let took = t0.elapsed();
    let expected: Vec<(String, String, String)> = ["split", "preprocess", "fit", "score"]
        .iter()
        .map(|s| ("a".to_string(), s.to_string(), "cached".to_string()))
        .collect();
    assert_eq!(second, expected, "every stage reported, all cached");
    eprintln!("second run of an unchanged experiment: {took:?}");
    // Stable, readable paths to the outputs.
    assert!(p
        .path()
        .join("runs/a/preprocess/data.safetensors")
        .is_file());
    assert!(p.path().join("runs/a/split/split.json").is_file());
}

/// Edits rerun exactly the stages whose params they touch, and what is downstream.
fn edit_scenario(p: &Project, base: &str) {
    let e = p.experiment("x", base);
    let e = e.to_str().unwrap();
    p.run_json(&[e]);
    let cases: &[(&str, &[&str])] = &[
        ("evaluate.threshold=0.4", &["score"]),
        ("train.lr=3e-4", &["fit", "score"]),
        ("augment.rotate=5.0", &["fit", "score"]),
        ("train.imgsz=72", &["preprocess", "fit", "score"]),
        (
            "data.valid_count=3",
            &["split", "preprocess", "fit", "score"],
        ),
        ("train.epochs=7", &[]), // read by no stage of this pipeline
    ];
    for (set, expect) in cases {
        let got = p.run_json(&[e, "--set", set]);
        assert_eq!(ran(&got, "x"), names(expect), "after --set {set}");
        // Reverting the edit runs nothing: the earlier outputs are still in the cache.
        let back = p.run_json(&[e]);
        assert!(ran(&back, "x").is_empty(), "revert of {set}: {back:?}");
    }
}

#[test]
fn edits_rerun_exactly_the_affected_stages_synthetic() {
    let p = Project::new();
    edit_scenario(&p, &synthetic_exp("x"));
}

#[test]
fn edits_rerun_exactly_the_affected_stages_drive() {
    let Some(root) = drive_root() else { return };
    let p = Project::new();
    edit_scenario(
        &p,
        &format!(
            "name = \"x\"\npipeline = \"dbg\"\n[data]\nlayout = \"drive\"\nroot = \"{}\"\n[train]\nimgsz = 64\n",
            root.display()
        ),
    );
}

#[test]
fn status_explains_why_a_stage_is_stale() {
    let p = Project::new();
    let e = p.experiment("s", &synthetic_exp("s"));
    let e = e.to_str().unwrap();
    p.run_json(&[e]);
    let before = p.written();
    assert!(
        before.iter().any(|l| l.starts_with("runs/s/fit ->")),
        "{before:?}"
    );
    let out = p.run(&["status", e, "--set", "train.lr=0.0003"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("split: fresh"), "{text}");
    assert!(
        text.contains("fit: stale (train.lr 0.0001 → 0.0003)"),
        "{text}"
    );
    assert!(
        text.contains("score: stale (upstream fit changed)"),
        "{text}"
    );
    // status runs nothing: no object, work folder or link appears or changes...
    assert_unchanged(&before, &p.written(), "status wrote to the cache or runs/");
    // ...so the edit it called stale still has everything to run.
    let edited = p.run_json(&[e, "--set", "train.lr=0.0003"]);
    assert_eq!(ran(&edited, "s"), names(&["fit", "score"]));
}

#[test]
fn experiments_sharing_data_params_compute_split_and_preprocess_once() {
    let p = Project::new();
    let a = p.experiment("a", &synthetic_exp("a"));
    let b = p.experiment(
        "b",
        &synthetic_exp("b").replace("[train]\n", "[train]\nlr = 0.001\n"),
    );
    let got = p.run_json(&[a.to_str().unwrap(), b.to_str().unwrap()]);
    assert_eq!(
        ran(&got, "a"),
        names(&["split", "preprocess", "fit", "score"])
    );
    assert_eq!(ran(&got, "b"), names(&["fit", "score"]));
    // and both experiments see the same published split
    let la = std::fs::read_link(p.path().join("runs/a/split")).unwrap();
    let lb = std::fs::read_link(p.path().join("runs/b/split")).unwrap();
    assert_eq!(la, lb);
}

#[test]
fn until_force_and_dry_run() {
    let p = Project::new();
    let e = p.experiment("u", &synthetic_exp("u"));
    let e = e.to_str().unwrap();
    let got = p.run_json(&[e, "--until", "preprocess"]);
    assert_eq!(ran(&got, "u"), names(&["split", "preprocess"]));
    assert_eq!(got.len(), 2);
    let before = p.written();
    let out = p.run(&["run", "--json", "--dry-run", e]);
    assert!(out.status.success());
    let plan = parse_stages(&out.stdout);
    let stale: Vec<_> = plan
        .iter()
        .filter(|s| s.2 == "stale")
        .map(|s| s.1.as_str())
        .collect();
    assert_eq!(stale, ["fit", "score"]);
    assert_unchanged(
        &before,
        &p.written(),
        "the dry run wrote to the cache or runs/",
    );
    p.run_json(&[e]);
    let forced = p.run_json(&[e, "--force", "preprocess"]);
    assert_eq!(ran(&forced, "u"), names(&["preprocess", "fit", "score"]));
    let out = p.run(&["run", e, "--until", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--until nope: no such stage"));
}

#[test]
fn sigkill_mid_stage_publishes_nothing_and_the_rerun_succeeds() {
    let p = Project::new();
    let e = p.experiment("k", &synthetic_exp("k"));
    let e = e.to_str().unwrap();
    p.run_json(&[e, "--until", "preprocess"]);
    let objects_before = p.objects();
    let mut child = p
        .cmd(&["run", e])
        .env("DRIVELINE_DEBUG_SLEEP_MS", "20000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the `fit` stage has started writing (its partial file exists).
    let work = p.path().join(".driveline/cache/work");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let started = std::fs::read_dir(&work)
            .map(|r| r.flatten().any(|d| d.path().join("partial.txt").exists()))
            .unwrap_or(false);
        if started {
            break;
        }
        assert!(Instant::now() < deadline, "the stage never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(
        p.objects(),
        objects_before,
        "a killed stage published nothing"
    );
    let status = p.run(&["status", e]);
    assert!(String::from_utf8_lossy(&status.stdout).contains("fit: stale"));
    let rerun = p.run_json(&[e]);
    assert_eq!(ran(&rerun, "k"), names(&["fit", "score"]));
    let params = std::fs::read_to_string(p.path().join("runs/k/fit/params.json")).unwrap();
    assert!(params.contains("\"stage\": \"fit\""));
}

#[test]
fn concurrent_runs_compute_each_stage_once() {
    let p = Project::new();
    let e = p.experiment("c", &synthetic_exp("c"));
    let e = e.to_str().unwrap();
    let spawn = || {
        p.cmd(&["run", "--json", e])
            .env("DRIVELINE_DEBUG_SLEEP_MS", "1500")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let a = spawn();
    let b = spawn();
    let oa = a.wait_with_output().unwrap();
    let ob = b.wait_with_output().unwrap();
    assert!(
        oa.status.success(),
        "{}",
        String::from_utf8_lossy(&oa.stderr)
    );
    assert!(
        ob.status.success(),
        "{}",
        String::from_utf8_lossy(&ob.stderr)
    );
    let sa = parse_stages(&oa.stdout);
    let sb = parse_stages(&ob.stdout);
    for stage in ["split", "preprocess", "fit", "score"] {
        let n = sa
            .iter()
            .chain(&sb)
            .filter(|(_, s, st)| s == stage && st == "ran")
            .count();
        assert_eq!(n, 1, "stage {stage} ran {n} times: {sa:?} {sb:?}");
    }
    // Outputs verify: a third run finds everything cached.
    let third = p.run_json(&[e]);
    assert!(ran(&third, "c").is_empty());
}
