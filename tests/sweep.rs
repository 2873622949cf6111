//! Sweeps end to end through the real binary, on synthetic data: a 2×2 grid over `train.lr`
//! and `train.seed` on the quick experiment (shared stages run once, the second run is all
//! cached), `driveline runs` and `driveline diff` on its points, the sweep report in headless
//! Chromium; zip and `--sweep` against the equivalent TOML; every bad sweep refused with
//! nothing published.

mod browser;
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use common::{parse_stages, Project};
use serde_json::Value;

/// The grid on the quick experiment's pipeline and model, at tiny sizes so it trains in
/// seconds: lr is declared first, so it varies slowest.
const GRID: &str = r#"extends = "quick.toml"
[data.synthetic]
count = 4
test_count = 2
width = 64
height = 64
[train]
imgsz = 64
epochs = 1
save_preds_every = 0
[report]
images = 2
[sweep]
"train.lr" = [1e-3, 3e-4]
"train.seed" = [0, 1]
"#;

const POINTS: [&str; 4] = [
    "quick.lr_1e-3.seed_0",
    "quick.lr_1e-3.seed_1",
    "quick.lr_3e-4.seed_0",
    "quick.lr_3e-4.seed_1",
];

struct Grid {
    project: Project,
    /// `driveline run --json` of the first run: (experiment, stage, status).
    first: Vec<(String, String, String)>,
}

/// Runs the grid once per test binary.
fn grid() -> &'static Grid {
    static GRID_RUN: OnceLock<Grid> = OnceLock::new();
    GRID_RUN.get_or_init(|| {
        let project = Project::new();
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/quick.toml"),
            project.path().join("experiments/quick.toml"),
        )
        .unwrap();
        project.experiment("grid", GRID);
        let first = project.run_json(&["experiments/grid.toml"]);
        Grid { project, first }
    })
}

fn json(p: &Project, args: &[&str]) -> Value {
    let out = p.run(args);
    assert!(
        out.status.success(),
        "driveline {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// How many times each stage ran, over every experiment.
fn ran_count(stages: &[(String, String, String)]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for (_, stage, status) in stages {
        if status == "ran" {
            *m.entry(stage.clone()).or_insert(0) += 1;
        }
    }
    m
}

#[test]
fn grid_shares_stages_and_the_second_run_is_cached() {
    let g = grid();
    let names: Vec<&str> = {
        let mut v: Vec<&str> = g.first.iter().map(|(e, _, _)| e.as_str()).collect();
        v.dedup();
        v
    };
    assert_eq!(names, POINTS);
    let ran = ran_count(&g.first);
    assert_eq!(
        ran,
        BTreeMap::from([
            ("split".to_string(), 1),
            ("preprocess".to_string(), 1),
            ("train".to_string(), 4),
            ("evaluate".to_string(), 4),
            ("report".to_string(), 4),
        ]),
        "{:?}",
        g.first
    );
    let second = g.project.run_json(&["experiments/grid.toml"]);
    assert_eq!(second.len(), 20);
    assert!(
        second.iter().all(|(_, _, s)| s == "cached"),
        "second run: {second:?}"
    );
    for p in POINTS {
        assert!(g.project.path().join("runs").join(p).join("train").is_dir());
    }
}

/// `driveline runs --json`, from runs/ and from the sweep file: the four points, their
/// differing params, their metrics.
#[test]
fn runs_lists_the_points_with_their_params_and_metrics() {
    let g = grid();
    let from_dir = json(&g.project, &["runs", "--json"]);
    let from_file = json(&g.project, &["runs", "experiments/grid.toml", "--json"]);
    for v in [&from_dir, &from_file] {
        assert_eq!(
            v["differing"],
            serde_json::json!(["train.lr", "train.seed"])
        );
        assert_eq!(v["common"]["train.epochs"], 1);
        let rows = v["experiments"].as_array().unwrap();
        let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
        assert_eq!(names, POINTS);
        for (r, (lr, seed)) in rows
            .iter()
            .zip([(1e-3, 0), (1e-3, 1), (3e-4, 0), (3e-4, 1)])
        {
            assert_eq!(r["params"]["train.lr"].as_f64(), Some(lr), "{r}");
            assert_eq!(r["params"]["train.seed"], seed, "{r}");
            assert_eq!(r["params"].as_object().unwrap().len(), 2, "{r}");
            assert_eq!(r["stale"], false, "{r}");
            for m in [
                "best_valid_miou",
                "valid_f1",
                "valid_auc",
                "test_f1",
                "test_auc",
                "train_seconds",
            ] {
                let x = r["metrics"][m].as_f64();
                assert!(x.is_some_and(f64::is_finite), "{m} missing in {r}");
            }
        }
        // The same metrics whichever way the experiments are found.
        assert_eq!(rows[0]["metrics"], from_dir["experiments"][0]["metrics"]);
    }
    assert_eq!(
        from_file["experiments"][2]["point"],
        "quick[lr=3e-4,seed=0]"
    );
    // Sorted by a metric, best first; the text and CSV forms.
    let sorted = json(&g.project, &["runs", "--json", "--sort", "miou"]);
    let mious: Vec<f64> = sorted["experiments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["metrics"]["best_valid_miou"].as_f64().unwrap())
        .collect();
    assert!(mious.windows(2).all(|w| w[0] >= w[1]), "{mious:?}");
    let text = g.project.run(&["runs"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.starts_with("common: "), "{text}");
    assert!(text.contains("lr") && text.contains("seed") && text.contains("quick.lr_3e-4.seed_1"));
    let csv = g.project.run(&["runs", "--csv"]);
    let csv = String::from_utf8_lossy(&csv.stdout);
    assert!(
        csv.starts_with("name,point,split,preprocess,train,evaluate,report,train.lr,train.seed,"),
        "{csv}"
    );
    assert_eq!(csv.lines().count(), 5);
}

/// `driveline diff` of two points: exactly the swept param, and every metric's delta.
#[test]
fn diff_of_two_points_shows_the_param_and_metric_deltas() {
    let g = grid();
    let runs = json(&g.project, &["runs", "--json"]);
    let metrics = |name: &str| -> serde_json::Map<String, Value> {
        runs["experiments"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap()["metrics"]
            .as_object()
            .unwrap()
            .clone()
    };
    for (a, b, key) in [
        (POINTS[0], POINTS[2], "train.lr"),
        (POINTS[2], POINTS[3], "train.seed"),
    ] {
        let d = json(&g.project, &["diff", a, b, "--json"]);
        let params = d["params"].as_array().unwrap();
        assert_eq!(params.len(), 1, "{d}");
        assert_eq!(params[0]["key"], key);
        let (ma, mb) = (metrics(a), metrics(b));
        let listed: Vec<&str> = d["metrics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["metric"].as_str().unwrap())
            .collect();
        assert!(listed.len() >= 6, "{listed:?}");
        for m in d["metrics"].as_array().unwrap() {
            let name = m["metric"].as_str().unwrap();
            let (x, y) = (ma[name].as_f64().unwrap(), mb[name].as_f64().unwrap());
            assert_eq!(m["a"].as_f64(), Some(x));
            // Within JSON's float round trip.
            let delta = m["delta"].as_f64().unwrap();
            assert!(
                (delta - (y - x)).abs() < 1e-12,
                "{name}: {delta} vs {}",
                y - x
            );
        }
    }
    // The human form, and a sweep file (several points) refused as one side.
    let out = g.project.run(&["diff", POINTS[0], POINTS[2]]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("train.lr  1e-3 → 3e-4"), "{text}");
    assert!(text.contains("best_valid_miou"), "{text}");
    let out = g.project.run(&["diff", "experiments/grid.toml", POINTS[0]]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is a sweep of 4 experiments"), "{err}");
    let out = g.project.run(&["diff", "nope", POINTS[0]]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no experiment `nope` under"));
}

/// `driveline report` over the sweep: every point in the report; the page loads every image
/// in headless Chromium and its results table sorts on a click.
#[test]
fn sweep_report_includes_every_point_and_sorts_in_chromium() {
    let g = grid();
    let v = json(
        &g.project,
        &[
            "report",
            "experiments/grid.toml",
            "--name",
            "grid",
            "--json",
        ],
    );
    assert!(parse_stages(v.to_string().as_bytes())
        .iter()
        .all(|(_, _, s)| s == "cached"));
    let dir = g.project.path().join("reports/grid");
    let csv = std::fs::read_to_string(dir.join("summary.csv")).unwrap();
    for p in POINTS {
        assert!(csv.contains(p), "{p} missing from summary.csv");
    }
    // Two params differ: a table column each, no one-dimensional plot.
    assert!(!dir.join("sweep.png").exists());
    let html = std::fs::read_to_string(dir.join("index.html")).unwrap();
    assert!(html.contains("<th class=\"num\">lr</th><th class=\"num\">seed</th>"));
    let Some(bin) = browser::chromium() else {
        return;
    };
    // Two comparison plots, three curves per point, two predictions per point.
    browser::check_page(
        &bin,
        &dir.join("index.html"),
        2 + 3 * 4 + 2 * 4,
        &g.project.path().join("grid.png"),
    );
    let orders = browser::click_headers(
        &bin,
        &dir.join("index.html"),
        &["Best valid mIoU", "Experiment"],
    );
    assert_eq!(orders[0], POINTS, "before any click");
    // Largest first, as the page shows them (4 decimals; ties keep the table's order).
    let runs = json(&g.project, &["runs", "--json"]);
    let mut rows: Vec<(String, String)> = runs["experiments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let m = r["metrics"]["best_valid_miou"].as_f64().unwrap();
            (r["name"].as_str().unwrap().to_string(), format!("{m:.4}"))
        })
        .collect();
    rows.sort_by(|a, b| {
        b.1.parse::<f64>()
            .unwrap()
            .total_cmp(&a.1.parse::<f64>().unwrap())
    });
    let by_miou: Vec<String> = rows.into_iter().map(|r| r.0).collect();
    assert_eq!(orders[1], by_miou, "after a click on Best valid mIoU");
    assert_eq!(orders[2], POINTS, "after a click on Experiment");
}

/// The dbg test pipeline's experiment, with `body` appended.
fn dbg_exp(name: &str, body: &str) -> String {
    format!("{}{body}", common::synthetic_exp(name))
}

/// (name, [(stage, key)]) per experiment of `driveline status --json ARGS`.
fn keys(p: &Project, args: &[&str]) -> Vec<(String, Vec<(String, String)>)> {
    let mut a = vec!["status", "--json"];
    a.extend_from_slice(args);
    let v = json(p, &a);
    v["experiments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let stages = e["stages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| {
                    (
                        s["name"].as_str().unwrap().to_string(),
                        s["key"].as_str().unwrap().to_string(),
                    )
                })
                .collect();
            (e["name"].as_str().unwrap().to_string(), stages)
        })
        .collect()
}

#[test]
fn zip_and_command_line_sweeps_give_the_points_of_the_equivalent_toml() {
    let p = Project::new();
    let base = p.experiment("b", &common::synthetic_exp("b"));
    let base = base.to_str().unwrap();
    // zip: the i-th values together; the equivalent TOML is one file per point.
    p.experiment(
        "z",
        &dbg_exp(
            "b",
            "[sweep]\nmode = \"zip\"\n\"train.lr\" = [1e-3, 3e-4]\n\"augment.rotate\" = [0.0, 10.0]\n",
        ),
    );
    let zip = keys(&p, &["experiments/z.toml"]);
    let names: Vec<&str> = zip.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["b.lr_1e-3.rotate_0", "b.lr_3e-4.rotate_10"]);
    for (i, (lr, rot)) in [("1e-3", "0.0"), ("3e-4", "10.0")].iter().enumerate() {
        let f = p.experiment(
            &format!("by_hand{i}"),
            &dbg_exp(
                &format!("h{i}"),
                &format!("lr = {lr}\n[augment]\nrotate = {rot}\n"),
            ),
        );
        let hand = keys(&p, &[f.to_str().unwrap()]);
        assert_eq!(hand[0].1, zip[i].1, "point {i}: stage keys");
    }
    let cli = keys(
        &p,
        &[
            base,
            "--sweep",
            "train.lr=1e-3,3e-4",
            "--sweep",
            "augment.rotate=0.0,10.0",
            "--sweep-mode",
            "zip",
        ],
    );
    assert_eq!(cli, zip);
    // grid: the TOML and the command line agree, point by point.
    p.experiment(
        "g",
        &dbg_exp(
            "b",
            "[sweep]\n\"train.lr\" = [1e-3, 3e-4]\n\"augment.rotate\" = [0.0, 10.0]\n",
        ),
    );
    let grid = keys(&p, &["experiments/g.toml"]);
    assert_eq!(grid.len(), 4);
    let cli = keys(
        &p,
        &[
            base,
            "--sweep",
            "train.lr=1e-3,3e-4",
            "--sweep",
            "augment.rotate=0.0,10.0",
        ],
    );
    assert_eq!(cli, grid);
    // `runs` on points never run says so, and runs nothing.
    let v = json(&p, &["runs", "experiments/g.toml", "--json"]);
    let rows = v["experiments"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    assert!(rows.iter().all(|r| r["stale"] == true));
    assert_eq!(rows[0]["stages"][0]["reason"], "never run");
    assert!(p.objects().is_empty(), "runs published {:?}", p.objects());
    assert!(!p.path().join("runs").exists());
    // Under runs/: after a change that reran only preprocess, what was computed from the old
    // preprocess output is stale, and says why.
    p.run_json(&["experiments/g.toml"]);
    let fresh = json(&p, &["runs", "--json"]);
    assert!(fresh["experiments"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["stale"] == false));
    p.run_json(&[
        "experiments/g.toml",
        "--set",
        "train.imgsz=72",
        "--until",
        "preprocess",
    ]);
    let v = json(&p, &["runs", "--json"]);
    let rows = v["experiments"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    for r in rows {
        let state = |i: usize| {
            (
                r["stages"][i]["name"].as_str().unwrap(),
                r["stages"][i]["state"].as_str().unwrap(),
            )
        };
        assert_eq!(state(1), ("preprocess", "fresh"), "{r}");
        assert_eq!(state(2), ("fit", "stale"), "{r}");
        assert_eq!(state(3), ("score", "stale"), "{r}");
        assert_eq!(
            r["stages"][2]["reason"],
            "upstream preprocess changed since it ran"
        );
    }
}

/// Run, expect failure; return stderr, after checking nothing was published.
fn refused(p: &Project, args: &[&str]) -> String {
    let out = p.run(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.code().is_some_and(|c| c != 0),
        "expected failure for {args:?}\n{err}"
    );
    assert!(
        p.objects().is_empty(),
        "{args:?} published {:?}",
        p.objects()
    );
    assert!(!p.path().join("runs").exists(), "{args:?} created runs/");
    err
}

#[test]
fn bad_sweeps_are_refused_before_anything_runs() {
    let p = Project::new();
    let file = |name: &str, sweep: &str| {
        let f = p.experiment(name, &dbg_exp("s", &format!("[sweep]\n{sweep}\n")));
        f.to_str().unwrap().to_string()
    };
    let e = refused(
        &p,
        &["run", &file("unknown", "\"trian.lr\" = [1e-3, 3e-4]")],
    );
    assert!(
        e.contains("`trian.lr`: unknown key in the sweep (did you mean `train.lr`?)"),
        "{e}"
    );
    let e = refused(&p, &["run", &file("empty", "\"train.lr\" = []")]);
    assert!(e.contains("empty.toml:14:1: `train.lr`: empty list"), "{e}");
    let e = refused(
        &p,
        &[
            "run",
            &file(
                "zip",
                "mode = \"zip\"\n\"train.lr\" = [1e-3, 3e-4]\n\"train.seed\" = [1, 2, 3]",
            ),
        ],
    );
    assert!(
        e.contains("\"zip\" needs lists of equal length: train.lr has 2, train.seed has 3"),
        "{e}"
    );
    let seeds: Vec<String> = (0..91).map(|i| i.to_string()).collect();
    let big = file(
        "big",
        &format!(
            "\"train.lr\" = [{}]\n\"train.seed\" = [{}]",
            (1..=11)
                .map(|i| format!("{i}e-4"))
                .collect::<Vec<_>>()
                .join(", "),
            seeds.join(", ")
        ),
    );
    let e = refused(&p, &["run", &big]);
    assert!(
        e.contains("expands to 1001 points, more than the limit of 1000 (pass --max-points"),
        "{e}"
    );
    let v = json(&p, &["status", "--json", &big, "--max-points", "1001"]);
    assert_eq!(v["experiments"].as_array().unwrap().len(), 1001);
    let e = refused(&p, &["run", &file("dup", "\"train.lr\" = [1e-3, 0.001]")]);
    assert!(
        e.contains(
            "dup.toml:14:21: `sweep`: points 1 and 2 resolve to the same experiment s[lr=1e-3]"
        ),
        "{e}"
    );
    // A bad value in point 7 of 9, before point 1 runs, at that list element.
    let e = refused(
        &p,
        &[
            "run",
            &file(
                "bad7",
                "\"train.lr\" = [1e-3, 3e-4, -1.0]\n\"train.seed\" = [0, 1, 2]",
            ),
        ],
    );
    assert!(
        e.contains(
            "bad7.toml:14:27: `train.lr`: -1 must be > 0 (sweep point 7 of 9: s[lr=-1,seed=0])"
        ),
        "{e}"
    );
    // The command line: a value, the syntax, a key also given to --set, a section.
    let base = file("ok", "\"train.lr\" = [1e-3]");
    let e = refused(&p, &["run", &base, "--sweep", "train.batch=2,0"]);
    assert!(
        e.contains("--sweep train.batch=2,0: `train.batch`: must be at least 1"),
        "{e}"
    );
    let e = refused(&p, &["run", &base, "--sweep", "train.seed"]);
    assert!(e.contains("expected KEY=V1,V2"), "{e}");
    let e = refused(&p, &["run", &base, "--set", "train.lr=0.1"]);
    assert!(
        e.contains("--set train.lr=0.1: `train.lr`: is swept too"),
        "{e}"
    );
    let e = refused(&p, &["run", &base, "--sweep", "augment=1,2"]);
    assert!(e.contains("`augment`: is a section, not a key"), "{e}");
    let e = refused(
        &p,
        &[
            "status",
            &base,
            "--sweep",
            "train.seed=1,2",
            "--sweep-mode",
            "zip",
        ],
    );
    assert!(e.contains("\"zip\" needs lists of equal length"), "{e}");
}
