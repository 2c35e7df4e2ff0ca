//! Every tiny checkpoint in `../shared/fixtures/models` (saved by HF transformers 5.17 with its
//! logits and greedy generations) against our models.
use std::path::{Path, PathBuf};

use fla_core::io::SafeTensorsFile;
use fla_models::{generate, Model};

fn model_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/models").join(name)
}

struct Reference {
    input_ids: Vec<Vec<u32>>,
    logits: Vec<f32>,
    gen_ids: Vec<u32>,
    prompt_len: usize,
    gen_full_logits: Vec<f32>,
}

fn reference(name: &str) -> Reference {
    let f = SafeTensorsFile::open(model_dir(name).join("reference.safetensors")).unwrap();
    let ids = f.tensor("input_ids").unwrap();
    let (b, t) = (ids.shape()[0], ids.shape()[1]);
    let ids: Vec<f64> = ids.to_vec().unwrap();
    let input_ids = (0..b).map(|i| ids[i * t..(i + 1) * t].iter().map(|&x| x as u32).collect()).collect();
    let gen: Vec<f64> = f.tensor("gen_ids").unwrap().to_vec().unwrap();
    Reference {
        input_ids,
        logits: f.tensor("logits").unwrap().to_vec().unwrap(),
        gen_ids: gen.iter().map(|&x| x as u32).collect(),
        prompt_len: 12,
        gen_full_logits: f.tensor("gen_full_logits").unwrap().to_vec().unwrap(),
    }
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let a: Vec<f64> = a.iter().map(|&x| x as f64).collect();
    let b: Vec<f64> = b.iter().map(|&x| x as f64).collect();
    fla_core::cpu::rel_err(&a, &b)
}

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
    for name in ["qwen3_5_tiny", "qwen3_next_tiny", "kimi_linear_tiny"] {
        let tok = fla_models::Tokenizer::load(&model_dir(name)).unwrap();
        let r = reference(name);
        let meta = SafeTensorsFile::open(model_dir(name).join("reference.safetensors")).unwrap().metadata().unwrap();
        assert_eq!(tok.encode(&meta["prompt"]).unwrap(), r.gen_ids[..r.prompt_len].to_vec(), "{name}: prompt ids");
        assert_eq!(tok.decode(&r.gen_ids).unwrap(), meta["generated_text"], "{name}: generated text");
        assert_eq!(tok.decode(&r.gen_ids[..r.prompt_len]).unwrap(), meta["prompt"], "{name}: prompt round trip");
    }
}
