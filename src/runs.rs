//! `driveline runs` and `driveline diff`: what was run and how it scored, read from the cache.
//! Nothing here trains or writes.
//!
//! A [`Row`] is one experiment: the state of each of its stages, its params (the canonical
//! values its stages' keys cover, sections flattened to dotted keys) and its metrics. Rows come
//! from experiment files ([`from_experiments`]: the runner's plan says which stages are fresh,
//! and metrics are read from the outputs of exactly those keys) or from `runs/<name>/<stage>`
//! ([`from_runs_dir`], [`from_run`]: each link's `MANIFEST.json` gives the params and the
//! upstream keys it was computed from; a stage whose upstream links now point elsewhere is
//! stale).
//!
//! Metrics, by name: `best_valid_miou`, `best_valid_f1` and `train_seconds` from the train
//! stage's `summary.json`; `<split>_<metric>` (`valid_f1`, `valid_auc`, `test_miou`, ...)
//! from the evaluate stage's `metrics.json`, inside the field of view (F1 is the vessel Dice).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

use crate::config::params::{differing, flatten, fmt_value, short_keys, LABEL_KEYS};
use crate::config::Loaded;
use crate::pipeline::cache::{Manifest, MANIFEST};
use crate::pipeline::runner;
use crate::pipeline::{Env, Pipeline};

/// The metrics the table shows, in order, with their headings.
pub const TABLE_METRICS: &[(&str, &str)] = &[
    ("best_valid_miou", "valid mIoU (best)"),
    ("valid_f1", "valid F1"),
    ("valid_auc", "valid AUC"),
    ("test_f1", "test F1"),
    ("test_auc", "test AUC"),
    ("train_seconds", "train time"),
];

/// Short names `--sort` accepts for metrics.
const ALIASES: &[(&str, &str)] = &[
    ("miou", "best_valid_miou"),
    ("f1", "valid_f1"),
    ("auc", "valid_auc"),
    ("train_time", "train_seconds"),
    ("time", "train_seconds"),
];

/// One stage of an experiment and whether its output can be trusted.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StageState {
    pub name: String,
    /// `fresh`, `stale` or `missing` (linked, but the output left the cache).
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One experiment: stage states, params, metrics.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub name: String,
    /// The readable sweep-point name (`quick[lr=3e-4,seed=1]`), for points of a sweep file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub point: Option<String>,
    /// The experiment file, or `runs/<name>`.
    pub source: String,
    pub stages: Vec<StageState>,
    /// Canonical param values by dotted key.
    pub params: BTreeMap<String, Value>,
    pub metrics: BTreeMap<String, f64>,
}

impl Row {
    /// Whether some stage is not fresh.
    pub fn stale(&self) -> bool {
        self.stages.iter().any(|s| s.state != "fresh")
    }

    fn state_of(&self, stage: &str) -> Option<&StageState> {
        self.stages.iter().find(|s| s.name == stage)
    }
}

fn role(kind: &str) -> &str {
    crate::stages::lookup(kind).map_or(kind, |s| s.role())
}

/// Rows for experiments given as files: planned (keys, staleness) as `driveline status` does,
/// metrics from the outputs of the fresh stages.
pub fn from_experiments(env: &Env, exps: &[Loaded]) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for l in exps {
        let pipeline = Pipeline::load(&l.exp.pipeline, &env.project_root).with_context(|| {
            format!("experiment `{}`: pipeline `{}`", l.exp.name, l.exp.pipeline)
        })?;
        let planned = runner::plan(env, l, &pipeline)
            .with_context(|| format!("experiment `{}`", l.exp.name))?;
        let mut row = Row {
            name: l.exp.name.clone(),
            point: l.point.as_ref().map(|p| p.label.clone()),
            source: l
                .file
                .as_ref()
                .map_or("<embedded>".to_string(), |f| f.display().to_string()),
            stages: Vec::new(),
            params: BTreeMap::new(),
            metrics: BTreeMap::new(),
        };
        for p in &planned {
            row.params.extend(flatten(&p.params));
            row.stages.push(StageState {
                name: p.name.clone(),
                state: if p.stale.is_some() { "stale" } else { "fresh" }.into(),
                reason: p.stale.clone(),
            });
            if p.stale.is_none() {
                read_metrics(
                    role(&p.kind),
                    &env.cache.object_dir(&p.key),
                    &mut row.metrics,
                )?;
            }
        }
        rows.push(row);
    }
    Ok(rows)
}

/// One row per experiment folder under `runs/` (folders holding stage links), by name.
pub fn from_runs_dir(env: &Env) -> Result<Vec<Row>> {
    let Ok(entries) = fs::read_dir(&env.runs_dir) else {
        return Ok(Vec::new());
    };
    let mut names = Vec::new();
    for e in entries {
        let e = e.with_context(|| format!("cannot list {}", env.runs_dir.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && e.path().is_dir() && !stage_links(&e.path())?.is_empty() {
            names.push(name);
        }
    }
    names.sort();
    names.iter().map(|n| from_run(env, n)).collect()
}

/// The stage links of `runs/<exp>/` (symlinks; other files and folders are not stages).
fn stage_links(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && e.file_type().is_ok_and(|t| t.is_symlink()) {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// The row of `runs/<name>/`: each stage link's manifest, checked against its upstream links.
pub fn from_run(env: &Env, name: &str) -> Result<Row> {
    let dir = env.runs_dir.join(name);
    if name.is_empty() || name.contains('/') || !dir.is_dir() {
        bail!("no experiment `{name}` under {}", env.runs_dir.display());
    }
    let links = stage_links(&dir)?;
    if links.is_empty() {
        bail!("{} holds no stage outputs", dir.display());
    }
    let mut manifests: BTreeMap<String, Option<Manifest>> = BTreeMap::new();
    for s in &links {
        let m = fs::read_to_string(dir.join(s).join(MANIFEST))
            .ok()
            .and_then(|t| serde_json::from_str::<Manifest>(&t).ok());
        manifests.insert(s.clone(), m);
    }
    let mut row = Row {
        name: name.to_string(),
        point: None,
        source: format!("runs/{name}"),
        stages: Vec::new(),
        params: BTreeMap::new(),
        metrics: BTreeMap::new(),
    };
    for s in upstream_order(&manifests) {
        let state = match &manifests[&s] {
            None => StageState {
                name: s.clone(),
                state: "missing".into(),
                reason: Some("its output is no longer in the cache".into()),
            },
            Some(m) => {
                row.params.extend(flatten(&m.params));
                let mut reason = None;
                for (up, key) in &m.upstream {
                    let linked = manifests.get(up).and_then(|u| u.as_ref()).map(|u| &u.key);
                    let up_state = row.state_of(up).map(|u| u.state.as_str());
                    if linked != Some(key) {
                        reason = Some(format!("upstream {up} changed since it ran"));
                    } else if up_state.is_some_and(|st| st != "fresh") {
                        reason = Some(format!("upstream {up} is {}", up_state.unwrap_or("")));
                    }
                    if reason.is_some() {
                        break;
                    }
                }
                if reason.is_none() {
                    read_metrics(role(&m.kind), &dir.join(&s), &mut row.metrics)?;
                }
                StageState {
                    name: s.clone(),
                    state: if reason.is_some() { "stale" } else { "fresh" }.into(),
                    reason,
                }
            }
        };
        row.stages.push(state);
    }
    Ok(row)
}

/// Stage names with every stage after the stages it was computed from (ties by name);
/// stages without a manifest last.
fn upstream_order(manifests: &BTreeMap<String, Option<Manifest>>) -> Vec<String> {
    let mut done: Vec<String> = Vec::new();
    let mut pending: Vec<&String> = manifests
        .iter()
        .filter(|(_, m)| m.is_some())
        .map(|(n, _)| n)
        .collect();
    while !pending.is_empty() {
        let ready = pending.iter().position(|n| {
            manifests[*n].as_ref().is_none_or(|m| {
                m.upstream
                    .keys()
                    .all(|u| done.contains(u) || !manifests.contains_key(u))
            })
        });
        // A cycle cannot come from the runner; take the first to terminate anyway.
        let i = ready.unwrap_or(0);
        done.push(pending.remove(i).clone());
    }
    done.extend(
        manifests
            .iter()
            .filter(|(_, m)| m.is_none())
            .map(|(n, _)| n.clone()),
    );
    done
}

/// Add the metrics a stage output of this role records.
fn read_metrics(role: &str, dir: &Path, out: &mut BTreeMap<String, f64>) -> Result<()> {
    let file = match role {
        "train" => "summary.json",
        "evaluate" => "metrics.json",
        _ => return Ok(()),
    };
    let path = dir.join(file);
    let Ok(text) = fs::read_to_string(&path) else {
        return Ok(());
    };
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("malformed {}", path.display()))?;
    if role == "train" {
        train_metrics(&v, out);
    } else {
        eval_metrics(&v, out);
    }
    Ok(())
}

/// From the train stage's `summary.json`.
fn train_metrics(v: &Value, out: &mut BTreeMap<String, f64>) {
    for (field, name) in [
        ("best_valid_miou", "best_valid_miou"),
        ("best_valid_dice", "best_valid_f1"),
        ("train_seconds", "train_seconds"),
    ] {
        if let Some(x) = v
            .get(field)
            .and_then(Value::as_f64)
            .filter(|x| x.is_finite())
        {
            out.insert(name.to_string(), x);
        }
    }
}

/// From the evaluate stage's `metrics.json`: `splits.<split>.fov.<metric>`.
fn eval_metrics(v: &Value, out: &mut BTreeMap<String, f64>) {
    let Some(splits) = v.get("splits").and_then(Value::as_object) else {
        return;
    };
    for (split, s) in splits {
        let Some(fov) = s.get("fov").and_then(Value::as_object) else {
            continue;
        };
        for (metric, x) in fov {
            let Some(x) = x.as_f64().filter(|x| x.is_finite()) else {
                continue;
            };
            let metric = match metric.as_str() {
                "pixels" => continue,
                "dice" => "f1",
                m => m,
            };
            out.insert(format!("{split}_{metric}"), x);
        }
    }
}

/// Rows with the params split into those common to all and those that differ.
#[derive(Debug, Clone)]
pub struct Table {
    pub rows: Vec<Row>,
    /// Stage names, in the order first seen.
    pub stages: Vec<String>,
    /// Params with the same value in every row (labels excepted).
    pub common: BTreeMap<String, Value>,
    /// Params that differ between rows, sorted.
    pub differing: Vec<String>,
}

impl Table {
    pub fn new(rows: Vec<Row>) -> Table {
        let mut stages: Vec<String> = Vec::new();
        for r in &rows {
            for s in &r.stages {
                if !stages.contains(&s.name) {
                    stages.push(s.name.clone());
                }
            }
        }
        let maps: Vec<&BTreeMap<String, Value>> = rows.iter().map(|r| &r.params).collect();
        let differing = differing(&maps);
        let common = rows
            .first()
            .map(|r| {
                r.params
                    .iter()
                    .filter(|(k, _)| !differing.contains(k) && !LABEL_KEYS.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        Table {
            rows,
            stages,
            common,
            differing,
        }
    }

    /// Sort the rows by a metric (best first; train time shortest first), a param or `name`.
    pub fn sort(&mut self, key: &str) -> Result<()> {
        let key = ALIASES
            .iter()
            .find(|(a, _)| *a == key)
            .map_or(key, |(_, k)| *k);
        let metric_names: BTreeSet<&String> =
            self.rows.iter().flat_map(|r| r.metrics.keys()).collect();
        let param_names: BTreeSet<&String> =
            self.rows.iter().flat_map(|r| r.params.keys()).collect();
        if key == "name" {
            self.rows.sort_by(|a, b| a.name.cmp(&b.name));
        } else if metric_names.iter().any(|m| *m == key)
            || TABLE_METRICS.iter().any(|(m, _)| *m == key)
        {
            let ascending = key == "train_seconds";
            self.rows
                .sort_by(|a, b| match (a.metrics.get(key), b.metrics.get(key)) {
                    (Some(x), Some(y)) if ascending => x.total_cmp(y),
                    (Some(x), Some(y)) => y.total_cmp(x),
                    (Some(_), None) => std::cmp::Ordering::Less,
                    (None, Some(_)) => std::cmp::Ordering::Greater,
                    (None, None) => std::cmp::Ordering::Equal,
                });
        } else {
            let full: Vec<&String> = param_names
                .iter()
                .copied()
                .filter(|p| *p == key || p.ends_with(&format!(".{key}")))
                .collect();
            let param = match full.as_slice() {
                [one] => (*one).clone(),
                _ if param_names.iter().any(|p| *p == key) => key.to_string(),
                [] => {
                    let metrics: Vec<&str> = TABLE_METRICS
                        .iter()
                        .map(|(m, _)| *m)
                        .chain(metric_names.iter().map(|m| m.as_str()))
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect();
                    bail!(
                        "--sort {key}: not a metric or a param of these experiments \
                         (metrics: {}; params such as {}; or name)",
                        metrics.join(", "),
                        self.differing
                            .first()
                            .or(param_names.iter().next().copied())
                            .map_or("train.lr", |s| s.as_str())
                    )
                }
                many => bail!(
                    "--sort {key}: ambiguous, name one of {}",
                    many.iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            self.rows
                .sort_by(|a, b| cmp_values(a.params.get(&param), b.params.get(&param)));
        }
        Ok(())
    }

    /// The metric columns shown: the table's metrics that some row has (valid mIoU, valid
    /// F1/AUC and train time always).
    fn metric_columns(&self) -> Vec<(&'static str, &'static str)> {
        TABLE_METRICS
            .iter()
            .copied()
            .filter(|(m, _)| {
                !m.starts_with("test_") || self.rows.iter().any(|r| r.metrics.contains_key(*m))
            })
            .collect()
    }

    /// `--json`: the rows with only their differing params, and the common ones once.
    pub fn to_json(&self) -> Value {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|r| {
                let params: BTreeMap<&String, &Value> = self
                    .differing
                    .iter()
                    .filter_map(|k| r.params.get(k).map(|v| (k, v)))
                    .collect();
                serde_json::json!({
                    "name": r.name,
                    "point": r.point,
                    "source": r.source,
                    "stale": r.stale(),
                    "stages": r.stages,
                    "params": params,
                    "metrics": r.metrics,
                })
            })
            .collect();
        serde_json::json!({
            "stages": self.stages,
            "differing": self.differing,
            "common": self.common,
            "experiments": rows,
        })
    }

    /// `--csv`: one line per row: name, point, stage states, differing params, metrics.
    pub fn to_csv(&self) -> Result<String> {
        let mut w = csv::Writer::from_writer(Vec::new());
        let metrics: Vec<&str> = TABLE_METRICS.iter().map(|(m, _)| *m).collect();
        let mut header: Vec<String> = vec!["name".into(), "point".into()];
        header.extend(self.stages.iter().cloned());
        header.extend(self.differing.iter().cloned());
        header.extend(metrics.iter().map(|m| m.to_string()));
        w.write_record(&header)?;
        for r in &self.rows {
            let mut rec: Vec<String> = vec![r.name.clone(), r.point.clone().unwrap_or_default()];
            rec.extend(
                self.stages
                    .iter()
                    .map(|s| r.state_of(s).map_or(String::new(), |st| st.state.clone())),
            );
            rec.extend(
                self.differing
                    .iter()
                    .map(|k| r.params.get(k).map(fmt_value).unwrap_or_default()),
            );
            rec.extend(
                metrics
                    .iter()
                    .map(|m| r.metrics.get(*m).map(|x| x.to_string()).unwrap_or_default()),
            );
            w.write_record(&rec)?;
        }
        let bytes = w.into_inner().context("writing CSV")?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The human table: the common params, one line per row, then why stale rows are stale.
    pub fn to_text(&self) -> String {
        let mut o = String::new();
        if self.rows.is_empty() {
            return "no experiments found (run one first: driveline run EXP.toml)\n".into();
        }
        if !self.common.is_empty() {
            let items: Vec<String> = self
                .common
                .iter()
                .map(|(k, v)| format!("{k}={}", fmt_value(v)))
                .collect();
            o.push_str(&wrap("common: ", &items, 100));
        }
        let shorts = short_keys(&self.differing);
        let metrics = self.metric_columns();
        let mut header: Vec<(String, bool)> = vec![("experiment".into(), false)];
        header.extend(self.stages.iter().map(|s| (s.clone(), false)));
        header.extend(shorts.iter().map(|s| (s.clone(), true)));
        header.extend(metrics.iter().map(|(_, h)| (h.to_string(), true)));
        let mut lines: Vec<Vec<String>> = Vec::new();
        for r in &self.rows {
            let mut cells = vec![r.name.clone()];
            cells.extend(self.stages.iter().map(|s| {
                r.state_of(s)
                    .map_or("-".to_string(), |st| match st.state.as_str() {
                        "fresh" => "ok".to_string(),
                        other => other.to_string(),
                    })
            }));
            cells.extend(
                self.differing
                    .iter()
                    .map(|k| r.params.get(k).map_or("—".to_string(), fmt_value)),
            );
            cells.extend(metrics.iter().map(|(m, _)| match r.metrics.get(*m) {
                None => "—".to_string(),
                Some(x) if *m == "train_seconds" => crate::report::fmt_duration(*x),
                Some(x) => format!("{x:.4}"),
            }));
            lines.push(cells);
        }
        let widths: Vec<usize> = (0..header.len())
            .map(|i| {
                lines
                    .iter()
                    .map(|l| l[i].chars().count())
                    .chain(std::iter::once(header[i].0.chars().count()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let fmt_line = |cells: &[String]| -> String {
            let parts: Vec<String> = cells
                .iter()
                .zip(&widths)
                .zip(&header)
                .map(|((c, w), (_, right))| {
                    let pad = w.saturating_sub(c.chars().count());
                    if *right {
                        format!("{}{c}", " ".repeat(pad))
                    } else {
                        format!("{c}{}", " ".repeat(pad))
                    }
                })
                .collect();
            parts.join("  ").trim_end().to_string()
        };
        let head: Vec<String> = header.iter().map(|h| h.0.clone()).collect();
        let _ = writeln!(o, "{}", fmt_line(&head));
        for l in &lines {
            let _ = writeln!(o, "{}", fmt_line(l));
        }
        let stale: Vec<&Row> = self.rows.iter().filter(|r| r.stale()).collect();
        if !stale.is_empty() {
            o.push_str("\nnot up to date (`driveline run` the experiment to refresh it):\n");
            for r in stale {
                for s in r.stages.iter().filter(|s| s.state != "fresh") {
                    let _ = writeln!(
                        o,
                        "  {}: {} {} ({})",
                        r.name,
                        s.name,
                        s.state,
                        s.reason.as_deref().unwrap_or("")
                    );
                }
            }
        }
        o
    }
}

/// `prefix` then the items separated by ", ", wrapped at `width` columns.
fn wrap(prefix: &str, items: &[String], width: usize) -> String {
    let indent = " ".repeat(prefix.chars().count());
    let mut out = String::new();
    let mut line = prefix.to_string();
    for (i, item) in items.iter().enumerate() {
        let sep = if i + 1 < items.len() { "," } else { "" };
        let piece = format!("{item}{sep}");
        if line.chars().count() > indent.len() && line.chars().count() + 1 + piece.len() > width {
            out.push_str(line.trim_end());
            out.push('\n');
            line = indent.clone();
        } else if line.chars().count() > indent.len() {
            line.push(' ');
        }
        line.push_str(&piece);
    }
    out.push_str(line.trim_end());
    out.push('\n');
    out
}

/// Params first by number when both are numbers, else by their text; missing last.
fn cmp_values(a: Option<&Value>, b: Option<&Value>) -> std::cmp::Ordering {
    match (a, b) {
        (Some(x), Some(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(p), Some(q)) => p.total_cmp(&q),
            _ => fmt_value(x).cmp(&fmt_value(y)),
        },
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    }
}

/// Two experiments side by side: the params that differ and every metric with its delta.
#[derive(Debug, Clone, Serialize)]
pub struct Diff {
    pub a: Row,
    pub b: Row,
    pub params: Vec<ParamChange>,
    pub metrics: Vec<MetricDelta>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ParamChange {
    pub key: String,
    pub a: Option<Value>,
    pub b: Option<Value>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MetricDelta {
    pub metric: String,
    pub a: Option<f64>,
    pub b: Option<f64>,
    /// `b − a`, when both exist.
    pub delta: Option<f64>,
}

/// Compare `a` with `b`: params that differ (labels excepted), then every metric either has,
/// the table's metrics first.
pub fn diff(a: Row, b: Row) -> Diff {
    let keys: BTreeSet<&String> = a.params.keys().chain(b.params.keys()).collect();
    let params = keys
        .into_iter()
        .filter(|k| !LABEL_KEYS.contains(&k.as_str()))
        .filter(|k| a.params.get(*k) != b.params.get(*k))
        .map(|k| ParamChange {
            key: k.clone(),
            a: a.params.get(k).cloned(),
            b: b.params.get(k).cloned(),
        })
        .collect();
    let mut names: Vec<String> = TABLE_METRICS
        .iter()
        .map(|(m, _)| m.to_string())
        .filter(|m| a.metrics.contains_key(m) || b.metrics.contains_key(m))
        .collect();
    let rest: BTreeSet<&String> = a.metrics.keys().chain(b.metrics.keys()).collect();
    for m in rest {
        if !names.contains(m) {
            names.push(m.clone());
        }
    }
    let metrics = names
        .into_iter()
        .map(|m| {
            let (x, y) = (a.metrics.get(&m).copied(), b.metrics.get(&m).copied());
            MetricDelta {
                delta: x.zip(y).map(|(x, y)| y - x),
                metric: m,
                a: x,
                b: y,
            }
        })
        .collect();
    Diff {
        a,
        b,
        params,
        metrics,
    }
}

impl Diff {
    pub fn to_json(&self) -> Value {
        let side = |r: &Row| {
            serde_json::json!({"name": r.name, "point": r.point, "source": r.source,
                               "stale": r.stale()})
        };
        serde_json::json!({
            "a": side(&self.a),
            "b": side(&self.b),
            "params": self.params,
            "metrics": self.metrics,
        })
    }

    pub fn to_text(&self) -> String {
        let mut o = String::new();
        for (tag, r) in [("a", &self.a), ("b", &self.b)] {
            let point = r
                .point
                .as_ref()
                .map(|p| format!(", point {p}"))
                .unwrap_or_default();
            let _ = writeln!(o, "{tag}: {} ({}{point})", r.name, r.source);
        }
        let show = |v: &Option<Value>| v.as_ref().map_or("(not set)".to_string(), fmt_value);
        if self.params.is_empty() {
            o.push_str("\nparams: the same\n");
        } else {
            o.push_str("\nparams that differ (a → b):\n");
            let w = self.params.iter().map(|p| p.key.len()).max().unwrap_or(0);
            for p in &self.params {
                let _ = writeln!(o, "  {:w$}  {} → {}", p.key, show(&p.a), show(&p.b));
            }
        }
        if self.metrics.is_empty() {
            o.push_str("\nmetrics: none recorded (run the experiments first)\n");
        } else {
            let num = |m: &str, x: Option<f64>| match x {
                None => "—".to_string(),
                Some(x) if m == "train_seconds" => format!("{x:.1}"),
                Some(x) => format!("{x:.4}"),
            };
            let w = self
                .metrics
                .iter()
                .map(|m| m.metric.len())
                .max()
                .unwrap_or(0);
            let _ = writeln!(
                o,
                "\n  {:w$}  {:>10}  {:>10}  {:>10}",
                "metric", "a", "b", "b − a"
            );
            for m in &self.metrics {
                let delta = m.delta.map_or("—".to_string(), |d| {
                    let s = if m.metric == "train_seconds" {
                        format!("{d:.1}")
                    } else {
                        format!("{d:.4}")
                    };
                    if d > 0.0 {
                        format!("+{s}")
                    } else {
                        s
                    }
                });
                let _ = writeln!(
                    o,
                    "  {:w$}  {:>10}  {:>10}  {:>10}",
                    m.metric,
                    num(&m.metric, m.a),
                    num(&m.metric, m.b),
                    delta
                );
            }
        }
        for (tag, r) in [("a", &self.a), ("b", &self.b)] {
            for s in r.stages.iter().filter(|s| s.state != "fresh") {
                let _ = writeln!(
                    o,
                    "note: {tag} ({}): {} is {} ({}); its metrics are left out",
                    r.name,
                    s.name,
                    s.state,
                    s.reason.as_deref().unwrap_or("")
                );
            }
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::PeriodRow;
    use crate::stages::evaluate::{EvalReport, Scores, SplitScores};
    use crate::stages::train::TrainSummary;
    use serde_json::json;

    fn scores(dice: f64, auc: Option<f64>) -> Scores {
        Scores {
            accuracy: 0.9,
            miou: 0.7,
            vessel_iou: 0.5,
            dice,
            sensitivity: 0.6,
            specificity: 0.95,
            precision: 0.55,
            auc,
            pixels: 100,
        }
    }

    /// The metric names are read off the files the real stages write.
    #[test]
    fn metrics_come_from_the_stage_outputs() {
        let ts = TrainSummary {
            periods: 2,
            steps: 10,
            best_period: 2,
            best_valid_miou: 0.61,
            best_valid_dice: 0.42,
            best_loss_period: 1,
            train_seconds: 12.5,
            peak_rss_mib: 100.0,
            param_count: 10,
            device: "cpu".into(),
            threshold: None,
            history: vec![PeriodRow {
                period: 1,
                step: 5,
                train_loss: 1.0,
                valid_loss: 1.0,
                pixel_acc: 0.9,
                miou: 0.6,
                vessel_iou: 0.4,
                vessel_dice: 0.4,
                lr: 1e-3,
                seconds: 1.0,
                train_pixel_acc: None,
                train_miou: None,
            }],
        };
        let ev = EvalReport {
            checkpoint: "best".into(),
            tta: crate::config::Tta::None,
            threshold: 0.5,
            splits: [
                (
                    "valid".to_string(),
                    SplitScores {
                        images: vec![],
                        fov: scores(0.44, Some(0.91)),
                        all: scores(0.1, None),
                    },
                ),
                (
                    "test".to_string(),
                    SplitScores {
                        images: vec![],
                        fov: scores(0.47, None),
                        all: scores(0.1, None),
                    },
                ),
            ]
            .into(),
            predicted: vec![],
        };
        let d = tempfile::tempdir().unwrap();
        fs::write(
            d.path().join("summary.json"),
            serde_json::to_string(&ts).unwrap(),
        )
        .unwrap();
        fs::write(
            d.path().join("metrics.json"),
            serde_json::to_string(&ev).unwrap(),
        )
        .unwrap();
        let mut m = BTreeMap::new();
        read_metrics("train", d.path(), &mut m).unwrap();
        read_metrics("evaluate", d.path(), &mut m).unwrap();
        assert_eq!(m["best_valid_miou"], 0.61);
        assert_eq!(m["best_valid_f1"], 0.42);
        assert_eq!(m["train_seconds"], 12.5);
        assert_eq!(m["valid_f1"], 0.44);
        assert_eq!(m["valid_auc"], 0.91);
        assert_eq!(m["test_f1"], 0.47);
        assert!(!m.contains_key("test_auc") && !m.contains_key("valid_pixels"));
    }

    fn row(name: &str, lr: f64, miou: Option<f64>) -> Row {
        Row {
            name: name.into(),
            point: None,
            source: format!("runs/{name}"),
            stages: vec![StageState {
                name: "train".into(),
                state: "fresh".into(),
                reason: None,
            }],
            params: [
                ("train.lr".to_string(), json!(lr)),
                ("train.seed".to_string(), json!(1)),
                ("name".to_string(), json!(name)),
            ]
            .into(),
            metrics: miou
                .map(|m| ("best_valid_miou".to_string(), m))
                .into_iter()
                .collect(),
        }
    }

    #[test]
    fn table_splits_common_and_differing_params_and_sorts() {
        let mut t = Table::new(vec![
            row("a", 1e-3, Some(0.5)),
            row("b", 3e-4, None),
            row("c", 1e-4, Some(0.7)),
        ]);
        assert_eq!(t.differing, ["train.lr"]);
        assert_eq!(t.common.keys().collect::<Vec<_>>(), ["train.seed"]);
        t.sort("miou").unwrap();
        let order = |t: &Table| t.rows.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
        assert_eq!(order(&t), ["c", "a", "b"]);
        t.sort("lr").unwrap();
        assert_eq!(order(&t), ["c", "b", "a"]);
        t.sort("name").unwrap();
        assert_eq!(order(&t), ["a", "b", "c"]);
        let e = t.sort("nonsense").unwrap_err().to_string();
        assert!(e.contains("not a metric or a param"), "{e}");
        let text = t.to_text();
        assert!(text.starts_with("common: train.seed=1\n"), "{text}");
        assert!(text.contains("lr"), "{text}");
        let csv = t.to_csv().unwrap();
        assert!(
            csv.starts_with("name,point,train,train.lr,best_valid_miou"),
            "{csv}"
        );
    }

    #[test]
    fn diff_lists_changed_params_and_deltas() {
        let d = diff(row("a", 1e-3, Some(0.5)), row("b", 3e-4, Some(0.75)));
        assert_eq!(
            d.params,
            [ParamChange {
                key: "train.lr".into(),
                a: Some(json!(1e-3)),
                b: Some(json!(3e-4))
            }]
        );
        assert_eq!(d.metrics.len(), 1);
        assert_eq!(d.metrics[0].delta, Some(0.25));
        let text = d.to_text();
        assert!(text.contains("train.lr  1e-3 → 3e-4"), "{text}");
        assert!(text.contains("+0.2500"), "{text}");
    }
}
