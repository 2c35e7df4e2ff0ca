//! Text generation: packed variable-length prefill through the chunk form, then one token per
//! sequence per step through the recurrent step, sampling each next token.
use fla_core::Result;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::Model;

/// Sampling and stopping parameters (transformers' `generate` semantics).
#[derive(Debug, Clone)]
pub struct Params {
    /// Tokens to generate at most, per sequence.
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 (or `greedy`) takes the arg-max.
    pub temperature: f32,
    /// Always take the arg-max.
    pub greedy: bool,
    /// Keep the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens with probability ≥ `top_p` (1: all).
    pub top_p: f32,
    /// Divide positive (multiply negative) logits of tokens already seen by this (1: off).
    pub repetition_penalty: f32,
    /// RNG seed.
    pub seed: u64,
    /// A sequence stops after emitting one of these.
    pub stop_tokens: Vec<u32>,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            max_new_tokens: 32,
            temperature: 1.0,
            greedy: true,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
            stop_tokens: Vec::new(),
        }
    }
}

/// Picks the next token from `logits` given the tokens `seen` so far.
pub fn sample(logits: &mut [f32], seen: &[u32], p: &Params, rng: &mut StdRng) -> u32 {
    if p.repetition_penalty != 1.0 {
        // Once per distinct token, as transformers does.
        let mut done = std::collections::HashSet::new();
        for &t in seen {
            if let (true, Some(l)) = (done.insert(t), logits.get_mut(t as usize)) {
                *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
            }
        }
    }
    let argmax = || {
        logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0 as u32
    };
    if p.greedy || p.temperature <= 0.0 {
        return argmax();
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if p.top_k > 0 {
        idx.truncate(p.top_k);
    }
    let m = logits[idx[0]];
    let mut probs: Vec<f32> = idx.iter().map(|&i| ((logits[i] - m) / p.temperature).exp()).collect();
    let total: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|q| *q /= total);
    if p.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs.iter().position(|&q| {
            acc += q;
            acc >= p.top_p
        });
        let keep = keep.map_or(probs.len(), |k| k + 1);
        probs.truncate(keep);
        idx.truncate(keep);
    }
    let total: f32 = probs.iter().sum();
    let mut r = rng.gen::<f32>() * total;
    for (i, &q) in probs.iter().enumerate() {
        r -= q;
        if r <= 0.0 {
            return idx[i] as u32;
        }
    }
    idx[probs.len() - 1] as u32
}

/// What [`generate`] needs of a model: a cache for `n` sequences, the logits of each sequence's
/// last new token after a forward over the new tokens, and the vocabulary size. [`Model`] (CPU)
/// and [`crate::cuda::ModelCuda`] (GPU) implement it.
pub trait Backend {
    /// The per-sequence state carried between calls.
    type Cache;
    /// An empty cache for `n` sequences.
    fn new_cache(&self, n: usize) -> Self::Cache;
    /// Runs `seqs[i]` (new tokens of sequence `i`) and returns the logits of each sequence's last
    /// new token, `[n, vocab]`.
    fn last_logits(&self, seqs: &[&[u32]], cache: &mut Self::Cache) -> Result<Vec<f32>>;
    /// Vocabulary size.
    fn vocab(&self) -> usize;
}

impl Backend for Model {
    type Cache = crate::Cache;
    fn new_cache(&self, n: usize) -> crate::Cache {
        Model::new_cache(self, n)
    }
    fn last_logits(&self, seqs: &[&[u32]], cache: &mut crate::Cache) -> Result<Vec<f32>> {
        let (hidden, batch) = self.forward_hidden(seqs, cache)?;
        let h = hidden.len() / batch.tokens().max(1);
        let last: Vec<f32> =
            batch.seqs.iter().flat_map(|r| hidden[(r.end - 1) * h..r.end * h].iter().copied()).collect();
        self.logits(&last)
    }
    fn vocab(&self) -> usize {
        Model::vocab(self)
    }
}

/// Generates continuations of every prompt (a batch of different lengths). `on_token(i, t)` is
/// called as soon as sequence `i` emits token `t` (streaming). Returns the new tokens of each.
pub fn generate<B: Backend>(
    model: &B,
    prompts: &[Vec<u32>],
    p: &Params,
    mut on_token: impl FnMut(usize, u32),
) -> Result<Vec<Vec<u32>>> {
    let n = prompts.len();
    if prompts.iter().any(|s| s.is_empty()) {
        return Err(fla_core::Error::Msg("every prompt needs at least one token".into()));
    }
    let mut rng = StdRng::seed_from_u64(p.seed);
    let mut cache = model.new_cache(n);
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut done = vec![p.max_new_tokens == 0; n];
    let seqs: Vec<&[u32]> = prompts.iter().map(|s| &s[..]).collect();
    let mut logits = model.last_logits(&seqs, &mut cache)?;
    loop {
        let v = model.vocab();
        let mut next = vec![0u32; n];
        for i in 0..n {
            if done[i] {
                continue;
            }
            let seen: Vec<u32> = prompts[i].iter().chain(&out[i]).copied().collect();
            let mut l = logits[i * v..][..v].to_vec();
            let t = sample(&mut l, &seen, p, &mut rng);
            next[i] = t;
            out[i].push(t);
            on_token(i, t);
            if p.stop_tokens.contains(&t) || out[i].len() >= p.max_new_tokens {
                done[i] = true;
            }
        }
        if done.iter().all(|&d| d) {
            return Ok(out);
        }
        let steps: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let seqs: Vec<&[u32]> = steps.iter().map(|s| &s[..]).collect();
        logits = model.last_logits(&seqs, &mut cache)?;
    }
}
