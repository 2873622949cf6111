//! Loading an experiment: parse with spans, merge `extends` chains, apply `--set`
//! overrides, refuse unknown keys / wrong types / out-of-range values with the file,
//! line and column they came from.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};
use toml::{Table, Value};

use super::schema::{Experiment, REMOVED_KEYS};

/// Where a key's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    File {
        file: PathBuf,
        line: usize,
        col: usize,
    },
    /// `--set key=value` on the command line.
    Cli(String),
    /// `--sweep key=v1,v2,...` on the command line.
    Sweep(String),
    /// Not set anywhere: the schema default.
    Default,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { file, line, col } => write!(f, "{}:{line}:{col}", file.display()),
            Origin::Cli(arg) => write!(f, "--set {arg}"),
            Origin::Sweep(arg) => write!(f, "--sweep {arg}"),
            Origin::Default => write!(f, "(default)"),
        }
    }
}

/// One problem found in an experiment: where, which key, what, and a suggestion.
#[derive(Debug, Clone)]
pub struct Problem {
    pub origin: Origin,
    pub key: String,
    pub message: String,
    pub suggestion: Option<String>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.origin)?;
        if !self.key.is_empty() {
            write!(f, "`{}`: ", self.key)?;
        }
        write!(f, "{}", self.message)?;
        if let Some(s) = &self.suggestion {
            write!(f, " (did you mean `{s}`?)")?;
        }
        Ok(())
    }
}

/// Every problem found while loading an experiment; the run stops before any stage.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    pub(super) fn one(origin: Origin, key: &str, message: impl Into<String>) -> Self {
        ConfigError {
            problems: vec![Problem {
                origin,
                key: key.to_string(),
                message: message.into(),
                suggestion: None,
            }],
        }
    }
}

/// A loaded, validated experiment and where each of its keys was set.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub exp: Experiment,
    /// The experiment file (None for the embedded default).
    pub file: Option<PathBuf>,
    /// Dotted key → where it was set (keys not listed come from the schema defaults).
    pub origins: BTreeMap<String, Origin>,
    /// The sweep point this experiment is, when it comes from a `[sweep]` or `--sweep`.
    pub point: Option<super::sweep::Point>,
}

impl Loaded {
    pub fn origin(&self, key: &str) -> Origin {
        self.origins.get(key).cloned().unwrap_or(Origin::Default)
    }
}

/// Keys whose values are file-system paths: resolved against the project root when they come
/// from a file, against the working directory when they come from `--set`.
pub const PATH_KEYS: &[&str] = &["data.root", "model.pretrained"];

/// Load `file` (following `extends`), apply `sets` (`key=value`), resolve relative paths,
/// and validate. `project_root` anchors relative paths written in experiment files.
///
/// A file with a `[sweep]` is refused here: it is several experiments
/// ([`super::sweep::load_points`] expands it).
pub fn load(file: &Path, sets: &[String], project_root: &Path) -> Result<Loaded, ConfigError> {
    let mut chain = Vec::new();
    let (table, mut origins) = load_chain(file, &mut chain)?;
    refuse_sweep(&table, &origins)?;
    finish(table, &mut origins, Some(file), sets, project_root)
}

fn refuse_sweep(table: &Table, origins: &BTreeMap<String, Origin>) -> Result<(), ConfigError> {
    if table.contains_key("sweep") {
        return Err(ConfigError::one(
            origin_of(origins, "sweep"),
            "sweep",
            "this file is a sweep (several experiments); load it with sweep::load_points",
        ));
    }
    Ok(())
}

/// Load an experiment given as text (the embedded default), with `name` used in messages.
pub fn load_str(
    text: &str,
    name: &Path,
    sets: &[String],
    project_root: &Path,
) -> Result<Loaded, ConfigError> {
    let (table, mut origins) = parse_with_spans(text, name)?;
    refuse_sweep(&table, &origins)?;
    if table.contains_key("extends") {
        return Err(ConfigError::one(
            origins.get("extends").cloned().unwrap_or(Origin::Default),
            "extends",
            "an embedded experiment cannot extend a file",
        ));
    }
    finish(table, &mut origins, None, sets, project_root)
}

pub(super) fn finish(
    mut table: Table,
    origins: &mut BTreeMap<String, Origin>,
    file: Option<&Path>,
    sets: &[String],
    project_root: &Path,
) -> Result<Loaded, ConfigError> {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    for set in sets {
        apply_set(&mut table, origins, set)?;
    }
    table.remove("extends");
    check_known_keys(&table, "", origins)?;
    for key in PATH_KEYS {
        resolve_path_key(&mut table, key, origins, project_root, &cwd);
    }
    let exp: Experiment = serde_path_to_error::deserialize(Value::Table(table)).map_err(|e| {
        let key = e.path().to_string();
        let key = if key == "." { String::new() } else { key };
        ConfigError::one(
            origin_of(origins, &key),
            &key,
            clean_serde_message(&e.inner().to_string()),
        )
    })?;
    let problems: Vec<Problem> = exp
        .validate()
        .into_iter()
        .map(|(key, message)| Problem {
            origin: origin_of(origins, &key),
            key,
            message,
            suggestion: None,
        })
        .collect();
    if !problems.is_empty() {
        return Err(ConfigError { problems });
    }
    Ok(Loaded {
        exp,
        file: file.map(Path::to_path_buf),
        origins: origins.clone(),
        point: None,
    })
}

/// The origin of `key`, or of its closest set ancestor (a section), or the default.
pub(super) fn origin_of(origins: &BTreeMap<String, Origin>, key: &str) -> Origin {
    let mut k = key;
    loop {
        if let Some(o) = origins.get(k) {
            return o.clone();
        }
        match k.rfind('.') {
            Some(i) => k = &k[..i],
            None => return Origin::Default,
        }
    }
}

fn clean_serde_message(msg: &str) -> String {
    // toml's value deserializer may append its own location; ours is better.
    msg.lines().next().unwrap_or(msg).trim().to_string()
}

/// Load a file and everything it extends, parents first, merged. Only the file named first
/// may hold a `[sweep]`: one in a file it extends is refused.
pub(super) fn load_chain(
    file: &Path,
    chain: &mut Vec<PathBuf>,
) -> Result<(Table, BTreeMap<String, Origin>), ConfigError> {
    let canon = file.canonicalize().map_err(|e| {
        ConfigError::one(
            Origin::Cli(file.display().to_string()),
            "",
            format!("cannot read experiment file {}: {e}", file.display()),
        )
    })?;
    if chain.contains(&canon) {
        let cycle: Vec<String> = chain.iter().map(|p| p.display().to_string()).collect();
        return Err(ConfigError::one(
            Origin::File {
                file: file.to_path_buf(),
                line: 1,
                col: 1,
            },
            "extends",
            format!(
                "`extends` cycle: {} → {}",
                cycle.join(" → "),
                file.display()
            ),
        ));
    }
    chain.push(canon);
    let text = std::fs::read_to_string(file).map_err(|e| {
        ConfigError::one(
            Origin::Cli(file.display().to_string()),
            "",
            format!("cannot read experiment file {}: {e}", file.display()),
        )
    })?;
    let (table, origins) = parse_with_spans(&text, file)?;
    let Some(parent) = table.get("extends") else {
        return Ok((table, origins));
    };
    let ext_origin = origins.get("extends").cloned().unwrap_or(Origin::Default);
    let Some(parent) = parent.as_str() else {
        return Err(ConfigError::one(
            ext_origin,
            "extends",
            "must be a string (a path relative to this file)",
        ));
    };
    let parent_path = file.parent().unwrap_or(Path::new(".")).join(parent);
    if !parent_path.is_file() {
        return Err(ConfigError::one(
            ext_origin,
            "extends",
            format!("file not found: {}", parent_path.display()),
        ));
    }
    let (mut base, mut base_origins) = load_chain(&parent_path, chain)?;
    if base.contains_key("sweep") {
        return Err(ConfigError::one(
            origin_of(&base_origins, "sweep"),
            "sweep",
            format!(
                "a file that is extended (here by {}) cannot hold a [sweep]: \
                 put the sweep in the file you run",
                file.display()
            ),
        ));
    }
    base.remove("extends");
    base_origins.remove("extends");
    merge(&mut base, table);
    base_origins.extend(origins);
    Ok((base, base_origins))
}

/// Deep-merge `over` into `base`: tables merge key by key, anything else replaces.
pub fn merge(base: &mut Table, over: Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(Value::Table(b)), Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Parse TOML text into a table plus the line/column of every key (and of every list element
/// under `sweep`, as `sweep.<key>[<i>]`).
pub(super) fn parse_with_spans(
    text: &str,
    file: &Path,
) -> Result<(Table, BTreeMap<String, Origin>), ConfigError> {
    let de = DeTable::parse(text).map_err(|e| {
        let (line, col) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
        ConfigError::one(
            Origin::File {
                file: file.to_path_buf(),
                line,
                col,
            },
            "",
            format!("malformed TOML: {}", e.message()),
        )
    })?;
    let mut origins = BTreeMap::new();
    collect_spans(de.get_ref(), "", text, file, &mut origins);
    let table: Table = toml::from_str(text).map_err(|e| {
        ConfigError::one(
            Origin::File {
                file: file.to_path_buf(),
                line: 1,
                col: 1,
            },
            "",
            format!("malformed TOML: {}", e.message()),
        )
    })?;
    Ok((table, origins))
}

fn collect_spans(
    t: &DeTable<'_>,
    prefix: &str,
    text: &str,
    file: &Path,
    out: &mut BTreeMap<String, Origin>,
) {
    for (k, v) in t.iter() {
        let path = join(prefix, k.get_ref());
        let (line, col) = line_col(text, k.span().start);
        out.insert(
            path.clone(),
            Origin::File {
                file: file.to_path_buf(),
                line,
                col,
            },
        );
        match v.get_ref() {
            DeValue::Table(inner) => collect_spans(inner, &path, text, file, out),
            DeValue::Array(items) if path == "sweep" || path.starts_with("sweep.") => {
                for (i, item) in items.iter().enumerate() {
                    let (line, col) = line_col(text, item.span().start);
                    out.insert(
                        format!("{path}[{i}]"),
                        Origin::File {
                            file: file.to_path_buf(),
                            line,
                            col,
                        },
                    );
                }
            }
            _ => {}
        }
    }
}

pub(super) fn join(prefix: &str, k: &str) -> String {
    if prefix.is_empty() {
        k.to_string()
    } else {
        format!("{prefix}.{k}")
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Apply one `--set key=value`. The value is read as TOML (`3e-4`, `true`, `[1, 2]`,
/// `"text"`); anything that is not valid TOML is taken as a string (`resnet101`, `/data/x`).
fn apply_set(
    table: &mut Table,
    origins: &mut BTreeMap<String, Origin>,
    set: &str,
) -> Result<(), ConfigError> {
    let Some((key, raw)) = set.split_once('=') else {
        return Err(ConfigError::one(
            Origin::Cli(set.to_string()),
            "",
            "expected KEY=VALUE, e.g. --set train.lr=3e-4",
        ));
    };
    let key = key.trim();
    if key.is_empty() || key.split('.').any(str::is_empty) {
        return Err(ConfigError::one(
            Origin::Cli(set.to_string()),
            key,
            "empty key segment",
        ));
    }
    let value = parse_cli_value(raw.trim());
    let origin = Origin::Cli(set.to_string());
    set_value(table, key, value, &origin)?;
    origins.insert(key.to_string(), origin);
    Ok(())
}

/// Set the dotted `key` to `value`, creating the sections on the way.
pub(super) fn set_value(
    table: &mut Table,
    key: &str,
    value: Value,
    origin: &Origin,
) -> Result<(), ConfigError> {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().unwrap_or(key);
    let mut cur = &mut *table;
    let mut prefix = String::new();
    for p in parts {
        prefix = join(&prefix, p);
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| Value::Table(Table::new()));
        match entry {
            Value::Table(t) => cur = t,
            _ => {
                return Err(ConfigError::one(
                    origin.clone(),
                    &prefix,
                    "is not a table, cannot set a key inside it",
                ))
            }
        }
    }
    cur.insert(last.to_string(), value);
    Ok(())
}

pub(super) fn parse_cli_value(raw: &str) -> Value {
    let doc = format!("v = {raw}");
    match toml::from_str::<Table>(&doc) {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| Value::String(raw.into())),
        Err(_) => Value::String(raw.to_string()),
    }
}

fn resolve_path_key(
    table: &mut Table,
    key: &str,
    origins: &BTreeMap<String, Origin>,
    project_root: &Path,
    cwd: &Path,
) {
    let (section, leaf) = key.split_once('.').unwrap_or(("", key));
    let Some(Value::Table(t)) = table.get_mut(section) else {
        return;
    };
    let Some(Value::String(s)) = t.get_mut(leaf) else {
        return;
    };
    if s.is_empty() || Path::new(s.as_str()).is_absolute() {
        return;
    }
    let base = match origins.get(key) {
        Some(Origin::Cli(_)) => cwd,
        _ => project_root,
    };
    *s = base.join(s.as_str()).display().to_string();
}

/// The tree of keys the schema knows, read off a default experiment.
pub(super) fn known_keys() -> Table {
    let mut t = match Value::try_from(Experiment::known()) {
        Ok(Value::Table(t)) => t,
        _ => Table::new(),
    };
    t.insert("extends".into(), Value::String(String::new()));
    // `[resources.<stage>]`: any stage name, each with the keys of `Resources`.
    let mut res = Table::new();
    if let Ok(Value::Table(r)) = Value::try_from(super::resources::Resources::known()) {
        res.insert("default".into(), Value::Table(r));
    }
    t.insert("resources".into(), Value::Table(res));
    t
}

pub(super) fn all_paths(t: &Table, prefix: &str, out: &mut Vec<String>) {
    for (k, v) in t {
        let p = join(prefix, k);
        out.push(p.clone());
        if let Value::Table(inner) = v {
            all_paths(inner, &p, out);
        }
    }
}

/// Closest known dotted key to `key`, if close enough to be a likely typo.
pub fn suggest(key: &str, candidates: &[String]) -> Option<String> {
    candidates
        .iter()
        .map(|c| (strsim::damerau_levenshtein(key, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.clone())
}

fn check_known_keys(
    table: &Table,
    _prefix: &str,
    origins: &BTreeMap<String, Origin>,
) -> Result<(), ConfigError> {
    let known = known_keys();
    let mut known_paths = Vec::new();
    all_paths(&known, "", &mut known_paths);
    let mut problems = Vec::new();
    walk_unknown(table, &known, "", origins, &known_paths, &mut problems);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError { problems })
    }
}

fn walk_unknown(
    t: &Table,
    known: &Table,
    prefix: &str,
    origins: &BTreeMap<String, Origin>,
    known_paths: &[String],
    problems: &mut Vec<Problem>,
) {
    for (k, v) in t {
        let path = join(prefix, k);
        // Stage names under `resources` are free; their keys are those of `default`.
        let known_k = if prefix == "resources" {
            known.get("default")
        } else {
            known.get(k)
        };
        match known_k {
            None => {
                if let Some(advice) = removed(&path) {
                    problems.push(Problem {
                        origin: origin_of(origins, &path),
                        key: path,
                        message: advice.to_string(),
                        suggestion: None,
                    });
                    continue;
                }
                // Report the leaves of an unknown table (`[trian] lr = …` → `trian.lr`), so
                // the suggestion can name the full key (`train.lr`).
                let mut leaves = Vec::new();
                match v {
                    Value::Table(vt) if !vt.is_empty() => leaf_paths(vt, &path, &mut leaves),
                    _ => leaves.push(path.clone()),
                }
                for leaf in leaves {
                    // Under `resources.<stage>`, suggest among that stage's keys.
                    let suggestion = match leaf.strip_prefix("resources.") {
                        Some(rest) if prefix.starts_with("resources.") => {
                            let stage = rest.split('.').next().unwrap_or_default();
                            let local: Vec<String> = known_paths
                                .iter()
                                .filter_map(|k| k.strip_prefix("resources.default."))
                                .map(|k| format!("resources.{stage}.{k}"))
                                .collect();
                            suggest(&leaf, &local)
                        }
                        _ => suggest(&leaf, known_paths),
                    };
                    problems.push(Problem {
                        origin: origin_of(origins, &leaf),
                        suggestion,
                        key: leaf,
                        message: "unknown key".into(),
                    });
                }
            }
            Some(Value::Table(kt)) => {
                if let Value::Table(vt) = v {
                    walk_unknown(vt, kt, &path, origins, known_paths, problems);
                }
            }
            Some(_) => {}
        }
    }
}

/// What to do instead of setting `key`, if the schema once had it.
fn removed(key: &str) -> Option<&'static str> {
    REMOVED_KEYS
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, advice)| *advice)
}

fn leaf_paths(t: &Table, prefix: &str, out: &mut Vec<String>) {
    for (k, v) in t {
        let p = join(prefix, k);
        match v {
            Value::Table(inner) if !inner.is_empty() => leaf_paths(inner, &p, out),
            _ => out.push(p),
        }
    }
}

/// The schema's dotted keys (sections and leaves), for validating pipeline `params`
/// (`resources` is not among them: no stage key may depend on it).
pub fn schema_paths() -> Vec<String> {
    let mut t = known_keys();
    t.remove("resources");
    let mut v = Vec::new();
    all_paths(&t, "", &mut v);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        let t = "a = 1\n[train]\nlr = 2\n";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, t.find("lr").unwrap()), (3, 1));
        assert_eq!(line_col(t, t.find("= 2").unwrap()), (3, 4));
    }

    #[test]
    fn cli_values_are_typed_by_toml_else_strings() {
        assert_eq!(parse_cli_value("3e-4"), Value::Float(3e-4));
        assert_eq!(parse_cli_value("2"), Value::Integer(2));
        assert_eq!(parse_cli_value("true"), Value::Boolean(true));
        assert_eq!(
            parse_cli_value("resnet101"),
            Value::String("resnet101".into())
        );
        assert_eq!(parse_cli_value("../x/y"), Value::String("../x/y".into()));
    }

    #[test]
    fn merge_is_deep_and_later_wins() {
        let mut a: Table = toml::from_str("[train]\nlr = 1\nepochs = 3\n[model]\nx = 1").unwrap();
        let b: Table = toml::from_str("[train]\nlr = 2").unwrap();
        merge(&mut a, b);
        assert_eq!(a["train"]["lr"].as_integer(), Some(2));
        assert_eq!(a["train"]["epochs"].as_integer(), Some(3));
        assert_eq!(a["model"]["x"].as_integer(), Some(1));
    }

    #[test]
    fn suggests_near_misses_only() {
        let known = schema_paths();
        assert_eq!(suggest("trian.lr", &known).as_deref(), Some("train.lr"));
        assert_eq!(
            suggest("train.epoch", &known).as_deref(),
            Some("train.epochs")
        );
        assert_eq!(suggest("completely.different", &known), None);
    }
}
