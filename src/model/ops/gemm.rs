//! Thin safe wrapper over the `gemm` crate (the same GEMM kernels Candle's CPU matmul uses).

use candle_core::WithDType;
use rayon::prelude::*;

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
/// transpose when `transposed`, and returns the row-major `rows` × `cols` sum. Both passes run
/// on the pool: for ASPP's 256 × 2048·9 weight gradient, a serial sum and transpose held the
/// calling thread for tens of milliseconds while the workers waited.
pub(crate) fn sum_partials<T: WithDType>(
    partials: Vec<Vec<T>>,
    rows: usize,
    cols: usize,
    transposed: bool,
) -> Vec<T> {
    /// Elements per task of the sum; rows of the output per task of the transpose.
    const CHUNK: usize = 1 << 14;
    const ROWS: usize = 16;
    let zero = T::from_f64(0.0);
    let mut it = partials.into_iter();
    let mut acc = it.next().unwrap_or_else(|| vec![zero; rows * cols]);
    for part in it {
        acc.par_chunks_mut(CHUNK)
            .zip(part.par_chunks(CHUNK))
            .for_each(|(a, b)| {
                for (a, b) in a.iter_mut().zip(b) {
                    *a += *b;
                }
            });
    }
    if !transposed || rows * cols == 0 {
        return acc;
    }
    // `acc` is `cols` × `rows`. Each task writes `ROWS` whole rows of the output, reading
    // `ROWS` consecutive elements of each of acc's rows.
    // SAFETY: the tasks' blocks of ROWS·cols elements cover the output, and each writes every
    // (row, column) of its block.
    unsafe {
        super::filled(rows * cols, |out| {
            out.par_chunks_mut(ROWS * cols)
                .enumerate()
                .for_each(|(bi, blk)| {
                    let (i0, n) = (bi * ROWS, blk.len() / cols);
                    for (j, src) in acc.chunks_exact(rows).enumerate() {
                        for (di, &v) in src[i0..i0 + n].iter().enumerate() {
                            blk[di * cols + j].write(v);
                        }
                    }
                })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parallel sum and blocked transpose against the plain loops, on shapes with a
    /// partial last block of rows and more than one chunk of elements.
    #[test]
    fn sum_partials_matches_the_plain_sum_and_transpose() {
        for (rows, cols, parts) in [(1, 1, 1), (37, 5, 2), (16, 3, 3), (203, 97, 2)] {
            let partials: Vec<Vec<f64>> = (0..parts)
                .map(|p| {
                    (0..rows * cols)
                        .map(|i| ((i * 7919 + p * 104_729) % 1000) as f64 - 500.0)
                        .collect()
                })
                .collect();
            let sum: Vec<f64> = (0..rows * cols)
                .map(|i| partials.iter().map(|p| p[i]).sum())
                .collect();
            assert_eq!(sum_partials(partials.clone(), rows, cols, false), sum);
            // Transposed: the partials hold cols × rows.
            let t = sum_partials(partials, rows, cols, true);
            for i in 0..rows {
                for j in 0..cols {
                    assert_eq!(
                        t[i * cols + j],
                        sum[j * rows + i],
                        "({rows}, {cols}) at {i},{j}"
                    );
                }
            }
        }
    }
}
