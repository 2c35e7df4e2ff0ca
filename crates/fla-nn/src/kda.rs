//! Kimi Delta Attention (KDA), the linear-attention layer of Kimi Linear (`self_attn.*` of the
//! `kda_layers`).
//!
//! ```text
//! q,k,v = silu(conv_{q,k,v}(W_{q,k,v} x))                    three depthwise short convs, [.., H, dk]
//! g     = −exp(A_log[h])·softplus(f_b(f_a(x)) + dt_bias)     per channel, computed in the op
//!   or (safe gate) lower_bound·sigmoid(exp(A_log[h])·(f_b(f_a(x)) + dt_bias)), here
//! β     = sigmoid(b_proj x)                                  per head, computed in the op
//! o     = KDA(l2norm(q)·dk^-1/2, l2norm(k), v, g, β)         chunk form (prefill) | recurrent step (decode)
//! y     = o_proj(RMSNorm_w(o) · sigmoid(g_b(g_a(x))))        per head: norm first, then gate
//! ```
//!
//! The cache of a batch ([`KdaCache`]) holds the last `conv_kernel` inputs of each convolution
//! and the recurrent state `[N, H, dk, dv]` (f32) of each sequence.
use std::sync::Arc;

use fla_core::cuda::{CudaDevice, CudaTensor};
use fla_core::{DType, Error, Result, Tensor};
use fla_ops::{chunk, recurrent, Family, Inputs, Options};

use crate::conv::{ConvState, ShortConv};
use crate::cuda::{check_input, parts, rms_norm_cuda, split_cols_cuda};
use crate::linear_cuda::{conv_recurrence, LinearCacheCuda, Recurrence};
use crate::matmul::matmul_t;
use crate::ops::{rms_norm_gated, GateAct};
use crate::{Batch, Linear, VarBuilder};

/// Sizes of a KDA layer. From a Kimi Linear `config.json`: `hidden = hidden_size`,
/// `heads = linear_attn_config.num_heads`, `head_dim = linear_attn_config.head_dim`,
/// `conv_kernel = linear_attn_config.short_conv_kernel_size`, `rms_norm_eps = rms_norm_eps`.
#[derive(Debug, Clone)]
pub struct KdaConfig {
    /// Model width.
    pub hidden: usize,
    /// Heads (query, key and value heads alike).
    pub heads: usize,
    /// Head dimension (`dk = dv`).
    pub head_dim: usize,
    /// Kernel of the short convolutions (4).
    pub conv_kernel: usize,
    /// Epsilon of the gated output norm `o_norm`.
    pub rms_norm_eps: f32,
    /// Inner width of the low-rank projections `f_a/f_b` and `g_a/g_b`; `None` reads it from
    /// the rows of `f_a_proj.weight` and `g_a_proj.weight` (it equals `head_dim` in Kimi Linear).
    pub low_rank: Option<usize>,
    /// How the decay comes from `f = f_b(f_a(x))`.
    pub gate: KdaGate,
}

/// The decay of a KDA layer, per head `h` and key channel, from `f = f_b(f_a(x))`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum KdaGate {
    /// `g = −exp(A_log[h])·softplus(f + dt_bias)` (Kimi Linear's release; FLA's default).
    #[default]
    Softplus,
    /// `g = lower_bound·sigmoid(exp(A_log[h])·(f + dt_bias))`, bounded to `(lower_bound, 0)`
    /// (FLA's `safe_gate`; config `safe_gate` with `gate_lower_bound`, FLA allows `[−5, 0)`).
    Safe {
        /// The most negative log decay per token, `< 0`.
        lower_bound: f32,
    },
}

/// The cache of a KDA layer for a batch of `N` sequences.
#[derive(Debug, Clone, Default)]
pub struct KdaCache {
    /// Last inputs of the query convolution.
    pub q_conv: ConvState,
    /// Last inputs of the key convolution.
    pub k_conv: ConvState,
    /// Last inputs of the value convolution.
    pub v_conv: ConvState,
    /// Recurrent state `[N, H, dk, dv]` in f32; `None` before the first call.
    pub state: Option<Tensor>,
}

impl KdaCache {
    /// An empty cache; the first call sizes it for its batch.
    pub fn empty() -> Self {
        Self::default()
    }
}

/// The KDA layer (`model.layers.{i}.self_attn.*`).
#[derive(Clone)]
pub struct KimiDeltaAttention {
    cfg: KdaConfig,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    q_conv: ShortConv,
    k_conv: ShortConv,
    v_conv: ShortConv,
    f_a_proj: Linear,
    f_b_proj: Linear,
    b_proj: Linear,
    g_a_proj: Linear,
    g_b_proj: Linear,
    /// `[H]` f32.
    a_log: Tensor,
    /// `[H·dk]` f32.
    dt_bias: Tensor,
    o_norm: Vec<f32>,
    o_proj: Linear,
}

fn low_rank(cfg: &KdaConfig, vb: &VarBuilder, name: &str) -> Result<usize> {
    match cfg.low_rank {
        Some(r) => Ok(r),
        // `Linear::load` checks the full shape `[rank, hidden]` afterwards.
        None => Ok(vb.pp(name).get_any("weight")?.shape().first().copied().unwrap_or(0)),
    }
}

impl KimiDeltaAttention {
    /// Loads the layer's tensors under `vb` (`model.layers.{i}.self_attn`). `A_log` may be stored
    /// `[H]` or `[1,1,H,1]`; `dt_bias` `[H·dk]` or `[H, dk]`.
    pub fn load(cfg: &KdaConfig, vb: &VarBuilder) -> Result<Self> {
        let (h, d) = (cfg.heads, cfg.head_dim);
        for (field, v) in [("heads", h), ("head_dim", d), ("conv_kernel", cfg.conv_kernel), ("hidden", cfg.hidden)] {
            if v == 0 {
                return Err(Error::Config { field: field.into(), msg: "must be positive".into() });
            }
        }
        if let KdaGate::Safe { lower_bound } = cfg.gate {
            if !(lower_bound < 0.0 && lower_bound.is_finite()) {
                return Err(Error::Config {
                    field: "gate_lower_bound".into(),
                    msg: format!("the safe gate needs a finite negative lower bound, got {lower_bound}"),
                });
            }
        }
        let dim = h * d;
        let lin = |name: &str, i: usize, o: usize| Linear::load(&vb.pp(name), i, o, false);
        let conv = |name: &str| ShortConv::load(&vb.pp(name), dim, cfg.conv_kernel);
        let (rf, rg) = (low_rank(cfg, vb, "f_a_proj")?, low_rank(cfg, vb, "g_a_proj")?);
        let a_log = Tensor::from_vec(vb.get_f32("A_log", &[h])?, &[h])?;
        let dt = vb.get_any("dt_bias")?;
        let dt_bias = if dt.shape() == [h, d] { dt.reshape(&[dim])? } else { vb.get("dt_bias", &[dim])? };
        let dt_bias = dt_bias.to_dtype(DType::F32)?;
        Ok(KimiDeltaAttention {
            q_proj: lin("q_proj", cfg.hidden, dim)?,
            k_proj: lin("k_proj", cfg.hidden, dim)?,
            v_proj: lin("v_proj", cfg.hidden, dim)?,
            q_conv: conv("q_conv1d")?,
            k_conv: conv("k_conv1d")?,
            v_conv: conv("v_conv1d")?,
            f_a_proj: lin("f_a_proj", cfg.hidden, rf)?,
            f_b_proj: lin("f_b_proj", rf, dim)?,
            b_proj: lin("b_proj", cfg.hidden, h)?,
            g_a_proj: lin("g_a_proj", cfg.hidden, rg)?,
            g_b_proj: lin("g_b_proj", rg, dim)?,
            a_log,
            dt_bias,
            o_norm: vb.pp("o_norm").get_f32("weight", &[d])?,
            o_proj: lin("o_proj", dim, cfg.hidden)?,
            cfg: cfg.clone(),
        })
    }

    /// `f ← lower_bound·sigmoid(exp(A_log[h])·(f + dt_bias))` over `f [tokens, H, dk]`.
    fn safe_gate(&self, f: &mut [f32], lower_bound: f32) -> Result<()> {
        let (h, d) = (self.cfg.heads, self.cfg.head_dim);
        let (a_log, dt) = (self.a_log.as_slice::<f32>()?, self.dt_bias.as_slice::<f32>()?);
        for row in f.chunks_exact_mut(h * d) {
            for (c, v) in row.iter_mut().enumerate() {
                let z = a_log[c / d].exp() * (*v + dt[c]);
                *v = lower_bound / (1.0 + (-z).exp());
            }
        }
        Ok(())
    }

    /// The layer's sizes.
    pub fn config(&self) -> &KdaConfig {
        &self.cfg
    }

    /// Bytes of weights read per token.
    pub fn weight_bytes(&self) -> usize {
        [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.f_a_proj,
            &self.f_b_proj,
            &self.b_proj,
            &self.g_a_proj,
            &self.g_b_proj,
            &self.o_proj,
        ]
        .iter()
        .map(|l| l.weight_bytes())
        .sum()
    }

    /// `x [tokens, hidden]` → `[tokens, hidden]`, continuing each sequence of `batch` from
    /// `cache` and leaving its new conv inputs and recurrent state there.
    ///
    /// A sequence with `past = 0` starts from zeros (its slot in the cache is reset). A decoding
    /// step (one token per sequence) runs the recurrent step on the cached states in place; any
    /// other call runs the chunk form over the packed batch with the cached states as initial
    /// states. Errors when the cache does not hold the `N` sequences of a batch that has past
    /// tokens, or when `x` is not `[tokens, hidden]`.
    pub fn forward(&self, x: &[f32], batch: &Batch, cache: &mut KdaCache) -> Result<Vec<f32>> {
        const OP: &str = "KimiDeltaAttention::forward";
        let c = &self.cfg;
        let (h, d) = (c.heads, c.head_dim);
        batch.check_rows(OP, x, c.hidden)?;
        let (n, t) = (batch.len(), batch.tokens());
        if t == 0 {
            return Ok(Vec::new());
        }
        self.prepare_cache(batch, cache)?;
        let q = self.q_conv.forward(&self.q_proj.forward(x)?, batch, &mut cache.q_conv);
        let k = self.k_conv.forward(&self.k_proj.forward(x)?, batch, &mut cache.k_conv);
        let v = self.v_conv.forward(&self.v_proj.forward(x)?, batch, &mut cache.v_conv);
        let mut f = self.f_b_proj.forward(&self.f_a_proj.forward(x)?)?;
        if let KdaGate::Safe { lower_bound } = c.gate {
            self.safe_gate(&mut f, lower_bound)?;
        }
        let in_op_gate = c.gate == KdaGate::Softplus;
        let b = self.b_proj.forward(x)?;
        let opts = Options {
            scale: Some(1.0 / (d as f64).sqrt()),
            output_final_state: true,
            use_qk_l2norm_in_kernel: true,
            use_beta_sigmoid_in_kernel: true,
            use_gate_in_kernel: in_op_gate,
        };
        let state = cache
            .state
            .as_mut()
            .ok_or_else(|| Error::Unsupported { op: OP, msg: "cache has no recurrent state".into() })?;
        // Decoding: N sequences of one token, [N, 1, H, dk]; otherwise one packed row [1, T, H, dk].
        let (bsz, len) = if batch.is_decode() { (n, 1) } else { (1, t) };
        let qt = Tensor::from_vec(q, &[bsz, len, h, d])?;
        let kt = Tensor::from_vec(k, &[bsz, len, h, d])?;
        let vt = Tensor::from_vec(v, &[bsz, len, h, d])?;
        let gt = Tensor::from_vec(f, &[bsz, len, h, d])?;
        let bt = Tensor::from_vec(b, &[bsz, len, h])?;
        let inputs = Inputs {
            g: Some(&gt),
            beta: Some(&bt),
            a_log: in_op_gate.then_some(&self.a_log),
            dt_bias: in_op_gate.then_some(&self.dt_bias),
            ..Inputs::new(&qt, &kt, &vt)
        };
        let mut o: Vec<f32> = if batch.is_decode() {
            recurrent::step(Family::Kda, &inputs, &opts, state)?.to_vec()?
        } else {
            let cu = batch.cu_seqlens();
            let inputs = Inputs { initial_state: Some(&*state), cu_seqlens: Some(&cu), ..inputs };
            let out = chunk::forward(Family::Kda, &inputs, &opts)?;
            *state = out
                .final_state
                .ok_or_else(|| Error::Unsupported { op: OP, msg: "chunk form returned no state".into() })?;
            out.o.to_vec()?
        };
        let gate = self.g_b_proj.forward(&self.g_a_proj.forward(x)?)?;
        rms_norm_gated(&mut o, &gate, &self.o_norm, c.rms_norm_eps, GateAct::Sigmoid);
        self.o_proj.forward(&o)
    }

    /// Sizes `cache` for `batch` and zeroes the slots of the sequences that start afresh.
    fn prepare_cache(&self, batch: &Batch, cache: &mut KdaCache) -> Result<()> {
        let c = &self.cfg;
        let (n, h, d) = (batch.len(), c.heads, c.head_dim);
        let conv = n * h * d * c.conv_kernel;
        let shaped = cache.state.as_ref().is_some_and(|s| s.shape() == [n, h, d, d] && s.dtype() == DType::F32)
            && [&cache.q_conv, &cache.k_conv, &cache.v_conv].iter().all(|s| s.data.len() == conv);
        if !shaped {
            if batch.past.iter().any(|&p| p > 0) {
                return Err(Error::size(
                    "KimiDeltaAttention::forward",
                    format!(
                        "batch.past = {:?} continues cached sequences, but the cache does not hold states for {n} \
                         sequences of [H={h}, dk={d}, dv={d}]",
                        batch.past
                    ),
                ));
            }
            *cache = KdaCache {
                q_conv: self.q_conv.empty_state(n),
                k_conv: self.k_conv.empty_state(n),
                v_conv: self.v_conv.empty_state(n),
                state: Some(Tensor::zeros(&[n, h, d, d], DType::F32)),
            };
            return Ok(());
        }
        let fresh: Vec<usize> = (0..n).filter(|&i| batch.past[i] == 0).collect();
        if fresh.is_empty() {
            return Ok(());
        }
        let per_conv = h * d * c.conv_kernel;
        for s in [&mut cache.q_conv, &mut cache.k_conv, &mut cache.v_conv] {
            fresh.iter().for_each(|&i| s.data[i * per_conv..][..per_conv].fill(0.0));
        }
        if let Some(state) = cache.state.as_mut() {
            let s = state.as_mut_slice::<f32>()?;
            fresh.iter().for_each(|&i| s[i * h * d * d..][..h * d * d].fill(0.0));
        }
        Ok(())
    }
}

/// The KDA layer on a CUDA device ([`KimiDeltaAttention::to_cuda`]), the twin of
/// [`KimiDeltaAttention::forward`]: the projections of the input (q, k, v, `f_a`, `b`, `g_a`)
/// stacked into one product and the three convolutions into one (reading q | k | v out of
/// the product and writing them apart), `f_a`, `b` and `g_a` copied apart in one kernel, the
/// second low-rank products `f_b` and `g_b`, the recurrence ([`crate::linear_cuda`]:
/// per-channel decay computed in the op), then the per-head RMSNorm gated by the sigmoid of the
/// output gate. Activations in the weights' dtype.
pub struct KimiDeltaAttentionCuda {
    cfg: KdaConfig,
    /// `[3·H·dk + rf + H + rg, hidden]`: rows `q | k | v [H·dk each] | f_a [rf] | b [H] |
    /// g_a [rg]` (`rf`, `rg` the low ranks).
    proj: CudaTensor,
    /// `[3·H·dk, kernel]` f32: the three convolutions stacked.
    conv: CudaTensor,
    /// `[H·dk, rf]` and `[H·dk, rg]`.
    f_b: CudaTensor,
    g_b: CudaTensor,
    /// `[H]` and `[H·dk]` f32.
    a_log: CudaTensor,
    dt_bias: CudaTensor,
    /// `[dk]` f32.
    o_norm: CudaTensor,
    o_proj: CudaTensor,
}

impl KimiDeltaAttention {
    /// The layer on `dev` with its projection weights in `dtype` (f32, bf16 or f16; the conv,
    /// gate and norm parameters stay f32). FLA's safe gate is not on the GPU yet: a typed error.
    pub fn to_cuda(&self, dev: &Arc<CudaDevice>, dtype: DType) -> Result<KimiDeltaAttentionCuda> {
        if let KdaGate::Safe { .. } = self.cfg.gate {
            return Err(Error::Unsupported {
                op: "KimiDeltaAttention::to_cuda",
                msg: "the safe gate (gate_lower_bound) is not on the GPU yet".into(),
            });
        }
        let up = |t: &Tensor| CudaTensor::from_host(&t.to_dtype(dtype)?, dev);
        let up32 = |v: Vec<f32>, shape: &[usize]| CudaTensor::from_host(&Tensor::from_vec(v, shape)?, dev);
        let (dim, kernel) = (self.cfg.heads * self.cfg.head_dim, self.cfg.conv_kernel);
        let in_projs = [&self.q_proj, &self.k_proj, &self.v_proj, &self.f_a_proj, &self.b_proj, &self.g_a_proj];
        let rows: usize = in_projs.iter().map(|l| l.weight().shape()[0]).sum();
        let mut proj: Vec<f32> = Vec::with_capacity(rows * self.cfg.hidden);
        for l in in_projs {
            proj.extend(l.weight().to_vec::<f32>()?);
        }
        let conv: Vec<f32> =
            [&self.q_conv, &self.k_conv, &self.v_conv].iter().flat_map(|c| c.weight().to_vec()).collect();
        Ok(KimiDeltaAttentionCuda {
            proj: up(&Tensor::from_vec(proj, &[rows, self.cfg.hidden])?)?,
            conv: up32(conv, &[3 * dim, kernel])?,
            f_b: up(self.f_b_proj.weight())?,
            g_b: up(self.g_b_proj.weight())?,
            a_log: CudaTensor::from_host(&self.a_log, dev)?,
            dt_bias: CudaTensor::from_host(&self.dt_bias, dev)?,
            o_norm: up32(self.o_norm.clone(), &[self.cfg.head_dim])?,
            o_proj: up(self.o_proj.weight())?,
            cfg: self.cfg.clone(),
        })
    }
}

impl KimiDeltaAttentionCuda {
    /// `x [tokens, hidden]` (the dtype of the projection weights, on their device) →
    /// `[tokens, hidden]`, continuing each sequence from `cache`: prefill through the chunk form,
    /// a decode batch (one new token per cached sequence) through the recurrent step.
    pub fn forward(&self, x: &CudaTensor, batch: &Batch, cache: &mut LinearCacheCuda) -> Result<CudaTensor> {
        const OP: &str = "KimiDeltaAttentionCuda::forward";
        let c = &self.cfg;
        let tokens = batch.tokens();
        check_input(OP, x, tokens, c.hidden, &self.proj)?;
        let (h, d) = (c.heads, c.head_dim);
        let (rf, rg) = (self.f_b.shape()[1], self.g_b.shape()[1]);
        // [tokens, 3·H·dk + rf + H + rg]: q|k|v, f_a, b, g_a.
        let proj = matmul_t(x, &self.proj)?;
        let [f_a, beta, g_a]: [CudaTensor; 3] = parts(OP, split_cols_cuda(&proj, 3 * h * d, &[rf, h, rg])?)?;
        let r = Recurrence {
            family: Family::Kda,
            heads: [h, h],
            dims: [d, d],
            g: matmul_t(&f_a, &self.f_b)?,
            beta,
            a_log: &self.a_log,
            dt_bias: &self.dt_bias,
        };
        let o = conv_recurrence(OP, &proj, 0, &self.conv, r, batch, cache)?;
        let gate = matmul_t(&g_a, &self.g_b)?.reshape(&[tokens * h, d])?;
        let y = rms_norm_cuda(&o, &self.o_norm, c.rms_norm_eps, 0.0, Some((&gate, GateAct::Sigmoid)))?;
        matmul_t(&y.reshape(&[tokens, h * d])?, &self.o_proj)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    const HIDDEN: usize = 12;
    const H: usize = 2;
    const D: usize = 8;
    const KER: usize = 4;
    const RANK: usize = 5;
    const EPS: f32 = 1e-5;

    fn cfg() -> KdaConfig {
        KdaConfig {
            hidden: HIDDEN,
            heads: H,
            head_dim: D,
            conv_kernel: KER,
            rms_norm_eps: EPS,
            low_rank: None,
            gate: KdaGate::Softplus,
        }
    }

    fn rand_vec(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-1.0f32..1.0) * scale).collect()
    }

    /// Random weights under `self_attn.`, with A_log stored `[1,1,H,1]` as in the checkpoints.
    fn weights(seed: u64) -> HashMap<String, Tensor> {
        let mut rng = StdRng::seed_from_u64(seed);
        let dim = H * D;
        let shapes: Vec<(&str, Vec<usize>, f32)> = vec![
            ("q_proj.weight", vec![dim, HIDDEN], 0.4),
            ("k_proj.weight", vec![dim, HIDDEN], 0.4),
            ("v_proj.weight", vec![dim, HIDDEN], 0.4),
            ("q_conv1d.weight", vec![dim, 1, KER], 0.6),
            ("k_conv1d.weight", vec![dim, 1, KER], 0.6),
            ("v_conv1d.weight", vec![dim, 1, KER], 0.6),
            ("f_a_proj.weight", vec![RANK, HIDDEN], 0.4),
            ("f_b_proj.weight", vec![dim, RANK], 0.4),
            ("b_proj.weight", vec![H, HIDDEN], 0.6),
            ("g_a_proj.weight", vec![RANK, HIDDEN], 0.4),
            ("g_b_proj.weight", vec![dim, RANK], 0.4),
            ("o_norm.weight", vec![D], 1.0),
            ("o_proj.weight", vec![HIDDEN, dim], 0.3),
        ];
        let mut m = HashMap::new();
        for (name, shape, s) in shapes {
            let n = shape.iter().product();
            m.insert(format!("self_attn.{name}"), Tensor::from_vec(rand_vec(&mut rng, n, s), &shape).unwrap());
        }
        let a_log: Vec<f32> = (0..H).map(|_| rng.gen_range(-1.0f32..0.5)).collect();
        m.insert("self_attn.A_log".into(), Tensor::from_vec(a_log, &[1, 1, H, 1]).unwrap());
        let dt: Vec<f32> = rand_vec(&mut rng, dim, 1.0);
        m.insert("self_attn.dt_bias".into(), Tensor::from_vec(dt, &[dim]).unwrap());
        m
    }

    fn layer(m: &HashMap<String, Tensor>) -> KimiDeltaAttention {
        layer_with(m, KdaGate::Softplus)
    }

    fn layer_with(m: &HashMap<String, Tensor>, gate: KdaGate) -> KimiDeltaAttention {
        let cfg = KdaConfig { gate, ..cfg() };
        KimiDeltaAttention::load(&cfg, &VarBuilder::from_tensors(m.clone()).pp("self_attn")).unwrap()
    }

    fn w64(m: &HashMap<String, Tensor>, name: &str) -> Vec<f64> {
        m[&format!("self_attn.{name}")].to_vec::<f64>().unwrap()
    }

    fn matvec(w: &[f64], x: &[f64], out: usize) -> Vec<f64> {
        let i = x.len();
        (0..out).map(|o| (0..i).map(|j| w[o * i + j] * x[j]).sum()).collect()
    }

    /// Token-by-token f64 reference of one sequence from scratch: `x [T, hidden]` → `[T, hidden]`.
    fn reference(m: &HashMap<String, Tensor>, x: &[f32], decay: KdaGate) -> Vec<f64> {
        let dim = H * D;
        let t_len = x.len() / HIDDEN;
        let x: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let (a_log, dt, onw) = (w64(m, "A_log"), w64(m, "dt_bias"), w64(m, "o_norm.weight"));
        let proj = |name: &str, xs: &[f64], out: usize| matvec(&w64(m, name), xs, out);
        let silu = |v: f64| v / (1.0 + (-v).exp());
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        let softplus = |v: f64| if v > 20.0 { v } else { v.exp().ln_1p() };
        // Projections and convolutions over the whole sequence.
        let conv = |name: &str, conv_name: &str| -> Vec<Vec<f64>> {
            let raw: Vec<Vec<f64>> = (0..t_len).map(|t| proj(name, &x[t * HIDDEN..][..HIDDEN], dim)).collect();
            let w = w64(m, conv_name);
            (0..t_len)
                .map(|t| {
                    (0..dim)
                        .map(|c| {
                            let acc: f64 = (0..KER)
                                .filter(|&j| t + j + 1 >= KER)
                                .map(|j| w[c * KER + j] * raw[t + j + 1 - KER][c])
                                .sum();
                            silu(acc)
                        })
                        .collect()
                })
                .collect()
        };
        let (q, k, v) = (
            conv("q_proj.weight", "q_conv1d.weight"),
            conv("k_proj.weight", "k_conv1d.weight"),
            conv("v_proj.weight", "v_conv1d.weight"),
        );
        let mut s = vec![0.0f64; H * D * D];
        let mut y = Vec::new();
        for t in 0..t_len {
            let xt = &x[t * HIDDEN..][..HIDDEN];
            let f = proj("f_b_proj.weight", &proj("f_a_proj.weight", xt, RANK), dim);
            let b = proj("b_proj.weight", xt, H);
            let gate = proj("g_b_proj.weight", &proj("g_a_proj.weight", xt, RANK), dim);
            let mut o = vec![0.0f64; dim];
            for hh in 0..H {
                let l2 = |u: &[f64]| {
                    let r = 1.0 / (u.iter().map(|a| a * a).sum::<f64>() + 1e-6).sqrt();
                    u.iter().map(|a| a * r).collect::<Vec<f64>>()
                };
                let qh: Vec<f64> = l2(&q[t][hh * D..][..D]).iter().map(|a| a / (D as f64).sqrt()).collect();
                let kh = l2(&k[t][hh * D..][..D]);
                let vh = &v[t][hh * D..][..D];
                let beta = sig(b[hh]);
                let sh = &mut s[hh * D * D..][..D * D];
                for i in 0..D {
                    let z = f[hh * D + i] + dt[hh * D + i];
                    let g = match decay {
                        KdaGate::Softplus => -a_log[hh].exp() * softplus(z),
                        KdaGate::Safe { lower_bound } => lower_bound as f64 * sig(a_log[hh].exp() * z),
                    };
                    (0..D).for_each(|j| sh[i * D + j] *= g.exp());
                }
                for j in 0..D {
                    let e: f64 = (0..D).map(|i| sh[i * D + j] * kh[i]).sum();
                    let u = beta * (vh[j] - e);
                    (0..D).for_each(|i| sh[i * D + j] += kh[i] * u);
                }
                let oh: Vec<f64> = (0..D).map(|j| (0..D).map(|i| sh[i * D + j] * qh[i]).sum()).collect();
                let r = 1.0 / (oh.iter().map(|a| a * a).sum::<f64>() / D as f64 + EPS as f64).sqrt();
                for j in 0..D {
                    o[hh * D + j] = oh[j] * r * onw[j] * sig(gate[hh * D + j]);
                }
            }
            y.extend(proj("o_proj.weight", &o, HIDDEN));
        }
        y
    }

    fn rel_err(got: &[f32], want: &[f64]) -> f64 {
        assert_eq!(got.len(), want.len());
        let num: f64 = got.iter().zip(want).map(|(&a, &b)| (a as f64 - b).powi(2)).sum();
        let den: f64 = want.iter().map(|b| b * b).sum();
        assert!(num.is_finite());
        (num / den).sqrt()
    }

    fn rows(x: &[f32], r: std::ops::Range<usize>) -> &[f32] {
        &x[r.start * HIDDEN..r.end * HIDDEN]
    }

    #[test]
    fn forward_matches_f64_token_loop() {
        let m = weights(1);
        let layer = layer(&m);
        let mut rng = StdRng::seed_from_u64(2);
        let lens = [5usize, 70, 1];
        let total: usize = lens.iter().sum();
        let x = rand_vec(&mut rng, total * HIDDEN, 1.0);
        let batch = Batch::new(&lens, &[0, 0, 0]);
        let mut cache = KdaCache::empty();
        let y = layer.forward(&x, &batch, &mut cache).unwrap();
        for r in batch.seqs.clone() {
            let want = reference(&m, rows(&x, r.clone()), KdaGate::Softplus);
            let err = rel_err(rows(&y, r.clone()), &want);
            assert!(err < 1e-4, "rows {r:?}: rel err {err}");
        }
        assert_eq!(cache.state.as_ref().unwrap().shape(), [3, H, D, D]);
    }

    /// The safe gate (`lower_bound·sigmoid(exp(A_log)(f + dt_bias))`, computed in the layer) against
    /// the f64 loop, and prefill + decode of it against one pass.
    #[test]
    fn safe_gate_matches_f64_token_loop() {
        let m = weights(5);
        let gate = KdaGate::Safe { lower_bound: -5.0 };
        let layer = layer_with(&m, gate);
        let mut rng = StdRng::seed_from_u64(6);
        let lens = [70usize, 3];
        let x = rand_vec(&mut rng, 73 * HIDDEN, 1.0);
        let batch = Batch::new(&lens, &[0, 0]);
        let y = layer.forward(&x, &batch, &mut KdaCache::empty()).unwrap();
        for r in batch.seqs.clone() {
            let want = reference(&m, rows(&x, r.clone()), gate);
            let err = rel_err(rows(&y, r.clone()), &want);
            assert!(err < 1e-4, "rows {r:?}: rel err {err}");
            // The softplus gate gives something else on the same weights.
            let other = reference(&m, rows(&x, r.clone()), KdaGate::Softplus);
            assert!(rel_err(rows(&y, r.clone()), &other) > 1e-2, "rows {r:?}: the gate made no difference");
        }
        // Prefill 66 tokens of the first sequence, then decode 4 one at a time.
        let mut cache = KdaCache::empty();
        let mut got = layer.forward(rows(&x, 0..66), &Batch::new(&[66], &[0]), &mut cache).unwrap();
        for t in 66..70 {
            got.extend(layer.forward(rows(&x, t..t + 1), &Batch::new(&[1], &[t]), &mut cache).unwrap());
        }
        let err = rel_err(&got, &reference(&m, rows(&x, 0..70), gate));
        assert!(err < 1e-4, "prefill + decode: rel err {err}");
    }

    #[test]
    fn safe_gate_needs_a_negative_lower_bound() {
        let m = weights(7);
        for lower_bound in [0.0, 1.0, f32::NAN] {
            let cfg = KdaConfig { gate: KdaGate::Safe { lower_bound }, ..cfg() };
            let e = KimiDeltaAttention::load(&cfg, &VarBuilder::from_tensors(m.clone()).pp("self_attn")).err();
            assert!(matches!(&e, Some(Error::Config { field, .. }) if field == "gate_lower_bound"), "{e:?}");
        }
    }

    #[test]
    fn decode_and_continuation_match_one_pass() {
        let m = weights(3);
        let layer = layer(&m);
        let mut rng = StdRng::seed_from_u64(4);
        // Full sequences of 14 and 9 tokens, fed as prefill [6, 2], continuation [4, 3], then decode steps.
        let full = [14usize, 9];
        let xs: Vec<Vec<f32>> = full.iter().map(|&l| rand_vec(&mut rng, l * HIDDEN, 1.0)).collect();
        let want: Vec<Vec<f32>> = xs
            .iter()
            .map(|x| layer.forward(x, &Batch::new(&[x.len() / HIDDEN], &[0]), &mut KdaCache::empty()).unwrap())
            .collect();
        let mut cache = KdaCache::empty();
        let mut pos = [0usize, 0];
        let mut got: Vec<Vec<f32>> = vec![Vec::new(), Vec::new()];
        let steps: Vec<[usize; 2]> = vec![[6, 2], [4, 3], [1, 1], [1, 1], [1, 1], [1, 1]];
        for lens in steps {
            let batch = Batch::new(&lens, &pos);
            let x: Vec<f32> =
                (0..2).flat_map(|i| xs[i][pos[i] * HIDDEN..(pos[i] + lens[i]) * HIDDEN].to_vec()).collect();
            let y = layer.forward(&x, &batch, &mut cache).unwrap();
            for i in 0..2 {
                got[i].extend_from_slice(rows(&y, batch.seqs[i].clone()));
                pos[i] += lens[i];
            }
        }
        for i in 0..2 {
            let n = got[i].len();
            let want64: Vec<f64> = want[i][..n].iter().map(|&v| v as f64).collect();
            let err = rel_err(&got[i], &want64);
            assert!(err < 1e-5, "sequence {i}: rel err {err}");
        }
    }

    #[test]
    fn new_sequence_in_a_used_slot_starts_from_zeros() {
        let m = weights(5);
        let layer = layer(&m);
        let mut rng = StdRng::seed_from_u64(6);
        let x0 = rand_vec(&mut rng, 7 * HIDDEN, 1.0);
        let mut cache = KdaCache::empty();
        layer.forward(&x0, &Batch::new(&[3, 4], &[0, 0]), &mut cache).unwrap();
        // Slot 0 restarts with a new sequence of 5 tokens; slot 1 continues with 2.
        let x1 = rand_vec(&mut rng, 7 * HIDDEN, 1.0);
        let y = layer.forward(&x1, &Batch::new(&[5, 2], &[0, 4]), &mut cache).unwrap();
        let err = rel_err(rows(&y, 0..5), &reference(&m, rows(&x1, 0..5), KdaGate::Softplus));
        assert!(err < 1e-4, "restarted slot: rel err {err}");
        let mut seq1 = rows(&x0, 3..7).to_vec();
        seq1.extend_from_slice(rows(&x1, 5..7));
        let want = reference(&m, &seq1, KdaGate::Softplus);
        let err = rel_err(rows(&y, 5..7), &want[4 * HIDDEN..]);
        assert!(err < 1e-4, "continued slot: rel err {err}");
    }

    #[test]
    fn sequence_without_new_tokens_keeps_its_state() {
        let m = weights(9);
        let layer = layer(&m);
        let mut rng = StdRng::seed_from_u64(10);
        let x = rand_vec(&mut rng, 8 * HIDDEN, 1.0);
        let mut cache = KdaCache::empty();
        layer.forward(&x[..5 * HIDDEN], &Batch::new(&[2, 3], &[0, 0]), &mut cache).unwrap();
        let before = cache.state.as_ref().unwrap().to_vec::<f32>().unwrap();
        layer.forward(&x[5 * HIDDEN..], &Batch::new(&[3, 0], &[2, 3]), &mut cache).unwrap();
        let after = cache.state.as_ref().unwrap().to_vec::<f32>().unwrap();
        let per = H * D * D;
        assert_eq!(before[per..], after[per..]);
        assert_ne!(before[..per], after[..per]);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let m = weights(7);
        let layer = layer(&m);
        let x = vec![0.1f32; 3 * HIDDEN];
        // Wrong row count.
        assert!(layer.forward(&x[..HIDDEN * 2], &Batch::new(&[3], &[0]), &mut KdaCache::empty()).is_err());
        // Past tokens but an empty cache.
        assert!(layer.forward(&x, &Batch::new(&[3], &[5]), &mut KdaCache::empty()).is_err());
        // Cache of another batch size.
        let mut cache = KdaCache::empty();
        layer.forward(&x, &Batch::new(&[1, 2], &[0, 0]), &mut cache).unwrap();
        assert!(layer.forward(&x, &Batch::new(&[3], &[2]), &mut cache).is_err());
        // Missing and misshapen tensors.
        let mut m2 = m.clone();
        m2.remove("self_attn.b_proj.weight");
        assert!(matches!(
            KimiDeltaAttention::load(&cfg(), &VarBuilder::from_tensors(m2).pp("self_attn")),
            Err(Error::MissingTensor { .. })
        ));
        let mut m3 = m.clone();
        m3.insert("self_attn.o_norm.weight".into(), Tensor::zeros(&[D + 1], DType::F32));
        assert!(matches!(
            KimiDeltaAttention::load(&cfg(), &VarBuilder::from_tensors(m3).pp("self_attn")),
            Err(Error::TensorShape { .. })
        ));
        let bad_rank = KdaConfig { low_rank: Some(RANK + 1), ..cfg() };
        assert!(KimiDeltaAttention::load(&bad_rank, &VarBuilder::from_tensors(m).pp("self_attn")).is_err());
    }

    #[test]
    fn loads_the_tiny_kimi_checkpoint() {
        let vb = crate::fixture_weights("kimi_linear_tiny");
        let cfg = KdaConfig {
            hidden: 64,
            heads: 4,
            head_dim: 16,
            conv_kernel: 4,
            rms_norm_eps: 1e-5,
            low_rank: None,
            gate: KdaGate::Softplus,
        };
        let x: Vec<f32> = (0..3 * 64).map(|i| ((i * 37 % 23) as f32 / 23.0 - 0.5) * 2.0).collect();
        for i in 0..3 {
            let layer = KimiDeltaAttention::load(&cfg, &vb.pp(format!("model.layers.{i}.self_attn"))).unwrap();
            let y = layer.forward(&x, &Batch::new(&[3], &[0]), &mut KdaCache::empty()).unwrap();
            assert!(y.len() == 3 * 64 && y.iter().all(|v| v.is_finite()));
        }
    }
}
