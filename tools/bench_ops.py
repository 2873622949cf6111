"""PyTorch timings for the shapes of tests/ops_bench.rs (median of 5 after a warm-up).

Run: /tmp/tv/bin/python tools/bench_ops.py
BENCH_CPU=1 reports the mean process CPU time per run instead of the wall-time median;
BENCH_THREADS=n sets torch's thread count (see tests/ops_bench.rs).
"""
import os
import time

import torch
import torch.nn.functional as F


def median_ms(f):
    f()
    if os.environ.get("BENCH_CPU") == "1":
        c0 = time.process_time()
        for _ in range(5):
            f()
        return (time.process_time() - c0) / 5 * 1e3
    ts = []
    for _ in range(5):
        s = time.perf_counter()
        f()
        ts.append((time.perf_counter() - s) * 1e3)
    return sorted(ts)[2]


def bench(name, x_shape, o, k, s, p):
    x = torch.randn(*x_shape, requires_grad=True)
    w = (torch.randn(o, x_shape[1], k, k) * 0.05).requires_grad_()
    gy = torch.randn_like(F.conv2d(x, w, stride=s, padding=p))

    def fwd():
        with torch.no_grad():
            F.conv2d(x, w, stride=s, padding=p)

    def both():
        x.grad = None
        w.grad = None
        F.conv2d(x, w, stride=s, padding=p).backward(gy)

    f = median_ms(fwd)
    t = median_ms(both)
    print(f"{name} {'torch':>6}: forward {f:7.1f} ms  backward {t - f:7.1f} ms")


def bench_bn(shape):
    x = torch.randn(*shape, requires_grad=True)
    bn = torch.nn.BatchNorm2d(shape[1]).train()
    gy = torch.randn(*shape)

    def fwd():
        with torch.no_grad():
            bn(x)

    def both():
        x.grad = None
        bn(x).backward(gy)

    f = median_ms(fwd)
    t = median_ms(both)
    print(f"batchnorm train {tuple(shape)}  torch: forward {f:7.1f} ms  backward {t - f:7.1f} ms")


if __name__ == "__main__":
    if "BENCH_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    bench("3x3 256->256 64x64 n2", (2, 256, 64, 64), 256, 3, 1, 1)
    bench("1x1 256->1024 64x64 n2", (2, 256, 64, 64), 1024, 1, 1, 0)
    bench("7x7/2 3->64 256px n2", (2, 3, 256, 256), 64, 7, 2, 3)
    bench_bn((2, 256, 64, 64))
