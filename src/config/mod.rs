//! Experiment files: schema, `extends` merging, `--set` overrides, validation with spans.

pub mod schema;

pub use schema::*;
