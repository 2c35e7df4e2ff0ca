//! Gated softmax attention as in Qwen3-Next / Qwen3.5: GQA, zero-centred RMSNorm on q and k per
//! head, partial rotary embedding, and a per-head sigmoid output gate carried in `q_proj`.
use std::sync::Arc;

use fla_core::cpu::{gemm, MatMut, MatRef};
use fla_core::cuda::{CudaDevice, CudaTensor};
use fla_core::{DType, Error, Result, Tensor};
use rayon::prelude::*;

use crate::matmul::matmul_t;
use crate::ops::{rms_norm, sigmoid, softmax};
use crate::rope::Rope;
use crate::{Batch, Linear, VarBuilder};

/// Queries per attention task: bounds the score block at `QUERY_BLOCK × context` floats.
const QUERY_BLOCK: usize = 128;

/// Sizes of a gated attention layer.
#[derive(Debug, Clone)]
pub struct AttentionConfig {
    /// Model width.
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (GQA).
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Rotated dims per head (`head_dim · partial_rotary_factor`).
    pub rope_dim: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// RMSNorm epsilon of `q_norm` / `k_norm`.
    pub eps: f32,
    /// `q_proj` also carries a per-head output gate (`[query hd | gate hd]` per head).
    pub output_gate: bool,
}

/// Keys and values of each sequence, `[tokens, kv_heads · head_dim]` (k after norm and RoPE).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// Keys per sequence.
    pub k: Vec<Vec<f32>>,
    /// Values per sequence.
    pub v: Vec<Vec<f32>>,
}

/// The gated attention layer (`self_attn.*`).
#[derive(Clone)]
pub struct GatedAttention {
    cfg: AttentionConfig,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Vec<f32>,
    k_norm: Vec<f32>,
    rope: Rope,
}

impl GatedAttention {
    /// Loads `q_proj`, `k_proj`, `v_proj`, `o_proj`, `q_norm`, `k_norm` under `vb`.
    pub fn load(cfg: &AttentionConfig, vb: &VarBuilder) -> Result<Self> {
        let (h, kv, hd) = (cfg.heads, cfg.kv_heads, cfg.head_dim);
        let q_out = h * hd * if cfg.output_gate { 2 } else { 1 };
        Ok(GatedAttention {
            q_proj: Linear::load(&vb.pp("q_proj"), cfg.hidden, q_out, false)?,
            k_proj: Linear::load(&vb.pp("k_proj"), cfg.hidden, kv * hd, false)?,
            v_proj: Linear::load(&vb.pp("v_proj"), cfg.hidden, kv * hd, false)?,
            o_proj: Linear::load(&vb.pp("o_proj"), h * hd, cfg.hidden, false)?,
            q_norm: vb.pp("q_norm").get_f32("weight", &[hd])?,
            k_norm: vb.pp("k_norm").get_f32("weight", &[hd])?,
            rope: Rope::new(cfg.rope_dim, cfg.rope_theta),
            cfg: cfg.clone(),
        })
    }

    /// Bytes of weights read per token.
    pub fn weight_bytes(&self) -> usize {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj].iter().map(|l| l.weight_bytes()).sum()
    }

    /// `x [tokens, hidden]` → `[tokens, hidden]`, appending the new keys and values to `cache`.
    pub fn forward(&self, x: &[f32], batch: &Batch, cache: &mut KvCache) -> Result<Vec<f32>> {
        let c = &self.cfg;
        batch.check_rows("GatedAttention::forward", x, c.hidden)?;
        let (h, kvh, hd) = (c.heads, c.kv_heads, c.head_dim);
        let tokens = batch.tokens();
        let qg = self.q_proj.forward(x)?;
        let per = if c.output_gate { 2 * hd } else { hd };
        let mut q = vec![0.0f32; tokens * h * hd];
        let mut gate = vec![0.0f32; if c.output_gate { tokens * h * hd } else { 0 }];
        for t in 0..tokens {
            for head in 0..h {
                let src = &qg[(t * h + head) * per..][..per];
                q[(t * h + head) * hd..][..hd].copy_from_slice(&src[..hd]);
                if c.output_gate {
                    gate[(t * h + head) * hd..][..hd].copy_from_slice(&src[hd..]);
                }
            }
        }
        let mut k = self.k_proj.forward(x)?;
        let v = self.v_proj.forward(x)?;
        rms_norm(&mut q, &self.q_norm, c.eps, 1.0);
        rms_norm(&mut k, &self.k_norm, c.eps, 1.0);
        if cache.k.len() != batch.len() && batch.past.iter().all(|&p| p == 0) {
            *cache = KvCache { k: vec![Vec::new(); batch.len()], v: vec![Vec::new(); batch.len()] };
        }
        for n in 0..batch.len() {
            let held = cache.k.get(n).map_or(0, |k| k.len() / (kvh * hd));
            if cache.k.len() != batch.len() || held != batch.past[n] {
                return Err(fla_core::Error::size(
                    "GatedAttention::forward",
                    format!("sequence {n} continues after {} tokens but the cache holds {held}", batch.past[n]),
                ));
            }
        }
        for (n, rows) in batch.seqs.iter().enumerate() {
            for (i, t) in rows.clone().enumerate() {
                let pos = batch.past[n] + i;
                self.rope.apply(&mut q[t * h * hd..][..h * hd], hd, pos);
                self.rope.apply(&mut k[t * kvh * hd..][..kvh * hd], hd, pos);
            }
            cache.k[n].extend_from_slice(&k[rows.start * kvh * hd..rows.end * kvh * hd]);
            cache.v[n].extend_from_slice(&v[rows.start * kvh * hd..rows.end * kvh * hd]);
        }
        // One task per (sequence, head, block of queries): S = scale·Q Kᵀ over the cached keys,
        // causal softmax per row, O = S V, each product one GEMM.
        let scale = 1.0 / (hd as f32).sqrt();
        let group = h / kvh;
        let tasks: Vec<(usize, usize, usize, usize)> = batch
            .seqs
            .iter()
            .enumerate()
            .flat_map(|(n, r)| {
                let len = r.len();
                (0..h).flat_map(move |head| {
                    (0..len).step_by(QUERY_BLOCK).map(move |q0| (n, head, q0, QUERY_BLOCK.min(len - q0)))
                })
            })
            .collect();
        let blocks: Vec<Vec<f32>> = tasks
            .par_iter()
            .map(|&(n, head, q0, qn)| {
                let (start, past) = (batch.seqs[n].start, batch.past[n]);
                let ctx = past + q0 + qn;
                let kvo = (head / group) * hd;
                let qm = MatRef::new(&q[((start + q0) * h + head) * hd..], qn, hd, h * hd, 1);
                let km = MatRef::new(&cache.k[n][kvo..], ctx, hd, kvh * hd, 1);
                let vm = MatRef::new(&cache.v[n][kvo..], ctx, hd, kvh * hd, 1);
                let mut scores = vec![0.0f32; qn * ctx];
                gemm(scale, qm, km.t(), 0.0, MatMut::new(&mut scores, qn, ctx, ctx, 1));
                for (i, row) in scores.chunks_mut(ctx).enumerate() {
                    let visible = past + q0 + i + 1;
                    softmax(&mut row[..visible]);
                    row[visible..].iter_mut().for_each(|v| *v = 0.0);
                }
                let mut out = vec![0.0f32; qn * hd];
                gemm(1.0, MatRef::new(&scores, qn, ctx, ctx, 1), vm, 0.0, MatMut::new(&mut out, qn, hd, hd, 1));
                out
            })
            .collect();
        let mut o = vec![0.0f32; tokens * h * hd];
        for (&(n, head, q0, _), out) in tasks.iter().zip(&blocks) {
            for (i, row) in out.chunks(hd).enumerate() {
                let t = batch.seqs[n].start + q0 + i;
                o[(t * h + head) * hd..][..hd].copy_from_slice(row);
            }
        }
        if c.output_gate {
            o.iter_mut().zip(&gate).for_each(|(o, &g)| *o *= sigmoid(g));
        }
        self.o_proj.forward(&o)
    }
}

/// The gated attention layer on a CUDA device ([`GatedAttention::to_cuda`]): the computation of
/// [`GatedAttention::forward`], its CPU twin, with its projections through [`crate::matmul::matmul_t`], q / k RMSNorm and partial
/// RoPE fused with the cache append (`attn_prep`), and causal softmax attention over each
/// token's cached context (`fla-kernels/cuda/attention.cu`): a tensor-core flash-attention
/// kernel for 16-bit prefills with head_dim 64, 128 or 256, a split-KV kernel otherwise
/// (decode, f32, other head dims).
pub struct GatedAttentionCuda {
    cfg: AttentionConfig,
    q_proj: CudaTensor,
    k_proj: CudaTensor,
    v_proj: CudaTensor,
    o_proj: CudaTensor,
    /// `[hd]` f32 each.
    q_norm: CudaTensor,
    k_norm: CudaTensor,
    /// `[rope_dim / 2]` f32.
    inv_freq: CudaTensor,
    rot: usize,
}

/// Keys and values of a batch of sequences on a CUDA device: `[N, cap, KVH, hd]` pools in the
/// activations' dtype (k after norm and RoPE), and the tokens each sequence holds.
#[derive(Debug, Default)]
pub struct KvCacheCuda {
    /// Key pool.
    pub k: Option<CudaTensor>,
    /// Value pool.
    pub v: Option<CudaTensor>,
    /// Tokens held per sequence.
    pub len: Vec<usize>,
}

impl GatedAttention {
    /// The layer on `dev` with its projection weights in `dtype`.
    pub fn to_cuda(&self, dev: &Arc<CudaDevice>, dtype: DType) -> Result<GatedAttentionCuda> {
        if self.cfg.head_dim > 512 {
            return Err(Error::Unsupported {
                op: "GatedAttention::to_cuda",
                msg: format!("head_dim = {} > 512 on the GPU", self.cfg.head_dim),
            });
        }
        let up = |l: &Linear| CudaTensor::from_host(&l.weight().to_dtype(dtype)?, dev);
        let up32 = |v: Vec<f32>| {
            let n = v.len();
            CudaTensor::from_host(&Tensor::from_vec(v, &[n])?, dev)
        };
        Ok(GatedAttentionCuda {
            q_proj: up(&self.q_proj)?,
            k_proj: up(&self.k_proj)?,
            v_proj: up(&self.v_proj)?,
            o_proj: up(&self.o_proj)?,
            q_norm: up32(self.q_norm.clone())?,
            k_norm: up32(self.k_norm.clone())?,
            // One padding value keeps the buffer non-empty without rotary dims.
            inv_freq: up32(self.rope.inv_freq_f32().into_iter().chain([0.0]).collect())?,
            rot: self.rope.rot(),
            cfg: self.cfg.clone(),
        })
    }
}

impl GatedAttentionCuda {
    /// `x [tokens, hidden]` in the weights' dtype, on their device → `[tokens, hidden]`,
    /// appending the new keys and values to `cache`.
    pub fn forward(&self, x: &CudaTensor, batch: &Batch, cache: &mut KvCacheCuda) -> Result<CudaTensor> {
        const OP: &str = "GatedAttentionCuda::forward";
        let c = &self.cfg;
        let (h, kvh, hd) = (c.heads, c.kv_heads, c.head_dim);
        let tokens = batch.tokens();
        crate::cuda::check_input(OP, x, tokens, c.hidden, &self.q_proj)?;
        let n = batch.len();
        if cache.len.len() != n && batch.past.iter().all(|&p| p == 0) {
            *cache = KvCacheCuda { k: None, v: None, len: vec![0; n] };
        }
        for (i, &p) in batch.past.iter().enumerate() {
            let held = cache.len.get(i).copied().unwrap_or(0);
            if cache.len.len() != n || held != p {
                return Err(Error::size(
                    OP,
                    format!("sequence {i} continues after {p} tokens but the cache holds {held}"),
                ));
            }
        }
        let dev = x.cuda_device().clone();
        // Grow the pools to the longest sequence (powers of two from 64 rows).
        let need = batch.seqs.iter().zip(&batch.past).map(|(r, &p)| p + r.len()).max().unwrap_or(0);
        let cap = cache.k.as_ref().map_or(0, |k| k.shape()[1]);
        if cap < need || cache.k.is_none() {
            let new_cap = need.next_power_of_two().max(64);
            let held = cache.len.iter().copied().max().unwrap_or(0);
            let grow = |old: Option<&CudaTensor>| match old {
                Some(old) => crate::cuda::grow_pool(old, n, new_cap, held),
                None => CudaTensor::zeros(&[n, new_cap, kvh, hd], x.dtype(), &dev),
            };
            cache.k = Some(grow(cache.k.as_ref())?);
            cache.v = Some(grow(cache.v.as_ref())?);
        }
        let cap = cache.k.as_ref().map_or(0, |k| k.shape()[1]);
        let qg = matmul_t(x, &self.q_proj)?;
        let kn = matmul_t(x, &self.k_proj)?;
        let vn = matmul_t(x, &self.v_proj)?;
        let tables = batch.tables_on(&dev)?;
        // SAFETY: attn_prep writes every element of q (a CTA per (token, head)) and the
        // attention kernels every element of o.
        let mut q = unsafe { CudaTensor::uninit(&[tokens, h, hd], x.dtype(), &dev)? };
        let mut o = unsafe { CudaTensor::uninit(&[tokens, h, hd], x.dtype(), &dev)? };
        let to_i32 = |what: &str, v: usize| {
            i32::try_from(v)
                .map_err(|_| Error::size(OP, format!("{what} = {v} does not fit the kernel's 32-bit index")))
        };
        to_i32("N·cap·KVH·hd", n * cap * kvh * hd)?;
        to_i32("tokens·H·per", tokens * h * 2 * hd)?;
        let kc = cache.k.as_mut().map_or(0, |k| k.raw_addr_mut());
        let vc = cache.v.as_mut().map_or(0, |v| v.raw_addr_mut());
        let params = crate::cuda::AttnParams {
            qg: qg.raw_addr(),
            kn: kn.raw_addr(),
            vn: vn.raw_addr(),
            q_norm: self.q_norm.raw_addr(),
            k_norm: self.k_norm.raw_addr(),
            inv_freq: self.inv_freq.raw_addr(),
            q: q.raw_addr_mut(),
            kc,
            vc,
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
            kvh: to_i32("kv_heads", kvh)?,
            hd: to_i32("head_dim", hd)?,
            per: to_i32("q_proj row", if c.output_gate { 2 * hd } else { hd })?,
            rot: to_i32("rope_dim", self.rot)?,
            cap: to_i32("cache rows", cap)?,
            gate: c.output_gate as i32,
            eps: c.eps,
            scale: 1.0 / (hd as f32).sqrt(),
            ..Default::default()
        };
        // SAFETY: the buffers above have the shapes `attention_launch` names (qg [tokens, H,
        // per] from q_proj's [H·per, hidden] weight; the pools [N, cap, KVH, hd] with every
        // position past + i < need <= cap; seq_of < N; seq_of and pos are `batch`'s),
        // head_dim <= 512 (checked in to_cuda), and all of them (the tables too) live past the
        // launches in stream order.
        unsafe { crate::cuda::attention_launch(&dev, &params, batch) }?;
        drop(tables);
        for (l, r) in cache.len.iter_mut().zip(&batch.seqs) {
            *l += r.len();
        }
        matmul_t(&o.reshape(&[tokens, h * hd])?, &self.o_proj)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use fla_core::Tensor;

    use super::*;

    fn layer() -> (GatedAttention, AttentionConfig) {
        let cfg = AttentionConfig {
            hidden: 24,
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
            rope_dim: 4,
            rope_theta: 10000.0,
            eps: 1e-6,
            output_gate: true,
        };
        let mut seed = 7u64;
        let mut rnd = |shape: &[usize], s: f32| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    s * (((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
                })
                .collect();
            Tensor::from_vec(v, shape).unwrap()
        };
        let w = HashMap::from([
            ("q_proj.weight".to_string(), rnd(&[4 * 8 * 2, 24], 0.3)),
            ("k_proj.weight".to_string(), rnd(&[2 * 8, 24], 0.3)),
            ("v_proj.weight".to_string(), rnd(&[2 * 8, 24], 0.3)),
            ("o_proj.weight".to_string(), rnd(&[24, 4 * 8], 0.3)),
            ("q_norm.weight".to_string(), rnd(&[8], 0.2)),
            ("k_norm.weight".to_string(), rnd(&[8], 0.2)),
        ]);
        (GatedAttention::load(&cfg, &VarBuilder::from_tensors(w)).unwrap(), cfg)
    }

    /// Prefill across several query blocks equals token-by-token decoding, which attends with
    /// one query at a time (a 1-row GEMM per head), for two packed sequences of different lengths.
    #[test]
    fn blocked_prefill_equals_decode() {
        let (layer, cfg) = layer();
        let lens = [QUERY_BLOCK * 2 + 37, 5];
        let x: Vec<f32> = (0..(lens[0] + lens[1]) * cfg.hidden).map(|i| (i * 37 % 101) as f32 / 101.0 - 0.5).collect();
        let mut cache = KvCache::default();
        let full = layer.forward(&x, &Batch::new(&lens, &[0, 0]), &mut cache).unwrap();
        for (n, &len) in lens.iter().enumerate() {
            let start = if n == 0 { 0 } else { lens[0] };
            let mut c = KvCache::default();
            for i in 0..len {
                let row = &x[(start + i) * cfg.hidden..][..cfg.hidden];
                let y = layer.forward(row, &Batch::new(&[1], &[i]), &mut c).unwrap();
                let want = &full[(start + i) * cfg.hidden..][..cfg.hidden];
                let err = y.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
                assert!(err < 1e-5, "sequence {n} token {i}: max diff {err}");
            }
        }
        assert!(layer.forward(&x[..cfg.hidden], &Batch::new(&[1], &[3]), &mut KvCache::default()).is_err());
    }
}
