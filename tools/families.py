"""Other model families in experiments/unet_native.toml's recipe, in PyTorch (run by hand; needs
PyTorch and OpenCV): a cheap way to learn whether a family is worth porting to Candle before
porting it.

    /tmp/tv/bin/python tools/families.py --model unet|fr|iter [--widths 16,32,64,128] \
        [--minutes 18] [--seed 0] --out PRED_DIR

The recipe is unet_native's: CLAHE (OpenCV's createCLAHE(2.0, (8, 8)) per channel) then
per-image standardisation (one mean and deviation over the three channels, where driveline
takes them per channel), random 96 px crops with flips and 90-degree rotations, batch 16,
cross-entropy with vessel pixels weighted 1.5 plus the soft Dice loss of the vessel class, Adam
2e-3 decaying linearly to 5 % over the time budget, whole-image prediction averaged over the 8
rotations/mirrors, threshold 0.5, F1 pooled inside the FOV of the valid images 25, 26, 35, 40
(their probability maps are written to PRED_DIR). With --model unet it reproduces driveline's
recipe to within 0.0015 F1 at the same time budget (session 16: 0.8194 in 18 min against
driveline's 0.8208), so the other models' rows compare with it, not with driveline's.

- unet: the recipe's U-Net (torch's copy of src/model/unet.rs).
- fr: a full-resolution grid after FR-UNet (Liu et al., JBHI 2022) in its simplest form: the
  full-resolution row runs through all 2D+1 columns while deeper rows open and close (a diamond);
  each node fuses its row's previous node with the neighbours above (strided 3x3 convolution)
  and below (2x2 transposed convolution).
- iter: IterNet's refinement (Li et al., WACV 2020) with one pass: a 3-level mini U-Net reads
  the U-Net's last features with its first level's (the dense skip) and predicts again; both
  outputs are trained, the last one is scored.
"""
import argparse, json, os, time, random
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F, cv2
from PIL import Image

def cbr(i, o):
    return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]
def block(i, o):
    return nn.Sequential(*cbr(i, o), *cbr(o, o))

class UNet(nn.Module):
    def __init__(self, c=(16, 32, 64, 128)):
        super().__init__()
        self.downs = nn.ModuleList([block(3 if i == 0 else c[i - 1], c[i]) for i in range(len(c))])
        self.ups = nn.ModuleList([nn.ConvTranspose2d(c[i], c[i - 1], 2, stride=2) for i in range(len(c) - 1, 0, -1)])
        self.dec = nn.ModuleList([block(2 * c[i - 1], c[i - 1]) for i in range(len(c) - 1, 0, -1)])
        self.head = nn.Conv2d(c[0], 2, 1)
    def forward(self, x):
        skips = []
        for i, d in enumerate(self.downs):
            x = d(x)
            if i < len(self.downs) - 1: skips.append(x); x = F.max_pool2d(x, 2)
        for up, dec in zip(self.ups, self.dec):
            x = dec(torch.cat([up(x), skips.pop()], 1))
        return self.head(x)

class FRNet(nn.Module):
    """Columns j = 0..2D; column j holds the scales i <= min(j, 2D - j); node (i, j) =
    block(cat(node(i, j-1), down(node(i-1, j-1)), up(node(i+1, j-1)))), from those that exist.
    The full-resolution row runs through every column; the head reads its last node."""
    def __init__(self, c=(16, 32, 64, 128)):
        super().__init__()
        D = len(c) - 1; self.D = D
        self.nodes = nn.ModuleDict(); self.ups = nn.ModuleDict(); self.downs = nn.ModuleDict()
        for j in range(2 * D + 1):
            for i in range(min(j, 2 * D - j) + 1):
                cin = 0
                if j == 0: cin = 3
                else:
                    if i <= min(j - 1, 2 * D - j + 1): cin += c[i]
                    if i >= 1 and i - 1 <= min(j - 1, 2 * D - j + 1):
                        cin += c[i]; self.downs[f"{i}_{j}"] = nn.Sequential(nn.Conv2d(c[i - 1], c[i], 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c[i]), nn.ReLU(inplace=True))
                    if i + 1 <= min(j - 1, 2 * D - j + 1):
                        cin += c[i]; self.ups[f"{i}_{j}"] = nn.ConvTranspose2d(c[i + 1], c[i], 2, stride=2)
                self.nodes[f"{i}_{j}"] = block(cin, c[i])
        self.head = nn.Conv2d(c[0], 2, 1)
    def forward(self, x):
        D = self.D; prev = {0: self.nodes["0_0"](x)}
        for j in range(1, 2 * D + 1):
            cur = {}
            for i in range(min(j, 2 * D - j) + 1):
                ins = []
                if i in prev: ins.append(prev[i])
                if f"{i}_{j}" in self.downs: ins.append(self.downs[f"{i}_{j}"](prev[i - 1]))
                if f"{i}_{j}" in self.ups: ins.append(self.ups[f"{i}_{j}"](prev[i + 1]))
                cur[i] = self.nodes[f"{i}_{j}"](torch.cat(ins, 1))
            prev = cur
        return self.head(prev[0])

class IterNet(nn.Module):
    """A U-Net, then `iters` passes of one shared 3-level mini U-Net over the previous pass's last
    features concatenated with the first encoder level's (the dense skip); every pass has its own
    head output, all trained, the last one predicts."""
    def __init__(self, c=(16, 32, 64, 128), iters=1):
        super().__init__()
        self.base = UNet(c); self.iters = iters; c0 = c[0]
        self.fuse = block(2 * c0, c0)
        self.mini = UNet((c0, 2 * c0, 4 * c0)); self.mini.downs[0] = block(c0, c0)
        self.mini_head = self.mini.head; self.mini.head = nn.Identity()
    def feats(self, u, x):
        skips = []
        for i, d in enumerate(u.downs):
            x = d(x)
            if i < len(u.downs) - 1: skips.append(x); x = F.max_pool2d(x, 2)
        first = skips[0] if skips else x
        for up, dec in zip(u.ups, u.dec):
            x = dec(torch.cat([up(x), skips.pop()], 1))
        return x, first
    def forward(self, x, all_outputs=False):
        f, first = self.feats(self.base, x); outs = [self.base.head(f)]
        for _ in range(self.iters):
            f, _ = self.feats(self.mini, self.fuse(torch.cat([f, first], 1))); outs.append(self.mini_head(f))
        return outs if all_outputs else outs[-1]

def load(d, split):
    out = []
    for f in sorted(os.listdir(os.path.join(d, split, "images"))):
        i = f.split("_")[0]
        img = np.asarray(Image.open(os.path.join(d, split, "images", f)).convert("RGB"))
        cl = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
        img = np.stack([cl.apply(np.ascontiguousarray(img[..., k])) for k in range(3)], -1).astype(np.float32) / 255.0
        gp = os.path.join(d, split, "1st_manual", f"{i}_manual1.gif")
        gt = (np.asarray(Image.open(gp)) > 127).astype(np.int64) if os.path.exists(gp) else None
        out.append((i, (img - img.mean()) / (img.std() + 1e-6), gt))
    return out

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="data/DRIVE"); p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, default=18); p.add_argument("--crop", type=int, default=96)
    p.add_argument("--batch", type=int, default=16); p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--model", default="unet"); p.add_argument("--widths", default="16,32,64,128")
    p.add_argument("--seed", type=int, default=0); p.add_argument("--valid-ids", default="25,26,35,40")
    a = p.parse_args()
    torch.set_num_threads(2); torch.manual_seed(a.seed); random.seed(a.seed)
    train = load(a.data, "training")
    vids = set(a.valid_ids.split(","))
    valid = [t for t in train if t[0] in vids]; train = [t for t in train if t[0] not in vids]
    c = tuple(int(v) for v in a.widths.split(","))
    m = {"unet": UNet, "fr": FRNet, "iter": IterNet}[a.model](c); opt = torch.optim.Adam(m.parameters(), lr=a.lr)
    wts = torch.tensor([1.0, 1.5])
    t0 = time.time(); it = 0; budget = a.minutes * 60
    while time.time() - t0 < budget:
        xs, ys = [], []
        for _ in range(a.batch):
            _, img, gt = random.choice(train)
            y0 = random.randrange(img.shape[0] - a.crop); x0 = random.randrange(img.shape[1] - a.crop)
            x = img[y0:y0 + a.crop, x0:x0 + a.crop]; y = gt[y0:y0 + a.crop, x0:x0 + a.crop]
            if random.random() < 0.5: x, y = x[:, ::-1], y[:, ::-1]
            if random.random() < 0.5: x, y = x[::-1], y[::-1]
            k = random.randrange(4); x, y = np.rot90(x, k), np.rot90(y, k)
            xs.append(torch.from_numpy(x.transpose(2, 0, 1).copy())); ys.append(torch.from_numpy(y.copy()))
        x, y = torch.stack(xs), torch.stack(ys)
        for g in opt.param_groups: g["lr"] = a.lr * max(0.05, 1 - (time.time() - t0) / budget)
        outs = m(x, all_outputs=True) if a.model == "iter" else [m(x)]; t = (y == 1).float(); loss = 0
        for logits in outs:
            pr = logits.softmax(1)[:, 1]
            loss = loss + (F.cross_entropy(logits, y, weight=wts) + 1 - (2 * (pr * t).sum() + 1) / (pr.sum() + t.sum() + 1)) / len(outs)
        opt.zero_grad(); loss.backward(); opt.step(); it += 1
        if it % 100 == 0: print(json.dumps({"iter": it, "loss": round(loss.item(), 4), "s": round(time.time() - t0)}), flush=True)
    m.eval(); os.makedirs(a.out, exist_ok=True)
    def predict(img):
        h, w = img.shape[:2]; H, W = (h + 15) // 16 * 16, (w + 15) // 16 * 16
        x = torch.from_numpy(np.pad(img, ((0, H - h), (0, W - w), (0, 0)), mode="reflect").transpose(2, 0, 1).copy())[None]
        acc = 0
        for k in range(4):
            for fl in (False, True):
                xx = torch.rot90(x, k, (2, 3)); xx = xx.flip(3) if fl else xx
                pp = m(xx).softmax(1)[:, 1:2]
                pp = pp.flip(3) if fl else pp
                acc = acc + torch.rot90(pp, -k, (2, 3))
        return (acc[0, 0] / 8)[:h, :w].numpy()
    tp = fp = fn = tn = 0
    with torch.no_grad():
        for i, img, gt in valid:
            fov = np.asarray(Image.open(os.path.join(a.data, "training", "mask", f"{i}_training_mask.gif")).convert("L")) > 127
            pm = predict(img)
            Image.fromarray((pm * 255).round().astype(np.uint8)).save(os.path.join(a.out, f"{i}_training_prob.png"))
            b = pm[fov] >= 0.5; g = gt[fov] == 1
            tp += int((b & g).sum()); fp += int((b & ~g).sum()); fn += int((~b & g).sum()); tn += int((~b & ~g).sum())
    print(json.dumps({"model": a.model, "widths": c, "iters": it, "train_s": round(time.time() - t0), "valid_f1": round(2 * tp / (2 * tp + fp + fn), 4),
                      "valid_se": round(tp / (tp + fn), 4), "valid_sp": round(tn / (tn + fp), 4),
                      "params": sum(q.numel() for q in m.parameters())}), flush=True)

if __name__ == "__main__":
    main()
