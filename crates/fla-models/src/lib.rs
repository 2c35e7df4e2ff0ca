//! fla-models: linear-attention hybrid language models from Hugging Face checkpoints.
//!
//! [`Model::load`] reads a checkpoint directory (`config.json`, `model.safetensors` or its
//! shards) of Qwen3.5, Qwen3-Next or Kimi Linear; [`Cache`] holds what decoding carries per
//! sequence (conv inputs and f32 recurrent states of the linear layers, keys and values of the
//! softmax layers); [`generate`] samples text from a batch of prompts.
//!
//! ```no_run
//! use fla_models::{generate, Model};
//! let model = Model::load(std::path::Path::new("qwen3_5_tiny"))?;
//! let params = generate::Params { max_new_tokens: 8, ..Default::default() };
//! let out = generate::generate(&model, &[vec![1, 2, 3]], &params, |_, _| {})?;
//! println!("{:?}", out[0]);
//! # Ok::<(), fla_core::Error>(())
//! ```
#![deny(missing_docs)]

pub mod cache;
pub mod checkpoint;
pub mod config;
pub mod cuda;
mod decoder;
pub mod generate;
pub mod kimi;
mod model;
pub mod qwen;
pub mod tokenizer;

pub use cache::Cache;
pub use decoder::Decoder;
pub use model::Model;
pub use tokenizer::Tokenizer;
