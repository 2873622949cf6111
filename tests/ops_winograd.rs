//! Winograd F(2×2, 3×3) (`src/model/ops/winograd.rs`: forward and input gradient) against the
//! im2col + GEMM path, which `tests/ops_grad.rs` checks against f64 finite differences (and so
//! does its `conv2d_winograd_grad` for Winograd itself), on random shapes and dilations: f64,
//! where both must agree to rounding, and f32 at the tolerance of a reordered sum.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::max_abs;
use driveline::model::ops::{self, WinogradMode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// (n, c, h, w, o, dilation)
type Geom = (usize, usize, usize, usize, usize, usize);

/// Forward output and the gradients of `Σ y·gy` w.r.t. x and w, with Winograd always (where
/// the geometry allows) or never; never the direct kernels, so the reference is im2col.
fn run(x: &Tensor, w: &Tensor, gy: &Tensor, d: usize, mode: WinogradMode) -> [Tensor; 3] {
    let previous = (ops::set_winograd_conv(mode), ops::set_direct_conv(false));
    let (xv, wv) = (Var::from_tensor(x).unwrap(), Var::from_tensor(w).unwrap());
    let y = ops::conv2d(xv.as_tensor(), wv.as_tensor(), None, 1, d, d).unwrap();
    let g = (&y * gy).unwrap().sum_all().unwrap().backward().unwrap();
    ops::set_winograd_conv(previous.0);
    ops::set_direct_conv(previous.1);
    [
        y,
        g.get(xv.as_tensor()).unwrap().clone(),
        g.get(wv.as_tensor()).unwrap().clone(),
    ]
}

/// Random geometries: sides that do and do not divide into 2d-wide tile groups, dilations 1-4
/// (at most a quarter of the side, as the path requires), channel counts either side of 1,
/// batches 1-4 (blocks spanning images).
fn random_geometries(count: usize, seed: u64) -> Vec<Geom> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = vec![(1, 1, 4, 4, 1, 1), (2, 5, 7, 9, 3, 1), (1, 3, 17, 12, 4, 3)];
    while out.len() < count {
        let d = rng.random_range(1..=4);
        let (h, w) = (rng.random_range(4 * d..=30), rng.random_range(4 * d..=30));
        out.push((
            rng.random_range(1..=4),
            rng.random_range(1..=12),
            h,
            w,
            rng.random_range(1..=12),
            d,
        ));
    }
    out
}

fn compare(dtype: DType, count: usize, seed: u64, tolerance: f64) {
    let dev = Device::Cpu;
    for (n, c, h, w, o, d) in random_geometries(count, seed) {
        let x = Tensor::randn(0f64, 1.0, (n, c, h, w), &dev).unwrap();
        let wt = Tensor::randn(0f64, 0.3, (o, c, 3, 3), &dev).unwrap();
        let gy = Tensor::randn(0f64, 1.0, (n, o, h, w), &dev).unwrap();
        let [x, wt, gy] = [x, wt, gy].map(|t| t.to_dtype(dtype).unwrap());
        let wino = run(&x, &wt, &gy, d, WinogradMode::Always);
        let im2col = run(&x, &wt, &gy, d, WinogradMode::Never);
        for (what, a, b) in [
            ("y", &wino[0], &im2col[0]),
            ("gx", &wino[1], &im2col[1]),
            ("gw", &wino[2], &im2col[2]),
        ] {
            assert_eq!(a.dims(), b.dims());
            let err = max_abs(&(a - b).unwrap()) / max_abs(b).max(1e-6);
            assert!(
                err < tolerance,
                "{dtype:?} {what} of {:?}: relative difference {err}",
                (n, c, h, w, o, d)
            );
        }
    }
}

#[test]
fn winograd_matches_im2col_in_f64() {
    compare(DType::F64, 40, 3, 1e-12);
}

#[test]
fn winograd_matches_im2col_in_f32() {
    // Sums of up to 12·9 products in another order, through transforms with ±1 and 1/2 terms.
    compare(DType::F32, 40, 4, 3e-5);
}

/// ResNet shapes the default mode takes Winograd on (f32, ≥ 128 channels each side, ≥ 32×32),
/// with one image and with two, against im2col.
#[test]
fn default_mode_on_resnet_shapes_matches_im2col() {
    let dev = Device::Cpu;
    for &(n, c, hw, o, d) in &[
        (2, 128, 33, 128, 1),
        (1, 160, 32, 128, 2),
        (1, 128, 35, 136, 4),
    ] {
        let x = Tensor::randn(0f32, 1.0, (n, c, hw, hw), &dev).unwrap();
        let wt = Tensor::randn(0f32, 0.1, (o, c, 3, 3), &dev).unwrap();
        let gy = Tensor::randn(0f32, 1.0, (n, o, hw, hw), &dev).unwrap();
        let wino = run(&x, &wt, &gy, d, WinogradMode::Auto);
        let im2col = run(&x, &wt, &gy, d, WinogradMode::Never);
        for (what, a, b) in [("y", &wino[0], &im2col[0]), ("gx", &wino[1], &im2col[1])] {
            let err = max_abs(&(a - b).unwrap()) / max_abs(b);
            assert!(err < 3e-5, "{what} of {:?}: {err}", (n, c, hw, o, d));
        }
    }
}
