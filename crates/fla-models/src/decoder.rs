//! The pre-norm decoder shared by every supported family:
//!
//! ```text
//! x = embed(ids)
//! per layer:  x += mixer(norm(x));  x += ffn(norm(x))      mixer: GDN | gated attention | KDA | MLA
//! logits = lm_head(norm(x))                                 ffn: SwiGLU | Qwen MoE | Kimi MoE
//! ```
//!
//! Qwen's RMSNorm weights are zero-centred (`1 + w`), Kimi's plain; [`Decoder::norm_offset`]
//! carries the difference.
use fla_core::{Error, Result};
use fla_nn::attention::{GatedAttention, KvCache};
use fla_nn::embedding::Embedding;
use fla_nn::gated_deltanet::{GatedDeltaNet, GdnCache};
use fla_nn::kda::{KdaCache, KimiDeltaAttention};
use fla_nn::mla::{MlaCache, MultiLatentAttention};
use fla_nn::mlp::Mlp;
use fla_nn::moe::{KimiMoe, QwenMoe};
use fla_nn::ops::rms_norm;
use fla_nn::{Batch, Linear, VarBuilder};

use crate::cache::{Cache, LayerCache};

/// The token mixer of a layer.
// One per layer, built once and never moved in a loop: the size gap between the variants costs
// nothing, boxing would cost an indirection per call.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Mixer {
    Gdn(GatedDeltaNet),
    Attention(GatedAttention),
    Kda(KimiDeltaAttention),
    Mla(MultiLatentAttention),
}

/// The feed-forward of a layer.
pub(crate) enum Ffn {
    Dense(Mlp),
    QwenMoe(QwenMoe),
    KimiMoe(KimiMoe),
}

impl Ffn {
    fn forward(&self, x: &[f32]) -> Result<Vec<f32>> {
        match self {
            Ffn::Dense(m) => m.forward(x),
            Ffn::QwenMoe(m) => m.forward(x),
            Ffn::KimiMoe(m) => m.forward(x),
        }
    }
    fn weight_bytes(&self) -> usize {
        match self {
            Ffn::Dense(m) => m.weight_bytes(),
            Ffn::QwenMoe(m) => m.weight_bytes(),
            Ffn::KimiMoe(m) => m.weight_bytes(),
        }
    }
}

/// One decoder layer.
pub(crate) struct Block {
    pub input_norm: Vec<f32>,
    pub post_norm: Vec<f32>,
    pub mixer: Mixer,
    pub ffn: Ffn,
}

impl Block {
    /// A layer of `mixer` and `ffn` with its two norms (`input_layernorm`,
    /// `post_attention_layernorm`) read under `vb` (`model.layers.{i}`).
    pub fn load(vb: &VarBuilder, hidden: usize, mixer: Mixer, ffn: Ffn) -> Result<Self> {
        Ok(Block {
            input_norm: vb.pp("input_layernorm").get_f32("weight", &[hidden])?,
            post_norm: vb.pp("post_attention_layernorm").get_f32("weight", &[hidden])?,
            mixer,
            ffn,
        })
    }
}

/// What every family's decoder shares beyond its layers.
pub(crate) struct Head {
    /// Vocabulary size.
    pub vocab: usize,
    /// Model width.
    pub hidden: usize,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// 1 for zero-centred norm weights (Qwen), 0 for plain ones (Kimi).
    pub norm_offset: f32,
    /// LM head tied to the embedding table.
    pub tied: bool,
}

/// A decoder-only language model.
pub struct Decoder {
    pub(crate) embed: Embedding,
    pub(crate) layers: Vec<Block>,
    pub(crate) norm: Vec<f32>,
    pub(crate) lm_head: Linear,
    /// `lm_head` is the embedding table.
    pub(crate) tied: bool,
    pub(crate) eps: f32,
    pub(crate) norm_offset: f32,
    pub(crate) vocab: usize,
}

impl Decoder {
    /// Completes a decoder from its layers: the final `norm` under `model`, and `lm_head` at the
    /// root `vb` (or the embedding table when tied).
    pub(crate) fn assemble(
        vb: &VarBuilder,
        model: &VarBuilder,
        embed: Embedding,
        layers: Vec<Block>,
        head: Head,
    ) -> Result<Self> {
        let lm_head = if head.tied {
            embed.as_linear()?
        } else {
            Linear::load(&vb.pp("lm_head"), head.hidden, head.vocab, false)?
        };
        Ok(Decoder {
            norm: model.pp("norm").get_f32("weight", &[head.hidden])?,
            embed,
            layers,
            lm_head,
            tied: head.tied,
            eps: head.eps,
            norm_offset: head.norm_offset,
            vocab: head.vocab,
        })
    }

    /// An empty cache for `n` sequences.
    pub fn new_cache(&self, n: usize) -> Cache {
        let layers = self
            .layers
            .iter()
            .map(|l| match l.mixer {
                Mixer::Gdn(_) => LayerCache::Gdn(GdnCache::default()),
                Mixer::Attention(_) => LayerCache::Attn(KvCache::default()),
                Mixer::Kda(_) => LayerCache::Kda(KdaCache::empty()),
                Mixer::Mla(_) => LayerCache::Mla(MlaCache::empty()),
            })
            .collect();
        Cache { layers, past: vec![0; n] }
    }

    /// Final hidden states `[tokens, hidden]` of the packed `ids`, advancing the layer caches.
    pub fn forward_hidden(&self, ids: &[u32], batch: &Batch, cache: &mut Cache) -> Result<Vec<f32>> {
        let (eps, off) = (self.eps, self.norm_offset);
        let mut x = self.embed.forward(ids)?;
        if cache.layers.len() != self.layers.len() {
            return Err(Error::Msg("cache does not match the model's layers".into()));
        }
        for (layer, lc) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let mut h = x.clone();
            rms_norm(&mut h, &layer.input_norm, eps, off);
            let y = match (&layer.mixer, lc) {
                (Mixer::Gdn(m), LayerCache::Gdn(c)) => m.forward(&h, batch, c)?,
                (Mixer::Attention(m), LayerCache::Attn(c)) => m.forward(&h, batch, c)?,
                (Mixer::Kda(m), LayerCache::Kda(c)) => m.forward(&h, batch, c)?,
                (Mixer::Mla(m), LayerCache::Mla(c)) => m.forward(&h, batch, c)?,
                _ => return Err(Error::Msg("cache does not match the model's layers".into())),
            };
            x.iter_mut().zip(&y).for_each(|(a, b)| *a += b);
            let mut h = x.clone();
            rms_norm(&mut h, &layer.post_norm, eps, off);
            let y = layer.ffn.forward(&h)?;
            x.iter_mut().zip(&y).for_each(|(a, b)| *a += b);
        }
        rms_norm(&mut x, &self.norm, eps, off);
        Ok(x)
    }

    /// Logits `[rows, vocab]` of final hidden states.
    pub fn logits(&self, hidden: &[f32]) -> Result<Vec<f32>> {
        self.lm_head.forward(hidden)
    }

    /// Vocabulary size.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Bytes of weights read per decoded token (every layer with the experts one token uses, and
    /// the LM head; not the embedding table, of which one row is read).
    pub fn weight_bytes_per_token(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                let mixer = match &l.mixer {
                    Mixer::Gdn(m) => m.weight_bytes(),
                    Mixer::Attention(m) => m.weight_bytes(),
                    Mixer::Kda(m) => m.weight_bytes(),
                    Mixer::Mla(m) => m.weight_bytes(),
                };
                mixer + l.ffn.weight_bytes()
            })
            .sum();
        layers + self.lm_head.weight_bytes()
    }
}
