//! Loading any supported checkpoint directory and running it.
use std::path::Path;

use fla_core::{Error, Result};
use fla_nn::Batch;

use crate::cache::Cache;
use crate::checkpoint::{read_config, var_builder};
use crate::decoder::Decoder;
use crate::kimi::{Kimi, KimiConfig};
use crate::qwen::{Qwen, QwenConfig};

/// A loaded causal language model of any supported family.
pub struct Model {
    pub(crate) decoder: Decoder,
    model_type: String,
}

impl Model {
    /// Loads `dir` (config.json + safetensors), dispatching on `model_type`.
    pub fn load(dir: &Path) -> Result<Self> {
        let json = read_config(dir)?;
        let model_type = json.get("model_type").and_then(|v| v.as_str()).unwrap_or("").to_string();
        let decoder = match model_type.as_str() {
            "qwen3_5_text" | "qwen3_5" | "qwen3_next" => {
                let cfg = QwenConfig::from_json(&json)?;
                Qwen::load(&cfg, &var_builder(dir)?)?
            }
            "kimi_linear" => {
                let cfg = KimiConfig::from_json(&json)?;
                Kimi::load(&cfg, &var_builder(dir)?)?
            }
            other => {
                return Err(Error::Config {
                    field: "model_type".into(),
                    msg: format!(
                        "`{other}` is not supported (supported: qwen3_5_text, qwen3_5, qwen3_next, kimi_linear)"
                    ),
                })
            }
        };
        Ok(Model { decoder, model_type })
    }

    /// A model around an already built decoder (random-weight benchmarks, tests).
    pub fn from_decoder(decoder: Decoder, model_type: &str) -> Self {
        Model { decoder, model_type: model_type.to_string() }
    }

    /// The config's `model_type`.
    pub fn model_type(&self) -> &str {
        &self.model_type
    }

    /// An empty cache for `n` sequences.
    pub fn new_cache(&self, n: usize) -> Cache {
        self.decoder.new_cache(n)
    }

    /// Vocabulary size.
    pub fn vocab(&self) -> usize {
        self.decoder.vocab()
    }

    /// Bytes of weights one decoding step reads.
    pub fn weight_bytes_per_token(&self) -> usize {
        self.decoder.weight_bytes_per_token()
    }

    /// Runs `seqs[i]` (new tokens of sequence `i`, continuing its cache) and returns the final
    /// hidden states `[tokens, hidden]`, packed in order.
    pub fn forward_hidden(&self, seqs: &[&[u32]], cache: &mut Cache) -> Result<(Vec<f32>, Batch)> {
        if seqs.len() != cache.past.len() {
            return Err(Error::Msg(format!("{} sequences for a cache of {}", seqs.len(), cache.past.len())));
        }
        let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        let batch = Batch::new(&lens, &cache.past);
        let ids: Vec<u32> = seqs.iter().flat_map(|s| s.iter().copied()).collect();
        let hidden = self.decoder.forward_hidden(&ids, &batch, cache)?;
        cache.past.iter_mut().zip(&lens).for_each(|(p, l)| *p += l);
        Ok((hidden, batch))
    }

    /// Logits `[rows, vocab]` of final hidden states.
    pub fn logits(&self, hidden: &[f32]) -> Result<Vec<f32>> {
        self.decoder.logits(hidden)
    }

    /// Logits of every token of each sequence (one pass, fresh cache): `[Σ len, vocab]`.
    pub fn forward_logits(&self, seqs: &[&[u32]]) -> Result<Vec<f32>> {
        let mut cache = self.new_cache(seqs.len());
        let (hidden, _) = self.forward_hidden(seqs, &mut cache)?;
        self.logits(&hidden)
    }
}
