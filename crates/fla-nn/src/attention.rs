//! Gated softmax attention as in Qwen3-Next / Qwen3.5: GQA, zero-centred RMSNorm on q and k per
//! head, partial rotary embedding, and a per-head sigmoid output gate carried in `q_proj`.
use fla_core::cpu::dot;
use fla_core::Result;
use rayon::prelude::*;

use crate::ops::{rms_norm, sigmoid, softmax};
use crate::rope::Rope;
use crate::{Batch, Linear, VarBuilder};

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
        // One task per (token, head): causal attention over the sequence's cached keys.
        let scale = 1.0 / (hd as f32).sqrt();
        let group = h / kvh;
        let mut o = vec![0.0f32; tokens * h * hd];
        let owner: Vec<(usize, usize)> =
            batch.seqs.iter().enumerate().flat_map(|(n, r)| r.clone().map(move |t| (n, t))).collect();
        o.par_chunks_mut(hd).enumerate().for_each(|(idx, out)| {
            let (t, head) = (idx / h, idx % h);
            let (n, _) = owner[t];
            let pos = batch.past[n] + (t - batch.seqs[n].start);
            let (kc, vc) = (&cache.k[n], &cache.v[n]);
            let qh = &q[(t * h + head) * hd..][..hd];
            let kvo = (head / group) * hd;
            let mut scores: Vec<f32> = (0..=pos).map(|j| dot(qh, &kc[j * kvh * hd + kvo..][..hd]) * scale).collect();
            softmax(&mut scores);
            for (j, &p) in scores.iter().enumerate() {
                out.iter_mut().zip(&vc[j * kvh * hd + kvo..][..hd]).for_each(|(o, &v)| *o += p * v);
            }
        });
        if c.output_gate {
            o.iter_mut().zip(&gate).for_each(|(o, &g)| *o *= sigmoid(g));
        }
        self.o_proj.forward(&o)
    }
}
