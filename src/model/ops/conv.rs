//! CPU 2-D convolution as im2col + GEMM, with a backward that also runs on GEMM.
//!
//! Candle's CPU conv2d computes its input gradient with a naive transposed convolution, which
//! dominates training time. Here the forward is `y_n = W · im2col(x_n)` per image (no im2col at
//! all for 1×1/stride-1/no-padding kernels), the weight gradient is
//! `Σ_n gy_n · im2col(x_n)ᵀ` and the input gradient is `col2im(Wᵀ · gy_n)`. The im2col buffer is
//! recomputed in the backward pass rather than kept alive, so the memory held between forward
//! and backward is only what Candle keeps anyway (the inputs).
//!
//! Dilated kernels whose taps mostly read padding (ASPP's rates on small maps) take the tap
//! plan, [`Plan::Taps`]: one GEMM per tap over the rectangle where it reads the image, so each
//! GEMM is shaped like a 1×1 convolution's and nothing multiplies padding.
//!
//! 3×3 stride-1 convolutions with padding = dilation take other paths where they are faster:
//! Winograd F(2×2, 3×3) (`winograd.rs`) with many channels on large enough maps
//! ([`ConvGeom::winograd`]; for the weight gradient only beyond the direct kernels' channel
//! limit, [`ConvGeom::winograd_grad_weight`]), and the direct kernels of `direct.rs` for f32
//! with up to 256 channels where the CPU has AVX2 and FMA ([`ConvGeom::direct`]).

use super::direct::{self, Direct};
use super::gemm::{matmul, sum_partials, MatRef};
use super::winograd::Winograd;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;
use std::cell::Cell;

/// Shapes and hyper-parameters of one convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ConvGeom {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
    dilation: usize,
    ho: usize,
    wo: usize,
    /// Most elements of an im2col buffer ([`COL_BUDGET`]; smaller in tests to exercise bands).
    col_budget: usize,
}

impl ConvGeom {
    /// Validates the shapes of `x` [N, C, H, W] and `w` [O, C, kh, kw] and derives the output size.
    pub fn new(
        x: &Shape,
        w: &Shape,
        stride: usize,
        padding: usize,
        dilation: usize,
    ) -> Result<Self> {
        let (n, c, h, wd) = x.dims4()?;
        let (o, wc, kh, kw) = w.dims4()?;
        if wc != c {
            candle_core::bail!("conv2d: input has {c} channels but the weight expects {wc}");
        }
        if stride == 0 || dilation == 0 || kh == 0 || kw == 0 {
            candle_core::bail!("conv2d: stride, dilation and kernel size must be positive");
        }
        let (eh, ew) = (dilation * (kh - 1) + 1, dilation * (kw - 1) + 1);
        if h + 2 * padding < eh || wd + 2 * padding < ew {
            candle_core::bail!(
                "conv2d: padded input {}x{} smaller than the dilated kernel {eh}x{ew}",
                h + 2 * padding,
                wd + 2 * padding
            );
        }
        Ok(Self {
            n,
            c,
            h,
            w: wd,
            o,
            kh,
            kw,
            stride,
            padding,
            dilation,
            ho: (h + 2 * padding - eh) / stride + 1,
            wo: (wd + 2 * padding - ew) / stride + 1,
            col_budget: COL_BUDGET,
        })
    }

    /// Rows of the im2col matrix (= columns of the flattened weight).
    fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// Output pixels per image (= columns of the im2col matrix).
    fn p(&self) -> usize {
        self.ho * self.wo
    }

    /// Input elements per image.
    fn img(&self) -> usize {
        self.c * self.h * self.w
    }

    /// A 1×1 stride-1 unpadded kernel: the image itself is its im2col matrix.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
    }

    fn out_shape(&self) -> Shape {
        Shape::from((self.n, self.o, self.ho, self.wo))
    }

    /// For a stride-1 square kernel (not 1×1) whose padding is at most its dilated reach, the
    /// convolution whose forward is this one's input gradient: `gx = conv(gy, W′)` with
    /// `W′[c, o, i, j] = W[o, c, kh-1-i, kw-1-j]` and padding `dilation·(kh-1) - padding`. One
    /// GEMM with inner dimension O·kh·kw and no col2im scatter; the tap plan applies to it too.
    fn input_grad_conv(&self) -> Option<ConvGeom> {
        let reach = self.dilation * (self.kh - 1);
        (self.stride == 1 && self.kh == self.kw && self.kh > 1 && self.padding <= reach).then(
            || ConvGeom {
                c: self.o,
                h: self.ho,
                w: self.wo,
                o: self.c,
                padding: reach - self.padding,
                ho: self.h,
                wo: self.w,
                ..*self
            },
        )
    }
}

/// Most input or output channels for the direct kernels. Beyond, a tile's packed weights
/// (6 channels × 9 taps × C) outgrow L1 and im2col + GEMM is as fast or faster: one thread of
/// a Zen 3 EPYC ran forward + backward at 58 against 63 GFLOP/s for 512 channels at 32 px, and
/// at 66 against 47 for 256 (`direct::speed`, in the bench docs).
const DIRECT_MAX_CHANNELS: usize = 256;

/// Fewest input and output channels, and fewest pixels per map, for which f32 convolutions take
/// Winograd by default. Below them the transforms' additions and the small GEMMs outweigh the
/// multiplies saved, and the direct kernels are faster: measured on the Zen 3 with `cargo test
/// --release --lib winograd_speed -- --ignored --nocapture` (forward, ms, Winograd against
/// direct): 128 channels at 32×32 3.0 against 3.6, 64 at 64×64 3.8 against 3.7, the U-Net's 64
/// at 24×24 7.0 against 6.0 and 128 at 12×12 7.2 against 6.6.
const WINOGRAD_MIN_CHANNELS: usize = 128;
const WINOGRAD_MIN_PIXELS: usize = 32 * 32;

/// When 3×3 "same" convolutions take Winograd F(2×2, 3×3) (`winograd.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WinogradMode {
    /// f32, with at least [`WINOGRAD_MIN_CHANNELS`] channels each side (the default).
    Auto,
    /// Every eligible geometry, f32 and f64 (tests: finite differences, the im2col comparison).
    Always,
    /// Never.
    Never,
}

thread_local! {
    static DIRECT: Cell<bool> = const { Cell::new(true) };
    static WINOGRAD: Cell<WinogradMode> = const { Cell::new(WinogradMode::Auto) };
}

/// When convolutions on this thread take Winograd F(2×2, 3×3); returns the previous mode. For
/// tests and benchmarks: results differ from the other paths by f32 rounding only.
pub fn set_winograd_conv(mode: WinogradMode) -> WinogradMode {
    WINOGRAD.with(|m| m.replace(mode))
}

/// Whether f32 3×3 "same" convolutions on this thread may take the direct AVX2 kernels of
/// `direct.rs` (the default, where the CPU has AVX2 and FMA) rather than im2col + GEMM. Returns
/// the previous setting. For tests and the `direct::speed` benchmark; results differ only by
/// f32 rounding.
pub fn set_direct_conv(on: bool) -> bool {
    DIRECT.with(|d| d.replace(on))
}

/// Whether this CPU runs the direct kernels (x86-64 with AVX2 and FMA).
pub fn direct_conv_available() -> bool {
    direct::available()
}

impl ConvGeom {
    /// The geometry both the direct kernels and Winograd take: a 3×3 kernel, stride 1, padding
    /// equal to the dilation and at most a quarter of the image's side (both multiply the
    /// padding too, so ASPP's wide rates on small maps stay on the tap plan, [`Plan::Taps`]).
    fn same_3x3(&self) -> bool {
        self.kh == 3
            && self.kw == 3
            && self.stride == 1
            && self.padding == self.dilation
            && 4 * self.dilation <= self.h.min(self.w)
    }

    /// Winograd F(2×2, 3×3) for this convolution's forward and input gradient, where it
    /// applies: [`ConvGeom::same_3x3`], and per [`set_winograd_conv`]: by default f32 with at
    /// least [`WINOGRAD_MIN_CHANNELS`] channels either side and [`WINOGRAD_MIN_PIXELS`] pixels.
    fn winograd(&self, f32: bool) -> Option<Winograd> {
        let chosen = match WINOGRAD.with(|m| m.get()) {
            WinogradMode::Auto => {
                f32 && self.c.min(self.o) >= WINOGRAD_MIN_CHANNELS
                    && self.h * self.w >= WINOGRAD_MIN_PIXELS
            }
            WinogradMode::Always => true,
            WinogradMode::Never => false,
        };
        (self.same_3x3() && chosen).then_some(Winograd {
            n: self.n,
            c: self.c,
            h: self.h,
            w: self.w,
            o: self.o,
            d: self.dilation,
        })
    }

    /// Winograd for the f32 weight gradient: where [`ConvGeom::winograd`] applies and the direct
    /// kernels do not (more than [`DIRECT_MAX_CHANNELS`] channels), or always when forced. The
    /// direct weight gradient is as fast below (Zen 3, forward + backward, ms, Winograd against
    /// direct for the weight gradient: 54 against 52 at 256 channels on 32×32; 184 against 265
    /// at 512).
    fn winograd_grad_weight(&self) -> Option<Winograd> {
        let forced = WINOGRAD.with(|m| m.get()) == WinogradMode::Always;
        self.winograd(true)
            .filter(|_| forced || self.direct().is_none())
    }

    /// The direct kernel for this convolution, where it applies: f32 only (the caller's
    /// business), [`ConvGeom::same_3x3`], at most [`DIRECT_MAX_CHANNELS`] channels either side,
    /// AVX2 and FMA on this CPU, and [`set_direct_conv`] on.
    fn direct(&self) -> Option<Direct> {
        let fits = self.same_3x3() && self.c.max(self.o) <= DIRECT_MAX_CHANNELS;
        (fits && DIRECT.with(|d| d.get()) && direct::available()).then_some(Direct {
            n: self.n,
            c: self.c,
            h: self.h,
            w: self.w,
            o: self.o,
            d: self.dilation,
        })
    }
}

/// Range `[lo, hi)` of output indices `i` whose input index `i*stride + off - pad` lies in
/// `[0, in_len)`.
fn valid_range(
    out_len: usize,
    in_len: usize,
    off: usize,
    stride: usize,
    pad: usize,
) -> (usize, usize) {
    let lo = if pad > off {
        (pad - off).div_ceil(stride)
    } else {
        0
    };
    if in_len + pad < off + 1 {
        return (0, 0);
    }
    let hi = ((in_len - 1 + pad - off) / stride + 1).min(out_len);
    (lo.min(hi), hi)
}

/// Most elements an im2col buffer may hold (32 MiB of f32): larger images are processed in bands
/// of output rows, so that e.g. a 64-channel 3×3 convolution at 584×565 does not allocate a
/// 760 MB buffer.
const COL_BUDGET: usize = 1 << 23;

/// The tap plan is used when it does at most this fraction of the dense multiply-adds.
const SPARSE_MAX_FRACTION: f64 = 0.75;

/// One kernel tap `(ki, kj)` of the tap plan ([`Plan::Taps`]), with the rectangle of output pixels
/// `[oh.0, oh.1) × [ow.0, ow.1)` in which it reads inside the image (everywhere else it reads
/// zero padding, so its products there are skipped).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Tap {
    ki: usize,
    kj: usize,
    oh: (usize, usize),
    ow: (usize, usize),
}

impl Tap {
    fn area(&self) -> usize {
        (self.oh.1 - self.oh.0) * (self.ow.1 - self.ow.0)
    }

    /// The tap's weights `w[:, :, ki, kj]`, an [O, C] view of `w` [O, C, kh, kw].
    fn weight<'a, T>(&self, g: &ConvGeom, w: &'a [T]) -> MatRef<'a, T> {
        MatRef {
            data: &w[self.ki * g.kw + self.kj..],
            rows: g.o,
            cols: g.c,
            rs: g.k(),
            cs: g.kh * g.kw,
        }
    }

    /// Whether the tap reads whole image rows in order for its rectangle: stride 1, output rows
    /// as wide as the input's and all of them live, no horizontal shift. Then its [C, area]
    /// input matrix is a view of the image (row stride H·W) and its [O, area] output a view of
    /// the output: no copies.
    fn whole_rows(&self, g: &ConvGeom) -> bool {
        g.stride == 1 && g.wo == g.w && self.ow == (0, g.wo) && self.kj * g.dilation == g.padding
    }

    /// The [rows, area] view of the rectangle's rows in `m` [rows, Ho·Wo] (see
    /// [`Tap::whole_rows`]).
    fn out_view<'a, T>(&self, g: &ConvGeom, m: &'a [T], rows: usize) -> MatRef<'a, T> {
        MatRef {
            data: &m[self.oh.0 * g.wo..],
            rows,
            cols: self.area(),
            rs: g.p(),
            cs: 1,
        }
    }

    /// The [C, area] view of the image rows the tap reads, for a [`Tap::whole_rows`] tap.
    fn in_view<'a, T>(&self, g: &ConvGeom, x: &'a [T]) -> MatRef<'a, T> {
        let ih0 = self.oh.0 + self.ki * g.dilation - g.padding;
        MatRef {
            data: &x[ih0 * g.w..],
            rows: g.c,
            cols: self.area(),
            rs: g.h * g.w,
            cs: 1,
        }
    }
}

/// How each image's convolution is computed.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Plan {
    /// 1×1, stride 1, no padding: the image is its own im2col matrix.
    Pointwise,
    /// im2col over every tap, in bands of output rows.
    Dense,
    /// Dilated kernels whose taps mostly fall in the padding (ASPP's rates 12/24/36 on a 32×32
    /// feature map, where the rate-36 branch is a 1×1 convolution in disguise): one GEMM per
    /// tap, `y[:, rect] += w[:, :, ki, kj] · x[:, rect shifted]`, over the rectangle where that
    /// tap reads the image, in bands of rows that fit the buffer budget. The result is the
    /// dense one; the skipped products are all with zero padding. Each GEMM has the shape of a
    /// 1×1 convolution (inner dimension C, hundreds of columns), which the GEMM runs at full
    /// speed, and its weights are a strided view: nothing is gathered.
    Taps(Vec<Tap>),
}

impl Plan {
    /// The cheapest exact plan for `g`.
    fn new(g: &ConvGeom) -> Self {
        if g.pointwise() {
            return Plan::Pointwise;
        }
        let rows: Vec<(usize, usize)> = (0..g.kh)
            .map(|i| valid_range(g.ho, g.h, i * g.dilation, g.stride, g.padding))
            .collect();
        let cols: Vec<(usize, usize)> = (0..g.kw)
            .map(|j| valid_range(g.wo, g.w, j * g.dilation, g.stride, g.padding))
            .collect();
        let live = |r: &[(usize, usize)]| r.iter().map(|(a, b)| b - a).sum::<usize>();
        let useful = live(&rows) * live(&cols) * g.c;
        if (useful as f64) > SPARSE_MAX_FRACTION * (g.p() * g.k()) as f64 {
            return Plan::Dense;
        }
        let mut taps = Vec::new();
        for (ki, &(oh0, oh1)) in rows.iter().enumerate() {
            for (kj, &ow) in cols.iter().enumerate() {
                if oh0 >= oh1 || ow.0 >= ow.1 {
                    continue;
                }
                // Bands of rows, so that the tap's input and output matrices fit the budget.
                let per_row = g.c.max(g.o) * (ow.1 - ow.0);
                let band = (g.col_budget / per_row.max(1)).clamp(1, oh1 - oh0);
                for r in (oh0..oh1).step_by(band) {
                    taps.push(Tap {
                        ki,
                        kj,
                        oh: (r, (r + band).min(oh1)),
                        ow,
                    });
                }
            }
        }
        Plan::Taps(taps)
    }

    /// Elements of the im2col buffer and of the output scratch buffer.
    fn buffer_lens(&self, g: &ConvGeom) -> (usize, usize) {
        match self {
            Plan::Pointwise => (0, 0),
            Plan::Dense => (g.col_len(), 0),
            // Sized per tap by `Work::fit_tap`: whole-row taps need none in two of the passes.
            Plan::Taps(_) => (0, 0),
        }
    }
}

/// Per-thread scratch space of a plan.
struct Work<T> {
    col: Vec<T>,
    scratch: Vec<T>,
}

impl<T: WithDType> Work<T> {
    fn new(g: &ConvGeom, plan: &Plan) -> Self {
        let (c, s) = plan.buffer_lens(g);
        let zero = T::from_f64(0.0);
        Self {
            col: vec![zero; c],
            scratch: vec![zero; s],
        }
    }

    /// Grows the buffers to hold tap `t`'s input [C, area] and output [O, area] matrices.
    fn fit_tap(&mut self, g: &ConvGeom, t: &Tap) {
        let zero = T::from_f64(0.0);
        let (c, s) = (g.c * t.area(), g.o * t.area());
        if self.col.len() < c {
            self.col = vec![zero; c];
        }
        if self.scratch.len() < s {
            self.scratch = vec![zero; s];
        }
    }
}

/// Calls `f(r, at)` for each output row `r` (counted from the rectangle's first) of the tap's
/// rectangle: `at` is the offset in a channel plane [H, W] of the first input the row reads
/// (all its inputs are inside the image, `stride` apart).
fn for_tap_rows(g: &ConvGeom, t: &Tap, mut f: impl FnMut(usize, usize)) {
    let iw0 = t.ow.0 * g.stride + t.kj * g.dilation - g.padding;
    for oh in t.oh.0..t.oh.1 {
        let ih = oh * g.stride + t.ki * g.dilation - g.padding;
        f(oh - t.oh.0, ih * g.w + iw0);
    }
}

/// Fills `col` [C, area] with the inputs the tap reads over its rectangle. With `par`,
/// parallel over channels.
fn tap_inputs<T: WithDType>(g: &ConvGeom, x: &[T], t: &Tap, col: &mut [T], par: bool) {
    let (area, rw, plane) = (t.area(), t.ow.1 - t.ow.0, g.h * g.w);
    let fill = |(c, dst): (usize, &mut [T])| {
        let x = &x[c * plane..(c + 1) * plane];
        for_tap_rows(g, t, |r, at| {
            let src = x[at..].iter().step_by(g.stride);
            for (d, s) in dst[r * rw..(r + 1) * rw].iter_mut().zip(src) {
                *d = *s;
            }
        })
    };
    let col = &mut col[..g.c * area];
    if par {
        col.par_chunks_mut(area).enumerate().for_each(fill);
    } else {
        col.chunks_mut(area).enumerate().for_each(fill);
    }
}

/// Adjoint of [`tap_inputs`]: adds `dcol` [C, area] into `gx` [C, H, W]. With `par`, parallel
/// over channels.
fn tap_inputs_add<T: WithDType>(g: &ConvGeom, dcol: &[T], t: &Tap, gx: &mut [T], par: bool) {
    let (area, rw, plane) = (t.area(), t.ow.1 - t.ow.0, g.h * g.w);
    let add = |(c, dst): (usize, &mut [T])| {
        let src = &dcol[c * area..(c + 1) * area];
        for_tap_rows(g, t, |r, at| {
            let d = dst[at..].iter_mut().step_by(g.stride);
            for (d, s) in d.zip(&src[r * rw..(r + 1) * rw]) {
                *d += *s;
            }
        })
    };
    if par {
        gx.par_chunks_mut(plane).enumerate().for_each(add);
    } else {
        gx.chunks_mut(plane).enumerate().for_each(add);
    }
}

/// Copies the tap's rectangle of `m` [rows, Ho·Wo] into `dst` [rows, area].
fn gather_rect<T: Copy>(g: &ConvGeom, m: &[T], rows: usize, t: &Tap, dst: &mut [T]) {
    let (p, rw) = (g.p(), t.ow.1 - t.ow.0);
    let mut d = dst[..rows * t.area()].chunks_exact_mut(rw);
    for row in m.chunks_exact(p).take(rows) {
        for oh in t.oh.0..t.oh.1 {
            if let Some(d) = d.next() {
                d.copy_from_slice(&row[oh * g.wo + t.ow.0..oh * g.wo + t.ow.1]);
            }
        }
    }
}

/// Adds `src` [rows, area] into the tap's rectangle of `m` [rows, Ho·Wo].
fn scatter_rect_add<T: WithDType>(g: &ConvGeom, src: &[T], rows: usize, t: &Tap, m: &mut [T]) {
    let (p, rw) = (g.p(), t.ow.1 - t.ow.0);
    let mut s = src[..rows * t.area()].chunks_exact(rw);
    for row in m.chunks_exact_mut(p).take(rows) {
        for oh in t.oh.0..t.oh.1 {
            if let Some(s) = s.next() {
                for (d, v) in row[oh * g.wo + t.ow.0..oh * g.wo + t.ow.1]
                    .iter_mut()
                    .zip(s)
                {
                    *d += *v;
                }
            }
        }
    }
}

impl ConvGeom {
    /// Bands `[oh0, oh1)` of output rows whose im2col matrix fits the budget (at least one row).
    fn bands(&self) -> impl Iterator<Item = (usize, usize)> {
        let rows = (self.col_budget / (self.k() * self.wo).max(1)).clamp(1, self.ho);
        let ho = self.ho;
        (0..ho).step_by(rows).map(move |r| (r, (r + rows).min(ho)))
    }

    /// Size of the im2col buffer for the largest band.
    fn col_len(&self) -> usize {
        if self.pointwise() {
            return 0;
        }
        self.bands()
            .map(|(a, b)| (b - a) * self.wo * self.k())
            .max()
            .unwrap_or(0)
    }
}

/// Fills `col` [k, (oh1-oh0)·Wo] with the receptive fields of output rows `[oh0, oh1)` of one
/// image `x` [C, H, W] (zeros for padding). `par`: spread the rows over the rayon pool.
fn im2col<T: WithDType>(
    g: &ConvGeom,
    x: &[T],
    (oh0, oh1): (usize, usize),
    col: &mut [T],
    par: bool,
) {
    let (bp, khw) = ((oh1 - oh0) * g.wo, g.kh * g.kw);
    let zero = T::from_f64(0.0);
    let fill = |(r, row): (usize, &mut [T])| {
        let (c, ki, kj) = (r / khw, (r / g.kw) % g.kh, r % g.kw);
        let (oh_lo, oh_hi) = valid_range(g.ho, g.h, ki * g.dilation, g.stride, g.padding);
        let (ow_lo, ow_hi) = valid_range(g.wo, g.w, kj * g.dilation, g.stride, g.padding);
        let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for (oh, dst) in (oh0..oh1).zip(row.chunks_exact_mut(g.wo)) {
            if oh < oh_lo || oh >= oh_hi || ow_lo >= ow_hi {
                dst.fill(zero);
                continue;
            }
            let ih = oh * g.stride + ki * g.dilation - g.padding;
            let src = &plane[ih * g.w..(ih + 1) * g.w];
            dst[..ow_lo].fill(zero);
            dst[ow_hi..].fill(zero);
            let iw0 = ow_lo * g.stride + kj * g.dilation - g.padding;
            if g.stride == 1 {
                dst[ow_lo..ow_hi].copy_from_slice(&src[iw0..iw0 + (ow_hi - ow_lo)]);
            } else {
                for (d, s) in dst[ow_lo..ow_hi]
                    .iter_mut()
                    .zip(src[iw0..].iter().step_by(g.stride))
                {
                    *d = *s;
                }
            }
        }
    };
    let col = &mut col[..g.k() * bp];
    if par {
        col.par_chunks_mut(bp)
            .with_min_len(8)
            .enumerate()
            .for_each(fill);
    } else {
        col.chunks_mut(bp).enumerate().for_each(fill);
    }
}

/// Adjoint of [`im2col`]: adds the band `dcol` [k, (oh1-oh0)·Wo] into `gx` [C, H, W]. With `par`,
/// parallel over channels (each channel owns its rows of `dcol`, so no two tasks write the same
/// element).
fn col2im_add<T: WithDType>(
    g: &ConvGeom,
    dcol: &[T],
    (oh0, oh1): (usize, usize),
    gx: &mut [T],
    par: bool,
) {
    let (bp, khw) = ((oh1 - oh0) * g.wo, g.kh * g.kw);
    let add = |(c, plane): (usize, &mut [T])| {
        for ki in 0..g.kh {
            let (oh_lo, oh_hi) = valid_range(g.ho, g.h, ki * g.dilation, g.stride, g.padding);
            let (oh_lo, oh_hi) = (oh_lo.max(oh0), oh_hi.min(oh1));
            for kj in 0..g.kw {
                let (ow_lo, ow_hi) = valid_range(g.wo, g.w, kj * g.dilation, g.stride, g.padding);
                if ow_lo >= ow_hi {
                    continue;
                }
                let row = &dcol[(c * khw + ki * g.kw + kj) * bp..][..bp];
                for oh in oh_lo..oh_hi {
                    let ih = oh * g.stride + ki * g.dilation - g.padding;
                    let iw0 = ow_lo * g.stride + kj * g.dilation - g.padding;
                    let r0 = (oh - oh0) * g.wo;
                    let src = &row[r0 + ow_lo..r0 + ow_hi];
                    let dst = &mut plane[ih * g.w + iw0..(ih + 1) * g.w];
                    if g.stride == 1 {
                        for (d, s) in dst.iter_mut().zip(src) {
                            *d += *s;
                        }
                    } else {
                        for (d, s) in dst.iter_mut().step_by(g.stride).zip(src) {
                            *d += *s;
                        }
                    }
                }
            }
        }
    };
    if par {
        gx.par_chunks_mut(g.h * g.w).enumerate().for_each(add);
    } else {
        gx.chunks_mut(g.h * g.w).enumerate().for_each(add);
    }
}

/// Columns `[oh0·Wo, oh1·Wo)` of the row-major [rows, p] matrix `m` (a band of output rows).
fn band<T>(m: &[T], rows: usize, p: usize, wo: usize, (oh0, oh1): (usize, usize)) -> MatRef<'_, T> {
    MatRef {
        data: &m[oh0 * wo..],
        rows,
        cols: (oh1 - oh0) * wo,
        rs: p,
        cs: 1,
    }
}

/// Images per parallel task: with at least two images and two threads, whole images go to
/// separate threads, each running its GEMMs single-threaded (no synchronisation inside a
/// GEMM, and the small-channel GEMMs of a U-Net, which do not split well, still use every
/// core). Otherwise one task takes every image and parallelises inside each GEMM. Returns
/// `(images per task, parallel inside a task)`.
fn image_split(n: usize) -> (usize, bool) {
    let threads = rayon::current_num_threads();
    if threads > 1 && n > 1 {
        (n.div_ceil(threads.min(n)), false)
    } else {
        (n.max(1), true)
    }
}

/// `y` [N, O, Ho, Wo] from `x` [N, C, H, W] and `w` [O, C, kh, kw].
fn forward<T: WithDType>(g: &ConvGeom, plan: &Plan, x: &[T], w: &[T]) -> Vec<T> {
    let (k, p) = (g.k(), g.p());
    let mut y = super::zeros(g.n * g.o * p);
    let wm = MatRef::row_major(w, g.o, k);
    let (per, par) = image_split(g.n);
    let task = |(xs, ys): (&[T], &mut [T])| {
        let mut work = Work::new(g, plan);
        for (xi, yi) in xs.chunks_exact(g.img()).zip(ys.chunks_exact_mut(g.o * p)) {
            match plan {
                Plan::Pointwise => matmul(yi, p, wm, MatRef::row_major(xi, k, p), false, par),
                Plan::Dense => {
                    for b in g.bands() {
                        let bp = (b.1 - b.0) * g.wo;
                        im2col(g, xi, b, &mut work.col, par);
                        let cm = MatRef::row_major(&work.col, k, bp);
                        matmul(&mut yi[b.0 * g.wo..], p, wm, cm, false, par);
                    }
                }
                Plan::Taps(taps) => {
                    for t in taps {
                        let wt = t.weight(g, w);
                        if t.whole_rows(g) {
                            let dst = &mut yi[t.oh.0 * g.wo..];
                            matmul(dst, p, wt, t.in_view(g, xi), true, par);
                        } else {
                            let area = t.area();
                            work.fit_tap(g, t);
                            tap_inputs(g, xi, t, &mut work.col, par);
                            let cm = MatRef::row_major(&work.col, g.c, area);
                            matmul(&mut work.scratch, area, wt, cm, false, par);
                            scatter_rect_add(g, &work.scratch, g.o, t, yi);
                        }
                    }
                }
            }
        }
    };
    x.par_chunks(per * g.img())
        .zip(y.par_chunks_mut(per * g.o * p))
        .with_max_len(1)
        .for_each(task);
    y
}

/// `gw` [O, C, kh, kw] = Σ_n gy_n · im2col(x_n)ᵀ.
///
/// The GEMM's inner dimension is the number of output pixels, and the `gemm` crate is up to 8×
/// slower on this shape when its destination is the row-major [O, k] weight with few output
/// channels (measured single-threaded: 8.7 against 68.6 GFLOP/s for O = 16, k = 144, 9216
/// pixels). When O < k the transpose [k, O] is accumulated instead and transposed once at the end.
fn grad_weight<T: WithDType>(g: &ConvGeom, plan: &Plan, x: &[T], gy: &[T]) -> Vec<T> {
    let (k, p) = (g.k(), g.p());
    if let Plan::Taps(taps) = plan {
        return grad_weight_taps(g, taps, x, gy);
    }
    let (per, par) = image_split(g.n);
    let transposed = g.o < k;
    // `acc (+)= gy_r [O, cols] · col_r [rows, cols]ᵀ`, into [O, rows] or its transpose [rows, O].
    let gw_gemm = |acc: &mut [T], gy_r: MatRef<'_, T>, col_r: MatRef<'_, T>, accumulate| {
        if transposed {
            matmul(acc, g.o, col_r, gy_r.t(), accumulate, par);
        } else {
            matmul(acc, col_r.rows, gy_r, col_r.t(), accumulate, par);
        }
    };
    let task = |(xs, gys): (&[T], &[T])| {
        let mut gw = vec![T::from_f64(0.0); g.o * k];
        let mut work = Work::new(g, plan);
        for (xi, gyi) in xs.chunks_exact(g.img()).zip(gys.chunks_exact(g.o * p)) {
            match plan {
                Plan::Pointwise => {
                    let (gm, xm) = (MatRef::row_major(gyi, g.o, p), MatRef::row_major(xi, k, p));
                    gw_gemm(&mut gw, gm, xm, true);
                }
                Plan::Dense => {
                    for b in g.bands() {
                        let bp = (b.1 - b.0) * g.wo;
                        im2col(g, xi, b, &mut work.col, par);
                        let cm = MatRef::row_major(&work.col, k, bp);
                        gw_gemm(&mut gw, band(gyi, g.o, p, g.wo, b), cm, true);
                    }
                }
                Plan::Taps(_) => unreachable!("grad_weight_taps takes the tap plan"),
            }
        }
        gw
    };
    sum_partials(partials_per_task(g, per, x, gy, task), g.o, k, transposed)
}

/// `task`'s partial weight gradient for each group of `per` images of `x` and `gy`, one group
/// per rayon task.
fn partials_per_task<T: WithDType>(
    g: &ConvGeom,
    per: usize,
    x: &[T],
    gy: &[T],
    task: impl Fn((&[T], &[T])) -> Vec<T> + Sync + Send,
) -> Vec<Vec<T>> {
    x.par_chunks(per * g.img())
        .zip(gy.par_chunks(per * g.o * g.p()))
        .with_max_len(1)
        .map(task)
        .collect()
}

/// [`grad_weight`] for the tap plan: `gw[:, :, ki, kj] = Σ_n gy_n[:, rect] · x_n[:, rect shifted]ᵀ`
/// per tap, accumulated as [C, O] blocks (the GEMM's fast orientation here) for the live taps
/// only; the dead ones (all padding, e.g. 8 of rate 36's 9 on a 32×32 map) get zeros.
fn grad_weight_taps<T: WithDType>(g: &ConvGeom, taps: &[Tap], x: &[T], gy: &[T]) -> Vec<T> {
    let (k, p, khw, co) = (g.k(), g.p(), g.kh * g.kw, g.c * g.o);
    // Slot of each kernel position in the partial sums, or None for a dead tap.
    let mut slot = vec![None; khw];
    let mut live = 0;
    for t in taps {
        let s = &mut slot[t.ki * g.kw + t.kj];
        if s.is_none() {
            *s = Some(live);
            live += 1;
        }
    }
    let (per, par) = image_split(g.n);
    let task = |(xs, gys): (&[T], &[T])| {
        let mut acc = vec![T::from_f64(0.0); live * co];
        // Sized per tap (`Work::fit_tap`), as the tap plan's `Work::new` leaves them.
        let mut work = Work {
            col: Vec::new(),
            scratch: Vec::new(),
        };
        for (xi, gyi) in xs.chunks_exact(g.img()).zip(gys.chunks_exact(g.o * p)) {
            for t in taps {
                // Every listed tap has a slot (set above).
                let s = slot[t.ki * g.kw + t.kj].unwrap_or_default();
                let (xm, gm) = if t.whole_rows(g) {
                    (t.in_view(g, xi), t.out_view(g, gyi, g.o))
                } else {
                    let area = t.area();
                    work.fit_tap(g, t);
                    tap_inputs(g, xi, t, &mut work.col, par);
                    gather_rect(g, gyi, g.o, t, &mut work.scratch);
                    (
                        MatRef::row_major(&work.col, g.c, area),
                        MatRef::row_major(&work.scratch, g.o, area),
                    )
                };
                matmul(&mut acc[s * co..], g.o, xm, gm.t(), true, par);
            }
        }
        acc
    };
    let acc = sum_partials(
        partials_per_task(g, per, x, gy, task),
        live * g.c,
        g.o,
        false,
    );
    // gw[o, c·khw + tap] = acc[slot(tap)][c][o]: blocks of ROWS output rows per task, reading
    // ROWS consecutive elements of each of acc's rows.
    const ROWS: usize = 16;
    // SAFETY: the tasks' blocks of ROWS·k elements cover the output, and each writes every
    // (row, column) of its block.
    unsafe {
        super::filled(g.o * k, |out| {
            out.par_chunks_mut(ROWS * k)
                .enumerate()
                .for_each(|(bi, blk)| {
                    let (o0, n) = (bi * ROWS, blk.len() / k);
                    for c in 0..g.c {
                        for (tap, s) in slot.iter().enumerate() {
                            let j = c * khw + tap;
                            match s {
                                Some(s) => {
                                    let src = &acc[(s * g.c + c) * g.o + o0..][..n];
                                    for (di, &v) in src.iter().enumerate() {
                                        blk[di * k + j].write(v);
                                    }
                                }
                                None => {
                                    for di in 0..n {
                                        blk[di * k + j].write(T::from_f64(0.0));
                                    }
                                }
                            }
                        }
                    }
                })
        })
    }
}

/// `W′[c, o, i, j] = W[o, c, kh-1-i, kw-1-j]` (see [`ConvGeom::input_grad_conv`]).
fn flip_transpose<T: WithDType>(g: &ConvGeom, w: &[T]) -> Vec<T> {
    let khw = g.kh * g.kw;
    if w.is_empty() {
        return Vec::new();
    }
    // SAFETY: each task writes all O·khw elements of its channel's rows.
    unsafe {
        super::filled(w.len(), |out| {
            out.par_chunks_mut(g.o * khw)
                .enumerate()
                .for_each(|(c, rows)| {
                    for (o, dst) in rows.chunks_exact_mut(khw).enumerate() {
                        let src = &w[(o * g.c + c) * khw..][..khw];
                        for (d, s) in dst.iter_mut().zip(src.iter().rev()) {
                            d.write(*s);
                        }
                    }
                })
        })
    }
}

/// `gx` [N, C, H, W]: the transposed-kernel convolution of `gy` where it applies, else
/// [`grad_input`].
fn input_gradient<T: WithDType>(g: &ConvGeom, gy: &[T], w: &[T]) -> Vec<T> {
    match g.input_grad_conv() {
        Some(gt) => forward(&gt, &Plan::new(&gt), gy, &flip_transpose(g, w)),
        None => grad_input(g, &Plan::new(g), gy, w),
    }
}

/// `gx` [N, C, H, W] = col2im(Wᵀ · gy_n) per image.
fn grad_input<T: WithDType>(g: &ConvGeom, plan: &Plan, gy: &[T], w: &[T]) -> Vec<T> {
    let (k, p) = (g.k(), g.p());
    let mut gx = super::zeros(g.n * g.img());
    let wt = MatRef::row_major(w, g.o, k).t();
    let (per, par) = image_split(g.n);
    let task = |(gys, gxs): (&[T], &mut [T])| {
        let mut work = Work::new(g, plan);
        for (gyi, gxi) in gys.chunks_exact(g.o * p).zip(gxs.chunks_exact_mut(g.img())) {
            match plan {
                Plan::Pointwise => matmul(gxi, p, wt, MatRef::row_major(gyi, g.o, p), false, par),
                Plan::Dense => {
                    for b in g.bands() {
                        let bp = (b.1 - b.0) * g.wo;
                        let gm = band(gyi, g.o, p, g.wo, b);
                        matmul(&mut work.col, bp, wt, gm, false, par);
                        col2im_add(g, &work.col, b, gxi, par);
                    }
                }
                Plan::Taps(taps) => {
                    for t in taps {
                        let area = t.area();
                        work.fit_tap(g, t);
                        gather_rect(g, gyi, g.o, t, &mut work.scratch);
                        let gm = MatRef::row_major(&work.scratch, g.o, area);
                        matmul(&mut work.col, area, t.weight(g, w).t(), gm, false, par);
                        tap_inputs_add(g, &work.col, t, gxi, par);
                    }
                }
            }
        }
    };
    gy.par_chunks(per * g.o * p)
        .zip(gx.par_chunks_mut(per * g.img()))
        .with_max_len(1)
        .for_each(task);
    gx
}

/// Contiguous slice of a CPU storage, or an error naming the op.
pub(crate) fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// Contiguous CPU data of a tensor's storage (from `Tensor::storage_and_layout`), as `T`.
pub(super) fn storage_slice<'a, T: WithDType>(
    s: &'a candle_core::Storage,
    l: &Layout,
    op: &str,
) -> Result<&'a [T]> {
    match s {
        candle_core::Storage::Cpu(c) => slice(c, l, op),
        _ => candle_core::bail!("{op}: CPU tensors expected"),
    }
}

/// Runs `f` on the two storages as f32 or f64 slices.
pub(super) fn dispatch2(
    op: &str,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    f32_fn: impl FnOnce(&[f32], &[f32]) -> Vec<f32>,
    f64_fn: impl FnOnce(&[f64], &[f64]) -> Vec<f64>,
) -> Result<CpuStorage> {
    match (s1, s2) {
        (CpuStorage::F32(_), CpuStorage::F32(_)) => Ok(CpuStorage::F32(f32_fn(
            slice(s1, l1, op)?,
            slice(s2, l2, op)?,
        ))),
        (CpuStorage::F64(_), CpuStorage::F64(_)) => Ok(CpuStorage::F64(f64_fn(
            slice(s1, l1, op)?,
            slice(s2, l2, op)?,
        ))),
        _ => candle_core::bail!(
            "{op}: unsupported dtypes {:?} / {:?} (f32 or f64, both the same)",
            s1.dtype(),
            s2.dtype()
        ),
    }
}

/// The differentiable convolution (x, w) -> y.
struct Conv2d {
    stride: usize,
    padding: usize,
    dilation: usize,
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "driveline-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = ConvGeom::new(
            l1.shape(),
            l2.shape(),
            self.stride,
            self.padding,
            self.dilation,
        )?;
        let y = dispatch2(
            self.name(),
            s1,
            l1,
            s2,
            l2,
            |x, w| match (g.winograd(true), g.direct()) {
                (Some(wg), _) => wg.forward(x, w),
                (None, Some(d)) => d.forward(x, w),
                (None, None) => forward(&g, &Plan::new(&g), x, w),
            },
            |x, w| match g.winograd(false) {
                Some(wg) => wg.forward(x, w),
                None => forward(&g, &Plan::new(&g), x, w),
            },
        )?;
        Ok((y, g.out_shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        gy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = ConvGeom::new(
            x.shape(),
            w.shape(),
            self.stride,
            self.padding,
            self.dilation,
        )?;
        let gy = gy.contiguous()?;
        let gx = if x.track_op() {
            Some(gy.apply_op2_no_bwd(w, &GradInput(g))?)
        } else {
            None
        };
        let gw = if w.track_op() {
            Some(x.apply_op2_no_bwd(&gy, &GradWeight(g))?)
        } else {
            None
        };
        Ok((gx, gw))
    }
}

/// Input gradient (gy, w) -> gx; not itself differentiable.
struct GradInput(ConvGeom);

impl CustomOp2 for GradInput {
    fn name(&self) -> &'static str {
        "driveline-conv2d-grad-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = &self.0;
        if l1.shape() != &g.out_shape() {
            candle_core::bail!(
                "{}: gradient shape {:?} != {:?}",
                self.name(),
                l1.shape(),
                g.out_shape()
            );
        }
        let gx = dispatch2(
            self.name(),
            s1,
            l1,
            s2,
            l2,
            |gy, w| match (g.winograd(true), g.direct()) {
                (Some(wg), _) => wg.grad_input(gy, w),
                (None, Some(d)) => d.grad_input(gy, w),
                (None, None) => input_gradient(g, gy, w),
            },
            |gy, w| match g.winograd(false) {
                Some(wg) => wg.grad_input(gy, w),
                None => input_gradient(g, gy, w),
            },
        )?;
        Ok((gx, Shape::from((g.n, g.c, g.h, g.w))))
    }
}

/// Weight gradient (x, gy) -> gw; not itself differentiable.
struct GradWeight(ConvGeom);

impl CustomOp2 for GradWeight {
    fn name(&self) -> &'static str {
        "driveline-conv2d-grad-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = &self.0;
        if l2.shape() != &g.out_shape() {
            candle_core::bail!(
                "{}: gradient shape {:?} != {:?}",
                self.name(),
                l2.shape(),
                g.out_shape()
            );
        }
        let gw = dispatch2(
            self.name(),
            s1,
            l1,
            s2,
            l2,
            |x, gy| match (g.winograd_grad_weight(), g.direct()) {
                (Some(wg), _) => wg.grad_weight(x, gy),
                (None, Some(d)) => d.grad_weight(x, gy),
                (None, None) => grad_weight(g, &Plan::new(g), x, gy),
            },
            |x, gy| match g.winograd(false) {
                Some(wg) => wg.grad_weight(x, gy),
                None => grad_weight(g, &Plan::new(g), x, gy),
            },
        )?;
        Ok((gw, Shape::from((g.o, g.c, g.kh, g.kw))))
    }
}

/// Differentiable convolution without bias on CPU f32/f64 tensors (see the module doc).
pub(crate) fn conv2d_cpu(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    dilation: usize,
) -> Result<Tensor> {
    ConvGeom::new(x.shape(), w.shape(), stride, padding, dilation)?;
    x.contiguous()?.apply_op2(
        &w.contiguous()?,
        Conv2d {
            stride,
            padding,
            dilation,
        },
    )
}

/// Whether [`conv2d_cpu`] handles tensors of this device and dtype.
pub(crate) fn supported(x: &Tensor) -> bool {
    super::generic::cpu_custom(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small-integer test data, so that f64 sums are exact in any order.
    fn data(xs: &Shape, ws: &Shape, g: &ConvGeom) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let x = (0..xs.elem_count())
            .map(|i| ((i * 37) % 23) as f64 - 11.0)
            .collect();
        let w = (0..ws.elem_count())
            .map(|i| ((i * 13) % 7) as f64 - 3.0)
            .collect();
        let gy = (0..g.n * g.o * g.p())
            .map(|i| ((i * 5) % 11) as f64)
            .collect();
        (x, w, gy)
    }

    /// Processing in bands of output rows gives the same results as one band.
    #[test]
    fn bands_match_single_pass() {
        let geoms = [(1, 2, 3, 1), (2, 1, 1, 1), (1, 2, 2, 2), (1, 1, 3, 3)];
        for (stride, padding, dilation, kernel) in geoms {
            let xs = Shape::from((2, 3, 11, 9));
            let ws = Shape::from((4, 3, kernel, kernel));
            let g = ConvGeom::new(&xs, &ws, stride, padding, dilation).unwrap();
            // Budget of ~1.5 output rows: bands of one row, plus uneven ends.
            let small = ConvGeom {
                col_budget: g.k() * g.wo * 3 / 2,
                ..g
            };
            assert!(small.bands().count() == g.ho && g.bands().count() == 1 || g.pointwise());
            let (x, w, gy) = data(&xs, &ws, &g);
            let plan = if g.pointwise() {
                Plan::Pointwise
            } else {
                Plan::Dense
            };
            assert_eq!(forward(&g, &plan, &x, &w), forward(&small, &plan, &x, &w));
            assert_eq!(
                grad_weight(&g, &plan, &x, &gy),
                grad_weight(&small, &plan, &x, &gy)
            );
            assert_eq!(
                grad_input(&g, &plan, &gy, &w),
                grad_input(&small, &plan, &gy, &w)
            );
        }
    }

    /// ASPP's geometry on a 32×32 feature map: the rate-36 branch only ever reads its centre
    /// tap, rates 12 and 24 take the tap plan, and ordinary 3×3 convolutions stay dense.
    #[test]
    fn plans_for_aspp_rates() {
        let xs = Shape::from((2, 8, 32, 32));
        let ws = Shape::from((4, 8, 3, 3));
        let geom = |rate| ConvGeom::new(&xs, &ws, 1, rate, rate).unwrap();
        let plan = |rate| Plan::new(&geom(rate));
        assert_eq!(plan(1), Plan::Dense);
        assert_eq!(plan(2), Plan::Dense);
        let Plan::Taps(taps12) = plan(12) else {
            panic!("rate 12: {:?}", plan(12))
        };
        // Every tap live on part of the map; the centre column's taps read whole rows.
        assert_eq!(taps12.len(), 9);
        let whole: Vec<_> = taps12.iter().filter(|t| t.whole_rows(&geom(12))).collect();
        assert_eq!(
            whole.iter().map(|t| (t.ki, t.kj)).collect::<Vec<_>>(),
            [(0, 1), (1, 1), (2, 1)]
        );
        match plan(36) {
            Plan::Taps(taps) => {
                assert_eq!(taps.len(), 1);
                assert_eq!((taps[0].ki, taps[0].kj, taps[0].area()), (1, 1, 32 * 32));
            }
            other => panic!("rate 36: {other:?}"),
        }
        match plan(24) {
            Plan::Taps(taps) => {
                let macs: usize = taps.iter().map(Tap::area).sum();
                // Centre 32×32, edges 8×32, corners 8×8.
                assert_eq!(macs, 1024 + 4 * 8 * 32 + 4 * 64);
            }
            other => panic!("rate 24: {other:?}"),
        }
    }

    /// The tap plan (banding included) and image-parallel execution give exactly the
    /// dense, single-task results: forward, weight gradient and input gradient.
    #[test]
    fn sparse_and_image_parallel_match_dense() {
        // (stride, padding, dilation, kernel, budget): dilations large against a 9×11 image;
        // at 10 and 12 some taps never read it (dead rows of taps; only the centre tap).
        let geoms = [
            (1, 6, 6, 3, usize::MAX),
            (1, 10, 10, 3, usize::MAX),
            (1, 12, 12, 3, 40),
            (1, 8, 8, 3, 40),
            (2, 7, 5, 3, usize::MAX),
            (1, 5, 4, 4, 100),
        ];
        // (in, out) channels: the weight gradient is accumulated transposed when out < in·taps.
        let channels = [(5, 4), (1, 12)];
        for ((stride, padding, dilation, kernel, budget), (c, o)) in geoms
            .into_iter()
            .flat_map(|geom| channels.map(|ch| (geom, ch)))
        {
            let xs = Shape::from((3, c, 9, 11));
            let ws = Shape::from((o, c, kernel, kernel));
            let g = ConvGeom::new(&xs, &ws, stride, padding, dilation).unwrap();
            let g = ConvGeom {
                col_budget: budget.min(g.col_budget),
                ..g
            };
            let sparse = Plan::new(&g);
            assert!(matches!(sparse, Plan::Taps(_)), "{g:?}: {sparse:?}");
            let (x, w, gy) = data(&xs, &ws, &g);
            let run = |threads: usize, plan: &Plan| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap()
                    .install(|| {
                        (
                            forward(&g, plan, &x, &w),
                            grad_weight(&g, plan, &x, &gy),
                            grad_input(&g, plan, &gy, &w),
                        )
                    })
            };
            let dense = run(1, &Plan::Dense);
            assert!(dense.0.iter().any(|v| *v != 0.0) && dense.2.iter().any(|v| *v != 0.0));
            assert_eq!(run(1, &sparse), dense, "{g:?}");
            assert_eq!(run(2, &sparse), dense, "{g:?}");
            assert_eq!(run(2, &Plan::Dense), dense, "{g:?}");
        }
    }

    /// The transposed-kernel input gradient equals the col2im one, dense and sparse, and it is
    /// used exactly where it applies.
    #[test]
    fn transposed_kernel_input_gradient_matches_col2im() {
        // (stride, padding, dilation, kernel, uses the transposed kernel)
        let geoms = [
            (1, 1, 1, 3, true),
            (1, 0, 1, 3, true),
            (1, 2, 2, 3, true),
            (1, 6, 6, 3, true),
            (1, 3, 1, 4, true),
            (1, 0, 1, 1, false),
            (2, 1, 1, 3, false),
            (1, 3, 1, 3, false),
        ];
        for (stride, padding, dilation, kernel, transposed) in geoms {
            let xs = Shape::from((3, 5, 9, 11));
            let ws = Shape::from((4, 5, kernel, kernel));
            let g = ConvGeom::new(&xs, &ws, stride, padding, dilation).unwrap();
            assert_eq!(g.input_grad_conv().is_some(), transposed, "{g:?}");
            let (_, w, gy) = data(&xs, &ws, &g);
            let reference = grad_input(&g, &Plan::new(&g), &gy, &w);
            assert!(reference.iter().any(|v| *v != 0.0));
            assert_eq!(input_gradient(&g, &gy, &w), reference, "{g:?}");
        }
    }

    #[test]
    fn valid_range_bounds() {
        // Output i reads input i*stride + off - pad.
        assert_eq!(valid_range(5, 5, 0, 1, 1), (1, 5));
        assert_eq!(valid_range(5, 5, 2, 1, 1), (0, 4));
        // Padding larger than the image: no output reads inside it (an empty range).
        let (lo, hi) = valid_range(3, 2, 0, 1, 12);
        assert!(lo >= hi);
        assert_eq!(valid_range(4, 7, 0, 2, 1), (1, 4));
    }
}
