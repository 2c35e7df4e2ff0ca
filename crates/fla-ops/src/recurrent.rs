//! The fused recurrent step used for decoding: `T ≥ 1` new tokens for each of `N` sequences,
//! updating their f32 states in place (FLA: `fused_recurrent_gated_delta_rule`,
//! `fused_recurrent_kda`, ...).
//!
//! The state of one (sequence, value head) is walked in blocks of [`BLOCK_V`] value columns: the
//! erase `e = Sᵀ(b⊙k)` of a column depends on that column alone, so each block is decayed, read
//! for `e`, written and read for `o` while it sits in L1, and memory sees the state read once and
//! written once per call.
use fla_core::{DType, Error, Result, Tensor};
use rayon::prelude::*;

use crate::prepare::{HeadData, HeadOut, Prepared};
use crate::{Family, Inputs, Options, Problem};

/// Value columns per block of the state walk (one 64-byte line of f32).
pub const BLOCK_V: usize = 16;

/// Runs the recurrence over the new tokens of `x`, reading and updating `state [N,HV,K,V]` (f32)
/// in place, and returns `o [B,T,HV,V]` in the dtype of `q`. The state takes the place of
/// `initial_state`, which must be `None`; `output_final_state` is implied.
pub fn step(family: Family, x: &Inputs<'_>, opts: &Options, state: &mut Tensor) -> Result<Tensor> {
    const OP: &str = "recurrent::step";
    if x.initial_state.is_some() {
        return Err(Error::Unsupported { op: OP, msg: "pass the state as `state`, not `initial_state`".into() });
    }
    let p = Problem::new(OP, family, x, opts)?;
    let d = p.dims;
    if state.shape() != [d.n, d.hv, d.k, d.v] {
        return Err(Error::shape(
            OP,
            "state",
            format!("[N,HV,K,V] = [{}, {}, {}, {}]", d.n, d.hv, d.k, d.v),
            state.shape(),
        ));
    }
    if state.dtype() != DType::F32 {
        return Err(Error::DType { op: OP, arg: "state", expected: "f32".into(), got: state.dtype() });
    }
    let prep = Prepared::<f32>::new(p, x, opts)?;
    let kv = d.k * d.v;
    let s = state.as_mut_slice::<f32>()?;
    let heads: Vec<HeadOut<f32>> = s
        .par_chunks_mut(kv.max(1))
        .enumerate()
        .map(|(i, s)| HeadOut { o: head_step(&prep.head(i / d.hv, i % d.hv), s), ht: Vec::new() })
        .collect();
    Ok(prep.output(heads, false)?.o)
}

/// Per-token vectors shared by every column block: decay `exp(g)`, `b⊙k` and `scale·q`, each `[K]`.
struct TokenVecs {
    decay: Vec<f32>,
    bk: Vec<f32>,
    q: Vec<f32>,
}

fn token_vecs(x: &HeadData<f32>) -> TokenVecs {
    let (dk, n) = (x.dk, x.len * x.dk);
    let mut t = TokenVecs { decay: vec![0.0; n], bk: vec![0.0; n], q: vec![0.0; n] };
    for i in 0..n {
        let g = if x.channel { x.g[i] } else { x.g[i / dk] };
        t.decay[i] = g.exp();
        t.bk[i] = x.b.as_ref().map_or(0.0, |b| b[i] * x.k[i]);
        t.q[i] = x.scale * x.q[i];
    }
    t
}

/// Every token of one (sequence, value head) against its state `s [K,V]`; returns `o [len,V]`.
fn head_step(x: &HeadData<f32>, s: &mut [f32]) -> Vec<f32> {
    let dv = x.dv;
    let tv = token_vecs(x);
    let mut o = vec![0.0f32; x.len * dv];
    let full = dv / BLOCK_V * BLOCK_V;
    for v0 in (0..full).step_by(BLOCK_V) {
        block::<BLOCK_V>(x, &tv, s, &mut o, v0);
    }
    for v0 in full..dv {
        block::<1>(x, &tv, s, &mut o, v0);
    }
    o
}

/// All tokens against the `W` state columns starting at `v0`.
#[inline(always)]
fn block<const W: usize>(x: &HeadData<f32>, tv: &TokenVecs, s: &mut [f32], o: &mut [f32], v0: usize) {
    let (dk, dv) = (x.dk, x.dv);
    for t in 0..x.len {
        let (decay, bk) = (&tv.decay[t * dk..][..dk], &tv.bk[t * dk..][..dk]);
        let (k, q) = (&x.k[t * dk..][..dk], &tv.q[t * dk..][..dk]);
        let mut e = [0.0f32; W];
        for c in 0..dk {
            let row: &mut [f32; W] = (&mut s[c * dv + v0..][..W]).try_into().expect("W columns");
            let (d, b) = (decay[c], bk[c]);
            for j in 0..W {
                row[j] *= d;
                e[j] += b * row[j];
            }
        }
        let mut u = [0.0f32; W];
        for j in 0..W {
            let r = t * dv + v0 + j;
            u[j] = x.w[r] * x.v[r] - e[j];
        }
        let mut acc = [0.0f32; W];
        for c in 0..dk {
            let row: &mut [f32; W] = (&mut s[c * dv + v0..][..W]).try_into().expect("W columns");
            let (kc, qc) = (k[c], q[c]);
            for j in 0..W {
                row[j] += kc * u[j];
                acc[j] += qc * row[j];
            }
        }
        o[t * dv + v0..][..W].copy_from_slice(&acc);
    }
}
