//! `fla logits --model DIR --input IN.safetensors --output OUT.safetensors`
use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use fla_core::io::{save, SafeTensorsFile};
use fla_core::Tensor;
use fla_models::Model;

/// Arguments of `fla logits`.
#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint directory.
    #[arg(long)]
    model: PathBuf,
    /// safetensors file with `input_ids [B, T]` (integers).
    #[arg(long)]
    input: PathBuf,
    /// Where to write `logits [B, T, vocab]` (f32).
    #[arg(long)]
    output: PathBuf,
}

/// One forward pass over every row of `input_ids`.
pub fn run(args: Args) -> Result<i32> {
    let model = Model::load(&args.model).with_context(|| format!("loading {}", args.model.display()))?;
    let file = SafeTensorsFile::open(&args.input)?;
    let ids = file.tensor("input_ids")?;
    let &[b, t] = ids.shape() else { bail!("input_ids must be [B, T], got {:?}", ids.shape()) };
    let flat: Vec<f64> = ids.to_vec()?;
    let mut rows = Vec::with_capacity(b);
    for r in 0..b {
        let row = flat[r * t..(r + 1) * t]
            .iter()
            .map(|&x| if x >= 0.0 && (x as usize) < model.vocab() && x.fract() == 0.0 { Ok(x as u32) } else { Err(x) })
            .collect::<std::result::Result<Vec<u32>, f64>>()
            .map_err(|x| anyhow::anyhow!("input_ids row {r} holds {x}, not a token id below {}", model.vocab()))?;
        rows.push(row);
    }
    let seqs: Vec<&[u32]> = rows.iter().map(|r| &r[..]).collect();
    let logits = model.forward_logits(&seqs)?;
    let out = BTreeMap::from([("logits".to_string(), Tensor::from_vec(logits, &[b, t, model.vocab()])?)]);
    save(&out, None, &args.output)?;
    Ok(0)
}
