//! Sweeps: one experiment file, many experiments.
//!
//! ```toml
//! [sweep]
//! "train.lr" = [1e-4, 3e-4, 1e-3]
//! "model.backbone" = ["resnet50", "resnet101"]
//! mode = "grid"    # every combination (the default); "zip": the i-th value of every list
//! ```
//!
//! `--sweep train.lr=1e-4,3e-4` (repeatable, `--sweep-mode grid|zip`) says the same on the
//! command line; a key given both ways takes the command line's values. Every point is
//! loaded and validated like a file of its own before anything runs, with the swept key's
//! origin set to its list element, so a bad value in point 7 is reported at the file, line
//! and column of that element.
//!
//! Each point is named after the base experiment and its values, in the order the keys are
//! declared: `quick[lr=3e-4,seed=1]` ([`Point::label`]), with keys shortened to their last
//! segment unless that is ambiguous ([`params::short_keys`]). The experiment's `name` (its
//! folder under `runs/`) is the file-safe form of that, `quick.lr_3e-4.seed_1`
//! ([`params::file_safe`]).

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use toml::{Table, Value};

use super::load::{self, ConfigError, Loaded, Origin, Problem, PATH_KEYS};
use super::params;

/// Most points a sweep may expand to unless `--max-points` allows more.
pub const MAX_POINTS: usize = 1000;

/// Longest file-safe point name accepted (a folder name under `runs/`).
const MAX_NAME_LEN: usize = 200;

/// How the lists of a sweep combine into points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SweepMode {
    /// Every combination; the first key varies slowest.
    #[default]
    Grid,
    /// The i-th value of every list: lists of equal length.
    Zip,
}

impl FromStr for SweepMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "grid" => Ok(SweepMode::Grid),
            "zip" => Ok(SweepMode::Zip),
            _ => Err(format!(
                "unknown sweep mode {s:?}: expected \"grid\" or \"zip\""
            )),
        }
    }
}

/// What the command line adds to a sweep.
#[derive(Debug, Clone)]
pub struct SweepOptions {
    /// `--sweep key=v1,v2,...`, in order.
    pub sweeps: Vec<String>,
    /// `--sweep-mode`: replaces the file's `mode`.
    pub mode: Option<SweepMode>,
    /// `--max-points`: most points the sweep may expand to.
    pub max_points: usize,
}

impl Default for SweepOptions {
    fn default() -> Self {
        SweepOptions {
            sweeps: Vec::new(),
            mode: None,
            max_points: MAX_POINTS,
        }
    }
}

/// Which point of a sweep an experiment is.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Readable name: `quick[lr=3e-4,seed=1]`.
    pub label: String,
    /// 0-based position among the sweep's points, and their number.
    pub index: usize,
    pub count: usize,
    /// The swept keys and this point's canonical values, in sweep order.
    pub values: Vec<(String, serde_json::Value)>,
}

/// One swept key: its values, each with where it was written.
#[derive(Debug, Clone)]
struct Axis {
    key: String,
    origin: Origin,
    values: Vec<(Value, Origin)>,
}

/// Load `file` (following `extends`) and expand its `[sweep]` and `opts.sweeps` into one
/// validated experiment per point; a file without a sweep gives one experiment, as
/// [`load::load`] does. Every problem of every point is reported before anything runs.
pub fn load_points(
    file: &Path,
    sets: &[String],
    opts: &SweepOptions,
    project_root: &Path,
) -> Result<Vec<Loaded>, ConfigError> {
    let mut chain = Vec::new();
    let (table, origins) = load::load_chain(file, &mut chain)?;
    expand(table, origins, Some(file), sets, opts, project_root)
}

/// [`load_points`] for an experiment given as text (the embedded default).
pub fn load_str_points(
    text: &str,
    name: &Path,
    sets: &[String],
    opts: &SweepOptions,
    project_root: &Path,
) -> Result<Vec<Loaded>, ConfigError> {
    let (table, origins) = load::parse_with_spans(text, name)?;
    if table.contains_key("extends") {
        return Err(ConfigError::one(
            load::origin_of(&origins, "extends"),
            "extends",
            "an embedded experiment cannot extend a file",
        ));
    }
    expand(table, origins, None, sets, opts, project_root)
}

fn problem(origin: Origin, key: &str, message: impl Into<String>) -> Problem {
    Problem {
        origin,
        key: key.to_string(),
        message: message.into(),
        suggestion: None,
    }
}

fn expand(
    mut table: Table,
    mut origins: std::collections::BTreeMap<String, Origin>,
    file: Option<&Path>,
    sets: &[String],
    opts: &SweepOptions,
    project_root: &Path,
) -> Result<Vec<Loaded>, ConfigError> {
    let declared = table.remove("sweep");
    let mut problems = Vec::new();
    let mut axes: Vec<Axis> = Vec::new();
    let mut file_mode = None;
    let sweep_origin = match (&declared, opts.sweeps.first()) {
        (Some(_), _) => load::origin_of(&origins, "sweep"),
        (None, Some(arg)) => Origin::Sweep(arg.clone()),
        (None, None) => Origin::Default,
    };
    match &declared {
        Some(Value::Table(t)) => {
            collect_axes(t, "", &origins, &mut axes, &mut file_mode, &mut problems);
            axes.sort_by_key(|a| position(&a.origin));
            if axes.is_empty() && opts.sweeps.is_empty() {
                problems.push(problem(
                    sweep_origin.clone(),
                    "sweep",
                    "lists no key to sweep, e.g. \"train.lr\" = [1e-4, 3e-4]",
                ));
            }
        }
        Some(_) => problems.push(problem(
            sweep_origin.clone(),
            "sweep",
            "must be a table: [sweep] followed by \"key\" = [values] lines",
        )),
        None => {}
    }
    let mut from_cli: Vec<String> = Vec::new();
    for arg in &opts.sweeps {
        match cli_axis(arg) {
            Ok(axis) => {
                if from_cli.contains(&axis.key) {
                    problems.push(problem(
                        axis.origin.clone(),
                        &axis.key,
                        "is given to --sweep twice",
                    ));
                    continue;
                }
                from_cli.push(axis.key.clone());
                // The command line replaces the file's list, in the file's position.
                match axes.iter_mut().find(|a| a.key == axis.key) {
                    Some(a) => *a = axis,
                    None => axes.push(axis),
                }
            }
            Err(p) => problems.push(p),
        }
    }
    origins.retain(|k, _| k != "sweep" && !k.starts_with("sweep.") && !k.starts_with("sweep["));
    if declared.is_none() && opts.sweeps.is_empty() {
        return load::finish(table, &mut origins, file, sets, project_root).map(|l| vec![l]);
    }

    check_keys(&axes, sets, &mut problems);
    let mode = opts
        .mode
        .or(file_mode.as_ref().map(|(m, _)| *m))
        .unwrap_or_default();
    for a in &axes {
        if a.values.is_empty() {
            problems.push(problem(
                a.origin.clone(),
                &a.key,
                "empty list: a sweep needs at least one value",
            ));
        }
    }
    let count = match mode {
        SweepMode::Grid => axes
            .iter()
            .try_fold(1usize, |n, a| n.checked_mul(a.values.len())),
        SweepMode::Zip => {
            let lens: Vec<usize> = axes.iter().map(|a| a.values.len()).collect();
            if lens.windows(2).any(|w| w[0] != w[1]) {
                let listed: Vec<String> = axes
                    .iter()
                    .map(|a| format!("{} has {}", a.key, a.values.len()))
                    .collect();
                let at = file_mode
                    .as_ref()
                    .map_or(sweep_origin.clone(), |(_, o)| o.clone());
                problems.push(problem(
                    at,
                    "sweep.mode",
                    format!("\"zip\" needs lists of equal length: {}", listed.join(", ")),
                ));
            }
            Some(lens.first().copied().unwrap_or(0))
        }
    };
    match count {
        Some(n) if n <= opts.max_points => {}
        n => problems.push(problem(
            sweep_origin.clone(),
            "sweep",
            format!(
                "expands to {} points, more than the limit of {} (pass --max-points to allow more)",
                n.map_or("more than 2^64".to_string(), |n| n.to_string()),
                opts.max_points
            ),
        )),
    }
    if !problems.is_empty() {
        return Err(ConfigError { problems });
    }
    let count = count.unwrap_or(0);

    // Every point, validated as if its values were written in the file.
    let keys: Vec<String> = axes.iter().map(|a| a.key.clone()).collect();
    let shorts = params::short_keys(&keys);
    let base_name = table
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_string();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut points: Vec<(Loaded, Vec<usize>)> = Vec::with_capacity(count);
    for index in 0..count {
        let combo = combination(&axes, mode, index);
        let mut t = table.clone();
        let mut o = origins.clone();
        let mut result = Ok(());
        for (a, &i) in axes.iter().zip(&combo) {
            let (v, at) = &a.values[i];
            result = result.and(load::set_value(&mut t, &a.key, v.clone(), at));
            o.insert(a.key.clone(), at.clone());
        }
        match result.and_then(|()| load::finish(t, &mut o, file, sets, project_root)) {
            Ok(l) => points.push((l, combo)),
            Err(e) => {
                let written: Vec<(String, String)> = shorts
                    .iter()
                    .zip(axes.iter().zip(&combo))
                    .map(|(s, (a, &i))| (s.clone(), written_value(&a.values[i].0)))
                    .collect();
                let label = params::point_label(&base_name, &written);
                for p in e.problems {
                    let id = format!("{}\0{}\0{}", p.origin, p.key, p.message);
                    if seen.insert(id, index).is_none() {
                        problems.push(Problem {
                            message: format!(
                                "{} (sweep point {} of {count}: {label})",
                                p.message,
                                index + 1
                            ),
                            ..p
                        });
                    }
                }
            }
        }
    }
    if !problems.is_empty() {
        return Err(ConfigError { problems });
    }

    // Names, and points that are the same experiment.
    let mut by_config: HashMap<String, usize> = HashMap::new();
    let mut by_name: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::with_capacity(points.len());
    let mut combos: Vec<Vec<usize>> = Vec::with_capacity(points.len());
    for (index, (mut l, combo)) in points.into_iter().enumerate() {
        let values: Vec<(String, serde_json::Value)> = axes
            .iter()
            .zip(&combo)
            .map(|(a, &i)| {
                let v = if PATH_KEYS.contains(&a.key.as_str()) {
                    // As written: the resolved absolute path would make a long name.
                    serde_json::to_value(&a.values[i].0).ok()
                } else {
                    l.exp.value_at(&a.key)
                };
                (a.key.clone(), v.unwrap_or(serde_json::Value::Null))
            })
            .collect();
        let pairs: Vec<(String, String)> = shorts
            .iter()
            .zip(&values)
            .map(|(s, (_, v))| (s.clone(), params::fmt_value(v)))
            .collect();
        let label = params::point_label(&l.exp.name, &pairs);
        let name = params::file_safe(&l.exp.name, &pairs);
        let mut canonical = serde_json::to_value(&l.exp).unwrap_or_default();
        if let Some(m) = canonical.as_object_mut() {
            m.remove("name");
        }
        if let Some(&first) = by_config.get(&canonical.to_string()) {
            // Point at the element that repeats one of the earlier point's.
            let at = axes
                .iter()
                .zip(combo.iter().zip(&combos[first]))
                .find(|(_, (i, j))| i != j)
                .map_or(sweep_origin.clone(), |(a, (&i, _))| a.values[i].1.clone());
            problems.push(problem(
                at,
                "sweep",
                format!(
                    "points {} and {} resolve to the same experiment {label}: a value is listed \
                     twice (perhaps written two ways, e.g. 1e-3 and 0.001)",
                    first + 1,
                    index + 1
                ),
            ));
        } else {
            by_config.insert(canonical.to_string(), index);
        }
        if name.len() > MAX_NAME_LEN {
            problems.push(problem(
                sweep_origin.clone(),
                "sweep",
                format!(
                    "point {label} would be named {name}, longer than {MAX_NAME_LEN} characters \
                     (the folder name under runs/): sweep fewer keys or shorter values"
                ),
            ));
        } else if let Some(&other) = by_name.get(&name) {
            problems.push(problem(
                sweep_origin.clone(),
                "sweep",
                format!(
                    "points {} and {} ({label}) get the same folder name {name} once their \
                     values are made file-safe",
                    other + 1,
                    index + 1
                ),
            ));
        } else {
            by_name.insert(name.clone(), index);
        }
        l.exp.name = name;
        combos.push(combo);
        l.point = Some(Point {
            label,
            index,
            count,
            values,
        });
        out.push(l);
    }
    if !problems.is_empty() {
        return Err(ConfigError { problems });
    }
    Ok(out)
}

/// (line, column) of a file origin, for keeping the declared order; others last.
fn position(o: &Origin) -> (usize, usize) {
    match o {
        Origin::File { line, col, .. } => (*line, *col),
        _ => (usize::MAX, usize::MAX),
    }
}

/// The indices into each axis of point `index`.
fn combination(axes: &[Axis], mode: SweepMode, index: usize) -> Vec<usize> {
    match mode {
        SweepMode::Zip => vec![index; axes.len()],
        SweepMode::Grid => {
            let mut rest = index;
            let mut combo = vec![0; axes.len()];
            for (c, a) in combo.iter_mut().zip(axes).rev() {
                let n = a.values.len().max(1);
                *c = rest % n;
                rest /= n;
            }
            combo
        }
    }
}

/// A value as written, for messages about a point that did not load.
fn written_value(v: &Value) -> String {
    serde_json::to_value(v)
        .map(|j| params::fmt_value(&j))
        .unwrap_or_else(|_| v.to_string())
}

/// The keys of a `[sweep]` table: quoted dotted keys (`"train.lr" = [...]`) or nested tables
/// (`[sweep.train] lr = [...]`) alike.
fn collect_axes(
    t: &Table,
    prefix: &str,
    origins: &std::collections::BTreeMap<String, Origin>,
    axes: &mut Vec<Axis>,
    mode: &mut Option<(SweepMode, Origin)>,
    problems: &mut Vec<Problem>,
) {
    for (k, v) in t {
        let path = load::join(prefix, k);
        let at = load::origin_of(origins, &format!("sweep.{path}"));
        if prefix.is_empty() && k == "mode" {
            match v.as_str().map(SweepMode::from_str) {
                Some(Ok(m)) => *mode = Some((m, at)),
                _ => problems.push(problem(
                    at,
                    "sweep.mode",
                    format!("{v} must be \"grid\" or \"zip\""),
                )),
            }
            continue;
        }
        match v {
            Value::Table(inner) => collect_axes(inner, &path, origins, axes, mode, problems),
            Value::Array(items) => {
                if axes.iter().any(|a| a.key == path) {
                    problems.push(problem(at, &path, "is swept twice in [sweep]"));
                    continue;
                }
                let values = items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        let o = origins
                            .get(&format!("sweep.{path}[{i}]"))
                            .cloned()
                            .unwrap_or_else(|| at.clone());
                        (v.clone(), o)
                    })
                    .collect();
                axes.push(Axis {
                    key: path,
                    origin: at,
                    values,
                });
            }
            other => problems.push(problem(
                at,
                &path,
                format!(
                    "in [sweep], {other} must be a list of values, e.g. \"{path}\" = [{other}]"
                ),
            )),
        }
    }
}

/// One `--sweep KEY=V1,V2,...`: values read as TOML (else as strings), split at the commas
/// outside brackets and quotes (`model.widths=[16,32],[32,64]` is two values).
fn cli_axis(arg: &str) -> Result<Axis, Problem> {
    let origin = Origin::Sweep(arg.to_string());
    let Some((key, raw)) = arg.split_once('=') else {
        return Err(problem(
            origin,
            "",
            "expected KEY=V1,V2,..., e.g. --sweep train.lr=1e-4,3e-4",
        ));
    };
    let key = key.trim();
    if key.is_empty() || key.split('.').any(str::is_empty) {
        return Err(problem(origin, key, "empty key segment"));
    }
    let raw = raw.trim();
    let pieces = if raw.is_empty() {
        Vec::new()
    } else {
        split_top_level(raw)
    };
    if pieces.iter().any(|p| p.trim().is_empty()) {
        return Err(problem(origin, key, "an empty value between commas"));
    }
    Ok(Axis {
        key: key.to_string(),
        values: pieces
            .iter()
            .map(|p| (load::parse_cli_value(p.trim()), origin.clone()))
            .collect(),
        origin,
    })
}

fn split_top_level(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut depth = 0i32;
    let mut quote: Option<char> = None;
    for c in s.chars() {
        match (quote, c) {
            (Some(q), _) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '[' | '{') => depth += 1,
            (None, ']' | '}') => depth -= 1,
            (None, ',') if depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur);
    out
}

/// Sweep keys must be keys of the schema (not sections), not the name, and not also `--set`.
fn check_keys(axes: &[Axis], sets: &[String], problems: &mut Vec<Problem>) {
    let known = load::known_keys();
    let mut paths = Vec::new();
    load::all_paths(&known, "", &mut paths);
    let is_section = |p: &str| {
        let mut cur = &known;
        let mut parts = p.split('.').peekable();
        while let Some(part) = parts.next() {
            match cur.get(part) {
                Some(Value::Table(t)) if parts.peek().is_some() => cur = t,
                Some(Value::Table(_)) => return true,
                _ => return false,
            }
        }
        false
    };
    let leaves: Vec<String> = paths.iter().filter(|p| !is_section(p)).cloned().collect();
    for a in axes {
        let k = a.key.as_str();
        if k == "name" || k == "extends" {
            problems.push(problem(
                a.origin.clone(),
                k,
                "cannot be swept (each point is named after its base experiment and its values)",
            ));
        } else if !paths.iter().any(|p| p == k) {
            problems.push(Problem {
                origin: a.origin.clone(),
                key: k.to_string(),
                message: "unknown key in the sweep".into(),
                suggestion: load::suggest(k, &leaves),
            });
        } else if is_section(k) {
            let example = leaves
                .iter()
                .find(|l| l.starts_with(&format!("{k}.")))
                .cloned()
                .unwrap_or_default();
            problems.push(problem(
                a.origin.clone(),
                k,
                format!("is a section, not a key: sweep its keys (e.g. `{example}`)"),
            ));
        }
    }
    for set in sets {
        let k = set.split_once('=').map_or(set.as_str(), |(k, _)| k).trim();
        let overlaps =
            |a: &str| a == k || a.starts_with(&format!("{k}.")) || k.starts_with(&format!("{a}."));
        if let Some(a) = axes.iter().find(|a| overlaps(&a.key)) {
            problems.push(problem(
                Origin::Cli(set.clone()),
                k,
                format!(
                    "is swept too (`{}` at {}): give it in one place",
                    a.key, a.origin
                ),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "name = \"q\"\n[data]\nlayout = \"synthetic\"\nvalid_count = 2\n";

    fn load(text: &str, opts: &SweepOptions) -> Result<Vec<Loaded>, ConfigError> {
        load_str_points(text, Path::new("s.toml"), &[], opts, Path::new("/"))
    }

    fn names(v: &[Loaded]) -> Vec<String> {
        v.iter().map(|l| l.exp.name.clone()).collect()
    }

    fn labels(v: &[Loaded]) -> Vec<String> {
        v.iter()
            .map(|l| l.point.as_ref().unwrap().label.clone())
            .collect()
    }

    fn err(text: &str, opts: &SweepOptions) -> String {
        load(text, opts).unwrap_err().to_string()
    }

    fn cli(sweeps: &[&str]) -> SweepOptions {
        SweepOptions {
            sweeps: sweeps.iter().map(|s| s.to_string()).collect(),
            ..SweepOptions::default()
        }
    }

    #[test]
    fn a_file_without_sweep_is_one_experiment() {
        let v = load(BASE, &SweepOptions::default()).unwrap();
        assert_eq!(names(&v), ["q"]);
        assert!(v[0].point.is_none());
    }

    #[test]
    fn grid_in_declared_order_first_key_slowest() {
        let text =
            format!("{BASE}[sweep]\n\"train.seed\" = [0, 1]\n\"train.lr\" = [1e-3, 3e-4, 0.01]\n");
        let v = load(&text, &SweepOptions::default()).unwrap();
        assert_eq!(
            labels(&v),
            [
                "q[seed=0,lr=1e-3]",
                "q[seed=0,lr=3e-4]",
                "q[seed=0,lr=0.01]",
                "q[seed=1,lr=1e-3]",
                "q[seed=1,lr=3e-4]",
                "q[seed=1,lr=0.01]"
            ]
        );
        assert_eq!(v[1].exp.name, "q.seed_0.lr_3e-4");
        assert_eq!(v[1].exp.train.lr, 3e-4);
        assert_eq!(v[4].exp.train.seed, 1);
        let p = v[4].point.as_ref().unwrap();
        assert_eq!((p.index, p.count), (4, 6));
        assert_eq!(p.values[0], ("train.seed".into(), serde_json::json!(1)));
        // The swept key's origin is its list element.
        assert_eq!(v[4].origin("train.lr").to_string(), "s.toml:7:21");
    }

    #[test]
    fn zip_nested_tables_and_the_command_line_agree() {
        let zip = format!(
            "{BASE}[sweep]\nmode = \"zip\"\n\"train.lr\" = [1e-3, 3e-4]\n\"train.seed\" = [5, 6]\n"
        );
        let v = load(&zip, &SweepOptions::default()).unwrap();
        assert_eq!(labels(&v), ["q[lr=1e-3,seed=5]", "q[lr=3e-4,seed=6]"]);
        let nested = format!(
            "{BASE}[sweep]\nmode = \"zip\"\n[sweep.train]\nlr = [1e-3, 3e-4]\nseed = [5, 6]\n"
        );
        let w = load(&nested, &SweepOptions::default()).unwrap();
        assert_eq!(names(&v), names(&w));
        let mut opts = cli(&["train.lr=1e-3,3e-4", "train.seed=5,6"]);
        opts.mode = Some(SweepMode::Zip);
        let c = load(BASE, &opts).unwrap();
        assert_eq!(names(&v), names(&c));
        for (a, b) in v.iter().zip(&c) {
            assert_eq!(a.exp, b.exp);
        }
        assert_eq!(
            c[1].origin("train.seed").to_string(),
            "--sweep train.seed=5,6"
        );
    }

    #[test]
    fn the_command_line_replaces_a_file_list_and_values_split_outside_brackets() {
        let text = format!("{BASE}[sweep]\n\"train.lr\" = [1e-3, 3e-4]\n");
        let v = load(&text, &cli(&["train.lr=0.1", "model.widths=[8,16],[4]"])).unwrap();
        assert_eq!(
            labels(&v),
            ["q[lr=0.1,widths=[8,16]]", "q[lr=0.1,widths=[4]]"]
        );
        assert_eq!(v[0].exp.name, "q.lr_0.1.widths_8-16");
        assert_eq!(v[1].exp.model.widths, [4]);
        assert_eq!(
            split_top_level("a,\"b,c\",[1,2]"),
            ["a", "\"b,c\"", "[1,2]"]
        );
    }

    #[test]
    fn ambiguous_short_keys_keep_more_segments() {
        let v = load(
            BASE,
            &cli(&[
                "train.seed=1",
                "data.synthetic.seed=2",
                "evaluate.threshold=0.3",
            ]),
        )
        .unwrap();
        assert_eq!(
            labels(&v),
            ["q[train.seed=1,synthetic.seed=2,threshold=0.3]"]
        );
        assert_eq!(
            v[0].exp.name,
            "q.train.seed_1.synthetic.seed_2.threshold_0.3"
        );
    }

    #[test]
    fn a_bad_value_is_reported_at_its_list_element() {
        let text = format!(
            "{BASE}[sweep]\n\"train.seed\" = [0, 1, 2]\n\"train.lr\" = [1e-3, -1.0, 3e-4]\n"
        );
        let e = err(&text, &SweepOptions::default());
        // Reported once (not for each of the three points holding it), at line 7, column 21.
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(
            e.starts_with("s.toml:7:21: `train.lr`: -1 must be > 0"),
            "{e}"
        );
        assert!(e.contains("(sweep point 2 of 9: q[seed=0,lr=-1])"), "{e}");
        let e = err(
            &format!("{BASE}[sweep]\n\"train.lr\" = [1e-3, \"fast\"]\n"),
            &SweepOptions::default(),
        );
        assert!(
            e.starts_with("s.toml:6:21: `train.lr`: invalid type"),
            "{e}"
        );
        let e = err(BASE, &cli(&["train.batch=2,0"]));
        assert!(
            e.starts_with("--sweep train.batch=2,0: `train.batch`: must be at least 1"),
            "{e}"
        );
    }

    #[test]
    fn bad_sweeps_are_refused() {
        let sweep = |body: &str| {
            err(
                &format!("{BASE}[sweep]\n{body}\n"),
                &SweepOptions::default(),
            )
        };
        let e = sweep("\"trian.lr\" = [1e-3]");
        assert!(
            e.contains("`trian.lr`: unknown key in the sweep (did you mean `train.lr`?)"),
            "{e}"
        );
        let e = sweep("\"train.lr\" = []");
        assert!(e.starts_with("s.toml:6:1: `train.lr`: empty list"), "{e}");
        let e = sweep("mode = \"zip\"\n\"train.lr\" = [1e-3, 3e-4]\n\"train.seed\" = [1]");
        assert!(
            e.contains("\"zip\" needs lists of equal length: train.lr has 2, train.seed has 1"),
            "{e}"
        );
        let e = sweep("mode = \"zipper\"\n\"train.lr\" = [1e-3]");
        assert!(
            e.contains("`sweep.mode`: \"zipper\" must be \"grid\" or \"zip\""),
            "{e}"
        );
        let e = sweep("\"train.lr\" = 1e-3");
        assert!(e.contains("must be a list of values"), "{e}");
        let e = sweep("\"augment\" = [1]");
        assert!(e.contains("`augment`: is a section, not a key"), "{e}");
        let e = sweep("\"name\" = [\"a\", \"b\"]");
        assert!(e.contains("`name`: cannot be swept"), "{e}");
        let e = sweep("mode = \"grid\"");
        assert!(e.contains("lists no key to sweep"), "{e}");
        let e = sweep("\"train.lr\" = [1e-3]\n[sweep.train]\nlr = [2e-3]");
        assert!(e.contains("`train.lr`: is swept twice"), "{e}");
        // Two values that read the same: the second one is pointed at.
        let e = sweep("\"train.lr\" = [1e-3, 0.001]");
        assert!(
            e.starts_with(
                "s.toml:6:21: `sweep`: points 1 and 2 resolve to the same experiment q[lr=1e-3]"
            ),
            "{e}"
        );
        let e = sweep("\"evaluate.tta\" = [true, \"flip\"]");
        assert!(
            e.contains("points 1 and 2 resolve to the same experiment"),
            "{e}"
        );
        let e = err(BASE, &cli(&["train.lr"]));
        assert!(e.contains("expected KEY=V1,V2"), "{e}");
        let e = err(BASE, &cli(&["train.lr=1e-3,,2e-3"]));
        assert!(e.contains("an empty value between commas"), "{e}");
        let e = err(BASE, &cli(&["train.lr=1e-3", "train.lr=2e-3"]));
        assert!(e.contains("given to --sweep twice"), "{e}");
        let e = load_str_points(
            BASE,
            Path::new("s.toml"),
            &["train.lr=1".into()],
            &cli(&["train.lr=1e-3"]),
            Path::new("/"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("--set train.lr=1: `train.lr`: is swept too"),
            "{e}"
        );
    }

    #[test]
    fn more_than_max_points_needs_permission() {
        let text = format!(
            "{BASE}[sweep]\n\"train.seed\" = [{}]\n\"train.batch\" = [1, 2, 3]\n",
            (0..400)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let e = err(&text, &SweepOptions::default());
        assert!(
            e.contains("expands to 1200 points, more than the limit of 1000 (pass --max-points"),
            "{e}"
        );
        let opts = SweepOptions {
            max_points: 1200,
            ..SweepOptions::default()
        };
        assert_eq!(load(&text, &opts).unwrap().len(), 1200);
    }

    #[test]
    fn a_sweep_in_an_extended_file_is_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("base.toml"),
            format!("{BASE}[sweep]\n\"train.lr\" = [1e-3]\n"),
        )
        .unwrap();
        let child = d.path().join("child.toml");
        std::fs::write(&child, "extends = \"base.toml\"\nname = \"c\"\n").unwrap();
        let e = load_points(&child, &[], &SweepOptions::default(), d.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("base.toml:5:2: `sweep`: a file that is extended"),
            "{e}"
        );
        // A sweep file may extend a plain one, and `load` refuses a sweep file.
        let sweep = d.path().join("sweep.toml");
        std::fs::write(d.path().join("base.toml"), BASE).unwrap();
        std::fs::write(
            &sweep,
            "extends = \"base.toml\"\n[sweep]\n\"train.lr\" = [1e-3, 3e-4]\n",
        )
        .unwrap();
        let v = load_points(&sweep, &[], &SweepOptions::default(), d.path()).unwrap();
        assert_eq!(names(&v), ["q.lr_1e-3", "q.lr_3e-4"]);
        assert_eq!(
            v[1].origin("train.lr").to_string(),
            format!("{}:3:21", sweep.display())
        );
        let e = load::load(&sweep, &[], d.path()).unwrap_err().to_string();
        assert!(e.contains("this file is a sweep"), "{e}");
    }
}
