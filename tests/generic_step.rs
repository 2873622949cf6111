//! Whole training steps of DeepLabV3-ResNet50 on the CPU: through the device-generic path (what
//! CUDA runs: no Candle max-pool backward bail, and the same loss and gradients as the custom
//! ops), and with activation recomputation per ResNet stage (the same gradients within 1e-5,
//! the same BatchNorm statistics and counters, a lower peak RSS).

mod common;

use common::max_abs;
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use driveline::config::schema::{Arch, Backbone, ModelConfig};
use driveline::config::Experiment;
use driveline::model::{ops, SegModel};
use driveline::training::loss::loss_fn;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The loss, every trainable parameter's gradient and the state_dict after one training step's
/// forward and backward (no optimizer update), on the chosen path.
struct Step {
    loss: f64,
    grads: HashMap<String, Tensor>,
    state: HashMap<String, Tensor>,
}

fn r50() -> ModelConfig {
    ModelConfig {
        arch: Arch::Deeplabv3,
        backbone: Backbone::Resnet50,
        num_classes: 2,
        ..ModelConfig::default()
    }
}

fn batch(imgsz: usize) -> (Tensor, Vec<u8>) {
    let mut rng = StdRng::seed_from_u64(5);
    let xs: Vec<f32> = (0..2 * 3 * imgsz * imgsz)
        .map(|_| rng.random_range(-2.0..2.0))
        .collect();
    let ys: Vec<u8> = (0..2 * imgsz * imgsz)
        .map(|_| u8::from(rng.random_bool(0.2)))
        .collect();
    (
        Tensor::from_vec(xs, (2, 3, imgsz, imgsz), &Device::Cpu).unwrap(),
        ys,
    )
}

/// Cross-entropy in the logits' own dtype (the train stage's loss works in f32).
fn ce(logits: &Tensor, labels: &[u8]) -> Tensor {
    let (n, c, h, w) = logits.dims4().unwrap();
    let onehot: Vec<f64> = (0..n * c * h * w)
        .map(|i| {
            let (img, class, pix) = (i / (c * h * w), (i / (h * w)) % c, i % (h * w));
            f64::from(u8::from(usize::from(labels[img * h * w + pix]) == class))
        })
        .collect();
    let onehot = Tensor::from_vec(onehot, (n, c, h, w), &Device::Cpu)
        .unwrap()
        .to_dtype(logits.dtype())
        .unwrap();
    let logp = candle_nn::ops::log_softmax(logits, 1).unwrap();
    ((logp * onehot).unwrap().sum_all().unwrap() / -((n * h * w) as f64)).unwrap()
}

fn step(imgsz: usize, dtype: DType, generic: bool, recompute: bool) -> Step {
    step_of(&r50(), imgsz, dtype, generic, recompute)
}

fn step_of(cfg: &ModelConfig, imgsz: usize, dtype: DType, generic: bool, recompute: bool) -> Step {
    let previous = ops::set_force_generic(generic);
    let model = SegModel::with_dtype(cfg, &Device::Cpu, 3, dtype).unwrap();
    model.set_recompute(recompute);
    let (x, y) = batch(imgsz);
    let logits = model.forward(&x.to_dtype(dtype).unwrap(), true).unwrap();
    let loss = if dtype == DType::F32 {
        loss_fn(&Experiment::template(), &logits, &y).unwrap()
    } else {
        ce(&logits, &y)
    };
    let grads = loss.backward().unwrap();
    ops::set_force_generic(previous);
    let lv = loss
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let grads = model
        .trainable_vars()
        .into_iter()
        .map(|(k, v)| {
            let g = grads
                .get(v.as_tensor())
                .expect("a parameter without gradient");
            (k, g.to_dtype(DType::F64).unwrap())
        })
        .collect();
    let state = model.state_dict().unwrap().into_iter().collect();
    Step {
        loss: lv,
        grads,
        state,
    }
}

/// Largest relative difference of the gradients, per tensor (max |a − b| / max |b|), and which.
fn worst_grad(a: &Step, b: &Step) -> (f64, String) {
    let mut worst = (0.0, String::new());
    for (k, gb) in &b.grads {
        let d = max_abs(&(&a.grads[k] - gb).unwrap()) / max_abs(gb);
        if d > worst.0 {
            worst = (d, k.clone());
        }
    }
    worst
}

/// ‖a − b‖ / ‖b‖ over all the gradients together.
fn global_rel(a: &Step, b: &Step) -> f64 {
    let sq = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let (mut d, mut n) = (0.0, 0.0);
    for (k, gb) in &b.grads {
        d += sq(&(&a.grads[k] - gb).unwrap());
        n += sq(gb);
    }
    (d / n).sqrt()
}

fn loss_rel(a: &Step, b: &Step) -> f64 {
    (a.loss - b.loss).abs() / b.loss.abs()
}

/// A whole DeepLabV3-R50 training step through the generic path (max-pool 3×3/stride 2, conv
/// backward as convolutions and GEMMs, BatchNorm, ReLU, bias, resize) completes and matches the
/// custom-op step within 1e-4 relative on the loss and on every gradient tensor: in f64, where
/// the comparison measures the algorithms and not float32 rounding.
///
/// In f32 a DeepLabV3 step at initialisation is ill-conditioned: ASPP's image-pooling branch
/// normalises N values per channel, ReLUs sit at 0 after BatchNorm, and either path's
/// gradients differ from the f64 step by several percent (measured: 4 % in norm for the custom
/// ops at 48–64 px, batch 2). There the generic path must match the loss within 1e-4 and add no
/// error of its own: its distance to the f64 step at most twice the custom ops'.
#[test]
fn r50_training_step_generic_matches_custom_ops() {
    let custom = step(48, DType::F64, false, false);
    let generic = step(48, DType::F64, true, false);
    assert_eq!(custom.grads.len(), generic.grads.len());
    let dl = loss_rel(&generic, &custom);
    assert!(
        dl <= 1e-4,
        "f64 loss {} vs {} ({dl:e})",
        generic.loss,
        custom.loss
    );
    let (d, which) = worst_grad(&generic, &custom);
    assert!(
        d <= 1e-4,
        "f64: gradient of {which} differs by {d:e} relative"
    );
    for (k, t) in &custom.state {
        if k.ends_with("running_mean") || k.ends_with("running_var") {
            let d = max_abs(&(&generic.state[k] - t).unwrap()) / max_abs(t).max(1e-6);
            assert!(d <= 1e-4, "{k} differs by {d:e} relative");
        }
    }
    let custom32 = step(48, DType::F32, false, false);
    let generic32 = step(48, DType::F32, true, false);
    let dl = loss_rel(&generic32, &custom32);
    assert!(
        dl <= 1e-4,
        "f32 loss {} vs {} ({dl:e})",
        generic32.loss,
        custom32.loss
    );
    let (e_custom, e_generic) = (
        global_rel(&custom32, &custom),
        global_rel(&generic32, &custom),
    );
    assert!(
        e_generic <= 2.0 * e_custom + 1e-4,
        "f32 gradients vs f64: generic {e_generic:e}, custom ops {e_custom:e}"
    );
}

/// Recomputation per ResNet stage gives the same loss, gradients (1e-5 relative), BatchNorm
/// running statistics and `num_batches_tracked` as the plain step, on the custom ops and on the
/// generic path.
#[test]
fn recompute_gives_the_same_step() {
    for generic in [false, true] {
        let plain = step(48, DType::F32, generic, false);
        let recomputed = step(48, DType::F32, generic, true);
        assert_eq!(plain.loss, recomputed.loss, "generic={generic}");
        let (d, which) = worst_grad(&recomputed, &plain);
        assert!(
            d <= 1e-5,
            "generic={generic}: gradient of {which} differs by {d:e}"
        );
        for (k, t) in &plain.state {
            let r = &recomputed.state[k];
            let same = if t.dtype() == DType::I64 {
                t.to_vec0::<i64>().unwrap() == r.to_vec0::<i64>().unwrap()
            } else {
                max_abs(&(r - t).unwrap()) == 0.0
            };
            assert!(same, "generic={generic}: {k} differs after the step");
        }
    }
}

/// `driveline bench train-step --recompute` peaks lower than without, in separate processes
/// (the peak resident set is per process and never goes down).
#[test]
fn recompute_lowers_peak_rss() {
    let peak = |recompute: bool| -> f64 {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_driveline"));
        cmd.args([
            "bench",
            "train-step",
            "--backbone",
            "resnet50",
            "--imgsz",
            "192",
            "--batch",
            "2",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--json",
        ]);
        if recompute {
            cmd.arg("--recompute");
        }
        let out = cmd.output().expect("cannot run driveline");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bench JSON");
        v["peak_rss_mib"].as_f64().expect("peak_rss_mib")
    };
    let (plain, recomputed) = (peak(false), peak(true));
    assert!(
        recomputed < 0.9 * plain,
        "peak RSS with recomputation {recomputed:.0} MiB, without {plain:.0} MiB"
    );
}

/// One step of `cfg` in f64 (custom ops), in f32 and in f32 under bf16 autocast (both on the
/// generic path, what CUDA runs; the bf16 products emulated on the CPU with the same rounding).
fn f64_f32_bf16(cfg: &ModelConfig) -> (Step, Step, Step) {
    let exact = step_of(cfg, 48, DType::F64, false, false);
    let f32_step = step_of(cfg, 48, DType::F32, true, false);
    let previous = ops::set_autocast(Some(DType::BF16)).unwrap();
    let bf16 = step_of(cfg, 48, DType::F32, true, false);
    ops::set_autocast(previous).unwrap();
    // Master weights (and BatchNorm statistics) stay f32, every gradient is finite.
    assert!(bf16.state.values().all(|t| t.dtype() != DType::BF16));
    for (k, g) in &bf16.grads {
        assert!(max_abs(g).is_finite(), "{k}: gradient not finite");
    }
    (exact, f32_step, bf16)
}

/// `train.precision = "bf16"` on the U-Net, a well-conditioned step (f32 gradients 5e-7 from
/// f64): the loss within 1e-3 and the gradients within 20 % (in norm) of the f64 step, and
/// the gradients at least 100× farther from it than f32's, because the products ran in bf16.
/// PyTorch's own bf16 autocast (CPU, oneDNN) on the same U-Net and shapes, measured
/// 2026-11-28: loss 2.1e-4, gradients 8.3 % (this: 1.0e-4 and 9.1 %).
#[test]
fn unet_training_step_under_bf16_autocast() {
    let unet = ModelConfig {
        arch: Arch::Unet,
        widths: vec![16, 32, 64, 128],
        num_classes: 2,
        ..ModelConfig::default()
    };
    let (exact, f32_step, bf16) = f64_f32_bf16(&unet);
    let (lbf, g32, gbf) = (
        loss_rel(&bf16, &exact),
        global_rel(&f32_step, &exact),
        global_rel(&bf16, &exact),
    );
    assert!(lbf <= 1e-3, "bf16 loss {lbf:e} from f64");
    assert!(gbf <= 0.2, "bf16 gradients {gbf:e} from f64");
    assert!(
        gbf >= 100.0 * g32,
        "bf16 gradients {gbf:e} from f64, f32 {g32:e}: were the products cast?"
    );
}

/// `train.precision = "bf16"` on a whole DeepLabV3-R50 step runs (f32 master weights, finite
/// gradients) with the loss within 2e-2 of the f64 step, 10× farther than f32's. Its gradients
/// are not compared: at initialisation this step is ill-conditioned (see above), and bf16
/// products put them ~120 % from f64 in norm, as PyTorch's bf16 autocast does on the same
/// model and shapes (142 %; its f32 step: 115 %; measured 2026-11-28, CPU).
#[test]
fn r50_training_step_under_bf16_autocast() {
    let (exact, f32_step, bf16) = f64_f32_bf16(&r50());
    let (l32, lbf) = (loss_rel(&f32_step, &exact), loss_rel(&bf16, &exact));
    assert!(lbf <= 2e-2, "bf16 loss {lbf:e} from f64");
    assert!(
        lbf >= 10.0 * l32,
        "bf16 loss {lbf:e} from f64, f32 {l32:e}: were the products cast?"
    );
}

/// `driveline bench train-step --precision`: bf16 runs on the CPU as an emulation and says so
/// in its result; tf32, which has no CPU form, is refused, naming the value and the device.
#[test]
fn bench_precision_on_the_cpu() {
    let bench = |precision: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_driveline"))
            .args([
                "bench",
                "train-step",
                "--arch",
                "unet",
                "--imgsz",
                "32",
                "--steps",
                "1",
                "--warmup",
                "0",
                "--precision",
                precision,
                "--json",
            ])
            .output()
            .expect("cannot run driveline")
    };
    let out = bench("bf16");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bench JSON");
    assert_eq!(v["precision"], "bf16 (emulated)");
    let out = bench("tf32");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("train.precision = \"tf32\" runs on CUDA only, not on the cpu device"),
        "{err}"
    );
}
