//! driveline: retinal-vessel segmentation experiments from declarative TOML files.
//!
//! Follow the DAG to find any behaviour: `config` (experiment schema) →
//! `pipeline` (stage graph, keys, cache, runner) → `stages` (split, preprocess,
//! train, evaluate, report) → `model` / `data`. `infer` segments new images with a trained
//! checkpoint (`driveline infer`).

pub mod bench;
pub mod config;
pub mod data;
pub mod infer;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod predict;
pub mod report;
pub mod runs;
pub mod stages;
