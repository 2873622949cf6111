//! One plan for all the experiments of a command, run as one DAG.
//!
//! [`Plan::build`] plans every experiment (keys, staleness: `runner::plan`), applies
//! `--until`/`--force`, and merges their stages into nodes, one per key: stages that several
//! experiments share (same key) become one node and run once. The comparison report adds one
//! more node downstream of the experiments' report stages ([`Plan::add_compare`]).
//!
//! [`Plan::run`] hands each stale node to an [`Executor`] once every node it needs is
//! published, up to the executor's capacity, and waits for them; the nodes are started in plan
//! order (the experiments' order, each in pipeline order), so with one slot it runs exactly
//! what the sequential runner did. After a failure nothing new starts; the nodes already
//! running finish (their outputs are published atomically or not at all), then the command
//! fails with every message.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::cache::short;
use super::executor::{interrupted, Executor, Outcome};
use super::runner::{self, link_run, ExperimentReport, Planned, StageReport};
use super::{Env, Pipeline, RunOptions};
use crate::config::resources::{self, Resources};
use crate::config::Loaded;

/// One stage to compute (or reuse), unique by key.
#[derive(Debug, Clone)]
pub struct Node {
    pub planned: Planned,
    /// The experiment it is computed for: the first in the command that needs it.
    pub exp: String,
    /// `--force`: recompute even if cached.
    pub force: bool,
    /// What it asks of a cluster (`[resources.<stage>]` of that experiment).
    pub resources: Resources,
    /// The nodes it needs (direct upstream).
    pub deps: Vec<usize>,
}

impl Node {
    /// Why it must run; None when its output can be reused.
    pub fn reason(&self) -> Option<String> {
        if self.force {
            Some("forced".into())
        } else {
            self.planned.stale.clone()
        }
    }
}

/// One experiment's stages: (stage name, node index), in pipeline order.
#[derive(Debug, Clone)]
pub struct ExpPlan {
    pub name: String,
    pub pipeline: String,
    pub stages: Vec<(String, usize)>,
}

#[derive(Debug, Default)]
pub struct Plan {
    pub nodes: Vec<Node>,
    pub experiments: Vec<ExpPlan>,
    by_key: BTreeMap<String, usize>,
}

impl Plan {
    /// Plan every experiment and merge their stages into one DAG.
    pub fn build(env: &Env, exps: &[Loaded], opts: &RunOptions) -> Result<Plan> {
        let mut plan = Plan::default();
        for l in exps {
            let exp = &l.exp;
            let pipeline = Pipeline::load(&exp.pipeline, &env.project_root).with_context(|| {
                format!("experiment `{}`: pipeline `{}`", exp.name, exp.pipeline)
            })?;
            let known = |what: &str, s: &str| -> Result<()> {
                if pipeline.stage(s).is_none() {
                    bail!(
                        "{what} {s}: no such stage in pipeline `{}` (stages: {})",
                        pipeline.name,
                        pipeline
                            .stages
                            .iter()
                            .map(|s| s.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                Ok(())
            };
            let selected: BTreeSet<String> = match &opts.until {
                Some(u) => {
                    known("--until", u)?;
                    let mut s = pipeline.ancestors(u);
                    s.insert(u.clone());
                    s
                }
                None => pipeline.stages.iter().map(|s| s.name.clone()).collect(),
            };
            let forced = match &opts.force {
                Some(f) => {
                    known("--force", f)?;
                    pipeline.downstream_of(f)
                }
                None => BTreeSet::new(),
            };
            let mut stages = Vec::new();
            for p in runner::plan(env, l, &pipeline)? {
                if !selected.contains(&p.name) {
                    continue;
                }
                let force = forced.contains(&p.name);
                let res = resources::for_stage(&exp.resources, &p.name);
                let name = p.name.clone();
                let i = plan.add(p, &exp.name, force, res);
                stages.push((name, i));
            }
            plan.experiments.push(ExpPlan {
                name: exp.name.clone(),
                pipeline: pipeline.name.clone(),
                stages,
            });
        }
        Ok(plan)
    }

    /// Add a node (or merge it into the node of the same key); returns its index.
    fn add(&mut self, p: Planned, exp: &str, force: bool, resources: Resources) -> usize {
        if let Some(&i) = self.by_key.get(&p.key) {
            self.nodes[i].force |= force;
            return i;
        }
        let deps = p
            .upstream
            .values()
            .filter_map(|k| self.by_key.get(k).copied())
            .collect();
        self.by_key.insert(p.key.clone(), self.nodes.len());
        self.nodes.push(Node {
            planned: p,
            exp: exp.to_string(),
            force,
            resources,
            deps,
        });
        self.nodes.len() - 1
    }

    /// Add the comparison report of every experiment of the plan (named `name`), downstream
    /// of their `report` stages; returns its node index.
    pub fn add_compare(&mut self, env: &Env, name: &str, out_root: &Path) -> Result<usize> {
        let mut reports = Vec::new();
        for e in &self.experiments {
            let Some(&(_, i)) = e
                .stages
                .iter()
                .find(|(_, i)| self.nodes[*i].planned.role == "report")
            else {
                bail!("experiment `{}`: its pipeline has no report stage", e.name);
            };
            reports.push((e.name.clone(), self.nodes[i].planned.key.clone()));
        }
        let p = runner::plan_compare(env, name, &reports, out_root)?;
        let first = self
            .experiments
            .first()
            .map(|e| e.name.clone())
            .unwrap_or_default();
        Ok(self.add(p, &first, false, Resources::default()))
    }

    /// Run every stale node with `exec`; returns each experiment's stages (and, when the
    /// plan has a comparison node, its report last under the name `compare`).
    pub fn run(
        &self,
        env: &Env,
        exec: &mut dyn Executor,
        opts: &RunOptions,
    ) -> Result<Vec<ExperimentReport>> {
        let n = self.nodes.len();
        let mut done: Vec<Option<Outcome>> = vec![None; n];
        for e in &self.experiments {
            if !opts.dry_run {
                opts.say(&format!("{} ({})", e.name, e.pipeline));
            }
            for (stage, i) in &e.stages {
                let node = &self.nodes[*i];
                match node.reason() {
                    None => {
                        opts.say(&format!("  {stage}: cached ({})", short(&node.planned.key)));
                        done[*i] = Some(Outcome::cached());
                    }
                    Some(r) if opts.dry_run => opts.say(&format!("  {stage}: stale ({r})")),
                    Some(_) => {}
                }
            }
        }
        if !opts.dry_run {
            self.schedule(env, exec, &mut done)?;
        }
        Ok(self.reports(&done))
    }

    fn schedule(
        &self,
        env: &Env,
        exec: &mut dyn Executor,
        done: &mut [Option<Outcome>],
    ) -> Result<()> {
        let mut running: BTreeSet<usize> = BTreeSet::new();
        let mut failures: Vec<String> = Vec::new();
        for (i, o) in done.iter().enumerate() {
            if o.is_some() {
                self.link(env, i)?;
            }
        }
        loop {
            if interrupted() {
                exec.abort();
                bail!("interrupted: stopped {} running stage(s)", running.len());
            }
            if failures.is_empty() {
                for i in 0..self.nodes.len() {
                    if running.len() >= exec.capacity() {
                        break;
                    }
                    let node = &self.nodes[i];
                    if done[i].is_some()
                        || running.contains(&i)
                        || !node.deps.iter().all(|d| done[*d].is_some())
                    {
                        continue;
                    }
                    let reason = node.reason().unwrap_or_default();
                    match exec.start(env, node, i, &reason) {
                        Ok(()) => {
                            running.insert(i);
                        }
                        Err(e) => {
                            failures.push(format!("{e:#}"));
                            break;
                        }
                    }
                }
            }
            if running.is_empty() {
                break;
            }
            for (i, res) in exec.wait(env)? {
                running.remove(&i);
                match res {
                    Ok(o) => {
                        done[i] = Some(o);
                        self.link(env, i)?;
                    }
                    Err(e) => failures.push(format!("{e:#}")),
                }
            }
        }
        if !failures.is_empty() {
            bail!("{}", failures.join("\n"));
        }
        Ok(())
    }

    /// Point `runs/<exp>/<stage>` at node `i`'s output, for every experiment that has it.
    fn link(&self, env: &Env, i: usize) -> Result<()> {
        for e in &self.experiments {
            for (stage, j) in &e.stages {
                if *j == i {
                    link_run(env, &e.name, stage, &self.nodes[i].planned.key)?;
                }
            }
        }
        Ok(())
    }

    fn reports(&self, done: &[Option<Outcome>]) -> Vec<ExperimentReport> {
        // A node shared by several experiments "ran" for the first of them only.
        let mut seen = BTreeSet::new();
        let mut out: Vec<ExperimentReport> = self
            .experiments
            .iter()
            .map(|e| ExperimentReport {
                name: e.name.clone(),
                stages: e
                    .stages
                    .iter()
                    .map(|(_, i)| self.stage_report(*i, done, seen.insert(*i)))
                    .collect(),
            })
            .collect();
        let compare = self.nodes.iter().position(|n| n.planned.kind == "compare");
        if let Some(i) = compare {
            out.push(ExperimentReport {
                name: "compare".into(),
                stages: vec![self.stage_report(i, done, true)],
            });
        }
        out
    }

    fn stage_report(&self, i: usize, done: &[Option<Outcome>], first: bool) -> StageReport {
        let node = &self.nodes[i];
        let p = &node.planned;
        let mut r = StageReport {
            name: p.name.clone(),
            status: "stale".into(),
            key: p.key.clone(),
            seconds: 0.0,
            reason: node.reason(),
            role: p.role.clone(),
            started_at: None,
            finished_at: None,
            job: None,
        };
        if let Some(o) = &done[i] {
            r.status = if first || o.status != "ran" {
                o.status.clone()
            } else {
                "cached".into()
            };
            if first {
                r.seconds = o.seconds;
                r.started_at = o.started_at;
                r.finished_at = o.finished_at;
                r.job = o.job.clone();
            }
        }
        r
    }
}
