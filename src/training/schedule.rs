//! The learning-rate schedule: `train.scheduler` evaluated at one optimiser step.

use crate::config::{Experiment, Scheduler};

/// The learning rate at `step` of `total` (schedulers of `torch.optim.lr_scheduler`, stepped
/// per iteration except `step`, which decays per period).
pub fn lr_at(exp: &Experiment, step: usize, total: usize, period: usize) -> f64 {
    let t = &exp.train;
    let frac = if total == 0 {
        0.0
    } else {
        step as f64 / total as f64
    };
    let floor = t.lr * t.lr_min_factor;
    match t.scheduler {
        Scheduler::None => t.lr,
        Scheduler::Step => t.lr * t.gamma.powi((period / t.step_size) as i32),
        Scheduler::Cosine => {
            floor + (t.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * frac).cos())
        }
        Scheduler::Poly => floor + (t.lr - floor) * (1.0 - frac).max(0.0).powf(0.9),
        Scheduler::Linear => floor + (t.lr - floor) * (1.0 - frac).max(0.0),
    }
}
