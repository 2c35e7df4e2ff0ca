//! Multi-head latent attention (MLA) as in Kimi Linear's full-attention layers: DeepSeek-V2's
//! latent key/value compression with NoPE (no rotary embedding anywhere).
//!
//! ```text
//! q          = q_proj(x)                          [.., H, nope | rope]   (or q_b(norm(q_a(x))) with a q LoRA)
//! c, k_pe    = kv_a_proj_with_mqa(x)              [kv_lora_rank | rope], k_pe shared by all heads
//! c          = kv_a_layernorm(c)                  plain RMSNorm
//! k_nope, v  = kv_b_proj(c)                       [.., H, nope | v]
//! o          = softmax(q·[k_nope | k_pe] · (nope+rope)^-1/2, causal) v   → o_proj
//! ```
//!
//! The cache ([`MlaCache`]) keeps only the latent of each token, `c` (normalised) and `k_pe`:
//! `kv_lora_rank + rope` values per token. Keys and values are rebuilt from it: by expanding
//! `kv_b_proj` over the context (prefill), or, when few new tokens attend to a long context
//! (decoding), in the absorbed form that folds `kv_b_proj` into the query and the output and
//! attends over the latents directly. Both forms compute the same function.
//!
//! [`MultiLatentAttentionCuda`] is the layer on a CUDA device, in the expanded form.
use std::sync::Arc;

use fla_core::cpu::dot;
use fla_core::cuda::{CudaDevice, CudaTensor};
use fla_core::{DType, Error, Result, Tensor};
use rayon::prelude::*;

use crate::cuda::{mla_append_cuda, rms_norm_cuda};
use crate::matmul::matmul_t;
use crate::ops::{rms_norm, softmax};
use crate::{Batch, Linear, VarBuilder};

/// Sizes of an MLA layer. From a Kimi Linear `config.json`: `hidden = hidden_size`,
/// `heads = num_attention_heads`, `q_lora_rank = q_lora_rank` (null), `kv_lora_rank`,
/// `qk_nope_head_dim`, `qk_rope_head_dim`, `v_head_dim` under the same names.
#[derive(Debug, Clone)]
pub struct MlaConfig {
    /// Model width.
    pub hidden: usize,
    /// Attention heads.
    pub heads: usize,
    /// Rank of the query LoRA (`q_a_proj`, `q_a_layernorm`, `q_b_proj`); `None` for a plain
    /// `q_proj` (Kimi Linear).
    pub q_lora_rank: Option<usize>,
    /// Width of the key/value latent `c`.
    pub kv_lora_rank: usize,
    /// Per-head query/key dims computed from the latent.
    pub qk_nope_head_dim: usize,
    /// Per-head query dims matched against the shared `k_pe` (rotary in DeepSeek; NoPE here).
    pub qk_rope_head_dim: usize,
    /// Per-head value dims.
    pub v_head_dim: usize,
    /// Epsilon of `kv_a_layernorm` (and `q_a_layernorm`). transformers and Moonshot's remote code
    /// build these norms with the RMSNorm default 1e-6, not `rms_norm_eps`; vLLM uses
    /// `rms_norm_eps`.
    pub norm_eps: f32,
}

impl MlaConfig {
    fn qk(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }
    fn latent(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }
}

/// The cache of an MLA layer: per sequence, the latent of each cached token,
/// `[tokens, kv_lora_rank + qk_rope_head_dim]` (`c` after `kv_a_layernorm`, then `k_pe`).
#[derive(Debug, Clone, Default)]
pub struct MlaCache {
    /// Latent rows of each sequence.
    pub latent: Vec<Vec<f32>>,
}

impl MlaCache {
    /// An empty cache; the first call sizes it for its batch.
    pub fn empty() -> Self {
        Self::default()
    }
    /// Tokens cached for sequence `i` (0 when there is no such sequence), given the latent width.
    pub fn cached_tokens(&self, i: usize, latent_width: usize) -> usize {
        self.latent.get(i).map_or(0, |l| l.len() / latent_width.max(1))
    }
}

/// How [`MultiLatentAttention::forward_form`] rebuilds keys and values from the latents. Every
/// form computes the same function; they differ in cost and rounding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MlaForm {
    /// Per sequence, whichever of the two needs fewer operations (expanded for prefill,
    /// absorbed for decoding over a long context).
    #[default]
    Auto,
    /// `kv_b_proj` over the whole context, then ordinary attention.
    Expanded,
    /// `kv_b_proj` folded into the queries and outputs, attention over the latents (the cost
    /// of a new token grows with `kv_lora_rank + rope` per context token, not with the heads' dims).
    Absorbed,
}

#[derive(Clone)]
enum QProj {
    Plain(Linear),
    Lora { a: Linear, norm: Vec<f32>, b: Linear },
}

/// The MLA layer (`model.layers.{i}.self_attn.*` of the full-attention layers).
#[derive(Clone)]
pub struct MultiLatentAttention {
    cfg: MlaConfig,
    q: QProj,
    kv_a_proj: Linear,
    kv_a_norm: Vec<f32>,
    /// `kv_b_proj` weight `[H·(nope+v), kv_lora_rank]` in f32, shared with `kv_b_proj`.
    kv_b_w: Tensor,
    kv_b_proj: Linear,
    o_proj: Linear,
}

impl MultiLatentAttention {
    /// Loads `q_proj` (or `q_a_proj`, `q_a_layernorm`, `q_b_proj`), `kv_a_proj_with_mqa`,
    /// `kv_a_layernorm`, `kv_b_proj` and `o_proj` under `vb`.
    pub fn load(cfg: &MlaConfig, vb: &VarBuilder) -> Result<Self> {
        for (field, v) in [
            ("hidden", cfg.hidden),
            ("heads", cfg.heads),
            ("kv_lora_rank", cfg.kv_lora_rank),
            ("qk_head_dim", cfg.qk()),
            ("v_head_dim", cfg.v_head_dim),
        ] {
            if v == 0 {
                return Err(Error::Config { field: field.into(), msg: "must be positive".into() });
            }
        }
        let (h, r) = (cfg.heads, cfg.kv_lora_rank);
        let lin = |name: &str, i: usize, o: usize| Linear::load(&vb.pp(name), i, o, false);
        let q = match cfg.q_lora_rank {
            None => QProj::Plain(lin("q_proj", cfg.hidden, h * cfg.qk())?),
            Some(qr) => QProj::Lora {
                a: lin("q_a_proj", cfg.hidden, qr)?,
                norm: vb.pp("q_a_layernorm").get_f32("weight", &[qr])?,
                b: lin("q_b_proj", qr, h * cfg.qk())?,
            },
        };
        let kv_b_w = vb.pp("kv_b_proj").get("weight", &[h * (cfg.qk_nope_head_dim + cfg.v_head_dim), r])?;
        let kv_b_w = kv_b_w.to_dtype(DType::F32)?;
        Ok(MultiLatentAttention {
            q,
            kv_a_proj: lin("kv_a_proj_with_mqa", cfg.hidden, cfg.latent())?,
            kv_a_norm: vb.pp("kv_a_layernorm").get_f32("weight", &[r])?,
            kv_b_proj: Linear::new(kv_b_w.clone(), None)?,
            kv_b_w,
            o_proj: lin("o_proj", h * cfg.v_head_dim, cfg.hidden)?,
            cfg: cfg.clone(),
        })
    }

    /// The layer's sizes.
    pub fn config(&self) -> &MlaConfig {
        &self.cfg
    }

    /// Values cached per token: `kv_lora_rank + qk_rope_head_dim`.
    pub fn latent_width(&self) -> usize {
        self.cfg.latent()
    }

    /// Bytes of the projection weights read per token (the expanded form also reads `kv_b_proj`
    /// once per context token).
    pub fn weight_bytes(&self) -> usize {
        let q = match &self.q {
            QProj::Plain(l) => l.weight_bytes(),
            QProj::Lora { a, b, .. } => a.weight_bytes() + b.weight_bytes(),
        };
        q + self.kv_a_proj.weight_bytes() + self.kv_b_proj.weight_bytes() + self.o_proj.weight_bytes()
    }

    /// `x [tokens, hidden]` → `[tokens, hidden]`: causal attention of each sequence's new tokens
    /// over its cached and new tokens, appending the new latents to `cache`.
    ///
    /// A sequence with `past = 0` starts afresh (its cache slot is cleared); any other must have
    /// exactly `past` tokens cached, or the call is an error.
    pub fn forward(&self, x: &[f32], batch: &Batch, cache: &mut MlaCache) -> Result<Vec<f32>> {
        self.forward_form(x, batch, cache, MlaForm::Auto)
    }

    /// [`forward`](Self::forward) with the form chosen by the caller (benchmarks, tests).
    pub fn forward_form(&self, x: &[f32], batch: &Batch, cache: &mut MlaCache, form: MlaForm) -> Result<Vec<f32>> {
        const OP: &str = "MultiLatentAttention::forward";
        let c = &self.cfg;
        batch.check_rows(OP, x, c.hidden)?;
        let (h, nope, rope, vd, r) = (c.heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank);
        let (qk, lat, kvw) = (c.qk(), c.latent(), nope + vd);
        let tokens = batch.tokens();
        if tokens == 0 {
            return Ok(Vec::new());
        }
        self.check_cache(batch, cache)?;

        let q = match &self.q {
            QProj::Plain(l) => l.forward(x)?,
            QProj::Lora { a, norm, b } => {
                let mut qa = a.forward(x)?;
                rms_norm(&mut qa, norm, c.norm_eps, 0.0);
                b.forward(&qa)?
            }
        };
        // New latents: normalise the `c` part of each row.
        let mut kva = self.kv_a_proj.forward(x)?;
        let mut cn: Vec<f32> = kva.chunks(lat).flat_map(|row| row[..r].iter().copied()).collect();
        rms_norm(&mut cn, &self.kv_a_norm, c.norm_eps, 0.0);
        kva.chunks_mut(lat).zip(cn.chunks(r)).for_each(|(row, cr)| row[..r].copy_from_slice(cr));
        if cache.latent.len() < batch.len() {
            cache.latent.resize(batch.len(), Vec::new());
        }
        for (n, rows) in batch.seqs.iter().enumerate() {
            if batch.past[n] == 0 {
                cache.latent[n].clear();
            }
            cache.latent[n].extend_from_slice(&kva[rows.start * lat..rows.end * lat]);
        }

        // Expanded keys/values `[ctx, H, nope | v]` of the sequences that take the expanded form.
        let expanded: Vec<Option<Vec<f32>>> = batch
            .seqs
            .iter()
            .enumerate()
            .map(|(n, rows)| {
                let (l, ctx) = (rows.len(), batch.past[n] + rows.len());
                let use_expanded = match form {
                    MlaForm::Expanded => true,
                    MlaForm::Absorbed => false,
                    MlaForm::Auto => {
                        let expand = ctx * r * h * kvw + l * ctx * h * (qk + vd);
                        let absorb = l * h * r * kvw + l * ctx * h * (2 * r + rope);
                        expand <= absorb
                    }
                };
                (use_expanded && l > 0)
                    .then(|| {
                        let cs: Vec<f32> =
                            cache.latent[n].chunks(lat).flat_map(|row| row[..r].iter().copied()).collect();
                        self.kv_b_proj.forward(&cs)
                    })
                    .transpose()
            })
            .collect::<Result<_>>()?;
        let w = self.kv_b_w.as_slice::<f32>()?;
        let owner: Vec<usize> =
            batch.seqs.iter().enumerate().flat_map(|(n, rows)| rows.clone().map(move |_| n)).collect();
        let scale = 1.0 / (qk as f32).sqrt();
        let mut o = vec![0.0f32; tokens * h * vd];
        // One task per (token, head).
        o.par_chunks_mut(vd).enumerate().for_each(|(idx, out)| {
            let (t, head) = (idx / h, idx % h);
            let n = owner[t];
            let pos = batch.past[n] + (t - batch.seqs[n].start);
            let qh = &q[(t * h + head) * qk..][..qk];
            let (q_nope, q_pe) = qh.split_at(nope);
            let lat_n = &cache.latent[n];
            let k_pe = |j: usize| &lat_n[j * lat + r..][..rope];
            match &expanded[n] {
                Some(kv) => {
                    let row = |j: usize| &kv[(j * h + head) * kvw..][..kvw];
                    let mut p: Vec<f32> =
                        (0..=pos).map(|j| (dot(q_nope, &row(j)[..nope]) + dot(q_pe, k_pe(j))) * scale).collect();
                    softmax(&mut p);
                    for (j, &p) in p.iter().enumerate() {
                        out.iter_mut().zip(&row(j)[nope..]).for_each(|(o, &v)| *o += p * v);
                    }
                }
                None => {
                    // W_uk of this head: rows [head·kvw, head·kvw + nope); W_uv: the next vd rows.
                    let wh = &w[head * kvw * r..][..kvw * r];
                    let mut qa = vec![0.0f32; r];
                    for (d, &qd) in q_nope.iter().enumerate() {
                        qa.iter_mut().zip(&wh[d * r..][..r]).for_each(|(a, &w)| *a += qd * w);
                    }
                    let mut p: Vec<f32> =
                        (0..=pos).map(|j| (dot(&qa, &lat_n[j * lat..][..r]) + dot(q_pe, k_pe(j))) * scale).collect();
                    softmax(&mut p);
                    let mut ctx = vec![0.0f32; r];
                    for (j, &p) in p.iter().enumerate() {
                        ctx.iter_mut().zip(&lat_n[j * lat..][..r]).for_each(|(a, &c)| *a += p * c);
                    }
                    for (e, o) in out.iter_mut().enumerate() {
                        *o = dot(&wh[(nope + e) * r..][..r], &ctx);
                    }
                }
            }
        });
        self.o_proj.forward(&o)
    }

    /// Checks that every continued sequence has exactly its `past` tokens in `cache`.
    fn check_cache(&self, batch: &Batch, cache: &MlaCache) -> Result<()> {
        let lat = self.cfg.latent();
        for (n, &past) in batch.past.iter().enumerate() {
            let have = cache.latent.get(n).map_or(0, |l| l.len());
            if past > 0 && have != past * lat {
                return Err(Error::size(
                    "MultiLatentAttention::forward",
                    format!(
                        "sequence {n} continues after {past} cached tokens, but the cache holds {} tokens \
                         ({have} values of width {lat})",
                        have / lat
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The query projection of [`MultiLatentAttentionCuda`], each head's rows padded to the kernels'
/// head dim with zero rows.
enum QProjCuda {
    Plain(CudaTensor),
    Lora { a: CudaTensor, norm: CudaTensor, b: CudaTensor },
}

/// The MLA layer on a CUDA device ([`MultiLatentAttention::to_cuda`]): the computation of
/// [`MultiLatentAttention::forward`], its CPU twin, in the expanded form. Each call appends the
/// new latents to the cache (`nn_mla_append`: `kv_a_layernorm` fused with the write), expands
/// the keys and values of every cached row with two cuBLAS products, and runs the softmax
/// attention kernels of [`crate::attention::GatedAttentionCuda`] over them (no norm, no RoPE,
/// no gate, one key/value head per query head).
///
/// The attention kernels take one head dim for q, k and v; MLA's q / k (`nope + rope`) and v
/// (`v_head_dim`) differ, so all three are zero-padded to `hd` (64, 128 or 256 where they fit,
/// the sizes of the tensor-core prefill kernel): zero columns change no score, and the zero
/// output columns meet zero columns of `o_proj`. The padding is in the weights, built once:
/// `q_proj` (`q_b_proj`) has a zero row per padded query column, the key expansion `k_up [H·hd,
/// kv_lora_rank + rope]` holds `kv_b_proj`'s k_nope rows over the `c` columns and an identity
/// over the `k_pe` columns (so `latent · k_upᵀ` is `[k_nope | k_pe | 0]` per head, `k_pe` copied
/// exactly), `v_up` `kv_b_proj`'s v rows and zeros, and `o_proj` a zero column per padded value
/// column.
pub struct MultiLatentAttentionCuda {
    cfg: MlaConfig,
    q: QProjCuda,
    /// `[kv_lora_rank + rope, hidden]`.
    kv_a_proj: CudaTensor,
    /// `[kv_lora_rank]` f32.
    kv_a_norm: CudaTensor,
    /// `[H·hd, kv_lora_rank + rope]`: a latent row to `[k_nope | k_pe | 0]` per head.
    k_up: CudaTensor,
    /// `[H·hd, kv_lora_rank + rope]`: a latent row to `[v | 0]` per head.
    v_up: CudaTensor,
    /// `[hidden, H·hd]`.
    o_proj: CudaTensor,
    /// Head dim of the attention kernels.
    hd: usize,
}

/// The cache of an MLA layer on a CUDA device: the latent of each cached token (as in
/// [`MlaCache`]) in a pool `[N, cap, kv_lora_rank + rope]` of the activations' dtype, grown by
/// powers of two, and the tokens each sequence holds.
#[derive(Debug, Default)]
pub struct MlaCacheCuda {
    /// The latent pool; `None` before the first call.
    pub latent: Option<CudaTensor>,
    /// Tokens held per sequence.
    pub len: Vec<usize>,
}

/// The head dim of the attention kernels for queries / keys of `qk` and values of `v` dims: the
/// smallest of 64, 128 and 256 that holds both (the tensor-core prefill sizes), else the larger.
fn padded_head_dim(qk: usize, v: usize) -> usize {
    let d = qk.max(v);
    [64, 128, 256].into_iter().find(|&p| p >= d).unwrap_or(d)
}

impl MultiLatentAttention {
    /// The layer on `dev` with its projection weights in `dtype`, padded for the attention
    /// kernels (see [`MultiLatentAttentionCuda`]).
    pub fn to_cuda(&self, dev: &Arc<CudaDevice>, dtype: DType) -> Result<MultiLatentAttentionCuda> {
        let p = self.padded_weights()?;
        let up = |t: &Tensor| CudaTensor::from_host(&t.to_dtype(dtype)?, dev);
        let up32 = |v: &[f32]| CudaTensor::from_host(&Tensor::from_vec(v.to_vec(), &[v.len()])?, dev);
        let q = match &self.q {
            QProj::Plain(_) => QProjCuda::Plain(up(&p.q)?),
            QProj::Lora { a, norm, .. } => QProjCuda::Lora { a: up(a.weight())?, norm: up32(norm)?, b: up(&p.q)? },
        };
        Ok(MultiLatentAttentionCuda {
            q,
            kv_a_proj: up(self.kv_a_proj.weight())?,
            kv_a_norm: up32(&self.kv_a_norm)?,
            k_up: up(&p.k_up)?,
            v_up: up(&p.v_up)?,
            o_proj: up(&p.o_proj)?,
            hd: p.hd,
            cfg: self.cfg.clone(),
        })
    }

    /// The weights of [`MultiLatentAttentionCuda`] that differ from this layer's, on the host.
    fn padded_weights(&self) -> Result<PaddedWeights> {
        let c = &self.cfg;
        let (h, nope, rope, vd, r) = (c.heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank);
        let (qk, lat, kvw) = (c.qk(), c.latent(), nope + vd);
        let hd = padded_head_dim(qk, vd);
        if hd > 512 {
            return Err(Error::Unsupported {
                op: "MultiLatentAttention::to_cuda",
                msg: format!("query/key dims {qk} and value dims {vd}: the GPU attention takes at most 512"),
            });
        }
        // `[H·qk, inp]` → `[H·hd, inp]`: the rows of each head, then zero rows.
        let pad_q = |l: &Linear| -> Result<Tensor> {
            let w = l.weight().to_vec::<f32>()?;
            let inp = w.len() / (h * qk);
            let mut out = vec![0.0f32; h * hd * inp];
            for head in 0..h {
                out[head * hd * inp..][..qk * inp].copy_from_slice(&w[head * qk * inp..][..qk * inp]);
            }
            Tensor::from_vec(out, &[h * hd, inp])
        };
        let q = match &self.q {
            QProj::Plain(l) => pad_q(l)?,
            QProj::Lora { b, .. } => pad_q(b)?,
        };
        let w = self.kv_b_w.as_slice::<f32>()?;
        let (mut k_up, mut v_up) = (vec![0.0f32; h * hd * lat], vec![0.0f32; h * hd * lat]);
        for head in 0..h {
            for d in 0..nope {
                k_up[(head * hd + d) * lat..][..r].copy_from_slice(&w[(head * kvw + d) * r..][..r]);
            }
            for i in 0..rope {
                k_up[(head * hd + nope + i) * lat + r + i] = 1.0;
            }
            for d in 0..vd {
                v_up[(head * hd + d) * lat..][..r].copy_from_slice(&w[(head * kvw + nope + d) * r..][..r]);
            }
        }
        let wo = self.o_proj.weight().to_vec::<f32>()?;
        let mut o_proj = vec![0.0f32; c.hidden * h * hd];
        for (row, src) in o_proj.chunks_mut(h * hd).zip(wo.chunks(h * vd)) {
            for head in 0..h {
                row[head * hd..][..vd].copy_from_slice(&src[head * vd..][..vd]);
            }
        }
        Ok(PaddedWeights {
            hd,
            q,
            k_up: Tensor::from_vec(k_up, &[h * hd, lat])?,
            v_up: Tensor::from_vec(v_up, &[h * hd, lat])?,
            o_proj: Tensor::from_vec(o_proj, &[c.hidden, h * hd])?,
        })
    }
}

/// The weights of [`MultiLatentAttentionCuda`] built from a layer's, f32 on the host (see there).
struct PaddedWeights {
    /// Head dim of the attention kernels.
    hd: usize,
    /// `q_proj` (or `q_b_proj`) `[H·hd, in]`, each head's rows then zero rows.
    q: Tensor,
    /// `[H·hd, kv_lora_rank + rope]`: a latent row to `[k_nope | k_pe | 0]` per head.
    k_up: Tensor,
    /// `[H·hd, kv_lora_rank + rope]`: a latent row to `[v | 0]` per head.
    v_up: Tensor,
    /// `o_proj` `[hidden, H·hd]`, each head's columns then zero columns.
    o_proj: Tensor,
}

impl MultiLatentAttentionCuda {
    /// The layer's sizes.
    pub fn config(&self) -> &MlaConfig {
        &self.cfg
    }

    /// `x [tokens, hidden]` in the weights' dtype, on their device → `[tokens, hidden]`: causal
    /// attention of each sequence's new tokens over its cached and new tokens, appending the new
    /// latents to `cache`.
    ///
    /// A sequence with `past = 0` starts afresh; any other must have exactly `past` tokens
    /// cached, or the call is an error (as [`MultiLatentAttention::forward`]).
    pub fn forward(&self, x: &CudaTensor, batch: &Batch, cache: &mut MlaCacheCuda) -> Result<CudaTensor> {
        const OP: &str = "MultiLatentAttentionCuda::forward";
        let c = &self.cfg;
        let (h, hd, lat) = (c.heads, self.hd, c.latent());
        let tokens = batch.tokens();
        crate::cuda::check_input(OP, x, tokens, c.hidden, &self.o_proj)?;
        let dev = x.cuda_device().clone();
        if tokens == 0 {
            return CudaTensor::zeros(&[0, c.hidden], x.dtype(), &dev);
        }
        self.check_cache(x, batch, cache)?;

        // Restarted sequences hold nothing; grow the pool to the batch and its longest sequence.
        let n = batch.len();
        if cache.len.len() < n {
            cache.len.resize(n, 0);
        }
        for (held, &past) in cache.len.iter_mut().zip(&batch.past) {
            if past == 0 {
                *held = 0;
            }
        }
        let need = batch.seqs.iter().zip(&batch.past).map(|(r, &p)| p + r.len()).max().unwrap_or(0);
        let (pool_n, pool_cap) = cache.latent.as_ref().map_or((0, 0), |p| (p.shape()[0], p.shape()[1]));
        let seqs = cache.len.len();
        if cache.latent.is_none() || pool_n < seqs || pool_cap < need {
            let cap = if pool_cap >= need { pool_cap } else { need.next_power_of_two().max(64) };
            let held = cache.len.iter().copied().max().unwrap_or(0);
            let grown = match &cache.latent {
                Some(old) => crate::cuda::grow_pool(old, pool_n.max(seqs), cap, held)?,
                None => CudaTensor::zeros(&[seqs, cap, lat], x.dtype(), &dev)?,
            };
            cache.latent = Some(grown);
        }
        let Some(pool) = cache.latent.as_mut() else {
            return Err(Error::Msg(format!("{OP}: the latent pool was not allocated")));
        };
        let (pool_n, cap) = (pool.shape()[0], pool.shape()[1]);
        let to_i32 = |what: &str, v: usize| {
            i32::try_from(v)
                .map_err(|_| Error::size(OP, format!("{what} = {v} does not fit the kernel's 32-bit index")))
        };
        to_i32("N·cap·H·hd", pool_n * cap * h * hd)?;
        to_i32("tokens·H·hd", tokens * h * hd)?;

        let q = match &self.q {
            QProjCuda::Plain(w) => matmul_t(x, w)?,
            QProjCuda::Lora { a, norm, b } => {
                let qa = rms_norm_cuda(&matmul_t(x, a)?, norm, c.norm_eps, 0.0, None)?;
                matmul_t(&qa, b)?
            }
        };
        let (mut seq_of, mut pos) = (Vec::with_capacity(tokens), Vec::with_capacity(tokens));
        for (i, r) in batch.seqs.iter().enumerate() {
            for j in 0..r.len() {
                seq_of.push(i);
                pos.push(batch.past[i] + j);
            }
        }
        let kva = matmul_t(x, &self.kv_a_proj)?;
        mla_append_cuda(&kva, &self.kv_a_norm, c.norm_eps, pool, &seq_of, &pos)?;
        // Keys and values of every row of the pool, `[N, cap, H·hd]` each: rows past a
        // sequence's tokens come out of zeros or stale latents and are never attended to.
        let mut kc = matmul_t(pool, &self.k_up)?;
        let mut vc = matmul_t(pool, &self.v_up)?;

        let tables = batch.tables_on(&dev)?;
        // SAFETY: attn_prep writes every element of q_scratch (a CTA per (token, head)) and the
        // attention kernels every element of o.
        let mut q_scratch = unsafe { CudaTensor::uninit(&[tokens, h, hd], x.dtype(), &dev)? };
        let mut o = unsafe { CudaTensor::uninit(&[tokens, h, hd], x.dtype(), &dev)? };
        let params = crate::cuda::AttnParams {
            qg: q.raw_addr(),
            q: q_scratch.raw_addr_mut(),
            kc: kc.raw_addr_mut(),
            vc: vc.raw_addr_mut(),
            o: o.raw_addr_mut(),
            seq_of: tables.seq_of_addr(),
            pos: tables.pos_addr(),
            dtype: match x.dtype() {
                DType::F32 => 0,
                DType::BF16 => 1,
                DType::F16 => 2,
                got => return Err(Error::DType { op: OP, arg: "x", expected: "f32, bf16 or f16".into(), got }),
            },
            tokens: to_i32("tokens", tokens)?,
            h: to_i32("heads", h)?,
            kvh: to_i32("heads", h)?,
            hd: to_i32("head_dim", hd)?,
            per: to_i32("head_dim", hd)?,
            cap: to_i32("cache rows", cap)?,
            scale: 1.0 / (c.qk() as f32).sqrt(),
            // Null kn / vn (the pools are filled) and norms, rot 0, no gate.
            ..Default::default()
        };
        // SAFETY: the buffers have the shapes `attention_launch` names: qg is q [tokens, H·hd]
        // (per = hd, no gate), the pools kc / vc [N, cap, H, hd] from the products over the
        // latent pool [N, cap, lat]; every position past + i < need <= cap and every sequence
        // index < n <= N; seq_of and pos are `batch`'s; kn, vn and the norms are null and rot
        // is 0, which the kernels do not read; hd <= 512 (checked in to_cuda). All of them (the
        // table too) live past the launches in stream order.
        unsafe { crate::cuda::attention_launch(&dev, &params, batch) }?;
        drop(tables);
        for (held, r) in cache.len.iter_mut().zip(&batch.seqs) {
            *held += r.len();
        }
        matmul_t(&o.reshape(&[tokens, h * hd])?, &self.o_proj)
    }

    /// Checks `cache` against `batch` (every continued sequence holds exactly its `past` tokens)
    /// and its pool against the layer and `x` (width, dtype, device, room for what it holds).
    fn check_cache(&self, x: &CudaTensor, batch: &Batch, cache: &MlaCacheCuda) -> Result<()> {
        const OP: &str = "MultiLatentAttentionCuda::forward";
        for (i, &past) in batch.past.iter().enumerate() {
            let held = cache.len.get(i).copied().unwrap_or(0);
            if past > 0 && held != past {
                return Err(Error::size(
                    OP,
                    format!("sequence {i} continues after {past} cached tokens, but the cache holds {held}"),
                ));
            }
        }
        let Some(pool) = &cache.latent else {
            if cache.len.iter().any(|&l| l > 0) {
                return Err(Error::Argument { op: OP, arg: "cache", msg: "tokens held without a latent pool".into() });
            }
            return Ok(());
        };
        let lat = self.cfg.latent();
        let fits = matches!(pool.shape(), &[n, cap, w] if w == lat && n >= cache.len.len()
            && cache.len.iter().all(|&l| l <= cap));
        if !fits {
            return Err(Error::shape(
                OP,
                "cache",
                format!("a latent pool [N ≥ {}, cap, {lat}] holding its tokens", cache.len.len()),
                pool.shape(),
            ));
        }
        if pool.dtype() != x.dtype() {
            return Err(Error::DType {
                op: OP,
                arg: "cache",
                expected: format!("{} (the dtype of x)", x.dtype()),
                got: pool.dtype(),
            });
        }
        if pool.device() != x.device() {
            return Err(Error::Device {
                op: OP,
                arg: "cache",
                expected: x.device().to_string(),
                got: pool.device().to_string(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    const HIDDEN: usize = 16;

    fn cfg(q_lora_rank: Option<usize>) -> MlaConfig {
        MlaConfig {
            hidden: HIDDEN,
            heads: 3,
            q_lora_rank,
            kv_lora_rank: 6,
            qk_nope_head_dim: 4,
            qk_rope_head_dim: 2,
            v_head_dim: 5,
            norm_eps: 1e-6,
        }
    }

    fn rand_vec(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-1.0f32..1.0) * scale).collect()
    }

    fn weights(c: &MlaConfig, seed: u64) -> HashMap<String, Tensor> {
        let mut rng = StdRng::seed_from_u64(seed);
        let (h, qk) = (c.heads, c.qk());
        let mut shapes: Vec<(&str, Vec<usize>, f32)> = vec![
            ("kv_a_proj_with_mqa.weight", vec![c.latent(), HIDDEN], 0.5),
            ("kv_a_layernorm.weight", vec![c.kv_lora_rank], 1.0),
            ("kv_b_proj.weight", vec![h * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank], 0.5),
            ("o_proj.weight", vec![HIDDEN, h * c.v_head_dim], 0.3),
        ];
        match c.q_lora_rank {
            None => shapes.push(("q_proj.weight", vec![h * qk, HIDDEN], 0.5)),
            Some(qr) => {
                shapes.push(("q_a_proj.weight", vec![qr, HIDDEN], 0.5));
                shapes.push(("q_a_layernorm.weight", vec![qr], 1.0));
                shapes.push(("q_b_proj.weight", vec![h * qk, qr], 0.5));
            }
        }
        shapes
            .into_iter()
            .map(|(name, shape, s)| {
                let n = shape.iter().product();
                (format!("attn.{name}"), Tensor::from_vec(rand_vec(&mut rng, n, s), &shape).unwrap())
            })
            .collect()
    }

    fn layer(c: &MlaConfig, m: &HashMap<String, Tensor>) -> MultiLatentAttention {
        MultiLatentAttention::load(c, &VarBuilder::from_tensors(m.clone()).pp("attn")).unwrap()
    }

    /// Straightforward f64 reference of one sequence from scratch: expand k and v per head.
    fn reference(c: &MlaConfig, m: &HashMap<String, Tensor>, x: &[f32]) -> Vec<f64> {
        let w = |name: &str| m[&format!("attn.{name}")].to_vec::<f64>().unwrap();
        let matvec = |w: &[f64], x: &[f64], out: usize| -> Vec<f64> {
            (0..out).map(|o| (0..x.len()).map(|j| w[o * x.len() + j] * x[j]).sum()).collect()
        };
        let norm = |x: &[f64], w: &[f64]| -> Vec<f64> {
            let r = 1.0 / (x.iter().map(|a| a * a).sum::<f64>() / x.len() as f64 + c.norm_eps as f64).sqrt();
            x.iter().zip(w).map(|(a, w)| a * r * w).collect()
        };
        let (h, nope, rope, vd, r) = (c.heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank);
        let qk = nope + rope;
        let t_len = x.len() / HIDDEN;
        let xs: Vec<Vec<f64>> =
            (0..t_len).map(|t| x[t * HIDDEN..][..HIDDEN].iter().map(|&v| v as f64).collect()).collect();
        let q: Vec<Vec<f64>> = xs
            .iter()
            .map(|xt| match c.q_lora_rank {
                None => matvec(&w("q_proj.weight"), xt, h * qk),
                Some(qr) => matvec(
                    &w("q_b_proj.weight"),
                    &norm(&matvec(&w("q_a_proj.weight"), xt, qr), &w("q_a_layernorm.weight")),
                    h * qk,
                ),
            })
            .collect();
        let kva: Vec<Vec<f64>> = xs.iter().map(|xt| matvec(&w("kv_a_proj_with_mqa.weight"), xt, r + rope)).collect();
        let kv: Vec<Vec<f64>> = kva
            .iter()
            .map(|a| matvec(&w("kv_b_proj.weight"), &norm(&a[..r], &w("kv_a_layernorm.weight")), h * (nope + vd)))
            .collect();
        let mut out = Vec::new();
        for (t, qt) in q.iter().enumerate() {
            let mut o = vec![0.0f64; h * vd];
            for hh in 0..h {
                let qh = &qt[hh * qk..][..qk];
                let key = |j: usize| -> Vec<f64> {
                    let mut k = kv[j][hh * (nope + vd)..][..nope].to_vec();
                    k.extend_from_slice(&kva[j][r..]);
                    k
                };
                let s: Vec<f64> = (0..=t)
                    .map(|j| qh.iter().zip(key(j)).map(|(a, b)| a * b).sum::<f64>() / (qk as f64).sqrt())
                    .collect();
                let mx = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|v| (v - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    for d in 0..vd {
                        o[hh * vd + d] += ej / z * kv[j][hh * (nope + vd) + nope + d];
                    }
                }
            }
            out.extend(matvec(&w("o_proj.weight"), &o, HIDDEN));
        }
        out
    }

    fn rel_err(got: &[f32], want: &[f64]) -> f64 {
        assert_eq!(got.len(), want.len());
        let num: f64 = got.iter().zip(want).map(|(&a, &b)| (a as f64 - b).powi(2)).sum();
        let den: f64 = want.iter().map(|b| b * b).sum();
        assert!(num.is_finite());
        (num / den).sqrt()
    }

    #[test]
    fn forward_matches_reference_in_both_forms() {
        for q_lora in [None, Some(7)] {
            let c = cfg(q_lora);
            let m = weights(&c, 1);
            let layer = layer(&c, &m);
            let mut rng = StdRng::seed_from_u64(2);
            let lens = [4usize, 9, 1];
            let x = rand_vec(&mut rng, 14 * HIDDEN, 1.0);
            let batch = Batch::new(&lens, &[0, 0, 0]);
            for form in [MlaForm::Auto, MlaForm::Expanded, MlaForm::Absorbed] {
                let mut cache = MlaCache::empty();
                let y = layer.forward_form(&x, &batch, &mut cache, form).unwrap();
                for r in batch.seqs.clone() {
                    let want = reference(&c, &m, &x[r.start * HIDDEN..r.end * HIDDEN]);
                    let err = rel_err(&y[r.start * HIDDEN..r.end * HIDDEN], &want);
                    assert!(err < 1e-5, "q_lora {q_lora:?} {form:?} rows {r:?}: rel err {err}");
                }
                assert_eq!(cache.cached_tokens(1, layer.latent_width()), 9);
            }
        }
    }

    #[test]
    fn decode_after_prefill_matches_one_pass() {
        let c = cfg(None);
        let m = weights(&c, 3);
        let layer = layer(&c, &m);
        let mut rng = StdRng::seed_from_u64(4);
        let full = [12usize, 7];
        let xs: Vec<Vec<f32>> = full.iter().map(|&l| rand_vec(&mut rng, l * HIDDEN, 1.0)).collect();
        for form in [MlaForm::Auto, MlaForm::Expanded, MlaForm::Absorbed] {
            let mut cache = MlaCache::empty();
            let mut pos = [0usize, 0];
            let mut got: Vec<Vec<f32>> = vec![Vec::new(), Vec::new()];
            let steps: Vec<[usize; 2]> = vec![[5, 1], [3, 2], [1, 1], [1, 1], [1, 1], [1, 1]];
            for lens in steps {
                let batch = Batch::new(&lens, &pos);
                let x: Vec<f32> =
                    (0..2).flat_map(|i| xs[i][pos[i] * HIDDEN..(pos[i] + lens[i]) * HIDDEN].to_vec()).collect();
                let y = layer.forward_form(&x, &batch, &mut cache, form).unwrap();
                for i in 0..2 {
                    let r = batch.seqs[i].clone();
                    got[i].extend_from_slice(&y[r.start * HIDDEN..r.end * HIDDEN]);
                    pos[i] += lens[i];
                }
            }
            for i in 0..2 {
                let want = reference(&c, &m, &xs[i][..pos[i] * HIDDEN]);
                let err = rel_err(&got[i], &want);
                assert!(err < 1e-5, "{form:?} sequence {i}: rel err {err}");
            }
        }
    }

    #[test]
    fn cache_mismatch_and_bad_shapes_are_errors() {
        let c = cfg(None);
        let m = weights(&c, 5);
        let layer = layer(&c, &m);
        let x = vec![0.1f32; 3 * HIDDEN];
        assert!(layer.forward(&x, &Batch::new(&[3], &[2]), &mut MlaCache::empty()).is_err());
        assert!(layer.forward(&x[..HIDDEN], &Batch::new(&[3], &[0]), &mut MlaCache::empty()).is_err());
        let mut cache = MlaCache::empty();
        layer.forward(&x, &Batch::new(&[3], &[0]), &mut cache).unwrap();
        assert!(layer.forward(&x[..HIDDEN], &Batch::new(&[1], &[4]), &mut cache).is_err());
        // A restarted slot is cleared.
        layer.forward(&x[..HIDDEN], &Batch::new(&[1], &[0]), &mut cache).unwrap();
        assert_eq!(cache.cached_tokens(0, layer.latent_width()), 1);
        let mut m2 = m.clone();
        m2.insert("attn.kv_b_proj.weight".into(), Tensor::zeros(&[27, 5], DType::F32));
        assert!(matches!(
            MultiLatentAttention::load(&c, &VarBuilder::from_tensors(m2).pp("attn")),
            Err(Error::TensorShape { .. })
        ));
        assert!(MultiLatentAttention::load(&cfg(Some(7)), &VarBuilder::from_tensors(m).pp("attn")).is_err());
    }

    /// The GPU layer's computation emulated on the host with its padded weights (the padded
    /// q / k / v, the identity block that places `k_pe`, the zero columns of `o_proj`) equals
    /// the layer, for a plain q projection and a q LoRA.
    #[test]
    fn padded_weights_compute_the_layer() {
        for q_lora in [None, Some(7)] {
            let c = cfg(q_lora);
            let layer = layer(&c, &weights(&c, 6));
            let p = layer.padded_weights().unwrap();
            let (h, hd, r, lat) = (c.heads, p.hd, c.kv_lora_rank, c.latent());
            assert_eq!(hd, 64);
            let mut rng = StdRng::seed_from_u64(7);
            let lens = [5usize, 1, 3];
            let x = rand_vec(&mut rng, 9 * HIDDEN, 1.0);
            let batch = Batch::new(&lens, &[0, 0, 0]);
            let want = layer.forward(&x, &batch, &mut MlaCache::empty()).unwrap();
            let lin = |w: &Tensor, x: &[f32]| Linear::new(w.clone(), None).unwrap().forward(x).unwrap();
            let q = match &layer.q {
                QProj::Plain(_) => lin(&p.q, &x),
                QProj::Lora { a, norm, .. } => {
                    let mut qa = a.forward(&x).unwrap();
                    rms_norm(&mut qa, norm, c.norm_eps, 0.0);
                    lin(&p.q, &qa)
                }
            };
            let mut latent = layer.kv_a_proj.forward(&x).unwrap();
            for row in latent.chunks_mut(lat) {
                rms_norm(&mut row[..r], &layer.kv_a_norm, c.norm_eps, 0.0);
            }
            let (k, v) = (lin(&p.k_up, &latent), lin(&p.v_up, &latent));
            let scale = 1.0 / (c.qk() as f32).sqrt();
            let mut o = vec![0.0f32; 9 * h * hd];
            for rows in &batch.seqs {
                for t in rows.clone() {
                    for head in 0..h {
                        let row = |m: &[f32], j: usize| m[(j * h + head) * hd..][..hd].to_vec();
                        let mut s: Vec<f32> = (rows.start..=t).map(|j| dot(&row(&q, t), &row(&k, j)) * scale).collect();
                        softmax(&mut s);
                        for (j, p) in (rows.start..=t).zip(s) {
                            o[(t * h + head) * hd..][..hd].iter_mut().zip(row(&v, j)).for_each(|(o, v)| *o += p * v);
                        }
                    }
                }
            }
            let got = lin(&p.o_proj, &o);
            let want64: Vec<f64> = want.iter().map(|&v| v as f64).collect();
            let err = rel_err(&got, &want64);
            assert!(err < 1e-5, "q_lora {q_lora:?}: rel err {err}");
        }
    }

    #[test]
    fn padded_head_dims_take_the_tensor_core_sizes() {
        assert_eq!(padded_head_dim(192, 128), 256, "Kimi Linear");
        assert_eq!(padded_head_dim(24, 16), 64);
        assert_eq!(padded_head_dim(64, 128), 128);
        assert_eq!(padded_head_dim(320, 128), 320);
    }

    #[test]
    fn loads_the_tiny_kimi_checkpoint() {
        let vb = crate::fixture_weights("kimi_linear_tiny");
        let cfg = MlaConfig {
            hidden: 64,
            heads: 4,
            q_lora_rank: None,
            kv_lora_rank: 16,
            qk_nope_head_dim: 16,
            qk_rope_head_dim: 8,
            v_head_dim: 16,
            norm_eps: 1e-6,
        };
        let layer = MultiLatentAttention::load(&cfg, &vb.pp("model.layers.3.self_attn")).unwrap();
        let x: Vec<f32> = (0..3 * 64).map(|i| ((i * 37 % 23) as f32 / 23.0 - 0.5) * 2.0).collect();
        let y = layer.forward(&x, &Batch::new(&[3], &[0]), &mut MlaCache::empty()).unwrap();
        assert!(y.len() == 3 * 64 && y.iter().all(|v| v.is_finite()));
    }
}
