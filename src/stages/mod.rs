//! Stage implementations. A pipeline file names an implementation with `run = "<kind>"`;
//! the runner calls it with a [`StageCtx`] whose `out` directory is private to this run and
//! published atomically when `run` returns `Ok`.
//!
//! A stage reads only what its cache key covers. Each implementation declares the experiment
//! keys it reads ([`Stage::params`]) and the dataset files it reads ([`Stage::data`]); a
//! pipeline file that does not list them is refused when it is loaded, and the stage is handed
//! an experiment *view* holding the values of the listed params only (every other key at its
//! default), so a read of an unlisted key cannot see the experiment's value.
//!
//! This module never imports `crate::pipeline`: the runner depends on stages, not the reverse.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::Deserialize;
use serde_json::Value;

use crate::config::Experiment;
use crate::pipeline::progress::Progress;

pub mod compare;
mod debug;
pub mod evaluate;
pub mod preprocess;
pub mod report;
pub mod split;
pub mod train;

/// One kind of stage.
pub trait Stage: Sync {
    /// Bump when the output for the same inputs changes: it is part of every key.
    fn version(&self) -> u32;
    /// What this stage provides to stages downstream (`split`, `preprocess`, `train`, ...):
    /// two implementations of one role are interchangeable (e.g. `preprocess_native`).
    fn role(&self) -> &'static str;
    /// Roles that must be upstream (through `needs`) of a stage of this kind.
    fn requires(&self) -> &'static [&'static str] {
        &[]
    }
    /// The experiment keys or sections (`train.lr`, `augment`) this implementation reads. The
    /// pipeline must list each of them (or a section holding it) in the stage's `params`.
    fn params(&self) -> &'static [&'static str];
    /// The dataset files it reads under `data.root` (they enter the key by name or content).
    fn data(&self) -> DataInputs {
        DataInputs::None
    }
    /// Whether a stage killed mid-way may resume from what it left in its work directory.
    fn resumable(&self) -> bool {
        false
    }
    fn run(&self, ctx: &StageCtx) -> Result<()>;
}

/// Which dataset files a stage reads, in increasing order of what its key must cover.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, PartialOrd, Ord, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DataInputs {
    /// None: the stage reads only its params and upstream outputs.
    #[default]
    None,
    /// The names of the files under `data.root` (what split reads).
    Listing,
    /// The names and contents of the files under `data.root` (what preprocess reads).
    Content,
}

/// What a stage gets to work with.
pub struct StageCtx<'a> {
    /// The experiment as this stage may see it: the values of the params its pipeline lists
    /// (and `data.root` when it reads the dataset); every other key holds its default.
    pub exp: &'a Experiment,
    /// The canonical values of the params its pipeline lists, by dotted key.
    pub params: &'a BTreeMap<String, Value>,
    /// This stage's name in the pipeline.
    pub stage: &'a str,
    /// Where to write outputs (published as a whole when `run` succeeds).
    pub out: &'a Path,
    /// Every upstream stage (transitively): name → (role, published directory).
    pub upstream: BTreeMap<String, (String, PathBuf)>,
    pub progress: &'a Progress,
}

impl StageCtx<'_> {
    /// The published output directory of the upstream stage with this role.
    pub fn input(&self, kind: &str) -> Result<&Path> {
        let mut found = self.upstream.values().filter(|(k, _)| k == kind);
        match (found.next(), found.next()) {
            (Some((_, p)), None) => Ok(p),
            (None, _) => bail!("stage `{}` needs a `{kind}` stage upstream", self.stage),
            (Some(_), Some(_)) => bail!(
                "stage `{}` has several `{kind}` stages upstream; it needs exactly one",
                self.stage
            ),
        }
    }

    /// Every upstream stage with this role: (stage name, published directory), by name.
    pub fn inputs(&self, kind: &str) -> Vec<(&str, &Path)> {
        self.upstream
            .iter()
            .filter(|(_, (k, _))| k == kind)
            .map(|(n, (_, p))| (n.as_str(), p.as_path()))
            .collect()
    }
}

/// Every implementation, by kind.
pub const KINDS: &[&str] = &[
    "split",
    "preprocess",
    "preprocess_native",
    "train",
    "evaluate",
    "report",
    "compare",
    "debug",
];

pub fn lookup(kind: &str) -> Option<&'static dyn Stage> {
    match kind {
        "split" => Some(&split::Split),
        "preprocess" => Some(&preprocess::Preprocess),
        "preprocess_native" => Some(&preprocess::PreprocessNative),
        "train" => Some(&train::Train),
        "evaluate" => Some(&evaluate::Evaluate),
        "report" => Some(&report::Report),
        "compare" => Some(&compare::Compare),
        "debug" => Some(&debug::Debug),
        _ => None,
    }
}
