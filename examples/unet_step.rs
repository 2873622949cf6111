//! Time the pieces of one U-Net training step (forward, loss, backward, optimizer update) on a
//! batch shaped like the native recipe's (16 × 3 × 96 × 96), to compare with the PyTorch
//! reference's ~0.29 s per step on 2 cores.
//!
//! `cargo run --example unet_step -- [STEPS] [BATCH] [CROP]`

use std::time::Instant;

use candle_core::{Device, Tensor};
use driveline::config::schema::{Arch, Experiment, Loss};
use driveline::model::SegModel;
use driveline::training::{loss_fn, optim};

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let steps = args.first().copied().unwrap_or(5);
    let batch = args.get(1).copied().unwrap_or(16);
    let crop = args.get(2).copied().unwrap_or(96);
    let mut exp = Experiment::template();
    exp.model.arch = Arch::Unet;
    exp.train.loss = Loss::CeDice;
    let dev = Device::Cpu;
    let model = SegModel::new(&exp.model, &dev, 0)?;
    let mut opt =
        optim::Optimizer::new(exp.train.optimizer, model.trainable_vars(), 2e-3, 0.0, 0.9);
    let x = Tensor::randn(0f32, 1.0, (batch, 3, crop, crop), &dev)?;
    let y: Vec<u8> = (0..batch * crop * crop)
        .map(|i| ((i / 7) % 9 == 0) as u8)
        .collect();
    let (mut tf, mut tl, mut tb) = (0.0, 0.0, 0.0);
    for s in 0..steps {
        let t0 = Instant::now();
        let logits = model.forward(&x, true)?;
        let t1 = Instant::now();
        let loss = loss_fn(&exp, &logits, &y)?;
        let _ = loss.to_scalar::<f32>()?;
        let t2 = Instant::now();
        opt.backward_step(&loss)?;
        let t3 = Instant::now();
        let (f, l, b) = (
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            (t3 - t2).as_secs_f64(),
        );
        println!("step {s}: forward {f:.3} s, loss {l:.3} s, backward+update {b:.3} s");
        if s > 0 {
            tf += f;
            tl += l;
            tb += b;
        }
    }
    let n = (steps.max(2) - 1) as f64;
    println!(
        "mean (excl. first): forward {:.3} s, loss {:.3} s, backward+update {:.3} s, total {:.3} s",
        tf / n,
        tl / n,
        tb / n,
        (tf + tl + tb) / n
    );
    Ok(())
}
