//! driveline: retinal-vessel segmentation experiments from declarative TOML files.
//!
//! Follow the DAG to find any behaviour: `config` (experiment schema) →
//! `pipeline` (stage graph, keys, cache, runner, executors) → `stages` (split, preprocess,
//! train, evaluate, report) → `training` (loss, optimiser, batches, LR schedule, peak RSS) →
//! `model` / `data`. A module imports only the modules after it, `config`, and the shared
//! helpers `progress`, `metrics`, `predict` and `report` (which import nothing above
//! `model`/`data`): `stages` never imports `pipeline`, `training` never imports `stages`.
//!
//! `infer` (`driveline infer`: segment new images with a trained checkpoint) and `bench`
//! (`driveline bench`) and `runs` (`driveline runs` / `diff`) sit beside `pipeline`: they use `training`, `model` and `data`, and of
//! the stages only their data types and drawing helpers, never `stages::train`.

pub mod bench;
pub mod config;
pub mod data;
pub mod infer;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod predict;
pub mod progress;
pub mod report;
pub mod runs;
pub mod stages;
pub mod training;
