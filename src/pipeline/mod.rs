//! The runner: DAG from `pipelines/*.toml`, stage keys, the content-addressed cache.

pub mod cache;
pub mod dag;
pub mod executor;
pub mod gc;
pub mod progress;
pub mod runner;
pub mod schedule;

pub use cache::Cache;
pub use dag::Pipeline;
pub use runner::{Env, RunOptions};
