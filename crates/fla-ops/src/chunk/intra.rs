//! Quantities local to one chunk, shared by the chunk forward and backward.
//!
//! With `G` the in-chunk inclusive cumulative sum of the log decay (per token, or per token and
//! key channel), `E_ij = exp(G_i − G_j)` for `j ≤ i`, and `L` the chunk's last row:
//!
//! ```text
//! A  = strictly lower  (b⊙K)Kᵀ ⊙ E      T = (I + A)⁻¹          (the UT / WY transform)
//! P  = lower incl.     scale·QKᵀ ⊙ E
//! Kb = b ⊙ K ⊙ exp(G)   Qg = scale·Q ⊙ exp(G)   Kt = K ⊙ exp(G_L − G)
//! ```
//!
//! Head decay forms `A` and `P` with one GEMM each and scales by the `C×C` matrix `E`. Channel
//! decay cannot factor `exp(G_i − G_j)` into `exp(G_i)·exp(−G_j)` without overflow under strong
//! decay. Within each 16-row sub-chunk it forms each pair's decay vector as a running product of
//! `exp(g)` from `i` down to `j`; between sub-chunks it splits at `r`, the first row of `i`'s
//! sub-chunk: `exp(G_i − G_j) = exp(G_i − G_r)·exp(G_r − G_j)` with `j < r ≤ i`, both factors
//! ≤ 1 for a decay, so the blocks below the diagonal are GEMMs of rescaled rows (FLA's sub-chunk
//! form). Both are exact to rounding for any gate strength.
use fla_core::cpu::{dot, gemm, MatMut, MatRef};
use fla_core::Float;

use crate::prepare::HeadData;

/// Chunk length of the chunk form (as FLA's default).
pub const CHUNK: usize = 64;

/// Rows of a sub-chunk in the channel-decay `A` and `P` (as FLA's KDA).
pub(crate) const SUB: usize = 16;

/// Workspace for one chunk of one head: allocated once per head, reused across chunks.
pub(crate) struct Intra<F> {
    /// Rows in this chunk.
    pub l: usize,
    /// First row of the chunk within the head.
    pub c0: usize,
    /// Cumulative log decay `[l]` or `[l, K]`.
    pub g: Vec<F>,
    /// `exp(G_L)` per key channel `[K]`.
    pub e_last: Vec<F>,
    /// `exp(G)` per row and key channel `[l, K]`.
    pub eg: Vec<F>,
    /// `b ⊙ K` `[l, K]` (empty without erase).
    pub bk: Vec<F>,
    /// `b ⊙ K ⊙ exp(G)` `[l, K]`.
    pub kb: Vec<F>,
    /// `scale·Q ⊙ exp(G)` `[l, K]`.
    pub qg: Vec<F>,
    /// `exp(G_L − G)` `[l, K]`.
    pub e_tail: Vec<F>,
    /// `K ⊙ exp(G_L − G)` `[l, K]`.
    pub kt: Vec<F>,
    /// `[C, C]`, row stride `C`.
    pub a: Vec<F>,
    /// `[C, C]`.
    pub p: Vec<F>,
    /// `(I + A)⁻¹` `[C, C]`.
    pub t: Vec<F>,
    /// Head decay: `E_ij` `[C, C]`.
    pub e: Vec<F>,
    /// Channel decay: `exp(g)` of the raw gate `[l, K]`.
    pub eg_step: Vec<F>,
    /// Channel decay, blocks below the diagonal: `scale·Q ⊙ exp(G − G_r)` `[SUB, K]`.
    sub_q: Vec<F>,
    /// `b ⊙ K ⊙ exp(G − G_r)` `[SUB, K]`.
    sub_bk: Vec<F>,
    /// `K ⊙ exp(G_r − G)` of the rows before `r` `[C, K]`.
    sub_k: Vec<F>,
}

impl<F: Float> Intra<F> {
    /// Workspace sized for `K` and chunk [`CHUNK`].
    pub fn new(dk: usize) -> Self {
        let ck = CHUNK * dk;
        let z = |n| vec![F::zero(); n];
        Intra {
            l: 0,
            c0: 0,
            g: z(ck),
            e_last: z(dk),
            eg: z(ck),
            bk: z(ck),
            kb: z(ck),
            qg: z(ck),
            e_tail: z(ck),
            kt: z(ck),
            a: z(CHUNK * CHUNK),
            p: z(CHUNK * CHUNK),
            t: z(CHUNK * CHUNK),
            e: z(CHUNK * CHUNK),
            eg_step: z(ck),
            sub_q: z(SUB * dk),
            sub_bk: z(SUB * dk),
            sub_k: z(ck),
        }
    }

    /// Fills every chunk-local quantity for rows `c0 .. c0 + l` of `x` (`P` only `with_p`: a
    /// sweep that only advances the state does not need it).
    pub fn compute(&mut self, x: &HeadData<F>, c0: usize, l: usize, with_p: bool) {
        let dk = x.dk;
        self.l = l;
        self.c0 = c0;
        let gw = if x.channel { dk } else { 1 };
        // Cumulative gate and its exponentials.
        for i in 0..l {
            for c in 0..gw {
                let prev = if i == 0 { F::zero() } else { self.g[(i - 1) * gw + c] };
                self.g[i * gw + c] = prev + x.g[(c0 + i) * gw + c];
            }
        }
        let gl = |s: &Self, i: usize, c: usize| if x.channel { s.g[i * dk + c] } else { s.g[i] };
        for c in 0..dk {
            self.e_last[c] = gl(self, l - 1, c).exp();
        }
        for i in 0..l {
            if x.channel {
                for c in 0..dk {
                    let gi = self.g[i * dk + c];
                    self.eg[i * dk + c] = gi;
                    self.e_tail[i * dk + c] = self.g[(l - 1) * dk + c] - gi;
                }
            } else {
                let (e, t) = (self.g[i].exp(), (self.g[l - 1] - self.g[i]).exp());
                self.eg[i * dk..][..dk].iter_mut().for_each(|v| *v = e);
                self.e_tail[i * dk..][..dk].iter_mut().for_each(|v| *v = t);
            }
        }
        if x.channel {
            F::exp_in_place(&mut self.eg[..l * dk]);
            F::exp_in_place(&mut self.e_tail[..l * dk]);
        }
        let (q, k) = (&x.q[c0 * dk..][..l * dk], &x.k[c0 * dk..][..l * dk]);
        let n = l * dk;
        let scale = x.scale;
        for (((qg, kt), (&eg, &et)), (&q, &k)) in self.qg[..n]
            .iter_mut()
            .zip(&mut self.kt[..n])
            .zip(self.eg[..n].iter().zip(&self.e_tail[..n]))
            .zip(q.iter().zip(k))
        {
            *qg = scale * q * eg;
            *kt = k * et;
        }
        if let Some(b) = &x.b {
            let b = &b[c0 * dk..][..n];
            for ((bk, kb), ((&b, &k), &eg)) in
                self.bk[..n].iter_mut().zip(&mut self.kb[..n]).zip(b.iter().zip(k).zip(&self.eg[..n]))
            {
                *bk = b * k;
                *kb = b * k * eg;
            }
        }
        if x.channel {
            self.channel_ap(x, q, k, with_p);
        } else {
            self.head_ap(x, q, k, with_p);
        }
        if x.b.is_some() {
            self.invert();
        }
    }

    fn head_ap(&mut self, x: &HeadData<F>, q: &[F], k: &[F], with_p: bool) {
        let (l, dk) = (self.l, x.dk);
        let kr = MatRef::new(k, l, dk, dk, 1);
        for i in 0..l {
            for j in 0..=i {
                self.e[i * CHUNK + j] = (self.g[i] - self.g[j]).exp();
            }
        }
        if with_p {
            gemm(x.scale, MatRef::new(q, l, dk, dk, 1), kr.t(), F::zero(), MatMut::new(&mut self.p, l, l, CHUNK, 1));
        }
        if x.b.is_some() {
            gemm(
                F::one(),
                MatRef::new(&self.bk, l, dk, dk, 1),
                kr.t(),
                F::zero(),
                MatMut::new(&mut self.a, l, l, CHUNK, 1),
            );
        }
        for i in 0..l {
            for j in 0..l {
                let ij = i * CHUNK + j;
                self.p[ij] = if j <= i { self.p[ij] * self.e[ij] } else { F::zero() };
                self.a[ij] = if j < i && x.b.is_some() { self.a[ij] * self.e[ij] } else { F::zero() };
            }
        }
    }

    fn channel_ap(&mut self, x: &HeadData<F>, q: &[F], k: &[F], with_p: bool) {
        let (l, dk) = (self.l, x.dk);
        self.eg_step[..l * dk].copy_from_slice(&x.g[self.c0 * dk..][..l * dk]);
        F::exp_in_place(&mut self.eg_step[..l * dk]);
        self.p[..l * CHUNK].iter_mut().for_each(|v| *v = F::zero());
        self.a[..l * CHUNK].iter_mut().for_each(|v| *v = F::zero());
        let erase = x.b.is_some();
        // Diagonal sub-chunks: running products of exp(g) per pair.
        let (p, a, bk) = (&mut self.p, &mut self.a, &self.bk);
        let mut kd = vec![F::zero(); dk];
        for r in (0..l).step_by(SUB) {
            let sl = SUB.min(l - r);
            for_each_pair(&self.eg_step[r * dk..], sl, dk, |i, j, run| {
                let (i, j) = (r + i, r + j);
                for ((d, &k), &e) in kd.iter_mut().zip(&k[j * dk..][..dk]).zip(run) {
                    *d = k * e;
                }
                if with_p {
                    p[i * CHUNK + j] = x.scale * dot(&q[i * dk..][..dk], &kd);
                }
                if erase && j < i {
                    a[i * CHUNK + j] = dot(&bk[i * dk..][..dk], &kd);
                }
            });
        }
        // Below the diagonal: rows i of the sub-chunk starting at r against every row j < r.
        let g = &self.g;
        for r in (SUB..l).step_by(SUB) {
            let sl = SUB.min(l - r);
            let gr = &g[r * dk..][..dk];
            for (j, row) in self.sub_k[..r * dk].chunks_exact_mut(dk).enumerate() {
                row.iter_mut().zip(gr).zip(&g[j * dk..][..dk]).for_each(|((d, &gr), &gj)| *d = gr - gj);
            }
            F::exp_in_place(&mut self.sub_k[..r * dk]);
            self.sub_k[..r * dk].iter_mut().zip(&k[..r * dk]).for_each(|(d, &k)| *d *= k);
            for (i, row) in self.sub_q[..sl * dk].chunks_exact_mut(dk).enumerate() {
                row.iter_mut().zip(&g[(r + i) * dk..][..dk]).zip(gr).for_each(|((d, &gi), &gr)| *d = gi - gr);
            }
            F::exp_in_place(&mut self.sub_q[..sl * dk]);
            let rows = r * dk..(r + sl) * dk;
            if erase {
                for ((d, &e), &bk) in
                    self.sub_bk[..sl * dk].iter_mut().zip(&self.sub_q[..sl * dk]).zip(&bk[rows.clone()])
                {
                    *d = e * bk;
                }
            }
            let kr = MatRef::new(&self.sub_k, r, dk, dk, 1).t();
            if erase {
                let out = MatMut::new(&mut self.a[r * CHUNK..], sl, r, CHUNK, 1);
                gemm(F::one(), MatRef::new(&self.sub_bk, sl, dk, dk, 1), kr, F::zero(), out);
            }
            if with_p {
                self.sub_q[..sl * dk].iter_mut().zip(&q[rows]).for_each(|(d, &q)| *d *= q);
                let out = MatMut::new(&mut self.p[r * CHUNK..], sl, r, CHUNK, 1);
                gemm(x.scale, MatRef::new(&self.sub_q, sl, dk, dk, 1), kr, F::zero(), out);
            }
        }
    }

    /// `T = (I + A)⁻¹` by forward substitution (A strictly lower triangular).
    fn invert(&mut self) {
        let l = self.l;
        for i in 0..l {
            let (done, rest) = self.t.split_at_mut(i * CHUNK);
            let ti = &mut rest[..CHUNK];
            ti.iter_mut().enumerate().for_each(|(j, v)| *v = if i == j { F::one() } else { F::zero() });
            for (m, &a) in self.a[i * CHUNK..][..i].iter().enumerate() {
                if a != F::zero() {
                    for (t, &tm) in ti[..=m].iter_mut().zip(&done[m * CHUNK..][..=m]) {
                        *t -= a * tm;
                    }
                }
            }
        }
    }
}

/// Channel-decay pair loop: calls `f(i, j, e)` for every `j ≤ i < l` with
/// `e = exp(G_i − G_j) = Π_{t=j+1..i} exp(g_t)` per key channel, formed as a running product of
/// `eg_step = exp(g)` `[l, K]`.
pub(crate) fn for_each_pair<F: Float>(eg_step: &[F], l: usize, dk: usize, mut f: impl FnMut(usize, usize, &[F])) {
    let mut run = vec![F::zero(); dk];
    for i in 0..l {
        run.iter_mut().for_each(|r| *r = F::one());
        for j in (0..=i).rev() {
            if j < i {
                let step = &eg_step[(j + 1) * dk..][..dk];
                run.iter_mut().zip(step).for_each(|(r, &s)| *r *= s);
            }
            f(i, j, &run);
        }
    }
}
