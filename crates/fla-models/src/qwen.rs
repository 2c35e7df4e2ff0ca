//! Qwen3.5 (`qwen3_5_text`, `qwen3_5`) and Qwen3-Next (`qwen3_next`): Gated DeltaNet and gated
//! softmax attention in a 3:1 layout, zero-centred RMSNorm, dense SwiGLU (Qwen3.5) or a sparse
//! mixture of experts (Qwen3-Next).
use fla_core::Result;
use fla_nn::attention::{AttentionConfig, GatedAttention};
use fla_nn::embedding::Embedding;
use fla_nn::gated_deltanet::{GatedDeltaNet, GatedDeltaNetConfig, ProjLayout};
use fla_nn::mlp::Mlp;
use fla_nn::moe::{QwenMoe, QwenMoeConfig as MoeLayerConfig};
use fla_nn::VarBuilder;
use serde_json::Value;

use crate::config::{unsupported, Fields};
use crate::decoder::{Block, Decoder, Ffn, Head, Mixer};

/// Which Qwen family a config describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QwenArch {
    /// Qwen3.5 / 3.6 text model (`qwen3_5_text`, or `qwen3_5` with `text_config`).
    Qwen3_5,
    /// Qwen3-Next (`qwen3_next`).
    Qwen3Next,
}

/// Mixture-of-experts sizes (Qwen3-Next).
#[derive(Debug, Clone)]
pub struct QwenMoeConfig {
    /// Routed experts.
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Expert FFN width.
    pub moe_intermediate: usize,
    /// Shared expert FFN width.
    pub shared_intermediate: usize,
    /// Renormalise the top-k probabilities.
    pub norm_topk_prob: bool,
    /// Every `sparse_step`-th layer is sparse.
    pub sparse_step: usize,
    /// Layers that stay dense.
    pub mlp_only_layers: Vec<usize>,
}

/// A parsed Qwen config.
#[derive(Debug, Clone)]
pub struct QwenConfig {
    /// Family.
    pub arch: QwenArch,
    /// Vocabulary size.
    pub vocab: usize,
    /// Model width.
    pub hidden: usize,
    /// Dense FFN width.
    pub intermediate: usize,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// Per layer: true for full (softmax) attention, false for Gated DeltaNet.
    pub full_attention: Vec<bool>,
    /// Softmax attention sizes.
    pub attention: AttentionConfig,
    /// Gated DeltaNet sizes.
    pub linear: GatedDeltaNetConfig,
    /// Tied LM head.
    pub tie_word_embeddings: bool,
    /// MoE sizes (Qwen3-Next).
    pub moe: Option<QwenMoeConfig>,
    /// Tensor-name prefix of the decoder (`model.` or `model.language_model.`).
    pub prefix: String,
}

impl QwenConfig {
    /// Parses `config.json` of model_type `qwen3_5_text`, `qwen3_5` or `qwen3_next`.
    pub fn from_json(root: &Value) -> Result<Self> {
        let top = Fields::new(root)?;
        let model_type = top.opt_str("model_type")?.unwrap_or("");
        let (arch, f, prefix) = match model_type {
            "qwen3_5_text" => (QwenArch::Qwen3_5, Fields::new(root)?, "model"),
            "qwen3_5" => {
                let text =
                    top.object("text_config")?.ok_or_else(|| unsupported("text_config", "missing for qwen3_5"))?;
                (QwenArch::Qwen3_5, text, "model.language_model")
            }
            "qwen3_next" => (QwenArch::Qwen3Next, Fields::new(root)?, "model"),
            other => return Err(unsupported("model_type", format!("`{other}` is not a Qwen model type"))),
        };
        f.expect_str("hidden_act", &["silu"])?;
        f.expect_false("attention_bias")?;
        let layers = f.usize("num_hidden_layers")?;
        let full_attention = match f.layer_flags("layer_types", layers, "full_attention", "linear_attention")? {
            Some(flags) => flags,
            None => {
                let every = f.opt_usize("full_attention_interval")?.unwrap_or(4).max(1);
                (0..layers).map(|i| (i + 1) % every == 0).collect()
            }
        };
        let rope = f.object("rope_parameters")?;
        if let Some(r) = &rope {
            r.expect_str("rope_type", &["default"])?;
        }
        f.expect_str("rope_scaling", &[])?;
        let rope_theta = match rope.as_ref().map(|r| r.opt_f64("rope_theta")).transpose()?.flatten() {
            Some(t) => t,
            None => f.opt_f64("rope_theta")?.unwrap_or(10000.0),
        };
        let partial = match rope.as_ref().map(|r| r.opt_f64("partial_rotary_factor")).transpose()?.flatten() {
            Some(p) => p,
            None => f.opt_f64("partial_rotary_factor")?.unwrap_or(0.25),
        };
        let hidden = f.usize("hidden_size")?;
        let heads = f.usize("num_attention_heads")?;
        let kv_heads = f.usize("num_key_value_heads")?;
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(unsupported(
                "num_key_value_heads",
                format!("{kv_heads} does not divide num_attention_heads = {heads}"),
            ));
        }
        let head_dim = f.opt_usize("head_dim")?.unwrap_or(hidden / heads.max(1));
        let rope_dim = ((head_dim as f64) * partial) as usize;
        if rope_dim % 2 != 0 || rope_dim > head_dim {
            return Err(unsupported("partial_rotary_factor", format!("gives {rope_dim} rotated dims of {head_dim}")));
        }
        let eps = f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6) as f32;
        let attention = AttentionConfig {
            hidden,
            heads,
            kv_heads,
            head_dim,
            rope_dim,
            rope_theta,
            eps,
            output_gate: f.opt_bool("attn_output_gate")?.unwrap_or(true),
        };
        let linear = GatedDeltaNetConfig {
            hidden,
            key_heads: f.usize("linear_num_key_heads")?,
            value_heads: f.usize("linear_num_value_heads")?,
            key_dim: f.usize("linear_key_head_dim")?,
            value_dim: f.usize("linear_value_head_dim")?,
            conv_kernel: f.opt_usize("linear_conv_kernel_dim")?.unwrap_or(4),
            eps,
            layout: if arch == QwenArch::Qwen3Next { ProjLayout::Interleaved } else { ProjLayout::Split },
        };
        let moe = match (arch, f.opt_usize("num_experts")?) {
            (QwenArch::Qwen3Next, Some(e)) if e > 0 => Some(QwenMoeConfig {
                experts: e,
                top_k: f.usize("num_experts_per_tok")?,
                moe_intermediate: f.usize("moe_intermediate_size")?,
                shared_intermediate: f.opt_usize("shared_expert_intermediate_size")?.unwrap_or(0),
                norm_topk_prob: f.opt_bool("norm_topk_prob")?.unwrap_or(true),
                sparse_step: f.opt_usize("decoder_sparse_step")?.unwrap_or(1).max(1),
                mlp_only_layers: f.opt_usizes("mlp_only_layers")?.unwrap_or_default(),
            }),
            (QwenArch::Qwen3_5, Some(e)) if e > 0 => {
                return Err(unsupported(
                    "num_experts",
                    "Qwen3.5 mixture-of-experts checkpoints (qwen3_5_moe) are not supported yet",
                ))
            }
            _ => None,
        };
        Ok(QwenConfig {
            arch,
            vocab: f.usize("vocab_size")?,
            hidden,
            intermediate: f.opt_usize("intermediate_size")?.unwrap_or(0),
            eps,
            full_attention,
            attention,
            linear,
            tie_word_embeddings: f
                .opt_bool("tie_word_embeddings")?
                .or(top.opt_bool("tie_word_embeddings")?)
                .unwrap_or(false),
            moe,
            prefix: prefix.to_string(),
        })
    }

    fn sparse_layer(&self, i: usize) -> bool {
        self.moe.as_ref().is_some_and(|m| !m.mlp_only_layers.contains(&i) && (i + 1) % m.sparse_step == 0)
    }
}

/// Builds the decoder of a Qwen3.5 / Qwen3-Next checkpoint.
pub struct Qwen;

impl Qwen {
    /// Loads the model from checkpoint tensors (names as in the HF release).
    pub fn load(cfg: &QwenConfig, vb: &VarBuilder) -> Result<Decoder> {
        let m = vb.pp(&cfg.prefix);
        let h = cfg.hidden;
        let embed = Embedding::load(&m.pp("embed_tokens"), cfg.vocab, h)?;
        let mut layers = Vec::with_capacity(cfg.full_attention.len());
        for (i, &full) in cfg.full_attention.iter().enumerate() {
            let l = m.pp("layers").pp(i);
            let mixer = if full {
                Mixer::Attention(GatedAttention::load(&cfg.attention, &l.pp("self_attn"))?)
            } else {
                Mixer::Gdn(GatedDeltaNet::load(&cfg.linear, &l.pp("linear_attn"))?)
            };
            let ffn = match &cfg.moe {
                Some(moe) if cfg.sparse_layer(i) => {
                    let mc = MoeLayerConfig {
                        hidden: h,
                        num_experts: moe.experts,
                        top_k: moe.top_k,
                        intermediate: moe.moe_intermediate,
                        shared_intermediate: moe.shared_intermediate,
                        norm_topk_prob: moe.norm_topk_prob,
                    };
                    Ffn::QwenMoe(QwenMoe::load(&mc, &l.pp("mlp"))?)
                }
                _ => Ffn::Dense(Mlp::load(&l.pp("mlp"), h, cfg.intermediate)?),
            };
            layers.push(Block::load(&l, h, mixer, ffn)?);
        }
        let head = Head { vocab: cfg.vocab, hidden: h, eps: cfg.eps, norm_offset: 1.0, tied: cfg.tie_word_embeddings };
        Decoder::assemble(vb, &m, embed, layers, head)
    }
}
