//! Whole-model parity with torchvision, driven by `tools/parity.py` (not part of the test suite:
//! it needs PyTorch and runs a full ResNet-50/101 DeepLabV3).
//!
//! `cargo run --example parity -- BACKBONE WEIGHTS INPUT OUT EXPORT [f32|f64]`
//! loads torchvision's `state_dict` (WEIGHTS, safetensors) through `load_pretrained`, runs the
//! eval forward on INPUT's `x`, writes `logits` (upsampled) and `head` (classifier output at
//! stride 8) to OUT, and exports a driveline checkpoint to EXPORT (`-`: no export).
//!
//! The last argument is the precision of the model and the forward (default f32). With f64 the
//! weights and the input are widened exactly (every f32 is an f64), so the result can be
//! compared with torchvision's `model.double()` free of float32 accumulation error.

use std::path::Path;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use driveline::config::schema::{Arch, Backbone, ModelConfig, Normalize};
use driveline::model::checkpoint::{self, Preprocess};
use driveline::model::{Net, Pass, SegModel};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (backbone, weights, input, out, export, dtype) = match args.as_slice() {
        [b, w, i, o, e] => (b, w, i, o, e, DType::F32),
        [b, w, i, o, e, d] => {
            let dtype = match d.as_str() {
                "f32" => DType::F32,
                "f64" => DType::F64,
                other => bail!("unknown precision {other} (f32 or f64)"),
            };
            (b, w, i, o, e, dtype)
        }
        _ => bail!("usage: parity BACKBONE WEIGHTS INPUT OUT EXPORT [f32|f64]"),
    };
    let backbone = match backbone.as_str() {
        "resnet18" => Backbone::Resnet18,
        "resnet34" => Backbone::Resnet34,
        "resnet50" => Backbone::Resnet50,
        "resnet101" => Backbone::Resnet101,
        other => bail!("unknown backbone {other}"),
    };
    let cfg = ModelConfig {
        arch: Arch::Deeplabv3,
        backbone,
        num_classes: 2,
        ..ModelConfig::default()
    };
    let device = Device::Cpu;
    let model = SegModel::with_dtype(&cfg, &device, 0, dtype)?;
    let notes = checkpoint::load_pretrained(&model, Path::new(weights))?;
    if !notes.is_empty() {
        bail!("unexpected notes while loading torchvision weights: {notes:?}");
    }
    let x = candle_core::safetensors::load(input, &device)?
        .remove("x")
        .context("input file has no `x`")?
        .to_dtype(dtype)?;
    let t0 = std::time::Instant::now();
    let logits = model.forward(&x, false)?;
    let secs = t0.elapsed().as_secs_f64();
    let Net::DeepLabV3(net) = model.net() else {
        bail!("not a deeplabv3");
    };
    let head = net
        .classifier
        .forward(&net.backbone.forward(&x, Pass::Eval)?, Pass::Eval)?;
    candle_core::safetensors::save(
        &std::collections::HashMap::from([
            ("logits".to_string(), logits),
            ("head".to_string(), head),
        ]),
        out,
    )?;
    let pre = Preprocess {
        imgsz: x.dim(2)? as u32,
        normalize: Normalize::Imagenet,
        crop: 0,
        zoom: None,
    };
    if export != "-" {
        checkpoint::save(
            &model,
            &pre,
            serde_json::json!({"source": "parity"}),
            None,
            Path::new(export),
        )?;
    }
    println!(
        "{{\"backbone\": \"{}\", \"dtype\": \"{dtype:?}\", \"params\": {}, \"forward_s\": {secs:.2}}}",
        backbone.as_str(),
        model.param_count()
    );
    Ok(())
}
