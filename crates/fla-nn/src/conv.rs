//! Depthwise causal short convolution with SiLU (`ShortConvolution` / `conv1d` of the linear
//! layers), with its cache: the last `kernel` inputs of each sequence.
use fla_core::Result;

use crate::ops::silu;
use crate::{Batch, VarBuilder};

/// A depthwise causal convolution over `channels` with kernel `kernel`, no bias, SiLU after.
#[derive(Clone)]
pub struct ShortConv {
    /// `[channels, kernel]`.
    weight: Vec<f32>,
    channels: usize,
    kernel: usize,
}

/// Conv cache of a batch: `[N, channels, kernel]`, the last `kernel` inputs of each sequence
/// (zeros before the first token).
#[derive(Debug, Clone, Default)]
pub struct ConvState {
    /// `[N, channels, kernel]`, oldest input first.
    pub data: Vec<f32>,
}

impl ShortConv {
    /// From `weight [channels, kernel]` (row-major f32), as `load` reads it.
    pub fn from_weight(weight: Vec<f32>, channels: usize, kernel: usize) -> Result<Self> {
        if weight.len() != channels * kernel {
            return Err(fla_core::Error::shape(
                "ShortConv::from_weight",
                "weight",
                format!("[channels, kernel] = [{channels}, {kernel}]"),
                &[weight.len()],
            ));
        }
        Ok(ShortConv { weight, channels, kernel })
    }

    /// Loads `weight [channels, 1, kernel]` under `vb`.
    pub fn load(vb: &VarBuilder, channels: usize, kernel: usize) -> Result<Self> {
        Ok(ShortConv { weight: vb.get_f32("weight", &[channels, 1, kernel])?, channels, kernel })
    }

    /// The taps `[channels, kernel]`.
    pub fn weight(&self) -> &[f32] {
        &self.weight
    }

    /// An empty cache for `n` sequences.
    pub fn empty_state(&self, n: usize) -> ConvState {
        ConvState { data: vec![0.0; n * self.channels * self.kernel] }
    }

    /// `x [tokens, channels]` → `silu(conv(x))`, continuing each sequence from `state` and
    /// leaving its last `kernel` inputs there.
    pub fn forward(&self, x: &[f32], batch: &Batch, state: &mut ConvState) -> Vec<f32> {
        let (c, w) = (self.channels, self.kernel);
        if state.data.len() != batch.len() * c * w {
            *state = self.empty_state(batch.len());
        }
        // Taps as [kernel, channels] so that every loop below runs along the channels.
        let mut taps = vec![0.0f32; w * c];
        for ch in 0..c {
            for j in 0..w {
                taps[j * c + ch] = self.weight[ch * w + j];
            }
        }
        let mut y = vec![0.0f32; x.len()];
        for (n, rows) in batch.seqs.iter().enumerate() {
            let st = &mut state.data[n * c * w..][..c * w];
            // The cached inputs, oldest first, followed by the new rows: [kernel + len, channels].
            let mut ext = vec![0.0f32; (w + rows.len()) * c];
            for ch in 0..c {
                for j in 0..w {
                    ext[j * c + ch] = st[ch * w + j];
                }
            }
            ext[w * c..].copy_from_slice(&x[rows.start * c..rows.end * c]);
            for (i, t) in rows.clone().enumerate() {
                let out = &mut y[t * c..][..c];
                for j in 0..w {
                    let (tap, inp) = (&taps[j * c..][..c], &ext[(i + 1 + j) * c..][..c]);
                    out.iter_mut().zip(tap.iter().zip(inp)).for_each(|(o, (&a, &b))| *o += a * b);
                }
                out.iter_mut().for_each(|v| *v = silu(*v));
            }
            let last = &ext[rows.len() * c..];
            for ch in 0..c {
                for j in 0..w {
                    st[ch * w + j] = last[j * c + ch];
                }
            }
        }
        y
    }
}
