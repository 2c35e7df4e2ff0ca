//! `fla bench model`: prefill and decode of a Qwen3.5-0.8B-shaped model with random bf16 weights
//! (24 layers: 18 Gated DeltaNet + 6 gated attention; hidden 1024; FFN 3584; 8 query / 2 KV
//! heads of 256; 16 key and 16 value linear heads of 128; vocab 248320; tied embeddings), next
//! to the memory read bandwidth measured in the same run; with `--device cuda`, the same model in
//! bf16 on GPU 0 next to the HBM copy rate measured in the same run.
use std::collections::HashMap;
use std::time::Instant;

use anyhow::Result;
use fla_core::cuda::CudaDevice;
use fla_core::{DType, Tensor};
use fla_models::generate::Backend;
use fla_models::qwen::{Qwen, QwenConfig};
use fla_models::Model;
use fla_nn::VarBuilder;
use half::bf16;
use rayon::prelude::*;

use super::bench::{time_ms, Row};

fn config() -> serde_json::Value {
    let layer_types: Vec<&str> =
        (0..24).map(|i| if (i + 1) % 4 == 0 { "full_attention" } else { "linear_attention" }).collect();
    serde_json::json!({
        "model_type": "qwen3_5_text", "vocab_size": 248320, "hidden_size": 1024, "intermediate_size": 3584,
        "num_hidden_layers": 24, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 256,
        "linear_num_key_heads": 16, "linear_num_value_heads": 16, "linear_key_head_dim": 128,
        "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "rms_norm_eps": 1e-6,
        "rope_parameters": { "rope_theta": 1e7, "partial_rotary_factor": 0.25, "rope_type": "default" },
        "tie_word_embeddings": true, "layer_types": layer_types, "hidden_act": "silu"
    })
}

/// Uniform values in `[-scale, scale]` as bf16, filled in parallel.
fn random_bf16(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let mut v = vec![bf16::ZERO; n];
    v.par_chunks_mut(1 << 16).enumerate().for_each(|(c, chunk)| {
        let mut s = seed ^ (c as u64).wrapping_mul(0x9E3779B97F4A7C15);
        for x in chunk {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            *x = bf16::from_f32(scale * (((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0));
        }
    });
    Tensor::from_vec(v, shape).expect("shape matches")
}

fn weights() -> HashMap<String, Tensor> {
    let mut w = HashMap::new();
    let mut seed = 1u64;
    let mut put = |name: String, shape: &[usize], scale: f32| {
        seed += 1;
        w.insert(name, random_bf16(shape, seed, scale));
    };
    let (h, f) = (1024, 3584);
    put("model.embed_tokens.weight".into(), &[248320, h], 0.02);
    put("model.norm.weight".into(), &[h], 0.1);
    for i in 0..24 {
        let l = format!("model.layers.{i}");
        put(format!("{l}.input_layernorm.weight"), &[h], 0.1);
        put(format!("{l}.post_attention_layernorm.weight"), &[h], 0.1);
        put(format!("{l}.mlp.gate_proj.weight"), &[f, h], 0.03);
        put(format!("{l}.mlp.up_proj.weight"), &[f, h], 0.03);
        put(format!("{l}.mlp.down_proj.weight"), &[h, f], 0.02);
        if (i + 1) % 4 == 0 {
            let a = format!("{l}.self_attn");
            put(format!("{a}.q_proj.weight"), &[8 * 256 * 2, h], 0.03);
            put(format!("{a}.k_proj.weight"), &[2 * 256, h], 0.03);
            put(format!("{a}.v_proj.weight"), &[2 * 256, h], 0.03);
            put(format!("{a}.o_proj.weight"), &[h, 8 * 256], 0.02);
            put(format!("{a}.q_norm.weight"), &[256], 0.1);
            put(format!("{a}.k_norm.weight"), &[256], 0.1);
        } else {
            let a = format!("{l}.linear_attn");
            put(format!("{a}.in_proj_qkv.weight"), &[6144, h], 0.03);
            put(format!("{a}.in_proj_z.weight"), &[2048, h], 0.03);
            put(format!("{a}.in_proj_b.weight"), &[16, h], 0.03);
            put(format!("{a}.in_proj_a.weight"), &[16, h], 0.03);
            put(format!("{a}.conv1d.weight"), &[6144, 1, 4], 0.3);
            put(format!("{a}.A_log"), &[16], 0.5);
            put(format!("{a}.dt_bias"), &[16], 0.5);
            put(format!("{a}.norm.weight"), &[128], 0.1);
            put(format!("{a}.out_proj.weight"), &[h, 2048], 0.02);
        }
    }
    w
}

/// Memory read bandwidth: parallel sum over 1 GiB of f32 (GB/s).
fn read_ceiling(seconds: f64) -> Row {
    let n = 256usize << 20;
    let data = vec![1.0f32; n];
    let mut sink = 0.0f32;
    let ms = time_ms(seconds, || {
        sink += data.par_chunks(1 << 20).map(|c| fla_core::cpu::dot(c, c)).sum::<f32>();
    });
    std::hint::black_box(sink);
    Row {
        name: "read_ceiling".into(),
        shape: "1 GiB".into(),
        ms,
        rate: 4.0 * n as f64 / ms / 1e6,
        unit: "GB/s",
        fraction: None,
        note: "bytes read".into(),
    }
}

/// The random bf16 model.
fn model() -> Result<Model> {
    let t = Instant::now();
    let cfg = QwenConfig::from_json(&config())?;
    let model = Model::from_decoder(Qwen::load(&cfg, &VarBuilder::from_tensors(weights()))?, "qwen3_5_text");
    eprintln!("built the random bf16 model in {:.1} s", t.elapsed().as_secs_f64());
    Ok(model)
}

fn prompt(tokens: usize) -> Vec<u32> {
    (0..tokens as u32).map(|i| (i * 7919) % 248320).collect()
}

fn prefill_row(prompt_tokens: usize, ms: f64, note: &str) -> Row {
    Row {
        name: "prefill".into(),
        shape: format!("{prompt_tokens} tokens, 1 sequence"),
        ms,
        rate: prompt_tokens as f64 / ms * 1e3,
        unit: "tok/s",
        fraction: None,
        note: format!("Qwen3.5-0.8B shape, {note}"),
    }
}

/// The decode row from per-token milliseconds: bytes read per token are the weights of every
/// layer and the LM head plus the f32 states of the 18 linear layers.
fn decode_row(
    name: &str,
    model: &Model,
    prompt_tokens: usize,
    mut samples: Vec<f64>,
    ceiling: &Row,
    note: &str,
) -> Row {
    samples.sort_by(f64::total_cmp);
    let ms = samples[samples.len() / 2];
    let state_bytes = 18 * 16 * 128 * 128 * 4;
    let bytes = (model.weight_bytes_per_token() + state_bytes) as f64;
    let rate = bytes / ms / 1e6;
    Row {
        name: name.into(),
        shape: format!("1 sequence after {prompt_tokens} tokens"),
        ms,
        rate,
        unit: "GB/s",
        fraction: Some(rate / ceiling.rate),
        note: format!("{:.1} tok/s; {:.2} GB weights+state per token; {note}", 1e3 / ms, bytes / 1e9),
    }
}

fn argmax(logits: &[f32]) -> u32 {
    logits.iter().enumerate().fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0 as u32
}

/// Prefill and decode rows on the GPU (bf16 weights and activations): prefill runs the chunk
/// kernels over the whole prompt; each decode token is one forward of one token plus the LM
/// head, with the logits copied to the host for the argmax (what `fla generate` does).
pub fn rows_cuda(seconds: f64, prompt_tokens: usize, decode_tokens: usize) -> Result<Vec<Row>> {
    let dev = CudaDevice::get(0)?;
    eprintln!("device: {} (cuda:0, {} SMs)", dev.name(), dev.sm_count());
    let hbm = super::bench_cuda::hbm_ceiling(&dev, seconds)?;
    let cpu_model = model()?;
    let mut model = cpu_model.to_cuda(&dev, DType::BF16)?;
    let prompt = prompt(prompt_tokens);
    let mut out = Vec::new();
    let mut cache = model.new_cache(1);
    let mut prefill = || -> Result<Vec<f32>> {
        cache = Backend::new_cache(&model, 1);
        let logits = model.last_logits(&[&prompt], &mut cache)?;
        dev.synchronize()?;
        Ok(logits)
    };
    let mut last = prefill()?;
    let ms = time_ms(seconds, || last = prefill().expect("valid model"));
    out.push(prefill_row(prompt_tokens, ms, "bf16 on the GPU"));
    // Decode steps replayed as one CUDA graph each (the first two run launch by launch: the
    // warm-up and the capture), then the same steps launch by launch.
    let mut next = argmax(&last);
    for (name, graphs) in [("decode", true), ("decode_eager", false)] {
        model.set_decode_graphs(graphs);
        let mut samples = Vec::new();
        for _ in 0..decode_tokens.max(1) + 2 {
            let t = Instant::now();
            next = argmax(&model.last_logits(&[&[next]], &mut cache)?);
            samples.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let note = if graphs { "a CUDA graph per step" } else { "launch by launch" };
        let note = format!("bf16 on the GPU, {note}, logits to the host");
        out.push(decode_row(name, &cpu_model, prompt_tokens, samples.split_off(2), &hbm, &note));
    }
    out.push(hbm);
    Ok(out)
}

/// Prefill and decode rows.
pub fn rows(seconds: f64, prompt_tokens: usize, decode_tokens: usize) -> Result<Vec<Row>> {
    let read = read_ceiling(seconds);
    let model = model()?;
    let prompt = prompt(prompt_tokens);
    let mut out = Vec::new();

    let mut cache = model.new_cache(1);
    let prefill_ms = time_ms(0.0, || {
        cache = model.new_cache(1);
        let (hidden, _) = model.forward_hidden(&[&prompt], &mut cache).expect("valid model");
        model.logits(&hidden[hidden.len() - 1024..]).expect("valid model");
    });
    out.push(prefill_row(prompt_tokens, prefill_ms, "bf16 weights"));

    let mut next = 11u32;
    let mut samples = Vec::new();
    for _ in 0..decode_tokens.max(1) {
        let t = Instant::now();
        let (hidden, _) = model.forward_hidden(&[&[next]], &mut cache)?;
        let logits = model.logits(&hidden)?;
        next = argmax(&logits);
        samples.push(t.elapsed().as_secs_f64() * 1e3);
    }
    out.push(decode_row("decode", &model, prompt_tokens, samples, &read, "CPU"));
    out.push(read);
    Ok(out)
}
