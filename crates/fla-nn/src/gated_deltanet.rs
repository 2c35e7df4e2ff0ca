//! Gated DeltaNet as in Qwen3-Next and Qwen3.5 (`linear_attn.*`).
//!
//! ```text
//! q|k|v = silu(conv1d(in_proj_qkv x))          one depthwise causal conv (kernel 4) over q|k|v
//! β = σ(in_proj_b x);  g = −exp(A_log)·softplus(in_proj_a x + dt_bias)
//! o = gated_delta_rule(l2norm q, l2norm k, v, g, β)      value head j reads key head j / (HV/H)
//! y = out_proj(RMSNorm(o)·w·silu(in_proj_z x))          per value head
//! ```
//!
//! Qwen3.5 stores the projections split (`in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`);
//! Qwen3-Next interleaves them per key head (`in_proj_qkvz`: `[q | k | v G·dv | z G·dv]` per key
//! head; `in_proj_ba`: `[b G | a G]`), which [`ProjLayout`] selects.
use std::sync::Arc;

use fla_core::cuda::{CudaDevice, CudaTensor};
use fla_core::{DType, Result, Tensor};
use fla_ops::{chunk, recurrent, Family, Inputs};

use crate::conv::{ConvState, ShortConv};
use crate::cuda::{check_input, parts, split_cols_cuda};
use crate::linear_cuda::{conv_recurrence, layer_options, LinearCacheCuda, Recurrence};
use crate::matmul::{matmul_t, matmul_t_fused, matmul_t_prenorm, NormPrologue, PreNorm, Prologue};
use crate::ops::{rms_norm_gated, GateAct};
use crate::{Batch, Linear, VarBuilder};

/// How the input projections are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProjLayout {
    /// Qwen3.5: `in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`.
    Split,
    /// Qwen3-Next: `in_proj_qkvz`, `in_proj_ba`, interleaved per key head.
    Interleaved,
}

/// Sizes of a Gated DeltaNet layer.
#[derive(Debug, Clone)]
pub struct GatedDeltaNetConfig {
    /// Model width.
    pub hidden: usize,
    /// Query/key heads (`linear_num_key_heads`).
    pub key_heads: usize,
    /// Value heads (`linear_num_value_heads`).
    pub value_heads: usize,
    /// Key head dimension.
    pub key_dim: usize,
    /// Value head dimension.
    pub value_dim: usize,
    /// Conv kernel (`linear_conv_kernel_dim`).
    pub conv_kernel: usize,
    /// Epsilon of the gated output norm.
    pub eps: f32,
    /// Projection layout.
    pub layout: ProjLayout,
}

impl GatedDeltaNetConfig {
    fn key_total(&self) -> usize {
        self.key_heads * self.key_dim
    }
    fn value_total(&self) -> usize {
        self.value_heads * self.value_dim
    }
    fn conv_dim(&self) -> usize {
        2 * self.key_total() + self.value_total()
    }
}

/// Cache of one Gated DeltaNet layer for a batch of sequences.
#[derive(Debug, Clone, Default)]
pub struct GdnCache {
    /// Last conv inputs.
    pub conv: ConvState,
    /// Recurrent state `[N, HV, K, V]` f32, once a forward has run.
    pub state: Option<Tensor>,
}

/// The four projections of a layer's input: `(qkv, z, b, a)`, row-major over tokens.
type Projected = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

// One per layer, built once and never moved in a loop: the size gap between the variants costs
// nothing, boxing would cost an indirection per projection.
#[allow(clippy::large_enum_variant)]
enum Proj {
    Split { qkv: Linear, z: Linear, b: Linear, a: Linear },
    Interleaved { qkvz: Linear, ba: Linear },
}

/// The Gated DeltaNet layer.
pub struct GatedDeltaNet {
    cfg: GatedDeltaNetConfig,
    proj: Proj,
    conv: ShortConv,
    a_log: Tensor,
    dt_bias: Tensor,
    norm: Vec<f32>,
    out_proj: Linear,
}

impl GatedDeltaNet {
    /// Loads the layer under `vb` (`…linear_attn`).
    pub fn load(cfg: &GatedDeltaNetConfig, vb: &VarBuilder) -> Result<Self> {
        let (h, hv) = (cfg.hidden, cfg.value_heads);
        if cfg.key_heads == 0 || hv % cfg.key_heads != 0 {
            return Err(fla_core::Error::Config {
                field: "linear_num_value_heads".into(),
                msg: format!("{hv} is not a multiple of linear_num_key_heads = {}", cfg.key_heads),
            });
        }
        let proj = match cfg.layout {
            ProjLayout::Split => Proj::Split {
                qkv: Linear::load(&vb.pp("in_proj_qkv"), h, cfg.conv_dim(), false)?,
                z: Linear::load(&vb.pp("in_proj_z"), h, cfg.value_total(), false)?,
                b: Linear::load(&vb.pp("in_proj_b"), h, hv, false)?,
                a: Linear::load(&vb.pp("in_proj_a"), h, hv, false)?,
            },
            ProjLayout::Interleaved => Proj::Interleaved {
                qkvz: Linear::load(&vb.pp("in_proj_qkvz"), h, 2 * cfg.key_total() + 2 * cfg.value_total(), false)?,
                ba: Linear::load(&vb.pp("in_proj_ba"), h, 2 * hv, false)?,
            },
        };
        Ok(GatedDeltaNet {
            proj,
            conv: ShortConv::load(&vb.pp("conv1d"), cfg.conv_dim(), cfg.conv_kernel)?,
            a_log: vb.get("A_log", &[hv])?.to_dtype(fla_core::DType::F32)?,
            dt_bias: vb.get("dt_bias", &[hv])?.to_dtype(fla_core::DType::F32)?,
            norm: vb.pp("norm").get_f32("weight", &[cfg.value_dim])?,
            out_proj: Linear::load(&vb.pp("out_proj"), cfg.value_total(), h, false)?,
            cfg: cfg.clone(),
        })
    }

    /// Bytes of weights read per token.
    pub fn weight_bytes(&self) -> usize {
        let proj = match &self.proj {
            Proj::Split { qkv, z, b, a } => qkv.weight_bytes() + z.weight_bytes() + b.weight_bytes() + a.weight_bytes(),
            Proj::Interleaved { qkvz, ba } => qkvz.weight_bytes() + ba.weight_bytes(),
        };
        proj + self.out_proj.weight_bytes()
    }

    /// `(qkv [T, conv_dim], z [T, value_total], b [T, HV], a [T, HV])`.
    fn project(&self, x: &[f32]) -> Result<Projected> {
        match &self.proj {
            Proj::Split { qkv, z, b, a } => Ok((qkv.forward(x)?, z.forward(x)?, b.forward(x)?, a.forward(x)?)),
            Proj::Interleaved { qkvz, ba } => {
                let c = &self.cfg;
                let (hk, dk, dv) = (c.key_heads, c.key_dim, c.value_dim);
                let g = c.value_heads / hk;
                let (kt, vt) = (c.key_total(), c.value_total());
                let mixed = qkvz.forward(x)?;
                let mixed_ba = ba.forward(x)?;
                let tokens = mixed.len() / (2 * kt + 2 * vt);
                let mut qkv = vec![0.0f32; tokens * c.conv_dim()];
                let mut z = vec![0.0f32; tokens * vt];
                let (mut b, mut a) = (vec![0.0f32; tokens * c.value_heads], vec![0.0f32; tokens * c.value_heads]);
                let per = 2 * dk + 2 * g * dv;
                for t in 0..tokens {
                    let row = &mixed[t * (2 * kt + 2 * vt)..];
                    let dst = &mut qkv[t * c.conv_dim()..][..c.conv_dim()];
                    for head in 0..hk {
                        let src = &row[head * per..][..per];
                        dst[head * dk..][..dk].copy_from_slice(&src[..dk]);
                        dst[kt + head * dk..][..dk].copy_from_slice(&src[dk..2 * dk]);
                        dst[2 * kt + head * g * dv..][..g * dv].copy_from_slice(&src[2 * dk..2 * dk + g * dv]);
                        z[t * vt + head * g * dv..][..g * dv].copy_from_slice(&src[2 * dk + g * dv..]);
                        let src = &mixed_ba[(t * hk + head) * 2 * g..][..2 * g];
                        b[t * c.value_heads + head * g..][..g].copy_from_slice(&src[..g]);
                        a[t * c.value_heads + head * g..][..g].copy_from_slice(&src[g..]);
                    }
                }
                Ok((qkv, z, b, a))
            }
        }
    }

    /// `x [tokens, hidden]` → `[tokens, hidden]`, continuing each sequence from `cache`.
    pub fn forward(&self, x: &[f32], batch: &Batch, cache: &mut GdnCache) -> Result<Vec<f32>> {
        let c = &self.cfg;
        batch.check_rows("GatedDeltaNet::forward", x, c.hidden)?;
        let held = cache.state.as_ref().map_or(0, |s| s.shape()[0]);
        if batch.past.iter().any(|&p| p > 0) && held != batch.len() {
            return Err(fla_core::Error::size(
                "GatedDeltaNet::forward",
                format!("{} sequences continue from a cache holding {held} states", batch.len()),
            ));
        }
        let tokens = batch.tokens();
        let (qkv, z, b, a) = self.project(x)?;
        let mixed = self.conv.forward(&qkv, batch, &mut cache.conv);
        let (kt, vt, cd) = (c.key_total(), c.value_total(), c.conv_dim());
        let (mut q, mut k, mut v) =
            (Vec::with_capacity(tokens * kt), Vec::with_capacity(tokens * kt), Vec::with_capacity(tokens * vt));
        for row in mixed.chunks(cd) {
            q.extend_from_slice(&row[..kt]);
            k.extend_from_slice(&row[kt..2 * kt]);
            v.extend_from_slice(&row[2 * kt..]);
        }
        let (hk, hv, dk, dv) = (c.key_heads, c.value_heads, c.key_dim, c.value_dim);
        let opts = layer_options();
        let decode = batch.is_decode() && cache.state.as_ref().is_some_and(|s| s.shape()[0] == batch.len());
        let (bsz, t) = if decode { (batch.len(), 1) } else { (1, tokens) };
        let q = Tensor::from_vec(q, &[bsz, t, hk, dk])?;
        let k = Tensor::from_vec(k, &[bsz, t, hk, dk])?;
        let v = Tensor::from_vec(v, &[bsz, t, hv, dv])?;
        let a = Tensor::from_vec(a, &[bsz, t, hv])?;
        let b = Tensor::from_vec(b, &[bsz, t, hv])?;
        let cu = batch.cu_seqlens();
        let inputs = Inputs {
            g: Some(&a),
            beta: Some(&b),
            a_log: Some(&self.a_log),
            dt_bias: Some(&self.dt_bias),
            cu_seqlens: (!decode).then_some(&cu[..]),
            ..Inputs::new(&q, &k, &v)
        };
        let o = if decode {
            let state = cache.state.as_mut().expect("decode needs a state");
            recurrent::step(Family::GatedDeltaRule, &inputs, &opts, state)?
        } else {
            let h0 = cache.state.take().filter(|s| s.shape()[0] == batch.len() && batch.past.iter().any(|&p| p > 0));
            let out = chunk::forward(Family::GatedDeltaRule, &Inputs { initial_state: h0.as_ref(), ..inputs }, &opts)?;
            cache.state = out.final_state;
            out.o
        };
        let mut o: Vec<f32> = o.to_vec()?;
        rms_norm_gated(&mut o, &z, &self.norm, c.eps, GateAct::Silu);
        self.out_proj.forward(&o)
    }
}

/// The Gated DeltaNet layer on a CUDA device ([`GatedDeltaNet::to_cuda`]): the computation of
/// [`GatedDeltaNet::forward`], its CPU twin, with the weights uploaded once in one dtype (the
/// four input projections stacked into one, the interleaved Qwen3-Next ones reordered into the
/// split order on upload) and activations in that dtype: one product for the input projections,
/// the short convolution reading q|k|v out of it and writing q, k and v apart, the chunk
/// forward (prefill) or the recurrent step (decode), the RMSNorm gated by z read out of the
/// product. A decode step is five kernels: the input product (with the block's residual add and
/// input norm when [`GatedDeltaNetCuda::forward_prenorm`]), b and a copied apart, the
/// convolution with its cache, the recurrent step, the output product with the gated norm fused
/// in front.
pub struct GatedDeltaNetCuda {
    cfg: GatedDeltaNetConfig,
    /// `[conv_dim + value_total + 2·HV, hidden]`: rows `qkv [conv_dim] | z [value_total] |
    /// b [HV] | a [HV]`.
    proj: CudaTensor,
    /// `[conv_dim, kernel]` f32.
    conv: CudaTensor,
    /// `[HV]` f32 each.
    a_log: CudaTensor,
    dt_bias: CudaTensor,
    /// `[value_dim]` f32.
    norm: CudaTensor,
    /// `[hidden, value_total]`.
    out_proj: CudaTensor,
}

impl GatedDeltaNet {
    /// The layer on `dev` with its projection weights in `dtype` (f32, bf16 or f16; the conv,
    /// gate and norm parameters stay f32).
    pub fn to_cuda(&self, dev: &Arc<CudaDevice>, dtype: DType) -> Result<GatedDeltaNetCuda> {
        let c = &self.cfg;
        let up = |t: &Tensor| CudaTensor::from_host(&t.to_dtype(dtype)?, dev);
        let up32 = |v: Vec<f32>, shape: &[usize]| CudaTensor::from_host(&Tensor::from_vec(v, shape)?, dev);
        let rows_out = c.conv_dim() + c.value_total() + 2 * c.value_heads;
        let mut stacked: Vec<f32> = Vec::with_capacity(rows_out * c.hidden);
        match &self.proj {
            Proj::Split { qkv, z, b, a } => {
                for l in [qkv, z, b, a] {
                    stacked.extend(l.weight().to_vec::<f32>()?);
                }
            }
            Proj::Interleaved { qkvz, ba } => {
                // Rows of the per-key-head interleaved weights `qkvz | ba` (stacked) in the split
                // order q | k | v | z | b | a.
                let (hk, dk, dv) = (c.key_heads, c.key_dim, c.value_dim);
                let g = c.value_heads / hk;
                let per = 2 * dk + 2 * g * dv;
                let ba0 = hk * per;
                let (mut rq, mut rk, mut rv, mut rz) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                let (mut rb, mut ra) = (Vec::new(), Vec::new());
                for head in 0..hk {
                    let base = head * per;
                    rq.extend(base..base + dk);
                    rk.extend(base + dk..base + 2 * dk);
                    rv.extend(base + 2 * dk..base + 2 * dk + g * dv);
                    rz.extend(base + 2 * dk + g * dv..base + per);
                    rb.extend(ba0 + head * 2 * g..ba0 + head * 2 * g + g);
                    ra.extend(ba0 + head * 2 * g + g..ba0 + (head + 1) * 2 * g);
                }
                let data: Vec<f32> = [qkvz.weight().to_vec::<f32>()?, ba.weight().to_vec::<f32>()?].concat();
                for r in rq.into_iter().chain(rk).chain(rv).chain(rz).chain(rb).chain(ra) {
                    stacked.extend_from_slice(&data[r * c.hidden..(r + 1) * c.hidden]);
                }
            }
        }
        Ok(GatedDeltaNetCuda {
            proj: up(&Tensor::from_vec(stacked, &[rows_out, c.hidden])?)?,
            conv: up32(self.conv.weight().to_vec(), &[c.conv_dim(), c.conv_kernel])?,
            a_log: CudaTensor::from_host(&self.a_log, dev)?,
            dt_bias: CudaTensor::from_host(&self.dt_bias, dev)?,
            norm: up32(self.norm.clone(), &[c.value_dim])?,
            out_proj: up(self.out_proj.weight())?,
            cfg: c.clone(),
        })
    }
}

const OP: &str = "GatedDeltaNetCuda::forward";

impl GatedDeltaNetCuda {
    /// `x [tokens, hidden]` (the dtype of the projection weights, on their device) →
    /// `[tokens, hidden]`, continuing each sequence from `cache`: prefill through the chunk form,
    /// a decode batch (one new token per cached sequence) through the recurrent step.
    pub fn forward(&self, x: &CudaTensor, batch: &Batch, cache: &mut LinearCacheCuda) -> Result<CudaTensor> {
        check_input(OP, x, batch.tokens(), self.cfg.hidden, &self.proj)?;
        self.forward_proj(matmul_t(x, &self.proj)?, batch, cache)
    }

    /// [`GatedDeltaNetCuda::forward`] of `rms_norm(x + res)`, the residual add and the norm fused
    /// into the input product: returns the output and `x + res` (the residual stream after the
    /// add).
    pub fn forward_prenorm(
        &self,
        x: CudaTensor,
        pre: &PreNorm<'_>,
        batch: &Batch,
        cache: &mut LinearCacheCuda,
    ) -> Result<(CudaTensor, CudaTensor)> {
        check_input(OP, &x, batch.tokens(), self.cfg.hidden, &self.proj)?;
        let (proj, sum) = matmul_t_prenorm(x, &self.proj, pre)?;
        Ok((self.forward_proj(proj, batch, cache)?, sum))
    }

    /// The layer after its input product `proj [tokens, conv_dim + value_total + 2·HV]`.
    fn forward_proj(&self, proj: CudaTensor, batch: &Batch, cache: &mut LinearCacheCuda) -> Result<CudaTensor> {
        let c = &self.cfg;
        let (hv, dv) = (c.value_heads, c.value_dim);
        let (cd, vt) = (c.conv_dim(), c.value_total());
        let [beta, g]: [CudaTensor; 2] = parts(OP, split_cols_cuda(&proj, cd + vt, &[hv, hv])?)?;
        let r = Recurrence {
            family: Family::GatedDeltaRule,
            heads: [c.key_heads, hv],
            dims: [c.key_dim, dv],
            g,
            beta,
            a_log: &self.a_log,
            dt_bias: &self.dt_bias,
        };
        let o = conv_recurrence(OP, &proj, 0, &self.conv, r, batch, cache)?;
        // The gated norm (per head, z read out of the product) fused into the output product.
        let np = NormPrologue {
            res: None,
            weight: &self.norm,
            offset: 0.0,
            eps: c.eps,
            group: dv,
            gate: Some((&proj, cd, GateAct::Silu)),
        };
        Ok(matmul_t_fused(o, &self.out_proj, &Prologue::Norm(np))?.0)
    }
}
