//! Winograd F(2×2, 3×3) for 3×3 "same" convolutions with many channels: forward, input
//! gradient and weight gradient, f32 and f64.
//!
//! Semantics: `x` [N, C, H, W], `w` [O, C, 3, 3], stride 1, padding = dilation = d, groups 1,
//! as PyTorch's `F.conv2d(x, w, padding=d, dilation=d)`:
//! `y[n,o,i,j] = Σ_{c,ky,kx} w[o,c,ky,kx] · x[n, c, i+d·(ky-1), j+d·(kx-1)]`, zero outside the
//! image. In DeepLabV3-ResNet these are the middle convolutions of every bottleneck (dilated 2
//! and 4 in the last two stages), the head's 3×3 and ASPP's branches where the rate is small
//! against the map.
//!
//! The algorithm (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016):
//! each 2×2 block of outputs of one channel pair is `Aᵀ [(G g Gᵀ) ⊙ (Bᵀ z B)] A`, with `z` the
//! 4×4 input patch and `g` the 3×3 kernel:
//!
//! ```text
//!        ⎡1  0 -1  0⎤        ⎡ 1    0    0 ⎤        ⎡1  1  1  0⎤
//!   Bᵀ = ⎢0  1  1  0⎥    G = ⎢1/2  1/2  1/2⎥   Aᵀ = ⎣0  1 -1 -1⎦
//!        ⎢0 -1  1  0⎥        ⎢1/2 -1/2  1/2⎥
//!        ⎣0  1  0 -1⎦        ⎣ 0    0    1 ⎦
//! ```
//!
//! Summed over input channels, the elementwise products become 16 independent GEMMs, one per
//! position ξ of the 4×4 transform: `M_ξ [O, tiles] = U_ξ [O, C] · V_ξ [C, tiles]`. That is 16
//! multiplies per 2×2 outputs and channel pair instead of 36: 2.25× fewer. The transforms are
//! additions only (G's halves are exact in binary), so the result differs from the direct sum
//! by rounding alone, at the level of the GEMM's own reordering.
//!
//! With dilation d the same holds on the image's d×d interleaved sub-grids: a tile with origin
//! (i, j) produces outputs (i + d·a, j + d·b), a, b ∈ {0, 1}, from the inputs at
//! (i + d·(p-1), j + d·(q-1)), p, q ∈ 0..4. Tile origins are the rows (and columns) whose index
//! modulo 2d is below d, so the tiles cover every output exactly once; those past the image's
//! edge are not written.
//!
//! ```text
//!   per block of tile rows (a rayon task):
//!     x rows (zero outside)  ──Bᵀ·B──▶  V [16][C][tiles]
//!     U [O][16][C] (G g Gᵀ, once per call)  ──16 GEMMs U_ξ·V_ξ──▶  M [16][O][tiles]  ──Aᵀ·A──▶  y
//! ```
//!
//! - Input gradient: the same pass on `gy` with the transposed, 180°-rotated kernel.
//! - Weight gradient: `y = Aᵀ [U ⊙ V] A` is linear in U, so `∂L/∂U_ξ = Σ_tiles (A gy Aᵀ)_ξ ·
//!   V_ξᵀ` (16 GEMMs whose inner dimension is the tiles, one partial sum per thread) and
//!   `∂L/∂g = Gᵀ (∂L/∂U) G`.
//!
//! PyTorch's CPU convolution (oneDNN's direct kernels on AVX2/AVX-512) does not use Winograd,
//! which is where the margin over it comes from. `tests/ops_winograd.rs` compares this path
//! with the im2col one on random shapes and dilations (f64 and f32), and `tests/ops_grad.rs`
//! checks its gradients against f64 finite differences.

use super::gemm::{matmul, sum_partials, MatRef};
use candle_core::WithDType;
use rayon::prelude::*;

/// Tiles a block (one rayon task) aims for: the GEMMs' column count. Each GEMM re-packs its
/// U_ξ, so fewer columns pay that more often; more columns make V and M (16 × (C + O) ×
/// tiles values per block) larger than the caches. Not tuned beyond a first choice.
const TILES_PER_BLOCK: usize = 192;

/// One Winograd-eligible convolution (see [`super::conv`] for when it is chosen).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Winograd {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
    pub d: usize,
}

/// Sizes of one pass: `cin` planes in, `cout` planes out (swapped for the input gradient).
struct Pass {
    n: usize,
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
    d: usize,
}

/// How a pass's tiles are laid out and split into blocks (one rayon task each).
struct Tiling {
    /// Tile columns: for each r < d, (offset, count) of the tiles with origin ≡ r (mod 2d), in
    /// origin order, the groups one after the other.
    groups: Vec<(usize, usize)>,
    /// Tiles per tile row, and the largest group.
    tiles_w: usize,
    gmax: usize,
    /// The (image, tile origin row) pairs, and how many of them make a block.
    rows: Vec<(usize, usize)>,
    per_block: usize,
}

/// Origins along an axis of `len` with dilation `d`: indices whose remainder modulo 2d is
/// below d. Tile `i` covers `i` and `i + d`, so these cover `0..len` exactly once.
fn origins(len: usize, d: usize) -> Vec<usize> {
    (0..len).filter(|i| i % (2 * d) < d).collect()
}

/// `U` [cout][16][cin]: `G g Gᵀ` of every kernel, `g[t] = get(o, c, t)` (t = 3·ky + kx).
/// `U_ξ` is then the [cout, cin] matrix with row stride 16·cin starting at ξ·cin.
fn transform_weights<T: WithDType>(
    cout: usize,
    cin: usize,
    get: impl Fn(usize, usize, usize) -> T + Sync,
) -> Vec<T> {
    let half = T::from_f64(0.5);
    let mut u = vec![T::zero(); 16 * cout * cin];
    u.par_chunks_mut(16 * cin).enumerate().for_each(|(o, uo)| {
        for c in 0..cin {
            let g: [T; 9] = std::array::from_fn(|t| get(o, c, t));
            // G g: 4 rows of 3.
            let mut gg = [[T::zero(); 3]; 4];
            for k in 0..3 {
                let (a, b, e) = (g[k], g[3 + k], g[6 + k]);
                gg[0][k] = a;
                gg[1][k] = (a + b + e) * half;
                gg[2][k] = (a - b + e) * half;
                gg[3][k] = e;
            }
            // (G g) Gᵀ: 4 × 4.
            for (r, row) in gg.iter().enumerate() {
                let (a, b, e) = (row[0], row[1], row[2]);
                let vals = [a, (a + b + e) * half, (a - b + e) * half, e];
                for (s, v) in vals.into_iter().enumerate() {
                    uo[(4 * r + s) * cin + c] = v;
                }
            }
        }
    });
    u
}

impl Winograd {
    /// `y` [N, O, H, W] from `x` [N, C, H, W] and `w` [O, C, 3, 3].
    pub fn forward<T: WithDType>(&self, x: &[T], w: &[T]) -> Vec<T> {
        let c = self.c;
        let u = transform_weights(self.o, c, |o, ci, t| w[(o * c + ci) * 9 + t]);
        self.pass(self.c, self.o).run(x, &u)
    }

    /// `gx` [N, C, H, W] from `gy` [N, O, H, W] and `w` [O, C, 3, 3]: the forward of `gy` with
    /// the transposed kernel rotated by 180° (`W′[c,o,ky,kx] = W[o,c,2-ky,2-kx]`).
    pub fn grad_input<T: WithDType>(&self, gy: &[T], w: &[T]) -> Vec<T> {
        let c = self.c;
        let u = transform_weights(c, self.o, |ci, o, t| w[(o * c + ci) * 9 + (8 - t)]);
        self.pass(self.o, self.c).run(gy, &u)
    }

    /// `gw` [O, C, 3, 3] from `x` [N, C, H, W] and `gy` [N, O, H, W]: since
    /// `y = Aᵀ [U ⊙ V] A` with `U = G g Gᵀ`, the gradient is `Gᵀ [Σ_tiles (A gy Aᵀ) ⊙ V] G`,
    /// 16 GEMMs whose inner dimension is the tiles.
    pub fn grad_weight<T: WithDType>(&self, x: &[T], gy: &[T]) -> Vec<T> {
        let (c, o) = (self.c, self.o);
        let du = self.pass(c, o).weight_sums(x, gy);
        let half = T::from_f64(0.5);
        // Gᵀ on a column of 4: [u0 + (u1 + u2)/2, (u1 - u2)/2, (u1 + u2)/2 + u3].
        let gt = |u: [T; 4]| {
            let (s, t) = ((u[1] + u[2]) * half, (u[1] - u[2]) * half);
            [u[0] + s, t, s + u[3]]
        };
        let mut gw = vec![T::zero(); o * c * 9];
        gw.par_chunks_mut(c * 9).enumerate().for_each(|(oi, go)| {
            for (ci, k) in go.chunks_exact_mut(9).enumerate() {
                let at = |i: usize, j: usize| du[((4 * i + j) * o + oi) * c + ci];
                // Rows, then columns.
                let r: [[T; 3]; 4] =
                    std::array::from_fn(|j| gt([at(0, j), at(1, j), at(2, j), at(3, j)]));
                for ky in 0..3 {
                    let vals = gt([r[0][ky], r[1][ky], r[2][ky], r[3][ky]]);
                    k[3 * ky..3 * ky + 3].copy_from_slice(&vals);
                }
            }
        });
        gw
    }

    fn pass(&self, cin: usize, cout: usize) -> Pass {
        Pass {
            n: self.n,
            cin,
            cout,
            h: self.h,
            w: self.w,
            d: self.d,
        }
    }
}

/// Raw pointer to the output's uninitialised capacity, shared by the blocks, which write
/// disjoint rows.
#[derive(Clone, Copy)]
struct OutPtr<T>(*mut std::mem::MaybeUninit<T>);
// SAFETY: only used for writes to disjoint elements (see `Pass::run`).
unsafe impl<T: Send> Send for OutPtr<T> {}
unsafe impl<T: Send> Sync for OutPtr<T> {}

impl<T> OutPtr<T> {
    /// `len` elements from `start`. (A method, so that closures capture the whole `Sync`
    /// wrapper rather than its raw field.)
    ///
    /// # Safety
    /// `start + len` must lie inside the allocation, and no other live reference may overlap.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, start: usize, len: usize) -> &mut [std::mem::MaybeUninit<T>] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

impl Pass {
    /// Tiles per tile row with origin column ≡ r (mod 2d), r < d: origins 2d·m + r < W.
    fn group_len(&self, r: usize) -> usize {
        (self.w - r).div_ceil(2 * self.d)
    }

    /// Length of one column phase (see [`Pass::input_rows`]).
    fn phase_len(&self) -> usize {
        (self.w + 3 * self.d).div_ceil(2 * self.d)
    }

    /// `Bᵀ z` for the tile row with origin row `r0` of one plane: `t_i = Σ_p Bᵀ[i][p] z_p`,
    /// `z_p` the image row `r0 + d·(p-1)` (zero outside the image).
    ///
    /// Columns are dealt into 2d phases: padded column `2d·m + ρ` (image column `2d·m + ρ - d`)
    /// goes to `ρ·phase_len + m`. A tile's four columns (origin `2d·m + r`, taps `+0, +d, +2d,
    /// +3d` in padded columns) are then elements m and m+1 of phases r and r+d, so the column
    /// pass reads and writes contiguous runs.
    fn input_rows<T: WithDType>(&self, plane: &[T], zeros: &[T], r0: usize, t: &mut [T]) {
        let (d, ml, w) = (self.d, self.phase_len(), self.w);
        let z: [&[T]; 4] =
            std::array::from_fn(
                |p| match (r0 + d * p).checked_sub(d).filter(|&i| i < self.h) {
                    Some(i) => &plane[i * w..][..w],
                    None => zeros,
                },
            );
        let (t0, rest) = t.split_at_mut(2 * d * ml);
        let (t1, rest) = rest.split_at_mut(2 * d * ml);
        let (t2, rest) = rest.split_at_mut(2 * d * ml);
        let t3 = &mut rest[..2 * d * ml];
        for rho in 0..2 * d {
            // Image columns 2d·m + ρ - d inside 0..W: m in lo..hi.
            let lo = usize::from(rho < d);
            let hi = (w + d - rho).div_ceil(2 * d).min(ml);
            let first = 2 * d * lo + rho - d;
            let at = rho * ml;
            for ti in [&mut *t0, &mut *t1, &mut *t2, &mut *t3] {
                ti[at..at + lo].fill(T::zero());
                ti[at + hi..at + ml].fill(T::zero());
            }
            let cols = |p: usize| z[p][first..].iter().step_by(2 * d);
            let outs = t0[at + lo..at + hi]
                .iter_mut()
                .zip(&mut t1[at + lo..at + hi])
                .zip(&mut t2[at + lo..at + hi])
                .zip(&mut t3[at + lo..at + hi]);
            let ins = cols(0).zip(cols(1)).zip(cols(2)).zip(cols(3));
            for ((((o0, o1), o2), o3), (((&z0, &z1), &z2), &z3)) in outs.zip(ins) {
                *o0 = z0 - z2;
                *o1 = z1 + z2;
                *o2 = z2 - z1;
                *o3 = z1 - z3;
            }
        }
    }

    /// The tiling of this pass (see [`Tiling`]).
    fn tiling(&self) -> Tiling {
        let d = self.d;
        let groups: Vec<(usize, usize)> = (0..d)
            .scan(0, |off, r| {
                let g = (*off, self.group_len(r));
                *off += g.1;
                Some(g)
            })
            .collect();
        let tiles_w: usize = groups.iter().map(|g| g.1).sum();
        let gmax = groups.iter().map(|g| g.1).max().unwrap_or(0);
        let th = origins(self.h, d);
        let rows: Vec<(usize, usize)> = (0..self.n)
            .flat_map(|i| th.iter().map(move |&r| (i, r)))
            .collect();
        // About TILES_PER_BLOCK tiles a block, and at least two blocks per thread where there
        // are enough rows.
        let threads = rayon::current_num_threads().max(1);
        let per_block = (TILES_PER_BLOCK / tiles_w)
            .max(1)
            .min(rows.len().div_ceil(2 * threads).max(1));
        Tiling {
            groups,
            tiles_w,
            gmax,
            rows,
            per_block,
        }
    }

    /// `V` [16][cin][tb] of a block of tile rows of `x` [N, cin, H, W]: `Bᵀ z B` for every
    /// channel and tile; `t` and `zeros` are scratch (4 padded rows; one zero image row).
    fn input_transform<T: WithDType>(
        &self,
        tl: &Tiling,
        x: &[T],
        block: &[(usize, usize)],
        v: &mut [T],
        t: &mut [T],
        zeros: &[T],
    ) {
        let (cin, h, w, d) = (self.cin, self.h, self.w, self.d);
        let (ml, tiles_w) = (self.phase_len(), tl.tiles_w);
        let row = 2 * d * ml;
        let tb = block.len() * tiles_w;
        // V = Bᵀ z B for every channel and tile of the block.
        for c in 0..cin {
            for (bi, &(img, r0)) in block.iter().enumerate() {
                let plane = &x[(img * cin + c) * h * w..][..h * w];
                self.input_rows(plane, zeros, r0, t);
                // (Bᵀ z) B across each group's tiles: columns e_m, o_m, e_m+1, o_m+1.
                for (r, &(off, len)) in tl.groups.iter().enumerate() {
                    let col0 = bi * tiles_w + off;
                    for (i, ti) in t.chunks_exact(row).take(4).enumerate() {
                        let (e, o) = (&ti[r * ml..][..len + 1], &ti[(r + d) * ml..][..len + 1]);
                        let (e0, e1, o0, o1) = (&e[..len], &e[1..], &o[..len], &o[1..]);
                        let at = |s: usize| ((4 * i + s) * cin + c) * tb + col0;
                        let dst = &mut v[at(0)..at(0) + len];
                        for (y, (a, b)) in dst.iter_mut().zip(e0.iter().zip(e1)) {
                            *y = *a - *b;
                        }
                        let dst = &mut v[at(1)..at(1) + len];
                        for (y, (a, b)) in dst.iter_mut().zip(o0.iter().zip(e1)) {
                            *y = *a + *b;
                        }
                        let dst = &mut v[at(2)..at(2) + len];
                        for (y, (a, b)) in dst.iter_mut().zip(e1.iter().zip(o0)) {
                            *y = *a - *b;
                        }
                        let dst = &mut v[at(3)..at(3) + len];
                        for (y, (a, b)) in dst.iter_mut().zip(o0.iter().zip(o1)) {
                            *y = *a - *b;
                        }
                    }
                }
            }
        }
    }

    /// `Σ_tiles (A gy Aᵀ)_ξ · V_ξᵀ` [16][cout][cin] (`x` [N, cin, H, W], `gy` [N, cout, H, W]):
    /// the gradient of the loss with respect to the transformed kernels U_ξ. One partial sum per
    /// thread (contiguous runs of blocks), added in order.
    fn weight_sums<T: WithDType>(&self, x: &[T], gy: &[T]) -> Vec<T> {
        let (cin, cout, h, w, d) = (self.cin, self.cout, self.h, self.w, self.d);
        let row = 2 * d * self.phase_len();
        let tl = self.tiling();
        let (tiles_w, gmax) = (tl.tiles_w, tl.gmax);
        let threads = rayon::current_num_threads().max(1);
        let blocks_per_task = tl
            .rows
            .len()
            .div_ceil(tl.per_block)
            .div_ceil(threads)
            .max(1);
        let partials: Vec<Vec<T>> = tl
            .rows
            .par_chunks(blocks_per_task * tl.per_block)
            .map(|rows| {
                let mut du = vec![T::zero(); 16 * cout * cin];
                let (mut v, mut g) = (Vec::new(), Vec::new());
                let mut t = vec![T::zero(); (4 * row).max(4 * gmax)];
                let zeros = vec![T::zero(); w];
                for block in rows.chunks(tl.per_block) {
                    let tb = block.len() * tiles_w;
                    v.resize(16 * cin * tb, T::zero());
                    g.resize(16 * cout * tb, T::zero());
                    self.input_transform(&tl, x, block, &mut v, &mut t, &zeros);
                    // G = A gy Aᵀ, gy's 2×2 outputs of each tile (zero past the image).
                    for o in 0..cout {
                        for (bi, &(img, r0)) in block.iter().enumerate() {
                            let plane = &gy[(img * cout + o) * h * w..][..h * w];
                            for (r, &(off, len)) in tl.groups.iter().enumerate() {
                                let col0 = bi * tiles_w + off;
                                for (ab, ga) in t.chunks_exact_mut(gmax).take(4).enumerate() {
                                    let (a, b) = (ab / 2, ab % 2);
                                    let ga = &mut ga[..len];
                                    ga.fill(T::zero());
                                    let (oi, oj) = (r0 + d * a, r + d * b);
                                    if oi < h && oj < w {
                                        let src = plane[oi * w + oj..(oi + 1) * w].iter();
                                        for (dst, &val) in ga.iter_mut().zip(src.step_by(2 * d)) {
                                            *dst = val;
                                        }
                                    }
                                }
                                let gab = |ab: usize| &t[ab * gmax..][..len];
                                let (g00, g01, g10, g11) = (gab(0), gab(1), gab(2), gab(3));
                                for k in 0..len {
                                    // A on rows: p_0 = g_0, p_1 = g_0 + g_1, p_2 = g_0 - g_1,
                                    // p_3 = -g_1; then on columns, the same.
                                    let p = [
                                        [g00[k], g01[k]],
                                        [g00[k] + g10[k], g01[k] + g11[k]],
                                        [g00[k] - g10[k], g01[k] - g11[k]],
                                        [T::zero() - g10[k], T::zero() - g11[k]],
                                    ];
                                    for (i, [p0, p1]) in p.into_iter().enumerate() {
                                        let vals = [p0, p0 + p1, p0 - p1, T::zero() - p1];
                                        for (j, val) in vals.into_iter().enumerate() {
                                            g[((4 * i + j) * cout + o) * tb + col0 + k] = val;
                                        }
                                    }
                                }
                            }
                        }
                    }
                    for xi in 0..16 {
                        matmul(
                            &mut du[xi * cout * cin..][..cout * cin],
                            cin,
                            MatRef::row_major(&g[xi * cout * tb..][..cout * tb], cout, tb),
                            MatRef::row_major(&v[xi * cin * tb..][..cin * tb], cin, tb).t(),
                            true,
                            false,
                        );
                    }
                }
                du
            })
            .collect();
        sum_partials(partials, 16 * cout, cin, false)
    }

    fn run<T: WithDType>(&self, x: &[T], u: &[T]) -> Vec<T> {
        let (n, cin, cout, h, w, d) = (self.n, self.cin, self.cout, self.h, self.w, self.d);
        let len = n * cout * h * w;
        if len == 0 {
            return Vec::new();
        }
        if cin == 0 {
            return vec![T::zero(); len];
        }
        let ml = self.phase_len();
        let row = 2 * d * ml;
        let tl = self.tiling();
        let (groups, tiles_w, gmax) = (&tl.groups, tl.tiles_w, tl.gmax);
        // Not zero-filled: the blocks write every element once.
        let mut y: Vec<T> = Vec::with_capacity(len);
        let out = OutPtr(y.spare_capacity_mut().as_mut_ptr());
        tl.rows.par_chunks(tl.per_block).for_each_init(
            || (Vec::new(), Vec::new(), Vec::new(), vec![T::zero(); w]),
            |(v, m, t, zeros): &mut (Vec<T>, Vec<T>, Vec<T>, Vec<T>), block| {
                let tb = block.len() * tiles_w;
                v.resize(16 * cin * tb, T::zero());
                m.resize(16 * cout * tb, T::zero());
                t.resize((4 * row).max(12 * gmax), T::zero());
                self.input_transform(&tl, x, block, v, t, zeros);
                for xi in 0..16 {
                    let ux = MatRef {
                        data: &u[xi * cin..],
                        rows: cout,
                        cols: cin,
                        rs: 16 * cin,
                        cs: 1,
                    };
                    matmul(
                        &mut m[xi * cout * tb..][..cout * tb],
                        tb,
                        ux,
                        MatRef::row_major(&v[xi * cin * tb..][..cin * tb], cin, tb),
                        false,
                        false,
                    );
                }
                // y = Aᵀ M A, the outputs inside the image.
                for o in 0..cout {
                    for (bi, &(img, r0)) in block.iter().enumerate() {
                        for (r, &(off, len)) in groups.iter().enumerate() {
                            let col0 = bi * tiles_w + off;
                            let mq = |xi: usize| &m[(xi * cout + o) * tb + col0..][..len];
                            let (s, ys) = t.split_at_mut(8 * gmax);
                            // Aᵀ on rows: s_0q = M_0q + M_1q + M_2q, s_1q = M_1q - M_2q - M_3q.
                            for (q, sq) in s.chunks_exact_mut(gmax).enumerate() {
                                let (a, q) = (q / 4, q % 4);
                                let (m0, m1, m2, m3) = (mq(q), mq(4 + q), mq(8 + q), mq(12 + q));
                                let it = sq[..len]
                                    .iter_mut()
                                    .zip(m0.iter().zip(m1))
                                    .zip(m2.iter().zip(m3));
                                for ((y, (&m0, &m1)), (&m2, &m3)) in it {
                                    *y = if a == 0 { m0 + m1 + m2 } else { m1 - m2 - m3 };
                                }
                            }
                            // A on columns: y_a0 = s_a0 + s_a1 + s_a2, y_a1 = s_a1 - s_a2 - s_a3.
                            for (a, ya) in ys.chunks_exact_mut(2 * gmax).take(2).enumerate() {
                                let sa = |q: usize| &s[(4 * a + q) * gmax..][..len];
                                let (y0, y1) = ya.split_at_mut(gmax);
                                let it = y0[..len].iter_mut().zip(&mut y1[..len]);
                                let (s0, s1, s2, s3) = (sa(0), sa(1), sa(2), sa(3));
                                for (k, (p0, p1)) in it.enumerate() {
                                    *p0 = s0[k] + s1[k] + s2[k];
                                    *p1 = s1[k] - s2[k] - s3[k];
                                }
                            }
                            for a in 0..2 {
                                let oi = r0 + d * a;
                                if oi >= h {
                                    continue;
                                }
                                // SAFETY: row `oi` of plane (img, o) lies inside the capacity
                                // (img < N, o < O, oi < H), and only this block touches it:
                                // every output of the row belongs to a tile of tile row r0
                                // (`origins`), which lies in exactly one block.
                                let out_row =
                                    unsafe { out.slice(((img * cout + o) * h + oi) * w, w) };
                                let (y0, y1) =
                                    (&ys[2 * a * gmax..][..len], &ys[(2 * a + 1) * gmax..][..len]);
                                for (dst, &val) in out_row[r..].iter_mut().step_by(2 * d).zip(y0) {
                                    dst.write(val);
                                }
                                if r + d < w {
                                    let cols = out_row[r + d..].iter_mut().step_by(2 * d);
                                    for (dst, &val) in cols.zip(y1) {
                                        dst.write(val);
                                    }
                                }
                            }
                        }
                    }
                }
            },
        );
        // SAFETY: the capacity is `len`, and the blocks wrote every element: every tile row of
        // every image (`rows`), both of its output rows inside the image, and every column
        // (origins 2d·m + r and 2d·m + r + d for r < d cover 0..W).
        unsafe { y.set_len(len) };
        y
    }
}

#[cfg(test)]
mod speed {
    use crate::model::ops::{conv2d, set_direct_conv, set_winograd_conv, WinogradMode};
    use candle_core::{Device, Tensor, Var};
    use std::time::Instant;

    /// `cargo test --release --lib winograd_speed -- --ignored --nocapture`: milliseconds of a
    /// 3×3 convolution's forward, and of forward + backward (Candle's autograd included), on
    /// im2col + GEMM, the direct kernels and Winograd, for ResNet-50's and the U-Net's shapes.
    /// Two threads, or `SPEED_THREADS=n`; medians of 5.
    #[test]
    #[ignore]
    fn winograd_speed() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(std::env::var("SPEED_THREADS").map_or(2, |v| v.parse().unwrap()))
            .build()
            .unwrap();
        // (n, c, o, side, dilation)
        let shapes = [
            (2, 64, 64, 64, 1),
            (2, 128, 128, 32, 1),
            (2, 256, 256, 32, 2),
            (2, 512, 512, 32, 4),
            (1, 256, 256, 96, 2),
            (1, 512, 512, 96, 4),
            (1, 2048, 256, 96, 12),
            (16, 16, 16, 96, 1),
            (16, 32, 32, 48, 1),
            (16, 64, 64, 24, 1),
            (16, 128, 128, 12, 1),
        ];
        let modes = [
            ("im2col", false, WinogradMode::Never),
            ("direct", true, WinogradMode::Never),
            ("winograd", true, WinogradMode::Always),
        ];
        pool.install(|| {
            for &(n, c, o, hw, d) in &shapes {
                let dev = Device::Cpu;
                let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, c, hw, hw), &dev).unwrap())
                    .unwrap();
                let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, (o, c, 3, 3), &dev).unwrap())
                    .unwrap();
                let mut line = format!("n {n:2} c {c:4} o {o:3} {hw:3} px d {d:2}:");
                for (name, direct, mode) in modes {
                    let (pd, pw) = (set_direct_conv(direct), set_winograd_conv(mode));
                    let mut fwd = Vec::new();
                    let mut both = Vec::new();
                    for _ in 0..5 {
                        let s = Instant::now();
                        let y = conv2d(x.as_tensor(), w.as_tensor(), None, 1, d, d).unwrap();
                        fwd.push(s.elapsed().as_secs_f64() * 1e3);
                        let g = y.sum_all().unwrap().backward().unwrap();
                        std::hint::black_box(g);
                        both.push(s.elapsed().as_secs_f64() * 1e3);
                    }
                    set_direct_conv(pd);
                    set_winograd_conv(pw);
                    fwd.sort_by(f64::total_cmp);
                    both.sort_by(f64::total_cmp);
                    line += &format!("  {name} {:7.1} / {:7.1}", fwd[2], both[2]);
                }
                println!("{line}  ms (fwd / fwd+bwd)");
            }
        });
    }
}
