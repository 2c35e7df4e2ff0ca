//! From user tensors to per-(sequence, value head) compute arrays and back.
//!
//! Every form runs the same pipeline: validate ([`Problem`]), convert to the compute float `F` and
//! apply the in-op options ([`Prepared::new`]: L2 norm of q/k, sigmoid of beta / b / w, the gate
//! `g = −exp(A_log)·softplus(a + dt_bias)`), gather one contiguous [`HeadData`] per
//! (sequence, value head) and run the form on it in parallel ([`Prepared::map_heads`]), then
//! scatter the results back ([`Prepared::output`], [`Prepared::grads`]), chaining gradients
//! through the in-op options.
use std::borrow::Cow;

use fla_core::{DType, Element, Float, Result, Tensor};
use rayon::prelude::*;

use crate::{Decay, Erase, Family, Grads, Inputs, Options, Output, Problem, Write};

const L2_EPS: f64 = 1e-6;

/// One (sequence, value head) slice of the inputs, contiguous and ready for a form.
pub(crate) struct HeadData<F> {
    /// Tokens in the sequence.
    pub len: usize,
    /// Key dimension.
    pub dk: usize,
    /// Value dimension.
    pub dv: usize,
    /// `[len, K]`, already scaled by nothing (the form applies `scale`).
    pub q: Vec<F>,
    /// `[len, K]`.
    pub k: Vec<F>,
    /// `[len, V]`.
    pub v: Vec<F>,
    /// Log decays: `[len]` (head decay, zeros without decay) or `[len, K]` (channel decay).
    pub g: Vec<F>,
    /// Whether `g` is per channel.
    pub channel: bool,
    /// Erase gate `[len, K]`, `None` for the GLA family.
    pub b: Option<Vec<F>>,
    /// Write gate `[len, V]`.
    pub w: Vec<F>,
    /// Initial state `[K, V]`; empty when none was given (zeros).
    pub h0: Vec<F>,
    /// Query scale.
    pub scale: F,
}

impl<F: Float> HeadData<F> {
    /// The initial state `[K, V]` as an owned array (zeros when none was given).
    pub fn initial_state(&self) -> Vec<F> {
        if self.h0.is_empty() {
            vec![F::zero(); self.dk * self.dv]
        } else {
            self.h0.clone()
        }
    }
}

/// Gradients of one (sequence, value head), shaped as its [`HeadData`].
pub(crate) struct HeadGrads<F> {
    pub dq: Vec<F>,
    pub dk: Vec<F>,
    pub dv: Vec<F>,
    pub dg: Vec<F>,
    pub db: Option<Vec<F>>,
    pub dw: Vec<F>,
    pub dh0: Vec<F>,
}

/// Per-head forward result: output rows `[len, V]` and final state `[K, V]`.
pub(crate) struct HeadOut<F> {
    pub o: Vec<F>,
    pub ht: Vec<F>,
}

/// Inputs converted to `F` with the in-op options applied, plus what their backward needs.
pub(crate) struct Prepared<'a, F: Clone> {
    pub p: Problem,
    out_dtype: DType,
    in_dtypes: InDtypes,
    q: Cow<'a, [F]>,
    k: Cow<'a, [F]>,
    q_rstd: Vec<F>,
    k_rstd: Vec<F>,
    v: Cow<'a, [F]>,
    /// Post-gate log decay (empty without decay).
    g: Cow<'a, [F]>,
    /// Raw gate input `a + dt_bias` and `exp(A_log)` per value head, with the in-op gate.
    gate: Option<(Vec<F>, Vec<F>)>,
    beta: Cow<'a, [F]>,
    bg: Cow<'a, [F]>,
    wg: Cow<'a, [F]>,
    sigmoid: bool,
    h0: Option<Vec<F>>,
}

/// What the gradients need to know of inputs that are not kept: their dtypes and shapes.
struct InDtypes {
    h0: DType,
    a_log: DType,
    dt_bias: (DType, Vec<usize>),
    has_g: bool,
}

fn sigmoid<F: Float>(x: F) -> F {
    F::one() / (F::one() + (-x).exp())
}

fn softplus<F: Float>(x: F) -> F {
    if x.to_f64() > 20.0 {
        x
    } else {
        (F::one() + x.exp()).ln()
    }
}

fn l2norm<F: Float>(x: &mut [F], dim: usize) -> Vec<F> {
    x.par_chunks_mut(dim)
        .map(|row| {
            let ss: F = row.iter().map(|&a| a * a).sum();
            let r = F::one() / (ss + F::from_f64(L2_EPS)).sqrt();
            row.iter_mut().for_each(|a| *a *= r);
            r
        })
        .collect()
}

/// `dx = r·(dy − y·(y·dy))` for `y = x·r`, in place on `dy`.
fn l2norm_backward<F: Float>(dy: &mut [F], y: &[F], rstd: &[F], dim: usize) {
    dy.par_chunks_mut(dim).zip(y.par_chunks(dim)).zip(rstd.par_iter()).for_each(|((d, y), &r)| {
        let dot: F = d.iter().zip(y).map(|(&a, &b)| a * b).sum();
        d.iter_mut().zip(y).for_each(|(a, &b)| *a = r * (*a - b * dot));
    });
}

/// The elements of `t` in `F`: borrowed when already contiguous `F`, converted otherwise.
fn load<F: Float + Element>(t: &Tensor) -> Result<Cow<'_, [F]>> {
    if t.dtype() == F::DTYPE && t.is_contiguous() {
        Ok(Cow::Borrowed(t.as_slice()?))
    } else {
        Ok(Cow::Owned(t.to_vec()?))
    }
}

fn load_opt<F: Float + Element>(t: Option<&Tensor>) -> Result<Cow<'_, [F]>> {
    t.map_or(Ok(Cow::Owned(Vec::new())), load)
}

impl<'a, F: Float + Element> Prepared<'a, F> {
    /// Converts and preprocesses the validated inputs.
    pub fn new(p: Problem, x: &Inputs<'a>, opts: &Options) -> Result<Self> {
        let d = p.dims;
        let (mut q, mut k) = (load::<F>(x.q)?, load::<F>(x.k)?);
        let (q_rstd, k_rstd) = if opts.use_qk_l2norm_in_kernel {
            (l2norm(q.to_mut(), d.k), l2norm(k.to_mut(), d.k))
        } else {
            (Vec::new(), Vec::new())
        };
        let mut g = load_opt::<F>(x.g)?;
        let gate = if opts.use_gate_in_kernel {
            let a_log: Vec<F> = x.a_log.expect("validated").to_vec()?;
            let dt: Vec<F> = x.dt_bias.expect("validated").to_vec()?;
            let per_head = g.len() / (d.b * d.t * d.hv).max(1);
            let e_a: Vec<F> = a_log.iter().map(|&a| a.exp()).collect();
            let mut raw = g.to_vec();
            for (i, (r, gi)) in raw.iter_mut().zip(g.to_mut().iter_mut()).enumerate() {
                let head = (i / per_head) % d.hv;
                let dt_i = if dt.len() == d.hv { head } else { head * d.k + i % per_head };
                *r += dt[dt_i];
                *gi = -e_a[head] * softplus(*r);
            }
            Some((raw, e_a))
        } else {
            None
        };
        let sig = opts.use_beta_sigmoid_in_kernel;
        let act = |t: Option<&'a Tensor>| -> Result<Cow<'a, [F]>> {
            let mut v = load_opt::<F>(t)?;
            if sig {
                v.to_mut().iter_mut().for_each(|x| *x = sigmoid(*x));
            }
            Ok(v)
        };
        let (beta, bg, wg) = (act(x.beta)?, act(x.b)?, act(x.w)?);
        let h0 = x.initial_state.map(|t| t.to_vec()).transpose()?;
        let in_dtypes = InDtypes {
            h0: x.initial_state.map_or(DType::F32, |t| t.dtype()),
            a_log: x.a_log.map_or(DType::F32, |t| t.dtype()),
            dt_bias: x.dt_bias.map_or((DType::F32, Vec::new()), |t| (t.dtype(), t.shape().to_vec())),
            has_g: x.g.is_some(),
        };
        Ok(Prepared {
            out_dtype: x.q.dtype(),
            in_dtypes,
            v: load(x.v)?,
            q,
            k,
            q_rstd,
            k_rstd,
            g,
            gate,
            beta,
            bg,
            wg,
            sigmoid: sig,
            h0,
            p,
        })
    }

    fn family(&self) -> Family {
        self.p.family
    }

    /// Gathers the contiguous slice of sequence `n`, value head `hv`.
    pub fn head(&self, n: usize, hv: usize) -> HeadData<F> {
        let d = self.p.dims;
        let range = self.p.seqs[n].clone();
        let len = range.len();
        let h = hv / d.group();
        let rows = |src: &[F], heads: usize, head: usize, dim: usize| -> Vec<F> {
            let mut out = Vec::with_capacity(len * dim);
            for t in range.clone() {
                let o = (t * heads + head) * dim;
                out.extend_from_slice(&src[o..o + dim]);
            }
            out
        };
        let broadcast = |src: &[F], dim: usize| -> Vec<F> {
            let mut out = Vec::with_capacity(len * dim);
            for t in range.clone() {
                out.extend(std::iter::repeat_n(src[t * d.hv + hv], dim));
            }
            out
        };
        let fam = self.family();
        let g = match fam.decay() {
            Decay::Channel => rows(&self.g, d.hv, hv, d.k),
            _ if self.g.is_empty() => vec![F::zero(); len],
            _ => rows(&self.g, d.hv, hv, 1),
        };
        let b = match fam.erase() {
            Erase::None => None,
            Erase::Beta => Some(broadcast(&self.beta, d.k)),
            Erase::Channel => Some(rows(&self.bg, d.hv, hv, d.k)),
        };
        let w = match fam.write() {
            Write::One => vec![F::one(); len * d.v],
            Write::Beta => broadcast(&self.beta, d.v),
            Write::Channel => rows(&self.wg, d.hv, hv, d.v),
        };
        let kv = d.k * d.v;
        let h0 = self.h0.as_ref().map_or_else(Vec::new, |h| h[(n * d.hv + hv) * kv..][..kv].to_vec());
        HeadData {
            len,
            dk: d.k,
            dv: d.v,
            q: rows(&self.q, d.h, h, d.k),
            k: rows(&self.k, d.h, h, d.k),
            v: rows(&self.v, d.hv, hv, d.v),
            g,
            channel: fam.decay() == Decay::Channel,
            b,
            w,
            h0,
            scale: F::from_f64(self.p.scale),
        }
    }

    /// Runs `f(i, head)` on every (sequence, value head) `i = n·HV + hv` in parallel; results in
    /// that order.
    pub fn map_heads<R: Send>(&self, f: impl Fn(usize, HeadData<F>) -> R + Sync) -> Vec<R> {
        let d = self.p.dims;
        (0..d.n * d.hv).into_par_iter().map(|i| f(i, self.head(i / d.hv, i % d.hv))).collect()
    }

    /// The rows of head `i = n·HV + hv` of a `[B,T,HV,dim]` array (an upstream gradient).
    pub fn rows_of(&self, src: &[F], i: usize, dim: usize) -> Vec<F> {
        let d = self.p.dims;
        let hv = i % d.hv;
        self.p.seqs[i / d.hv].clone().flat_map(|t| src[(t * d.hv + hv) * dim..][..dim].iter().copied()).collect()
    }

    fn scatter_rows(
        &self,
        parts: impl Iterator<Item = (usize, Vec<F>)>,
        heads: usize,
        dim: usize,
        group: usize,
    ) -> Vec<F> {
        let d = self.p.dims;
        let mut out = vec![F::zero(); d.b * d.t * heads * dim];
        for (i, part) in parts {
            let (n, head) = (i / d.hv, (i % d.hv) / group);
            for (r, t) in self.p.seqs[n].clone().enumerate() {
                let dst = &mut out[(t * heads + head) * dim..][..dim];
                dst.iter_mut().zip(&part[r * dim..][..dim]).for_each(|(a, &b)| *a += b);
            }
        }
        out
    }

    fn tensor(&self, data: Vec<F>, shape: &[usize], dtype: DType) -> Result<Tensor> {
        Tensor::from_vec(data, shape)?.to_dtype(dtype)
    }

    /// Assembles the forward results of every head.
    pub fn output(&self, heads: Vec<HeadOut<F>>, want_state: bool) -> Result<Output> {
        let d = self.p.dims;
        let state_dtype = if self.p.f64 { DType::F64 } else { DType::F32 };
        let mut ht = Vec::with_capacity(if want_state { heads.len() * d.k * d.v } else { 0 });
        let mut o_parts = Vec::with_capacity(heads.len());
        for (i, h) in heads.into_iter().enumerate() {
            if want_state {
                ht.extend_from_slice(&h.ht);
            }
            o_parts.push((i, h.o));
        }
        let o = self.scatter_rows(o_parts.into_iter(), d.hv, d.v, 1);
        let o = self.tensor(o, &[d.b, d.t, d.hv, d.v], self.out_dtype)?;
        let final_state = want_state.then(|| self.tensor(ht, &[d.n, d.hv, d.k, d.v], state_dtype)).transpose()?;
        Ok(Output { o, final_state })
    }

    /// Assembles the gradients of every head and chains them through the in-op options.
    pub fn grads(&self, heads: Vec<HeadGrads<F>>, has_h0: bool) -> Result<Grads> {
        let d = self.p.dims;
        let fam = self.family();
        let dt = self.out_dtype;
        let mut dq = self.scatter_rows(heads.iter().map(|h| h.dq.clone()).enumerate(), d.h, d.k, d.group());
        let mut dk = self.scatter_rows(heads.iter().map(|h| h.dk.clone()).enumerate(), d.h, d.k, d.group());
        if !self.q_rstd.is_empty() {
            l2norm_backward(&mut dq, &self.q, &self.q_rstd, d.k);
            l2norm_backward(&mut dk, &self.k, &self.k_rstd, d.k);
        }
        let dv = self.scatter_rows(heads.iter().map(|h| h.dv.clone()).enumerate(), d.hv, d.v, 1);
        // Reduce the broadcast erase/write gates back to beta [B,T,HV].
        let reduce = |x: &[F], dim: usize| -> Vec<F> { x.chunks(dim).map(|c| c.iter().copied().sum()).collect() };
        let sig_bwd = |dx: &mut Vec<F>, y: &[F]| {
            if self.sigmoid {
                dx.iter_mut().zip(y).for_each(|(a, &s)| *a *= s * (F::one() - s));
            }
        };
        let mut dbeta = None;
        let (mut db, mut dw) = (None, None);
        match (fam.erase(), fam.write()) {
            (Erase::Beta, Write::Beta) => {
                let mut acc = self.scatter_rows(
                    heads.iter().map(|h| reduce(h.db.as_ref().expect("erase"), d.k)).enumerate(),
                    d.hv,
                    1,
                    1,
                );
                let dwr = self.scatter_rows(heads.iter().map(|h| reduce(&h.dw, d.v)).enumerate(), d.hv, 1, 1);
                acc.iter_mut().zip(&dwr).for_each(|(a, &b)| *a += b);
                sig_bwd(&mut acc, &self.beta);
                dbeta = Some(self.tensor(acc, &[d.b, d.t, d.hv], dt)?);
            }
            (Erase::Channel, Write::Channel) => {
                let mut x =
                    self.scatter_rows(heads.iter().map(|h| h.db.clone().expect("erase")).enumerate(), d.hv, d.k, 1);
                sig_bwd(&mut x, &self.bg);
                db = Some(self.tensor(x, &[d.b, d.t, d.hv, d.k], dt)?);
                let mut x = self.scatter_rows(heads.iter().map(|h| h.dw.clone()).enumerate(), d.hv, d.v, 1);
                sig_bwd(&mut x, &self.wg);
                dw = Some(self.tensor(x, &[d.b, d.t, d.hv, d.v], dt)?);
            }
            _ => {}
        }
        let (mut dg, mut da_log, mut ddt_bias) = (None, None, None);
        if self.in_dtypes.has_g {
            let per_head = if fam.decay() == Decay::Channel { d.k } else { 1 };
            let mut x = self.scatter_rows(heads.iter().map(|h| h.dg.clone()).enumerate(), d.hv, per_head, 1);
            if let Some((raw, e_a)) = &self.gate {
                // g = −e_a·softplus(r): dA_log = Σ dg·g, da = dg·(−e_a)·σ(r), ddt_bias = Σ_tokens da.
                let mut d_alog = vec![F::zero(); d.hv];
                let dt_len = self.dt_len();
                let mut d_dt = vec![F::zero(); dt_len];
                for (i, (dx, &r)) in x.iter_mut().zip(raw).enumerate() {
                    let head = (i / per_head) % d.hv;
                    d_alog[head] += *dx * self.g[i];
                    *dx = *dx * (-e_a[head]) * sigmoid(r);
                    d_dt[if dt_len == d.hv { head } else { head * d.k + i % per_head }] += *dx;
                }
                da_log = Some(self.tensor(d_alog, &[d.hv], self.in_dtypes.a_log)?);
                let (dt_dtype, dt_shape) = &self.in_dtypes.dt_bias;
                ddt_bias = Some(self.tensor(d_dt, dt_shape, *dt_dtype)?);
            }
            let shape = if fam.decay() == Decay::Channel { vec![d.b, d.t, d.hv, d.k] } else { vec![d.b, d.t, d.hv] };
            dg = Some(self.tensor(x, &shape, dt)?);
        }
        let dh0 = has_h0
            .then(|| {
                let data: Vec<F> = heads.iter().flat_map(|h| h.dh0.iter().copied()).collect();
                self.tensor(data, &[d.n, d.hv, d.k, d.v], self.in_dtypes.h0)
            })
            .transpose()?;
        Ok(Grads {
            dq: self.tensor(dq, &[d.b, d.t, d.h, d.k], dt)?,
            dk: self.tensor(dk, &[d.b, d.t, d.h, d.k], dt)?,
            dv: self.tensor(dv, &[d.b, d.t, d.hv, d.v], dt)?,
            dg,
            dbeta,
            db,
            dw,
            dh0,
            da_log,
            ddt_bias,
        })
    }

    fn dt_len(&self) -> usize {
        let d = self.p.dims;
        if self.family().decay() == Decay::Head {
            d.hv
        } else {
            d.hv * d.k
        }
    }
}
