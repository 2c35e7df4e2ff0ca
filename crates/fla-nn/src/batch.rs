//! The token rows of one forward call, and their index tables on a GPU.
use std::ops::Range;
use std::sync::Arc;

use fla_core::cuda::cudarc::driver::{CudaSlice, DevicePtr};
use fla_core::cuda::CudaDevice;
use fla_core::{Error, Result};

/// Sequences packed back to back in the rows of the activations `[tokens, features]`: sequence
/// `i` owns rows `seqs[i]` and already has `past[i]` tokens in its cache (its first new token
/// sits at position `past[i]`).
///
/// On a GPU the layers read the batch through its [`BatchTables`]: attached once per forward
/// ([`Batch::with_tables`]) they are shared by every layer (and can be rewritten in place
/// between replays of a captured decode step); without them each layer uploads its own.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Rows of each sequence.
    pub seqs: Vec<Range<usize>>,
    /// Tokens each sequence already holds in the cache.
    pub past: Vec<usize>,
    /// The batch's index tables on a device, when attached.
    pub tables: Option<Arc<BatchTables>>,
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
        Batch { seqs, past: past.to_vec(), tables: None }
    }
    /// This batch with its [`BatchTables`] uploaded to `dev` (one copy), for the GPU layers.
    pub fn with_tables(mut self, dev: &Arc<CudaDevice>) -> Result<Self> {
        self.tables = Some(Arc::new(BatchTables::new(dev, &self.cu_seqlens(), &self.past)?));
        Ok(self)
    }
    /// The attached tables when they are on `dev`, otherwise the tables uploaded now.
    pub fn tables_on(&self, dev: &Arc<CudaDevice>) -> Result<Arc<BatchTables>> {
        match &self.tables {
            Some(t) if t.dev.ordinal() == dev.ordinal() => Ok(t.clone()),
            _ => Ok(Arc::new(BatchTables::new(dev, &self.cu_seqlens(), &self.past)?)),
        }
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

/// The index tables of a packed batch on a GPU, in one i32 buffer: `cu_seqlens [N + 1]`, then
/// the sequence of each token `[tokens]`, then each token's position in its sequence
/// `[tokens]` (`past[i]` for its first new token). The kernels of the GPU layers read them
/// instead of each uploading its own; a captured decode step reads them at their fixed address,
/// rewritten with [`BatchTables::write`] before each replay.
#[derive(Debug)]
pub struct BatchTables {
    dev: Arc<CudaDevice>,
    buf: CudaSlice<i32>,
    n: usize,
    tokens: usize,
}

impl BatchTables {
    /// The tables of sequences packed by `cu_seqlens` (checked: 0 first, non-decreasing) with
    /// `past[i]` tokens before sequence `i`, uploaded to `dev`.
    pub fn new(dev: &Arc<CudaDevice>, cu_seqlens: &[usize], past: &[usize]) -> Result<Self> {
        let host = Self::host("BatchTables::new", cu_seqlens, past)?;
        let n = cu_seqlens.len() - 1;
        let buf = dev.stream().clone_htod(&host)?;
        Ok(BatchTables { dev: dev.clone(), buf, n, tokens: cu_seqlens[n] })
    }
    /// Rewrites the tables in place for a batch of the same sequence count and token count (the
    /// next step of a captured decode).
    pub fn write(&mut self, cu_seqlens: &[usize], past: &[usize]) -> Result<()> {
        const OP: &str = "BatchTables::write";
        let host = Self::host(OP, cu_seqlens, past)?;
        if host.len() != self.buf.len() {
            return Err(Error::size(
                OP,
                format!(
                    "{} sequences of {} tokens for tables of {} sequences of {}",
                    cu_seqlens.len() - 1,
                    cu_seqlens[cu_seqlens.len() - 1],
                    self.n,
                    self.tokens
                ),
            ));
        }
        self.dev.stream().memcpy_htod(&host, &mut self.buf)?;
        Ok(())
    }
    fn host(op: &'static str, cu: &[usize], past: &[usize]) -> Result<Vec<i32>> {
        let seqs = fla_ops::check_cu_seqlens(op, cu, cu.last().copied().unwrap_or(0))?;
        if past.len() != seqs.len() {
            return Err(Error::size(op, format!("{} sequences but {} past lengths", seqs.len(), past.len())));
        }
        let i32_of = |what: &str, v: usize| {
            i32::try_from(v)
                .map_err(|_| Error::size(op, format!("{what} = {v} does not fit the kernels' 32-bit index")))
        };
        let tokens = cu[seqs.len()];
        let mut t = Vec::with_capacity(cu.len() + 2 * tokens);
        for &c in cu {
            t.push(i32_of("cu_seqlens entry", c)?);
        }
        for (i, r) in seqs.iter().enumerate() {
            t.extend(std::iter::repeat_n(i32_of("sequence index", i)?, r.len()));
        }
        for (r, &p) in seqs.iter().zip(past) {
            for j in 0..r.len() {
                t.push(i32_of("position", p + j)?);
            }
        }
        Ok(t)
    }
    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.n
    }
    /// Whether there are no sequences.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
    /// Total tokens.
    pub fn tokens(&self) -> usize {
        self.tokens
    }
    /// The device the tables live on.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }
    fn base(&self) -> u64 {
        self.buf.device_ptr(self.dev.stream()).0
    }
    /// Device address of `cu_seqlens [N + 1]`.
    pub fn cu_seqlens_addr(&self) -> u64 {
        self.base()
    }
    /// Device address of the sequence of each token `[tokens]`.
    pub fn seq_of_addr(&self) -> u64 {
        self.base() + 4 * (self.n + 1) as u64
    }
    /// Device address of each token's position `[tokens]`.
    pub fn pos_addr(&self) -> u64 {
        self.base() + 4 * (self.n + 1 + self.tokens) as u64
    }
}
