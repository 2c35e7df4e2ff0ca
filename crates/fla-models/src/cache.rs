//! The hybrid cache: per linear layer its conv inputs and f32 recurrent state, per softmax layer
//! its keys and values (or MLA latents), and how many tokens each sequence holds.
use fla_nn::attention::KvCache;
use fla_nn::gated_deltanet::GdnCache;
use fla_nn::kda::KdaCache;
use fla_nn::mla::MlaCache;

/// The cache of one layer.
#[derive(Debug, Clone)]
pub enum LayerCache {
    /// Gated DeltaNet: conv inputs + recurrent state.
    Gdn(GdnCache),
    /// Softmax attention: keys and values.
    Attn(KvCache),
    /// Kimi Delta Attention: three conv caches + recurrent state.
    Kda(KdaCache),
    /// Multi-head latent attention: the latent cache.
    Mla(MlaCache),
}

/// The cache of a model for a batch of sequences.
#[derive(Debug, Clone)]
pub struct Cache {
    /// One entry per layer.
    pub layers: Vec<LayerCache>,
    /// Tokens held per sequence.
    pub past: Vec<usize>,
}

impl Cache {
    /// Tokens held by each sequence.
    pub fn seq_lens(&self) -> &[usize] {
        &self.past
    }
}
