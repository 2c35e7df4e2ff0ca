//! Matrix products of CUDA tensors through cuBLAS: [`matmul`] and [`matmul_into`], in f32,
//! bf16 and f16, always accumulating in f32.
//!
//! `a` is `[.., K]` (leading dimensions are flattened into `M` rows) and `b` is `[K, N]`, or
//! `[N, K]` with `b_transposed` — the layout of a Hugging Face `Linear` weight, so that
//! `matmul(x, w, true)` is `y = x·Wᵀ`. The output has `a`'s dtype and shape `[.., N]`.
//!
//! cuBLAS is column-major and our tensors are row-major. A row-major `[R, C]` buffer is the
//! column-major `[C, R]` matrix, its transpose, so the row-major `C = A·B` is computed as the
//! column-major `Cᵀ = Bᵀ·Aᵀ`: cuBLAS's first operand is `b` (transposed by cuBLAS when it is
//! stored `[N, K]`), its second is `a`, and nothing is copied.
//!
//! - bf16 / f16: `cublasGemmEx` with `CUBLAS_COMPUTE_32F` (f32 accumulation on tensor cores,
//!   output rounded once to 16 bits).
//! - f32: `cublasSgemm` under `CUBLAS_DEFAULT_MATH`, so TF32 stays off and results agree with
//!   the CPU [`Tensor::matmul`](crate::Tensor::matmul) to f32 rounding (unless the process sets
//!   `NVIDIA_TF32_OVERRIDE=1`, which cuBLAS obeys over the math mode).
//!
//! Each device has one cuBLAS handle, created on its first product and bound to the device's
//! stream ([`CudaDevice::stream`]), so products are ordered with every other fla-rs kernel on
//! that device. Creating it checks for `libcublas` first (cudarc panics when a library is
//! missing), so a machine without cuBLAS, a driver or a GPU gets [`Error::Cuda`], never a panic.
//!
//! ```
//! use fla_core::cuda::{self, CudaDevice, CudaTensor};
//! use fla_core::{cuda_blas, Tensor};
//! if !cuda::is_available() {
//!     return Ok(()); // no GPU here: nothing to show
//! }
//! let dev = CudaDevice::get(0)?;
//! let x = CudaTensor::from_host(&Tensor::from_vec(vec![1.0f32, 2.0], &[1, 2])?, &dev)?;
//! // A Linear weight [out = 3, in = 2], row-major as in a checkpoint.
//! let w = Tensor::from_vec(vec![1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0], &[3, 2])?;
//! let y = cuda_blas::matmul(&x, &CudaTensor::from_host(&w, &dev)?, true)?;
//! assert_eq!(y.to_host()?.to_vec::<f32>()?, vec![1.0, 2.0, 3.0]);
//! # Ok::<(), fla_core::Error>(())
//! ```
use std::collections::HashMap;
use std::panic::catch_unwind;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::sys::{cublasMath_t, cublasOperation_t};
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use half::{bf16, f16};

use crate::cuda::{guarded, CudaDevice, CudaStorage, CudaTensor};
use crate::{DType, Error, Result};

/// Whether the cuBLAS library (`libcublas`) can be loaded. Never panics.
pub fn cublas_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: is_culib_present only tries to dlopen the candidate library names.
    *PRESENT.get_or_init(|| catch_unwind(|| unsafe { cudarc::cublas::sys::is_culib_present() }).unwrap_or(false))
}

/// Runs `f` with the cuBLAS handle of `dev`, creating it on first use.
///
/// The handle is bound to the device's stream and kept for the life of the process. The lock
/// is held while `f` enqueues its work (not while the GPU runs it): cuBLAS advises against
/// sharing one handle between threads at the same time.
fn with_handle<T>(dev: &Arc<CudaDevice>, f: impl FnOnce(&CudaBlas) -> Result<T>) -> Result<T> {
    static HANDLES: OnceLock<Mutex<HashMap<usize, Arc<Mutex<CudaBlas>>>>> = OnceLock::new();
    fn poisoned<G>(_: std::sync::PoisonError<G>) -> Error {
        Error::Cuda("cuBLAS handle lock poisoned".into())
    }
    let blas = {
        let mut map = HANDLES.get_or_init(Default::default).lock().map_err(poisoned)?;
        match map.get(&dev.ordinal()) {
            Some(b) => b.clone(),
            None => {
                if !cublas_present() {
                    return Err(Error::Cuda(
                        "the cuBLAS library libcublas.so was not found (it ships with the CUDA 13 toolkit \
                         and the nvidia-cublas Python wheel)"
                            .into(),
                    ));
                }
                let blas = guarded("creating the cuBLAS handle", || {
                    let blas = CudaBlas::new(dev.stream().clone())
                        .map_err(|e| Error::Cuda(format!("creating the cuBLAS handle on {}: {e}", dev.device())))?;
                    // SAFETY: the handle was just created and is valid; setting the math mode
                    // only changes which algorithms later calls may pick.
                    unsafe {
                        cudarc::cublas::sys::cublasSetMathMode(*blas.handle(), cublasMath_t::CUBLAS_DEFAULT_MATH)
                    }
                    .result()
                    .map_err(|e| Error::Cuda(format!("cublasSetMathMode: {e}")))?;
                    Ok(Arc::new(Mutex::new(blas)))
                })?;
                map.insert(dev.ordinal(), blas.clone());
                blas
            }
        }
    };
    let blas = blas.lock().map_err(poisoned)?;
    dev.context().bind_to_thread()?;
    guarded("cuBLAS", || f(&blas))
}

/// The sizes of one product, after the checks.
struct Dims {
    /// Rows of `a` (all its leading dimensions).
    m: usize,
    /// Columns of the output.
    n: usize,
    /// The contracted dimension.
    k: usize,
    /// `a`'s shape with the last dimension replaced by `n`.
    out_shape: Vec<usize>,
}

/// Checks `a` and `b` of [`matmul`] / [`matmul_into`] and returns the sizes.
fn check(op: &'static str, a: &CudaTensor, b: &CudaTensor, b_transposed: bool) -> Result<Dims> {
    let Some((&k, lead)) = a.shape().split_last() else {
        return Err(Error::shape(op, "a", "[.., K] (at least one dimension)", a.shape()));
    };
    let b_layout = if b_transposed { "[N, K]" } else { "[K, N]" };
    let (bk, n) = match *b.shape() {
        [r, c] if b_transposed => (c, r),
        [r, c] => (r, c),
        _ => return Err(Error::shape(op, "b", b_layout, b.shape())),
    };
    if bk != k {
        return Err(Error::shape(op, "b", format!("{b_layout} with K = {k} (the last dimension of `a`)"), b.shape()));
    }
    if !matches!(a.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        return Err(Error::DType { op, arg: "a", expected: "f32, bf16 or f16".into(), got: a.dtype() });
    }
    if b.dtype() != a.dtype() {
        return Err(Error::DType {
            op,
            arg: "b",
            expected: format!("{} (the dtype of `a`)", a.dtype()),
            got: b.dtype(),
        });
    }
    if b.device() != a.device() {
        return Err(Error::Device {
            op,
            arg: "b",
            expected: format!("{} (the device of `a`)", a.device()),
            got: b.device().to_string(),
        });
    }
    let m: usize = lead.iter().product();
    if [m, n, k].iter().any(|&x| x > i32::MAX as usize) {
        return Err(Error::size(op, format!("M = {m}, N = {n}, K = {k}: cuBLAS takes sizes up to {}", i32::MAX)));
    }
    let mut out_shape = lead.to_vec();
    out_shape.push(n);
    Ok(Dims { m, n, k, out_shape })
}

/// `a · b` (or `a · bᵀ` when `b_transposed`) into a new tensor of `a`'s dtype, accumulated in f32.
///
/// - `a`: `[.., K]`, f32, bf16 or f16; leading dimensions are rows (`M` = their product).
/// - `b`: `[K, N]`, or `[N, K]` when `b_transposed` (a `Linear` weight `[out, in]`: `y = x·Wᵀ`);
///   same dtype and device as `a`.
/// - returns `[.., N]` on `a`'s device, ordered on its stream (not waited for).
///
/// Errors: [`Error::Shape`] (`a` of rank 0, `b` not of rank 2 or its `K` unlike `a`'s),
/// [`Error::DType`] (`b` unlike `a`), [`Error::Device`], [`Error::Size`] (a size over
/// `i32::MAX`), [`Error::Cuda`] (no cuBLAS library, or a failed call).
pub fn matmul(a: &CudaTensor, b: &CudaTensor, b_transposed: bool) -> Result<CudaTensor> {
    const OP: &str = "cuda_blas::matmul";
    let d = check(OP, a, b, b_transposed)?;
    let dev = a.cuda_device();
    if d.k == 0 || d.m == 0 || d.n == 0 {
        return CudaTensor::zeros(&d.out_shape, a.dtype(), dev);
    }
    // SAFETY: `gemm` writes all `m × n` elements (beta = 0, so the old contents are never read)
    // on the device's stream, before anything else on that stream can read them.
    let mut out = unsafe { CudaTensor::uninit(&d.out_shape, a.dtype(), dev)? };
    gemm(OP, a, b, b_transposed, &d, out.storage_mut())?;
    Ok(out)
}

/// `a · b` (or `a · bᵀ` when `b_transposed`) written over `out`, which must have shape `[.., N]`
/// (`a`'s leading dimensions), `a`'s dtype and `a`'s device. Same arguments, accumulation and
/// errors as [`matmul`] (the dtype, shape or device of `out` is an error naming `out`); the
/// previous contents of `out` are neither read nor added to.
pub fn matmul_into(a: &CudaTensor, b: &CudaTensor, b_transposed: bool, out: &mut CudaTensor) -> Result<()> {
    const OP: &str = "cuda_blas::matmul_into";
    let d = check(OP, a, b, b_transposed)?;
    if out.shape() != d.out_shape {
        return Err(Error::shape(OP, "out", format!("{:?}", d.out_shape), out.shape()));
    }
    if out.dtype() != a.dtype() {
        return Err(Error::DType {
            op: OP,
            arg: "out",
            expected: format!("{} (the dtype of `a`)", a.dtype()),
            got: out.dtype(),
        });
    }
    if out.device() != a.device() {
        return Err(Error::Device {
            op: OP,
            arg: "out",
            expected: format!("{} (the device of `a`)", a.device()),
            got: out.device().to_string(),
        });
    }
    if d.m == 0 || d.n == 0 {
        return Ok(());
    }
    if d.k == 0 {
        let s = a.cuda_device().stream();
        match out.storage_mut() {
            CudaStorage::F32(c) => s.memset_zeros(c)?,
            CudaStorage::BF16(c) => s.memset_zeros(c)?,
            CudaStorage::F16(c) => s.memset_zeros(c)?,
        }
        return Ok(());
    }
    gemm(OP, a, b, b_transposed, &d, out.storage_mut())
}

/// Enqueues the checked product on the device's stream (`m`, `n`, `k` all positive).
fn gemm(
    op: &'static str,
    a: &CudaTensor,
    b: &CudaTensor,
    b_transposed: bool,
    d: &Dims,
    out: &mut CudaStorage,
) -> Result<()> {
    // Column-major Cᵀ [n × m] = op(b) [n × k] · aᵀ [k × m]; `check` kept every size within i32.
    let (m, n, k) = (d.m as i32, d.n as i32, d.k as i32);
    let (transa, lda) =
        if b_transposed { (cublasOperation_t::CUBLAS_OP_T, k) } else { (cublasOperation_t::CUBLAS_OP_N, n) };
    fn cfg<T>(transa: cublasOperation_t, lda: i32, [m, n, k]: [i32; 3], one: T, zero: T) -> GemmConfig<T> {
        GemmConfig {
            transa,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: n,
            n: m,
            k,
            alpha: one,
            lda,
            ldb: k,
            beta: zero,
            ldc: n,
        }
    }
    let mnk = [m, n, k];
    with_handle(a.cuda_device(), |blas| {
        // SAFETY: `check` verified the shapes, so `b` holds n·k, `a` m·k and `out` m·n elements
        // (the caller checked `out`), exactly what these sizes and leading dimensions address;
        // all three live on the handle's device and are used on its stream.
        let r = unsafe {
            match (b.storage(), a.storage(), out) {
                (CudaStorage::F32(b), CudaStorage::F32(a), CudaStorage::F32(c)) => {
                    blas.gemm(cfg(transa, lda, mnk, 1.0f32, 0.0), b, a, c)
                }
                (CudaStorage::BF16(b), CudaStorage::BF16(a), CudaStorage::BF16(c)) => {
                    blas.gemm(cfg(transa, lda, mnk, bf16::ONE, bf16::ZERO), b, a, c)
                }
                (CudaStorage::F16(b), CudaStorage::F16(a), CudaStorage::F16(c)) => {
                    blas.gemm(cfg(transa, lda, mnk, f16::ONE, f16::ZERO), b, a, c)
                }
                _ => return Err(Error::Cuda(format!("{op}: dtypes changed after the checks"))),
            }
        };
        r.map_err(|e| Error::Cuda(format!("{op}: cuBLAS GEMM of [{m}, {k}]·[{k}, {n}] failed: {e}")))
    })
}
