//! Executors through the real binary: `--executor local --jobs N` (child processes) and
//! `--executor slurm` on a real single-node Slurm cluster (`scripts/slurm-dev.sh start`).
//!
//! The Slurm tests need the cluster up: they fail with a message saying how to start it,
//! unless `DRIVELINE_SKIP_SLURM=1` is set. They run one at a time (the node has few cores).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{parse_stages, ran, synthetic_exp, Project};

static SLURM: Mutex<()> = Mutex::new(());

/// Whether the cluster is up; panics (with how to start it) unless DRIVELINE_SKIP_SLURM=1.
///
/// A node still finishing the previous test's jobs reports `completing` (a `*`, `~` or `#`
/// suffix marks transient states), so that counts as up, and a failed query is retried for up
/// to 30 s before the cluster is declared down.
fn slurm_up() -> bool {
    let query = || {
        Command::new("sinfo")
            .args(["-h", "-o", "%T"])
            .output()
            .is_ok_and(|o| {
                String::from_utf8_lossy(&o.stdout).lines().any(|l| {
                    let state = l
                        .trim()
                        .trim_end_matches(['*', '~', '#', '!', '%', '$', '@']);
                    ["idle", "mixed", "allocated", "completing"].contains(&state)
                })
            })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let up = loop {
        if query() {
            break true;
        }
        if Instant::now() >= deadline {
            break false;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    if !up && std::env::var("DRIVELINE_SKIP_SLURM").as_deref() != Ok("1") {
        panic!(
            "Slurm is not running here: start the single-node test cluster with \
             `sudo scripts/slurm-dev.sh start` (CI does), or set DRIVELINE_SKIP_SLURM=1 to skip \
             the Slurm tests"
        );
    }
    if !up {
        eprintln!("DRIVELINE_SKIP_SLURM=1: Slurm test skipped");
    }
    up
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(o)))
}

/// (experiment, stage) → the stage's JSON object.
fn stages(v: &serde_json::Value) -> BTreeMap<(String, String), serde_json::Value> {
    let mut m = BTreeMap::new();
    for e in v["experiments"].as_array().unwrap() {
        for s in e["stages"].as_array().unwrap() {
            m.insert(
                (
                    e["name"].as_str().unwrap().to_string(),
                    s["name"].as_str().unwrap().to_string(),
                ),
                s.clone(),
            );
        }
    }
    m
}

/// A synthetic experiment on the `dbg` pipeline with Slurm resources.
fn dbg_exp(name: &str, lr: &str, extra: &str) -> String {
    synthetic_exp(name).replace("[train]\n", &format!("[train]\nlr = {lr}\n"))
        + "[resources.default]\ncpus = 1\nmem = \"200M\"\ntime = \"00:10:00\"\n"
        + extra
}

/// (job id, name, state) of every job in the queue.
fn queue() -> Vec<(String, String, String)> {
    let out = Command::new("squeue")
        .args(["-h", "-o", "%i|%j|%T"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let v: Vec<&str> = l.trim().split('|').collect();
            (v.len() == 3).then(|| (v[0].to_string(), v[1].to_string(), v[2].to_string()))
        })
        .collect()
}

/// Watch the queue in the background until `stop`; returns every snapshot.
fn watch_queue(
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<Vec<(String, String, String)>>> {
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            seen.push(queue());
            std::thread::sleep(Duration::from_millis(150));
        }
        seen
    })
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed().as_secs() < secs,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn cache(p: &Project) -> PathBuf {
    p.path().join(".driveline/cache")
}

/// `jobs/<key>/job.json` of the stage `stage`, once submitted.
fn job_record(p: &Project, stage: &str) -> Option<(PathBuf, serde_json::Value)> {
    for e in fs::read_dir(cache(p).join("jobs")).ok()?.flatten() {
        if let Ok(t) = fs::read_to_string(e.path().join("job.json")) {
            let v: serde_json::Value = serde_json::from_str(&t).ok()?;
            if v["stage"] == stage {
                return Some((e.path(), v));
            }
        }
    }
    None
}

#[test]
fn local_jobs_2_runs_independent_stages_at_once() {
    let p = Project::new();
    let a = p.experiment("a", &dbg_exp("a", "0.001", ""));
    let b = p.experiment("b", &dbg_exp("b", "0.002", ""));
    let out = p
        .cmd(&[
            "run",
            "--json",
            "--jobs",
            "2",
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ])
        .env("DRIVELINE_DEBUG_SLEEP_MS", "1500")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let v = json(&out);
    let s = stages(&v);
    let span = |e: &str, st: &str| {
        let x = &s[&(e.to_string(), st.to_string())];
        (
            x["started_at"].as_f64().unwrap(),
            x["finished_at"].as_f64().unwrap(),
        )
    };
    let (a0, a1) = span("a", "fit");
    let (b0, b1) = span("b", "fit");
    assert!(
        a0 < b1 && b0 < a1,
        "fit spans do not overlap: a {a0}..{a1}, b {b0}..{b1}"
    );
    // Shared stages once.
    let st = parse_stages(&out.stdout);
    assert_eq!(ran(&st, "b"), ["fit", "score"]);
    assert_eq!(
        v["executor"]["threads_per_stage"],
        1.max(std::thread::available_parallelism().map_or(1, |n| n.get()) / 2)
    );
    // The same with --jobs 1 runs them one after the other.
    let c = p.experiment("c", &dbg_exp("c", "0.003", ""));
    let d = p.experiment("d", &dbg_exp("d", "0.004", ""));
    let out = p
        .cmd(&["run", "--json", c.to_str().unwrap(), d.to_str().unwrap()])
        .env("DRIVELINE_DEBUG_SLEEP_MS", "300")
        .output()
        .unwrap();
    let s = stages(&json(&out));
    let c1 = s[&("c".to_string(), "score".to_string())]["finished_at"]
        .as_f64()
        .unwrap();
    let d0 = s[&("d".to_string(), "fit".to_string())]["started_at"]
        .as_f64()
        .unwrap();
    assert!(c1 <= d0, "--jobs 1 overlapped stages");
}

#[test]
fn slurm_without_sbatch_is_refused_and_publishes_nothing() {
    let p = Project::new();
    let e = p.experiment("x", &dbg_exp("x", "0.001", ""));
    let empty = tempfile::tempdir().unwrap();
    let out = p
        .cmd(&["run", "--executor", "slurm", e.to_str().unwrap()])
        .env("PATH", empty.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let t = text(&out);
    assert!(t.contains("`sbatch` is not on PATH"), "{t}");
    assert!(p.objects().is_empty());
}

#[test]
fn resources_are_validated_with_file_line_and_column() {
    let p = Project::new();
    let e = p.experiment(
        "r",
        &(synthetic_exp("r") + "[resources.train]\ntime = \"12h\"\ncpu = 4\n"),
    );
    let out = p.run(&["run", e.to_str().unwrap()]);
    let t = text(&out);
    assert!(!out.status.success());
    assert!(
        t.contains("r.toml:") && t.contains("resources.train.cpu"),
        "{t}"
    );
    assert!(
        t.contains("resources.train.cpus"),
        "near-miss suggestion: {t}"
    );
    let e = p.experiment(
        "r",
        &(synthetic_exp("r") + "[resources.train]\ntime = \"12h\"\n"),
    );
    let out = p.run(&["run", e.to_str().unwrap()]);
    let t = text(&out);
    assert!(!out.status.success());
    assert!(
        t.contains("r.toml:") && t.contains("resources.train.time") && t.contains("12h"),
        "{t}"
    );
    assert!(p.objects().is_empty());
    // Resources are in no key: changing them re-runs nothing.
    let ok = p.experiment("k", &dbg_exp("k", "0.001", ""));
    p.run_json(&[ok.to_str().unwrap()]);
    let more = p.experiment(
        "k",
        &dbg_exp("k", "0.001", "").replace("cpus = 1", "cpus = 2"),
    );
    assert!(ran(&p.run_json(&[more.to_str().unwrap()]), "k").is_empty());
}

/// A tiny U-Net experiment on the article's pipeline, whose train takes a few seconds.
fn unet_exp(name: &str, lr: &str, epochs: usize) -> String {
    format!(
        r#"name = "{name}"
pipeline = "deeplabv3"
[data]
layout = "synthetic"
valid_count = 2
[data.synthetic]
count = 8
test_count = 1
width = 64
height = 64
[model]
arch = "unet"
widths = [4, 8]
[train]
imgsz = 64
epochs = {epochs}
batch = 2
lr = {lr}
save_preds_every = 0
[resources.default]
cpus = 1
mem = "1G"
time = "00:20:00"
"#
    )
}

#[test]
fn slurm_two_experiments_share_stages_train_in_parallel_and_report_after() {
    let _one = SLURM.lock().unwrap_or_else(|e| e.into_inner());
    if !slurm_up() {
        return;
    }
    let p = Project::new();
    let a = p.experiment("a", &unet_exp("a", "0.005", 40));
    let b = p.experiment("b", &unet_exp("b", "0.002", 40));
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_queue(stop.clone());
    let out = p
        .cmd(&[
            "report",
            "--executor",
            "slurm",
            "--poll-interval",
            "0.5",
            "--name",
            "cmp",
            "--json",
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    stop.store(true, Ordering::SeqCst);
    let seen = watcher.join().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let v = json(&out);
    let s = stages(&v);
    let st = |e: &str, x: &str| s[&(e.to_string(), x.to_string())].clone();
    for x in ["split", "preprocess"] {
        assert_eq!(st("a", x)["status"], "ran", "{x}");
        assert_eq!(
            st("b", x)["status"],
            "cached",
            "{x}: shared stages run once"
        );
    }
    let (ja, jb) = (
        st("a", "train")["job"].clone(),
        st("b", "train")["job"].clone(),
    );
    assert!(
        ja.is_string() && jb.is_string() && ja != jb,
        "two train jobs: {ja} {jb}"
    );
    let both_running = seen.iter().any(|snap| {
        snap.iter()
            .filter(|(_, n, s)| n.ends_with("-train") && s == "RUNNING")
            .count()
            >= 2
    });
    assert!(
        both_running,
        "squeue never showed both trains running: {seen:?}"
    );
    // The comparison ran after both experiments' reports.
    assert_eq!(v["report"]["status"], "ran");
    let cmp_start = v["report"]["started_at"].as_f64().unwrap();
    for e in ["a", "b"] {
        assert!(st(e, "report")["finished_at"].as_f64().unwrap() <= cmp_start);
    }
    assert!(p.path().join("reports/cmp/index.html").is_file());
    let verify = p.run(&["cache", "verify", "--all"]);
    assert!(
        verify.status.success() && text(&verify).contains(" 0 damaged"),
        "{}",
        text(&verify)
    );
}

#[test]
fn slurm_cancelled_train_fails_clearly_and_the_rerun_resumes() {
    let _one = SLURM.lock().unwrap_or_else(|e| e.into_inner());
    if !slurm_up() {
        return;
    }
    let p = Project::new();
    let e = p.experiment("t", &unet_exp("t", "0.005", 60));
    let e = e.to_str().unwrap();
    let child = p
        .cmd(&["run", "--executor", "slurm", "--poll-interval", "0.5", e])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Cancel once the train job has completed a period (its resume state is written).
    wait_for("a completed training period", 600, || {
        fs::read_dir(cache(&p).join("work"))
            .is_ok_and(|r| r.flatten().any(|d| d.path().join("state.json").is_file()))
    });
    let (_, rec) = job_record(&p, "train").expect("train submitted");
    let id = rec["id"].as_str().unwrap().to_string();
    assert!(Command::new("scancel").arg(&id).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        t.contains("stage `train`")
            && t.contains(&format!("Slurm job {id}"))
            && t.contains("cancelled"),
        "{t}"
    );
    assert!(
        t.contains(&format!("slurm-{id}.log")),
        "the log is named: {t}"
    );
    assert!(!p.path().join("runs/t/train").exists(), "nothing published");
    // The rerun submits it again, and training resumes from its last completed period.
    let again = p
        .cmd(&[
            "run",
            "--json",
            "--executor",
            "slurm",
            "--poll-interval",
            "0.5",
            e,
        ])
        .output()
        .unwrap();
    assert!(again.status.success(), "{}", text(&again));
    let s = stages(&json(&again));
    let new_id = s[&("t".to_string(), "train".to_string())]["job"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(new_id, id);
    let (dir, _) = job_record(&p, "train").unwrap();
    let log = fs::read_to_string(dir.join(format!("slurm-{new_id}.log"))).unwrap();
    assert!(log.contains("resuming after period"), "{log}");
}

#[test]
fn slurm_restarted_driver_reattaches_instead_of_resubmitting() {
    let _one = SLURM.lock().unwrap_or_else(|e| e.into_inner());
    if !slurm_up() {
        return;
    }
    let p = Project::new();
    let e = p.experiment("k", &dbg_exp("k", "0.001", ""));
    let e = e.to_str().unwrap();
    let args = [
        "run",
        "--json",
        "--executor",
        "slurm",
        "--poll-interval",
        "0.5",
        e,
    ];
    let mut first = p
        .cmd(&args)
        .env("DRIVELINE_DEBUG_SLEEP_MS", "6000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("fit to be submitted", 300, || {
        job_record(&p, "fit").is_some()
    });
    let (_, rec) = job_record(&p, "fit").unwrap();
    first.kill().unwrap(); // SIGKILL: no chance to cancel anything
    first.wait().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_queue(stop.clone());
    let second = p
        .cmd(&args)
        .env("DRIVELINE_DEBUG_SLEEP_MS", "6000")
        .output()
        .unwrap();
    stop.store(true, Ordering::SeqCst);
    let seen = watcher.join().unwrap();
    assert!(second.status.success(), "{}", text(&second));
    for snap in &seen {
        let mut names = BTreeSet::new();
        for (_, n, _) in snap.iter().filter(|(_, n, _)| n.starts_with("dl-")) {
            assert!(
                names.insert(n.clone()),
                "two jobs for {n} in one squeue: {snap:?}"
            );
        }
    }
    let v = json(&second);
    assert!(v["executor"]["adopted"].as_u64().unwrap() >= 1, "{v}");
    let s = stages(&v);
    assert_eq!(s[&("k".to_string(), "fit".to_string())]["job"], rec["id"]);
    assert!(text(&second).contains("reattached"), "{}", text(&second));
}

#[test]
fn slurm_job_over_its_time_is_reported_as_a_timeout() {
    let _one = SLURM.lock().unwrap_or_else(|e| e.into_inner());
    if !slurm_up() {
        return;
    }
    let p = Project::new();
    let e = p.experiment(
        "late",
        &dbg_exp("late", "0.001", "[resources.fit]\ntime = \"00:01:00\"\n"),
    );
    let e = e.to_str().unwrap();
    // split and preprocess first, quickly.
    p.run_json(&[e, "--until", "preprocess"]);
    let out = p
        .cmd(&["run", "--executor", "slurm", "--poll-interval", "1", e])
        .env("DRIVELINE_DEBUG_SLEEP_MS", "400000")
        .output()
        .unwrap();
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        t.contains("stage `fit`") && t.contains("timed out (time = 00:01:00)"),
        "{t}"
    );
    assert!(t.contains("Slurm job") && t.contains(".log"), "{t}");
    assert!(
        !p.path().join("runs/late/fit").exists(),
        "nothing published"
    );
}

#[test]
fn slurm_job_that_cannot_write_the_cache_fails_clearly() {
    let _one = SLURM.lock().unwrap_or_else(|e| e.into_inner());
    if !slurm_up() {
        return;
    }
    let p = Project::new();
    let e = p.experiment("w", &dbg_exp("w", "0.001", ""));
    let e = e.to_str().unwrap();
    // The driver can reach the cache; the job cannot create its work folder (an immutable
    // work/ stands in for a compute node that cannot write to the cache directory).
    p.run(&["status", e]);
    let work = cache(&p).join("work");
    struct Mutable(PathBuf);
    impl Drop for Mutable {
        fn drop(&mut self) {
            Command::new("chattr").arg("-i").arg(&self.0).status().ok();
        }
    }
    let made = Command::new("chattr")
        .arg("+i")
        .arg(&work)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "chattr +i {} failed: {}",
        work.display(),
        String::from_utf8_lossy(&made.stderr)
    );
    let _undo = Mutable(work.clone());
    let out = p
        .cmd(&["run", "--executor", "slurm", "--poll-interval", "0.5", e])
        .output()
        .unwrap();
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        t.contains("stage `split`") && t.contains("exit code 1"),
        "{t}"
    );
    assert!(
        t.contains("cannot create") && t.contains("work"),
        "the log tail says why: {t}"
    );
    assert!(p.objects().is_empty(), "nothing published");
}

#[test]
fn slurm_two_drivers_at_once_compute_every_stage_once() {
    let _one = SLURM.lock().unwrap_or_else(|e| e.into_inner());
    if !slurm_up() {
        return;
    }
    let p = Project::new();
    let e = p.experiment("d", &dbg_exp("d", "0.001", ""));
    let e = e.to_str().unwrap();
    let spawn = || {
        p.cmd(&[
            "run",
            "--json",
            "--executor",
            "slurm",
            "--poll-interval",
            "0.5",
            e,
        ])
        .env("DRIVELINE_DEBUG_SLEEP_MS", "1500")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (oa, ob) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(oa.status.success(), "{}", text(&oa));
    assert!(ob.status.success(), "{}", text(&ob));
    // Each key computed by exactly one job: one result with status "ran" per stage.
    for entry in fs::read_dir(cache(&p).join("jobs")).unwrap().flatten() {
        let ran = fs::read_dir(entry.path())
            .unwrap()
            .flatten()
            .filter(|f| f.file_name().to_string_lossy().starts_with("result-"))
            .filter(|f| {
                fs::read_to_string(f.path())
                    .unwrap()
                    .contains("\"status\":\"ran\"")
            })
            .count();
        assert_eq!(ran, 1, "{}", entry.path().display());
    }
    assert_eq!(p.objects().len(), 4);
}

#[test]
fn slurm_polling_costs_one_squeue_call_per_cycle_whatever_the_number_of_jobs() {
    let _one = SLURM.lock().unwrap_or_else(|e| e.into_inner());
    if !slurm_up() {
        return;
    }
    let p = Project::new();
    let files: Vec<String> = (0..20)
        .map(|i| {
            p.experiment(
                &format!("e{i}"),
                &dbg_exp(&format!("e{i}"), &format!("0.{:03}", i + 1), ""),
            )
            .to_string_lossy()
            .into_owned()
        })
        .collect();
    // A counting squeue in front of the real one.
    let bin = tempfile::tempdir().unwrap();
    let log = bin.path().join("calls.log");
    let real = String::from_utf8(
        Command::new("sh")
            .args(["-c", "command -v squeue"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    fs::write(
        bin.path().join("squeue"),
        format!(
            "#!/bin/sh\necho \"$*\" >> {}\nexec {real} \"$@\"\n",
            log.display()
        ),
    )
    .unwrap();
    Command::new("chmod")
        .arg("+x")
        .arg(bin.path().join("squeue"))
        .status()
        .unwrap();
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap()
    );
    let mut args = vec![
        "run",
        "--json",
        "--executor",
        "slurm",
        "--poll-interval",
        "0.3",
    ];
    args.extend(files.iter().map(|s| s.as_str()));
    let out = p
        .cmd(&args)
        .env("PATH", &path)
        .env("DRIVELINE_DEBUG_SLEEP_MS", "300")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let v = json(&out);
    let calls: Vec<String> = fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let polls = v["executor"]["polls"].as_u64().unwrap();
    assert_eq!(
        calls.len() as u64,
        v["executor"]["squeue_calls"].as_u64().unwrap()
    );
    assert_eq!(
        calls.len() as u64,
        polls + 1,
        "one call per poll, plus one at start: {calls:?}"
    );
    let most = calls
        .iter()
        .map(|c| {
            c.split_once("-j ")
                .map_or(0, |(_, ids)| ids.split(',').count())
        })
        .max()
        .unwrap();
    assert!(most >= 20, "one call covered {most} jobs at most");
    eprintln!("{} jobs, {polls} polls", v["executor"]["submitted"]);
}

#[test]
fn slurm_sigterm_cancels_the_drivers_jobs_unless_detached() {
    let _one = SLURM.lock().unwrap_or_else(|e| e.into_inner());
    if !slurm_up() {
        return;
    }
    for detach in [false, true] {
        let p = Project::new();
        let e = p.experiment("s", &dbg_exp("s", "0.001", ""));
        let e = e.to_str().unwrap();
        p.run_json(&[e, "--until", "preprocess"]);
        let mut args = vec!["run", "--executor", "slurm", "--poll-interval", "0.5", e];
        if detach {
            args.push("--detach");
        }
        let child = p
            .cmd(&args)
            .env("DRIVELINE_DEBUG_SLEEP_MS", "30000")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for("fit to be submitted", 300, || {
            job_record(&p, "fit").is_some()
        });
        let (_, rec) = job_record(&p, "fit").unwrap();
        let id = rec["id"].as_str().unwrap().to_string();
        // status, from another process, shows the stage's job.
        let st = text(&p.run(&["status", e]));
        assert!(st.contains(&format!("in Slurm job {id}")), "{st}");
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let out = child.wait_with_output().unwrap();
        assert!(!out.status.success(), "{}", text(&out));
        assert!(text(&out).contains("interrupted"), "{}", text(&out));
        let listed = || queue().iter().any(|(j, _, _)| *j == id);
        if detach {
            assert!(listed(), "--detach left the job running");
            assert!(text(&out).contains("--detach"), "{}", text(&out));
            Command::new("scancel").arg(&id).status().unwrap();
        } else {
            assert!(
                text(&out).contains(&format!("cancelled Slurm jobs {id}")),
                "{}",
                text(&out)
            );
            wait_for("the job to leave the queue", 60, || !listed());
        }
        assert!(!p.path().join("runs/s/fit").exists());
    }
}
