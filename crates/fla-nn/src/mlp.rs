//! SwiGLU feed-forward: `down(silu(gate x) ⊙ up x)`.
use fla_core::Result;

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
