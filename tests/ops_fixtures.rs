//! Parity with PyTorch on small committed fixtures (tests/fixtures/ops_*.safetensors, made by
//! tools/fixtures_ops.py): outputs and input gradients for a fixed upstream gradient.

use candle_core::{Device, Result, Tensor, Var};
use driveline::model::ops;
use std::collections::HashMap;

fn load(name: &str) -> HashMap<String, Tensor> {
    let path = format!(
        "{}/tests/fixtures/ops_{name}.safetensors",
        env!("CARGO_MANIFEST_DIR")
    );
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap()
}

/// Asserts `max|a - b| <= 1e-4 * max|b|` (with a floor of 1e-4 absolute for all-small tensors).
fn assert_close(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shape");
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let s = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        d <= 1e-4 * s.max(1.0),
        "{what}: max abs diff {d} (scale {s})"
    );
}

/// Runs `f` on Vars made from `inputs`, backpropagates `sum(y * gy)` and checks y and the
/// input gradients against `{prefix}.y` and `{prefix}.g{i}`.
fn check(
    t: &HashMap<String, Tensor>,
    prefix: &str,
    inputs: &[&str],
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|k| Var::from_tensor(&t[&format!("{prefix}.{k}")]).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts).unwrap();
    assert_close(&y, &t[&format!("{prefix}.y")], &format!("{prefix}.y"));
    let grads = (y * &t[&format!("{prefix}.gy")])
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (i, v) in vars.iter().enumerate() {
        let key = format!("{prefix}.g{i}");
        assert_close(grads.get(v).unwrap(), &t[&key], &key);
    }
}

#[test]
fn resize_bilinear_matches_pytorch() {
    let t = load("resize");
    for (prefix, h, w) in [("up", 11, 9), ("down", 4, 3), ("one", 4, 5)] {
        check(&t, prefix, &["x"], |x| ops::resize_bilinear(&x[0], h, w));
    }
}

#[test]
fn max_pool2d_matches_pytorch() {
    let t = load("maxpool");
    for (prefix, k, s, p) in [("k3s2p1", 3, 2, 1), ("k2s2p0", 2, 2, 0), ("ties", 3, 2, 1)] {
        check(&t, prefix, &["x"], |x| ops::max_pool2d(&x[0], k, s, p));
    }
}

#[test]
fn conv2d_matches_pytorch() {
    let t = load("conv");
    for (prefix, s, p, d) in [
        ("k3s2p1", 2, 1, 1),
        ("k3d2p2", 1, 2, 2),
        ("k1s2", 2, 0, 1),
        ("k3d12p12", 1, 12, 12),
        ("k7s2p3", 2, 3, 1),
    ] {
        check(&t, prefix, &["x", "w", "b"], |x| {
            ops::conv2d(&x[0], &x[1], Some(&x[2]), s, p, d)
        });
    }
}

#[test]
fn batchnorm_matches_pytorch_train_and_eval() {
    let t = load("batchnorm");
    let var = |k: &str| Var::from_tensor(&t[k]).unwrap();
    let bn = ops::BatchNorm2d {
        weight: var("weight"),
        bias: var("bias"),
        running_mean: var("running_mean"),
        running_var: var("running_var"),
        momentum: 0.1,
        eps: 1e-5,
    };
    let x = var("x");
    let y = bn.forward(&x, true).unwrap();
    assert_close(&y, &t["train.y"], "train.y");
    let grads = (y * &t["train.gy"])
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_close(grads.get(&x).unwrap(), &t["train.gx"], "train.gx");
    assert_close(
        grads.get(&bn.weight).unwrap(),
        &t["train.gweight"],
        "train.gweight",
    );
    assert_close(
        grads.get(&bn.bias).unwrap(),
        &t["train.gbias"],
        "train.gbias",
    );
    assert_close(
        bn.running_mean.as_tensor(),
        &t["train.running_mean"],
        "running_mean",
    );
    assert_close(
        bn.running_var.as_tensor(),
        &t["train.running_var"],
        "running_var",
    );
    let y = bn.forward(&x, false).unwrap();
    assert_close(&y, &t["eval.y"], "eval.y");
}
