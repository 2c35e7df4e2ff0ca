// Chunk forward of Gated DeltaNet and DeltaNet on tensor cores (mma.sync m16n8k16, f32
// accumulation) for bf16 and f16 inputs with K = 64 or 128 and V a multiple of 16. The same math
// as chunk_gdn.cu (the f32 path; see there and fla-ops/src/chunk), in two kernels:
//
// chunk_gdn_tc_intra: one CTA per (chunk, value head), every chunk at once. G = cumsum g;
//   A = strictly lower (beta K K^T . exp(G_i - G_j)) of the (normalised) keys; T = (I + A)^-1 by
//   substitution in the 16x16 diagonal blocks, then block row by block row; W = T diag(beta e^G) K,
//   U = T diag(beta) V and P = scale Q K^T . exp(G_i - G_j) (lower, with the diagonal) go to
//   16-bit scratch, G and the L2-norm scales to f32 scratch.
// chunk_gdn_tc_fwd: one CTA per (sequence, value head, BV value columns), walking the chunks in
//   order with the state block S [K][BV] in f32 registers:
//   Vn = U - W S;  O = scale rq e^G (Q S) + P Vn;  S <- e^{G_L} S + (K rk e^{G_L - G})^T Vn.
//
// The operands rounded to 16 bits (K, Q, T, W, U, P, S and Vn) are those FLA's Triton kernels
// round. The L2 norm and beta / decay factors are applied as row or column scales of f32 values,
// never by rescaling a 16-bit tile.
#include "common/dtype.cuh"
#include "common/chunk.cuh"
#include "common/mma.cuh"
#include "common/chunk_tc.cuh"

// Dynamic shared memory of chunk_gdn_tc_intra; keep in sync with `tc_intra_smem` in
// fla-ops/src/cuda.rs.
#define TC_INTRA_SMEM(KD) (2 * FLA_C * TC_LDF * 4 + 3 * 256 * 4 + 4 * FLA_C * 4 + 2 * FLA_C * ((KD) + 8) * 2)

template <class E, int KD>
__device__ __forceinline__ void tc_intra(const ChunkParams& p) {
    constexpr int LK = KD + 8;
    extern __shared__ __align__(16) unsigned char smem[];
    float* af = reinterpret_cast<float*>(smem);  // [C][LDF] A; after T, V block 0 [C][LDC]
    float* tf = af + FLA_C * TC_LDF;              // [C][LDF] T
    float* xs = tf + FLA_C * TC_LDF;              // [3][16][16] block products
    float* gs = xs + 3 * 256;                     // [C] G
    float* bs = gs + FLA_C;                       // [C] beta
    float* rq = bs + FLA_C;                       // [C] 1/|q|
    float* rk = rq + FLA_C;                       // [C] 1/|k|
    u16* ks = reinterpret_cast<u16*>(rk + FLA_C); // [C][LK] K; after W, V blocks 1, 3, .. [C][LDC]
    u16* qs = ks + FLA_C * LK;                    // [C][LK] Q; after Q K^T, T diag(beta e^G rk),
                                                  // after W, T diag(beta) (both [C][LDC])
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int ci = blockIdx.x, hv = blockIdx.y;
    long long bos;
    int l;
    chunk_at(p, ci, bos, l);
    const int hk = hv / (p.hv / p.h);
    const int V = p.dv;

    fla_load_tile<TC_NT, FLA_C, KD>(ks, LK, static_cast<const u16*>(p.k) + (bos * p.h + hk) * KD, (long long)p.h * KD, l);
    fla_load_tile<TC_NT, FLA_C, KD>(qs, LK, static_cast<const u16*>(p.q) + (bos * p.h + hk) * KD, (long long)p.h * KD, l);
    fla_cp_commit();
    if (tid < FLA_C) {
        float g = 0.0f, b = 0.0f;
        if (tid < l) chunk_gate_beta(p, (bos + tid) * p.hv + hv, hv, g, b);
        gs[tid] = g;
        bs[tid] = b;
    }
    for (int e = tid; e < FLA_C * TC_LDF; e += TC_NT) tf[e] = 0.0f;
    fla_cp_wait_all();
    __syncthreads();

    // G: inclusive scan by warp 0.
    if (warp == 0) {
        float a = gs[lane], b = gs[lane + 32];
        fla_warp_scan64(a, b);
        gs[lane] = a;
        gs[lane + 32] = b;
    }

    // K K^T and Q K^T for this warp's 16 rows, blocks on or below the diagonal, and the diagonal
    // block of Q Q^T: the squared norms are the diagonals of K K^T and Q Q^T.
    const int m0 = warp * 16;
    const int gq = lane >> 2, tq = lane & 3;
    float akk[8][4], aqk[8][4], aqq[2][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) akk[nt][r] = aqk[nt][r] = 0.0f;
#pragma unroll
    for (int r = 0; r < 4; ++r) aqq[0][r] = aqq[1][r] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < KD; kk += 16) {
        unsigned fk[4], fq[4], b[4];
        fla_frag_a(fk, ks, LK, m0, kk);
        fla_frag_a(fq, qs, LK, m0, kk);
#pragma unroll
        for (int np = 0; np < 4; ++np) {
            if (np <= warp) {
                fla_frag_b_nk(b, ks, LK, kk, np * 16);
                fla_mma<E>(akk[2 * np], fk, b[0], b[1]);
                fla_mma<E>(akk[2 * np + 1], fk, b[2], b[3]);
                fla_mma<E>(aqk[2 * np], fq, b[0], b[1]);
                fla_mma<E>(aqk[2 * np + 1], fq, b[2], b[3]);
            }
        }
        fla_frag_b_nk(b, qs, LK, kk, m0);
        fla_mma<E>(aqq[0], fq, b[0], b[1]);
        fla_mma<E>(aqq[1], fq, b[2], b[3]);
    }
    // Row m0 + gq's diagonal element sits in n-tile 2 warp, element gq & 1, of the lanes with
    // tq == gq / 2; row m0 + 8 + gq's in n-tile 2 warp + 1, element 2 + (gq & 1).
    if (tq == gq >> 1) {
        const int e = gq & 1;
#pragma unroll
        for (int np = 0; np < 4; ++np) {
            if (np == warp) {
#pragma unroll
                for (int h2 = 0; h2 < 2; ++h2) {
                    const int r = m0 + gq + 8 * h2;
                    const float sk = e ? akk[2 * np + h2][2 * h2 + 1] : akk[2 * np + h2][2 * h2];
                    const float sq = e ? aqq[h2][2 * h2 + 1] : aqq[h2][2 * h2];
                    rq[r] = r >= l ? 0.0f : p.l2norm ? chunk_rnorm(sq) : 1.0f;
                    rk[r] = r >= l ? 0.0f : p.l2norm ? chunk_rnorm(sk) : 1.0f;
                }
            }
        }
    }
    __syncthreads();
    // A (f32, shared) and P (16-bit, global) with the norms, beta and decay applied.
    {
        u16* pg = static_cast<u16*>(p.aqk) + (bos * p.hv + hv) * FLA_C;
        const long long ldp = (long long)p.hv * FLA_C;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int h2 = 0; h2 < 2; ++h2) {
                const int i = m0 + (lane >> 2) + 8 * h2;
                float pk[2], pq[2];
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int j = nt * 8 + 2 * (lane & 3) + e;
                    const float x = j <= i && i < l ? __expf(gs[i] - gs[j]) : 0.0f;
                    pk[e] = j < i ? bs[i] * rk[i] * rk[j] * akk[nt][2 * h2 + e] * x : 0.0f;
                    pq[e] = p.scale * rq[i] * rk[j] * aqk[nt][2 * h2 + e] * x;
                }
                const int j = nt * 8 + 2 * (lane & 3);
                af[i * TC_LDF + j] = pk[0];
                af[i * TC_LDF + j + 1] = pk[1];
                if (i < l) *reinterpret_cast<unsigned*>(pg + i * ldp + j) = fla_pack2<E>(pq[0], pq[1]);
            }
    }
    __syncthreads();

    tc_invert(af, tf, xs);
    // V in blocks of 64 columns, the first two loaded early: block 0 where A was (A is no
    // longer needed), block 1 where K was once W is done; later blocks one at a time.
    u16* vb = reinterpret_cast<u16*>(af);
    tc_load_v(p, 0, vb, bos, l, hv);

    tc_save_t<E>(p, tf, bos, l, hv);
    // W = T diag(beta e^G rk) K, with the scaled T rounded to 16 bits where Q was.
    u16* tt = qs;
    for (int e = tid; e < FLA_C * FLA_C / 2; e += TC_NT) {
        const int i = e >> 5, j = (e & 31) * 2;
        const float t0 = tf[i * TC_LDF + j], t1 = tf[i * TC_LDF + j + 1];
        *reinterpret_cast<unsigned*>(tt + i * TC_LDC + j) =
            fla_pack2<E>(t0 * bs[j] * __expf(gs[j]) * rk[j], t1 * bs[j + 1] * __expf(gs[j + 1]) * rk[j + 1]);
    }
    if (tid < l) {
        const long long i = (bos + tid) * p.hv + hv;
        p.gc[i] = gs[tid];
        p.rq[i] = rq[tid];
        p.rk[i] = rk[tid];
    }
    __syncthreads();
    float acc[8][4];
    u16* wg = static_cast<u16*>(p.w16) + (bos * p.hv + hv) * KD;
#pragma unroll
    for (int c0 = 0; c0 < KD; c0 += 64) {
        tc_lower_times<E, 8>(acc, tt, ks, LK, warp, c0, 64);
        tc_store_rows<E, 8>(acc, wg + c0, (long long)p.hv * KD, m0, 64, l);
    }
    __syncthreads();
    if (V > 64) tc_load_v(p, 64, ks, bos, l, hv);
    tc_u<E>(p, tf, bs, tt, vb, ks, bos, l, hv);
}

// Dynamic shared memory of chunk_kda_tc_intra; keep in sync with `kda_intra_smem` in
// fla-ops/src/cuda.rs: A, T (f32 [C][LDF]; T's space first holds the split factors of one block
// pair), block products, beta / 1/|q| / 1/|k| ([C] each), G (f32 [C][KD + 1]), then the K and Q
// tiles (16-bit [C][KD+8]). About 105 KB at K = 128: two CTAs per SM.
#define KDA_INTRA_SMEM(KD) \
    (2 * FLA_C * TC_LDF * 4 + 3 * 256 * 4 + 3 * FLA_C * 4 + FLA_C * ((KD) + 1) * 4 + 2 * FLA_C * ((KD) + 8) * 2)

// KDA's intra kernel: one CTA per (chunk, value head), every chunk at once. The per-channel
// decay exp(G_ic - G_jc) cannot leave a plain product, so the blocks below the diagonal are split
// at the first row r of the later block: A_ij = sum_c (beta_i k^_ic e^(G_ic - G_rc)) (k^_jc
// e^(G_rc - G_jc)) with both factors <= 1 (exact under any decay; FLA's sub-chunk form), products
// on tensor cores; the four 16x16 diagonal blocks take the per-pair sum in f32. Then T as in
// chunk_gdn_tc_intra, W = T (beta e^G k^), U = T (beta V), P, and for the sweep the tiles
// q^ . e^G and k^ . e^(G_L - G) and G (f32); for the backward (tm not null) also T (16-bit) and
// 1/|q|, 1/|k| (f32), as chunk_gdn_tc_intra.
template <class E, int KD>
__device__ __forceinline__ void kda_intra(const ChunkParams& p) {
    constexpr int LK = KD + 8, LG = KD + 1; // LG: row stride of G (odd: no bank conflicts)
    extern __shared__ __align__(16) unsigned char smem[];
    float* af = reinterpret_cast<float*>(smem); // [C][LDF] A; after T, V block 0 [C][LDC]
    float* tf = af + FLA_C * TC_LDF;             // [C][LDF] T; before it, the split factors
    u16* fb = reinterpret_cast<u16*>(tf);        // [48][LK]: K left, Q left, K right factors of a block pair
    float* xs = tf + FLA_C * TC_LDF;             // [3][16][16]
    float* bs = xs + 3 * 256;                    // [C] beta
    float* rq = bs + FLA_C;                      // [C] 1/|q|
    float* rk = rq + FLA_C;                      // [C] 1/|k|
    float* gsm = rk + FLA_C;                     // [C][LG] G
    u16* ks = reinterpret_cast<u16*>(gsm + FLA_C * LG); // [C][LK] K; then beta k^ e^G; then V block 1
    u16* qs = ks + FLA_C * LK;                   // [C][LK] Q; then T (16-bit [C][LDC])
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int ci = blockIdx.x, hv = blockIdx.y;
    long long bos;
    int l;
    chunk_at(p, ci, bos, l);
    const int hk = hv / (p.hv / p.h);
    const long long hrow = bos * p.hv + hv;

    fla_load_tile<TC_NT, FLA_C, KD>(ks, LK, static_cast<const u16*>(p.k) + (bos * p.h + hk) * KD, (long long)p.h * KD, l);
    fla_load_tile<TC_NT, FLA_C, KD>(qs, LK, static_cast<const u16*>(p.q) + (bos * p.h + hk) * KD, (long long)p.h * KD, l);
    fla_cp_commit();
    // g with the in-op gate, every element at once (rows from l on: 0).
    {
        const float ea = p.use_gate ? expf(fla_load(p.a_log, p.a_log_dtype, hv)) : 0.0f;
        for (int e = tid; e < FLA_C * KD; e += TC_NT) {
            const int i = e / KD, c = e % KD;
            float g = 0.0f;
            if (i < l) {
                g = fla_load(p.g, p.dtype, (hrow + (long long)i * p.hv) * KD + c);
                if (p.use_gate)
                    g = -ea * fla_softplusf(g + fla_load(p.dt_bias, p.dt_bias_dtype, p.dt_per_channel ? hv * KD + c : hv));
            }
            gsm[i * LG + c] = g;
        }
    }
    if (tid < FLA_C) {
        float b = 0.0f;
        if (tid < l) {
            b = fla_load(p.beta, p.dtype, hrow + (long long)tid * p.hv);
            if (p.beta_sigmoid) b = fla_sigmoidf(b);
        }
        bs[tid] = b;
    }
    for (int e = tid; e < FLA_C * TC_LDF; e += TC_NT) af[e] = 0.0f;
    __syncthreads();
    // G: the in-chunk cumulative sum, a thread per channel (rows from l on repeat G_{l-1}).
    if (tid < KD) {
        float acc = 0.0f;
        for (int i = 0; i < FLA_C; ++i) {
            acc += gsm[i * LG + tid];
            gsm[i * LG + tid] = acc;
        }
    }
    fla_cp_wait_all();
    __syncthreads();
    for (int e = tid; e < l * KD; e += TC_NT) p.gc[(hrow + (long long)(e / KD) * p.hv) * KD + e % KD] = gsm[(e / KD) * LG + e % KD];
    // Norms: a warp per row.
    for (int i = warp; i < FLA_C; i += 4) {
        float sq = 0.0f, sk = 0.0f;
        for (int c = lane; c < KD; c += 32) {
            const float q = fla_to_f32<E>(qs[i * LK + c]), k = fla_to_f32<E>(ks[i * LK + c]);
            sq += q * q;
            sk += k * k;
        }
        fla_warp_sum2(sq, sk);
        if (lane == 0) {
            rq[i] = i >= l ? 0.0f : p.l2norm ? chunk_rnorm(sq) : 1.0f;
            rk[i] = i >= l ? 0.0f : p.l2norm ? chunk_rnorm(sk) : 1.0f;
        }
    }
    __syncthreads();
    // The sweep's tiles q^ e^G and k^ e^(G_L - G).
    const int gl_row = (l - 1) * LG;
    for (int e = tid; e < l * KD; e += TC_NT) {
        const int i = e / KD, c = e % KD;
        const float g = gsm[i * LG + c];
        const long long gi = (hrow + (long long)i * p.hv) * KD + c;
        static_cast<u16*>(p.qg16)[gi] = fla_from_f32<E>(fla_to_f32<E>(qs[i * LK + c]) * rq[i] * __expf(g));
        static_cast<u16*>(p.kt16)[gi] = fla_from_f32<E>(fla_to_f32<E>(ks[i * LK + c]) * rk[i] * __expf(gsm[gl_row + c] - g));
    }
    u16* pg = static_cast<u16*>(p.aqk) + hrow * FLA_C;
    const long long ldp = (long long)p.hv * FLA_C;
    // P above the diagonal inside the diagonal blocks is read by the sweep: zero it.
    for (int e = tid; e < 4 * 256; e += TC_NT) {
        const int b = e >> 8, i = 16 * b + ((e >> 4) & 15), j = 16 * b + (e & 15);
        if (j > i && i < l) pg[i * ldp + j] = 0;
    }
    // The 4 x 136 pairs j <= i of the diagonal blocks, dense over the threads.
    for (int e = tid; e < 4 * 136; e += TC_NT) {
        const int b = e / 136, t = e % 136;
        const int r = (int)((sqrtf(8.0f * t + 1.0f) - 1.0f) * 0.5f);
        const int ri = r + (t >= (r + 1) * (r + 2) / 2) - (t < r * (r + 1) / 2); // guard the float rounding
        const int i = 16 * b + ri, j = 16 * b + t - ri * (ri + 1) / 2;
        if (i >= l) continue;
        // Independent partial sums over channel quarters: the loop is latency-bound otherwise
        // (one CTA of 4 warps per SM).
        float a4[4] = {}, p4[4] = {};
#pragma unroll 4
        for (int c0 = 0; c0 < KD; c0 += 4) {
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int c = c0 + u;
                const float x = __expf(gsm[i * LG + c] - gsm[j * LG + c]) * fla_to_f32<E>(ks[j * LK + c]);
                a4[u] += fla_to_f32<E>(ks[i * LK + c]) * x;
                p4[u] += fla_to_f32<E>(qs[i * LK + c]) * x;
            }
        }
        const float a = (a4[0] + a4[1]) + (a4[2] + a4[3]), pq = (p4[0] + p4[1]) + (p4[2] + p4[3]);
        if (j < i) af[i * TC_LDF + j] = bs[i] * rk[i] * rk[j] * a;
        pg[i * ldp + j] = fla_from_f32<E>(p.scale * rq[i] * rk[j] * pq);
    }
    __syncthreads();
    // Below the diagonal, one block pair (bi, bj < bi) at a time: with r = 16 bi, the left factors
    // beta_i k^_i e^(G_i - G_r), scale q^_i e^(G_i - G_r) (rows of block bi) and the right factors
    // k^_j e^(G_r - G_j) (rows of block bj) into `fb`, then A and P of the pair on tensor cores
    // (warp w: A (w < 2) or P, n-tile w % 2). Blocks from l on are zero.
    for (int bi = 1; bi < 4 && 16 * bi < l; ++bi) {
        const int r = 16 * bi;
        for (int bj = 0; bj < bi; ++bj) {
            __syncthreads();
            for (int e = tid; e < 16 * KD; e += TC_NT) {
                const int row = e / KD, c = e % KD, i = r + row, j = 16 * bj + row;
                const float gr = gsm[r * LG + c], ei = __expf(gsm[i * LG + c] - gr);
                fb[row * LK + c] = fla_from_f32<E>(bs[i] * rk[i] * fla_to_f32<E>(ks[i * LK + c]) * ei);
                fb[(16 + row) * LK + c] = fla_from_f32<E>(p.scale * rq[i] * fla_to_f32<E>(qs[i * LK + c]) * ei);
                fb[(32 + row) * LK + c] =
                    fla_from_f32<E>(rk[j] * fla_to_f32<E>(ks[j * LK + c]) * __expf(gr - gsm[j * LG + c]));
            }
            __syncthreads();
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            const u16* left = fb + (warp < 2 ? 0 : 16) * LK;
#pragma unroll
            for (int kk = 0; kk < KD; kk += 16) {
                unsigned a[4], b[4];
                fla_frag_a(a, left, LK, 0, kk);
                fla_frag_b_nk(b, fb + 32 * LK, LK, kk, 0);
                if (warp & 1) fla_mma<E>(acc, a, b[2], b[3]);
                else fla_mma<E>(acc, a, b[0], b[1]);
            }
            const int gq = lane >> 2, tq = lane & 3;
#pragma unroll
            for (int h2 = 0; h2 < 2; ++h2) {
                const int i = r + gq + 8 * h2, j = 16 * bj + 8 * (warp & 1) + 2 * tq;
                if (i >= l) continue;
                if (warp < 2) {
                    af[i * TC_LDF + j] = acc[2 * h2];
                    af[i * TC_LDF + j + 1] = acc[2 * h2 + 1];
                } else {
                    *reinterpret_cast<unsigned*>(pg + i * ldp + j) = fla_pack2<E>(acc[2 * h2], acc[2 * h2 + 1]);
                }
            }
        }
    }
    __syncthreads();
    for (int e = tid; e < FLA_C * TC_LDF; e += TC_NT) tf[e] = 0.0f;
    __syncthreads();
    tc_invert(af, tf, xs);
    // V block 0 where A was; W = T (beta k^ e^G): T in 16 bits where Q was, beta k^ e^G over K in
    // place.
    u16* vb = reinterpret_cast<u16*>(af);
    tc_load_v(p, 0, vb, bos, l, hv);
    // For the backward: T, and the norms its dq/dk kernel reads.
    tc_save_t<E>(p, tf, bos, l, hv);
    if (p.tm && tid < l) {
        p.rq[hrow + (long long)tid * p.hv] = rq[tid];
        p.rk[hrow + (long long)tid * p.hv] = rk[tid];
    }
    u16* tt = qs;
    u16* kb = ks;
    for (int e = tid; e < FLA_C * FLA_C / 2; e += TC_NT) {
        const int i = e >> 5, j = (e & 31) * 2;
        *reinterpret_cast<unsigned*>(tt + i * TC_LDC + j) = fla_pack2<E>(tf[i * TC_LDF + j], tf[i * TC_LDF + j + 1]);
    }
    for (int e = tid; e < FLA_C * KD; e += TC_NT) {
        const int i = e / KD, c = e % KD;
        kb[i * LK + c] = fla_from_f32<E>(bs[i] * rk[i] * __expf(gsm[i * LG + c]) * fla_to_f32<E>(ks[i * LK + c]));
    }
    __syncthreads();
    float acc[8][4];
    u16* wg = static_cast<u16*>(p.w16) + hrow * KD;
#pragma unroll
    for (int c0 = 0; c0 < KD; c0 += 64) {
        tc_lower_times<E, 8>(acc, tt, kb, LK, warp, c0, 64);
        tc_store_rows<E, 8>(acc, wg + c0, (long long)p.hv * KD, 16 * warp, 64, l);
    }
    __syncthreads();
    if (p.dv > 64) tc_load_v(p, 64, ks, bos, l, hv);
    tc_u<E>(p, tf, bs, tt, vb, ks, bos, l, hv);
}

// Dynamic shared memory of chunk_gdn_tc_fwd; keep in sync with `tc_fwd_smem` in
// fla-ops/src/cuda.rs.
#define TC_FWD_SMEM(KD, BV, ST) ((ST) * TC_FWD_STAGE(KD, BV) + ((KD) + 2 * FLA_C) * ((BV) + 8) * 2)

// CH groups of 4 warps share a CTA's tiles, each group taking BVW of its BV = CH BVW value
// columns (warp w: token / state rows by w % 4, columns by w / 4). ST = 2 loads the next chunk's
// inputs while the current one is computed (for few, long sweeps); ST = 1 leaves the overlap to
// other CTAs on the SM.
// CHANNEL: KDA's per-key-channel decay (Q, K tiles pre-scaled by the intra kernel; the state
// row c decays by e^(G_L,c)).
template <class E, int KD, int BVW, int CH, int ST, bool CHANNEL = false>
__device__ __forceinline__ void tc_fwd(const ChunkParams& p) {
    constexpr int NT = TC_NT * CH, BV = BVW * CH;
    constexpr int LK = KD + 8, LV = BV + 8, NTV = BVW / 8, MT = KD / 64;
    constexpr int STAGE = TC_FWD_STAGE(KD, BV);
    extern __shared__ __align__(16) unsigned char smem[];
    u16* sb = reinterpret_cast<u16*>(smem + ST * STAGE); // [KD][LV] S, 16-bit
    u16* vn = sb + KD * LV;                              // [C][LV] Vn
    u16* vs = vn + FLA_C * LV;                           // [C][LV] Vn rk e^{G_L - G}
    const TcSweep<KD, BVW, CH> sw(p);
    const int warp = sw.warp, cw = sw.cw, gq = sw.gq, tq = sw.tq, V = sw.V, hv = sw.hv, n = sw.n, hk = sw.hk;
    const int v0 = sw.v0, m0 = sw.m0, s0 = sw.s0;
    const long long sbase = sw.sbase;

    auto stage = [&](int st) { return smem + st * STAGE; };
    auto load = [&](int ci, int st) { tc_load_stage<NT, KD, BV, CHANNEL>(p, p.u16, stage(st), ci, hv, hk, v0); };

    // This thread's state elements: s[mt][nt][r] is S[row][col] of the block (C-fragment layout).
    float s[MT][NTV][4];
    auto each_state = [&](auto&& f) { sw.each_state(s, f); };
    each_state([&](float& e, int row, int col) { e = p.h0 ? p.h0[sbase + (long long)row * V + v0 + col] : 0.0f; });

    const int first = chunk_first(p, n), last = chunk_first(p, n + 1);
    if (ST == 2 && first < last) load(first, 0);
    for (int ci = first; ci < last; ++ci) {
        const int st = ST == 2 ? (ci - first) & 1 : 0;
        if (ST == 1) {
            load(ci, 0);
        } else if (ci + 1 < last) {
            load(ci + 1, st ^ 1); // its stage was last read before the previous iteration's final barrier
        }
        long long bos;
        int l;
        chunk_at(p, ci, bos, l);
        const long long hrow = bos * p.hv + hv;
        const TcStage<KD> sv(stage(st));
        const float *gs = sv.gs, *rq = sv.rq, *rk = sv.rk;
        const u16 *qs = sv.qs, *ks = sv.ks, *ws = sv.ws, *ps = sv.ps, *us = sv.vt;
        tc_pack_state<E, MT, NTV>(s, sb, LV, s0, cw,
                                  p.hs ? static_cast<u16*>(p.hs) + ((long long)ci * p.hv + hv) * KD * V + v0 : nullptr, V);
        // Wait for this chunk's group (the next chunk's, when issued, may stay in flight).
        if (ST == 2 && ci + 1 < last) fla_cp_wait_one();
        else fla_cp_wait_all();
        __syncthreads();

        // W S and Q S for this warp's 16 token rows.
        float av[NTV][4], ao[NTV][4];
#pragma unroll
        for (int nt = 0; nt < NTV; ++nt)
#pragma unroll
            for (int r = 0; r < 4; ++r) av[nt][r] = ao[nt][r] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KD; kk += 16) {
            unsigned fw[4], fq[4];
            fla_frag_a(fw, ws, LK, m0, kk);
            fla_frag_a(fq, qs, LK, m0, kk);
#pragma unroll
            for (int np = 0; np < NTV / 2; ++np) {
                unsigned b[4];
                fla_frag_b_kn(b, sb, LV, kk, cw + np * 16);
                fla_mma<E>(av[2 * np], fw, b[0], b[1]);
                fla_mma<E>(av[2 * np + 1], fw, b[2], b[3]);
                fla_mma<E>(ao[2 * np], fq, b[0], b[1]);
                fla_mma<E>(ao[2 * np + 1], fq, b[2], b[3]);
            }
        }
        // Vn = U - W S (and its copy scaled for the state update); the Q S part of O scaled.
        const float gl = CHANNEL ? 0.0f : gs[l - 1];
#pragma unroll
        for (int nt = 0; nt < NTV; ++nt)
#pragma unroll
            for (int h2 = 0; h2 < 2; ++h2) {
                const int i = m0 + gq + 8 * h2, x = cw + nt * 8 + 2 * tq;
                const float y0 = fla_to_f32<E>(us[i * LV + x]) - av[nt][2 * h2];
                const float y1 = fla_to_f32<E>(us[i * LV + x + 1]) - av[nt][2 * h2 + 1];
                *reinterpret_cast<unsigned*>(vn + i * LV + x) = fla_pack2<E>(y0, y1);
                if (p.vn && i < l)
                    *reinterpret_cast<unsigned*>(static_cast<u16*>(p.vn) + (hrow + i * p.hv) * V + v0 + x) =
                        fla_pack2<E>(y0, y1);
                const float f = i >= l ? 0.0f : CHANNEL ? 1.0f : rk[i] * __expf(gl - gs[i]);
                *reinterpret_cast<unsigned*>(vs + i * LV + x) = fla_pack2<E>(y0 * f, y1 * f);
                const float qf = CHANNEL ? p.scale : p.scale * rq[i] * __expf(gs[i]);
                ao[nt][2 * h2] *= qf;
                ao[nt][2 * h2 + 1] *= qf;
            }
        __syncthreads();

        // O += P Vn (blocks on or below the diagonal), stored (skipped when only the states and
        // new values are wanted: the backward's recompute).
        for (int kt = 0; kt <= warp && p.o; ++kt) {
            unsigned a[4];
            fla_frag_a(a, ps, TC_LDC, m0, kt * 16);
#pragma unroll
            for (int np = 0; np < NTV / 2; ++np) {
                unsigned b[4];
                fla_frag_b_kn(b, vn, LV, kt * 16, cw + np * 16);
                fla_mma<E>(ao[2 * np], a, b[0], b[1]);
                fla_mma<E>(ao[2 * np + 1], a, b[2], b[3]);
            }
        }
        if (p.o) tc_store_rows<E, NTV>(ao, static_cast<u16*>(p.o) + hrow * V + v0 + cw, (long long)p.hv * V, m0, BVW, l);

        // S <- e^{G_L} S + K^T (Vn rk e^{G_L - G}) (KDA: diag(e^{G_L}) S + Kt^T Vn).
        if (CHANNEL) {
            each_state([&](float& e, int row, int) { e *= __expf(gs[row]); });
        } else {
            const float el = __expf(gl);
            each_state([&](float& e, int, int) { e *= el; });
        }
#pragma unroll
        for (int kt = 0; kt < FLA_C / 16; ++kt) {
            if (kt * 16 < l) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    unsigned a[4];
                    fla_frag_a_t(a, ks, LK, s0 + mt * 16, kt * 16);
#pragma unroll
                    for (int np = 0; np < NTV / 2; ++np) {
                        unsigned b[4];
                        fla_frag_b_kn(b, vs, LV, kt * 16, cw + np * 16);
                        fla_mma<E>(s[mt][2 * np], a, b[0], b[1]);
                        fla_mma<E>(s[mt][2 * np + 1], a, b[2], b[3]);
                    }
                }
            }
        }
        __syncthreads();
    }
    if (p.ht) each_state([&](float& e, int row, int col) { p.ht[sbase + (long long)row * V + v0 + col] = e; });
}

#define TC_INTRA(E, NAME, KD)                                                                   \
    extern "C" __global__ void __launch_bounds__(TC_NT) chunk_gdn_tc_intra_##NAME##_k##KD(const ChunkParams p) { \
        tc_intra<E, KD>(p);                                                                     \
    }
#define TC_FWD(E, NAME, KD, BV, BVW, CH, ST)                                                    \
    extern "C" __global__ void __launch_bounds__(TC_NT * CH) chunk_gdn_tc_fwd_##NAME##_k##KD##_v##BV(const ChunkParams p) { \
        tc_fwd<E, KD, BVW, CH, ST>(p);                                                          \
    }
// Value blocks of 16 (4 warps, inputs double-buffered: the block for few sequences and heads),
// 32 (8 warps of 16 columns) and 64 (8 warps of 32 columns); keep in sync with
// `tc_fwd_threads` and `tc_fwd_stages` in fla-ops/src/cuda.rs.
#define TC_FWD_ALL(E, NAME, KD) \
    TC_FWD(E, NAME, KD, 16, 16, 1, 2) TC_FWD(E, NAME, KD, 32, 16, 2, 1) TC_FWD(E, NAME, KD, 64, 32, 2, 1)

#define KDA_INTRA(E, NAME, KD)                                                                  \
    extern "C" __global__ void __launch_bounds__(TC_NT) chunk_kda_tc_intra_##NAME##_k##KD(const ChunkParams p) { \
        kda_intra<E, KD>(p);                                                                    \
    }
#define KDA_FWD(E, NAME, KD, BV, BVW, CH, ST)                                                   \
    extern "C" __global__ void __launch_bounds__(TC_NT * CH) chunk_kda_tc_fwd_##NAME##_k##KD##_v##BV(const ChunkParams p) { \
        tc_fwd<E, KD, BVW, CH, ST, true>(p);                                                    \
    }
#define KDA_FWD_ALL(E, NAME, KD) \
    KDA_FWD(E, NAME, KD, 16, 16, 1, 2) KDA_FWD(E, NAME, KD, 32, 16, 2, 1) KDA_FWD(E, NAME, KD, 64, 32, 2, 1)

TC_INTRA(FlaBf16, bf16, 64)
TC_INTRA(FlaBf16, bf16, 128)
TC_INTRA(FlaF16, f16, 64)
TC_INTRA(FlaF16, f16, 128)
TC_FWD_ALL(FlaBf16, bf16, 64)
TC_FWD_ALL(FlaBf16, bf16, 128)
TC_FWD_ALL(FlaF16, f16, 64)
TC_FWD_ALL(FlaF16, f16, 128)
KDA_INTRA(FlaBf16, bf16, 64)
KDA_INTRA(FlaBf16, bf16, 128)
KDA_INTRA(FlaF16, f16, 64)
KDA_INTRA(FlaF16, f16, 128)
KDA_FWD_ALL(FlaBf16, bf16, 64)
KDA_FWD_ALL(FlaBf16, bf16, 128)
KDA_FWD_ALL(FlaF16, f16, 64)
KDA_FWD_ALL(FlaF16, f16, 128)
