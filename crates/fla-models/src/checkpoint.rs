//! Finding a checkpoint's files: `config.json`, one `model.safetensors` or the shards listed in
//! `model.safetensors.index.json`, and `tokenizer.json`.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use fla_core::{Error, Result};
use fla_nn::VarBuilder;

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Io { path: path.display().to_string(), error: e }
}

/// Reads and parses `dir/config.json`.
pub fn read_config(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Msg(format!("{}: {e}", path.display())))
}

/// The safetensors files of the checkpoint in `dir`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).map_err(|_| {
        Error::Msg(format!("{}: neither model.safetensors nor model.safetensors.index.json found", dir.display()))
    })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::Msg(format!("{}: {e}", index.display())))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::Msg(format!("{}: no `weight_map` object", index.display())))?;
    let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
    Ok(shards.into_iter().map(|s| dir.join(s)).collect())
}

/// A [`VarBuilder`] over the checkpoint's weights.
pub fn var_builder(dir: &Path) -> Result<VarBuilder> {
    VarBuilder::from_files(&weight_files(dir)?)
}

/// End-of-sequence token ids of the checkpoint: `eos_token_id` (an id or a list) of
/// `generation_config.json`, else of `config.json`; empty when neither names one.
pub fn eos_token_ids(dir: &Path) -> Result<Vec<u32>> {
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        match v.get("eos_token_id") {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
            _ => Vec::new(),
        }
    };
    let gen = dir.join("generation_config.json");
    if let Ok(text) = std::fs::read_to_string(&gen) {
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::Msg(format!("{}: {e}", gen.display())))?;
        let found = ids(&json);
        if !found.is_empty() {
            return Ok(found);
        }
    }
    Ok(ids(&read_config(dir)?))
}
