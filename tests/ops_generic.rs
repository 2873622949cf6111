//! The device-generic path of `driveline::model::ops` (what CUDA runs), proven on CPU tensors:
//! it equals the CPU custom ops within 1e-5 relative in f32 (outputs and gradients, on random
//! shapes, strides, paddings and dilations), and it passes the f64 finite-difference checks.

use candle_core::{DType, Device, Result, Tensor, Var};
use driveline::model::ops;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Turns the generic path on for this thread while alive.
struct Generic(bool);

impl Generic {
    fn on() -> Self {
        Self(ops::set_force_generic(true))
    }
}

impl Drop for Generic {
    fn drop(&mut self) {
        ops::set_force_generic(self.0);
    }
}

fn rand_tensor(rng: &mut StdRng, shape: &[usize], dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// max |a − b| / max |b| (0 when both are 0).
fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let d = max_abs(&(a - b).unwrap());
    let scale = max_abs(b);
    if scale == 0.0 {
        d
    } else {
        d / scale
    }
}

/// Output and the gradients of Σ f(inputs)·r with respect to every input, on the chosen path.
fn run(
    inputs: &[Tensor],
    r: &Tensor,
    generic: bool,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> (Tensor, Vec<Tensor>) {
    let _g = generic.then(Generic::on);
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.copy().unwrap()).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts).unwrap();
    let grads = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
    let gs = vars
        .iter()
        .map(|v| grads.get(v.as_tensor()).expect("missing gradient").clone())
        .collect();
    (y.detach(), gs)
}

/// The generic path equals the custom ops on `inputs` (f32): output and every input gradient
/// within `tol` relative.
fn assert_paths_agree(
    what: &str,
    inputs: &[Tensor],
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    tol: f64,
) {
    let probe = f(inputs).unwrap();
    let mut rng = StdRng::seed_from_u64(99);
    let r = rand_tensor(&mut rng, probe.dims(), probe.dtype());
    let (y1, g1) = run(inputs, &r, false, f);
    let (y2, g2) = run(inputs, &r, true, f);
    let d = rel_diff(&y2, &y1);
    assert!(d <= tol, "{what}: output differs by {d:e} relative");
    for (i, (a, b)) in g2.iter().zip(&g1).enumerate() {
        let d = rel_diff(a, b);
        assert!(
            d <= tol,
            "{what}: gradient of input {i} differs by {d:e} relative"
        );
        assert!(max_abs(b) > 0.0, "{what}: gradient of input {i} is zero");
    }
}

/// One convolution: (n, c, h, w, o, kh, kw, stride, padding, dilation).
type Case = (
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
);

/// The finite-difference geometries of
/// `ops_grad.rs` (the models' shapes) plus rectangular kernels and odd strides.
const CONV_CASES: [Case; 13] = [
    (2, 3, 7, 6, 4, 3, 3, 1, 1, 1),
    (2, 3, 7, 8, 4, 3, 3, 2, 1, 1),
    (1, 4, 7, 7, 3, 1, 1, 2, 0, 1),
    (2, 4, 5, 6, 3, 1, 1, 1, 0, 1),
    (1, 2, 9, 8, 3, 3, 3, 1, 2, 2),
    (1, 2, 5, 5, 2, 3, 3, 1, 6, 6),
    (2, 3, 9, 11, 4, 3, 3, 1, 4, 4),
    (1, 2, 11, 10, 2, 7, 7, 2, 3, 1),
    (1, 3, 6, 6, 2, 2, 2, 1, 0, 1),
    (2, 3, 8, 9, 4, 1, 3, 1, 1, 1),
    (1, 2, 10, 9, 3, 3, 2, 3, 2, 2),
    (2, 2, 6, 7, 3, 1, 1, 1, 1, 1),
    (1, 3, 9, 9, 2, 5, 5, 2, 2, 1),
];

fn conv_inputs(rng: &mut StdRng, case: Case, dtype: DType) -> Vec<Tensor> {
    let (n, c, h, w, o, kh, kw, ..) = case;
    vec![
        rand_tensor(rng, &[n, c, h, w], dtype),
        rand_tensor(rng, &[o, c, kh, kw], dtype),
        rand_tensor(rng, &[o], dtype),
    ]
}

#[test]
fn conv2d_generic_equals_custom_on_fixed_geometries() {
    let mut rng = StdRng::seed_from_u64(1);
    for case in CONV_CASES {
        let (.., s, p, d) = case;
        let inputs = conv_inputs(&mut rng, case, DType::F32);
        assert_paths_agree(
            &format!("conv2d {case:?}"),
            &inputs,
            &|t| ops::conv2d(&t[0], &t[1], Some(&t[2]), s, p, d),
            1e-5,
        );
    }
}

#[test]
fn conv2d_generic_equals_custom_on_random_geometries() {
    let mut rng = StdRng::seed_from_u64(2);
    let mut tried = 0;
    while tried < 40 {
        let k = [1, 2, 3, 3, 5, 7][rng.random_range(0..6)];
        let kw = if rng.random_bool(0.2) {
            rng.random_range(1..4)
        } else {
            k
        };
        let (s, d) = (rng.random_range(1..4), rng.random_range(1..4));
        let p = rng.random_range(0..(d * (k.max(kw) - 1) + 2));
        let (n, c, o) = (
            rng.random_range(1..4),
            rng.random_range(1..9),
            rng.random_range(1..9),
        );
        let (h, w) = (rng.random_range(1..20), rng.random_range(1..20));
        if h + 2 * p < d * (k - 1) + 1 || w + 2 * p < d * (kw - 1) + 1 {
            continue;
        }
        tried += 1;
        let case = (n, c, h, w, o, k, kw, s, p, d);
        let inputs = conv_inputs(&mut rng, case, DType::F32);
        assert_paths_agree(
            &format!("conv2d {case:?}"),
            &inputs,
            &|t| ops::conv2d(&t[0], &t[1], Some(&t[2]), s, p, d),
            1e-5,
        );
    }
}

#[test]
fn max_pool_generic_equals_custom_ties_included() {
    let mut rng = StdRng::seed_from_u64(3);
    for (k, s, p) in [(3, 2, 1), (2, 2, 0), (3, 1, 1), (3, 3, 0), (2, 1, 1)] {
        for (h, w) in [(9, 8), (7, 7), (4, 6)] {
            let x = rand_tensor(&mut rng, &[2, 3, h, w], DType::F32);
            assert_paths_agree(
                &format!("max_pool2d k{k} s{s} p{p} {h}x{w}"),
                std::slice::from_ref(&x),
                &|t| ops::max_pool2d(&t[0], k, s, p),
                1e-5,
            );
            // Few distinct values: the gradient must go to the first maximum of each window.
            let ties = (x * 2.0).unwrap().round().unwrap();
            assert_paths_agree(
                &format!("max_pool2d with ties k{k} s{s} p{p} {h}x{w}"),
                &[ties],
                &|t| ops::max_pool2d(&t[0], k, s, p),
                1e-6,
            );
        }
    }
}

fn batch_norm(t: &[Tensor], relu: bool) -> Result<Tensor> {
    let c = t[1].dim(0)?;
    let dev = t[0].device();
    let bn = ops::BatchNorm2d {
        weight: Var::from_tensor(&t[1])?,
        bias: Var::from_tensor(&t[2])?,
        running_mean: Var::from_tensor(&Tensor::zeros(c, t[0].dtype(), dev)?)?,
        running_var: Var::from_tensor(&Tensor::ones(c, t[0].dtype(), dev)?)?,
        momentum: 0.1,
        eps: 1e-5,
    };
    if relu {
        bn.forward_relu(&t[0], true)
    } else {
        bn.forward(&t[0], true)
    }
}

#[test]
fn batch_norm_generic_equals_custom() {
    let mut rng = StdRng::seed_from_u64(4);
    for (n, c, h, w) in [(2, 3, 5, 6), (4, 8, 9, 7), (3, 5, 1, 1), (1, 4, 16, 16)] {
        for relu in [false, true] {
            let x = rand_tensor(&mut rng, &[n, c, h, w], DType::F32)
                .affine(3.0, 0.5)
                .unwrap();
            let inputs = vec![
                x,
                rand_tensor(&mut rng, &[c], DType::F32),
                rand_tensor(&mut rng, &[c], DType::F32),
            ];
            assert_paths_agree(
                &format!("batch_norm relu={relu} {:?}", (n, c, h, w)),
                &inputs,
                &|t| batch_norm(t, relu),
                1e-5,
            );
        }
    }
}

/// Running statistics after a training-mode BatchNorm on either path.
#[test]
fn batch_norm_running_stats_agree() {
    let mut rng = StdRng::seed_from_u64(5);
    let x = rand_tensor(&mut rng, &[3, 4, 5, 6], DType::F32);
    let stats = |generic: bool| {
        let _g = generic.then(Generic::on);
        let bn = ops::BatchNorm2d {
            weight: Var::ones(4, DType::F32, &Device::Cpu).unwrap(),
            bias: Var::zeros(4, DType::F32, &Device::Cpu).unwrap(),
            running_mean: Var::zeros(4, DType::F32, &Device::Cpu).unwrap(),
            running_var: Var::ones(4, DType::F32, &Device::Cpu).unwrap(),
            momentum: 0.1,
            eps: 1e-5,
        };
        bn.forward(&x, true).unwrap();
        (
            bn.running_mean.as_tensor().copy().unwrap(),
            bn.running_var.as_tensor().copy().unwrap(),
        )
    };
    let ((m1, v1), (m2, v2)) = (stats(false), stats(true));
    assert!(rel_diff(&m2, &m1) < 1e-5 && rel_diff(&v2, &v1) < 1e-5);
}

#[test]
fn relu_add_relu_resize_convt_generic_equal_custom() {
    let mut rng = StdRng::seed_from_u64(6);
    let a = rand_tensor(&mut rng, &[2, 3, 5, 7], DType::F32);
    let b = rand_tensor(&mut rng, &[2, 3, 5, 7], DType::F32);
    assert_paths_agree("relu", std::slice::from_ref(&a), &|t| ops::relu(&t[0]), 0.0);
    assert_paths_agree(
        "add_relu",
        &[a.clone(), b],
        &|t| ops::add_relu(&t[0], &t[1]),
        0.0,
    );
    assert_paths_agree(
        "resize up",
        std::slice::from_ref(&a),
        &|t| ops::resize_bilinear(&t[0], 11, 9),
        1e-5,
    );
    assert_paths_agree(
        "resize down",
        std::slice::from_ref(&a),
        &|t| ops::resize_bilinear(&t[0], 3, 4),
        1e-5,
    );
    let w = rand_tensor(&mut rng, &[3, 4, 2, 2], DType::F32);
    let bias = rand_tensor(&mut rng, &[4], DType::F32);
    assert_paths_agree(
        "conv_transpose2d",
        &[a, w, bias],
        &|t| ops::conv_transpose2d(&t[0], &t[1], Some(&t[2]), 2),
        1e-5,
    );
}

/// Inference (no graph): the generic path gives the same outputs without attaching anything.
#[test]
fn generic_without_graph_returns_plain_results() {
    let mut rng = StdRng::seed_from_u64(7);
    let x = rand_tensor(&mut rng, &[1, 3, 9, 9], DType::F32);
    let w = rand_tensor(&mut rng, &[4, 3, 3, 3], DType::F32);
    let y1 = ops::conv2d(&x, &w, None, 2, 1, 1).unwrap();
    let y2 = {
        let _g = Generic::on();
        ops::conv2d(&x, &w, None, 2, 1, 1).unwrap()
    };
    assert!(!y2.track_op());
    assert!(rel_diff(&y2, &y1) < 1e-5);
}

// ---------------------------------------------------------------------------------------------
// Finite differences (f64) on the generic path.

/// Checks d/dinputs of Σ f(inputs)·r on the generic path against central differences on up to
/// `max_checks` evenly spaced elements of each input.
fn check_grad_generic(
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    max_checks: usize,
) {
    let _g = Generic::on();
    let mut rng = StdRng::seed_from_u64(7);
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts).unwrap();
    let r = rand_tensor(&mut rng, y.dims(), DType::F64);
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
fn generic_conv2d_finite_differences() {
    let mut rng = StdRng::seed_from_u64(11);
    for case in CONV_CASES {
        let (.., s, p, d) = case;
        let inputs = conv_inputs(&mut rng, case, DType::F64);
        check_grad_generic(
            &inputs,
            |t| ops::conv2d(&t[0], &t[1], Some(&t[2]), s, p, d),
            40,
        );
    }
}

#[test]
fn generic_pool_relu_finite_differences() {
    let mut rng = StdRng::seed_from_u64(12);
    let x = rand_tensor(&mut rng, &[2, 3, 9, 8], DType::F64);
    check_grad_generic(
        std::slice::from_ref(&x),
        |t| ops::max_pool2d(&t[0], 3, 2, 1),
        500,
    );
    check_grad_generic(
        std::slice::from_ref(&x),
        |t| ops::max_pool2d(&t[0], 2, 2, 0),
        500,
    );
    check_grad_generic(std::slice::from_ref(&x), |t| ops::relu(&t[0]), 200);
    let b = rand_tensor(&mut rng, &[2, 3, 9, 8], DType::F64);
    check_grad_generic(&[x, b], |t| ops::add_relu(&t[0], &t[1]), 100);
}

#[test]
fn generic_batch_norm_finite_differences() {
    let mut rng = StdRng::seed_from_u64(13);
    for relu in [false, true] {
        let inputs = vec![
            rand_tensor(&mut rng, &[3, 2, 4, 5], DType::F64),
            rand_tensor(&mut rng, &[2], DType::F64),
            rand_tensor(&mut rng, &[2], DType::F64),
        ];
        check_grad_generic(&inputs, |t| batch_norm(t, relu), 120);
    }
}

#[test]
fn generic_resize_convt_finite_differences() {
    let mut rng = StdRng::seed_from_u64(14);
    let x = rand_tensor(&mut rng, &[2, 3, 4, 5], DType::F64);
    check_grad_generic(
        std::slice::from_ref(&x),
        |t| ops::resize_bilinear(&t[0], 7, 9),
        100,
    );
    let w = rand_tensor(&mut rng, &[3, 2, 2, 2], DType::F64);
    let b = rand_tensor(&mut rng, &[2], DType::F64);
    check_grad_generic(
        &[x, w, b],
        |t| ops::conv_transpose2d(&t[0], &t[1], Some(&t[2]), 2),
        100,
    );
}

/// The tiny training step `train.device = "auto"` runs on a GPU before choosing it passes on
/// the generic path (compared inside with the CPU custom ops).
#[test]
fn generic_path_passes_the_auto_smoke_step() {
    let _g = Generic::on();
    driveline::model::device::smoke_test(&Device::Cpu).unwrap();
}

/// `auto` says which device it chose and why (here: a CPU-only build).
#[test]
fn auto_says_which_device_and_why() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_driveline"))
        .args([
            "bench", "infer", "--arch", "unet", "--imgsz", "32", "--steps", "1",
        ])
        .args(["--device", "auto", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let expected = if cfg!(feature = "cuda") {
        "train.device = \"auto\": "
    } else {
        "train.device = \"auto\": cpu"
    };
    assert!(err.contains(expected), "stderr: {err}");
    assert!(
        err.contains('(') && err.contains(')'),
        "no reason given: {err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Autocast (`train.precision = "bf16"`): the products in bf16, everything else f32.

/// Turns bf16 autocast on for this thread while alive.
struct Autocast(Option<DType>);

impl Autocast {
    fn bf16() -> Self {
        Self(ops::set_autocast(Some(DType::BF16)).unwrap())
    }
}

impl Drop for Autocast {
    fn drop(&mut self) {
        ops::set_autocast(self.0).unwrap();
    }
}

/// `t` rounded to bf16 and back to f32.
fn round_bf16(t: &Tensor) -> Tensor {
    t.to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

/// Largest |a − b| in units of b's bf16 spacing at each element (2⁻⁷·|b|, at least 2⁻⁷ of
/// b's largest element over 2⁸, so that results near 0 do not dominate).
fn bf16_ulps(a: &Tensor, b: &Tensor) -> f64 {
    let floor = max_abs(b) / 256.0;
    let d = (a - b).unwrap().abs().unwrap();
    let spacing = b
        .abs()
        .unwrap()
        .maximum(floor)
        .unwrap()
        .affine(1.0 / 128.0, 0.0)
        .unwrap();
    max_abs(&d.div(&spacing).unwrap())
}

/// Under bf16 autocast a convolution casts its operands to bf16 and hands back f32: on every
/// geometry the output is, within one bf16 spacing, the f32 convolution of the bf16-rounded
/// input and weight, rounded to bf16. So it is not the f32 convolution (the operands were
/// cast), and the gradients are those of the rounded operands (the input gradient within one
/// spacing, the weight gradient, a sum of per-image bf16 products, within 1e-2 of its largest
/// element), not the f32 ones: the backward multiplies in bf16 too.
#[test]
fn conv2d_under_bf16_autocast_multiplies_in_bf16() {
    let mut rng = StdRng::seed_from_u64(21);
    for case in CONV_CASES {
        let (.., s, p, d) = case;
        let what = format!("conv2d {case:?}");
        let inputs = conv_inputs(&mut rng, case, DType::F32);
        let conv = |t: &[Tensor]| ops::conv2d(&t[0], &t[1], None, s, p, d);
        let probe = conv(&inputs[..2]).unwrap();
        // A bf16-representable upstream gradient, so that its cast is exact.
        let r = round_bf16(&rand_tensor(&mut rng, probe.dims(), DType::F32));
        let (y, g) = {
            let _a = Autocast::bf16();
            run(&inputs[..2], &r, true, &conv)
        };
        assert_eq!(y.dtype(), DType::F32, "{what}: autocast result dtype");
        assert!(
            g.iter().all(|g| g.dtype() == DType::F32),
            "{what}: gradient dtype"
        );
        let rounded: Vec<Tensor> = inputs[..2].iter().map(round_bf16).collect();
        let (y_ref, g_ref) = run(&rounded, &r, true, &conv);
        let (y32, g32) = run(&inputs[..2], &r, true, &conv);
        let u = bf16_ulps(&y, &round_bf16(&y_ref));
        assert!(
            u <= 1.0,
            "{what}: output {u} bf16 spacings from the rounded-operand conv"
        );
        assert!(
            rel_diff(&y, &y32) > 1e-4,
            "{what}: output equals the f32 convolution: no cast"
        );
        // The input gradient is one product per element: the rounded one. The weight gradient
        // sums per-image bf16 products in f32: bf16's error relative to its largest element.
        let u = bf16_ulps(&g[0], &round_bf16(&g_ref[0]));
        assert!(u <= 1.0, "{what}: input gradient {u} bf16 spacings off");
        let d = rel_diff(&g[1], &g_ref[1]);
        assert!(
            d <= 1e-2,
            "{what}: weight gradient {d:e} from the rounded-operand one"
        );
        for (i, name) in ["input", "weight"].iter().enumerate() {
            assert!(
                rel_diff(&g[i], &g32[i]) > 1e-4,
                "{what}: {name} gradient equals the f32 one: the backward ran in f32"
            );
        }
    }
}

/// The transposed convolution's GEMM (the U-Net decoder) runs in bf16 under autocast, forward
/// and backward, and hands back f32; f64 tensors are never cast (1e-12); autocast off again
/// gives the f32 result bit for bit; and only 16-bit float types are accepted.
#[test]
fn conv_transpose_and_f64_under_bf16_autocast() {
    let mut rng = StdRng::seed_from_u64(22);
    let inputs = vec![
        rand_tensor(&mut rng, &[2, 6, 5, 4], DType::F32),
        rand_tensor(&mut rng, &[6, 3, 2, 2], DType::F32),
    ];
    let convt = |t: &[Tensor]| ops::conv_transpose2d(&t[0], &t[1], None, 2);
    let r = round_bf16(&rand_tensor(&mut rng, &[2, 3, 10, 8], DType::F32));
    let (y, g) = {
        let _a = Autocast::bf16();
        run(&inputs, &r, false, &convt)
    };
    let (y32, g32) = run(&inputs, &r, false, &convt);
    assert_eq!(y.dtype(), DType::F32);
    assert!(rel_diff(&y, &y32) > 1e-4, "convt output: no cast");
    assert!(
        rel_diff(&y, &y32) < 1e-2,
        "convt output: {}",
        rel_diff(&y, &y32)
    );
    for (a, b) in g.iter().zip(&g32) {
        assert_eq!(a.dtype(), DType::F32);
        let d = rel_diff(a, b);
        assert!(d > 1e-4 && d < 2e-2, "convt gradient vs f32: {d:e}");
    }
    // f64 stays f64, bit for bit.
    let x64 = rand_tensor(&mut rng, &[1, 2, 6, 6], DType::F64);
    let w64 = rand_tensor(&mut rng, &[3, 2, 3, 3], DType::F64);
    let plain = ops::conv2d(&x64, &w64, None, 1, 1, 1).unwrap();
    let cast = {
        let _a = Autocast::bf16();
        ops::conv2d(&x64, &w64, None, 1, 1, 1).unwrap()
    };
    assert_eq!(cast.dtype(), DType::F64);
    // (Autocast takes the generic path, whose f64 rounding differs from the custom op's.)
    let d = rel_diff(&cast, &plain);
    assert!(d < 1e-12, "f64 was cast: {d:e}");
    // Off again: the f32 result.
    let (y_after, _) = run(&inputs, &r, false, &convt);
    assert_eq!(max_abs(&(&y_after - &y32).unwrap()), 0.0);
    assert!(ops::set_autocast(Some(DType::F32)).is_err());
    assert_eq!(ops::autocast(), None);
}
