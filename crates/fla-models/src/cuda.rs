//! The decoder on a CUDA device ([`Model::to_cuda`]): the layers' GPU twins
//! ([`fla_nn::gated_deltanet::GatedDeltaNetCuda`], [`fla_nn::kda::KimiDeltaAttentionCuda`],
//! [`fla_nn::attention::GatedAttentionCuda`], [`fla_nn::mla::MultiLatentAttentionCuda`],
//! [`fla_nn::mlp::MlpCuda`], [`fla_nn::moe::MoeCuda`]) in the pre-norm decoder of
//! [`crate::Decoder`], activations in one dtype: Qwen3.5, Qwen3-Next and Kimi Linear.
//! The token embeddings are gathered on the device (from the LM head when it is tied).
use std::sync::Arc;

use fla_core::cuda::{CudaDevice, CudaTensor};
use fla_core::{DType, Error, Result, Tensor};
use fla_nn::attention::{GatedAttentionCuda, KvCacheCuda};
use fla_nn::cuda::{add_rms_norm_cuda, gather_rows_cuda, rms_norm_cuda};
use fla_nn::gated_deltanet::GatedDeltaNetCuda;
use fla_nn::kda::KimiDeltaAttentionCuda;
use fla_nn::linear_cuda::LinearCacheCuda;
use fla_nn::matmul::matmul_t;
use fla_nn::mla::{MlaCacheCuda, MultiLatentAttentionCuda};
use fla_nn::mlp::MlpCuda;
use fla_nn::moe::MoeCuda;
use fla_nn::Batch;

use crate::decoder::{Ffn, Mixer};
use crate::Model;

enum MixerCuda {
    Gdn(GatedDeltaNetCuda),
    Kda(KimiDeltaAttentionCuda),
    Attention(GatedAttentionCuda),
    Mla(MultiLatentAttentionCuda),
}

// One per layer, built once: the size difference of the variants costs nothing.
#[allow(clippy::large_enum_variant)]
enum FfnCuda {
    Dense(MlpCuda),
    Moe(MoeCuda),
}

impl FfnCuda {
    fn forward(&self, x: &CudaTensor) -> Result<CudaTensor> {
        match self {
            FfnCuda::Dense(m) => m.forward(x),
            FfnCuda::Moe(m) => m.forward(x),
        }
    }
}

struct BlockCuda {
    input_norm: CudaTensor,
    post_norm: CudaTensor,
    mixer: MixerCuda,
    ffn: FfnCuda,
}

/// A [`Model`] on a CUDA device.
pub struct ModelCuda {
    host: ModelHost,
    layers: Vec<BlockCuda>,
    norm: CudaTensor,
    /// `[vocab, hidden]`.
    lm_head: CudaTensor,
    /// The embedding table `[vocab, hidden]`; `None` when the LM head is tied to it.
    embed: Option<CudaTensor>,
}

/// The model's sizes and norm constants, read on the host.
struct ModelHost {
    eps: f32,
    norm_offset: f32,
    vocab: usize,
}

/// The per-layer caches of a [`ModelCuda`] for a batch of sequences, on its device.
#[derive(Debug, Default)]
pub struct CacheCuda {
    linear: Vec<LinearCacheCuda>,
    attn: Vec<KvCacheCuda>,
    mla: Vec<MlaCacheCuda>,
    /// Tokens each sequence holds.
    pub past: Vec<usize>,
}

impl Model {
    /// This model on `dev` with its weights and activations in `dtype` (f32, bf16 or f16).
    pub fn to_cuda(&self, dev: &Arc<CudaDevice>, dtype: DType) -> Result<ModelCuda> {
        let d = &self.decoder;
        let vec_up = |v: &[f32]| CudaTensor::from_host(&Tensor::from_vec(v.to_vec(), &[v.len()])?, dev);
        let mut layers = Vec::with_capacity(d.layers.len());
        for l in &d.layers {
            let mixer = match &l.mixer {
                Mixer::Gdn(m) => MixerCuda::Gdn(m.to_cuda(dev, dtype)?),
                Mixer::Attention(m) => MixerCuda::Attention(m.to_cuda(dev, dtype)?),
                Mixer::Kda(m) => MixerCuda::Kda(m.to_cuda(dev, dtype)?),
                Mixer::Mla(m) => MixerCuda::Mla(m.to_cuda(dev, dtype)?),
            };
            let ffn = match &l.ffn {
                Ffn::Dense(m) => FfnCuda::Dense(m.to_cuda(dev, dtype)?),
                Ffn::QwenMoe(m) => FfnCuda::Moe(m.to_cuda(dev, dtype)?),
                Ffn::KimiMoe(m) => FfnCuda::Moe(m.to_cuda(dev, dtype)?),
            };
            layers.push(BlockCuda { input_norm: vec_up(&l.input_norm)?, post_norm: vec_up(&l.post_norm)?, mixer, ffn });
        }
        Ok(ModelCuda {
            host: ModelHost { eps: d.eps, norm_offset: d.norm_offset, vocab: d.vocab },
            layers,
            norm: vec_up(&d.norm)?,
            lm_head: CudaTensor::from_host(&d.lm_head.weight().to_dtype(dtype)?, dev)?,
            embed: (!d.tied).then(|| CudaTensor::from_host(&d.embed.weight().to_dtype(dtype)?, dev)).transpose()?,
        })
    }
}

impl ModelCuda {
    /// An empty cache for `n` sequences.
    pub fn new_cache(&self, n: usize) -> CacheCuda {
        let count = |f: fn(&MixerCuda) -> bool| self.layers.iter().filter(|l| f(&l.mixer)).count();
        CacheCuda {
            linear: (0..count(|m| matches!(m, MixerCuda::Gdn(_) | MixerCuda::Kda(_))))
                .map(|_| LinearCacheCuda::default())
                .collect(),
            attn: (0..count(|m| matches!(m, MixerCuda::Attention(_)))).map(|_| KvCacheCuda::default()).collect(),
            mla: (0..count(|m| matches!(m, MixerCuda::Mla(_)))).map(|_| MlaCacheCuda::default()).collect(),
            past: vec![0; n],
        }
    }

    /// Runs `seqs[i]` (new tokens of sequence `i`, continuing its cache) and returns the final
    /// hidden states `[tokens, hidden]` on the device, packed in order.
    pub fn forward_hidden(&self, seqs: &[&[u32]], cache: &mut CacheCuda) -> Result<CudaTensor> {
        if seqs.len() != cache.past.len() {
            return Err(Error::Msg(format!("{} sequences for a cache of {}", seqs.len(), cache.past.len())));
        }
        let m = &self.host;
        let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        let batch = Batch::new(&lens, &cache.past);
        let ids: Vec<usize> = seqs.iter().flat_map(|s| s.iter().map(|&t| t as usize)).collect();
        if let Some(&bad) = ids.iter().find(|&&t| t >= m.vocab) {
            return Err(Error::Argument {
                op: "ModelCuda::forward_hidden",
                arg: "seqs",
                msg: format!("token id {bad} is outside the vocabulary of {}", m.vocab),
            });
        }
        let mut x = gather_rows_cuda(self.embed.as_ref().unwrap_or(&self.lm_head), &ids)?;
        let (mut li, mut ai, mut mi) = (0, 0, 0);
        // Each residual add is fused into the norm that follows it: the FFN output of a layer
        // waits in `pending` for the next layer's input norm (or the final norm).
        let mut pending: Option<CudaTensor> = None;
        let norm = |x: &mut CudaTensor, pending: Option<CudaTensor>, w: &CudaTensor| match pending {
            Some(f) => add_rms_norm_cuda(x, &f, w, m.eps, m.norm_offset),
            None => rms_norm_cuda(x, w, m.eps, m.norm_offset, None),
        };
        for layer in &self.layers {
            let h = norm(&mut x, pending.take(), &layer.input_norm)?;
            let y = match &layer.mixer {
                MixerCuda::Gdn(g) => {
                    li += 1;
                    g.forward(&h, &batch, &mut cache.linear[li - 1])?
                }
                MixerCuda::Kda(k) => {
                    li += 1;
                    k.forward(&h, &batch, &mut cache.linear[li - 1])?
                }
                MixerCuda::Attention(a) => {
                    ai += 1;
                    a.forward(&h, &batch, &mut cache.attn[ai - 1])?
                }
                MixerCuda::Mla(a) => {
                    mi += 1;
                    a.forward(&h, &batch, &mut cache.mla[mi - 1])?
                }
            };
            let h = norm(&mut x, Some(y), &layer.post_norm)?;
            pending = Some(layer.ffn.forward(&h)?);
        }
        cache.past.iter_mut().zip(&lens).for_each(|(p, l)| *p += l);
        norm(&mut x, pending, &self.norm)
    }

    /// Logits `[rows, vocab]` of final hidden states, on the device.
    pub fn logits(&self, hidden: &CudaTensor) -> Result<CudaTensor> {
        matmul_t(hidden, &self.lm_head)
    }

    /// Logits of every token of each sequence (one pass, fresh cache), copied to the host as
    /// f32: `[Σ len, vocab]`.
    pub fn forward_logits(&self, seqs: &[&[u32]]) -> Result<Vec<f32>> {
        let mut cache = self.new_cache(seqs.len());
        let hidden = self.forward_hidden(seqs, &mut cache)?;
        self.logits(&hidden)?.to_host()?.to_vec()
    }

    /// Vocabulary size.
    pub fn vocab(&self) -> usize {
        self.host.vocab
    }
}

impl crate::generate::Backend for ModelCuda {
    type Cache = CacheCuda;
    fn new_cache(&self, n: usize) -> CacheCuda {
        ModelCuda::new_cache(self, n)
    }
    /// The last row of each sequence is gathered on the device for the LM head; only the
    /// `[n, vocab]` logits come to the host.
    fn last_logits(&self, seqs: &[&[u32]], cache: &mut CacheCuda) -> Result<Vec<f32>> {
        let hidden = self.forward_hidden(seqs, cache)?;
        let last: Vec<usize> = seqs
            .iter()
            .scan(0, |end, s| {
                *end += s.len();
                Some(*end - 1)
            })
            .collect();
        self.logits(&gather_rows_cuda(&hidden, &last)?)?.to_host()?.to_vec()
    }
    fn vocab(&self) -> usize {
        self.host.vocab
    }
}
