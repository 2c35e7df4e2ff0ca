//! What the GPU linear-attention layers ([`crate::gated_deltanet::GatedDeltaNetCuda`],
//! [`crate::kda::KimiDeltaAttentionCuda`]) share: their cache and the
//! core from the fused q|k|v projection to the attention output — the short convolution with its
//! cache, writing q, k and v apart, then the recurrent step (a decode batch) or the chunk form
//! (anything else) on the cached states.
use fla_core::cuda::CudaTensor;
use fla_core::{DType, Error, Result};
use fla_ops::{chunk, recurrent, Family, Inputs, Options};

use crate::cuda::{parts, short_conv_batch_cuda};
use crate::Batch;

/// The cache of one GPU linear-attention layer for a batch of sequences, on its device.
#[derive(Debug, Default)]
pub struct LinearCacheCuda {
    /// Last conv inputs `[N, conv channels, kernel]` f32, once a forward has run.
    pub conv: Option<CudaTensor>,
    /// Recurrent state `[N, HV, K, V]` f32, once a forward has run.
    pub state: Option<CudaTensor>,
}

/// The op options of the Gated DeltaNet layer (CPU and GPU) and of the GPU core below: the final
/// state out, L2-normalised q and k, sigmoid of beta and the gate computed in the op, scale
/// `K^-1/2`.
pub(crate) fn layer_options() -> Options {
    Options {
        output_final_state: true,
        use_qk_l2norm_in_kernel: true,
        use_beta_sigmoid_in_kernel: true,
        use_gate_in_kernel: true,
        scale: None,
    }
}

/// The recurrence of one layer call: its family, head counts and dims, and the per-token gate
/// inputs besides q, k and v.
pub(crate) struct Recurrence<'a> {
    pub family: Family,
    /// Query / key heads and value heads.
    pub heads: [usize; 2],
    /// Key and value head dims.
    pub dims: [usize; 2],
    /// Gate inputs `[tokens, HV]` (a scalar decay per head) or `[tokens, HV·K]` (per channel),
    /// turned into the log decay in the op by `a_log` and `dt_bias`.
    pub g: CudaTensor,
    /// `[tokens, HV]`, through a sigmoid in the op.
    pub beta: CudaTensor,
    pub a_log: &'a CudaTensor,
    pub dt_bias: &'a CudaTensor,
}

/// Columns `start .. start + 2·H·K + HV·V` of `proj [tokens, cols]` (the q|k|v projections,
/// before the convolution; `conv [2·H·K + HV·V, kernel]`) → the attention output
/// `[tokens·HV, V]`, continuing each sequence from `cache`: `silu(conv(q|k|v))` with the cached
/// conv inputs, written as separate q, k and v, then the recurrence with in-op L2 norm of q and
/// k, sigmoid of beta and the gate, on the cached states.
pub(crate) fn conv_recurrence(
    op: &'static str,
    proj: &CudaTensor,
    start: usize,
    conv: &CudaTensor,
    r: Recurrence<'_>,
    batch: &Batch,
    cache: &mut LinearCacheCuda,
) -> Result<CudaTensor> {
    let ([hk, hv], [dk, dv]) = (r.heads, r.dims);
    let (n, tokens) = (batch.len(), batch.tokens());
    let held = cache.state.as_ref().map_or(0, |s| s.shape()[0]);
    if batch.past.iter().any(|&p| p > 0) && held != n {
        return Err(Error::size(op, format!("{n} sequences continue from a cache holding {held} states")));
    }
    let dev = proj.cuda_device().clone();
    // The conv cache is updated in place: a captured decode step keeps its address.
    let conv_state = match &mut cache.conv {
        Some(s) if s.shape()[0] == n && batch.past.iter().any(|&p| p > 0) => s,
        slot => slot.insert(CudaTensor::zeros(&[n, conv.shape()[0], conv.shape()[1]], DType::F32, &dev)?),
    };
    let cu = batch.cu_seqlens();
    let kt = hk * dk;
    let qkv = short_conv_batch_cuda(proj, start, conv, conv_state, batch, &[kt, kt, hv * dv])?;
    let decode = batch.is_decode() && held == n;
    let (bsz, t) = if decode { (n, 1) } else { (1, tokens) };
    let [q, k, v]: [CudaTensor; 3] = parts(op, qkv)?;
    let q = q.reshape(&[bsz, t, hk, dk])?;
    let k = k.reshape(&[bsz, t, hk, dk])?;
    let v = v.reshape(&[bsz, t, hv, dv])?;
    let g_shape: &[usize] = if r.g.elem_count() == tokens * hv { &[bsz, t, hv] } else { &[bsz, t, hv, dk] };
    let g = r.g.reshape(g_shape)?;
    let beta = r.beta.reshape(&[bsz, t, hv])?;
    let opts = layer_options();
    let inputs = Inputs {
        g: Some(&g),
        beta: Some(&beta),
        a_log: Some(r.a_log),
        dt_bias: Some(r.dt_bias),
        cu_seqlens: (!decode).then_some(&cu[..]),
        ..Inputs::new(&q, &k, &v)
    };
    let o = match cache.state.as_mut() {
        Some(state) if decode => recurrent::step_cuda(r.family, &inputs, &opts, state, None)?,
        _ => {
            let h0 = cache.state.take().filter(|s| s.shape()[0] == n && batch.past.iter().any(|&p| p > 0));
            let (o, ht) = chunk::forward_cuda(r.family, &Inputs { initial_state: h0.as_ref(), ..inputs }, &opts)?;
            cache.state = ht;
            o
        }
    };
    o.reshape(&[tokens * hv, dv])
}
