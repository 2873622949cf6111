//! Experiment files: schema, `extends` merging, `--set` overrides, validation with spans.

pub mod load;
pub mod resources;
pub mod schema;

pub use load::{load, load_str, ConfigError, Loaded, Origin};
pub use schema::*;
