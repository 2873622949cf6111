"""Whole-model parity of driveline's DeepLabV3 with torchvision (run by hand; needs PyTorch).

    /tmp/tv/bin/python tools/parity.py [--size 224x256] [--backbones resnet50,resnet101]

For each backbone: builds torchvision deeplabv3_<backbone>(num_classes=2, aux_loss=False) with
random init, sets realistic BatchNorm running statistics with one train-mode forward
(momentum=None: cumulative average) on a random batch, switches to eval and saves its
state_dict + a random input + its logits. Then `cargo run --example parity` loads those weights
into driveline (through load_pretrained), runs the forward, writes its logits and exports a
driveline checkpoint. Compared: max relative error (max|a-b| / max|b|) of the classifier output
at stride 8 (`head`), of the upsampled logits, and of our head upsampled by PyTorch (isolates
ops::resize_bilinear), and the exported file is loaded into a fresh
torchvision model with load_state_dict(strict=True), whose logits must equal the originals.
`torch_f32_vs_f64_head` is PyTorch's own float32 error against a float64 forward: the scale
that `rel_err_head` should be compared with.
"""
import argparse
import copy
import json
import os
import subprocess
import tempfile
import time

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torchvision.models import segmentation

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def build(backbone):
    fn = getattr(segmentation, f"deeplabv3_{backbone}")
    return fn(weights=None, weights_backbone=None, num_classes=2, aux_loss=False)


def run(backbone, h, w, tmp):
    torch.manual_seed(0)
    m = build(backbone)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.momentum = None
    m.train()
    with torch.no_grad():
        m(torch.randn(2, 3, h, w))
    m.eval()
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        ref = m(x)["out"]
        ref_head = m.classifier(m.backbone(x)["out"])
        # PyTorch's own float32 rounding error, the yardstick for ours.
        m64 = copy.deepcopy(m).double()
        head64 = m64.classifier(m64.backbone(x.double())["out"]).float()
        del m64
    paths = {k: os.path.join(tmp, f"{backbone}_{k}.safetensors") for k in ("weights", "input", "out", "export")}
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, paths["weights"])
    save_file({"x": x}, paths["input"])
    t0 = time.time()
    proc = subprocess.run(["cargo", "run", "-q", "--example", "parity", "--", backbone, paths["weights"],
                           paths["input"], paths["out"], paths["export"]], cwd=ROOT, check=True,
                          capture_output=True, text=True)
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    ours = load_file(paths["out"])
    fresh = build(backbone).eval()
    fresh.load_state_dict(load_file(paths["export"]), strict=True)
    with torch.no_grad():
        reloaded = fresh(x)["out"]
    with safe_open(paths["export"], "pt") as f:
        meta = json.loads(f.metadata()["driveline"])
    return {
        "backbone": backbone,
        "input": [h, w],
        "params_torch": sum(p.numel() for p in m.parameters()),
        "params_ours": info["params"],
        "rel_err_head": rel(ours["head"], ref_head),
        "torch_f32_vs_f64_head": rel(ref_head, head64),
        "rel_err_logits": rel(ours["logits"], ref),
        # Isolates ops::resize_bilinear: our head output upsampled by PyTorch.
        "rel_err_logits_torch_resize": rel(torch.nn.functional.interpolate(
            ours["head"], size=(h, w), mode="bilinear", align_corners=False), ref),
        "argmax_agreement": (ours["logits"].argmax(1) == ref.argmax(1)).float().mean().item(),
        "strict_reload_max_abs_diff": (reloaded - ref).abs().max().item(),
        "export_meta_arch": meta["model"]["arch"],
        "rust_forward_s": info["forward_s"],
        "wall_s": round(time.time() - t0, 1),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="224x256", help="HxW of the input")
    p.add_argument("--backbones", default="resnet50,resnet101")
    a = p.parse_args()
    h, w = map(int, a.size.split("x"))
    subprocess.run(["cargo", "build", "-q", "--example", "parity"], cwd=ROOT, check=True)
    with tempfile.TemporaryDirectory() as tmp:
        for b in a.backbones.split(","):
            print(json.dumps(run(b, h, w, tmp)), flush=True)


if __name__ == "__main__":
    main()
