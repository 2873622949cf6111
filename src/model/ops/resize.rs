//! Bilinear resize (PyTorch `align_corners=False`) as two matmuls with host-built
//! interpolation matrices, so Candle's autograd differentiates it.

use candle_core::{Result, Tensor};

/// Interpolation matrix [out_len, in_len] of PyTorch's 1-D linear resampling with
/// `align_corners=False` and the scale `in_len / out_len` (what `F.interpolate(size=...)` uses):
/// source coordinate `(dst + 0.5) * scale - 0.5`, clamped at 0; the upper neighbour is clamped to
/// the last input index.
pub(crate) fn interp_matrix(out_len: usize, in_len: usize) -> Vec<f64> {
    let scale = in_len as f64 / out_len as f64;
    let mut m = vec![0.0; out_len * in_len];
    for (o, row) in m.chunks_exact_mut(in_len.max(1)).enumerate() {
        let src = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(in_len - 1);
        let i1 = if i0 + 1 < in_len { i0 + 1 } else { i0 };
        let l1 = src - i0 as f64;
        row[i0] += 1.0 - l1;
        row[i1] += l1;
    }
    m
}

/// See [`super::resize_bilinear`].
pub(crate) fn resize_bilinear(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if out_h == 0 || out_w == 0 || h == 0 || w == 0 {
        candle_core::bail!("resize_bilinear: empty size {h}x{w} -> {out_h}x{out_w}");
    }
    if (h, w) == (out_h, out_w) {
        return Ok(x.clone());
    }
    let dev = x.device();
    let mat = |o: usize, i: usize| -> Result<Tensor> {
        Tensor::from_vec(interp_matrix(o, i), (o, i), dev)?.to_dtype(x.dtype())
    };
    // Width: [N*C*H, W] · [W, out_w].
    let y = if w == out_w {
        x.clone()
    } else {
        x.reshape((n * c * h, w))?
            .matmul(&mat(out_w, w)?.t()?)?
            .reshape((n, c, h, out_w))?
    };
    if h == out_h {
        return Ok(y);
    }
    // Height: [out_h, H] · [H, N*C*out_w] after moving H first.
    let rh = mat(out_h, h)?;
    let yt = y.permute((2, 0, 1, 3))?.reshape((h, n * c * out_w))?;
    rh.matmul(&yt)?
        .reshape((out_h, n, c, out_w))?
        .permute((1, 2, 0, 3))?
        .contiguous()
}
