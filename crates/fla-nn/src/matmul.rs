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

use crate::cuda::{add_rms_norm_cuda, launch, rms_norm_cuda, rms_norm_gate_cols_cuda, swiglu_cuda};
use crate::ops::GateAct;

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
#[derive(Debug, Clone, Copy, Default)]
struct GemvParams {
    x: u64,
    w: u64,
    y: u64,
    res: u64,
    x_out: u64,
    nw: u64,
    z: u64,
    n: i32,
    k: i32,
    m: i32,
    splits: i32,
    mode: i32,
    group: i32,
    ld_z: i32,
    gate: i32,
    eps: f32,
    offset: f32,
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
    plan_cols(op, x, w, 1)
}

/// [`plan`] for an `x [.., per·K]` whose prologue turns `per` columns into one (SwiGLU: 2).
fn plan_cols(op: &'static str, x: &CudaTensor, w: &CudaTensor, per: usize) -> Result<Plan> {
    let Some((&kx, lead)) = x.shape().split_last() else {
        return Err(Error::shape(op, "x", "[.., K] (at least one dimension)", x.shape()));
    };
    let n = match *w.shape() {
        [n, wk] if wk * per == kx => n,
        [_, _] => {
            return Err(Error::shape(
                op,
                "w",
                format!("[N, K] with {per}·K = {kx} (the last dimension of `x`)"),
                w.shape(),
            ))
        }
        _ => return Err(Error::shape(op, "w", "[N, K]", w.shape())),
    };
    let k = kx / per;
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
    run_with(op, x, w, p, GemvParams::default(), None)
}

/// Launches the kernel on a checked pair, with the prologue fields of `fused` (its `mode` picks
/// the entry; 0: none) and the prologue's scratch output `x_out`.
fn run_with(
    op: &'static str,
    x: &CudaTensor,
    w: &CudaTensor,
    p: &Plan,
    fused: GemvParams,
    x_out: Option<&mut CudaTensor>,
) -> Result<CudaTensor> {
    let dev = x.cuda_device();
    let sixteen_bit = x.dtype() != DType::F32;
    let vec = if sixteen_bit { 8 } else { 4 };
    let tiles = p.n.div_ceil(TILE_ROWS);
    let steps = (p.k / vec).div_ceil(VECS_PER_STEP);
    let s = splits(tiles, steps, dev.sm_count());
    let ctas = (tiles * s).div_ceil(WARPS);
    let grid =
        u32::try_from(ctas).map_err(|_| Error::size(op, format!("N = {}: more CTAs than one launch takes", p.n)))?;
    let dt = match x.dtype() {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        _ => "f16",
    };
    let u = unroll(sixteen_bit, ctas, steps.div_ceil(s), dev.sm_count());
    let name = match fused.mode {
        1 => format!("gemv_{dt}_glu_u{u}"),
        2 => format!("gemv_{dt}_norm_u{u}"),
        _ => format!("gemv_{dt}_u{u}"),
    };
    let name = name.as_str();
    // A prologue stages its x (m rows of K) in dynamic shared memory.
    let smem = if fused.mode == 0 { 0 } else { (p.m * p.k * x.dtype().size_in_bytes()) as u32 };
    let image = fla_kernels::cubin("gemv").map_err(|msg| Error::NoCudaKernel { kernel: name.to_string(), msg })?;
    let f = dev.function("gemv", image, name)?;
    // SAFETY: the kernel writes every element of y (each m < M, n < N once) before anything on
    // the stream reads it.
    let mut y = unsafe { CudaTensor::uninit(&p.out_shape, x.dtype(), dev)? };
    let params = GemvParams {
        x: x.raw_addr(),
        w: w.raw_addr(),
        y: y.raw_addr_mut(),
        x_out: x_out.map_or(0, |t| t.raw_addr_mut()),
        n: p.n as i32,
        k: p.k as i32,
        m: p.m as i32,
        splits: s as i32,
        ..fused
    };
    let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (32 * WARPS as u32, 1, 1), shared_mem_bytes: smem };
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

/// An elementwise step fused in front of the GEMV kernel: the kernel that a GPU layer otherwise
/// runs just before a projection, done while the product loads `x` (a decode step then launches
/// one kernel, not two).
#[derive(Clone, Copy)]
pub enum Prologue<'a> {
    /// `x [.., 2K]` holds gate | up; the product takes `silu(gate)·up` ([`swiglu_cuda`]).
    SwiGlu,
    /// An RMSNorm of `x` (or of `x + res`) over groups of columns, gated or not.
    Norm(NormPrologue<'a>),
}

/// The RMSNorm of [`Prologue::Norm`]: over each group of `group` columns of `x` (the whole row, or
/// a head), `x·rsqrt(mean(x²) + eps)·(offset + weight)`, times `act(z)` when gated, rounded to
/// the dtype — what [`rms_norm_cuda`], [`add_rms_norm_cuda`] and [`rms_norm_gate_cols_cuda`]
/// store.
#[derive(Clone, Copy)]
pub struct NormPrologue<'a> {
    /// Added to `x` first (rounded to the dtype); the sum comes back as the new residual stream.
    pub res: Option<&'a CudaTensor>,
    /// `[group]` f32.
    pub weight: &'a CudaTensor,
    /// Added to the weight (1 for Qwen's `1 + w` norms, else 0).
    pub offset: f32,
    /// Added to the mean square.
    pub eps: f32,
    /// Columns per norm group (dividing K).
    pub group: usize,
    /// The gate: columns `start .. start + K` of `z [rows, cols]` (rows as `x`), and its
    /// activation. Not with `res`.
    pub gate: Option<(&'a CudaTensor, usize, GateAct)>,
}

/// `prologue(x)·Wᵀ` for a layer's projection (see [`matmul_t`]): `x` holds `rows·K` elements (`rows·2K`
/// for [`Prologue::SwiGlu`]) in any shape — `[rows, K]`, or `[rows·K / group, group]` as a
/// per-head norm has it — and the result is `[rows, N]`; with a [`NormPrologue`] over `x + res`,
/// also that sum (the updated residual stream, `[rows, K]`). Up to [`GEMV_MAX_ROWS`] rows run one
/// GEMV kernel with the prologue fused in; anything else runs the prologue's own kernel and then
/// [`matmul_t`], with the same results up to summation order.
pub fn matmul_t_fused(x: CudaTensor, w: &CudaTensor, pro: &Prologue<'_>) -> Result<(CudaTensor, Option<CudaTensor>)> {
    const OP: &str = "matmul::matmul_t_fused";
    let &[_, k] = w.shape() else {
        return Err(Error::shape(OP, "w", "[N, K]", w.shape()));
    };
    let per = if matches!(pro, Prologue::SwiGlu) { 2 } else { 1 };
    if k == 0 || x.elem_count() % (per * k) != 0 {
        return Err(Error::shape(OP, "x", format!("rows × {per}·K = {} elements", per * k), x.shape()));
    }
    let rows = x.elem_count() / (per * k);
    let x = x.reshape(&[rows, per * k])?;
    let fused = rows <= GEMV_MAX_ROWS && gemv_enabled() && fla_kernels::compiled();
    match pro {
        Prologue::SwiGlu => {
            if fused && staged_fits(&x, k) {
                if let Ok(p) = plan_cols(OP, &x, w, 2) {
                    let params = GemvParams { mode: 1, ..Default::default() };
                    return Ok((run_with(OP, &x, w, &p, params, None)?, None));
                }
            }
            Ok((matmul_t(&swiglu_cuda(&x)?, w)?, None))
        }
        Prologue::Norm(np) => {
            check_norm(OP, &x, k, np)?;
            let elem = x.dtype().size_in_bytes();
            let aligned =
                |t: Option<&CudaTensor>, off: usize| t.is_none_or(|t| (t.raw_addr() as usize + off * elem) % 16 == 0);
            let gate_ok =
                np.gate.is_none_or(|(z, start, _)| aligned(Some(z), start) && (z.shape()[1] * elem) % 16 == 0);
            if fused
                && staged_fits(&x, k)
                && np.group % (16 / elem) == 0
                && k / np.group <= MAX_NORM_GROUPS
                && aligned(np.res, 0)
                && aligned(Some(np.weight), 0)
                && gate_ok
            {
                if let Ok(p) = plan(OP, &x, w) {
                    let (z, ld_z, gate) = match np.gate {
                        Some((z, start, act)) => (
                            z.raw_addr() + (start * z.dtype().size_in_bytes()) as u64,
                            z.shape()[1],
                            if act == GateAct::Silu { 1 } else { 2 },
                        ),
                        None => (0, 0, 0),
                    };
                    let mut x_out = match np.res {
                        // SAFETY: CTA 0 of the kernel writes every element (x + res).
                        Some(_) => Some(unsafe { CudaTensor::uninit(x.shape(), x.dtype(), x.cuda_device())? }),
                        None => None,
                    };
                    let params = GemvParams {
                        mode: 2,
                        res: np.res.map_or(0, |r| r.raw_addr()),
                        nw: np.weight.raw_addr(),
                        z,
                        group: to_i32(OP, "group", np.group)?,
                        ld_z: to_i32(OP, "z's row stride", ld_z)?,
                        gate,
                        eps: np.eps,
                        offset: np.offset,
                        ..Default::default()
                    };
                    let y = run_with(OP, &x, w, &p, params, x_out.as_mut())?;
                    return Ok((y, x_out));
                }
            }
            // The prologue's own kernel (over rows of `group` columns), then the product.
            let (h, sum) = match (np.res, np.gate) {
                (Some(res), _) => {
                    let mut s = x;
                    let h = add_rms_norm_cuda(&mut s, res, np.weight, np.eps, np.offset)?;
                    (h, Some(s))
                }
                (None, gate) => {
                    let grouped = x.reshape(&[rows * k / np.group, np.group])?;
                    let h = match gate {
                        Some((z, start, act)) => {
                            rms_norm_gate_cols_cuda(&grouped, np.weight, np.eps, np.offset, z, start, act)?
                        }
                        None => rms_norm_cuda(&grouped, np.weight, np.eps, np.offset, None)?,
                    };
                    (h.reshape(&[rows, k])?, None)
                }
            };
            Ok((matmul_t(&h, w)?, sum))
        }
    }
}

fn to_i32(op: &'static str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::size(op, format!("{what} = {v} does not fit the kernel's 32-bit index")))
}

/// The residual add and RMSNorm in front of a block's first product: `rms_norm(x + res)` with
/// weight `weight [K]` f32 plus `offset`.
#[derive(Clone, Copy)]
pub struct PreNorm<'a> {
    /// Added to `x` first.
    pub res: &'a CudaTensor,
    /// `[K]` f32.
    pub weight: &'a CudaTensor,
    /// Added to the mean square.
    pub eps: f32,
    /// Added to the weight (1 for Qwen's `1 + w` norms).
    pub offset: f32,
}

/// `rms_norm(x + res)·Wᵀ` through [`matmul_t_fused`] with the norm over whole rows: the product
/// and `x + res` (the residual stream after the add).
pub fn matmul_t_prenorm(x: CudaTensor, w: &CudaTensor, pre: &PreNorm<'_>) -> Result<(CudaTensor, CudaTensor)> {
    let k = w.shape().last().copied().unwrap_or(0);
    let np =
        NormPrologue { res: Some(pre.res), weight: pre.weight, offset: pre.offset, eps: pre.eps, group: k, gate: None };
    let (y, sum) = matmul_t_fused(x, w, &Prologue::Norm(np))?;
    Ok((y, sum.ok_or_else(|| Error::Cuda("the fused norm gave no residual sum".into()))?))
}

/// Whether a prologue's x (its rows of K elements) fits the 48 KB of shared memory a launch
/// gets without opting in.
fn staged_fits(x: &CudaTensor, k: usize) -> bool {
    x.elem_count() / x.shape().last().copied().unwrap_or(1).max(1) * k * x.dtype().size_in_bytes() <= 48 * 1024
}

/// Most norm groups in a row of the fused norm prologue (`GEMV_MAX_GROUPS` in gemv.cu).
const MAX_NORM_GROUPS: usize = 64;

/// Checks a norm prologue against `x [.., K]`.
fn check_norm(op: &'static str, x: &CudaTensor, k: usize, np: &NormPrologue<'_>) -> Result<()> {
    if x.shape().last() != Some(&k) {
        return Err(Error::shape(op, "x", format!("[.., K = {k}] (the weight's K)"), x.shape()));
    }
    if np.group == 0 || k % np.group != 0 {
        return Err(Error::Argument { op, arg: "group", msg: format!("{} columns do not divide K = {k}", np.group) });
    }
    if np.weight.shape() != [np.group] || np.weight.dtype() != DType::F32 {
        return Err(Error::shape(op, "weight", format!("[group = {}] f32", np.group), np.weight.shape()));
    }
    if let Some(res) = np.res {
        if res.shape() != x.shape() || res.dtype() != x.dtype() || res.device() != x.device() {
            return Err(Error::shape(op, "res", format!("{:?} ({}, as x)", x.shape(), x.dtype()), res.shape()));
        }
        if np.gate.is_some() || np.group != k {
            return Err(Error::Unsupported { op, msg: "a norm of x + res gated or over groups of a row".into() });
        }
    }
    if let Some((z, start, _)) = np.gate {
        let rows = x.elem_count() / k;
        let ok = matches!(*z.shape(), [r, cols] if r == rows && start + k <= cols);
        if !ok || z.dtype() != x.dtype() || z.device() != x.device() {
            return Err(Error::shape(
                op,
                "z",
                format!("[rows = {rows}, ≥ {start} + {k} columns] ({})", x.dtype()),
                z.shape(),
            ));
        }
    }
    Ok(())
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
