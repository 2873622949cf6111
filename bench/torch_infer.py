"""PyTorch reference for `driveline bench infer`: torchvision DeepLabV3-ResNet50 (random weights,
2 classes) in eval mode on one DRIVE image: resize 565x584 -> IMGSZ, forward, softmax, resize
back. Prints one JSON line with the median and minimum over --steps runs (after one warm-up)
and the peak RSS.

  python bench/torch_infer.py --image ../shared/data/DRIVE/test/images/01_test.tif --imgsz 768
"""
import argparse, json, resource, time
import numpy as np
import torch, torch.nn.functional as F
from PIL import Image
from torchvision.models.segmentation import deeplabv3_resnet50

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--image", default="")
    p.add_argument("--imgsz", type=int, default=768)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    torch.manual_seed(0)
    if a.image:
        img = np.asarray(Image.open(a.image).convert("RGB"), dtype=np.float32) / 255.0
    else:
        img = np.random.default_rng(1).random((584, 565, 3), dtype=np.float32)
    h, w = img.shape[:2]
    x = torch.from_numpy(((img - MEAN) / STD).transpose(2, 0, 1).copy())[None]
    model = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=2, aux_loss=False).eval()

    def run():
        with torch.inference_mode():
            xi = F.interpolate(x, size=(a.imgsz, a.imgsz), mode="bilinear", align_corners=False)
            p = model(xi)["out"].softmax(1)
            return F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)

    run()
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter(); run(); times.append(time.perf_counter() - t0)
    t = sorted(times)
    print(json.dumps({"bench": "infer", "imgsz": a.imgsz, "threads": torch.get_num_threads(),
                      "median_s": t[len(t) // 2], "min_s": t[0],
                      "peak_mem_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}))


if __name__ == "__main__":
    main()
