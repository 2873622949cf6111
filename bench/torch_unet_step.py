"""PyTorch reference for `driveline bench train-step --arch unet --loss ce+dice`: one training
step (forward, CE + soft Dice as in unet_ref.py, backward, Adam) of the U-Net of
../shared/bench/unet_ref.py (imported from there) on random crops. Prints one JSON line with
the median and minimum over --steps (after 2 warm-up steps) and the peak RSS.

  python bench/torch_unet_step.py --ref ../shared/bench/unet_ref.py --imgsz 96 --batch 16
"""
import argparse, importlib.util, json, resource, time
import torch, torch.nn.functional as F


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ref", default="../shared/bench/unet_ref.py")
    p.add_argument("--imgsz", type=int, default=96)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=2e-3)
    a = p.parse_args()
    spec = importlib.util.spec_from_file_location("unet_ref", a.ref)
    ref = importlib.util.module_from_spec(spec); spec.loader.exec_module(ref)
    torch.manual_seed(0)
    m = ref.UNet(); m.train()
    opt = torch.optim.Adam(m.parameters(), lr=a.lr)
    x = torch.randn(a.batch, 3, a.imgsz, a.imgsz)
    y = (torch.rand(a.batch, a.imgsz, a.imgsz) < 0.1).long()
    times = []
    for _ in range(a.steps + 2):
        t0 = time.perf_counter()
        logits = m(x); pr = logits.softmax(1)[:, 1]; t = (y == 1).float()
        loss = F.cross_entropy(logits, y) + 1 - (2 * (pr * t).sum() + 1) / (pr.sum() + t.sum() + 1)
        opt.zero_grad(); loss.backward(); opt.step()
        times.append(time.perf_counter() - t0)
    t = sorted(times[2:])
    print(json.dumps({"bench": "train_step", "arch": "unet", "imgsz": a.imgsz, "batch": a.batch,
                      "threads": torch.get_num_threads(), "median_s": t[len(t) // 2], "min_s": t[0],
                      "peak_mem_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}))


if __name__ == "__main__":
    main()
