//! Token embeddings.
use fla_core::{DType, Error, Result, Tensor};

use crate::{Linear, VarBuilder};

/// An embedding table `[vocab, hidden]` in its checkpoint dtype.
#[derive(Clone)]
pub struct Embedding {
    weight: Tensor,
    vocab: usize,
    hidden: usize,
}

impl Embedding {
    /// Loads `weight [vocab, hidden]`.
    pub fn load(vb: &VarBuilder, vocab: usize, hidden: usize) -> Result<Self> {
        let weight = vb.get("weight", &[vocab, hidden])?;
        if weight.dtype() == DType::F64 {
            return Err(Error::DType {
                op: "Embedding::load",
                arg: "weight",
                expected: "f32, bf16 or f16".into(),
                got: DType::F64,
            });
        }
        Ok(Embedding { weight, vocab, hidden })
    }

    /// Rows of `ids` as f32 `[ids.len(), hidden]`; an id outside the vocabulary is an error.
    pub fn forward(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(ids.len() * self.hidden);
        for &id in ids {
            if id as usize >= self.vocab {
                return Err(Error::Msg(format!("token id {id} is outside the vocabulary of {}", self.vocab)));
            }
            let row = self.weight.narrow(0, id as usize, 1)?;
            out.extend(row.to_vec::<f32>()?);
        }
        Ok(out)
    }

    /// The table `[vocab, hidden]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The table as an output projection (tied LM head).
    pub fn as_linear(&self) -> Result<Linear> {
        Linear::new(self.weight.clone(), None)
    }
}
