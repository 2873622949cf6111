//! Timing of the custom conv2d against Candle's conv2d (run on demand, prints medians):
//! `cargo test --release --test ops_bench -- --ignored --nocapture`; `tools/bench_ops.py` times
//! PyTorch on the same shapes. Not a pass/fail test: it only checks that both convolutions agree.
//!
//! On a shared machine wall times swing with the load; `BENCH_CPU=1` reports the process CPU time
//! per run instead (mean), which with `RAYON_NUM_THREADS=1` (and `BENCH_THREADS=1` for the Python
//! script) compares the kernels' work independently of what else runs.

use candle_core::{Device, Tensor, Var};
use driveline::model::ops;
use std::time::Instant;

/// CPU time (user + system, all threads) of this process in ms, from /proc/self/stat.
fn process_cpu_ms() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    // After the command name: state is field 3, utime 14 and stime 15, in 1/100 s.
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks * 10.0
}

/// Current time in ms: wall clock, or with `BENCH_CPU=1` the process CPU time.
fn now_ms() -> f64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    if std::env::var("BENCH_CPU").is_ok_and(|v| v == "1") {
        process_cpu_ms()
    } else {
        START.get_or_init(Instant::now).elapsed().as_secs_f64() * 1e3
    }
}

/// Runs `f` (which returns the ms it measured) `runs` times after one warm-up (unless `runs` is
/// 1): the median, or with `BENCH_CPU=1` the mean (CPU time is counted in 10 ms ticks).
fn sample(runs: usize, mut f: impl FnMut() -> f64) -> f64 {
    if runs > 1 {
        f();
    }
    let mut t: Vec<f64> = (0..runs).map(|_| f()).collect();
    if std::env::var("BENCH_CPU").is_ok_and(|v| v == "1") {
        return t.iter().sum::<f64>() / runs as f64;
    }
    t.sort_by(f64::total_cmp);
    t[runs / 2]
}

/// Forward ms, and backward ms of `sum(f(x) * gy)` minus, in the same run, the backward of the
/// same loss on a leaf of the output's shape (PyTorch's `y.backward(gy)` has no such cost).
fn fwd_bwd_ms(runs: usize, gy: &Tensor, f: impl Fn() -> Tensor) -> (f64, f64) {
    let y0 = Var::from_tensor(&f().detach()).unwrap();
    let fwd = sample(runs, || {
        let t0 = now_ms();
        f();
        now_ms() - t0
    });
    let bwd = sample(runs, || {
        let y = f();
        let t0 = now_ms();
        (y * gy).unwrap().sum_all().unwrap().backward().unwrap();
        let t1 = now_ms();
        (y0.as_tensor() * gy)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        (t1 - t0) - (now_ms() - t1)
    });
    (fwd, bwd)
}

fn bench(name: &str, x: (usize, usize, usize, usize), o: usize, k: usize, s: usize, p: usize) {
    bench_dilated(name, x, o, k, s, p, 1, true)
}

/// [`bench`] with a dilation; `candle`: also time Candle's conv2d (seconds per backward).
#[allow(clippy::too_many_arguments)]
fn bench_dilated(
    name: &str,
    x: (usize, usize, usize, usize),
    o: usize,
    k: usize,
    s: usize,
    p: usize,
    d: usize,
    candle: bool,
) {
    let dev = Device::Cpu;
    let xv = Var::randn(0f32, 1.0, x, &dev).unwrap();
    let wv = Var::randn(0f32, 0.05, (o, x.1, k, k), &dev).unwrap();
    let ours = |x: &Tensor, w: &Tensor| ops::conv2d(x, w, None, s, p, d).unwrap();
    let theirs = |x: &Tensor, w: &Tensor| x.conv2d(w, p, s, d, 1).unwrap();
    let y = ours(&xv, &wv);
    let diff = (&y - theirs(&xv, &wv))
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-3);
    let gy = Tensor::randn(0f32, 1.0, y.dims(), &dev).unwrap();
    type Conv<'a> = &'a dyn Fn(&Tensor, &Tensor) -> Tensor;
    let impls: [(&str, Conv); 2] = [("ours", &ours), ("candle", &theirs)];
    for (label, f) in impls.into_iter().take(if candle { 2 } else { 1 }) {
        // Candle's backward takes seconds: one timed run is enough to show the gap.
        let runs = if label == "ours" { 5 } else { 1 };
        let (fwd, bwd) = fwd_bwd_ms(runs, &gy, || f(&xv, &wv));
        println!("{name} {label:>6}: forward {fwd:7.1} ms  backward {bwd:7.1} ms");
    }
}

fn bench_batchnorm(x: (usize, usize, usize, usize)) {
    let dev = Device::Cpu;
    let var = |t: Tensor| Var::from_tensor(&t).unwrap();
    let bn = ops::BatchNorm2d {
        weight: var(Tensor::ones(x.1, candle_core::DType::F32, &dev).unwrap()),
        bias: var(Tensor::zeros(x.1, candle_core::DType::F32, &dev).unwrap()),
        running_mean: var(Tensor::zeros(x.1, candle_core::DType::F32, &dev).unwrap()),
        running_var: var(Tensor::ones(x.1, candle_core::DType::F32, &dev).unwrap()),
        momentum: 0.1,
        eps: 1e-5,
    };
    let xv = Var::randn(0f32, 1.0, x, &dev).unwrap();
    let gy = Tensor::randn(0f32, 1.0, x, &dev).unwrap();
    let (fwd, bwd) = fwd_bwd_ms(5, &gy, || bn.forward(&xv, true).unwrap());
    println!("batchnorm train {x:?}   ours: forward {fwd:7.1} ms  backward {bwd:7.1} ms");
}

#[test]
#[ignore = "timing, run on demand"]
fn bench_conv2d() {
    bench("3x3 256->256 64x64 n2", (2, 256, 64, 64), 256, 3, 1, 1);
    bench("1x1 256->1024 64x64 n2", (2, 256, 64, 64), 1024, 1, 1, 0);
    bench("7x7/2 3->64 256px n2", (2, 3, 256, 256), 64, 7, 2, 3);
    bench_batchnorm((2, 256, 64, 64));
}

/// ASPP's dilated branches in the DeepLabV3-R50 step at 256 px (batch 2, 32×32 map), where the
/// tap plan applies, beside the 1×1 branch of the same shape.
#[test]
#[ignore = "timing, run on demand"]
fn bench_aspp() {
    for rate in [12, 24, 36] {
        let name = format!("ASPP 3x3 2048->256 32x32 n2 rate {rate}");
        bench_dilated(&name, (2, 2048, 32, 32), 256, 3, 1, rate, rate, false);
    }
    bench_dilated(
        "ASPP 1x1 2048->256 32x32 n2",
        (2, 2048, 32, 32),
        256,
        1,
        1,
        0,
        1,
        false,
    );
}
