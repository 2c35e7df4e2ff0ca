// Chunk backward of Gated DeltaNet, DeltaNet and KDA on tensor cores (mma.sync m16n8k16, f32
// accumulation) for bf16 / f16 inputs, K and V of 64 or 128 (KDA's per-channel forms: the
// CHANNEL template argument of both kernels, named chunk_kda_bwd_tc_*; see there). The equations are those of
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
// CHANNEL: KDA's per-key-channel decay, as the forward sweep's CHANNEL form: the stage holds the
// intra kernel's Kt = k^ e^(G_L - G) and Qg = q^ e^G tiles and G_L per channel, so
//   dU = Kt dS + P^T dO;   dS <- diag(e^(G_L)) dS + Qg^T (scale dO) - W^T dU.
template <class E, int KD, int BVW, int CH, int ST, bool CHANNEL = false>
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
    auto load = [&](int ci, int st) { tc_load_stage<NT, KD, BV, CHANNEL>(p, bp.d_o, stage(st), ci, hv, hk, v0); };
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
        const float gl = CHANNEL ? 0.0f : gs[l - 1];
#pragma unroll
        for (int h2 = 0; h2 < 2; ++h2) {
            const int i = m0 + gq + 8 * h2;
            const float f = i >= l ? 0.0f : CHANNEL ? 1.0f : rk[i] * __expf(gl - gs[i]);
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
                const float f = i >= l ? 0.0f : CHANNEL ? p.scale : p.scale * rq[i] * __expf(gs[i]);
                *reinterpret_cast<unsigned*>(dos + i * LV + x) =
                    fla_pack2<E>(f * fla_to_f32<E>(os[i * LV + x]), f * fla_to_f32<E>(os[i * LV + x + 1]));
            }
        __syncthreads();

        // dS <- e^(G_L) dS + Q^T dO' - W^T dU (KDA: diag(e^(G_L)) dS + Qg^T dO' - W^T dU).
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

// Calls f(nt, r, i, c) for each element acc[nt][r] of a warp's accumulator block (16 rows from
// m0, NTN n-tiles from column n0) that this thread holds: row i, column c.
template <int NTN, class F>
__device__ __forceinline__ void tc_each(int m0, int n0, F f) {
    const int lane = threadIdx.x & 31, gq = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int nt = 0; nt < NTN; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) f(nt, r, m0 + gq + 8 * (r >> 1), n0 + nt * 8 + 2 * tq + (r & 1));
}

// Adds, for each column c of a warp's accumulator block (16 rows from m0, columns from n0),
// sum_i acc[i][c] tile[i][c] over the block's rows to out[c] in shared memory (the other row
// blocks add their parts too).
template <class E, int NTN>
__device__ __forceinline__ void tc_col_dots(const float (&acc)[NTN][4], const u16* tile, int ld, int m0, int n0,
                                            float* out) {
    const int lane = threadIdx.x & 31, gq = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int nt = 0; nt < NTN; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int c = n0 + nt * 8 + 2 * tq + e;
            float d = acc[nt][e] * fla_to_f32<E>(tile[(m0 + gq) * ld + c]) +
                      acc[nt][2 + e] * fla_to_f32<E>(tile[(m0 + gq + 8) * ld + c]);
#pragma unroll
            for (int off = 4; off < 32; off <<= 1) d += __shfl_xor_sync(0xffffffffu, d, off);
            if (gq == 0) atomicAdd(out + c, d);
        }
}

// B fragments of two n-tiles (n0, n0 + 8) for the k rows k0..k0+16, in the layout fla_frag_b_nk
// gives (b[s][0], b[s][1] for n0; b[s][2], b[s][3] for n0 + 8), of NB matrices computed in
// registers: f(k, n, x) sets x[s] = B_s[k][n].
template <class E, int NB, class F>
__device__ __forceinline__ void tc_make_b(unsigned (&b)[NB][4], int k0, int n0, F f) {
    const int lane = threadIdx.x & 31, gq = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int k = k0 + 2 * tq + 8 * h, n = n0 + 8 * t + gq;
            float x0[NB], x1[NB];
            f(k, n, x0);
            f(k + 1, n, x1);
#pragma unroll
            for (int s = 0; s < NB; ++s) b[s][2 * t + h] = fla_pack2<E>(x0[s], x1[s]);
        }
}

// Row stride of the [..][V] tiles of chunk_bwd_tc_dqk.
#define TC_LW(VD) ((VD) + 8)
// Row stride of KDA's G tile (f32 [C][K + 4]: the B operands built from it read 32 banks).
#define TC_LG(KD) ((KD) + 4)
// chunk_bwd_tc_dqk runs CG groups of 4 warps (CG = 2 or 4): warp w on token rows 16 (w % 4)..
// and the column group w / 4 of every output.
// Dynamic shared memory of chunk_bwd_tc_dqk; keep in sync with `tc_dqk_smem` in
// fla-ops/src/cuda.rs: Q^, K^ [C][KD+8]; dO, U, dU, dY [C][VD+8]; S0, dS [KD][VD+8]; T, dN, dM,
// beta dM [C][C+8] (16-bit); nine [C] vectors and one sum (f32).
#define TC_DQK_SMEM(KD, VD) \
    ((2 * FLA_C * ((KD) + 8) + 4 * FLA_C * TC_LW(VD) + 2 * (KD) * TC_LW(VD) + 4 * FLA_C * TC_LDC) * 2 + (9 * FLA_C + 4) * 4)
// KDA's (chunk_kda_bwd_tc_dqk); keep in sync with `kda_dqk_smem`: Q^, K^ [C][KD+8]; dO, U, dU
// (then dY) [C][VD+8]; S0, dS [KD][VD+8]; T, dP, dA [C][C+8] (16-bit); G (then dG) [C][KD+4],
// seven [C] vectors and dG_L [KD] (f32). 215 KB at K = V = 128.
#define KDA_DQK_SMEM(KD, VD)                                                                          \
    ((2 * FLA_C * ((KD) + 8) + 3 * FLA_C * TC_LW(VD) + 2 * (KD) * TC_LW(VD) + 3 * FLA_C * TC_LDC) * 2 + \
     (FLA_C * TC_LG(KD) + 7 * FLA_C + (KD)) * 4)

// CHANNEL (KDA): the decay exp(G_ic - G_jc) per key channel cannot scale the [C][C] products, so
// dP = scale dO U^T and dA = -dY U^T stay undecayed and the decay goes with the key channels:
//   dq_i  = scale e^(G_i) (dO S0^T)_i + sum_{j <= i} dP_ij k^_j e^(G_i - G_j)
//   dbk_i = -e^(G_i) (dY S0^T)_i + sum_{j < i} dA_ij k^_j e^(G_i - G_j)
//   dk_j  = e^(G_L - G_j) (U dS^T)_j + sum_{m >= j} (dP_mj q^_m + dA_mj beta_m k^_m) e^(G_m - G_j)
//           + beta_j dbk_j
// (products per channel). Below the diagonal 16-row blocks the pair decay splits at a row r
// between the two blocks, both factors <= 1 (exact under any decay, as chunk_kda_tc_intra):
// r = the first row of the output block for dq / dbk (right factor k^_j e^(G_r - G_j)), its last
// row for dk (right factors q^_m e^(G_m - G_r), beta_m k^_m e^(G_m - G_r)); the right factors are
// built in registers as mma B fragments and the output scaled by e^(G_i - G_r) or e^(G_r - G_j).
// The diagonal blocks sum per pair in f32 on the accumulator fragments. The gate by the same
// identity as the head decay, per channel: dG_ic = q^_ic dq_ic - k^_ic dk_ic + 2 beta_i k^_ic dbk_ic,
// dG_L,c = e^(G_L,c) sum_v dS_cv S0_cv + sum_i k^_ic e^(G_L,c - G_ic) (U dS^T)_ic, then
// dg_tc = sum_{i >= t} dG_ic + dG_L,c.
template <class E, int KD, int VD, int CG, bool CHANNEL = false>
__device__ __forceinline__ void tc_bwd_dqk(const ChunkBwdParams& bp) {
    const ChunkParams& p = bp.f;
    constexpr int NT = TC_NT * CG;
    constexpr int LK = KD + 8, LW = TC_LW(VD), NK = KD / (8 * CG), NV = VD / (8 * CG); // n-tiles per group
    constexpr int NC = 8 / CG;                                                          // of the [C][C] tiles
    constexpr int LG = TC_LG(KD);
    extern __shared__ __align__(16) unsigned char smem[];
    u16* qh = reinterpret_cast<u16*>(smem); // [C][LK] q^
    u16* kh = qh + FLA_C * LK;              // [C][LK] k^
    u16* dos = kh + FLA_C * LK;             // [C][LW] dO
    u16* us = dos + FLA_C * LW;             // [C][LW] U (new values)
    u16* dus = us + FLA_C * LW;             // [C][LW] dU
    u16* dys = CHANNEL ? dus : dus + FLA_C * LW; // [C][LW] dY (KDA: where dU was)
    u16* s0s = dys + FLA_C * LW;            // [KD][LW] S0
    u16* dss = s0s + KD * LW;               // [KD][LW] dS
    u16* ts = dss + KD * LW;                // [C][LDC] T
    u16* dns = ts + FLA_C * TC_LDC;         // [C][LDC] dN (KDA: dP)
    u16* dms = dns + FLA_C * TC_LDC;        // [C][LDC] dM (KDA: dA)
    u16* dmb = dms + FLA_C * TC_LDC;        // [C][LDC] beta dM (not KDA)
    float* gs = reinterpret_cast<float*>(CHANNEL ? dmb : dmb + FLA_C * TC_LDC); // [C] G (KDA: [C][LG])
    float* bs = gs + (CHANNEL ? FLA_C * LG : FLA_C); // [C] beta
    float* rq = bs + FLA_C;                 // [C] 1/|q|
    float* rk = rq + FLA_C;                 // [C] 1/|k|
    float* qdot = rk + FLA_C;               // [C] q^ . dq^
    float* kdot = qdot + FLA_C;             // [C] k^ . dk^ (the final dk^)
    float* bdot = kdot + FLA_C;             // [C] k^ . dbk
    float* rowl = bdot + FLA_C;             // [C] row terms of dG_L (not KDA: there rowb's place)
    float* rowb = CHANNEL ? rowl : rowl + FLA_C; // [C] sum_v v dY
    float* red = rowb + FLA_C;              // [1] sum dS . S0 (KDA: [KD] dG_L)
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
    // KDA's G [C][KD] f32, copied as 16-bit pairs (rows from l on: 0).
    if (CHANNEL)
        fla_load_tile<NT, FLA_C, 2 * KD>(reinterpret_cast<u16*>(gs), 2 * LG,
                                         reinterpret_cast<const u16*>(p.gc + hrow * KD), 2LL * p.hv * KD, l);
    fla_cp_commit();
    if (tid < FLA_C) {
        const bool ok = tid < l;
        const long long i = hrow + (long long)tid * p.hv;
        float g, b = 0.0f;
        if (CHANNEL) {
            if (ok) b = chunk_beta(p, i);
        } else {
            if (ok) chunk_gate_beta(p, i, hv, g, b);
            gs[tid] = ok ? p.gc[i] : 0.0f;
        }
        bs[tid] = b;
        rq[tid] = ok ? p.rq[i] : 0.0f;
        rk[tid] = ok ? p.rk[i] : 0.0f;
        qdot[tid] = kdot[tid] = bdot[tid] = rowl[tid] = rowb[tid] = 0.0f;
    }
    if (!CHANNEL && tid == 0) red[0] = 0.0f;
    fla_cp_wait_one();
    __syncthreads();

    // dY = T^T dU (this warp's rows, its group of the columns); dv = beta dY; sum_v v dY.
    {
        const int n0 = cg * (VD / CG);
        float ay[NV][4];
        tc_zero(ay);
        tc_tri_times<E, NV>(ay, ts, true, dus, LW, rw, n0, l);
        if (CHANNEL) {
            fla_cp_wait_all();
            __syncthreads(); // dY replaces dU: every warp has read it
        }
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
    if (!CHANNEL) fla_cp_wait_all();
    __syncthreads();
    // q^ = q rq, k^ = k rk in place; sum dS . S0 (for dG_L; KDA: per key channel, with e^(G_L)).
    {
        for (int e = tid; e < FLA_C * KD / 2; e += NT) {
            const int i = e / (KD / 2), c = (e % (KD / 2)) * 2;
            unsigned* qp = reinterpret_cast<unsigned*>(qh + i * LK + c);
            unsigned* kp = reinterpret_cast<unsigned*>(kh + i * LK + c);
            *qp = fla_pack2<E>(fla_to_f32<E>(qh[i * LK + c]) * rq[i], fla_to_f32<E>(qh[i * LK + c + 1]) * rq[i]);
            *kp = fla_pack2<E>(fla_to_f32<E>(kh[i * LK + c]) * rk[i], fla_to_f32<E>(kh[i * LK + c + 1]) * rk[i]);
        }
        if (CHANNEL) {
            // A warp per channel row.
            for (int c = warp; c < KD; c += NT / 32) {
                float d = 0.0f;
                for (int x = 2 * lane; x < VD; x += 64)
                    d += fla_to_f32<E>(dss[c * LW + x]) * fla_to_f32<E>(s0s[c * LW + x]) +
                         fla_to_f32<E>(dss[c * LW + x + 1]) * fla_to_f32<E>(s0s[c * LW + x + 1]);
#pragma unroll
                for (int off = 16; off > 0; off >>= 1) d += __shfl_xor_sync(0xffffffffu, d, off);
                if (lane == 0) red[c] = __expf(gs[(l - 1) * LG + c]) * d;
            }
        } else {
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
    }
    // dN = scale dO U^T . E (lower, with the diagonal), dM = -dY U^T . E (strictly lower): this
    // warp's rows, the NC column tiles of its group (the 16-column blocks on or below the
    // diagonal). KDA: dP, dA without the decay (E = 1), no beta dM.
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
                    const float x = j + e <= i && i < l ? (CHANNEL ? 1.0f : __expf(gs[i] - gs[j + e])) : 0.0f;
                    dn[e] = p.scale * ap[nt][2 * h2 + e] * x;
                    dm[e] = j + e < i ? -aa[nt][2 * h2 + e] * x : 0.0f;
                }
                *reinterpret_cast<unsigned*>(dns + i * TC_LDC + j) = fla_pack2<E>(dn[0], dn[1]);
                *reinterpret_cast<unsigned*>(dms + i * TC_LDC + j) = fla_pack2<E>(dm[0], dm[1]);
                if (!CHANNEL)
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
    const float gl = CHANNEL ? 0.0f : gs[l - 1];
    float aq[NK][4], ak[NK][4], ab[NK][4];
    if constexpr (CHANNEL) {
        auto G = [&](int i, int c) { return gs[i * LG + c]; };
        // The products with the states first: dq = scale e^G (dO S0^T), dbk = -e^G (dY S0^T),
        // dk = e^(G_L - G) (U dS^T), whose k^ . dk goes to dG_L.
        tc_zero(aq);
        tc_zero(ab);
        tc_zero(ak);
        tc_abt<E, NK, VD>(aq, dos, LW, s0s, LW, m0, n0);
        tc_abt<E, NK, VD>(ab, dys, LW, s0s, LW, m0, n0);
        tc_abt<E, NK, VD>(ak, us, LW, dss, LW, m0, n0);
        tc_each<NK>(m0, n0, [&](int nt, int r, int i, int c) {
            const bool ok = i < l;
            const float eg = ok ? __expf(G(i, c)) : 0.0f;
            aq[nt][r] *= p.scale * eg;
            ab[nt][r] *= -eg;
            ak[nt][r] *= ok ? __expf(G(l - 1, c) - G(i, c)) : 0.0f;
        });
        tc_col_dots<E>(ak, kh, LK, m0, n0, red);
        // dq, dbk below the diagonal block: split at r = m0, Ks_j = k^_j e^(G_r - G_j) (j < r).
        if (rw > 0 && m0 < l) {
            float tq_[NK][4], tb_[NK][4];
            tc_zero(tq_);
            tc_zero(tb_);
            for (int kt = 0; kt < rw; ++kt) {
                unsigned fp[4], fa[4];
                fla_frag_a(fp, dns, TC_LDC, m0, kt * 16);
                fla_frag_a(fa, dms, TC_LDC, m0, kt * 16);
#pragma unroll
                for (int np = 0; np < NK / 2; ++np) {
                    unsigned b[1][4];
                    tc_make_b<E, 1>(b, kt * 16, n0 + np * 16, [&](int j, int c, float(&x)[1]) {
                        x[0] = fla_to_f32<E>(kh[j * LK + c]) * __expf(G(m0, c) - G(j, c));
                    });
                    fla_mma<E>(tq_[2 * np], fp, b[0][0], b[0][1]);
                    fla_mma<E>(tq_[2 * np + 1], fp, b[0][2], b[0][3]);
                    fla_mma<E>(tb_[2 * np], fa, b[0][0], b[0][1]);
                    fla_mma<E>(tb_[2 * np + 1], fa, b[0][2], b[0][3]);
                }
            }
            tc_each<NK>(m0, n0, [&](int nt, int r, int i, int c) {
                const float f = i < l ? __expf(G(i, c) - G(m0, c)) : 0.0f;
                aq[nt][r] += f * tq_[nt][r];
                ab[nt][r] += f * tb_[nt][r];
            });
        }
        // dk below the diagonal block: split at r = m0 + 15, Qs_m = q^_m e^(G_m - G_r) and
        // Bs_m = beta_m k^_m e^(G_m - G_r) (m > r), with dP^T and dA^T.
        if (m0 + 16 < l) {
            const int r = m0 + 15;
            float tk_[NK][4];
            tc_zero(tk_);
            for (int kt = rw + 1; kt < FLA_C / 16 && kt * 16 < l; ++kt) {
                unsigned fp[4], fa[4];
                fla_frag_a_t(fp, dns, TC_LDC, m0, kt * 16);
                fla_frag_a_t(fa, dms, TC_LDC, m0, kt * 16);
#pragma unroll
                for (int np = 0; np < NK / 2; ++np) {
                    unsigned b[2][4];
                    tc_make_b<E, 2>(b, kt * 16, n0 + np * 16, [&](int m, int c, float(&x)[2]) {
                        const float e = m < l ? __expf(G(m, c) - G(r, c)) : 0.0f;
                        x[0] = fla_to_f32<E>(qh[m * LK + c]) * e;
                        x[1] = bs[m] * fla_to_f32<E>(kh[m * LK + c]) * e;
                    });
                    fla_mma<E>(tk_[2 * np], fp, b[0][0], b[0][1]);
                    fla_mma<E>(tk_[2 * np + 1], fp, b[0][2], b[0][3]);
                    fla_mma<E>(tk_[2 * np], fa, b[1][0], b[1][1]);
                    fla_mma<E>(tk_[2 * np + 1], fa, b[1][2], b[1][3]);
                }
            }
            tc_each<NK>(m0, n0, [&](int nt, int r2, int i, int c) {
                ak[nt][r2] += (i < l ? __expf(G(r, c) - G(i, c)) : 0.0f) * tk_[nt][r2];
            });
        }
        // The diagonal block per pair in f32: row i takes the pairs (i, j <= i) for dq, dbk and
        // (m >= i, i) for dk (dA is zero on the diagonal and above).
        for (int s = 0; s < 16 && m0 + s < l; ++s) {
            const int j = m0 + s;
            const float bj = bs[j];
#pragma unroll
            for (int h2 = 0; h2 < 2; ++h2) {
                const int i = m0 + gq + 8 * h2;
                if (i >= l) continue;
                if (j <= i) {
                    const float dp = fla_to_f32<E>(dns[i * TC_LDC + j]), da = fla_to_f32<E>(dms[i * TC_LDC + j]);
#pragma unroll
                    for (int nt = 0; nt < NK; ++nt)
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const int c = n0 + nt * 8 + 2 * tq + e;
                            const float x = fla_to_f32<E>(kh[j * LK + c]) * __expf(G(i, c) - G(j, c));
                            aq[nt][2 * h2 + e] += dp * x;
                            ab[nt][2 * h2 + e] += da * x;
                        }
                }
                if (j >= i) {
                    const float dp = fla_to_f32<E>(dns[j * TC_LDC + i]), da = fla_to_f32<E>(dms[j * TC_LDC + i]);
#pragma unroll
                    for (int nt = 0; nt < NK; ++nt)
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const int c = n0 + nt * 8 + 2 * tq + e;
                            const float x = __expf(G(j, c) - G(i, c));
                            ak[nt][2 * h2 + e] +=
                                (dp * fla_to_f32<E>(qh[j * LK + c]) + da * bj * fla_to_f32<E>(kh[j * LK + c])) * x;
                        }
                }
            }
        }
        tc_row_dots<E>(aq, qh, LK, m0, n0, qdot);
        tc_row_dots<E>(ab, kh, LK, m0, n0, bdot);
    } else {
        // dq = scale e^G (dO S0^T) + dN K^.
        tc_zero(aq);
        tc_abt<E, NK, VD>(aq, dos, LW, s0s, LW, m0, n0);
        tc_scale_rows(aq, m0, [&](int i) { return i < l ? p.scale * __expf(gs[i]) : 0.0f; });
        tc_tri_times<E, NK>(aq, dns, false, kh, LK, rw, n0, l);
        tc_row_dots<E>(aq, qh, LK, m0, n0, qdot);
        // dk = e^(G_L - G) (U dS^T) + dN^T Q^ + (beta dM)^T K^ + beta dbk, dbk = -e^G (dY S0^T) + dM K^.
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
    }
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
    // KDA: dG_ic = q^ dq - k^ dk + 2 beta k^ dbk over G (read by every warp until the barrier).
    if (CHANNEL)
        tc_each<NK>(m0, n0, [&](int nt, int r, int i, int c) {
            const float k = fla_to_f32<E>(kh[i * LK + c]);
            gs[i * LG + c] = fla_to_f32<E>(qh[i * LK + c]) * aq[nt][r] - k * ak[nt][r] + 2.0f * bs[i] * k * ab[nt][r];
        });
    tc_store_grad<E>(aq, m0, n0, l, final, l2, qh, LK, rq, qdot, static_cast<u16*>(bp.dq) + (bos * p.h + hk) * KD, qld,
                     bp.dqa + hrow * KD, kld);
    tc_store_grad<E>(ak, m0, n0, l, final, l2, kh, LK, rk, kdot, static_cast<u16*>(bp.dk) + (bos * p.h + hk) * KD, qld,
                     bp.dka + hrow * KD, kld);
    __syncthreads();
    // dbeta (before the sigmoid) = sum_v v dY + k^ . dbk.
    if (tid < l) bp.dbh[hrow + (long long)tid * p.hv] = rowb[tid] + bdot[tid];
    if (CHANNEL) {
        // dg_tc = sum_{i >= t} dG_ic + dG_L,c: a thread per channel.
        if (tid < KD) {
            float acc = red[tid];
            for (int i = l - 1; i >= 0; --i) {
                acc += gs[i * LG + tid];
                bp.dgh[(hrow + (long long)i * p.hv) * KD + tid] = acc;
            }
        }
        return;
    }
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

// KDA: the same tilings, per-channel decay.
#define KDA_BWD_DH(E, NAME, KD, BV, BVW, CH, ST)                                                 \
    extern "C" __global__ void __launch_bounds__(TC_NT * CH) chunk_kda_bwd_tc_dh_##NAME##_k##KD##_v##BV(const ChunkBwdParams bp) { \
        tc_bwd_dh<E, KD, BVW, CH, ST, true>(bp);                                                   \
    }
#define KDA_BWD_DH_ALL(E, NAME, KD) \
    KDA_BWD_DH(E, NAME, KD, 16, 16, 1, 2) KDA_BWD_DH(E, NAME, KD, 32, 16, 2, 1) KDA_BWD_DH(E, NAME, KD, 64, 32, 2, 1)
#define KDA_BWD_DQK(E, NAME, KD, VD)                                                             \
    extern "C" __global__ void __launch_bounds__(TC_NT * (KD / 32)) chunk_kda_bwd_tc_dqk_##NAME##_k##KD##_v##VD(const ChunkBwdParams bp) { \
        tc_bwd_dqk<E, KD, VD, KD / 32, true>(bp);                                                  \
    }
#define KDA_BWD_ALL(E, NAME) \
    KDA_BWD_DH_ALL(E, NAME, 64) KDA_BWD_DH_ALL(E, NAME, 128) \
    KDA_BWD_DQK(E, NAME, 64, 64) KDA_BWD_DQK(E, NAME, 64, 128) KDA_BWD_DQK(E, NAME, 128, 64) KDA_BWD_DQK(E, NAME, 128, 128)

TC_BWD_ALL(FlaBf16, bf16)
TC_BWD_ALL(FlaF16, f16)
KDA_BWD_ALL(FlaBf16, bf16)
KDA_BWD_ALL(FlaF16, f16)
