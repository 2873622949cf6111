"""Whole-model parity of driveline's DeepLabV3 with torchvision (run by hand; needs PyTorch).

    /tmp/tv/bin/python tools/parity.py [--size 224x256] [--backbones resnet50,resnet101]

For each backbone: builds torchvision deeplabv3_<backbone>(num_classes=2, aux_loss=False) with
random init, sets realistic BatchNorm running statistics with one train-mode forward
(momentum=None: cumulative average) on a random batch, switches to eval and saves its
state_dict + a random input. Then `cargo run --example parity` loads those weights into
driveline (through load_pretrained) and runs the forward twice, in float32 and in float64, and
writes its logits (the float32 run also exports a driveline checkpoint).

float64 (the acceptance check): torchvision's model.double() on the same weights and input
(f32 values widened exactly) against our f64 forward. With rounding error out of the way, both
must compute the same function: max|ours-ref| / max|ref| of the logits and of the head must be
below TOLERANCE (1e-4); the script prints PASS/FAIL per backbone and exits 1 on a failure.

float32 (informative): the same relative errors, plus the relative L2 error ||ours-ref||/||ref||,
of the classifier output at stride 8 (`head`), of the upsampled logits, and of our head
upsampled by PyTorch (isolates ops::resize_bilinear). `torch_f32_vs_f64_*` is PyTorch's own
float32 error against its float64 forward: the scale that our float32 errors should be compared
with. The exported file is loaded into a fresh torchvision model with
load_state_dict(strict=True), whose logits must equal the originals.
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


TOLERANCE = 1e-4


def rel(a, b):
    """max|a-b| / max|b|"""
    return ((a - b).abs().max() / b.abs().max()).item()


def rel_l2(a, b):
    """||a-b|| / ||b|| (Frobenius), accumulated in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


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
        # The same network in float64 (weights and input widened exactly): the reference for our
        # f64 forward, and PyTorch's own float32 rounding error, the yardstick for our f32 one.
        m64 = copy.deepcopy(m).double()
        x64 = x.double()
        ref64 = m64(x64)["out"]
        head64 = m64.classifier(m64.backbone(x64)["out"])
        del m64
    paths = {k: os.path.join(tmp, f"{backbone}_{k}.safetensors")
             for k in ("weights", "input", "out32", "out64", "export")}
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, paths["weights"])
    save_file({"x": x}, paths["input"])
    t0 = time.time()
    info = {}
    for dtype, out, export in (("f32", paths["out32"], paths["export"]), ("f64", paths["out64"], "-")):
        proc = subprocess.run(["cargo", "run", "-q", "--example", "parity", "--", backbone, paths["weights"],
                               paths["input"], out, export, dtype], cwd=ROOT, check=True,
                              capture_output=True, text=True)
        info[dtype] = json.loads(proc.stdout.strip().splitlines()[-1])
    ours = load_file(paths["out32"])
    ours64 = load_file(paths["out64"])
    assert ours64["logits"].dtype == torch.float64, ours64["logits"].dtype
    fresh = build(backbone).eval()
    fresh.load_state_dict(load_file(paths["export"]), strict=True)
    with torch.no_grad():
        reloaded = fresh(x)["out"]
    with safe_open(paths["export"], "pt") as f:
        meta = json.loads(f.metadata()["driveline"])
    f64 = {
        "rel_err_logits": rel(ours64["logits"], ref64),
        "rel_err_head": rel(ours64["head"], head64),
        "rel_l2_logits": rel_l2(ours64["logits"], ref64),
        "rel_l2_head": rel_l2(ours64["head"], head64),
        "rust_forward_s": info["f64"]["forward_s"],
    }
    f64["pass"] = max(f64["rel_err_logits"], f64["rel_err_head"]) < TOLERANCE
    return {
        "backbone": backbone,
        "input": [h, w],
        "params_torch": sum(p.numel() for p in m.parameters()),
        "params_ours": info["f32"]["params"],
        "f64": f64,
        "f32": {
            "rel_err_head": rel(ours["head"], ref_head),
            "rel_err_logits": rel(ours["logits"], ref),
            "rel_l2_head": rel_l2(ours["head"], ref_head),
            "rel_l2_logits": rel_l2(ours["logits"], ref),
            "torch_f32_vs_f64_head": rel(ref_head, head64),
            "torch_f32_vs_f64_logits": rel(ref, ref64),
            "torch_f32_vs_f64_l2_logits": rel_l2(ref, ref64),
            # Our float32 error against the float64 reference (the same scale as the line above).
            "ours_f32_vs_f64_logits": rel(ours["logits"], ref64),
            # Isolates ops::resize_bilinear: our head output upsampled by PyTorch.
            "rel_err_logits_torch_resize": rel(torch.nn.functional.interpolate(
                ours["head"], size=(h, w), mode="bilinear", align_corners=False), ref),
            "argmax_agreement": (ours["logits"].argmax(1) == ref.argmax(1)).float().mean().item(),
            "rust_forward_s": info["f32"]["forward_s"],
        },
        "strict_reload_max_abs_diff": (reloaded - ref).abs().max().item(),
        "export_meta_arch": meta["model"]["arch"],
        "wall_s": round(time.time() - t0, 1),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="224x256", help="HxW of the input")
    p.add_argument("--backbones", default="resnet50,resnet101")
    a = p.parse_args()
    h, w = map(int, a.size.split("x"))
    subprocess.run(["cargo", "build", "-q", "--example", "parity"], cwd=ROOT, check=True)
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for b in a.backbones.split(","):
            r = run(b, h, w, tmp)
            print(json.dumps(r), flush=True)
            e = r["f64"]
            verdict = "PASS" if e["pass"] else "FAIL"
            print(f"{verdict} {b} float64: max|d|/max|ref| logits {e['rel_err_logits']:.3e}, "
                  f"head {e['rel_err_head']:.3e} (tolerance {TOLERANCE:g}); float32: logits "
                  f"{r['f32']['rel_err_logits']:.3e} (torchvision's own f32 error "
                  f"{r['f32']['torch_f32_vs_f64_logits']:.3e}, ours vs f64 {r['f32']['ours_f32_vs_f64_logits']:.3e}), "
                  f"rel L2 {r['f32']['rel_l2_logits']:.3e}",
                  flush=True)
            if not e["pass"]:
                failed.append(b)
    if failed:
        raise SystemExit(f"FAIL: {', '.join(failed)}")


if __name__ == "__main__":
    main()
