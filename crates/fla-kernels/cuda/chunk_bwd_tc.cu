// Chunk backward of Gated DeltaNet and DeltaNet on tensor cores (mma.sync m16n8k16, f32
// accumulation) for bf16 / f16 inputs, K and V of 64 or 128. The equations are those of
// chunk_bwd.cu (the f32 path) and fla-ops/src/chunk/backward.rs; the forward is recomputed first
// by chunk_gdn_tc.cu, which also saves T, the state entering each chunk and the new values in
// 16 bits. Two kernels, then chunk_bwd_post (chunk_bwd.cu) as on the f32 path:
//
// chunk_bwd_tc_dh: one CTA per (sequence, value head, BV value columns), chunks in reverse, dS in
//   f32 registers (the forward sweep's layout and tilings):
//     dU = diag(rk e^(G_L - G)) K dS + P^T dO;   dS <- e^(G_L) dS + Q^T (scale rq e^G dO) - W^T dU
//   saves dS (per chunk) and dU in 16 bits.
// chunk_bwd_tc_dqk: one CTA per (chunk, value head), every chunk at once, with the normalised
//   q^, k^ (16 bits):
//     dY = T^T dU                  dv = beta dY, dbeta = sum_v v dY (+ k^ . dbk below)
//     dN = scale dO U^T . E        dM = -dY U^T . E (strictly lower), E_ij = e^(G_i - G_j)
//     dq = scale e^G (dO S0^T) + dN K^
//     dk = e^(G_L - G) (U dS^T) + dN^T Q^ + (beta dM)^T K^ + beta dbk,  dbk = -e^G (dY S0^T) + dM K^
//   and the gate without forming the pair terms: every decay factor e^(G_i - G_j) gives +t to
//   row i and -t to row j, and t is exactly what the same product gives q^ . dq (or beta k^ . dbk)
//   at row i and k^ . dk at row j, so
//     dG_i = q^_i . dq_i - k^_i . (dk_i - beta_i dbk_i) + beta_i k^_i . dbk_i,
//     dG_L = e^(G_L) sum dS . S0 + sum_i k^_i . e^(G_L - G_i) (U dS^T)_i,
//   then dg_t = sum_{i >= t} dG_i + dG_L.
#include "common/dtype.cuh"
#include "common/chunk.cuh"
#include "common/chunk_bwd.cuh"
#include "common/chunk_tc.cuh"

// The reverse sweep: CH groups of 4 warps share a CTA's tiles, each group taking BVW of its
// BV = CH BVW columns; ST = 2 double-buffers the inputs (as chunk_gdn_tc_fwd).
template <class E, int KD, int BVW, int CH, int ST>
__device__ __forceinline__ void tc_bwd_dh(const ChunkBwdParams& bp) {
    const ChunkParams& p = bp.f;
    constexpr int NT = TC_NT * CH, BV = BVW * CH;
    constexpr int LV = BV + 8, NTV = BVW / 8, MT = KD / 64;
    constexpr int LK = KD + 8;
    constexpr int STAGE = TC_FWD_STAGE(KD, BV);
    extern __shared__ __align__(16) unsigned char smem[];
    u16* sb = reinterpret_cast<u16*>(smem + ST * STAGE); // [KD][LV] dS, 16-bit
    u16* ndu = sb + KD * LV;                             // [C][LV] -dU
    u16* dos = ndu + FLA_C * LV;                         // [C][LV] scale rq e^G dO
    const TcSweep<KD, BVW, CH> sw(p);
    const int warp = sw.warp, cw = sw.cw, gq = sw.gq, tq = sw.tq, V = sw.V, hv = sw.hv, n = sw.n, hk = sw.hk;
    const int v0 = sw.v0, m0 = sw.m0, s0 = sw.s0;
    const long long sbase = sw.sbase;

    auto stage = [&](int st) { return smem + st * STAGE; };
    auto load = [&](int ci, int st) { tc_load_stage<NT, KD, BV>(p, bp.d_o, stage(st), ci, hv, hk, v0); };
    float s[MT][NTV][4];
    auto each_state = [&](auto&& f) { sw.each_state(s, f); };
    each_state([&](float& e, int row, int col) { e = bp.dht ? bp.dht[sbase + (long long)row * V + v0 + col] : 0.0f; });

    const int first = chunk_first(p, n), last = chunk_first(p, n + 1);
    if (ST == 2 && first < last) load(last - 1, 0);
    for (int ci = last - 1; ci >= first; --ci) {
        const int st = ST == 2 ? (last - 1 - ci) & 1 : 0;
        if (ST == 1) {
            load(ci, 0);
        } else if (ci > first) {
            load(ci - 1, st ^ 1);
        }
        long long bos;
        int l;
        chunk_at(p, ci, bos, l);
        const long long hrow = bos * p.hv + hv;
        const TcStage<KD> sv(stage(st));
        const float *gs = sv.gs, *rq = sv.rq, *rk = sv.rk;
        const u16 *qs = sv.qs, *ks = sv.ks, *ws = sv.ws, *ps = sv.ps, *os = sv.vt;
        tc_pack_state<E, MT, NTV>(s, sb, LV, s0, cw, static_cast<u16*>(bp.dhs) + ((long long)ci * p.hv + hv) * KD * V + v0, V);
        if (ST == 2 && ci > first) fla_cp_wait_one();
        else fla_cp_wait_all();
        __syncthreads();

        // dU = diag(rk e^(G_L - G)) K dS + P^T dO for this warp's 16 token rows.
        float au[NTV][4];
#pragma unroll
        for (int nt = 0; nt < NTV; ++nt)
#pragma unroll
            for (int r = 0; r < 4; ++r) au[nt][r] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KD; kk += 16) {
            unsigned a[4];
            fla_frag_a(a, ks, LK, m0, kk);
#pragma unroll
            for (int np = 0; np < NTV / 2; ++np) {
                unsigned b[4];
                fla_frag_b_kn(b, sb, LV, kk, cw + np * 16);
                fla_mma<E>(au[2 * np], a, b[0], b[1]);
                fla_mma<E>(au[2 * np + 1], a, b[2], b[3]);
            }
        }
        const float gl = gs[l - 1];
#pragma unroll
        for (int h2 = 0; h2 < 2; ++h2) {
            const int i = m0 + gq + 8 * h2;
            const float f = i < l ? rk[i] * __expf(gl - gs[i]) : 0.0f;
#pragma unroll
            for (int nt = 0; nt < NTV; ++nt) {
                au[nt][2 * h2] *= f;
                au[nt][2 * h2 + 1] *= f;
            }
        }
        // (P^T)_ij = P_ji is nonzero for j >= i: the blocks from the diagonal on.
        for (int kt = warp; kt < FLA_C / 16; ++kt) {
            if (kt * 16 >= l) break;
            unsigned a[4];
            fla_frag_a_t(a, ps, TC_LDC, m0, kt * 16);
#pragma unroll
            for (int np = 0; np < NTV / 2; ++np) {
                unsigned b[4];
                fla_frag_b_kn(b, os, LV, kt * 16, cw + np * 16);
                fla_mma<E>(au[2 * np], a, b[0], b[1]);
                fla_mma<E>(au[2 * np + 1], a, b[2], b[3]);
            }
        }
        // dU to 16 bits (global; negated in shared for the state update), and dO scaled.
#pragma unroll
        for (int nt = 0; nt < NTV; ++nt)
#pragma unroll
            for (int h2 = 0; h2 < 2; ++h2) {
                const int i = m0 + gq + 8 * h2, x = cw + nt * 8 + 2 * tq;
                const float u0 = au[nt][2 * h2], u1 = au[nt][2 * h2 + 1];
                if (i < l)
                    *reinterpret_cast<unsigned*>(static_cast<u16*>(bp.du) + (hrow + i * p.hv) * V + v0 + x) =
                        fla_pack2<E>(u0, u1);
                *reinterpret_cast<unsigned*>(ndu + i * LV + x) = fla_pack2<E>(-u0, -u1);
                const float f = i < l ? p.scale * rq[i] * __expf(gs[i]) : 0.0f;
                *reinterpret_cast<unsigned*>(dos + i * LV + x) =
                    fla_pack2<E>(f * fla_to_f32<E>(os[i * LV + x]), f * fla_to_f32<E>(os[i * LV + x + 1]));
            }
        __syncthreads();

        // dS <- e^(G_L) dS + Q^T dO' - W^T dU.
        const float el = __expf(gl);
        each_state([&](float& e, int, int) { e *= el; });
#pragma unroll
        for (int kt = 0; kt < FLA_C / 16; ++kt) {
            if (kt * 16 < l) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    unsigned aq[4], aw[4];
                    fla_frag_a_t(aq, qs, LK, s0 + mt * 16, kt * 16);
                    fla_frag_a_t(aw, ws, LK, s0 + mt * 16, kt * 16);
#pragma unroll
                    for (int np = 0; np < NTV / 2; ++np) {
                        unsigned b[4];
                        fla_frag_b_kn(b, dos, LV, kt * 16, cw + np * 16);
                        fla_mma<E>(s[mt][2 * np], aq, b[0], b[1]);
                        fla_mma<E>(s[mt][2 * np + 1], aq, b[2], b[3]);
                        fla_frag_b_kn(b, ndu, LV, kt * 16, cw + np * 16);
                        fla_mma<E>(s[mt][2 * np], aw, b[0], b[1]);
                        fla_mma<E>(s[mt][2 * np + 1], aw, b[2], b[3]);
                    }
                }
            }
        }
        __syncthreads();
    }
    if (bp.dh0) each_state([&](float& e, int row, int col) { bp.dh0[sbase + (long long)row * V + v0 + col] = e; });
}

// Sums `x` over the 4 lanes holding one row of a C fragment (lanes with equal lane / 4).
__device__ __forceinline__ float tc_row_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

template <int NTN>
__device__ __forceinline__ void tc_zero(float (&acc)[NTN][4]) {
#pragma unroll
    for (int nt = 0; nt < NTN; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[nt][r] = 0.0f;
}

// acc (16 rows from m0, NTN n-tiles from column n0) += X[m0.., :KDIM] Y[n0.., :KDIM]^T: the
// product of two row-major tiles over their shared column dimension.
template <class E, int NTN, int KDIM>
__device__ __forceinline__ void tc_abt(float (&acc)[NTN][4], const u16* x, int ldx, const u16* y, int ldy, int m0,
                                       int n0) {
#pragma unroll
    for (int kk = 0; kk < KDIM; kk += 16) {
        unsigned a[4];
        fla_frag_a(a, x, ldx, m0, kk);
#pragma unroll
        for (int np = 0; np < NTN / 2; ++np) {
            unsigned b[4];
            fla_frag_b_nk(b, y, ldy, kk, n0 + np * 16);
            fla_mma<E>(acc[2 * np], a, b[0], b[1]);
            fla_mma<E>(acc[2 * np + 1], a, b[2], b[3]);
        }
    }
}

// acc (16 rows from 16 rw, NTN n-tiles from column n0) += L X for a [C][C] tile L (stride
// TC_LDC) and X [C][..] row-major: with `transposed`, L^T over the blocks kt >= rw (L lower
// triangular, so L^T upper), else L over the blocks kt <= rw; blocks from l on are zero.
template <class E, int NTN>
__device__ __forceinline__ void tc_tri_times(float (&acc)[NTN][4], const u16* L, bool transposed, const u16* x, int ldx,
                                             int rw, int n0, int l) {
    const int m0 = rw * 16;
    const int k_lo = transposed ? rw : 0, k_hi = transposed ? FLA_C / 16 - 1 : rw;
    for (int kt = k_lo; kt <= k_hi; ++kt) {
        if (kt * 16 >= l) break;
        unsigned a[4];
        if (transposed) fla_frag_a_t(a, L, TC_LDC, m0, kt * 16);
        else fla_frag_a(a, L, TC_LDC, m0, kt * 16);
#pragma unroll
        for (int np = 0; np < NTN / 2; ++np) {
            unsigned b[4];
            fla_frag_b_kn(b, x, ldx, kt * 16, n0 + np * 16);
            fla_mma<E>(acc[2 * np], a, b[0], b[1]);
            fla_mma<E>(acc[2 * np + 1], a, b[2], b[3]);
        }
    }
}

// Scales the rows of a warp's accumulator block (16 rows from m0) by f(row).
template <int NTN, class F>
__device__ __forceinline__ void tc_scale_rows(float (&acc)[NTN][4], int m0, F f) {
    const int gq = (threadIdx.x & 31) >> 2;
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
        const float s = f(m0 + gq + 8 * h2);
#pragma unroll
        for (int nt = 0; nt < NTN; ++nt) {
            acc[nt][2 * h2] *= s;
            acc[nt][2 * h2 + 1] *= s;
        }
    }
}

// Adds, for each of the thread's two rows i, sum_c acc[i][c] tile[i][c] over the block's columns
// (from n0) to out[i] in shared memory (the other column groups add their parts too).
template <class E, int NTN>
__device__ __forceinline__ void tc_row_dots(const float (&acc)[NTN][4], const u16* tile, int ld, int m0, int n0,
                                            float* out) {
    const int lane = threadIdx.x & 31, gq = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
        const int i = m0 + gq + 8 * h2;
        float d = 0.0f;
#pragma unroll
        for (int nt = 0; nt < NTN; ++nt) {
            const int c = n0 + nt * 8 + 2 * tq;
            d += acc[nt][2 * h2] * fla_to_f32<E>(tile[i * ld + c]) + acc[nt][2 * h2 + 1] * fla_to_f32<E>(tile[i * ld + c + 1]);
        }
        d = tc_row_sum(d);
        if (tq == 0) atomicAdd(out + i, d);
    }
}

// Stores the gradient of a q or k row block (16 rows from m0, columns from n0), rows i < l:
// with `final`, in the dtype to dst16 + i * ld16 + column, through the in-op L2 norm's backward
// when `l2` (dx = r (dx^ - x^ (x^ . dx^)), x^ from `tile`, r from `rn`, the dot from `dot`);
// else in f32 to dst32 + i * ld32 + column (summed over a group's value heads later).
template <class E, int NTN>
__device__ __forceinline__ void tc_store_grad(const float (&acc)[NTN][4], int m0, int n0, int l, bool final, bool l2,
                                              const u16* tile, int ld, const float* rn, const float* dot, u16* dst16,
                                              long long ld16, float* dst32, long long ld32) {
    const int lane = threadIdx.x & 31, gq = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
        const int i = m0 + gq + 8 * h2;
        if (i >= l) continue;
        const float r = l2 ? rn[i] : 1.0f, d = l2 ? dot[i] : 0.0f;
#pragma unroll
        for (int nt = 0; nt < NTN; ++nt) {
            const int c = n0 + nt * 8 + 2 * tq;
            float g0 = acc[nt][2 * h2], g1 = acc[nt][2 * h2 + 1];
            if (!final) {
                *reinterpret_cast<float2*>(dst32 + i * ld32 + c) = make_float2(g0, g1);
                continue;
            }
            if (l2) {
                g0 = r * (g0 - fla_to_f32<E>(tile[i * ld + c]) * d);
                g1 = r * (g1 - fla_to_f32<E>(tile[i * ld + c + 1]) * d);
            }
            *reinterpret_cast<unsigned*>(dst16 + i * ld16 + c) = fla_pack2<E>(g0, g1);
        }
    }
}

// Row stride of the [..][V] tiles of chunk_bwd_tc_dqk.
#define TC_LW(VD) ((VD) + 8)
// chunk_bwd_tc_dqk runs CG groups of 4 warps (CG = 2 or 4): warp w on token rows 16 (w % 4)..
// and the column group w / 4 of every output.
// Dynamic shared memory of chunk_bwd_tc_dqk; keep in sync with `tc_dqk_smem` in
// fla-ops/src/cuda.rs: Q^, K^ [C][KD+8]; dO, U, dU, dY [C][VD+8]; S0, dS [KD][VD+8]; T, dN, dM,
// beta dM [C][C+8] (16-bit); nine [C] vectors and one sum (f32).
#define TC_DQK_SMEM(KD, VD) \
    ((2 * FLA_C * ((KD) + 8) + 4 * FLA_C * TC_LW(VD) + 2 * (KD) * TC_LW(VD) + 4 * FLA_C * TC_LDC) * 2 + (9 * FLA_C + 4) * 4)

template <class E, int KD, int VD, int CG>
__device__ __forceinline__ void tc_bwd_dqk(const ChunkBwdParams& bp) {
    const ChunkParams& p = bp.f;
    constexpr int NT = TC_NT * CG;
    constexpr int LK = KD + 8, LW = TC_LW(VD), NK = KD / (8 * CG), NV = VD / (8 * CG); // n-tiles per group
    constexpr int NC = 8 / CG;                                                          // of the [C][C] tiles
    extern __shared__ __align__(16) unsigned char smem[];
    u16* qh = reinterpret_cast<u16*>(smem); // [C][LK] q^
    u16* kh = qh + FLA_C * LK;              // [C][LK] k^
    u16* dos = kh + FLA_C * LK;             // [C][LW] dO
    u16* us = dos + FLA_C * LW;             // [C][LW] U (new values)
    u16* dus = us + FLA_C * LW;             // [C][LW] dU
    u16* dys = dus + FLA_C * LW;            // [C][LW] dY
    u16* s0s = dys + FLA_C * LW;            // [KD][LW] S0
    u16* dss = s0s + KD * LW;               // [KD][LW] dS
    u16* ts = dss + KD * LW;                // [C][LDC] T
    u16* dns = ts + FLA_C * TC_LDC;         // [C][LDC] dN
    u16* dms = dns + FLA_C * TC_LDC;        // [C][LDC] dM
    u16* dmb = dms + FLA_C * TC_LDC;        // [C][LDC] beta dM
    float* gs = reinterpret_cast<float*>(dmb + FLA_C * TC_LDC); // [C] G
    float* bs = gs + FLA_C;                 // [C] beta
    float* rq = bs + FLA_C;                 // [C] 1/|q|
    float* rk = rq + FLA_C;                 // [C] 1/|k|
    float* qdot = rk + FLA_C;               // [C] q^ . dq^
    float* kdot = qdot + FLA_C;             // [C] k^ . dk^ (the final dk^)
    float* bdot = kdot + FLA_C;             // [C] k^ . dbk
    float* rowl = bdot + FLA_C;             // [C] row terms of dG_L
    float* rowb = rowl + FLA_C;             // [C] sum_v v dY
    float* red = rowb + FLA_C;              // [1] sum dS . S0
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gq = lane >> 2, tq = lane & 3;
    const int rw = warp & 3, cg = warp >> 2, m0 = rw * 16;
    const int ci = blockIdx.x, hv = blockIdx.y;
    long long bos;
    int l;
    chunk_at(p, ci, bos, l);
    const int hk = hv / (p.hv / p.h);
    const long long hrow = bos * p.hv + hv, vld = (long long)p.hv * VD;
    const long long sbase = ((long long)ci * p.hv + hv) * KD * VD;

    fla_load_tile<NT, FLA_C, FLA_C>(ts, TC_LDC, static_cast<const u16*>(p.tm) + hrow * FLA_C, (long long)p.hv * FLA_C, l);
    fla_load_tile<NT, FLA_C, VD>(dus, LW, static_cast<const u16*>(bp.du) + hrow * VD, vld, l);
    fla_cp_commit();
    fla_load_tile<NT, FLA_C, KD>(qh, LK, static_cast<const u16*>(p.q) + (bos * p.h + hk) * KD, (long long)p.h * KD, l);
    fla_load_tile<NT, FLA_C, KD>(kh, LK, static_cast<const u16*>(p.k) + (bos * p.h + hk) * KD, (long long)p.h * KD, l);
    fla_load_tile<NT, FLA_C, VD>(dos, LW, static_cast<const u16*>(bp.d_o) + hrow * VD, vld, l);
    fla_load_tile<NT, FLA_C, VD>(us, LW, static_cast<const u16*>(p.vn) + hrow * VD, vld, l);
    fla_load_tile<NT, KD, VD>(s0s, LW, static_cast<const u16*>(p.hs) + sbase, VD, KD);
    fla_load_tile<NT, KD, VD>(dss, LW, static_cast<const u16*>(bp.dhs) + sbase, VD, KD);
    fla_cp_commit();
    if (tid < FLA_C) {
        const bool ok = tid < l;
        const long long i = hrow + (long long)tid * p.hv;
        float g, b = 0.0f;
        if (ok) chunk_gate_beta(p, i, hv, g, b);
        gs[tid] = ok ? p.gc[i] : 0.0f;
        bs[tid] = b;
        rq[tid] = ok ? p.rq[i] : 0.0f;
        rk[tid] = ok ? p.rk[i] : 0.0f;
        qdot[tid] = kdot[tid] = bdot[tid] = rowl[tid] = rowb[tid] = 0.0f;
    }
    if (tid == 0) red[0] = 0.0f;
    fla_cp_wait_one();
    __syncthreads();

    // dY = T^T dU (this warp's rows, its group of the columns); dv = beta dY; sum_v v dY.
    {
        const int n0 = cg * (VD / CG);
        float ay[NV][4];
        tc_zero(ay);
        tc_tri_times<E, NV>(ay, ts, true, dus, LW, rw, n0, l);
        const u16* vg = static_cast<const u16*>(p.v) + hrow * VD;
        u16* dvg = static_cast<u16*>(bp.dv) + hrow * VD;
#pragma unroll
        for (int h2 = 0; h2 < 2; ++h2) {
            const int i = m0 + gq + 8 * h2;
            float d = 0.0f;
#pragma unroll
            for (int nt = 0; nt < NV; ++nt) {
                const int x = n0 + nt * 8 + 2 * tq;
                const float y0 = ay[nt][2 * h2], y1 = ay[nt][2 * h2 + 1];
                *reinterpret_cast<unsigned*>(dys + i * LW + x) = fla_pack2<E>(y0, y1);
                if (i < l) {
                    const unsigned vv = *reinterpret_cast<const unsigned*>(vg + i * vld + x);
                    d += fla_to_f32<E>(vv & 0xffff) * y0 + fla_to_f32<E>(vv >> 16) * y1;
                    *reinterpret_cast<unsigned*>(dvg + i * vld + x) = fla_pack2<E>(bs[i] * y0, bs[i] * y1);
                }
            }
            d = tc_row_sum(d);
            if (tq == 0) atomicAdd(rowb + i, d);
        }
    }
    fla_cp_wait_all();
    __syncthreads();
    // q^ = q rq, k^ = k rk in place; sum dS . S0 (for dG_L).
    {
        for (int e = tid; e < FLA_C * KD / 2; e += NT) {
            const int i = e / (KD / 2), c = (e % (KD / 2)) * 2;
            unsigned* qp = reinterpret_cast<unsigned*>(qh + i * LK + c);
            unsigned* kp = reinterpret_cast<unsigned*>(kh + i * LK + c);
            *qp = fla_pack2<E>(fla_to_f32<E>(qh[i * LK + c]) * rq[i], fla_to_f32<E>(qh[i * LK + c + 1]) * rq[i]);
            *kp = fla_pack2<E>(fla_to_f32<E>(kh[i * LK + c]) * rk[i], fla_to_f32<E>(kh[i * LK + c + 1]) * rk[i]);
        }
        float d = 0.0f;
        for (int e = tid; e < KD * VD / 2; e += NT) {
            const int c = e / (VD / 2), x = (e % (VD / 2)) * 2;
            d += fla_to_f32<E>(dss[c * LW + x]) * fla_to_f32<E>(s0s[c * LW + x]) +
                 fla_to_f32<E>(dss[c * LW + x + 1]) * fla_to_f32<E>(s0s[c * LW + x + 1]);
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) d += __shfl_xor_sync(0xffffffffu, d, off);
        if (lane == 0) atomicAdd(red, d);
    }
    // dN = scale dO U^T . E (lower, with the diagonal), dM = -dY U^T . E (strictly lower): this
    // warp's rows, the NC column tiles of its group (the 16-column blocks on or below the
    // diagonal).
    {
        float ap[NC][4], aa[NC][4];
        tc_zero(ap);
        tc_zero(aa);
        const int j0 = cg * NC * 8;
        if (j0 / 16 <= rw) {
#pragma unroll
            for (int kk = 0; kk < VD; kk += 16) {
                unsigned fo[4], fy[4];
                fla_frag_a(fo, dos, LW, m0, kk);
                fla_frag_a(fy, dys, LW, m0, kk);
#pragma unroll
                for (int np = 0; np < NC / 2; ++np) {
                    if (j0 / 16 + np <= rw) {
                        unsigned b[4];
                        fla_frag_b_nk(b, us, LW, kk, j0 + np * 16);
                        fla_mma<E>(ap[2 * np], fo, b[0], b[1]);
                        fla_mma<E>(ap[2 * np + 1], fo, b[2], b[3]);
                        fla_mma<E>(aa[2 * np], fy, b[0], b[1]);
                        fla_mma<E>(aa[2 * np + 1], fy, b[2], b[3]);
                    }
                }
            }
        }
#pragma unroll
        for (int nt = 0; nt < NC; ++nt)
#pragma unroll
            for (int h2 = 0; h2 < 2; ++h2) {
                const int i = m0 + gq + 8 * h2, j = j0 + nt * 8 + 2 * tq;
                float dn[2], dm[2];
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float x = j + e <= i && i < l ? __expf(gs[i] - gs[j + e]) : 0.0f;
                    dn[e] = p.scale * ap[nt][2 * h2 + e] * x;
                    dm[e] = j + e < i ? -aa[nt][2 * h2 + e] * x : 0.0f;
                }
                *reinterpret_cast<unsigned*>(dns + i * TC_LDC + j) = fla_pack2<E>(dn[0], dn[1]);
                *reinterpret_cast<unsigned*>(dms + i * TC_LDC + j) = fla_pack2<E>(dm[0], dm[1]);
                *reinterpret_cast<unsigned*>(dmb + i * TC_LDC + j) = fla_pack2<E>(bs[i] * dm[0], bs[i] * dm[1]);
            }
    }
    __syncthreads();

    // Ungrouped heads: dq, dk final here (through the L2 norm's backward); else per value head in
    // f32 for chunk_bwd_post to sum.
    const bool final = bp.qk_done;
    const bool l2 = p.l2norm;
    const long long kld = (long long)p.hv * KD, qld = (long long)p.h * KD;
    const int n0 = cg * (KD / CG);
    const float gl = gs[l - 1];
    // dq = scale e^G (dO S0^T) + dN K^.
    float aq[NK][4];
    tc_zero(aq);
    tc_abt<E, NK, VD>(aq, dos, LW, s0s, LW, m0, n0);
    tc_scale_rows(aq, m0, [&](int i) { return i < l ? p.scale * __expf(gs[i]) : 0.0f; });
    tc_tri_times<E, NK>(aq, dns, false, kh, LK, rw, n0, l);
    tc_row_dots<E>(aq, qh, LK, m0, n0, qdot);
    // dk = e^(G_L - G) (U dS^T) + dN^T Q^ + (beta dM)^T K^ + beta dbk, dbk = -e^G (dY S0^T) + dM K^.
    float ak[NK][4], ab[NK][4];
    tc_zero(ak);
    tc_abt<E, NK, VD>(ak, us, LW, dss, LW, m0, n0);
    tc_scale_rows(ak, m0, [&](int i) { return i < l ? __expf(gl - gs[i]) : 0.0f; });
    tc_row_dots<E>(ak, kh, LK, m0, n0, rowl);
    tc_tri_times<E, NK>(ak, dns, true, qh, LK, rw, n0, l);
    tc_tri_times<E, NK>(ak, dmb, true, kh, LK, rw, n0, l);
    tc_zero(ab);
    tc_abt<E, NK, VD>(ab, dys, LW, s0s, LW, m0, n0);
    tc_scale_rows(ab, m0, [&](int i) { return i < l ? -__expf(gs[i]) : 0.0f; });
    tc_tri_times<E, NK>(ab, dms, false, kh, LK, rw, n0, l);
    tc_row_dots<E>(ab, kh, LK, m0, n0, bdot);
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
        const float b = bs[m0 + gq + 8 * h2];
#pragma unroll
        for (int nt = 0; nt < NK; ++nt) {
            ak[nt][2 * h2] += b * ab[nt][2 * h2];
            ak[nt][2 * h2 + 1] += b * ab[nt][2 * h2 + 1];
        }
    }
    tc_row_dots<E>(ak, kh, LK, m0, n0, kdot);
    __syncthreads(); // the row dots are complete before the L2 norm's backward and the gate read them
    tc_store_grad<E>(aq, m0, n0, l, final, l2, qh, LK, rq, qdot, static_cast<u16*>(bp.dq) + (bos * p.h + hk) * KD, qld,
                     bp.dqa + hrow * KD, kld);
    tc_store_grad<E>(ak, m0, n0, l, final, l2, kh, LK, rk, kdot, static_cast<u16*>(bp.dk) + (bos * p.h + hk) * KD, qld,
                     bp.dka + hrow * KD, kld);
    __syncthreads();
    // dbeta (before the sigmoid) = sum_v v dY + k^ . dbk.
    if (tid < l) bp.dbh[hrow + (long long)tid * p.hv] = rowb[tid] + bdot[tid];
    // dG_i = q^.dq - k^.dk' + beta k^.dbk with dk' = dk - beta dbk, so
    // dG_i = q^.dq - k^.dk + 2 beta k^.dbk; then dg_t = sum_{i >= t} dG_i + dG_L.
    if (warp == 0) {
        float acc = (lane < l ? rowl[lane] : 0.0f) + (lane + 32 < l ? rowl[lane + 32] : 0.0f);
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
        acc += __expf(gl) * red[0];
        auto dg_row = [&](int i) { return i < l ? qdot[i] - kdot[i] + 2.0f * bs[i] * bdot[i] : 0.0f; };
        // Suffix sums by an inclusive scan over the reversed rows: lane j holds rows 63 - j and 31 - j.
        float x0 = dg_row(63 - lane), x1 = dg_row(31 - lane);
        fla_warp_scan64(x0, x1);
        if (63 - lane < l) bp.dgh[hrow + (long long)(63 - lane) * p.hv] = acc + x0;
        if (31 - lane < l) bp.dgh[hrow + (long long)(31 - lane) * p.hv] = acc + x1;
    }
}

#define TC_BWD_DH(E, NAME, KD, BV, BVW, CH, ST)                                                  \
    extern "C" __global__ void __launch_bounds__(TC_NT * CH) chunk_bwd_tc_dh_##NAME##_k##KD##_v##BV(const ChunkBwdParams bp) { \
        tc_bwd_dh<E, KD, BVW, CH, ST>(bp);                                                         \
    }
#define TC_BWD_DH_ALL(E, NAME, KD) \
    TC_BWD_DH(E, NAME, KD, 16, 16, 1, 2) TC_BWD_DH(E, NAME, KD, 32, 16, 2, 1) TC_BWD_DH(E, NAME, KD, 64, 32, 2, 1)
// 16 warps (four column groups) for K = 128, 8 for K = 64; keep in sync with `tc_dqk_threads`
// in fla-ops/src/cuda.rs.
#define TC_BWD_DQK(E, NAME, KD, VD)                                                              \
    extern "C" __global__ void __launch_bounds__(TC_NT * (KD / 32)) chunk_bwd_tc_dqk_##NAME##_k##KD##_v##VD(const ChunkBwdParams bp) { \
        tc_bwd_dqk<E, KD, VD, KD / 32>(bp);                                                        \
    }
#define TC_BWD_ALL(E, NAME) \
    TC_BWD_DH_ALL(E, NAME, 64) TC_BWD_DH_ALL(E, NAME, 128) \
    TC_BWD_DQK(E, NAME, 64, 64) TC_BWD_DQK(E, NAME, 64, 128) TC_BWD_DQK(E, NAME, 128, 64) TC_BWD_DQK(E, NAME, 128, 128)

TC_BWD_ALL(FlaBf16, bf16)
TC_BWD_ALL(FlaF16, f16)
