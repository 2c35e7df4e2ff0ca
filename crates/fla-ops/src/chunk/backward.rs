//! Chunk backward. Per chunk, in reverse, with `dS` the gradient of the state leaving the chunk
//! and `Y = X − Kb S₀`, `U = T Y` recomputed from the saved entering state `S₀`:
//!
//! ```text
//! dU  = Pᵀ dO + Kt dS          dP  = dO Uᵀ (lower incl.)     dQg = dO S₀ᵀ     dKt = U dSᵀ
//! dY  = Tᵀ dU                  dA  = −dY Uᵀ (strictly lower) dKb = −dY S₀ᵀ   dX  = dY
//! dS₀ = Qgᵀ dO − Kbᵀ dY + diag(exp(G_L)) dS
//! ```
//!
//! (`dA` follows from `T = (I + A)⁻¹`: `dA = −Tᵀ dT Tᵀ` with `dT = dU Yᵀ`.) The chunk-local
//! products then pass their gradients to q, k, v, b, w and the cumulative gate `G`, and
//! `dg_t = Σ_{i ≥ t} dG_i + dG_L` undoes the in-chunk cumulative sum.
use fla_core::cpu::{dot, gemm, MatMut, MatRef};
use fla_core::{Element, Float, Result, Tensor};

use super::intra::{for_each_pair, Intra, CHUNK, SUB};
use super::{chunk_states, new_values};
use crate::prepare::{HeadData, HeadGrads, Prepared};
use crate::{Grads, Inputs, Options, Problem};

pub(super) fn run<F: Float + Element>(
    p: Problem,
    x: &Inputs<'_>,
    opts: &Options,
    d_o: &Tensor,
    dht: Option<&Tensor>,
) -> Result<Grads> {
    let prep = Prepared::<F>::new(p, x, opts)?;
    let d = prep.p.dims;
    let d_o: Vec<F> = d_o.to_vec()?;
    let dht: Option<Vec<F>> = dht.map(|t| t.to_vec()).transpose()?;
    let kv = d.k * d.v;
    let heads = prep.map_heads(|i, h| {
        let do_rows = prep.rows_of(&d_o, i, d.v);
        let dht = dht.as_ref().map_or_else(|| vec![F::zero(); kv], |t| t[i * kv..][..kv].to_vec());
        head_backward(&h, &do_rows, dht)
    });
    prep.grads(heads, x.initial_state.is_some())
}

/// Scratch of the backward, one per head.
struct Scratch<F> {
    y: Vec<F>,
    u: Vec<F>,
    du: Vec<F>,
    dy: Vec<F>,
    dp: Vec<F>,
    da: Vec<F>,
    dqg: Vec<F>,
    dkt: Vec<F>,
    dkb: Vec<F>,
    dbk: Vec<F>,
    dgc: Vec<F>,
    dgh: Vec<F>,
    dgl: Vec<F>,
    ds0: Vec<F>,
    m: Vec<F>,
    /// Channel decay below the diagonal sub-chunks: `exp(G_r − G)`, `K ⊙ exp(G_r − G)` and
    /// `Δdk` over the rows before `r` (`[C, K]` each).
    sub_e2: Vec<F>,
    sub_ks: Vec<F>,
    sub_dk: Vec<F>,
    /// `exp(G − G_r)`, `Q ⊙` and `bk ⊙` it, `Δdq`, `Δdbk` over one sub-chunk (`[SUB, K]` each).
    sub_e1: Vec<F>,
    sub_q: Vec<F>,
    sub_bk: Vec<F>,
    sub_dq: Vec<F>,
    sub_dbk: Vec<F>,
}

pub(crate) fn head_backward<F: Float>(x: &HeadData<F>, d_o: &[F], mut ds: Vec<F>) -> HeadGrads<F> {
    let (dk, dv, len) = (x.dk, x.dv, x.len);
    let erase = x.b.is_some();
    let states = chunk_states(x);
    let gw = if x.channel { dk } else { 1 };
    let mut g = HeadGrads {
        dq: vec![F::zero(); len * dk],
        dk: vec![F::zero(); len * dk],
        dv: vec![F::zero(); len * dv],
        dg: vec![F::zero(); len * gw],
        db: erase.then(|| vec![F::zero(); len * dk]),
        dw: vec![F::zero(); len * dv],
        dh0: Vec::new(),
    };
    let z = |n: usize| vec![F::zero(); n];
    let (ck, cv, cc) = (CHUNK * dk, CHUNK * dv, CHUNK * CHUNK);
    let mut s = Scratch {
        y: z(cv),
        u: z(cv),
        du: z(cv),
        dy: z(cv),
        dp: z(cc),
        da: z(cc),
        dqg: z(ck),
        dkt: z(ck),
        dkb: z(ck),
        dbk: z(ck),
        dgc: z(ck),
        dgh: z(CHUNK),
        dgl: z(dk),
        ds0: z(dk * dv),
        m: z(cc),
        sub_e2: z(ck),
        sub_ks: z(ck),
        sub_dk: z(ck),
        sub_e1: z(SUB * dk),
        sub_q: z(SUB * dk),
        sub_bk: z(SUB * dk),
        sub_dq: z(SUB * dk),
        sub_dbk: z(SUB * dk),
    };
    let mut w = Intra::new(dk);
    let n_chunks = len.div_ceil(CHUNK);
    for ci in (0..n_chunks).rev() {
        let c0 = ci * CHUNK;
        let l = CHUNK.min(len - c0);
        let s0 = &states[ci * dk * dv..][..dk * dv];
        w.compute(x, c0, l, true);
        new_values(x, &w, s0, &mut s.y, &mut s.u);
        chunk_backward(x, &w, s0, &d_o[c0 * dv..][..l * dv], &ds, &mut s, &mut g);
        std::mem::swap(&mut ds, &mut s.ds0);
    }
    g.dh0 = ds;
    g
}

fn mat<F: Copy>(d: &[F], r: usize, c: usize, rs: usize) -> MatRef<'_, F> {
    MatRef::new(d, r, c, rs, 1)
}
fn mat_mut<F: Copy>(d: &mut [F], r: usize, c: usize, rs: usize) -> MatMut<'_, F> {
    MatMut::new(d, r, c, rs, 1)
}

/// One chunk of the backward: reads `ds` (gradient of the leaving state), writes `s.ds0` and
/// this chunk's rows of the head gradients.
fn chunk_backward<F: Float>(
    x: &HeadData<F>,
    w: &Intra<F>,
    s0: &[F],
    d_o: &[F],
    ds: &[F],
    s: &mut Scratch<F>,
    g: &mut HeadGrads<F>,
) {
    let (dk, dv, l, c0) = (x.dk, x.dv, w.l, w.c0);
    let erase = x.b.is_some();
    let (one, zero) = (F::one(), F::zero());
    let s0m = mat(s0, dk, dv, dv);
    let dsm = mat(ds, dk, dv, dv);
    let dom = mat(d_o, l, dv, dv);
    let um = mat(&s.u, l, dv, dv);
    // dU = Pᵀ dO + Kt dS
    gemm(one, mat(&w.p, l, l, CHUNK).t(), dom, zero, mat_mut(&mut s.du, l, dv, dv));
    gemm(one, mat(&w.kt, l, dk, dk), dsm, one, mat_mut(&mut s.du, l, dv, dv));
    // dP = dO Uᵀ, dQg = dO S₀ᵀ, dKt = U dSᵀ
    gemm(one, dom, um.t(), zero, mat_mut(&mut s.dp, l, l, CHUNK));
    gemm(one, dom, s0m.t(), zero, mat_mut(&mut s.dqg, l, dk, dk));
    gemm(one, um, dsm.t(), zero, mat_mut(&mut s.dkt, l, dk, dk));
    // dY = Tᵀ dU; dA = −dY Uᵀ; dKb = −dY S₀ᵀ
    if erase {
        gemm(one, mat(&w.t, l, l, CHUNK).t(), mat(&s.du, l, dv, dv), zero, mat_mut(&mut s.dy, l, dv, dv));
        gemm(-one, mat(&s.dy, l, dv, dv), um.t(), zero, mat_mut(&mut s.da, l, l, CHUNK));
        gemm(-one, mat(&s.dy, l, dv, dv), s0m.t(), zero, mat_mut(&mut s.dkb, l, dk, dk));
    } else {
        s.dy[..l * dv].copy_from_slice(&s.du[..l * dv]);
    }
    // dS₀ = Qgᵀ dO − Kbᵀ dY + diag(exp(G_L)) dS
    for c in 0..dk {
        let e = w.e_last[c];
        for j in 0..dv {
            s.ds0[c * dv + j] = e * ds[c * dv + j];
        }
    }
    gemm(one, mat(&w.qg, l, dk, dk).t(), dom, one, mat_mut(&mut s.ds0, dk, dv, dv));
    if erase {
        gemm(-one, mat(&w.kb, l, dk, dk).t(), mat(&s.dy, l, dv, dv), one, mat_mut(&mut s.ds0, dk, dv, dv));
    }
    // X = w ⊙ V
    for i in 0..l * dv {
        let r = c0 * dv + i;
        g.dv[r] = x.w[r] * s.dy[i];
        g.dw[r] = x.v[r] * s.dy[i];
    }
    // dG_L from the state decay and Kt; per-row dG from Kb, Qg, Kt.
    for c in 0..dk {
        s.dgl[c] = w.e_last[c] * dot(&ds[c * dv..][..dv], &s0[c * dv..][..dv]);
    }
    let dq = &mut g.dq[c0 * dk..][..l * dk];
    let dkk = &mut g.dk[c0 * dk..][..l * dk];
    let (scale, n) = (x.scale, l * dk);
    for ((dq, dkk), ((&dqg, &dkt), (&eg, &et))) in dq
        .iter_mut()
        .zip(dkk.iter_mut())
        .zip(s.dqg[..n].iter().zip(&s.dkt[..n]).zip(w.eg[..n].iter().zip(&w.e_tail[..n])))
    {
        *dq = scale * eg * dqg;
        *dkk = dkt * et;
    }
    for i in 0..l {
        let r = i * dk..(i + 1) * dk;
        for (dgl, (&dkt, &kt)) in s.dgl.iter_mut().zip(s.dkt[r.clone()].iter().zip(&w.kt[r.clone()])) {
            *dgl += dkt * kt;
        }
    }
    for (dg, ((&dqg, &qg), (&dkt, &kt))) in
        s.dgc[..n].iter_mut().zip(s.dqg[..n].iter().zip(&w.qg[..n]).zip(s.dkt[..n].iter().zip(&w.kt[..n])))
    {
        *dg = dqg * qg - dkt * kt;
    }
    if erase {
        for ((dg, dbk), (&dkb, (&kb, &eg))) in
            s.dgc[..n].iter_mut().zip(&mut s.dbk[..n]).zip(s.dkb[..n].iter().zip(w.kb[..n].iter().zip(&w.eg[..n])))
        {
            *dg += dkb * kb;
            *dbk = dkb * eg;
        }
    }
    s.dgh[..l].iter_mut().for_each(|v| *v = zero);
    let q = &x.q[c0 * dk..][..l * dk];
    let k = &x.k[c0 * dk..][..l * dk];
    if x.channel {
        channel_ap_backward(x, w, q, k, s, dq, dkk);
    } else {
        head_ap_backward(x, w, q, k, s, dq, dkk);
    }
    if let (Some(b), Some(db)) = (&x.b, g.db.as_mut()) {
        let b = &b[c0 * dk..][..l * dk];
        for i in 0..l * dk {
            dkk[i] += b[i] * s.dbk[i];
            db[c0 * dk + i] = k[i] * s.dbk[i];
        }
    }
    // Undo the in-chunk cumulative sum.
    if x.channel {
        for c in 0..dk {
            let mut acc = s.dgl[c];
            for i in (0..l).rev() {
                acc += s.dgc[i * dk + c];
                g.dg[(c0 + i) * dk + c] = acc;
            }
        }
    } else {
        let mut acc: F = s.dgl.iter().copied().sum();
        for i in (0..l).rev() {
            acc += s.dgh[i] + s.dgc[i * dk..][..dk].iter().copied().sum();
            g.dg[c0 + i] = acc;
        }
    }
}

/// Head decay: `A = (bk Kᵀ) ⊙ E`, `P = scale·(Q Kᵀ) ⊙ E`.
fn head_ap_backward<F: Float>(
    x: &HeadData<F>,
    w: &Intra<F>,
    q: &[F],
    k: &[F],
    s: &mut Scratch<F>,
    dq: &mut [F],
    dkk: &mut [F],
) {
    let (dk, l) = (x.dk, w.l);
    let erase = x.b.is_some();
    let one = F::one();
    // dN = scale·dP ⊙ E (incl.) into s.m, and the gate terms of P.
    decay_grad(l, &s.dp, &w.p, &w.e, x.scale, false, &mut s.dgh, &mut s.m);
    let km = mat(k, l, dk, dk);
    gemm(one, mat(&s.m, l, l, CHUNK), km, one, mat_mut(dq, l, dk, dk));
    gemm(one, mat(&s.m, l, l, CHUNK).t(), mat(q, l, dk, dk), one, mat_mut(dkk, l, dk, dk));
    if !erase {
        return;
    }
    // dM = dA ⊙ E (strict) into s.m, and the gate terms of A.
    decay_grad(l, &s.da, &w.a, &w.e, one, true, &mut s.dgh, &mut s.m);
    gemm(one, mat(&s.m, l, l, CHUNK), km, one, mat_mut(&mut s.dbk, l, dk, dk));
    gemm(one, mat(&s.m, l, l, CHUNK).t(), mat(&w.bk, l, dk, dk), one, mat_mut(dkk, l, dk, dk));
}

/// For `X = Y ⊙ E` (lower triangle, `strict` without the diagonal) with upstream `dx`: the
/// gradient `factor·dX ⊙ E` of `Y` into `m` (zero above the triangle), and the gate terms
/// `dG_i += dX_ij X_ij`, `dG_j −= dX_ij X_ij` into `dgh`.
#[allow(clippy::too_many_arguments)]
fn decay_grad<F: Float>(l: usize, dx: &[F], x: &[F], e: &[F], factor: F, strict: bool, dgh: &mut [F], m: &mut [F]) {
    for i in 0..l {
        for j in 0..l {
            let ij = i * CHUNK + j;
            if j < i || (j == i && !strict) {
                let t = dx[ij] * x[ij];
                dgh[i] += t;
                dgh[j] -= t;
                m[ij] = factor * dx[ij] * e[ij];
            } else {
                m[ij] = F::zero();
            }
        }
    }
}

/// Channel decay: per pair `(i, j ≤ i)` with `e = exp(G_i − G_j)` per channel,
/// `P_ij = scale·Σ q_i k_j e` and `A_ij = Σ bk_i k_j e` (`j < i`). As in the forward
/// ([`Intra::compute`]): per pair inside the 16-row sub-chunks, GEMMs below them with
/// `e = exp(G_i − G_r)·exp(G_r − G_j)` split at the first row `r` of `i`'s sub-chunk.
fn channel_ap_backward<F: Float>(
    x: &HeadData<F>,
    w: &Intra<F>,
    q: &[F],
    k: &[F],
    s: &mut Scratch<F>,
    dq: &mut [F],
    dkk: &mut [F],
) {
    let (dk, l) = (x.dk, w.l);
    let erase = x.b.is_some();
    let Scratch {
        dp,
        da,
        dbk,
        dgc,
        sub_e2: e2,
        sub_ks: ks,
        sub_dk: tk,
        sub_e1: e1,
        sub_q: qs,
        sub_bk: bs,
        sub_dq: tq,
        sub_dbk: tb,
        ..
    } = s;
    let zeros = vec![F::zero(); dk];
    let bk_all = if erase { &w.bk[..] } else { &zeros[..] };
    for r in (0..l).step_by(SUB) {
        for_each_pair(&w.eg_step[r * dk..], SUB.min(l - r), dk, |i, j, run| {
            let (i, j) = (r + i, r + j);
            let dpij = x.scale * dp[i * CHUNK + j];
            let (qi, kj) = (&q[i * dk..][..dk], &k[j * dk..][..dk]);
            if i == j {
                // Diagonal of P only (A is strictly lower); its gate terms cancel.
                dq[i * dk..][..dk].iter_mut().zip(kj).for_each(|(d, &k)| *d += dpij * k);
                dkk[j * dk..][..dk].iter_mut().zip(qi).for_each(|(d, &q)| *d += dpij * q);
                return;
            }
            let daij = if erase { da[i * CHUNK + j] } else { F::zero() };
            let bki = if erase { &bk_all[i * dk..][..dk] } else { &zeros[..] };
            let (lo, hi) = dgc.split_at_mut(i * dk);
            let (dgj, dgi) = (&mut lo[j * dk..][..dk], &mut hi[..dk]);
            let (dqi, dkj, dbki) = (&mut dq[i * dk..][..dk], &mut dkk[j * dk..][..dk], &mut dbk[i * dk..][..dk]);
            for c in 0..dk {
                let kd = kj[c] * run[c];
                let coef = dpij * qi[c] + daij * bki[c];
                dqi[c] += dpij * kd;
                dkj[c] += coef * run[c];
                dbki[c] += daij * kd;
                let t = coef * kd;
                dgi[c] += t;
                dgj[c] -= t;
            }
        });
    }
    if l <= SUB {
        return;
    }
    // Below the diagonal sub-chunks, with E1 = exp(G_i − G_r) (rows i ≥ r) and E2 = exp(G_r − G_j)
    // (rows j < r): dq_i += E1 ⊙ (scale·dP Ks), dbk_i += E1 ⊙ (dA Ks) with Ks = K ⊙ E2;
    // dk_j += E2 ⊙ (scale·dPᵀ (Q ⊙ E1) + dAᵀ (bk ⊙ E1)); the gate takes q ⊙ Δdq + bk ⊙ Δdbk at
    // row i and −k ⊙ Δdk at row j.
    let g = &w.g;
    for r in (SUB..l).step_by(SUB) {
        let sl = SUB.min(l - r);
        let gr = &g[r * dk..][..dk];
        for (j, row) in e2[..r * dk].chunks_exact_mut(dk).enumerate() {
            row.iter_mut().zip(gr).zip(&g[j * dk..][..dk]).for_each(|((d, &gr), &gj)| *d = gr - gj);
        }
        F::exp_in_place(&mut e2[..r * dk]);
        ks[..r * dk].iter_mut().zip(&e2[..r * dk]).zip(&k[..r * dk]).for_each(|((d, &e), &k)| *d = e * k);
        for (i, row) in e1[..sl * dk].chunks_exact_mut(dk).enumerate() {
            row.iter_mut().zip(&g[(r + i) * dk..][..dk]).zip(gr).for_each(|((d, &gi), &gr)| *d = gi - gr);
        }
        F::exp_in_place(&mut e1[..sl * dk]);
        let rows = r * dk..(r + sl) * dk;
        let ksm = MatRef::new(ks, r, dk, dk, 1);
        let dpm = MatRef::new(&dp[r * CHUNK..], sl, r, CHUNK, 1);
        let dam = MatRef::new(&da[r * CHUNK..], sl, r, CHUNK, 1);
        // Rows i: Δdq and Δdbk.
        gemm(x.scale, dpm, ksm, F::zero(), MatMut::new(tq, sl, dk, dk, 1));
        if erase {
            gemm(F::one(), dam, ksm, F::zero(), MatMut::new(tb, sl, dk, dk, 1));
        }
        for (idx, c) in rows.clone().enumerate() {
            let (t, e) = (tq[idx] * e1[idx], e1[idx]);
            dq[c] += t;
            dgc[c] += q[c] * t;
            qs[idx] = q[c] * e;
            if erase {
                let tb = tb[idx] * e;
                dbk[c] += tb;
                dgc[c] += bk_all[c] * tb;
                bs[idx] = bk_all[c] * e;
            }
        }
        // Rows j < r: Δdk.
        let tkm = MatMut::new(tk, r, dk, dk, 1);
        gemm(x.scale, dpm.t(), MatRef::new(qs, sl, dk, dk, 1), F::zero(), tkm);
        if erase {
            let tkm = MatMut::new(tk, r, dk, dk, 1);
            gemm(F::one(), dam.t(), MatRef::new(bs, sl, dk, dk, 1), F::one(), tkm);
        }
        for c in 0..r * dk {
            let t = tk[c] * e2[c];
            dkk[c] += t;
            dgc[c] -= k[c] * t;
        }
    }
}
