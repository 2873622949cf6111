//! Parity of the model's building blocks with PyTorch/torchvision, against fixtures written by
//! `tools/fixtures_model.py` (weights with random BatchNorm statistics, input, eval and train
//! outputs, BatchNorm buffers after the train-mode forward).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use driveline::config::schema::{Arch, ModelConfig, Upsample};
use driveline::model::checkpoint::load_pretrained;
use driveline::model::deeplabv3::{Aspp, DeepLabHead};
use driveline::model::layers::{Builder, ParamStore};
use driveline::model::resnet::{BasicBlock, Bottleneck};
use driveline::model::unet::UNet;
use driveline::model::SegModel;

fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

/// The tensors of a fixture whose keys start with `prefix.`, with that prefix removed.
fn section(file: &str, prefix: &str) -> HashMap<String, Tensor> {
    let all = candle_core::safetensors::load(fixture_path(file), &Device::Cpu).unwrap();
    let p = format!("{prefix}.");
    all.into_iter()
        .filter_map(|(k, v)| k.strip_prefix(&p).map(|s| (s.to_string(), v)))
        .collect()
}

/// max |a - b| / max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape");
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap();
    diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap().max(1e-12)
}

fn assert_close(a: &Tensor, b: &Tensor, what: &str) {
    let e = rel_err(a, b);
    assert!(e < 1e-4, "{what}: relative error {e}");
}

/// Loads the fixture weights, then checks the eval output, the train output and the BatchNorm
/// buffers after the train forward (including `num_batches_tracked` = 1).
fn check(
    store: &ParamStore,
    t: &HashMap<String, Tensor>,
    forward: impl Fn(&Tensor, bool) -> Tensor,
) {
    store.load(t, &|_| false, false).unwrap();
    let x = &t["x"];
    assert_close(&forward(x, false), &t["y_eval"], "eval output");
    assert_close(&forward(x, true), &t["y_train"], "train output");
    let mut checked = 0;
    for (k, v) in store.state_dict().unwrap() {
        let Some(expected) = t.get(&format!("after.{k}")) else {
            continue;
        };
        if v.dtype() == DType::I64 {
            let got = v.to_scalar::<i64>().unwrap();
            assert_eq!(got, expected.to_scalar::<i64>().unwrap(), "{k}");
            assert_eq!(got, 1, "{k}");
        } else {
            assert_close(&v, expected, &k);
        }
        checked += 1;
    }
    assert!(checked > 0, "no BatchNorm buffer checked");
}

#[test]
fn dilated_bottleneck_with_downsample_matches_torchvision() {
    let t = section("model_blocks.safetensors", "a");
    let mut b = Builder::new(&Device::Cpu, 0);
    let block = Bottleneck::new(&mut b, "", 8, 4, 1, 2, true).unwrap();
    check(&b.finish(), &t, |x, train| {
        block.forward(x, train.into()).unwrap()
    });
}

#[test]
fn strided_bottleneck_matches_torchvision() {
    let t = section("model_blocks.safetensors", "b");
    let mut b = Builder::new(&Device::Cpu, 0);
    let block = Bottleneck::new(&mut b, "", 8, 4, 2, 1, true).unwrap();
    check(&b.finish(), &t, |x, train| {
        block.forward(x, train.into()).unwrap()
    });
}

#[test]
fn strided_basic_block_matches_torchvision() {
    let t = section("model_blocks.safetensors", "c");
    let mut b = Builder::new(&Device::Cpu, 0);
    let block = BasicBlock::new(&mut b, "", 8, 4, 2, 1, true).unwrap();
    check(&b.finish(), &t, |x, train| {
        block.forward(x, train.into()).unwrap()
    });
}

#[test]
fn aspp_matches_torchvision() {
    let t = section("model_aspp.safetensors", "aspp");
    let mut b = Builder::new(&Device::Cpu, 0);
    // Dropout 0: the train-mode reference was computed with p = 0 (PyTorch's masks differ).
    let aspp = Aspp::new(&mut b, "", 16, [2, 3, 5], 8, 0.0).unwrap();
    check(&b.finish(), &t, |x, train| {
        aspp.forward(x, train.into()).unwrap()
    });
}

#[test]
fn deeplab_head_matches_torchvision() {
    let t = section("model_aspp.safetensors", "head");
    let mut b = Builder::new(&Device::Cpu, 0);
    let head = DeepLabHead::new(&mut b, "", 16, 2, 8, [2, 3, 5], 0.0).unwrap();
    check(&b.finish(), &t, |x, train| {
        head.forward(x, train.into()).unwrap()
    });
}

#[test]
fn unet_matches_reference_script() {
    let t = section("model_unet.safetensors", "unet");
    let mut b = Builder::new(&Device::Cpu, 0);
    let unet = UNet::new(&mut b, &[4, 8, 16], Upsample::Transpose, 2).unwrap();
    let store = b.finish();
    // Every key of the reference state_dict maps onto ours.
    let ours: std::collections::BTreeSet<String> = store.keys().into_iter().collect();
    let theirs: std::collections::BTreeSet<String> = t
        .keys()
        .filter(|k| !k.starts_with("after.") && !["x", "y_eval", "y_train"].contains(&k.as_str()))
        .cloned()
        .collect();
    assert_eq!(ours, theirs);
    check(&store, &t, |x, train| {
        unet.forward(x, train.into()).unwrap()
    });
}

#[test]
fn load_pretrained_reads_pytorch_pth() {
    let t = section("model_unet.safetensors", "unet");
    let cfg = ModelConfig {
        arch: Arch::Unet,
        widths: vec![4, 8, 16],
        ..ModelConfig::default()
    };
    let model = SegModel::new(&cfg, &Device::Cpu, 1).unwrap();
    let before = model.forward(&t["x"], false).unwrap();
    assert!(
        rel_err(&before, &t["y_eval"]) > 1e-2,
        "fresh model already matches"
    );
    let notes = load_pretrained(&model, &fixture_path("model_unet.pth")).unwrap();
    assert!(notes.is_empty(), "{notes:?}");
    assert_close(
        &model.forward(&t["x"], false).unwrap(),
        &t["y_eval"],
        "after .pth load",
    );
}
