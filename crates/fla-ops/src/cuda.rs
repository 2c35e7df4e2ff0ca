//! Launches of the GPU kernels (`fla-kernels/cuda/`). Every launch of fla-ops lives here, after
//! its arguments have been checked, with a `// SAFETY:` note on what makes it sound.
//!
//! The kernels are generic over the family's knobs (decay, erase, write) and read their inputs
//! in f32, bf16 or f16 as told at run time; the state is always f32.
use std::collections::HashSet;

use fla_core::cuda::cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as MAX_DYN_SMEM;
use fla_core::cuda::cudarc::driver::{CudaFunction, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use fla_core::cuda::{CudaDevice, CudaTensor};
use fla_core::{DType, Error, Result};

use crate::{Decay, Erase, Family, Inputs, Options, Problem, Write};

/// The cubin of module `name`, or the typed error saying why this build has none.
fn cubin(name: &str) -> Result<&'static [u8]> {
    fla_kernels::cubin(name).map_err(|msg| Error::NoCudaKernel { kernel: name.to_string(), msg })
}

/// Input dtype codes of `cuda/common/dtype.cuh`.
fn dtype_code(op: &'static str, arg: &'static str, dt: DType) -> Result<i32> {
    match dt {
        DType::F32 => Ok(0),
        DType::BF16 => Ok(1),
        DType::F16 => Ok(2),
        got => Err(Error::DType { op, arg, expected: "f32, bf16 or f16".into(), got }),
    }
}

/// Raw device address of a tensor's buffer (see [`CudaTensor::raw_addr`]).
fn addr(t: &CudaTensor) -> u64 {
    t.raw_addr()
}

fn addr_mut(t: &mut CudaTensor) -> u64 {
    t.raw_addr_mut()
}

fn opt_addr(t: Option<&CudaTensor>) -> u64 {
    t.map_or(0, addr)
}

fn to_i32(op: &'static str, what: &str, x: usize) -> Result<i32> {
    i32::try_from(x).map_err(|_| Error::size(op, format!("{what} = {x} does not fit the kernel's 32-bit index")))
}

/// Mirror of `RecurrentParams` in `cuda/recurrent.cu` (same order, `repr(C)`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct RecurrentParams {
    q: u64,
    k: u64,
    v: u64,
    g: u64,
    beta: u64,
    b: u64,
    w: u64,
    a_log: u64,
    dt_bias: u64,
    o: u64,
    state: u64,
    cu_seqlens: u64,
    state_indices: u64,
    dtype: i32,
    a_log_dtype: i32,
    dt_bias_dtype: i32,
    n: i32,
    t: i32,
    h: i32,
    hv: i32,
    dk: i32,
    dv: i32,
    decay: i32,
    erase: i32,
    write: i32,
    l2norm: i32,
    beta_sigmoid: i32,
    use_gate: i32,
    dt_per_channel: i32,
    scale: f32,
}

// SAFETY: plain old data with the C layout the kernel reads (u64 addresses, i32 and f32 fields).
unsafe impl DeviceRepr for RecurrentParams {}

/// A tiling of `recurrent.cu`: kernel-name suffix, value columns per CTA, threads per CTA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tiling {
    suffix: &'static str,
    bv: usize,
    threads: u32,
}

/// The tiling for every K ≤ 256 and V: 32 columns, 128 threads.
const BV32: Tiling = Tiling { suffix: "", bv: 32, threads: 128 };

/// The tiling for 64 < K ≤ 128 and V % 4 == 0: 64 columns, 128 threads, 4 CTAs per SM. On an
/// H200 it moved 90% (N = 64) and 94% (N = 256) of the copy bandwidth, BV32 72-73%.
const BV64: Tiling = Tiling { suffix: "_bv64", bv: 64, threads: 128 };

/// Tilings for 64 < K ≤ 128 and V % 4 == 0 that `FLA_RECURRENT_VARIANT` can pick to compare
/// (`bv32`, `bv64`, `o8`: 32 columns capped at 64 registers, `bv128`: a whole head per CTA).
const VARIANTS: [(&str, Tiling); 4] = [
    ("bv32", BV32),
    ("bv64", BV64),
    ("o8", Tiling { suffix: "_o8", bv: 32, threads: 128 }),
    ("bv128", Tiling { suffix: "_bv128", bv: 128, threads: 256 }),
];

fn tiling(k: usize, v: usize) -> Tiling {
    if !(65..=128).contains(&k) || v % 4 != 0 {
        return BV32;
    }
    static CHOSEN: std::sync::OnceLock<Tiling> = std::sync::OnceLock::new();
    *CHOSEN.get_or_init(|| match std::env::var("FLA_RECURRENT_VARIANT") {
        Ok(want) => VARIANTS.iter().find(|(name, _)| *name == want).map_or(BV64, |(_, t)| *t),
        Err(_) => BV64,
    })
}

/// The recurrent step on the GPU; see [`crate::recurrent::step_cuda`] for the contract.
pub(crate) fn recurrent_step(
    family: Family,
    x: &Inputs<'_, CudaTensor>,
    opts: &Options,
    state: &mut CudaTensor,
    state_indices: Option<&[usize]>,
) -> Result<CudaTensor> {
    const OP: &str = "recurrent::step_cuda";
    if x.initial_state.is_some() {
        return Err(Error::Unsupported { op: OP, msg: "pass the state as `state`, not `initial_state`".into() });
    }
    let p = Problem::new(OP, family, x, opts)?;
    let d = p.dims;
    let dev: std::sync::Arc<CudaDevice> = x.q.cuda_device().clone();
    if state.device() != x.q.device() {
        return Err(Error::Device {
            op: OP,
            arg: "state",
            expected: format!("{} (the device of q)", x.q.device()),
            got: state.device().to_string(),
        });
    }
    if state.dtype() != DType::F32 {
        return Err(Error::DType { op: OP, arg: "state", expected: "f32".into(), got: state.dtype() });
    }
    let pool = match state.shape() {
        &[pool, hv, k, v] if hv == d.hv && k == d.k && v == d.v && pool > 0 => pool,
        got => {
            let want = if state_indices.is_some() { "[pool]".to_string() } else { format!("[N] = [{}]", d.n) };
            return Err(Error::shape(OP, "state", format!("[{want}, HV={}, K={}, V={}]", d.hv, d.k, d.v), got));
        }
    };
    let indices = match state_indices {
        None => {
            if pool != d.n {
                return Err(Error::shape(
                    OP,
                    "state",
                    format!("[N,HV,K,V] with N = {} (or pass state_indices)", d.n),
                    state.shape(),
                ));
            }
            None
        }
        Some(idx) => {
            if idx.len() != d.n {
                return Err(Error::shape(OP, "state_indices", format!("[N] = [{}]", d.n), &[idx.len()]));
            }
            let mut seen = HashSet::with_capacity(idx.len());
            for (i, &r) in idx.iter().enumerate() {
                if r >= pool {
                    return Err(Error::size(
                        OP,
                        format!("state_indices[{i}] = {r} is outside the pool of {pool} rows"),
                    ));
                }
                if !seen.insert(r) {
                    return Err(Error::size(OP, format!("state_indices[{i}] = {r} repeats an earlier row")));
                }
            }
            let v: Vec<i32> = idx.iter().map(|&r| to_i32(OP, "state index", r)).collect::<Result<_>>()?;
            Some(dev.stream().clone_htod(&v)?)
        }
    };
    let kmax = match d.k {
        0..=64 => 64,
        65..=128 => 128,
        129..=256 => 256,
        k => return Err(Error::Unsupported { op: OP, msg: format!("K = {k} > 256 on the GPU") }),
    };
    let vw = if d.v % 4 == 0 { 4 } else { 1 };
    let tokens = d.b * d.t;
    let cu = match x.cu_seqlens {
        Some(cu) => {
            let v: Vec<i32> = cu.iter().map(|&c| to_i32(OP, "cu_seqlens entry", c)).collect::<Result<_>>()?;
            Some(dev.stream().clone_htod(&v)?)
        }
        None => None,
    };
    let tl = tiling(d.k, d.v);
    let tiles = d.n * d.hv * d.v.div_ceil(tl.bv);
    let tiles = u32::try_from(tiles)
        .ok()
        .filter(|&b| b < i32::MAX as u32)
        .ok_or_else(|| Error::size(OP, format!("N·HV·⌈V/{}⌉ = {tiles} CTAs is more than one launch takes", tl.bv)))?;
    to_i32(OP, "tokens·HV·max(K,V)", tokens * d.hv * d.k.max(d.v))?;
    let dt_code = dtype_code(OP, "q", x.q.dtype())?;
    let (a_log_dtype, dt_bias_dtype) = match (x.a_log, x.dt_bias) {
        (Some(a), Some(b)) => (dtype_code(OP, "A_log", a.dtype())?, dtype_code(OP, "dt_bias", b.dtype())?),
        _ => (0, 0),
    };
    let func = dev.function(
        "recurrent",
        cubin("recurrent")?,
        &format!("recurrent_step_{}_k{kmax}_v{vw}{}", x.q.dtype(), tl.suffix),
    )?;

    // SAFETY: every element of `o` is written by the kernel before it is read: each token
    // belongs to exactly one sequence (Problem checked cu_seqlens), and each (token, value head,
    // column) is stored by exactly one thread.
    let mut o = unsafe { CudaTensor::uninit(&[d.b, d.t, d.hv, d.v], x.q.dtype(), &dev)? };
    let stream = dev.stream().clone();
    let params = RecurrentParams {
        q: addr(x.q),
        k: addr(x.k),
        v: addr(x.v),
        g: opt_addr(x.g),
        beta: opt_addr(x.beta),
        b: opt_addr(x.b),
        w: opt_addr(x.w),
        a_log: opt_addr(x.a_log),
        dt_bias: opt_addr(x.dt_bias),
        o: addr_mut(&mut o),
        state: addr_mut(state),
        cu_seqlens: cu.as_ref().map_or(0, |c| c.device_ptr(&stream).0),
        state_indices: indices.as_ref().map_or(0, |c| c.device_ptr(&stream).0),
        dtype: dt_code,
        a_log_dtype,
        dt_bias_dtype,
        n: to_i32(OP, "N", d.n)?,
        t: to_i32(OP, "T", d.t)?,
        h: to_i32(OP, "H", d.h)?,
        hv: to_i32(OP, "HV", d.hv)?,
        dk: to_i32(OP, "K", d.k)?,
        dv: to_i32(OP, "V", d.v)?,
        decay: match family.decay() {
            Decay::None => 0,
            // simple GLA without a gate has no decay
            Decay::Head if x.g.is_none() => 0,
            Decay::Head => 1,
            Decay::Channel => 2,
        },
        erase: match family.erase() {
            Erase::None => 0,
            Erase::Beta => 1,
            Erase::Channel => 2,
        },
        write: match family.write() {
            Write::One => 0,
            Write::Beta => 1,
            Write::Channel => 2,
        },
        l2norm: opts.use_qk_l2norm_in_kernel as i32,
        beta_sigmoid: opts.use_beta_sigmoid_in_kernel as i32,
        use_gate: opts.use_gate_in_kernel as i32,
        dt_per_channel: x.dt_bias.is_some_and(|t| t.elem_count() != d.hv) as i32,
        scale: p.scale as f32,
    };
    let cfg = LaunchConfig { grid_dim: (tiles, 1, 1), block_dim: (tl.threads, 1, 1), shared_mem_bytes: 0 };
    let mut launch = stream.launch_builder(&func);
    launch.arg(&params);
    // SAFETY: the kernel's signature is `(RecurrentParams)` by value, mirrored above. Problem::new
    // checked every shape, so each address covers what the kernel indexes: q, k [tokens,H,K];
    // v, o [tokens,HV,V]; g, beta, b, w in their family's shapes (null when absent, and the
    // kernel reads a pointer only when its knob says so); A_log [HV], dt_bias [HV] or [HV·K];
    // cu_seqlens [N+1] with values in [0, tokens]; state [pool,HV,K,V] with every index < pool
    // and distinct, so no two CTAs own the same state tile. K ≤ KMAX and V % VW == 0 hold by
    // the choice of kernel. All buffers outlive the launch in stream order (frees are
    // stream-ordered on the same stream), and `cu` / `indices` are dropped only after it.
    unsafe { launch.launch(cfg) }?;
    drop((cu, indices));
    Ok(o)
}

/// Mirror of `ChunkParams` in `cuda/common/chunk.cuh` (same order, `repr(C)`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct ChunkParams {
    q: u64,
    k: u64,
    v: u64,
    g: u64,
    beta: u64,
    a_log: u64,
    dt_bias: u64,
    h0: u64,
    o: u64,
    ht: u64,
    qn: u64,
    kn: u64,
    gf: u64,
    bf: u64,
    w: u64,
    u: u64,
    gc: u64,
    w16: u64,
    u16: u64,
    aqk: u64,
    qg16: u64,
    kt16: u64,
    rq: u64,
    rk: u64,
    tm: u64,
    hs: u64,
    vn: u64,
    chunk_start: u64,
    chunk_len: u64,
    seq_chunk: u64,
    channel: i32,
    dt_per_channel: i32,
    dtype: i32,
    a_log_dtype: i32,
    dt_bias_dtype: i32,
    tokens: i32,
    n: i32,
    nc: i32,
    h: i32,
    hv: i32,
    dk: i32,
    dv: i32,
    seq_len: i32,
    l2norm: i32,
    beta_sigmoid: i32,
    use_gate: i32,
    scale: f32,
}

// SAFETY: plain old data with the C layout the kernels read (u64 addresses, i32 and f32 fields).
unsafe impl DeviceRepr for ChunkParams {}

/// Chunk length of the chunk kernels (`FLA_C`).
const GPU_CHUNK: usize = 64;
/// Value columns per CTA of `chunk_gdn_fwd` (`FLA_BV`).
const GPU_CHUNK_BV: usize = 64;
/// Dynamic shared memory of `chunk_gdn_intra` (`FLA_INTRA_SMEM`): `[C][129] + [C][C] + 3·[C]`
/// and the cumulative gate `[C][128]` (per channel for KDA), f32.
const INTRA_SMEM: u32 = ((64 * 129 + 64 * 64 + 3 * 64 + 64 * 128) * 4) as u32;
/// Dynamic shared memory of `chunk_gdn_fwd` (`FLA_FWD_SMEM`).
const FWD_SMEM: u32 = ((128 * 64 + 2 * 64 * 129 + 64 * 64 + 64 * 64 + 64 * 128) * 4) as u32;

/// Dynamic shared memory of `chunk_gdn_tc_intra_*` for key dim `k` (`TC_INTRA_SMEM` in
/// chunk_gdn_tc.cu): A and T in f32, block products, four [C] vectors, K and Q tiles (row
/// strides padded by 8 elements, f32 [C][C] by 1).
fn tc_intra_smem(k: usize) -> u32 {
    (2 * 64 * 65 * 4 + 3 * 256 * 4 + 4 * 64 * 4 + 2 * 64 * (k + 8) * 2) as u32
}

/// Dynamic shared memory of `chunk_kda_tc_intra_*` for key dim `k` (`KDA_INTRA_SMEM` in
/// chunk_gdn_tc.cu): the K, Q tiles (16-bit, rows padded by 8), G ([C][K] f32), A ([C][C+1] f32;
/// before it e^g, [C][K] f32 over A and T), the tail after A (T and the inverse's block products
/// in f32, before them one block row's split factors: 80 rows of K + 8, 16-bit) and three [C]
/// vectors: ≈ 104 KB at K = 128, two CTAs (16 warps) per SM.
fn kda_intra_smem(k: usize) -> u32 {
    let tail = (64 * 65 * 4 + 3 * 256 * 4).max(80 * (k + 8) * 2);
    (2 * 64 * (k + 8) * 2 + 64 * k * 4 + 64 * 65 * 4 + tail + 3 * 64 * 4) as u32
}

/// Threads per CTA of `chunk_gdn_tc_intra_*` (`TC_NT`: 4 warps) and `chunk_kda_tc_intra_*`
/// (`KDA_NT`: 8 warps).
fn tc_intra_threads(channel: bool) -> u32 {
    if channel {
        256
    } else {
        128
    }
}

/// Threads per CTA of `chunk_gdn_tc_fwd_*_v{bv}` (`TC_FWD_ALL`): 4 warps for 16 value columns,
/// 8 warps (two groups sharing the tiles) for 32 and 64.
fn tc_fwd_threads(bv: usize) -> u32 {
    if bv == 16 {
        128
    } else {
        256
    }
}

/// Dynamic shared memory of `chunk_gdn_tc_fwd_*` (`TC_FWD_SMEM`): per input stage three [C]
/// vectors and the Q, K, W, P and U tiles; then the S, Vn and scaled Vn blocks of `bv` columns.
fn tc_fwd_smem(k: usize, bv: usize) -> u32 {
    let stage = 3 * 64 * 4 + 3 * 64 * (k + 8) * 2 + 64 * 72 * 2 + 64 * (bv + 8) * 2;
    (tc_fwd_stages(bv) * stage + (k + 128) * (bv + 8) * 2) as u32
}

/// Input stages of `chunk_gdn_tc_fwd_*_v{bv}` (`TC_FWD_ALL`): the 16-column block, chosen when
/// there are few sequences and heads, loads the next chunk while it computes one.
fn tc_fwd_stages(bv: usize) -> usize {
    if bv == 16 {
        2
    } else {
        1
    }
}

/// Value columns per CTA of the tensor-core forward: `FLA_CHUNK_BV` (16, 32 or 64) when set
/// and valid, else the widest block that still gives every SM a CTA (`ctas(bv)` CTAs for a
/// block of `bv`), else 16. (On an H200 at K = V = 128: 64 for 128 heads of 2048 tokens, 16
/// for 16 heads of 32768.)
fn tc_block_v(v: usize, sms: usize, ctas: impl Fn(usize) -> usize) -> usize {
    let valid = |bv: usize| v % bv == 0;
    if let Some(bv) = std::env::var("FLA_CHUNK_BV").ok().and_then(|s| s.parse().ok()) {
        if [16, 32, 64].contains(&bv) && valid(bv) {
            return bv;
        }
    }
    [64, 32].into_iter().find(|&bv| valid(bv) && ctas(bv) >= sms).unwrap_or(16)
}

/// Chunk table of a call: first token and length of every chunk (sequence by sequence), and
/// `seq_chunk[n] .. seq_chunk[n + 1]`, the chunks of sequence `n`.
fn chunk_table(op: &'static str, seqs: &[std::ops::Range<usize>]) -> Result<(Vec<i32>, Vec<i32>, Vec<i32>)> {
    let (mut start, mut len, mut seq) = (Vec::new(), Vec::new(), vec![0i32]);
    for r in seqs {
        for c0 in (r.start..r.end).step_by(GPU_CHUNK) {
            start.push(to_i32(op, "chunk start", c0)?);
            len.push(to_i32(op, "chunk length", GPU_CHUNK.min(r.end - c0))?);
        }
        seq.push(to_i32(op, "chunk count", start.len())?);
    }
    Ok((start, len, seq))
}

/// Launches `f` with `params` as its only argument.
fn launch_chunk(dev: &CudaDevice, f: &CudaFunction, cfg: LaunchConfig, params: &ChunkParams) -> Result<()> {
    let mut launch = dev.stream().launch_builder(f);
    launch.arg(params);
    // SAFETY: every chunk kernel's signature is `(ChunkParams)` by value, mirrored above; the
    // caller (`chunk_forward`) states what makes the addresses in `params` and `cfg` sound.
    unsafe { launch.launch(cfg) }?;
    Ok(())
}

/// A validated chunk call on the GPU: its sizes, the chunk table and the parameters every chunk
/// kernel shares. The buffers the addresses in `params` point to (the table, the cumulative
/// gate) live as long as the call.
struct ChunkCall {
    p: Problem,
    dev: std::sync::Arc<CudaDevice>,
    params: ChunkParams,
    tokens: usize,
    nc: usize,
    /// Gate columns per (token, value head): K for KDA's per-channel decay, else 1.
    kg: usize,
    /// The dtype of q (and of every input but the state).
    dtype: DType,
    _table: Option<fla_core::cuda::cudarc::driver::CudaSlice<i32>>,
    _gc: CudaTensor,
}

/// Checks a chunk call of `family` (forward or backward) and fills the shared parameters; the
/// output and path-specific scratch addresses are left null.
fn chunk_call(op: &'static str, family: Family, x: &Inputs<'_, CudaTensor>, opts: &Options) -> Result<ChunkCall> {
    if !matches!(family, Family::GatedDeltaRule | Family::DeltaRule | Family::Kda) {
        return Err(Error::Unsupported {
            op,
            msg: format!("the GPU chunk form serves gated_delta_rule, delta_rule and kda so far, not {family}"),
        });
    }
    let channel = family == Family::Kda;
    let p = Problem::new(op, family, x, opts)?;
    let d = p.dims;
    let dev: std::sync::Arc<CudaDevice> = x.q.cuda_device().clone();
    if d.k > 128 {
        return Err(Error::Unsupported { op, msg: format!("K = {} > 128 in the GPU chunk form", d.k) });
    }
    if let Some(h0) = x.initial_state {
        if h0.dtype() != DType::F32 {
            return Err(Error::DType { op, arg: "initial_state", expected: "f32".into(), got: h0.dtype() });
        }
    }
    // Problem::new checked that g is present for gated_delta_rule and kda (absent for
    // delta_rule) and beta for all three; the error below is a defence that cannot trigger.
    let beta = x.beta.ok_or_else(|| Error::Unsupported { op, msg: "argument `beta` is required".into() })?;
    let tokens = d.b * d.t;
    to_i32(op, "tokens·HV·max(K,V,64)", tokens * d.hv * d.k.max(d.v).max(GPU_CHUNK))?;
    to_i32(op, "tokens·H·K", tokens * d.h * d.k)?;
    to_i32(op, "N·HV·K·V", d.n * d.hv * d.k * d.v)?;
    let (starts, lens, seq_chunk) = chunk_table(op, &p.seqs)?;
    let nc = starts.len();
    let kg = if channel { d.k } else { 1 };
    let (a_log_dtype, dt_bias_dtype) = match (x.a_log, x.dt_bias) {
        (Some(a), Some(b)) => (dtype_code(op, "A_log", a.dtype())?, dtype_code(op, "dt_bias", b.dtype())?),
        _ => (0, 0),
    };
    let stream = dev.stream().clone();
    // The chunk table goes to the device only for cu_seqlens (one copy: starts, lengths, the
    // sequences' first chunks); equal-length sequences are indexed in the kernels. A copy from
    // pageable memory waits for the stream, so the common case avoids it.
    let table = match x.cu_seqlens {
        Some(_) => Some(stream.clone_htod(&[&starts[..], &lens[..], &seq_chunk[..]].concat())?),
        None => None,
    };
    let table_addr = |offset: usize| table.as_ref().map_or(0, |t| t.device_ptr(&stream).0 + 4 * offset as u64);
    // SAFETY: every (token, value head, gate column) of `gc` is written by the first kernel of
    // either path before it is read.
    let mut gc = unsafe { CudaTensor::uninit(&[(tokens * d.hv * kg).max(1)], DType::F32, &dev)? };
    let params = ChunkParams {
        q: addr(x.q),
        k: addr(x.k),
        v: addr(x.v),
        g: opt_addr(x.g),
        beta: addr(beta),
        a_log: opt_addr(x.a_log),
        dt_bias: opt_addr(x.dt_bias),
        h0: opt_addr(x.initial_state),
        gc: addr_mut(&mut gc),
        chunk_start: table_addr(0),
        chunk_len: table_addr(nc),
        seq_chunk: table_addr(2 * nc),
        channel: channel as i32,
        dt_per_channel: x.dt_bias.is_some_and(|t| t.elem_count() != d.hv) as i32,
        dtype: dtype_code(op, "q", x.q.dtype())?,
        a_log_dtype,
        dt_bias_dtype,
        tokens: to_i32(op, "tokens", tokens)?,
        n: to_i32(op, "N", d.n)?,
        nc: to_i32(op, "chunks", nc)?,
        h: to_i32(op, "H", d.h)?,
        hv: to_i32(op, "HV", d.hv)?,
        dk: to_i32(op, "K", d.k)?,
        dv: to_i32(op, "V", d.v)?,
        seq_len: to_i32(op, "T", d.t)?,
        l2norm: opts.use_qk_l2norm_in_kernel as i32,
        beta_sigmoid: opts.use_beta_sigmoid_in_kernel as i32,
        use_gate: opts.use_gate_in_kernel as i32,
        scale: p.scale as f32,
        ..ChunkParams::default()
    };
    Ok(ChunkCall { p, dev, params, tokens, nc, kg, dtype: x.q.dtype(), _table: table, _gc: gc })
}

impl ChunkCall {
    /// CTAs of a sweep kernel with `bv` value columns per CTA.
    fn tiles(&self, op: &'static str, bv: usize) -> Result<u32> {
        let d = self.p.dims;
        let tiles = d.n * d.hv * d.v.div_ceil(bv);
        u32::try_from(tiles)
            .ok()
            .filter(|&t| t < i32::MAX as u32)
            .ok_or_else(|| Error::size(op, format!("N·HV·⌈V/{bv}⌉ = {tiles} CTAs is more than one launch takes")))
    }

    /// An f32 scratch buffer of `n` elements on the call's device.
    fn scratch(&self, n: usize, dt: DType) -> Result<CudaTensor> {
        // SAFETY: each caller states which kernel writes every element it later reads.
        unsafe { CudaTensor::uninit(&[n.max(1)], dt, &self.dev) }
    }

    /// Runs the f32 path's three kernels (`chunk_gdn.cu`): prep, intra, sweep. With `save` (the
    /// backward's recompute) it also keeps T, the state entering each chunk and the new values,
    /// and the sweep skips the outputs (`params.o` null). Returns the scratch the kernels wrote,
    /// which later kernels of the call read through `self.params`.
    fn f32_forward(&mut self, op: &'static str, save: bool) -> Result<Vec<CudaTensor>> {
        let d = self.p.dims;
        let (tokens, nc) = (self.tokens, self.nc);
        let tiles = self.tiles(op, GPU_CHUNK_BV)?;
        let image = cubin("chunk_gdn")?;
        let prep = self.dev.function("chunk_gdn", image, "chunk_gdn_prep")?;
        let intra = self.dev.function("chunk_gdn", image, "chunk_gdn_intra")?;
        let fwd = self.dev.function("chunk_gdn", image, "chunk_gdn_fwd")?;
        intra.set_attribute(MAX_DYN_SMEM, INTRA_SMEM as i32)?;
        fwd.set_attribute(MAX_DYN_SMEM, FWD_SMEM as i32)?;
        // Written by chunk_gdn_prep for every token: qn, kn, gf, bf; by chunk_gdn_intra for every
        // token of every chunk: w, u (and tm); by chunk_gdn_fwd for every chunk and column: hs,
        // for every token and column: vn.
        let mut qn = self.scratch(tokens * d.h * d.k, DType::F32)?;
        let mut kn = self.scratch(tokens * d.h * d.k, DType::F32)?;
        let mut gf = self.scratch(tokens * d.hv * self.kg, DType::F32)?;
        let mut bf = self.scratch(tokens * d.hv, DType::F32)?;
        let mut w = self.scratch(tokens * d.hv * d.k, DType::F32)?;
        let mut u = self.scratch(tokens * d.hv * d.v, DType::F32)?;
        let pr = &mut self.params;
        pr.qn = addr_mut(&mut qn);
        pr.kn = addr_mut(&mut kn);
        pr.gf = addr_mut(&mut gf);
        pr.bf = addr_mut(&mut bf);
        pr.w = addr_mut(&mut w);
        pr.u = addr_mut(&mut u);
        let mut bufs = vec![qn, kn, gf, bf, w, u];
        if save {
            let mut tm = self.scratch(tokens * d.hv * GPU_CHUNK, DType::F32)?;
            let mut hs = self.scratch(nc * d.hv * d.k * d.v, DType::F32)?;
            let mut vn = self.scratch(tokens * d.hv * d.v, DType::F32)?;
            let pr = &mut self.params;
            pr.tm = addr_mut(&mut tm);
            pr.hs = addr_mut(&mut hs);
            pr.vn = addr_mut(&mut vn);
            bufs.extend([tm, hs, vn]);
        }
        // SAFETY: see `chunk_forward`.
        if tokens > 0 {
            let cfg = LaunchConfig { grid_dim: (tokens as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
            launch_chunk(&self.dev, &prep, cfg, &self.params)?;
        }
        if nc > 0 {
            let grid = (nc as u32, d.hv as u32, 1);
            let cfg = LaunchConfig { grid_dim: grid, block_dim: (256, 1, 1), shared_mem_bytes: INTRA_SMEM };
            launch_chunk(&self.dev, &intra, cfg, &self.params)?;
        }
        if tiles > 0 {
            let cfg = LaunchConfig { grid_dim: (tiles, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: FWD_SMEM };
            launch_chunk(&self.dev, &fwd, cfg, &self.params)?;
        }
        Ok(bufs)
    }

    /// Runs the tensor-core path's two kernels (`chunk_gdn_tc.cu`): intra, sweep. With `save`
    /// it also keeps T, the state entering each chunk and the new values (16-bit), and the sweep
    /// skips the outputs (`params.o` null). Returns the scratch, as [`Self::f32_forward`].
    fn tc_forward(&mut self, op: &'static str, save: bool) -> Result<Vec<CudaTensor>> {
        let d = self.p.dims;
        let (tokens, nc) = (self.tokens, self.nc);
        let dtype = self.dtype;
        let bv = tc_block_v(d.v, self.dev.sm_count(), |bv| d.n * d.hv * d.v / bv);
        let tiles = self.tiles(op, bv)?;
        let name = dtype_name(dtype);
        let image = cubin("chunk_gdn_tc")?;
        // KDA: its own intra kernel (per-channel decay) and the sweep's channel form.
        let channel = self.kg > 1;
        let (fam, intra_smem) = if channel { ("kda", kda_intra_smem(d.k)) } else { ("gdn", tc_intra_smem(d.k)) };
        let intra = self.dev.function("chunk_gdn_tc", image, &format!("chunk_{fam}_tc_intra_{name}_k{}", d.k))?;
        let fwd = self.dev.function("chunk_gdn_tc", image, &format!("chunk_{fam}_tc_fwd_{name}_k{}_v{bv}", d.k))?;
        intra.set_attribute(MAX_DYN_SMEM, intra_smem as i32)?;
        fwd.set_attribute(MAX_DYN_SMEM, tc_fwd_smem(d.k, bv) as i32)?;
        // Written by the intra kernel for every token before the sweep reads them (hs: by the
        // sweep for every chunk and column; vn: for every token and column).
        let mut rq = self.scratch(tokens * d.hv, DType::F32)?;
        let mut rk = self.scratch(tokens * d.hv, DType::F32)?;
        let mut w16 = self.scratch(tokens * d.hv * d.k, dtype)?;
        let mut u16 = self.scratch(tokens * d.hv * d.v, dtype)?;
        let mut aqk = self.scratch(tokens * d.hv * GPU_CHUNK, dtype)?;
        let pr = &mut self.params;
        pr.rq = addr_mut(&mut rq);
        pr.rk = addr_mut(&mut rk);
        pr.w16 = addr_mut(&mut w16);
        pr.u16 = addr_mut(&mut u16);
        pr.aqk = addr_mut(&mut aqk);
        let mut bufs = vec![rq, rk, w16, u16, aqk];
        if channel {
            // Written by chunk_kda_tc_intra for every token and channel.
            let mut qg16 = self.scratch(tokens * d.hv * d.k, dtype)?;
            let mut kt16 = self.scratch(tokens * d.hv * d.k, dtype)?;
            self.params.qg16 = addr_mut(&mut qg16);
            self.params.kt16 = addr_mut(&mut kt16);
            bufs.extend([qg16, kt16]);
        }
        if save {
            let mut tm = self.scratch(tokens * d.hv * GPU_CHUNK, dtype)?;
            let mut hs = self.scratch(nc * d.hv * d.k * d.v, dtype)?;
            let mut vn = self.scratch(tokens * d.hv * d.v, dtype)?;
            let pr = &mut self.params;
            pr.tm = addr_mut(&mut tm);
            pr.hs = addr_mut(&mut hs);
            pr.vn = addr_mut(&mut vn);
            bufs.extend([tm, hs, vn]);
        }
        // SAFETY: see `chunk_forward`.
        if nc > 0 {
            let grid = (nc as u32, d.hv as u32, 1);
            let cfg = LaunchConfig {
                grid_dim: grid,
                block_dim: (tc_intra_threads(channel), 1, 1),
                shared_mem_bytes: intra_smem,
            };
            launch_chunk(&self.dev, &intra, cfg, &self.params)?;
        }
        if tiles > 0 {
            let smem = tc_fwd_smem(d.k, bv);
            let cfg =
                LaunchConfig { grid_dim: (tiles, 1, 1), block_dim: (tc_fwd_threads(bv), 1, 1), shared_mem_bytes: smem };
            launch_chunk(&self.dev, &fwd, cfg, &self.params)?;
        }
        Ok(bufs)
    }
}

/// The kernel-name suffix of a 16-bit dtype.
fn dtype_name(dt: DType) -> &'static str {
    if dt == DType::BF16 {
        "bf16"
    } else {
        "f16"
    }
}

/// The chunk forward of Gated DeltaNet, DeltaNet and KDA on the GPU; see
/// [`crate::chunk::forward_cuda`].
///
/// bf16 / f16 inputs with K = 64 or 128 and V a multiple of 16 take the tensor-core path
/// (`chunk_gdn_tc.cu`; a saving forward only where the backward does, see
/// `backward_tensor_cores`); everything else (f32 inputs, other head dims up to K = 128) the f32
/// path (`chunk_gdn.cu`).
pub(crate) fn chunk_forward(
    family: Family,
    x: &Inputs<'_, CudaTensor>,
    opts: &Options,
    save: bool,
) -> Result<(CudaTensor, Option<CudaTensor>, Option<ChunkSaved>)> {
    let op = if save { "chunk::forward_cuda_saving" } else { "chunk::forward_cuda" };
    let mut call = chunk_call(op, family, x, opts)?;
    let d = call.p.dims;
    let dev = call.dev.clone();
    let dtype = x.q.dtype();
    // A saving forward takes the path its backward will take.
    let tensor_cores = if save {
        backward_tensor_cores(dtype, &d)
    } else {
        matches!(dtype, DType::BF16 | DType::F16) && matches!(d.k, 64 | 128) && d.v % 16 == 0
    };
    // SAFETY (`uninit`): `o` and `ht` are written whole by the last kernel (every token belongs
    // to one chunk, every (sequence, head, column block) has a CTA).
    let mut o = unsafe { CudaTensor::uninit(&[d.b, d.t, d.hv, d.v], dtype, &dev)? };
    let mut ht = if opts.output_final_state {
        Some(unsafe { CudaTensor::uninit(&[d.n, d.hv, d.k, d.v], DType::F32, &dev)? })
    } else {
        None
    };
    call.params.o = addr_mut(&mut o);
    call.params.ht = ht.as_mut().map_or(0, addr_mut);
    // SAFETY (every launch, through `launch_chunk`): Problem::new checked every shape, so
    // each address covers what the kernels index: q, k [tokens,H,K]; v, o [tokens,HV,V]; g (null
    // for delta_rule: no decay) [tokens,HV] or, for KDA, [tokens,HV,K]; beta [tokens,HV]; A_log
    // [HV], dt_bias [HV] or [HV·K] (read only with use_gate, which Problem requires them for);
    // initial_state and ht [N,HV,K,V] f32 (h0 checked f32 in `chunk_call`); the scratch buffers
    // are allocated with the sizes the kernels index (f32 path: qn, kn [tokens,H,K]; gf, gc
    // [tokens,HV(,K)]; bf [tokens,HV]; w [tokens,HV,K]; u, vn [tokens,HV,V]; tm [tokens,HV,64];
    // hs [nc,HV,K,V]; tensor-core path: gc, rq, rk [tokens,HV] f32; w16 [tokens,HV,K], u16
    // [tokens,HV,V], aqk [tokens,HV,64] in q's 16-bit dtype, which the kernel's name matches).
    // The tensor-core kernels take K = 64 or 128 (their template), V a multiple of 16 and of the
    // block `bv` (checked above), and load 16-byte pieces, aligned since K, V, 64 are multiples
    // of 8 elements and cudarc buffers start 256-byte aligned. The chunk table (with cu_seqlens)
    // lists chunks of 1..=64 tokens inside [0, tokens) and `seq_chunk` has N+1 entries; without
    // it the kernels split N = B sequences of T tokens the same way (tokens = B·T, nc =
    // B·⌈T/64⌉ chunks, as `chunk_table` counts them for the grid); every index fits i32
    // (checked in `chunk_call`), K ≤ 128 (checked). The dynamic shared memory matches each
    // kernel's *_SMEM macro and the attribute allowing it was set. Each output element (o, ht,
    // scratch) is written by exactly one thread. All buffers outlive the launches in stream
    // order (frees are stream-ordered on this stream).
    let bufs = if tensor_cores { call.tc_forward(op, save)? } else { call.f32_forward(op, save)? };
    if !save {
        drop((bufs, call));
        return Ok((o, ht, None));
    }
    let inputs = input_addrs(x);
    Ok((o, ht, Some(ChunkSaved { call, bufs, family, tensor_cores, inputs })))
}

/// Whether the chunk backward runs on tensor cores for these inputs: 16-bit Gated DeltaNet,
/// DeltaNet or KDA with K and V of 64 or 128 (`chunk_bwd_tc.cu`; every family `chunk_call`
/// accepts has a form there).
fn backward_tensor_cores(dtype: DType, d: &crate::Dims) -> bool {
    matches!(dtype, DType::BF16 | DType::F16) && matches!(d.k, 64 | 128) && matches!(d.v, 64 | 128)
}

/// Device addresses of a call's tensors (q, k, v, g, beta, A_log, dt_bias, initial state), which
/// tie a [`ChunkSaved`] to the inputs it was made from.
fn input_addrs(x: &Inputs<'_, CudaTensor>) -> [u64; 8] {
    [
        addr(x.q),
        addr(x.k),
        addr(x.v),
        opt_addr(x.g),
        opt_addr(x.beta),
        opt_addr(x.a_log),
        opt_addr(x.dt_bias),
        opt_addr(x.initial_state),
    ]
}

/// What a training forward ([`crate::chunk::forward_cuda_saving`]) keeps on the device for
/// [`crate::chunk::backward_cuda`]: the chunk-local products (T, W, P, the cumulative gate and
/// norms), the state entering each chunk and the new values, so the backward does not recompute
/// the forward. It holds device memory (at B = 8, T = 2048, H = 16, K = V = 128 in bf16 about
/// 0.3 GB) until dropped, and belongs to the inputs it was made from.
pub struct ChunkSaved {
    call: ChunkCall,
    bufs: Vec<CudaTensor>,
    family: Family,
    tensor_cores: bool,
    inputs: [u64; 8],
}

impl std::fmt::Debug for ChunkSaved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkSaved")
            .field("family", &self.family)
            .field("dims", &self.call.p.dims)
            .field("tensor_cores", &self.tensor_cores)
            .field("buffers", &self.bufs.len())
            .finish()
    }
}

impl ChunkSaved {
    /// Checks that this context was saved by a forward of `family` over the same tensors, the same
    /// sequences and the same options as the backward's `call`.
    fn check(&self, op: &'static str, family: Family, x: &Inputs<'_, CudaTensor>, call: &ChunkCall) -> Result<()> {
        let (a, b) = (&call.params, &self.call.params);
        let same_opts =
            a.scale == b.scale && a.l2norm == b.l2norm && a.beta_sigmoid == b.beta_sigmoid && a.use_gate == b.use_gate;
        let why = if self.family != family {
            Some(format!("saved by a {} forward, not {family}", self.family))
        } else if self.inputs != input_addrs(x) || self.call.p.dims != call.p.dims || self.call.p.seqs != call.p.seqs {
            Some("saved by a forward over other tensors or sequences".to_string())
        } else if !same_opts {
            Some("saved by a forward with other options".to_string())
        } else {
            None
        };
        match why {
            Some(msg) => Err(Error::Argument { op, arg: "saved", msg }),
            None => Ok(()),
        }
    }
}

/// Mirror of `ChunkBwdParams` in `cuda/chunk_bwd.cu` (same order, `repr(C)`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct ChunkBwdParams {
    f: ChunkParams,
    d_o: u64,
    dht: u64,
    dq: u64,
    dk: u64,
    dv: u64,
    dg: u64,
    dbeta: u64,
    dh0: u64,
    da_log: u64,
    ddt_bias: u64,
    dhs: u64,
    du: u64,
    dp: u64,
    da: u64,
    dqa: u64,
    dka: u64,
    dkb: u64,
    dgl: u64,
    dbh: u64,
    dgh: u64,
    gate_acc: u64,
    qk_done: i32,
    _pad: i32,
}

// SAFETY: plain old data with the C layout the kernels read (a ChunkParams, u64 addresses, an
// i32 and its padding to 8 bytes).
unsafe impl DeviceRepr for ChunkBwdParams {}

/// Dynamic shared memory of `chunk_bwd_dh` (`FLA_DH_SMEM`).
const BWD_DH_SMEM: u32 = ((128 * 64 + 2 * 64 * 129 + 2 * 64 * 64 + 64 * 64 + 64 * 128) * 4) as u32;
/// Dynamic shared memory of `chunk_bwd_dqk` (`FLA_DQK_SMEM`).
const BWD_DQK_SMEM: u32 = ((3 * 64 * 65 + 3 * 64 * 129 + 4 * 64 * 33 + 2 * 128 * 33 + 2 * 64 + 128) * 4) as u32;
/// Dynamic shared memory of `chunk_bwd_gate` (`FLA_GATE_SMEM`).
const BWD_GATE_SMEM: u32 = ((3 * 64 * 129 + 64 * 128 + 2 * 64 * 65 + 3 * 64 + 128) * 4) as u32;

/// Dynamic shared memory of `chunk_bwd_tc_dqk_*` (`TC_DQK_SMEM` in chunk_bwd_tc.cu): the Q^, K^
/// tiles, four [C][V+8] and two [K][V+8] tiles, four [C][C+8] (16-bit), nine [C] vectors and a
/// sum (f32).
fn tc_dqk_smem(k: usize, v: usize) -> u32 {
    ((2 * 64 * (k + 8) + 4 * 64 * (v + 8) + 2 * k * (v + 8) + 4 * 64 * 72) * 2 + (9 * 64 + 4) * 4) as u32
}

/// Dynamic shared memory of `chunk_kda_bwd_tc_dqk_*` (`KDA_DQK_SMEM` in chunk_bwd_tc.cu): the Q^,
/// K^ tiles, three [C][V+8] (dY over dU) and two [K][V+8] tiles, three [C][C+8] (16-bit), G
/// ([C][K+4]), seven [C] vectors and dG_L [K] (f32): 215 KB at K = V = 128.
fn kda_dqk_smem(k: usize, v: usize) -> u32 {
    ((2 * 64 * (k + 8) + 3 * 64 * (v + 8) + 2 * k * (v + 8) + 3 * 64 * 72) * 2 + (64 * (k + 4) + 7 * 64 + k) * 4) as u32
}

/// Threads of `chunk_bwd_tc_dqk_*` and `chunk_kda_bwd_tc_dqk_*` (`TC_BWD_DQK`, `KDA_BWD_DQK`): four warps per 32 key columns (16 warps at
/// K = 128, 8 at K = 64).
fn tc_dqk_threads(k: usize) -> u32 {
    (128 * k / 32) as u32
}

/// The chunk backward on the GPU; see [`crate::chunk::backward_cuda`].
pub(crate) fn chunk_backward(
    family: Family,
    x: &Inputs<'_, CudaTensor>,
    opts: &Options,
    d_o: &CudaTensor,
    dht: Option<&CudaTensor>,
    saved: Option<&ChunkSaved>,
) -> Result<crate::Grads<CudaTensor>> {
    const OP: &str = "chunk::backward_cuda";
    let mut fresh = chunk_call(OP, family, x, opts)?;
    let d = fresh.p.dims;
    let dev = fresh.dev.clone();
    let dtype = x.q.dtype();
    let same_device = |arg: &'static str, t: &CudaTensor| -> Result<()> {
        if t.device() != x.q.device() {
            return Err(Error::Device {
                op: OP,
                arg,
                expected: format!("{} (the device of q)", x.q.device()),
                got: t.device().to_string(),
            });
        }
        Ok(())
    };
    same_device("do", d_o)?;
    if d_o.dtype() != dtype {
        return Err(Error::DType {
            op: OP,
            arg: "do",
            expected: format!("{dtype} (the dtype of q)"),
            got: d_o.dtype(),
        });
    }
    if d_o.shape() != [d.b, d.t, d.hv, d.v] {
        let want = format!("o's shape [{}, {}, {}, {}]", d.b, d.t, d.hv, d.v);
        return Err(Error::shape(OP, "do", want, d_o.shape()));
    }
    if let Some(dht) = dht {
        same_device("dht", dht)?;
        if dht.dtype() != DType::F32 {
            return Err(Error::DType { op: OP, arg: "dht", expected: "f32".into(), got: dht.dtype() });
        }
        if dht.shape() != [d.n, d.hv, d.k, d.v] {
            let want = format!("[N,HV,K,V] = [{}, {}, {}, {}]", d.n, d.hv, d.k, d.v);
            return Err(Error::shape(OP, "dht", want, dht.shape()));
        }
    }
    to_i32(OP, "chunks·HV·K·V", fresh.nc * d.hv * d.k * d.v)?;
    // The forward's saved products: from `saved`, or recomputed now.
    let (call, tensor_cores, recomputed) = match saved {
        Some(s) => {
            s.check(OP, family, x, &fresh)?;
            (&s.call, s.tensor_cores, Vec::new())
        }
        None => {
            let tc = backward_tensor_cores(dtype, &d);
            let bufs = if tc { fresh.tc_forward(OP, true)? } else { fresh.f32_forward(OP, true)? };
            (&fresh, tc, bufs)
        }
    };
    let (tokens, nc) = (call.tokens, call.nc);
    let image = cubin("chunk_bwd")?;
    let f_post = dev.function("chunk_bwd", image, "chunk_bwd_post")?;
    // SAFETY (`uninit` outputs): chunk_bwd_post writes dq, dk (or chunk_bwd_tc_dqk, with
    // `qk_done`), dbeta and dg for every token;
    // chunk_bwd_dqk writes dv for every token and column; chunk_bwd_dh writes dh0 for every
    // (sequence, head, column); chunk_bwd_gate_params writes dA_log and ddt_bias whole.
    let out = |shape: &[usize], dt: DType| unsafe { CudaTensor::uninit(shape, dt, &dev) };
    let mut dq = out(&[d.b, d.t, d.h, d.k], dtype)?;
    let mut dk = out(&[d.b, d.t, d.h, d.k], dtype)?;
    let mut dv = out(&[d.b, d.t, d.hv, d.v], dtype)?;
    let mut dbeta = out(&[d.b, d.t, d.hv], dtype)?;
    let mut dg = x.g.map(|g| out(g.shape(), dtype)).transpose()?;
    let mut dh0 = x.initial_state.map(|_| out(&[d.n, d.hv, d.k, d.v], DType::F32)).transpose()?;
    let gate = opts.use_gate_in_kernel.then_some((x.a_log, x.dt_bias));
    let (mut da_log, mut ddt_bias) = match gate {
        Some((Some(a), Some(b))) => (Some(out(a.shape(), a.dtype())?), Some(out(b.shape(), b.dtype())?)),
        _ => (None, None),
    };
    // Scratch, each written before it is read: dhs by the dh sweep for every chunk and column,
    // du for every token and column; dqa, dka, dbh by chunk_bwd_dqk (or chunk_bwd_gate) for
    // every token; dgh by chunk_bwd_tc_dqk or chunk_bwd_gate for every token; dp, da, dkb, dgl
    // (f32 path only) by chunk_bwd_dqk for every token (chunk); gate_acc zeroed.
    let saved_dt = if tensor_cores { dtype } else { DType::F32 };
    let mut dhs = call.scratch(nc * d.hv * d.k * d.v, saved_dt)?;
    let mut du = call.scratch(tokens * d.hv * d.v, saved_dt)?;
    // Ungrouped heads on tensor cores: chunk_bwd_tc_dqk writes dq, dk itself.
    let qk_done = tensor_cores && d.hv == d.h;
    let per_value_head = if qk_done { 0 } else { tokens * d.hv * d.k };
    let mut dqa = call.scratch(per_value_head, DType::F32)?;
    let mut dka = call.scratch(per_value_head, DType::F32)?;
    let mut dbh = call.scratch(tokens * d.hv, DType::F32)?;
    let mut dgh = call.scratch(tokens * d.hv * call.kg, DType::F32)?;
    let mut gate_acc = CudaTensor::zeros(&[d.hv + d.hv * d.k], DType::F32, &dev)?;
    let f32_only = |n: usize| call.scratch(if tensor_cores { 0 } else { n }, DType::F32);
    let mut dp = f32_only(tokens * d.hv * GPU_CHUNK)?;
    let mut da = f32_only(tokens * d.hv * GPU_CHUNK)?;
    let mut dkb = f32_only(tokens * d.hv * d.k)?;
    let mut dgl = f32_only(nc * d.hv * d.k)?;
    // The forward's outputs are not the backward's (a saved context still names them).
    let bp = ChunkBwdParams {
        f: ChunkParams { o: 0, ht: 0, ..call.params },
        d_o: addr(d_o),
        dht: opt_addr(dht),
        dq: addr_mut(&mut dq),
        dk: addr_mut(&mut dk),
        dv: addr_mut(&mut dv),
        dg: dg.as_mut().map_or(0, addr_mut),
        dbeta: addr_mut(&mut dbeta),
        dh0: dh0.as_mut().map_or(0, addr_mut),
        da_log: da_log.as_mut().map_or(0, addr_mut),
        ddt_bias: ddt_bias.as_mut().map_or(0, addr_mut),
        dhs: addr_mut(&mut dhs),
        du: addr_mut(&mut du),
        dp: addr_mut(&mut dp),
        da: addr_mut(&mut da),
        dqa: addr_mut(&mut dqa),
        dka: addr_mut(&mut dka),
        dkb: addr_mut(&mut dkb),
        dgl: addr_mut(&mut dgl),
        dbh: addr_mut(&mut dbh),
        dgh: addr_mut(&mut dgh),
        gate_acc: addr_mut(&mut gate_acc),
        qk_done: qk_done as i32,
        _pad: 0,
    };
    let launch = |f: &CudaFunction, grid: (u32, u32, u32), threads: u32, smem: u32| -> Result<()> {
        let mut l = dev.stream().launch_builder(f);
        l.arg(&bp);
        let cfg = LaunchConfig { grid_dim: grid, block_dim: (threads, 1, 1), shared_mem_bytes: smem };
        // SAFETY: every chunk_bwd kernel's signature is `(ChunkBwdParams)` by value, mirrored
        // above. `bp.f` is the forward's parameters (see `chunk_forward` for what makes them
        // sound), with the forward's scratch from `f32_forward` / `tc_forward`, alive in
        // `recomputed` or in `saved` (checked to belong to these inputs). The backward's buffers are allocated above with the shapes the kernels index:
        // do, dv [tokens,HV,V]; dht, dh0 [N,HV,K,V] f32 (dht checked); dhs [nc,HV,K,V] and du
        // [tokens,HV,V] (16-bit on the tensor-core path, whose kernels take K, V of 64 or 128 by
        // their names, and the value block `bv` dividing V, as the forward's sweep; KDA's forms
        // also read the forward's gc [tokens,HV,K] f32 and qg16, kt16 [tokens,HV,K]); dq, dk
        // [tokens,H,K]; dg in g's shape; dbeta, dbh [tokens,HV]; dA_log, ddt_bias in the shapes
        // and dtypes of A_log, dt_bias (present with use_gate: Problem checked);
        // dp, da [tokens,HV,64]; dqa, dka, dkb [tokens,HV,K]; dgl [nc,HV,K]; dgh [tokens,HV,KG];
        // gate_acc [HV + HV·K]. Indices fit i32 where the kernels use 32 bits (checked). The
        // dynamic shared memory matches each kernel's macro and the attribute was set. Each
        // element is written by one thread, except the f32 atomics into gate_acc.
        unsafe { l.launch(cfg) }?;
        Ok(())
    };
    if tensor_cores {
        let name = dtype_name(dtype);
        let image = cubin("chunk_bwd_tc")?;
        let bv = tc_block_v(d.v, dev.sm_count(), |bv| d.n * d.hv * d.v / bv);
        let tiles = call.tiles(OP, bv)?;
        // KDA: the per-channel forms of both kernels (the sweep's tiling is the same).
        let (fam, dqk_smem) = if call.kg > 1 { ("kda_", kda_dqk_smem(d.k, d.v)) } else { ("", tc_dqk_smem(d.k, d.v)) };
        let f_dh = dev.function("chunk_bwd_tc", image, &format!("chunk_{fam}bwd_tc_dh_{name}_k{}_v{bv}", d.k))?;
        let f_dqk = dev.function("chunk_bwd_tc", image, &format!("chunk_{fam}bwd_tc_dqk_{name}_k{}_v{}", d.k, d.v))?;
        f_dh.set_attribute(MAX_DYN_SMEM, tc_fwd_smem(d.k, bv) as i32)?;
        f_dqk.set_attribute(MAX_DYN_SMEM, dqk_smem as i32)?;
        if tiles > 0 {
            launch(&f_dh, (tiles, 1, 1), tc_fwd_threads(bv), tc_fwd_smem(d.k, bv))?;
        }
        if nc > 0 {
            launch(&f_dqk, (nc as u32, d.hv as u32, 1), tc_dqk_threads(d.k), dqk_smem)?;
        }
    } else {
        let tiles = call.tiles(OP, GPU_CHUNK_BV)?;
        let f_dh = dev.function("chunk_bwd", image, "chunk_bwd_dh")?;
        let f_dqk = dev.function("chunk_bwd", image, "chunk_bwd_dqk")?;
        let f_gate = dev.function("chunk_bwd", image, "chunk_bwd_gate")?;
        f_dh.set_attribute(MAX_DYN_SMEM, BWD_DH_SMEM as i32)?;
        f_dqk.set_attribute(MAX_DYN_SMEM, BWD_DQK_SMEM as i32)?;
        f_gate.set_attribute(MAX_DYN_SMEM, BWD_GATE_SMEM as i32)?;
        if tiles > 0 {
            launch(&f_dh, (tiles, 1, 1), 256, BWD_DH_SMEM)?;
        }
        if nc > 0 {
            launch(&f_dqk, (nc as u32, d.hv as u32, 1), 256, BWD_DQK_SMEM)?;
            launch(&f_gate, (nc as u32, d.hv as u32, 1), 256, BWD_GATE_SMEM)?;
        }
    }
    if tokens > 0 {
        launch(&f_post, (tokens as u32, 1, 1), 128, 0)?;
    }
    if da_log.is_some() {
        let f = dev.function("chunk_bwd", image, "chunk_bwd_gate_params")?;
        launch(&f, (1, 1, 1), 128, 0)?;
    }
    drop((recomputed, dhs, du, dp, da, dqa, dka, dkb, dgl, dbh, dgh, gate_acc, fresh));
    Ok(crate::Grads { dq, dk, dv, dg, dbeta: Some(dbeta), db: None, dw: None, dh0, da_log, ddt_bias })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_match_the_kernel_struct() {
        // 13 pointers, 16 ints and a float, padded to 8 bytes: what `RecurrentParams` in
        // recurrent.cu occupies on the device.
        assert_eq!(std::mem::size_of::<RecurrentParams>(), 176);
        assert_eq!(std::mem::align_of::<RecurrentParams>(), 8);
        // 30 pointers, 17 ints and a float: `ChunkParams` in common/chunk.cuh; then 21
        // pointers and an int (padded) of `ChunkBwdParams` in common/chunk_bwd.cuh.
        assert_eq!(std::mem::size_of::<ChunkParams>(), 312);
        assert_eq!(std::mem::size_of::<ChunkBwdParams>(), 312 + 21 * 8 + 8);
    }

    #[test]
    fn chunk_table_splits_sequences() {
        let (s, l, q) = chunk_table("t", &[0..1, 1..65, 65..65, 65..200]).unwrap();
        assert_eq!(s, vec![0, 1, 65, 129, 193]);
        assert_eq!(l, vec![1, 64, 64, 64, 7]);
        assert_eq!(q, vec![0, 1, 2, 2, 5]);
    }

    #[test]
    fn shared_memory_fits_an_sm90_cta() {
        // The largest dynamic shared memory a Hopper CTA can opt into (227 KB); a launch above it
        // fails at run time, so check every size the launchers ask for here, without a GPU.
        const MAX: u32 = 232_448;
        for k in [64, 128] {
            assert!(tc_intra_smem(k) <= MAX && kda_intra_smem(k) <= MAX, "intra, K = {k}");
            // KDA's e^g ([C][K] f32) lives where A and T go.
            assert!(64 * k * 4 <= 2 * 64 * 65 * 4);
            for bv in [16, 32, 64] {
                assert!(tc_fwd_smem(k, bv) <= MAX, "sweep, K = {k}, BV = {bv}");
            }
            for v in [64, 128] {
                assert!(tc_dqk_smem(k, v) <= MAX, "dq/dk, K = {k}, V = {v}");
                assert!(kda_dqk_smem(k, v) <= MAX, "KDA dq/dk, K = {k}, V = {v}");
            }
        }
        for smem in [INTRA_SMEM, FWD_SMEM, BWD_DH_SMEM, BWD_DQK_SMEM, BWD_GATE_SMEM] {
            assert!(smem <= MAX, "{smem}");
        }
        // KDA's intra kernel keeps two CTAs per SM (228 KB of shared memory, 1 KB reserved per
        // CTA) at K = 128.
        assert!(2 * (kda_intra_smem(128) + 1024) <= 233_472);
        assert_eq!(kda_intra_smem(128), 106_752);
        assert_eq!(tc_dqk_threads(128), 512);
        assert_eq!(tc_dqk_threads(64), 256);
    }

    #[test]
    fn tiling_by_shape() {
        assert_eq!(tiling(64, 64).bv, 32);
        assert_eq!(tiling(256, 128).bv, 32);
        assert_eq!(tiling(128, 50).bv, 32);
        let t = tiling(128, 128);
        assert!(VARIANTS.iter().any(|(_, v)| v.suffix == t.suffix), "{t:?}");
    }
}
