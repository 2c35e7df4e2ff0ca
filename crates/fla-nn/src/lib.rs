//! fla-nn: the layers of linear-attention hybrid models, built from checkpoint tensors.
//!
//! Layers are plain structs loaded from a [`VarBuilder`] with the checkpoint's own tensor names
//! (`GatedDeltaNet::load(cfg, vb.pp("linear_attn"))`). Activations are f32, row-major
//! `[tokens, features]`, with the sequences of a call packed back to back as described by a
//! [`Batch`]; each layer with a recurrence or a cache takes its own cache struct, kept apart from
//! its weights. Weights stay in their checkpoint dtype ([`Linear`]).
//!
//! ```
//! use fla_nn::{Batch, Linear};
//! use fla_core::Tensor;
//! let lin = Linear::new(Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0], &[2, 2])?, None)?;
//! assert_eq!(lin.forward(&[1.0, 1.0])?, vec![3.0, 7.0]);
//! let batch = Batch::new(&[3, 1], &[0, 5]);
//! assert_eq!(batch.cu_seqlens(), vec![0, 3, 4]);
//! # Ok::<(), fla_core::Error>(())
//! ```
#![deny(missing_docs)]

pub mod attention;
mod batch;
pub mod conv;
pub mod cuda;
pub mod embedding;
pub mod gated_deltanet;
pub mod kda;
mod linear;
pub mod linear_cuda;
pub mod matmul;
pub mod mla;
pub mod mlp;
pub mod moe;
pub mod ops;
pub mod rope;
mod var_builder;

pub use batch::{Batch, BatchTables};
pub use linear::Linear;
pub use var_builder::VarBuilder;

/// The weights of a tiny fixture checkpoint (`../shared/fixtures/models/<name>`) for unit tests;
/// a missing fixture fails the test rather than skipping it.
#[cfg(test)]
pub(crate) fn fixture_weights(name: &str) -> VarBuilder {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/fixtures/models")
        .join(name)
        .join("model.safetensors");
    VarBuilder::from_files(&[&path]).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
}
