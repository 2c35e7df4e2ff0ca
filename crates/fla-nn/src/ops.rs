//! Elementwise and row-wise functions on f32 activations (row-major `[rows, features]` slices).
use fla_core::cpu::dot;
use rayon::prelude::*;

/// `x·σ(x)`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `1 / (1 + e^{−x})`.
#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `ln(1 + eˣ)`, linear above 20 as in torch.
#[inline]
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// Which function gates a gated RMSNorm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateAct {
    /// `silu(z)` (Qwen's Gated DeltaNet).
    Silu,
    /// `sigmoid(z)` (KDA, GDN-2).
    Sigmoid,
}

/// RMSNorm of each `dim`-wide row in place: `x·rsqrt(mean(x²) + eps)·(offset + w)`, with
/// `offset = 1` for Qwen's zero-centred weights and 0 for plain weights.
pub fn rms_norm(x: &mut [f32], w: &[f32], eps: f32, offset: f32) {
    let dim = w.len();
    x.par_chunks_mut(dim).with_min_len(16).for_each(|row| {
        let r = 1.0 / (dot(row, row) / dim as f32 + eps).sqrt();
        row.iter_mut().zip(w).for_each(|(v, &w)| *v = *v * r * (offset + w));
    });
}

/// Gated RMSNorm of each `dim`-wide row in place: `norm(x)·w·act(z)` (norm first, then gate).
pub fn rms_norm_gated(x: &mut [f32], z: &[f32], w: &[f32], eps: f32, act: GateAct) {
    let dim = w.len();
    x.par_chunks_mut(dim).zip(z.par_chunks(dim)).with_min_len(16).for_each(|(row, z)| {
        let r = 1.0 / (dot(row, row) / dim as f32 + eps).sqrt();
        for ((v, &w), &z) in row.iter_mut().zip(w).zip(z) {
            let g = match act {
                GateAct::Silu => silu(z),
                GateAct::Sigmoid => sigmoid(z),
            };
            *v = *v * r * w * g;
        }
    });
}

/// Softmax of `x` in place.
pub fn softmax(x: &mut [f32]) {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut s = 0.0;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        s += *v;
    }
    x.iter_mut().for_each(|v| *v /= s);
}

/// `x·rsqrt(Σx² + 1e-6)` of each `dim`-wide row in place (FLA's in-kernel L2 norm).
pub fn l2norm(x: &mut [f32], dim: usize) {
    x.par_chunks_mut(dim).with_min_len(16).for_each(|row| {
        let r = 1.0 / (dot(row, row) + 1e-6).sqrt();
        row.iter_mut().for_each(|v| *v *= r);
    });
}
