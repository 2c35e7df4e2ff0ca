//! The chunkwise-parallel (WY / UT transform) form, chunk size 64: forward and backward.
//!
//! Per chunk, with the state `S₀ [K,V]` entering it and the chunk-local quantities of
//! `intra.rs` (`A`, `T = (I + A)⁻¹`, `P`, `Kb`, `Qg`, `Kt`, `X`):
//!
//! ```text
//! U   = T (X − Kb S₀)                  new values (the erase already applied)
//! O   = Qg S₀ + P U                    outputs of the chunk
//! S_L = diag(exp(G_L)) S₀ + Ktᵀ U      state leaving the chunk
//! ```
//!
//! The backward recomputes the per-chunk states with one forward sweep, then walks the chunks in
//! reverse carrying `dS`; see `backward.rs` for its equations. FLA: `chunk_gated_delta_rule`,
//! `chunk_kda`, `chunk_gla`, ... (`fla/ops/common/chunk_delta_h.py`, `chunk_o.py`).
use fla_core::cpu::{gemm, MatMut, MatRef};
use fla_core::{Element, Float, Result, Tensor};

use crate::prepare::{HeadData, HeadOut, Prepared};
use crate::{Family, Grads, Inputs, Options, Output, Problem};

mod backward;
pub(crate) mod intra;

pub use crate::cuda::ChunkSaved;

use intra::Intra;
pub use intra::CHUNK;

/// Chunk forward for `family`: outputs and, when requested, final states.
pub fn forward(family: Family, x: &Inputs<'_>, opts: &Options) -> Result<Output> {
    let p = Problem::new("chunk::forward", family, x, opts)?;
    if p.f64 {
        run_forward::<f64>(p, x, opts)
    } else {
        run_forward::<f32>(p, x, opts)
    }
}

fn run_forward<F: Float + Element>(p: Problem, x: &Inputs<'_>, opts: &Options) -> Result<Output> {
    let prep = Prepared::<F>::new(p, x, opts)?;
    let heads = prep.map_heads(|_, h| head_forward(&h));
    prep.output(heads, opts.output_final_state)
}

/// The chunk forward on a CUDA device: `(o [B,T,HV,V] in the dtype of q, final state
/// [N,HV,K,V] f32 when `output_final_state`)`.
///
/// Gated DeltaNet, DeltaNet and KDA so far (other families: [`fla_core::Error::Unsupported`]
/// naming the family). Inputs f32, bf16 or f16 on one device, `initial_state` f32; scale,
/// `cu_seqlens` (B = 1), grouped value heads, K ≤ 128, any V, and the in-op L2 norm, beta sigmoid
/// and gate. bf16 / f16 inputs with K = 64 or 128 and V a multiple of 16 run on tensor cores
/// (`fla-kernels/cuda/chunk_gdn_tc.cu`: every chunk's `W`, `U`, `P` at once — for KDA with the
/// per-channel decay split at sub-chunk boundaries — then one sweep per sequence, head and block
/// of value columns with the state in registers), rounding the matmul operands to 16 bits as FLA
/// does; the rest in f32 arithmetic (`chunk_gdn.cu`). The work is queued on the device's stream;
/// reading a result back waits for it.
pub fn forward_cuda(
    family: Family,
    x: &Inputs<'_, fla_core::cuda::CudaTensor>,
    opts: &Options,
) -> Result<(fla_core::cuda::CudaTensor, Option<fla_core::cuda::CudaTensor>)> {
    let (o, ht, _) = crate::cuda::chunk_forward(family, x, opts, false)?;
    Ok((o, ht))
}

/// [`forward_cuda`] for training: also returns what [`backward_cuda`] needs from the forward
/// (the chunk-local products, the state entering each chunk and the new values, on the device),
/// so the backward skips recomputing it, as FLA's autograd function keeps its forward's `A`. The
/// forward takes the path its backward will (see [`backward_cuda`]) and writes somewhat more
/// memory; the context holds device memory until dropped and belongs to these inputs.
pub fn forward_cuda_saving(
    family: Family,
    x: &Inputs<'_, fla_core::cuda::CudaTensor>,
    opts: &Options,
) -> Result<(fla_core::cuda::CudaTensor, Option<fla_core::cuda::CudaTensor>, ChunkSaved)> {
    let (o, ht, saved) = crate::cuda::chunk_forward(family, x, opts, true)?;
    let saved = saved.ok_or_else(|| fla_core::Error::Unsupported {
        op: "chunk::forward_cuda_saving",
        msg: "the forward kept no context".into(),
    })?;
    Ok((o, ht, saved))
}

/// The chunk backward on a CUDA device: the gradients [`backward`] returns, as `CudaTensor`s in
/// the dtypes of their inputs (`dh0` f32). `do` has `o`'s shape and dtype, `dht [N,HV,K,V]` is
/// f32 (or omitted: zero).
///
/// Gated DeltaNet, DeltaNet and KDA, with everything [`forward_cuda`] accepts. The forward is
/// recomputed first, keeping `T`, the state entering each chunk and the new values; a reverse
/// sweep then carries the state gradient per (sequence, head, block of value columns), every
/// chunk's gradients are computed at once, and a per-token pass sums grouped value heads and
/// chains the in-op options. bf16 / f16 inputs with K and V of 64 or 128 run on tensor cores
/// (`fla-kernels/cuda/chunk_bwd_tc.cu`, 16-bit operands as in FLA; for KDA with the per-channel
/// decay split at sub-chunk boundaries as in its forward); the rest in f32 arithmetic
/// (`chunk_bwd.cu`). The work is queued on the device's stream.
///
/// With `saved` from [`forward_cuda_saving`] over the same inputs and options, the forward is not
/// recomputed; a context from other inputs is an [`fla_core::Error::Argument`] naming `saved`.
pub fn backward_cuda(
    family: Family,
    x: &Inputs<'_, fla_core::cuda::CudaTensor>,
    opts: &Options,
    d_o: &fla_core::cuda::CudaTensor,
    dht: Option<&fla_core::cuda::CudaTensor>,
    saved: Option<&ChunkSaved>,
) -> Result<Grads<fla_core::cuda::CudaTensor>> {
    crate::cuda::chunk_backward(family, x, opts, d_o, dht, saved)
}

/// Chunk backward for `family`: gradients of `Σ o·do + Σ ht·dht` with respect to every input
/// given (`dht [N,HV,K,V]` may be omitted: zero). Recomputes the forward internally, so nothing
/// needs to be kept from [`forward`].
pub fn backward(family: Family, x: &Inputs<'_>, opts: &Options, d_o: &Tensor, dht: Option<&Tensor>) -> Result<Grads> {
    let p = Problem::new("chunk::backward", family, x, opts)?;
    let d = p.dims;
    if d_o.shape() != [d.b, d.t, d.hv, d.v] {
        return Err(fla_core::Error::shape(
            "chunk::backward",
            "do",
            format!("o's shape [{}, {}, {}, {}]", d.b, d.t, d.hv, d.v),
            d_o.shape(),
        ));
    }
    if let Some(dht) = dht {
        if dht.shape() != [d.n, d.hv, d.k, d.v] {
            return Err(fla_core::Error::shape(
                "chunk::backward",
                "dht",
                format!("[N,HV,K,V] = [{}, {}, {}, {}]", d.n, d.hv, d.k, d.v),
                dht.shape(),
            ));
        }
    }
    if p.f64 {
        backward::run::<f64>(p, x, opts, d_o, dht)
    } else {
        backward::run::<f32>(p, x, opts, d_o, dht)
    }
}

/// Forward over one head: outputs and final state.
pub(crate) fn head_forward<F: Float>(x: &HeadData<F>) -> HeadOut<F> {
    sweep(x, true, |_| {})
}

/// The state entering each chunk of one head, `[n_chunks, K, V]` (for the backward); skips the
/// outputs.
pub(crate) fn chunk_states<F: Float>(x: &HeadData<F>) -> Vec<F> {
    let mut states = Vec::with_capacity(x.len.div_ceil(CHUNK) * x.dk * x.dv);
    sweep(x, false, |s| states.extend_from_slice(s));
    states
}

/// Walks the chunks of one head in order, calling `on_state` with the state entering each chunk
/// and computing outputs when `outputs`.
fn sweep<F: Float>(x: &HeadData<F>, outputs: bool, mut on_state: impl FnMut(&[F])) -> HeadOut<F> {
    let (dk, dv) = (x.dk, x.dv);
    let mut s = x.initial_state();
    let mut o = vec![F::zero(); if outputs { x.len * dv } else { 0 }];
    let mut w = Intra::new(dk);
    let mut y = vec![F::zero(); CHUNK * dv];
    let mut u = vec![F::zero(); CHUNK * dv];
    for c0 in (0..x.len).step_by(CHUNK) {
        let l = CHUNK.min(x.len - c0);
        on_state(&s);
        w.compute(x, c0, l, outputs);
        new_values(x, &w, &s, &mut y, &mut u);
        let u = &u[..l * dv];
        if outputs {
            let sm = MatRef::new(&s, dk, dv, dv, 1);
            let oc = MatMut::new(&mut o[c0 * dv..], l, dv, dv, 1);
            gemm(F::one(), MatRef::new(&w.qg, l, dk, dk, 1), sm, F::zero(), oc);
            let oc = MatMut::new(&mut o[c0 * dv..], l, dv, dv, 1);
            gemm(F::one(), MatRef::new(&w.p, l, l, CHUNK, 1), MatRef::new(u, l, dv, dv, 1), F::one(), oc);
        }
        advance_state(&w, &mut s, u, dk, dv);
    }
    HeadOut { o, ht: s }
}

/// `Y = X − Kb S₀` with `X = w ⊙ V` into `y`, and `U = T Y` into `u` (`U = Y` without erase).
pub(crate) fn new_values<F: Float>(x: &HeadData<F>, w: &Intra<F>, s: &[F], y: &mut [F], u: &mut [F]) {
    let (l, dk, dv) = (w.l, x.dk, x.dv);
    let rows = w.c0 * dv..(w.c0 + l) * dv;
    for ((y, &a), &b) in y.iter_mut().zip(&x.w[rows.clone()]).zip(&x.v[rows]) {
        *y = a * b;
    }
    if x.b.is_none() {
        u[..l * dv].copy_from_slice(&y[..l * dv]);
        return;
    }
    let sm = MatRef::new(s, dk, dv, dv, 1);
    gemm(-F::one(), MatRef::new(&w.kb, l, dk, dk, 1), sm, F::one(), MatMut::new(y, l, dv, dv, 1));
    gemm(
        F::one(),
        MatRef::new(&w.t, l, l, CHUNK, 1),
        MatRef::new(y, l, dv, dv, 1),
        F::zero(),
        MatMut::new(u, l, dv, dv, 1),
    );
}

/// `S ← diag(exp(G_L)) S + Ktᵀ U`.
fn advance_state<F: Float>(w: &Intra<F>, s: &mut [F], u: &[F], dk: usize, dv: usize) {
    for c in 0..dk {
        let e = w.e_last[c];
        s[c * dv..][..dv].iter_mut().for_each(|v| *v *= e);
    }
    let l = w.l;
    gemm(
        F::one(),
        MatRef::new(&w.kt, l, dk, dk, 1).t(),
        MatRef::new(u, l, dv, dv, 1),
        F::one(),
        MatMut::new(s, dk, dv, dv, 1),
    );
}
