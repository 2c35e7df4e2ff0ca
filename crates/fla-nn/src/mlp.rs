//! SwiGLU feed-forward: `down(silu(gate x) ⊙ up x)`.
use std::sync::Arc;

use fla_core::cuda::{CudaDevice, CudaTensor};
use fla_core::{DType, Result, Tensor};

use crate::matmul::{matmul_t, matmul_t_fused, matmul_t_prenorm, PreNorm, Prologue};
use crate::ops::silu;
use crate::{Linear, VarBuilder};

/// A SwiGLU MLP (`gate_proj`, `up_proj`, `down_proj`, no bias).
#[derive(Clone)]
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    /// Loads `gate_proj`, `up_proj` `[intermediate, hidden]` and `down_proj` `[hidden, intermediate]`.
    pub fn load(vb: &VarBuilder, hidden: usize, intermediate: usize) -> Result<Self> {
        Ok(Mlp {
            gate_proj: Linear::load(&vb.pp("gate_proj"), hidden, intermediate, false)?,
            up_proj: Linear::load(&vb.pp("up_proj"), hidden, intermediate, false)?,
            down_proj: Linear::load(&vb.pp("down_proj"), intermediate, hidden, false)?,
        })
    }

    /// An MLP from its three projections (for checkpoints that name them otherwise).
    pub fn from_parts(gate_proj: Linear, up_proj: Linear, down_proj: Linear) -> Self {
        Mlp { gate_proj, up_proj, down_proj }
    }

    /// `x [tokens, hidden]` → `[tokens, hidden]`.
    pub fn forward(&self, x: &[f32]) -> Result<Vec<f32>> {
        let mut g = self.gate_proj.forward(x)?;
        let u = self.up_proj.forward(x)?;
        g.iter_mut().zip(&u).for_each(|(g, &u)| *g = silu(*g) * u);
        self.down_proj.forward(&g)
    }

    /// Bytes of weights read per token.
    pub fn weight_bytes(&self) -> usize {
        self.gate_proj.weight_bytes() + self.up_proj.weight_bytes() + self.down_proj.weight_bytes()
    }
}

/// The SwiGLU MLP on a CUDA device ([`Mlp::to_cuda`]): `down(silu(gate x)·up x)` with the gate
/// and up projections fused into one product and the SwiGLU gate fused into the down product
/// ([`Prologue::SwiGlu`]), the twin of [`Mlp::forward`].
pub struct MlpCuda {
    /// `[2·intermediate, hidden]`: gate rows, then up rows.
    gate_up: CudaTensor,
    /// `[hidden, intermediate]`.
    down_proj: CudaTensor,
}

impl Mlp {
    /// The MLP on `dev` with its weights in `dtype`.
    pub fn to_cuda(&self, dev: &Arc<CudaDevice>, dtype: DType) -> Result<MlpCuda> {
        let (g, u) = (self.gate_proj.weight(), self.up_proj.weight());
        let mut rows: Vec<f32> = g.to_vec()?;
        rows.extend(u.to_vec::<f32>()?);
        let gate_up = Tensor::from_vec(rows, &[2 * g.shape()[0], g.shape()[1]])?.to_dtype(dtype)?;
        Ok(MlpCuda {
            gate_up: CudaTensor::from_host(&gate_up, dev)?,
            down_proj: CudaTensor::from_host(&self.down_proj.weight().to_dtype(dtype)?, dev)?,
        })
    }
}

impl MlpCuda {
    /// `x [tokens, hidden]` in the weights' dtype, on their device → `[tokens, hidden]`.
    pub fn forward(&self, x: &CudaTensor) -> Result<CudaTensor> {
        Ok(matmul_t_fused(matmul_t(x, &self.gate_up)?, &self.down_proj, &Prologue::SwiGlu)?.0)
    }

    /// [`MlpCuda::forward`] of `rms_norm(x + res)`, the residual add and the norm fused into the
    /// gate | up product: returns the output and `x + res` (the residual stream after the add).
    pub fn forward_prenorm(&self, x: CudaTensor, pre: &PreNorm<'_>) -> Result<(CudaTensor, CudaTensor)> {
        let (gate_up, sum) = matmul_t_prenorm(x, &self.gate_up, pre)?;
        Ok((matmul_t_fused(gate_up, &self.down_proj, &Prologue::SwiGlu)?.0, sum))
    }
}
