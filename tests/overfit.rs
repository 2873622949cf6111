//! The small DeepLabV3 (ResNet-18 backbone) must be able to fit two synthetic images almost
//! perfectly: a whole-model check that forward, every backward, the loss and the optimizer
//! work together (a sign error or a missing gradient anywhere makes this fail).

use candle_core::{Device, Tensor};
use driveline::config::{Experiment, Layout, Loss, Normalize};
use driveline::data::{self, ChannelStats};
use driveline::metrics::Confusion;
use driveline::model::SegModel;
use driveline::predict::argmax_u8;
use driveline::stages::train::{loss_fn, optim::Optimizer};

#[test]
fn small_deeplabv3_overfits_two_synthetic_images() {
    let mut exp = Experiment::template();
    exp.name = "overfit".into();
    exp.data.layout = Layout::Synthetic;
    exp.data.synthetic.width = 64;
    exp.data.synthetic.height = 64;
    exp.data.synthetic.vessel_width = 6.0;
    exp.model.backbone = driveline::config::Backbone::Resnet18;
    exp.train.loss = Loss::CeDice;
    let steps: usize = std::env::var("OVERFIT_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let samples: Vec<_> = (0..2).map(|i| data::synthetic(&exp.data.synthetic, i)).collect();
    let mut x = Vec::new();
    let mut y = Vec::new();
    for s in &samples {
        x.extend(data::to_chw_f32_with(&s.image, &ChannelStats::for_image(Normalize::Imagenet, &s.image)));
        y.extend_from_slice(s.label.as_ref().unwrap().as_raw());
    }
    let dev = Device::Cpu;
    let x = Tensor::from_vec(x, (2, 3, 64, 64), &dev).unwrap();
    let model = SegModel::new(&exp.model, &dev, 1).unwrap();
    let mut opt = Optimizer::new(exp.train.optimizer, model.trainable_vars(), 1e-3, 0.0, 0.9);
    let t0 = std::time::Instant::now();
    for step in 0..steps {
        let logits = model.forward(&x, true).unwrap();
        let loss = loss_fn(&exp, &logits, &y).unwrap();
        if step % 10 == 0 {
            eprintln!("step {step}: loss {:.4}", loss.to_scalar::<f32>().unwrap());
        }
        opt.backward_step(&loss).unwrap();
    }
    eprintln!("{steps} steps in {:?}", t0.elapsed());
    let logits = model.forward(&x, false).unwrap();
    let pred = argmax_u8(&logits).unwrap();
    let c = Confusion::from_pixels(&pred, &y, None);
    eprintln!("vessel IoU {:.4}, Dice {:.4}", c.iou_vessel(), c.dice());
    assert!(c.iou_vessel() > 0.9, "vessel IoU {:.4} after {steps} steps", c.iou_vessel());
}
