//! `debug`: writes the canonical values of its params and the names of its inputs. Useful to
//! see what a stage would receive, and to test the runner with pipelines that do no real work.
//!
//! `DRIVELINE_DEBUG_SLEEP_MS` makes it sleep in the middle of writing (after a partial
//! output file), so that tests can kill or race it.

use std::fs;

use anyhow::{Context, Result};

use super::{Stage, StageCtx};

pub struct Debug;

impl Stage for Debug {
    fn version(&self) -> u32 {
        1
    }
    fn params(&self) -> &'static [&'static str] {
        &[]
    }
    fn role(&self) -> &'static str {
        "debug"
    }

    fn run(&self, ctx: &StageCtx) -> Result<()> {
        let out = ctx.out.join("params.json");
        fs::write(ctx.out.join("partial.txt"), b"started\n")?;
        if let Some(ms) = std::env::var("DRIVELINE_DEBUG_SLEEP_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            ctx.progress.log(&format!("sleeping {ms} ms"));
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        let upstream: Vec<String> = ctx.upstream.keys().cloned().collect();
        let v = serde_json::json!({
            "stage": ctx.stage,
            "upstream": upstream,
            "params": ctx.params,
        });
        fs::write(&out, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("cannot write {}", out.display()))?;
        let count = ctx.out.join("runs.txt");
        fs::write(count, format!("{}\n", std::process::id()))?;
        Ok(())
    }
}
