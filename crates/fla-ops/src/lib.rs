//! fla-ops: the linear-attention op family, on the CPU and (the decode step, and the chunk
//! forward of Gated DeltaNet and DeltaNet so far) on CUDA.
//!
//! One generic recurrence serves every variant (see [`naive`] for its definition): a decay
//! ([`Decay`]), an erase ([`Erase`]) and a write ([`Write`]) knob, named by [`Family`] after FLA's
//! op families. Each family runs in three forms that give the same numbers:
//!
//! - [`naive`]: the token-by-token reference, in f32 or f64;
//! - [`chunk`]: the chunkwise WY / UT form (chunk 64), forward and backward; the forward of
//!   Gated DeltaNet and DeltaNet also on a CUDA device ([`chunk::forward_cuda`]);
//! - [`recurrent`]: the fused decode step, updating states in place; on the CPU
//!   ([`recurrent::step`]) or on a CUDA device ([`recurrent::step_cuda`], kernels from
//!   `fla-kernels`).
//!
//! Every form takes the same [`Inputs`] and [`Options`] (FLA's argument names) and checks them
//! first: a bad shape, dtype or `cu_seqlens` is a typed [`fla_core::Error`] naming the argument.
//!
//! ```
//! use fla_core::Tensor;
//! use fla_ops::{chunk, naive, Family, Inputs, Options};
//! let (b, t, h, k) = (1, 70, 2, 8);
//! let x = |n: usize, s: f32| Tensor::from_vec((0..n).map(|i| ((i as f32) * s).sin() * 0.3).collect::<Vec<f32>>(), &[b, t, h, k]).unwrap();
//! let (q, kk, v) = (x(b * t * h * k, 0.7), x(b * t * h * k, 1.3), x(b * t * h * k, 0.2));
//! let g = Tensor::from_vec(vec![-0.1f32; b * t * h], &[b, t, h])?;
//! let beta = Tensor::from_vec(vec![0.5f32; b * t * h], &[b, t, h])?;
//! let inputs = Inputs { g: Some(&g), beta: Some(&beta), ..Inputs::new(&q, &kk, &v) };
//! let opts = Options { use_qk_l2norm_in_kernel: true, ..Options::default() };
//! let fast = chunk::forward(Family::GatedDeltaRule, &inputs, &opts)?;
//! let reference = naive::forward(Family::GatedDeltaRule, &inputs, &opts)?;
//! assert!(fast.o.rel_err(&reference.o)? < 1e-5);
//! # Ok::<(), fla_core::Error>(())
//! ```
#![deny(missing_docs)]

pub mod chunk;
mod cuda;
mod inputs;
pub mod naive;
mod prepare;
pub mod recurrent;
mod variant;
pub mod verify;

pub use inputs::{check_cu_seqlens, Dims, Grads, Inputs, Options, Output, Problem};
pub use variant::{Decay, Erase, Family, Write};
