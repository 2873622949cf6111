//! The training library: the pieces a training loop is made of, independent of the pipeline
//! stage that drives them (`stages::train`), so that the benchmarks (`bench`), the examples and
//! the tests use them without going through a stage.
//!
//! - [`batch`]: seeds ([`mix`]), normalisation statistics ([`image_stats`]) and batches
//!   ([`build_batch`]: crop, augment, normalise), deterministic in (seed, step).
//! - [`ema`]: the moving average of the weights ([`Ema`], `train.ema`).
//! - [`loss`]: the training loss ([`loss_fn`]: CE, optionally class-weighted, + Dice) and the
//!   plain cross-entropy used for validation ([`plain_ce`]).
//! - [`optim`]: Adam, AdamW and SGD with exactly restorable state ([`Optimizer`]).
//! - [`schedule`]: the learning rate at each step ([`lr_at`]).
//! - [`rss`]: the process's peak resident memory ([`reset_peak_rss`], [`peak_rss_mib`]).

pub mod batch;
pub mod ema;
pub mod loss;
pub mod optim;
pub mod rss;
pub mod schedule;

pub use batch::{build_batch, image_stats, mix, Batch};
pub use ema::Ema;
pub use loss::{loss_fn, plain_ce, supervised_loss};
pub use optim::Optimizer;
pub use rss::{peak_rss_mib, reset_peak_rss};
pub use schedule::lr_at;
