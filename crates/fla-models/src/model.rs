//! Loading any supported checkpoint directory and running it.
use std::path::Path;

use fla_core::{Error, Result};
use fla_nn::Batch;

use crate::cache::Cache;
use crate::checkpoint::{read_config, var_builder};
use crate::qwen::{Qwen, QwenConfig};

/// A loaded causal language model of any supported family.
pub enum Model {
    /// Qwen3.5 / Qwen3-Next.
    Qwen(Qwen),
}

impl Model {
    /// Loads `dir` (config.json + safetensors), dispatching on `model_type`.
    pub fn load(dir: &Path) -> Result<Self> {
        let json = read_config(dir)?;
        let model_type = json.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
        match model_type {
            "qwen3_5_text" | "qwen3_5" | "qwen3_next" => {
                let cfg = QwenConfig::from_json(&json)?;
                Ok(Model::Qwen(Qwen::load(cfg, &var_builder(dir)?)?))
            }
            other => Err(Error::Config {
                field: "model_type".into(),
                msg: format!("`{other}` is not supported (supported: qwen3_5_text, qwen3_5, qwen3_next, kimi_linear)"),
            }),
        }
    }

    /// An empty cache for `n` sequences.
    pub fn new_cache(&self, n: usize) -> Cache {
        match self {
            Model::Qwen(m) => m.new_cache(n),
        }
    }

    /// Vocabulary size.
    pub fn vocab(&self) -> usize {
        match self {
            Model::Qwen(m) => m.vocab(),
        }
    }

    /// Bytes of weights one decoding step reads.
    pub fn weight_bytes_per_token(&self) -> usize {
        match self {
            Model::Qwen(m) => m.weight_bytes_per_token(),
        }
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
        let hidden = match self {
            Model::Qwen(m) => m.forward_hidden(&ids, &batch, cache)?,
        };
        cache.past.iter_mut().zip(&lens).for_each(|(p, l)| *p += l);
        Ok((hidden, batch))
    }

    /// Logits `[rows, vocab]` of final hidden states.
    pub fn logits(&self, hidden: &[f32]) -> Vec<f32> {
        match self {
            Model::Qwen(m) => m.logits(hidden),
        }
    }

    /// Logits of every token of each sequence (one pass, fresh cache): `[Σ len, vocab]`.
    pub fn forward_logits(&self, seqs: &[&[u32]]) -> Result<Vec<f32>> {
        let mut cache = self.new_cache(seqs.len());
        let (hidden, _) = self.forward_hidden(seqs, &mut cache)?;
        Ok(self.logits(&hidden))
    }
}
