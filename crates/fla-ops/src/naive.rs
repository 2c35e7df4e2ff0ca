//! The reference recurrence, one token at a time: the definition of correct.
//!
//! For each sequence and value head, with state `S [K,V]` starting at the initial state:
//!
//! ```text
//! S ← S · exp(g_t)            (per head, or per key channel: row c scaled by exp(g_t[c]))
//! e = Sᵀ (b_t ⊙ k_t)          (erase; b = beta for DeltaNet/GDN/KDA, 0 for GLA)
//! S ← S + k_t (w_t ⊙ v_t − e)ᵀ (write; w = beta for DeltaNet/GDN/KDA, 1 for GLA)
//! o_t = Sᵀ (scale · q_t)
//! ```
//!
//! FLA: `naive_recurrent_gated_delta_rule`, `kda/naive.py`. Computes in f64 when the inputs are
//! f64, else in f32.
use fla_core::{Element, Float, Result};

use crate::prepare::{HeadData, HeadOut, Prepared};
use crate::{Family, Inputs, Options, Output, Problem};

/// Runs the reference recurrence for `family`.
pub fn forward(family: Family, x: &Inputs<'_>, opts: &Options) -> Result<Output> {
    let p = Problem::new("naive::forward", family, x, opts)?;
    if p.f64 {
        run::<f64>(p, x, opts)
    } else {
        run::<f32>(p, x, opts)
    }
}

fn run<F: Float + Element>(p: Problem, x: &Inputs<'_>, opts: &Options) -> Result<Output> {
    let prep = Prepared::<F>::new(p, x, opts)?;
    let heads = prep.map_heads(|_, h| head_forward(&h));
    prep.output(heads, opts.output_final_state)
}

/// The recurrence over one (sequence, value head).
pub(crate) fn head_forward<F: Float>(x: &HeadData<F>) -> HeadOut<F> {
    let (dk, dv) = (x.dk, x.dv);
    let mut s = x.initial_state();
    let mut o = vec![F::zero(); x.len * dv];
    let mut u = vec![F::zero(); dv];
    for t in 0..x.len {
        let (q, k) = (&x.q[t * dk..][..dk], &x.k[t * dk..][..dk]);
        for c in 0..dk {
            let decay = if x.channel { x.g[t * dk + c] } else { x.g[t] }.exp();
            s[c * dv..][..dv].iter_mut().for_each(|e| *e *= decay);
        }
        let row = t * dv..(t + 1) * dv;
        for ((u, &w), &v) in u.iter_mut().zip(&x.w[row.clone()]).zip(&x.v[row]) {
            *u = w * v;
        }
        if let Some(b) = &x.b {
            for c in 0..dk {
                let bk = b[t * dk + c] * k[c];
                for j in 0..dv {
                    u[j] -= bk * s[c * dv + j];
                }
            }
        }
        for c in 0..dk {
            for j in 0..dv {
                s[c * dv + j] += k[c] * u[j];
            }
        }
        for c in 0..dk {
            let qc = x.scale * q[c];
            for j in 0..dv {
                o[t * dv + j] += qc * s[c * dv + j];
            }
        }
    }
    HeadOut { o, ht: s }
}
