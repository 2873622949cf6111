//! Thin safe wrapper over the `gemm` crate (the same GEMM kernels Candle's CPU matmul uses).

use candle_core::WithDType;

/// A strided, read-only view of a `rows` × `cols` matrix inside a slice.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    /// Distance between consecutive rows.
    pub rs: usize,
    /// Distance between consecutive columns.
    pub cs: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// Row-major contiguous matrix.
    pub fn row_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of this matrix (no copy).
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Whether every element the view addresses lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst = a · b` (or `dst += a · b` when `accumulate`), `dst` an `a.rows` × `b.cols` matrix with
/// unit column stride and row stride `dst_rs`.
///
/// Panics if the shapes disagree or a view reaches outside its slice (internal invariants, not
/// user input). With `par`, runs on the current rayon pool (`--threads` / `RAYON_NUM_THREADS`);
/// otherwise on the calling thread.
pub(crate) fn matmul<T: WithDType>(
    dst: &mut [T],
    dst_rs: usize,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    accumulate: bool,
    par: bool,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "gemm inner dimensions");
    let dst_len = if m == 0 { 0 } else { (m - 1) * dst_rs + n };
    assert!(
        dst_rs >= n && dst.len() >= dst_len && a.in_bounds() && b.in_bounds(),
        "gemm view out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for row in dst.chunks_mut(dst_rs).take(m) {
                row[..n].fill(T::from_f64(0.0));
            }
        }
        return;
    }
    // The pool actually in use: `--threads N` builds it with N threads, which Candle's
    // `get_num_threads` (it reads only RAYON_NUM_THREADS) would not see.
    let threads = rayon::current_num_threads();
    let parallelism = if par && threads > 1 && m * n * k > 32 * 32 * 32 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above guarantee every index the kernel touches is inside the slices,
    // and `dst` is exclusively borrowed so it cannot alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::from_f64(1.0),
            T::from_f64(1.0),
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// Sums the per-task partial results of a `rows` × `cols` matrix (row-major), or of its
/// transpose when `transposed`, and returns the row-major `rows` × `cols` sum.
pub(crate) fn sum_partials<T: WithDType>(
    partials: Vec<Vec<T>>,
    rows: usize,
    cols: usize,
    transposed: bool,
) -> Vec<T> {
    let zero = T::from_f64(0.0);
    let mut it = partials.into_iter();
    let mut acc = it.next().unwrap_or_else(|| vec![zero; rows * cols]);
    for part in it {
        for (a, b) in acc.iter_mut().zip(part) {
            *a += b;
        }
    }
    if !transposed {
        return acc;
    }
    let mut out = vec![zero; rows * cols];
    for (j, row) in acc.chunks_exact(rows).enumerate() {
        for (i, v) in row.iter().enumerate() {
            out[i * cols + j] = *v;
        }
    }
    out
}
