//! The fused recurrent step used for decoding: `T ≥ 1` new tokens for each of `N` sequences,
//! updating their f32 states in place (FLA: `fused_recurrent_gated_delta_rule`,
//! `fused_recurrent_kda`, ...).
//!
//! Each token walks the state of one (sequence, value head) twice, row by row: the first pass
//! decays it and accumulates the erase `e = Sᵀ(b⊙k)`, the second writes `k uᵀ` and accumulates
//! `o = Sᵀq`. A 128×128 f32 state (64 KiB) stays in L2 between the passes, so memory sees it read
//! once and written once per call. [`step_cuda`] runs the same step on a CUDA device, with an
//! optional pool of states indexed per sequence.
use fla_core::cuda::CudaTensor;
use fla_core::{DType, Error, Result, Tensor};
use rayon::prelude::*;

use crate::prepare::{HeadData, HeadOut, Prepared};
use crate::{Family, Inputs, Options, Problem};

/// Runs the recurrence over the new tokens of `x`, reading and updating `state [N,HV,K,V]` (f32)
/// in place, and returns `o [B,T,HV,V]` in the dtype of `q`. The state takes the place of
/// `initial_state`, which must be `None`; `output_final_state` is implied.
pub fn step(family: Family, x: &Inputs<'_>, opts: &Options, state: &mut Tensor) -> Result<Tensor> {
    const OP: &str = "recurrent::step";
    if x.initial_state.is_some() {
        return Err(Error::Unsupported { op: OP, msg: "pass the state as `state`, not `initial_state`".into() });
    }
    let p = Problem::new(OP, family, x, opts)?;
    let d = p.dims;
    if state.shape() != [d.n, d.hv, d.k, d.v] {
        return Err(Error::shape(
            OP,
            "state",
            format!("[N,HV,K,V] = [{}, {}, {}, {}]", d.n, d.hv, d.k, d.v),
            state.shape(),
        ));
    }
    if state.dtype() != DType::F32 {
        return Err(Error::DType { op: OP, arg: "state", expected: "f32".into(), got: state.dtype() });
    }
    let prep = Prepared::<f32>::new(p, x, opts)?;
    let kv = d.k * d.v;
    let s = state.as_mut_slice::<f32>()?;
    let heads: Vec<HeadOut<f32>> = s
        .par_chunks_mut(kv.max(1))
        .enumerate()
        .map(|(i, s)| HeadOut { o: head_step(&prep.head(i / d.hv, i % d.hv), s), ht: Vec::new() })
        .collect();
    Ok(prep.output(heads, false)?.o)
}

/// The same step on a CUDA device, with an optional state pool (continuous batching).
///
/// `x` holds [`CudaTensor`]s on one device (inputs f32, bf16 or f16; `A_log` / `dt_bias` in any of
/// them); `state` is f32 `[N,HV,K,V]`, or with `state_indices` a pool `[P,HV,K,V]` of which
/// sequence `n` reads and updates row `state_indices[n]` (distinct rows, each `< P`). Returns
/// `o [B,T,HV,V]` in the dtype of `q`. The work is queued on the device's stream: the call
/// returns before the GPU has finished (reading `o` or the state back waits for it).
///
/// Every family is served by one kernel (`fla-kernels/cuda/recurrent.cu`): K ≤ 256, any V.
/// Errors: everything [`step`] checks, plus the device of every tensor, the pool indices, and
/// [`Error::NoCudaKernel`] in a build made without `nvcc`.
///
/// FLA: `fused_recurrent_gated_delta_rule(..., ssm_state_indices=...)`, `fused_recurrent_kda`.
pub fn step_cuda(
    family: Family,
    x: &Inputs<'_, CudaTensor>,
    opts: &Options,
    state: &mut CudaTensor,
    state_indices: Option<&[usize]>,
) -> Result<CudaTensor> {
    crate::cuda::recurrent_step(family, x, opts, state, state_indices)
}

/// Per-token vectors shared by every column block: decay `exp(g)`, `b⊙k` and `scale·q`, each `[K]`.
struct TokenVecs {
    decay: Vec<f32>,
    bk: Vec<f32>,
    q: Vec<f32>,
}

fn token_vecs(x: &HeadData<f32>) -> TokenVecs {
    let (dk, n) = (x.dk, x.len * x.dk);
    let mut t = TokenVecs { decay: vec![0.0; n], bk: vec![0.0; n], q: vec![0.0; n] };
    for i in 0..n {
        let g = if x.channel { x.g[i] } else { x.g[i / dk] };
        t.decay[i] = g.exp();
        t.bk[i] = x.b.as_ref().map_or(0.0, |b| b[i] * x.k[i]);
        t.q[i] = x.scale * x.q[i];
    }
    t
}

/// Every token of one (sequence, value head) against its state `s [K,V]`; returns `o [len,V]`.
fn head_step(x: &HeadData<f32>, s: &mut [f32]) -> Vec<f32> {
    let (dk, dv) = (x.dk, x.dv);
    let tv = token_vecs(x);
    let mut o = vec![0.0f32; x.len * dv];
    let mut e = vec![0.0f32; dv];
    for t in 0..x.len {
        let (decay, bk) = (&tv.decay[t * dk..][..dk], &tv.bk[t * dk..][..dk]);
        let (k, q) = (&x.k[t * dk..][..dk], &tv.q[t * dk..][..dk]);
        e.iter_mut().for_each(|v| *v = 0.0);
        for (row, (&d, &b)) in s.chunks_exact_mut(dv).zip(decay.iter().zip(bk)) {
            for (r, e) in row.iter_mut().zip(e.iter_mut()) {
                *r *= d;
                *e += b * *r;
            }
        }
        let r = t * dv..(t + 1) * dv;
        for ((u, &w), &v) in e.iter_mut().zip(&x.w[r.clone()]).zip(&x.v[r.clone()]) {
            *u = w * v - *u;
        }
        let ot = &mut o[r];
        for (row, (&kc, &qc)) in s.chunks_exact_mut(dv).zip(k.iter().zip(q)) {
            for ((r, &u), o) in row.iter_mut().zip(e.iter()).zip(ot.iter_mut()) {
                *r += kc * u;
                *o += qc * *r;
            }
        }
    }
    o
}
