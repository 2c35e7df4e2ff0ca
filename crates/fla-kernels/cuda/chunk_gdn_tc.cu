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

// Threads of chunk_kda_tc_intra: 8 warps. Its scalar phases (the gate, the norms, the diagonal
// blocks, the split factors) use all of them; the inverse's substitutions run on warps 0..3
// while warps 4..7 prepare W's operand.
#define KDA_NT 256
// Bytes after A in chunk_kda_tc_intra's shared memory: T and the inverse's block products (f32),
// before them one block row's split factors (16-bit [80][KD + 8]).
#define KDA_TAIL(KD)                                                                                     \
    (FLA_C * TC_LDF * 4 + 3 * 256 * 4 > 80 * ((KD) + 8) * 2 ? FLA_C * TC_LDF * 4 + 3 * 256 * 4 \
                                                              : 80 * ((KD) + 8) * 2)
// Dynamic shared memory of chunk_kda_tc_intra; keep in sync with `kda_intra_smem` in
// fla-ops/src/cuda.rs: the K and Q tiles (16-bit [C][KD + 8]), G (f32 [C][KD]), A (f32 [C][LDF];
// before it e^g, f32 [C][KD] over A and T), the tail (KDA_TAIL), beta, 1/|q|, 1/|k| ([C] each).
// About 104 KB at K = 128: two CTAs (16 warps) per SM.
#define KDA_INTRA_SMEM(KD) \
    (2 * FLA_C * ((KD) + 8) * 2 + FLA_C * (KD) * 4 + FLA_C * TC_LDF * 4 + KDA_TAIL(KD) + 3 * FLA_C * 4)

// Channel c's place in a row of chunk_kda_tc_intra's per-channel f32 tiles (G, e^g): the row's
// 4-channel quads are swizzled, quad q at q ^ ((q >> 3) & 1), so that 8 lanes reading 8
// consecutive octets of one row (two 16-byte loads each) hit 32 different banks.
__device__ __forceinline__ int kda_swz(int c) { return c ^ ((c >> 3) & 4); }

// Octet o (channels 8 o .. 8 o + 7) of a swizzled f32 row.
__device__ __forceinline__ void kda_ld8f(const float* row, int o, float (&x)[8]) {
    const int f = (o >> 2) & 1;
    const float4 lo = reinterpret_cast<const float4*>(row)[2 * o + f];
    const float4 hi = reinterpret_cast<const float4*>(row)[2 * o + 1 - f];
    x[0] = lo.x, x[1] = lo.y, x[2] = lo.z, x[3] = lo.w;
    x[4] = hi.x, x[5] = hi.y, x[6] = hi.z, x[7] = hi.w;
}

// 8 consecutive 16-bit elements at p (16 bytes, aligned) as f32.
template <class E> __device__ __forceinline__ void kda_ld8h(const u16* p, float (&x)[8]) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        x[2 * i] = fla_to_f32<E>(static_cast<u16>(w[i] & 0xffffu));
        x[2 * i + 1] = fla_to_f32<E>(static_cast<u16>(w[i] >> 16));
    }
}

// 8 f32 values rounded to 16 bits, stored at p (16 bytes, aligned).
template <class E> __device__ __forceinline__ void kda_st8h(u16* p, const float (&x)[8]) {
    *reinterpret_cast<uint4*>(p) = make_uint4(fla_pack2<E>(x[0], x[1]), fla_pack2<E>(x[2], x[3]),
                                              fla_pack2<E>(x[4], x[5]), fla_pack2<E>(x[6], x[7]));
}

// The sums over 8 lanes (lane bits 0..2, s = lane & 7) of v = a | p (32 values): lane s gets
// out[t] = sum of v[4 s + t] (s < 4: a rows 4 s.., else p rows 4 (s - 4)..), by recursive halving.
__device__ __forceinline__ void kda_reduce8(const float (&a)[16], const float (&p)[16], int s, float (&out)[4]) {
    float v16[16], v8[8];
    const bool u2 = s & 4, u1 = s & 2, u0 = s & 1;
#pragma unroll
    for (int k = 0; k < 16; ++k) v16[k] = (u2 ? p[k] : a[k]) + __shfl_xor_sync(0xffffffffu, u2 ? a[k] : p[k], 4);
#pragma unroll
    for (int k = 0; k < 8; ++k)
        v8[k] = (u1 ? v16[8 + k] : v16[k]) + __shfl_xor_sync(0xffffffffu, u1 ? v16[k] : v16[8 + k], 2);
#pragma unroll
    for (int k = 0; k < 4; ++k)
        out[k] = (u0 ? v8[4 + k] : v8[k]) + __shfl_xor_sync(0xffffffffu, u0 ? v8[k] : v8[4 + k], 1);
}

// KDA's intra kernel: one CTA of 8 warps per (chunk, value head), every chunk at once.
//
// 1. g (with the in-op gate), a thread per channel and group of rows: e^g (f32, per token) and G,
//    the in-chunk cumulative sum.
// 2. The norms (8 lanes per row) and the sweep's tiles q^ . e^G and k^ . e^(G_L - G).
// 3. The four 16x16 diagonal blocks of A and P in f32, pair by pair as running products:
//    with y = k^_j (per channel), y <- y e^(g_i) as i walks down from j, so
//    A_ij = beta_i k^_i . y and P_ij = scale q^_i . y (every factor <= 1: exact under any decay;
//    the CPU twin's form). Warp w takes the columns j = w and 15 - w of all four blocks, lane
//    (block, slice) 1/8 of the channels; the channel sums are reduced across the 8 slices.
// 4. Below the diagonal blocks, block row by block row, split at the block row's first row r:
//    A_ij = sum_c (beta_i k^_ic e^(G_ic - G_rc)) (k^_jc e^(G_rc - G_jc)), both factors <= 1
//    (FLA's sub-chunk form), products on tensor cores.
// 5. T = (I + A)^-1 as in chunk_gdn_tc_intra (warps 0..3); warps 4..7 meanwhile form
//    k^ e^G over K and write G (the backward's scratch, or the row the sweep reads).
// 6. W = T diag(beta) (k^ e^G) and U = T diag(beta) V, warp w on rows 16 (w % 4), column half
//    w / 4; for the backward (tm not null) also T (16-bit) and 1/|q|, 1/|k| (f32).
template <class E, int KD>
__device__ __forceinline__ void kda_intra(const ChunkParams& p) {
    constexpr int NT = KDA_NT, LK = KD + 8, NO = KD / 8, MO = KD / 64;
    constexpr int NG = NT / KD, RG = FLA_C / NG; // phase 1: row groups, rows per group
    static_assert(KD == 64 || KD == 128, "K = 64 or 128");
    extern __shared__ __align__(16) unsigned char smem[];
    u16* ks = reinterpret_cast<u16*>(smem);                 // [C][LK] K; after phase 4, k^ e^G
    u16* qs = ks + FLA_C * LK;                              // [C][LK] Q; after phase 5, T diag(beta) [C][LDC]
    float* gsm = reinterpret_cast<float*>(qs + FLA_C * LK); // [C][KD] G (swizzled); after phase 5, V block 1
    float* af = gsm + FLA_C * KD;                           // [C][LDF] A; before it e^g; after phase 5, V block 0
    float* tf = af + FLA_C * TC_LDF;                        // [C][LDF] T; before it, split factors
    float* xs = tf + FLA_C * TC_LDF;                        // [3][256] inverse's block products; phase 1's group sums
    float* bs = reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(tf) + KDA_TAIL(KD)); // [C] beta
    float* rq = bs + FLA_C;                                 // [C] 1/|q|
    float* rk = rq + FLA_C;                                 // [C] 1/|k|
    float* es = af;                                         // [C][KD] e^g (swizzled), phases 1..3
    u16* fb = reinterpret_cast<u16*>(tf);                   // [80][LK] split factors, phase 4
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int ci = blockIdx.x, hv = blockIdx.y;
    long long bos;
    int l;
    chunk_at(p, ci, bos, l);
    const int hk = hv / (p.hv / p.h);
    const long long hrow = bos * p.hv + hv, gld = (long long)p.hv * KD;
    u16* pg = static_cast<u16*>(p.aqk) + hrow * FLA_C;
    const long long ldp = (long long)p.hv * FLA_C;

    fla_load_tile<NT, FLA_C, KD>(ks, LK, static_cast<const u16*>(p.k) + (bos * p.h + hk) * KD, (long long)p.h * KD, l);
    fla_load_tile<NT, FLA_C, KD>(qs, LK, static_cast<const u16*>(p.q) + (bos * p.h + hk) * KD, (long long)p.h * KD, l);
    fla_cp_commit();

    // 1. g in registers (rows from l on: 0), e^g, the group's running sums, then G.
    {
        const int c = tid % KD, grp = tid / KD, i0 = grp * RG, cs = kda_swz(c);
        const u16* gp = static_cast<const u16*>(p.g) + (hrow + (long long)i0 * p.hv) * KD + c;
        float gv[RG];
#pragma unroll
        for (int r = 0; r < RG; ++r) gv[r] = i0 + r < l ? fla_to_f32<E>(gp[r * gld]) : 0.0f;
        if (p.use_gate) {
            // softplus with the fast exp / log (≈ 1e-6 absolute in g; the accurate form is a third
            // of this kernel's instructions).
            const float ea = expf(fla_load(p.a_log, p.a_log_dtype, hv));
            const float db = fla_load(p.dt_bias, p.dt_bias_dtype, p.dt_per_channel ? hv * KD + c : hv);
#pragma unroll
            for (int r = 0; r < RG; ++r) {
                const float x = gv[r] + db;
                if (i0 + r < l) gv[r] = -ea * (x > 20.0f ? x : __logf(1.0f + __expf(x)));
            }
        }
        float acc = 0.0f;
#pragma unroll
        for (int r = 0; r < RG; ++r) {
            es[(i0 + r) * KD + cs] = __expf(gv[r]);
            acc += gv[r];
            gv[r] = acc;
        }
        if (grp < NG - 1) xs[grp * KD + c] = acc;
        if (tid < FLA_C) {
            float b = 0.0f;
            if (tid < l) {
                b = fla_to_f32<E>(static_cast<const u16*>(p.beta)[hrow + (long long)tid * p.hv]);
                if (p.beta_sigmoid) b = fla_sigmoidf(b);
            }
            bs[tid] = b;
        }
        __syncthreads();
        float off = 0.0f;
        for (int g = 0; g < grp; ++g) off += xs[g * KD + c];
#pragma unroll
        for (int r = 0; r < RG; ++r) gsm[(i0 + r) * KD + cs] = gv[r] + off;
    }
    fla_cp_wait_all();
    __syncthreads();

    // 2. Norms, 8 lanes per row (lane r8: octets r8 + 8 m), and the sweep's tiles.
    {
        const int r8 = lane & 7;
        const float* gl = gsm + (l - 1) * KD;
        for (int i = tid >> 3; i < FLA_C; i += NT / 8) {
            float qv[MO][8], kv[MO][8], sq = 0.0f, sk = 0.0f;
#pragma unroll
            for (int m = 0; m < MO; ++m) {
                const int o = r8 + 8 * m;
                kda_ld8h<E>(qs + i * LK + 8 * o, qv[m]);
                kda_ld8h<E>(ks + i * LK + 8 * o, kv[m]);
#pragma unroll
                for (int x = 0; x < 8; ++x) {
                    sq += qv[m][x] * qv[m][x];
                    sk += kv[m][x] * kv[m][x];
                }
            }
#pragma unroll
            for (int off = 1; off < 8; off <<= 1) {
                sq += __shfl_xor_sync(0xffffffffu, sq, off);
                sk += __shfl_xor_sync(0xffffffffu, sk, off);
            }
            const float fq = i >= l ? 0.0f : p.l2norm ? chunk_rnorm(sq) : 1.0f;
            const float fk = i >= l ? 0.0f : p.l2norm ? chunk_rnorm(sk) : 1.0f;
            if (r8 == 0) {
                rq[i] = fq;
                rk[i] = fk;
            }
            if (i < l) {
                const long long gi = (hrow + (long long)i * p.hv) * KD;
#pragma unroll
                for (int m = 0; m < MO; ++m) {
                    const int o = r8 + 8 * m;
                    float g8[8], gl8[8];
                    kda_ld8f(gsm + i * KD, o, g8);
                    kda_ld8f(gl, o, gl8);
#pragma unroll
                    for (int x = 0; x < 8; ++x) {
                        qv[m][x] *= fq * __expf(g8[x]);
                        kv[m][x] *= fk * __expf(gl8[x] - g8[x]);
                    }
                    kda_st8h<E>(static_cast<u16*>(p.qg16) + gi + 8 * o, qv[m]);
                    kda_st8h<E>(static_cast<u16*>(p.kt16) + gi + 8 * o, kv[m]);
                }
            }
        }
    }
    __syncthreads();

    // 3. The diagonal blocks: A's held in registers until e^g (where A goes) is dead, P's stored.
    float ad[2][4];
    {
        const int b = lane >> 3, s = lane & 7, r0 = 16 * b;
        // This lane's octets s + 8 m in row r0 of the block (rows below at compile-time offsets).
        const u16* kr = ks + r0 * LK + 8 * s;
        const u16* qr = qs + r0 * LK + 8 * s;
        const float* er = es + r0 * KD + 8 * s + 4 * ((s >> 2) & 1);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int j = h ? 15 - warp : warp;
            float a[16], pp[16], y[MO][8];
#pragma unroll
            for (int i = 0; i < 16; ++i) a[i] = pp[i] = 0.0f;
#pragma unroll
            for (int m = 0; m < MO; ++m) kda_ld8h<E>(kr + j * LK + 64 * m, y[m]);
#pragma unroll
            for (int i = 0; i < 16; ++i) {
                if (i >= j) {
                    // Four partial sums each: short dependency chains.
                    float ta[4] = {0.0f, 0.0f, 0.0f, 0.0f}, tp[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                    for (int m = 0; m < MO; ++m) {
                        float kv[8], qv[8];
                        if (i > j) {
                            // Octet s + 8 m of the swizzled row: its first quad at 8 (s + 8 m) + 4 f,
                            // its second at 8 (s + 8 m) + 4 (1 - f), f = (s >> 2) & 1 (as kda_ld8f).
                            const float* e = er + i * KD + 64 * m;
                            const float4 lo = *reinterpret_cast<const float4*>(e);
                            const float4 hi = *reinterpret_cast<const float4*>(e + 4 - 8 * ((s >> 2) & 1));
                            const float e8[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
                            for (int x = 0; x < 8; ++x) y[m][x] *= e8[x];
                        }
                        kda_ld8h<E>(kr + i * LK + 64 * m, kv);
                        kda_ld8h<E>(qr + i * LK + 64 * m, qv);
#pragma unroll
                        for (int x = 0; x < 8; ++x) {
                            ta[x & 3] += kv[x] * y[m][x];
                            tp[x & 3] += qv[x] * y[m][x];
                        }
                    }
                    a[i] = (ta[0] + ta[1]) + (ta[2] + ta[3]);
                    pp[i] = (tp[0] + tp[1]) + (tp[2] + tp[3]);
                }
            }
            float v[4];
            kda_reduce8(a, pp, s, v);
            if (s < 4) {
#pragma unroll
                for (int t = 0; t < 4; ++t) {
                    const int i = r0 + 4 * s + t;
                    ad[h][t] = i > r0 + j ? bs[i] * rk[i] * rk[r0 + j] * v[t] : 0.0f;
                }
            } else {
#pragma unroll
                for (int t = 0; t < 4; ++t) {
                    const int i = r0 + 4 * (s - 4) + t;
                    if (i < l) pg[i * ldp + r0 + j] = fla_from_f32<E>(p.scale * rq[i] * rk[r0 + j] * v[t]);
                }
            }
        }
    }
    __syncthreads();

    // 4. A's diagonal blocks into place; below them, block row bi at a time: the left factors
    // beta_i k^_i e^(G_i - G_r), scale q^_i e^(G_i - G_r) (rows i of the block row, r = 16 bi)
    // and the right factors k^_j e^(G_r - G_j) (rows j < r) into `fb`, then A and P of the block
    // row on tensor cores (warp 2 bj + x: A (x = 0) or P of block column bj).
    {
        const int b = lane >> 3, s = lane & 7;
        if (s < 4) {
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int t = 0; t < 4; ++t)
                    af[(16 * b + 4 * s + t) * TC_LDF + 16 * b + (h ? 15 - warp : warp)] = ad[h][t];
        }
    }
    for (int bi = 1; bi < 4; ++bi) {
        const int r = 16 * bi;
        for (int e = tid; e < (16 + 16 * bi) * NO; e += NT) {
            const int row = e / NO, o = e % NO;
            float gr[8], g8[8], kv[8];
            kda_ld8f(gsm + r * KD, o, gr);
            if (row < 16) {
                const int i = r + row;
                float qv[8];
                kda_ld8f(gsm + i * KD, o, g8);
                kda_ld8h<E>(ks + i * LK + 8 * o, kv);
                kda_ld8h<E>(qs + i * LK + 8 * o, qv);
                const float fk = bs[i] * rk[i], fq = p.scale * rq[i];
#pragma unroll
                for (int x = 0; x < 8; ++x) {
                    const float d = __expf(g8[x] - gr[x]);
                    kv[x] *= fk * d;
                    qv[x] *= fq * d;
                }
                kda_st8h<E>(fb + row * LK + 8 * o, kv);
                kda_st8h<E>(fb + (16 + row) * LK + 8 * o, qv);
            } else {
                const int j = row - 16;
                kda_ld8f(gsm + j * KD, o, g8);
                kda_ld8h<E>(ks + j * LK + 8 * o, kv);
                const float fk = rk[j];
#pragma unroll
                for (int x = 0; x < 8; ++x) kv[x] *= fk * __expf(gr[x] - g8[x]);
                kda_st8h<E>(fb + (32 + j) * LK + 8 * o, kv);
            }
        }
        __syncthreads();
        if (warp < 2 * bi) {
            const int bj = warp >> 1, is_p = warp & 1, gq = lane >> 2, tq = lane & 3;
            const u16* left = fb + (is_p ? 16 : 0) * LK;
            const u16* right = fb + (32 + 16 * bj) * LK;
            float acc[2][4] = {};
#pragma unroll
            for (int kk = 0; kk < KD; kk += 16) {
                unsigned fa[4], fr[4];
                fla_frag_a(fa, left, LK, 0, kk);
                fla_frag_b_nk(fr, right, LK, kk, 0);
                fla_mma<E>(acc[0], fa, fr[0], fr[1]);
                fla_mma<E>(acc[1], fa, fr[2], fr[3]);
            }
#pragma unroll
            for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                for (int h2 = 0; h2 < 2; ++h2) {
                    const int i = r + gq + 8 * h2, j = 16 * bj + 8 * nt + 2 * tq;
                    if (!is_p) {
                        af[i * TC_LDF + j] = acc[nt][2 * h2];
                        af[i * TC_LDF + j + 1] = acc[nt][2 * h2 + 1];
                    } else if (i < l) {
                        *reinterpret_cast<unsigned*>(pg + i * ldp + j) = fla_pack2<E>(acc[nt][2 * h2], acc[nt][2 * h2 + 1]);
                    }
                }
        }
        __syncthreads();
    }

    // 5. T on warps 0..3, each zeroing its 16 rows of T first; warps 4..7 meanwhile form W's
    // operand k^ e^G over K, G into gc (every row for the backward, else the last one, which the
    // sweep reads) and, for the backward, the norms.
    if (warp < 4) {
        float4* t4 = reinterpret_cast<float4*>(tf + 16 * warp * TC_LDF);
        for (int e = lane; e < 16 * TC_LDF / 4; e += 32) t4[e] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        __syncwarp();
    } else {
        const int t = tid - NT / 2;
        for (int e = t; e < FLA_C * NO; e += NT / 2) {
            const int i = e / NO, o = e % NO;
            float g8[8], kv[8];
            kda_ld8f(gsm + i * KD, o, g8);
            kda_ld8h<E>(ks + i * LK + 8 * o, kv);
            const float fk = rk[i];
#pragma unroll
            for (int x = 0; x < 8; ++x) kv[x] *= fk * __expf(g8[x]);
            kda_st8h<E>(ks + i * LK + 8 * o, kv);
        }
        for (int e = (p.tm ? 0 : l - 1) * NO + t; e < l * NO; e += NT / 2) {
            const int i = e / NO, o = e % NO;
            float g8[8];
            kda_ld8f(gsm + i * KD, o, g8);
            float4* d = reinterpret_cast<float4*>(p.gc + (hrow + (long long)i * p.hv) * KD + 8 * o);
            d[0] = make_float4(g8[0], g8[1], g8[2], g8[3]);
            d[1] = make_float4(g8[4], g8[5], g8[6], g8[7]);
        }
        if (p.tm) {
            for (int i = t; i < l; i += NT / 2) {
                p.rq[hrow + (long long)i * p.hv] = rq[i];
                p.rk[hrow + (long long)i * p.hv] = rk[i];
            }
        }
    }
    tc_invert<NT>(af, tf, xs);

    // 6. V blocks 0 and 1 where A and G were, T for the backward, tt = T diag(beta) in 16 bits
    // where Q was; then W = tt (k^ e^G) and U = tt V.
    u16* vb0 = reinterpret_cast<u16*>(af);
    u16* vb1 = reinterpret_cast<u16*>(gsm);
    tc_load_v<NT>(p, 0, vb0, bos, l, hv);
    if (p.dv > 64) tc_load_v<NT>(p, 64, vb1, bos, l, hv);
    tc_save_t<E, NT>(p, tf, bos, l, hv);
    u16* tt = qs;
    for (int e = tid; e < FLA_C * FLA_C / 2; e += NT) {
        const int i = e >> 5, j = (e & 31) * 2;
        *reinterpret_cast<unsigned*>(tt + i * TC_LDC + j) =
            fla_pack2<E>(tf[i * TC_LDF + j] * bs[j], tf[i * TC_LDF + j + 1] * bs[j + 1]);
    }
    fla_cp_wait_all();
    __syncthreads();
    {
        constexpr int NTL = KD / 16; // n8 tiles of a column half of W
        const int rw = warp & 3, c0 = (warp >> 2) * (KD / 2);
        float acc[NTL][4];
        tc_lower_times<E, NTL>(acc, tt, ks, LK, rw, c0, KD / 2);
        tc_store_rows<E, NTL>(acc, static_cast<u16*>(p.w16) + hrow * KD + c0, (long long)p.hv * KD, 16 * rw, KD / 2, l);
    }
    tc_times_v<E, NT>(p, tt, vb0, vb1, bos, l, hv);
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
    extern "C" __global__ void __launch_bounds__(KDA_NT, 2) chunk_kda_tc_intra_##NAME##_k##KD(const ChunkParams p) { \
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
