//! `compare`: the comparison report of several experiments (`driveline report`).
//!
//! Its upstream stages are the experiments' `report` stages, named after their experiments;
//! its params are the report's `name` and the experiments' `order`. It reads each upstream
//! `summary.json` and renders the comparison (figures, `index.html`, `README.md`,
//! `summary.csv`). It is planned, locked, cached and published like every other stage: its
//! key is the hash of those params and the experiments' report keys, so rerunning it with
//! nothing changed does no work, and changing one experiment redoes only that experiment's
//! stages and the comparison.

use std::fs;

use anyhow::{bail, Context, Result};

use super::report::SUMMARY;
use super::{Stage, StageCtx};
use crate::report::{self, ExperimentSummary};

pub struct Compare;

impl Stage for Compare {
    fn version(&self) -> u32 {
        1
    }
    /// Not read from an experiment: the runner gives it `name` and `order` directly.
    fn params(&self) -> &'static [&'static str] {
        &[]
    }
    fn role(&self) -> &'static str {
        "compare"
    }
    fn requires(&self) -> &'static [&'static str] {
        &["report"]
    }
    fn run(&self, ctx: &StageCtx) -> Result<()> {
        let name = ctx
            .params
            .get("name")
            .and_then(|v| v.as_str())
            .context("compare: no `name` param")?;
        let order: Vec<&str> = ctx
            .params
            .get("order")
            .and_then(|v| v.as_array())
            .context("compare: no `order` param")?
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        let inputs = ctx.inputs("report");
        if order.is_empty() {
            bail!("no experiment to compare");
        }
        let mut summaries = Vec::new();
        for exp in order {
            let Some((_, dir)) = inputs.iter().find(|(n, _)| *n == exp) else {
                bail!("compare: no report of experiment `{exp}` upstream");
            };
            let p = dir.join(SUMMARY);
            let s: ExperimentSummary = serde_json::from_str(
                &fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?,
            )
            .with_context(|| format!("malformed report summary of `{exp}` ({})", p.display()))?;
            summaries.push(s);
        }
        report::render_comparison(&format!("driveline report: {name}"), &summaries, ctx.out)
    }
}
