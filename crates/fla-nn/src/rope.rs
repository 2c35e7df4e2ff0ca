//! Rotary position embedding, rotate-half form, on the first `rot` dims of each head.

/// Partial rotary embedding: dims `[0, rot)` of each head rotate in pairs `(i, i + rot/2)`,
/// the rest pass through.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f64>,
    rot: usize,
}

impl Rope {
    /// `rot` rotated dims (even) with base `theta`: `inv_freq_i = θ^(−2i/rot)`.
    pub fn new(rot: usize, theta: f64) -> Self {
        let inv_freq = (0..rot / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / rot as f64)).collect();
        Rope { inv_freq, rot }
    }

    /// The inverse frequencies in f32, as [`Rope::apply`] uses them (the GPU form's input).
    pub fn inv_freq_f32(&self) -> Vec<f32> {
        self.inv_freq.iter().map(|&f| f as f32).collect()
    }

    /// Rotated dims per head.
    pub fn rot(&self) -> usize {
        self.rot
    }

    /// Rotates every `head_dim`-wide head of the row `x` (one token) at `pos`.
    pub fn apply(&self, x: &mut [f32], head_dim: usize, pos: usize) {
        let half = self.rot / 2;
        let cs: Vec<(f32, f32)> = self
            .inv_freq
            .iter()
            .map(|&f| {
                // The angle in f32, as transformers computes it.
                let a = (pos as f32 * f as f32) as f64;
                (a.cos() as f32, a.sin() as f32)
            })
            .collect();
        for head in x.chunks_mut(head_dim) {
            for (i, &(c, s)) in cs.iter().enumerate() {
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * c - b * s;
                head[i + half] = b * c + a * s;
            }
        }
    }
}
