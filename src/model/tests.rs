//! Unit tests of the model module: shapes, torchvision key names, seeding, dilation layout,
//! checkpoints and pretrained loading. Kept cheap: resnet18 or tiny U-Nets, small inputs.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};

use super::checkpoint::{self, Preprocess};
use super::layers::{dropblock_mask, DropBlock, Dropout};
use super::ops::max_abs_diff;
use super::resnet::{Block, ResNet};
use super::{Net, Pass, SegModel};
use crate::config::schema::{Arch, Attention, Backbone, ModelConfig, Normalize, Upsample};

fn deeplab(backbone: Backbone) -> ModelConfig {
    ModelConfig {
        arch: Arch::Deeplabv3,
        backbone,
        ..ModelConfig::default()
    }
}

fn unet(widths: &[usize], upsample: Upsample) -> ModelConfig {
    ModelConfig {
        arch: Arch::Unet,
        widths: widths.to_vec(),
        upsample,
        ..ModelConfig::default()
    }
}

fn input(n: usize, h: usize, w: usize) -> Tensor {
    Tensor::randn(0f32, 1f32, (n, 3, h, w), &Device::Cpu).unwrap()
}

fn preprocess() -> Preprocess {
    Preprocess {
        imgsz: 64,
        normalize: Normalize::Imagenet,
        crop: 0,
        zoom: None,
    }
}

#[test]
fn deeplabv3_resnet18_logits_have_input_size() {
    let m = SegModel::new(&deeplab(Backbone::Resnet18), &Device::Cpu, 0).unwrap();
    assert_eq!(m.stride(), 8);
    for (h, w) in [(64, 64), (72, 96)] {
        let y = m.forward(&input(1, h, w), false).unwrap();
        assert_eq!(y.dims(), &[1, 2, h, w]);
    }
    // Training mode with a batch of 2 runs and counts a batch in every BatchNorm.
    let y = m.forward(&input(2, 64, 64), true).unwrap();
    assert_eq!(y.dims(), &[2, 2, 64, 64]);
    let counters: Vec<i64> = m
        .state_dict()
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k.ends_with("num_batches_tracked"))
        .map(|(_, t)| t.to_scalar::<i64>().unwrap())
        .collect();
    assert!(!counters.is_empty());
    assert!(counters.iter().all(|&c| c == 1), "{counters:?}");
}

#[test]
fn deeplabv3_resnet50_keys_and_shapes_match_torchvision() {
    let expected = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/deeplabv3_resnet50_keys.txt"),
    )
    .unwrap();
    let m = SegModel::new(&deeplab(Backbone::Resnet50), &Device::Cpu, 0).unwrap();
    let ours: Vec<String> = m
        .state_dict()
        .unwrap()
        .iter()
        .map(|(k, t)| {
            let dims: Vec<String> = t.dims().iter().map(|d| d.to_string()).collect();
            format!("{k} [{}]", dims.join(","))
        })
        .collect();
    let theirs: Vec<&str> = expected.lines().collect();
    assert_eq!(ours.len(), theirs.len());
    for (a, b) in ours.iter().zip(&theirs) {
        assert_eq!(a, b);
    }
    // BN running stats and counters are buffers, not trainable parameters.
    let trainable = m.trainable_vars();
    assert!(trainable.iter().all(|(k, _)| !k.contains("running_")));
    assert_eq!(m.param_count(), 39_633_986); // torchvision: sum(p.numel() for p in parameters())
}

#[test]
fn dilation_follows_torchvision_previous_dilation_rule() {
    let mut b = super::layers::Builder::new(&Device::Cpu, 0);
    let r = ResNet::new(&mut b, "backbone", Backbone::Resnet50, [false, true, true]).unwrap();
    assert_eq!(r.output_stride, 8);
    assert_eq!(r.out_channels, 2048);
    // (stride, dilation) of each block's 3×3 convolution, per layer.
    let conv2 = |l: usize, i: usize| match &r.layers[l][i] {
        Block::Bottleneck(b) => (b.conv2.stride, b.conv2.dilation, b.conv2.padding),
        Block::Basic(_) => unreachable!(),
    };
    assert_eq!(conv2(1, 0), (2, 1, 1));
    assert_eq!(conv2(2, 0), (1, 1, 1)); // previous_dilation
    assert_eq!(conv2(2, 1), (1, 2, 2));
    assert_eq!(conv2(3, 0), (1, 2, 2)); // previous_dilation
    assert_eq!(conv2(3, 2), (1, 4, 4));
    let ds_stride = |l: usize| match &r.layers[l][0] {
        Block::Bottleneck(b) => b.downsample.as_ref().map(|d| d.conv.stride),
        Block::Basic(_) => unreachable!(),
    };
    assert_eq!(ds_stride(1), Some(2));
    assert_eq!(ds_stride(2), Some(1));
    assert_eq!(ds_stride(3), Some(1));
}

#[test]
fn unet_odd_image_padded_to_stride_and_cropped_back() {
    let m = SegModel::new(&unet(&[4, 8, 8, 8], Upsample::Transpose), &Device::Cpu, 0).unwrap();
    assert_eq!(m.stride(), 8);
    let (h, w) = (584, 565);
    let x = input(1, h, w);
    let s = m.stride();
    let (ph, pw) = (h.div_ceil(s) * s - h, w.div_ceil(s) * s - w);
    let padded = x
        .pad_with_zeros(2, 0, ph)
        .unwrap()
        .pad_with_zeros(3, 0, pw)
        .unwrap();
    assert_eq!(padded.dims(), &[1, 3, 584, 568]);
    let y = m.forward(&padded, false).unwrap();
    let y = y.i((.., .., ..h, ..w)).unwrap();
    assert_eq!(y.dims(), &[1, 2, 584, 565]);
    // An input that is not a multiple of the stride is refused with a clear message.
    let err = m.forward(&x, false).unwrap_err().to_string();
    assert!(err.contains("not a multiple of its stride 8"), "{err}");
}

#[test]
fn unet_bilinear_decoder_uses_1x1_convs() {
    let m = SegModel::new(&unet(&[4, 8, 16], Upsample::Bilinear), &Device::Cpu, 0).unwrap();
    let sd: HashMap<String, Tensor> = m.state_dict().unwrap().into_iter().collect();
    assert_eq!(sd["ups.0.weight"].dims(), &[8, 16, 1, 1]);
    assert_eq!(sd["ups.1.weight"].dims(), &[4, 8, 1, 1]);
    assert_eq!(sd["head.weight"].dims(), &[2, 4, 1, 1]);
    let y = m.forward(&input(2, 16, 24), true).unwrap();
    assert_eq!(y.dims(), &[2, 2, 16, 24]);
}

#[test]
fn seg_model_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<SegModel>();
}

#[test]
fn same_seed_gives_same_initial_weights() {
    let cfg = deeplab(Backbone::Resnet18);
    let a = SegModel::new(&cfg, &Device::Cpu, 7).unwrap();
    let b = SegModel::new(&cfg, &Device::Cpu, 7).unwrap();
    let c = SegModel::new(&cfg, &Device::Cpu, 8).unwrap();
    let (sa, sb, sc) = (
        a.state_dict().unwrap(),
        b.state_dict().unwrap(),
        c.state_dict().unwrap(),
    );
    let mut differs = 0;
    for ((ka, ta), ((_, tb), (_, tc))) in sa.iter().zip(sb.iter().zip(&sc)) {
        if ta.dtype() != DType::F32 {
            continue;
        }
        assert_eq!(max_abs_diff(ta, tb), 0.0, "{ka}");
        if max_abs_diff(ta, tc) > 0.0 {
            differs += 1;
        }
    }
    assert!(differs > 20, "another seed changed only {differs} tensors");
}

#[test]
fn init_statistics_follow_torchvision() {
    let m = SegModel::new(&deeplab(Backbone::Resnet18), &Device::Cpu, 3).unwrap();
    let sd: HashMap<String, Tensor> = m.state_dict().unwrap().into_iter().collect();
    let std = |t: &Tensor| {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        (v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32).sqrt()
    };
    // kaiming_normal fan_out: std = sqrt(2 / (256·3·3)).
    let s = std(&sd["backbone.layer3.0.conv1.weight"]);
    let want = (2.0f32 / (256.0 * 9.0)).sqrt();
    assert!((s / want - 1.0).abs() < 0.02, "{s} vs {want}");
    // PyTorch default: U(±1/sqrt(fan_in)), std = bound/√3, fan_in = 512.
    let w = &sd["classifier.0.convs.0.0.weight"];
    let bound = 1.0 / 512f32.sqrt();
    let max = w
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(max <= bound && max > 0.95 * bound, "{max} vs {bound}");
    assert!((std(w) / (bound / 3f32.sqrt()) - 1.0).abs() < 0.02);
    let ones: Vec<f32> = sd["backbone.bn1.weight"].to_vec1().unwrap();
    assert!(ones.iter().all(|&x| x == 1.0));
}

#[test]
fn dropout_is_identity_in_eval_and_seeded_in_training() {
    let x = Tensor::ones((4, 8, 16, 16), DType::F32, &Device::Cpu).unwrap();
    let d = Dropout::new(0.5, 11);
    assert_eq!(max_abs_diff(&d.forward(&x, false).unwrap(), &x), 0.0);
    let y: Vec<f32> = d
        .forward(&x, true)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(y.iter().all(|&v| v == 0.0 || v == 2.0));
    let kept = y.iter().filter(|&&v| v == 2.0).count() as f32 / y.len() as f32;
    assert!((kept - 0.5).abs() < 0.05, "kept {kept}");
    let again: Vec<f32> = Dropout::new(0.5, 11)
        .forward(&x, true)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(y, again);
}

/// DropBlock's masks: zeros come in whole b×b squares inside the plane, about `drop` of the
/// activations are zeroed, the survivors carry (elements / kept) so that the sum is kept
/// exactly, and the masks depend on the seed and the plane, not on the number of threads.
#[test]
fn dropblock_masks_drop_whole_blocks_at_the_asked_rate() {
    let (planes, h, w, b) = (48, 40, 36, 5);
    let m = dropblock_mask(planes, h, w, 0.1, b, 3);
    let zero = |p: usize, r: usize, c: usize| m[(p * h + r) * w + c] == 0.0;
    for p in 0..planes {
        for r in 0..h {
            for c in 0..w {
                if !zero(p, r, c) {
                    continue;
                }
                // Some b×b square inside the plane that holds (r, c) is all zeros.
                let covered = (r.saturating_sub(b - 1)..=r.min(h - b)).any(|r0| {
                    (c.saturating_sub(b - 1)..=c.min(w - b))
                        .any(|c0| (r0..r0 + b).all(|i| (c0..c0 + b).all(|j| zero(p, i, j))))
                });
                assert!(
                    covered,
                    "plane {p}: ({r}, {c}) is zero outside any whole block"
                );
            }
        }
    }
    let kept = m.iter().filter(|&&v| v != 0.0).count();
    let dropped = 1.0 - kept as f64 / m.len() as f64;
    // Overlapping blocks drop a little less than γ·b² per corner: 1 − e^(−0.1) ≈ 0.095.
    assert!((0.08..0.105).contains(&dropped), "dropped {dropped}");
    let scale = m.len() as f32 / kept as f32;
    assert!(m.iter().all(|&v| v == 0.0 || v == scale));
    let sum: f64 = m.iter().map(|&v| f64::from(v)).sum();
    assert!(
        (sum / m.len() as f64 - 1.0).abs() < 1e-5,
        "mean {}",
        sum / m.len() as f64
    );
    // Planes differ from each other, seeds from each other; threads change nothing.
    assert_ne!(m[..h * w], m[h * w..2 * h * w]);
    assert_ne!(m, dropblock_mask(planes, h, w, 0.1, b, 4));
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    assert_eq!(m, one.install(|| dropblock_mask(planes, h, w, 0.1, b, 3)));
    // A block larger than the map shrinks to it; drop 0 keeps everything.
    let small = dropblock_mask(64, 3, 3, 0.5, 7, 1);
    assert!(small
        .chunks(9)
        .all(|p| p.iter().all(|&v| v == 0.0) || p.iter().all(|&v| v != 0.0)));
    assert!(small.contains(&0.0));
    assert!(dropblock_mask(2, 8, 8, 0.0, 3, 1).iter().all(|&v| v == 1.0));
}

#[test]
fn dropblock_is_identity_outside_training_and_follows_its_seed() {
    let x = Tensor::rand(0f32, 1f32, (2, 3, 16, 16), &Device::Cpu).unwrap();
    let d = DropBlock::new(0.2, 3, 5);
    d.reseed(9);
    for pass in [Pass::Eval, Pass::Infer] {
        assert_eq!(max_abs_diff(&d.forward(&x, pass).unwrap(), &x), 0.0);
    }
    let y = d.forward(&x, Pass::Train).unwrap();
    let seed = 9 ^ 5u64.rotate_left(40);
    let mask = Tensor::from_vec(
        dropblock_mask(6, 16, 16, 0.2, 3, seed),
        (2, 3, 16, 16),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(max_abs_diff(&y, &(&x * &mask).unwrap()), 0.0);
    assert_eq!(max_abs_diff(&y, &d.forward(&x, Pass::Train).unwrap()), 0.0);
    d.reseed(10);
    assert!(max_abs_diff(&y, &d.forward(&x, Pass::Train).unwrap()) > 0.0);
    // Another layer (id) in the same step draws other masks.
    let other = DropBlock::new(0.2, 3, 6);
    other.reseed(9);
    assert!(max_abs_diff(&y, &other.forward(&x, Pass::Train).unwrap()) > 0.0);
}

/// The spatial attention against the formula written out: channel mean and max, the 7×7
/// convolution (zero padding 3) by loops, the sigmoid, the product.
#[test]
fn spatial_attention_matches_its_formula() {
    let cfg = ModelConfig {
        attention: Some(Attention::Spatial),
        ..unet(&[4, 8], Upsample::Transpose)
    };
    let m = SegModel::new(&cfg, &Device::Cpu, 3).unwrap();
    let Net::UNet(u) = m.net() else {
        panic!("not a U-Net")
    };
    let a = u.attention.as_ref().expect("attention built");
    let sd: HashMap<String, Tensor> = m.state_dict().unwrap().into_iter().collect();
    assert_eq!(sd["attention.weight"].dims(), &[1, 2, 7, 7]);
    let (c, h, w) = (5, 6, 9);
    let x = Tensor::randn(0f32, 1f32, (1, c, h, w), &Device::Cpu).unwrap();
    let got: Vec<f32> = a
        .forward(&x, Pass::Eval)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let k: Vec<f32> = sd["attention.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let at = |ch: usize, r: usize, col: usize| xs[(ch * h + r) * w + col];
    let pooled = |which: usize, r: usize, col: usize| -> f32 {
        let v = (0..c).map(|ch| at(ch, r, col));
        if which == 0 {
            v.sum::<f32>() / c as f32
        } else {
            v.fold(f32::MIN, f32::max)
        }
    };
    for r in 0..h {
        for col in 0..w {
            let mut s = 0f32;
            for which in 0..2 {
                for i in 0..7 {
                    for j in 0..7 {
                        let (rr, cc) = (r as isize + i as isize - 3, col as isize + j as isize - 3);
                        if rr >= 0 && cc >= 0 && (rr as usize) < h && (cc as usize) < w {
                            s +=
                                k[which * 49 + i * 7 + j] * pooled(which, rr as usize, cc as usize);
                        }
                    }
                }
            }
            let gate = 1.0 / (1.0 + (-s).exp());
            for ch in 0..c {
                let want = at(ch, r, col) * gate;
                let g = got[(ch * h + r) * w + col];
                assert!((g - want).abs() < 1e-5, "({ch}, {r}, {col}): {g} vs {want}");
            }
        }
    }
    // The model without the option has neither the key nor the module.
    let plain = SegModel::new(&unet(&[4, 8], Upsample::Transpose), &Device::Cpu, 3).unwrap();
    assert!(plain
        .state_dict()
        .unwrap()
        .iter()
        .all(|(k, _)| !k.starts_with("attention")));
}

#[test]
fn checkpoint_round_trip_gives_identical_logits() {
    let dir = tempfile::tempdir().unwrap();
    for cfg in [
        unet(&[4, 8, 16], Upsample::Transpose),
        deeplab(Backbone::Resnet18),
    ] {
        let m = SegModel::new(&cfg, &Device::Cpu, 5).unwrap();
        // A training forward moves the running stats and counters away from their defaults.
        m.forward(&input(2, 32, 32), true).unwrap();
        let path = dir.path().join("model.safetensors");
        let extra = serde_json::json!({"epoch": 3});
        let chosen = checkpoint::ChosenThreshold {
            value: 0.42,
            f1: 0.8,
            how: "test".into(),
        };
        checkpoint::save(&m, &preprocess(), extra.clone(), Some(&chosen), &path).unwrap();
        let meta = checkpoint::read_meta(&path).unwrap();
        assert_eq!(meta.model, cfg);
        assert_eq!(meta.preprocess, preprocess());
        assert_eq!(meta.extra, extra);
        assert_eq!(meta.threshold, Some(chosen));
        let (loaded, meta2) = checkpoint::load(&path, &Device::Cpu).unwrap();
        assert_eq!(meta2, meta);
        let x = input(1, 32, 40);
        let a = m.forward(&x, false).unwrap();
        let b = loaded.forward(&x, false).unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0);
        let sd: HashMap<String, Tensor> = loaded.state_dict().unwrap().into_iter().collect();
        let nbt = sd
            .iter()
            .find(|(k, _)| k.ends_with("num_batches_tracked"))
            .unwrap()
            .1;
        assert_eq!(nbt.to_scalar::<i64>().unwrap(), 1);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}

#[test]
fn foreign_files_are_not_driveline_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"this is not a safetensors file at all").unwrap();
    let plain = dir.path().join("plain.safetensors");
    let t = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&HashMap::from([("w".to_string(), t)]), &plain).unwrap();
    for p in [&junk, &plain] {
        let err = checkpoint::load(p, &Device::Cpu).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("not a driveline checkpoint: {}", p.display())),
            "{err}"
        );
    }
}

/// Writes `tensors` as a plain safetensors file (what torchvision weights converted look like).
fn write_plain(path: &Path, tensors: HashMap<String, Tensor>) {
    candle_core::safetensors::save(&tensors, path).unwrap();
}

#[test]
fn load_pretrained_accepts_torchvision_layouts() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = deeplab(Backbone::Resnet18);
    let source = SegModel::new(&cfg, &Device::Cpu, 1).unwrap();
    let sd: HashMap<String, Tensor> = source.state_dict().unwrap().into_iter().collect();
    let key = "backbone.layer4.1.conv2.weight";

    // Full DeepLabV3 with an aux classifier and 21 classes (COCO): classifier.4 stays fresh.
    let mut coco = sd.clone();
    coco.insert(
        "aux_classifier.0.weight".into(),
        Tensor::zeros((4, 4, 1, 1), DType::F32, &Device::Cpu).unwrap(),
    );
    coco.insert(
        "classifier.4.weight".into(),
        Tensor::zeros((21, 256, 1, 1), DType::F32, &Device::Cpu).unwrap(),
    );
    coco.insert(
        "classifier.4.bias".into(),
        Tensor::zeros(21, DType::F32, &Device::Cpu).unwrap(),
    );
    let path = dir.path().join("coco.safetensors");
    write_plain(&path, coco);
    let target = SegModel::new(&cfg, &Device::Cpu, 2).unwrap();
    let fresh_head = target.state_dict().unwrap();
    let notes = checkpoint::load_pretrained(&target, &path).unwrap();
    assert_eq!(notes.len(), 2, "{notes:?}");
    let got: HashMap<String, Tensor> = target.state_dict().unwrap().into_iter().collect();
    assert_eq!(max_abs_diff(&got[key], &sd[key]), 0.0);
    let head = &fresh_head
        .iter()
        .find(|(k, _)| k == "classifier.4.weight")
        .unwrap()
        .1;
    assert_eq!(max_abs_diff(&got["classifier.4.weight"], head), 0.0);
    assert_eq!(
        max_abs_diff(&got["classifier.1.weight"], &sd["classifier.1.weight"]),
        0.0
    );

    // ImageNet ResNet: no `backbone.` prefix, an `fc` head, no num_batches_tracked.
    let imagenet: HashMap<String, Tensor> = sd
        .iter()
        .filter(|(k, _)| !k.ends_with("num_batches_tracked"))
        .filter_map(|(k, t)| {
            k.strip_prefix("backbone.")
                .map(|s| (s.to_string(), t.clone()))
        })
        .chain([(
            "fc.weight".to_string(),
            Tensor::zeros((1000, 512), DType::F32, &Device::Cpu).unwrap(),
        )])
        .collect();
    let path = dir.path().join("imagenet.safetensors");
    write_plain(&path, imagenet.clone());
    let target = SegModel::new(&cfg, &Device::Cpu, 3).unwrap();
    let notes = checkpoint::load_pretrained(&target, &path).unwrap();
    assert!(notes.iter().any(|n| n.contains("ImageNet")), "{notes:?}");
    let got: HashMap<String, Tensor> = target.state_dict().unwrap().into_iter().collect();
    assert_eq!(max_abs_diff(&got[key], &sd[key]), 0.0);

    // A missing key is named, and the model is left untouched.
    let mut broken = imagenet;
    broken.remove("layer2.0.bn1.running_var");
    let path = dir.path().join("broken.safetensors");
    write_plain(&path, broken);
    let target = SegModel::new(&cfg, &Device::Cpu, 4).unwrap();
    let before: HashMap<String, Tensor> = target.state_dict().unwrap().into_iter().collect();
    let err = checkpoint::load_pretrained(&target, &path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("backbone.layer2.0.bn1.running_var"), "{err}");
    let after: HashMap<String, Tensor> = target.state_dict().unwrap().into_iter().collect();
    assert_eq!(max_abs_diff(&after[key], &before[key]), 0.0);
}

#[test]
fn deeplab_small_backbones_output_512_channels() {
    let m = SegModel::new(&deeplab(Backbone::Resnet34), &Device::Cpu, 0).unwrap();
    let Net::DeepLabV3(d) = m.net() else {
        panic!("not a deeplab")
    };
    assert_eq!(d.backbone.out_channels, 512);
    assert_eq!(
        d.backbone.layers.iter().map(Vec::len).collect::<Vec<_>>(),
        [3, 4, 6, 3]
    );
}

#[test]
fn unet_default_widths_have_reference_parameter_count() {
    let m = SegModel::new(
        &unet(&[16, 32, 64, 128], Upsample::Transpose),
        &Device::Cpu,
        0,
    )
    .unwrap();
    assert_eq!(m.param_count(), 482_754); // unet_ref.py: sum(p.numel() for p in UNet().parameters())
}

/// Checks that `loss` has a finite, not all-zero gradient of the right shape for every
/// trainable variable of `m`.
fn assert_gradients(m: &SegModel, loss: &Tensor) {
    let grads = loss.backward().unwrap();
    let mut checked = 0;
    for (k, v) in m.trainable_vars() {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {k}"));
        assert_eq!(g.dims(), v.dims(), "{k}");
        let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(g.iter().all(|x| x.is_finite()), "{k}: non-finite gradient");
        assert!(g.iter().any(|&x| x != 0.0), "{k}: gradient is all zero");
        checked += 1;
    }
    assert!(checked > 10);
}

#[test]
fn every_trainable_parameter_gets_a_gradient() {
    for up in [Upsample::Transpose, Upsample::Bilinear] {
        let m = SegModel::new(&unet(&[4, 8, 16], up), &Device::Cpu, 0).unwrap();
        let y = m.forward(&input(2, 32, 32), true).unwrap();
        assert_gradients(&m, &y.sqr().unwrap().mean_all().unwrap());
    }
    // The whole DeepLabV3, stem included: its 3×3/2 max pooling has a backward of its own
    // (model::ops::pool).
    let m = SegModel::new(&deeplab(Backbone::Resnet18), &Device::Cpu, 0).unwrap();
    let names: Vec<String> = m.trainable_vars().into_iter().map(|(k, _)| k).collect();
    for stem in ["backbone.conv1.weight", "backbone.bn1.weight"] {
        assert!(names.iter().any(|k| k == stem), "{stem} not in {names:?}");
    }
    let y = m.forward(&input(2, 64, 64), true).unwrap();
    assert_gradients(&m, &y.sqr().unwrap().mean_all().unwrap());
}

/// Deep supervision: an auxiliary head on every decoder level but the last, each output at the
/// input's size, weighted 1, d, d², …; the main output is the plain forward's; every parameter,
/// the auxiliary heads' included, gets a gradient from the supervised outputs.
#[test]
fn deep_supervision_outputs_and_gradients() {
    let cfg = ModelConfig {
        deep_supervision: Some(0.5),
        ..unet(&[4, 8, 16, 32], Upsample::Transpose)
    };
    let m = SegModel::new(&cfg, &Device::Cpu, 2).unwrap();
    let sd: HashMap<String, Tensor> = m.state_dict().unwrap().into_iter().collect();
    assert_eq!(sd["aux.0.weight"].dims(), &[2, 16, 1, 1]);
    assert_eq!(sd["aux.1.weight"].dims(), &[2, 8, 1, 1]);
    assert!(!sd.contains_key("aux.2.weight"));
    let x = input(2, 32, 32);
    let outs = m.forward_supervised(&x).unwrap();
    let weights: Vec<f64> = outs.iter().map(|(_, w)| *w).collect();
    assert_eq!(weights, [1.0, 0.5, 0.25]);
    for (o, _) in &outs {
        assert_eq!(o.dims(), &[2, 2, 32, 32]);
    }
    let plain = m.forward(&x, true).unwrap();
    assert_eq!(max_abs_diff(&outs[0].0, &plain), 0.0);
    assert!(max_abs_diff(&outs[1].0, &plain) > 0.0);
    let loss = outs
        .iter()
        .map(|(o, _)| o.sqr().unwrap().mean_all().unwrap())
        .reduce(|a, b| (a + b).unwrap())
        .unwrap();
    assert_gradients(&m, &loss);
    // Inference ignores the heads: the same logits as without them, given the same weights.
    let base = SegModel::new(&unet(&[4, 8, 16, 32], Upsample::Transpose), &Device::Cpu, 2).unwrap();
    let mut own = sd.clone();
    own.retain(|k, _| !k.starts_with("aux."));
    base.load_state_dict(&own).unwrap();
    assert_eq!(
        max_abs_diff(&base.infer(&x).unwrap(), &m.infer(&x).unwrap()),
        0.0
    );
}

#[test]
fn load_pretrained_explains_legacy_pth_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("legacy.pth");
    // What torch.save(..., _use_new_zipfile_serialization=False) writes first.
    std::fs::write(&path, b"\x80\x02\x8a\x0alegacy pickle").unwrap();
    let m = SegModel::new(&unet(&[4, 8], Upsample::Transpose), &Device::Cpu, 0).unwrap();
    let err = checkpoint::load_pretrained(&m, &path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("legacy"), "{err}");
}

/// The bits of an f32 tensor, for exact comparisons.
fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

fn state_bits(m: &SegModel) -> Vec<(String, Vec<u8>)> {
    m.state_dict()
        .unwrap()
        .into_iter()
        .map(|(k, t)| {
            let v = match t.dtype() {
                DType::I64 => t.to_scalar::<i64>().unwrap().to_le_bytes().to_vec(),
                _ => bits(&t).iter().flat_map(|b| b.to_le_bytes()).collect(),
            };
            (k, v)
        })
        .collect()
}

/// `infer` (detached parameters, in-place BatchNorm/ReLU/residual) keeps no autograd graph,
/// gives bitwise the logits of the graph-recording eval forward, and changes no parameter or
/// buffer, for DeepLabV3 (basic blocks, ASPP) and both U-Net decoders.
#[test]
fn inference_keeps_no_graph_and_matches_the_eval_forward_bitwise() {
    let models = [
        SegModel::new(&deeplab(Backbone::Resnet18), &Device::Cpu, 0).unwrap(),
        SegModel::new(&unet(&[4, 8, 16], Upsample::Transpose), &Device::Cpu, 1).unwrap(),
        SegModel::new(&unet(&[4, 8], Upsample::Bilinear), &Device::Cpu, 2).unwrap(),
    ];
    for m in models {
        // Move the running statistics off their initial values.
        m.forward(&input(2, 32, 32), true).unwrap();
        let x = input(1, 40, 48);
        let x_bits = bits(&x);
        let state = state_bits(&m);
        let eval = m.forward(&x, false).unwrap();
        assert!(eval.track_op(), "the eval forward records the graph");
        let inferred = m.infer(&x).unwrap();
        assert!(!inferred.track_op(), "inference must keep no graph");
        assert_eq!(bits(&inferred), bits(&eval), "inference differs from eval");
        assert_eq!(bits(&x), x_bits, "the input was modified");
        assert!(state == state_bits(&m), "inference changed the state_dict");
    }
}

/// Bottlenecks (ResNet-50/101) with and without a downsample: inference matches the eval
/// forward bitwise, keeps no graph, and the in-place residual addition leaves the block's
/// input (its identity branch) untouched.
#[test]
fn bottleneck_inference_matches_eval_and_leaves_the_identity_alone() {
    use super::layers::Builder;
    use super::resnet::Bottleneck;
    let mut b = Builder::new(&Device::Cpu, 5);
    let first = Bottleneck::new(&mut b, "0", 8, 4, 1, 2, true).unwrap();
    let second = Bottleneck::new(&mut b, "1", 16, 4, 1, 2, false).unwrap();
    let x = Tensor::randn(0f32, 1f32, (2, 8, 9, 11), &Device::Cpu).unwrap();
    let h = first.forward(&x, Pass::Train).unwrap();
    second.forward(&h, Pass::Train).unwrap();
    let run = |pass| {
        let h = first.forward(&x, pass).unwrap();
        let h_bits = bits(&h);
        let y = second.forward(&h, pass).unwrap();
        assert_eq!(
            bits(&h),
            h_bits,
            "{pass:?}: the identity branch was modified"
        );
        y
    };
    let (eval, inferred) = (run(Pass::Eval), run(Pass::Infer));
    assert!(eval.track_op() && !inferred.track_op());
    assert_eq!(bits(&inferred), bits(&eval));
}
