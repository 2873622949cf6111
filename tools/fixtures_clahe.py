"""Generates tests/fixtures/clahe.safetensors: OpenCV's CLAHE outputs for src/data/clahe.rs.

Each case is an 8-bit plane `<name>.src` and OpenCV's `createCLAHE(clip, (tx, ty)).apply(src)`
as `<name>.out`; the metadata maps each name to "tx,ty,clip".

Run from the repository root (OpenCV from PyPI: pip install opencv-python-headless):
    /tmp/tv/bin/python tools/fixtures_clahe.py
"""
from pathlib import Path

import cv2
import numpy as np
from safetensors.numpy import save_file

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "clahe.safetensors"

rng = np.random.default_rng(0)


def gradient(h, w):
    """A dim, smooth illumination gradient with noise and thin dark lines, like a fundus."""
    y, x = np.mgrid[0:h, 0:w]
    v = 40 + 60 * x / w + 30 * np.sin(y / 7.0) + rng.normal(0, 4, (h, w))
    v[::9, :] -= 25
    return np.clip(v, 0, 255).astype(np.uint8)


cases = {
    # name: (image, tiles_x, tiles_y, clip)
    "noise_divisible": (rng.integers(0, 256, (48, 64), dtype=np.uint8), 8, 8, 2.0),
    "noise_ragged": (rng.integers(0, 256, (38, 45), dtype=np.uint8), 4, 3, 2.0),
    "gradient_ragged": (gradient(73, 71), 8, 8, 2.0),
    "gradient_one_axis_divides": (gradient(40, 37), 4, 5, 3.0),
    "gradient_no_clip": (gradient(30, 50), 2, 3, 1000.0),
    "narrow_values_strong_clip": ((rng.integers(0, 6, (33, 29)) + 120).astype(np.uint8), 3, 3, 1.0),
}

tensors, meta = {}, {}
for name, (img, tx, ty, clip) in cases.items():
    out = cv2.createCLAHE(clipLimit=clip, tileGridSize=(tx, ty)).apply(img)
    tensors[f"{name}.src"] = np.ascontiguousarray(img)
    tensors[f"{name}.out"] = out
    meta[name] = f"{tx},{ty},{clip}"
save_file(tensors, str(OUT), metadata=meta)
print(f"wrote {OUT} ({len(cases)} cases, OpenCV {cv2.__version__})")
