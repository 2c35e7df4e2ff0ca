//! Kimi Linear (`kimi_linear`): Kimi Delta Attention and multi-head latent attention (NoPE) in
//! a 3:1 layout, plain RMSNorm, a dense first layer and DeepSeek-V3-style sigmoid-routed experts.
use fla_core::Result;
use fla_nn::embedding::Embedding;
use fla_nn::kda::{KdaConfig, KdaGate, KimiDeltaAttention};
use fla_nn::mla::{MlaConfig, MultiLatentAttention};
use fla_nn::mlp::Mlp;
use fla_nn::moe::{KimiMoe, KimiMoeConfig};
use fla_nn::VarBuilder;
use serde_json::Value;

use crate::config::{unsupported, Fields};
use crate::decoder::{Block, Decoder, Ffn, Head, Mixer};

/// A parsed Kimi Linear config.
#[derive(Debug, Clone)]
pub struct KimiConfig {
    /// Vocabulary size.
    pub vocab: usize,
    /// Model width.
    pub hidden: usize,
    /// Dense FFN width.
    pub intermediate: usize,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// Per layer: true for MLA, false for KDA.
    pub full_attention: Vec<bool>,
    /// Per layer: true for a sparse (MoE) FFN.
    pub sparse: Vec<bool>,
    /// KDA sizes.
    pub kda: KdaConfig,
    /// MLA sizes.
    pub mla: MlaConfig,
    /// MoE sizes.
    pub moe: Option<KimiMoeConfig>,
    /// Tied LM head.
    pub tie_word_embeddings: bool,
}

impl KimiConfig {
    /// Parses `config.json` of model_type `kimi_linear` (the release's fields or transformers 5.x's).
    pub fn from_json(root: &Value) -> Result<Self> {
        let f = Fields::new(root)?;
        if f.opt_str("model_type")? != Some("kimi_linear") {
            return Err(unsupported("model_type", "expected `kimi_linear`"));
        }
        f.expect_str("hidden_act", &["silu"])?;
        f.expect_false("attention_bias")?;
        f.expect_str("moe_router_activation_func", &["sigmoid"])?;
        let layers = f.usize("num_hidden_layers")?;
        let hidden = f.usize("hidden_size")?;
        let lin = f.object("linear_attn_config")?;
        let lin_usize = |key: &str, flat: &str| -> Result<usize> {
            match lin.as_ref().map(|l| l.opt_usize(key)).transpose()?.flatten() {
                Some(v) => Ok(v),
                None => f.usize(flat),
            }
        };
        let full_attention = match f.layer_flags("layer_types", layers, "full_attention", "linear_attention")? {
            Some(flags) => flags,
            None => {
                let full =
                    lin.as_ref().map(|l| l.opt_usizes("full_attn_layers")).transpose()?.flatten().ok_or_else(|| {
                        unsupported("linear_attn_config.full_attn_layers", "missing (and no layer_types)")
                    })?;
                // The release lists layers 1-indexed.
                (0..layers).map(|i| full.contains(&(i + 1))).collect()
            }
        };
        let sparse = match f.layer_flags("mlp_layer_types", layers, "sparse", "dense")? {
            Some(flags) => flags,
            None => {
                let first_dense = f.opt_usize("first_k_dense_replace")?.unwrap_or(0);
                let freq = f.opt_usize("moe_layer_freq")?.unwrap_or(1).max(1);
                (0..layers).map(|i| i >= first_dense && i % freq == 0).collect()
            }
        };
        let eps = f.opt_f64("rms_norm_eps")?.unwrap_or(1e-5) as f32;
        // Later Kimi Linear variants: the bounded "safe" gate (top level or in
        // linear_attn_config), and an MLA output gate this crate does not implement.
        let lin_or_top = |key: &str| lin.as_ref().and_then(|l| l.get(key)).or_else(|| f.get(key));
        let safe = match lin_or_top("safe_gate") {
            None => false,
            Some(v) => v.as_bool().ok_or_else(|| unsupported("safe_gate", format!("expected a boolean, got {v}")))?,
        };
        let gate = if safe {
            let lb = match lin_or_top("gate_lower_bound") {
                None => -5.0,
                Some(v) => {
                    v.as_f64().ok_or_else(|| unsupported("gate_lower_bound", format!("expected a number, got {v}")))?
                }
            };
            KdaGate::Safe { lower_bound: lb as f32 }
        } else {
            KdaGate::Softplus
        };
        if f.opt_bool("mla_use_output_gate")? == Some(true) {
            return Err(unsupported(
                "mla_use_output_gate",
                "the gated MLA output of later Kimi variants is not supported",
            ));
        }
        let kda = KdaConfig {
            hidden,
            heads: lin_usize("num_heads", "linear_num_heads")?,
            head_dim: lin_usize("head_dim", "linear_head_dim")?,
            conv_kernel: lin_usize("short_conv_kernel_size", "linear_conv_kernel_dim")?,
            rms_norm_eps: eps,
            low_rank: None,
            gate,
        };
        let mla = MlaConfig {
            hidden,
            heads: f.usize("num_attention_heads")?,
            q_lora_rank: f.opt_usize("q_lora_rank")?,
            kv_lora_rank: f.usize("kv_lora_rank")?,
            qk_nope_head_dim: f.usize("qk_nope_head_dim")?,
            qk_rope_head_dim: f.usize("qk_rope_head_dim")?,
            v_head_dim: f.usize("v_head_dim")?,
            // transformers and Moonshot build kv_a_layernorm with RMSNorm's default epsilon.
            norm_eps: 1e-6,
        };
        if f.opt_bool("mla_use_nope")? == Some(false) {
            return Err(unsupported("mla_use_nope", "rotary MLA is not supported (Kimi Linear uses NoPE)"));
        }
        let moe = if sparse.iter().any(|&s| s) {
            let experts = match f.opt_usize("num_experts")? {
                Some(e) => e,
                None => f.usize("n_routed_experts")?,
            };
            let top_k = match f.opt_usize("num_experts_per_token")? {
                Some(k) => k,
                None => f.usize("num_experts_per_tok")?,
            };
            let moe_i = f.usize("moe_intermediate_size")?;
            let grouped = f.opt_bool("use_grouped_topk")?.unwrap_or(true);
            Some(KimiMoeConfig {
                hidden,
                num_experts: experts,
                top_k,
                intermediate: moe_i,
                shared_intermediate: moe_i * f.opt_usize("num_shared_experts")?.unwrap_or(0),
                renormalize: f.opt_bool("moe_renormalize")?.or(f.opt_bool("norm_topk_prob")?).unwrap_or(true),
                routed_scaling_factor: f.opt_f64("routed_scaling_factor")?.unwrap_or(1.0) as f32,
                n_group: if grouped { f.opt_usize("num_expert_group")?.unwrap_or(1) } else { 1 },
                topk_group: if grouped { f.opt_usize("topk_group")?.unwrap_or(1) } else { 1 },
            })
        } else {
            None
        };
        Ok(KimiConfig {
            vocab: f.usize("vocab_size")?,
            hidden,
            intermediate: f.opt_usize("intermediate_size")?.unwrap_or(0),
            eps,
            full_attention,
            sparse,
            kda,
            mla,
            moe,
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
        })
    }
}

/// Builds the decoder of a Kimi Linear checkpoint.
pub struct Kimi;

impl Kimi {
    /// Loads the model from checkpoint tensors (names as in the HF release; the dense FFN under
    /// `mlp.*` or transformers 5.x's `block_sparse_moe.*`).
    pub fn load(cfg: &KimiConfig, vb: &VarBuilder) -> Result<Decoder> {
        let m = vb.pp("model");
        let h = cfg.hidden;
        let embed = Embedding::load(&m.pp("embed_tokens"), cfg.vocab, h)?;
        let mut layers = Vec::with_capacity(cfg.full_attention.len());
        for (i, (&full, &sparse)) in cfg.full_attention.iter().zip(&cfg.sparse).enumerate() {
            let l = m.pp("layers").pp(i);
            let mixer = if full {
                Mixer::Mla(MultiLatentAttention::load(&cfg.mla, &l.pp("self_attn"))?)
            } else {
                Mixer::Kda(KimiDeltaAttention::load(&cfg.kda, &l.pp("self_attn"))?)
            };
            let ffn = match &cfg.moe {
                Some(moe) if sparse => Ffn::KimiMoe(KimiMoe::load(moe, &l.pp("block_sparse_moe"))?),
                _ => {
                    let dense =
                        if l.pp("mlp").contains("gate_proj.weight") { l.pp("mlp") } else { l.pp("block_sparse_moe") };
                    Ffn::Dense(Mlp::load(&dense, h, cfg.intermediate)?)
                }
            };
            layers.push(Block::load(&l, h, mixer, ffn)?);
        }
        let head = Head { vocab: cfg.vocab, hidden: h, eps: cfg.eps, norm_offset: 0.0, tied: cfg.tie_word_embeddings };
        Decoder::assemble(vb, &m, embed, layers, head)
    }
}
