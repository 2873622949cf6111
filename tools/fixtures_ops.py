"""Generates the PyTorch reference fixtures for tests/ops_fixtures.rs.

For each op: inputs, a fixed upstream gradient `gy`, PyTorch's output and input gradients
(and for BatchNorm the updated running statistics), saved as small f32 safetensors files in
tests/fixtures/ops_*.safetensors.

Run from the repository root: /tmp/tv/bin/python tools/fixtures_ops.py
"""
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def grads(f, inputs, prefix):
    """Output of f(*inputs) and the gradients of sum(f * gy) w.r.t. each input."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    y = f(*leaves)
    gy = torch.randn_like(y)
    y.backward(gy)
    out = {f"{prefix}.y": y.detach(), f"{prefix}.gy": gy}
    for i, t in enumerate(leaves):
        out[f"{prefix}.g{i}"] = t.grad
    return out


def save(name, tensors):
    tensors = {k: v.detach().contiguous().float() for k, v in tensors.items()}
    save_file(tensors, OUT / f"ops_{name}.safetensors")


def resize():
    t = {}
    for prefix, shape, size in [
        ("up", (1, 2, 5, 6), (11, 9)),
        ("down", (1, 2, 9, 7), (4, 3)),
        ("one", (1, 3, 1, 1), (4, 5)),
    ]:
        x = torch.randn(*shape)
        t[f"{prefix}.x"] = x
        t.update(grads(lambda x: F.interpolate(x, size=size, mode="bilinear", align_corners=False), [x], prefix))
    save("resize", t)


def maxpool():
    t = {}
    # The "ties" input has many equal values: it pins down PyTorch's first-maximum rule.
    for prefix, x, k, s, p in [
        ("k3s2p1", torch.randn(2, 3, 9, 8), 3, 2, 1),
        ("k2s2p0", torch.randn(1, 2, 6, 7), 2, 2, 0),
        ("ties", torch.randint(0, 3, (1, 2, 7, 7)).float(), 3, 2, 1),
    ]:
        t[f"{prefix}.x"] = x
        t.update(grads(lambda x: F.max_pool2d(x, k, s, p), [x], prefix))
    save("maxpool", t)


def batchnorm():
    x = torch.randn(2, 3, 4, 5) * 2 + 1
    w, b = torch.randn(3), torch.randn(3)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    t = {"x": x, "weight": w, "bias": b, "running_mean": rm, "running_var": rv}
    bn = torch.nn.BatchNorm2d(3, momentum=0.1, eps=1e-5)
    with torch.no_grad():
        bn.weight.copy_(w)
        bn.bias.copy_(b)
        bn.running_mean.copy_(rm)
        bn.running_var.copy_(rv)
    bn.train()
    xl = x.clone().requires_grad_()
    y = bn(xl)
    gy = torch.randn_like(y)
    y.backward(gy)
    t.update({
        "train.y": y.detach(), "train.gy": gy, "train.gx": xl.grad,
        "train.gweight": bn.weight.grad, "train.gbias": bn.bias.grad,
        "train.running_mean": bn.running_mean.clone(), "train.running_var": bn.running_var.clone(),
    })
    bn.eval()
    with torch.no_grad():
        t["eval.y"] = bn(x)  # with the running stats updated above
    save("batchnorm", t)


def conv():
    t = {}
    # (name, x shape, out channels, kernel, stride, padding, dilation)
    for prefix, shape, o, k, s, p, d in [
        ("k3s2p1", (2, 3, 7, 8), 4, 3, 2, 1, 1),
        ("k3d2p2", (1, 3, 7, 7), 4, 3, 1, 2, 2),
        ("k1s2", (2, 4, 7, 6), 3, 1, 2, 0, 1),
        ("k3d12p12", (1, 2, 5, 4), 3, 3, 1, 12, 12),
        ("k7s2p3", (1, 3, 11, 10), 2, 7, 2, 3, 1),
    ]:
        x, w, b = torch.randn(*shape), torch.randn(o, shape[1], k, k), torch.randn(o)
        t.update({f"{prefix}.x": x, f"{prefix}.w": w, f"{prefix}.b": b})
        t.update(grads(lambda x, w, b: F.conv2d(x, w, b, stride=s, padding=p, dilation=d), [x, w, b], prefix))
    save("conv", t)


if __name__ == "__main__":
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    resize()
    maxpool()
    batchnorm()
    conv()
    for f in sorted(OUT.glob("ops_*.safetensors")):
        print(f.name, f.stat().st_size)
