//! The decoder on a CUDA device ([`Model::to_cuda`]): the layers' GPU twins
//! ([`fla_nn::gated_deltanet::GatedDeltaNetCuda`], [`fla_nn::kda::KimiDeltaAttentionCuda`],
//! [`fla_nn::attention::GatedAttentionCuda`], [`fla_nn::mla::MultiLatentAttentionCuda`],
//! [`fla_nn::mlp::MlpCuda`], [`fla_nn::moe::MoeCuda`]) in the pre-norm decoder of
//! [`crate::Decoder`], activations in one dtype: Qwen3.5, Qwen3-Next and Kimi Linear.
//! The token embeddings are gathered on the device (from the LM head when it is tied).
//!
//! Decoding ([`crate::generate::Backend::last_logits`] with one new token per cached sequence)
//! replays the whole step as one CUDA graph, captured on the second such step and kept in the
//! cache ([`CacheCuda`]): the token ids and positions are rewritten in place before each replay,
//! the states and conv caches are updated in place, and the graph is captured again when a KV
//! pool grows or the batch changes. A model with mixtures of experts (routing on the host) or
//! multi-latent attention decodes launch by launch; so does any decode when the environment sets
//! `FLA_CUDA_GRAPH=0` or after [`ModelCuda::set_decode_graphs`]`(false)`.
use std::sync::Arc;

use fla_core::cuda::cudarc::driver::CudaGraph;
use fla_core::cuda::{CudaDevice, CudaTensor};
use fla_core::{DType, Error, Result, Tensor};
use fla_nn::attention::{GatedAttentionCuda, KvCacheCuda};
use fla_nn::cuda::{add_rms_norm_cuda, gather_rows_cuda, gather_rows_indexed_cuda, rms_norm_cuda, RowIndices};
use fla_nn::gated_deltanet::GatedDeltaNetCuda;
use fla_nn::kda::KimiDeltaAttentionCuda;
use fla_nn::linear_cuda::LinearCacheCuda;
use fla_nn::matmul::matmul_t;
use fla_nn::matmul::PreNorm;
use fla_nn::mla::{MlaCacheCuda, MultiLatentAttentionCuda};
use fla_nn::mlp::MlpCuda;
use fla_nn::moe::MoeCuda;
use fla_nn::{Batch, BatchTables};

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
    /// Whether decode steps may be captured and replayed as CUDA graphs.
    graphs: bool,
}

/// The model's sizes and norm constants, read on the host.
struct ModelHost {
    eps: f32,
    norm_offset: f32,
    vocab: usize,
}

/// The per-layer caches of a [`ModelCuda`] for a batch of sequences, on its device, and the
/// captured decode step that reads and updates them.
#[derive(Debug, Default)]
pub struct CacheCuda {
    linear: Vec<LinearCacheCuda>,
    attn: Vec<KvCacheCuda>,
    mla: Vec<MlaCacheCuda>,
    /// Tokens each sequence holds.
    pub past: Vec<usize>,
    /// The decode step captured for these caches, once captured.
    graph: Option<DecodeGraph>,
    /// Whether the last call was a decode step run launch by launch (its kernels are loaded, so
    /// the next one may be captured).
    decode_warm: bool,
}

/// One decode step of a [`ModelCuda`] over the buffers of one [`CacheCuda`], as a CUDA graph:
/// it reads the token ids and the batch tables at fixed addresses and writes the logits into a
/// fixed buffer.
struct DecodeGraph {
    graph: CudaGraph,
    ids: RowIndices,
    tables: Arc<BatchTables>,
    /// `[n, vocab]` in the model's dtype, written by each replay.
    logits: CudaTensor,
    /// The KV pool capacity of each attention layer at capture (the launches are planned for it).
    caps: Vec<usize>,
}

impl std::fmt::Debug for DecodeGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodeGraph").field("sequences", &self.ids.len()).field("caps", &self.caps).finish()
    }
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
            graphs: std::env::var("FLA_CUDA_GRAPH").map_or(true, |v| v != "0"),
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
            graph: None,
            decode_warm: false,
        }
    }

    /// Runs `seqs[i]` (new tokens of sequence `i`, continuing its cache) and returns the final
    /// hidden states `[tokens, hidden]` on the device, packed in order.
    pub fn forward_hidden(&self, seqs: &[&[u32]], cache: &mut CacheCuda) -> Result<CudaTensor> {
        let ids = self.check_ids(seqs, cache)?;
        let dev = self.lm_head.cuda_device();
        let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        let batch = Batch::new(&lens, &cache.past).with_tables(dev)?;
        cache.graph = None;
        self.run(&RowIndices::new(dev, &ids, self.host.vocab)?, &batch, cache)
    }

    /// The token ids of `seqs`, packed, after checking them and the batch against `cache`.
    fn check_ids(&self, seqs: &[&[u32]], cache: &CacheCuda) -> Result<Vec<usize>> {
        if seqs.len() != cache.past.len() {
            return Err(Error::Msg(format!("{} sequences for a cache of {}", seqs.len(), cache.past.len())));
        }
        let vocab = self.host.vocab;
        let ids: Vec<usize> = seqs.iter().flat_map(|s| s.iter().map(|&t| t as usize)).collect();
        if let Some(&bad) = ids.iter().find(|&&t| t >= vocab) {
            return Err(Error::Argument {
                op: "ModelCuda::forward_hidden",
                arg: "seqs",
                msg: format!("token id {bad} is outside the vocabulary of {vocab}"),
            });
        }
        Ok(ids)
    }

    /// The layers over the tokens `ids` (on the device) of `batch` (its tables attached),
    /// continuing `cache`: the final hidden states. Enqueues only device work, so a decode step
    /// can be captured.
    fn run(&self, ids: &RowIndices, batch: &Batch, cache: &mut CacheCuda) -> Result<CudaTensor> {
        let m = &self.host;
        let mut x = gather_rows_indexed_cuda(self.embed.as_ref().unwrap_or(&self.lm_head), ids)?;
        let (mut li, mut ai, mut mi) = (0, 0, 0);
        // Each residual add is fused into the norm that follows it: the FFN output of a layer
        // waits in `pending` for the next layer's input norm (or the final norm).
        let mut pending: Option<CudaTensor> = None;
        let norm = |x: &mut CudaTensor, pending: Option<CudaTensor>, w: &CudaTensor| match pending {
            Some(f) => add_rms_norm_cuda(x, &f, w, m.eps, m.norm_offset),
            None => rms_norm_cuda(x, w, m.eps, m.norm_offset, None),
        };
        for layer in &self.layers {
            let y = match (&layer.mixer, pending.take()) {
                // The residual add and the input norm fused into the layer's input product.
                (MixerCuda::Gdn(g), Some(f)) => {
                    li += 1;
                    let pre = PreNorm { res: &f, weight: &layer.input_norm, eps: m.eps, offset: m.norm_offset };
                    let (y, sum) = g.forward_prenorm(x, &pre, batch, &mut cache.linear[li - 1])?;
                    x = sum;
                    y
                }
                (mixer, pending) => {
                    let h = norm(&mut x, pending, &layer.input_norm)?;
                    match mixer {
                        MixerCuda::Gdn(g) => {
                            li += 1;
                            g.forward(&h, batch, &mut cache.linear[li - 1])?
                        }
                        MixerCuda::Kda(k) => {
                            li += 1;
                            k.forward(&h, batch, &mut cache.linear[li - 1])?
                        }
                        MixerCuda::Attention(a) => {
                            ai += 1;
                            a.forward(&h, batch, &mut cache.attn[ai - 1])?
                        }
                        MixerCuda::Mla(a) => {
                            mi += 1;
                            a.forward(&h, batch, &mut cache.mla[mi - 1])?
                        }
                    }
                }
            };
            pending = Some(match &layer.ffn {
                // The residual add and the post-attention norm fused into the gate | up product.
                FfnCuda::Dense(mlp) => {
                    let pre = PreNorm { res: &y, weight: &layer.post_norm, eps: m.eps, offset: m.norm_offset };
                    let (f, sum) = mlp.forward_prenorm(x, &pre)?;
                    x = sum;
                    f
                }
                ffn => {
                    let h = norm(&mut x, Some(y), &layer.post_norm)?;
                    ffn.forward(&h)?
                }
            });
        }
        cache.past.iter_mut().zip(&batch.seqs).for_each(|(p, r)| *p += r.len());
        norm(&mut x, pending, &self.norm)
    }

    /// Whether a decode step can be captured: no layer waits on the host (the mixtures of
    /// experts route on the host; multi-latent attention uploads its cache rows per call).
    fn graphable(&self) -> bool {
        self.graphs
            && self.layers.iter().all(|l| matches!(l.ffn, FfnCuda::Dense(_)) && !matches!(l.mixer, MixerCuda::Mla(_)))
    }

    /// Turns the capture of decode steps as CUDA graphs on (the default, unless the environment
    /// sets `FLA_CUDA_GRAPH=0`) or off (every step launch by launch).
    pub fn set_decode_graphs(&mut self, on: bool) {
        self.graphs = on;
    }

    /// The logits `[n, vocab]` of a decode step (one new token per cached sequence) through the
    /// captured graph, capturing it when the previous step ran launch by launch; `None` when
    /// this step must run launch by launch (the first decode step, a KV pool that must grow, a
    /// model that cannot be captured).
    fn decode_graphed(&self, seqs: &[&[u32]], cache: &mut CacheCuda) -> Result<Option<Vec<f32>>> {
        let decode = seqs.iter().all(|s| s.len() == 1) && !seqs.is_empty() && cache.past.iter().all(|&p| p > 0);
        if !decode || !self.graphable() {
            cache.graph = None;
            cache.decode_warm = false;
            return Ok(None);
        }
        let ids = self.check_ids(seqs, cache)?;
        let need = cache.past.iter().max().map_or(0, |p| p + 1);
        let caps: Vec<usize> = cache.attn.iter().map(|a| a.k.as_ref().map_or(0, |k| k.shape()[1])).collect();
        if caps.iter().any(|&c| c < need) {
            // This step grows the pools launch by launch; the next one is captured.
            cache.graph = None;
            return Ok(None);
        }
        let dev = self.lm_head.cuda_device().clone();
        let n = seqs.len();
        let cu: Vec<usize> = (0..=n).collect();
        match &mut cache.graph {
            Some(g) if g.ids.len() == n && g.caps == caps => {
                g.ids.write(&dev, &ids)?;
                Arc::get_mut(&mut g.tables)
                    .ok_or_else(|| Error::Cuda("the decode graph's batch tables are shared".into()))?
                    .write(&cu, &cache.past)?;
                g.graph.launch()?;
                // What the layers' host code did at capture: the caches hold one more token.
                cache.past.iter_mut().for_each(|p| *p += 1);
                for a in &mut cache.attn {
                    a.len.iter_mut().for_each(|l| *l += 1);
                }
            }
            _ if !cache.decode_warm => {
                cache.decode_warm = true;
                return Ok(None);
            }
            _ => {
                cache.graph = None;
                let ids = RowIndices::new(&dev, &ids, self.host.vocab)?;
                let tables = Arc::new(BatchTables::new(&dev, &cu, &cache.past)?);
                let mut logits = CudaTensor::zeros(&[n, self.host.vocab], self.lm_head.dtype(), &dev)?;
                let mut batch = Batch::new(&vec![1; n], &cache.past);
                batch.tables = Some(tables.clone());
                // Capturing runs the layers' host code (the caches' token counts advance) but
                // none of their GPU work: if it fails, the counts go back.
                let counts = (cache.past.clone(), cache.attn.iter().map(|a| a.len.clone()).collect::<Vec<_>>());
                let captured = dev.capture(|| {
                    let hidden = self.run(&ids, &batch, cache)?;
                    logits.copy_from(&self.logits(&hidden)?)
                });
                let graph = match captured {
                    Ok((graph, ())) => graph,
                    Err(e) => {
                        cache.past = counts.0;
                        cache.attn.iter_mut().zip(counts.1).for_each(|(a, len)| a.len = len);
                        return Err(e);
                    }
                };
                drop(batch);
                graph.launch()?;
                cache.graph = Some(DecodeGraph { graph, ids, tables, logits, caps });
            }
        }
        cache.graph.as_ref().map(|g| g.logits.to_host()?.to_vec()).transpose()
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
        if let Some(logits) = self.decode_graphed(seqs, cache)? {
            return Ok(logits);
        }
        let hidden = self.forward_hidden(seqs, cache)?;
        if seqs.iter().all(|s| s.len() == 1) {
            return self.logits(&hidden)?.to_host()?.to_vec();
        }
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
