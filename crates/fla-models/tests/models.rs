//! Every tiny checkpoint in `../shared/fixtures/models` (saved by HF transformers 5.17 with its
//! logits and greedy generations) against our models.
mod common;

use common::{model_dir, reference, rel_err};
use fla_models::{generate, Model};

fn check_logits(name: &str) {
    let model = Model::load(&model_dir(name)).unwrap();
    let r = reference(name);
    let seqs: Vec<&[u32]> = r.input_ids.iter().map(|s| &s[..]).collect();
    let logits = model.forward_logits(&seqs).unwrap();
    let err = rel_err(&logits, &r.logits);
    assert!(err <= 1e-4, "{name}: logits rel err {err}");
    let full = model.forward_logits(&[&r.gen_ids]).unwrap();
    let err = rel_err(&full, &r.gen_full_logits);
    assert!(err <= 1e-4, "{name}: gen_full_logits rel err {err}");
}

fn check_greedy(name: &str) {
    let model = Model::load(&model_dir(name)).unwrap();
    let r = reference(name);
    let prompt = r.gen_ids[..r.prompt_len].to_vec();
    let params = generate::Params { max_new_tokens: r.gen_ids.len() - r.prompt_len, ..Default::default() };
    let out = generate::generate(&model, &[prompt], &params, |_, _| {}).unwrap();
    assert_eq!(out[0], r.gen_ids[r.prompt_len..].to_vec(), "{name}: greedy generation");
}

#[test]
fn qwen3_5_logits() {
    check_logits("qwen3_5_tiny");
}

#[test]
fn qwen3_5_greedy() {
    check_greedy("qwen3_5_tiny");
}

#[test]
fn qwen3_next_logits() {
    check_logits("qwen3_next_tiny");
}

#[test]
fn qwen3_next_greedy() {
    check_greedy("qwen3_next_tiny");
}

#[test]
fn kimi_linear_logits() {
    check_logits("kimi_linear_tiny");
}

#[test]
fn kimi_linear_greedy() {
    check_greedy("kimi_linear_tiny");
}

/// The tokenizer reproduces HF's prompt ids and generated text (metadata of the reference).
#[test]
fn tokenizer_matches_reference() {
    for name in common::MODELS {
        let tok = fla_models::Tokenizer::load(&model_dir(name)).unwrap();
        let r = reference(name);
        let meta = &r.meta;
        assert_eq!(tok.encode(&meta["prompt"]).unwrap(), r.gen_ids[..r.prompt_len].to_vec(), "{name}: prompt ids");
        assert_eq!(tok.decode(&r.gen_ids).unwrap(), meta["generated_text"], "{name}: generated text");
        assert_eq!(tok.decode(&r.gen_ids[..r.prompt_len]).unwrap(), meta["prompt"], "{name}: prompt round trip");
    }
}
