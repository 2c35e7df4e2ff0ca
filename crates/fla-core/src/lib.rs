//! fla-core: the small tensor core that every other fla-rs crate builds on.
//!
//! A [`Tensor`] is a shape, strides and a dtype ([`DType`]: f32, f64, bf16, f16) over shared CPU
//! storage. [`cpu`] holds the primitives the ops are made of — strided GEMM through
//! `matrixmultiply`, elementwise maps and reductions, all generic over the [`Float`] compute type —
//! and [`safetensors`](crate::io) reading (memory-mapped) and writing. Every fallible call returns
//! the one error type, [`Error`], whose variants name the operation and the argument at fault.
//! [`cuda`] holds the CUDA device (loaded at run time, so nothing here needs CUDA to build or to
//! run on a machine without a GPU) and [`CudaTensor`](cuda::CudaTensor), a tensor in device
//! memory with host↔device copies.
//!
//! ```
//! use fla_core::{DType, Tensor};
//! let a = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0], &[2, 2])?;
//! let b = a.matmul(&a)?;
//! assert_eq!(b.to_vec::<f32>()?, vec![7.0, 10.0, 15.0, 22.0]);
//! assert_eq!(b.to_dtype(DType::BF16)?.dtype(), DType::BF16);
//! # Ok::<(), fla_core::Error>(())
//! ```
#![deny(missing_docs)]

pub mod cpu;
pub mod cuda;
pub mod cuda_blas;
mod dtype;
mod error;
pub mod io;
mod tensor;

pub use cpu::Float;
pub use dtype::{DType, WithDType};
pub use error::{Error, Result};
pub use tensor::{Device, Element, Tensor, TensorMeta};
