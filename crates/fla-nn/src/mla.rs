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
use fla_core::cpu::dot;
use fla_core::{DType, Error, Result, Tensor};
use rayon::prelude::*;

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
