//! GPU forms of the layer primitives (`fla-kernels/cuda/nn.cu`), each the twin of a CPU form:
//! [`rms_norm_cuda`] of [`crate::ops::rms_norm`] / [`crate::ops::rms_norm_gated`] (and
//! [`rms_norm_gate_cols_cuda`], its gate read out of a wider tensor), [`add_rms_norm_cuda`] of a
//! residual add and a norm, [`short_conv_cuda`] of [`crate::conv::ShortConv::forward`] (and
//! [`short_conv_split_cuda`], reading columns of a wider tensor and writing the output split),
//! [`swiglu_cuda`] of the SwiGLU gate, [`split_cols_cuda`] of column slices,
//! [`gather_rows_cuda`] / [`scatter_add_rows_cuda`] of a mixture of experts' token routing,
//! `mla_append_cuda` of the latent cache append in
//! [`crate::mla::MultiLatentAttention::forward`]. Activations f32, bf16 or f16 (outputs in their
//! dtype, arithmetic in f32); weights and caches f32 (the MLA latent cache: the activations'
//! dtype). The work is queued on the device's stream.
use std::sync::Arc;

use fla_core::cuda::cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use fla_core::cuda::{CudaDevice, CudaTensor};
use fla_core::{DType, Error, Result};

use crate::ops::GateAct;
use crate::{Batch, BatchTables};

/// Input dtype codes of `cuda/common/dtype.cuh`.
fn dtype_code(op: &'static str, arg: &'static str, dt: DType) -> Result<i32> {
    match dt {
        DType::F32 => Ok(0),
        DType::BF16 => Ok(1),
        DType::F16 => Ok(2),
        got => Err(Error::DType { op, arg, expected: "f32, bf16 or f16".into(), got }),
    }
}

fn function(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
    let image = fla_kernels::cubin("nn").map_err(|msg| Error::NoCudaKernel { kernel: name.to_string(), msg })?;
    dev.function("nn", image, name)
}

/// `t` on `like`'s device with `like`'s dtype (`dtype` false: any dtype) and, with `shape`, that
/// shape.
fn check_like(
    op: &'static str,
    arg: &'static str,
    t: &CudaTensor,
    like: &CudaTensor,
    shape: Option<&[usize]>,
    dtype: bool,
) -> Result<()> {
    if t.device() != like.device() {
        return Err(Error::Device { op, arg, expected: like.device().to_string(), got: t.device().to_string() });
    }
    if dtype && t.dtype() != like.dtype() {
        return Err(Error::DType { op, arg, expected: format!("{}", like.dtype()), got: t.dtype() });
    }
    if let Some(shape) = shape {
        if t.shape() != shape {
            return Err(Error::shape(op, arg, format!("{shape:?}"), t.shape()));
        }
    }
    Ok(())
}

fn check_f32(op: &'static str, arg: &'static str, t: &CudaTensor) -> Result<()> {
    if t.dtype() != DType::F32 {
        return Err(Error::DType { op, arg, expected: "f32".into(), got: t.dtype() });
    }
    Ok(())
}

fn to_i32(op: &'static str, what: &str, x: usize) -> Result<i32> {
    i32::try_from(x).map_err(|_| Error::size(op, format!("{what} = {x} does not fit the kernel's 32-bit index")))
}

/// Launches `f` on `dev`'s stream with `params` as its only argument.
///
/// # Safety
/// `params` must be the kernel's parameter struct, with addresses covering what the kernel
/// indexes for this `cfg`, alive until the work is done in stream order.
pub(crate) unsafe fn launch<P: DeviceRepr>(
    dev: &Arc<CudaDevice>,
    f: &CudaFunction,
    cfg: LaunchConfig,
    params: &P,
) -> Result<()> {
    let mut l = dev.stream().launch_builder(f);
    l.arg(params);
    // SAFETY: the caller's contract.
    unsafe { l.launch(cfg) }?;
    Ok(())
}

fn blocks(op: &'static str, n: usize, per: usize) -> Result<u32> {
    u32::try_from(n.div_ceil(per))
        .ok()
        .filter(|&b| b < i32::MAX as u32)
        .ok_or_else(|| Error::size(op, format!("{n} elements are more than one launch takes")))
}

/// Mirror of `SplitOut` in `nn.cu` (same order, `repr(C)`): up to three outputs splitting the
/// columns of a row.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct SplitOut {
    y: [u64; 3],
    c1: i32,
    c2: i32,
}

/// Checks `parts` (1 to 3 widths) against `cols`, the columns they split, and allocates their
/// outputs `[rows, width]` in `dtype`, with the kernels' descriptor of them.
///
/// # Safety
/// The outputs are uninitialised: the caller's kernel must write every column of every row.
unsafe fn split_out(
    op: &'static str,
    parts: &[usize],
    rows: usize,
    cols: usize,
    dtype: DType,
    dev: &Arc<CudaDevice>,
) -> Result<(Vec<CudaTensor>, SplitOut)> {
    if parts.is_empty() || parts.len() > 3 || parts.iter().sum::<usize>() != cols {
        return Err(Error::Argument {
            op,
            arg: "parts",
            msg: format!("{parts:?}: 1 to 3 widths adding up to the {cols} columns split"),
        });
    }
    let mut out = SplitOut { y: [0; 3], c1: to_i32(op, "columns", cols)?, c2: to_i32(op, "columns", cols)? };
    let mut ys = Vec::with_capacity(parts.len());
    let mut end = 0;
    for (i, &w) in parts.iter().enumerate() {
        // SAFETY: forwarded to the caller.
        let mut y = unsafe { CudaTensor::uninit(&[rows, w], dtype, dev)? };
        out.y[i] = y.raw_addr_mut();
        end += w;
        match i {
            0 => out.c1 = end as i32,
            1 => out.c2 = end as i32,
            _ => {}
        }
        ys.push(y);
    }
    Ok((ys, out))
}

/// Mirror of `NormParams` in `nn.cu` (same order, `repr(C)`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct NormParams {
    x: u64,
    w: u64,
    z: u64,
    y: u64,
    res: u64,
    dtype: i32,
    rows: i32,
    dim: i32,
    gate: i32,
    eps: f32,
    offset: f32,
    ld_z: i32,
    z_group: i32,
}
// SAFETY: plain old data in the C layout the kernel reads.
unsafe impl DeviceRepr for NormParams {}

/// The gate input of a norm launch, checked: its address, row stride, rows of `x` per row and
/// activation.
#[derive(Clone, Copy)]
struct Gate {
    addr: u64,
    ld: usize,
    group: usize,
    act: GateAct,
}

/// RMSNorm of the last dimension of `x` on the GPU: `x·rsqrt(mean(x²) + eps)·(offset + w)`, then
/// times `act(z)` with `gate = Some((z, act))` (`z` of `x`'s shape and dtype). `w [dim]` f32.
pub fn rms_norm_cuda(
    x: &CudaTensor,
    w: &CudaTensor,
    eps: f32,
    offset: f32,
    gate: Option<(&CudaTensor, GateAct)>,
) -> Result<CudaTensor> {
    const OP: &str = "rms_norm_cuda";
    let gate = match gate {
        Some((z, act)) => {
            check_like(OP, "z", z, x, Some(x.shape()), true)?;
            let dim = x.shape().last().copied().unwrap_or(0);
            Some(Gate { addr: z.raw_addr(), ld: dim, group: 1, act })
        }
        None => None,
    };
    // SAFETY: without a residual the kernel only reads x; z holds rows·dim elements (checked).
    unsafe { norm(OP, x.raw_addr(), x, None, w, eps, offset, gate) }
}

/// [`rms_norm_cuda`] gated by `act(z)`, the gate read out of a wider tensor: `x [rows, dim]`
/// (leading dimensions flattened), `z [zrows, cols]` of `x`'s dtype with `rows = g·zrows`, and
/// the gate of row `r` of `x` at columns `start + (r mod g)·dim ..` of row `r / g` of `z`. The
/// Gated DeltaNet layer's `o [tokens·HV, V]` reads its gate straight from the fused input
/// projection `[tokens, …]`, whose columns `start .. start + HV·V` hold z.
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_gate_cols_cuda(
    x: &CudaTensor,
    w: &CudaTensor,
    eps: f32,
    offset: f32,
    z: &CudaTensor,
    start: usize,
    act: GateAct,
) -> Result<CudaTensor> {
    const OP: &str = "rms_norm_gate_cols_cuda";
    check_like(OP, "z", z, x, None, true)?;
    let dim = *x.shape().last().ok_or_else(|| Error::shape(OP, "x", "at least one dimension", x.shape()))?;
    let rows = x.elem_count().checked_div(dim).unwrap_or(0);
    let &[zrows, cols] = z.shape() else {
        return Err(Error::shape(OP, "z", "[rows of x / g, cols]", z.shape()));
    };
    let group = match rows.checked_div(zrows) {
        Some(g) if g * zrows == rows && g > 0 => g,
        None if rows == 0 => 1,
        _ => return Err(Error::shape(OP, "z", format!("[a divisor of the {rows} rows of x, cols]"), z.shape())),
    };
    if start + group * dim > cols {
        return Err(Error::Argument {
            op: OP,
            arg: "start",
            msg: format!("gate columns {start}..{} of z's {cols}", start + group * dim),
        });
    }
    to_i32(OP, "z rows·cols", zrows * cols)?;
    let gate = Gate { addr: z.raw_addr() + (start * z.dtype().size_in_bytes()) as u64, ld: cols, group, act };
    // SAFETY: without a residual the kernel only reads x; row r of x reads z's elements
    // (r / g)·cols + start + (r mod g)·dim + c for c < dim, inside z (checked).
    unsafe { norm(OP, x.raw_addr(), x, None, w, eps, offset, Some(gate)) }
}

/// The residual step of a pre-norm block on the GPU: `x += res` (in `x`'s dtype), then the
/// RMSNorm of the new `x` as [`rms_norm_cuda`] (no gate), in one pass.
pub fn add_rms_norm_cuda(
    x: &mut CudaTensor,
    res: &CudaTensor,
    w: &CudaTensor,
    eps: f32,
    offset: f32,
) -> Result<CudaTensor> {
    check_like("add_rms_norm_cuda", "res", res, x, Some(x.shape()), true)?;
    let addr = x.raw_addr_mut();
    // SAFETY: `addr` is x's buffer, borrowed mutably for the call; each element of it is read and
    // written by one thread of the kernel.
    unsafe { norm("add_rms_norm_cuda", addr, x, Some(res), w, eps, offset, None) }
}

/// `x` is `[tokens, hidden]` of `weight`'s dtype, on its device: the input check of every GPU
/// layer (`op` names it in the typed errors).
pub(crate) fn check_input(
    op: &'static str,
    x: &CudaTensor,
    tokens: usize,
    hidden: usize,
    weight: &CudaTensor,
) -> Result<()> {
    if x.shape() != [tokens, hidden] {
        return Err(Error::shape(op, "x", format!("[tokens, hidden] = [{tokens}, {hidden}]"), x.shape()));
    }
    if x.dtype() != weight.dtype() {
        return Err(Error::DType {
            op,
            arg: "x",
            expected: format!("{} (the weights' dtype)", weight.dtype()),
            got: x.dtype(),
        });
    }
    if x.device() != weight.device() {
        return Err(Error::Device { op, arg: "x", expected: weight.device().to_string(), got: x.device().to_string() });
    }
    Ok(())
}

/// The longest row `nn_rms_norm_*` takes: 128 threads × 64 elements in registers.
const NORM_MAX_DIM: usize = 128 * 64;

/// Launches `nn_rms_norm_<dtype>_<per>` over `x` (at `x_addr`), `res` added into it first when given.
///
/// # Safety
/// `x_addr` must be `x`'s buffer; with `res`, writable for the duration of the work. With a
/// gate, its address must cover the elements its stride and group index for `x`'s rows, in
/// `x`'s dtype.
#[allow(clippy::too_many_arguments)]
unsafe fn norm(
    op: &'static str,
    x_addr: u64,
    x: &CudaTensor,
    res: Option<&CudaTensor>,
    w: &CudaTensor,
    eps: f32,
    offset: f32,
    gate: Option<Gate>,
) -> Result<CudaTensor> {
    let dim = *x.shape().last().ok_or_else(|| Error::shape(op, "x", "at least one dimension", x.shape()))?;
    check_f32(op, "w", w)?;
    check_like(op, "w", w, x, Some(&[dim]), false)?;
    if dim > NORM_MAX_DIM {
        return Err(Error::Unsupported {
            op,
            msg: format!("rows of {dim} elements (the norm kernel holds up to {NORM_MAX_DIM})"),
        });
    }
    let rows = x.elem_count().checked_div(dim).unwrap_or(0);
    let dev = x.cuda_device().clone();
    // SAFETY: every element of y is written by the kernel (a CTA per row, every column).
    let mut y = unsafe { CudaTensor::uninit(x.shape(), x.dtype(), &dev)? };
    let params = NormParams {
        x: x_addr,
        w: w.raw_addr(),
        z: gate.map_or(0, |g| g.addr),
        y: y.raw_addr_mut(),
        res: res.map_or(0, |r| r.raw_addr()),
        dtype: dtype_code(op, "x", x.dtype())?,
        rows: to_i32(op, "rows", rows)?,
        dim: to_i32(op, "dim", dim)?,
        gate: match gate.map(|g| g.act) {
            None => 0,
            Some(GateAct::Silu) => 1,
            Some(GateAct::Sigmoid) => 2,
        },
        eps,
        offset,
        ld_z: to_i32(op, "z's row stride", gate.map_or(dim, |g| g.ld))?,
        z_group: to_i32(op, "rows of x per row of z", gate.map_or(1, |g| g.group))?,
    };
    if rows > 0 {
        let per = dim.div_ceil(128).next_power_of_two();
        let f = function(&dev, &format!("nn_rms_norm_{}_{per}", ["f32", "bf16", "f16"][params.dtype as usize]))?;
        let cfg = LaunchConfig { grid_dim: (blocks(op, rows, 1)?, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: NormParams mirrors the kernel's argument; x, res, y hold rows·dim elements of
        // the dtype named by `dtype` (checked above), w dim f32 values; the caller's contract
        // covers z and writing x.
        unsafe { launch(&dev, &f, cfg, &params) }?;
    }
    Ok(y)
}

/// Mirror of `ConvParams` in `nn.cu` (same order, `repr(C)`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct ConvParams {
    x: u64,
    weight: u64,
    state: u64,
    y: SplitOut,
    cu_seqlens: u64,
    seq_of: u64,
    dtype: i32,
    tokens: i32,
    n: i32,
    c: i32,
    w: i32,
    ld_x: i32,
    state_in_conv: i32,
    _pad: i32,
}
// SAFETY: plain old data in the C layout the kernel reads.
unsafe impl DeviceRepr for ConvParams {}

/// Tokens each thread of `nn_short_conv_w*` walks (`FLA_CONV_TOKENS` in `nn.cu`).
const CONV_TOKENS: usize = 16;
/// The widest kernel with a compiled `nn_short_conv_w*` instance.
const MAX_CONV_KERNEL: usize = 8;

/// The depthwise causal short convolution with SiLU on the GPU, over a packed batch: `x
/// [tokens, C]`, `weight [C, W]` f32, `state [N, C, W]` f32 (the last `W` inputs of each
/// sequence, oldest first: zeros for a new one), `cu_seqlens [N + 1]`. Returns `silu(conv(x))`
/// in `x`'s dtype and updates `state` in place to the new cache.
pub fn short_conv_cuda(
    x: &CudaTensor,
    weight: &CudaTensor,
    state: &mut CudaTensor,
    cu_seqlens: &[usize],
) -> Result<CudaTensor> {
    const OP: &str = "short_conv_cuda";
    let &[_, c] = x.shape() else {
        return Err(Error::shape(OP, "x", "[tokens, channels]", x.shape()));
    };
    if weight.shape().first() != Some(&c) {
        return Err(Error::shape(OP, "weight", format!("[channels = {c}, kernel ≥ 1]"), weight.shape()));
    }
    let tables = tables_of(OP, x, cu_seqlens)?;
    Ok(conv(OP, x, 0, weight, state, cu_seqlens, &tables, &[c])?.remove(0))
}

/// [`short_conv_cuda`] over columns `start .. start + C` of `x [tokens, cols]` (`C` the channels
/// of `weight [C, W]`; `state [N, C, W]`, updated in place), its output split by columns into
/// `parts` (1 to 3 widths adding up to `C`), each a contiguous `[tokens, width]`. The
/// linear-attention layers convolve the q | k | v columns of their fused input projection and
/// get q, k and v apart.
pub fn short_conv_split_cuda(
    x: &CudaTensor,
    start: usize,
    weight: &CudaTensor,
    state: &mut CudaTensor,
    cu_seqlens: &[usize],
    parts: &[usize],
) -> Result<Vec<CudaTensor>> {
    const OP: &str = "short_conv_split_cuda";
    let tables = tables_of(OP, x, cu_seqlens)?;
    conv(OP, x, start, weight, state, cu_seqlens, &tables, parts)
}

/// [`short_conv_split_cuda`] for the rows of `batch`, reading its attached [`BatchTables`].
pub(crate) fn short_conv_batch_cuda(
    x: &CudaTensor,
    start: usize,
    weight: &CudaTensor,
    state: &mut CudaTensor,
    batch: &Batch,
    parts: &[usize],
) -> Result<Vec<CudaTensor>> {
    let tables = batch.tables_on(x.cuda_device())?;
    conv("short_conv_split_cuda", x, start, weight, state, &batch.cu_seqlens(), &tables, parts)
}

/// The tables of the sequences `cu_seqlens` packs (checked against x's rows), on x's device.
fn tables_of(op: &'static str, x: &CudaTensor, cu_seqlens: &[usize]) -> Result<BatchTables> {
    let tokens = x.shape().first().copied().unwrap_or(0);
    let n = fla_ops::check_cu_seqlens(op, cu_seqlens, tokens)?.len();
    BatchTables::new(x.cuda_device(), cu_seqlens, &vec![0; n])
}

/// The launches of [`short_conv_split_cuda`] (`op` names the caller in errors); `tables` are
/// those of `cu_seqlens`.
#[allow(clippy::too_many_arguments)]
fn conv(
    op: &'static str,
    x: &CudaTensor,
    start: usize,
    weight: &CudaTensor,
    state: &mut CudaTensor,
    cu_seqlens: &[usize],
    tables: &BatchTables,
    parts: &[usize],
) -> Result<Vec<CudaTensor>> {
    let &[tokens, cols] = x.shape() else {
        return Err(Error::shape(op, "x", "[tokens, columns]", x.shape()));
    };
    check_f32(op, "weight", weight)?;
    check_like(op, "weight", weight, x, None, false)?;
    let &[c, w] = weight.shape() else {
        return Err(Error::shape(op, "weight", "[channels, kernel]", weight.shape()));
    };
    if w == 0 {
        return Err(Error::shape(op, "weight", format!("[channels = {c}, kernel ≥ 1]"), weight.shape()));
    }
    if w > MAX_CONV_KERNEL {
        return Err(Error::Unsupported {
            op,
            msg: format!("a kernel of {w} taps (the GPU convolution takes at most {MAX_CONV_KERNEL})"),
        });
    }
    if start + c > cols {
        return Err(Error::Argument {
            op,
            arg: "start",
            msg: format!("input columns {start}..{} of x's {cols} (the weight's {c} channels)", start + c),
        });
    }
    let seqs = fla_ops::check_cu_seqlens(op, cu_seqlens, tokens)?;
    let n = seqs.len();
    check_f32(op, "state", state)?;
    check_like(op, "state", state, x, Some(&[n, c, w]), false)?;
    let dev = x.cuda_device().clone();
    to_i32(op, "tokens·columns", tokens * cols)?;
    to_i32(op, "N·channels·kernel", n * c * w)?;
    // SAFETY: the kernel writes every output element (a thread per (channel, run of tokens), the
    // runs covering every token, each channel stored into its part).
    let (ys, y) = unsafe { split_out(op, parts, tokens, c, x.dtype(), &dev)? };
    // A decode step (and any batch whose sequences each fit one thread's run of tokens) has the
    // convolution kernel write the new cache: one launch instead of two.
    let state_in_conv = seqs.iter().all(|r| r.is_empty() || r.start / CONV_TOKENS == (r.end - 1) / CONV_TOKENS);
    if tables.len() != n || tables.tokens() != tokens {
        return Err(Error::size(
            op,
            format!(
                "tables of {} sequences, {} tokens for {n} sequences, {tokens} tokens",
                tables.len(),
                tables.tokens()
            ),
        ));
    }
    let params = ConvParams {
        x: x.raw_addr() + (start * x.dtype().size_in_bytes()) as u64,
        weight: weight.raw_addr(),
        state: state.raw_addr_mut(),
        y,
        cu_seqlens: tables.cu_seqlens_addr(),
        seq_of: tables.seq_of_addr(),
        dtype: dtype_code(op, "x", x.dtype())?,
        tokens: to_i32(op, "tokens", tokens)?,
        n: to_i32(op, "N", n)?,
        c: to_i32(op, "channels", c)?,
        w: to_i32(op, "kernel", w)?,
        ld_x: to_i32(op, "columns", cols)?,
        state_in_conv: state_in_conv as i32,
        _pad: 0,
    };
    // SAFETY (both launches): ConvParams mirrors the kernels' argument; x holds tokens·cols
    // elements of the dtype named by `dtype` and the kernels read columns start .. start + C
    // (checked) of each row; the outputs hold tokens × their widths, which add up to C
    // (checked); weight C·W and state N·C·W f32 values (state borrowed mutably: the state
    // kernel, launched second, rewrites it in place); the tables hold N + 1 offsets (checked:
    // 0 first, tokens last, non-decreasing) and a sequence index < N per token, and live (in
    // `tables`' owner) until after the launches in stream order.
    if tokens * c > 0 {
        let runs = u32::try_from(tokens.div_ceil(CONV_TOKENS))
            .ok()
            .filter(|&r| r <= 65535)
            .ok_or_else(|| Error::size(op, format!("{tokens} tokens are more than one launch takes")))?;
        let cfg =
            LaunchConfig { grid_dim: (blocks(op, c, 256)?, runs, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        unsafe { launch(&dev, &function(&dev, &format!("nn_short_conv_w{w}"))?, cfg, &params) }?;
    }
    if n * c * w > 0 && !state_in_conv {
        let cfg =
            LaunchConfig { grid_dim: (blocks(op, n * c, 256)?, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        unsafe { launch(&dev, &function(&dev, "nn_short_conv_state")?, cfg, &params) }?;
    }
    Ok(ys)
}

/// Mirror of `GluParams` in `nn.cu` (same order, `repr(C)`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct GluParams {
    ab: u64,
    y: u64,
    dtype: i32,
    n: i64,
    half: i64,
}
// SAFETY: plain old data in the C layout the kernel reads.
unsafe impl DeviceRepr for GluParams {}

/// The SwiGLU gate on the GPU: `silu(a)·b` for the halves `a | b` of each row of the fused
/// gate | up product `gate_up [rows, 2·I]` → `[rows, I]`.
pub fn swiglu_cuda(gate_up: &CudaTensor) -> Result<CudaTensor> {
    const OP: &str = "swiglu_cuda";
    let &[rows, two_i] = gate_up.shape() else {
        return Err(Error::shape(OP, "gate_up", "[rows, 2·intermediate]", gate_up.shape()));
    };
    if two_i % 2 != 0 {
        return Err(Error::shape(OP, "gate_up", "[rows, 2·intermediate] (an even width)", gate_up.shape()));
    }
    let dev = gate_up.cuda_device().clone();
    // SAFETY: a thread per element writes y.
    let mut y = unsafe { CudaTensor::uninit(&[rows, two_i / 2], gate_up.dtype(), &dev)? };
    let n = rows * two_i / 2;
    let params = GluParams {
        ab: gate_up.raw_addr(),
        y: y.raw_addr_mut(),
        dtype: dtype_code(OP, "gate_up", gate_up.dtype())?,
        n: n as i64,
        half: (two_i / 2) as i64,
    };
    if n > 0 {
        let cfg = LaunchConfig { grid_dim: (blocks(OP, n, 256)?, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: GluParams mirrors the kernel's argument; gate_up holds 2n and y n elements of
        // `dtype`.
        unsafe { launch(&dev, &function(&dev, "nn_swiglu")?, cfg, &params) }?;
    }
    Ok(y)
}

/// Mirror of `ColsParams` in `nn.cu` (same order, `repr(C)`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct ColsParams {
    x: u64,
    y: SplitOut,
    dtype: i32,
    rows: i32,
    cols: i32,
    start: i32,
    len: i32,
}
// SAFETY: plain old data in the C layout the kernel reads.
unsafe impl DeviceRepr for ColsParams {}

/// The outputs of a split asked for `N` parts, as an array (a typed error, not a panic, if the
/// count ever differs).
pub(crate) fn parts<const N: usize>(op: &'static str, v: Vec<CudaTensor>) -> Result<[CudaTensor; N]> {
    v.try_into().map_err(|v: Vec<CudaTensor>| Error::size(op, format!("{} parts where {N} were asked for", v.len())))
}

/// Columns `start ..` of `x [rows, cols]` split into contiguous `[rows, width]` tensors, one per
/// width of `parts` (1 to 3), in one launch: the Gated DeltaNet layer's `b` and `a` out of its
/// fused input projection.
pub fn split_cols_cuda(x: &CudaTensor, start: usize, parts: &[usize]) -> Result<Vec<CudaTensor>> {
    const OP: &str = "split_cols_cuda";
    let &[rows, cols] = x.shape() else {
        return Err(Error::shape(OP, "x", "[rows, cols]", x.shape()));
    };
    let len: usize = parts.iter().sum();
    if start + len > cols {
        return Err(Error::Argument {
            op: OP,
            arg: "parts",
            msg: format!("columns {start}..{} of {cols}", start + len),
        });
    }
    let dev = x.cuda_device().clone();
    to_i32(OP, "rows·cols", rows * cols)?;
    // SAFETY: a thread per copied element writes each output element.
    let (ys, y) = unsafe { split_out(OP, parts, rows, len, x.dtype(), &dev)? };
    let params = ColsParams {
        x: x.raw_addr(),
        y,
        dtype: dtype_code(OP, "x", x.dtype())?,
        rows: to_i32(OP, "rows", rows)?,
        cols: to_i32(OP, "cols", cols)?,
        start: to_i32(OP, "start", start)?,
        len: to_i32(OP, "len", len)?,
    };
    if rows * len > 0 {
        let cfg = LaunchConfig {
            grid_dim: (blocks(OP, rows * len, 256)?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: ColsParams mirrors the kernel's argument; x holds rows·cols elements of
        // `dtype`, start + len <= cols (checked), and the outputs hold rows × their widths,
        // which add up to len.
        unsafe { launch(&dev, &function(&dev, "nn_split_cols")?, cfg, &params) }?;
    }
    Ok(ys)
}

/// Mirror of `AttnParams` in `attention.cu` (same order, `repr(C)`). `part`, `qblk`, `splits`
/// and `split_len` are set by [`attention_launch`].
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct AttnParams {
    pub qg: u64,
    pub kn: u64,
    pub vn: u64,
    pub q_norm: u64,
    pub k_norm: u64,
    pub inv_freq: u64,
    pub q: u64,
    pub kc: u64,
    pub vc: u64,
    pub o: u64,
    pub seq_of: u64,
    pub pos: u64,
    pub part: u64,
    pub qblk: u64,
    pub dtype: i32,
    pub tokens: i32,
    pub h: i32,
    pub kvh: i32,
    pub hd: i32,
    pub per: i32,
    pub rot: i32,
    pub cap: i32,
    pub gate: i32,
    pub splits: i32,
    pub split_len: i32,
    pub eps: f32,
    pub scale: f32,
}
// SAFETY: plain old data in the C layout the kernels read.
unsafe impl DeviceRepr for AttnParams {}

/// Threads per CTA of the attention kernels but the combine pass.
const ATTN_NT: u32 = 128;
/// Threads per CTA of the split-KV combine pass (`ATTN_COMBINE_WARPS` in attention.cu).
const COMBINE_NT: u32 = 256;
/// Most slices of one token's context in the split-KV kernel (`ATTN_MAX_SPLITS` in attention.cu:
/// the combine kernel takes one per thread).
const MAX_SPLITS: usize = 256;
/// Fewest keys per slice when the split-KV kernel cuts a context to fill the GPU.
const MIN_SPLIT_KEYS: usize = 64;
/// New tokens of one sequence from which a call goes to the tensor-core prefill kernel.
const TC_MIN_ROWS: usize = 64;
/// Query rows per CTA of the tensor-core prefill kernel.
const TC_BQ: usize = 64;

/// A kernel of the attention module (`fla-kernels/cuda/attention.cu`).
fn attn_function(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
    let image = fla_kernels::cubin("attention").map_err(|msg| Error::NoCudaKernel { kernel: name.to_string(), msg })?;
    dev.function("attention", image, name)
}

/// Elements per lane (`EPL`) and query heads per CTA (`GC`) of the split-KV kernel
/// `attn_split_<dt>_e<EPL>_g<GC>` for head dim `hd` (≤ 512) and a GQA group of `group` query
/// heads per KV head: a warp reads a key row as 32 lanes × EPL elements; GC·EPL ≤ 64 bounds the
/// registers and the merge buffer.
fn split_shape(hd: usize, group: usize) -> (usize, usize) {
    let epl = hd.div_ceil(32).next_power_of_two().max(2);
    let gc = group.next_power_of_two().min(if epl >= 16 { 4 } else { 8 });
    (epl, gc)
}

/// How the split-KV kernel cuts contexts of up to `max_ctx` keys for a call of `ctas` CTAs per
/// slice on a GPU of `sms` SMs: `(splits, keys per split)`, enough slices for two CTAs per SM,
/// each of at least [`MIN_SPLIT_KEYS`] keys (a multiple of 16), at most [`MAX_SPLITS`].
fn split_plan(ctas: usize, max_ctx: usize, sms: usize) -> (usize, usize) {
    let max_ctx = max_ctx.max(1);
    let want = (2 * sms).div_ceil(ctas.max(1));
    let splits = want.min(max_ctx.div_ceil(MIN_SPLIT_KEYS)).clamp(1, MAX_SPLITS);
    let len = max_ctx.div_ceil(splits).next_multiple_of(16);
    (max_ctx.div_ceil(len), len)
}

/// Dynamic shared memory of the tensor-core prefill kernel for head dim `hd` (`attn_prefill_tc`
/// in attention.cu): Q [64][hd + 8] and double-buffered K, V blocks [bk][hd + 8], 16-bit.
fn tc_smem(hd: usize) -> u32 {
    let bk = if hd == 256 { 32 } else { 64 };
    ((TC_BQ + 4 * bk) * (hd + 8) * 2) as u32
}

/// Whether a call goes to the tensor-core prefill kernel: a 16-bit dtype (code 1 or 2), head dim
/// 64, 128 or 256, and at least [`TC_MIN_ROWS`] new tokens in some sequence.
fn use_tensor_cores(dtype: i32, hd: usize, max_new: usize) -> bool {
    dtype != 0 && matches!(hd, 64 | 128 | 256) && max_new >= TC_MIN_ROWS
}

/// Runs `attn_prep` (q / k norm and RoPE, k and v into the caches, each step skipped with null
/// norms, `rot = 0`, null `kn` / `vn`) and then causal softmax
/// attention over each token's cached context, gated, for the packed `batch` described by
/// `params` (its `part`, `qblk`, `splits` and `split_len` are set here): the tensor-core
/// prefill kernel when [`use_tensor_cores`] says so, otherwise the split-KV kernel (and its
/// combine kernel when a context is cut in more than one slice).
///
/// # Safety
/// Every address in `params` must cover what the kernels index for its sizes (qg [tokens, H,
/// per], kn / vn [tokens, KVH, hd] or both null (no cache writes: the caller filled the caches),
/// the norms [hd] f32 or null (no norm), inv_freq [rot / 2] f32, q and o [tokens, H, hd], the
/// caches [N, cap, KVH, hd], seq_of / pos [tokens] with seq_of < N), seq_of and pos
/// must be `batch`'s (the tokens of sequence n at positions past[n] .. past[n] + len, all < cap),
/// and the buffers must live until the work is done in stream order.
pub(crate) unsafe fn attention_launch(dev: &Arc<CudaDevice>, params: &AttnParams, batch: &crate::Batch) -> Result<()> {
    use fla_core::cuda::cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as MAX_DYN_SMEM;
    use fla_core::cuda::cudarc::driver::DevicePtr;
    const OP: &str = "attention_launch";
    let mut p = *params;
    let (tokens, h, kvh, hd) = (p.tokens as usize, p.h as usize, p.kvh as usize, p.hd as usize);
    if batch.tokens() != tokens {
        return Err(Error::size(OP, format!("{tokens} tokens for a batch of {}", batch.tokens())));
    }
    if kvh == 0 || h == 0 || h % kvh != 0 || h + kvh > 65_535 {
        return Err(Error::Unsupported { op: OP, msg: format!("{h} query heads over {kvh} key/value heads") });
    }
    if hd == 0 || hd > 512 {
        return Err(Error::Unsupported { op: OP, msg: format!("head_dim = {hd} (the GPU takes 1 ..= 512)") });
    }
    let dt = match p.dtype {
        0 => "f32",
        1 => "bf16",
        2 => "f16",
        code => return Err(Error::Unsupported { op: OP, msg: format!("dtype code {code}") }),
    };
    if tokens == 0 {
        return Ok(());
    }
    let t32 = u32::try_from(tokens).map_err(|_| Error::size(OP, format!("{tokens} tokens")))?;
    let cfg = LaunchConfig { grid_dim: (t32, (h + kvh) as u32, 1), block_dim: (ATTN_NT, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: the caller's contract.
    unsafe { launch(dev, &attn_function(dev, "attn_prep")?, cfg, &p) }?;

    let max_new = batch.seqs.iter().map(|r| r.len()).max().unwrap_or(0);
    if use_tensor_cores(p.dtype, hd, max_new) {
        // Query blocks of up to 64 rows of one sequence, the longest contexts first (they take
        // the longest, so they should not start last).
        let mut blocks: Vec<(usize, i32, i32)> = Vec::new();
        for (r, &past) in batch.seqs.iter().zip(&batch.past) {
            for q0 in (0..r.len()).step_by(TC_BQ) {
                let qn = TC_BQ.min(r.len() - q0);
                blocks.push((past + q0 + qn, (r.start + q0) as i32, qn as i32));
            }
        }
        blocks.sort_by_key(|b| std::cmp::Reverse(b.0));
        let table: Vec<i32> = blocks.iter().flat_map(|&(_, t0, qn)| [t0, qn]).collect();
        let table = dev.stream().clone_htod(&table)?;
        p.qblk = table.device_ptr(dev.stream()).0;
        let f = attn_function(dev, &format!("attn_prefill_tc_{dt}_d{hd}"))?;
        let smem = tc_smem(hd);
        f.set_attribute(MAX_DYN_SMEM, smem as i32)?;
        let nb = u32::try_from(blocks.len()).ok().filter(|&b| b <= 65_535);
        let nb = nb.ok_or_else(|| Error::size(OP, format!("{} query blocks (at most 65535)", blocks.len())))?;
        // Heads vary fastest: the longest contexts (first in the table) start first.
        let cfg = LaunchConfig { grid_dim: (h as u32, nb, 1), block_dim: (ATTN_NT, 1, 1), shared_mem_bytes: smem };
        // SAFETY: the caller's contract; the table holds (first token, rows) of every block, each
        // inside one sequence, and lives until after the launch in stream order.
        unsafe { launch(dev, &f, cfg, &p) }?;
        drop(table);
        return Ok(());
    }

    let group = h / kvh;
    let (epl, gc) = split_shape(hd, group);
    let chunks = group.div_ceil(gc);
    // Planned for the cache's capacity, not the contexts of this call: slices past a token's
    // context exit at once, and the launch stays valid as the contexts grow (a captured decode
    // step replays it unchanged until the cache grows).
    let (splits, split_len) = split_plan(tokens * kvh * chunks, p.cap as usize, dev.sm_count());
    p.splits = splits as i32;
    p.split_len = split_len as i32;
    let mut part = None;
    if splits > 1 {
        // SAFETY: each split CTA writes the slots of its (token, head, split) and the combine
        // kernel reads only the splits that hold keys of the token's context, which are those.
        let mut t = unsafe { CudaTensor::uninit(&[tokens * h * splits * (hd + 2)], DType::F32, dev)? };
        p.part = t.raw_addr_mut();
        part = Some(t);
    }
    let ny = u32::try_from(kvh * chunks).ok().filter(|&y| y <= 65_535);
    let ny = ny.ok_or_else(|| Error::size(OP, format!("{kvh} key/value heads × {chunks} head chunks")))?;
    let f = attn_function(dev, &format!("attn_split_{dt}_e{epl}_g{gc}"))?;
    let cfg = LaunchConfig { grid_dim: (t32, ny, splits as u32), block_dim: (ATTN_NT, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: the caller's contract; the scratch holds tokens·H·splits·(hd + 2) f32 values.
    unsafe { launch(dev, &f, cfg, &p) }?;
    if splits > 1 {
        let cfg = LaunchConfig { grid_dim: (t32, h as u32, 1), block_dim: (COMBINE_NT, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: as above; the scratch lives until after the launch in stream order.
        unsafe { launch(dev, &attn_function(dev, "attn_combine")?, cfg, &p) }?;
    }
    drop(part);
    Ok(())
}

/// Mirror of `PoolParams` in `nn.cu` (same order, `repr(C)`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct PoolParams {
    src: u64,
    dst: u64,
    dtype: i32,
    n: i32,
    cap_old: i32,
    cap_new: i32,
    width: i32,
    rows: i32,
}
// SAFETY: plain old data in the C layout the kernel reads.
unsafe impl DeviceRepr for PoolParams {}

/// A cache pool `[N, cap_old, width…]` grown to `[n_new, cap_new, width…]` (`n_new ≥ N`), the
/// first `rows` rows of each of its sequences copied (the rest zero).
pub(crate) fn grow_pool(old: &CudaTensor, n_new: usize, cap_new: usize, rows: usize) -> Result<CudaTensor> {
    const OP: &str = "grow_pool";
    let (n, cap_old) = (old.shape()[0], old.shape()[1]);
    let width: usize = old.shape()[2..].iter().product();
    if n_new < n {
        return Err(Error::size(OP, format!("a pool of {n} sequences into {n_new}")));
    }
    let mut shape = old.shape().to_vec();
    shape[0] = n_new;
    shape[1] = cap_new;
    let dev = old.cuda_device().clone();
    let mut new = CudaTensor::zeros(&shape, old.dtype(), &dev)?;
    if rows > cap_old.min(cap_new) {
        return Err(Error::size(OP, format!("{rows} rows of a pool of {cap_old} into {cap_new}")));
    }
    to_i32(OP, "N·cap·width", n_new * cap_new.max(cap_old) * width)?;
    let params = PoolParams {
        src: old.raw_addr(),
        dst: new.raw_addr_mut(),
        dtype: dtype_code(OP, "pool", old.dtype())?,
        n: to_i32(OP, "N", n)?,
        cap_old: to_i32(OP, "cap", cap_old)?,
        cap_new: to_i32(OP, "cap", cap_new)?,
        width: to_i32(OP, "width", width)?,
        rows: to_i32(OP, "rows", rows)?,
    };
    if n * rows * width > 0 {
        let cfg = LaunchConfig {
            grid_dim: (blocks(OP, n * rows * width, 256)?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: PoolParams mirrors the kernel's argument; src holds N·cap_old·width and dst
        // n_new·cap_new·width (n_new >= N) elements of `dtype`, rows <= both capacities (checked).
        unsafe { launch(&dev, &function(&dev, "nn_copy_pool")?, cfg, &params) }?;
    }
    Ok(new)
}

/// Mirror of `RowsParams` in `nn.cu` (same order, `repr(C)`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct RowsParams {
    x: u64,
    y: u64,
    rows: u64,
    w: u64,
    gate: u64,
    dtype: i32,
    n: i32,
    width: i32,
    _pad: i32,
}
// SAFETY: plain old data in the C layout the kernels read.
unsafe impl DeviceRepr for RowsParams {}

/// Launches `name` (`nn_gather_rows` or `nn_scatter_add_rows`) over `n` rows of `width`, with
/// the row indices and weights uploaded as one table.
///
/// # Safety
/// `params.x`, `params.y` and `params.gate` must cover what the kernel indexes for `n`, `width`
/// and the given rows (checked by the callers), alive until the work is done in stream order.
unsafe fn rows_launch(
    dev: &Arc<CudaDevice>,
    name: &str,
    mut params: RowsParams,
    rows: Option<&[usize]>,
    weights: Option<&[f32]>,
) -> Result<()> {
    const OP: &str = "rows_launch";
    let (n, width) = (params.n as usize, params.width as usize);
    if n * width == 0 {
        return Ok(());
    }
    let mut table: Vec<u32> = Vec::new();
    if let Some(r) = rows {
        table.extend(r.iter().map(|&i| to_i32(OP, "row", i).map(|i| i as u32)).collect::<Result<Vec<_>>>()?);
    }
    table.extend(weights.unwrap_or(&[]).iter().map(|w| w.to_bits()));
    let table = (!table.is_empty()).then(|| dev.stream().clone_htod(&table)).transpose()?;
    let base = table.as_ref().map_or(0, |t| {
        use fla_core::cuda::cudarc::driver::DevicePtr;
        t.device_ptr(dev.stream()).0
    });
    params.rows = if rows.is_some() { base } else { 0 };
    params.w = if weights.is_some() { base + 4 * rows.map_or(0, |r| r.len()) as u64 } else { 0 };
    let cfg =
        LaunchConfig { grid_dim: (blocks(OP, n * width, 256)?, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: RowsParams mirrors the kernels' argument; the caller's contract covers x, y and
    // gate; the table holds n row indices and / or n weights and lives past the launch.
    unsafe { launch(dev, &function(dev, name)?, cfg, &params) }?;
    drop(table);
    Ok(())
}

/// Row indices on a GPU, below a bound, for [`gather_rows_indexed_cuda`]: the token ids of an
/// embedding lookup, rewritten in place ([`RowIndices::write`]) between replays of a captured
/// decode step.
#[derive(Debug)]
pub struct RowIndices {
    buf: CudaSlice<i32>,
    bound: usize,
}

impl RowIndices {
    /// `rows` (each below `bound`, checked) on `dev`.
    pub fn new(dev: &Arc<CudaDevice>, rows: &[usize], bound: usize) -> Result<Self> {
        let host = Self::host(rows, bound)?;
        Ok(RowIndices { buf: dev.stream().clone_htod(&host)?, bound })
    }
    /// Rewrites the indices in place with as many new ones (each below the bound, checked).
    pub fn write(&mut self, dev: &Arc<CudaDevice>, rows: &[usize]) -> Result<()> {
        if rows.len() != self.buf.len() {
            return Err(Error::Argument {
                op: "RowIndices::write",
                arg: "rows",
                msg: format!("{} rows for {} indices", rows.len(), self.buf.len()),
            });
        }
        let host = Self::host(rows, self.bound)?;
        dev.stream().memcpy_htod(&host, &mut self.buf)?;
        Ok(())
    }
    fn host(rows: &[usize], bound: usize) -> Result<Vec<i32>> {
        const OP: &str = "RowIndices";
        if let Some(&bad) = rows.iter().find(|&&i| i >= bound) {
            return Err(Error::Argument {
                op: OP,
                arg: "rows",
                msg: format!("row {bad} of a tensor with {bound} rows"),
            });
        }
        rows.iter().map(|&r| to_i32(OP, "row", r)).collect()
    }
    /// Number of indices.
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// Rows `rows[i]` of `x [R, width]` stacked into `[rows.len(), width]` on the GPU (the tokens
/// routed to one expert, the last token of each sequence).
pub fn gather_rows_cuda(x: &CudaTensor, rows: &[usize]) -> Result<CudaTensor> {
    let r = x.shape().first().copied().unwrap_or(0);
    gather_rows_indexed_cuda(x, &RowIndices::new(x.cuda_device(), rows, r)?)
}

/// [`gather_rows_cuda`] with the row indices already on the device.
pub fn gather_rows_indexed_cuda(x: &CudaTensor, rows: &RowIndices) -> Result<CudaTensor> {
    const OP: &str = "gather_rows_cuda";
    let &[r, width] = x.shape() else {
        return Err(Error::shape(OP, "x", "[rows, width]", x.shape()));
    };
    if rows.bound > r {
        return Err(Error::Argument {
            op: OP,
            arg: "rows",
            msg: format!("indices below {} for a tensor with {r} rows", rows.bound),
        });
    }
    let n = rows.len();
    to_i32(OP, "rows·width", n.max(r) * width)?;
    let dev = x.cuda_device().clone();
    // SAFETY: the kernel writes every element of y (a thread per element).
    let mut y = unsafe { CudaTensor::uninit(&[n, width], x.dtype(), &dev)? };
    let params = RowsParams {
        x: x.raw_addr(),
        y: y.raw_addr_mut(),
        rows: rows.buf.device_ptr(dev.stream()).0,
        w: 0,
        gate: 0,
        dtype: dtype_code(OP, "x", x.dtype())?,
        n: to_i32(OP, "rows", n)?,
        width: to_i32(OP, "width", width)?,
        _pad: 0,
    };
    if n * width > 0 {
        let cfg =
            LaunchConfig { grid_dim: (blocks(OP, n * width, 256)?, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: RowsParams mirrors the kernel's argument; x holds r·width and y n·width
        // elements of `dtype`; the n row indices are below their bound <= r (checked) and live
        // in `rows`, borrowed past the launch's enqueueing (its owner keeps them alive in
        // stream order).
        unsafe { launch(&dev, &function(&dev, "nn_gather_rows")?, cfg, &params) }?;
    }
    Ok(y)
}

/// `y[rows[i]] += weights[i] · sigmoid(gate[i]) · x[i]` on the GPU, for `x [n, width]`: `rows`
/// (distinct, in `y`'s rows) defaults to `0 .. n`, `weights` to 1, `gate [n]` (x's dtype) to no
/// gate. A mixture of experts adds each expert's rows back with it (and the shared expert, gated).
pub fn scatter_add_rows_cuda(
    y: &mut CudaTensor,
    x: &CudaTensor,
    rows: Option<&[usize]>,
    weights: Option<&[f32]>,
    gate: Option<&CudaTensor>,
) -> Result<()> {
    const OP: &str = "scatter_add_rows_cuda";
    let &[n, width] = x.shape() else {
        return Err(Error::shape(OP, "x", "[rows, width]", x.shape()));
    };
    let &[r, yw] = y.shape() else {
        return Err(Error::shape(OP, "y", format!("[rows, width = {width}]"), y.shape()));
    };
    check_like(OP, "y", y, x, None, true)?;
    if yw != width {
        return Err(Error::shape(OP, "y", format!("[rows, width = {width}]"), y.shape()));
    }
    match rows {
        Some(rows) if rows.len() != n => {
            return Err(Error::Argument { op: OP, arg: "rows", msg: format!("{} rows for {n} rows of x", rows.len()) })
        }
        Some(rows) => {
            if let Some(&bad) = rows.iter().find(|&&i| i >= r) {
                return Err(Error::Argument { op: OP, arg: "rows", msg: format!("row {bad} of y's {r}") });
            }
            let mut seen = vec![false; r];
            if rows.iter().any(|&i| std::mem::replace(&mut seen[i], true)) {
                return Err(Error::Argument { op: OP, arg: "rows", msg: "a row appears twice".into() });
            }
        }
        None if r != n => return Err(Error::shape(OP, "y", format!("[{n}, {width}] (no rows given)"), y.shape())),
        None => {}
    }
    if let Some(w) = weights.filter(|w| w.len() != n) {
        return Err(Error::Argument { op: OP, arg: "weights", msg: format!("{} weights for {n} rows", w.len()) });
    }
    if let Some(g) = gate {
        check_like(OP, "gate", g, x, None, true)?;
        if g.elem_count() != n {
            return Err(Error::shape(OP, "gate", format!("{n} elements"), g.shape()));
        }
    }
    to_i32(OP, "rows·width", n.max(r) * width)?;
    let dev = x.cuda_device().clone();
    let params = RowsParams {
        x: x.raw_addr(),
        y: y.raw_addr_mut(),
        rows: 0,
        w: 0,
        gate: gate.map_or(0, |g| g.raw_addr()),
        dtype: dtype_code(OP, "x", x.dtype())?,
        n: to_i32(OP, "rows", n)?,
        width: to_i32(OP, "width", width)?,
        _pad: 0,
    };
    // SAFETY: x holds n·width and y r·width elements of `dtype`, gate n; rows are distinct and
    // < r (checked), so each element of y has one writer.
    unsafe { rows_launch(&dev, "nn_scatter_add_rows", params, rows, weights) }
}

/// Mirror of `MlaAppendParams` in `nn.cu` (same order, `repr(C)`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct MlaAppendParams {
    kva: u64,
    w: u64,
    pool: u64,
    seq_of: u64,
    pos: u64,
    dtype: i32,
    tokens: i32,
    r: i32,
    rope: i32,
    cap: i32,
    eps: f32,
}
// SAFETY: plain old data in the C layout the kernel reads.
unsafe impl DeviceRepr for MlaAppendParams {}

/// The latent cache append of multi-head latent attention on the GPU: for each token `t` of
/// `kva [tokens, r + rope]` (`kv_a_proj_with_mqa`'s output, `c | k_pe`), the row
/// `rms_norm(c)·w | k_pe` (plain RMSNorm, `w [r]` f32, epsilon `eps`) written to
/// `pool [N, cap, r + rope]` (`kva`'s dtype) at sequence `seq_of[t]`, position `pos[t]`.
pub(crate) fn mla_append_cuda(
    kva: &CudaTensor,
    w: &CudaTensor,
    eps: f32,
    pool: &mut CudaTensor,
    seq_of: &[usize],
    pos: &[usize],
) -> Result<()> {
    const OP: &str = "mla_append_cuda";
    let &[tokens, lat] = kva.shape() else {
        return Err(Error::shape(OP, "kva", "[tokens, kv_lora_rank + rope]", kva.shape()));
    };
    check_f32(OP, "w", w)?;
    check_like(OP, "w", w, kva, None, false)?;
    let &[r] = w.shape() else {
        return Err(Error::shape(OP, "w", "[kv_lora_rank]", w.shape()));
    };
    if r == 0 || r > lat {
        return Err(Error::shape(OP, "w", format!("[kv_lora_rank] with 0 < kv_lora_rank <= {lat}"), w.shape()));
    }
    check_like(OP, "pool", pool, kva, None, true)?;
    let &[n, cap, pw] = pool.shape() else {
        return Err(Error::shape(OP, "pool", format!("[N, cap, {lat}]"), pool.shape()));
    };
    if pw != lat {
        return Err(Error::shape(OP, "pool", format!("[N, cap, {lat}]"), pool.shape()));
    }
    if seq_of.len() != tokens || pos.len() != tokens {
        return Err(Error::Argument {
            op: OP,
            arg: "seq_of",
            msg: format!("{} sequences and {} positions for {tokens} tokens", seq_of.len(), pos.len()),
        });
    }
    if let Some(t) = (0..tokens).find(|&t| seq_of[t] >= n || pos[t] >= cap) {
        return Err(Error::Argument {
            op: OP,
            arg: "pos",
            msg: format!("token {t} at sequence {}, position {} of a pool [{n}, {cap}]", seq_of[t], pos[t]),
        });
    }
    to_i32(OP, "N·cap·width", n * cap * lat)?;
    to_i32(OP, "tokens·width", tokens * lat)?;
    if tokens == 0 {
        return Ok(());
    }
    let dev = kva.cuda_device().clone();
    let table: Vec<i32> = seq_of.iter().chain(pos).map(|&v| v as i32).collect();
    let table = dev.stream().clone_htod(&table)?;
    let table_addr = {
        use fla_core::cuda::cudarc::driver::DevicePtr;
        table.device_ptr(dev.stream()).0
    };
    let params = MlaAppendParams {
        kva: kva.raw_addr(),
        w: w.raw_addr(),
        pool: pool.raw_addr_mut(),
        seq_of: table_addr,
        pos: table_addr + 4 * tokens as u64,
        dtype: dtype_code(OP, "kva", kva.dtype())?,
        tokens: to_i32(OP, "tokens", tokens)?,
        r: to_i32(OP, "kv_lora_rank", r)?,
        rope: to_i32(OP, "rope", lat - r)?,
        cap: to_i32(OP, "cap", cap)?,
        eps,
    };
    let cfg = LaunchConfig { grid_dim: (blocks(OP, tokens, 1)?, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: MlaAppendParams mirrors the kernel's argument; kva holds tokens·lat and pool
    // N·cap·lat elements of `dtype`, w r f32 values; every (seq_of, pos) is inside the pool
    // (checked; the values fit i32 as N·cap·lat does); the table lives past the launch in
    // stream order.
    unsafe { launch(&dev, &function(&dev, "nn_mla_append")?, cfg, &params) }?;
    drop(table);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_match_the_kernel_structs() {
        assert_eq!(std::mem::size_of::<SplitOut>(), 3 * 8 + 2 * 4);
        assert_eq!(std::mem::size_of::<NormParams>(), 5 * 8 + 8 * 4);
        assert_eq!(std::mem::size_of::<ConvParams>(), 5 * 8 + 32 + 8 * 4);
        assert_eq!(std::mem::size_of::<GluParams>(), 2 * 8 + 8 + 2 * 8);
        assert_eq!(std::mem::size_of::<ColsParams>(), 8 + 32 + 5 * 4 + 4);
        assert_eq!(std::mem::size_of::<AttnParams>(), 14 * 8 + 13 * 4 + 4);
        assert_eq!(std::mem::size_of::<PoolParams>(), 2 * 8 + 6 * 4);
        assert_eq!(std::mem::size_of::<RowsParams>(), 5 * 8 + 4 * 4);
        assert_eq!(std::mem::size_of::<MlaAppendParams>(), 5 * 8 + 6 * 4);
    }

    #[test]
    fn shared_memory_fits_an_sm90_cta() {
        // The largest dynamic shared memory a Hopper CTA can opt into (227 KB); a launch above it
        // fails at run time, so check every size the attention launcher asks for here.
        const MAX: u32 = 232_448;
        for hd in [64, 128, 256] {
            assert!(tc_smem(hd) <= MAX, "tensor-core prefill, head_dim {hd}: {}", tc_smem(hd));
        }
        // The split-KV kernel's merge buffer (o, max and sum of its 4 warps) is static shared
        // memory: at most 48 KB.
        let split_smem = |epl: usize, gc: usize| 4 * gc * (32 * epl + 2) * 4;
        for hd in 1..=512 {
            for group in 1..=64 {
                let (epl, gc) = split_shape(hd, group);
                assert!(split_smem(epl, gc) <= 48 * 1024, "hd {hd}, group {group}");
            }
        }
    }

    #[test]
    fn split_kernel_instances_cover_every_shape() {
        // attention.cu instantiates EPL in {2, 4, 8} with GC in {1, 2, 4, 8}, and EPL 16 with GC
        // in {1, 2, 4}.
        for hd in 1..=512 {
            for group in 1..=64 {
                let (epl, gc) = split_shape(hd, group);
                assert!(32 * epl >= hd && [2, 4, 8, 16].contains(&epl), "hd {hd}: EPL {epl}");
                assert!([1, 2, 4, 8].contains(&gc) && !(epl == 16 && gc == 8), "group {group}: GC {gc}");
            }
        }
        assert_eq!(split_shape(256, 4), (8, 4));
        assert_eq!(split_shape(128, 8), (4, 8));
        assert_eq!(split_shape(32, 3), (2, 4));
    }

    #[test]
    fn split_plan_fills_the_gpu_and_covers_the_context() {
        for ctas in [1, 2, 4, 16, 264, 10_000] {
            for max_ctx in [1, 15, 64, 600, 8192, 100_000, 1 << 20] {
                let (splits, len) = split_plan(ctas, max_ctx, 132);
                assert!((1..=MAX_SPLITS).contains(&splits), "{ctas} {max_ctx}: {splits}");
                assert!(len % 16 == 0 && splits * len >= max_ctx && (splits - 1) * len < max_ctx);
            }
        }
        // Decode at batch 1 with 2 KV heads: 8k context over 132 slices of 64 keys.
        assert_eq!(split_plan(2, 8192, 132), (128, 64));
        // ~600 tokens: slices of 64 keys.
        assert_eq!(split_plan(2, 601, 132).0, 10);
        // A long prefill fills the GPU on its own: one slice, no combine pass.
        assert_eq!(split_plan(2000, 1000, 132).0, 1);
    }

    #[test]
    fn tensor_cores_for_long_16_bit_prefills() {
        assert!(use_tensor_cores(1, 256, 64) && use_tensor_cores(2, 64, 1000));
        assert!(!use_tensor_cores(0, 256, 1000), "f32");
        assert!(!use_tensor_cores(1, 96, 1000), "head_dim 96");
        assert!(!use_tensor_cores(1, 128, 63), "short");
    }
}
