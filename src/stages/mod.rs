//! Stage implementations. A pipeline file names an implementation with `run = "<kind>"`;
//! the runner calls it with a [`StageCtx`] whose `out` directory is private to this run and
//! published atomically when `run` returns `Ok`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use crate::config::Experiment;
use crate::progress::Progress;

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
    /// Whether a stage killed mid-way may resume from what it left in its work directory.
    fn resumable(&self) -> bool {
        false
    }
    fn run(&self, ctx: &StageCtx) -> Result<()>;
}

/// What a stage gets to work with.
pub struct StageCtx<'a> {
    pub exp: &'a Experiment,
    /// This stage's name in the pipeline.
    pub stage: &'a str,
    /// Where to write outputs (published as a whole when `run` succeeds).
    pub out: &'a Path,
    /// Every upstream stage (transitively): name → (role, published directory).
    pub upstream: BTreeMap<String, (String, PathBuf)>,
    pub project_root: &'a Path,
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
}

/// Every implementation, by kind.
pub const KINDS: &[&str] = &[
    "split",
    "preprocess",
    "preprocess_native",
    "train",
    "evaluate",
    "report",
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
        "debug" => Some(&debug::Debug),
        _ => None,
    }
}
