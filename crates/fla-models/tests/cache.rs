//! The hybrid cache and generation on every tiny fixture: prefill + decode, chunked continuation
//! and packed batches of different lengths give the logits of one pass over each sequence alone;
//! batched `generate` gives each prompt's own greedy tokens; streaming, `max_new_tokens = 0` and
//! stop tokens.
mod common;

use common::{model_dir, reference, rel_err, Reference};
use fla_models::{generate, Model};

const TOL: f64 = 1e-4;

fn load(name: &str) -> (Model, Reference) {
    let model = Model::load(&model_dir(name)).unwrap_or_else(|e| panic!("{name}: Model::load failed: {e}"));
    (model, reference(name))
}

/// A 100-token sequence (longer than one 64-token chunk of the chunked kernels).
fn long_seq(r: &Reference) -> Vec<u32> {
    r.input_ids[0].iter().chain(&r.input_ids[1]).chain(&r.input_ids[0][..18]).copied().collect()
}

/// Logits of `seq` fed through one cache in pieces of `chunks[i]` tokens, then one token at a
/// time until its end, checking the cache bookkeeping on the way.
fn run_schedule(model: &Model, seq: &[u32], chunks: &[usize]) -> Vec<f32> {
    let mut cache = model.new_cache(1);
    let mut logits = Vec::new();
    let mut pos = 0;
    let mut i = 0;
    while pos < seq.len() {
        let n = chunks.get(i).copied().unwrap_or(1).min(seq.len() - pos);
        i += 1;
        let (hidden, batch) = model.forward_hidden(&[&seq[pos..pos + n]], &mut cache).unwrap();
        assert_eq!(batch.seqs, vec![0..n], "batch rows");
        assert_eq!(batch.past, vec![pos], "batch past");
        pos += n;
        assert_eq!(cache.past, vec![pos], "cache.past after {pos} tokens");
        let l = model.logits(&hidden).unwrap();
        assert_eq!(l.len(), n * model.vocab(), "logits rows");
        logits.extend(l);
    }
    logits
}

fn check_schedule(name: &str, model: &Model, seq: &[u32], chunks: &[usize]) {
    let one_pass = model.forward_logits(&[seq]).unwrap();
    let got = run_schedule(model, seq, chunks);
    let err = rel_err(&got, &one_pass);
    assert!(err <= TOL, "{name}: {} tokens fed as {chunks:?} then single tokens: rel err {err} vs one pass", seq.len());
}

/// Prefill of the first P tokens, then one `forward_hidden` per token.
fn decode_matches_one_pass(name: &str) {
    let (model, r) = load(name);
    // The reference input, and a 100-token sequence crossing the 64-token chunk boundary.
    for p in [1, 12, 40] {
        check_schedule(name, &model, &r.input_ids[1], &[p]);
    }
    let long = long_seq(&r);
    for p in [1, 63, 64, 70] {
        check_schedule(name, &model, &long, &[p]);
    }
    // The one pass itself against HF.
    let seqs: Vec<&[u32]> = r.input_ids.iter().map(|s| &s[..]).collect();
    let err = rel_err(&model.forward_logits(&seqs).unwrap(), &r.logits);
    assert!(err <= TOL, "{name}: one pass vs HF logits rel err {err}");
}

/// Prefill, then multi-token chunks (some shorter than the conv window), then single tokens.
fn chunked_continuation_matches_one_pass(name: &str) {
    let (model, r) = load(name);
    check_schedule(name, &model, &r.input_ids[0], &[10, 7]);
    check_schedule(name, &model, &r.input_ids[0], &[10, 2, 1, 3, 2, 7, 5]);
    let long = long_seq(&r);
    check_schedule(name, &model, &long, &[3, 2, 1, 61, 5, 2]);
    check_schedule(name, &model, &long, &[30, 40, 20]);
}

/// Per step, the number of new tokens of each sequence; sequence `i` reads `sources[i]` in order.
/// Returns, per sequence, the logits of all its rows, after checking the packing.
fn run_batch(model: &Model, sources: &[Vec<u32>], steps: &[Vec<usize>]) -> fla_core::Result<Vec<Vec<f32>>> {
    let n = sources.len();
    let v = model.vocab();
    let mut cache = model.new_cache(n);
    let mut pos = vec![0usize; n];
    let mut out = vec![Vec::new(); n];
    for step in steps {
        let seqs: Vec<&[u32]> = (0..n).map(|i| &sources[i][pos[i]..pos[i] + step[i]]).collect();
        let (hidden, batch) = model.forward_hidden(&seqs, &mut cache)?;
        assert_eq!(batch.past, pos, "batch.past");
        let logits = model.logits(&hidden)?;
        assert_eq!(logits.len(), step.iter().sum::<usize>() * v, "logits rows");
        let mut start = 0;
        for i in 0..n {
            assert_eq!(batch.seqs[i], start..start + step[i], "rows of sequence {i}");
            out[i].extend_from_slice(&logits[start * v..(start + step[i]) * v]);
            start += step[i];
            pos[i] += step[i];
        }
        assert_eq!(cache.past, pos, "cache.past");
    }
    Ok(out)
}

fn check_batch(name: &str, model: &Model, sources: &[Vec<u32>], steps: &[Vec<usize>]) {
    let got = run_batch(model, sources, steps).unwrap();
    for (i, src) in sources.iter().enumerate() {
        let total: usize = steps.iter().map(|s| s[i]).sum();
        let alone = model.forward_logits(&[&src[..total]]).unwrap();
        let err = rel_err(&got[i], &alone);
        assert!(err <= TOL, "{name}: sequence {i} in the batch (steps {steps:?}): rel err {err} vs alone");
    }
}

fn batch_sources(r: &Reference) -> Vec<Vec<u32>> {
    vec![r.input_ids[0].clone(), r.input_ids[1].clone(), r.input_ids[0][20..].to_vec(), long_seq(r)]
}

/// Prompts of lengths 5, 12, 1 and 70 prefilled together, then decoded together for 6 steps.
fn batch_prefill_decode_matches_alone(name: &str) {
    let (model, r) = load(name);
    let sources = batch_sources(&r);
    let mut steps = vec![vec![5, 12, 1, 70]];
    steps.extend(std::iter::repeat_n(vec![1, 1, 1, 1], 6));
    check_batch(name, &model, &sources, &steps);
    // Three sequences (the decode batch fits the small-row paths), different order.
    let sources3 = vec![sources[2].clone(), sources[1].clone(), sources[0].clone()];
    let mut steps = vec![vec![1, 12, 5]];
    steps.extend(std::iter::repeat_n(vec![1, 1, 1], 5));
    check_batch(name, &model, &sources3, &steps);
}

/// Steps that mix prefill chunks and single tokens of different sequences in one call.
fn mixed_batch_matches_alone(name: &str) {
    let (model, r) = load(name);
    let sources = batch_sources(&r);
    let steps = vec![vec![4, 1, 9, 2], vec![1, 6, 1, 66], vec![3, 1, 1, 1], vec![1, 1, 4, 1], vec![1, 1, 1, 1]];
    check_batch(name, &model, &sources, &steps);
}

/// A sequence that brings no token in a step: the others must be unaffected (an error is
/// acceptable, a panic or wrong logits are not).
fn empty_chunk_in_batch(name: &str) {
    let (model, r) = load(name);
    let sources = batch_sources(&r)[..3].to_vec();
    let steps = vec![vec![5, 3, 2], vec![0, 1, 1], vec![1, 0, 2], vec![1, 1, 0], vec![1, 1, 1]];
    let got = match run_batch(&model, &sources, &steps) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("{name}: an empty chunk is refused: {e}");
            return;
        }
    };
    for (i, src) in sources.iter().enumerate() {
        let total: usize = steps.iter().map(|s| s[i]).sum();
        let alone = model.forward_logits(&[&src[..total]]).unwrap();
        let err = rel_err(&got[i], &alone);
        assert!(err <= TOL, "{name}: sequence {i} with empty steps: rel err {err} vs alone");
    }
}

fn bad_inputs_are_errors(name: &str) {
    let (model, r) = load(name);
    let mut cache = model.new_cache(2);
    assert!(model.forward_hidden(&[&r.input_ids[0][..3]], &mut cache).is_err(), "{name}: 1 sequence, cache of 2");
    assert_eq!(cache.past, vec![0, 0], "{name}: a refused call must not advance the cache");
    let v = model.vocab() as u32;
    assert!(model.forward_logits(&[&[1, v, 2]]).is_err(), "{name}: token id {v} = vocab size must be refused");
    assert!(model.forward_logits(&[&[u32::MAX]]).is_err(), "{name}: token id u32::MAX must be refused");
    let params = generate::Params { max_new_tokens: 3, ..Default::default() };
    assert!(generate::generate(&model, &[vec![1, 2], vec![]], &params, |_, _| {}).is_err(), "{name}: empty prompt");
    // A cache whose token counts disagree with what its layers hold is refused, not read out of
    // bounds: claim one more cached token than the prefill stored, and a cache that never ran.
    let mut cache = model.new_cache(1);
    model.forward_hidden(&[&r.input_ids[0][..5]], &mut cache).unwrap();
    cache.past[0] += 1;
    assert!(model.forward_hidden(&[&r.input_ids[0][5..6]], &mut cache).is_err(), "{name}: past beyond the cache");
    let mut fresh = model.new_cache(1);
    fresh.past[0] = 4;
    assert!(model.forward_hidden(&[&r.input_ids[0][..1]], &mut fresh).is_err(), "{name}: past on an empty cache");
}

/// Greedy tokens of one prompt alone.
fn greedy_alone(model: &Model, prompt: &[u32], max_new: usize) -> Vec<u32> {
    let params = generate::Params { max_new_tokens: max_new, ..Default::default() };
    let mut out = generate::generate(model, &[prompt.to_vec()], &params, |_, _| {}).unwrap();
    assert_eq!(out.len(), 1);
    out.pop().unwrap()
}

fn gen_prompts(r: &Reference) -> Vec<Vec<u32>> {
    vec![r.gen_ids[..r.prompt_len].to_vec(), r.input_ids[0][..5].to_vec(), r.input_ids[1][..1].to_vec()]
}

fn generate_batch_matches_alone(name: &str) {
    let (model, r) = load(name);
    let max_new = 16;
    let mut prompts = gen_prompts(&r);
    prompts.push(long_seq(&r)[..70].to_vec());
    let alone: Vec<Vec<u32>> = prompts.iter().map(|p| greedy_alone(&model, p, max_new)).collect();
    assert_eq!(alone[0], r.gen_ids[r.prompt_len..r.prompt_len + max_new].to_vec(), "{name}: greedy vs HF");
    let params = generate::Params { max_new_tokens: max_new, ..Default::default() };
    for idx in [vec![0, 1, 2], vec![2, 0, 1, 3]] {
        let batch: Vec<Vec<u32>> = idx.iter().map(|&i| prompts[i].clone()).collect();
        let out = generate::generate(&model, &batch, &params, |_, _| {}).unwrap();
        assert_eq!(out.len(), batch.len());
        for (j, &i) in idx.iter().enumerate() {
            assert_eq!(out[j], alone[i], "{name}: prompt {i} (len {}) in batch {idx:?} vs alone", prompts[i].len());
        }
    }
}

/// Events of `generate`: every output token streamed once, in order, step by step.
fn check_stream(name: &str, out: &[Vec<u32>], events: &[(usize, u32)]) {
    assert_eq!(events.len(), out.iter().map(|o| o.len()).sum::<usize>(), "{name}: number of callbacks");
    for (i, o) in out.iter().enumerate() {
        let streamed: Vec<u32> = events.iter().filter(|e| e.0 == i).map(|e| e.1).collect();
        assert_eq!(&streamed, o, "{name}: tokens streamed for sequence {i}");
    }
    // Step-major order: step s emits token s of every sequence still running, in index order.
    let mut expected = Vec::new();
    for s in 0..out.iter().map(|o| o.len()).max().unwrap_or(0) {
        for (i, o) in out.iter().enumerate() {
            if let Some(&t) = o.get(s) {
                expected.push((i, t));
            }
        }
    }
    assert_eq!(events, &expected[..], "{name}: callback order");
}

fn truncate_at_stop(tokens: &[u32], stop: &[u32]) -> Vec<u32> {
    match tokens.iter().position(|t| stop.contains(t)) {
        Some(p) => tokens[..=p].to_vec(),
        None => tokens.to_vec(),
    }
}

fn streaming_and_stop_tokens(name: &str) {
    let (model, r) = load(name);
    let max_new = 12;
    let prompts = gen_prompts(&r);
    let alone: Vec<Vec<u32>> = prompts.iter().map(|p| greedy_alone(&model, p, max_new)).collect();

    // Plain streaming.
    let params = generate::Params { max_new_tokens: max_new, ..Default::default() };
    let mut events = Vec::new();
    let out = generate::generate(&model, &prompts, &params, |i, t| events.push((i, t))).unwrap();
    assert_eq!(out, alone, "{name}: batch vs alone");
    check_stream(name, &out, &events);

    // The first greedy token of prompt 0 as a stop token: it is emitted, then that sequence
    // stops; the others stop at their first occurrence of it, if any.
    for stop in [vec![alone[0][0]], vec![alone[1][3]], vec![alone[2][5], alone[0][7]]] {
        let params = generate::Params { max_new_tokens: max_new, stop_tokens: stop.clone(), ..Default::default() };
        let mut events = Vec::new();
        let out = generate::generate(&model, &prompts, &params, |i, t| events.push((i, t))).unwrap();
        for (i, a) in alone.iter().enumerate() {
            assert_eq!(out[i], truncate_at_stop(a, &stop), "{name}: prompt {i} with stop tokens {stop:?}");
        }
        check_stream(name, &out, &events);
        // Alone.
        let mut n = 0;
        let one = generate::generate(&model, &prompts[0..1], &params, |_, _| n += 1).unwrap();
        assert_eq!(one[0], truncate_at_stop(&alone[0], &stop), "{name}: prompt 0 alone with stop {stop:?}");
        assert_eq!(n, one[0].len(), "{name}: callbacks alone");
    }
    let params = generate::Params { max_new_tokens: max_new, stop_tokens: vec![alone[0][0]], ..Default::default() };
    let one = generate::generate(&model, &prompts[0..1], &params, |_, _| {}).unwrap();
    assert_eq!(one, vec![vec![alone[0][0]]], "{name}: generation stops right after emitting the stop token");

    // max_new_tokens = 0: nothing generated, nothing streamed.
    let params = generate::Params { max_new_tokens: 0, ..Default::default() };
    let mut n = 0;
    let out = generate::generate(&model, &prompts, &params, |_, _| n += 1).unwrap();
    assert_eq!(out, vec![Vec::<u32>::new(); prompts.len()], "{name}: max_new_tokens = 0");
    assert_eq!(n, 0, "{name}: callbacks with max_new_tokens = 0");

    // max_new_tokens = 1: exactly the first greedy token.
    let params = generate::Params { max_new_tokens: 1, ..Default::default() };
    let out = generate::generate(&model, &prompts, &params, |_, _| {}).unwrap();
    let firsts: Vec<Vec<u32>> = alone.iter().map(|a| vec![a[0]]).collect();
    assert_eq!(out, firsts, "{name}: max_new_tokens = 1");
}

macro_rules! model_tests {
    ($($module:ident => $name:literal),* $(,)?) => {$(
        mod $module {
            #[test]
            fn decode_matches_one_pass() {
                super::decode_matches_one_pass($name);
            }
            #[test]
            fn chunked_continuation_matches_one_pass() {
                super::chunked_continuation_matches_one_pass($name);
            }
            #[test]
            fn batch_prefill_decode_matches_alone() {
                super::batch_prefill_decode_matches_alone($name);
            }
            #[test]
            fn mixed_batch_matches_alone() {
                super::mixed_batch_matches_alone($name);
            }
            #[test]
            fn empty_chunk_in_batch() {
                super::empty_chunk_in_batch($name);
            }
            #[test]
            fn bad_inputs_are_errors() {
                super::bad_inputs_are_errors($name);
            }
            #[test]
            fn generate_batch_matches_alone() {
                super::generate_batch_matches_alone($name);
            }
            #[test]
            fn streaming_and_stop_tokens() {
                super::streaming_and_stop_tokens($name);
            }
        }
    )*};
}

model_tests!(qwen3_5 => "qwen3_5_tiny", qwen3_next => "qwen3_next_tiny", kimi_linear => "kimi_linear_tiny");
