//! Direct 3×3 "same" convolution for x86-64 CPUs with AVX2 and FMA (f32): forward, input
//! gradient and weight gradient, without im2col.
//!
//! Semantics: `x` [N, C, H, W], `w` [O, C, 3, 3], stride 1, padding = dilation = d, groups 1,
//! as PyTorch's `F.conv2d(x, w, padding=d, dilation=d)`:
//! `y[n,o,i,j] = Σ_{c,ky,kx} w[o,c,ky,kx] · x[n, c, i+d·(ky-1), j+d·(kx-1)]`, zero outside the
//! image. That is every convolution of the U-Net and the dilated 3×3 convolutions of ResNet's
//! later stages.
//!
//! Why not im2col: with few channels, im2col + GEMM is bound by memory rather than by
//! multiplies. im2col writes nine copies of the image, the GEMM packs them once more, and each
//! packed value then takes part in only O multiply-adds (16 in the U-Net's first level). Here
//! each image is copied once, into a zero-bordered buffer, and the kernels read it in place:
//!
//! ```text
//!   xp [C, H+2d, Wp]        Wp = W8 + 2d, W8 = W rounded up to 8 lanes
//!   ┌──────────────────┐    border and the columns past W are zero, so every 8-lane load
//!   │ 0 0 0 0 0 0 0 0 0│    of a tap is in bounds and no tap needs a bounds test
//!   │ 0 x x x x x x 0 0│
//!   │ 0 x x x x x x 0 0│
//!   │ 0 0 0 0 0 0 0 0 0│
//!   └──────────────────┘
//! ```
//!
//! - Forward: a register tile of 6 output channels × 2 vectors of 8 pixels of one output row
//!   (12 AVX accumulators) sums over the C·9 taps. Each tap loads 2 input vectors and broadcasts
//!   6 weights for 12 FMAs. Weights are packed `[O/6][C][9][6]` so a tile reads them in order.
//! - Input gradient: the forward of `gy` with the transposed, 180°-rotated kernel
//!   (`W′[c,o,ky,kx] = W[o,c,2-ky,2-kx]`), also with padding d.
//! - Weight gradient: for 4 output channels × the 3 horizontal taps of one (c, ky), 12
//!   accumulators sum `gy · x` over a band of rows small enough to stay in L1, and are reduced
//!   across lanes once per band. Per-image partial sums are added in image order.
//!
//! Sums are f32 in another order than the GEMM's. `tests/ops_direct.rs` compares these kernels
//! with the im2col path (which the f64 finite-difference checks of `tests/ops_grad.rs` cover)
//! on random shapes and dilations.

use super::gemm::sum_partials;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Output channels per forward register tile.
///
/// 6 × 2 vectors = 12 accumulators, 2 input vectors and a broadcast: 15 of the 16 AVX
/// registers. Measured on one thread of a Zen 3 EPYC (forward, U-Net shapes): 6×2 ran at
/// 59–69 GFLOP/s, 4×2 at 52–62, 3×3 at 46–60; 4×3 needs all 16 registers, and the compiler
/// spilled accumulators to the stack (28–45).
const OB: usize = 6;
/// 8-lane vectors (output pixels / 8) per forward register tile.
const XB: usize = 2;
/// Output channels per weight-gradient register tile (× 3 horizontal taps).
const GW_OB: usize = 4;
/// f32 lanes of an AVX register.
const LANES: usize = 8;
/// Elements of one gradient plane's band of rows in the weight gradient: five such planes
/// (four `gy` and one `x`) fill about 20 KiB, inside a 32 KiB L1 data cache.
const BAND_ELEMS: usize = 1024;

/// Whether this CPU runs the kernels (checked once by the standard library's cache).
pub(super) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The sizes of one 3×3 "same" convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Direct {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
    pub d: usize,
}

/// One image's forward: `cin` input planes of `h` × `w` to `cout` output planes, dilation `d`.
#[derive(Clone, Copy)]
struct Sizes {
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
    d: usize,
}

impl Sizes {
    fn w8(&self) -> usize {
        self.w.div_ceil(LANES) * LANES
    }
    /// Row stride of the padded buffer.
    fn wp(&self) -> usize {
        self.w8() + 2 * self.d
    }
    /// Elements of one padded plane.
    fn plane(&self) -> usize {
        (self.h + 2 * self.d) * self.wp()
    }
    fn padded_len(&self) -> usize {
        self.cin * self.plane()
    }
    /// Copies `x` [cin, h, w] into the interior of `xp` (whose border stays zero).
    fn pad(&self, x: &[f32], xp: &mut [f32]) {
        let (wp, plane) = (self.wp(), self.plane());
        for (src, dst) in x
            .chunks_exact(self.h * self.w)
            .zip(xp.chunks_exact_mut(plane))
        {
            for (i, row) in src.chunks_exact(self.w).enumerate() {
                dst[(i + self.d) * wp + self.d..][..self.w].copy_from_slice(row);
            }
        }
    }
}

/// Packs weights for the forward tile: `[cout/6][cin][9][6]`, zero for missing channels.
/// `weight(out, in, tap)` reads the (possibly transposed and rotated) kernel.
fn pack(cout: usize, cin: usize, weight: impl Fn(usize, usize, usize) -> f32) -> Vec<f32> {
    let blocks = cout.div_ceil(OB);
    let mut p = vec![0f32; blocks * cin * 9 * OB];
    for o in 0..cout {
        let (blk, lane) = (o / OB, o % OB);
        for c in 0..cin {
            for t in 0..9 {
                p[((blk * cin + c) * 9 + t) * OB + lane] = weight(o, c, t);
            }
        }
    }
    p
}

/// (images per task, output channels per task): whole images per task when there are at least
/// as many images as threads; otherwise each image's output channels are split over the
/// threads in whole tiles.
fn split(n: usize, cout: usize) -> (usize, usize) {
    let threads = rayon::current_num_threads().max(1);
    if n >= threads || cout <= OB {
        (n.div_ceil(threads).max(1), cout)
    } else {
        let per_image = threads.div_ceil(n.max(1));
        (1, cout.div_ceil(per_image).div_ceil(OB) * OB)
    }
}

impl Direct {
    /// `y` [N, O, H, W] from `x` [N, C, H, W] and `w` [O, C, 3, 3].
    pub fn forward(&self, x: &[f32], w: &[f32]) -> Vec<f32> {
        let c = self.c;
        let packed = pack(self.o, c, |o, ci, t| w[(o * c + ci) * 9 + t]);
        self.run_forward(self.sizes(false), x, &packed)
    }

    /// `gx` [N, C, H, W] from `gy` [N, O, H, W] and `w` [O, C, 3, 3]: the forward of `gy` with
    /// the transposed kernel rotated by 180°.
    pub fn grad_input(&self, gy: &[f32], w: &[f32]) -> Vec<f32> {
        let c = self.c;
        let packed = pack(c, self.o, |ci, o, t| w[(o * c + ci) * 9 + (8 - t)]);
        self.run_forward(self.sizes(true), gy, &packed)
    }

    fn sizes(&self, transposed: bool) -> Sizes {
        let (cin, cout) = if transposed {
            (self.o, self.c)
        } else {
            (self.c, self.o)
        };
        Sizes {
            cin,
            cout,
            h: self.h,
            w: self.w,
            d: self.d,
        }
    }

    fn run_forward(&self, s: Sizes, x: &[f32], packed: &[f32]) -> Vec<f32> {
        let (img_in, img_out) = (s.cin * s.h * s.w, s.cout * s.h * s.w);
        let len = self.n * img_out;
        if len == 0 {
            return Vec::new();
        }
        // Not zero-filled: the tiles write every element once.
        let mut y = Vec::with_capacity(len);
        let (per, ochunk) = split(self.n, s.cout);
        y.spare_capacity_mut()[..len]
            .par_chunks_mut(per * img_out)
            .zip(x.par_chunks(per * img_in))
            .for_each(|(ys, xs)| {
                let mut xp = vec![0f32; s.padded_len()];
                for (yi, xi) in ys.chunks_exact_mut(img_out).zip(xs.chunks_exact(img_in)) {
                    s.pad(xi, &mut xp);
                    let xp = &xp[..];
                    yi.par_chunks_mut(ochunk * s.h * s.w)
                        .enumerate()
                        .for_each(|(k, yo)| {
                            let o0 = k * ochunk;
                            let o1 = (o0 + ochunk).min(s.cout);
                            forward_image(&s, xp, packed, o0, o1, yo);
                        });
                }
            });
        // SAFETY: the capacity is `len`, and `forward_image` wrote all of each chunk: every
        // output channel of its range, every row and every column (the last vector clipped).
        unsafe { y.set_len(len) };
        y
    }

    /// `gw` [O, C, 3, 3] = Σ_n Σ_{i,j} gy[n,o,i,j] · x[n, c, i+d·(ky-1), j+d·(kx-1)].
    pub fn grad_weight(&self, x: &[f32], gy: &[f32]) -> Vec<f32> {
        let s = self.sizes(false);
        let (img_in, img_out) = (s.cin * s.h * s.w, s.cout * s.h * s.w);
        let per = self.n.div_ceil(rayon::current_num_threads().max(1)).max(1);
        let gw_len = self.o * self.c * 9;
        let partials: Vec<Vec<f32>> = x
            .par_chunks(per * img_in)
            .zip(gy.par_chunks(per * img_out))
            .map(|(xs, gys)| {
                let mut gw = vec![0f32; gw_len];
                let mut xp = vec![0f32; s.padded_len()];
                let w8 = s.w8();
                // gy with rows padded to whole vectors (zero past W), unless they already are.
                let mut gyp = if w8 == s.w {
                    Vec::new()
                } else {
                    vec![0f32; s.cout * s.h * w8]
                };
                for (xi, gyi) in xs.chunks_exact(img_in).zip(gys.chunks_exact(img_out)) {
                    s.pad(xi, &mut xp);
                    let g = if w8 == s.w {
                        gyi
                    } else {
                        for (src, dst) in gyi.chunks_exact(s.w).zip(gyp.chunks_exact_mut(w8)) {
                            dst[..s.w].copy_from_slice(src);
                        }
                        &gyp[..]
                    };
                    grad_weight_image(&s, &xp, g, &mut gw);
                }
                gw
            })
            .collect();
        sum_partials(partials, self.o, self.c * 9, false)
    }
}

/// Output planes `[o0, o1)` of one image into `y` [o1-o0, h, w], from the padded input `xp`.
fn forward_image(
    s: &Sizes,
    xp: &[f32],
    packed: &[f32],
    o0: usize,
    o1: usize,
    y: &mut [MaybeUninit<f32>],
) {
    assert!(xp.len() >= s.padded_len() && y.len() >= (o1 - o0) * s.h * s.w);
    assert!(o0.is_multiple_of(OB) && packed.len() >= s.cout.div_ceil(OB) * s.cin * 9 * OB);
    #[cfg(target_arch = "x86_64")]
    {
        assert!(available(), "direct conv kernels need AVX2 and FMA");
        // SAFETY: the CPU has AVX2 and FMA (asserted), and the asserted lengths keep every
        // load and store in bounds (see `avx2::forward_image`).
        unsafe { avx2::forward_image(s, xp, packed, o0, o1, y) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("direct conv kernels are x86-64 only")
}

/// Adds one image's weight gradient to `gw` [cout, cin, 3, 3]; `gy` [cout, h, w8] has rows
/// padded to whole vectors with zeros.
fn grad_weight_image(s: &Sizes, xp: &[f32], gy: &[f32], gw: &mut [f32]) {
    assert!(xp.len() >= s.padded_len() && gy.len() >= s.cout * s.h * s.w8());
    assert!(gw.len() >= s.cout * s.cin * 9);
    #[cfg(target_arch = "x86_64")]
    {
        assert!(available(), "direct conv kernels need AVX2 and FMA");
        // SAFETY: as in `forward_image`.
        unsafe { avx2::grad_weight_image(s, xp, gy, gw) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("direct conv kernels are x86-64 only")
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Sizes, BAND_ELEMS, GW_OB, LANES, OB, XB};
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// Picks the monomorphised tile for a runtime (channels, vectors) pair.
    macro_rules! tile {
        ($ob:expr, $xb:expr, $f:ident($($a:expr),*)) => {
            match ($ob, $xb) {
                (6, 2) => $f::<6, 2>($($a),*),
                (6, 1) => $f::<6, 1>($($a),*),
                (5, 2) => $f::<5, 2>($($a),*),
                (5, 1) => $f::<5, 1>($($a),*),
                (4, 2) => $f::<4, 2>($($a),*),
                (4, 1) => $f::<4, 1>($($a),*),
                (3, 2) => $f::<3, 2>($($a),*),
                (3, 1) => $f::<3, 1>($($a),*),
                (2, 2) => $f::<2, 2>($($a),*),
                (2, 1) => $f::<2, 1>($($a),*),
                (1, 2) => $f::<1, 2>($($a),*),
                (1, 1) => $f::<1, 1>($($a),*),
                _ => unreachable!("forward tiles are 1..=OB channels × 1..=XB vectors"),
            }
        };
    }

    /// See [`super::forward_image`]. Safety: AVX2 and FMA present; `xp` holds `s.padded_len()`
    /// elements, `packed` the packed weights of all `s.cout` channels, `y` (o1-o0)·h·w
    /// elements, `o0` a multiple of 4.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn forward_image(
        s: &Sizes,
        xp: &[f32],
        packed: &[f32],
        o0: usize,
        o1: usize,
        y: &mut [MaybeUninit<f32>],
    ) {
        let chunks = s.w.div_ceil(LANES);
        let out_plane = s.h * s.w;
        for i in 0..s.h {
            let mut o = o0;
            while o < o1 {
                let nb = (o1 - o).min(OB);
                let wt = packed.as_ptr().add((o / OB) * s.cin * 9 * OB);
                let mut ch = 0;
                while ch < chunks {
                    let nx = (chunks - ch).min(XB);
                    let x0 = ch * LANES;
                    // Output (i, x0) reads padded rows i + ky·d and columns x0 + kx·d.
                    let src = xp.as_ptr().add(i * s.wp() + x0);
                    let dst = y
                        .as_mut_ptr()
                        .cast::<f32>()
                        .add(((o - o0) * s.h + i) * s.w + x0);
                    let valid = s.w - x0;
                    tile!(nb, nx, fwd_tile(s, src, wt, dst, out_plane, valid));
                    ch += nx;
                }
                o += nb;
            }
        }
    }

    /// `NB` output channels × `NX` vectors of one output row. Reads `src` at
    /// `c·plane + ky·d·wp + kx·d + [0, 8·NX)`, inside the padded buffer because the last vector
    /// of a row ends at most at column W8 - 1 + 2d < Wp. Writes `valid` (≥ 1) pixels of each of
    /// the `NB` rows `dst + b·out_plane`, clipping the last vector.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fwd_tile<const NB: usize, const NX: usize>(
        s: &Sizes,
        src: *const f32,
        wt: *const f32,
        dst: *mut f32,
        out_plane: usize,
        valid: usize,
    ) {
        let (plane, row, d) = (s.plane(), s.d * s.wp(), s.d);
        let mut acc = [[_mm256_setzero_ps(); NX]; NB];
        for c in 0..s.cin {
            let sc = src.add(c * plane);
            let wc = wt.add(c * 9 * OB);
            for ky in 0..3 {
                let sr = sc.add(ky * row);
                for kx in 0..3 {
                    let p = sr.add(kx * d);
                    let mut v = [_mm256_setzero_ps(); NX];
                    for (j, vj) in v.iter_mut().enumerate() {
                        *vj = _mm256_loadu_ps(p.add(j * LANES));
                    }
                    let wk = wc.add((ky * 3 + kx) * OB);
                    for (b, ab) in acc.iter_mut().enumerate() {
                        let wb = _mm256_broadcast_ss(&*wk.add(b));
                        for (a, vj) in ab.iter_mut().zip(&v) {
                            *a = _mm256_fmadd_ps(wb, *vj, *a);
                        }
                    }
                }
            }
        }
        for (b, ab) in acc.iter().enumerate() {
            let out = dst.add(b * out_plane);
            for (j, a) in ab.iter().enumerate() {
                let x = j * LANES;
                if x + LANES <= valid {
                    _mm256_storeu_ps(out.add(x), *a);
                } else if x < valid {
                    let mut tmp = [0f32; LANES];
                    _mm256_storeu_ps(tmp.as_mut_ptr(), *a);
                    std::ptr::copy_nonoverlapping(tmp.as_ptr(), out.add(x), valid - x);
                }
            }
        }
    }

    /// See [`super::grad_weight_image`]; same safety contract as [`forward_image`], with `gy`
    /// holding cout·h·w8 elements and `gw` cout·cin·9.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn grad_weight_image(s: &Sizes, xp: &[f32], gy: &[f32], gw: &mut [f32]) {
        let (w8, wp, d) = (s.w8(), s.wp(), s.d);
        let band = (BAND_ELEMS / w8).clamp(1, s.h);
        let gy_plane = s.h * w8;
        let mut i0 = 0;
        while i0 < s.h {
            let rows = band.min(s.h - i0);
            let mut o = 0;
            while o < s.cout {
                let nb = (s.cout - o).min(GW_OB);
                let g = gy.as_ptr().add(o * gy_plane + i0 * w8);
                for c in 0..s.cin {
                    for ky in 0..3 {
                        let x = xp.as_ptr().add(c * s.plane() + (i0 + ky * d) * wp);
                        let out = gw.as_mut_ptr().add((o * s.cin + c) * 9 + ky * 3);
                        let step = s.cin * 9;
                        let t = GwTile {
                            g,
                            gy_plane,
                            x,
                            wp,
                            w8,
                            d,
                            rows,
                            out,
                            step,
                        };
                        match nb {
                            4 => gw_tile::<4>(&t),
                            3 => gw_tile::<3>(&t),
                            2 => gw_tile::<2>(&t),
                            1 => gw_tile::<1>(&t),
                            _ => unreachable!("weight-gradient tiles are 1..=GW_OB channels"),
                        }
                    }
                }
                o += nb;
            }
            i0 += rows;
        }
    }

    /// One weight-gradient tile's operands: `NB` output channels' `gy` rows from `g` (planes
    /// `gy_plane` apart, rows `w8` apart), the input rows of one (c, ky) from `x` (rows `wp`
    /// apart, taps `d` apart), `rows` rows; sums go to `out[b·step + kx]`.
    #[derive(Clone, Copy)]
    struct GwTile {
        g: *const f32,
        gy_plane: usize,
        x: *const f32,
        wp: usize,
        w8: usize,
        d: usize,
        rows: usize,
        out: *mut f32,
        step: usize,
    }

    /// Adds `Σ_{rows, lanes} gy[b] · x[· + kx·d]` to `out[b·step + kx]` for `NB` output channels
    /// and the 3 horizontal taps.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn gw_tile<const NB: usize>(t: &GwTile) {
        let GwTile {
            g,
            gy_plane,
            x,
            wp,
            w8,
            d,
            rows,
            out,
            step,
        } = *t;
        let mut acc = [[_mm256_setzero_ps(); 3]; NB];
        for r in 0..rows {
            let (gr, xr) = (g.add(r * w8), x.add(r * wp));
            let mut x0 = 0;
            while x0 < w8 {
                let mut v = [_mm256_setzero_ps(); 3];
                for (kx, vk) in v.iter_mut().enumerate() {
                    *vk = _mm256_loadu_ps(xr.add(x0 + kx * d));
                }
                for (b, ab) in acc.iter_mut().enumerate() {
                    let gv = _mm256_loadu_ps(gr.add(b * gy_plane + x0));
                    for (a, vk) in ab.iter_mut().zip(&v) {
                        *a = _mm256_fmadd_ps(gv, *vk, *a);
                    }
                }
                x0 += LANES;
            }
        }
        for (b, ab) in acc.iter().enumerate() {
            for (kx, a) in ab.iter().enumerate() {
                *out.add(b * step + kx) += hsum(*a);
            }
        }
    }

    /// Sum of the 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain loops over the definition in the module doc, in f64.
    fn reference(g: &Direct, x: &[f32], w: &[f32]) -> Vec<f64> {
        let (n, c, h, wd, o, d) = (g.n, g.c, g.h, g.w, g.o, g.d as isize);
        let mut y = vec![0f64; n * o * h * wd];
        for ni in 0..n {
            for oi in 0..o {
                for i in 0..h {
                    for j in 0..wd {
                        let mut s = 0f64;
                        for ci in 0..c {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let ii = i as isize + d * (ky as isize - 1);
                                    let jj = j as isize + d * (kx as isize - 1);
                                    if ii < 0 || jj < 0 || ii >= h as isize || jj >= wd as isize {
                                        continue;
                                    }
                                    let xv =
                                        x[((ni * c + ci) * h + ii as usize) * wd + jj as usize];
                                    s += f64::from(w[((oi * c + ci) * 3 + ky) * 3 + kx])
                                        * f64::from(xv);
                                }
                            }
                        }
                        y[((ni * o + oi) * h + i) * wd + j] = s;
                    }
                }
            }
        }
        y
    }

    fn ramp(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7919 + seed * 104_729) % 23) as f32 - 11.0) / 8.0)
            .collect()
    }

    #[test]
    fn forward_matches_definition_on_edge_shapes() {
        if !available() {
            return;
        }
        // Widths below, at and past one vector and a tile; channel counts around 4; dilations.
        for &(n, c, h, w, o, d) in &[
            (1, 1, 1, 1, 1, 1),
            (2, 3, 5, 7, 5, 1),
            (1, 2, 9, 8, 4, 1),
            (3, 5, 4, 25, 9, 2),
            (1, 4, 6, 17, 3, 3),
            (2, 6, 3, 33, 8, 1),
        ] {
            let g = Direct { n, c, h, w, o, d };
            let (x, wt) = (ramp(n * c * h * w, 1), ramp(o * c * 9, 2));
            let want = reference(&g, &x, &wt);
            let got = g.forward(&x, &wt);
            for (k, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (f64::from(*a) - b).abs() < 1e-4,
                    "{g:?} element {k}: {a} vs {b}"
                );
            }
        }
    }
}

#[cfg(test)]
mod speed {
    use super::Direct;
    use crate::model::ops::{conv2d, set_direct_conv};
    use candle_core::{Device, Tensor, Var};
    use std::time::Instant;

    /// `cargo test --release --lib direct::speed -- --ignored --nocapture`: GFLOP/s of a
    /// convolution's forward + backward (Candle's autograd included), direct kernels against
    /// im2col + GEMM, on the U-Net's shapes (batch 8, 96 px crops) and ResNet-50's 3×3 ones at
    /// 256 px. One thread, or `SPEED_THREADS=n`.
    #[test]
    #[ignore]
    fn direct_against_im2col() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(std::env::var("SPEED_THREADS").map_or(1, |v| v.parse().unwrap()))
            .build()
            .unwrap();
        let shapes = [
            (8, 16, 16, 96, 1),
            (8, 32, 32, 48, 1),
            (8, 64, 64, 24, 1),
            (8, 128, 128, 12, 1),
            (8, 192, 64, 24, 1),
            (2, 64, 64, 64, 1),
            (2, 128, 128, 32, 1),
            (2, 256, 256, 32, 2),
            (2, 512, 512, 32, 4),
        ];
        pool.install(|| {
            for &(n, c, o, hw, d) in &shapes {
                let dev = Device::Cpu;
                let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, c, hw, hw), &dev).unwrap())
                    .unwrap();
                let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, (o, c, 3, 3), &dev).unwrap())
                    .unwrap();
                let gf = 3.0 * 2.0 * (n * c * o * 9 * hw * hw) as f64 / 1e9;
                let mut rates = Vec::new();
                for direct in [false, true] {
                    let prev = set_direct_conv(direct);
                    let mut t = Vec::new();
                    for _ in 0..5 {
                        let s = Instant::now();
                        let y = conv2d(x.as_tensor(), w.as_tensor(), None, 1, d, d).unwrap();
                        let g = y.sum_all().unwrap().backward().unwrap();
                        std::hint::black_box(g);
                        t.push(s.elapsed().as_secs_f64());
                    }
                    set_direct_conv(prev);
                    t.sort_by(f64::total_cmp);
                    rates.push(gf / t[2]);
                }
                println!(
                    "n {n} c {c:3} o {o:3} {hw:3} px d {d}: im2col {:6.1}  direct {:6.1} GFLOP/s",
                    rates[0], rates[1]
                );
            }
        });
    }

    /// `cargo test --release --lib direct::speed::kernel_rates -- --ignored --nocapture`:
    /// GFLOP/s of each kernel alone (forward, input gradient, weight gradient) on one thread,
    /// on the U-Net's 3×3 shapes at batch 8 (one thread's half of the bench's batch of 16),
    /// without Candle around them.
    #[test]
    #[ignore]
    fn kernel_rates() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        pool.install(|| {
            for &(n, c, o, hw) in &[
                (8, 3, 16, 96),
                (8, 16, 16, 96),
                (8, 32, 16, 96),
                (8, 16, 32, 48),
                (8, 32, 32, 48),
                (8, 64, 32, 48),
                (8, 32, 64, 24),
                (8, 64, 64, 24),
                (8, 128, 64, 24),
                (8, 64, 128, 12),
                (8, 128, 128, 12),
            ] {
                let g = Direct { n, c, h: hw, w: hw, o, d: 1 };
                let x: Vec<f32> = (0..n * c * hw * hw).map(|i| (i % 7) as f32 * 0.1).collect();
                let gy: Vec<f32> = (0..n * o * hw * hw).map(|i| (i % 5) as f32 * 0.1).collect();
                let w: Vec<f32> = (0..o * c * 9).map(|i| (i % 3) as f32 * 0.1).collect();
                let gf = 2.0 * (n * c * o * 9 * hw * hw) as f64 / 1e9;
                let time = |f: &dyn Fn() -> Vec<f32>| {
                    let mut t: Vec<f64> = (0..7)
                        .map(|_| {
                            let s = Instant::now();
                            std::hint::black_box(f());
                            s.elapsed().as_secs_f64()
                        })
                        .collect();
                    t.sort_by(f64::total_cmp);
                    gf / t[3]
                };
                let fwd = time(&|| g.forward(&x, &w));
                let gx = time(&|| g.grad_input(&gy, &w));
                let gw = time(&|| g.grad_weight(&x, &gy));
                println!(
                    "n {n} c {c:3} o {o:3} {hw:3} px: forward {fwd:5.1}  grad_input {gx:5.1}  grad_weight {gw:5.1} GFLOP/s"
                );
            }
        });
    }
}
