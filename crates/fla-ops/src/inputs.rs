//! Arguments of every form (FLA's names), their validation, and what the forms return.
use std::ops::Range;

use fla_core::{DType, Error, Result, Tensor, TensorMeta};

use crate::{Decay, Erase, Family, Write};

/// Tensors of one call. Which of `g`, `beta`, `b`, `w` are required depends on the [`Family`];
/// passing one the family does not take is an error, not silently ignored.
///
/// `T` is the tensor type: host [`Tensor`]s for the CPU forms, or
/// [`CudaTensor`](fla_core::cuda::CudaTensor)s for the GPU forms; all must live on one device.
pub struct Inputs<'a, T = Tensor> {
    /// Queries `[B,T,H,K]`.
    pub q: &'a T,
    /// Keys `[B,T,H,K]`.
    pub k: &'a T,
    /// Values `[B,T,HV,V]`, `HV` a multiple of `H`.
    pub v: &'a T,
    /// Natural-log decay `[B,T,HV]` (head decay) or `[B,T,HV,K]` (channel decay); with
    /// `use_gate_in_kernel` it is the raw gate input `a` of `g = −exp(A_log)·softplus(a + dt_bias)`.
    pub g: Option<&'a T>,
    /// `[B,T,HV]`: erase and write strength of DeltaNet, Gated DeltaNet and KDA (post-sigmoid unless
    /// `use_beta_sigmoid_in_kernel`).
    pub beta: Option<&'a T>,
    /// GDN-2 erase gate `[B,T,HV,K]`.
    pub b: Option<&'a T>,
    /// GDN-2 write gate `[B,T,HV,V]`.
    pub w: Option<&'a T>,
    /// Initial state `[N,HV,K,V]`, one per sequence.
    pub initial_state: Option<&'a T>,
    /// `A_log [HV]` of the in-op gate.
    pub a_log: Option<&'a T>,
    /// `dt_bias` of the in-op gate: `[HV]` (head decay) or `[HV·K]` / `[HV,K]` (channel decay).
    pub dt_bias: Option<&'a T>,
    /// Packed variable-length batch: `[N+1]` offsets into `T`, `B` must be 1.
    pub cu_seqlens: Option<&'a [usize]>,
}

impl<T> Clone for Inputs<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Inputs<'_, T> {}

impl<'a, T> Inputs<'a, T> {
    /// Inputs with only `q`, `k`, `v` set; fill the rest with struct update syntax.
    pub fn new(q: &'a T, k: &'a T, v: &'a T) -> Self {
        Inputs {
            q,
            k,
            v,
            g: None,
            beta: None,
            b: None,
            w: None,
            initial_state: None,
            a_log: None,
            dt_bias: None,
            cu_seqlens: None,
        }
    }
}

/// Scalar options of every form, with FLA's defaults.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Query scale; `None` means `K^-1/2`.
    pub scale: Option<f64>,
    /// Return the final state of each sequence.
    pub output_final_state: bool,
    /// L2-normalise q and k inside the op: `x·rsqrt(Σx² + 1e-6)`.
    pub use_qk_l2norm_in_kernel: bool,
    /// Apply a sigmoid to `beta` (or to `b` and `w` for GDN-2) inside the op.
    pub use_beta_sigmoid_in_kernel: bool,
    /// Compute `g = −exp(A_log)·softplus(g + dt_bias)` inside the op.
    pub use_gate_in_kernel: bool,
}

/// Forward results.
#[derive(Debug, Clone)]
pub struct Output {
    /// `o [B,T,HV,V]` in the dtype of `q`.
    pub o: Tensor,
    /// `[N,HV,K,V]` in f32 (f64 when computing in f64), when requested.
    pub final_state: Option<Tensor>,
}

/// Gradients of `Σ o·do + Σ ht·dht` with respect to every input that was given, each in its
/// input's dtype (f32 for `dh0`). `T`: host [`Tensor`]s, or `CudaTensor`s from the GPU backward.
#[derive(Debug, Clone)]
pub struct Grads<T = Tensor> {
    /// Gradient of `q`.
    pub dq: T,
    /// Gradient of `k`.
    pub dk: T,
    /// Gradient of `v`.
    pub dv: T,
    /// Gradient of `g` (of the raw gate input with `use_gate_in_kernel`).
    pub dg: Option<T>,
    /// Gradient of `beta`.
    pub dbeta: Option<T>,
    /// Gradient of `b`.
    pub db: Option<T>,
    /// Gradient of `w`.
    pub dw: Option<T>,
    /// Gradient of the initial state.
    pub dh0: Option<T>,
    /// Gradient of `A_log`.
    pub da_log: Option<T>,
    /// Gradient of `dt_bias`.
    pub ddt_bias: Option<T>,
}

/// Sizes of a validated call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// Batch.
    pub b: usize,
    /// Tokens per batch row.
    pub t: usize,
    /// Query/key heads.
    pub h: usize,
    /// Value heads.
    pub hv: usize,
    /// Key dimension.
    pub k: usize,
    /// Value dimension.
    pub v: usize,
    /// Number of sequences (`B`, or `len(cu_seqlens) − 1`).
    pub n: usize,
}

impl Dims {
    /// Value heads per query/key head.
    pub fn group(&self) -> usize {
        self.hv / self.h
    }
}

/// A validated call: sizes, the token range of each sequence over the flattened `B·T` axis,
/// the compute dtype and the effective scale.
#[derive(Debug, Clone)]
pub struct Problem {
    /// The family.
    pub family: Family,
    /// Sizes.
    pub dims: Dims,
    /// Token ranges of the sequences over `B·T`.
    pub seqs: Vec<Range<usize>>,
    /// Compute in f64 (inputs are f64) rather than f32.
    pub f64: bool,
    /// Query scale.
    pub scale: f64,
}

fn rank4<T: TensorMeta>(op: &'static str, arg: &'static str, t: &T, what: &str) -> Result<[usize; 4]> {
    t.shape().try_into().map_err(|_| Error::shape(op, arg, format!("rank 4 {what}"), t.shape()))
}

fn expect_shape<T: TensorMeta>(op: &'static str, arg: &'static str, t: &T, want: &[usize], name: &str) -> Result<()> {
    if t.shape() != want {
        return Err(Error::shape(op, arg, format!("{name} = {want:?}"), t.shape()));
    }
    Ok(())
}

fn float_dtype<T: TensorMeta>(op: &'static str, arg: &'static str, t: &T, want: DType) -> Result<()> {
    if t.dtype() != want {
        return Err(Error::DType { op, arg, expected: format!("{want} (the dtype of q)"), got: t.dtype() });
    }
    Ok(())
}

fn presence<T>(op: &'static str, arg: &'static str, t: Option<&T>, needed: bool, family: Family) -> Result<()> {
    match (t.is_some(), needed) {
        (false, true) => Err(Error::Unsupported { op, msg: format!("argument `{arg}` is required by {family}") }),
        (true, false) => Err(Error::Unsupported { op, msg: format!("argument `{arg}` is not taken by {family}") }),
        _ => Ok(()),
    }
}

/// Checks `cu_seqlens` against `T` and returns the sequence ranges.
pub fn check_cu_seqlens(op: &'static str, cu: &[usize], t: usize) -> Result<Vec<Range<usize>>> {
    let bad = |msg: String| Err(Error::CuSeqlens { op, msg });
    if cu.len() < 2 {
        return bad(format!("must hold at least 2 offsets, got {}", cu.len()));
    }
    if cu[0] != 0 {
        return bad(format!("must start at 0, got {}", cu[0]));
    }
    if cu[cu.len() - 1] != t {
        return bad(format!("must end at T = {t}, got {}", cu[cu.len() - 1]));
    }
    if let Some(i) = (1..cu.len()).find(|&i| cu[i] < cu[i - 1]) {
        return bad(format!(
            "must be non-decreasing, but cu_seqlens[{i}] = {} < cu_seqlens[{}] = {}",
            cu[i],
            i - 1,
            cu[i - 1]
        ));
    }
    Ok(cu.windows(2).map(|w| w[0]..w[1]).collect())
}

impl Problem {
    /// Validates `inputs` for `family` under `opts`; `op` names the caller in errors. Every
    /// tensor must be on the device of `q`.
    pub fn new<T: TensorMeta>(op: &'static str, family: Family, x: &Inputs<'_, T>, opts: &Options) -> Result<Problem> {
        let [b, t, h, k] = rank4(op, "q", x.q, "[B,T,H,K]")?;
        expect_shape(op, "k", x.k, &[b, t, h, k], "q.shape")?;
        let [bv, tv, hv, v] = rank4(op, "v", x.v, "[B,T,HV,V]")?;
        if (bv, tv) != (b, t) {
            return Err(Error::shape(op, "v", format!("[B={b}, T={t}, HV, V] as q"), x.v.shape()));
        }
        if h == 0 || k == 0 || v == 0 || hv == 0 {
            return Err(Error::size(
                op,
                format!("head counts and dims must be positive, got H={h} HV={hv} K={k} V={v}"),
            ));
        }
        if hv % h != 0 {
            return Err(Error::size(op, format!("HV ({hv}) must be a multiple of H ({h})")));
        }
        let device = x.q.device();
        let all = [
            ("k", Some(x.k)),
            ("v", Some(x.v)),
            ("g", x.g),
            ("beta", x.beta),
            ("b", x.b),
            ("w", x.w),
            ("initial_state", x.initial_state),
            ("A_log", x.a_log),
            ("dt_bias", x.dt_bias),
        ];
        for (arg, t) in all {
            if let Some(t) = t.filter(|t| t.device() != device) {
                return Err(Error::Device {
                    op,
                    arg,
                    expected: format!("{device} (the device of q)"),
                    got: t.device().to_string(),
                });
            }
        }
        let dtype = x.q.dtype();
        for (arg, t) in [("k", Some(x.k)), ("v", Some(x.v)), ("g", x.g), ("beta", x.beta), ("b", x.b), ("w", x.w)] {
            if let Some(t) = t {
                float_dtype(op, arg, t, dtype)?;
            }
        }
        let needs_g = family.decay() != Decay::None && !family.gate_optional();
        if !(family.gate_optional() && x.g.is_some()) {
            presence(op, "g", x.g, needs_g, family)?;
        }
        presence(op, "beta", x.beta, family.erase() == Erase::Beta, family)?;
        presence(op, "b", x.b, family.erase() == Erase::Channel, family)?;
        presence(op, "w", x.w, family.write() == Write::Channel, family)?;
        if let Some(g) = x.g {
            match family.decay() {
                Decay::Head => expect_shape(op, "g", g, &[b, t, hv], "[B,T,HV]")?,
                _ => expect_shape(op, "g", g, &[b, t, hv, k], "[B,T,HV,K]")?,
            }
        }
        if let Some(beta) = x.beta {
            expect_shape(op, "beta", beta, &[b, t, hv], "[B,T,HV]")?;
        }
        if let Some(bt) = x.b {
            expect_shape(op, "b", bt, &[b, t, hv, k], "[B,T,HV,K]")?;
        }
        if let Some(w) = x.w {
            expect_shape(op, "w", w, &[b, t, hv, v], "[B,T,HV,V]")?;
        }
        let seqs = match x.cu_seqlens {
            Some(cu) => {
                if b != 1 {
                    return Err(Error::CuSeqlens { op, msg: format!("requires B = 1 (a packed batch), got B = {b}") });
                }
                check_cu_seqlens(op, cu, t)?
            }
            None => (0..b).map(|i| i * t..(i + 1) * t).collect(),
        };
        let n = seqs.len();
        if let Some(h0) = x.initial_state {
            expect_shape(op, "initial_state", h0, &[n, hv, k, v], "[N,HV,K,V]")?;
            if !matches!(h0.dtype(), DType::F32 | DType::F64) {
                return Err(Error::DType {
                    op,
                    arg: "initial_state",
                    expected: "f32 (or f64)".into(),
                    got: h0.dtype(),
                });
            }
        }
        if opts.use_gate_in_kernel {
            if family.decay() == Decay::None || x.g.is_none() {
                return Err(Error::Unsupported {
                    op,
                    msg: format!("use_gate_in_kernel needs a gate input `g`, and {family} has none here"),
                });
            }
            let a_log =
                x.a_log.ok_or_else(|| Error::Unsupported { op, msg: "use_gate_in_kernel requires `A_log`".into() })?;
            let dt = x
                .dt_bias
                .ok_or_else(|| Error::Unsupported { op, msg: "use_gate_in_kernel requires `dt_bias`".into() })?;
            if a_log.elem_count() != hv || a_log.rank() != 1 {
                return Err(Error::shape(op, "A_log", format!("[HV] = [{hv}]"), a_log.shape()));
            }
            let want = if family.decay() == Decay::Head { hv } else { hv * k };
            let ok = dt.shape() == [want] || (family.decay() == Decay::Channel && dt.shape() == [hv, k]);
            if !ok {
                let what = if family.decay() == Decay::Head {
                    format!("[HV] = [{hv}]")
                } else {
                    format!("[HV·K] = [{want}] or [HV,K]")
                };
                return Err(Error::shape(op, "dt_bias", what, dt.shape()));
            }
        } else if x.a_log.is_some() || x.dt_bias.is_some() {
            return Err(Error::Unsupported { op, msg: "`A_log` / `dt_bias` given without use_gate_in_kernel".into() });
        }
        let scale = opts.scale.unwrap_or(1.0 / (k as f64).sqrt());
        if !scale.is_finite() {
            return Err(Error::Unsupported { op, msg: format!("scale must be finite, got {scale}") });
        }
        Ok(Problem { family, dims: Dims { b, t, h, hv, k, v, n }, seqs, f64: dtype == DType::F64, scale })
    }
}
