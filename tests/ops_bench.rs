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

/// Median wall time in ms of `f` over `runs` runs (after one warm-up unless `runs` is 1), or with
/// `BENCH_CPU=1` the mean process CPU time per run.
fn median_ms(runs: usize, mut f: impl FnMut()) -> f64 {
    if runs > 1 {
        f();
    }
    if std::env::var("BENCH_CPU").is_ok_and(|v| v == "1") {
        let c0 = process_cpu_ms();
        for _ in 0..runs {
            f();
        }
        return (process_cpu_ms() - c0) / runs as f64;
    }
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[runs / 2]
}

fn bench(name: &str, x: (usize, usize, usize, usize), o: usize, k: usize, s: usize, p: usize) {
    let dev = Device::Cpu;
    let xv = Var::randn(0f32, 1.0, x, &dev).unwrap();
    let wv = Var::randn(0f32, 0.05, (o, x.1, k, k), &dev).unwrap();
    let ours = |x: &Tensor, w: &Tensor| ops::conv2d(x, w, None, s, p, 1).unwrap();
    let candle = |x: &Tensor, w: &Tensor| x.conv2d(w, p, s, 1, 1).unwrap();
    let y = ours(&xv, &wv);
    let diff = (&y - candle(&xv, &wv))
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-3);
    let gy = Tensor::randn(0f32, 1.0, y.dims(), &dev).unwrap();
    // The backward below is that of `sum(y * gy)`; time that loss alone to subtract it, since
    // PyTorch's `y.backward(gy)` has no such cost.
    let y0 = Var::from_tensor(&y).unwrap();
    let loss_ms = median_ms(5, || {
        (y0.as_tensor() * &gy)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
    });
    type Conv<'a> = &'a dyn Fn(&Tensor, &Tensor) -> Tensor;
    let impls: [(&str, Conv); 2] = [("ours", &ours), ("candle", &candle)];
    for (label, f) in impls {
        // Candle's backward takes seconds: one timed run is enough to show the gap.
        let runs = if label == "ours" { 5 } else { 1 };
        let fwd = median_ms(runs, || {
            f(&xv, &wv);
        });
        let total = median_ms(runs, || {
            let y = f(&xv, &wv);
            (y * &gy).unwrap().sum_all().unwrap().backward().unwrap();
        });
        println!(
            "{name} {label:>6}: forward {fwd:7.1} ms  backward {:7.1} ms \
             (loss overhead {loss_ms:.1} ms subtracted)",
            total - fwd - loss_ms
        );
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
    let y0 = Var::from_tensor(&gy).unwrap();
    let loss_ms = median_ms(5, || {
        (y0.as_tensor() * &gy)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
    });
    let fwd = median_ms(5, || {
        bn.forward(&xv, true).unwrap();
    });
    let total = median_ms(5, || {
        let y = bn.forward(&xv, true).unwrap();
        (y * &gy).unwrap().sum_all().unwrap().backward().unwrap();
    });
    println!(
        "batchnorm train {x:?}   ours: forward {fwd:7.1} ms  backward {:7.1} ms \
         (loss overhead {loss_ms:.1} ms subtracted)",
        total - fwd - loss_ms
    );
}

#[test]
#[ignore = "timing, run on demand"]
fn bench_conv2d() {
    bench("3x3 256->256 64x64 n2", (2, 256, 64, 64), 256, 3, 1, 1);
    bench("1x1 256->1024 64x64 n2", (2, 256, 64, 64), 1024, 1, 1, 0);
    bench("7x7/2 3->64 256px n2", (2, 3, 256, 256), 64, 7, 2, 3);
    bench_batchnorm((2, 256, 64, 64));
}
