//! Experiment files: schema, `extends` merging, `--set` overrides, sweeps, validation with
//! spans.

pub mod load;
pub mod params;
pub mod resources;
pub mod schema;
pub mod sweep;

pub use load::{load, load_str, ConfigError, Loaded, Origin};
pub use schema::*;
pub use sweep::{load_points, load_str_points, Point, SweepMode, SweepOptions};
