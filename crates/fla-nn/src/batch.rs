//! The token rows of one forward call.
use std::ops::Range;

use fla_core::{Error, Result};

/// Sequences packed back to back in the rows of the activations `[tokens, features]`: sequence
/// `i` owns rows `seqs[i]` and already has `past[i]` tokens in its cache (its first new token
/// sits at position `past[i]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Rows of each sequence.
    pub seqs: Vec<Range<usize>>,
    /// Tokens each sequence already holds in the cache.
    pub past: Vec<usize>,
}

impl Batch {
    /// New tokens of `lens.len()` sequences, packed, each continuing after `past[i]` cached tokens.
    pub fn new(lens: &[usize], past: &[usize]) -> Self {
        assert_eq!(lens.len(), past.len(), "Batch::new: one past length per sequence");
        let mut start = 0;
        let seqs = lens
            .iter()
            .map(|&l| {
                start += l;
                start - l..start
            })
            .collect();
        Batch { seqs, past: past.to_vec() }
    }
    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.seqs.len()
    }
    /// Whether there are no sequences.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }
    /// Total rows.
    pub fn tokens(&self) -> usize {
        self.seqs.last().map_or(0, |r| r.end)
    }
    /// `cu_seqlens` of the packed rows.
    pub fn cu_seqlens(&self) -> Vec<usize> {
        std::iter::once(0).chain(self.seqs.iter().map(|r| r.end)).collect()
    }
    /// Whether every sequence brings exactly one token (a decoding step).
    pub fn is_decode(&self) -> bool {
        self.seqs.iter().all(|r| r.len() == 1)
    }

    /// Checks that `x` holds [`Batch::tokens`] rows of `hidden` features and that the sequences
    /// are packed back to back from row 0, with one past length each; `op` names the caller.
    pub fn check_rows(&self, op: &'static str, x: &[f32], hidden: usize) -> Result<()> {
        if self.past.len() != self.seqs.len() {
            return Err(Error::size(
                op,
                format!("batch has {} sequences but {} past lengths", self.seqs.len(), self.past.len()),
            ));
        }
        let mut end = 0;
        for (i, r) in self.seqs.iter().enumerate() {
            if r.start != end || r.end < r.start {
                return Err(Error::size(
                    op,
                    format!("batch sequence {i} covers rows {r:?}, expected to start at row {end}"),
                ));
            }
            end = r.end;
        }
        let tokens = self.tokens();
        if x.len() != tokens * hidden {
            return Err(Error::shape(
                op,
                "x",
                format!("[tokens = {tokens}, hidden = {hidden}] as a flat slice"),
                &[x.len()],
            ));
        }
        Ok(())
    }
}
