// Tiles and helpers shared by the tensor-core chunk kernels (chunk_gdn_tc.cu: forward;
// chunk_bwd_tc.cu: backward): 4-warp CTAs (KDA's intra kernel: 8), [C][C] tiles, the per-chunk
// input stage of the sweeps.
#pragma once
#include "common/chunk.cuh"
#include "common/mma.cuh"

#define TC_NT 128          // threads per CTA (4 warps)
#define TC_LDC (FLA_C + 8)  // row stride of [C][C] 16-bit tiles (16-byte pad: conflict-free ldmatrix)
#define TC_LDF (FLA_C + 1)  // row stride of [C][C] f32 tiles

typedef unsigned short u16;

// acc (16 rows from 16 rw, 8 NTL columns from n0, ncols of them valid) = L X, for a
// lower-triangular [C][C] tile L (stride TC_LDC; only the blocks on or below the diagonal are
// read) and a row-major [C][..] tile X (stride ld).
template <class E, int NTL>
__device__ __forceinline__ void tc_lower_times(float (&acc)[NTL][4], const u16* L, const u16* X, int ld, int rw,
                                               int n0, int ncols) {
    const int m0 = rw * 16;
#pragma unroll
    for (int nt = 0; nt < NTL; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[nt][r] = 0.0f;
    for (int kt = 0; kt <= rw; ++kt) {
        unsigned a[4];
        fla_frag_a(a, L, TC_LDC, m0, kt * 16);
#pragma unroll
        for (int np = 0; np < NTL / 2; ++np) {
            if (np * 16 < ncols) {
                unsigned b[4];
                fla_frag_b_kn(b, X, ld, kt * 16, n0 + np * 16);
                fla_mma<E>(acc[2 * np], a, b[0], b[1]);
                fla_mma<E>(acc[2 * np + 1], a, b[2], b[3]);
            }
        }
    }
}

// Stores the rows m0 + i (i < 16, m0 + i < l) of a warp's 16 x (8 NT) accumulator block to
// dst + (m0 + i) * ld + j for the columns j < ncols, rounded to the element type.
template <class E, int NT>
__device__ __forceinline__ void tc_store_rows(const float (&acc)[NT][4], u16* dst, long long ld, int m0, int ncols,
                                              int l) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int h2 = 0; h2 < 2; ++h2) {
            const int i = m0 + (lane >> 2) + 8 * h2, j = nt * 8 + 2 * (lane & 3);
            if (i < l && j < ncols)
                *reinterpret_cast<unsigned*>(dst + i * ld + j) = fla_pack2<E>(acc[nt][2 * h2], acc[nt][2 * h2 + 1]);
        }
}

// 4 bytes global -> shared, asynchronously; zero-filled when `valid` is false.
__device__ __forceinline__ void tc_cp4(float* dst, const float* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(fla_smem_addr(dst)), "l"(src), "r"(valid ? 4 : 0));
}

// One stage of chunk_gdn_tc_fwd's inputs in shared memory: the G / norm vectors and the Q, K,
// W, P, U tiles of one chunk.
#define TC_FWD_STAGE(KD, BV) (3 * FLA_C * 4 + 3 * FLA_C * ((KD) + 8) * 2 + FLA_C * TC_LDC * 2 + FLA_C * ((BV) + 8) * 2)

// Views of one stage: the G, 1/|q|, 1/|k| vectors (f32 [C] each), the Q, K, W tiles
// ([C][KD + 8]), P ([C][TC_LDC]) and one value-column tile `vt` ([C][BV + 8]).
template <int KD> struct TcStage {
    const float *gs, *rq, *rk;
    const u16 *qs, *ks, *ws, *ps, *vt;
    __device__ __forceinline__ explicit TcStage(const unsigned char* st) {
        gs = reinterpret_cast<const float*>(st);
        rq = gs + FLA_C;
        rk = rq + FLA_C;
        qs = reinterpret_cast<const u16*>(rk + FLA_C);
        ks = qs + FLA_C * (KD + 8);
        ws = ks + FLA_C * (KD + 8);
        ps = ws + FLA_C * (KD + 8);
        vt = ps + FLA_C * TC_LDC;
    }
};

// Starts loading chunk `ci`'s sweep inputs for value head `hv` (key head `hk`) into `stage`: G,
// the norms, Q, K, W, P and the BV columns from `v0` of `vt` ([tokens, HV, V] 16-bit: U in the
// forward, dO in the backward), as one cp.async commit group.
//
// With CHANNEL (KDA), Q and K come as the intra kernel's per-value-head tiles q^ . e^G and
// k^ . e^(G_L - G), and the vector area holds G_L per key channel instead of G, 1/|q|, 1/|k|.
template <int NT, int KD, int BV, bool CHANNEL = false>
__device__ __forceinline__ void tc_load_stage(const ChunkParams& p, const void* vt, unsigned char* stage, int ci,
                                              int hv, int hk, int v0) {
    constexpr int LK = KD + 8, LV = BV + 8;
    long long bos;
    int l;
    chunk_at(p, ci, bos, l);
    const int tid = threadIdx.x, V = p.dv;
    float* vec = reinterpret_cast<float*>(stage);
    u16* qs = reinterpret_cast<u16*>(vec + 3 * FLA_C);
    u16* ks = qs + FLA_C * LK;
    u16* ws = ks + FLA_C * LK;
    u16* ps = ws + FLA_C * LK;
    u16* us = ps + FLA_C * TC_LDC;
    const long long hrow = bos * p.hv + hv;
    if (CHANNEL) {
        fla_load_tile<NT, FLA_C, KD>(qs, LK, static_cast<const u16*>(p.qg16) + hrow * KD, (long long)p.hv * KD, l);
        fla_load_tile<NT, FLA_C, KD>(ks, LK, static_cast<const u16*>(p.kt16) + hrow * KD, (long long)p.hv * KD, l);
    } else {
        fla_load_tile<NT, FLA_C, KD>(qs, LK, static_cast<const u16*>(p.q) + (bos * p.h + hk) * KD, (long long)p.h * KD, l);
        fla_load_tile<NT, FLA_C, KD>(ks, LK, static_cast<const u16*>(p.k) + (bos * p.h + hk) * KD, (long long)p.h * KD, l);
    }
    fla_load_tile<NT, FLA_C, KD>(ws, LK, static_cast<const u16*>(p.w16) + hrow * KD, (long long)p.hv * KD, l);
    fla_load_tile<NT, FLA_C, FLA_C>(ps, TC_LDC, static_cast<const u16*>(p.aqk) + hrow * FLA_C, (long long)p.hv * FLA_C, l);
    fla_load_tile<NT, FLA_C, BV>(us, LV, static_cast<const u16*>(vt) + hrow * V + v0, (long long)p.hv * V, l);
    if (CHANNEL) {
        if (tid < KD) tc_cp4(vec + tid, p.gc + (hrow + (long long)(l - 1) * p.hv) * KD + tid, true);
    } else if (tid < FLA_C) {
        const bool ok = tid < l;
        const long long i = (bos + (ok ? tid : 0)) * p.hv + hv;
        tc_cp4(vec + tid, p.gc + i, ok);
        tc_cp4(vec + FLA_C + tid, p.rq + i, ok);
        tc_cp4(vec + 2 * FLA_C + tid, p.rk + i, ok);
    }
    fla_cp_commit();
}

// A sweep's state block in registers (s[mt][nt][r]: C-fragment layout, rows s0 + 16 mt.., columns
// cw + 8 nt..) rounded to 16 bits into `sb` (row stride `ld`) and, when `global` is not null, to
// global + row * gld + column.
template <class E, int MT, int NTV>
__device__ __forceinline__ void tc_pack_state(const float (&s)[MT][NTV][4], u16* sb, int ld, int s0, int cw,
                                              u16* global, long long gld) {
    const int lane = threadIdx.x & 31, gq = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NTV; ++nt)
#pragma unroll
            for (int h2 = 0; h2 < 2; ++h2) {
                const int c = s0 + mt * 16 + gq + 8 * h2, x = cw + nt * 8 + 2 * tq;
                const unsigned v = fla_pack2<E>(s[mt][nt][2 * h2], s[mt][nt][2 * h2 + 1]);
                *reinterpret_cast<unsigned*>(sb + c * ld + x) = v;
                if (global) *reinterpret_cast<unsigned*>(global + c * gld + x) = v;
            }
}

// T = (I + A)^-1 for the strictly lower [C][C] f32 tile `af` (stride TC_LDF) into `tf` (same
// stride, zeroed by the caller): the 16x16 diagonal blocks by forward substitution (a warp
// each), then block rows X_j = sum_{m=j}^{i-1} A_im T_mj, T_ij = -T_ii X_j (warp j for block
// column j) on tensor cores to about f32 accuracy (3xTF32); `xs` is [3][16][16] f32 scratch.
// Warps 0..3 of the CTA's NT threads do the work, all take part in its barriers; ends with one.
template <int NT = TC_NT>
__device__ __forceinline__ void tc_invert(const float* af, float* tf, float* xs) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gq = lane >> 2, tq = lane & 3;
    if (NT == TC_NT || warp < 4) {
        const int b0 = warp * 16;
        if (lane < 16) tf[(b0 + lane) * TC_LDF + b0 + lane] = 1.0f;
        __syncwarp();
        for (int i = 1; i < 16; ++i) {
            if (lane < i) {
                const float* ar = af + (b0 + i) * TC_LDF + b0;
                float s = -ar[lane];
                for (int m = lane + 1; m < i; ++m) s -= ar[m] * tf[(b0 + m) * TC_LDF + b0 + lane];
                tf[(b0 + i) * TC_LDF + b0 + lane] = s;
            }
            __syncwarp();
        }
    }
    __syncthreads();
    for (int bi = 1; bi < 4; ++bi) {
        if (warp < bi) {
            const int bj = warp;
            float x[2][4] = {};
            for (int k0 = 16 * bj; k0 < 16 * bi; k0 += 8) {
                fla_mma_f32x3(x[0], af, TC_LDF, tf, TC_LDF, 16 * bi, k0, 16 * bj);
                fla_mma_f32x3(x[1], af, TC_LDF, tf, TC_LDF, 16 * bi, k0, 16 * bj + 8);
            }
#pragma unroll
            for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                for (int r = 0; r < 4; ++r) xs[bj * 256 + (gq + 8 * (r >> 1)) * 16 + 8 * nt + 2 * tq + (r & 1)] = x[nt][r];
            __syncwarp();
            float y[2][4] = {};
#pragma unroll
            for (int k0 = 0; k0 < 16; k0 += 8) {
                fla_mma_f32x3(y[0], tf + 16 * bi, TC_LDF, xs + bj * 256, 16, 16 * bi, k0, 0);
                fla_mma_f32x3(y[1], tf + 16 * bi, TC_LDF, xs + bj * 256, 16, 16 * bi, k0, 8);
            }
#pragma unroll
            for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                for (int r = 0; r < 4; ++r)
                    tf[(16 * bi + gq + 8 * (r >> 1)) * TC_LDF + 16 * bj + 8 * nt + 2 * tq + (r & 1)] = -y[nt][r];
        }
        __syncthreads();
    }
}

// With the backward's scratch (`tm` not null): rows i < l of T (f32 `tf`, stride TC_LDF) in 16
// bits to tm ([tokens, HV, C]) for one chunk and value head.
template <class E, int NT = TC_NT>
__device__ __forceinline__ void tc_save_t(const ChunkParams& p, const float* tf, long long bos, int l, int hv) {
    if (!p.tm) return;
    u16* tg = static_cast<u16*>(p.tm) + (bos * p.hv + hv) * FLA_C;
    for (int e = threadIdx.x; e < l * FLA_C / 2; e += NT) {
        const int i = e >> 5, j = (e & 31) * 2;
        *reinterpret_cast<unsigned*>(tg + i * (long long)p.hv * FLA_C + j) =
            fla_pack2<E>(tf[i * TC_LDF + j], tf[i * TC_LDF + j + 1]);
    }
}

// Starts loading V columns v0..v0+64 (or fewer, a multiple of 16) of one chunk and value head
// into the [C][TC_LDC] tile `dst` (rows >= l zero), as one commit group of the CTA's NT threads.
template <int NT = TC_NT>
__device__ __forceinline__ void tc_load_v(const ChunkParams& p, int v0, u16* dst, long long bos, int l, int hv) {
    const int V = p.dv, nv = min(64, V - v0);
    const u16* vg = static_cast<const u16*>(p.v) + (bos * p.hv + hv) * V + v0;
    const long long ld = (long long)p.hv * V;
    if (nv == 64) fla_load_tile<NT, FLA_C, 64>(dst, TC_LDC, vg, ld, l);
    else if (nv == 48) fla_load_tile<NT, FLA_C, 48>(dst, TC_LDC, vg, ld, l);
    else if (nv == 32) fla_load_tile<NT, FLA_C, 32>(dst, TC_LDC, vg, ld, l);
    else fla_load_tile<NT, FLA_C, 16>(dst, TC_LDC, vg, ld, l);
    fla_cp_commit();
}

// U = tt V into u16 scratch for the 16-bit lower-triangular tile tt = T diag(beta), V in blocks
// of 64 columns: block 0 is (being) loaded into `vb0`, block 1 (when V > 64) into `vb1` by the
// caller, which has made tt visible; later blocks are loaded here, alternating between the two.
// NT = 128: warp w on rows 16 w, all columns of a block; NT = 256: warp w on rows 16 (w % 4),
// columns 32 (w / 4) .. of a block.
template <class E, int NT>
__device__ __forceinline__ void tc_times_v(const ChunkParams& p, const u16* tt, u16* vb0, u16* vb1, long long bos,
                                           int l, int hv) {
    static_assert(NT == TC_NT || NT == 2 * TC_NT, "4 or 8 warps");
    constexpr int NTL = NT == TC_NT ? 8 : 4; // n8 tiles per warp
    const int warp = threadIdx.x >> 5, rw = warp & 3, n0 = NT == TC_NT ? 0 : (warp >> 2) * 32, V = p.dv;
    u16* ug = static_cast<u16*>(p.u16) + (bos * p.hv + hv) * V;
    float acc[NTL][4];
    for (int v0 = 0; v0 < V; v0 += 64) {
        u16* blk = (v0 / 64) & 1 ? vb1 : vb0;
        if (v0 >= 128) {
            __syncthreads();
            tc_load_v<NT>(p, v0, blk, bos, l, hv);
            fla_cp_wait_all();
            __syncthreads();
        }
        const int nv = min(64, V - v0);
        if (n0 < nv) {
            tc_lower_times<E, NTL>(acc, tt, blk, TC_LDC, rw, n0, nv - n0);
            tc_store_rows<E, NTL>(acc, ug + v0 + n0, (long long)p.hv * V, rw * 16, nv - n0, l);
        }
    }
}

// U = T diag(beta) V into u16 scratch, the end of chunk_gdn_tc_intra: T (f32 `tf`) scaled into
// the 16-bit tile `tt`, then tc_times_v (V blocks 0 and 1 loaded by the caller as there).
template <class E>
__device__ __forceinline__ void tc_u(const ChunkParams& p, const float* tf, const float* bs, u16* tt, u16* vb0,
                                     u16* vb1, long long bos, int l, int hv) {
    for (int e = threadIdx.x; e < FLA_C * FLA_C / 2; e += TC_NT) {
        const int i = e >> 5, j = (e & 31) * 2;
        *reinterpret_cast<unsigned*>(tt + i * TC_LDC + j) =
            fla_pack2<E>(tf[i * TC_LDF + j] * bs[j], tf[i * TC_LDF + j + 1] * bs[j + 1]);
    }
    fla_cp_wait_all();
    __syncthreads();
    tc_times_v<E, TC_NT>(p, tt, vb0, vb1, bos, l, hv);
}

// One sweep CTA's work — sequence n, value head hv (key head hk), BV = CH BVW value columns from
// v0 — and this thread's place in it: CH groups of 4 warps; warp w % 4 on token rows m0.. and
// state rows s0.., group w / 4 on the columns cw..cw + BVW of the block.
template <int KD, int BVW, int CH>
struct TcSweep {
    static constexpr int NTV = BVW / 8, MT = KD / 64;
    int lane, warp, cw, gq, tq, V, hv, n, hk, v0, m0, s0;
    long long sbase; // offset of the (n, hv) state [KD][V] in [N, HV, KD, V]
    __device__ __forceinline__ explicit TcSweep(const ChunkParams& p) {
        const int tid = threadIdx.x, nvb = p.dv / (BVW * CH);
        lane = tid & 31;
        warp = (tid >> 5) & 3;
        cw = (tid >> 7) * BVW;
        gq = lane >> 2;
        tq = lane & 3;
        V = p.dv;
        hv = (blockIdx.x / nvb) % p.hv;
        n = blockIdx.x / (nvb * p.hv);
        hk = hv / (p.hv / p.h);
        v0 = (blockIdx.x % nvb) * BVW * CH;
        m0 = warp * 16;
        s0 = warp * (KD / 4);
        sbase = ((long long)n * p.hv + hv) * KD * V;
    }
    // Calls f(element, row, column) for each state element this thread holds (s[mt][nt][r] in the
    // C-fragment layout; row and column within the [KD][BV] block).
    template <class F> __device__ __forceinline__ void each_state(float (&s)[MT][NTV][4], F&& f) const {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NTV; ++nt)
#pragma unroll
                for (int r = 0; r < 4; ++r)
                    f(s[mt][nt][r], s0 + mt * 16 + gq + 8 * (r >> 1), cw + nt * 8 + 2 * tq + (r & 1));
    }
};
