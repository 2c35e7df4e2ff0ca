//! `generate::sample` on hand-made logits (transformers' semantics: repetition penalty, then
//! temperature, top-k and top-p), and seeded sampling through `generate`.
mod common;

use fla_models::generate::{self, sample, Params};
use fla_models::Model;
use rand::rngs::StdRng;
use rand::SeedableRng;

fn sampling(temperature: f32, top_k: usize, top_p: f32) -> Params {
    Params { greedy: false, temperature, top_k, top_p, ..Default::default() }
}

fn draw(logits: &[f32], seen: &[u32], p: &Params, rng: &mut StdRng) -> u32 {
    let mut l = logits.to_vec();
    let t = sample(&mut l, seen, p, rng);
    assert!((t as usize) < logits.len(), "sampled token {t} outside a vocabulary of {}", logits.len());
    t
}

fn counts(logits: &[f32], p: &Params, seed: u64, n: usize) -> Vec<usize> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut c = vec![0; logits.len()];
    for _ in 0..n {
        c[draw(logits, &[], p, &mut rng) as usize] += 1;
    }
    c
}

fn softmax(l: &[f32], t: f32) -> Vec<f64> {
    let m = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = l.iter().map(|&x| ((x as f64 - m) / t as f64).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

/// Pseudo-random logits in [-4, 4) from a simple LCG (deterministic, no ties in practice).
fn logits(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
        })
        .collect()
}

fn argmax(l: &[f32]) -> u32 {
    (0..l.len()).fold(0, |b, i| if l[i] > l[b] { i } else { b }) as u32
}

#[test]
fn greedy_is_argmax() {
    let mut rng = StdRng::seed_from_u64(0);
    for seed in 0..20 {
        let l = logits(97, seed);
        let want = argmax(&l);
        assert_eq!(draw(&l, &[], &Params::default(), &mut rng), want, "greedy (default params), seed {seed}");
        let p = Params { greedy: true, temperature: 5.0, top_k: 3, top_p: 0.5, ..Default::default() };
        assert_eq!(draw(&l, &[], &p, &mut rng), want, "greedy ignores temperature/top-k/top-p, seed {seed}");
        assert_eq!(draw(&l, &[], &sampling(0.0, 0, 1.0), &mut rng), want, "temperature 0, seed {seed}");
    }
    // Hand-made: the maximum in the middle, negative logits, and a tie (the first index wins,
    // as torch.argmax).
    assert_eq!(draw(&[-3.0, -1.0, -0.5, -2.0], &[], &Params::default(), &mut rng), 2);
    assert_eq!(draw(&[0.1, 7.0, 3.0, 7.0, -1.0], &[], &Params::default(), &mut rng), 1);
    assert_eq!(draw(&[f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY], &[], &Params::default(), &mut rng), 1);
}

#[test]
fn top_k_one_is_greedy_at_any_temperature() {
    for seed in 0..10 {
        let l = logits(64, 100 + seed);
        let want = argmax(&l);
        let mut rng = StdRng::seed_from_u64(seed);
        for t in [0.1, 0.7, 1.0, 2.0, 10.0, 100.0] {
            for _ in 0..50 {
                assert_eq!(draw(&l, &[], &sampling(t, 1, 1.0), &mut rng), want, "top_k = 1, T = {t}, seed {seed}");
            }
        }
    }
}

#[test]
fn tiny_top_p_is_greedy() {
    for seed in 0..10 {
        let l = logits(64, 200 + seed);
        let want = argmax(&l);
        let mut rng = StdRng::seed_from_u64(seed);
        for t in [0.5, 1.0, 3.0, 50.0] {
            for top_p in [1e-6, 1e-3] {
                for _ in 0..50 {
                    assert_eq!(
                        draw(&l, &[], &sampling(t, 0, top_p), &mut rng),
                        want,
                        "top_p = {top_p}, T = {t}, seed {seed}"
                    );
                }
            }
        }
    }
}

#[test]
fn repetition_penalty_divides_positive_and_multiplies_negative() {
    let mut rng = StdRng::seed_from_u64(0);
    let greedy = |penalty: f32| Params { repetition_penalty: penalty, ..Default::default() };
    // Positive: 2.0 / 1.5 = 1.33 < 1.8, so the seen arg-max loses.
    let l = [2.0, 1.8, -1.0, 0.5];
    assert_eq!(draw(&l, &[0], &greedy(1.0), &mut rng), 0, "penalty 1 is off");
    assert_eq!(draw(&l, &[0], &greedy(1.05), &mut rng), 0, "2.0 / 1.05 still wins");
    assert_eq!(draw(&l, &[0], &greedy(1.5), &mut rng), 1, "2.0 / 1.5 < 1.8");
    assert_eq!(draw(&l, &[2, 3], &greedy(1.5), &mut rng), 0, "unseen arg-max unaffected");
    // Negative: -1.0 * 1.5 = -1.5 < -1.2 (dividing would give -0.67 and keep token 0).
    let l = [-1.0, -1.2, -5.0];
    assert_eq!(draw(&l, &[0], &greedy(1.5), &mut rng), 1, "negative logit of a seen token is multiplied");
    assert_eq!(draw(&l, &[0], &greedy(1.1), &mut rng), 0, "-1.1 > -1.2");
    // A penalty below 1 favours seen tokens: 1.0 / 0.5 = 2 > 1.8.
    assert_eq!(draw(&[1.8, 1.0], &[1], &greedy(0.5), &mut rng), 1, "penalty < 1 boosts seen tokens");
    // The modified logits: exactly l / p for positive and l · p for negative seen logits.
    let mut l = vec![2.0f32, -1.0, 3.0, 0.0, -4.0];
    sample(&mut l, &[0, 1], &greedy(2.0), &mut rng);
    assert_eq!(&l[..2], &[1.0, -2.0], "seen logits after the penalty");
    assert_eq!(&l[2..], &[3.0, 0.0, -4.0], "unseen logits untouched");
    // Out-of-vocabulary ids in `seen` are ignored (no panic).
    assert_eq!(draw(&[0.5, 1.0], &[7, 1000], &greedy(3.0), &mut rng), 1);
}

/// transformers' RepetitionPenaltyLogitsProcessor gathers and scatters by token id: a token seen
/// several times is penalised once.
#[test]
fn repetition_penalty_applies_once_per_token() {
    let mut rng = StdRng::seed_from_u64(0);
    let p = Params { repetition_penalty: 1.2, ..Default::default() };
    // Once: 2.0 / 1.2 = 1.67 > 1.5 keeps token 0; twice: 2.0 / 1.44 = 1.39 would lose it.
    assert_eq!(draw(&[2.0, 1.5], &[0, 0], &p, &mut rng), 0, "token seen twice penalised twice");
    let mut l = vec![2.0f32, -1.0];
    sample(&mut l, &[0, 1, 0, 1, 0], &p, &mut rng);
    assert!((l[0] - 2.0 / 1.2).abs() < 1e-6 && (l[1] + 1.2).abs() < 1e-6, "penalised logits {l:?}");
}

#[test]
fn same_seed_same_samples_different_seeds_differ() {
    let l = logits(50, 7);
    let p = sampling(1.0, 0, 1.0);
    let run = |seed: u64| -> Vec<u32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..200).map(|_| draw(&l, &[], &p, &mut rng)).collect()
    };
    assert_eq!(run(42), run(42), "same seed");
    assert_ne!(run(42), run(43), "seeds 42 and 43");
    assert_ne!(run(0), run(1), "seeds 0 and 1");
    let distinct: std::collections::BTreeSet<u32> = run(42).into_iter().collect();
    assert!(distinct.len() > 5, "T = 1 over 50 tokens should not collapse: {distinct:?}");
}

#[test]
fn samples_stay_within_top_k_and_top_p() {
    let l = logits(50, 11);
    let mut order: Vec<usize> = (0..l.len()).collect();
    order.sort_by(|&a, &b| l[b].total_cmp(&l[a]));
    for k in [2, 5, 10] {
        for t in [0.5, 1.0, 4.0] {
            let c = counts(&l, &sampling(t, k, 1.0), k as u64, 3000);
            for (i, &n) in c.iter().enumerate() {
                let rank = order.iter().position(|&o| o == i).unwrap();
                assert!(rank < k || n == 0, "top_k = {k}, T = {t}: token {i} of rank {rank} drawn {n} times");
                if rank < k.min(3) {
                    assert!(n > 0, "top_k = {k}, T = {t}: token {i} of rank {rank} never drawn");
                }
            }
        }
    }
    // top_k larger than the vocabulary keeps everything.
    let c = counts(&[0.0, 0.1, -0.1], &sampling(1.0, 10, 1.0), 1, 600);
    assert!(c.iter().all(|&n| n > 100), "top_k = 10 over 3 tokens: {c:?}");
    // Nucleus: probabilities 0.5, 0.25, 0.15, 0.1 (T = 1); top_p = 0.7 keeps the first two,
    // top_p = 0.8 the first three.
    let l: Vec<f32> = [0.5f32, 0.25, 0.15, 0.1].iter().map(|p| p.ln()).collect();
    for (top_p, keep) in [(0.7, 2), (0.8, 3), (0.95, 4), (0.4, 1)] {
        let c = counts(&l, &sampling(1.0, 0, top_p), 3, 4000);
        for (i, &n) in c.iter().enumerate() {
            if i < keep {
                assert!(n > 0, "top_p = {top_p}: token {i} in the nucleus never drawn ({c:?})");
            } else {
                assert_eq!(n, 0, "top_p = {top_p}: token {i} outside the nucleus drawn ({c:?})");
            }
        }
    }
    // -inf logits are never drawn.
    let l = [0.0, f32::NEG_INFINITY, 1.0, f32::NEG_INFINITY, -2.0];
    let c = counts(&l, &sampling(2.0, 0, 1.0), 5, 5000);
    assert!(c[1] == 0 && c[3] == 0, "-inf drawn: {c:?}");
}

fn check_frequencies(l: &[f32], p: &Params, want: &[f64], seed: u64) {
    let n = 20_000;
    let c = counts(l, p, seed, n);
    for (i, (&got, &w)) in c.iter().zip(want).enumerate() {
        let f = got as f64 / n as f64;
        assert!((f - w).abs() <= 0.015, "{p:?}: token {i} frequency {f:.4}, expected {w:.4} (counts {c:?})");
    }
}

#[test]
fn frequencies_match_softmax() {
    let l = [1.0f32, 0.5, -0.3, 2.0];
    for (t, seed) in [(1.0, 1), (0.7, 2), (2.5, 3)] {
        check_frequencies(&l, &sampling(t, 0, 1.0), &softmax(&l, t), seed);
    }
    // top_k = 2 renormalises over tokens 3 and 0.
    let t = 0.8;
    let s = softmax(&[l[0], l[3]], t);
    check_frequencies(&l, &sampling(t, 2, 1.0), &[s[0], 0.0, 0.0, s[1]], 4);
    // top_p after temperature: softmax(l / 1.5) ≈ [0.24, 0.18, 0.10, 0.48]; top_p = 0.6 keeps
    // tokens 3 and 0 (0.72 ≥ 0.6), renormalised.
    let t = 1.5;
    let p = softmax(&l, t);
    assert!(p[3] < 0.6 && p[3] + p[0] > 0.65, "test premise: {p:?}");
    let z = p[3] + p[0];
    check_frequencies(&l, &sampling(t, 0, 0.6), &[p[0] / z, 0.0, 0.0, p[3] / z], 5);
    // The repetition penalty applies before sampling: token 3 (2.0) seen with penalty 2 → 1.0.
    let pen = Params { repetition_penalty: 2.0, ..sampling(1.0, 0, 1.0) };
    let want = softmax(&[1.0, 0.5, -0.3, 1.0], 1.0);
    let mut rng = StdRng::seed_from_u64(6);
    let mut c = [0usize; 4];
    for _ in 0..20_000 {
        c[draw(&l, &[3], &pen, &mut rng) as usize] += 1;
    }
    for i in 0..4 {
        let f = c[i] as f64 / 20_000.0;
        assert!((f - want[i]).abs() <= 0.015, "penalised: token {i} frequency {f:.4}, expected {:.4}", want[i]);
    }
}

/// Seeded sampling through `generate` on a real model is reproducible, and the seed matters.
#[test]
fn generate_sampling_is_seeded() {
    let model = Model::load(&common::model_dir("qwen3_5_tiny")).unwrap();
    let r = common::reference("qwen3_5_tiny");
    let prompts = vec![r.gen_ids[..12].to_vec(), r.input_ids[1][..4].to_vec()];
    let run = |seed: u64| {
        let p = Params { max_new_tokens: 24, seed, ..sampling(1.0, 0, 1.0) };
        generate::generate(&model, &prompts, &p, |_, _| {}).unwrap()
    };
    let a = run(5);
    assert_eq!(a, run(5), "same seed");
    assert_ne!(a, run(6), "different seeds");
    assert!(a.iter().all(|o| o.len() == 24));
    // top_k = 1 sampling equals greedy generation.
    let p = Params { max_new_tokens: 24, seed: 9, ..sampling(1.3, 1, 1.0) };
    let out = generate::generate(&model, &prompts[..1], &p, |_, _| {}).unwrap();
    assert_eq!(out[0], r.gen_ids[12..].to_vec(), "top_k = 1 vs the HF greedy tokens");
}
