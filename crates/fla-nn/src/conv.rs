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
    /// Loads `weight [channels, 1, kernel]` under `vb`.
    pub fn load(vb: &VarBuilder, channels: usize, kernel: usize) -> Result<Self> {
        Ok(ShortConv { weight: vb.get_f32("weight", &[channels, 1, kernel])?, channels, kernel })
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
        let mut y = vec![0.0f32; x.len()];
        for (n, rows) in batch.seqs.iter().enumerate() {
            let st = &mut state.data[n * c * w..][..c * w];
            for ch in 0..c {
                // Window of the last w inputs of this channel, oldest first.
                let mut win: Vec<f32> = st[ch * w..][..w].to_vec();
                let wt = &self.weight[ch * w..][..w];
                for t in rows.clone() {
                    win.rotate_left(1);
                    win[w - 1] = x[t * c + ch];
                    let acc: f32 = win.iter().zip(wt).map(|(a, b)| a * b).sum();
                    y[t * c + ch] = silu(acc);
                }
                st[ch * w..][..w].copy_from_slice(&win);
            }
        }
        y
    }
}
