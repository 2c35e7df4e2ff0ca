//! Named access to checkpoint tensors, with the prefix pushed by each layer (`vb.pp("mlp")`).
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use fla_core::io::SafeTensorsFile;
use fla_core::{Error, Result, Tensor};

enum Source {
    Files { files: Vec<SafeTensorsFile>, index: HashMap<String, usize> },
    Map(HashMap<String, Tensor>),
}

/// A view of a set of named tensors under a prefix. Cloning is cheap.
#[derive(Clone)]
pub struct VarBuilder {
    source: Arc<Source>,
    prefix: String,
}

impl VarBuilder {
    /// Tensors from safetensors files (one file, or the shards of an index); a name found in two
    /// files is an error.
    pub fn from_files(paths: &[impl AsRef<Path>]) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            let f = SafeTensorsFile::open(p)?;
            for name in f.names() {
                if index.insert(name.clone(), i).is_some() {
                    return Err(Error::Msg(format!("tensor `{name}` appears in two checkpoint files")));
                }
            }
            files.push(f);
        }
        Ok(VarBuilder { source: Arc::new(Source::Files { files, index }), prefix: String::new() })
    }

    /// Tensors from memory (tests, random-weight benchmarks).
    pub fn from_tensors(map: HashMap<String, Tensor>) -> Self {
        VarBuilder { source: Arc::new(Source::Map(map)), prefix: String::new() }
    }

    /// The same tensors under `prefix.name`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        VarBuilder { source: self.source.clone(), prefix: self.path(&name.to_string()) }
    }

    /// Full name of `name` under this prefix.
    pub fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Whether `name` exists under this prefix.
    pub fn contains(&self, name: &str) -> bool {
        let full = self.path(name);
        match &*self.source {
            Source::Files { index, .. } => index.contains_key(&full),
            Source::Map(m) => m.contains_key(&full),
        }
    }

    /// Tensor `name`, whatever its shape.
    pub fn get_any(&self, name: &str) -> Result<Tensor> {
        let full = self.path(name);
        let missing = || Error::MissingTensor { name: full.clone(), context: " in the checkpoint".into() };
        match &*self.source {
            Source::Files { files, index } => files[*index.get(&full).ok_or_else(missing)?].tensor(&full),
            Source::Map(m) => m.get(&full).cloned().ok_or_else(missing),
        }
    }

    /// Tensor `name`, which must have `shape`; a tensor with the same elements in another
    /// arrangement of unit axes (Kimi's `A_log [1,1,H,1]` for `[H]`) is reshaped.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.get_any(name)?;
        if t.shape() == shape {
            return Ok(t);
        }
        let squeeze = |s: &[usize]| s.iter().copied().filter(|&d| d != 1).collect::<Vec<_>>();
        if squeeze(t.shape()) == squeeze(shape) {
            return t.reshape(shape);
        }
        Err(Error::TensorShape { name: self.path(name), expected: shape.to_vec(), got: t.shape().to_vec() })
    }

    /// Tensor `name` as f32 values, checked against `shape`.
    pub fn get_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.get(name, shape)?.to_vec()
    }
}
