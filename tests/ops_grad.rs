//! Finite-difference gradient checks (f64) for the custom ops in `driveline::model::ops`.

use candle_core::{DType, Device, Result, Tensor, Var};
use driveline::model::ops;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn randn(rng: &mut StdRng, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Checks d/dinputs of `sum(f(inputs) * r)` against central differences on up to `max_checks`
/// evenly spaced elements of each input.
fn check_grad(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor>, max_checks: usize) {
    let mut rng = StdRng::seed_from_u64(7);
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts).unwrap();
    let r = randn(&mut rng, y.dims());
    let loss = |ts: &[Tensor]| -> f64 {
        (f(ts).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let grads = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let eps = 1e-5;
    for (i, v) in vars.iter().enumerate() {
        let g: Vec<f64> = grads
            .get(v)
            .expect("missing gradient")
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f64> = inputs[i].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(g.len(), base.len());
        let step = base.len().div_ceil(max_checks).max(1);
        for j in (0..base.len()).step_by(step) {
            let eval = |d: f64| {
                let mut p = base.clone();
                p[j] += d;
                let mut ts = inputs.to_vec();
                ts[i] = Tensor::from_vec(p, inputs[i].dims(), &Device::Cpu).unwrap();
                loss(&ts)
            };
            let num = (eval(eps) - eval(-eps)) / (2.0 * eps);
            assert!(
                (num - g[j]).abs() <= 1e-6 * (1.0 + num.abs()),
                "input {i} element {j}: analytic {} vs numeric {num}",
                g[j]
            );
        }
    }
}

#[test]
fn conv2d_grad_various_geometries() {
    let mut rng = StdRng::seed_from_u64(1);
    // (n, c, h, w, o, k, stride, padding, dilation)
    let cases = [
        (2, 3, 7, 6, 4, 3, 1, 1, 1),
        (2, 3, 7, 8, 4, 3, 2, 1, 1),
        (1, 4, 7, 7, 3, 1, 2, 0, 1),
        (2, 4, 5, 6, 3, 1, 1, 0, 1),
        (1, 2, 9, 8, 3, 3, 1, 2, 2),
        // Tap plan with only the centre tap live (the other 8 read padding only).
        (1, 2, 5, 5, 2, 3, 1, 6, 6),
        // Tap plan (taps partly in the padding) with two images (one per thread).
        (2, 3, 9, 11, 4, 3, 1, 4, 4),
        // Tap plan with more output channels than weight columns (O ≥ C·9).
        (2, 1, 9, 10, 11, 3, 1, 4, 4),
        (1, 2, 11, 10, 2, 7, 2, 3, 1),
        (1, 3, 6, 6, 2, 2, 1, 0, 1),
    ];
    for &(n, c, h, w, o, k, s, p, d) in &cases {
        let x = randn(&mut rng, &[n, c, h, w]);
        let wt = randn(&mut rng, &[o, c, k, k]);
        let b = randn(&mut rng, &[o]);
        check_grad(
            &[x, wt, b],
            |t| ops::conv2d(&t[0], &t[1], Some(&t[2]), s, p, d),
            60,
        );
    }
}

/// Winograd F(2×2, 3×3) (forward and input gradient; f32 takes it by default with ≥ 64
/// channels, here forced in f64) on sides that do and do not divide into tiles, dilations 1-3.
#[test]
fn conv2d_winograd_grad() {
    let mut rng = StdRng::seed_from_u64(2);
    let previous = ops::set_winograd_conv(ops::WinogradMode::Always);
    // (n, c, h, w, o, dilation)
    for &(n, c, h, w, o, d) in &[(2, 3, 7, 6, 4, 1), (1, 2, 9, 8, 3, 2), (2, 2, 13, 12, 3, 3)] {
        let x = randn(&mut rng, &[n, c, h, w]);
        let wt = randn(&mut rng, &[o, c, 3, 3]);
        check_grad(&[x, wt], |t| ops::conv2d(&t[0], &t[1], None, 1, d, d), 60);
    }
    ops::set_winograd_conv(previous);
}

#[test]
fn max_pool_grad() {
    let mut rng = StdRng::seed_from_u64(2);
    let x = randn(&mut rng, &[2, 3, 9, 8]);
    check_grad(
        std::slice::from_ref(&x),
        |t| ops::max_pool2d(&t[0], 3, 2, 1),
        500,
    );
    check_grad(&[x], |t| ops::max_pool2d(&t[0], 2, 2, 0), 500);
}

#[test]
fn resize_bilinear_grad_up_and_down() {
    let mut rng = StdRng::seed_from_u64(3);
    let x = randn(&mut rng, &[2, 2, 5, 6]);
    check_grad(
        std::slice::from_ref(&x),
        |t| ops::resize_bilinear(&t[0], 11, 9),
        200,
    );
    check_grad(
        std::slice::from_ref(&x),
        |t| ops::resize_bilinear(&t[0], 3, 4),
        200,
    );
    let one = randn(&mut rng, &[1, 3, 1, 1]);
    check_grad(&[one], |t| ops::resize_bilinear(&t[0], 4, 5), 10);
}

#[test]
fn conv_transpose2d_grad() {
    let mut rng = StdRng::seed_from_u64(4);
    let x = randn(&mut rng, &[2, 3, 4, 5]);
    let w = randn(&mut rng, &[3, 2, 2, 2]);
    let b = randn(&mut rng, &[2]);
    check_grad(
        &[x, w, b],
        |t| ops::conv_transpose2d(&t[0], &t[1], Some(&t[2]), 2),
        100,
    );
}

/// Finite-difference check of training-mode BatchNorm, with or without the fused ReLU.
fn check_batchnorm(seed: u64, relu: bool) {
    let mut rng = StdRng::seed_from_u64(seed);
    let x = randn(&mut rng, &[3, 2, 4, 5]);
    let w = randn(&mut rng, &[2]);
    let b = randn(&mut rng, &[2]);
    let zeros = Tensor::zeros(2, DType::F64, &Device::Cpu).unwrap();
    let ones = Tensor::ones(2, DType::F64, &Device::Cpu).unwrap();
    let bn = |t: &[Tensor]| {
        let bn = ops::BatchNorm2d {
            weight: Var::from_tensor(&t[1]).unwrap(),
            bias: Var::from_tensor(&t[2]).unwrap(),
            running_mean: Var::from_tensor(&zeros).unwrap(),
            running_var: Var::from_tensor(&ones).unwrap(),
            momentum: 0.1,
            eps: 1e-5,
        };
        // `Var::from_tensor` on the checker's variables keeps their identity.
        if relu {
            bn.forward_relu(&t[0], true)
        } else {
            bn.forward(&t[0], true)
        }
    };
    check_grad(&[x, w, b], bn, 120);
}

#[test]
fn batchnorm_train_grad() {
    check_batchnorm(5, false);
}

#[test]
fn batchnorm_relu_train_grad() {
    check_batchnorm(6, true);
}

#[test]
fn add_relu_grad() {
    let mut rng = StdRng::seed_from_u64(7);
    let a = randn(&mut rng, &[2, 3, 4, 5]);
    let b = randn(&mut rng, &[2, 3, 4, 5]);
    check_grad(&[a, b], |t| ops::add_relu(&t[0], &t[1]), 80);
}

/// SA-UNet's two additions in training: a DropBlock (its mask fixed by the seed, so the
/// function is differentiable) followed by the spatial attention, gradients with respect to
/// the input and the attention's 7×7 weights. The max over channels is differentiable away
/// from ties, which random inputs do not have.
#[test]
fn dropblock_and_spatial_attention_grad() {
    use driveline::model::layers::{Conv2d, DropBlock, Pass};
    use driveline::model::unet::SpatialAttention;
    let mut rng = StdRng::seed_from_u64(8);
    let x = randn(&mut rng, &[2, 3, 9, 8]);
    let w = randn(&mut rng, &[1, 2, 7, 7]);
    let drop = DropBlock::new(0.3, 3, 1);
    drop.reseed(4);
    let f = |t: &[Tensor]| {
        let attention = SpatialAttention {
            conv: Conv2d {
                weight: Var::from_tensor(&t[1])?,
                bias: None,
                stride: 1,
                padding: 3,
                dilation: 1,
            },
        };
        let dropped = drop.forward(&t[0], Pass::Train)?;
        attention.forward(&dropped, Pass::Train)
    };
    // The mask zeroes some of the input, so that part of the gradient is zero.
    let y = f(&[x.clone(), w.clone()]).unwrap();
    assert_eq!(y.dims(), x.dims());
    check_grad(&[x, w], f, 150);
}
