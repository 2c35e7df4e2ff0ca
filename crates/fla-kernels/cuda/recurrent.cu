// The fused recurrent step (decode) of the whole linear-attention family, one kernel for every
// (decay, erase, write) point. See fla-ops/src/naive.rs for the recurrence:
//
//   S <- S * exp(g_t)                  (per head, or row c scaled by exp(g_t[c]))
//   e  = S^T (b_t . k_t)               (erase; b = beta, a per-channel gate, or 0)
//   S <- S + k_t (w_t . v_t - e)^T     (write; w = beta, a per-channel gate, or 1)
//   o_t = S^T (scale . q_t)
//
// One CTA per (sequence, value head, block of BV value columns). Thread
// (ks, col) owns VW adjacent columns of rows c = r*KS + ks of the f32 state tile, in registers,
// for every token of the sequence: the state is read from memory once and written once per
// call, which is what bounds the decode step (it is memory-bound). Reductions over K (e and o)
// go through warp shuffles and a 4-warp shared-memory step.
#include "common/dtype.cuh"
#include "common/math.cuh"

// Keep in sync with `RecurrentParams` in fla-ops/src/cuda.rs (repr(C)).
struct RecurrentParams {
    const void* q;        // [tokens, H, K]
    const void* k;        // [tokens, H, K]
    const void* v;        // [tokens, HV, V]
    const void* g;        // [tokens, HV] or [tokens, HV, K] (raw gate input with use_gate), or null
    const void* beta;     // [tokens, HV] or null
    const void* b;        // [tokens, HV, K] erase gate (GDN-2) or null
    const void* w;        // [tokens, HV, V] write gate (GDN-2) or null
    const void* a_log;    // [HV] (use_gate) or null
    const void* dt_bias;  // [HV] or [HV*K] (use_gate) or null
    void* o;              // [tokens, HV, V], dtype of q
    float* state;         // [pool, HV, K, V]
    const int* cu_seqlens;     // [N+1] token offsets, or null: sequence n is [n*T, (n+1)*T)
    const int* state_indices;  // [N] pool rows, or null: row n
    int dtype, a_log_dtype, dt_bias_dtype;
    int n, t, h, hv, dk, dv;
    int decay;  // 0 none, 1 per head, 2 per key channel
    int erase;  // 0 none, 1 beta, 2 per key channel (b)
    int write;  // 0 one, 1 beta, 2 per value channel (w)
    int l2norm, beta_sigmoid, use_gate, dt_per_channel;
    float scale;
};

// Where one CTA tile (sequence n, value head hv, column block vb) lives.
struct Tile {
    int n, hv, vb;
    long long bos, len;  // token range of the sequence
    float* S;            // its [K, V] state in the pool
};

// KMAX: largest K served; VW: adjacent columns per thread (4: 16-byte accesses); BV: value
// columns per CTA; NT: threads per CTA.
template <int KMAX, int VW, int BV, int NT>
struct Step {
    static constexpr int NWARPS = NT / 32;
    static constexpr int CT = BV / VW;   // column threads
    static constexpr int KS = NT / CT;   // row groups
    static constexpr int R = KMAX / KS;  // rows per thread
    static_assert(KMAX % KS == 0, "rows split evenly");
    static_assert(CT <= 32 && 32 % CT == 0, "a warp holds whole column groups");

    struct Smem {
        float sq[KMAX], sk[KMAX], sdec[KMAX], sb[KMAX];
        float red_e[NWARPS][BV], red_o[NWARPS][BV], red_n[NWARPS][2];
    };

    static __device__ __forceinline__ int num_tiles(const RecurrentParams& p) {
        return p.n * p.hv * ((p.dv + BV - 1) / BV);
    }

    static __device__ __forceinline__ Tile tile(const RecurrentParams& p, int idx) {
        Tile t;
        const int nvb = (p.dv + BV - 1) / BV;
        t.vb = idx % nvb;
        t.hv = (idx / nvb) % p.hv;
        t.n = idx / (nvb * p.hv);
        if (p.cu_seqlens) {
            t.bos = p.cu_seqlens[t.n];
            t.len = p.cu_seqlens[t.n + 1] - t.bos;
        } else {
            t.bos = (long long)t.n * p.t;
            t.len = p.t;
        }
        const long long slot = p.state_indices ? p.state_indices[t.n] : t.n;
        t.S = p.state + (slot * p.hv + t.hv) * (long long)p.dk * p.dv;
        return t;
    }

    // Offset of this thread's first column, and whether it is inside V.
    static __device__ __forceinline__ int col0(const Tile& t) { return t.vb * BV + (threadIdx.x % CT) * VW; }
    static __device__ __forceinline__ int row(int r) { return r * KS + (int)threadIdx.x / CT; }

    static __device__ __forceinline__ void load(const RecurrentParams& p, const Tile& t, float (&s)[R][VW]) {
        const int j0 = col0(t);
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int c = row(r);
            if (c < p.dk && j0 < p.dv) {
                const float* src = t.S + (long long)c * p.dv + j0;
                if constexpr (VW == 4) {
                    float4 x = __ldcs(reinterpret_cast<const float4*>(src));
                    s[r][0] = x.x; s[r][1] = x.y; s[r][2] = x.z; s[r][3] = x.w;
                } else {
#pragma unroll
                    for (int i = 0; i < VW; ++i) s[r][i] = __ldcs(src + i);
                }
            } else {
#pragma unroll
                for (int i = 0; i < VW; ++i) s[r][i] = 0.0f;
            }
        }
    }

    static __device__ __forceinline__ void store(const RecurrentParams& p, const Tile& t, const float (&s)[R][VW]) {
        const int j0 = col0(t);
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int c = row(r);
            if (c < p.dk && j0 < p.dv) {
                float* dst = t.S + (long long)c * p.dv + j0;
                if constexpr (VW == 4) {
                    __stcs(reinterpret_cast<float4*>(dst), make_float4(s[r][0], s[r][1], s[r][2], s[r][3]));
                } else {
#pragma unroll
                    for (int x = 0; x < VW; ++x) __stcs(dst + x, s[r][x]);
                }
            }
        }
    }

    // Every token of the tile's sequence against the state tile in registers. All global loads
    // of a token are issued together (no data-dependent branch between them), so a token costs
    // one memory round trip, overlapped with the state loads for the first token.
    template <int DT>
    static __device__ __forceinline__ void tokens(const RecurrentParams& p, const Tile& t, float (&s)[R][VW], Smem& sm) {
        constexpr int M = (KMAX + NT - 1) / NT;  // K slots per thread for the per-token vectors
        const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
        const int col = tid % CT, ks = tid / CT;
        const int hv = t.hv;
        const int j0 = col0(t);
        const bool jok = j0 < p.dv;  // the host checks V % VW == 0
        const int hk = hv / (p.hv / p.h);
        // Per-head constants of the in-op gate, once per tile.
        float neg_ea = 0.0f, dth = 0.0f, dtc[M];
        if (p.use_gate) {
            neg_ea = -expf(fla_load(p.a_log, p.a_log_dtype, hv));
            if (!p.dt_per_channel) dth = fla_load(p.dt_bias, p.dt_bias_dtype, hv);
        }
#pragma unroll
        for (int m = 0; m < M; ++m) {
            const int c = tid + m * NT;
            dtc[m] = p.use_gate && p.dt_per_channel && c < p.dk
                         ? fla_load(p.dt_bias, p.dt_bias_dtype, (long long)hv * p.dk + c)
                         : 0.0f;
        }
        for (long long i = 0; i < t.len; ++i) {
            const long long tok = t.bos + i;
            const long long head_row = tok * p.hv + hv;  // index of (tok, hv) in [tokens, HV]
            // Issue every load of the token.
            float qv[M], kv[M], gv[M], bv[M];
#pragma unroll
            for (int m = 0; m < M; ++m) {
                const int c = tid + m * NT;
                const bool ok = c < p.dk;
                const long long qi = (tok * p.h + hk) * p.dk + c;
                qv[m] = ok ? fla_ld<DT>(p.q, qi) : 0.0f;
                kv[m] = ok ? fla_ld<DT>(p.k, qi) : 0.0f;
                gv[m] = ok && p.decay == 2 ? fla_ld<DT>(p.g, head_row * p.dk + c) : 0.0f;
                bv[m] = ok && p.erase == 2 ? fla_ld<DT>(p.b, head_row * p.dk + c) : 0.0f;
            }
            const float gh = p.decay == 1 ? fla_ld<DT>(p.g, head_row) : 0.0f;
            const float beta_raw = p.erase == 1 || p.write == 1 ? fla_ld<DT>(p.beta, head_row) : 0.0f;
            float vv[VW], ww[VW];
#pragma unroll
            for (int x = 0; x < VW; ++x) {
                const long long vi = head_row * p.dv + j0 + x;
                vv[x] = jok ? fla_ld<DT>(p.v, vi) : 0.0f;
                ww[x] = jok && p.write == 2 ? fla_ld<DT>(p.w, vi) : 0.0f;
            }
            // Then transform: gates, sigmoids, L2 norms.
            float ssq = 0.0f, ssk = 0.0f;
#pragma unroll
            for (int m = 0; m < M; ++m) {
                const int c = tid + m * NT;
                if (c < KMAX) {
                    float dec = 1.0f;
                    if (p.decay == 2 && c < p.dk) {
                        const float g = p.use_gate ? neg_ea * fla_softplusf(gv[m] + dtc[m]) : gv[m];
                        dec = expf(g);
                    }
                    sm.sq[c] = qv[m];
                    sm.sk[c] = kv[m];
                    sm.sdec[c] = dec;
                    sm.sb[c] = p.beta_sigmoid && c < p.dk ? fla_sigmoidf(bv[m]) : bv[m];
                }
                ssq += qv[m] * qv[m];
                ssk += kv[m] * kv[m];
            }
            float dech = 1.0f;
            if (p.decay == 1) dech = expf(p.use_gate ? neg_ea * fla_softplusf(gh + dth) : gh);
            const float beta = p.beta_sigmoid ? fla_sigmoidf(beta_raw) : beta_raw;
#pragma unroll
            for (int x = 0; x < VW; ++x) {
                if (p.write == 0) ww[x] = 1.0f;
                else if (p.write == 1) ww[x] = beta;
                else if (p.beta_sigmoid) ww[x] = fla_sigmoidf(ww[x]);
            }
            float rq = 1.0f, rk = 1.0f;
            if (p.l2norm) {
                fla_warp_sum2(ssq, ssk);
                if (lane == 0) {
                    sm.red_n[warp][0] = ssq;
                    sm.red_n[warp][1] = ssk;
                }
            }
            __syncthreads();
            if (p.l2norm) {
                float a = 0.0f, b = 0.0f;
#pragma unroll
                for (int w = 0; w < NWARPS; ++w) {
                    a += sm.red_n[w][0];
                    b += sm.red_n[w][1];
                }
                rq = rsqrtf(a + 1e-6f);
                rk = rsqrtf(b + 1e-6f);
            }
            const float qs = rq * p.scale;

            // Decay, then the erase e = S^T (b . k).
            float e[VW];
#pragma unroll
            for (int x = 0; x < VW; ++x) e[x] = 0.0f;
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const int c = r * KS + ks;
                const float d = p.decay == 2 ? sm.sdec[c] : dech;
                const float bk = (p.erase == 1 ? beta : sm.sb[c]) * sm.sk[c] * rk;
#pragma unroll
                for (int x = 0; x < VW; ++x) {
                    s[r][x] *= d;
                    e[x] += bk * s[r][x];
                }
            }
            if (p.erase != 0) {
#pragma unroll
                for (int off = CT; off < 32; off <<= 1)
#pragma unroll
                    for (int x = 0; x < VW; ++x) e[x] += __shfl_xor_sync(0xffffffffu, e[x], off);
                if (lane < CT)
#pragma unroll
                    for (int x = 0; x < VW; ++x) sm.red_e[warp][col * VW + x] = e[x];
                __syncthreads();
#pragma unroll
                for (int x = 0; x < VW; ++x) {
                    float acc = 0.0f;
#pragma unroll
                    for (int w = 0; w < NWARPS; ++w) acc += sm.red_e[w][col * VW + x];
                    e[x] = acc;
                }
            }
            // Write k (w . v - e)^T, then o = S^T (scale . q).
            float u[VW], o[VW];
#pragma unroll
            for (int x = 0; x < VW; ++x) {
                u[x] = ww[x] * vv[x] - e[x];
                o[x] = 0.0f;
            }
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const int c = r * KS + ks;
                const float kc = sm.sk[c] * rk, qc = sm.sq[c] * qs;
#pragma unroll
                for (int x = 0; x < VW; ++x) {
                    s[r][x] += kc * u[x];
                    o[x] += qc * s[r][x];
                }
            }
#pragma unroll
            for (int off = CT; off < 32; off <<= 1)
#pragma unroll
                for (int x = 0; x < VW; ++x) o[x] += __shfl_xor_sync(0xffffffffu, o[x], off);
            if (lane < CT)
#pragma unroll
                for (int x = 0; x < VW; ++x) sm.red_o[warp][col * VW + x] = o[x];
            __syncthreads();
            if (ks == 0 && jok) {
#pragma unroll
                for (int x = 0; x < VW; ++x) {
                    float acc = 0.0f;
#pragma unroll
                    for (int w = 0; w < NWARPS; ++w) acc += sm.red_o[w][col * VW + x];
                    fla_st<DT>(p.o, head_row * p.dv + j0 + x, acc);
                }
            }
        }
    }
};

// One tile per CTA: read the state tile, run the tokens, write it back.
template <int DT, int KMAX, int VW, int BV, int NT>
__device__ __forceinline__ void recurrent_step(const RecurrentParams& p) {
    using St = Step<KMAX, VW, BV, NT>;
    __shared__ typename St::Smem sm;
    const Tile t = St::tile(p, blockIdx.x);
    if (t.len <= 0) return;  // the state is left as it is
    float s[St::R][VW];
    St::load(p, t, s);
    St::template tokens<DT>(p, t, s, sm);
    St::store(p, t, s);
}

// Entry points: recurrent_step_{f32,bf16,f16}_k{KMAX}_v{VW}{SUFFIX}, by input dtype; the host
// picks the smallest KMAX >= K, VW = 4 when V % 4 == 0, and the tiling (BV, NT) of the suffix
// (none: 32 columns, 128 threads).
#define FLA_RECURRENT_STEP_DT(DT, NAME, KMAX, VW, BV, NT, MINB, SUFFIX)                         \
    extern "C" __global__ void __launch_bounds__(NT, MINB)                                       \
        recurrent_step_##NAME##_k##KMAX##_v##VW##SUFFIX(const RecurrentParams p) {              \
        recurrent_step<DT, KMAX, VW, BV, NT>(p);                                                \
    }
#define FLA_RECURRENT_STEP(KMAX, VW, BV, NT, MINB, SUFFIX)                 \
    FLA_RECURRENT_STEP_DT(FLA_F32, f32, KMAX, VW, BV, NT, MINB, SUFFIX)    \
    FLA_RECURRENT_STEP_DT(FLA_BF16, bf16, KMAX, VW, BV, NT, MINB, SUFFIX)  \
    FLA_RECURRENT_STEP_DT(FLA_F16, f16, KMAX, VW, BV, NT, MINB, SUFFIX)
FLA_RECURRENT_STEP(64, 4, 32, 128, 1, )
FLA_RECURRENT_STEP(128, 4, 32, 128, 1, )
FLA_RECURRENT_STEP(256, 4, 32, 128, 1, )
FLA_RECURRENT_STEP(64, 1, 32, 128, 1, )
FLA_RECURRENT_STEP(128, 1, 32, 128, 1, )
FLA_RECURRENT_STEP(256, 1, 32, 128, 1, )
// K in (64, 128], V % 4 == 0: 64 columns per CTA (4 CTAs per SM), the default there; it
// reached 90-94% of the copy bandwidth on an H200 where the 32-column tiling above reached 72%
// (BENCHMARKS.md). The others are kept for FLA_RECURRENT_VARIANT comparisons.
FLA_RECURRENT_STEP(128, 4, 64, 128, 4, _bv64)
FLA_RECURRENT_STEP(128, 4, 32, 128, 8, _o8)
FLA_RECURRENT_STEP(128, 4, 128, 256, 2, _bv128)
