//! `y = x·Wᵀ` on the GPU, the product behind every projection of the GPU layers: [`matmul_t`]
//! runs the GEMV kernel (`fla-kernels/cuda/gemv.cu`) when `x` has at most [`GEMV_MAX_ROWS`]
//! rows (a decode step) and cuBLAS ([`fla_core::cuda_blas::matmul`]) otherwise.
//!
//! Why a kernel of our own: with one row, `x·Wᵀ` reads each weight once and does two flops with
//! it, so its time is the weight's bytes over the HBM rate. cuBLAS's kernels for one row reach
//! that rate only for large matrices (an H200 measured 0.35 TB/s on a `[1024, 2048]` bf16 weight,
//! 1.2 TB/s plus a split-K reduce kernel on `[1024, 3584]`, 4.2 TB/s on the LM head). The GEMV
//! kernel gives each warp 8 rows of W and a slice of K, keeps 8 (or 16) 16-byte loads of W in
//! flight per thread, multiplies on tensor cores for bf16 / f16 (FMAs for f32), and splits K over
//! the warps of a CTA when N is small, so that a 4 MB weight still spreads over every SM.
//!
//! The kernel takes 1 to 8 rows, K a multiple of 16 bytes (8 bf16 / f16 elements, 4 f32) and
//! 16-byte-aligned buffers; [`gemv_supported`] says whether a pair fits, [`gemv`] runs the kernel
//! or says why not. `FLA_GEMV=0` in the environment sends every [`matmul_t`] to cuBLAS (to
//! compare the two in a whole model).
//!
//! ```
//! use fla_core::cuda::{self, CudaDevice, CudaTensor};
//! use fla_core::Tensor;
//! use fla_nn::matmul::matmul_t;
//! if !cuda::is_available() {
//!     return Ok(()); // no GPU here: nothing to show
//! }
//! let dev = CudaDevice::get(0)?;
//! let x = CudaTensor::from_host(&Tensor::from_vec(vec![1.0f32, 2.0, 0.0, 0.0], &[1, 4])?, &dev)?;
//! // A Linear weight [out = 2, in = 4].
//! let w = Tensor::from_vec(vec![1.0f32, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0], &[2, 4])?;
//! let y = matmul_t(&x, &CudaTensor::from_host(&w, &dev)?)?;
//! assert_eq!(y.to_host()?.to_vec::<f32>()?, vec![1.0, 3.0]);
//! # Ok::<(), fla_core::Error>(())
//! ```
use std::sync::OnceLock;

use fla_core::cuda::cudarc::driver::{DeviceRepr, LaunchConfig};
use fla_core::cuda::CudaTensor;
use fla_core::{cuda_blas, DType, Error, Result};

use crate::cuda::launch;

/// Most rows of `x` (the product of its leading dimensions) the GEMV kernel takes; [`matmul_t`]
/// sends more to cuBLAS.
pub const GEMV_MAX_ROWS: usize = 8;

/// Warps per CTA (`GEMV_WARPS` in `gemv.cu`).
const WARPS: usize = 8;
/// Rows of W per warp tile.
const TILE_ROWS: usize = 8;
/// 16-byte vectors of a row that the four lanes of a tile row read in one step.
const VECS_PER_STEP: usize = 4;

/// Mirror of `GemvParams` in `gemv.cu` (same order, `repr(C)`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct GemvParams {
    x: u64,
    w: u64,
    y: u64,
    n: i32,
    k: i32,
    m: i32,
    splits: i32,
}
// SAFETY: plain old data in the C layout the kernel reads.
unsafe impl DeviceRepr for GemvParams {}

/// The sizes of one GEMV, after the checks.
struct Plan {
    /// Rows of `x`.
    m: usize,
    /// Rows of `w` (output columns).
    n: usize,
    /// The contracted dimension.
    k: usize,
    /// `x`'s shape with the last dimension replaced by `n`.
    out_shape: Vec<usize>,
}

/// Whether `FLA_GEMV` leaves the kernel on (anything but `0`, `off` or `false`), read once.
fn gemv_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("FLA_GEMV")
            .map_or(true, |v| !matches!(v.trim().to_ascii_lowercase().as_str(), "0" | "off" | "false"))
    })
}

/// Checks `x` and `w` for the GEMV kernel: the errors of [`gemv`].
fn plan(op: &'static str, x: &CudaTensor, w: &CudaTensor) -> Result<Plan> {
    let Some((&k, lead)) = x.shape().split_last() else {
        return Err(Error::shape(op, "x", "[.., K] (at least one dimension)", x.shape()));
    };
    let n = match *w.shape() {
        [n, wk] if wk == k => n,
        [_, _] => {
            return Err(Error::shape(op, "w", format!("[N, K] with K = {k} (the last dimension of `x`)"), w.shape()))
        }
        _ => return Err(Error::shape(op, "w", "[N, K]", w.shape())),
    };
    let elem = match x.dtype() {
        DType::F32 => 4,
        DType::BF16 | DType::F16 => 2,
        got => return Err(Error::DType { op, arg: "x", expected: "f32, bf16 or f16".into(), got }),
    };
    if w.dtype() != x.dtype() {
        return Err(Error::DType {
            op,
            arg: "w",
            expected: format!("{} (the dtype of `x`)", x.dtype()),
            got: w.dtype(),
        });
    }
    if w.device() != x.device() {
        return Err(Error::Device {
            op,
            arg: "w",
            expected: format!("{} (the device of `x`)", x.device()),
            got: w.device().to_string(),
        });
    }
    let m: usize = lead.iter().product();
    if m == 0 || m > GEMV_MAX_ROWS || n == 0 || k == 0 {
        return Err(Error::Unsupported {
            op,
            msg: format!("{m} rows, N = {n}, K = {k}: the GEMV kernel takes 1 to {GEMV_MAX_ROWS} rows and N, K ≥ 1"),
        });
    }
    if (k * elem) % 16 != 0 {
        return Err(Error::Unsupported {
            op,
            msg: format!("K = {k}: the GEMV kernel reads 16-byte vectors, so K must be a multiple of {}", 16 / elem),
        });
    }
    if n > i32::MAX as usize || k > i32::MAX as usize {
        return Err(Error::size(op, format!("N = {n}, K = {k}: the GEMV kernel takes sizes up to {}", i32::MAX)));
    }
    if x.raw_addr() % 16 != 0 || w.raw_addr() % 16 != 0 {
        return Err(Error::Unsupported { op, msg: "x and w must start on 16-byte boundaries".into() });
    }
    let mut out_shape = lead.to_vec();
    out_shape.push(n);
    Ok(Plan { m, n, k, out_shape })
}

/// Warps per tile along K: doubled (up to the CTA's 8) while the grid has fewer than 16 warps
/// per SM and every warp keeps at least 4 steps of 16-byte loads.
fn splits(tiles: usize, steps: usize, sms: usize) -> usize {
    let mut s = 1;
    while s < WARPS && tiles * s < 16 * sms && steps >= 2 * s * 4 {
        s *= 2;
    }
    s
}

/// Steps whose loads a thread issues together: 16 (bf16 / f16) when the grid has at most one CTA
/// per SM, so registers are no object, and each warp has more than 8 steps (`per_warp`); else 8.
fn unroll(sixteen_bit: bool, ctas: usize, per_warp: usize, sms: usize) -> usize {
    if sixteen_bit && ctas <= sms && per_warp > 8 {
        16
    } else {
        8
    }
}

/// Launches the kernel on a checked pair.
fn run(op: &'static str, x: &CudaTensor, w: &CudaTensor, p: &Plan) -> Result<CudaTensor> {
    let dev = x.cuda_device();
    let sixteen_bit = x.dtype() != DType::F32;
    let vec = if sixteen_bit { 8 } else { 4 };
    let tiles = p.n.div_ceil(TILE_ROWS);
    let steps = (p.k / vec).div_ceil(VECS_PER_STEP);
    let s = splits(tiles, steps, dev.sm_count());
    let ctas = (tiles * s).div_ceil(WARPS);
    let grid =
        u32::try_from(ctas).map_err(|_| Error::size(op, format!("N = {}: more CTAs than one launch takes", p.n)))?;
    let name = match (x.dtype(), unroll(sixteen_bit, ctas, steps.div_ceil(s), dev.sm_count())) {
        (DType::F32, _) => "gemv_f32_u8",
        (DType::BF16, 16) => "gemv_bf16_u16",
        (DType::BF16, _) => "gemv_bf16_u8",
        (_, 16) => "gemv_f16_u16",
        _ => "gemv_f16_u8",
    };
    let image = fla_kernels::cubin("gemv").map_err(|msg| Error::NoCudaKernel { kernel: name.to_string(), msg })?;
    let f = dev.function("gemv", image, name)?;
    // SAFETY: the kernel writes every element of y (each m < M, n < N once) before anything on
    // the stream reads it.
    let mut y = unsafe { CudaTensor::uninit(&p.out_shape, x.dtype(), dev)? };
    let params = GemvParams {
        x: x.raw_addr(),
        w: w.raw_addr(),
        y: y.raw_addr_mut(),
        n: p.n as i32,
        k: p.k as i32,
        m: p.m as i32,
        splits: s as i32,
    };
    let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (32 * WARPS as u32, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: `plan` checked that x holds m·k, w n·k and y m·n elements of one dtype on one
    // device, K a multiple of the 16-byte vector and both inputs 16-byte aligned, which is all
    // the kernel reads (loads past a row's K or past N are predicated off); y is written only at
    // m < M, n < N. All three stay alive until the stream has run the kernel (y is returned, x
    // and w are borrowed by the caller, and stream-ordered frees wait for it).
    unsafe { launch(dev, &f, cfg, &params) }?;
    Ok(y)
}

/// `x·Wᵀ` through the GEMV kernel: `x [.., K]` (at most [`GEMV_MAX_ROWS`] rows in its leading
/// dimensions), `w [N, K]` (a `Linear` weight), both f32, bf16 or f16 of one dtype on one device,
/// K a multiple of 16 bytes (8 bf16 / f16 elements, 4 f32), both buffers 16-byte aligned.
/// Returns `[.., N]` in that dtype (accumulated in f32), ordered on the device's stream.
///
/// Errors: [`Error::Shape`] (`x` of rank 0, `w` not `[N, K]` with `x`'s K), [`Error::DType`],
/// [`Error::Device`], [`Error::Unsupported`] (no rows, more than [`GEMV_MAX_ROWS`], N or K of
/// zero, K not a multiple of the vector, unaligned buffers), [`Error::Size`] (N or K over
/// `i32::MAX`), [`Error::NoCudaKernel`] (a build without nvcc). [`matmul_t`] takes cuBLAS for
/// everything this refuses.
pub fn gemv(x: &CudaTensor, w: &CudaTensor) -> Result<CudaTensor> {
    const OP: &str = "matmul::gemv";
    let p = plan(OP, x, w)?;
    run(OP, x, w, &p)
}

/// Whether [`gemv`] takes `x` and `w` (and this build has the kernel): the test [`matmul_t`]
/// makes before falling back to cuBLAS, `FLA_GEMV` aside.
pub fn gemv_supported(x: &CudaTensor, w: &CudaTensor) -> bool {
    fla_kernels::compiled() && plan("matmul::gemv", x, w).is_ok()
}

/// `x·Wᵀ` for a layer's projection: `x [.., K]` (rows = the product of its leading dimensions),
/// `w [N, K]` (a `Linear` weight), both f32, bf16 or f16 of one dtype on one device; returns
/// `[.., N]` in that dtype, accumulated in f32, ordered on the device's stream.
///
/// Up to [`GEMV_MAX_ROWS`] rows with a shape the GEMV kernel takes (see [`gemv`]) run the
/// kernel; everything else, and everything when `FLA_GEMV=0`, runs
/// [`cuda_blas::matmul(x, w, true)`](fla_core::cuda_blas::matmul), whose typed errors bad
/// arguments get ([`Error::Shape`], [`Error::DType`], [`Error::Device`], [`Error::Size`],
/// [`Error::Cuda`]).
pub fn matmul_t(x: &CudaTensor, w: &CudaTensor) -> Result<CudaTensor> {
    const OP: &str = "matmul::matmul_t";
    let few_rows = x.shape().split_last().is_some_and(|(_, lead)| lead.iter().product::<usize>() <= GEMV_MAX_ROWS);
    if few_rows && gemv_enabled() && fla_kernels::compiled() {
        if let Ok(p) = plan(OP, x, w) {
            return run(OP, x, w, &p);
        }
    }
    cuda_blas::matmul(x, w, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_fill_the_gpu() {
        let sms = 132;
        let steps = |k: usize| (k / 8).div_ceil(VECS_PER_STEP);
        // Out-projection [1024, 2048] and down [1024, 3584]: 128 tiles, K over all 8 warps.
        assert_eq!(splits(128, steps(2048), sms), 8);
        assert_eq!(splits(128, steps(3584), sms), 8);
        // gate | up [7168, 1024], in-projection [8224, 1024]: 4 warps per tile.
        assert_eq!(splits(896, steps(1024), sms), 4);
        assert_eq!(splits(1028, steps(1024), sms), 4);
        // The LM head has tiles enough; a short K is not split below 4 steps a warp.
        assert_eq!(splits(31040, steps(1024), sms), 1);
        assert_eq!(splits(1, steps(8), sms), 1);
        assert_eq!(splits(1, steps(256), sms), 2);
    }

    #[test]
    fn unroll_doubles_for_long_k_on_few_ctas() {
        // down [1024, 3584]: 128 CTAs of 14 steps a warp; out [1024, 2048]: 8 steps.
        assert_eq!(unroll(true, 128, 14, 132), 16);
        assert_eq!(unroll(true, 128, 8, 132), 8);
        assert_eq!(unroll(false, 128, 14, 132), 8);
        assert_eq!(unroll(true, 3880, 32, 132), 8);
    }
}
