//! Sparse mixture-of-experts feed-forward blocks.
//!
//! - [`QwenMoe`] (Qwen3-Next, Qwen3.5-MoE; `mlp.*`): softmax router in f32, top-k, optional
//!   renormalisation, plus one shared expert gated by `sigmoid(shared_expert_gate · x)`.
//! - [`KimiMoe`] (Kimi Linear, DeepSeek-V3 "noaux_tc"; `block_sparse_moe.*`): sigmoid scores,
//!   selection by top-k of `scores + e_score_correction_bias` (optionally group-limited), weights
//!   from the plain scores, renormalised (`Σ + 1e-20`) and scaled by `routed_scaling_factor`, plus
//!   ungated shared experts.
//!
//! Each token is routed on its own; each selected expert then runs once, as one batched call over
//! the rows of the tokens that chose it. Top-k follows `torch.topk`: largest first, ties to the
//! lower index, NaN above everything.
use std::cmp::Ordering;
use std::sync::Arc;

use fla_core::cuda::{CudaDevice, CudaTensor};
use fla_core::{DType, Error, Result};
use rayon::prelude::*;

use crate::cuda::{gather_rows_cuda, scatter_add_rows_cuda};
use crate::matmul::matmul_t;
use crate::mlp::{Mlp, MlpCuda};
use crate::ops::{sigmoid, softmax};
use crate::{Linear, VarBuilder};

/// The experts chosen for each token and their weights: `[tokens, top_k]` each, in rank order.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// Experts per slot.
    pub top_k: usize,
    /// Expert indices `[tokens, top_k]`.
    pub experts: Vec<usize>,
    /// Weights `[tokens, top_k]`.
    pub weights: Vec<f32>,
}

impl Routing {
    /// The `(token, weight)` pairs routed to each of `experts` experts, tokens ascending.
    pub fn per_expert(&self, experts: usize) -> Vec<Vec<(usize, f32)>> {
        let mut lists: Vec<Vec<(usize, f32)>> = vec![Vec::new(); experts];
        for (slot, (&e, &w)) in self.experts.iter().zip(&self.weights).enumerate() {
            lists[e].push((slot / self.top_k.max(1), w));
        }
        lists
    }
}

/// A block's routing rule without its weights: router logits `[tokens, E]` in, [`Routing`] out.
/// The CPU blocks apply it to their router's output; [`MoeCuda`] to the logits it computes on the
/// GPU.
#[derive(Debug, Clone)]
pub enum Router {
    /// [`QwenMoe`]'s softmax top-k.
    Qwen(QwenMoeConfig),
    /// [`KimiMoe`]'s biased sigmoid top-k, with `e_score_correction_bias`.
    Kimi(KimiMoeConfig, Vec<f32>),
}

impl Router {
    /// The routing of every token from its router logits `[tokens, E]`.
    pub fn route(&self, mut logits: Vec<f32>) -> Routing {
        match self {
            Router::Qwen(c) => {
                let (e, k) = (c.num_experts, c.top_k);
                let mut routing = Routing { top_k: k, experts: Vec::new(), weights: Vec::new() };
                for p in logits.chunks_mut(e) {
                    softmax(p);
                    let idx = top_k(p, k);
                    let mut w: Vec<f32> = idx.iter().map(|&i| p[i]).collect();
                    if c.norm_topk_prob {
                        let s: f32 = w.iter().sum();
                        w.iter_mut().for_each(|v| *v /= s);
                    }
                    routing.experts.extend(idx);
                    routing.weights.extend(w);
                }
                routing
            }
            Router::Kimi(c, bias) => {
                let (e, k) = (c.num_experts, c.top_k);
                let per_group = e / c.n_group;
                let mut routing = Routing { top_k: k, experts: Vec::new(), weights: Vec::new() };
                for l in logits.chunks(e) {
                    let s: Vec<f32> = l.iter().map(|&v| sigmoid(v)).collect();
                    let mut choice: Vec<f32> = s.iter().zip(bias).map(|(s, b)| s + b).collect();
                    if c.n_group > 1 {
                        // Group score: the sum of its two best biased scores; keep the best
                        // `topk_group` groups.
                        let group: Vec<f32> =
                            choice.chunks(per_group).map(|g| top_k(g, 2).iter().map(|&i| g[i]).sum()).collect();
                        let keep = top_k(&group, c.topk_group);
                        for (gi, g) in choice.chunks_mut(per_group).enumerate() {
                            if !keep.contains(&gi) {
                                g.fill(f32::NEG_INFINITY);
                            }
                        }
                    }
                    let idx = top_k(&choice, k);
                    let mut w: Vec<f32> = idx.iter().map(|&i| s[i]).collect();
                    if c.renormalize {
                        let d = w.iter().sum::<f32>() + 1e-20;
                        w.iter_mut().for_each(|v| *v /= d);
                    }
                    w.iter_mut().for_each(|v| *v *= c.routed_scaling_factor);
                    routing.experts.extend(idx);
                    routing.weights.extend(w);
                }
                routing
            }
        }
    }
}

/// Descending order as `torch.topk` ranks: NaN first, then larger values, ties by lower index.
fn rank(s: &[f32], a: usize, b: usize) -> Ordering {
    let (x, y) = (s[a], s[b]);
    let by_value = match (x.is_nan(), y.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        _ => y.partial_cmp(&x).unwrap_or(Ordering::Equal),
    };
    by_value.then(a.cmp(&b))
}

/// Indices of the `k` largest entries of `s`, largest first; on ties the lower index first.
pub fn top_k(s: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..s.len()).collect();
    let k = k.min(s.len());
    if k == 0 {
        return Vec::new();
    }
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, |&a, &b| rank(s, a, b));
        idx.truncate(k);
    }
    idx.sort_unstable_by(|&a, &b| rank(s, a, b));
    idx
}

/// Loads `n` SwiGLU experts under `vb` (the `experts` prefix): the fused layout
/// `gate_up_proj [E, 2I, H]` (gate rows first) + `down_proj [E, H, I]` when present, otherwise
/// per-expert `{e}.{gate}|{up}|{down}.weight` with the given names.
fn load_experts(vb: &VarBuilder, n: usize, hidden: usize, inter: usize, names: [&str; 3]) -> Result<Vec<Mlp>> {
    if vb.contains("gate_up_proj") {
        let gate_up = vb.get("gate_up_proj", &[n, 2 * inter, hidden])?;
        let down = vb.get("down_proj", &[n, hidden, inter])?;
        return (0..n)
            .map(|e| {
                let gu = gate_up.narrow(0, e, 1)?.reshape(&[2 * inter, hidden])?;
                let g = Linear::new(gu.narrow(0, 0, inter)?, None)?;
                let u = Linear::new(gu.narrow(0, inter, inter)?, None)?;
                let d = Linear::new(down.narrow(0, e, 1)?.reshape(&[hidden, inter])?, None)?;
                Ok(Mlp::from_parts(g, u, d))
            })
            .collect();
    }
    (0..n)
        .map(|e| {
            let v = vb.pp(e);
            Ok(Mlp::from_parts(
                Linear::load(&v.pp(names[0]), hidden, inter, false)?,
                Linear::load(&v.pp(names[1]), hidden, inter, false)?,
                Linear::load(&v.pp(names[2]), inter, hidden, false)?,
            ))
        })
        .collect()
}

/// `Σ_k w_k · expert_k(x)` for each token: the tokens of each selected expert are gathered and
/// run through it in one call, experts in parallel, and added back in expert order.
fn run_experts(experts: &[Mlp], x: &[f32], hidden: usize, routing: &Routing) -> Result<Vec<f32>> {
    let lists = routing.per_expert(experts.len());
    let outs: Vec<(usize, Vec<f32>)> = lists
        .par_iter()
        .enumerate()
        .filter(|(_, l)| !l.is_empty())
        .map(|(e, l)| {
            let xs: Vec<f32> = l.iter().flat_map(|&(t, _)| x[t * hidden..][..hidden].iter().copied()).collect();
            experts[e].forward(&xs).map(|y| (e, y))
        })
        .collect::<Result<_>>()?;
    let mut out = vec![0.0f32; x.len()];
    for (e, y) in outs {
        for (&(t, w), yr) in lists[e].iter().zip(y.chunks(hidden)) {
            out[t * hidden..][..hidden].iter_mut().zip(yr).for_each(|(o, &v)| *o += w * v);
        }
    }
    Ok(out)
}

fn check_x(op: &'static str, x: &[f32], hidden: usize) -> Result<()> {
    if x.len() % hidden != 0 {
        return Err(Error::shape(op, "x", format!("[tokens, hidden = {hidden}] as a flat slice"), &[x.len()]));
    }
    Ok(())
}

fn check_counts(experts: usize, top_k: usize, hidden: usize, inter: usize) -> Result<()> {
    let bad = |field: &str, msg: String| Err(Error::Config { field: field.into(), msg });
    if hidden == 0 || inter == 0 {
        return bad("hidden_size / moe_intermediate_size", "must be positive".into());
    }
    if experts == 0 {
        return bad("num_experts", "must be positive".into());
    }
    if top_k == 0 || top_k > experts {
        return bad("num_experts_per_tok", format!("must lie in 1..={experts}, got {top_k}"));
    }
    Ok(())
}

/// Sizes and routing options of a Qwen3-Next MoE block. From `config.json`: `hidden = hidden_size`,
/// `num_experts`, `top_k = num_experts_per_tok`, `intermediate = moe_intermediate_size`,
/// `shared_intermediate = shared_expert_intermediate_size`, `norm_topk_prob`.
#[derive(Debug, Clone)]
pub struct QwenMoeConfig {
    /// Model width.
    pub hidden: usize,
    /// Routed experts.
    pub num_experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Intermediate width of each routed expert.
    pub intermediate: usize,
    /// Intermediate width of the shared expert; 0 when there is none.
    pub shared_intermediate: usize,
    /// Renormalise the top-k probabilities to sum to 1.
    pub norm_topk_prob: bool,
}

/// Qwen3-Next's sparse MoE block (`model.layers.{i}.mlp.*`).
#[derive(Clone)]
pub struct QwenMoe {
    cfg: QwenMoeConfig,
    gate: Linear,
    experts: Vec<Mlp>,
    shared: Option<(Mlp, Linear)>,
}

impl QwenMoe {
    /// Loads `gate.weight [E, hidden]`, the experts (per-expert `experts.{e}.{gate,up,down}_proj`
    /// or fused `experts.gate_up_proj [E, 2I, hidden]` + `experts.down_proj [E, hidden, I]`) and,
    /// when `shared_intermediate > 0`, `shared_expert.*` and `shared_expert_gate.weight [1, hidden]`.
    pub fn load(cfg: &QwenMoeConfig, vb: &VarBuilder) -> Result<Self> {
        check_counts(cfg.num_experts, cfg.top_k, cfg.hidden, cfg.intermediate)?;
        let names = ["gate_proj", "up_proj", "down_proj"];
        let shared = if cfg.shared_intermediate > 0 {
            Some((
                Mlp::load(&vb.pp("shared_expert"), cfg.hidden, cfg.shared_intermediate)?,
                Linear::load(&vb.pp("shared_expert_gate"), cfg.hidden, 1, false)?,
            ))
        } else {
            None
        };
        Ok(QwenMoe {
            gate: Linear::load(&vb.pp("gate"), cfg.hidden, cfg.num_experts, false)?,
            experts: load_experts(&vb.pp("experts"), cfg.num_experts, cfg.hidden, cfg.intermediate, names)?,
            shared,
            cfg: cfg.clone(),
        })
    }

    /// The block's sizes.
    pub fn config(&self) -> &QwenMoeConfig {
        &self.cfg
    }

    /// Bytes of weights one token reads: router, `top_k` experts and the shared expert.
    pub fn weight_bytes(&self) -> usize {
        self.gate.weight_bytes()
            + self.cfg.top_k * self.experts[0].weight_bytes()
            + self.shared.as_ref().map_or(0, |(m, g)| m.weight_bytes() + g.weight_bytes())
    }

    /// Router decisions for `x [tokens, hidden]`: `softmax(gate x)` in f32, top-k, renormalised
    /// when `norm_topk_prob`.
    pub fn route(&self, x: &[f32]) -> Result<Routing> {
        check_x("QwenMoe::route", x, self.cfg.hidden)?;
        Ok(Router::Qwen(self.cfg.clone()).route(self.gate.forward(x)?))
    }

    /// `x [tokens, hidden]` → `[tokens, hidden]`.
    pub fn forward(&self, x: &[f32]) -> Result<Vec<f32>> {
        let routing = self.route(x)?;
        let hidden = self.cfg.hidden;
        let mut out = run_experts(&self.experts, x, hidden, &routing)?;
        if let Some((mlp, gate)) = &self.shared {
            let y = mlp.forward(x)?;
            let g = gate.forward(x)?;
            for ((o, y), &g) in out.chunks_mut(hidden).zip(y.chunks(hidden)).zip(&g) {
                let s = sigmoid(g);
                o.iter_mut().zip(y).for_each(|(o, &y)| *o += s * y);
            }
        }
        Ok(out)
    }
}

/// Sizes and routing options of a Kimi Linear (DeepSeek-V3 style) MoE block. From Kimi's
/// `config.json`: `hidden = hidden_size`, `num_experts`, `top_k = num_experts_per_token`,
/// `intermediate = moe_intermediate_size`, `shared_intermediate = moe_intermediate_size ·
/// num_shared_experts`, `renormalize = moe_renormalize`, `routed_scaling_factor`,
/// `n_group = num_expert_group`, `topk_group`.
#[derive(Debug, Clone)]
pub struct KimiMoeConfig {
    /// Model width.
    pub hidden: usize,
    /// Routed experts.
    pub num_experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Intermediate width of each routed expert.
    pub intermediate: usize,
    /// Intermediate width of the shared experts (all of them, fused); 0 when there are none.
    pub shared_intermediate: usize,
    /// Renormalise the selected scores to sum to 1 (`Σ + 1e-20`).
    pub renormalize: bool,
    /// Factor on the routed weights (after renormalisation).
    pub routed_scaling_factor: f32,
    /// Expert groups (1: plain top-k).
    pub n_group: usize,
    /// Groups kept per token before the top-k (by the sum of each group's two best biased scores).
    pub topk_group: usize,
}

/// Kimi Linear's sparse MoE block (`model.layers.{i}.block_sparse_moe.*`).
#[derive(Clone)]
pub struct KimiMoe {
    cfg: KimiMoeConfig,
    gate: Linear,
    bias: Vec<f32>,
    experts: Vec<Mlp>,
    shared: Option<Mlp>,
}

impl KimiMoe {
    /// Loads `gate.weight [E, hidden]`, `gate.e_score_correction_bias [E]`, the experts
    /// (per-expert `experts.{e}.w1|w3|w2` = gate|up|down, or fused `experts.gate_up_proj` +
    /// `experts.down_proj`) and, when `shared_intermediate > 0`, `shared_experts.{gate,up,down}_proj`.
    pub fn load(cfg: &KimiMoeConfig, vb: &VarBuilder) -> Result<Self> {
        check_counts(cfg.num_experts, cfg.top_k, cfg.hidden, cfg.intermediate)?;
        let bad = |field: &str, msg: String| Err(Error::Config { field: field.into(), msg });
        if cfg.n_group == 0 || cfg.num_experts % cfg.n_group != 0 {
            return bad(
                "num_expert_group",
                format!("must divide num_experts = {}, got {}", cfg.num_experts, cfg.n_group),
            );
        }
        if cfg.topk_group == 0 || cfg.topk_group > cfg.n_group {
            return bad("topk_group", format!("must lie in 1..={}, got {}", cfg.n_group, cfg.topk_group));
        }
        if cfg.top_k > cfg.topk_group * (cfg.num_experts / cfg.n_group) {
            return bad(
                "num_experts_per_token",
                format!("{} exceeds the experts of {} groups", cfg.top_k, cfg.topk_group),
            );
        }
        let shared = if cfg.shared_intermediate > 0 {
            Some(Mlp::load(&vb.pp("shared_experts"), cfg.hidden, cfg.shared_intermediate)?)
        } else {
            None
        };
        Ok(KimiMoe {
            gate: Linear::load(&vb.pp("gate"), cfg.hidden, cfg.num_experts, false)?,
            bias: vb.pp("gate").get_f32("e_score_correction_bias", &[cfg.num_experts])?,
            experts: load_experts(
                &vb.pp("experts"),
                cfg.num_experts,
                cfg.hidden,
                cfg.intermediate,
                ["w1", "w3", "w2"],
            )?,
            shared,
            cfg: cfg.clone(),
        })
    }

    /// The block's sizes.
    pub fn config(&self) -> &KimiMoeConfig {
        &self.cfg
    }

    /// Bytes of weights one token reads: router, `top_k` experts and the shared experts.
    pub fn weight_bytes(&self) -> usize {
        self.gate.weight_bytes()
            + self.cfg.top_k * self.experts[0].weight_bytes()
            + self.shared.as_ref().map_or(0, |m| m.weight_bytes())
    }

    /// Router decisions for `x [tokens, hidden]`: `s = sigmoid(gate x)` in f32, experts by
    /// (group-limited) top-k of `s + e_score_correction_bias`, weights `s` of those experts,
    /// renormalised and scaled.
    pub fn route(&self, x: &[f32]) -> Result<Routing> {
        check_x("KimiMoe::route", x, self.cfg.hidden)?;
        Ok(Router::Kimi(self.cfg.clone(), self.bias.clone()).route(self.gate.forward(x)?))
    }

    /// `x [tokens, hidden]` → `[tokens, hidden]`.
    pub fn forward(&self, x: &[f32]) -> Result<Vec<f32>> {
        let routing = self.route(x)?;
        let mut out = run_experts(&self.experts, x, self.cfg.hidden, &routing)?;
        if let Some(mlp) = &self.shared {
            out.iter_mut().zip(mlp.forward(x)?).for_each(|(o, y)| *o += y);
        }
        Ok(out)
    }
}

/// A mixture of experts on a CUDA device ([`QwenMoe::to_cuda`], [`KimiMoe::to_cuda`]), the twin
/// of their `forward`: the router's product on the GPU, the routing decisions on the host from
/// its logits (one small copy per call), then each selected expert once over the rows of its
/// tokens ([`gather_rows_cuda`]), added back weighted ([`scatter_add_rows_cuda`]) in expert
/// order, in the activations' dtype as HF does, then the shared expert(s).
pub struct MoeCuda {
    router: Router,
    /// `[E, hidden]`.
    gate: CudaTensor,
    experts: Vec<MlpCuda>,
    shared: Option<MlpCuda>,
    /// Qwen's `shared_expert_gate [1, hidden]`.
    shared_gate: Option<CudaTensor>,
}

fn experts_to_cuda(experts: &[Mlp], dev: &Arc<CudaDevice>, dtype: DType) -> Result<Vec<MlpCuda>> {
    experts.iter().map(|m| m.to_cuda(dev, dtype)).collect()
}

impl QwenMoe {
    /// The block on `dev` with its weights in `dtype`.
    pub fn to_cuda(&self, dev: &Arc<CudaDevice>, dtype: DType) -> Result<MoeCuda> {
        let up = |l: &Linear| CudaTensor::from_host(&l.weight().to_dtype(dtype)?, dev);
        Ok(MoeCuda {
            router: Router::Qwen(self.cfg.clone()),
            gate: up(&self.gate)?,
            experts: experts_to_cuda(&self.experts, dev, dtype)?,
            shared: self.shared.as_ref().map(|(m, _)| m.to_cuda(dev, dtype)).transpose()?,
            shared_gate: self.shared.as_ref().map(|(_, g)| up(g)).transpose()?,
        })
    }
}

impl KimiMoe {
    /// The block on `dev` with its weights in `dtype`.
    pub fn to_cuda(&self, dev: &Arc<CudaDevice>, dtype: DType) -> Result<MoeCuda> {
        Ok(MoeCuda {
            router: Router::Kimi(self.cfg.clone(), self.bias.clone()),
            gate: CudaTensor::from_host(&self.gate.weight().to_dtype(dtype)?, dev)?,
            experts: experts_to_cuda(&self.experts, dev, dtype)?,
            shared: self.shared.as_ref().map(|m| m.to_cuda(dev, dtype)).transpose()?,
            shared_gate: None,
        })
    }
}

impl MoeCuda {
    /// `x [tokens, hidden]` in the weights' dtype, on their device → `[tokens, hidden]`.
    pub fn forward(&self, x: &CudaTensor) -> Result<CudaTensor> {
        let logits: Vec<f32> = matmul_t(x, &self.gate)?.to_host()?.to_vec()?;
        let routing = self.router.route(logits);
        let mut out = CudaTensor::zeros(x.shape(), x.dtype(), x.cuda_device())?;
        for (e, list) in routing.per_expert(self.experts.len()).iter().enumerate().filter(|(_, l)| !l.is_empty()) {
            let (tokens, weights): (Vec<usize>, Vec<f32>) = list.iter().copied().unzip();
            let y = self.experts[e].forward(&gather_rows_cuda(x, &tokens)?)?;
            scatter_add_rows_cuda(&mut out, &y, Some(&tokens), Some(&weights), None)?;
        }
        if let Some(mlp) = &self.shared {
            let gate = self.shared_gate.as_ref().map(|w| matmul_t(x, w)).transpose()?;
            scatter_add_rows_cuda(&mut out, &mlp.forward(x)?, None, None, gate.as_ref())?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use fla_core::{DType, Tensor};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    const HIDDEN: usize = 10;
    const E: usize = 6;
    const I: usize = 7;
    const SI: usize = 5;

    fn rand_vec(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-1.0f32..1.0) * scale).collect()
    }

    /// Dense f64 weights of one expert: gate `[I, H]`, up `[I, H]`, down `[H, I]`.
    struct Dense {
        gate: Vec<Vec<f32>>,
        up: Vec<Vec<f32>>,
        down: Vec<Vec<f32>>,
    }

    fn dense(rng: &mut StdRng, n: usize, inter: usize) -> Dense {
        let mut one = |rows: usize, cols: usize| (0..n).map(|_| rand_vec(rng, rows * cols, 0.5)).collect();
        Dense { gate: one(inter, HIDDEN), up: one(inter, HIDDEN), down: one(HIDDEN, inter) }
    }

    fn swiglu(d: &Dense, e: usize, x: &[f64]) -> Vec<f64> {
        let inter = d.gate[e].len() / HIDDEN;
        let mv = |w: &[f32], x: &[f64], o: usize| -> Vec<f64> {
            (0..o).map(|r| (0..x.len()).map(|c| w[r * x.len() + c] as f64 * x[c]).sum()).collect()
        };
        let g = mv(&d.gate[e], x, inter);
        let u = mv(&d.up[e], x, inter);
        let h: Vec<f64> = g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
        mv(&d.down[e], &h, HIDDEN)
    }

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape).unwrap()
    }

    fn insert_experts(m: &mut HashMap<String, Tensor>, prefix: &str, d: &Dense, names: [&str; 3], fused: bool) {
        if fused {
            let gu: Vec<f32> = (0..E).flat_map(|e| d.gate[e].iter().chain(&d.up[e]).copied()).collect();
            let down: Vec<f32> = d.down.concat();
            m.insert(format!("{prefix}.experts.gate_up_proj"), t(&gu, &[E, 2 * I, HIDDEN]));
            m.insert(format!("{prefix}.experts.down_proj"), t(&down, &[E, HIDDEN, I]));
        } else {
            for e in 0..E {
                m.insert(format!("{prefix}.experts.{e}.{}.weight", names[0]), t(&d.gate[e], &[I, HIDDEN]));
                m.insert(format!("{prefix}.experts.{e}.{}.weight", names[1]), t(&d.up[e], &[I, HIDDEN]));
                m.insert(format!("{prefix}.experts.{e}.{}.weight", names[2]), t(&d.down[e], &[HIDDEN, I]));
            }
        }
    }

    fn insert_mlp(m: &mut HashMap<String, Tensor>, prefix: &str, d: &Dense) {
        let inter = d.gate[0].len() / HIDDEN;
        m.insert(format!("{prefix}.gate_proj.weight"), t(&d.gate[0], &[inter, HIDDEN]));
        m.insert(format!("{prefix}.up_proj.weight"), t(&d.up[0], &[inter, HIDDEN]));
        m.insert(format!("{prefix}.down_proj.weight"), t(&d.down[0], &[HIDDEN, inter]));
    }

    fn mv64(w: &[f32], x: &[f64], o: usize) -> Vec<f64> {
        (0..o).map(|r| (0..x.len()).map(|c| w[r * x.len() + c] as f64 * x[c]).sum()).collect()
    }

    /// Reference top-k by repeated arg-max (first maximum wins).
    fn argmax_k(s: &[f64], k: usize) -> Vec<usize> {
        let mut taken = vec![false; s.len()];
        (0..k)
            .map(|_| {
                let mut best = usize::MAX;
                for i in 0..s.len() {
                    if !taken[i] && (best == usize::MAX || s[i] > s[best]) {
                        best = i;
                    }
                }
                taken[best] = true;
                best
            })
            .collect()
    }

    fn rel_err(got: &[f32], want: &[f64]) -> f64 {
        let num: f64 = got.iter().zip(want).map(|(&a, &b)| (a as f64 - b).powi(2)).sum();
        let den: f64 = want.iter().map(|b| b * b).sum();
        (num / den).sqrt()
    }

    #[test]
    fn top_k_breaks_ties_like_torch() {
        assert_eq!(top_k(&[0.5, 0.7, 0.5, 0.7, 0.1], 3), vec![1, 3, 0]);
        assert_eq!(top_k(&[1.0, f32::NAN, 2.0], 2), vec![1, 2]);
        assert_eq!(top_k(&[3.0, 1.0], 5), vec![0, 1]);
        assert_eq!(top_k(&[0.0; 4], 2), vec![0, 1]);
        assert!(top_k(&[1.0], 0).is_empty());
    }

    #[test]
    fn qwen_moe_matches_dense_loop_in_both_layouts() {
        let mut rng = StdRng::seed_from_u64(1);
        let experts = dense(&mut rng, E, I);
        let shared = dense(&mut rng, 1, SI);
        let gate = rand_vec(&mut rng, E * HIDDEN, 0.8);
        let sgate = rand_vec(&mut rng, HIDDEN, 0.8);
        let tokens = 9;
        let x = rand_vec(&mut rng, tokens * HIDDEN, 1.0);
        for norm in [true, false] {
            let cfg = QwenMoeConfig {
                hidden: HIDDEN,
                num_experts: E,
                top_k: 2,
                intermediate: I,
                shared_intermediate: SI,
                norm_topk_prob: norm,
            };
            // Dense reference: every expert on every token, weight 0 unless selected.
            let mut want = Vec::new();
            for tk in 0..tokens {
                let xt: Vec<f64> = x[tk * HIDDEN..][..HIDDEN].iter().map(|&v| v as f64).collect();
                let l = mv64(&gate, &xt, E);
                let mx = l.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = l.iter().map(|v| (v - mx).exp()).sum();
                let p: Vec<f64> = l.iter().map(|v| (v - mx).exp() / z).collect();
                let idx = argmax_k(&p, 2);
                let s: f64 = if norm { idx.iter().map(|&i| p[i]).sum() } else { 1.0 };
                let mut y = vec![0.0f64; HIDDEN];
                for (e, &pe) in p.iter().enumerate() {
                    let w = if idx.contains(&e) { pe / s } else { 0.0 };
                    swiglu(&experts, e, &xt).iter().zip(y.iter_mut()).for_each(|(v, y)| *y += w * v);
                }
                let sg = 1.0 / (1.0 + (-mv64(&sgate, &xt, 1)[0]).exp());
                swiglu(&shared, 0, &xt).iter().zip(y.iter_mut()).for_each(|(v, y)| *y += sg * v);
                want.extend(y);
            }
            for fused in [false, true] {
                let mut m = HashMap::new();
                m.insert("mlp.gate.weight".to_string(), t(&gate, &[E, HIDDEN]));
                m.insert("mlp.shared_expert_gate.weight".to_string(), t(&sgate, &[1, HIDDEN]));
                insert_experts(&mut m, "mlp", &experts, ["gate_proj", "up_proj", "down_proj"], fused);
                insert_mlp(&mut m, "mlp.shared_expert", &shared);
                let moe = QwenMoe::load(&cfg, &VarBuilder::from_tensors(m).pp("mlp")).unwrap();
                let got = moe.forward(&x).unwrap();
                let err = rel_err(&got, &want);
                assert!(err < 1e-5, "norm {norm} fused {fused}: rel err {err}");
                // Each token alone gives the same rows as the batch.
                let one = moe.forward(&x[2 * HIDDEN..3 * HIDDEN]).unwrap();
                assert!(rel_err(&one, &want[2 * HIDDEN..3 * HIDDEN]) < 1e-5);
            }
        }
    }

    fn kimi_reference(
        cfg: &KimiMoeConfig,
        gate: &[f32],
        bias: &[f32],
        experts: &Dense,
        shared: &Dense,
        x: &[f32],
    ) -> Vec<f64> {
        let mut want = Vec::new();
        let per = E / cfg.n_group;
        for xt in x.chunks(HIDDEN) {
            let xt: Vec<f64> = xt.iter().map(|&v| v as f64).collect();
            let s: Vec<f64> = mv64(gate, &xt, E).iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect();
            let mut choice: Vec<f64> = s.iter().zip(bias).map(|(s, &b)| s + b as f64).collect();
            let group: Vec<f64> =
                choice.chunks(per).map(|g| argmax_k(g, 2.min(per)).iter().map(|&i| g[i]).sum()).collect();
            let keep = argmax_k(&group, cfg.topk_group);
            for (gi, g) in choice.chunks_mut(per).enumerate() {
                if !keep.contains(&gi) {
                    g.fill(f64::NEG_INFINITY);
                }
            }
            let idx = argmax_k(&choice, cfg.top_k);
            let d: f64 = if cfg.renormalize { idx.iter().map(|&i| s[i]).sum::<f64>() + 1e-20 } else { 1.0 };
            let mut y = vec![0.0f64; HIDDEN];
            for (e, &se) in s.iter().enumerate() {
                let w = if idx.contains(&e) { se / d * cfg.routed_scaling_factor as f64 } else { 0.0 };
                swiglu(experts, e, &xt).iter().zip(y.iter_mut()).for_each(|(v, y)| *y += w * v);
            }
            swiglu(shared, 0, &xt).iter().zip(y.iter_mut()).for_each(|(v, y)| *y += v);
            want.extend(y);
        }
        want
    }

    #[test]
    fn kimi_moe_matches_dense_loop() {
        let mut rng = StdRng::seed_from_u64(2);
        let experts = dense(&mut rng, E, I);
        let shared = dense(&mut rng, 1, SI);
        let gate = rand_vec(&mut rng, E * HIDDEN, 0.8);
        // A large bias on expert 5 makes selection differ from the plain scores.
        let mut bias = rand_vec(&mut rng, E, 0.05);
        bias[5] = 0.9;
        let tokens = 11;
        let x = rand_vec(&mut rng, tokens * HIDDEN, 1.0);
        for (n_group, topk_group, renormalize) in [(1, 1, true), (1, 1, false), (3, 2, true)] {
            let cfg = KimiMoeConfig {
                hidden: HIDDEN,
                num_experts: E,
                top_k: 3,
                intermediate: I,
                shared_intermediate: SI,
                renormalize,
                routed_scaling_factor: 2.446,
                n_group,
                topk_group,
            };
            let want = kimi_reference(&cfg, &gate, &bias, &experts, &shared, &x);
            for fused in [false, true] {
                let mut m = HashMap::new();
                m.insert("moe.gate.weight".to_string(), t(&gate, &[E, HIDDEN]));
                m.insert("moe.gate.e_score_correction_bias".to_string(), t(&bias, &[E]));
                insert_experts(&mut m, "moe", &experts, ["w1", "w3", "w2"], fused);
                insert_mlp(&mut m, "moe.shared_experts", &shared);
                let moe = KimiMoe::load(&cfg, &VarBuilder::from_tensors(m).pp("moe")).unwrap();
                let got = moe.forward(&x).unwrap();
                let err = rel_err(&got, &want);
                assert!(err < 1e-5, "groups {n_group}/{topk_group} renorm {renormalize} fused {fused}: rel err {err}");
                let r = moe.route(&x).unwrap();
                assert!(r.experts.chunks(3).any(|c| c.contains(&5)), "the bias should pull expert 5 in");
            }
        }
    }

    #[test]
    fn bad_configs_and_tensors_are_errors() {
        let mut rng = StdRng::seed_from_u64(3);
        let experts = dense(&mut rng, E, I);
        let mut m = HashMap::new();
        m.insert("moe.gate.weight".to_string(), t(&rand_vec(&mut rng, E * HIDDEN, 1.0), &[E, HIDDEN]));
        m.insert("moe.gate.e_score_correction_bias".to_string(), Tensor::zeros(&[E], DType::F32));
        insert_experts(&mut m, "moe", &experts, ["w1", "w3", "w2"], false);
        let cfg = KimiMoeConfig {
            hidden: HIDDEN,
            num_experts: E,
            top_k: 2,
            intermediate: I,
            shared_intermediate: 0,
            renormalize: true,
            routed_scaling_factor: 1.0,
            n_group: 1,
            topk_group: 1,
        };
        let vb = VarBuilder::from_tensors(m.clone()).pp("moe");
        let moe = KimiMoe::load(&cfg, &vb).unwrap();
        assert!(moe.forward(&[0.0; HIDDEN + 1]).is_err());
        assert_eq!(moe.forward(&[]).unwrap(), Vec::<f32>::new());
        for bad in [
            KimiMoeConfig { top_k: 0, ..cfg.clone() },
            KimiMoeConfig { top_k: E + 1, ..cfg.clone() },
            KimiMoeConfig { n_group: 4, ..cfg.clone() },
            KimiMoeConfig { n_group: 2, topk_group: 3, ..cfg.clone() },
        ] {
            assert!(matches!(KimiMoe::load(&bad, &vb), Err(Error::Config { .. })), "{bad:?}");
        }
        assert!(matches!(
            KimiMoe::load(&KimiMoeConfig { shared_intermediate: 4, ..cfg.clone() }, &vb),
            Err(Error::MissingTensor { .. })
        ));
        assert!(matches!(
            KimiMoe::load(&KimiMoeConfig { intermediate: I + 1, ..cfg.clone() }, &vb),
            Err(Error::TensorShape { .. })
        ));
        let mut m2 = m.clone();
        m2.insert("moe.experts.gate_up_proj".into(), Tensor::zeros(&[E, HIDDEN, 2 * I], DType::F32));
        m2.insert("moe.experts.down_proj".into(), Tensor::zeros(&[E, HIDDEN, I], DType::F32));
        assert!(matches!(KimiMoe::load(&cfg, &VarBuilder::from_tensors(m2).pp("moe")), Err(Error::TensorShape { .. })));
    }

    #[test]
    fn loads_the_tiny_checkpoints() {
        let x: Vec<f32> = (0..3 * 64).map(|i| ((i * 37 % 23) as f32 / 23.0 - 0.5) * 2.0).collect();
        {
            let vb = crate::fixture_weights("kimi_linear_tiny");
            let cfg = KimiMoeConfig {
                hidden: 64,
                num_experts: 4,
                top_k: 2,
                intermediate: 32,
                shared_intermediate: 32,
                renormalize: true,
                routed_scaling_factor: 2.446,
                n_group: 1,
                topk_group: 1,
            };
            for i in 1..4 {
                let moe = KimiMoe::load(&cfg, &vb.pp(format!("model.layers.{i}.block_sparse_moe"))).unwrap();
                assert!(moe.forward(&x).unwrap().iter().all(|v| v.is_finite()));
            }
        }
        {
            let vb = crate::fixture_weights("qwen3_next_tiny");
            let cfg = QwenMoeConfig {
                hidden: 64,
                num_experts: 4,
                top_k: 2,
                intermediate: 32,
                shared_intermediate: 32,
                norm_topk_prob: true,
            };
            let moe = QwenMoe::load(&cfg, &vb.pp("model.layers.0.mlp")).unwrap();
            assert!(moe.forward(&x).unwrap().iter().all(|v| v.is_finite()));
        }
    }
}
