//! The model on the GPU (`Model::to_cuda`) against the same model on the CPU and the HF
//! reference: the tiny Qwen3.5 (Gated DeltaNet and gated attention layers, dense MLPs),
//! Qwen3-Next (interleaved projections, mixtures of experts) and Kimi Linear (KDA and MLA layers,
//! mixtures of experts) checkpoints; logits of the reference
//! prompts in f32, f16 and bf16, prefill then decode equal to one pass, HF's greedy tokens, and a
//! batch of prompts of different lengths equal to each alone, and many decode steps through the
//! captured CUDA graph (replays, a KV pool growing) equal to the CPU model step by step.
//! Skips cleanly without a GPU (CI).
mod common;

use common::{model_dir, reference, rel_err};
use fla_core::cuda::{self, CudaDevice};
use fla_core::DType;
use fla_models::generate::Backend;
use fla_models::{generate, Model};

fn gpu(test: &str) -> Option<std::sync::Arc<CudaDevice>> {
    if !cuda::is_available() || !fla_kernels::compiled() {
        eprintln!("{test}: skipped: no CUDA device or no kernels");
        return None;
    }
    Some(CudaDevice::get(0).expect("a device is present"))
}

#[test]
fn qwen3_5_logits_on_the_gpu() {
    check_logits("qwen3_5_tiny", false);
}

#[test]
fn qwen3_next_logits_on_the_gpu() {
    check_logits("qwen3_next_tiny", true);
}

#[test]
fn qwen3_5_greedy_on_the_gpu() {
    check_greedy("qwen3_5_tiny");
}

#[test]
fn qwen3_next_greedy_on_the_gpu() {
    check_greedy("qwen3_next_tiny");
}

#[test]
fn kimi_linear_logits_on_the_gpu() {
    check_logits("kimi_linear_tiny", true);
}

#[test]
fn kimi_linear_greedy_on_the_gpu() {
    check_greedy("kimi_linear_tiny");
}

/// `moe`: the model routes tokens to experts. There a 16-bit router can pick another expert than
/// the f32 reference for a near tie, which moves those tokens' logits by O(10%); the 16-bit
/// bound then only catches a broken kernel.
fn check_logits(name: &str, moe: bool) {
    let Some(dev) = gpu(name) else { return };
    let model = Model::load(&model_dir(name)).unwrap();
    let r = reference(name);
    let seqs: Vec<&[u32]> = r.input_ids.iter().map(|p| &p[..]).collect();
    // 16-bit activations round the residual stream at every layer; bf16 keeps 8 mantissa bits,
    // f16 11, so f16 lands about 8x closer. A wrong kernel is off by O(1).
    let (f16_tol, bf16_tol) = if moe { (0.5, 0.5) } else { (2e-2, 1.5e-1) };
    for (dtype, tol) in [(DType::F32, 1e-4), (DType::F16, f16_tol), (DType::BF16, bf16_tol)] {
        let gpu_model = model.to_cuda(&dev, dtype).unwrap();
        let logits = gpu_model.forward_logits(&seqs).unwrap();
        let err = rel_err(&logits, &r.logits);
        eprintln!("{name} {dtype}: logits rel err {err:.2e} against the reference (tolerance {tol:.0e})");
        assert!(err <= tol, "{name} {dtype}: logits rel err {err:.2e} against the reference");
    }
    // Prefill all but the last token, then decode it: the last row equals the one-pass logits.
    let gpu_model = model.to_cuda(&dev, DType::F32).unwrap();
    let full = gpu_model.forward_logits(&seqs[..1]).unwrap();
    let p = seqs[0];
    let mut cache = gpu_model.new_cache(1);
    gpu_model.forward_hidden(&[&p[..p.len() - 1]], &mut cache).unwrap();
    let h = gpu_model.forward_hidden(&[&p[p.len() - 1..]], &mut cache).unwrap();
    let last = gpu_model.logits(&h).unwrap().to_host().unwrap().to_vec::<f32>().unwrap();
    let v = gpu_model.vocab();
    let err = rel_err(&last, &full[(p.len() - 1) * v..]);
    assert!(err <= 1e-4, "{name}: prefill + decode vs one pass: rel err {err:.2e}");
}

fn check_greedy(name: &str) {
    let Some(dev) = gpu(name) else { return };
    let model = Model::load(&model_dir(name)).unwrap();
    let r = reference(name);
    let gpu_model = model.to_cuda(&dev, DType::F32).unwrap();
    // HF's greedy tokens, prefill through the chunk kernels and decode through the step kernel.
    let prompt = r.gen_ids[..r.prompt_len].to_vec();
    let params = generate::Params { max_new_tokens: r.gen_ids.len() - r.prompt_len, ..Default::default() };
    let out = generate::generate(&gpu_model, std::slice::from_ref(&prompt), &params, |_, _| {}).unwrap();
    assert_eq!(out[0], r.gen_ids[r.prompt_len..].to_vec(), "{name}: greedy generation on the GPU");
    // A batch of prompts of different lengths (packed varlen prefill, then batched decode) gives
    // what each prompt gives alone.
    let prompts = vec![prompt, r.input_ids[0][..5].to_vec(), r.input_ids[1][..1].to_vec()];
    let params = generate::Params { max_new_tokens: 6, ..Default::default() };
    let batch = generate::generate(&gpu_model, &prompts, &params, |_, _| {}).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let alone = generate::generate(&gpu_model, std::slice::from_ref(p), &params, |_, _| {}).unwrap();
        assert_eq!(batch[i], alone[0], "{name} prompt {i}: batched vs alone");
    }
}

/// Decode steps of two sequences of different lengths (the first prompt 3 tokens, the second
/// 70, so the KV pools grow from 64 to 128 rows mid-way) on the GPU — the first step launch by
/// launch, then captured and replayed as one CUDA graph, captured again after the growth — give
/// the CPU model's logits at every step (f32).
#[test]
fn qwen3_5_decode_graph_equals_the_cpu_step_by_step() {
    let name = "qwen3_5_tiny";
    let Some(dev) = gpu(name) else { return };
    let cpu = Model::load(&model_dir(name)).unwrap();
    let gpu_model = cpu.to_cuda(&dev, DType::F32).unwrap();
    let v = gpu_model.vocab() as u32;
    let prompts: Vec<Vec<u32>> = vec![vec![5, 9, 2], (0..70).map(|i| (i * 7 + 3) % v).collect()];
    let seqs: Vec<&[u32]> = prompts.iter().map(|p| &p[..]).collect();
    let (mut cc, mut gc) = (Backend::new_cache(&cpu, 2), Backend::new_cache(&gpu_model, 2));
    let mut want = cpu.last_logits(&seqs, &mut cc).unwrap();
    let got = gpu_model.last_logits(&seqs, &mut gc).unwrap();
    assert!(rel_err(&got, &want) <= 1e-4, "prefill logits");
    for step in 0..72 {
        // Feed the argmax of the CPU logits to both (the same tokens whatever the GPU gives).
        let next: Vec<u32> = want
            .chunks(v as usize)
            .map(|row| (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap() as u32)
            .collect();
        let seqs: Vec<&[u32]> = next.iter().map(std::slice::from_ref).collect();
        want = cpu.last_logits(&seqs, &mut cc).unwrap();
        let got = gpu_model.last_logits(&seqs, &mut gc).unwrap();
        let err = rel_err(&got, &want);
        assert!(err <= 1e-4, "decode step {step}: rel err {err:.2e} between the GPU (graph) and the CPU");
    }
    assert_eq!(gc.past, vec![3 + 72, 70 + 72]);
}

/// A token id outside the vocabulary is a typed error on the GPU too.
#[test]
fn token_outside_the_vocabulary_is_an_error_on_the_gpu() {
    let Some(dev) = gpu("token_outside_the_vocabulary_is_an_error_on_the_gpu") else { return };
    let model = Model::load(&model_dir("qwen3_5_tiny")).unwrap().to_cuda(&dev, DType::F32).unwrap();
    let bad = model.vocab() as u32;
    assert!(matches!(model.forward_logits(&[&[1, bad]]), Err(fla_core::Error::Argument { arg: "seqs", .. })));
}
