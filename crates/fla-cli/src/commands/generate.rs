//! `fla generate --model DIR (--prompt TEXT | --prompt-ids 1,2,3) ...`
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use fla_models::{generate, Model, Tokenizer};

/// Where to run.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Device {
    /// The CPU, on every core.
    Cpu,
    /// An NVIDIA GPU.
    Cuda,
}

/// Arguments of `fla generate`.
#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint directory (config.json, model.safetensors or shards, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Prompt text; repeat for a batch of prompts.
    #[arg(long, required_unless_present = "prompt_ids", conflicts_with = "prompt_ids")]
    prompt: Vec<String>,
    /// Prompt token ids, comma-separated; repeat for a batch.
    #[arg(long, value_delimiter = ';')]
    prompt_ids: Vec<String>,
    /// Tokens to generate at most per prompt.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Take the most likely token every step (the default when no temperature is given).
    #[arg(long)]
    greedy: bool,
    /// Sampling temperature (sampling is on when this is given and --greedy is not).
    #[arg(long)]
    temperature: Option<f32>,
    /// Keep only the k most likely tokens when sampling.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Repetition penalty (1: off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop token ids, comma-separated (in addition to the checkpoint's eos_token_id).
    #[arg(long, value_delimiter = ',')]
    stop: Vec<u32>,
    /// Also print the generated token ids.
    #[arg(long)]
    print_ids: bool,
    /// Device.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
}

fn parse_ids(s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .map(|x| x.trim().parse::<u32>().with_context(|| format!("bad token id `{x}` in --prompt-ids")))
        .collect()
}

/// Loads the model, generates, streams text to stdout and prints tokens/s to stderr.
pub fn run(args: Args) -> Result<i32> {
    let model = Model::load(&args.model).with_context(|| format!("loading {}", args.model.display()))?;
    let tokenizer = if args.prompt.is_empty() && !args.print_ids {
        Tokenizer::load(&args.model).ok()
    } else {
        Some(Tokenizer::load(&args.model)?)
    };
    let prompts: Vec<Vec<u32>> = if !args.prompt_ids.is_empty() {
        args.prompt_ids.iter().map(|s| parse_ids(s)).collect::<Result<_>>()?
    } else {
        let tok = tokenizer.as_ref().context("a tokenizer is needed for --prompt")?;
        args.prompt.iter().map(|p| tok.encode(p).map_err(anyhow::Error::from)).collect::<Result<_>>()?
    };
    if let Some(bad) = prompts.iter().flatten().find(|&&id| id as usize >= model.vocab()) {
        bail!("prompt token id {bad} is outside the vocabulary of {}", model.vocab());
    }
    let params = generate::Params {
        max_new_tokens: args.max_new_tokens,
        greedy: args.greedy || args.temperature.is_none(),
        temperature: args.temperature.unwrap_or(1.0),
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
        stop_tokens: [args.stop.clone(), fla_models::checkpoint::eos_token_ids(&args.model)?].concat(),
    };
    let stream = prompts.len() == 1;
    let start = Instant::now();
    let mut first_token = None;
    let mut stdout = std::io::stdout();
    if stream {
        if let (Some(tok), false) = (&tokenizer, args.prompt.is_empty()) {
            print!("{}", tok.decode(&prompts[0])?);
        }
    }
    let mut shown = String::new();
    let mut ids_so_far = Vec::new();
    let mut on_token = |_: usize, t: u32| {
        first_token.get_or_insert_with(|| start.elapsed());
        if stream {
            if let Some(tok) = &tokenizer {
                // Print the new suffix of the decoded text (tokens may not be whole characters).
                ids_so_far.push(t);
                if let Ok(text) = tok.decode(&ids_so_far) {
                    if text.len() > shown.len() && text.starts_with(&shown) {
                        print!("{}", &text[shown.len()..]);
                        let _ = stdout.flush();
                        shown = text;
                    }
                }
            }
        }
    };
    let out = match args.device {
        Device::Cpu => generate::generate(&model, &prompts, &params, &mut on_token)?,
        Device::Cuda => {
            if !fla_core::cuda::is_available() {
                bail!("--device cuda: no CUDA device (libcuda not found, or no GPU)");
            }
            let dev = fla_core::cuda::CudaDevice::get(0)?;
            // bf16 weights and activations, f32 recurrent states (as the GPU kernels take them).
            let gpu = model.to_cuda(&dev, fla_core::DType::BF16).context("moving the model to cuda:0")?;
            generate::generate(&gpu, &prompts, &params, &mut on_token)?
        }
    };
    let elapsed = start.elapsed();
    if stream && tokenizer.is_some() {
        println!();
    }
    for (i, ids) in out.iter().enumerate() {
        if !stream {
            if let Some(tok) = &tokenizer {
                println!("[{i}] {}", tok.decode(&[&prompts[i][..], ids].concat())?);
            }
        }
        if args.print_ids {
            let all: Vec<String> = prompts[i].iter().chain(ids).map(|t| t.to_string()).collect();
            println!("ids[{i}]: {}", all.join(","));
        }
    }
    let new_tokens: usize = out.iter().map(|o| o.len()).sum();
    let prompt_tokens: usize = prompts.iter().map(|p| p.len()).sum();
    let prefill = first_token.unwrap_or(elapsed);
    let decode = elapsed.saturating_sub(prefill);
    eprintln!(
        "{prompt_tokens} prompt tokens in {:.1} ms ({:.1} tok/s), {new_tokens} new tokens in {:.1} ms ({:.1} tok/s)",
        prefill.as_secs_f64() * 1e3,
        prompt_tokens as f64 / prefill.as_secs_f64().max(1e-9),
        elapsed.as_secs_f64() * 1e3,
        new_tokens.saturating_sub(prompts.len()) as f64 / decode.as_secs_f64().max(1e-9),
    );
    Ok(0)
}
