//! The pipeline is data: `pipelines/<name>.toml` declares the stages, what each needs and
//! which experiment keys it reads. This module parses and validates that file into a DAG.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::config::load::{schema_paths, suggest};
use crate::stages::{self, DataInputs};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PipelineFile {
    #[serde(default)]
    description: String,
    #[serde(rename = "stage")]
    stages: Vec<StageDecl>,
}

/// One stage as declared in the pipeline file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StageDecl {
    pub name: String,
    /// Implementation (`split`, `preprocess`, `train`, ...); defaults to `name`.
    #[serde(default)]
    pub run: Option<String>,
    #[serde(default)]
    pub needs: Vec<String>,
    /// Experiment keys or sections the stage reads (`train.lr`, `augment`).
    #[serde(default)]
    pub params: Vec<String>,
    #[serde(default)]
    pub data: DataInputs,
}

impl StageDecl {
    pub fn kind(&self) -> &str {
        self.run.as_deref().unwrap_or(&self.name)
    }
}

/// A validated pipeline: stages in a topological order.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub name: String,
    pub file: PathBuf,
    pub description: String,
    /// Topologically sorted (every stage after all it needs), ties in file order.
    pub stages: Vec<StageDecl>,
}

/// Pipelines shipped with the binary, used when the project has no `pipelines/<name>.toml`.
pub const EMBEDDED: &[(&str, &str)] = &[
    ("deeplabv3", include_str!("../../pipelines/deeplabv3.toml")),
    ("native", include_str!("../../pipelines/native.toml")),
];

impl Pipeline {
    /// Load `pipelines/<name>.toml` under `project_root`, or the embedded copy.
    pub fn load(name: &str, project_root: &Path) -> Result<Pipeline> {
        let file = project_root.join("pipelines").join(format!("{name}.toml"));
        if file.is_file() {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read pipeline file {}", file.display()))?;
            return Self::parse(name, &text, &file);
        }
        match EMBEDDED.iter().find(|(n, _)| *n == name) {
            Some((_, text)) => {
                Self::parse(name, text, Path::new(&format!("<embedded>/{name}.toml")))
            }
            None => bail!(
                "pipeline `{name}` not found: no {} (embedded pipelines: {})",
                file.display(),
                EMBEDDED
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// Parse and validate pipeline text; `file` is used in messages.
    pub fn parse(name: &str, text: &str, file: &Path) -> Result<Pipeline> {
        let f = file.display();
        let pf: PipelineFile =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{f}: malformed pipeline: {e}"))?;
        if pf.stages.is_empty() {
            bail!("{f}: declares no [[stage]]");
        }
        let mut names = BTreeSet::new();
        for s in &pf.stages {
            if !names.insert(s.name.as_str()) {
                bail!("{f}: stage `{}` is declared twice", s.name);
            }
        }
        let schema = schema_paths();
        for s in &pf.stages {
            let Some(imp) = stages::lookup(s.kind()) else {
                bail!(
                    "{f}: stage `{}`: unknown implementation `{}` (known: {})",
                    s.name,
                    s.kind(),
                    stages::KINDS.join(", ")
                );
            };
            for n in &s.needs {
                if !names.contains(n.as_str()) {
                    bail!("{f}: stage `{}` needs unknown stage `{n}`", s.name);
                }
            }
            for p in &s.params {
                if !schema.contains(p) {
                    let hint = suggest(p, &schema)
                        .map(|s| format!(" (did you mean `{s}`?)"))
                        .unwrap_or_default();
                    bail!("{f}: stage `{}`: unknown param `{p}`{hint}", s.name);
                }
            }
            check_declares_reads(&f.to_string(), s, imp)?;
        }
        let stages = topo_sort(&pf.stages).map_err(|cycle| {
            anyhow::anyhow!("{f}: the stages form a cycle: {}", cycle.join(" → "))
        })?;
        // Each implementation's required upstream kinds must be reachable through `needs`.
        let by_name: BTreeMap<&str, &StageDecl> =
            stages.iter().map(|s| (s.name.as_str(), s)).collect();
        for s in &stages {
            let Some(imp) = stages::lookup(s.kind()) else {
                continue;
            };
            let ancestors = ancestors(&by_name, &s.name);
            for req in imp.requires() {
                if !ancestors.iter().any(|a| {
                    stages::lookup(by_name[a.as_str()].kind()).is_some_and(|i| i.role() == *req)
                }) {
                    bail!(
                        "{f}: stage `{}` ({}) needs a `{req}` stage upstream (through `needs`), but none is there",
                        s.name,
                        s.kind()
                    );
                }
            }
        }
        Ok(Pipeline {
            name: name.to_string(),
            file: file.to_path_buf(),
            description: pf.description,
            stages,
        })
    }

    pub fn stage(&self, name: &str) -> Option<&StageDecl> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// Names of all stages `name` depends on, transitively.
    pub fn ancestors(&self, name: &str) -> BTreeSet<String> {
        let by_name: BTreeMap<&str, &StageDecl> =
            self.stages.iter().map(|s| (s.name.as_str(), s)).collect();
        ancestors(&by_name, name)
    }

    /// Names of all stages that depend on `name`, transitively, and `name` itself.
    pub fn downstream_of(&self, name: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::from([name.to_string()]);
        for s in &self.stages {
            if s.needs.iter().any(|n| out.contains(n)) {
                out.insert(s.name.clone());
            }
        }
        out
    }

    /// Graphviz rendering of the DAG.
    pub fn to_dot(&self) -> String {
        let mut s = format!(
            "digraph \"{}\" {{\n  rankdir=LR;\n  node [shape=box];\n",
            self.name
        );
        for st in &self.stages {
            let params = st.params.join("\\n");
            s.push_str(&format!(
                "  \"{}\" [label=\"{}\\n({})\\n{}\"];\n",
                st.name,
                st.name,
                st.kind(),
                params
            ));
            for n in &st.needs {
                s.push_str(&format!("  \"{n}\" -> \"{}\";\n", st.name));
            }
        }
        s.push_str("}\n");
        s
    }
}

/// The pipeline must list every param the implementation reads (or a section holding it),
/// and at least the dataset files it reads: otherwise its key would not cover what it reads,
/// and the cache would serve an output computed with other values.
fn check_declares_reads(f: &str, s: &StageDecl, imp: &dyn stages::Stage) -> Result<()> {
    for need in imp.params() {
        if !s.params.iter().any(|p| covers(p, need)) {
            bail!(
                "{f}: stage `{}` ({}) reads `{need}`, which its `params` do not list: add \"{need}\" \
                 (its cache key must cover every value the stage reads)",
                s.name,
                s.kind()
            );
        }
    }
    if s.data < imp.data() {
        let want = match imp.data() {
            DataInputs::Content => "content",
            _ => "listing",
        };
        bail!(
            "{f}: stage `{}` ({}) reads the dataset files under data.root: set data = \"{want}\" \
             so that they enter its cache key",
            s.name,
            s.kind()
        );
    }
    Ok(())
}

/// Whether listing `param` (a key or a section) covers the key `need`.
pub fn covers(param: &str, need: &str) -> bool {
    need == param
        || need
            .strip_prefix(param)
            .is_some_and(|rest| rest.starts_with('.'))
}

fn ancestors(by_name: &BTreeMap<&str, &StageDecl>, name: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut todo = vec![name.to_string()];
    while let Some(n) = todo.pop() {
        if let Some(s) = by_name.get(n.as_str()) {
            for d in &s.needs {
                if out.insert(d.clone()) {
                    todo.push(d.clone());
                }
            }
        }
    }
    out
}

/// Kahn's algorithm, stable in declaration order; on a cycle, returns one cycle's names.
fn topo_sort(decls: &[StageDecl]) -> std::result::Result<Vec<StageDecl>, Vec<String>> {
    let mut done: BTreeSet<&str> = BTreeSet::new();
    let mut out = Vec::new();
    while out.len() < decls.len() {
        let next = decls.iter().find(|s| {
            !done.contains(s.name.as_str()) && s.needs.iter().all(|n| done.contains(n.as_str()))
        });
        match next {
            Some(s) => {
                done.insert(&s.name);
                out.push(s.clone());
            }
            None => return Err(find_cycle(decls, &done)),
        }
    }
    Ok(out)
}

fn find_cycle(decls: &[StageDecl], done: &BTreeSet<&str>) -> Vec<String> {
    let by_name: BTreeMap<&str, &StageDecl> = decls.iter().map(|s| (s.name.as_str(), s)).collect();
    let Some(start) = decls.iter().find(|s| !done.contains(s.name.as_str())) else {
        return Vec::new();
    };
    let mut path: Vec<String> = vec![start.name.clone()];
    let mut cur = start;
    loop {
        let Some(next) = cur.needs.iter().find(|n| !done.contains(n.as_str())) else {
            return path;
        };
        if let Some(i) = path.iter().position(|p| p == next) {
            let mut cycle = path[i..].to_vec();
            cycle.push(next.clone());
            cycle.reverse();
            return cycle;
        }
        path.push(next.clone());
        match by_name.get(next.as_str()) {
            Some(s) => cur = s,
            None => return path,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Pipeline> {
        Pipeline::parse("t", text, Path::new("t.toml"))
    }

    #[test]
    fn shipped_pipelines_are_valid() {
        for (name, text) in EMBEDDED {
            let p = Pipeline::parse(name, text, Path::new(name)).unwrap();
            assert_eq!(p.stages[0].name, "split");
        }
    }

    #[test]
    fn sorts_topologically() {
        let p = parse(
            "[[stage]]\nname='b'\nrun='debug'\nneeds=['a']\n[[stage]]\nname='a'\nrun='debug'\n",
        )
        .unwrap();
        let names: Vec<_> = p.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(p.downstream_of("a").len(), 2);
        assert!(p.ancestors("b").contains("a"));
    }

    #[test]
    fn refuses_cycles_unknown_stages_and_params() {
        let e = parse("[[stage]]\nname='a'\nrun='debug'\nneeds=['b']\n[[stage]]\nname='b'\nrun='debug'\nneeds=['a']\n")
            .unwrap_err()
            .to_string();
        // The message says "cycle" and walks the loop back to where it started.
        assert!(
            e.contains("the stages form a cycle")
                && (e.contains("a → b → a") || e.contains("b → a → b")),
            "{e}"
        );
        let e = parse("[[stage]]\nname='a'\nrun='debug'\nneeds=['zz']\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown stage `zz`"), "{e}");
        let e = parse("[[stage]]\nname='a'\nrun='nope'\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown implementation `nope`"), "{e}");
        let e = parse("[[stage]]\nname='a'\nrun='debug'\nparams=['trian.lr']\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown param `trian.lr`") && e.contains("train.lr"),
            "{e}"
        );
        let e = parse("[[stage]]\nname='a'\nrun='debug'\n[[stage]]\nname='a'\nrun='debug'\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("declared twice"), "{e}");
    }

    #[test]
    fn refuses_a_stage_whose_params_miss_what_it_reads() {
        let e = parse("[[stage]]\nname='split'\nparams=['data.layout', 'data.valid_count', 'data.valid_ids', 'data.synthetic']\ndata='listing'\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("stage `split` (split) reads `data.split_seed`"),
            "{e}"
        );
        // A section covers its keys; data inputs must be declared too.
        let e = parse("[[stage]]\nname='split'\nparams=['data']\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("data = \"listing\""), "{e}");
        parse("[[stage]]\nname='split'\nparams=['data']\ndata='content'\n").unwrap();
        assert!(covers("train", "train.lr") && covers("train.lr", "train.lr"));
        assert!(!covers("train.l", "train.lr") && !covers("train.lr", "train"));
    }
}
