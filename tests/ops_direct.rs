//! The direct 3×3 convolution kernels (`src/model/ops/direct.rs`, f32, AVX2) against the
//! im2col + GEMM path, which `tests/ops_grad.rs` checks against f64 finite differences, and
//! against exact finite differences of their own on integer data.
//!
//! On a CPU without AVX2 and FMA both paths are im2col and these tests compare it with itself;
//! they say so on stderr.

use candle_core::{DType, Device, Tensor, Var};
use driveline::model::ops;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// (n, c, h, w, o, dilation)
type Geom = (usize, usize, usize, usize, usize, usize);

/// Forward output and the gradients of `Σ y·gy` w.r.t. x and w, on the direct kernels or not.
fn run(x: &Tensor, w: &Tensor, gy: &Tensor, d: usize, direct: bool) -> [Tensor; 3] {
    let previous = ops::set_direct_conv(direct);
    let (xv, wv) = (Var::from_tensor(x).unwrap(), Var::from_tensor(w).unwrap());
    let y = ops::conv2d(xv.as_tensor(), wv.as_tensor(), None, 1, d, d).unwrap();
    let g = (&y * gy).unwrap().sum_all().unwrap().backward().unwrap();
    ops::set_direct_conv(previous);
    [
        y,
        g.get(xv.as_tensor()).unwrap().clone(),
        g.get(wv.as_tensor()).unwrap().clone(),
    ]
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn note_if_unavailable() {
    if !ops::direct_conv_available() {
        eprintln!("no AVX2+FMA on this CPU: the direct kernels are not exercised");
    }
}

/// Random geometries: widths around whole vectors and register tiles, channel counts around the
/// tile's 6, dilations 1-3, batch 1 (channels split over threads) to 5 (images over threads).
fn random_geometries(count: usize) -> Vec<Geom> {
    let mut rng = StdRng::seed_from_u64(11);
    let mut out = vec![
        (2, 16, 96, 96, 16, 1),
        (1, 3, 24, 12, 13, 1),
        (3, 7, 17, 9, 6, 2),
    ];
    while out.len() < count {
        let d = rng.random_range(1..=3);
        let (h, w) = (rng.random_range(4 * d..=40), rng.random_range(4 * d..=40));
        out.push((
            rng.random_range(1..=5),
            rng.random_range(1..=20),
            h,
            w,
            rng.random_range(1..=20),
            d,
        ));
    }
    out
}

#[test]
fn direct_matches_im2col_on_random_shapes() {
    note_if_unavailable();
    let dev = Device::Cpu;
    for (n, c, h, w, o, d) in random_geometries(40) {
        let x = Tensor::randn(0f32, 1.0, (n, c, h, w), &dev).unwrap();
        let wt = Tensor::randn(0f32, 0.3, (o, c, 3, 3), &dev).unwrap();
        let gy = Tensor::randn(0f32, 1.0, (n, o, h, w), &dev).unwrap();
        let direct = run(&x, &wt, &gy, d, true);
        let im2col = run(&x, &wt, &gy, d, false);
        for (what, a, b) in [
            ("y", &direct[0], &im2col[0]),
            ("gx", &direct[1], &im2col[1]),
            ("gw", &direct[2], &im2col[2]),
        ] {
            assert_eq!(a.dims(), b.dims());
            let err = max_abs(&(a - b).unwrap()) / max_abs(b).max(1e-6);
            // f32 sums of up to 20·9 (y, gx) or 5·40·40 (gw) products in another order.
            assert!(
                err < 2e-5,
                "{what} of {:?}: relative difference {err}",
                (n, c, h, w, o, d)
            );
        }
    }
}

/// Small integers, so that every f32 sum of the convolution is exact.
fn integers(rng: &mut StdRng, shape: (usize, usize, usize, usize)) -> Tensor {
    let len = shape.0 * shape.1 * shape.2 * shape.3;
    let v: Vec<f32> = (0..len)
        .map(|_| rng.random_range(-3i32..=3) as f32)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// The convolution is linear in x and in w, so on integer data a central difference with step
/// 1 is its exact derivative, and f32 computes both sides without rounding: the analytic
/// gradients must equal it exactly, element by element.
#[test]
fn direct_gradients_equal_exact_finite_differences() {
    note_if_unavailable();
    let mut rng = StdRng::seed_from_u64(5);
    for &(n, c, h, w, o, d) in &[
        (2, 3, 9, 11, 7, 1),
        (1, 8, 12, 12, 5, 3),
        (3, 2, 5, 17, 9, 1),
    ] {
        let x = integers(&mut rng, (n, c, h, w));
        let wt = integers(&mut rng, (o, c, 3, 3));
        let gy = integers(&mut rng, (n, o, h, w));
        let [_, gx, gw] = run(&x, &wt, &gy, d, true);
        let loss = |x: &Tensor, wt: &Tensor| -> f64 {
            let y = ops::conv2d(x, wt, None, 1, d, d).unwrap();
            let l = (y * &gy).unwrap().sum_all().unwrap();
            f64::from(l.to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap())
        };
        for (which, base, grad) in [(0, &x, &gx), (1, &wt, &gw)] {
            let g: Vec<f32> = grad.flatten_all().unwrap().to_vec1().unwrap();
            let v: Vec<f32> = base.flatten_all().unwrap().to_vec1().unwrap();
            for j in 0..v.len() {
                let at = |delta: f32| {
                    let mut p = v.clone();
                    p[j] += delta;
                    let t = Tensor::from_vec(p, base.dims(), &Device::Cpu).unwrap();
                    if which == 0 {
                        loss(&t, &wt)
                    } else {
                        loss(&x, &t)
                    }
                };
                let numeric = (at(1.0) - at(-1.0)) / 2.0;
                assert_eq!(
                    f64::from(g[j]),
                    numeric,
                    "{} element {j} of {:?}",
                    ["gx", "gw"][which],
                    (n, c, h, w, o, d)
                );
            }
        }
    }
}
