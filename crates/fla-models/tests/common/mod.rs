//! Helpers shared by the integration tests: fixture paths, HF references, relative errors,
//! checkpoint tensors and self-cleaning temporary directories.
#![allow(dead_code)]
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fla_core::io::SafeTensorsFile;
use fla_core::Tensor;

/// Every tiny fixture checkpoint.
pub const MODELS: [&str; 3] = ["qwen3_5_tiny", "qwen3_next_tiny", "kimi_linear_tiny"];

/// `../shared/fixtures/models/<name>`, or `$FLA_MODELS_DIR/<name>` where that is set (a GPU
/// machine running a prebuilt test binary, `scripts/gpu-run.sh`).
pub fn model_dir(name: &str) -> PathBuf {
    match std::env::var_os("FLA_MODELS_DIR") {
        Some(dir) => PathBuf::from(dir).join(name),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/models").join(name),
    }
}

/// The HF reference of a fixture (`reference.safetensors`).
pub struct Reference {
    /// `input_ids [2, 41]`.
    pub input_ids: Vec<Vec<u32>>,
    /// `logits [2, 41, vocab]` of `input_ids` in one pass.
    pub logits: Vec<f32>,
    /// The 12-token prompt followed by 24 greedy tokens.
    pub gen_ids: Vec<u32>,
    /// Prompt length within `gen_ids`.
    pub prompt_len: usize,
    /// `gen_full_logits [1, 36, vocab]`: logits of `gen_ids` in one pass.
    pub gen_full_logits: Vec<f32>,
    /// Metadata (`prompt`, `generated_text`).
    pub meta: std::collections::HashMap<String, String>,
}

pub fn reference(name: &str) -> Reference {
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
        meta: f.metadata().unwrap(),
    }
}

/// ‖a − b‖ / ‖b‖ in f64 (NaN if either holds a NaN).
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "rel_err: lengths differ");
    let a: Vec<f64> = a.iter().map(|&x| x as f64).collect();
    let b: Vec<f64> = b.iter().map(|&x| x as f64).collect();
    fla_core::cpu::rel_err(&a, &b)
}

/// Every tensor of a checkpoint's `model.safetensors`.
pub fn load_tensors(dir: &Path) -> BTreeMap<String, Tensor> {
    let f = SafeTensorsFile::open(dir.join("model.safetensors")).unwrap();
    f.names().into_iter().map(|n| (n.clone(), f.tensor(&n).unwrap())).collect()
}

/// A directory `temp_dir()/fla-models-<pid>-<test>`, emptied on creation and removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("fla-models-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
