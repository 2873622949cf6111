"""Generate the PyTorch reference fixtures of the model tests (tests/model_parity.rs).

    /tmp/tv/bin/python tools/fixtures_model.py     # needs torch, torchvision, safetensors

Writes, under tests/fixtures/ (small, committed):
  deeplabv3_resnet50_keys.txt   torchvision deeplabv3_resnet50(num_classes=2, aux_loss=False)
                                state_dict: "key [shape]" per line, in order
  model_blocks.safetensors      ResNet blocks with reduced widths: `a` dilated Bottleneck(8, 4)
                                (dilation 2, downsample), `b` strided Bottleneck (stride 2,
                                downsample), `c` strided BasicBlock; eval and train outputs
  model_aspp.safetensors        ASPP(16, rates (2, 3, 5), out 8) alone (`aspp.`) and inside a
                                DeepLabHead-shaped head of width 8 (`head.`), eval and train
                                (train with dropout p = 0 so it is deterministic)
  model_unet.safetensors        unet_ref.py's U-Net, widths (4, 8, 16), eval and train
  model_unet.pth                its state_dict alone, saved by torch.save

Every module gets random weights *and* random BatchNorm statistics so that eval mode is not
the identity. Keys: `<prefix>.<state_dict key>` for weights, `<prefix>.x` input,
`<prefix>.y_eval`, `<prefix>.y_train`, and `<prefix>.after.<key>` for the BatchNorm buffers
after the train-mode forward.
"""
import copy
import os
import sys

import torch
import torch.nn as nn
from safetensors.torch import save_file
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1
from torchvision.models.segmentation import deeplabv3_resnet50
from torchvision.models.segmentation.deeplabv3 import ASPP

sys.path.insert(0, "/work/shared/bench")
from unet_ref import UNet  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")


def randomize(m, g):
    for name, t in m.state_dict().items():
        if t.dtype != torch.float32:
            continue
        if name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        elif name.endswith("running_mean") or name.endswith("bias"):
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)
        elif name.split(".")[-1] == "weight" and t.dim() == 1:  # BN gamma
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        else:
            t.copy_(torch.randn(t.shape, generator=g) * (2.0 / t[0].numel()) ** 0.5)


def record(out, prefix, m, x, g):
    randomize(m, g)
    for k, v in m.state_dict().items():
        out[f"{prefix}.{k}"] = v.clone().contiguous()
    out[f"{prefix}.x"] = x.clone().contiguous()
    m.eval()
    with torch.no_grad():
        out[f"{prefix}.y_eval"] = m(x).contiguous()
    t = copy.deepcopy(m).train()
    for mod in t.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    with torch.no_grad():
        out[f"{prefix}.y_train"] = t(x).contiguous()
    for k, v in t.state_dict().items():
        if "running" in k or "num_batches" in k:
            out[f"{prefix}.after.{k}"] = v.clone().contiguous()


def main():
    os.makedirs(OUT, exist_ok=True)
    g = torch.Generator().manual_seed(0)

    m = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=2, aux_loss=False)
    with open(os.path.join(OUT, "deeplabv3_resnet50_keys.txt"), "w") as f:
        for k, v in m.state_dict().items():
            f.write(f"{k} [{','.join(str(d) for d in v.shape)}]\n")

    blocks = {}
    ds = lambda i, o, s: nn.Sequential(conv1x1(i, o, s), nn.BatchNorm2d(o))  # noqa: E731
    x = torch.randn(2, 8, 7, 9, generator=g)
    record(blocks, "a", Bottleneck(8, 4, 1, ds(8, 16, 1), dilation=2), x, g)
    record(blocks, "b", Bottleneck(8, 4, 2, ds(8, 16, 2)), x, g)
    record(blocks, "c", BasicBlock(8, 4, 2, ds(8, 4, 2)), x, g)
    save_file(blocks, os.path.join(OUT, "model_blocks.safetensors"))

    aspp = {}
    x = torch.randn(2, 16, 7, 9, generator=g)
    record(aspp, "aspp", ASPP(16, [2, 3, 5], 8), x, g)
    head = nn.Sequential(ASPP(16, [2, 3, 5], 8), nn.Conv2d(8, 8, 3, padding=1, bias=False),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1))
    record(aspp, "head", head, x, g)
    save_file(aspp, os.path.join(OUT, "model_aspp.safetensors"))

    unet = {}
    record(unet, "unet", UNet((4, 8, 16)), torch.randn(2, 3, 16, 12, generator=g), g)
    save_file(unet, os.path.join(OUT, "model_unet.safetensors"))
    # The same U-Net weights as a PyTorch zip file, for the `.pth` reader of load_pretrained.
    sd = {k[len("unet."):]: v for k, v in unet.items()
          if k.startswith("unet.") and k.count(".") > 1 and ".after." not in k}
    torch.save(sd, os.path.join(OUT, "model_unet.pth"))

    for f in sorted(os.listdir(OUT)):
        if f.startswith("model_") or f.startswith("deeplabv3_"):
            print(f, os.path.getsize(os.path.join(OUT, f)))


if __name__ == "__main__":
    main()
