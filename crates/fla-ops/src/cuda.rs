//! Launches of the GPU kernels (`fla-kernels/cuda/`). Every launch of fla-ops lives here, after
//! its arguments have been checked, with a `// SAFETY:` note on what makes it sound.
//!
//! The kernels are generic over the family's knobs (decay, erase, write) and read their inputs
//! in f32, bf16 or f16 as told at run time; the state is always f32.
use std::collections::HashSet;

use fla_core::cuda::cudarc::driver::{DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};
use fla_core::cuda::{CudaDevice, CudaStorage, CudaTensor};
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

/// Raw device address of a tensor's buffer. Event tracking is off (one stream per device), so
/// the guard cudarc returns has nothing to record and is dropped at once.
fn addr(t: &CudaTensor) -> u64 {
    let s = t.cuda_device().stream();
    match t.storage() {
        CudaStorage::F32(b) => b.device_ptr(s).0,
        CudaStorage::BF16(b) => b.device_ptr(s).0,
        CudaStorage::F16(b) => b.device_ptr(s).0,
    }
}

fn addr_mut(t: &mut CudaTensor) -> u64 {
    let s = t.cuda_device().stream().clone();
    match t.storage_mut() {
        CudaStorage::F32(b) => b.device_ptr_mut(&s).0,
        CudaStorage::BF16(b) => b.device_ptr_mut(&s).0,
        CudaStorage::F16(b) => b.device_ptr_mut(&s).0,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_match_the_kernel_struct() {
        // 13 pointers, 16 ints and a float, padded to 8 bytes: what `RecurrentParams` in
        // recurrent.cu occupies on the device.
        assert_eq!(std::mem::size_of::<RecurrentParams>(), 176);
        assert_eq!(std::mem::align_of::<RecurrentParams>(), 8);
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
