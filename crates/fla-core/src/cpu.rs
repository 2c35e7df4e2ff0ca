//! CPU primitives: the compute float trait, strided matrix views, GEMM, and rayon helpers that
//! spread work over batch × heads.
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

use rayon::prelude::*;

use crate::WithDType;

/// A compute type of the CPU kernels: f32 for speed, f64 for references and gradient checks.
pub trait Float:
    WithDType
    + Default
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + std::iter::Sum
{
    /// 0.
    fn zero() -> Self;
    /// 1.
    fn one() -> Self;
    /// eˣ.
    fn exp(self) -> Self;
    /// `x ← eˣ` for every element. f32 uses a vectorisable polynomial (relative error below
    /// 2·10⁻⁷, 0 below −87.3, ∞ above 88.7); f64 calls the libm `exp` per element.
    fn exp_in_place(x: &mut [Self]) {
        x.iter_mut().for_each(|v| *v = v.exp());
    }
    /// Natural logarithm.
    fn ln(self) -> Self;
    /// Square root.
    fn sqrt(self) -> Self;
    /// `C ← alpha·A·B + beta·C` on raw strided matrices (`A` m×k, `B` k×n, `C` m×n).
    ///
    /// # Safety
    /// Every element addressed through the sizes and strides must be in bounds, and `C` must not
    /// alias `A` or `B`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );
}

macro_rules! float_impl {
    ($t:ty, $gemm:path $(, $exp_slice:expr)?) => {
        impl Float for $t {
            $(
            fn exp_in_place(x: &mut [Self]) {
                x.iter_mut().for_each(|v| *v = $exp_slice(*v));
            }
            )?
            #[inline(always)]
            fn zero() -> Self {
                0.0
            }
            #[inline(always)]
            fn one() -> Self {
                1.0
            }
            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            unsafe fn gemm_raw(
                m: usize,
                k: usize,
                n: usize,
                alpha: Self,
                a: *const Self,
                rsa: isize,
                csa: isize,
                b: *const Self,
                rsb: isize,
                csb: isize,
                beta: Self,
                c: *mut Self,
                rsc: isize,
                csc: isize,
            ) {
                // SAFETY: forwarded from the caller's contract.
                unsafe { $gemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc) }
            }
        }
    };
}
float_impl!(f32, matrixmultiply::sgemm, exp_f32);
float_impl!(f64, matrixmultiply::dgemm);

/// `eˣ` by range reduction `x = n·ln2 + r`, `|r| ≤ ln2/2`, and Cephes' degree-6 polynomial for
/// `eʳ`; branch-free so that loops over it vectorise.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.336_55, 88.722_83);
    let n = (xc * LOG2E + 0.5).floor();
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 0.5;
    let er = p * r * r + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    let y = er * scale;
    if x < -87.336_55 {
        0.0
    } else if x > 88.722_83 {
        f32::INFINITY
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

/// A read-only strided matrix view into a slice.
#[derive(Clone, Copy)]
pub struct MatRef<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

/// A mutable strided matrix view into a slice.
pub struct MatMut<'a, T> {
    data: &'a mut [T],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

fn check_view(len: usize, rows: usize, cols: usize, rs: usize, cs: usize) {
    if rows > 0 && cols > 0 {
        let last = (rows - 1) * rs + (cols - 1) * cs;
        assert!(last < len, "matrix view {rows}x{cols} (strides {rs},{cs}) exceeds slice of {len}");
    }
}

impl<'a, T: Copy> MatRef<'a, T> {
    /// A `rows × cols` view with row stride `rs` and column stride `cs` (elements).
    /// Panics if the view leaves the slice: views are built by kernels, never from user input.
    pub fn new(data: &'a [T], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        check_view(data.len(), rows, cols, rs, cs);
        MatRef { data, rows, cols, rs, cs }
    }
    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        MatRef { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }
    /// Rows `start..start+len`.
    pub fn rows(self, start: usize, len: usize) -> Self {
        assert!(start + len <= self.rows);
        MatRef { data: &self.data[(start * self.rs).min(self.data.len())..], rows: len, ..self }
    }
    /// Element `(i, j)`.
    #[inline(always)]
    pub fn at(&self, i: usize, j: usize) -> T {
        self.data[i * self.rs + j * self.cs]
    }
    /// Number of rows.
    pub fn nrows(&self) -> usize {
        self.rows
    }
    /// Number of columns.
    pub fn ncols(&self) -> usize {
        self.cols
    }
}

impl<'a, T: Copy> MatMut<'a, T> {
    /// A mutable `rows × cols` view with row stride `rs` and column stride `cs`.
    pub fn new(data: &'a mut [T], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        check_view(data.len(), rows, cols, rs, cs);
        MatMut { data, rows, cols, rs, cs }
    }
    /// Reborrow.
    pub fn rb(&mut self) -> MatMut<'_, T> {
        MatMut { data: self.data, rows: self.rows, cols: self.cols, rs: self.rs, cs: self.cs }
    }
}

/// `C ← alpha·A·B + beta·C`. Panics if the shapes disagree (a kernel bug, not a user error).
/// When `beta` is 0, `C` is overwritten and its old contents (even NaN) are ignored.
pub fn gemm<T: Float>(alpha: T, a: MatRef<'_, T>, b: MatRef<'_, T>, beta: T, c: MatMut<'_, T>) {
    assert!(a.cols == b.rows && c.rows == a.rows && c.cols == b.cols, "gemm shape mismatch");
    if c.rows == 0 || c.cols == 0 {
        return;
    }
    if a.cols == 0 {
        for i in 0..c.rows {
            for j in 0..c.cols {
                let x = &mut c.data[i * c.rs + j * c.cs];
                *x = if beta == T::zero() { T::zero() } else { beta * *x };
            }
        }
        return;
    }
    // SAFETY: the views were bounds-checked at construction and `c` is a unique borrow.
    unsafe {
        T::gemm_raw(
            a.rows,
            a.cols,
            b.cols,
            alpha,
            a.data.as_ptr(),
            a.rs as isize,
            a.cs as isize,
            b.data.as_ptr(),
            b.rs as isize,
            b.cs as isize,
            beta,
            c.data.as_mut_ptr(),
            c.rs as isize,
            c.cs as isize,
        )
    }
}

/// `Σ aᵢ·bᵢ` with eight independent partial sums, so that the reduction vectorises (a plain
/// float `sum` stays scalar: the compiler may not reassociate it).
#[inline(always)]
pub fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [T::zero(); 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: T = ac.remainder().iter().zip(bc.remainder()).map(|(&x, &y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().fold(tail, |s, &x| s + x)
}

/// Runs `f(i, chunk)` over the `chunk`-sized pieces of `data` in parallel (one piece per batch ×
/// head, typically).
pub fn par_chunks_mut<T: Send>(data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) {
    if chunk == 0 {
        return;
    }
    data.par_chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i, c));
}

/// Elementwise map in parallel.
pub fn par_map<T: Copy + Send + Sync, U: Send>(x: &[T], f: impl Fn(T) -> U + Sync) -> Vec<U> {
    x.par_iter().with_min_len(4096).map(|&v| f(v)).collect()
}

/// `‖a − b‖ / ‖b‖` in f64 (the absolute norm when `b` is 0). NaN anywhere gives NaN. This equals
/// the relative RMSE `rms(a − b) / rms(b)` used for bf16 tolerances.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    if a.iter().chain(b).any(|x| x.is_nan()) {
        return f64::NAN;
    }
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_strided_transposed() {
        // A is 2x3 stored transposed (column-major), B 3x2 row-major.
        let a = [1.0f64, 4.0, 2.0, 5.0, 3.0, 6.0];
        let b = [1.0f64, 0.0, 0.0, 1.0, 1.0, 1.0];
        let mut c = [f64::NAN; 4];
        gemm(1.0, MatRef::new(&a, 2, 3, 1, 2), MatRef::new(&b, 3, 2, 2, 1), 0.0, MatMut::new(&mut c, 2, 2, 2, 1));
        assert_eq!(c, [4.0, 5.0, 10.0, 11.0]);
    }

    #[test]
    fn dot_matches_sum() {
        let a: Vec<f64> = (0..19).map(|i| i as f64 * 0.5).collect();
        let b: Vec<f64> = (0..19).map(|i| 1.0 - i as f64).collect();
        let want: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - want).abs() < 1e-12);
    }

    #[test]
    fn exp_f32_matches_libm() {
        let mut worst = 0.0f64;
        for i in -197_000..=200_000 {
            let x = i as f32 * 4.4e-4;
            let (a, b) = (exp_f32(x) as f64, (x as f64).exp());
            worst = worst.max(((a - b) / b).abs());
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(-1000.0), 0.0);
        assert_eq!(exp_f32(-87.4), 0.0);
        assert_eq!(exp_f32(1000.0), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        let mut v = [0.0f32, 1.0, -2.5];
        f32::exp_in_place(&mut v);
        assert!((v[1] - std::f32::consts::E).abs() < 1e-6 && v[0] == 1.0);
    }

    #[test]
    fn rel_err_nan_fails() {
        assert!(rel_err(&[f64::NAN], &[1.0]).is_nan());
        assert_eq!(rel_err(&[2.0], &[1.0]), 1.0);
    }
}
